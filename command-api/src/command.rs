//! One command's way through the API, the same for every route: a span that continues the caller's
//! W3C trace (its context is what the events carry into the log), the metadata recorded with the
//! events, the Idempotency-Key decision, the writer, metrics, and the answer as HTTP.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tracing::Instrument;
use uuid::Uuid;

use domain::{AnyCommand, Command, CommandKind, IdempotencyTag, TaskId};

use crate::error::ApiError;
use crate::extract::{AuthUser, CommandHeaders, RequestDigest};
use crate::idempotency::{Answer, Executed};
use crate::state::AppState;
use crate::writer::{CommandMeta, WriteError};

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Domain(d) => d.into(),
            WriteError::Unavailable(m) => ApiError::Unavailable(m),
        }
    }
}

/// A command on one task by the caller (`If-Match` makes it conditional on the task's version).
pub fn task_command(caller: &AuthUser, headers: &CommandHeaders, task_id: TaskId, kind: CommandKind) -> AnyCommand {
    AnyCommand::Task(Command { task_id, user: caller.0.clone(), expected_version: headers.if_match, kind })
}

/// Submits a parsed command (already carrying the caller as its actor) and answers it once its
/// events are durable.
pub async fn submit(state: &AppState, caller: AuthUser, mut headers: CommandHeaders, digest: RequestDigest, cmd: AnyCommand) -> Result<Response, ApiError> {
    let span = tracing::info_span!(
        "command",
        command = cmd.name(),
        user = %caller.0,
        trace_id = tracing::field::Empty,
        correlation_id = tracing::field::Empty
    );
    platform::telemetry::continue_trace(&span, headers.traceparent.as_deref());
    headers.traceparent = platform::telemetry::traceparent(&span).or(headers.traceparent);
    run(state, caller, headers, digest, cmd).instrument(span).await
}

async fn run(state: &AppState, caller: AuthUser, headers: CommandHeaders, digest: RequestDigest, cmd: AnyCommand) -> Result<Response, ApiError> {
    let request_id = Uuid::new_v4().to_string();
    let causation_id = headers.causation_id.filter(|_| caller.is_service()).unwrap_or_else(|| request_id.clone());
    let meta = CommandMeta {
        correlation_id: Some(headers.correlation_id.unwrap_or_else(|| request_id.clone())),
        causation_id: Some(causation_id),
        traceparent: headers.traceparent,
        idempotency: headers.idempotency_key.clone().map(|key| IdempotencyTag { key, request_digest: digest.digest.clone() }),
    };
    if let Some(c) = &meta.correlation_id {
        tracing::Span::current().record("correlation_id", c.as_str());
    }
    let name = cmd.name();
    let started = std::time::Instant::now();
    let command = async { state.writer.submit(cmd, meta).await.map_err(ApiError::from) };
    let result = state.idempotency.execute(&caller.0, headers.idempotency_key.as_deref(), &digest, command).await;
    let outcome = match &result {
        Ok(_) => "accepted",
        Err(e) if e.status_code().is_server_error() => "unavailable",
        Err(_) => "rejected",
    };
    metrics::counter!("commands_total", "command" => name, "result" => outcome).increment(1);
    metrics::histogram!("command_duration_seconds", "command" => name).record(started.elapsed().as_secs_f64());
    let Executed { answer, replayed } = result?;
    Ok(respond(answer, replayed))
}

/// `{"<id_field>": id, "version": n, "position": token}` (+ `secret` once), 201 with a Location
/// when the command created the thing, an ETag when the version is the thing's own.
fn respond(a: Answer, replayed: bool) -> Response {
    let r = &a.receipt;
    let status = if r.created { StatusCode::CREATED } else { StatusCode::OK };
    let mut body = serde_json::Map::new();
    body.insert(r.id_field.to_owned(), r.id.to_string().into());
    body.insert("version".to_owned(), a.version.into());
    body.insert("position".to_owned(), a.position.token().into());
    if let Some(secret) = &r.secret {
        body.insert("secret".to_owned(), secret.to_string().into());
    }
    let mut res = (status, axum::Json(serde_json::Value::Object(body))).into_response();
    let h = res.headers_mut();
    if r.etag {
        if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", a.version)) {
            h.insert(header::ETAG, v);
        }
    }
    if r.created {
        if let Ok(v) = HeaderValue::from_str(&format!("/v1/tasks/{}", r.id)) {
            h.insert(header::LOCATION, v);
        }
    }
    if replayed {
        h.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    res
}
