//! Prometheus metrics: `GET /metrics` on the admin port.
//!
//! Why the `metrics` facade: the lifecycle code records what happens where
//! it happens (`metrics::counter!` in the invoker, a histogram in the
//! commit writer) without knowing who reads it; the Prometheus exporter
//! (`metrics-exporter-prometheus`, installed once per process) renders
//! the text format. Histograms have fixed buckets, so their memory is
//! bounded whatever the traffic.
//!
//! Two kinds of figures:
//! - **recorded** as things happen: invocations started and finished (by
//!   service, handler and outcome), attempts, retries, attempt and
//!   end-to-end durations, group-commit batch sizes and commit latency,
//!   records ingested per subscription;
//! - **gauges read at scrape time** from each partition this host serves
//!   ([`Collector`]): invocations per status, pending timers, the
//!   database's size, and per subscription the consumer lag (from
//!   librdkafka's statistics, every second) and the invocations in flight.
//!
//! Every series of a partition carries its `partition` label (0 on a
//! standalone host); a host reports only the partitions it serves.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Buckets of the duration histograms, in seconds.
const SECONDS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Buckets of the group-commit batch size histogram, in jobs.
const JOBS: [f64; 11] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// Reads the gauges of one partition when `/metrics` is scraped.
pub trait Collector: Send + Sync {
    /// Set this partition's gauges.
    fn collect(&self);
}

/// The exporter and the partitions that report gauges.
pub struct Metrics {
    handle: PrometheusHandle,
    collectors: Mutex<BTreeMap<u32, Arc<dyn Collector>>>,
}

impl Metrics {
    /// The process's metrics, installed on first use (the recorder is
    /// global, so every host in a process shares it).
    pub fn get() -> &'static Metrics {
        static METRICS: OnceLock<Metrics> = OnceLock::new();
        METRICS.get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_jobs".into()), &JOBS))
                .expect("the buckets are not empty")
                .install_recorder()
                .expect("no other metrics recorder is installed");
            describe();
            Metrics {
                handle,
                collectors: Mutex::default(),
            }
        })
    }

    /// Report partition `p`'s gauges from now on.
    pub fn serve(&self, p: u32, collector: Arc<dyn Collector>) {
        self.collectors.lock().unwrap().insert(p, collector);
    }

    /// Stop reporting partition `p` (it moved away): its gauges read 0.
    pub fn stop(&self, p: u32) {
        if self.collectors.lock().unwrap().remove(&p).is_some() {
            zero_gauges(p);
        }
    }

    /// The Prometheus text of every metric, the gauges read now.
    pub fn render(&self) -> String {
        let collectors: Vec<_> = self.collectors.lock().unwrap().values().cloned().collect();
        collectors.iter().for_each(|c| c.collect());
        self.handle.run_upkeep();
        self.handle.render()
    }
}

/// The statuses the invocation gauge reports.
pub const STATUSES: [&str; 6] = [
    "scheduled",
    "pending",
    "running",
    "backing-off",
    "suspended",
    "paused",
];

fn zero_gauges(p: u32) {
    let partition = p.to_string();
    for status in STATUSES {
        metrics::gauge!("cairn_invocations", "partition" => partition.clone(), "status" => status)
            .set(0.0);
    }
    metrics::gauge!("cairn_timers", "partition" => partition.clone()).set(0.0);
    metrics::gauge!("cairn_database_bytes", "partition" => partition).set(0.0);
}

/// Help texts, shown as `# HELP` lines.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "cairn_invocations_started_total",
        "Invocations whose first attempt started, by service and handler"
    );
    describe_counter!(
        "cairn_invocations_finished_total",
        "Invocations completed, by service, handler and outcome (succeeded, failed, killed, cancelled)"
    );
    describe_counter!(
        "cairn_attempts_total",
        "Attempts started, by service and handler"
    );
    describe_counter!(
        "cairn_retries_total",
        "Attempts that failed with a retryable error and will be retried"
    );
    describe_histogram!(
        "cairn_attempt_duration_seconds",
        Unit::Seconds,
        "How long an attempt ran until it completed, suspended or failed"
    );
    describe_histogram!(
        "cairn_invocation_duration_seconds",
        Unit::Seconds,
        "From creation to completion (end to end, waits included)"
    );
    describe_histogram!(
        "cairn_commit_batch_jobs",
        "Jobs (state changes of invocations) per group commit"
    );
    describe_histogram!(
        "cairn_commit_duration_seconds",
        Unit::Seconds,
        "How long a group commit took, durable (fsync, and the Kafka transaction in a cluster)"
    );
    describe_counter!(
        "cairn_subscription_ingested_total",
        "Kafka records a subscription turned into invocations"
    );
    describe_gauge!(
        "cairn_invocations",
        "Unfinished invocations by status, read at scrape time"
    );
    describe_gauge!("cairn_timers", "Durable timers pending in memory");
    describe_gauge!(
        "cairn_database_bytes",
        Unit::Bytes,
        "Size of the partition's redb file"
    );
    describe_gauge!(
        "cairn_subscription_lag",
        "Records not yet ingested, per subscription and Kafka partition (librdkafka statistics)"
    );
    describe_gauge!(
        "cairn_subscription_in_flight",
        "Unfinished invocations a subscription created"
    );
}
