//! The current-state topic against the real broker (issue 13, part 3): after tasks are created,
//! updated, completed, reopened and deleted over HTTP, `task-updates` (read_committed) holds, per
//! task, one record per accepted command in the partition of the task's events, the latest being
//! the task as GraphQL shows it (a tombstone after a delete), with the CloudEvents headers, and
//! every value valid against schemas/events/task.state.v1.json. (The recurring task is not
//! completed: its next occurrence, created later by the projector's reaction, would race the read.) The topic is compacted and has the
//! log's partitions; user-level events write nothing to it.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use reqwest::Method;
use serde_json::{json, Value};

use e2e::Stack;

use crate::catalogue::validate;
use crate::reactions::settled;

struct Rec {
    partition: i32,
    key: String,
    headers: BTreeMap<String, String>,
    value: Option<Value>,
}

/// Every committed record of `topic`, by partition in offset order, read to the end of every
/// partition (the callers have waited for the commands' answers, so every transaction is committed).
async fn read_topic(stack: &Stack, topic: &str) -> anyhow::Result<Vec<Rec>> {
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &stack.brokers)
        .set("group.id", format!("e2e-updates-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .create()?;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions = md.topics().first().map(|t| t.partitions().len()).unwrap_or(0);
    anyhow::ensure!(partitions > 0, "topic {topic} has no partitions");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut out = Vec::new();
    let mut at_end = std::collections::HashSet::new();
    while at_end.len() < partitions {
        match tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await {
            Err(_) => anyhow::bail!("{topic}: no end of partition after 30 s ({} of {partitions} read)", at_end.len()),
            Ok(Err(KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok(m)) => {
                let headers = m
                    .headers()
                    .map(|h| h.iter().map(|h| (h.key.to_owned(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())).collect())
                    .unwrap_or_default();
                let value = m.payload().map(serde_json::from_slice).transpose()?;
                out.push(Rec { partition: m.partition(), key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(), headers, value });
            }
        }
    }
    Ok(out)
}

fn time(v: &Value) -> Option<DateTime<Utc>> {
    v.as_str().map(|s| s.parse().expect("an RFC 3339 time"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_updates_holds_each_tasks_latest_state_as_graphql_shows_it_and_a_tombstone_after_delete() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let updates_topic = platform::settings::updates_topic_for(&stack.topic);

    let full = json!({"title": "everything", "description": "all\nfields", "priority": "urgent", "due_at": "2031-02-03T04:05:06Z",
                      "timezone": "Europe/Berlin", "recurrence": "FREQ=WEEKLY;BYDAY=MO", "remind_before": "P1DT2H", "tags": ["a", "b"]});
    let a = stack.create("ann", full).await?["task_id"].as_str().expect("task_id").to_owned();
    let b = stack.create("ann", json!({"title": "plain"})).await?["task_id"].as_str().expect("task_id").to_owned();
    let c = stack.create("bob", json!({"title": "doomed", "tags": ["x"]})).await?["task_id"].as_str().expect("task_id").to_owned();
    let d = stack.create("ann", json!({"title": "finished", "priority": "high"})).await?["task_id"].as_str().expect("task_id").to_owned();
    let mut accepted: HashMap<String, usize> = [(a.clone(), 1), (b.clone(), 1), (c.clone(), 1), (d.clone(), 1)].into();
    let mut last_position = String::new();
    for (user, task, method, path, body) in [
        ("ann", &a, Method::PATCH, "", Some(json!({"title": "set", "priority": "low", "tags": ["c"], "remind_before": "PT30M"}))),
        ("ann", &a, Method::PATCH, "", Some(json!({"description": "still all fields"}))),
        ("ann", &d, Method::POST, "/complete", None),
        ("ann", &b, Method::POST, "/complete", None),
        ("ann", &b, Method::POST, "/reopen", None),
        ("ann", &b, Method::PATCH, "", Some(json!({"description": "now described", "due_at": null}))),
        ("bob", &c, Method::POST, "/complete", None),
        ("bob", &c, Method::DELETE, "", None),
    ] {
        let (s, _, body) = stack.command(user, method, &format!("/v1/tasks/{task}{path}"), body, &[]).await?;
        anyhow::ensure!(s == 200, "{task}{path}: {s} {body}");
        *accepted.get_mut(task).unwrap() += 1;
        last_position = body["position"].as_str().unwrap_or_default().to_owned();
    }
    // Refused (409: already completed): no record.
    let (s, _, _) = stack.command("ann", Method::POST, &format!("/v1/tasks/{d}/complete"), None, &[]).await?;
    assert_eq!(s, 409);
    // User-level events (webhook registration, keyed by the user id): no record.
    let (s, _, body) = stack.command("ben", Method::PUT, "/v1/webhook", Some(json!({"url": "https://93.184.216.34/taskstream"})), &[]).await?;
    anyhow::ensure!(s == 200, "webhook: {s} {body}");
    settled(&stack).await?;

    let events = read_topic(&stack, &stack.topic).await?;
    let updates = read_topic(&stack, &updates_topic).await?;
    let event_partition: HashMap<&str, i32> = events.iter().map(|r| (r.key.as_str(), r.partition)).collect();
    let mut by_task: HashMap<&str, Vec<&Rec>> = HashMap::new();
    for r in &updates {
        by_task.entry(r.key.as_str()).or_default().push(r);
    }
    assert!(!by_task.contains_key("ben"), "a user-level event wrote to task-updates");
    assert_eq!(by_task.len(), accepted.len(), "records of other keys: {:?}", by_task.keys().collect::<Vec<_>>());

    let mut to_validate = Vec::new();
    for (task, count) in &accepted {
        let recs = &by_task[task.as_str()];
        assert_eq!(recs.len(), *count, "{task}: one record per accepted command");
        for (i, r) in recs.iter().enumerate() {
            let h = &r.headers;
            assert_eq!(r.partition, event_partition[task.as_str()], "{task}: in the partition of its events");
            assert_eq!((h["ce_specversion"].as_str(), h["ce_type"].as_str(), h["ce_subject"].as_str()), ("1.0", "task.state", task.as_str()));
            assert_eq!(h["ce_dataschema"], "urn:taskstream:schema:task.state:v1");
            assert_eq!(h["ce_sequence"], format!("{:020}", i + 1), "{task}: ce_sequence is the version after the command");
            assert_eq!(h["ce_source"], "/taskstream/command-api");
            assert!(h.contains_key("ce_id") && h.contains_key("ce_time") && h.contains_key("ce_userid"));
            if let Some(v) = &r.value {
                assert_eq!(h.get("content-type").map(String::as_str), Some("application/json"));
                assert_eq!(v["version"].as_u64(), Some(i as u64 + 1));
                to_validate.push(json!({"type": "task.state", "version": 1, "data": v, "headers": h}));
            }
        }
    }

    // The latest value per key: the task as GraphQL shows it; the deleted one a tombstone.
    assert!(by_task[c.as_str()].last().unwrap().value.is_none(), "a tombstone after the delete");
    assert!(by_task[c.as_str()][..2].iter().all(|r| r.value.is_some()));
    let q = "query($id: ID!) { task(id: $id) { title description status priority dueAt timezone recurrence remindAt tags version createdAt updatedAt completedAt } }";
    for (user, task) in [("ann", &a), ("ann", &b), ("ann", &d)] {
        let view = by_task[task.as_str()].last().unwrap().value.clone().expect("a live task's state");
        let g = stack.query(user, q, json!({"id": task}), Some(&last_position)).await?["task"].clone();
        assert_eq!(view["task_id"].as_str(), Some(task.as_str()));
        assert_eq!(view["owner"].as_str(), Some(user));
        for (field, gql) in [("timezone", "timezone"), ("recurrence", "recurrence"), ("version", "version")] {
            assert_eq!(view[field], g[gql], "{task}: {field}");
        }
        // The personal fields are sealed with the owner's data key: an outside consumer sees
        // neither the text nor its length class beyond the ciphertext; GraphQL shows the owner.
        let sealed = |v: &Value| v.as_str().is_some_and(|s| s.starts_with("sealed:v1:"));
        assert!(sealed(&view["title"]) && g["title"].as_str().is_some_and(|t| !t.is_empty()), "{task}: title {view}");
        assert!(
            view["description"].is_null() == g["description"].is_null() && (view["description"].is_null() || sealed(&view["description"])),
            "{task}: description"
        );
        let tags = view["tags"].as_array().expect("tags");
        assert_eq!(tags.len(), g["tags"].as_array().map_or(0, Vec::len), "{task}: tags");
        assert!(tags.iter().all(sealed), "{task}: tags {view}");
        for (field, gql) in [("status", "status"), ("priority", "priority")] {
            assert_eq!(view[field].as_str().map(str::to_lowercase), g[gql].as_str().map(str::to_lowercase), "{task}: {field}");
        }
        for (field, gql) in
            [("due_at", "dueAt"), ("remind_at", "remindAt"), ("created_at", "createdAt"), ("updated_at", "updatedAt"), ("completed_at", "completedAt")]
        {
            assert_eq!(time(&view[field]), time(&g[gql]), "{task}: {field}");
        }
    }
    let a_view = by_task[a.as_str()].last().unwrap().value.clone().unwrap();
    assert_eq!(a_view["recurrence"].as_str(), Some("FREQ=WEEKLY;BYDAY=MO"));
    // The sealed title and description are the latest ones (as their owner reads them).
    let g = stack.query("ann", q, json!({"id": a}), Some(&last_position)).await?["task"].clone();
    assert_eq!((g["title"].as_str(), g["description"].as_str()), (Some("set"), Some("still all fields")));
    assert_ne!(a_view["title"], by_task[a.as_str()][0].value.as_ref().unwrap()["title"], "each state is sealed afresh");
    let d_view = by_task[d.as_str()].last().unwrap().value.clone().unwrap();
    assert_eq!((d_view["status"].as_str(), d_view["completed_at"].is_string()), (Some("completed"), true));

    let report = validate(&to_validate)?;
    assert!(report.contains(&format!("{} record(s) checked, 0 invalid", to_validate.len())), "{report}");

    // Compacted, with the log's partitions.
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new().set("bootstrap.servers", &stack.brokers).create()?;
    let described = admin.describe_configs(&[ResourceSpecifier::Topic(&updates_topic)], &AdminOptions::new()).await?;
    let config = described.into_iter().next().expect("one resource").map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(config.get("cleanup.policy").and_then(|e| e.value.as_deref()), Some("compact"));
    let md = admin.inner().fetch_metadata(Some(&updates_topic), Duration::from_secs(10))?;
    assert_eq!(md.topics()[0].partitions().len(), 4, "as many partitions as the log");
    stack.cleanup().await
}
