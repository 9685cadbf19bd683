//! The host's configuration: every runtime knob, its default and its meaning.
//!
//! Configuration comes from, in increasing precedence: the defaults below, a
//! TOML file (`cairn serve --config cairn.toml`), then command-line flags and
//! their `CAIRN_*` environment variables. Durations are written as
//! human-readable strings (`"250ms"`, `"10s"`, `"24h"`).
//!
//! ```toml
//! # Where the journal, state and modules live (one redb file).
//! data_dir = "./cairn-data"
//! # redb's page cache, part of the host's memory; it fills as the database
//! # grows. Pages it misses come from the kernel's page cache (not counted
//! # as the host's memory), so a small cache costs little: 1 GiB instead of
//! # the default buys no throughput in `scripts/bench.sh`. Raise it when
//! # large state is read often.
//! db_cache_bytes = 16777216
//! # Restate-compatible ingress, and the admin API.
//! ingress_addr = "127.0.0.1:8080"
//! admin_addr = "127.0.0.1:9070"
//! # Request bodies above this size are refused with 413.
//! max_body_bytes = 10485760
//! # Module uploads above this size are refused with 413.
//! max_module_bytes = 67108864
//! # How long an invocation with an idempotency key (HTTP clients, Kafka
//! # records, cron ticks) or a workflow keeps its result after it finished:
//! # someone can still ask for it by key. A workflow's state and promises too.
//! idempotency_retention = "24h"
//! # How long any other finished invocation stays visible (attach, output,
//! # admin). Its caller already has the result; keep it short, since the
//! # host stores every completed invocation for this long.
//! completed_retention = "1m"
//! # Waits longer than this suspend the invocation (its instance is dropped).
//! suspend_after = "1m"
//! # Hosts (host or host:port; port "*" for any) that guests may reach with
//! # wasi:http from inside `run` steps. Empty: no outgoing HTTP at all.
//! http_allow = ["api.example.com", "127.0.0.1:*"]
//!
//! # Environment variables every guest sees (std::env::var in a handler):
//! # endpoints and settings that differ between deployments of the same code.
//! # Replays see the values of the host that runs them, so change them as you
//! # would change code.
//! [guest_env]
//! PAYMENTS_API = "https://payments.example.com"
//! # A secret: its value is redacted from what guests print (the host
//! # never shows [guest_env] otherwise).
//! PAYMENTS_KEY = { value = "sk_live_...", secret = true }
//!
//! # The admin API answers only requests with `Authorization: Bearer <token>`
//! # when this is set (also --admin-token or CAIRN_ADMIN_TOKEN; the CLI
//! # sends it from the same flag or variable). GET /health stays open.
//! admin_token = "change-me"
//!
//! [connections]
//! # Connections open at once per listener; more are closed on accept, so a
//! # flood on the ingress leaves the admin port (and the file descriptors
//! # the host needs) alone.
//! ingress_max = 10000
//! admin_max = 64
//! # Time a client has to send a request's headers; also how long an idle
//! # keep-alive connection stays open.
//! header_timeout = "10s"
//! # Time a client has to send a request's body (408 after it).
//! body_timeout = "30s"
//! # On SIGTERM: how long open requests may finish (clients attached to an
//! # invocation are answered 503 at once and attach again later).
//! shutdown_timeout = "10s"
//!
//! [limits]
//! # Linear memory per instance; a guest that grows past it traps, and the
//! # invocation pauses (the same code would trap again).
//! memory_bytes = 67108864
//! # Linear memory of all instances together: a growth the budget cannot
//! # cover waits for memory to be freed (5 s at most), then the attempt is
//! # retried later. The host waits instead of swelling.
//! memory_total = 1073741824
//! # Guest execution time per attempt before it is interrupted.
//! cpu_per_attempt = "10s"
//! # Wall-clock time per attempt, durable waits (sleep, call, awakeable,
//! # promise) excepted: a guest blocked in a WASI wait or queued for CPU is
//! # interrupted after it.
//! wall_per_attempt = "60s"
//! # Attempts in a row interrupted by either budget before the invocation
//! # pauses (an endless loop must not keep the host busy for hours).
//! interrupted_attempts = 3
//! # Instances alive at once; further attempts wait for a slot, and an
//! # attempt that only waits gives its slot up (suspends) while another
//! # attempt needs one. Each live instance costs its touched memory pages.
//! max_instances = 128
//! # The share of max_instances, and of the cores, one service may use at
//! # once: its guests that run longer than 10 ms take turns on
//! # max(1, cores x service_share) cores, so one service's endless loops
//! # leave the other cores to the others.
//! service_share = 0.5
//! # Largest value a guest may hand the host: a state value, a step result,
//! # an output, a call or send payload, a promise or awakeable value, a
//! # Kafka record, an HTTP body. Larger ones end the invocation with a
//! # terminal error (413).
//! max_value_bytes = 4194304
//!
//! [retry]
//! # Backoff of retryable failures: initial * factor^(attempt-1), capped.
//! initial_interval = "100ms"
//! factor = 2.0
//! max_interval = "10s"
//! # After this many attempts the invocation is paused (resume it via the admin API).
//! max_attempts = 30
//!
//! [tracing]
//! # Export OpenTelemetry spans over OTLP/HTTP (also OTEL_EXPORTER_OTLP_ENDPOINT;
//! # OTEL_EXPORTER_OTLP_PROTOCOL=http/json for JSON, OTEL_SERVICE_NAME).
//! endpoint = "http://127.0.0.1:4318"
//!
//! [kafka]
//! # Unfinished invocations per subscription before its partitions pause.
//! max_in_flight = 10000
//! # Run a record whose handler only reads and writes its key's state (and
//! # the clock) inline: no invocation, its writes committed with its offset.
//! # A handler that needs more runs as an invocation. See `inline`.
//! inline = true
//!
//! # Kafka clusters registered at start (librdkafka properties: SASL, TLS, ...).
//! [[kafka.clusters]]
//! name = "main"
//! properties = { "bootstrap.servers" = "127.0.0.1:9092", "security.protocol" = "SASL_PLAINTEXT", "sasl.mechanism" = "PLAIN", "sasl.username" = "cairn", "sasl.password" = "secret" }
//!
//! # Subscriptions owned by this file, by name: created, changed and removed
//! # at start to match it (subscriptions made through the API are left alone).
//! [[kafka.subscriptions]]
//! name = "orders"
//! # One topic, several (kafka://main/a,b) or a pattern (kafka://main/^orders-.*).
//! source = "kafka://main/orders"
//! sink = "service://Orders/place"
//! # The object key: "key" (the record's), "header:NAME" or "json:/POINTER".
//! key = "json:/customer/id"
//! # Records without that key: "empty" (one queue), "spread" or "dead-letter".
//! null_key = "dead-letter"
//! # A failed invocation (terminal error, trap, attempts exhausted):
//! # "dead-letter" (default with dead_letter) or "pause" (the subscription stops).
//! on_failure = "dead-letter"
//! dead_letter = "kafka://main/orders.dlq"
//! # Where a new subscription starts: "earliest", "latest" or "timestamp:2026-11-01T00:00:00Z".
//! start_at = "earliest"
//! # librdkafka consumer properties.
//! options = { "fetch.min.bytes" = "1" }
//!
//! # Cluster mode (docs/scale-out.md): every group commit also goes to a
//! # replicated Kafka changelog, in a transaction, before the local redb;
//! # a host started on another machine (or an empty data_dir) restores from
//! # it, and fences the previous owner. Also --cluster and --cluster-app.
//! [cluster]
//! bootstrap = "127.0.0.1:9092"
//! # Names the topic (cairn.<app>.changelog) and the transactional id.
//! app = "shop"
//! # A Kafka transaction not committed within this stops the host (the
//! # next owner takes over from the last committed one). A broker failing
//! # over (leaders and the transaction coordinator moving) is waited out
//! # within it; commits wait meanwhile.
//! commit_timeout = "30s"
//! # How long a starting host may take to read the changelog.
//! restore_timeout = "10m"
//! # A local copy that was at the head of the changelog less than this
//! # long ago applies only the records after it when its host takes over;
//! # an older one is rebuilt from the whole log (compaction drops the
//! # tombstones of deletes after 24 h, so keep it below that).
//! trusted_for = "12h"
//! # The application's partitions (keys and invocations are spread over
//! # them by hash; each has its own store, changelog and owner). Fixed when
//! # the cluster is created: a host configured otherwise refuses to start.
//! partitions = 4
//! # Every host joins the consumer group cairn.<app>; each partition is
//! # owned by the host assigned it, the others forward requests to it. A
//! # host silent for this long loses its partitions to the others (the
//! # takeover time).
//! session_timeout = "6s"
//! # How other hosts reach this one (default: the ingress address's IP).
//! advertise_host = "10.0.0.5"
//! # librdkafka properties for the cluster's clients (SASL, TLS, ...).
//! properties = { "client.id" = "cairn-a" }
//!
//! # A handler invoked on a cron expression (5 fields, or 6 with seconds), UTC.
//! [[schedules]]
//! name = "nightly-report"
//! cron = "0 2 * * *"
//! target = "Reports/nightly"
//! input = { "format": "pdf" }
//!
//! # At most 5 attempts of Payments/charge at once (also "Service" or "Object/prefix*").
//! [[concurrency]]
//! scope = "Payments/charge"
//! max = 5
//!
//! # The policy of one handler (or "Service" for all its handlers).
//! [retry_overrides."Payments/charge"]
//! max_attempts = 5
//! ```

use serde::{Deserialize, Deserializer};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A `[guest_env]` value: a string, or `{ value = "...", secret = true }`
/// for one whose value is redacted from every guest output line.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum GuestEnvValue {
    /// A setting.
    Plain(String),
    /// A value with its marking.
    Marked {
        /// The value.
        value: String,
        /// Whether it is a secret.
        #[serde(default)]
        secret: bool,
    },
}

impl GuestEnvValue {
    /// The value the guest sees.
    pub fn value(&self) -> &str {
        match self {
            GuestEnvValue::Plain(value) | GuestEnvValue::Marked { value, .. } => value,
        }
    }

    /// Whether it must not be shown.
    pub fn is_secret(&self) -> bool {
        matches!(self, GuestEnvValue::Marked { secret: true, .. })
    }
}

/// A secret's value never reaches a log line, even through `{:?}`.
impl std::fmt::Debug for GuestEnvValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.is_secret() {
            true => f.write_str("\"<redacted>\""),
            false => write!(f, "{:?}", self.value()),
        }
    }
}

/// The whole configuration of one host.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Directory of the redb database (`cairn.redb`).
    pub data_dir: PathBuf,
    /// Address of the HTTP ingress.
    pub ingress_addr: SocketAddr,
    /// Address of the admin API.
    pub admin_addr: SocketAddr,
    /// Size of redb's page cache, in bytes.
    pub db_cache_bytes: usize,
    /// Largest accepted ingress request body, in bytes.
    pub max_body_bytes: usize,
    /// Largest accepted module upload, in bytes.
    pub max_module_bytes: usize,
    /// Retention of idempotency keys.
    #[serde(deserialize_with = "duration")]
    pub idempotency_retention: Duration,
    /// Retention of finished invocations (and of a workflow's state and
    /// promises after its run completes).
    #[serde(deserialize_with = "duration")]
    pub completed_retention: Duration,
    /// An invocation waiting longer than this is suspended: its instance is
    /// dropped and it is replayed when what it waits for completes.
    #[serde(deserialize_with = "duration")]
    pub suspend_after: Duration,
    /// Outgoing HTTP allow-list for guests.
    pub http_allow: Vec<String>,
    /// Environment variables of every guest.
    pub guest_env: std::collections::BTreeMap<String, GuestEnvValue>,
    /// The bearer token the admin API requires, if any.
    pub admin_token: Option<String>,
    /// Client connection limits and timeouts.
    pub connections: Connections,
    /// Per-instance resource limits.
    pub limits: Limits,
    /// Default retry policy.
    pub retry: RetryPolicy,
    /// Kafka ingest.
    pub kafka: KafkaConfig,
    /// Cluster mode: the Kafka changelog, if any.
    pub cluster: Option<ClusterConfig>,
    /// Cron schedules registered at start.
    pub schedules: Vec<ScheduleConfig>,
    /// Concurrency limits set at start.
    pub concurrency: Vec<ConcurrencyConfig>,
    /// Retry policies of particular services (`"Service"`) or handlers
    /// (`"Service/handler"`); fields they omit take the built-in defaults.
    pub retry_overrides: std::collections::BTreeMap<String, RetryPolicy>,
    /// OpenTelemetry export.
    pub tracing: TracingConfig,
}

/// Where spans go (see `traces`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracingConfig {
    /// The OTLP/HTTP collector's base URL (spans go to `{endpoint}/v1/traces`);
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` when unset; no export when neither is.
    pub endpoint: Option<String>,
}

/// Client connection limits and timeouts of the two listeners.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Connections {
    /// Connections open at once on the ingress.
    pub ingress_max: usize,
    /// Connections open at once on the admin API.
    pub admin_max: usize,
    /// Time to send request headers; idle time of a keep-alive connection.
    #[serde(deserialize_with = "duration")]
    pub header_timeout: Duration,
    /// Time to send a request body.
    #[serde(deserialize_with = "duration")]
    pub body_timeout: Duration,
    /// Time open requests get to finish after SIGTERM.
    #[serde(deserialize_with = "duration")]
    pub shutdown_timeout: Duration,
}

impl Default for Connections {
    fn default() -> Self {
        Connections {
            ingress_max: 10_000,
            admin_max: 64,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

/// Resource limits of guest instances.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Linear memory cap per instance, in bytes.
    pub memory_bytes: usize,
    /// Guest execution time allowed per attempt.
    #[serde(deserialize_with = "duration")]
    pub cpu_per_attempt: Duration,
    /// Instances alive at once (size of the pooling allocator).
    pub max_instances: u32,
    /// Linear memory of all instances together, in bytes.
    pub memory_total: usize,
    /// Wall-clock time allowed per attempt, durable waits excepted.
    #[serde(deserialize_with = "duration")]
    pub wall_per_attempt: Duration,
    /// Attempts in a row ended by the CPU or wall-clock budget before the
    /// invocation pauses.
    pub interrupted_attempts: u32,
    /// Share (0 to 1) of `max_instances` and of the cores one service may
    /// use at once.
    pub service_share: f64,
    /// Largest value a guest may hand the host, in bytes.
    pub max_value_bytes: usize,
}

impl Limits {
    /// Instances one service may hold at once.
    pub fn service_instances(&self) -> usize {
        ((self.max_instances as f64 * self.service_share).ceil() as usize).max(1)
    }

    /// Cores on which one service's long-running guests take turns.
    pub fn service_cores(&self) -> usize {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        ((cores as f64 * self.service_share).floor() as usize).max(1)
    }
}

/// A concurrency limit in the config file.
#[derive(Debug, Clone, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConcurrencyConfig {
    /// `Service`, `Service/handler`, or `Object/keyprefix*`.
    pub scope: String,
    /// Attempts allowed at once.
    pub max: usize,
}

/// A cron schedule in the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Its name.
    pub name: String,
    /// Cron expression: 5 fields, or 6 with seconds first (UTC).
    pub cron: String,
    /// `Service/handler` or `Object/key/handler`.
    pub target: String,
    /// The JSON input of each tick (none: an empty body).
    #[serde(default)]
    pub input: Option<serde_json::Value>,
}

/// Kafka ingest settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Unfinished invocations per subscription above which its partitions
    /// pause (they resume at half of it).
    pub max_in_flight: usize,
    /// Run records inline when their handler allows it (see [`crate::inline`]).
    pub inline: bool,
    /// Clusters registered (or updated) at start.
    pub clusters: Vec<crate::records::ClusterRecord>,
    /// Named subscriptions reconciled at start: created, changed, and
    /// removed when they leave the file (see `kafka::Subscriptions::reconcile`).
    pub subscriptions: Vec<crate::kafka::SubscriptionSpec>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            max_in_flight: 10_000,
            inline: true,
            clusters: Vec::new(),
            subscriptions: Vec::new(),
        }
    }
}

/// Cluster mode: where the replicated changelog lives.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Kafka bootstrap servers.
    pub bootstrap: String,
    /// The application's name: topics and transactional ids derive from it.
    pub app: String,
    /// Longest time a changelog transaction may take (fatal after it).
    #[serde(deserialize_with = "duration")]
    pub commit_timeout: Duration,
    /// Longest time reading the changelog at start may take.
    #[serde(deserialize_with = "duration")]
    pub restore_timeout: Duration,
    /// A local copy last at the head of the changelog less than this long
    /// ago applies only what followed it; an older one is rebuilt. Below
    /// the changelog's tombstone retention (24 h).
    #[serde(deserialize_with = "duration")]
    pub trusted_for: Duration,
    /// The application's partition count, fixed at cluster creation.
    pub partitions: u32,
    /// A host silent for this long loses its partitions to other hosts.
    #[serde(deserialize_with = "duration")]
    pub session_timeout: Duration,
    /// The host name or IP other hosts reach this one at (forwarded
    /// requests); default: the ingress address's IP.
    pub advertise_host: Option<String>,
    /// Extra librdkafka properties.
    pub properties: std::collections::BTreeMap<String, String>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            bootstrap: "127.0.0.1:9092".into(),
            app: "cairn".into(),
            commit_timeout: Duration::from_secs(30),
            restore_timeout: Duration::from_secs(600),
            session_timeout: Duration::from_secs(6),
            partitions: 1,
            trusted_for: Duration::from_secs(12 * 3600),
            advertise_host: None,
            properties: Default::default(),
        }
    }
}

/// Exponential backoff for retryable failures.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Delay before the second attempt.
    #[serde(deserialize_with = "duration")]
    pub initial_interval: Duration,
    /// Growth of the delay per attempt.
    pub factor: f64,
    /// Cap of the delay.
    #[serde(deserialize_with = "duration")]
    pub max_interval: Duration,
    /// Attempts before the invocation is paused (resumable).
    pub max_attempts: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./cairn-data"),
            ingress_addr: ([127, 0, 0, 1], 8080).into(),
            admin_addr: ([127, 0, 0, 1], 9070).into(),
            db_cache_bytes: crate::store::DEFAULT_CACHE_BYTES,
            max_body_bytes: 10 * 1024 * 1024,
            max_module_bytes: 64 * 1024 * 1024,
            idempotency_retention: Duration::from_secs(24 * 3600),
            completed_retention: Duration::from_secs(60),
            suspend_after: Duration::from_secs(60),
            http_allow: Vec::new(),
            guest_env: Default::default(),
            admin_token: None,
            connections: Connections::default(),
            limits: Limits::default(),
            retry: RetryPolicy::default(),
            retry_overrides: Default::default(),
            tracing: TracingConfig::default(),
            kafka: KafkaConfig::default(),
            cluster: None,
            schedules: Vec::new(),
            concurrency: Vec::new(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 64 * 1024 * 1024,
            cpu_per_attempt: Duration::from_secs(10),
            max_instances: 128,
            memory_total: 1024 * 1024 * 1024,
            wall_per_attempt: Duration::from_secs(60),
            interrupted_attempts: 3,
            service_share: 0.5,
            max_value_bytes: 4 * 1024 * 1024,
        }
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial_interval: Duration::from_millis(100),
            factor: 2.0,
            max_interval: Duration::from_secs(10),
            max_attempts: 30,
        }
    }
}

impl RetryPolicy {
    /// The delay before attempt `next_attempt` (2 for the first retry).
    pub fn delay_before(&self, next_attempt: u32) -> Duration {
        let exponent = next_attempt.saturating_sub(2) as i32;
        let millis = self.initial_interval.as_millis() as f64 * self.factor.powi(exponent);
        Duration::from_millis(millis.min(self.max_interval.as_millis() as f64) as u64)
    }
}

impl Config {
    /// The retry policy of a handler: its own override, its service's, or
    /// the default.
    pub fn retry_policy(&self, service: &str, handler: &str) -> &RetryPolicy {
        self.retry_overrides
            .get(&format!("{service}/{handler}"))
            .or_else(|| self.retry_overrides.get(service))
            .unwrap_or(&self.retry)
    }

    /// Read a TOML file over the defaults.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
        toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("invalid config file {}: {e}", path.display()))
    }
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            initial_interval: Duration::from_millis(100),
            factor: 2.0,
            max_interval: Duration::from_millis(500),
            max_attempts: 10,
        };
        let delays: Vec<u64> = (2..7)
            .map(|a| p.delay_before(a).as_millis() as u64)
            .collect();
        assert_eq!(delays, vec![100, 200, 400, 500, 500]);
    }

    #[test]
    fn handlers_can_override_the_retry_policy() {
        let c: Config = toml::from_str(
            "[retry]\nmax_attempts = 7\n[retry_overrides.\"A/x\"]\nmax_attempts = 2\n[retry_overrides.A]\nmax_attempts = 3\n",
        )
        .unwrap();
        assert_eq!(c.retry_policy("A", "x").max_attempts, 2);
        assert_eq!(c.retry_policy("A", "y").max_attempts, 3);
        assert_eq!(c.retry_policy("B", "x").max_attempts, 7);
    }

    #[test]
    fn guest_env_is_a_table_of_strings_some_marked_secret() {
        let c: Config = toml::from_str(
            "[guest_env]\nAPI = \"http://127.0.0.1:1\"\nDELAY_MS = \"5\"\n\
             KEY = { value = \"k\", secret = true }\n",
        )
        .unwrap();
        assert_eq!(c.guest_env["API"].value(), "http://127.0.0.1:1");
        assert!(!c.guest_env["API"].is_secret());
        assert_eq!(
            (c.guest_env["KEY"].value(), c.guest_env["KEY"].is_secret()),
            ("k", true)
        );
        assert_eq!(c.guest_env.len(), 3);
        assert!(
            !format!("{c:?}").contains("\"k\""),
            "a secret is not in Debug output"
        );
        assert!(toml::from_str::<Config>("[guest_env]\nDELAY_MS = 5\n").is_err());
    }

    #[test]
    fn kafka_clusters_and_subscriptions_come_from_the_file() {
        let c: Config = toml::from_str(
            "[[kafka.clusters]]\nname = \"main\"\nproperties = { \"bootstrap.servers\" = \"127.0.0.1:9092\" }\n\
             [[kafka.subscriptions]]\nname = \"orders\"\nsource = \"kafka://main/a,b\"\n\
             sink = \"service://Orders/place\"\nkey = \"json:/customer/id\"\nnull_key = \"spread\"\n\
             dead_letter = \"kafka://main/dlq\"\nstart_at = \"timestamp:2026-11-01T00:00:00Z\"\n",
        )
        .unwrap();
        assert_eq!(
            c.kafka.clusters[0].properties["bootstrap.servers"],
            "127.0.0.1:9092"
        );
        let sub = &c.kafka.subscriptions[0];
        assert_eq!(
            sub.key,
            crate::records::KeySource::Json("/customer/id".into())
        );
        assert_eq!(sub.null_key, crate::records::NullKey::Spread);
        assert_eq!(
            sub.start_at,
            crate::records::StartAt::Timestamp(1_793_491_200_000)
        );
        assert_eq!(sub.on_failure, None, "decided with the dead-letter topic");
        let bad = "[[kafka.subscriptions]]\nname = \"x\"\nsource = \"kafka://m/t\"\nsink = \"service://A/b\"\nkey = \"json:nope\"\n";
        let error = toml::from_str::<Config>(bad).unwrap_err().to_string();
        assert!(error.contains("json:/POINTER"), "{error}");
    }

    #[test]
    fn toml_overrides_defaults_and_rejects_unknown_keys() {
        let c: Config = toml::from_str(
            "http_allow = [\"127.0.0.1:*\"]\n[limits]\ncpu_per_attempt = \"250ms\"\n",
        )
        .unwrap();
        assert_eq!(c.limits.cpu_per_attempt, Duration::from_millis(250));
        assert_eq!(c.limits.max_instances, 128);
        assert_eq!(c.http_allow, vec!["127.0.0.1:*"]);
        assert!(toml::from_str::<Config>("no_such_knob = 1").is_err());
    }
}
