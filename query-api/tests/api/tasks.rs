//! `tasks`, `task` and `stats`: every order and filter pages through the right tasks, a task is
//! served as stored, and nobody sees another user's tasks.

use std::cmp::Reverse;
use std::collections::HashSet;

use chrono::{Duration as Span, Utc};
use serde_json::{json, Value};
use uuid::Uuid;

use domain::UserId;
use platform::readmodel::TaskRow;
use query_api::cursor::Order;
use query_api::store::{self, TaskFilterSql};

use crate::helpers::{base, spawn_app, SeedTask, TestApp};

const PAGE: &str = "query($order: TaskOrder, $first: Int, $after: String, $filter: TaskFilter) {
  tasks(orderBy: $order, first: $first, after: $after, filter: $filter) {
    edges { cursor node { id } }
    pageInfo { hasNextPage hasPreviousPage startCursor endCursor } } }";

/// Alice's task `i` of a varied set: every 5th undated, shared due dates, shared creation times,
/// all four priorities, both statuses, two tag sets.
fn varied(i: usize) -> SeedTask {
    SeedTask {
        title: format!("Task {i:03}"),
        description: i.is_multiple_of(4).then(|| format!("details of {i}: buy MILK")),
        status: if i.is_multiple_of(3) { "completed" } else { "open" },
        priority: (i % 4) as i16,
        due_at: (!i.is_multiple_of(5)).then(|| base() + Span::hours((i % 17) as i64)),
        tags: if i.is_multiple_of(2) { vec!["even".into()] } else { vec!["odd".into(), "x".into()] },
        ..SeedTask::new("alice", "", base() + Span::minutes((i / 3) as i64))
    }
}

/// Pages through `tasks` with pages of `first`, checking the page info on the way; the ids in order.
async fn all_pages(app: &TestApp, order: &str, filter: Value, first: i64) -> Vec<Uuid> {
    let mut after: Option<String> = None;
    let mut out = Vec::new();
    for page in 0.. {
        let d = app.data("alice", PAGE, json!({"order": order, "first": first, "after": after, "filter": filter})).await;
        let conn = &d["tasks"];
        let edges = conn["edges"].as_array().unwrap();
        assert!(edges.len() as i64 <= first);
        out.extend(edges.iter().map(|e| e["node"]["id"].as_str().unwrap().parse::<Uuid>().unwrap()));
        let info = &conn["pageInfo"];
        assert_eq!(info["hasPreviousPage"], page > 0, "{order}");
        assert_eq!(info["startCursor"], edges.first().map_or(Value::Null, |e| e["cursor"].clone()));
        assert_eq!(info["endCursor"], edges.last().map_or(Value::Null, |e| e["cursor"].clone()));
        if !info["hasNextPage"].as_bool().unwrap() {
            break;
        }
        assert_eq!(edges.len() as i64, first, "only the last page is short");
        after = info["endCursor"].as_str().map(str::to_owned);
        assert!(page < 1000, "pagination does not end");
    }
    out
}

/// `seeds` in `order`, as the API must return them.
fn expected(seeds: &[SeedTask], order: &str) -> Vec<Uuid> {
    let mut s: Vec<&SeedTask> = seeds.iter().collect();
    match order {
        "DUE_AT_ASC" => s.sort_by_key(|t| (t.due_at.is_none(), t.due_at, t.id)),
        "DUE_AT_DESC" => s.sort_by_key(|t| (t.due_at.is_none(), Reverse(t.due_at), Reverse(t.id))),
        "CREATED_AT_ASC" => s.sort_by_key(|t| (t.created_at, t.id)),
        "CREATED_AT_DESC" => s.sort_by_key(|t| Reverse((t.created_at, t.id))),
        "PRIORITY_DESC" => s.sort_by_key(|t| (Reverse(t.priority), t.due_at.is_none(), t.due_at, t.id)),
        _ => unreachable!(),
    }
    s.into_iter().map(|t| t.id).collect()
}

#[tokio::test]
async fn every_order_pages_through_each_task_exactly_once_and_in_order() {
    let app = spawn_app().await;
    let seeds: Vec<SeedTask> = (0..120).map(varied).collect();
    for s in &seeds {
        app.seed(s).await;
    }
    // Someone else's tasks, interleaved in every order, must never show up.
    for i in 0..10 {
        app.seed(&SeedTask { user: "bob", ..varied(i) }).await;
    }
    for order in ["DUE_AT_ASC", "DUE_AT_DESC", "CREATED_AT_ASC", "CREATED_AT_DESC", "PRIORITY_DESC"] {
        let got = all_pages(&app, order, Value::Null, 7).await;
        assert_eq!(got.iter().collect::<HashSet<_>>().len(), 120, "{order}: each task once");
        assert_eq!(got, expected(&seeds, order), "{order}: in order");
        // One big page agrees with the small ones.
        assert_eq!(all_pages(&app, order, Value::Null, 200).await, got, "{order}");
    }
    // The default order is DUE_AT_ASC and the default page 50.
    let d = app.data("alice", "{ tasks { edges { node { id } } pageInfo { hasNextPage } } }", json!({})).await;
    let ids: Vec<Uuid> = d["tasks"]["edges"].as_array().unwrap().iter().map(|e| e["node"]["id"].as_str().unwrap().parse().unwrap()).collect();
    assert_eq!(ids, expected(&seeds, "DUE_AT_ASC")[..50]);
    // first: 0 is an empty page that still knows there is more.
    let d = app.data("alice", "{ tasks(first: 0) { edges { cursor } pageInfo { hasNextPage endCursor } } }", json!({})).await;
    assert_eq!(d["tasks"], json!({"edges": [], "pageInfo": {"hasNextPage": true, "endCursor": null}}));
}

#[tokio::test]
async fn filters_select_exactly_the_matching_tasks() {
    let app = spawn_app().await;
    let mut seeds: Vec<SeedTask> = (0..40).map(varied).collect();
    seeds.push(SeedTask { title: "50% off_sale".into(), ..SeedTask::new("alice", "", base()) });
    seeds.push(SeedTask { title: "5000 offers".into(), description: Some("50 percent".into()), ..SeedTask::new("alice", "", base()) });
    for s in &seeds {
        app.seed(s).await;
    }
    app.seed(&SeedTask { user: "bob", ..varied(1) }).await;
    let at5 = base() + Span::hours(5);
    type Matches = Box<dyn Fn(&SeedTask) -> bool>;
    let cases: Vec<(Value, Matches)> = vec![
        (json!({"status": "OPEN"}), Box::new(|s| s.status == "open")),
        (json!({"status": "COMPLETED"}), Box::new(|s| s.status == "completed")),
        (json!({"priority": "URGENT"}), Box::new(|s| s.priority == 3)),
        (json!({"priority": "LOW"}), Box::new(|s| s.priority == 0)),
        (json!({"tag": "odd"}), Box::new(|s| s.tags.iter().any(|t| t == "odd"))),
        (json!({"tag": "nope"}), Box::new(|_| false)),
        // Case-insensitive, in the title or the description.
        (json!({"search": "task 01"}), Box::new(|s| s.title.starts_with("Task 01"))),
        (json!({"search": "milk"}), Box::new(|s| s.description.as_deref().is_some_and(|d| d.contains("MILK")))),
        // LIKE wildcards are taken literally.
        (json!({"search": "50%"}), Box::new(|s| s.title == "50% off_sale")),
        (json!({"search": "f_s"}), Box::new(|s| s.title == "50% off_sale")),
        (json!({"search": "%"}), Box::new(|s| s.title.contains('%'))),
        (json!({"dueBefore": at5}), Box::new(move |s| s.due_at.is_some_and(|d| d < at5))),
        (json!({"dueAfter": at5}), Box::new(move |s| s.due_at.is_some_and(|d| d > at5))),
        (
            json!({"dueAfter": at5, "status": "OPEN", "tag": "even", "priority": "HIGH"}),
            Box::new(move |s| s.due_at.is_some_and(|d| d > at5) && s.status == "open" && s.tags.iter().any(|t| t == "even") && s.priority == 2),
        ),
    ];
    for (filter, matches) in cases {
        let want: Vec<SeedTask> = seeds.iter().filter(|s| matches(s)).cloned().collect();
        for order in ["CREATED_AT_ASC", "DUE_AT_DESC", "PRIORITY_DESC"] {
            assert_eq!(all_pages(&app, order, filter.clone(), 3).await, expected(&want, order), "{filter} {order}");
        }
    }
}

#[tokio::test]
async fn a_task_is_served_with_every_field_as_stored() {
    let app = spawn_app().await;
    let (id, parent) = (Uuid::new_v4(), Uuid::new_v4());
    sqlx::query(
        "INSERT INTO tasks (id, user_id, title, description, status, priority, due_at, timezone, recurrence, remind_before,
                            remind_at, tags, version, created_at, updated_at, completed_at, recurrence_parent_id, occurrence)
         VALUES ($1, 'alice', 'Water plants', 'the ferns too', 'completed', 2, '2026-03-01T09:00:00Z', 'Europe/Paris',
                 'FREQ=WEEKLY;BYDAY=MO', 'PT30M', '2026-03-01T08:30:00Z', ARRAY['home','green'], 4,
                 '2026-02-01T10:00:00Z', '2026-02-03T10:00:00Z', '2026-02-03T10:00:00Z', $2, 3)",
    )
    .bind(id)
    .bind(parent)
    .execute(&app.pool)
    .await
    .unwrap();
    let q = "query($id: ID!) { task(id: $id) { id title description status priority dueAt timezone recurrence remindAt tags
             version createdAt updatedAt completedAt recurrenceParentId occurrence } }";
    let d = app.data("alice", q, json!({"id": id})).await;
    assert_eq!(
        d["task"],
        json!({
            "id": id.to_string(), "title": "Water plants", "description": "the ferns too", "status": "COMPLETED",
            "priority": "HIGH", "dueAt": "2026-03-01T09:00:00+00:00", "timezone": "Europe/Paris",
            "recurrence": "FREQ=WEEKLY;BYDAY=MO", "remindAt": "2026-03-01T08:30:00+00:00", "tags": ["home", "green"],
            "version": 4, "createdAt": "2026-02-01T10:00:00+00:00", "updatedAt": "2026-02-03T10:00:00+00:00",
            "completedAt": "2026-02-03T10:00:00+00:00", "recurrenceParentId": parent.to_string(), "occurrence": 3
        })
    );
    // Unknown and malformed ids are simply not found.
    for missing in [Uuid::new_v4().to_string(), "not-a-uuid".to_owned()] {
        assert_eq!(app.data("alice", q, json!({"id": missing})).await, json!({"task": null}));
    }
}

/// The page and `task(id)` read rows by column position: every column comes back exactly as
/// sqlx's `FromRow` (by column name) reads it, for a row with every column set and one with none.
#[tokio::test]
async fn rows_read_by_position_are_the_rows_read_by_name() {
    let app = spawn_app().await;
    let (full, bare) = (Uuid::new_v4(), Uuid::new_v4());
    sqlx::query(
        "INSERT INTO tasks (id, user_id, title, description, status, priority, due_at, timezone, recurrence, remind_before,
                            remind_at, tags, version, created_at, updated_at, completed_at, recurrence_parent_id, occurrence, reminded_for)
         VALUES ($1, 'alice', 'Water plants', 'the ferns too', 'completed', 2, '2026-03-01T09:00:00Z', 'Europe/Paris',
                 'FREQ=WEEKLY;BYDAY=MO', 'PT30M', '2026-03-01T08:30:00Z', ARRAY['home','green'], 4,
                 '2026-02-01T10:00:00Z', '2026-02-03T10:00:00Z', '2026-02-03T10:00:00Z', $2, 3, '2026-03-01T08:30:00Z')",
    )
    .bind(full)
    .bind(Uuid::new_v4())
    .execute(&app.pool)
    .await
    .unwrap();
    app.seed(&SeedTask { id: bare, ..SeedTask::new("alice", "bare", base()) }).await;
    let by_name: Vec<TaskRow> =
        sqlx::query_as(&format!("SELECT {} FROM tasks ORDER BY due_at ASC NULLS LAST, id ASC", TaskRow::COLUMNS)).fetch_all(&app.pool).await.unwrap();
    assert_eq!(by_name.iter().map(|r| r.id).collect::<Vec<_>>(), [full, bare]);
    assert!(by_name[0].reminded_for.is_some() && by_name[0].recurrence_parent_id.is_some() && by_name[1].description.is_none());
    let user = UserId::parse("alice".to_owned()).unwrap();
    let page = store::tasks(&app.pool, &user, Order::DueAtAsc, &TaskFilterSql::default(), None, 10).await.unwrap();
    assert_eq!(page, by_name);
    for row in &by_name {
        assert_eq!(store::task(&app.pool, &user, row.id).await.unwrap().as_ref(), Some(row));
    }
}

#[tokio::test]
async fn stats_count_only_the_callers_tasks() {
    let app = spawn_app().await;
    let (past, future) = (Utc::now() - Span::days(1), Utc::now() + Span::days(1));
    for (status, due) in [("open", Some(past)), ("open", Some(future)), ("open", None), ("completed", Some(past))] {
        app.seed(&SeedTask { status, due_at: due, ..SeedTask::new("alice", "t", base()) }).await;
    }
    // A second completed task taking three hours: the mean is two hours.
    let slow = app.seed(&SeedTask { status: "completed", ..SeedTask::new("alice", "slow", base()) }).await;
    sqlx::query("UPDATE tasks SET completed_at = created_at + interval '3 hours' WHERE id = $1").bind(slow).execute(&app.pool).await.unwrap();
    app.seed(&SeedTask { user: "bob", status: "open", due_at: Some(past), ..SeedTask::new("bob", "b", base()) }).await;
    let q = "{ stats { total open completed overdue completionRate avgCompletionSeconds } }";
    assert_eq!(
        app.data("alice", q, json!({})).await["stats"],
        json!({"total": 5, "open": 3, "completed": 2, "overdue": 1, "completionRate": 0.4, "avgCompletionSeconds": 7200.0})
    );
    assert_eq!(
        app.data("carol", q, json!({})).await["stats"],
        json!({"total": 0, "open": 0, "completed": 0, "overdue": 0, "completionRate": 0.0, "avgCompletionSeconds": null})
    );
}

#[tokio::test]
async fn another_users_task_and_history_look_exactly_like_missing_ones() {
    let app = spawn_app().await;
    let id = app.seed(&SeedTask::new("alice", "private", base())).await;
    app.seed_event(id, "alice", 1, "task.created", json!({"title": "private"})).await;
    let q = "query($id: ID!) { task(id: $id) { title } tasks { edges { node { id } } }
             taskHistory(taskId: $id) { edges { node { type } } pageInfo { hasNextPage hasPreviousPage startCursor endCursor } } }";
    let bob = app.data("bob", q, json!({"id": id})).await;
    let nobody = app.data("bob", q, json!({"id": Uuid::new_v4()})).await;
    assert_eq!(bob, nobody);
    assert_eq!(
        bob,
        json!({"task": null, "tasks": {"edges": []}, "taskHistory": {"edges": [], "pageInfo":
            {"hasNextPage": false, "hasPreviousPage": false, "startCursor": null, "endCursor": null}}})
    );
    let alice = app.data("alice", q, json!({"id": id})).await;
    assert_eq!(alice["task"]["title"], "private");
    assert_eq!(alice["taskHistory"]["edges"], json!([{"node": {"type": "task.created"}}]));
}
