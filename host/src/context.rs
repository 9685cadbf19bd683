//! The host side of `cairn:runtime/context`: what a guest's calls do.
//!
//! Every journaled call takes the same path, [`DurableContext::durable`]:
//! the command is matched against the journal (replay returns the journaled
//! completion and executes nothing); a live command is executed, and the
//! command, its completion and its effect on state are written together by
//! the group-commit writer. Calls whose result escapes the invocation (a
//! `run` step's result) wait for that commit before returning; the others
//! are pipelined, which is safe because every later acknowledgement waits
//! for a later commit. The replay rules are therefore data (the
//! [`Command`] and its completion), not per-function code.

use crate::commit::Committer;
use crate::journal::{
    Command, Completion, CompletionValue, Entry, Issued, Journal, JournalMismatch, Outcome,
};
use crate::records::{HandlerKind, InvocationRecord};
use crate::runtime::bindings::cairn::runtime::{context, types as wit};
use crate::runtime::GuestState;
use crate::store::{Store, StoreResult, Tables};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use wasmtime::format_err;

/// Why the host stopped a guest.
#[derive(Debug, thiserror::Error)]
pub enum HostTrap {
    /// Replay diverged from the journal.
    #[error("{0}")]
    Mismatch(#[from] JournalMismatch),
    /// The guest broke a rule that retrying cannot fix.
    #[error("{0}")]
    Terminal(String),
    /// The guest used up its CPU budget.
    #[error("the guest ran out of its CPU budget")]
    CpuBudget,
}

fn terminal(message: impl Into<String>) -> wasmtime::Error {
    wasmtime::Error::new(HostTrap::Terminal(message.into()))
}

/// Everything an attempt needs to answer the guest durably.
pub struct DurableContext {
    record: Arc<InvocationRecord>,
    journal: Journal,
    store: Arc<Store>,
    committer: Committer,
    /// This attempt's own state writes, not necessarily committed yet.
    overlay: StateOverlay,
    /// The live `run` step between `run-enter` and `run-exit`, if any.
    step: Option<OpenStep>,
}

struct OpenStep {
    command: u32,
    entry: u32,
    name: String,
}

impl DurableContext {
    /// A context for one attempt of `record`, over its journal so far.
    pub fn new(
        record: Arc<InvocationRecord>,
        journal: Journal,
        store: Arc<Store>,
        committer: Committer,
    ) -> Self {
        DurableContext {
            record,
            journal,
            store,
            committer,
            overlay: StateOverlay::default(),
            step: None,
        }
    }

    /// The invocation.
    pub fn record(&self) -> &InvocationRecord {
        &self.record
    }

    /// The seed of the guest's random numbers: the same on every attempt.
    pub fn seed(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.record.id.hash(&mut h);
        h.finish()
    }

    fn key(&self) -> wasmtime::Result<(String, String)> {
        let t = &self.record.target;
        match &t.key {
            Some(key) => Ok((t.service.clone(), key.clone())),
            None => Err(terminal(format!(
                "service {} is stateless: it has no state",
                t.service
            ))),
        }
    }

    fn writable_key(&self) -> wasmtime::Result<(String, String)> {
        if self.record.handler_kind == HandlerKind::Shared {
            return Err(terminal(format!(
                "handler {} is shared: it may read state but not change it",
                self.record.target
            )));
        }
        self.key()
    }

    /// The one path of every journaled call; see the module docs.
    async fn durable(
        &mut self,
        command: Command,
        live: impl FnOnce(&mut Self) -> StoreResult<Option<CompletionValue>>,
    ) -> wasmtime::Result<Option<CompletionValue>> {
        if let Some(step) = &self.step {
            return Err(terminal(format!(
                "{} was called inside run step {:?}; steps may not use the context",
                command.signature(),
                step.name
            )));
        }
        let (index, entry) = match self.journal.issue(&command)? {
            Issued::Replayed(completion) => return Ok(completion),
            Issued::Live { command, entry } => (command, entry),
        };
        let completion = live(self)?;
        let completion_entry = completion.as_ref().map(|_| self.journal.reserve());
        self.overlay.apply(&command);
        let id = self.record.id.clone();
        let (service, key) = (
            self.record.target.service.clone(),
            self.record.target.key.clone(),
        );
        let answer = completion.clone();
        self.committer.append(move |t| {
            if let Some(key) = &key {
                apply_effect(t, &service, key, &command)?;
            }
            t.append(&id, entry, &Entry::Command(command))?;
            if let (Some(at), Some(value)) = (completion_entry, answer) {
                t.append(
                    &id,
                    at,
                    &Entry::Completion(Completion {
                        command: index,
                        value,
                    }),
                )?;
            }
            Ok(())
        });
        Ok(completion)
    }

    fn read_state(&self, name: &str) -> StoreResult<Option<Vec<u8>>> {
        let (service, key) = (
            &self.record.target.service,
            self.record.target.key.as_deref().unwrap_or_default(),
        );
        match self.overlay.get(name) {
            Some(value) => Ok(value),
            None => self.store.state(service, key, name),
        }
    }

    fn read_state_names(&self) -> StoreResult<Vec<String>> {
        let (service, key) = (
            &self.record.target.service,
            self.record.target.key.as_deref().unwrap_or_default(),
        );
        let stored = if self.overlay.cleared {
            Vec::new()
        } else {
            self.store.state_names(service, key)?
        };
        Ok(self.overlay.names(stored))
    }
}

/// Apply a command's effect on keyed state, inside its journal transaction.
fn apply_effect(
    t: &mut Tables<'_>,
    service: &str,
    key: &str,
    command: &Command,
) -> StoreResult<()> {
    match command {
        Command::SetState { name, value } => t.set_state(service, key, name, value),
        Command::ClearState { name } => t.clear_state(service, key, name),
        Command::ClearAllState => t.clear_all_state(service, key),
        Command::GetState { .. } | Command::GetStateKeys | Command::Run { .. } => Ok(()),
    }
}

/// State writes of the running attempt that may still be in the commit
/// queue: reads consult them first.
#[derive(Default)]
struct StateOverlay {
    cleared: bool,
    values: BTreeMap<String, Option<Vec<u8>>>,
}

impl StateOverlay {
    fn apply(&mut self, command: &Command) {
        match command {
            Command::SetState { name, value } => {
                self.values.insert(name.clone(), Some(value.clone()));
            }
            Command::ClearState { name } => {
                self.values.insert(name.clone(), None);
            }
            Command::ClearAllState => {
                self.cleared = true;
                self.values.clear();
            }
            Command::GetState { .. } | Command::GetStateKeys | Command::Run { .. } => {}
        }
    }

    /// `Some(value)` when this attempt decided the value, `None` to ask the store.
    fn get(&self, name: &str) -> Option<Option<Vec<u8>>> {
        match self.values.get(name) {
            Some(v) => Some(v.clone()),
            None if self.cleared => Some(None),
            None => None,
        }
    }

    fn names(&self, stored: Vec<String>) -> Vec<String> {
        let mut names: BTreeSet<String> = stored.into_iter().collect();
        for (name, value) in &self.values {
            if value.is_some() {
                names.insert(name.clone());
            } else {
                names.remove(name);
            }
        }
        names.into_iter().collect()
    }
}

fn expect_state(c: Option<CompletionValue>) -> wasmtime::Result<Option<Vec<u8>>> {
    match c {
        Some(CompletionValue::State(v)) => Ok(v),
        other => Err(format_err!(
            "corrupt journal: expected a state value, found {other:?}"
        )),
    }
}

fn to_wit(outcome: Outcome) -> wit::Outcome {
    match outcome {
        Outcome::Success(bytes) => wit::Outcome::Success(bytes),
        Outcome::Failure { code, message } => {
            wit::Outcome::Failure(wit::TerminalError { code, message })
        }
    }
}

impl wit::Host for GuestState {}

impl context::Host for GuestState {
    async fn input(&mut self) -> wasmtime::Result<context::InvocationInput> {
        let r = self.durable()?.record();
        Ok(context::InvocationInput {
            invocation_id: r.id.to_string(),
            service: r.target.service.clone(),
            handler: r.target.handler.clone(),
            key: r.target.key.clone(),
            payload: r.input.clone(),
            headers: r
                .headers
                .iter()
                .map(|(name, value)| wit::Header {
                    name: name.clone(),
                    value: value.clone(),
                })
                .collect(),
        })
    }

    async fn state_get(&mut self, name: String) -> wasmtime::Result<Option<Vec<u8>>> {
        let d = self.durable()?;
        d.key()?;
        let read = name.clone();
        let c = d
            .durable(Command::GetState { name }, move |d| {
                Ok(Some(CompletionValue::State(d.read_state(&read)?)))
            })
            .await?;
        expect_state(c)
    }

    async fn state_set(&mut self, name: String, value: Vec<u8>) -> wasmtime::Result<()> {
        let d = self.durable()?;
        d.writable_key()?;
        d.durable(Command::SetState { name, value }, |_| Ok(None))
            .await?;
        Ok(())
    }

    async fn state_clear(&mut self, name: String) -> wasmtime::Result<()> {
        let d = self.durable()?;
        d.writable_key()?;
        d.durable(Command::ClearState { name }, |_| Ok(None))
            .await?;
        Ok(())
    }

    async fn state_clear_all(&mut self) -> wasmtime::Result<()> {
        let d = self.durable()?;
        d.writable_key()?;
        d.durable(Command::ClearAllState, |_| Ok(None)).await?;
        Ok(())
    }

    async fn state_keys(&mut self) -> wasmtime::Result<Vec<String>> {
        let d = self.durable()?;
        d.key()?;
        match d
            .durable(Command::GetStateKeys, |d| {
                Ok(Some(CompletionValue::StateKeys(d.read_state_names()?)))
            })
            .await?
        {
            Some(CompletionValue::StateKeys(names)) => Ok(names),
            other => Err(format_err!(
                "corrupt journal: expected state names, found {other:?}"
            )),
        }
    }

    async fn run_enter(&mut self, name: String) -> wasmtime::Result<Option<wit::Outcome>> {
        let d = self.durable()?;
        if let Some(open) = &d.step {
            return Err(terminal(format!(
                "run step {name:?} started inside run step {:?}",
                open.name
            )));
        }
        match d.journal.issue(&Command::Run { name: name.clone() })? {
            Issued::Replayed(Some(CompletionValue::Outcome(outcome))) => Ok(Some(to_wit(outcome))),
            Issued::Replayed(other) => Err(format_err!(
                "corrupt journal: step {name:?} has completion {other:?}"
            )),
            Issued::Live { command, entry } => {
                d.step = Some(OpenStep {
                    command,
                    entry,
                    name,
                });
                self.set_in_step(true);
                Ok(None)
            }
        }
    }

    async fn run_exit(&mut self, step_outcome: wit::Outcome) -> wasmtime::Result<()> {
        self.set_in_step(false);
        let d = self.durable()?;
        let step = d
            .step
            .take()
            .ok_or_else(|| terminal("run-exit without a matching run-enter"))?;
        let outcome = match step_outcome {
            wit::Outcome::Success(bytes) => Outcome::Success(bytes),
            wit::Outcome::Failure(t) => Outcome::Failure {
                code: t.code,
                message: t.message,
            },
        };
        let completion_entry = d.journal.reserve();
        let id = d.record.id.clone();
        d.committer
            .commit(move |t| {
                t.append(
                    &id,
                    step.entry,
                    &Entry::Command(Command::Run { name: step.name }),
                )?;
                let value = CompletionValue::Outcome(outcome);
                t.append(
                    &id,
                    completion_entry,
                    &Entry::Completion(Completion {
                        command: step.command,
                        value,
                    }),
                )
            })
            .await;
        Ok(())
    }

    async fn await_(&mut self, pending: u32) -> wasmtime::Result<wit::Outcome> {
        Err(terminal(format!(
            "unknown handle {pending}: this host version issues no pending operations"
        )))
    }

    async fn await_any(&mut self, pending: Vec<u32>) -> wasmtime::Result<u32> {
        Err(terminal(format!(
            "unknown handles {pending:?}: this host version issues no pending operations"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_overlay_shadows_the_store_until_commit() {
        let mut o = StateOverlay::default();
        assert_eq!(o.get("a"), None, "unknown names are read from the store");
        o.apply(&Command::SetState {
            name: "a".into(),
            value: b"1".to_vec(),
        });
        o.apply(&Command::ClearState { name: "b".into() });
        assert_eq!(o.get("a"), Some(Some(b"1".to_vec())));
        assert_eq!(o.get("b"), Some(None));
        assert_eq!(o.names(vec!["b".into(), "c".into()]), vec!["a", "c"]);
        o.apply(&Command::ClearAllState);
        assert_eq!(o.get("c"), Some(None), "clear-all hides stored values");
    }
}
