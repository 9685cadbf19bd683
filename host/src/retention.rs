//! Retention: completed invocations are forgotten when their retention ends,
//! in small batches that keep pace with the host's completion rate.
//!
//! Why small batches: one writer applies every change of the host, and
//! every job that shares a transaction with a cleanup batch waits for it.
//! A batch of 256 takes about 5 ms of writer time; looked for once a second,
//! a steady 5,000 completions a second came back as twenty such batches in
//! a row, and the p99 from a Kafka record to its handler's completion went
//! from 9-14 ms (retention out of the window) to 15-31 ms. So the cleaner
//! looks again [`PACE`] after a batch that emptied the backlog, and starts
//! at [`MIN_BATCH`] (about a millisecond); while batches come back full it
//! doubles them, up to [`MAX_BATCH`], so that a backlog built at the peak
//! rate (each batch is one job, awaited, so at most one a transaction)
//! still drains. When nothing has expired it looks again after [`PERIOD`].
//! Forgetting removes every row the invocation owns (see `Tables::forget`).

use crate::invoker::Invoker;
use std::sync::Arc;
use std::time::Duration;

/// Invocations forgotten by the first batch after a pause.
pub const MIN_BATCH: usize = 64;

/// Invocations forgotten per writer job at most.
pub const MAX_BATCH: usize = 1024;

/// Pause after a batch that found fewer expired invocations than it could take.
pub const PACE: Duration = Duration::from_millis(20);

/// Pause between two looks when nothing had expired.
pub const PERIOD: Duration = Duration::from_secs(1);

/// Forget expired invocations, forever.
pub async fn clean(invoker: &Arc<Invoker>) {
    let mut size = MIN_BATCH;
    loop {
        let (next, pause) = match forget_batch(invoker, size).await {
            Ok(found) => after(size, found),
            Err(e) => {
                tracing::warn!("retention cleanup: {e}");
                (MIN_BATCH, PERIOD)
            }
        };
        size = next;
        match pause.is_zero() {
            true => tokio::task::yield_now().await,
            false => tokio::time::sleep(pause).await,
        }
    }
}

/// After a batch of `size` that found `found` expired invocations: the
/// next batch's size, and the pause before it.
fn after(size: usize, found: usize) -> (usize, Duration) {
    match found {
        0 => (MIN_BATCH, PERIOD),
        n if n == size => ((size * 2).min(MAX_BATCH), Duration::ZERO),
        _ => (MIN_BATCH, PACE),
    }
}

/// Forget up to `limit` expired invocations in one writer job; how many
/// it forgot.
pub async fn forget_batch(
    invoker: &Arc<Invoker>,
    limit: usize,
) -> Result<usize, crate::store::StoreError> {
    let expired = invoker.store().expired(invoker.now_ms(), limit)?;
    let count = expired.len();
    if count == 0 {
        return Ok(0);
    }
    let me = invoker.clone();
    invoker
        .committer()
        .commit(move |t| {
            for (at, id) in &expired {
                let timers = t.forget(*at, id)?;
                me.drop_timers(id, timers);
            }
            Ok(())
        })
        .await;
    tracing::debug!(count, "forgot expired invocations");
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_batches_double_up_to_the_cap_and_a_partial_one_starts_small_again() {
        let mut size = MIN_BATCH;
        let mut sizes = vec![size];
        for _ in 0..6 {
            let (next, pause) = after(size, size);
            assert_eq!(pause, Duration::ZERO, "a full batch: at once again");
            size = next;
            sizes.push(size);
        }
        assert_eq!(sizes, [64, 128, 256, 512, 1024, 1024, 1024]);
        assert_eq!(after(1024, 10), (MIN_BATCH, PACE), "caught up: look soon");
        assert_eq!(after(256, 0), (MIN_BATCH, PERIOD), "nothing expired");
    }
}
