//! Cron schedules: a handler invoked on a cron expression.
//!
//! Each tick is one durable invocation whose id is derived from the
//! schedule's name and the tick's time, and whose idempotency key is
//! `cron:{name}:{tick ms}`. The schedule's last fired tick is stored in the
//! transaction that creates the tick's invocation, and a tick not later
//! than it never fires, so a tick fires once, even when the host restarts
//! around it long after the tick's idempotency key expired. At start, each schedule also fires its latest tick
//! that is already due (the one missed while the host was down, if any);
//! older missed ticks are skipped. Expressions have 5 fields, or 6 with
//! seconds first (`*/10 * * * * *`), in UTC.
//!
//! Lifecycle: schedules are stored in redb; each has a ticker task while it
//! exists. They come from the admin API (`/schedules`), the CLI
//! (`cairn schedules`) and the config file (`[[schedules]]`, registered at
//! start).

use crate::ids::InvocationId;
use crate::invoker::{Invoker, NewInvocation};
use crate::records::{ScheduleRecord, Target};
use crate::store::StoreError;
use chrono::{DateTime, Utc};
use croner::Cron;
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A schedule request was refused.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// Bad expression or target (400).
    #[error("{0}")]
    Invalid(String),
    /// No such schedule (404).
    #[error("schedule {0} not found")]
    NotFound(String),
    /// The store failed (500).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The schedules of a host and their tickers.
pub struct Schedules {
    invoker: Arc<Invoker>,
    tickers: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
}

impl Schedules {
    /// Register `configured` schedules, then start a ticker for every stored one.
    pub async fn start(
        invoker: Arc<Invoker>,
        configured: Vec<ScheduleRecord>,
    ) -> Result<Arc<Self>, ScheduleError> {
        let schedules = Arc::new(Schedules {
            invoker,
            tickers: Mutex::default(),
        });
        for record in configured {
            schedules.put(record).await?;
        }
        for record in schedules.invoker.store().schedules()? {
            schedules.launch(record)?;
        }
        Ok(schedules)
    }

    /// Create or replace a schedule.
    pub async fn put(
        self: &Arc<Self>,
        record: ScheduleRecord,
    ) -> Result<ScheduleRecord, ScheduleError> {
        parse(&record.cron)?;
        if record.name.is_empty()
            || !record
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(ScheduleError::Invalid(format!(
                "invalid schedule name {:?}",
                record.name
            )));
        }
        self.invoker
            .new_record(self.request(&record, 0))
            .map_err(|e| ScheduleError::Invalid(e.to_string()))?;
        let stored = record.clone();
        self.invoker
            .committer()
            .commit(move |t| t.put_schedule(&stored))
            .await;
        self.launch(record.clone())?;
        Ok(record)
    }

    /// Every schedule.
    pub fn list(&self) -> Result<Vec<ScheduleRecord>, ScheduleError> {
        Ok(self.invoker.store().schedules()?)
    }

    /// Delete a schedule; its past invocations stay.
    pub async fn delete(&self, name: &str) -> Result<(), ScheduleError> {
        let key = name.to_string();
        if !self
            .invoker
            .committer()
            .commit(move |t| t.remove_schedule(&key))
            .await
        {
            return Err(ScheduleError::NotFound(name.into()));
        }
        if let Some(ticker) = self.tickers.lock().unwrap().remove(name) {
            ticker.abort();
        }
        Ok(())
    }

    fn launch(self: &Arc<Self>, record: ScheduleRecord) -> Result<(), ScheduleError> {
        let cron = parse(&record.cron)?;
        let me = self.clone();
        let name = record.name.clone();
        let ticker = tokio::spawn(async move { me.tick(record, cron).await });
        if let Some(old) = self.tickers.lock().unwrap().insert(name, ticker) {
            old.abort();
        }
        Ok(())
    }

    async fn tick(self: Arc<Self>, record: ScheduleRecord, cron: Cron) {
        let now = Utc::now();
        if let Ok(due) = cron.find_previous_occurrence(&now, true) {
            self.fire(&record, due).await;
        }
        let mut after = now;
        loop {
            let Ok(next) = cron.find_next_occurrence(&after, false) else {
                tracing::warn!(schedule = %record.name, "no next occurrence; the schedule stops");
                return;
            };
            let wait = (next - Utc::now()).to_std().unwrap_or(Duration::ZERO);
            tokio::time::sleep(wait).await;
            self.fire(&record, next).await;
            after = next;
        }
    }

    async fn fire(&self, record: &ScheduleRecord, tick: DateTime<Utc>) {
        // Cron has second granularity; drop the sub-second part the search may carry.
        let tick_ms = tick.timestamp() * 1000;
        let invocation = match self.invoker.new_record(self.request(record, tick_ms)) {
            Ok(invocation) => invocation,
            Err(e) => return tracing::error!(schedule = %record.name, "tick not fired: {e}"),
        };
        let (invoker, name, tick_ms) = (self.invoker.clone(), record.name.clone(), tick_ms as u64);
        self.invoker
            .committer()
            .commit(move |t| {
                if t.last_tick(&name)?.is_some_and(|last| last >= tick_ms) {
                    return Ok(());
                }
                t.put_last_tick(&name, tick_ms)?;
                invoker.create(t, invocation).map(drop)
            })
            .await;
    }

    fn request(&self, record: &ScheduleRecord, tick_ms: i64) -> NewInvocation {
        let seed = format!("cron:{}:{tick_ms}", record.name);
        NewInvocation {
            id: Some(InvocationId::derived(
                &seed,
                self.invoker
                    .partitioning()
                    .key_for(&record.target, Some(&seed)),
            )),
            target: record.target.clone(),
            input: record.input.clone(),
            idempotency_key: Some(seed),
            ..Default::default()
        }
    }
}

fn parse(expression: &str) -> Result<Cron, ScheduleError> {
    Cron::from_str(expression)
        .map_err(|e| ScheduleError::Invalid(format!("invalid cron expression {expression:?}: {e}")))
}

/// A schedule from the config file.
pub fn from_config(c: &crate::config::ScheduleConfig) -> Result<ScheduleRecord, ScheduleError> {
    Ok(ScheduleRecord {
        name: c.name.clone(),
        cron: c.cron.clone(),
        target: parse_target(&c.target)?,
        input: c
            .input
            .as_ref()
            .map(|v| v.to_string().into_bytes())
            .unwrap_or_default(),
    })
}

/// Parse `Service/handler` or `Object/key/handler`.
pub fn parse_target(text: &str) -> Result<Target, ScheduleError> {
    let parts: Vec<&str> = text.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        [s, h] => Ok(Target {
            service: s.to_string(),
            handler: h.to_string(),
            key: None,
        }),
        [s, k, h] => Ok(Target {
            service: s.to_string(),
            handler: h.to_string(),
            key: Some(k.to_string()),
        }),
        _ => Err(ScheduleError::Invalid(format!(
            "target {text:?} is not Service/handler or Object/key/handler"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expressions_with_and_without_seconds_parse() {
        let every_minute = parse("* * * * *").unwrap();
        let at = DateTime::parse_from_rfc3339("2026-01-01T10:00:30Z")
            .unwrap()
            .with_timezone(&Utc);
        let next = every_minute.find_next_occurrence(&at, false).unwrap();
        assert_eq!(next.to_rfc3339(), "2026-01-01T10:01:00+00:00");
        let every_ten_seconds = parse("*/10 * * * * *").unwrap();
        assert_eq!(
            every_ten_seconds
                .find_next_occurrence(&at, false)
                .unwrap()
                .to_rfc3339(),
            "2026-01-01T10:00:40+00:00"
        );
        assert!(parse("not cron").is_err());
    }

    #[test]
    fn targets_parse() {
        assert_eq!(parse_target("A/b").unwrap().key, None);
        assert_eq!(parse_target("A/k/b").unwrap().key.as_deref(), Some("k"));
        assert!(parse_target("A").is_err());
    }
}
