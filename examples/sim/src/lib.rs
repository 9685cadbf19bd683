//! Handlers for the fault-injection simulation (`tests/sim.rs`) and the
//! regression tests of the guarantees (`tests/guarantees.rs`).
//!
//! `Acct/{key}/apply` interprets a small program of durable operations, so
//! the simulation can compose random workloads from a few handlers: state
//! changes, sends (delayed or not), calls, sleeps, a select between a sleep
//! and an awakeable, outside effects (host HTTP to the test's sink), Kafka
//! records that come back as invocations, and retryable and terminal
//! failures. The simulation's model predicts every key's balance
//! and every effect; the host must agree after any schedule of faults.

use cairn_sdk::prelude::*;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// One operation of a program.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Op {
    /// Add to this key's balance.
    Add(i64),
    /// Send `Acct/{key}/apply([Add(n)])`, after `delay_ms`.
    Send { key: String, n: i64, delay_ms: u64 },
    /// Call `Acct/{key}/apply([Add(n)])` and wait for it.
    Call { key: String, n: i64 },
    /// Sleep durably.
    Sleep(u64),
    /// Race a sleep of `ms` against an awakeable nobody resolves; the
    /// sleep must win, live and on replay alike.
    Race(u64),
    /// Post effect `id` to `{SINK}/record/effects` through the host
    /// (durable HTTP, idempotency key `id`), and wait for the answer.
    Effect(String),
    /// Create an awakeable, announce `"{key} {id}"` to
    /// `{SINK}/record/awakeables` (from a step), and wait: a resolved value is added to the balance, a
    /// rejection adds nothing.
    Awake,
    /// Append `n` to this key's log (the simulation checks per-key order).
    Mark(u64),
    /// A step that asks `{SINK}/flaky?key={id}&fail=1` from inside the
    /// guest; the sink fails the first try, so the attempt fails retryably
    /// and the retry replays everything before it.
    Flaky(String),
    /// Produce `[Add(n)]` to the topic in the guest's `TOPIC` (cluster
    /// "local") with record key `key`, and wait for the broker's ack; the
    /// simulation subscribes `Acct/apply` to that topic, so the record adds
    /// `n` to `key`'s balance exactly once.
    Produce { key: String, n: i64 },
    /// A step that fails terminally: the invocation fails, and what the
    /// program did before it stays done.
    Fail,
}

/// An account per key, driven by programs.
pub struct Acct;

#[cairn_sdk::object]
impl Acct {
    /// Run a program; returns the balance after it.
    pub fn apply(ctx: &Context, program: Vec<Op>) -> HandlerResult<i64> {
        for op in program {
            run_op(ctx, op)?;
        }
        balance(ctx)
    }

    /// The balance.
    #[shared]
    pub fn balance(ctx: &Context) -> HandlerResult<i64> {
        Ok(ctx.get("balance")?.unwrap_or(0))
    }

    /// This key's log of marks.
    #[shared]
    pub fn log(ctx: &Context) -> HandlerResult<Vec<u64>> {
        Ok(ctx.get("log")?.unwrap_or_default())
    }

    /// Which build of this module runs (the simulation redeploys mid-run).
    #[shared]
    pub fn version(_ctx: &Context) -> HandlerResult<u32> {
        Ok(if cfg!(feature = "v2") { 2 } else { 1 })
    }

    /// Send `Acct/{target}/apply([Add(1)])`, then fail retryably: a retry
    /// must replay the send, never issue it again.
    pub fn send_then_fail(ctx: &Context, target: String) -> HandlerResult<()> {
        ctx.send(
            Target::object("Acct", &target, "apply"),
            &vec![Op::Add(1)],
            None,
        );
        Err(HandlerError::retryable(
            "failing after the send, on purpose",
        ))
    }

    /// Write `ticks` to state `n` times, with a short step between writes:
    /// a long-running writer to kill.
    pub fn churn(ctx: &Context, n: u64) -> HandlerResult<u64> {
        for i in 1..=n {
            // A few milliseconds of work (guest clocks are frozen, so count).
            ctx.run("spin", || {
                let mut x = i;
                for _ in 0..1_000_000u32 {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
                Ok(x % 2)
            })?;
            ctx.set("ticks", &i);
        }
        Ok(n)
    }

    /// Read the balance, sleep `ms` durably, then store what was read plus
    /// `n`: a holder that reads before it waits and writes after. Another
    /// writer of the key in between would be lost, so the key's queue must
    /// keep it the holder, also across a crash.
    pub fn add_after(ctx: &Context, req: (i64, u64)) -> HandlerResult<i64> {
        let (n, ms) = req;
        let read = balance(ctx)?;
        ctx.sleep(Duration::from_millis(ms)).wait()?;
        ctx.set("balance", &(read + n));
        Ok(read + n)
    }

    /// The `ticks` state.
    #[shared]
    pub fn ticks(ctx: &Context) -> HandlerResult<u64> {
        Ok(ctx.get("ticks")?.unwrap_or(0))
    }

    /// Start a host HTTP call to `url` and return without waiting for it.
    pub fn fire_and_forget(ctx: &Context, url: String) -> HandlerResult<()> {
        let _dropped = ctx.http_call(HttpCall::get(&url));
        Ok(())
    }
}

fn balance(ctx: &Context) -> HandlerResult<i64> {
    Ok(ctx.get("balance")?.unwrap_or(0))
}

fn run_op(ctx: &Context, op: Op) -> HandlerResult<()> {
    match op {
        Op::Add(n) => {
            let b = balance(ctx)? + n;
            ctx.set("balance", &b);
        }
        Op::Send { key, n, delay_ms } => {
            let delay = (delay_ms > 0).then(|| Duration::from_millis(delay_ms));
            ctx.send(
                Target::object("Acct", &key, "apply"),
                &vec![Op::Add(n)],
                delay,
            );
        }
        Op::Call { key, n } => {
            ctx.call::<_, i64>(Target::object("Acct", &key, "apply"), &vec![Op::Add(n)])
                .wait()?;
        }
        Op::Sleep(ms) => ctx.sleep(Duration::from_millis(ms)).wait()?,
        Op::Race(ms) => {
            let sleep = ctx.sleep(Duration::from_millis(ms));
            let (_, never) = ctx.awakeable::<String>();
            if ctx.select(&[&never, &sleep]) != 1 {
                return Err(TerminalError::with_code(500, "the unresolved awakeable won").into());
            }
        }
        Op::Effect(id) => {
            let sink = cairn_sdk::env("SINK")?;
            let call = HttpCall::post_json(&format!("{sink}/record/effects"), &id)
                .header("idempotency-key", &id)
                .attempts(20);
            ctx.http_call(call).wait()?;
        }
        Op::Awake => {
            let sink = cairn_sdk::env("SINK")?;
            let (id, value) = ctx.awakeable::<i64>();
            ctx.run("announce", || {
                let announce = format!("{} {id}", ctx.key());
                cairn_sdk::http::post(&format!("{sink}/record/awakeables"), announce.as_bytes())
                    .map(drop)
            })?;
            match value.wait() {
                Ok(v) => {
                    let b = balance(ctx)? + v;
                    ctx.set("balance", &b);
                }
                Err(e) if e.as_terminal().is_some() => {}
                Err(e) => return Err(e),
            }
        }
        Op::Mark(n) => {
            let mut log: Vec<u64> = ctx.get("log")?.unwrap_or_default();
            log.push(n);
            ctx.set("log", &log);
        }
        Op::Flaky(id) => {
            let sink = cairn_sdk::env("SINK")?;
            ctx.run("flaky", || {
                let answer = cairn_sdk::http::get(&format!("{sink}/flaky?key={id}&fail=1"))?;
                match answer.status {
                    200 => Ok(()),
                    s => Err(HandlerError::retryable(format!("the sink answered {s}"))),
                }
            })?;
        }
        Op::Fail => {
            ctx.run("fail", || -> Result<(), HandlerError> {
                Err(TerminalError::with_code(422, "failing on purpose").into())
            })?;
        }
        Op::Produce { key, n } => {
            let topic = cairn_sdk::env("TOPIC")?;
            ctx.kafka_produce("local", &topic, Some(key.as_bytes()), &vec![Op::Add(n)])
                .wait()?;
        }
    }
    Ok(())
}
/// Completes awakeables from inside a handler (the simulation also
/// completes them from outside, through the ingress).
pub struct Answer;

#[cairn_sdk::service]
impl Answer {
    /// Resolve awakeable `id` with `value`.
    pub fn resolve(ctx: &Context, req: (String, i64)) -> HandlerResult<()> {
        ctx.resolve_awakeable(&req.0, &req.1);
        Ok(())
    }

    /// Reject awakeable `id`.
    pub fn reject(ctx: &Context, id: String) -> HandlerResult<()> {
        ctx.reject_awakeable(&id, "no");
        Ok(())
    }
}

/// A workflow per id: it waits for its durable promise `go`, then calls
/// `Acct/{key}/apply([Add(go + n)])` and returns `go + n`.
pub struct Flow;

#[cairn_sdk::workflow]
impl Flow {
    /// The workflow's run: `(key, n)`.
    pub fn run(ctx: &Context, req: (String, i64)) -> HandlerResult<i64> {
        let (key, n) = req;
        let go: i64 = ctx.promise("go").wait()?;
        ctx.call::<_, i64>(
            Target::object("Acct", &key, "apply"),
            &vec![Op::Add(go + n)],
        )
        .wait()?;
        Ok(go + n)
    }

    /// Resolve the promise `go` (shared: runs while `run` waits).
    pub fn go(ctx: &Context, value: i64) -> HandlerResult<()> {
        ctx.resolve_promise("go", &value)
    }
}

/// Kafka records per key, for the ingest tests. Version 2 removes `take`,
/// so records still routed to it cannot be ingested.
pub struct Feed;

#[cfg(not(feature = "v2"))]
#[cairn_sdk::object]
impl Feed {
    /// Add a record's number to this key's total.
    pub fn take(ctx: &Context, n: i64) -> HandlerResult<i64> {
        let total = ctx.get::<i64>("total")?.unwrap_or(0) + n;
        ctx.set("total", &total);
        Ok(total)
    }

    /// The total.
    #[shared]
    pub fn total(ctx: &Context) -> HandlerResult<i64> {
        Ok(ctx.get("total")?.unwrap_or(0))
    }
}

#[cfg(feature = "v2")]
#[cairn_sdk::object]
impl Feed {
    /// The total.
    #[shared]
    pub fn total(ctx: &Context) -> HandlerResult<i64> {
        Ok(ctx.get("total")?.unwrap_or(0))
    }
}

cairn_sdk::export!(Acct, Answer, Flow, Feed);
