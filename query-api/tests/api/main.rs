//! Query API against a real PostgreSQL (its own database per test), read models seeded directly.

mod helpers;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{Duration as Age, TimeZone, Utc};
use serde_json::{json, Value};

use helpers::{spawn_app, SeedTask, TOPIC};
use platform::position::Position;

const PAGE: &str = "query($order: TaskOrder!, $after: String, $filter: TaskFilter) {
  tasks(orderBy: $order, first: 7, after: $after, filter: $filter) {
    edges { cursor node { id title priority dueAt createdAt } }
    pageInfo { hasNextPage hasPreviousPage endCursor } } }";

fn seed_task(i: usize) -> SeedTask {
    let base = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    SeedTask {
        user: "alice",
        title: format!("task {i:03}"),
        status: if i % 3 == 0 { "completed" } else { "open" },
        priority: (i % 4) as i16,
        // every 5th has no due date; some share a due date to exercise the tie-breaks
        due_at: (i % 5 != 0).then(|| base + Age::hours((i % 17) as i64)),
        created_at: base + Age::minutes(i as i64),
        tags: if i % 2 == 0 { vec!["even".into()] } else { vec!["odd".into(), "x".into()] },
    }
}

async fn all_pages(app: &helpers::TestApp, order: &str, filter: Value) -> Vec<Value> {
    let mut after: Option<String> = None;
    let mut out = Vec::new();
    for page in 0.. {
        let d = app.data("alice", PAGE, json!({"order": order, "after": after, "filter": filter})).await;
        let conn = &d["tasks"];
        for e in conn["edges"].as_array().unwrap() {
            out.push(e["node"].clone());
        }
        assert_eq!(conn["pageInfo"]["hasPreviousPage"], page > 0);
        if !conn["pageInfo"]["hasNextPage"].as_bool().unwrap() {
            break;
        }
        after = conn["pageInfo"]["endCursor"].as_str().map(str::to_owned);
        assert!(page < 100, "pagination does not end");
    }
    out
}

fn key(v: &Value, field: &str) -> Option<chrono::DateTime<Utc>> {
    v[field].as_str().map(|s| chrono::DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc))
}

fn prio(v: &Value) -> i32 {
    match v["priority"].as_str().unwrap() {
        "LOW" => 0,
        "MEDIUM" => 1,
        "HIGH" => 2,
        _ => 3,
    }
}

#[tokio::test]
async fn every_order_pages_through_each_task_exactly_once_in_order() {
    let Some(app) = spawn_app(Duration::from_secs(1), HashMap::new()).await else { return };
    for i in 0..120 {
        app.seed(&seed_task(i)).await;
    }
    app.seed(&SeedTask { user: "bob", ..seed_task(999) }).await;
    for order in ["DUE_AT_ASC", "DUE_AT_DESC", "CREATED_AT_ASC", "CREATED_AT_DESC", "PRIORITY_DESC"] {
        let nodes = all_pages(&app, order, Value::Null).await;
        let ids: HashSet<&str> = nodes.iter().map(|n| n["id"].as_str().unwrap()).collect();
        assert_eq!((nodes.len(), ids.len()), (120, 120), "{order}: each of alice's tasks once");
        for w in nodes.windows(2) {
            let (a, b) = (&w[0], &w[1]);
            let ok = match order {
                "DUE_AT_ASC" => match (key(a, "dueAt"), key(b, "dueAt")) {
                    (Some(x), Some(y)) => x <= y,
                    (Some(_), None) | (None, None) => true,
                    (None, Some(_)) => false,
                },
                "DUE_AT_DESC" => match (key(a, "dueAt"), key(b, "dueAt")) {
                    (Some(x), Some(y)) => x >= y,
                    (Some(_), None) | (None, None) => true,
                    (None, Some(_)) => false,
                },
                "CREATED_AT_ASC" => key(a, "createdAt") <= key(b, "createdAt"),
                "CREATED_AT_DESC" => key(a, "createdAt") >= key(b, "createdAt"),
                _ => prio(a) >= prio(b),
            };
            assert!(ok, "{order}: {a} before {b}");
        }
    }
}

#[tokio::test]
async fn filters_select_the_right_tasks() {
    let Some(app) = spawn_app(Duration::from_secs(1), HashMap::new()).await else { return };
    let seeds: Vec<SeedTask> = (0..40).map(seed_task).collect();
    for s in &seeds {
        app.seed(s).await;
    }
    let count = |f: &dyn Fn(&SeedTask) -> bool| seeds.iter().filter(|s| f(s)).count();
    let cases: Vec<(Value, usize)> = vec![
        (json!({"status": "OPEN"}), count(&|s| s.status == "open")),
        (json!({"status": "COMPLETED"}), count(&|s| s.status == "completed")),
        (json!({"priority": "URGENT"}), count(&|s| s.priority == 3)),
        (json!({"tag": "odd"}), count(&|s| s.tags.contains(&"odd".to_string()))),
        (json!({"search": "TASK 01"}), count(&|s| s.title.starts_with("task 01"))),
        (json!({"search": "%"}), 0),
        (json!({"dueBefore": "2026-01-01T05:00:00Z"}), count(&|s| s.due_at.is_some_and(|d| d < Utc.with_ymd_and_hms(2026, 1, 1, 5, 0, 0).unwrap()))),
        (json!({"dueAfter": "2026-01-01T05:00:00Z", "status": "OPEN"}), count(&|s| s.status == "open" && s.due_at.is_some_and(|d| d > Utc.with_ymd_and_hms(2026, 1, 1, 5, 0, 0).unwrap()))),
    ];
    for (filter, want) in cases {
        assert_eq!(all_pages(&app, "CREATED_AT_ASC", filter.clone()).await.len(), want, "{filter}");
    }
}

#[tokio::test]
async fn stats_count_only_the_callers_tasks() {
    let Some(app) = spawn_app(Duration::from_secs(1), HashMap::new()).await else { return };
    let past = Utc::now() - Age::days(1);
    let future = Utc::now() + Age::days(1);
    for (status, due) in [("open", Some(past)), ("open", Some(future)), ("open", None), ("completed", Some(past))] {
        app.seed(&SeedTask { status, due_at: due, ..seed_task(1) }).await;
    }
    app.seed(&SeedTask { user: "bob", ..seed_task(2) }).await;
    let d = app.data("alice", "{ stats { total open completed overdue completionRate avgCompletionSeconds } }", json!({})).await;
    assert_eq!(d["stats"], json!({"total": 4, "open": 3, "completed": 1, "overdue": 1, "completionRate": 0.25, "avgCompletionSeconds": 3600.0}));
    let d = app.data("carol", "{ stats { total completionRate avgCompletionSeconds } }", json!({})).await;
    assert_eq!(d["stats"], json!({"total": 0, "completionRate": 0.0, "avgCompletionSeconds": null}));
}

#[tokio::test]
async fn users_are_isolated_and_history_outlives_deletion() {
    let Some(app) = spawn_app(Duration::from_secs(1), HashMap::new()).await else { return };
    let id = app.seed(&seed_task(1)).await;
    for v in 1..=3 {
        sqlx::query(
            "INSERT INTO task_history (event_id, task_id, user_id, version, event_type, schema_version, occurred_at, data, log_partition, log_offset)
             VALUES ($1, $2, 'alice', $3, $4, 1, now(), '{}', 0, $3)",
        )
        .bind(uuid::Uuid::now_v7())
        .bind(id)
        .bind(v)
        .bind(["task.created", "task.completed", "task.deleted"][v as usize - 1])
        .execute(&app.pool)
        .await
        .unwrap();
    }
    let q = "query($id: ID!) { task(id: $id) { title } taskHistory(taskId: $id, first: 2) { edges { cursor node { type version } } pageInfo { hasNextPage endCursor } } }";
    let bob = app.data("bob", q, json!({"id": id})).await;
    assert_eq!(bob, json!({"task": null, "taskHistory": {"edges": [], "pageInfo": {"hasNextPage": false, "endCursor": null}}}));
    sqlx::query("DELETE FROM tasks WHERE id = $1").bind(id).execute(&app.pool).await.unwrap();
    let alice = app.data("alice", q, json!({"id": id})).await;
    assert!(alice["task"].is_null());
    assert_eq!(alice["taskHistory"]["edges"].as_array().unwrap().len(), 2);
    assert_eq!(alice["taskHistory"]["pageInfo"]["hasNextPage"], true);
    let after = alice["taskHistory"]["pageInfo"]["endCursor"].as_str().unwrap();
    let rest = app
        .data("alice", "query($id: ID!, $after: String) { taskHistory(taskId: $id, after: $after) { edges { node { type version } } } }", json!({"id": id, "after": after}))
        .await;
    assert_eq!(rest["taskHistory"]["edges"], json!([{"node": {"type": "task.deleted", "version": 3}}]));
    // Not a UUID: just not found.
    assert!(app.data("alice", "{ task(id: \"nope\") { id } }", json!({})).await["task"].is_null());
}

#[tokio::test]
async fn bad_requests_are_refused_clearly() {
    let Some(app) = spawn_app(Duration::from_secs(1), HashMap::new()).await else { return };
    let (s, body) = app.post(None, "{ stats { total } }", json!({}), None).await;
    assert_eq!((s, body["errors"][0]["extensions"]["code"].as_str()), (401, Some("UNAUTHENTICATED")));
    let (s, body) = app.post(Some("alice"), "{ tasks(first: 201) { edges { cursor } } }", json!({}), None).await;
    assert!(s == 200 && body["errors"][0]["message"].as_str().unwrap().contains("first"), "{body}");
    let (s, body) = app.post(Some("alice"), "{ tasks(after: \"bogus\") { edges { cursor } } }", json!({}), None).await;
    assert!(s == 200 && body["errors"][0]["message"].as_str().unwrap().contains("cursor"), "{body}");
    let deep = "{ tasks { edges { node { id } } pageInfo { hasNextPage } } }".to_owned();
    let too_deep = format!("{{ a: tasks {{ edges {{ node {{ id }} }} }} b: __schema {{ types {{ fields {{ type {{ ofType {{ ofType {{ ofType {{ ofType {{ name }} }} }} }} }} }} }} }} }}");
    assert_eq!(app.post(Some("alice"), &deep, json!({}), None).await.0, 200);
    let (s, body) = app.post(Some("alice"), &too_deep, json!({}), None).await;
    assert!(s < 500 && body["errors"].is_array(), "depth limit: {body}");
    let (s, body) = app.post(Some("alice"), "{ stats { total } }", json!({}), Some("garbage")).await;
    assert_eq!((s, body["errors"][0]["extensions"]["code"].as_str()), (400, Some("BAD_CONSISTENCY_TOKEN")));
}

#[tokio::test]
async fn consistency_token_waits_for_the_projections_and_times_out_clearly() {
    let Some(app) = spawn_app(Duration::from_millis(3000), HashMap::from([(0, 12)])).await else { return };
    let pos = Position { partition: 0, offset: 9 }.token();
    sqlx::query("INSERT INTO projection_offsets (projection, topic, partition, next_offset) VALUES ('tasks', $1, 0, 5), ('task_history', $1, 0, 5)")
        .bind(TOPIC)
        .execute(&app.pool)
        .await
        .unwrap();
    // The projector catches up while the request waits.
    let pool = app.pool.clone();
    let progress = app.progress.clone();
    let writer = tokio::spawn(async move {
        // Only once the tracker has seen the old offsets (so the request really has to wait).
        while !progress.is_applied(Position { partition: 0, offset: 4 }) {
            tokio::task::yield_now().await;
            progress.reload(&pool).await.unwrap();
        }
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("UPDATE projection_offsets SET next_offset = 10 WHERE topic = $1").bind(TOPIC).execute(&mut *tx).await.unwrap();
        for p in ["tasks", "task_history"] {
            let payload = json!({"topic": TOPIC, "projection": p, "offsets": [[0, 10]]}).to_string();
            sqlx::query("SELECT pg_notify('projection_progress', $1)").bind(payload).execute(&mut *tx).await.unwrap();
        }
        tx.commit().await.unwrap();
    });
    let (s, body) = app.post(Some("alice"), "{ stats { total } }", json!({}), Some(&pos)).await;
    writer.await.unwrap();
    assert_eq!((s, &body["data"]["stats"]["total"]), (200, &json!(0)), "{body}");
    // A position nobody reaches: a clear 503, not stale data.
    let never = Position { partition: 0, offset: 500 }.token();
    let (s, body) = app.post(Some("alice"), "{ stats { total } }", json!({}), Some(&never)).await;
    assert_eq!((s, body["errors"][0]["extensions"]["code"].as_str()), (503, Some("CONSISTENCY_TIMEOUT")));
    assert!(body.get("data").is_none());
    // projections: stored offsets against the (fake) high watermark.
    let d = app.data("alice", "{ projections { name state lag partitions { partition offset highWatermark } } }", json!({})).await;
    assert_eq!(
        d["projections"],
        json!([
            {"name": "tasks", "state": "live", "lag": 2, "partitions": [{"partition": 0, "offset": 10, "highWatermark": 12}]},
            {"name": "task_history", "state": "live", "lag": 2, "partitions": [{"partition": 0, "offset": 10, "highWatermark": 12}]}
        ])
    );
}
