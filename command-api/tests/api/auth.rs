//! Authentication: a missing, malformed, expired or foreign token is a 401 with
//! `WWW-Authenticate`.

use axum::body::Body;
use axum::http::Request;

use test_support::Tokens;

use crate::helpers::{assert_problem, problem_type, spawn_app, ALICE};

#[tokio::test]
async fn missing_malformed_expired_and_foreign_tokens_are_401_with_www_authenticate() {
    let app = spawn_app().await;
    let id = app.create_task(ALICE, "mine").await;
    let expired = app.tokens.expired(ALICE);
    let wrong_secret = Tokens::signed_with("another-secret").user(ALICE);
    let empty_sub = app.tokens.user("");
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
    let expired_answer = app
        .raw(
            Request::post("/v1/tasks")
                .header("authorization", format!("Bearer {expired}"))
                .header("content-type", "application/json")
                .body(Body::from("{}"))
                .unwrap(),
        )
        .await;
    assert!(expired_answer.body["detail"].as_str().unwrap().contains("expired"), "{}", expired_answer.text);
    assert_eq!(app.log.len(), 1, "nothing unauthenticated was appended");
}
