//! Cairn's basic example handlers.
//!
//! - `Steps`: a stateless service whose `steps3` runs three durable steps;
//!   `fetch3` does the same with outgoing HTTP calls; `fail` ends with a
//!   terminal error.
//! - `Counter`: a virtual object with an exclusive `add` and a shared `get`.
//! - `Greeter`: typed input and output, a header, state listing.
//! - `Latency`: end-to-end latency of Kafka records (the benchmark's sink).
//! - `Rogue`: misbehaving handlers (an endless loop, a memory hog) that
//!   show the host's limits.
//!
//! Built with `--features v2`, the module answers `Steps/version` with "v2":
//! the tests use the two builds as two versions of one service.

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

    /// Wait in a step for `url` to answer, then say which build this is.
    pub fn version(ctx: &Context, url: String) -> HandlerResult<String> {
        ctx.run("wait", || cairn_sdk::http::get(&url).map(|r| r.status))?;
        Ok(VERSION.to_string())
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

/// End-to-end latency of Kafka records, per key (for the benchmark).
pub struct Latency;

#[cairn_sdk::object]
impl Latency {
    /// Count a record: milliseconds from its Kafka timestamp to now.
    pub fn observe(ctx: &Context) -> HandlerResult<u64> {
        let sent: u64 = ctx
            .header("x-kafka-timestamp")
            .and_then(|t| t.parse().ok())
            .unwrap_or(0);
        let now = ctx
            .now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let mut histogram = ctx
            .get::<std::collections::BTreeMap<u64, u64>>("ms")?
            .unwrap_or_default();
        *histogram.entry(now.saturating_sub(sent)).or_default() += 1;
        ctx.set("ms", &histogram);
        Ok(now.saturating_sub(sent))
    }

    /// Records per latency in ms.
    #[shared]
    pub fn histogram(ctx: &Context) -> HandlerResult<std::collections::BTreeMap<u64, u64>> {
        Ok(ctx.get("ms")?.unwrap_or_default())
    }
}

/// Handlers that misbehave; the host stops them and keeps serving others.
pub struct Rogue;

#[cairn_sdk::service]
impl Rogue {
    /// Never returns: interrupted by the CPU budget.
    pub fn spin(_ctx: &Context) -> HandlerResult<()> {
        let mut x: u64 = 0;
        loop {
            x = std::hint::black_box(x.wrapping_add(1));
        }
    }

    /// Allocates `mib` MiB: trapped by the memory cap when too large.
    pub fn hog(_ctx: &Context, mib: usize) -> HandlerResult<usize> {
        let block = std::hint::black_box(vec![1u8; mib * 1024 * 1024]);
        Ok(block.len() / (1024 * 1024))
    }
}

/// Which build of this module is running.
const VERSION: &str = if cfg!(feature = "v2") { "v2" } else { "v1" };

cairn_sdk::export!(Steps, Counter, Greeter, Latency, Rogue);
