//! Group commit: one writer thread turns the writes of all concurrent
//! invocations into few durable redb transactions.
//!
//! Why: an fsync costs about as much for one journal entry as for a
//! thousand. Every write is a [`Job`] sent to the writer; the writer takes
//! every job waiting in its queue, applies them in order inside one write
//! transaction, commits it durably, and only then runs each job's
//! continuation (which wakes the waiting guest or HTTP client). So nothing
//! is acknowledged before the commit behind it, and continuations run in
//! commit order.
//!
//! Lifecycle: [`Committer::start`] spawns the thread; it stops when the
//! last `Committer` handle is dropped, after finishing the queued jobs, or
//! at [`Committer::stop`] (a cluster host handing a partition over), which
//! drops what is still queued: those jobs are never applied nor answered,
//! as if the host had crashed before their commit.
//!
//! In cluster mode the writer has a [`Log`]: the changes of each
//! transaction (captured by [`crate::changelog`]) are appended to it, and
//! only once the log has them does the redb transaction commit. The local
//! store therefore never gets ahead of the log that a new owner restores
//! from.
//!
//! A failed commit is fatal: the process aborts and recovery replays from
//! the last durable transaction. Continuing after a failed fsync could
//! acknowledge writes that are not on disk.

use crate::changelog::{Capture, Captured};
use crate::clock::{Clock, SystemClock};
use crate::store::{Store, StoreResult, Tables};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

/// Runs after the transaction that applied the job is durable.
pub type Continuation = Box<dyn FnOnce() + Send>;

/// A unit of work for the writer: changes to apply, and what to do once
/// they are durable.
pub type Job = Box<dyn FnOnce(&mut Tables<'_>) -> StoreResult<Continuation> + Send>;

/// Where a transaction's changes go before the local store commits them
/// (cluster mode: a Kafka changelog).
pub trait Log: Send {
    /// Make a transaction's changes and outgoing messages durable, in
    /// order; returns the log position after them. An error is fatal: the
    /// host stops before it acknowledges.
    fn append(&mut self, captured: Captured) -> anyhow::Result<u64>;

    /// The partitions that receive this one's changes of shared tables
    /// (partition 0 of a cluster sends them to all others).
    fn sharing_with(&self) -> std::ops::Range<u32> {
        0..0
    }
}

/// Largest number of jobs in one transaction.
const MAX_BATCH: usize = 4096;

/// Handle to the group-commit writer.
#[derive(Clone)]
pub struct Committer {
    queue: mpsc::Sender<Job>,
    stats: Arc<Stats>,
    stopped: Arc<AtomicBool>,
    thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

/// Counters of the writer, for the admin API and the benchmark.
#[derive(Debug, Default)]
pub struct Stats {
    /// Durable transactions committed.
    pub transactions: AtomicU64,
    /// Jobs applied in them.
    pub jobs: AtomicU64,
}

impl Committer {
    /// Start the writer thread over `store` (standalone mode).
    pub fn start(store: Arc<Store>) -> Self {
        Self::start_with_log(store, None, 0)
    }

    /// Start the writer thread over `store` of `partition`, appending every
    /// transaction's changes to `log` first, if any.
    pub fn start_with_log(store: Arc<Store>, log: Option<Box<dyn Log>>, partition: u32) -> Self {
        let (queue, jobs) = mpsc::channel::<Job>();
        let stats = Arc::new(Stats::default());
        let stopped = Arc::new(AtomicBool::new(false));
        let (counters, stop) = (stats.clone(), stopped.clone());
        let thread = std::thread::Builder::new()
            .name("cairn-commit".into())
            .spawn(move || writer(&store, log, jobs, &counters, &stop, partition))
            .expect("the commit thread starts");
        Committer {
            queue,
            stats,
            stopped,
            thread: Arc::new(Mutex::new(Some(thread))),
        }
    }

    /// Stop the writer after the transaction it is writing; jobs queued
    /// or submitted later are dropped unapplied. Returns once the writer
    /// is gone, so nothing more reaches the store or the log.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        let _ = self
            .queue
            .send(Box::new(|_| Ok(Box::new(|| ()) as Continuation)));
        let thread = self.thread.lock().unwrap().take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }

    /// `(transactions, jobs)` committed so far.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.stats.transactions.load(Ordering::Relaxed),
            self.stats.jobs.load(Ordering::Relaxed),
        )
    }

    /// Queue a job; its continuation runs after its commit.
    pub fn submit(&self, job: Job) {
        if self.queue.send(job).is_err() && !self.stopped.load(Ordering::SeqCst) {
            tracing::error!("the commit writer is gone; aborting so that recovery takes over");
            std::process::abort();
        }
    }

    /// Apply `f` in the next transaction and return its result once that
    /// transaction is durable.
    pub async fn commit<R, F>(&self, f: F) -> R
    where
        R: Send + 'static,
        F: FnOnce(&mut Tables<'_>) -> StoreResult<R> + Send + 'static,
    {
        self.commit_queued(f)
            .await
            .expect("the commit writer answers every job until the partition moves")
    }

    /// Queue `f` now; the receiver yields its result once it is durable.
    pub fn commit_queued<R, F>(&self, f: F) -> tokio::sync::oneshot::Receiver<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Tables<'_>) -> StoreResult<R> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(Box::new(move |tables| {
            let result = f(tables)?;
            Ok(Box::new(move || {
                let _ = tx.send(result);
            }) as Continuation)
        }));
        rx
    }

    /// Queue `f` now for the next transaction; the continuation it returns runs
    /// on the writer, in commit order, before the result is answered. Use
    /// this for every continuation that delivers a completion: deliveries
    /// then reach a running attempt in journal order, so a live
    /// `await-any` picks the same winner as a replay.
    pub fn commit_in_order<R, F>(&self, f: F) -> impl std::future::Future<Output = R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Tables<'_>) -> StoreResult<(R, Option<Continuation>)> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(Box::new(move |tables| {
            let (result, then) = f(tables)?;
            Ok(Box::new(move || {
                if let Some(then) = then {
                    then();
                }
                let _ = tx.send(result);
            }) as Continuation)
        }));
        async {
            rx.await
                .expect("the commit writer answers every job until the partition moves")
        }
    }

    /// Wait until everything queued so far is durable.
    pub async fn barrier(&self) {
        self.commit(|_| Ok(())).await
    }

    /// Apply `f` in the next transaction without waiting. Later jobs commit
    /// in the same or a later transaction, so waiting for any later job
    /// also waits for this one.
    pub fn append<F>(&self, f: F)
    where
        F: FnOnce(&mut Tables<'_>) -> StoreResult<()> + Send + 'static,
    {
        self.submit(Box::new(move |tables| {
            f(tables)?;
            Ok(Box::new(|| ()) as Continuation)
        }));
    }
}

fn writer(
    store: &Store,
    mut log: Option<Box<dyn Log>>,
    jobs: mpsc::Receiver<Job>,
    stats: &Stats,
    stopped: &AtomicBool,
    partition: u32,
) {
    let labels = [("partition", partition.to_string())];
    let batch_jobs = metrics::histogram!("cairn_commit_batch_jobs", &labels);
    let latency = metrics::histogram!("cairn_commit_duration_seconds", &labels);
    while let Ok(first) = jobs.recv() {
        if stopped.load(Ordering::SeqCst) {
            return;
        }
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let size = batch.len();
        let started = std::time::Instant::now();
        match apply(store, log.as_deref_mut(), batch) {
            Ok(continuations) => {
                tracing::trace!(jobs = size, "group commit");
                latency.record(started.elapsed().as_secs_f64());
                batch_jobs.record(size as f64);
                stats.transactions.fetch_add(1, Ordering::Relaxed);
                stats.jobs.fetch_add(size as u64, Ordering::Relaxed);
                continuations.into_iter().for_each(|c| c());
            }
            Err(e) => {
                tracing::error!("commit failed: {e}; aborting so that recovery takes over");
                std::process::abort();
            }
        }
    }
}

fn apply(
    store: &Store,
    log: Option<&mut (dyn Log + 'static)>,
    batch: Vec<Job>,
) -> anyhow::Result<Vec<Continuation>> {
    let txn = store.begin_write()?;
    let capture = match log {
        Some(_) => Capture::on(),
        None => Capture::off(),
    };
    let continuations = {
        let mut tables = Tables::open_capturing(&txn, capture.clone())?;
        let continuations = batch
            .into_iter()
            .map(|job| job(&mut tables))
            .collect::<StoreResult<Vec<_>>>()?;
        let mut captured = capture.take();
        if let (Some(log), false) = (log, captured.is_empty()) {
            crate::partition::share(&mut captured, log.sharing_with());
            let next = log.append(captured)?;
            // The owner's copy is at the head of the log by definition.
            tables.set_changelog_position(next, SystemClock.now_ms())?;
        }
        continuations
    };
    txn.commit()
        .map_err(|e| crate::store::StoreError::Redb(e.into()))?;
    Ok(continuations)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::InvocationId;
    use crate::journal::{Command, Entry};

    #[tokio::test]
    async fn concurrent_jobs_are_durable_when_answered() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let committer = Committer::start(store.clone());
        let id = InvocationId::generate(0);
        let writers = (0..200u32).map(|i| {
            let committer = committer.clone();
            let id = id.clone();
            tokio::spawn(async move {
                committer
                    .commit(move |t| {
                        t.append(
                            &id,
                            &Entry::Command(Command::Run {
                                name: i.to_string(),
                            }),
                        )?;
                        Ok(i)
                    })
                    .await
            })
        });
        let mut answers = Vec::new();
        for w in writers {
            answers.push(w.await.unwrap());
        }
        answers.sort();
        assert_eq!(answers, (0..200).collect::<Vec<_>>());
        assert_eq!(store.journal(&id).unwrap().len(), 200);
    }

    #[tokio::test]
    async fn jobs_queued_during_a_commit_share_the_next_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let committer = Committer::start(Arc::new(Store::open(dir.path()).unwrap()));
        // The first job holds the writer until 99 more are queued.
        let (go, wait) = mpsc::channel::<()>();
        committer.submit(Box::new(move |_| {
            wait.recv().unwrap();
            Ok(Box::new(|| ()) as Continuation)
        }));
        let (done, answers) = mpsc::channel::<()>();
        for _ in 1..100 {
            let done = done.clone();
            committer.submit(Box::new(move |_| {
                Ok(Box::new(move || done.send(()).unwrap()) as Continuation)
            }));
        }
        go.send(()).unwrap();
        for _ in 1..100 {
            answers.recv().unwrap();
        }
        let (transactions, jobs) = committer.stats();
        assert_eq!(jobs, 100);
        assert!(
            transactions <= 2,
            "100 jobs took {transactions} transactions"
        );
    }

    #[tokio::test]
    async fn continuations_run_in_submission_order() {
        let dir = tempfile::tempdir().unwrap();
        let committer = Committer::start(Arc::new(Store::open(dir.path()).unwrap()));
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let mut done_tx = Some(done_tx);
        for i in 0..100 {
            let order = order.clone();
            let done = if i == 99 { done_tx.take() } else { None };
            committer.submit(Box::new(move |_| {
                Ok(Box::new(move || {
                    order.lock().unwrap().push(i);
                    if let Some(d) = done {
                        let _ = d.send(());
                    }
                }) as Continuation)
            }));
        }
        done_rx.await.unwrap();
        assert_eq!(*order.lock().unwrap(), (0..100).collect::<Vec<_>>());
    }
}
