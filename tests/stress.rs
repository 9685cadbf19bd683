//! A well-behaved handler keeps its latency while hostile guests and
//! flooding clients attack the host (README, "Security model"). Alone in its
//! test binary, so no other test shares the cores while it measures.

use cairn_tests::{example, Host, HostOptions};
use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// How long the well-behaved client measures.
const MEASURE: Duration = Duration::from_secs(15);

#[tokio::test]
async fn a_well_behaved_handler_keeps_its_p99_under_50_ms_during_an_attack() {
    let outside = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let port = outside.local_addr().unwrap().port();
    let mut host = Host::start_with(HostOptions {
        config: format!("http_allow = [\"127.0.0.2:{port}\"]\n"),
        deploy: vec![example("basics"), example("hostile")],
    })
    .await;
    host.http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();
    let admin = format!("{}/concurrency-limits", host.admin());
    let redirect = axum::Router::new().fallback(move || {
        let admin = admin.clone();
        async move { axum::response::Redirect::temporary(&admin) }
    });
    tokio::spawn(async move { axum::serve(outside, redirect).await });

    // Hostile guests: endless loops, memory growers, redirected HTTP calls
    // and guests blocked in WASI sleeps, all of one service.
    let attacks = [
        ("/Hostile/spin/send", "".to_string(), 200),
        ("/Hostile/grow/send", "[60, 2000]".to_string(), 50),
        (
            "/Hostile/post/send",
            format!("\"http://127.0.0.2:{port}/x\""),
            50,
        ),
        ("/Hostile/nap/send", "86400".to_string(), 200),
    ];
    for (path, body, n) in &attacks {
        for _ in 0..*n {
            assert_eq!(host.post(path, body, &[]).await.status, 202);
        }
    }
    // Flooding clients: idle connections and one-byte-a-second senders.
    let addr = host.ingress().trim_start_matches("http://").to_string();
    let idle: Vec<TcpStream> = (0..2000)
        .filter_map(|_| TcpStream::connect(&addr).ok())
        .collect();
    let slow = std::thread::spawn({
        let addr = addr.clone();
        move || slowloris(&addr, 20, MEASURE + Duration::from_secs(2))
    });
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The well-behaved client: Counter/add, one request at a time.
    let mut latencies = Vec::new();
    let started = Instant::now();
    let mut expected = 0;
    while started.elapsed() < MEASURE {
        let t = Instant::now();
        let r = host.post("/Counter/calm/add", "1", &[]).await;
        latencies.push(t.elapsed());
        expected += 1;
        assert_eq!(r.body, expected.to_string(), "{r:?}");
    }
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    let (p50, p99) = (at(0.50), at(0.99));
    println!(
        "under attack: {} calls of Counter/add, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; host RSS {} MiB",
        latencies.len(),
        p50.as_secs_f64() * 1000.0,
        p99.as_secs_f64() * 1000.0,
        latencies.last().unwrap().as_secs_f64() * 1000.0,
        cairn_tests::proc_status_kib(host.pid(), "VmRSS:") / 1024,
    );
    assert!(p99 < Duration::from_millis(50), "p99 {p99:?}");
    let limits = host.admin_get("/concurrency-limits").await;
    assert_eq!(
        limits["limits"],
        serde_json::json!([]),
        "no redirect reached the admin API"
    );
    drop(idle);
    slow.join().unwrap();
}

/// `n` clients sending a request's headers one byte a second, reconnecting
/// when the host cuts them off, for `length`.
fn slowloris(addr: &str, n: usize, length: Duration) {
    let started = Instant::now();
    let mut conns: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    while started.elapsed() < length {
        for conn in conns.iter_mut() {
            let alive = conn.as_mut().is_some_and(|c| c.write_all(b"x").is_ok());
            if !alive {
                *conn = TcpStream::connect(addr).ok().and_then(|mut c| {
                    c.write_all(b"POST /Counter/calm/add HTTP/1.1\r\n").ok()?;
                    Some(c)
                });
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}
