//! Projection lifecycle end to end: rebuild from offset zero while queries and writes go on, dead
//! letters with parking, replay and discard, and a projection added without stored offsets.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use rdkafka::message::{Headers, Message};
use reqwest::Method;
use serde_json::{json, Value};

use e2e::{Stack, StackOptions, Svc};
use test_support::eventually;

use crate::reactions::settled;

/// Every read-model table: (table, the users' rows it holds).
const TABLES: [&str; 6] = ["tasks", "task_history", "notifications", "notification_reads", "webhooks", "reminder_schedule"];

fn id_of(v: &Value) -> String {
    v["task_id"].as_str().expect("task_id").to_owned()
}

/// A checksum per read-model table over the rows of users other than `except`.
pub(crate) async fn checksums(stack: &Stack, except: &str) -> anyhow::Result<Vec<(String, i64, String)>> {
    let mut db = stack.db().await?;
    let mut out = Vec::new();
    for t in TABLES {
        let (n, sum): (i64, Option<String>) =
            sqlx::query_as(&format!("SELECT count(*), md5(string_agg(t::text, '|' ORDER BY t::text)) FROM {t} t WHERE t.user_id <> $1"))
                .bind(except)
                .fetch_one(&mut db)
                .await?;
        out.push((t.to_owned(), n, sum.unwrap_or_default()));
    }
    Ok(out)
}

async fn scalar(stack: &Stack, sql: &str) -> anyhow::Result<i64> {
    let mut db = stack.db().await?;
    Ok(sqlx::query_scalar::<_, i64>(sql).fetch_one(&mut db).await?)
}

/// Sends `n` commands with at most `concurrency` in flight (retrying 503s, as clients do); every
/// one must succeed.
async fn run_commands(stack: &Stack, commands: Vec<(String, Method, String, Option<Value>)>, concurrency: usize) -> anyhow::Result<()> {
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(commands)
        .map(|(user, method, path, body)| async move {
            let (s, _, b) = stack.command_retrying(&user, method, &path, body).await?;
            anyhow::ensure!((200..300).contains(&s), "{path} answered {s}: {b}");
            Ok(())
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    results.into_iter().collect()
}

/// A history with every event type: 2 000+ tasks over four users, each created, updated,
/// completed, reopened (some deleted, some recurring with their next occurrence spawned),
/// reminders fired with notifications, a notification read, webhooks registered and removed.
async fn write_history(stack: &Stack) -> anyhow::Result<usize> {
    let users = ["ann", "ben", "cid", "dee"];
    let ids: Vec<(String, String)> = (0..2_400).map(|i| (users[i % 4].to_owned(), uuid::Uuid::new_v4().to_string())).collect();
    let creates = ids
        .iter()
        .enumerate()
        .map(|(i, (u, id))| {
            let priority = ["low", "medium", "high", "urgent"][i % 4];
            let mut body = json!({"task_id": id, "title": format!("task {i}"), "priority": priority,
                                  "tags": [format!("t{}", i % 7)], "timezone": "America/New_York"});
            if i % 50 == 0 {
                body["due_at"] = json!("2031-03-01T09:00:00-05:00");
                body["recurrence"] = json!("FREQ=WEEKLY;BYDAY=MO");
            }
            (u.clone(), Method::POST, "/v1/tasks".to_owned(), Some(body))
        })
        .collect();
    run_commands(stack, creates, 32).await?;
    let updates = ids
        .iter()
        .enumerate()
        .map(|(i, (u, id))| (u.clone(), Method::PATCH, format!("/v1/tasks/{id}"), Some(json!({"description": format!("d{i}"), "tags": ["x", "y"]}))))
        .collect();
    run_commands(stack, updates, 32).await?;
    let renames = ids
        .iter()
        .enumerate()
        .map(|(i, (u, id))| (u.clone(), Method::PATCH, format!("/v1/tasks/{id}"), Some(json!({"title": format!("renamed {i}"), "priority": "high"}))))
        .collect();
    run_commands(stack, renames, 32).await?;
    let completes = ids.iter().map(|(u, id)| (u.clone(), Method::POST, format!("/v1/tasks/{id}/complete"), None)).collect();
    run_commands(stack, completes, 32).await?;
    let reopens = ids.iter().skip(1).step_by(2).map(|(u, id)| (u.clone(), Method::POST, format!("/v1/tasks/{id}/reopen"), None)).collect();
    run_commands(stack, reopens, 32).await?;
    let deletes = ids.iter().step_by(5).map(|(u, id)| (u.clone(), Method::DELETE, format!("/v1/tasks/{id}"), None)).collect();
    run_commands(stack, deletes, 32).await?;
    // Webhooks: registered for two users, removed again for one.
    for u in ["cid", "ben"] {
        // A literal public address: registration resolves names, and this machine has no DNS.
        let (s, _, b) = stack.command(u, Method::PUT, "/v1/webhook", Some(json!({"url": "https://93.184.216.34/taskstream"})), &[]).await?;
        anyhow::ensure!(s == 200, "set webhook: {s} {b}");
    }
    let (s, _, _) = stack.command("ben", Method::DELETE, "/v1/webhook", None, &[]).await?;
    anyhow::ensure!(s == 200);
    // Reminders that fire now, their notifications, one read.
    let due = chrono::Utc::now() + chrono::Duration::seconds(2);
    let mut reminded = Vec::new();
    for u in ["cid", "dee"] {
        let t = stack.create(u, json!({"title": "pay rent", "due_at": due, "remind_before": "PT1S"})).await?;
        reminded.push((u, id_of(&t)));
    }
    let note: uuid::Uuid = eventually("the reminders' notifications", Duration::from_secs(30), || async {
        let n = scalar(stack, "SELECT count(*) FROM notifications").await.ok()?;
        if n < 2 {
            return None;
        }
        let mut db = stack.db().await.ok()?;
        sqlx::query_scalar("SELECT id FROM notifications WHERE user_id = 'cid'").fetch_one(&mut db).await.ok()
    })
    .await?;
    // Readable once the reaction recorded it in cid's own stream, moments after the row appears
    // (until then the command API answers 404).
    let (s, _, b) = eventually("the notification to be recorded in cid's stream", Duration::from_secs(30), || async {
        let answer = stack.command("cid", Method::POST, &format!("/v1/notifications/{note}/read"), None, &[]).await.ok()?;
        (answer.0 != 404).then_some(answer)
    })
    .await?;
    anyhow::ensure!(s == 200, "mark read: {s} {b}");
    settled(stack).await?;
    let events = scalar(stack, "SELECT count(*) FROM task_history").await?;
    Ok(events as usize)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebuild_gives_identical_read_models_while_queries_and_writes_go_on() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let events = write_history(&stack).await?;
    assert!(events >= 10_000, "the history has {events} events");
    for t in ["task.created", "task.updated", "task.completed", "task.reopened", "task.deleted", "task.reminder_due"] {
        assert!(scalar(&stack, &format!("SELECT count(*) FROM task_history WHERE event_type = '{t}'")).await? > 0, "no {t}");
    }
    let before = checksums(&stack, "writer").await?;
    let shape = table_shape(&stack).await?;
    assert!(shape.contains(&("tasks".into(), "storage parameters".into(), "fillfactor=50".into())), "{shape:?}");
    let outbox = scalar(&stack, "SELECT count(*) FROM reaction_outbox").await?;
    let deliveries = scalar(&stack, "SELECT count(*) FROM webhook_deliveries").await?;
    let total: i64 = scalar(&stack, "SELECT count(*) FROM tasks WHERE user_id = 'ann'").await?;

    // Readers that must never fail nor see a partial view, and a writer, during the rebuild.
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let stack = Arc::new(stack);
    let reader = {
        let (stack, stop, reads) = (stack.clone(), stop.clone(), reads.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                let data = stack.query("ann", "{ stats { total } tasks(first: 50) { edges { node { id version } } } }", json!({}), None).await?;
                anyhow::ensure!(data["stats"]["total"].as_i64() == Some(total), "ann's total changed during the rebuild: {data}");
                anyhow::ensure!(data["tasks"]["edges"].as_array().map(Vec::len) == Some(50), "a partial page: {data}");
                reads.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        })
    };
    let writer = {
        let (stack, stop) = (stack.clone(), stop.clone());
        tokio::spawn(async move {
            let mut written = Vec::new();
            while !stop.load(Ordering::Acquire) {
                let t = stack.create("writer", json!({"title": format!("w{}", written.len())})).await?;
                let id = id_of(&t);
                let (s, _, b) = stack.command_retrying("writer", Method::POST, &format!("/v1/tasks/{id}/complete"), None).await?;
                anyhow::ensure!(s == 200, "{b}");
                written.push(id);
            }
            anyhow::Ok(written)
        })
    };
    let out = stack.projector_cli(&["rebuild", "--yes"]).output().await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "rebuild failed: {}\n{}", stdout, String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("rebuilt tasks, task_history, notifications, reminder_schedule"), "{stdout}");
    stop.store(true, Ordering::Release);
    reader.await??;
    let written = writer.await??;
    eprintln!("{stdout}queries during the rebuild: {}, tasks written: {}", reads.load(Ordering::Relaxed), written.len());
    assert!(reads.load(Ordering::Relaxed) > 0, "no query ran during the rebuild");
    assert!(!written.is_empty(), "no command ran during the rebuild");

    // The live projector goes on, into the new tables.
    let t = stack.create("writer", json!({"title": "after the switch"})).await?;
    let data = stack.query("writer", "query($id: ID!) { task(id: $id) { version } }", json!({"id": id_of(&t)}), t["position"].as_str()).await?;
    assert_eq!(data["task"]["version"], 1);
    settled(&stack).await?;
    assert_eq!(checksums(&stack, "writer").await?, before, "the rebuilt read models differ from the live ones");
    let mut db = stack.db().await?;
    let versions: Vec<(String, i32, String)> =
        sqlx::query_as("SELECT id::text, version, status FROM tasks WHERE user_id = 'writer' AND title <> 'after the switch'").fetch_all(&mut db).await?;
    assert_eq!(versions.len(), written.len(), "tasks written during the rebuild are missing");
    assert!(versions.iter().all(|(_, v, s)| *v == 2 && s == "completed"), "{versions:?}");
    // No reactions during the rebuild, old tables dropped, index names kept.
    assert_eq!(scalar(&stack, "SELECT count(*) FROM reaction_outbox").await?, outbox);
    assert_eq!(scalar(&stack, "SELECT count(*) FROM webhook_deliveries").await?, deliveries);
    assert_eq!(scalar(&stack, "SELECT count(*) FROM pg_namespace WHERE nspname = 'ts_rebuild'").await?, 0);
    // The copies were loaded without their secondary indexes, built near the end: the switched
    // tables have every index and constraint the live ones had, under the same names.
    assert!(stderr_of(&out).contains("secondary indexes"), "{}", stderr_of(&out));
    // Before that, the task rows were kept in memory and written once (the bulk phase).
    assert!(stderr_of(&out).contains("task rows kept in memory"), "{}", stderr_of(&out));
    assert_eq!(table_shape(&stack).await?, shape, "the rebuilt tables' indexes, constraints or storage parameters differ");
    assert_eq!(scalar(&stack, "SELECT count(*) FROM projection_rebuilds").await?, 0);
    let status = stack.projector_cli(&["status"]).output().await?;
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.contains("tasks  state=live"), "{status}");
    Arc::try_unwrap(stack).map_err(|_| anyhow::anyhow!("stack still shared"))?.cleanup().await
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Every index (name, definition), constraint (name, definition) and storage parameter (such as
/// `tasks`' fillfactor) of the public tables.
async fn table_shape(stack: &Stack) -> anyhow::Result<Vec<(String, String, String)>> {
    let mut db = stack.db().await?;
    Ok(sqlx::query_as(
        "SELECT tablename::text, indexname::text, indexdef FROM pg_indexes WHERE schemaname = 'public'
         UNION ALL
         SELECT relname::text, 'storage parameters', array_to_string(reloptions, ', ') FROM pg_class
         WHERE relnamespace = 'public'::regnamespace AND relkind = 'r' AND reloptions IS NOT NULL
         UNION ALL
         SELECT conrelid::regclass::text, conname::text, pg_get_constraintdef(oid) FROM pg_constraint
         WHERE connamespace = 'public'::regnamespace
         ORDER BY 1, 2, 3",
    )
    .fetch_all(&mut db)
    .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_rebuild_leaves_the_live_tables_untouched() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let commands = (0..600).map(|i| ("ann".to_owned(), Method::POST, "/v1/tasks".to_owned(), Some(json!({"title": format!("t{i}")})))).collect();
    run_commands(&stack, commands, 16).await?;
    settled(&stack).await?;
    let before = checksums(&stack, "-").await?;
    // Tiny batches so that the rebuild is still running when it is interrupted. (Its task rows are
    // kept in memory until near the live head: the history shows the progress.)
    let rebuild = stack.projector_cli(&["rebuild", "--yes", "--max-batch", "1"]).spawn()?;
    eventually("the rebuild to make progress", Duration::from_secs(30), || async {
        (scalar(&stack, "SELECT count(*) FROM ts_rebuild.task_history").await.ok()? > 0).then_some(())
    })
    .await?;
    let _ = std::process::Command::new("kill").arg("-INT").arg(rebuild.id().expect("pid").to_string()).status();
    let out = tokio::time::timeout(Duration::from_secs(20), rebuild.wait_with_output()).await??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "an interrupted rebuild exits with 130: {stderr}");
    assert!(stderr.contains("the live tables are untouched"), "{stderr}");
    assert_eq!(scalar(&stack, "SELECT count(*) FROM pg_namespace WHERE nspname = 'ts_rebuild'").await?, 0);
    let mut db = stack.db().await?;
    let left: Vec<(String, String, i64, i64)> =
        sqlx::query_as("SELECT projection, requested_by, events_done, events_total FROM projection_rebuilds").fetch_all(&mut db).await?;
    assert!(left.is_empty(), "rebuilds still registered: {left:?}\n{stderr}");
    assert_eq!(checksums(&stack, "-").await?, before);
    stack.cleanup().await
}

/// The record of `task` at the position of its last command, with a payload that cannot be decoded.
async fn produce_poison(stack: &Stack, task: &str, position: &str) -> anyhow::Result<()> {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let partition = platform::position::Position::from_token(position).map_err(|e| anyhow::anyhow!("{e}"))?.partition;
    let producer: FutureProducer = rdkafka::ClientConfig::new().set("bootstrap.servers", &stack.brokers).create()?;
    let headers = rdkafka::message::OwnedHeaders::new()
        .insert(rdkafka::message::Header { key: "ce_specversion", value: Some("1.0") })
        .insert(rdkafka::message::Header { key: "ce_type", value: Some("task.updated") })
        .insert(rdkafka::message::Header { key: "ce_subject", value: Some(task) });
    producer
        .send(FutureRecord::to(&stack.topic).partition(partition).key(task).payload("{not json").headers(headers), Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)?;
    Ok(())
}

async fn version_of(stack: &Stack, task: &str) -> anyhow::Result<Option<i64>> {
    let data = stack.query("ann", "query($id: ID!) { task(id: $id) { version } }", json!({"id": task}), None).await?;
    Ok(data["task"]["version"].as_i64())
}

async fn cli(stack: &Stack, args: &[&str]) -> anyhow::Result<(bool, String)> {
    let out = stack.projector_cli(args).output().await?;
    Ok((out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_are_dead_lettered_their_task_parked_and_released() -> anyhow::Result<()> {
    let mut stack = Stack::start().await?;
    // 1. A record that cannot be decoded.
    let a = stack.create("ann", json!({"title": "a"})).await?;
    let a_id = id_of(&a);
    produce_poison(&stack, &a_id, a["position"].as_str().unwrap()).await?;
    let (s, _, _) = stack.command("ann", Method::PATCH, &format!("/v1/tasks/{a_id}"), Some(json!({"title": "a2"})), &[]).await?;
    assert_eq!(s, 200);
    // The projection goes on for other tasks...
    let b = stack.create("ann", json!({"title": "b"})).await?;
    assert_eq!(
        stack.query("ann", "query($id: ID!) { task(id: $id) { version } }", json!({"id": id_of(&b)}), b["position"].as_str()).await?["task"]["version"],
        1
    );
    settled(&stack).await?;
    // ...while the poisoned task waits, its later event parked in order.
    assert_eq!(version_of(&stack, &a_id).await?, Some(1));
    let (ok, list) = cli(&stack, &["dlq", "list"]).await?;
    assert!(ok, "{list}");
    let line = list.lines().find(|l| l.contains(&a_id)).unwrap_or_else(|| panic!("no dead letter for {a_id}: {list}"));
    assert!(line.contains("task.updated") && line.contains("open") && line.contains("cannot decode"), "{line}");
    let columns: Vec<&str> = line.split_whitespace().collect();
    let id = columns[0].to_owned();
    assert_eq!(columns[5], "1", "one parked record expected: {line}");
    // The dead-letter topic has it, with the projection, the error and the original position.
    let dlq = read_dlq(&stack).await?;
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0]["dlq_original_topic"], stack.topic);
    assert!(dlq[0]["dlq_projection"].as_str().unwrap().contains("tasks"));
    assert!(dlq[0]["dlq_error"].as_str().unwrap().contains("cannot decode"));
    assert!(dlq[0]["dlq_original_offset"].as_str().unwrap().parse::<i64>().is_ok());
    // Replaying does not help (the record is still bad): nothing changes.
    let (ok, out) = cli(&stack, &["dlq", "replay", &id]).await?;
    assert!(!ok && out.contains("still fails"), "{out}");
    assert_eq!(version_of(&stack, &a_id).await?, Some(1));
    // Discarding releases the task: its parked update is applied.
    let (ok, out) = cli(&stack, &["dlq", "discard", &id]).await?;
    assert!(ok && out.contains("1 record(s) applied"), "{out}");
    assert_eq!(version_of(&stack, &a_id).await?, Some(2));
    let (_, out) = cli(&stack, &["dlq", "discard", &id]).await?;
    assert!(out.contains("discarded already"), "{out}");
    // A command API restoring from a log that holds the undecodable record does not forget the
    // task: it stops writes to it (503 stream-blocked, naming the record)...
    stack.kill(Svc::CommandApi).await?;
    stack.restart(Svc::CommandApi).await?;
    let (s, headers, b) = stack.command("ann", Method::POST, &format!("/v1/tasks/{a_id}/complete"), None, &[]).await?;
    let record = format!("partition {}, offset {}", dlq[0]["dlq_original_partition"].as_str().unwrap(), dlq[0]["dlq_original_offset"].as_str().unwrap());
    assert_eq!((s, b["type"].as_str()), (503, Some("urn:taskstream:problem:stream-blocked")), "{b}");
    assert!(b["detail"].as_str().unwrap().contains(&record) && headers.contains_key("retry-after"), "{b}");
    // ...until the operator releases that record (after deciding it can be skipped).
    stack.kill(Svc::CommandApi).await?;
    let released = format!("{}:{}", dlq[0]["dlq_original_partition"].as_str().unwrap(), dlq[0]["dlq_original_offset"].as_str().unwrap());
    stack.set_env("COMMAND_API_RELEASED_RECORDS", &released);
    stack.restart(Svc::CommandApi).await?;
    let (s, _, b) = stack.command("ann", Method::POST, &format!("/v1/tasks/{a_id}/complete"), None, &[]).await?;
    assert_eq!((s, b["version"].as_i64()), (200, Some(3)), "{b}");

    // 2. A record that cannot be applied (a constraint the data violates), replayed after the fix.
    let mut db = stack.db().await?;
    sqlx::query("ALTER TABLE task_history ADD CONSTRAINT no_poison CHECK (data->>'title' IS DISTINCT FROM 'poison')").execute(&mut db).await?;
    let p = stack.create("ann", json!({"title": "poison"})).await?;
    let p_id = id_of(&p);
    let (s, _, _) = stack.command("ann", Method::PATCH, &format!("/v1/tasks/{p_id}"), Some(json!({"title": "fine"})), &[]).await?;
    assert_eq!(s, 200);
    let c = stack.create("ann", json!({"title": "c"})).await?;
    assert_eq!(
        stack.query("ann", "query($id: ID!) { task(id: $id) { version } }", json!({"id": id_of(&c)}), c["position"].as_str()).await?["task"]["version"],
        1
    );
    settled(&stack).await?;
    assert_eq!(version_of(&stack, &p_id).await?, None, "the poisoned task is not visible");
    let (_, list) = cli(&stack, &["dlq", "list"]).await?;
    let line = list.lines().find(|l| l.contains(&p_id)).unwrap_or_else(|| panic!("no dead letter for {p_id}: {list}"));
    assert!(line.contains("cannot apply") && line.contains("no_poison"), "{line}");
    let id = line.split_whitespace().next().unwrap().to_owned();
    sqlx::query("ALTER TABLE task_history DROP CONSTRAINT no_poison").execute(&mut db).await?;
    let (ok, out) = cli(&stack, &["dlq", "replay", &id]).await?;
    assert!(ok && out.contains("2 record(s) applied"), "{out}");
    let data = stack.query("ann", "query($id: ID!) { task(id: $id) { version title } }", json!({"id": p_id}), None).await?;
    assert_eq!(data["task"], json!({"version": 2, "title": "fine"}));
    let (_, list) = cli(&stack, &["dlq", "list"]).await?;
    assert!(list.contains("no dead letters"), "{list}");
    stack.cleanup().await
}

/// The dead-letter topic's records: their dlq_* headers as a JSON object.
async fn read_dlq(stack: &Stack) -> anyhow::Result<Vec<Value>> {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &stack.brokers)
        .set("group.id", format!("e2e-dlq-{}", uuid::Uuid::new_v4()))
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[&format!("{}.dlq", stack.topic)])?;
    let mut out = Vec::new();
    while let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(if out.is_empty() { 20 } else { 2 }), consumer.recv()).await {
        let mut v = json!({});
        if let Some(h) = m.headers() {
            for h in h.iter().filter(|h| h.key.starts_with("dlq_")) {
                v[h.key] = json!(String::from_utf8_lossy(h.value.unwrap_or_default()));
            }
        }
        out.push(v);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_without_stored_offsets_is_built_from_offset_zero() -> anyhow::Result<()> {
    let mut stack = Stack::start_with(StackOptions::default()).await?;
    let commands = (0..300).map(|i| ("ann".to_owned(), Method::POST, "/v1/tasks".to_owned(), Some(json!({"title": format!("t{i}")})))).collect();
    run_commands(&stack, commands, 16).await?;
    settled(&stack).await?;
    let before = checksums(&stack, "-").await?;
    // As if task_history had just been added in code: no offsets, no rows.
    stack.stop(Svc::Projector).await?;
    let mut db = stack.db().await?;
    sqlx::query("DELETE FROM projection_offsets WHERE projection = 'task_history'").execute(&mut db).await?;
    sqlx::query("TRUNCATE task_history").execute(&mut db).await?;
    stack.restart(Svc::Projector).await?;
    // Live events go on meanwhile.
    let t = stack.create("bob", json!({"title": "during"})).await?;
    stack.query("bob", "query($id: ID!) { task(id: $id) { version } }", json!({"id": id_of(&t)}), t["position"].as_str()).await?;
    eventually("task_history to be rebuilt", Duration::from_secs(60), || async {
        let done = scalar(&stack, "SELECT count(*) FROM projection_rebuilds").await.ok()? == 0;
        let sums = checksums(&stack, "bob").await.ok()?;
        (done && sums == before).then_some(())
    })
    .await?;
    assert_eq!(scalar(&stack, "SELECT count(*) FROM task_history WHERE user_id = 'bob'").await?, 1);
    stack.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_while_events_flow_loses_nothing() -> anyhow::Result<()> {
    let pg = e2e::postgres::PrivatePostgres::start().await?;
    let mut stack = Stack::start_with(StackOptions { database_url: Some(pg.url("postgres")), ..Default::default() }).await?;
    let stack_ref = &stack;
    let sent = AtomicUsize::new(0);
    let writer = async {
        for i in 0..400 {
            let t = stack_ref.create("ann", json!({"title": format!("t{i}")})).await?;
            let (s, _, b) = stack_ref.command_retrying("ann", Method::POST, &format!("/v1/tasks/{}/complete", id_of(&t)), None).await?;
            anyhow::ensure!(s == 200, "{b}");
            sent.fetch_add(1, Ordering::Relaxed);
        }
        anyhow::Ok(())
    };
    let restarter = async {
        eventually("some events to flow", Duration::from_secs(60), || async { (sent.load(Ordering::Relaxed) >= 100).then_some(()) }).await?;
        pg.restart()?;
        eventually("more events after the restart", Duration::from_secs(60), || async { (sent.load(Ordering::Relaxed) >= 200).then_some(()) }).await?;
        pg.restart()
    };
    let (w, r) = tokio::join!(writer, restarter);
    w?;
    r?;
    settled(&stack).await?;
    assert!(stack.is_running(Svc::Projector), "the projector exited instead of retrying");
    let mut db = stack.db().await?;
    let (n, v): (i64, i64) =
        sqlx::query_as("SELECT count(*), sum(version) FROM tasks WHERE user_id = 'ann' AND status = 'completed'").fetch_one(&mut db).await?;
    assert_eq!((n, v), (400, 800), "every task created and completed, once");
    assert_eq!(scalar(&stack, "SELECT count(*) FROM task_history").await?, 800);
    stack.cleanup().await?;
    drop(pg);
    Ok(())
}

/// The sum of `projection_lag` for `tasks` on a service's /metrics.
async fn lag_metric(stack: &Stack, svc: Svc) -> Option<f64> {
    let text = stack.http.get(stack.url(svc, "/metrics")).send().await.ok()?.text().await.ok()?;
    let lines: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("projection_lag{") && l.contains("projection=\"tasks\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!lines.is_empty()).then(|| lines.iter().sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_rises_while_the_projector_is_stopped_and_returns_to_zero() -> anyhow::Result<()> {
    let mut stack = Stack::start().await?;
    stack.create("ann", json!({"title": "first"})).await?;
    settled(&stack).await?;
    eventually("no lag", Duration::from_secs(30), || async { (lag_metric(&stack, Svc::QueryApi).await? == 0.0).then_some(()) }).await?;
    stack.stop(Svc::Projector).await?;
    let commands = (0..50).map(|i| ("ann".to_owned(), Method::POST, "/v1/tasks".to_owned(), Some(json!({"title": format!("t{i}")})))).collect();
    run_commands(&stack, commands, 8).await?;
    let lag = eventually("the lag to rise", Duration::from_secs(30), || async {
        let lag = lag_metric(&stack, Svc::QueryApi).await?;
        (lag >= 50.0).then_some(lag)
    })
    .await?;
    let data = stack.query("ann", "{ projections { name lag } }", json!({}), None).await?;
    assert!(data["projections"][0]["lag"].as_i64().unwrap_or(0) >= 50, "{data}");
    stack.restart(Svc::Projector).await?;
    eventually("the lag to return to zero", Duration::from_secs(60), || async {
        let q = lag_metric(&stack, Svc::QueryApi).await?;
        let p = lag_metric(&stack, Svc::Projector).await?;
        (q == 0.0 && p == 0.0).then_some(())
    })
    .await?;
    eprintln!("lag while the projector was stopped: {lag}");
    stack.cleanup().await
}
