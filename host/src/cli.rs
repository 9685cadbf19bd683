//! The CLI's client side: requests to a host's admin API, and how answers
//! are shown (tables for people by default, `--json` for scripts).
//!
//! The `serve` side of the binary lives in `server`; this module only
//! talks HTTP, so every command works against any host of a cluster.

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};
use comfy_table::{presets::UTF8_BORDERS_ONLY, ContentArrangement, Table};
use reqwest::Method;
use serde_json::Value;

/// Where the admin API is, and its token.
#[derive(Args)]
pub struct AdminUrl {
    /// The admin API URL.
    #[arg(
        long = "admin",
        env = "CAIRN_ADMIN_URL",
        default_value = "http://127.0.0.1:9070"
    )]
    pub url: String,
    /// The admin API's bearer token (the host's admin_token).
    #[arg(
        long = "admin-token",
        env = "CAIRN_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
}

impl AdminUrl {
    /// A request to `path` of the admin API, with the token if there is one.
    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let req = reqwest::Client::new().request(method, format!("{}{path}", self.url));
        match &self.token {
            Some(token) => req.bearer_auth(token),
            None => req,
        }
    }

    /// Send `method path` (with a JSON body, if given); the answer's JSON.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut req = self.request(method, path);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let text = request(req, &self.url).await?;
        Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }
}

/// Send a request; a non-2xx answer becomes an error with the server's message.
pub async fn request(req: reqwest::RequestBuilder, base: &str) -> anyhow::Result<String> {
    let response = req
        .send()
        .await
        .with_context(|| format!("cannot reach {base}: is `cairn serve` running there?"))?;
    let status = response.status();
    let body = response.text().await?;
    if !status.is_success() {
        let message = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_string))
            .unwrap_or(body);
        bail!("{status}: {message}");
    }
    Ok(body)
}

/// Print an answer as indented JSON (or as it came, if it is not JSON).
pub fn print_json(body: &str) -> anyhow::Result<()> {
    match serde_json::from_str::<Value>(body) {
        Ok(v) => println!("{}", serde_json::to_string_pretty(&v)?),
        Err(_) => println!("{body}"),
    }
    Ok(())
}

/// Wait until every subscription of `topic` has no lag left and none of
/// its invocations is unfinished (`cairn produce --wait-ingested`).
pub async fn wait_ingested(
    admin: &AdminUrl,
    topic: &str,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let listed = admin.call(Method::GET, "/subscriptions", None).await?;
        let of_topic: Vec<&Value> = listed["subscriptions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["topic"] == topic)
            .collect();
        if of_topic.is_empty() {
            bail!("no subscription consumes {topic}: create one with `cairn subscriptions create`");
        }
        let done = of_topic.iter().all(|s| {
            let lag = s["lag"].as_object().into_iter().flatten();
            s["in_flight"] == 0 && lag.map(|(_, n)| n.as_i64().unwrap_or(1)).sum::<i64>() == 0
        });
        if done {
            println!("ingested by {} subscription(s)", of_topic.len());
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            bail!("the subscriptions of {topic} did not catch up within {timeout:?}: see `cairn subscriptions list`");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// How an answer is printed.
#[derive(Args)]
pub struct Output {
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub admin: AdminUrl,
}

/// `cairn invocations list`: the filters of `GET /invocations`.
#[derive(Args)]
pub struct ListInvocations {
    /// Only this service's.
    #[arg(long)]
    pub service: Option<String>,
    /// Only this handler's.
    #[arg(long)]
    pub handler: Option<String>,
    /// Only this object key's or workflow id's (with --service).
    #[arg(long, requires = "service")]
    pub key: Option<String>,
    /// Only in this status: scheduled, pending, ready, running, backing-off,
    /// suspended, paused, succeeded, failed, killed, cancelled (or
    /// unfinished).
    #[arg(long)]
    pub status: Option<String>,
    /// Only on this deployment (`dp_...`).
    #[arg(long)]
    pub deployment: Option<String>,
    /// Created at or after (RFC 3339 or ms since the epoch).
    #[arg(long)]
    pub created_after: Option<String>,
    /// Created before (RFC 3339 or ms since the epoch).
    #[arg(long)]
    pub created_before: Option<String>,
    /// At most this many (1 to 1,000).
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// Go on from a previous page's cursor.
    #[arg(long)]
    pub cursor: Option<String>,
    #[command(flatten)]
    pub output: Output,
}

impl ListInvocations {
    /// Fetch the page and print it.
    pub async fn run(self) -> anyhow::Result<()> {
        let limit = self.limit.to_string();
        let query: Vec<(&str, &str)> = [
            ("service", self.service.as_deref()),
            ("handler", self.handler.as_deref()),
            ("key", self.key.as_deref()),
            ("status", self.status.as_deref()),
            ("deployment", self.deployment.as_deref()),
            ("created_after", self.created_after.as_deref()),
            ("created_before", self.created_before.as_deref()),
            ("cursor", self.cursor.as_deref()),
            ("limit", Some(limit.as_str())),
        ]
        .into_iter()
        .filter_map(|(name, value)| Some((name, value?)))
        .collect();
        let admin = &self.output.admin;
        let req = admin.request(Method::GET, "/invocations").query(&query);
        let page: Value = serde_json::from_str(&request(req, &admin.url).await?)?;
        if self.output.json {
            return print_json(&page.to_string());
        }
        let mut table = table(&["ID", "TARGET", "STATUS", "ATTEMPTS", "CREATED", "ERROR"]);
        for i in page["invocations"].as_array().into_iter().flatten() {
            // The terminal failure, else the last retryable error.
            let error = match &i["failure"] {
                Value::Null => text(&i["last_error"]),
                failure => format!("{} {}", text(&failure["code"]), text(&failure["message"])),
            };
            table.add_row([
                text(&i["id"]),
                text(&i["target"]),
                text(&i["status"]),
                text(&i["attempts"]),
                text(&i["created_at"]),
                shortened(&error, 60),
            ]);
        }
        println!("{table}");
        if let Some(next) = page["next_cursor"].as_str() {
            println!("more: add --cursor {next}");
        }
        Ok(())
    }
}

/// `cairn state ...`: a virtual object's (or workflow's) state.
#[derive(Subcommand)]
pub enum StateCommand {
    /// Show a key's state (every entry, or the one named).
    Get {
        /// The virtual object or workflow.
        service: String,
        /// The object key or workflow id.
        key: String,
        /// Only this entry, printed as JSON.
        name: Option<String>,
        #[command(flatten)]
        output: Output,
    },
    /// Set an entry to a JSON value; waits for the key's running handler.
    Set {
        /// The virtual object or workflow.
        service: String,
        /// The object key or workflow id.
        key: String,
        /// The entry.
        name: String,
        /// Its new value, as JSON (e.g. 5, "text", {"a": 1}).
        value: String,
        #[command(flatten)]
        admin: AdminUrl,
    },
    /// Remove an entry; waits for the key's running handler.
    Clear {
        /// The virtual object or workflow.
        service: String,
        /// The object key or workflow id.
        key: String,
        /// The entry.
        name: String,
        #[command(flatten)]
        admin: AdminUrl,
    },
}

impl StateCommand {
    /// Run the command.
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            StateCommand::Get {
                service,
                key,
                name,
                output,
            } => {
                let path = format!("/objects/{}/{}/state", segment(&service), segment(&key));
                let v = output.admin.call(Method::GET, &path, None).await?;
                let state = &v["state"];
                match (name, output.json) {
                    (Some(name), _) => match state.get(&name) {
                        Some(value) => println!("{value}"),
                        None => bail!("{service}/{key} has no state entry {name:?}"),
                    },
                    (None, true) => print_json(&v.to_string())?,
                    (None, false) => {
                        let mut table = table(&["NAME", "VALUE"]);
                        for (name, value) in state.as_object().into_iter().flatten() {
                            table.add_row([name.clone(), value.to_string()]);
                        }
                        println!("{table}");
                    }
                }
                Ok(())
            }
            StateCommand::Set {
                service,
                key,
                name,
                value,
                admin,
            } => {
                let value: Value = serde_json::from_str(&value).with_context(|| {
                    format!("{value:?} is not JSON (quote text: '\"{value}\"')")
                })?;
                let path = entry_path(&service, &key, &name);
                admin.call(Method::PUT, &path, Some(value)).await?;
                println!("set {service}/{key} {name}");
                Ok(())
            }
            StateCommand::Clear {
                service,
                key,
                name,
                admin,
            } => {
                admin
                    .call(Method::DELETE, &entry_path(&service, &key, &name), None)
                    .await?;
                println!("cleared {service}/{key} {name}");
                Ok(())
            }
        }
    }
}

/// `cairn deployments ...`.
#[derive(Subcommand)]
pub enum DeploymentsCommand {
    /// List the deployments, newest last.
    List(Output),
    /// Show a deployment's services and handlers.
    Describe {
        /// The deployment (`dp_...`).
        id: String,
        #[command(flatten)]
        output: Output,
    },
}

impl DeploymentsCommand {
    /// Run the command.
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            DeploymentsCommand::List(output) => {
                let v = output.admin.call(Method::GET, "/deployments", None).await?;
                if output.json {
                    return print_json(&v.to_string());
                }
                let mut table = table(&["ID", "CREATED", "SIZE", "SERVICES"]);
                for d in v["deployments"].as_array().into_iter().flatten() {
                    let services: Vec<String> = names(&d["services"]);
                    table.add_row([
                        text(&d["id"]),
                        text(&d["created_at"]),
                        format!("{} KiB", d["size"].as_u64().unwrap_or(0) / 1024),
                        services.join(", "),
                    ]);
                }
                println!("{table}");
                Ok(())
            }
            DeploymentsCommand::Describe { id, output } => {
                let path = format!("/deployments/{}", segment(&id));
                let d = output.admin.call(Method::GET, &path, None).await?;
                if output.json {
                    return print_json(&d.to_string());
                }
                println!("deployment {}", text(&d["id"]));
                println!("created    {}", text(&d["created_at"]));
                println!("size       {} bytes", text(&d["size"]));
                let mut table = table(&["SERVICE", "KIND", "HANDLER", "HANDLER KIND"]);
                for s in d["services"].as_array().into_iter().flatten() {
                    for h in s["handlers"].as_array().into_iter().flatten() {
                        table.add_row([
                            text(&s["name"]),
                            text(&s["kind"]),
                            text(&h["name"]),
                            text(&h["kind"]),
                        ]);
                    }
                }
                println!("{table}");
                Ok(())
            }
        }
    }
}

/// A table with these column headers, fitted to the terminal.
fn table(headers: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(UTF8_BORDERS_ONLY)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(headers.to_vec());
    table
}

/// A JSON value as a cell: strings bare, null empty.
fn text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// At most `max` characters, with an ellipsis when cut.
fn shortened(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_string(),
    }
}

/// The `name` fields of a JSON array.
fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .into_iter()
        .flatten()
        .map(|s| text(&s["name"]))
        .collect()
}

/// A path segment, percent-encoded.
fn segment(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// The admin path of one state entry.
fn entry_path(service: &str, key: &str, name: &str) -> String {
    format!(
        "/objects/{}/{}/state/{}",
        segment(service),
        segment(key),
        segment(name)
    )
}
