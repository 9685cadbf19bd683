//! Flow control: concurrency limits per service, per handler, or per object
//! key prefix ("at most 5 concurrent attempts of the payment API handler").
//!
//! A limit's scope is `Service`, `Service/handler`, or `Object/prefix*`
//! (the attempts of every key of `Object` that starts with `prefix`). An
//! attempt takes a slot in every limit whose scope matches its target
//! before it is instantiated, and gives them back when it ends (a suspended
//! invocation holds none). Invocations over a limit wait, durably queued;
//! none is dropped. Limits come from `[[concurrency]]` in the config, the
//! admin API (`/concurrency-limits`) and the CLI; changing one takes effect
//! for the next attempts.
//!
//! Waiters queue first come, first served on the first of their scopes that
//! is full, and a freed slot wakes only the head of that scope's queue, so a
//! burst of 100,000 waiting invocations costs O(1) per finished attempt.

use crate::records::Target;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// The limits of a host, the slots in use and the attempts waiting.
#[derive(Default)]
pub struct Limits {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    slots: BTreeMap<String, Slot>,
}

#[derive(Default)]
struct Slot {
    max: usize,
    in_use: usize,
    /// Attempts blocked on this scope, in arrival order.
    waiting: VecDeque<Waiter>,
}

struct Waiter {
    target: Target,
    grant: oneshot::Sender<Held>,
}

/// Slots held by one attempt; dropping it gives them back.
pub struct Held {
    limits: Arc<Limits>,
    scopes: Vec<String>,
}

impl Drop for Held {
    fn drop(&mut self) {
        if !self.scopes.is_empty() {
            let scopes = std::mem::take(&mut self.scopes);
            self.limits.release(&scopes);
        }
    }
}

/// Whether `scope` covers `target`.
pub fn matches(scope: &str, target: &Target) -> bool {
    match scope.split_once('/') {
        None => scope == target.service,
        Some((service, rest)) if service == target.service => match rest.strip_suffix('*') {
            Some(prefix) => target.key.as_deref().is_some_and(|k| k.starts_with(prefix)),
            None => rest == target.handler,
        },
        Some(_) => false,
    }
}

impl State {
    fn scopes(&self, target: &Target) -> Vec<String> {
        self.slots
            .keys()
            .filter(|s| matches(s, target))
            .cloned()
            .collect()
    }

    /// The first of `scopes` that is full (or, when `fair`, has waiters).
    fn blocker(&self, scopes: &[String], fair: bool) -> Option<String> {
        scopes
            .iter()
            .find(|s| {
                let slot = &self.slots[*s];
                slot.in_use >= slot.max || (fair && !slot.waiting.is_empty())
            })
            .cloned()
    }

    fn take(&mut self, scopes: &[String]) {
        for s in scopes {
            self.slots.get_mut(s).expect("a listed scope").in_use += 1;
        }
    }
}

impl Limits {
    /// Set (or change) the limit of `scope`.
    pub fn set(self: &Arc<Self>, scope: &str, max: usize) {
        let mut state = self.state.lock().unwrap();
        state.slots.entry(scope.to_string()).or_default().max = max;
        let unclaimed = self.dispatch(&mut state, scope);
        drop(state);
        drop(unclaimed);
    }

    /// Remove the limit of `scope`; its waiters move on. Whether it existed.
    pub fn remove(self: &Arc<Self>, scope: &str) -> bool {
        let mut state = self.state.lock().unwrap();
        let Some(slot) = state.slots.remove(scope) else {
            return false;
        };
        let mut unclaimed = Vec::new();
        for waiter in slot.waiting {
            unclaimed.extend(self.place(&mut state, waiter));
        }
        drop(state);
        drop(unclaimed);
        true
    }

    /// Every limit: (scope, max, slots in use).
    pub fn list(&self) -> Vec<(String, usize, usize)> {
        self.state
            .lock()
            .unwrap()
            .slots
            .iter()
            .map(|(s, slot)| (s.clone(), slot.max, slot.in_use))
            .collect()
    }

    /// Wait for a slot in every limit that matches `target`, behind the
    /// attempts that were waiting first.
    pub async fn acquire(self: &Arc<Self>, target: &Target) -> Held {
        let granted = {
            let mut state = self.state.lock().unwrap();
            let scopes = state.scopes(target);
            let Some(blocker) = state.blocker(&scopes, true) else {
                state.take(&scopes);
                return Held {
                    limits: self.clone(),
                    scopes,
                };
            };
            let (grant, granted) = oneshot::channel();
            let waiter = Waiter {
                target: target.clone(),
                grant,
            };
            state
                .slots
                .get_mut(&blocker)
                .unwrap()
                .waiting
                .push_back(waiter);
            granted
        };
        granted
            .await
            .expect("waiters are granted or moved, never dropped")
    }

    fn release(self: &Arc<Self>, scopes: &[String]) {
        let mut state = self.state.lock().unwrap();
        let mut unclaimed = Vec::new();
        for s in scopes {
            if let Some(slot) = state.slots.get_mut(s) {
                slot.in_use = slot.in_use.saturating_sub(1);
            }
            unclaimed.extend(self.dispatch(&mut state, s));
        }
        drop(state);
        // Slots granted to attempts that stopped waiting go back (after the
        // lock is released, as their drop takes it).
        drop(unclaimed);
    }

    /// Grant `scope`'s free slots to the head of its queue, moving waiters
    /// that another full scope blocks to that scope's queue.
    fn dispatch(self: &Arc<Self>, state: &mut State, scope: &str) -> Vec<Held> {
        let mut unclaimed = Vec::new();
        while let Some(slot) = state.slots.get_mut(scope) {
            if slot.in_use >= slot.max {
                break;
            }
            let Some(waiter) = slot.waiting.pop_front() else {
                break;
            };
            unclaimed.extend(self.place(state, waiter));
        }
        unclaimed
    }

    /// Grant `waiter` its slots, or queue it on the scope that blocks it;
    /// returns the slots if the waiter is gone.
    fn place(self: &Arc<Self>, state: &mut State, waiter: Waiter) -> Option<Held> {
        let scopes = state.scopes(&waiter.target);
        match state.blocker(&scopes, false) {
            Some(other) => {
                state
                    .slots
                    .get_mut(&other)
                    .unwrap()
                    .waiting
                    .push_back(waiter);
                None
            }
            None => {
                state.take(&scopes);
                let held = Held {
                    limits: self.clone(),
                    scopes,
                };
                waiter.grant.send(held).err()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(service: &str, handler: &str, key: Option<&str>) -> Target {
        Target {
            service: service.into(),
            handler: handler.into(),
            key: key.map(str::to_string),
        }
    }

    #[test]
    fn scopes_match_services_handlers_and_key_prefixes() {
        let t = target("Pay", "charge", Some("eu-42"));
        assert!(matches("Pay", &t) && matches("Pay/charge", &t) && matches("Pay/eu-*", &t));
        assert!(!matches("Pay/refund", &t) && !matches("Pay/us-*", &t) && !matches("Other", &t));
        assert!(!matches("Pay/eu-*", &target("Pay", "charge", None)));
    }

    #[tokio::test]
    async fn slots_are_taken_up_to_the_limit_and_given_back() {
        let limits = Arc::new(Limits::default());
        limits.set("Pay/charge", 2);
        let t = target("Pay", "charge", None);
        let a = limits.acquire(&t).await;
        let _b = limits.acquire(&t).await;
        let third = tokio::spawn({
            let (limits, t) = (limits.clone(), t.clone());
            async move { limits.acquire(&t).await }
        });
        tokio::task::yield_now().await;
        assert!(!third.is_finished(), "the third waits");
        drop(a);
        let _c = third.await.unwrap();
        assert_eq!(limits.list(), vec![("Pay/charge".to_string(), 2, 2)]);
        assert!(limits
            .acquire(&target("Other", "x", None))
            .await
            .scopes
            .is_empty());
    }

    #[tokio::test]
    async fn waiters_are_served_in_arrival_order_and_leavers_give_back_their_slot() {
        let limits = Arc::new(Limits::default());
        limits.set("Pay", 1);
        let t = target("Pay", "charge", None);
        let first = limits.acquire(&t).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let waiter = |n: usize| {
            let (limits, t, order) = (limits.clone(), t.clone(), order.clone());
            tokio::spawn(async move {
                let _held = limits.acquire(&t).await;
                order.lock().unwrap().push(n);
            })
        };
        let gone = waiter(0);
        tokio::task::yield_now().await;
        gone.abort();
        let waiters: Vec<_> = (1..=5).map(waiter).collect();
        tokio::task::yield_now().await;
        drop(first);
        for w in waiters {
            w.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![1, 2, 3, 4, 5]);
        assert_eq!(limits.list(), vec![("Pay".to_string(), 1, 0)]);
        limits.set("Pay", 0);
        let blocked = waiter(6);
        tokio::task::yield_now().await;
        assert!(limits.remove("Pay"), "removing a limit lets its waiters go");
        blocked.await.unwrap();
    }
}
