//! Cairn's coordination examples: durable sleeps, calls and sends between
//! handlers, fan-out, races with timeouts, awakeables, a workflow with a
//! durable promise, retries and cancellation with compensation.

use cairn_sdk::join_all;
use cairn_sdk::prelude::*;
use std::time::Duration;

/// Sleeps and delays.
pub struct Sleeper;

#[cairn_sdk::service]
impl Sleeper {
    /// Sleep durably for `ms` milliseconds, then return `ms`.
    pub fn nap(ctx: &Context, ms: u64) -> HandlerResult<u64> {
        ctx.sleep(Duration::from_millis(ms)).wait()?;
        Ok(ms)
    }

    /// Print, sleep `ms` durably, print again: the attempt that resumes
    /// after the sleep replays the first print, which is not logged twice.
    /// It names the `NARRATOR` of its `[guest_env]`, if any.
    pub fn narrate(ctx: &Context, ms: u64) -> HandlerResult<()> {
        let narrator = cairn_sdk::env("NARRATOR").unwrap_or_else(|_| "nobody".into());
        println!("before the nap (narrator: {narrator})");
        ctx.sleep(Duration::from_millis(ms)).wait()?;
        println!("after the nap");
        Ok(())
    }

    /// Send `Log/{key}/add(text)` after `ms` milliseconds; returns its id.
    pub fn later(ctx: &Context, req: (String, String, u64)) -> HandlerResult<String> {
        let (key, text, ms) = req;
        Ok(ctx.send(
            Target::object("Log", &key, "add"),
            &text,
            Some(Duration::from_millis(ms)),
        ))
    }
}

/// An append-only log per key: where the examples leave traces for tests.
pub struct Log;

#[cairn_sdk::object]
impl Log {
    /// Append a line.
    pub fn add(ctx: &Context, line: String) -> HandlerResult<usize> {
        let mut lines = ctx.get::<Vec<String>>("lines")?.unwrap_or_default();
        lines.push(line);
        ctx.set("lines", &lines);
        Ok(lines.len())
    }

    /// The lines so far.
    #[shared]
    pub fn lines(ctx: &Context) -> HandlerResult<Vec<String>> {
        Ok(ctx.get("lines")?.unwrap_or_default())
    }
}

/// Arithmetic as a service, to be called.
pub struct Doubler;

#[cairn_sdk::service]
impl Doubler {
    /// `2 * x`.
    pub fn double(_ctx: &Context, x: i64) -> HandlerResult<i64> {
        Ok(2 * x)
    }

    /// Fails with a terminal error.
    pub fn fail(_ctx: &Context, why: String) -> HandlerResult<i64> {
        Err(TerminalError::with_code(422, format!("doubler refused: {why}")).into())
    }
}

/// A per-key running total fed through calls.
pub struct Tally;

#[cairn_sdk::object]
impl Tally {
    /// Double `x` through `Doubler` and add it to this key's total.
    pub fn bump(ctx: &Context, x: i64) -> HandlerResult<i64> {
        let doubled: i64 = ctx.call(Target::service("Doubler", "double"), &x).wait()?;
        let total = ctx.get::<i64>("total")?.unwrap_or(0) + doubled;
        ctx.set("total", &total);
        Ok(total)
    }

    /// Calls `bump` on its own key: a deadlock (the call waits for the key
    /// this handler holds). Cancelling it gets the key back.
    pub fn deadlock(ctx: &Context, x: i64) -> HandlerResult<i64> {
        ctx.call(Target::object("Tally", ctx.key(), "bump"), &x)
            .wait()
    }

    /// The total (shared: readable while the key is held).
    #[shared]
    pub fn total(ctx: &Context) -> HandlerResult<i64> {
        Ok(ctx.get::<i64>("total")?.unwrap_or(0))
    }
}

/// Calls between handlers.
pub struct Chain;

#[cairn_sdk::service]
impl Chain {
    /// service -> object -> service: bump `Tally/{key}` by `x`.
    pub fn start(ctx: &Context, req: (String, i64)) -> HandlerResult<i64> {
        ctx.call(Target::object("Tally", &req.0, "bump"), &req.1)
            .wait()
    }

    /// Call a handler that fails terminally; its error propagates.
    pub fn through_failure(ctx: &Context) -> HandlerResult<i64> {
        ctx.call(Target::service("Doubler", "fail"), &"no reason")
            .wait()
    }

    /// Fan out `n` calls, join them all, return the sum.
    pub fn spread(ctx: &Context, n: i64) -> HandlerResult<i64> {
        let calls = (0..n)
            .map(|i| ctx.call::<_, i64>(Target::service("Doubler", "double"), &i))
            .collect();
        join_all(calls).into_iter().sum()
    }

    /// Race a call to `Sleeper/nap(call_ms)` against a timeout.
    pub fn race(ctx: &Context, req: (u64, u64)) -> HandlerResult<String> {
        let (call_ms, timeout_ms) = req;
        let call = ctx.call::<_, u64>(Target::service("Sleeper", "nap"), &call_ms);
        let timeout = ctx.sleep(Duration::from_millis(timeout_ms));
        Ok(match ctx.select(&[&call, &timeout]) {
            0 => format!("call returned {}", call.wait()?),
            _ => "timeout".to_string(),
        })
    }
}

/// Waiting for the outside world.
pub struct Approval;

#[cairn_sdk::service]
impl Approval {
    /// Create an awakeable, log its id to `Log/{key}`, and wait for it.
    pub fn ask(ctx: &Context, key: String) -> HandlerResult<String> {
        let (id, answer) = ctx.awakeable::<String>();
        ctx.send(Target::object("Log", &key, "add"), &id, None);
        Ok(format!("approved: {}", answer.wait()?))
    }

    /// Resolve an awakeable from a handler.
    pub fn approve(ctx: &Context, req: (String, String)) -> HandlerResult<()> {
        ctx.resolve_awakeable(&req.0, &req.1);
        Ok(())
    }
}

/// A sign-up workflow: waits for its verification link to be clicked.
pub struct Signup;

#[cairn_sdk::workflow]
impl Signup {
    /// The workflow: record the email, wait for the link, finish.
    pub fn run(ctx: &Context, email: String) -> HandlerResult<String> {
        ctx.set("email", &email);
        ctx.set("stage", &"waiting");
        let code: String = ctx.promise("link").wait()?;
        ctx.set("stage", &"verified");
        Ok(format!("{email} verified with {code}"))
    }

    /// The link was clicked (shared: runs while `run` waits).
    pub fn click(ctx: &Context, code: String) -> HandlerResult<()> {
        ctx.resolve_promise("link", &code)
    }

    /// Where the workflow is.
    pub fn status(ctx: &Context) -> HandlerResult<(String, Option<String>)> {
        let stage = ctx
            .get::<String>("stage")?
            .unwrap_or_else(|| "not started".into());
        let link = ctx.peek_promise::<String>("link").transpose()?;
        Ok((stage, link))
    }
}

/// Retries and cancellation.
pub struct Trip;

#[cairn_sdk::service]
impl Trip {
    /// Call `url` in a step until it answers 200 (retryable otherwise).
    pub fn fetch(ctx: &Context, url: String) -> HandlerResult<String> {
        ctx.run("fetch", || {
            let r = cairn_sdk::http::get(&url)?;
            match r.status {
                200 => Ok(String::from_utf8_lossy(&r.body).into_owned()),
                s => Err(HandlerError::retryable(format!("status {s}"))),
            }
        })
    }

    /// Like `fetch`, but the step retries in place: at most 3 runs.
    pub fn fetch_step(ctx: &Context, url: String) -> HandlerResult<String> {
        ctx.run_with_retry("fetch", StepRetry::attempts(3), || {
            let r = cairn_sdk::http::get(&url)?;
            match r.status {
                200 => Ok(String::from_utf8_lossy(&r.body).into_owned()),
                s => Err(HandlerError::retryable(format!("status {s}"))),
            }
        })
    }

    /// Book, then wait an hour for confirmation; if cancelled meanwhile,
    /// compensate (logged to `Log/{key}`) and fail.
    pub fn book(ctx: &Context, key: String) -> HandlerResult<String> {
        ctx.send(Target::object("Log", &key, "add"), &"booked", None);
        match ctx.sleep(Duration::from_secs(3600)).wait() {
            Ok(()) => Ok("confirmed".into()),
            Err(e) => {
                ctx.send(Target::object("Log", &key, "add"), &"refunded", None);
                Err(e)
            }
        }
    }

    /// Call `Trip/book` and wait: cancelling this cancels the booking too.
    pub fn plan(ctx: &Context, key: String) -> HandlerResult<String> {
        ctx.call(Target::service("Trip", "book"), &key).wait()
    }
}

/// Two steps around a sleep; version 2 swaps the steps (a breaking change).
pub struct Steps2;

#[cairn_sdk::service]
impl Steps2 {
    /// Step, sleep `ms`, step.
    pub fn two(ctx: &Context, ms: u64) -> HandlerResult<String> {
        let order = if cfg!(feature = "v2") {
            ["b", "a"]
        } else {
            ["a", "b"]
        };
        let first: String = ctx.run(order[0], || Ok(order[0].to_string()))?;
        ctx.sleep(Duration::from_millis(ms)).wait()?;
        let second: String = ctx.run(order[1], || Ok(order[1].to_string()))?;
        Ok(first + &second)
    }

    /// The current time, journaled, twice across a sleep.
    pub fn clock(ctx: &Context) -> HandlerResult<(u64, u64, u64)> {
        let ms = |t: std::time::SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
        };
        let before = ms(ctx.now());
        ctx.sleep(Duration::from_millis(50)).wait()?;
        Ok((before, ms(ctx.now()), ctx.random_u64() % 1000))
    }
}

/// An event from a Kafka topic.
#[derive(serde::Deserialize)]
pub struct Event {
    /// Sequence number.
    pub n: u64,
    /// A slow outside call to make first, if any.
    #[serde(default)]
    pub url: Option<String>,
    /// A poison record: the handler panics on it (a trap, not retried).
    #[serde(default)]
    pub poison: bool,
}

/// What `Events` saw of a key's records.
#[derive(serde::Serialize, serde::Deserialize, Default)]
pub struct Seen {
    /// Sequence numbers, in processing order.
    pub numbers: Vec<u64>,
    /// The Kafka metadata and `x-trace` header of the last record.
    pub last: Vec<(String, String)>,
}

/// Per-key processing of Kafka events.
pub struct Events;

#[cairn_sdk::object]
impl Events {
    /// Record the event (after the outside call, if it has one).
    pub fn handle(ctx: &Context, event: Event) -> HandlerResult<usize> {
        assert!(!event.poison, "poison record {}", event.n);
        if let Some(url) = &event.url {
            ctx.run("call", || cairn_sdk::http::get(url).map(|r| r.status))?;
        }
        let mut seen = ctx.get::<Seen>("seen")?.unwrap_or_default();
        seen.numbers.push(event.n);
        seen.last = [
            "x-kafka-topic",
            "x-kafka-partition",
            "x-kafka-offset",
            "x-kafka-key",
            "x-kafka-timestamp",
            "x-trace",
        ]
        .iter()
        .filter_map(|h| Some((h.to_string(), ctx.header(h)?.to_string())))
        .collect();
        ctx.set("seen", &seen);
        Ok(seen.numbers.len())
    }

    /// What this key saw.
    #[shared]
    pub fn seen(ctx: &Context) -> HandlerResult<Seen> {
        Ok(ctx.get("seen")?.unwrap_or_default())
    }
}

/// Enrichment through a slow outside API, called by the host.
pub struct Enrich;

#[cairn_sdk::service]
impl Enrich {
    /// GET `url` through the host (the invocation may suspend meanwhile);
    /// returns the status and the body.
    pub fn lookup(ctx: &Context, url: String) -> HandlerResult<(u16, String)> {
        let response = ctx.http_call(cairn_sdk::HttpCall::get(&url)).wait()?;
        Ok((response.status, response.body))
    }

    /// Check `url` in a step, then look it up through a call to `lookup`:
    /// a chain of spans when the host exports traces.
    pub fn relay(ctx: &Context, url: String) -> HandlerResult<(u16, String)> {
        let url = ctx.run("check", || Ok(url.trim().to_string()))?;
        ctx.call(Target::service("Enrich", "lookup"), &url).wait()
    }
}

/// Durable produce to Kafka.
pub struct Emitter;

#[cairn_sdk::service]
impl Emitter {
    /// Produce `count` records (values 0..count, key `key`) to `topic` of
    /// cluster "local", one at a time, `pause_ms` apart.
    pub fn emit(ctx: &Context, req: (String, String, u64, u64)) -> HandlerResult<u64> {
        let (topic, key, count, pause_ms) = req;
        for i in 0..count {
            ctx.kafka_produce("local", &topic, Some(key.as_bytes()), &i)
                .wait()?;
            ctx.sleep(Duration::from_millis(pause_ms)).wait()?;
        }
        Ok(count)
    }
}

/// Text records (`amount=5`), not JSON: totals per key, each forwarded
/// as a raw record.
pub struct Lines;

#[cairn_sdk::object]
impl Lines {
    /// Add the line's amount to the key's total and send `key:total` as
    /// plain bytes to `[guest_env] LINES_OUT` (partition 0), with the
    /// source record's offset in header `x-source-offset`.
    pub fn ingest(ctx: &Context, line: Raw) -> HandlerResult<i64> {
        let text = String::from_utf8_lossy(&line.0);
        let amount: i64 = text
            .trim()
            .strip_prefix("amount=")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| TerminalError::with_code(400, format!("not amount=N: {text:?}")))?;
        let record = ctx
            .kafka_record()
            .ok_or_else(|| TerminalError::new("not created by a Kafka record"))?;
        let total = ctx.get::<i64>("total")?.unwrap_or(0) + amount;
        ctx.set("total", &total);
        let out = cairn_sdk::kafka::Record::new("local", &cairn_sdk::env("LINES_OUT")?)
            .key(ctx.key())
            .partition(0)
            .bytes(format!("{}:{total}", ctx.key()))
            .header("x-source-offset", record.offset.to_string());
        ctx.kafka_send(out).wait()?;
        Ok(total)
    }
}

cairn_sdk::export!(
    Sleeper, Log, Doubler, Tally, Chain, Approval, Signup, Trip, Steps2, Events, Emitter, Enrich,
    Lines
);
