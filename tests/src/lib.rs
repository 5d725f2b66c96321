//! Harness for the end-to-end tests: starts the three real binaries against the real Kafka broker
//! (`KAFKA_BROKERS`) and PostgreSQL (`DATABASE_URL`) that `./dev test` provisions. Every stack gets
//! its own database, topic, transactional id and ports, so tests run in parallel without sharing
//! state.
//!
//! `Stack` (this file) starts and drives the services; `kafka` and `postgres` are private
//! brokers and clusters for the tests that take them down. What every test crate shares (the
//! required environment, `eventually`, the fresh database, the token signer and the secrets the
//! services are configured with) comes from the `test-support` crate.

pub mod kafka;
pub mod postgres;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tokio::process::{Child, Command};
use uuid::Uuid;

use test_support::tokens::{SERVICE_SECRET, TEST_KEK, USER_SECRET};
use test_support::{required_env, TestDatabase, Tokens};

/// Where the service binaries are (`TASKSTREAM_BIN_DIR`, or the target dir this test runs from).
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("TASKSTREAM_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current exe");
    exe.parent().and_then(|deps| deps.parent()).map(PathBuf::from).expect("target dir")
}

/// A port that is free now and that no other caller in this process is given, for a service the
/// test starts (and may restart on the same port). Taken below the kernel's ephemeral range
/// (`ip_local_port_range`), from a random start, one after the other: a port the kernel hands out
/// for `bind(0)` or an outgoing connection may be handed out again, or taken by a connection, as
/// soon as its holder exits, and a service restarted on it then exits with "address already in
/// use" (a CI run lost a test to a service that exited before it was ready).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: std::sync::OnceLock<AtomicU32> = std::sync::OnceLock::new();
    let ephemeral_low = u32::from(ephemeral_ports_start());
    let (low, span) = (ephemeral_low / 2, ephemeral_low - ephemeral_low / 2);
    if span < 1_000 {
        return std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port");
    }
    let next = NEXT.get_or_init(|| AtomicU32::new(Uuid::new_v4().as_u128() as u32 % span));
    for _ in 0..span {
        let port = (low + next.fetch_add(1, Ordering::Relaxed) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {low}..{}", low + span)
}

/// Where the kernel's ephemeral port range starts (the ports of `bind(0)` and outgoing connections).
fn ephemeral_ports_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(32_768)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Svc {
    CommandApi,
    Projector,
    QueryApi,
}

impl Svc {
    fn binary(self) -> &'static str {
        match self {
            Svc::CommandApi => "command-api",
            Svc::Projector => "projector",
            Svc::QueryApi => "query-api",
        }
    }
}

pub struct StackOptions {
    pub kafka_brokers: Option<String>,
    /// An admin URL of another PostgreSQL than `DATABASE_URL` (a private one).
    pub database_url: Option<String>,
    pub partitions: i32,
    pub extra_env: Vec<(String, String)>,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self { kafka_brokers: None, database_url: None, partitions: 4, extra_env: Vec::new() }
    }
}

/// Three running services plus their private database and topic.
pub struct Stack {
    pub topic: String,
    pub brokers: String,
    pub database_url: String,
    env: Vec<(String, String)>,
    ports: HashMap<Svc, u16>,
    children: HashMap<Svc, Child>,
    /// Where the services write their output (unless `TEST_LOG` sends it to the terminal): a
    /// service that exits before it is ready is reported with the end of its log. Removed by
    /// [`cleanup`](Self::cleanup), kept when a test fails.
    logs: PathBuf,
    /// The log of each service started by `spawn`.
    log_of: HashMap<Svc, PathBuf>,
    spawned: std::sync::atomic::AtomicUsize,
    pub http: reqwest::Client,
    pub tokens: Tokens,
    /// Declared after the services: dropped (with the database) once they are gone.
    database: TestDatabase,
    /// The stack's topics, deleted last (only dropped: never read).
    _topics: TestTopics,
}

/// Deletes a test's topics (the log and every topic named after it: `.dlq`, `.owners`,
/// `.snapshots`, `.updates`, `.keys`) when dropped, so that repeated `./dev test` runs do not leave a local
/// broker with thousands of topics: one that had collected 1 896 of them (about 20 000 partitions)
/// served commands measurably slower.
struct TestTopics {
    brokers: String,
    prefix: String,
    /// Client properties (a secured broker's), from the stack's `KAFKA_CONFIG_*` variables.
    config: Vec<(String, String)>,
}

impl Drop for TestTopics {
    fn drop(&mut self) {
        let (brokers, prefix, config) = (self.brokers.clone(), self.prefix.clone(), self.config.clone());
        // On a thread of its own: the test's runtime may be unwinding.
        let deleted = std::thread::spawn(move || -> anyhow::Result<()> {
            use rdkafka::admin::{AdminClient, AdminOptions};
            use rdkafka::client::DefaultClientContext;
            use rdkafka::consumer::{BaseConsumer, Consumer};
            let mut cfg = rdkafka::ClientConfig::new();
            cfg.set("bootstrap.servers", &brokers);
            for (k, v) in &config {
                cfg.set(k, v);
            }
            let metadata = cfg.create::<BaseConsumer>()?.fetch_metadata(None, Duration::from_secs(10))?;
            let names: Vec<String> = metadata.topics().iter().map(|t| t.name().to_owned()).filter(|n| n.starts_with(&prefix)).collect();
            if names.is_empty() {
                return Ok(());
            }
            let admin: AdminClient<DefaultClientContext> = cfg.create()?;
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(admin.delete_topics(&names, &AdminOptions::new().request_timeout(Some(Duration::from_secs(10)))))?;
            Ok(())
        })
        .join();
        if !matches!(deleted, Ok(Ok(()))) {
            eprintln!("could not delete the test topics {}*: {deleted:?}", self.prefix);
        }
    }
}

impl Stack {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(StackOptions::default()).await
    }

    pub async fn start_with(opts: StackOptions) -> anyhow::Result<Self> {
        let admin_url = opts.database_url.unwrap_or_else(|| required_env("DATABASE_URL"));
        let brokers = opts.kafka_brokers.unwrap_or_else(|| required_env("KAFKA_BROKERS"));
        let id = Uuid::new_v4().simple().to_string();
        // Empty: the services migrate it when they start.
        let database = TestDatabase::create(&admin_url).await?;
        let database_url = database.url().to_owned();
        let topic = format!("task-events-e2e-{}", &id[..12]);
        let mut ports = HashMap::new();
        for s in [Svc::CommandApi, Svc::Projector, Svc::QueryApi] {
            ports.insert(s, free_port());
        }
        let brokers_for_stack = brokers.clone();
        let mut env = vec![
            ("KAFKA_BROKERS".to_owned(), brokers),
            ("DATABASE_URL".to_owned(), database_url.clone()),
            ("AUTH_JWT_SECRET".to_owned(), USER_SECRET.to_owned()),
            ("SERVICE_JWT_SECRET".to_owned(), SERVICE_SECRET.to_owned()),
            ("TASKSTREAM_KEK".to_owned(), TEST_KEK.to_owned()),
            ("COMMAND_API_URL".to_owned(), format!("http://127.0.0.1:{}", ports[&Svc::CommandApi])),
            ("TASK_EVENTS_TOPIC".to_owned(), topic.clone()),
            ("TASK_EVENTS_PARTITIONS".to_owned(), opts.partitions.to_string()),
            ("KAFKA_TRANSACTIONAL_ID".to_owned(), format!("e2e-{id}")),
            ("COMMAND_API_ADDR".to_owned(), format!("127.0.0.1:{}", ports[&Svc::CommandApi])),
            ("PROJECTOR_ADDR".to_owned(), format!("127.0.0.1:{}", ports[&Svc::Projector])),
            ("QUERY_API_ADDR".to_owned(), format!("127.0.0.1:{}", ports[&Svc::QueryApi])),
            ("RUST_LOG".to_owned(), std::env::var("TEST_LOG").unwrap_or_else(|_| "warn".into())),
            ("LOG_FORMAT".to_owned(), "pretty".to_owned()),
        ];
        env.extend(opts.extra_env);
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
        // `KAFKA_CONFIG_SASL_PASSWORD` -> `sasl.password` (the names the tests pass have no '_').
        let config = env.iter().filter_map(|(k, v)| k.strip_prefix("KAFKA_CONFIG_").map(|p| (p.to_lowercase().replace('_', "."), v.clone()))).collect();
        let topics = TestTopics { brokers: brokers_for_stack.clone(), prefix: topic.clone(), config };
        let mut stack = Stack {
            topic,
            brokers: brokers_for_stack,
            database_url,
            env,
            ports,
            children: HashMap::new(),
            logs: std::env::temp_dir().join(format!("taskstream-e2e-{}", &id[..12])),
            log_of: HashMap::new(),
            spawned: Default::default(),
            http,
            tokens: Tokens::default(),
            database,
            _topics: topics,
        };
        for s in [Svc::CommandApi, Svc::Projector, Svc::QueryApi] {
            stack.spawn(s)?;
        }
        for s in [Svc::CommandApi, Svc::Projector, Svc::QueryApi] {
            stack.wait_ready(s).await?;
        }
        Ok(stack)
    }

    pub fn url(&self, svc: Svc, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.ports[&svc], path)
    }

    pub fn spawn(&mut self, svc: Svc) -> anyhow::Result<()> {
        let (child, log) = self.spawn_logged(svc, &[])?;
        self.children.insert(svc, child);
        self.log_of.extend(log.map(|l| (svc, l)));
        Ok(())
    }

    /// Starts an instance of `svc` with `env` on top of the stack's (e.g. a second projector with
    /// its own `PROJECTOR_ADDR` and `PROJECTOR_INSTANCE_ID`); the caller owns it (killed on drop).
    pub fn spawn_instance(&self, svc: Svc, env: &[(&str, &str)]) -> anyhow::Result<Child> {
        self.spawn_logged(svc, env).map(|(child, _)| child)
    }

    /// `spawn_instance`, and the file its output goes to (none with `TEST_LOG`: the terminal).
    fn spawn_logged(&self, svc: Svc, env: &[(&str, &str)]) -> anyhow::Result<(Child, Option<PathBuf>)> {
        let path = bin_dir().join(svc.binary());
        let (out, err, log) = if std::env::var("TEST_LOG").is_ok() {
            (Stdio::inherit(), Stdio::inherit(), None)
        } else {
            std::fs::create_dir_all(&self.logs)?;
            let n = self.spawned.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let log = self.logs.join(format!("{}-{n}.log", svc.binary()));
            let file = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
            (Stdio::from(file.try_clone()?), Stdio::from(file), Some(log))
        };
        let child = Command::new(&path)
            // Production rules for secrets, whoever runs the tests (./dev up sets TASKSTREAM_DEV).
            .env_remove("TASKSTREAM_DEV")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(env.iter().copied())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} (build it first: cargo build --bins)", path.display()))?;
        Ok((child, log))
    }

    pub async fn wait_ready(&mut self, svc: Svc) -> anyhow::Result<()> {
        let url = self.url(svc, "/readyz");
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some(child) = self.children.get_mut(&svc) {
                if let Some(status) = child.try_wait()? {
                    let said = match self.log_of.get(&svc) {
                        Some(log) => format!("; the end of its log, {}:\n{}", log.display(), tail(log, 30)),
                        None => String::new(),
                    };
                    bail!("{} exited with {status} before it was ready{said}", svc.binary());
                }
            }
            if let Ok(r) = self.http.get(&url).timeout(Duration::from_secs(2)).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("{} not ready after 90 s", svc.binary());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: no chance to finish anything.
    pub async fn kill(&mut self, svc: Svc) -> anyhow::Result<()> {
        if let Some(mut c) = self.children.remove(&svc) {
            c.kill().await?;
        }
        Ok(())
    }

    /// SIGTERM and wait for a graceful exit.
    pub async fn stop(&mut self, svc: Svc) -> anyhow::Result<()> {
        if let Some(mut c) = self.children.remove(&svc) {
            if let Some(pid) = c.id() {
                unsafe_kill(pid, "TERM");
            }
            tokio::time::timeout(Duration::from_secs(20), c.wait()).await.context("graceful stop timed out")??;
        }
        Ok(())
    }

    /// Sets an environment variable of the services started from now on (`spawn`, `restart`,
    /// `projector_cli`); running ones keep theirs (e.g. a projector with another secret than the
    /// command API).
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.to_owned()));
    }

    /// Starts `svc` again and waits until it is ready. A running instance is killed first and
    /// waited for: started while the old one still listened, the new one would exit with "address
    /// already in use" (a CI run lost a test to that race).
    pub async fn restart(&mut self, svc: Svc) -> anyhow::Result<()> {
        self.kill(svc).await?;
        self.spawn(svc)?;
        self.wait_ready(svc).await
    }

    /// A token of `user` that the stack's services accept.
    pub fn token(&self, user: &str) -> String {
        self.tokens.user(user)
    }

    /// Sends a command; returns (status, headers, body).
    pub async fn command(
        &self,
        user: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<(u16, reqwest::header::HeaderMap, Value)> {
        let mut req = self.http.request(method, self.url(Svc::CommandApi, path)).bearer_auth(self.token(user));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await?;
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let text = res.text().await?;
        let body = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
        Ok((status, headers, body))
    }

    /// Sends a command the way a well-behaved client does: with an Idempotency-Key, retrying a 503
    /// (the log unavailable, a partition moving to another instance) after its `Retry-After`, for up
    /// to a minute. Returns the last answer.
    pub async fn command_retrying(
        &self,
        user: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, reqwest::header::HeaderMap, Value)> {
        let key = Uuid::new_v4().to_string();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (s, h, b) = self.command(user, method.clone(), path, body.clone(), &[("idempotency-key", &key)]).await?;
            if s != 503 || Instant::now() > deadline {
                return Ok((s, h, b));
            }
            let wait = h.get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok()).unwrap_or(1).min(1);
            tokio::time::sleep(Duration::from_secs(wait)).await;
        }
    }

    /// Creates a task (retrying a 503 like `command_retrying`); fails unless it is created.
    pub async fn create(&self, user: &str, body: Value) -> anyhow::Result<Value> {
        let (s, _, b) = self.command_retrying(user, reqwest::Method::POST, "/v1/tasks", Some(body)).await?;
        if s != 201 {
            bail!("create answered {s}: {b}");
        }
        Ok(b)
    }

    /// Runs a GraphQL query; with `token`, as of that consistency position.
    pub async fn graphql(&self, user: &str, query: &str, variables: Value, consistency: Option<&str>) -> anyhow::Result<(u16, Value)> {
        let mut req =
            self.http.post(self.url(Svc::QueryApi, "/graphql")).bearer_auth(self.token(user)).json(&json!({ "query": query, "variables": variables }));
        if let Some(t) = consistency {
            req = req.header("X-Consistency-Token", t);
        }
        let res = req.send().await?;
        let status = res.status().as_u16();
        let body: Value = res.json().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    /// A GraphQL query that must succeed without errors; returns `data`.
    pub async fn query(&self, user: &str, query: &str, variables: Value, consistency: Option<&str>) -> anyhow::Result<Value> {
        let (status, body) = self.graphql(user, query, variables, consistency).await?;
        if status != 200 || body.get("errors").is_some_and(|e| !e.is_null()) {
            bail!("GraphQL answered {status}: {body}");
        }
        Ok(body["data"].clone())
    }

    /// The end of the log (high watermark) per partition.
    pub async fn log_end(&self) -> anyhow::Result<std::collections::BTreeMap<i32, i64>> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let consumer: BaseConsumer = rdkafka::ClientConfig::new().set("bootstrap.servers", &self.brokers).create()?;
        let topic = self.topic.clone();
        tokio::task::spawn_blocking(move || {
            let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
            let mut out = std::collections::BTreeMap::new();
            for p in md.topics()[0].partitions() {
                let (_, high) = consumer.fetch_watermarks(&topic, p.id(), Duration::from_secs(10))?;
                out.insert(p.id(), high);
            }
            Ok(out)
        })
        .await?
    }

    /// The offsets every projection has applied (the minimum over projections) per partition.
    pub async fn applied(&self) -> anyhow::Result<std::collections::BTreeMap<i32, i64>> {
        let mut db = self.db().await?;
        let rows: Vec<(i32, i64)> = sqlx::query_as("SELECT partition, min(next_offset) FROM projection_offsets GROUP BY partition").fetch_all(&mut db).await?;
        Ok(rows.into_iter().collect())
    }

    /// Whether the projections have applied the whole log (read-committed ends may sit one
    /// transaction marker past the last record, which is applied too).
    pub async fn caught_up(&self) -> anyhow::Result<Option<std::collections::BTreeMap<i32, i64>>> {
        let end = self.log_end().await?;
        let applied = self.applied().await?;
        let ok = end.iter().all(|(p, high)| applied.get(p).copied().unwrap_or(0) + 1 >= *high);
        Ok(ok.then_some(applied))
    }

    /// Whether the service is still running (it did not exit by itself).
    pub fn is_running(&mut self, svc: Svc) -> bool {
        self.children.get_mut(&svc).is_some_and(|c| c.try_wait().is_ok_and(|s| s.is_none()))
    }

    /// The projector's command line (`rebuild`, `status`, `dlq ...`) against this stack, without a
    /// terminal; output captured.
    pub fn projector_cli(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin_dir().join(Svc::Projector.binary()));
        c.args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        c
    }

    /// A connection to this stack's own database.
    pub async fn db(&self) -> anyhow::Result<sqlx::PgConnection> {
        sqlx_connect(&self.database_url).await
    }

    /// Stops everything and drops the database.
    pub async fn cleanup(mut self) -> anyhow::Result<()> {
        for s in [Svc::CommandApi, Svc::Projector, Svc::QueryApi] {
            self.kill(s).await?;
        }
        let _ = std::fs::remove_dir_all(&self.logs);
        self.database.drop_database().await
    }
}

/// The last `lines` lines of a file (what a service said before it exited).
fn tail(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("(unreadable: {e})"));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn unsafe_kill(pid: u32, signal: &str) {
    let _ = std::process::Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status();
}

async fn sqlx_connect(url: &str) -> anyhow::Result<sqlx::PgConnection> {
    use sqlx::Connection;
    Ok(sqlx::PgConnection::connect(url).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_never_given_twice_and_stay_out_of_the_ephemeral_range() {
        let low = ephemeral_ports_start();
        let ports: Vec<u16> = (0..500).map(|_| free_port()).collect();
        let distinct: std::collections::HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "a port was given twice");
        // (Unless the range starts below 2 000: then they come from bind(0).)
        assert!(low < 2_000 || ports.iter().all(|p| *p < low), "a port in the ephemeral range (from {low}): {ports:?}");
        // Each was free when given: it can be listened on now (nobody took it meanwhile).
        for p in &ports[..20] {
            std::net::TcpListener::bind(("127.0.0.1", *p)).expect("a port given as free is free");
        }
    }
}
