//! The pattern examples of `docs/patterns.md`, end to end: each runs on the
//! real `cairn` binary, fed by the real Kafka broker (`scripts/kafka.sh`),
//! against outside APIs played by the test server's `/record/{channel}`.

use cairn_tests::kafka::{
    create_topic, produce, read_all, require_broker, subscribe, unique_topic, Record,
};
use cairn_tests::server::TestServer;
use cairn_tests::{example, until, Host, HostOptions};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

/// What a subscriber channel received, `(idempotency key, body)` in order,
/// with a request sent again right after itself (as after a crash between
/// the answer and its journal entry) counted once, as the subscriber would.
fn delivered(api: &TestServer, channel: &str) -> Vec<(String, Value)> {
    let mut deliveries: Vec<(String, Value)> = api
        .received(channel)
        .iter()
        .map(|r| {
            let key = r.idempotency_key.clone().unwrap_or_default();
            (key, serde_json::from_str(&r.body).unwrap_or(Value::Null))
        })
        .collect();
    deliveries.dedup();
    deliveries
}

/// A host with one pattern module deployed, allowed to reach loopback APIs,
/// and `sink` subscribed to a fresh topic of `partitions` partitions:
/// (host, topic, subscription id).
async fn subscribed(
    module: &str,
    config: &str,
    sink: &str,
    partitions: i32,
) -> (Host, String, String) {
    let bootstrap = require_broker();
    let host = Host::start_with(HostOptions {
        config: format!("http_allow = [\"127.0.0.1:*\"]\n{config}"),
        deploy: vec![example(module)],
    })
    .await;
    let topic = unique_topic(module);
    create_topic(&topic, partitions).await;
    let subscription = subscribe(&host, &bootstrap, &topic, sink).await;
    (host, topic, subscription)
}

/// Call a (shared) handler with no input and parse its JSON answer.
async fn query(host: &Host, path: &str) -> Value {
    host.post(path, "", &[]).await.json()
}

/// Records ingested so far by a subscription.
async fn ingested(host: &Host, subscription: &str) -> u64 {
    host.admin_get(&format!("/subscriptions/{subscription}"))
        .await
        .get("ingested")
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// A small deterministic generator, so a failing stream can be replayed.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i as u64 + 1) as usize);
        }
    }
}

#[tokio::test]
async fn burst_is_absorbed_by_the_journal_and_the_downstream_cap_is_never_exceeded() {
    const RECORDS: u64 = 100_000;
    const CAP: usize = 8;
    let api = TestServer::start(Duration::ZERO).await;
    api.set_max_concurrent("orders", CAP);
    api.set_delay("orders", 1);
    let config = format!(
        "[kafka]\nmax_in_flight = 200000\n[guest_env]\nBURST_API = \"{}/record/orders\"\n\
         [[concurrency]]\nscope = \"Burst/forward\"\nmax = {CAP}\n",
        api.url
    );
    let (host, topic, sub) = subscribed("burst", &config, "service://Burst/forward", 4).await;
    let records = (0..RECORDS)
        .map(|i| {
            Record::json(
                &format!("c{}", i % 1000),
                &json!({ "id": i, "amount": i % 97 }),
            )
        })
        .collect();
    let started = Instant::now();
    produce(&topic, records).await;
    until(
        "the burst to be in the journal",
        Duration::from_secs(300),
        || async { ingested(&host, &sub).await >= RECORDS },
    )
    .await;
    let absorbed = started.elapsed();
    let forwarded_then = api.received_count("orders");
    until(
        "every record to be forwarded",
        Duration::from_secs(600),
        || async { api.received_count("orders") as u64 >= RECORDS },
    )
    .await;
    let drained = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let received = api.received("orders");
    let keys: HashSet<_> = received
        .iter()
        .map(|r| r.idempotency_key.clone().expect("an idempotency key"))
        .collect();
    println!(
        "burst of {RECORDS}: in the journal after {absorbed:?} (downstream had {forwarded_then}), \
         all forwarded after {drained:?}; at most {} calls at once (cap {CAP})",
        api.max_in_flight("orders")
    );
    assert_eq!(received.len() as u64, RECORDS, "each record forwarded once");
    assert_eq!(keys.len() as u64, RECORDS, "no record forwarded twice");
    assert_eq!(
        api.refused("orders"),
        0,
        "the downstream never refused a call"
    );
    assert!(api.max_in_flight("orders") <= CAP);
    assert!(
        (forwarded_then as u64) < RECORDS,
        "ingest waited for the handlers: {forwarded_then} forwarded when the last record was ingested"
    );
}

/// A cart's state.
async fn cart(host: &Host, key: &str) -> Value {
    query(host, &format!("/Cart/{key}/status")).await
}

#[tokio::test]
async fn reminders_fire_after_the_quiet_period_unless_a_later_event_cancels_them() {
    let api = TestServer::start(Duration::ZERO).await;
    let config = format!(
        "[guest_env]\nNOTIFY_URL = \"{}/record/notify\"\nREMINDER_DELAY_MS = \"3000\"\n",
        api.url
    );
    let (mut host, topic, _) = subscribed("reminders", &config, "service://Cart/on_event", 2).await;
    let add = |item: &str| json!({ "type": "add_item", "item": item });
    let events = [
        ("cart-a", add("apple")),
        ("cart-a", add("pear")),
        ("cart-b", add("apple")),
        ("cart-b", json!({ "type": "check_out" })),
        ("cart-c", add("apple")),
        ("cart-d", add("apple")),
        ("cart-d", json!({ "type": "remove_item", "item": "apple" })),
    ];
    // Through `cairn produce`, as in the README's quick start: one call per
    // cart, its events in order.
    for cart in ["cart-a", "cart-b", "cart-c", "cart-d"] {
        let mut args = vec![
            "produce".to_string(),
            topic.clone(),
            "--key".into(),
            cart.into(),
        ];
        args.extend(
            events
                .iter()
                .filter(|(k, _)| *k == cart)
                .map(|(_, v)| v.to_string()),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = host.cli(&args).expect("cairn produce");
        assert!(
            out.starts_with(&format!("{topic}/")),
            "where the records landed: {out}"
        );
    }
    until(
        "every event to be applied",
        Duration::from_secs(60),
        || async {
            cart(&host, "cart-a").await["items"]
                .as_array()
                .map(Vec::len)
                == Some(2)
                && cart(&host, "cart-b").await["checked_out"] == json!(true)
                && cart(&host, "cart-c").await["items"]
                    .as_array()
                    .map(Vec::len)
                    == Some(1)
                && cart(&host, "cart-d").await["items"] == json!([])
                && cart(&host, "cart-d").await["reminder"].is_null()
        },
    )
    .await;
    assert_eq!(api.received_count("notify"), 0, "no reminder is due yet");
    host.restart().await;
    until("the reminders to fire", Duration::from_secs(60), || async {
        api.received_count("notify") >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut notified: Vec<Value> = api.received_json("notify");
    notified.sort_by_key(|n| n["cart"].as_str().unwrap_or_default().to_string());
    assert_eq!(
        notified,
        vec![
            json!({ "cart": "cart-a", "items": ["apple", "pear"] }),
            json!({ "cart": "cart-c", "items": ["apple"] }),
        ],
        "one reminder each for the carts left alone, none for the checked-out or emptied ones"
    );
    for (name, sent) in [("cart-a", 1), ("cart-b", 0), ("cart-c", 1), ("cart-d", 0)] {
        assert_eq!(
            cart(&host, name).await["reminders_sent"],
            json!(sent),
            "{name}"
        );
    }
}

#[tokio::test]
async fn inventory_invariants_hold_after_a_shuffled_duplicated_stream_and_a_kill() {
    const SKUS: usize = 40;
    const ORDERS: usize = 12;
    let (mut host, topic, _) = subscribed("inventory", "", "service://Sku/apply", 4).await;
    // Per SKU: 3 restocks of 4 units, 12 orders of 1-3 units each reserved
    // then confirmed (two in three) or released, shuffled, ~15% repeated.
    let mut rng = Lcg(7);
    let mut streams: Vec<(String, Vec<Value>, u64)> = Vec::new();
    for s in 0..SKUS {
        let mut events = Vec::new();
        for r in 0..3 {
            events.push(json!({ "type": "restock", "id": format!("r{r}"), "qty": 4 }));
        }
        for o in 0..ORDERS {
            let order = format!("o{o}");
            let qty = 1 + rng.below(3);
            events.push(json!({ "type": "reserve", "order": order, "qty": qty }));
            let end = if o % 3 == 0 { "release" } else { "confirm" };
            events.push(json!({ "type": end, "order": order }));
        }
        rng.shuffle(&mut events);
        let mut duplicates = 0;
        for i in 0..events.len() {
            if rng.below(100) < 15 {
                let at = i + 1 + rng.below((events.len() - i) as u64) as usize;
                events.insert(at.min(events.len()), events[i].clone());
                duplicates += 1;
            }
        }
        streams.push((format!("sku-{s}"), events, duplicates));
    }
    // Interleave the SKUs, as concurrent producers would.
    let longest = streams.iter().map(|s| s.1.len()).max().unwrap();
    let records: Vec<Record> = (0..longest)
        .flat_map(|i| {
            streams
                .iter()
                .filter_map(move |(sku, events, _)| Some(Record::json(sku, events.get(i)?)))
        })
        .collect();
    let half = records.len() / 2;
    let mut records = records.into_iter();
    produce(&topic, records.by_ref().take(half).collect()).await;
    until("ingest to start", Duration::from_secs(60), || async {
        query(&host, "/Sku/sku-0/snapshot").await["events"] != json!(0)
    })
    .await;
    host.kill();
    produce(&topic, records.collect()).await;
    host.restart().await;
    for (sku, events, duplicates) in &streams {
        let path = format!("/Sku/{sku}/snapshot");
        until(
            &format!("{sku} to see its stream"),
            Duration::from_secs(120),
            || async { query(&host, &path).await["events"].as_u64() >= Some(events.len() as u64) },
        )
        .await;
        let stock = query(&host, &path).await;
        assert_eq!(
            stock["events"],
            json!(events.len()),
            "{sku}: each record once"
        );
        assert_eq!(
            stock["duplicates"],
            json!(duplicates),
            "{sku}: every repeat recognised: {stock} from {events:?}"
        );
        let orders = stock["orders"].as_object().unwrap();
        assert_eq!(orders.len(), ORDERS, "{sku}");
        let mut sold = 0;
        for (order, reservation) in orders {
            let state = reservation["state"].as_str().unwrap();
            assert!(
                ["confirmed", "released", "rejected"].contains(&state),
                "{sku}/{order} was left {state}"
            );
            if state == "rejected" {
                assert_eq!(
                    reservation["closed"],
                    json!(true),
                    "{sku}/{order} left open"
                );
            }
            let released_order = order[1..].parse::<usize>().unwrap() % 3 == 0;
            assert!(
                state == "rejected" || (state == "released") == released_order,
                "{sku}/{order} ended {state}"
            );
            sold += reservation["qty"].as_u64().unwrap_or(0);
        }
        assert_eq!(
            stock["available"].as_u64().unwrap() + sold,
            12,
            "{sku}: units add up"
        );
    }
}

#[tokio::test]
async fn dispatcher_delivers_each_event_in_order_to_every_subscriber_across_a_kill() {
    const SUBSCRIBERS: usize = 50;
    const EVENTS: usize = 10;
    const SLOW: usize = 7;
    const DOWN: usize = 13;
    let api = TestServer::start(Duration::ZERO).await;
    let channel = |n: usize| format!("sub-{n}");
    api.set_delay(&channel(SLOW), 1000);
    api.set_down(&channel(DOWN), true);
    let config = "[retry]\nmax_interval = \"200ms\"\n";
    let (mut host, topic, _) = subscribed("dispatcher", config, "service://Topic/publish", 1).await;
    for n in 0..SUBSCRIBERS {
        let url = json!(format!("{}/record/{}", api.url, channel(n))).to_string();
        let r = host.post("/Topic/orders/subscribe", &url, &[]).await;
        assert_eq!(r.body, (n + 1).to_string());
    }
    let records = (0..EVENTS)
        .map(|i| Record::json("orders", &json!({ "n": i })))
        .collect();
    let started = Instant::now();
    produce(&topic, records).await;
    let healthy: Vec<usize> = (0..SUBSCRIBERS)
        .filter(|n| ![SLOW, DOWN].contains(n))
        .collect();
    until(
        "the healthy subscribers to get every event",
        Duration::from_secs(60),
        || async {
            healthy
                .iter()
                .all(|n| api.received_count(&channel(*n)) >= EVENTS)
        },
    )
    .await;
    let healthy_done = started.elapsed();
    let slow_then = api.received_count(&channel(SLOW));
    assert!(
        slow_then < EVENTS,
        "the slow subscriber is still busy ({slow_then} received)"
    );
    assert_eq!(api.received_count(&channel(DOWN)), 0);
    assert!(
        api.refused(&channel(DOWN)) > 0,
        "the failing subscriber was tried"
    );
    // SIGKILL while the slow subscriber has a request in flight and the
    // failing one is being retried.
    host.restart().await;
    api.set_down(&channel(DOWN), false);
    until(
        "the slow and recovered subscribers to catch up",
        Duration::from_secs(60),
        || async {
            [SLOW, DOWN]
                .iter()
                .all(|n| delivered(&api, &channel(*n)).len() >= EVENTS)
        },
    )
    .await;
    println!(
        "{} healthy subscribers had all {EVENTS} events after {healthy_done:?}; \
         the slow one had {slow_then}; all caught up after {:?}",
        healthy.len(),
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let expected: Vec<(String, Value)> = (0..EVENTS)
        .map(|i| (format!("orders-{i}"), json!({ "n": i })))
        .collect();
    let mut again = 0;
    for n in 0..SUBSCRIBERS {
        let sent = api.received_count(&channel(n));
        assert_eq!(
            delivered(&api, &channel(n)),
            expected,
            "subscriber {n}: each event, in order"
        );
        assert!(
            sent <= EVENTS + 1,
            "subscriber {n}: only a request in flight at the kill may come again ({sent} sent)"
        );
        again += sent - EVENTS;
    }
    println!(
        "{again} request(s) in flight at the kill were sent again, with the same idempotency key"
    );
}

#[tokio::test]
async fn enrichment_throughput_scales_with_concurrency_not_with_call_latency() {
    const KEYS: usize = 100;
    const ROUNDS: usize = 2;
    const LATENCY_MS: u64 = 1000;
    let bootstrap = require_broker();
    let api = TestServer::start(Duration::ZERO).await;
    api.set_delay("profile", LATENCY_MS);
    let out = unique_topic("enriched");
    create_topic(&out, 1).await;
    let config = format!(
        "suspend_after = \"100ms\"\n[guest_env]\nPROFILE_API = \"{}/record/profile\"\nENRICHED_TOPIC = \"{out}\"\n",
        api.url
    );
    let (_host, topic, _) = subscribed("enrichment", &config, "service://Enricher/enrich", 4).await;
    let records = (0..ROUNDS)
        .flat_map(|round| {
            (0..KEYS).map(move |k| Record::json(&format!("c{k}"), &json!({ "round": round })))
        })
        .collect();
    let started = Instant::now();
    produce(&topic, records).await;
    until(
        "every event to be enriched",
        Duration::from_secs(120),
        || async {
            api.received_count("profile") >= KEYS * ROUNDS
                && read_all(&bootstrap, &out).await.len() >= KEYS * ROUNDS
        },
    )
    .await;
    let elapsed = started.elapsed();
    let sequential = Duration::from_millis(LATENCY_MS * (KEYS * ROUNDS) as u64);
    println!(
        "{} events, {LATENCY_MS} ms per call: {elapsed:?} ({:.0} events/s; one at a time would take {sequential:?}); \
         {} calls at once at most",
        KEYS * ROUNDS,
        (KEYS * ROUNDS) as f64 / elapsed.as_secs_f64(),
        api.max_in_flight("profile")
    );
    assert!(
        api.max_in_flight("profile") >= KEYS / 2,
        "calls for different keys overlap"
    );
    assert!(
        elapsed < sequential / 5,
        "throughput is not bound by the call latency"
    );
    let mut per_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (key, value, _) in read_all(&bootstrap, &out).await {
        let v: Value = serde_json::from_slice(&value).unwrap();
        assert_eq!(key.as_deref(), v["customer"].as_str().map(str::as_bytes));
        assert!(v["profile"].as_str().unwrap().contains("customer"));
        per_key
            .entry(v["customer"].as_str().unwrap().to_string())
            .or_default()
            .push(v["event"]["round"].as_u64().unwrap());
    }
    assert_eq!(per_key.len(), KEYS);
    for (key, rounds) in per_key {
        assert_eq!(rounds, vec![0, 1], "{key}: each event once, in order");
    }
}

/// Order `i`'s state.
async fn order_status(host: &Host, i: usize) -> Value {
    query(host, &format!("/Order/order-{i}/status")).await
}

/// What the test, playing the payment provider, does with order `i`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Scenario {
    /// Paid, then shipped.
    Pay,
    /// Shipped before it was paid.
    ShipFirst,
    /// Never paid: cancelled at the deadline.
    NeverPay,
    /// Paid after the deadline: cancelled and refunded.
    LatePay,
    /// Cancelled by the customer, then paid: refunded.
    CancelThenPay,
    /// Every event and the webhook twice.
    Duplicates,
    /// Paid, then cancelled by the customer: refunded.
    PayThenCancel,
}

const SCENARIOS: [Scenario; 7] = [
    Scenario::Pay,
    Scenario::ShipFirst,
    Scenario::NeverPay,
    Scenario::LatePay,
    Scenario::CancelThenPay,
    Scenario::Duplicates,
    Scenario::PayThenCancel,
];

#[tokio::test]
async fn payments_end_right_under_every_interleaving_of_events_webhooks_deadlines_and_a_kill() {
    use Scenario::*;
    const ORDERS: usize = 28;
    let api = TestServer::start(Duration::ZERO).await;
    let config = format!(
        "[guest_env]\nPAYMENTS_API = \"{}/record\"\nPAYMENT_TIMEOUT_MS = \"8000\"\nPAYMENT_GRACE_MS = \"60000\"\n",
        api.url
    );
    let (mut host, topic, _) = subscribed("payments", &config, "service://Order/on_event", 4).await;
    let scenario = |i: usize| SCENARIOS[i % SCENARIOS.len()];
    let order = |i: usize| format!("order-{i}");
    let event =
        |i: usize, kind: &str| Record::json(&order(i), &json!({ "type": kind, "amount": 100 + i }));
    // Phase 1: every order placed; some shipped or cancelled before paying.
    let mut first = Vec::new();
    for i in 0..ORDERS {
        first.push(event(i, "placed"));
        match scenario(i) {
            ShipFirst => first.push(event(i, "shipped")),
            CancelThenPay => first.push(event(i, "cancelled")),
            Duplicates => first.push(event(i, "placed")),
            _ => {}
        }
    }
    produce(&topic, first).await;
    until(
        "a charge request per order",
        Duration::from_secs(60),
        || async { api.received_count("charge") >= ORDERS },
    )
    .await;
    until("phase 1 to be applied", Duration::from_secs(60), || async {
        for i in 0..ORDERS {
            let expected = match scenario(i) {
                ShipFirst => 2,
                CancelThenPay => 2,
                Duplicates => 3, // placed, placed, "ignored"
                _ => 1,
            };
            if order_status(&host, i).await["history"]
                .as_array()
                .map(Vec::len)
                != Some(expected)
            {
                return false;
            }
        }
        true
    })
    .await;
    let callbacks: BTreeMap<String, String> = api
        .received_json("charge")
        .iter()
        .map(|c| {
            (
                c["order"].as_str().unwrap().to_string(),
                c["callback"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        callbacks.len(),
        ORDERS,
        "one charge per order, duplicates included"
    );
    // The worst moment for a webhook: the charges are out, the awakeables
    // wait, and the host dies.
    host.restart().await;
    let pay = |i: usize| {
        let (host, callbacks) = (&host, &callbacks);
        async move {
            let path = format!("/restate/awakeables/{}/resolve", callbacks[&order(i)]);
            host.post(&path, &json!(format!("ref-{i}")).to_string(), &[])
                .await
                .status
        }
    };
    // Phase 2: the provider's webhooks (on time), then shipping and cancels.
    for i in 0..ORDERS {
        if matches!(
            scenario(i),
            Pay | ShipFirst | CancelThenPay | Duplicates | PayThenCancel
        ) {
            assert_eq!(pay(i).await, 202, "order {i}'s webhook is accepted");
        }
        if scenario(i) == Duplicates {
            assert_ne!(
                pay(i).await,
                202,
                "a second webhook for a paid order is refused"
            );
        }
    }
    until(
        "the payments to be applied",
        Duration::from_secs(60),
        || async {
            for i in 0..ORDERS {
                let paid = order_status(&host, i).await["payment"].is_string();
                if paid
                    != matches!(
                        scenario(i),
                        Pay | ShipFirst | CancelThenPay | Duplicates | PayThenCancel
                    )
                {
                    return false;
                }
            }
            true
        },
    )
    .await;
    let mut second = Vec::new();
    for i in 0..ORDERS {
        match scenario(i) {
            Pay => second.push(event(i, "shipped")),
            Duplicates => second.extend([event(i, "shipped"), event(i, "shipped")]),
            PayThenCancel => second.push(event(i, "cancelled")),
            _ => {}
        }
    }
    produce(&topic, second).await;
    // Phase 3: after the deadline, the late payments.
    until(
        "the unpaid orders to be cancelled at the deadline",
        Duration::from_secs(60),
        || async {
            for i in (0..ORDERS).filter(|i| matches!(scenario(*i), NeverPay | LatePay)) {
                if order_status(&host, i).await["stage"] != json!("cancelled") {
                    return false;
                }
            }
            true
        },
    )
    .await;
    for i in (0..ORDERS).filter(|i| scenario(*i) == LatePay) {
        assert_eq!(pay(i).await, 202, "order {i}'s late webhook is accepted");
    }
    let expected = |i: usize| match scenario(i) {
        Pay | ShipFirst | Duplicates => ("shipped", false),
        NeverPay => ("cancelled", false),
        LatePay | CancelThenPay | PayThenCancel => ("cancelled", true),
    };
    until(
        "every order to reach its end",
        Duration::from_secs(60),
        || async {
            for i in 0..ORDERS {
                let s = order_status(&host, i).await;
                let (stage, refunded) = expected(i);
                if s["stage"] != json!(stage) || s["refunded"] != json!(refunded) {
                    return false;
                }
            }
            true
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let refunds: Vec<String> = api
        .received_json("refund")
        .iter()
        .map(|r| r["order"].as_str().unwrap().to_string())
        .collect();
    let mut expected_refunds: Vec<String> =
        (0..ORDERS).filter(|i| expected(*i).1).map(order).collect();
    let mut sorted = refunds.clone();
    sorted.sort();
    expected_refunds.sort();
    assert_eq!(
        sorted, expected_refunds,
        "each paid-but-cancelled order refunded once, no other"
    );
    for i in 0..ORDERS {
        let s = order_status(&host, i).await;
        assert_eq!(
            s["refunded"],
            json!(expected(i).1),
            "order {i} ({:?}): {s}",
            scenario(i)
        );
        if s["stage"] == json!("shipped") {
            assert!(s["payment"].is_string(), "order {i} shipped unpaid: {s}");
        }
    }
}

#[tokio::test]
async fn signup_workflow_verifies_reminds_expires_and_announces_once_across_a_kill() {
    let bootstrap = require_broker();
    let api = TestServer::start(Duration::ZERO).await;
    let out = unique_topic("signups-done");
    create_topic(&out, 1).await;
    let config = format!(
        "[guest_env]\nACCOUNTS_API = \"{}/record\"\nSIGNUP_EVENTS = \"{out}\"\n\
         REMIND_AFTER_MS = \"6000\"\nEXPIRE_AFTER_MS = \"3000\"\n",
        api.url
    );
    let (mut host, topic, _) = subscribed("signup", &config, "service://Onboarding/run", 2).await;
    let users = ["u-fast", "u-late", "u-never"];
    let records = users
        .iter()
        .map(|u| Record::json(u, &json!({ "email": format!("{u}@example.com") })))
        .collect();
    produce(&topic, records).await;
    let emails = |kind: &'static str| {
        let api = &api;
        move || async move {
            api.received_json("emails")
                .iter()
                .filter(|e| e["kind"] == json!(kind))
                .count()
        }
    };
    until(
        "the verification emails",
        Duration::from_secs(60),
        || async { emails("verify")().await >= 3 },
    )
    .await;
    host.restart().await;
    let click = |user: &'static str| {
        let host = &host;
        async move {
            host.post(&format!("/Onboarding/{user}/click"), "\"code\"", &[])
                .await
                .status
        }
    };
    assert_eq!(click("u-fast").await, 200);
    until("the reminders", Duration::from_secs(60), || async {
        emails("reminder")().await >= 2
    })
    .await;
    assert_eq!(click("u-late").await, 200);
    until(
        "the three outcomes on Kafka",
        Duration::from_secs(60),
        || async { read_all(&bootstrap, &out).await.len() >= 3 },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut outcomes: Vec<(String, String)> = read_all(&bootstrap, &out)
        .await
        .iter()
        .map(|(_, v, _)| {
            let v: Value = serde_json::from_slice(v).unwrap();
            (
                v["user"].as_str().unwrap().into(),
                v["outcome"].as_str().unwrap().into(),
            )
        })
        .collect();
    outcomes.sort();
    let expected = [
        ("u-fast", "active"),
        ("u-late", "active"),
        ("u-never", "expired"),
    ];
    assert_eq!(
        outcomes,
        expected.map(|(u, o)| (u.to_string(), o.to_string()))
    );
    let mut accounts: Vec<String> = api
        .received_json("accounts")
        .iter()
        .map(|a| a["user"].as_str().unwrap().to_string())
        .collect();
    accounts.sort();
    assert_eq!(accounts, users, "one account per user, none created twice");
    assert_eq!(emails("verify")().await, 3, "one verification email each");
    let reminded: HashSet<String> = api
        .received_json("emails")
        .iter()
        .filter(|e| e["kind"] == json!("reminder"))
        .map(|e| e["user"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(reminded, HashSet::from(["u-late".into(), "u-never".into()]));
    assert_eq!(
        emails("reminder")().await,
        2,
        "one reminder each, only to the slow ones"
    );
    for (user, stage) in expected {
        let s = host
            .post(&format!("/Onboarding/{user}/stage"), "", &[])
            .await;
        assert_eq!(s.body, json!(stage).to_string(), "{user}");
    }
}

#[tokio::test]
async fn orders_are_keyed_by_the_customer_in_the_payload_and_poison_orders_are_parked_once() {
    const CUSTOMERS: usize = 20;
    const ORDERS: usize = 600;
    let bootstrap = require_broker();
    let (topic, dlq) = (unique_topic("orders"), unique_topic("orders-dlq"));
    create_topic(&topic, 3).await;
    create_topic(&dlq, 1).await;
    // The config file owns the cluster and both subscriptions.
    let config = format!(
        "[[kafka.clusters]]\nname = \"local\"\nproperties = {{ \"bootstrap.servers\" = \"{bootstrap}\" }}\n\n\
         [[kafka.subscriptions]]\nname = \"orders\"\nsource = \"kafka://local/{topic}\"\n\
         sink = \"service://Customer/order\"\nkey = \"json:/customer/id\"\nnull_key = \"dead-letter\"\n\
         dead_letter = \"kafka://local/{dlq}\"\n\n\
         [[kafka.subscriptions]]\nname = \"orders-review\"\nsource = \"kafka://local/{dlq}\"\n\
         sink = \"service://Review/park\"\nkey = \"header:cairn-source-topic\"\n"
    );
    let mut host = Host::start_with(HostOptions {
        config,
        deploy: vec![example("orders")],
    })
    .await;
    // Keyed by order id, as the producer's database has it: a customer's
    // orders land on every partition.
    let order = |i: usize| {
        let customer = format!("c{}", i % CUSTOMERS);
        Record::json(
            &format!("order-{i}"),
            &json!({ "order": format!("o{i}"), "amount": i, "customer": { "id": customer } }),
        )
    };
    let raw = |key: &str, value: &[u8]| Record {
        key: Some(key.as_bytes().to_vec()),
        value: value.to_vec(),
        headers: vec![],
    };
    let mut records: Vec<Record> = (0..ORDERS / 2).map(order).collect();
    records.push(Record::json(
        "order-bad",
        &json!({ "order": "bad", "amount": -5, "customer": { "id": "c7" } }),
    ));
    records.push(Record::json(
        "order-anon",
        &json!({ "order": "anon", "amount": 1 }),
    ));
    records.push(raw("order-garbage", b"\x00\x01 not json"));
    produce(&topic, records).await;
    until("the first half", Duration::from_secs(120), || async {
        let c0 = query(&host, "/Customer/c0/summary").await;
        c0["orders"].as_array().is_some_and(|o| o.len() >= 5)
    })
    .await;
    host.kill();
    host.restart().await;
    produce(&topic, (ORDERS / 2..ORDERS).map(order).collect()).await;
    until("every good order", Duration::from_secs(180), || async {
        let mut applied = 0;
        for c in 0..CUSTOMERS {
            let s = query(&host, &format!("/Customer/c{c}/summary")).await;
            applied += s["orders"].as_array().map_or(0, Vec::len);
        }
        applied == ORDERS
    })
    .await;
    for c in 0..CUSTOMERS {
        let s = query(&host, &format!("/Customer/c{c}/summary")).await;
        let mut got: Vec<String> = serde_json::from_value(s["orders"].clone()).unwrap();
        got.sort();
        let mut want: Vec<String> = (0..ORDERS)
            .filter(|i| i % CUSTOMERS == c)
            .map(|i| format!("o{i}"))
            .collect();
        want.sort();
        assert_eq!(got, want, "c{c}: each of its orders once");
        let total: usize = (0..ORDERS).filter(|i| i % CUSTOMERS == c).sum();
        assert_eq!(s["total"], total, "c{c}: the exact total");
    }
    until(
        "three parked dead letters",
        Duration::from_secs(60),
        || async {
            query(&host, &format!("/Review/{topic}/list"))
                .await
                .as_array()
                .map_or(0, Vec::len)
                == 3
        },
    )
    .await;
    let parked = query(&host, &format!("/Review/{topic}/list")).await;
    let errors: Vec<&str> = parked
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["error"].as_str().unwrap())
        .collect();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("422") && e.contains("negative amount")),
        "{parked}"
    );
    assert_eq!(
        errors.iter().filter(|e| e.contains("no key")).count(),
        2,
        "{parked}"
    );
    assert_eq!(
        read_all(&bootstrap, &dlq).await.len(),
        3,
        "each poison record once"
    );
}
