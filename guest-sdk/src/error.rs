//! Handler errors: retryable by default, terminal when said so.

use crate::bindings::cairn::runtime::types as wit;
use std::fmt;

/// A failure that must not be retried. Returned to the caller (HTTP 500 by
/// default, or the code given) and, inside a [`crate::Context::run`] step,
/// journaled as the step's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TerminalError {
    code: u16,
    message: String,
}

impl TerminalError {
    /// A terminal error with code 500.
    pub fn new(message: impl Into<String>) -> Self {
        Self::with_code(500, message)
    }

    /// A terminal error with an HTTP-like status code.
    pub fn with_code(code: u16, message: impl Into<String>) -> Self {
        TerminalError {
            code,
            message: message.into(),
        }
    }

    /// The status code.
    pub fn code(&self) -> u16 {
        self.code
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn from_wit(e: wit::TerminalError) -> Self {
        TerminalError {
            code: e.code,
            message: e.message,
        }
    }

    pub(crate) fn into_wit(self) -> wit::TerminalError {
        wit::TerminalError {
            code: self.code,
            message: self.message,
        }
    }
}

impl fmt::Display for TerminalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

/// The error type of handlers and `run` steps.
///
/// `?` on any `std::error::Error` gives a retryable error; `?` on a
/// [`TerminalError`] (or [`HandlerError::terminal`]) ends the invocation.
#[derive(Debug)]
pub struct HandlerError(Kind);

#[derive(Debug)]
enum Kind {
    Terminal(TerminalError),
    Retryable(String),
}

/// The result type of handlers.
pub type HandlerResult<T> = Result<T, HandlerError>;

impl HandlerError {
    /// A terminal error (code 500) with this message.
    pub fn terminal(message: impl Into<String>) -> Self {
        TerminalError::new(message).into()
    }

    /// A retryable error with this message.
    pub fn retryable(message: impl Into<String>) -> Self {
        HandlerError(Kind::Retryable(message.into()))
    }

    /// The terminal error inside, if this error is terminal.
    pub fn as_terminal(&self) -> Option<&TerminalError> {
        match &self.0 {
            Kind::Terminal(t) => Some(t),
            Kind::Retryable(_) => None,
        }
    }

    pub(crate) fn into_wit(self) -> wit::HandlerError {
        match self.0 {
            Kind::Terminal(t) => wit::HandlerError::Terminal(t.into_wit()),
            Kind::Retryable(m) => wit::HandlerError::Retryable(m),
        }
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Kind::Terminal(t) => write!(f, "terminal error: {t}"),
            Kind::Retryable(m) => write!(f, "retryable error: {m}"),
        }
    }
}

impl From<TerminalError> for HandlerError {
    fn from(e: TerminalError) -> Self {
        HandlerError(Kind::Terminal(e))
    }
}

impl<E: std::error::Error> From<E> for HandlerError {
    fn from(e: E) -> Self {
        HandlerError::retryable(e.to_string())
    }
}
