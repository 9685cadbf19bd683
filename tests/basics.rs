//! End to end: the real `cairn` binary with the basics example deployed,
//! driven over HTTP like a Restate client would.

use cairn_tests::{example, read, Host, HostOptions};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

#[tokio::test]
async fn every_example_handler_answers_over_http() {
    let host = Host::start().await;

    let r = host.post("/Steps/steps3", "", &[]).await;
    assert_eq!((r.status, r.body.as_str()), (200, "3"));
    assert!(r.header("x-restate-id").unwrap().starts_with("inv_"));
    assert_eq!(r.header("content-type"), Some("application/json"));

    assert_eq!(host.post("/Counter/alice/add", "5", &[]).await.body, "5");
    assert_eq!(host.post("/Counter/alice/add", "-2", &[]).await.body, "3");
    assert_eq!(host.post("/Counter/bob/add", "10", &[]).await.body, "10");
    assert_eq!(host.post("/Counter/alice/get", "", &[]).await.body, "3");
    assert_eq!(host.post("/Counter/alice/reset", "", &[]).await.status, 200);
    assert_eq!(host.post("/Counter/alice/get", "", &[]).await.body, "0");

    let greeted = host
        .post(
            "/Greeter/k%2F1/greet",
            r#"{"name":"Ada"}"#,
            &[("x-greeting", "Hi")],
        )
        .await
        .json();
    assert_eq!(
        greeted["message"], "Hi, Ada! (from k/1)",
        "the key is percent-decoded"
    );
    assert_eq!(greeted["state"], json!(["count", "last"]));

    let services = host.admin_get("/services").await;
    let names: Vec<&str> = services["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Counter", "Greeter", "Latency", "Rogue", "Steps"]);
    let counter = &services["services"][0];
    assert_eq!(counter["kind"], "virtual_object");
    assert_eq!(
        counter["handlers"],
        json!([
            {"name": "add", "kind": "exclusive"}, {"name": "get", "kind": "shared"}, {"name": "reset", "kind": "exclusive"}
        ])
    );
    // A service's handlers hold no key: no exclusive/shared label.
    let steps = &services["services"][4];
    assert_eq!(
        (&steps["name"], &steps["kind"]),
        (&json!("Steps"), &json!("service"))
    );
    assert!(
        steps["handlers"]
            .as_array()
            .is_some_and(|hs| !hs.is_empty() && hs.iter().all(|h| h.get("kind").is_none())),
        "{steps}"
    );
}

#[tokio::test]
async fn the_cli_deploys_invokes_and_describes() {
    let host = Host::start_with(HostOptions::without_modules()).await;
    let json = |args: &[&str]| -> Value { serde_json::from_str(&host.cli(args).unwrap()).unwrap() };
    let module = example("basics");
    let deployed = json(&["deploy", module.to_str().unwrap(), "--admin", &host.admin()]);
    assert!(deployed["id"].as_str().unwrap().starts_with("dp_"));
    assert_eq!(
        host.cli(&["invoke", "Counter/cli/add", "7"])
            .unwrap()
            .trim(),
        "7"
    );
    let sent = json(&["invoke", "Counter/cli/add", "1", "--send"]);
    let id = sent["invocationId"].as_str().unwrap();
    host.wait_invocation(id, Duration::from_secs(30), |v| v["status"] == "succeeded")
        .await;
    let described = json(&["invocations", "describe", id]);
    assert_eq!(described["outcome"]["success"], 8, "a JSON payload as JSON");
    let err = host.cli(&["invoke", "Nope/x"]).unwrap_err().to_string();
    assert!(
        err.contains("404") && err.contains("service Nope not found"),
        "{err}"
    );
    let help = host.cli(&["serve", "--help"]).unwrap();
    assert!(help.contains("--data-dir") && help.contains("--ingress") && help.contains("--admin"));
}

#[tokio::test]
async fn send_then_attach_and_output() {
    let host = Host::start().await;
    let r = host.post("/Counter/s/add/send?delay=PT1S", "4", &[]).await;
    assert_eq!(r.status, 202);
    let id = r.json()["invocationId"].as_str().unwrap().to_string();
    assert_eq!(r.json()["status"], "Accepted");

    let early = host.get(&format!("/restate/invocation/{id}/output")).await;
    assert_eq!(
        early.status, 470,
        "no output before the delayed start: {}",
        early.body
    );
    assert_eq!(
        host.admin_get(&format!("/invocations/{id}")).await["status"],
        "scheduled"
    );

    let started = Instant::now();
    let attached = host.get(&format!("/restate/invocation/{id}/attach")).await;
    assert_eq!((attached.status, attached.body.as_str()), (200, "4"));
    assert_eq!(attached.header("x-restate-id"), Some(id.as_str()));
    assert!(
        started.elapsed() > Duration::from_millis(300),
        "attach waited for the delayed run"
    );

    for path in [
        format!("/restate/output/{id}"),
        format!("/restate/attach/{id}"),
        format!("/restate/invocation/{id}/output"),
    ] {
        let r = host.get(&path).await;
        assert_eq!((r.status, r.body.as_str()), (200, "4"), "{path}");
    }
    let missing = host
        .get("/restate/attach/inv_0000000000000000000000000000000a")
        .await;
    assert_eq!(missing.status, 404);
    assert_eq!(host.get("/restate/attach/not-an-id").await.status, 400);
}

#[tokio::test]
async fn idempotency_keys_run_once_and_return_the_first_result() {
    let host = Host::start().await;
    let key = [("idempotency-key", "order-1")];
    let first = host.post("/Counter/idem/add", "5", &key).await;
    let second = host.post("/Counter/idem/add", "5", &key).await;
    assert_eq!((first.body.as_str(), second.body.as_str()), ("5", "5"));
    assert_eq!(first.header("x-restate-id"), second.header("x-restate-id"));
    assert_eq!(
        host.post("/Counter/idem/get", "", &[]).await.body,
        "5",
        "the add ran once"
    );

    let sent = host
        .post(
            "/Counter/idem/add/send",
            "1",
            &[("idempotency-key", "order-2")],
        )
        .await
        .json();
    let again = host
        .post(
            "/Counter/idem/add/send",
            "1",
            &[("idempotency-key", "order-2")],
        )
        .await
        .json();
    assert_eq!(sent["status"], "Accepted");
    assert_eq!(again["status"], "PreviouslyAccepted");
    assert_eq!(sent["invocationId"], again["invocationId"]);
    let id = sent["invocationId"].as_str().unwrap();
    assert_eq!(host.get(&format!("/restate/attach/{id}")).await.body, "6");

    // The same key on another target is another invocation.
    assert_eq!(host.post("/Counter/other/add", "5", &key).await.body, "5");
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_create_nothing() {
    let host = Host::start_with(HostOptions {
        config: "max_body_bytes = 1024\n".into(),
        ..Default::default()
    })
    .await;
    let cases = [
        ("/Nope/handler", "1", 404, "service Nope not found"),
        ("/Counter/k/nope", "1", 404, "handler nope not found"),
        ("/Steps/steps3/extra/segments", "", 404, "no route"),
        (
            "/Counter/add",
            "1",
            404,
            "Counter is a virtual object: call it with a key, as /Counter/{key}/add",
        ),
        ("/Counter/k/add", "{not json", 400, "not valid JSON"),
        (
            "/Counter/k/add",
            "\"seven\"",
            400,
            "cannot decode the handler's input",
        ),
        ("/Steps/fail", "\"why\"", 500, "failed on purpose: why"),
        ("/Counter/k/add/send?delay=soon", "1", 400, "invalid delay"),
    ];
    for (path, body, status, message) in cases {
        let r = host.post(path, body, &[]).await;
        assert_eq!(r.status, status, "{path}: {}", r.body);
        assert!(r.body.contains(message), "{path}: {}", r.body);
    }
    let subscription = json!({"source": "kafka://nowhere/t", "sink": "service://Counter/add"});
    let unknown = host
        .admin_send(reqwest::Method::POST, "/subscriptions", Some(&subscription))
        .await;
    assert_eq!(unknown.status, 400);
    assert!(
        unknown.body.contains("cairn kafka-clusters add nowhere"),
        "the fix is named: {}",
        unknown.body
    );
    let nowhere = host.admin_send(reqwest::Method::GET, "/nope", None).await;
    assert_eq!(nowhere.status, 404);
    assert!(
        nowhere.json()["message"]
            .as_str()
            .is_some_and(|m| m.contains("no admin route for /nope")),
        "{}",
        nowhere.body
    );
    let big = format!("\"{}\"", "x".repeat(2048));
    assert_eq!(host.post("/Steps/fail", &big, &[]).await.status, 413);
    assert_eq!(
        host.post("/Counter/k/get", "", &[]).await.body,
        "0",
        "no failed request changed state"
    );
}

#[tokio::test]
async fn malformed_modules_are_refused_with_the_reason() {
    let host = Host::start_with(HostOptions::without_modules()).await;
    let upload = |bytes: Vec<u8>| async {
        let r = host.upload(bytes).await;
        (r.status, r.body)
    };
    // One line saying what it is and how to build a component.
    let (status, body) = upload(b"definitely not wasm".to_vec()).await;
    assert_eq!(status, 400);
    assert!(
        body.contains("not a valid WebAssembly component: it is not WebAssembly")
            && body.contains("cargo build --target wasm32-wasip2")
            && !body.contains("definitely"),
        "{body}"
    );
    // A core module (not a component).
    let (status, body) = upload(b"\0asm\x01\0\0\0".to_vec()).await;
    assert_eq!(status, 400);
    assert!(
        body.contains("it is a core WebAssembly module")
            && body.contains("cargo build --target wasm32-wasip2"),
        "{body}"
    );
    // A truncated component.
    let module = read(&example("basics"));
    let (status, _) = upload(module[..module.len() / 2].to_vec()).await;
    assert_eq!(status, 400);
    assert_eq!(
        host.admin_get("/deployments").await["deployments"],
        json!([]),
        "nothing was stored"
    );

    let (status, body) = upload(module.clone()).await;
    assert_eq!(status, 201, "{body}");
    let (status, again) = upload(module).await;
    assert_eq!(status, 200, "the same bytes are the same deployment");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["id"],
        serde_json::from_str::<Value>(&again).unwrap()["id"]
    );
}

#[tokio::test]
async fn a_looping_guest_is_interrupted_while_others_are_served() {
    let host = Host::start_with(HostOptions {
        config: "[limits]\ncpu_per_attempt = \"300ms\"\n[retry]\ninitial_interval = \"50ms\"\nmax_attempts = 2\n".into(),
        ..Default::default()
    })
    .await;
    let spin = host.post("/Rogue/spin/send", "", &[]).await.json();
    let id = spin["invocationId"].as_str().unwrap().to_string();
    for i in 1..=20 {
        assert_eq!(
            host.post("/Counter/busy/add", "1", &[]).await.body,
            i.to_string()
        );
    }
    let v = host
        .wait_invocation(&id, Duration::from_secs(60), |v| v["status"] == "paused")
        .await;
    assert_eq!(v["attempts"], 2, "{v:#}");
    let error = v["last_error"].as_str().unwrap();
    assert!(
        error.contains("gave up after 2 attempts") && error.contains("ran longer than its budget"),
        "{error}"
    );
    assert_eq!(
        host.get(&format!("/restate/output/{id}")).await.status,
        470,
        "paused, not failed"
    );
}

#[tokio::test]
async fn a_guest_over_its_memory_cap_traps_and_others_continue() {
    let host = Host::start_with(HostOptions {
        config: "[limits]\nmemory_bytes = 33554432\n[retry]\ninitial_interval = \"10ms\"\nmax_attempts = 2\n".into(),
        ..Default::default()
    })
    .await;
    assert_eq!(
        host.post("/Rogue/hog", "4", &[]).await.body,
        "4",
        "small allocations are fine"
    );
    let hog = host.post("/Rogue/hog/send", "64", &[]).await.json();
    let id = hog["invocationId"].as_str().unwrap();
    let v = host
        .wait_invocation(id, Duration::from_secs(60), |v| v["status"] == "paused")
        .await;
    assert!(
        v["last_error"].as_str().unwrap().contains("trapped"),
        "{v:#}"
    );
    assert_eq!(host.post("/Steps/steps3", "", &[]).await.body, "3");
}

#[tokio::test]
async fn the_journal_of_an_invocation_is_visible_through_the_admin_api() {
    let host = Host::start().await;
    let r = host.post("/Steps/steps3", "", &[]).await;
    let id = r.header("x-restate-id").unwrap();
    let v = host.admin_get(&format!("/invocations/{id}")).await;
    assert_eq!(v["status"], "succeeded");
    assert_eq!(v["target"], "Steps/steps3");
    assert_eq!(v["attempts"], 1);
    assert!(v["deployment"].as_str().unwrap().starts_with("dp_"));
    let commands: Vec<&str> = v["journal"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "command")
        .map(|e| e["command"].as_str().unwrap())
        .collect();
    assert_eq!(commands, ["run \"one\"", "run \"two\"", "run \"three\""]);
    assert_eq!(v["journal"][5]["value"]["success"], 3);
    assert_eq!(
        v["journal"][5]["answers"], "run \"three\"",
        "a completion names the command it answers"
    );
    let created = v["created_at"].as_str().unwrap();
    assert!(
        created.starts_with("20") && created.ends_with('Z'),
        "RFC 3339 times: {created}"
    );
}

#[tokio::test]
async fn exclusive_handlers_of_one_key_run_one_at_a_time() {
    let host = Host::start().await;
    let calls = (0..200).map(|_| {
        let (client, url) = (
            host.http.clone(),
            format!("{}/Counter/one/add", host.ingress()),
        );
        tokio::spawn(async move {
            let r = client
                .post(url)
                .header("content-type", "application/json")
                .body("1")
                .send()
                .await
                .unwrap();
            r.text().await.unwrap().parse::<i64>().unwrap()
        })
    });
    let mut seen = Vec::new();
    for c in calls.collect::<Vec<_>>() {
        seen.push(c.await.unwrap());
    }
    seen.sort();
    assert_eq!(
        seen,
        (1..=200).collect::<Vec<_>>(),
        "each add saw the previous one's write"
    );
    assert_eq!(host.post("/Counter/one/get", "", &[]).await.body, "200");
}
