//! Start-up: the services come up without PostgreSQL and become ready when it comes (issue 11,
//! defect 6), and they refuse weak secrets unless in dev mode (defect 10).

use std::process::Stdio;
use std::time::Duration;

use e2e::postgres::PrivatePostgres;
use e2e::{bin_dir, free_port};
use serde_json::{json, Value};
use test_support::tokens::{SERVICE_SECRET, USER_SECRET};
use test_support::{eventually, required_env, Tokens};
use tokio::process::{Child, Command};

/// One service binary, started with `env` on a free port, in production mode (no TASKSTREAM_DEV).
struct Service {
    name: &'static str,
    child: Child,
    base: String,
}

impl Service {
    fn start(name: &'static str, addr_var: &str, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let port = free_port();
        let quiet = std::env::var("TEST_LOG").is_err();
        let child = Command::new(bin_dir().join(name))
            .env_remove("TASKSTREAM_DEV")
            .env("TASKSTREAM_KEK", test_support::tokens::TEST_KEK)
            .envs(env.iter().copied())
            .env(addr_var, format!("127.0.0.1:{port}"))
            .env("RUST_LOG", std::env::var("TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(if quiet { Stdio::null() } else { Stdio::inherit() })
            .stderr(if quiet { Stdio::null() } else { Stdio::inherit() })
            .kill_on_drop(true)
            .spawn()?;
        Ok(Self { name, child, base: format!("http://127.0.0.1:{port}") })
    }

    /// Waits until `path` answers `status` (returning the body), failing at once if the process exits.
    async fn wait_for(&mut self, http: &reqwest::Client, path: &str, status: u16, what: &str) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        loop {
            if let Some(exit) = self.child.try_wait()? {
                anyhow::bail!("{} exited ({exit}) while waiting for {what}", self.name);
            }
            if let Ok(r) = http.get(format!("{}{path}", self.base)).timeout(Duration::from_secs(5)).send().await {
                if r.status().as_u16() == status {
                    return Ok(r.text().await?);
                }
            }
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "{}: {what} did not happen within 90 s", self.name);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn graphql(http: &reqwest::Client, query_api: &Service, query: &str) -> anyhow::Result<(u16, Option<String>, Value)> {
    let res = http.post(format!("{}/graphql", query_api.base)).bearer_auth(Tokens::default().user("alice")).json(&json!({ "query": query })).send().await?;
    let status = res.status().as_u16();
    let retry_after = res.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
    Ok((status, retry_after, res.json().await.unwrap_or(Value::Null)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projector_and_query_api_start_without_postgres_and_become_ready_when_it_comes() -> anyhow::Result<()> {
    // A cluster that exists but is not running yet: nothing listens on its port.
    let pg = PrivatePostgres::init().await?;
    let (brokers, database_url) = (required_env("KAFKA_BROKERS"), pg.url("postgres"));
    let topic = format!("task-events-e2e-startup-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let env = [
        ("KAFKA_BROKERS", brokers.as_str()),
        ("DATABASE_URL", database_url.as_str()),
        ("TASK_EVENTS_TOPIC", topic.as_str()),
        ("TASK_EVENTS_PARTITIONS", "2"),
        ("AUTH_JWT_SECRET", USER_SECRET),
        ("SERVICE_JWT_SECRET", SERVICE_SECRET),
        ("COMMAND_API_URL", "http://127.0.0.1:9"),
    ];
    let http = reqwest::Client::new();
    let mut projector = Service::start("projector", "PROJECTOR_ADDR", &env)?;
    let mut query_api = Service::start("query-api", "QUERY_API_ADDR", &env)?;
    for service in [&mut projector, &mut query_api] {
        service.wait_for(&http, "/healthz", 200, "alive while PostgreSQL is down").await?;
        // Not ready, saying why, after at least one failed attempt (the process keeps going).
        let reason = eventually("a failed attempt to reach PostgreSQL", Duration::from_secs(60), || {
            let url = format!("{}/readyz", service.base);
            let http = http.clone();
            async move {
                let r = http.get(url).send().await.ok()?;
                let (status, body) = (r.status().as_u16(), r.text().await.ok()?);
                (status == 503 && body.starts_with("not ready: waiting for PostgreSQL")).then_some(body)
            }
        })
        .await?;
        assert!(reason.contains("retried"), "{}: {reason}", service.name);
        assert!(service.child.try_wait()?.is_none(), "{} exited", service.name);
    }
    // GraphQL before the read models can be reached: a clear 503.
    let (status, retry_after, body) = graphql(&http, &query_api, "{ stats { total } }").await?;
    assert_eq!(status, 503, "{body}");
    assert!(retry_after.is_some(), "{body}");
    assert_eq!(body["errors"][0]["extensions"]["code"], "NOT_READY", "{body}");

    pg.start_server()?;
    for service in [&mut projector, &mut query_api] {
        assert_eq!(service.wait_for(&http, "/readyz", 200, "ready once PostgreSQL is up").await?, "ready", "{}", service.name);
    }
    let (status, _, body) = graphql(&http, &query_api, "{ stats { total } }").await?;
    assert_eq!((status, &body["data"]["stats"]["total"]), (200, &json!(0)), "{body}");
    Ok(())
}

/// Runs `binary` with `env` (nothing reachable: the secrets are checked first) and returns its exit
/// success and everything it wrote; fails when it is still running after 30 s.
async fn run_to_exit(binary: &str, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<(bool, String)> {
    let mut cmd = Command::new(bin_dir().join(binary));
    cmd.args(args)
        .env_remove("TASKSTREAM_DEV")
        .env_remove("AUTH_JWT_SECRET")
        .env_remove("SERVICE_JWT_SECRET")
        .env("KAFKA_BROKERS", "127.0.0.1:1")
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none")
        .env("COMMAND_API_ADDR", "127.0.0.1:0")
        .env("QUERY_API_ADDR", "127.0.0.1:0")
        .env("PROJECTOR_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .env("TASKSTREAM_KEK", test_support::tokens::TEST_KEK)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .map_err(|_| anyhow::anyhow!("{binary} {env:?} was still running after 30 s: it did not refuse its secrets"))??;
    Ok((out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_refuse_missing_known_or_short_secrets_outside_dev_mode() -> anyhow::Result<()> {
    // A service, the environment it is started with, and what it must say.
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str);
    let cases: [Case; 6] = [
        ("command-api", vec![("AUTH_JWT_SECRET", "change-me"), ("SERVICE_JWT_SECRET", SERVICE_SECRET)], "AUTH_JWT_SECRET is a well-known default value"),
        ("command-api", vec![("AUTH_JWT_SECRET", USER_SECRET)], "SERVICE_JWT_SECRET is not set"),
        ("command-api", vec![("AUTH_JWT_SECRET", USER_SECRET), ("SERVICE_JWT_SECRET", "taskstream-dev-service-secret")], "SERVICE_JWT_SECRET is a well-known"),
        ("query-api", vec![("AUTH_JWT_SECRET", "taskstream-dev-secret")], "AUTH_JWT_SECRET is a well-known default value"),
        ("query-api", vec![("AUTH_JWT_SECRET", "only-twenty-one-bytes")], "AUTH_JWT_SECRET is only 21 bytes long"),
        ("projector", vec![("SERVICE_JWT_SECRET", "change-me-too")], "SERVICE_JWT_SECRET is a well-known default value"),
    ];
    for (binary, env, want) in cases {
        let (ok, output) = run_to_exit(binary, &[], &env).await?;
        assert!(!ok, "{binary} {env:?} started: {output}");
        assert!(output.contains("refusing to start with a weak secret") && output.contains(want), "{binary} {env:?}: {output}");
        assert!(output.contains("at least 32 bytes"), "{binary} {env:?}: {output}");
    }
    let (ok, output) = run_to_exit("projector", &["run"], &[("SERVICE_JWT_SECRET", "short")]).await?;
    assert!(!ok && output.contains("SERVICE_JWT_SECRET is only 5 bytes long"), "{output}");
    // The projector's one-shot commands sign nothing: no secret needed; without PostgreSQL they
    // fail at once and say so.
    for command in [&["status"][..], &["dlq", "list"][..]] {
        let (ok, output) = run_to_exit("projector", command, &[]).await?;
        assert!(!ok && !output.contains("SECRET"), "{command:?}: {output}");
        assert!(output.contains("PostgreSQL at 127.0.0.1:1 (database none, from DATABASE_URL) is not reachable"), "{command:?}: {output}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_starts_with_the_dev_secrets_and_warns_loudly() -> anyhow::Result<()> {
    let port = free_port();
    let mut child = Command::new(bin_dir().join("query-api"))
        .env("TASKSTREAM_DEV", "1")
        .env("AUTH_JWT_SECRET", "taskstream-dev-secret")
        .env("KAFKA_BROKERS", "127.0.0.1:1")
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none")
        .env("QUERY_API_ADDR", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn")
        .env("LOG_FORMAT", "pretty")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let http = reqwest::Client::new();
    eventually("the query API in dev mode to answer /healthz", Duration::from_secs(30), || {
        let (http, url) = (http.clone(), format!("http://127.0.0.1:{port}/healthz"));
        async move { http.get(url).send().await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
    })
    .await?;
    child.start_kill()?;
    let out = child.wait_with_output().await?;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("INSECURE") && log.contains("AUTH_JWT_SECRET is a well-known default value"), "{log}");
    Ok(())
}
