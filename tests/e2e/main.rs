//! End-to-end tests: the three real binaries against the real Kafka broker and PostgreSQL that
//! `./dev test` provisions. No sleeps stand in for waiting: every wait polls a condition.

mod bench_smoke;
mod catalogue;
mod export;
mod lifecycle;
mod live;
mod observability;
mod partitions;
mod privacy;
mod projector_group;
mod reactions;
mod secured;
mod startup;
mod updates;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use e2e::{kafka::PrivateBroker, Stack, StackOptions, Svc};
use reqwest::Method;
use serde_json::{json, Value};
use test_support::eventually;

const TASK: &str = "query($id: ID!) { task(id: $id) { id title description status priority dueAt timezone tags version completedAt remindAt } }";
const HISTORY: &str =
    "query($id: ID!) { taskHistory(taskId: $id, first: 200) { edges { node { type version data correlationId } } pageInfo { hasNextPage } } }";
const LIST: &str = "query { tasks(first: 200) { edges { node { id version } } } }";
const STATS: &str = "query { stats { total open completed overdue completionRate } }";

fn id_of(v: &Value) -> String {
    v["task_id"].as_str().expect("task_id").to_owned()
}
fn pos(v: &Value) -> String {
    v["position"].as_str().expect("position").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_lifecycle_is_visible_through_graphql_with_consistency_tokens() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let created = stack
        .create(
            "alice",
            json!({"title": "Write the report", "priority": "high", "tags": ["work", "q4"], "due_at": "2030-01-15T09:00:00Z",
                   "remind_before": "PT30M", "timezone": "Europe/Berlin", "description": "first draft"}),
        )
        .await?;
    assert_eq!(created["version"], 1);
    let id = id_of(&created);
    let data = stack.query("alice", TASK, json!({"id": id}), Some(&pos(&created))).await?;
    let t = &data["task"];
    assert_eq!(t["title"], "Write the report");
    assert_eq!(t["status"], "OPEN");
    assert_eq!(t["priority"], "HIGH");
    assert_eq!(t["version"], 1);
    assert_eq!(t["tags"], json!(["work", "q4"]));
    assert_eq!(t["timezone"], "Europe/Berlin");
    let remind_at = chrono::DateTime::parse_from_rfc3339(t["remindAt"].as_str().expect("remindAt")).expect("RFC 3339");
    assert_eq!(remind_at, chrono::DateTime::parse_from_rfc3339("2030-01-15T08:30:00Z").unwrap());

    let (s, _, updated) =
        stack.command("alice", Method::PATCH, &format!("/v1/tasks/{id}"), Some(json!({"title": "Write the final report", "description": null})), &[]).await?;
    assert_eq!((s, updated["version"].as_i64()), (200, Some(2)));
    let t = stack.query("alice", TASK, json!({"id": id}), Some(&pos(&updated))).await?["task"].clone();
    assert_eq!((t["title"].as_str(), t["description"].is_null(), t["version"].as_i64()), (Some("Write the final report"), true, Some(2)));

    let (s, _, completed) = stack.command("alice", Method::POST, &format!("/v1/tasks/{id}/complete"), None, &[]).await?;
    assert_eq!((s, completed["version"].as_i64()), (200, Some(3)));
    let t = stack.query("alice", TASK, json!({"id": id}), Some(&pos(&completed))).await?["task"].clone();
    assert_eq!(t["status"], "COMPLETED");
    assert!(t["completedAt"].is_string());
    let stats = stack.query("alice", STATS, json!({}), Some(&pos(&completed))).await?["stats"].clone();
    assert_eq!((stats["total"].as_i64(), stats["completed"].as_i64(), stats["completionRate"].as_f64()), (Some(1), Some(1), Some(1.0)));

    let (s, _, reopened) = stack.command("alice", Method::POST, &format!("/v1/tasks/{id}/reopen"), None, &[]).await?;
    assert_eq!((s, reopened["version"].as_i64()), (200, Some(4)));
    let (s, _, deleted) = stack.command("alice", Method::DELETE, &format!("/v1/tasks/{id}"), None, &[]).await?;
    assert_eq!((s, deleted["version"].as_i64()), (200, Some(5)));
    let data = stack.query("alice", TASK, json!({"id": id}), Some(&pos(&deleted))).await?;
    assert!(data["task"].is_null(), "a deleted task disappears: {data}");
    let list = stack.query("alice", LIST, json!({}), Some(&pos(&deleted))).await?;
    assert_eq!(list["tasks"]["edges"], json!([]));
    let history = stack.query("alice", HISTORY, json!({"id": id}), Some(&pos(&deleted))).await?;
    let types: Vec<(String, i64)> = history["taskHistory"]["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["node"]["type"].as_str().unwrap().to_owned(), e["node"]["version"].as_i64().unwrap()))
        .collect();
    assert_eq!(
        types,
        vec![("task.created".into(), 1), ("task.updated".into(), 2), ("task.completed".into(), 3), ("task.reopened".into(), 4), ("task.deleted".into(), 5)]
    );
    // Commands on the deleted task conflict.
    let (s, _, _) = stack.command("alice", Method::POST, &format!("/v1/tasks/{id}/complete"), None, &[]).await?;
    assert_eq!(s, 409);
    stack.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_are_isolated() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let a = stack.create("alice", json!({"title": "alice's secret"})).await?;
    let id = id_of(&a);
    for (method, path, body) in [
        (Method::PATCH, format!("/v1/tasks/{id}"), Some(json!({"title": "mine now"}))),
        (Method::POST, format!("/v1/tasks/{id}/complete"), None),
        (Method::DELETE, format!("/v1/tasks/{id}"), None),
    ] {
        let (s, _, body) = stack.command("bob", method, &path, body, &[]).await?;
        assert_eq!(s, 404, "bob must not see alice's task: {body}");
    }
    let missing = uuid::Uuid::new_v4();
    let (_, _, other) = stack.command("bob", Method::POST, &format!("/v1/tasks/{missing}/complete"), None, &[]).await?;
    let (_, _, foreign) = stack.command("bob", Method::POST, &format!("/v1/tasks/{id}/complete"), None, &[]).await?;
    assert_eq!(other, foreign, "another user's task is answered exactly like a missing one");
    assert!(stack.query("bob", TASK, json!({"id": id}), Some(&pos(&a))).await?["task"].is_null());
    assert_eq!(stack.query("bob", LIST, json!({}), Some(&pos(&a))).await?["tasks"]["edges"], json!([]));
    assert_eq!(stack.query("bob", HISTORY, json!({"id": id}), Some(&pos(&a))).await?["taskHistory"]["edges"], json!([]));
    assert_eq!(stack.query("bob", STATS, json!({}), Some(&pos(&a))).await?["stats"]["total"], 0);
    assert_eq!(stack.query("alice", TASK, json!({"id": id}), Some(&pos(&a))).await?["task"]["title"], "alice's secret");
    stack.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_retries_and_if_match() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let body = json!({"title": "pay rent"});
    let key = [("Idempotency-Key", "rent-2026-11")];
    let (s1, h1, first) = stack.command("alice", Method::POST, "/v1/tasks", Some(body.clone()), &key).await?;
    let (s2, h2, second) = stack.command("alice", Method::POST, "/v1/tasks", Some(body.clone()), &key).await?;
    assert_eq!((s1, s2), (201, 201));
    assert_eq!(first, second);
    assert!(h1.get("idempotent-replayed").is_none());
    assert_eq!(h2.get("idempotent-replayed").map(|v| v.to_str().unwrap()), Some("true"));
    let (s3, _, problem) = stack.command("alice", Method::POST, "/v1/tasks", Some(json!({"title": "other"})), &key).await?;
    assert_eq!(s3, 422, "{problem}");
    // The same key of another user is another key.
    let (s4, _, bobs) = stack.command("bob", Method::POST, "/v1/tasks", Some(body), &key).await?;
    assert_eq!(s4, 201);
    assert_ne!(id_of(&bobs), id_of(&first));
    let id = id_of(&first);
    let history = stack.query("alice", HISTORY, json!({"id": id}), Some(&pos(&first))).await?;
    assert_eq!(history["taskHistory"]["edges"].as_array().unwrap().len(), 1, "a retried create appends once");

    let path = format!("/v1/tasks/{id}");
    let (s, _, v2) = stack.command("alice", Method::PATCH, &path, Some(json!({"priority": "urgent"})), &[("If-Match", "\"1\"")]).await?;
    assert_eq!((s, v2["version"].as_i64()), (200, Some(2)));
    let (s, _, stale) = stack.command("alice", Method::PATCH, &path, Some(json!({"priority": "low"})), &[("If-Match", "\"1\"")]).await?;
    assert_eq!(s, 412, "{stale}");
    let t = stack.query("alice", TASK, json!({"id": id}), Some(&pos(&v2))).await?["task"].clone();
    assert_eq!((t["priority"].as_str(), t["version"].as_i64()), (Some("URGENT"), Some(2)));
    stack.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_updates_on_one_task_get_contiguous_versions() -> anyhow::Result<()> {
    let stack = Arc::new(Stack::start().await?);
    let created = stack.create("alice", json!({"title": "contended"})).await?;
    let id = id_of(&created);
    let mut handles = Vec::new();
    for i in 0..40 {
        let stack = stack.clone();
        let path = format!("/v1/tasks/{id}");
        handles.push(tokio::spawn(async move { stack.command("alice", Method::PATCH, &path, Some(json!({"title": format!("edit {i}")})), &[]).await }));
    }
    let mut answers = Vec::new();
    for h in handles {
        let (s, _, b) = h.await??;
        assert_eq!(s, 200, "{b}");
        answers.push(b);
    }
    let mut versions: Vec<i64> = answers.iter().map(|a| a["version"].as_i64().unwrap()).collect();
    versions.sort_unstable();
    assert_eq!(versions, (2..=41).collect::<Vec<i64>>());
    let last = answers.iter().find(|a| a["version"] == 41).unwrap();
    let history = stack.query("alice", HISTORY, json!({"id": id}), Some(&pos(last))).await?;
    let hv: Vec<i64> = history["taskHistory"]["edges"].as_array().unwrap().iter().map(|e| e["node"]["version"].as_i64().unwrap()).collect();
    assert_eq!(hv, (1..=41).collect::<Vec<i64>>());
    let t = stack.query("alice", TASK, json!({"id": id}), Some(&pos(last))).await?["task"].clone();
    assert_eq!(t["version"], 41);
    Arc::try_unwrap(stack).map_err(|_| anyhow::anyhow!("stack still shared"))?.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_contract_4xx_never_5xx() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let created = stack.create("alice", json!({"title": "target"})).await?;
    let id = id_of(&created);
    let url = |p: &str| stack.url(Svc::CommandApi, p);
    let token = stack.token("alice");
    let cases: Vec<(&str, reqwest::RequestBuilder, u16)> = vec![
        ("no token", stack.http.post(url("/v1/tasks")).json(&json!({"title": "x"})), 401),
        ("garbage token", stack.http.post(url("/v1/tasks")).bearer_auth("nope").json(&json!({"title": "x"})), 401),
        ("not json", stack.http.post(url("/v1/tasks")).bearer_auth(&token).body("title=x"), 415),
        ("malformed json", stack.http.post(url("/v1/tasks")).bearer_auth(&token).header("content-type", "application/json").body("{\"title\":"), 400),
        ("empty title", stack.http.post(url("/v1/tasks")).bearer_auth(&token).json(&json!({"title": ""})), 422),
        ("long title", stack.http.post(url("/v1/tasks")).bearer_auth(&token).json(&json!({"title": "x".repeat(201)})), 422),
        ("bad priority", stack.http.post(url("/v1/tasks")).bearer_auth(&token).json(&json!({"title": "x", "priority": "asap"})), 422),
        ("bad due", stack.http.post(url("/v1/tasks")).bearer_auth(&token).json(&json!({"title": "x", "due_at": "tomorrow"})), 422),
        ("bad zone", stack.http.post(url("/v1/tasks")).bearer_auth(&token).json(&json!({"title": "x", "timezone": "Moon/Base"})), 422),
        (
            "bad rrule",
            stack
                .http
                .post(url("/v1/tasks"))
                .bearer_auth(&token)
                .json(&json!({"title": "x", "due_at": "2030-01-01T00:00:00Z", "recurrence": "FREQ=SOMETIMES"})),
            422,
        ),
        ("remind without due", stack.http.post(url("/v1/tasks")).bearer_auth(&token).json(&json!({"title": "x", "remind_before": "PT5M"})), 422),
        (
            "too many tags",
            stack.http.post(url("/v1/tasks")).bearer_auth(&token).json(&json!({"title": "x", "tags": (0..21).map(|i| i.to_string()).collect::<Vec<_>>()})),
            422,
        ),
        ("unknown field", stack.http.post(url("/v1/tasks")).bearer_auth(&token).json(&json!({"title": "x", "colour": "red"})), 422),
        ("huge body", stack.http.post(url("/v1/tasks")).bearer_auth(&token).json(&json!({"title": "x", "description": "y".repeat(100_000)})), 413),
        ("bad if-match", stack.http.patch(url(&format!("/v1/tasks/{id}"))).bearer_auth(&token).header("If-Match", "soon").json(&json!({"title": "y"})), 400),
        ("empty patch", stack.http.patch(url(&format!("/v1/tasks/{id}"))).bearer_auth(&token).json(&json!({})), 422),
        ("unknown task", stack.http.post(url(&format!("/v1/tasks/{}/complete", uuid::Uuid::new_v4()))).bearer_auth(&token), 404),
        ("non-uuid id", stack.http.post(url("/v1/tasks/not-a-uuid/complete")).bearer_auth(&token), 404),
        ("reopen open task", stack.http.post(url(&format!("/v1/tasks/{id}/reopen"))).bearer_auth(&token), 409),
    ];
    for (name, req, want) in cases {
        let res = req.send().await?;
        let status = res.status().as_u16();
        let ctype = res.headers().get("content-type").map(|v| v.to_str().unwrap_or("").to_owned()).unwrap_or_default();
        let body: Value = res.json().await.unwrap_or(Value::Null);
        assert_eq!(status, want, "{name}: {body}");
        assert_eq!(ctype, "application/problem+json", "{name}");
        assert_eq!(body["status"], want, "{name}: {body}");
        assert!(body["type"].is_string() && body["title"].is_string() && body["detail"].is_string(), "{name}: {body}");
        if want == 422 {
            assert!(!body["errors"].as_array().map(|e| e.is_empty()).unwrap_or(true), "{name}: {body}");
        }
    }
    // GraphQL: no token, bad consistency token, invalid query.
    let res = stack.http.post(stack.url(Svc::QueryApi, "/graphql")).json(&json!({"query": "{ stats { total } }"})).send().await?;
    assert_eq!(res.status().as_u16(), 401);
    let (s, _) = stack.graphql("alice", STATS, json!({}), Some("not-a-token")).await?;
    assert_eq!(s, 400);
    let (s, body) = stack.graphql("alice", "{ nope }", json!({}), None).await?;
    assert!(s < 500 && body["errors"].is_array(), "{s} {body}");
    let (s, body) = stack.graphql("alice", "query { tasks(first: 100000) { edges { cursor } } }", json!({}), None).await?;
    assert!(s < 500 && body["errors"].is_array(), "{s} {body}");
    stack.cleanup().await
}

/// Counts of rows in the stack's read models.
async fn read_model_counts(stack: &Stack) -> anyhow::Result<(i64, i64)> {
    let mut db = stack.db().await?;
    let tasks: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks").fetch_one(&mut db).await?;
    let history: i64 = sqlx::query_scalar("SELECT count(*) FROM task_history").fetch_one(&mut db).await?;
    Ok((tasks, history))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projector_sigkill_mid_stream_loses_and_doubles_nothing() -> anyhow::Result<()> {
    let mut stack = Stack::start().await?;
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(id_of(&stack.create("alice", json!({"title": format!("task {i}")})).await?));
    }
    let accepted = Arc::new(AtomicUsize::new(0));
    let http = stack.http.clone();
    let base = stack.url(Svc::CommandApi, "");
    let token = stack.token("alice");
    // Writers: 1 200 updates spread over the tasks, 6 at a time.
    let writer = {
        let ids = ids.clone();
        let accepted = accepted.clone();
        tokio::spawn(async move {
            let versions: Arc<tokio::sync::Mutex<HashMap<String, i64>>> = Arc::default();
            let mut tasks = Vec::new();
            for w in 0..6 {
                let (ids, http, base, token, accepted, versions) = (ids.clone(), http.clone(), base.clone(), token.clone(), accepted.clone(), versions.clone());
                tasks.push(tokio::spawn(async move {
                    for n in 0..200 {
                        let id = &ids[(w * 7 + n) % ids.len()];
                        let res = http.patch(format!("{base}/v1/tasks/{id}")).bearer_auth(&token).json(&json!({"title": format!("w{w} n{n}")})).send().await?;
                        anyhow::ensure!(res.status().as_u16() == 200, "update answered {}", res.status());
                        let body: Value = res.json().await?;
                        let v = body["version"].as_i64().unwrap();
                        let mut m = versions.lock().await;
                        let e = m.entry(id.clone()).or_insert(1);
                        *e = (*e).max(v);
                        accepted.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok::<_, anyhow::Error>(())
                }));
            }
            for t in tasks {
                t.await??;
            }
            let m = versions.lock().await.clone();
            Ok::<_, anyhow::Error>(m)
        })
    };
    for threshold in [200, 600, 1000] {
        eventually("commands to flow", Duration::from_secs(120), || {
            let accepted = accepted.clone();
            async move { (accepted.load(Ordering::SeqCst) >= threshold).then_some(()) }
        })
        .await?;
        stack.kill(Svc::Projector).await?;
        stack.restart(Svc::Projector).await?;
    }
    let versions = writer.await??;
    let total_events: i64 = 40 + 1200;
    let (tasks, history) = eventually("the projector to catch up", Duration::from_secs(120), || {
        let s = &stack;
        async move {
            let counts = read_model_counts(s).await.ok()?;
            (counts.1 >= total_events).then_some(counts)
        }
    })
    .await?;
    assert_eq!((tasks, history), (40, total_events), "nothing lost, nothing doubled");
    let mut db = stack.db().await?;
    let rows: Vec<(uuid::Uuid, i32, i64)> =
        sqlx::query_as("SELECT t.id, t.version, (SELECT count(*) FROM task_history h WHERE h.task_id = t.id) FROM tasks t").fetch_all(&mut db).await?;
    for (id, version, events) in rows {
        let expected = versions.get(&id.to_string()).copied().unwrap_or(1);
        assert_eq!(i64::from(version), expected, "task {id} version");
        assert_eq!(events, expected, "task {id} history rows");
    }
    stack.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_api_restart_restores_state_and_versions_continue() -> anyhow::Result<()> {
    let mut stack = Stack::start().await?;
    let created = stack.create("alice", json!({"title": "survives restarts"})).await?;
    let id = id_of(&created);
    let path = format!("/v1/tasks/{id}");
    let key = [("Idempotency-Key", "restart-key-1")];
    let (s, _, v2) = stack.command("alice", Method::PATCH, &path, Some(json!({"title": "v2"})), &key).await?;
    assert_eq!((s, v2["version"].as_i64()), (200, Some(2)));
    stack.kill(Svc::CommandApi).await?;
    stack.restart(Svc::CommandApi).await?;
    // A retry after the crash is recognised (the key travels in the event headers).
    let (s, h, replay) = stack.command("alice", Method::PATCH, &path, Some(json!({"title": "v2"})), &key).await?;
    assert_eq!((s, &replay), (200, &v2));
    assert_eq!(h.get("idempotent-replayed").map(|v| v.to_str().unwrap()), Some("true"));
    let (s, _, v3) = stack.command("alice", Method::POST, &format!("{path}/complete"), None, &[]).await?;
    assert_eq!((s, v3["version"].as_i64()), (200, Some(3)));
    let (s, _, _) = stack.command("alice", Method::POST, &format!("{path}/complete"), None, &[]).await?;
    assert_eq!(s, 409, "the restored state knows the task is completed");
    stack.stop(Svc::CommandApi).await?;
    stack.restart(Svc::CommandApi).await?;
    let (s, _, v4) = stack.command("alice", Method::POST, &format!("{path}/reopen"), None, &[]).await?;
    assert_eq!((s, v4["version"].as_i64()), (200, Some(4)));
    let t = stack.query("alice", TASK, json!({"id": id}), Some(&pos(&v4))).await?["task"].clone();
    assert_eq!((t["version"].as_i64(), t["status"].as_str()), (Some(4), Some("OPEN")));
    stack.cleanup().await
}

/// Readiness follows the broker by itself (no command has to fail first), and while it is down a
/// command is refused with problem+json and Retry-After rather than queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_api_readiness_follows_the_broker() -> anyhow::Result<()> {
    let mut broker = PrivateBroker::start().await?;
    let stack = Stack::start_with(StackOptions { kafka_brokers: Some(broker.brokers()), partitions: 2, ..Default::default() }).await?;
    let http = reqwest::Client::new();
    let readyz = stack.url(Svc::CommandApi, "/readyz");
    let status = |http: reqwest::Client, url: String| async move { http.get(url).send().await.ok().map(|r| r.status().as_u16()) };
    assert_eq!(status(http.clone(), readyz.clone()).await, Some(200));
    broker.kill().await?;
    eventually("the command API to report not ready while the broker is down", Duration::from_secs(30), || {
        let (http, url) = (http.clone(), readyz.clone());
        async move { (status(http, url).await == Some(503)).then_some(()) }
    })
    .await?;
    let (s, h, problem) = stack.command("alice", Method::POST, "/v1/tasks", Some(json!({"title": "during the outage"})), &[]).await?;
    assert_eq!(s, 503, "{problem}");
    assert!(h.get("retry-after").is_some());
    assert_eq!(h.get("content-type").and_then(|v| v.to_str().ok()), Some("application/problem+json"));
    broker.resume().await?;
    eventually("the command API to be ready again", Duration::from_secs(120), || {
        let (http, url) = (http.clone(), readyz.clone());
        async move { (status(http, url).await == Some(200)).then_some(()) }
    })
    .await?;
    // Ready again does not mean every partition is: the group may still move them after the broker
    // came back (a writer then restores first). A client retries a 503 after Retry-After.
    let created = eventually("a command to be accepted after the outage", Duration::from_secs(60), || {
        let stack = &stack;
        async move {
            match stack.command("alice", Method::POST, "/v1/tasks", Some(json!({"title": "after the outage"})), &[]).await {
                Ok((201, _, created)) => Some(created),
                Ok((503, h, problem)) => {
                    eprintln!("503 after the outage (retrying): {problem}");
                    assert!(h.get("retry-after").is_some(), "a 503 says when to retry");
                    None
                }
                Ok((s, _, body)) => panic!("unexpected {s} after the outage: {body}"),
                Err(_) => None,
            }
        }
    })
    .await?;
    assert!(created["task_id"].is_string(), "{created}");
    stack.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_down_gives_503_and_the_service_recovers() -> anyhow::Result<()> {
    let mut broker = PrivateBroker::start().await?;
    let stack = Stack::start_with(StackOptions {
        kafka_brokers: Some(broker.brokers()),
        partitions: 2,
        extra_env: vec![("KAFKA_TRANSACTION_TIMEOUT_MS".into(), "6000".into())],
        ..Default::default()
    })
    .await?;
    let created = stack.create("alice", json!({"title": "before the outage"})).await?;
    let id = id_of(&created);
    let path = format!("/v1/tasks/{id}");
    let t = stack.query("alice", TASK, json!({"id": id}), Some(&pos(&created))).await?;
    assert_eq!(t["task"]["version"], 1);
    broker.kill().await?;
    let (s, h, problem) = stack.command("alice", Method::PATCH, &path, Some(json!({"title": "during"})), &[]).await?;
    assert_eq!(s, 503, "{problem}");
    assert!(h.get("retry-after").is_some());
    assert_eq!(problem["status"], 503);
    // Reads keep working from PostgreSQL (and the refused command is not there).
    let t = stack.query("alice", TASK, json!({"id": id}), None).await?;
    assert_eq!(t["task"]["version"], 1);
    broker.resume().await?;
    let after = eventually("commands to be accepted again", Duration::from_secs(120), || {
        let (stack, path) = (&stack, path.clone());
        async move {
            let (s, _, b) = stack.command("alice", Method::PATCH, &path, Some(json!({"title": "after"})), &[]).await.ok()?;
            (s == 200).then_some(b)
        }
    })
    .await?;
    // The refused command left nothing behind: the next version is 2.
    assert_eq!(after["version"], 2);
    // The projector rejoins its consumer group after the broker's restart (a few heartbeats) before
    // it applies the new event: wait for the read instead of expecting it within one consistency wait.
    let resumed = std::time::Instant::now();
    let t = eventually("the projector to apply the command after the broker's restart", Duration::from_secs(90), || {
        let (stack, token, id) = (&stack, pos(&after), id.clone());
        async move { stack.query("alice", TASK, json!({"id": id}), Some(&token)).await.ok() }
    })
    .await?["task"]
        .clone();
    eprintln!("projector caught up {:.1} s after the first accepted command", resumed.elapsed().as_secs_f64());
    assert_eq!((t["title"].as_str(), t["version"].as_i64()), (Some("after"), Some(2)));
    let h = stack.query("alice", HISTORY, json!({"id": id}), Some(&pos(&after))).await?;
    assert_eq!(h["taskHistory"]["edges"].as_array().unwrap().len(), 2);
    stack.cleanup().await
}
