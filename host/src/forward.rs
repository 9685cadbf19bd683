//! The front of a cluster host: every host serves the ingress and the
//! admin API for every partition; a partition this host owns answers from
//! its engine, any other is forwarded to its owner.
//!
//! Why forward instead of redirect: clients (and Kafka-fed pipelines
//! behind a load balancer) reach any host and get their answer, attach
//! included, without knowing the topology. A forwarded request carries the
//! header `x-cairn-forwarded`; a host never forwards such a request again,
//! so a stale owners' directory cannot make a loop.
//!
//! Which partition a request is for ([`crate::partition`]): an invocation
//! id or awakeable id names its partition; a call of a keyed service goes
//! to its key's partition (so does an admin request for a key's state), a
//! call of a service to its idempotency key's, or to a partition this host
//! owns; every other admin request (deployments,
//! Kafka, limits, schedules) to partition 0, unless the header
//! `x-cairn-partition` names one; `GET /invocations` lists every
//! partition's page, merged. An upload (or a Kafka cluster's
//! registration) is answered once every partition has it (partition 0
//! sends it to the others), so a call right after it finds the service
//! (or the cluster) everywhere.
//!
//! Lifecycle: every partition is forwarded (503 with `retry-after` while
//! no owner is known or the owner does not answer) until
//! [`Front::serve_locally`]; [`Front::stop_serving`] forwards it again
//! once the partition moved away. A local request runs as a task of its
//! partition's runtime, so a hand-over (which shuts that runtime down)
//! ends it with the rest of the partition's work: it answers 503, and no
//! request of a moved partition waits on its stopped writer.

use crate::ids::{parse_awakeable_id, InvocationId};
use crate::membership::Membership;
use crate::partition::{hash, key_hash};
use crate::records::ServiceKind;
use crate::store::Store;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tower::ServiceExt as _;

/// Marks a forwarded request.
const FORWARDED: &str = "x-cairn-forwarded";

/// Least time between two readings of the service kinds from the stores.
const KINDS_REREAD: Duration = Duration::from_millis(200);

/// Names the partition an admin request is for.
pub const PARTITION_HEADER: &str = "x-cairn-partition";

/// How long the creation of a deployment or a Kafka cluster waits for
/// every partition to have it.
const SPREAD: Duration = Duration::from_secs(30);

/// Something partition 0 holds for every partition, as the admin API
/// lists it.
#[derive(Clone, Copy)]
struct Shared {
    /// Where it is listed.
    path: &'static str,
    /// The list's field in the answer.
    list: &'static str,
    /// The field naming one, in the list and in the creation's answer.
    key: &'static str,
}

impl Shared {
    const DEPLOYMENTS: Shared = Shared {
        path: "/deployments",
        list: "deployments",
        key: "id",
    };
    const KAFKA_CLUSTERS: Shared = Shared {
        path: "/kafka-clusters",
        list: "clusters",
        key: "name",
    };
}

/// Which of the host's two APIs a request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Api {
    Ingress,
    Admin,
}

/// A partition this host serves: its engine's routers and the runtime
/// its requests run on.
#[derive(Clone)]
pub struct Served {
    /// The engine's ingress.
    pub ingress: Router,
    /// The engine's admin API.
    pub admin: Router,
    /// The partition's runtime.
    pub runtime: tokio::runtime::Handle,
}

/// Dispatches every request to a local engine or to the owner.
pub struct Front {
    local: RwLock<BTreeMap<u32, Served>>,
    membership: Arc<Membership>,
    stores: Vec<Arc<Store>>,
    /// Service kinds, from this host's copies of the deployments.
    kinds: RwLock<HashMap<String, ServiceKind>>,
    /// When the kinds were last read from the stores.
    kinds_read: std::sync::Mutex<Option<Instant>>,
    spread: AtomicU32,
    client: reqwest::Client,
    max_body_bytes: usize,
    max_module_bytes: usize,
}

impl Front {
    /// A front that forwards every partition until it is served locally;
    /// `stores` are this host's copies, by partition (reported by
    /// `GET /cluster`).
    pub fn new(
        membership: Arc<Membership>,
        stores: Vec<Arc<Store>>,
        max_body_bytes: usize,
        max_module_bytes: usize,
    ) -> Arc<Self> {
        Arc::new(Front {
            local: RwLock::default(),
            membership,
            stores,
            kinds: RwLock::default(),
            kinds_read: std::sync::Mutex::default(),
            spread: AtomicU32::new(0),
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .connect_timeout(Duration::from_secs(2))
                .build()
                .expect("an HTTP client builds"),
            max_body_bytes,
            max_module_bytes,
        })
    }

    /// Answer partition `p` from its engine from now on.
    pub fn serve_locally(&self, p: u32, served: Served) {
        self.local.write().unwrap().insert(p, served);
    }

    /// Forward partition `p` again (it moved to another host).
    pub fn stop_serving(&self, p: u32) {
        self.local.write().unwrap().remove(&p);
    }

    /// The ingress router.
    pub fn ingress(self: &Arc<Self>) -> Router {
        Router::new()
            .fallback(|State(front): State<Arc<Front>>, req: Request| async move {
                front.dispatch(Api::Ingress, req).await
            })
            .with_state(self.clone())
    }

    /// The admin router: `/health`, `/cluster`, `/metrics` and the console
    /// (`/ui`) are answered by every host itself (its metrics cover the
    /// partitions it serves).
    pub fn admin(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/health", get(|| async { "ok" }))
            .route("/cluster", get(status))
            .route("/metrics", get(crate::admin::prometheus))
            .route("/openapi.json", get(crate::admin::openapi_json))
            .merge(crate::console::router())
            .fallback(|State(front): State<Arc<Front>>, req: Request| async move {
                front.dispatch(Api::Admin, req).await
            })
            .with_state(self.clone())
    }

    async fn dispatch(&self, api: Api, req: Request) -> Response {
        let everywhere = api == Api::Admin
            && req.method() == Method::GET
            && req.uri().path().trim_end_matches('/') == "/invocations"
            && !req.headers().contains_key(PARTITION_HEADER)
            && self.membership.partitions() > 1;
        if everywhere {
            return self.list_everywhere(req).await;
        }
        let p = self.partition_of(api, &req);
        let shared = match (api, req.method(), req.uri().path().trim_end_matches('/')) {
            (Api::Admin, &Method::POST, "/deployments") => Some(Shared::DEPLOYMENTS),
            (Api::Admin, &Method::POST, "/kafka-clusters") => Some(Shared::KAFKA_CLUSTERS),
            _ => None,
        };
        let response = self.dispatch_to(api, p, req).await;
        match shared {
            Some(shared) if response.status().is_success() => self.spread(shared, response).await,
            _ => response,
        }
    }

    async fn dispatch_to(&self, api: Api, p: u32, req: Request) -> Response {
        let local = self.local.read().unwrap().get(&p).cloned();
        if let Some(served) = local {
            let router = match api {
                Api::Ingress => served.ingress,
                Api::Admin => served.admin,
            };
            return match served.runtime.spawn(router.oneshot(req)).await {
                Ok(response) => response.into_response(),
                Err(_) => unavailable(&format!("partition {p} moved while answering")),
            };
        }
        match self.forward(api, p, req).await {
            Ok(response) => response,
            Err(why) => unavailable(&why),
        }
    }

    /// The partition a request is for (see the module docs).
    fn partition_of(&self, api: Api, req: &Request) -> u32 {
        let count = self.membership.partitions();
        // Clients may name the partition of an admin request; an ingress
        // request's is named by the host that forwarded it.
        let trusted = api == Api::Admin || req.headers().contains_key(FORWARDED);
        let named = req
            .headers()
            .get(PARTITION_HEADER)
            .filter(|_| trusted)
            .and_then(|v| v.to_str().ok()?.parse::<u32>().ok())
            .filter(|&p| p < count);
        if let Some(p) = named {
            return p;
        }
        let path = req.uri().path();
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let key = match (api, segments.as_slice()) {
            (Api::Admin, ["invocations", id, ..])
            | (Api::Ingress, ["restate", "invocation" | "attach" | "output", id, ..]) => {
                id.parse::<InvocationId>().ok().map(|id| id.partition_key())
            }
            (Api::Ingress, ["restate", "awakeables" | "a", id, ..]) => {
                parse_awakeable_id(id).map(|(id, _)| id.partition_key())
            }
            (Api::Ingress, ["restate", "workflow", name, id, ..])
            | (Api::Admin, ["objects", name, id, ..]) => {
                let decoded = |s: &str| {
                    percent_encoding::percent_decode_str(s)
                        .decode_utf8()
                        .ok()
                        .map(|s| s.into_owned())
                };
                decoded(name)
                    .zip(decoded(id))
                    .map(|(name, id)| key_hash(&name, &id))
            }
            (Api::Ingress, _) => self.call_key(path, req.headers()),
            (Api::Admin, _) => Some(0),
        };
        key.map_or_else(|| self.any_partition(), |key| key % count)
    }

    /// The partition key of a call: its key's, its idempotency key's, or
    /// none (any partition will do).
    fn call_key(&self, path: &str, headers: &HeaderMap) -> Option<u32> {
        let call = crate::ingress::call_of(path, |service| self.kind(service)).ok()?;
        let target = call.target;
        match (&target.key, crate::ingress::idempotency_key(headers).ok()?) {
            (Some(key), _) => Some(key_hash(&target.service, key)),
            (None, Some(idempotency)) => Some(hash(
                format!("{}/{}/{idempotency}", target.service, target.handler).as_bytes(),
            )),
            (None, None) => None,
        }
    }

    /// A partition for a request any partition can serve: one of this
    /// host's, in turn, else any.
    fn any_partition(&self) -> u32 {
        let turn = self.spread.fetch_add(1, Ordering::Relaxed);
        let local: Vec<u32> = self.local.read().unwrap().keys().copied().collect();
        match local.is_empty() {
            true => turn % self.membership.partitions(),
            false => local[turn as usize % local.len()],
        }
    }

    /// A service's kind, from the deployments in this host's copies (read
    /// again when a service is not known yet, at most every
    /// [`KINDS_REREAD`]: requests for unknown services cannot make the
    /// host read its stores at their rate).
    fn kind(&self, service: &str) -> Option<ServiceKind> {
        if let Some(kind) = self.kinds.read().unwrap().get(service) {
            return Some(*kind);
        }
        {
            let mut read = self.kinds_read.lock().unwrap();
            if read.is_some_and(|at| at.elapsed() < KINDS_REREAD) {
                return None;
            }
            *read = Some(Instant::now());
        }
        let mut kinds = self.kinds.write().unwrap();
        for store in &self.stores {
            for deployment in store.deployments().unwrap_or_default() {
                for s in deployment.services {
                    kinds.insert(s.name, s.kind);
                }
            }
        }
        kinds.get(service).copied()
    }

    /// `GET /invocations` over every partition: each answers a page of the
    /// same filter and cursor, merged into one ([`crate::listing::merge`]).
    async fn list_everywhere(&self, req: Request) -> Response {
        let uri = req.uri().clone();
        let limit = uri
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("limit=")))
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(100);
        let mut pages = Vec::new();
        for p in 0..self.membership.partitions() {
            let request = Request::builder()
                .uri(uri.clone())
                .header(PARTITION_HEADER, p)
                .body(Body::empty())
                .expect("a valid request");
            let response = self.dispatch_to(Api::Admin, p, request).await;
            if !response.status().is_success() {
                return response;
            }
            let Ok(body) = axum::body::to_bytes(response.into_body(), self.max_body_bytes).await
            else {
                return unavailable(&format!("partition {p}'s list broke off"));
            };
            let mut page = serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default();
            let next = page["next_cursor"].as_str().and_then(|c| c.parse().ok());
            let invocations = page["invocations"].take();
            let invocations = serde_json::from_value(invocations).unwrap_or_default();
            pages.push((invocations, next));
        }
        let (invocations, next) = crate::listing::merge(pages, limit);
        Json(serde_json::json!({
            "invocations": invocations,
            "next_cursor": next.map(|c| c.to_string()),
        }))
        .into_response()
    }

    /// Answer the creation of something every partition holds once every
    /// partition lists it (at most [`SPREAD`]; it gets there later in any
    /// case).
    async fn spread(&self, shared: Shared, response: Response) -> Response {
        let (parts, body) = response.into_parts();
        let Ok(body) = axum::body::to_bytes(body, self.max_body_bytes).await else {
            return unavailable("the answer broke off");
        };
        let name = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get(shared.key)?.as_str().map(String::from));
        if let Some(name) = name {
            let deadline = Instant::now() + SPREAD;
            for p in 1..self.membership.partitions() {
                while !self.lists(p, shared, &name).await && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        Response::from_parts(parts, Body::from(body))
    }

    /// Whether partition `p` lists `name` among its `shared` things.
    async fn lists(&self, p: u32, shared: Shared, name: &str) -> bool {
        let request = Request::builder()
            .uri(shared.path)
            .body(Body::empty())
            .expect("a valid request");
        let response = self.dispatch_to(Api::Admin, p, request).await;
        let Ok(body) = axum::body::to_bytes(response.into_body(), self.max_body_bytes).await else {
            return false;
        };
        let listed = serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default();
        listed[shared.list]
            .as_array()
            .is_some_and(|all| all.iter().any(|one| one[shared.key] == name))
    }

    async fn forward(&self, api: Api, p: u32, req: Request) -> Result<Response, String> {
        if req.headers().contains_key(FORWARDED) {
            return Err(format!(
                "this host does not own partition {p} either (the owner moved)"
            ));
        }
        let owner = self
            .membership
            .owner(p)
            .ok_or_else(|| format!("no host owns partition {p} yet"))?;
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
        headers.insert(PARTITION_HEADER, p.into());
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

/// `GET /cluster`: per partition, this host's role, the owner it knows,
/// and how far its copy of the partition's store follows the changelog.
async fn status(State(front): State<Arc<Front>>) -> Json<serde_json::Value> {
    let m = &front.membership;
    let local = front.local.read().unwrap().clone();
    let partitions: Vec<serde_json::Value> = front
        .stores
        .iter()
        .enumerate()
        .map(|(p, store)| {
            let p = p as u32;
            let serving = local.contains_key(&p);
            let role = match (serving, m.is_owner(p)) {
                (true, _) => "owner",
                (false, true) => "taking-over",
                (false, false) => "standby",
            };
            let copy = store.changelog_position().ok().flatten();
            serde_json::json!({
                "partition": p,
                "role": role,
                "owner": if serving { Some(m.me().clone()) } else { m.owner(p) },
                "copy": copy.map(|(next, at_head_ms)| serde_json::json!({
                    "next": next,
                    "at_head_ms": at_head_ms,
                })),
            })
        })
        .collect();
    Json(serde_json::json!({
        "this_host": m.me(),
        "partitions": partitions,
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
