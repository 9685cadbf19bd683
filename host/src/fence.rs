//! Attempt fencing: the writes of an attempt that was superseded (killed,
//! paused, or replaced by a newer attempt) are refused by the writer.
//!
//! Why: stopping a guest is not instant. A killed attempt may still be
//! between two host calls, with writes in the commit queue, while its key
//! already belongs to the next invocation. Every write of an attempt
//! carries the attempt's epoch, and the writer applies it only while that
//! epoch is the invocation's current one ([`Fence::admits`], checked inside
//! the write transaction, so in commit order).
//!
//! Lifecycle of an entry: [`Fence::begin`] when an attempt starts (refused
//! while the invocation is closed); [`Fence::end`] when the attempt ended
//! by itself and all its writes are committed; [`Fence::close`], inside
//! the transaction that kills, pauses or completes the invocation, fences
//! off whatever attempt it has; [`Fence::reopen`] after that transaction is
//! durable, when a new attempt reads the new status anyway.

use crate::ids::InvocationId;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// An attempt's identity for fencing; unique within a host process.
pub type Epoch = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Attempt(Epoch),
    Closed,
}

/// The current attempt of every running invocation.
#[derive(Default)]
pub struct Fence {
    next: AtomicU64,
    current: Mutex<HashMap<InvocationId, Slot>>,
}

impl Fence {
    /// A new attempt of `id` starts; `None` while `id` is closed.
    pub fn begin(&self, id: &InvocationId) -> Option<Epoch> {
        let mut current = self.current.lock().unwrap();
        if current.get(id) == Some(&Slot::Closed) {
            return None;
        }
        let epoch = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        current.insert(id.clone(), Slot::Attempt(epoch));
        Some(epoch)
    }

    /// Whether a write of attempt `epoch` of `id` may be applied.
    pub fn admits(&self, id: &InvocationId, epoch: Epoch) -> bool {
        self.current.lock().unwrap().get(id) == Some(&Slot::Attempt(epoch))
    }

    /// Attempt `epoch` ended by itself and its writes are committed.
    pub fn end(&self, id: &InvocationId, epoch: Epoch) {
        let mut current = self.current.lock().unwrap();
        if current.get(id) == Some(&Slot::Attempt(epoch)) {
            current.remove(id);
        }
    }

    /// Fence off every attempt of `id` (inside the transaction that stops
    /// it); returns the epoch of the attempt it fenced off, if one ran.
    pub fn close(&self, id: &InvocationId) -> Option<Epoch> {
        match self
            .current
            .lock()
            .unwrap()
            .insert(id.clone(), Slot::Closed)
        {
            Some(Slot::Attempt(epoch)) => Some(epoch),
            _ => None,
        }
    }

    /// The transaction that closed `id` is durable.
    pub fn reopen(&self, id: &InvocationId) {
        let mut current = self.current.lock().unwrap();
        if current.get(id) == Some(&Slot::Closed) {
            current.remove(id);
        }
    }

    /// Invocations with an entry (bounded by the running attempts).
    pub fn len(&self) -> usize {
        self.current.lock().unwrap().len()
    }

    /// Whether no attempt is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_current_attempt_writes() {
        let f = Fence::default();
        let id = InvocationId::derived("x", 0);
        let first = f.begin(&id).unwrap();
        assert!(f.admits(&id, first));
        let second = f.begin(&id).unwrap();
        assert!(!f.admits(&id, first), "a newer attempt fences the older");
        assert!(f.admits(&id, second));
        f.end(&id, first);
        assert!(f.admits(&id, second), "a stale end changes nothing");
        assert_eq!(f.close(&id), Some(second));
        assert!(!f.admits(&id, second), "a kill fences the running attempt");
        assert_eq!(f.begin(&id), None, "no attempt starts until reopened");
        f.reopen(&id);
        assert!(f.is_empty());
        let third = f.begin(&id).unwrap();
        f.end(&id, third);
        assert!(f.is_empty(), "entries do not outlive attempts");
    }
}
