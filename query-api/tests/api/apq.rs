//! Automatic persisted queries (Apollo's APQ protocol) over POST and GET: a hash alone is
//! PERSISTED_QUERY_NOT_FOUND until the hash is sent with its document, after which the hash alone
//! is answered; a hash that does not match its document is refused; a persisted document meets the
//! same limits as one sent in full.

use axum::body::Body;
use axum::http::Request;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::helpers::{base, spawn_app, Answer, SeedTask, TestApp};
use crate::introspection::GRAPHIQL_INTROSPECTION;

fn sha256(query: &str) -> String {
    format!("{:x}", Sha256::digest(query.as_bytes()))
}

fn persisted(hash: &str) -> Value {
    json!({"persistedQuery": {"version": 1, "sha256Hash": hash}})
}

/// POST /graphql as alice with the hash, and the document when given.
async fn post(app: &TestApp, hash: &str, query: Option<&str>, variables: Value) -> Answer {
    let mut body = json!({"extensions": persisted(hash), "variables": variables});
    if let Some(q) = query {
        body["query"] = json!(q);
    }
    app.post_raw(Some(&app.bearer("alice")), None, body.to_string()).await
}

/// GET /graphql?extensions=..&variables=..[&query=..] as alice.
async fn get(app: &TestApp, hash: &str, query: Option<&str>, variables: Value) -> Answer {
    let mut params = url::form_urlencoded::Serializer::new(String::new());
    params.append_pair("extensions", &persisted(hash).to_string()).append_pair("variables", &variables.to_string());
    if let Some(q) = query {
        params.append_pair("query", q);
    }
    let req = Request::get(format!("/graphql?{}", params.finish())).header("authorization", app.bearer("alice")).body(Body::empty()).unwrap();
    app.send(req).await
}

fn assert_not_found(a: &Answer) {
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.message(), "PersistedQueryNotFound", "{}", a.body);
    assert_eq!(a.code(), Some("PERSISTED_QUERY_NOT_FOUND"), "{}", a.body);
    assert!(a.body.get("data").is_none_or(Value::is_null), "{}", a.body);
}

fn data(a: &Answer) -> &Value {
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a.body.get("errors").is_none(), "{}", a.body);
    &a.body["data"]
}

#[tokio::test]
async fn a_hash_is_unknown_until_it_is_sent_with_its_document_then_it_stands_for_it() {
    let app = spawn_app().await;
    let id = app.seed(&SeedTask::new("alice", "persisted", base())).await;
    let query = "query Title($id: ID!) { task(id: $id) { title } }";
    let hash = sha256(query);
    let vars = json!({"id": id});
    let want = json!({"task": {"title": "persisted"}});

    // POST: the hash alone, then with the document, then alone again.
    assert_not_found(&post(&app, &hash, None, vars.clone()).await);
    assert_eq!(data(&post(&app, &hash, Some(query), vars.clone()).await), &want);
    assert_eq!(data(&post(&app, &hash, None, vars.clone()).await), &want);
    // GET knows what POST registered.
    assert_eq!(data(&get(&app, &hash, None, vars.clone()).await), &want);

    // GET: the same steps for another document.
    let query = "query Stats { stats { total open } }";
    let hash = sha256(query);
    assert_not_found(&get(&app, &hash, None, json!({})).await);
    let want = json!({"stats": {"total": 1, "open": 1}});
    assert_eq!(data(&get(&app, &hash, Some(query), json!({})).await), &want);
    assert_eq!(data(&get(&app, &hash, None, json!({})).await), &want);
    assert_eq!(data(&post(&app, &hash, None, json!({})).await), &want);
}

#[tokio::test]
async fn a_wrong_hash_or_version_is_refused_and_persisted_documents_meet_the_limits() {
    let app = spawn_app().await;
    let a = post(&app, &sha256("{ stats { total } }"), Some("{ stats { open } }"), json!({})).await;
    assert_eq!((a.status, a.code()), (200, Some("BAD_REQUEST")), "{}", a.body);
    assert!(a.message().contains("does not match"), "{}", a.body);
    let body = json!({"query": "{ stats { total } }", "extensions": {"persistedQuery": {"version": 2, "sha256Hash": sha256("{ stats { total } }")}}});
    let a = app.post_raw(Some(&app.bearer("alice")), None, body.to_string()).await;
    assert_eq!(a.code(), Some("BAD_REQUEST"), "{}", a.body);

    // Over the alias limit (30): refused when registered, and when named by its hash.
    let aliases: String = (0..31).map(|i| format!("a{i}: stats {{ total }} ")).collect();
    let query = format!("{{ {aliases} }}");
    let hash = sha256(&query);
    for a in [post(&app, &hash, Some(&query), json!({})).await, post(&app, &hash, None, json!({})).await] {
        assert_eq!(a.code(), Some("QUERY_TOO_COMPLEX"), "{}", a.body);
    }

    // GraphiQL's introspection (deeper than data queries may go) named by its hash is still
    // introspection, with its own depth limit.
    let hash = sha256(GRAPHIQL_INTROSPECTION);
    assert!(data(&post(&app, &hash, Some(GRAPHIQL_INTROSPECTION), json!({})).await)["__schema"]["types"].is_array());
    assert!(data(&post(&app, &hash, None, json!({})).await)["__schema"]["types"].is_array());
}

#[tokio::test]
async fn get_runs_a_query_sent_in_full_and_without_one_serves_graphiql() {
    let app = spawn_app().await;
    let req = Request::get("/graphql?query=%7B%20stats%20%7B%20total%20%7D%20%7D").header("authorization", app.bearer("alice")).body(Body::empty()).unwrap();
    assert_eq!(data(&app.send(req).await), &json!({"stats": {"total": 0}}));
    let unauthenticated = app.get("/graphql?query=%7B%20stats%20%7B%20total%20%7D%20%7D").await;
    assert_eq!((unauthenticated.status, unauthenticated.code()), (401, Some("UNAUTHENTICATED")));
    let bad = Request::get("/graphql?query=%7B%7D&variables=nope").header("authorization", app.bearer("alice")).body(Body::empty()).unwrap();
    let bad = app.send(bad).await;
    assert_eq!((bad.status, bad.code()), (400, Some("BAD_REQUEST")), "{}", bad.body);
    let page = app.get("/graphql?unrelated=1").await;
    assert_eq!(page.status, 200);
    assert!(page.headers["content-type"].to_str().unwrap().starts_with("text/html"));
}
