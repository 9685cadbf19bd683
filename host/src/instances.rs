//! The instance slots: how many guest instances may be alive at once.
//!
//! An attempt takes a slot before it instantiates its module and gives it
//! back when its instance is dropped. The pool is deliberately small (its
//! pages are the host's largest memory cost), so a slot must not sit idle:
//! an attempt that only waits (for a sleep, a call, an awakeable) gives its
//! slot up by suspending as soon as another attempt is waiting for one,
//! instead of after `suspend_after`. It is replayed when its completion
//! arrives. Without this, a pool of sleepers would stall every other
//! invocation for up to `suspend_after` (head-of-line blocking).
//!
//! Lifecycle: [`Slots::acquire`] (waiting, it wakes one waiting attempt
//! through [`Slots::pressed`]) → the permit lives as long as the instance →
//! dropped.

use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::{Notify, Semaphore, SemaphorePermit};

/// The instance slots of a host.
pub struct Slots {
    permits: Semaphore,
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

impl Slots {
    /// `max` slots.
    pub fn new(max: usize) -> Self {
        Slots {
            permits: Semaphore::new(max),
            waiting: AtomicUsize::new(0),
            pressure: Notify::new(),
        }
    }

    /// Take a slot, waiting for one if none is free; a wait asks one
    /// waiting attempt to give up its slot.
    pub async fn acquire(&self) -> SemaphorePermit<'_> {
        if let Ok(permit) = self.permits.try_acquire() {
            return permit;
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.waiting);
        self.pressure.notify_one();
        self.permits
            .acquire()
            .await
            .expect("the semaphore is never closed")
    }

    /// Whether an attempt is waiting for a slot: a waiting attempt should
    /// suspend rather than hold its slot.
    pub fn short(&self) -> bool {
        self.waiting.load(Ordering::SeqCst) > 0
    }

    /// Resolves when an attempt starts waiting for a slot (or has since the
    /// last call); check [`Slots::short`] after it.
    pub async fn pressed(&self) {
        self.pressure.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn a_waiting_acquire_presses_and_counts_until_it_has_a_slot() {
        let slots = Arc::new(Slots::new(1));
        let held = slots.acquire().await;
        assert!(!slots.short());
        let waiter = {
            let slots = slots.clone();
            tokio::spawn(async move {
                let _slot = slots.acquire().await;
            })
        };
        tokio::time::timeout(Duration::from_secs(5), slots.pressed())
            .await
            .expect("a waiting acquire presses");
        assert!(slots.short());
        drop(held);
        waiter.await.unwrap();
        assert!(!slots.short());
    }

    #[tokio::test]
    async fn an_abandoned_acquire_stops_counting() {
        let slots = Slots::new(1);
        let _held = slots.acquire().await;
        let attempt = tokio::time::timeout(Duration::from_millis(10), slots.acquire()).await;
        assert!(attempt.is_err());
        assert!(!slots.short());
    }
}
