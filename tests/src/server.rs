//! A test HTTP server that handlers call from their `run` steps: it counts
//! requests, hands out unique tokens, and can hold requests until released.

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
