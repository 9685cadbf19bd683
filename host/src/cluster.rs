//! Cluster mode: the store replicated through Kafka, so that losing a host
//! (or its disk) loses nothing, and a zombie host cannot write.
//!
//! Why Kafka: teams that run event-driven systems already run a replicated,
//! partitioned log with zombie fencing; Cairn uses it instead of a
//! consensus protocol of its own (`docs/scale-out.md` has the design and
//! the alternatives rejected).
//!
//! Per partition `N` of the application (`crate::partition`):
//!
//! - **Commit.** Every group commit's changes ([`crate::changelog`]) are
//!   written to partition `N` of the compacted topic
//!   `cairn.<app>.changelog` in one Kafka transaction, with the messages
//!   the commit sends to other partitions (to their partitions of
//!   `cairn.<app>.in`); only after the transaction commits does the local
//!   redb transaction commit and do the answers leave the host
//!   ([`KafkaLog`]).
//! - **Messages in.** The owner reads partition `N` of `cairn.<app>.in`
//!   from the position its store holds ([`Inputs`]).
//! - **Fencing.** The transactional id is `cairn.<app>.p<N>`. A host that
//!   takes `N` over calls `init_transactions`, which bumps the producer epoch: a
//!   previous owner that is still alive (paused, partitioned away) fails its
//!   next commit with a fenced error, before its redb or any client sees
//!   the write, and stops.
//! - **Restore.** A host that takes over brings its local copy in line
//!   with the log ([`restore`]): a recent copy applies only the records
//!   after its position, an old or foreign one is rebuilt from the whole
//!   compacted changelog, an empty log is seeded from the local store.
//! - **Hot standbys.** Until then a standby's copy follows the log
//!   ([`Follower`]), so that a takeover applies only a tail.
//!
//! Lifecycle of a partition on a host: [`ensure_topics`] at start →
//! [`Follower`] while standby → [`KafkaLog::open`] (fence) → [`restore`] →
//! the committer appends to the log and [`Inputs`] reads the input while
//! this host owns it → both stopped when the group moves it, and a
//! [`Follower`] again. A failed append is fatal, like a failed fsync in
//! standalone mode.

use crate::changelog::{Captured, Change, Outgoing};
use crate::clock::{Clock, SystemClock};
use crate::commit::Log;
use crate::config::ClusterConfig;
use crate::store::{Store, Tables};
use anyhow::Context as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::error::TrySendError;

/// Largest changelog record (a deployment's module is one record).
const MAX_RECORD_BYTES: usize = 128 * 1024 * 1024;

/// How long the broker holds an empty fetch of a reader following a log.
const FOLLOWING_WAIT: Duration = Duration::from_millis(100);

/// Changes applied per redb transaction while restoring or following.
const RESTORE_BATCH: usize = 10_000;

/// The changelog topic of `app`.
pub fn changelog_topic(app: &str) -> String {
    format!("cairn.{app}.changelog")
}

/// A librdkafka client configuration for the cluster's Kafka.
pub(crate) fn client(config: &ClusterConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.bootstrap);
    for (k, v) in &config.properties {
        client.set(k, v);
    }
    client
}

/// Create the cluster's topics if they do not exist: the changelog, the
/// input topic whose assignment is ownership, and the owners' directory.
/// All compacted but the input, replicated on up to three brokers, two in
/// sync for a write.
pub async fn ensure_topics(config: &ClusterConfig) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = client(config).create()?;
    let brokers = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))
        .context("reaching the cluster's Kafka")?
        .brokers()
        .len() as i32;
    let replicas = brokers.clamp(1, 3);
    let min_isr = (replicas - 1).max(1).to_string();
    let max_bytes = MAX_RECORD_BYTES.to_string();
    let tombstones_kept = TOMBSTONES_KEPT.as_millis().to_string();
    let app = &config.app;
    let names = [
        changelog_topic(app),
        crate::membership::input_topic(app),
        crate::membership::owners_topic(app),
    ];
    let partitions = config.partitions as i32;
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|name| {
            let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(replicas))
                .set("min.insync.replicas", &min_isr)
                .set("max.message.bytes", &max_bytes);
            match name.ends_with(".in") {
                true => topic,
                false => topic
                    .set("cleanup.policy", "compact")
                    .set("delete.retention.ms", &tombstones_kept),
            }
        })
        .collect();
    for result in admin.create_topics(&topics, &AdminOptions::new()).await? {
        match result {
            Ok(topic) => tracing::info!(%topic, replicas, partitions, "created a cluster topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, e)) => anyhow::bail!("creating {topic}: {e}"),
        }
    }
    let metadata = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))
        .context("reaching the cluster's Kafka")?;
    for topic in metadata
        .topics()
        .iter()
        .filter(|t| names.contains(&t.name().to_string()))
    {
        let found = topic.partitions().len() as i32;
        anyhow::ensure!(
            found == partitions,
            "cluster {app:?} was created with {found} partitions ({} has {found}) and this host is \
             configured with cluster.partitions = {partitions}: the count is fixed when the cluster \
             is created",
            topic.name()
        );
    }
    Ok(())
}

/// Tracks the highest offset delivered to the changelog.
struct Delivered(Arc<AtomicI64>);

impl ClientContext for Delivered {}

impl ProducerContext for Delivered {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Ok(message) = result {
            self.0.fetch_max(message.offset(), Ordering::SeqCst);
        }
    }
}

/// The changelog as the committer's [`Log`]: one Kafka transaction per
/// group commit.
pub struct KafkaLog {
    producer: BaseProducer<Delivered>,
    topic: String,
    input: String,
    partition: u32,
    partitions: u32,
    delivered: Arc<AtomicI64>,
    timeout: Duration,
}

impl KafkaLog {
    /// Take partition `partition`'s transactional id over, fencing any
    /// previous owner (the topics exist: [`ensure_topics`] ran at start).
    pub async fn open(config: &ClusterConfig, partition: u32) -> anyhow::Result<Self> {
        let delivered = Arc::new(AtomicI64::new(-1));
        let producer: BaseProducer<Delivered> = client(config)
            .set(
                "transactional.id",
                format!("cairn.{}.p{partition}", config.app),
            )
            .set("linger.ms", "0")
            // A transaction that starts while the broker still writes the
            // previous one's markers is refused (CONCURRENT_TRANSACTIONS)
            // and retried after this backoff; librdkafka's 100 ms default
            // would add up to 100 ms to every commit.
            .set("retry.backoff.ms", "2")
            .set("retry.backoff.max.ms", "20")
            .set("message.max.bytes", MAX_RECORD_BYTES.to_string())
            .set(
                "transaction.timeout.ms",
                config.commit_timeout.as_millis().max(1000).to_string(),
            )
            .create_with_context(Delivered(delivered.clone()))?;
        let timeout = config.commit_timeout;
        let producer = tokio::task::spawn_blocking(move || {
            producer.init_transactions(timeout).map(|()| producer)
        })
        .await?
        .context("taking the changelog's transactional id over")?;
        tracing::info!(app = %config.app, partition, "owner of the partition (previous owners fenced)");
        Ok(KafkaLog {
            producer,
            topic: changelog_topic(&config.app),
            input: crate::membership::input_topic(&config.app),
            partition,
            partitions: config.partitions,
            delivered,
            timeout,
        })
    }

    /// The partition whose changelog this is.
    pub fn partition(&self) -> u32 {
        self.partition
    }

    fn send_change(&self, change: &Change, deadline: Instant) -> Result<(), KafkaError> {
        let mut record = BaseRecord::to(&self.topic)
            .partition(self.partition as i32)
            .key(&change.key);
        if let Some(value) = &change.value {
            record = record.payload(value);
        }
        self.send(record, deadline)
    }

    fn send_message(&self, message: &Outgoing, deadline: Instant) -> Result<(), KafkaError> {
        let record = BaseRecord::<(), _>::to(&self.input)
            .partition(message.partition as i32)
            .payload(&message.payload);
        self.send(record, deadline)
    }

    fn send<K: rdkafka::message::ToBytes + ?Sized, P: rdkafka::message::ToBytes + ?Sized>(
        &self,
        mut record: BaseRecord<'_, K, P>,
        deadline: Instant,
    ) -> Result<(), KafkaError> {
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if Instant::now() < deadline =>
                {
                    record = back;
                    self.producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    /// One transaction with `changes`, within `commit_timeout`. A broker
    /// failing over (a partition leader or the transaction coordinator
    /// moving) is waited out: a commit whose outcome is unknown is retried
    /// as librdkafka asks, and a transaction it can only abort is aborted
    /// (its records are never visible) and written again.
    fn transaction(&self, captured: &Captured) -> Result<(), KafkaError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let attempt = self
                .producer
                .begin_transaction()
                .and_then(|()| {
                    captured
                        .changes
                        .iter()
                        .try_for_each(|c| self.send_change(c, deadline))
                })
                .and_then(|()| {
                    captured
                        .outgoing
                        .iter()
                        .try_for_each(|m| self.send_message(m, deadline))
                })
                .and_then(|()| self.deliver(deadline))
                .and_then(|()| self.commit(deadline));
            match attempt {
                Err(KafkaError::Transaction(e))
                    if e.txn_requires_abort() && !e.is_fatal() && Instant::now() < deadline =>
                {
                    tracing::warn!("the changelog transaction must be written again: {e}");
                    self.producer.abort_transaction(remaining(deadline))?;
                }
                result => return result,
            }
        }
    }

    /// Commit the open transaction, again while its outcome is unknown.
    fn commit(&self, deadline: Instant) -> Result<(), KafkaError> {
        loop {
            match self.producer.commit_transaction(remaining(deadline)) {
                Err(KafkaError::Transaction(e))
                    if e.is_retriable() && Instant::now() < deadline =>
                {
                    tracing::warn!("committing the changelog transaction again: {e}");
                }
                result => return result,
            }
        }
    }

    /// Wait until every record sent is delivered. rdkafka's own flush
    /// polls in 100 ms steps that a delivery does not cut short, which
    /// would add up to 100 ms to every commit.
    fn deliver(&self, deadline: Instant) -> Result<(), KafkaError> {
        while self.producer.in_flight_count() > 0 {
            if Instant::now() >= deadline {
                return Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut));
            }
            self.producer.poll(Duration::from_millis(1));
        }
        Ok(())
    }
}

impl Log for KafkaLog {
    fn append(&mut self, captured: Captured) -> anyhow::Result<u64> {
        let started = Instant::now();
        let result = self.transaction(&captured);
        tracing::debug!(
            partition = self.partition,
            records = captured.changes.len(),
            messages = captured.outgoing.len(),
            took = ?started.elapsed(),
            "changelog transaction"
        );
        if let Err(e) = result {
            let fenced = matches!(
                e.rdkafka_error_code(),
                Some(
                    RDKafkaErrorCode::ProducerFenced
                        | RDKafkaErrorCode::InvalidProducerEpoch
                        | RDKafkaErrorCode::Fenced
                )
            );
            if fenced {
                anyhow::bail!("another host took the changelog over (this host is fenced): {e}");
            }
            anyhow::bail!("the changelog transaction failed: {e}");
        }
        Ok(self.delivered.load(Ordering::SeqCst) as u64 + 1)
    }

    fn sharing_with(&self) -> std::ops::Range<u32> {
        match self.partition {
            0 => 1..self.partitions,
            _ => 0..0,
        }
    }
}

/// What [`restore`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Restored {
    /// The local store already held the whole changelog.
    UpToDate,
    /// The local store was recent enough to apply only what followed it.
    CaughtUp {
        /// Records applied.
        records: usize,
    },
    /// The log was empty: the local store (maybe a standalone one) was
    /// written to it as its first transaction.
    Seeded {
        /// Rows written.
        rows: usize,
    },
    /// The local store was rebuilt from the changelog.
    Rebuilt {
        /// Records applied.
        records: usize,
    },
}

/// How long compaction keeps a tombstone (`delete.retention.ms`, set on
/// the changelog when Cairn creates it).
pub const TOMBSTONES_KEPT: Duration = Duration::from_secs(24 * 3600);

/// Bring the local store in line with the changelog; call after
/// [`KafkaLog::open`] (so no other writer has a transaction open) and
/// before the committer starts.
pub async fn restore(
    store: Arc<Store>,
    log: &mut KafkaLog,
    config: &ClusterConfig,
) -> anyhow::Result<Restored> {
    let reader = Reader::new(config, log.partition(), Until::End)?;
    let deadline = Instant::now() + config.restore_timeout;
    let (low, high) = reader.watermarks()?;
    let position = store.changelog_position()?;
    if high == 0 {
        let rows = store.snapshot()?;
        let count = rows.len();
        anyhow::ensure!(
            count == 0 || config.partitions == 1,
            "the data directory holds a store, and a store can only seed a cluster of one \
             partition (its keys would belong to others): start this host with an empty --data-dir"
        );
        if count > 0 {
            let captured = Captured {
                changes: rows,
                outgoing: Vec::new(),
            };
            let next = tokio::task::block_in_place(|| log.append(captured))?;
            commit_local(&store, |t| {
                t.set_changelog_position(next, SystemClock.now_ms())
            })?;
        }
        return Ok(Restored::Seeded { rows: count });
    }
    if position.is_none() && store.holds_replicated_rows()? {
        anyhow::bail!(
            "the data directory holds a store that was never part of cluster {:?}, and the cluster's \
             changelog is not empty: start this host with an empty --data-dir",
            config.app
        );
    }
    tokio::task::block_in_place(|| match position {
        Some((next, at_head_ms))
            if (low..=high).contains(&(next as i64)) && trusted(at_head_ms, config) =>
        {
            let records = reader.read(&store, Some(next), Until::End, &|| {
                Instant::now() < deadline
            })?;
            Ok(match records {
                0 => Restored::UpToDate,
                records => Restored::CaughtUp { records },
            })
        }
        _ => {
            start_over(&store)?;
            let records = reader.read(&store, None, Until::End, &|| Instant::now() < deadline)?;
            tracing::info!(records, "rebuilt the store from the changelog");
            Ok(Restored::Rebuilt { records })
        }
    })
}

/// A thread that works until told to stop, and is joined then.
struct Worker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Worker {
    /// Run `work` on a thread named `name`; it is given a function that
    /// says whether to go on.
    fn spawn(
        name: String,
        work: impl FnOnce(&dyn Fn() -> bool) + Send + 'static,
    ) -> anyhow::Result<Worker> {
        let stop = Arc::new(AtomicBool::new(false));
        let running = stop.clone();
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || work(&|| !running.load(Ordering::SeqCst)))?;
        Ok(Worker {
            stop,
            thread: Some(thread),
        })
    }

    /// Tell the work to stop; returns once the thread is gone.
    fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A standby's copy of the store following the changelog, so that a
/// takeover applies only the tail (a *hot standby*). Stopped (and joined)
/// before the host takes the partition over.
pub struct Follower(Worker);

impl Follower {
    /// Follow the changelog into `store`: from its position if it is
    /// trusted, else from the beginning. A store that was never part of
    /// the cluster is not touched ([`restore`] refuses it at takeover).
    pub fn start(
        store: Arc<Store>,
        config: &ClusterConfig,
        partition: u32,
    ) -> anyhow::Result<Follower> {
        let reader = Reader::new(config, partition, Until::Stopped)?;
        let config = config.clone();
        let name = format!("cairn-follower-p{partition}");
        Worker::spawn(name, move |following| {
            let followed = follow_from(&store, &config).and_then(|from| match from {
                Some(from) => reader.read(&store, from, Until::Stopped, following),
                None => Ok(0),
            });
            if let Err(e) = followed {
                tracing::warn!("the standby stopped following the changelog: {e:#}");
            }
        })
        .map(Follower)
    }

    /// Stop following; returns once the thread wrote its last batch.
    pub fn stop(self) {
        self.0.stop()
    }
}

/// The reader of a partition's input: the messages other partitions sent
/// it ([`crate::partition`]), committed ones only, from the position its
/// store holds; the engine applies each with that position.
pub struct Inputs(Worker);

/// A message read from a partition's input, with the offset after it.
pub type Input = (u64, Result<crate::partition::Message, String>);

impl Inputs {
    /// Read partition `partition` of the input topic from offset `from`
    /// into `sink` (bounded: a slow engine slows the reader).
    pub fn start(
        config: &ClusterConfig,
        partition: u32,
        from: u64,
        sink: tokio::sync::mpsc::Sender<Input>,
    ) -> anyhow::Result<Inputs> {
        let consumer = committed_reader(config, FOLLOWING_WAIT)?;
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(
            &crate::membership::input_topic(&config.app),
            partition as i32,
            Offset::Offset(from as i64),
        )?;
        consumer.assign(&list)?;
        let name = format!("cairn-input-p{partition}");
        Worker::spawn(name, move |running| {
            read_inputs(&consumer, partition, &sink, running)
        })
        .map(Inputs)
    }

    /// Stop reading; returns once the thread is gone.
    pub fn stop(self) {
        self.0.stop()
    }
}

/// Hand every record of the input to `sink` while `running` says so.
fn read_inputs(
    consumer: &BaseConsumer,
    partition: u32,
    sink: &tokio::sync::mpsc::Sender<Input>,
    running: &dyn Fn() -> bool,
) {
    let mut complaint: Option<String> = None;
    while running() {
        match consumer.poll(Duration::from_millis(100)) {
            None | Some(Err(KafkaError::PartitionEOF(_))) => {}
            Some(Err(e)) => {
                let said = e.to_string();
                if complaint.as_deref() != Some(said.as_str()) {
                    tracing::warn!(partition, "reading the input: {said} (retrying)");
                    complaint = Some(said);
                }
            }
            Some(Ok(m)) => {
                complaint = None;
                let message = crate::partition::Message::decode(m.payload().unwrap_or_default());
                let mut input = (m.offset() as u64 + 1, message);
                // Not `blocking_send`: a full queue must not keep `stop`
                // from returning.
                loop {
                    match sink.try_send(input) {
                        Ok(()) => break,
                        Err(TrySendError::Full(back)) if running() => {
                            input = back;
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        Err(_) => return,
                    }
                }
            }
        }
    }
}

/// Where a standby's copy starts following: its position if it is
/// trusted, else the beginning (after clearing it); `None` (do not touch
/// it) for a store that was never part of the cluster.
fn follow_from(store: &Store, config: &ClusterConfig) -> anyhow::Result<Option<Option<u64>>> {
    match store.changelog_position()? {
        Some((next, at)) if trusted(at, config) => Ok(Some(Some(next))),
        None if store.holds_replicated_rows()? => Ok(None),
        _ => {
            start_over(store)?;
            Ok(Some(None))
        }
    }
}

/// Empty the copy before it is rebuilt from the beginning of the log. Until
/// the rebuild reaches the head, the copy is trusted by nobody (its "at
/// the head" time is 0).
fn start_over(store: &Store) -> anyhow::Result<()> {
    commit_local(store, |t| {
        t.clear_replicated()?;
        t.set_changelog_position(0, 0)
    })
}

/// Whether a copy last at the head of the log at `at_head_ms` may apply
/// only what followed: every delete since is still in the log as a
/// tombstone while it is younger than [`TOMBSTONES_KEPT`], so
/// `cluster.trusted_for` must stay below that. An older copy is rebuilt.
fn trusted(at_head_ms: u64, config: &ClusterConfig) -> bool {
    SystemClock.now_ms().saturating_sub(at_head_ms) < config.trusted_for.as_millis() as u64
}

/// How long a [`Reader`] reads.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Until {
    /// To the end of the log (a restore).
    End,
    /// Until told to stop (a standby following the log).
    Stopped,
}

/// Reads the changelog (committed records only) into a local store.
struct Reader {
    consumer: BaseConsumer,
    topic: String,
    partition: i32,
}

/// A consumer of committed records only, of records up to the largest size.
/// `wait` bounds how long the broker holds a fetch that finds nothing new:
/// short to reach the end of a log fast (a restore), longer for a reader
/// that follows a log (fewer empty fetches).
fn committed_reader(config: &ClusterConfig, wait: Duration) -> anyhow::Result<BaseConsumer> {
    Ok(client(config)
        .set("fetch.wait.max.ms", wait.as_millis().to_string())
        .set("group.id", format!("cairn.{}.restore", config.app))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .set("fetch.max.bytes", MAX_RECORD_BYTES.to_string())
        .set("max.partition.fetch.bytes", MAX_RECORD_BYTES.to_string())
        .set(
            "receive.message.max.bytes",
            (2 * MAX_RECORD_BYTES).to_string(),
        )
        .create()?)
}

impl Reader {
    fn new(config: &ClusterConfig, partition: u32, until: Until) -> anyhow::Result<Self> {
        let wait = match until {
            Until::End => Duration::from_millis(10),
            Until::Stopped => FOLLOWING_WAIT,
        };
        Ok(Reader {
            consumer: committed_reader(config, wait)?,
            topic: changelog_topic(&config.app),
            partition: partition as i32,
        })
    }

    fn watermarks(&self) -> anyhow::Result<(i64, i64)> {
        Ok(self
            .consumer
            .fetch_watermarks(&self.topic, self.partition, Duration::from_secs(10))?)
    }

    /// Apply the records from `from` (the beginning: `None`) until the end
    /// of the log, or as they come while `more` says so; the number
    /// applied. The local position moves with every batch applied; its
    /// "at the head" time only when the end of the log is reached (or,
    /// following, while nothing new came since).
    fn read(
        &self,
        store: &Store,
        from: Option<u64>,
        until: Until,
        more: &dyn Fn() -> bool,
    ) -> anyhow::Result<usize> {
        let until_end = until == Until::End;
        const IDLE: Duration = Duration::from_secs(10);
        let mut list = TopicPartitionList::new();
        let offset = from.map_or(Offset::Beginning, |o| Offset::Offset(o as i64));
        list.add_partition_offset(&self.topic, self.partition, offset)?;
        self.consumer.assign(&list)?;
        let mut next = from.unwrap_or(0);
        let mut at_head = store.changelog_position()?.map_or(0, |(_, at)| at);
        let mut complaint: Option<String> = None;
        let (mut applied, mut batch, mut at_end, mut quiet) =
            (0, Vec::new(), false, Instant::now());
        let mut reached = false;
        loop {
            if !more() {
                anyhow::ensure!(
                    !until_end,
                    "the changelog was not read to its end within cluster.restore_timeout"
                );
                flush(store, &mut batch, next, at_head)?;
                return Ok(applied);
            }
            match self.consumer.poll(Duration::from_millis(200)) {
                None if at_end && quiet.elapsed() > IDLE => {
                    (at_head, quiet) = (SystemClock.now_ms(), Instant::now());
                    flush(store, &mut batch, next, at_head)?;
                }
                None => {}
                Some(Err(KafkaError::PartitionEOF(_))) => {
                    if !reached {
                        tracing::info!(
                            partition = self.partition,
                            records = applied,
                            "the copy reached the head of the changelog"
                        );
                        reached = true;
                    }
                    (at_end, at_head, quiet) = (true, SystemClock.now_ms(), Instant::now());
                    flush(store, &mut batch, next, at_head)?;
                    if until_end {
                        return Ok(applied);
                    }
                }
                // librdkafka retries by itself (a broker failing over);
                // the error is reported once until the next record.
                Some(Err(e)) => {
                    let said = e.to_string();
                    if complaint.as_deref() != Some(said.as_str()) {
                        tracing::warn!("reading the changelog: {said} (retrying)");
                        complaint = Some(said);
                    }
                }
                Some(Ok(m)) => {
                    complaint = None;
                    let key = m.key().filter(|k| !k.is_empty()).ok_or_else(|| {
                        anyhow::anyhow!("changelog record at offset {} has no key", m.offset())
                    })?;
                    batch.push(Change {
                        key: key.to_vec(),
                        value: m.payload().map(<[u8]>::to_vec),
                    });
                    (next, at_end, applied) = (m.offset() as u64 + 1, false, applied + 1);
                    if batch.len() >= RESTORE_BATCH {
                        flush(store, &mut batch, next, at_head)?;
                    }
                }
            }
        }
    }
}

/// Apply `batch` in one local transaction, with the position after it.
fn flush(store: &Store, batch: &mut Vec<Change>, next: u64, at_head_ms: u64) -> anyhow::Result<()> {
    let changes = std::mem::take(batch);
    commit_local(store, move |t| {
        changes.iter().try_for_each(|c| t.apply(c))?;
        t.set_changelog_position(next, at_head_ms)
    })
}

/// The time left until `deadline` (at least a millisecond).
fn remaining(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

/// One local redb transaction (restore runs before the committer starts).
fn commit_local(
    store: &Store,
    f: impl FnOnce(&mut Tables<'_>) -> crate::store::StoreResult<()>,
) -> anyhow::Result<()> {
    let txn = store.begin_write()?;
    f(&mut Tables::open(&txn)?)?;
    txn.commit()?;
    Ok(())
}
