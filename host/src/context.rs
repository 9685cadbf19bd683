//! The host side of `cairn:runtime/context`: what a guest's calls do.
//!
//! Every journaled call takes the same path, [`DurableContext::durable`]:
//! the command is matched against the journal (a replay returns the
//! journaled completion and executes nothing); a live command is executed
//! by [`DurableContext::execute`], and the command, its completion and its
//! effects (on state, timers, other invocations) are written together by the
//! group-commit writer. Calls whose result escapes the invocation (a `run`
//! step's result, a promise completion) wait for that commit before
//! returning; the others are pipelined, which is safe because every later
//! acknowledgement waits for a later commit.
//!
//! Pending operations (sleep, call, awakeable, promise) return a handle (the
//! command index). Their completions arrive later through the invocation's
//! [`Mailbox`]; `await` and `await-any` pick the completion that came first
//! in journal order, so a replay picks the same one. A wait longer than
//! `suspend_after` suspends the invocation: the guest is unwound, its
//! instance dropped, and it is replayed when a completion arrives.

use crate::fence::Epoch;
use crate::ids::awakeable_id;
use crate::invoker::{Invoker, NewInvocation};
use crate::journal::{
    Command, Completion, CompletionValue, Entry, Issued, Journal, JournalMismatch, Outcome,
};
use crate::records::{Caller, HandlerKind, InvocationRecord, Target};
use crate::runtime::bindings::cairn::runtime::{context, types as wit};
use crate::runtime::GuestState;
use crate::sandbox::AttemptClock;
use crate::store::{StoreResult, Tables};
use crate::traces::{SpanRef, Traces, TRACEPARENT};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::Notify;
use wasmtime::format_err;

/// Payloads from this size on wait for their commit before the guest goes
/// on (smaller ones are pipelined), and are never written inline.
const LARGE_WRITE: usize = 256 * 1024;

/// What a command carries into the journal, and how many bytes.
fn payload(command: &Command) -> Option<(&'static str, usize)> {
    match command {
        Command::SetState { value, .. } => Some(("the state value", value.len())),
        Command::Produce { value, .. } => Some(("the Kafka record", value.len())),
        Command::SendRecord(r) => Some((
            "the Kafka record",
            r.value.len()
                + r.headers
                    .iter()
                    .map(|(k, v)| k.len() + v.len())
                    .sum::<usize>(),
        )),
        Command::Call { input, .. } => Some(("the call's input", input.len())),
        Command::Send { input, .. } => Some(("the send's input", input.len())),
        Command::CompleteAwakeable { outcome, .. } => {
            Some(("the awakeable's value", outcome_len(outcome)))
        }
        Command::CompletePromise { outcome, .. } => {
            Some(("the promise's value", outcome_len(outcome)))
        }
        Command::HttpCall(request) => Some(("the HTTP request body", request.body.len())),
        _ => None,
    }
}

/// The bytes of an outcome (value or error message).
fn outcome_len(outcome: &Outcome) -> usize {
    match outcome {
        Outcome::Success(v) => v.len(),
        Outcome::Failure { message, .. } => message.len(),
    }
}

/// Refuse a value over `limits.max_value_bytes` (`max`) with a terminal
/// error naming `what` and the knob.
pub(crate) fn check_size(what: &str, len: usize, max: usize) -> wasmtime::Result<()> {
    if len > max {
        return Err(wasmtime::Error::new(HostTrap::TooLarge(format!(
            "{what} is {len} bytes, over limits.max_value_bytes ({max})"
        ))));
    }
    Ok(())
}

/// Why the host stopped a guest.
#[derive(Debug, thiserror::Error)]
pub enum HostTrap {
    /// Replay diverged from the journal.
    #[error("{0}")]
    Mismatch(#[from] JournalMismatch),
    /// The guest broke a rule that retrying cannot fix.
    #[error("{0}")]
    Terminal(String),
    /// The guest used up its CPU budget.
    #[error("the guest ran out of its CPU budget")]
    CpuBudget,
    /// The attempt was busy (not in a durable wait) for longer than its
    /// wall-clock budget: blocked in WASI, or queued for CPU or memory.
    #[error("the attempt ran out of its wall-clock budget")]
    WallClock,
    /// A linear memory would grow past the per-instance cap.
    #[error("the guest needs {desired} bytes of memory, over the cap of {cap} per instance (limits.memory_bytes)")]
    MemoryCap { desired: usize, cap: usize },
    /// A value over `limits.max_value_bytes`.
    #[error("{0}")]
    TooLarge(String),
    /// The host-wide memory budget could not cover a growth in time.
    #[error("the host's memory budget for instances (limits.memory_total) had no room for {wanted} more bytes")]
    HostMemory { wanted: usize },
    /// The guest waited longer than `suspend_after`: drop the instance.
    #[error("suspended while waiting")]
    Suspend,
    /// The attempt was superseded (killed, paused): its writes are refused.
    #[error("the attempt was fenced off")]
    Fenced,
    /// An inline attempt (see `inline`) issued a command that needs the
    /// journal; it was refused before it did anything.
    #[error("{0} needs the journal: the record runs as an invocation")]
    NeedsJournal(String),
}

/// Where an inline attempt's state writes go instead of the journal (see
/// `inline`): they are applied with the record's offsets, in one
/// transaction, once the attempt has succeeded.
pub type InlineWrites = Arc<Mutex<Vec<Command>>>;

/// Whether an inline attempt may issue `command`: it reads or writes its
/// key's state, or reads the clock. Everything else (a step, a call, a
/// sleep, an outside effect) needs the journal.
fn inline_allows(command: &Command) -> bool {
    matches!(
        command,
        Command::GetState { .. }
            | Command::GetStateKeys
            | Command::SetState { .. }
            | Command::ClearState { .. }
            | Command::ClearAllState
            | Command::Now
    )
}

/// A [`StateOverlay`] shared between the attempts of a key.
pub type SharedOverlay = Arc<Mutex<StateOverlay>>;

fn terminal(message: impl Into<String>) -> wasmtime::Error {
    wasmtime::Error::new(HostTrap::Terminal(message.into()))
}

/// Completions delivered to a live attempt, after their commit, in commit
/// (so journal) order.
#[derive(Default)]
pub struct Mailbox {
    arrived: Mutex<Vec<(u32, Completion)>>,
    notify: Notify,
}

impl Mailbox {
    /// Deliver a completion journaled at `entry`.
    pub fn deliver(&self, entry: u32, completion: Completion) {
        self.arrived.lock().unwrap().push((entry, completion));
        self.notify.notify_one();
    }

    /// Whether anything arrived that the attempt has not taken.
    pub fn has_mail(&self) -> bool {
        !self.arrived.lock().unwrap().is_empty()
    }

    fn take(&self) -> Vec<(u32, Completion)> {
        std::mem::take(&mut self.arrived.lock().unwrap())
    }
}

/// Everything an attempt needs to answer the guest durably.
pub struct DurableContext {
    record: Arc<InvocationRecord>,
    journal: Journal,
    invoker: Arc<Invoker>,
    mailbox: Arc<Mailbox>,
    /// State writes of this key not necessarily committed yet (shared by
    /// the exclusive invocations of a key while it stays busy).
    overlay: SharedOverlay,
    /// The live `run` step between `run-enter` and `run-exit`, if any:
    /// its command, name and start.
    step: Option<(u32, String, SystemTime)>,
    /// This attempt's epoch: its writes apply only while it is current.
    epoch: Epoch,
    /// This attempt's busy time, for its wall-clock budget.
    clock: Arc<AttemptClock>,
    /// Whether the handler is still replaying its journal (its output is
    /// then not logged again; see `guestlog`).
    replaying: Arc<AtomicBool>,
    /// This attempt's span, when traces are exported (see `traces`).
    span: Option<SpanRef>,
    /// Set for an inline attempt: its state writes, in order; it journals
    /// nothing and refuses what needs the journal.
    inline: Option<InlineWrites>,
}

impl DurableContext {
    /// A context for one attempt of `record`, over its journal so far.
    pub fn new(
        record: Arc<InvocationRecord>,
        journal: Journal,
        invoker: Arc<Invoker>,
        mailbox: Arc<Mailbox>,
        overlay: SharedOverlay,
        epoch: Epoch,
    ) -> Self {
        let journal_replaying = journal.is_replaying();
        DurableContext {
            record,
            journal,
            invoker,
            mailbox,
            overlay,
            step: None,
            epoch,
            clock: AttemptClock::start(),
            replaying: Arc::new(AtomicBool::new(journal_replaying)),
            span: None,
            inline: None,
        }
    }

    /// The same context for an inline attempt: it journals nothing, its
    /// state writes go to `writes` (and to the key's overlay), and a
    /// command that needs the journal ends it ([`HostTrap::NeedsJournal`]).
    pub fn inline(mut self, writes: InlineWrites) -> Self {
        self.inline = Some(writes);
        self
    }

    /// The same context, its steps traced under the attempt span `span`.
    pub fn with_span(mut self, span: Option<SpanRef>) -> Self {
        self.span = span;
        self
    }

    /// Export a span of this attempt (if it is traced) that ran from
    /// `start` to `end`.
    fn trace(
        &self,
        me: SpanRef,
        name: String,
        start: SystemTime,
        end: SystemTime,
        error: Option<&str>,
    ) {
        Traces::get().emit(crate::traces::Span {
            name,
            me,
            parent: self.span,
            kind: opentelemetry::trace::SpanKind::Internal,
            start,
            end,
            attributes: vec![opentelemetry::KeyValue::new(
                "cairn.invocation.id",
                self.record.id.to_string(),
            )],
            error,
        });
    }

    /// The span of a live call, send or sleep (their callee invocation or
    /// timer is its child), when this attempt is traced.
    fn command_span(&self, command: &Command) -> Option<SpanRef> {
        let traced = matches!(
            command,
            Command::Call { .. } | Command::Send { .. } | Command::Sleep { .. }
        );
        self.span.filter(|_| traced).map(|attempt| attempt.child())
    }

    /// Export the span of a live call, send or sleep once it is issued (a
    /// sleep's span ends when it is due to wake).
    fn trace_command(&self, span: SpanRef, command: &Command) {
        let now = SystemTime::now();
        let (name, end) = match command {
            Command::Call { target, .. } => (format!("call {target}"), now),
            Command::Send { target, .. } => (format!("send {target}"), now),
            Command::Sleep { wake_at_ms } => {
                ("sleep".to_string(), crate::traces::at_ms(*wake_at_ms))
            }
            _ => return,
        };
        self.trace(span, name, now, end, None);
    }

    /// Whether the handler is still replaying its journal, as it goes.
    pub fn replaying(&self) -> Arc<AtomicBool> {
        self.replaying.clone()
    }

    /// Match an issued command against the journal, and note whether the
    /// handler is still replaying after it.
    fn issue(&mut self, command: &Command) -> wasmtime::Result<Issued> {
        if self.inline.is_some() && !inline_allows(command) {
            let trap = HostTrap::NeedsJournal(command.signature());
            return Err(wasmtime::Error::new(trap));
        }
        let issued = self.journal.issue(command);
        self.replaying
            .store(self.journal.is_replaying(), Ordering::Relaxed);
        Ok(issued.map_err(HostTrap::Mismatch)?)
    }

    /// The attempt's busy-time clock.
    pub fn clock(&self) -> &Arc<AttemptClock> {
        &self.clock
    }

    /// Whether the handler returned while journaled commands were still
    /// unconsumed: its code no longer matches its journal.
    pub fn unconsumed(&self) -> Option<JournalMismatch> {
        self.journal.unconsumed()
    }

    /// The invocation.
    pub fn record(&self) -> &InvocationRecord {
        &self.record
    }

    /// The seed of the guest's random numbers: the same on every attempt.
    pub fn seed(&self) -> u64 {
        self.record.id.seed()
    }

    fn key(&self) -> wasmtime::Result<(String, String)> {
        let t = &self.record.target;
        match &t.key {
            Some(key) => Ok((t.service.clone(), key.clone())),
            None => Err(terminal(format!(
                "service {} is stateless: it has no state or promises",
                t.service
            ))),
        }
    }

    fn writable_key(&self) -> wasmtime::Result<(String, String)> {
        if self.record.handler_kind == HandlerKind::Shared {
            return Err(terminal(format!(
                "handler {} is shared: it may read state but not change it",
                self.record.target
            )));
        }
        self.key()
    }

    /// The one path of every journaled call; see the module docs.
    async fn durable(&mut self, command: Command) -> wasmtime::Result<Option<CompletionValue>> {
        if let Some((_, name, _)) = &self.step {
            return Err(terminal(format!(
                "{} was called inside run step {name:?}; steps may not use the context",
                command.signature()
            )));
        }
        // A replayed outside effect without its answer is still in the
        // outbox, which performs it; nothing to do here.
        match self.issue(&command)? {
            Issued::Replayed(completion) => Ok(completion),
            Issued::Live(index) => {
                let carried = payload(&command);
                if let Some((what, len)) = carried {
                    check_size(what, len, self.invoker.max_value_bytes())?;
                }
                let large = carried.is_some_and(|(_, len)| len >= LARGE_WRITE);
                if large && self.inline.is_some() {
                    // A batch holds its inline writes in memory until it
                    // commits: a large one takes the journal, which waits.
                    let what = format!("{} of {LARGE_WRITE} bytes or more", command.signature());
                    return Err(wasmtime::Error::new(HostTrap::NeedsJournal(what)));
                }
                let span = self.command_span(&command);
                if let Some(span) = span {
                    self.trace_command(span, &command);
                }
                let completion = self.execute(index, command, span).await?;
                // Large writes are not pipelined: one handler writing many
                // megabytes must not fill the commit queue (and the host's
                // memory) ahead of everybody else's commits.
                if large {
                    self.invoker.committer().barrier().await;
                    self.clock.mark_waited();
                }
                Ok(completion)
            }
        }
    }

    /// Execute a live command; returns its immediate completion, if any.
    async fn execute(
        &mut self,
        index: u32,
        command: Command,
        span: Option<SpanRef>,
    ) -> wasmtime::Result<Option<CompletionValue>> {
        let id = self.record.id.clone();
        let (service, key) = (
            self.record.target.service.clone(),
            self.record.target.key.clone().unwrap_or_default(),
        );
        let completion = match &command {
            Command::GetState { name } => Some(CompletionValue::State(self.read_state(name)?)),
            Command::GetStateKeys => Some(CompletionValue::StateKeys(self.read_state_names()?)),
            Command::PeekPromise { name } => Some(CompletionValue::MaybeOutcome(
                self.invoker.store().promise(&service, &key, name)?,
            )),
            Command::Now => Some(CompletionValue::Time(self.invoker.now_ms())),
            Command::Send {
                target,
                input,
                delay_ms,
            } => match self.child(
                target,
                input,
                Some(Duration::from_millis(*delay_ms)),
                None,
                span,
            ) {
                Ok(child) => {
                    let sent = CompletionValue::Id(child.id.to_string());
                    self.append_with(command, Some(sent.clone()), index, move |t, inv| {
                        inv.create_child(t, child)
                    });
                    return Ok(Some(sent));
                }
                Err(message) => Some(CompletionValue::Outcome(Outcome::Failure {
                    code: 404,
                    message,
                })),
            },
            Command::Call {
                target,
                input,
                callee,
            } => {
                let caller = Caller {
                    id: id.clone(),
                    command: index,
                };
                match self.child(target, input, None, Some(caller), span) {
                    Ok(mut child) => {
                        child.id = callee
                            .parse()
                            .map_err(|e: String| format_err!("corrupt call command: {e}"))?;
                        self.append_with(command, None, index, move |t, inv| {
                            inv.create_child(t, child)
                        });
                        return Ok(None);
                    }
                    Err(message) => Some(CompletionValue::Outcome(Outcome::Failure {
                        code: 404,
                        message,
                    })),
                }
            }
            Command::Sleep { wake_at_ms } => {
                let at = *wake_at_ms;
                self.append_with(command, None, index, move |t, inv| {
                    t.put_timer(at, &id, index)?;
                    Ok(Some(inv.arm_timer_after_commit(at, id, index)))
                });
                return Ok(None);
            }
            Command::Produce { .. } | Command::SendRecord(_) | Command::HttpCall(_) => {
                let effect = command.clone();
                self.append_with(command, None, index, move |t, inv| {
                    t.put_outbox(&id, index)?;
                    Ok(Some(inv.perform_after_commit(id, index, effect)))
                });
                return Ok(None);
            }
            Command::Awakeable => {
                self.append_with(command, None, index, move |t, _| {
                    t.put_awakeable(&id, index)?;
                    Ok(None)
                });
                return Ok(None);
            }
            Command::CompleteAwakeable {
                id: target,
                outcome,
            } => {
                let (target, outcome) = (target.clone(), outcome.clone());
                self.append_with(command, None, index, move |t, inv| {
                    inv.complete_awakeable_in(t, &target, outcome)
                });
                return Ok(None);
            }
            Command::Cancel { id: target } => {
                let target = target.clone();
                self.append_with(command, None, index, move |t, inv| {
                    inv.cancel_from_handler_in(t, &target)
                });
                return Ok(None);
            }
            Command::GetPromise { name } => {
                let name = name.clone();
                self.append_with(command, None, index, move |t, inv| {
                    match t.promise(&service, &key, &name)? {
                        Some(outcome) => {
                            inv.complete_in(t, &id, index, CompletionValue::Outcome(outcome))
                        }
                        None => t
                            .put_promise_waiter(&service, &key, &name, &id, index)
                            .map(|_| None),
                    }
                });
                return Ok(None);
            }
            Command::CompletePromise { name, outcome } => {
                let (name, outcome) = (name.clone(), outcome.clone());
                let (invoker, epoch) = (self.invoker.clone(), self.epoch);
                let value = self
                    .invoker
                    .committer()
                    .commit_in_order(move |t| {
                        if !invoker.admits(&id, epoch) {
                            return Ok((None, None));
                        }
                        t.append(&id, &Entry::Command(command))?;
                        let (value, then) =
                            invoker.complete_promise_in(t, &service, &key, &name, outcome)?;
                        t.append(
                            &id,
                            &Entry::Completion(Completion {
                                command: index,
                                value: value.clone(),
                            }),
                        )?;
                        Ok((Some(value), Some(then)))
                    })
                    .await;
                return match value {
                    Some(value) => Ok(Some(value)),
                    None => Err(wasmtime::Error::new(HostTrap::Fenced)),
                };
            }
            Command::SetState { .. } | Command::ClearState { .. } | Command::ClearAllState => None,
            Command::Run { .. } => unreachable!("run steps are journaled by run-exit"),
        };
        {
            // Under the overlay's lock, so a fence that closes now either
            // sees this write (and retires it) or refuses it.
            let mut overlay = self.overlay.lock().unwrap();
            if self.invoker.admits(&self.record.id, self.epoch) {
                overlay.apply(self.epoch, &command);
            }
        }
        if let Some(writes) = &self.inline {
            if matches!(
                command,
                Command::SetState { .. } | Command::ClearState { .. } | Command::ClearAllState
            ) {
                writes.lock().unwrap().push(command);
            }
            return Ok(completion);
        }
        let effect_key = self.record.target.key.clone();
        self.append_with(command.clone(), completion.clone(), index, move |t, _| {
            if let Some(key) = &effect_key {
                apply_effect(t, &service, key, &command)?;
            }
            Ok(None)
        });
        Ok(completion)
    }

    /// Queue (pipelined) the command, its completion if any, and `effect`;
    /// the continuation `effect` returns runs after the commit.
    fn append_with(
        &self,
        command: Command,
        completion: Option<CompletionValue>,
        index: u32,
        effect: impl FnOnce(
                &mut Tables<'_>,
                &Arc<Invoker>,
            ) -> StoreResult<Option<crate::commit::Continuation>>
            + Send
            + 'static,
    ) {
        let (id, epoch) = (self.record.id.clone(), self.epoch);
        let invoker = self.invoker.clone();
        self.invoker.committer().submit(Box::new(move |t| {
            if !invoker.admits(&id, epoch) {
                return Ok(Box::new(|| ()));
            }
            let pending = command.is_pending();
            t.append(&id, &Entry::Command(command))?;
            if let Some(value) = completion {
                let completion = Completion {
                    command: index,
                    value,
                };
                // A call that failed at once (no such handler): calls are
                // answered later, so its answer gets a `completions` row.
                match pending {
                    true => t.complete_command(&id, completion).map(drop)?,
                    false => t.append(&id, &Entry::Completion(completion)).map(drop)?,
                }
            }
            let then = effect(t, &invoker)?;
            Ok(then.unwrap_or_else(|| Box::new(|| ())))
        }));
    }

    /// A new invocation record for a call or send from this invocation
    /// (under the command's span, if it is traced).
    fn child(
        &self,
        target: &Target,
        input: &[u8],
        delay: Option<Duration>,
        caller: Option<Caller>,
        span: Option<SpanRef>,
    ) -> Result<InvocationRecord, String> {
        let headers = span
            .map(|s| vec![(TRACEPARENT.to_string(), s.header())])
            .unwrap_or_default();
        self.invoker
            .new_record(NewInvocation {
                target: target.clone(),
                input: input.to_vec(),
                headers,
                idempotency_key: None,
                delay: delay.filter(|d| !d.is_zero()),
                caller,
                ..Default::default()
            })
            .map_err(|e| e.to_string())
    }

    fn read_state(&self, name: &str) -> StoreResult<Option<Vec<u8>>> {
        let (service, key) = (
            &self.record.target.service,
            self.record.target.key.as_deref().unwrap_or_default(),
        );
        let decided = self.overlay.lock().unwrap().get(name);
        match decided {
            Some(value) => Ok(value),
            None => self.invoker.store().state(service, key, name),
        }
    }

    fn read_state_names(&self) -> StoreResult<Vec<String>> {
        let (service, key) = (
            &self.record.target.service,
            self.record.target.key.as_deref().unwrap_or_default(),
        );
        let cleared = self.overlay.lock().unwrap().cleared();
        let stored = if cleared {
            Vec::new()
        } else {
            self.invoker.store().state_names(service, key)?
        };
        Ok(self.overlay.lock().unwrap().names(stored))
    }

    /// Wait until one of `handles` completes; its position in `handles`.
    async fn wait_any(&mut self, handles: &[u32]) -> wasmtime::Result<usize> {
        if let Some(h) = handles.iter().find(|h| !self.journal.is_awaitable(**h)) {
            return Err(terminal(format!(
                "handle {h} is not a pending operation of this invocation"
            )));
        }
        let deadline = Instant::now() + self.invoker.suspend_after();
        let clock = self.clock.clone();
        let _waiting = clock.wait();
        let service = self.record.target.service.clone();
        let slots = self.invoker.instances();
        loop {
            for (entry, completion) in self.mailbox.take() {
                self.journal.arrive(entry, completion);
            }
            if let Some(pos) = self.journal.first_completed(handles) {
                return Ok(pos);
            }
            // Another attempt needs this instance's slot: give it up (see
            // `crate::instances`).
            if slots.short(&service) && !self.mailbox.has_mail() {
                return Err(wasmtime::Error::new(HostTrap::Suspend));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::select! {
                _ = self.mailbox.notify.notified() => {}
                _ = slots.pressed(&service) => {}
                _ = tokio::time::sleep(left) => {
                    if !self.mailbox.has_mail() {
                        return Err(wasmtime::Error::new(HostTrap::Suspend));
                    }
                }
            }
        }
    }

    fn outcome_of(&self, handle: u32) -> wasmtime::Result<wit::Outcome> {
        match self.journal.completion(handle).map(|a| &a.value) {
            Some(CompletionValue::Outcome(o)) => Ok(to_wit(o.clone())),
            other => Err(format_err!(
                "corrupt journal: handle {handle} completed with {other:?}"
            )),
        }
    }
}

/// Apply a command's effect on keyed state, inside its journal transaction.
pub(crate) fn apply_effect(
    t: &mut Tables<'_>,
    service: &str,
    key: &str,
    command: &Command,
) -> StoreResult<()> {
    match command {
        Command::SetState { name, value } => t.set_state(service, key, name, value),
        Command::ClearState { name } => t.clear_state(service, key, name),
        Command::ClearAllState => t.clear_all_state(service, key),
        _ => Ok(()),
    }
}

/// State writes that may still be in the commit queue: reads consult them
/// first. Exclusive invocations of one key share it while the key is busy,
/// so the next one can start before the previous one's commit lands.
///
/// Each attempt writes its own layer (by epoch). A layer goes when its
/// writes are committed, or when its attempt was fenced off and its writes
/// will never commit; the layers below it stay visible.
#[derive(Default)]
pub struct StateOverlay {
    layers: Vec<(Epoch, Layer)>,
}

#[derive(Default)]
struct Layer {
    cleared: bool,
    values: BTreeMap<String, Option<Vec<u8>>>,
}

impl StateOverlay {
    fn apply(&mut self, epoch: Epoch, command: &Command) {
        if self.layers.last().is_none_or(|(e, _)| *e != epoch) {
            self.layers.push((epoch, Layer::default()));
        }
        let (_, layer) = self.layers.last_mut().expect("pushed above");
        match command {
            Command::SetState { name, value } => {
                layer.values.insert(name.clone(), Some(value.clone()));
            }
            Command::ClearState { name } => {
                layer.values.insert(name.clone(), None);
            }
            Command::ClearAllState => {
                layer.cleared = true;
                layer.values.clear();
            }
            _ => {}
        }
    }

    /// Forget attempt `epoch`'s writes.
    pub fn retire(&mut self, epoch: Epoch) {
        self.layers.retain(|(e, _)| *e != epoch);
    }

    /// `Some(value)` when a layer decided the value, `None` to ask the store.
    fn get(&self, name: &str) -> Option<Option<Vec<u8>>> {
        for (_, layer) in self.layers.iter().rev() {
            if let Some(v) = layer.values.get(name) {
                return Some(v.clone());
            }
            if layer.cleared {
                return Some(None);
            }
        }
        None
    }

    /// Whether some layer cleared everything (the stored names are hidden).
    fn cleared(&self) -> bool {
        self.layers.iter().any(|(_, l)| l.cleared)
    }

    fn names(&self, stored: Vec<String>) -> Vec<String> {
        let mut names: BTreeSet<String> = stored.into_iter().collect();
        for (_, layer) in &self.layers {
            if layer.cleared {
                names.clear();
            }
            for (name, value) in &layer.values {
                if value.is_some() {
                    names.insert(name.clone());
                } else {
                    names.remove(name);
                }
            }
        }
        names.into_iter().collect()
    }
}

fn to_wit(outcome: Outcome) -> wit::Outcome {
    match outcome {
        Outcome::Success(bytes) => wit::Outcome::Success(bytes),
        Outcome::Failure { code, message } => {
            wit::Outcome::Failure(wit::TerminalError { code, message })
        }
    }
}

fn from_wit(outcome: wit::Outcome) -> Outcome {
    match outcome {
        wit::Outcome::Success(bytes) => Outcome::Success(bytes),
        wit::Outcome::Failure(t) => Outcome::Failure {
            code: t.code,
            message: t.message,
        },
    }
}

fn call_target(t: context::CallTarget) -> Target {
    Target {
        service: t.service,
        handler: t.handler,
        key: t.key,
    }
}

fn unexpected(what: &str, c: Option<CompletionValue>) -> wasmtime::Error {
    format_err!("corrupt journal: expected {what}, found {c:?}")
}

impl wit::Host for GuestState {}

impl context::Host for GuestState {
    async fn input(&mut self) -> wasmtime::Result<context::InvocationInput> {
        let r = self.durable()?.record();
        Ok(context::InvocationInput {
            invocation_id: r.id.to_string(),
            service: r.target.service.clone(),
            handler: r.target.handler.clone(),
            key: r.target.key.clone(),
            payload: r.input.clone(),
            headers: r
                .headers
                .iter()
                .map(|(name, value)| wit::Header {
                    name: name.clone(),
                    value: value.clone(),
                })
                .collect(),
        })
    }

    async fn state_get(&mut self, name: String) -> wasmtime::Result<Option<Vec<u8>>> {
        let d = self.durable()?;
        d.key()?;
        match d.durable(Command::GetState { name }).await? {
            Some(CompletionValue::State(v)) => Ok(v),
            other => Err(unexpected("a state value", other)),
        }
    }

    async fn state_set(&mut self, name: String, value: Vec<u8>) -> wasmtime::Result<()> {
        let d = self.durable()?;
        d.writable_key()?;
        d.durable(Command::SetState { name, value }).await.map(drop)
    }

    async fn state_clear(&mut self, name: String) -> wasmtime::Result<()> {
        let d = self.durable()?;
        d.writable_key()?;
        d.durable(Command::ClearState { name }).await.map(drop)
    }

    async fn state_clear_all(&mut self) -> wasmtime::Result<()> {
        let d = self.durable()?;
        d.writable_key()?;
        d.durable(Command::ClearAllState).await.map(drop)
    }

    async fn state_keys(&mut self) -> wasmtime::Result<Vec<String>> {
        let d = self.durable()?;
        d.key()?;
        match d.durable(Command::GetStateKeys).await? {
            Some(CompletionValue::StateKeys(names)) => Ok(names),
            other => Err(unexpected("state names", other)),
        }
    }

    async fn run_enter(&mut self, name: String) -> wasmtime::Result<Option<wit::Outcome>> {
        let d = self.durable()?;
        if let Some((_, open, _)) = &d.step {
            return Err(terminal(format!(
                "run step {name:?} started inside run step {open:?}"
            )));
        }
        match d.issue(&Command::Run { name: name.clone() })? {
            Issued::Replayed(Some(CompletionValue::Outcome(outcome))) => Ok(Some(to_wit(outcome))),
            Issued::Replayed(other) => Err(unexpected("a step result", other)),
            Issued::Live(command) => {
                d.step = Some((command, name, SystemTime::now()));
                self.set_in_step(true);
                Ok(None)
            }
        }
    }

    async fn run_exit(&mut self, step_outcome: wit::Outcome) -> wasmtime::Result<()> {
        self.set_in_step(false);
        let d = self.durable()?;
        let step_outcome = from_wit(step_outcome);
        check_size(
            "the step's result",
            outcome_len(&step_outcome),
            d.invoker.max_value_bytes(),
        )?;
        let (command, name, began) = d
            .step
            .take()
            .ok_or_else(|| terminal("run-exit without a matching run-enter"))?;
        let failed = match &step_outcome {
            Outcome::Failure { message, .. } => Some(message.clone()),
            Outcome::Success(_) => None,
        };
        let traced = d
            .span
            .map(|attempt| (attempt.child(), format!("run {name:?}")));
        let value = CompletionValue::Outcome(step_outcome);
        let (id, epoch, invoker) = (d.record.id.clone(), d.epoch, d.invoker.clone());
        let journaled = d
            .invoker
            .committer()
            .commit(move |t| {
                if !invoker.admits(&id, epoch) {
                    return Ok(false);
                }
                t.append(&id, &Entry::Command(Command::Run { name }))?;
                t.append(&id, &Entry::Completion(Completion { command, value }))?;
                Ok(true)
            })
            .await;
        d.clock.mark_waited();
        if let (Some((span, step)), true) = (traced, journaled) {
            d.trace(span, step, began, SystemTime::now(), failed.as_deref());
        }
        match journaled {
            true => Ok(()),
            false => Err(wasmtime::Error::new(HostTrap::Fenced)),
        }
    }

    async fn now(&mut self) -> wasmtime::Result<u64> {
        match self.durable()?.durable(Command::Now).await? {
            Some(CompletionValue::Time(ms)) => Ok(ms),
            other => Err(unexpected("a time", other)),
        }
    }

    async fn sleep(&mut self, millis: u64) -> wasmtime::Result<u32> {
        let d = self.durable()?;
        let wake_at_ms = d.invoker.now_ms().saturating_add(millis);
        d.durable(Command::Sleep { wake_at_ms }).await?;
        Ok(d.journal.issued() - 1)
    }

    async fn call(
        &mut self,
        target: context::CallTarget,
        payload: Vec<u8>,
    ) -> wasmtime::Result<u32> {
        let d = self.durable()?;
        let target = call_target(target);
        let callee = d.invoker.new_id(&target, None).to_string();
        d.durable(Command::Call {
            target,
            input: payload,
            callee,
        })
        .await?;
        Ok(d.journal.issued() - 1)
    }

    async fn send(
        &mut self,
        target: context::CallTarget,
        payload: Vec<u8>,
        delay_millis: u64,
    ) -> wasmtime::Result<String> {
        let d = self.durable()?;
        let command = Command::Send {
            target: call_target(target),
            input: payload,
            delay_ms: delay_millis,
        };
        match d.durable(command).await? {
            Some(CompletionValue::Id(id)) => Ok(id),
            Some(CompletionValue::Outcome(Outcome::Failure { message, .. })) => {
                Err(terminal(message))
            }
            other => Err(unexpected("an invocation id", other)),
        }
    }

    async fn cancel(&mut self, invocation_id: String) -> wasmtime::Result<()> {
        let d = self.durable()?;
        d.durable(Command::Cancel { id: invocation_id })
            .await
            .map(drop)
    }

    async fn awakeable(&mut self) -> wasmtime::Result<(String, u32)> {
        let d = self.durable()?;
        d.durable(Command::Awakeable).await?;
        let handle = d.journal.issued() - 1;
        Ok((awakeable_id(&d.record.id, handle), handle))
    }

    async fn complete_awakeable(
        &mut self,
        id: String,
        completion: wit::Outcome,
    ) -> wasmtime::Result<()> {
        let d = self.durable()?;
        d.durable(Command::CompleteAwakeable {
            id,
            outcome: from_wit(completion),
        })
        .await
        .map(drop)
    }

    async fn promise_get(&mut self, name: String) -> wasmtime::Result<u32> {
        let d = self.durable()?;
        d.key()?;
        d.durable(Command::GetPromise { name }).await?;
        Ok(d.journal.issued() - 1)
    }

    async fn promise_peek(&mut self, name: String) -> wasmtime::Result<Option<wit::Outcome>> {
        let d = self.durable()?;
        d.key()?;
        match d.durable(Command::PeekPromise { name }).await? {
            Some(CompletionValue::MaybeOutcome(o)) => Ok(o.map(to_wit)),
            other => Err(unexpected("a promise peek", other)),
        }
    }

    async fn promise_complete(
        &mut self,
        name: String,
        completion: wit::Outcome,
    ) -> wasmtime::Result<Result<(), wit::TerminalError>> {
        let d = self.durable()?;
        d.key()?;
        match d
            .durable(Command::CompletePromise {
                name,
                outcome: from_wit(completion),
            })
            .await?
        {
            Some(CompletionValue::Outcome(Outcome::Success(_))) => Ok(Ok(())),
            Some(CompletionValue::Outcome(Outcome::Failure { code, message })) => {
                Ok(Err(wit::TerminalError { code, message }))
            }
            other => Err(unexpected("a promise completion", other)),
        }
    }

    async fn kafka_produce(
        &mut self,
        cluster: String,
        topic: String,
        key: Option<Vec<u8>>,
        value: Vec<u8>,
    ) -> wasmtime::Result<u32> {
        let d = self.durable()?;
        d.durable(Command::Produce {
            cluster,
            topic,
            key,
            value,
        })
        .await?;
        Ok(d.journal.issued() - 1)
    }

    async fn kafka_send(&mut self, record: context::KafkaRecord) -> wasmtime::Result<u32> {
        let d = self.durable()?;
        d.durable(Command::SendRecord(crate::journal::KafkaRecord {
            cluster: record.cluster,
            topic: record.topic,
            partition: record.partition,
            key: record.key,
            value: record.value,
            headers: record
                .headers
                .into_iter()
                .map(|h| (h.name, h.value))
                .collect(),
        }))
        .await?;
        Ok(d.journal.issued() - 1)
    }

    async fn http_call(&mut self, request: context::HttpRequest) -> wasmtime::Result<u32> {
        let d = self.durable()?;
        let request = crate::journal::HttpRequest {
            method: request.method,
            url: request.url,
            headers: request
                .headers
                .into_iter()
                .map(|h| (h.name, h.value))
                .collect(),
            body: request.body,
            timeout_ms: request.timeout_millis,
            max_attempts: request.max_attempts,
        };
        d.durable(Command::HttpCall(request)).await?;
        Ok(d.journal.issued() - 1)
    }

    async fn step_backoff(&mut self, millis: u64) -> wasmtime::Result<()> {
        if self.durable()?.step.is_none() {
            return Err(terminal("step-backoff outside a run step"));
        }
        tokio::time::sleep(Duration::from_millis(millis.min(60_000))).await;
        self.durable()?.clock.mark_waited();
        Ok(())
    }

    async fn await_(&mut self, pending: u32) -> wasmtime::Result<wit::Outcome> {
        let d = self.durable()?;
        if d.step.is_some() {
            return Err(terminal("await inside a run step"));
        }
        d.wait_any(&[pending]).await?;
        d.outcome_of(pending)
    }

    async fn await_any(&mut self, pending: Vec<u32>) -> wasmtime::Result<u32> {
        let d = self.durable()?;
        if pending.is_empty() || d.step.is_some() {
            return Err(terminal("await-any needs handles, outside run steps"));
        }
        Ok(d.wait_any(&pending).await? as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_overlay_shadows_the_store_until_commit() {
        let mut o = StateOverlay::default();
        assert_eq!(o.get("a"), None, "unknown names are read from the store");
        o.apply(
            1,
            &Command::SetState {
                name: "a".into(),
                value: b"1".to_vec(),
            },
        );
        o.apply(1, &Command::ClearState { name: "b".into() });
        assert_eq!(o.get("a"), Some(Some(b"1".to_vec())));
        assert_eq!(o.get("b"), Some(None));
        assert_eq!(o.names(vec!["b".into(), "c".into()]), vec!["a", "c"]);
        o.apply(2, &Command::ClearAllState);
        assert_eq!(o.get("c"), Some(None), "clear-all hides stored values");
        assert_eq!(o.names(vec!["c".into()]), Vec::<String>::new());
    }

    #[test]
    fn retiring_a_fenced_attempt_uncovers_the_writes_below() {
        let mut o = StateOverlay::default();
        let set = |v: &[u8]| Command::SetState {
            name: "n".into(),
            value: v.to_vec(),
        };
        o.apply(1, &set(b"1"));
        o.apply(2, &set(b"2"));
        assert_eq!(o.get("n"), Some(Some(b"2".to_vec())));
        o.retire(2);
        assert_eq!(
            o.get("n"),
            Some(Some(b"1".to_vec())),
            "attempt 1's write stays"
        );
        o.retire(1);
        assert_eq!(o.get("n"), None, "committed: read the store");
    }
}
