//! Bad input is answered with RFC 9457 problem+json: 415, 400, 413, 422 naming the field, 405
//! with `Allow`, malformed `If-Match` / `Idempotency-Key` headers; and never with a 5xx.

use std::collections::HashSet;

use axum::body::Body;
use axum::http::{HeaderValue, Request, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{assert_field_error, assert_problem, problem_type, spawn_app, ALICE};

#[tokio::test]
async fn a_body_that_is_not_json_is_415() {
    let app = spawn_app().await;
    let id = app.create_task(ALICE, "t").await;
    for ct in
        [None, Some("text/plain"), Some("application/x-www-form-urlencoded"), Some("multipart/form-data; boundary=x"), Some("application/jsonx"), Some("json")]
    {
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
        Bad {
            auth: Some(HeaderValue::from_str(&format!("Bearer {}", "a".repeat(20_000))).unwrap()),
            ..bad("huge token", "POST", tasks, j(json!({"title": "x"})))
        },
        bad("NUL byte body", "POST", tasks, b"\x00".to_vec()),
        bad("invalid UTF-8", "POST", tasks, vec![0xc3, 0x28, 0xa0, 0xa1]),
        bad("deeply nested JSON", "POST", tasks, nested.clone().into_bytes()),
        bad("deeply nested PATCH", "PATCH", &task, nested.into_bytes()),
        bad("huge number", "POST", tasks, b"{\"title\": 1e999}".to_vec()),
        bad("lone surrogate", "POST", tasks, b"{\"title\": \"\\udc00\"}".to_vec()),
        bad("duplicate keys", "POST", tasks, b"{\"title\": \"a\", \"title\": \"b\"}".to_vec()),
        bad("year 275760", "POST", tasks, j(json!({"title": "x", "due_at": "+275760-09-13T00:00:00Z"}))),
        bad("year 0 with a long reminder", "POST", tasks, j(json!({"title": "x", "due_at": "0000-01-01T00:00:00Z", "remind_before": "P52W"}))),
        bad(
            "year 9999 recurring",
            "POST",
            tasks,
            j(json!({"title": "x", "due_at": "9999-12-31T23:59:59Z", "recurrence": "FREQ=SECONDLY", "remind_before": "PT1S"})),
        ),
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
        Bad {
            content_type: Some(HeaderValue::from_bytes(b"application/\xffjson").unwrap()),
            ..bad("non-ASCII content type", "POST", tasks, j(json!({"title": "x"})))
        },
        Bad {
            content_type: Some(HeaderValue::from_static("application/json; charset=utf-16")),
            ..bad("charset utf-16", "POST", tasks, j(json!({"title": "x"})))
        },
        Bad { headers: vec![("if-match", HeaderValue::from_static("\"4294967295\""))], ..bad("If-Match u32::MAX", "PATCH", &task, j(json!({"title": "x"}))) },
        Bad { headers: vec![("if-match", HeaderValue::from_static("W/\"1\""))], ..bad("weak If-Match", "PATCH", &task, j(json!({"title": "x"}))) },
        Bad { headers: vec![("if-match", HeaderValue::from_bytes(b"\"\xff\"").unwrap())], ..bad("non-ASCII If-Match", "POST", &complete, vec![]) },
        Bad {
            headers: vec![("idempotency-key", HeaderValue::from_str(&"k".repeat(10_000)).unwrap())],
            ..bad("10 000 character key", "POST", tasks, j(json!({"title": "x"})))
        },
        Bad {
            headers: vec![("x-correlation-id", HeaderValue::from_str(&"c".repeat(500)).unwrap())],
            ..bad("long correlation id", "POST", tasks, j(json!({"title": "x"})))
        },
        Bad {
            headers: vec![("traceparent", HeaderValue::from_static("zz-not-a-trace"))],
            ..bad("garbage traceparent", "POST", tasks, j(json!({"title": "x"})))
        },
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
