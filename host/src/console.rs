//! The web console at `/ui`: a single page over the admin API.
//!
//! Its four files (`host/console/`) are compiled into the binary, so the
//! console works offline and always matches the host's API. The page only
//! calls the admin routes a script could call; it adds no API of its own.
//!
//! Lifecycle of a session when the host has an `admin_token`: `GET /ui`
//! without credentials answers 401 with a sign-in form; the form posts the
//! token to `POST /ui/login`, which stores it in a cookie (`HttpOnly`,
//! `SameSite=Strict`, so another site can neither read it nor make the
//! browser send it) and redirects to `/ui`. From then on the browser's
//! requests carry the cookie, which [`crate::admin::with_token`] accepts
//! like a bearer token; a wrong token just lands on the form again.
//! `POST /ui/logout` clears the cookie.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Router};

/// The cookie that carries the admin token for the console.
pub const COOKIE: &str = "cairn_admin";

const INDEX: &str = include_str!("../console/index.html");
const LOGIN: &str = include_str!("../console/login.html");
const APP: &str = include_str!("../console/app.js");
const STYLE: &str = include_str!("../console/style.css");

/// The console's routes (state-free: every host serves them itself).
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/ui", get(|| async { html(INDEX) }))
        .route("/ui/", get(|| async { html(INDEX) }))
        .route(
            "/ui/app.js",
            get(|| async { asset("text/javascript", APP) }),
        )
        .route("/ui/style.css", get(|| async { asset("text/css", STYLE) }))
        .route("/ui/login", post(login))
        .route("/ui/logout", post(logout))
}

/// What the token check lets through without credentials: the sign-in
/// form's stylesheet and the sign-in itself.
pub fn is_public(method: &axum::http::Method, path: &str) -> bool {
    matches!(
        (method.as_str(), path),
        ("GET", "/ui/style.css") | ("POST", "/ui/login")
    )
}

/// Whether a refused request should get the sign-in form (a console page)
/// rather than the API's JSON 401.
pub fn wants_sign_in(method: &axum::http::Method, path: &str) -> bool {
    method == axum::http::Method::GET && matches!(path, "/ui" | "/ui/")
}

/// The sign-in form, answered with 401 to a console page without a
/// (valid) token.
pub fn sign_in() -> Response {
    (StatusCode::UNAUTHORIZED, html(LOGIN)).into_response()
}

/// The token a request's cookie carries, if any.
pub fn cookie_token(headers: &axum::http::HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .and_then(|(_, value)| from_hex(value))
}

#[derive(serde::Deserialize)]
struct SignIn {
    token: String,
}

async fn login(Form(form): Form<SignIn>) -> Response {
    // Hex keeps any token inside a cookie value's allowed characters.
    let cookie = format!(
        "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict",
        to_hex(&form.token)
    );
    redirect_with(cookie)
}

async fn logout() -> Response {
    redirect_with(format!(
        "{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"
    ))
}

fn redirect_with(cookie: String) -> Response {
    (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, "/ui".to_string()),
            (header::SET_COOKIE, cookie),
        ],
    )
        .into_response()
}

fn html(body: &'static str) -> Response {
    asset("text/html; charset=utf-8", body)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // The page never loads anything from elsewhere.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; frame-ancestors 'none'",
            ),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

fn to_hex(text: &str) -> String {
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(hex: &str) -> Option<String> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_carries_any_token_and_reads_back() {
        let token = "s3cret; with=odd,chars é";
        let mut headers = axum::http::HeaderMap::new();
        let cookie = format!("other=1; {COOKIE}={}; more=2", to_hex(token));
        headers.insert(header::COOKIE, cookie.parse().unwrap());
        assert_eq!(cookie_token(&headers).as_deref(), Some(token));
    }

    #[test]
    fn a_malformed_cookie_is_no_token() {
        let mut headers = axum::http::HeaderMap::new();
        headers.insert(header::COOKIE, format!("{COOKIE}=zz1").parse().unwrap());
        assert_eq!(cookie_token(&headers), None);
    }
}
