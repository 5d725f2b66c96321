//! Authentication: every query needs a valid bearer token; the GraphiQL page does not.

use serde_json::json;
use test_support::Tokens;

use crate::helpers::spawn_app;

#[tokio::test]
async fn queries_need_a_valid_bearer_token_but_graphiql_does_not() {
    let app = spawn_app().await;
    let body = json!({"query": "{ stats { total } }"}).to_string();
    let expired = format!("Bearer {}", app.tokens.expired("alice"));
    let foreign = Tokens::signed_with("another secret").bearer("alice");
    let token = app.tokens.user("alice");
    for (authorization, why) in
        [(None, "missing"), (Some("Bearer "), "empty"), (Some(token.as_str()), "no Bearer"), (Some(&*expired), "expired"), (Some(&*foreign), "wrong key")]
    {
        let a = app.post_raw(authorization, None, body.clone()).await;
        assert_eq!((a.status, a.code()), (401, Some("UNAUTHENTICATED")), "{why}: {}", a.body);
        assert!(!a.message().is_empty() && a.body.get("data").is_none(), "{why}: {}", a.body);
        assert_eq!(a.headers["www-authenticate"], "Bearer");
    }
    assert_eq!(app.post_raw(Some(&app.bearer("alice")), None, body).await.status, 200);
    let page = app.get("/graphql").await;
    assert_eq!(page.status, 200);
    assert!(page.headers["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(page.body.as_str().unwrap().contains("/graphql/ws"), "GraphiQL with the subscription endpoint");
}
