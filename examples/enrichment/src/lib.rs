//! Enrichment: each event needs a call to an API that takes seconds (a
//! customer profile, a fraud score), and the enriched event goes on to
//! another topic.
//!
//! With a plain consumer, throughput is one event per call latency per
//! partition, and a slow call holds up every key behind it. Here the call
//! is made by the host (`ctx.http_call`): it is journaled, the invocation
//! can suspend while it is in flight, and calls for different keys overlap,
//! so throughput grows with the number of keys in flight, not with the
//! call's latency. Events of one key still go in order (a virtual object).
//! The enriched event is produced with durable produce, once per event.
//!
//! Settings (`[guest_env]`): `PROFILE_API` (POSTed `{"customer": key}`),
//! `ENRICHED_TOPIC` (where the results go, on cluster `KAFKA_CLUSTER`,
//! default "local").

use cairn_sdk::prelude::*;
use std::time::Duration;

/// A customer's enrichment pipeline.
pub struct Enricher;

#[cairn_sdk::object]
impl Enricher {
    /// Look the customer up, produce `{customer, event, profile}` to
    /// `ENRICHED_TOPIC` (keyed by customer); returns this key's count.
    pub fn enrich(ctx: &Context, event: serde_json::Value) -> HandlerResult<u64> {
        let api = cairn_sdk::env("PROFILE_API")?;
        let topic = cairn_sdk::env("ENRICHED_TOPIC")?;
        let cluster = cairn_sdk::env_or("KAFKA_CLUSTER", "local".to_string())?;
        let lookup = HttpCall::post_json(&api, &serde_json::json!({ "customer": ctx.key() }))
            .timeout(Duration::from_secs(60));
        let profile = ctx.http_call(lookup).wait()?;
        if profile.status != 200 {
            let message = format!("the profile API answered {}", profile.status);
            return Err(TerminalError::with_code(502, message).into());
        }
        let enriched = serde_json::json!({
            "customer": ctx.key(),
            "event": event,
            "profile": profile.body,
        });
        ctx.kafka_produce(&cluster, &topic, Some(ctx.key().as_bytes()), &enriched)
            .wait()?;
        let count = ctx.get::<u64>("count")?.unwrap_or(0) + 1;
        ctx.set("count", &count);
        Ok(count)
    }

    /// Events enriched for this customer.
    #[shared]
    pub fn count(ctx: &Context) -> HandlerResult<u64> {
        Ok(ctx.get("count")?.unwrap_or(0))
    }
}

cairn_sdk::export!(Enricher);
