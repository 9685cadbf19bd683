//! Kafka helpers for tests: the real broker started by `scripts/kafka.sh`,
//! topics, a producer, and subscribing a host to a topic.

use crate::Host;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};
use std::time::Duration;

/// The broker's address: `CAIRN_KAFKA_BOOTSTRAP`, default `127.0.0.1:9092`.
pub fn bootstrap() -> String {
    std::env::var("CAIRN_KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// Fail loudly, with the fix, when no broker answers.
pub fn require_broker() -> String {
    let addr = bootstrap();
    assert!(
        std::net::TcpStream::connect(&addr).is_ok(),
        "no Kafka broker at {addr}: start one with `scripts/kafka.sh start` (scripts/test.sh does)"
    );
    addr
}

/// A topic name no other test uses.
pub fn unique_topic(prefix: &str) -> String {
    format!("{prefix}-{}", std::process::id()) + &format!("-{}", rand_suffix())
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish() % 1_000_000_000
}

/// Create a topic with `partitions` partitions on `bootstrap`.
pub async fn create_topic_on(bootstrap: &str, topic: &str, partitions: i32) {
    create_replicated_topic(bootstrap, topic, partitions, 1).await;
}

/// Create a topic with `partitions` partitions of `replicas` replicas each.
pub async fn create_replicated_topic(bootstrap: &str, topic: &str, partitions: i32, replicas: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("an admin client");
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(replicas));
    for attempt in 0..60 {
        match admin.create_topics([&new], &AdminOptions::new()).await {
            Ok(results) if results.iter().all(|r| r.is_ok()) => return,
            other if attempt == 59 => panic!("cannot create topic {topic}: {other:?}"),
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// Delete a topic on the default broker and wait until it is gone.
pub async fn delete_topic(topic: &str) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", require_broker())
        .create()
        .expect("an admin client");
    let results = admin
        .delete_topics(&[topic], &AdminOptions::new())
        .await
        .expect("the broker answers");
    assert!(
        results.iter().all(|r| r.is_ok()),
        "delete {topic}: {results:?}"
    );
}

/// Create a topic on the default broker.
pub async fn create_topic(topic: &str, partitions: i32) {
    create_topic_on(&require_broker(), topic, partitions).await;
}

/// An idempotent producer for `bootstrap`.
pub fn producer_on(bootstrap: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "120000")
        .create()
        .expect("a producer")
}

/// One record to produce.
pub struct Record {
    /// Key bytes.
    pub key: Option<Vec<u8>>,
    /// Value bytes.
    pub value: Vec<u8>,
    /// Headers.
    pub headers: Vec<(String, String)>,
}

impl Record {
    /// A record with a UTF-8 key and a JSON value.
    pub fn json(key: &str, value: &Value) -> Self {
        Record {
            key: Some(key.as_bytes().to_vec()),
            value: value.to_string().into_bytes(),
            headers: vec![],
        }
    }
}

/// Produce records in order and wait until the broker has them all.
pub async fn produce_with(producer: &FutureProducer, topic: &str, records: Vec<Record>) {
    let mut pending = Vec::with_capacity(records.len());
    for r in records {
        let mut headers = OwnedHeaders::new();
        for (k, v) in &r.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let mut record = FutureRecord::to(topic).payload(&r.value).headers(headers);
        if let Some(key) = &r.key {
            record = record.key(key);
        }
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    pending.push(delivery);
                    break;
                }
                Err((_, back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }
    for d in pending {
        d.await
            .expect("delivered")
            .expect("acknowledged by the broker");
    }
}

/// Produce to the default broker.
pub async fn produce(topic: &str, records: Vec<Record>) {
    produce_with(&producer_on(&require_broker()), topic, records).await;
}

/// Register the broker as cluster "local" and subscribe `topic` to `sink`.
pub async fn subscribe(host: &Host, bootstrap: &str, topic: &str, sink: &str) -> String {
    let cluster = json!({ "name": "local", "properties": { "bootstrap.servers": bootstrap } });
    let r = host.admin_post("/kafka-clusters", Some(&cluster)).await;
    assert_eq!(r.status, 201);
    let sub = json!({ "source": format!("kafka://local/{topic}"), "sink": sink });
    let r = host.admin_post("/subscriptions", Some(&sub)).await;
    assert_eq!(r.status, 201);
    r.json()["id"].as_str().unwrap().to_string()
}

/// A record read back: (key, value, headers).
pub type ReadRecord = (Option<Vec<u8>>, Vec<u8>, Vec<(String, String)>);

/// Every record of partition 0 of `topic`.
pub async fn read_all(bootstrap: &str, topic: &str) -> Vec<ReadRecord> {
    read_partition(bootstrap, topic, 0).await
}

/// Every record of every partition of `topic`, partition by partition.
pub async fn read_partitions(bootstrap: &str, topic: &str) -> Vec<ReadRecord> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("a consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let partitions: Vec<i32> = metadata.topics()[0]
        .partitions()
        .iter()
        .map(|p| p.id())
        .collect();
    let mut out = Vec::new();
    for p in partitions {
        out.extend(read_partition(bootstrap, topic, p).await);
    }
    out
}

/// Every record of partition `partition` of `topic`.
pub async fn read_partition(bootstrap: &str, topic: &str, partition: i32) -> Vec<ReadRecord> {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::{Headers, Message};
    use rdkafka::{Offset, TopicPartitionList};
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("reader-{topic}"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("a consumer");
    let (low, high) = consumer
        .fetch_watermarks(topic, partition, Duration::from_secs(10))
        .expect("watermarks");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    while (out.len() as i64) < high - low {
        let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("records arrive")
            .unwrap();
        let headers = m
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| {
                        (
                            h.key.to_string(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push((
            m.key().map(<[u8]>::to_vec),
            m.payload().unwrap_or_default().to_vec(),
            headers,
        ));
    }
    out
}
