//! HTTP handlers: parse the request at the edge into a domain command, hand it to the writer,
//! answer once its events are durable.

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;
use tracing::Instrument;
use uuid::Uuid;

use domain::{
    Command, CommandKind, Description, FieldError, NewTask, Priority, Recurrence, RemindBefore, Tags, TaskId, TaskPatch,
    TimeZone, Title, ValidationError,
};
use domain::user::{UserCommand, UserCommandKind, WebhookUrl};
use platform::codec::IdempotencyTag;

use crate::error::{ApiError, Problem};
use crate::extract::{request_digest, AuthUser, ServiceCaller, CommandHeaders, JsonBody, TaskPath};
use crate::idempotency::{Answer, AnswerKind, Stored};
use crate::writer::{AnyCommand, CommandMeta};
use crate::AppState;

#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PriorityDto {
    Low,
    Medium,
    High,
    Urgent,
}

impl From<PriorityDto> for Priority {
    fn from(p: PriorityDto) -> Self {
        match p {
            PriorityDto::Low => Priority::Low,
            PriorityDto::Medium => Priority::Medium,
            PriorityDto::High => Priority::High,
            PriorityDto::Urgent => Priority::Urgent,
        }
    }
}

/// CreateTask.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTaskRequest {
    /// Optional client-chosen id; generated (UUID v7) when absent.
    pub task_id: Option<Uuid>,
    /// 1..=200 characters.
    pub title: Option<String>,
    /// At most 10 000 characters.
    pub description: Option<String>,
    /// Default `medium`.
    pub priority: Option<PriorityDto>,
    /// RFC 3339 timestamp.
    pub due_at: Option<DateTime<Utc>>,
    /// IANA zone used for recurrence; default `UTC`.
    pub timezone: Option<String>,
    /// RFC 5545 RRULE such as `FREQ=WEEKLY;BYDAY=MO` (needs `due_at`).
    pub recurrence: Option<String>,
    /// ISO 8601 duration such as `PT30M` (needs `due_at`).
    pub remind_before: Option<String>,
    /// At most 20 tags of 1..=50 characters.
    pub tags: Option<Vec<String>>,
    /// Set by the service identity only, when it creates the next occurrence of a series.
    pub recurrence_parent_id: Option<Uuid>,
    /// Set by the service identity only: the number of this occurrence in its series.
    pub occurrence: Option<u32>,
}

/// FireReminder (service identity only).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FireReminderRequest {
    pub remind_at: DateTime<Utc>,
}

/// UpdateTask: any subset of fields; `null` clears an optional field.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateTaskRequest {
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub title: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub description: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<PriorityDto>)]
    pub priority: Option<Option<PriorityDto>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<DateTime<Utc>>)]
    pub due_at: Option<Option<DateTime<Utc>>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub timezone: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub recurrence: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub remind_before: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<Vec<String>>)]
    pub tags: Option<Option<Vec<String>>>,
}

fn double_option<'de, T: Deserialize<'de>, D: Deserializer<'de>>(de: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(de).map(Some)
}

/// The answer to every task command.
#[derive(Debug, Serialize, ToSchema)]
pub struct CommandResponse {
    pub task_id: Uuid,
    /// The task's version after the command.
    pub version: u32,
    /// Opaque consistency token: send it as `X-Consistency-Token` to the query API.
    pub position: String,
}

/// Collects field errors while parsing a request into domain values.
#[derive(Default)]
struct Fields(Vec<FieldError>);

impl Fields {
    fn parse<T>(&mut self, field: &str, r: Result<T, ValidationError>) -> Option<T> {
        r.map_err(|e| self.0.push(FieldError::new(field, e.0))).ok()
    }
    fn refuse(&mut self, field: &str, msg: &str) {
        self.0.push(FieldError::new(field, msg));
    }
    fn finish<T>(self, value: Option<T>) -> Result<T, ApiError> {
        match value {
            Some(v) if self.0.is_empty() => Ok(v),
            _ => Err(ApiError::Validation(self.0)),
        }
    }
}

fn parse_create(req: CreateTaskRequest, service: bool) -> Result<(Option<TaskId>, NewTask), ApiError> {
    let mut f = Fields::default();
    if !service {
        if req.recurrence_parent_id.is_some() {
            f.refuse("recurrence_parent_id", "is set by taskstream when it creates the next occurrence of a series");
        }
        if req.occurrence.is_some() {
            f.refuse("occurrence", "is set by taskstream when it creates the next occurrence of a series");
        }
    }
    let title = match req.title {
        Some(t) => f.parse("title", Title::parse(t)),
        None => {
            f.refuse("title", "is required");
            None
        }
    };
    let description = req.description.map(|d| f.parse("description", Description::parse(d)));
    let timezone = req.timezone.map(|t| f.parse("timezone", TimeZone::parse(t)));
    let recurrence = req.recurrence.map(|r| f.parse("recurrence", Recurrence::parse(r)));
    let remind_before = req.remind_before.map(|r| f.parse("remind_before", RemindBefore::parse(r)));
    let tags = req.tags.map(|t| f.parse("tags", Tags::parse(t)));
    let task = title.map(|title| NewTask {
        title,
        description: description.flatten(),
        priority: req.priority.map(Priority::from).unwrap_or_default(),
        due_at: req.due_at.map(micros),
        timezone: timezone.flatten().unwrap_or_default(),
        recurrence: recurrence.flatten(),
        remind_before: remind_before.flatten(),
        tags: tags.flatten().unwrap_or_default(),
        recurrence_parent_id: req.recurrence_parent_id.map(TaskId::from_uuid),
        occurrence: req.occurrence,
    });
    Ok((req.task_id.map(TaskId::from_uuid), f.finish(task)?))
}

fn parse_update(req: UpdateTaskRequest) -> Result<TaskPatch, ApiError> {
    let mut f = Fields::default();
    let required = |field: &str, v: Option<Option<String>>, f: &mut Fields| match v {
        Some(None) => {
            f.refuse(field, "cannot be cleared");
            None
        }
        other => other.flatten(),
    };
    let title = required("title", req.title, &mut f).and_then(|t| f.parse("title", Title::parse(t)));
    let timezone = required("timezone", req.timezone, &mut f).and_then(|t| f.parse("timezone", TimeZone::parse(t)));
    let priority = match req.priority {
        Some(None) => {
            f.refuse("priority", "cannot be cleared");
            None
        }
        p => p.flatten().map(Priority::from),
    };
    let description = req.description.map(|d| d.and_then(|d| f.parse("description", Description::parse(d))));
    let recurrence = req.recurrence.map(|r| r.and_then(|r| f.parse("recurrence", Recurrence::parse(r))));
    let remind_before = req.remind_before.map(|r| r.and_then(|r| f.parse("remind_before", RemindBefore::parse(r))));
    let tags = req.tags.map(|t| f.parse("tags", Tags::parse(t.unwrap_or_default())).unwrap_or_default());
    let due_at = req.due_at.map(|d| d.map(micros));
    let patch = TaskPatch { title, description, priority, due_at, timezone, recurrence, remind_before, tags };
    f.finish(Some(patch))
}

/// Instants are kept at microsecond precision, like PostgreSQL, so a read model and the log agree.
fn micros(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

/// Hands a parsed command to the writer, honouring `Idempotency-Key`.
/// What a handler asks the writer to do.
enum Target {
    Task(TaskId, CommandKind),
    User(UserCommandKind),
}

impl Target {
    fn name(&self) -> &'static str {
        match self {
            Target::Task(_, kind) => kind.name(),
            Target::User(kind) => kind.name(),
        }
    }
}

/// Every command is a span: it continues the caller's W3C trace (`traceparent`) or starts one, and
/// its trace context is what the events carry into the log.
async fn execute(state: &AppState, caller: AuthUser, mut headers: CommandHeaders, target: Target, digest: String) -> Result<Response, ApiError> {
    let span = tracing::info_span!(
        "command",
        command = target.name(),
        user = %caller.0,
        trace_id = tracing::field::Empty,
        correlation_id = tracing::field::Empty
    );
    platform::telemetry::continue_trace(&span, headers.traceparent.as_deref());
    headers.traceparent = platform::telemetry::traceparent(&span).or(headers.traceparent);
    run_command(state, caller, headers, target, digest).instrument(span).await
}

async fn run_command(state: &AppState, caller: AuthUser, headers: CommandHeaders, target: Target, digest: String) -> Result<Response, ApiError> {
    let request_id = Uuid::new_v4().to_string();
    let causation_id = headers.causation_id.filter(|_| caller.is_service()).unwrap_or_else(|| request_id.clone());
    let user = caller.0;
    let meta = CommandMeta {
        correlation_id: Some(headers.correlation_id.unwrap_or_else(|| request_id.clone())),
        causation_id: Some(causation_id),
        traceparent: headers.traceparent,
        idempotency: headers.idempotency_key.clone().map(|key| IdempotencyTag { key, request_digest: digest.clone() }),
    };
    if let Some(c) = &meta.correlation_id {
        tracing::Span::current().record("correlation_id", c.as_str());
    }
    let (name, cmd) = match target {
        Target::Task(task_id, kind) => {
            (kind.name(), AnyCommand::Task(Command { task_id, user: user.clone(), expected_version: headers.if_match, kind }))
        }
        Target::User(kind) => (kind.name(), AnyCommand::User(UserCommand { user: user.clone(), kind })),
    };
    let started = std::time::Instant::now();
    let result = match headers.idempotency_key {
        None => state.writer.submit_any(cmd, meta).await.map(|a| (a, false)).map_err(ApiError::from),
        Some(key) => {
            let init = async {
                let answer = state.writer.submit_any(cmd, meta).await.map_err(ApiError::from)?;
                Ok::<_, ApiError>(std::sync::Arc::new(Stored { request_digest: digest.clone(), answer }))
            };
            match state.idempotency.cache().entry((user, key)).or_try_insert_with(init).await {
                Ok(entry) if entry.is_fresh() => Ok((entry.value().answer.clone(), false)),
                Ok(entry) if entry.value().request_digest == digest => Ok((entry.value().answer.clone(), true)),
                Ok(_) => Err(ApiError::IdempotencyKeyReused),
                Err(e) => Err((*e).clone()),
            }
        }
    };
    let outcome = match &result {
        Ok(_) => "accepted",
        Err(e) if e.status_code().is_server_error() => "unavailable",
        Err(_) => "rejected",
    };
    metrics::counter!("commands_total", "command" => name, "result" => outcome).increment(1);
    metrics::histogram!("command_duration_seconds", "command" => name).record(started.elapsed().as_secs_f64());
    let (answer, replayed) = result?;
    Ok(respond(answer, replayed))
}

fn respond(a: Answer, replayed: bool) -> Response {
    let status = if a.created { StatusCode::CREATED } else { StatusCode::OK };
    let mut body = serde_json::Map::new();
    body.insert(a.kind.id_field().to_owned(), a.id.to_string().into());
    body.insert("version".to_owned(), a.version.into());
    body.insert("position".to_owned(), a.position.token().into());
    if let Some(secret) = &a.secret {
        body.insert("secret".to_owned(), secret.to_string().into());
    }
    let mut res = (status, axum::Json(serde_json::Value::Object(body))).into_response();
    let h = res.headers_mut();
    if a.kind == AnswerKind::Task {
        if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", a.version)) {
            h.insert(header::ETAG, v);
        }
    }
    if a.created {
        if let Ok(v) = HeaderValue::from_str(&format!("/v1/tasks/{}", a.id)) {
            h.insert(header::LOCATION, v);
        }
    }
    if replayed {
        h.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    res
}

/// Create a task.
#[utoipa::path(
    post, path = "/v1/tasks", tag = "tasks",
    request_body = CreateTaskRequest,
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "Makes the command safe to retry"),
        ("If-Match" = Option<String>, Header, description = "\"0\": only if the id is unused"),
    ),
    responses(
        (status = 201, description = "Created; the event is durable in the log", body = CommandResponse),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 409, body = Problem),
        (status = 412, body = Problem), (status = 413, body = Problem), (status = 415, body = Problem),
        (status = 422, body = Problem), (status = 503, body = Problem),
    ),
    security(("bearer" = []))
)]
pub async fn create_task(
    State(state): State<AppState>,
    caller: AuthUser,
    headers: CommandHeaders,
    body: JsonBody<CreateTaskRequest>,
) -> Result<Response, ApiError> {
    let digest = request_digest("POST", "/v1/tasks", headers.if_match, &body.canonical);
    let (task_id, task) = parse_create(body.value, caller.is_service())?;
    let task_id = task_id.unwrap_or_else(TaskId::new_v7);
    execute(&state, caller, headers, Target::Task(task_id, CommandKind::Create(task)), digest).await
}

/// Fire the reminder due at `remind_at` (internal: the projector's scheduler, with the service
/// identity; to users this path does not exist).
pub async fn fire_reminder(
    State(state): State<AppState>,
    ServiceCaller(caller): ServiceCaller,
    TaskPath(task_id): TaskPath,
    headers: CommandHeaders,
    body: JsonBody<FireReminderRequest>,
) -> Result<Response, ApiError> {
    let digest = request_digest("POST", &format!("/internal/v1/tasks/{task_id}/remind"), headers.if_match, &body.canonical);
    let kind = CommandKind::FireReminder { remind_at: body.value.remind_at };
    execute(&state, caller, headers, Target::Task(task_id, kind), digest).await
}

/// Update some fields of a task.
#[utoipa::path(
    patch, path = "/v1/tasks/{id}", tag = "tasks",
    request_body = UpdateTaskRequest,
    params(
        ("id" = Uuid, Path, description = "Task id"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes the command safe to retry"),
        ("If-Match" = Option<String>, Header, description = "Only if the task is at this version, e.g. \"3\""),
    ),
    responses(
        (status = 200, description = "Updated; the event is durable in the log", body = CommandResponse),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 404, body = Problem),
        (status = 409, body = Problem), (status = 412, body = Problem), (status = 413, body = Problem),
        (status = 415, body = Problem), (status = 422, body = Problem), (status = 503, body = Problem),
    ),
    security(("bearer" = []))
)]
pub async fn update_task(
    State(state): State<AppState>,
    caller: AuthUser,
    TaskPath(task_id): TaskPath,
    headers: CommandHeaders,
    body: JsonBody<UpdateTaskRequest>,
) -> Result<Response, ApiError> {
    let digest = request_digest("PATCH", &format!("/v1/tasks/{task_id}"), headers.if_match, &body.canonical);
    let patch = parse_update(body.value)?;
    execute(&state, caller, headers, Target::Task(task_id, CommandKind::Update(patch)), digest).await
}

macro_rules! lifecycle_handler {
    ($name:ident, $method:ident, $path:literal, $kind:expr, $doc:literal) => {
        #[doc = $doc]
        #[utoipa::path(
            $method, path = $path, tag = "tasks",
            params(
                ("id" = Uuid, Path, description = "Task id"),
                ("Idempotency-Key" = Option<String>, Header, description = "Makes the command safe to retry"),
                ("If-Match" = Option<String>, Header, description = "Only if the task is at this version, e.g. \"3\""),
            ),
            responses(
                (status = 200, description = "Done; the event is durable in the log", body = CommandResponse),
                (status = 400, body = Problem), (status = 401, body = Problem), (status = 404, body = Problem),
                (status = 409, body = Problem), (status = 412, body = Problem), (status = 503, body = Problem),
            ),
            security(("bearer" = []))
        )]
        pub async fn $name(
            State(state): State<AppState>,
            caller: AuthUser,
            TaskPath(task_id): TaskPath,
            headers: CommandHeaders,
        ) -> Result<Response, ApiError> {
            let path = $path.replace("{id}", &task_id.to_string());
            let digest = request_digest(stringify!($method), &path, headers.if_match, b"");
            execute(&state, caller, headers, Target::Task(task_id, $kind), digest).await
        }
    };
}

lifecycle_handler!(complete_task, post, "/v1/tasks/{id}/complete", CommandKind::Complete, "Complete a task.");
lifecycle_handler!(reopen_task, post, "/v1/tasks/{id}/reopen", CommandKind::Reopen, "Reopen a completed task.");
lifecycle_handler!(delete_task, delete, "/v1/tasks/{id}", CommandKind::Delete, "Delete a task (its history is kept).");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_collects_every_field_error() {
        let req: CreateTaskRequest = serde_json::from_value(serde_json::json!({
            "title": "", "timezone": "Nowhere/City", "recurrence": "FREQ=NEVER", "remind_before": "P1M", "tags": [""]
        }))
        .unwrap();
        let Err(ApiError::Validation(errs)) = parse_create(req, false) else { panic!("expected validation error") };
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, vec!["title", "timezone", "recurrence", "remind_before", "tags"]);
    }

    #[test]
    fn only_the_service_sets_series_fields() {
        let body = serde_json::json!({"title": "t", "recurrence_parent_id": Uuid::nil(), "occurrence": 2});
        let req: CreateTaskRequest = serde_json::from_value(body.clone()).unwrap();
        let Err(ApiError::Validation(errs)) = parse_create(req, false) else { panic!("expected validation error") };
        assert_eq!(errs.len(), 2);
        let req: CreateTaskRequest = serde_json::from_value(body).unwrap();
        let (_, t) = parse_create(req, true).unwrap();
        assert_eq!(t.occurrence, Some(2));
    }

    #[test]
    fn update_refuses_clearing_required_fields_and_clears_optional_ones() {
        let req: UpdateTaskRequest = serde_json::from_value(serde_json::json!({"title": null, "priority": null})).unwrap();
        let Err(ApiError::Validation(errs)) = parse_update(req) else { panic!("expected validation error") };
        assert_eq!(errs.len(), 2);
        let req: UpdateTaskRequest =
            serde_json::from_value(serde_json::json!({"description": null, "due_at": null, "tags": null})).unwrap();
        let p = parse_update(req).unwrap();
        assert_eq!(p.description, Some(None));
        assert_eq!(p.due_at, Some(None));
        assert_eq!(p.tags, Some(Tags::default()));
        assert_eq!(p.title, None);
    }
}

/// SetWebhook.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetWebhookRequest {
    /// Where reminders are POSTed: an absolute https (or http) URL on a public address.
    pub url: Option<String>,
    /// HMAC-SHA256 signing secret (16..=256 characters); generated and returned once when absent.
    pub secret: Option<String>,
}

/// Mark one of your notifications as read.
#[utoipa::path(
    post, path = "/v1/notifications/{id}/read", tag = "notifications",
    params(("id" = Uuid, Path, description = "Notification id"), ("Idempotency-Key" = Option<String>, Header, description = "Makes the command safe to retry")),
    responses(
        (status = 200, description = "Read; the event is durable in the log"),
        (status = 401, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem), (status = 503, body = Problem),
    ),
    security(("bearer" = []))
)]
pub async fn mark_notification_read(
    State(state): State<AppState>,
    caller: AuthUser,
    axum::extract::Path(raw): axum::extract::Path<String>,
    headers: CommandHeaders,
) -> Result<Response, ApiError> {
    let id = Uuid::parse_str(&raw).map_err(|_| ApiError::NotFound)?;
    let digest = request_digest("POST", &format!("/v1/notifications/{id}/read"), None, b"");
    execute(&state, caller, headers, Target::User(UserCommandKind::MarkNotificationRead(id)), digest).await
}

/// Register (or replace) your webhook.
#[utoipa::path(
    put, path = "/v1/webhook", tag = "webhooks",
    request_body = SetWebhookRequest,
    responses(
        (status = 200, description = "Registered; the answer carries `secret` when it was generated"),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 415, body = Problem),
        (status = 422, body = Problem), (status = 503, body = Problem),
    ),
    security(("bearer" = []))
)]
pub async fn set_webhook(
    State(state): State<AppState>,
    caller: AuthUser,
    headers: CommandHeaders,
    body: JsonBody<SetWebhookRequest>,
) -> Result<Response, ApiError> {
    let digest = request_digest("PUT", "/v1/webhook", None, &body.canonical);
    let req = body.value;
    let raw = req.url.ok_or_else(|| ApiError::validation("url", "is required"))?;
    let url = WebhookUrl::parse(raw, state.allow_private_webhooks).map_err(|e| ApiError::validation("url", e.0))?;
    if !state.allow_private_webhooks {
        crate::webhook_dns::check_resolves_publicly(url.as_ref()).await.map_err(|m| ApiError::validation("url", m))?;
    }
    let generated = req.secret.is_none();
    let secret = req.secret.unwrap_or_else(|| format!("whsec_{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple()));
    let response = execute(&state, caller, headers, Target::User(UserCommandKind::SetWebhook { url, secret }), digest).await?;
    if generated {
        return Ok(response);
    }
    // A secret the client chose is not echoed back.
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, 64 * 1024).await.map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| ApiError::Internal(e.to_string()))?;
    if let Some(o) = v.as_object_mut() {
        o.remove("secret");
    }
    let mut res = (parts.status, axum::Json(v)).into_response();
    for (k, val) in parts.headers.iter() {
        if k != header::CONTENT_LENGTH {
            res.headers_mut().insert(k.clone(), val.clone());
        }
    }
    Ok(res)
}

/// Remove your webhook.
#[utoipa::path(
    delete, path = "/v1/webhook", tag = "webhooks",
    responses((status = 200, description = "Removed"), (status = 401, body = Problem), (status = 404, body = Problem), (status = 503, body = Problem)),
    security(("bearer" = []))
)]
pub async fn remove_webhook(State(state): State<AppState>, caller: AuthUser, headers: CommandHeaders) -> Result<Response, ApiError> {
    let digest = request_digest("DELETE", "/v1/webhook", None, b"");
    execute(&state, caller, headers, Target::User(UserCommandKind::RemoveWebhook), digest).await
}
