//! Webhook delivery: each notification is POSTed to the user's webhook, signed with HMAC-SHA256,
//! retried with exponential backoff and jitter, given up after a bounded number of attempts. Every
//! attempt is recorded (`webhook_attempts`, shown in GraphQL). Deliveries are leased with
//! FOR UPDATE SKIP LOCKED (safe with two projectors) and sent concurrently, each with its own
//! timeout, so a slow or hanging receiver never holds up the others.
//! The outcome of a POST is recorded before the delivery is let go, waiting for the database if
//! it is away, so a 2xx is never followed by a second POST of the same delivery from this process;
//! a crash between the answer and the record resends it after the lease (at least once, with
//! `taskstream-delivery` for the receiver to deduplicate).
//!
//! Signature: header `Taskstream-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
//! A receiver recomputes the HMAC over the timestamp, a dot and the raw body, compares in constant
//! time, and refuses timestamps older than a few minutes (replay protection).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use sqlx::PgPool;
use tokio::sync::{Notify, Semaphore};
use uuid::Uuid;

use platform::keys::{DataKeys as _, KeyRing};
use platform::retry::{Jitter, Policy};

pub const MAX_ATTEMPTS: i32 = 8;
/// When a failed side effect is tried again (webhook deliveries, and the reactor's outbox): 1 s,
/// 2 s, 4 s ... at most 256 s, each +-25 %.
pub const RETRY: Policy = Policy::new(Duration::from_secs(1), Duration::from_secs(256)).with_jitter(Jitter::PlusMinus25);
const TIMEOUT: Duration = Duration::from_secs(5);
const CONCURRENCY: usize = 32;

/// The signature header value for `body` sent at `timestamp`.
pub fn signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={timestamp},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// A webhook's signing secret as the read model holds it: sealed with one of the user's data keys
/// (`model::Batch` seals it), or in plain text when its record predates sealing. `None`: no live
/// key of the user opens it (they were erased).
pub fn open_secret(keys: &KeyRing, user: &str, stored: &str) -> Option<String> {
    if !stored.starts_with(platform::keys::SEALED_PREFIX) {
        return Some(stored.to_owned());
    }
    keys.keys_of(user).iter().filter_map(|id| keys.data_key(id).ok()).find_map(|k| k.open(stored).ok())
}

pub struct Deliverer {
    pool: PgPool,
    keys: Arc<KeyRing>,
    allow_private: bool,
    wake: Arc<Notify>,
    permits: Arc<Semaphore>,
    /// Deliveries this process is sending or recording: a lease that ran out while the database
    /// was away does not make this process send them a second time.
    in_flight: Mutex<HashSet<Uuid>>,
}

struct Leased {
    id: Uuid,
    user_id: String,
    url: String,
    payload: serde_json::Value,
    attempts: i32,
}

impl Deliverer {
    pub fn new(pool: PgPool, keys: Arc<KeyRing>, allow_private: bool, wake: Arc<Notify>) -> Self {
        Self { pool, keys, allow_private, wake, permits: Arc::new(Semaphore::new(CONCURRENCY)), in_flight: Mutex::default() }
    }

    pub async fn run(self) {
        let me = Arc::new(self);
        loop {
            match me.lease().await {
                Ok(batch) => {
                    for d in batch {
                        if !me.in_flight.lock().expect("in-flight set").insert(d.id) {
                            continue;
                        }
                        let Ok(permit) = me.permits.clone().acquire_owned().await else { return };
                        let me = me.clone();
                        tokio::spawn(async move {
                            let id = d.id;
                            if let Err(e) = me.deliver(d).await {
                                tracing::warn!(error.message = %e, "reading a webhook before its delivery failed");
                            }
                            me.in_flight.lock().expect("in-flight set").remove(&id);
                            drop(permit);
                        });
                    }
                }
                Err(e) => tracing::warn!(error.message = %e, "leasing webhook deliveries failed"),
            }
            tokio::select! {
                _ = me.wake.notified() => {},
                _ = tokio::time::sleep(Duration::from_millis(250)) => {},
            }
        }
    }

    /// Takes due deliveries for a while (a lease), so a crashed sender's deliveries come back.
    async fn lease(&self) -> Result<Vec<Leased>, sqlx::Error> {
        let rows: Vec<(Uuid, String, String, serde_json::Value, i32)> = sqlx::query_as(
            "UPDATE webhook_deliveries d SET lease_until = now() + interval '30 seconds'
             FROM (SELECT id FROM webhook_deliveries
                   WHERE status = 'pending' AND next_attempt_at <= now() AND (lease_until IS NULL OR lease_until < now())
                   ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED) due
             WHERE d.id = due.id
             RETURNING d.id, d.user_id, d.url, d.payload, d.attempts",
        )
        .bind(self.permits.available_permits().max(1) as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(id, user_id, url, payload, attempts)| Leased { id, user_id, url, payload, attempts }).collect())
    }

    /// The signing secret in the clear: opened with the user's keys known here, else once more
    /// after reading the keys topic to its end.
    async fn open(&self, user: &str, stored: &str) -> Option<String> {
        if let Some(secret) = open_secret(&self.keys, user, stored) {
            return Some(secret);
        }
        if let Err(e) = self.keys.catch_up().await {
            tracing::warn!(error.message = %e, "could not read the data keys topic");
        }
        open_secret(&self.keys, user, stored)
    }

    async fn deliver(&self, d: Leased) -> Result<(), sqlx::Error> {
        // The secret (and whether the webhook still exists) is read at send time: rotation applies.
        let hook: Option<(Option<String>, Option<String>)> =
            sqlx::query_as("SELECT url, secret FROM webhooks WHERE user_id = $1").bind(&d.user_id).fetch_optional(&self.pool).await?;
        let secret = match hook {
            Some((Some(_), Some(stored))) => match self.open(&d.user_id, &stored).await {
                Some(secret) => Some(secret),
                // A key this process has not read yet (it is starting, or the keys topic lags), or
                // one destroyed by an erasure not projected yet (which deletes the delivery): never
                // a reason to cancel. Tried again a little later.
                None => {
                    tracing::warn!(delivery = %d.id, "the webhook's signing secret does not open with the user's data keys known here yet; trying again later");
                    sqlx::query("UPDATE webhook_deliveries SET lease_until = NULL, next_attempt_at = now() + interval '5 seconds' WHERE id = $1")
                        .bind(d.id)
                        .execute(&self.pool)
                        .await?;
                    metrics::counter!("webhook_deliveries_total", "outcome" => "deferred").increment(1);
                    return Ok(());
                }
            },
            _ => None,
        };
        let Some(secret) = secret else {
            sqlx::query("UPDATE webhook_deliveries SET status = 'cancelled', finished_at = now(), lease_until = NULL WHERE id = $1")
                .bind(d.id)
                .execute(&self.pool)
                .await?;
            metrics::counter!("webhook_deliveries_total", "outcome" => "cancelled").increment(1);
            return Ok(());
        };
        let attempt = d.attempts + 1;
        let started = Instant::now();
        let result = self.post(&d, &secret).await;
        let elapsed = i32::try_from(started.elapsed().as_millis()).unwrap_or(i32::MAX);
        let (code, error) = match &result {
            Ok(code) => (Some(i32::from(*code)), None),
            Err(e) => (None, Some(e.clone())),
        };
        let ok = matches!(result, Ok(c) if (200..300).contains(&c));
        // The POST was made: its outcome must be recorded, or the delivery would be sent again
        // when its lease runs out. A database that is away (restarting, failing over) is waited
        // for; only a crash of this process between the POST and the record can still send a
        // notification twice (receivers deduplicate on `taskstream-delivery`).
        let mut wait = Duration::from_millis(100);
        let outcome = loop {
            match self.record(&d, attempt, code, error.as_deref(), elapsed, ok).await {
                Ok(outcome) => break outcome,
                Err(e) => {
                    tracing::warn!(delivery = %d.id, error.message = %e, "recording a webhook attempt failed; trying again in {wait:?}");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        };
        metrics::counter!("webhook_deliveries_total", "outcome" => outcome).increment(1);
        Ok(())
    }

    /// Records one attempt and what it means for the delivery: delivered, given up, or retried later.
    async fn record(&self, d: &Leased, attempt: i32, code: Option<i32>, error: Option<&str>, elapsed: i32, ok: bool) -> Result<&'static str, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO webhook_attempts (delivery_id, attempt, attempted_at, status_code, error, duration_ms)
             VALUES ($1, $2, now(), $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .bind(d.id)
        .bind(attempt)
        .bind(code)
        .bind(error)
        .bind(elapsed)
        .execute(&mut *tx)
        .await?;
        let outcome = if ok {
            sqlx::query("UPDATE webhook_deliveries SET status = 'delivered', attempts = $2, finished_at = now(), lease_until = NULL WHERE id = $1")
                .bind(d.id)
                .bind(attempt)
                .execute(&mut *tx)
                .await?;
            "delivered"
        } else if attempt >= MAX_ATTEMPTS {
            sqlx::query("UPDATE webhook_deliveries SET status = 'failed', attempts = $2, finished_at = now(), lease_until = NULL WHERE id = $1")
                .bind(d.id)
                .bind(attempt)
                .execute(&mut *tx)
                .await?;
            tracing::warn!(delivery = %d.id, url = %d.url, "webhook delivery given up after {attempt} attempts");
            "failed"
        } else {
            let delay = RETRY.delay(u32::try_from(attempt - 1).unwrap_or(0));
            sqlx::query(
                "UPDATE webhook_deliveries SET attempts = $2, lease_until = NULL, next_attempt_at = now() + make_interval(secs => $3)
                 WHERE id = $1",
            )
            .bind(d.id)
            .bind(attempt)
            .bind(delay.as_secs_f64())
            .execute(&mut *tx)
            .await?;
            "retry"
        };
        tx.commit().await?;
        Ok(outcome)
    }

    /// One POST; the status code, or why there was none.
    async fn post(&self, d: &Leased, secret: &str) -> Result<u16, String> {
        // Resolve the canonical host once, check every address, and connect to exactly what was
        // checked (no DNS rebinding between the check and the request).
        let target = platform::webhook::resolve(&d.url, self.allow_private, TIMEOUT).await.map_err(|e| format!("refused: {e}"))?;
        let client = target.client(TIMEOUT).map_err(|e| e.to_string())?;
        let body = serde_json::to_vec(&d.payload).map_err(|e| e.to_string())?;
        let now = chrono::Utc::now().timestamp();
        let res = client
            .post(target.url.clone())
            .header("content-type", "application/json")
            .header("user-agent", "taskstream-webhooks/1")
            .header("taskstream-delivery", d.id.to_string())
            .header("taskstream-event", "notification.created")
            .header("taskstream-signature", signature(secret, now, &body))
            .body(body)
            .send()
            .await
            .map_err(|e| if e.is_timeout() { "timed out".to_owned() } else { e.to_string() })?;
        Ok(res.status().as_u16())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_over_timestamp_dot_body() {
        // Reference computed independently: printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac whsec_test
        assert_eq!(signature("whsec_test", 1_700_000_000, br#"{"a":1}"#), "t=1700000000,v1=38877139021993b830af32feea6e18a8da83eb2f6e49ee50bd9e4cf4ca4d3789");
        assert_ne!(signature("a", 1, b"x"), signature("b", 1, b"x"));
        assert_ne!(signature("a", 1, b"x"), signature("a", 2, b"x"));
    }

    #[test]
    fn retries_wait_one_second_doubled_up_to_256_seconds() {
        let secs: Vec<u64> = (0..12).map(|a| platform::retry::delay(a, RETRY.base, RETRY.cap).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 64, 128, 256, 256, 256, 256]);
        assert_eq!(RETRY.jitter, Jitter::PlusMinus25);
    }
}
