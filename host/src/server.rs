//! Assembling a host: store, writer, runtime, registry, invoker, and the two
//! HTTP servers, in the order they depend on each other.
//!
//! Standalone start-up: open the store; start the group-commit writer;
//! build the engine: load deployments (from stored artifacts), deploy the
//! `--deploy` files, resume unfinished invocations; then open the ingress
//! and admin ports. Nothing is served before recovery has queued what was
//! in flight.
//!
//! Cluster start-up (`docs/scale-out.md`): open the store and the ports at
//! once, join the consumer group and forward every request to the owner
//! (`forward`); once assigned the partition: fence the previous owner,
//! restore the store from the changelog, start the writer with the
//! changelog as its log, build the engine as above, answer locally, and
//! publish this host as the owner.
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
use crate::membership::{Address, Membership};
use crate::runtime::Runtime;
use crate::store::Store;
use anyhow::Context as _;
use axum::Router;
use std::path::PathBuf;
use std::sync::Arc;

/// Run a host until SIGINT or SIGTERM.
pub async fn serve(config: Config, deploy: Vec<PathBuf>) -> anyhow::Result<()> {
    let store = Arc::new(
        Store::open_with_cache(&config.data_dir, config.db_cache_bytes)
            .with_context(|| format!("opening the store in {}", config.data_dir.display()))?,
    );
    match config.cluster.clone() {
        None => serve_standalone(config, store, deploy).await,
        Some(cluster) => serve_cluster(config, cluster, store, deploy).await,
    }
}

/// Standalone: recover, then listen.
async fn serve_standalone(
    config: Config,
    store: Arc<Store>,
    deploy: Vec<PathBuf>,
) -> anyhow::Result<()> {
    let committer = Committer::start(store.clone());
    let engine = Engine::start(&config, store, committer, deploy).await?;
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

/// Cluster mode: listen at once (forwarding to the owner), join the group,
/// and start the engine when this host is assigned the partition.
async fn serve_cluster(
    config: Config,
    cluster: ClusterConfig,
    store: Arc<Store>,
    deploy: Vec<PathBuf>,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        cluster.trusted_for < crate::cluster::TOMBSTONES_KEPT,
        "cluster.trusted_for must stay below the changelog's tombstone retention ({:?})",
        crate::cluster::TOMBSTONES_KEPT
    );
    reach_kafka(&cluster).await?;
    let (ingress, admin) = bind(&config).await?;
    let me = advertised(&config, &cluster, &ingress, &admin)?;
    let membership = Arc::new(Membership::join(&cluster, me)?);
    let front = Front::new(
        membership.clone(),
        store.clone(),
        config.max_body_bytes,
        config.max_module_bytes,
    );
    let engine: Arc<std::sync::OnceLock<Arc<Invoker>>> = Arc::default();
    let started = engine.clone();
    let served = listen(
        &config,
        ingress,
        front.ingress(),
        admin,
        front.admin(),
        move || {
            if let Some(invoker) = started.get() {
                invoker.close()
            }
        },
    );
    let follower = crate::cluster::Follower::start(store.clone(), &cluster)?;
    let takeover = async {
        membership.owned().await;
        // The standby's copy stops following before the fence: from here
        // on only the restore (then the committer) writes to it.
        tokio::task::spawn_blocking(move || follower.stop()).await?;
        let mut log = crate::cluster::KafkaLog::open(&cluster).await?;
        let restored = crate::cluster::restore(store.clone(), &mut log, &cluster).await?;
        tracing::info!(?restored, app = %cluster.app, "cluster mode: the store follows the changelog");
        let committer = Committer::start_with_log(store.clone(), Some(Box::new(log)));
        let started = Engine::start(&config, store.clone(), committer, deploy).await?;
        let _ = engine.set(started.invoker.clone());
        front.serve_locally(started.ingress, started.admin);
        tokio::task::block_in_place(|| membership.publish())?;
        tracing::info!("this host owns the partition and serves it");
        anyhow::Ok(())
    };
    tokio::pin!(served);
    tokio::select! {
        () = &mut served => return Ok(()),
        taken = takeover => taken?,
    }
    served.await;
    Ok(())
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

impl Engine {
    /// Load deployments, deploy the `--deploy` files, resume unfinished
    /// invocations, set the configured limits, start subscriptions and
    /// schedules.
    async fn start(
        config: &Config,
        store: Arc<Store>,
        committer: Committer,
        deploy: Vec<PathBuf>,
    ) -> anyhow::Result<Engine> {
        let runtime = Arc::new(Runtime::new(config)?);
        let registry =
            Arc::new(Registry::load(runtime.clone(), store.clone(), committer.clone()).await?);
        let invoker = Invoker::new(
            config.clone(),
            store,
            committer,
            runtime,
            registry,
            Arc::new(SystemClock),
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
        let subscriptions =
            crate::kafka::Subscriptions::start(invoker.clone(), config.kafka.max_in_flight)?;
        let configured = config
            .schedules
            .iter()
            .map(crate::schedules::from_config)
            .collect::<Result<Vec<_>, _>>()
            .context("invalid [[schedules]] in the config")?;
        let schedules = crate::schedules::Schedules::start(invoker.clone(), configured).await?;
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
    if config.admin_token.is_none() && !config.admin_addr.ip().is_loopback() {
        tracing::warn!(
            "the admin API listens on {} without admin_token: anyone who reaches it controls the host",
            config.admin_addr
        );
    }
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
