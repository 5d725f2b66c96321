//! Notifications are owned by the user's stream: the projector's reaction to a fired reminder
//! records one (`POST /internal/v1/notifications/{id}`, service identity only, `notification.created`
//! keyed by the user id), and MarkNotificationRead is decided from that stream alone: 404 for an id
//! it has not recorded (even once the reminder fired in the task's stream), 200 once, then 409.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use domain::ids::reminder_notification_id;
use domain::TaskId;

use crate::helpers::{assert_field_error, assert_problem, problem_type, spawn_app, spawn_app_over, Resp, TestApp, ALICE, BOB};

/// `POST path` with a service token acting for `user` (what the projector's reactor sends).
async fn as_service(app: &TestApp, user: &str, path: &str, body: &Value, headers: &[(&str, &str)]) -> Resp {
    let mut req = Request::post(path)
        .header("authorization", format!("Bearer {}", app.tokens.service("service:projector", user)))
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    app.raw(req.body(Body::from(body.to_string())).unwrap()).await
}

/// A task of `user` with a reminder, and its remind time.
async fn reminded_task(app: &TestApp, user: &str) -> (String, DateTime<Utc>) {
    let due: DateTime<Utc> = "2030-01-01T09:00:00Z".parse().unwrap();
    let id = app.create(user, json!({"title": "call the bank", "due_at": due, "remind_before": "PT30M"})).await.task_id();
    (id, due - chrono::Duration::minutes(30))
}

fn notification_of(task: &str, remind_at: DateTime<Utc>) -> String {
    reminder_notification_id(task.parse::<TaskId>().unwrap(), remind_at).to_string()
}

async fn record(app: &TestApp, user: &str, task: &str, remind_at: DateTime<Utc>, headers: &[(&str, &str)]) -> Resp {
    let id = notification_of(task, remind_at);
    as_service(app, user, &format!("/internal/v1/notifications/{id}"), &json!({"task_id": task, "remind_at": remind_at}), headers).await
}

async fn mark_read(app: &TestApp, user: &str, id: &str) -> Resp {
    app.send(Some(user), "POST", &format!("/v1/notifications/{id}/read"), None, &[]).await
}

#[tokio::test]
async fn a_fired_reminders_notification_is_readable_only_once_the_users_stream_recorded_it() {
    let app = spawn_app().await;
    let (task, remind_at) = reminded_task(&app, ALICE).await;
    let fired = as_service(&app, ALICE, &format!("/internal/v1/tasks/{task}/remind"), &json!({"remind_at": remind_at}), &[]).await;
    assert_eq!(fired.status, StatusCode::OK, "{}", fired.text);
    let id = notification_of(&task, remind_at);

    // The reminder fired in the task's stream, but the user's stream has not recorded it: 404, and
    // the detail says why.
    let early = mark_read(&app, ALICE, &id).await;
    assert_problem(&early, 404);
    assert_eq!(problem_type(&early), "urn:taskstream:problem:not-found");
    assert!(early.body["detail"].as_str().unwrap().contains("recorded"), "{}", early.text);

    // Recorded: `notification.created` in the user's stream, keyed by the user id.
    let recorded = record(&app, ALICE, &task, remind_at, &[("Idempotency-Key", &format!("reaction:{id}"))]).await;
    assert_eq!(recorded.status, StatusCode::OK, "{}", recorded.text);
    assert_eq!((recorded.body["notification_id"].as_str(), recorded.body["version"].as_u64()), (Some(id.as_str()), Some(1)));
    let last = app.log.records().pop().unwrap();
    assert_eq!((last.key.as_str(), last.header("ce_type").as_deref(), last.header("ce_userid").as_deref()), (ALICE, Some("notification.created"), Some(ALICE)));
    let data: Value = serde_json::from_slice(&last.payload).unwrap();
    assert_eq!(data, json!({"notification_id": id, "task_id": task, "remind_at": remind_at}));

    // The reactor's re-send: the same Idempotency-Key gets the first answer; without it (or after
    // the key is forgotten) a 409, which the reactor counts as done. Nothing more is appended.
    let len = app.log.len();
    let again = record(&app, ALICE, &task, remind_at, &[("Idempotency-Key", &format!("reaction:{id}"))]).await;
    assert_eq!((again.status, again.header("idempotent-replayed")), (StatusCode::OK, Some("true")), "{}", again.text);
    assert_eq!(again.body, recorded.body);
    let conflict = record(&app, ALICE, &task, remind_at, &[]).await;
    assert_problem(&conflict, 409);
    assert_eq!(app.log.len(), len);

    // Now it can be read, once; another user has no such notification.
    let read = mark_read(&app, ALICE, &id).await;
    assert_eq!(read.status, StatusCode::OK, "{}", read.text);
    assert_eq!((read.body["notification_id"].as_str(), read.body["version"].as_u64()), (Some(id.as_str()), Some(2)));
    assert_problem(&mark_read(&app, ALICE, &id).await, 409);
    assert_problem(&mark_read(&app, BOB, &id).await, 404);
    assert_eq!(app.log.len(), len + 1);
}

#[tokio::test]
async fn recording_a_notification_is_for_the_service_only_and_checks_the_derived_id() {
    let app = spawn_app().await;
    let (task, remind_at) = reminded_task(&app, ALICE).await;
    let id = notification_of(&task, remind_at);
    // To a user the route does not exist.
    let by_user =
        app.send(Some(ALICE), "POST", &format!("/internal/v1/notifications/{id}"), Some(&json!({"task_id": task, "remind_at": remind_at})), &[]).await;
    assert_problem(&by_user, 404);
    // The id must be the reminder's (task, remind time); the body is checked like any other.
    let recorded = record(&app, ALICE, &task, remind_at, &[]).await;
    assert_eq!(recorded.status, StatusCode::OK, "{}", recorded.text);
    let forged =
        as_service(&app, ALICE, &format!("/internal/v1/notifications/{}", uuid::Uuid::new_v4()), &json!({"task_id": task, "remind_at": remind_at}), &[]).await;
    assert_field_error(&forged, "notification_id");
    let unknown_field =
        as_service(&app, ALICE, &format!("/internal/v1/notifications/{id}"), &json!({"task_id": task, "remind_at": remind_at, "x": 1}), &[]).await;
    assert_field_error(&unknown_field, "x");
    assert_problem(&as_service(&app, ALICE, "/internal/v1/notifications/not-a-uuid", &json!({"task_id": task, "remind_at": remind_at}), &[]).await, 404);
    // Only the one recorded above reached the log (after the task's creation).
    assert_eq!(app.log.len(), 2);
}

#[tokio::test]
async fn recorded_and_read_notifications_survive_a_restart() {
    let app = spawn_app().await;
    let (task, remind_at) = reminded_task(&app, ALICE).await;
    let (first, second) = (remind_at, remind_at - chrono::Duration::days(1));
    assert_eq!(record(&app, ALICE, &task, first, &[]).await.status, StatusCode::OK);
    assert_eq!(record(&app, ALICE, &task, second, &[]).await.status, StatusCode::OK);
    let read = notification_of(&task, first);
    assert_eq!(mark_read(&app, ALICE, &read).await.status, StatusCode::OK);

    // A new command API over the same log knows both, from the user's stream alone.
    let restarted = spawn_app_over(app.log.clone()).await;
    assert_problem(&mark_read(&restarted, ALICE, &read).await, 409);
    assert_problem(&record(&restarted, ALICE, &task, second, &[]).await, 409);
    let r = mark_read(&restarted, ALICE, &notification_of(&task, second)).await;
    assert_eq!((r.status, r.body["version"].as_u64()), (StatusCode::OK, Some(4)), "{}", r.text);
}

#[tokio::test]
async fn an_undecodable_notification_id_is_a_problem_json_404_like_an_unknown_one() {
    let app = spawn_app().await;
    for path in ["/v1/notifications/%FF/read", "/v1/notifications/not-a-uuid/read"] {
        let r = app.send(Some(ALICE), "POST", path, None, &[]).await;
        assert_problem(&r, 404);
    }
    let r = as_service(&app, ALICE, "/internal/v1/notifications/%FF", &json!({"task_id": uuid::Uuid::nil(), "remind_at": "2030-01-01T00:00:00Z"}), &[]).await;
    assert_problem(&r, 404);
}
