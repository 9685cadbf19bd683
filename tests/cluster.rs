//! Cluster mode against a real Apache Kafka broker (`scripts/kafka.sh
//! start`): the store replicated through the changelog, ownership through
//! the consumer group, requests forwarded from any host to the owner, a
//! host on an empty disk taking over after the owner is SIGKILLed, a
//! paused owner fenced, a graceful leave.

use cairn_tests::kafka::{require_broker, unique_topic};
use cairn_tests::{add_once, add_until_acked, example, until, Host, HostOptions};
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

/// This host's role as it reports it (`owner`, `standby`, `taking-over`).
async fn role(host: &Host) -> String {
    host.admin_get("/cluster").await["partitions"][0]["role"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Wait until `host` owns the partition and serves it.
async fn until_owner(host: &Host, within: Duration) {
    until("the host owns the partition", within, || async {
        role(host).await == "owner"
    })
    .await;
}

/// Wait until `host` knows an owner to forward to.
async fn until_forwarding(host: &Host) {
    until(
        "the standby knows the owner",
        Duration::from_secs(30),
        || async { !host.admin_get("/cluster").await["partitions"][0]["owner"].is_null() },
    )
    .await;
}

/// The host among `hosts` (but `except`) that owns the partition.
async fn owner_among(hosts: &[Host], except: Option<usize>) -> Option<usize> {
    for (i, host) in hosts.iter().enumerate() {
        if Some(i) != except && role(host).await == "owner" {
            return Some(i);
        }
    }
    None
}

/// Wait until a standby's copy of the store has reached the head of the
/// changelog (a hot standby).
async fn until_hot(host: &Host) {
    until(
        "the standby's copy reaches the head of the changelog",
        Duration::from_secs(30),
        || async {
            host.admin_get("/cluster").await["partitions"][0]["copy"]["at_head_ms"]
                .as_u64()
                .is_some_and(|at| at > 0)
        },
    )
    .await;
}

/// Longest wait for a takeover: the session timeout (6 s), a rebalance and
/// a restore, with room for a loaded machine.
const TAKEOVER: Duration = Duration::from_secs(40);

async fn counter(host: &Host, key: &str) -> i64 {
    let r = host.post(&format!("/Counter/{key}/get"), "", &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.body.parse().unwrap()
}

async fn add(host: &Host, key: &str, request: u64) -> bool {
    let url = format!("{}/Counter/{key}/add", host.ingress());
    add_once(
        &host.http,
        &url,
        &format!("add-{request}"),
        Duration::from_secs(5),
    )
    .await
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
            let url = format!("{ingress}/Counter/k{}/add", request % KEYS);
            let five = Duration::from_secs(5);
            let acked = add_once(&http, &url, &format!("add-{request}"), five).await;
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
    until_owner(&owner, TAKEOVER).await;
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
    // deployments included, comes from the changelog (it follows the log
    // as a standby until the group gives it the partition).
    let heir = Host::start_with(options(&app, false)).await;
    until_owner(&heir, TAKEOVER).await;
    let takeover = killed.elapsed();
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

    // The old owner's disk is now behind the log: restarted, it applies
    // what the heir wrote after it.
    let mut totals = Vec::new();
    for k in 0..KEYS {
        totals.push(counter(&heir, &format!("k{k}")).await);
    }
    drop(heir);
    owner.restart().await;
    until_owner(&owner, TAKEOVER).await;
    let restart = this_start(&owner);
    assert!(
        !restart.contains("Rebuilt")
            && (restart.contains("CaughtUp") || restart.contains("UpToDate")),
        "the old owner did not go on from its position:\n{}",
        owner.log()
    );
    for (k, total) in totals.iter().enumerate() {
        assert_eq!(counter(&owner, &format!("k{k}")).await, *total, "key k{k}");
    }
    // A copy older than cluster.trusted_for may miss deletes whose
    // tombstones compaction dropped: it is rebuilt from the whole log.
    let mut distrustful = options(&app, false);
    distrustful.config.push_str("trusted_for = \"0s\"\n");
    owner.restart_with(distrustful).await;
    until_owner(&owner, TAKEOVER).await;
    assert!(
        this_start(&owner).contains("Rebuilt"),
        "an untrusted copy was not rebuilt:\n{}",
        owner.log()
    );
    for (k, total) in totals.iter().enumerate() {
        assert_eq!(counter(&owner, &format!("k{k}")).await, *total, "key k{k}");
    }
}

/// The host's log since its last start.
fn this_start(host: &Host) -> String {
    let log = host.log();
    let start = log.rfind("cairn is ready").unwrap_or(0);
    log[start..].to_string()
}

#[tokio::test]
async fn a_restarted_owner_goes_on_from_its_own_disk() {
    let app = unique_topic("restart");
    let mut host = Host::start_with(options(&app, true)).await;
    until_owner(&host, TAKEOVER).await;
    assert!(add(&host, "r", 1).await);
    host.restart().await;
    until_owner(&host, TAKEOVER).await;
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
    until_owner(&first, TAKEOVER).await;
    assert!(
        first.log().contains("Seeded"),
        "the standalone store was not written to the empty changelog:\n{}",
        first.log()
    );
    assert!(add(&first, "s", 2).await);
    first.kill();
    let mut second = Host::start_with(options(&app, false)).await;
    until_owner(&second, TAKEOVER).await;
    assert_eq!(counter(&second, "s").await, 2);
    second.kill();
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
    until_owner(&zombie, TAKEOVER).await;
    assert!(add(&zombie, "z", 1).await);
    let heir = Host::start_with(options(&app, false)).await;
    until_forwarding(&heir).await;
    signal(zombie.pid(), "STOP");
    // The paused owner stops heartbeating: the group gives the heir the
    // partition, and the heir's start fences the paused owner.
    until_owner(&heir, TAKEOVER).await;
    assert_eq!(counter(&heir, "z").await, 1);

    // A request reaches the paused owner; it wakes up and tries to commit.
    let late = {
        let (http, ingress) = (zombie.http.clone(), zombie.ingress());
        tokio::spawn(async move {
            // Marked as forwarded already: the zombie answers it itself
            // or not at all (it never forwards it to the heir).
            http.post(format!("{ingress}/Counter/z/add"))
                .header("idempotency-key", "late")
                .header("x-cairn-forwarded", "1")
                .body("100")
                .send()
                .await
                .map(|r| r.status())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(zombie.pid(), "CONT");
    let answer = late.await.unwrap();
    // The woken host steps down: its commit is fenced (it stops), or the
    // group's revocation reaches it first (it hands the partition over in
    // process, and refuses the request it may not forward).
    let woken = Instant::now();
    while zombie.running() && still_owns_something(&zombie).await {
        assert!(
            woken.elapsed() < Duration::from_secs(30),
            "the fenced host did not step down"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = zombie.log();
    assert!(
        log.contains("fenced") || log.contains("handed the partition over"),
        "the zombie did not say why it stepped down:\n{log}"
    );
    assert!(
        !answer.as_ref().is_ok_and(|s| s.is_success()),
        "the fenced host acknowledged a write: {answer:?}"
    );
    // The heir never sees the zombie's write, and goes on.
    assert!(add(&heir, "z", 2).await);
    assert_eq!(counter(&heir, "z").await, 2);
}

/// Whether `host` says it owns a partition (not if it does not answer: it
/// may be stopping).
async fn still_owns_something(host: &Host) -> bool {
    let answer = host
        .http
        .get(format!("{}/cluster", host.admin()))
        .send()
        .await;
    match answer {
        Ok(r) => r.json::<serde_json::Value>().await.is_ok_and(|status| {
            status["partitions"]
                .as_array()
                .is_some_and(|parts| parts.iter().any(|p| p["role"] == "owner"))
        }),
        Err(_) => false,
    }
}

fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// Adds through every host in turn, each with its own idempotency key,
/// retried (same key, next host) until acknowledged; returns when `stop`.
fn load_through(
    hosts: Vec<(reqwest::Client, String)>,
    stop: Arc<Mutex<bool>>,
) -> tokio::task::JoinHandle<(u64, Vec<Duration>)> {
    tokio::spawn(async move {
        let (mut request, mut gaps) = (0u64, Vec::new());
        // Bounded: 100,000 requests at most.
        while !*stop.lock().unwrap() && request < 100_000 {
            let started = Instant::now();
            let mut turn = request as usize;
            let path = format!("/Counter/k{}/add", request % KEYS);
            let key = format!("add-{request}");
            add_until_acked(&hosts, &mut turn, &path, &key, Duration::from_secs(90)).await;
            gaps.push(started.elapsed());
            request += 1;
        }
        (request, gaps)
    })
}

#[tokio::test]
async fn any_host_serves_any_request_and_the_partition_moves_when_its_owner_dies() {
    let app = unique_topic("three");
    let mut hosts = vec![Host::start_with(options(&app, true)).await];
    until_owner(&hosts[0], TAKEOVER).await;
    for _ in 0..2 {
        let standby = Host::start_with(options(&app, true)).await;
        until_forwarding(&standby).await;
        hosts.push(standby);
    }
    assert_eq!(role(&hosts[1]).await, "standby");
    // A standby forwards calls, sends and attach to the owner.
    let nap = send(&hosts[1], "/Sleeper/nap", "10").await;
    assert_eq!(output(&hosts[2], &nap).await, (200, "10".into()));

    let clients = hosts
        .iter()
        .map(|h| (h.http.clone(), h.ingress()))
        .collect();
    let stop = Arc::new(Mutex::new(false));
    let adds = load_through(clients, stop.clone());
    let mut takeovers = Vec::new();
    for round in 0..2 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let owner = owner_among(&hosts, None)
            .await
            .expect("one host owns the partition");
        hosts[owner].kill();
        let killed = Instant::now();
        let mut heir = None;
        while heir.is_none() {
            assert!(
                killed.elapsed() < TAKEOVER,
                "no host took over in {TAKEOVER:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            heir = owner_among(&hosts, Some(owner)).await;
        }
        takeovers.push(killed.elapsed());
        eprintln!(
            "round {round}: host {owner} killed, host {} took over in {:.1} s",
            heir.unwrap(),
            killed.elapsed().as_secs_f64()
        );
        hosts[owner].restart().await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    *stop.lock().unwrap() = true;
    let (requests, gaps) = adds.await.unwrap();
    let mut expected = vec![0i64; KEYS as usize];
    for request in 0..requests {
        expected[(request % KEYS) as usize] += 1;
    }
    let owner = &hosts[owner_among(&hosts, None).await.expect("an owner")];
    for (k, want) in expected.iter().enumerate() {
        assert_eq!(
            counter(owner, &format!("k{k}")).await,
            *want,
            "key k{k}: every acknowledged add applied exactly once"
        );
    }
    let longest = gaps.iter().max().unwrap();
    eprintln!(
        "{requests} adds through three hosts; takeovers {takeovers:?}; longest wait of a client {longest:?}"
    );
}

#[tokio::test]
async fn a_host_that_joins_leaves_the_partition_where_it_is() {
    let app = unique_topic("join");
    let owner = Host::start_with(options(&app, true)).await;
    until_owner(&owner, TAKEOVER).await;
    let stop = Arc::new(Mutex::new(false));
    let adds = load_through(vec![(owner.http.clone(), owner.ingress())], stop.clone());
    // Two hosts join while adds go on: the sticky assignor keeps the
    // partition with its owner, so no client waits for a takeover.
    let mut joined = Vec::new();
    for _ in 0..2 {
        let host = Host::start_with(options(&app, true)).await;
        until_forwarding(&host).await;
        joined.push(host);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    *stop.lock().unwrap() = true;
    let (requests, gaps) = adds.await.unwrap();
    assert_eq!(role(&owner).await, "owner");
    for host in &joined {
        assert_eq!(role(host).await, "standby");
    }
    assert!(
        !owner.log().contains("assigned partition 0 back"),
        "the owner lost contact while hosts joined:\n{}",
        owner.log()
    );
    let longest = *gaps.iter().max().unwrap();
    assert!(
        longest < Duration::from_secs(3),
        "a client waited {longest:?} while hosts joined"
    );
    let total: i64 = {
        let mut sum = 0;
        for k in 0..KEYS {
            sum += counter(&joined[0], &format!("k{k}")).await;
        }
        sum
    };
    assert_eq!(
        total, requests as i64,
        "every add once, read through a joined host"
    );
}

#[tokio::test]
async fn a_graceful_leave_hands_the_partition_over() {
    let app = unique_topic("leave");
    let mut owner = Host::start_with(options(&app, true)).await;
    until_owner(&owner, TAKEOVER).await;
    let standby = Host::start_with(options(&app, true)).await;
    until_forwarding(&standby).await;
    assert!(add(&standby, "g", 1).await);
    until_hot(&standby).await;
    signal(owner.pid(), "TERM");
    let left = Instant::now();
    // Bounded: the until below gives up after TAKEOVER.
    until("the standby serves again", TAKEOVER, || async {
        add(&standby, "g", 2).await
    })
    .await;
    let unavailable = left.elapsed();
    until("the owner exits", Duration::from_secs(20), || {
        let gone = !owner.running();
        async move { gone }
    })
    .await;
    assert_eq!(role(&standby).await, "owner");
    assert_eq!(counter(&standby, "g").await, 2);
    assert!(
        standby.log().contains("UpToDate") || standby.log().contains("CaughtUp"),
        "the standby did not follow the changelog:\n{}",
        standby.log()
    );
    eprintln!(
        "graceful leave: {:.2} s without an owner",
        unavailable.as_secs_f64()
    );
    assert!(
        unavailable < Duration::from_secs(10),
        "the hand-over took {unavailable:?}: the leaving host did not leave the group"
    );
}

/// Hosts of application `app` with `partitions` partitions and no module
/// (they are uploaded through the admin API).
fn partitioned(app: &str, partitions: u32) -> HostOptions {
    HostOptions {
        config: format!(
            "[cluster]\nbootstrap = {:?}\napp = {app:?}\npartitions = {partitions}\n",
            require_broker()
        ),
        deploy: Vec::new(),
    }
}

/// The partitions `host` owns and serves.
async fn owned(host: &Host) -> Vec<u64> {
    let status = host.admin_get("/cluster").await;
    status["partitions"]
        .as_array()
        .map(|parts| {
            parts
                .iter()
                .filter(|p| p["role"] == "owner")
                .filter_map(|p| p["partition"].as_u64())
                .collect()
        })
        .unwrap_or_default()
}

/// Wait until every partition is served by one of `hosts` and each host
/// serves at least one (the group spread them).
async fn until_spread(hosts: &[Host], partitions: usize) {
    until(
        "every partition is served, by every host",
        TAKEOVER,
        || async {
            let mut all = Vec::new();
            for host in hosts {
                let mine = owned(host).await;
                if mine.is_empty() {
                    return false;
                }
                all.extend(mine);
            }
            all.sort();
            all == (0..partitions as u64).collect::<Vec<_>>()
        },
    )
    .await;
}

/// Four partitions on three hosts: the group spreads them, moving
/// partitions from the first host to the ones that join (in process, no
/// exit); a module uploaded to one host reaches every partition; calls,
/// sends and an awakeable cross partitions; and when a host is SIGKILLed
/// under load, and later another leaves with SIGTERM, their partitions
/// move, every acknowledged add applied once.
#[tokio::test]
async fn partitions_spread_over_hosts_and_effects_cross_them_exactly_once() {
    const PARTITIONS: usize = 4;
    let app = unique_topic("parts");
    let mut hosts = vec![Host::start_with(partitioned(&app, PARTITIONS as u32)).await];
    until_spread(&hosts, PARTITIONS).await;
    for module in ["basics", "coordination"] {
        let r = hosts[0]
            .upload(std::fs::read(example(module)).unwrap())
            .await;
        assert!(r.status < 300, "upload {module}: {} {}", r.status, r.body);
    }
    for _ in 0..2 {
        hosts.push(Host::start_with(partitioned(&app, PARTITIONS as u32)).await);
    }
    until_spread(&hosts, PARTITIONS).await;
    assert!(
        hosts[0].log().contains("handed the partition over"),
        "the first host handed partitions over in process"
    );

    // A service calls an object on another key's partition, which calls a
    // service there; the answer comes back across.
    for (i, key) in ["t1", "t2", "t3", "t4", "t5", "t6"].iter().enumerate() {
        let host = &hosts[i % 3];
        let r = host
            .post("/Chain/start", &format!("[{key:?}, {i}]"), &[])
            .await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, (2 * i).to_string().as_str()),
            "{key}"
        );
    }
    // An awakeable created on one partition, its id sent to a log on
    // another, resolved through a third host.
    let ask = send(&hosts[1], "/Approval/ask", "\"ap\"").await;
    let asked = Instant::now();
    let lines = loop {
        let lines = log_lines(&hosts[2], "ap").await;
        if !lines.is_empty() {
            break lines;
        }
        assert!(
            asked.elapsed() < TAKEOVER,
            "the awakeable's id was not logged"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Any host lists the unfinished invocations of every partition.
    let listed = hosts[2].admin_get("/invocations?status=unfinished").await;
    assert!(
        listed["invocations"]
            .as_array()
            .is_some_and(|all| all.iter().any(|i| i["id"] == ask.as_str())),
        "{ask} waits for its awakeable but is not listed: {listed}"
    );
    let r = hosts[0]
        .post(
            &format!("/restate/awakeables/{}/resolve", lines[0]),
            "\"yes\"",
            &[],
        )
        .await;
    assert!(r.status < 300, "resolve: {} {}", r.status, r.body);
    assert_eq!(
        output(&hosts[2], &ask).await,
        (200, "\"approved: yes\"".into())
    );

    // Adds on keys of every partition through all three hosts while the
    // host owning partition 0 is SIGKILLed and restarted, then another
    // host leaves with SIGTERM (its partitions move in process).
    let victim = {
        let mut found = None;
        for (i, host) in hosts.iter().enumerate() {
            if owned(host).await.contains(&0) {
                found = Some(i);
            }
        }
        found.expect("someone owns partition 0")
    };
    let leaver = (victim + 1) % 3;
    let down = |request: u64| match request {
        40..80 => Some(victim),
        120.. => Some(leaver),
        _ => None,
    };
    let clients: Vec<(reqwest::Client, String)> = hosts
        .iter()
        .map(|h| (h.http.clone(), h.ingress()))
        .collect();
    let keys: Vec<String> = (0..12).map(|k| format!("c{k}")).collect();
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    let mut turn = 0;
    for request in 0..180u64 {
        match request {
            40 => hosts[victim].kill(),
            80 => {
                hosts[victim]
                    .restart_with(partitioned(&app, PARTITIONS as u32))
                    .await
            }
            120 => signal(hosts[leaver].pid(), "TERM"),
            _ => {}
        }
        let key = &keys[request as usize % keys.len()];
        let live: Vec<_> = clients
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != down(request))
            .map(|(_, c)| c.clone())
            .collect();
        add_until_acked(
            &live,
            &mut turn,
            &format!("/Counter/{key}/add"),
            &format!("add-{request}"),
            TAKEOVER,
        )
        .await;
        *expected.entry(key.clone()).or_default() += 1;
    }
    let mut leaver = hosts.remove(leaver);
    let left = Instant::now();
    while leaver.running() {
        assert!(left.elapsed() < TAKEOVER, "the leaving host did not exit");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        leaver.log().contains("left the cluster"),
        "the leaving host did not hand its partitions over:\n{}",
        leaver.log()
    );
    until_spread(&hosts, PARTITIONS).await;
    for (key, n) in &expected {
        assert_eq!(counter(&hosts[turn % 2], key).await, *n, "Counter/{key}");
    }
}
