//! Names shared by the projector (writer of the read models) and the query API (reader).

/// The projections the projector maintains; each stores its own per-partition offsets.
pub const PROJECTIONS: [&str; 4] = ["tasks", "task_history", "notifications", "reminder_schedule"];

/// The NOTIFY channel on which the projector announces committed progress, one notification per
/// projection and batch, payload `{"topic": .., "projection": .., "offsets": [[partition, next_offset], ..]}`.
pub const PROGRESS_CHANNEL: &str = "projection_progress";
