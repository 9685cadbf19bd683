//! Assembling a host: store, writer, runtime, registry, invoker, and the two
//! HTTP servers, in the order they depend on each other.
//!
//! Standalone start-up: open the store; start the group-commit writer;
//! build the engine: load deployments (from stored artifacts), deploy the
//! `--deploy` files, resume unfinished invocations; then open the ingress
//! and admin ports. Nothing is served before recovery has queued what was
//! in flight.
//!
//! Cluster start-up (`docs/scale-out.md`): open a store per partition and
//! the ports at once, join the consumer group and forward every request to
//! the owners (`forward`), each copy following its changelog, its modules
//! compiled into the host's one wasmtime engine ahead of a takeover. For each
//! partition assigned: stop following, fence the previous owner, restore
//! the store from the changelog, start the writer with the changelog as
//! its log, build the engine as above on a runtime of its own, read the
//! partition's input, answer locally, and publish this host as the owner.
//! For each partition revoked (the group moved it): forward it again, stop
//! its runtime (every attempt and timer of it) and its writer, follow its
//! changelog again, and only then let the group hand it on.
//!
//! Shutdown (SIGTERM or SIGINT): both listeners stop accepting, clients
//! attached to invocations are answered 503, and open requests get
//! `connections.shutdown_timeout` to finish (see [`crate::listener`]); a
//! cluster host then leaves the group, handing the partition over.

use crate::clock::SystemClock;
use crate::commit::Committer;
use crate::config::{ClusterConfig, Config};
use crate::deployments::Registry;
use crate::forward::Front;
use crate::invoker::Invoker;
use crate::listener;
use crate::membership::{Address, Event, Membership};
use crate::metrics::{Collector, Metrics};
use crate::partition::Partitioning;
use crate::runtime::Runtime;
use crate::store::Store;
use anyhow::Context as _;
use axum::Router;
use std::path::PathBuf;
use std::sync::Arc;

/// Run a host until SIGINT or SIGTERM.
pub async fn serve(config: Config, deploy: Vec<PathBuf>) -> anyhow::Result<()> {
    anyhow::ensure!(
        config.admin_token.is_some() || config.admin_addr.ip().is_loopback(),
        "the admin API would listen on {} without admin_token, so anyone who reaches it could \
         upload code, kill invocations and read cluster settings: set admin_token (or \
         --admin-token / CAIRN_ADMIN_TOKEN), or bind the admin API to a loopback address",
        config.admin_addr
    );
    // Before anything records a metric (the writers take their handles
    // when they start).
    Metrics::get();
    crate::traces::Traces::init(config.tracing.endpoint.as_deref())?;
    let served = match config.cluster.clone() {
        None => serve_standalone(config, deploy).await,
        Some(cluster) => serve_cluster(config, cluster, deploy).await,
    };
    crate::traces::Traces::get().flush();
    served
}

/// Open the store in `dir` with `cache_bytes` of page cache.
fn open_store(dir: &std::path::Path, cache_bytes: usize) -> anyhow::Result<Arc<Store>> {
    Ok(Arc::new(
        Store::open_with_cache(dir, cache_bytes)
            .with_context(|| format!("opening the store in {}", dir.display()))?,
    ))
}

/// Standalone: recover, then listen.
async fn serve_standalone(config: Config, deploy: Vec<PathBuf>) -> anyhow::Result<()> {
    let store = open_store(&config.data_dir, config.db_cache_bytes)?;
    let committer = Committer::start(store.clone());
    let runtime = Arc::new(Runtime::new(&config)?);
    let partitioning = Partitioning::SINGLE;
    let engine = Engine::start(&config, store, committer, deploy, partitioning, runtime).await?;
    let (ingress, admin) = bind(&config).await?;
    let invoker = engine.invoker.clone();
    listen(
        &config,
        ingress,
        engine.ingress,
        admin,
        engine.admin,
        move || invoker.close(),
    )
    .await;
    Ok(())
}

/// Cluster mode: listen at once (forwarding to the owners), join the
/// group, and take partitions over (and hand them back) as the group
/// assigns them.
async fn serve_cluster(
    config: Config,
    cluster: ClusterConfig,
    deploy: Vec<PathBuf>,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        cluster.trusted_for < crate::cluster::TOMBSTONES_KEPT,
        "cluster.trusted_for must stay below the changelog's tombstone retention ({:?})",
        crate::cluster::TOMBSTONES_KEPT
    );
    reach_kafka(&cluster).await?;
    let stores = (0..cluster.partitions)
        .map(|p| {
            let cache = config.db_cache_bytes / cluster.partitions as usize;
            open_store(&partition_dir(&config.data_dir, p), cache)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (ingress, admin) = bind(&config).await?;
    let me = advertised(&config, &cluster, &ingress, &admin)?;
    let (membership, mut events) = Membership::join(&cluster, me)?;
    let membership = Arc::new(membership);
    let front = Front::new(
        membership.clone(),
        stores.clone(),
        config.max_body_bytes,
        config.max_module_bytes,
    );
    let slots = stores
        .into_iter()
        .enumerate()
        .map(|(p, store)| Slot::standby(p as u32, store, &cluster).map(Arc::new))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let host = Arc::new(ClusterHost {
        config: config.clone(),
        cluster,
        deploy,
        front: front.clone(),
        membership,
        slots,
        runtime: Arc::new(Runtime::new(&config)?),
    });
    tokio::spawn(host.clone().precompile());
    let closing = host.clone();
    let served = listen(
        &config,
        ingress,
        front.ingress(),
        admin,
        front.admin(),
        move || closing.close(),
    );
    let (failed_tx, mut failed) = tokio::sync::mpsc::unbounded_channel::<anyhow::Error>();
    let lifecycle = async {
        while let Some(event) = events.recv().await {
            let (host, failed) = (host.clone(), failed_tx.clone());
            tokio::spawn(async move {
                let result = match event {
                    Event::Assigned(p) => host.take_over(p).await,
                    Event::Revoked(p, done) => host.hand_over(p, done).await,
                };
                if let Err(e) = result {
                    let _ = failed.send(e);
                }
            });
        }
    };
    let result = tokio::select! {
        () = served => Ok(()),
        () = lifecycle => Ok(()),
        Some(e) = failed.recv() => Err(e),
    };
    host.leave().await;
    result
}

/// Where partition `p`'s copy lives: partition 0 in the data directory
/// itself (so a one-partition cluster keeps a standalone layout), the
/// others in `p<p>` below it.
fn partition_dir(data_dir: &std::path::Path, p: u32) -> PathBuf {
    match p {
        0 => data_dir.to_path_buf(),
        p => data_dir.join(format!("p{p}")),
    }
}

/// A cluster host: its partitions' copies and what it owns.
struct ClusterHost {
    config: Config,
    cluster: ClusterConfig,
    deploy: Vec<PathBuf>,
    front: Arc<Front>,
    membership: Arc<Membership>,
    slots: Vec<Arc<Slot>>,
    /// One engine for every partition: the host's memory and CPU budgets,
    /// and each module compiled once.
    runtime: Arc<Runtime>,
}

/// One partition on this host: its copy of the store, and whether this
/// host owns it.
struct Slot {
    p: u32,
    store: Arc<Store>,
    role: tokio::sync::Mutex<Role>,
    /// The engine's invoker while this host owns the partition (for
    /// shutdown, which must not wait for the role's lock).
    invoker: std::sync::Mutex<Option<Arc<Invoker>>>,
}

enum Role {
    /// Following the changelog (`None` while the role changes).
    Standby(Option<crate::cluster::Follower>),
    /// Serving the partition.
    Owner(Owned),
}

/// What runs a partition this host owns.
struct Owned {
    runtime: tokio::runtime::Runtime,
    committer: Committer,
    inputs: crate::cluster::Inputs,
}

impl Owned {
    /// Stop running the partition: dropping the runtime drops every
    /// attempt, timer and the input's applier; the writer stops after the
    /// transaction it is writing. Blocks.
    fn stop(self) {
        self.runtime
            .shutdown_timeout(std::time::Duration::from_secs(5));
        self.inputs.stop();
        self.committer.stop();
    }
}

impl Slot {
    fn standby(p: u32, store: Arc<Store>, cluster: &ClusterConfig) -> anyhow::Result<Slot> {
        let follower = crate::cluster::Follower::start(store.clone(), cluster, p)?;
        Ok(Slot {
            p,
            store,
            role: tokio::sync::Mutex::new(Role::Standby(Some(follower))),
            invoker: std::sync::Mutex::new(None),
        })
    }
}

impl ClusterHost {
    /// Take partition `p` over: stop following, fence, restore, start its
    /// engine on a runtime of its own, read its input, serve, publish.
    async fn take_over(self: &Arc<Self>, p: u32) -> anyhow::Result<()> {
        let slot = self.slots[p as usize].clone();
        let mut role = slot.role.lock().await;
        let Role::Standby(follower) = &mut *role else {
            return Ok(());
        };
        if let Some(follower) = follower.take() {
            // From here on only the restore (then the writer) writes the copy.
            tokio::task::spawn_blocking(move || follower.stop()).await?;
        }
        let mut log = crate::cluster::KafkaLog::open(&self.cluster, p).await?;
        let restored = crate::cluster::restore(slot.store.clone(), &mut log, &self.cluster).await?;
        tracing::info!(partition = p, ?restored, "restored from the changelog");
        let committer = Committer::start_with_log(slot.store.clone(), Some(Box::new(log)), p);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(format!("cairn-p{p}"))
            .enable_all()
            .build()?;
        let partitioning = Partitioning {
            me: p,
            count: self.cluster.partitions,
        };
        let (host, store, writer) = (self.clone(), slot.store.clone(), committer.clone());
        let started = runtime
            .spawn(async move {
                let (deploy, shared) = (host.deploy.clone(), host.runtime.clone());
                let engine = Engine::start(
                    &host.config,
                    store.clone(),
                    writer,
                    deploy,
                    partitioning,
                    shared,
                )
                .await?;
                let (sink, queue) = tokio::sync::mpsc::channel(1024);
                let from = store.input_position()?;
                let inputs = crate::cluster::Inputs::start(&host.cluster, p, from, sink)?;
                tokio::spawn(crate::partition::apply_inputs(
                    engine.invoker.clone(),
                    queue,
                ));
                anyhow::Ok((engine, inputs))
            })
            .await
            .map_err(anyhow::Error::from)
            .and_then(|started| started);
        let (engine, inputs) = match started {
            Ok(started) => started,
            Err(e) => {
                // Not dropped here: a runtime may not be dropped in async code.
                runtime.shutdown_background();
                tokio::task::spawn_blocking(move || committer.stop()).await?;
                return Err(e.context(format!("starting partition {p}")));
            }
        };
        *slot.invoker.lock().unwrap() = Some(engine.invoker.clone());
        let served = crate::forward::Served {
            ingress: engine.ingress,
            admin: engine.admin,
            runtime: runtime.handle().clone(),
        };
        self.front.serve_locally(p, served);
        *role = Role::Owner(Owned {
            runtime,
            committer,
            inputs,
        });
        let membership = self.membership.clone();
        tokio::task::spawn_blocking(move || membership.publish(p)).await??;
        tracing::info!(partition = p, "this host owns the partition and serves it");
        Ok(())
    }

    /// Hand partition `p` over: forward it again, stop everything that
    /// runs it (nothing of it is written from here on), follow its
    /// changelog, and tell the group. Waits for a takeover of `p` in
    /// progress, which serves it when it ends.
    async fn hand_over(
        self: &Arc<Self>,
        p: u32,
        done: std::sync::mpsc::SyncSender<()>,
    ) -> anyhow::Result<()> {
        let slot = self.slots[p as usize].clone();
        let mut role = slot.role.lock().await;
        self.front.stop_serving(p);
        Metrics::get().stop(p);
        if let Role::Owner(owned) = std::mem::replace(&mut *role, Role::Standby(None)) {
            if let Some(invoker) = slot.invoker.lock().unwrap().take() {
                invoker.close();
            }
            tokio::task::spawn_blocking(move || {
                // Dropping the runtime drops every attempt, timer and the
                // input's applier; the writer stops after its transaction.
                owned
                    .runtime
                    .shutdown_timeout(std::time::Duration::from_secs(5));
                owned.inputs.stop();
                owned.committer.stop();
            })
            .await?;
            tracing::info!(partition = p, "handed the partition over");
        }
        let follower = crate::cluster::Follower::start(slot.store.clone(), &self.cluster, slot.p)?;
        *role = Role::Standby(Some(follower));
        let _ = done.send(());
        Ok(())
    }

    /// Shutdown, after the listeners closed: stop every partition this
    /// host owns (nothing more of them is written), then leave the group,
    /// which hands them to the other hosts at once.
    async fn leave(&self) {
        for slot in &self.slots {
            let mut role = slot.role.lock().await;
            if let Role::Owner(owned) = std::mem::replace(&mut *role, Role::Standby(None)) {
                let _ = tokio::task::spawn_blocking(move || owned.stop()).await;
            }
        }
        let membership = self.membership.clone();
        let _ = tokio::task::spawn_blocking(move || membership.leave()).await;
        tracing::info!("left the cluster");
    }

    /// Compile the modules of every copy this host holds, standbys
    /// included, so that a takeover finds them compiled (the shared engine
    /// keeps them). Runs for the life of the host.
    async fn precompile(self: Arc<Self>) {
        loop {
            for slot in &self.slots {
                for deployment in slot.store.deployments().unwrap_or_default() {
                    if self.runtime.compiled(&deployment.id).is_some() {
                        continue;
                    }
                    let Ok(Some(module)) = slot.store.module(&deployment.id) else {
                        continue;
                    };
                    let runtime = self.runtime.clone();
                    let compiled = tokio::task::spawn_blocking(move || runtime.compile(&module));
                    if let Ok(Err(e)) = compiled.await {
                        tracing::warn!(deployment = %deployment.id, "cannot precompile: {e}");
                    }
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    }

    /// Shutdown: every engine answers its attached clients.
    fn close(&self) {
        for slot in &self.slots {
            if let Some(invoker) = &*slot.invoker.lock().unwrap() {
                invoker.close();
            }
        }
    }
}

/// Create the cluster's topics, waiting for Kafka (a broker restarting)
/// for up to `cluster.restore_timeout`.
async fn reach_kafka(cluster: &ClusterConfig) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + cluster.restore_timeout;
    loop {
        match crate::cluster::ensure_topics(cluster).await {
            Ok(()) => return Ok(()),
            Err(e) if std::time::Instant::now() < deadline => {
                tracing::warn!("cannot reach the cluster's Kafka yet ({e:#}); retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("joining cluster {:?} at {}", cluster.app, cluster.bootstrap)
                })
            }
        }
    }
}

/// This host's addresses as other hosts reach them.
fn advertised(
    config: &Config,
    cluster: &ClusterConfig,
    ingress: &tokio::net::TcpListener,
    admin: &tokio::net::TcpListener,
) -> anyhow::Result<Address> {
    let host = match &cluster.advertise_host {
        Some(host) => host.clone(),
        None if config.ingress_addr.ip().is_unspecified() => anyhow::bail!(
            "the ingress listens on {}: set cluster.advertise_host to the address other hosts reach this one at",
            config.ingress_addr
        ),
        None => config.ingress_addr.ip().to_string(),
    };
    Ok(Address {
        ingress: format!("http://{host}:{}", ingress.local_addr()?.port()),
        admin: format!("http://{host}:{}", admin.local_addr()?.port()),
    })
}

/// Everything that serves a store this host owns.
struct Engine {
    invoker: Arc<Invoker>,
    ingress: Router,
    admin: Router,
}

/// The gauges of one partition's engine, read when `/metrics` is scraped.
struct Gauges {
    invoker: Arc<Invoker>,
    subscriptions: Arc<crate::kafka::Subscriptions>,
}

impl Collector for Gauges {
    fn collect(&self) {
        let p = self.invoker.partitioning().me.to_string();
        let store = self.invoker.store();
        let live = self.invoker.live_counts();
        for status in crate::metrics::STATUSES {
            let count = match status {
                "paused" => store.count_listed(&crate::listing::status_facet("paused")),
                _ => Ok(live.get(status).copied().unwrap_or(0)),
            };
            if let Ok(count) = count {
                metrics::gauge!("cairn_invocations", "partition" => p.clone(), "status" => status)
                    .set(count as f64);
            }
        }
        let timers = self.invoker.footprint()[2];
        metrics::gauge!("cairn_timers", "partition" => p.clone()).set(timers as f64);
        metrics::gauge!("cairn_database_bytes", "partition" => p.clone())
            .set(store.size_bytes() as f64);
        for sub in self.subscriptions.gauges() {
            metrics::gauge!("cairn_subscription_in_flight", "subscription" => sub.id.clone())
                .set(sub.in_flight as f64);
            for ((topic, kafka_partition), lag) in sub.lag {
                let labels = [
                    ("subscription", sub.id.clone()),
                    ("topic", topic),
                    ("kafka_partition", kafka_partition.to_string()),
                ];
                metrics::gauge!("cairn_subscription_lag", &labels).set(lag as f64);
            }
        }
    }
}

impl Engine {
    /// Load deployments, deploy the `--deploy` files, resume unfinished
    /// invocations, set the configured limits, start subscriptions and
    /// schedules.
    async fn start(
        config: &Config,
        store: Arc<Store>,
        committer: Committer,
        deploy: Vec<PathBuf>,
        partitioning: Partitioning,
        runtime: Arc<Runtime>,
    ) -> anyhow::Result<Engine> {
        let (indexed, marked) = committer
            .commit(|t| Ok((t.upgrade_listing()?, t.upgrade_completions()?)))
            .await;
        if indexed > 0 {
            tracing::info!(
                indexed,
                "indexed the invocations of an older store for listing"
            );
        }
        if marked > 0 {
            tracing::info!(
                marked,
                "marked the completed commands of an older store's unfinished invocations"
            );
        }
        let registry = Registry::load(
            runtime.clone(),
            store.clone(),
            committer.clone(),
            partitioning,
        )
        .await?;
        let invoker = Invoker::new(
            config.clone(),
            store,
            committer,
            runtime,
            Arc::new(registry),
            Arc::new(SystemClock),
            partitioning,
        );
        for path in deploy {
            let bytes =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let record = invoker
                .registry()
                .deploy(bytes, invoker.now_ms())
                .await
                .with_context(|| format!("deploying {}", path.display()))?;
            let names: Vec<&str> = record.services.iter().map(|s| s.name.as_str()).collect();
            tracing::info!(deployment = %record.id, services = ?names, "deployed {}", path.display());
        }
        let resumed = invoker.recover()?;
        for limit in &config.concurrency {
            invoker
                .set_limit(limit.scope.clone(), limit.max)
                .await
                .map_err(|e| anyhow::anyhow!("invalid [[concurrency]] {}: {e}", limit.scope))?;
        }
        tracing::info!(resumed, "recovered unfinished invocations");
        let subscriptions = crate::kafka::Subscriptions::start(invoker.clone(), &config.kafka)?;
        if partitioning.me == 0 {
            subscriptions
                .reconcile(&config.kafka.clusters, &config.kafka.subscriptions)
                .await
                .context("invalid [[kafka.clusters]] or [[kafka.subscriptions]] in the config")?;
        }
        // Configured schedules tick on partition 0 only (their
        // invocations go where their targets live).
        let configured = config
            .schedules
            .iter()
            .filter(|_| partitioning.me == 0)
            .map(crate::schedules::from_config)
            .collect::<Result<Vec<_>, _>>()
            .context("invalid [[schedules]] in the config")?;
        let schedules = crate::schedules::Schedules::start(invoker.clone(), configured).await?;
        let gauges = Gauges {
            invoker: invoker.clone(),
            subscriptions: subscriptions.clone(),
        };
        Metrics::get().serve(partitioning.me, Arc::new(gauges));
        Ok(Engine {
            ingress: crate::ingress::router(invoker.clone(), config.max_body_bytes),
            admin: crate::admin::router(
                invoker.clone(),
                subscriptions,
                schedules,
                config.max_module_bytes,
            ),
            invoker,
        })
    }
}

async fn bind(
    config: &Config,
) -> anyhow::Result<(tokio::net::TcpListener, tokio::net::TcpListener)> {
    let ingress = tokio::net::TcpListener::bind(config.ingress_addr)
        .await
        .with_context(|| format!("binding the ingress to {}", config.ingress_addr))?;
    let admin = tokio::net::TcpListener::bind(config.admin_addr)
        .await
        .with_context(|| format!("binding the admin API to {}", config.admin_addr))?;
    tracing::info!(
        "cairn is ready: ingress http://{}, admin http://{}",
        ingress.local_addr()?,
        admin.local_addr()?
    );
    Ok((ingress, admin))
}

/// Serve both listeners until SIGINT or SIGTERM; `close` runs at the
/// signal (it answers attached clients 503).
async fn listen(
    config: &Config,
    ingress: tokio::net::TcpListener,
    ingress_router: Router,
    admin: tokio::net::TcpListener,
    admin_router: Router,
    close: impl FnOnce() + Send + 'static,
) {
    crate::faults::arm();
    let (ingress_policy, admin_policy) = policies(config);
    let (closed_tx, mut closed) = tokio::sync::watch::channel(false);
    let ingress = listener::serve(
        ingress,
        listener::bounded_bodies(ingress_router, ingress_policy),
        ingress_policy,
        async move {
            shutdown().await;
            close();
            closed_tx.send_replace(true);
        },
    );
    let admin = listener::serve(
        admin,
        // The token is checked before an upload's body is read.
        crate::admin::with_token(
            listener::bounded_bodies(admin_router, admin_policy),
            config.admin_token.clone(),
        ),
        admin_policy,
        async move {
            let _ = closed.wait_for(|c| *c).await;
        },
    );
    tokio::join!(ingress, admin);
}

/// The two listeners' policies; the ingress cap is lowered if both caps
/// would not fit in the open-file limit (with room for the database,
/// Kafka and outgoing HTTP).
fn policies(config: &Config) -> (listener::Policy, listener::Policy) {
    const RESERVE: u64 = 1024;
    let c = &config.connections;
    let files = listener::raise_open_files();
    let room = files.saturating_sub(RESERVE + c.admin_max as u64) as usize;
    let ingress_max = c.ingress_max.min(room.max(64));
    if ingress_max < c.ingress_max {
        tracing::warn!(
            "connections.ingress_max lowered from {} to {ingress_max}: the open-file limit is {files}",
            c.ingress_max
        );
    }
    (
        listener::Policy::new(c, ingress_max, config.max_body_bytes),
        listener::Policy::new(c, c.admin_max, config.max_module_bytes),
    )
}

async fn shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM can be handled");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down");
}
