//! Personal data in an immutable log, end to end against the real broker and PostgreSQL: personal
//! fields and webhook secrets never reach the broker's disk in plain text, `DELETE /v1/me` erases a
//! user by destroying their data keys (and compaction removes the keys' records from disk within
//! the configured bound), a rebuild after the erasure equals the live read models, and a rotation of
//! the key-encryption key keeps every user's data readable.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

use e2e::{Stack, StackOptions, Svc};
use test_support::eventually;

use crate::lifecycle::checksums;
use crate::reactions::settled;

const TASK: &str = "query($id: ID!) { task(id: $id) { id title description tags } }";
const MINE: &str = "query { tasks(first: 50) { edges { node { id title } } } notifications(first: 50) { edges { node { id } } } stats { total } }";

/// The local broker's log directories (`./dev test` exports where they are).
fn kafka_data() -> PathBuf {
    PathBuf::from(test_support::required_env("TASKSTREAM_KAFKA_DATA"))
}

/// The files of the stack's topics (the log and every topic named after it: `.dlq`, `.updates`,
/// `.snapshots`, `.keys`, ...) on the broker's disk that contain `needle`.
fn topic_files_containing(topic: &str, needle: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, needle: &[u8], out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                walk(&path, needle, out);
            } else if std::fs::read(&path).is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle)) {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    let dirs = std::fs::read_dir(kafka_data()).expect("the broker's data directory").flatten();
    for d in dirs.filter(|d| d.file_name().to_string_lossy().starts_with(topic)) {
        walk(&d.path(), needle.as_bytes(), &mut out);
    }
    out
}

/// The partition directories of the stack's topics, as names (to show that the grep saw them).
fn topic_dirs(topic: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(kafka_data())
        .expect("the broker's data directory")
        .flatten()
        .map(|d| d.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(topic))
        .collect();
    names.sort();
    names
}

/// The wrapped data key of `user` in the keys topic's files (the `wrapped` field of its record).
fn wrapped_key_of(keys_topic: &str, user: &str) -> Option<String> {
    let marker = format!("\"user_id\":\"{user}\"");
    topic_files_containing(keys_topic, &marker).into_iter().find_map(|file| {
        let text = String::from_utf8_lossy(&std::fs::read(&file).ok()?).into_owned();
        let record = &text[text.find(&marker)?..];
        let wrapped = &record[record.find("\"wrapped\":\"")? + 11..];
        Some(wrapped[..wrapped.find('"')?].to_owned())
    })
}

/// `pg_dump` of the stack's database, as text.
async fn pg_dump(stack: &Stack) -> anyhow::Result<String> {
    let bin = std::env::var("TASKSTREAM_PG_DUMP").ok().map(PathBuf::from).or_else(|| {
        let mut found: Vec<PathBuf> =
            std::fs::read_dir("/usr/lib/postgresql").ok()?.flatten().map(|d| d.path().join("bin/pg_dump")).filter(|p| p.exists()).collect();
        found.sort();
        found.pop()
    });
    let out = tokio::process::Command::new(bin.unwrap_or_else(|| "pg_dump".into())).arg("--data-only").arg(&stack.database_url).output().await?;
    anyhow::ensure!(out.status.success(), "pg_dump failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn position(v: &Value) -> String {
    v["position"].as_str().expect("position").to_owned()
}

#[tokio::test]
async fn personal_data_is_sealed_on_disk_and_an_erasure_shreds_it() -> anyhow::Result<()> {
    // A short erasure bound, so compaction must remove the destroyed keys within the test.
    let opts = StackOptions {
        extra_env: vec![("DATA_KEYS_ERASURE_BOUND_MS".into(), "3000".into()), ("WEBHOOK_ALLOW_PRIVATE".into(), "true".into())],
        ..StackOptions::default()
    };
    let stack = Stack::start_with(opts).await?;
    let run = Uuid::new_v4().simple().to_string();
    let (alice, bob) = (format!("alice-{}", &run[..8]), format!("bob-{}", &run[..8]));
    let (title, description, tag) = (format!("title-marker-{run}"), format!("description-marker-{run}"), format!("tag{}", &run[..12]));
    let (secret, hook) = (format!("whsec-marker-{run}"), format!("http://127.0.0.1:9/hook-marker-{run}"));
    let bobs_title = format!("bobs-marker-{run}");

    let created = stack.create(&alice, json!({"title": title, "description": description, "tags": [tag]})).await?;
    let task = created["task_id"].as_str().unwrap().to_owned();
    let (s, _, set) = stack.command(&alice, Method::PUT, "/v1/webhook", Some(json!({"url": hook, "secret": secret})), &[]).await?;
    assert_eq!(s, 200, "{set}");
    let bobs = stack.create(&bob, json!({"title": bobs_title})).await?;

    // The owner reads her task in plain text.
    let data = stack.query(&alice, TASK, json!({"id": task}), Some(&position(&created))).await?;
    assert_eq!((data["task"]["title"].as_str(), data["task"]["description"].as_str()), (Some(title.as_str()), Some(description.as_str())));
    assert_eq!(data["task"]["tags"], json!([tag]));
    stack.query(&alice, MINE, json!({}), Some(&position(&set))).await?;

    // On the broker's disk, nothing of it in plain text: not in the log, the current-state topic,
    // the snapshots or the dead letters. (The task id is the record key: the grep does see the
    // records.)
    assert!(!topic_files_containing(&stack.topic, &task).is_empty(), "the grep finds the records ({:?})", topic_dirs(&stack.topic));
    for marker in [&title, &description, &tag, &secret, &hook] {
        assert_eq!(topic_files_containing(&stack.topic, marker), Vec::<PathBuf>::new(), "{marker} is on the broker's disk in plain text");
    }
    // Alice's data key, wrapped, as the keys topic holds it (what a KEK holder could use).
    let keys_topic = format!("{}.keys", stack.topic);
    let alices_key = wrapped_key_of(&keys_topic, &alice).expect("alice's wrapped data key is in the keys topic");
    assert!(alices_key.len() > 40, "{alices_key}");
    let dump = pg_dump(&stack).await?;
    assert!(dump.contains(&title), "the read models hold the title for the owner");

    // Erasure.
    let before_others = checksums(&stack, &alice).await?;
    let (s, _, erased) = stack.command(&alice, Method::DELETE, "/v1/me", None, &[]).await?;
    assert_eq!(s, 200, "{erased}");
    assert!(erased["erasure_id"].is_string(), "{erased}");
    let data = stack.query(&alice, MINE, json!({}), Some(&position(&erased))).await?;
    assert_eq!(data["tasks"]["edges"], json!([]), "{data}");
    assert_eq!(data["stats"]["total"], 0, "{data}");
    let data = stack.query(&alice, TASK, json!({"id": task}), None).await?;
    assert_eq!(data["task"], Value::Null);
    // Commands on the erased identity's task: it no longer exists.
    let (s, _, b) = stack.command(&alice, Method::POST, &format!("/v1/tasks/{task}/complete"), None, &[]).await?;
    assert_eq!(s, 404, "{b}");
    // Another user is untouched.
    let data = stack.query(&bob, TASK, json!({"id": bobs["task_id"]}), None).await?;
    assert_eq!(data["task"]["title"].as_str(), Some(bobs_title.as_str()));
    settled(&stack).await?;
    assert_eq!(checksums(&stack, &alice).await?, before_others, "another user's rows changed");
    let dump = pg_dump(&stack).await?;
    for marker in [&title, &description, &tag, &secret, &hook, &task] {
        assert!(!dump.contains(marker.as_str()), "{marker} is still in PostgreSQL after the erasure");
    }

    // Within the bound, compaction removes the destroyed key's record from the broker's disk.
    eventually("the erased data key to leave the broker's disk", Duration::from_secs(120), || async {
        topic_files_containing(&keys_topic, &alices_key).is_empty().then_some(())
    })
    .await?;
    for marker in [&title, &description, &tag, &secret, &hook] {
        assert_eq!(topic_files_containing(&stack.topic, marker), Vec::<PathBuf>::new(), "{marker} on disk after the erasure");
    }

    // A fresh identity: the user's next command starts afresh.
    let again = stack.create(&alice, json!({"title": "after the erasure"})).await?;
    let data = stack.query(&alice, MINE, json!({}), Some(&position(&again))).await?;
    assert_eq!(data["tasks"]["edges"].as_array().map(Vec::len), Some(1), "{data}");

    // A rebuild from offset zero yields the live read models: the erased events project to nothing.
    settled(&stack).await?;
    let live = checksums(&stack, "nobody").await?;
    let out = stack.projector_cli(&["rebuild", "--yes"]).output().await?;
    assert!(out.status.success(), "rebuild failed: {}", String::from_utf8_lossy(&out.stderr));
    settled(&stack).await?;
    assert_eq!(checksums(&stack, "nobody").await?, live, "the rebuilt read models differ from the live ones");
    let mut db = stack.db().await?;
    let letters: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters").fetch_one(&mut db).await?;
    assert_eq!(letters, 0, "erased events are not dead letters");
    stack.cleanup().await
}

#[tokio::test]
async fn a_key_encryption_key_rotation_keeps_every_users_data_readable() -> anyhow::Result<()> {
    const K1: &str = "test1:dGFza3N0cmVhbS10ZXN0LWtlay0xLTMyLWJ5dGVzISE";
    const K2: &str = "test2:dGFza3N0cmVhbS10ZXN0LWtlay0yLTMyLWJ5dGVzISE";
    let mut stack = Stack::start_with(StackOptions { extra_env: vec![("TASKSTREAM_KEK".into(), K1.into())], ..StackOptions::default() }).await?;
    let mut tasks = Vec::new();
    for user in ["carol", "dave"] {
        let t = stack.create(user, json!({"title": format!("{user}'s secret plan"), "tags": ["x"]})).await?;
        tasks.push((user, t["task_id"].as_str().unwrap().to_owned(), position(&t)));
    }
    for (user, id, pos) in &tasks {
        stack.query(user, TASK, json!({"id": id}), Some(pos)).await?;
    }
    settled(&stack).await?;

    // Rotation: the new key first, the old one kept; every data key wrapped again; then the old
    // key dropped.
    stack.set_env("TASKSTREAM_KEK", &format!("{K2},{K1}"));
    let out = stack.projector_cli(&["rewrap-keys"]).output().await?;
    assert!(out.status.success(), "rewrap-keys failed: {}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.starts_with("2 of 2 data keys"), "{said}");
    stack.set_env("TASKSTREAM_KEK", K2);
    for svc in [Svc::CommandApi, Svc::Projector] {
        stack.restart(svc).await?;
    }
    // The command API restored its state with the new key only: the tasks are there to change.
    for (user, id, _) in &tasks {
        let (s, _, b) = stack.command_retrying(user, Method::PATCH, &format!("/v1/tasks/{id}"), Some(json!({"description": "rotated"}))).await?;
        assert_eq!(s, 200, "{b}");
        let data = stack.query(user, TASK, json!({"id": id}), Some(&position(&b))).await?;
        assert_eq!(data["task"]["title"].as_str(), Some(format!("{user}'s secret plan").as_str()));
        assert_eq!(data["task"]["description"].as_str(), Some("rotated"));
    }
    // And a rebuild with the new key only reads everything back.
    settled(&stack).await?;
    let live = checksums(&stack, "nobody").await?;
    let out = stack.projector_cli(&["rebuild", "--yes"]).output().await?;
    assert!(out.status.success(), "rebuild failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(checksums(&stack, "nobody").await?, live);
    // Without any key that can unwrap them, the services refuse to start rather than treat the
    // users' data as erased.
    stack.set_env("TASKSTREAM_KEK", "other:dGFza3N0cmVhbS10ZXN0LWtlay05LTMyLWJ5dGVzISE");
    let out = stack.projector_cli(&["rewrap-keys"]).output().await?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not hold") && err.contains("TASKSTREAM_KEK"), "{err}");
    stack.cleanup().await
}
