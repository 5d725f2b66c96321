//! `/healthz`, `/readyz` (not ready when a known migration is missing) and `/metrics`.

use serde_json::json;

use crate::helpers::{spawn_app, STATS};

#[tokio::test]
async fn health_readiness_and_metrics() {
    let app = spawn_app().await;
    assert_eq!(app.get("/healthz").await.status, 200);
    assert_eq!(app.get("/readyz").await.status, 200);
    app.post("alice", STATS, json!({}), None).await;
    let m = app.get("/metrics").await;
    assert_eq!(m.status, 200);
    let text = m.body.as_str().unwrap();
    assert!(text.contains("graphql_requests_total{result=\"ok\"}") && text.contains("graphql_request_duration_seconds"), "{text}");
    // A migration this build knows about is not applied (any more): not ready.
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = (SELECT max(version) FROM _sqlx_migrations)").execute(&app.pool).await.unwrap();
    let r = app.get("/readyz").await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.as_str().unwrap().contains("migrations"), "{}", r.body);
}
