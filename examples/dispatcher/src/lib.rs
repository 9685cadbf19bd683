//! Dispatcher: every event of a topic goes to each of its subscribers (say
//! fifty webhook endpoints), exactly once each, in order per subscriber; a
//! slow or failing subscriber delays nobody else.
//!
//! `Topic/{name}` keeps the subscriber list. `publish` (the Kafka sink) numbers
//! the event and sends one `Delivery/{subscriber}/deliver` per subscriber.
//! The sends are journaled with the publish, so none is lost or doubled. Each
//! subscriber is its own virtual object key: its deliveries run one at a
//! time in publish order, while the other keys run freely. `deliver` makes
//! the request through the host with retries until the subscriber accepts it
//! (429 and 5xx are retried with backoff, and the invocation suspends
//! meanwhile), so a subscriber that is down gets everything it missed, in
//! order, once it is back. Every request carries `idempotency-key:
//! {topic}-{seq}`: after a host crash between the subscriber's answer and
//! the journal entry the same request is sent again, and the key lets the
//! subscriber drop the copy.

use cairn_sdk::prelude::*;
use std::time::Duration;

/// One delivery to one subscriber.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Envelope {
    /// The subscriber's URL.
    pub url: String,
    /// The topic.
    pub topic: String,
    /// The event's number in its topic (0, 1, ...).
    pub seq: u64,
    /// The event.
    pub event: serde_json::Value,
}

/// A topic and its subscribers.
pub struct Topic;

#[cairn_sdk::object]
impl Topic {
    /// Add a subscriber URL (once); returns the number of subscribers.
    pub fn subscribe(ctx: &Context, url: String) -> HandlerResult<usize> {
        let mut subscribers = ctx.get::<Vec<String>>("subscribers")?.unwrap_or_default();
        if !subscribers.contains(&url) {
            subscribers.push(url);
            ctx.set("subscribers", &subscribers);
        }
        Ok(subscribers.len())
    }

    /// Fan an event out to every subscriber; returns its sequence number.
    pub fn publish(ctx: &Context, event: serde_json::Value) -> HandlerResult<u64> {
        let seq = ctx.get::<u64>("published")?.unwrap_or(0);
        ctx.set("published", &(seq + 1));
        let subscribers = ctx.get::<Vec<String>>("subscribers")?.unwrap_or_default();
        for url in subscribers {
            let target = Target::object("Delivery", &url, "deliver");
            let envelope = Envelope {
                topic: ctx.key().to_string(),
                url,
                seq,
                event: event.clone(),
            };
            ctx.send(target, &envelope, None);
        }
        Ok(seq)
    }

    /// The subscribers.
    #[shared]
    pub fn subscribers(ctx: &Context) -> HandlerResult<Vec<String>> {
        Ok(ctx.get("subscribers")?.unwrap_or_default())
    }
}

/// Deliveries to one subscriber (the key is its URL), in order.
pub struct Delivery;

#[cairn_sdk::object]
impl Delivery {
    /// POST the event to the subscriber until it accepts it; a 4xx answer
    /// other than 429 means it never will, so the event is set aside in
    /// `rejected` and the next one goes.
    pub fn deliver(ctx: &Context, envelope: Envelope) -> HandlerResult<u16> {
        let request = HttpCall::post_json(&envelope.url, &envelope.event)
            .header(
                "idempotency-key",
                &format!("{}-{}", envelope.topic, envelope.seq),
            )
            .timeout(Duration::from_secs(30))
            .attempts(u32::MAX);
        let response = ctx.http_call(request).wait()?;
        if !(200..300).contains(&response.status) {
            let mut rejected = ctx.get::<Vec<u64>>("rejected")?.unwrap_or_default();
            rejected.push(envelope.seq);
            ctx.set("rejected", &rejected);
        }
        Ok(response.status)
    }

    /// Sequence numbers the subscriber refused for good.
    #[shared]
    pub fn rejected(ctx: &Context) -> HandlerResult<Vec<u64>> {
        Ok(ctx.get("rejected")?.unwrap_or_default())
    }
}

cairn_sdk::export!(Topic, Delivery);
