//! The command API over its event log: ordering under concurrency, log outages (503 with
//! `Retry-After`, nothing appended) and restarts (versions and ownership restored from the log).

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use serde_json::json;

use test_support::eventually;

use command_api::writer::WriterConfig;

use crate::helpers::{assert_problem, build_app, build_app_with, problem_type, spawn_app, spawn_app_over, FakeLog, ALICE, BOB};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forty_concurrent_patches_get_versions_2_to_41_exactly_once() {
    let app = Arc::new(spawn_app().await);
    let id = app.create_task(ALICE, "hot").await;
    let handles: Vec<_> = (0..40)
        .map(|i| {
            let (app, id) = (app.clone(), id.clone());
            tokio::spawn(async move { app.patch(ALICE, &id, json!({"title": format!("edit {i}")}), &[]).await })
        })
        .collect();
    let mut versions = Vec::new();
    for h in handles {
        let r = h.await.unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.header("etag"), Some(format!("\"{}\"", r.version()).as_str()));
        versions.push(r.version());
    }
    versions.sort_unstable();
    assert_eq!(versions, (2..=41).collect::<Vec<u64>>());
    let records = app.log.records_of(&id);
    let seqs: Vec<String> = records.iter().map(|r| r.header("ce_sequence").unwrap()).collect();
    assert_eq!(seqs, (1..=41).map(platform::codec::format_sequence).collect::<Vec<_>>(), "ce_sequence contiguous in log order");
    assert!(records.windows(2).all(|w| w[0].position.partition == w[1].position.partition && w[1].position.offset > w[0].position.offset));
}

#[tokio::test]
async fn an_unavailable_log_is_503_with_retry_after_and_nothing_appended_until_it_recovers() {
    let app = spawn_app().await;
    let id = app.create_task(ALICE, "t").await;
    app.log.set_down(true);

    let r = app.complete(ALICE, &id, &[]).await;
    assert_problem(&r, 503);
    assert_eq!(problem_type(&r), "urn:taskstream:problem:log-unavailable");
    let retry_after: u64 = r.header("retry-after").expect("Retry-After").parse().expect("Retry-After in seconds");
    assert!(retry_after >= 1);
    assert!(!r.text.contains("test fake"), "the cause is logged, not sent: {}", r.text);
    assert!(app.log.failed_appends() >= 1);
    for r in [
        app.send(Some(ALICE), "POST", "/v1/tasks", Some(&json!({"title": "during outage"})), &[]).await,
        app.patch(ALICE, &id, json!({"title": "during outage"}), &[]).await,
        app.send(Some(ALICE), "POST", "/v1/tasks", Some(&json!({"title": "keyed"})), &[("Idempotency-Key", "outage")]).await,
    ] {
        assert_problem(&r, 503);
        assert!(r.header("retry-after").is_some());
    }
    // Readiness reports the outage too.
    eventually("readyz to report the outage", Duration::from_secs(10), || async {
        (app.get("/readyz").await.status == StatusCode::SERVICE_UNAVAILABLE).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(app.log.len(), 1, "nothing was appended while the log was down");

    app.log.set_down(false);
    let r = app.until_ok("a command to succeed after the log recovers", || app.complete(ALICE, &id, &[])).await;
    assert_eq!(r.version(), 2, "the refused commands left no trace in the task's versions");
    app.wait_ready().await;
    // The keyed command that was refused with 503 was not remembered: it executes now.
    let keyed = app.send(Some(ALICE), "POST", "/v1/tasks", Some(&json!({"title": "keyed"})), &[("Idempotency-Key", "outage")]).await;
    assert_eq!(keyed.status, StatusCode::CREATED, "{}", keyed.text);
    assert!(keyed.header("idempotent-replayed").is_none());
    let seqs: Vec<u32> = app.log.envelopes().iter().filter(|e| e.subject.to_string() == id).map(|e| e.meta.sequence).collect();
    assert_eq!(seqs, [1, 2]);
    assert_eq!(app.log.len(), 3);
}

#[tokio::test]
async fn an_app_started_while_the_log_is_down_answers_503_then_becomes_ready() {
    let log = FakeLog::default();
    log.set_down(true);
    let app = build_app(log);
    assert_eq!(app.get("/readyz").await.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(app.get("/healthz").await.status, StatusCode::OK, "alive even when not ready");
    let r = app.send(Some(ALICE), "POST", "/v1/tasks", Some(&json!({"title": "too early"})), &[]).await;
    assert_problem(&r, 503);
    assert!(r.header("retry-after").is_some());
    assert_eq!(app.log.len(), 0);
    app.log.set_down(false);
    app.wait_ready().await;
    assert_eq!(app.create(ALICE, json!({"title": "now"})).await.version(), 1);
}

#[tokio::test]
async fn a_restarted_app_continues_versions_and_ownership_from_the_log() {
    let app = spawn_app().await;
    let id = app.create_task(ALICE, "long lived").await;
    assert_eq!(app.patch(ALICE, &id, json!({"priority": "high"}), &[]).await.version(), 2);
    assert_eq!(app.complete(ALICE, &id, &[]).await.version(), 3);
    let gone = app.create_task(ALICE, "to delete").await;
    assert_eq!(app.delete(ALICE, &gone, &[]).await.version(), 2);
    let log = app.log.clone();
    drop(app);

    let app = spawn_app_over(log).await;
    assert_problem(&app.complete(ALICE, &id, &[]).await, 409);
    let r = app.reopen(ALICE, &id, &[]).await;
    assert_eq!((r.status, r.version()), (StatusCode::OK, 4), "{}", r.text);
    assert_eq!(app.patch(ALICE, &id, json!({"title": "after restart"}), &[("If-Match", "\"4\"")]).await.version(), 5);
    assert_problem(&app.patch(BOB, &id, json!({"title": "bob"}), &[]).await, 404);
    assert_problem(&app.patch(ALICE, &gone, json!({"title": "zombie"}), &[]).await, 409);
    assert_problem(&app.send(Some(ALICE), "POST", "/v1/tasks", Some(&json!({"task_id": id, "title": "dup"})), &[]).await, 409);
    let seqs: Vec<String> = app.log.records_of(&id).iter().map(|r| r.header("ce_sequence").unwrap()).collect();
    assert_eq!(seqs, (1..=5).map(platform::codec::format_sequence).collect::<Vec<_>>());

    // And once more, over the records of both runs.
    let log = app.log.clone();
    drop(app);
    let app = spawn_app_over(log).await;
    assert_eq!(app.complete(ALICE, &id, &[]).await.version(), 6);
}

#[tokio::test]
async fn a_restart_restores_each_partition_from_its_snapshot_and_the_tail() {
    let config = WriterConfig { max_batch: 100, snapshot_every_events: 3, ..WriterConfig::default() };
    let app = build_app_with(FakeLog::default(), config.clone());
    app.wait_ready().await;
    let mut tasks = Vec::new();
    for i in 0..30 {
        let r = app.create(ALICE, json!({"title": format!("task {i}")})).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        tasks.push(r.task_id());
    }
    let keyed = app.send(Some(ALICE), "POST", "/v1/tasks", Some(&json!({"title": "keyed"})), &[("Idempotency-Key", "snap-1")]).await;
    assert_eq!(keyed.status, StatusCode::CREATED);
    for t in &tasks[..10] {
        assert_eq!(app.complete(ALICE, t, &[]).await.version(), 2);
    }
    let gone = tasks[10].clone();
    assert_eq!(app.delete(ALICE, &gone, &[]).await.version(), 2);
    let log = app.log.clone();
    drop(app);
    assert!(!log.snapshot_partitions().is_empty(), "no partition recorded a snapshot");
    // Only the snapshots know the early records now.
    assert!(log.drop_records_covered_by_snapshots() > 0);

    let app = build_app_with(log, config);
    app.wait_ready().await;
    assert_problem(&app.complete(ALICE, &tasks[0], &[]).await, 409);
    assert_eq!(app.reopen(ALICE, &tasks[0], &[]).await.version(), 3);
    assert_eq!(app.complete(ALICE, &tasks[20], &[]).await.version(), 2);
    assert_problem(&app.patch(BOB, &tasks[21], json!({"title": "bob"}), &[]).await, 404);
    assert_problem(&app.patch(ALICE, &gone, json!({"title": "zombie"}), &[]).await, 409);
    // The Idempotency-Key answer survived in the snapshot (or the tail).
    let again = app.send(Some(ALICE), "POST", "/v1/tasks", Some(&json!({"title": "keyed"})), &[("Idempotency-Key", "snap-1")]).await;
    assert_eq!((again.status, again.task_id(), again.header("idempotent-replayed")), (StatusCode::CREATED, keyed.task_id(), Some("true")));
}

#[tokio::test]
async fn an_undecodable_record_stops_writes_to_its_stream_until_an_operator_releases_it() {
    let app = spawn_app().await;
    let broken = app.create_task(ALICE, "broken").await;
    let fine = app.create_task(ALICE, "fine").await;
    let log = app.log.clone();
    drop(app);
    let at = log.push_raw(&broken, b"{not json", rdkafka::message::OwnedHeaders::new());

    // The writer does not forget the task (it could accept a second create): it refuses writes to it.
    let app = spawn_app_over(log.clone()).await;
    let r = app.complete(ALICE, &broken, &[]).await;
    assert_problem(&r, 503);
    assert!(r.text.contains(&format!("partition {}, offset {}", at.partition, at.offset)), "{}", r.text);
    assert_problem(&app.send(Some(ALICE), "POST", "/v1/tasks", Some(&json!({"task_id": broken, "title": "again"})), &[]).await, 503);
    assert_eq!(app.complete(ALICE, &fine, &[]).await.version(), 2, "other streams are not affected");
    drop(app);

    // The operator releases that record: it is skipped, the stream is writable again.
    let config = WriterConfig { max_batch: 100, released: [(at.partition, at.offset)].into_iter().collect(), ..WriterConfig::default() };
    let app = build_app_with(log, config);
    app.wait_ready().await;
    assert_eq!(app.complete(ALICE, &broken, &[]).await.version(), 2);
}

/// Creates 48 tasks at once (spread over the partitions) on an app whose log takes 30 ms per append;
/// returns how many appends were in flight at most, after checking every create succeeded.
async fn most_transactions_in_flight(slots: Option<usize>) -> usize {
    let config = WriterConfig { max_batch: 100, transaction_slots: slots.map(|n| Arc::new(tokio::sync::Semaphore::new(n))), ..WriterConfig::default() };
    let app = Arc::new(build_app_with(FakeLog::default(), config));
    app.wait_ready().await;
    app.log.set_append_delay_ms(30);
    let handles: Vec<_> = (0..48)
        .map(|i| {
            let app = app.clone();
            tokio::spawn(async move { app.create(ALICE, json!({"title": format!("task {i}")})).await })
        })
        .collect();
    for h in handles {
        let r = h.await.unwrap();
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    }
    assert_eq!(app.log.len(), 48);
    app.log.most_appends_in_flight()
}

#[tokio::test]
async fn the_instance_keeps_at_most_its_transaction_slots_in_flight_and_every_command_still_commits() {
    assert!(most_transactions_in_flight(None).await > 2, "without a limit, the partitions' writers commit in parallel");
    assert_eq!(most_transactions_in_flight(Some(2)).await, 2);
    assert_eq!(most_transactions_in_flight(Some(1)).await, 1);
}

/// `./dev chaos` (kafka-kill) found 2xx commands missing from the log: the broker, killed right after
/// it acknowledged a commit, lost that transaction's commit markers when it restarted; the writer's
/// next transaction joined the transaction left open, timed out, and its abort took the acknowledged
/// records along. The writer must see that its last transaction is not closed in the log and
/// recover (closing it as committed) before it appends again.
#[tokio::test]
async fn an_acknowledged_command_survives_a_broker_restart_that_lost_its_commit_markers() {
    let app = spawn_app().await;
    let id = app.create_task(ALICE, "before").await;
    app.log.lose_next_commit_markers(crate::helpers::partition_for(&id));
    let r = app.patch(ALICE, &id, json!({"title": "acknowledged, markers lost"}), &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    app.log.set_down(true);
    let r = app.patch(ALICE, &id, json!({"title": "while the broker is away"}), &[]).await;
    assert_problem(&r, 503);
    app.log.set_down(false);
    let r = app.until_ok("a command to succeed after the broker is back", || app.patch(ALICE, &id, json!({"title": "after"}), &[])).await;
    assert_eq!(r.version(), 3);
    let seqs: Vec<u32> = app.log.envelopes().iter().filter(|e| e.subject.to_string() == id).map(|e| e.meta.sequence).collect();
    assert_eq!(seqs, [1, 2, 3], "the acknowledged update is still in the log, and versions are contiguous");
}

/// The same with the broker up: the writer recovers on its own after the batch whose markers were
/// lost, and the partition is ready again for the next commands.
#[tokio::test]
async fn after_lost_commit_markers_the_writer_recovers_and_the_partition_serves_again() {
    let app = spawn_app().await;
    let id = app.create_task(ALICE, "before").await;
    app.log.lose_next_commit_markers(crate::helpers::partition_for(&id));
    let r = app.patch(ALICE, &id, json!({"title": "acknowledged, markers lost"}), &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = app.until_ok("the partition to serve again", || app.patch(ALICE, &id, json!({"title": "next"}), &[])).await;
    assert_eq!(r.version(), 3);
    app.wait_ready().await;
    let seqs: Vec<u32> = app.log.envelopes().iter().filter(|e| e.subject.to_string() == id).map(|e| e.meta.sequence).collect();
    assert_eq!(seqs, [1, 2, 3]);
}
