//! Kafka subscriptions: every record of a topic becomes exactly one durable
//! invocation of a handler.
//!
//! Lifecycle: a subscription (stored in redb) gets one consumer task while
//! it exists and is not paused. The task reads records in batches and
//! queues one invocation per record *in offset order* (so the per-key
//! queues of virtual objects see a key's records in order, while different
//! keys run concurrently). Once the whole batch is durable it commits the
//! offsets to Kafka. A record delivered again after a crash or a rebalance
//! carries the same idempotency key, `kafka:{subscription}:{topic}:{partition}:{offset}`,
//! so it maps to the invocation that already exists: exactly one invocation
//! per record.
//!
//! Nothing is skipped without a trace. A record that cannot become an
//! invocation (its handler was removed by a new deployment, say), or whose
//! idempotency key already belongs to a *different* record (the topic was
//! deleted and re-created while the old keys were retained), stops the
//! subscription on that record: its offset is not committed, the
//! subscription is paused, and the reason is shown (`stopped`) until an
//! operator resumes it. Offsets are committed synchronously, and a failed
//! commit is retried and logged (the records would only be redelivered and
//! deduplicated).
//!
//! Backpressure: when a subscription's unfinished invocations pass
//! `kafka.max_in_flight`, its partitions are paused until they drain to half
//! of that. Nothing is dropped; the log holds what is not yet ingested.
//!
//! Record keys become object keys. Keys that are UTF-8 (and do not start
//! with `hex:`) are used as they are; other keys are written `hex:` followed
//! by the bytes in lower-case hex, which is reversible. The handler sees the
//! record's topic, partition, offset, timestamp, key and headers as
//! invocation headers (`x-kafka-*` plus the record's own headers).

use crate::invoker::{Invoker, NewInvocation};
use crate::records::{ClusterRecord, SubscriptionRecord, Target};
use crate::store::StoreError;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Largest batch of records queued before waiting for their commit.
const BATCH: usize = 2000;

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

/// Counters of one running subscription.
#[derive(Default)]
pub struct Stats {
    rate: AtomicU64,
    /// Per Kafka partition, the consumer lag librdkafka's statistics
    /// reported last (every second).
    lag: std::sync::Mutex<BTreeMap<i32, i64>>,
}

/// The consumer context of a subscription: keeps the lag from
/// librdkafka's statistics (for `/metrics`, without a broker round trip).
pub struct Context(Arc<Stats>);

impl rdkafka::ClientContext for Context {
    fn stats(&self, statistics: rdkafka::Statistics) {
        let lag: BTreeMap<i32, i64> = statistics
            .topics
            .values()
            .flat_map(|t| t.partitions.values())
            .filter(|p| p.partition >= 0 && p.consumer_lag >= 0)
            .map(|p| (p.partition, p.consumer_lag))
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
    /// Per Kafka partition, records not yet ingested.
    pub lag: BTreeMap<i32, i64>,
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
    /// Records not yet ingested, per partition (high watermark minus committed offset).
    pub lag: BTreeMap<i32, i64>,
    /// Why it stopped on a record, if it did (it stays paused until resumed).
    pub stopped: Option<String>,
}

/// The subscriptions of a host and their consumers.
pub struct Subscriptions {
    invoker: Arc<Invoker>,
    max_in_flight: usize,
    running: Mutex<HashMap<String, Running>>,
}

impl Subscriptions {
    /// Start a consumer for every stored, unpaused subscription.
    pub fn start(invoker: Arc<Invoker>, max_in_flight: usize) -> Result<Arc<Self>, StoreError> {
        let subs = Arc::new(Subscriptions {
            invoker,
            max_in_flight,
            running: Mutex::default(),
        });
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
    pub async fn put_cluster(&self, cluster: ClusterRecord) -> Result<(), SubscriptionError> {
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
        self.invoker
            .committer()
            .commit(move |t| t.put_cluster(&cluster))
            .await;
        Ok(())
    }

    /// Create a subscription from `kafka://cluster/topic` to `service://Name/handler`.
    pub async fn create(
        self: &Arc<Self>,
        source: &str,
        sink: &str,
        options: BTreeMap<String, String>,
    ) -> Result<SubscriptionRecord, SubscriptionError> {
        let invalid = |m: String| SubscriptionError::Invalid(m);
        let (cluster, topic) = source
            .strip_prefix("kafka://")
            .and_then(|s| s.split_once('/'))
            .filter(|(c, t)| !c.is_empty() && !t.is_empty())
            .ok_or_else(|| invalid(format!("source {source:?} is not kafka://cluster/topic")))?;
        let (service, handler) = sink
            .strip_prefix("service://")
            .and_then(|s| s.split_once('/'))
            .ok_or_else(|| invalid(format!("sink {sink:?} is not service://Name/handler")))?;
        let store = self.invoker.store();
        if !store.clusters()?.iter().any(|c| c.name == cluster) {
            return Err(invalid(format!(
                "unknown cluster {cluster}: register it with `cairn kafka-clusters add {cluster} -p bootstrap.servers=HOST:PORT` (or POST /kafka-clusters)"
            )));
        }
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
        let record = SubscriptionRecord {
            id: format!("sub_{}", uuid::Uuid::now_v7().simple()),
            cluster: cluster.into(),
            topic: topic.into(),
            service: service.into(),
            handler: handler.into(),
            options,
            paused: false,
        };
        let stored = record.clone();
        let created = self
            .invoker
            .committer()
            .commit(move |t| {
                let same = |s: &SubscriptionRecord| {
                    s.source() == stored.source() && s.sink() == stored.sink()
                };
                if t.subscriptions()?.iter().any(same) {
                    return Ok(false);
                }
                t.put_subscription(&stored).map(|_| true)
            })
            .await;
        if !created {
            return Err(SubscriptionError::Duplicate(format!(
                "a subscription from {} to {} exists already",
                record.source(),
                record.sink()
            )));
        }
        self.launch(record.clone())?;
        Ok(record)
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
        self.stop(id);
        if !paused {
            self.launch(record.clone())?;
        }
        Ok(record)
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
        let Some(cluster) = self
            .invoker
            .store()
            .clusters()?
            .into_iter()
            .find(|c| c.name == record.cluster)
        else {
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
            invoker: self.invoker.clone(),
            consumer: consumer.clone(),
            stats: stats.clone(),
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
                let topic = record.topic.clone();
                let lag = tokio::task::spawn_blocking(move || lag(&consumer, &topic))
                    .await
                    .unwrap_or_default();
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
    let mut config = ClientConfig::new();
    // librdkafka prefetches up to 100,000 records per partition and 64 MiB
    // per consumer by default; ingest is paced by `max_in_flight`, so a
    // smaller prefetch costs no throughput. The cluster's properties and the
    // subscription's options may raise it.
    config
        .set("queued.min.messages", "10000")
        .set("queued.max.messages.kbytes", "16384");
    for (k, v) in &cluster.properties {
        config.set(k, v);
    }
    config
        .set("group.id", format!("cairn-{}", sub.id))
        // Static membership: a host that restarts (even after SIGKILL) takes
        // its partitions back at once instead of waiting for the broker to
        // expire the dead member's session.
        .set("group.instance.id", format!("cairn-{}", sub.id))
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("statistics.interval.ms", "1000");
    for (k, v) in &sub.options {
        config.set(k, v);
    }
    config
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    let consumer: SubscriptionConsumer = config.create_with_context(context)?;
    consumer.subscribe(&[sub.topic.as_str()])?;
    Ok(consumer)
}

/// Per partition: high watermark minus committed offset.
fn lag(consumer: &SubscriptionConsumer, topic: &str) -> BTreeMap<i32, i64> {
    let timeout = Duration::from_secs(2);
    let Ok(assignment) = consumer.assignment() else {
        return BTreeMap::new();
    };
    let committed = consumer
        .committed_offsets(assignment.clone(), timeout)
        .unwrap_or(assignment);
    committed
        .elements_for_topic(topic)
        .iter()
        .filter_map(|e| {
            let (low, high) = consumer
                .fetch_watermarks(topic, e.partition(), timeout)
                .ok()?;
            let done = match e.offset() {
                Offset::Offset(o) => o,
                _ => low,
            };
            Some((e.partition(), (high - done).max(0)))
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

    fn producer(&self, cluster: &str) -> Result<rdkafka::producer::FutureProducer, String> {
        if let Some(p) = self.cache.lock().unwrap().get(cluster) {
            return Ok(p.clone());
        }
        let config = self
            .store
            .clusters()
            .map_err(|e| e.to_string())?
            .into_iter()
            .find(|c| c.name == cluster)
            .ok_or_else(|| format!("unknown Kafka cluster {cluster}"))?;
        let mut client = ClientConfig::new();
        for (k, v) in &config.properties {
            client.set(k, v);
        }
        let producer: rdkafka::producer::FutureProducer = client
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
            let mut record = rdkafka::producer::FutureRecord::to(r.topic)
                .payload(r.value)
                .headers(headers);
            if let Some(key) = r.key {
                record = record.key(key);
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
}

/// A record a guest produces (`kafka_produce`), performed by the host.
pub struct Produced<'a> {
    /// The produce's id (`invocation:command`), in header `cairn-produce-id`:
    /// a subscription that reads the record back ingests it once.
    pub produce_id: &'a str,
    /// The cluster's name, the topic, the record's key and value.
    pub cluster: &'a str,
    pub topic: &'a str,
    pub key: Option<&'a [u8]>,
    pub value: &'a [u8],
    /// The produce's span, as header `traceparent`, when traced.
    pub traceparent: Option<&'a str>,
}

/// One subscription's consumer loop.
struct Ingest {
    invoker: Arc<Invoker>,
    consumer: Arc<SubscriptionConsumer>,
    stats: Arc<Stats>,
    record: SubscriptionRecord,
    max_in_flight: usize,
    /// The last client error logged, and when (see [`Ingest::report`]).
    last_error: std::sync::Mutex<Option<(String, Instant)>>,
}

impl Ingest {
    async fn run(self) {
        tracing::info!(subscription = %self.record.id, source = %self.record.source(), sink = %self.record.sink(), "consuming");
        let mut window = (Instant::now(), 0u64);
        loop {
            self.wait_for_room().await;
            let batch = match self.next_batch().await {
                Ok(batch) => batch,
                Err(reason) => return self.stop_on(reason).await,
            };
            let (ingested, stop) = self.ingest(batch).await;
            metrics::counter!("cairn_subscription_ingested_total", "subscription" => self.record.id.clone())
                .increment(ingested);
            if let Some(reason) = stop {
                return self.stop_on(reason).await;
            }
            window.1 += ingested;
            if window.0.elapsed() >= Duration::from_secs(1) {
                let rate = window.1 as f64 / window.0.elapsed().as_secs_f64();
                self.stats.rate.store(rate as u64, Ordering::Relaxed);
                window = (Instant::now(), 0);
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
        while batch.len() < BATCH {
            match tokio::time::timeout(Duration::from_millis(2), self.consumer.recv()).await {
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

    /// Queue one invocation per record, in order; once all are durable,
    /// commit the offsets. Returns how many records became invocations, and
    /// why the subscription must stop, if it must: then no offset at or
    /// past the offending record of its partition is committed, and no
    /// later record of that partition is ingested.
    async fn ingest(&self, batch: Vec<OwnedRecord>) -> (u64, Option<String>) {
        let mut queued = Vec::with_capacity(batch.len());
        let mut stop: Option<(i32, String)> = None;
        let mut offsets: BTreeMap<i32, i64> = BTreeMap::new();
        for record in batch {
            if stop.as_ref().is_some_and(|(p, _)| *p == record.partition) {
                continue;
            }
            let at = (record.partition, record.offset);
            let fingerprint = fingerprint(&record);
            let (request, traced) = self.request(record);
            match self.invoker.submit_queued(request) {
                Ok(answer) => queued.push((at, fingerprint, answer, traced)),
                Err(e) => {
                    let reason = self.stopped_at(at, &format!("cannot be ingested: {e}"));
                    stop.get_or_insert((at.0, reason));
                }
            }
        }
        let mut ingested = 0;
        for ((partition, offset), fingerprint, answer, traced) in queued {
            let Ok(submitted) = answer.await else {
                continue;
            };
            if stop.as_ref().is_some_and(|(p, _)| *p == partition) {
                continue; // ingested after an earlier record of its partition stopped: redelivered, deduplicated
            }
            let collides = fingerprint.is_some_and(|f| !self.same_record(&submitted.id, f));
            if submitted.existing && collides {
                let why = format!(
                    "collides with an earlier record at the same offset ({} has its \
                     idempotency key): was the topic deleted and re-created?",
                    submitted.id
                );
                stop = Some((partition, self.stopped_at((partition, offset), &why)));
                continue;
            }
            if let (Some(traced), false) = (traced, submitted.existing) {
                self.trace_ingest(traced, (partition, offset), &submitted.id);
            }
            ingested += 1;
            offsets.insert(partition, offset + 1);
        }
        self.commit_offsets(offsets).await;
        (ingested, stop.map(|(_, reason)| reason))
    }

    fn stopped_at(&self, (partition, offset): (i32, i64), why: &str) -> String {
        format!(
            "stopped at {}/{partition}@{offset}: the record {why}; fix the cause, then resume the subscription",
            self.record.topic
        )
    }

    /// Whether invocation `id` was created from the record with this fingerprint.
    fn same_record(&self, id: &crate::ids::InvocationId, fingerprint: u64) -> bool {
        match self.invoker.store().invocation(id) {
            Ok(Some(r)) => invocation_fingerprint(&r) == fingerprint,
            // Forgotten meanwhile: its key went with it, nothing collides.
            Ok(None) => true,
            Err(e) => {
                tracing::warn!(subscription = %self.record.id, "cannot check a redelivered record: {e}");
                true
            }
        }
    }

    /// Commit offsets synchronously, retrying a few times; a failure only
    /// means redelivery (deduplicated), so it is logged, not fatal.
    async fn commit_offsets(&self, offsets: BTreeMap<i32, i64>) {
        if offsets.is_empty() {
            return;
        }
        let mut list = TopicPartitionList::new();
        for (partition, next) in offsets {
            let _ = list.add_partition_offset(&self.record.topic, partition, Offset::Offset(next));
        }
        for attempt in 1..=5u32 {
            let (consumer, list2) = (self.consumer.clone(), list.clone());
            let done =
                tokio::task::spawn_blocking(move || consumer.commit(&list2, CommitMode::Sync))
                    .await
                    .expect("the commit does not panic");
            match done {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(subscription = %self.record.id, attempt, "offset commit failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                }
            }
        }
        tracing::error!(subscription = %self.record.id, "offsets not committed after 5 tries; the records will be redelivered and deduplicated");
    }

    /// Stop on a record: pause the subscription durably, with the reason.
    async fn stop_on(&self, reason: String) {
        tracing::error!(subscription = %self.record.id, "{reason}");
        let mut record = self.record.clone();
        record.paused = true;
        self.invoker
            .committer()
            .commit(move |t| {
                t.set_subscription_stop(&record.id, Some(&reason))?;
                t.put_subscription(&record)
            })
            .await;
    }

    /// Export the span of a record's ingest (the new invocation is its child).
    fn trace_ingest(
        &self,
        (parent, span, received): Traced,
        (partition, offset): (i32, i64),
        id: &crate::ids::InvocationId,
    ) {
        use opentelemetry::KeyValue;
        crate::traces::Traces::get().emit(crate::traces::Span {
            name: format!("ingest {}", self.record.topic),
            me: span,
            parent,
            kind: opentelemetry::trace::SpanKind::Consumer,
            start: received,
            end: std::time::SystemTime::now(),
            attributes: vec![
                KeyValue::new("messaging.system", "kafka"),
                KeyValue::new("messaging.destination.name", self.record.topic.clone()),
                KeyValue::new("messaging.destination.partition.id", partition.to_string()),
                KeyValue::new("messaging.kafka.offset", offset),
                KeyValue::new("cairn.subscription", self.record.id.clone()),
                KeyValue::new("cairn.invocation.id", id.to_string()),
            ],
            error: None,
        });
    }

    /// The invocation a record becomes; with its ingest span (the record's
    /// own `traceparent` header, if any, its parent) when traces are on.
    fn request(&self, r: OwnedRecord) -> (NewInvocation, Option<Traced>) {
        let keyed = self
            .invoker
            .registry()
            .service(&self.record.service)
            .is_some_and(|(s, _)| s.kind != crate::records::ServiceKind::Service);
        let key = object_key(r.key.as_deref());
        let mut headers = vec![
            ("x-kafka-topic".to_string(), self.record.topic.clone()),
            ("x-kafka-partition".to_string(), r.partition.to_string()),
            ("x-kafka-offset".to_string(), r.offset.to_string()),
            ("x-kafka-key".to_string(), key.clone()),
        ];
        if let Some(ts) = r.timestamp {
            headers.push(("x-kafka-timestamp".to_string(), ts.to_string()));
        }
        let dedupe = match r.headers.iter().find(|(k, _)| k == PRODUCE_ID) {
            Some((_, id)) => format!("kafka-produce:{}:{id}", self.record.id),
            None => format!(
                "kafka:{}:{}:{}:{}",
                self.record.id, self.record.topic, r.partition, r.offset
            ),
        };
        let traced = crate::traces::Traces::get().enabled().then(|| {
            let parent = crate::traces::parent_in(&r.headers);
            let span = crate::traces::ingest_span(parent, &dedupe);
            (parent, span, std::time::SystemTime::now())
        });
        headers.extend(r.headers);
        if let Some((_, span, _)) = &traced {
            headers.retain(|(name, _)| name != crate::traces::TRACEPARENT);
            headers.push((crate::traces::TRACEPARENT.to_string(), span.header()));
        }
        let request = NewInvocation {
            target: Target {
                service: self.record.service.clone(),
                handler: self.record.handler.clone(),
                key: keyed.then_some(key),
            },
            input: r.value,
            headers,
            idempotency_key: Some(dedupe),
            source: Some(self.record.id.clone()),
            ..Default::default()
        };
        (request, traced)
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
            partition: m.partition(),
            offset: m.offset(),
            timestamp: m.timestamp().to_millis(),
            key: m.key().map(<[u8]>::to_vec),
            value: m.payload().unwrap_or_default().to_vec(),
            headers,
        }
    }
}

/// FNV-1a over a record's value and timestamp: tells a redelivery of the
/// same record from another record that reuses its topic, partition and
/// offset. `None` for records Cairn produced: their key is the produce id,
/// and a produce retried after a crash is the same record with a new
/// timestamp.
fn fingerprint(record: &OwnedRecord) -> Option<u64> {
    if record.headers.iter().any(|(k, _)| k == PRODUCE_ID) {
        return None;
    }
    Some(fnv(
        &record.value,
        record.timestamp.map(|t| t.to_string()).as_deref(),
    ))
}

fn invocation_fingerprint(r: &crate::records::InvocationRecord) -> u64 {
    let timestamp = r
        .headers
        .iter()
        .find(|(k, _)| k == "x-kafka-timestamp")
        .map(|(_, v)| v.as_str());
    fnv(&r.input, timestamp)
}

fn fnv(value: &[u8], timestamp: Option<&str>) -> u64 {
    let bytes = value
        .iter()
        .chain([0xff].iter())
        .chain(timestamp.unwrap_or("").as_bytes());
    bytes.fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
