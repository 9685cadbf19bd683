//! # cairn-sdk: write durable handlers for Cairn
//!
//! A handler module is a Rust crate compiled to a WebAssembly component
//! (`cargo build --target wasm32-wasip2`). It declares services with one
//! attribute per `impl` block and exports them with one macro call:
//!
//! ```ignore
//! use cairn_sdk::prelude::*;
//!
//! pub struct Counter;
//!
//! #[cairn_sdk::object]
//! impl Counter {
//!     /// Exclusive (the default for objects): one at a time per key.
//!     pub fn add(ctx: &Context, delta: i64) -> HandlerResult<i64> {
//!         let next = ctx.get::<i64>("count")?.unwrap_or(0) + delta;
//!         ctx.set("count", &next);
//!         Ok(next)
//!     }
//!
//!     /// Shared: runs concurrently with anything on the key, reads only.
//!     #[shared]
//!     pub fn get(ctx: &Context) -> HandlerResult<i64> {
//!         Ok(ctx.get::<i64>("count")?.unwrap_or(0))
//!     }
//! }
//!
//! cairn_sdk::export!(Counter);
//! ```
//!
//! Inputs and outputs are any serde types, JSON on the wire; an input of
//! type [`Raw`] takes the body's bytes as they are (Kafka values that are
//! not JSON). A handler without an input parameter accepts an empty body.
//! [`Context::kafka_record`] describes the Kafka record behind an
//! invocation; [`Context::kafka_send`] produces records with headers, raw
//! values and a partition ([`kafka`]).
//!
//! ## Durability
//!
//! Everything a handler learns from outside (state, step results) goes
//! through [`Context`] and is journaled by the host. After a crash the host
//! re-runs the handler from the start and *replays* the journal: state reads
//! return what they returned before and completed [`Context::run`] steps
//! return their recorded result without running again. Handlers must
//! therefore be deterministic outside of `run` steps: no reading clocks,
//! randomness or the network except inside a step.
//!
//! ## Coordination
//!
//! [`Context::sleep`], [`Context::call`], [`Context::awakeable`] and
//! [`Context::promise`] return a [`Pending`] result; [`Pending::wait`]
//! blocks until it completes (the host may suspend the invocation while it
//! waits), [`join_all`] waits for several and [`Context::select`] for the
//! first of several. [`Context::send`] invokes another handler one-way.
//!
//! ## Errors
//!
//! A handler returns [`HandlerError`]. Any `std::error::Error` converts into
//! a *retryable* error (the host retries with backoff); a [`TerminalError`]
//! ends the invocation and is returned to the caller.

mod context;
mod error;
pub mod http;
pub mod kafka;

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "handler-module",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "__export_handler_module",
        default_bindings_module: "cairn_sdk::bindings",
    });
}

pub use cairn_sdk_macros::{object, service, workflow};
pub use context::{
    join_all, Context, HttpCall, HttpResponse, Pending, Produced, Selectable, StepRetry, Target,
};
pub use error::{HandlerError, HandlerResult, TerminalError};
pub use kafka::{KafkaRecord, Raw};

/// What most handler crates need: `use cairn_sdk::prelude::*;`.
pub mod prelude {
    pub use crate::{
        Context, HandlerError, HandlerResult, HttpCall, KafkaRecord, Pending, Raw, StepRetry,
        Target, TerminalError,
    };
}

use bindings::cairn::runtime::types as wit;

/// A setting from the host's `[guest_env]` table (an environment variable
/// of every guest), or a terminal error (500) that names the missing one.
/// Use it for what differs between deployments of the same code: the URLs
/// of outside APIs, topic names, delays.
pub fn env(name: &str) -> Result<String, HandlerError> {
    std::env::var(name).map_err(|_| {
        TerminalError::new(format!(
            "{name} is not set: add it to the host's [guest_env]"
        ))
        .into()
    })
}

/// Like [`env`], parsed, with a default when the setting is absent.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T, HandlerError> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(v) => v.parse().map_err(|_| {
            TerminalError::new(format!("[guest_env] {name} = {v:?} does not parse")).into()
        }),
    }
}

/// The kind of a service; decides keying and concurrency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceKind {
    /// Stateless, every invocation runs in parallel.
    Service,
    /// Keyed state; exclusive handlers run one at a time per key.
    VirtualObject,
    /// Keyed by workflow id.
    Workflow,
}

/// How a handler runs with respect to its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandlerKind {
    /// One at a time per key; may write state.
    Exclusive,
    /// Concurrent; reads state only.
    Shared,
    /// The main handler of a workflow.
    Workflow,
}

/// A service as the `#[service]`/`#[object]`/`#[workflow]` attributes
/// describe it. Implemented by those attributes, not by hand.
pub trait Service {
    /// The service's name as used in URLs.
    const NAME: &'static str;
    /// Service kind.
    const KIND: ServiceKind;
    /// `(handler name, handler kind)` for every handler.
    const HANDLERS: &'static [(&'static str, HandlerKind)];
    /// Run `handler`; `None` if this service has no such handler.
    fn invoke(handler: &str, ctx: &Context) -> Option<Result<Vec<u8>, HandlerError>>;
}

#[doc(hidden)]
pub mod __private {
    //! Glue used by the macros; not part of the public API.
    use super::*;
    use serde::Serialize;

    /// A service's entry point: run a handler, `None` if there is no such handler.
    pub type Invoke = fn(&str, &Context) -> Option<Result<Vec<u8>, HandlerError>>;

    /// A service's descriptor and entry point, as the export macro lists them.
    pub struct ServiceEntry {
        pub name: &'static str,
        pub kind: ServiceKind,
        pub handlers: &'static [(&'static str, HandlerKind)],
        pub invoke: Invoke,
    }

    impl ServiceEntry {
        pub const fn of<S: Service>() -> Self {
            ServiceEntry {
                name: S::NAME,
                kind: S::KIND,
                handlers: S::HANDLERS,
                invoke: S::invoke,
            }
        }
    }

    /// Decode the invocation's input (JSON, an empty body reading as
    /// `null`; the bytes for [`crate::Raw`]), call the handler and encode
    /// its output.
    pub fn call_with_input<I, O>(
        ctx: &Context,
        f: impl FnOnce(&Context, I) -> Result<O, HandlerError>,
    ) -> Result<Vec<u8>, HandlerError>
    where
        I: crate::kafka::Input,
        O: Serialize,
    {
        let input = I::from_payload(ctx.payload())?;
        encode_output(f(ctx, input)?)
    }

    /// Call a handler that takes no input; any payload is ignored.
    pub fn call_without_input<O: Serialize>(
        ctx: &Context,
        f: impl FnOnce(&Context) -> Result<O, HandlerError>,
    ) -> Result<Vec<u8>, HandlerError> {
        encode_output(f(ctx)?)
    }

    fn encode_output<O: Serialize>(output: O) -> Result<Vec<u8>, HandlerError> {
        serde_json::to_vec(&output).map_err(|e| {
            TerminalError::new(format!("cannot encode the handler's output: {e}")).into()
        })
    }

    pub fn manifest(services: &[ServiceEntry]) -> wit::Manifest {
        wit::Manifest {
            services: services
                .iter()
                .map(|s| wit::ServiceDef {
                    name: s.name.to_string(),
                    kind: match s.kind {
                        ServiceKind::Service => wit::ServiceKind::Service,
                        ServiceKind::VirtualObject => wit::ServiceKind::VirtualObject,
                        ServiceKind::Workflow => wit::ServiceKind::Workflow,
                    },
                    handlers: s
                        .handlers
                        .iter()
                        .map(|(name, kind)| wit::HandlerDef {
                            name: name.to_string(),
                            kind: match kind {
                                HandlerKind::Exclusive => wit::HandlerKind::Exclusive,
                                HandlerKind::Shared => wit::HandlerKind::Shared,
                                HandlerKind::Workflow => wit::HandlerKind::Workflow,
                            },
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    pub fn invoke(
        services: &[ServiceEntry],
        service: &str,
        handler: &str,
    ) -> Result<Vec<u8>, wit::HandlerError> {
        let ctx = Context::current();
        let result = services
            .iter()
            .find(|s| s.name == service)
            .and_then(|s| (s.invoke)(handler, &ctx))
            .unwrap_or_else(|| {
                Err(TerminalError::with_code(
                    404,
                    format!("no handler {service}/{handler} in this module"),
                )
                .into())
            });
        result.map_err(HandlerError::into_wit)
    }
}

/// Export the listed services as this module's handlers. Call it once per
/// crate, with every service type the crate defines.
#[macro_export]
macro_rules! export {
    ($($service:ty),+ $(,)?) => {
        #[doc(hidden)]
        pub struct __CairnModule;

        const __CAIRN_SERVICES: &[$crate::__private::ServiceEntry] =
            &[$($crate::__private::ServiceEntry::of::<$service>()),+];

        impl $crate::bindings::exports::cairn::runtime::handler::Guest for __CairnModule {
            fn describe() -> $crate::bindings::cairn::runtime::types::Manifest {
                $crate::__private::manifest(__CAIRN_SERVICES)
            }

            fn invoke(
                service: ::std::string::String,
                handler: ::std::string::String,
            ) -> ::std::result::Result<
                ::std::vec::Vec<u8>,
                $crate::bindings::cairn::runtime::types::HandlerError,
            > {
                $crate::__private::invoke(__CAIRN_SERVICES, &service, &handler)
            }
        }

        $crate::bindings::__export_handler_module!(__CairnModule with_types_in $crate::bindings);
    };
}
