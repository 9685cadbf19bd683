//! Operating Cairn (issue 11): finding invocations through the listing
//! indexes, reading and editing keyed state through the key's queue,
//! purging, and the CLI's tables.

use cairn_tests::{example, metric as series, until, Host, HostOptions};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::Duration;

const MINUTE: Duration = Duration::from_secs(60);

async fn start() -> Host {
    Host::start_with(HostOptions {
        config: String::new(),
        deploy: vec![example("basics"), example("coordination")],
    })
    .await
}

/// The invocation id of an answered call.
fn id_of(r: &cairn_tests::Response) -> String {
    r.header("x-restate-id")
        .unwrap_or_else(|| panic!("no invocation id: {}", r.body))
        .to_string()
}

/// The ids of a listing page.
fn ids(page: &Value) -> Vec<String> {
    page["invocations"]
        .as_array()
        .unwrap_or_else(|| panic!("not a page: {page}"))
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn invocations_are_found_by_filters_and_pages_and_finished_ones_purged() {
    let host = start().await;
    let mut adds = Vec::new();
    for key in ["a", "a", "b"] {
        let r = host.post(&format!("/Counter/{key}/add"), "1", &[]).await;
        assert_eq!(r.status, 200, "{}", r.body);
        adds.push(id_of(&r));
    }
    let failed = host.post("/Steps/fail", "\"why\"", &[]).await;
    assert_eq!(failed.status, 500, "{}", failed.body);
    let failed = id_of(&failed);
    let steps = id_of(&host.post("/Steps/steps3", "", &[]).await);

    let counter = host.admin_get("/invocations?service=Counter").await;
    let mut expected = adds.clone();
    expected.reverse();
    assert_eq!(ids(&counter), expected, "newest first: {counter}");
    assert_eq!(counter["next_cursor"], Value::Null, "nothing further");
    let a = host
        .admin_get("/invocations?service=Counter&key=a&handler=add")
        .await;
    assert_eq!(ids(&a), [adds[1].clone(), adds[0].clone()]);
    let listed = &a["invocations"][0];
    assert_eq!(
        (&listed["status"], &listed["key"], &listed["service"]),
        (&json!("succeeded"), &json!("a"), &json!("Counter"))
    );
    let failures = host.admin_get("/invocations?status=failed").await;
    assert_eq!(ids(&failures), [failed.as_str()]);
    let none = host
        .admin_get("/invocations?service=Counter&created_after=2999-01-01T00:00:00Z")
        .await;
    assert!(ids(&none).is_empty(), "{none}");

    // Pages of one, followed by their cursors: everything once.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..20 {
        let query = cursor.map(|c| format!("&cursor={c}")).unwrap_or_default();
        let page = host
            .admin_get(&format!("/invocations?limit=1{query}"))
            .await;
        seen.extend(ids(&page));
        cursor = page["next_cursor"].as_str().map(String::from);
        if cursor.is_none() {
            break;
        }
    }
    let all: BTreeSet<&String> = adds.iter().chain([&failed, &steps]).collect();
    assert_eq!(seen.len(), all.len(), "no invocation twice: {seen:?}");
    assert_eq!(seen.iter().collect::<BTreeSet<_>>(), all);

    for (query, why) in [
        ("status=sleepy", "unknown status"),
        ("limit=0", "limit"),
        ("key=a", "key needs service"),
        ("cursor=junk", "not a cursor"),
        ("created_after=yesterday", "RFC 3339"),
    ] {
        let r = host
            .admin_send(reqwest::Method::GET, &format!("/invocations?{query}"), None)
            .await;
        assert_eq!(r.status, 400, "{query}: {}", r.body);
        assert!(r.body.contains(why), "{query}: {}", r.body);
    }

    let r = host
        .admin_send(
            reqwest::Method::DELETE,
            &format!("/invocations/{steps}"),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = host
        .admin_send(reqwest::Method::GET, &format!("/invocations/{steps}"), None)
        .await;
    assert_eq!(r.status, 404, "purged: {}", r.body);
    let listed = host.admin_get("/invocations?service=Steps").await;
    assert_eq!(ids(&listed), [failed.as_str()], "no longer listed");
}

#[tokio::test]
async fn state_is_read_and_edited_in_the_key_queue_after_the_running_handler() {
    let host = start().await;
    let r = host.post("/Tally/t1/bump", "5", &[]).await;
    assert_eq!((r.status, r.body.as_str()), (200, "10"));
    let state = host.admin_get("/objects/Tally/t1/state").await;
    assert_eq!(state["state"], json!({ "total": 10 }), "{state}");

    // `deadlock` holds the key (its call to `bump` on the same key waits
    // behind it) until it is cancelled.
    let r = host.post("/Tally/t1/deadlock/send", "1", &[]).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let holder = r.invocation_id();
    host.wait_invocation(&holder, MINUTE, |v| {
        v["journal"].as_array().is_some_and(|j| !j.is_empty())
    })
    .await;
    let admin = host.admin();
    let http = host.http.clone();
    let edit = tokio::spawn(async move {
        http.put(format!("{admin}/objects/Tally/t1/state/total"))
            .body("100")
            .send()
            .await
            .expect("the admin API answers")
    });
    let running = host
        .admin_get("/invocations?service=Tally&key=t1&status=running")
        .await;
    assert!(ids(&running).contains(&holder), "{running}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!edit.is_finished(), "the edit waits for the key's holder");
    assert_eq!(
        host.admin_get("/objects/Tally/t1/state").await["state"]["total"],
        10
    );
    let r = host
        .admin_post(&format!("/invocations/{holder}/cancel"), None)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let answer = tokio::time::timeout(MINUTE, edit)
        .await
        .expect("the edit is applied once the key is free")
        .unwrap();
    assert_eq!(answer.status(), 200);
    let answer: Value = answer.json().await.unwrap();
    assert_eq!(answer["value"], 100, "{answer}");
    let state = host.admin_get("/objects/Tally/t1/state").await;
    assert_eq!(state["state"], json!({ "total": 100 }), "{state}");
    let r = host.post("/Tally/t1/bump", "1", &[]).await;
    assert_eq!(r.body, "102", "the handler reads the edited state");

    let r = host
        .admin_send(
            reqwest::Method::DELETE,
            "/objects/Tally/t1/state/total",
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let state = host.admin_get("/objects/Tally/t1/state").await;
    assert_eq!(state["state"], json!({}), "{state}");

    let r = host
        .admin_send(reqwest::Method::GET, "/objects/Steps/x/state", None)
        .await;
    assert_eq!(r.status, 400, "a service has no state: {}", r.body);
    let r = host
        .admin_send(reqwest::Method::GET, "/objects/Nope/x/state", None)
        .await;
    assert_eq!(r.status, 404, "{}", r.body);
    let r = host
        .admin_send(
            reqwest::Method::PUT,
            "/objects/Tally/t1/state/total",
            Some(&json!("fine")),
        )
        .await;
    assert_eq!(r.status, 200, "any JSON value: {}", r.body);
    let r = host.post("/Tally/t1/cairn:edit-state", "{}", &[]).await;
    assert_eq!(r.status, 404, "the ingress cannot edit state: {}", r.body);
}

#[tokio::test]
async fn the_cli_lists_invocations_state_and_deployments_as_tables_or_json() {
    let host = start().await;
    let id = id_of(&host.post("/Counter/cli/add", "3", &[]).await);

    let table = host
        .cli(&["invocations", "list", "--service", "Counter"])
        .unwrap();
    assert!(
        table.contains("STATUS") && table.contains(&id) && table.contains("succeeded"),
        "{table}"
    );
    let json: Value = serde_json::from_str(
        &host
            .cli(&["invocations", "list", "--status", "succeeded", "--json"])
            .unwrap(),
    )
    .unwrap();
    assert_eq!(ids(&json), [id.as_str()]);

    let state = host.cli(&["state", "get", "Counter", "cli"]).unwrap();
    assert!(state.contains("count") && state.contains('3'), "{state}");
    host.cli(&["state", "set", "Counter", "cli", "count", "40"])
        .unwrap();
    assert_eq!(
        host.cli(&["state", "get", "Counter", "cli", "count"])
            .unwrap()
            .trim(),
        "40"
    );
    let err = host
        .cli(&["state", "set", "Counter", "cli", "count", "forty"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("not JSON"), "{err}");
    host.cli(&["state", "clear", "Counter", "cli", "count"])
        .unwrap();
    until("the entry is cleared", MINUTE, || async {
        host.admin_get("/objects/Counter/cli/state").await["state"] == json!({})
    })
    .await;

    let deployments = host.cli(&["deployments", "list"]).unwrap();
    assert!(
        deployments.contains("Counter") && deployments.contains("Tally"),
        "{deployments}"
    );
    let listed = host.admin_get("/deployments").await;
    let basics = listed["deployments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["services"].to_string().contains("Counter"))
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let described = host.cli(&["deployments", "describe", &basics]).unwrap();
    assert!(
        described.contains("Greeter") && described.contains("shared"),
        "{described}"
    );
    let err = host
        .cli(&["deployments", "describe", "dp_nope"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("404"), "{err}");
}

#[tokio::test]
async fn prometheus_metrics_count_what_happened_and_read_gauges_at_scrape_time() {
    let host = start().await;
    for _ in 0..3 {
        assert_eq!(host.post("/Counter/m/add", "1", &[]).await.status, 200);
    }
    assert_eq!(host.post("/Steps/fail", "\"x\"", &[]).await.status, 500);
    let r = host
        .post("/Counter/later/add/send?delay=1h", "1", &[])
        .await;
    assert_eq!(r.status, 202, "{}", r.body);

    let r = host
        .http
        .get(format!("{}/metrics", host.admin()))
        .send()
        .await
        .unwrap();
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"),
        "Prometheus text format"
    );
    let text = r.text().await.unwrap();
    let finished = |service, outcome| {
        series(
            &text,
            "cairn_invocations_finished_total",
            &[
                ("service", service),
                ("outcome", outcome),
                ("partition", "0"),
            ],
        )
    };
    assert_eq!(finished("Counter", "succeeded"), Some(3.0), "{text}");
    assert_eq!(finished("Steps", "failed"), Some(1.0), "{text}");
    let started = &[("service", "Counter"), ("handler", "add")];
    assert_eq!(
        series(&text, "cairn_invocations_started_total", started),
        Some(3.0)
    );
    assert_eq!(series(&text, "cairn_attempts_total", started), Some(3.0));
    let scheduled = &[("status", "scheduled"), ("partition", "0")];
    assert_eq!(
        series(&text, "cairn_invocations", scheduled),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        series(&text, "cairn_invocations", &[("status", "paused")]),
        Some(0.0)
    );
    assert_eq!(
        series(&text, "cairn_timers", &[]),
        Some(1.0),
        "the delayed send's timer"
    );
    assert!(series(&text, "cairn_database_bytes", &[]).unwrap_or(0.0) > 0.0);
    assert!(series(&text, "cairn_commit_batch_jobs_count", &[]).unwrap_or(0.0) >= 5.0);
    let within_60s = &[("service", "Counter"), ("le", "60")];
    assert_eq!(
        series(
            &text,
            "cairn_invocation_duration_seconds_bucket",
            within_60s
        ),
        Some(3.0),
        "end-to-end latency histogram: {text}"
    );
    assert!(
        text.contains("# HELP cairn_invocations_finished_total"),
        "described"
    );
    let json = host.admin_get("/metrics.json").await;
    assert!(json["commit_transactions"].as_u64().unwrap() > 0, "{json}");
}

#[tokio::test]
async fn guest_output_is_logged_once_with_its_attempt_and_secrets_redacted() {
    let host = Host::start_with(HostOptions {
        // Suspend at once: the sleep ends in a new attempt that replays
        // the first print. The narrator's name is a secret.
        config: "suspend_after = \"1ms\"\n\
                 [guest_env]\nNARRATOR = { value = \"Ms Hidden\", secret = true }\n"
            .into(),
        deploy: vec![example("coordination")],
    })
    .await;
    let r = host.post("/Sleeper/narrate", "300", &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let id = id_of(&r);
    until("the second print is logged", MINUTE, || async {
        host.log().contains("after the nap")
    })
    .await;
    let log = host.log();
    let lines = |text: &str| log.lines().filter(|l| l.contains(text)).count();
    assert_eq!(
        lines("before the nap"),
        1,
        "not printed again by the replay:\n{log}"
    );
    assert_eq!(lines("after the nap"), 1);
    let line = log.lines().find(|l| l.contains("before the nap")).unwrap();
    assert!(
        line.contains(&id) && line.contains("Sleeper") && line.contains("attempt=1"),
        "tagged: {line}"
    );
    assert!(
        line.contains("narrator: <redacted>") && !log.contains("Ms Hidden"),
        "a secret of [guest_env] is redacted: {line}"
    );
}

#[tokio::test]
async fn log_format_json_writes_one_json_object_per_line() {
    use std::io::{BufRead, BufReader};
    let data = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(cairn_tests::cairn_bin())
        .args(["serve", "--log-format", "json", "--data-dir"])
        .arg(data.path())
        .args([
            "--ingress",
            &format!("127.0.0.1:{}", cairn_tests::free_port()),
        ])
        .args([
            "--admin",
            &format!("127.0.0.1:{}", cairn_tests::free_port()),
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let ready = stderr
        .lines()
        .take(50)
        .map_while(Result::ok)
        .find(|l| l.contains("cairn is ready"));
    child.kill().unwrap();
    child.wait().unwrap();
    let ready = ready.expect("the host logged that it is ready");
    let event: Value = serde_json::from_str(&ready).expect("a JSON log line");
    assert_eq!(event["level"], "INFO", "{event}");
    assert!(event["fields"]["message"]
        .as_str()
        .unwrap()
        .starts_with("cairn is ready"));
}

#[tokio::test]
async fn the_openapi_document_lists_every_admin_route_the_host_serves() {
    let host = start().await;
    let doc = host.admin_get("/openapi.json").await;
    assert_eq!(doc["info"]["title"], "Cairn admin API", "{doc}");
    let paths = doc["paths"].as_object().expect("paths");
    for expected in [
        "/invocations",
        "/invocations/{id}",
        "/objects/{service}/{key}/state/{name}",
        "/subscriptions/{id}/{action}",
        "/deployments",
        "/metrics",
    ] {
        assert!(paths.contains_key(expected), "{expected} is documented");
    }
    // Every documented path and method reaches a handler (with made-up
    // parameters it may answer 400 or 404, but never the fallback's
    // "no admin route").
    for (path, methods) in paths {
        let concrete = path
            .replace("{id}", "inv_0")
            .replace("{service}", "Counter")
            .replace("{key}", "k")
            .replace("{name}", "n")
            .replace("{action}", "pause");
        for method in methods.as_object().unwrap().keys() {
            let method: reqwest::Method = method.to_uppercase().parse().unwrap();
            let r = host.admin_send(method.clone(), &concrete, None).await;
            assert!(
                r.status != 405 && !r.body.contains("no admin route"),
                "{method} {path} is documented but not served: {}",
                r.body
            );
            assert!(
                methods[method.as_str().to_lowercase()]["responses"]
                    .as_object()
                    .is_some_and(|r| !r.is_empty()),
                "{method} {path} documents its answers"
            );
        }
    }
}
