//! The projections' statuses as the query API reports them (the `projections` query and the
//! `projection_lag` gauge): computed by [`platform::projections`], as for `projector status`, from
//! the offsets stored in PostgreSQL and the log's high watermarks ([`Watermarks`]). Kafka being
//! away does not fail the answer: the stored offsets stand in and the lag reads 0.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;

use platform::projections::{ProjectionStatus, Stored};

use crate::watermarks::Watermarks;

/// The projections' statuses now, the projector's projections first.
pub async fn current(pool: &PgPool, topic: &str, watermarks: &dyn Watermarks) -> Result<Vec<ProjectionStatus>, sqlx::Error> {
    let stored = Stored::read(pool, topic).await?;
    let highs = match watermarks.high_watermarks(topic, &stored.partitions()).await {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!(error.message = %e, "log high watermarks unavailable; reporting the stored offsets with no lag");
            None
        }
    };
    Ok(stored.statuses(highs.as_ref()))
}

/// Publishes `projection_lag{projection,partition}` (high watermark minus the offset stored in
/// PostgreSQL) every few seconds, so the lag is visible even while the projector is down.
pub async fn export_lag(pool: PgPool, topic: String, watermarks: Arc<dyn Watermarks>, every: Duration) {
    loop {
        match current(&pool, &topic, watermarks.as_ref()).await {
            Ok(statuses) => platform::projections::publish_lag(&statuses),
            Err(e) => tracing::debug!(error.message = %e, "could not compute projection lag"),
        }
        tokio::time::sleep(every).await;
    }
}
