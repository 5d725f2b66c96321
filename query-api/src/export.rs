//! `GET /v1/me/export` (GDPR data portability): every read-model row of one user as one JSON
//! document, [`platform::export::Export`] (whose types the command API's OpenAPI document describes),
//! written here key by key:
//!
//! ```text
//! {"user_id": .., "exported_at": RFC 3339,
//!  "tasks": [..], "history": [..], "notifications": [..], "webhook": {"url", "updated_at"} | null}
//! ```
//!
//! - `tasks`: the user's tasks as the `tasks` read model holds them (the fields of GraphQL's `Task`,
//!   snake_case, plus `remind_before`), oldest first. Deleted tasks are not in that read model; their
//!   events, creation data included, are in `history`.
//! - `history`: every event of the user's tasks (`task_history`, kept after a task is deleted), by
//!   task and version.
//! - `notifications`: oldest first, with `read_at`.
//! - `webhook`: the registered URL, never its signing secret (the column is not even read).
//!
//! The document is read from one snapshot (a REPEATABLE READ, READ ONLY transaction, so the sections
//! agree with each other) and streamed as it is read: rows are serialized into chunks of about
//! [`CHUNK_BYTES`] handed to the response body through a small channel, so a user with 100 000 tasks
//! costs a few chunks of memory, not the whole document. The transaction is begun before the
//! answer's status is sent (PostgreSQL being away is a 503 problem+json); a failure later can only
//! cut the body short, so the stream ends with an error and the connection is closed without the
//! final chunk: a client never takes a truncated export for a complete one. At most
//! [`EXPORTS_AT_ONCE`] exports run at once per instance (each holds a connection of the pool), and
//! one may take [`TIME_LIMIT`] at most.
//!
//! Tables are named without a schema, as everywhere in this crate: the live read models are the
//! ones on the search path (`projector rebuild` builds its copies elsewhere and swaps them in).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use chrono::{DateTime, Utc};
use futures::TryStreamExt as _;
use serde::Serialize;
use sqlx::{PgPool, Postgres, QueryBuilder, Transaction};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use domain::UserId;
use platform::export::{ExportedEvent, ExportedNotification, ExportedTask, ExportedWebhook};
use platform::readmodel::TaskRow;

/// About how many bytes of JSON one chunk of the body holds.
pub const CHUNK_BYTES: usize = 64 * 1024;
/// Chunks read ahead of the client.
const CHUNKS_AHEAD: usize = 4;
/// Exports running at once in one query API.
pub const EXPORTS_AT_ONCE: usize = 4;
/// Longest an export may take (a client that stops reading holds a connection and a snapshot).
pub const TIME_LIMIT: Duration = Duration::from_secs(15 * 60);

/// The slots of the exports running at once.
#[derive(Clone)]
pub struct Exports(Arc<Semaphore>);

impl Default for Exports {
    fn default() -> Self {
        Self(Arc::new(Semaphore::new(EXPORTS_AT_ONCE)))
    }
}

impl Exports {
    /// A slot, or `None` when every one is taken.
    pub fn try_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.0.clone().try_acquire_owned().ok()
    }
}

/// The file name a browser saves the export as: the user id with anything but `[A-Za-z0-9._-]`
/// replaced, so the header needs no quoting rules.
pub fn file_name(user: &UserId) -> String {
    let safe: String = user.as_ref().chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' }).collect();
    format!("taskstream-export-{safe}.json")
}

/// Begins the snapshot (errors here are the caller's to answer) and returns the body that streams
/// the document from it. `slot` is held until the export ends.
pub async fn begin(pool: &PgPool, user: UserId, slot: OwnedSemaphorePermit) -> Result<Body, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *tx).await?;
    // The snapshot's time (`now()` is the transaction's start).
    let exported_at: DateTime<Utc> = sqlx::query_scalar("SELECT now()").fetch_one(&mut *tx).await?;
    let (out, rx) = mpsc::channel::<io::Result<Bytes>>(CHUNKS_AHEAD);
    tokio::spawn(async move {
        let _slot = slot;
        let mut json = Json { buf: Vec::with_capacity(CHUNK_BYTES + 4096), out };
        let written = tokio::time::timeout(TIME_LIMIT, write(&mut tx, &user, exported_at, &mut json)).await.unwrap_or(Err(Stop::TimedOut));
        let (result, message) = match written {
            Ok(()) => ("ok", None),
            Err(Stop::ClientGone) => {
                tracing::debug!(user = %user, "export: the client went away");
                ("client_gone", None)
            }
            Err(Stop::Failed(e)) => {
                let e = anyhow::Error::from(e);
                tracing::error!(user = %user, error.message = %e, error.cause_chain = ?e, "export failed mid-stream; the body is cut short");
                ("failed", Some("the export failed"))
            }
            Err(Stop::TimedOut) => {
                tracing::warn!(user = %user, limit_s = TIME_LIMIT.as_secs(), "export took too long; the body is cut short");
                ("timed_out", Some("the export took too long"))
            }
        };
        metrics::counter!("query_api_exports_total", "result" => result).increment(1);
        if let Some(message) = message {
            // Ends the body with an error: the connection is closed without the last chunk.
            let _ = json.out.send(Err(io::Error::other(message))).await;
        }
        // Read only: nothing to commit.
        let _ = tx.rollback().await;
    });
    Ok(Body::from_stream(futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|chunk| (chunk, rx)) })))
}

/// Why a document was not written to the end.
enum Stop {
    /// The response body was dropped (the client disconnected).
    ClientGone,
    Failed(sqlx::Error),
    TimedOut,
}

impl From<sqlx::Error> for Stop {
    fn from(e: sqlx::Error) -> Self {
        Stop::Failed(e)
    }
}

/// The document being written: `buf` is sent as a chunk once it holds [`CHUNK_BYTES`].
struct Json {
    buf: Vec<u8>,
    out: mpsc::Sender<io::Result<Bytes>>,
}

impl Json {
    fn raw(&mut self, s: &str) {
        self.buf.extend_from_slice(s.as_bytes());
    }

    fn value<T: Serialize>(&mut self, v: &T) {
        // Serializing these types into a Vec cannot fail (string keys, no maps of other keys).
        if let Err(e) = serde_json::to_writer(&mut self.buf, v) {
            tracing::error!(error.message = %e, "export: a value could not be serialized");
            self.raw("null");
        }
    }

    /// One element of the array being written (`first`: none before it).
    async fn item<T: Serialize>(&mut self, first: &mut bool, v: &T) -> Result<(), Stop> {
        if !std::mem::take(first) {
            self.raw(",");
        }
        self.value(v);
        if self.buf.len() >= CHUNK_BYTES {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), Stop> {
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK_BYTES + 4096)));
        self.out.send(Ok(chunk)).await.map_err(|_| Stop::ClientGone)
    }
}

async fn write(tx: &mut Transaction<'static, Postgres>, user: &UserId, exported_at: DateTime<Utc>, json: &mut Json) -> Result<(), Stop> {
    let uid = user.as_ref();
    json.raw("{\"user_id\":");
    json.value(&uid);
    json.raw(",\"exported_at\":");
    json.value(&exported_at);

    json.raw(",\"tasks\":[");
    let mut qb = QueryBuilder::new("SELECT ");
    qb.push(TaskRow::COLUMNS).push(" FROM tasks WHERE user_id = ").push_bind(uid).push(" ORDER BY created_at, id");
    let mut rows = qb.build().try_map(crate::store::task_row).fetch(&mut **tx);
    let mut first = true;
    while let Some(row) = rows.try_next().await? {
        json.item(&mut first, &ExportedTask::from(row)).await?;
    }
    drop(rows);

    json.raw("],\"history\":[");
    let mut rows = sqlx::query_as::<_, ExportedEvent>(
        "SELECT task_id, event_id, event_type, version, occurred_at, data, correlation_id FROM task_history
         WHERE user_id = $1 ORDER BY task_id, version",
    )
    .bind(uid)
    .fetch(&mut **tx);
    let mut first = true;
    while let Some(event) = rows.try_next().await? {
        json.item(&mut first, &event).await?;
    }
    drop(rows);

    json.raw("],\"notifications\":[");
    let mut rows = sqlx::query_as::<_, ExportedNotification>(
        "SELECT n.id, n.task_id, n.kind, n.message, n.created_at, r.read_at
         FROM notifications n LEFT JOIN notification_reads r ON r.notification_id = n.id
         WHERE n.user_id = $1 ORDER BY n.created_at, n.id",
    )
    .bind(uid)
    .fetch(&mut **tx);
    let mut first = true;
    while let Some(notification) = rows.try_next().await? {
        json.item(&mut first, &notification).await?;
    }
    drop(rows);

    // A removed webhook keeps its row with no URL: no webhook.
    let webhook: Option<ExportedWebhook> =
        sqlx::query_as("SELECT url, updated_at FROM webhooks WHERE user_id = $1 AND url IS NOT NULL").bind(uid).fetch_optional(&mut **tx).await?;
    json.raw("],\"webhook\":");
    json.value(&webhook);
    json.raw("}");
    json.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_name_is_safe_in_a_quoted_header() {
        let user = |s: &str| UserId::parse(s.to_owned()).unwrap();
        assert_eq!(file_name(&user("alice")), "taskstream-export-alice.json");
        assert_eq!(file_name(&user("auth0|a.b-c_d")), "taskstream-export-auth0_a.b-c_d.json");
        assert_eq!(file_name(&user("o\"brien\\x y")), "taskstream-export-o_brien_x_y.json");
    }
}
