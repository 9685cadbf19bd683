//! Inline records: a subscription runs a record's handler before anything
//! about the record is written, the way Kafka Streams processes a record,
//! and writes only the handler's state changes, with the offset that
//! passes the record, in one transaction.
//!
//! Why: a record that becomes an invocation costs about thirteen rows (the
//! invocation, its listing facets, its journal, its expiry), written and
//! later removed, for a handler that often just reads its key's state,
//! writes it and returns (a counter, an aggregate, a per-key state
//! machine). That bookkeeping, not the handler, is most of the host's CPU
//! per record.
//!
//! Lifecycle of a record of a batch (`kafka.inline`, on by default):
//!
//! ```text
//! eligible? ──no──▶ invocation (created with the batch, as before)
//!    │yes
//! key free, or already held by this subscription, nobody waiting for it,
//! and no earlier record of the key in line as an invocation?
//!    │no ──▶ invocation (it queues for its key, behind whoever holds it)
//!    │yes: the subscription holds the key
//! inline attempt (empty journal, in memory; reads and writes its key's
//! state and the clock, nothing else)
//!    ├─ returned ──▶ its writes go in the batch's transaction
//!    ├─ asked for what needs the journal (a step, a call, a send, a
//!    │  sleep, an awakeable, a promise, an outside effect, a write of
//!    │  256 KiB or more) ──▶ refused before it happened; invocation, which
//!    │  runs from the start (a handler that mostly asks for it is then
//!    │  tried inline one record in 32, see `Demand`)
//!    ├─ ran longer than a second ──▶ dropped (it wrote nothing); invocation
//!    └─ failed ──▶ invocation: its retries, dead letter or pause apply
//! later records of a key whose record became an invocation follow it
//! ```
//!
//! Eligible: an exclusive handler of a virtual object, or a service's
//! handler; a record that dedupes by an idempotency key (a record Cairn
//! produced) or that was rejected is not, nor one of another partition's
//! key, nor any while traces are exported (the ingest and attempt spans
//! come from invocations).
//!
//! The rules that keep the guarantees:
//!
//! - **Exactly once.** The writes commit in the transaction that moves the
//!   subscription's progress past the record, or not at all: after a crash
//!   the record is read again and runs again. Its offset reaches the
//!   consumer group after that commit, as every other record's.
//! - **Nothing kept of a failure.** An attempt that did not return leaves
//!   no write anywhere (its overlay layer goes), and what needs the
//!   journal is refused before it happens, so the invocation that takes
//!   over starts from nothing.
//! - **One at a time, in order, per key.** The subscription holds each key
//!   it runs inline ([`crate::keys::KeyQueues::try_hold`], under an id of
//!   its own) until the last batch that used it is durable; a key's inline
//!   records of one batch run one after another. Whatever else arrives for
//!   the key queues behind, and from then on the subscription's records of
//!   that key queue too, until their turn.
//! - **Reads see earlier writes.** An inline attempt writes its layer of
//!   the key's overlay, as a journaled one does; the layer goes when its
//!   batch is durable (or dropped), before the key is let go.
//! - Batches are written one after another (each waits until the
//!   previous batch's job is queued), so each batch's choices see the
//!   previous batch's.
//!
//! What a user sees: an inline record leaves no invocation to list or
//! attach to (its counters are `cairn_inline_records_total`); a record
//! that became an invocation is listed as before.

use crate::fence::Epoch;
use crate::ids::{DeploymentId, InvocationId};
use crate::invoker::{exclusive_slot, InlineEnd, Invoker, Submitted};
use crate::journal::Command;
use crate::keys::KeySlot;
use crate::records::{HandlerKind, InvocationRecord, Status};
use crate::store::{StoreResult, Tables};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A record of a batch, as the batch's transaction writes it.
pub enum Ingested {
    /// It becomes an invocation.
    Invocation(Arc<InvocationRecord>),
    /// It ran inline; these are its state writes (its key's overlay holds
    /// them until they are durable, see [`Settle`]).
    Inline {
        record: Arc<InvocationRecord>,
        writes: Vec<Command>,
    },
}

/// The inline side of one subscription's consumer.
pub struct Inliner {
    invoker: Arc<Invoker>,
    subscription: String,
    enabled: bool,
    /// The id under which this consumer holds keys (unique per consumer,
    /// so a restarted one never mistakes an old one's keys for its own).
    holder: InvocationId,
    /// How often the handler's inline attempts need the journal.
    demand: Mutex<Demand>,
    /// The keys this consumer holds, or has records of in line as
    /// invocations.
    keys: Mutex<HashMap<KeySlot, Held>>,
}

#[derive(Default)]
struct Held {
    /// Batches with inline records of the key that are not durable yet;
    /// the key is held while there are any.
    batches: u32,
    /// Records of the key that run as invocations and are not created
    /// yet: until they are, the key's records queue behind them.
    queued: u32,
}

/// How often a deployment's inline attempts needed the journal lately,
/// which decides whether its records are tried inline: an attempt that
/// needs the journal is wasted up to that point, so a handler that mostly
/// needs it runs as invocations straight away, with one record in
/// [`PROBE`] still tried inline to notice when that changes.
#[derive(Default)]
struct Demand {
    deployment: Option<DeploymentId>,
    /// The share of recent attempts that needed the journal (a moving
    /// average over about ten).
    share: f64,
    /// Records not tried since the last probe.
    skipped: u32,
}

/// While most attempts need the journal, one record in this many is
/// still tried inline.
const PROBE: u32 = 32;

impl Demand {
    /// Whether to try a record of `deployment` inline.
    fn try_inline(&mut self, deployment: &DeploymentId) -> bool {
        if self.deployment.as_ref() != Some(deployment) || self.share <= 0.5 {
            return true;
        }
        self.skipped += 1;
        if self.skipped < PROBE {
            return false;
        }
        self.skipped = 0;
        true
    }

    /// An inline attempt of `deployment` needed the journal, or not.
    fn saw(&mut self, deployment: &DeploymentId, needed: bool) {
        if self.deployment.as_ref() != Some(deployment) {
            *self = Demand {
                deployment: Some(deployment.clone()),
                ..Demand::default()
            };
        }
        self.share = 0.9 * self.share + if needed { 0.1 } else { 0.0 };
    }
}

/// What a batch holds until its transaction is durable: its overlay
/// layers and its keys. Dropping it (after the commit, or with a job that
/// never ran) retires the layers, then lets the keys go.
pub struct Settle {
    layers: Vec<(KeySlot, Epoch)>,
    keys: Arc<HeldKeys>,
}

/// The keys a batch took. Its inline runs share them too, so that a batch
/// dropped early lets them go only once its runs are gone (an aborted run
/// retires its overlay layer as it goes).
struct HeldKeys {
    inliner: Arc<Inliner>,
    slots: Vec<KeySlot>,
}

impl Inliner {
    /// The inline side of `subscription`'s consumer; `enabled` is
    /// `kafka.inline`.
    pub fn new(invoker: Arc<Invoker>, subscription: &str, enabled: bool) -> Arc<Self> {
        let holder = InvocationId::generate(0);
        Arc::new(Inliner {
            invoker,
            subscription: subscription.to_string(),
            enabled,
            holder,
            demand: Mutex::default(),
            keys: Mutex::default(),
        })
    }

    /// Run what can run inline of a batch's new `records` (in order): how
    /// each is to be written, in order, and what the batch holds until then.
    pub async fn run(self: &Arc<Self>, records: Vec<InvocationRecord>) -> (Vec<Ingested>, Settle) {
        let records: Vec<Arc<InvocationRecord>> = records.into_iter().map(Arc::new).collect();
        let mut slots = Vec::new();
        let chains = self.plan(&records, &mut slots);
        let mut settle = Settle {
            layers: Vec::new(),
            keys: Arc::new(HeldKeys {
                inliner: self.clone(),
                slots,
            }),
        };
        let mut planned = vec![false; records.len()];
        for &i in chains.iter().flatten() {
            planned[i] = true;
        }
        let mut runs = tokio::task::JoinSet::new();
        for chain in chains {
            let chain: Vec<_> = chain.into_iter().map(|i| (i, records[i].clone())).collect();
            let (invoker, keys) = (self.invoker.clone(), settle.keys.clone());
            runs.spawn(async move {
                let ends = run_chain(&invoker, chain).await;
                drop(keys);
                ends
            });
        }
        let mut ends: Vec<Option<InlineEnd>> = records.iter().map(|_| None).collect();
        while let Some(done) = runs.join_next().await {
            match done {
                Ok(chain) => chain.into_iter().for_each(|(i, end)| ends[i] = Some(end)),
                // Its records were not run: they become invocations.
                Err(e) => {
                    tracing::error!(subscription = %self.subscription, "an inline run failed: {e}")
                }
            }
        }
        let ingested = self.settle_ends(records, &planned, &mut ends, &mut settle);
        (ingested, settle)
    }

    /// Which records run inline, as chains of indexes (a key's records of
    /// the batch, in order; a service's record alone). Takes the keys
    /// (noted in `slots`) and notes the records of held keys that queue.
    fn plan(&self, records: &[Arc<InvocationRecord>], slots: &mut Vec<KeySlot>) -> Vec<Vec<usize>> {
        let mut chains: Vec<Vec<usize>> = Vec::new();
        let mut chain_of: HashMap<KeySlot, usize> = HashMap::new();
        let mut held = self.keys.lock().unwrap();
        for (i, record) in records.iter().enumerate() {
            let slot = exclusive_slot(record);
            if !self.eligible(record) {
                if let Some(slot) = slot {
                    chain_of.remove(&slot);
                    held.entry(slot).or_default().queued += 1;
                }
                continue;
            }
            let Some(slot) = slot else {
                chains.push(vec![i]);
                continue;
            };
            if let Some(&chain) = chain_of.get(&slot) {
                chains[chain].push(i);
            } else if self.hold(&mut held, &slot) {
                let h = held.entry(slot.clone()).or_default();
                h.batches += 1;
                slots.push(slot.clone());
                chain_of.insert(slot, chains.len());
                chains.push(vec![i]);
            } else {
                held.entry(slot).or_default().queued += 1;
            }
        }
        chains
    }

    /// Whether this consumer holds `slot` now (taking it if it is free):
    /// not while records of it queue as invocations or others wait for it.
    fn hold(&self, held: &mut HashMap<KeySlot, Held>, slot: &KeySlot) -> bool {
        held.get(slot).is_none_or(|h| h.queued == 0)
            && self.invoker.try_hold_key(slot, &self.holder)
    }

    /// Whether `record` may run inline at all.
    fn eligible(&self, record: &InvocationRecord) -> bool {
        self.enabled
            && record.status == Status::Ready
            && record.handler_kind == HandlerKind::Exclusive
            && record.idempotency_key.is_none()
            && record.start_at_ms.is_none()
            && self.demand.lock().unwrap().try_inline(&record.deployment)
            && self.invoker.is_local(&record.id)
            && !crate::traces::Traces::get().enabled()
    }

    /// Turn the inline attempts' `ends` into how each record is written:
    /// a record without a successful end becomes an invocation; one that
    /// was `planned` inline (it failed, or followed a failure in its chain)
    /// queues for its key from now on.
    fn settle_ends(
        &self,
        records: Vec<Arc<InvocationRecord>>,
        planned: &[bool],
        ends: &mut [Option<InlineEnd>],
        settle: &mut Settle,
    ) -> Vec<Ingested> {
        let mut held = self.keys.lock().unwrap();
        let mut demand = self.demand.lock().unwrap();
        let (mut inline, mut journaled) = (0, 0);
        let mut ingested = Vec::with_capacity(records.len());
        for (i, record) in records.into_iter().enumerate() {
            let slot = exclusive_slot(&record);
            match ends[i].take() {
                Some(InlineEnd::Done { epoch, writes }) => {
                    demand.saw(&record.deployment, false);
                    if let Some(slot) = slot {
                        settle.layers.push((slot, epoch));
                    }
                    inline += 1;
                    ingested.push(Ingested::Inline { record, writes });
                    continue;
                }
                Some(InlineEnd::NeedsJournal) => {
                    demand.saw(&record.deployment, true);
                    journaled += 1;
                }
                Some(InlineEnd::Failed) => journaled += 1,
                None => {}
            }
            if let Some(slot) = slot.filter(|_| planned[i]) {
                // Planned inline, but it failed or followed a failure: it
                // queues for its key from now on.
                held.entry(slot).or_default().queued += 1;
            }
            ingested.push(Ingested::Invocation(record));
        }
        let counter = |outcome: &'static str, n: u64| {
            metrics::counter!("cairn_inline_records_total", "subscription" => self.subscription.clone(), "outcome" => outcome)
                .increment(n);
        };
        counter("inline", inline);
        counter("invocation", journaled);
        ingested
    }

    /// The writer the batches go to.
    pub fn committer(&self) -> &crate::commit::Committer {
        self.invoker.committer()
    }

    /// Write `ingested`, in order, inside the batch's transaction: create
    /// the invocations, apply the inline writes. Answers each record's id.
    pub fn write(
        &self,
        t: &mut Tables<'_>,
        ingested: Vec<Ingested>,
    ) -> StoreResult<Vec<Submitted>> {
        let mut submitted = Vec::with_capacity(ingested.len());
        for item in ingested {
            match item {
                Ingested::Inline { record, writes } => {
                    self.invoker.apply_inline(t, &record, &writes)?;
                    submitted.push(Submitted {
                        id: record.id.clone(),
                        existing: false,
                    });
                }
                Ingested::Invocation(record) => {
                    let slot = exclusive_slot(&record);
                    let record = Arc::unwrap_or_clone(record);
                    submitted.push(self.invoker.create_submitted(t, record)?);
                    if let Some(slot) = slot {
                        self.created(&slot);
                    }
                }
            }
        }
        Ok(submitted)
    }

    /// A record of `slot` that queued is now an invocation in its key's
    /// queue (or done), which orders the key's later arrivals.
    fn created(&self, slot: &KeySlot) {
        let mut held = self.keys.lock().unwrap();
        if let Some(h) = held.get_mut(slot) {
            h.queued = h.queued.saturating_sub(1);
            if h.queued == 0 && h.batches == 0 {
                held.remove(slot);
            }
        }
    }
}

/// The longest an inline attempt may take. Its batch waits for it, so a
/// handler that runs longer (a heavy computation) becomes an invocation,
/// which holds up only its key; an inline attempt can be dropped at any
/// point, as it has written nothing.
const INLINE_WALL: std::time::Duration = std::time::Duration::from_secs(1);

/// Run a key's inline records one after another, until one does not
/// succeed (the rest then become invocations after it).
async fn run_chain(
    invoker: &Arc<Invoker>,
    chain: Vec<(usize, Arc<InvocationRecord>)>,
) -> Vec<(usize, InlineEnd)> {
    let mut ends = Vec::with_capacity(chain.len());
    for (i, record) in chain {
        let attempt = invoker.attempt_inline(record);
        // Too slow to run inline counts as needing the journal: the
        // time spent was wasted.
        let end = tokio::time::timeout(INLINE_WALL, attempt)
            .await
            .unwrap_or(InlineEnd::NeedsJournal);
        let done = matches!(end, InlineEnd::Done { .. });
        ends.push((i, end));
        if !done {
            break;
        }
    }
    ends
}

impl Drop for Settle {
    fn drop(&mut self) {
        let invoker = &self.keys.inliner.invoker;
        for (slot, epoch) in self.layers.drain(..) {
            invoker.retire_layer(&slot, epoch);
        }
    }
}

impl Drop for HeldKeys {
    fn drop(&mut self) {
        let invoker = &self.inliner.invoker;
        let mut held = self.inliner.keys.lock().unwrap();
        for slot in self.slots.drain(..) {
            let Some(h) = held.get_mut(&slot) else {
                continue;
            };
            h.batches = h.batches.saturating_sub(1);
            if h.batches == 0 {
                invoker.leave_slot(&slot, 0, &self.inliner.holder);
                if h.queued == 0 {
                    held.remove(&slot);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handler_that_mostly_needs_the_journal_is_tried_inline_only_as_a_probe() {
        let (d1, d2) = (
            DeploymentId::for_module(b"one"),
            DeploymentId::for_module(b"two"),
        );
        let mut demand = Demand::default();
        assert!(demand.try_inline(&d1), "nothing seen yet: tried");
        for _ in 0..7 {
            demand.saw(&d1, true);
        }
        let tried = (0..PROBE * 4).filter(|_| demand.try_inline(&d1)).count();
        assert_eq!(tried, 4, "one in PROBE while most need the journal");
        assert!(demand.try_inline(&d2), "another deployment starts afresh");
        for _ in 0..8 {
            demand.saw(&d1, false);
        }
        assert!(
            (0..PROBE).all(|_| demand.try_inline(&d1)),
            "once most succeed inline, every record is tried again"
        );
    }

    #[test]
    fn a_handler_that_needs_the_journal_now_and_then_stays_inline() {
        let d = DeploymentId::for_module(b"one");
        let mut demand = Demand::default();
        for i in 0..1000 {
            demand.saw(&d, i % 10 == 0);
            assert!(demand.try_inline(&d), "one in ten needing it, at {i}");
        }
    }
}
