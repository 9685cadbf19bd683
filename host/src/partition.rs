//! Partitions: which partition holds an invocation or a key, and the
//! messages partitions send each other.
//!
//! Why: in cluster mode (`docs/scale-out.md`) the application is split into
//! `cluster.partitions` partitions, each with its own store, changelog and
//! owner. Everything of one key, and everything of one invocation, lives in
//! one partition: a keyed invocation in the partition of its service and
//! key, any other in the partition that created it. An invocation id
//! carries its *partition key* ([`crate::ids::InvocationId::partition_key`]),
//! so any host routes a request for an id (attach, kill, an awakeable)
//! without a lookup; the partition is the key modulo the partition count.
//!
//! Effects on another partition (a call, a send, the caller's completion,
//! an awakeable's resolution, a cancellation, a new deployment) are
//! [`Message`]s: the sender writes them to partition `q` of the topic
//! `cairn.<app>.in` *in the transaction of its group commit*, so a message
//! exists if and only if the commit that made it does. The owner of `q`
//! applies each message in one of its own group commits together with its
//! position in the topic (`meta` row [`INPUT_POSITION`]), so each message
//! takes effect exactly once, across crashes and takeovers.
//!
//! Standalone mode has one partition: nothing is ever sent.

use crate::changelog::{Captured, Change, Outgoing};
use crate::ids::InvocationId;
use crate::invoker::Invoker;
use crate::journal::{CompletionValue, Outcome};
use crate::records::{InvocationRecord, Target};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The `meta` row holding the next offset of this partition's input.
pub const INPUT_POSITION: &str = "input_next";

/// FNV-1a (32 bits): the partition key of a routing key. Fixed forever:
/// it decides where stored keys live.
pub fn hash(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// This partition and how many there are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Partitioning {
    /// The partition this engine owns.
    pub me: u32,
    /// The application's partition count (fixed when the cluster is made).
    pub count: u32,
}

impl Partitioning {
    /// One partition: standalone mode.
    pub const SINGLE: Partitioning = Partitioning { me: 0, count: 1 };

    /// The partition of a partition key.
    pub fn of(&self, pkey: u32) -> u32 {
        pkey % self.count
    }

    /// The partition holding invocation `id`, if it is not this one.
    pub fn elsewhere(&self, id: &InvocationId) -> Option<u32> {
        Some(self.of(id.partition_key())).filter(|&p| p != self.me)
    }

    /// The partition key of a new invocation of `target`: its key's for a
    /// keyed service; for a service, its idempotency key's (so a retry
    /// finds the first request), or this partition's.
    pub fn key_for(&self, target: &Target, idempotency_key: Option<&str>) -> u32 {
        match (&target.key, idempotency_key) {
            (Some(key), _) => key_hash(&target.service, key),
            (None, Some(idempotency)) => {
                hash(format!("{}/{}/{idempotency}", target.service, target.handler).as_bytes())
            }
            (None, None) => self.me,
        }
    }
}

/// Add to a transaction of partition 0 the messages that copy its changes
/// of shared tables to partitions `others`.
pub fn share(captured: &mut Captured, others: std::ops::Range<u32>) {
    let shared: Vec<Vec<u8>> = captured
        .changes
        .iter()
        .filter(|c| crate::store::is_shared(c.table()))
        .map(|c| Message::Replicate(c.clone()).encode())
        .collect();
    for payload in shared {
        for partition in others.clone() {
            let payload = payload.clone();
            captured.outgoing.push(Outgoing { partition, payload });
        }
    }
}

/// The partition key of `key` of keyed service `service`.
pub fn key_hash(service: &str, key: &str) -> u32 {
    hash(format!("{service}/{key}").as_bytes())
}

/// An effect one partition has on another.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Message {
    /// Create this invocation (a call or a send; its id is already fixed).
    Create(Box<InvocationRecord>),
    /// Complete `command` of invocation `id` (a callee's outcome).
    Complete {
        /// The waiting invocation.
        id: InvocationId,
        /// Its command that waits.
        command: u32,
        /// The completion.
        value: CompletionValue,
    },
    /// Resolve or reject an awakeable.
    Awaken {
        /// The awakeable's id.
        awakeable: String,
        /// Its outcome.
        outcome: Outcome,
    },
    /// Cancel an invocation (and what it waits for).
    Cancel(InvocationId),
    /// A module deployed on partition 0, for every other partition.
    Deploy(Vec<u8>),
    /// A change of a table shared by every partition
    /// ([`crate::store::is_shared`]), written on partition 0.
    Replicate(Change),
    /// Stop a subscription on a record whose invocation failed
    /// (`on_failure = "pause"`); sent to partition 0, which runs it.
    StopSubscription {
        /// The subscription's id.
        id: String,
        /// Why, for the operator.
        reason: String,
    },
}

impl Message {
    /// The message as a record value.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("messages serialize")
    }

    /// A record value as a message.
    pub fn decode(bytes: &[u8]) -> Result<Message, String> {
        postcard::from_bytes(bytes).map_err(|e| format!("undecodable message: {e}"))
    }
}

/// A queued commit, resolved once it is durable.
type Commit = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Messages applied but not yet committed, at most (a backlog read after a
/// takeover waits for commits instead of filling the writer's queue).
const APPLYING: usize = 1024;

/// Apply this partition's input in order (messages read by
/// [`crate::cluster::Inputs`]), each in a group commit with the position
/// after it. Runs until the reader stops.
pub async fn apply_inputs(
    invoker: Arc<Invoker>,
    mut inputs: tokio::sync::mpsc::Receiver<crate::cluster::Input>,
) {
    let mut applying: std::collections::VecDeque<Commit> = Default::default();
    while let Some((next, message)) = inputs.recv().await {
        if applying.len() >= APPLYING {
            if let Some(oldest) = applying.pop_front() {
                oldest.await;
            }
        }
        let committer = invoker.committer();
        let me = invoker.clone();
        let commit: Commit = match message {
            Ok(Message::Deploy(module)) => {
                // Compiled outside the writer; a second delivery (after a
                // crash before the position moved) finds it deployed.
                if let Err(e) = invoker.registry().deploy(module, invoker.now_ms()).await {
                    tracing::error!("a deployment sent by partition 0 failed here: {e}");
                }
                position(committer, next)
            }
            Ok(message) => Box::pin(committer.commit_in_order(move |t| {
                t.set_input_position(next)?;
                Ok(((), me.apply_message(t, message)?))
            })),
            Err(e) => {
                tracing::error!(offset = next - 1, "skipped an input record: {e}");
                position(committer, next)
            }
        };
        applying.push_back(commit);
    }
}

/// Queue (now, so that positions commit in order) a commit of the input
/// position alone.
fn position(committer: &crate::commit::Committer, next: u64) -> Commit {
    let queued = committer.commit_queued(move |t| t.set_input_position(next));
    Box::pin(async move {
        let _ = queued.await;
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_ids_route_to_fixed_partitions() {
        let p = Partitioning { me: 1, count: 4 };
        let counter = |key: &str| Target {
            service: "Counter".into(),
            handler: "add".into(),
            key: Some(key.into()),
        };
        let a = p.key_for(&counter("a"), None);
        assert_eq!(
            a,
            key_hash("Counter", "a"),
            "the key decides, not the request"
        );
        assert_eq!(a, p.key_for(&counter("a"), Some("retry-1")));
        let id = InvocationId::generate(a);
        assert_eq!(p.of(id.partition_key()), a % 4);
        assert_eq!(p.elsewhere(&id), Some(a % 4).filter(|&q| q != 1));
        let service = Target {
            service: "Greeter".into(),
            handler: "greet".into(),
            key: None,
        };
        assert_eq!(p.of(p.key_for(&service, None)), 1, "a service stays home");
        assert_eq!(
            p.key_for(&service, Some("k")),
            p.key_for(&service, Some("k")),
            "a retried request finds its first one"
        );
        let spread: std::collections::BTreeSet<u32> = (0..64)
            .map(|n| p.of(p.key_for(&counter(&n.to_string()), None)))
            .collect();
        assert_eq!(spread.len(), 4, "keys spread over every partition");
    }

    #[test]
    fn messages_round_trip() {
        let m = Message::Awaken {
            awakeable: "awk_1".into(),
            outcome: Outcome::Success(b"1".to_vec()),
        };
        let back = Message::decode(&m.encode()).unwrap();
        assert!(matches!(back, Message::Awaken { awakeable, .. } if awakeable == "awk_1"));
        assert!(Message::decode(b"\xff\xff\xff").is_err());
    }
}
