//! The handler's view of its invocation: input, keyed state, durable steps.
//!
//! Every method is a thin, typed wrapper over one `cairn:runtime/context`
//! import; the host journals each call, so the wrappers hold no state of
//! their own beyond the invocation's input.

use crate::bindings::cairn::runtime::{context as host, types as wit};
use crate::{HandlerError, TerminalError};
use serde::{de::DeserializeOwned, Serialize};
use std::marker::PhantomData;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How [`Context::run_with_retry`] retries a step in place.
#[derive(Debug, Clone, Copy)]
pub struct StepRetry {
    /// Runs of the closure before the step fails terminally.
    pub max_attempts: u32,
    /// Delay before the second run.
    pub initial_interval: Duration,
    /// Growth of the delay per run.
    pub factor: f64,
    /// Cap of the delay.
    pub max_interval: Duration,
}

impl StepRetry {
    /// `max_attempts` runs, 100 ms apart at first, doubling up to 10 s.
    pub fn attempts(max_attempts: u32) -> Self {
        StepRetry {
            max_attempts,
            initial_interval: Duration::from_millis(100),
            factor: 2.0,
            max_interval: Duration::from_secs(10),
        }
    }
}

/// What to call or send to: a service handler, or a handler of an object
/// key or workflow id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    service: String,
    handler: String,
    key: Option<String>,
}

impl Target {
    /// `Service/handler`.
    pub fn service(service: &str, handler: &str) -> Self {
        Target {
            service: service.into(),
            handler: handler.into(),
            key: None,
        }
    }

    /// `Object/key/handler`.
    pub fn object(object: &str, key: &str, handler: &str) -> Self {
        Target {
            service: object.into(),
            handler: handler.into(),
            key: Some(key.into()),
        }
    }

    /// `Workflow/id/handler`.
    pub fn workflow(workflow: &str, id: &str, handler: &str) -> Self {
        Self::object(workflow, id, handler)
    }

    fn to_wit(&self) -> host::CallTarget {
        host::CallTarget {
            service: self.service.clone(),
            handler: self.handler.clone(),
            key: self.key.clone(),
        }
    }
}

/// A durable operation in flight (a sleep, a call, an awakeable, a
/// promise). [`Pending::wait`] blocks until it completes; the host may
/// suspend the invocation meanwhile. Several can be raced with
/// [`Context::select`].
#[must_use = "a pending operation does nothing until it is waited for"]
pub struct Pending<T> {
    handle: u32,
    _result: PhantomData<T>,
}

impl<T: DeserializeOwned> Pending<T> {
    fn new(handle: u32) -> Self {
        Pending {
            handle,
            _result: PhantomData,
        }
    }

    /// Wait for the result: the value, or the terminal error it failed with.
    pub fn wait(self) -> Result<T, HandlerError> {
        decode_outcome("pending operation", host::await_(self.handle))
    }
}

/// An HTTP request that the host makes durably: see [`Context::http_call`].
#[derive(Debug, Clone)]
pub struct HttpCall {
    method: String,
    url: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    timeout: Duration,
    max_attempts: u32,
}

impl HttpCall {
    /// A request with this method (tried up to 3 times, 30 s each).
    pub fn new(method: &str, url: &str) -> Self {
        HttpCall {
            method: method.to_string(),
            url: url.to_string(),
            headers: Vec::new(),
            body: Vec::new(),
            timeout: Duration::from_secs(30),
            max_attempts: 3,
        }
    }

    /// `GET url`.
    pub fn get(url: &str) -> Self {
        Self::new("GET", url)
    }

    /// `POST url` with a JSON body.
    pub fn post_json<T: Serialize>(url: &str, body: &T) -> Self {
        let mut call = Self::new("POST", url).header("content-type", "application/json");
        call.body = serde_json::to_vec(body).expect("request bodies serialize to JSON");
        call
    }

    /// Add a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Time limit of one try.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Tries before a connection error, a 429 or a 5xx answer is final.
    pub fn attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts;
        self
    }
}

/// The response of an [`HttpCall`].
#[derive(Debug, Clone, serde::Deserialize)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// Body (UTF-8, lossy).
    pub body: String,
}

/// Where a durably produced record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub struct Produced {
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
}

/// Anything [`Context::select`] can race.
pub trait Selectable {
    /// The host handle.
    fn handle(&self) -> u32;
}

impl<T> Selectable for Pending<T> {
    fn handle(&self) -> u32 {
        self.handle
    }
}

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

    /// The Kafka record this invocation was created from, if a
    /// subscription created it: topic, partition, offset, timestamp, key
    /// and headers.
    pub fn kafka_record(&self) -> Option<crate::KafkaRecord> {
        let headers = self
            .input
            .headers
            .iter()
            .map(|h| (h.name.as_str(), h.value.as_str()));
        crate::KafkaRecord::from_headers(headers)
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
        self.finish_step(name, step())
    }

    /// Like [`Context::run`], but a retryable error retries the step in
    /// place, with backoff, up to `policy.max_attempts`; then the step fails
    /// terminally (and that failure is journaled). The invocation's own
    /// retry policy is not involved.
    pub fn run_with_retry<T, F>(
        &self,
        name: &str,
        policy: StepRetry,
        mut step: F,
    ) -> Result<T, HandlerError>
    where
        T: Serialize + DeserializeOwned,
        F: FnMut() -> Result<T, HandlerError>,
    {
        if let Some(recorded) = host::run_enter(name) {
            return decode_outcome(name, recorded);
        }
        let mut delay = policy.initial_interval;
        for attempt in 1.. {
            let result = step();
            match &result {
                Err(e) if e.as_terminal().is_none() => {
                    if attempt >= policy.max_attempts {
                        let message = format!("step {name:?} failed after {attempt} attempts: {e}");
                        return self.finish_step(name, Err(TerminalError::new(message).into()));
                    }
                    host::step_backoff(delay.as_millis() as u64);
                    delay = delay.mul_f64(policy.factor).min(policy.max_interval);
                }
                _ => return self.finish_step(name, result),
            }
        }
        unreachable!("the loop returns")
    }

    fn finish_step<T: Serialize>(
        &self,
        name: &str,
        result: Result<T, HandlerError>,
    ) -> Result<T, HandlerError> {
        match result {
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

impl Context {
    /// The current time, journaled: a replay sees the same instant.
    pub fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(host::now())
    }

    /// A random number.
    ///
    /// Outside `run` steps the numbers are seeded from the invocation id, so
    /// a replay draws the same numbers in the same order, and **so can
    /// anyone who knows the id** (a caller sees it in `x-restate-id`): never
    /// use them for secrets. Inside a `run` step the host's secure generator
    /// answers (as it does for every WASI random source there), and the step's
    /// result is journaled, so replays still agree:
    ///
    /// ```no_run
    /// # use cairn_sdk::prelude::*;
    /// # fn f(ctx: &Context) -> HandlerResult<()> {
    /// let nonce: u64 = ctx.run("nonce", || Ok(ctx.random_u64()))?;
    /// # Ok(()) }
    /// ```
    pub fn random_u64(&self) -> u64 {
        wasi::random::random::get_random_u64()
    }

    /// A durable timer: survives restarts; the invocation holds no instance
    /// while it sleeps for long.
    pub fn sleep(&self, duration: Duration) -> Pending<()> {
        Pending::new(host::sleep(duration.as_millis() as u64))
    }

    /// Call a handler; `wait()` on the result gives its output or its
    /// terminal error. Journaled before it is dispatched; the result comes
    /// back exactly once.
    pub fn call<I: Serialize, O: DeserializeOwned>(&self, target: Target, input: &I) -> Pending<O> {
        let payload = serde_json::to_vec(input).expect("call inputs serialize to JSON");
        Pending::new(host::call(&target.to_wit(), &payload))
    }

    /// Invoke a handler one-way, optionally after a delay; returns the new
    /// invocation's id.
    pub fn send<I: Serialize>(&self, target: Target, input: &I, delay: Option<Duration>) -> String {
        let payload = serde_json::to_vec(input).expect("send inputs serialize to JSON");
        host::send(
            &target.to_wit(),
            &payload,
            delay.map_or(0, |d| d.as_millis() as u64),
        )
    }

    /// Cancel an invocation by id, typically a delayed [`Context::send`]
    /// that should no longer fire. An invocation that has not started
    /// completes as cancelled without running; a running one sees its
    /// pending operations fail with "cancelled" (409) and may compensate.
    /// Unknown or finished invocations are left alone.
    pub fn cancel(&self, invocation_id: &str) {
        host::cancel(invocation_id);
    }

    /// An awakeable: give the id to an outside system, which completes it
    /// with `POST /restate/awakeables/{id}/resolve` (or `/reject`).
    pub fn awakeable<T: DeserializeOwned>(&self) -> (String, Pending<T>) {
        let (id, handle) = host::awakeable();
        (id, Pending::new(handle))
    }

    /// Resolve an awakeable with a value.
    pub fn resolve_awakeable<T: Serialize>(&self, id: &str, value: &T) {
        let bytes = serde_json::to_vec(value).expect("awakeable values serialize to JSON");
        host::complete_awakeable(id, &wit::Outcome::Success(bytes));
    }

    /// Reject an awakeable with a terminal error.
    pub fn reject_awakeable(&self, id: &str, message: &str) {
        let failure = TerminalError::new(message).into_wit();
        host::complete_awakeable(id, &wit::Outcome::Failure(failure));
    }

    /// A workflow's durable promise: completes when any handler of this
    /// workflow id resolves or rejects it.
    pub fn promise<T: DeserializeOwned>(&self, name: &str) -> Pending<T> {
        Pending::new(host::promise_get(name))
    }

    /// A promise's result if it is already completed.
    pub fn peek_promise<T: DeserializeOwned>(&self, name: &str) -> Option<Result<T, HandlerError>> {
        host::promise_peek(name).map(|o| decode_outcome(name, o))
    }

    /// Resolve a promise; a terminal error if it was already completed.
    pub fn resolve_promise<T: Serialize>(&self, name: &str, value: &T) -> Result<(), HandlerError> {
        let bytes = serde_json::to_vec(value).expect("promise values serialize to JSON");
        host::promise_complete(name, &wit::Outcome::Success(bytes))
            .map_err(|e| TerminalError::from_wit(e).into())
    }

    /// Reject a promise with a terminal error.
    pub fn reject_promise(&self, name: &str, message: &str) -> Result<(), HandlerError> {
        let failure = TerminalError::new(message).into_wit();
        host::promise_complete(name, &wit::Outcome::Failure(failure))
            .map_err(|e| TerminalError::from_wit(e).into())
    }

    /// Produce a record to `topic` of the registered Kafka cluster
    /// `cluster`, durably: journaled before it is sent, retried until the
    /// broker acknowledges it, and tagged with a `cairn-produce-id` header
    /// unique to this step, so Cairn subscriptions see it exactly once.
    pub fn kafka_produce<V: Serialize>(
        &self,
        cluster: &str,
        topic: &str,
        key: Option<&[u8]>,
        value: &V,
    ) -> Pending<Produced> {
        let bytes = serde_json::to_vec(value).expect("record values serialize to JSON");
        Pending::new(host::kafka_produce(cluster, topic, key, &bytes))
    }

    /// Produce `record` durably, like [`Context::kafka_produce`], with its
    /// headers, its value as given (no JSON encoding) and its partition, if
    /// it names one.
    pub fn kafka_send(&self, record: crate::kafka::Record) -> Pending<Produced> {
        let message = host::KafkaRecord {
            cluster: record.cluster,
            topic: record.topic,
            partition: record.partition,
            key: record.key,
            value: record.value,
            headers: record
                .headers
                .into_iter()
                .map(|(name, value)| host::KafkaHeader { name, value })
                .collect(),
        };
        Pending::new(host::kafka_send(&message))
    }

    /// Have the host make an HTTP request, durably: journaled before it is
    /// sent, retried on connection errors, 429 and 5xx answers, and its response
    /// journaled, so a replay never sends it again. The invocation may be
    /// suspended while the request is in flight.
    pub fn http_call(&self, call: HttpCall) -> Pending<HttpResponse> {
        let request = host::HttpRequest {
            method: call.method,
            url: call.url,
            headers: call
                .headers
                .into_iter()
                .map(|(name, value)| wit::Header { name, value })
                .collect(),
            body: call.body,
            timeout_millis: call.timeout.as_millis() as u64,
            max_attempts: call.max_attempts,
        };
        Pending::new(host::http_call(&request))
    }

    /// Wait for the first of several pending operations; returns its
    /// position. The choice is journaled, so a replay makes the same one.
    /// A timeout is a [`Context::sleep`] in the race.
    pub fn select(&self, pending: &[&dyn Selectable]) -> usize {
        let handles: Vec<u32> = pending.iter().map(|p| p.handle()).collect();
        host::await_any(&handles) as usize
    }
}

/// Wait for every pending operation, in order (join all).
pub fn join_all<T: DeserializeOwned>(pending: Vec<Pending<T>>) -> Vec<Result<T, HandlerError>> {
    pending.into_iter().map(Pending::wait).collect()
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
