//! The durable store: one redb database holding invocations, journals,
//! keyed state, per-key queues, idempotency keys and deployments.
//!
//! Reads go straight to redb (MVCC snapshots, concurrent with the writer).
//! Writes happen only inside the group-commit writer (`commit`), through
//! [`Tables`], so that every change is part of exactly one durable
//! transaction. The table layout is described in `docs/design.md`.

use crate::ids::{DeploymentId, InvocationId};
use crate::journal::{Command, Completion, Entry, Outcome};
use crate::records::{
    ClusterRecord, DeploymentRecord, HandlerKind, InvocationRecord, ScheduleRecord,
    SubscriptionRecord,
};
use redb::{Database, ReadableDatabase, ReadableTable, Table, TableDefinition, WriteTransaction};
use serde::{de::DeserializeOwned, Serialize};
use std::path::Path;

/// id -> postcard(InvocationRecord)
const INVOCATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("invocations");
/// ids of invocations that are not completed (recovery starts from here)
const ACTIVE: TableDefinition<&str, ()> = TableDefinition::new("active");
/// (invocation id, entry index) -> postcard(Entry)
const JOURNAL: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("journal");
/// (service, key, name) -> value
const STATE: TableDefinition<(&str, &str, &str), &[u8]> = TableDefinition::new("state");
/// (service, key, seq) -> invocation id: the queue of exclusive invocations per key
const INBOX: TableDefinition<(&str, &str, u64), &str> = TableDefinition::new("inbox");
/// (target, idempotency key) -> invocation id
const IDEMPOTENCY: TableDefinition<(&str, &str), &str> = TableDefinition::new("idempotency");
/// (expiry ms, invocation id): completed invocations to forget
const EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("expiry");
/// deployment id -> postcard(DeploymentRecord)
const DEPLOYMENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("deployments");
/// deployment id -> component bytes
const MODULES: TableDefinition<&str, &[u8]> = TableDefinition::new("modules");
/// deployment id -> compiled artifact (engine-specific)
const ARTIFACTS: TableDefinition<&str, &[u8]> = TableDefinition::new("artifacts");
/// (wake-up ms, invocation id, command index): pending durable timers
const TIMERS: TableDefinition<(u64, &str, u32), ()> = TableDefinition::new("timers");
/// (invocation id, command index): awakeables not completed yet
const AWAKEABLES: TableDefinition<(&str, u32), ()> = TableDefinition::new("awakeables");
/// (workflow, id, promise name) -> postcard(Outcome): completed promises
const PROMISES: TableDefinition<(&str, &str, &str), &[u8]> = TableDefinition::new("promises");
/// (workflow, id, promise name, invocation id, command index): waiters
const PROMISE_WAITERS: TableDefinition<(&str, &str, &str, &str, u32), ()> =
    TableDefinition::new("promise_waiters");
/// name -> postcard(ClusterRecord)
const KAFKA_CLUSTERS: TableDefinition<&str, &[u8]> = TableDefinition::new("kafka_clusters");
/// id -> postcard(SubscriptionRecord)
const SUBSCRIPTIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("subscriptions");
/// name -> postcard(ScheduleRecord)
const SCHEDULES: TableDefinition<&str, &[u8]> = TableDefinition::new("schedules");
/// scope -> max concurrent attempts (flow control)
const LIMITS: TableDefinition<&str, u64> = TableDefinition::new("limits");
/// counters
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Outside effects (Kafka produce, host HTTP) journaled but not yet
/// answered: `(invocation, command)`. Recovery performs every row again.
const OUTBOX: TableDefinition<(&str, u32), ()> = TableDefinition::new("outbox");
/// Why a subscription stopped on a record (until an operator resumes it).
const SUBSCRIPTION_STOPS: TableDefinition<&str, &str> = TableDefinition::new("subscription_stops");

/// The page cache size used by [`Store::open`] (the config's default).
pub const DEFAULT_CACHE_BYTES: usize = 16 * 1024 * 1024;

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// redb failed (I/O, corruption, a full disk).
    #[error("storage: {0}")]
    Redb(#[from] redb::Error),
    /// A stored record does not decode.
    #[error("corrupt record in {table}: {reason}")]
    Corrupt {
        /// The table holding it.
        table: &'static str,
        /// The decoder's complaint.
        reason: String,
    },
}

impl StoreError {
    fn redb(e: impl Into<redb::Error>) -> Self {
        StoreError::Redb(e.into())
    }
}

/// Result of store operations.
pub type StoreResult<T> = Result<T, StoreError>;

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("records always encode")
}

fn decode<T: DeserializeOwned>(table: &'static str, bytes: &[u8]) -> StoreResult<T> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt {
        table,
        reason: e.to_string(),
    })
}

/// The database, for reads; writes go through [`crate::commit::Committer`].
pub struct Store {
    db: Database,
}

impl Store {
    /// Open (or create) `data_dir/cairn.redb` and its tables, with redb's
    /// default page cache.
    pub fn open(data_dir: &Path) -> StoreResult<Self> {
        Self::open_with_cache(data_dir, DEFAULT_CACHE_BYTES)
    }

    /// Open with a page cache of `cache_bytes`.
    pub fn open_with_cache(data_dir: &Path, cache_bytes: usize) -> StoreResult<Self> {
        std::fs::create_dir_all(data_dir).map_err(StoreError::redb)?;
        let path = data_dir.join("cairn.redb");
        let mut builder = Database::builder();
        builder.set_cache_size(cache_bytes);
        let db = match crate::faults::Faults::from_env() {
            None => builder.create(path),
            Some(faults) => {
                tracing::warn!(?faults, "fault injection is on (CAIRN_FAULTS)");
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(path)
                    .map_err(StoreError::redb)?;
                let backend =
                    crate::faults::FaultyBackend::new(file, faults).map_err(StoreError::redb)?;
                builder.create_with_backend(backend)
            }
        }
        .map_err(StoreError::redb)?;
        let txn = db.begin_write().map_err(StoreError::redb)?;
        drop(Tables::open(&txn)?);
        txn.commit().map_err(StoreError::redb)?;
        Ok(Store { db })
    }

    pub(crate) fn begin_write(&self) -> StoreResult<WriteTransaction> {
        self.db.begin_write().map_err(StoreError::redb)
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, redb::Error>,
    ) -> StoreResult<T> {
        let txn = self.db.begin_read().map_err(StoreError::redb)?;
        f(&txn).map_err(StoreError::Redb)
    }

    /// One invocation.
    pub fn invocation(&self, id: &InvocationId) -> StoreResult<Option<InvocationRecord>> {
        let bytes = self.read(|t| {
            Ok(t.open_table(INVOCATIONS)?
                .get(id.as_str())?
                .map(|v| v.value().to_vec()))
        })?;
        bytes.map(|b| decode("invocations", &b)).transpose()
    }

    /// An invocation's journal: `(entry index, entry)` in order.
    pub fn journal(&self, id: &InvocationId) -> StoreResult<JournalEntries> {
        decode_journal(self.read(|t| journal_in(t, id))?)
    }

    /// An invocation and its journal, read together (one read transaction,
    /// as an attempt starts).
    pub fn invocation_with_journal(
        &self,
        id: &InvocationId,
    ) -> StoreResult<(Option<InvocationRecord>, JournalEntries)> {
        let (record, journal) = self.read(|t| {
            let record = t
                .open_table(INVOCATIONS)?
                .get(id.as_str())?
                .map(|v| v.value().to_vec());
            Ok((record, journal_in(t, id)?))
        })?;
        let record = record.map(|b| decode("invocations", &b)).transpose()?;
        Ok((record, decode_journal(journal)?))
    }

    /// Every pending timer: `(wake-up ms, invocation, command index)`.
    pub fn timers(&self) -> StoreResult<Vec<(u64, InvocationId, u32)>> {
        let rows = self.read(|t| {
            t.open_table(TIMERS)?
                .iter()?
                .map(|row| {
                    let (k, _) = row?;
                    let (at, id, cmd) = k.value();
                    Ok((at, id.to_string(), cmd))
                })
                .collect::<Result<Vec<_>, redb::Error>>()
        })?;
        Ok(rows
            .into_iter()
            .filter_map(|(at, id, cmd)| Some((at, id.parse().ok()?, cmd)))
            .collect())
    }

    /// A workflow promise's outcome, if completed.
    pub fn promise(&self, service: &str, key: &str, name: &str) -> StoreResult<Option<Outcome>> {
        let bytes = self.read(|t| {
            Ok(t.open_table(PROMISES)?
                .get((service, key, name))?
                .map(|v| v.value().to_vec()))
        })?;
        bytes.map(|b| decode("promises", &b)).transpose()
    }

    /// One state value.
    pub fn state(&self, service: &str, key: &str, name: &str) -> StoreResult<Option<Vec<u8>>> {
        self.read(|t| {
            Ok(t.open_table(STATE)?
                .get((service, key, name))?
                .map(|v| v.value().to_vec()))
        })
    }

    /// The names of a key's state values, sorted.
    pub fn state_names(&self, service: &str, key: &str) -> StoreResult<Vec<String>> {
        self.read(|t| state_names_in(&t.open_table(STATE)?, service, key))
    }

    /// How many invocations have not completed, and the `limit` oldest of
    /// them (by creation order), oldest first; one pass that keeps at most
    /// `limit` records in memory.
    pub fn oldest_unfinished(&self, limit: usize) -> StoreResult<(usize, Vec<InvocationRecord>)> {
        struct BySeq(InvocationRecord);
        impl PartialEq for BySeq {
            fn eq(&self, other: &Self) -> bool {
                self.0.seq == other.0.seq
            }
        }
        impl Eq for BySeq {}
        impl PartialOrd for BySeq {
            fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(other))
            }
        }
        impl Ord for BySeq {
            fn cmp(&self, other: &Self) -> std::cmp::Ordering {
                self.0.seq.cmp(&other.0.seq)
            }
        }
        let mut total = 0;
        let mut newest_kept = std::collections::BinaryHeap::new();
        self.for_each_unfinished(|r| {
            total += 1;
            newest_kept.push(BySeq(r));
            if newest_kept.len() > limit {
                newest_kept.pop();
            }
        })?;
        let oldest = newest_kept
            .into_sorted_vec()
            .into_iter()
            .map(|r| r.0)
            .collect();
        Ok((total, oldest))
    }

    /// Visit every invocation that has not completed, in no particular
    /// order, decoding one at a time: one read transaction, and no more
    /// than one record in memory unless `visit` keeps it (a recovery of a
    /// million delayed invocations keeps only their timers).
    pub fn for_each_unfinished(&self, mut visit: impl FnMut(InvocationRecord)) -> StoreResult<()> {
        let txn = self.db.begin_read().map_err(StoreError::redb)?;
        let invocations = txn.open_table(INVOCATIONS).map_err(StoreError::redb)?;
        let active = txn.open_table(ACTIVE).map_err(StoreError::redb)?;
        for row in active.iter().map_err(StoreError::redb)? {
            let (id, _) = row.map_err(StoreError::redb)?;
            if let Some(v) = invocations.get(id.value()).map_err(StoreError::redb)? {
                visit(decode::<InvocationRecord>("invocations", v.value())?);
            }
        }
        Ok(())
    }

    /// The invocation an idempotency key maps to.
    pub fn idempotent(&self, target: &str, key: &str) -> StoreResult<Option<InvocationId>> {
        let id = self.read(|t| {
            Ok(t.open_table(IDEMPOTENCY)?
                .get((target, key))?
                .map(|v| v.value().to_string()))
        })?;
        Ok(id.and_then(|id| id.parse().ok()))
    }

    /// Every deployment, oldest first.
    pub fn deployments(&self) -> StoreResult<Vec<DeploymentRecord>> {
        let raw = self.read(|t| {
            t.open_table(DEPLOYMENTS)?
                .iter()?
                .map(|row| Ok(row?.1.value().to_vec()))
                .collect::<Result<Vec<_>, redb::Error>>()
        })?;
        let mut records = raw
            .iter()
            .map(|b| decode::<DeploymentRecord>("deployments", b))
            .collect::<StoreResult<Vec<_>>>()?;
        records.sort_by_key(|d| d.created_ms);
        Ok(records)
    }

    /// Every registered Kafka cluster.
    pub fn clusters(&self) -> StoreResult<Vec<ClusterRecord>> {
        self.all(KAFKA_CLUSTERS, "kafka_clusters")
    }

    /// Every concurrency limit: `(scope, max)`.
    pub fn limits(&self) -> StoreResult<Vec<(String, u64)>> {
        self.read(|t| {
            t.open_table(LIMITS)?
                .iter()?
                .map(|row| {
                    let (k, v) = row?;
                    Ok((k.value().to_string(), v.value()))
                })
                .collect()
        })
    }

    /// Every cron schedule.
    pub fn schedules(&self) -> StoreResult<Vec<ScheduleRecord>> {
        self.all(SCHEDULES, "schedules")
    }

    /// Every subscription.
    pub fn subscriptions(&self) -> StoreResult<Vec<SubscriptionRecord>> {
        self.all(SUBSCRIPTIONS, "subscriptions")
    }

    fn all<T: DeserializeOwned>(
        &self,
        def: TableDefinition<&str, &[u8]>,
        name: &'static str,
    ) -> StoreResult<Vec<T>> {
        let raw = self.read(|t| {
            t.open_table(def)?
                .iter()?
                .map(|row| Ok(row?.1.value().to_vec()))
                .collect::<Result<Vec<_>, redb::Error>>()
        })?;
        raw.iter().map(|b| decode(name, b)).collect()
    }

    /// A deployment's component bytes.
    pub fn module(&self, id: &DeploymentId) -> StoreResult<Option<Vec<u8>>> {
        self.read(|t| {
            Ok(t.open_table(MODULES)?
                .get(id.as_str())?
                .map(|v| v.value().to_vec()))
        })
    }

    /// A deployment's compiled artifact.
    pub fn artifact(&self, id: &DeploymentId) -> StoreResult<Option<Vec<u8>>> {
        self.read(|t| {
            Ok(t.open_table(ARTIFACTS)?
                .get(id.as_str())?
                .map(|v| v.value().to_vec()))
        })
    }

    /// Completed invocations whose retention ended at or before `now_ms`.
    /// Returns `(expiry, id)` pairs, oldest first, at most `limit`.
    pub fn expired(&self, now_ms: u64, limit: usize) -> StoreResult<Vec<(u64, InvocationId)>> {
        let rows = self.read(|t| {
            t.open_table(EXPIRY)?
                .range((0, "")..(now_ms + 1, ""))?
                .take(limit)
                .map(|row| {
                    let (key, _) = row?;
                    let (at, id) = key.value();
                    Ok((at, id.to_string()))
                })
                .collect::<Result<Vec<_>, redb::Error>>()
        })?;
        Ok(rows
            .into_iter()
            .filter_map(|(at, id)| Some((at, id.parse().ok()?)))
            .collect())
    }
}

impl Store {
    /// Rows per table of what invocations own, for `GET /storage` and the
    /// tests that check retention leaves nothing behind.
    pub fn row_counts(&self) -> StoreResult<Vec<(&'static str, u64)>> {
        use redb::ReadableTableMetadata;
        self.read(|t| {
            Ok(vec![
                ("invocations", t.open_table(INVOCATIONS)?.len()?),
                ("active", t.open_table(ACTIVE)?.len()?),
                ("journal", t.open_table(JOURNAL)?.len()?),
                ("state", t.open_table(STATE)?.len()?),
                ("inbox", t.open_table(INBOX)?.len()?),
                ("idempotency", t.open_table(IDEMPOTENCY)?.len()?),
                ("expiry", t.open_table(EXPIRY)?.len()?),
                ("timers", t.open_table(TIMERS)?.len()?),
                ("awakeables", t.open_table(AWAKEABLES)?.len()?),
                ("promises", t.open_table(PROMISES)?.len()?),
                ("promise_waiters", t.open_table(PROMISE_WAITERS)?.len()?),
                ("outbox", t.open_table(OUTBOX)?.len()?),
            ])
        })
    }

    /// Why subscription `id` stopped, if it did.
    pub fn subscription_stop(&self, id: &str) -> StoreResult<Option<String>> {
        self.read(|t| {
            Ok(t.open_table(SUBSCRIPTION_STOPS)?
                .get(id)?
                .map(|v| v.value().to_string()))
        })
    }

    /// Every outside effect journaled but not answered: `(invocation, command)`.
    pub fn outbox(&self) -> StoreResult<Vec<(InvocationId, u32)>> {
        let rows = self.read(|t| {
            t.open_table(OUTBOX)?
                .iter()?
                .map(|row| {
                    let (k, _) = row?;
                    let (id, cmd) = k.value();
                    Ok((id.to_string(), cmd))
                })
                .collect::<Result<Vec<_>, redb::Error>>()
        })?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, cmd)| Some((id.parse().ok()?, cmd)))
            .collect())
    }
}

/// The `meta` row of a schedule's last fired tick.
fn last_tick_key(schedule: &str) -> String {
    format!("cron-last-tick:{schedule}")
}

/// The raw rows of an invocation's journal, in order.
fn journal_in(t: &redb::ReadTransaction, id: &InvocationId) -> Result<RawJournal, redb::Error> {
    let table = t.open_table(JOURNAL)?;
    let range = table.range((id.as_str(), 0)..=(id.as_str(), u32::MAX))?;
    range
        .map(|row| {
            let (k, v) = row?;
            Ok((k.value().1, v.value().to_vec()))
        })
        .collect()
}

type RawJournal = Vec<(u32, Vec<u8>)>;

/// A journal as read: `(entry index, entry)` in order.
pub type JournalEntries = Vec<(u32, Entry)>;

fn decode_journal(raw: RawJournal) -> StoreResult<JournalEntries> {
    raw.iter()
        .map(|(i, b)| {
            let entry = Entry::decode(b).map_err(|e| StoreError::Corrupt {
                table: "journal",
                reason: e.to_string(),
            })?;
            Ok((*i, entry))
        })
        .collect()
}

fn state_names_in(
    table: &impl ReadableTable<(&'static str, &'static str, &'static str), &'static [u8]>,
    service: &str,
    key: &str,
) -> Result<Vec<String>, redb::Error> {
    // Names sort after "" and before any string starting with a char > '\u{10FFFF}'.
    table
        .range((service, key, "")..=(service, key, "\u{10FFFF}\u{10FFFF}"))?
        .map(|row| Ok(row?.0.value().2.to_string()))
        .collect()
}

/// The tables of one write transaction; every durable change goes through
/// these methods, inside the group-commit writer.
pub struct Tables<'txn> {
    invocations: Table<'txn, &'static str, &'static [u8]>,
    active: Table<'txn, &'static str, ()>,
    journal: Table<'txn, (&'static str, u32), &'static [u8]>,
    state: Table<'txn, (&'static str, &'static str, &'static str), &'static [u8]>,
    inbox: Table<'txn, (&'static str, &'static str, u64), &'static str>,
    idempotency: Table<'txn, (&'static str, &'static str), &'static str>,
    expiry: Table<'txn, (u64, &'static str), ()>,
    deployments: Table<'txn, &'static str, &'static [u8]>,
    modules: Table<'txn, &'static str, &'static [u8]>,
    artifacts: Table<'txn, &'static str, &'static [u8]>,
    timers: Table<'txn, (u64, &'static str, u32), ()>,
    awakeables: Table<'txn, (&'static str, u32), ()>,
    promises: Table<'txn, (&'static str, &'static str, &'static str), &'static [u8]>,
    promise_waiters: Table<'txn, (&'static str, &'static str, &'static str, &'static str, u32), ()>,
    clusters: Table<'txn, &'static str, &'static [u8]>,
    subscriptions: Table<'txn, &'static str, &'static [u8]>,
    schedules: Table<'txn, &'static str, &'static [u8]>,
    limits: Table<'txn, &'static str, u64>,
    meta: Table<'txn, &'static str, u64>,
    outbox: Table<'txn, (&'static str, u32), ()>,
    subscription_stops: Table<'txn, &'static str, &'static str>,
}

impl<'txn> Tables<'txn> {
    /// Open every table in `txn`.
    pub fn open(txn: &'txn WriteTransaction) -> StoreResult<Self> {
        let open = |e| StoreError::redb(e);
        Ok(Tables {
            invocations: txn.open_table(INVOCATIONS).map_err(open)?,
            active: txn.open_table(ACTIVE).map_err(open)?,
            journal: txn.open_table(JOURNAL).map_err(open)?,
            state: txn.open_table(STATE).map_err(open)?,
            inbox: txn.open_table(INBOX).map_err(open)?,
            idempotency: txn.open_table(IDEMPOTENCY).map_err(open)?,
            expiry: txn.open_table(EXPIRY).map_err(open)?,
            deployments: txn.open_table(DEPLOYMENTS).map_err(open)?,
            modules: txn.open_table(MODULES).map_err(open)?,
            artifacts: txn.open_table(ARTIFACTS).map_err(open)?,
            timers: txn.open_table(TIMERS).map_err(open)?,
            awakeables: txn.open_table(AWAKEABLES).map_err(open)?,
            promises: txn.open_table(PROMISES).map_err(open)?,
            promise_waiters: txn.open_table(PROMISE_WAITERS).map_err(open)?,
            clusters: txn.open_table(KAFKA_CLUSTERS).map_err(open)?,
            subscriptions: txn.open_table(SUBSCRIPTIONS).map_err(open)?,
            schedules: txn.open_table(SCHEDULES).map_err(open)?,
            limits: txn.open_table(LIMITS).map_err(open)?,
            meta: txn.open_table(META).map_err(open)?,
            outbox: txn.open_table(OUTBOX).map_err(open)?,
            subscription_stops: txn.open_table(SUBSCRIPTION_STOPS).map_err(open)?,
        })
    }

    /// The next arrival sequence number.
    pub fn next_seq(&mut self) -> StoreResult<u64> {
        let seq = self
            .meta
            .get("seq")
            .map_err(StoreError::redb)?
            .map_or(0, |v| v.value())
            + 1;
        self.meta.insert("seq", seq).map_err(StoreError::redb)?;
        Ok(seq)
    }

    /// One invocation, as of this transaction.
    pub fn invocation(&self, id: &InvocationId) -> StoreResult<Option<InvocationRecord>> {
        let bytes = self
            .invocations
            .get(id.as_str())
            .map_err(StoreError::redb)?;
        bytes.map(|b| decode("invocations", b.value())).transpose()
    }

    /// Insert or replace an invocation record; keeps the active set and the
    /// per-key inbox in step with its status.
    pub fn put_invocation(&mut self, record: &InvocationRecord) -> StoreResult<()> {
        use crate::records::Status;
        let id = record.id.as_str();
        self.invocations
            .insert(id, encode(record).as_slice())
            .map_err(StoreError::redb)?;
        let finished = record.status == Status::Completed;
        if finished {
            self.active.remove(id).map_err(StoreError::redb)?;
        } else {
            self.active.insert(id, ()).map_err(StoreError::redb)?;
        }
        if let (true, Some(key)) = (record.is_exclusive(), &record.target.key) {
            let slot = (record.target.service.as_str(), key.as_str(), record.seq);
            if finished {
                self.inbox.remove(slot).map_err(StoreError::redb)?;
            } else {
                self.inbox.insert(slot, id).map_err(StoreError::redb)?;
            }
        }
        Ok(())
    }

    /// Append a journal entry at the end of the invocation's journal;
    /// returns its index. Only the writer appends, so indexes never clash.
    pub fn append(&mut self, id: &InvocationId, entry: &Entry) -> StoreResult<u32> {
        let index = self
            .journal
            .range((id.as_str(), 0)..=(id.as_str(), u32::MAX))
            .map_err(StoreError::redb)?
            .next_back()
            .transpose()
            .map_err(StoreError::redb)?
            .map_or(0, |(k, _)| k.value().1 + 1);
        self.journal
            .insert((id.as_str(), index), entry.encode().as_slice())
            .map_err(StoreError::redb)?;
        Ok(index)
    }

    /// An invocation's journal, as of this transaction.
    pub fn journal(&self, id: &InvocationId) -> StoreResult<Vec<(u32, Entry)>> {
        let mut entries = Vec::new();
        for row in self
            .journal
            .range((id.as_str(), 0)..=(id.as_str(), u32::MAX))
            .map_err(StoreError::redb)?
        {
            let (k, v) = row.map_err(StoreError::redb)?;
            let entry = Entry::decode(v.value()).map_err(|e| StoreError::Corrupt {
                table: "journal",
                reason: e.to_string(),
            })?;
            entries.push((k.value().1, entry));
        }
        Ok(entries)
    }

    /// Append the completion of command `command` of `id`, unless the
    /// journal already completes it or the invocation is finished (or
    /// forgotten); returns the new entry's index.
    pub fn complete_command(
        &mut self,
        id: &InvocationId,
        completion: Completion,
    ) -> StoreResult<Option<u32>> {
        if self
            .active
            .get(id.as_str())
            .map_err(StoreError::redb)?
            .is_none()
        {
            return Ok(None);
        }
        let done = self
            .journal
            .range((id.as_str(), 0)..=(id.as_str(), u32::MAX))
            .map_err(StoreError::redb)?
            .filter_map(|row| row.ok())
            .any(|(_, v)| matches!(Entry::decode(v.value()), Ok(Entry::Completion(c)) if c.command == completion.command));
        if done {
            return Ok(None);
        }
        self.append(id, &Entry::Completion(completion)).map(Some)
    }

    /// Arm a durable timer.
    pub fn put_timer(&mut self, at_ms: u64, id: &InvocationId, command: u32) -> StoreResult<()> {
        self.timers
            .insert((at_ms, id.as_str(), command), ())
            .map_err(StoreError::redb)?;
        Ok(())
    }

    /// Disarm a timer; `false` if it was not armed (already fired).
    pub fn take_timer(&mut self, at_ms: u64, id: &InvocationId, command: u32) -> StoreResult<bool> {
        Ok(self
            .timers
            .remove((at_ms, id.as_str(), command))
            .map_err(StoreError::redb)?
            .is_some())
    }

    /// Record an outside effect to perform (in its command's transaction).
    pub fn put_outbox(&mut self, id: &InvocationId, command: u32) -> StoreResult<()> {
        self.outbox
            .insert((id.as_str(), command), ())
            .map_err(StoreError::redb)?;
        Ok(())
    }

    /// Take an outside effect out of the outbox (in its answer's
    /// transaction); `false` if it was answered already.
    pub fn take_outbox(&mut self, id: &InvocationId, command: u32) -> StoreResult<bool> {
        Ok(self
            .outbox
            .remove((id.as_str(), command))
            .map_err(StoreError::redb)?
            .is_some())
    }

    /// Register a pending awakeable.
    pub fn put_awakeable(&mut self, id: &InvocationId, command: u32) -> StoreResult<()> {
        self.awakeables
            .insert((id.as_str(), command), ())
            .map_err(StoreError::redb)?;
        Ok(())
    }

    /// Take a pending awakeable; `false` if unknown or already completed.
    pub fn take_awakeable(&mut self, id: &InvocationId, command: u32) -> StoreResult<bool> {
        Ok(self
            .awakeables
            .remove((id.as_str(), command))
            .map_err(StoreError::redb)?
            .is_some())
    }

    /// A workflow promise's outcome, as of this transaction.
    pub fn promise(&self, service: &str, key: &str, name: &str) -> StoreResult<Option<Outcome>> {
        let bytes = self
            .promises
            .get((service, key, name))
            .map_err(StoreError::redb)?;
        bytes.map(|b| decode("promises", b.value())).transpose()
    }

    /// Complete a promise; returns the waiters to complete, or `None` if it
    /// was already completed.
    pub fn complete_promise(
        &mut self,
        service: &str,
        key: &str,
        name: &str,
        outcome: &Outcome,
    ) -> StoreResult<Option<Vec<(InvocationId, u32)>>> {
        if self.promise(service, key, name)?.is_some() {
            return Ok(None);
        }
        self.promises
            .insert((service, key, name), encode(outcome).as_slice())
            .map_err(StoreError::redb)?;
        let mut waiters = Vec::new();
        let range = (service, key, name, "", 0)..=(service, key, name, "\u{10FFFF}", u32::MAX);
        for row in self
            .promise_waiters
            .extract_from_if(range, |_, _| true)
            .map_err(StoreError::redb)?
        {
            let (k, _) = row.map_err(StoreError::redb)?;
            let (_, _, _, id, cmd) = k.value();
            if let Ok(id) = id.parse() {
                waiters.push((id, cmd));
            }
        }
        Ok(Some(waiters))
    }

    /// Wait for a promise.
    pub fn put_promise_waiter(
        &mut self,
        service: &str,
        key: &str,
        name: &str,
        id: &InvocationId,
        command: u32,
    ) -> StoreResult<()> {
        self.promise_waiters
            .insert((service, key, name, id.as_str(), command), ())
            .map_err(StoreError::redb)?;
        Ok(())
    }

    /// Forget a workflow's promises (after its retention).
    pub fn clear_promises(&mut self, service: &str, key: &str) -> StoreResult<()> {
        self.promises
            .retain_in((service, key, "")..=(service, key, "\u{10FFFF}"), |_, _| {
                false
            })
            .map_err(StoreError::redb)?;
        Ok(())
    }

    /// Set a state value.
    pub fn set_state(
        &mut self,
        service: &str,
        key: &str,
        name: &str,
        value: &[u8],
    ) -> StoreResult<()> {
        self.state
            .insert((service, key, name), value)
            .map_err(StoreError::redb)?;
        Ok(())
    }

    /// Remove a state value.
    pub fn clear_state(&mut self, service: &str, key: &str, name: &str) -> StoreResult<()> {
        self.state
            .remove((service, key, name))
            .map_err(StoreError::redb)?;
        Ok(())
    }

    /// Remove every state value of a key.
    pub fn clear_all_state(&mut self, service: &str, key: &str) -> StoreResult<()> {
        let names = state_names_in(&self.state, service, key).map_err(StoreError::Redb)?;
        for name in names {
            self.clear_state(service, key, &name)?;
        }
        Ok(())
    }

    /// The invocation an idempotency key maps to.
    pub fn idempotent(&self, target: &str, key: &str) -> StoreResult<Option<InvocationId>> {
        let id = self
            .idempotency
            .get((target, key))
            .map_err(StoreError::redb)?;
        Ok(id.and_then(|v| v.value().parse().ok()))
    }

    /// Map an idempotency key to an invocation.
    pub fn put_idempotent(
        &mut self,
        target: &str,
        key: &str,
        id: &InvocationId,
    ) -> StoreResult<()> {
        self.idempotency
            .insert((target, key), id.as_str())
            .map_err(StoreError::redb)?;
        Ok(())
    }

    /// Forget a completed invocation at `at_ms`.
    pub fn expire_at(&mut self, at_ms: u64, id: &InvocationId) -> StoreResult<()> {
        self.expiry
            .insert((at_ms, id.as_str()), ())
            .map_err(StoreError::redb)?;
        Ok(())
    }

    /// Delete a completed invocation whose retention ended at `expiry_ms`:
    /// every row it owns (record, journal, idempotency key, the rows of
    /// operations it still waited on, and a workflow's state, promises and
    /// promise waiters). Returns the durable timers it removed, so that the
    /// caller drops them from memory too.
    pub fn forget(&mut self, expiry_ms: u64, id: &InvocationId) -> StoreResult<Vec<(u64, u32)>> {
        self.expiry
            .remove((expiry_ms, id.as_str()))
            .map_err(StoreError::redb)?;
        let Some(record) = self.invocation(id)? else {
            return Ok(Vec::new());
        };
        if let Some(key) = &record.idempotency_key {
            self.idempotency
                .remove((record.target.to_string().as_str(), key.as_str()))
                .map_err(StoreError::redb)?;
        }
        let mut sleeps = Vec::new();
        self.journal
            .retain_in((id.as_str(), 0)..=(id.as_str(), u32::MAX), |_, v| {
                if let Ok(Entry::Command(Command::Sleep { wake_at_ms })) = Entry::decode(v) {
                    sleeps.push(wake_at_ms);
                }
                false
            })
            .map_err(StoreError::redb)?;
        let mut timers = Vec::new();
        for (at, command) in self.timers_of(id, &sleeps)? {
            self.timers
                .remove((at, id.as_str(), command))
                .map_err(StoreError::redb)?;
            timers.push((at, command));
        }
        self.awakeables
            .retain_in((id.as_str(), 0)..=(id.as_str(), u32::MAX), |_, _| false)
            .map_err(StoreError::redb)?;
        self.invocations
            .remove(id.as_str())
            .map_err(StoreError::redb)?;
        if let (HandlerKind::Workflow, Some(key)) = (record.handler_kind, &record.target.key) {
            let (service, key) = (record.target.service.as_str(), key.as_str());
            self.clear_all_state(service, key)?;
            self.clear_promises(service, key)?;
            self.promise_waiters
                .retain_in(
                    (service, key, "", "", 0)
                        ..=(service, key, "\u{10FFFF}", "\u{10FFFF}", u32::MAX),
                    |_, _| false,
                )
                .map_err(StoreError::redb)?;
        }
        Ok(timers)
    }

    /// The armed timers of `id` among the wake-up times `at`.
    fn timers_of(&self, id: &InvocationId, at: &[u64]) -> StoreResult<Vec<(u64, u32)>> {
        let mut found = Vec::new();
        for &ms in at {
            for row in self
                .timers
                .range((ms, id.as_str(), 0)..=(ms, id.as_str(), u32::MAX))
                .map_err(StoreError::redb)?
            {
                let (k, _) = row.map_err(StoreError::redb)?;
                found.push((ms, k.value().2));
            }
        }
        Ok(found)
    }

    /// Store a deployment with its module and compiled artifact.
    pub fn put_deployment(
        &mut self,
        record: &DeploymentRecord,
        module: &[u8],
        artifact: &[u8],
    ) -> StoreResult<()> {
        let id = record.id.as_str();
        self.deployments
            .insert(id, encode(record).as_slice())
            .map_err(StoreError::redb)?;
        self.modules.insert(id, module).map_err(StoreError::redb)?;
        self.artifacts
            .insert(id, artifact)
            .map_err(StoreError::redb)?;
        Ok(())
    }

    /// Register (or replace) a Kafka cluster.
    pub fn put_cluster(&mut self, cluster: &ClusterRecord) -> StoreResult<()> {
        self.clusters
            .insert(cluster.name.as_str(), encode(cluster).as_slice())
            .map_err(StoreError::redb)?;
        Ok(())
    }

    /// Store (or update) a subscription.
    pub fn put_subscription(&mut self, sub: &SubscriptionRecord) -> StoreResult<()> {
        self.subscriptions
            .insert(sub.id.as_str(), encode(sub).as_slice())
            .map_err(StoreError::redb)?;
        Ok(())
    }

    /// Record why subscription `id` stopped (`None`: it runs again).
    pub fn set_subscription_stop(&mut self, id: &str, reason: Option<&str>) -> StoreResult<()> {
        match reason {
            Some(reason) => self.subscription_stops.insert(id, reason).map(drop),
            None => self.subscription_stops.remove(id).map(drop),
        }
        .map_err(StoreError::redb)
    }

    /// Every subscription, as of this transaction.
    pub fn subscriptions(&self) -> StoreResult<Vec<SubscriptionRecord>> {
        let mut all = Vec::new();
        for row in self.subscriptions.iter().map_err(StoreError::redb)? {
            let (_, v) = row.map_err(StoreError::redb)?;
            all.push(decode("subscriptions", v.value())?);
        }
        Ok(all)
    }

    /// Set a concurrency limit.
    pub fn put_limit(&mut self, scope: &str, max: u64) -> StoreResult<()> {
        self.limits.insert(scope, max).map_err(StoreError::redb)?;
        Ok(())
    }

    /// Remove a concurrency limit; `false` if there was none.
    pub fn remove_limit(&mut self, scope: &str) -> StoreResult<bool> {
        Ok(self
            .limits
            .remove(scope)
            .map_err(StoreError::redb)?
            .is_some())
    }

    /// Store (or replace) a schedule.
    pub fn put_schedule(&mut self, schedule: &ScheduleRecord) -> StoreResult<()> {
        self.schedules
            .insert(schedule.name.as_str(), encode(schedule).as_slice())
            .map_err(StoreError::redb)?;
        Ok(())
    }

    /// Delete a schedule; `false` if there was none.
    pub fn remove_schedule(&mut self, name: &str) -> StoreResult<bool> {
        self.meta
            .remove(last_tick_key(name).as_str())
            .map_err(StoreError::redb)?;
        Ok(self
            .schedules
            .remove(name)
            .map_err(StoreError::redb)?
            .is_some())
    }

    /// The last tick (ms) schedule `name` fired, if any.
    pub fn last_tick(&self, name: &str) -> StoreResult<Option<u64>> {
        Ok(self
            .meta
            .get(last_tick_key(name).as_str())
            .map_err(StoreError::redb)?
            .map(|v| v.value()))
    }

    /// Remember that schedule `name` fired its tick `tick_ms`.
    pub fn put_last_tick(&mut self, name: &str, tick_ms: u64) -> StoreResult<()> {
        self.meta
            .insert(last_tick_key(name).as_str(), tick_ms)
            .map_err(StoreError::redb)?;
        Ok(())
    }

    /// Delete a subscription (and its stop reason); `false` if there was none.
    pub fn remove_subscription(&mut self, id: &str) -> StoreResult<bool> {
        self.set_subscription_stop(id, None)?;
        Ok(self
            .subscriptions
            .remove(id)
            .map_err(StoreError::redb)?
            .is_some())
    }

    /// Replace a deployment's compiled artifact (after an engine upgrade).
    pub fn put_artifact(&mut self, id: &DeploymentId, artifact: &[u8]) -> StoreResult<()> {
        self.artifacts
            .insert(id.as_str(), artifact)
            .map_err(StoreError::redb)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{HandlerKind, Status, Target};

    fn with_tables<R>(store: &Store, f: impl FnOnce(&mut Tables<'_>) -> StoreResult<R>) -> R {
        let txn = store.begin_write().unwrap();
        let r = f(&mut Tables::open(&txn).unwrap()).unwrap();
        txn.commit().unwrap();
        r
    }

    fn record(key: &str, kind: HandlerKind) -> InvocationRecord {
        InvocationRecord {
            id: InvocationId::generate(),
            target: Target {
                service: "Counter".into(),
                handler: "add".into(),
                key: Some(key.into()),
            },
            handler_kind: kind,
            deployment: DeploymentId::for_module(b"m"),
            input: b"1".to_vec(),
            headers: vec![],
            idempotency_key: Some("k".into()),
            seq: 0,
            created_ms: 1,
            start_at_ms: None,
            status: Status::Ready,
            attempts: 0,
            last_error: None,
            outcome: None,
            completed_ms: None,
            caller: None,
            cancelled: false,
            source: None,
        }
    }

    #[test]
    fn invocations_move_from_active_to_completed_and_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut a = record("x", HandlerKind::Exclusive);
        let mut b = record("x", HandlerKind::Shared);
        with_tables(&store, |t| {
            a.seq = t.next_seq()?;
            b.seq = t.next_seq()?;
            t.put_invocation(&b)?;
            t.put_invocation(&a)?;
            t.put_idempotent("Counter/x/add", "k", &a.id)?;
            t.append(&a.id, &Entry::Command(Command::GetStateKeys))
        });
        assert_eq!((a.seq, b.seq), (1, 2));
        let (total, oldest) = store.oldest_unfinished(10).unwrap();
        let oldest: Vec<_> = oldest.into_iter().map(|r| r.id).collect();
        assert_eq!(
            (total, oldest),
            (2, vec![a.id.clone(), b.id.clone()]),
            "arrival order"
        );
        let (total, oldest) = store.oldest_unfinished(1).unwrap();
        assert_eq!(
            (total, oldest.len(), &oldest[0].id),
            (2, 1, &a.id),
            "the oldest"
        );
        assert_eq!(
            store.idempotent("Counter/x/add", "k").unwrap(),
            Some(a.id.clone())
        );

        a.status = Status::Completed;
        a.completed_ms = Some(10);
        with_tables(&store, |t| {
            t.put_invocation(&a)?;
            t.expire_at(100, &a.id)
        });
        assert_eq!(store.oldest_unfinished(0).unwrap(), (1, vec![]));
        assert!(store.expired(99, 10).unwrap().is_empty());
        assert_eq!(store.expired(100, 10).unwrap(), vec![(100, a.id.clone())]);
        with_tables(&store, |t| t.forget(100, &a.id));
        assert_eq!(store.invocation(&a.id).unwrap(), None);
        assert!(store.journal(&a.id).unwrap().is_empty());
        assert_eq!(store.idempotent("Counter/x/add", "k").unwrap(), None);
        assert!(store.expired(u64::MAX - 1, 10).unwrap().is_empty());
    }

    #[test]
    fn forgetting_a_workflow_run_clears_its_state_and_promises() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut run = record("w1", HandlerKind::Workflow);
        run.target.service = "Signup".into();
        run.status = Status::Completed;
        let done = Outcome::Success(b"1".to_vec());
        with_tables(&store, |t| {
            t.put_invocation(&run)?;
            t.set_state("Signup", "w1", "stage", b"\"done\"")?;
            t.set_state("Signup", "w2", "stage", b"\"other\"")?;
            t.complete_promise("Signup", "w1", "link", &done)?;
            t.expire_at(5, &run.id)
        });
        assert_eq!(store.promise("Signup", "w1", "link").unwrap(), Some(done));
        with_tables(&store, |t| t.forget(5, &run.id));
        assert!(store.state_names("Signup", "w1").unwrap().is_empty());
        assert_eq!(store.promise("Signup", "w1", "link").unwrap(), None);
        assert_eq!(
            store.state_names("Signup", "w2").unwrap(),
            vec!["stage"],
            "other ids keep theirs"
        );
    }

    #[test]
    fn state_is_per_service_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        with_tables(&store, |t| {
            t.set_state("S", "a", "x", b"1")?;
            t.set_state("S", "a", "y", b"2")?;
            t.set_state("S", "ab", "z", b"3")?;
            t.set_state("T", "a", "x", b"4")
        });
        assert_eq!(store.state_names("S", "a").unwrap(), vec!["x", "y"]);
        assert_eq!(store.state("T", "a", "x").unwrap(), Some(b"4".to_vec()));
        with_tables(&store, |t| t.clear_all_state("S", "a"));
        assert!(store.state_names("S", "a").unwrap().is_empty());
        assert_eq!(store.state_names("S", "ab").unwrap(), vec!["z"]);
        assert_eq!(
            store.state("T", "a", "x").unwrap(),
            Some(b"4".to_vec()),
            "other services keep theirs"
        );
    }

    #[test]
    fn data_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let r = record("x", HandlerKind::Exclusive);
        {
            let store = Store::open(dir.path()).unwrap();
            with_tables(&store, |t| t.put_invocation(&r));
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.invocation(&r.id).unwrap(), Some(r));
    }
}
