//! Fault injection for the simulation: a redb storage backend that delays
//! and fails `fsync`, turned on by the `CAIRN_FAULTS` environment variable
//! (never by the config file, so no deployment enables it by mistake).
//!
//! `CAIRN_FAULTS="fsync_delay_ms=3,fsync_fail_per_million=2000,seed=7"`
//! makes every sync take 0..=3 ms longer and fail with the given odds. A
//! failed sync fails the commit, and a failed commit aborts the host (see
//! `commit`): the simulation then restarts it and checks that nothing that
//! was acknowledged is lost.
//!
//! `abort_after_dead_letter=1` aborts the host right after the broker
//! acknowledges a dead letter and before the store forgets it: the worst
//! moment for exactly-once dead letters (tests/pipelines.rs).
//!
//! Faults are armed once the host is ready ([`arm`]): opening the store and
//! recovery run clean, so every restart gets going. The schedule mixes the
//! seed with the process id, so a restarted host does not fail at exactly
//! the same commit again.

use redb::StorageBackend;
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

static ARMED: AtomicBool = AtomicBool::new(false);

/// Start injecting faults (the host is ready).
pub fn arm() {
    ARMED.store(true, Ordering::Relaxed);
}

/// The faults to inject, parsed from `CAIRN_FAULTS`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// Longest extra delay of one sync.
    pub fsync_delay_ms: u64,
    /// Odds that a sync fails, per million.
    pub fsync_fail_per_million: u64,
    /// Seed of the fault schedule.
    pub seed: u64,
    /// 1: abort after a dead letter is acknowledged, before its row goes.
    pub abort_after_dead_letter: u64,
}

impl Faults {
    /// The faults `CAIRN_FAULTS` asks for, if it is set.
    pub fn from_env() -> Option<Faults> {
        Self::parse(&std::env::var("CAIRN_FAULTS").ok()?)
    }

    /// Parse `name=value,...`; unknown names and bad values are ignored
    /// with a warning.
    pub fn parse(text: &str) -> Option<Faults> {
        let mut faults = Faults::default();
        for pair in text.split(',').filter(|p| !p.trim().is_empty()) {
            let (name, value) = pair.split_once('=')?;
            let Ok(value) = value.trim().parse::<u64>() else {
                tracing::warn!("CAIRN_FAULTS: {pair:?} is not name=number");
                continue;
            };
            match name.trim() {
                "fsync_delay_ms" => faults.fsync_delay_ms = value,
                "fsync_fail_per_million" => faults.fsync_fail_per_million = value,
                "seed" => faults.seed = value,
                "abort_after_dead_letter" => faults.abort_after_dead_letter = value,
                other => tracing::warn!("CAIRN_FAULTS: unknown fault {other:?}"),
            }
        }
        Some(faults)
    }
}

/// Abort here if `CAIRN_FAULTS` asks for `abort_after_dead_letter`.
pub fn after_dead_letter() {
    let asked = Faults::from_env().is_some_and(|f| f.abort_after_dead_letter == 1);
    if asked && ARMED.load(Ordering::Relaxed) {
        eprintln!("CAIRN_FAULTS: aborting after a dead letter was acknowledged");
        std::process::abort();
    }
}

/// A file backend whose syncs are slow and sometimes fail.
#[derive(Debug)]
pub struct FaultyBackend {
    inner: redb::backends::FileBackend,
    faults: Faults,
    rng: Mutex<u64>,
}

impl FaultyBackend {
    /// Wrap `file` with `faults`.
    pub fn new(file: std::fs::File, faults: Faults) -> std::io::Result<Self> {
        let inner = redb::backends::FileBackend::new(file).map_err(std::io::Error::other)?;
        Ok(FaultyBackend {
            inner,
            faults,
            rng: Mutex::new(faults.seed ^ (u64::from(std::process::id()) << 32)),
        })
    }

    /// The next number of the fault schedule (splitmix64).
    fn next(&self) -> u64 {
        let mut state = self.rng.lock().unwrap();
        *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

impl StorageBackend for FaultyBackend {
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> std::io::Result<()> {
        if !ARMED.load(Ordering::Relaxed) {
            return self.inner.sync_data();
        }
        if self.faults.fsync_delay_ms > 0 {
            let ms = self.next() % (self.faults.fsync_delay_ms + 1);
            std::thread::sleep(Duration::from_millis(ms));
        }
        if self.next() % 1_000_000 < self.faults.fsync_fail_per_million {
            return Err(std::io::Error::other(
                "injected fsync failure (CAIRN_FAULTS)",
            ));
        }
        self.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.inner.write(offset, data)
    }

    fn close(&self) -> std::io::Result<()> {
        self.inner.close()
    }

    fn try_lock_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), redb::BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<(), redb::BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), redb::BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.inner.query_lock_range(start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_from_pairs() {
        assert_eq!(
            Faults::parse("fsync_delay_ms=3, fsync_fail_per_million=2000,seed=7"),
            Some(Faults {
                fsync_delay_ms: 3,
                fsync_fail_per_million: 2000,
                seed: 7,
                abort_after_dead_letter: 0,
            })
        );
        assert_eq!(Faults::parse("nonsense"), None);
    }
}
