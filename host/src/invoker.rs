//! The invoker: creates invocations, orders them per key, runs their
//! attempts, suspends and resumes them, delivers completions between them,
//! retries, pauses, cancels, kills and completes them.
//!
//! Lifecycle of an invocation:
//!
//! ```text
//! submit/call/send ──▶ (delayed? timer) ──▶ key queue (exclusive only) ──▶ attempt ◀─────────┐
//!                                                                          │               │
//!        retryable error: commit barrier, backoff, replay ◀──────────────┤               │
//!        attempts exhausted, journal mismatch, operator: paused ◀───────────┤  resume ──────┤
//!        waited longer than suspend_after: suspended ◀────────────────────┤  completion ──┘
//!        output or terminal error: completed ◀─────────────────────────────┘
//!          └─ commit, then wake attach/HTTP waiters and deliver to the caller
//! ```
//!
//! The rules that make this safe under any schedule:
//!
//! - **One attempt at a time, fenced.** Every attempt has an epoch
//!   ([`crate::fence`]); its writes are applied only while it is current.
//!   Kill, pause and completion close the fence inside their transaction,
//!   so a superseded attempt can never write after them.
//! - **A new attempt starts from the committed journal.** After an attempt
//!   ends (retry, suspension) the invoker waits for a commit barrier before
//!   the next attempt reads the journal, so nothing the previous attempt
//!   queued is issued twice.
//! - **Completions are delivered in commit order.** Every continuation that
//!   delivers a completion runs on the writer ([`Committer::commit_in_order`]),
//!   so a live `await-any` sees completions in journal order, as a replay does.
//! - **Key queues** ([`crate::keys`]) are pure bookkeeping; whoever sees an
//!   invocation finish makes it leave its key, and leaving is idempotent.
//! - **Outside effects** (Kafka produce, host HTTP) are driven from the
//!   durable `outbox` table, which recovery resumes, so an effect whose
//!   handler never waited for it is still performed.
//! - **Timers** (sleeps and delayed starts) live in one [`TimerQueue`].

use crate::clock::SharedClock;
use crate::commit::{Committer, Continuation};
use crate::config::Config;
use crate::context::{DurableContext, InlineWrites, Mailbox, SharedOverlay};
use crate::deployments::Registry;
use crate::fence::{Epoch, Fence};
use crate::ids::{parse_awakeable_id, DeploymentId, InvocationId};
use crate::journal::{Command, Completion, CompletionValue, Entry, Journal, Outcome};
use crate::keys::{KeyQueues, KeySlot};
use crate::partition::{Message, Partitioning};
use crate::records::{
    Caller, DeadLetter, HandlerKind, InvocationRecord, OnFailure, ServiceKind, Status, Target,
};
use crate::runtime::{AttemptEnd, Runtime};
use crate::store::{Store, StoreError, StoreResult, Tables};
use crate::timers::{Due, TimerQueue};
use crate::traces::{InvocationTrace, Span, SpanRef, Traces, TRACEPARENT};
use opentelemetry::trace::SpanKind;
use opentelemetry::KeyValue;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

/// The idempotency key under which a workflow's run is registered: one run
/// per workflow id.
const WORKFLOW_RUN: &str = "workflow-run";

/// The handler, built into the host, that edits a key's state for an
/// operator (`PUT`/`DELETE /objects/{service}/{key}/state/{name}`): an
/// exclusive invocation of the key like any other, so an edit takes its
/// turn in the key's queue and never interleaves with a running handler.
/// Its input is a [`StateEdit`].
pub const EDIT_STATE: &str = "cairn:edit-state";

/// How an inline attempt ended (see [`Invoker::attempt_inline`]).
pub enum InlineEnd {
    /// It succeeded. Its state writes, in order, are to be applied with
    /// its record's offset; until then they are its key's overlay layer
    /// `epoch`.
    Done { epoch: Epoch, writes: Vec<Command> },
    /// It issued a command that needs the journal; nothing it did is kept.
    NeedsJournal,
    /// It failed (an error, a trap, a budget); nothing it did is kept.
    Failed,
}

/// An inline attempt in progress: when it goes, its fence entry goes,
/// and so does its overlay layer unless its writes are `kept` (the batch
/// that commits them retires the layer then).
struct InlineAttempt<'a> {
    invoker: &'a Invoker,
    record: &'a InvocationRecord,
    epoch: Epoch,
    kept: bool,
}

impl Drop for InlineAttempt<'_> {
    fn drop(&mut self) {
        self.invoker.fence.end(&self.record.id, self.epoch);
        if !self.kept {
            self.invoker.retire_writes(self.record, Some(self.epoch));
        }
    }
}

/// What an [`EDIT_STATE`] invocation does.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StateEdit {
    /// The state entry.
    pub name: String,
    /// Its new value (JSON); `None` clears it.
    pub value: Option<serde_json::Value>,
}

/// A request to invoke a handler.
#[derive(Debug, Clone, Default)]
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
    /// The invocation waiting for the result, for calls between handlers.
    pub caller: Option<Caller>,
    /// The subscription that created it, if any.
    pub source: Option<String>,
    /// A fixed id (cron ticks derive theirs); a fresh one when `None`.
    pub id: Option<InvocationId>,
    /// Why it must not run: it is created failed (400), and a record's
    /// goes to its subscription's dead-letter topic (`null_key =
    /// "dead-letter"`).
    pub reject: Option<String>,
}

/// The answer to a submission.
#[derive(Debug, Clone)]
pub struct Submitted {
    /// The invocation's id.
    pub id: InvocationId,
    /// `true` when an idempotency key (or a workflow id) matched an earlier
    /// invocation.
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
    /// The partition moved to another host before the invocation was
    /// durable here (cluster mode); the client retries.
    #[error("the partition moved to another host; retry")]
    Moved,
}

/// An operator action or an awakeable completion was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    /// No such invocation or awakeable.
    #[error("{0} not found")]
    NotFound(String),
    /// The target is not in a state that allows this.
    #[error("{0}")]
    Conflict(String),
    /// The request itself is malformed.
    #[error("{0}")]
    Invalid(String),
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
    /// Waiting for a completion, without an instance.
    Suspended,
}

struct Live {
    status: LiveStatus,
    mailbox: Option<Arc<Mailbox>>,
    task: Option<tokio::task::AbortHandle>,
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
    instances: crate::instances::Slots,
    /// Set when the host starts shutting down.
    closing: tokio::sync::watch::Sender<bool>,
    keys: Mutex<KeyQueues>,
    live: Mutex<HashMap<InvocationId, Live>>,
    watchers: Mutex<HashMap<InvocationId, Vec<oneshot::Sender<Outcome>>>>,
    /// Unfinished invocations per subscription (Kafka backpressure).
    in_flight: Mutex<HashMap<String, usize>>,
    /// Sleeps and delayed starts.
    timers: TimerQueue,
    /// The current attempt of every running invocation.
    fence: Fence,
    /// Producers for durable produce.
    producers: crate::kafka::Producers,
    /// Concurrency limits.
    limits: Arc<crate::limits::Limits>,
    /// Durable HTTP calls made by the host.
    outbound: crate::outbound::Outbound,
    /// The partition this invoker serves (cluster mode), of how many.
    partitioning: Partitioning,
}

type Deliveries = Vec<(InvocationId, u32, Completion)>;

/// The key slot of an exclusive handler of a keyed service.
pub fn exclusive_slot(record: &InvocationRecord) -> Option<KeySlot> {
    match (record.is_exclusive(), &record.target.key) {
        (true, Some(key)) => Some((record.target.service.clone(), key.clone())),
        _ => None,
    }
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
        partitioning: Partitioning,
    ) -> Arc<Self> {
        Arc::new(Invoker {
            instances: crate::instances::Slots::new(
                config.limits.max_instances as usize,
                config.limits.service_instances(),
            ),
            committer,
            runtime,
            registry,
            timers: TimerQueue::new(clock.clone()),
            clock,
            tokio: tokio::runtime::Handle::current(),
            keys: Mutex::default(),
            live: Mutex::default(),
            watchers: Mutex::default(),
            closing: tokio::sync::watch::Sender::new(false),
            in_flight: Mutex::default(),
            fence: Fence::default(),
            producers: crate::kafka::Producers::new(store.clone()),
            limits: Arc::default(),
            outbound: crate::outbound::Outbound::new(&config.http_allow, config.retry.clone()),
            config,
            store,
            partitioning,
        })
    }

    /// The partition this invoker serves.
    pub fn partitioning(&self) -> Partitioning {
        self.partitioning
    }

    /// The store, for readers.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The group-commit writer.
    pub fn committer(&self) -> &Committer {
        &self.committer
    }

    /// The Kafka producers of durable produce and dead letters.
    pub fn producers(&self) -> &crate::kafka::Producers {
        &self.producers
    }

    /// The service registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The clock.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// How long an attempt waits before it suspends.
    pub fn suspend_after(&self) -> Duration {
        self.config.suspend_after
    }

    /// Start shutting down: clients waiting for outcomes are answered.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Resolves once the host is shutting down.
    pub async fn closing(&self) {
        let mut closing = self.closing.subscribe();
        let _ = closing.wait_for(|c| *c).await;
    }

    /// The instance slots (a waiting attempt suspends when they run short).
    pub fn instances(&self) -> &crate::instances::Slots {
        &self.instances
    }

    /// Set (or replace) a concurrency limit, durably; see [`crate::limits`].
    pub async fn set_limit(&self, scope: String, max: usize) -> Result<(), ControlError> {
        if scope.is_empty() || max == 0 {
            return Err(ControlError::Invalid(
                "a limit needs a scope and a max of at least 1".into(),
            ));
        }
        let stored = scope.clone();
        self.committer
            .commit(move |t| t.put_limit(&stored, max as u64))
            .await;
        self.limits.set(&scope, max);
        Ok(())
    }

    /// Remove a concurrency limit.
    pub async fn remove_limit(&self, scope: String) -> Result<(), ControlError> {
        let stored = scope.clone();
        if !self
            .committer
            .commit(move |t| t.remove_limit(&stored))
            .await
        {
            return Err(ControlError::NotFound(format!("limit {scope}")));
        }
        self.limits.remove(&scope);
        Ok(())
    }

    /// `limits.max_value_bytes`: the largest value a guest may journal.
    pub(crate) fn max_value_bytes(&self) -> usize {
        self.config.limits.max_value_bytes
    }

    /// Every concurrency limit: `(scope, max, in use)`.
    pub fn limits(&self) -> Vec<(String, usize, usize)> {
        self.limits.list()
    }

    /// Resume every unfinished invocation in arrival order, re-arm the
    /// timers, perform the outbox, and start the timer task and the
    /// retention cleaner.
    pub fn recover(self: &Arc<Self>) -> Result<usize, StoreError> {
        for (scope, max) in self.store.limits()? {
            self.limits.set(&scope, max as usize);
        }
        // Delayed invocations only need their timer; the others take their
        // keys in arrival order, so they are sorted first.
        let (mut resumed, mut due) = (0, Vec::new());
        let now = self.clock.now_ms();
        self.store.for_each_unfinished(|record| {
            self.count_source(&record, 1);
            match (record.status, record.start_at_ms.filter(|&at| at > now)) {
                (Status::Ready, Some(at)) => {
                    resumed += 1;
                    self.schedule(&record.id, at);
                }
                (Status::Ready | Status::Paused, _) => due.push(record),
                (Status::Completed, _) => {}
            }
        })?;
        // A key's holder at the crash goes first, whatever its sequence
        // number: it may have read state already (its journal holds the
        // reads), so another writer of the key must not run before it ends.
        // An invocation that became due later but arrived earlier (a delayed
        // send) waited behind it, and waits again. At most one unfinished
        // invocation per key has journaled anything: the next holder's
        // entries queue behind its holder's completion.
        let mut started = HashMap::new();
        for record in &due {
            started.insert(record.id.clone(), self.store.has_journal(&record.id)?);
        }
        due.sort_by_key(|r| (!started[&r.id], r.seq));
        for record in due {
            match record.status {
                // A paused invocation keeps its place in its key's queue.
                Status::Paused => {
                    if let Some(slot) = exclusive_slot(&record) {
                        self.keys
                            .lock()
                            .unwrap()
                            .arrive(&slot, record.seq, &record.id);
                    }
                }
                _ => {
                    resumed += 1;
                    self.admit(Arc::new(record));
                }
            }
        }
        for (at, id, command) in self.store.timers()? {
            self.timers.add(at, Due::Sleep(id, command));
        }
        for (id, command) in self.store.outbox()? {
            self.perform_stored(id, command);
        }
        for (id, letter) in self.store.dead_letters()? {
            self.send_dead_letter(id, letter, true);
        }
        let me = self.clone();
        self.tokio
            .spawn(async move { me.timers.run(|at, due| me.fire(at, due)).await });
        let me = self.clone();
        self.tokio
            .spawn(async move { crate::retention::clean(&me).await });
        Ok(resumed)
    }

    /// Create an invocation (or find the one its idempotency key names).
    /// Returns once the invocation is durable; its first attempt may start
    /// before that (see [`Invoker::create`]).
    pub async fn submit(
        self: &Arc<Self>,
        request: NewInvocation,
    ) -> Result<Submitted, SubmitError> {
        let answer = self.submit_queued(request)?;
        answer.await.map_err(|_| SubmitError::Moved)
    }

    /// Queue the creation of an invocation now (so submissions keep their
    /// order) and answer through the receiver once it is durable.
    pub fn submit_queued(
        self: &Arc<Self>,
        request: NewInvocation,
    ) -> Result<oneshot::Receiver<Submitted>, SubmitError> {
        Ok(self.submit_record(self.new_record(request)?))
    }

    /// Queue the creation of `record`; the receiver answers once it is
    /// durable.
    fn submit_record(self: &Arc<Self>, record: InvocationRecord) -> oneshot::Receiver<Submitted> {
        let (tx, rx) = oneshot::channel();
        let me = self.clone();
        self.committer.submit(Box::new(move |t| {
            let submitted = me.create_submitted(t, record)?;
            Ok(Box::new(move || {
                let _ = tx.send(submitted);
            }) as Continuation)
        }));
        rx
    }

    /// Unfinished invocations created by subscription `source`.
    pub fn in_flight(&self, source: &str) -> usize {
        self.in_flight
            .lock()
            .unwrap()
            .get(source)
            .copied()
            .unwrap_or(0)
    }

    fn count_source(&self, record: &InvocationRecord, delta: isize) {
        if let Some(source) = &record.source {
            let mut counts = self.in_flight.lock().unwrap();
            let n = counts.entry(source.clone()).or_default();
            *n = n.saturating_add_signed(delta);
        }
    }

    /// Store a new invocation inside a write transaction and route it; or,
    /// if its idempotency key is taken, return the invocation that has it.
    ///
    /// The invocation is routed at once, in sequence order, without waiting
    /// for the commit: everything its attempt writes queues behind this
    /// transaction, and nothing it produces is acknowledged before a later
    /// commit.
    ///
    /// An invocation of another partition is sent there instead, with this
    /// transaction (its idempotency key is checked there).
    pub fn create(
        self: &Arc<Self>,
        t: &mut Tables<'_>,
        mut record: InvocationRecord,
    ) -> StoreResult<Option<InvocationId>> {
        if let Some(q) = self.partitioning.elsewhere(&record.id) {
            t.send(q, &Message::Create(Box::new(record)))?;
            return Ok(None);
        }
        let target = record.target.to_string();
        if let Some(key) = &record.idempotency_key {
            if let Some(existing) = t.idempotent(&target, key)? {
                return Ok(Some(existing));
            }
            t.put_idempotent(&target, key, &record.id)?;
        }
        record.seq = t.next_seq()?;
        // New: a taken idempotency key returned above, and fresh ids are
        // random (fixed ones, cron ticks', come with idempotency keys).
        t.put_invocation_over(None, &record)?;
        if record.status == Status::Completed {
            self.rejected_in(t, &record)?;
            return Ok(None);
        }
        self.count_source(&record, 1);
        self.route(Arc::new(record));
        Ok(None)
    }

    /// [`Invoker::create`], answered as the new invocation's id or the
    /// existing one's.
    pub fn create_submitted(
        self: &Arc<Self>,
        t: &mut Tables<'_>,
        record: InvocationRecord,
    ) -> StoreResult<Submitted> {
        let id = record.id.clone();
        Ok(match self.create(t, record)? {
            Some(existing) => Submitted {
                id: existing,
                existing: true,
            },
            None => Submitted {
                id,
                existing: false,
            },
        })
    }

    /// An invocation created failed (see [`NewInvocation::reject`]): it
    /// expires like any completed one, and its record's dead letter is
    /// produced once the transaction is durable.
    fn rejected_in(
        self: &Arc<Self>,
        t: &mut Tables<'_>,
        record: &InvocationRecord,
    ) -> StoreResult<()> {
        t.expire_at(self.now_ms() + self.retention_of(record), &record.id)?;
        let Some(source) = &record.source else {
            return Ok(());
        };
        let (Some(sub), Some(outcome)) = (t.subscription(source)?, &record.outcome) else {
            return Ok(());
        };
        let Some(letter) = crate::kafka::dead_letter(record, &sub, outcome, self.now_ms()) else {
            return Ok(());
        };
        t.put_dead_letter(&record.id, &letter)?;
        let (me, id) = (self.clone(), record.id.clone());
        self.tokio.spawn(async move {
            me.committer.barrier().await;
            me.send_dead_letter(id, letter, false);
        });
        Ok(())
    }

    /// How long a completed invocation is kept, ms: longer when its
    /// idempotency key must keep answering.
    fn retention_of(&self, record: &InvocationRecord) -> u64 {
        let retention = match record.idempotency_key {
            Some(_) => self
                .config
                .idempotency_retention
                .max(self.config.completed_retention),
            None => self.config.completed_retention,
        };
        retention.as_millis() as u64
    }

    /// Create a call's or a send's invocation (see [`Invoker::create`]);
    /// a call of a workflow that already ran fails the caller at once.
    pub fn create_child(
        self: &Arc<Self>,
        t: &mut Tables<'_>,
        record: InvocationRecord,
    ) -> StoreResult<Option<Continuation>> {
        let caller = record.caller.clone();
        match (self.create(t, record)?, caller) {
            (Some(existing), Some(caller)) => {
                let message = format!("the workflow was already started by {existing}");
                self.complete_in(
                    t,
                    &caller.id,
                    caller.command,
                    CompletionValue::Outcome(Outcome::Failure { code: 409, message }),
                )
            }
            _ => Ok(None),
        }
    }

    /// Apply a message from another partition, inside a write transaction.
    pub fn apply_message(
        self: &Arc<Self>,
        t: &mut Tables<'_>,
        message: Message,
    ) -> StoreResult<Option<Continuation>> {
        match message {
            Message::Create(record) => self.create_child(t, *record),
            Message::Complete { id, command, value } => self.complete_in(t, &id, command, value),
            Message::Awaken { awakeable, outcome } => {
                self.complete_awakeable_in(t, &awakeable, outcome)
            }
            Message::Cancel(id) => self.cancel_from_handler_in(t, id.as_str()),
            Message::Replicate(change) => t.copy(&change).map(|()| None),
            Message::StopSubscription { id, reason } => {
                t.stop_subscription(&id, &reason).map(|_| None)
            }
            Message::Deploy(_) => Err(StoreError::Corrupt {
                table: "partitions",
                reason: "a deployment is applied by the registry, not in a transaction".into(),
            }),
        }
    }

    /// The id of a new invocation of `target` (its partition key decides
    /// where it lives; see [`crate::partition`]).
    pub fn new_id(&self, target: &Target, idempotency_key: Option<&str>) -> InvocationId {
        InvocationId::generate(self.partitioning.key_for(target, idempotency_key))
    }

    /// A new invocation record, with its target resolved.
    pub fn new_record(&self, request: NewInvocation) -> Result<InvocationRecord, SubmitError> {
        let target = &request.target;
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
        let kind = handler.kind;
        Ok(self.record_of(request, kind, deployment))
    }

    /// Queue an edit of a key's state ([`EDIT_STATE`]); answers once the
    /// invocation that applies it is durable.
    pub async fn submit_state_edit(
        self: &Arc<Self>,
        target: Target,
        edit: &StateEdit,
    ) -> Result<Submitted, SubmitError> {
        let (service, deployment) = self
            .registry
            .service(&target.service)
            .ok_or_else(|| SubmitError::UnknownService(target.service.clone()))?;
        if service.kind == ServiceKind::Service || target.key.is_none() {
            return Err(SubmitError::WrongKeying(format!(
                "{} is a service: only virtual objects and workflows have state",
                service.name
            )));
        }
        let request = NewInvocation {
            target: Target {
                handler: EDIT_STATE.into(),
                ..target
            },
            input: serde_json::to_vec(edit).expect("an edit serializes"),
            ..Default::default()
        };
        let record = self.record_of(request, HandlerKind::Exclusive, deployment);
        self.submit_record(record)
            .await
            .map_err(|_| SubmitError::Moved)
    }

    /// The record of a new invocation of a handler of kind `kind`.
    fn record_of(
        &self,
        request: NewInvocation,
        kind: HandlerKind,
        deployment: DeploymentId,
    ) -> InvocationRecord {
        let target = request.target;
        let idempotency_key = match kind {
            HandlerKind::Workflow => Some(WORKFLOW_RUN.to_string()),
            _ => request.idempotency_key,
        };
        let now = self.clock.now_ms();
        let rejected = request
            .reject
            .map(|message| Outcome::Failure { code: 400, message });
        InvocationRecord {
            id: request
                .id
                .unwrap_or_else(|| self.new_id(&target, idempotency_key.as_deref())),
            handler_kind: kind,
            target,
            deployment,
            input: request.input,
            headers: request.headers,
            idempotency_key,
            seq: 0,
            created_ms: now,
            start_at_ms: request.delay.map(|d| now + d.as_millis() as u64),
            status: match rejected {
                Some(_) => Status::Completed,
                None => Status::Ready,
            },
            attempts: 0,
            last_error: None,
            completed_ms: rejected.as_ref().map(|_| now),
            outcome: rejected,
            caller: request.caller,
            cancelled: false,
            source: request.source,
        }
    }

    /// The run invocation of a workflow id, if it was started.
    pub fn workflow_run(
        &self,
        workflow: &str,
        id: &str,
    ) -> Result<Option<InvocationId>, StoreError> {
        let Some((service, _)) = self.registry.service(workflow) else {
            return Ok(None);
        };
        let Some(run) = service
            .handlers
            .iter()
            .find(|h| h.kind == HandlerKind::Workflow)
        else {
            return Ok(None);
        };
        let target = Target {
            service: workflow.into(),
            handler: run.name.clone(),
            key: Some(id.into()),
        };
        self.store.idempotent(&target.to_string(), WORKFLOW_RUN)
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
        let known = match self.store.invocation(id) {
            Ok(None) => Ok(None),
            Ok(Some(r)) if r.status == Status::Completed => Ok(r.outcome),
            Ok(Some(r)) if r.status == Status::Paused => Ok(Some(paused_outcome(
                id,
                r.last_error.as_deref().unwrap_or("paused"),
            ))),
            Ok(Some(_)) => return Ok(rx.await.ok()),
            Err(e) => Err(e),
        };
        drop(rx);
        self.drop_closed_watchers(id);
        known
    }

    /// Forget the watchers of `id` that nobody waits on any more.
    fn drop_closed_watchers(&self, id: &InvocationId) {
        let mut watchers = self.watchers.lock().unwrap();
        if let Some(list) = watchers.get_mut(id) {
            list.retain(|w| !w.is_closed());
            if list.is_empty() {
                watchers.remove(id);
            }
        }
    }

    /// The in-memory status of an unfinished invocation, if it has one.
    pub fn live_status(&self, id: &InvocationId) -> Option<LiveStatus> {
        self.live.lock().unwrap().get(id).map(|l| l.status)
    }

    /// The metric labels of an invocation of `target` in this partition.
    fn labels(&self, target: &Target) -> Vec<(&'static str, String)> {
        vec![
            ("service", target.service.clone()),
            ("handler", target.handler.clone()),
            ("partition", self.partitioning.me.to_string()),
        ]
    }

    /// How many unfinished invocations are in each live status.
    pub fn live_counts(&self) -> BTreeMap<&'static str, usize> {
        let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
        for live in self.live.lock().unwrap().values() {
            let status = match live.status {
                LiveStatus::Scheduled => "scheduled",
                LiveStatus::Pending => "pending",
                LiveStatus::Running => "running",
                LiveStatus::BackingOff => "backing-off",
                LiveStatus::Suspended => "suspended",
            };
            *counts.entry(status).or_default() += 1;
        }
        counts
    }

    /// Sizes of the in-memory structures: `(live, busy keys, timers,
    /// fenced attempts, watched ids)`; each is bounded by what is
    /// unfinished, and the tests check that they drain.
    pub fn footprint(&self) -> [usize; 5] {
        [
            self.live.lock().unwrap().len(),
            self.keys.lock().unwrap().len(),
            self.timers.len(),
            self.fence.len(),
            self.watchers.lock().unwrap().len(),
        ]
    }

    fn set_status(&self, id: &InvocationId, status: LiveStatus) {
        let mut live = self.live.lock().unwrap();
        let entry = live.entry(id.clone()).or_insert(Live {
            status,
            mailbox: None,
            task: None,
        });
        entry.status = status;
        if status != LiveStatus::Running {
            entry.mailbox = None;
        }
    }

    /// Deliver a committed completion to invocation `id`: into the mailbox
    /// of its running attempt, or by resuming it if it is suspended. Runs
    /// on the writer, in commit order.
    pub fn deliver(self: &Arc<Self>, id: &InvocationId, entry: u32, completion: Completion) {
        let resume = {
            let mut live = self.live.lock().unwrap();
            match live.get_mut(id) {
                Some(Live {
                    status: LiveStatus::Running,
                    mailbox: Some(mailbox),
                    ..
                }) => {
                    mailbox.deliver(entry, completion);
                    false
                }
                Some(l) if l.status == LiveStatus::Suspended => {
                    l.status = LiveStatus::Running;
                    true
                }
                _ => false,
            }
        };
        if resume {
            self.start(id.clone(), None);
        }
    }

    fn deliver_all(self: &Arc<Self>, deliveries: Deliveries) {
        for (id, entry, completion) in deliveries {
            self.deliver(&id, entry, completion);
        }
    }

    /// Append the completion of `command` of `id` (unless it has one, or
    /// the invocation is finished) and return the continuation that
    /// delivers it.
    pub fn complete_in(
        self: &Arc<Self>,
        t: &mut Tables<'_>,
        id: &InvocationId,
        command: u32,
        value: CompletionValue,
    ) -> StoreResult<Option<Continuation>> {
        if let Some(q) = self.partitioning.elsewhere(id) {
            let id = id.clone();
            t.send(q, &Message::Complete { id, command, value })?;
            return Ok(None);
        }
        let completion = Completion { command, value };
        let Some(entry) = t.complete_command(id, completion.clone())? else {
            return Ok(None);
        };
        let (me, id) = (self.clone(), id.clone());
        Ok(Some(Box::new(move || me.deliver(&id, entry, completion))))
    }

    /// Route a durable, unfinished invocation: wait for its start time,
    /// then queue it behind its key or run it.
    fn route(self: &Arc<Self>, record: Arc<InvocationRecord>) {
        match record.start_at_ms.filter(|&at| at > self.clock.now_ms()) {
            Some(at) => self.schedule(&record.id, at),
            None => self.admit(record),
        }
    }

    /// `id` starts at `at_ms` (a timer until then, not a record).
    fn schedule(&self, id: &InvocationId, at_ms: u64) {
        self.set_status(id, LiveStatus::Scheduled);
        self.timers.add(at_ms, Due::Start(id.clone()));
    }

    /// A due invocation: take its key (or wait for it), then run.
    fn admit(self: &Arc<Self>, record: Arc<InvocationRecord>) {
        if let Some(slot) = exclusive_slot(&record) {
            if !self
                .keys
                .lock()
                .unwrap()
                .arrive(&slot, record.seq, &record.id)
            {
                self.set_status(&record.id, LiveStatus::Pending);
                return;
            }
        }
        self.start(record.id.clone(), Some(record));
    }

    /// A timer fell due (called by the timer task).
    fn fire(self: &Arc<Self>, at_ms: u64, due: Due) {
        match due {
            Due::Sleep(id, command) => {
                let fired = CompletionValue::Outcome(Outcome::Success(b"null".to_vec()));
                let timer = id.clone();
                self.complete_outside(id, command, fired, move |t| {
                    t.take_timer(at_ms, &timer, command)
                });
            }
            Due::Start(id) => {
                // Killed or paused meanwhile: it is no longer scheduled.
                if self.live_status(&id) != Some(LiveStatus::Scheduled) {
                    return;
                }
                let me = self.clone();
                self.tokio.spawn(async move {
                    // The timer is armed by the job that creates the
                    // record, before that job's commit: a short delay can
                    // fall due while the commit is still on its way (a
                    // slow disk, a Kafka transaction). Read the record
                    // only once everything queued so far is durable.
                    me.committer.barrier().await;
                    match me.store.invocation(&id) {
                        Ok(Some(r)) if r.status == Status::Ready => me.admit(Arc::new(r)),
                        Ok(_) => {}
                        Err(e) => tracing::error!(invocation = %id, "cannot start: {e}"),
                    }
                });
            }
        }
    }

    /// The state overlay an attempt of `record` uses: its key's while the
    /// key is busy (exclusive handlers), else its own.
    fn overlay_for(&self, record: &InvocationRecord) -> SharedOverlay {
        match exclusive_slot(record) {
            Some(slot) => self.keys.lock().unwrap().overlay(&slot),
            None => SharedOverlay::default(),
        }
    }

    fn has_waiters(&self, record: &InvocationRecord) -> bool {
        exclusive_slot(record).is_some_and(|slot| self.keys.lock().unwrap().has_waiters(&slot))
    }

    /// `record` is done with its key (see [`KeyQueues::leave`]): start the
    /// next holder, if it held the key.
    fn leave_key(self: &Arc<Self>, record: &InvocationRecord) {
        if let Some(slot) = exclusive_slot(record) {
            self.leave_slot(&slot, record.seq, &record.id);
        }
    }

    /// `id` (sequence `seq`; a holder that never waited has none, 0) is
    /// done with `slot`: start the next holder, if it held the key.
    pub fn leave_slot(self: &Arc<Self>, slot: &KeySlot, seq: u64, id: &InvocationId) {
        let next = self.keys.lock().unwrap().leave(slot, seq, id);
        if let Some(next) = next {
            self.start(next, None);
        }
    }

    /// Run attempts of `id`; `record` is the in-memory copy when the
    /// caller has one (it may not be committed yet).
    fn start(self: &Arc<Self>, id: InvocationId, record: Option<Arc<InvocationRecord>>) {
        self.set_status(&id, LiveStatus::Running);
        let me = self.clone();
        let task = self.tokio.spawn({
            let id = id.clone();
            async move { me.run(id, record).await }
        });
        if let Some(live) = self.live.lock().unwrap().get_mut(&id) {
            live.task = Some(task.abort_handle());
        }
    }

    /// The invocation and its journal as committed; falls back to the
    /// in-memory `record` of an invocation whose creation is still in the
    /// commit queue, or waits for that commit.
    async fn load(
        &self,
        id: &InvocationId,
        record: Option<&Arc<InvocationRecord>>,
    ) -> StoreResult<Option<(Arc<InvocationRecord>, Vec<(u32, Entry)>)>> {
        let (stored, journal) = self.store.invocation_with_journal(id)?;
        if let Some(r) = stored {
            return Ok(Some((Arc::new(r), journal)));
        }
        if let Some(r) = record {
            return Ok(Some((r.clone(), journal)));
        }
        self.committer.barrier().await;
        let (stored, journal) = self.store.invocation_with_journal(id)?;
        Ok(stored.map(|r| (Arc::new(r), journal)))
    }

    /// Attempts until the invocation completes, pauses or suspends.
    async fn run(self: Arc<Self>, id: InvocationId, first: Option<Arc<InvocationRecord>>) {
        // Attempts in a row that ran out of their budget.
        let mut interrupted = 0;
        loop {
            let Some(epoch) = self.fence.begin(&id) else {
                return; // being killed or paused right now: that path cleans up
            };
            let mailbox = Arc::new(Mailbox::default());
            {
                let mut live = self.live.lock().unwrap();
                let entry = live.entry(id.clone()).or_insert(Live {
                    status: LiveStatus::Running,
                    mailbox: None,
                    task: None,
                });
                entry.status = LiveStatus::Running;
                entry.mailbox = Some(mailbox.clone());
            }
            let (record, journal) = match self.load(&id, first.as_ref()).await {
                Ok(Some(loaded)) => loaded,
                Ok(None) => {
                    tracing::error!(invocation = %id, "cannot run: not found");
                    return self.stop_running(&id, epoch);
                }
                Err(e) => {
                    tracing::error!(invocation = %id, "cannot read the invocation: {e}");
                    let reason = format!("cannot read the invocation: {e}");
                    self.pause(&id, None, reason, None).await;
                    return self.stop_running(&id, epoch);
                }
            };
            match record.status {
                Status::Ready => {}
                Status::Completed => {
                    // Killed while it waited; it may have taken its key since.
                    self.leave_key(&record);
                    return self.stop_running(&id, epoch);
                }
                // Paused while it waited: it keeps its key until resumed.
                Status::Paused => return self.stop_running(&id, epoch),
            }
            if record.cancelled && journal.is_empty() {
                let cancelled = Outcome::Failure {
                    code: 409,
                    message: "cancelled".into(),
                };
                return self.complete(&record, record.attempts, cancelled).await;
            }
            let attempts = record.attempts + 1;
            let labels = self.labels(&record.target);
            if attempts == 1 && journal.is_empty() {
                metrics::counter!("cairn_invocations_started_total", &labels).increment(1);
            }
            metrics::counter!("cairn_attempts_total", &labels).increment(1);
            let began = std::time::Instant::now();
            let trace = Traces::get()
                .enabled()
                .then(|| InvocationTrace::of(&record).span);
            let span = trace.map(|invocation| invocation.child());
            let started = std::time::SystemTime::now();
            let end = self
                .attempt(
                    record.clone(),
                    Journal::from_entries(journal),
                    mailbox.clone(),
                    (epoch, span),
                    None,
                )
                .await;
            metrics::histogram!("cairn_attempt_duration_seconds", &labels)
                .record(began.elapsed().as_secs_f64());
            if let (Some(invocation), Some(span)) = (trace, span) {
                trace_attempt(&record, (invocation, span), attempts, started, &end);
            }
            let error = match end {
                AttemptEnd::Success(output) => {
                    return self
                        .complete(&record, attempts, Outcome::Success(output))
                        .await
                }
                AttemptEnd::Terminal { code, message } => {
                    let failed = Failed::Terminal(Outcome::Failure { code, message });
                    return self.give_up(&record, epoch, attempts, failed).await;
                }
                AttemptEnd::Fenced => return, // whoever fenced it cleans up
                AttemptEnd::Stopped(reason) => {
                    self.pause(&id, Some(attempts), reason, None).await;
                    self.retire_writes(&record, Some(epoch));
                    return self.stop_running(&id, epoch);
                }
                AttemptEnd::Trapped(reason) => {
                    let failed = Failed::Stuck(reason);
                    return self.give_up(&record, epoch, attempts, failed).await;
                }
                AttemptEnd::Suspended => {
                    // Everything the attempt queued is durable before the
                    // next attempt (started by a delivery) reads the journal.
                    self.committer.barrier().await;
                    self.attempt_over(&record, epoch);
                    if self.suspend(&id, &mailbox) {
                        return;
                    }
                    continue;
                }
                // Only inline attempts need the journal; a journaled one
                // cannot, but would retry like any error.
                AttemptEnd::Retryable(reason) | AttemptEnd::NeedsJournal(reason) => {
                    interrupted = 0;
                    reason
                }
                AttemptEnd::Interrupted(reason) => {
                    interrupted += 1;
                    reason
                }
            };
            tracing::warn!(invocation = %id, attempt = attempts, "attempt failed: {error}");
            let policy = self
                .config
                .retry_policy(&record.target.service, &record.target.handler);
            let budget_spent = interrupted >= self.config.limits.interrupted_attempts;
            if attempts >= policy.max_attempts || budget_spent {
                let reason = format!("gave up after {attempts} attempts; last error: {error}");
                let failed = Failed::Stuck(reason);
                return self.give_up(&record, epoch, attempts, failed).await;
            }
            metrics::counter!("cairn_retries_total", &labels).increment(1);
            // Also the barrier: the next attempt reads a journal that holds
            // everything this one queued.
            self.note_failure(&id, attempts, error).await;
            self.attempt_over(&record, epoch);
            self.set_status(&id, LiveStatus::BackingOff);
            tokio::time::sleep(policy.delay_before(attempts + 1)).await;
        }
    }

    /// An attempt failed for good. Without a subscription, a terminal
    /// error completes the invocation and a trap or exhausted attempts
    /// pause it. An invocation created by a subscription's record does what
    /// the subscription's `on_failure` says (see [`crate::kafka`]): `pause`
    /// pauses it (whatever the failure) and stops the subscription on its
    /// record; `dead-letter` completes it as failed and, in the same
    /// transaction, records the dead letter that is then produced.
    async fn give_up(
        self: &Arc<Self>,
        record: &InvocationRecord,
        epoch: Epoch,
        attempts: u32,
        failed: Failed,
    ) {
        let subscription = match record.source.as_deref().map(|s| self.store.subscription(s)) {
            Some(Ok(found)) => found,
            Some(Err(e)) => {
                tracing::error!(invocation = %record.id, "cannot read its subscription: {e}");
                None
            }
            None => None,
        };
        let outcome = match (&subscription, failed) {
            (None, Failed::Terminal(outcome)) => outcome,
            (Some(sub), failed) if sub.delivery.on_failure == OnFailure::DeadLetter => {
                let outcome = failed.into_outcome();
                let letter = crate::kafka::dead_letter(record, sub, &outcome, self.now_ms());
                if letter.is_none() {
                    tracing::error!(invocation = %record.id, subscription = %sub.id, "no dead-letter topic: the failed record is only in the invocation");
                }
                return self.complete_with(record, attempts, outcome, letter).await;
            }
            (subscription, failed) => {
                let reason = failed.reason();
                let stop = subscription
                    .as_ref()
                    .map(|sub| (sub.id.clone(), crate::kafka::stopped_by(record, &reason)));
                self.pause(&record.id, Some(attempts), reason, stop).await;
                self.retire_writes(record, Some(epoch));
                return self.stop_running(&record.id, epoch);
            }
        };
        self.complete(record, attempts, outcome).await
    }

    /// Attempt `epoch` of `record` is over and everything it wrote is
    /// committed (or was refused): it stops being current, and its layer of
    /// its key's state overlay goes (readers find its writes in the store).
    fn attempt_over(&self, record: &InvocationRecord, epoch: Epoch) {
        self.fence.end(&record.id, epoch);
        self.retire_writes(record, Some(epoch));
    }

    /// Drop the overlay layer of attempt `epoch` of `record`, if any.
    fn retire_writes(&self, record: &InvocationRecord, epoch: Option<Epoch>) {
        if let (Some(slot), Some(epoch)) = (exclusive_slot(record), epoch) {
            self.retire_layer(&slot, epoch);
        }
    }

    /// The attempt loop of `id` ends without completing it.
    fn stop_running(&self, id: &InvocationId, epoch: Epoch) {
        self.fence.end(id, epoch);
        self.live.lock().unwrap().remove(id);
    }

    /// Mark an invocation suspended unless a completion arrived meanwhile
    /// (then the caller starts another attempt at once).
    fn suspend(&self, id: &InvocationId, mailbox: &Mailbox) -> bool {
        let mut live = self.live.lock().unwrap();
        if mailbox.has_mail() {
            return false;
        }
        if let Some(l) = live.get_mut(id) {
            l.status = LiveStatus::Suspended;
            l.mailbox = None;
            l.task = None;
        }
        tracing::debug!(invocation = %id, "suspended");
        true
    }

    /// One attempt of `record` under `epoch` (traced under `span`);
    /// `inline`: it is an inline attempt, its writes go there.
    async fn attempt(
        self: &Arc<Self>,
        record: Arc<InvocationRecord>,
        journal: Journal,
        mailbox: Arc<Mailbox>,
        (epoch, span): (Epoch, Option<SpanRef>),
        inline: Option<InlineWrites>,
    ) -> AttemptEnd {
        if record.target.handler == EDIT_STATE {
            return self.edit_state(&record, epoch).await;
        }
        let Some(deployment) = self.registry.deployment(&record.deployment) else {
            return AttemptEnd::Stopped(format!("deployment {} is not loaded", record.deployment));
        };
        let _limited = self.limits.acquire(&record.target).await;
        let _slot = self.instances.acquire(&record.target.service).await;
        let overlay = self.overlay_for(&record);
        let durable = DurableContext::new(record, journal, self.clone(), mailbox, overlay, epoch)
            .with_span(span);
        let durable = match inline {
            Some(writes) => durable.inline(writes),
            None => durable,
        };
        self.runtime.invoke(&deployment.module, durable).await
    }

    /// Run `record`, not yet created, as an inline attempt (see
    /// [`crate::inline`]): with an empty journal that stays in memory,
    /// its state writes in its key's overlay (the caller holds the key).
    pub async fn attempt_inline(self: &Arc<Self>, record: Arc<InvocationRecord>) -> InlineEnd {
        let Some(epoch) = self.fence.begin(&record.id) else {
            return InlineEnd::Failed;
        };
        // Whatever ends the attempt early (its task aborted, a failure)
        // takes its fence entry and its overlay layer with it.
        let mut attempt = InlineAttempt {
            invoker: self,
            record: &record,
            epoch,
            kept: false,
        };
        let writes = InlineWrites::default();
        let mailbox = Arc::new(Mailbox::default());
        let journal = Journal::from_entries(Vec::new());
        let end = self
            .attempt(
                record.clone(),
                journal,
                mailbox,
                (epoch, None),
                Some(writes.clone()),
            )
            .await;
        let writes = std::mem::take(&mut *writes.lock().unwrap());
        match end {
            AttemptEnd::Success(_) => {
                attempt.kept = true;
                InlineEnd::Done { epoch, writes }
            }
            AttemptEnd::NeedsJournal(_) => InlineEnd::NeedsJournal,
            _ => InlineEnd::Failed,
        }
    }

    /// Apply the writes of an inline attempt of `record`, inside the
    /// transaction that moves its subscription past its record.
    pub fn apply_inline(
        &self,
        t: &mut Tables<'_>,
        record: &InvocationRecord,
        writes: &[Command],
    ) -> StoreResult<()> {
        let Some(key) = &record.target.key else {
            return Ok(());
        };
        for write in writes {
            crate::context::apply_effect(t, &record.target.service, key, write)?;
        }
        Ok(())
    }

    /// The writes of attempt `epoch` on key `slot` are durable (or never
    /// will be): its layer of the key's overlay goes.
    pub fn retire_layer(&self, slot: &KeySlot, epoch: Epoch) {
        self.keys.lock().unwrap().retire(slot, epoch);
    }

    /// Whether `id` lives on this host's partition.
    pub fn is_local(&self, id: &InvocationId) -> bool {
        self.partitioning.elsewhere(id).is_none()
    }

    /// Hold `slot` for `holder` if it is free, or `holder` holds it and
    /// nobody waits (see [`KeyQueues::try_hold`]).
    pub fn try_hold_key(&self, slot: &KeySlot, holder: &InvocationId) -> bool {
        self.keys.lock().unwrap().try_hold(slot, holder)
    }

    /// Run an [`EDIT_STATE`] invocation, which holds its key: apply the
    /// edit (again, after a crash: it is idempotent) and answer the entry
    /// as it now is.
    async fn edit_state(self: &Arc<Self>, record: &InvocationRecord, epoch: Epoch) -> AttemptEnd {
        let edit: StateEdit = match serde_json::from_slice(&record.input) {
            Ok(edit) => edit,
            Err(e) => {
                return AttemptEnd::Terminal {
                    code: 400,
                    message: format!("not a state edit: {e}"),
                }
            }
        };
        let (me, id) = (self.clone(), record.id.clone());
        let (service, key) = (record.target.service.clone(), record.target.key.clone());
        let answer = serde_json::to_vec(&edit).expect("an edit serializes");
        let applied = self
            .committer
            .commit(move |t| {
                if !me.admits(&id, epoch) {
                    return Ok(false);
                }
                let key = key.as_deref().unwrap_or_default();
                match &edit.value {
                    Some(v) => t.set_state(&service, key, &edit.name, v.to_string().as_bytes())?,
                    None => t.clear_state(&service, key, &edit.name)?,
                }
                Ok(true)
            })
            .await;
        match applied {
            true => AttemptEnd::Success(answer),
            false => AttemptEnd::Fenced,
        }
    }

    /// Whether a write of attempt `epoch` of `id` may be applied; checked
    /// inside the write transaction.
    pub fn admits(&self, id: &InvocationId, epoch: Epoch) -> bool {
        self.fence.admits(id, epoch)
    }

    /// Remember a failed attempt (visible in the admin API), durably.
    async fn note_failure(&self, id: &InvocationId, attempts: u32, error: String) {
        let id = id.clone();
        self.committer
            .commit(move |t| {
                if let Some(mut r) = t.invocation(&id)? {
                    r.attempts = attempts;
                    r.last_error = Some(error);
                    t.put_invocation(&r)?;
                }
                Ok(())
            })
            .await
    }

    /// Store the outcome of `id` (unless it is already completed); returns
    /// what to do after the commit. Fences off any attempt of `id`.
    /// The key is released after the commit unless `released` was set
    /// (the next invocation of the key was started early, see `complete`).
    fn finish_in(
        self: &Arc<Self>,
        t: &mut Tables<'_>,
        id: &InvocationId,
        attempts: Option<u32>,
        outcome: Outcome,
        released: Arc<AtomicBool>,
    ) -> StoreResult<Option<Continuation>> {
        let Some(mut r) = t.invocation(id)? else {
            return Ok(None);
        };
        if r.status == Status::Completed {
            return Ok(None);
        }
        let fenced = self.fence.close(id);
        let now = self.clock.now_ms();
        let before = r.clone();
        r.status = Status::Completed;
        r.attempts = attempts.unwrap_or(r.attempts);
        r.outcome = Some(outcome.clone());
        r.completed_ms = Some(now);
        t.put_invocation_over(Some(&before), &r)?;
        let mut labels = self.labels(&r.target);
        let elapsed = now.saturating_sub(r.created_ms) as f64 / 1000.0;
        metrics::histogram!("cairn_invocation_duration_seconds", &labels).record(elapsed);
        labels.push(("outcome", r.status_class().to_string()));
        metrics::counter!("cairn_invocations_finished_total", &labels).increment(1);
        t.expire_at(now + self.retention_of(&r), id)?;
        let to_caller = match &r.caller {
            Some(c) => self.complete_in(
                t,
                &c.id,
                c.command,
                CompletionValue::Outcome(outcome.clone()),
            )?,
            None => None,
        };
        let me = self.clone();
        Ok(Some(Box::new(move || {
            trace_invocation(&r);
            let task = me.live.lock().unwrap().remove(&r.id).and_then(|l| l.task);
            me.fence.reopen(&r.id);
            me.retire_writes(&r, fenced);
            me.count_source(&r, -1);
            if let Some(at) = r.start_at_ms {
                me.timers.remove(at, &Due::Start(r.id.clone()));
            }
            if !released.swap(true, Ordering::SeqCst) {
                me.leave_key(&r);
            }
            let waiting = me
                .watchers
                .lock()
                .unwrap()
                .remove(&r.id)
                .unwrap_or_default();
            for w in waiting {
                let _ = w.send(outcome.clone());
            }
            if let Some(deliver) = to_caller {
                deliver();
            }
            drop(task);
        })))
    }

    /// Complete an invocation. If other invocations wait for its key, the
    /// next one starts as soon as the completion is queued, not committed:
    /// it shares the key's state overlay, its writes queue behind this
    /// invocation's, and nothing it produces is acknowledged before a later
    /// commit. This takes an fsync off a hot key's critical path.
    async fn complete(
        self: &Arc<Self>,
        record: &InvocationRecord,
        attempts: u32,
        outcome: Outcome,
    ) {
        self.complete_with(record, attempts, outcome, None).await
    }

    /// [`Invoker::complete`], recording `letter` in the same transaction
    /// (if the invocation was not completed already) and producing it
    /// after the commit.
    async fn complete_with(
        self: &Arc<Self>,
        record: &InvocationRecord,
        attempts: u32,
        outcome: Outcome,
        letter: Option<DeadLetter>,
    ) {
        let me = self.clone();
        let id = record.id.clone();
        let released = Arc::new(AtomicBool::new(false));
        let flag = released.clone();
        let committed = self.committer.commit_in_order(move |t| {
            let then = me.finish_in(t, &id, Some(attempts), outcome, flag)?;
            let (then, letter) = match (then, letter) {
                (Some(then), Some(letter)) => (then, letter),
                (then, _) => return Ok(((), then)),
            };
            t.put_dead_letter(&id, &letter)?;
            let send: Continuation = Box::new(move || {
                then();
                me.send_dead_letter(id, letter, false);
            });
            Ok(((), Some(send)))
        });
        if self.has_waiters(record) && !released.swap(true, Ordering::SeqCst) {
            self.leave_key(record);
        }
        committed.await;
    }

    /// Pause `id` if it is still ready (an attempt gave up on it); clients
    /// attached to it get the reason. `stop` names a subscription to stop
    /// in the same transaction, and why (on partition 0, which runs
    /// subscriptions: from elsewhere, through a message).
    async fn pause(
        self: &Arc<Self>,
        id: &InvocationId,
        attempts: Option<u32>,
        reason: String,
        stop: Option<(String, String)>,
    ) {
        tracing::error!(invocation = %id, "paused: {reason}");
        let paused = {
            let (id, reason) = (id.clone(), reason.clone());
            let me = self.clone();
            self.committer
                .commit(move |t| {
                    let Some(mut r) = t.invocation(&id)? else {
                        return Ok(false);
                    };
                    if r.status != Status::Ready {
                        return Ok(false);
                    }
                    r.status = Status::Paused;
                    r.attempts = attempts.unwrap_or(r.attempts);
                    r.last_error = Some(reason);
                    t.put_invocation(&r)?;
                    if let Some((sub, why)) = stop {
                        match me.partitioning.me {
                            0 => drop(t.stop_subscription(&sub, &why)?),
                            _ => t.send(
                                0,
                                &Message::StopSubscription {
                                    id: sub,
                                    reason: why,
                                },
                            )?,
                        }
                    }
                    Ok(true)
                })
                .await
        };
        if paused {
            self.answer_paused(id, &reason);
        }
    }

    /// Answer the clients attached to `id`, which just paused: they would
    /// otherwise wait until an operator resumes or kills it.
    fn answer_paused(&self, id: &InvocationId, reason: &str) {
        let waiting = self.watchers.lock().unwrap().remove(id);
        for w in waiting.unwrap_or_default() {
            let _ = w.send(paused_outcome(id, reason));
        }
    }

    // ----- operator actions -----

    /// Resume a paused invocation: a new attempt replays its journal, on
    /// `deployment` if given (to move it to a fixed version of its code).
    /// An exclusive invocation that never reached the head of its key's
    /// queue goes back to waiting there.
    pub async fn resume(
        self: &Arc<Self>,
        id: &InvocationId,
        deployment: Option<DeploymentId>,
    ) -> Result<(), ControlError> {
        if let Some(d) = &deployment {
            let loaded = self
                .registry
                .deployment(d)
                .ok_or_else(|| ControlError::NotFound(format!("deployment {d}")))?;
            let record = self
                .store
                .invocation(id)
                .ok()
                .flatten()
                .ok_or_else(|| ControlError::NotFound(format!("invocation {id}")))?;
            if !loaded
                .record
                .services
                .iter()
                .any(|s| s.name == record.target.service)
            {
                return Err(ControlError::Conflict(format!(
                    "deployment {d} has no service {}",
                    record.target.service
                )));
            }
        }
        let id2 = id.clone();
        let resumed = self
            .committer
            .commit(move |t| {
                let mut r = match in_state(t, &id2, |s| s == Status::Paused, "is not paused")? {
                    Ok(r) => r,
                    Err(e) => return Ok(Err(e)),
                };
                r.status = Status::Ready;
                r.attempts = 0;
                if let Some(d) = deployment {
                    r.deployment = d;
                }
                t.put_invocation(&r)?;
                Ok(Ok(r))
            })
            .await?;
        self.route(Arc::new(resumed));
        Ok(())
    }

    /// Pause an invocation now: its running attempt is fenced off and
    /// stopped; it keeps its journal (and its key, or its place in the
    /// key's queue) until resumed.
    pub async fn pause_now(self: &Arc<Self>, id: &InvocationId) -> Result<(), ControlError> {
        let me = self.clone();
        let id2 = id.clone();
        self.committer
            .commit_in_order(move |t| {
                let mut r =
                    match in_state(t, &id2, |s| s == Status::Ready, "is not running or waiting")? {
                        Ok(r) => r,
                        Err(e) => return Ok((Err(e), None)),
                    };
                r.status = Status::Paused;
                r.last_error = Some("paused by an operator".into());
                t.put_invocation(&r)?;
                let fenced = me.fence.close(&id2);
                let then: Continuation = Box::new(move || {
                    let task = me.live.lock().unwrap().remove(&id2).and_then(|l| l.task);
                    if let Some(task) = task {
                        task.abort();
                    }
                    me.fence.reopen(&id2);
                    me.retire_writes(&r, fenced);
                    me.answer_paused(&id2, "paused by an operator");
                });
                Ok((Ok(()), Some(then)))
            })
            .await
    }

    /// Kill: complete at once with a terminal "killed" failure (delivered
    /// to its caller); its running attempt is fenced off and stopped, and
    /// no compensation runs.
    pub async fn kill(self: &Arc<Self>, id: &InvocationId) -> Result<(), ControlError> {
        self.end_now(id, "killed".into()).await
    }

    /// Skip a paused invocation of a subscription's record: complete it at
    /// once as failed with `why` (like a kill), so its key moves on.
    pub async fn skip(
        self: &Arc<Self>,
        id: &InvocationId,
        why: String,
    ) -> Result<(), ControlError> {
        self.end_now(id, why).await
    }

    /// Complete `id` at once with a terminal 409 failure, `message`.
    async fn end_now(
        self: &Arc<Self>,
        id: &InvocationId,
        message: String,
    ) -> Result<(), ControlError> {
        let me = self.clone();
        let id2 = id.clone();
        self.committer
            .commit_in_order(move |t| {
                let killed = Outcome::Failure { code: 409, message };
                let task = me
                    .live
                    .lock()
                    .unwrap()
                    .get(&id2)
                    .and_then(|l| l.task.clone());
                match me.finish_in(t, &id2, None, killed, Arc::default())? {
                    Some(then) => Ok((
                        Ok(()),
                        Some(Box::new(move || {
                            if let Some(task) = task {
                                task.abort();
                            }
                            then();
                        }) as Continuation),
                    )),
                    None if t.invocation(&id2)?.is_none() => Ok((
                        Err(ControlError::NotFound(format!("invocation {id2}"))),
                        None,
                    )),
                    None => Ok((
                        Err(ControlError::Conflict(format!(
                            "invocation {id2} already completed"
                        ))),
                        None,
                    )),
                }
            })
            .await
    }

    /// Forget a finished invocation now, as retention would (see
    /// [`Tables::purge`]); an unfinished one must be killed or cancelled
    /// first.
    pub async fn purge(self: &Arc<Self>, id: &InvocationId) -> Result<(), ControlError> {
        let me = self.clone();
        let id = id.clone();
        self.committer
            .commit(move |t| {
                let Some(record) = t.invocation(&id)? else {
                    return Ok(Err(ControlError::NotFound(format!("invocation {id}"))));
                };
                if record.status != Status::Completed {
                    return Ok(Err(ControlError::Conflict(format!(
                        "invocation {id} has not finished: kill or cancel it first"
                    ))));
                }
                let timers = t.purge(&record)?;
                me.drop_timers(&id, timers);
                Ok(Ok(()))
            })
            .await
    }

    /// Cancel cooperatively: every operation the invocation (and, through
    /// its calls, its callees) is waiting on completes with a terminal
    /// "cancelled" failure, so the handler can compensate; an invocation
    /// that has not started yet completes as cancelled.
    pub async fn cancel(self: &Arc<Self>, id: &InvocationId) -> Result<(), ControlError> {
        let me = self.clone();
        let id2 = id.clone();
        self.committer
            .commit_in_order(move |t| {
                if let Err(e) = in_state(t, &id2, |s| s != Status::Completed, "already completed")?
                {
                    return Ok((Err(e), None));
                }
                let mut deliveries = Vec::new();
                me.cancel_in(t, &id2, &mut deliveries)?;
                let then: Continuation = Box::new(move || me.deliver_all(deliveries));
                Ok((Ok(()), Some(then)))
            })
            .await
    }

    /// Cancel `id` for a handler's `cancel` (unknown or finished: nothing
    /// happens); returns what delivers the resulting completions.
    pub fn cancel_from_handler_in(
        self: &Arc<Self>,
        t: &mut Tables<'_>,
        id: &str,
    ) -> StoreResult<Option<Continuation>> {
        let Ok(id) = id.parse::<InvocationId>() else {
            return Ok(None);
        };
        let mut deliveries = Vec::new();
        self.cancel_in(t, &id, &mut deliveries)?;
        let me = self.clone();
        Ok(Some(Box::new(move || me.deliver_all(deliveries))))
    }

    fn cancel_in(
        self: &Arc<Self>,
        t: &mut Tables<'_>,
        id: &InvocationId,
        out: &mut Deliveries,
    ) -> StoreResult<()> {
        if let Some(q) = self.partitioning.elsewhere(id) {
            return t.send(q, &Message::Cancel(id.clone()));
        }
        let Some(mut r) = t.invocation(id)? else {
            return Ok(());
        };
        if r.status == Status::Completed || r.cancelled {
            return Ok(());
        }
        r.cancelled = true;
        t.put_invocation(&r)?;
        let journal = Journal::from_entries(t.journal(id)?);
        for (index, command) in journal.commands() {
            if !command.is_pending() || journal.completion(index).is_some() {
                continue;
            }
            match command {
                Command::Awakeable => {
                    t.take_awakeable(id, index)?;
                }
                Command::Call { callee, .. } => {
                    if let Ok(callee) = callee.parse() {
                        self.cancel_in(t, &callee, out)?;
                    }
                }
                _ => {}
            }
            let completion = Completion {
                command: index,
                value: CompletionValue::Outcome(Outcome::Failure {
                    code: 409,
                    message: "cancelled".into(),
                }),
            };
            if let Some(entry) = t.complete_command(id, completion.clone())? {
                out.push((id.clone(), entry, completion));
            }
        }
        Ok(())
    }

    // ----- timers, awakeables, promises, produce -----

    /// The continuation that performs an outside effect (a Kafka produce,
    /// an HTTP call) once its command and outbox row are durable.
    pub fn perform_after_commit(
        self: &Arc<Self>,
        id: InvocationId,
        command: u32,
        effect: Command,
    ) -> Continuation {
        let me = self.clone();
        Box::new(move || me.perform(id, command, effect))
    }

    /// Perform an outbox row found at start: its command is in the journal.
    fn perform_stored(self: &Arc<Self>, id: InvocationId, command: u32) {
        let effect = self.store.journal(&id).map(|entries| {
            Journal::from_entries(entries)
                .commands()
                .find(|(index, _)| *index == command)
                .map(|(_, c)| c.clone())
        });
        match effect {
            Ok(Some(effect)) => self.perform(id, command, effect),
            Ok(None) => {
                tracing::error!(invocation = %id, command, "outbox row without its command")
            }
            Err(e) => tracing::error!(invocation = %id, "cannot read the outbox's command: {e}"),
        }
    }

    /// Perform the outside effect of command `command` of `id`, then take
    /// its outbox row and journal its result in one transaction. Runs once
    /// per outbox row and process: at the command's commit, or at start.
    fn perform(self: &Arc<Self>, id: InvocationId, command: u32, effect: Command) {
        let me = self.clone();
        self.tokio.spawn(async move {
            let traced = me.effect_span(&id);
            let started = std::time::SystemTime::now();
            let traceparent = traced.map(|(span, _)| span.header());
            let outcome = match &effect {
                Command::Produce { .. } | Command::SendRecord(_) => {
                    let r = effect.kafka_record().expect("a produce command");
                    let effect_id = format!("{id}:{command}");
                    let record = crate::kafka::Produced {
                        produce_id: &effect_id,
                        cluster: &r.cluster,
                        topic: &r.topic,
                        partition: r.partition,
                        key: r.key.as_deref(),
                        value: &r.value,
                        headers: &r.headers,
                        traceparent: traceparent.as_deref(),
                    };
                    me.producers.send(record).await
                }
                Command::HttpCall(request) => match &traceparent {
                    Some(traceparent) => {
                        let mut request = request.clone();
                        request
                            .headers
                            .retain(|(name, _)| !name.eq_ignore_ascii_case(TRACEPARENT));
                        request
                            .headers
                            .push((TRACEPARENT.to_string(), traceparent.clone()));
                        me.outbound.call(&request).await
                    }
                    None => me.outbound.call(request).await,
                },
                _ => {
                    tracing::error!(invocation = %id, command, "not an outside effect: {effect:?}");
                    return;
                }
            };
            if let Some((span, parent)) = traced {
                trace_effect(&id, &effect, span, parent, started, &outcome);
            }
            let row = id.clone();
            me.complete_outside(id, command, CompletionValue::Outcome(outcome), move |t| {
                t.take_outbox(&row, command)
            });
        });
    }

    /// Produce a dead letter until the broker has it, then take it out of
    /// the store. `recovered`: found at start, so it may be in the topic
    /// already (the host died between the broker's acknowledgement and the
    /// row's removal); the topic is read from the letter's time on first.
    fn send_dead_letter(self: &Arc<Self>, id: InvocationId, letter: DeadLetter, recovered: bool) {
        let me = self.clone();
        self.tokio.spawn(async move {
            let produce_id = crate::kafka::dead_letter_id(&id);
            let there = recovered && me.producers.holds(&letter, &produce_id).await;
            if there {
                tracing::info!(invocation = %id, "dead letter already in {}: not produced again", letter.topic);
            } else {
                let record = crate::kafka::Produced {
                    produce_id: &produce_id,
                    cluster: &letter.cluster,
                    topic: &letter.topic,
                    partition: None,
                    key: letter.key.as_deref(),
                    value: &letter.value,
                    headers: &letter.headers,
                    traceparent: None,
                };
                if let Outcome::Failure { message, .. } = me.producers.send(record).await {
                    tracing::error!(invocation = %id, "dead letter not produced: {message}");
                    return;
                }
                crate::faults::after_dead_letter();
            }
            tracing::info!(invocation = %id, cluster = %letter.cluster, topic = %letter.topic, "dead letter produced");
            me.committer
                .commit(move |t| t.take_dead_letter(&id).map(drop))
                .await;
        });
    }

    /// The span of an outside effect of `id` and its parent (the
    /// invocation's span: the effect may run after a restart, in no
    /// attempt), when traces are exported.
    fn effect_span(&self, id: &InvocationId) -> Option<(SpanRef, SpanRef)> {
        if !Traces::get().enabled() {
            return None;
        }
        let record = self.store.invocation(id).ok().flatten()?;
        let invocation = InvocationTrace::of(&record).span;
        Some((invocation.child(), invocation))
    }

    /// Complete command `command` of `id` with `value` in a transaction of
    /// its own, if `guard` (run in the same transaction) allows it; the
    /// completion is delivered on the writer, in commit order.
    fn complete_outside(
        self: &Arc<Self>,
        id: InvocationId,
        command: u32,
        value: CompletionValue,
        guard: impl FnOnce(&mut Tables<'_>) -> StoreResult<bool> + Send + 'static,
    ) {
        let me = self.clone();
        self.committer.submit(Box::new(move |t| {
            let then = match guard(t)? {
                true => me.complete_in(t, &id, command, value)?,
                false => None,
            };
            Ok(then.unwrap_or_else(|| Box::new(|| ())))
        }));
    }

    /// The continuation that arms a timer once its command is durable.
    pub fn arm_timer_after_commit(
        self: &Arc<Self>,
        at_ms: u64,
        id: InvocationId,
        command: u32,
    ) -> Continuation {
        let me = self.clone();
        Box::new(move || me.timers.add(at_ms, Due::Sleep(id, command)))
    }

    /// Drop the in-memory timers of a forgotten invocation.
    pub fn drop_timers(&self, id: &InvocationId, timers: Vec<(u64, u32)>) {
        for (at, command) in timers {
            self.timers.remove(at, &Due::Sleep(id.clone(), command));
        }
    }

    /// Complete an awakeable inside a write transaction.
    fn try_complete_awakeable(
        self: &Arc<Self>,
        t: &mut Tables<'_>,
        awakeable: &str,
        outcome: Outcome,
    ) -> StoreResult<Result<Continuation, ControlError>> {
        let unknown = || ControlError::NotFound(format!("awakeable {awakeable}"));
        let Some((id, command)) = parse_awakeable_id(awakeable) else {
            return Ok(Err(unknown()));
        };
        if !t.take_awakeable(&id, command)? {
            return Ok(Err(match t.invocation(&id)? {
                Some(_) => {
                    ControlError::Conflict(format!("awakeable {awakeable} was already completed"))
                }
                None => unknown(),
            }));
        }
        Ok(self
            .complete_in(t, &id, command, CompletionValue::Outcome(outcome))?
            .ok_or_else(unknown))
    }

    /// Complete an awakeable from a handler (unknown or completed: nothing happens).
    pub fn complete_awakeable_in(
        self: &Arc<Self>,
        t: &mut Tables<'_>,
        awakeable: &str,
        outcome: Outcome,
    ) -> StoreResult<Option<Continuation>> {
        let elsewhere =
            parse_awakeable_id(awakeable).and_then(|(id, _)| self.partitioning.elsewhere(&id));
        if let Some(q) = elsewhere {
            let awakeable = awakeable.to_string();
            t.send(q, &Message::Awaken { awakeable, outcome })?;
            return Ok(None);
        }
        Ok(self.try_complete_awakeable(t, awakeable, outcome)?.ok())
    }

    /// Complete an awakeable from outside (the ingress); answers after the commit.
    pub async fn complete_awakeable(
        self: &Arc<Self>,
        awakeable: &str,
        outcome: Outcome,
    ) -> Result<(), ControlError> {
        let me = self.clone();
        let awakeable = awakeable.to_string();
        self.committer
            .commit_in_order(move |t| {
                Ok(match me.try_complete_awakeable(t, &awakeable, outcome)? {
                    Ok(then) => (Ok(()), Some(then)),
                    Err(e) => (Err(e), None),
                })
            })
            .await
    }

    /// Complete a workflow promise; returns the completion for the command
    /// that did it and the continuation that wakes the waiters.
    pub fn complete_promise_in(
        self: &Arc<Self>,
        t: &mut Tables<'_>,
        service: &str,
        key: &str,
        name: &str,
        outcome: Outcome,
    ) -> StoreResult<(CompletionValue, Continuation)> {
        let Some(waiters) = t.complete_promise(service, key, name, &outcome)? else {
            let failure = Outcome::Failure {
                code: 409,
                message: format!("promise {name:?} is already completed"),
            };
            return Ok((CompletionValue::Outcome(failure), Box::new(|| ())));
        };
        let mut then = Vec::new();
        for (id, command) in waiters {
            then.extend(self.complete_in(
                t,
                &id,
                command,
                CompletionValue::Outcome(outcome.clone()),
            )?);
        }
        Ok((
            CompletionValue::Outcome(Outcome::Success(b"null".to_vec())),
            Box::new(move || then.into_iter().for_each(|c| c())),
        ))
    }
}

/// The record of `id` if its status is `allowed`; else not found, or a
/// conflict saying that it `otherwise`.
/// What a client attached to a paused invocation is told.
/// How an invocation failed for good (see [`Invoker::give_up`]).
enum Failed {
    /// The handler returned a terminal error.
    Terminal(Outcome),
    /// It trapped, or ran out of attempts: why.
    Stuck(String),
}

impl Failed {
    fn reason(self) -> String {
        match self {
            Failed::Terminal(Outcome::Failure { code, message }) => {
                format!("failed terminally ({code}): {message}")
            }
            Failed::Terminal(Outcome::Success(_)) => "succeeded".into(),
            Failed::Stuck(reason) => reason,
        }
    }

    fn into_outcome(self) -> Outcome {
        match self {
            Failed::Terminal(outcome) => outcome,
            Failed::Stuck(message) => Outcome::Failure { code: 500, message },
        }
    }
}

fn paused_outcome(id: &InvocationId, reason: &str) -> Outcome {
    Outcome::Failure {
        code: 500,
        message: format!(
            "invocation {id} is paused: {reason} (it keeps its place; resume it with \
             POST /invocations/{id}/resume on the admin API, or kill it)"
        ),
    }
}

fn in_state(
    t: &Tables<'_>,
    id: &InvocationId,
    allowed: impl Fn(Status) -> bool,
    otherwise: &str,
) -> StoreResult<Result<InvocationRecord, ControlError>> {
    Ok(match t.invocation(id)? {
        None => Err(ControlError::NotFound(format!("invocation {id}"))),
        Some(r) if allowed(r.status) => Ok(r),
        Some(_) => Err(ControlError::Conflict(format!(
            "invocation {id} {otherwise}"
        ))),
    })
}

/// Export the span of one attempt of `record` (under its invocation's span).
fn trace_attempt(
    record: &InvocationRecord,
    (invocation, span): (SpanRef, SpanRef),
    attempt: u32,
    started: std::time::SystemTime,
    end: &AttemptEnd,
) {
    let error = match end {
        AttemptEnd::Success(_) | AttemptEnd::Suspended => None,
        AttemptEnd::Terminal { message, .. } => Some(message.as_str()),
        AttemptEnd::Retryable(why)
        | AttemptEnd::Interrupted(why)
        | AttemptEnd::Trapped(why)
        | AttemptEnd::Stopped(why)
        | AttemptEnd::NeedsJournal(why) => Some(why.as_str()),
        AttemptEnd::Fenced => Some("fenced: killed or paused while it ran"),
    };
    let ended = match end {
        AttemptEnd::Suspended => "suspended",
        _ if error.is_some() => "failed",
        _ => "completed",
    };
    Traces::get().emit(Span {
        name: format!("attempt {attempt}"),
        me: span,
        parent: Some(invocation),
        kind: SpanKind::Internal,
        start: started,
        end: std::time::SystemTime::now(),
        attributes: vec![
            KeyValue::new("cairn.invocation.id", record.id.to_string()),
            KeyValue::new("cairn.attempt", i64::from(attempt)),
            KeyValue::new("cairn.attempt.end", ended),
        ],
        error,
    });
}

/// Export the span of a completed invocation, from its creation to its
/// completion.
fn trace_invocation(record: &InvocationRecord) {
    if !Traces::get().enabled() {
        return;
    }
    let trace = InvocationTrace::of(record);
    let error = match &record.outcome {
        Some(Outcome::Failure { message, .. }) => Some(message.as_str()),
        _ => None,
    };
    let mut attributes = vec![
        KeyValue::new("cairn.invocation.id", record.id.to_string()),
        KeyValue::new("cairn.service", record.target.service.clone()),
        KeyValue::new("cairn.handler", record.target.handler.clone()),
        KeyValue::new("cairn.status", record.status_class()),
        KeyValue::new("cairn.attempts", i64::from(record.attempts)),
    ];
    if let Some(key) = &record.target.key {
        attributes.push(KeyValue::new("cairn.key", key.clone()));
    }
    Traces::get().emit(Span {
        name: record.target.to_string(),
        me: trace.span,
        parent: trace.parent,
        kind: SpanKind::Server,
        start: crate::traces::at_ms(record.created_ms),
        end: crate::traces::at_ms(record.completed_ms.unwrap_or(record.created_ms)),
        attributes,
        error,
    });
}

/// Export the span of an `http_call` or `kafka_produce` the host performed.
fn trace_effect(
    id: &InvocationId,
    effect: &Command,
    span: SpanRef,
    parent: SpanRef,
    started: std::time::SystemTime,
    outcome: &Outcome,
) {
    let mut attributes = vec![KeyValue::new("cairn.invocation.id", id.to_string())];
    let (name, kind) = match effect {
        Command::HttpCall(request) => {
            attributes.push(KeyValue::new("http.request.method", request.method.clone()));
            attributes.push(KeyValue::new("url.full", request.url.clone()));
            (format!("http_call {}", request.method), SpanKind::Client)
        }
        Command::Produce { cluster, topic, .. }
        | Command::SendRecord(crate::journal::KafkaRecord { cluster, topic, .. }) => {
            attributes.push(KeyValue::new("messaging.system", "kafka"));
            attributes.push(KeyValue::new("messaging.destination.name", topic.clone()));
            (
                format!("kafka_produce {cluster}/{topic}"),
                SpanKind::Producer,
            )
        }
        _ => return,
    };
    let error = match outcome {
        Outcome::Failure { message, .. } => Some(message.as_str()),
        Outcome::Success(_) => None,
    };
    Traces::get().emit(Span {
        name,
        me: span,
        parent: Some(parent),
        kind,
        start: started,
        end: std::time::SystemTime::now(),
        attributes,
        error,
    });
}
