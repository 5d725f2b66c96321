//! The query API against a real PostgreSQL (a database of its own per test), read models seeded
//! directly. Needs `DATABASE_URL` (a superuser URL); without it every test says so and returns.

mod helpers;

use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Duration as Span, TimeZone, Utc};
use serde_json::{json, Value};
use uuid::Uuid;

use helpers::{spawn_app, spawn_app_with, FakeWatermarks, SeedTask, TestApp, TOPIC};
use platform::position::Position;
use query_api::Limits;

const PAGE: &str = "query($order: TaskOrder, $first: Int, $after: String, $filter: TaskFilter) {
  tasks(orderBy: $order, first: $first, after: $after, filter: $filter) {
    edges { cursor node { id } }
    pageInfo { hasNextPage hasPreviousPage startCursor endCursor } } }";

fn base() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
}

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
    let Some(app) = spawn_app().await else { return };
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
    let Some(app) = spawn_app().await else { return };
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
    let Some(app) = spawn_app().await else { return };
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

#[tokio::test]
async fn stats_count_only_the_callers_tasks() {
    let Some(app) = spawn_app().await else { return };
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
    let Some(app) = spawn_app().await else { return };
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

#[tokio::test]
async fn history_pages_by_version_and_outlives_the_task() {
    let Some(app) = spawn_app().await else { return };
    let id = app.seed(&SeedTask::new("alice", "short-lived", base())).await;
    let types = ["task.created", "task.updated", "task.completed", "task.reopened", "task.deleted"];
    // Inserted out of order: the answer is by version all the same.
    for v in [3, 1, 5, 2, 4] {
        app.seed_event(id, "alice", v, types[v as usize - 1], json!({"v": v, "nested": {"ok": true}})).await;
    }
    sqlx::query("DELETE FROM tasks WHERE id = $1").bind(id).execute(&app.pool).await.unwrap();
    let q = "query($id: ID!, $after: String) { task(id: $id) { id }
             taskHistory(taskId: $id, first: 2, after: $after) {
               edges { cursor node { eventId type version occurredAt data correlationId } }
               pageInfo { hasNextPage hasPreviousPage endCursor } } }";
    let (mut after, mut seen) = (Value::Null, Vec::new());
    loop {
        let d = app.data("alice", q, json!({"id": id, "after": after})).await;
        assert!(d["task"].is_null(), "a deleted task is gone");
        let h = &d["taskHistory"];
        for e in h["edges"].as_array().unwrap() {
            let n = &e["node"];
            assert_eq!(n["data"], json!({"v": n["version"], "nested": {"ok": true}}));
            assert_eq!(n["correlationId"], "corr-1");
            assert!(n["eventId"].as_str().unwrap().parse::<Uuid>().is_ok() && n["occurredAt"].is_string());
            seen.push((n["version"].as_i64().unwrap(), n["type"].as_str().unwrap().to_owned()));
        }
        assert_eq!(h["pageInfo"]["hasPreviousPage"], !after.is_null());
        if !h["pageInfo"]["hasNextPage"].as_bool().unwrap() {
            break;
        }
        after = h["pageInfo"]["endCursor"].clone();
    }
    let want: Vec<(i64, String)> = types.iter().enumerate().map(|(i, t)| (i as i64 + 1, (*t).to_owned())).collect();
    assert_eq!(seen, want);
    // Still nobody else's.
    let bob = app.data("bob", q, json!({"id": id, "after": null})).await;
    assert_eq!(bob["taskHistory"]["edges"], json!([]));
}

#[tokio::test]
async fn queries_need_a_valid_bearer_token_but_graphiql_does_not() {
    let Some(app) = spawn_app().await else { return };
    let body = json!({"query": "{ stats { total } }"}).to_string();
    let expired = format!("Bearer {}", app.auth.issue("alice", -3600));
    let foreign = format!("Bearer {}", platform::auth::JwtAuth::new(&platform::secret::Secret::new("another secret")).issue("alice", 60));
    let token = app.auth.issue("alice", 60);
    for (authorization, why) in
        [(None, "missing"), (Some("Bearer "), "empty"), (Some(token.as_str()), "no Bearer"), (Some(&*expired), "expired"), (Some(&*foreign), "wrong key")]
    {
        let a = app.post_raw(authorization, None, body.clone()).await;
        assert_eq!((a.status, a.code()), (401, Some("UNAUTHENTICATED")), "{why}: {}", a.body);
        assert!(!a.message().is_empty() && a.body.get("data").is_none(), "{why}: {}", a.body);
        assert_eq!(a.headers["www-authenticate"], "Bearer");
    }
    assert_eq!(app.post_raw(Some(&app.bearer("alice")), None, body).await.status, 200);
    let page = app.get("/graphql").await;
    assert_eq!(page.status, 200);
    assert!(page.headers["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(page.body.as_str().unwrap().contains("/graphql/ws"), "GraphiQL with the subscription endpoint");
}

#[tokio::test]
async fn bad_input_is_a_clear_error_never_a_500() {
    let limits = Limits { max_depth: 6, max_complexity: 40, ..Limits::default() };
    let Some(app) = spawn_app_with(limits, FakeWatermarks(Some(HashMap::new()))).await else { return };
    for first in [-1, 201] {
        let a = app.post("alice", "query($f: Int) { tasks(first: $f) { edges { cursor } } }", json!({"f": first}), None).await;
        assert_eq!(a.status, 200);
        assert!(a.message().contains("`first` must be between 0 and 200"), "{}", a.body);
        assert_eq!(a.code(), Some("BAD_USER_INPUT"));
        let a = app.post("alice", "query($f: Int) { taskHistory(taskId: \"x\", first: $f) { edges { cursor } } }", json!({"f": first}), None).await;
        assert!(a.message().contains("`first` must be between 0 and 200"), "{}", a.body);
    }
    // A cursor must be one of ours, for the same order.
    app.seed(&SeedTask::new("alice", "a", base())).await;
    app.seed(&SeedTask::new("alice", "b", base())).await;
    let d = app.data("alice", "{ tasks(first: 1, orderBy: CREATED_AT_ASC) { pageInfo { endCursor } } }", json!({})).await;
    let cursor = d["tasks"]["pageInfo"]["endCursor"].as_str().unwrap().to_owned();
    for (order, after) in [("CREATED_AT_ASC", "bogus"), ("DUE_AT_ASC", cursor.as_str())] {
        let q = format!("query($a: String) {{ tasks(orderBy: {order}, after: $a) {{ edges {{ cursor }} }} }}");
        let a = app.post("alice", &q, json!({"a": after}), None).await;
        assert_eq!((a.status, a.code()), (200, Some("BAD_USER_INPUT")), "{}", a.body);
        assert!(a.message().contains("invalid cursor"), "{}", a.body);
    }
    let a = app.post("alice", "{ taskHistory(taskId: \"x\", after: \"bogus\") { edges { cursor } } }", json!({}), None).await;
    assert!(a.message().contains("invalid cursor"), "{}", a.body);
    // Depth and complexity limits (depth 8 > 6, here reached through introspection next to data).
    let deep = "{ stats { total } __schema { types { fields { type { ofType { ofType { name } } } } } } }";
    let a = app.post("alice", deep, json!({}), None).await;
    assert!(a.status == 200 && a.message().contains("nested too deep"), "{}", a.body);
    let wide: String = (0..41).map(|i| format!("s{i}: stats {{ total }} ")).collect();
    let a = app.post("alice", &format!("{{ {wide} }}"), json!({}), None).await;
    assert!(a.status == 200 && a.message().contains("too complex"), "{}", a.body);
    let a = app.post("alice", "{ nope }", json!({}), None).await;
    assert!(a.status == 200 && a.body["errors"].is_array() && a.body.get("data").is_none_or(Value::is_null), "{}", a.body);
    // Not a GraphQL request, or too large: refused at the door with our error shape.
    let a = app.post_raw(Some(&app.bearer("alice")), None, "{not json").await;
    assert_eq!((a.status, a.code()), (400, Some("BAD_REQUEST")), "{}", a.body);
    let huge = json!({"query": format!("{{ stats {{ total }} }} #{}", "x".repeat(300 * 1024))}).to_string();
    let a = app.post_raw(Some(&app.bearer("alice")), None, huge).await;
    assert_eq!(a.status, 413, "{}", a.body);
}

/// The projector's commit as the test plays it: a task row, the offsets and/or the notifications
/// (one per projection), in one transaction.
#[derive(Clone)]
struct Commit {
    task: Option<SeedTask>,
    next_offset: i64,
    update_table: bool,
    notify: bool,
}

impl Commit {
    async fn run(self, pool: sqlx::PgPool) {
        let mut tx = pool.begin().await.unwrap();
        if let Some(t) = &self.task {
            sqlx::query(
                "INSERT INTO tasks (id, user_id, title, status, priority, timezone, version, created_at, updated_at)
                 VALUES ($1, $2, $3, 'open', 1, 'UTC', 1, now(), now())",
            )
            .bind(t.id)
            .bind(t.user)
            .bind(&t.title)
            .execute(&mut *tx)
            .await
            .unwrap();
        }
        if self.update_table {
            sqlx::query("UPDATE projection_offsets SET next_offset = $2 WHERE topic = $1 AND partition = 0")
                .bind(TOPIC)
                .bind(self.next_offset)
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        if self.notify {
            for p in platform::projections::PROJECTIONS {
                let payload = json!({"topic": TOPIC, "projection": p, "offsets": [[0, self.next_offset]]}).to_string();
                sqlx::query("SELECT pg_notify('projection_progress', $1)").bind(payload).execute(&mut *tx).await.unwrap();
            }
        }
        tx.commit().await.unwrap();
    }
}

/// Runs `commit` in the background as soon as a request is waiting for a position (so that the
/// request really has to wait for it).
fn commit_once_waiting(app: &TestApp, commit: Commit) -> tokio::task::JoinHandle<()> {
    let (progress, pool) = (app.progress.clone(), app.pool.clone());
    tokio::spawn(async move {
        tokio::time::timeout(Duration::from_secs(10), async {
            while progress.waiting() == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("a request starts waiting");
        commit.run(pool).await;
    })
}

const STATS: &str = "{ stats { total } }";

/// Both read projections at next offset 5 on partition 0, as the tracker knows.
async fn at_offset_5(app: &TestApp) {
    for p in ["tasks", "task_history"] {
        app.set_offset(p, 0, 5).await;
    }
    app.progress.reload(&app.pool).await.unwrap();
    assert!(app.progress.is_applied(Position { partition: 0, offset: 4 }));
}

#[tokio::test]
async fn a_consistency_token_waits_for_the_projectors_commit_and_sees_its_rows() {
    let Some(app) = spawn_app().await else { return };
    at_offset_5(&app).await;
    // An applied position answers at once.
    let a = app.post("alice", STATS, json!({}), Some(&Position { partition: 0, offset: 4 }.token())).await;
    assert_eq!((a.status, &a.body["data"]["stats"]["total"]), (200, &json!(0)), "{}", a.body);
    // The command's event is at offset 9; the projector commits it (and the task) while we wait.
    let task = SeedTask::new("alice", "written by the command", base());
    let commit = Commit { task: Some(task), next_offset: 10, update_table: true, notify: true };
    let writer = commit_once_waiting(&app, commit);
    let a = app.post("alice", STATS, json!({}), Some(&Position { partition: 0, offset: 9 }.token())).await;
    writer.await.unwrap();
    assert_eq!((a.status, &a.body["data"]["stats"]["total"]), (200, &json!(1)), "the answer includes the write: {}", a.body);
}

#[tokio::test]
async fn a_notification_alone_wakes_the_waiting_request() {
    let Some(app) = spawn_app().await else { return };
    at_offset_5(&app).await;
    // The table is never updated, so only the LISTEN path can let this request through.
    let commit = Commit { task: Some(SeedTask::new("alice", "t", base())), next_offset: 10, update_table: false, notify: true };
    let writer = commit_once_waiting(&app, commit);
    let a = app.post("alice", STATS, json!({}), Some(&Position { partition: 0, offset: 9 }.token())).await;
    writer.await.unwrap();
    assert_eq!((a.status, &a.body["data"]["stats"]["total"]), (200, &json!(1)), "{}", a.body);
}

#[tokio::test]
async fn a_lost_notification_only_delays_the_answer() {
    let Some(app) = spawn_app().await else { return };
    at_offset_5(&app).await;
    // No notification at all: the periodic re-read of projection_offsets finds the progress.
    let commit = Commit { task: Some(SeedTask::new("alice", "t", base())), next_offset: 10, update_table: true, notify: false };
    let writer = commit_once_waiting(&app, commit);
    let a = app.post("alice", STATS, json!({}), Some(&Position { partition: 0, offset: 9 }.token())).await;
    writer.await.unwrap();
    assert_eq!((a.status, &a.body["data"]["stats"]["total"]), (200, &json!(1)), "{}", a.body);
}

#[tokio::test]
async fn a_position_never_reached_is_a_clear_503_and_never_stale_data() {
    let limits = Limits { consistency_wait: Duration::from_millis(300), ..Limits::default() };
    let Some(app) = spawn_app_with(limits, FakeWatermarks(Some(HashMap::new()))).await else { return };
    at_offset_5(&app).await;
    // Only one of the two projections is past the position: still not applied.
    app.set_offset("tasks", 0, 100).await;
    app.progress.reload(&app.pool).await.unwrap();
    for position in [Position { partition: 0, offset: 9 }, Position { partition: 0, offset: 500 }, Position { partition: 7, offset: 0 }] {
        let a = app.post("alice", STATS, json!({}), Some(&position.token())).await;
        assert_eq!((a.status, a.code()), (503, Some("CONSISTENCY_TIMEOUT")), "{position:?}: {}", a.body);
        assert!(a.message().contains("have not yet reached"), "{}", a.body);
        assert!(a.body.get("data").is_none(), "no data at all: {}", a.body);
        assert_eq!(a.headers["retry-after"], "1");
    }
    for bad in ["garbage", "", "djEuMC4x="] {
        let a = app.post("alice", STATS, json!({}), Some(bad)).await;
        assert_eq!((a.status, a.code()), (400, Some("BAD_CONSISTENCY_TOKEN")), "{bad:?}: {}", a.body);
    }
}

/// What GraphiQL sends to learn the schema (graphql-js `getIntrospectionQuery`): depth 13.
const GRAPHIQL_INTROSPECTION: &str = r#"query IntrospectionQuery {
  __schema { queryType { name } mutationType { name } subscriptionType { name }
    types { ...FullType } directives { name description locations args { ...InputValue } } } }
fragment FullType on __Type { kind name description
  fields(includeDeprecated: true) { name description args { ...InputValue } type { ...TypeRef } isDeprecated deprecationReason }
  inputFields { ...InputValue } interfaces { ...TypeRef }
  enumValues(includeDeprecated: true) { name description isDeprecated deprecationReason } possibleTypes { ...TypeRef } }
fragment InputValue on __InputValue { name description type { ...TypeRef } defaultValue }
fragment TypeRef on __Type { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name
  ofType { kind name ofType { kind name ofType { kind name } } } } } } } }"#;

#[tokio::test]
async fn graphiql_can_introspect_the_schema_under_the_default_limits() {
    let Some(app) = spawn_app().await else { return };
    let d = app.data("alice", GRAPHIQL_INTROSPECTION, json!({})).await;
    let types = d["__schema"]["types"].as_array().unwrap();
    for name in ["Task", "TaskConnection", "TaskEvent", "TaskStats", "ProjectionStatus", "DateTime", "JSON", "TaskOrder"] {
        assert!(types.iter().any(|t| t["name"] == name), "{name}");
    }
    // Introspection alone still has a limit: depth 16 (`__type`, 14 x `ofType`, `name`), not 17.
    let nest = |n: usize| format!("{{ __type(name: \"Task\") {{ {}name{} }} }}", "ofType { ".repeat(n), " }".repeat(n));
    let a = app.post("alice", &nest(14), json!({}), None).await;
    assert!(a.body.get("errors").is_none(), "{}", a.body);
    let a = app.post("alice", &nest(15), json!({}), None).await;
    assert!(a.message().contains("nested too deep"), "{}", a.body);
}

const PROJECTIONS: &str = "{ projections { name state lag partitions { partition offset highWatermark } } }";

#[tokio::test]
async fn projections_report_stored_offsets_against_the_end_of_the_log() {
    let Some(app) = spawn_app_with(Limits::default(), FakeWatermarks(Some(HashMap::from([(0, 12), (1, 4)])))).await else { return };
    // Before the projector ever ran: every projection, live, nothing to report.
    let d = app.data("alice", PROJECTIONS, json!({})).await;
    let names: Vec<&str> = d["projections"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, platform::projections::PROJECTIONS);
    for p in d["projections"].as_array().unwrap() {
        assert_eq!((&p["state"], &p["lag"], &p["partitions"]), (&json!("live"), &json!(0), &json!([])));
    }
    app.set_offset("tasks", 0, 10).await;
    app.set_offset("tasks", 1, 4).await;
    app.set_offset("task_history", 0, 7).await;
    let d = app.data("alice", PROJECTIONS, json!({})).await;
    assert_eq!(
        d["projections"][0],
        json!({"name": "tasks", "state": "live", "lag": 1, "partitions": [
            {"partition": 0, "offset": 10, "highWatermark": 12}, {"partition": 1, "offset": 4, "highWatermark": 4}]})
    );
    assert_eq!(
        d["projections"][1],
        json!({"name": "task_history", "state": "live", "lag": 4, "partitions": [{"partition": 0, "offset": 7, "highWatermark": 12}]})
    );
}

#[tokio::test]
async fn projections_still_answer_when_kafka_does_not() {
    let Some(app) = spawn_app_with(Limits::default(), FakeWatermarks(None)).await else { return };
    app.set_offset("tasks", 3, 10).await;
    let d = app.data("alice", PROJECTIONS, json!({})).await;
    assert_eq!(
        d["projections"][0],
        json!({"name": "tasks", "state": "live", "lag": 0, "partitions": [{"partition": 3, "offset": 10, "highWatermark": 10}]})
    );
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let Some(app) = spawn_app().await else { return };
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
