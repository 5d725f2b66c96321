//! Per projection and partition: stored offset, high watermark, lag. Used by `projector status`
//! and by the lag gauge on `/metrics`.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use sqlx::PgPool;

use platform::settings::KafkaSettings;

#[derive(Debug, Clone)]
pub struct PartitionStatus {
    pub partition: i32,
    pub offset: i64,
    pub high_watermark: i64,
}

impl PartitionStatus {
    pub fn lag(&self) -> i64 {
        platform::projections::lag(self.offset, self.high_watermark)
    }
}

#[derive(Debug, Clone)]
pub struct ProjectionStatus {
    pub name: String,
    /// `live`, or `rebuilding (done/total events)`.
    pub state: String,
    pub partitions: Vec<PartitionStatus>,
}

impl ProjectionStatus {
    pub fn lag(&self) -> i64 {
        self.partitions.iter().map(PartitionStatus::lag).sum()
    }
}

pub async fn collect(pool: &PgPool, kafka: &KafkaSettings) -> anyhow::Result<Vec<ProjectionStatus>> {
    let rows: Vec<(String, i32, i64)> =
        sqlx::query_as("SELECT projection, partition, next_offset FROM projection_offsets WHERE topic = $1 ORDER BY projection, partition")
            .bind(&kafka.task_events_topic)
            .fetch_all(pool)
            .await?;
    let consumer: BaseConsumer = platform::kafka::client_config(kafka, "taskstream-projector-status").create()?;
    let topic = kafka.task_events_topic.clone();
    let partitions: Vec<i32> = {
        let mut ps: Vec<i32> = rows.iter().map(|r| r.1).collect();
        ps.sort_unstable();
        ps.dedup();
        ps
    };
    let highs = tokio::task::spawn_blocking(move || {
        partitions
            .into_iter()
            .map(|p| consumer.fetch_watermarks(&topic, p, Duration::from_secs(5)).map(|(_, h)| (p, h)))
            .collect::<Result<BTreeMap<i32, i64>, _>>()
    })
    .await??;
    let mut by_name: BTreeMap<String, Vec<PartitionStatus>> = BTreeMap::new();
    for name in crate::store::PROJECTIONS {
        by_name.entry(name.to_owned()).or_default();
    }
    for (name, partition, offset) in rows {
        let high_watermark = highs.get(&partition).copied().unwrap_or(offset);
        by_name.entry(name).or_default().push(PartitionStatus { partition, offset, high_watermark });
    }
    let rebuilding: BTreeMap<String, (i64, i64)> =
        sqlx::query_as::<_, (String, i64, i64)>("SELECT projection, events_done, events_total FROM projection_rebuilds")
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|(p, done, total)| (p, (done, total)))
            .collect();
    Ok(by_name
        .into_iter()
        .map(|(name, partitions)| {
            let state = match rebuilding.get(&name) {
                Some((done, total)) => format!("rebuilding ({done}/{total} events)"),
                None => "live".to_owned(),
            };
            ProjectionStatus { name, state, partitions }
        })
        .collect())
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

/// Publishes `projection_lag{projection,partition}` every few seconds.
pub async fn export_lag(pool: PgPool, kafka: KafkaSettings, every: Duration) {
    loop {
        match collect(&pool, &kafka).await {
            Ok(statuses) => {
                for s in &statuses {
                    for p in &s.partitions {
                        metrics::gauge!("projection_lag", "projection" => s.name.clone(), "partition" => p.partition.to_string()).set(p.lag() as f64);
                    }
                }
            }
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
