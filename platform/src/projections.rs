//! Names shared by the projector (writer of the read models) and the query API (reader).

/// The projections the projector maintains; each stores its own per-partition offsets.
pub const PROJECTIONS: [&str; 4] = ["tasks", "task_history", "notifications", "reminder_schedule"];

/// The NOTIFY channel on which the projector announces committed progress, one notification per
/// projection and batch, payload `{"topic": .., "projection": .., "offsets": [[partition, next_offset], ..]}`.
pub const PROGRESS_CHANNEL: &str = "projection_progress";

/// NOTIFY channel for committed task changes (payload: a JSON array of
/// `{"user": .., "task_id": .., "kind": "created" | "updated" | .., "version": n}`), for subscriptions.
pub const TASK_CHANGES_CHANNEL: &str = "task_changes";

/// NOTIFY channel for committed notifications (payload: a JSON array of `{"user": .., "id": ..}`).
pub const NOTIFICATIONS_CHANNEL: &str = "notifications_created";
