//! `chaos` (`./dev chaos`): a bounded run of taskstream under a steady open-loop load that injects
//! one fault at a time (kill -9 of each service, the broker paused and killed, PostgreSQL
//! restarted; with several instances, one of them killed while the others take over), then checks
//! from the log and the read models that nothing was lost or duplicated. Prints a table, writes
//! `<out-dir>/report.json`, exits 0 only when every check passed (1: a check failed; 2: the run
//! itself could not be carried out).
//!
//! Modules, pointing down: `main` (the run: phases, progress, settling, the verdict) uses every
//! other; `faults` (what each fault does) → `stack` (the service processes; the broker and the
//! database through `deploy/local/chaos.sh`); `verify` (the checks) → `load` (the open-loop load
//! with Idempotency-Key retries and the journal of answers); `report` (table and JSON) → `verify`;
//! `receiver` (the webhook receiver) stands alone.

mod faults;
mod load;
mod receiver;
mod report;
mod stack;
mod verify;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::json;
use sqlx::{Connection, PgPool};

use faults::Fault;
use load::{longest_gap, Load, LoadConfig, Outcome};
use receiver::Receiver;
use report::{PhaseResult, Report};
use stack::{Kind, Stack, StackConfig};

#[derive(Parser)]
#[command(name = "chaos", about = "taskstream under load with one fault at a time; checks that nothing was lost or duplicated")]
struct Cli {
    /// Where the service binaries are (default: beside this one).
    #[arg(long, env = "TASKSTREAM_BIN_DIR")]
    bin_dir: Option<PathBuf>,
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    brokers: String,
    /// librdkafka properties of its own Kafka clients (the services it starts read the same
    /// KAFKA_CONFIG_FILE / KAFKA_CONFIG_* variables; see the README).
    #[arg(long = "kafka-config-file", env = "KAFKA_CONFIG_FILE", value_name = "PATH", default_value = "", hide_default_value = true, value_parser = platform::kafka_properties::ClientProperties::parse_arg)]
    kafka_config: platform::kafka_properties::ClientProperties,
    /// An admin URL of PostgreSQL: the run creates a database of its own there.
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    #[arg(long, env = "AUTH_JWT_SECRET", default_value = "taskstream-dev-secret")]
    secret: String,
    #[arg(long, env = "SERVICE_JWT_SECRET", default_value = "taskstream-dev-service-secret")]
    service_secret: String,
    /// Command APIs (instance i on the base port + 100 x i).
    #[arg(long, default_value_t = 1)]
    command_apis: usize,
    /// Projectors (instance i on the base port + 2 + 100 x i).
    #[arg(long, default_value_t = 1)]
    projectors: usize,
    /// Commands per second (open loop). Default 500, with --short 200.
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds of load per fault (the fault is injected a few seconds in). Default 40, --short 20.
    #[arg(long)]
    fault_seconds: Option<u64>,
    /// How long the broker stays stopped (kafka-pause).
    #[arg(long, default_value_t = 20)]
    pause_seconds: u64,
    /// The faults, in order (comma-separated). Default: all that this stack allows; with --short
    /// command-api-kill, projector-kill, kafka-kill, postgres-restart.
    #[arg(long, value_delimiter = ',', value_parser = Fault::parse)]
    faults: Vec<Fault>,
    /// The short run of `./dev test` (about 3 minutes).
    #[arg(long)]
    short: bool,
    /// deploy/local/chaos.sh, when this run owns the broker and the database (their faults need it).
    #[arg(long)]
    stack_script: Option<PathBuf>,
    /// Base port: command API i on it + 100 x i, the query API on it + 1, projector i on it + 2 + 100 x i.
    #[arg(long, default_value_t = 28080)]
    base_port: u16,
    #[arg(long, default_value_t = 40)]
    users: usize,
    /// How long a command is retried (same key, same body) before it counts as unresolved. Default
    /// 60, with --short 30.
    #[arg(long)]
    retry_budget_seconds: Option<u64>,
    #[arg(long, default_value_t = 12)]
    partitions: i32,
    /// Where report.json and the services' logs go.
    #[arg(long, default_value = "target/chaos")]
    out_dir: PathBuf,
    /// Keep the run's database and topics even when every check passed.
    #[arg(long)]
    keep: bool,
    /// Lines about the machine and the command, copied into the report (repeatable).
    #[arg(long = "about")]
    about: Vec<String>,
}

/// When a phase began, when its fault was injected and was over, when it ended.
struct Timing {
    start: Instant,
    injected: Option<Instant>,
    recovered: Option<Instant>,
    end: Instant,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // Ctrl-C or SIGTERM drops the run, and with it the services it started (kill_on_drop).
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("chaos: error: {e}");
            return ExitCode::from(2);
        }
    };
    let result = tokio::select! {
        r = run(cli) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        _ = term.recv() => Err(anyhow::anyhow!("terminated")),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("chaos: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn say(started: Instant, msg: impl AsRef<str>) {
    eprintln!("[chaos {:>6.1}s] {}", started.elapsed().as_secs_f64(), msg.as_ref());
}

async fn run(cli: Cli) -> anyhow::Result<bool> {
    let started = Instant::now();
    let rate = cli.rate.unwrap_or(if cli.short { 200.0 } else { 500.0 });
    let fault_len = Duration::from_secs(cli.fault_seconds.unwrap_or(if cli.short { 20 } else { 40 }));
    let pause = Duration::from_secs(cli.pause_seconds);
    let warmup = Duration::from_secs(if cli.short { 5 } else { 10 });
    let retry_budget = Duration::from_secs(cli.retry_budget_seconds.unwrap_or(if cli.short { 30 } else { 60 }));
    anyhow::ensure!(rate > 0.0 && cli.command_apis >= 1 && cli.projectors >= 1 && cli.users >= 1, "rate, instances and users must be positive");
    let bin_dir = match cli.bin_dir.clone() {
        Some(d) => d,
        None => std::env::current_exe()?.parent().context("no directory of the chaos binary")?.to_path_buf(),
    };

    // A database and topics of this run's own.
    let run_id = format!("{}{:04x}", chrono::Utc::now().format("%Y%m%d%H%M%S"), rand::random::<u16>());
    let db_name = format!("chaos_{run_id}");
    let topic = format!("task-events-chaos-{run_id}");
    {
        let mut admin = sqlx::PgConnection::connect(&cli.database_url).await.context("connecting to DATABASE_URL")?;
        sqlx::query(&format!("CREATE DATABASE {db_name}")).execute(&mut admin).await?;
    }
    let base = cli.database_url.rsplit_once('/').map_or(cli.database_url.as_str(), |(b, _)| b);
    let db_url = format!("{base}/{db_name}");
    let (receiver, hook_url) = Receiver::start().await?;
    let log_dir = cli.out_dir.join("logs").join(&run_id);
    let kafka = platform::settings::KafkaSettings {
        kafka_brokers: cli.brokers.clone(),
        task_events_topic: topic.clone(),
        task_events_partitions: cli.partitions,
        task_events_replication: 1,
        kafka_config: cli.kafka_config.clone(),
        data_keys_erasure_bound_ms: 86_400_000,
    };
    let env: Vec<(String, String)> = [
        ("KAFKA_BROKERS", cli.brokers.as_str()),
        ("DATABASE_URL", db_url.as_str()),
        ("AUTH_JWT_SECRET", cli.secret.as_str()),
        ("SERVICE_JWT_SECRET", cli.service_secret.as_str()),
        ("TASKSTREAM_DEV", "1"),
        ("TASK_EVENTS_TOPIC", topic.as_str()),
        ("TASK_EVENTS_PARTITIONS", &cli.partitions.to_string()),
        ("KAFKA_TRANSACTIONAL_ID", &format!("chaos-{run_id}")),
        ("WEBHOOK_ALLOW_PRIVATE", "true"),
        ("LOG_FORMAT", "json"),
        ("RUST_LOG", &std::env::var("CHAOS_SERVICE_LOG").unwrap_or_else(|_| "warn".into())),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let mut stack = Stack::new(StackConfig {
        bin_dir,
        log_dir: log_dir.clone(),
        env,
        command_apis: cli.command_apis,
        projectors: cli.projectors,
        base_port: cli.base_port,
        script: cli.stack_script.clone(),
    })?;

    let mut faults = if !cli.faults.is_empty() {
        cli.faults.clone()
    } else if cli.short {
        Fault::SHORT.to_vec()
    } else {
        Fault::ALL.to_vec()
    };
    faults.retain(|f| match f.unavailable(&stack) {
        Some(why) => {
            say(started, format!("skipping {}: {why}", f.name()));
            false
        }
        None => true,
    });
    let total = warmup + fault_len * faults.len() as u32;
    say(
        started,
        format!(
            "run {run_id}: {} command API(s), {} projector(s), {rate}/s for about {total:?} ({} faults, {fault_len:?} each); database {db_name}, topic {topic}; logs in {}",
            cli.command_apis,
            cli.projectors,
            faults.len(),
            log_dir.display()
        ),
    );

    stack.start_all().await?;
    say(started, format!("stack ready: command APIs {:?}, query API {:?}", stack.urls(Kind::CommandApi), stack.urls(Kind::QueryApi)));
    let result =
        exercise(&cli, &run_id, retry_budget, &mut stack, &receiver, &hook_url, &kafka, &db_url, &faults, rate, fault_len, warmup, pause, started).await;
    say(started, "stopping the services");
    stack.stop_all().await;
    let mut report = result?;
    report.about = json!({
        "run_id": run_id, "rate_per_s": rate, "fault_seconds": fault_len.as_secs(), "command_apis": cli.command_apis,
        "projectors": cli.projectors, "users": cli.users, "database": db_name, "topic": topic, "logs": log_dir,
        "notes": cli.about, "duration_s": started.elapsed().as_secs(),
    });
    eprintln!("\n{}", report.table());
    std::fs::create_dir_all(&cli.out_dir)?;
    let path = cli.out_dir.join("report.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    say(started, format!("wrote {}", path.display()));
    if report.ok && !cli.keep {
        // A new connection: the run's PostgreSQL restart ended every connection opened before it.
        let mut admin = sqlx::PgConnection::connect(&cli.database_url).await.context("connecting to DATABASE_URL")?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)")).execute(&mut admin).await?;
        platform::kafka::delete_topics(&kafka).await;
    } else if !report.ok {
        say(started, format!("kept database {db_name} and topic {topic} for inspection"));
    }
    if report.ok {
        say(started, "nothing lost, nothing duplicated: every check passed");
    } else {
        for p in &report.problems {
            eprintln!("  problem: {p}");
        }
        say(started, "FAILED: see the table above and report.json");
    }
    Ok(report.ok)
}

/// The load, the faults, settling and the checks, on a running stack.
#[allow(clippy::too_many_arguments)]
async fn exercise(
    cli: &Cli,
    run_id: &str,
    retry_budget: Duration,
    stack: &mut Stack,
    receiver: &Receiver,
    hook_url: &str,
    kafka: &platform::settings::KafkaSettings,
    db_url: &str,
    faults: &[Fault],
    rate: f64,
    fault_len: Duration,
    warmup: Duration,
    pause: Duration,
    started: Instant,
) -> anyhow::Result<Report> {
    let auth = platform::auth::JwtAuth::new(&platform::secret::Secret::new(cli.secret.clone()));
    let users: Vec<String> = (0..cli.users).map(|i| format!("chaos-u{i}")).collect();
    let tokens: Vec<String> = users.iter().map(|u| auth.issue(u, 6 * 3600)).collect();
    let command_urls = stack.urls(Kind::CommandApi);
    register_webhooks(&command_urls[0], &tokens, hook_url).await?;
    let total = warmup + fault_len * faults.len() as u32;
    let load = Load::new(LoadConfig {
        run_id: run_id.to_owned(),
        command_urls,
        query_url: stack.urls(Kind::QueryApi)[0].clone(),
        rate,
        users,
        tokens: tokens.clone(),
        retry_budget,
        request_timeout: Duration::from_secs(10),
        // About 10 s of the schedule: beyond that, a long outage sheds new commands instead of
        // piling up retries.
        max_in_flight: (rate * 10.0).max(200.0) as usize,
        reminders_until: chrono::Utc::now() + chrono::Duration::from_std(total)? - chrono::Duration::seconds(10),
    })?;
    let driver = tokio::spawn(load.clone().drive());
    let reader = tokio::spawn(load.clone().read());
    let mut names = vec!["steady (no fault)".to_owned()];
    names.extend(faults.iter().map(|f| f.name().to_owned()));
    let progress = {
        let (load, names) = (load.clone(), names.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let c = &load.counters;
                let phase = load.phase.load(Ordering::Relaxed).min(names.len() - 1);
                say(
                    started,
                    format!(
                        "[{}/{} {}] sent {} 2xx {} 4xx {} unresolved {} | in flight {} retrying {} shed {} | 503 answers {} | reads ok {} failed {}",
                        phase + 1,
                        names.len(),
                        names[phase],
                        c.sent.load(Ordering::Relaxed),
                        c.accepted.load(Ordering::Relaxed),
                        c.rejected.load(Ordering::Relaxed),
                        c.unresolved.load(Ordering::Relaxed),
                        c.in_flight.load(Ordering::Relaxed),
                        c.retrying.load(Ordering::Relaxed),
                        c.shed.load(Ordering::Relaxed),
                        c.answers_503.load(Ordering::Relaxed),
                        c.reads_ok.load(Ordering::Relaxed),
                        c.reads_failed.load(Ordering::Relaxed),
                    ),
                );
            }
        })
    };

    // The phases: a steady one, then one per fault.
    let mut timings = Vec::new();
    let mut replaying = Vec::new();
    let mut problems = Vec::new();
    // When a webhook sender (a projector) was killed: a delivery it had posted but not recorded yet
    // is posted again by the next one (at least once).
    let mut sender_kills = Vec::new();
    for (i, name) in names.iter().enumerate() {
        load.phase.store(i, Ordering::Relaxed);
        let start = Instant::now();
        let (mut injected, mut recovered) = (None, None);
        let mut end = start + warmup;
        if let Some(fault) = i.checked_sub(1).map(|f| faults[f]) {
            tokio::time::sleep(Duration::from_secs(5).min(fault_len / 4)).await;
            say(started, format!("[{}/{}] {name}: {}", i + 1, names.len(), fault.describe(stack, pause)));
            let at = Instant::now();
            injected = Some(at);
            if matches!(fault, Fault::ProjectorKill | Fault::ProjectorFailover) {
                sender_kills.push(at);
            }
            match fault.inject(stack, pause).await {
                Ok(back) => {
                    recovered = Some(back);
                    say(started, format!("[{}/{}] {name}: recovered after {:.1} s", i + 1, names.len(), (back - at).as_secs_f64()));
                }
                Err(e) => {
                    problems.push(format!("{name}: the fault could not be injected or did not recover: {e:#}"));
                    say(started, format!("[{}/{}] {name}: FAILED: {e:#}", i + 1, names.len()));
                }
            }
            end = (start + fault_len).max(recovered.unwrap_or(start) + Duration::from_secs(5));
        }
        tokio::time::sleep_until(end.into()).await;
        // Replays (same key, same body) of this phase's accepted commands, beside the next phase.
        let sample = load.replay_sample(i);
        let replayer = load.clone();
        replaying.push(tokio::spawn(async move { (sample.len() as u64, replayer.replay(&sample).await) }));
        timings.push(Timing { start, injected, recovered, end: Instant::now() });
        if recovered.is_none() && injected.is_some() {
            break; // the stack is broken: no point in going on
        }
    }
    say(started, "load stopped; waiting for the commands still in flight");
    load.stop();
    driver.await?;
    reader.await?;
    if !load.drain(retry_budget + Duration::from_secs(15)).await {
        problems.push("commands were still in flight after their retry budget".into());
    }
    let mut replays = Vec::new();
    for r in replaying {
        replays.push(r.await?);
    }
    progress.abort();

    let db = sqlx::postgres::PgPoolOptions::new().max_connections(4).connect(db_url).await?;
    say(started, "waiting for the projections, reactions, reminders and webhooks to settle");
    if let Err(e) = settle(kafka, &db, Duration::from_secs(180), started).await {
        problems.push(format!("did not settle: {e:#}"));
    }

    say(started, "reading the log (read_committed, from offset zero)");
    let journal = load.journal();
    let log = verify::read_log(kafka.clone()).await?;
    say(started, format!("{} records in the log, {} commands in the journal", log.len(), journal.len()));
    let (exactness, commands_check) = verify::commands_against_log(&journal, &log, names.len());
    let mut checks = vec![verify::no_open_transactions(kafka.clone()).await?, commands_check, verify::versions_contiguous(&log), verify::occurrences(&log)];
    checks.extend(verify::reminders(&log, &db, &receiver.arrivals(), &sender_kills).await?);
    say(started, "rebuilding the read models from offset zero (projector rebuild --yes)");
    let before = verify::checksums(&db).await?;
    let rebuilt = rebuild(stack).await;
    let after = verify::checksums(&db).await?;
    checks.push(verify::rebuild_matches(&before, &after, rebuilt));

    let writes = load.writes_ok();
    let reads: Vec<Instant> = load.reads().into_iter().filter(|r| r.1).map(|r| r.0).collect();
    let mut phases = Vec::new();
    for (i, t) in timings.iter().enumerate() {
        let mine: Vec<_> = journal.iter().filter(|c| c.phase == i).collect();
        let count = |f: &dyn Fn(&load::CommandRecord) -> bool| mine.iter().filter(|c| f(c)).count() as u64;
        let from = t.injected.unwrap_or(t.start);
        let (replayed, (mismatches, inconclusive)) = &replays[i];
        problems.extend(mismatches.iter().cloned());
        phases.push(PhaseResult {
            fault: names[i].clone(),
            action: i.checked_sub(1).map(|f| faults[f].describe(stack, pause)).unwrap_or_else(|| "none".into()),
            seconds: (t.end - t.start).as_secs_f64(),
            recovered_after_s: t.recovered.zip(t.injected).map(|(r, i)| (r - i).as_secs_f64()),
            sent: mine.len() as u64,
            accepted: count(&|c| matches!(c.outcome, Outcome::Accepted { .. })),
            got_503: count(&|c| c.saw_503),
            retried: count(&|c| c.unavailable > 0),
            refused_4xx: count(&|c| matches!(c.outcome, Outcome::Rejected { .. })),
            unresolved: count(&|c| matches!(c.outcome, Outcome::Unresolved { .. })),
            exactness: exactness[i].clone(),
            replay_mismatches: mismatches.len() as u64,
            replays: *replayed,
            replays_inconclusive: *inconclusive,
            writes_unavailable_s: longest_gap(writes.iter().copied(), from, t.end).as_secs_f64(),
            reads_unavailable_s: longest_gap(reads.iter().copied(), from, t.end).as_secs_f64(),
        });
    }
    let refused: Vec<String> = journal
        .iter()
        .filter_map(|c| match &c.outcome {
            Outcome::Rejected { status, body } => Some(format!("{} ({:?} {}) refused {status}: {body}", c.key, c.op, c.task_id)),
            _ => None,
        })
        .take(5)
        .collect();
    if !refused.is_empty() {
        say(started, format!("commands refused with a 4xx (the load expects none): {}", refused.join("; ")));
    }
    for c in checks.iter().filter(|c| !c.ok) {
        problems.push(format!("{}: {}", c.name, c.detail));
    }
    let ok = problems.is_empty() && phases.iter().all(|p| !p.failed()) && checks.iter().all(|c| c.ok);
    Ok(Report { ok, about: serde_json::Value::Null, phases, checks, problems })
}

/// Registers the receiver as every user's webhook (retried while the stack warms up).
async fn register_webhooks(command_api: &str, tokens: &[String], url: &str) -> anyhow::Result<()> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    for token in tokens {
        let mut tries = 0;
        loop {
            let r = http.put(format!("{command_api}/v1/webhook")).bearer_auth(token).json(&json!({ "url": url })).send().await;
            match r {
                Ok(r) if r.status().is_success() => break,
                Ok(r) if tries < 20 && r.status().as_u16() == 503 => {}
                Ok(r) => anyhow::bail!("registering the webhook answered {}: {}", r.status(), r.text().await.unwrap_or_default()),
                Err(e) if tries < 20 => eprintln!("registering the webhook: {e}; retrying"),
                Err(e) => return Err(e.into()),
            }
            tries += 1;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    Ok(())
}

/// Reactions, reminders and webhook deliveries that failed during a fault wait out a backoff of up
/// to minutes: their next attempt is moved to now, as a restarted projector does (the load is over,
/// only the wait is shortened).
async fn hurry_retries(db: &PgPool) -> Result<(), sqlx::Error> {
    for sql in [
        "UPDATE reaction_outbox SET next_attempt_at = now() WHERE NOT failed AND next_attempt_at > now()",
        "UPDATE reminder_attempts SET next_attempt_at = now() WHERE next_attempt_at > now()",
        "UPDATE webhook_deliveries SET next_attempt_at = now() WHERE status = 'pending' AND next_attempt_at > now()",
    ] {
        sqlx::query(sql).execute(db).await?;
    }
    Ok(())
}

/// Waits until the projections have applied the whole log, no reaction waits, every reminder due
/// has fired and every webhook delivery is done: twice in a row, a second apart (every 5 s, retries
/// waiting out a backoff are hurried).
async fn settle(kafka: &platform::settings::KafkaSettings, db: &PgPool, timeout: Duration, started: Instant) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut calm = 0;
    let mut last_said = Instant::now();
    loop {
        let lag = lag(kafka, db).await?;
        let (outbox, reminders, webhooks): (i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM reaction_outbox WHERE NOT failed),
                    (SELECT count(*) FROM reminder_schedule WHERE remind_at <= now()),
                    (SELECT count(*) FROM webhook_deliveries WHERE status = 'pending')",
        )
        .fetch_one(db)
        .await?;
        calm = if lag == 0 && outbox == 0 && reminders == 0 && webhooks == 0 { calm + 1 } else { 0 };
        if calm >= 2 {
            return Ok(());
        }
        let state = format!("lag {lag}, reactions waiting {outbox}, reminders due {reminders}, webhook deliveries pending {webhooks}");
        anyhow::ensure!(Instant::now() < deadline, "after {timeout:?}: {state}");
        if last_said.elapsed() >= Duration::from_secs(5) {
            say(started, format!("settling: {state}"));
            last_said = Instant::now();
            hurry_retries(db).await?;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Records of the log not yet applied by the projections (summed over projections and partitions).
async fn lag(kafka: &platform::settings::KafkaSettings, db: &PgPool) -> anyhow::Result<i64> {
    let stored = platform::projections::Stored::read(db, &kafka.task_events_topic).await?;
    let partitions = stored.partitions();
    let settings = kafka.clone();
    let highs: HashMap<i32, i64> = tokio::task::spawn_blocking(move || -> anyhow::Result<HashMap<i32, i64>> {
        let consumer: BaseConsumer = platform::kafka::client_config(&settings, "chaos-lag").set("group.id", "chaos-lag").create()?;
        let mut highs = HashMap::new();
        for p in partitions {
            let (_, high) = consumer.fetch_watermarks(&settings.task_events_topic, p, Duration::from_secs(5))?;
            highs.insert(p, high);
        }
        Ok(highs)
    })
    .await??;
    Ok(stored.statuses(Some(&highs)).iter().map(|s| s.lag()).sum())
}

/// `projector rebuild --yes` against the stack.
async fn rebuild(stack: &Stack) -> Result<(), String> {
    let out = tokio::time::timeout(Duration::from_secs(600), stack.projector_cli(&["rebuild", "--yes"]).output())
        .await
        .map_err(|_| "projector rebuild did not finish within 10 minutes".to_owned())?
        .map_err(|e| format!("projector rebuild could not start: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("projector rebuild failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or_default()))
    }
}
