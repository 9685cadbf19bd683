//! Durability: SIGKILL the host at the worst moments, restart it, and check
//! that nothing is lost and no journaled step runs twice.

use cairn_tests::server::TestServer;
use cairn_tests::{Host, HostOptions};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn fetch_host_options() -> HostOptions {
    HostOptions {
        config: "http_allow = [\"127.0.0.1:*\"]\n[retry]\ninitial_interval = \"50ms\"\n".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn killed_mid_step_every_invocation_completes_and_no_journaled_step_runs_again() {
    let server = TestServer::start(Duration::from_millis(200)).await;
    let mut host = Host::start_with(fetch_host_options()).await;
    let body = format!("\"{}\"", server.url);
    let mut ids = Vec::new();
    for _ in 0..30 {
        let r = host.post("/Steps/fetch3/send", &body, &[]).await;
        assert_eq!(r.status, 202, "{}", r.body);
        ids.push(r.json()["invocationId"].as_str().unwrap().to_string());
    }
    // Kill once the invocations are in the middle of their steps.
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.requests() < 45 {
        assert!(
            Instant::now() < deadline,
            "steps did not start: {}",
            host.log()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    host.kill();
    let at_kill = server.requests();
    assert!(
        at_kill < 90,
        "the kill must land before all steps ran ({at_kill} requests)"
    );
    host.restart().await;

    let mut repeated = 0;
    for id in &ids {
        let r = host.get(&format!("/restate/attach/{id}")).await;
        assert_eq!(r.status, 200, "{id}: {}", r.body);
        let output: Vec<String> = serde_json::from_str(&r.body).unwrap();
        assert_eq!(output.len(), 3);
        for (i, token) in output.iter().enumerate() {
            let step = i as u32 + 1;
            let served = server.tokens(id, step);
            // The journaled result is the last request ever made for the step:
            // once journaled, a step never runs again.
            assert_eq!(
                served.last(),
                Some(token),
                "{id} step {step}: served {served:?}"
            );
            assert!(
                served.len() <= 2,
                "{id} step {step} ran {} times",
                served.len()
            );
            repeated += served.len() - 1;
        }
    }
    assert!(
        repeated >= 1,
        "the kill interrupted at least one step in flight"
    );
    assert!(
        repeated <= 30,
        "only steps in flight at the kill ran again ({repeated})"
    );
}

#[tokio::test]
async fn counter_adds_with_idempotency_keys_count_once_across_a_kill() {
    const KEYS: usize = 300;
    let mut host = Host::start().await;
    let ingress = host.ingress();
    let client = host.http.clone();
    let done = Arc::new(AtomicUsize::new(0));
    let add = |i: usize| {
        let (client, url, done) = (
            client.clone(),
            format!("{ingress}/Counter/crash/add"),
            done.clone(),
        );
        async move {
            let r = client
                .post(url)
                .header("content-type", "application/json")
                .header("idempotency-key", format!("k{i}"))
                .body("1")
                .send()
                .await;
            let ok = matches!(&r, Ok(r) if r.status() == 200);
            if ok {
                done.fetch_add(1, Ordering::SeqCst);
            }
            ok
        }
    };
    let semaphore = Arc::new(tokio::sync::Semaphore::new(16));
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..KEYS {
        let permit = semaphore.clone().acquire_owned().await.unwrap();
        let call = add(i);
        calls.spawn(async move {
            let ok = call.await;
            drop(permit);
            (i, ok)
        });
        if done.load(Ordering::SeqCst) >= KEYS / 3 {
            break;
        }
    }
    host.kill();
    let mut failed = Vec::new();
    let mut started = 0;
    while let Some(r) = calls.join_next().await {
        let (i, ok) = r.unwrap();
        started = started.max(i + 1);
        if !ok {
            failed.push(i);
        }
    }
    assert!(
        started < KEYS,
        "the kill happened midway ({started} calls started)"
    );
    host.restart().await;
    let ingress = host.ingress();
    let client = host.http.clone();
    // Retry the failed calls and every call never made, with the same keys;
    // then repeat every call once more: none of it may count twice.
    for i in failed.into_iter().chain(started..KEYS).chain(0..KEYS) {
        let r = client
            .post(format!("{ingress}/Counter/crash/add"))
            .header("content-type", "application/json")
            .header("idempotency-key", format!("k{i}"))
            .body("1")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "retry of k{i}");
    }
    assert_eq!(
        host.post("/Counter/crash/get", "", &[]).await.body,
        KEYS.to_string()
    );
}
