//! `GET /v1/me/export`, relayed to the query API: against a fake query API on a local socket that
//! records what it was sent and streams a document in several chunks.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http_body_util::BodyExt;
use tower::ServiceExt;

use command_api::idempotency::IdempotencyCache;
use command_api::query_api::QueryApi;
use command_api::writer::WriterConfig;
use command_api::AppState;
use test_support::Tokens;

use crate::helpers::{FakeLog, ALICE};

/// The headers of every request the fake query API received.
type Seen = Arc<Mutex<Vec<HeaderMap>>>;

/// A query API answering `GET /v1/me/export` with `{"tasks":[...]}` in `chunks` chunks (and 503
/// problem+json when the caller sends `X-Consistency-Token: late`). Returns its base URL.
async fn fake_query_api(chunks: usize) -> (String, Seen) {
    let seen: Seen = Arc::default();
    let recorded = seen.clone();
    let app = axum::Router::new().route(
        "/v1/me/export",
        get(move |headers: HeaderMap| {
            let recorded = recorded.clone();
            async move {
                let late = headers.get("x-consistency-token").is_some_and(|t| t == "late");
                recorded.lock().unwrap().push(headers);
                if late {
                    return (StatusCode::SERVICE_UNAVAILABLE, [("content-type", "application/problem+json"), ("retry-after", "1")], r#"{"status":503}"#)
                        .into_response();
                }
                let parts: Vec<Result<Bytes, std::io::Error>> = std::iter::once(Ok(Bytes::from_static(b"{\"tasks\":[")))
                    .chain((0..chunks).map(|i| Ok(Bytes::from(format!("{}{{\"n\":{i}}}", if i == 0 { "" } else { "," })))))
                    .chain(std::iter::once(Ok(Bytes::from_static(b"]}"))))
                    .collect();
                let mut res = Response::new(Body::from_stream(futures::stream::iter(parts)));
                let h = res.headers_mut();
                h.insert("content-type", "application/json".parse().unwrap());
                h.insert("content-disposition", "attachment; filename=\"taskstream-export-alice.json\"".parse().unwrap());
                h.insert("x-internal", "not relayed".parse().unwrap());
                res
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

fn app(query_api: &str) -> (axum::Router, Tokens) {
    let tokens = Tokens::default();
    let state = AppState::with_config(FakeLog::default(), tokens.auth(), WriterConfig::default(), IdempotencyCache::new(100, Duration::from_secs(60)))
        .with_query_api(QueryApi::new(query_api).unwrap());
    (command_api::router(state, Duration::from_secs(10)), tokens)
}

async fn export(router: &axum::Router, authorization: Option<&str>, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap, String) {
    let mut req = Request::get("/v1/me/export");
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = router.clone().oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
    let (parts, body) = res.into_parts();
    (parts.status, parts.headers, String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap())
}

#[tokio::test]
async fn the_export_is_relayed_with_the_callers_token_and_streamed_back() {
    let (url, seen) = fake_query_api(500).await;
    let (router, tokens) = app(&url);
    let bearer = tokens.bearer(ALICE);
    let (status, headers, body) = export(&router, Some(&bearer), &[("x-consistency-token", "abc"), ("x-correlation-id", "corr-9"), ("cookie", "no")]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers["content-disposition"], "attachment; filename=\"taskstream-export-alice.json\"");
    assert!(headers.get("x-internal").is_none(), "only the answer's own headers travel back");
    let doc: serde_json::Value = serde_json::from_str(&body).expect("the whole document");
    assert_eq!(doc["tasks"].as_array().unwrap().len(), 500);
    let sent = seen.lock().unwrap().pop().expect("the query API was asked");
    assert_eq!(sent["authorization"].to_str().unwrap(), bearer);
    assert_eq!((sent["x-consistency-token"].to_str().unwrap(), sent["x-correlation-id"].to_str().unwrap()), ("abc", "corr-9"));
    assert!(sent.get("cookie").is_none(), "nothing else is passed on");

    // The query API's refusals are relayed as they are.
    let (status, headers, body) = export(&router, Some(&bearer), &[("x-consistency-token", "late")]).await;
    assert_eq!((status, body.as_str()), (StatusCode::SERVICE_UNAVAILABLE, r#"{"status":503}"#));
    assert_eq!((headers["content-type"].to_str().unwrap(), headers["retry-after"].to_str().unwrap()), ("application/problem+json", "1"));
}

#[tokio::test]
async fn without_a_valid_token_the_query_api_is_not_asked() {
    let (url, seen) = fake_query_api(1).await;
    let (router, _) = app(&url);
    for authorization in [None, Some("Bearer nope")] {
        let (status, headers, body) = export(&router, authorization, &[]).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(headers["content-type"], "application/problem+json");
        assert!(body.contains("urn:taskstream:problem:unauthorized"), "{body}");
    }
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn an_unreachable_query_api_is_a_503_problem_with_retry_after() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (router, tokens) = app(&format!("http://127.0.0.1:{port}"));
    let (status, headers, body) = export(&router, Some(&tokens.bearer(ALICE)), &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(headers["content-type"], "application/problem+json");
    assert_eq!(headers["retry-after"], "1");
    let problem: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((problem["type"].as_str(), problem["status"].as_u64()), (Some("urn:taskstream:problem:query-api-unavailable"), Some(503)));
    assert!(!problem["detail"].as_str().unwrap().contains("127.0.0.1"), "the cause is logged, not sent: {problem}");
}
