//! The front of a cluster host: every host serves the ingress and the
//! admin API; the owner of the partition answers from its engine, any other
//! host forwards the request to the owner.
//!
//! Why forward instead of redirect: clients (and Kafka-fed pipelines
//! behind a load balancer) reach any host and get their answer, attach
//! included, without knowing the topology. A forwarded request carries the
//! header `x-cairn-forwarded`; a host never forwards such a request again,
//! so a stale owners' directory cannot make a loop.
//!
//! Lifecycle: a standby [`Front`] forwards (503 with `retry-after` while no
//! owner is known or the owner does not answer); [`Front::serve_locally`]
//! switches it to the local engine once this host owns the partition, for
//! the rest of the process (a host never gives the partition back alive).

use crate::membership::Membership;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::sync::{Arc, OnceLock};
use tower::ServiceExt as _;

/// Marks a forwarded request.
const FORWARDED: &str = "x-cairn-forwarded";

/// Which of the host's two APIs a request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Api {
    Ingress,
    Admin,
}

/// Dispatches every request to the local engine or to the owner.
pub struct Front {
    local: OnceLock<(Router, Router)>,
    membership: Arc<Membership>,
    store: Arc<crate::store::Store>,
    client: reqwest::Client,
    max_body_bytes: usize,
    max_module_bytes: usize,
}

impl Front {
    /// A front that forwards until [`Front::serve_locally`]; `store` is
    /// this host's copy (reported by `GET /cluster`).
    pub fn new(
        membership: Arc<Membership>,
        store: Arc<crate::store::Store>,
        max_body_bytes: usize,
        max_module_bytes: usize,
    ) -> Arc<Self> {
        Arc::new(Front {
            local: OnceLock::new(),
            membership,
            store,
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .connect_timeout(std::time::Duration::from_secs(2))
                .build()
                .expect("an HTTP client builds"),
            max_body_bytes,
            max_module_bytes,
        })
    }

    /// Answer from these routers from now on.
    pub fn serve_locally(&self, ingress: Router, admin: Router) {
        let _ = self.local.set((ingress, admin));
    }

    /// The ingress router.
    pub fn ingress(self: &Arc<Self>) -> Router {
        Router::new()
            .fallback(|State(front): State<Arc<Front>>, req: Request| async move {
                front.dispatch(Api::Ingress, req).await
            })
            .with_state(self.clone())
    }

    /// The admin router: `/health` and `/cluster` are answered by every
    /// host itself.
    pub fn admin(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/health", get(|| async { "ok" }))
            .route("/cluster", get(status))
            .fallback(|State(front): State<Arc<Front>>, req: Request| async move {
                front.dispatch(Api::Admin, req).await
            })
            .with_state(self.clone())
    }

    async fn dispatch(&self, api: Api, req: Request) -> Response {
        if let Some((ingress, admin)) = self.local.get() {
            let router = match api {
                Api::Ingress => ingress.clone(),
                Api::Admin => admin.clone(),
            };
            return router.oneshot(req).await.into_response();
        }
        match self.forward(api, req).await {
            Ok(response) => response,
            Err(why) => unavailable(&why),
        }
    }

    async fn forward(&self, api: Api, req: Request) -> Result<Response, String> {
        if req.headers().contains_key(FORWARDED) {
            return Err("this host does not own the partition either (the owner moved)".into());
        }
        let owner = self
            .membership
            .owner()
            .ok_or("no host owns the partition yet")?;
        let (base, limit) = match api {
            Api::Ingress => (owner.ingress, self.max_body_bytes),
            Api::Admin => (owner.admin, self.max_module_bytes),
        };
        let (parts, body) = req.into_parts();
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let body = axum::body::to_bytes(body, limit)
            .await
            .map_err(|e| format!("reading the request body: {e}"))?;
        let mut headers = end_to_end(&parts.headers);
        headers.insert(FORWARDED, "1".parse().expect("a valid header value"));
        let answer = self
            .client
            .request(parts.method, format!("{base}{path}"))
            .headers(headers)
            .body(body)
            .send()
            .await
            .map_err(|e| format!("the owner at {base} does not answer: {e}"))?;
        let status = answer.status();
        let headers = end_to_end(answer.headers());
        let body = answer
            .bytes()
            .await
            .map_err(|e| format!("the owner at {base} broke off its answer: {e}"))?;
        let mut response = Response::new(Body::from(body));
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        Ok(response)
    }
}

/// `GET /cluster`: this host's role, the owner it knows, and how far its
/// copy of the store follows the changelog.
async fn status(State(front): State<Arc<Front>>) -> Json<serde_json::Value> {
    let m = &front.membership;
    let serving = front.local.get().is_some();
    let role = match (serving, m.is_owner()) {
        (true, _) => "owner",
        (false, true) => "taking-over",
        (false, false) => "standby",
    };
    let copy = front.store.changelog_position().ok().flatten();
    Json(serde_json::json!({
        "partition": crate::membership::PARTITION,
        "role": role,
        "this_host": m.me(),
        "owner": if serving { Some(m.me().clone()) } else { m.owner() },
        "copy": copy.map(|(next, at_head_ms)| serde_json::json!({
            "next": next,
            "at_head_ms": at_head_ms,
        })),
    }))
}

/// The headers that travel on to the next hop (not the hop-by-hop ones).
fn end_to_end(headers: &HeaderMap) -> HeaderMap {
    const HOP_BY_HOP: [&str; 9] = [
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    ];
    headers
        .iter()
        .filter(|(name, _)| !HOP_BY_HOP.contains(&name.as_str()) && *name != "content-length")
        .map(|(name, value)| (HeaderName::from(name), value.clone()))
        .collect()
}

fn unavailable(why: &str) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [("retry-after", "1")],
        Json(serde_json::json!({ "message": format!("not available on this host: {why}") })),
    )
        .into_response()
}
