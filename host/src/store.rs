//! The durable store: one redb database holding invocations, journals,
//! keyed state, per-key queues, idempotency keys and deployments.
//!
//! Reads go straight to redb (MVCC snapshots, concurrent with the writer).
//! Writes happen only inside the group-commit writer (`commit`), through
//! [`Tables`], so that every change is part of exactly one durable
//! transaction. The table layout is described in `docs/design.md`.

use crate::changelog::{Capture, Change, Logged, Outgoing};
use crate::ids::{DeploymentId, InvocationId};
use crate::journal::{Command, Completion, Entry, Journal, Outcome};
use crate::listing::{Cursor, Filter, Page, SCAN_BUDGET};
use crate::partition::{Message, INPUT_POSITION};
use crate::records::{
    ClusterRecord, DeadLetter, DeploymentRecord, HandlerKind, InvocationRecord, ScheduleRecord,
    SubscriptionRecord,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// Declares the tables: their definitions, the [`Tables`] of a write
/// transaction (each wrapped in [`Logged`] with its changelog id), and how
/// a changelog record is applied.
macro_rules! tables {
    ($($(#[$doc:meta])* $field:ident: $def:ident = $name:literal, $id:expr, <$k:ty, $v:ty>;)*) => {
        $($(#[$doc])* const $def: TableDefinition<$k, $v> = TableDefinition::new($name);)*

        /// The tables of one write transaction; every durable change goes
        /// through these methods, inside the group-commit writer.
        pub struct Tables<'txn> {
            $($field: Logged<'txn, $k, $v>,)*
            capture: Capture,
            /// What this transaction learned of rows it writes again and
            /// again, so that it need not read them back.
            known: Known,
        }

        impl Store {
            /// Every replicated row, as the changes that would create it,
            /// in table and key order: what a compacted changelog holds.
            pub fn snapshot(&self) -> StoreResult<Vec<Change>> {
                let txn = self.db.begin_read().map_err(StoreError::redb)?;
                let mut rows = Vec::new();
                $(if let Some(id) = Option::<u8>::from($id) {
                    let table = txn.open_table($def).map_err(StoreError::redb)?;
                    for row in table.iter().map_err(StoreError::redb)? {
                        let (k, v) = row.map_err(StoreError::redb)?;
                        let mut key = vec![id];
                        key.extend_from_slice(AsRef::<[u8]>::as_ref(&<$k as redb::Value>::as_bytes(&k.value())));
                        let v = v.value();
                        let value = AsRef::<[u8]>::as_ref(&<$v as redb::Value>::as_bytes(&v)).to_vec();
                        rows.push(Change { key, value: Some(value) });
                    }
                })*
                Ok(rows)
            }

            /// Whether any replicated table holds a row (without reading them).
            pub fn holds_replicated_rows(&self) -> StoreResult<bool> {
                use redb::ReadableTableMetadata;
                let txn = self.db.begin_read().map_err(StoreError::redb)?;
                $(if Option::<u8>::from($id).is_some()
                    && !txn.open_table($def).map_err(StoreError::redb)?.is_empty().map_err(StoreError::redb)?
                {
                    return Ok(true);
                })*
                Ok(false)
            }
        }

        impl<'txn> Tables<'txn> {
            /// Open every table in `txn`, recording changes in `capture`.
            pub fn open_capturing(
                txn: &'txn WriteTransaction,
                capture: Capture,
            ) -> StoreResult<Self> {
                Ok(Tables {
                    $($field: Logged::new(
                        txn.open_table($def).map_err(StoreError::redb)?,
                        Option::<u8>::from($id),
                        capture.clone(),
                    ),)*
                    capture,
                    known: Known::default(),
                })
            }

            /// Delete every replicated row (before a restore from scratch).
            pub fn clear_replicated(&mut self) -> StoreResult<()> {
                self.known = Known::default();
                $(if Option::<u8>::from($id).is_some() {
                    self.$field.clear()?;
                })*
                Ok(())
            }

            /// Apply a change read from the changelog.
            pub fn apply(&mut self, change: &Change) -> StoreResult<()> {
                self.apply_change(change, false)
            }

            /// Apply a change copied from another partition's changelog,
            /// recording it in this transaction's.
            pub fn copy(&mut self, change: &Change) -> StoreResult<()> {
                self.apply_change(change, true)
            }

            fn apply_change(&mut self, change: &Change, recorded: bool) -> StoreResult<()> {
                self.known = Known::default(); // a raw row may be one it knows
                let value = change.value.as_deref();
                match Some(change.table()) {
                    $(id if id == Option::<u8>::from($id) => self.$field.apply(change.row(), value, recorded),)*
                    Some(id) if RETIRED.iter().any(|(retired, _)| *retired == id) => Ok(()),
                    _ => Err(StoreError::Corrupt {
                        table: "changelog",
                        reason: format!("unknown table id {}", change.table()),
                    }),
                }
            }
        }
    };
}

tables! {
    /// id -> postcard(InvocationRecord)
    invocations: INVOCATIONS = "invocations", Some(1), <&'static str, &'static [u8]>;
    /// (invocation id, entry index) -> postcard(Entry)
    journal: JOURNAL = "journal", Some(3), <(&'static str, u32), &'static [u8]>;
    /// (service, key, name) -> value
    state: STATE = "state", Some(4), <(&'static str, &'static str, &'static str), &'static [u8]>;
    /// (target, idempotency key) -> invocation id
    idempotency: IDEMPOTENCY = "idempotency", Some(6), <(&'static str, &'static str), &'static str>;
    /// (expiry ms, invocation id): completed invocations to forget
    expiry: EXPIRY = "expiry", Some(7), <(u64, &'static str), ()>;
    /// deployment id -> postcard(DeploymentRecord)
    deployments: DEPLOYMENTS = "deployments", Some(8), <&'static str, &'static [u8]>;
    /// deployment id -> component bytes
    modules: MODULES = "modules", Some(9), <&'static str, &'static [u8]>;
    /// deployment id -> compiled artifact (engine- and CPU-specific, so
    /// local: a host that restores the store compiles the module again)
    artifacts: ARTIFACTS = "artifacts", None, <&'static str, &'static [u8]>;
    /// (wake-up ms, invocation id, command index): pending durable timers
    timers: TIMERS = "timers", Some(10), <(u64, &'static str, u32), ()>;
    /// (invocation id, command index): awakeables not completed yet
    awakeables: AWAKEABLES = "awakeables", Some(11), <(&'static str, u32), ()>;
    /// (invocation id, command index): the commands answered later (calls,
    /// sleeps, awakeables, promises, outside effects) whose completion the
    /// journal holds, so that a delivery is checked with one lookup
    completions: COMPLETIONS = "completions", Some(23), <(&'static str, u32), ()>;
    /// (workflow, id, promise name) -> postcard(Outcome): completed promises
    promises: PROMISES = "promises", Some(12), <(&'static str, &'static str, &'static str), &'static [u8]>;
    /// (workflow, id, promise name, invocation id, command index): waiters
    promise_waiters: PROMISE_WAITERS = "promise_waiters", Some(13),
        <(&'static str, &'static str, &'static str, &'static str, u32), ()>;
    /// name -> postcard(ClusterRecord)
    clusters: KAFKA_CLUSTERS = "kafka_clusters", Some(KAFKA_CLUSTERS_ID), <&'static str, &'static [u8]>;
    /// id -> postcard(SubscriptionRecord)
    subscriptions: SUBSCRIPTIONS = "subscriptions", Some(SUBSCRIPTIONS_ID), <&'static str, &'static [u8]>;
    /// name -> postcard(ScheduleRecord)
    schedules: SCHEDULES = "schedules", Some(16), <&'static str, &'static [u8]>;
    /// scope -> max concurrent attempts (flow control)
    limits: LIMITS = "limits", Some(17), <&'static str, u64>;
    /// counters (the arrival sequence, schedules' last ticks)
    meta: META = "meta", Some(18), <&'static str, u64>;
    /// Outside effects (Kafka produce, host HTTP) journaled but not yet
    /// answered: `(invocation, command)`. Recovery performs every row again.
    outbox: OUTBOX = "outbox", Some(19), <(&'static str, u32), ()>;
    /// Why a subscription stopped on a record (until an operator resumes it).
    subscription_stops: SUBSCRIPTION_STOPS = "subscription_stops", Some(20), <&'static str, &'static str>;
    /// (facet, created ms, invocation id): the listing indexes
    /// (see [`crate::listing`])
    listing: LISTING = "listing", Some(21), <(&'static str, u64, &'static str), ()>;
    /// invocation id -> postcard(DeadLetter): records to produce to a
    /// dead-letter topic, written with the failure, taken once the broker
    /// has them.
    dead_letters: DEAD_LETTERS = "dead_letters", Some(22), <&'static str, &'static [u8]>;
    /// Facts about this host's copy of the store (never replicated): the
    /// changelog position it has applied.
    local: LOCAL = "local", None, <&'static str, u64>;
}

/// Tables that hosts before 2026-11-29 wrote, by changelog id and name
/// (ids are never reused): `active` (the unfinished invocations, which the
/// listing's `status:` facets hold too) and `inbox` (each key's queue of
/// exclusive invocations, which recovery rebuilds from the records'
/// arrival sequence). Opening a store deletes them; their changes in an
/// older changelog are skipped.
const RETIRED: [(u8, &str); 2] = [(2, "active"), (5, "inbox")];

/// The changelog id of the Kafka clusters' table.
const KAFKA_CLUSTERS_ID: u8 = 14;
/// The changelog id of the subscriptions' table (shared: an invocation's
/// partition reads its subscription's failure policy).
const SUBSCRIPTIONS_ID: u8 = 15;

/// Whether rows of table `id` belong to the whole application, not to one
/// partition: partition 0 writes them and sends every change to the other
/// partitions ([`crate::partition`]). Deployments travel as modules
/// instead (each partition compiles them); subscriptions and schedules
/// run on partition 0 only.
pub fn is_shared(id: u8) -> bool {
    id == KAFKA_CLUSTERS_ID || id == SUBSCRIPTIONS_ID
}

/// The `local` row holding the changelog position applied.
const CHANGELOG_NEXT: &str = "changelog_next";
/// The `local` row holding when the copy was last at the head of the log.
const CHANGELOG_AT_HEAD: &str = "changelog_at_head_ms";

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
    pub(crate) fn redb(e: impl Into<redb::Error>) -> Self {
        StoreError::Redb(e.into())
    }
}

/// Result of store operations.
pub type StoreResult<T> = Result<T, StoreError>;

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("records always encode")
}

/// A stored subscription; one written before subscriptions had
/// [`crate::records::Delivery`] settings gets the defaults.
fn decode_subscription(bytes: &[u8]) -> StoreResult<SubscriptionRecord> {
    #[derive(Deserialize)]
    struct Before {
        id: String,
        cluster: String,
        topic: String,
        service: String,
        handler: String,
        options: std::collections::BTreeMap<String, String>,
        paused: bool,
    }
    decode("subscriptions", bytes).or_else(|e| {
        let Ok(b) = postcard::from_bytes::<Before>(bytes) else {
            return Err(e);
        };
        Ok(SubscriptionRecord {
            id: b.id,
            cluster: b.cluster,
            topic: b.topic,
            service: b.service,
            handler: b.handler,
            options: b.options,
            paused: b.paused,
            delivery: Default::default(),
        })
    })
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
    /// The redb file.
    path: std::path::PathBuf,
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
        let file = path.clone();
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
        for (_, name) in RETIRED {
            txn.delete_table(redb::TableDefinition::<(), ()>::new(name))
                .map_err(StoreError::redb)?;
        }
        txn.commit().map_err(StoreError::redb)?;
        Ok(Store { db, path: file })
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

    /// The changelog position this copy of the store holds up to (not
    /// including), and when it was last at the head of the log (ms), if
    /// it was ever written in cluster mode.
    pub fn changelog_position(&self) -> StoreResult<Option<(u64, u64)>> {
        self.read(|t| {
            let local = t.open_table(LOCAL)?;
            let next = local.get(CHANGELOG_NEXT)?.map(|v| v.value());
            let at = local.get(CHANGELOG_AT_HEAD)?.map_or(0, |v| v.value());
            Ok(next.map(|next| (next, at)))
        })
    }

    /// The next offset of this partition's input to apply
    /// ([`crate::partition`]).
    pub fn input_position(&self) -> StoreResult<u64> {
        self.read(|t| {
            let meta = t.open_table(META)?;
            Ok(meta.get(INPUT_POSITION)?.map_or(0, |v| v.value()))
        })
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

    /// Whether an invocation has journaled anything.
    pub fn has_journal(&self, id: &InvocationId) -> StoreResult<bool> {
        self.read(|t| {
            let table = t.open_table(JOURNAL)?;
            let mut range = table.range((id.as_str(), 0)..=(id.as_str(), u32::MAX))?;
            Ok(range.next().is_some())
        })
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

    /// A key's state: `(name, value)`, sorted by name.
    pub fn state_entries(&self, service: &str, key: &str) -> StoreResult<Vec<(String, Vec<u8>)>> {
        self.read(|t| {
            t.open_table(STATE)?
                .range((service, key, "")..=(service, key, "\u{10FFFF}\u{10FFFF}"))?
                .map(|row| {
                    let (k, v) = row?;
                    Ok((k.value().2.to_string(), v.value().to_vec()))
                })
                .collect()
        })
    }

    /// Visit every invocation that has not completed, in no particular
    /// order, decoding one at a time: one read transaction, and no more
    /// than one record in memory unless `visit` keeps it (a recovery of a
    /// million delayed invocations keeps only their timers).
    pub fn for_each_unfinished(&self, mut visit: impl FnMut(InvocationRecord)) -> StoreResult<()> {
        let txn = self.db.begin_read().map_err(StoreError::redb)?;
        let invocations = txn.open_table(INVOCATIONS).map_err(StoreError::redb)?;
        let listing = txn.open_table(LISTING).map_err(StoreError::redb)?;
        visit_unfinished(&listing, |id| {
            if let Some(v) = invocations.get(id).map_err(StoreError::redb)? {
                visit(decode::<InvocationRecord>("invocations", v.value())?);
            }
            Ok(())
        })
    }

    /// How many invocations have not completed.
    pub fn count_unfinished(&self) -> StoreResult<usize> {
        crate::listing::UNFINISHED
            .map(crate::listing::status_facet)
            .iter()
            .map(|facet| self.count_listed(facet))
            .sum()
    }

    /// How many invocations the listing holds under `facet`.
    pub fn count_listed(&self, facet: &str) -> StoreResult<usize> {
        self.read(|t| Ok(t.open_table(LISTING)?.range(facet_rows(facet))?.count()))
    }

    /// The size of the database file, bytes.
    pub fn size_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }

    /// A page of invocations that `filter` and `keep` accept, newest
    /// first, below `cursor` (see [`crate::listing`]).
    pub fn list(
        &self,
        filter: &Filter,
        mut keep: impl FnMut(&InvocationRecord) -> bool,
        limit: usize,
        cursor: Option<&Cursor>,
    ) -> StoreResult<Page> {
        let (after, mut before) = (
            filter.created_after_ms.unwrap_or(0),
            (filter.created_before_ms.unwrap_or(u64::MAX), ""),
        );
        if let Some(c) = cursor.filter(|c| (c.created_ms, c.id.as_str()) < before) {
            before = (c.created_ms, c.id.as_str());
        }
        let mut page = Page::default();
        if before <= (after, "") {
            return Ok(page);
        }
        let txn = self.db.begin_read().map_err(StoreError::redb)?;
        let listing = txn.open_table(LISTING).map_err(StoreError::redb)?;
        let invocations = txn.open_table(INVOCATIONS).map_err(StoreError::redb)?;
        let facets = filter.facets();
        let mut sources = Vec::new();
        for facet in &facets {
            let (low, high) = (
                (facet.as_str(), after, ""),
                (facet.as_str(), before.0, before.1),
            );
            let rows = listing.range(low..high).map_err(StoreError::redb)?;
            sources.push(rows.rev().map(|row| -> StoreResult<Cursor> {
                let (row, _) = row.map_err(StoreError::redb)?;
                let (_, created_ms, id) = row.value();
                Ok(Cursor {
                    created_ms,
                    id: id.to_string(),
                })
            }));
        }
        for (read, last) in crate::listing::newest_first(sources).enumerate() {
            let last = last?;
            if let Some(bytes) = invocations
                .get(last.id.as_str())
                .map_err(StoreError::redb)?
            {
                let record = decode::<InvocationRecord>("invocations", bytes.value())?;
                if filter.matches(&record) && keep(&record) {
                    page.invocations.push(record);
                }
            }
            if page.invocations.len() >= limit || read + 1 >= SCAN_BUDGET {
                page.next = Some(last);
                break;
            }
        }
        Ok(page)
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
        self.values(SUBSCRIPTIONS)?
            .iter()
            .map(|b| decode_subscription(b))
            .collect()
    }

    fn all<T: DeserializeOwned>(
        &self,
        def: TableDefinition<&str, &[u8]>,
        name: &'static str,
    ) -> StoreResult<Vec<T>> {
        self.values(def)?.iter().map(|b| decode(name, b)).collect()
    }

    fn values(&self, def: TableDefinition<&str, &[u8]>) -> StoreResult<Vec<Vec<u8>>> {
        self.read(|t| {
            t.open_table(def)?
                .iter()?
                .map(|row| Ok(row?.1.value().to_vec()))
                .collect::<Result<Vec<_>, redb::Error>>()
        })
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
    /// tests that check retention leaves nothing behind; `active` counts
    /// the unfinished invocations (their listing rows).
    pub fn row_counts(&self) -> StoreResult<Vec<(&'static str, u64)>> {
        use redb::ReadableTableMetadata;
        let active = self.count_unfinished()? as u64;
        self.read(|t| {
            Ok(vec![
                ("invocations", t.open_table(INVOCATIONS)?.len()?),
                ("active", active),
                ("journal", t.open_table(JOURNAL)?.len()?),
                ("state", t.open_table(STATE)?.len()?),
                ("idempotency", t.open_table(IDEMPOTENCY)?.len()?),
                ("expiry", t.open_table(EXPIRY)?.len()?),
                ("timers", t.open_table(TIMERS)?.len()?),
                ("awakeables", t.open_table(AWAKEABLES)?.len()?),
                ("completions", t.open_table(COMPLETIONS)?.len()?),
                ("promises", t.open_table(PROMISES)?.len()?),
                ("promise_waiters", t.open_table(PROMISE_WAITERS)?.len()?),
                ("outbox", t.open_table(OUTBOX)?.len()?),
                ("dead_letters", t.open_table(DEAD_LETTERS)?.len()?),
                ("listing", t.open_table(LISTING)?.len()?),
            ])
        })
    }

    /// How many records subscription `id` ingested (each counted in the
    /// transaction that ingested it, so never twice and never lost in a
    /// crash).
    pub fn ingested(&self, id: &str) -> StoreResult<u64> {
        self.read(|t| {
            let meta = t.open_table(META)?;
            let count = meta
                .get(ingested_key(id).as_str())?
                .map_or(0, |v| v.value());
            Ok(count)
        })
    }

    /// Subscription `id`, if it exists.
    pub fn subscription(&self, id: &str) -> StoreResult<Option<SubscriptionRecord>> {
        let row = self.read(|t| {
            Ok(t.open_table(SUBSCRIPTIONS)?
                .get(id)?
                .map(|v| v.value().to_vec()))
        })?;
        row.map(|v| decode_subscription(&v)).transpose()
    }

    /// Where subscription `id` stands in `topic`/`partition` (see
    /// [`Progress`]); `None` before it ingested a record there.
    pub fn progress(&self, id: &str, topic: &str, partition: i32) -> StoreResult<Option<Progress>> {
        self.read(|t| {
            let meta = t.open_table(META)?;
            let next = meta.get(Mark::Next.key(id, topic, partition).as_str())?;
            let committed = meta.get(Mark::Committed.key(id, topic, partition).as_str())?;
            Ok(next.map(|next| Progress {
                next: next.value() as i64,
                committed: committed.map_or(0, |c| c.value() as i64),
            }))
        })
    }

    /// Whether subscription `id` has a progress row in any partition.
    pub fn has_progress(&self, id: &str) -> StoreResult<bool> {
        let prefix = Mark::Next.prefix(id);
        self.read(|t| {
            let meta = t.open_table(META)?;
            let first = meta.range(prefix.as_str()..)?.next().transpose()?;
            Ok(first.is_some_and(|(k, _)| k.value().starts_with(&prefix)))
        })
    }

    /// The records an operator skipped before subscription `id` ingested
    /// them: `(topic, partition) -> offset`.
    pub fn skips(&self, id: &str) -> StoreResult<HashMap<(String, i32), i64>> {
        let prefix = skip_prefix(id);
        let prefix = prefix.as_str();
        self.read(|t| {
            let meta = t.open_table(META)?;
            let mut skips = HashMap::new();
            for row in meta.range(prefix..)? {
                let (k, v) = row?;
                let Some(rest) = k.value().strip_prefix(prefix) else {
                    break;
                };
                if let Some((topic, p)) = rest.rsplit_once('/') {
                    if let Ok(p) = p.parse() {
                        skips.insert((topic.to_string(), p), v.value() as i64);
                    }
                }
            }
            Ok(skips)
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

    /// Every dead letter not yet produced.
    pub fn dead_letters(&self) -> StoreResult<Vec<(InvocationId, DeadLetter)>> {
        let rows = self.read(|t| {
            t.open_table(DEAD_LETTERS)?
                .iter()?
                .map(|row| {
                    let (k, v) = row?;
                    Ok((k.value().to_string(), v.value().to_vec()))
                })
                .collect::<Result<Vec<_>, redb::Error>>()
        })?;
        rows.into_iter()
            .filter_map(|(id, v)| Some((id.parse().ok()?, v)))
            .map(|(id, v)| Ok((id, decode("dead_letters", &v)?)))
            .collect()
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

/// The `meta` row counting the invocations subscription `id` created.
fn ingested_key(subscription: &str) -> String {
    format!("ingested:{subscription}")
}

/// Rows a write transaction wrote and remembers (see [`Tables::known`]):
/// the hot paths write them many times per transaction, a read each time
/// would cost as much as the write. Only the writer's own methods change
/// them, and they keep these in step.
#[derive(Default)]
struct Known {
    /// The arrival sequence number last handed out.
    seq: Option<u64>,
    /// The next journal index of each invocation this transaction appended to.
    journal_ends: HashMap<String, u32>,
    /// Whether each invocation a completion was delivered to in this
    /// transaction is unfinished: a fan-out's answers arrive by the
    /// hundred per transaction, and reading the caller's record for each
    /// would copy its input every time.
    unfinished: HashMap<String, bool>,
}

/// The two `meta` rows of a subscription's progress in one partition of
/// a topic (see [`Progress`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark {
    /// `kafka-next:{subscription}:{topic}/{partition}`: [`Progress::next`].
    Next,
    /// `kafka-committed:{subscription}:{topic}/{partition}`: [`Progress::committed`].
    Committed,
}

impl Mark {
    /// What the names of this row start with for `subscription`.
    fn prefix(self, subscription: &str) -> String {
        let kind = match self {
            Mark::Next => "next",
            Mark::Committed => "committed",
        };
        format!("kafka-{kind}:{subscription}:")
    }

    /// The row's name for `topic`/`partition`.
    fn key(self, subscription: &str, topic: &str, partition: i32) -> String {
        format!("{}{topic}/{partition}", self.prefix(subscription))
    }
}

/// Where a subscription stands in one partition of a topic. Records are
/// deduplicated by offset, not by a key per record: `next` (the offset
/// after the last record ingested) is written in the transaction that
/// ingests the records, so a record below it was ingested already; and
/// `committed` (the last offset Cairn committed to the consumer group,
/// written after that commit) bounds where a redelivery can start: a
/// record below it means the log itself went back (the topic was deleted
/// and re-created, or the group's offsets were reset).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// The offset after the last record ingested.
    pub next: i64,
    /// The last offset committed to the consumer group (at most `next`).
    pub committed: i64,
}

/// The `meta` row of a record skipped before subscription `id` ingested
/// it (its value is the offset).
fn skip_key(subscription: &str, topic: &str, partition: i32) -> String {
    format!("{}{topic}/{partition}", skip_prefix(subscription))
}

/// What the names of subscription `id`'s skip rows start with.
fn skip_prefix(subscription: &str) -> String {
    format!("skip:{subscription}:")
}

/// The `meta` row of a schedule's last fired tick.
fn last_tick_key(schedule: &str) -> String {
    format!("cron-last-tick:{schedule}")
}

/// Every `listing` row of `facet`, whatever its time and id.
fn facet_rows(facet: &str) -> std::ops::RangeInclusive<(&str, u64, &str)> {
    (facet, 0, "")..=(facet, u64::MAX, "\u{10FFFF}")
}

/// Visit the id of every invocation that has not completed: the rows of
/// the listing's unfinished `status:` facets.
fn visit_unfinished(
    listing: &impl ReadableTable<(&'static str, u64, &'static str), ()>,
    mut visit: impl FnMut(&str) -> StoreResult<()>,
) -> StoreResult<()> {
    for facet in crate::listing::UNFINISHED.map(crate::listing::status_facet) {
        for row in listing
            .range(facet_rows(&facet))
            .map_err(StoreError::redb)?
        {
            visit(row.map_err(StoreError::redb)?.0.value().2)?;
        }
    }
    Ok(())
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

impl<'txn> Tables<'txn> {
    /// Open every table in `txn`, recording nothing.
    pub fn open(txn: &'txn WriteTransaction) -> StoreResult<Self> {
        Self::open_capturing(txn, Capture::off())
    }

    /// The next arrival sequence number.
    pub fn next_seq(&mut self) -> StoreResult<u64> {
        let last = match self.known.seq {
            Some(seq) => seq,
            None => self
                .meta
                .get("seq")
                .map_err(StoreError::redb)?
                .map_or(0, |v| v.value()),
        };
        self.meta.insert("seq", last + 1)?;
        self.known.seq = Some(last + 1);
        Ok(last + 1)
    }

    /// One invocation, as of this transaction.
    pub fn invocation(&self, id: &InvocationId) -> StoreResult<Option<InvocationRecord>> {
        let bytes = self
            .invocations
            .get(id.as_str())
            .map_err(StoreError::redb)?;
        bytes.map(|b| decode("invocations", b.value())).transpose()
    }

    /// Insert or replace an invocation record; keeps its listing rows in
    /// step with it.
    pub fn put_invocation(&mut self, record: &InvocationRecord) -> StoreResult<()> {
        let before = self.invocation(&record.id)?;
        self.put_invocation_over(before.as_ref(), record)
    }

    /// [`Tables::put_invocation`] for a caller that holds the stored
    /// record, as of this transaction (`None`: there is none): the hot
    /// paths, creation and completion, save a read of the record.
    pub fn put_invocation_over(
        &mut self,
        before: Option<&InvocationRecord>,
        record: &InvocationRecord,
    ) -> StoreResult<()> {
        self.index(before, Some(record))?;
        if let Some(unfinished) = self.known.unfinished.get_mut(record.id.as_str()) {
            *unfinished = record.status != crate::records::Status::Completed;
        }
        self.invocations
            .insert(record.id.as_str(), encode(record).as_slice())
    }

    /// Append a journal entry at the end of the invocation's journal;
    /// returns its index. Only the writer appends, so indexes never clash.
    pub fn append(&mut self, id: &InvocationId, entry: &Entry) -> StoreResult<u32> {
        let index = match self.known.journal_ends.get(id.as_str()) {
            Some(&next) => next,
            None => self
                .journal
                .range((id.as_str(), 0)..=(id.as_str(), u32::MAX))
                .map_err(StoreError::redb)?
                .next_back()
                .transpose()
                .map_err(StoreError::redb)?
                .map_or(0, |(k, _)| k.value().1 + 1),
        };
        self.journal
            .insert((id.as_str(), index), entry.encode().as_slice())?;
        self.known
            .journal_ends
            .insert(id.as_str().to_string(), index + 1);
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

    /// Append the completion of command `command` of `id` (a command
    /// answered later), unless the journal already completes it or the
    /// invocation is finished (or forgotten); returns the new entry's
    /// index. The `completions` row, not a read of the journal, says
    /// whether it is completed: a handler that fans out to thousands of
    /// calls would otherwise cost a journal scan per answer, quadratic
    /// work on the writer that every other invocation waits behind.
    pub fn complete_command(
        &mut self,
        id: &InvocationId,
        completion: Completion,
    ) -> StoreResult<Option<u32>> {
        let row = (id.as_str(), completion.command);
        if !self.unfinished(id)?
            || self
                .completions
                .get(row)
                .map_err(StoreError::redb)?
                .is_some()
        {
            return Ok(None);
        }
        self.completions.insert(row, ())?;
        self.append(id, &Entry::Completion(completion)).map(Some)
    }

    /// Whether `id` exists and is not completed, as of this transaction.
    fn unfinished(&mut self, id: &InvocationId) -> StoreResult<bool> {
        if let Some(&unfinished) = self.known.unfinished.get(id.as_str()) {
            return Ok(unfinished);
        }
        let unfinished = self
            .invocation(id)?
            .is_some_and(|r| r.status != crate::records::Status::Completed);
        self.known
            .unfinished
            .insert(id.as_str().to_string(), unfinished);
        Ok(unfinished)
    }

    /// Arm a durable timer.
    pub fn put_timer(&mut self, at_ms: u64, id: &InvocationId, command: u32) -> StoreResult<()> {
        self.timers.insert((at_ms, id.as_str(), command), ())
    }

    /// Disarm a timer; `false` if it was not armed (already fired).
    pub fn take_timer(&mut self, at_ms: u64, id: &InvocationId, command: u32) -> StoreResult<bool> {
        self.timers.remove((at_ms, id.as_str(), command))
    }

    /// Record an outside effect to perform (in its command's transaction).
    pub fn put_outbox(&mut self, id: &InvocationId, command: u32) -> StoreResult<()> {
        self.outbox.insert((id.as_str(), command), ())
    }

    /// Take an outside effect out of the outbox (in its answer's
    /// transaction); `false` if it was answered already.
    pub fn take_outbox(&mut self, id: &InvocationId, command: u32) -> StoreResult<bool> {
        self.outbox.remove((id.as_str(), command))
    }

    /// Record a dead letter to produce (in the failure's transaction).
    pub fn put_dead_letter(&mut self, id: &InvocationId, letter: &DeadLetter) -> StoreResult<()> {
        self.dead_letters
            .insert(id.as_str(), encode(letter).as_slice())
    }

    /// Take a produced dead letter out.
    pub fn take_dead_letter(&mut self, id: &InvocationId) -> StoreResult<bool> {
        self.dead_letters.remove(id.as_str())
    }

    /// The subscription `id`, as of this transaction.
    pub fn subscription(&self, id: &str) -> StoreResult<Option<SubscriptionRecord>> {
        let row = self.subscriptions.get(id).map_err(StoreError::redb)?;
        row.map(|v| decode_subscription(v.value())).transpose()
    }

    /// Register a pending awakeable.
    pub fn put_awakeable(&mut self, id: &InvocationId, command: u32) -> StoreResult<()> {
        self.awakeables.insert((id.as_str(), command), ())
    }

    /// Take a pending awakeable; `false` if unknown or already completed.
    pub fn take_awakeable(&mut self, id: &InvocationId, command: u32) -> StoreResult<bool> {
        self.awakeables.remove((id.as_str(), command))
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
            .insert((service, key, name), encode(outcome).as_slice())?;
        let mut waiters = Vec::new();
        let range = (service, key, name, "", 0)..=(service, key, name, "\u{10FFFF}", u32::MAX);
        self.promise_waiters.retain_in(range, |k, _| {
            let (_, _, _, id, cmd) = k;
            if let Ok(id) = id.parse() {
                waiters.push((id, cmd));
            }
            false
        })?;
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
            .insert((service, key, name, id.as_str(), command), ())?;
        Ok(())
    }

    /// Forget a workflow's promises (after its retention).
    pub fn clear_promises(&mut self, service: &str, key: &str) -> StoreResult<()> {
        self.promises
            .retain_in((service, key, "")..=(service, key, "\u{10FFFF}"), |_, _| {
                false
            })?;
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
        self.state.insert((service, key, name), value)
    }

    /// Remove a state value.
    pub fn clear_state(&mut self, service: &str, key: &str, name: &str) -> StoreResult<()> {
        self.state.remove((service, key, name)).map(drop)
    }

    /// Remove every state value of a key.
    pub fn clear_all_state(&mut self, service: &str, key: &str) -> StoreResult<()> {
        let names = state_names_in(&*self.state, service, key).map_err(StoreError::Redb)?;
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
        self.idempotency.insert((target, key), id.as_str())
    }

    /// Forget a completed invocation at `at_ms`.
    pub fn expire_at(&mut self, at_ms: u64, id: &InvocationId) -> StoreResult<()> {
        self.expiry.insert((at_ms, id.as_str()), ())
    }

    /// Bring the listing of a store written by an older host up to date;
    /// how many invocations it indexed. A store from before the listing
    /// existed has every invocation indexed once (`meta` remembers it); one
    /// from before 2026-11-29 loses its `all` rows (a page of everything
    /// now merges the status facets).
    pub fn upgrade_listing(&mut self) -> StoreResult<u64> {
        const DONE: &str = "listing_indexed";
        self.listing
            .retain_in(facet_rows(crate::listing::RETIRED_FACET), |_, _| false)?;
        if self.meta.get(DONE).map_err(StoreError::redb)?.is_some() {
            return Ok(0);
        }
        let mut indexed = 0;
        for row in self.invocations.iter().map_err(StoreError::redb)? {
            let (_, bytes) = row.map_err(StoreError::redb)?;
            let record = decode::<InvocationRecord>("invocations", bytes.value())?;
            let (created, id) = (record.created_ms, record.id.as_str());
            for facet in crate::listing::facets(&record) {
                self.listing.insert((facet.as_str(), created, id), ())?;
            }
            indexed += 1;
        }
        self.meta.insert(DONE, 1)?;
        Ok(indexed)
    }

    /// Give the unfinished invocations of a store written before the
    /// `completions` table (2026-11-29) their rows: one for each completed
    /// command answered later. Once (`meta` remembers it); how many
    /// invocations it read.
    pub fn upgrade_completions(&mut self) -> StoreResult<u64> {
        const DONE: &str = "completions_marked";
        if self.meta.get(DONE).map_err(StoreError::redb)?.is_some() {
            return Ok(0);
        }
        let mut ids: Vec<InvocationId> = Vec::new();
        visit_unfinished(&*self.listing, |id| {
            let id = id.parse().map_err(|reason| StoreError::Corrupt {
                table: "listing",
                reason,
            })?;
            ids.push(id);
            Ok(())
        })?;
        for id in &ids {
            let journal = Journal::from_entries(self.journal(id)?);
            for (index, command) in journal.commands() {
                if command.is_pending() && journal.completion(index).is_some() {
                    self.completions.insert((id.as_str(), index), ())?;
                }
            }
        }
        self.meta.insert(DONE, 1)?;
        Ok(ids.len() as u64)
    }

    /// Move `record`'s listing rows from what `before` had to what
    /// `after` has (a new record has no `before`; a deleted one no
    /// `after`).
    fn index(
        &mut self,
        before: Option<&InvocationRecord>,
        after: Option<&InvocationRecord>,
    ) -> StoreResult<()> {
        let facets =
            |r: Option<&InvocationRecord>| r.map(crate::listing::facets).unwrap_or_default();
        let (old, new) = (facets(before), facets(after));
        for (record, facets, other, add) in [(before, &old, &new, false), (after, &new, &old, true)]
        {
            let Some(record) = record else { continue };
            let (created, id) = (record.created_ms, record.id.as_str());
            for facet in facets.iter().filter(|f| !other.contains(f)) {
                match add {
                    true => self.listing.insert((facet.as_str(), created, id), ())?,
                    false => self
                        .listing
                        .remove((facet.as_str(), created, id))
                        .map(drop)?,
                }
            }
        }
        Ok(())
    }

    /// Delete a completed invocation whose retention ended at `expiry_ms`
    /// (see [`Tables::purge`]); its timers.
    pub fn forget(&mut self, expiry_ms: u64, id: &InvocationId) -> StoreResult<Vec<(u64, u32)>> {
        self.expiry.remove((expiry_ms, id.as_str()))?;
        match self.invocation(id)? {
            Some(record) => self.purge(&record),
            None => Ok(Vec::new()),
        }
    }

    /// Delete a completed invocation now: every row it owns (record,
    /// listing, journal, idempotency key, the rows of operations it still
    /// waited on, and a workflow's state, promises and promise waiters)
    /// but its expiry row, which retention removes when it comes. Returns
    /// the durable timers it removed, so that the caller drops them from
    /// memory too.
    pub fn purge(&mut self, record: &InvocationRecord) -> StoreResult<Vec<(u64, u32)>> {
        let id = &record.id;
        self.known.journal_ends.remove(id.as_str());
        self.known.unfinished.remove(id.as_str());
        self.index(Some(record), None)?;
        if let Some(key) = &record.idempotency_key {
            self.idempotency
                .remove((record.target.to_string().as_str(), key.as_str()))?;
        }
        let mut sleeps = Vec::new();
        self.journal
            .retain_in((id.as_str(), 0)..=(id.as_str(), u32::MAX), |_, v| {
                if let Ok(Entry::Command(Command::Sleep { wake_at_ms })) = Entry::decode(v) {
                    sleeps.push(wake_at_ms);
                }
                false
            })?;
        let mut timers = Vec::new();
        for (at, command) in self.timers_of(id, &sleeps)? {
            self.timers.remove((at, id.as_str(), command))?;
            timers.push((at, command));
        }
        for rows in [&mut self.awakeables, &mut self.completions] {
            rows.retain_in((id.as_str(), 0)..=(id.as_str(), u32::MAX), |_, _| false)?;
        }
        self.invocations.remove(id.as_str())?;
        if let (HandlerKind::Workflow, Some(key)) = (record.handler_kind, &record.target.key) {
            let (service, key) = (record.target.service.as_str(), key.as_str());
            self.clear_all_state(service, key)?;
            self.clear_promises(service, key)?;
            self.promise_waiters.retain_in(
                (service, key, "", "", 0)..=(service, key, "\u{10FFFF}", "\u{10FFFF}", u32::MAX),
                |_, _| false,
            )?;
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
        self.deployments.insert(id, encode(record).as_slice())?;
        self.modules.insert(id, module)?;
        self.artifacts.insert(id, artifact)
    }

    /// Register (or replace) a Kafka cluster.
    pub fn put_cluster(&mut self, cluster: &ClusterRecord) -> StoreResult<()> {
        self.clusters
            .insert(cluster.name.as_str(), encode(cluster).as_slice())?;
        Ok(())
    }

    /// Store (or update) a subscription.
    pub fn put_subscription(&mut self, sub: &SubscriptionRecord) -> StoreResult<()> {
        self.subscriptions
            .insert(sub.id.as_str(), encode(sub).as_slice())?;
        Ok(())
    }

    /// Record why subscription `id` stopped (`None`: it runs again).
    pub fn set_subscription_stop(&mut self, id: &str, reason: Option<&str>) -> StoreResult<()> {
        match reason {
            Some(reason) => self.subscription_stops.insert(id, reason),
            None => self.subscription_stops.remove(id).map(drop),
        }
    }

    /// Stop subscription `id` on a record: paused, with the reason shown
    /// until an operator resumes it; `false` if there is no such subscription.
    pub fn stop_subscription(&mut self, id: &str, reason: &str) -> StoreResult<bool> {
        let Some(mut sub) = self.subscription(id)? else {
            return Ok(false);
        };
        sub.paused = true;
        self.put_subscription(&sub)?;
        self.set_subscription_stop(id, Some(reason))?;
        Ok(true)
    }

    /// Every subscription, as of this transaction.
    pub fn subscriptions(&self) -> StoreResult<Vec<SubscriptionRecord>> {
        let mut all = Vec::new();
        for row in self.subscriptions.iter().map_err(StoreError::redb)? {
            let (_, v) = row.map_err(StoreError::redb)?;
            all.push(decode_subscription(v.value())?);
        }
        Ok(all)
    }

    /// Set a concurrency limit.
    pub fn put_limit(&mut self, scope: &str, max: u64) -> StoreResult<()> {
        self.limits.insert(scope, max)
    }

    /// Remove a concurrency limit; `false` if there was none.
    pub fn remove_limit(&mut self, scope: &str) -> StoreResult<bool> {
        self.limits.remove(scope)
    }

    /// Store (or replace) a schedule.
    pub fn put_schedule(&mut self, schedule: &ScheduleRecord) -> StoreResult<()> {
        self.schedules
            .insert(schedule.name.as_str(), encode(schedule).as_slice())
    }

    /// Delete a schedule; `false` if there was none.
    pub fn remove_schedule(&mut self, name: &str) -> StoreResult<bool> {
        self.meta.remove(last_tick_key(name).as_str())?;
        self.schedules.remove(name)
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
        self.meta.insert(last_tick_key(name).as_str(), tick_ms)
    }

    /// Remember that the record at `topic`/`partition`@`offset` is to be
    /// skipped when subscription `id` reads it.
    pub fn put_skip(
        &mut self,
        id: &str,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> StoreResult<()> {
        let key = skip_key(id, topic, partition);
        self.meta.insert(key.as_str(), offset as u64)
    }

    /// Subscription `id` ingested `count` more records.
    pub fn count_ingested(&mut self, id: &str, count: u64) -> StoreResult<()> {
        let key = ingested_key(id);
        let before = self.meta.get(key.as_str()).map_err(StoreError::redb)?;
        let before = before.map_or(0, |v| v.value());
        self.meta.insert(key.as_str(), before + count)
    }

    /// Move subscription `id`'s progress row `mark` in
    /// `topic`/`partition` to `offset` ([`Mark::Next`]: every record
    /// below it is ingested; [`Mark::Committed`]: it is committed to the
    /// consumer group).
    pub fn put_progress(
        &mut self,
        mark: Mark,
        (id, topic, partition): (&str, &str, i32),
        offset: i64,
    ) -> StoreResult<()> {
        self.meta
            .insert(mark.key(id, topic, partition).as_str(), offset as u64)
    }

    /// Forget a skip once the record is passed.
    pub fn take_skip(&mut self, id: &str, topic: &str, partition: i32) -> StoreResult<bool> {
        self.meta.remove(skip_key(id, topic, partition).as_str())
    }

    /// Delete a subscription (and its stop reason, count, skips and
    /// progress); `false` if there was none.
    pub fn remove_subscription(&mut self, id: &str) -> StoreResult<bool> {
        self.set_subscription_stop(id, None)?;
        self.meta.remove(ingested_key(id).as_str())?;
        for prefix in [
            skip_prefix(id),
            Mark::Next.prefix(id),
            Mark::Committed.prefix(id),
        ] {
            self.remove_meta_prefix(&prefix)?;
        }
        self.subscriptions.remove(id)
    }

    /// Delete every `meta` row whose name starts with `prefix`.
    fn remove_meta_prefix(&mut self, prefix: &str) -> StoreResult<()> {
        let mut names = Vec::new();
        for row in self.meta.range(prefix..).map_err(StoreError::redb)? {
            let (k, _) = row.map_err(StoreError::redb)?;
            match k.value().starts_with(prefix) {
                true => names.push(k.value().to_string()),
                false => break,
            }
        }
        for name in names {
            self.meta.remove(name.as_str())?;
        }
        Ok(())
    }

    /// Remember that this copy of the store holds the changelog up to
    /// (not including) position `next`, and was last at the head of the
    /// log at `at_head_ms` (0: never, a rebuild in progress).
    pub fn set_changelog_position(&mut self, next: u64, at_head_ms: u64) -> StoreResult<()> {
        self.local.insert(CHANGELOG_NEXT, next)?;
        self.local.insert(CHANGELOG_AT_HEAD, at_head_ms)
    }

    /// Send `message` to partition `partition` with this transaction (it
    /// exists if and only if the transaction commits).
    pub fn send(&mut self, partition: u32, message: &Message) -> StoreResult<()> {
        self.capture.send(Outgoing {
            partition,
            payload: message.encode(),
        })
    }

    /// The next offset of this partition's input (messages applied before
    /// it, in this same history).
    pub fn input_position(&self) -> StoreResult<u64> {
        Ok(self
            .meta
            .get(INPUT_POSITION)
            .map_err(StoreError::redb)?
            .map_or(0, |v| v.value()))
    }

    /// Record that the input up to (not including) `next` is applied.
    pub fn set_input_position(&mut self, next: u64) -> StoreResult<()> {
        self.meta.insert(INPUT_POSITION, next)
    }

    /// Replace a deployment's compiled artifact (after an engine upgrade).
    pub fn put_artifact(&mut self, id: &DeploymentId, artifact: &[u8]) -> StoreResult<()> {
        self.artifacts.insert(id.as_str(), artifact)
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
            id: InvocationId::generate(0),
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
    fn invocations_move_from_unfinished_to_completed_and_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut a = record("x", HandlerKind::Exclusive);
        let mut b = record("x", HandlerKind::Shared);
        let mut paused = record("y", HandlerKind::Exclusive);
        paused.status = Status::Paused;
        with_tables(&store, |t| {
            a.seq = t.next_seq()?;
            b.seq = t.next_seq()?;
            t.put_invocation(&b)?;
            t.put_invocation(&a)?;
            t.put_invocation(&paused)?;
            t.put_idempotent("Counter/x/add", "k", &a.id)?;
            t.append(&a.id, &Entry::Command(Command::GetStateKeys))
        });
        assert_eq!((a.seq, b.seq), (1, 2));
        assert_eq!(listed(&store, "unfinished").len(), 2);
        let unfinished = |store: &Store| {
            let mut ids = Vec::new();
            store.for_each_unfinished(|r| ids.push(r.id)).unwrap();
            ids.sort();
            ids
        };
        let mut all = vec![a.id.clone(), b.id.clone(), paused.id.clone()];
        all.sort();
        assert_eq!(unfinished(&store), all, "recovery visits paused ones too");
        assert_eq!(store.count_unfinished().unwrap(), 3);
        assert_eq!(
            store.idempotent("Counter/x/add", "k").unwrap(),
            Some(a.id.clone())
        );

        a.status = Status::Completed;
        a.outcome = Some(Outcome::Success(b"2".to_vec()));
        a.completed_ms = Some(10);
        with_tables(&store, |t| {
            t.put_invocation(&a)?;
            t.expire_at(100, &a.id)
        });
        assert_eq!(listed(&store, "unfinished"), vec![b.id.clone()]);
        all.retain(|id| *id != a.id);
        assert_eq!(unfinished(&store), all);
        assert_eq!(
            listed(&store, "succeeded"),
            vec![a.id.clone()],
            "re-indexed"
        );
        assert!(store.expired(99, 10).unwrap().is_empty());
        assert_eq!(store.expired(100, 10).unwrap(), vec![(100, a.id.clone())]);
        with_tables(&store, |t| t.forget(100, &a.id));
        assert_eq!(store.invocation(&a.id).unwrap(), None);
        assert!(store.journal(&a.id).unwrap().is_empty());
        assert_eq!(store.idempotent("Counter/x/add", "k").unwrap(), None);
        assert!(store.expired(u64::MAX - 1, 10).unwrap().is_empty());
        assert!(
            listed(&store, "succeeded").is_empty(),
            "its listing rows go"
        );
    }

    /// The completion of command `command`.
    fn answer(command: u32) -> Completion {
        Completion {
            command,
            value: crate::journal::CompletionValue::Outcome(Outcome::Success(b"null".to_vec())),
        }
    }

    fn rows(store: &Store, table: &str) -> u64 {
        let counts = store.row_counts().unwrap();
        counts.into_iter().find(|(t, _)| *t == table).unwrap().1
    }

    #[test]
    fn a_command_is_completed_once_and_its_row_goes_with_the_invocation() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut r = record("x", HandlerKind::Exclusive);
        let sleep = Entry::Command(Command::Sleep { wake_at_ms: 5 });
        let delivered = with_tables(&store, |t| {
            t.put_invocation(&r)?;
            for _ in 0..3 {
                t.append(&r.id, &sleep)?;
            }
            Ok([
                t.complete_command(&r.id, answer(1))?,
                t.complete_command(&r.id, answer(1))?,
            ])
        });
        assert_eq!(delivered, [Some(3), None], "the second delivery is dropped");
        let later = with_tables(&store, |t| t.complete_command(&r.id, answer(1)));
        assert_eq!(later, None, "in a later transaction too");
        let [first, after_the_end] = with_tables(&store, |t| {
            let first = t.complete_command(&r.id, answer(0))?;
            r.status = Status::Completed;
            t.put_invocation(&r)?;
            Ok([first, t.complete_command(&r.id, answer(2))?])
        });
        assert_eq!(first, Some(4), "another command of the journal is its own");
        assert_eq!(
            after_the_end, None,
            "the invocation completed earlier in the same transaction"
        );
        assert_eq!(rows(&store, "completions"), 2);
        with_tables(&store, |t| t.purge(&r));
        assert_eq!(rows(&store, "completions"), 0);
    }

    #[test]
    fn an_older_store_gets_the_rows_of_its_completed_commands_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let r = record("x", HandlerKind::Exclusive);
        let mut done = record("y", HandlerKind::Exclusive);
        done.status = Status::Completed;
        with_tables(&store, |t| {
            for r in [&r, &done] {
                t.put_invocation(r)?;
                t.append(&r.id, &Entry::Command(Command::Awakeable))?;
                // As a host before the completions table wrote it.
                t.append(&r.id, &Entry::Completion(answer(0)))?;
            }
            t.append(&r.id, &Entry::Command(Command::Now))?;
            t.append(&r.id, &Entry::Completion(answer(1)))?;
            t.append(&r.id, &Entry::Command(Command::Awakeable))
        });
        assert_eq!(with_tables(&store, |t| t.upgrade_completions()), 1);
        assert_eq!(
            rows(&store, "completions"),
            1,
            "the unfinished one's awakeable; not its clock reading"
        );
        let [again, open] = with_tables(&store, |t| {
            Ok([
                t.complete_command(&r.id, answer(0))?,
                t.complete_command(&r.id, answer(2))?,
            ])
        });
        assert_eq!((again, open), (None, Some(5)));
        assert_eq!(with_tables(&store, |t| t.upgrade_completions()), 0, "once");
    }

    #[test]
    fn sequence_numbers_and_journal_indexes_go_on_within_and_across_transactions() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (a, b) = (InvocationId::generate(0), InvocationId::generate(0));
        let entry = Entry::Command(Command::GetStateKeys);
        let first = with_tables(&store, |t| {
            let seqs = (t.next_seq()?, t.next_seq()?);
            let indexes = [
                t.append(&a, &entry)?,
                t.append(&b, &entry)?,
                t.append(&a, &entry)?,
            ];
            Ok((seqs, indexes))
        });
        assert_eq!(first, ((1, 2), [0, 0, 1]));
        let second = with_tables(&store, |t| Ok((t.next_seq()?, t.append(&a, &entry)?)));
        assert_eq!(
            second,
            (3, 2),
            "a new transaction reads where the last one ended"
        );
        let purged = record("x", HandlerKind::Exclusive);
        let again = with_tables(&store, |t| {
            t.append(&purged.id, &entry)?;
            t.purge(&purged)?;
            t.append(&purged.id, &entry)
        });
        assert_eq!(again, 0, "a purged journal starts again at 0");
        assert_eq!(store.journal(&a).unwrap().len(), 3);
    }

    #[test]
    fn subscription_progress_is_kept_per_partition_and_goes_with_the_subscription() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.progress("s", "t", 0).unwrap(), None);
        with_tables(&store, |t| {
            t.put_subscription(&SubscriptionRecord {
                id: "s".into(),
                cluster: "c".into(),
                topic: "t".into(),
                service: "A".into(),
                handler: "h".into(),
                options: Default::default(),
                paused: false,
                delivery: Default::default(),
            })?;
            t.put_progress(Mark::Next, ("s", "t", 0), 10)?;
            t.put_progress(Mark::Next, ("s", "t", 1), 4)?;
            t.put_progress(Mark::Committed, ("s", "t", 0), 7)?;
            t.count_ingested("s", 14)
        });
        assert_eq!(
            store.progress("s", "t", 0).unwrap(),
            Some(Progress {
                next: 10,
                committed: 7
            })
        );
        assert_eq!(
            store.progress("s", "t", 1).unwrap(),
            Some(Progress {
                next: 4,
                committed: 0
            })
        );
        assert_eq!(store.ingested("s").unwrap(), 14);
        assert!(store.has_progress("s").unwrap());
        assert!(
            !store.has_progress("t").unwrap(),
            "another subscription has none"
        );
        assert!(with_tables(&store, |t| t.remove_subscription("s")));
        assert!(!store.has_progress("s").unwrap());
        assert_eq!(store.progress("s", "t", 0).unwrap(), None);
        assert_eq!(store.ingested("s").unwrap(), 0);
    }

    /// The ids a filter on status class `class` lists, newest first.
    fn listed(store: &Store, class: &str) -> Vec<InvocationId> {
        let filter = Filter {
            class: Some(class.into()),
            ..Filter::default()
        };
        let page = store.list(&filter, |_| true, 100, None).unwrap();
        page.invocations.into_iter().map(|r| r.id).collect()
    }

    #[test]
    fn a_filtered_page_reads_one_index_and_goes_on_from_its_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut all = Vec::new();
        with_tables(&store, |t| {
            for n in 0..30u64 {
                let mut r = record(&format!("k{}", n % 3), HandlerKind::Exclusive);
                r.created_ms = 1000 + n;
                r.target.handler = if n % 2 == 0 { "add" } else { "get" }.into();
                if n % 5 == 0 {
                    r.status = Status::Paused;
                }
                t.put_invocation(&r)?;
                all.push(r);
            }
            Ok(())
        });
        let filter = Filter {
            service: Some("Counter".into()),
            key: Some("k1".into()),
            handler: Some("add".into()),
            ..Filter::default()
        };
        let mut seen = Vec::new();
        let mut cursor = None;
        for _ in 0..10 {
            let page = store.list(&filter, |_| true, 2, cursor.as_ref()).unwrap();
            seen.extend(page.invocations.iter().map(|r| r.created_ms));
            cursor = page.next;
            if cursor.is_none() {
                break;
            }
        }
        let expected: Vec<u64> = all
            .iter()
            .rev()
            .filter(|r| r.target.key.as_deref() == Some("k1") && r.target.handler == "add")
            .map(|r| r.created_ms)
            .collect();
        assert_eq!(seen, expected, "pages of 2, newest first, none twice");
        assert_eq!(
            listed(&store, "paused").len(),
            6,
            "the status index holds the paused ones"
        );
        let window = Filter {
            created_after_ms: Some(1010),
            created_before_ms: Some(1015),
            ..Filter::default()
        };
        let page = store.list(&window, |_| true, 100, None).unwrap();
        let times: Vec<u64> = page.invocations.iter().map(|r| r.created_ms).collect();
        assert_eq!(
            times,
            [1014, 1013, 1012, 1011, 1010],
            "status facets merged"
        );
        let (mut everything, mut cursor) = (Vec::new(), None);
        for _ in 0..20 {
            let page = store.list(&Filter::default(), |_| true, 4, cursor.as_ref());
            let page = page.unwrap();
            everything.extend(page.invocations.iter().map(|r| r.created_ms));
            cursor = page.next;
            if cursor.is_none() {
                break;
            }
        }
        let newest_first: Vec<u64> = (1000..1030).rev().collect();
        assert_eq!(
            everything, newest_first,
            "every invocation once, across facets"
        );
    }

    #[test]
    fn upgrading_the_listing_drops_the_retired_all_facet() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let r = record("x", HandlerKind::Exclusive);
        let all = crate::listing::RETIRED_FACET;
        with_tables(&store, |t| {
            t.put_invocation(&r)?;
            t.listing.insert((all, r.created_ms, r.id.as_str()), ())
        });
        assert_eq!(store.count_listed(all).unwrap(), 1);
        with_tables(&store, |t| t.upgrade_listing());
        assert_eq!(store.count_listed(all).unwrap(), 0);
        assert_eq!(
            listed(&store, "unfinished"),
            vec![r.id.clone()],
            "the rest stays"
        );
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

    /// A random workload over most write paths, one transaction per round,
    /// with every change captured.
    fn captured_workload(store: &Store, seed: u64) -> Vec<Change> {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut log = Vec::new();
        let mut live: Vec<InvocationRecord> = Vec::new();
        for round in 0..60u64 {
            let txn = store.begin_write().unwrap();
            let capture = Capture::on();
            {
                let t = &mut Tables::open_capturing(&txn, capture.clone()).unwrap();
                let key = format!("k{}", rng.random_range(0..4));
                match rng.random_range(0..8) {
                    0 | 1 => {
                        let mut r = record(&key, HandlerKind::Exclusive);
                        r.seq = t.next_seq().unwrap();
                        t.put_invocation(&r).unwrap();
                        t.put_idempotent("Counter/add", &r.id.to_string(), &r.id)
                            .unwrap();
                        t.put_timer(round, &r.id, 1).unwrap();
                        t.put_awakeable(&r.id, 2).unwrap();
                        live.push(r);
                    }
                    2 if !live.is_empty() => {
                        let r = &live[rng.random_range(0..live.len())];
                        t.append(&r.id, &Entry::Command(Command::GetStateKeys))
                            .unwrap();
                        t.take_awakeable(&r.id, 2).unwrap();
                    }
                    3 => t
                        .set_state("Counter", &key, "n", &round.to_le_bytes())
                        .unwrap(),
                    4 => t.clear_all_state("Counter", &key).unwrap(),
                    5 if !live.is_empty() => {
                        let mut r = live.swap_remove(rng.random_range(0..live.len()));
                        r.status = Status::Completed;
                        t.put_invocation(&r).unwrap();
                        t.expire_at(round, &r.id).unwrap();
                        if rng.random_bool(0.5) {
                            t.forget(round, &r.id).unwrap();
                        }
                    }
                    6 => {
                        let waiter = InvocationId::generate(0);
                        t.put_promise_waiter("Signup", &key, "p", &waiter, 3)
                            .unwrap();
                        t.complete_promise("Signup", &key, "p", &Outcome::Success(vec![1]))
                            .unwrap();
                    }
                    _ => t.clear_promises("Signup", &key).unwrap(),
                }
            }
            log.extend(capture.take().changes);
            txn.commit().unwrap();
        }
        log
    }

    fn restored(changes: &[Change]) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        with_tables(&store, |t| changes.iter().try_for_each(|c| t.apply(c)));
        (dir, store)
    }

    #[test]
    fn a_store_rebuilt_from_its_changelog_holds_the_same_rows() {
        for seed in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path()).unwrap();
            let log = captured_workload(&store, seed);
            let (_d, copy) = restored(&log);
            assert_eq!(
                copy.snapshot().unwrap(),
                store.snapshot().unwrap(),
                "seed {seed}"
            );
            // What a compacted topic keeps: the last change of each key.
            let mut last = std::collections::BTreeMap::new();
            for c in &log {
                last.insert(c.key.clone(), c.clone());
            }
            let compacted: Vec<Change> = last.into_values().collect();
            let (_d, copy) = restored(&compacted);
            assert_eq!(
                copy.snapshot().unwrap(),
                store.snapshot().unwrap(),
                "seed {seed}, compacted"
            );
            // Clearing then applying again gives the same rows as well.
            with_tables(&copy, |t| t.clear_replicated());
            assert!(copy.snapshot().unwrap().is_empty());
            assert!(!copy.holds_replicated_rows().unwrap());
            assert_eq!(
                store.holds_replicated_rows().unwrap(),
                !store.snapshot().unwrap().is_empty()
            );
        }
    }

    #[test]
    fn local_rows_are_not_captured() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let txn = store.begin_write().unwrap();
        let capture = Capture::on();
        {
            let mut t = Tables::open_capturing(&txn, capture.clone()).unwrap();
            t.put_artifact(&DeploymentId::for_module(b"m"), b"native code")
                .unwrap();
            t.set_changelog_position(7, 1).unwrap();
        }
        assert!(capture.take().is_empty());
    }

    #[test]
    fn retired_tables_are_deleted_and_their_changes_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("cairn.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        for (_, name) in RETIRED {
            let mut table = txn
                .open_table(TableDefinition::<&str, ()>::new(name))
                .unwrap();
            table.insert("inv_old", ()).unwrap();
        }
        txn.commit().unwrap();
        drop(db);
        let store = Store::open(dir.path()).unwrap();
        let txn = store.db.begin_read().unwrap();
        let names: Vec<String> = txn
            .list_tables()
            .unwrap()
            .map(|t| redb::TableHandle::name(&t).to_string())
            .collect();
        assert!(RETIRED
            .iter()
            .all(|(_, name)| !names.iter().any(|n| n == name)));
        drop(txn);
        for (id, _) in RETIRED {
            let change = Change {
                key: [&[id][..], b"inv_old"].concat(),
                value: Some(Vec::new()),
            };
            with_tables(&store, |t| t.apply(&change));
        }
        assert!(!store.holds_replicated_rows().unwrap());
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
