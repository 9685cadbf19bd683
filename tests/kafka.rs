//! Kafka subscriptions against a real Apache Kafka broker (KRaft), started by
//! `scripts/kafka.sh start` (scripts/test.sh does it): ordering, no
//! head-of-line blocking, exactly-once ingest across SIGKILL and broker
//! restarts, backpressure, binary keys, headers, pause/resume.

use cairn_tests::kafka::{
    create_replicated_topic, create_topic, create_topic_on, produce, produce_with, producer_on,
    require_broker, subscribe, unique_topic, Record,
};
use cairn_tests::server::TestServer;
use cairn_tests::{add_until_acked, example, metric, until, Host, HostOptions};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn options(extra: &str) -> HostOptions {
    HostOptions {
        config: format!("http_allow = [\"127.0.0.1:*\"]\n{extra}"),
        deploy: vec![example("basics"), example("coordination")],
    }
}

/// A counter's value; a cluster host without an owner yet (503) is asked
/// again for up to a minute.
async fn counter(host: &Host, key: &str) -> i64 {
    let started = Instant::now();
    loop {
        let r = host.post(&format!("/Counter/{key}/get"), "", &[]).await;
        if r.status == 503 && started.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        return r.body.parse().unwrap_or_else(|_| {
            panic!("Counter/{key}/get: {} {}\n{}", r.status, r.body, host.log())
        });
    }
}

async fn counters(host: &Host, keys: usize) -> Vec<i64> {
    let mut values = Vec::with_capacity(keys);
    for k in 0..keys {
        values.push(counter(host, &format!("k{k}")).await);
    }
    values
}

async fn seen(host: &Host, key: &str) -> Value {
    host.post(&format!("/Events/{key}/seen"), "", &[])
        .await
        .json()
}

#[tokio::test]
async fn counter_sums_are_exact_for_100k_records_over_1000_keys() {
    let broker = require_broker();
    let topic = unique_topic("counts");
    create_topic(&topic, 4).await;
    let records = (0..100_000)
        .map(|i| Record::json(&format!("k{}", i % 1000), &json!(i % 7)))
        .collect();
    produce(&topic, records).await;
    let host = Host::start_with(options("")).await;
    let started = Instant::now();
    let sub = subscribe(&host, &broker, &topic, "service://Counter/add").await;
    let expected: Vec<i64> = (0..1000)
        .map(|k| (0..100).map(|j| ((k + 1000 * j) % 7) as i64).sum())
        .collect();
    until("every key's sum", Duration::from_secs(600), || async {
        counters(&host, 1000).await == expected
    })
    .await;
    // `/metrics` counts every record and, from librdkafka's statistics,
    // reads no lag left on any of the topic's four partitions.
    until("the metrics catch up", Duration::from_secs(60), || async {
        let text = host.metrics().await;
        let ingested = metric(
            &text,
            "cairn_subscription_ingested_total",
            &[("subscription", &sub)],
        );
        let lags: Vec<Option<f64>> = ["0", "1", "2", "3"]
            .iter()
            .map(|p| {
                let labels = [("subscription", sub.as_str()), ("kafka_partition", p)];
                metric(&text, "cairn_subscription_lag", &labels)
            })
            .collect();
        ingested == Some(100_000.0) && lags.iter().all(|lag| *lag == Some(0.0))
    })
    .await;
    println!(
        "100,000 records into Counter/add over 1,000 keys in {:?} (debug build)",
        started.elapsed()
    );
}

#[tokio::test]
async fn records_of_one_key_are_handled_in_offset_order() {
    let broker = require_broker();
    let topic = unique_topic("order");
    create_topic(&topic, 4).await;
    let records = (0..2000)
        .map(|i| Record::json(&format!("o{}", i % 20), &json!({ "n": i / 20 })))
        .collect();
    produce(&topic, records).await;
    let host = Host::start_with(options("")).await;
    subscribe(&host, &broker, &topic, "service://Events/handle").await;
    for k in 0..20 {
        all_in_offset_order(&host, &format!("o{k}"), 100).await;
    }
}

/// Wait until `Events/{key}` has seen `n` records, and check they came
/// in offset order (`0..n`).
async fn all_in_offset_order(host: &Host, key: &str, n: u64) {
    until(key, Duration::from_secs(300), || async {
        seen(host, key).await["numbers"].as_array().unwrap().len() == n as usize
    })
    .await;
    let numbers: Vec<u64> =
        serde_json::from_value(seen(host, key).await["numbers"].clone()).unwrap();
    assert_eq!(numbers, (0..n).collect::<Vec<_>>(), "{key} in offset order");
}

#[tokio::test]
async fn records_run_inline_unless_they_need_the_journal_and_each_key_keeps_its_order() {
    let broker = require_broker();
    let server = TestServer::start(Duration::ZERO).await;
    let topic = unique_topic("inline");
    create_topic(&topic, 4).await;
    // 20 keys, 100 records each; every tenth record of a key makes an
    // outside call in a `run` step, which needs the journal.
    let url = format!("{}/record/calls", server.url);
    let records = (0..2000)
        .map(|i| {
            let n = i / 20;
            let mut event = json!({ "n": n });
            if n % 10 == 5 {
                event["url"] = json!(url);
            }
            Record::json(&format!("i{}", i % 20), &event)
        })
        .collect();
    produce(&topic, records).await;
    let host = Host::start_with(options("")).await;
    let sub = subscribe(&host, &broker, &topic, "service://Events/handle").await;
    let mut invocations = 0;
    for k in 0..20 {
        let key = format!("i{k}");
        all_in_offset_order(&host, &key, 100).await;
        let listed = host
            .admin_get(&format!(
                "/invocations?service=Events&key={key}&handler=handle&limit=1000"
            ))
            .await;
        invocations += listed["invocations"].as_array().unwrap().len();
    }
    assert_eq!(
        server.received_count("calls"),
        200,
        "each call made once: an inline attempt is refused before its step runs"
    );
    let inline = metric(
        &host.metrics().await,
        "cairn_inline_records_total",
        &[("subscription", &sub), ("outcome", "inline")],
    )
    .unwrap_or(0.0) as usize;
    assert!(
        invocations >= 200,
        "each record with a call ran as an invocation: {invocations}"
    );
    assert!(inline > 0, "the others may run inline");
    assert_eq!(
        inline + invocations,
        2000,
        "a record ran inline, leaving no invocation, or as an invocation"
    );
}

#[tokio::test]
async fn a_slow_key_does_not_block_the_other_keys_of_its_partition() {
    let broker = require_broker();
    let server = TestServer::start(Duration::ZERO).await;
    let topic = unique_topic("hol");
    create_topic(&topic, 1).await;
    let mut records = vec![Record::json(
        "slow",
        &json!({ "n": 0, "url": format!("{}/hold", server.url) }),
    )];
    records.extend((0..200).map(|i| Record::json(&format!("fast{}", i % 50), &json!({ "n": i }))));
    produce(&topic, records).await;
    let host = Host::start_with(options("")).await;
    let started = Instant::now();
    subscribe(&host, &broker, &topic, "service://Events/handle").await;
    until("the slow key's call", Duration::from_secs(60), || async {
        server.holds() == 1
    })
    .await;
    for k in 0..50 {
        let key = format!("fast{k}");
        until(&key, Duration::from_secs(120), || async {
            seen(&host, &key).await["numbers"].as_array().unwrap().len() == 4
        })
        .await;
    }
    let others_done = started.elapsed();
    assert_eq!(server.holds(), 1);
    assert_eq!(
        seen(&host, "slow").await["numbers"],
        json!([]),
        "the slow key is still waiting on its call"
    );
    println!("200 records of 50 other keys done in {others_done:?} while the first record's key was blocked");
    server.release();
    until("the slow key", Duration::from_secs(60), || async {
        seen(&host, "slow").await["numbers"] == json!([0])
    })
    .await;
}

#[tokio::test]
async fn sigkill_mid_ingest_applies_each_inline_record_exactly_once() {
    sigkill_mid_ingest("").await;
}

#[tokio::test]
async fn sigkill_mid_ingest_applies_each_record_exactly_once_as_invocations_too() {
    sigkill_mid_ingest("[kafka]\ninline = false\n").await;
}

/// 50,000 records into `Counter/add` on a host configured with `extra`,
/// SIGKILLed once 10,000 are ingested: every count is exact after restart.
async fn sigkill_mid_ingest(extra: &str) {
    let broker = require_broker();
    let topic = unique_topic("crash");
    create_topic(&topic, 4).await;
    let records = (0..50_000)
        .map(|i| Record::json(&format!("k{}", i % 100), &json!(1)))
        .collect();
    produce(&topic, records).await;
    let mut host = Host::start_with(options(extra)).await;
    let sub = subscribe(&host, &broker, &topic, "service://Counter/add").await;
    until(
        "ingest to be under way",
        Duration::from_secs(300),
        || async {
            let v = host.admin_get(&format!("/subscriptions/{sub}")).await;
            v["ingested"].as_u64().unwrap_or(0) >= 10_000
        },
    )
    .await;
    host.kill();
    host.restart().await;
    until("every record counted", Duration::from_secs(600), || async {
        counters(&host, 100).await.iter().sum::<i64>() >= 50_000
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        counters(&host, 100).await,
        vec![500; 100],
        "no record lost, none counted twice"
    );
}

/// A broker of this test's own on `port` (so restarting it disturbs no
/// other test): `kafka.sh start|stop` with `KAFKA_PORT`.
fn private_broker(port: u16) -> impl Fn(&str) {
    move |action: &str| kafka_sh(port, &[action])
}

/// `scripts/kafka.sh ARGS...` with `KAFKA_PORT=port`; fails with its output.
fn kafka_sh(port: u16, args: &[&str]) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/kafka.sh");
    let out = std::process::Command::new(&script)
        .args(args)
        .env("KAFKA_PORT", port.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kafka.sh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A private three-broker KRaft cluster (replication factor 3,
/// min.insync.replicas 2) on ports derived from `base`, stopped (and its
/// data removed) when dropped.
struct Cluster {
    base: u16,
}

impl Cluster {
    fn start(base: u16) -> Self {
        let cluster = Cluster {
            base: base + (std::process::id() % 300) as u16 * 6,
        };
        cluster.run(&["start"]);
        cluster
    }

    /// `kafka.sh cluster ARGS...`.
    fn run(&self, args: &[&str]) {
        kafka_sh(self.base, &[&["cluster"], args].concat());
    }

    fn bootstrap(&self) -> String {
        (0..3)
            .map(|n| format!("127.0.0.1:{}", self.base + 2 * n))
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.run(&["stop"]);
    }
}

/// A private broker started on a port derived from `base`, a fresh topic of
/// two partitions on it, and a producer: (control, bootstrap, topic, producer).
async fn private_topic(
    base: u16,
    name: &str,
) -> (
    impl Fn(&str),
    String,
    String,
    rdkafka::producer::FutureProducer,
) {
    require_broker();
    let port = base + (std::process::id() % 500) as u16 * 2;
    let bootstrap = format!("127.0.0.1:{port}");
    let broker = private_broker(port);
    broker("start");
    let topic = unique_topic(name);
    create_topic_on(&bootstrap, &topic, 2).await;
    let producer = producer_on(&bootstrap);
    (broker, bootstrap, topic, producer)
}

/// Wait until `Counter/k0..k9` add up to `total`, then check that each
/// counted its tenth: no record lost, none counted twice.
async fn counted_exactly(host: &Host, total: i64, timeout: Duration) {
    until(&format!("{total} records counted"), timeout, || async {
        counters(host, 10).await.iter().sum::<i64>() == total
    })
    .await;
    assert_eq!(counters(host, 10).await, vec![total / 10; 10]);
}

/// Records `from..from + n`, each adding 1 to `Counter/k{i % 10}`.
fn batch(from: usize, n: usize) -> Vec<Record> {
    (from..from + n)
        .map(|i| Record::json(&format!("k{}", i % 10), &json!(1)))
        .collect()
}

/// Two Cairn hosts in cluster mode on the three brokers (their changelog
/// replicated three times) ingest a topic while a broker is SIGKILLed; HTTP
/// adds go through both hosts meanwhile.
#[tokio::test]
async fn a_broker_of_three_killed_under_load_loses_nothing() {
    require_broker();
    let cluster = Cluster::start(29092);
    let bootstrap = cluster.bootstrap();
    let topic = unique_topic("three-brokers");
    create_replicated_topic(&bootstrap, &topic, 3, 3).await;
    let producer = producer_on(&bootstrap);
    let app = format!(
        "[cluster]\nbootstrap = {bootstrap:?}\napp = {:?}\n",
        unique_topic("brokers")
    );
    let owner = Host::start_with(options(&app)).await;
    until(
        "the first host owns the partition",
        Duration::from_secs(60),
        || async { owner.admin_get("/cluster").await["partitions"][0]["role"] == "owner" },
    )
    .await;
    let standby = Host::start_with(options(&app)).await;
    until(
        "the standby knows the owner",
        Duration::from_secs(60),
        || async { !standby.admin_get("/cluster").await["partitions"][0]["owner"].is_null() },
    )
    .await;
    subscribe(&standby, &bootstrap, &topic, "service://Counter/add").await;
    produce_with(&producer, &topic, batch(0, 5000)).await;
    until("ingest to start", Duration::from_secs(120), || async {
        counter(&owner, "k0").await > 0
    })
    .await;
    let adds = tokio::spawn({
        let hosts = [
            (owner.http.clone(), owner.ingress()),
            (standby.http.clone(), standby.ingress()),
        ];
        async move {
            // Each add goes to the next host, and so does each retry.
            let mut turn = 0;
            for i in 0..200u32 {
                let key = format!("http-{i}");
                let within = Duration::from_secs(120);
                add_until_acked(&hosts, &mut turn, "/Counter/http/add", &key, within).await;
            }
        }
    });
    // Node 1: the first bootstrap address, a leader of some partitions.
    cluster.run(&["kill", "1"]);
    produce_with(&producer, &topic, batch(5000, 5000)).await;
    counted_exactly(&standby, 10_000, Duration::from_secs(300)).await;
    cluster.run(&["start-node", "1"]);
    produce_with(&producer, &topic, batch(10_000, 2000)).await;
    counted_exactly(&standby, 12_000, Duration::from_secs(300)).await;
    adds.await.unwrap();
    assert_eq!(counter(&standby, "http").await, 200, "every HTTP add once");
    // The hosts go on. When the lost broker was the group coordinator and
    // its replacement took longer than the session timeout, the group may
    // move the partition while the old owner is out of contact: the old
    // owner hands it over in process when it hears of it, or, if it tried
    // to commit first, is fenced and stops for its supervisor to start it
    // again as a standby (docs/scale-out.md); nothing else may stop a host.
    for mut host in [owner, standby] {
        if !host.running() {
            let log = host.log();
            assert!(
                log.contains("this host is fenced") || log.contains("no partition assigned back"),
                "a host stopped when a broker was lost:\n{log}"
            );
            host.restart().await;
        }
        assert_eq!(
            counter(&host, "http").await,
            200,
            "served after the broker came back"
        );
    }
}

#[tokio::test]
async fn stopping_and_restarting_the_broker_loses_nothing() {
    let (broker, bootstrap, topic, producer) = private_topic(19092, "flaky-broker").await;
    let batch = |from| batch(from, 3000);
    produce_with(&producer, &topic, batch(0)).await;
    let host = Host::start_with(options("")).await;
    subscribe(&host, &bootstrap, &topic, "service://Counter/add").await;
    until("ingest to start", Duration::from_secs(120), || async {
        counter(&host, "k0").await > 0
    })
    .await;
    broker("stop");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        host.admin_get("/subscriptions").await["subscriptions"].is_array(),
        "the host keeps serving"
    );
    broker("start");
    produce_with(&producer, &topic, batch(3000)).await;
    counted_exactly(&host, 6000, Duration::from_secs(300)).await;
    broker("stop");
}

#[tokio::test]
async fn a_host_restarted_while_the_broker_is_down_ingests_once_it_is_back() {
    let (broker, bootstrap, topic, producer) = private_topic(20092, "down-at-start").await;
    let batch = |from| batch(from, 100);
    let mut host = Host::start_with(options("")).await;
    subscribe(&host, &bootstrap, &topic, "service://Counter/add").await;
    produce_with(&producer, &topic, batch(0)).await;
    counted_exactly(&host, 100, Duration::from_secs(120)).await;
    broker("stop");
    host.restart().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker("start");
    produce_with(&producer, &topic, batch(100)).await;
    counted_exactly(&host, 200, Duration::from_secs(120)).await;
    broker("stop");
}

#[tokio::test]
async fn a_burst_pauses_consumption_keeps_memory_bounded_and_is_all_processed() {
    let broker = require_broker();
    let topic = unique_topic("burst");
    create_topic(&topic, 4).await;
    let records = (0..200_000)
        .map(|i| Record::json(&format!("k{}", i % 1000), &json!(1)))
        .collect();
    produce(&topic, records).await;
    // Backpressure counts unfinished invocations: records that run inline
    // are never unfinished, so this burst runs as invocations.
    let host = Host::start_with(options("[kafka]\nmax_in_flight = 2000\ninline = false\n")).await;
    let started = Instant::now();
    subscribe(&host, &broker, &topic, "service://Counter/add").await;
    until("every record", Duration::from_secs(900), || async {
        counters(&host, 1000).await.iter().sum::<i64>() == 200_000
    })
    .await;
    assert_eq!(counters(&host, 1000).await, vec![200; 1000]);
    let log = host.log();
    assert!(
        log.contains("backpressure: consumption paused")
            && log.contains("backpressure: consumption resumed"),
        "consumption paused and resumed"
    );
    let peak = host.peak_rss_kib();
    println!(
        "200,000-record burst: {:?}, host peak RSS {} MiB",
        started.elapsed(),
        peak / 1024
    );
    assert!(
        peak < 1024 * 1024,
        "memory stays bounded: {} MiB",
        peak / 1024
    );
}

#[tokio::test]
async fn binary_keys_and_record_headers_reach_the_handler() {
    let broker = require_broker();
    let topic = unique_topic("meta");
    create_topic(&topic, 1).await;
    let record = Record {
        key: Some(vec![0xff, 0x00, 0x01]),
        value: json!({ "n": 7 }).to_string().into_bytes(),
        headers: vec![("x-trace".into(), "abc-123".into())],
    };
    produce(&topic, vec![record]).await;
    let host = Host::start_with(options("")).await;
    subscribe(&host, &broker, &topic, "service://Events/handle").await;
    until("the binary key", Duration::from_secs(120), || async {
        seen(&host, "hex:ff0001").await["numbers"] == json!([7])
    })
    .await;
    let last: Vec<(String, String)> =
        serde_json::from_value(seen(&host, "hex:ff0001").await["last"].clone()).unwrap();
    let meta: std::collections::HashMap<_, _> = last.into_iter().collect();
    assert_eq!(meta["x-kafka-topic"], topic);
    assert_eq!(
        (
            meta["x-kafka-partition"].as_str(),
            meta["x-kafka-offset"].as_str()
        ),
        ("0", "0")
    );
    assert_eq!(meta["x-kafka-key"], "hex:ff0001");
    assert_eq!(meta["x-trace"], "abc-123");
    assert!(meta["x-kafka-timestamp"].parse::<u64>().unwrap() > 1_600_000_000_000);
}

#[tokio::test]
async fn subscriptions_pause_resume_refuse_duplicates_and_survive_restarts() {
    let broker = require_broker();
    let topic = unique_topic("ops");
    create_topic(&topic, 2).await;
    let mut host = Host::start_with(options("")).await;
    let sub = subscribe(&host, &broker, &topic, "service://Counter/add").await;
    let dup =
        json!({ "source": format!("kafka://local/{topic}"), "sink": "service://Counter/add" });
    let r = host.admin_post("/subscriptions", Some(&dup)).await;
    assert_eq!(r.status, 409, "the same source and sink twice");
    let bad = json!({ "source": "kafka://nowhere/t", "sink": "service://Counter/add" });
    assert_eq!(
        host.admin_post("/subscriptions", Some(&bad)).await.status,
        400
    );

    produce(
        &topic,
        (0..10).map(|_| Record::json("p", &json!(1))).collect(),
    )
    .await;
    until("the first records", Duration::from_secs(120), || async {
        counter(&host, "p").await == 10
    })
    .await;
    let paused = host.cli(&["subscriptions", "pause", &sub]).unwrap();
    assert!(paused.contains("\"paused\": true"), "{paused}");
    produce(
        &topic,
        (0..10).map(|_| Record::json("p", &json!(1))).collect(),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        counter(&host, "p").await,
        10,
        "nothing is consumed while paused"
    );
    let v = host.admin_get(&format!("/subscriptions/{sub}")).await;
    assert_eq!(v["paused"], true);

    host.restart().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        counter(&host, "p").await,
        10,
        "the pause survives a restart"
    );
    let r = host
        .admin_post(&format!("/subscriptions/{sub}/resume"), None)
        .await;
    assert_eq!(r.status, 200);
    until(
        "the records produced while paused",
        Duration::from_secs(120),
        || async { counter(&host, "p").await == 20 },
    )
    .await;
    let v = host.admin_get(&format!("/subscriptions/{sub}")).await;
    assert_eq!(
        v["ingested"], 20,
        "counted since the subscription began, across the restart"
    );
    assert!(
        v["lag"].as_object().unwrap().values().all(|l| l == 0),
        "no lag left: {v:#}"
    );
    assert!(host.cli(&["subscriptions", "list"]).unwrap().contains(&sub));
    host.cli(&["subscriptions", "delete", &sub]).unwrap();
    assert_eq!(
        host.admin_get("/subscriptions").await["subscriptions"],
        json!([])
    );
}

#[tokio::test]
async fn durable_produce_is_exactly_once_for_subscribers_across_a_host_kill() {
    let broker = require_broker();
    let topic = unique_topic("produced");
    create_topic(&topic, 1).await;
    let mut host = Host::start_with(options("")).await;
    subscribe(&host, &broker, &topic, "service://Counter/add").await;
    let r = host
        .post(
            "/Emitter/emit/send",
            &json!([topic, "em", 50, 40]).to_string(),
            &[],
        )
        .await;
    let id = r.json()["invocationId"].as_str().unwrap().to_string();
    until(
        "some records produced",
        Duration::from_secs(120),
        || async { counter(&host, "em").await > 100 },
    )
    .await;
    host.kill();
    host.restart().await;
    assert_eq!(host.get(&format!("/restate/attach/{id}")).await.body, "50");
    let expected: i64 = (0..50).sum();
    until(
        "every produced record",
        Duration::from_secs(120),
        || async { counter(&host, "em").await >= expected },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        counter(&host, "em").await,
        expected,
        "each produced record was handled exactly once"
    );

    let records = cairn_tests::kafka::read_all(&broker, &topic).await;
    let ids: std::collections::BTreeSet<String> = records
        .iter()
        .map(|(_, _, h)| {
            h.iter()
                .find(|(k, _)| k == "cairn-produce-id")
                .expect("tagged")
                .1
                .clone()
        })
        .collect();
    assert_eq!(ids.len(), 50, "no record lost");
    assert!(
        records.len() <= 51,
        "at most the record in flight at the kill was sent twice: {}",
        records.len()
    );
}

fn sim_options() -> HostOptions {
    HostOptions {
        config: String::new(),
        deploy: vec![example("sim")],
    }
}

async fn feed_total(host: &Host, key: &str) -> i64 {
    host.post(&format!("/Feed/{key}/total"), "", &[])
        .await
        .body
        .parse()
        .unwrap()
}

/// A sim host whose subscription feeds a fresh one-partition topic into
/// `Feed/take`, after three records of `key` went through: (host, topic, sub).
async fn feeding(prefix: &str, key: &str) -> (Host, String, String) {
    let topic = unique_topic(prefix);
    create_topic(&topic, 1).await;
    let host = Host::start_with(sim_options()).await;
    let sub = subscribe(&host, &require_broker(), &topic, "service://Feed/take").await;
    produce(
        &topic,
        (0..3).map(|_| Record::json(key, &json!(1))).collect(),
    )
    .await;
    until("the first records", Duration::from_secs(120), || async {
        feed_total(&host, key).await == 3
    })
    .await;
    (host, topic, sub)
}

async fn stopped(host: &Host, sub: &str) -> Value {
    until(
        "the subscription to stop",
        Duration::from_secs(120),
        || async { host.admin_get(&format!("/subscriptions/{sub}")).await["stopped"].is_string() },
    )
    .await;
    host.admin_get(&format!("/subscriptions/{sub}")).await
}

#[tokio::test]
async fn a_record_that_cannot_be_ingested_stops_its_subscription_with_the_reason() {
    let (host, topic, sub) = feeding("stop", "a").await;
    // Version 2 removes Feed/take: the next records cannot be ingested.
    let r = host.upload(cairn_tests::read(&example("sim-v2"))).await;
    assert_eq!(r.status, 201, "{}", r.body);
    produce(
        &topic,
        (0..2).map(|_| Record::json("a", &json!(1))).collect(),
    )
    .await;
    let view = stopped(&host, &sub).await;
    let reason = view["stopped"].as_str().unwrap();
    assert!(
        reason.contains(&format!("{topic}/0@3")) && reason.contains("take"),
        "the reason names the record and the cause: {reason}"
    );
    assert_eq!(view["paused"], true);
    assert_eq!(
        view["lag"]["0"], 2,
        "neither record was committed: {view:#}"
    );
    assert_eq!(feed_total(&host, "a").await, 3);
    // Resuming without a fix stops on the same record again: nothing is skipped.
    let r = host
        .admin_post(&format!("/subscriptions/{sub}/resume"), None)
        .await;
    assert_eq!(r.status, 200);
    let again = stopped(&host, &sub).await;
    assert!(
        again["stopped"]
            .as_str()
            .unwrap()
            .contains(&format!("{topic}/0@3")),
        "{again:#}"
    );
}

#[tokio::test]
async fn a_re_created_topic_stops_instead_of_colliding_with_old_records() {
    let (host, topic, sub) = feeding("recreate", "r").await;
    let r = host
        .admin_post(&format!("/subscriptions/{sub}/pause"), None)
        .await;
    assert_eq!(r.status, 200);
    cairn_tests::kafka::delete_topic(&topic).await;
    create_topic(&topic, 1).await;
    produce(
        &topic,
        (0..3).map(|_| Record::json("r", &json!(10))).collect(),
    )
    .await;
    let r = host
        .admin_post(&format!("/subscriptions/{sub}/resume"), None)
        .await;
    assert_eq!(r.status, 200);
    let view = stopped(&host, &sub).await;
    let reason = view["stopped"].as_str().unwrap();
    assert!(
        reason.contains(&format!("{topic}/0@0")) && reason.contains("re-created"),
        "{reason}"
    );
    assert_eq!(
        feed_total(&host, "r").await,
        3,
        "no new record was taken for an old one"
    );
}

#[tokio::test]
async fn cairn_produce_wait_ingested_returns_once_the_records_are_applied() {
    let broker = require_broker();
    let topic = unique_topic("wait-ingested");
    create_topic(&topic, 2).await;
    let host = Host::start_with(options("")).await;
    // `cairn produce TOPIC --key w VALUES... --wait-ingested`.
    let produce = |values: &[&str]| {
        let mut args = vec!["produce", &topic, "--bootstrap", &broker, "--key", "w"];
        args.extend(values);
        args.push("--wait-ingested");
        host.cli(&args)
    };
    let err = produce(&["1"]).unwrap_err().to_string();
    assert!(err.contains("no subscription consumes"), "{err}");
    subscribe(&host, &broker, &topic, "service://Counter/add").await;
    let out = produce(&["2", "3", "4"]).unwrap();
    assert!(out.contains("ingested by 1 subscription"), "{out}");
    // No polling: once the command returned, every record was applied
    // (the 1 produced before the subscription included).
    assert_eq!(counter(&host, "w").await, 10);
}
