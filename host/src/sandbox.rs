//! What one attempt may use of the host, and how the host takes it back.
//!
//! Guests are untrusted code sharing one process. Three guards, on top of
//! the per-instance memory cap and CPU budget, keep one guest (or one
//! service's thousand guests) from hurting the others:
//!
//! - **A host-wide memory budget** ([`MemoryBudget`]). Every linear memory
//!   an instance creates or grows is reserved from it, so the instances of
//!   the whole host never reach more than `limits.memory_total`. A growth
//!   the budget cannot cover waits for memory to be freed (up to
//!   [`MEMORY_WAIT`]), then fails the attempt with a retryable error: the
//!   host waits instead of swelling.
//! - **CPU turns per service** ([`CpuTurns`]). A guest that runs past its
//!   first epoch tick (10 ms) must take one of its service's turns at every
//!   further tick; a service has `max(1, cores × limits.service_share)` of
//!   them, handed out first come, first served, each a lease of one tick
//!   ([`TURN`]) that expires on its own. A thousand endless loops of one
//!   service therefore share its turns and leave the other cores to other
//!   services; short handlers never ask for a turn, and a guest that stops
//!   computing (to wait) never keeps one.
//! - **A wall-clock deadline per attempt** ([`AttemptClock`]). The CPU
//!   budget only counts time in guest code; a guest blocked in a WASI wait
//!   (`std::thread::sleep`) or queued for turns and memory would otherwise
//!   hold its instance forever. The deadline counts everything but durable
//!   waits (sleep, call, awakeable, promise), which suspend instead.
//!
//! Lifecycle: one [`MemoryBudget`] and one [`CpuTurns`] per host, made with
//! the runtime; every attempt gets an [`InstanceMemory`] limiter and an
//! [`AttemptClock`], dropped (and their reservations returned) with its
//! instance.

use crate::context::HostTrap;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, Semaphore};

/// How long a memory growth waits for the host-wide budget before the
/// attempt fails (and is retried later).
pub const MEMORY_WAIT: Duration = Duration::from_secs(5);

/// The bytes of linear memory all instances of a host may hold together.
pub struct MemoryBudget {
    available: AtomicUsize,
    freed: Notify,
}

impl MemoryBudget {
    /// A budget of `total` bytes.
    pub fn new(total: usize) -> Arc<Self> {
        Arc::new(MemoryBudget {
            available: AtomicUsize::new(total),
            freed: Notify::new(),
        })
    }

    /// Bytes not reserved by any instance.
    pub fn available(&self) -> usize {
        self.available.load(Ordering::SeqCst)
    }

    fn try_take(&self, bytes: usize) -> bool {
        self.available
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |a| a.checked_sub(bytes))
            .is_ok()
    }

    fn give(&self, bytes: usize) {
        self.available.fetch_add(bytes, Ordering::SeqCst);
        self.freed.notify_waiters();
    }

    /// Reserve `bytes`, waiting up to `wait` for other instances to free
    /// them; whether it got them.
    async fn take(&self, bytes: usize, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.try_take(bytes) {
                return true;
            }
            tokio::select! {
                _ = freed => {}
                _ = tokio::time::sleep_until(deadline) => return self.try_take(bytes),
            }
        }
    }
}

/// The memory limiter of one instance: its own cap, and its share of the
/// host's budget, given back when the instance is dropped.
pub struct InstanceMemory {
    budget: Arc<MemoryBudget>,
    cap: usize,
    held: usize,
    /// How long a growth waits for the budget ([`MEMORY_WAIT`]).
    wait: Duration,
}

impl InstanceMemory {
    /// A limiter capping each memory at `cap` bytes, drawing on `budget`.
    pub fn new(budget: Arc<MemoryBudget>, cap: usize) -> Self {
        InstanceMemory {
            budget,
            cap,
            held: 0,
            wait: MEMORY_WAIT,
        }
    }
}

impl Drop for InstanceMemory {
    fn drop(&mut self) {
        self.budget.give(self.held);
    }
}

#[async_trait::async_trait]
impl wasmtime::ResourceLimiterAsync for InstanceMemory {
    async fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.cap {
            return Err(wasmtime::Error::new(HostTrap::MemoryCap {
                desired,
                cap: self.cap,
            }));
        }
        let more = desired.saturating_sub(current);
        if !self.budget.take(more, self.wait).await {
            return Err(wasmtime::Error::new(HostTrap::HostMemory { wanted: more }));
        }
        self.held += more;
        Ok(true)
    }

    async fn table_growing(
        &mut self,
        _current: usize,
        _desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Bounded by the pooling allocator's table size.
        Ok(true)
    }
}

/// The CPU turns of every service: how many of its guests may run past
/// their first tick at once.
pub struct CpuTurns {
    per_service: usize,
    services: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl CpuTurns {
    /// `per_service` turns for each service.
    pub fn new(per_service: usize) -> Self {
        CpuTurns {
            per_service: per_service.max(1),
            services: Mutex::default(),
        }
    }

    /// The turns of `service` (one entry per deployed service name).
    pub fn of(&self, service: &str) -> Arc<Semaphore> {
        let mut services = self.services.lock().unwrap();
        let turns = services.entry(service.to_string());
        turns
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_service)))
            .clone()
    }
}

/// How long a CPU turn lasts: one epoch tick. A turn is a lease, not a
/// lock: it expires on its own, so a guest that stops computing (a durable
/// wait, a WASI wait, a host call) never keeps its service's turn.
pub const TURN: Duration = Duration::from_millis(10);

/// One guest's access to its service's turns.
pub struct Turn {
    turns: Arc<Semaphore>,
}

impl Turn {
    /// A guest of the service owning `turns`.
    pub fn new(turns: Arc<Semaphore>) -> Self {
        Turn { turns }
    }

    /// The future the guest yields to at a tick: it waits for one of the
    /// service's turns, first come first served, and holds it for [`TURN`].
    pub fn take(&self) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let turns = self.turns.clone();
        Box::pin(async move {
            let lease = turns.acquire_owned().await.expect("never closed");
            tokio::spawn(async move {
                tokio::time::sleep(TURN).await;
                drop(lease);
            });
        })
    }
}

/// The wall-clock time an attempt has been busy: everything since it
/// started except its durable waits.
pub struct AttemptClock {
    started: Instant,
    waits: Mutex<Waits>,
    /// Whether a wait ended since [`AttemptClock::take_waited`] last looked.
    waited: AtomicBool,
}

#[derive(Default)]
struct Waits {
    total: Duration,
    since: Option<Instant>,
}

/// Marks a durable wait for as long as it lives.
pub struct Waiting<'a>(&'a AttemptClock);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut waits = self.0.waits.lock().unwrap();
        if let Some(since) = waits.since.take() {
            waits.total += since.elapsed();
        }
        self.0.mark_waited();
    }
}

impl AttemptClock {
    /// A clock started now.
    pub fn start() -> Arc<Self> {
        Arc::new(AttemptClock {
            started: Instant::now(),
            waits: Mutex::default(),
            waited: AtomicBool::new(false),
        })
    }

    /// Whether the attempt waited on the host since the last call: the
    /// epoch tick that passed meanwhile is not guest CPU time.
    pub fn take_waited(&self) -> bool {
        self.waited.swap(false, Ordering::SeqCst)
    }

    /// The attempt waited on the host (a commit, a step's backoff): the
    /// tick that passed is not guest time, though the wait counts against
    /// the wall-clock budget.
    pub fn mark_waited(&self) {
        self.waited.store(true, Ordering::SeqCst);
    }

    /// Stop counting until the returned guard is dropped (a durable wait,
    /// which suspends when it lasts).
    pub fn wait(&self) -> Waiting<'_> {
        self.waits.lock().unwrap().since = Some(Instant::now());
        Waiting(self)
    }

    /// Busy time so far, and whether the attempt is in a durable wait now.
    fn busy(&self) -> (Duration, bool) {
        let waits = self.waits.lock().unwrap();
        let waiting = waits.since.map(|s| s.elapsed()).unwrap_or_default();
        let busy = self.started.elapsed().saturating_sub(waits.total + waiting);
        (busy, waits.since.is_some())
    }

    /// Resolves once the attempt has been busy for `limit`.
    pub async fn expired(&self, limit: Duration) {
        loop {
            let (busy, waiting) = self.busy();
            if busy >= limit && !waiting {
                return;
            }
            let left = limit.saturating_sub(busy).max(Duration::from_millis(10));
            tokio::time::sleep(left).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::ResourceLimiterAsync;

    #[tokio::test]
    async fn instances_draw_on_one_budget_and_give_it_back() {
        let budget = MemoryBudget::new(100);
        let mut a = InstanceMemory::new(budget.clone(), 80);
        let mut b = InstanceMemory::new(budget.clone(), 80);
        assert!(a.memory_growing(0, 60, None).await.unwrap());
        let cap = a.memory_growing(60, 81, None).await.unwrap_err();
        assert!(matches!(
            cap.downcast_ref::<HostTrap>(),
            Some(HostTrap::MemoryCap { .. })
        ));
        let waiting = tokio::spawn(async move {
            let grown = b.memory_growing(0, 50, None).await.is_ok();
            (grown, budget.available())
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "the second waits for the first");
        drop(a);
        assert_eq!(waiting.await.unwrap(), (true, 50));
    }

    #[tokio::test]
    async fn a_growth_the_budget_cannot_cover_fails_after_waiting() {
        let budget = MemoryBudget::new(10);
        let mut a = InstanceMemory::new(budget.clone(), 100);
        a.wait = Duration::from_millis(20);
        let err = a.memory_growing(0, 20, None).await.unwrap_err();
        assert!(matches!(
            err.downcast_ref::<HostTrap>(),
            Some(HostTrap::HostMemory { wanted: 20 })
        ));
        assert_eq!(budget.available(), 10);
    }

    #[tokio::test]
    async fn a_turn_is_a_lease_that_expires_on_its_own() {
        let turns = CpuTurns::new(1).of("S");
        let (a, b) = (Turn::new(turns.clone()), Turn::new(turns.clone()));
        a.take().await;
        let started = Instant::now();
        let b_turn = tokio::spawn(b.take());
        tokio::task::yield_now().await;
        assert!(!b_turn.is_finished(), "one turn per service");
        b_turn.await.unwrap();
        assert!(started.elapsed() >= TURN - Duration::from_millis(2));
        assert!(CpuTurns::new(1).of("Other").try_acquire().is_ok());
    }

    #[test]
    fn durable_waits_do_not_count_against_the_deadline() {
        let clock = AttemptClock::start();
        {
            let _w = clock.wait();
            std::thread::sleep(Duration::from_millis(30));
        }
        let (busy, waiting) = clock.busy();
        assert!(!waiting && busy < Duration::from_millis(25), "{busy:?}");
        assert!(clock.take_waited() && !clock.take_waited());
    }
}
