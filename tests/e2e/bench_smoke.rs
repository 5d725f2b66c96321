//! The benchmark tool, run with tiny sizes so that it keeps working (no timing is asserted).

use e2e::{bin_dir, Stack, Svc};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_measures_every_key_against_a_real_stack() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let out = tokio::process::Command::new(bin_dir().join("loadgen"))
        .args(["--command-api", &stack.url(Svc::CommandApi, ""), "--query-api", &stack.url(Svc::QueryApi, "")])
        .args(["--brokers", &stack.brokers, "--secret", test_support::tokens::USER_SECRET, "--database-url", &stack.database_url])
        .args(["--scale", "0.01", "--repeat", "2", "all"])
        .output()
        .await?;
    assert!(out.status.success(), "loadgen failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    for key in [
        "kafka_raw_produce_per_s",
        "command_throughput_per_s",
        "command_p50_ms_at_1k",
        "command_p99_ms_at_1k",
        "command_p999_ms_at_1k",
        "e2e_p50_ms_at_1k",
        "e2e_p99_ms_at_1k",
        "graphql_list_queries_per_s",
        "graphql_task_queries_per_s",
        "pg_raw_copy_rows_per_s",
        "projector_events_per_s",
        "rebuild_1m_seconds",
        "command_api_restore_1m_seconds",
        "rss_mb_projector",
        "rss_mb_command_api_1m_tasks",
        "peer_cqrs_es_commands_per_s",
        "peer_cqrs_es_p99_ms_at_1k",
    ] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key} missing or zero in {v}");
    }
    for key in ["reminders_minute_max_seconds_late", "reminders_minute_p99_seconds_late", "reminders_all_fired_seconds_after_due"] {
        assert!(v[key].as_f64().is_some_and(|x| x >= 0.0), "{key} missing in {v}");
    }
    assert_eq!(v["latency_errors_at_1k"].as_f64(), Some(0.0), "{v}");
    assert_eq!(v["runs"], 2, "{v}");
    assert!(v["spread"]["command_throughput_per_s"].as_array().is_some_and(|r| r.len() == 2), "{v}");
    // The catch-up runs as many times as the short phases, over the one backlog.
    assert!(v["spread"]["projector_events_per_s"].as_array().is_some_and(|r| r.len() == 2), "{v}");
    stack.cleanup().await
}
