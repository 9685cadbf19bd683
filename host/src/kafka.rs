//! Kafka subscriptions: every record of a topic (of several topics, or of
//! every topic matching a pattern) is handled exactly once by a handler:
//! inline (see [`crate::inline`]) or as a durable invocation.
//!
//! Lifecycle: a subscription (stored in redb) gets one consumer task while
//! it exists and is not paused. The task reads records in batches and
//! writes them *in offset order* (so the per-key queues of virtual objects
//! see a key's records in order, while different keys run concurrently):
//! each record becomes an invocation, or runs inline and leaves only its
//! state writes. A batch is written in one transaction that also moves the
//! subscription's progress in each partition (`next`, the offset after its
//! last record); once that is durable, the offsets are committed to Kafka.
//! A record delivered again after a crash or a rebalance lies below `next`
//! and is passed over: each record handled once, deduplicated by offset the way Kafka
//! Streams keeps its offsets with its state, not by a key per record (which
//! would cost two writes per record and keep every record's invocation for
//! the idempotency retention). See [`Progress`].
//!
//! Nothing is skipped without a trace. A record that cannot become an
//! invocation (its handler was removed by a new deployment, say), or that
//! lies below the offset the subscription already committed (the topic was
//! deleted and re-created, or the group's offsets were reset), stops the
//! subscription on that record: its offset is not committed, the
//! subscription is paused, and the reason is shown (`stopped`) until an
//! operator resumes it. Offsets are committed to the consumer group once
//! their batch is durable, one group commit at a time (the offsets settled
//! meanwhile go with the next); a failed commit is logged and its offsets
//! go with the next one (the records would only be redelivered and passed
//! over).
//!
//! Backpressure: when a subscription's unfinished invocations pass
//! `kafka.max_in_flight`, its partitions are paused until they drain to half
//! of that (the records queued but not yet applied, at most [`PIPELINE`],
//! come on top). Nothing is dropped; the log holds what is not yet ingested.
//!
//! Object keys come from the record's key (default), a header or a JSON
//! pointer into the value (`key`). Record keys that are UTF-8 (and do not
//! start with `hex:`) are used as they are; other keys are written `hex:`
//! followed by the bytes in lower-case hex, which is reversible. A record
//! without that key goes to the empty key, a key of its own, or the
//! dead-letter topic (`null_key`). The handler sees the record's topic,
//! partition, offset, timestamp, key and headers as invocation headers
//! (`x-kafka-*` plus the record's own headers; the SDK's `kafka_record()`).
//!
//! A failed invocation (terminal error, trap, attempts exhausted) does what
//! the subscription's `on_failure` says, in the invoker's `give_up`: pause
//! and stop the subscription on its record (until resumed, or the record
//! skipped: [`Subscriptions::skip`]), or complete and send the original
//! record to the dead-letter topic exactly once ([`dead_letter`],
//! [`Producers::holds`]).
//!
//! Config as code: [`Subscriptions::reconcile`] makes the stored clusters
//! and named subscriptions match `[[kafka.clusters]]` and
//! `[[kafka.subscriptions]]` at start.

use crate::inline::{Ingested, Inliner, Settle};
use crate::invoker::{Invoker, NewInvocation};
use crate::records::{
    ClusterRecord, DeadLetter, Delivery, InvocationRecord, KeySource, NullKey, OnFailure, StartAt,
    SubscriptionRecord, Target,
};
use crate::store::{Mark, Progress, StoreError};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Largest batch of records queued in one job.
const BATCH: usize = 2000;

/// Records a subscription reads and queues before the oldest batch's
/// commit is answered (see [`Ingest::run`]). Counted in records, not
/// batches: at a low rate a batch is a few dozen records, and four such
/// batches held the reader back behind a single slow commit.
const PIPELINE: u32 = 2 * BATCH as u32;

/// A batch of records queued for the writer, to settle once it is durable.
struct Pending {
    /// The new records' positions and ingest spans, in order.
    fresh: Vec<(Position, Option<Traced>)>,
    /// Answers the new records' ids once durable (`None`: the batch
    /// queued no job; `Err` or `Ok(None)`: the partition moved).
    created: Option<Written>,
    /// The offsets to commit to the consumer group then.
    offsets: BTreeMap<(String, i32), i64>,
    /// The batch's room in the pipeline, given back once it is settled.
    _room: tokio::sync::OwnedSemaphorePermit,
}

/// The task that runs a batch inline and writes it (see
/// [`Ingest::write`]); dropping it aborts the task.
struct Written(tokio::task::JoinHandle<Option<Vec<crate::invoker::Submitted>>>);

impl Drop for Written {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a batch's job writes besides its records: each partition's
/// progress past them, and the skip rows of the records skipped.
struct Passed {
    subscription: String,
    next: BTreeMap<(String, i32), i64>,
    skipped: Vec<Position>,
}

/// Why a cluster or subscription request was refused.
#[derive(Debug, thiserror::Error)]
pub enum SubscriptionError {
    /// Malformed request (400).
    #[error("{0}")]
    Invalid(String),
    /// The same source and sink exist already (409).
    #[error("{0}")]
    Duplicate(String),
    /// No such subscription (404).
    #[error("subscription {0} not found")]
    NotFound(String),
    /// The store failed (500).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A subscription as a client (`POST /subscriptions`) or the config file
/// (`[[kafka.subscriptions]]`) describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionSpec {
    /// Its name: config-file subscriptions have one (the file owns them).
    #[serde(default)]
    pub name: Option<String>,
    /// `kafka://cluster/topic`, several topics `kafka://cluster/a,b`, or a
    /// pattern `kafka://cluster/^orders-.*`.
    pub source: String,
    /// `service://Service/handler`.
    pub sink: String,
    /// librdkafka consumer properties.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// The object key: `key` (the record's, the default), `header:NAME` or
    /// `json:/POINTER`.
    #[serde(default)]
    pub key: KeySource,
    /// Records without a key: `empty` (default), `spread` or `dead-letter`.
    #[serde(default)]
    pub null_key: NullKey,
    /// A failed invocation: `pause` or `dead-letter` (the default when
    /// `dead_letter` is set).
    #[serde(default)]
    pub on_failure: Option<OnFailure>,
    /// `kafka://cluster/topic` receiving dead letters.
    #[serde(default)]
    pub dead_letter: Option<String>,
    /// `earliest` (default), `latest` or `timestamp:RFC3339`.
    #[serde(default)]
    pub start_at: StartAt,
}

/// `kafka://cluster/topics` as (cluster, topics).
fn parse_source(source: &str) -> Option<(&str, &str)> {
    source
        .strip_prefix("kafka://")
        .and_then(|s| s.split_once('/'))
        .filter(|(c, t)| {
            !c.is_empty()
                && !t.is_empty()
                && (t.starts_with('^') || !t.split(',').any(|t| t.trim().is_empty()))
        })
}

/// A fresh subscription id, `sub_...`.
fn new_subscription_id() -> String {
    format!("sub_{}", uuid::Uuid::now_v7().simple())
}

/// A client configuration with `cluster`'s properties.
fn client(cluster: &ClusterRecord) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (k, v) in &cluster.properties {
        config.set(k, v);
    }
    config
}

/// Commit the offsets where a new subscription starts (`start_at`
/// `latest` or a timestamp) for its consumer group.
fn start_offsets(
    cluster: &ClusterRecord,
    sub: &SubscriptionRecord,
) -> rdkafka::error::KafkaResult<()> {
    let timeout = Duration::from_secs(10);
    let consumer: rdkafka::consumer::BaseConsumer = client(cluster)
        .set("group.id", format!("cairn-{}", sub.id))
        .set("enable.auto.commit", "false")
        .create()?;
    let mut list = TopicPartitionList::new();
    for topic in sub.topics() {
        let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
        for p in metadata.topics().iter().flat_map(|t| t.partitions()) {
            let at = match sub.delivery.start_at {
                StartAt::Timestamp(ms) => Offset::Offset(ms),
                _ => Offset::End,
            };
            list.add_partition_offset(topic, p.id(), at)?;
        }
    }
    let mut starts = match sub.delivery.start_at {
        StartAt::Timestamp(_) => consumer.offsets_for_times(list, timeout)?,
        _ => list,
    };
    for e in starts.clone().elements() {
        if matches!(e.offset(), Offset::End) {
            let (_, high) = consumer.fetch_watermarks(e.topic(), e.partition(), timeout)?;
            starts.set_partition_offset(e.topic(), e.partition(), Offset::Offset(high))?;
        }
    }
    consumer.commit(&starts, CommitMode::Sync)
}

/// Counters of one running subscription.
#[derive(Default)]
pub struct Stats {
    rate: AtomicU64,
    /// Per topic and partition, the consumer lag librdkafka's statistics
    /// reported last (every second).
    lag: std::sync::Mutex<BTreeMap<(String, i32), i64>>,
}

/// The consumer context of a subscription: keeps the lag from
/// librdkafka's statistics (for `/metrics`, without a broker round trip).
pub struct Context(Arc<Stats>);

impl rdkafka::ClientContext for Context {
    fn stats(&self, statistics: rdkafka::Statistics) {
        let lag = statistics
            .topics
            .iter()
            .flat_map(|(topic, t)| t.partitions.values().map(move |p| (topic, p)))
            .filter(|(_, p)| p.partition >= 0 && p.consumer_lag >= 0)
            .map(|(topic, p)| ((topic.clone(), p.partition), p.consumer_lag))
            .collect();
        *self.0.lag.lock().unwrap() = lag;
    }
}

impl rdkafka::consumer::ConsumerContext for Context {}

/// A subscription's consumer.
type SubscriptionConsumer = StreamConsumer<Context>;

/// What `/metrics` reports of one subscription.
pub struct Gauges {
    /// The subscription's id.
    pub id: String,
    /// Per topic and partition, records not yet ingested.
    pub lag: BTreeMap<(String, i32), i64>,
    /// Its invocations not finished.
    pub in_flight: usize,
}

struct Running {
    consumer: Arc<SubscriptionConsumer>,
    stats: Arc<Stats>,
    task: tokio::task::JoinHandle<()>,
}

/// What the admin API shows of a subscription.
#[derive(Debug, Serialize)]
pub struct SubscriptionView {
    /// The stored subscription.
    #[serde(flatten)]
    pub record: SubscriptionRecord,
    /// `kafka://cluster/topic`.
    pub source: String,
    /// `service://Service/handler`.
    pub sink: String,
    /// Records turned into invocations since the subscription was created
    /// (kept across restarts; in a cluster, those of partition 0's keys).
    pub ingested: u64,
    /// Records per second over the last second.
    pub ingest_rate: u64,
    /// Invocations created by it that have not finished.
    pub in_flight: usize,
    /// Records not yet ingested, per partition (high watermark minus
    /// committed offset): keyed by partition, or by `topic/partition` when
    /// it reads several topics.
    pub lag: BTreeMap<String, i64>,
    /// Why it stopped on a record, if it did (it stays paused until resumed).
    pub stopped: Option<String>,
}

/// The subscriptions of a host and their consumers.
pub struct Subscriptions {
    invoker: Arc<Invoker>,
    max_in_flight: usize,
    /// `kafka.inline`.
    inline: bool,
    running: Mutex<HashMap<String, Running>>,
}

impl Subscriptions {
    /// Start a consumer for every stored, unpaused subscription (on
    /// partition 0, which runs them; the other partitions keep copies of
    /// the subscriptions to read their failure policies).
    pub fn start(
        invoker: Arc<Invoker>,
        config: &crate::config::KafkaConfig,
    ) -> Result<Arc<Self>, StoreError> {
        let subs = Arc::new(Subscriptions {
            invoker,
            max_in_flight: config.max_in_flight,
            inline: config.inline,
            running: Mutex::default(),
        });
        if subs.invoker.partitioning().me != 0 {
            return Ok(subs);
        }
        for record in subs.invoker.store().subscriptions()? {
            if !record.paused {
                subs.launch(record)?;
            }
        }
        Ok(subs)
    }

    /// Every registered cluster.
    pub fn clusters(&self) -> Result<Vec<ClusterRecord>, StoreError> {
        self.invoker.store().clusters()
    }

    /// Register or replace a cluster.
    pub async fn put_cluster(
        self: &Arc<Self>,
        cluster: ClusterRecord,
    ) -> Result<(), SubscriptionError> {
        if cluster.name.is_empty() || cluster.name.contains('/') {
            return Err(SubscriptionError::Invalid(format!(
                "invalid cluster name {:?}",
                cluster.name
            )));
        }
        if !cluster.properties.contains_key("bootstrap.servers") {
            return Err(SubscriptionError::Invalid(
                "properties must include bootstrap.servers".into(),
            ));
        }
        let name = cluster.name.clone();
        self.invoker
            .committer()
            .commit(move |t| t.put_cluster(&cluster))
            .await;
        // Clients made with the old properties go: the cached producer and
        // the running consumers of the cluster's subscriptions.
        self.invoker.producers().forget(&name);
        let of_cluster: Vec<SubscriptionRecord> = self
            .invoker
            .store()
            .subscriptions()?
            .into_iter()
            .filter(|s| s.cluster == name && self.running.lock().unwrap().contains_key(&s.id))
            .collect();
        for sub in of_cluster {
            self.relaunch(sub)?;
        }
        Ok(())
    }

    /// Create a subscription (through the API: without a name).
    pub async fn create(
        self: &Arc<Self>,
        spec: SubscriptionSpec,
    ) -> Result<SubscriptionRecord, SubscriptionError> {
        if spec.name.is_some() {
            return Err(SubscriptionError::Invalid(
                "named subscriptions come from the config file ([[kafka.subscriptions]]); \
                 leave out the name"
                    .into(),
            ));
        }
        let record = self.record_of(spec, new_subscription_id())?;
        self.add(record).await
    }

    /// Store a new subscription (refusing a second one with the same
    /// source and sink, or the same name), set where it starts reading, and
    /// start its consumer.
    async fn add(
        self: &Arc<Self>,
        record: SubscriptionRecord,
    ) -> Result<SubscriptionRecord, SubscriptionError> {
        let stored = record.clone();
        let clash = self
            .invoker
            .committer()
            .commit(move |t| {
                let same = |s: &SubscriptionRecord| {
                    (s.source() == stored.source() && s.sink() == stored.sink())
                        || (s.delivery.name.is_some() && s.delivery.name == stored.delivery.name)
                };
                if let Some(other) = t.subscriptions()?.into_iter().find(same) {
                    return Ok(Some(other.id));
                }
                t.put_subscription(&stored).map(|_| None)
            })
            .await;
        if let Some(other) = clash {
            return Err(SubscriptionError::Duplicate(format!(
                "subscription {other} has the same name, or the same source ({}) and sink ({})",
                record.source(),
                record.sink()
            )));
        }
        self.set_start(&record).await;
        self.launch(record.clone())?;
        Ok(record)
    }

    /// A new subscription's first offsets, for `start_at` `latest` or a
    /// timestamp: committed for its consumer group before the consumer
    /// starts, so records produced in between are not skipped. (`earliest`
    /// needs nothing: the consumer starts there without offsets.)
    async fn set_start(&self, record: &SubscriptionRecord) {
        if record.delivery.start_at == StartAt::Earliest || record.is_pattern() {
            return;
        }
        let Ok(Some(cluster)) = self.cluster(&record.cluster) else {
            return;
        };
        let record2 = record.clone();
        let set = tokio::task::spawn_blocking(move || start_offsets(&cluster, &record2)).await;
        match set {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(subscription = %record.id, "cannot set the start offsets ({e}); it starts at auto.offset.reset")
            }
            Err(e) => {
                tracing::warn!(subscription = %record.id, "cannot set the start offsets: {e}")
            }
        }
    }

    fn cluster(&self, name: &str) -> Result<Option<ClusterRecord>, StoreError> {
        let clusters = self.invoker.store().clusters()?;
        Ok(clusters.into_iter().find(|c| c.name == name))
    }

    /// A subscription record from its description, with every check the
    /// API makes: known cluster, service and handler; a dead-letter topic
    /// where the settings need one.
    fn record_of(
        &self,
        spec: SubscriptionSpec,
        id: String,
    ) -> Result<SubscriptionRecord, SubscriptionError> {
        let invalid = |m: String| SubscriptionError::Invalid(m);
        let (cluster, topic) = parse_source(&spec.source).ok_or_else(|| {
            invalid(format!(
                "source {:?} is not kafka://cluster/topic (or topic,topic or ^pattern)",
                spec.source
            ))
        })?;
        let (service, handler) = spec
            .sink
            .strip_prefix("service://")
            .and_then(|s| s.split_once('/'))
            .ok_or_else(|| {
                invalid(format!(
                    "sink {:?} is not service://Name/handler",
                    spec.sink
                ))
            })?;
        self.known_cluster(cluster)?;
        let (info, _) = self
            .invoker
            .registry()
            .service(service)
            .ok_or_else(|| invalid(format!("service {service} not found")))?;
        if info.handler(handler).is_none() {
            return Err(invalid(format!(
                "handler {handler} not found in service {service}"
            )));
        }
        if let Some(target) = &spec.dead_letter {
            let (dl_cluster, dl_topic) = parse_source(target)
                .filter(|(_, t)| !t.starts_with('^') && !t.contains(','))
                .ok_or_else(|| {
                    invalid(format!(
                        "dead_letter {target:?} is not kafka://cluster/topic"
                    ))
                })?;
            self.known_cluster(dl_cluster)?;
            if dl_cluster == cluster && topic.split(',').any(|t| t.trim() == dl_topic) {
                return Err(invalid(format!(
                    "the dead-letter topic {dl_topic} is one the subscription reads"
                )));
            }
        }
        let on_failure = spec.on_failure.unwrap_or(match spec.dead_letter {
            Some(_) => OnFailure::DeadLetter,
            None => OnFailure::Pause,
        });
        let needs_topic =
            on_failure == OnFailure::DeadLetter || spec.null_key == NullKey::DeadLetter;
        if needs_topic && spec.dead_letter.is_none() {
            return Err(invalid(
                "on_failure or null_key \"dead-letter\" needs dead_letter = \"kafka://cluster/topic\"".into(),
            ));
        }
        if topic.starts_with('^') && matches!(spec.start_at, StartAt::Timestamp(_)) {
            return Err(invalid(
                "start_at = \"timestamp:...\" needs topic names, not a pattern".into(),
            ));
        }
        if let Some(name) = &spec.name {
            let valid = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
            if name.is_empty() || !name.chars().all(valid) {
                return Err(invalid(format!(
                    "subscription name {name:?}: use letters, digits, -, _ and ."
                )));
            }
        }
        Ok(SubscriptionRecord {
            id,
            cluster: cluster.into(),
            topic: topic.into(),
            service: service.into(),
            handler: handler.into(),
            options: spec.options,
            paused: false,
            delivery: Delivery {
                name: spec.name,
                key: spec.key,
                null_key: spec.null_key,
                on_failure,
                dead_letter: spec.dead_letter,
                start_at: spec.start_at,
            },
        })
    }

    fn known_cluster(&self, name: &str) -> Result<(), SubscriptionError> {
        match self.cluster(name)? {
            Some(_) => Ok(()),
            None => Err(SubscriptionError::Invalid(format!(
                "unknown cluster {name}: register it with `cairn kafka-clusters add {name} -p bootstrap.servers=HOST:PORT` (or POST /kafka-clusters, or [[kafka.clusters]] in the config)"
            ))),
        }
    }

    /// Make the stored clusters and named subscriptions match the config
    /// file (`[[kafka.clusters]]`, `[[kafka.subscriptions]]`), with the
    /// API's checks: clusters are registered or updated; a named
    /// subscription is created, changed in place (keeping its id, so its
    /// consumer group and offsets, and whether it is paused), or removed
    /// when it left the file. Doing it twice changes nothing; subscriptions
    /// made through the API (without a name) are left alone.
    pub async fn reconcile(
        self: &Arc<Self>,
        clusters: &[ClusterRecord],
        specs: &[SubscriptionSpec],
    ) -> Result<(), SubscriptionError> {
        let stored = self.clusters()?;
        for cluster in clusters.iter().filter(|c| !stored.contains(c)) {
            self.put_cluster(cluster.clone()).await?;
            tracing::info!(cluster = %cluster.name, "cluster registered from the config");
        }
        let mut names = std::collections::HashSet::new();
        for spec in specs {
            let name = spec.name.as_deref().ok_or_else(|| {
                SubscriptionError::Invalid(format!(
                    "[[kafka.subscriptions]] {} needs a name",
                    spec.source
                ))
            })?;
            if !names.insert(name) {
                return Err(SubscriptionError::Invalid(format!(
                    "two subscriptions are named {name}"
                )));
            }
        }
        let stored = self.invoker.store().subscriptions()?;
        for spec in specs {
            match stored.iter().find(|s| s.delivery.name == spec.name) {
                Some(old) => self.change(old, spec).await?,
                None => {
                    let record = self.record_of(spec.clone(), new_subscription_id())?;
                    let record = self.add(record).await?;
                    tracing::info!(subscription = %record.id, name = ?spec.name, "subscription created from the config");
                }
            }
        }
        let gone = stored.iter().filter(|s| {
            s.delivery
                .name
                .as_deref()
                .is_some_and(|n| !names.contains(n))
        });
        for old in gone {
            self.delete(&old.id).await?;
            tracing::info!(subscription = %old.id, name = ?old.delivery.name, "subscription removed: it left the config");
        }
        Ok(())
    }

    /// Change subscription `old` to what `spec` says, if that differs.
    async fn change(
        self: &Arc<Self>,
        old: &SubscriptionRecord,
        spec: &SubscriptionSpec,
    ) -> Result<(), SubscriptionError> {
        let mut record = self.record_of(spec.clone(), old.id.clone())?;
        record.paused = old.paused;
        if record == *old {
            return Ok(());
        }
        let stored = record.clone();
        self.invoker
            .committer()
            .commit(move |t| t.put_subscription(&stored))
            .await;
        self.relaunch(record.clone())?;
        tracing::info!(subscription = %record.id, name = ?spec.name, "subscription changed to match the config");
        Ok(())
    }

    /// Every subscription with its figures.
    pub async fn list(&self) -> Result<Vec<SubscriptionView>, SubscriptionError> {
        let mut views = Vec::new();
        for record in self.invoker.store().subscriptions()? {
            views.push(self.view(record).await);
        }
        Ok(views)
    }

    /// One subscription with its figures.
    pub async fn get(&self, id: &str) -> Result<SubscriptionView, SubscriptionError> {
        let record = self.find(id)?;
        Ok(self.view(record).await)
    }

    fn find(&self, id: &str) -> Result<SubscriptionRecord, SubscriptionError> {
        self.invoker
            .store()
            .subscriptions()?
            .into_iter()
            .find(|s| s.id == id)
            .ok_or_else(|| SubscriptionError::NotFound(id.into()))
    }

    /// Pause or resume consumption.
    pub async fn set_paused(
        self: &Arc<Self>,
        id: &str,
        paused: bool,
    ) -> Result<SubscriptionRecord, SubscriptionError> {
        let mut record = self.find(id)?;
        record.paused = paused;
        let stored = record.clone();
        self.invoker
            .committer()
            .commit(move |t| {
                if !paused {
                    t.set_subscription_stop(&stored.id, None)?;
                }
                t.put_subscription(&stored)
            })
            .await;
        self.relaunch(record.clone())?;
        Ok(record)
    }

    /// Stop `record`'s consumer, if it runs, and start a new one with its
    /// current settings unless it is paused.
    fn relaunch(self: &Arc<Self>, record: SubscriptionRecord) -> Result<(), StoreError> {
        self.stop(&record.id);
        match record.paused {
            true => Ok(()),
            false => self.launch(record),
        }
    }

    /// Skip the record at `topic`/`partition`@`offset` that stopped the
    /// subscription: its paused invocation completes as failed ("skipped
    /// by an operator", kept like any outcome), or, when the record never
    /// became an invocation, a durable skip row makes the consumer pass it
    /// over once; then the subscription resumes. `topic` may be left out when it reads one topic.
    pub async fn skip(
        self: &Arc<Self>,
        id: &str,
        topic: Option<&str>,
        partition: i32,
        offset: i64,
    ) -> Result<SubscriptionRecord, SubscriptionError> {
        let record = self.find(id)?;
        let topic = match (topic, record.topics().as_slice()) {
            (Some(topic), _) => topic.to_string(),
            (None, [only]) if !record.is_pattern() => only.to_string(),
            (None, _) => {
                return Err(SubscriptionError::Invalid(
                    "the subscription reads several topics: give --topic".into(),
                ))
            }
        };
        let at = (topic, partition, offset);
        match self.paused_invocation(id, &at)? {
            Some(invocation) => {
                let why = format!("skipped by an operator ({}/{}@{})", at.0, at.1, at.2);
                self.invoker
                    .skip(&invocation, why)
                    .await
                    .map_err(|e| SubscriptionError::Invalid(e.to_string()))?;
                tracing::warn!(subscription = id, invocation = %invocation, "skipped {}/{}@{}", at.0, at.1, at.2);
            }
            None => {
                let stop = self.invoker.store().subscription_stop(id)?;
                let here = format!("stopped at {}/{}@{}:", at.0, at.1, at.2);
                if !stop.is_some_and(|s| s.starts_with(&here)) {
                    return Err(SubscriptionError::Invalid(format!(
                        "no paused invocation of {}/{}@{} and the subscription is not stopped there",
                        at.0, at.1, at.2
                    )));
                }
                let (sub, skip) = (record.id.clone(), at.clone());
                self.invoker
                    .committer()
                    .commit(move |t| t.put_skip(&sub, &skip.0, skip.1, skip.2))
                    .await;
                tracing::warn!(
                    subscription = id,
                    "skipped {}/{}@{} (never ingested)",
                    at.0,
                    at.1,
                    at.2
                );
            }
        }
        self.set_paused(id, false).await
    }

    /// The paused invocation subscription `id` created from the record at `at`.
    fn paused_invocation(
        &self,
        id: &str,
        at: &Position,
    ) -> Result<Option<crate::ids::InvocationId>, StoreError> {
        let (partition, offset) = (at.1.to_string(), at.2.to_string());
        let mut found = None;
        self.invoker.store().for_each_unfinished(|r| {
            let of_record = r.source.as_deref() == Some(id)
                && r.status == crate::records::Status::Paused
                && r.header("x-kafka-topic") == Some(at.0.as_str())
                && r.header("x-kafka-partition") == Some(partition.as_str())
                && r.header("x-kafka-offset") == Some(offset.as_str());
            if of_record {
                found = Some(r.id);
            }
        })?;
        Ok(found)
    }

    /// Delete a subscription (its invocations stay).
    pub async fn delete(&self, id: &str) -> Result<(), SubscriptionError> {
        let id2 = id.to_string();
        if !self
            .invoker
            .committer()
            .commit(move |t| t.remove_subscription(&id2))
            .await
        {
            return Err(SubscriptionError::NotFound(id.into()));
        }
        self.stop(id);
        Ok(())
    }

    fn stop(&self, id: &str) {
        if let Some(running) = self.running.lock().unwrap().remove(id) {
            running.task.abort();
        }
    }

    fn launch(self: &Arc<Self>, record: SubscriptionRecord) -> Result<(), StoreError> {
        let Some(cluster) = self.cluster(&record.cluster)? else {
            tracing::error!(subscription = %record.id, "cluster {} is not registered", record.cluster);
            return Ok(());
        };
        let stats = Arc::new(Stats::default());
        let consumer = match consumer(&cluster, &record, Context(stats.clone())) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                tracing::error!(subscription = %record.id, "cannot create the consumer: {e}");
                return Ok(());
            }
        };
        let ingest = Ingest {
            inliner: Inliner::new(self.invoker.clone(), &record.id, self.inline),
            last_queued: Mutex::default(),
            invoker: self.invoker.clone(),
            consumer: consumer.clone(),
            stats: stats.clone(),
            skips: Mutex::new(self.invoker.store().skips(&record.id)?),
            standings: Mutex::default(),
            record: record.clone(),
            max_in_flight: self.max_in_flight,
            last_error: std::sync::Mutex::default(),
        };
        let task = tokio::spawn(ingest.run());
        self.running.lock().unwrap().insert(
            record.id,
            Running {
                consumer,
                stats,
                task,
            },
        );
        Ok(())
    }

    /// What `/metrics` reports of each running subscription.
    pub fn gauges(&self) -> Vec<Gauges> {
        let running = self.running.lock().unwrap();
        running
            .iter()
            .map(|(id, r)| Gauges {
                id: id.clone(),
                lag: r.stats.lag.lock().unwrap().clone(),
                in_flight: self.invoker.in_flight(id),
            })
            .collect()
    }

    async fn view(&self, mut record: SubscriptionRecord) -> SubscriptionView {
        record.options = crate::records::redacted(&record.options);
        let running = self
            .running
            .lock()
            .unwrap()
            .get(&record.id)
            .map(|r| (r.consumer.clone(), r.stats.clone()));
        let (ingest_rate, lag) = match running {
            Some((consumer, stats)) => {
                let several = record.is_pattern() || record.topics().len() > 1;
                let lag = tokio::task::spawn_blocking(move || lag(&consumer))
                    .await
                    .unwrap_or_default()
                    .into_iter()
                    .map(|((topic, p), n)| match several {
                        true => (format!("{topic}/{p}"), n),
                        false => (p.to_string(), n),
                    })
                    .collect();
                (stats.rate.load(Ordering::Relaxed), lag)
            }
            None => (0, BTreeMap::new()),
        };
        let ingested = self
            .invoker
            .store()
            .ingested(&record.id)
            .unwrap_or_else(|e| {
                tracing::warn!(subscription = %record.id, "cannot read the ingested count: {e}");
                0
            });
        let stopped = self
            .invoker
            .store()
            .subscription_stop(&record.id)
            .unwrap_or_else(|e| Some(format!("cannot read the stop reason: {e}")));
        SubscriptionView {
            source: record.source(),
            sink: record.sink(),
            stopped,
            in_flight: self.invoker.in_flight(&record.id),
            record,
            ingested,
            ingest_rate,
            lag,
        }
    }
}

fn consumer(
    cluster: &ClusterRecord,
    sub: &SubscriptionRecord,
    context: Context,
) -> rdkafka::error::KafkaResult<SubscriptionConsumer> {
    // librdkafka prefetches up to 100,000 records per partition and 64 MiB
    // per consumer by default, and parses every record of a fetch response
    // (1 MiB per partition) into a few hundred bytes of bookkeeping at
    // once: with small records, a 6-partition catch-up grew the host's
    // glibc heap by about 100 MiB, never given back. Ingest is paced by
    // `max_in_flight`, so smaller fetches and prefetch cost no throughput
    // (measured: the same records/s, peak RSS 305 -> 195-241 MiB). With
    // queues that small, librdkafka's default pause of a partition's
    // fetches once its queue is full (fetch.queue.backoff.ms, 1 s) left
    // the consumer with nothing to hand out for whole seconds at 40,000
    // records/s: 10 ms keeps it fed. The cluster's properties and the
    // subscription's options may change all of these.
    let mut config = client(cluster);
    for (k, v) in [
        ("queued.min.messages", "10000"),
        ("queued.max.messages.kbytes", "4096"),
        ("max.partition.fetch.bytes", "131072"),
        ("fetch.max.bytes", "1048576"),
        ("fetch.queue.backoff.ms", "10"),
    ] {
        if config.get(k).is_none() {
            config.set(k, v);
        }
    }
    config
        .set("group.id", format!("cairn-{}", sub.id))
        // Static membership: a host that restarts (even after SIGKILL) takes
        // its partitions back at once instead of waiting for the broker to
        // expire the dead member's session.
        .set("group.instance.id", format!("cairn-{}", sub.id))
        .set(
            "auto.offset.reset",
            match sub.delivery.start_at {
                StartAt::Latest => "latest",
                _ => "earliest",
            },
        )
        .set("enable.partition.eof", "false")
        .set("statistics.interval.ms", "1000");
    for (k, v) in &sub.options {
        config.set(k, v);
    }
    config
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    let consumer: SubscriptionConsumer = config.create_with_context(context)?;
    consumer.subscribe(&sub.topics())?;
    Ok(consumer)
}

/// Per assigned topic and partition: high watermark minus committed offset.
fn lag(consumer: &SubscriptionConsumer) -> BTreeMap<(String, i32), i64> {
    let timeout = Duration::from_secs(2);
    let Ok(assignment) = consumer.assignment() else {
        return BTreeMap::new();
    };
    let committed = consumer
        .committed_offsets(assignment.clone(), timeout)
        .unwrap_or(assignment);
    committed
        .elements()
        .iter()
        .filter_map(|e| {
            let (low, high) = consumer
                .fetch_watermarks(e.topic(), e.partition(), timeout)
                .ok()?;
            let done = match e.offset() {
                Offset::Offset(o) => o,
                _ => low,
            };
            Some(((e.topic().to_string(), e.partition()), (high - done).max(0)))
        })
        .collect()
}

/// The object key for a record key (see the module docs).
pub fn object_key(key: Option<&[u8]>) -> String {
    let key = key.unwrap_or_default();
    match std::str::from_utf8(key) {
        Ok(text) if !text.starts_with("hex:") => text.to_string(),
        _ => format!("hex:{}", hex::encode(key)),
    }
}

/// The record key an object key (or `x-kafka-key` header) was made from.
pub fn record_key(object_key: &str) -> Vec<u8> {
    match object_key.strip_prefix("hex:").map(hex::decode) {
        Some(Ok(bytes)) => bytes,
        _ => object_key.as_bytes().to_vec(),
    }
}

/// The header that identifies a durably produced record (see `kafka-produce`).
pub const PRODUCE_ID: &str = "cairn-produce-id";

/// Idempotent producers per registered cluster, for durable produce.
pub struct Producers {
    store: Arc<crate::store::Store>,
    cache: Mutex<HashMap<String, rdkafka::producer::FutureProducer>>,
}

impl Producers {
    /// Producers over the clusters registered in `store`.
    pub fn new(store: Arc<crate::store::Store>) -> Self {
        Producers {
            store,
            cache: Mutex::default(),
        }
    }

    /// The client properties of a registered cluster.
    fn config(&self, cluster: &str) -> Result<ClientConfig, String> {
        let config = self
            .store
            .clusters()
            .map_err(|e| e.to_string())?
            .into_iter()
            .find(|c| c.name == cluster)
            .ok_or_else(|| format!("unknown Kafka cluster {cluster}"))?;
        Ok(client(&config))
    }

    fn producer(&self, cluster: &str) -> Result<rdkafka::producer::FutureProducer, String> {
        if let Some(p) = self.cache.lock().unwrap().get(cluster) {
            return Ok(p.clone());
        }
        let producer: rdkafka::producer::FutureProducer = self
            .config(cluster)?
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .create()
            .map_err(|e| format!("cannot create a producer for {cluster}: {e}"))?;
        self.cache
            .lock()
            .unwrap()
            .insert(cluster.to_string(), producer.clone());
        Ok(producer)
    }

    /// Drop the cached producer of `cluster` (its properties changed).
    pub fn forget(&self, cluster: &str) {
        self.cache.lock().unwrap().remove(cluster);
    }

    /// Send one record, tagged `produce_id`, until the broker acknowledges
    /// it: `{"partition", "offset"}`, or a failure for an unknown cluster.
    pub async fn send(&self, r: Produced<'_>) -> crate::journal::Outcome {
        use crate::journal::Outcome;
        let producer = match self.producer(r.cluster) {
            Ok(p) => p,
            Err(message) => return Outcome::Failure { code: 404, message },
        };
        loop {
            let mut headers =
                rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                    key: PRODUCE_ID,
                    value: Some(r.produce_id),
                });
            if let Some(traceparent) = r.traceparent {
                headers = headers.insert(rdkafka::message::Header {
                    key: crate::traces::TRACEPARENT,
                    value: Some(traceparent),
                });
            }
            let ours = |name: &str| {
                name == PRODUCE_ID
                    || (r.traceparent.is_some()
                        && name.eq_ignore_ascii_case(crate::traces::TRACEPARENT))
            };
            for (key, value) in r.headers.iter().filter(|(k, _)| !ours(k)) {
                headers = headers.insert(rdkafka::message::Header {
                    key,
                    value: Some(value),
                });
            }
            let mut record = rdkafka::producer::FutureRecord::to(r.topic)
                .payload(r.value)
                .headers(headers);
            if let Some(key) = r.key {
                record = record.key(key);
            }
            if let Some(partition) = r.partition {
                record = record.partition(partition);
            }
            match producer.send(record, Duration::from_secs(30)).await {
                Ok(delivery) => {
                    let at = serde_json::json!({ "partition": delivery.partition, "offset": delivery.offset });
                    return Outcome::Success(at.to_string().into_bytes());
                }
                Err((e, _)) => {
                    tracing::warn!(produce_id = %r.produce_id, "produce to {}/{} failed: {e}; retrying", r.cluster, r.topic);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Whether the dead-letter topic already holds `letter` (tagged
    /// `produce_id`): the topic is read from a minute before the letter was
    /// recorded to its end. Asks again until the broker answers (producing
    /// needs it too), so a letter is neither lost nor doubled.
    pub async fn holds(&self, letter: &DeadLetter, produce_id: &str) -> bool {
        loop {
            let config = match self.config(&letter.cluster) {
                Ok(config) => config,
                Err(_) => return false, // the send reports the unknown cluster
            };
            let (topic, id) = (letter.topic.clone(), produce_id.to_string());
            let since = letter.created_ms.saturating_sub(60_000) as i64;
            let found =
                tokio::task::spawn_blocking(move || find_produced(config, &topic, since, &id))
                    .await;
            match found {
                Ok(Ok(found)) => return found,
                Ok(Err(e)) => tracing::warn!(
                    produce_id,
                    "cannot read {} to check for the dead letter: {e}; retrying",
                    letter.topic
                ),
                Err(e) => tracing::warn!(produce_id, "the dead-letter check failed: {e}; retrying"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Whether `topic` holds a record with header [`PRODUCE_ID`] =
/// `produce_id` at or after `since_ms` (read up to the current end).
fn find_produced(
    mut config: ClientConfig,
    topic: &str,
    since_ms: i64,
    produce_id: &str,
) -> rdkafka::error::KafkaResult<bool> {
    use rdkafka::consumer::BaseConsumer;
    let timeout = Duration::from_secs(10);
    let consumer: BaseConsumer = config
        .set("group.id", "cairn-dead-letter-check")
        .set("enable.auto.commit", "false")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let mut times = TopicPartitionList::new();
    for p in metadata.topics().iter().flat_map(|t| t.partitions()) {
        times.add_partition_offset(topic, p.id(), Offset::Offset(since_ms))?;
    }
    let starts = consumer.offsets_for_times(times, timeout)?;
    let (mut assign, mut ends) = (TopicPartitionList::new(), HashMap::new());
    for e in starts.elements() {
        let (_, high) = consumer.fetch_watermarks(topic, e.partition(), timeout)?;
        if let Offset::Offset(from) = e.offset().to_owned() {
            if from < high {
                assign.add_partition_offset(topic, e.partition(), Offset::Offset(from))?;
                ends.insert(e.partition(), high);
            }
        }
    }
    consumer.assign(&assign)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ends.is_empty() {
        if Instant::now() > deadline {
            return Err(rdkafka::error::KafkaError::MessageConsumption(
                rdkafka::types::RDKafkaErrorCode::OperationTimedOut,
            ));
        }
        let Some(m) = consumer.poll(Duration::from_millis(500)).transpose()? else {
            continue;
        };
        let tagged = m.headers().is_some_and(|hs| {
            hs.iter()
                .any(|h| h.key == PRODUCE_ID && h.value == Some(produce_id.as_bytes()))
        });
        if tagged {
            return Ok(true);
        }
        if ends
            .get(&m.partition())
            .is_some_and(|&end| m.offset() + 1 >= end)
        {
            ends.remove(&m.partition());
        }
    }
    Ok(false)
}

/// The [`PRODUCE_ID`] of invocation `id`'s dead letter.
pub fn dead_letter_id(id: &crate::ids::InvocationId) -> String {
    format!("dead-letter:{id}")
}

/// The record that created `record`, as a dead letter for `sub`'s
/// dead-letter topic: its key, value and headers (but the `x-kafka-*`
/// ones), then `cairn-error`, `cairn-invocation-id`, `cairn-subscription`,
/// `cairn-source-topic`, `cairn-source-partition` and
/// `cairn-source-offset`. `None` without a dead-letter topic.
pub fn dead_letter(
    record: &InvocationRecord,
    sub: &SubscriptionRecord,
    outcome: &crate::journal::Outcome,
    now_ms: u64,
) -> Option<DeadLetter> {
    let (cluster, topic) = parse_source(sub.delivery.dead_letter.as_deref()?)?;
    let header = |name: &str| record.header(name).unwrap_or_default().to_string();
    let error = match outcome {
        crate::journal::Outcome::Failure { code, message } => format!("{code} {message}"),
        crate::journal::Outcome::Success(_) => "succeeded".into(),
    };
    let mut headers: Vec<(String, Vec<u8>)> = record
        .headers
        .iter()
        .filter(|(k, _)| !k.starts_with("x-kafka-") && k != PRODUCE_ID)
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
        .collect();
    let cairn = [
        ("cairn-error", error),
        ("cairn-invocation-id", record.id.to_string()),
        ("cairn-subscription", sub.id.clone()),
        ("cairn-source-topic", header("x-kafka-topic")),
        ("cairn-source-partition", header("x-kafka-partition")),
        ("cairn-source-offset", header("x-kafka-offset")),
    ];
    headers.extend(cairn.map(|(k, v)| (k.to_string(), v.into_bytes())));
    let key = record.header("x-kafka-key").map(record_key);
    Some(DeadLetter {
        cluster: cluster.into(),
        topic: topic.into(),
        key,
        value: record.input.clone(),
        headers,
        created_ms: now_ms,
    })
}

/// Why a subscription stops on the record of failed invocation `record`.
pub fn stopped_by(record: &InvocationRecord, why: &str) -> String {
    let header = |name: &str| record.header(name).unwrap_or("?");
    let (topic, partition, offset) = (
        header("x-kafka-topic"),
        header("x-kafka-partition"),
        header("x-kafka-offset"),
    );
    format!(
        "stopped at {topic}/{partition}@{offset}: its invocation {} {why}; resume the invocation \
         to retry it (`cairn invocations resume {}`), or skip the record \
         (`cairn subscriptions skip SUBSCRIPTION --topic {topic} --partition {partition} --offset {offset}`), \
         then resume the subscription",
        record.id, record.id
    )
}

/// A record the host produces (a guest's `kafka_produce`, a dead letter).
pub struct Produced<'a> {
    /// The produce's id (`invocation:command`), in header `cairn-produce-id`:
    /// a subscription that reads the record back ingests it once.
    pub produce_id: &'a str,
    /// The cluster's name, the topic, the partition (the key's when
    /// `None`), the record's key, value and headers.
    pub cluster: &'a str,
    pub topic: &'a str,
    pub partition: Option<i32>,
    pub key: Option<&'a [u8]>,
    pub value: &'a [u8],
    pub headers: &'a [(String, Vec<u8>)],
    /// The produce's span, as header `traceparent`, when traced.
    pub traceparent: Option<&'a str>,
}

/// One subscription's consumer loop.
struct Ingest {
    invoker: Arc<Invoker>,
    /// Runs what it can of each batch inline (see [`crate::inline`]).
    inliner: Arc<Inliner>,
    /// Answers once the last batch's job is queued: the next batch is
    /// written after it.
    last_queued: Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
    consumer: Arc<SubscriptionConsumer>,
    stats: Arc<Stats>,
    record: SubscriptionRecord,
    max_in_flight: usize,
    /// Its progress in each partition seen (see [`Progress`]).
    standings: Mutex<HashMap<(String, i32), Standing>>,
    /// Records an operator skipped before they were ingested:
    /// `(topic, partition) -> offset`.
    skips: Mutex<HashMap<(String, i32), i64>>,
    /// The last client error logged, and when (see [`Ingest::report`]).
    last_error: std::sync::Mutex<Option<(String, Instant)>>,
}

impl Ingest {
    /// Read batches and hand each to a task that writes it (runs what it
    /// can inline, then queues its job; see [`Ingest::write`]), while a
    /// second half of the same task waits for each batch's commit and then
    /// commits its offsets, in order: the next batch is read while the
    /// last one is being written (up to [`PIPELINE`] records ahead).
    /// Aborting the task stops both halves and the writing tasks.
    async fn run(self) {
        tracing::info!(subscription = %self.record.id, source = %self.record.source(), sink = %self.record.sink(), "consuming");
        let (queue, pending) = tokio::sync::mpsc::unbounded_channel();
        let (stop, ()) = tokio::join!(self.read_all(queue), self.settle_all(pending));
        if let Some(reason) = stop {
            self.stop_on(reason).await;
        }
    }

    /// The reading half of [`Ingest::run`]: until the subscription is
    /// stopped (`None`) or must stop (the reason).
    async fn read_all(&self, queue: tokio::sync::mpsc::UnboundedSender<Pending>) -> Option<String> {
        // Every batch holds room for its records (an empty one for one),
        // so the queue is bounded by PIPELINE.
        let room = Arc::new(tokio::sync::Semaphore::new(PIPELINE as usize));
        loop {
            if self.stopped() {
                return None;
            }
            self.wait_for_room().await;
            let batch = match self.next_batch().await {
                Ok(batch) => batch,
                Err(reason) => return Some(reason),
            };
            let records = (batch.len() as u32).max(1);
            let Ok(held) = room.clone().acquire_many_owned(records).await else {
                return None;
            };
            let (pending, stop) = self.ingest(batch, held);
            if queue.send(pending).is_err() || stop.is_some() {
                return stop;
            }
        }
    }

    /// The settling half of [`Ingest::run`]: each batch's commit awaited
    /// in order, then its offsets handed to the consumer group. One group
    /// commit is in flight at a time and the offsets settled meanwhile
    /// wait for the next one, merged: a commit is a round trip to the
    /// group coordinator, and waiting for one per batch held the reading
    /// half back (at a steady 5,000 records/s, in batches of about 50,
    /// records waited tens of milliseconds before they were even read).
    async fn settle_all(&self, mut pending: tokio::sync::mpsc::UnboundedReceiver<Pending>) {
        let mut window = (Instant::now(), 0u64);
        let mut due = BTreeMap::new();
        let mut committing = None;
        loop {
            tokio::select! {
                batch = pending.recv() => {
                    let Some(batch) = batch else { break };
                    if let Some((ingested, offsets)) = self.settle(batch).await {
                        self.count(&mut window, ingested);
                        merge(&mut due, offsets);
                    }
                }
                failed = in_flight(&mut committing) => {
                    committing = None;
                    let failed: Option<BTreeMap<_, _>> = failed;
                    merge(&mut due, failed.unwrap_or_default());
                }
            }
            if committing.is_none() && !due.is_empty() {
                committing = Some(Box::pin(self.commit_offsets(std::mem::take(&mut due))));
            }
        }
        // The reading half stopped: commit what was settled.
        if let Some(commit) = committing {
            merge(&mut due, commit.await.unwrap_or_default());
        }
        if !due.is_empty() {
            self.commit_offsets(due).await;
        }
    }

    /// Count `ingested` records in the metrics and the rate `window`.
    fn count(&self, window: &mut (Instant, u64), ingested: u64) {
        metrics::counter!("cairn_subscription_ingested_total", "subscription" => self.record.id.clone())
            .increment(ingested);
        window.1 += ingested;
        if window.0.elapsed() >= Duration::from_secs(1) {
            let rate = window.1 as f64 / window.0.elapsed().as_secs_f64();
            self.stats.rate.store(rate as u64, Ordering::Relaxed);
            *window = (Instant::now(), 0);
        }
    }

    /// Whether the subscription was stopped on a failed invocation's
    /// record (`on_failure = "pause"`) since it started: then it consumes
    /// no more until resumed.
    fn stopped(&self) -> bool {
        match self.invoker.store().subscription_stop(&self.record.id) {
            Ok(stop) => stop.is_some(),
            Err(e) => {
                tracing::warn!(subscription = %self.record.id, "cannot read the stop reason: {e}");
                false
            }
        }
    }

    /// Backpressure: pause the partitions while too many invocations are unfinished.
    async fn wait_for_room(&self) {
        if self.invoker.in_flight(&self.record.id) < self.max_in_flight {
            return;
        }
        let assignment = self.consumer.assignment().unwrap_or_default();
        if let Err(e) = self.consumer.pause(&assignment) {
            tracing::warn!(subscription = %self.record.id, "cannot pause: {e}");
        }
        tracing::info!(subscription = %self.record.id, in_flight = self.max_in_flight, "backpressure: consumption paused");
        while self.invoker.in_flight(&self.record.id) > self.max_in_flight / 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Err(e) = self.consumer.resume(&assignment) {
            tracing::warn!(subscription = %self.record.id, "cannot resume: {e}");
        }
        tracing::info!(subscription = %self.record.id, "backpressure: consumption resumed");
    }

    /// Up to BATCH records: wait for the first, then take what is ready.
    /// An error the consumer cannot recover from (a fatal one, such as
    /// another consumer fencing this one) stops the subscription: the reason.
    async fn next_batch(&self) -> Result<Vec<OwnedRecord>, String> {
        let mut batch = Vec::new();
        let first = tokio::time::timeout(Duration::from_millis(500), self.consumer.recv()).await;
        match first {
            Err(_) => return Ok(batch),
            Ok(Err(e @ rdkafka::error::KafkaError::MessageConsumptionFatal(_))) => {
                return Err(format!("the Kafka consumer failed for good: {e}"));
            }
            Ok(Err(e)) => {
                // librdkafka reconnects by itself; its errors are reports,
                // queued in front of the records. Take the next at once: a
                // pause per error would leave the consumer draining stale
                // errors for minutes after an outage.
                self.report(&e);
                return Ok(batch);
            }
            Ok(Ok(m)) => batch.push(OwnedRecord::from(&m)),
        }
        // What is ready now, without waiting: a wait of even 2 ms for
        // stragglers added 2 ms to every record at a steady rate, and under
        // load the queue is full anyway.
        while batch.len() < BATCH {
            match tokio::time::timeout(Duration::ZERO, self.consumer.recv()).await {
                Ok(Ok(m)) => batch.push(OwnedRecord::from(&m)),
                _ => break,
            }
        }
        Ok(batch)
    }

    /// Log a client error, but a repeated one at most every 10 s.
    fn report(&self, e: &rdkafka::error::KafkaError) {
        let text = e.to_string();
        let mut last = self.last_error.lock().unwrap();
        let repeated = last
            .as_ref()
            .is_some_and(|(t, at)| *t == text && at.elapsed() < Duration::from_secs(10));
        if !repeated {
            tracing::warn!(subscription = %self.record.id, "kafka: {text}; librdkafka retries");
            *last = Some((text, Instant::now()));
        }
    }

    /// Queue one invocation per new record, in order, in one job that
    /// also moves the partitions' progress past them. Returns the batch to
    /// settle, and why the subscription must stop, if it must: then no
    /// offset at or past the offending record of its partition is
    /// committed, and no later record of that partition is ingested.
    fn ingest(
        &self,
        batch: Vec<OwnedRecord>,
        room: tokio::sync::OwnedSemaphorePermit,
    ) -> (Pending, Option<String>) {
        let mut stop: Option<(Position, String)> = None;
        let (mut fresh, mut records) = (Vec::new(), Vec::new());
        let mut skipped = Vec::new();
        let mut offsets: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for record in batch {
            let at = (record.topic.clone(), record.partition, record.offset);
            if stop
                .as_ref()
                .is_some_and(|((t, p, _), _)| (t, *p) == (&at.0, at.1))
            {
                continue;
            }
            if self.is_skipped(&at) {
                offsets.insert((at.0.clone(), at.1), at.2 + 1);
                skipped.push(at);
                continue;
            }
            let standing = self.standing(&at.0, at.1);
            if at.2 < standing.progress.committed {
                stop.get_or_insert_with(|| (at.clone(), stopped_at(&at, WENT_BACK)));
                continue;
            }
            if at.2 < standing.progress.next {
                offsets.insert((at.0.clone(), at.1), at.2 + 1); // redelivered
                continue;
            }
            let (request, traced) = self.request(record, standing.keyed);
            match self.invoker.new_record(request) {
                Ok(invocation) => {
                    offsets.insert((at.0.clone(), at.1), at.2 + 1);
                    fresh.push((at, traced));
                    records.push(invocation);
                }
                Err(e) => {
                    let reason = stopped_at(&at, &format!("cannot be ingested: {e}"));
                    stop.get_or_insert((at, reason));
                }
            }
        }
        let next = last_offsets(fresh.iter().map(|(at, _)| at));
        let created = (!records.is_empty() || !skipped.is_empty()).then(|| {
            let passed = Passed {
                subscription: self.record.id.clone(),
                next,
                skipped,
            };
            self.write(records, passed)
        });
        let pending = Pending {
            fresh,
            created,
            offsets,
            _room: room,
        };
        (pending, stop.map(|(_, reason)| reason))
    }

    /// Wait until `batch` is durable: how many of its records became
    /// invocations, and the offsets to commit to the consumer group.
    /// `None` if the partition moved meanwhile: then nothing is committed,
    /// the new owner reads them again.
    async fn settle(&self, batch: Pending) -> Option<(u64, BTreeMap<(String, i32), i64>)> {
        let created = match batch.created {
            Some(mut written) => match (&mut written.0).await {
                Ok(Some(created)) => created,
                _ => return None,
            },
            None => Vec::new(),
        };
        let mut ingested = 0;
        for ((at, traced), submitted) in batch.fresh.into_iter().zip(created) {
            if let (Some(traced), false) = (traced, submitted.existing) {
                self.trace_ingest(traced, &at, &submitted.id);
            }
            ingested += u64::from(!submitted.existing);
        }
        Some((ingested, batch.offsets))
    }

    /// Write a batch's new records: in a task of its own (so the next
    /// batch is read meanwhile), but only once the previous batch's job is
    /// queued, run what can run inline (see [`Inliner::run`]), then queue
    /// the job (see [`write_batch`]). The task answers the records' ids
    /// once they are durable.
    fn write(&self, records: Vec<InvocationRecord>, passed: Passed) -> Written {
        {
            // The next batch is read before this one is written: it must
            // already pass these records over.
            let mut standings = self.standings.lock().unwrap();
            for (at, next) in &passed.next {
                let standing = standings.entry(at.clone()).or_default();
                standing.progress.next = *next;
                standing.keyed = false;
            }
        }
        let (queued, next_waits) = tokio::sync::oneshot::channel();
        let previous = self.last_queued.lock().unwrap().replace(next_waits);
        let inliner = self.inliner.clone();
        Written(tokio::spawn(async move {
            if let Some(previous) = previous {
                // An error: the previous task is gone (aborted with this
                // one, or it panicked); either way this one may go on.
                let _ = previous.await;
            }
            let (records, settle) = inliner.run(records).await;
            let durable = write_batch(&inliner, records, settle, passed);
            let _ = queued.send(());
            durable.await.ok()
        }))
    }

    /// Where the subscription stands in `topic`/`partition` (read from the
    /// store the first time).
    fn standing(&self, topic: &str, partition: i32) -> Standing {
        let mut standings = self.standings.lock().unwrap();
        if let Some(standing) = standings.get(&(topic.to_string(), partition)) {
            return *standing;
        }
        let store = self.invoker.store();
        let read = store
            .progress(&self.record.id, topic, partition)
            .and_then(|progress| {
                Ok(match progress {
                    Some(progress) => Standing {
                        progress,
                        keyed: false,
                    },
                    // A subscription that ingested before progress rows
                    // existed: this partition's records dedupe by key
                    // until its first batch writes one.
                    None => Standing {
                        progress: Progress::default(),
                        keyed: store.ingested(&self.record.id)? > 0
                            && !store.has_progress(&self.record.id)?,
                    },
                })
            });
        let standing = read.unwrap_or_else(|e| {
            tracing::error!(subscription = %self.record.id, "cannot read the progress of {topic}/{partition}: {e}");
            Standing { progress: Progress::default(), keyed: true }
        });
        standings.insert((topic.to_string(), partition), standing);
        standing
    }

    /// Whether an operator skipped the record at `at` (once).
    fn is_skipped(&self, (topic, partition, offset): &Position) -> bool {
        let mut skips = self.skips.lock().unwrap();
        if skips.is_empty() {
            return false; // the usual case: no key to build per record
        }
        let key = (topic.clone(), *partition);
        let hit = skips.get(&key) == Some(offset);
        if hit {
            skips.remove(&key);
        }
        hit
    }

    /// Commit offsets to the consumer group and remember them; a failure
    /// only means redelivery (passed over by offset), so it is logged and
    /// the offsets are answered back, after a pause, to go with the next
    /// commit.
    async fn commit_offsets(
        &self,
        offsets: BTreeMap<(String, i32), i64>,
    ) -> Option<BTreeMap<(String, i32), i64>> {
        let mut list = TopicPartitionList::new();
        for ((topic, partition), next) in &offsets {
            let _ = list.add_partition_offset(topic, *partition, Offset::Offset(*next));
        }
        let consumer = self.consumer.clone();
        let done = tokio::task::spawn_blocking(move || consumer.commit(&list, CommitMode::Sync))
            .await
            .expect("the commit does not panic");
        match done {
            Ok(()) => {
                self.committed(offsets);
                None
            }
            Err(e) => {
                tracing::warn!(subscription = %self.record.id, "offset commit failed: {e}; retried with the next offsets");
                tokio::time::sleep(Duration::from_millis(500)).await;
                Some(offsets)
            }
        }
    }

    /// `offsets` are committed to the consumer group: remember it (not
    /// waited for; a crash before it is durable only leaves an older
    /// `committed`, which accepts more redeliveries, all below `next`).
    fn committed(&self, offsets: BTreeMap<(String, i32), i64>) {
        let mut standings = self.standings.lock().unwrap();
        for (at, committed) in &offsets {
            standings.entry(at.clone()).or_default().progress.committed = *committed;
        }
        let id = self.record.id.clone();
        self.invoker.committer().append(move |t| {
            for ((topic, partition), committed) in offsets {
                t.put_progress(Mark::Committed, (&id, &topic, partition), committed)?;
            }
            Ok(())
        });
    }

    /// Stop on a record: pause the subscription durably, with the reason.
    async fn stop_on(&self, reason: String) {
        tracing::error!(subscription = %self.record.id, "{reason}");
        let id = self.record.id.clone();
        self.invoker
            .committer()
            .commit(move |t| t.stop_subscription(&id, &reason).map(drop))
            .await;
    }

    /// Export the span of a record's ingest (the new invocation is its child).
    fn trace_ingest(
        &self,
        (parent, span, received): Traced,
        (topic, partition, offset): &Position,
        id: &crate::ids::InvocationId,
    ) {
        use opentelemetry::KeyValue;
        crate::traces::Traces::get().emit(crate::traces::Span {
            name: format!("ingest {topic}"),
            me: span,
            parent,
            kind: opentelemetry::trace::SpanKind::Consumer,
            start: received,
            end: std::time::SystemTime::now(),
            attributes: vec![
                KeyValue::new("messaging.system", "kafka"),
                KeyValue::new("messaging.destination.name", topic.clone()),
                KeyValue::new("messaging.destination.partition.id", partition.to_string()),
                KeyValue::new("messaging.kafka.offset", *offset),
                KeyValue::new("cairn.subscription", self.record.id.clone()),
                KeyValue::new("cairn.invocation.id", id.to_string()),
            ],
            error: None,
        });
    }

    /// The invocation a record becomes; with its ingest span (the record's
    /// own `traceparent` header, if any, its parent) when traces are on.
    /// `key_per_record`: it also dedupes by an idempotency key of its
    /// position (see [`Standing::keyed`]).
    fn request(&self, r: OwnedRecord, key_per_record: bool) -> (NewInvocation, Option<Traced>) {
        let keyed = self
            .invoker
            .registry()
            .service(&self.record.service)
            .is_some_and(|(s, _)| s.kind != crate::records::ServiceKind::Service);
        let mut headers = vec![
            ("x-kafka-topic".to_string(), r.topic.clone()),
            ("x-kafka-partition".to_string(), r.partition.to_string()),
            ("x-kafka-offset".to_string(), r.offset.to_string()),
        ];
        if let Some(key) = &r.key {
            headers.push(("x-kafka-key".to_string(), object_key(Some(key))));
        }
        if let Some(ts) = r.timestamp {
            headers.push(("x-kafka-timestamp".to_string(), ts.to_string()));
        }
        // Offsets dedupe redeliveries (see [`Progress`]); a record Cairn
        // produced also dedupes by its produce id, the same whatever
        // offset a retried produce landed at.
        let (name, produced) = match r.headers.iter().find(|(k, _)| k == PRODUCE_ID) {
            Some((_, id)) => (format!("kafka-produce:{}:{id}", self.record.id), true),
            None => {
                let (sub, topic) = (&self.record.id, &r.topic);
                (
                    format!("kafka:{sub}:{topic}:{}:{}", r.partition, r.offset),
                    false,
                )
            }
        };
        let dedupe = (produced || key_per_record).then(|| name.clone());
        let (key, reject) = match mapped_key(&self.record.delivery.key, &r) {
            Some(key) => (key, None),
            None => match self.record.delivery.null_key {
                NullKey::Empty => (String::new(), None),
                NullKey::Spread => (format!("{}:{}:{}", r.topic, r.partition, r.offset), None),
                NullKey::DeadLetter => {
                    let why = format!("the record has no key ({})", self.record.delivery.key);
                    (String::new(), Some(why))
                }
            },
        };
        let traced = crate::traces::Traces::get().enabled().then(|| {
            let parent = crate::traces::parent_in(&r.headers);
            let span = crate::traces::ingest_span(parent, &name);
            (parent, span, std::time::SystemTime::now())
        });
        headers.extend(r.headers);
        if let Some((_, span, _)) = &traced {
            headers.retain(|(name, _)| name != crate::traces::TRACEPARENT);
            headers.push((crate::traces::TRACEPARENT.to_string(), span.header()));
        }
        let target = Target {
            service: self.record.service.clone(),
            handler: self.record.handler.clone(),
            key: keyed.then_some(key),
        };
        let request = NewInvocation {
            // A service's records spread over the partitions by position.
            id: Some(self.invoker.new_id(&target, Some(&name))),
            target,
            input: r.value,
            headers,
            idempotency_key: dedupe,
            source: Some(self.record.id.clone()),
            reject,
            ..Default::default()
        };
        (request, traced)
    }
}

/// A record's topic, partition and offset.
type Position = (String, i32, i64);

/// Queue one job: write a batch's new records, in order (create
/// invocations, apply inline writes; see [`Inliner::write`]), move each
/// partition's progress past them, count them, and drop the skip rows of
/// the records skipped. It answers the records' ids, in order, once
/// durable, after `settle` lets the batch's keys go.
fn write_batch(
    inliner: &Arc<Inliner>,
    records: Vec<Ingested>,
    settle: Settle,
    passed: Passed,
) -> tokio::sync::oneshot::Receiver<Vec<crate::invoker::Submitted>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let Passed {
        subscription: id,
        next,
        skipped,
    } = passed;
    let me = inliner.clone();
    inliner.committer().submit(Box::new(move |t| {
        let created = me.write(t, records)?;
        for ((topic, partition), next) in &next {
            t.put_progress(Mark::Next, (&id, topic, *partition), *next)?;
        }
        for (topic, partition, _) in skipped {
            t.take_skip(&id, &topic, partition)?;
        }
        t.count_ingested(&id, created.iter().filter(|c| !c.existing).count() as u64)?;
        Ok(Box::new(move || {
            drop(settle);
            let _ = tx.send(created);
        }))
    }));
    rx
}

/// Merge `offsets` into `into`, keeping each partition's furthest.
fn merge(into: &mut BTreeMap<(String, i32), i64>, offsets: BTreeMap<(String, i32), i64>) {
    for (at, next) in offsets {
        let entry = into.entry(at).or_insert(next);
        *entry = (*entry).max(next);
    }
}

/// Await the future in `slot`, if there is one (never ready otherwise).
async fn in_flight<F: std::future::Future + Unpin>(slot: &mut Option<F>) -> F::Output {
    match slot {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// The offset after the last of `positions` in each partition.
fn last_offsets<'a>(positions: impl Iterator<Item = &'a Position>) -> BTreeMap<(String, i32), i64> {
    positions
        .map(|(topic, partition, offset)| ((topic.clone(), *partition), offset + 1))
        .collect()
}

/// Why a subscription stops on a record below the offset it committed.
const WENT_BACK: &str = "lies below the offset this subscription already committed in its \
    partition: the log went back (was the topic deleted and re-created, or the consumer \
    group's offsets reset?). To read the topic anew, delete the subscription and create it again";

/// Where [`Ingest`] stands in one partition of a topic.
#[derive(Clone, Copy, Debug, Default)]
struct Standing {
    progress: Progress,
    /// Records dedupe by a key each, as before progress rows existed (a
    /// subscription that ingested from the partition without one), until
    /// its first batch writes one.
    keyed: bool,
}

fn stopped_at((topic, partition, offset): &Position, why: &str) -> String {
    format!(
        "stopped at {topic}/{partition}@{offset}: the record {why}; fix the cause, then resume \
         the subscription (or skip the record: `cairn subscriptions skip SUBSCRIPTION --topic {topic} \
         --partition {partition} --offset {offset}`)"
    )
}

/// The object key `source` names in record `r`, if it has one.
fn mapped_key(source: &KeySource, r: &OwnedRecord) -> Option<String> {
    match source {
        KeySource::Record => r.key.as_deref().map(|k| object_key(Some(k))),
        KeySource::Header(name) => r
            .headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone()),
        KeySource::Json(pointer) => {
            let value: serde_json::Value = serde_json::from_slice(&r.value).ok()?;
            match value.pointer(pointer)? {
                serde_json::Value::Null => None,
                serde_json::Value::String(s) => Some(s.clone()),
                other => Some(other.to_string()),
            }
        }
    }
}

/// A record's ingest span: its parent, itself, and when the record arrived.
type Traced = (
    Option<crate::traces::SpanRef>,
    crate::traces::SpanRef,
    std::time::SystemTime,
);

/// A record copied out of the consumer's buffer.
struct OwnedRecord {
    topic: String,
    partition: i32,
    offset: i64,
    timestamp: Option<i64>,
    key: Option<Vec<u8>>,
    value: Vec<u8>,
    headers: Vec<(String, String)>,
}

impl From<&BorrowedMessage<'_>> for OwnedRecord {
    fn from(m: &BorrowedMessage<'_>) -> Self {
        let headers = m
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| {
                        (
                            h.key.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        OwnedRecord {
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            timestamp: m.timestamp().to_millis(),
            key: m.key().map(<[u8]>::to_vec),
            value: m.payload().unwrap_or_default().to_vec(),
            headers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_settled_during_a_group_commit_merge_to_each_partitions_furthest() {
        let at = |t: &str, p: i32, o: i64| ((t.to_string(), p), o);
        let mut due = BTreeMap::from([at("a", 0, 10), at("a", 1, 7)]);
        // A failed commit's offsets come back after newer ones were settled.
        merge(&mut due, BTreeMap::from([at("a", 0, 4), at("b", 0, 3)]));
        merge(&mut due, BTreeMap::from([at("a", 1, 9)]));
        assert_eq!(
            due,
            BTreeMap::from([at("a", 0, 10), at("a", 1, 9), at("b", 0, 3)])
        );
    }

    #[test]
    fn record_keys_map_to_object_keys_reversibly() {
        assert_eq!(object_key(Some(b"alice")), "alice");
        assert_eq!(object_key(Some(&[0xff, 0x00])), "hex:ff00");
        assert_eq!(
            object_key(Some(b"hex:41")),
            "hex:6865783a3431",
            "a UTF-8 key that looks encoded is encoded"
        );
        assert_eq!(
            object_key(None),
            "",
            "a record without a key goes to the empty key"
        );
        assert_ne!(object_key(Some(b"")), object_key(Some(b"hex:")));
    }
}
