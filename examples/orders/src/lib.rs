//! Orders: one customer's orders, keyed by the customer id inside the
//! payload, with poison records parked in a dead-letter topic.
//!
//! The producer keys its records by order id (that is what its database
//! has), but the state machine is per customer. The subscription takes
//! the object key from the value (`key = "json:/customer/id"`), so every
//! order of a customer reaches the same `Customer/{id}`, one at a time.
//!
//! An order that can never be applied (a negative amount, a value that is
//! not JSON, no customer at all) must not stop its customer, or anyone
//! else: the handler rejects it with a terminal error, the subscription's
//! `on_failure = "dead-letter"` produces the original record to the
//! dead-letter topic, once, with `cairn-error` and the source position in
//! its headers, and the next order of the customer goes on. A second
//! subscription reads the dead-letter topic into `Review/{source topic}`
//! (`key = "header:cairn-source-topic"`), where an operator (or a fixing
//! job) finds them.

use cairn_sdk::prelude::*;
use serde::{Deserialize, Serialize};

/// An order event.
#[derive(Deserialize)]
pub struct Order {
    /// The order's id.
    pub order: String,
    /// Its amount in cents; negative amounts are refused.
    pub amount: i64,
}

/// What a customer has.
#[derive(Serialize, Deserialize, Default)]
pub struct Summary {
    /// Orders applied, in the order they were applied.
    pub orders: Vec<String>,
    /// Their total, in cents.
    pub total: i64,
}

/// A dead letter parked for review.
#[derive(Serialize, Deserialize)]
pub struct Parked {
    /// Why it failed (`cairn-error`).
    pub error: String,
    /// Where it came from: `partition@offset` of the source topic.
    pub at: String,
    /// The original value, as text.
    pub value: String,
}

/// A customer's orders.
pub struct Customer;

#[cairn_sdk::object]
impl Customer {
    /// Apply an order; a negative amount is refused for good (422), so the
    /// record is dead-lettered and the customer's next order goes on.
    pub fn order(ctx: &Context, order: Order) -> HandlerResult<i64> {
        if order.amount < 0 {
            let message = format!("order {} has a negative amount", order.order);
            return Err(TerminalError::with_code(422, message).into());
        }
        let mut summary = ctx.get::<Summary>("summary")?.unwrap_or_default();
        summary.orders.push(order.order);
        summary.total += order.amount;
        ctx.set("summary", &summary);
        Ok(summary.total)
    }

    /// The customer's orders and total.
    #[shared]
    pub fn summary(ctx: &Context) -> HandlerResult<Summary> {
        Ok(ctx.get("summary")?.unwrap_or_default())
    }
}

/// The dead letters of one source topic, for review.
pub struct Review;

#[cairn_sdk::object]
impl Review {
    /// Park a dead letter (its value may not even be JSON).
    pub fn park(ctx: &Context, letter: Raw) -> HandlerResult<usize> {
        let header = |name: &str| ctx.header(name).unwrap_or("?").to_string();
        let parked = Parked {
            error: header("cairn-error"),
            at: format!(
                "{}@{}",
                header("cairn-source-partition"),
                header("cairn-source-offset")
            ),
            value: String::from_utf8_lossy(&letter.0).into_owned(),
        };
        let mut all = ctx.get::<Vec<Parked>>("parked")?.unwrap_or_default();
        all.push(parked);
        ctx.set("parked", &all);
        Ok(all.len())
    }

    /// Everything parked.
    #[shared]
    pub fn list(ctx: &Context) -> HandlerResult<Vec<Parked>> {
        Ok(ctx.get("parked")?.unwrap_or_default())
    }
}

cairn_sdk::export!(Customer, Review);
