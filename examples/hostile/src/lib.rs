//! Handlers that attack the host the way an untrusted upload could, for the
//! security tests and the hostile stress benchmark (README, "Security
//! model"). Each one names the guard that stops it.
//!
//! - `Hostile`: a stateless service of attacks.
//! - `Vault`: a virtual object that stores whatever it is given.

use cairn_sdk::prelude::*;
use serde::Serialize;
use std::time::Duration;

/// Attacks on the host, one handler each.
pub struct Hostile;

/// Random numbers a guest drew, outside and inside a `run` step.
#[derive(Serialize)]
pub struct Draws {
    /// Drawn outside steps: seeded from the invocation id.
    pub outside: u64,
    /// Drawn inside a step: from the host's secure generator.
    pub inside: u64,
}

#[cairn_sdk::service]
impl Hostile {
    /// A durable HTTP POST to `url`; the status the host answered with.
    /// Stopped by `http_allow`, checked at every redirect hop.
    pub fn post(ctx: &Context, url: String) -> HandlerResult<u16> {
        let response = ctx
            .http_call(HttpCall::post_json(&url, &"scale=1000").attempts(1))
            .wait()?;
        Ok(response.status)
    }

    /// Blocks in WASI for `secs` seconds. Stopped by the wall-clock budget.
    pub fn nap(_ctx: &Context, secs: u64) -> HandlerResult<()> {
        std::thread::sleep(Duration::from_secs(secs));
        Ok(())
    }

    /// Never returns. Stopped by the CPU budget and the service's CPU turns.
    pub fn spin(_ctx: &Context) -> HandlerResult<()> {
        let mut x: u64 = 0;
        loop {
            x = std::hint::black_box(x.wrapping_add(1));
        }
    }

    /// Touches `mib` MiB and holds them for `hold_ms` (blocked in WASI).
    /// Stopped by the memory cap and the host's memory budget.
    pub fn grow(_ctx: &Context, size: (usize, u64)) -> HandlerResult<usize> {
        let (mib, hold_ms) = size;
        let block = std::hint::black_box(vec![1u8; mib * 1024 * 1024]);
        std::thread::sleep(Duration::from_millis(hold_ms));
        Ok(block.len() / (1024 * 1024))
    }

    /// Panics: a trap that a replay repeats, so the invocation pauses.
    pub fn panic(_ctx: &Context) -> HandlerResult<()> {
        panic!("this handler always panics")
    }

    /// Recurses until the stack overflows.
    pub fn overflow(_ctx: &Context, depth: u64) -> HandlerResult<u64> {
        Ok(deep(std::hint::black_box(depth)))
    }

    /// Prints `lines` forged host log lines with ANSI colours on stderr.
    pub fn shout(_ctx: &Context, lines: u32) -> HandlerResult<()> {
        for i in 0..lines {
            eprintln!("\x1b[31mERROR\x1b[0m cairn::invoker: forged line {i}\r");
        }
        Ok(())
    }

    /// Returns `mib` MiB of output. Stopped by `limits.max_value_bytes`.
    pub fn big_output(_ctx: &Context, mib: usize) -> HandlerResult<String> {
        Ok("x".repeat(mib * 1024 * 1024))
    }

    /// Random numbers drawn outside and inside a `run` step.
    pub fn draws(ctx: &Context) -> HandlerResult<Draws> {
        let outside = ctx.random_u64();
        let inside = ctx.run("draw", || Ok(ctx.random_u64()))?;
        Ok(Draws { outside, inside })
    }

    /// Computes for `n` iterations (long enough to need CPU turns).
    pub fn crunch(_ctx: &Context, n: u64) -> HandlerResult<u64> {
        Ok(crunch(n))
    }

    /// Computes for `n` iterations, then waits for an awakeable nobody
    /// resolves: it must not keep its service's CPU turn while it waits.
    pub fn crunch_then_wait(ctx: &Context, n: u64) -> HandlerResult<u64> {
        let sum = crunch(n);
        let (_id, never) = ctx.awakeable::<()>();
        never.wait()?;
        Ok(sum)
    }

    /// Takes `n` durable naps of 30 ms: not hostile, but its time is spent
    /// waiting on the host, which no CPU budget may count.
    pub fn patient(ctx: &Context, n: u32) -> HandlerResult<u32> {
        for _ in 0..n {
            ctx.sleep(Duration::from_millis(30)).wait()?;
        }
        Ok(n)
    }

    /// Waits for an awakeable nobody resolves.
    pub fn forever(ctx: &Context) -> HandlerResult<()> {
        let (_id, never) = ctx.awakeable::<()>();
        never.wait()
    }
}

fn crunch(n: u64) -> u64 {
    (0..n).fold(0u64, |acc, i| std::hint::black_box(acc.wrapping_add(i)))
}

fn deep(n: u64) -> u64 {
    if n == 0 {
        return 0;
    }
    let frame = std::hint::black_box([n; 64]);
    deep(n - 1).wrapping_add(frame[(n % 64) as usize])
}

/// Stores what it is given.
pub struct Vault;

#[cairn_sdk::object]
impl Vault {
    /// Stores `mib` MiB under "blob". Stopped by `limits.max_value_bytes`.
    pub fn put(ctx: &Context, mib: usize) -> HandlerResult<()> {
        ctx.set("blob", &"x".repeat(mib * 1024 * 1024));
        Ok(())
    }

    /// Stores `mib` MiB under "blob" `times` times over. Each large write
    /// waits for its commit, so the host's commit queue never holds more
    /// than one of them.
    pub fn fill(ctx: &Context, size: (usize, u32)) -> HandlerResult<u32> {
        let (mib, times) = size;
        let blob = "x".repeat(mib * 1024 * 1024);
        for _ in 0..times {
            ctx.set("blob", &blob);
        }
        Ok(times)
    }
}

cairn_sdk::export!(Hostile, Vault);
