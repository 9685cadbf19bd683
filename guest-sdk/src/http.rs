//! Blocking outgoing HTTP from inside a [`crate::Context::run`] step.
//!
//! Requests go through `wasi:http`; the host only lets them out inside a
//! `run` step and only to the hosts on its allow-list (`http_allow` in the
//! host's configuration), so their results are always journaled. Failures
//! are retryable [`HandlerError`]s.

use crate::HandlerError;
use wasi::http::outgoing_handler;
use wasi::http::types::{
    Fields, IncomingBody, Method, OutgoingBody, OutgoingRequest, RequestOptions, Scheme,
};
use wasi::io::streams::StreamError;

/// A received response: status code and the whole body.
#[derive(Debug, Clone)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// The response body.
    pub body: Vec<u8>,
}

/// `GET url`.
pub fn get(url: &str) -> Result<Response, HandlerError> {
    request("GET", url, &[], None)
}

/// `POST url` with a body.
pub fn post(url: &str, body: &[u8]) -> Result<Response, HandlerError> {
    request(
        "POST",
        url,
        &[("content-type", "application/json")],
        Some(body),
    )
}

/// Send one request and wait for the whole response.
pub fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<Response, HandlerError> {
    let (scheme, authority, path) = split_url(url)?;
    let fields = Fields::new();
    for (name, value) in headers {
        fields
            .append(name, value.as_bytes())
            .map_err(|e| HandlerError::terminal(format!("bad header {name}: {e:?}")))?;
    }
    let req = OutgoingRequest::new(fields);
    let method = match method {
        "GET" => Method::Get,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        "PATCH" => Method::Patch,
        other => Method::Other(other.to_string()),
    };
    let invalid = |what: &str| HandlerError::terminal(format!("invalid {what} in {url}"));
    req.set_method(&method).map_err(|_| invalid("method"))?;
    req.set_scheme(Some(&scheme))
        .map_err(|_| invalid("scheme"))?;
    req.set_authority(Some(authority))
        .map_err(|_| invalid("authority"))?;
    req.set_path_with_query(Some(path))
        .map_err(|_| invalid("path"))?;
    let outgoing = req.body().expect("request body is taken once");
    let pending = outgoing_handler::handle(req, None::<RequestOptions>)
        .map_err(|e| HandlerError::retryable(format!("request to {url} refused: {e:?}")))?;
    write_body(outgoing, body.unwrap_or_default())?;
    pending.subscribe().block();
    let response = pending
        .get()
        .expect("response is ready after block")
        .expect("response is taken once")
        .map_err(|e| HandlerError::retryable(format!("request to {url} failed: {e:?}")))?;
    let status = response.status();
    let incoming = response.consume().expect("response body is taken once");
    Ok(Response {
        status,
        body: read_body(incoming)?,
    })
}

fn split_url(url: &str) -> Result<(Scheme, &str, &str), HandlerError> {
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("http://") {
        (Scheme::Http, rest)
    } else if let Some(rest) = url.strip_prefix("https://") {
        (Scheme::Https, rest)
    } else {
        return Err(HandlerError::terminal(format!("not an http(s) URL: {url}")));
    };
    let split = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(split);
    Ok((scheme, authority, if path.is_empty() { "/" } else { path }))
}

fn write_body(body: OutgoingBody, bytes: &[u8]) -> Result<(), HandlerError> {
    {
        let stream = body.write().expect("body stream is taken once");
        for chunk in bytes.chunks(4096) {
            stream
                .blocking_write_and_flush(chunk)
                .map_err(|e| HandlerError::retryable(format!("writing request body: {e:?}")))?;
        }
    }
    OutgoingBody::finish(body, None)
        .map_err(|e| HandlerError::retryable(format!("finishing request body: {e:?}")))
}

fn read_body(body: IncomingBody) -> Result<Vec<u8>, HandlerError> {
    let mut out = Vec::new();
    {
        let stream = body.stream().expect("body stream is taken once");
        loop {
            match stream.blocking_read(64 * 1024) {
                Ok(chunk) => out.extend_from_slice(&chunk),
                Err(StreamError::Closed) => break,
                Err(e) => {
                    return Err(HandlerError::retryable(format!(
                        "reading response body: {e:?}"
                    )))
                }
            }
        }
    }
    drop(body);
    Ok(out)
}
