//! Rate limits: a burst larger than the budget gets some RATE_LIMITED answers (429 with
//! Retry-After), never a 5xx, and other callers keep their own budget.

use std::collections::HashMap;
use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::Request;
use serde_json::json;

use platform::ratelimit::{Rate, RateLimits};
use query_api::Limits;

use crate::helpers::{spawn_app_with, Answer, FakeWatermarks, TestApp, STATS};

async fn from(app: &TestApp, address: &str, authorization: Option<&str>) -> Answer {
    let mut req = Request::post("/graphql").header("content-type", "application/json");
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    let mut req = req.body(Body::from(json!({"query": STATS}).to_string())).unwrap();
    req.extensions_mut().insert(ConnectInfo(address.parse::<SocketAddr>().unwrap()));
    app.send(req).await
}

#[tokio::test]
async fn a_burst_over_a_users_budget_is_rate_limited_and_other_users_are_not() {
    let rate = RateLimits { per_user: Rate { per_second: 1, burst: 5 }, per_address: Rate { per_second: 1, burst: 3 } };
    let app = spawn_app_with(Limits { rate, ..Limits::default() }, FakeWatermarks(Some(HashMap::new()))).await;
    let alice = app.bearer("alice");
    let mut statuses = Vec::new();
    for _ in 0..20 {
        let a = from(&app, "10.0.0.1:1000", Some(&alice)).await;
        if a.status == 429 {
            assert_eq!(a.code(), Some("RATE_LIMITED"), "{}", a.body);
            assert!(a.message().contains("rate limit"), "{}", a.body);
            let retry: u64 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
            assert!((1..=2).contains(&retry), "{retry}");
        }
        statuses.push(a.status);
    }
    assert!(statuses.iter().all(|s| *s == 200 || *s == 429), "{statuses:?}");
    assert!(statuses.iter().filter(|s| **s == 200).count() >= 5, "{statuses:?}");
    assert!(statuses.iter().filter(|s| **s == 429).count() >= 10, "{statuses:?}");
    // Bob, from the same address, has his own budget.
    assert_eq!(from(&app, "10.0.0.1:1000", Some(&app.bearer("bob"))).await.status, 200);

    // Without a valid token the budget is the address's: 401 until it is spent, then 429.
    let statuses: Vec<u16> =
        futures::future::join_all((0..10).map(|_| from(&app, "10.0.0.9:1000", Some("Bearer nonsense")))).await.iter().map(|a| a.status).collect();
    assert!(statuses.iter().all(|s| *s == 401 || *s == 429), "{statuses:?}");
    assert!(statuses.contains(&429) && statuses.iter().filter(|s| **s == 401).count() >= 3, "{statuses:?}");
    assert_eq!(from(&app, "10.0.0.10:1000", None).await.status, 401, "another address has its own budget");

    let metrics = app.get("/metrics").await;
    let text = metrics.body.as_str().unwrap_or_default();
    assert!(text.contains("graphql_rate_limited_total{key=\"user\"}") && text.contains("graphql_rate_limited_total{key=\"address\"}"), "{text}");
}
