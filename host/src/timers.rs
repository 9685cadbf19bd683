//! Timers: every durable sleep and every delayed start of the host in one
//! ordered set, served by one task.
//!
//! Why one structure: a host may hold millions of sleeping or delayed
//! invocations. A tokio task each would cost kilobytes and a wake-up each;
//! an entry here costs its key (an invocation id and two integers) in a
//! B-tree. The durable copy is the `timers` table or the invocation's
//! `start_at_ms`; this queue is rebuilt from them at start.
//!
//! Lifecycle: [`TimerQueue::new`] makes an empty queue; [`TimerQueue::run`]
//! (one task per host) sleeps until the earliest entry is due, hands every
//! due entry to the callback, and sleeps again. [`TimerQueue::add`] wakes
//! the task when the new entry is earlier than what it sleeps for;
//! [`TimerQueue::remove`] drops an entry that will not be needed (its
//! invocation completed).

use crate::clock::SharedClock;
use crate::ids::InvocationId;
use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::Notify;

/// What falls due.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Due {
    /// Command `command` (a `Sleep`) of an invocation.
    Sleep(InvocationId, u32),
    /// A delayed invocation may start.
    Start(InvocationId),
}

/// Longest sleep between two looks at the clock, so that a clock that
/// jumps (or a manual clock in tests) is noticed.
const MAX_NAP: Duration = Duration::from_secs(1);

/// The host's timers.
pub struct TimerQueue {
    clock: SharedClock,
    entries: Mutex<BTreeSet<(u64, Due)>>,
    changed: Notify,
}

impl TimerQueue {
    /// An empty queue reading `clock`.
    pub fn new(clock: SharedClock) -> Self {
        TimerQueue {
            clock,
            entries: Mutex::default(),
            changed: Notify::new(),
        }
    }

    /// Fire `due` at `at_ms` (at once if that has passed).
    pub fn add(&self, at_ms: u64, due: Due) {
        let mut entries = self.entries.lock().unwrap();
        let earliest = entries.first().is_none_or(|(first, _)| at_ms < *first);
        entries.insert((at_ms, due));
        drop(entries);
        if earliest {
            self.changed.notify_one();
        }
    }

    /// Forget an entry; `false` if it was not there (fired already).
    pub fn remove(&self, at_ms: u64, due: &Due) -> bool {
        self.entries.lock().unwrap().remove(&(at_ms, due.clone()))
    }

    /// Entries waiting.
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap().len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Take every entry due at `now_ms`, earliest first.
    pub fn take_due(&self, now_ms: u64) -> Vec<(u64, Due)> {
        let mut entries = self.entries.lock().unwrap();
        let mut due = Vec::new();
        while entries.first().is_some_and(|(at, _)| *at <= now_ms) {
            due.extend(entries.pop_first());
        }
        due
    }

    /// Serve the queue forever: hand each due entry to `fire`.
    pub async fn run(&self, fire: impl Fn(u64, Due)) {
        loop {
            let now = self.clock.now_ms();
            for (at, due) in self.take_due(now) {
                fire(at, due);
            }
            let next = self.entries.lock().unwrap().first().map(|(at, _)| *at);
            let nap = next.map_or(MAX_NAP, |at| {
                Duration::from_millis(at.saturating_sub(now)).min(MAX_NAP)
            });
            let _ = tokio::time::timeout(nap, self.changed.notified()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use std::sync::Arc;

    fn id(n: u8) -> InvocationId {
        InvocationId::derived(&n.to_string(), 0)
    }

    #[test]
    fn due_entries_come_out_in_time_order_and_removed_ones_never() {
        let q = TimerQueue::new(Arc::new(ManualClock::at(0)));
        q.add(30, Due::Start(id(3)));
        q.add(10, Due::Sleep(id(1), 4));
        q.add(20, Due::Sleep(id(2), 0));
        q.add(25, Due::Start(id(9)));
        assert!(q.remove(25, &Due::Start(id(9))));
        assert!(!q.remove(25, &Due::Start(id(9))));
        assert!(q.take_due(9).is_empty());
        assert_eq!(
            q.take_due(20),
            vec![(10, Due::Sleep(id(1), 4)), (20, Due::Sleep(id(2), 0))]
        );
        assert_eq!(q.take_due(1_000), vec![(30, Due::Start(id(3)))]);
        assert!(q.is_empty());
    }

    #[tokio::test]
    async fn the_task_fires_when_the_clock_reaches_an_entry() {
        let clock = ManualClock::at(1_000);
        let q = Arc::new(TimerQueue::new(Arc::new(clock.clone())));
        let fired = Arc::new(Mutex::new(Vec::new()));
        let (q2, f2) = (q.clone(), fired.clone());
        tokio::spawn(async move { q2.run(|at, due| f2.lock().unwrap().push((at, due))).await });
        q.add(1_500, Due::Start(id(1)));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(fired.lock().unwrap().is_empty(), "not due yet");
        clock.advance(500);
        // The task looks at the clock at least every MAX_NAP.
        tokio::time::sleep(MAX_NAP + Duration::from_millis(500)).await;
        assert_eq!(*fired.lock().unwrap(), vec![(1_500, Due::Start(id(1)))]);
    }
}
