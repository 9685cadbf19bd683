//! The invoker: creates invocations, orders them per key, runs their
//! attempts, retries them, completes them and tells whoever waits.
//!
//! Lifecycle of an invocation:
//!
//! ```text
//! submit ──commit──▶ (delayed? wait) ──▶ key queue (exclusive only) ──▶ attempt
//!                                                                       │
//!            ┌── retryable error: backoff, replay ◀────────────────────┤
//!            │                                                          │
//!            └─────────────────────────────▶ completed (outcome stored) ┘
//!                                              │ commit, then wake attach/HTTP waiters
//! ```
//!
//! Exclusive handlers of one key run one at a time in arrival (sequence)
//! order; the queue is durable (`inbox` table) and rebuilt at start by
//! [`Invoker::recover`]. Shared handlers and services run at once. Every
//! attempt gets a fresh instance and replays the journal written so far.

use crate::clock::SharedClock;
use crate::commit::{Committer, Continuation};
use crate::config::Config;
use crate::context::DurableContext;
use crate::deployments::Registry;
use crate::ids::InvocationId;
use crate::journal::{Journal, Outcome};
use crate::records::{InvocationRecord, ServiceKind, Status, Target};
use crate::runtime::{AttemptEnd, Runtime};
use crate::store::{Store, StoreError};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, Semaphore};

/// A request to invoke a handler.
#[derive(Debug, Clone)]
pub struct NewInvocation {
    /// What to invoke.
    pub target: Target,
    /// JSON body.
    pub input: Vec<u8>,
    /// Headers passed to the handler.
    pub headers: Vec<(String, String)>,
    /// Idempotency key, if the caller gave one.
    pub idempotency_key: Option<String>,
    /// Start no earlier than this long from now.
    pub delay: Option<Duration>,
}

/// The answer to a submission.
#[derive(Debug, Clone)]
pub struct Submitted {
    /// The invocation's id.
    pub id: InvocationId,
    /// `true` when an idempotency key matched an earlier invocation.
    pub existing: bool,
}

/// A submission was refused.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// No deployment has this service.
    #[error("service {0} not found")]
    UnknownService(String),
    /// The service has no such handler.
    #[error("handler {1} not found in service {0}")]
    UnknownHandler(String, String),
    /// Keyed services need a key; services take none.
    #[error("{0}")]
    WrongKeying(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where a not-yet-completed invocation is, as the host knows in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveStatus {
    /// Waiting for its start time.
    Scheduled,
    /// Queued behind another invocation of its key.
    Pending,
    /// An attempt is running.
    Running,
    /// Waiting to retry.
    BackingOff,
}

#[derive(Default)]
struct KeyQueue {
    busy: bool,
    waiting: BTreeMap<u64, Arc<InvocationRecord>>,
}

/// The invoker; one per host, shared as `Arc<Invoker>`.
pub struct Invoker {
    config: Config,
    store: Arc<Store>,
    committer: Committer,
    runtime: Arc<Runtime>,
    registry: Arc<Registry>,
    clock: SharedClock,
    tokio: tokio::runtime::Handle,
    instances: Semaphore,
    keys: Mutex<HashMap<(String, String), KeyQueue>>,
    live: Mutex<HashMap<InvocationId, LiveStatus>>,
    watchers: Mutex<HashMap<InvocationId, Vec<oneshot::Sender<Outcome>>>>,
}

impl Invoker {
    /// An invoker over the given parts; call [`Invoker::recover`] next.
    pub fn new(
        config: Config,
        store: Arc<Store>,
        committer: Committer,
        runtime: Arc<Runtime>,
        registry: Arc<Registry>,
        clock: SharedClock,
    ) -> Arc<Self> {
        Arc::new(Invoker {
            instances: Semaphore::new(config.limits.max_instances as usize),
            config,
            store,
            committer,
            runtime,
            registry,
            clock,
            tokio: tokio::runtime::Handle::current(),
            keys: Mutex::default(),
            live: Mutex::default(),
            watchers: Mutex::default(),
        })
    }

    /// The store, for readers.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The service registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The clock.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Resume every unfinished invocation, in arrival order; start the
    /// retention cleaner.
    pub fn recover(self: &Arc<Self>) -> Result<usize, StoreError> {
        let unfinished = self.store.unfinished()?;
        let count = unfinished
            .iter()
            .filter(|r| r.status == Status::Ready)
            .count();
        for record in unfinished.into_iter().filter(|r| r.status == Status::Ready) {
            self.schedule(Arc::new(record));
        }
        let me = self.clone();
        self.tokio.spawn(async move { me.clean_expired().await });
        Ok(count)
    }

    /// Create an invocation (or find the one its idempotency key names).
    /// Returns once the invocation is durable; its first attempt may start
    /// before that (see the comment inside).
    pub async fn submit(
        self: &Arc<Self>,
        request: NewInvocation,
    ) -> Result<Submitted, SubmitError> {
        let record = self.new_record(request)?;
        let (tx, rx) = oneshot::channel();
        let me = self.clone();
        self.committer.submit(Box::new(move |t| {
            let target = record.target.to_string();
            if let Some(key) = &record.idempotency_key {
                if let Some(id) = t.idempotent(&target, key)? {
                    return Ok(answer(tx, Submitted { id, existing: true }));
                }
            }
            let mut record = record;
            record.seq = t.next_seq()?;
            t.put_invocation(&record)?;
            if let Some(key) = &record.idempotency_key {
                t.put_idempotent(&target, key, &record.id)?;
            }
            let submitted = Submitted {
                id: record.id.clone(),
                existing: false,
            };
            // Routed now, in sequence order, without waiting for the commit:
            // everything the attempt writes queues behind this transaction,
            // and nothing it produces is acknowledged before a later commit.
            me.schedule(Arc::new(record));
            Ok(answer(tx, submitted))
        }));
        Ok(rx.await.expect("the commit writer answers every job"))
    }

    fn new_record(&self, request: NewInvocation) -> Result<InvocationRecord, SubmitError> {
        let target = request.target;
        let (service, deployment) = self
            .registry
            .service(&target.service)
            .ok_or_else(|| SubmitError::UnknownService(target.service.clone()))?;
        let handler = service.handler(&target.handler).ok_or_else(|| {
            SubmitError::UnknownHandler(target.service.clone(), target.handler.clone())
        })?;
        match (service.kind, &target.key) {
            (ServiceKind::Service, Some(_)) => {
                return Err(SubmitError::WrongKeying(format!(
                    "{} is a service: call it without a key",
                    service.name
                )))
            }
            (ServiceKind::VirtualObject | ServiceKind::Workflow, None) => {
                return Err(SubmitError::WrongKeying(format!(
                    "{} is keyed: call /{}/{{key}}/{}",
                    service.name, service.name, target.handler
                )))
            }
            _ => {}
        }
        let now = self.clock.now_ms();
        Ok(InvocationRecord {
            id: InvocationId::generate(),
            handler_kind: handler.kind,
            target,
            deployment,
            input: request.input,
            headers: request.headers,
            idempotency_key: request.idempotency_key,
            seq: 0,
            created_ms: now,
            start_at_ms: request.delay.map(|d| now + d.as_millis() as u64),
            status: Status::Ready,
            attempts: 0,
            last_error: None,
            outcome: None,
            completed_ms: None,
        })
    }

    /// Wait for an invocation's outcome. `None` if the host does not know it.
    pub async fn attach(&self, id: &InvocationId) -> Result<Option<Outcome>, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.watchers
            .lock()
            .unwrap()
            .entry(id.clone())
            .or_default()
            .push(tx);
        match self.store.invocation(id)? {
            None => Ok(None),
            Some(r) if r.status == Status::Completed => Ok(r.outcome),
            Some(_) => Ok(rx.await.ok()),
        }
    }

    /// The in-memory status of an unfinished invocation, if it has one.
    pub fn live_status(&self, id: &InvocationId) -> Option<LiveStatus> {
        self.live.lock().unwrap().get(id).copied()
    }

    fn set_live(&self, id: &InvocationId, status: Option<LiveStatus>) {
        let mut live = self.live.lock().unwrap();
        match status {
            Some(s) => live.insert(id.clone(), s),
            None => live.remove(id),
        };
    }

    /// Route a durable, unfinished invocation: wait for its start time,
    /// then queue it behind its key or run it.
    fn schedule(self: &Arc<Self>, record: Arc<InvocationRecord>) {
        let wait = record
            .start_at_ms
            .map(|at| at.saturating_sub(self.clock.now_ms()))
            .filter(|&ms| ms > 0);
        match wait {
            Some(ms) => {
                self.set_live(&record.id, Some(LiveStatus::Scheduled));
                let me = self.clone();
                self.tokio.spawn(async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    me.enqueue(record);
                });
            }
            None => self.enqueue(record),
        }
    }

    fn enqueue(self: &Arc<Self>, record: Arc<InvocationRecord>) {
        if let (true, Some(key)) = (record.is_exclusive(), &record.target.key) {
            let mut keys = self.keys.lock().unwrap();
            let queue = keys
                .entry((record.target.service.clone(), key.clone()))
                .or_default();
            if queue.busy {
                self.set_live(&record.id, Some(LiveStatus::Pending));
                queue.waiting.insert(record.seq, record);
                return;
            }
            queue.busy = true;
        }
        self.start(record);
    }

    /// The invocation holding `key` finished: start the next one.
    fn release(self: &Arc<Self>, record: &InvocationRecord) {
        let (true, Some(key)) = (record.is_exclusive(), &record.target.key) else {
            return;
        };
        let slot = (record.target.service.clone(), key.clone());
        let mut keys = self.keys.lock().unwrap();
        let queue = keys
            .get_mut(&slot)
            .expect("a running invocation holds its key");
        match queue.waiting.pop_first() {
            Some((_, next)) => self.start(next),
            None => {
                keys.remove(&slot);
            }
        }
    }

    fn start(self: &Arc<Self>, record: Arc<InvocationRecord>) {
        self.set_live(&record.id, Some(LiveStatus::Running));
        let me = self.clone();
        self.tokio.spawn(async move { me.run(record).await });
    }

    /// Attempts until the invocation completes or stops.
    async fn run(self: Arc<Self>, record: Arc<InvocationRecord>) {
        let policy = &self.config.retry;
        let mut attempts = record.attempts;
        loop {
            attempts += 1;
            self.set_live(&record.id, Some(LiveStatus::Running));
            let end = self.attempt(&record).await;
            let error = match end {
                AttemptEnd::Success(output) => {
                    return self
                        .complete(&record, attempts, Outcome::Success(output), None)
                        .await
                }
                AttemptEnd::Terminal { code, message } => {
                    return self
                        .complete(&record, attempts, Outcome::Failure { code, message }, None)
                        .await
                }
                AttemptEnd::Stopped(reason) => return self.stop(&record, attempts, reason).await,
                AttemptEnd::Retryable(reason) => reason,
            };
            tracing::warn!(invocation = %record.id, attempt = attempts, "attempt failed: {error}");
            if attempts >= policy.max_attempts {
                let message = format!("gave up after {attempts} attempts; last error: {error}");
                return self
                    .complete(
                        &record,
                        attempts,
                        Outcome::Failure { code: 500, message },
                        Some(error),
                    )
                    .await;
            }
            self.note_failure(&record, attempts, error);
            self.set_live(&record.id, Some(LiveStatus::BackingOff));
            tokio::time::sleep(policy.delay_before(attempts + 1)).await;
        }
    }

    async fn attempt(&self, record: &Arc<InvocationRecord>) -> AttemptEnd {
        let Some(deployment) = self.registry.deployment(&record.deployment) else {
            return AttemptEnd::Stopped(format!("deployment {} is not loaded", record.deployment));
        };
        let journal = match self.store.journal(&record.id) {
            Ok(entries) => Journal::from_entries(entries),
            Err(e) => return AttemptEnd::Retryable(format!("cannot read the journal: {e}")),
        };
        let _slot = self
            .instances
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let durable = DurableContext::new(
            record.clone(),
            journal,
            self.store.clone(),
            self.committer.clone(),
        );
        self.runtime.invoke(&deployment.module, durable).await
    }

    /// Remember a failed attempt (visible in the admin API); not awaited,
    /// the next commit of this invocation covers it.
    fn note_failure(&self, record: &InvocationRecord, attempts: u32, error: String) {
        let id = record.id.clone();
        self.committer.append(move |t| {
            if let Some(mut r) = t.invocation(&id)? {
                r.attempts = attempts;
                r.last_error = Some(error);
                t.put_invocation(&r)?;
            }
            Ok(())
        });
    }

    async fn complete(
        self: &Arc<Self>,
        record: &Arc<InvocationRecord>,
        attempts: u32,
        outcome: Outcome,
        error: Option<String>,
    ) {
        let now = self.clock.now_ms();
        let retention = if record.idempotency_key.is_some() {
            self.config
                .idempotency_retention
                .max(self.config.completed_retention)
        } else {
            self.config.completed_retention
        };
        let id = record.id.clone();
        let final_outcome = outcome.clone();
        self.committer
            .commit(move |t| {
                let mut r = t
                    .invocation(&id)?
                    .expect("an invocation exists until it expires");
                r.status = Status::Completed;
                r.attempts = attempts;
                r.outcome = Some(final_outcome);
                r.completed_ms = Some(now);
                if error.is_some() {
                    r.last_error = error;
                }
                t.put_invocation(&r)?;
                t.expire_at(now + retention.as_millis() as u64, &id)
            })
            .await;
        self.set_live(&record.id, None);
        self.release(record);
        let waiting = self
            .watchers
            .lock()
            .unwrap()
            .remove(&record.id)
            .unwrap_or_default();
        for w in waiting {
            let _ = w.send(outcome.clone());
        }
    }

    async fn stop(self: &Arc<Self>, record: &Arc<InvocationRecord>, attempts: u32, reason: String) {
        tracing::error!(invocation = %record.id, "stopped: {reason}");
        let id = record.id.clone();
        self.committer
            .commit(move |t| {
                let mut r = t
                    .invocation(&id)?
                    .expect("an invocation exists until it expires");
                r.status = Status::Paused;
                r.attempts = attempts;
                r.last_error = Some(reason);
                t.put_invocation(&r)
            })
            .await;
        self.set_live(&record.id, None);
        self.release(record);
    }

    /// Forget completed invocations whose retention ended, once a minute.
    async fn clean_expired(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            let expired = match self.store.expired(self.clock.now_ms(), 10_000) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!("retention cleanup: {e}");
                    continue;
                }
            };
            if expired.is_empty() {
                continue;
            }
            let count = expired.len();
            self.committer
                .commit(move |t| expired.iter().try_for_each(|(at, id)| t.forget(*at, id)))
                .await;
            tracing::info!(count, "forgot expired invocations");
        }
    }
}

fn answer(tx: oneshot::Sender<Submitted>, submitted: Submitted) -> Continuation {
    Box::new(move || {
        let _ = tx.send(submitted);
    })
}
