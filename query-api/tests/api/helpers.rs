//! A query API over a fresh database of its own (random name), driven with `oneshot`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use chrono::{DateTime, Utc};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection, PgPool};
use tower::ServiceExt;
use uuid::Uuid;

use platform::auth::JwtAuth;
use platform::secret::Secret;
use query_api::progress::ProgressTracker;
use query_api::watermarks::Watermarks;
use query_api::AppState;

pub const TOPIC: &str = "task-events";

pub struct FakeWatermarks(pub HashMap<i32, i64>);

#[async_trait::async_trait]
impl Watermarks for FakeWatermarks {
    async fn high_watermarks(&self, _topic: &str, _partitions: &[i32]) -> anyhow::Result<HashMap<i32, i64>> {
        Ok(self.0.clone())
    }
}

pub struct TestApp {
    pub pool: PgPool,
    pub router: axum::Router,
    pub auth: JwtAuth,
    pub progress: ProgressTracker,
}

pub async fn spawn_app(consistency_wait: Duration, watermarks: HashMap<i32, i64>) -> Option<TestApp> {
    let Ok(admin) = std::env::var("DATABASE_URL") else {
        eprintln!("DATABASE_URL is not set: skipping (run with ./dev test)");
        return None;
    };
    let name = format!("ts_q_{}", &Uuid::new_v4().simple().to_string()[..12]);
    let mut conn = PgConnection::connect(&admin).await.expect("connect admin");
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await.expect("create database");
    let url = match admin.rfind('/') {
        Some(i) if admin[..i].contains("://") && admin[..i].matches('/').count() >= 2 => format!("{}/{}", &admin[..i], name),
        _ => format!("{admin}/{name}"),
    };
    let pool = PgPool::connect(&url).await.expect("connect test db");
    platform::db::migrate(&pool).await.expect("migrate");
    let auth = JwtAuth::new(&Secret::new("test-secret"));
    let progress = ProgressTracker::new(TOPIC);
    progress.spawn(pool.clone());
    let state = AppState::new(pool.clone(), auth.clone(), TOPIC, Arc::new(FakeWatermarks(watermarks)), progress.clone(), consistency_wait, (8, 300));
    let router = query_api::router(state, Duration::from_secs(10));
    Some(TestApp { pool, router, auth, progress })
}

pub struct SeedTask {
    pub user: &'static str,
    pub title: String,
    pub status: &'static str,
    pub priority: i16,
    pub due_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub tags: Vec<String>,
}

impl TestApp {
    pub async fn seed(&self, t: &SeedTask) -> Uuid {
        let id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO tasks (id, user_id, title, status, priority, due_at, timezone, tags, version, created_at, updated_at, completed_at)
             VALUES ($1, $2, $3, $4, $5, $6, 'UTC', $7, 1, $8, $8, CASE WHEN $4 = 'completed' THEN $8 + interval '1 hour' END)",
        )
        .bind(id)
        .bind(t.user)
        .bind(&t.title)
        .bind(t.status)
        .bind(t.priority)
        .bind(t.due_at)
        .bind(&t.tags)
        .bind(t.created_at)
        .execute(&self.pool)
        .await
        .expect("seed task");
        id
    }

    pub async fn post(&self, user: Option<&str>, query: &str, variables: Value, token: Option<&str>) -> (u16, Value) {
        let mut req = Request::post("/graphql").header("content-type", "application/json");
        if let Some(u) = user {
            req = req.header("authorization", format!("Bearer {}", self.auth.issue(u, 60)));
        }
        if let Some(t) = token {
            req = req.header("x-consistency-token", t);
        }
        let body = Body::from(json!({"query": query, "variables": variables}).to_string());
        let res = self.router.clone().oneshot(req.body(body).unwrap()).await.unwrap();
        let status = res.status().as_u16();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    pub async fn data(&self, user: &str, query: &str, variables: Value) -> Value {
        let (status, body) = self.post(Some(user), query, variables, None).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.get("errors").is_none(), "{body}");
        body["data"].clone()
    }
}
