//! Operating Cairn (issue 11): finding invocations through the listing
//! indexes, reading and editing keyed state through the key's queue,
//! purging, and the CLI's tables.

use cairn_tests::{example, until, Host, HostOptions};
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
