//! `cairn-loadgen`: the benchmark. Starts a host (or targets a running one)
//! and drives its ingress with a fixed concurrency, then prints
//! invocations/s, p50/p99/max latency and the host's peak memory.
//!
//! Run it with `scripts/bench.sh` (release build, examples built first).

use cairn_tests::{example, proc_status_kib, Host};
use clap::Parser;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Drive a Cairn host with load and print what it sustains.
#[derive(Parser)]
#[command(args_override_self = true)]
struct Args {
    /// Concurrent requests in flight.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Measured seconds per scenario (after a 1 s warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Scenarios to run: steps3, counter-keys, counter-hot (HTTP); kafka-counter, kafka-object, kafka-service (Kafka);
    /// send-delayed (HTTP, not in the default set: sends due in a day).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "steps3,counter-keys,counter-hot,kafka-counter,kafka-object,kafka-service"
    )]
    scenarios: Vec<String>,
    /// Records per Kafka scenario (the broker is `CAIRN_KAFKA_BOOTSTRAP`, default 127.0.0.1:9092).
    #[arg(long, default_value_t = 200_000)]
    kafka_records: usize,
    /// Top-level TOML settings for the host it starts, e.g. `db_cache_bytes = 1073741824`.
    #[arg(long, default_value = "")]
    host_config: String,
    /// Use a running host's ingress instead of starting one (memory is then not reported).
    #[arg(long)]
    ingress: Option<String>,
    /// Soak: run the first scenario at full rate for this many minutes and
    /// print, every minute, the rate, p99, the host's RSS and its data size
    /// (use with `completed_retention = "1m"`: both must level off).
    #[arg(long)]
    soak_minutes: Option<u64>,
    /// Timers: submit about this many sends due in a day (`send-delayed`),
    /// print the host's memory and its timers, then SIGKILL it and print how
    /// long the restart takes until the host is ready again.
    #[arg(long)]
    timers: Option<u64>,
    /// Listing: store about this many invocations (half finished
    /// `steps3`, half sends due in a day on 1,000 keys), then time filtered
    /// pages of `GET /invocations` (p50/p99 of 50 requests per filter).
    #[arg(long)]
    listing: Option<u64>,
    /// Kafka pipeline: pre-produce this many records (1,000 keys, 6
    /// partitions), subscribe `Counter/add` and print records/s, the host's
    /// CPU and peak RSS; then, on a fresh host, a steady 5,000 records/s for
    /// `--seconds` into `Latency/observe` with the p50/p99 from produce to
    /// the handler.
    #[arg(long)]
    pipeline: Option<usize>,
    /// Records per second of the pipeline's steady phase.
    #[arg(long, default_value_t = 5000)]
    steady_rate: u64,
}

struct Scenario {
    name: &'static str,
    path: fn(u64) -> String,
    body: &'static str,
}

const SCENARIOS: [Scenario; 5] = [
    Scenario {
        name: "steps3",
        path: |_| "/Steps/steps3".into(),
        body: "",
    },
    Scenario {
        name: "counter-keys",
        path: |i| format!("/Counter/k{}/add", i % 1000),
        body: "1",
    },
    Scenario {
        name: "counter-hot",
        path: |_| "/Counter/hot/add".into(),
        body: "1",
    },
    // Not in the default set: fills the host with invocations due in a day
    // (timers), to measure their memory and the restart time with them.
    Scenario {
        name: "send-delayed",
        path: |i| format!("/Counter/k{}/add/send?delay=1d", i % 1000),
        body: "1",
    },
    // Not in the default set: each request fans out to 1,000 calls and
    // joins them (the per-answer cost on the writer, once quadratic in
    // the journal's length).
    Scenario {
        name: "fan-out",
        path: |_| "/Chain/spread".into(),
        body: "1000",
    },
];

/// The example handlers the scenarios need (coordination only for
/// `fan-out`, so the other scenarios' memory figures stay comparable).
fn examples_for(scenarios: &[String]) -> Vec<std::path::PathBuf> {
    let mut deploy = vec![example("basics")];
    if scenarios.iter().any(|s| s == "fan-out") {
        deploy.push(example("coordination"));
    }
    deploy
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut host = match &args.ingress {
        Some(_) => None,
        None => Some(
            Host::start_with(cairn_tests::HostOptions {
                config: args.host_config.clone(),
                deploy: examples_for(&args.scenarios),
            })
            .await,
        ),
    };
    let ingress = args
        .ingress
        .clone()
        .unwrap_or_else(|| host.as_ref().unwrap().ingress());
    println!(
        "cairn-loadgen: concurrency {}, {} s per scenario, durable commits on, host and load generator share this machine ({} cores)",
        args.concurrency,
        args.seconds,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<14} {:>10} {:>10} {:>9} {:>9} {:>9} {:>7} {:>9}",
        "scenario", "requests", "inv/s", "p50 ms", "p99 ms", "max ms", "errors", "peak MiB"
    );
    if let Some(n) = args.listing {
        let host = host.as_ref().ok_or_else(|| {
            anyhow::anyhow!("the listing run starts its own host: omit --ingress")
        })?;
        return listing(&args, host, n).await;
    }
    if let Some(n) = args.pipeline {
        let host = host.as_mut().ok_or_else(|| {
            anyhow::anyhow!("the pipeline run starts its own host: omit --ingress")
        })?;
        return pipeline(&args, host, n).await;
    }
    if let Some(n) = args.timers {
        let host = host
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("the timers run starts its own host: omit --ingress"))?;
        return timers(&args, host, n).await;
    }
    if let Some(minutes) = args.soak_minutes {
        let host = host
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("the soak starts its own host: omit --ingress"))?;
        return soak(&args, host, minutes).await;
    }
    for name in &args.scenarios {
        if let Some(sink) = kafka_sink(name) {
            let host = host.as_ref().ok_or_else(|| {
                anyhow::anyhow!("Kafka scenarios start their own host: omit --ingress")
            })?;
            kafka(host, name, sink, args.kafka_records).await;
            continue;
        }
        let scenario = SCENARIOS
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| anyhow::anyhow!("unknown scenario {name}"))?;
        run(&args, &ingress, scenario, Duration::from_secs(1)).await;
        let r = run(&args, &ingress, scenario, Duration::from_secs(args.seconds)).await;
        println!(
            "{:<14} {:>10} {:>10.0} {:>9.2} {:>9.2} {:>9.2} {:>7} {:>9}",
            scenario.name,
            r.count,
            r.rate,
            r.p50,
            r.p99,
            r.max,
            r.errors,
            host.as_ref().map_or("-".into(), peak_mib)
        );
    }
    if let Some(host) = &host {
        println!(
            "host peak memory (VmHWM): {:.1} MiB; current (VmRSS): {:.1} MiB",
            host.peak_rss_kib() as f64 / 1024.0,
            proc_status_kib(host.pid(), "VmRSS:") as f64 / 1024.0
        );
    }
    Ok(())
}

/// Fill the host with `n` delayed sends, then restart it after a SIGKILL.
async fn timers(args: &Args, host: &mut Host, n: u64) -> anyhow::Result<()> {
    fill(args, host, "send-delayed", n).await;
    let report = |host: &Host, storage: &serde_json::Value| {
        format!(
            "{} timers in the table, {} in memory; host memory {:.1} MiB (VmRSS)",
            storage["rows"]["timers"],
            storage["memory"]["timers"],
            proc_status_kib(host.pid(), "VmRSS:") as f64 / 1024.0
        )
    };
    println!(
        "before the SIGKILL: {}",
        report(host, &host.admin_get("/storage").await)
    );
    let restarted = Instant::now();
    host.restart().await;
    let ready = restarted.elapsed();
    println!(
        "restart after SIGKILL: ready in {:.2} s; {}",
        ready.as_secs_f64(),
        report(host, &host.admin_get("/storage").await)
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    println!(
        "10 s later: {}",
        report(host, &host.admin_get("/storage").await)
    );
    Ok(())
}

/// Run scenario `name` in 10 s rounds until it made about `n` requests,
/// printing each round; how many it made.
async fn fill(args: &Args, host: &Host, name: &str, n: u64) -> usize {
    let scenario = SCENARIOS.iter().find(|s| s.name == name).unwrap();
    let mut sent = 0;
    while sent < n as usize {
        let r = run(args, &host.ingress(), scenario, Duration::from_secs(10)).await;
        sent += r.count;
        println!(
            "{:<14} {:>10} {:>10.0} {:>9.2} {:>9.2} {:>9.2} {:>7} {:>9}",
            scenario.name,
            sent,
            r.rate,
            r.p50,
            r.p99,
            r.max,
            r.errors,
            peak_mib(host)
        );
    }
    sent
}

/// Store `n` invocations, then time filtered listing pages.
async fn listing(args: &Args, host: &Host, n: u64) -> anyhow::Result<()> {
    let mut stored = 0;
    for name in ["steps3", "send-delayed"] {
        stored += fill(args, host, name, n / 2).await;
    }
    let storage = host.admin_get("/storage").await;
    println!(
        "{stored} invocations stored ({} rows in invocations, {} in listing)",
        storage["rows"]["invocations"], storage["rows"]["listing"]
    );
    println!(
        "{:<58} {:>7} {:>9} {:>9} {:>6}",
        "GET /invocations?...", "found", "p50 ms", "p99 ms", "more"
    );
    for query in [
        "limit=50",
        "service=Counter&key=k7&limit=50",
        "service=Steps&status=succeeded&limit=50",
        "status=scheduled&limit=50",
        "handler=add&limit=50",
        "status=paused&limit=50",
        "service=Counter&status=running&limit=50",
        "created_before=2000-01-01T00:00:00Z&limit=50",
    ] {
        let mut times = Vec::new();
        let mut last = serde_json::Value::Null;
        for _ in 0..50 {
            let t = Instant::now();
            last = host.admin_get(&format!("/invocations?{query}")).await;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        println!(
            "{:<58} {:>7} {:>9.2} {:>9.2} {:>6}",
            query,
            last["invocations"].as_array().map_or(0, Vec::len),
            times[times.len() / 2],
            times[times.len() * 99 / 100],
            if last["next_cursor"].is_null() {
                "no"
            } else {
                "yes"
            }
        );
    }
    Ok(())
}

/// One line a minute: the curve of rate, p99, memory and disk over a long run.
async fn soak(args: &Args, host: &Host, minutes: u64) -> anyhow::Result<()> {
    let name = args.scenarios.first().map_or("steps3", String::as_str);
    let scenario = SCENARIOS
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| anyhow::anyhow!("the soak runs an HTTP scenario, not {name}"))?;
    println!(
        "{:<7} {:>10} {:>9} {:>9} {:>10} {:>12} {:>11}",
        "minute", "inv/s", "p50 ms", "p99 ms", "RSS MiB", "data MiB", "completed"
    );
    let mut total = 0;
    for minute in 1..=minutes {
        let r = run(args, &host.ingress(), scenario, Duration::from_secs(60)).await;
        total += r.count;
        let data =
            std::fs::metadata(host.data_dir().join("db").join("cairn.redb")).map_or(0, |m| m.len());
        println!(
            "{:<7} {:>10.0} {:>9.2} {:>9.2} {:>10.1} {:>12.1} {:>11}",
            minute,
            r.rate,
            r.p50,
            r.p99,
            proc_status_kib(host.pid(), "VmRSS:") as f64 / 1024.0,
            data as f64 / (1024.0 * 1024.0),
            total
        );
    }
    println!(
        "host peak memory (VmHWM): {:.1} MiB",
        host.peak_rss_kib() as f64 / 1024.0
    );
    Ok(())
}

fn kafka_sink(scenario: &str) -> Option<&'static str> {
    match scenario {
        "kafka-object" => Some("service://Latency/observe"),
        "kafka-counter" => Some("service://Counter/add"),
        "kafka-service" => Some("service://Steps/steps3"),
        _ => None,
    }
}

/// Subscribe a fresh topic to `sink`, produce `n` records over 1,000 keys
/// as fast as possible, and wait until every invocation has finished.
async fn kafka(host: &Host, name: &str, sink: &str, n: usize) {
    use cairn_tests::kafka::{
        create_topic, produce, require_broker, subscribe, unique_topic, Record,
    };
    let broker = require_broker();
    let topic = unique_topic(name);
    create_topic(&topic, 4).await;
    let sub = subscribe(host, &broker, &topic, sink).await;
    // Warm up: one record through, so the consumer has joined its group and
    // holds its partitions before the clock starts.
    produce(&topic, vec![Record::json("warm-up", &serde_json::json!(1))]).await;
    wait_ingested(host, &sub, 1).await;
    let started = Instant::now();
    produce(&topic, counts(n)).await;
    let produced = started.elapsed();
    wait_ingested(host, &sub, n as u64 + 1).await;
    let elapsed = started.elapsed();
    let mut latency = String::new();
    if sink.contains("Latency") {
        let (p50, p99, max) = latencies(host, "k").await;
        latency = format!(", end-to-end latency p50 {p50} ms, p99 {p99} ms, max {max} ms");
    }
    println!(
        "{:<14} {n} records into {sink}: {:.0} records/s from the first produce to the last finished invocation (producing took {:.1} s){latency}; host peak so far {} MiB",
        name,
        n as f64 / elapsed.as_secs_f64(),
        produced.as_secs_f64(),
        peak_mib(host)
    );
}

/// `n` records of value 1 over the keys `k0`..`k999`.
fn counts(n: usize) -> Vec<cairn_tests::kafka::Record> {
    (0..n)
        .map(|i| cairn_tests::kafka::Record::json(&format!("k{}", i % 1000), &serde_json::json!(1)))
        .collect()
}

/// The sum of `Counter/k0..k999`.
async fn counted(host: &Host) -> i64 {
    let mut sum = 0;
    for k in 0..1000 {
        let count = host.post(&format!("/Counter/k{k}/get"), "", &[]).await;
        sum += count.json().as_i64().unwrap_or(0);
    }
    sum
}

/// p50, p99 and max (ms) of the latencies `Latency/{prefix}0..999` saw.
async fn latencies(host: &Host, prefix: &str) -> (u64, u64, u64) {
    let mut histogram = std::collections::BTreeMap::<u64, u64>::new();
    for k in 0..1000 {
        let h = host
            .post(&format!("/Latency/{prefix}{k}/histogram"), "", &[])
            .await
            .json();
        for (ms, count) in h.as_object().into_iter().flatten() {
            *histogram.entry(ms.parse().unwrap()).or_default() += count.as_u64().unwrap();
        }
    }
    let total: u64 = histogram.values().sum();
    let pct = |p: f64| {
        let mut seen = 0;
        histogram
            .iter()
            .find(|(_, c)| {
                seen += **c;
                seen as f64 >= total as f64 * p
            })
            .map_or(0, |(ms, _)| *ms)
    };
    let max = histogram.keys().last().copied().unwrap_or(0);
    (pct(0.5), pct(0.99), max)
}

/// CPU seconds process `pid` has used (user + system).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime, stime
    // are the 12th and 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum();
    ticks / 100.0 // USER_HZ
}

/// The Kafka pipeline benchmark (see `--pipeline`).
async fn pipeline(args: &Args, host: &mut Host, n: usize) -> anyhow::Result<()> {
    use cairn_tests::kafka::{create_topic, produce, require_broker, unique_topic, Record};
    let broker = require_broker();
    let topic = unique_topic("pipeline");
    create_topic(&topic, 6).await;
    let t = Instant::now();
    produce(&topic, counts(n)).await;
    println!(
        "pre-produced {n} records over 1,000 keys on 6 partitions in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let before = counted(host).await;
    let (cpu0, started) = (cpu_seconds(host.pid()), Instant::now());
    let sub = cairn_tests::kafka::subscribe(host, &broker, &topic, "service://Counter/add").await;
    wait_ingested(host, &sub, n as u64).await;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(host.pid()) - cpu0;
    let counted = counted(host).await - before;
    anyhow::ensure!(
        counted == n as i64,
        "the counters grew by {counted}, not by the {n} records ingested"
    );
    println!(
        "catch-up: {n} records into Counter/add (the counters grew by exactly {n}) in {elapsed:.1} s: \
         {:.0} records/s; host CPU {:.0}% \
         ({cpu:.1} s of {} cores); host peak RSS {} MiB",
        n as f64 / elapsed,
        100.0 * cpu / elapsed,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        peak_mib(host)
    );
    // Steady: a paced producer, records to 1,000 `Latency` keys, on a
    // fresh host: the catch-up's invocations expire a minute after they
    // finish (`completed_retention`), and purging half a million of them
    // would land in the middle of this phase. A run of `--seconds 90` or
    // more includes the purge of the steady phase's own first records.
    host.kill();
    let host = &Host::start_with(cairn_tests::HostOptions {
        config: args.host_config.clone(),
        ..Default::default()
    })
    .await;
    let topic = unique_topic("steady");
    create_topic(&topic, 6).await;
    let sub =
        cairn_tests::kafka::subscribe(host, &broker, &topic, "service://Latency/observe").await;
    // No linger: a record's timestamp is taken when it is handed over.
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &broker)
        .set("enable.idempotence", "true")
        .set("linger.ms", "0")
        .create()?;
    // Warm up through the paced producer: its first record waits about
    // 500 ms for the topic's metadata and a producer id, which is the
    // producer starting, not the pipeline.
    let warm_up = vec![Record::json("warm-up", &serde_json::json!(1))];
    cairn_tests::kafka::produce_with(&producer, &topic, warm_up).await;
    wait_ingested(host, &sub, 1).await;
    let total = (args.steady_rate * args.seconds) as usize;
    let tick = Duration::from_millis(10);
    let per_tick = (args.steady_rate / 100).max(1) as usize;
    let (cpu0, started) = (cpu_seconds(host.pid()), Instant::now());
    let mut sent = 0;
    let mut next = Instant::now();
    while sent < total {
        let batch: Vec<Record> = (sent..(sent + per_tick).min(total))
            .map(|i| Record::json(&format!("s{}", i % 1000), &serde_json::json!(1)))
            .collect();
        sent += batch.len();
        cairn_tests::kafka::produce_with(&producer, &topic, batch).await;
        next += tick;
        tokio::time::sleep_until(next.into()).await;
    }
    wait_ingested(host, &sub, total as u64 + 1).await;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(host.pid()) - cpu0;
    let (p50, p99, max) = latencies(host, "s").await;
    println!(
        "steady: {total} records at {} records/s into Latency/observe: produce to handler p50 {p50} ms, \
         p99 {p99} ms, max {max} ms; host CPU {:.0}%; host peak RSS {} MiB",
        args.steady_rate,
        100.0 * cpu / elapsed,
        peak_mib(host)
    );
    Ok(())
}

/// The host's peak memory so far (VmHWM), in MiB.
fn peak_mib(host: &Host) -> String {
    format!("{:.0}", host.peak_rss_kib() as f64 / 1024.0)
}

/// Wait until `sub` has ingested `count` records and all of them finished.
async fn wait_ingested(host: &Host, sub: &str, count: u64) {
    loop {
        let v = host.admin_get(&format!("/subscriptions/{sub}")).await;
        if v["ingested"].as_u64() == Some(count) && v["in_flight"].as_u64() == Some(0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Report {
    count: usize,
    rate: f64,
    p50: f64,
    p99: f64,
    max: f64,
    errors: u64,
}

async fn run(args: &Args, ingress: &str, scenario: &'static Scenario, length: Duration) -> Report {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..args.concurrency)
        .map(|_| {
            let (client, stop, counter, errors) = (
                client.clone(),
                stop.clone(),
                counter.clone(),
                errors.clone(),
            );
            let ingress = ingress.to_string();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let i = counter.fetch_add(1, Ordering::Relaxed);
                    let t = Instant::now();
                    let ok = client
                        .post(format!("{ingress}{}", (scenario.path)(i)))
                        .header("content-type", "application/json")
                        .body(scenario.body)
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success());
                    if ok {
                        latencies.push(t.elapsed().as_micros() as u32);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                latencies
            })
        })
        .collect();
    tokio::time::sleep(length).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    Report {
        count: all.len(),
        rate: all.len() as f64 / elapsed,
        p50: pct(0.50),
        p99: pct(0.99),
        max: all.last().copied().unwrap_or(0) as f64 / 1000.0,
        errors: errors.load(Ordering::Relaxed),
    }
}
