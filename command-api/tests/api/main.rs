//! The command API's contract (CONTRACT.md §2–§4) checked through `command_api::router` with
//! `oneshot`, over an in-memory fake of the event log: statuses, problem+json bodies, the records
//! appended (CloudEvents headers, key, sequence), idempotency (also across a restart), ordering under
//! concurrency, log outages and restarts.

mod helpers;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, Request, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;

use domain::TaskEvent;
use helpers::{assert_field_error, assert_problem, build_app, eventually, partition_for, spawn_app, spawn_app_over, FakeLog, Resp};
use platform::auth::JwtAuth;
use platform::position::Position;
use platform::secret::Secret;

const ALICE: &str = "alice";
const BOB: &str = "bob";

fn problem_type(r: &Resp) -> &str {
    r.body["type"].as_str().unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Success paths and what lands in the log
// ---------------------------------------------------------------------------------------------

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
        let version = (i + 1).to_string();
        assert_eq!(rec.key, id, "key = task id");
        assert_eq!(h["ce_specversion"], "1.0");
        assert!(ids.insert(Uuid::parse_str(&h["ce_id"]).expect("ce_id is a UUID")), "ce_id unique per event");
        assert_eq!(h["ce_type"], types[i]);
        assert_eq!(h["ce_source"], platform::codec::SOURCE);
        assert!(chrono::DateTime::parse_from_rfc3339(&h["ce_time"]).is_ok(), "ce_time {}", h["ce_time"]);
        assert_eq!(h["ce_subject"], id);
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(h["ce_userid"], ALICE);
        assert_eq!(h["ce_sequence"], version, "ce_sequence = the version the event produced");
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
    let created: Value = serde_json::from_slice(&records[0].payload).unwrap();
    assert_eq!(created["title"], "t");
    let updated: Value = serde_json::from_slice(&records[1].payload).unwrap();
    assert_eq!(updated, json!({"title": "u", "description": null}), "null clears, absent is unchanged");
}

// ---------------------------------------------------------------------------------------------
// 401 / 415 / 400 / 413 / 422
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn missing_malformed_expired_and_foreign_tokens_are_401_with_www_authenticate() {
    let app = spawn_app().await;
    let id = app.create_task(ALICE, "mine").await;
    let expired = app.auth.issue(ALICE, -3600);
    let wrong_secret = JwtAuth::new(&Secret::new("another-secret")).issue(ALICE, 300);
    let empty_sub = app.auth.issue("", 300);
    let cases: Vec<(&str, Option<String>)> = vec![
        ("missing", None),
        ("basic scheme", Some("Basic YWxpY2U6cGFzcw==".into())),
        ("bearer without token", Some("Bearer ".into())),
        ("token without scheme", Some(app.token(ALICE))),
        ("not a JWT", Some("Bearer not-a-jwt".into())),
        ("garbage segments", Some("Bearer a.b.c".into())),
        ("expired", Some(format!("Bearer {expired}"))),
        ("wrong secret", Some(format!("Bearer {wrong_secret}"))),
        ("empty subject", Some(format!("Bearer {empty_sub}"))),
        ("tampered", Some(format!("Bearer {}x", app.token(ALICE)))),
    ];
    for (what, auth) in cases {
        for (method, path, body) in [
            ("POST", "/v1/tasks".to_owned(), Some(r#"{"title":"x"}"#)),
            ("PATCH", format!("/v1/tasks/{id}"), Some(r#"{"title":"x"}"#)),
            ("POST", format!("/v1/tasks/{id}/complete"), None),
            ("DELETE", format!("/v1/tasks/{id}"), None),
        ] {
            let mut req = Request::builder().method(method).uri(&path).header("content-type", "application/json");
            if let Some(a) = &auth {
                req = req.header("authorization", a.as_str());
            }
            let r = app.raw(req.body(body.map(Body::from).unwrap_or_else(Body::empty)).unwrap()).await;
            assert_problem(&r, 401);
            assert_eq!(r.header("www-authenticate"), Some("Bearer"), "{what}: {method} {path}");
            assert_eq!(problem_type(&r), "urn:taskstream:problem:unauthorized");
        }
    }
    let expired_answer = app.raw(Request::post("/v1/tasks").header("authorization", format!("Bearer {expired}")).header("content-type", "application/json").body(Body::from("{}")).unwrap()).await;
    assert!(expired_answer.body["detail"].as_str().unwrap().contains("expired"), "{}", expired_answer.text);
    assert_eq!(app.log.len(), 1, "nothing unauthenticated was appended");
}

#[tokio::test]
async fn a_body_that_is_not_json_is_415() {
    let app = spawn_app().await;
    let id = app.create_task(ALICE, "t").await;
    for ct in [None, Some("text/plain"), Some("application/x-www-form-urlencoded"), Some("multipart/form-data; boundary=x"), Some("application/jsonx"), Some("json")] {
        let r = app.send_raw(ALICE, "POST", "/v1/tasks", ct, r#"{"title":"x"}"#).await;
        assert_problem(&r, 415);
        assert_eq!(problem_type(&r), "urn:taskstream:problem:unsupported-media-type", "{ct:?}");
        let r = app.send_raw(ALICE, "PATCH", &format!("/v1/tasks/{id}"), ct, r#"{"title":"x"}"#).await;
        assert_problem(&r, 415);
    }
    assert_eq!(app.log.len(), 1);
}

#[tokio::test]
async fn malformed_json_is_400() {
    let app = spawn_app().await;
    let id = app.create_task(ALICE, "t").await;
    let bodies: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"{\"title\":".to_vec(),
        b"not json".to_vec(),
        b"{\"title\": \"x\",}".to_vec(),
        b"{'title': 'x'}".to_vec(),
        b"{\"title\": \"x\"} trailing".to_vec(),
        vec![0xff, 0xfe, 0x7b, 0x7d],
        b"{\"title\": \"\\ud800\"}".to_vec(),
    ];
    for body in bodies {
        let shown = String::from_utf8_lossy(&body).into_owned();
        let r = app.send_raw(ALICE, "POST", "/v1/tasks", Some("application/json"), body.clone()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{shown:?}: {}", r.text);
        assert_problem(&r, 400);
        assert_eq!(problem_type(&r), "urn:taskstream:problem:bad-request");
        let r = app.send_raw(ALICE, "PATCH", &format!("/v1/tasks/{id}"), Some("application/json"), body).await;
        assert_problem(&r, 400);
    }
    assert_eq!(app.log.len(), 1);
}

#[tokio::test]
async fn a_body_over_64_kib_is_413() {
    let app = spawn_app().await;
    let limit = command_api::BODY_LIMIT_BYTES;
    assert_eq!(limit, 64 * 1024);
    // The limit is on bytes: whitespace padding to just under it is fine ...
    let small = format!("{}{{\"title\":\"padded\"}}", " ".repeat(limit - 100));
    let r = app.send_raw(ALICE, "POST", "/v1/tasks", Some("application/json"), small).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    // ... one byte over is refused, whatever the content.
    let over = format!("{{\"title\":\"padded\"}}{}", " ".repeat(limit + 1 - 18));
    assert_eq!(over.len(), limit + 1);
    let r = app.send_raw(ALICE, "POST", "/v1/tasks", Some("application/json"), over).await;
    assert_problem(&r, 413);
    assert_eq!(problem_type(&r), "urn:taskstream:problem:payload-too-large");
    let big = json!({"title": "x", "description": "y".repeat(70_000)}).to_string();
    let r = app.send_raw(ALICE, "POST", "/v1/tasks", Some("application/json"), big.clone()).await;
    assert_problem(&r, 413);
    let id = app.create_task(ALICE, "t").await;
    let r = app.send_raw(ALICE, "PATCH", &format!("/v1/tasks/{id}"), Some("application/json"), big).await;
    assert_problem(&r, 413);
    assert_eq!(app.log.len(), 2);
}

#[tokio::test]
async fn each_invalid_create_field_is_422_naming_the_field() {
    let app = spawn_app().await;
    let due = "2030-01-01T09:00:00Z";
    let cases: Vec<(&str, Value, &str)> = vec![
        ("empty title", json!({"title": ""}), "title"),
        ("blank title", json!({"title": "   "}), "title"),
        ("title of 201 characters", json!({"title": "é".repeat(201)}), "title"),
        ("title with a control character", json!({"title": "a\u{0007}b"}), "title"),
        ("missing title", json!({"priority": "low"}), "title"),
        ("null title", json!({"title": null}), "title"),
        ("description too long", json!({"title": "x", "description": "d".repeat(10_001)}), "description"),
        ("unknown priority", json!({"title": "x", "priority": "asap"}), "priority"),
        ("priority in capitals", json!({"title": "x", "priority": "HIGH"}), "priority"),
        ("due_at not a timestamp", json!({"title": "x", "due_at": "next week"}), "due_at"),
        ("due_at month 13", json!({"title": "x", "due_at": "2030-13-01T00:00:00Z"}), "due_at"),
        ("due_at without offset", json!({"title": "x", "due_at": "2030-01-01T00:00:00"}), "due_at"),
        ("unknown timezone", json!({"title": "x", "timezone": "Moon/Base"}), "timezone"),
        ("invalid RRULE", json!({"title": "x", "due_at": due, "recurrence": "FREQ=SOMETIMES"}), "recurrence"),
        ("RRULE with a bad BYDAY", json!({"title": "x", "due_at": due, "recurrence": "FREQ=WEEKLY;BYDAY=XX"}), "recurrence"),
        ("RRULE with DTSTART", json!({"title": "x", "due_at": due, "recurrence": "DTSTART:20300101T000000Z\nRRULE:FREQ=DAILY"}), "recurrence"),
        ("recurrence without due_at", json!({"title": "x", "recurrence": "FREQ=DAILY"}), "recurrence"),
        ("remind_before in months", json!({"title": "x", "due_at": due, "remind_before": "P1M"}), "remind_before"),
        ("remind_before not a duration", json!({"title": "x", "due_at": due, "remind_before": "30 minutes"}), "remind_before"),
        ("remind_before without due_at", json!({"title": "x", "remind_before": "PT30M"}), "remind_before"),
        ("21 tags", json!({"title": "x", "tags": (0..21).map(|i| format!("t{i}")).collect::<Vec<_>>()}), "tags"),
        ("empty tag", json!({"title": "x", "tags": [""]}), "tags"),
        ("tag of 51 characters", json!({"title": "x", "tags": ["t".repeat(51)]}), "tags"),
        ("unknown field", json!({"title": "x", "colour": "red"}), "colour"),
        ("title of the wrong type", json!({"title": 5}), "title"),
        ("tags of the wrong type", json!({"title": "x", "tags": "a,b"}), "tags"),
        ("priority of the wrong type", json!({"title": "x", "priority": 3}), "priority"),
        ("task_id not a UUID", json!({"title": "x", "task_id": "not-a-uuid"}), "task_id"),
    ];
    for (what, body, field) in cases {
        let r = app.send(Some(ALICE), "POST", "/v1/tasks", Some(&body), &[]).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{what}: {}", r.text);
        assert_field_error(&r, field);
        assert_eq!(problem_type(&r), "urn:taskstream:problem:validation", "{what}");
    }
    // Every refused field is reported at once.
    let r = app.send(Some(ALICE), "POST", "/v1/tasks", Some(&json!({"title": "", "timezone": "Nowhere/City", "tags": [""]})), &[]).await;
    for f in ["title", "timezone", "tags"] {
        assert_field_error(&r, f);
    }
    // Not an object.
    for body in [json!([1, 2]), json!("title"), json!(null), json!(42)] {
        assert_problem(&app.send(Some(ALICE), "POST", "/v1/tasks", Some(&body), &[]).await, 422);
    }
    assert_eq!(app.log.len(), 0, "nothing invalid was appended");
}

#[tokio::test]
async fn invalid_patches_are_422() {
    let app = spawn_app().await;
    let id = app.create_task(ALICE, "plain").await;
    let scheduled = app.create(ALICE, json!({"title": "s", "due_at": "2030-01-01T09:00:00Z", "remind_before": "PT1H"})).await.task_id();
    let cases: Vec<(&str, &str, Value, &str)> = vec![
        ("empty object", &id, json!({}), ""),
        ("title null", &id, json!({"title": null}), "title"),
        ("title empty", &id, json!({"title": ""}), "title"),
        ("priority null", &id, json!({"priority": null}), "priority"),
        ("timezone null", &id, json!({"timezone": null}), "timezone"),
        ("bad timezone", &id, json!({"timezone": "Europe/Atlantis"}), "timezone"),
        ("bad priority", &id, json!({"priority": "meh"}), "priority"),
        ("bad due_at", &id, json!({"due_at": "tomorrow"}), "due_at"),
        ("bad RRULE", &id, json!({"recurrence": "FREQ=NEVER"}), "recurrence"),
        ("remind_before in months", &id, json!({"remind_before": "P1M"}), "remind_before"),
        ("remind_before without due_at", &id, json!({"remind_before": "PT5M"}), "remind_before"),
        ("clearing due_at under a reminder", &scheduled, json!({"due_at": null}), "remind_before"),
        ("21 tags", &id, json!({"tags": (0..21).map(|i| i.to_string()).collect::<Vec<_>>()}), "tags"),
        ("unknown field", &id, json!({"colour": "red"}), "colour"),
        ("task_id is not patchable", &id, json!({"task_id": Uuid::new_v4()}), "task_id"),
        ("wrong type", &id, json!({"title": ["x"]}), "title"),
    ];
    for (what, target, body, field) in cases {
        let r = app.patch(ALICE, target, body, &[]).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{what}: {}", r.text);
        assert_field_error(&r, field);
    }
    assert_eq!(app.log.len(), 2, "nothing invalid was appended");
    // The same task still accepts a valid patch, and null clears optional fields.
    let r = app.patch(ALICE, &scheduled, json!({"due_at": null, "remind_before": null, "tags": null}), &[]).await;
    assert_eq!((r.status, r.version()), (StatusCode::OK, 2), "{}", r.text);
}

// ---------------------------------------------------------------------------------------------
// 404 / 409 / 412 / 400 headers
// ---------------------------------------------------------------------------------------------

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
    let internal = app.send(Some(ALICE), "POST", &format!("/internal/v1/tasks/{alices}/remind"), Some(&json!({"remind_at": "2030-01-01T00:00:00Z"})), &[]).await;
    assert_problem(&internal, 404);
    assert_eq!(app.log.len(), 2);
}

#[tokio::test]
async fn an_unsupported_method_is_a_problem_json_405_with_allow() {
    let app = spawn_app().await;
    let id = app.create_task(ALICE, "t").await;
    for (method, path, allowed) in [
        ("GET", "/v1/tasks".to_owned(), "POST"),
        ("PUT", format!("/v1/tasks/{id}"), "PATCH,DELETE"),
        ("GET", format!("/v1/tasks/{id}/complete"), "POST"),
        ("DELETE", "/healthz".to_owned(), "GET"),
    ] {
        let r = app.send(Some(ALICE), method, &path, None, &[]).await;
        assert_problem(&r, 405);
        assert_eq!(problem_type(&r), "urn:taskstream:problem:method-not-allowed");
        let allow: HashSet<&str> = r.header("allow").expect("Allow header").split(',').map(str::trim).collect();
        for m in allowed.split(',') {
            assert!(allow.contains(m), "{method} {path}: Allow = {allow:?}");
        }
    }
    assert_eq!(app.log.len(), 1);
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
async fn if_match_makes_commands_conditional() {
    let app = spawn_app().await;
    let id = app.create_task(ALICE, "t").await;
    let r = app.patch(ALICE, &id, json!({"title": "u"}), &[("If-Match", "\"2\"")]).await;
    assert_problem(&r, 412);
    assert_eq!(problem_type(&r), "urn:taskstream:problem:version-mismatch");
    assert!(r.body["detail"].as_str().unwrap().contains('1'), "the detail names the actual version: {}", r.text);
    let r = app.patch(ALICE, &id, json!({"title": "u"}), &[("If-Match", "\"1\"")]).await;
    assert_eq!((r.status, r.version()), (StatusCode::OK, 2), "{}", r.text);
    assert_problem(&app.complete(ALICE, &id, &[("If-Match", "\"1\"")]).await, 412);
    assert_eq!(app.complete(ALICE, &id, &[("If-Match", "\"2\"")]).await.version(), 3);
    assert_problem(&app.reopen(ALICE, &id, &[("If-Match", "\"2\"")]).await, 412);
    assert_eq!(app.reopen(ALICE, &id, &[("If-Match", "\"3\"")]).await.version(), 4);
    assert_problem(&app.delete(ALICE, &id, &[("If-Match", "\"3\"")]).await, 412);
    // If-Match "0" on create: only if the id is unused.
    let fresh = Uuid::new_v4().to_string();
    let r = app.send(Some(ALICE), "POST", "/v1/tasks", Some(&json!({"task_id": fresh, "title": "new"})), &[("If-Match", "\"0\"")]).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let r = app.send(Some(ALICE), "POST", "/v1/tasks", Some(&json!({"task_id": fresh, "title": "new"})), &[("If-Match", "\"0\"")]).await;
    assert!(r.status == StatusCode::PRECONDITION_FAILED || r.status == StatusCode::CONFLICT, "{}", r.text);
    assert_eq!(app.delete(ALICE, &id, &[("If-Match", "\"4\"")]).await.version(), 5);
    assert_eq!(app.log.len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_commands_with_the_same_if_match_let_exactly_one_win() {
    let app = Arc::new(spawn_app().await);
    let id = app.create_task(ALICE, "contended").await;
    let handles: Vec<_> = (0..10)
        .map(|i| {
            let (app, id) = (app.clone(), id.clone());
            tokio::spawn(async move { app.patch(ALICE, &id, json!({"title": format!("w{i}")}), &[("If-Match", "\"1\"")]).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for h in handles {
        let r = h.await.unwrap();
        if r.status != StatusCode::OK {
            assert_problem(&r, 412);
        }
        statuses.push(r.status);
    }
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::OK).count(), 1, "{statuses:?}");
    assert_eq!(app.log.len(), 2);
}

#[tokio::test]
async fn malformed_if_match_and_idempotency_key_headers_are_400() {
    let app = spawn_app().await;
    let id = app.create_task(ALICE, "t").await;
    let body = json!({"title": "u"});
    for bad in ["soon", "\"x\"", "\"-1\"", "\"1.5\"", "\"99999999999\"", "", "*"] {
        let r = app.patch(ALICE, &id, body.clone(), &[("If-Match", bad)]).await;
        assert_problem(&r, 400);
        assert_eq!(problem_type(&r), "urn:taskstream:problem:bad-request");
        assert!(r.body["detail"].as_str().unwrap().contains("If-Match"), "{}", r.text);
        assert_problem(&app.complete(ALICE, &id, &[("If-Match", bad)]).await, 400);
    }
    let long = "k".repeat(256);
    for bad in ["has space", "", "tab\there", long.as_str()] {
        let r = app.patch(ALICE, &id, body.clone(), &[("Idempotency-Key", bad)]).await;
        assert_problem(&r, 400);
        assert!(r.body["detail"].as_str().unwrap().contains("Idempotency-Key"), "{}", r.text);
        let r = app.send(Some(ALICE), "POST", "/v1/tasks", Some(&body), &[("Idempotency-Key", bad)]).await;
        assert_problem(&r, 400);
    }
    // Non-ASCII bytes in the key.
    let req = Request::post("/v1/tasks")
        .header("authorization", format!("Bearer {}", app.token(ALICE)))
        .header("content-type", "application/json")
        .header("idempotency-key", HeaderValue::from_bytes("schlüssel".as_bytes()).unwrap())
        .body(Body::from(r#"{"title":"x"}"#))
        .unwrap();
    assert_problem(&app.raw(req).await, 400);
    // The longest allowed key is fine.
    let max = "k".repeat(255);
    assert_eq!(app.patch(ALICE, &id, body, &[("Idempotency-Key", max.as_str())]).await.status, StatusCode::OK);
    assert_eq!(app.log.len(), 2);
}

// ---------------------------------------------------------------------------------------------
// Idempotency
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_idempotent_retry_replays_the_first_answer_and_appends_once() {
    let app = spawn_app().await;
    let key = [("Idempotency-Key", "create-1")];
    let app_ref = &app;
    let send = |body: &'static str| async move {
        let app = app_ref;
        let req = Request::post("/v1/tasks")
            .header("authorization", format!("Bearer {}", app.token(ALICE)))
            .header("content-type", "application/json")
            .header("idempotency-key", "create-1")
            .body(Body::from(body))
            .unwrap();
        app.raw(req).await
    };
    let first = send(r#"{"title":"once","priority":"high"}"#).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text);
    assert!(first.header("idempotent-replayed").is_none());
    // Same body (other key order and whitespace) -> the same answer, replayed.
    let again = send(r#"{ "priority": "high",  "title": "once" }"#).await;
    assert_eq!(again.status, StatusCode::CREATED, "{}", again.text);
    assert_eq!(again.body, first.body);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.header("location"), first.header("location"));
    assert_eq!(again.header("etag"), first.header("etag"));
    assert_eq!(app.log.len(), 1, "the retry appended nothing");
    let rec = &app.log.records()[0];
    assert_eq!(rec.header("ce_idempotencykey").as_deref(), Some("create-1"));
    assert_eq!(rec.header("ce_requestdigest").map(|d| d.len()), Some(64), "a SHA-256 digest");

    // Same key, another body -> 422, nothing appended.
    let other = app.send(Some(ALICE), "POST", "/v1/tasks", Some(&json!({"title": "twice"})), &key).await;
    assert_field_error(&other, "Idempotency-Key");
    assert_eq!(problem_type(&other), "urn:taskstream:problem:idempotency-key-reused");
    // Same key on another command -> 422 too.
    let id = first.task_id();
    assert_problem(&app.complete(ALICE, &id, &key).await, 422);
    assert_eq!(app.log.len(), 1);

    // Keys belong to their user: bob's "create-1" is his own.
    let bobs = app.send(Some(BOB), "POST", "/v1/tasks", Some(&json!({"title": "once", "priority": "high"})), &key).await;
    assert_eq!(bobs.status, StatusCode::CREATED);
    assert!(bobs.header("idempotent-replayed").is_none());
    assert_ne!(bobs.task_id(), id);

    // Lifecycle commands replay too, even once the task has moved on.
    let done = app.complete(ALICE, &id, &[("Idempotency-Key", "complete-1")]).await;
    assert_eq!(done.version(), 2);
    assert_eq!(app.patch(ALICE, &id, json!({"title": "moved on"}), &[]).await.version(), 3);
    let retry = app.complete(ALICE, &id, &[("Idempotency-Key", "complete-1")]).await;
    assert_eq!((retry.status, &retry.body), (StatusCode::OK, &done.body));
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(app.log.records_of(&id).len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_concurrent_requests_with_one_key_append_once() {
    let app = Arc::new(spawn_app().await);
    let handles: Vec<_> = (0..16)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move {
                app.send(Some(ALICE), "POST", "/v1/tasks", Some(&json!({"title": "exactly once"})), &[("Idempotency-Key", "burst")]).await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for h in handles {
        let r = h.await.unwrap();
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        answers.push(r);
    }
    let ids: HashSet<String> = answers.iter().map(Resp::task_id).collect();
    assert_eq!(ids.len(), 1, "every request got the same task: {ids:?}");
    assert!(answers.iter().all(|r| r.version() == 1 && r.body == answers[0].body));
    let fresh = answers.iter().filter(|r| r.header("idempotent-replayed").is_none()).count();
    assert_eq!(fresh, 1, "one request executed, the others were answered from it");
    assert_eq!(app.log.len(), 1, "16 concurrent requests with one key append one record");

    // The same on an existing task.
    let id = answers[0].task_id();
    let handles: Vec<_> = (0..16)
        .map(|_| {
            let (app, id) = (app.clone(), id.clone());
            tokio::spawn(async move { app.patch(ALICE, &id, json!({"title": "same"}), &[("Idempotency-Key", "burst-2")]).await })
        })
        .collect();
    for h in handles {
        let r = h.await.unwrap();
        assert_eq!((r.status, r.version()), (StatusCode::OK, 2), "{}", r.text);
    }
    assert_eq!(app.log.len(), 2);
}

#[tokio::test]
async fn idempotency_survives_a_restart_through_the_log_headers() {
    let app = spawn_app().await;
    let created = app.send(Some(ALICE), "POST", "/v1/tasks", Some(&json!({"title": "before restart"})), &[("Idempotency-Key", "c-1")]).await;
    assert_eq!(created.status, StatusCode::CREATED);
    let id = created.task_id();
    let patched = app.patch(ALICE, &id, json!({"title": "patched"}), &[("Idempotency-Key", "p-1")]).await;
    assert_eq!(patched.version(), 2);
    let log = app.log.clone();
    drop(app);

    let restarted = spawn_app_over(log).await;
    let retry = restarted.send(Some(ALICE), "POST", "/v1/tasks", Some(&json!({"title": "before restart"})), &[("Idempotency-Key", "c-1")]).await;
    assert_eq!((retry.status, &retry.body), (StatusCode::CREATED, &created.body), "{}", retry.text);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(retry.header("location"), created.header("location"));
    let retry = restarted.patch(ALICE, &id, json!({"title": "patched"}), &[("Idempotency-Key", "p-1")]).await;
    assert_eq!((retry.status, &retry.body), (StatusCode::OK, &patched.body), "{}", retry.text);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    // Another body under a remembered key is still refused.
    assert_problem(&restarted.patch(ALICE, &id, json!({"title": "different"}), &[("Idempotency-Key", "p-1")]).await, 422);
    assert_eq!(restarted.log.len(), 2, "replays after the restart appended nothing");
}

// ---------------------------------------------------------------------------------------------
// Ordering, outages, restarts
// ---------------------------------------------------------------------------------------------

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
    assert_eq!(seqs, (1..=41).map(|v| v.to_string()).collect::<Vec<_>>(), "ce_sequence contiguous in log order");
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
    .await;
    assert_eq!(app.log.len(), 1, "nothing was appended while the log was down");

    app.log.set_down(false);
    let r = eventually("a command to succeed after the log recovers", Duration::from_secs(20), || async {
        let r = app.complete(ALICE, &id, &[]).await;
        match r.status {
            StatusCode::OK => Some(r),
            StatusCode::SERVICE_UNAVAILABLE => None,
            other => panic!("unexpected {other} while recovering: {}", r.text),
        }
    })
    .await;
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
    assert_eq!(seqs, ["1", "2", "3", "4", "5"]);

    // And once more, over the records of both runs.
    let log = app.log.clone();
    drop(app);
    let app = spawn_app_over(log).await;
    assert_eq!(app.complete(ALICE, &id, &[]).await.version(), 6);
}

// ---------------------------------------------------------------------------------------------
// Documentation and operations endpoints
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn openapi_healthz_and_metrics_are_served() {
    let app = spawn_app().await;
    let r = app.get("/v1/openapi.json").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.header("content-type").unwrap().starts_with("application/json"));
    let doc = &r.body;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"), "{}", doc["openapi"]);
    let paths = &doc["paths"];
    for (path, methods) in [
        ("/v1/tasks", &["post"][..]),
        ("/v1/tasks/{id}", &["patch", "delete"][..]),
        ("/v1/tasks/{id}/complete", &["post"][..]),
        ("/v1/tasks/{id}/reopen", &["post"][..]),
    ] {
        for m in methods {
            assert!(paths[path].get(*m).is_some(), "{m} {path} missing from the OpenAPI document");
        }
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object(), "bearer auth documented");
    assert!(doc["components"]["schemas"].get("Problem").is_some());

    let r = app.get("/healthz").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(app.get("/readyz").await.status, StatusCode::OK);
    let r = app.get("/metrics").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    app.create_task(ALICE, "counted").await;
    let r = app.get("/metrics").await;
    assert!(r.text.contains("commands_total"), "commands are counted: {}", r.text);
}

// ---------------------------------------------------------------------------------------------
// Never a 5xx for bad input
// ---------------------------------------------------------------------------------------------

struct Bad {
    what: &'static str,
    method: &'static str,
    path: String,
    auth: Option<HeaderValue>,
    content_type: Option<HeaderValue>,
    headers: Vec<(&'static str, HeaderValue)>,
    body: Vec<u8>,
}

#[tokio::test]
async fn malformed_requests_never_get_a_5xx() {
    let app = spawn_app().await;
    let id = app.create_task(ALICE, "target").await;
    let bearer = HeaderValue::from_str(&format!("Bearer {}", app.token(ALICE))).unwrap();
    let json_ct = HeaderValue::from_static("application/json");
    let due = "2030-01-01T09:00:00Z";
    let bad = |what, method, path: &str, body: Vec<u8>| Bad {
        what,
        method,
        path: path.to_owned(),
        auth: Some(bearer.clone()),
        content_type: Some(json_ct.clone()),
        headers: vec![],
        body,
    };
    let j = |v: Value| v.to_string().into_bytes();
    let tasks = "/v1/tasks";
    let task = format!("/v1/tasks/{id}");
    let complete = format!("/v1/tasks/{id}/complete");
    let nested = format!("{{\"title\": {}1{}}}", "[".repeat(10_000), "]".repeat(10_000));
    let mut cases = vec![
        Bad { auth: None, ..bad("no token, garbage body", "POST", tasks, b"\x00\x01\x02".to_vec()) },
        Bad { auth: Some(HeaderValue::from_bytes(b"Bearer \xff\xfe").unwrap()), ..bad("non-ASCII token", "POST", tasks, j(json!({"title": "x"}))) },
        Bad { auth: Some(HeaderValue::from_str(&format!("Bearer {}", "a".repeat(20_000))).unwrap()), ..bad("huge token", "POST", tasks, j(json!({"title": "x"}))) },
        bad("NUL byte body", "POST", tasks, b"\x00".to_vec()),
        bad("invalid UTF-8", "POST", tasks, vec![0xc3, 0x28, 0xa0, 0xa1]),
        bad("deeply nested JSON", "POST", tasks, nested.clone().into_bytes()),
        bad("deeply nested PATCH", "PATCH", &task, nested.into_bytes()),
        bad("huge number", "POST", tasks, b"{\"title\": 1e999}".to_vec()),
        bad("lone surrogate", "POST", tasks, b"{\"title\": \"\\udc00\"}".to_vec()),
        bad("duplicate keys", "POST", tasks, b"{\"title\": \"a\", \"title\": \"b\"}".to_vec()),
        bad("year 275760", "POST", tasks, j(json!({"title": "x", "due_at": "+275760-09-13T00:00:00Z"}))),
        bad("year 0 with a long reminder", "POST", tasks, j(json!({"title": "x", "due_at": "0000-01-01T00:00:00Z", "remind_before": "P52W"}))),
        bad("year 9999 recurring", "POST", tasks, j(json!({"title": "x", "due_at": "9999-12-31T23:59:59Z", "recurrence": "FREQ=SECONDLY", "remind_before": "PT1S"}))),
        bad("overflowing duration", "POST", tasks, j(json!({"title": "x", "due_at": due, "remind_before": "PT99999999999999999999S"}))),
        bad("overflowing weeks", "POST", tasks, j(json!({"title": "x", "due_at": due, "remind_before": "P9223372036854775807W"}))),
        bad("zero interval", "POST", tasks, j(json!({"title": "x", "due_at": due, "recurrence": "FREQ=SECONDLY;INTERVAL=0"}))),
        bad("huge COUNT", "POST", tasks, j(json!({"title": "x", "due_at": due, "recurrence": "FREQ=DAILY;COUNT=4294967296"}))),
        bad("BYSETPOS=0", "POST", tasks, j(json!({"title": "x", "due_at": due, "recurrence": "FREQ=YEARLY;BYSETPOS=0;BYDAY=MO"}))),
        bad("UNTIL and COUNT", "POST", tasks, j(json!({"title": "x", "due_at": due, "recurrence": "FREQ=DAILY;UNTIL=20200101T000000Z;COUNT=2"}))),
        bad("RRULE of 5000 characters", "POST", tasks, j(json!({"title": "x", "due_at": due, "recurrence": "X".repeat(5000)}))),
        bad("RRULE with no occurrences", "POST", tasks, j(json!({"title": "x", "due_at": due, "recurrence": "FREQ=MONTHLY;BYMONTH=2;BYMONTHDAY=31"}))),
        bad("empty timezone", "POST", tasks, j(json!({"title": "x", "timezone": ""}))),
        bad("control characters in tags", "POST", tasks, j(json!({"title": "x", "tags": ["\u{0}", "\u{1b}[31m"]}))),
        bad("null inside tags", "PATCH", &task, j(json!({"tags": [null]}))),
        bad("title of 200 emoji", "POST", tasks, j(json!({"title": "🦀".repeat(200)}))),
        bad("nil task id", "POST", tasks, j(json!({"title": "x", "task_id": "00000000-0000-0000-0000-000000000000"}))),
        bad("invalid percent-encoding in the id", "PATCH", "/v1/tasks/%FF%FE", j(json!({"title": "x"}))),
        bad("very long id", "POST", &format!("/v1/tasks/{}/complete", "a".repeat(10_000)), vec![]),
        bad("encoded slashes in the id", "POST", "/v1/tasks/..%2F..%2Fetc/complete", vec![]),
        bad("unsupported method on the collection", "GET", tasks, vec![]),
        bad("unsupported method on a task", "PUT", &task, j(json!({"title": "x"}))),
        bad("body on a lifecycle command", "POST", &complete, b"\xff garbage".to_vec()),
        Bad { content_type: Some(HeaderValue::from_bytes(b"application/\xffjson").unwrap()), ..bad("non-ASCII content type", "POST", tasks, j(json!({"title": "x"}))) },
        Bad { content_type: Some(HeaderValue::from_static("application/json; charset=utf-16")), ..bad("charset utf-16", "POST", tasks, j(json!({"title": "x"}))) },
        Bad { headers: vec![("if-match", HeaderValue::from_static("\"4294967295\""))], ..bad("If-Match u32::MAX", "PATCH", &task, j(json!({"title": "x"}))) },
        Bad { headers: vec![("if-match", HeaderValue::from_static("W/\"1\""))], ..bad("weak If-Match", "PATCH", &task, j(json!({"title": "x"}))) },
        Bad { headers: vec![("if-match", HeaderValue::from_bytes(b"\"\xff\"").unwrap())], ..bad("non-ASCII If-Match", "POST", &complete, vec![]) },
        Bad { headers: vec![("idempotency-key", HeaderValue::from_str(&"k".repeat(10_000)).unwrap())], ..bad("10 000 character key", "POST", tasks, j(json!({"title": "x"}))) },
        Bad { headers: vec![("x-correlation-id", HeaderValue::from_str(&"c".repeat(500)).unwrap())], ..bad("long correlation id", "POST", tasks, j(json!({"title": "x"}))) },
        Bad { headers: vec![("traceparent", HeaderValue::from_static("zz-not-a-trace"))], ..bad("garbage traceparent", "POST", tasks, j(json!({"title": "x"}))) },
    ];
    assert!(cases.len() >= 30);
    let mut failures = Vec::new();
    for case in cases.drain(..) {
        let mut req = Request::builder().method(case.method).uri(&case.path);
        if let Some(a) = case.auth {
            req = req.header("authorization", a);
        }
        if let Some(ct) = case.content_type {
            req = req.header("content-type", ct);
        }
        for (k, v) in case.headers {
            req = req.header(k, v);
        }
        let r = app.raw(req.body(Body::from(case.body)).unwrap()).await;
        if r.status.is_server_error() {
            failures.push(format!("{} ({} {:.80}) answered {}: {}", case.what, case.method, case.path, r.status, r.text));
        } else if r.status.is_client_error() && r.header("content-type") != Some("application/problem+json") {
            failures.push(format!("{}: {} is not problem+json: {:?} {}", case.what, r.status, r.header("content-type"), r.text));
        }
    }
    assert!(failures.is_empty(), "{} malformed requests were mishandled:\n{}", failures.len(), failures.join("\n"));
    // And the writer is still serving.
    assert_eq!(app.patch(ALICE, &id, json!({"title": "still fine"}), &[]).await.status, StatusCode::OK);
}
