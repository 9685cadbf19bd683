//! The web console (`/ui`) in a real headless Chromium, driven over
//! WebDriver: sign in with the admin token, filter the invocation list,
//! open an invocation's journal, resume a paused invocation, edit state,
//! pause and resume a Kafka subscription.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`scripts/test.sh`
//! installs them). Screenshots of the pages land in the test's temp dir;
//! with `CAIRN_SCREENSHOTS=docs` they replace the ones in `docs/`.

use cairn_tests::{example, free_port, kafka, until, Host, HostOptions};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const TOKEN: &str = "console-test-token";
const WAIT: Duration = Duration::from_secs(30);

/// A chromedriver on a loopback port, stopped when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start() -> Driver {
        let binary = ["chromedriver", "/usr/bin/chromedriver"]
            .into_iter()
            .find(|b| Command::new(b).arg("--version").output().is_ok())
            .unwrap_or_else(|| {
                panic!(
                    "the console test needs chromedriver and chromium: \
                     `apt-get install -y chromium chromium-driver` (scripts/test.sh does it)"
                )
            });
        let port = free_port();
        let child = Command::new(binary)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        Driver { child, port }
    }

    /// A headless Chromium session, retried while chromedriver starts.
    async fn browser(&self) -> Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({ "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                             "--disable-dev-shm-usage", "--window-size=1400,900"] }),
        );
        let url = format!("http://127.0.0.1:{}", self.port);
        let mut last = String::new();
        for _ in 0..100 {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(client) => return client,
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no WebDriver session from chromedriver at {url}: {last}");
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_host() -> Host {
    let mut host = Host::start_with(HostOptions {
        config: format!("admin_token = \"{TOKEN}\"\n"),
        deploy: vec![example("basics"), example("coordination")],
    })
    .await;
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {TOKEN}").parse().unwrap(),
    );
    host.http = reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap();
    host
}

/// Save a screenshot of the page as `name`.png (see the module doc).
async fn screenshot(browser: &Client, name: &str) {
    let png = browser.screenshot().await.expect("a screenshot");
    assert!(png.starts_with(b"\x89PNG"), "{name}: not a PNG");
    let dir = match std::env::var("CAIRN_SCREENSHOTS").as_deref() {
        Ok("docs") => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/console")),
        _ => PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console"),
    };
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

/// Type `token` into the sign-in form and send it.
async fn sign_in(browser: &Client, token: &str) {
    let field = browser
        .wait()
        .at_most(WAIT)
        .for_element(Locator::Id("token"))
        .await
        .expect("the sign-in form");
    field.send_keys(token).await.unwrap();
    click(browser, "form button[type='submit']").await;
}

/// Click the element `css` finds.
async fn click(browser: &Client, css: &str) {
    browser
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css} on the page: {e}"))
        .click()
        .await
        .unwrap();
}

/// The texts of the elements `css` finds.
async fn texts(browser: &Client, css: &str) -> Vec<String> {
    let mut out = Vec::new();
    for el in browser.find_all(Locator::Css(css)).await.unwrap() {
        out.push(el.text().await.unwrap_or_default());
    }
    out
}

/// Wait until the elements `css` finds have texts that satisfy `ok`.
async fn until_texts(browser: &Client, what: &str, css: &str, ok: impl Fn(&[String]) -> bool) {
    until(what, WAIT, || async { ok(&texts(browser, css).await) }).await;
}

fn invocation_id(r: &cairn_tests::Response) -> String {
    r.header("x-restate-id")
        .unwrap_or_else(|| panic!("no invocation id: {}", r.body))
        .to_string()
}

#[tokio::test]
async fn the_console_signs_in_filters_opens_a_journal_and_resumes_a_paused_invocation() {
    let host = start_host().await;
    for key in ["alice", "bob"] {
        let r = host.post(&format!("/Counter/{key}/add"), "5", &[]).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let steps = host.post("/Steps/steps3", "", &[]).await;
    assert_eq!(steps.status, 200, "{}", steps.body);
    let steps = invocation_id(&steps);
    // A nap paused while it waits: the console resumes it.
    let nap = host.post("/Sleeper/nap/send", "1500", &[]).await.json()["invocationId"]
        .as_str()
        .unwrap()
        .to_string();
    let paused = host
        .admin_post(&format!("/invocations/{nap}/pause"), None)
        .await;
    assert_eq!(paused.status, 200, "{}", paused.body);
    host.wait_invocation(&nap, WAIT, |v| v["status"] == "paused")
        .await;

    let driver = Driver::start();
    let browser = driver.browser().await;
    let ui = format!("{}/ui", host.admin());

    // Without the token the console shows the sign-in form, not data.
    browser.goto(&ui).await.unwrap();
    browser
        .wait()
        .at_most(WAIT)
        .for_element(Locator::Id("token"))
        .await
        .expect("the sign-in form");
    screenshot(&browser, "sign-in").await;
    sign_in(&browser, "wrong").await;
    browser
        .wait()
        .at_most(WAIT)
        .for_element(Locator::Id("token"))
        .await
        .expect("a wrong token lands on the form again");
    sign_in(&browser, TOKEN).await;

    // The invocation list, live: every invocation made above.
    until_texts(
        &browser,
        "the list of all invocations",
        "#invocations tr",
        |rows| rows.len() == 4,
    )
    .await;
    screenshot(&browser, "invocations").await;

    // Filter by service: only Counter's two adds remain.
    browser
        .find(Locator::Id("filter-service"))
        .await
        .unwrap()
        .select_by_value("Counter")
        .await
        .unwrap();
    click(&browser, "#apply-filters").await;
    until_texts(
        &browser,
        "the Counter invocations",
        "#invocations tr td:nth-child(2)",
        |targets| targets.len() == 2 && targets.iter().all(|t| t.starts_with("Counter/")),
    )
    .await;
    let url = browser.current_url().await.unwrap();
    assert!(
        url.fragment()
            .unwrap_or_default()
            .contains("service=Counter"),
        "the filter is in the address: {url}"
    );

    // An invocation's page: its journal as a timeline, in order.
    browser
        .goto(&format!("{ui}#/invocation/{steps}"))
        .await
        .unwrap();
    until_texts(
        &browser,
        "the journal of Steps/steps3",
        "#journal li",
        |entries| entries.len() >= 6 && entries[0].starts_with("#0"),
    )
    .await;
    let journal = texts(&browser, "#journal li code").await;
    let expected = host.admin_get(&format!("/invocations/{steps}")).await;
    let commands: Vec<&str> = expected["journal"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["command"].as_str().or(e["answers"].as_str()).unwrap())
        .collect();
    assert_eq!(journal, commands, "the timeline shows the journal");
    assert_eq!(
        texts(&browser, "#invocation [data-status]").await,
        ["succeeded"]
    );
    screenshot(&browser, "invocation").await;

    // The paused page lists the nap; Resume runs it to its end.
    browser.goto(&format!("{ui}#/paused")).await.unwrap();
    until_texts(&browser, "the paused nap", "#invocations tr", |rows| {
        rows.len() == 1 && rows[0].contains(&nap)
    })
    .await;
    screenshot(&browser, "paused").await;
    click(
        &browser,
        &format!("#invocations tr[data-id='{nap}'] button[data-action='resume']"),
    )
    .await;
    until_texts(
        &browser,
        "the nap to leave the paused list",
        "#invocations tr",
        |rows| rows.len() == 1 && rows[0].contains("No invocation matches"),
    )
    .await;
    browser
        .goto(&format!("{ui}#/invocation/{nap}"))
        .await
        .unwrap();
    until_texts(
        &browser,
        "the resumed nap to succeed",
        "#invocation [data-status]",
        |s| s == ["succeeded"],
    )
    .await;
    let outcome = texts(&browser, "#outcome").await;
    assert!(
        outcome[0].contains("1500"),
        "the nap's outcome: {outcome:?}"
    );

    browser.close().await.unwrap();
}

#[tokio::test]
async fn the_console_shows_services_edits_state_and_pauses_a_subscription() {
    let host = start_host().await;
    let bootstrap = kafka::require_broker();
    let topic = kafka::unique_topic("console");
    kafka::create_topic(&topic, 2).await;
    let sub = kafka::subscribe(&host, &bootstrap, &topic, "service://Counter/add").await;
    let records = ["dave", "erin", "dave"]
        .iter()
        .map(|k| kafka::Record::json(k, &json!(1)))
        .collect();
    kafka::produce(&topic, records).await;
    let r = host.post("/Counter/carol/add", "7", &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let driver = Driver::start();
    let browser = driver.browser().await;
    let ui = format!("{}/ui", host.admin());
    browser.goto(&ui).await.unwrap();
    sign_in(&browser, TOKEN).await;
    browser
        .wait()
        .at_most(WAIT)
        .for_element(Locator::Id("invocations-table"))
        .await
        .unwrap();

    // Services: every deployed service with its handlers.
    browser.goto(&format!("{ui}#/services")).await.unwrap();
    until_texts(
        &browser,
        "the services",
        "#services tbody tr td:first-child",
        |names| {
            ["Counter", "Steps", "Sleeper"]
                .iter()
                .all(|s| names.iter().any(|n| n == s))
        },
    )
    .await;
    screenshot(&browser, "services").await;

    // State: the count shows, an edit goes through the key's queue.
    browser
        .goto(&format!("{ui}#/objects/Counter/carol"))
        .await
        .unwrap();
    let value = browser
        .wait()
        .at_most(WAIT)
        .for_element(Locator::Css("#state textarea[data-name='count']"))
        .await
        .expect("the count entry");
    assert_eq!(value.prop("value").await.unwrap().as_deref(), Some("7"));
    value.clear().await.unwrap();
    value.send_keys("40").await.unwrap();
    click(&browser, "#state tr[data-name='count'] button.primary").await;
    until("the edit to be applied", WAIT, || async {
        let state: Value = host.admin_get("/objects/Counter/carol/state").await;
        state["state"]["count"] == 40
    })
    .await;
    screenshot(&browser, "state").await;
    let r = host.post("/Counter/carol/add", "2", &[]).await;
    assert_eq!(r.body, "42", "the handler sees the edited state");

    // Subscriptions: what was ingested, the lag, pause and resume.
    browser.goto(&format!("{ui}#/subscriptions")).await.unwrap();
    let row = format!("#subscriptions tr[data-id='{sub}']");
    until_texts(
        &browser,
        "the subscription's figures",
        &format!("{row} td"),
        |cells| {
            // Subscription, source, sink, state, ingested, rate, in flight, lag.
            cells.len() == 9 && cells[4] == "3" && cells[6] == "0" && cells[7] == "0"
        },
    )
    .await;
    screenshot(&browser, "subscriptions").await;
    for (action, paused) in [("pause", true), ("resume", false)] {
        click(&browser, &format!("{row} button[data-action='{action}']")).await;
        until(&format!("the subscription to {action}"), WAIT, || async {
            host.admin_get(&format!("/subscriptions/{sub}")).await["paused"] == paused
        })
        .await;
        let state = if paused { "paused" } else { "running" };
        until_texts(
            &browser,
            "the state shown",
            &format!("{row} [data-status]"),
            |s| s == [state],
        )
        .await;
    }

    browser.close().await.unwrap();
}
