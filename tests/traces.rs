//! OpenTelemetry traces (issue 11, section 3): a Kafka record carrying a
//! W3C `traceparent` header runs `Enrich/relay`, which calls
//! `Enrich/lookup`, which makes an `http_call`. An OTLP receiver running in
//! this process collects the host's spans (OTLP/HTTP, JSON), and the test
//! checks the whole parent/child chain and the `traceparent` the API saw;
//! then an HTTP request's `traceparent` continues the same way.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::{get, post};
use cairn_tests::{example, free_port, kafka, until, Host, HostOptions};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the receiver got: spans (OTLP JSON) and the `traceparent` headers
/// of requests to `/api`.
#[derive(Default)]
struct Collected {
    spans: Vec<Value>,
    api_traceparents: Vec<String>,
}

/// An OTLP/HTTP receiver (`POST /v1/traces`) and a small API (`GET /api`).
async fn receiver() -> (String, Arc<Mutex<Collected>>) {
    let collected = Arc::new(Mutex::new(Collected::default()));
    let app = axum::Router::new()
        .route("/v1/traces", post(take_spans))
        .route("/api", get(answer_api))
        .with_state(collected.clone());
    let port = free_port();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://127.0.0.1:{port}"), collected)
}

async fn take_spans(State(c): State<Arc<Mutex<Collected>>>, body: String) -> &'static str {
    let export: Value = serde_json::from_str(&body).expect("OTLP JSON");
    let mut c = c.lock().unwrap();
    for resource in export["resourceSpans"].as_array().into_iter().flatten() {
        let service = resource["resource"]["attributes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["key"] == "service.name")
            .map(|a| a["value"]["stringValue"].clone());
        assert_eq!(
            service,
            Some(json!("cairn")),
            "the resource names the service"
        );
        for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
            c.spans
                .extend(scope["spans"].as_array().into_iter().flatten().cloned());
        }
    }
    "{}"
}

async fn answer_api(State(c): State<Arc<Mutex<Collected>>>, headers: HeaderMap) -> &'static str {
    if let Some(t) = headers.get("traceparent") {
        let mut c = c.lock().unwrap();
        c.api_traceparents.push(t.to_str().unwrap().to_string());
    }
    "fine"
}

/// The one span named `name` (panics on none or several).
fn span<'a>(spans: &'a [Value], name: &str) -> &'a Value {
    let found: Vec<&Value> = spans.iter().filter(|s| s["name"] == name).collect();
    assert_eq!(found.len(), 1, "one span {name}: {spans:#?}");
    found[0]
}

fn id(span: &Value, field: &str) -> String {
    span[field].as_str().unwrap_or_default().to_lowercase()
}

/// Assert that `child`'s parent is `parent`.
fn child_of(child: &Value, parent: &Value) {
    assert_eq!(
        id(child, "parentSpanId"),
        id(parent, "spanId"),
        "{} is a child of {}",
        child["name"],
        parent["name"]
    );
}

#[tokio::test]
async fn a_kafka_record_traceparent_continues_through_the_handler_a_call_and_an_http_call() {
    let (url, collected) = receiver().await;
    let port = url.rsplit(':').next().unwrap();
    let host = Host::start_with_env(
        HostOptions {
            config: format!(
                "http_allow = [\"127.0.0.1:{port}\"]\n[tracing]\nendpoint = \"{url}\"\n"
            ),
            deploy: vec![example("coordination")],
        },
        &[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await;
    let bootstrap = kafka::require_broker();
    let topic = kafka::unique_topic("traces");
    kafka::create_topic(&topic, 1).await;
    kafka::subscribe(&host, &bootstrap, &topic, "service://Enrich/relay").await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let upstream = "00f067aa0ba902b7";
    let mut record = kafka::Record::json("k", &json!(format!("{url}/api")));
    record
        .headers
        .push(("traceparent".into(), format!("00-{trace}-{upstream}-01")));
    kafka::produce(&topic, vec![record]).await;

    let names = [
        format!("ingest {topic}"),
        "Enrich/relay".to_string(),
        "run \"check\"".to_string(),
        "call Enrich/lookup".to_string(),
        "Enrich/lookup".to_string(),
        "http_call GET".to_string(),
    ];
    until(
        "every span of the chain",
        Duration::from_secs(60),
        || async {
            let c = collected.lock().unwrap();
            names
                .iter()
                .all(|n| c.spans.iter().any(|s| s["name"] == n.as_str()))
        },
    )
    .await;
    let (spans, api_traceparents) = {
        let c = collected.lock().unwrap();
        (c.spans.clone(), c.api_traceparents.clone())
    };
    let spans = &spans;
    for s in spans {
        assert_eq!(id(s, "traceId"), trace, "one trace: {s:#}");
    }
    let ingest = span(spans, &names[0]);
    assert_eq!(
        id(ingest, "parentSpanId"),
        upstream,
        "the record's span is the parent"
    );
    let relay = span(spans, "Enrich/relay");
    child_of(relay, ingest);
    let attempts_of = |invocation: &Value| -> Vec<Value> {
        spans
            .iter()
            .filter(|s| {
                s["name"]
                    .as_str()
                    .unwrap_or_default()
                    .starts_with("attempt ")
                    && id(s, "parentSpanId") == id(invocation, "spanId")
            })
            .cloned()
            .collect()
    };
    let relay_attempts = attempts_of(relay);
    assert!(!relay_attempts.is_empty(), "relay's attempts: {spans:#?}");
    let under_an_attempt = |s: &Value| {
        relay_attempts
            .iter()
            .any(|a| id(s, "parentSpanId") == id(a, "spanId"))
    };
    let step = span(spans, "run \"check\"");
    assert!(under_an_attempt(step), "the step is a child of an attempt");
    let call = span(spans, "call Enrich/lookup");
    assert!(under_an_attempt(call), "the call is a child of an attempt");
    let lookup = span(spans, "Enrich/lookup");
    child_of(lookup, call);
    assert!(!attempts_of(lookup).is_empty(), "lookup's attempts");
    let http = span(spans, "http_call GET");
    child_of(http, lookup);
    assert_eq!(
        api_traceparents,
        [format!("00-{trace}-{}-01", id(http, "spanId"))],
        "the API saw the http_call's span in its traceparent"
    );

    // An HTTP request's traceparent continues the same way.
    let caller = "00f067aa0ba90299";
    let r = host
        .post(
            "/Enrich/lookup",
            &json!(format!("{url}/api")).to_string(),
            &[("traceparent", &format!("00-{trace}-{caller}-01"))],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    until(
        "the span of the HTTP-started lookup",
        Duration::from_secs(60),
        || async {
            let c = collected.lock().unwrap();
            c.spans
                .iter()
                .any(|s| s["name"] == "Enrich/lookup" && id(s, "parentSpanId") == caller)
        },
    )
    .await;
}
