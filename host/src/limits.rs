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

use crate::records::Target;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// The limits of a host and the slots in use.
#[derive(Default)]
pub struct Limits {
    state: Mutex<BTreeMap<String, Slot>>,
    freed: Notify,
}

#[derive(Default, Clone, Copy)]
struct Slot {
    max: usize,
    in_use: usize,
}

/// Slots held by one attempt; given back on drop.
pub struct Held {
    limits: Arc<Limits>,
    scopes: Vec<String>,
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.scopes.is_empty() {
            return;
        }
        let mut state = self.limits.state.lock().unwrap();
        for scope in &self.scopes {
            if let Some(slot) = state.get_mut(scope) {
                slot.in_use = slot.in_use.saturating_sub(1);
            }
        }
        drop(state);
        self.limits.freed.notify_waiters();
    }
}

/// Whether `scope` applies to `target`.
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

impl Limits {
    /// Set (or replace) a limit.
    pub fn set(&self, scope: &str, max: usize) {
        self.state
            .lock()
            .unwrap()
            .entry(scope.to_string())
            .or_default()
            .max = max;
        self.freed.notify_waiters();
    }

    /// Remove a limit; `false` if there was none.
    pub fn remove(&self, scope: &str) -> bool {
        let removed = self.state.lock().unwrap().remove(scope).is_some();
        self.freed.notify_waiters();
        removed
    }

    /// Every limit: `(scope, max, in use)`.
    pub fn list(&self) -> Vec<(String, usize, usize)> {
        self.state
            .lock()
            .unwrap()
            .iter()
            .map(|(s, slot)| (s.clone(), slot.max, slot.in_use))
            .collect()
    }

    /// Wait until every limit matching `target` has a free slot, and take them.
    pub async fn acquire(self: &Arc<Self>, target: &Target) -> Held {
        loop {
            let freed = self.freed.notified();
            if let Some(scopes) = self.try_take(target) {
                return Held {
                    limits: self.clone(),
                    scopes,
                };
            }
            freed.await;
        }
    }

    fn try_take(&self, target: &Target) -> Option<Vec<String>> {
        let mut state = self.state.lock().unwrap();
        let scopes: Vec<String> = state
            .keys()
            .filter(|s| matches(s, target))
            .cloned()
            .collect();
        if scopes.iter().any(|s| state[s].in_use >= state[s].max) {
            return None;
        }
        for s in &scopes {
            state.get_mut(s).expect("listed above").in_use += 1;
        }
        Some(scopes)
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
        assert!(limits.try_take(&t).is_none(), "the third waits");
        drop(a);
        assert!(limits.try_take(&t).is_some(), "a slot came back");
        assert_eq!(limits.list(), vec![("Pay/charge".to_string(), 2, 2)]);
        assert!(limits
            .acquire(&target("Other", "x", None))
            .await
            .scopes
            .is_empty());
    }
}
