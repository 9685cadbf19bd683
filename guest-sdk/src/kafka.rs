//! Kafka from a handler: the record that started an invocation (typed, not
//! only as `x-kafka-*` headers), values that are not JSON ([`Raw`]), and
//! records to produce with headers, raw bytes and a partition
//! ([`Context::kafka_send`](crate::Context::kafka_send)).

use crate::{HandlerError, TerminalError};
use serde::{de::DeserializeOwned, Serialize};

/// A handler input taken as the body's bytes, not decoded as JSON: for
/// Kafka values in Avro, Protobuf, CSV or plain text.
///
/// ```ignore
/// pub fn ingest(ctx: &Context, line: Raw) -> HandlerResult<usize> {
///     Ok(String::from_utf8_lossy(&line.0).split(',').count())
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Raw(pub Vec<u8>);

/// What a handler's input is made from: JSON for serde types, the bytes
/// themselves for [`Raw`].
pub trait Input: Sized {
    /// Decode the invocation's body.
    fn from_payload(payload: &[u8]) -> Result<Self, HandlerError>;
}

impl<T: DeserializeOwned> Input for T {
    fn from_payload(payload: &[u8]) -> Result<Self, HandlerError> {
        // An empty body reads as `null` (so `Option` inputs accept it).
        let body: &[u8] = if payload.iter().all(u8::is_ascii_whitespace) {
            b"null"
        } else {
            payload
        };
        serde_json::from_slice(body).map_err(|e| {
            TerminalError::with_code(400, format!("cannot decode the handler's input: {e}")).into()
        })
    }
}

impl Input for Raw {
    fn from_payload(payload: &[u8]) -> Result<Self, HandlerError> {
        Ok(Raw(payload.to_vec()))
    }
}

/// The Kafka record an invocation was created from
/// ([`Context::kafka_record`](crate::Context::kafka_record)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaRecord {
    /// Its topic.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its timestamp, ms since the epoch.
    pub timestamp_ms: Option<i64>,
    /// Its key (`None`: the record had none).
    pub key: Option<Vec<u8>>,
    /// Its own headers (names lower-case, values as text).
    pub headers: Vec<(String, String)>,
}

impl KafkaRecord {
    /// The record described by an invocation's headers, if it came from one.
    pub(crate) fn from_headers<'a>(
        headers: impl Iterator<Item = (&'a str, &'a str)> + Clone,
    ) -> Option<KafkaRecord> {
        let find = |name: &str| headers.clone().find(|(k, _)| *k == name).map(|(_, v)| v);
        Some(KafkaRecord {
            topic: find("x-kafka-topic")?.to_string(),
            partition: find("x-kafka-partition")?.parse().ok()?,
            offset: find("x-kafka-offset")?.parse().ok()?,
            timestamp_ms: find("x-kafka-timestamp").and_then(|t| t.parse().ok()),
            key: find("x-kafka-key").map(record_key),
            headers: headers
                .filter(|(k, _)| !k.starts_with("x-kafka-") && *k != "cairn-produce-id")
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    }
}

/// The bytes of a key as the host writes it (`hex:` for keys that are
/// not UTF-8).
fn record_key(written: &str) -> Vec<u8> {
    let hex = written.strip_prefix("hex:").filter(|h| h.len() % 2 == 0);
    let decoded = hex.and_then(|h| {
        (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&h[i..i + 2], 16).ok())
            .collect::<Option<Vec<u8>>>()
    });
    decoded.unwrap_or_else(|| written.as_bytes().to_vec())
}

/// A record to produce with [`Context::kafka_send`](crate::Context::kafka_send).
///
/// ```ignore
/// let sent = ctx.kafka_send(
///     Record::new("main", "audit")
///         .key("order-7")
///         .bytes(b"plain text".to_vec())
///         .header("content-type", "text/plain"),
/// ).wait()?;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub(crate) cluster: String,
    pub(crate) topic: String,
    pub(crate) partition: Option<i32>,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) value: Vec<u8>,
    pub(crate) headers: Vec<(String, Vec<u8>)>,
}

impl Record {
    /// An empty record for `topic` of the registered cluster `cluster`.
    pub fn new(cluster: &str, topic: &str) -> Self {
        Record {
            cluster: cluster.into(),
            topic: topic.into(),
            partition: None,
            key: None,
            value: Vec::new(),
            headers: Vec::new(),
        }
    }

    /// Its key (the partition follows from it unless [`Record::partition`]).
    pub fn key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Send it to this partition.
    pub fn partition(mut self, partition: i32) -> Self {
        self.partition = Some(partition);
        self
    }

    /// Its value, as these bytes.
    pub fn bytes(mut self, value: impl Into<Vec<u8>>) -> Self {
        self.value = value.into();
        self
    }

    /// Its value, as JSON.
    pub fn json<V: Serialize>(mut self, value: &V) -> Self {
        self.value = serde_json::to_vec(value).expect("record values serialize to JSON");
        self
    }

    /// Add a header.
    pub fn header(mut self, name: &str, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_back_from_the_invocation_headers() {
        let headers = [
            ("x-kafka-topic", "orders"),
            ("x-kafka-partition", "3"),
            ("x-kafka-offset", "41"),
            ("x-kafka-key", "hex:ff00"),
            ("x-kafka-timestamp", "1700000000000"),
            ("x-trace", "abc"),
        ];
        let record = KafkaRecord::from_headers(headers.iter().copied()).unwrap();
        assert_eq!(
            (record.topic.as_str(), record.partition, record.offset),
            ("orders", 3, 41)
        );
        assert_eq!(record.key, Some(vec![0xff, 0x00]));
        assert_eq!(record.timestamp_ms, Some(1_700_000_000_000));
        assert_eq!(
            record.headers,
            vec![("x-trace".to_string(), "abc".to_string())]
        );
        assert!(KafkaRecord::from_headers([("x-trace", "abc")].iter().copied()).is_none());
    }

    #[test]
    fn raw_inputs_take_the_bytes_and_json_inputs_decode() {
        assert_eq!(Raw::from_payload(b"a,b").unwrap(), Raw(b"a,b".to_vec()));
        assert_eq!(i64::from_payload(b"42").unwrap(), 42);
        assert_eq!(Option::<i64>::from_payload(b"").unwrap(), None);
        assert!(i64::from_payload(b"a,b").is_err());
    }
}
