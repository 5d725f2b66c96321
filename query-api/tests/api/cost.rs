//! The cost model: list sizes count (`first` x the cost of a row, nested lists multiplied), and a
//! document has at most so many aliases and root fields; a refused query is a GraphQL error with
//! code QUERY_TOO_COMPLEX naming the cost and the limit.

use std::collections::HashMap;

use serde_json::json;

use query_api::Limits;

use crate::helpers::{spawn_app, spawn_app_with, FakeWatermarks};

#[tokio::test]
async fn fifty_aliases_of_a_full_page_are_refused_under_the_default_limits() {
    let app = spawn_app().await;
    let wide: String = (0..50).map(|i| format!("t{i}: tasks(first: 200) {{ edges {{ node {{ id }} }} }} ")).collect();
    let a = app.post("alice", &format!("{{ {wide} }}"), json!({}), None).await;
    assert_eq!((a.status, a.code()), (200, Some("QUERY_TOO_COMPLEX")), "{}", a.body);
    assert!(a.message().contains("too complex") && a.message().contains("the limit is"), "{}", a.body);
    assert!(a.body.get("data").is_none_or(serde_json::Value::is_null), "{}", a.body);
    // The same page once is fine, and so is the benchmark's list query.
    app.data("alice", "{ tasks(first: 200) { edges { cursor node { id title description status priority dueAt timezone recurrence remindAt tags version createdAt updatedAt completedAt recurrenceParentId occurrence } } pageInfo { hasNextPage endCursor } } }", json!({})).await;
}

#[tokio::test]
async fn the_cost_counts_rows_and_nested_lists_multiply() {
    let limits = Limits { max_complexity: 500, ..Limits::default() };
    let app = spawn_app_with(limits, FakeWatermarks(Some(HashMap::new()))).await;
    // tasks: 200 rows x (edges 1 + node 1 + id 1 + title 1) = 800, also when `first` is a variable.
    let q = "query($f: Int) { tasks(first: $f) { edges { node { id title } } } }";
    let a = app.post("alice", q, json!({"f": 200}), None).await;
    assert_eq!(a.code(), Some("QUERY_TOO_COMPLEX"), "{}", a.body);
    assert!(a.message().contains("its cost is 800, the limit is 500"), "{}", a.body);
    app.data("alice", q, json!({"f": 100})).await;
    // Without `first`, the default page (50 rows): 200.
    app.data("alice", "{ tasks { edges { node { id title } } } }", json!({})).await;
    // Notifications: 10 x (edges 1 + node 1 + id 1 + webhookDeliveries 2 x (id 1 + attempts 5 x 1)) = 150.
    let limits = Limits { max_complexity: 149, ..Limits::default() };
    let app = spawn_app_with(limits, FakeWatermarks(Some(HashMap::new()))).await;
    let a = app.post("alice", "{ notifications(first: 10) { edges { node { id webhookDeliveries { id attempts { attempt } } } } } }", json!({}), None).await;
    assert_eq!(a.code(), Some("QUERY_TOO_COMPLEX"), "{}", a.body);
    assert!(a.message().contains("its cost is 150, the limit is 149"), "{}", a.body);
}

#[tokio::test]
async fn aliases_and_root_fields_are_limited() {
    let limits = Limits { max_aliases: 3, max_root_fields: 4, ..Limits::default() };
    let app = spawn_app_with(limits, FakeWatermarks(Some(HashMap::new()))).await;
    let a = app.post("alice", "{ stats { a: total b: open c: completed } }", json!({}), None).await;
    assert!(a.body.get("errors").is_none(), "{}", a.body);
    let a = app.post("alice", "{ stats { a: total b: open c: completed d: overdue } }", json!({}), None).await;
    assert_eq!(a.code(), Some("QUERY_TOO_COMPLEX"), "{}", a.body);
    assert!(a.message().contains("4 aliases, the limit is 3"), "{}", a.body);
    // Root fields, counted through fragments, without a single alias.
    let a = app.post("alice", "{ stats { total } ...F } fragment F on Query { stats { total } stats { open } stats { overdue } }", json!({}), None).await;
    assert!(a.body.get("errors").is_none(), "four root fields are allowed: {}", a.body);
    let a = app
        .post("alice", "{ stats { total } ...F } fragment F on Query { stats { total } stats { open } stats { overdue } stats { completed } }", json!({}), None)
        .await;
    assert_eq!(a.code(), Some("QUERY_TOO_COMPLEX"), "{}", a.body);
    assert!(a.message().contains("an operation selects 5 root fields, the limit is 4"), "{}", a.body);
}
