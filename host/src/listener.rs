//! Serving HTTP to clients that may be hostile: connection caps, timeouts
//! and a bounded shutdown, for the ingress and the admin API alike.
//!
//! - **A cap per listener** (`connections.ingress_max`, `admin_max`): a
//!   connection over it is closed as soon as it is accepted, so a flood of
//!   idle sockets on the ingress cannot take the file descriptors the admin
//!   port, the database and Kafka need. At start the host raises its
//!   open-file limit to the hard limit and lowers the ingress cap if both
//!   caps would not fit in it.
//! - **A header timeout** (`connections.header_timeout`): a client must send
//!   a request's headers within it, and an idle keep-alive connection is
//!   closed after it (hyper's header-read timer covers both), so one byte
//!   per second keeps nothing open.
//! - **A body timeout** (`connections.body_timeout`): the whole body must
//!   arrive within it (408 otherwise), and it is refused past its size
//!   limit (413) before a handler sees it.
//! - **A bounded shutdown**: on SIGTERM the listeners stop accepting, open
//!   connections finish their requests (attached clients are answered 503
//!   by the ingress), and whatever is still open after
//!   `connections.shutdown_timeout` is dropped.

use crate::config::Connections;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

/// How a listener treats its connections.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// Connections open at once; more are closed on accept.
    pub max_connections: usize,
    /// Time to send a request's headers, and idle time between requests.
    pub header_timeout: Duration,
    /// Time to send a request's body.
    pub body_timeout: Duration,
    /// Largest body, in bytes.
    pub max_body_bytes: usize,
    /// How long open connections may finish after shutdown begins.
    pub shutdown_timeout: Duration,
}

impl Policy {
    /// The policy of a listener with `max_connections` and `max_body_bytes`.
    pub fn new(connections: &Connections, max_connections: usize, max_body_bytes: usize) -> Self {
        Policy {
            max_connections,
            header_timeout: connections.header_timeout,
            body_timeout: connections.body_timeout,
            max_body_bytes,
            shutdown_timeout: connections.shutdown_timeout,
        }
    }
}

/// Raise the open-file limit to its hard limit; returns the limit now in
/// force.
pub fn raise_open_files() -> u64 {
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    unsafe {
        let mut limit = std::mem::zeroed::<libc::rlimit>();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
        limit.rlim_cur
    }
}

/// Serve `router` on `listener` under `policy` until `shutdown` resolves,
/// then give open connections `policy.shutdown_timeout` to finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    policy: Policy,
    shutdown: impl Future<Output = ()>,
) {
    let name = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let open = Arc::new(Semaphore::new(policy.max_connections));
    let (draining, drain) = watch::channel(false);
    let mut complaints = Complaints::default();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, most likely: back off briefly.
                complaints.say(&name, format_args!("accepting a connection failed: {e}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            complaints.say(
                &name,
                format_args!(
                    "{} connections are open (the cap): closing new ones",
                    policy.max_connections
                ),
            );
            continue;
        };
        let (router, drain) = (router.clone(), drain.clone());
        tokio::spawn(async move {
            connection(stream, router, policy.header_timeout, drain).await;
            drop(permit);
        });
    }
    draining.send_replace(true);
    let all = u32::try_from(policy.max_connections).unwrap_or(u32::MAX);
    let finished = tokio::time::timeout(policy.shutdown_timeout, open.acquire_many(all)).await;
    if finished.is_err() {
        tracing::warn!(listener = %name, "closing connections still open after the shutdown timeout");
    }
}

async fn connection(
    stream: tokio::net::TcpStream,
    router: Router,
    header_timeout: Duration,
    mut drain: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let service = hyper_util::service::TowerToHyperService::new(router);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let draining = async move {
        let _ = drain.wait_for(|d| *d).await;
    };
    tokio::select! {
        _ = conn.as_mut() => {}
        () = draining => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// `router` with every request body read within the policy's time and
/// size before a handler runs. Layers added after this one (the admin
/// token) run before any body is read.
pub fn bounded_bodies(router: Router, policy: Policy) -> Router {
    router.layer(axum::middleware::from_fn_with_state(policy, read_body))
}

/// Buffer a request's body within the policy's time and size.
async fn read_body(State(policy): State<Policy>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let limited = http_body_util::Limited::new(body, policy.max_body_bytes);
    let bytes = match tokio::time::timeout(policy.body_timeout, limited.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            let message = format!("the body is larger than {} bytes", policy.max_body_bytes);
            return refuse(StatusCode::PAYLOAD_TOO_LARGE, message);
        }
        Ok(Err(e)) => return refuse(StatusCode::BAD_REQUEST, format!("reading the body: {e}")),
        Err(_) => {
            let message = format!("the body did not arrive within {:?}", policy.body_timeout);
            return refuse(StatusCode::REQUEST_TIMEOUT, message);
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

fn refuse(status: StatusCode, message: String) -> Response {
    (status, Json(json!({ "message": message }))).into_response()
}

/// A warning at most every 10 s per listener, with how many were held back.
#[derive(Default)]
struct Complaints {
    last: Option<Instant>,
    held: u64,
}

impl Complaints {
    fn say(&mut self, listener: &str, what: std::fmt::Arguments<'_>) {
        if self
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_secs(10))
        {
            self.held += 1;
            return;
        }
        tracing::warn!(%listener, repeated = self.held, "{what}");
        self.last = Some(Instant::now());
        self.held = 0;
    }
}
