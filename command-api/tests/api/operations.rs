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
