//! # Cairn: durable execution for WebAssembly handlers
//!
//! Cairn runs handlers compiled to WebAssembly components and makes them
//! durable: every step a handler takes is journaled in redb, and after a
//! crash the handler is re-instantiated and replayed from its journal, so
//! effects happen once and nothing is lost.
//!
//! The modules, from the bottom up:
//!
//! - [`ids`], [`clock`], [`config`], [`records`]: vocabulary.
//! - [`journal`]: journal entries and the replay rule.
//! - [`store`]: the redb tables; [`commit`]: the group-commit writer;
//!   [`changelog`]: a transaction's changes as data; [`cluster`]: the
//!   store replicated through a Kafka changelog, restore, fencing and hot
//!   standbys; [`membership`]: which host owns the partition;
//!   [`forward`]: standbys forwarding requests to the owner.
//! - [`runtime`]: wasmtime, sandboxing and limits; [`context`]: the host
//!   side of the guest's `context` interface; [`instances`]: the instance
//!   slots, and when a waiting attempt gives its slot up.
//! - [`deployments`]: uploads and the service registry.
//! - [`invoker`]: invocation lifecycle, retries, deliveries; [`keys`]:
//!   per-key ordering; [`fence`]: one attempt at a time; [`timers`]: sleeps
//!   and delayed starts; [`retention`]: forgetting completed invocations;
//!   [`limits`]: concurrency limits (flow control); [`outbound`]: durable
//!   HTTP calls made by the host.
//! - [`kafka`]: subscriptions that turn records into invocations;
//!   [`inline`]: records whose handler only touches its key's state, run
//!   without an invocation; [`schedules`]: cron ticks that become
//!   invocations too.
//! - [`sandbox`]: the host-wide guards on guests (memory budget, CPU
//!   turns, wall-clock deadline); [`guestlog`]: guest output as tagged,
//!   escaped log events.
//! - [`ingress`], [`admin`]: the HTTP APIs; [`listener`]: connection caps
//!   and timeouts for both; [`console`]: the web console over the admin
//!   API; [`listing`], [`metrics`], [`cli`]: finding invocations, metrics
//!   and the command line's client side; [`server`] wires a host.
//!
//! `docs/design.md` describes the journal, the tables and the replay rules.

pub mod admin;
pub mod changelog;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod commit;
pub mod config;
pub mod console;
pub mod context;
pub mod deployments;
pub mod faults;
pub mod fence;
pub mod forward;
pub mod guestlog;
pub mod ids;
pub mod ingress;
pub mod inline;
pub mod instances;
pub mod invoker;
pub mod journal;
pub mod kafka;
pub mod keys;
pub mod limits;
pub mod listener;
pub mod listing;
pub mod membership;
pub mod metrics;
pub mod outbound;
pub mod partition;
pub mod records;
pub mod retention;
pub mod runtime;
pub mod sandbox;
pub mod schedules;
pub mod server;
pub mod store;
pub mod timers;
pub mod traces;
