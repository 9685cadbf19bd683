//! Hostile guests and hostile clients cannot hurt the host, its data or
//! other handlers (README, "Security model"). Each test is an attack that
//! worked before its guard existed.

use cairn_tests::{example, Host, HostOptions};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// A host with the basics and the hostile examples, and `config`.
async fn host(config: &str) -> Host {
    Host::start_with(HostOptions {
        config: config.into(),
        deploy: vec![example("basics"), example("hostile")],
    })
    .await
}

async fn paused(host: &Host, id: &str) -> Value {
    host.wait_invocation(id, Duration::from_secs(60), |v| v["status"] == "paused")
        .await
}

// ----- guests -----

#[tokio::test]
async fn http_call_does_not_follow_a_redirect_off_the_allow_list() {
    let outside = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let port = outside.local_addr().unwrap().port();
    // Where the evil redirect points: the host's admin API, once it runs.
    let target = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let evil_target = target.clone();
    let app = axum::Router::new()
        .route(
            "/evil",
            axum::routing::post(move || async move {
                let to = evil_target.lock().unwrap().clone();
                axum::response::Redirect::temporary(&to)
            }),
        )
        .route(
            "/hop",
            axum::routing::post(|| async { axum::response::Redirect::temporary("/ok") }),
        )
        .route("/ok", axum::routing::post(|| async { "fine" }));
    tokio::spawn(async move { axum::serve(outside, app).await });
    let host = host(&format!("http_allow = [\"127.0.0.2:{port}\"]\n")).await;
    *target.lock().unwrap() = format!("{}/concurrency-limits", host.admin());
    let url = |path: &str| json!(format!("http://127.0.0.2:{port}{path}")).to_string();
    let evil = host.post("/Hostile/post", &url("/evil"), &[]).await;
    assert_eq!(evil.body, "307", "the guest sees the redirect: {evil:?}");
    let limits = host
        .http
        .get(format!("{}/concurrency-limits", host.admin()));
    let limits: Value = limits.send().await.unwrap().json().await.unwrap();
    assert_eq!(limits["limits"], json!([]), "the admin API was not reached");
    let hop = host.post("/Hostile/post", &url("/hop"), &[]).await;
    assert_eq!(
        hop.body, "200",
        "a redirect inside the allow-list is followed"
    );
}

#[tokio::test]
async fn a_guest_blocked_in_a_wasi_sleep_runs_out_of_wall_clock_time_and_pauses() {
    let host = host(
        "[limits]\nwall_per_attempt = \"1s\"\ninterrupted_attempts = 2\nmax_instances = 2\n\
         [retry]\ninitial_interval = \"50ms\"\n",
    )
    .await;
    let naps: Vec<String> = futures_ids(&host, "/Hostile/nap/send", "86400", 2).await;
    // Both slots are taken by sleepers, yet another service is answered.
    assert_eq!(host.post("/Steps/steps3", "", &[]).await.body, "3");
    for id in naps {
        let v = paused(&host, &id).await;
        assert_eq!(v["attempts"], 2, "{v:#}");
        let error = v["last_error"].as_str().unwrap();
        assert!(error.contains("limits.wall_per_attempt"), "{error}");
    }
}

async fn futures_ids(host: &Host, path: &str, body: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(host.post(path, body, &[]).await.invocation_id());
    }
    ids
}

#[tokio::test]
async fn endless_loops_pause_after_a_few_interrupted_attempts() {
    let host = host(
        "[limits]\ncpu_per_attempt = \"200ms\"\ninterrupted_attempts = 2\n\
         [retry]\ninitial_interval = \"50ms\"\nmax_attempts = 30\n",
    )
    .await;
    let loops = futures_ids(&host, "/Hostile/spin/send", "", 4).await;
    for _ in 0..10 {
        assert_eq!(host.post("/Steps/steps3", "", &[]).await.body, "3");
    }
    for id in loops {
        let v = paused(&host, &id).await;
        assert_eq!(v["attempts"], 2, "not 30 attempts: {v:#}");
    }
}

#[tokio::test]
async fn a_guest_waiting_after_computing_leaves_its_service_cpu_turn_to_others() {
    let host = host("suspend_after = \"10m\"\n").await;
    // Long enough to run past several epoch ticks (needing the service's
    // one turn on this machine), then waiting for good.
    let waiter = host.post("/Hostile/crunch_then_wait/send", "300000000", &[]);
    assert_eq!(waiter.await.status, 202);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let started = Instant::now();
    let r = host.post("/Hostile/crunch", "300000000", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the second guest waited {:?} for the turn the waiting one kept",
        started.elapsed()
    );
}

#[tokio::test]
async fn time_spent_waiting_on_the_host_is_not_counted_as_guest_cpu() {
    let host = host("[limits]\ncpu_per_attempt = \"100ms\"\ninterrupted_attempts = 1\n").await;
    // 40 durable naps of 30 ms: 1.2 s of waiting, almost no computing.
    let r = host.post("/Hostile/patient", "40", &[]).await;
    assert_eq!((r.status, r.body.as_str()), (200, "40"), "{r:?}");
}

#[tokio::test]
async fn instances_share_one_memory_budget_and_give_memory_back() {
    let host = host(
        "[limits]\nmemory_bytes = 50331648\nmemory_total = 67108864\n\
         [retry]\ninitial_interval = \"50ms\"\n",
    )
    .await;
    let before = host.peak_rss_kib();
    // Eight guests each holding 40 MiB for 300 ms: the 64 MiB budget lets
    // one run at a time; the others wait for it instead of swelling the host.
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let request = host
            .http
            .post(format!("{}/Hostile/grow", host.ingress()))
            .body("[40, 300]");
        calls.spawn(async move { request.send().await.unwrap().text().await.unwrap() });
    }
    while let Some(answer) = calls.join_next().await {
        assert_eq!(answer.unwrap(), "40");
    }
    let grown = host.peak_rss_kib().saturating_sub(before) / 1024;
    assert!(
        grown < 120,
        "the host grew by {grown} MiB for 8 x 40 MiB guests"
    );
    let rss = cairn_tests::proc_status_kib(host.pid(), "VmRSS:") / 1024;
    assert!(
        rss < before / 1024 + 60,
        "{rss} MiB still resident after the burst"
    );
}

#[tokio::test]
async fn a_deterministic_trap_pauses_at_once_and_the_attached_caller_hears_of_it() {
    let host = host("[limits]\nmemory_bytes = 33554432\n").await;
    for (path, body) in [
        ("/Hostile/panic", ""),
        ("/Hostile/overflow", "100000000"),
        ("/Hostile/grow", "[64, 0]"),
    ] {
        let started = Instant::now();
        let r = host.post(path, body, &[]).await;
        assert_eq!(r.status, 500, "{path}: {r:?}");
        assert!(r.body.contains("is paused"), "{path}: {}", r.body);
        assert!(started.elapsed() < Duration::from_secs(10), "{path}");
        let id = r.header("x-restate-id").unwrap().to_string();
        let v = paused(&host, &id).await;
        assert_eq!(v["attempts"], 1, "{path} is not retried: {v:#}");
        let again = host.get(&format!("/restate/invocation/{id}/attach")).await;
        assert_eq!(again.status, 500, "attaching later answers too");
    }
    assert_eq!(host.post("/Steps/steps3", "", &[]).await.body, "3");
}

#[tokio::test]
async fn values_over_the_size_limit_end_with_a_clear_terminal_error() {
    let host = host("[limits]\nmax_value_bytes = 1048576\n").await;
    for (path, body) in [("/Vault/k/put", "2"), ("/Hostile/big_output", "2")] {
        let r = host.post(path, body, &[]).await;
        assert_eq!(r.status, 413, "{path}: {r:?}");
        assert!(r.body.contains("limits.max_value_bytes"), "{}", r.body);
    }
    assert_eq!(host.post("/Vault/k/put", "0", &[]).await.status, 200);
}

#[tokio::test]
async fn a_handler_writing_large_values_in_a_loop_does_not_swell_the_host() {
    let host = host("").await;
    let before = host.peak_rss_kib();
    let r = host.post("/Vault/big/fill", "[3, 100]", &[]).await;
    assert_eq!(r.body, "100", "{r:?}");
    let grown = host.peak_rss_kib().saturating_sub(before) / 1024;
    assert!(
        grown < 100,
        "300 MiB of writes grew the host by {grown} MiB"
    );
}

#[tokio::test]
async fn guest_output_is_tagged_and_escaped_in_the_host_log() {
    let host = host("").await;
    let r = host.post("/Hostile/shout", "3", &[]).await;
    assert_eq!(r.status, 200);
    let id = r.header("x-restate-id").unwrap().to_string();
    let log = host.log();
    assert!(!log.contains('\x1b'), "no raw escape reaches the log");
    let forged: Vec<&str> = log.lines().filter(|l| l.contains("forged line")).collect();
    assert_eq!(forged.len(), 3, "{log}");
    for line in forged {
        assert!(line.contains(" guest:"), "tagged as guest output: {line}");
        assert!(line.contains(&format!("invocation=\"{id}\"")) || line.contains(&id));
        assert!(line.contains("\\u{1b}[31mERROR"), "escaped: {line}");
        assert!(!line.trim_start().starts_with("ERROR"), "{line}");
    }
}

#[tokio::test]
async fn random_numbers_inside_a_run_step_are_not_the_predictable_seeded_ones() {
    use rand::{Rng, SeedableRng};
    let host = host("").await;
    let r = host.post("/Hostile/draws", "", &[]).await;
    let id: cairn::ids::InvocationId = r.header("x-restate-id").unwrap().parse().unwrap();
    let draws = r.json();
    // What anyone who sees the invocation id can compute.
    let mut predicted = rand::rngs::StdRng::seed_from_u64(id.seed());
    let first = predicted.next_u64();
    assert_eq!(
        draws["outside"], first,
        "outside steps the numbers are seeded (documented)"
    );
    assert_ne!(draws["inside"], first, "{draws}");
    assert_ne!(draws["inside"], predicted.next_u64(), "{draws}");
}

// ----- clients -----

#[tokio::test]
async fn object_keys_that_are_not_utf8_are_refused_not_merged() {
    let host = host("").await;
    assert_eq!(
        host.post("/Counter/%EF%BF%BD/add", "1", &[]).await.body,
        "1"
    );
    for key in ["%FF", "%FE", "%C3"] {
        let r = host.post(&format!("/Counter/{key}/add"), "1", &[]).await;
        assert_eq!(r.status, 400, "{key}: {r:?}");
    }
    assert_eq!(host.post("/Counter/%EF%BF%BD/get", "", &[]).await.body, "1");
}

#[tokio::test]
async fn a_non_ascii_idempotency_key_is_refused_not_ignored() {
    let host = host("").await;
    for _ in 0..2 {
        let r = host
            .http
            .post(format!("{}/Counter/idem/add", host.ingress()))
            .header(
                "idempotency-key",
                reqwest::header::HeaderValue::from_bytes(b"cl\xc3\xa9").unwrap(),
            )
            .body("1")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
    }
    assert_eq!(host.post("/Counter/idem/get", "", &[]).await.body, "0");
}

#[tokio::test]
async fn sigterm_answers_attached_clients_and_stops_in_bounded_time() {
    let mut host = host("[connections]\nshutdown_timeout = \"2s\"\n").await;
    let attached = {
        let (http, url) = (
            host.http.clone(),
            format!("{}/Hostile/forever", host.ingress()),
        );
        tokio::spawn(async move { http.post(url).send().await.map(|r| r.status().as_u16()) })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let term = std::process::Command::new("kill")
        .args(["-TERM", &host.pid().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let status = tokio::time::timeout(Duration::from_secs(10), attached)
        .await
        .expect("the attached client is answered")
        .unwrap()
        .unwrap();
    assert_eq!(status, 503);
    cairn_tests::until("the host to exit", Duration::from_secs(15), || {
        let running = host.running();
        async move { !running }
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

/// An admin API reachable beyond loopback must have a token: the host
/// refuses to start, and says how to fix it.
#[test]
fn a_host_refuses_an_open_admin_api_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut host = std::process::Command::new(cairn_tests::cairn_bin())
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--ingress", "127.0.0.1:0", "--admin", "0.0.0.0:0"])
        .env_remove("CAIRN_ADMIN_TOKEN")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = host.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = host.kill();
            panic!("the host started with an open admin API and no token");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut said = String::new();
    host.stderr
        .take()
        .unwrap()
        .read_to_string(&mut said)
        .unwrap();
    assert!(!status.success());
    assert!(
        said.contains("without admin_token") && said.contains("CAIRN_ADMIN_TOKEN"),
        "{said}"
    );
}

#[tokio::test]
async fn the_admin_api_requires_its_token_and_redacts_secrets() {
    let host = host("admin_token = \"s3cret-token\"\n").await;
    let url = |path: &str| format!("{}{path}", host.admin());
    let anonymous = host.http.get(url("/services")).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    // Refused before its body is read (no upload is buffered for strangers):
    // a 401, or the host closing the connection while the body still flows.
    let upload = host.http.post(url("/deployments")).body(vec![0u8; 8 << 20]);
    match upload.send().await {
        Ok(refused) => assert_eq!(refused.status(), 401),
        Err(cut) => assert!(cut.is_request(), "{cut}"),
    }
    let wrong = host.http.get(url("/services")).bearer_auth("s3cret-tokeX");
    assert_eq!(wrong.send().await.unwrap().status(), 401);
    let ok = host.http.get(url("/services")).bearer_auth("s3cret-token");
    assert_eq!(ok.send().await.unwrap().status(), 200);
    console_signs_in_with_the_token(&host).await;
    let cluster = json!({"name": "secure", "properties": {
        "bootstrap.servers": "127.0.0.1:1", "sasl.password": "hunter2",
        "ssl.key.password": "hunter3", "sasl.oauthbearer.config": "hunter4",
        "security.protocol": "SASL_PLAINTEXT"}});
    let put = host
        .http
        .post(url("/kafka-clusters"))
        .bearer_auth("s3cret-token");
    let put = put
        .json(&cluster)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let list = host
        .http
        .get(url("/kafka-clusters"))
        .bearer_auth("s3cret-token");
    let list = list.send().await.unwrap().text().await.unwrap();
    for shown in [&put, &list] {
        assert!(!shown.contains("hunter"), "{shown}");
        assert!(
            shown.contains("<redacted>") && shown.contains("SASL_PLAINTEXT"),
            "{shown}"
        );
    }
    assert!(
        host.cli(&["services"]).is_err(),
        "the CLI without the token"
    );
    let mut cli = std::process::Command::new(cairn_tests::cairn_bin());
    cli.args(["services"])
        .env("CAIRN_ADMIN_URL", host.admin())
        .env("CAIRN_ADMIN_TOKEN", "s3cret-token");
    assert!(cairn_tests::run(&mut cli).unwrap().contains("Hostile"));
}

/// The console's page asks for the token and shows no data; its sign-in
/// sets a cookie that opens the admin API like the bearer token, and only
/// with the right token.
async fn console_signs_in_with_the_token(host: &Host) {
    let url = |path: &str| format!("{}{path}", host.admin());
    let page = host.http.get(url("/ui")).send().await.unwrap();
    assert_eq!(page.status(), 401);
    let form = page.text().await.unwrap();
    assert!(form.contains("action=\"/ui/login\""), "{form}");
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    for (token, expected) in [("s3cret-tokeX", 401), ("s3cret-token", 200)] {
        let signed = browser
            .post(url("/ui/login"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("token={token}"))
            .send()
            .await
            .unwrap();
        assert_eq!(signed.status(), 303);
        let cookie = signed.headers()["set-cookie"].to_str().unwrap().to_string();
        assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
        let cookie = cookie.split(';').next().unwrap().to_string();
        for path in ["/services", "/ui"] {
            let r = browser.get(url(path)).header("cookie", &cookie);
            assert_eq!(r.send().await.unwrap().status(), expected, "{path} {token}");
        }
    }
}

/// Whether the host closed `stream` (read gives EOF or an error) within `within`.
fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 512];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // a 408 answer, then the close
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

#[tokio::test]
async fn idle_and_slow_clients_are_cut_off_and_the_admin_port_keeps_answering() {
    let mut host =
        host("[connections]\ningress_max = 300\nheader_timeout = \"1s\"\nbody_timeout = \"1s\"\n")
            .await;
    // Idle connections are closed after 1 s here: no pooled ones.
    host.http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let addr = host.ingress().trim_start_matches("http://").to_string();
    // A flood of idle connections, more than the cap.
    let mut idle: Vec<TcpStream> = (0..600)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    let health = host
        .http
        .get(format!("{}/health", host.admin()))
        .send()
        .await;
    assert_eq!(health.unwrap().status(), 200, "the admin port answers");
    // A client sending its headers one byte at a time.
    let mut slow = TcpStream::connect(&addr).unwrap();
    let started = Instant::now();
    let mut cut = false;
    for byte in b"POST /Steps/steps3 HTTP/1.1\r\nhost: x\r\n"
        .iter()
        .cycle()
        .take(40)
    {
        if slow.write_all(&[*byte]).is_err() {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(cut || closed_within(&mut slow, Duration::from_secs(3)));
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    // A client that sends its headers but not its body.
    let mut no_body = TcpStream::connect(&addr).unwrap();
    no_body
        .write_all(b"POST /Steps/steps3 HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\n{")
        .unwrap();
    assert!(closed_within(&mut no_body, Duration::from_secs(5)));
    // Every idle connection was closed by the host, and new clients are served.
    for conn in idle.iter_mut().take(50) {
        assert!(closed_within(conn, Duration::from_secs(5)));
    }
    drop(idle);
    assert_eq!(host.post("/Steps/steps3", "", &[]).await.body, "3");
}
