//! Cluster mode against a real Apache Kafka broker (`scripts/kafka.sh
//! start`): the store replicated through the changelog, a host on an empty
//! disk taking over after the owner is SIGKILLed, a paused owner fenced.

use cairn_tests::kafka::{require_broker, unique_topic};
use cairn_tests::{example, until, Host, HostOptions};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Hosts of one application `app` (each on its own, fresh data directory).
fn options(app: &str, deploy: bool) -> HostOptions {
    HostOptions {
        config: format!(
            "[cluster]\nbootstrap = {:?}\napp = {app:?}\n",
            require_broker()
        ),
        deploy: match deploy {
            true => vec![example("basics"), example("coordination")],
            false => Vec::new(),
        },
    }
}

async fn counter(host: &Host, key: &str) -> i64 {
    let r = host.post(&format!("/Counter/{key}/get"), "", &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.body.parse().unwrap()
}

async fn add(host: &Host, key: &str, request: u64) -> bool {
    let idempotency = format!("add-{request}");
    let r = host
        .http
        .post(format!("{}/Counter/{key}/add", host.ingress()))
        .header("idempotency-key", &idempotency)
        .body("1")
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    r.is_ok_and(|r| r.status().is_success())
}

async fn send(host: &Host, path: &str, body: &str) -> String {
    let r = host.post(&format!("{path}/send"), body, &[]).await;
    assert!(r.status < 300, "{path}: {} {}", r.status, r.body);
    r.invocation_id()
}

async fn output(host: &Host, id: &str) -> (u16, String) {
    let r = host.get(&format!("/restate/invocation/{id}/attach")).await;
    (r.status, r.body)
}

async fn log_lines(host: &Host, key: &str) -> Vec<String> {
    host.post(&format!("/Log/{key}/lines"), "", &[])
        .await
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

const KEYS: u64 = 8;

/// Idempotent adds on `KEYS` keys until `stop`; returns every request
/// attempted and whether it was acknowledged.
fn load(host: &Host, stop: Arc<Mutex<bool>>) -> tokio::task::JoinHandle<BTreeMap<u64, bool>> {
    let (http, ingress) = (host.http.clone(), host.ingress());
    tokio::spawn(async move {
        let mut sent = BTreeMap::new();
        let mut request = 0u64;
        // Bounded: at most 100,000 requests even if `stop` never comes.
        while !*stop.lock().unwrap() && request < 100_000 {
            let idempotency = format!("add-{request}");
            let acked = http
                .post(format!("{ingress}/Counter/k{}/add", request % KEYS))
                .header("idempotency-key", &idempotency)
                .body("1")
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            sent.insert(request, acked);
            request += 1;
            if !acked {
                break;
            }
        }
        sent
    })
}

#[tokio::test]
async fn a_host_on_an_empty_disk_takes_over_after_the_owner_is_killed() {
    let app = unique_topic("takeover");
    let mut owner = Host::start_with(options(&app, true)).await;
    // Work that outlives the owner: durable sleeps, a delayed send, an
    // awakeable, all due after the kill.
    let mut naps = Vec::new();
    for _ in 0..5 {
        naps.push(send(&owner, "/Sleeper/nap", "3000").await);
    }
    send(&owner, "/Sleeper/later", r#"["later","hello",3000]"#).await;
    let ask = send(&owner, "/Approval/ask", r#""ap""#).await;
    until(
        "the awakeable's id is logged",
        Duration::from_secs(10),
        || async { log_lines(&owner, "ap").await.len() == 1 },
    )
    .await;

    let stop = Arc::new(Mutex::new(false));
    let adds = load(&owner, stop.clone());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    owner.kill();
    let killed = Instant::now();
    *stop.lock().unwrap() = true;
    let sent = adds.await.unwrap();
    let acked = sent.values().filter(|a| **a).count();
    assert!(acked > 10, "only {acked} adds acknowledged before the kill");

    // The new host has nothing on disk and no module given: everything,
    // deployments included, comes from the changelog.
    let heir = Host::start_with(options(&app, false)).await;
    let takeover = killed.elapsed();
    assert!(
        heir.log().contains("Rebuilt"),
        "the heir did not rebuild its store from the changelog:\n{}",
        heir.log()
    );
    // A client retries what was not acknowledged, with the same keys.
    for (request, acked) in &sent {
        if !acked {
            assert!(add(&heir, &format!("k{}", request % KEYS), *request).await);
        }
    }
    // Retrying acknowledged requests applies nothing twice.
    for request in sent.keys().take(20) {
        assert!(add(&heir, &format!("k{}", request % KEYS), *request).await);
    }
    let mut expected = vec![0i64; KEYS as usize];
    for request in sent.keys() {
        expected[(request % KEYS) as usize] += 1;
    }
    for (k, want) in expected.iter().enumerate() {
        assert_eq!(counter(&heir, &format!("k{k}")).await, *want, "key k{k}");
    }

    // The killed owner's timers fire on the heir, its awakeable resolves.
    for nap in &naps {
        assert_eq!(output(&heir, nap).await, (200, "3000".into()), "nap {nap}");
    }
    until(
        "the delayed send arrives",
        Duration::from_secs(20),
        || async { log_lines(&heir, "later").await == ["hello"] },
    )
    .await;
    let awakeable = log_lines(&heir, "ap").await.remove(0);
    let resolved = heir
        .post(
            &format!("/restate/awakeables/{awakeable}/resolve"),
            r#""yes""#,
            &[],
        )
        .await;
    assert!(resolved.status < 300, "{}", resolved.body);
    assert_eq!(
        output(&heir, &ask).await,
        (200, r#""approved: yes""#.into())
    );
    eprintln!(
        "takeover: {:.1} s from the kill to a serving heir ({} acknowledged adds)",
        takeover.as_secs_f64(),
        acked
    );

    // The old owner's disk is now stale: restarted, it rebuilds from the
    // changelog instead of trusting its copy.
    let mut totals = Vec::new();
    for k in 0..KEYS {
        totals.push(counter(&heir, &format!("k{k}")).await);
    }
    drop(heir);
    owner.restart().await;
    let log = owner.log();
    let this_start = log.rsplit("cairn is ready").nth(1).unwrap_or_default();
    assert!(
        log.matches("Rebuilt").count() >= 1 && !this_start.contains("UpToDate"),
        "the stale owner trusted its local store:\n{log}"
    );
    for (k, total) in totals.iter().enumerate() {
        assert_eq!(counter(&owner, &format!("k{k}")).await, *total, "key k{k}");
    }
}

#[tokio::test]
async fn a_restarted_owner_goes_on_from_its_own_disk() {
    let app = unique_topic("restart");
    let mut host = Host::start_with(options(&app, true)).await;
    assert!(add(&host, "r", 1).await);
    host.restart().await;
    assert!(
        host.log().contains("UpToDate"),
        "the host rebuilt although nobody else wrote:\n{}",
        host.log()
    );
    assert_eq!(counter(&host, "r").await, 1);
}

#[tokio::test]
async fn a_standalone_store_becomes_the_first_copy_of_a_cluster() {
    let app = unique_topic("seed");
    let mut first = Host::start_with(HostOptions {
        config: String::new(),
        deploy: vec![example("basics")],
    })
    .await;
    assert!(add(&first, "s", 1).await);
    first.restart_with(options(&app, false)).await;
    assert!(
        first.log().contains("Seeded"),
        "the standalone store was not written to the empty changelog:\n{}",
        first.log()
    );
    assert!(add(&first, "s", 2).await);
    first.kill();
    let second = Host::start_with(options(&app, false)).await;
    assert_eq!(counter(&second, "s").await, 2);
    // A store that was never part of the cluster cannot join a cluster
    // that has a history: one of the two would lose its data.
    let mut stranger = Host::start_with(HostOptions {
        config: String::new(),
        deploy: vec![example("basics")],
    })
    .await;
    assert!(add(&stranger, "s", 3).await);
    stranger.kill();
    let refused = std::process::Command::new(cairn_tests::cairn_bin())
        .args([
            "serve",
            "--cluster",
            &require_broker(),
            "--cluster-app",
            &app,
        ])
        .arg("--data-dir")
        .arg(stranger.data_dir().join("db"))
        .args(["--ingress", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("start this host with an empty --data-dir"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_paused_owner_is_fenced_and_none_of_its_writes_land() {
    let app = unique_topic("zombie");
    let mut zombie = Host::start_with(options(&app, true)).await;
    assert!(add(&zombie, "z", 1).await);
    signal(zombie.pid(), "STOP");
    let heir = Host::start_with(options(&app, false)).await;
    assert_eq!(counter(&heir, "z").await, 1);

    // A request reaches the paused owner; it wakes up and tries to commit.
    let late = {
        let (http, ingress) = (zombie.http.clone(), zombie.ingress());
        tokio::spawn(async move {
            http.post(format!("{ingress}/Counter/z/add"))
                .header("idempotency-key", "late")
                .body("100")
                .send()
                .await
                .map(|r| r.status())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(zombie.pid(), "CONT");
    let answer = late.await.unwrap();
    assert!(
        !answer.as_ref().is_ok_and(|s| s.is_success()),
        "the fenced host acknowledged a write: {answer:?}"
    );
    until("the fenced host stops", Duration::from_secs(30), || {
        let stopped = !zombie.running();
        async move { stopped }
    })
    .await;
    assert!(
        zombie.log().contains("fenced"),
        "the zombie did not say it was fenced:\n{}",
        zombie.log()
    );
    // The heir never sees the zombie's write, and goes on.
    assert!(add(&heir, "z", 2).await);
    assert_eq!(counter(&heir, "z").await, 2);
}

fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}
