//! The command API's rate limits on the real stack: the `Application` (as `main` builds it) on a
//! topic of its own in the local Kafka broker, driven over HTTP from real sockets, so that the
//! client address is the connection's. A burst larger than a budget gets some 429 problem+json
//! answers with `Retry-After` and never a 5xx; other users, other addresses and the service identity
//! keep their own budgets; refusals are counted in `/metrics`.
//!
//! Needs `KAFKA_BROKERS` (`./dev test` provisions the broker).

use std::net::IpAddr;
use std::time::Duration;

use clap::Parser;
use reqwest::{Client, Method, StatusCode};
use serde_json::{json, Value};

use command_api::{Application, Settings};
use test_support::{eventually, required_env, Tokens};

struct App {
    url: String,
    http: Client,
    tokens: Tokens,
}

/// A command API with the rate limits given as command-line arguments, ready (it owns every
/// partition of its own topic).
async fn spawn_app(limits: &[&str]) -> App {
    let brokers = required_env("KAFKA_BROKERS");
    let run = uuid::Uuid::new_v4().simple().to_string();
    let topic = format!("task-events-ratelimit-{run}");
    let id = format!("taskstream-ratelimit-{run}");
    let mut args = vec![
        "command-api",
        "--addr=127.0.0.1:0",
        "--kafka-brokers",
        &brokers,
        "--task-events-topic",
        &topic,
        "--task-events-partitions=2",
        "--transactional-id",
        &id,
        "--auth-jwt-secret",
        test_support::tokens::USER_SECRET,
        "--service-jwt-secret",
        test_support::tokens::SERVICE_SECRET,
        "--kek",
        test_support::tokens::TEST_KEK,
    ];
    args.extend_from_slice(limits);
    let settings = Settings::try_parse_from(args).expect("settings");
    let app = Application::build(settings).await.expect("the command API starts");
    let url = format!("http://127.0.0.1:{}", app.port());
    tokio::spawn(app.run_until_stopped());
    let http = Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let ready = format!("{url}/readyz");
    eventually("the command API to be ready", Duration::from_secs(60), || async {
        http.get(&ready).send().await.ok().filter(|r| r.status() == StatusCode::OK)
    })
    .await
    .expect("ready");
    App { url, http, tokens: Tokens::default() }
}

struct Answer {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl App {
    async fn send(&self, http: &Client, method: Method, path: &str, authorization: Option<&str>, body: Option<Value>) -> Answer {
        let mut req = http.request(method, format!("{}{path}", self.url));
        if let Some(a) = authorization {
            req = req.header("authorization", a);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.expect("an answer");
        let (status, headers) = (res.status(), res.headers().clone());
        let text = res.text().await.unwrap_or_default();
        Answer { status, headers, body: serde_json::from_str(&text).unwrap_or(Value::String(text)) }
    }

    async fn create(&self, authorization: Option<&str>) -> Answer {
        self.send(&self.http, Method::POST, "/v1/tasks", authorization, Some(json!({"title": "rate limited?"}))).await
    }
}

/// A 429 as the contract says: problem+json of type rate-limited, with `Retry-After` in seconds.
fn assert_rate_limited(a: &Answer, key: &str) {
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(a.headers["content-type"], "application/problem+json");
    assert_eq!(a.body["type"], "urn:taskstream:problem:rate-limited", "{}", a.body);
    assert_eq!(a.body["status"], 429, "{}", a.body);
    assert_eq!(a.body["title"], "Too Many Requests", "{}", a.body);
    let detail = a.body["detail"].as_str().unwrap_or_default();
    assert!(detail.contains(&format!("the rate limit of this {key} is reached")), "{detail}");
    let retry: u64 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_over_a_budget_is_answered_429_and_other_callers_keep_theirs() {
    let app =
        spawn_app(&["--command-rate-per-user=1", "--command-rate-burst-per-user=5", "--command-rate-per-address=1", "--command-rate-burst-per-address=3"])
            .await;

    // Alice sends 20 commands at once: 5 fit her burst (a sixth if a second passes), the rest are 429.
    let alice = app.tokens.bearer("alice");
    let answers = futures::future::join_all((0..20).map(|_| app.create(Some(&alice)))).await;
    let statuses: Vec<u16> = answers.iter().map(|a| a.status.as_u16()).collect();
    assert!(statuses.iter().all(|s| *s == 201 || *s == 429), "no 5xx, only 201 or 429: {statuses:?}");
    assert!((5..=7).contains(&statuses.iter().filter(|s| **s == 201).count()), "{statuses:?}");
    for a in answers.iter().filter(|a| a.status == StatusCode::TOO_MANY_REQUESTS) {
        assert_rate_limited(a, "user");
    }
    // Bob, from the same address, has his own budget.
    assert_eq!(app.create(Some(&app.tokens.bearer("bob"))).await.status, StatusCode::CREATED);
    // The service identity (the projector's reactions) is not limited, whoever it acts for.
    let service = format!("Bearer {}", app.tokens.service("projector", "alice"));
    for _ in 0..20 {
        let a = app.send(&app.http, Method::GET, "/v1/cluster", Some(&service), None).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    }

    // Without a valid token the budget is the client address's: 401 until it is spent, then 429.
    let answers = futures::future::join_all((0..10).map(|_| app.create(Some("Bearer nonsense")))).await;
    let statuses: Vec<u16> = answers.iter().map(|a| a.status.as_u16()).collect();
    assert!(statuses.iter().all(|s| *s == 401 || *s == 429), "{statuses:?}");
    assert!((3..=5).contains(&statuses.iter().filter(|s| **s == 401).count()), "{statuses:?}");
    for a in answers.iter().filter(|a| a.status == StatusCode::TOO_MANY_REQUESTS) {
        assert_rate_limited(a, "address");
    }
    // Another address (a connection from 127.0.0.2) has a budget of its own.
    let other = Client::builder().local_address(IpAddr::from([127, 0, 0, 2])).build().unwrap();
    assert_eq!(app.send(&other, Method::POST, "/v1/tasks", None, Some(json!({"title": "x"}))).await.status, StatusCode::UNAUTHORIZED);
    // Health, readiness, metrics and the document are not limited.
    for path in ["/healthz", "/readyz", "/v1/openapi.json"] {
        for _ in 0..5 {
            assert_eq!(app.send(&app.http, Method::GET, path, None, None).await.status, StatusCode::OK, "{path}");
        }
    }

    let metrics = app.send(&app.http, Method::GET, "/metrics", None, None).await;
    let text = metrics.body.as_str().unwrap_or_default();
    for key in ["user", "address"] {
        let line = format!("command_api_rate_limited_total{{key=\"{key}\"}}");
        assert!(text.lines().any(|l| l.starts_with(&line)), "{line} missing from\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_budgets_let_a_benchmark_burst_through() {
    let app = spawn_app(&[]).await;
    let alice = app.tokens.bearer("alice");
    // More at once than any client of the tests or ./dev bench sends per user.
    let statuses: Vec<u16> = futures::future::join_all((0..500).map(|_| app.create(Some(&alice)))).await.iter().map(|a| a.status.as_u16()).collect();
    assert!(statuses.iter().all(|s| *s == 201), "{:?}", statuses.iter().filter(|s| **s != 201).collect::<Vec<_>>());
}
