//! The records the store keeps: invocations, their targets and deployments.
//!
//! These are plain data with serde derives; `store` decides how they are
//! laid out in redb and `admin` how they are shown.

use crate::ids::{DeploymentId, InvocationId};
use crate::journal::Outcome;
use serde::{Deserialize, Serialize};

/// The kind of a service (mirrors the WIT `service-kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceKind {
    /// Stateless.
    Service,
    /// Keyed state, exclusive/shared handlers.
    VirtualObject,
    /// Keyed by workflow id.
    Workflow,
}

/// How a handler runs with respect to its key (mirrors `handler-kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HandlerKind {
    /// One at a time per key.
    Exclusive,
    /// Concurrent, read-only.
    Shared,
    /// A workflow's main handler.
    Workflow,
}

/// A handler as a deployment declares it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandlerInfo {
    /// Handler name.
    pub name: String,
    /// Concurrency kind.
    pub kind: HandlerKind,
}

/// A service as a deployment declares it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    /// Service name.
    pub name: String,
    /// Service kind.
    pub kind: ServiceKind,
    /// Its handlers.
    pub handlers: Vec<HandlerInfo>,
}

impl ServiceInfo {
    /// The named handler, if the service has it.
    pub fn handler(&self, name: &str) -> Option<&HandlerInfo> {
        self.handlers.iter().find(|h| h.name == name)
    }
}

/// An uploaded module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentRecord {
    /// Content-derived id.
    pub id: DeploymentId,
    /// The services it implements.
    pub services: Vec<ServiceInfo>,
    /// Upload time, ms since the epoch.
    pub created_ms: u64,
    /// Size of the component, bytes.
    pub size: u64,
}

/// What an invocation invokes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Target {
    /// Service name.
    pub service: String,
    /// Handler name.
    pub handler: String,
    /// Object key or workflow id; `None` for services.
    pub key: Option<String>,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.key {
            Some(key) => write!(f, "{}/{}/{}", self.service, key, self.handler),
            None => write!(f, "{}/{}", self.service, self.handler),
        }
    }
}

/// Where an invocation is in its lifecycle, as stored. (Whether it is
/// running right now or waiting for its key is known only in memory.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Not finished: scheduled for later, queued behind its key, running,
    /// or backing off between attempts (the host knows which in memory).
    Ready,
    /// Stopped (journal mismatch, attempts exhausted, or by an operator);
    /// kept with its journal until resumed.
    Paused,
    /// Finished with an outcome.
    Completed,
}

/// Everything the host keeps about one invocation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InvocationRecord {
    /// Its id.
    pub id: InvocationId,
    /// What it invokes.
    pub target: Target,
    /// The handler's kind, resolved at creation.
    pub handler_kind: HandlerKind,
    /// The deployment it runs on, fixed at creation.
    pub deployment: DeploymentId,
    /// The request body.
    pub input: Vec<u8>,
    /// The request headers passed to the handler.
    pub headers: Vec<(String, String)>,
    /// The idempotency key it was created with, if any.
    pub idempotency_key: Option<String>,
    /// Arrival order across the host (orders a key's queue).
    pub seq: u64,
    /// Creation time, ms since the epoch.
    pub created_ms: u64,
    /// Delayed start time, if any.
    pub start_at_ms: Option<u64>,
    /// Lifecycle status.
    pub status: Status,
    /// Attempts started so far.
    pub attempts: u32,
    /// The last retryable or stopping error.
    pub last_error: Option<String>,
    /// The outcome, once completed.
    pub outcome: Option<Outcome>,
    /// Completion time, once completed.
    pub completed_ms: Option<u64>,
    /// The invocation (and its command) waiting for this one's result.
    pub caller: Option<Caller>,
    /// Cancellation was requested.
    pub cancelled: bool,
    /// The subscription whose record created it, if any (for backpressure).
    pub source: Option<String>,
}

/// A Kafka cluster registered by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterRecord {
    /// Its name, as used in `kafka://name/topic`.
    pub name: String,
    /// librdkafka properties (`bootstrap.servers`, security, ...).
    pub properties: std::collections::BTreeMap<String, String>,
}

impl ClusterRecord {
    /// The record as the admin API shows it: secrets redacted.
    pub fn redacted(&self) -> ClusterRecord {
        ClusterRecord {
            name: self.name.clone(),
            properties: redacted(&self.properties),
        }
    }
}

/// librdkafka properties with the values of secrets (passwords, keys,
/// tokens, JAAS configs, OAuth bearer settings) replaced by
/// `"<redacted>"`.
pub fn redacted(
    properties: &std::collections::BTreeMap<String, String>,
) -> std::collections::BTreeMap<String, String> {
    const SECRET: [&str; 6] = ["password", "secret", "token", "jaas", ".key", "credential"];
    properties
        .iter()
        .map(|(k, v)| {
            let lower = k.to_ascii_lowercase();
            let secret =
                SECRET.iter().any(|s| lower.contains(s)) || lower.starts_with("sasl.oauthbearer");
            (
                k.clone(),
                if secret {
                    "<redacted>".into()
                } else {
                    v.clone()
                },
            )
        })
        .collect()
}

/// A subscription from Kafka topics to a handler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionRecord {
    /// `sub_...`.
    pub id: String,
    /// The cluster's name.
    pub cluster: String,
    /// The topics: one name, names separated by commas, or a regular
    /// expression starting with `^` (every matching topic, including
    /// topics created later).
    pub topic: String,
    /// The sink service.
    pub service: String,
    /// The sink handler.
    pub handler: String,
    /// Consumer options (`auto.offset.reset`, ...).
    pub options: std::collections::BTreeMap<String, String>,
    /// Paused by an operator (or stopped on a record).
    pub paused: bool,
    /// How records become invocations and what a failed one does.
    pub delivery: Delivery,
}

/// How a subscription maps records to invocations and handles the
/// invocations that fail (see `kafka`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// Its name, when it comes from the config file (`[[kafka.subscriptions]]`).
    pub name: Option<String>,
    /// Where the object key comes from.
    pub key: KeySource,
    /// What a record without a key does.
    pub null_key: NullKey,
    /// What an invocation that fails for good does.
    pub on_failure: OnFailure,
    /// `kafka://cluster/topic` for dead letters.
    pub dead_letter: Option<String>,
    /// Where a new subscription starts reading.
    pub start_at: StartAt,
}

/// Where a record's object key comes from: its key (`key`), a header
/// (`header:NAME`) or a JSON pointer into its value (`json:/a/b`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum KeySource {
    /// The record's key.
    #[default]
    Record,
    /// The first header with this name (case-insensitive).
    Header(String),
    /// The value at this JSON pointer (RFC 6901) of the record's JSON value.
    Json(String),
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::Record => f.write_str("key"),
            KeySource::Header(name) => write!(f, "header:{name}"),
            KeySource::Json(pointer) => write!(f, "json:{pointer}"),
        }
    }
}

impl From<KeySource> for String {
    fn from(k: KeySource) -> String {
        k.to_string()
    }
}

impl TryFrom<String> for KeySource {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.split_once(':') {
            None if s == "key" => Ok(KeySource::Record),
            Some(("header", name)) if !name.is_empty() => {
                Ok(KeySource::Header(name.to_ascii_lowercase()))
            }
            Some(("json", pointer)) if pointer.starts_with('/') => {
                Ok(KeySource::Json(pointer.to_string()))
            }
            _ => Err(format!(
                "key {s:?} is not `key`, `header:NAME` or `json:/POINTER`"
            )),
        }
    }
}

/// What a record without a key (or without the header or JSON field its
/// key comes from) does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NullKey {
    /// The empty key: all such records queue behind each other.
    #[default]
    Empty,
    /// A key of its own (`topic:partition:offset`): they run concurrently.
    Spread,
    /// Not invoked: produced to the dead-letter topic.
    DeadLetter,
}

/// What happens when an invocation created by a record fails terminally,
/// traps, or runs out of attempts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnFailure {
    /// The invocation pauses (keeping its key) and the subscription stops
    /// consuming, with the reason, until an operator resumes, retries or
    /// skips it.
    #[default]
    Pause,
    /// The invocation completes as failed, the record goes to the
    /// dead-letter topic, and the key moves on.
    DeadLetter,
}

/// Where a new subscription starts reading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum StartAt {
    /// The oldest record kept.
    #[default]
    Earliest,
    /// The records produced after the subscription is created.
    Latest,
    /// The first record at or after this time (ms since the epoch).
    Timestamp(i64),
}

impl std::fmt::Display for StartAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartAt::Earliest => f.write_str("earliest"),
            StartAt::Latest => f.write_str("latest"),
            StartAt::Timestamp(ms) => match chrono::DateTime::from_timestamp_millis(*ms) {
                Some(t) => write!(f, "timestamp:{}", t.to_rfc3339()),
                None => write!(f, "timestamp:{ms}"),
            },
        }
    }
}

impl From<StartAt> for String {
    fn from(s: StartAt) -> String {
        s.to_string()
    }
}

impl TryFrom<String> for StartAt {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "earliest" => Ok(StartAt::Earliest),
            "latest" => Ok(StartAt::Latest),
            _ => s
                .strip_prefix("timestamp:")
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(|t| StartAt::Timestamp(t.timestamp_millis()))
                .ok_or_else(|| {
                    format!("start_at {s:?} is not `earliest`, `latest` or `timestamp:RFC3339`")
                }),
        }
    }
}

impl SubscriptionRecord {
    /// Whether it reads every topic matching a regular expression.
    pub fn is_pattern(&self) -> bool {
        self.topic.starts_with('^')
    }

    /// The topics (or the one pattern) it subscribes to.
    pub fn topics(&self) -> Vec<&str> {
        match self.is_pattern() {
            true => vec![self.topic.as_str()],
            false => self.topic.split(',').map(str::trim).collect(),
        }
    }

    /// `kafka://cluster/topic`.
    pub fn source(&self) -> String {
        format!("kafka://{}/{}", self.cluster, self.topic)
    }

    /// `service://Service/handler`.
    pub fn sink(&self) -> String {
        format!("service://{}/{}", self.service, self.handler)
    }
}

/// Where a call's result goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    /// The calling invocation.
    pub id: InvocationId,
    /// The index of its `Call` command.
    pub command: u32,
}

impl InvocationRecord {
    /// The value of its header `name` (names are stored lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether its handler holds the key exclusively.
    pub fn is_exclusive(&self) -> bool {
        self.target.key.is_some() && self.handler_kind != HandlerKind::Shared
    }

    /// Its stored status as the listing indexes it: `unfinished`,
    /// `paused`, or how it finished (`succeeded`, `failed`, `killed`,
    /// `cancelled`).
    pub fn status_class(&self) -> &'static str {
        match (self.status, &self.outcome) {
            (Status::Ready, _) => "unfinished",
            (Status::Paused, _) => "paused",
            (Status::Completed, Some(Outcome::Success(_))) => "succeeded",
            (Status::Completed, Some(Outcome::Failure { code: 409, message })) => {
                match message.as_str() {
                    "killed" => "killed",
                    "cancelled" if self.cancelled => "cancelled",
                    _ => "failed",
                }
            }
            (Status::Completed, _) => "failed",
        }
    }
}

/// A cron schedule: `target` is invoked with `input` on every tick.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleRecord {
    /// Its name (letters, digits, `-`, `_`).
    pub name: String,
    /// The cron expression (5 fields, or 6 with seconds first), in UTC.
    pub cron: String,
    /// What each tick invokes.
    pub target: Target,
    /// The JSON input of each tick.
    pub input: Vec<u8>,
}

/// A record to produce to a dead-letter topic: the original record of a
/// failed invocation, with headers saying why and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The dead-letter cluster's name and topic.
    pub cluster: String,
    pub topic: String,
    /// The original key, value and headers, then the `cairn-*` headers.
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// When the failure was recorded, ms since the epoch (a restart looks
    /// for the letter in the topic from then on before producing it again).
    pub created_ms: u64,
}
