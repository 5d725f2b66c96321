//! One command's way through the API, the same for every route: a span that continues the caller's
//! W3C trace (its context is what the events carry into the log), the metadata recorded with the
//! events, the Idempotency-Key decision, the writer, metrics, and the answer as HTTP.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tracing::Instrument;
use uuid::Uuid;

use domain::{AnyCommand, Command, CommandKind, IdempotencyTag, TaskId};
use platform::keys::DataKeys as _;

use crate::cluster::Route;
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
            WriteError::Blocked(m) => ApiError::Blocked(m),
        }
    }
}

/// A command on one task by the caller (`If-Match` makes it conditional on the task's version).
pub fn task_command(caller: &AuthUser, headers: &CommandHeaders, task_id: TaskId, kind: CommandKind) -> AnyCommand {
    AnyCommand::Task(Command { task_id, user: caller.0.clone(), expected_version: headers.if_match, kind })
}

/// Ids of tasks created with an Idempotency-Key and no `task_id` are derived from the caller and the
/// key, so a retry (on any instance) names the same task, in the same partition, whose owner
/// remembers the first answer.
const KEYED_TASK_IDS: Uuid = Uuid::from_u128(0x7a51_5c0e_8d0b_4f6e_9a3c_1b2d_3e4f_5a6b);

/// The id of a task created without a `task_id`: the one a forwarding instance chose; derived from
/// the Idempotency-Key when there is one; else a new UUID v7, preferably in a partition this
/// instance owns (so the create needs no forwarding).
pub fn new_task_id(state: &AppState, caller: &AuthUser, headers: &CommandHeaders) -> TaskId {
    if let Some(id) = headers.forwarded_task_id {
        return TaskId::from_uuid(id);
    }
    if let Some(key) = &headers.idempotency_key {
        return TaskId::from_uuid(Uuid::new_v5(&KEYED_TASK_IDS, format!("{}\n{key}", caller.0).as_bytes()));
    }
    let local = state.cluster.ready_local_partitions();
    let mut id = TaskId::new_v7();
    if local.is_empty() {
        return id;
    }
    for _ in 0..256 {
        if state.cluster.partition_of(&id.to_string()).is_some_and(|p| local.contains(&p)) {
            break;
        }
        id = TaskId::new_v7();
    }
    id
}

/// Submits a parsed command (already carrying the caller as its actor) and answers it once its
/// events are durable: decided by this instance when it owns the command's partition, forwarded to
/// the owner otherwise.
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
    let key = cmd.stream_key();
    let Some(partition) = state.cluster.partition_of(&key) else {
        return Err(ApiError::Unavailable("the partitions of the event log are not known yet (is Kafka reachable?)".into()));
    };
    let writer = match state.cluster.route(partition) {
        Route::Local(writer) => writer,
        Route::Remote(owner) if !headers.forwarded => {
            let Some(raw) = headers.raw.as_deref() else {
                return Err(ApiError::Internal("the request was not kept for forwarding".into()));
            };
            let created = matches!(&cmd, AnyCommand::Task(Command { kind: CommandKind::Create(_), .. })).then(|| Uuid::parse_str(&key).ok()).flatten();
            tracing::debug!(partition, owner = %owner.instance, "forwarding the command to its partition's owner");
            return state.forwarder.forward(&owner, raw, created).await;
        }
        _ => return Err(ApiError::Unavailable(format!("partition {partition} has no owner right now (it is moving to another instance); retry shortly"))),
    };
    // An Idempotency-Key's request digest is keyed with the user's data key (see `RequestDigest`),
    // which the writer needs anyway; an erasure makes none (it seals nothing).
    let digest = if headers.idempotency_key.is_some() {
        let actor = cmd.actor().as_ref();
        if !crate::writer::is_erasure(&cmd) {
            state.keys.ensure(actor).await.map_err(|e| ApiError::Unavailable(format!("the user's data key is not available: {e}")))?;
        }
        // The user's keys, the current one first (the one recorded).
        let keys: Vec<_> = state.keys.keys_of(actor).iter().filter_map(|id| state.keys.data_key(id).ok()).collect();
        digest.keyed_with(keys.iter().map(|k| &**k))
    } else {
        digest
    };
    let request_id = Uuid::new_v4().to_string();
    let causation_id = headers.causation_id.filter(|_| caller.is_service()).unwrap_or_else(|| request_id.clone());
    let meta = CommandMeta {
        correlation_id: Some(headers.correlation_id.unwrap_or_else(|| request_id.clone())),
        causation_id: Some(causation_id),
        traceparent: headers.traceparent,
        idempotency: headers.idempotency_key.clone().map(|key| IdempotencyTag { key, request_digest: digest.recorded().to_owned() }),
    };
    if let Some(c) = &meta.correlation_id {
        tracing::Span::current().record("correlation_id", c.as_str());
    }
    let name = cmd.name();
    let started = std::time::Instant::now();
    // The command runs to its end in a task of its own: a client that gives up (timeout, closed
    // connection) after the command reached its writer must not leave it appended but its answer
    // forgotten, or a retry with the same Idempotency-Key would run it again.
    let (cache, user, key) = (state.idempotency.clone(), caller.0.clone(), headers.idempotency_key.clone());
    let detached = async move {
        let command = async { writer.submit(cmd, meta).await.map_err(ApiError::from) };
        cache.execute(&user, key.as_deref(), &digest, command).await
    };
    let result = tokio::spawn(detached.in_current_span()).await.unwrap_or_else(|e| Err(ApiError::Internal(format!("the command's task failed: {e}"))));
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
