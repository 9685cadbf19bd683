//! The handler's view of its invocation: input, keyed state, durable steps.
//!
//! Every method is a thin, typed wrapper over one `cairn:runtime/context`
//! import; the host journals each call, so the wrappers hold no state of
//! their own beyond the invocation's input.

use crate::bindings::cairn::runtime::{context as host, types as wit};
use crate::{HandlerError, TerminalError};
use serde::{de::DeserializeOwned, Serialize};

/// The context of one invocation, handed to every handler.
pub struct Context {
    input: host::InvocationInput,
}

impl Context {
    pub(crate) fn current() -> Self {
        Context {
            input: host::input(),
        }
    }

    /// The invocation's id (`inv_...`), stable across retries and replays.
    pub fn invocation_id(&self) -> &str {
        &self.input.invocation_id
    }

    /// The object key or workflow id; empty for plain services.
    pub fn key(&self) -> &str {
        self.input.key.as_deref().unwrap_or_default()
    }

    /// The value of a request header, if present (names are lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.input
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_str())
    }

    /// The raw request body.
    pub fn payload(&self) -> &[u8] {
        &self.input.payload
    }

    /// Read the state value `name` of this key (JSON-decoded).
    pub fn get<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, HandlerError> {
        host::state_get(name)
            .map(|bytes| {
                serde_json::from_slice(&bytes).map_err(|e| {
                    TerminalError::new(format!("state value {name:?} does not decode: {e}")).into()
                })
            })
            .transpose()
    }

    /// Set the state value `name` of this key (exclusive handlers only).
    pub fn set<T: Serialize>(&self, name: &str, value: &T) {
        let bytes = serde_json::to_vec(value).expect("state values serialize to JSON");
        host::state_set(name, &bytes);
    }

    /// Remove the state value `name` of this key.
    pub fn clear(&self, name: &str) {
        host::state_clear(name);
    }

    /// Remove every state value of this key.
    pub fn clear_all(&self) {
        host::state_clear_all();
    }

    /// The names of this key's state values, sorted.
    pub fn state_keys(&self) -> Vec<String> {
        host::state_keys()
    }

    /// Run `step` durably under `name`: its result (a value, or a terminal
    /// error) is journaled, and on replay returned without running `step`
    /// again. A retryable error is not journaled: the invocation is retried
    /// and the step runs again.
    ///
    /// Side effects (HTTP calls, reading the clock, random numbers) belong
    /// inside a step.
    pub fn run<T, F>(&self, name: &str, step: F) -> Result<T, HandlerError>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Result<T, HandlerError>,
    {
        if let Some(recorded) = host::run_enter(name) {
            return decode_outcome(name, recorded);
        }
        match step() {
            Ok(value) => {
                let bytes = serde_json::to_vec(&value).map_err(|e| {
                    TerminalError::new(format!("result of step {name:?} does not encode: {e}"))
                })?;
                host::run_exit(&wit::Outcome::Success(bytes));
                Ok(value)
            }
            Err(e) => match e.as_terminal() {
                Some(t) => {
                    host::run_exit(&wit::Outcome::Failure(t.clone().into_wit()));
                    Err(e)
                }
                None => Err(e),
            },
        }
    }
}

fn decode_outcome<T: DeserializeOwned>(
    name: &str,
    outcome: wit::Outcome,
) -> Result<T, HandlerError> {
    match outcome {
        wit::Outcome::Success(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            TerminalError::new(format!(
                "journaled result of step {name:?} does not decode: {e}"
            ))
            .into()
        }),
        wit::Outcome::Failure(t) => Err(TerminalError::from_wit(t).into()),
    }
}
