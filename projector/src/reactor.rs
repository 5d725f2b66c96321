//! The reactions of the live projector: it sends the outbox's reaction commands (next occurrence
//! of a recurring task; a fired reminder's notification recorded in its user's stream) and fires
//! due reminders, all through the command API with a service identity, so validation and the
//! single-writer rule hold. Several projector instances run these loops side by side: each pass
//! claims its rows in one short statement (`FOR UPDATE SKIP LOCKED`, then a claim with an expiry:
//! `claimed_by`/`claimed_until` on the outbox row, the reminder's row in `reminder_attempts`), so
//! two instances never send the same row at once, and no row lock is held while the command API
//! answers (a batch touching the task never waits for it). The claimed rows are sent concurrently
//! (bounded) and each outcome is recorded afterwards. Every command is deterministic (ids derived
//! from the triggering event, decided by the state of the stream it names), so a re-send after a
//! crash, or after a claim expired, changes nothing. Never runs during a replay.
//!
//! Every answer is classified once ([`classify`]): only a definitive one ends a reaction or a
//! reminder (done, or already done / no longer applicable); authentication, configuration and
//! availability failures are retried with backoff for as long as they last, counted
//! (`reaction_failures_total`, `reactions_waiting`) and reported by `/readyz` and `projector status`
//! ([`waiting`], [`configuration_failure`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::stream::{self, StreamExt};
use serde_json::json;
use sqlx::PgPool;
use tokio::sync::Notify;
use tracing::Instrument;
use uuid::Uuid;

use domain::UserId;
use platform::auth::JwtAuth;
use platform::keys::KeyRing;

use crate::model::{RECORD_NOTIFICATION, SPAWN_OCCURRENCE};
use crate::webhooks::{Deliverer, RETRY};

/// The identity the projector acts as.
pub const SERVICE: &str = "service:projector";
/// What a due reminder is sent as (`POST /internal/v1/tasks/{id}/remind`), in metrics and status;
/// the outbox's reactions are named by their kind (`model::SPAWN_OCCURRENCE`, ...).
pub const FIRE_REMINDER: &str = "fire_reminder";
/// Every reaction name used in metrics and status.
pub const REACTIONS: [&str; 3] = [SPAWN_OCCURRENCE, RECORD_NOTIFICATION, FIRE_REMINDER];
/// The prefix of the command API's problem types (`urn:taskstream:problem:<slug>`).
const PROBLEM: &str = "urn:taskstream:problem:";
/// Passes of the reminder loop between two clean-ups of `reminder_attempts` (about a minute).
const CLEAN_UP_EVERY: u32 = 240;
/// How long a claim keeps the other instances off a reaction or a reminder: longer than the
/// requests of one pass take at worst ([`PER_PASS`] / [`CONCURRENCY`] rounds of the 10 s request
/// timeout). A crashed instance's claims expire after it (a restarted one drops its own at once).
const CLAIM: Duration = Duration::from_secs(30);
/// Requests in flight at once, per loop: enough to keep the command API's writers batching (5 000
/// reminders due at once, `loadgen --scale 0.5 reminders` on the 2-core box: the last fired 21.4 s
/// after due with 32 in flight, 17.7 s with 128, 13.8 s with 256).
const CONCURRENCY: usize = 256;
/// Rows claimed per pass (two rounds of [`CONCURRENCY`]).
const PER_PASS: i64 = 512;

/// Why a reaction or a reminder has not gone through; stored as text (`failure` columns).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Failure {
    /// 401/403, or no `SERVICE_JWT_SECRET`: the command API does not accept the projector's service
    /// identity.
    Auth,
    /// An answer that is not the command API's problem+json (a 404 of another server, a redirect)
    /// or one it never gives to a reaction (405): `COMMAND_API_URL` points elsewhere or the
    /// releases differ.
    Config,
    /// 5xx, 408, 429, a timeout or a connection error.
    Unavailable,
    /// The command API refused the command for what it says (400, 413, 415, 422): an outbox row
    /// is then marked failed for good; a reminder is kept and retried (only "stale" ends one).
    Refused,
}

impl Failure {
    pub const ALL: [Failure; 4] = [Failure::Auth, Failure::Config, Failure::Unavailable, Failure::Refused];

    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Auth => "auth",
            Failure::Config => "config",
            Failure::Unavailable => "unavailable",
            Failure::Refused => "refused",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.as_str() == s)
    }

    /// Whether the projector (or the command API) is misconfigured: `/readyz` answers 503 while a
    /// reaction or a reminder waits with such a failure.
    pub fn is_configuration(self) -> bool {
        matches!(self, Failure::Auth | Failure::Config)
    }

    /// What an operator should look at.
    pub fn hint(self) -> &'static str {
        match self {
            Failure::Auth => {
                "the command API refuses the projector's service identity: SERVICE_JWT_SECRET must be set, and the same in the projector and the command API"
            }
            Failure::Config => "the answers are not the command API's: check COMMAND_API_URL and that both run the same release",
            Failure::Unavailable => "the command API is unavailable or overloaded",
            Failure::Refused => "the command API refuses these reminders; they are kept and retried",
        }
    }
}

/// What the command API's answer to a reaction or a reminder means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Carried out now (2xx).
    Done,
    /// Nothing (more) to do: carried out before, or no longer applicable. 404 `not-found` (the
    /// task is gone), 409 `conflict` (the occurrence or the notification exists, the reminder
    /// already fired or was moved), 422 `idempotency-key-reused`: the command API remembers a key
    /// only for a command that succeeded, so a command under this reaction's key was carried out
    /// before (the next occurrence created by an earlier completion of the same occurrence, whose
    /// body differs when the task was edited in between).
    AlreadyDone,
    /// Not carried out: why, the status (none when nothing was answered) and what was answered.
    Failed { failure: Failure, status: Option<u16>, error: String },
}

/// Classifies an answer from its status and body (problem+json for every 4xx and 5xx of the command
/// API). Only a definitive answer of the command API itself ends a reaction or a reminder.
pub fn classify(status: u16, body: &str) -> Verdict {
    let problem = serde_json::from_str::<serde_json::Value>(body).ok().and_then(|v| v.get("type")?.as_str()?.strip_prefix(PROBLEM).map(str::to_owned));
    let failed = |failure| {
        let mut error = format!("command API answered {status}: {}", body.trim());
        if error.len() > 300 {
            let end = (0..=300).rev().find(|i| error.is_char_boundary(*i)).unwrap_or(0);
            error.truncate(end);
            error.push_str("...");
        }
        Verdict::Failed { failure, status: Some(status), error }
    };
    match (status, problem.as_deref()) {
        (200..=299, _) => Verdict::Done,
        (404, Some("not-found")) | (409, Some("conflict")) | (422, Some("idempotency-key-reused")) => Verdict::AlreadyDone,
        (401 | 403, _) => failed(Failure::Auth),
        (408 | 429 | 500..=599, _) => failed(Failure::Unavailable),
        (400 | 413 | 415 | 422, Some(_)) => failed(Failure::Refused),
        _ => failed(Failure::Config),
    }
}

/// Counts a failed attempt: `reaction_failures_total{reaction, failure, status}`.
fn count_failure(reaction: &str, failure: Failure, status: Option<u16>) {
    let status = status.map_or_else(|| "none".to_owned(), |s| s.to_string());
    metrics::counter!("reaction_failures_total", "reaction" => reaction.to_owned(), "failure" => failure.as_str(), "status" => status).increment(1);
}

/// Logs a failed attempt: an error when an operator must act, a warning otherwise.
fn log_failure(reaction: &str, id: &str, attempts: i32, failure: Failure, error: &str) {
    if failure.is_configuration() {
        tracing::error!(reaction, id, attempts, failure = failure.as_str(), error.message = %error, hint = failure.hint(), "the command API refused a reaction; it is kept and retried");
    } else {
        tracing::warn!(reaction, id, attempts, failure = failure.as_str(), error.message = %error, "a reaction did not go through; it is kept and retried");
    }
}

#[derive(Clone)]
pub struct Reactor {
    pool: PgPool,
    http: reqwest::Client,
    command_api: String,
    auth: JwtAuth,
    /// Woken when a batch recorded reactions (the loops also poll).
    pub wake: Arc<Notify>,
    allow_private_webhooks: bool,
    /// Who claims rows: the projector instance's id.
    claimant: String,
    /// The users' data keys: the webhooks' signing secrets are sealed with them.
    keys: Arc<KeyRing>,
}

impl Reactor {
    pub fn new(pool: PgPool, command_api: String, auth: JwtAuth, allow_private_webhooks: bool) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
        let command_api = command_api.trim_end_matches('/').to_owned();
        let claimant = format!("reactor-{}", Uuid::new_v4());
        let keys = KeyRing::in_memory(platform::keys::Keks::dev());
        Ok(Self { pool, http, command_api, auth, wake: Arc::default(), allow_private_webhooks, claimant, keys })
    }

    /// Opens the webhooks' signing secrets with these data keys (the process's; by default an
    /// empty ring, which opens only secrets stored in plain text).
    pub fn with_keys(mut self, keys: Arc<KeyRing>) -> Self {
        self.keys = keys;
        self
    }

    /// Claims rows as `instance` (the projector instance's id; a random one by default).
    pub fn claiming_as(mut self, instance: &str) -> Self {
        self.claimant = instance.to_owned();
        self
    }

    /// Runs the loops until the process stops.
    pub async fn run(self) {
        if let Err(e) = retry_waiting_now(&self.pool, &self.claimant).await {
            tracing::warn!(error.message = %e, "could not move the waiting reactions' next attempt forward");
        }
        let outbox = self.clone();
        tokio::spawn(async move { outbox.outbox_loop().await });
        let hooks = Deliverer::new(self.pool.clone(), self.keys.clone(), self.allow_private_webhooks, self.wake.clone());
        tokio::spawn(hooks.run());
        self.reminder_loop().await;
    }

    async fn send(&self, user: &str, path: &str, body: &serde_json::Value, headers: &[(&str, String)]) -> Verdict {
        let Ok(user) = UserId::parse(user.to_owned()) else {
            return Verdict::Failed { failure: Failure::Refused, status: None, error: format!("invalid user id {user:?}") };
        };
        let Some(token) = self.auth.issue_service(SERVICE, &user, 300) else {
            return Verdict::Failed { failure: Failure::Auth, status: None, error: "SERVICE_JWT_SECRET is not configured".into() };
        };
        let mut req = self.http.post(format!("{}{path}", self.command_api)).bearer_auth(token).json(body);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        match req.send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                let text = if r.status().is_success() { String::new() } else { r.text().await.unwrap_or_default() };
                classify(status, &text)
            }
            Err(e) => Verdict::Failed { failure: Failure::Unavailable, status: None, error: e.to_string() },
        }
    }

    async fn outbox_loop(self) {
        loop {
            match self.send_outbox().await {
                Ok(n) if n > 0 => continue,
                Ok(_) => {}
                Err(e) => tracing::warn!(error.message = %e, "reaction outbox pass failed"),
            }
            tokio::select! {
                _ = self.wake.notified() => {},
                _ = tokio::time::sleep(Duration::from_millis(500)) => {},
            }
        }
    }

    /// Sends the due outbox rows; returns how many were handled. They are claimed first (a short
    /// statement, [`CLAIM`]), then sent concurrently ([`CONCURRENCY`]) with no lock held, and
    /// each outcome is recorded: a row is deleted once done or already done, marked failed when the
    /// command API refuses it for what it says, and otherwise retried with backoff
    /// (`webhooks::RETRY`) for as long as it takes.
    pub async fn send_outbox(&self) -> Result<usize, sqlx::Error> {
        let rows: Vec<OutboxRow> = sqlx::query_as(
            "UPDATE reaction_outbox o SET claimed_by = $1, claimed_until = now() + make_interval(secs => $2)
             FROM (SELECT id FROM reaction_outbox
                   WHERE NOT failed AND next_attempt_at <= now() AND (claimed_until IS NULL OR claimed_until < now())
                   ORDER BY created_at LIMIT $3 FOR UPDATE SKIP LOCKED) due
             WHERE o.id = due.id
             RETURNING o.id, o.kind, o.user_id, o.payload, o.causation_id, o.correlation_id, o.traceparent, o.attempts",
        )
        .bind(&self.claimant)
        .bind(CLAIM.as_secs_f64())
        .bind(PER_PASS)
        .fetch_all(&self.pool)
        .await?;
        let n = rows.len();
        let outcomes: Vec<Result<Option<Uuid>, sqlx::Error>> =
            stream::iter(rows).map(|row| self.send_reaction(row)).buffer_unordered(CONCURRENCY).collect().await;
        // The rows done go in one statement (a burst of reactions costs one round trip, not one
        // each). Until then they stay claimed; should this instance die first, they are sent again
        // after their claim and answered as already done.
        let done = outcomes.into_iter().filter_map(Result::transpose).collect::<Result<Vec<Uuid>, _>>()?;
        if !done.is_empty() {
            sqlx::query("DELETE FROM reaction_outbox WHERE id = ANY($1)").bind(&done).execute(&self.pool).await?;
        }
        Ok(n)
    }

    /// Sends one claimed outbox row and records a failure; `Some(id)` when it is done (the caller
    /// deletes the rows done together).
    async fn send_reaction(&self, (id, kind, user, payload, causation, correlation, traceparent, attempts): OutboxRow) -> Result<Option<Uuid>, sqlx::Error> {
        let mut headers = vec![("Idempotency-Key", format!("reaction:{id}")), ("X-Causation-Id", causation.to_string())];
        if let Some(c) = correlation {
            headers.push(("X-Correlation-Id", c));
        }
        // The reaction continues the trace of the event that called for it.
        let span = tracing::info_span!("reaction", kind = %kind, reaction = %id, trace_id = tracing::field::Empty, correlation_id = ?correlation_of(&headers));
        platform::telemetry::continue_trace(&span, traceparent.as_deref());
        if let Some(t) = platform::telemetry::traceparent(&span).or(traceparent) {
            headers.push(("traceparent", t));
        }
        let verdict = match kind.as_str() {
            SPAWN_OCCURRENCE => self.send(&user, "/v1/tasks", &payload, &headers).instrument(span).await,
            RECORD_NOTIFICATION => self.send(&user, &format!("/internal/v1/notifications/{id}"), &payload, &headers).instrument(span).await,
            other => Verdict::Failed { failure: Failure::Refused, status: None, error: format!("unknown reaction kind {other}") },
        };
        match verdict {
            Verdict::Done | Verdict::AlreadyDone => {
                metrics::counter!("reactions_total", "kind" => kind.clone(), "outcome" => "done").increment(1);
                return Ok(Some(id));
            }
            Verdict::Failed { failure: Failure::Refused, status, error } => {
                count_failure(&kind, Failure::Refused, status);
                metrics::counter!("reactions_total", "kind" => kind.clone(), "outcome" => "failed").increment(1);
                tracing::error!(reaction = %id, error.message = %error, "the command API refused a reaction; it stays in reaction_outbox with failed = true");
                sqlx::query(
                    "UPDATE reaction_outbox SET attempts = attempts + 1, last_error = $2, failure = $3, failed = true, claimed_until = NULL
                     WHERE id = $1",
                )
                .bind(id)
                .bind(&error)
                .bind(Failure::Refused.as_str())
                .execute(&self.pool)
                .await?;
            }
            Verdict::Failed { failure, status, error } => {
                count_failure(&kind, failure, status);
                metrics::counter!("reactions_total", "kind" => kind.clone(), "outcome" => "retry").increment(1);
                log_failure(&kind, &id.to_string(), attempts + 1, failure, &error);
                let delay = RETRY.delay(u32::try_from(attempts).unwrap_or(0));
                sqlx::query(
                    "UPDATE reaction_outbox SET attempts = attempts + 1, last_error = $2, failure = $3,
                     next_attempt_at = now() + make_interval(secs => $4), claimed_until = NULL WHERE id = $1",
                )
                .bind(id)
                .bind(&error)
                .bind(failure.as_str())
                .bind(delay.as_secs_f64())
                .execute(&self.pool)
                .await?;
            }
        }
        Ok(None)
    }

    async fn reminder_loop(self) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut passes = 0u32;
        loop {
            match self.fire_due_reminders().await {
                // A full pass: more may be due, go on at once.
                Ok(n) if n as i64 >= PER_PASS => {}
                Ok(_) => {
                    tick.tick().await;
                }
                Err(e) => {
                    tracing::warn!(error.message = %e, "reminder scheduler pass failed");
                    tick.tick().await;
                }
            }
            passes = passes.wrapping_add(1);
            if passes.is_multiple_of(CLEAN_UP_EVERY) {
                if let Err(e) = forget_unscheduled_attempts(&self.pool).await {
                    tracing::warn!(error.message = %e, "could not clean up reminder_attempts");
                }
            }
        }
    }

    /// Fires every reminder whose time (and, after a failure, whose next attempt) has come; returns
    /// how many were handled. The due reminders are claimed in one short statement (their claim in
    /// `reminder_attempts`, [`CLAIM`]; no lock is held afterwards, so a batch touching their tasks
    /// never waits for the command API), fired concurrently ([`CONCURRENCY`]), and each outcome is
    /// recorded. Only a definitive answer removes a reminder from the schedule: fired, or stale
    /// (404: the task is gone; 409: the reminder already fired or was moved). Any other answer
    /// keeps it, with its next attempt in `reminder_attempts` (backoff as `webhooks::RETRY`).
    pub async fn fire_due_reminders(&self) -> Result<usize, sqlx::Error> {
        let due: Vec<DueReminder> = sqlx::query_as(
            "WITH due AS (
                SELECT s.task_id, s.user_id, s.remind_at, COALESCE(a.attempts, 0) AS attempts
                FROM reminder_schedule s
                LEFT JOIN reminder_attempts a ON a.task_id = s.task_id AND a.remind_at = s.remind_at
                WHERE s.remind_at <= now() AND (a.next_attempt_at IS NULL OR a.next_attempt_at <= now())
                  AND (a.claimed_until IS NULL OR a.claimed_until < now())
                ORDER BY s.remind_at LIMIT $3
                FOR UPDATE OF s SKIP LOCKED
             ), claimed AS (
                INSERT INTO reminder_attempts (task_id, remind_at, claimed_by, claimed_until)
                SELECT task_id, remind_at, $1, now() + make_interval(secs => $2) FROM due
                ON CONFLICT (task_id, remind_at) DO UPDATE SET claimed_by = EXCLUDED.claimed_by, claimed_until = EXCLUDED.claimed_until
                WHERE reminder_attempts.claimed_until IS NULL OR reminder_attempts.claimed_until < now()
                RETURNING task_id, remind_at
             )
             SELECT d.task_id, d.user_id, d.remind_at, d.attempts FROM due d
             JOIN claimed c ON c.task_id = d.task_id AND c.remind_at = d.remind_at",
        )
        .bind(&self.claimant)
        .bind(CLAIM.as_secs_f64())
        .bind(PER_PASS)
        .fetch_all(&self.pool)
        .await?;
        let n = due.len();
        let outcomes: Vec<Result<Option<FiredReminder>, sqlx::Error>> = stream::iter(due).map(|r| self.fire(r)).buffer_unordered(CONCURRENCY).collect().await;
        // The reminders fired leave the schedule in one statement (10 000 due at once cost a few
        // round trips, not 10 000). Until then their claims hold them; should this instance die
        // first, they are fired again after the claim and answered 409 (already fired). Rows that
        // a batch being applied holds are skipped, never waited for: that batch removes or moves
        // them itself (it applies their `task.reminder_due` or a reschedule), and waiting could
        // deadlock with it (both lock several rows), which PostgreSQL breaks only after a second.
        // A skipped one keeps its claim: if it is still scheduled when the claim ends, it is fired
        // again and answered 409 (already fired), which removes it.
        let (tasks, times): (Vec<Uuid>, Vec<DateTime<Utc>>) =
            outcomes.into_iter().filter_map(Result::transpose).collect::<Result<Vec<_>, _>>()?.into_iter().unzip();
        if !tasks.is_empty() {
            sqlx::query(
                "WITH fired AS (
                    SELECT s.task_id, s.remind_at FROM reminder_schedule s
                    JOIN UNNEST($1::uuid[], $2::timestamptz[]) AS f(task_id, remind_at) ON s.task_id = f.task_id AND s.remind_at = f.remind_at
                    FOR UPDATE OF s SKIP LOCKED
                 ), gone AS (
                    DELETE FROM reminder_schedule s USING fired WHERE s.task_id = fired.task_id AND s.remind_at = fired.remind_at
                 )
                 DELETE FROM reminder_attempts a USING fired WHERE a.task_id = fired.task_id AND a.remind_at = fired.remind_at",
            )
            .bind(&tasks)
            .bind(&times)
            .execute(&self.pool)
            .await?;
        }
        Ok(n)
    }

    /// Fires one claimed reminder and records a failure; `Some` when it fired or had fired already
    /// (the caller removes those from the schedule together).
    async fn fire(&self, (task, user, remind_at, attempts): DueReminder) -> Result<Option<FiredReminder>, sqlx::Error> {
        let started = Instant::now();
        let delay = (Utc::now() - remind_at).num_milliseconds().max(0) as f64 / 1000.0;
        metrics::histogram!("reminder_scheduler_delay_seconds").record(delay);
        let body = json!({ "remind_at": remind_at });
        match self.send(&user, &format!("/internal/v1/tasks/{task}/remind"), &body, &[]).await {
            Verdict::Done | Verdict::AlreadyDone => {
                metrics::counter!("reminders_fired_total").increment(1);
                tracing::debug!(task_id = %task, elapsed_ms = started.elapsed().as_millis() as u64, "reminder fired");
                return Ok(Some((task, remind_at)));
            }
            Verdict::Failed { failure, status, error } => {
                count_failure(FIRE_REMINDER, failure, status);
                log_failure(FIRE_REMINDER, &task.to_string(), attempts + 1, failure, &error);
                let delay = RETRY.delay(u32::try_from(attempts).unwrap_or(0));
                sqlx::query(
                    "INSERT INTO reminder_attempts (task_id, remind_at, attempts, next_attempt_at, failure, last_error)
                     VALUES ($1, $2, 1, now() + make_interval(secs => $3), $4, $5)
                     ON CONFLICT (task_id, remind_at) DO UPDATE SET attempts = reminder_attempts.attempts + 1,
                        next_attempt_at = EXCLUDED.next_attempt_at, failure = EXCLUDED.failure, last_error = EXCLUDED.last_error,
                        claimed_until = NULL",
                )
                .bind(task)
                .bind(remind_at)
                .bind(delay.as_secs_f64())
                .bind(failure.as_str())
                .bind(&error)
                .execute(&self.pool)
                .await?;
            }
        }
        tracing::debug!(task_id = %task, elapsed_ms = started.elapsed().as_millis() as u64, "reminder not fired");
        Ok(None)
    }
}

/// An outbox row as claimed: id, kind, user, payload, causation, correlation, traceparent, attempts.
type OutboxRow = (Uuid, String, String, serde_json::Value, Uuid, Option<String>, Option<String>, i32);
/// A due reminder as claimed: task, user, remind time, failed attempts so far.
type DueReminder = (Uuid, String, DateTime<Utc>, i32);
/// A reminder that fired or had fired already: its task and the time it was for.
type FiredReminder = (Uuid, DateTime<Utc>);

/// At start (a restart often follows a fix of the configuration): every reaction and reminder
/// waiting after a failure is tried again at once instead of at the end of its backoff.
/// The claims this instance held before it restarted are dropped: nothing of it is sending them.
async fn retry_waiting_now(pool: &PgPool, claimant: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE reaction_outbox SET next_attempt_at = now() WHERE NOT failed AND failure IS NOT NULL AND next_attempt_at > now()")
        .execute(pool)
        .await?;
    sqlx::query("UPDATE reminder_attempts SET next_attempt_at = now() WHERE next_attempt_at > now()").execute(pool).await?;
    sqlx::query("UPDATE reaction_outbox SET claimed_until = NULL WHERE claimed_by = $1").bind(claimant).execute(pool).await?;
    sqlx::query("UPDATE reminder_attempts SET claimed_until = NULL WHERE claimed_by = $1").bind(claimant).execute(pool).await?;
    Ok(())
}

/// Deletes the attempts of reminders that left the schedule (moved, cancelled, fired).
async fn forget_unscheduled_attempts(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query(
        "DELETE FROM reminder_attempts a
         WHERE NOT EXISTS (SELECT 1 FROM reminder_schedule s WHERE s.task_id = a.task_id AND s.remind_at = a.remind_at)",
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Reactions (by name, [`REACTIONS`]) waiting for another attempt after failing with `failure`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    pub reaction: String,
    pub failure: Failure,
    pub count: i64,
    /// The error of one of them.
    pub last_error: String,
}

/// The reactions and reminders waiting for another attempt after a failure, by reaction and
/// failure (outbox rows marked failed are not waiting: see [`failed_for_good`]).
pub async fn waiting(pool: &PgPool) -> Result<Vec<Waiting>, sqlx::Error> {
    let rows: Vec<(String, String, i64, String)> = sqlx::query_as(
        "SELECT kind, failure, count(*), COALESCE(max(last_error), '') FROM reaction_outbox
         WHERE NOT failed AND failure IS NOT NULL GROUP BY kind, failure
         UNION ALL
         SELECT $1::text, a.failure, count(*), COALESCE(max(a.last_error), '') FROM reminder_attempts a
         JOIN reminder_schedule s ON s.task_id = a.task_id AND s.remind_at = a.remind_at
         WHERE a.failure IS NOT NULL
         GROUP BY a.failure
         ORDER BY 1, 2",
    )
    .bind(FIRE_REMINDER)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(reaction, failure, count, last_error)| Some(Waiting { reaction, failure: Failure::parse(&failure)?, count, last_error }))
        .collect())
}

/// Outbox rows the command API refused for good (`failed`), kept for an operator.
pub async fn failed_for_good(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM reaction_outbox WHERE failed").fetch_one(pool).await
}

/// A reaction or a reminder waiting after an authentication or configuration failure, if any:
/// its failure and error (for `/readyz`).
pub async fn configuration_failure(pool: &PgPool) -> Result<Option<(Failure, String)>, sqlx::Error> {
    let kinds: Vec<&str> = Failure::ALL.into_iter().filter(|f| f.is_configuration()).map(Failure::as_str).collect();
    let row: Option<(String, String)> = sqlx::query_as(
        "(SELECT failure, COALESCE(last_error, '') FROM reaction_outbox WHERE NOT failed AND failure = ANY($1) LIMIT 1)
         UNION ALL
         (SELECT a.failure, COALESCE(a.last_error, '') FROM reminder_attempts a
          JOIN reminder_schedule s ON s.task_id = a.task_id AND s.remind_at = a.remind_at
          WHERE a.failure = ANY($1) LIMIT 1)
         LIMIT 1",
    )
    .bind(&kinds)
    .fetch_optional(pool)
    .await?;
    Ok(row.and_then(|(f, e)| Some((Failure::parse(&f)?, e))))
}

fn correlation_of<'a>(headers: &'a [(&str, String)]) -> Option<&'a str> {
    headers.iter().find(|(k, _)| *k == "X-Correlation-Id").map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(status: u16, slug: &str) -> String {
        json!({ "type": format!("{PROBLEM}{slug}"), "title": "x", "status": status, "detail": "x" }).to_string()
    }

    fn failure(v: &Verdict) -> Option<Failure> {
        match v {
            Verdict::Failed { failure, .. } => Some(*failure),
            _ => None,
        }
    }

    #[test]
    fn only_definitive_answers_of_the_command_api_end_a_reaction() {
        assert_eq!(classify(200, ""), Verdict::Done);
        assert_eq!(classify(201, "{}"), Verdict::Done);
        // Stale or already done: the task is gone, the thing exists, the key's command succeeded.
        assert_eq!(classify(404, &problem(404, "not-found")), Verdict::AlreadyDone);
        assert_eq!(classify(409, &problem(409, "conflict")), Verdict::AlreadyDone);
        assert_eq!(classify(422, &problem(422, "idempotency-key-reused")), Verdict::AlreadyDone);
        // Retried: authentication, configuration, availability.
        for (status, body, want) in [
            (401, problem(401, "unauthorized"), Failure::Auth),
            (401, String::new(), Failure::Auth),
            (403, "forbidden".to_owned(), Failure::Auth),
            (404, "<html>not found</html>".to_owned(), Failure::Config),
            (404, json!({"type": "about:blank"}).to_string(), Failure::Config),
            (409, "conflict".to_owned(), Failure::Config),
            (405, problem(405, "method-not-allowed"), Failure::Config),
            (302, String::new(), Failure::Config),
            (422, "{}".to_owned(), Failure::Config),
            (500, problem(500, "internal"), Failure::Unavailable),
            (503, problem(503, "log-unavailable"), Failure::Unavailable),
            (502, "bad gateway".to_owned(), Failure::Unavailable),
            (429, String::new(), Failure::Unavailable),
            (408, String::new(), Failure::Unavailable),
            // Refused for what the command says.
            (422, problem(422, "validation"), Failure::Refused),
            (400, problem(400, "bad-request"), Failure::Refused),
            (413, problem(413, "payload-too-large"), Failure::Refused),
            (415, problem(415, "unsupported-media-type"), Failure::Refused),
        ] {
            assert_eq!(failure(&classify(status, &body)), Some(want), "{status} {body}");
        }
        let Verdict::Failed { status, error, .. } = classify(401, &problem(401, "unauthorized")) else { panic!() };
        assert_eq!(status, Some(401));
        assert!(error.starts_with("command API answered 401: {"), "{error}");
        let Verdict::Failed { error, .. } = classify(502, &"é".repeat(1000)) else { panic!() };
        assert!(error.len() <= 303 && error.ends_with("..."), "{error}");
    }

    #[test]
    fn only_auth_and_config_failures_make_the_projector_unready() {
        let blocking: Vec<&str> = Failure::ALL.into_iter().filter(|f| f.is_configuration()).map(Failure::as_str).collect();
        assert_eq!(blocking, ["auth", "config"]);
        for f in Failure::ALL {
            assert_eq!(Failure::parse(f.as_str()), Some(f));
        }
        assert_eq!(Failure::parse("nope"), None);
    }
}
