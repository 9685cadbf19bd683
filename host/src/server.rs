//! Assembling a host: store, writer, runtime, registry, invoker, and the two
//! HTTP servers, in the order they depend on each other.
//!
//! Start-up: open the store; start the group-commit writer; build the
//! engine; load deployments (from stored artifacts); deploy the `--deploy`
//! files; resume unfinished invocations; then open the ingress and admin
//! ports. Nothing is served before recovery has queued what was in flight.

use crate::clock::SystemClock;
use crate::commit::Committer;
use crate::config::Config;
use crate::deployments::Registry;
use crate::invoker::Invoker;
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
    let committer = Committer::start(store.clone());
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
    tracing::info!(
        "cairn is ready: ingress http://{}, admin http://{}",
        ingress.local_addr()?,
        admin.local_addr()?
    );
    crate::faults::arm();
    let ingress = axum::serve(
        ingress,
        crate::ingress::router(invoker.clone(), config.max_body_bytes),
    )
    .with_graceful_shutdown(shutdown());
    let admin = axum::serve(
        admin,
        crate::admin::router(invoker, subscriptions, schedules, config.max_module_bytes),
    )
    .with_graceful_shutdown(shutdown());
    tokio::try_join!(async { ingress.await }, async { admin.await })?;
    Ok(())
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
