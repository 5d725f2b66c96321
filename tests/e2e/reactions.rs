//! Reactions end to end: recurring series and reminders, exactly once, through the real stack.

use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::Method;
use serde_json::{json, Value};

use e2e::{Stack, Svc};
use test_support::eventually;

fn id_of(v: &Value) -> String {
    v["task_id"].as_str().expect("task_id").to_owned()
}

fn next_id(parent: &str, occurrence: u32) -> String {
    let parent = domain::TaskId::from_uuid(parent.parse().unwrap());
    domain::ids::next_occurrence_id(parent, occurrence).to_string()
}

async fn scalar(stack: &Stack, sql: &str) -> anyhow::Result<i64> {
    let mut db = stack.db().await?;
    Ok(sqlx::query_scalar::<_, i64>(sql).fetch_one(&mut db).await?)
}

/// Waits until the projections have applied the whole log and no reaction is pending, with no
/// batch committed in between, so that nothing is still on its way when the test counts.
pub(crate) async fn settled(stack: &Stack) -> anyhow::Result<()> {
    eventually("reactions to settle", Duration::from_secs(60), || async {
        let before = stack.caught_up().await.ok()??;
        let failed = scalar(stack, "SELECT count(*) FROM reaction_outbox WHERE failed").await.ok()?;
        assert_eq!(failed, 0, "a reaction failed for good");
        let pending = scalar(stack, "SELECT count(*) FROM reaction_outbox").await.ok()?;
        let after = stack.caught_up().await.ok()??;
        (pending == 0 && before == after).then_some(())
    })
    .await
}

async fn occurrence_rows(stack: &Stack) -> anyhow::Result<Vec<(String, Option<String>, Option<i32>, DateTime<Utc>)>> {
    let mut db = stack.db().await?;
    type Row = (uuid::Uuid, Option<uuid::Uuid>, Option<i32>, DateTime<Utc>);
    let rows: Vec<Row> =
        sqlx::query_as("SELECT id, recurrence_parent_id, occurrence, due_at FROM tasks WHERE user_id = 'alice' ORDER BY due_at").fetch_all(&mut db).await?;
    Ok(rows.into_iter().map(|(i, p, o, d)| (i.to_string(), p.map(|p| p.to_string()), o, d)).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_series_completed_with_retries_and_reopens_yields_exactly_its_occurrences() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let due: DateTime<Utc> = (Utc::now() + chrono::Duration::days(1)).date_naive().and_hms_opt(9, 0, 0).unwrap().and_utc();
    let first = stack
        .create("alice", json!({"title": "water the plants", "due_at": due, "recurrence": "FREQ=DAILY;COUNT=3", "tags": ["home"], "priority": "high"}))
        .await?;
    let first_id = id_of(&first);
    let complete = |id: String, key: Option<&'static str>| {
        let stack = &stack;
        async move {
            let headers: Vec<(&str, &str)> = key.map(|k| vec![("Idempotency-Key", k)]).unwrap_or_default();
            stack.command("alice", Method::POST, &format!("/v1/tasks/{id}/complete"), None, &headers).await
        }
    };
    // Complete, retry the same request, complete again (conflict), reopen and complete again.
    assert_eq!(complete(first_id.clone(), Some("done-1")).await?.0, 200);
    assert_eq!(complete(first_id.clone(), Some("done-1")).await?.0, 200);
    assert_eq!(complete(first_id.clone(), None).await?.0, 409);
    let second_id = next_id(&first_id, 2);
    eventually("occurrence 2", Duration::from_secs(30), || async {
        let d = stack.query("alice", "query($id: ID!) { task(id: $id) { id } }", json!({"id": second_id}), None).await.ok()?;
        (!d["task"].is_null()).then_some(())
    })
    .await?;
    assert_eq!(stack.command("alice", Method::POST, &format!("/v1/tasks/{first_id}/reopen"), None, &[]).await?.0, 200);
    assert_eq!(complete(first_id.clone(), None).await?.0, 200);
    settled(&stack).await?;
    let rows = occurrence_rows(&stack).await?;
    assert_eq!(rows.len(), 2, "reopen + complete again must not spawn a second occurrence: {rows:?}");

    // The occurrence carries the series: same title, tags, priority, recurrence; next day 09:00.
    let d = stack
        .query(
            "alice",
            "query($id: ID!) { task(id: $id) { title tags priority recurrence occurrence recurrenceParentId dueAt status } }",
            json!({"id": second_id}),
            None,
        )
        .await?;
    let t = &d["task"];
    assert_eq!((t["title"].as_str(), t["priority"].as_str(), t["status"].as_str()), (Some("water the plants"), Some("HIGH"), Some("OPEN")));
    assert_eq!(t["tags"], json!(["home"]));
    assert_eq!(t["recurrence"], "FREQ=DAILY;COUNT=3");
    assert_eq!((t["occurrence"].as_i64(), t["recurrenceParentId"].as_str()), (Some(2), Some(first_id.as_str())));
    let due2 = DateTime::parse_from_rfc3339(t["dueAt"].as_str().unwrap())?.with_timezone(&Utc);
    assert_eq!(due2, due + chrono::Duration::days(1));

    // Occurrence 2 -> 3; occurrence 3 ends the series (COUNT=3).
    assert_eq!(complete(second_id.clone(), None).await?.0, 200);
    let third_id = next_id(&second_id, 3);
    eventually("occurrence 3", Duration::from_secs(30), || async {
        let n = scalar(&stack, &format!("SELECT count(*) FROM tasks WHERE id = '{third_id}'")).await.ok()?;
        (n == 1).then_some(())
    })
    .await?;
    assert_eq!(complete(third_id.clone(), None).await?.0, 200);
    settled(&stack).await?;
    let rows = occurrence_rows(&stack).await?;
    let occ: Vec<Option<i32>> = rows.iter().map(|r| r.2).collect();
    assert_eq!(occ, vec![None, Some(2), Some(3)], "{rows:?}");
    assert_eq!(rows[2].1.as_deref(), Some(second_id.as_str()));
    stack.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projector_sigkill_around_reactions_causes_no_duplicate() -> anyhow::Result<()> {
    let mut stack = Stack::start().await?;
    let due = Utc::now() + chrono::Duration::hours(2);
    let mut parents = Vec::new();
    for i in 0..5 {
        let t = stack.create("alice", json!({"title": format!("series {i}"), "due_at": due, "recurrence": "FREQ=WEEKLY"})).await?;
        parents.push(id_of(&t));
    }
    for (i, id) in parents.iter().enumerate() {
        let (s, _, _) = stack.command("alice", Method::POST, &format!("/v1/tasks/{id}/complete"), None, &[]).await?;
        assert_eq!(s, 200);
        // Kill the projector at varying points: before it applied the completion, between the
        // batch commit and the reaction, or after.
        if i % 2 == 0 {
            stack.kill(Svc::Projector).await?;
            stack.restart(Svc::Projector).await?;
        }
    }
    stack.kill(Svc::Projector).await?;
    stack.restart(Svc::Projector).await?;
    settled(&stack).await?;
    for p in &parents {
        let children = scalar(&stack, &format!("SELECT count(*) FROM tasks WHERE recurrence_parent_id = '{p}'")).await?;
        assert_eq!(children, 1, "series {p} has {children} next occurrences");
    }
    // And in the log: exactly one task.created per occurrence.
    let created = scalar(&stack, "SELECT count(*) FROM task_history WHERE event_type = 'task.created' AND user_id = 'alice'").await?;
    assert_eq!(created, 10);
    stack.cleanup().await
}

async fn reminder_events(stack: &Stack, task: &str) -> anyhow::Result<i64> {
    scalar(stack, &format!("SELECT count(*) FROM task_history WHERE task_id = '{task}' AND event_type = 'task.reminder_due'")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reminder_fires_once_and_notifies() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let due = Utc::now() + chrono::Duration::seconds(4);
    let t = stack.create("alice", json!({"title": "call the bank", "due_at": due, "remind_before": "PT3S"})).await?;
    let id = id_of(&t);
    let remind_at = due - chrono::Duration::seconds(3);
    let fired_at = eventually("the reminder", Duration::from_secs(30), || async { (reminder_events(&stack, &id).await.ok()? == 1).then(Utc::now) }).await?;
    assert!(fired_at >= remind_at, "fired before its time");
    let mut db = stack.db().await?;
    let (kind, message, task_id): (String, String, uuid::Uuid) =
        sqlx::query_as("SELECT kind, message, task_id FROM notifications WHERE user_id = 'alice'").fetch_one(&mut db).await?;
    assert_eq!((kind.as_str(), task_id.to_string()), ("reminder", id.clone()));
    assert!(message.contains("call the bank"), "{message}");
    // The reminder is not fired again, and the schedule is empty.
    settled(&stack).await?;
    assert_eq!(reminder_events(&stack, &id).await?, 1);
    assert_eq!(scalar(&stack, "SELECT count(*) FROM reminder_schedule").await?, 0);
    assert_eq!(scalar(&stack, "SELECT count(*) FROM notifications").await?, 1);
    stack.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reminders_follow_reschedules_cancellations_and_projector_downtime() -> anyhow::Result<()> {
    let mut stack = Stack::start().await?;
    let far = Utc::now() + chrono::Duration::days(3);
    // Rescheduled to soon: fires for the new time. Completed: never fires. Deleted: never fires.
    let moved = id_of(&stack.create("alice", json!({"title": "moved", "due_at": far, "remind_before": "PT1H"})).await?);
    let done = id_of(&stack.create("alice", json!({"title": "done", "due_at": Utc::now() + chrono::Duration::seconds(3), "remind_before": "PT2S"})).await?);
    let gone = id_of(&stack.create("alice", json!({"title": "gone", "due_at": Utc::now() + chrono::Duration::seconds(3), "remind_before": "PT2S"})).await?);
    assert_eq!(stack.command("alice", Method::POST, &format!("/v1/tasks/{done}/complete"), None, &[]).await?.0, 200);
    assert_eq!(stack.command("alice", Method::DELETE, &format!("/v1/tasks/{gone}"), None, &[]).await?.0, 200);
    let soon = Utc::now() + chrono::Duration::seconds(2);
    let (s, _, _) = stack.command("alice", Method::PATCH, &format!("/v1/tasks/{moved}"), Some(json!({"due_at": soon, "remind_before": "PT1S"})), &[]).await?;
    assert_eq!(s, 200);
    eventually("the rescheduled reminder", Duration::from_secs(30), || async { (reminder_events(&stack, &moved).await.ok()? == 1).then_some(()) }).await?;

    // Due while the projector is down: fires once when it is back.
    stack.stop(Svc::Projector).await?;
    let while_down =
        id_of(&stack.create("alice", json!({"title": "while down", "due_at": Utc::now() + chrono::Duration::seconds(2), "remind_before": "PT1S"})).await?);
    let remind_at = Utc::now() + chrono::Duration::seconds(1);
    eventually("the remind time to pass", Duration::from_secs(10), || async { (Utc::now() > remind_at + chrono::Duration::milliseconds(500)).then_some(()) })
        .await?;
    assert_eq!(reminder_events(&stack, &while_down).await?, 0);
    stack.restart(Svc::Projector).await?;
    eventually("the reminder after downtime", Duration::from_secs(30), || async { (reminder_events(&stack, &while_down).await.ok()? == 1).then_some(()) })
        .await?;
    settled(&stack).await?;
    for (id, want) in [(&moved, 1), (&done, 0), (&gone, 0), (&while_down, 1)] {
        assert_eq!(reminder_events(&stack, id).await?, want, "task {id}");
    }
    stack.cleanup().await
}

/// The data of the user-level records of `user` with type `ce_type` in the log, in log order.
async fn user_records(stack: &Stack, user: &str, ce_type: &str) -> anyhow::Result<Vec<Value>> {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::{Headers, Message};
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &stack.brokers)
        .set("group.id", format!("e2e-user-records-{}", uuid::Uuid::new_v4()))
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()?;
    consumer.subscribe(&[&stack.topic])?;
    let mut out = Vec::new();
    while let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(5), consumer.recv()).await {
        let header =
            |name: &str| m.headers().and_then(|h| h.iter().find(|h| h.key == name).and_then(|h| h.value).map(|v| String::from_utf8_lossy(v).into_owned()));
        if header("ce_subject").as_deref() == Some(user) && header("ce_type").as_deref() == Some(ce_type) {
            out.push(serde_json::from_slice(m.payload().unwrap_or_default())?);
        }
    }
    Ok(out)
}

/// The user's stream owns its notifications: the projector's reaction to the fired reminder records
/// it there (`notification.created`, once), and only then is it marked read (once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fired_reminders_notification_is_recorded_in_the_users_stream_then_read_once() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let due = Utc::now() + chrono::Duration::seconds(3);
    let id = id_of(&stack.create("alice", json!({"title": "water the plants", "due_at": due, "remind_before": "PT2S"})).await?);
    eventually("the reminder", Duration::from_secs(30), || async { (reminder_events(&stack, &id).await.ok()? == 1).then_some(()) }).await?;
    // Settled: the RecordNotification reaction was answered, so its event is in the log.
    settled(&stack).await?;
    let mut db = stack.db().await?;
    let (note, reminder): (uuid::Uuid, Value) =
        sqlx::query_as("SELECT n.id, h.data FROM notifications n JOIN task_history h ON h.event_id = n.event_id WHERE n.user_id = 'alice'")
            .fetch_one(&mut db)
            .await?;
    let remind_at: DateTime<Utc> = serde_json::from_value(reminder["remind_at"].clone())?;
    assert_eq!(note, domain::ids::reminder_notification_id(domain::TaskId::from_uuid(id.parse()?), remind_at));
    let recorded = user_records(&stack, "alice", "notification.created").await?;
    assert_eq!(recorded, vec![json!({"notification_id": note, "task_id": id, "remind_at": reminder["remind_at"]})]);

    let (s, _, read) = stack.command("alice", Method::POST, &format!("/v1/notifications/{note}/read"), None, &[]).await?;
    assert_eq!((s, read["notification_id"].as_str()), (200, Some(note.to_string().as_str())), "{read}");
    let (s, _, again) = stack.command("alice", Method::POST, &format!("/v1/notifications/{note}/read"), None, &[]).await?;
    assert_eq!(s, 409, "{again}");
    let data = stack.query("alice", "{ notifications { edges { node { id readAt } } } }", json!({}), read["position"].as_str()).await?;
    assert!(data["notifications"]["edges"][0]["node"]["readAt"].is_string(), "{data}");
    stack.cleanup().await
}

/// Issue 11, defect 4: completing a recurring task, editing it, reopening and completing it again
/// re-sends the next-occurrence reaction under the same Idempotency-Key with another body; the
/// command API answers 422 `idempotency-key-reused`, which used to mark the reaction failed for
/// good. It is already done: exactly the expected occurrences, and no reaction fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_series_edited_reopened_and_completed_again_yields_its_occurrences_once_and_no_failed_reaction() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let due: DateTime<Utc> = (Utc::now() + chrono::Duration::days(1)).date_naive().and_hms_opt(9, 0, 0).unwrap().and_utc();
    let first_id = id_of(&stack.create("alice", json!({"title": "water the plants", "due_at": due, "recurrence": "FREQ=DAILY;COUNT=3"})).await?);
    let complete = |id: String| {
        let stack = &stack;
        async move { Ok::<_, anyhow::Error>(stack.command("alice", Method::POST, &format!("/v1/tasks/{id}/complete"), None, &[]).await?.0) }
    };
    assert_eq!(complete(first_id.clone()).await?, 200);
    let second_id = next_id(&first_id, 2);
    settled(&stack).await?;
    assert_eq!(scalar(&stack, &format!("SELECT count(*) FROM tasks WHERE id = '{second_id}'")).await?, 1);
    let (s, _, _) = stack.command("alice", Method::PATCH, &format!("/v1/tasks/{first_id}"), Some(json!({"title": "water all the plants"})), &[]).await?;
    assert_eq!(s, 200);
    assert_eq!(stack.command("alice", Method::POST, &format!("/v1/tasks/{first_id}/reopen"), None, &[]).await?.0, 200);
    assert_eq!(complete(first_id.clone()).await?, 200);
    // Settled asserts that no reaction failed for good.
    settled(&stack).await?;
    let rows = occurrence_rows(&stack).await?;
    assert_eq!(rows.iter().map(|r| r.2).collect::<Vec<_>>(), vec![None, Some(2)], "{rows:?}");
    let mut db = stack.db().await?;
    let title: String = sqlx::query_scalar("SELECT title FROM tasks WHERE id = $1").bind(second_id.parse::<uuid::Uuid>()?).fetch_one(&mut db).await?;
    assert_eq!(title, "water the plants", "occurrence 2 was created once, by the first completion");
    // The series goes on.
    assert_eq!(complete(second_id.clone()).await?, 200);
    settled(&stack).await?;
    let rows = occurrence_rows(&stack).await?;
    assert_eq!(rows.iter().map(|r| r.2).collect::<Vec<_>>(), vec![None, Some(2), Some(3)], "{rows:?}");
    stack.cleanup().await
}

/// The projector's `/readyz`: status and body.
async fn projector_readyz(stack: &Stack) -> Option<(u16, String)> {
    let res = stack.http.get(stack.url(Svc::Projector, "/readyz")).send().await.ok()?;
    Some((res.status().as_u16(), res.text().await.ok()?))
}

/// Issue 11, defect 3: a projector whose SERVICE_JWT_SECRET differs from the command API's is
/// answered 401; its reminders used to be dropped for good. They and the reactions are kept and
/// retried, the failure shows in `/readyz`, `/metrics` and `projector status`, and once the
/// projector is restarted with the right secret each is delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_with_the_wrong_service_secret_keeps_and_reports_its_reactions_and_delivers_them_once_fixed() -> anyhow::Result<()> {
    let mut stack = Stack::start().await?;
    stack.stop(Svc::Projector).await?;
    stack.set_env("SERVICE_JWT_SECRET", "not-the-command-apis-service-secret-0123456789");
    stack.restart(Svc::Projector).await?;
    let reminded =
        id_of(&stack.create("alice", json!({"title": "call the bank", "due_at": Utc::now() + chrono::Duration::seconds(3), "remind_before": "PT2S"})).await?);
    let due: DateTime<Utc> = (Utc::now() + chrono::Duration::days(1)).date_naive().and_hms_opt(9, 0, 0).unwrap().and_utc();
    let series = id_of(&stack.create("alice", json!({"title": "water the plants", "due_at": due, "recurrence": "FREQ=DAILY"})).await?);
    assert_eq!(stack.command("alice", Method::POST, &format!("/v1/tasks/{series}/complete"), None, &[]).await?.0, 200);

    // Refused: reported as not ready, with what to check.
    let body = eventually("the projector to report the refused reactions", Duration::from_secs(60), || async {
        let (status, body) = projector_readyz(&stack).await?;
        (status == 503 && body.contains("reactions are refused")).then_some(body)
    })
    .await?;
    assert!(body.contains("SERVICE_JWT_SECRET"), "{body}");
    eventually("the reminder and the reaction to wait after a 401", Duration::from_secs(30), || async {
        let reminder = scalar(&stack, &format!("SELECT count(*) FROM reminder_attempts WHERE task_id = '{reminded}' AND failure = 'auth'")).await.ok()?;
        let reaction = scalar(&stack, "SELECT count(*) FROM reaction_outbox WHERE kind = 'spawn_occurrence' AND failure = 'auth' AND NOT failed").await.ok()?;
        (reminder == 1 && reaction == 1).then_some(())
    })
    .await?;
    assert_eq!(scalar(&stack, &format!("SELECT count(*) FROM reminder_schedule WHERE task_id = '{reminded}'")).await?, 1, "the reminder is kept");
    assert_eq!(reminder_events(&stack, &reminded).await?, 0);
    let metrics = stack.http.get(stack.url(Svc::Projector, "/metrics")).send().await?.text().await?;
    let refused = |reaction: &str| {
        metrics.lines().any(|l| l.starts_with("reaction_failures_total{") && l.contains(&format!("reaction=\"{reaction}\"")) && l.contains("failure=\"auth\""))
    };
    assert!(refused("fire_reminder") && refused("spawn_occurrence"), "{metrics}");
    let status = stack.projector_cli(&["status"]).output().await?;
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{stdout} {}", String::from_utf8_lossy(&status.stderr));
    assert!(stdout.contains("reactions waiting to be retried") && stdout.contains("fire_reminder auth: 1"), "{stdout}");

    // Fixed and restarted: each is delivered once, and the projector is ready again.
    stack.stop(Svc::Projector).await?;
    stack.set_env("SERVICE_JWT_SECRET", test_support::tokens::SERVICE_SECRET);
    stack.restart(Svc::Projector).await?;
    eventually("the reminder after the fix", Duration::from_secs(30), || async { (reminder_events(&stack, &reminded).await.ok()? == 1).then_some(()) }).await?;
    settled(&stack).await?;
    assert_eq!(reminder_events(&stack, &reminded).await?, 1);
    assert_eq!(scalar(&stack, &format!("SELECT count(*) FROM tasks WHERE recurrence_parent_id = '{series}'")).await?, 1);
    assert_eq!(scalar(&stack, "SELECT count(*) FROM reminder_attempts").await?, 0);
    assert_eq!(projector_readyz(&stack).await.map(|r| r.0), Some(200));
    stack.cleanup().await
}
