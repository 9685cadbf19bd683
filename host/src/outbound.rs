//! Durable outgoing HTTP made by the host for guests (`http-call`).
//!
//! The request is journaled (as a pending `HttpCall` command) before it is
//! sent. The host sends it with its own client, so the guest's instance can
//! be suspended while a slow API answers; ten thousand slow calls do not
//! hold ten thousand instances. Connection errors, 429 and 5xx answers are
//! retried with the host's backoff up to the request's `max_attempts`. The
//! response (or the final failure) is journaled as the completion, so a
//! replay never sends a completed request again. A request whose completion
//! was not journaled before a crash is sent again on replay. The host's
//! `http_allow` list applies, as for `wasi:http`, to every hop: a redirect
//! to a host off the list is not followed (the guest gets the 3xx answer),
//! nor is one past [`MAX_REDIRECTS`].

use crate::config::RetryPolicy;
use crate::journal::{HttpRequest, Outcome};
use crate::runtime::AllowList;
use std::sync::Arc;
use std::time::Duration;

/// Redirects followed per request, at most.
pub const MAX_REDIRECTS: usize = 5;

/// The host's HTTP client for guests.
pub struct Outbound {
    client: reqwest::Client,
    allow: Arc<AllowList>,
    retry: RetryPolicy,
}

impl Outbound {
    /// A client limited to `allow`, backing off per `retry`.
    pub fn new(allow: &[String], retry: RetryPolicy) -> Self {
        let allow = Arc::new(AllowList::new(allow));
        let hops = allow.clone();
        let redirects = reqwest::redirect::Policy::custom(move |next| {
            let url = next.url();
            let host = url.host_str().unwrap_or_default();
            let port = url.port_or_known_default().unwrap_or(80);
            if next.previous().len() > MAX_REDIRECTS || !hops.permits(host, port) {
                tracing::warn!(%host, port, "redirect not followed (off http_allow or too many hops)");
                next.stop()
            } else {
                next.follow()
            }
        });
        let client = reqwest::Client::builder()
            .redirect(redirects)
            .build()
            .expect("the HTTP client builds");
        Outbound {
            client,
            allow,
            retry,
        }
    }

    /// Send `request` until it gets a final answer (a response, or a
    /// failure after its last try).
    pub async fn call(&self, request: &HttpRequest) -> Outcome {
        let url = match reqwest::Url::parse(&request.url) {
            Ok(url) => url,
            Err(e) => return failure(400, format!("invalid URL {}: {e}", request.url)),
        };
        let host = url.host_str().unwrap_or_default().to_string();
        let port = url.port_or_known_default().unwrap_or(80);
        if !self.allow.permits(&host, port) {
            return failure(403, format!("{host}:{port} is not in http_allow"));
        }
        let attempts = request.max_attempts.max(1);
        let mut last = failure(502, "no attempt was made".into());
        for attempt in 1..=attempts {
            match self.send_once(&url, request).await {
                Ok((status, response)) if !retryable(status) || attempt == attempts => {
                    return response
                }
                Ok((status, _)) => {
                    last = failure(502, format!("{} answered {status}", request.url))
                }
                Err(e) => last = failure(502, format!("{} failed: {e}", request.url)),
            }
            if attempt < attempts {
                tokio::time::sleep(self.retry.delay_before(attempt + 1)).await;
            }
        }
        last
    }

    async fn send_once(
        &self,
        url: &reqwest::Url,
        r: &HttpRequest,
    ) -> Result<(u16, Outcome), reqwest::Error> {
        let method =
            reqwest::Method::from_bytes(r.method.as_bytes()).unwrap_or(reqwest::Method::GET);
        let timeout = Duration::from_millis(if r.timeout_ms == 0 {
            30_000
        } else {
            r.timeout_ms
        });
        let mut req = self
            .client
            .request(method, url.clone())
            .timeout(timeout)
            .body(r.body.clone());
        for (k, v) in &r.headers {
            req = req.header(k, v);
        }
        let response = req.send().await?;
        let status = response.status().as_u16();
        let headers: Vec<(String, String)> = response
            .headers()
            .iter()
            .filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.to_string())))
            .collect();
        let body = String::from_utf8_lossy(&response.bytes().await?).into_owned();
        let json = serde_json::json!({ "status": status, "headers": headers, "body": body });
        Ok((status, Outcome::Success(json.to_string().into_bytes())))
    }
}

/// Answers worth another try: too many requests, and server errors.
fn retryable(status: u16) -> bool {
    status == 429 || status >= 500
}

fn failure(code: u16, message: String) -> Outcome {
    Outcome::Failure { code, message }
}
