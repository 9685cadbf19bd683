//! The instance slots: how many guest instances may be alive at once, on
//! the whole host and per service.
//!
//! An attempt takes a slot of its service and one of the host before it
//! instantiates its module, and gives both back when its instance is
//! dropped. The host's pool is deliberately small (its pages are the host's
//! largest memory cost), and a service may hold only its share of it
//! (`limits.service_share`), so a thousand blocked guests of one service
//! cannot take every slot from the others.
//!
//! A slot must not sit idle: an attempt that only waits (for a sleep, a
//! call, an awakeable) gives its slots up by suspending as soon as another
//! attempt is waiting for the host's slots or its service's, instead of
//! after `suspend_after`. It is replayed when its completion arrives.
//! Without this, a pool of sleepers would stall every other invocation for
//! up to `suspend_after` (head-of-line blocking).
//!
//! Lifecycle: [`Slots::acquire`] (waiting, it wakes one waiting attempt
//! through [`Slots::pressed`]) → the [`Slot`] lives as long as the
//! instance → dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// One pool of slots and the attempts waiting for it.
struct Pool {
    permits: Arc<Semaphore>,
    /// Attempts waiting for a slot now.
    waiting: AtomicUsize,
    /// Woken once for every attempt that starts waiting for a slot.
    pressure: Notify,
}

/// Counts an attempt as waiting while it exists (a dropped attempt future
/// stops waiting too).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Pool {
    fn new(max: usize) -> Self {
        Pool {
            permits: Arc::new(Semaphore::new(max)),
            waiting: AtomicUsize::new(0),
            pressure: Notify::new(),
        }
    }

    async fn acquire(&self) -> OwnedSemaphorePermit {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return permit;
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.waiting);
        self.pressure.notify_one();
        self.permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }

    fn short(&self) -> bool {
        self.waiting.load(Ordering::SeqCst) > 0
    }
}

/// The instance slots of a host.
pub struct Slots {
    host: Pool,
    per_service: usize,
    services: Mutex<HashMap<String, Arc<Pool>>>,
}

/// The slots one attempt holds, given back when dropped.
pub struct Slot {
    _service: OwnedSemaphorePermit,
    _host: OwnedSemaphorePermit,
}

impl Slots {
    /// `max` slots, at most `per_service` of them for one service.
    pub fn new(max: usize, per_service: usize) -> Self {
        Slots {
            host: Pool::new(max),
            per_service: per_service.max(1),
            services: Mutex::default(),
        }
    }

    fn service(&self, service: &str) -> Arc<Pool> {
        let mut services = self.services.lock().unwrap();
        let pool = services.entry(service.to_string());
        pool.or_insert_with(|| Arc::new(Pool::new(self.per_service)))
            .clone()
    }

    /// Take a slot of `service` and one of the host, waiting for them if
    /// none is free; a wait asks one waiting attempt to give up its slot.
    pub async fn acquire(&self, service: &str) -> Slot {
        let service = self.service(service).acquire().await;
        Slot {
            _service: service,
            _host: self.host.acquire().await,
        }
    }

    /// Whether an attempt is waiting for a slot an attempt of `service`
    /// could give up: that attempt should suspend rather than wait.
    pub fn short(&self, service: &str) -> bool {
        self.host.short() || self.service(service).short()
    }

    /// Resolves when an attempt starts waiting for the host's slots or
    /// `service`'s (or has since the last call); check [`Slots::short`]
    /// after it.
    pub async fn pressed(&self, service: &str) {
        let pool = self.service(service);
        tokio::select! {
            _ = self.host.pressure.notified() => {}
            _ = pool.pressure.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_waiting_acquire_presses_and_counts_until_it_has_a_slot() {
        let slots = Arc::new(Slots::new(1, 1));
        let held = slots.acquire("A").await;
        assert!(!slots.short("A"));
        let waiter = {
            let slots = slots.clone();
            tokio::spawn(async move {
                let _slot = slots.acquire("B").await;
            })
        };
        tokio::time::timeout(Duration::from_secs(5), slots.pressed("A"))
            .await
            .expect("a waiting acquire presses");
        assert!(slots.short("A"));
        drop(held);
        waiter.await.unwrap();
        assert!(!slots.short("A"));
    }

    #[tokio::test]
    async fn a_service_holds_at_most_its_share_and_presses_only_its_own() {
        let slots = Arc::new(Slots::new(4, 2));
        let _a1 = slots.acquire("A").await;
        let a2 = slots.acquire("A").await;
        let third = {
            let slots = slots.clone();
            tokio::spawn(async move {
                let _slot = slots.acquire("A").await;
            })
        };
        tokio::time::timeout(Duration::from_secs(5), slots.pressed("A"))
            .await
            .expect("A's waiter presses A");
        assert!(slots.short("A") && !slots.short("B"));
        let _b = tokio::time::timeout(Duration::from_secs(5), slots.acquire("B"))
            .await
            .expect("B has slots while A waits");
        drop(a2);
        third.await.unwrap();
    }

    #[tokio::test]
    async fn an_abandoned_acquire_stops_counting() {
        let slots = Slots::new(1, 1);
        let _held = slots.acquire("A").await;
        let attempt = tokio::time::timeout(Duration::from_millis(10), slots.acquire("A")).await;
        assert!(attempt.is_err());
        assert!(!slots.short("A"));
    }
}
