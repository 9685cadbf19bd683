//! Payments: an order's life mixes Kafka events (placed, shipped,
//! cancelled), a webhook from an outside payment provider, and a deadline
//! (an unpaid order is cancelled). The events come in any order.
//!
//! `Order/{id}` is the state machine; every change to an order goes through
//! it, one at a time, so each transition sees the latest state.
//! `Payment/collect` (a service, so the order stays free for other events
//! meanwhile) asks the provider to charge, giving it an awakeable id as the
//! callback, and races the webhook against the deadline. The result is sent
//! back to the order. After the deadline it keeps listening for a grace
//! period, so a late payment is refunded rather than lost. The rules:
//!
//! - shipped before paid: remembered, and the order ships when the payment
//!   arrives;
//! - paid after cancelled (by the customer or the deadline): refunded, once;
//! - duplicates of any event change nothing.
//!
//! Settings (`[guest_env]`): `PAYMENTS_API` (base URL: `/charge`, `/refund`),
//! `PAYMENT_TIMEOUT_MS` (default 15 minutes), `PAYMENT_GRACE_MS` (default 24
//! hours).

use cairn_sdk::prelude::*;
use std::time::Duration;

/// An order event from Kafka (the key is the order id).
#[derive(serde::Serialize, serde::Deserialize, Debug)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OrderEvent {
    /// The customer placed the order.
    Placed {
        /// Amount to charge, in cents.
        amount: u64,
    },
    /// The warehouse is ready to ship.
    Shipped,
    /// The customer cancelled.
    Cancelled,
}

/// What `Payment/collect` reports to the order.
#[derive(serde::Serialize, serde::Deserialize, Debug)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PaymentResult {
    /// The provider's webhook confirmed the charge.
    Paid {
        /// The provider's reference.
        reference: String,
    },
    /// No webhook before the deadline.
    TimedOut,
    /// The provider refused.
    Failed {
        /// Why.
        reason: String,
    },
}

/// Where an order is.
#[derive(serde::Serialize, serde::Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Not placed yet.
    #[default]
    New,
    /// Placed; the charge is requested.
    AwaitingPayment,
    /// Paid, not shipped yet.
    Paid,
    /// Paid and shipped (final).
    Shipped,
    /// Cancelled (final); a payment that still arrives is refunded.
    Cancelled,
}

/// An order's state.
#[derive(serde::Serialize, serde::Deserialize, Default, Debug)]
pub struct OrderState {
    /// Where it is.
    pub stage: Stage,
    /// Amount, in cents.
    pub amount: u64,
    /// Shipping was requested before the payment arrived.
    pub ship_requested: bool,
    /// The provider's reference of the charge, once paid.
    pub payment: Option<String>,
    /// Whether the charge was refunded.
    pub refunded: bool,
    /// What happened, in order (for people and tests).
    pub history: Vec<String>,
}

/// An order.
pub struct Order;

#[cairn_sdk::object]
impl Order {
    /// Apply a Kafka event.
    pub fn on_event(ctx: &Context, event: OrderEvent) -> HandlerResult<Stage> {
        let mut order = ctx.get::<OrderState>("order")?.unwrap_or_default();
        order.history.push(format!("{event:?}"));
        match (event, order.stage) {
            (OrderEvent::Placed { amount }, Stage::New) => {
                order.stage = Stage::AwaitingPayment;
                order.amount = amount;
                let request = (ctx.key().to_string(), amount);
                ctx.send(Target::service("Payment", "collect"), &request, None);
            }
            (OrderEvent::Shipped, Stage::Paid) => order.stage = Stage::Shipped,
            (OrderEvent::Shipped, Stage::New | Stage::AwaitingPayment) => {
                order.ship_requested = true
            }
            (OrderEvent::Cancelled, Stage::New | Stage::AwaitingPayment) => {
                order.stage = Stage::Cancelled
            }
            (OrderEvent::Cancelled, Stage::Paid) => {
                order.stage = Stage::Cancelled;
                refund(ctx, &mut order)?;
            }
            _ => order.history.push("ignored".into()),
        }
        ctx.set("order", &order);
        Ok(order.stage)
    }

    /// Apply the payment's outcome.
    pub fn payment_result(ctx: &Context, result: PaymentResult) -> HandlerResult<Stage> {
        let mut order = ctx.get::<OrderState>("order")?.unwrap_or_default();
        order.history.push(format!("{result:?}"));
        match (result, order.stage) {
            (PaymentResult::Paid { reference }, Stage::AwaitingPayment) => {
                order.payment = Some(reference);
                order.stage = if order.ship_requested {
                    Stage::Shipped
                } else {
                    Stage::Paid
                };
            }
            (PaymentResult::Paid { reference }, Stage::Cancelled) if order.payment.is_none() => {
                order.payment = Some(reference);
                refund(ctx, &mut order)?;
            }
            (PaymentResult::TimedOut | PaymentResult::Failed { .. }, Stage::AwaitingPayment) => {
                order.stage = Stage::Cancelled
            }
            _ => order.history.push("ignored".into()),
        }
        ctx.set("order", &order);
        Ok(order.stage)
    }

    /// The order as it is.
    #[shared]
    pub fn status(ctx: &Context) -> HandlerResult<OrderState> {
        Ok(ctx.get("order")?.unwrap_or_default())
    }
}

/// Ask the provider to refund the order's charge (once: idempotency key).
fn refund(ctx: &Context, order: &mut OrderState) -> HandlerResult<()> {
    let api = cairn_sdk::env("PAYMENTS_API")?;
    let body = serde_json::json!({ "order": ctx.key(), "reference": order.payment });
    let request = HttpCall::post_json(&format!("{api}/refund"), &body)
        .header("idempotency-key", &format!("refund-{}", ctx.key()))
        .attempts(20);
    let response = ctx.http_call(request).wait()?;
    if response.status != 200 {
        let message = format!("the refund was refused: {}", response.status);
        return Err(TerminalError::with_code(502, message).into());
    }
    order.refunded = true;
    order.history.push("refunded".into());
    Ok(())
}

/// Talks to the payment provider.
pub struct Payment;

#[cairn_sdk::service]
impl Payment {
    /// Request the charge of `(order, amount)` with an awakeable as the
    /// webhook, wait for it until the deadline (then through the grace
    /// period), and report to `Order/{order}/payment_result`.
    pub fn collect(ctx: &Context, request: (String, u64)) -> HandlerResult<String> {
        let (order, amount) = request;
        let api = cairn_sdk::env("PAYMENTS_API")?;
        let timeout = cairn_sdk::env_or("PAYMENT_TIMEOUT_MS", 15 * 60 * 1000)?;
        let grace = cairn_sdk::env_or("PAYMENT_GRACE_MS", 24 * 3600 * 1000)?;
        let (callback, paid) = ctx.awakeable::<String>();
        let body = serde_json::json!({ "order": order, "amount": amount, "callback": callback });
        let charge = HttpCall::post_json(&format!("{api}/charge"), &body)
            .header("idempotency-key", &format!("charge-{order}"))
            .attempts(20);
        let answer = ctx.http_call(charge).wait()?;
        let result = if answer.status != 200 {
            PaymentResult::Failed {
                reason: format!("the provider answered {}", answer.status),
            }
        } else {
            let deadline = ctx.sleep(Duration::from_millis(timeout));
            if ctx.select(&[&paid, &deadline]) == 1 {
                report(ctx, &order, &PaymentResult::TimedOut);
                let grace = ctx.sleep(Duration::from_millis(grace));
                if ctx.select(&[&paid, &grace]) == 1 {
                    return Ok("no payment".into());
                }
            }
            match paid.wait() {
                Ok(reference) => PaymentResult::Paid { reference },
                Err(e) => PaymentResult::Failed {
                    reason: e.to_string(),
                },
            }
        };
        report(ctx, &order, &result);
        Ok(format!("{result:?}"))
    }
}

fn report(ctx: &Context, order: &str, result: &PaymentResult) {
    ctx.send(
        Target::object("Order", order, "payment_result"),
        result,
        None,
    );
}

cairn_sdk::export!(Order, Payment);
