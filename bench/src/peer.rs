//! `peer-cqrs-es`: the task aggregate on the `cqrs-es` + `postgres-es` crates, what a Rust team
//! would otherwise pick, behind the same HTTP routes and JSON bodies as taskstream's command API, for
//! `loadgen`'s peer phase. Benchmark code, not part of the product.
//!
//! It decides with taskstream's own pure domain (`domain::TaskDecider`: `decide` / `evolve`), so the business rules
//! and validation are the same; what differs is the framework: each command loads the aggregate's
//! events from PostgreSQL, decides, and appends with optimistic locking (postgres-es's `events`
//! table), one transaction per command. Not modelled: idempotency keys, If-Match, reminders and the
//! user-level commands (the load does not use them), read models (the peer has none).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{patch, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, AggregateError, DomainEvent};
use postgres_es::PostgresCqrs;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use domain::DomainEvent as _;
use domain::{Command, CommandKind, Decider, DomainError, NewTask, Priority, Tags, TaskEvent, TaskId, TaskPatch, TaskState, Title, UserId};

#[derive(Default, Serialize, Deserialize)]
struct Task {
    #[serde(skip)]
    state: TaskState,
}

/// A taskstream event as postgres-es stores it (type and JSON data, like our log's records).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Event {
    user: String,
    event_type: String,
    data: Value,
}

impl DomainEvent for Event {
    fn event_type(&self) -> String {
        self.event_type.clone()
    }
    fn event_version(&self) -> String {
        "1".into()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Rejected(DomainError);

impl Aggregate for Task {
    const TYPE: &'static str = "task";
    type Command = Command;
    type Event = Event;
    type Error = Rejected;
    type Services = ();

    async fn handle(&mut self, command: Command, _: &(), sink: &EventSink<Self>) -> Result<(), Rejected> {
        let events = domain::TaskDecider::decide(&command, &self.state).map_err(Rejected)?;
        for e in events {
            let data = serde_json::from_slice(&e.to_json()).unwrap_or(Value::Null);
            sink.write(Event { user: command.user.to_string(), event_type: e.event_type().to_owned(), data }, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Event) {
        let Ok(user) = UserId::parse(event.user) else { return };
        let Ok(bytes) = serde_json::to_vec(&event.data) else { return };
        if let Ok(e) = TaskEvent::from_json(&event.event_type, &bytes) {
            self.state = domain::TaskDecider::evolve(std::mem::take(&mut self.state), &user, &e);
        }
    }
}

#[derive(Clone)]
struct App {
    cqrs: Arc<PostgresCqrs<Task>>,
    auth: platform::auth::JwtAuth,
}

#[derive(Deserialize)]
struct CreateBody {
    task_id: Option<uuid::Uuid>,
    title: String,
    priority: Option<Priority>,
    tags: Option<Vec<String>>,
    due_at: Option<DateTime<Utc>>,
}

#[derive(Deserialize)]
struct PatchBody {
    title: Option<String>,
    priority: Option<Priority>,
}

fn problem(status: StatusCode, detail: &str) -> Response {
    (status, Json(json!({"status": status.as_u16(), "detail": detail}))).into_response()
}

async fn run(app: &App, headers: &HeaderMap, task_id: TaskId, kind: impl FnOnce() -> Result<CommandKind, String>, created: bool) -> Response {
    let user = match app.auth.authenticate(headers.get("authorization").and_then(|v| v.to_str().ok())) {
        Ok(u) => u,
        Err(_) => return problem(StatusCode::UNAUTHORIZED, "invalid token"),
    };
    let kind = match kind() {
        Ok(k) => k,
        Err(e) => return problem(StatusCode::UNPROCESSABLE_ENTITY, &e),
    };
    let id = task_id.to_string();
    match app.cqrs.execute(&id, Command { task_id, user, expected_version: None, kind }).await {
        Ok(()) => {
            // cqrs-es does not return the new version; reading it back would cost the peer a query.
            let status = if created { StatusCode::CREATED } else { StatusCode::OK };
            (status, Json(json!({"task_id": id}))).into_response()
        }
        Err(AggregateError::UserError(Rejected(DomainError::NotFound))) => problem(StatusCode::NOT_FOUND, "task not found"),
        Err(AggregateError::UserError(Rejected(DomainError::Invalid(_)))) => problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
        Err(AggregateError::UserError(e)) => problem(StatusCode::CONFLICT, &e.to_string()),
        Err(AggregateError::AggregateConflict) => problem(StatusCode::CONFLICT, "concurrent update"),
        Err(e) => problem(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

async fn create(State(app): State<App>, headers: HeaderMap, Json(b): Json<CreateBody>) -> Response {
    let task_id = b.task_id.map(TaskId::from_uuid).unwrap_or_else(TaskId::new_v7);
    let kind = || {
        let mut t = NewTask::new(Title::parse(b.title).map_err(|e| e.to_string())?);
        t.priority = b.priority.unwrap_or_default();
        t.tags = Tags::parse(b.tags.unwrap_or_default()).map_err(|e| e.to_string())?;
        t.due_at = b.due_at;
        Ok(CommandKind::Create(t))
    };
    run(&app, &headers, task_id, kind, true).await
}

async fn update(State(app): State<App>, headers: HeaderMap, Path(id): Path<uuid::Uuid>, Json(b): Json<PatchBody>) -> Response {
    let kind = || {
        let title = b.title.map(Title::parse).transpose().map_err(|e| e.to_string())?;
        Ok(CommandKind::Update(TaskPatch { title, priority: b.priority, ..Default::default() }))
    };
    run(&app, &headers, TaskId::from_uuid(id), kind, false).await
}

async fn complete(State(app): State<App>, headers: HeaderMap, Path(id): Path<uuid::Uuid>) -> Response {
    run(&app, &headers, TaskId::from_uuid(id), || Ok(CommandKind::Complete), false).await
}

async fn reopen(State(app): State<App>, headers: HeaderMap, Path(id): Path<uuid::Uuid>) -> Response {
    run(&app, &headers, TaskId::from_uuid(id), || Ok(CommandKind::Reopen), false).await
}

async fn delete(State(app): State<App>, headers: HeaderMap, Path(id): Path<uuid::Uuid>) -> Response {
    run(&app, &headers, TaskId::from_uuid(id), || Ok(CommandKind::Delete), false).await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("DATABASE_URL").map_err(|_| anyhow::anyhow!("DATABASE_URL is not set"))?;
    let addr: SocketAddr = std::env::var("PEER_ADDR").unwrap_or_else(|_| "127.0.0.1:18090".into()).parse()?;
    let secret = std::env::var("AUTH_JWT_SECRET").unwrap_or_else(|_| "taskstream-dev-secret".into());
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(16).connect(&url).await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS events (
            aggregate_type text NOT NULL, aggregate_id text NOT NULL, sequence bigint CHECK (sequence >= 0) NOT NULL,
            event_type text NOT NULL, event_version text NOT NULL, payload json NOT NULL, metadata json NOT NULL,
            PRIMARY KEY (aggregate_type, aggregate_id, sequence))",
    )
    .execute(&pool)
    .await?;
    let cqrs = Arc::new(postgres_es::postgres_cqrs(pool, vec![], ()));
    let app = App { cqrs, auth: platform::auth::JwtAuth::new(&platform::secret::Secret::new(secret)) };
    let router = Router::new()
        .route("/readyz", axum::routing::get(|| async { "ready" }))
        .route("/v1/tasks", post(create))
        .route("/v1/tasks/{id}", patch(update).delete(delete))
        .route("/v1/tasks/{id}/complete", post(complete))
        .route("/v1/tasks/{id}/reopen", post(reopen))
        .with_state(app);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, router).with_graceful_shutdown(platform::http::shutdown_signal()).await?;
    Ok(())
}
