//! A secured cluster: the whole stack against a broker whose only client listener is SASL_SSL with
//! SCRAM-SHA-512, behind a certificate of a private CA (deploy/local/sasl.sh, which `./dev test`
//! starts: `TASKSTREAM_SASL_BROKERS`, and `TASKSTREAM_SASL_CLIENT_CONFIG`, the client.properties it
//! writes). The services get the broker's address and librdkafka properties, nothing else: from
//! `KAFKA_CONFIG_*` variables, or from the file (`KAFKA_CONFIG_FILE`).

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use e2e::{bin_dir, free_port, Stack, StackOptions, Svc};
use serde_json::json;
use test_support::tokens::{SERVICE_SECRET, USER_SECRET};
use test_support::{eventually, required_env};
use tokio::io::AsyncBufReadExt;

const TASK: &str = "query($id: ID!) { task(id: $id) { id title version } }";

/// `(name, value)` of each property of a Java-style properties file.
fn properties(path: &str) -> anyhow::Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && l.contains('='))
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned())))
        .collect())
}

/// `sasl.password` -> `KAFKA_CONFIG_SASL_PASSWORD` (the names here have no '_').
fn variable(property: &str) -> String {
    format!("KAFKA_CONFIG_{}", property.replace('.', "_").to_uppercase())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stack_works_against_a_sasl_ssl_scram_cluster() -> anyhow::Result<()> {
    let brokers = required_env("TASKSTREAM_SASL_BROKERS");
    let client_file = required_env("TASKSTREAM_SASL_CLIENT_CONFIG");
    let props = properties(&client_file)?;
    let names: Vec<&str> = props.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["security.protocol", "sasl.mechanism", "sasl.username", "sasl.password", "ssl.ca.location"]);
    assert_eq!(props[0].1, "SASL_SSL");
    assert_eq!(props[1].1, "SCRAM-SHA-512");
    // The services: every property as a KAFKA_CONFIG_* variable.
    let extra_env = props.iter().map(|(k, v)| (variable(k), v.clone())).collect();
    let stack = Stack::start_with(StackOptions { kafka_brokers: Some(brokers.clone()), partitions: 2, extra_env, ..Default::default() }).await?;

    // A command accepted (durably in the secured log), projected, and read through GraphQL.
    let created = stack.create("alice", json!({"title": "over SASL_SSL"})).await?;
    assert_eq!(created["version"], 1);
    let id = created["task_id"].as_str().expect("task_id").to_owned();
    let position = created["position"].as_str().expect("position").to_owned();
    let data = stack.query("alice", TASK, json!({"id": id}), Some(&position)).await?;
    assert_eq!((data["task"]["title"].as_str(), data["task"]["version"].as_i64()), (Some("over SASL_SSL"), Some(1)));
    let (s, _, updated) = stack.command("alice", reqwest::Method::PATCH, &format!("/v1/tasks/{id}"), Some(json!({"title": "still secured"})), &[]).await?;
    assert_eq!((s, updated["version"].as_i64()), (200, Some(2)), "{updated}");
    let data = stack.query("alice", TASK, json!({"id": id}), updated["position"].as_str()).await?;
    assert_eq!(data["task"]["title"], "still secured");

    // A one-shot command, configured by the file alone: the projector's status reads the log's ends.
    let mut status = stack.projector_cli(&["status"]);
    for (k, _) in &props {
        status.env_remove(variable(k));
    }
    let out = status.env("KAFKA_CONFIG_FILE", &client_file).output().await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "projector status failed: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("tasks  state=live  lag=0"), "{stdout}");
    stack.cleanup().await
}

/// The right file with the wrong password (a variable wins over the file): the command API never
/// becomes ready, and says why without printing either password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_keeps_the_command_api_not_ready_and_says_why() -> anyhow::Result<()> {
    let brokers = required_env("TASKSTREAM_SASL_BROKERS");
    let client_file = required_env("TASKSTREAM_SASL_CLIENT_CONFIG");
    let real_password = properties(&client_file)?.into_iter().find(|(k, _)| k == "sasl.password").map(|(_, v)| v).expect("sasl.password");
    let wrong = "not-the-password-of-taskstream";
    let port = free_port();
    let id = uuid::Uuid::new_v4().simple().to_string();
    let mut child = tokio::process::Command::new(bin_dir().join("command-api"))
        .env_remove("TASKSTREAM_DEV")
        .envs([
            ("KAFKA_BROKERS", brokers.as_str()),
            ("KAFKA_CONFIG_FILE", client_file.as_str()),
            ("KAFKA_CONFIG_SASL_PASSWORD", wrong),
            ("AUTH_JWT_SECRET", USER_SECRET),
            ("SERVICE_JWT_SECRET", SERVICE_SECRET),
            ("TASKSTREAM_KEK", test_support::tokens::TEST_KEK),
            ("COMMAND_API_ADDR", &format!("127.0.0.1:{port}")),
            ("TASK_EVENTS_TOPIC", &format!("task-events-e2e-{}", &id[..12])),
            ("KAFKA_TRANSACTIONAL_ID", &format!("e2e-{id}")),
            ("RUST_LOG", "warn"),
            ("LOG_FORMAT", "json"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let log = Arc::new(Mutex::new(String::new()));
    let mut lines = tokio::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
    let sink = log.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            sink.lock().unwrap().push_str(&(line + "\n"));
        }
    });
    let http = reqwest::Client::new();
    let readyz = format!("http://127.0.0.1:{port}/readyz");
    eventually("the command API to log that Kafka refused its credentials", Duration::from_secs(60), || {
        let (http, readyz, log) = (http.clone(), readyz.clone(), log.clone());
        async move {
            let status = http.get(&readyz).timeout(Duration::from_secs(2)).send().await.ok().map(|r| r.status().as_u16());
            assert_ne!(status, Some(200), "ready with a wrong password");
            let log = log.lock().unwrap().clone();
            // The reason: taskstream's hint (what to check) with librdkafka's words in it. The
            // probe takes it from the client's error event or from librdkafka's log line, whichever
            // comes first (in one CI run only the log line came within 60 s).
            let says_why = log.lines().any(|l| l.contains(platform::kafka::AUTHENTICATION_FAILED) && l.contains("invalid credentials"));
            (status == Some(503) && says_why).then_some(())
        }
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}; the command API's log:\n{}", log.lock().unwrap()))?;
    let log = log.lock().unwrap().clone();
    assert!(!log.contains(wrong) && !log.contains(&real_password), "a password in the log: {log}");
    assert!(child.try_wait()?.is_none(), "it keeps trying (credentials may be fixed on the broker's side)");
    child.kill().await?;
    Ok(())
}

/// Settings the services cannot run with stop them at start-up, naming the variable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserved_or_unknown_property_stops_every_service_at_start_up() -> anyhow::Result<()> {
    for svc in [Svc::CommandApi, Svc::Projector, Svc::QueryApi] {
        let binary = match svc {
            Svc::CommandApi => "command-api",
            Svc::Projector => "projector",
            Svc::QueryApi => "query-api",
        };
        let out = tokio::process::Command::new(bin_dir().join(binary))
            .env("KAFKA_CONFIG_ENABLE_IDEMPOTENCE", "false")
            .env("KAFKA_CONFIG_SASL_MECHANISMZ", "PLAIN")
            .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
            .env("AUTH_JWT_SECRET", USER_SECRET)
            .env("SERVICE_JWT_SECRET", SERVICE_SECRET)
            .stdin(Stdio::null())
            .output()
            .await?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{binary}: {stderr}");
        assert!(stderr.contains("KAFKA_CONFIG_ENABLE_IDEMPOTENCE sets enable.idempotence, which taskstream sets itself"), "{binary}: {stderr}");
        assert!(stderr.contains("KAFKA_CONFIG_SASL_MECHANISMZ sets sasl.mechanismz: No such configuration property"), "{binary}: {stderr}");
    }
    Ok(())
}
