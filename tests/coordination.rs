//! Durable time and coordination, end to end with the `coordination`
//! example: sleeps, calls, sends, fan-out, races, awakeables, workflows,
//! suspension, retries, pause/resume, cancellation, kills, crashes and
//! journal mismatches.

use cairn_tests::server::TestServer;
use cairn_tests::{example, read, Host, HostOptions};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const MINUTE: Duration = Duration::from_secs(60);

fn options(extra: &str) -> HostOptions {
    HostOptions {
        config: format!(
            "suspend_after = \"50ms\"\nhttp_allow = [\"127.0.0.1:*\"]\n{extra}\n[retry]\ninitial_interval = \"100ms\"\nmax_attempts = 4\n"
        ),
        deploy: vec![example("coordination")],
    }
}

async fn start() -> Host {
    Host::start_with(options("")).await
}

async fn send(host: &Host, path: &str, body: &str) -> String {
    let r = host.post(&format!("{path}/send"), body, &[]).await;
    assert_eq!(r.status, 202, "{path}: {}", r.body);
    r.invocation_id()
}

async fn log_lines(host: &Host, key: &str) -> Vec<String> {
    serde_json::from_str(&host.post(&format!("/Log/{key}/lines"), "", &[]).await.body).unwrap()
}

async fn wait_log(host: &Host, key: &str, len: usize) -> Vec<String> {
    let deadline = Instant::now() + MINUTE;
    loop {
        let lines = log_lines(host, key).await;
        if lines.len() >= len {
            return lines;
        }
        assert!(Instant::now() < deadline, "log {key} has {lines:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn commands(v: &Value, name: &str) -> usize {
    v["journal"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["command"] == name)
        .count()
}

fn completions(v: &Value) -> usize {
    v["journal"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "completion")
        .count()
}

#[tokio::test]
async fn a_sleep_outlives_a_host_restart() {
    let mut host = start().await;
    let started = Instant::now();
    let id = send(&host, "/Sleeper/nap", "1500").await;
    host.wait_invocation(&id, MINUTE, |v| v["status"] == "suspended")
        .await;
    host.restart().await;
    let r = host.get(&format!("/restate/attach/{id}")).await;
    assert_eq!((r.status, r.body.as_str()), (200, "1500"));
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "the timer kept its absolute time"
    );
    let v = host.admin_get(&format!("/invocations/{id}")).await;
    assert_eq!(
        (commands(&v, "sleep"), completions(&v)),
        (1, 1),
        "the timer fired once: {v:#}"
    );
}

#[tokio::test]
async fn a_delayed_send_that_comes_due_while_the_host_is_down_runs_at_start() {
    let mut host = start().await;
    let r = host
        .post("/Sleeper/later", r#"["down", "hello", 700]"#, &[])
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    host.kill();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    host.restart().await;
    assert_eq!(wait_log(&host, "down", 1).await, ["hello"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(log_lines(&host, "down").await, ["hello"], "delivered once");
}

#[tokio::test]
async fn sleepers_give_their_instance_slots_up_to_an_invocation_that_needs_one() {
    // Two slots, both taken by hour-long naps that would hold them for an
    // hour (suspend_after); a third invocation needs a slot now.
    let host = Host::start_with(HostOptions {
        config: "suspend_after = \"1h\"\n[limits]\nmax_instances = 2\n".into(),
        deploy: vec![example("coordination")],
    })
    .await;
    let naps = [
        send(&host, "/Sleeper/nap", "3600000").await,
        send(&host, "/Sleeper/nap", "3600000").await,
    ];
    for nap in &naps {
        host.wait_invocation(nap, MINUTE, |v| {
            v["journal"].as_array().is_some_and(|j| !j.is_empty())
        })
        .await;
    }
    let quick = tokio::time::timeout(MINUTE, host.post("/Sleeper/nap", "1", &[]))
        .await
        .expect("the third invocation got a slot");
    assert_eq!((quick.status, quick.body.as_str()), (200, "1"));
    let mut suspended = 0;
    for nap in &naps {
        suspended += usize::from(
            host.admin_get(&format!("/invocations/{nap}")).await["status"] == "suspended",
        );
    }
    assert!(suspended >= 1, "a sleeper suspended to free its slot");
    let unfinished = host.admin_get("/invocations?status=unfinished").await;
    let mut listed: Vec<&str> = unfinished["invocations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    listed.sort();
    let mut sleepers = [naps[0].as_str(), naps[1].as_str()];
    sleepers.sort();
    assert_eq!(listed, sleepers, "the two sleepers: {unfinished}");
    let r = host
        .admin_send(reqwest::Method::GET, "/invocations?limit=0", None)
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
}

#[tokio::test]
async fn calls_chain_through_services_and_objects_and_sends_are_one_way() {
    let host = start().await;
    assert_eq!(
        host.post("/Chain/start", r#"["c", 5]"#, &[]).await.body,
        "10"
    );
    assert_eq!(
        host.post("/Chain/start", r#"["c", 1]"#, &[]).await.body,
        "12",
        "the object kept its total"
    );
    let r = host.post("/Chain/through_failure", "", &[]).await;
    assert_eq!(r.status, 422, "a terminal error propagates with its code");
    assert!(r.body.contains("doubler refused"), "{}", r.body);
    let sent = host
        .post("/Sleeper/later", r#"["one-way", "ping", 0]"#, &[])
        .await
        .body;
    assert!(
        sent.contains("inv_"),
        "send returns the new invocation's id: {sent}"
    );
    assert_eq!(wait_log(&host, "one-way", 1).await, ["ping"]);
}

#[tokio::test]
async fn fan_out_of_100_calls_is_joined_and_select_races_a_call_against_a_timeout() {
    let host = start().await;
    let r = host.post("/Chain/spread", "100", &[]).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "9900"),
        "sum of 2*i for i < 100"
    );
    let id = r.header("x-restate-id").unwrap().to_string();
    let v = host.admin_get(&format!("/invocations/{id}")).await;
    assert_eq!(commands(&v, "call Doubler/double"), 100);
    assert_eq!(
        host.post("/Chain/race", "[50, 5000]", &[]).await.body,
        "\"call returned 50\""
    );
    let started = Instant::now();
    assert_eq!(
        host.post("/Chain/race", "[5000, 200]", &[]).await.body,
        "\"timeout\""
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the timeout won without waiting for the call"
    );
}

#[tokio::test]
async fn awakeables_are_completed_over_http_while_the_invocation_is_suspended() {
    let host = start().await;
    let id = send(&host, "/Approval/ask", "\"aw\"").await;
    let awakeable = wait_log(&host, "aw", 1).await.remove(0);
    host.wait_invocation(&id, MINUTE, |v| v["status"] == "suspended")
        .await;
    let r = host
        .post(
            &format!("/restate/awakeables/{awakeable}/resolve"),
            "\"yes\"",
            &[],
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(
        host.get(&format!("/restate/attach/{id}")).await.body,
        "\"approved: yes\""
    );
    let again = host
        .post(&format!("/restate/a/{awakeable}/resolve"), "\"twice\"", &[])
        .await;
    assert_eq!(again.status, 409, "no second completion: {}", again.body);
    let unknown = host
        .post(
            "/restate/a/awk_0000000000000000000000000000000000000001/resolve",
            "1",
            &[],
        )
        .await;
    assert_eq!(unknown.status, 404);
    assert_eq!(
        host.post("/restate/a/not-an-id/reject", "x", &[])
            .await
            .status,
        404
    );

    let id = send(&host, "/Approval/ask", "\"rej\"").await;
    let awakeable = wait_log(&host, "rej", 1).await.remove(0);
    let r = host
        .post(
            &format!("/restate/a/{awakeable}/reject"),
            "card declined",
            &[],
        )
        .await;
    assert_eq!(r.status, 202);
    let r = host.get(&format!("/restate/attach/{id}")).await;
    assert_eq!(r.status, 500);
    assert!(r.body.contains("card declined"), "{}", r.body);

    let id = send(&host, "/Approval/ask", "\"by-handler\"").await;
    let awakeable = wait_log(&host, "by-handler", 1).await.remove(0);
    let body = json!([awakeable, "from a handler"]).to_string();
    assert_eq!(host.post("/Approval/approve", &body, &[]).await.status, 200);
    assert_eq!(
        host.get(&format!("/restate/attach/{id}")).await.body,
        "\"approved: from a handler\""
    );
}

#[tokio::test]
async fn a_workflow_waits_on_a_promise_resolved_by_a_shared_handler() {
    let host = start().await;
    let first = host
        .post("/Signup/ada/run/send", "\"ada@example.com\"", &[])
        .await
        .json();
    assert_eq!(first["status"], "Accepted");
    let id = first["invocationId"].as_str().unwrap().to_string();
    host.wait_invocation(&id, MINUTE, |v| v["status"] == "suspended")
        .await;
    assert_eq!(
        host.get("/restate/workflow/Signup/ada/output").await.status,
        470
    );
    assert_eq!(
        host.post("/Signup/ada/status", "", &[]).await.json(),
        json!(["waiting", null])
    );
    let again = host
        .post("/Signup/ada/run/send", "\"other@example.com\"", &[])
        .await
        .json();
    assert_eq!(
        (again["status"].as_str(), again["invocationId"].as_str()),
        (Some("PreviouslyAccepted"), Some(id.as_str()))
    );

    assert_eq!(
        host.post("/Signup/ada/click", "\"c0de\"", &[]).await.status,
        200
    );
    let done = host.get("/restate/workflow/Signup/ada/attach").await;
    assert_eq!(done.body, "\"ada@example.com verified with c0de\"");
    assert_eq!(
        host.get("/restate/workflow/Signup/ada/output").await.body,
        done.body
    );
    assert_eq!(
        host.post("/Signup/ada/status", "", &[]).await.json(),
        json!(["verified", "c0de"])
    );
    let twice = host.post("/Signup/ada/click", "\"again\"", &[]).await;
    assert_eq!(
        twice.status, 409,
        "a promise completes once: {}",
        twice.body
    );
    let rerun = host.post("/Signup/ada/run", "\"x@example.com\"", &[]).await;
    assert_eq!(rerun.body, done.body, "run executes once per workflow id");
    assert_eq!(
        host.get("/restate/workflow/Signup/nobody/attach")
            .await
            .status,
        404
    );
}

#[tokio::test]
async fn ten_thousand_sleeping_invocations_hold_no_instances_and_all_finish() {
    const N: usize = 10_000;
    let host = Host::start_with(options("[limits]\nmax_instances = 500\n")).await;
    let before = host.peak_rss_kib();
    let ingress = host.ingress();
    let client = host.http.clone();
    let submit = |i: usize| {
        let (client, url) = (client.clone(), format!("{ingress}/Sleeper/nap/send"));
        async move {
            let r = client
                .post(url)
                .header("content-type", "application/json")
                .body("8000")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 202, "request {i}");
            r.json::<Value>().await.unwrap()["invocationId"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    let mut ids = Vec::with_capacity(N);
    let started = Instant::now();
    for chunk in (0..N).collect::<Vec<_>>().chunks(100) {
        let batch = chunk.iter().map(|&i| tokio::spawn(submit(i)));
        for b in batch.collect::<Vec<_>>() {
            ids.push(b.await.unwrap());
        }
    }
    let submitted = Instant::now();
    println!("submitted {N} sleeps in {:?}", submitted - started);
    let last = host
        .wait_invocation(&ids[N - 1], MINUTE, |v| v["status"] != "running")
        .await;
    assert_eq!(
        last["status"], "suspended",
        "the last one sleeps without an instance"
    );
    let mut finished = 0;
    for chunk in ids.chunks(200) {
        let waits = chunk.iter().map(|id| {
            let (client, url) = (client.clone(), format!("{ingress}/restate/attach/{id}"));
            tokio::spawn(async move { client.get(url).send().await.unwrap().text().await.unwrap() })
        });
        for w in waits.collect::<Vec<_>>() {
            assert_eq!(w.await.unwrap(), "8000");
            finished += 1;
        }
    }
    assert_eq!(finished, N);
    let peak = host.peak_rss_kib();
    println!(
        "10,000 sleeping invocations: host peak RSS {} MiB (at start {} MiB), all done {:?} after submission",
        peak / 1024,
        before / 1024,
        submitted.elapsed()
    );
    assert!(
        peak < 512 * 1024,
        "memory stays bounded: peak {} MiB",
        peak / 1024
    );
}

#[tokio::test]
async fn retries_back_off_then_pause_and_an_operator_resumes() {
    let server = TestServer::start(Duration::ZERO).await;
    let host = start().await;
    // Three failures, then success: four attempts with growing gaps.
    let url = format!("\"{}/flaky?key=a&fail=3\"", server.url);
    assert_eq!(host.post("/Trip/fetch", &url, &[]).await.body, "\"ok\"");
    let times = server.flaky_requests("a");
    assert_eq!(times.len(), 4);
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps[0] >= Duration::from_millis(100)
            && gaps[1] >= Duration::from_millis(200)
            && gaps[2] >= Duration::from_millis(400),
        "exponential backoff: {gaps:?}"
    );

    // Five failures exceed max_attempts = 4: paused, not lost.
    let url = format!("\"{}/flaky?key=b&fail=5\"", server.url);
    let id = send(&host, "/Trip/fetch", &url).await;
    let v = host
        .wait_invocation(&id, MINUTE, |v| v["status"] == "paused")
        .await;
    assert_eq!(v["attempts"], 4);
    assert!(
        v["last_error"].as_str().unwrap().contains("status 503"),
        "{v:#}"
    );
    assert_eq!(server.flaky_requests("b").len(), 4);
    host.cli(&["invocations", "resume", &id]).unwrap();
    assert_eq!(
        host.get(&format!("/restate/attach/{id}")).await.body,
        "\"ok\""
    );
    assert_eq!(
        server.flaky_requests("b").len(),
        6,
        "resumed: one more failure, then success"
    );
}

#[tokio::test]
async fn cancel_runs_compensation_and_kill_stops_at_once() {
    let host = start().await;
    let plan = send(&host, "/Trip/plan", "\"trip\"").await;
    assert_eq!(wait_log(&host, "trip", 1).await, ["booked"]);
    host.wait_invocation(&plan, MINUTE, |v| v["status"] == "suspended")
        .await;
    let r = host
        .admin_post(&format!("/invocations/{plan}/cancel"), None)
        .await;
    assert_eq!(r.status, 200);
    let r = host.get(&format!("/restate/attach/{plan}")).await;
    assert_eq!(
        (r.status, r.json()["message"].as_str()),
        (409, Some("cancelled"))
    );
    assert_eq!(
        wait_log(&host, "trip", 2).await,
        ["booked", "refunded"],
        "the callee was cancelled and compensated"
    );
    // The cancellation answered the plan's pending commands; the late
    // answers (the cancelled callee's) are dropped, not journaled twice.
    let v = host.admin_get(&format!("/invocations/{plan}")).await;
    let mut answered: Vec<u64> = v["journal"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "completion")
        .map(|e| e["for_command"].as_u64().unwrap())
        .collect();
    let journaled = answered.len();
    answered.sort_unstable();
    answered.dedup();
    assert_eq!(
        answered.len(),
        journaled,
        "one completion per command: {v:#}"
    );

    let nap = send(&host, "/Sleeper/nap", "3600000").await;
    host.wait_invocation(&nap, MINUTE, |v| v["status"] == "suspended")
        .await;
    host.cli(&["invocations", "kill", &nap]).unwrap();
    let r = host.get(&format!("/restate/attach/{nap}")).await;
    assert_eq!(
        (r.status, r.json()["message"].as_str()),
        (409, Some("killed"))
    );
    let twice = host
        .admin_post(&format!("/invocations/{nap}/kill"), None)
        .await;
    assert_eq!(twice.status, 409);
}

#[tokio::test]
async fn sigkill_with_calls_sleeps_and_awakeables_in_flight_completes_everything_exactly_once() {
    let mut host = start().await;
    let mut chains = Vec::new();
    for i in 1..=20 {
        chains.push(send(&host, "/Chain/start", &format!("[\"crash\", {i}]")).await);
    }
    let mut naps = Vec::new();
    for _ in 0..20 {
        naps.push(send(&host, "/Sleeper/nap", "800").await);
    }
    let mut asks = Vec::new();
    for i in 0..10 {
        asks.push(send(&host, "/Approval/ask", &format!("\"ask{i}\"")).await);
    }
    // Kill once the awakeables exist and the sleeps are armed, mid-flight.
    for i in 0..10 {
        wait_log(&host, &format!("ask{i}"), 1).await;
    }
    host.wait_invocation(&naps[19], MINUTE, |v| commands(v, "sleep") == 1)
        .await;
    host.kill();
    host.restart().await;
    for (i, ask) in asks.iter().enumerate() {
        let awakeable = wait_log(&host, &format!("ask{i}"), 1).await;
        assert_eq!(awakeable.len(), 1, "one awakeable per invocation");
        let r = host
            .post(
                &format!("/restate/awakeables/{}/resolve", awakeable[0]),
                "\"ok\"",
                &[],
            )
            .await;
        assert_eq!(r.status, 202, "{}", r.body);
        assert_eq!(
            host.get(&format!("/restate/attach/{ask}")).await.body,
            "\"approved: ok\""
        );
    }
    let mut totals = Vec::new();
    for chain in &chains {
        let r = host.get(&format!("/restate/attach/{chain}")).await;
        assert_eq!(r.status, 200, "{}", r.body);
        totals.push(r.body.parse::<i64>().unwrap());
    }
    totals.sort();
    let expected: Vec<i64> = (1..=20)
        .scan(0, |sum, i| {
            *sum += 2 * i;
            Some(*sum)
        })
        .collect::<Vec<_>>();
    assert_eq!(
        totals.last(),
        expected.last(),
        "every bump counted once: no lost and no duplicated call"
    );
    assert_eq!(totals.len(), 20);
    for nap in &naps {
        assert_eq!(
            host.get(&format!("/restate/attach/{nap}")).await.body,
            "800"
        );
        let v = host.admin_get(&format!("/invocations/{nap}")).await;
        assert_eq!(
            (commands(&v, "sleep"), completions(&v)),
            (1, 1),
            "the timer fired once: {v:#}"
        );
    }
}

#[tokio::test]
async fn a_new_version_that_reorders_steps_is_stopped_with_a_journal_mismatch() {
    let host = start().await;
    let id = send(&host, "/Steps2/two", "600000").await;
    host.wait_invocation(&id, MINUTE, |v| v["status"] == "suspended")
        .await;
    let upload = host.upload(read(&example("coordination-v2"))).await;
    assert_eq!(upload.status, 201);
    let v2 = upload.json()["id"].as_str().unwrap().to_string();
    let pause = host
        .admin_post(&format!("/invocations/{id}/pause"), None)
        .await;
    assert_eq!(pause.status, 200);
    let resume = format!("/invocations/{id}/resume?deployment={v2}");
    assert_eq!(host.admin_post(&resume, None).await.status, 200);
    let v = host
        .wait_invocation(&id, MINUTE, |v| {
            v["status"] == "paused" && v["deployment"] == v2.as_str()
        })
        .await;
    let error = v["last_error"].as_str().unwrap();
    assert!(
        error.contains("journal mismatch at entry 0")
            && error.contains("run \"a\"")
            && error.contains("run \"b\""),
        "{error}"
    );
    assert_eq!(
        v["journal"][0]["command"], "run \"a\"",
        "the journal was not overwritten"
    );
    // New invocations run v2 from scratch.
    assert_eq!(host.post("/Steps2/two", "10", &[]).await.body, "\"ba\"");
}

#[tokio::test]
async fn now_is_journaled_and_advances_across_a_sleep() {
    let host = start().await;
    let r = host.post("/Steps2/clock", "", &[]).await;
    let (before, after, _random): (u64, u64, u64) = serde_json::from_str(&r.body).unwrap();
    assert!(after >= before + 50, "{before} -> {after}");
    let v = host
        .admin_get(&format!(
            "/invocations/{}",
            r.header("x-restate-id").unwrap()
        ))
        .await;
    assert_eq!(commands(&v, "now"), 2);
}

#[tokio::test]
async fn a_step_retries_in_place_and_a_handler_can_have_its_own_policy() {
    let server = TestServer::start(Duration::ZERO).await;
    let host = Host::start_with(options(
        "[retry_overrides.\"Trip/fetch\"]\nmax_attempts = 2\ninitial_interval = \"10ms\"\n",
    ))
    .await;
    let r = host
        .post(
            "/Trip/fetch_step",
            &format!("\"{}/flaky?key=s&fail=2\"", server.url),
            &[],
        )
        .await;
    assert_eq!(r.body, "\"ok\"");
    let v = host
        .admin_get(&format!(
            "/invocations/{}",
            r.header("x-restate-id").unwrap()
        ))
        .await;
    assert_eq!(
        (v["attempts"].as_u64(), server.flaky_requests("s").len()),
        (Some(1), 3),
        "retried inside one attempt"
    );

    let r = host
        .post(
            "/Trip/fetch_step",
            &format!("\"{}/flaky?key=t&fail=9\"", server.url),
            &[],
        )
        .await;
    assert_eq!(r.status, 500);
    assert!(r.body.contains("failed after 3 attempts"), "{}", r.body);
    assert_eq!(server.flaky_requests("t").len(), 3);

    let id = send(
        &host,
        "/Trip/fetch",
        &format!("\"{}/flaky?key=u&fail=9\"", server.url),
    )
    .await;
    let v = host
        .wait_invocation(&id, MINUTE, |v| v["status"] == "paused")
        .await;
    assert_eq!(
        v["attempts"], 2,
        "the handler's override, not the default of 4"
    );
}

#[tokio::test]
async fn killing_a_queued_invocation_leaves_the_key_to_its_holder() {
    let server = TestServer::start(Duration::ZERO).await;
    let host = start().await;
    let hold = json!({ "n": 1, "url": format!("{}/hold", server.url) }).to_string();
    let holder = send(&host, "/Events/q/handle", &hold).await;
    host.wait_invocation(&holder, MINUTE, |v| v["status"] == "running")
        .await;
    let queued = send(&host, "/Events/q/handle", r#"{"n": 2}"#).await;
    let next = send(&host, "/Events/q/handle", r#"{"n": 3}"#).await;
    host.wait_invocation(&queued, MINUTE, |v| v["status"] == "pending")
        .await;
    let r = host
        .admin_post(&format!("/invocations/{queued}/kill"), None)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        host.get(&format!("/restate/attach/{queued}")).await.status,
        409
    );
    let v = host.admin_get(&format!("/invocations/{next}")).await;
    assert_eq!(
        v["status"], "pending",
        "the key still belongs to the running invocation"
    );
    server.release();
    assert_eq!(host.get(&format!("/restate/attach/{next}")).await.body, "2");
    let seen = host.post("/Events/q/seen", "", &[]).await.json();
    assert_eq!(seen["numbers"], json!([1, 3]), "the killed one never ran");
}

#[tokio::test]
async fn cancelling_one_side_of_a_deadlock_releases_the_key() {
    let host = start().await;
    let stuck = send(&host, "/Tally/d/deadlock", "5").await;
    host.wait_invocation(&stuck, MINUTE, |v| v["status"] == "suspended")
        .await;
    let journal = host.admin_get(&format!("/invocations/{stuck}")).await["journal"].clone();
    let called_itself = journal
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["command"] == "call Tally/d/bump");
    assert!(called_itself, "the handler called its own key");
    assert_eq!(
        host.post("/Tally/d/total", "", &[]).await.body,
        "0",
        "shared handlers still answer"
    );
    let r = host
        .admin_post(&format!("/invocations/{stuck}/cancel"), None)
        .await;
    assert_eq!(r.status, 200);
    let r = host.get(&format!("/restate/attach/{stuck}")).await;
    assert_eq!(
        (r.status, r.json()["message"].as_str()),
        (409, Some("cancelled"))
    );
    assert_eq!(
        host.post("/Tally/d/bump", "1", &[]).await.body,
        "2",
        "the key is free again; the cancelled call never ran"
    );
}

#[tokio::test]
async fn a_concurrency_limit_caps_calls_to_a_downstream_and_drops_nothing() {
    let server = TestServer::start(Duration::ZERO).await;
    let host = start().await;
    host.cli(&["limits", "set", "Trip/fetch", "3"]).unwrap();
    let url = format!("\"{}/slow?ms=150\"", server.url);
    let mut ids = Vec::new();
    for _ in 0..12 {
        ids.push(send(&host, "/Trip/fetch", &url).await);
    }
    for id in &ids {
        assert_eq!(
            host.get(&format!("/restate/attach/{id}")).await.body,
            "\"ok\""
        );
    }
    assert_eq!(
        server.slow_max(),
        3,
        "never more than 3 at once, and the limit was used"
    );
    let limits = host.admin_get("/concurrency-limits").await;
    assert_eq!(
        limits["limits"],
        json!([{ "scope": "Trip/fetch", "max": 3, "in_use": 0 }])
    );
    let bad = json!({ "scope": "Trip/fetch", "max": 0 });
    let r = host.admin_post("/concurrency-limits", Some(&bad)).await;
    assert_eq!(r.status, 400);
}

#[tokio::test]
async fn host_side_http_calls_run_concurrently_while_their_invocations_are_suspended() {
    let server = TestServer::start(Duration::ZERO).await;
    let host = start().await;
    let url = format!("\"{}/slow?ms=1500\"", server.url);
    let started = Instant::now();
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(send(&host, "/Enrich/lookup", &url).await);
    }
    host.wait_invocation(&ids[19], MINUTE, |v| v["status"] == "suspended")
        .await;
    for id in &ids {
        assert_eq!(
            host.get(&format!("/restate/attach/{id}")).await.json(),
            json!([200, "ok"])
        );
        let v = host.admin_get(&format!("/invocations/{id}")).await;
        assert_eq!(completions(&v), 1, "one journaled response: {v:#}");
    }
    let elapsed = started.elapsed();
    println!(
        "20 calls of 1.5 s each: {elapsed:?}, at most {} at once",
        server.slow_max()
    );
    assert_eq!(server.slow_total(), 20, "each request was sent once");
    assert!(
        server.slow_max() >= 10,
        "the calls overlapped: throughput follows concurrency, not latency"
    );
    let r = host
        .post("/Enrich/lookup", "\"http://localhost:9/not-allowed\"", &[])
        .await;
    assert_eq!(r.status, 403, "the allow-list applies: {}", r.body);
}
