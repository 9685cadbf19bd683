//! The admin API: upload modules, list what is deployed, inspect invocations.
//!
//! | request | answer |
//! |---|---|
//! | `POST /deployments` (body: component bytes) | 201 `{"id", "services"}`; 200 if already deployed; 400 with the reason |
//! | `GET /deployments` | `{"deployments": [...]}` |
//! | `GET /services` | `{"services": [...]}` with each service's current deployment |
//! | `GET /invocations/{id}` | status, target, deployment, attempts, last error, outcome, journal |
//! | `POST /invocations/{id}/cancel` | cooperative: pending operations fail with "cancelled" (409), compensation can run |
//! | `POST /invocations/{id}/kill` | completes it at once with "killed" (409), no compensation |
//! | `POST /invocations/{id}/pause`, `.../resume[?deployment=dp_...]` | stop it (keeping its journal and key) / run it again, optionally on another deployment |
//! | `POST /kafka-clusters` `{"name", "properties"}` | 201; `GET /kafka-clusters` lists them |
//! | `POST /subscriptions` `{"source": "kafka://c/topic", "sink": "service://S/h", "options"}` | 201 with the id; 409 for the same source and sink twice |
//! | `GET /subscriptions`, `GET /subscriptions/{id}` | with ingested count, rate, in-flight invocations and lag per partition |
//! | `POST /subscriptions/{id}/pause`, `.../resume`, `DELETE /subscriptions/{id}` | stop, restart, remove its consumer |
//! | `POST /schedules` `{"name", "cron", "target": "S/h" or "O/k/h", "input"}` | 201; `GET /schedules`; `DELETE /schedules/{name}` |
//! | `POST /concurrency-limits` `{"scope", "max"}`; `GET`; `DELETE ?scope=` | flow control (see `limits`) |
//! | `GET /metrics` | Prometheus text: invocations, attempts, latencies, group commits, subscriptions (see `metrics`) |
//! | `GET /metrics.json` | group-commit counters: transactions and the jobs they carried |
//! | `GET /storage` | rows per table and the sizes of the invoker's in-memory structures |
//! | `GET /health` | 200 once the host serves |
//! | `GET /ui` | the web console (see `console`) |
//! | `GET /openapi.json` | this API as an OpenAPI 3.1 document, generated from the handlers' annotations |

use crate::deployments::UploadError;
use crate::ids::InvocationId;
use crate::ingress::ApiError;
use crate::invoker::{Invoker, LiveStatus, StateEdit};
use crate::journal::{Command, CompletionValue, Entry, Outcome};
use crate::kafka::{SubscriptionError, Subscriptions};
use crate::listing::{Cursor, Filter};
use crate::records::ClusterRecord;
use crate::records::{InvocationRecord, Status};
use crate::schedules::{from_config, ScheduleError, Schedules};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use utoipa_axum::{router::OpenApiRouter, routes};

/// `router` refusing requests without `Authorization: Bearer <token>` or
/// the console's cookie (when a token is configured); `GET /health` and
/// the console's sign-in stay open, and a console page without a token
/// gets the sign-in form.
pub fn with_token(router: Router, token: Option<String>) -> Router {
    let token: Option<Arc<str>> = token.map(Arc::from);
    router.layer(axum::middleware::from_fn_with_state(token, check_token))
}

async fn check_token(
    State(token): State<Option<Arc<str>>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(token) = token else {
        return next.run(request).await;
    };
    let (method, path) = (request.method(), request.uri().path());
    let bearer = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let cookie = crate::console::cookie_token(request.headers());
    let presented = bearer.or(cookie.as_deref()).unwrap_or_default();
    if path == "/health"
        || crate::console::is_public(method, path)
        || same_secret(presented.as_bytes(), token.as_bytes())
    {
        return next.run(request).await;
    }
    if crate::console::wants_sign_in(method, path) {
        return crate::console::sign_in();
    }
    let mut response = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "the admin API needs Authorization: Bearer <admin_token>",
    )
    .into_response();
    response.headers_mut().insert(
        axum::http::header::WWW_AUTHENTICATE,
        axum::http::HeaderValue::from_static("Bearer"),
    );
    response
}

/// Compare secrets in time independent of where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The admin router.
pub fn router(
    invoker: Arc<Invoker>,
    subscriptions: Arc<Subscriptions>,
    schedules: Arc<Schedules>,
    max_module_bytes: usize,
) -> Router {
    let routes = Documented::new();
    Router::new()
        .merge(routes.core.with_state(invoker))
        .merge(routes.kafka.with_state(subscriptions))
        .merge(routes.cron.with_state(schedules))
        .route("/health", get(|| async { "ok" }))
        .route("/openapi.json", get(openapi_json))
        .merge(crate::console::router())
        .fallback(no_route)
        .layer(DefaultBodyLimit::max(max_module_bytes))
}

/// Every documented admin route, by the state it needs: the routes and the
/// OpenAPI document come from the same `#[utoipa::path]` annotations, so
/// the document cannot list a route the host does not serve.
struct Documented {
    core: OpenApiRouter<Arc<Invoker>>,
    kafka: OpenApiRouter<Arc<Subscriptions>>,
    cron: OpenApiRouter<Arc<Schedules>>,
}

impl Documented {
    fn new() -> Self {
        let core = OpenApiRouter::new()
            .routes(routes!(list_deployments, deploy))
            .routes(routes!(describe_deployment))
            .routes(routes!(list_services))
            .routes(routes!(list_invocations))
            .routes(routes!(describe_invocation, purge_invocation))
            .routes(routes!(control_invocation))
            .routes(routes!(object_state))
            .routes(routes!(set_object_state, clear_object_state))
            .routes(routes!(prometheus))
            .routes(routes!(metrics))
            .routes(routes!(storage))
            .routes(routes!(list_limits, set_limit, remove_limit));
        let kafka = OpenApiRouter::new()
            .routes(routes!(list_clusters, put_cluster))
            .routes(routes!(list_subscriptions, create_subscription))
            .routes(routes!(get_subscription, delete_subscription))
            .routes(routes!(control_subscription))
            .routes(routes!(skip_record));
        let cron = OpenApiRouter::new()
            .routes(routes!(list_schedules, put_schedule))
            .routes(routes!(delete_schedule));
        Documented { core, kafka, cron }
    }
}

/// The admin API's OpenAPI 3.1 document, built once.
pub fn openapi() -> &'static utoipa::openapi::OpenApi {
    static DOC: std::sync::OnceLock<utoipa::openapi::OpenApi> = std::sync::OnceLock::new();
    DOC.get_or_init(|| {
        let routes = Documented::new();
        let mut doc = routes.core.into_openapi();
        doc.merge(routes.kafka.into_openapi());
        doc.merge(routes.cron.into_openapi());
        doc.info.title = "Cairn admin API".into();
        doc.info.version = env!("CARGO_PKG_VERSION").into();
        doc.info.description = Some(
            "Deploy modules, find and operate invocations, edit keyed state, manage Kafka \
             subscriptions, schedules and limits. With an admin_token every route but \
             /health needs `Authorization: Bearer <token>`. Errors answer `{\"message\"}`."
                .into(),
        );
        doc
    })
}

/// `GET /openapi.json`.
pub async fn openapi_json() -> Json<&'static utoipa::openapi::OpenApi> {
    Json(openapi())
}

/// The body of every error answer (for the OpenAPI document).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
struct Message {
    /// What went wrong, and what to do about it.
    message: String,
}

/// A path the admin API does not have: a JSON answer, like the ingress's.
async fn no_route(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "no admin route for {} (the routes are listed in the README's admin API section)",
            uri.path()
        ),
    )
}

impl From<ScheduleError> for ApiError {
    fn from(e: ScheduleError) -> Self {
        let status = match e {
            ScheduleError::Invalid(_) => StatusCode::BAD_REQUEST,
            ScheduleError::NotFound(_) => StatusCode::NOT_FOUND,
            ScheduleError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

#[utoipa::path(
    post, path = "/schedules", tag = "schedules",
    request_body(content = Value, description = "A cron schedule", example = json!({"name": "nightly", "cron": "0 0 3 * * *", "target": "Reports/run", "input": {}})),
    responses((status = 201, description = "Stored (replacing one of the same name)", body = Value), (status = 400, description = "Bad cron or target", body = Message))
)]
async fn put_schedule(
    State(schedules): State<Arc<Schedules>>,
    Json(config): Json<crate::config::ScheduleConfig>,
) -> Result<Response, ApiError> {
    let record = schedules.put(from_config(&config)?).await?;
    Ok((StatusCode::CREATED, Json(schedule_json(&record))).into_response())
}

#[utoipa::path(
    get, path = "/schedules", tag = "schedules",
    responses((status = 200, description = "`{\"schedules\": [...]}`", body = Value))
)]
async fn list_schedules(State(schedules): State<Arc<Schedules>>) -> Result<Json<Value>, ApiError> {
    let all: Vec<Value> = schedules.list()?.iter().map(schedule_json).collect();
    Ok(Json(json!({ "schedules": all })))
}

#[utoipa::path(
    delete, path = "/schedules/{name}", tag = "schedules",
    params(("name" = String, Path, description = "The schedule's name")),
    responses((status = 204, description = "Removed"), (status = 404, description = "No such schedule", body = Message))
)]
async fn delete_schedule(
    State(schedules): State<Arc<Schedules>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    schedules.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn schedule_json(s: &crate::records::ScheduleRecord) -> Value {
    json!({ "name": s.name, "cron": s.cron, "target": s.target.to_string(), "input": payload(&s.input) })
}

impl From<SubscriptionError> for ApiError {
    fn from(e: SubscriptionError) -> Self {
        let status = match e {
            SubscriptionError::Invalid(_) => StatusCode::BAD_REQUEST,
            SubscriptionError::Duplicate(_) => StatusCode::CONFLICT,
            SubscriptionError::NotFound(_) => StatusCode::NOT_FOUND,
            SubscriptionError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

#[utoipa::path(
    post, path = "/kafka-clusters", tag = "kafka",
    request_body(content = Value, description = "A named Kafka cluster: librdkafka properties", example = json!({"name": "local", "properties": {"bootstrap.servers": "127.0.0.1:9092"}})),
    responses((status = 201, description = "Stored; secret properties come back as `<redacted>`", body = Value), (status = 400, description = "Invalid", body = Message))
)]
async fn put_cluster(
    State(subs): State<Arc<Subscriptions>>,
    Json(cluster): Json<ClusterRecord>,
) -> Result<Response, ApiError> {
    let shown = cluster.redacted();
    subs.put_cluster(cluster).await?;
    Ok((StatusCode::CREATED, Json(shown)).into_response())
}

#[utoipa::path(
    get, path = "/kafka-clusters", tag = "kafka",
    responses((status = 200, description = "`{\"clusters\": [...]}`, secrets redacted", body = Value))
)]
async fn list_clusters(State(subs): State<Arc<Subscriptions>>) -> Result<Json<Value>, ApiError> {
    let clusters: Vec<ClusterRecord> = subs
        .clusters()?
        .iter()
        .map(ClusterRecord::redacted)
        .collect();
    Ok(Json(json!({ "clusters": clusters })))
}

#[utoipa::path(
    post, path = "/subscriptions", tag = "kafka",
    request_body(content = Value, description = "Records of a topic become invocations of a handler", example = json!({"source": "kafka://local/orders", "sink": "service://Orders/place", "options": {"auto.offset.reset": "earliest"}})),
    responses((status = 201, description = "`{\"id\", \"source\", \"sink\"}`", body = Value), (status = 400, description = "Unknown cluster, service or handler", body = Message), (status = 409, description = "The same source and sink exist", body = Message))
)]
async fn create_subscription(
    State(subs): State<Arc<Subscriptions>>,
    Json(req): Json<crate::kafka::SubscriptionSpec>,
) -> Result<Response, ApiError> {
    let record = subs.create(req).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": record.id, "source": record.source(), "sink": record.sink() })),
    )
        .into_response())
}

#[utoipa::path(
    get, path = "/subscriptions", tag = "kafka",
    responses((status = 200, description = "`{\"subscriptions\": [...]}` with ingested, ingest_rate, in_flight, lag per partition, stopped", body = Value))
)]
async fn list_subscriptions(
    State(subs): State<Arc<Subscriptions>>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({ "subscriptions": subs.list().await? })))
}

#[utoipa::path(
    get, path = "/subscriptions/{id}", tag = "kafka", params(("id" = String, Path, description = "The subscription id (sub_...)")),
    responses((status = 200, description = "The subscription and its figures", body = Value), (status = 404, description = "No such subscription", body = Message))
)]
async fn get_subscription(
    State(subs): State<Arc<Subscriptions>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!(subs.get(&id).await?)))
}

#[utoipa::path(
    delete, path = "/subscriptions/{id}", tag = "kafka", params(("id" = String, Path, description = "The subscription id (sub_...)")),
    responses((status = 204, description = "Removed, its consumer stopped"), (status = 404, description = "No such subscription", body = Message))
)]
async fn delete_subscription(
    State(subs): State<Arc<Subscriptions>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    subs.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    post, path = "/subscriptions/{id}/{action}", tag = "kafka",
    params(("id" = String, Path, description = "The subscription id (sub_...)"), ("action" = String, Path, description = "`pause` or `resume`")),
    responses((status = 200, description = "`{\"id\", \"paused\"}`", body = Value), (status = 404, description = "No such subscription or action", body = Message))
)]
async fn control_subscription(
    State(subs): State<Arc<Subscriptions>>,
    Path((id, action)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let paused = match action.as_str() {
        "pause" => true,
        "resume" => false,
        _ => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no action {action}: use pause or resume"),
            ))
        }
    };
    let record = subs.set_paused(&id, paused).await?;
    Ok(Json(json!({ "id": record.id, "paused": record.paused })))
}

/// The record `POST /subscriptions/{id}/skip` skips.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SkipRecord {
    /// Needed when the subscription reads several topics.
    topic: Option<String>,
    partition: i32,
    offset: i64,
}

#[utoipa::path(
    post, path = "/subscriptions/{id}/skip", tag = "kafka",
    params(("id" = String, Path, description = "The subscription id (sub_...)")),
    request_body(content = Value, description = "The record the subscription stopped on", example = json!({"topic": "orders", "partition": 0, "offset": 41})),
    responses((status = 200, description = "Skipped and resumed: `{\"id\", \"paused\": false}`", body = Value), (status = 400, description = "The subscription is not stopped on that record", body = Message), (status = 404, description = "No such subscription", body = Message))
)]
async fn skip_record(
    State(subs): State<Arc<Subscriptions>>,
    Path(id): Path<String>,
    Json(skip): Json<SkipRecord>,
) -> Result<Json<Value>, ApiError> {
    let record = subs
        .skip(&id, skip.topic.as_deref(), skip.partition, skip.offset)
        .await?;
    Ok(Json(json!({ "id": record.id, "paused": record.paused })))
}

#[utoipa::path(
    post, path = "/deployments", tag = "deployments",
    request_body(content = Vec<u8>, content_type = "application/wasm", description = "A WebAssembly component built against the cairn WIT package"),
    responses((status = 201, description = "Deployed: `{\"id\", \"services\"}`", body = Value), (status = 200, description = "The same module was already deployed", body = Value), (status = 400, description = "Not a component, or it does not export the cairn handler interface", body = Message))
)]
async fn deploy(State(invoker): State<Arc<Invoker>>, body: Bytes) -> Result<Response, ApiError> {
    let known = invoker.registry().deployments().len();
    match invoker
        .registry()
        .deploy(body.to_vec(), invoker.now_ms())
        .await
    {
        Ok(record) => {
            let created = invoker.registry().deployments().len() > known;
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok((
                status,
                Json(json!({ "id": record.id, "services": record.services })),
            )
                .into_response())
        }
        Err(UploadError::Invalid(e)) => Err(ApiError::new(StatusCode::BAD_REQUEST, e.to_string())),
        Err(UploadError::Store(e)) => Err(e.into()),
    }
}

#[utoipa::path(
    post, path = "/concurrency-limits", tag = "limits",
    request_body(content = Value, example = json!({"scope": "Payments", "max": 10})),
    responses((status = 201, description = "Set", body = Value), (status = 400, description = "Bad scope", body = Message))
)]
async fn set_limit(
    State(invoker): State<Arc<Invoker>>,
    Json(limit): Json<crate::config::ConcurrencyConfig>,
) -> Result<Response, ApiError> {
    invoker.set_limit(limit.scope.clone(), limit.max).await?;
    Ok((StatusCode::CREATED, Json(limit)).into_response())
}

#[utoipa::path(
    get, path = "/concurrency-limits", tag = "limits",
    responses((status = 200, description = "`{\"limits\": [{\"scope\", \"max\", \"in_use\"}]}`", body = Value))
)]
async fn list_limits(State(invoker): State<Arc<Invoker>>) -> Json<Value> {
    let limits: Vec<Value> = invoker
        .limits()
        .into_iter()
        .map(|(scope, max, in_use)| json!({ "scope": scope, "max": max, "in_use": in_use }))
        .collect();
    Json(json!({ "limits": limits }))
}

#[utoipa::path(
    delete, path = "/concurrency-limits", tag = "limits",
    params(("scope" = String, Query, description = "The limit's scope")),
    responses((status = 204, description = "Removed"), (status = 400, description = "No scope given", body = Message))
)]
async fn remove_limit(
    State(invoker): State<Arc<Invoker>>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<StatusCode, ApiError> {
    let scope = query
        .get("scope")
        .cloned()
        .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "give ?scope="))?;
    invoker.remove_limit(scope).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /metrics`: every metric of this host in Prometheus text format
/// (see [`crate::metrics`]).
#[utoipa::path(
    get, path = "/metrics", tag = "observability",
    responses((status = 200, description = "Prometheus text format (see the README's metrics table)", body = String, content_type = "text/plain"))
)]
pub async fn prometheus() -> Response {
    let text = crate::metrics::Metrics::get().render();
    ([("content-type", "text/plain; version=0.0.4")], text).into_response()
}

/// `GET /metrics.json`: the group-commit counters of the partition.
#[utoipa::path(
    get, path = "/metrics.json", tag = "observability",
    responses((status = 200, description = "Group-commit counters", body = Value))
)]
async fn metrics(State(invoker): State<Arc<Invoker>>) -> Json<Value> {
    let (transactions, jobs) = invoker.committer().stats();
    Json(json!({ "commit_transactions": transactions, "commit_jobs": jobs }))
}

#[utoipa::path(
    get, path = "/storage", tag = "observability",
    responses((status = 200, description = "Rows per table and the sizes of the in-memory structures", body = Value))
)]
async fn storage(State(invoker): State<Arc<Invoker>>) -> Result<Json<Value>, ApiError> {
    let rows: serde_json::Map<String, Value> = invoker
        .store()
        .row_counts()?
        .into_iter()
        .map(|(table, n)| (table.to_string(), json!(n)))
        .collect();
    let [live, keys, timers, attempts, watched] = invoker.footprint();
    Ok(Json(json!({
        "rows": rows,
        "memory": {
            "live": live,
            "busy_keys": keys,
            "timers": timers,
            "fenced_attempts": attempts,
            "watched": watched,
        },
    })))
}

#[utoipa::path(
    get, path = "/deployments", tag = "deployments",
    responses((status = 200, description = "`{\"deployments\": [...]}`", body = Value))
)]
async fn list_deployments(State(invoker): State<Arc<Invoker>>) -> Json<Value> {
    let deployments: Vec<Value> = invoker
        .registry()
        .deployments()
        .iter()
        .map(deployment_json)
        .collect();
    Json(json!({ "deployments": deployments }))
}

/// `GET /deployments/{id}`.
#[utoipa::path(
    get, path = "/deployments/{id}", tag = "deployments",
    params(("id" = String, Path, description = "The deployment id (dp_...)")),
    responses((status = 200, description = "The deployment, its services and handlers", body = Value), (status = 404, description = "No such deployment", body = Message))
)]
async fn describe_deployment(
    State(invoker): State<Arc<Invoker>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let deployments = invoker.registry().deployments();
    let found = deployments.iter().find(|d| d.id.as_str() == id);
    found
        .map(|d| Json(deployment_json(d)))
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("deployment {id} not found")))
}

/// A deployment as the admin API shows it.
fn deployment_json(d: &crate::records::DeploymentRecord) -> Value {
    json!({
        "id": d.id,
        "services": d.services.iter().map(service_json).collect::<Vec<_>>(),
        "created_at": rfc3339(d.created_ms),
        "created_ms": d.created_ms,
        "size": d.size,
    })
}

#[utoipa::path(
    get, path = "/services", tag = "deployments",
    responses((status = 200, description = "`{\"services\": [...]}`, each with its kind, handlers and current deployment", body = Value))
)]
async fn list_services(State(invoker): State<Arc<Invoker>>) -> Json<Value> {
    let services: Vec<Value> = invoker
        .registry()
        .services()
        .into_iter()
        .map(|(s, deployment)| {
            let mut v = service_json(&s);
            v["deployment"] = json!(deployment);
            v
        })
        .collect();
    Json(json!({ "services": services }))
}

/// A service and its handlers as the admin API shows them.
fn service_json(s: &crate::records::ServiceInfo) -> Value {
    // A service's handlers run concurrently, with no key to hold:
    // "exclusive" or "shared" would mislead there.
    let handlers: Vec<Value> = s
        .handlers
        .iter()
        .map(|h| match s.kind {
            crate::records::ServiceKind::Service => json!({ "name": h.name }),
            _ => json!({ "name": h.name, "kind": h.kind }),
        })
        .collect();
    json!({ "name": s.name, "kind": s.kind, "handlers": handlers })
}

/// Every status the admin API shows, and the class the listing indexes
/// it under.
const STATUSES: [(&str, &str); 12] = [
    ("unfinished", "unfinished"),
    ("scheduled", "unfinished"),
    ("pending", "unfinished"),
    ("ready", "unfinished"),
    ("running", "unfinished"),
    ("backing-off", "unfinished"),
    ("suspended", "unfinished"),
    ("paused", "paused"),
    ("succeeded", "succeeded"),
    ("failed", "failed"),
    ("killed", "killed"),
    ("cancelled", "cancelled"),
];

/// `GET /invocations`: a page of invocations, newest first, filtered by
/// service, handler, key, status, deployment and creation time (see
/// [`crate::listing`]), and the cursor of the next page.
#[utoipa::path(
    get, path = "/invocations", tag = "invocations",
    params(
        ("service" = Option<String>, Query, description = "Only this service's invocations"),
        ("handler" = Option<String>, Query, description = "Only this handler's"),
        ("key" = Option<String>, Query, description = "Only this key's (needs service)"),
        ("status" = Option<String>, Query, description = "unfinished, scheduled, pending, ready, running, backing-off, suspended, paused, succeeded, failed, killed or cancelled"),
        ("deployment" = Option<String>, Query, description = "Only those pinned to this deployment"),
        ("created_after" = Option<String>, Query, description = "RFC 3339 or ms since the epoch"),
        ("created_before" = Option<String>, Query, description = "RFC 3339 or ms since the epoch"),
        ("limit" = Option<usize>, Query, description = "Page size, 1 to 1000 (default 100)"),
        ("cursor" = Option<String>, Query, description = "The previous page's next_cursor"),
    ),
    responses((status = 200, description = "Newest first from the listing indexes: `{\"invocations\": [...], \"next_cursor\"}`; a page may be short with a cursor when the filter is selective", body = Value), (status = 400, description = "A bad filter", body = Message))
)]
async fn list_invocations(
    State(invoker): State<Arc<Invoker>>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let bad = |message: String| ApiError::new(StatusCode::BAD_REQUEST, message);
    let limit = match query.get("limit") {
        None => 100,
        Some(n) => n
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| bad("limit must be 1 to 1000".into()))?,
    };
    let status = query.get("status").map(String::as_str);
    let class = match status {
        None => None,
        Some(s) => Some(
            STATUSES
                .iter()
                .find(|(name, _)| *name == s)
                .map(|(_, c)| *c)
                .ok_or_else(|| {
                    let names: Vec<&str> = STATUSES.iter().map(|(n, _)| *n).collect();
                    bad(format!(
                        "unknown status {s:?}: use one of {}",
                        names.join(", ")
                    ))
                })?,
        ),
    };
    let time = |name: &str| {
        query
            .get(name)
            .map(|v| time_ms(v).map_err(|e| bad(format!("{name}: {e}"))))
            .transpose()
    };
    let filter = Filter {
        service: query.get("service").cloned(),
        handler: query.get("handler").cloned(),
        key: query.get("key").cloned(),
        class: class.map(String::from),
        deployment: query.get("deployment").cloned(),
        created_after_ms: time("created_after")?,
        created_before_ms: time("created_before")?,
    };
    if filter.key.is_some() && filter.service.is_none() {
        return Err(bad("key needs service (keys are per service)".into()));
    }
    let cursor = query
        .get("cursor")
        .map(|c| c.parse::<Cursor>())
        .transpose()
        .map_err(bad)?;
    let now = invoker.now_ms();
    let fine = status.filter(|s| !matches!(*s, "unfinished") && class != Some(*s));
    let page = invoker.store().list(
        &filter,
        |r| fine.is_none_or(|s| status_name(r, invoker.live_status(&r.id), now) == s),
        limit,
        cursor.as_ref(),
    )?;
    let listed: Vec<Value> = page
        .invocations
        .iter()
        .map(|r| {
            json!({
                "id": r.id,
                "target": r.target.to_string(),
                "service": r.target.service,
                "handler": r.target.handler,
                "key": r.target.key,
                "status": status_name(r, invoker.live_status(&r.id), now),
                "deployment": r.deployment,
                "attempts": r.attempts,
                "last_error": r.last_error,
                "failure": match &r.outcome {
                    Some(Outcome::Failure { code, message }) => json!({ "code": code, "message": message }),
                    _ => Value::Null,
                },
                "created_at": rfc3339(r.created_ms),
                "created_at_ms": r.created_ms,
                "completed_at": r.completed_ms.map(rfc3339),
            })
        })
        .collect();
    Ok(Json(json!({
        "invocations": listed,
        "next_cursor": page.next.map(|c| c.to_string()),
    })))
}

/// A time given as ms since the epoch or in RFC 3339.
fn time_ms(value: &str) -> Result<u64, String> {
    if let Ok(ms) = value.parse::<u64>() {
        return Ok(ms);
    }
    let at = humantime::parse_rfc3339_weak(value)
        .map_err(|e| format!("{value:?} is neither ms since the epoch nor RFC 3339 ({e})"))?;
    Ok(at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64))
}

/// An invocation id from a path; 400 if it is not one.
fn invocation_id(id: &str) -> Result<InvocationId, ApiError> {
    id.parse()
        .map_err(|e: String| ApiError::new(StatusCode::BAD_REQUEST, e))
}

/// Ms since the epoch in RFC 3339 (UTC, milliseconds).
pub fn rfc3339(ms: u64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(at).to_string()
}

#[utoipa::path(
    get, path = "/invocations/{id}", tag = "invocations", params(("id" = String, Path, description = "The invocation id (inv_...)")),
    responses((status = 200, description = "Status, target, times (RFC 3339), input, outcome and the journal, each completion naming the command it answers", body = Value), (status = 404, description = "No such invocation", body = Message))
)]
async fn describe_invocation(
    State(invoker): State<Arc<Invoker>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = invocation_id(&id)?;
    let record = invoker.store().invocation(&id)?.ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, format!("invocation {id} not found"))
    })?;
    let journal = invoker.store().journal(&id)?;
    let status = status_name(&record, invoker.live_status(&id), invoker.now_ms());
    // Completions name their command by its number among the commands.
    let commands: Vec<String> = journal
        .iter()
        .filter_map(|(_, e)| match e {
            Entry::Command(c) => Some(c.signature()),
            Entry::Completion(_) => None,
        })
        .collect();
    Ok(Json(json!({
        "id": record.id,
        "target": record.target.to_string(),
        "service": record.target.service,
        "handler": record.target.handler,
        "key": record.target.key,
        "status": status,
        "deployment": record.deployment,
        "attempts": record.attempts,
        "last_error": record.last_error,
        "idempotency_key": record.idempotency_key,
        "input": payload(&record.input),
        "created_at": rfc3339(record.created_ms),
        "created_at_ms": record.created_ms,
        "start_at": record.start_at_ms.map(rfc3339),
        "completed_at": record.completed_ms.map(rfc3339),
        "caller": record.caller.as_ref().map(|c| c.id.to_string()),
        "cancelled": record.cancelled,
        "outcome": record.outcome.as_ref().map(outcome_json),
        "journal": journal.iter().map(|(i, e)| entry_json(*i, e, &commands)).collect::<Vec<_>>(),
    })))
}

/// `GET /objects/{service}/{key}/state`: every entry of a key's state, as
/// committed (JSON values as JSON).
#[utoipa::path(
    get, path = "/objects/{service}/{key}/state", tag = "state", params(("service" = String, Path, description = "A virtual object or workflow"), ("key" = String, Path, description = "The key")),
    responses((status = 200, description = "`{\"service\", \"key\", \"state\": {name: value}}` as committed", body = Value), (status = 400, description = "A plain service has no state", body = Message), (status = 404, description = "No such service", body = Message))
)]
async fn object_state(
    State(invoker): State<Arc<Invoker>>,
    Path((service, key)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    keyed_service(&invoker, &service)?;
    let entries = invoker.store().state_entries(&service, &key)?;
    let state: serde_json::Map<String, Value> = entries
        .iter()
        .map(|(name, value)| (name.clone(), payload(value)))
        .collect();
    Ok(Json(
        json!({ "service": service, "key": key, "state": state }),
    ))
}

/// `PUT /objects/{service}/{key}/state/{name}` (body: the JSON value).
#[utoipa::path(
    put, path = "/objects/{service}/{key}/state/{name}", tag = "state", params(("service" = String, Path, description = "A virtual object or workflow"), ("key" = String, Path, description = "The key"), ("name" = String, Path, description = "The state entry's name")),
    request_body(content = Value, description = "The new value, as JSON", example = json!(42)),
    responses((status = 200, description = "Applied, as an exclusive invocation of the key (it waited for the key's queue)", body = Value), (status = 400, description = "Not JSON, or a plain service", body = Message), (status = 404, description = "No such service", body = Message))
)]
async fn set_object_state(
    State(invoker): State<Arc<Invoker>>,
    Path((service, key, name)): Path<(String, String, String)>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let value: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the body must be the new value as JSON: {e}"),
        )
    })?;
    edit_state(&invoker, service, key, name, Some(value)).await
}

/// `DELETE /objects/{service}/{key}/state/{name}`.
#[utoipa::path(
    delete, path = "/objects/{service}/{key}/state/{name}", tag = "state", params(("service" = String, Path, description = "A virtual object or workflow"), ("key" = String, Path, description = "The key"), ("name" = String, Path, description = "The state entry's name")),
    responses((status = 200, description = "Cleared, as an exclusive invocation of the key", body = Value), (status = 404, description = "No such service", body = Message))
)]
async fn clear_object_state(
    State(invoker): State<Arc<Invoker>>,
    Path((service, key, name)): Path<(String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    edit_state(&invoker, service, key, name, None).await
}

/// Edit a key's state through its queue ([`crate::invoker::EDIT_STATE`])
/// and answer once the edit is applied.
async fn edit_state(
    invoker: &Arc<Invoker>,
    service: String,
    key: String,
    name: String,
    value: Option<Value>,
) -> Result<Json<Value>, ApiError> {
    let edit = StateEdit { name, value };
    let target = crate::records::Target {
        service: service.clone(),
        handler: String::new(),
        key: Some(key.clone()),
    };
    let submitted = invoker.submit_state_edit(target, &edit).await?;
    match invoker.attach(&submitted.id).await? {
        Some(Outcome::Success(_)) => Ok(Json(json!({
            "service": service,
            "key": key,
            "name": edit.name,
            "value": edit.value,
            "invocation": submitted.id,
        }))),
        Some(Outcome::Failure { code, message }) => Err(ApiError::new(
            StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            format!("the edit {} failed: {message}", submitted.id),
        )),
        None => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the edit {} is queued; it was not answered here",
                submitted.id
            ),
        )),
    }
}

/// 404 for an unknown service, 400 for one without keys (no state).
fn keyed_service(invoker: &Invoker, service: &str) -> Result<(), ApiError> {
    match invoker.registry().service(service) {
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("service {service} not found"),
        )),
        Some((info, _)) if info.kind == crate::records::ServiceKind::Service => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{service} is a service: only virtual objects and workflows have state"),
        )),
        Some(_) => Ok(()),
    }
}

/// `DELETE /invocations/{id}`: forget a finished invocation now (its
/// journal, idempotency key and, for a workflow, its state and promises).
#[utoipa::path(
    delete, path = "/invocations/{id}", tag = "invocations", params(("id" = String, Path, description = "The invocation id (inv_...)")),
    responses((status = 200, description = "Forgotten: its journal, idempotency key and (for a workflow) state and promises", body = Value), (status = 404, description = "No such invocation", body = Message), (status = 409, description = "It has not finished", body = Message))
)]
async fn purge_invocation(
    State(invoker): State<Arc<Invoker>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = invocation_id(&id)?;
    invoker.purge(&id).await?;
    Ok(Json(json!({ "id": id, "purged": true })))
}

#[utoipa::path(
    post, path = "/invocations/{id}/{action}", tag = "invocations",
    params(("id" = String, Path, description = "The invocation id (inv_...)"), ("action" = String, Path, description = "cancel, kill, pause or resume"),
        ("deployment" = Option<String>, Query, description = "resume only: run it on this deployment")),
    responses((status = 200, description = "Done: `{\"id\", \"action\"}`", body = Value), (status = 404, description = "No such invocation or action", body = Message), (status = 409, description = "It has finished", body = Message))
)]
async fn control_invocation(
    State(invoker): State<Arc<Invoker>>,
    Path((id, action)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let bad = |e: String| ApiError::new(StatusCode::BAD_REQUEST, e);
    let id: InvocationId = id.parse().map_err(bad)?;
    let deployment = query
        .get("deployment")
        .map(|d| d.parse())
        .transpose()
        .map_err(bad)?;
    match action.as_str() {
        "cancel" => invoker.cancel(&id).await?,
        "kill" => invoker.kill(&id).await?,
        "pause" => invoker.pause_now(&id).await?,
        "resume" => invoker.resume(&id, deployment).await?,
        _ => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no action {action}: use cancel, kill, pause or resume"),
            ))
        }
    }
    Ok(Json(json!({ "id": id, "action": action })))
}

fn status_name(record: &InvocationRecord, live: Option<LiveStatus>, now_ms: u64) -> &'static str {
    match (record.status, live) {
        (Status::Completed | Status::Paused, _) => record.status_class(),
        (Status::Ready, Some(LiveStatus::Running)) => "running",
        (Status::Ready, Some(LiveStatus::BackingOff)) => "backing-off",
        (Status::Ready, Some(LiveStatus::Pending)) => "pending",
        (Status::Ready, Some(LiveStatus::Suspended)) => "suspended",
        (Status::Ready, _) if record.start_at_ms.is_some_and(|at| at > now_ms) => "scheduled",
        (Status::Ready, _) => "ready",
    }
}

/// A payload as JSON when it is JSON, else as text.
fn payload(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|_| json!(String::from_utf8_lossy(bytes)))
}

fn outcome_json(o: &Outcome) -> Value {
    match o {
        Outcome::Success(v) => json!({ "success": payload(v) }),
        Outcome::Failure { code, message } => {
            json!({ "failure": { "code": code, "message": message } })
        }
    }
}

/// A journal entry for a person: a command with its payload, a completion
/// with the command it answers.
fn entry_json(index: u32, entry: &Entry, commands: &[String]) -> Value {
    match entry {
        Entry::Command(c) => {
            let mut v = json!({ "index": index, "type": "command", "command": c.signature() });
            match c {
                Command::SetState { value, .. } => v["value"] = payload(value),
                Command::Call { input, callee, .. } => {
                    v["input"] = payload(input);
                    v["callee"] = json!(callee);
                }
                Command::Send {
                    input, delay_ms, ..
                } => {
                    v["input"] = payload(input);
                    v["delay_ms"] = json!(delay_ms);
                }
                Command::Sleep { wake_at_ms } => v["wake_at"] = json!(rfc3339(*wake_at_ms)),
                Command::CompleteAwakeable { outcome, .. }
                | Command::CompletePromise { outcome, .. } => v["outcome"] = outcome_json(outcome),
                Command::Produce { .. } | Command::SendRecord(_) => {
                    if let Some(record) = c.kafka_record() {
                        v["value"] = payload(&record.value);
                    }
                }
                _ => {}
            }
            v
        }
        Entry::Completion(c) => {
            let value = match &c.value {
                CompletionValue::State(v) => json!({ "state": v.as_deref().map(payload) }),
                CompletionValue::StateKeys(k) => json!({ "state_keys": k }),
                CompletionValue::Outcome(o) => outcome_json(o),
                CompletionValue::MaybeOutcome(o) => json!({ "peek": o.as_ref().map(outcome_json) }),
                CompletionValue::Id(id) => json!({ "id": id }),
                CompletionValue::Time(ms) => json!({ "time": rfc3339(*ms), "time_ms": ms }),
            };
            json!({
                "index": index,
                "type": "completion",
                "for_command": c.command,
                "answers": commands.get(c.command as usize),
                "value": value,
            })
        }
    }
}
