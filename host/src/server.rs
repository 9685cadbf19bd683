//! Assembling a host: store, writer, runtime, registry, invoker, and the two
//! HTTP servers, in the order they depend on each other.
//!
//! Start-up: open the store; in cluster mode, fence the previous owner and
//! restore the store from the changelog; start the group-commit writer; build the
//! engine; load deployments (from stored artifacts); deploy the `--deploy`
//! files; resume unfinished invocations; then open the ingress and admin
//! ports. Nothing is served before recovery has queued what was in flight.
//!
//! Shutdown (SIGTERM or SIGINT): both listeners stop accepting, clients
//! attached to invocations are answered 503, and open requests get
//! `connections.shutdown_timeout` to finish (see [`crate::listener`]).

use crate::clock::SystemClock;
use crate::commit::Committer;
use crate::config::Config;
use crate::deployments::Registry;
use crate::invoker::Invoker;
use crate::listener;
use crate::runtime::Runtime;
use crate::store::Store;
use anyhow::Context as _;
use std::path::PathBuf;
use std::sync::Arc;

/// Run a host until SIGINT or SIGTERM.
pub async fn serve(config: Config, deploy: Vec<PathBuf>) -> anyhow::Result<()> {
    let store = Arc::new(
        Store::open_with_cache(&config.data_dir, config.db_cache_bytes)
            .with_context(|| format!("opening the store in {}", config.data_dir.display()))?,
    );
    let committer = match &config.cluster {
        None => Committer::start(store.clone()),
        Some(cluster) => {
            let mut log = crate::cluster::KafkaLog::open(cluster)
                .await
                .with_context(|| {
                    format!("joining cluster {:?} at {}", cluster.app, cluster.bootstrap)
                })?;
            let restored = crate::cluster::restore(store.clone(), &mut log, cluster).await?;
            tracing::info!(?restored, app = %cluster.app, "cluster mode: the store follows the changelog");
            Committer::start_with_log(store.clone(), Some(Box::new(log)))
        }
    };
    let runtime = Arc::new(Runtime::new(&config)?);
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
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
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
    crate::faults::arm();
    let (ingress_policy, admin_policy) = policies(&config);
    let closing = invoker.clone();
    let ingress = listener::serve(
        ingress,
        listener::bounded_bodies(
            crate::ingress::router(invoker.clone(), config.max_body_bytes),
            ingress_policy,
        ),
        ingress_policy,
        async move {
            shutdown().await;
            closing.close();
        },
    );
    let admin = listener::serve(
        admin,
        // The token is checked before an upload's body is read.
        crate::admin::with_token(
            listener::bounded_bodies(
                crate::admin::router(
                    invoker.clone(),
                    subscriptions,
                    schedules,
                    config.max_module_bytes,
                ),
                admin_policy,
            ),
            config.admin_token.clone(),
        ),
        admin_policy,
        invoker.closing(),
    );
    tokio::join!(ingress, admin);
    Ok(())
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
