//! Burst: a burst of Kafka records hits a handler that calls a downstream
//! API which refuses more than a few requests at once.
//!
//! Cairn takes the records into its journal at the speed of the log (the
//! offsets are committed once the invocations are durable) and runs them as
//! fast as the downstream allows: a concurrency limit on `Burst/forward`
//! (`[[concurrency]]` in the host's config) keeps the calls in flight under
//! the API's cap, and the invocations over it wait in the durable queue.
//!
//! Settings (`[guest_env]`): `BURST_API`, the downstream's URL.

use cairn_sdk::prelude::*;

/// One record of the burst.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Order {
    /// Unique id, also the idempotency key of the downstream call.
    pub id: u64,
    /// Anything the downstream needs.
    pub amount: u64,
}

/// Forwards records to the downstream API.
pub struct Burst;

#[cairn_sdk::service]
impl Burst {
    /// Send one order to `BURST_API` through the host (journaled, retried on
    /// 429 and 5xx); returns the order id once the API accepted it.
    pub fn forward(ctx: &Context, order: Order) -> HandlerResult<u64> {
        let api = cairn_sdk::env("BURST_API")?;
        let request = HttpCall::post_json(&api, &order)
            .header("idempotency-key", &format!("order-{}", order.id))
            .attempts(20);
        let response = ctx.http_call(request).wait()?;
        if response.status != 200 {
            let message = format!("the downstream answered {}", response.status);
            return Err(TerminalError::with_code(502, message).into());
        }
        Ok(order.id)
    }
}

cairn_sdk::export!(Burst);
