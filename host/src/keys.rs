//! Key queues: exclusive handlers of one virtual-object key run one at a
//! time, in arrival (sequence) order.
//!
//! This module is pure bookkeeping (no I/O, no tasks), so its rules are
//! unit-tested directly and the invoker only acts on what it answers:
//!
//! - [`KeyQueues::arrive`]: an invocation is due; it either holds the key
//!   now (start it) or waits behind the holder.
//! - [`KeyQueues::leave`]: an invocation is finished with its key (it
//!   completed or was killed). If it held the key, the next one in sequence
//!   order becomes the holder and is returned (start it); if it was still
//!   waiting it just leaves the queue. Leaving twice, or leaving a key one
//!   never joined, changes nothing, so every party that sees an invocation
//!   finish may call it.
//! - A paused or suspended invocation stays where it is: a holder keeps the
//!   key, a waiter keeps its place (and holds the key once it reaches the
//!   head, until it is resumed or killed).
//!
//! Each busy key also carries the [`SharedOverlay`] of its holders' state
//! writes that may still be in the commit queue (see `context`).

use crate::context::SharedOverlay;
use crate::fence::Epoch;
use crate::ids::InvocationId;
use std::collections::{BTreeMap, HashMap};

/// `(service, key)` of a virtual object or workflow.
pub type KeySlot = (String, String);

#[derive(Default)]
struct KeyQueue {
    /// The invocation that holds the key.
    holder: Option<InvocationId>,
    /// The ones waiting for it, by sequence number.
    waiting: BTreeMap<u64, InvocationId>,
    /// Uncommitted state writes of the key's holders.
    overlay: SharedOverlay,
}

/// Every busy key of the host; a key with no holder is dropped.
#[derive(Default)]
pub struct KeyQueues {
    keys: HashMap<KeySlot, KeyQueue>,
}

impl KeyQueues {
    /// Invocation `id` (sequence `seq`) is due on `slot`. `true` when it
    /// now holds the key (or already did); `false` when it waits.
    pub fn arrive(&mut self, slot: &KeySlot, seq: u64, id: &InvocationId) -> bool {
        let queue = self.keys.entry(slot.clone()).or_default();
        match &queue.holder {
            None => {
                queue.holder = Some(id.clone());
                true
            }
            Some(holder) if holder == id => true,
            Some(_) => {
                queue.waiting.insert(seq, id.clone());
                false
            }
        }
    }

    /// Hold `slot` for `holder` if nobody holds it, or `holder` already
    /// does and nobody waits for it, without joining its queue otherwise:
    /// whether it holds it for one more turn. A subscription's inline
    /// records take their keys this way (see `inline`), so they never go
    /// ahead of a waiter; they leave like any holder.
    pub fn try_hold(&mut self, slot: &KeySlot, holder: &InvocationId) -> bool {
        let queue = self.keys.entry(slot.clone()).or_default();
        match &queue.holder {
            None => {
                queue.holder = Some(holder.clone());
                true
            }
            Some(h) => h == holder && queue.waiting.is_empty(),
        }
    }

    /// Invocation `id` (sequence `seq`) is done with `slot`; returns the
    /// next holder, which the caller starts.
    pub fn leave(&mut self, slot: &KeySlot, seq: u64, id: &InvocationId) -> Option<InvocationId> {
        let queue = self.keys.get_mut(slot)?;
        if queue.holder.as_ref() != Some(id) {
            if queue.waiting.get(&seq) == Some(id) {
                queue.waiting.remove(&seq);
            }
            return None;
        }
        match queue.waiting.pop_first() {
            Some((_, next)) => {
                queue.holder = Some(next.clone());
                Some(next)
            }
            None => {
                self.keys.remove(slot);
                None
            }
        }
    }

    /// Whether `id` holds `slot`.
    #[cfg(test)]
    pub fn holds(&self, slot: &KeySlot, id: &InvocationId) -> bool {
        self.keys
            .get(slot)
            .is_some_and(|q| q.holder.as_ref() == Some(id))
    }

    /// Whether anybody waits for `slot`.
    pub fn has_waiters(&self, slot: &KeySlot) -> bool {
        self.keys.get(slot).is_some_and(|q| !q.waiting.is_empty())
    }

    /// The overlay of `slot` (a fresh one for a key nobody holds).
    pub fn overlay(&mut self, slot: &KeySlot) -> SharedOverlay {
        self.keys.entry(slot.clone()).or_default().overlay.clone()
    }

    /// Drop attempt `epoch`'s layer of the overlay of `slot`: its writes
    /// are committed, or were refused.
    pub fn retire(&mut self, slot: &KeySlot, epoch: Epoch) {
        if let Some(q) = self.keys.get(slot) {
            q.overlay.lock().unwrap().retire(epoch);
        }
    }

    /// Busy keys, for tests and metrics.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is busy.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot() -> KeySlot {
        ("Counter".into(), "k".into())
    }

    fn id(n: u8) -> InvocationId {
        InvocationId::derived(&n.to_string(), 0)
    }

    #[test]
    fn one_holder_then_arrival_order() {
        let mut q = KeyQueues::default();
        assert!(q.arrive(&slot(), 5, &id(5)));
        assert!(!q.arrive(&slot(), 9, &id(9)));
        assert!(!q.arrive(&slot(), 7, &id(7)));
        assert!(
            q.arrive(&slot(), 5, &id(5)),
            "arriving again changes nothing"
        );
        assert_eq!(q.leave(&slot(), 5, &id(5)), Some(id(7)), "sequence order");
        assert!(q.holds(&slot(), &id(7)));
        assert_eq!(q.leave(&slot(), 7, &id(7)), Some(id(9)));
        assert_eq!(q.leave(&slot(), 9, &id(9)), None);
        assert!(q.is_empty(), "a free key is dropped");
    }

    #[test]
    fn holding_if_free_never_queues() {
        let mut q = KeyQueues::default();
        assert!(q.try_hold(&slot(), &id(1)), "a free key is taken");
        assert!(q.try_hold(&slot(), &id(1)), "its holder holds it still");
        assert!(!q.try_hold(&slot(), &id(2)), "a held key is not");
        assert!(!q.has_waiters(&slot()), "and the refused one does not wait");
        assert!(!q.arrive(&slot(), 7, &id(7)));
        assert!(
            !q.try_hold(&slot(), &id(1)),
            "not another turn while 7 waits"
        );
        assert_eq!(
            q.leave(&slot(), 0, &id(1)),
            Some(id(7)),
            "it leaves like any holder"
        );
        assert!(!q.try_hold(&slot(), &id(1)));
    }

    #[test]
    fn leaving_is_idempotent_and_a_waiter_leaves_without_releasing() {
        let mut q = KeyQueues::default();
        q.arrive(&slot(), 1, &id(1));
        q.arrive(&slot(), 2, &id(2));
        q.arrive(&slot(), 3, &id(3));
        assert_eq!(q.leave(&slot(), 2, &id(2)), None, "a waiter leaves");
        assert_eq!(q.leave(&slot(), 2, &id(2)), None);
        assert!(q.holds(&slot(), &id(1)));
        assert_eq!(q.leave(&slot(), 1, &id(1)), Some(id(3)));
        assert_eq!(
            q.leave(&slot(), 1, &id(1)),
            None,
            "leaving twice is harmless"
        );
        assert!(q.holds(&slot(), &id(3)));
        assert_eq!(
            q.leave(&slot(), 8, &id(8)),
            None,
            "a stranger changes nothing"
        );
        assert!(q.holds(&slot(), &id(3)));
    }
}
