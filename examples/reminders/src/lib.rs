//! Reminders: every change to a shopping cart schedules a follow-up ("you
//! left something in your cart") that fires after a quiet period unless a
//! later event cancels it: another change (which schedules a new one) or
//! the checkout.
//!
//! The follow-up is a delayed send to the cart's own `remind` handler. Its
//! invocation id is kept in the cart's state, and the next event cancels it
//! with `ctx.cancel`. Both the send and the cancel are journaled, so a host
//! restart between scheduling and firing changes nothing: the timer is
//! durable, and a cancelled follow-up completes without running.
//!
//! Settings (`[guest_env]`): `NOTIFY_URL` (where reminders are POSTed),
//! `REMINDER_DELAY_MS` (default 30 minutes).

use cairn_sdk::prelude::*;
use std::time::Duration;

/// What happens to a cart (the Kafka record's value; the key is the cart id).
#[derive(serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CartEvent {
    /// An item was added.
    AddItem {
        /// The item.
        item: String,
    },
    /// An item was removed.
    RemoveItem {
        /// The item.
        item: String,
    },
    /// The customer paid: no reminder any more.
    CheckOut,
}

/// A cart's state.
#[derive(serde::Serialize, serde::Deserialize, Default)]
pub struct CartState {
    /// Items in the cart.
    pub items: Vec<String>,
    /// Whether it was checked out.
    pub checked_out: bool,
    /// The pending reminder's invocation id, if one is scheduled.
    pub reminder: Option<String>,
    /// Reminders sent so far.
    pub reminders_sent: u32,
}

/// A shopping cart per key.
pub struct Cart;

#[cairn_sdk::object]
impl Cart {
    /// Apply an event; cancel the pending reminder and, while the cart has
    /// items and is not checked out, schedule a new one.
    pub fn on_event(ctx: &Context, event: CartEvent) -> HandlerResult<CartState> {
        let mut cart = ctx.get::<CartState>("cart")?.unwrap_or_default();
        if let Some(previous) = cart.reminder.take() {
            ctx.cancel(&previous);
        }
        match event {
            CartEvent::AddItem { item } => cart.items.push(item),
            CartEvent::RemoveItem { item } => cart.items.retain(|i| *i != item),
            CartEvent::CheckOut => cart.checked_out = true,
        }
        if !cart.checked_out && !cart.items.is_empty() {
            let delay = cairn_sdk::env_or("REMINDER_DELAY_MS", 30 * 60 * 1000)?;
            let target = Target::object("Cart", ctx.key(), "remind");
            let id = ctx.send(target, &(), Some(Duration::from_millis(delay)));
            cart.reminder = Some(id);
        }
        ctx.set("cart", &cart);
        Ok(cart)
    }

    /// The follow-up: POST the cart to `NOTIFY_URL` (idempotency key: this
    /// invocation's id, so a retried request can be recognised).
    pub fn remind(ctx: &Context) -> HandlerResult<u32> {
        let mut cart = ctx.get::<CartState>("cart")?.unwrap_or_default();
        let url = cairn_sdk::env("NOTIFY_URL")?;
        let body = serde_json::json!({ "cart": ctx.key(), "items": cart.items });
        let request = HttpCall::post_json(&url, &body)
            .header("idempotency-key", ctx.invocation_id())
            .attempts(10);
        ctx.http_call(request).wait()?;
        cart.reminder = None;
        cart.reminders_sent += 1;
        ctx.set("cart", &cart);
        Ok(cart.reminders_sent)
    }

    /// The cart as it is.
    #[shared]
    pub fn status(ctx: &Context) -> HandlerResult<CartState> {
        Ok(ctx.get("cart")?.unwrap_or_default())
    }
}

cairn_sdk::export!(Cart);
