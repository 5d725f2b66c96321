//! `projector status` and the lag gauges on `/metrics`. The status itself (stored offset, high
//! watermark, lag and state per projection and partition) is computed by
//! [`platform::projections`], the same for the query API; this module only asks Kafka for the high
//! watermarks and prints, with the projector instance that owns each partition (recorded by
//! `group`). It also prints and exports the reactions waiting after a failure (the counts come from
//! `reactor`).

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use sqlx::PgPool;

use platform::projections::Stored;
pub use platform::projections::{PartitionStatus, ProjectionStatus};
use platform::settings::KafkaSettings;

use crate::group::Owner;
use crate::reactor::{self, Failure, Waiting, REACTIONS};

/// The projections' statuses now, by name; fails when Kafka does not answer.
pub async fn collect(pool: &PgPool, kafka: &KafkaSettings) -> anyhow::Result<Vec<ProjectionStatus>> {
    let stored = Stored::read(pool, &kafka.task_events_topic).await?;
    let consumer: BaseConsumer = platform::kafka::client_config(kafka, "taskstream-projector-status").create()?;
    let topic = kafka.task_events_topic.clone();
    let partitions = stored.partitions();
    let highs = tokio::task::spawn_blocking(move || {
        partitions
            .into_iter()
            .map(|p| consumer.fetch_watermarks(&topic, p, Duration::from_secs(5)).map(|(_, h)| (p, h)))
            .collect::<Result<HashMap<i32, i64>, _>>()
    })
    .await??;
    let mut statuses = stored.statuses(Some(&highs));
    statuses.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(statuses)
}

/// Renders the status table printed by `projector status`: per projection and partition the
/// offset, high watermark, lag and the projector instance that owns the partition (since when; `-`
/// when no instance has recorded it).
pub fn render(statuses: &[ProjectionStatus], owners: &HashMap<i32, Owner>) -> String {
    let mut out = String::new();
    for s in statuses {
        out.push_str(&format!("{}  state={}  lag={}\n", s.name, s.state, s.lag()));
        out.push_str("  partition       offset  high_watermark         lag  owner\n");
        for p in &s.partitions {
            let owner = owners.get(&p.partition).map_or_else(
                || "-".to_owned(),
                |o| format!("{} ({}) since {}", o.instance_id, o.address, o.assigned_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            );
            out.push_str(&format!("  {:>9} {:>12} {:>15} {:>11}  {owner}\n", p.partition, p.offset, p.high_watermark, p.lag()));
        }
    }
    out
}

/// The lines `projector status` prints about reactions and reminders that have not gone through:
/// nothing when every one went through.
pub fn render_reactions(waiting: &[Waiting], failed: i64) -> String {
    let mut out = String::new();
    if !waiting.is_empty() {
        let total: i64 = waiting.iter().map(|w| w.count).sum();
        out.push_str(&format!("reactions waiting to be retried: {total}\n"));
        for w in waiting {
            out.push_str(&format!("  {} {}: {} ({})\n    last error: {}\n", w.reaction, w.failure.as_str(), w.count, w.failure.hint(), w.last_error));
        }
    }
    if failed > 0 {
        out.push_str(&format!("reactions refused for good: {failed} (reaction_outbox rows with failed = true; see last_error)\n"));
    }
    out
}

/// Publishes `reactions_waiting{reaction,failure}` (every pair, 0 when none) and `reactions_failed`.
async fn export_reactions(pool: &PgPool) -> Result<(), sqlx::Error> {
    let waiting = reactor::waiting(pool).await?;
    let failed = reactor::failed_for_good(pool).await?;
    for reaction in REACTIONS {
        for failure in Failure::ALL {
            let n: i64 = waiting.iter().filter(|w| w.reaction == reaction && w.failure == failure).map(|w| w.count).sum();
            metrics::gauge!("reactions_waiting", "reaction" => reaction, "failure" => failure.as_str()).set(n as f64);
        }
    }
    metrics::gauge!("reactions_failed").set(failed as f64);
    Ok(())
}

/// Publishes `projection_lag{projection,partition}`, `projector_dead_letters` and the reactions'
/// gauges every few seconds.
pub async fn export_lag(pool: PgPool, kafka: KafkaSettings, every: Duration) {
    loop {
        match collect(&pool, &kafka).await {
            Ok(statuses) => platform::projections::publish_lag(&statuses),
            Err(e) => tracing::debug!(error.message = %format!("{e:#}"), "could not compute projection lag"),
        }
        let open: Result<i64, _> =
            sqlx::query_scalar("SELECT count(*) FROM dead_letters WHERE topic = $1 AND status = 'open'").bind(&kafka.task_events_topic).fetch_one(&pool).await;
        if let Ok(open) = open {
            metrics::gauge!("projector_dead_letters").set(open as f64);
        }
        if let Err(e) = export_reactions(&pool).await {
            tracing::debug!(error.message = %e, "could not count the waiting reactions");
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use platform::projections::ProjectionState;

    use super::*;

    #[test]
    fn the_table_shows_state_and_lag_per_projection_and_partition() {
        let statuses = [
            ProjectionStatus { name: "task_history".into(), state: ProjectionState::Rebuilding { events_done: 40, events_total: 100 }, partitions: vec![] },
            ProjectionStatus {
                name: "tasks".into(),
                state: ProjectionState::Live,
                partitions: vec![
                    PartitionStatus { partition: 0, offset: 10, high_watermark: 12 },
                    PartitionStatus { partition: 1, offset: 5, high_watermark: 6 },
                ],
            },
        ];
        let owners = HashMap::from([(
            0,
            Owner { instance_id: "host-a:8082".into(), address: "127.0.0.1:8082".into(), assigned_at: "2026-12-01T02:30:00Z".parse().unwrap() },
        )]);
        assert_eq!(
            render(&statuses, &owners),
            "task_history  state=rebuilding (40/100 events)  lag=0\n\
             \x20 partition       offset  high_watermark         lag  owner\n\
             tasks  state=live  lag=1\n\
             \x20 partition       offset  high_watermark         lag  owner\n\
             \x20         0           10              12           1  host-a:8082 (127.0.0.1:8082) since 2026-12-01T02:30:00Z\n\
             \x20         1            5               6           0  -\n"
        );
    }

    #[test]
    fn waiting_and_refused_reactions_are_listed_with_what_to_check() {
        assert_eq!(render_reactions(&[], 0), "");
        let waiting = [
            Waiting { reaction: "fire_reminder".into(), failure: Failure::Auth, count: 2, last_error: "command API answered 401: {}".into() },
            Waiting { reaction: "spawn_occurrence".into(), failure: Failure::Unavailable, count: 1, last_error: "connection refused".into() },
        ];
        let text = render_reactions(&waiting, 3);
        assert!(text.starts_with("reactions waiting to be retried: 3\n  fire_reminder auth: 2 (the command API refuses"), "{text}");
        assert!(text.contains("SERVICE_JWT_SECRET"), "{text}");
        assert!(text.contains("    last error: command API answered 401: {}\n  spawn_occurrence unavailable: 1"), "{text}");
        assert!(text.ends_with("reactions refused for good: 3 (reaction_outbox rows with failed = true; see last_error)\n"), "{text}");
    }
}
