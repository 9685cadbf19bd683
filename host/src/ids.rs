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
    /// A new, unique id.
    pub fn generate() -> Self {
        InvocationId(format!("inv_{}", uuid::Uuid::now_v7().simple()))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_reject_foreign_prefixes() {
        let id = InvocationId::generate();
        assert_eq!(id.as_str().parse::<InvocationId>().unwrap(), id);
        assert!("dp_abc".parse::<InvocationId>().is_err());
        assert!("inv_".parse::<InvocationId>().is_err());
        assert!("inv_a/b".parse::<InvocationId>().is_err());
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
