//! Notifications and their webhook deliveries: a page loads the deliveries of all its
//! notifications at once (no N+1), counted with the statements counter in `/metrics`.

use serde_json::json;

use query_api::store::DELIVERY_STATEMENTS_METRIC;

use crate::helpers::{base, spawn_app, TestApp};

/// 200 notifications of alice, each with one delivery that took two attempts (500, then 200),
/// and one notification of bob with a delivery.
async fn seed(app: &TestApp) {
    for statement in [
        "INSERT INTO notifications (id, user_id, task_id, kind, message, created_at, event_id)
         SELECT gen_random_uuid(), 'alice', gen_random_uuid(), 'reminder', 'n' || i, $1 + i * interval '1 minute', gen_random_uuid()
         FROM generate_series(1, 200) i",
        "INSERT INTO notifications (id, user_id, task_id, kind, message, created_at, event_id)
         VALUES (gen_random_uuid(), 'bob', gen_random_uuid(), 'reminder', 'bob', $1, gen_random_uuid())",
        "INSERT INTO webhook_deliveries (id, notification_id, user_id, url, payload, status, created_at)
         SELECT gen_random_uuid(), id, user_id, 'https://hook.example/' || message, '{}', 'delivered', created_at FROM notifications WHERE $1 IS NOT NULL",
        "INSERT INTO webhook_attempts (delivery_id, attempt, attempted_at, status_code, duration_ms)
         SELECT d.id, a, d.created_at, CASE a WHEN 1 THEN 500 ELSE 200 END, 10 FROM webhook_deliveries d, generate_series(1, 2) a WHERE $1 IS NOT NULL",
    ] {
        sqlx::query(statement).bind(base()).execute(&app.pool).await.expect("seed notifications");
    }
}

async fn delivery_statements(app: &TestApp) -> u64 {
    let metrics = app.get("/metrics").await;
    let text = metrics.body.as_str().unwrap_or_default().to_owned();
    text.lines().find_map(|l| l.strip_prefix(DELIVERY_STATEMENTS_METRIC).and_then(|v| v.trim().parse::<f64>().ok())).map_or(0, |v| v as u64)
}

#[tokio::test]
async fn a_page_of_200_notifications_loads_its_deliveries_in_two_statements() {
    let app = spawn_app().await;
    seed(&app).await;
    let before = delivery_statements(&app).await;
    let q = "{ notifications(first: 200) { edges { node { message webhookDeliveries { url attempts { attempt statusCode } } } } } }";
    let d = app.data("alice", q, json!({})).await;
    assert_eq!(delivery_statements(&app).await - before, 2, "one statement for the deliveries, one for their attempts");
    let edges = d["notifications"]["edges"].as_array().unwrap();
    assert_eq!(edges.len(), 200);
    for e in edges {
        let node = &e["node"];
        let url = format!("https://hook.example/{}", node["message"].as_str().unwrap());
        assert_eq!(
            node["webhookDeliveries"],
            json!([{"url": url, "attempts": [{"attempt": 1, "statusCode": 500}, {"attempt": 2, "statusCode": 200}]}]),
            "{node}"
        );
    }
    // Bob sees his own delivery only; a page that does not select deliveries does not load them.
    let d = app.data("bob", q, json!({})).await;
    assert_eq!(d["notifications"]["edges"][0]["node"]["webhookDeliveries"][0]["url"], "https://hook.example/bob");
    let before = delivery_statements(&app).await;
    app.data("alice", "{ notifications(first: 200) { edges { node { id } } } }", json!({})).await;
    assert_eq!(delivery_statements(&app).await, before);
}
