//! The HTTP ingress, shaped like Restate's so that Restate clients work.
//!
//! | request | answer |
//! |---|---|
//! | `POST /{Service}/{handler}` | run, answer with the output (`x-restate-id` header) |
//! | `POST /{Object}/{key}/{handler}` | the same for a keyed service |
//! | `.../send` (`?delay=10s` or `PT10S`) | enqueue: 202 `{"invocationId", "status": "Accepted"}` |
//! | `GET /restate/invocation/{id}/attach`, `/restate/attach/{id}` | wait for and return the result |
//! | `GET /restate/invocation/{id}/output`, `/restate/output/{id}` | the result, or 470 not ready |
//! | `POST /restate/awakeables/{id}/resolve` (JSON), `.../reject` (text); also `/restate/a/{id}/...` | 202; 404 unknown; 409 already completed |
//! | `GET /restate/workflow/{Name}/{id}/attach`, `.../output` | the workflow run's result |
//!
//! An `idempotency-key` header makes a request run once per target and key:
//! a repeat returns the first invocation's result (or `"PreviouslyAccepted"`
//! for `/send`). Nothing is answered before the invocation is durable.

use crate::ids::InvocationId;
use crate::invoker::{ControlError, Invoker, NewInvocation, SubmitError};
use crate::journal::Outcome;
use crate::records::{ServiceKind, Target};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Restate's status for "the invocation has no output yet".
const NOT_READY: u16 = 470;

/// The ingress router.
pub fn router(invoker: Arc<Invoker>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/restate/invocation/{id}/{op}", get(invocation_op))
        .route("/restate/attach/{id}", get(attach))
        .route("/restate/output/{id}", get(output))
        .route("/restate/awakeables/{id}/{op}", post(complete_awakeable))
        .route("/restate/a/{id}/{op}", post(complete_awakeable))
        .route("/restate/workflow/{name}/{id}/{op}", get(workflow_op))
        .fallback(call)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(invoker)
}

/// An error answer: status and `{"message": ...}`.
pub struct ApiError(StatusCode, String);

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError(status, message.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "message": self.1 }))).into_response()
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        let status = match e {
            SubmitError::UnknownService(_) | SubmitError::UnknownHandler(..) => {
                StatusCode::NOT_FOUND
            }
            SubmitError::WrongKeying(_) => StatusCode::BAD_REQUEST,
            SubmitError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            SubmitError::Moved => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError(status, e.to_string())
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        let status = match e {
            ControlError::NotFound(_) => StatusCode::NOT_FOUND,
            ControlError::Conflict(_) => StatusCode::CONFLICT,
            ControlError::Invalid(_) => StatusCode::BAD_REQUEST,
        };
        ApiError(status, e.to_string())
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

/// A parsed invocation path.
pub struct Call {
    /// Who is called.
    pub target: Target,
    /// Whether the caller does not wait (`/send`).
    pub send: bool,
}

fn parse_call(invoker: &Invoker, uri: &Uri) -> Result<Call, ApiError> {
    call_of(uri.path(), |service| {
        invoker
            .registry()
            .service(service)
            .map(|(info, _)| info.kind)
    })
}

/// The call a request path names (`/Service/handler[/send]`,
/// `/Object/key/handler[/send]`), given the kinds of services.
pub fn call_of(path: &str, kind: impl Fn(&str) -> Option<ServiceKind>) -> Result<Call, ApiError> {
    let segments = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(decode_segment)
        .collect::<Result<Vec<String>, ApiError>>()?;
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, format!("no route for {path}"));
    let service = segments.first().ok_or_else(not_found)?;
    let kind = kind(service).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("service {service} not found"),
        )
    })?;
    let keyed = kind != ServiceKind::Service;
    let rest = &segments[1..];
    let (key, handler, send) = match (keyed, rest) {
        (false, [h]) => (None, h, false),
        (false, [h, s]) if s == "send" => (None, h, true),
        (true, [k, h]) => (Some(k.clone()), h, false),
        (true, [k, h, s]) if s == "send" => (Some(k.clone()), h, true),
        (true, [h]) => {
            let kind = match kind {
                ServiceKind::Workflow => "a workflow",
                _ => "a virtual object",
            };
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("{service} is {kind}: call it with a key, as /{service}/{{key}}/{h}"),
            ));
        }
        _ => return Err(not_found()),
    };
    Ok(Call {
        target: Target {
            service: service.clone(),
            handler: handler.clone(),
            key,
        },
        send,
    })
}

/// One percent-decoded path segment; a segment that does not decode to
/// UTF-8 is refused (decoding it lossily would merge distinct keys).
fn decode_segment(segment: &str) -> Result<String, ApiError> {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("path segment {segment:?} is not percent-encoded UTF-8"),
            )
        })
}

/// The `idempotency-key` header: visible ASCII only (a key that cannot be
/// read exactly is refused, never ignored).
/// The request's `idempotency-key` header, checked.
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(key) if !key.is_empty() && key.len() <= 256 => Ok(Some(key.to_string())),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "the idempotency-key header must be 1 to 256 visible ASCII characters",
        )),
    }
}

async fn call(
    State(invoker): State<Arc<Invoker>>,
    method: Method,
    uri: Uri,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let call = parse_call(&invoker, &uri)?;
    let idempotency_key = idempotency_key(&headers)?;
    let partitioning = invoker.partitioning();
    if partitioning.of(partitioning.key_for(&call.target, idempotency_key.as_deref()))
        != partitioning.me
    {
        // A front whose copy of the deployments lagged routed it here.
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this request belongs to another partition; retry",
        ));
    }
    if method != Method::POST {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invoke handlers with POST",
        ));
    }
    if !body.iter().all(u8::is_ascii_whitespace) {
        serde_json::from_slice::<serde::de::IgnoredAny>(&body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("the body is not valid JSON: {e}"),
            )
        })?;
    }
    let delay = match query.get("delay") {
        Some(text) if call.send => Some(parse_delay(text).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("invalid delay {text:?}: use 10s, 1h30m or PT10S"),
            )
        })?),
        Some(_) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "delay applies to /send only",
            ))
        }
        None => None,
    };
    let submitted = invoker
        .submit(NewInvocation {
            target: call.target,
            input: body.to_vec(),
            headers: forwarded_headers(&headers),
            idempotency_key,
            delay,
            ..Default::default()
        })
        .await?;
    if call.send {
        let status = if submitted.existing {
            "PreviouslyAccepted"
        } else {
            "Accepted"
        };
        let code = if submitted.existing {
            StatusCode::OK
        } else {
            StatusCode::ACCEPTED
        };
        return Ok((
            code,
            Json(json!({ "invocationId": submitted.id, "status": status })),
        )
            .into_response());
    }
    attach_response(&invoker, &submitted.id).await
}

/// Headers handed to the handler: everything but transport details.
fn forwarded_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    const TRANSPORT: [&str; 5] = [
        "host",
        "content-length",
        "connection",
        "transfer-encoding",
        "accept-encoding",
    ];
    headers
        .iter()
        .filter(|(name, _)| !TRANSPORT.contains(&name.as_str()))
        .filter_map(|(name, value)| Some((name.to_string(), value.to_str().ok()?.to_string())))
        .collect()
}

fn parse_id(id: &str) -> Result<InvocationId, ApiError> {
    id.parse()
        .map_err(|e: String| ApiError::new(StatusCode::BAD_REQUEST, e))
}

async fn invocation_op(
    State(invoker): State<Arc<Invoker>>,
    Path((id, op)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    match op.as_str() {
        "attach" => attach_response(&invoker, &parse_id(&id)?).await,
        "output" => output_response(&invoker, &parse_id(&id)?),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no operation {op}"),
        )),
    }
}

async fn attach(
    State(invoker): State<Arc<Invoker>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    attach_response(&invoker, &parse_id(&id)?).await
}

async fn output(
    State(invoker): State<Arc<Invoker>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    output_response(&invoker, &parse_id(&id)?)
}

async fn complete_awakeable(
    State(invoker): State<Arc<Invoker>>,
    Path((id, op)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let outcome = match op.as_str() {
        "resolve" => Outcome::Success(json_body(&body)?),
        "reject" => Outcome::Failure {
            code: 500,
            message: String::from_utf8_lossy(&body).into_owned(),
        },
        _ => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no operation {op}"),
            ))
        }
    };
    invoker.complete_awakeable(&id, outcome).await?;
    Ok(StatusCode::ACCEPTED.into_response())
}

async fn workflow_op(
    State(invoker): State<Arc<Invoker>>,
    Path((name, id, op)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let run = invoker.workflow_run(&name, &id)?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("workflow {name}/{id} not found"),
        )
    })?;
    match op.as_str() {
        "attach" => attach_response(&invoker, &run).await,
        "output" => output_response(&invoker, &run),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no operation {op}"),
        )),
    }
}

/// A JSON request body (an empty body reads as `null`), or 400.
fn json_body(body: &[u8]) -> Result<Vec<u8>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(b"null".to_vec());
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    Ok(body.to_vec())
}

/// Wait for the outcome of `id`; a host shutting down answers 503 at once
/// (the client attaches again, to this host after its restart or another).
async fn attach_response(invoker: &Invoker, id: &InvocationId) -> Result<Response, ApiError> {
    let outcome = tokio::select! {
        outcome = invoker.attach(id) => outcome?,
        () = invoker.closing() => {
            let message = format!("the host is shutting down; attach to {id} again");
            let mut response = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message).into_response();
            response.headers_mut().insert("retry-after", HeaderValue::from_static("1"));
            return Ok(response);
        }
    };
    match outcome {
        Some(outcome) => Ok(outcome_response(id, outcome)),
        None => Err(unknown(id)),
    }
}

fn output_response(invoker: &Invoker, id: &InvocationId) -> Result<Response, ApiError> {
    let record = invoker.store().invocation(id)?.ok_or_else(|| unknown(id))?;
    match record.outcome {
        Some(outcome) => Ok(outcome_response(id, outcome)),
        None => Err(ApiError::new(
            StatusCode::from_u16(NOT_READY).expect("470 is a valid status"),
            format!("invocation {id} has not completed yet"),
        )),
    }
}

fn unknown(id: &InvocationId) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("invocation {id} not found"))
}

/// The HTTP answer for an outcome: the JSON output, or the terminal error
/// with its code as the status (500 when it is not an HTTP error code).
fn outcome_response(id: &InvocationId, outcome: Outcome) -> Response {
    let mut response = match outcome {
        Outcome::Success(bytes) => {
            let mut r = (StatusCode::OK, bytes).into_response();
            r.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/json"));
            r
        }
        Outcome::Failure { code, message } => {
            let status = StatusCode::from_u16(code)
                .ok()
                .filter(|s| s.is_client_error() || s.is_server_error())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            (status, Json(json!({ "code": code, "message": message }))).into_response()
        }
    };
    if let Ok(v) = HeaderValue::from_str(id.as_str()) {
        response.headers_mut().insert("x-restate-id", v);
    }
    response
}

/// `10s`, `1h30m`, `250ms` (humantime) or ISO-8601 `PT10S`, `P1DT2H`.
pub fn parse_delay(text: &str) -> Option<Duration> {
    if let Ok(d) = humantime::parse_duration(text) {
        return Some(d);
    }
    let rest = text.strip_prefix('P').or_else(|| text.strip_prefix('p'))?;
    let (days, time) = match rest.split_once(['T', 't']) {
        Some((d, t)) => (d, t),
        None => (rest, ""),
    };
    let mut total = 0f64;
    let mut parse_part = |part: &str, units: &[(char, f64)]| -> Option<()> {
        let mut number = String::new();
        for c in part.chars() {
            match units.iter().find(|(u, _)| c.eq_ignore_ascii_case(u)) {
                Some((_, secs)) => {
                    total += number.parse::<f64>().ok()? * secs;
                    number.clear();
                }
                None => number.push(c),
            }
        }
        number.is_empty().then_some(())
    };
    parse_part(days, &[('W', 604_800.0), ('D', 86_400.0)])?;
    parse_part(time, &[('H', 3600.0), ('M', 60.0), ('S', 1.0)])?;
    (total.is_finite() && total >= 0.0 && (days.len() + time.len()) > 0)
        .then(|| Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_parse_in_both_notations() {
        assert_eq!(parse_delay("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_delay("1h 30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_delay("PT10S"), Some(Duration::from_secs(10)));
        assert_eq!(parse_delay("PT1.5S"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_delay("P1DT2H"), Some(Duration::from_secs(93_600)));
        assert_eq!(parse_delay("PT"), None);
        assert_eq!(parse_delay("soon"), None);
        assert_eq!(parse_delay("PT5X"), None);
    }
}
