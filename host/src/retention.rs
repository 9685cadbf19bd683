//! Retention: completed invocations are forgotten when their retention ends,
//! in small batches that keep pace with the host's completion rate.
//!
//! Why small batches: one writer applies every change of the host, so one
//! huge cleanup transaction would stall every invocation behind it. A batch
//! of [`BATCH`] invocations takes a few milliseconds; while expired
//! invocations remain the cleaner takes the next batch at once (each batch
//! is its own writer job, so invocations' own jobs interleave with them),
//! and when it has caught up it looks again after [`PERIOD`]. Forgetting
//! removes every row the invocation owns (see `Tables::forget`).

use crate::invoker::Invoker;
use std::sync::Arc;
use std::time::Duration;

/// Invocations forgotten per writer job.
pub const BATCH: usize = 256;

/// Pause between two looks when nothing had expired.
pub const PERIOD: Duration = Duration::from_secs(1);

/// Forget expired invocations, forever.
pub async fn clean(invoker: &Arc<Invoker>) {
    loop {
        match forget_batch(invoker).await {
            Ok(n) if n == BATCH => tokio::task::yield_now().await,
            Ok(_) => tokio::time::sleep(PERIOD).await,
            Err(e) => {
                tracing::warn!("retention cleanup: {e}");
                tokio::time::sleep(PERIOD).await;
            }
        }
    }
}

/// Forget one batch of expired invocations; how many it forgot.
pub async fn forget_batch(invoker: &Arc<Invoker>) -> Result<usize, crate::store::StoreError> {
    let expired = invoker.store().expired(invoker.now_ms(), BATCH)?;
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
