//! Cron schedules, end to end: ticks fire once each, with deterministic
//! ids, across a SIGKILL and a restart, and stop when deleted.

use cairn::ids::InvocationId;
use cairn_tests::Host;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn count(host: &Host) -> u64 {
    host.post("/Counter/cron/get", "", &[])
        .await
        .body
        .parse()
        .unwrap()
}

/// How many ticks of schedule `name` in `[from, to]` (seconds) created an invocation.
async fn fired(host: &Host, name: &str, from: u64, to: u64) -> u64 {
    let mut n = 0;
    for s in from..=to {
        // Its target's key decides the partition key (Counter/cron).
        let pkey = cairn::partition::key_hash("Counter", "cron");
        let id = InvocationId::derived(&format!("cron:{name}:{}", s * 1000), pkey);
        let r = host
            .admin_send(reqwest::Method::GET, &format!("/invocations/{id}"), None)
            .await;
        if r.status == 200 {
            n += 1;
        }
    }
    n
}

#[tokio::test]
async fn cron_ticks_fire_once_each_with_deterministic_ids_across_a_kill() {
    let mut host = Host::start().await;
    let started = now_s();
    let add = [
        "schedules",
        "add",
        "tick",
        "--cron",
        "* * * * * *",
        "--target",
        "Counter/cron/add",
        "--input",
        "1",
    ];
    host.cli(&add).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while count(&host).await < 3 {
        assert!(Instant::now() < deadline, "the schedule did not tick");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    host.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    host.restart().await;
    let before = count(&host).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        count(&host).await > before,
        "the schedule survived the restart"
    );

    let r = host
        .admin_send(reqwest::Method::DELETE, "/schedules/tick", None)
        .await;
    assert_eq!(r.status, 204);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let total = count(&host).await;
    let ended = now_s();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(count(&host).await, total, "a deleted schedule stops");
    let ticks = fired(&host, "tick", started.saturating_sub(1), ended + 1).await;
    assert_eq!(
        total, ticks,
        "each tick became exactly one invocation, found by its derived id"
    );
    assert!(ticks >= 5, "ticked before and after the restart ({ticks})");
    let bad = serde_json::json!({ "name": "bad", "cron": "every day", "target": "Counter/x/add" });
    let r = host.admin_post("/schedules", Some(&bad)).await;
    assert_eq!(r.status, 400);
}
