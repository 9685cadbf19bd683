//! A test HTTP server that handlers call from their `run` steps or through
//! the host: it counts requests, hands out unique tokens, can hold requests
//! until released, and plays outside APIs for the pattern examples
//! (`/record/{channel}`: each channel can be slow, down or concurrency-capped).

use axum::extract::{Query, State};
use axum::routing::get;
use axum::Router;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// What the server saw.
#[derive(Default)]
struct Seen {
    /// (inv, step) -> tokens handed out, in order.
    tokens: HashMap<(String, String), Vec<String>>,
    next: u64,
    holds: usize,
    /// key -> arrival times of `/flaky` requests
    flaky: HashMap<String, Vec<std::time::Instant>>,
    /// `/slow` requests in progress, and the most at once.
    slow_now: usize,
    slow_max: usize,
    slow_total: usize,
    /// `/record/{channel}` channels.
    channels: HashMap<String, Channel>,
}

/// One `/record/{channel}` channel: what it received and how it behaves.
#[derive(Default)]
struct Channel {
    received: Vec<Received>,
    /// Answer 503 (and record nothing) while down.
    down: bool,
    /// Answer 429 (and record nothing) above this many requests at once.
    max_concurrent: Option<usize>,
    /// Delay before answering, unless the request gives `?ms=`.
    delay_ms: u64,
    in_flight: usize,
    max_in_flight: usize,
    /// Requests answered 503 or 429.
    refused: usize,
}

/// A request a channel accepted.
#[derive(Debug, Clone)]
pub struct Received {
    /// The body, as text.
    pub body: String,
    /// The `idempotency-key` header, if any.
    pub idempotency_key: Option<String>,
    /// When it arrived.
    pub at: std::time::Instant,
}

/// The server's shared state.
#[derive(Clone)]
pub struct TestServer {
    /// Base URL, e.g. `http://127.0.0.1:1234`.
    pub url: String,
    seen: Arc<Mutex<Seen>>,
    delay: Duration,
    release: watch::Sender<bool>,
}

impl TestServer {
    /// Start a server whose `/token` answers after `delay`.
    pub async fn start(delay: Duration) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let server = TestServer {
            url: format!("http://{addr}"),
            seen: Arc::default(),
            delay,
            release: watch::channel(false).0,
        };
        let app = Router::new()
            .route("/token", get(token))
            .route("/hold", get(hold))
            .route("/flaky", get(flaky))
            .route("/slow", get(slow))
            .route("/record/{channel}", axum::routing::any(record))
            .with_state(server.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        server
    }

    /// Tokens handed out for (invocation, step), in order.
    pub fn tokens(&self, inv: &str, step: u32) -> Vec<String> {
        let seen = self.seen.lock().unwrap();
        seen.tokens
            .get(&(inv.to_string(), step.to_string()))
            .cloned()
            .unwrap_or_default()
    }

    /// Total requests to `/token`.
    pub fn requests(&self) -> usize {
        self.seen
            .lock()
            .unwrap()
            .tokens
            .values()
            .map(Vec::len)
            .sum()
    }

    /// Requests that reached `/hold` so far.
    pub fn holds(&self) -> usize {
        self.seen.lock().unwrap().holds
    }

    /// Arrival times of `/flaky` requests for `key`.
    pub fn flaky_requests(&self, key: &str) -> Vec<std::time::Instant> {
        self.seen
            .lock()
            .unwrap()
            .flaky
            .get(key)
            .cloned()
            .unwrap_or_default()
    }

    /// `/slow` requests received.
    pub fn slow_total(&self) -> usize {
        self.seen.lock().unwrap().slow_total
    }

    /// The most `/slow` requests that were in progress at once.
    pub fn slow_max(&self) -> usize {
        self.seen.lock().unwrap().slow_max
    }

    fn channel<T>(&self, name: &str, f: impl FnOnce(&mut Channel) -> T) -> T {
        f(self
            .seen
            .lock()
            .unwrap()
            .channels
            .entry(name.to_string())
            .or_default())
    }

    /// Requests `/record/{name}` accepted, in arrival order.
    pub fn received(&self, name: &str) -> Vec<Received> {
        self.channel(name, |c| c.received.clone())
    }

    /// How many requests `/record/{name}` accepted.
    pub fn received_count(&self, name: &str) -> usize {
        self.channel(name, |c| c.received.len())
    }

    /// Bodies `/record/{name}` accepted, parsed as JSON, in arrival order.
    pub fn received_json(&self, name: &str) -> Vec<serde_json::Value> {
        self.received(name)
            .iter()
            .map(|r| serde_json::from_str(&r.body).unwrap_or(serde_json::Value::Null))
            .collect()
    }

    /// Requests `/record/{name}` refused (503 while down, 429 over its cap).
    pub fn refused(&self, name: &str) -> usize {
        self.channel(name, |c| c.refused)
    }

    /// The most requests `/record/{name}` had in progress at once.
    pub fn max_in_flight(&self, name: &str) -> usize {
        self.channel(name, |c| c.max_in_flight)
    }

    /// Take `/record/{name}` down (503) or bring it back up.
    pub fn set_down(&self, name: &str, down: bool) {
        self.channel(name, |c| c.down = down);
    }

    /// Refuse (429) requests to `/record/{name}` above `max` at once.
    pub fn set_max_concurrent(&self, name: &str, max: usize) {
        self.channel(name, |c| c.max_concurrent = Some(max));
    }

    /// Make `/record/{name}` answer after `ms` milliseconds.
    pub fn set_delay(&self, name: &str, ms: u64) {
        self.channel(name, |c| c.delay_ms = ms);
    }

    /// Let every held and future `/hold` request answer.
    pub fn release(&self) {
        self.release.send_replace(true);
    }
}

async fn token(State(s): State<TestServer>, Query(q): Query<HashMap<String, String>>) -> String {
    let token = {
        let mut seen = s.seen.lock().unwrap();
        seen.next += 1;
        let token = format!("t{}", seen.next);
        let key = (
            q.get("inv").cloned().unwrap_or_default(),
            q.get("step").cloned().unwrap_or_default(),
        );
        seen.tokens.entry(key).or_default().push(token.clone());
        token
    };
    tokio::time::sleep(s.delay).await;
    token
}

async fn hold(State(s): State<TestServer>) -> &'static str {
    s.seen.lock().unwrap().holds += 1;
    let mut rx = s.release.subscribe();
    let _ = rx.wait_for(|released| *released).await;
    "released"
}

/// `/flaky?key=K&fail=N`: 503 for the first N requests of K, then 200 "ok".
async fn flaky(
    State(s): State<TestServer>,
    Query(q): Query<HashMap<String, String>>,
) -> (axum::http::StatusCode, &'static str) {
    let key = q.get("key").cloned().unwrap_or_default();
    let fail: usize = q.get("fail").and_then(|f| f.parse().ok()).unwrap_or(0);
    let mut seen = s.seen.lock().unwrap();
    let times = seen.flaky.entry(key).or_default();
    times.push(std::time::Instant::now());
    if times.len() <= fail {
        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "not yet")
    } else {
        (axum::http::StatusCode::OK, "ok")
    }
}

/// `/slow?ms=N`: answers "ok" after N ms, counting how many run at once.
async fn slow(
    State(s): State<TestServer>,
    Query(q): Query<HashMap<String, String>>,
) -> &'static str {
    let ms: u64 = q.get("ms").and_then(|m| m.parse().ok()).unwrap_or(100);
    {
        let mut seen = s.seen.lock().unwrap();
        seen.slow_now += 1;
        seen.slow_total += 1;
        seen.slow_max = seen.slow_max.max(seen.slow_now);
    }
    tokio::time::sleep(Duration::from_millis(ms)).await;
    s.seen.lock().unwrap().slow_now -= 1;
    "ok"
}

/// `ANY /record/{channel}[?ms=N]`: accept and record the request (answering
/// `{"n": its index, "echo": the body}` after the channel's delay), or refuse
/// it with 503 while the channel is down and 429 above its concurrency cap.
async fn record(
    State(s): State<TestServer>,
    axum::extract::Path(name): axum::extract::Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: axum::http::HeaderMap,
    body: String,
) -> (axum::http::StatusCode, String) {
    use axum::http::StatusCode;
    let accepted = s.channel(&name, |c| {
        if c.down || c.max_concurrent.is_some_and(|max| c.in_flight >= max) {
            c.refused += 1;
            return Err(if c.down {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::TOO_MANY_REQUESTS
            });
        }
        c.in_flight += 1;
        c.max_in_flight = c.max_in_flight.max(c.in_flight);
        c.received.push(Received {
            body: body.clone(),
            idempotency_key: headers
                .get("idempotency-key")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            at: std::time::Instant::now(),
        });
        Ok((c.received.len() - 1, c.delay_ms))
    });
    let (n, delay_ms) = match accepted {
        Ok(accepted) => accepted,
        Err(status) => return (status, "refused".into()),
    };
    let ms = q.get("ms").and_then(|m| m.parse().ok()).unwrap_or(delay_ms);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    s.channel(&name, |c| c.in_flight -= 1);
    let answer = serde_json::json!({ "n": n, "echo": body });
    (StatusCode::OK, answer.to_string())
}
