//! The event catalogue against the real log: every record the services write is valid against the
//! schema its headers name (schemas/events/<type>.v<N>.json, checked with Ajv) and its headers
//! against the message's headers schema in schemas/asyncapi.json, and records written
//! the old way (schema v1 of `webhook.registered`, no ce_dataschema, unpadded ce_sequence) still
//! restore in the command API, project, and rebuild identically.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use reqwest::Method;
use serde_json::{json, Value};

use e2e::{Stack, StackOptions, Svc};
use test_support::eventually;

use crate::lifecycle::checksums;
use crate::reactions::settled;

/// A public literal address: webhook registration resolves names, and test machines have no DNS.
const HOOK: &str = "https://93.184.216.34/taskstream";

struct LogRecord {
    key: String,
    headers: BTreeMap<String, String>,
    value: Value,
}

/// Every record of the stack's topic, in partition order (read_committed).
async fn read_log(stack: &Stack) -> anyhow::Result<Vec<LogRecord>> {
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &stack.brokers)
        .set("group.id", format!("e2e-catalogue-{}", uuid::Uuid::new_v4()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()?;
    consumer.subscribe(&[&stack.topic])?;
    let mut out = Vec::new();
    // Until nothing more arrives for 5 s (the callers have waited for the log to settle).
    while let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(if out.is_empty() { 20 } else { 5 }), consumer.recv()).await {
        let mut headers = BTreeMap::new();
        if let Some(h) = m.headers() {
            for h in h.iter() {
                headers.insert(h.key.to_owned(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned());
            }
        }
        let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
        out.push(LogRecord { key, headers, value: serde_json::from_slice(m.payload().unwrap_or(b"null"))? });
    }
    Ok(out)
}

/// The schema version a record names (`ce_dataschema` ...:v<N>; 1 without it).
fn version_of(r: &LogRecord) -> u32 {
    r.headers.get("ce_dataschema").map_or(1, |uri| uri.rsplit_once(":v").and_then(|(_, v)| v.parse().ok()).expect("ce_dataschema ends in :v<N>"))
}

/// Validates `records` ({type, version, data}) against the committed schemas with
/// schemas/tools/check.mjs (Ajv; modules from deploy/local/asyncapi.sh).
pub(crate) fn validate(records: &[Value]) -> anyhow::Result<String> {
    let node_path = std::env::var("ASYNCAPI_NODE_PATH").map_err(|_| {
        anyhow::anyhow!("ASYNCAPI_NODE_PATH is not set: run ./dev test, or `source deploy/local/lib.sh; source deploy/local/asyncapi.sh; ensure_asyncapi_tools` and export ASYNCAPI_NODE_PATH=$PWD/.local/asyncapi/node_modules")
    })?;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let file = std::env::temp_dir().join(format!("taskstream-log-records-{}.json", uuid::Uuid::new_v4()));
    std::fs::write(&file, serde_json::to_vec(records)?)?;
    let out = std::process::Command::new("node")
        .arg(root.join("schemas/tools/check.mjs"))
        .arg("records")
        .arg(root.join("schemas/events"))
        .arg(&file)
        .env("NODE_PATH", node_path)
        .output()?;
    std::fs::remove_file(&file).ok();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    anyhow::ensure!(out.status.success(), "records invalid against their schemas:\n{text}");
    Ok(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_the_services_write_is_valid_against_the_schema_it_names() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let full = json!({"title": "everything", "description": "all\nfields", "priority": "urgent", "due_at": "2031-02-03T04:05:06Z",
                      "timezone": "Europe/Berlin", "recurrence": "FREQ=WEEKLY;BYDAY=MO", "remind_before": "P1DT2H", "tags": ["a", "b"]});
    let id = stack.create("ann", full).await?["task_id"].as_str().expect("task_id").to_owned();
    let path = format!("/v1/tasks/{id}");
    for (method, p, body) in [
        (Method::PATCH, path.clone(), Some(json!({"title": "set", "priority": "low", "tags": [], "remind_before": "PT30M"}))),
        (Method::PATCH, path.clone(), Some(json!({"description": null, "recurrence": null, "remind_before": null, "due_at": null}))),
        (Method::POST, format!("{path}/complete"), None),
        (Method::POST, format!("{path}/reopen"), None),
        (Method::DELETE, path.clone(), None),
    ] {
        let (s, _, b) = stack.command("ann", method, &p, body, &[]).await?;
        anyhow::ensure!(s == 200, "{p}: {s} {b}");
    }
    // A reminder that fires now: task.reminder_due, then notification.created in ann's stream.
    let due = chrono::Utc::now() + chrono::Duration::seconds(2);
    stack.create("ann", json!({"title": "soon", "due_at": due, "remind_before": "PT1S"})).await?;
    let note: uuid::Uuid = eventually("the reminder's notification", Duration::from_secs(30), || async {
        let mut db = stack.db().await.ok()?;
        sqlx::query_scalar("SELECT id FROM notifications WHERE user_id = 'ann'").fetch_one(&mut db).await.ok()
    })
    .await?;
    let (s, _, b) = eventually("the notification to be recorded in ann's stream", Duration::from_secs(30), || async {
        let answer = stack.command("ann", Method::POST, &format!("/v1/notifications/{note}/read"), None, &[]).await.ok()?;
        (answer.0 != 404).then_some(answer)
    })
    .await?;
    anyhow::ensure!(s == 200, "mark read: {s} {b}");
    for (method, body) in [(Method::PUT, Some(json!({"url": HOOK}))), (Method::DELETE, None)] {
        let (s, _, b) = stack.command("ben", method, "/v1/webhook", body, &[]).await?;
        anyhow::ensure!(s == 200, "webhook: {s} {b}");
    }
    settled(&stack).await?;

    let log = read_log(&stack).await?;
    let mut records = Vec::new();
    let mut types = BTreeSet::new();
    for r in &log {
        let h = &r.headers;
        let seq = &h["ce_sequence"];
        assert!(seq.len() == 20 && seq.bytes().all(|b| b.is_ascii_digit()), "ce_sequence {seq:?} is not zero-padded to 20 digits");
        assert_eq!(h["ce_subject"], r.key, "key = ce_subject");
        types.insert((h["ce_type"].clone(), version_of(r)));
        records.push(json!({"type": h["ce_type"], "version": version_of(r), "data": r.value, "headers": h}));
    }
    let want: BTreeSet<(String, u32)> = [
        ("task.created", 1),
        ("task.updated", 1),
        ("task.completed", 1),
        ("task.reopened", 1),
        ("task.deleted", 1),
        ("task.reminder_due", 1),
        ("notification.created", 1),
        ("notification.read", 1),
        ("webhook.registered", 2),
        ("webhook.removed", 1),
    ]
    .into_iter()
    .map(|(t, v)| (t.to_owned(), v))
    .collect();
    assert_eq!(types, want, "every event type, in its current version");
    let report = validate(&records)?;
    eprintln!("{report}");
    assert!(report.contains(&format!("{} record(s) checked, 0 invalid", records.len())), "{report}");
    stack.cleanup().await
}

/// Headers of a record written before the catalogue: unpadded `ce_sequence`, and (when `schema` is
/// None) no `ce_dataschema` at all.
fn old_headers(event_type: &str, subject: &str, user: &str, sequence: u32, schema: Option<&str>) -> OwnedHeaders {
    let (id, time, seq) = (uuid::Uuid::now_v7().to_string(), chrono::Utc::now().to_rfc3339(), sequence.to_string());
    let mut h = OwnedHeaders::new();
    for (key, value) in [
        ("ce_specversion", "1.0"),
        ("ce_id", id.as_str()),
        ("ce_type", event_type),
        ("ce_source", "/taskstream/command-api"),
        ("ce_time", time.as_str()),
        ("ce_subject", subject),
        ("content-type", "application/json"),
        ("ce_userid", user),
        ("ce_sequence", seq.as_str()),
    ] {
        h = h.insert(Header { key, value: Some(value) });
    }
    if let Some(s) = schema {
        h = h.insert(Header { key: "ce_dataschema", value: Some(s) });
    }
    h
}

/// Issue 13: old records in the log (webhook.registered v1 with `secret`, records without
/// ce_dataschema, ce_sequence "1".."11" unpadded) restore in the command API, project, and
/// rebuild identically; new records are written in the new shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_written_before_the_catalogue_restore_project_and_rebuild_identically() -> anyhow::Result<()> {
    let opts = StackOptions { partitions: 4, ..StackOptions::default() };
    let mut stack = Stack::start_with(opts).await?;
    let producer: FutureProducer = rdkafka::ClientConfig::new().set("bootstrap.servers", &stack.brokers).set("acks", "all").create()?;
    let send = |key: String, headers: OwnedHeaders, value: Value| {
        let producer = producer.clone();
        let topic = stack.topic.clone();
        async move {
            let payload = serde_json::to_vec(&value).unwrap();
            // librdkafka's default partitioner (CRC-32 of the key) puts it where the command API
            // places the stream (command-api/src/partition.rs).
            let record = FutureRecord::to(&topic).key(&key).payload(&payload).headers(headers);
            producer.send(record, Duration::from_secs(10)).await.map(drop).map_err(|(e, _)| anyhow::anyhow!("{e}"))
        }
    };
    // carol's webhook registration, schema v1 (the secret was called `secret`).
    let secret = "v1-secret-0123456789";
    send(
        "carol".into(),
        old_headers("webhook.registered", "carol", "carol", 1, Some("urn:taskstream:schema:webhook.registered:v1")),
        json!({"url": HOOK, "secret": secret}),
    )
    .await?;
    // A task of carol's with eleven events and no ce_dataschema: "10" and "11" sort before "9" as strings.
    let task = uuid::Uuid::now_v7().to_string();
    send(task.clone(), old_headers("task.created", &task, "carol", 1, None), json!({"title": "old", "priority": "medium", "timezone": "UTC", "tags": []}))
        .await?;
    for seq in 2..=11u32 {
        send(task.clone(), old_headers("task.updated", &task, "carol", seq, None), json!({"title": format!("old {seq}")})).await?;
    }

    // Projected live, as they arrive.
    eventually("the old records to be projected", Duration::from_secs(30), || async {
        let mut db = stack.db().await.ok()?;
        let hook: Option<(String, String)> = sqlx::query_as("SELECT url, secret FROM webhooks WHERE user_id = 'carol'").fetch_optional(&mut db).await.ok()?;
        let version: Option<i32> = sqlx::query_scalar("SELECT version FROM tasks WHERE id = $1::uuid").bind(&task).fetch_optional(&mut db).await.ok()?;
        (hook == Some((HOOK.to_owned(), secret.to_owned())) && version == Some(11)).then_some(())
    })
    .await?;
    let data = stack.query("carol", "query($id: ID!) { task(id: $id) { title version } }", json!({"id": task}), None).await?;
    assert_eq!(data["task"], json!({"title": "old 11", "version": 11}));

    // Restored by a restarted command API: the task is at version 11 and the webhook is registered.
    stack.restart(Svc::CommandApi).await?;
    let (s, _, b) = stack.command_retrying("carol", Method::PATCH, &format!("/v1/tasks/{task}"), Some(json!({"title": "new"}))).await?;
    assert_eq!((s, b["version"].as_u64()), (200, Some(12)), "{b}");
    let (s, _, b) = stack.command("carol", Method::DELETE, "/v1/webhook", None, &[]).await?;
    assert_eq!(s, 200, "the v1 registration was restored: {b}");
    let (s, _, b) = stack.command("carol", Method::PUT, "/v1/webhook", Some(json!({"url": HOOK, "secret": "v2-secret-0123456789"})), &[]).await?;
    assert_eq!(s, 200, "{b}");
    settled(&stack).await?;

    // New records are padded and in the current shape; the old ones are as they were written.
    let log = read_log(&stack).await?;
    let of_task: Vec<&str> = log.iter().filter(|r| r.key == task).map(|r| r.headers["ce_sequence"].as_str()).collect();
    let mut want: Vec<String> = (1..=11).map(|n| n.to_string()).collect();
    want.push(format!("{:020}", 12));
    assert_eq!(of_task, want);
    let hooks: Vec<(u32, &Value)> = log.iter().filter(|r| r.headers["ce_type"] == "webhook.registered").map(|r| (version_of(r), &r.value)).collect();
    assert_eq!(hooks.len(), 2, "{hooks:?}");
    assert_eq!(hooks[0], (1, &json!({"url": HOOK, "secret": secret})), "the old record as it was written");
    // The new one is sealed with carol's data key (named by ce_datakey).
    assert_eq!(hooks[1].0, 2);
    for field in ["url", "signing_secret"] {
        assert!(hooks[1].1[field].as_str().is_some_and(|v| v.starts_with("sealed:v1:")), "{field} is sealed: {:?}", hooks[1].1);
    }
    assert!(log.iter().any(|r| r.headers["ce_type"] == "webhook.registered" && r.headers.contains_key("ce_datakey")));
    // Both shapes are valid against the schema of the version they name.
    let records: Vec<Value> =
        log.iter().map(|r| json!({"type": r.headers["ce_type"], "version": version_of(r), "data": r.value, "headers": r.headers})).collect();
    validate(&records)?;

    // A rebuild from offset zero reads the old records the same way.
    let before = checksums(&stack, "").await?;
    let out = stack.projector_cli(&["rebuild", "--yes"]).output().await?;
    assert!(out.status.success(), "rebuild failed: {}", String::from_utf8_lossy(&out.stderr));
    settled(&stack).await?;
    assert_eq!(checksums(&stack, "").await?, before, "the rebuilt read models differ from the live ones");
    let mut db = stack.db().await?;
    let hook: (String, String) = sqlx::query_as("SELECT url, secret FROM webhooks WHERE user_id = 'carol'").fetch_one(&mut db).await?;
    // The current secret stays sealed in the read model, as the log holds it (the deliverer opens it).
    assert_eq!(hook, (HOOK.to_owned(), hooks[1].1["signing_secret"].as_str().unwrap_or_default().to_owned()));
    stack.cleanup().await
}
