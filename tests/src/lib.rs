//! Test harness: run the real `cairn` binary with the example modules, talk
//! to it over HTTP, kill it with SIGKILL and restart it on the same data.
//!
//! The binary and the example components must be built first; the README's
//! test command (`scripts/test.sh`) does that. When they are missing the
//! harness panics with the command that builds them, so no test is skipped
//! silently.

use anyhow::{bail, Context as _};
use serde_json::Value;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod kafka;
pub mod server;

/// The cargo target directory the tests (or the load generator) were built
/// in: `CARGO_TARGET_DIR`, else the nearest ancestor of this executable that
/// holds the built examples.
pub fn target_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("the executable has a path");
    exe.ancestors()
        .find(|dir| dir.join("examples-wasm").is_dir())
        .unwrap_or_else(|| {
            panic!(
                "no examples-wasm beside {}: run scripts/build-examples.sh",
                exe.display()
            )
        })
        .to_path_buf()
}

fn must_exist(path: PathBuf, what: &str) -> PathBuf {
    assert!(
        path.exists(),
        "{what} not found at {}: build it first with scripts/test.sh (or cargo build -p cairn && scripts/build-examples.sh)",
        path.display()
    );
    path
}

/// The `cairn` binary of the profile the tests run in (or `CAIRN_BIN`).
pub fn cairn_bin() -> PathBuf {
    if let Ok(bin) = std::env::var("CAIRN_BIN") {
        return must_exist(PathBuf::from(bin), "CAIRN_BIN");
    }
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    must_exist(target_dir().join(profile).join("cairn"), "the cairn binary")
}

/// An example component, e.g. `example("basics")`.
pub fn example(name: &str) -> PathBuf {
    must_exist(
        target_dir()
            .join("examples-wasm")
            .join(format!("{name}.wasm")),
        &format!("the example module {name}.wasm"),
    )
}

/// A free loopback port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// How to start a host.
#[derive(Clone)]
pub struct HostOptions {
    /// Extra TOML appended to the generated config file.
    pub config: String,
    /// Modules deployed at start.
    pub deploy: Vec<PathBuf>,
}

impl HostOptions {
    /// A host with no module deployed at start.
    pub fn without_modules() -> Self {
        HostOptions {
            config: String::new(),
            deploy: Vec::new(),
        }
    }
}

impl Default for HostOptions {
    fn default() -> Self {
        HostOptions {
            config: String::new(),
            deploy: vec![example("basics")],
        }
    }
}

/// A running `cairn serve`, on its own data directory.
pub struct Host {
    child: Option<Child>,
    data: tempfile::TempDir,
    options: HostOptions,
    /// Environment variables of this host only (e.g. `CAIRN_FAULTS`).
    env: Vec<(String, String)>,
    ingress_port: u16,
    admin_port: u16,
    /// HTTP client for tests.
    pub http: reqwest::Client,
}

impl Host {
    /// Start a host with the basics example deployed.
    pub async fn start() -> Host {
        Host::start_with(HostOptions::default()).await
    }

    /// Start a host with these options.
    pub async fn start_with(options: HostOptions) -> Host {
        Host::start_with_faults(options, None).await
    }

    /// Start a host with these options and, for it alone, the fault
    /// injection `faults` (`CAIRN_FAULTS`, e.g. `"fsync_delay_ms=200"`).
    pub async fn start_with_faults(options: HostOptions, faults: Option<&str>) -> Host {
        let env: Vec<(&str, &str)> = faults.map(|f| ("CAIRN_FAULTS", f)).into_iter().collect();
        Host::start_with_env(options, &env).await
    }

    /// Start a host with these options and, for it alone, these
    /// environment variables.
    pub async fn start_with_env(options: HostOptions, env: &[(&str, &str)]) -> Host {
        let mut host = Host {
            child: None,
            data: tempfile::tempdir().expect("a temp dir"),
            options,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ingress_port: free_port(),
            admin_port: free_port(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                // Below the host's idle timeout (connections.header_timeout,
                // 10 s), so a pooled connection is never one it just closed.
                .pool_idle_timeout(Duration::from_secs(5))
                .build()
                .unwrap(),
        };
        host.spawn().await;
        host
    }

    async fn spawn(&mut self) {
        let config = self.data.path().join("cairn.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = {:?}\ningress_addr = \"127.0.0.1:{}\"\nadmin_addr = \"127.0.0.1:{}\"\n{}",
                self.data.path().join("db"),
                self.ingress_port,
                self.admin_port,
                self.options.config
            ),
        )
        .unwrap();
        let mut cmd = Command::new(cairn_bin());
        cmd.arg("serve").arg("--config").arg(&config);
        for module in &self.options.deploy {
            cmd.arg("--deploy").arg(module);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        cmd.stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log));
        if std::env::var("RUST_LOG").is_err() {
            cmd.env("RUST_LOG", "info,wasmtime=warn,cranelift=warn");
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        // A host that an injected fault (CAIRN_FAULTS) aborted right after
        // it became ready is started again, as an operator's supervisor would.
        for _ in 0..20 {
            self.child = Some(cmd.spawn().expect("cairn starts"));
            if self.wait_ready().await {
                return;
            }
        }
        panic!("cairn kept failing on injected faults:\n{}", self.log());
    }

    /// The host's data directory (its config, log and `db/`).
    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    fn log_path(&self) -> PathBuf {
        self.data.path().join("host.log")
    }

    /// The host's log so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Wait until the host answers; `false` if an injected fault aborted it.
    async fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                let log = self.log();
                // This start's part of the log (it is appended across restarts).
                let this_start = log
                    .rsplit("fault injection is on")
                    .next()
                    .unwrap_or_default();
                if log.contains("fault injection is on")
                    && this_start.contains("injected fsync failure (CAIRN_FAULTS); aborting")
                {
                    return false;
                }
                panic!("cairn exited with {status} during start:\n{log}");
            }
            let url = format!("{}/health", self.admin());
            let ingress_up = std::net::TcpStream::connect(("127.0.0.1", self.ingress_port)).is_ok();
            if ingress_up
                && self
                    .http
                    .get(&url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("cairn did not become ready in 120 s:\n{}", self.log());
    }

    /// The ingress base URL.
    pub fn ingress(&self) -> String {
        format!("http://127.0.0.1:{}", self.ingress_port)
    }

    /// The admin base URL.
    pub fn admin(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }

    /// The host's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the host runs").id()
    }

    /// Kill the host with SIGKILL: no shutdown code runs.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL is delivered");
            child.wait().expect("the host is reaped");
        }
    }

    /// Whether the host process still runs (a failed commit aborts it).
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Start the host again on the same data and ports, with `options`.
    pub async fn restart_with(&mut self, options: HostOptions) {
        self.options = options;
        self.restart().await;
    }

    /// Start the host again on the same data and ports.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    /// Run the `cairn` CLI against this host; its output, or an error with it.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new(cairn_bin());
        cmd.args(args)
            .env("CAIRN_ADMIN_URL", self.admin())
            .env("CAIRN_INGRESS_URL", self.ingress());
        run(&mut cmd)
    }

    /// Peak resident memory of the host process, in KiB (VmHWM).
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM:")
    }

    /// POST JSON to the ingress; returns (status, headers, body).
    pub async fn post(&self, path: &str, body: &str, headers: &[(&str, &str)]) -> Response {
        let mut req = self
            .http
            .post(format!("{}{path}", self.ingress()))
            .header("content-type", "application/json")
            .body(body.to_string());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        Response::from(req.send().await.expect("the ingress answers")).await
    }

    /// GET from the ingress.
    pub async fn get(&self, path: &str) -> Response {
        let req = self.http.get(format!("{}{path}", self.ingress()));
        Response::from(req.send().await.expect("the ingress answers")).await
    }

    /// Send `method path` to the admin API, with a JSON body if given.
    pub async fn admin_send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Response {
        let mut req = self.http.request(method, format!("{}{path}", self.admin()));
        if let Some(body) = body {
            req = req.json(body);
        }
        Response::from(req.send().await.expect("the admin API answers")).await
    }

    /// POST to an admin path, with a JSON body if given.
    pub async fn admin_post(&self, path: &str, body: Option<&Value>) -> Response {
        self.admin_send(reqwest::Method::POST, path, body).await
    }

    /// GET an admin path as JSON.
    pub async fn admin_get(&self, path: &str) -> Value {
        self.admin_send(reqwest::Method::GET, path, None)
            .await
            .json()
    }

    /// The host's `GET /metrics` (Prometheus text).
    pub async fn metrics(&self) -> String {
        let url = format!("{}/metrics", self.admin());
        let r = self
            .http
            .get(url)
            .send()
            .await
            .expect("the admin API answers");
        r.text().await.expect("a metrics text")
    }

    /// Upload a module's bytes (`POST /deployments`).
    pub async fn upload(&self, module: Vec<u8>) -> Response {
        let req = self
            .http
            .post(format!("{}/deployments", self.admin()))
            .body(module);
        Response::from(req.send().await.expect("the admin API answers")).await
    }

    /// Poll an invocation's admin view until `done` holds (bounded).
    pub async fn wait_invocation(
        &self,
        id: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.admin_get(&format!("/invocations/{id}")).await;
            if done(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "invocation {id} did not get there in {timeout:?}: {v:#}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill();
    }
}

/// POST `1` to `url` with idempotency key `idempotency`, once; whether it
/// was acknowledged within `timeout`.
pub async fn add_once(
    http: &reqwest::Client,
    url: &str,
    idempotency: &str,
    timeout: Duration,
) -> bool {
    http.post(url)
        .header("idempotency-key", idempotency)
        .body("1")
        .timeout(timeout)
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

/// POST `1` to `path` with idempotency key `idempotency` on the hosts
/// (`(client, ingress URL)`) in turn, starting at `*turn`, until one
/// acknowledges it; every retry goes to the next host. Panics after
/// `within`, naming the request.
pub async fn add_until_acked(
    hosts: &[(reqwest::Client, String)],
    turn: &mut usize,
    path: &str,
    idempotency: &str,
    within: Duration,
) {
    let started = Instant::now();
    loop {
        let (http, ingress) = &hosts[*turn % hosts.len()];
        *turn += 1;
        let ten = Duration::from_secs(10);
        if add_once(http, &format!("{ingress}{path}"), idempotency, ten).await {
            return;
        }
        assert!(
            started.elapsed() < within,
            "{path} ({idempotency}) was not acknowledged by any host within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Poll `check` every 100 ms until it holds; fail naming `what` after `timeout`.
pub async fn until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A buffered HTTP response.
#[derive(Debug)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: reqwest::header::HeaderMap,
    /// Body text.
    pub body: String,
}

impl Response {
    async fn from(r: reqwest::Response) -> Self {
        Response {
            status: r.status().as_u16(),
            headers: r.headers().clone(),
            body: r.text().await.unwrap_or_default(),
        }
    }

    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The `invocationId` of a `/send` answer (panics with the body if absent).
    pub fn invocation_id(&self) -> String {
        self.json()["invocationId"]
            .as_str()
            .unwrap_or_else(|| panic!("no id in {}", self.body))
            .to_string()
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A `/proc/PID/status` field in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Run a command and fail with its output if it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Read a file fully (panics with the path).
pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The value of the Prometheus series `name` whose labels include
/// `labels`, from a `/metrics` text.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
            let all = rest.strip_suffix('}')?;
            let has = |(k, v): &(&str, &str)| all.split(',').any(|kv| kv == format!("{k}=\"{v}\""));
            (metric == name && labels.iter().all(has)).then(|| value.parse().ok())?
        })
}
