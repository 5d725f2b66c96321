//! The reactions of the live projector: it sends the outbox's reaction commands (next occurrence
//! of a recurring task; a fired reminder's notification recorded in its user's stream) and fires
//! due reminders, all through the command API with a service identity, so validation and the
//! single-writer rule hold. Both loops take their rows with FOR UPDATE SKIP LOCKED, so two projector
//! instances never send the same row at once, and every command is deterministic (ids derived from
//! the triggering event, decided by the state of the stream it names), so a re-send after a crash
//! changes nothing. Never runs during a replay.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use serde_json::json;
use sqlx::PgPool;
use tokio::sync::Notify;
use tracing::Instrument;
use uuid::Uuid;

use domain::UserId;
use platform::auth::JwtAuth;

use crate::model::{RECORD_NOTIFICATION, SPAWN_OCCURRENCE};
use crate::webhooks::{Deliverer, RETRY};

/// The identity the projector acts as.
pub const SERVICE: &str = "service:projector";
const MAX_ATTEMPTS: i32 = 12;

#[derive(Clone)]
pub struct Reactor {
    pool: PgPool,
    http: reqwest::Client,
    command_api: String,
    auth: JwtAuth,
    /// Woken when a batch recorded reactions (the loops also poll).
    pub wake: Arc<Notify>,
    allow_private_webhooks: bool,
}

/// What became of one command.
enum Outcome {
    Done,
    Retry(String),
    Failed(String),
}

impl Reactor {
    pub fn new(pool: PgPool, command_api: String, auth: JwtAuth, allow_private_webhooks: bool) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
        Ok(Self { pool, http, command_api: command_api.trim_end_matches('/').to_owned(), auth, wake: Arc::default(), allow_private_webhooks })
    }

    /// Runs the loops until the process stops.
    pub async fn run(self) {
        let outbox = self.clone();
        tokio::spawn(async move { outbox.outbox_loop().await });
        let hooks = Deliverer::new(self.pool.clone(), self.allow_private_webhooks, self.wake.clone());
        tokio::spawn(hooks.run());
        self.reminder_loop().await;
    }

    async fn send(&self, user: &str, path: &str, body: &serde_json::Value, headers: &[(&str, String)]) -> Outcome {
        let Ok(user) = UserId::parse(user.to_owned()) else { return Outcome::Failed(format!("invalid user id {user:?}")) };
        let Some(token) = self.auth.issue_service(SERVICE, &user, 300) else {
            return Outcome::Failed("SERVICE_JWT_SECRET is not configured".into());
        };
        let mut req = self.http.post(format!("{}{path}", self.command_api)).bearer_auth(token).json(body);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        match req.send().await {
            // 409: already done (the occurrence exists / the reminder already fired or is stale /
            // the notification is already recorded).
            Ok(r) if r.status().is_success() || r.status() == StatusCode::CONFLICT || r.status() == StatusCode::NOT_FOUND => Outcome::Done,
            Ok(r) if r.status().is_server_error() || r.status() == StatusCode::TOO_MANY_REQUESTS => {
                Outcome::Retry(format!("command API answered {}", r.status()))
            }
            Ok(r) => {
                let status = r.status();
                Outcome::Failed(format!("command API answered {status}: {}", r.text().await.unwrap_or_default()))
            }
            Err(e) => Outcome::Retry(e.to_string()),
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

    /// Sends the due outbox rows; returns how many were handled.
    async fn send_outbox(&self) -> Result<usize, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let rows: Vec<(Uuid, String, String, serde_json::Value, Uuid, Option<String>, Option<String>, i32)> = sqlx::query_as(
            "SELECT id, kind, user_id, payload, causation_id, correlation_id, traceparent, attempts FROM reaction_outbox
             WHERE NOT failed AND next_attempt_at <= now() ORDER BY created_at LIMIT 50 FOR UPDATE SKIP LOCKED",
        )
        .fetch_all(&mut *tx)
        .await?;
        let n = rows.len();
        for (id, kind, user, payload, causation, correlation, traceparent, attempts) in rows {
            let mut headers = vec![("Idempotency-Key", format!("reaction:{id}")), ("X-Causation-Id", causation.to_string())];
            if let Some(c) = correlation {
                headers.push(("X-Correlation-Id", c));
            }
            // The reaction continues the trace of the event that called for it.
            let span =
                tracing::info_span!("reaction", kind = %kind, reaction = %id, trace_id = tracing::field::Empty, correlation_id = ?correlation_of(&headers));
            platform::telemetry::continue_trace(&span, traceparent.as_deref());
            if let Some(t) = platform::telemetry::traceparent(&span).or(traceparent) {
                headers.push(("traceparent", t));
            }
            let outcome = match kind.as_str() {
                SPAWN_OCCURRENCE => self.send(&user, "/v1/tasks", &payload, &headers).instrument(span).await,
                RECORD_NOTIFICATION => self.send(&user, &format!("/internal/v1/notifications/{id}"), &payload, &headers).instrument(span).await,
                other => Outcome::Failed(format!("unknown reaction kind {other}")),
            };
            match outcome {
                Outcome::Done => {
                    metrics::counter!("reactions_total", "kind" => kind.clone(), "outcome" => "done").increment(1);
                    sqlx::query("DELETE FROM reaction_outbox WHERE id = $1").bind(id).execute(&mut *tx).await?;
                }
                Outcome::Retry(e) if attempts + 1 < MAX_ATTEMPTS => {
                    metrics::counter!("reactions_total", "kind" => kind.clone(), "outcome" => "retry").increment(1);
                    tracing::warn!(reaction = %id, attempts = attempts + 1, error.message = %e, "reaction will be retried");
                    let delay = RETRY.delay(u32::try_from(attempts).unwrap_or(0));
                    sqlx::query(
                        "UPDATE reaction_outbox SET attempts = attempts + 1, last_error = $2,
                         next_attempt_at = now() + make_interval(secs => $3) WHERE id = $1",
                    )
                    .bind(id)
                    .bind(&e)
                    .bind(delay.as_secs_f64())
                    .execute(&mut *tx)
                    .await?;
                }
                Outcome::Retry(e) | Outcome::Failed(e) => {
                    metrics::counter!("reactions_total", "kind" => kind.clone(), "outcome" => "failed").increment(1);
                    tracing::error!(reaction = %id, error.message = %e, "reaction failed for good; it stays in reaction_outbox with failed = true");
                    sqlx::query("UPDATE reaction_outbox SET attempts = attempts + 1, last_error = $2, failed = true WHERE id = $1")
                        .bind(id)
                        .bind(&e)
                        .execute(&mut *tx)
                        .await?;
                }
            }
        }
        tx.commit().await?;
        Ok(n)
    }

    async fn reminder_loop(self) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = self.fire_due_reminders().await {
                tracing::warn!(error.message = %e, "reminder scheduler pass failed");
            }
        }
    }

    /// Fires every reminder whose time has come; returns how many were handled.
    pub async fn fire_due_reminders(&self) -> Result<usize, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let rows: Vec<(Uuid, String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT task_id, user_id, remind_at FROM reminder_schedule WHERE remind_at <= now()
             ORDER BY remind_at LIMIT 100 FOR UPDATE SKIP LOCKED",
        )
        .fetch_all(&mut *tx)
        .await?;
        let n = rows.len();
        for (task, user, remind_at) in rows {
            let started = Instant::now();
            let delay = (Utc::now() - remind_at).num_milliseconds().max(0) as f64 / 1000.0;
            metrics::histogram!("reminder_scheduler_delay_seconds").record(delay);
            let body = json!({ "remind_at": remind_at });
            match self.send(&user, &format!("/internal/v1/tasks/{task}/remind"), &body, &[]).await {
                Outcome::Done => {
                    metrics::counter!("reminders_fired_total").increment(1);
                    sqlx::query("DELETE FROM reminder_schedule WHERE task_id = $1 AND remind_at = $2").bind(task).bind(remind_at).execute(&mut *tx).await?;
                }
                Outcome::Retry(e) => tracing::warn!(task_id = %task, error.message = %e, "firing a reminder failed; retrying"),
                Outcome::Failed(e) => {
                    tracing::error!(task_id = %task, error.message = %e, "the command API refused a reminder; dropping it");
                    sqlx::query("DELETE FROM reminder_schedule WHERE task_id = $1 AND remind_at = $2").bind(task).bind(remind_at).execute(&mut *tx).await?;
                }
            }
            tracing::debug!(task_id = %task, elapsed_ms = started.elapsed().as_millis() as u64, "reminder handled");
        }
        tx.commit().await?;
        Ok(n)
    }
}

fn correlation_of<'a>(headers: &'a [(&str, String)]) -> Option<&'a str> {
    headers.iter().find(|(k, _)| *k == "X-Correlation-Id").map(|(_, v)| v.as_str())
}
