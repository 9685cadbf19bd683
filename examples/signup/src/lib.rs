//! Sign-up: a workflow per user, started by a Kafka event. It creates the
//! account (an outside API), emails a verification link, and waits for the
//! click on a durable promise; it sends one reminder if the click is slow,
//! gives up after a deadline, and announces the outcome on a Kafka topic.
//!
//! Each outside call is journaled, so a host crash at any point neither
//! creates a second account nor sends a second email; the timers are
//! durable, and the workflow can wait for days without an instance. The
//! outcome is produced with durable produce, once.
//!
//! Settings (`[guest_env]`): `ACCOUNTS_API` (base URL: `/accounts`,
//! `/emails`), `PUBLIC_URL` (the ingress as users see it, for the link),
//! `SIGNUP_EVENTS` (the outcome topic, on cluster `KAFKA_CLUSTER`, default
//! "local"), `REMIND_AFTER_MS` (default 1 day), `EXPIRE_AFTER_MS` (after the
//! reminder, default 6 days).

use cairn_sdk::prelude::*;
use std::time::Duration;

/// The event that starts a sign-up (the key is the user id).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct SignupRequest {
    /// Where to send the link.
    pub email: String,
}

/// The sign-up workflow.
pub struct Onboarding;

#[cairn_sdk::workflow]
impl Onboarding {
    /// Create the account, verify the email, announce the outcome.
    pub fn run(ctx: &Context, request: SignupRequest) -> HandlerResult<String> {
        let api = cairn_sdk::env("ACCOUNTS_API")?;
        let user = ctx.key().to_string();
        let account = serde_json::json!({ "user": user, "email": request.email });
        post(
            ctx,
            &format!("{api}/accounts"),
            &format!("account-{user}"),
            &account,
        )?;
        ctx.set("stage", &"verifying");
        email(ctx, &api, &request.email, "verify")?;
        let clicked = ctx.promise::<String>("clicked");
        let remind_after = cairn_sdk::env_or("REMIND_AFTER_MS", 24 * 3600 * 1000)?;
        let reminder = ctx.sleep(Duration::from_millis(remind_after));
        if ctx.select(&[&clicked, &reminder]) == 1 {
            email(ctx, &api, &request.email, "reminder")?;
            let expire_after = cairn_sdk::env_or("EXPIRE_AFTER_MS", 6 * 24 * 3600 * 1000)?;
            let deadline = ctx.sleep(Duration::from_millis(expire_after));
            if ctx.select(&[&clicked, &deadline]) == 1 {
                ctx.set("stage", &"expired");
                announce(ctx, &user, "expired")?;
                return Err(TerminalError::with_code(408, "the link was never clicked").into());
            }
        }
        clicked.wait()?;
        ctx.set("stage", &"active");
        announce(ctx, &user, "active")?;
        Ok("active".into())
    }

    /// The user clicked the link.
    pub fn click(ctx: &Context, code: String) -> HandlerResult<()> {
        ctx.resolve_promise("clicked", &code)
    }

    /// Where the sign-up is: "verifying", "active", "expired" (or "not started").
    pub fn stage(ctx: &Context) -> HandlerResult<String> {
        Ok(ctx
            .get::<String>("stage")?
            .unwrap_or_else(|| "not started".into()))
    }
}

/// Send the verification (or reminder) email with the link.
fn email(ctx: &Context, api: &str, to: &str, kind: &str) -> HandlerResult<()> {
    let public = cairn_sdk::env_or("PUBLIC_URL", "http://127.0.0.1:8080".to_string())?;
    let link = format!("{public}/Onboarding/{}/click", ctx.key());
    let body = serde_json::json!({ "user": ctx.key(), "kind": kind, "to": to, "link": link });
    post(
        ctx,
        &format!("{api}/emails"),
        &format!("{kind}-{}", ctx.key()),
        &body,
    )
}

/// POST `body` through the host, with an idempotency key; 200 or an error.
fn post(ctx: &Context, url: &str, key: &str, body: &serde_json::Value) -> HandlerResult<()> {
    let request = HttpCall::post_json(url, body)
        .header("idempotency-key", key)
        .attempts(20);
    let response = ctx.http_call(request).wait()?;
    if response.status != 200 {
        let message = format!("{url} answered {}", response.status);
        return Err(TerminalError::with_code(502, message).into());
    }
    Ok(())
}

/// Produce `{"user", "outcome"}` to `SIGNUP_EVENTS`.
fn announce(ctx: &Context, user: &str, outcome: &str) -> HandlerResult<()> {
    let topic = cairn_sdk::env("SIGNUP_EVENTS")?;
    let cluster = cairn_sdk::env_or("KAFKA_CLUSTER", "local".to_string())?;
    let event = serde_json::json!({ "user": user, "outcome": outcome });
    ctx.kafka_produce(&cluster, &topic, Some(user.as_bytes()), &event)
        .wait()?;
    Ok(())
}
cairn_sdk::export!(Onboarding);
