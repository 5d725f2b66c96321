//! taskstream projector: builds the PostgreSQL read models from the `task-events` log,
//! exactly-once (each batch and its per-partition offsets are committed in one transaction, with a
//! compare-and-set), runs the reactions, and serves the `rebuild`, `status` and `dlq` commands.
//! Several instances share the log's partitions as one Kafka consumer group (`group`).
//!
//! Modules, top to bottom; each imports only modules below it (no loops):
//!
//! - `lib` / `main`: settings, the CLI commands and the health/metrics router; wiring only. The
//!   run mode checks its secret (`SecretPolicy`), serves health at once and starts `reactor` and
//!   `runner` once the start-up migrations are applied (`platform::db::Migrations`, retried while
//!   PostgreSQL is away; `/readyz` 503 with the reason meanwhile; its `projector-partitions` header
//!   lists the partitions this instance applies). The one-shot commands connect with
//!   `platform::db::connect` and fail at once when PostgreSQL is not there.
//! - `runner`: the live loop: a member of the projectors' consumer group; after each rebalance it
//!   drops what it read of revoked partitions and seeks assigned ones to their stored offsets, then
//!   applies batches through `dlq::apply_live` with retries (`platform::retry`), isolates a failing
//!   record, starts the rebuild of new projections. Imports `rebuild`, `dlq`, `store`, `group`,
//!   `consumer`, `model`.
//! - `rebuild`: replays the log into `ts_rebuild` copies and switches them in; its consumer is
//!   assigned every partition by hand (not a group member). Imports `dlq` (the positions to skip),
//!   `store`, `consumer`, `model`.
//! - `status`: `projector status` (with each partition's owner) and the lag gauges (the status
//!   itself is `platform::projections`). Imports `reactor` (the reactions waiting after a
//!   failure) and `group` (the owners).
//! - `dlq`: dead letters and parking: decides which records of a live batch become dead letters or
//!   wait behind one (`park`, `apply_live`), `dlq list/replay/discard`. Imports `store`, `model`.
//! - `store`: PostgreSQL only: writes what it is given (rows, history, outbox, offsets with their
//!   compare-and-set) in the caller's transaction or its own. Imports `model`.
//! - `group`: the consumer group (KIP-848 protocol): the pure books of the assignment that the
//!   rebalance callbacks keep, the group member's consumer, and the owner rows shown by `status`.
//!   Imports `consumer` (the log readers' settings).
//! - `consumer`: the settings of every log reader, the rebuild's read_committed consumer and the
//!   live loop's batching (which stops early at a rebalance). Imports `model`.
//! - `model`: the pure fold: decoded batches and how events change the rows; no IO.
//!
//! The reactions stand apart from the projection path: `reactor` (outbox commands, reminders;
//! claimed with a lease in a short statement, sent concurrently, so several instances never send
//! the same one at once and no row lock is held across a request) starts and imports `webhooks`
//! (signed deliveries), whose retry schedule (`webhooks::RETRY`) the reactor shares, and `model`
//! (the reaction kinds it sends); `webhooks` imports nothing else of this crate.

pub mod consumer;
pub mod dlq;
pub mod group;
pub mod model;
pub mod reactor;
pub mod rebuild;
pub mod runner;
pub mod status;
pub mod store;
pub mod webhooks;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use clap::{Parser, Subcommand};
use sqlx::PgPool;

use platform::auth::JwtAuth;
use platform::db::Migrations;
use platform::keys::KeyRing;
use platform::secret::Secret;
use platform::settings::{DatabaseSettings, KafkaSettings, SecretPolicy};

use crate::runner::{RunSettings, Runner};

#[derive(Debug, Parser)]
#[command(name = "projector", about = "taskstream projector: log -> read models", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub settings: Settings,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Consume the log and maintain the read models (the default).
    Run,
    /// Print per projection: state, per-partition offset, high watermark and lag.
    Status,
    /// Replay the log from offset zero into fresh tables while the live ones keep serving, then
    /// switch to them atomically (progress on stderr; Ctrl-C aborts and leaves the live tables).
    Rebuild {
        /// Rebuild only this projection (repeatable; default: all).
        #[arg(long = "projection", value_name = "NAME")]
        projections: Vec<String>,
        /// Do not ask for confirmation (without a terminal it never asks).
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Inspect and re-drive dead letters (records that could not be decoded or applied).
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Erase a user (the right to be forgotten): their data keys are destroyed, the read models drop
    /// their rows. Sent to the command API as `DELETE /v1/me` with the service identity acting for
    /// the user (needs SERVICE_JWT_SECRET and COMMAND_API_URL).
    EraseUser {
        /// The user id (the `sub` of their tokens).
        user: String,
    },
    /// After a key-encryption key rotation (the new key first in TASKSTREAM_KEK, the old one still
    /// after it): wrap every user's data key with the new key, so the old one can be dropped. The log
    /// is not rewritten.
    RewrapKeys,
}

#[derive(Debug, Clone, Subcommand)]
pub enum DlqCommand {
    /// List open dead letters: id, key, type, original position, parked records, error.
    List {
        /// Also list replayed and discarded ones.
        #[arg(long)]
        all: bool,
    },
    /// Apply a dead letter again (after a fix), then the records parked behind it.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["id", "all"])))]
    Replay {
        /// The dead letter's id (see `dlq list`).
        id: Option<i64>,
        /// Every open dead letter, oldest first.
        #[arg(long)]
        all: bool,
    },
    /// Drop a dead letter and apply the records parked behind it.
    Discard {
        /// The dead letter's id (see `dlq list`).
        id: i64,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// Address of the health and metrics endpoint (port 0 picks a free port).
    #[arg(long, env = "PROJECTOR_ADDR", default_value = "127.0.0.1:8082", global = true)]
    pub addr: SocketAddr,
    /// This instance's id in the projectors' consumer group, shown by `projector status` as the
    /// owner of its partitions (default: `<hostname>:<port of PROJECTOR_ADDR>`).
    #[arg(long, env = "PROJECTOR_INSTANCE_ID", global = true)]
    pub instance_id: Option<String>,
    #[command(flatten)]
    pub kafka: KafkaSettings,
    #[command(flatten)]
    pub database: DatabaseSettings,
    /// Most records applied in one transaction.
    #[arg(long, env = "PROJECTOR_MAX_BATCH", default_value_t = 5_000, global = true)]
    pub max_batch: usize,
    /// Transactions one projector applies a batch in at once, each with whole partitions (live, and
    /// in a rebuild's replay).
    #[arg(long, env = "PROJECTOR_APPLY_PARALLELISM", default_value_t = 3, global = true, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub apply_parallelism: u16,
    /// How long a batch waits for more records after the first one.
    #[arg(long, env = "PROJECTOR_LINGER_MS", default_value_t = 2, global = true)]
    pub linger_ms: u64,
    /// The command API that reaction commands are sent to.
    #[arg(long, env = "COMMAND_API_URL", default_value = "http://127.0.0.1:8080", global = true)]
    pub command_api_url: String,
    /// Secret of the service identity the reactions act with (shared with the command API only).
    #[arg(long, env = "SERVICE_JWT_SECRET", global = true)]
    pub service_jwt_secret: Option<Secret>,
    /// Deliver webhooks to loopback/private addresses (local development only; `./dev` sets it).
    #[arg(long, env = "WEBHOOK_ALLOW_PRIVATE", default_value_t = false, global = true)]
    pub webhook_allow_private: bool,
    #[command(flatten)]
    pub kek: platform::keys::KekSettings,
    #[command(flatten)]
    pub secrets: SecretPolicy,
}

#[derive(Clone)]
struct AppState {
    pool: PgPool,
    migrations: Migrations,
    ready: Arc<AtomicBool>,
    membership: Arc<group::Membership>,
}

/// The header of `/readyz` that lists the partitions this instance applies (`0,3,7`; empty when
/// none).
pub const PARTITIONS_HEADER: &str = "projector-partitions";

pub fn router(pool: PgPool, migrations: Migrations, ready: Arc<AtomicBool>, membership: Arc<group::Membership>) -> Router {
    Router::new()
        .route("/healthz", get(platform::http::healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(platform::http::metrics))
        .with_state(AppState { pool, migrations, ready, membership })
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let owned: Vec<String> = s.membership.books().owned().iter().map(|(p, _)| p.to_string()).collect();
    ([(PARTITIONS_HEADER, owned.join(","))], readiness(&s).await)
}

async fn readiness(s: &AppState) -> (StatusCode, String) {
    if let Some(reason) = s.migrations.pending_reason() {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}"));
    }
    let db_ok = sqlx::query("SELECT 1").execute(&s.pool).await.is_ok();
    if db_ok && s.ready.load(Ordering::Acquire) {
        // Reactions refused for authentication or configuration reasons wait for an operator.
        if let Ok(Some((failure, error))) = reactor::configuration_failure(&s.pool).await {
            let reason = format!("not ready: reactions are refused ({}): {}; last error: {error}", failure.as_str(), failure.hint());
            return (StatusCode::SERVICE_UNAVAILABLE, reason);
        }
        (StatusCode::OK, "ready".to_owned())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: waiting for PostgreSQL or Kafka".to_owned())
    }
}

pub struct Application {
    listener: tokio::net::TcpListener,
    settings: Settings,
    pool: PgPool,
    keys: Arc<KeyRing>,
}

impl Application {
    /// Checks the secrets and binds the listener; PostgreSQL need not be up (see `run_until_stopped`).
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        settings.secrets.enforce(&[("SERVICE_JWT_SECRET", settings.service_jwt_secret.as_ref())])?;
        let keys = Arc::new(KeyRing::new(settings.kek.keks(settings.secrets.dev)?));
        platform::http::metrics_handle();
        let pool = platform::db::pool(&settings.database)?;
        let listener = platform::http::listen(settings.addr, "PROJECTOR_ADDR").await?;
        tracing::info!(addr = %listener.local_addr()?, "projector health/metrics listening");
        Ok(Self { listener, settings, pool, keys })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// This instance in the projectors' group (its id defaults to `<hostname>:<port>`).
    pub fn instance(&self) -> group::Instance {
        let addr = self.listener.local_addr().unwrap_or(self.settings.addr);
        group::Instance::new(self.settings.instance_id.clone(), addr)
    }

    /// Serves health and metrics at once; applies the migrations in the background (retrying while
    /// PostgreSQL is away, `/readyz` 503 meanwhile) and then starts the reactions, the live loop
    /// and the lag gauges.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let ready = Arc::new(AtomicBool::new(false));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        // The service key only signs; user tokens are never verified here.
        let service_auth = JwtAuth::new(&Secret::new(uuid::Uuid::new_v4().to_string())).with_service_secret(self.settings.service_jwt_secret.as_ref());
        let reactor = reactor::Reactor::new(self.pool.clone(), self.settings.command_api_url.clone(), service_auth, self.settings.webhook_allow_private)?
            .claiming_as(&self.instance().id)
            .with_keys(self.keys.clone());
        let wake = reactor.wake.clone();
        let membership = Arc::new(group::Membership::default());
        let runner = Runner::new(
            RunSettings {
                kafka: self.settings.kafka.clone(),
                database: self.settings.database.clone(),
                max_batch: self.settings.max_batch,
                apply_parallelism: usize::from(self.settings.apply_parallelism),
                linger: Duration::from_millis(self.settings.linger_ms),
                instance: self.instance(),
                keys: self.keys.clone(),
            },
            self.pool.clone(),
            ready.clone(),
            membership.clone(),
            wake,
        )?;
        let migrations = Migrations::in_background(self.pool.clone());
        let work = {
            let (migrations, pool, kafka) = (migrations.clone(), self.pool.clone(), self.settings.kafka.clone());
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = migrations.applied() => {}
                    _ = stop.wait_for(|stopped| *stopped) => return,
                }
                let reactions = tokio::spawn(reactor.run());
                let lag = tokio::spawn(status::export_lag(pool, kafka, Duration::from_secs(5)));
                runner.run(stop_rx).await;
                reactions.abort();
                lag.abort();
            })
        };
        let app = router(self.pool.clone(), migrations, ready, membership);
        axum::serve(self.listener, app).with_graceful_shutdown(platform::http::shutdown_signal()).await?;
        // Stop between batches: an in-flight transaction either commits or is rolled back.
        let _ = stop_tx.send(true);
        let _ = work.await;
        self.pool.close().await;
        Ok(())
    }
}

/// The data keys of a one-shot command, the keys topic read.
async fn started_keys(settings: &Settings) -> anyhow::Result<Arc<KeyRing>> {
    let keys = Arc::new(KeyRing::new(settings.kek.keks(settings.secrets.dev)?));
    keys.start(&settings.kafka, "taskstream-projector-cli").await?;
    Ok(keys)
}

/// `projector rebuild`.
pub async fn rebuild_cli(settings: Settings, projections: Vec<String>, yes: bool) -> anyhow::Result<()> {
    use std::io::{BufRead, IsTerminal, Write};
    let selected = rebuild::select(&projections)?;
    if !yes && std::io::stdin().is_terminal() && std::io::stderr().is_terminal() {
        eprint!(
            "Rebuild {} from offset zero of {}? The live tables keep serving until the switch. [y/N] ",
            selected.join(", "),
            settings.kafka.task_events_topic
        );
        std::io::stderr().flush()?;
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            eprintln!("nothing done");
            return Ok(());
        }
    }
    // Fail at once with a clear message when PostgreSQL is not there (a one-shot command).
    platform::db::connect(&settings.database).await?.close().await;
    let keys = started_keys(&settings).await?;
    let opts = rebuild::Options {
        kafka: settings.kafka,
        database: settings.database,
        projections: selected,
        max_batch: settings.max_batch,
        apply_parallelism: usize::from(settings.apply_parallelism),
        report: rebuild::Report::Cli,
        requested_by: "cli",
        keys,
    };
    let summary = rebuild::run(opts, async {
        platform::http::shutdown_signal().await;
        eprintln!("\nstopping: dropping the partial copies; the live tables are untouched");
    })
    .await?;
    println!("{}", summary.line());
    Ok(())
}

/// `projector erase-user USER`.
pub async fn erase_user_cli(settings: Settings, user: String) -> anyhow::Result<()> {
    let user = domain::UserId::parse(user).map_err(|e| anyhow::anyhow!("user id: {}", e.0))?;
    let auth = JwtAuth::new(&Secret::new(uuid::Uuid::new_v4().to_string())).with_service_secret(settings.service_jwt_secret.as_ref());
    let token =
        auth.issue_service("service:operator", &user, 300).ok_or_else(|| anyhow::anyhow!("SERVICE_JWT_SECRET must be set (the same as the command API's)"))?;
    let url = format!("{}/v1/me", settings.command_api_url.trim_end_matches('/'));
    let response = reqwest::Client::new()
        .delete(&url)
        .bearer_auth(token)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("DELETE {url}: {e}"))?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    anyhow::ensure!(status.is_success(), "the command API answered {status}: {body}");
    println!("user {user} erased: {body}");
    Ok(())
}

/// `projector rewrap-keys`.
pub async fn rewrap_keys_cli(settings: Settings) -> anyhow::Result<()> {
    platform::kafka::ensure_topics(&settings.kafka).await?;
    let keys = started_keys(&settings).await?;
    let n = keys.rewrap().await?;
    println!("{n} of {} data keys wrapped again with the current key-encryption key", keys.len());
    Ok(())
}

/// `projector dlq ...`.
pub async fn dlq_cli(settings: Settings, command: DlqCommand) -> anyhow::Result<()> {
    let pool = platform::db::connect(&settings.database).await?;
    platform::db::migrate(&pool).await?;
    let topic = settings.kafka.task_events_topic.clone();
    let ids: Vec<(i64, dlq::Release)> = match command {
        DlqCommand::List { all } => {
            print!("{}", dlq::render(&dlq::list(&pool, &topic, all).await?));
            return Ok(());
        }
        DlqCommand::Replay { id: Some(id), .. } => vec![(id, dlq::Release::Replay)],
        DlqCommand::Replay { id: None, .. } => dlq::list(&pool, &topic, false).await?.into_iter().map(|d| (d.id, dlq::Release::Replay)).collect(),
        DlqCommand::Discard { id } => vec![(id, dlq::Release::Discard)],
    };
    if ids.is_empty() {
        println!("no open dead letters");
        return Ok(());
    }
    let sink = dlq::DeadLetterSink::new(&settings.kafka)?;
    let keys = started_keys(&settings).await?;
    let mut failures = 0;
    for (id, how) in ids {
        match dlq::release(&pool, &sink, id, how, &keys).await {
            Ok(r) => {
                let verb = if how == dlq::Release::Replay { "replayed" } else { "discarded" };
                let extra = r.new_dead_letter.map(|n| format!("; a parked record failed in turn and is dead letter {n}")).unwrap_or_default();
                println!("dead letter {id} {verb}; {} record(s) applied{extra}", r.applied);
            }
            Err(e) => {
                failures += 1;
                eprintln!("dead letter {id}: {e}");
            }
        }
    }
    anyhow::ensure!(failures == 0, "{failures} dead letter(s) could not be released");
    Ok(())
}

/// `projector status`.
pub async fn print_status(settings: Settings) -> anyhow::Result<()> {
    let pool = platform::db::connect(&settings.database).await?;
    let statuses = status::collect(&pool, &settings.kafka).await?;
    let owners = group::owners(&pool, &settings.kafka.task_events_topic).await.unwrap_or_else(|e| {
        eprintln!("could not read the partitions' owners: {e}");
        Default::default()
    });
    print!("{}", status::render(&statuses, &owners));
    let open = dlq::list(&pool, &settings.kafka.task_events_topic, false).await?;
    if !open.is_empty() {
        let parked: i64 = open.iter().map(|d| d.parked).sum();
        println!("dead letters: {} open, {parked} record(s) parked behind them (projector dlq list)", open.len());
    }
    match (reactor::waiting(&pool).await, reactor::failed_for_good(&pool).await) {
        (Ok(waiting), Ok(failed)) => print!("{}", status::render_reactions(&waiting, failed)),
        (Err(e), _) | (_, Err(e)) => eprintln!("could not read the reactions' state: {e}"),
    }
    Ok(())
}
