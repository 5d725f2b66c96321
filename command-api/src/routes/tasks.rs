//! Task commands: `POST /v1/tasks`, `PATCH|DELETE /v1/tasks/{id}`, `POST /v1/tasks/{id}/complete`,
//! `POST /v1/tasks/{id}/reopen`. Requests are parsed at the edge into domain values (every field
//! error collected), then submitted.

use axum::extract::State;
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use domain::{CommandKind, Description, FieldError, NewTask, Priority, Recurrence, RemindBefore, Tags, TaskId, TaskPatch, TimeZone, Title, ValidationError};

use super::openapi::{CommandProblems, IdempotencyKey, IfMatch, JsonBodyProblems, TaskProblems};
use crate::command::{new_task_id, submit, task_command};
use crate::error::{ApiError, Problem};
use crate::extract::{AuthUser, CommandHeaders, CommandRoute, JsonBody, TaskPath};
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(create_task)).routes(routes!(update_task, delete_task)).routes(routes!(complete_task)).routes(routes!(reopen_task))
}

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

/// Create a task.
#[utoipa::path(
    post, path = "/v1/tasks", tag = "tasks",
    request_body = CreateTaskRequest,
    params(
        IdempotencyKey, IfMatch,
    ),
    responses(
        (status = 201, description = "Created; the event is durable in the log", body = CommandResponse),
        (status = 409, description = "A task with this id exists (another user's, or deleted)", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "If-Match: \"0\" but a task with this id exists", body = Problem, content_type = "application/problem+json"),
        JsonBodyProblems, CommandProblems,
    ),
    security(("bearer" = []))
)]
pub async fn create_task(
    State(state): State<AppState>,
    caller: AuthUser,
    route: CommandRoute,
    headers: CommandHeaders,
    body: JsonBody<CreateTaskRequest>,
) -> Result<Response, ApiError> {
    let digest = route.digest(headers.if_match, &body.canonical);
    let (task_id, task) = parse_create(body.value, caller.is_service())?;
    let task_id = task_id.unwrap_or_else(|| new_task_id(&state, &caller, &headers));
    let cmd = task_command(&caller, &headers, task_id, CommandKind::Create(task));
    submit(&state, caller, headers, digest, cmd).await
}

/// Update some fields of a task.
#[utoipa::path(
    patch, path = "/v1/tasks/{id}", tag = "tasks",
    request_body = UpdateTaskRequest,
    params(
        ("id" = Uuid, Path, description = "Task id"),
        IdempotencyKey, IfMatch,
    ),
    responses(
        (status = 200, description = "Updated; the event is durable in the log", body = CommandResponse),
        TaskProblems, JsonBodyProblems, CommandProblems,
    ),
    security(("bearer" = []))
)]
pub async fn update_task(
    State(state): State<AppState>,
    caller: AuthUser,
    TaskPath(task_id): TaskPath,
    route: CommandRoute,
    headers: CommandHeaders,
    body: JsonBody<UpdateTaskRequest>,
) -> Result<Response, ApiError> {
    let digest = route.digest(headers.if_match, &body.canonical);
    let patch = parse_update(body.value)?;
    let cmd = task_command(&caller, &headers, task_id, CommandKind::Update(patch));
    submit(&state, caller, headers, digest, cmd).await
}

// rustfmt re-indents an attribute inside macro_rules! further on every run; this one is laid out by hand.
#[rustfmt::skip]
macro_rules! lifecycle_handler {
    ($name:ident, $method:ident, $path:literal, $kind:expr, $doc:literal) => {
        #[doc = $doc]
        #[utoipa::path(
            $method, path = $path, tag = "tasks",
            params(
                ("id" = Uuid, Path, description = "Task id"),
                IdempotencyKey, IfMatch,
            ),
            responses(
                (status = 200, description = "Done; the event is durable in the log", body = CommandResponse),
                TaskProblems, CommandProblems,
            ),
            security(("bearer" = []))
        )]
        pub async fn $name(
            State(state): State<AppState>,
            caller: AuthUser,
            TaskPath(task_id): TaskPath,
            route: CommandRoute,
            headers: CommandHeaders,
        ) -> Result<Response, ApiError> {
            let digest = route.digest(headers.if_match, b"");
            let cmd = task_command(&caller, &headers, task_id, $kind);
            submit(&state, caller, headers, digest, cmd).await
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
        let req: UpdateTaskRequest = serde_json::from_value(serde_json::json!({"description": null, "due_at": null, "tags": null})).unwrap();
        let p = parse_update(req).unwrap();
        assert_eq!(p.description, Some(None));
        assert_eq!(p.due_at, Some(None));
        assert_eq!(p.tags, Some(Tags::default()));
        assert_eq!(p.title, None);
    }
}
