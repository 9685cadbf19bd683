//! Cairn's basic example handlers.
//!
//! - `Steps`: a stateless service whose `steps3` runs three durable steps;
//!   `fetch3` does the same with outgoing HTTP calls; `fail` ends with a
//!   terminal error.
//! - `Counter`: a virtual object with an exclusive `add` and a shared `get`.
//! - `Greeter`: typed input and output, a header, state listing.
//! - `Looper`: a handler that never returns, to show the host's CPU limit.

use cairn_sdk::prelude::*;
use serde::{Deserialize, Serialize};

/// A stateless service of durable steps.
pub struct Steps;

#[cairn_sdk::service]
impl Steps {
    /// Three durable steps; each result is journaled, so a replay after a
    /// crash skips the steps that already ran.
    pub fn steps3(ctx: &Context) -> HandlerResult<u64> {
        let a: u64 = ctx.run("one", || Ok(1))?;
        let b: u64 = ctx.run("two", || Ok(a + 1))?;
        ctx.run("three", || Ok(a + b))
    }

    /// Three steps that each `GET {base}/token?inv=..&step=..`: what a real
    /// handler calling an outside API looks like. Returns the three bodies.
    pub fn fetch3(ctx: &Context, base: String) -> HandlerResult<Vec<String>> {
        (1..=3)
            .map(|step| {
                ctx.run(&format!("fetch-{step}"), || {
                    let url = format!("{base}/token?inv={}&step={step}", ctx.invocation_id());
                    let response = cairn_sdk::http::get(&url)?;
                    if response.status != 200 {
                        return Err(HandlerError::retryable(format!(
                            "status {}",
                            response.status
                        )));
                    }
                    Ok(String::from_utf8_lossy(&response.body).into_owned())
                })
            })
            .collect()
    }

    /// Always fails with a terminal error (HTTP 500 to the caller).
    pub fn fail(_ctx: &Context, reason: String) -> HandlerResult<()> {
        Err(TerminalError::new(format!("failed on purpose: {reason}")).into())
    }
}

/// A counter per key.
pub struct Counter;

#[cairn_sdk::object]
impl Counter {
    /// Add `delta` and return the new value. Exclusive: calls on one key run
    /// one at a time, in arrival order.
    pub fn add(ctx: &Context, delta: i64) -> HandlerResult<i64> {
        let next = ctx.get::<i64>("count")?.unwrap_or(0) + delta;
        ctx.set("count", &next);
        Ok(next)
    }

    /// The current value. Shared: runs concurrently with `add`.
    #[shared]
    pub fn get(ctx: &Context) -> HandlerResult<i64> {
        Ok(ctx.get::<i64>("count")?.unwrap_or(0))
    }

    /// Forget the count.
    pub fn reset(ctx: &Context) -> HandlerResult<()> {
        ctx.clear_all();
        Ok(())
    }
}

/// A greeting request.
#[derive(Deserialize)]
pub struct Greeting {
    /// Who to greet.
    pub name: String,
}

/// A greeting answer.
#[derive(Serialize)]
pub struct Greeted {
    /// The message.
    pub message: String,
    /// How many times this key has greeted so far.
    pub count: u64,
    /// The state entries of the key.
    pub state: Vec<String>,
}

/// A virtual object that remembers whom it greeted.
pub struct Greeter;

#[cairn_sdk::object]
impl Greeter {
    /// Greet someone; the `x-greeting` header overrides "Hello".
    pub fn greet(ctx: &Context, who: Greeting) -> HandlerResult<Greeted> {
        let count = ctx.get::<u64>("count")?.unwrap_or(0) + 1;
        ctx.set("count", &count);
        ctx.set("last", &who.name);
        let word = ctx.header("x-greeting").unwrap_or("Hello");
        Ok(Greeted {
            message: format!("{word}, {}! (from {})", who.name, ctx.key()),
            count,
            state: ctx.state_keys(),
        })
    }
}

/// A handler that spins forever: the host interrupts it.
pub struct Looper;

#[cairn_sdk::service]
impl Looper {
    /// Never returns.
    pub fn spin(_ctx: &Context) -> HandlerResult<()> {
        let mut x: u64 = 0;
        loop {
            x = std::hint::black_box(x.wrapping_add(1));
        }
    }
}

cairn_sdk::export!(Steps, Counter, Greeter, Looper);
