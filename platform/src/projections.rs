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

/// How far a projection at `next_offset` is behind a partition whose high watermark is
/// `high_watermark`. Every write to the log is transactional, so the last offset before the high
/// watermark is always a transaction marker that a read_committed consumer never sees: a projection
/// that applied everything sits one short of the high watermark. Pending transactions count their
/// marker too, so the lag is in offsets, an upper bound of the records still to apply.
pub fn lag(next_offset: i64, high_watermark: i64) -> i64 {
    (high_watermark - next_offset - 1).max(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_caught_up_projection_has_no_lag() {
        assert_eq!(super::lag(0, 0), 0);
        assert_eq!(super::lag(5, 6), 0, "only the commit marker is left");
        assert_eq!(super::lag(5, 7), 1);
        assert_eq!(super::lag(9, 6), 0);
    }
}
