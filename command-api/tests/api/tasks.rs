//! The task routes (`POST /v1/tasks`, `PATCH`/`DELETE /v1/tasks/{id}`, `.../complete`,
//! `.../reopen`): success answers and the records they append (CloudEvents headers, key,
//! sequence), the same 404 for unknown and other users' tasks, 409 for commands that conflict
//! with the task's state.

use std::collections::HashSet;

use axum::http::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

use domain::TaskEvent;
use platform::position::Position;

use crate::helpers::{assert_field_error, assert_problem, partition_for, problem_type, spawn_app, Resp, ALICE, BOB};

#[tokio::test]
async fn create_answers_201_with_id_version_position_location_and_etag() {
    let app = spawn_app().await;
    let r = app.create(ALICE, json!({"title": "Buy milk"})).await;
    assert_eq!(r.header("content-type"), Some("application/json"));
    let id = r.task_id();
    let uuid = Uuid::parse_str(&id).expect("task_id is a UUID");
    assert_eq!(uuid.get_version_num(), 7, "generated ids are time-ordered UUID v7");
    assert_eq!(r.version(), 1);
    let position = Position::from_token(r.body["position"].as_str().expect("position is a string")).expect("position decodes");
    assert_eq!(r.header("location"), Some(format!("/v1/tasks/{id}").as_str()));
    assert_eq!(r.header("etag"), Some("\"1\""));
    assert!(r.header("idempotent-replayed").is_none());
    assert_eq!(r.body.as_object().unwrap().len(), 3, "exactly task_id, version, position: {}", r.text);

    let records = app.log.records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].key, id);
    assert_eq!(records[0].position, position, "the position is where the event landed");
    assert_eq!(position.partition, partition_for(&id));

    // A client-chosen id is honoured.
    let chosen = Uuid::new_v4().to_string();
    let r = app.create(ALICE, json!({"task_id": chosen, "title": "Chosen id"})).await;
    assert_eq!(r.task_id(), chosen);
    assert_eq!(r.version(), 1);
    assert_eq!(r.header("location"), Some(format!("/v1/tasks/{chosen}").as_str()));
    assert_eq!(app.log.records_of(&chosen).len(), 1);

    // A full body with every optional field is accepted and recorded as parsed.
    let full = json!({
        "title": "  Weekly review  ", "description": "line 1\nline 2", "priority": "urgent",
        "due_at": "2030-01-07T09:00:00+01:00", "timezone": "Europe/Berlin",
        "recurrence": "FREQ=WEEKLY;BYDAY=MO", "remind_before": "PT30M", "tags": ["work", "work", " home "]
    });
    let id = app.create(ALICE, full).await.task_id();
    let env = app.log.records_of(&id)[0].decode().unwrap();
    let TaskEvent::Created(t) = env.event else { panic!("expected task.created") };
    assert_eq!(t.title.as_ref(), "Weekly review");
    assert_eq!(t.priority, domain::Priority::Urgent);
    assert_eq!(t.due_at.unwrap().to_rfc3339(), "2030-01-07T08:00:00+00:00");
    assert_eq!(t.timezone.name(), "Europe/Berlin");
    assert_eq!(t.recurrence.unwrap().as_ref(), "FREQ=WEEKLY;BYDAY=MO");
    assert_eq!(t.remind_before.unwrap().seconds(), 1800);
    assert_eq!(t.tags.to_strings(), ["work", "home"]);

    // `application/json; charset=utf-8` is JSON too.
    let r = app.send_raw(ALICE, "POST", "/v1/tasks", Some("application/json; charset=utf-8"), r#"{"title":"charset"}"#).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
}

#[tokio::test]
async fn lifecycle_commands_answer_200_with_versions_and_records_carry_cloudevents_headers() {
    let app = spawn_app().await;
    let id = Uuid::new_v4().to_string();
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = app
        .send(Some(ALICE), "POST", "/v1/tasks", Some(&json!({"task_id": id, "title": "t"})), &[("X-Correlation-Id", "corr-123"), ("traceparent", traceparent)])
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let mut answers = vec![r];
    answers.push(app.patch(ALICE, &id, json!({"title": "u", "description": null}), &[]).await);
    answers.push(app.complete(ALICE, &id, &[]).await);
    answers.push(app.reopen(ALICE, &id, &[]).await);
    answers.push(app.delete(ALICE, &id, &[]).await);
    for (i, a) in answers.iter().enumerate().skip(1) {
        let v = i as u64 + 1;
        assert_eq!(a.status, StatusCode::OK, "command {i}: {}", a.text);
        assert_eq!((a.task_id(), a.version()), (id.clone(), v));
        assert_eq!(a.header("etag"), Some(format!("\"{v}\"").as_str()));
        assert!(a.header("location").is_none(), "Location only on 201");
    }

    let records = app.log.records();
    assert_eq!(records.len(), 5);
    let types = ["task.created", "task.updated", "task.completed", "task.reopened", "task.deleted"];
    let mut ids = HashSet::new();
    for (i, (rec, answer)) in records.iter().zip(&answers).enumerate() {
        let h = rec.header_map();
        assert_eq!(rec.key, id, "key = task id");
        assert_eq!(h["ce_specversion"], "1.0");
        assert!(ids.insert(Uuid::parse_str(&h["ce_id"]).expect("ce_id is a UUID")), "ce_id unique per event");
        assert_eq!(h["ce_type"], types[i]);
        assert_eq!(h["ce_source"], platform::codec::SOURCE);
        assert!(chrono::DateTime::parse_from_rfc3339(&h["ce_time"]).is_ok(), "ce_time {}", h["ce_time"]);
        assert_eq!(h["ce_subject"], id);
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(h["ce_userid"], ALICE);
        assert_eq!(h["ce_sequence"], platform::codec::format_sequence((i + 1) as u32), "ce_sequence = the version the event produced, zero-padded");
        assert!(!h["ce_causationid"].is_empty());
        assert!(h.contains_key("ce_correlationid"));
        assert!(!h.contains_key("ce_idempotencykey"), "no key was sent");
        assert_eq!(rec.position, Position::from_token(answer.body["position"].as_str().unwrap()).unwrap());
        assert_eq!(rec.position.partition, partition_for(&id));
        let data: Value = serde_json::from_slice(&rec.payload).expect("the value is JSON event data");
        assert!(data.is_object());
        rec.decode().expect("the codec reads back what was appended");
    }
    // Offsets on the partition increase with the log order.
    assert!(records.windows(2).all(|w| w[1].position.offset == w[0].position.offset + 1));
    // Correlation and trace context travel with the first command's event only.
    assert_eq!(records[0].header("ce_correlationid").as_deref(), Some("corr-123"));
    assert_eq!(records[0].header("traceparent").as_deref(), Some(traceparent));
    assert!(records[1].header("traceparent").is_none());
    // The personal fields are sealed with the user's data key, which the record names.
    let created: Value = serde_json::from_slice(&records[0].payload).unwrap();
    assert!(created["title"].as_str().unwrap().starts_with(platform::keys::SEALED_PREFIX), "{created}");
    assert_eq!(created["priority"], "medium", "other fields stay readable");
    assert!(records.iter().all(|r| r.header(platform::keys::DATA_KEY_HEADER) == records[0].header(platform::keys::DATA_KEY_HEADER)));
    let TaskEvent::Created(t) = records[0].decode().unwrap().event else { panic!("not a creation") };
    assert_eq!(t.title.as_ref(), "t");
    let updated: Value = serde_json::from_slice(&records[1].payload).unwrap();
    assert_eq!(updated["description"], Value::Null, "null clears, absent is unchanged: {updated}");
    assert_eq!(updated.as_object().unwrap().len(), 2, "{updated}");
    let TaskEvent::Updated(p) = records[1].decode().unwrap().event else { panic!("not an update") };
    assert_eq!(p.title.as_ref().map(AsRef::as_ref), Some("u"));
}

#[tokio::test]
async fn unknown_ids_non_uuid_ids_and_other_users_tasks_are_the_same_404() {
    let app = spawn_app().await;
    let alices = app.create_task(ALICE, "private").await;
    let unknown = Uuid::now_v7().to_string();
    let patch = json!({"title": "mine now"});
    let mut answers: Vec<(String, Resp)> = Vec::new();
    for (who, target, extra) in [
        ("unknown id", unknown.as_str(), vec![]),
        ("non-UUID id", "not-a-uuid", vec![]),
        ("numeric id", "42", vec![]),
        ("undecodable id", "%FF%FE", vec![]),
        ("another user's task", alices.as_str(), vec![]),
        // Even a matching If-Match must not reveal that the task exists.
        ("another user's task, matching If-Match", alices.as_str(), vec![("If-Match", "\"1\"")]),
        ("another user's task, other If-Match", alices.as_str(), vec![("If-Match", "\"9\"")]),
    ] {
        answers.push((format!("{who}: PATCH"), app.patch(BOB, target, patch.clone(), &extra).await));
        answers.push((format!("{who}: complete"), app.complete(BOB, target, &extra).await));
        answers.push((format!("{who}: reopen"), app.reopen(BOB, target, &extra).await));
        answers.push((format!("{who}: delete"), app.delete(BOB, target, &extra).await));
    }
    let reference = assert_problem(&answers[0].1, 404).clone();
    assert_eq!(reference["type"], "urn:taskstream:problem:not-found");
    for (what, r) in &answers {
        assert_problem(r, 404);
        assert_eq!(r.body, reference, "{what}: body differs from a missing task's (detail included)");
        assert_eq!(r.headers.get("content-type"), answers[0].1.headers.get("content-type"));
    }
    // Nothing of bob's reached the log and alice's task is untouched.
    assert_eq!(app.log.len(), 1);
    assert_eq!(app.patch(ALICE, &alices, patch, &[]).await.version(), 2);
    // An unknown route is a problem+json 404 too, and so is the internal reminder route for a user.
    assert_problem(&app.send(Some(ALICE), "GET", "/v1/nothing-here", None, &[]).await, 404);
    let internal =
        app.send(Some(ALICE), "POST", &format!("/internal/v1/tasks/{alices}/remind"), Some(&json!({"remind_at": "2030-01-01T00:00:00Z"})), &[]).await;
    assert_problem(&internal, 404);
    assert_eq!(app.log.len(), 2);
}

#[tokio::test]
async fn commands_that_conflict_with_the_task_state_are_409() {
    let app = spawn_app().await;
    let id = app.create_task(ALICE, "t").await;
    let conflict = |r: &Resp| {
        assert_problem(r, 409);
        assert_eq!(problem_type(r), "urn:taskstream:problem:conflict");
    };
    conflict(&app.reopen(ALICE, &id, &[]).await);
    assert_eq!(app.complete(ALICE, &id, &[]).await.version(), 2);
    conflict(&app.complete(ALICE, &id, &[]).await);
    // Creating with an id that exists (own or someone else's) conflicts.
    conflict(&app.send(Some(ALICE), "POST", "/v1/tasks", Some(&json!({"task_id": id, "title": "again"})), &[]).await);
    conflict(&app.send(Some(BOB), "POST", "/v1/tasks", Some(&json!({"task_id": id, "title": "again"})), &[]).await);
    // A completed task can still be edited; a deleted one cannot be touched.
    assert_eq!(app.patch(ALICE, &id, json!({"title": "edited"}), &[]).await.version(), 3);
    assert_eq!(app.delete(ALICE, &id, &[]).await.version(), 4);
    let r = app.patch(ALICE, &id, json!({"title": "zombie"}), &[]).await;
    conflict(&r);
    assert!(r.body["detail"].as_str().unwrap().contains("deleted"), "{}", r.text);
    conflict(&app.complete(ALICE, &id, &[]).await);
    conflict(&app.reopen(ALICE, &id, &[]).await);
    conflict(&app.delete(ALICE, &id, &[]).await);
    conflict(&app.send(Some(ALICE), "POST", "/v1/tasks", Some(&json!({"task_id": id, "title": "reborn"})), &[]).await);
    // Another user still gets 404 (not 409) on the deleted task.
    assert_problem(&app.patch(BOB, &id, json!({"title": "x"}), &[]).await, 404);
    let seqs: Vec<u32> = app.log.envelopes().iter().map(|e| e.meta.sequence).collect();
    assert_eq!(seqs, [1, 2, 3, 4], "only accepted events are in the log");
}

#[tokio::test]
async fn a_recurrence_without_any_occurrence_after_due_at_is_422_on_create_and_update() {
    let app = spawn_app().await;
    // February never has a 30th: completing such a task would search for its next occurrence forever.
    let never = json!({"title": "never", "due_at": "2026-03-01T00:00:00Z", "recurrence": "FREQ=DAILY;BYMONTH=2;BYMONTHDAY=30"});
    let r = app.send(Some(ALICE), "POST", "/v1/tasks", Some(&never), &[]).await;
    assert_field_error(&r, "recurrence");
    assert!(r.text.contains("no occurrence after due_at"), "{}", r.text);
    assert_eq!(app.log.len(), 0);

    // 2026-03-03 is a Tuesday; every seventh day from a Monday is never a Tuesday.
    let weekly = json!({"title": "weekly", "due_at": "2026-03-03T09:00:00Z", "recurrence": "FREQ=DAILY;INTERVAL=7;BYDAY=TU"});
    let id = app.create(ALICE, weekly).await.task_id();
    assert_field_error(&app.patch(ALICE, &id, json!({"due_at": "2026-03-02T09:00:00Z"}), &[]).await, "recurrence");
    assert_field_error(&app.patch(ALICE, &id, json!({"recurrence": "FREQ=MINUTELY;BYMONTH=2;BYMONTHDAY=30"}), &[]).await, "recurrence");
    assert_eq!(app.log.records_of(&id).len(), 1, "nothing refused is appended");
    assert_eq!(app.patch(ALICE, &id, json!({"due_at": "2026-03-10T09:00:00Z"}), &[]).await.version(), 2);
}
