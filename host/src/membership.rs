//! Membership (cluster mode): which host owns the partition, decided by a
//! Kafka consumer group, and where the owner answers.
//!
//! Why a consumer group: it is Kafka's membership and failure detector,
//! already operated by teams that run Kafka. Every host joins the group
//! `cairn.<app>` on the topic `cairn.<app>.in`; the host assigned partition
//! 0 owns the application's partition. A host that dies stops heartbeating
//! and the group gives the partition to another host after
//! `cluster.session_timeout`; a host that leaves (SIGTERM) leaves the group
//! at once. The cooperative-sticky assignor keeps the partition where it is
//! when hosts join.
//!
//! The owner publishes its addresses to the compacted topic
//! `cairn.<app>.owners` (key: the partition); every host follows that topic
//! so that it can forward requests to the owner (`forward.rs`).
//!
//! Lifecycle: [`Membership::join`] starts a thread that polls both
//! consumers; [`Membership::owned`] resolves when this host is assigned the
//! partition. Ownership is never given back while the host runs: a host
//! that the group gives the partition away from exits at once. An owner
//! whose session expired (it was paused, or the group coordinator's broker
//! failed over) keeps serving while it rejoins: if it is assigned the
//! partition again it goes on; if another host took it over, that host has
//! fenced this one's commits, and this one exits after twice the session
//! timeout at the latest.
//! [`Membership::leave`] closes the group member on shutdown, which hands
//! the partition over without waiting for the session to expire.

use crate::config::ClusterConfig;
use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The partition every host competes for (one today).
pub const PARTITION: i32 = 0;

/// The input topic whose assignment is ownership.
pub fn input_topic(app: &str) -> String {
    format!("cairn.{app}.in")
}

/// The compacted topic of owners' addresses.
pub fn owners_topic(app: &str) -> String {
    format!("cairn.{app}.owners")
}

/// Where a host answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Address {
    /// Base URL of its ingress.
    pub ingress: String,
    /// Base URL of its admin API.
    pub admin: String,
}

/// Reports assignments of the partition, and exits on its loss.
struct Group {
    owned: watch::Sender<bool>,
    leaving: Arc<AtomicBool>,
    /// When this owner lost contact with the group (its session expired,
    /// e.g. while the group coordinator's broker failed over), if it has
    /// not been assigned the partition back since.
    lost: Mutex<Option<Instant>>,
    topic: String,
}

impl Group {
    fn has_partition(&self, list: &TopicPartitionList) -> bool {
        list.elements_for_topic(&self.topic)
            .iter()
            .any(|e| e.partition() == PARTITION)
    }

    /// How long this owner has been out of contact with the group.
    fn lost_for(&self) -> Option<Duration> {
        self.lost.lock().unwrap().map(|at| at.elapsed())
    }
}

impl ClientContext for Group {}

impl ConsumerContext for Group {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let owner = *self.owned.borrow();
        match rebalance {
            Rebalance::Assign(list) if self.has_partition(list) => {
                if self.lost.lock().unwrap().take().is_some() {
                    tracing::info!("assigned partition {PARTITION} back after losing contact");
                } else {
                    tracing::info!("assigned partition {PARTITION}: taking it over");
                }
                self.owned.send_replace(true);
            }
            Rebalance::Revoke(list) if owner && self.has_partition(list) => {
                if self.leaving.load(Ordering::SeqCst) {
                    return;
                }
                if consumer.assignment_lost() {
                    // This host's session expired: maybe it was paused,
                    // maybe the group coordinator's broker failed. Keep
                    // serving until the partition is assigned again or
                    // another host takes it over (which fences this host's
                    // commits); `follow` exits if neither happens.
                    tracing::warn!(
                        "lost contact with the consumer group; keeping partition {PARTITION} until it is assigned again"
                    );
                    self.lost.lock().unwrap().get_or_insert_with(Instant::now);
                    return;
                }
                // The group gave the partition to another host, which
                // fences this one's commits: nothing here may be served.
                tracing::error!("lost partition {PARTITION} to another host; exiting");
                std::process::exit(3);
            }
            Rebalance::Error(e) => tracing::warn!("consumer group rebalance: {e}"),
            _ => {}
        }
    }
}

/// This host's place in the cluster.
pub struct Membership {
    owned: watch::Receiver<bool>,
    owners: Arc<RwLock<BTreeMap<i32, Address>>>,
    producer: BaseProducer,
    leaving: Arc<AtomicBool>,
    stopped: Option<std::thread::JoinHandle<()>>,
    app: String,
    me: Address,
}

impl Membership {
    /// Join the group as `me` (topics must exist: `cluster::ensure_topics`).
    pub fn join(config: &ClusterConfig, me: Address) -> anyhow::Result<Self> {
        let (owned_tx, owned) = watch::channel(false);
        let leaving = Arc::new(AtomicBool::new(false));
        let topic = input_topic(&config.app);
        let session = config.session_timeout.as_millis().max(1000);
        let group: BaseConsumer<Group> = crate::cluster::client(config)
            .set("group.id", format!("cairn.{}", config.app))
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("session.timeout.ms", session.to_string())
            .set("heartbeat.interval.ms", (session / 3).to_string())
            .set("enable.auto.commit", "false")
            .create_with_context(Group {
                owned: owned_tx,
                leaving: leaving.clone(),
                lost: Mutex::new(None),
                topic: topic.clone(),
            })
            .context("joining the cluster's consumer group")?;
        group.subscribe(&[&topic])?;
        let directory: BaseConsumer = crate::cluster::client(config)
            .set("group.id", format!("cairn.{}.directory", config.app))
            .set("enable.auto.commit", "false")
            .create()?;
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(&owners_topic(&config.app), PARTITION, Offset::Beginning)?;
        directory.assign(&list)?;
        let producer: BaseProducer = crate::cluster::client(config)
            .set("enable.idempotence", "true")
            .create()?;
        let owners = Arc::new(RwLock::new(BTreeMap::new()));
        let (stop, table) = (leaving.clone(), owners.clone());
        // An owner out of contact for this long has most likely been
        // replaced; it stops rather than serve what it may no longer own.
        let patience = 2 * config.session_timeout;
        let stopped = std::thread::Builder::new()
            .name("cairn-membership".into())
            .spawn(move || follow(group, directory, table, stop, patience))?;
        Ok(Membership {
            owned,
            owners,
            producer,
            leaving,
            stopped: Some(stopped),
            app: config.app.clone(),
            me,
        })
    }

    /// Resolves once this host owns the partition.
    pub async fn owned(&self) {
        let mut owned = self.owned.clone();
        let _ = owned.wait_for(|o| *o).await;
    }

    /// Whether this host owns the partition.
    pub fn is_owner(&self) -> bool {
        *self.owned.borrow()
    }

    /// The owner's addresses as last published, unless that is this host
    /// (a record from before its restart).
    pub fn owner(&self) -> Option<Address> {
        let owners = self.owners.read().unwrap();
        owners.get(&PARTITION).filter(|a| **a != self.me).cloned()
    }

    /// This host's addresses.
    pub fn me(&self) -> &Address {
        &self.me
    }

    /// Tell every host that this one owns the partition.
    pub fn publish(&self) -> anyhow::Result<()> {
        let value = serde_json::to_vec(&self.me)?;
        let key = PARTITION.to_string();
        let topic = owners_topic(&self.app);
        self.producer
            .send(BaseRecord::to(&topic).key(&key).payload(&value))
            .map_err(|(e, _)| e)?;
        self.producer
            .flush(Duration::from_secs(10))
            .context("publishing this host as the owner")?;
        Ok(())
    }

    /// Leave the group now (shutdown): the partition moves at once.
    pub fn leave(&mut self) {
        self.leaving.store(true, Ordering::SeqCst);
        if let Some(thread) = self.stopped.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.leave();
    }
}

/// Poll the group (heartbeats, rebalances) and the owners' directory until
/// `stop`; dropping the group consumer leaves the group.
fn follow(
    group: BaseConsumer<Group>,
    directory: BaseConsumer,
    owners: Arc<RwLock<BTreeMap<i32, Address>>>,
    stop: Arc<AtomicBool>,
    patience: Duration,
) {
    while !stop.load(Ordering::SeqCst) {
        if group
            .context()
            .lost_for()
            .is_some_and(|lost| lost > patience)
        {
            tracing::error!(
                "partition {PARTITION} not assigned back within {patience:?} of losing contact; exiting"
            );
            std::process::exit(3);
        }
        if let Some(Err(e)) = group.poll(Duration::from_millis(50)) {
            tracing::warn!("consumer group: {e}");
        }
        while let Some(Ok(record)) = directory.poll(Duration::from_millis(50)) {
            let owner = record
                .payload()
                .and_then(|p| serde_json::from_slice::<Address>(p).ok());
            let partition = record
                .key()
                .and_then(|k| std::str::from_utf8(k).ok())
                .and_then(|k| k.parse().ok());
            if let (Some(partition), Some(owner)) = (partition, owner) {
                tracing::info!(partition, ingress = %owner.ingress, "owner published");
                owners.write().unwrap().insert(partition, owner);
            }
        }
    }
    group.unsubscribe();
    drop(group);
}
