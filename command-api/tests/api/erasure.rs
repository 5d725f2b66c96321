//! `DELETE /v1/me`: the erasure is appended (naming the destroyed keys) and the keys go; the user's
//! old tasks are gone for the writers, also after a restart from the log or from a snapshot, while
//! another user's stay; the user's next command starts a fresh identity with a new key.

use serde_json::{json, Value};

use command_api::writer::WriterConfig;
use platform::keys::{DataKeys, KeyError, DATA_KEY_HEADER};

use crate::helpers::{build_app_with, spawn_app, spawn_app_over, KEYS};

// Users of their own: the data keys are shared by every test of this binary (one keys "topic"),
// and an erasure destroys all of a user's keys.
const ALICE: &str = "erin";
const BOB: &str = "frank";

#[tokio::test]
async fn an_erased_users_tasks_are_gone_and_their_next_command_starts_afresh() {
    let app = spawn_app().await;
    let old = app.create_task(ALICE, "to be forgotten").await;
    let bobs = app.create_task(BOB, "kept").await;
    let key: uuid::Uuid = app.log.records_of(&old)[0].header(DATA_KEY_HEADER).expect("sealed").parse().unwrap();

    let erased = app.send(Some(ALICE), "DELETE", "/v1/me", None, &[]).await;
    assert_eq!(erased.status, 200, "{}", erased.body);
    assert!(erased.body["erasure_id"].is_string() && erased.body["position"].is_string(), "{}", erased.body);
    let record = app.log.records().into_iter().find(|r| r.header("ce_type").as_deref() == Some("user.erased")).expect("user.erased appended");
    assert_eq!(record.key, ALICE);
    assert!(record.header(DATA_KEY_HEADER).is_none(), "the erasure itself is readable without any key");
    let data: Value = serde_json::from_slice(&record.payload).unwrap();
    assert_eq!(data, json!({"data_keys": [key]}));
    assert!(matches!(KEYS.data_key(&key), Err(KeyError::Erased(_))), "the key is destroyed");

    // The old task no longer exists; Bob's does.
    assert_eq!(app.complete(ALICE, &old, &[]).await.status, 404);
    assert_eq!(app.complete(BOB, &bobs, &[]).await.status, 200);
    // A fresh identity: a new key, and the old id may be used again.
    let again = app.create(ALICE, json!({"task_id": old, "title": "a new start"})).await;
    assert_eq!(again.status, 201, "{}", again.body);
    let new_key = app.log.records_of(&old).last().unwrap().header(DATA_KEY_HEADER).unwrap();
    assert_ne!(new_key, key.to_string());

    // After a restart from the log, the erased records are nothing (not a blocked stream).
    let log = app.log.clone();
    drop(app);
    let app = spawn_app_over(log.clone()).await;
    assert_eq!(app.complete(ALICE, &old, &[]).await.version(), 2, "the new task, at version 2: the erased events count for nothing");
    assert_eq!(app.reopen(BOB, &bobs, &[]).await.status, 200);
}

#[tokio::test]
async fn a_snapshot_holds_sealed_states_and_forgets_erased_tasks_on_restore() {
    let config = || WriterConfig { max_batch: 100, snapshot_every_events: 1, ..WriterConfig::default() };
    let app = build_app_with(Default::default(), config());
    app.wait_ready().await;
    let old = app.create_task("gina", "snapshot-marker-title").await;
    let bobs = app.create_task("hal", "bob-snapshot-title").await;
    assert_eq!(app.send(Some("gina"), "DELETE", "/v1/me", None, &[]).await.status, 200);
    let log = app.log.clone();
    drop(app);
    // Restore from the snapshots alone: the log before them is gone.
    assert!(log.drop_records_covered_by_snapshots() > 0);
    let snapshots = log.snapshot_bytes();
    assert!(!snapshots.is_empty());
    for s in &snapshots {
        let text = String::from_utf8_lossy(s);
        assert!(!text.contains("snapshot-marker-title") && !text.contains("bob-snapshot-title"), "a snapshot holds a title in plain text: {text}");
    }
    let app = build_app_with(log, config());
    app.wait_ready().await;
    assert_eq!(app.complete("gina", &old, &[]).await.status, 404);
    assert_eq!(app.complete("hal", &bobs, &[]).await.version(), 2);
}
