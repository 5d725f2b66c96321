//! A query API over a fresh database of its own (`test_support::fresh_database`), driven with
//! `oneshot`; read models are seeded directly, as the projector would write them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Request};
use chrono::{DateTime, TimeZone, Utc};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use sqlx::PgPool;
use tower::ServiceExt;
use uuid::Uuid;

use query_api::watermarks::Watermarks;
use query_api::{AppState, Limits, ProgressTracker};
use test_support::{fresh_database, TestDatabase, Tokens};

pub const TOPIC: &str = "task-events";

/// A query the tests only need an answer to.
pub const STATS: &str = "{ stats { total } }";

/// The tests' reference instant.
pub fn base() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
}

/// The log's end as the test says it is; `None` plays an unreachable Kafka.
pub struct FakeWatermarks(pub Option<HashMap<i32, i64>>);

#[async_trait::async_trait]
impl Watermarks for FakeWatermarks {
    async fn high_watermarks(&self, _topic: &str, partitions: &[i32]) -> anyhow::Result<HashMap<i32, i64>> {
        let all = self.0.as_ref().ok_or_else(|| anyhow::anyhow!("fake Kafka is down"))?;
        Ok(partitions.iter().filter_map(|p| all.get(p).map(|h| (*p, *h))).collect())
    }
}

pub struct TestApp {
    pub pool: PgPool,
    pub router: axum::Router,
    pub tokens: Tokens,
    pub progress: ProgressTracker,
    /// Dropped with the app, also when the test failed.
    _database: TestDatabase,
}

pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Answer {
    /// `errors[0].extensions.code`.
    pub fn code(&self) -> Option<&str> {
        self.body["errors"][0]["extensions"]["code"].as_str()
    }

    pub fn message(&self) -> &str {
        self.body["errors"][0]["message"].as_str().unwrap_or("")
    }
}

/// Panics, saying how to run the tests, when `DATABASE_URL` is not set.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(Limits::default(), FakeWatermarks(Some(HashMap::new()))).await
}

pub async fn spawn_app_with(limits: Limits, watermarks: FakeWatermarks) -> TestApp {
    // The process-wide Prometheus recorder, so that `/metrics` shows what the tests did.
    platform::http::metrics_handle();
    if std::env::var("TEST_LOG").is_ok() {
        platform::telemetry::init("query-api-test");
    }
    let database = fresh_database().await;
    let pool = database.pool.clone();
    let tokens = Tokens::default();
    let progress = ProgressTracker::new(TOPIC);
    progress.spawn(pool.clone());
    tokio::time::timeout(Duration::from_secs(10), progress.listening()).await.expect("the progress listener starts");
    let state = AppState::new(pool.clone(), tokens.auth(), progress.clone(), Arc::new(watermarks), limits);
    let router = query_api::router(state);
    TestApp { pool, router, tokens, progress, _database: database }
}

#[derive(Debug, Clone)]
pub struct SeedTask {
    pub id: Uuid,
    pub user: &'static str,
    pub title: String,
    pub description: Option<String>,
    pub status: &'static str,
    pub priority: i16,
    pub due_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub tags: Vec<String>,
}

impl SeedTask {
    pub fn new(user: &'static str, title: impl Into<String>, created_at: DateTime<Utc>) -> Self {
        SeedTask { id: Uuid::new_v4(), user, title: title.into(), description: None, status: "open", priority: 1, due_at: None, created_at, tags: Vec::new() }
    }
}

impl TestApp {
    /// Inserts a task row; a completed one was completed an hour after its creation.
    pub async fn seed(&self, t: &SeedTask) -> Uuid {
        sqlx::query(
            "INSERT INTO tasks (id, user_id, title, description, status, priority, due_at, timezone, tags, version,
                                created_at, updated_at, completed_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'UTC', $8, 1, $9, $9,
                     CASE WHEN $5 = 'completed' THEN $9 + interval '1 hour' END)",
        )
        .bind(t.id)
        .bind(t.user)
        .bind(&t.title)
        .bind(&t.description)
        .bind(t.status)
        .bind(t.priority)
        .bind(t.due_at)
        .bind(&t.tags)
        .bind(t.created_at)
        .execute(&self.pool)
        .await
        .expect("seed task");
        t.id
    }

    /// Inserts one `task_history` row.
    pub async fn seed_event(&self, task: Uuid, user: &str, version: i32, event_type: &str, data: Value) {
        sqlx::query(
            "INSERT INTO task_history (event_id, task_id, user_id, version, event_type, schema_version, occurred_at, data,
                                       correlation_id, log_partition, log_offset)
             VALUES ($1, $2, $3, $4, $5, 1, now(), $6, 'corr-1', 0, $4)",
        )
        .bind(Uuid::new_v4())
        .bind(task)
        .bind(user)
        .bind(version)
        .bind(event_type)
        .bind(data)
        .execute(&self.pool)
        .await
        .expect("seed event");
    }

    /// Sets `next_offset` of `(projection, partition)` on the topic.
    pub async fn set_offset(&self, projection: &str, partition: i32, next_offset: i64) {
        sqlx::query(
            "INSERT INTO projection_offsets (projection, topic, partition, next_offset) VALUES ($1, $2, $3, $4)
             ON CONFLICT ON CONSTRAINT projection_offsets_pkey DO UPDATE SET next_offset = EXCLUDED.next_offset",
        )
        .bind(projection)
        .bind(TOPIC)
        .bind(partition)
        .bind(next_offset)
        .execute(&self.pool)
        .await
        .expect("set offset");
    }

    pub fn bearer(&self, user: &str) -> String {
        self.tokens.bearer(user)
    }

    pub async fn send(&self, req: Request<Body>) -> Answer {
        let res = self.router.clone().oneshot(req).await.expect("the router answers");
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let bytes = res.into_body().collect().await.expect("body").to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Answer { status, headers, body }
    }

    /// POST /graphql with optional `Authorization` and `X-Consistency-Token` values.
    pub async fn post_raw(&self, authorization: Option<&str>, consistency: Option<&str>, body: impl Into<Body>) -> Answer {
        let mut req = Request::post("/graphql").header("content-type", "application/json");
        if let Some(a) = authorization {
            req = req.header("authorization", a);
        }
        if let Some(t) = consistency {
            req = req.header("x-consistency-token", t);
        }
        self.send(req.body(body.into()).unwrap()).await
    }

    pub async fn post(&self, user: &str, query: &str, variables: Value, consistency: Option<&str>) -> Answer {
        let body = json!({"query": query, "variables": variables}).to_string();
        self.post_raw(Some(&self.bearer(user)), consistency, body).await
    }

    /// The `data` of a query that must succeed.
    pub async fn data(&self, user: &str, query: &str, variables: Value) -> Value {
        let a = self.post(user, query, variables, None).await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert!(a.body.get("errors").is_none(), "{}", a.body);
        a.body["data"].clone()
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.send(Request::get(path).body(Body::empty()).unwrap()).await
    }
}
