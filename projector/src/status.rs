//! `projector status` and the lag gauges on `/metrics`. The status itself (stored offset, high
//! watermark, lag and state per projection and partition) is computed by
//! [`platform::projections`], the same for the query API; this module only asks Kafka for the high
//! watermarks and prints.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use sqlx::PgPool;

use platform::projections::Stored;
pub use platform::projections::{PartitionStatus, ProjectionStatus};
use platform::settings::KafkaSettings;

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

/// Renders the status table printed by `projector status`.
pub fn render(statuses: &[ProjectionStatus]) -> String {
    let mut out = String::new();
    for s in statuses {
        out.push_str(&format!("{}  state={}  lag={}\n", s.name, s.state, s.lag()));
        out.push_str("  partition       offset  high_watermark         lag\n");
        for p in &s.partitions {
            out.push_str(&format!("  {:>9} {:>12} {:>15} {:>11}\n", p.partition, p.offset, p.high_watermark, p.lag()));
        }
    }
    out
}

/// Publishes `projection_lag{projection,partition}` and `projector_dead_letters` every few seconds.
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
        assert_eq!(
            render(&statuses),
            "task_history  state=rebuilding (40/100 events)  lag=0\n\
             \x20 partition       offset  high_watermark         lag\n\
             tasks  state=live  lag=1\n\
             \x20 partition       offset  high_watermark         lag\n\
             \x20         0           10              12           1\n\
             \x20         1            5               6           0\n"
        );
    }
}
