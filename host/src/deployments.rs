//! Deployments: uploaded modules, compiled once, and the service registry.
//!
//! An upload is compiled, linked against the host's world and asked for its
//! manifest before anything is stored; a module that fails any step is
//! refused with the reason and leaves no trace. The compiled artifact is
//! stored beside the module, so a restart deserializes instead of
//! recompiling. The newest deployment of a service receives new
//! invocations; an invocation keeps the deployment it was created on.

use crate::commit::Committer;
use crate::ids::DeploymentId;
use crate::partition::{Message, Partitioning};
use crate::records::{DeploymentRecord, ServiceInfo};
use crate::runtime::{DeployError, Module, Runtime};
use crate::store::{Store, StoreError};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// A deployment ready to run.
pub struct Loaded {
    /// What the store keeps about it.
    pub record: DeploymentRecord,
    /// The linked module.
    pub module: Module,
}

/// The deployments and, per service, the newest one.
pub struct Registry {
    runtime: Arc<Runtime>,
    store: Arc<Store>,
    committer: Committer,
    partitioning: Partitioning,
    inner: RwLock<Inner>,
}

#[derive(Default)]
struct Inner {
    deployments: HashMap<DeploymentId, Arc<Loaded>>,
    services: HashMap<String, (ServiceInfo, DeploymentId)>,
}

impl Inner {
    fn add(&mut self, loaded: Arc<Loaded>) {
        for service in &loaded.record.services {
            self.services.insert(
                service.name.clone(),
                (service.clone(), loaded.record.id.clone()),
            );
        }
        self.deployments.insert(loaded.record.id.clone(), loaded);
    }
}

/// An upload failed.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// The module was refused (400).
    #[error(transparent)]
    Invalid(#[from] DeployError),
    /// The store failed (500).
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Registry {
    /// Load every stored deployment (recompiling artifacts that no longer
    /// match the engine). Partition 0 of a cluster sends every new
    /// deployment to the other partitions ([`crate::partition`]).
    pub async fn load(
        runtime: Arc<Runtime>,
        store: Arc<Store>,
        committer: Committer,
        partitioning: Partitioning,
    ) -> anyhow::Result<Self> {
        let registry = Registry {
            runtime,
            store,
            committer,
            partitioning,
            inner: RwLock::default(),
        };
        for record in registry.store.deployments()? {
            let component = registry.component(&record.id).await?;
            let module = registry.runtime.prepare(&component)?;
            tracing::info!(deployment = %record.id, services = record.services.len(), "loaded deployment");
            registry
                .inner
                .write()
                .unwrap()
                .add(Arc::new(Loaded { record, module }));
        }
        Ok(registry)
    }

    async fn component(&self, id: &DeploymentId) -> anyhow::Result<wasmtime::component::Component> {
        if let Some(c) = self.runtime.compiled(id) {
            return Ok(c);
        }
        if let Some(c) = self
            .store
            .artifact(id)?
            .and_then(|a| self.runtime.load(id, &a))
        {
            return Ok(c);
        }
        tracing::info!(deployment = %id, "compiled artifact missing or stale; recompiling");
        let bytes = self
            .store
            .module(id)?
            .ok_or_else(|| anyhow::anyhow!("deployment {id} has no module"))?;
        let (component, artifact) = self.runtime.compile(&bytes)?;
        let id = id.clone();
        self.committer
            .commit(move |t| t.put_artifact(&id, &artifact))
            .await;
        Ok(component)
    }

    /// Validate, compile and store a module; idempotent for the same bytes.
    pub async fn deploy(
        &self,
        bytes: Vec<u8>,
        now_ms: u64,
    ) -> Result<DeploymentRecord, UploadError> {
        let id = DeploymentId::for_module(&bytes);
        if let Some(existing) = self.inner.read().unwrap().deployments.get(&id) {
            return Ok(existing.record.clone());
        }
        let runtime = self.runtime.clone();
        let (component, artifact, bytes) = tokio::task::spawn_blocking(move || {
            runtime.compile(&bytes).map(|(c, a)| (c, a, bytes))
        })
        .await
        .expect("compilation does not panic")?;
        let module = self.runtime.prepare(&component)?;
        let services = self.runtime.describe(&module).await?;
        let record = DeploymentRecord {
            id,
            services,
            created_ms: now_ms,
            size: bytes.len() as u64,
        };
        let stored = record.clone();
        let others = match self.partitioning.me {
            0 => 1..self.partitioning.count,
            _ => 0..0,
        };
        self.committer
            .commit(move |t| {
                t.put_deployment(&stored, &bytes, &artifact)?;
                let message = Message::Deploy(bytes);
                others.into_iter().try_for_each(|q| t.send(q, &message))
            })
            .await;
        tracing::info!(deployment = %record.id, "deployed");
        self.inner.write().unwrap().add(Arc::new(Loaded {
            record: record.clone(),
            module,
        }));
        Ok(record)
    }

    /// The newest declaration of a service and its deployment.
    pub fn service(&self, name: &str) -> Option<(ServiceInfo, DeploymentId)> {
        self.inner.read().unwrap().services.get(name).cloned()
    }

    /// Every service with its current deployment, sorted by name.
    pub fn services(&self) -> Vec<(ServiceInfo, DeploymentId)> {
        let mut all: Vec<_> = self
            .inner
            .read()
            .unwrap()
            .services
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        all
    }

    /// A deployment by id.
    pub fn deployment(&self, id: &DeploymentId) -> Option<Arc<Loaded>> {
        self.inner.read().unwrap().deployments.get(id).cloned()
    }

    /// Every deployment, oldest first.
    pub fn deployments(&self) -> Vec<DeploymentRecord> {
        let mut all: Vec<_> = self
            .inner
            .read()
            .unwrap()
            .deployments
            .values()
            .map(|d| d.record.clone())
            .collect();
        all.sort_by_key(|d| d.created_ms);
        all
    }
}
