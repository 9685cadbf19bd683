//! Typed identifiers: an invocation id is never confused with a deployment id.
//!
//! Both are printable, URL-safe strings with a kind prefix (`inv_`, `dp_`),
//! like Restate's ids, so they can be pasted between the CLI, logs and the
//! HTTP APIs.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Declares a string-backed id type with a fixed prefix.
macro_rules! prefixed_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// The id's text, prefix included.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let body = s
                    .strip_prefix($prefix)
                    .ok_or_else(|| format!("{s:?} is not a {} (expected the prefix {:?})", stringify!($name), $prefix))?;
                if body.is_empty() || !body.bytes().all(|b| b.is_ascii_alphanumeric()) {
                    return Err(format!("{s:?} is not a valid {}", stringify!($name)));
                }
                Ok($name(s.to_string()))
            }
        }
    };
}

prefixed_id!(
    /// Identifies one invocation across its attempts, replays and restarts.
    /// Time-ordered (UUIDv7), so ids sort roughly by creation.
    InvocationId,
    "inv_"
);

prefixed_id!(
    /// Identifies one uploaded module: derived from the SHA-256 of its
    /// bytes, so uploading the same module twice gives the same deployment.
    DeploymentId,
    "dp_"
);

impl InvocationId {
    /// A new, unique id in partition key `pkey` (see [`crate::partition`]):
    /// `t`, the UUIDv7 (time first), then the key. Time first makes the
    /// tables keyed by invocation (records, the journal) grow at
    /// their right edge and shrink at their left as retention forgets the
    /// oldest, so a commit rewrites a few pages at both edges instead of a
    /// page per object key: with the key first, a steady 5,000 Kafka
    /// records/s over 1,000 keys spread their writes over more pages than
    /// the page cache holds within a minute, and the writer fell behind.
    pub fn generate(pkey: u32) -> Self {
        InvocationId(format!("inv_t{}{pkey:08x}", uuid::Uuid::now_v7().simple()))
    }

    /// The id derived from `seed` (SHA-256) in partition key `pkey`: the
    /// same seed and key, the same id.
    pub fn derived(seed: &str, pkey: u32) -> Self {
        use sha2::{Digest, Sha256};
        InvocationId(format!(
            "inv_{pkey:08x}{}",
            hex::encode(&Sha256::digest(seed.as_bytes())[..16])
        ))
    }

    /// The partition key the id was made with, so that any host can tell
    /// which partition holds the invocation without a lookup: the last 8
    /// digits of a generated id, the first 8 of a derived one (and of ids
    /// generated before they were time-first). Ids from before partitions
    /// (32 digits) hash to one: they only exist in a store of one partition.
    pub fn partition_key(&self) -> u32 {
        let body = &self.0[4..];
        let key = match body.len() {
            41 if body.starts_with('t') => body.get(33..),
            40 => body.get(..8),
            _ => None,
        };
        key.and_then(|key| u32::from_str_radix(key, 16).ok())
            .unwrap_or_else(|| crate::partition::hash(body.as_bytes()))
    }

    /// A seed derived from the id by a fixed rule (FNV-1a), so a guest's
    /// random numbers are the same on every replay, on any host version.
    pub fn seed(&self) -> u64 {
        self.0.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    }
}

impl DeploymentId {
    /// The id of a module with these bytes.
    pub fn for_module(bytes: &[u8]) -> Self {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(bytes);
        DeploymentId(format!("dp_{}", hex::encode(&digest[..12])))
    }
}

/// The id of an awakeable: the invocation and the index of its
/// `awakeable` command, so resolving needs no lookup table.
pub fn awakeable_id(invocation: &InvocationId, command: u32) -> String {
    format!("awk_{}{command:08x}", &invocation.as_str()[4..])
}

/// Parse an awakeable id back into its invocation and command index.
pub fn parse_awakeable_id(id: &str) -> Option<(InvocationId, u32)> {
    let body = id.strip_prefix("awk_")?;
    let split = body.len().checked_sub(8)?;
    if !body.is_char_boundary(split) {
        return None;
    }
    let (invocation, command) = body.split_at(split);
    let command = u32::from_str_radix(command, 16).ok()?;
    Some((format!("inv_{invocation}").parse().ok()?, command))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_reject_foreign_prefixes() {
        let id = InvocationId::generate(7);
        assert_eq!(id.as_str().parse::<InvocationId>().unwrap(), id);
        assert!("dp_abc".parse::<InvocationId>().is_err());
        assert!("inv_".parse::<InvocationId>().is_err());
        assert!("inv_a/b".parse::<InvocationId>().is_err());
    }

    #[test]
    fn seeds_are_fixed_by_the_id() {
        let id: InvocationId = "inv_0123abcd".parse().unwrap();
        assert_eq!(id.seed(), id.clone().seed());
        assert_eq!(
            id.seed(),
            0x6958_1930_1a2a_1a71,
            "FNV-1a of the id; the rule never changes"
        );
        assert_ne!(
            id.seed(),
            "inv_0123abce".parse::<InvocationId>().unwrap().seed()
        );
    }

    #[test]
    fn awakeable_ids_name_their_invocation_and_command() {
        let inv = InvocationId::generate(0x1234_abcd);
        let id = awakeable_id(&inv, 7);
        assert_eq!(parse_awakeable_id(&id), Some((inv, 7)));
        assert_eq!(parse_awakeable_id("awk_zz"), None);
        assert_eq!(parse_awakeable_id("inv_0123456789"), None);
    }

    #[test]
    fn ids_carry_their_partition_key() {
        assert_eq!(
            InvocationId::generate(0xdead_beef).partition_key(),
            0xdead_beef
        );
        assert_eq!(InvocationId::derived("s", 42).partition_key(), 42);
        assert_eq!(
            InvocationId::derived("s", 42),
            InvocationId::derived("s", 42)
        );
        assert_ne!(
            InvocationId::derived("s", 42),
            InvocationId::derived("s", 43)
        );
        let old: InvocationId = "inv_0123456789abcdef0123456789abcdef".parse().unwrap();
        assert_eq!(old.partition_key(), old.clone().partition_key());
        let key_first: InvocationId = "inv_0000002a0123456789abcdef0123456789abcdef"
            .parse()
            .unwrap();
        assert_eq!(
            key_first.partition_key(),
            42,
            "generated before time-first ids"
        );
        let (inv, _) = parse_awakeable_id(&awakeable_id(&InvocationId::generate(9), 1)).unwrap();
        assert_eq!(inv.partition_key(), 9);
    }

    #[test]
    fn generated_ids_sort_by_creation_whatever_their_partition_key() {
        let first = InvocationId::generate(0xffff_ffff);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let second = InvocationId::generate(0);
        assert!(first < second, "{first} < {second}");
    }

    #[test]
    fn deployment_ids_depend_only_on_the_bytes() {
        assert_eq!(
            DeploymentId::for_module(b"abc"),
            DeploymentId::for_module(b"abc")
        );
        assert_ne!(
            DeploymentId::for_module(b"abc"),
            DeploymentId::for_module(b"abd")
        );
    }
}
