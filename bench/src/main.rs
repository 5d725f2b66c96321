//! `loadgen`: measures taskstream against the local stack and writes the numbers as JSON.
//!
//! Subcommands measure one thing each; `all` runs the suite in order. Latency is measured
//! open-loop: requests are sent at their scheduled times whatever the answers do, and each latency
//! is taken from the scheduled send time (no coordinated omission), into an HdrHistogram.

mod backlog;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};

#[derive(Parser, Clone)]
#[command(name = "loadgen", about = "taskstream benchmarks")]
struct Cli {
    #[arg(long, env = "COMMAND_API_URL", default_value = "http://127.0.0.1:8080")]
    command_api: String,
    #[arg(long, env = "QUERY_API_URL", default_value = "http://127.0.0.1:8081")]
    query_api: String,
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    brokers: String,
    /// librdkafka properties of its own Kafka clients (KAFKA_CONFIG_FILE / KAFKA_CONFIG_*; see
    /// the README).
    #[arg(long = "kafka-config-file", env = "KAFKA_CONFIG_FILE", value_name = "PATH", default_value = "", hide_default_value = true, value_parser = platform::kafka_properties::ClientProperties::parse_arg)]
    kafka_config: platform::kafka_properties::ClientProperties,
    #[arg(long, env = "AUTH_JWT_SECRET", default_value = "taskstream-dev-secret")]
    secret: String,
    /// PostgreSQL (an admin URL: the backlog phase creates its own database) for the COPY limit and
    /// the backlog phase.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// How many times the short phases run (the report gives medians and the spread).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Scale every run down (smoke runs in tests): 1.0 = the full suite.
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Also write the results here as JSON.
    #[arg(long)]
    json_out: Option<std::path::PathBuf>,
    /// Also write a Markdown report here (BENCHMARKS.md).
    #[arg(long)]
    report: Option<std::path::PathBuf>,
    /// The process ids to read resident memory from after the run: NAME=PID (repeatable).
    #[arg(long = "rss", value_parser = parse_kv)]
    rss: Vec<(String, String)>,
    /// More processes whose CPU share is measured with the services' (e.g. the broker and
    /// PostgreSQL on the same box): NAME=PID (repeatable). A process' CPU includes its children's
    /// (PostgreSQL's backends are children of its postmaster), except those measured on their own.
    #[arg(long = "cpu", value_parser = parse_kv)]
    cpu: Vec<(String, String)>,
    /// Lines about the machine and the command, copied into the report (repeatable).
    #[arg(long = "about")]
    about: Vec<String>,
    /// The GraphQL phase reads this user's tasks as they are (e.g. rows seeded straight into the
    /// read model) instead of creating 500 through the command API, so the query API can be
    /// measured alone.
    #[arg(long)]
    graphql_user: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Clone, Copy)]
enum Cmd {
    /// Raw rdkafka produce (idempotent, acks=all) of event-sized records.
    KafkaRaw,
    /// Accepted commands per second at saturation (40% create, 40% update, 15% complete, 5% delete).
    Commands,
    /// Command latency and command -> visible-in-GraphQL latency at an open-loop 1 000/s.
    Latency,
    /// GraphQL queries per second (a 50-item tasks page, and task(id)), then the page's latency at an
    /// open-loop 1 000/s.
    Graphql,
    /// The PostgreSQL limit: binary COPY of read-model-shaped rows.
    PgCopy,
    /// The peer: the same aggregate on cqrs-es + postgres-es (bin `peer-cqrs-es`), same load.
    Peer,
    /// Two more command APIs: saturation over three instances, then the failover time of a kill -9.
    ScaleOut,
    /// 10 000 reminders due within one minute, then 10 000 due at the same instant: how late they fire.
    Reminders,
    /// A backlog of 1 000 000 events: projector catch-up, rebuild, command API restore, memory.
    Backlog,
    /// Everything above, in order; prints one JSON object.
    All,
    /// Timings of the phases of small Kafka transactions (diagnostics, not part of `all`).
    TxnProbe,
}

struct Ctx {
    http: reqwest::Client,
    cli: Cli,
    auth: platform::auth::JwtAuth,
}

impl Ctx {
    fn token(&self, user: &str) -> String {
        self.auth.issue(user, 7200)
    }
    fn n(&self, full: usize) -> usize {
        ((full as f64 * self.cli.scale) as usize).max(1)
    }
    fn secs(&self, full: f64) -> Duration {
        Duration::from_secs_f64((full * self.cli.scale).max(0.5))
    }
    /// The processes whose CPU a phase reports: `services`, loadgen itself, and the `--cpu` ones.
    fn measured(&self, services: &[(String, String)]) -> Vec<(String, String)> {
        let mut procs = services.to_vec();
        procs.push(("loadgen".into(), std::process::id().to_string()));
        procs.extend(self.cli.cpu.iter().cloned());
        procs
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let auth = platform::auth::JwtAuth::new(&platform::secret::Secret::new(cli.secret.clone()));
    // Every idle connection is kept for the next request (reqwest's default). With at most 256 kept,
    // an open-loop phase whose requests in flight passed 256 (any hiccup at 1 000/s) closed a
    // connection after each answer and opened a new one for each request: thousands of connection
    // set-ups a second on a busy box, which kept the latency up long after the hiccup.
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
    let cmd = cli.cmd;
    let ctx = Arc::new(Ctx { http, cli, auth });
    let run = |c: Cmd| matches!(cmd, Cmd::All) || std::mem::discriminant(&cmd) == std::mem::discriminant(&c);
    if matches!(cmd, Cmd::TxnProbe) {
        return txn_probe(&ctx).await;
    }
    // The short phases run `repeat` times; so do the backlog's catch-ups (over one log: producing it
    // takes a while), while its rebuild and restores run once.
    let mut runs: Vec<BTreeMap<String, Value>> = Vec::new();
    for i in 0..ctx.cli.repeat.max(1) {
        eprintln!("--- run {} of {}", i + 1, ctx.cli.repeat.max(1));
        let mut one = BTreeMap::new();
        if run(Cmd::KafkaRaw) {
            one.extend(kafka_raw(&ctx).await?);
        }
        if run(Cmd::PgCopy) {
            one.extend(backlog::pg_copy(&ctx).await?);
        }
        if run(Cmd::Commands) {
            one.extend(commands(&ctx).await?);
        }
        if run(Cmd::Latency) {
            wait_caught_up(&ctx).await?;
            one.extend(latency(&ctx).await?);
        }
        if run(Cmd::Graphql) {
            wait_caught_up(&ctx).await?;
            one.extend(graphql(&ctx).await?);
        }
        if run(Cmd::Peer) {
            one.extend(peer(&ctx).await?);
        }
        runs.push(one);
    }
    let (mut out, mut spread) = medians(&runs);
    if run(Cmd::ScaleOut) {
        out.extend(scale_out(&ctx).await?);
    }
    if run(Cmd::Reminders) {
        out.extend(reminders(&ctx).await?);
    }
    if run(Cmd::Backlog) {
        let (backlog, backlog_spread) = backlog::backlog(&ctx).await?;
        out.extend(backlog);
        spread.extend(backlog_spread);
    }
    // The services' memory after the run, except where a phase measured that key itself: the
    // backlog's `rss_mb_projector` is the median of its catch-ups (with their range), which the
    // benchmark's own projector must not replace.
    for (name, pid) in &ctx.cli.rss {
        if let Some(mb) = rss_mb(pid) {
            out.entry(format!("rss_mb_{name}")).or_insert_with(|| round(mb));
        }
    }
    if !spread.is_empty() {
        out.insert("spread".into(), json!(spread));
        out.insert("runs".into(), json!(runs.len()));
    }
    let text = serde_json::to_string_pretty(&out)?;
    println!("{text}");
    if let Some(p) = &ctx.cli.json_out {
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(p, &text)?;
    }
    if let Some(p) = &ctx.cli.report {
        std::fs::write(p, report(&out, &ctx.cli.about))?;
    }
    Ok(())
}

/// The peer (cqrs-es + postgres-es) on a fresh database, driven by the same saturation and open-loop
/// phases as the command API.
async fn peer(ctx: &Arc<Ctx>) -> anyhow::Result<BTreeMap<String, Value>> {
    use sqlx::Connection;
    let admin = ctx.cli.database_url.clone().context("--database-url (DATABASE_URL) is needed for the peer")?;
    let db = format!("bench_peer_{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let mut conn = sqlx::PgConnection::connect(&admin).await?;
    sqlx::query(&format!("CREATE DATABASE {db}")).execute(&mut conn).await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let exe = std::env::current_exe()?.with_file_name("peer-cqrs-es");
    let mut child = tokio::process::Command::new(&exe)
        .env("DATABASE_URL", format!("{}/{db}", admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b)))
        .env("PEER_ADDR", format!("127.0.0.1:{port}"))
        .env("AUTH_JWT_SECRET", &ctx.cli.secret)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    let url = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    while !ctx.http.get(format!("{url}/readyz")).send().await.is_ok_and(|r| r.status().is_success()) {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(30), "the peer did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut cli = ctx.cli.clone();
    cli.command_api = url;
    let peer_ctx = Arc::new(Ctx { http: ctx.http.clone(), cli, auth: ctx.auth.clone() });
    let sat = commands(&peer_ctx).await?;
    let lat = latency(&peer_ctx).await?;
    child.kill().await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).execute(&mut conn).await?;
    let mut out = BTreeMap::new();
    out.insert("peer_cqrs_es_commands_per_s".into(), sat["command_throughput_per_s"].clone());
    out.insert("peer_cqrs_es_p50_ms_at_1k".into(), lat["command_p50_ms_at_1k"].clone());
    out.insert("peer_cqrs_es_p99_ms_at_1k".into(), lat["command_p99_ms_at_1k"].clone());
    eprintln!("peer (cqrs-es + postgres-es): {out:?}");
    Ok(out)
}

/// The median of each key over the runs, and its spread (min, max) when there was more than one.
fn medians(runs: &[BTreeMap<String, Value>]) -> (BTreeMap<String, Value>, BTreeMap<String, [f64; 2]>) {
    let mut values: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for r in runs {
        for (k, v) in r {
            if let Some(x) = v.as_f64() {
                values.entry(k.clone()).or_default().push(x);
            }
        }
    }
    let mut out = BTreeMap::new();
    let mut spread = BTreeMap::new();
    for (k, mut xs) in values {
        xs.sort_by(f64::total_cmp);
        let mid = xs.len() / 2;
        let median = if xs.len() % 2 == 1 { xs[mid] } else { (xs[mid - 1] + xs[mid]) / 2.0 };
        out.insert(k.clone(), round(median));
        if xs.len() > 1 {
            spread.insert(k, [xs[0], xs[xs.len() - 1]]);
        }
    }
    (out, spread)
}

/// Waits until the projector has applied the whole log (a phase must not measure the backlog
/// the previous phase left behind).
async fn wait_caught_up(ctx: &Ctx) -> anyhow::Result<()> {
    let started = Instant::now();
    let token = ctx.token("bench-probe");
    loop {
        let v: Value = ctx
            .http
            .post(format!("{}/graphql", ctx.cli.query_api))
            .bearer_auth(&token)
            .json(&json!({"query": "{ projections { lag } }"}))
            .send()
            .await?
            .json()
            .await?;
        let lag: i64 = v["data"]["projections"].as_array().map(|a| a.iter().filter_map(|p| p["lag"].as_i64()).max().unwrap_or(0)).unwrap_or(0);
        if lag == 0 {
            eprintln!("projector caught up after {:?}", started.elapsed());
            return Ok(());
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(600), "the projector did not catch up within 10 minutes (lag {lag})");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())).ok_or_else(|| format!("expected NAME=VALUE, got {s}"))
}

/// Resident memory of a process in MiB (Linux).
fn rss_mb(pid: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn report(out: &BTreeMap<String, Value>, about: &[String]) -> String {
    let goals: &[(&str, &str)] = &[
        ("kafka_raw_produce_per_s", "the limit: raw rdkafka, idempotent, acks=all, event-sized records"),
        ("pg_raw_copy_rows_per_s", "the limit: binary COPY of task_history-shaped rows"),
        ("command_throughput_per_s", "goal: >= 20 000 and >= 25% of the raw produce limit; projector stopped (the write path alone)"),
        ("command_throughput_per_s_with_projector", "the same with the projector running (the whole system on the same cores)"),
        ("command_throughput_per_s_3x", "three command APIs sharing the partitions on this box (projector stopped)"),
        ("commands_per_transaction_command_throughput_per_s", "accepted commands per Kafka transaction at saturation (256 connections, 12 partitions)"),
        ("transactions_per_s_command_throughput_per_s", "Kafka transactions committed a second at saturation (two slots: 2 / the transaction time)"),
        ("failover_seconds", "goal: <= 10; kill -9 of one of three command APIs to the first 2xx on one of its partitions"),
        ("command_p50_ms_at_1k", "open loop, 1 000/s, from the scheduled send time"),
        ("command_p99_ms_at_1k", "goal: <= 10"),
        ("command_p999_ms_at_1k", ""),
        ("e2e_p50_ms_at_1k", "command sent -> visible through GraphQL"),
        ("e2e_p99_ms_at_1k", "goal: <= 50"),
        ("transactions_per_s_at_1k", "Kafka transactions the command API committed a second meanwhile (its own metrics)"),
        ("transaction_mean_ms_at_1k", "their mean time (a partition's commands wait while the transactions of the partitions ahead of it hold the slots)"),
        ("projector_events_per_s", "goal: >= 40 000 (issue 10; >= 25 000 before); 1M-event backlog, from process start (median of the catch-ups)"),
        ("rebuild_1m_seconds", "goal: <= 25 (issue 10; <= 60 before); `projector rebuild --yes` over the 1M-event log"),
        ("reminders_minute_max_seconds_late", "goal: <= 10; 10 000 reminders due evenly within one minute: the latest one's delay after its own time"),
        ("reminders_minute_p99_seconds_late", ""),
        ("reminders_fired_per_s", "10 000 reminders due at the same instant (the worst case), divided by the time until the last fired"),
        ("reminders_all_fired_seconds_after_due", "the same instant: the last one's delay"),
        ("command_api_restore_1m_seconds", "goal: <= 2; command API start to ready over the 1M-event log, from its snapshots"),
        ("command_api_restore_1m_from_log_seconds", "the first start over the 1M-event log (no snapshot yet: reads it all, then records snapshots)"),
        ("graphql_list_queries_per_s", "goal: >= 6 000; a 50-item tasks page, 64 clients"),
        ("graphql_task_queries_per_s", "task(id)"),
        ("graphql_list_p50_ms_at_1k", "open loop, 1 000 list queries/s (the 50-item page), from the scheduled send time"),
        ("graphql_list_p99_ms_at_1k", ""),
        ("peer_cqrs_es_commands_per_s", "the peer (cqrs-es + postgres-es), same load"),
        ("peer_cqrs_es_p99_ms_at_1k", "the peer, open loop 1 000/s"),
        ("rss_mb_command_api_1m_tasks", "after restoring the 1M-event log"),
        ("rss_mb_projector", "after applying the 1M-event backlog"),
    ];
    let spread = out.get("spread").cloned().unwrap_or(Value::Null);
    let runs = out.get("runs").and_then(Value::as_u64).unwrap_or(1);
    let mut md = String::from("# Benchmarks\n\n");
    for line in about {
        md.push_str(&format!("- {line}\n"));
    }
    md.push_str(&format!(
        "\nShort phases ran {runs} times: the value is the median, the range is min-max over the runs. The backlog phase \
         produced its 1M-event log once; the projector's catch-up over it ran as many times (each into an empty database), \
         the rebuild and the command API's restores once. Kafka, PostgreSQL, the services and the load generator share the \
         machine's cores.\n\n| key | value | range | note |\n| --- | --- | --- | --- |\n"
    ));
    for (k, v) in out.iter().filter(|(k, _)| *k != "spread" && *k != "runs") {
        let note = goals.iter().find(|(g, _)| g == k).map(|(_, n)| *n).unwrap_or("");
        let range = spread.get(k).and_then(Value::as_array).map(|r| format!("{}-{}", r[0], r[1])).unwrap_or_default();
        md.push_str(&format!("| `{k}` | {v} | {range} | {note} |\n"));
    }
    let f = |k: &str| out.get(k).and_then(Value::as_f64);
    md.push_str("\n## Ratios\n\n");
    for (name, a, b) in [
        ("commands / raw Kafka produce", "command_throughput_per_s", "kafka_raw_produce_per_s"),
        ("projector / raw PostgreSQL COPY", "projector_events_per_s", "pg_raw_copy_rows_per_s"),
        ("commands / cqrs-es peer", "command_throughput_per_s", "peer_cqrs_es_commands_per_s"),
        ("three command APIs / one", "command_throughput_per_s_3x", "command_throughput_per_s"),
    ] {
        match (f(a), f(b)) {
            (Some(x), Some(y)) if y > 0.0 => md.push_str(&format!("- {name}: {:.1}% ({x} / {y})\n", 100.0 * x / y)),
            _ => md.push_str(&format!("- {name}: not measured in this run\n")),
        }
    }
    md
}

/// A 12-partition topic on the benchmark's broker.
fn kafka_settings(ctx: &Ctx, topic: &str) -> platform::settings::KafkaSettings {
    platform::settings::KafkaSettings {
        kafka_brokers: ctx.cli.brokers.clone(),
        task_events_topic: topic.to_owned(),
        task_events_partitions: 12,
        task_events_replication: 1,
        kafka_config: ctx.cli.kafka_config.clone(),
        data_keys_erasure_bound_ms: 86_400_000,
    }
}

fn round(v: f64) -> Value {
    json!((v * 100.0).round() / 100.0)
}

async fn txn_probe(ctx: &Ctx) -> anyhow::Result<()> {
    use rdkafka::producer::Producer;
    let topic = format!("bench-txn-{}", uuid::Uuid::new_v4().simple());
    let settings = kafka_settings(ctx, &topic);
    platform::kafka::ensure_topics(&settings).await?;
    let mut cfg = platform::kafka::client_config(&settings, "bench-txn");
    cfg.set("transactional.id", format!("probe-{}", uuid::Uuid::new_v4())).set("linger.ms", "1");
    if let Ok(d) = std::env::var("PROBE_DEBUG") {
        platform::telemetry::init("loadgen");
        cfg.set("debug", d).set_log_level(rdkafka::config::RDKafkaLogLevel::Debug);
    }
    for kv in std::env::var("PROBE_CONFIG").unwrap_or_default().split(',').filter(|s| !s.is_empty()) {
        if let Some((k, v)) = kv.split_once('=') {
            cfg.set(k, v);
        }
    }
    let producer: FutureProducer = cfg.create()?;
    producer.init_transactions(Duration::from_secs(10))?;
    for i in 0..10 {
        let t0 = Instant::now();
        producer.begin_transaction()?;
        let per_txn: usize = std::env::var("PROBE_RECORDS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
        let mut fs = Vec::new();
        for j in 0..per_txn {
            let key = format!("k{j}");
            fs.push(producer.send_result(FutureRecord::to(&topic).key(&key).payload("v")).map_err(|(e, _)| e)?);
        }
        let f = futures::future::join_all(fs);
        let t1 = t0.elapsed();
        let _ = f.await;
        let t2 = t0.elapsed();
        producer.flush(Duration::from_secs(10))?;
        let t3 = t0.elapsed();
        producer.commit_transaction(Duration::from_secs(10))?;
        let t4 = t0.elapsed();
        eprintln!("txn {i}: send {t1:?} delivered {t2:?} flushed {t3:?} committed {t4:?}");
    }
    Ok(())
}

async fn kafka_raw(ctx: &Ctx) -> anyhow::Result<BTreeMap<String, Value>> {
    let topic = format!("bench-raw-{}", uuid::Uuid::new_v4().simple());
    let settings = kafka_settings(ctx, &topic);
    platform::kafka::ensure_topics(&settings).await?;
    let producer: FutureProducer =
        platform::kafka::client_config(&settings, "bench-raw").set("enable.idempotence", "true").set("acks", "all").set("linger.ms", "1").create()?;
    // A task.created value with CloudEvents headers is about 350 bytes; send the same size.
    let payload = vec![b'x'; 350];
    let n = ctx.n(300_000);
    let started = Instant::now();
    let mut pending = futures::stream::FuturesUnordered::new();
    for i in 0..n {
        let key = (i % 10_000).to_string();
        loop {
            match producer.send_result(FutureRecord::to(&topic).key(&key).payload(&payload)) {
                Ok(f) => {
                    pending.push(f);
                    break;
                }
                Err(_) => {
                    use futures::StreamExt;
                    pending.next().await;
                }
            }
        }
    }
    use futures::StreamExt;
    while let Some(r) = pending.next().await {
        if !matches!(r, Ok(Ok(_))) {
            anyhow::bail!("a raw produce failed");
        }
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    drop(producer);
    platform::kafka::delete_topics(&settings).await;
    eprintln!("kafka_raw_produce_per_s = {rate:.0} ({n} records)");
    Ok(BTreeMap::from([("kafka_raw_produce_per_s".into(), round(rate))]))
}

/// Creates `n` tasks for `user`; returns their ids.
async fn seed(ctx: &Arc<Ctx>, user: &str, n: usize) -> anyhow::Result<Vec<String>> {
    let token = ctx.token(user);
    let ids = Arc::new(tokio::sync::Mutex::new(Vec::with_capacity(n)));
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..32 {
        let (ctx, ids, next, token) = (ctx.clone(), ids.clone(), next.clone(), token.clone());
        workers.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let r: Value = ctx
                    .http
                    .post(format!("{}/v1/tasks", ctx.cli.command_api))
                    .bearer_auth(&token)
                    .json(&json!({"title": "seeded", "due_at": "2030-01-01T00:00:00Z", "tags": ["bench"]}))
                    .send()
                    .await?
                    .json()
                    .await?;
                ids.lock().await.push(r["task_id"].as_str().context("no task_id")?.to_owned());
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for w in workers {
        w.await??;
    }
    let ids = ids.lock().await.clone();
    Ok(ids)
}

/// What a command of the mix answered.
struct Sent {
    accepted: bool,
    /// The consistency token of the answer.
    position: Option<String>,
    /// The task the command was about.
    task_id: Option<String>,
}

/// One command of the realistic mix.
async fn mixed_command(ctx: &Ctx, token: &str, ids: &[String], i: u64) -> anyhow::Result<Sent> {
    mixed_command_at(ctx, &ctx.cli.command_api, token, ids, i).await
}

/// One command of the mix, sent to the command API at `base`.
async fn mixed_command_at(ctx: &Ctx, base: &str, token: &str, ids: &[String], i: u64) -> anyhow::Result<Sent> {
    let id = &ids[(i as usize * 7919) % ids.len()];
    let req = match i % 20 {
        0..=7 => ctx.http.post(format!("{base}/v1/tasks")).json(&json!({"title": format!("task {i}"), "priority": "high", "tags": ["a", "b"]})),
        8..=15 => ctx.http.patch(format!("{base}/v1/tasks/{id}")).json(&json!({"title": format!("edit {i}")})),
        16..=18 => {
            if i.is_multiple_of(2) {
                ctx.http.post(format!("{base}/v1/tasks/{id}/complete"))
            } else {
                ctx.http.post(format!("{base}/v1/tasks/{id}/reopen"))
            }
        }
        _ => ctx.http.post(format!("{base}/v1/tasks")).json(&json!({"title": "short-lived"})),
    };
    let res = req.bearer_auth(token).send().await?;
    let status = res.status();
    let body: Value = res.json().await.unwrap_or(Value::Null);
    // 409s (completing a completed task) are correct refusals of the mix, not errors.
    Ok(Sent { accepted: status.is_success(), position: body["position"].as_str().map(str::to_owned), task_id: body["task_id"].as_str().map(str::to_owned) })
}

/// Accepted commands per second at saturation, with the projector stopped (SIGSTOP: the write path
/// alone) and then running (the whole system sharing the cores), with each process' CPU share.
async fn commands(ctx: &Arc<Ctx>) -> anyhow::Result<BTreeMap<String, Value>> {
    let procs = ctx.cli.rss.clone();
    let projector = procs.iter().find(|(n, _)| n == "projector").map(|(_, p)| p.clone());
    let bases = [ctx.cli.command_api.clone()];
    if let Some(p) = &projector {
        signal(p, "STOP");
    }
    let alone = saturate(ctx, &bases, "command_throughput_per_s", &procs).await;
    if let Some(p) = &projector {
        signal(p, "CONT");
    }
    let mut out = alone?;
    if projector.is_some() {
        wait_caught_up(ctx).await?;
        out.extend(saturate(ctx, &bases, "command_throughput_per_s_with_projector", &procs).await?);
    }
    Ok(out)
}

fn signal(pid: &str, sig: &str) {
    let _ = std::process::Command::new("kill").arg(format!("-{sig}")).arg(pid).status();
}

/// CPU time (user + system) of a process so far, in seconds (Linux, 100 clock ticks per second),
/// with its children's: the live ones' (except those in `apart`, measured on their own: the extra
/// command APIs the load generator starts), and the exited ones' it waited for.
fn cpu_seconds(pid: &str, apart: &[&str]) -> Option<f64> {
    let own = proc_stat(pid)?;
    let ticks = |f: &[String], i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let mut total = ticks(&own, 11) + ticks(&own, 12) + ticks(&own, 13) + ticks(&own, 14);
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(child) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit()) && !apart.contains(n)) else { continue };
        if let Some(f) = proc_stat(child).filter(|f| f.get(1).is_some_and(|ppid| ppid == pid)) {
            total += ticks(&f, 11) + ticks(&f, 12);
        }
    }
    Some(total / 100.0)
}

/// The fields of `/proc/<pid>/stat` after the command name: state, ppid, ... (utime is index 11).
fn proc_stat(pid: &str) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(stat.get(stat.rfind(')')? + 2..)?.split_whitespace().map(str::to_owned).collect())
}

/// Each process' CPU share over a phase: `start` before it, `finish` after it.
pub(crate) struct CpuMeter {
    procs: Vec<(String, String)>,
    before: Vec<Option<f64>>,
    started: Instant,
}

impl CpuMeter {
    /// `procs`: NAME=PID pairs (a process' children count as its own unless they are among
    /// `procs` too, see [`cpu_seconds`]).
    pub(crate) fn start(procs: Vec<(String, String)>) -> Self {
        let apart = Self::pids(&procs);
        let before = procs.iter().map(|(_, p)| cpu_seconds(p, &apart)).collect();
        Self { procs, before, started: Instant::now() }
    }

    fn pids(procs: &[(String, String)]) -> Vec<&str> {
        procs.iter().map(|(_, p)| p.as_str()).collect()
    }

    /// Adds `cpu_pct_<key>_<name>` (% of one core since `start`) to `out` for each process, and
    /// returns them as text for the log line.
    pub(crate) fn finish(self, key: &str, out: &mut BTreeMap<String, Value>) -> String {
        let elapsed = self.started.elapsed().as_secs_f64();
        let mut shares = Vec::new();
        let apart = Self::pids(&self.procs);
        for ((name, pid), before) in self.procs.iter().zip(self.before) {
            if let (Some(b), Some(a)) = (before, cpu_seconds(pid, &apart)) {
                let pct = 100.0 * (a - b) / elapsed;
                shares.push(format!("{name} {pct:.0}%"));
                out.insert(format!("cpu_pct_{key}_{name}"), round(pct));
            }
        }
        shares.join(", ")
    }
}

/// Saturates the command APIs at `bases` (256 connections spread over them) with the mix; returns
/// `key` = accepted commands/s and `cpu_pct_<key>_<process>` = each process' CPU (% of one core).
async fn saturate(ctx: &Arc<Ctx>, bases: &[String], key: &str, procs: &[(String, String)]) -> anyhow::Result<BTreeMap<String, Value>> {
    let user = format!("bench-sat-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let ids = seed(ctx, &user, ctx.n(2_000)).await?;
    let ids = Arc::new(ids);
    let token = ctx.token(&user);
    let accepted = Arc::new(AtomicU64::new(0));
    let counter = Arc::new(AtomicU64::new(0));
    let duration = ctx.secs(20.0);
    let cpu = CpuMeter::start(ctx.measured(procs));
    let appends_before = appends_over(ctx, bases).await;
    let started = Instant::now();
    let deadline = started + duration;
    let mut workers = Vec::new();
    for w in 0..256 {
        let (ctx, ids, token, accepted, counter) = (ctx.clone(), ids.clone(), token.clone(), accepted.clone(), counter.clone());
        let base = bases[w % bases.len()].clone();
        workers.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let i = counter.fetch_add(1, Ordering::Relaxed);
                if mixed_command_at(&ctx, &base, &token, &ids, i).await.is_ok_and(|s| s.accepted) {
                    accepted.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for w in workers {
        w.await?;
    }
    let rate = accepted.load(Ordering::Relaxed) as f64 / duration.as_secs_f64();
    let mut out = BTreeMap::from([(key.to_owned(), round(rate))]);
    let shares = cpu.finish(key, &mut out);
    // The Kafka transactions the instances committed meanwhile, and the accepted commands per
    // transaction: 256 connections share the 12 partitions, so ~21 commands wait on each.
    let mut batches = String::new();
    if let (Some((_, n0)), Some((_, n1))) = (appends_before, appends_over(ctx, bases).await) {
        let n = n1 - n0;
        if n > 0.0 {
            let (per_s, per_txn) = (n / started.elapsed().as_secs_f64(), accepted.load(Ordering::Relaxed) as f64 / n);
            out.insert(format!("transactions_per_s_{key}"), round(per_s));
            out.insert(format!("commands_per_transaction_{key}"), round(per_txn));
            batches = format!("; {per_s:.0} transactions/s of {per_txn:.1} commands");
        }
    }
    eprintln!("{key} = {rate:.0} (256 connections over {} instance(s), {duration:?}; CPU: {shares}{batches})", bases.len());
    Ok(out)
}

/// Two more command APIs beside the benchmark's: the saturation over three instances sharing the
/// partitions (`command_throughput_per_s_3x`), then `kill -9` of one and the time to the first 2xx
/// on one of its partitions (`failover_seconds`), then a graceful stop of the other.
async fn scale_out(ctx: &Arc<Ctx>) -> anyhow::Result<BTreeMap<String, Value>> {
    // The extra instances run with the benchmark instance's own environment (same topic, group,
    // secrets), read from /proc.
    let Some(main_pid) = ctx.cli.rss.iter().find(|(n, _)| n == "command_api").map(|(_, p)| p.clone()) else {
        eprintln!("scale-out skipped: no --rss command_api=PID to copy the instance's environment from");
        return Ok(BTreeMap::new());
    };
    let environ = std::fs::read(format!("/proc/{main_pid}/environ")).context("reading the command API's environment")?;
    let env: Vec<(String, String)> = environ
        .split(|b| *b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok()?.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .filter(|(k, _)| !k.starts_with("COMMAND_API_"))
        .collect();
    let mut extras = Vec::new();
    let mut bases = vec![ctx.cli.command_api.clone()];
    let mut procs: Vec<(String, String)> = ctx.cli.rss.iter().filter(|(n, _)| n != "command_api").cloned().collect();
    procs.extend(ctx.cli.rss.iter().filter(|(n, _)| n == "command_api").map(|(_, p)| ("command_api_0".to_owned(), p.clone())));
    for i in 1..=2 {
        let port = backlog::free_port();
        let child = tokio::process::Command::new(backlog::bin("command-api"))
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("COMMAND_API_ADDR", format!("127.0.0.1:{port}"))
            .env("COMMAND_API_INSTANCE_ID", format!("bench-command-api-{i}"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        procs.push((format!("command_api_{i}"), child.id().map(|p| p.to_string()).unwrap_or_default()));
        bases.push(format!("http://127.0.0.1:{port}"));
        extras.push(child);
    }
    let started = Instant::now();
    let spread = loop {
        if let Some(o) = owners(ctx).await {
            if o.values().collect::<std::collections::HashSet<_>>().len() == 3 {
                break o;
            }
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(120), "three command APIs did not share the partitions within 2 minutes");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("three command APIs own the partitions after {:.1} s: {spread:?}", started.elapsed().as_secs_f64());
    let projector = ctx.cli.rss.iter().find(|(n, _)| n == "projector").map(|(_, p)| p.clone());
    if let Some(p) = &projector {
        signal(p, "STOP");
    }
    let measured = saturate(ctx, &bases, "command_throughput_per_s_3x", &procs).await;
    if let Some(p) = &projector {
        signal(p, "CONT");
    }
    let mut out = measured?;

    // A task in a partition of instance 1 (created through it: an instance picks new ids in its own
    // partitions), then kill -9 instance 1.
    let victim = "bench-command-api-1";
    let token = ctx.token("bench-failover");
    let mut task = None;
    for _ in 0..500 {
        let v: Value = ctx.http.post(format!("{}/v1/tasks", bases[1])).bearer_auth(&token).json(&json!({"title": "failover"})).send().await?.json().await?;
        let partition = v["position"].as_str().and_then(|t| platform::position::Position::from_token(t).ok()).map(|p| p.partition as i64);
        if partition.is_some_and(|p| spread.get(&p).is_some_and(|o| o == victim)) {
            task = v["task_id"].as_str().map(str::to_owned);
            break;
        }
    }
    let task = task.context("no task landed in the victim's partitions")?;
    let mut first = extras.remove(0);
    first.kill().await?;
    let killed = Instant::now();
    loop {
        let r = ctx.http.patch(format!("{}/v1/tasks/{task}", ctx.cli.command_api)).bearer_auth(&token).json(&json!({"title": "moved"})).send().await;
        if r.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        anyhow::ensure!(killed.elapsed() < Duration::from_secs(120), "the killed instance's partition was not served again within 2 minutes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let failover = killed.elapsed().as_secs_f64();
    eprintln!("failover_seconds = {failover:.2} (kill -9 to the first 2xx on a moved partition)");
    out.insert("failover_seconds".into(), round(failover));
    for mut c in extras {
        if let Some(pid) = c.id() {
            signal(&pid.to_string(), "TERM");
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), c.wait()).await;
    }
    // The benchmark's own instance owns everything again before the next phase.
    let started = Instant::now();
    while owners(ctx).await.is_none_or(|o| o.values().collect::<std::collections::HashSet<_>>().len() != 1) {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(120), "the partitions did not come back to the benchmark's command API");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(out)
}

/// Both reminder loads: `n` reminders due within one minute (the issue's case: each must fire within
/// 10 s of its own time), then `n` due at the same instant (the worst case: how fast the whole burst
/// goes). Each is measured from the notification rows, whose time is the reminder command's.
async fn reminders(ctx: &Arc<Ctx>) -> anyhow::Result<BTreeMap<String, Value>> {
    let Some(url) = ctx.cli.database_url.clone() else {
        eprintln!("reminders skipped: no --database-url (the projector's database) to count notifications in");
        return Ok(BTreeMap::new());
    };
    let mut out = BTreeMap::new();
    let n = ctx.n(10_000);
    let minute = reminder_burst(ctx, &url, n, ctx.secs(60.0)).await?;
    eprintln!("reminders due within one minute: {n} fired, the latest {:.2} s after its time (p99 {:.2} s)", minute.max_late, minute.p99_late);
    out.insert("reminders_minute_max_seconds_late".to_owned(), round(minute.max_late));
    out.insert("reminders_minute_p99_seconds_late".to_owned(), round(minute.p99_late));
    let instant = reminder_burst(ctx, &url, n, Duration::ZERO).await?;
    eprintln!("reminders due at one instant: {n} fired, the last {:.2} s after they were due", instant.max_late);
    out.insert("reminders_fired_per_s".to_owned(), round(n as f64 / instant.max_late.max(0.001)));
    out.insert("reminders_all_fired_seconds_after_due".to_owned(), round(instant.max_late));
    Ok(out)
}

/// How late the reminders of one burst fired, in seconds after their own time.
struct Lateness {
    max_late: f64,
    p99_late: f64,
}

/// Creates `n` tasks of a new user whose reminders fall due evenly over `spread` (all at one instant
/// when it is zero), starting a little after the last create; waits until each has its notification
/// and measures every one's lateness (notification time minus remind time).
async fn reminder_burst(ctx: &Arc<Ctx>, url: &str, n: usize, spread: Duration) -> anyhow::Result<Lateness> {
    use sqlx::Connection;
    let user = format!("bench-remind-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let token = ctx.token(&user);
    // Creating them takes a while (10 000 took over 30 s on a loaded box): the first reminder is
    // due well after the last create.
    let lead = Duration::from_secs_f64(10.0 + n as f64 / 200.0);
    let first = chrono::Utc::now() + chrono::Duration::from_std(lead)?;
    let first = chrono::DateTime::from_timestamp(first.timestamp() + 1, 0).context("a valid instant")?;
    let step = spread.as_secs_f64() / n as f64;
    // Whole milliseconds: the remind time survives the JSON round trip exactly.
    let remind_at = move |i: usize| first + chrono::Duration::milliseconds((i as f64 * step * 1000.0) as i64);
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..32 {
        let (ctx, next, token) = (ctx.clone(), next.clone(), token.clone());
        workers.push(tokio::spawn(async move {
            let mut made = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return anyhow::Ok(made);
                }
                let due_at = remind_at(i) + chrono::Duration::minutes(1);
                let r = ctx
                    .http
                    .post(format!("{}/v1/tasks", ctx.cli.command_api))
                    .bearer_auth(&token)
                    .json(&json!({"title": "reminded", "due_at": due_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true), "remind_before": "PT1M"}))
                    .send()
                    .await?;
                anyhow::ensure!(r.status().is_success(), "create answered {}", r.status());
                let body: Value = r.json().await?;
                let id: uuid::Uuid = body["task_id"].as_str().and_then(|s| s.parse().ok()).context("a created task's id")?;
                made.push((id, remind_at(i)));
            }
        }));
    }
    let mut due: HashMap<uuid::Uuid, chrono::DateTime<chrono::Utc>> = HashMap::with_capacity(n);
    for w in workers {
        due.extend(w.await??);
    }
    anyhow::ensure!(chrono::Utc::now() < first, "the {n} tasks were not created before their reminders were due; lower --scale");
    eprintln!("{n} reminders due from {first} over {spread:?}; waiting for them");
    let mut db = sqlx::PgConnection::connect(url).await?;
    let deadline = Instant::now() + lead + spread + Duration::from_secs(300);
    loop {
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM notifications WHERE user_id = $1").bind(&user).fetch_one(&mut db).await?;
        if count as usize >= n {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "only {count} of {n} reminders fired within 5 minutes of their time");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let fired: Vec<(uuid::Uuid, chrono::DateTime<chrono::Utc>)> =
        sqlx::query_as("SELECT task_id, created_at FROM notifications WHERE user_id = $1").bind(&user).fetch_all(&mut db).await?;
    let mut late: Vec<f64> = fired
        .iter()
        .map(|(task, at)| {
            let due = due.get(task).context("a notification for a task this run did not create")?;
            Ok((*at - *due).num_milliseconds().max(0) as f64 / 1000.0)
        })
        .collect::<anyhow::Result<_>>()?;
    late.sort_by(f64::total_cmp);
    let max_late = late.last().copied().unwrap_or(0.0);
    let p99_late = late.get((late.len() * 99 / 100).min(late.len().saturating_sub(1))).copied().unwrap_or(0.0);
    Ok(Lateness { max_late, p99_late })
}

/// The owner of every partition as the benchmark's command API sees it, once all are ready.
async fn owners(ctx: &Ctx) -> Option<BTreeMap<i64, String>> {
    let view: Value = ctx.http.get(format!("{}/v1/cluster", ctx.cli.command_api)).send().await.ok()?.json().await.ok()?;
    let mut out = BTreeMap::new();
    for p in view["partitions"].as_array()? {
        if p["ready"] != json!(true) {
            return None;
        }
        out.insert(p["partition"].as_i64()?, p["owner"].as_str()?.to_owned());
    }
    Some(out)
}

async fn latency(ctx: &Arc<Ctx>) -> anyhow::Result<BTreeMap<String, Value>> {
    let user = format!("bench-lat-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let ids = Arc::new(seed(ctx, &user, ctx.n(1_000)).await?);
    let token = ctx.token(&user);
    let rate = 1_000.0;
    let duration = ctx.secs(30.0);
    let (cmd_hist, e2e_hist) = (Latencies::new()?, Latencies::new()?);
    let errors = Arc::new(AtomicU64::new(0));
    let cpu = CpuMeter::start(ctx.measured(&ctx.cli.rss));
    let (appends_before, started) = (append_totals(ctx, &ctx.cli.command_api).await, Instant::now());
    open_loop(rate, duration, |i, scheduled| {
        let (ctx, ids, token, cmd_hist, e2e_hist, errors) = (ctx.clone(), ids.clone(), token.clone(), cmd_hist.clone(), e2e_hist.clone(), errors.clone());
        async move {
            match mixed_command(&ctx, &token, &ids, i).await {
                Ok(sent) => {
                    cmd_hist.record_since(scheduled);
                    if let (Some(p), Some(task)) = (sent.position, sent.task_id) {
                        // Visible through GraphQL: the command's task, read as of the command's
                        // position (a query whose cost does not grow with the user's tasks).
                        let r = ctx
                            .http
                            .post(format!("{}/graphql", ctx.cli.query_api))
                            .bearer_auth(&token)
                            .header("X-Consistency-Token", p)
                            .json(&json!({"query": "query($id: ID!) { task(id: $id) { version } }", "variables": {"id": task}}))
                            .send()
                            .await;
                        match r {
                            Ok(r) if r.status().is_success() => e2e_hist.record_since(scheduled),
                            _ => {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
                Err(_) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    })
    .await?;
    let mut out = BTreeMap::new();
    // What the box spends at this load: the latency is mostly waiting for a core.
    let shares = cpu.finish("latency_at_1k", &mut out);
    // The Kafka transactions the command API committed meanwhile (its own metrics; the peer has
    // none): how many a second, and how long each took. A partition's commands wait for the
    // transactions of the others ahead of them for a slot.
    if let (Some((sum0, n0)), Some((sum1, n1))) = (appends_before, append_totals(ctx, &ctx.cli.command_api).await) {
        let n = n1 - n0;
        if n > 0.0 {
            out.insert("transactions_per_s_at_1k".into(), round(n / started.elapsed().as_secs_f64()));
            out.insert("transaction_mean_ms_at_1k".into(), round((sum1 - sum0) / n * 1000.0));
        }
    }
    let (c, e) = (cmd_hist.snapshot()?, e2e_hist.snapshot()?);
    let ms = |h: &Histogram<u64>, q: f64| round(h.value_at_quantile(q) as f64 / 1000.0);
    eprintln!(
        "at 1000/s: command p50 {} p99 {} p999 {} ms; e2e p50 {} p99 {} ms; errors {}; CPU: {shares}",
        ms(&c, 0.5),
        ms(&c, 0.99),
        ms(&c, 0.999),
        ms(&e, 0.5),
        ms(&e, 0.99),
        errors.load(Ordering::Relaxed)
    );
    out.extend(BTreeMap::from([
        ("command_p50_ms_at_1k".into(), ms(&c, 0.5)),
        ("command_p99_ms_at_1k".into(), ms(&c, 0.99)),
        ("command_p999_ms_at_1k".into(), ms(&c, 0.999)),
        ("e2e_p50_ms_at_1k".into(), ms(&e, 0.5)),
        ("e2e_p99_ms_at_1k".into(), ms(&e, 0.99)),
        ("latency_errors_at_1k".into(), json!(errors.load(Ordering::Relaxed))),
    ]));
    Ok(out)
}

/// The command API's `command_api_append_seconds` sum and count so far (one per Kafka
/// transaction), from the `/metrics` of the instance at `base` (zero before its first transaction);
/// `None` where there is no such page (the peer).
async fn append_totals(ctx: &Ctx, base: &str) -> Option<(f64, f64)> {
    let text = ctx.http.get(format!("{base}/metrics")).send().await.ok()?.error_for_status().ok()?.text().await.ok()?;
    let value = |name: &str| text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok()).unwrap_or(0.0);
    Some((value("command_api_append_seconds_sum"), value("command_api_append_seconds_count")))
}

/// [`append_totals`] summed over the instances at `bases`; `None` if one has none.
async fn appends_over(ctx: &Ctx, bases: &[String]) -> Option<(f64, f64)> {
    let mut total = (0.0, 0.0);
    for base in bases {
        let (sum, n) = append_totals(ctx, base).await?;
        total = (total.0 + sum, total.1 + n);
    }
    Some(total)
}

/// Latencies in microseconds, recorded from many tasks.
#[derive(Clone)]
struct Latencies(Arc<std::sync::Mutex<Histogram<u64>>>);

impl Latencies {
    fn new() -> anyhow::Result<Self> {
        Ok(Self(Arc::new(std::sync::Mutex::new(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?))))
    }

    /// Records the time since `scheduled` (open loop: from when the request was due, not sent).
    fn record_since(&self, scheduled: tokio::time::Instant) {
        let us = scheduled.elapsed().as_micros() as u64;
        let _ = self.0.lock().map(|mut h| h.record(us.max(1)));
    }

    fn snapshot(&self) -> anyhow::Result<Histogram<u64>> {
        Ok(self.0.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone())
    }
}

/// Starts `call(i, scheduled)` at `rate` per second for `duration` whether or not earlier calls have
/// finished (an open loop, so a slow answer cannot slow the offered load), then waits for them all.
async fn open_loop<F, Fut>(rate: f64, duration: Duration, call: F) -> anyhow::Result<()>
where
    F: Fn(u64, tokio::time::Instant) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let n = (rate * duration.as_secs_f64()) as u64;
    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    let mut tasks = Vec::with_capacity(n as usize);
    for i in 0..n {
        let scheduled = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(scheduled).await;
        tasks.push(tokio::spawn(call(i, scheduled)));
    }
    for t in tasks {
        t.await?;
    }
    Ok(())
}

/// The 50-item page of the GraphQL phases.
const LIST_QUERY: &str = "{ tasks(first: 50) { edges { node { id title status priority dueAt tags version } } pageInfo { hasNextPage endCursor } } }";

/// The user whose tasks the GraphQL phase reads, and ids of some of them: 500 tasks created through
/// the command API and visible in the query API, or `--graphql-user`'s tasks as they are.
async fn graphql_dataset(ctx: &Arc<Ctx>) -> anyhow::Result<(String, Vec<String>)> {
    if let Some(user) = &ctx.cli.graphql_user {
        let v: Value = ctx
            .http
            .post(format!("{}/graphql", ctx.cli.query_api))
            .bearer_auth(ctx.token(user))
            .json(&json!({"query": "{ tasks(first: 200) { edges { node { id } } } }"}))
            .send()
            .await?
            .json()
            .await?;
        let ids: Vec<String> =
            v["data"]["tasks"]["edges"].as_array().into_iter().flatten().filter_map(|e| e["node"]["id"].as_str().map(str::to_owned)).collect();
        anyhow::ensure!(!ids.is_empty(), "--graphql-user {user} has no tasks in the query API: {v}");
        return Ok((user.clone(), ids));
    }
    let user = "bench-q".to_owned();
    let ids = seed(ctx, &user, ctx.n(500)).await?;
    let token = ctx.token(&user);
    // Wait until the seeded tasks are visible.
    let probe: Value =
        ctx.http.post(format!("{}/v1/tasks", ctx.cli.command_api)).bearer_auth(&token).json(&json!({"title": "probe"})).send().await?.json().await?;
    ctx.http
        .post(format!("{}/graphql", ctx.cli.query_api))
        .bearer_auth(&token)
        .header("X-Consistency-Token", probe["position"].as_str().unwrap_or_default())
        .json(&json!({"query": "{ stats { total } }"}))
        .send()
        .await?;
    Ok((user, ids))
}

/// Sends one GraphQL request (a serialised body) and reads the whole answer, as a client does (an
/// answer dropped unread also costs its connection); true for a 200 with data and no errors.
async fn graphql_ok(ctx: &Ctx, token: &str, body: &[u8]) -> bool {
    let res = ctx
        .http
        .post(format!("{}/graphql", ctx.cli.query_api))
        .bearer_auth(token)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_vec())
        .send()
        .await;
    let Ok(res) = res else { return false };
    let status = res.status();
    match res.bytes().await {
        Ok(b) => status.is_success() && b.starts_with(br#"{"data":{"#) && !b.windows(8).any(|w| w == br#""errors""#),
        Err(_) => false,
    }
}

async fn graphql(ctx: &Arc<Ctx>) -> anyhow::Result<BTreeMap<String, Value>> {
    let (user, ids) = graphql_dataset(ctx).await?;
    let token = ctx.token(&user);
    let list = Arc::new(serde_json::to_vec(&json!({ "query": LIST_QUERY }))?);
    let by_id: Arc<Vec<Vec<u8>>> = Arc::new(
        ids.iter()
            .map(|id| {
                serde_json::to_vec(
                    &json!({"query": "query($id: ID!) { task(id: $id) { id title status priority dueAt tags version } }", "variables": {"id": id}}),
                )
            })
            .collect::<Result<_, _>>()?,
    );
    let mut out = BTreeMap::new();
    let procs = ctx.measured(&ctx.cli.rss);
    for (key, is_list) in [("graphql_list_queries_per_s", true), ("graphql_task_queries_per_s", false)] {
        let (done, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let duration = ctx.secs(10.0);
        let cpu = CpuMeter::start(procs.clone());
        let started = Instant::now();
        let deadline = started + duration;
        let mut workers = Vec::new();
        for w in 0..64u64 {
            let (ctx, list, by_id, token, done, failed) = (ctx.clone(), list.clone(), by_id.clone(), token.clone(), done.clone(), failed.clone());
            workers.push(tokio::spawn(async move {
                let mut i = w as usize;
                while Instant::now() < deadline {
                    let body = if is_list { &list[..] } else { &by_id[i % by_id.len()][..] };
                    i += 64;
                    let counter = if graphql_ok(&ctx, &token, body).await { &done } else { &failed };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        for w in workers {
            w.await?;
        }
        let rate = done.load(Ordering::Relaxed) as f64 / duration.as_secs_f64();
        // Each process' CPU share: on a shared machine, CPU per query moves less than the rate.
        let shares = cpu.finish(key, &mut out);
        eprintln!("{key} = {rate:.0} ({} failed; CPU: {shares})", failed.load(Ordering::Relaxed));
        out.insert(key.to_owned(), round(rate));
    }
    out.extend(graphql_list_latency(ctx, &token, list).await?);
    Ok(out)
}

/// The list query's latency at an open-loop 1 000/s: each request is sent at its scheduled time
/// whatever the answers do, and its latency is taken from that time.
async fn graphql_list_latency(ctx: &Arc<Ctx>, token: &str, list: Arc<Vec<u8>>) -> anyhow::Result<BTreeMap<String, Value>> {
    let hist = Latencies::new()?;
    let errors = Arc::new(AtomicU64::new(0));
    open_loop(1_000.0, ctx.secs(20.0), |_, scheduled| {
        let (ctx, token, list, hist, errors) = (ctx.clone(), token.to_owned(), list.clone(), hist.clone(), errors.clone());
        async move {
            if graphql_ok(&ctx, &token, &list).await {
                hist.record_since(scheduled);
            } else {
                errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    })
    .await?;
    let h = hist.snapshot()?;
    let ms = |q: f64| round(h.value_at_quantile(q) as f64 / 1000.0);
    let errors = errors.load(Ordering::Relaxed);
    eprintln!("list queries at 1000/s: p50 {} p99 {} p999 {} ms; errors {errors}", ms(0.5), ms(0.99), ms(0.999));
    Ok(BTreeMap::from([
        ("graphql_list_p50_ms_at_1k".into(), ms(0.5)),
        ("graphql_list_p99_ms_at_1k".into(), ms(0.99)),
        ("graphql_list_p999_ms_at_1k".into(), ms(0.999)),
        ("graphql_list_errors_at_1k".into(), json!(errors)),
    ]))
}
