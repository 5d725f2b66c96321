//! Documentation and operations endpoints: `/v1/openapi.json`, `/healthz`, `/metrics`.

use axum::http::StatusCode;

use crate::helpers::{spawn_app, ALICE};

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

/// What each operation can be answered, as its handler, the extractors and `ApiError` decide
/// (`./dev test` also runs schemathesis against a live command API, which fails on any status the
/// document does not list).
const OPERATIONS: &[(&str, &str, &[&str])] = &[
    ("post", "/v1/tasks", &["201", "400", "401", "409", "412", "413", "415", "422", "429", "503"]),
    ("patch", "/v1/tasks/{id}", &["200", "400", "401", "404", "409", "412", "413", "415", "422", "429", "503"]),
    ("delete", "/v1/tasks/{id}", &["200", "400", "401", "404", "409", "412", "422", "429", "503"]),
    ("post", "/v1/tasks/{id}/complete", &["200", "400", "401", "404", "409", "412", "422", "429", "503"]),
    ("post", "/v1/tasks/{id}/reopen", &["200", "400", "401", "404", "409", "412", "422", "429", "503"]),
    ("post", "/v1/notifications/{id}/read", &["200", "400", "401", "404", "409", "422", "429", "503"]),
    ("put", "/v1/webhook", &["200", "400", "401", "413", "415", "422", "429", "503"]),
    ("delete", "/v1/webhook", &["200", "400", "401", "404", "422", "429", "503"]),
    ("delete", "/v1/me", &["200", "400", "401", "422", "429", "503"]),
];

#[tokio::test]
async fn every_operation_documents_every_status_it_can_answer() {
    let app = spawn_app().await;
    let doc = app.get("/v1/openapi.json").await.body;
    let mut operations = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            let responses = op["responses"].as_object().unwrap_or_else(|| panic!("{method} {path}: no responses"));
            let statuses: Vec<&str> = responses.keys().map(String::as_str).collect();
            let header_params: Vec<&str> =
                op["parameters"].as_array().into_iter().flatten().filter(|p| p["in"] == "header").filter_map(|p| p["name"].as_str()).collect();
            let has_path_id = op["parameters"].as_array().into_iter().flatten().any(|p| p["in"] == "path");
            let op_name = format!("{method} {path}");
            if method == "get" && path == "/v1/asyncapi.json" {
                // A document: outside the request budgets, like /v1/openapi.json.
                assert_eq!(statuses, ["200"], "{op_name}");
                continue;
            }
            if method == "get" && path == "/v1/me/export" {
                // A read relayed to the query API: no Idempotency-Key; its own answer set.
                assert_eq!(statuses, ["200", "400", "401", "429", "503"], "{op_name}");
                assert_eq!(header_params, ["X-Consistency-Token"], "{op_name}");
                for (status, response) in responses {
                    let types: Vec<&str> =
                        response["content"].as_object().unwrap_or_else(|| panic!("{op_name} {status}: no content")).keys().map(String::as_str).collect();
                    assert_eq!(types, [if status == "200" { "application/json" } else { "application/problem+json" }], "{op_name} {status}");
                }
                assert!(responses["200"]["headers"].get("Content-Disposition").is_some(), "{op_name}: the download's name is documented");
                assert!(responses["503"]["headers"].get("Retry-After").is_some(), "{op_name}: 503 documents Retry-After");
                continue;
            }
            if method == "get" {
                // Not a command: `GET /v1/cluster` (public, always answers within the rate limits).
                assert_eq!(statuses, ["200", "429"], "{op_name}");
                assert!(responses["429"]["headers"].get("Retry-After").is_some(), "{op_name}: 429 documents Retry-After");
                continue;
            }
            // What every command can meet, whatever it is: a malformed header, no token, a reused
            // Idempotency-Key (every command honours the header), a rate limit, the log being unavailable.
            for status in ["400", "401", "422", "429", "503"] {
                assert!(statuses.contains(&status), "{op_name} does not document {status}: {statuses:?}");
            }
            assert!(header_params.contains(&"Idempotency-Key"), "{op_name} does not document Idempotency-Key: {header_params:?}");
            for p in op["parameters"].as_array().into_iter().flatten().filter(|p| p["in"] == "header") {
                assert_eq!(p["schema"]["type"], "string", "{op_name}: a header is a string, never null: {p}");
                assert!(p["schema"]["pattern"].is_string(), "{op_name}: the header's format is documented: {p}");
            }
            if op.get("requestBody").is_some() {
                assert!(statuses.contains(&"413") && statuses.contains(&"415"), "{op_name} takes a body: 413 and 415 ({statuses:?})");
            }
            if header_params.contains(&"If-Match") {
                assert!(statuses.contains(&"412"), "{op_name} takes If-Match: 412 ({statuses:?})");
            }
            if has_path_id {
                assert!(statuses.contains(&"404"), "{op_name} names a thing by id: 404 ({statuses:?})");
            }
            for (status, response) in responses {
                let content = response["content"].as_object().unwrap_or_else(|| panic!("{op_name} {status}: no content"));
                let types: Vec<&str> = content.keys().map(String::as_str).collect();
                if status.starts_with('2') {
                    assert_eq!(types, ["application/json"], "{op_name} {status}");
                } else {
                    assert_eq!(types, ["application/problem+json"], "{op_name} {status}");
                    assert_eq!(content["application/problem+json"]["schema"]["$ref"], "#/components/schemas/Problem", "{op_name} {status}");
                }
            }
            assert!(responses["503"]["headers"].get("Retry-After").is_some(), "{op_name}: 503 documents Retry-After");
            assert!(responses["429"]["headers"].get("Retry-After").is_some(), "{op_name}: 429 documents Retry-After");
            operations.push((method.clone(), path.clone(), statuses.iter().map(|s| s.to_string()).collect::<Vec<_>>()));
        }
    }
    let mut expected: Vec<_> = OPERATIONS.iter().map(|(m, p, s)| (m.to_string(), p.to_string(), s.iter().map(|s| s.to_string()).collect::<Vec<_>>())).collect();
    operations.sort();
    expected.sort();
    assert_eq!(operations, expected, "the documented operations and their statuses");
    let schemas = &doc["components"]["schemas"];
    assert!(schemas["Problem"]["properties"]["errors"].is_object() && schemas.get("ProblemField").is_some(), "Problem is a component: {schemas}");
}

#[tokio::test]
async fn the_cluster_view_shows_every_partition_owned_and_ready() {
    let app = spawn_app().await;
    let r = app.get("/v1/cluster").await;
    assert_eq!(r.status, axum::http::StatusCode::OK, "{}", r.text);
    let parts = r.body["partitions"].as_array().expect("partitions");
    assert_eq!(parts.len(), crate::helpers::PARTITIONS as usize);
    for (i, p) in parts.iter().enumerate() {
        assert_eq!(p["partition"], i);
        assert_eq!((p["owner"].as_str(), p["ready"].as_bool(), p["phase"].as_str()), (r.body["instance"].as_str(), Some(true), Some("ready")), "{p}");
    }
}

/// `GET /v1/asyncapi.json`: the event catalogue, without a token, as committed under `schemas/`.
#[tokio::test]
async fn the_event_catalogue_is_served_without_a_token() {
    let app = spawn_app().await;
    let r = app.get("/v1/asyncapi.json").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(r.header("content-type").unwrap().starts_with("application/json"));
    assert_eq!(r.body["asyncapi"], "3.0.0");
    let committed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../schemas/asyncapi.json")).unwrap()).unwrap();
    assert_eq!(r.body, committed, "the served catalogue is the committed one (default topics)");
    for t in ["task.created", "task.updated", "task.completed", "task.reopened", "task.deleted", "task.reminder_due", "notification.read", "webhook.registered"]
    {
        assert!(r.body["components"]["schemas"].get(format!("{t}.v1")).is_some(), "{t} v1 missing");
    }
    let doc = app.get("/v1/openapi.json").await.body;
    assert!(doc["paths"]["/v1/asyncapi.json"]["get"].is_object(), "documented in the OpenAPI document");
    assert!(doc["paths"]["/v1/asyncapi.json"]["get"].get("security").is_none(), "no token needed");
}
