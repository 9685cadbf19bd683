//! The Wasm runtime: compiling, validating and running handler components.
//!
//! Lifecycle of a module: [`Runtime::compile`] once at upload (the compiled
//! artifact is stored, so a restart only [`Runtime::load`]s it);
//! [`Runtime::prepare`] links it once into an `InstancePre`, which checks that
//! it implements the `handler-module` world; then every invocation attempt
//! gets a fresh, cheap instance from the pooling allocator
//! ([`Runtime::invoke`]), which is dropped when the attempt ends.
//!
//! Sandboxing: guests see WASI without files, sockets, environment or
//! arguments. Their clocks are frozen at the invocation's creation time and
//! their random numbers outside `run` steps are seeded from the invocation
//! id, so a replay sees the same values (and so does anyone who knows the
//! id); inside a `run` step they come from the host's secure generator,
//! since the step's result is journaled anyway. `wasi:http` requests are
//! allowed only inside `run` steps and only to the configured allow-list.
//! Guest stdout and stderr become log events of target `guest`, escaped
//! and tagged with the invocation. Each instance has a memory cap, a budget
//! of guest execution time and one of wall-clock time per attempt; the
//! host-wide guards are in [`crate::sandbox`].
//!
//! How an attempt ends decides what happens next ([`AttemptEnd`]): a wasm
//! trap outside a live `run` step (a panic, a stack overflow, the memory
//! cap) replays identically, so it pauses the invocation at once instead of
//! being retried; inside a step it may depend on the outside world and is
//! retried like an error.

use crate::config::Limits;
use crate::context::{check_size, DurableContext, HostTrap};
use crate::guestlog::GuestOutput;
use crate::ids::DeploymentId;
use crate::records::{HandlerInfo, HandlerKind, ServiceInfo, ServiceKind};
use crate::sandbox::{CpuTurns, InstanceMemory, MemoryBudget, Turn};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, PoolingAllocationConfig, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

/// Bindings generated from `wit/`.
pub mod bindings {
    wasmtime::component::bindgen!({
        world: "handler-module",
        path: "../wit",
        imports: { default: async | trappable },
        exports: { default: async },
    });
}

use bindings::cairn::runtime::types as wit;

/// Bytes of each pooled linear memory kept resident between instances.
const KEEP_RESIDENT: usize = 2 * 1024 * 1024;

/// How often the epoch advances; the unit of the CPU budget.
const EPOCH_TICK: Duration = Duration::from_millis(10);

/// A module ready to instantiate.
pub type Module = bindings::HandlerModulePre<GuestState>;

/// Refuse, with how to build a component, bytes that are not WebAssembly
/// or are a core module (wasmtime's own errors would quote the bytes).
fn what_it_is(bytes: &[u8]) -> Result<(), DeployError> {
    const BUILD: &str = "build one with `cargo build --target wasm32-wasip2` and upload the \
                         .wasm file from target/wasm32-wasip2/release";
    match bytes.get(..8) {
        Some([0, b'a', b's', b'm', 1, 0, 0, 0]) => Err(DeployError::NotAComponent(format!(
            "it is a core WebAssembly module; {BUILD}"
        ))),
        Some([0, b'a', b's', b'm', ..]) => Ok(()),
        _ => Err(DeployError::NotAComponent(format!(
            "it is not WebAssembly (it does not start with \\0asm); {BUILD}"
        ))),
    }
}

/// A compile error on one line.
fn not_a_component(e: wasmtime::Error) -> DeployError {
    let said = format!("{e:#}");
    DeployError::NotAComponent(said.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// Why an upload was refused.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// The bytes are not a WebAssembly component (one line saying why).
    #[error("not a valid WebAssembly component: {0}")]
    NotAComponent(String),
    /// It does not implement the `cairn:runtime/handler-module` world.
    #[error("the component does not implement the cairn:runtime handler-module world: {0:#}")]
    WrongWorld(wasmtime::Error),
    /// `describe` failed or returned something unusable.
    #[error("invalid manifest: {0}")]
    BadManifest(String),
}

/// How one attempt ended.
#[derive(Debug)]
pub enum AttemptEnd {
    /// The handler returned this JSON output.
    Success(Vec<u8>),
    /// A terminal failure: complete the invocation with it.
    Terminal { code: u16, message: String },
    /// A retryable failure (an error, a trap inside a `run` step, no room
    /// in the host's memory budget): try again later.
    Retryable(String),
    /// The CPU or wall-clock budget ran out: try again a few times.
    Interrupted(String),
    /// The guest trapped where a replay traps again: pause.
    Trapped(String),
    /// The invocation must stop without retrying (journal mismatch).
    Stopped(String),
    /// The guest waited longer than `suspend_after`; its instance is gone.
    Suspended,
    /// The attempt was superseded (killed or paused) while it ran.
    Fenced,
    /// An inline attempt issued a command that needs the journal (see
    /// `inline`); nothing it did is kept.
    NeedsJournal(String),
}

/// The engine, linker and limits shared by every instance.
pub struct Runtime {
    engine: Engine,
    linker: Linker<GuestState>,
    limits: Limits,
    http_allow: Arc<AllowList>,
    guest_env: Vec<(String, String)>,
    /// The values of `[guest_env]` marked secret, redacted from guest output.
    secrets: Arc<[String]>,
    memory: Arc<MemoryBudget>,
    turns: CpuTurns,
    /// Every module compiled by this engine, by deployment (a host's
    /// partitions share the engine, so each module compiles once per host;
    /// bounded by the deployments).
    compiled: std::sync::Mutex<std::collections::HashMap<DeploymentId, Component>>,
}

impl Runtime {
    /// Build the engine (async, epoch interruption, pooling allocator) and
    /// start its epoch ticker.
    pub fn new(host: &crate::config::Config) -> anyhow::Result<Self> {
        let limits = host.limits.clone();
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(limits.max_instances)
            .total_core_instances(limits.max_instances * 8)
            .total_memories(limits.max_instances * 2)
            .total_tables(limits.max_instances * 8)
            .max_memory_size(limits.memory_bytes)
            // An instance per attempt means thousands of instantiations per
            // second: reset reused slots with memset (only the pages that
            // were touched, found with PAGEMAP_SCAN where the kernel has it)
            // instead of madvise, and batch the remaining decommits. This
            // avoids most page faults and TLB-shootdown IPIs.
            .linear_memory_keep_resident(KEEP_RESIDENT)
            .table_keep_resident(KEEP_RESIDENT / 16)
            .pagemap_scan(wasmtime::Enabled::Auto)
            // Decommit a grown memory as soon as its instance is gone, so
            // a burst of large guests gives its memory back (instances that
            // stay within KEEP_RESIDENT have nothing to decommit).
            .decommit_batch_size(1);
        let mut config = Config::new();
        config
            .epoch_interruption(true)
            .wasm_component_model(true)
            .allocation_strategy(pool);
        let engine = Engine::new(&config)?;
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("cairn-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
        bindings::HandlerModule::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
        Ok(Runtime {
            engine,
            linker,
            limits,
            http_allow: Arc::new(AllowList::new(&host.http_allow)),
            guest_env: (host.guest_env.iter())
                .map(|(name, v)| (name.clone(), v.value().to_string()))
                .collect(),
            secrets: (host.guest_env.values())
                .filter(|v| v.is_secret() && !v.value().is_empty())
                .map(|v| v.value().to_string())
                .collect(),
            memory: MemoryBudget::new(host.limits.memory_total),
            turns: CpuTurns::new(host.limits.service_cores()),
            compiled: Default::default(),
        })
    }

    /// Compile uploaded bytes (once per engine); returns the component
    /// and its serialized artifact for the store.
    pub fn compile(&self, bytes: &[u8]) -> Result<(Component, Vec<u8>), DeployError> {
        let id = DeploymentId::for_module(bytes);
        let component = match self.compiled(&id) {
            Some(component) => component,
            None => {
                what_it_is(bytes)?;
                Component::new(&self.engine, bytes).map_err(not_a_component)?
            }
        };
        let artifact = component.serialize().map_err(not_a_component)?;
        self.remember(id, &component);
        Ok((component, artifact))
    }

    /// Load a stored artifact of deployment `id`; `None` if it was built
    /// by another engine version or configuration (then recompile).
    pub fn load(&self, id: &DeploymentId, artifact: &[u8]) -> Option<Component> {
        if let Some(component) = self.compiled(id) {
            return Some(component);
        }
        // SAFETY: artifacts are produced by `compile` of this program and
        // stored in our own database; wasmtime checks the engine version and
        // configuration and refuses a mismatch.
        let component = unsafe { Component::deserialize(&self.engine, artifact) }.ok()?;
        self.remember(id.clone(), &component);
        Some(component)
    }

    /// Deployment `id` if this engine compiled or loaded it already.
    pub fn compiled(&self, id: &DeploymentId) -> Option<Component> {
        self.compiled.lock().unwrap().get(id).cloned()
    }

    fn remember(&self, id: DeploymentId, component: &Component) {
        self.compiled.lock().unwrap().insert(id, component.clone());
    }

    /// Link a component against the host's imports.
    pub fn prepare(&self, component: &Component) -> Result<Module, DeployError> {
        let pre = self
            .linker
            .instantiate_pre(component)
            .map_err(DeployError::WrongWorld)?;
        bindings::HandlerModulePre::new(pre).map_err(DeployError::WrongWorld)
    }

    /// Ask a module for its manifest, and validate it.
    pub async fn describe(&self, module: &Module) -> Result<Vec<ServiceInfo>, DeployError> {
        let mut store = self.store(None);
        let describe = async {
            let instance = module.instantiate_async(&mut store).await?;
            instance
                .cairn_runtime_handler()
                .call_describe(&mut store)
                .await
        };
        // A module that blocks in describe must not hold the upload forever.
        let manifest = tokio::time::timeout(self.limits.wall_per_attempt, describe)
            .await
            .unwrap_or_else(|_| Err(wasmtime::Error::new(HostTrap::WallClock)))
            .map_err(|e| DeployError::BadManifest(format!("describe failed: {e:#}")))?;
        validate_manifest(manifest)
    }

    /// Run one attempt of an invocation in a fresh instance.
    pub async fn invoke(&self, module: &Module, durable: DurableContext) -> AttemptEnd {
        let (service, handler) = {
            let target = &durable.record().target;
            (target.service.clone(), target.handler.clone())
        };
        let clock = durable.clock().clone();
        let mut store = self.store(Some(durable));
        let result = {
            let call = async {
                let instance = module.instantiate_async(&mut store).await?;
                instance
                    .cairn_runtime_handler()
                    .call_invoke(&mut store, &service, &handler)
                    .await
            };
            tokio::select! {
                result = call => result,
                () = clock.expired(self.limits.wall_per_attempt) => {
                    Err(wasmtime::Error::new(HostTrap::WallClock))
                }
            }
        };
        let data = store.data();
        let unconsumed = data.durable.as_ref().and_then(|d| d.unconsumed());
        let in_step = data.in_step.load(Ordering::SeqCst);
        match result {
            Ok(Ok(_) | Err(wit::HandlerError::Terminal(_))) if unconsumed.is_some() => {
                AttemptEnd::Stopped(unconsumed.expect("checked").to_string())
            }
            Ok(Ok(output)) => {
                match check_size("the output", output.len(), self.limits.max_value_bytes) {
                    Ok(()) => AttemptEnd::Success(output),
                    Err(e) => self.trapped(e, in_step, None),
                }
            }
            Ok(Err(wit::HandlerError::Terminal(t))) => AttemptEnd::Terminal {
                code: t.code,
                message: t.message,
            },
            Ok(Err(wit::HandlerError::Retryable(reason))) => AttemptEnd::Retryable(reason),
            Err(e) => self.trapped(e, in_step, data.output.panic_message()),
        }
    }

    /// What a trap or a host error means for the invocation.
    /// `panic`: what the guest printed when it panicked, if it did.
    fn trapped(&self, e: wasmtime::Error, in_step: bool, panic: Option<String>) -> AttemptEnd {
        let trap = || match &panic {
            Some(panic) => format!("guest panicked: {panic}"),
            None => format!("guest trapped: {e:#}"),
        };
        let deterministic = !in_step;
        match e.downcast_ref::<HostTrap>() {
            Some(HostTrap::Mismatch(m)) => AttemptEnd::Stopped(m.to_string()),
            Some(HostTrap::Terminal(message)) => AttemptEnd::Terminal {
                code: 500,
                message: message.clone(),
            },
            Some(HostTrap::TooLarge(message)) => AttemptEnd::Terminal {
                code: 413,
                message: message.clone(),
            },
            Some(HostTrap::Suspend) => AttemptEnd::Suspended,
            Some(HostTrap::Fenced) => AttemptEnd::Fenced,
            Some(HostTrap::NeedsJournal(_)) => AttemptEnd::NeedsJournal(e.to_string()),
            Some(HostTrap::CpuBudget) => AttemptEnd::Interrupted(format!(
                "interrupted: the guest ran longer than its budget of {:?} per attempt (limits.cpu_per_attempt)",
                self.limits.cpu_per_attempt
            )),
            Some(HostTrap::WallClock) => AttemptEnd::Interrupted(format!(
                "interrupted: the attempt was busy longer than {:?} (limits.wall_per_attempt)",
                self.limits.wall_per_attempt
            )),
            Some(HostTrap::MemoryCap { .. }) if deterministic => {
                AttemptEnd::Trapped(format!("guest trapped: {e}"))
            }
            None if deterministic && e.downcast_ref::<wasmtime::Trap>().is_some() => {
                AttemptEnd::Trapped(trap())
            }
            Some(_) | None => AttemptEnd::Retryable(trap()),
        }
    }

    fn store(&self, durable: Option<DurableContext>) -> Store<GuestState> {
        let (wall_ms, seed) = durable
            .as_ref()
            .map(|d| (d.record().created_ms, d.seed()))
            .unwrap_or_default();
        let service = durable
            .as_ref()
            .map(|d| d.record().target.service.clone())
            .unwrap_or_default();
        let in_step = Arc::new(AtomicBool::new(false));
        let replaying = durable.as_ref().map(|d| d.replaying()).unwrap_or_default();
        let output = GuestOutput::for_attempt(durable.as_ref().map(|d| d.record()), replaying)
            .redacting(self.secrets.clone());
        let mut wasi = WasiCtx::builder();
        wasi.stdout(output.stream("stdout"))
            .stderr(output.stream("stderr"))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .wall_clock(FrozenClock(Duration::from_millis(wall_ms)))
            .monotonic_clock(FrozenClock(Duration::ZERO))
            .secure_random(StepRandom::new(seed, in_step.clone()))
            .insecure_random(StepRandom::new(seed ^ 1, in_step.clone()))
            .insecure_random_seed(u128::from(seed))
            .envs(&self.guest_env);
        let state = GuestState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            http: WasiHttpCtx::new(),
            policy: HttpPolicy {
                allow: self.http_allow.clone(),
                in_step: in_step.clone(),
            },
            memory: InstanceMemory::new(self.memory.clone(), self.limits.memory_bytes),
            durable,
            in_step,
            ticks: 0,
            turn: Turn::new(self.turns.of(&service)),
            output,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter_async(|s| &mut s.memory);
        let budget =
            (self.limits.cpu_per_attempt.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64;
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |mut ctx| {
            let state = ctx.data_mut();
            // A tick that passed while the guest waited on the host (a
            // durable wait, a commit) is not guest time.
            if state
                .durable
                .as_ref()
                .is_some_and(|d| d.clock().take_waited())
            {
                return Ok(wasmtime::UpdateDeadline::Yield(1));
            }
            state.ticks += 1;
            if state.ticks > budget {
                return Err(wasmtime::Error::new(HostTrap::CpuBudget));
            }
            // Past its first tick a guest runs on its service's turns.
            if state.ticks == 1 {
                return Ok(wasmtime::UpdateDeadline::Yield(1));
            }
            Ok(wasmtime::UpdateDeadline::YieldCustom(1, state.turn.take()))
        });
        store
    }
}

/// The guest's random numbers: seeded from the invocation outside `run`
/// steps (a replay draws the same), the host's secure generator inside
/// them (unpredictable; the step's result is journaled).
struct StepRandom {
    seeded: rand::rngs::StdRng,
    in_step: Arc<AtomicBool>,
}

impl StepRandom {
    fn new(seed: u64, in_step: Arc<AtomicBool>) -> Self {
        use rand::SeedableRng;
        StepRandom {
            seeded: rand::rngs::StdRng::seed_from_u64(seed),
            in_step,
        }
    }

    fn secure(&self) -> bool {
        self.in_step.load(Ordering::SeqCst)
    }
}

impl rand::TryRng for StepRandom {
    type Error = std::convert::Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        use rand::Rng;
        Ok(if self.secure() {
            rand::rng().next_u32()
        } else {
            self.seeded.next_u32()
        })
    }

    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        use rand::Rng;
        Ok(if self.secure() {
            rand::rng().next_u64()
        } else {
            self.seeded.next_u64()
        })
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        use rand::Rng;
        if self.secure() {
            rand::rng().fill_bytes(dst)
        } else {
            self.seeded.fill_bytes(dst)
        }
        Ok(())
    }
}

fn validate_manifest(manifest: wit::Manifest) -> Result<Vec<ServiceInfo>, DeployError> {
    let bad = |m: String| Err(DeployError::BadManifest(m));
    if manifest.services.is_empty() {
        return bad("the module declares no services".into());
    }
    let mut seen = std::collections::HashSet::new();
    let mut services = Vec::new();
    for s in manifest.services {
        if !valid_name(&s.name) {
            return bad(format!("invalid service name {:?}", s.name));
        }
        if !seen.insert(s.name.clone()) {
            return bad(format!("service {} is declared twice", s.name));
        }
        let mut handlers: Vec<HandlerInfo> = Vec::new();
        for h in s.handlers {
            if !valid_name(&h.name) || handlers.iter().any(|x| x.name == h.name) {
                return bad(format!(
                    "invalid or duplicate handler {:?} in {}",
                    h.name, s.name
                ));
            }
            handlers.push(HandlerInfo {
                name: h.name,
                kind: match h.kind {
                    wit::HandlerKind::Exclusive => HandlerKind::Exclusive,
                    wit::HandlerKind::Shared => HandlerKind::Shared,
                    wit::HandlerKind::Workflow => HandlerKind::Workflow,
                },
            });
        }
        if handlers.is_empty() {
            return bad(format!("service {} has no handlers", s.name));
        }
        services.push(ServiceInfo {
            name: s.name,
            kind: match s.kind {
                wit::ServiceKind::Service => ServiceKind::Service,
                wit::ServiceKind::VirtualObject => ServiceKind::VirtualObject,
                wit::ServiceKind::Workflow => ServiceKind::Workflow,
            },
            handlers,
        });
    }
    Ok(services)
}

/// Names usable as one URL path segment: letters, digits, `_`, `-`, `.`.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name != "restate"
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// The data of one instance's store.
pub struct GuestState {
    wasi: WasiCtx,
    table: ResourceTable,
    http: WasiHttpCtx,
    policy: HttpPolicy,
    memory: InstanceMemory,
    /// The invocation this instance runs (`None` while describing).
    durable: Option<DurableContext>,
    /// Whether a live `run` step is open (outgoing HTTP allowed, random
    /// numbers unpredictable).
    in_step: Arc<AtomicBool>,
    /// Epoch ticks spent in guest code this attempt.
    ticks: u64,
    /// This guest's place in its service's CPU turns.
    turn: Turn,
    /// Its stdout and stderr (a trap's panic message is read from it).
    output: GuestOutput,
}

impl GuestState {
    /// The invocation's durable context, or a trap while describing.
    pub(crate) fn durable(&mut self) -> wasmtime::Result<&mut DurableContext> {
        self.durable.as_mut().ok_or_else(|| {
            wasmtime::Error::new(HostTrap::Terminal(
                "the context is not available in describe".into(),
            ))
        })
    }

    /// Open or close a live `run` step: the window in which outgoing HTTP
    /// is allowed and random numbers come from the secure generator.
    pub(crate) fn set_in_step(&mut self, in_step: bool) {
        self.in_step.store(in_step, Ordering::SeqCst);
    }
}

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for GuestState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.policy,
        }
    }
}

/// A clock that always reads the same time.
struct FrozenClock(Duration);

impl wasmtime_wasi::HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_millis(1)
    }
    fn now(&self) -> Duration {
        self.0
    }
}

impl wasmtime_wasi::HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000
    }
    fn now(&self) -> u64 {
        self.0.as_nanos() as u64
    }
}

/// Hosts a guest may reach: `host` (any port), `host:port`, `host:*`.
#[derive(Debug, Default)]
pub struct AllowList(Vec<(String, Option<u16>)>);

impl AllowList {
    /// Parse allow-list entries.
    pub fn new(entries: &[String]) -> Self {
        AllowList(
            entries
                .iter()
                .map(|e| match e.rsplit_once(':') {
                    Some((host, port)) if port != "*" => (host.to_string(), port.parse().ok()),
                    Some((host, _)) => (host.to_string(), None),
                    None => (e.to_string(), None),
                })
                .collect(),
        )
    }

    /// Whether `host:port` is allowed.
    pub fn permits(&self, host: &str, port: u16) -> bool {
        self.0
            .iter()
            .any(|(h, p)| h.eq_ignore_ascii_case(host) && p.is_none_or(|p| p == port))
    }
}

/// The `wasi:http` hooks: deny outside `run` steps and off the allow-list.
struct HttpPolicy {
    allow: Arc<AllowList>,
    in_step: Arc<AtomicBool>,
}

impl wasmtime_wasi_http::WasiHttpHooks for HttpPolicy {
    fn send_request(
        &mut self,
        request: http::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        fut: Box<dyn std::future::Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> Box<
        dyn std::future::Future<
                Output = wasmtime_wasi_http::Result<(
                    http::Response<wasmtime_wasi_http::WasiBody>,
                    Box<dyn std::future::Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
                )>,
            > + Send,
    > {
        drop(fut);
        let uri = request.uri();
        let host = uri.host().unwrap_or_default().to_string();
        let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let in_step = self.in_step.load(Ordering::SeqCst);
        let allowed = in_step && self.allow.permits(&host, port);
        if !allowed {
            tracing::warn!(
                %host, port, in_step,
                "outgoing HTTP denied (only inside run steps, to hosts in http_allow)"
            );
        }
        Box::new(async move {
            use http_body_util::BodyExt;
            if !allowed {
                return Err(wasmtime_wasi_http::Error::HttpRequestDenied);
            }
            let (response, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((
                response.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn std::future::Future<Output = _> + Send>,
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allow_list_matches_hosts_and_ports() {
        let list = AllowList::new(&[
            "api.example.com".into(),
            "127.0.0.1:*".into(),
            "10.1.1.1:8443".into(),
        ]);
        assert!(list.permits("api.example.com", 443));
        assert!(list.permits("127.0.0.1", 1234));
        assert!(list.permits("10.1.1.1", 8443));
        assert!(!list.permits("10.1.1.1", 80));
        assert!(!list.permits("evil.example.com", 443));
        assert!(!AllowList::default().permits("127.0.0.1", 80));
    }

    #[test]
    fn names_must_be_url_segments() {
        assert!(valid_name("Counter") && valid_name("add_one") && valid_name("v1.2-x"));
        assert!(
            !valid_name("") && !valid_name("a/b") && !valid_name("a b") && !valid_name("restate")
        );
    }
}
