//! Versioning: a new upload takes new invocations; invocations in flight
//! finish on the deployment they started on.

use cairn_tests::server::TestServer;
use cairn_tests::{example, read, Host, HostOptions};
use std::time::{Duration, Instant};

#[tokio::test]
async fn an_invocation_in_flight_during_an_upload_finishes_on_its_original_deployment() {
    let server = TestServer::start(Duration::ZERO).await;
    let host = Host::start_with(HostOptions {
        config: "http_allow = [\"127.0.0.1:*\"]\n".into(),
        ..Default::default()
    })
    .await;
    let v1 = host.admin_get("/services").await["services"][4]["deployment"].clone();
    let held = host
        .post(
            "/Steps/version/send",
            &format!("\"{}/hold\"", server.url),
            &[],
        )
        .await
        .json();
    let held_id = held["invocationId"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.holds() < 1 {
        assert!(
            Instant::now() < deadline,
            "the invocation never reached its step"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let upload = host.upload(read(&example("basics-v2"))).await;
    assert_eq!(upload.status, 201);
    let v2 = upload.json();
    assert_ne!(v2["id"], v1);
    assert_eq!(
        host.admin_get("/services").await["services"][4]["deployment"],
        v2["id"]
    );

    let fresh = host
        .post("/Steps/version", &format!("\"{}/token\"", server.url), &[])
        .await;
    assert_eq!(
        fresh.body, "\"v2\"",
        "new invocations use the new deployment"
    );
    server.release();
    let old = host.get(&format!("/restate/attach/{held_id}")).await;
    assert_eq!(old.body, "\"v1\"", "the in-flight invocation stays on v1");
    assert_eq!(
        host.admin_get(&format!("/invocations/{held_id}")).await["deployment"],
        v1
    );
    assert_eq!(
        host.admin_get("/deployments").await["deployments"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}
