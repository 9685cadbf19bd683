//! Membership (cluster mode): which host owns which partition, decided by
//! a Kafka consumer group, and where the owners answer.
//!
//! Why a consumer group: it is Kafka's membership and failure detector,
//! already operated by teams that run Kafka. Every host joins the group
//! `cairn.<app>` on the topic `cairn.<app>.in`, which has one partition per
//! Cairn partition; the host assigned input partition `p` owns Cairn
//! partition `p`. A host that dies stops heartbeating and the group gives
//! its partitions to the others after `cluster.session_timeout`; a host
//! that leaves (SIGTERM) leaves the group at once. The cooperative-sticky
//! assignor moves only the partitions it must when hosts join or leave.
//!
//! Owners publish their addresses to the compacted topic
//! `cairn.<app>.owners` (partition `p`, key `p`); every host follows it so
//! that it can forward requests to the owners (`forward.rs`).
//!
//! Lifecycle: [`Membership::join`] starts a thread that polls both
//! consumers and reports [`Event`]s. `Assigned(p)`: this host takes `p`
//! over. `Revoked(p)`: the group moves `p` to another host; the poll
//! thread waits (the group does not hand `p` on meanwhile) until the host
//! has stopped writing `p` and acknowledged, then rejoins. An owner whose
//! session expired (it was paused, or the group coordinator's broker
//! failed over) keeps serving while it rejoins: partitions assigned again
//! go on, those given to others are revoked then (and were fenced
//! meanwhile), and a host not assigned anything back within twice the
//! session timeout exits. [`Membership::leave`] closes the group member on
//! shutdown, which hands the partitions over without waiting for the
//! session to expire.

use crate::config::ClusterConfig;
use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

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

/// A change of ownership for the host to act on.
pub enum Event {
    /// Take partition `p` over.
    Assigned(u32),
    /// Stop writing partition `p`, then acknowledge (the group waits).
    Revoked(u32, std::sync::mpsc::SyncSender<()>),
}

/// Longest wait for a revoked partition to stop before the host exits
/// instead (the next owner fences it either way).
const HAND_OVER: Duration = Duration::from_secs(60);

/// Reports assignments and revocations of partitions.
struct Group {
    owned: Arc<RwLock<BTreeSet<u32>>>,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
    leaving: Arc<AtomicBool>,
    /// When this host lost contact with the group (its session expired,
    /// e.g. while the group coordinator's broker failed over), if it has
    /// not been assigned partitions back since.
    lost: Mutex<Option<Instant>>,
    /// Set before a revocation that librdkafka calls lost (this host's
    /// session expired), for `post_rebalance` to read.
    revoking_lost: AtomicBool,
    topic: String,
}

impl Group {
    fn partitions(&self, list: &TopicPartitionList) -> BTreeSet<u32> {
        list.elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition() as u32)
            .collect()
    }

    /// How long this host has been out of contact with the group.
    fn lost_for(&self) -> Option<Duration> {
        self.lost.lock().unwrap().map(|at| at.elapsed())
    }

    fn assigned(&self, list: BTreeSet<u32>) {
        let owned = self.owned.read().unwrap().clone();
        if self.lost.lock().unwrap().take().is_some() {
            tracing::info!(partitions = ?list, "assigned partitions back after losing contact");
            // Those not assigned back went to other hosts meanwhile.
            owned.difference(&list).for_each(|&p| self.revoked(p));
        }
        for p in list.difference(&owned) {
            tracing::info!(partition = p, "assigned: taking it over");
            self.owned.write().unwrap().insert(*p);
            let _ = self.events.send(Event::Assigned(*p));
        }
    }

    /// Hand `p` over: wait until the host stopped writing it.
    fn revoked(&self, p: u32) {
        if !self.owned.write().unwrap().remove(&p) {
            return;
        }
        tracing::info!(partition = p, "revoked: handing it over");
        let (done, stopped) = std::sync::mpsc::sync_channel(1);
        let acknowledged = self.events.send(Event::Revoked(p, done)).is_ok()
            && stopped.recv_timeout(HAND_OVER).is_ok();
        if !acknowledged {
            tracing::error!(
                partition = p,
                "could not stop serving a revoked partition; exiting"
            );
            std::process::exit(3);
        }
    }
}

impl ClientContext for Group {}

impl ConsumerContext for Group {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        // Whether a revocation means "lost" can only be asked before the
        // partitions are unassigned (librdkafka clears the flag then).
        if let Rebalance::Revoke(_) = rebalance {
            self.revoking_lost
                .store(consumer.assignment_lost(), Ordering::SeqCst);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                // Only the assignment matters: the records are read by
                // each owner's input reader (`cluster::Inputs`).
                if let Err(e) = consumer.pause(list) {
                    tracing::warn!("pausing the group's fetches: {e}");
                }
                self.assigned(self.partitions(list))
            }
            Rebalance::Revoke(list) => {
                if self.leaving.load(Ordering::SeqCst) {
                    return;
                }
                if self.revoking_lost.swap(false, Ordering::SeqCst) {
                    // This host's session expired: maybe it was paused,
                    // maybe the group coordinator's broker failed. Keep
                    // serving until the partitions are assigned again or
                    // other hosts take them over (which fences this
                    // host's commits); `follow` exits if neither happens.
                    tracing::warn!(
                        "lost contact with the consumer group; keeping the partitions until they are assigned again"
                    );
                    self.lost.lock().unwrap().get_or_insert_with(Instant::now);
                    return;
                }
                self.partitions(list)
                    .into_iter()
                    .for_each(|p| self.revoked(p));
            }
            Rebalance::Error(e) => tracing::warn!("consumer group rebalance: {e}"),
        }
    }
}

/// This host's place in the cluster.
pub struct Membership {
    owned: Arc<RwLock<BTreeSet<u32>>>,
    owners: Arc<RwLock<BTreeMap<u32, Address>>>,
    producer: BaseProducer,
    leaving: Arc<AtomicBool>,
    stopped: Mutex<Option<std::thread::JoinHandle<()>>>,
    app: String,
    partitions: u32,
    me: Address,
}

impl Membership {
    /// Join the group as `me` (topics must exist: `cluster::ensure_topics`);
    /// ownership changes arrive on the receiver.
    pub fn join(
        config: &ClusterConfig,
        me: Address,
    ) -> anyhow::Result<(Self, tokio::sync::mpsc::UnboundedReceiver<Event>)> {
        let (events, changes) = tokio::sync::mpsc::unbounded_channel();
        let leaving = Arc::new(AtomicBool::new(false));
        let owned = Arc::new(RwLock::new(BTreeSet::new()));
        let topic = input_topic(&config.app);
        let session = config.session_timeout.as_millis().max(1000);
        let group: BaseConsumer<Group> = crate::cluster::client(config)
            .set("group.id", format!("cairn.{}", config.app))
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("session.timeout.ms", session.to_string())
            // Members hear of a rebalance (a host left) at their next
            // heartbeat: frequent ones keep a graceful hand-over short.
            .set("heartbeat.interval.ms", (session / 12).max(100).to_string())
            .set("enable.auto.commit", "false")
            .create_with_context(Group {
                owned: owned.clone(),
                events,
                leaving: leaving.clone(),
                lost: Mutex::new(None),
                revoking_lost: AtomicBool::new(false),
                topic: topic.clone(),
            })
            .context("joining the cluster's consumer group")?;
        group.subscribe(&[&topic])?;
        let directory: BaseConsumer = crate::cluster::client(config)
            .set("group.id", format!("cairn.{}.directory", config.app))
            .set("enable.auto.commit", "false")
            .create()?;
        let mut list = TopicPartitionList::new();
        for p in 0..config.partitions {
            list.add_partition_offset(&owners_topic(&config.app), p as i32, Offset::Beginning)?;
        }
        directory.assign(&list)?;
        let producer: BaseProducer = crate::cluster::client(config)
            .set("enable.idempotence", "true")
            .create()?;
        let owners = Arc::new(RwLock::new(BTreeMap::new()));
        let (stop, table) = (leaving.clone(), owners.clone());
        // A host out of contact for this long has most likely been
        // replaced; it stops rather than serve what it may no longer own.
        let patience = 2 * config.session_timeout;
        let stopped = std::thread::Builder::new()
            .name("cairn-membership".into())
            .spawn(move || follow(group, directory, table, stop, patience))?;
        let membership = Membership {
            owned,
            owners,
            producer,
            leaving,
            stopped: Mutex::new(Some(stopped)),
            app: config.app.clone(),
            partitions: config.partitions,
            me,
        };
        Ok((membership, changes))
    }

    /// The application's partition count.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// Whether the group assigned partition `p` to this host.
    pub fn is_owner(&self, p: u32) -> bool {
        self.owned.read().unwrap().contains(&p)
    }

    /// The partitions the group assigned to this host.
    pub fn owned(&self) -> Vec<u32> {
        self.owned.read().unwrap().iter().copied().collect()
    }

    /// The addresses of partition `p`'s owner as last published, unless
    /// that is this host (a record from before its restart, or a partition
    /// it just handed over).
    pub fn owner(&self, p: u32) -> Option<Address> {
        let owners = self.owners.read().unwrap();
        owners.get(&p).filter(|a| **a != self.me).cloned()
    }

    /// This host's addresses.
    pub fn me(&self) -> &Address {
        &self.me
    }

    /// Tell every host that this one owns partition `p`.
    pub fn publish(&self, p: u32) -> anyhow::Result<()> {
        let value = serde_json::to_vec(&self.me)?;
        let key = p.to_string();
        let topic = owners_topic(&self.app);
        self.producer
            .send(
                BaseRecord::to(&topic)
                    .partition(p as i32)
                    .key(&key)
                    .payload(&value),
            )
            .map_err(|(e, _)| e)?;
        self.producer
            .flush(Duration::from_secs(10))
            .context("publishing this host as the owner")?;
        Ok(())
    }

    /// Leave the group now (shutdown): the partitions move at once.
    pub fn leave(&self) {
        self.leaving.store(true, Ordering::SeqCst);
        let thread = self.stopped.lock().unwrap().take();
        if let Some(thread) = thread {
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
    owners: Arc<RwLock<BTreeMap<u32, Address>>>,
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
                "no partition assigned back within {patience:?} of losing contact; exiting"
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
