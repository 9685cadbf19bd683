//! Kafka pipelines in production, against the real broker
//! (`scripts/kafka.sh`): dead letters (exactly once across SIGKILL and an
//! abort at the worst moment), stopping on a failed record and skipping
//! it, keys from headers and JSON values, records without keys, several
//! topics, start positions, and subscriptions from the config file.

use cairn_tests::kafka::{
    create_topic, produce, read_all, read_partitions, require_broker, unique_topic, Record,
};
use cairn_tests::{example, until, Host, HostOptions};
use serde_json::{json, Value};
use std::time::Duration;

fn options(extra: &str) -> HostOptions {
    HostOptions {
        config: extra.to_string(),
        deploy: vec![example("basics"), example("coordination")],
    }
}

/// Register the broker as cluster `local` and create a subscription with
/// `settings` (source, sink, key, dead_letter, ...); its id.
async fn subscribe_with(host: &Host, broker: &str, settings: Value) -> String {
    let cluster = json!({ "name": "local", "properties": { "bootstrap.servers": broker } });
    assert_eq!(
        host.admin_post("/kafka-clusters", Some(&cluster))
            .await
            .status,
        201
    );
    let r = host.admin_post("/subscriptions", Some(&settings)).await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.json()["id"].as_str().unwrap().to_string()
}

/// The sequence numbers `Events/{key}` handled, in order.
async fn numbers(host: &Host, key: &str) -> Vec<u64> {
    let seen = host
        .post(&format!("/Events/{key}/seen"), "", &[])
        .await
        .json();
    serde_json::from_value(seen["numbers"].clone()).unwrap_or_default()
}

fn event(key: &str, n: u64) -> Record {
    Record::json(key, &json!({ "n": n }))
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map_or("", |(_, v)| v.as_str())
}

#[tokio::test]
async fn a_poison_record_is_dead_lettered_exactly_once_across_kills_and_its_key_goes_on() {
    let broker = require_broker();
    let (topic, dlq) = (unique_topic("poison"), unique_topic("poison-dlq"));
    create_topic(&topic, 1).await;
    create_topic(&dlq, 1).await;
    let record = |n: u64| match n {
        500 => Record {
            key: Some(b"k".to_vec()),
            value: json!({ "n": n, "poison": true }).to_string().into_bytes(),
            headers: vec![("x-trace".into(), "poison-500".into())],
        },
        n => event("k", n),
    };
    produce(&topic, (0..500).map(record).collect()).await;
    // The host aborts right after the broker acknowledges the dead letter,
    // before its store forgets it: the restart must not produce it again.
    let faults = [("CAIRN_FAULTS", "abort_after_dead_letter=1")];
    let mut host = Host::start_with_env(options(""), &faults).await;
    let settings = json!({
        "source": format!("kafka://local/{topic}"),
        "sink": "service://Events/handle",
        "dead_letter": format!("kafka://local/{dlq}"),
    });
    let sub = subscribe_with(&host, &broker, settings).await;
    until(
        "a first part of the records",
        Duration::from_secs(120),
        || async { numbers(&host, "k").await.len() >= 100 },
    )
    .await;
    host.kill();
    host.restart().await;
    // The rest, the poison first, once the host runs again; then wait for
    // the injected abort right after the dead letter's acknowledgement.
    produce(&topic, (500..1000).map(record).collect()).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while host.running() {
        assert!(
            std::time::Instant::now() < deadline,
            "no abort: {}",
            host.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(host
        .log()
        .contains("aborting after a dead letter was acknowledged"));
    host.restart().await;
    until("every good record", Duration::from_secs(120), || async {
        numbers(&host, "k").await.len() == 999
    })
    .await;
    let expected: Vec<u64> = (0..1000).filter(|&n| n != 500).collect();
    assert_eq!(numbers(&host, "k").await, expected, "999 applied, in order");
    until(
        "the dead letter leaves the store",
        Duration::from_secs(60),
        || async { host.admin_get("/storage").await["rows"]["dead_letters"] == 0 },
    )
    .await;
    let letters = read_all(&broker, &dlq).await;
    assert_eq!(letters.len(), 1, "exactly one dead letter: {letters:?}");
    assert!(
        host.log().contains("not produced again"),
        "the restart found it in the topic"
    );
    let (key, value, headers) = &letters[0];
    assert_eq!(key.as_deref(), Some(&b"k"[..]));
    let value: Value = serde_json::from_slice(value).unwrap();
    assert_eq!(
        value,
        json!({ "n": 500, "poison": true }),
        "the original value"
    );
    assert_eq!(
        header(headers, "x-trace"),
        "poison-500",
        "the original headers"
    );
    assert_eq!(header(headers, "cairn-source-topic"), topic);
    assert_eq!(header(headers, "cairn-source-partition"), "0");
    assert_eq!(header(headers, "cairn-source-offset"), "500");
    assert_eq!(header(headers, "cairn-subscription"), sub);
    assert!(
        header(headers, "cairn-error").contains("poison record 500"),
        "{headers:?}"
    );
    let invocation = header(headers, "cairn-invocation-id");
    let record = host.admin_get(&format!("/invocations/{invocation}")).await;
    assert_eq!(record["status"], "failed", "{record}");
    let view = host.admin_get(&format!("/subscriptions/{sub}")).await;
    assert_eq!(view["paused"], false, "dead-lettering does not stop it");
}

#[tokio::test]
async fn on_failure_pause_stops_the_subscription_until_the_record_is_skipped() {
    let broker = require_broker();
    let topic = unique_topic("stop");
    create_topic(&topic, 1).await;
    let mut records: Vec<Record> = (0..5).map(|n| event("a", n)).collect();
    records.push(Record {
        key: Some(b"a".to_vec()),
        value: b"not json".to_vec(),
        headers: vec![],
    });
    records.extend((6..10).map(|n| event("a", n)));
    produce(&topic, records).await;
    let mut host = Host::start_with(options("")).await;
    let settings = json!({
        "source": format!("kafka://local/{topic}"),
        "sink": "service://Events/handle",
        "on_failure": "pause",
    });
    let sub = subscribe_with(&host, &broker, settings).await;
    until("the stop on offset 5", Duration::from_secs(120), || async {
        let v = host.admin_get(&format!("/subscriptions/{sub}")).await;
        v["paused"] == true && v["stopped"].as_str().is_some_and(|s| s.contains("@5"))
    })
    .await;
    let listed = host.cli(&["subscriptions", "list"]).unwrap();
    assert!(
        listed.contains(&format!("stopped at {topic}/0@5")),
        "{listed}"
    );
    assert!(
        listed.contains("cannot decode the handler's input"),
        "{listed}"
    );
    assert_eq!(numbers(&host, "a").await, vec![0, 1, 2, 3, 4]);
    produce(&topic, vec![event("a", 10)]).await;
    host.restart().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        numbers(&host, "a").await,
        vec![0, 1, 2, 3, 4],
        "the key waits behind the failed record, across a restart"
    );
    let wrong = host.cli(&[
        "subscriptions",
        "skip",
        &sub,
        "--partition",
        "0",
        "--offset",
        "4",
    ]);
    assert!(wrong.is_err(), "only the failed record can be skipped");
    host.cli(&[
        "subscriptions",
        "skip",
        &sub,
        "--partition",
        "0",
        "--offset",
        "5",
    ])
    .unwrap();
    until(
        "the records after the skipped one",
        Duration::from_secs(120),
        || async { numbers(&host, "a").await.len() == 10 },
    )
    .await;
    assert_eq!(
        numbers(&host, "a").await,
        vec![0, 1, 2, 3, 4, 6, 7, 8, 9, 10]
    );
    let v = host.admin_get(&format!("/subscriptions/{sub}")).await;
    assert_eq!(
        (v["paused"].clone(), v["stopped"].clone()),
        (json!(false), Value::Null)
    );
    let skipped = host
        .admin_get("/invocations?service=Events&status=failed")
        .await;
    let skipped = &skipped["invocations"][0];
    assert!(
        skipped["failure"]["message"] == format!("skipped by an operator ({topic}/0@5)"),
        "the skip is recorded: {skipped}"
    );
}

#[tokio::test]
async fn keys_come_from_a_header_or_the_json_value_and_keyless_records_are_spread_or_dead_lettered()
{
    let broker = require_broker();
    let (by_header, by_json, dlq) = (
        unique_topic("key-header"),
        unique_topic("key-json"),
        unique_topic("key-dlq"),
    );
    create_topic(&by_header, 1).await;
    create_topic(&by_json, 2).await;
    create_topic(&dlq, 2).await;
    let with = |customer: Option<&str>, n: u64| Record {
        key: Some(format!("r{n}").into_bytes()),
        value: json!({ "n": n }).to_string().into_bytes(),
        headers: customer
            .map(|c| vec![("Customer-Id".to_string(), c.to_string())])
            .unwrap_or_default(),
    };
    produce(
        &by_header,
        vec![with(Some("c1"), 1), with(Some("c1"), 2), with(None, 3)],
    )
    .await;
    let nested = |customer: Value, n: u64| Record {
        key: None,
        value: json!({ "n": n, "customer": { "id": customer } })
            .to_string()
            .into_bytes(),
        headers: vec![],
    };
    produce(
        &by_json,
        vec![
            nested(json!("c2"), 4),
            nested(json!(7), 5),
            nested(Value::Null, 6),
        ],
    )
    .await;
    let host = Host::start_with(options("")).await;
    subscribe_with(
        &host,
        &broker,
        json!({
            "source": format!("kafka://local/{by_header}"),
            "sink": "service://Events/handle",
            "key": "header:customer-id",
            "null_key": "spread",
        }),
    )
    .await;
    let r = host
        .admin_post(
            "/subscriptions",
            Some(&json!({
                "source": format!("kafka://local/{by_json}"),
                "sink": "service://Events/handle",
                "key": "json:/customer/id",
                "null_key": "dead-letter",
            })),
        )
        .await;
    assert_eq!(r.status, 400, "dead-lettering needs a topic: {}", r.body);
    assert!(r.body.contains("needs dead_letter"), "{}", r.body);
    let r = host
        .admin_post(
            "/subscriptions",
            Some(&json!({
                "source": format!("kafka://local/{by_json}"),
                "sink": "service://Events/handle",
                "key": "json:/customer/id",
                "null_key": "dead-letter",
                "dead_letter": format!("kafka://local/{dlq}"),
                "on_failure": "pause",
            })),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    // The header topic's keyless record (offset 2) gets a key of its own.
    let spread = format!("{by_header}:0:2");
    until("every mapped record", Duration::from_secs(120), || async {
        numbers(&host, "c1").await == vec![1, 2]
            && numbers(&host, "c2").await == vec![4]
            && numbers(&host, "7").await == vec![5]
            && numbers(&host, &spread).await == vec![3]
    })
    .await;
    assert!(
        numbers(&host, "").await.is_empty(),
        "nothing on the empty key"
    );
    until(
        "the keyless JSON record's dead letter",
        Duration::from_secs(60),
        || async { !read_partitions(&broker, &dlq).await.is_empty() },
    )
    .await;
    let letters = read_partitions(&broker, &dlq).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let (_, value, headers) = &letters[0];
    assert_eq!(serde_json::from_slice::<Value>(value).unwrap()["n"], 6);
    assert!(
        header(headers, "cairn-error").contains("no key"),
        "{headers:?}"
    );
    assert_eq!(header(headers, "cairn-source-topic"), by_json);
}

#[tokio::test]
async fn one_subscription_reads_several_topics_and_a_pattern_from_where_it_was_told() {
    let broker = require_broker();
    let prefix = unique_topic("many");
    let (a, b, c) = (
        format!("{prefix}-a"),
        format!("{prefix}-b"),
        format!("{prefix}-c"),
    );
    for t in [&a, &b, &c] {
        create_topic(t, 1).await;
    }
    produce(&a, vec![event("m", 1)]).await;
    produce(&b, vec![event("m", 2)]).await;
    produce(&c, vec![event("p", 1)]).await;
    let host = Host::start_with(options("")).await;
    let listed = subscribe_with(
        &host,
        &broker,
        json!({ "source": format!("kafka://local/{a},{b}"), "sink": "service://Events/handle" }),
    )
    .await;
    let r = host
        .admin_post(
            "/subscriptions",
            Some(&json!({
                "source": format!("kafka://local/^{prefix}-[c-z]$"),
                "sink": "service://Events/handle",
                "start_at": "latest",
            })),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let pattern = r.json()["id"].as_str().unwrap().to_string();
    until("both listed topics", Duration::from_secs(120), || async {
        let mut n = numbers(&host, "m").await;
        n.sort();
        n == vec![1, 2]
    })
    .await;
    let v = host.admin_get(&format!("/subscriptions/{listed}")).await;
    assert_eq!(v["ingested"], 2);
    // `latest`: the record produced before the subscription is not read,
    // the next one is (once the pattern's consumer has its partition).
    until(
        "the pattern's assignment",
        Duration::from_secs(60),
        || async {
            let v = host.admin_get(&format!("/subscriptions/{pattern}")).await;
            v["lag"].as_object().is_some_and(|lag| !lag.is_empty())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    produce(&c, vec![event("p", 2)]).await;
    until(
        "the pattern's new record",
        Duration::from_secs(120),
        || async { numbers(&host, "p").await == vec![2] },
    )
    .await;
    // A timestamp start: only what was produced from then on.
    let d = format!("{prefix}-d");
    create_topic(&d, 1).await;
    produce(&d, vec![event("t", 1)]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let from = chrono_now();
    produce(&d, vec![event("t", 2), event("t", 3)]).await;
    let r = host
        .admin_post(
            "/subscriptions",
            Some(&json!({
                "source": format!("kafka://local/{d}"),
                "sink": "service://Events/handle",
                "start_at": format!("timestamp:{from}"),
            })),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    until(
        "the records from the timestamp on",
        Duration::from_secs(120),
        || async { numbers(&host, "t").await == vec![2, 3] },
    )
    .await;
}

/// Now as RFC 3339 (UTC), without a date crate.
fn chrono_now() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let days = ms.div_euclid(86_400_000);
    let in_day = ms.rem_euclid(86_400_000);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        in_day / 3_600_000,
        in_day / 60_000 % 60,
        in_day / 1000 % 60,
        in_day % 1000
    )
}

#[tokio::test]
async fn subscriptions_in_the_config_file_are_created_changed_and_removed_at_start() {
    let broker = require_broker();
    let (topic, dlq) = (unique_topic("coded"), unique_topic("coded-dlq"));
    create_topic(&topic, 1).await;
    create_topic(&dlq, 1).await;
    produce(&topic, vec![event("x", 1)]).await;
    let config = |sink: &str, with_sub: bool| {
        let cluster = format!(
            "[[kafka.clusters]]\nname = \"main\"\nproperties = {{ \"bootstrap.servers\" = \"{broker}\" }}\n"
        );
        let sub = format!(
            "[[kafka.subscriptions]]\nname = \"events\"\nsource = \"kafka://main/{topic}\"\n\
             sink = \"service://{sink}\"\ndead_letter = \"kafka://main/{dlq}\"\n"
        );
        options(&(cluster + if with_sub { &sub } else { "" }))
    };
    let mut host = Host::start_with(config("Events/handle", true)).await;
    until(
        "the configured subscription's record",
        Duration::from_secs(120),
        || async { numbers(&host, "x").await == vec![1] },
    )
    .await;
    let subs = host.admin_get("/subscriptions").await["subscriptions"].clone();
    assert_eq!(subs.as_array().unwrap().len(), 1, "{subs}");
    let id = subs[0]["id"].as_str().unwrap().to_string();
    assert_eq!(subs[0]["delivery"]["name"], "events");
    assert_eq!(subs[0]["delivery"]["on_failure"], "dead-letter");
    assert_eq!(
        host.admin_get("/kafka-clusters").await["clusters"][0]["name"],
        "main"
    );
    // The same file again changes nothing; a changed sink keeps the id
    // (and so the consumer group's offsets: nothing is read twice).
    host.restart().await;
    host.restart_with(config("Counter/add", true)).await;
    let subs = host.admin_get("/subscriptions").await["subscriptions"].clone();
    assert_eq!(subs.as_array().unwrap().len(), 1);
    assert_eq!(
        (subs[0]["id"].as_str(), subs[0]["sink"].as_str()),
        (Some(id.as_str()), Some("service://Counter/add"))
    );
    produce(&topic, vec![Record::json("x", &json!(5))]).await;
    until("the changed sink", Duration::from_secs(120), || async {
        host.post("/Counter/x/get", "", &[]).await.body == "5"
    })
    .await;
    assert_eq!(
        numbers(&host, "x").await,
        vec![1],
        "the first record was not read again"
    );
    // Gone from the file: removed.
    host.restart_with(config("Counter/add", false)).await;
    assert_eq!(
        host.admin_get("/subscriptions").await["subscriptions"],
        json!([])
    );
    // A broken entry stops the start with the reason.
    let bad = options(&format!(
        "[[kafka.clusters]]\nname = \"main\"\nproperties = {{ \"bootstrap.servers\" = \"{broker}\" }}\n\
         [[kafka.subscriptions]]\nname = \"bad\"\nsource = \"kafka://main/{topic}\"\nsink = \"service://Nope/handle\"\n"
    ));
    let config_path = host.data_dir().join("bad.toml");
    let addrs = format!(
        "ingress_addr = \"127.0.0.1:{}\"\nadmin_addr = \"127.0.0.1:{}\"\n",
        cairn_tests::free_port(),
        cairn_tests::free_port()
    );
    let file = format!(
        "data_dir = {:?}\n{addrs}{}",
        host.data_dir().join("db2"),
        bad.config
    );
    std::fs::write(&config_path, file).unwrap();
    let out = std::process::Command::new(cairn_tests::cairn_bin())
        .args(["serve", "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("service Nope not found"), "{stderr}");
}

#[tokio::test]
async fn raw_values_reach_the_handler_as_bytes_and_raw_records_go_out_with_headers() {
    let broker = require_broker();
    let (lines, out) = (unique_topic("lines"), unique_topic("lines-out"));
    create_topic(&lines, 1).await;
    create_topic(&out, 2).await;
    let text = |v: &str| Record {
        key: Some(b"acct".to_vec()),
        value: v.as_bytes().to_vec(),
        headers: vec![],
    };
    produce(&lines, vec![text("amount=5"), text("amount=7")]).await;
    let host = Host::start_with(options(&format!("[guest_env]\nLINES_OUT = \"{out}\"\n"))).await;
    subscribe_with(
        &host,
        &broker,
        json!({ "source": format!("kafka://local/{lines}"), "sink": "service://Lines/ingest" }),
    )
    .await;
    until("both lines sent on", Duration::from_secs(120), || async {
        cairn_tests::kafka::read_partition(&broker, &out, 0)
            .await
            .len()
            == 2
    })
    .await;
    let sent = cairn_tests::kafka::read_partition(&broker, &out, 0).await;
    let values: Vec<&[u8]> = sent.iter().map(|(_, v, _)| v.as_slice()).collect();
    assert_eq!(
        values,
        vec![&b"acct:5"[..], &b"acct:12"[..]],
        "raw bytes, not JSON"
    );
    assert_eq!(sent[1].0.as_deref(), Some(&b"acct"[..]));
    assert_eq!(header(&sent[1].2, "x-source-offset"), "1");
    assert!(header(&sent[1].2, "cairn-produce-id").starts_with("inv_"));
    assert!(
        cairn_tests::kafka::read_partition(&broker, &out, 1)
            .await
            .is_empty(),
        "the partition it named"
    );
}

/// The broker's SASL_PLAINTEXT / PLAIN listener (`scripts/kafka.sh`: the
/// plain port + 100).
fn sasl_bootstrap(broker: &str) -> String {
    let (host, port) = broker.rsplit_once(':').expect("host:port");
    format!("{host}:{}", port.parse::<u16>().expect("a port") + 100)
}

#[tokio::test]
async fn a_sasl_plaintext_cluster_from_the_config_file_is_consumed_and_produced_to() {
    let broker = require_broker();
    let sasl = sasl_bootstrap(&broker);
    assert!(
        std::net::TcpStream::connect(&sasl).is_ok(),
        "no SASL listener at {sasl}: restart the broker with `scripts/kafka.sh reset && scripts/kafka.sh start`"
    );
    let (topic, dlq) = (unique_topic("sasl"), unique_topic("sasl-dlq"));
    create_topic(&topic, 1).await;
    create_topic(&dlq, 1).await;
    produce(
        &topic,
        vec![
            event("s", 1),
            Record::json("s", &json!({ "n": 2, "poison": true })),
            event("s", 3),
        ],
    )
    .await;
    let config = |password: &str| {
        options(&format!(
            "[[kafka.clusters]]\nname = \"secure\"\n\
             properties = {{ \"bootstrap.servers\" = \"{sasl}\", \"security.protocol\" = \"SASL_PLAINTEXT\", \
             \"sasl.mechanism\" = \"PLAIN\", \"sasl.username\" = \"cairn\", \"sasl.password\" = \"{password}\" }}\n\
             [[kafka.subscriptions]]\nname = \"secure-events\"\nsource = \"kafka://secure/{topic}\"\n\
             sink = \"service://Events/handle\"\ndead_letter = \"kafka://secure/{dlq}\"\n"
        ))
    };
    // A wrong password: nothing is read, and the log says why.
    let mut host = Host::start_with(config("wrong")).await;
    until(
        "the authentication failure",
        Duration::from_secs(60),
        || async { host.log().contains("Authentication failed") },
    )
    .await;
    assert!(numbers(&host, "s").await.is_empty());
    let clusters = host.admin_get("/kafka-clusters").await;
    assert_eq!(
        clusters["clusters"][0]["properties"]["sasl.password"], "<redacted>",
        "{clusters}"
    );
    // The right one: consumed, and the poison record dead-lettered, both
    // through the SASL listener.
    host.restart_with(config("cairn-secret")).await;
    until(
        "the records through SASL",
        Duration::from_secs(120),
        || async { numbers(&host, "s").await == vec![1, 3] },
    )
    .await;
    until(
        "the dead letter through SASL",
        Duration::from_secs(60),
        || async { read_all(&broker, &dlq).await.len() == 1 },
    )
    .await;
}
