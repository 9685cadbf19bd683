//! `cairn`: run a host, deploy modules, invoke handlers, inspect invocations.

use anyhow::{bail, Context as _};
use cairn::cli::{
    print_json, request, AdminUrl, DeploymentsCommand, ListInvocations, StateCommand,
};
use cairn::config::Config;
use clap::{Args, Parser, Subcommand};
use reqwest::Method;
use serde_json::json;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

// Thousands of short invocations per second allocate and free a lot of
// small buffers; mimalloc handles that far better than the system malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Cairn: durable execution for WebAssembly handlers.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines as text (colours only on a terminal) or as JSON objects,
    /// one per line.
    #[arg(long, global = true, env = "CAIRN_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
}

/// How the logs are written.
#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a host: the ingress, the admin API and the invoker.
    Serve(Serve),
    /// Upload a handler module (a .wasm component) to a running host.
    Deploy {
        /// The component file.
        file: PathBuf,
        #[command(flatten)]
        admin: AdminUrl,
    },
    /// Invoke a handler: `Service/handler` or `Object/key/handler`.
    Invoke {
        /// The target, e.g. `Counter/alice/add`.
        target: String,
        /// The JSON input (omit for handlers without input).
        input: Option<String>,
        /// Enqueue and return at once instead of waiting for the result.
        #[arg(long)]
        send: bool,
        /// With --send: start after this delay (e.g. 10s, PT1M).
        #[arg(long, requires = "send")]
        delay: Option<String>,
        /// Run at most once for this key (the idempotency-key header).
        #[arg(long)]
        idempotency_key: Option<String>,
        /// The ingress URL.
        #[arg(
            long,
            env = "CAIRN_INGRESS_URL",
            default_value = "http://127.0.0.1:8080"
        )]
        ingress: String,
    },
    /// List, inspect and control invocations.
    Invocations {
        #[command(subcommand)]
        command: InvocationsCommand,
    },
    /// Read and edit the state of virtual objects and workflows.
    State {
        #[command(subcommand)]
        command: StateCommand,
    },
    /// List and describe deployments.
    Deployments {
        #[command(subcommand)]
        command: DeploymentsCommand,
    },
    /// Register Kafka clusters.
    KafkaClusters {
        #[command(subcommand)]
        command: ClustersCommand,
    },
    /// Manage Kafka subscriptions (topic -> handler).
    Subscriptions {
        #[command(subcommand)]
        command: SubscriptionsCommand,
    },
    /// Invoke handlers on cron schedules.
    Schedules {
        #[command(subcommand)]
        command: SchedulesCommand,
    },
    /// Concurrency limits (flow control).
    Limits {
        #[command(subcommand)]
        command: LimitsCommand,
    },
    /// List the deployed services.
    Services {
        #[command(flatten)]
        admin: AdminUrl,
    },
    /// Produce records to a Kafka topic, one per VALUE (for tutorials and
    /// trying subscriptions out); prints where each landed.
    Produce {
        /// The topic.
        topic: String,
        /// Record values (JSON for Cairn handlers).
        #[arg(required = true)]
        values: Vec<String>,
        /// The records' key (the object key of a Virtual Object sink).
        #[arg(short, long)]
        key: Option<String>,
        /// The broker.
        #[arg(long, env = "CAIRN_KAFKA_BOOTSTRAP", default_value = "127.0.0.1:9092")]
        bootstrap: String,
        /// Then wait (60 s at most) until every subscription of the topic
        /// has ingested the records and their invocations have finished.
        #[arg(long)]
        wait_ingested: bool,
        #[command(flatten)]
        admin: AdminUrl,
    },
}

#[derive(Subcommand)]
enum InvocationsCommand {
    /// List invocations, newest first, with filters.
    List(ListInvocations),
    #[command(flatten)]
    One(InvocationCommand),
}

/// What is done to one invocation.
#[derive(Subcommand)]
enum InvocationCommand {
    /// Show an invocation's status, attempts, last error and journal.
    Describe(Invocation),
    /// Cancel cooperatively: pending operations fail with "cancelled" and the handler can compensate.
    Cancel(Invocation),
    /// Kill: complete it at once with "killed", no compensation.
    Kill(Invocation),
    /// Pause: stop it, keeping its journal (and its key) until resumed.
    Pause(Invocation),
    /// Resume a paused invocation (with --deployment: on that deployment).
    Resume {
        #[command(flatten)]
        it: Invocation,
        /// Replay it on this deployment (`dp_...`) instead of its own.
        #[arg(long)]
        deployment: Option<String>,
    },
    /// Forget a finished invocation now (its journal and idempotency key).
    Purge(Invocation),
}

#[derive(Subcommand)]
enum ClustersCommand {
    /// Register (or replace) a cluster: `cairn kafka-clusters add local -p bootstrap.servers=127.0.0.1:9092`.
    Add {
        /// The cluster's name (used in kafka://NAME/topic).
        name: String,
        /// librdkafka properties, KEY=VALUE; repeatable.
        #[arg(short, long = "property", value_parser = key_value)]
        properties: Vec<(String, String)>,
        #[command(flatten)]
        admin: AdminUrl,
    },
    /// List the registered clusters.
    List {
        #[command(flatten)]
        admin: AdminUrl,
    },
}

#[derive(Subcommand)]
enum SubscriptionsCommand {
    /// Subscribe topics to a handler: `--source kafka://local/orders --sink service://Orders/handle`.
    Create {
        /// kafka://CLUSTER/TOPIC, kafka://CLUSTER/T1,T2 or kafka://CLUSTER/^PATTERN
        #[arg(long)]
        source: String,
        /// service://SERVICE/HANDLER
        #[arg(long)]
        sink: String,
        /// Consumer options, KEY=VALUE (e.g. fetch.min.bytes=1); repeatable.
        #[arg(short, long = "option", value_parser = key_value)]
        options: Vec<(String, String)>,
        /// The object key: `key` (the record's), `header:NAME` or `json:/POINTER`.
        #[arg(long)]
        key: Option<String>,
        /// Records without a key: `empty`, `spread` or `dead-letter`.
        #[arg(long)]
        null_key: Option<String>,
        /// A failed invocation: `pause` or `dead-letter`.
        #[arg(long)]
        on_failure: Option<String>,
        /// kafka://CLUSTER/TOPIC receiving dead letters.
        #[arg(long)]
        dead_letter: Option<String>,
        /// `earliest`, `latest` or `timestamp:RFC3339`.
        #[arg(long)]
        start_at: Option<String>,
        #[command(flatten)]
        admin: AdminUrl,
    },
    /// List subscriptions with ingest counts, rate, in-flight invocations and lag.
    List {
        #[command(flatten)]
        admin: AdminUrl,
    },
    /// Stop consuming (kept across restarts).
    Pause(Invocation),
    /// Consume again.
    Resume(Invocation),
    /// Remove a subscription.
    Delete(Invocation),
    /// Skip the record a subscription stopped on (its paused invocation
    /// completes as skipped), then resume: `cairn subscriptions skip sub_... --partition 0 --offset 41`.
    Skip {
        /// The subscription id.
        id: String,
        /// The record's topic (needed when the subscription reads several).
        #[arg(long)]
        topic: Option<String>,
        /// The record's partition.
        #[arg(long)]
        partition: i32,
        /// The record's offset.
        #[arg(long)]
        offset: i64,
        #[command(flatten)]
        admin: AdminUrl,
    },
}

#[derive(Subcommand)]
enum SchedulesCommand {
    /// Create or replace a schedule: `cairn schedules add nightly --cron "0 2 * * *" --target Reports/nightly`.
    Add {
        /// The schedule's name.
        name: String,
        /// Cron expression: 5 fields, or 6 with seconds first (UTC).
        #[arg(long)]
        cron: String,
        /// `Service/handler` or `Object/key/handler`.
        #[arg(long)]
        target: String,
        /// The JSON input of each tick.
        #[arg(long)]
        input: Option<String>,
        #[command(flatten)]
        admin: AdminUrl,
    },
    /// List the schedules.
    List {
        #[command(flatten)]
        admin: AdminUrl,
    },
    /// Delete a schedule (its past invocations stay).
    Delete(Invocation),
}

#[derive(Subcommand)]
enum LimitsCommand {
    /// At most MAX attempts at once in SCOPE: `Service`, `Service/handler` or `Object/prefix*`.
    Set {
        /// The scope.
        scope: String,
        /// Attempts allowed at once.
        max: usize,
        #[command(flatten)]
        admin: AdminUrl,
    },
    /// List the limits and the slots in use.
    List {
        #[command(flatten)]
        admin: AdminUrl,
    },
    /// Remove a limit.
    Remove {
        /// The scope.
        scope: String,
        #[command(flatten)]
        admin: AdminUrl,
    },
}

fn key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))
}

#[derive(Args)]
struct Invocation {
    /// The id (`inv_...`, `sub_...`) or schedule name.
    id: String,
    #[command(flatten)]
    admin: AdminUrl,
}

#[derive(Args)]
struct Serve {
    /// A TOML configuration file (flags and environment override it).
    #[arg(long, env = "CAIRN_CONFIG")]
    config: Option<PathBuf>,
    /// Where the database lives.
    #[arg(long, env = "CAIRN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The ingress address.
    #[arg(long, env = "CAIRN_INGRESS")]
    ingress: Option<SocketAddr>,
    /// The admin API address.
    #[arg(long, env = "CAIRN_ADMIN")]
    admin: Option<SocketAddr>,
    /// Deploy these modules at start (idempotent: same bytes, same deployment).
    #[arg(long)]
    deploy: Vec<PathBuf>,
    /// Allow guests to reach this host (host, host:port or host:*); repeatable.
    #[arg(long)]
    http_allow: Vec<String>,
    /// Cluster mode: replicate the store through the Kafka cluster at these
    /// bootstrap servers (see [cluster] in the config).
    #[arg(long, env = "CAIRN_CLUSTER")]
    cluster: Option<String>,
    /// Cluster mode: the application's name (topics derive from it).
    #[arg(long, env = "CAIRN_CLUSTER_APP", requires = "cluster")]
    cluster_app: Option<String>,
    /// Cluster mode: the application's partition count (fixed when the
    /// cluster is created).
    #[arg(long, env = "CAIRN_CLUSTER_PARTITIONS", requires = "cluster")]
    cluster_partitions: Option<u32>,
    /// Require this bearer token on the admin API (see admin_token).
    #[arg(long, env = "CAIRN_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
}

impl Serve {
    fn config(self) -> anyhow::Result<(Config, Vec<PathBuf>)> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(d) = self.data_dir {
            config.data_dir = d;
        }
        if let Some(a) = self.ingress {
            config.ingress_addr = a;
        }
        if let Some(a) = self.admin {
            config.admin_addr = a;
        }
        config.http_allow.extend(self.http_allow);
        if let Some(token) = self.admin_token {
            config.admin_token = Some(token);
        }
        if let Some(bootstrap) = self.cluster {
            config
                .cluster
                .get_or_insert_with(Default::default)
                .bootstrap = bootstrap;
        }
        if let (Some(app), Some(cluster)) = (self.cluster_app, config.cluster.as_mut()) {
            cluster.app = app;
        }
        if let (Some(n), Some(cluster)) = (self.cluster_partitions, config.cluster.as_mut()) {
            cluster.partitions = n;
        }
        if let Some(cluster) = &config.cluster {
            anyhow::ensure!(
                (1..=1024).contains(&cluster.partitions),
                "cluster.partitions must be between 1 and 1024 (it is {})",
                cluster.partitions
            );
        }
        Ok((config, self.deploy))
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,wasmtime=warn,cranelift=warn".into()),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs.json().init(),
    }
    if let Err(e) = run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(serve) => {
            let (config, deploy) = serve.config()?;
            cairn::server::serve(config, deploy).await
        }
        Command::Deploy { file, admin } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let body = request(
                admin.request(Method::POST, "/deployments").body(bytes),
                &admin.url,
            )
            .await?;
            print_json(&body)
        }
        Command::Invoke {
            target,
            input,
            send,
            delay,
            idempotency_key,
            ingress,
        } => {
            let target = target.trim_matches('/');
            if target.split('/').count() < 2 {
                bail!("the target is Service/handler or Object/key/handler, not {target:?}");
            }
            let mut url = format!("{ingress}/{target}");
            if send {
                url.push_str("/send");
            }
            let mut req = reqwest::Client::new()
                .post(url)
                .header("content-type", "application/json")
                .body(input.unwrap_or_default());
            if let Some(d) = delay {
                req = req.query(&[("delay", d)]);
            }
            if let Some(k) = idempotency_key {
                req = req.header("idempotency-key", k);
            }
            print_json(&request(req, &ingress).await?)
        }
        Command::State { command } => command.run().await,
        Command::Deployments { command } => command.run().await,
        Command::Invocations {
            command: InvocationsCommand::List(list),
        } => list.run().await,
        Command::Invocations {
            command: InvocationsCommand::One(command),
        } => {
            let (method, action, it) = match command {
                InvocationCommand::Purge(it) => (Method::DELETE, String::new(), it),
                InvocationCommand::Describe(it) => (Method::GET, String::new(), it),
                InvocationCommand::Cancel(it) => (Method::POST, "/cancel".into(), it),
                InvocationCommand::Kill(it) => (Method::POST, "/kill".into(), it),
                InvocationCommand::Pause(it) => (Method::POST, "/pause".into(), it),
                InvocationCommand::Resume { it, deployment } => {
                    let query = deployment
                        .map(|d| format!("?deployment={d}"))
                        .unwrap_or_default();
                    (Method::POST, format!("/resume{query}"), it)
                }
            };
            let path = format!("/invocations/{}{action}", it.id);
            admin_call(&it.admin, method, &path, None).await
        }
        Command::KafkaClusters { command } => match command {
            ClustersCommand::Add {
                name,
                properties,
                admin,
            } => {
                let properties: BTreeMap<_, _> = properties.into_iter().collect();
                let body = json!({ "name": name, "properties": properties });
                admin_call(&admin, Method::POST, "/kafka-clusters", Some(body)).await
            }
            ClustersCommand::List { admin } => {
                admin_call(&admin, Method::GET, "/kafka-clusters", None).await
            }
        },
        Command::Subscriptions { command } => match command {
            SubscriptionsCommand::Create {
                source,
                sink,
                options,
                key,
                null_key,
                on_failure,
                dead_letter,
                start_at,
                admin,
            } => {
                let options: BTreeMap<_, _> = options.into_iter().collect();
                let mut body = json!({ "source": source, "sink": sink, "options": options });
                let settings = [
                    ("key", key),
                    ("null_key", null_key),
                    ("on_failure", on_failure),
                    ("dead_letter", dead_letter),
                    ("start_at", start_at),
                ];
                for (name, value) in settings {
                    if let Some(value) = value {
                        body[name] = json!(value);
                    }
                }
                admin_call(&admin, Method::POST, "/subscriptions", Some(body)).await
            }
            SubscriptionsCommand::List { admin } => {
                admin_call(&admin, Method::GET, "/subscriptions", None).await
            }
            SubscriptionsCommand::Pause(it) => {
                let path = format!("/subscriptions/{}/pause", it.id);
                admin_call(&it.admin, Method::POST, &path, None).await
            }
            SubscriptionsCommand::Resume(it) => {
                let path = format!("/subscriptions/{}/resume", it.id);
                admin_call(&it.admin, Method::POST, &path, None).await
            }
            SubscriptionsCommand::Delete(it) => {
                let path = format!("/subscriptions/{}", it.id);
                admin_call(&it.admin, Method::DELETE, &path, None).await
            }
            SubscriptionsCommand::Skip {
                id,
                topic,
                partition,
                offset,
                admin,
            } => {
                let body = json!({ "topic": topic, "partition": partition, "offset": offset });
                let path = format!("/subscriptions/{id}/skip");
                admin_call(&admin, Method::POST, &path, Some(body)).await
            }
        },
        Command::Schedules { command } => match command {
            SchedulesCommand::Add {
                name,
                cron,
                target,
                input,
                admin,
            } => {
                let input = input
                    .map(|i| serde_json::from_str::<serde_json::Value>(&i))
                    .transpose()
                    .context("--input is not JSON")?;
                let body = json!({ "name": name, "cron": cron, "target": target, "input": input });
                admin_call(&admin, Method::POST, "/schedules", Some(body)).await
            }
            SchedulesCommand::List { admin } => {
                admin_call(&admin, Method::GET, "/schedules", None).await
            }
            SchedulesCommand::Delete(it) => {
                let path = format!("/schedules/{}", it.id);
                admin_call(&it.admin, Method::DELETE, &path, None).await
            }
        },
        Command::Limits { command } => match command {
            LimitsCommand::Set { scope, max, admin } => {
                let body = json!({ "scope": scope, "max": max });
                admin_call(&admin, Method::POST, "/concurrency-limits", Some(body)).await
            }
            LimitsCommand::List { admin } => {
                admin_call(&admin, Method::GET, "/concurrency-limits", None).await
            }
            LimitsCommand::Remove { scope, admin } => {
                let scope = percent_encoding::utf8_percent_encode(
                    &scope,
                    percent_encoding::NON_ALPHANUMERIC,
                );
                let path = format!("/concurrency-limits?scope={scope}");
                admin_call(&admin, Method::DELETE, &path, None).await
            }
        },
        Command::Produce {
            topic,
            values,
            key,
            bootstrap,
            wait_ingested,
            admin,
        } => {
            produce(&bootstrap, &topic, key.as_deref(), &values).await?;
            if wait_ingested {
                cairn::cli::wait_ingested(&admin, &topic, std::time::Duration::from_secs(60))
                    .await?;
            }
            Ok(())
        }
        Command::Services { admin } => admin_call(&admin, Method::GET, "/services", None).await,
    }
}

/// Produce `values` to `topic` with an idempotent producer, in order.
async fn produce(
    bootstrap: &str,
    topic: &str,
    key: Option<&str>,
    values: &[String],
) -> anyhow::Result<()> {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .create()?;
    for value in values {
        let mut record = FutureRecord::to(topic).payload(value);
        if let Some(key) = key {
            record = record.key(key);
        }
        let delivery = producer
            .send(record, std::time::Duration::from_secs(30))
            .await
            .map_err(|(e, _)| anyhow::anyhow!("producing to {topic} at {bootstrap}: {e}"))?;
        println!("{topic}/{}@{}", delivery.partition, delivery.offset);
    }
    Ok(())
}

/// Send `method path` (with a JSON body, if given) to the admin API and print
/// the answer.
async fn admin_call(
    admin: &AdminUrl,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<()> {
    let mut req = admin.request(method, path);
    if let Some(body) = body {
        req = req.json(&body);
    }
    print_json(&request(req, &admin.url).await?)
}
