//! What the projector (writer of the read models) and the query API (reader) both know about the
//! projections: their names, the NOTIFY channels, and their status (stored offsets against the
//! log's high watermarks, lag, rebuild state), computed here once for `projector status`, the
//! `projections` query and the `projection_lag` gauge that both services export.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

/// The projections the projector maintains; each stores its own per-partition offsets.
pub const PROJECTIONS: [&str; 4] = ["tasks", "task_history", "notifications", "reminder_schedule"];

/// The NOTIFY channel on which the projector announces committed progress, one notification per
/// projection and batch, payload `{"topic": .., "projection": .., "offsets": [[partition, next_offset], ..]}`.
pub const PROGRESS_CHANNEL: &str = "projection_progress";

/// NOTIFY channel for committed task changes (payload: a JSON array of [`TaskChangeNotice`]), for
/// subscriptions.
pub const TASK_CHANGES_CHANNEL: &str = "task_changes";

/// NOTIFY channel for committed notifications (payload: a JSON array of [`NotificationNotice`]).
pub const NOTIFICATIONS_CHANNEL: &str = "notifications_created";

/// One item of a [`TASK_CHANGES_CHANNEL`] payload: a task's change, committed to the read model.
/// The projector writes it with borrowed strings (`TaskChangeNotice<&str>`), the query API reads
/// it with owned ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskChangeNotice<S = String> {
    pub user: S,
    pub task_id: Uuid,
    /// The event's type without its `task.` prefix: `created`, `updated`, `completed`, ….
    pub kind: S,
    /// The task's version after the change.
    pub version: u32,
}

/// One item of a [`NOTIFICATIONS_CHANNEL`] payload: a notification, committed to the read model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotificationNotice<S = String> {
    pub user: S,
    pub id: Uuid,
}

/// How far a projection at `next_offset` is behind a partition whose high watermark is
/// `high_watermark`. Every write to the log is transactional, so the last offset before the high
/// watermark is always a transaction marker that a read_committed consumer never sees: a projection
/// that applied everything sits one short of the high watermark. Pending transactions count their
/// marker too, so the lag is in offsets, an upper bound of the records still to apply.
pub fn lag(next_offset: i64, high_watermark: i64) -> i64 {
    (high_watermark - next_offset - 1).max(0)
}

/// One partition of a projection: where it is, and where the log ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionStatus {
    pub partition: i32,
    /// The next log offset this projection will apply (stored with the read model).
    pub offset: i64,
    /// The end of the log (committed records) in this partition.
    pub high_watermark: i64,
}

impl PartitionStatus {
    pub fn lag(&self) -> i64 {
        lag(self.offset, self.high_watermark)
    }
}

/// Whether a projection is served as it is, or being replayed into a copy (`projector rebuild`, or a
/// projection added without offsets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProjectionState {
    Live,
    Rebuilding { events_done: i64, events_total: i64 },
}

impl ProjectionState {
    /// `live` or `rebuilding`.
    pub fn name(&self) -> &'static str {
        match self {
            ProjectionState::Live => "live",
            ProjectionState::Rebuilding { .. } => "rebuilding",
        }
    }
}

/// `live`, or `rebuilding (done/total events)`.
impl fmt::Display for ProjectionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProjectionState::Live => f.write_str(self.name()),
            ProjectionState::Rebuilding { events_done, events_total } => {
                write!(f, "{} ({events_done}/{events_total} events)", self.name())
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectionStatus {
    pub name: String,
    pub state: ProjectionState,
    /// By partition.
    pub partitions: Vec<PartitionStatus>,
}

impl ProjectionStatus {
    /// Records in the log not yet applied, over all partitions.
    pub fn lag(&self) -> i64 {
        self.partitions.iter().map(PartitionStatus::lag).sum()
    }
}

/// What PostgreSQL knows about the projections of one topic: the offsets stored with the read
/// models and the rebuilds under way. Combined with the log's high watermarks by [`Stored::statuses`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stored {
    /// `(projection, partition, next_offset)`.
    pub offsets: Vec<(String, i32, i64)>,
    /// `projection -> (events_done, events_total)`.
    pub rebuilds: HashMap<String, (i64, i64)>,
}

impl Stored {
    /// Reads the stored offsets of every projection on `topic` and the rebuilds under way.
    pub async fn read(pool: &PgPool, topic: &str) -> Result<Self, sqlx::Error> {
        let offsets = sqlx::query_as("SELECT projection, partition, next_offset FROM projection_offsets WHERE topic = $1 ORDER BY projection, partition")
            .bind(topic)
            .fetch_all(pool)
            .await?;
        let rebuilds: Vec<(String, i64, i64)> = sqlx::query_as("SELECT projection, events_done, events_total FROM projection_rebuilds").fetch_all(pool).await?;
        Ok(Self { offsets, rebuilds: rebuilds.into_iter().map(|(p, done, total)| (p, (done, total))).collect() })
    }

    /// The partitions that have stored offsets, ascending: the ones whose high watermarks matter.
    pub fn partitions(&self) -> Vec<i32> {
        let mut partitions: Vec<i32> = self.offsets.iter().map(|o| o.1).collect();
        partitions.sort_unstable();
        partitions.dedup();
        partitions
    }

    /// Statuses of the projections from the stored offsets and the log's high watermarks (`None`
    /// when Kafka could not be asked: then the stored offsets stand in and the lag reads 0; so does
    /// a partition missing from `highs`). The projector's projections are always listed (with no
    /// partitions before it first runs), first and in their usual order ([`PROJECTIONS`]), then any
    /// other name found in the table, by name; partitions ascending.
    pub fn statuses(self, highs: Option<&HashMap<i32, i64>>) -> Vec<ProjectionStatus> {
        let mut by_name: BTreeMap<String, Vec<PartitionStatus>> = BTreeMap::new();
        for name in PROJECTIONS {
            by_name.entry(name.to_owned()).or_default();
        }
        for (name, partition, offset) in self.offsets {
            let high_watermark = highs.and_then(|h| h.get(&partition).copied()).unwrap_or(offset);
            by_name.entry(name).or_default().push(PartitionStatus { partition, offset, high_watermark });
        }
        let rank = |n: &str| PROJECTIONS.iter().position(|p| *p == n).unwrap_or(usize::MAX);
        let mut out: Vec<ProjectionStatus> = by_name
            .into_iter()
            .map(|(name, mut partitions)| {
                partitions.sort_by_key(|p| p.partition);
                let state = match self.rebuilds.get(&name) {
                    Some(&(events_done, events_total)) => ProjectionState::Rebuilding { events_done, events_total },
                    None => ProjectionState::Live,
                };
                ProjectionStatus { name, state, partitions }
            })
            .collect();
        out.sort_by_key(|p| rank(&p.name));
        out
    }
}

/// Publishes `projection_lag{projection,partition}` (high watermark minus the stored offset, see
/// [`lag`]) for every partition of `statuses`.
pub fn publish_lag(statuses: &[ProjectionStatus]) {
    for s in statuses {
        for p in &s.partitions {
            metrics::gauge!("projection_lag", "projection" => s.name.clone(), "partition" => p.partition.to_string()).set(p.lag() as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The items of the live-update channels, as the projector writes them and the query API reads
    /// them: the same JSON fields on both sides.
    #[test]
    fn notices_read_back_what_the_projector_writes() {
        let task_id = Uuid::new_v4();
        let written = serde_json::to_string(&[TaskChangeNotice::<&str> { user: "al\"ice", task_id, kind: "completed", version: 3 }]).unwrap();
        assert_eq!(written, format!(r#"[{{"user":"al\"ice","task_id":"{task_id}","kind":"completed","version":3}}]"#));
        let read: Vec<TaskChangeNotice> = serde_json::from_str(&written).unwrap();
        assert_eq!(read, [TaskChangeNotice { user: "al\"ice".to_owned(), task_id, kind: "completed".to_owned(), version: 3 }]);
        let written = serde_json::to_string(&NotificationNotice::<&str> { user: "bob", id: task_id }).unwrap();
        assert_eq!(written, format!(r#"{{"user":"bob","id":"{task_id}"}}"#));
        assert_eq!(serde_json::from_str::<NotificationNotice>(&written).unwrap(), NotificationNotice { user: "bob".to_owned(), id: task_id });
    }

    #[test]
    fn a_caught_up_projection_has_no_lag() {
        assert_eq!(lag(0, 0), 0);
        assert_eq!(lag(5, 6), 0, "only the commit marker is left");
        assert_eq!(lag(5, 7), 1);
        assert_eq!(lag(9, 6), 0);
    }

    fn part(partition: i32, offset: i64, high_watermark: i64) -> PartitionStatus {
        PartitionStatus { partition, offset, high_watermark }
    }

    fn live(name: &str, partitions: Vec<PartitionStatus>) -> ProjectionStatus {
        ProjectionStatus { name: name.into(), state: ProjectionState::Live, partitions }
    }

    #[test]
    fn with_no_offsets_every_projection_is_live_with_no_lag() {
        let s = Stored::default().statuses(Some(&HashMap::new()));
        let names: Vec<&str> = s.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, PROJECTIONS);
        assert_eq!(names[..2], ["tasks", "task_history"]);
        assert!(s.iter().all(|p| p.lag() == 0 && p.partitions.is_empty() && p.state == ProjectionState::Live));
    }

    #[test]
    fn lag_sums_what_each_partition_has_left_never_below_zero() {
        let offsets = vec![("task_history".into(), 1, 7), ("tasks".into(), 1, 5), ("tasks".into(), 0, 10), ("zz_new".into(), 0, 3)];
        let stored = Stored { offsets, ..Stored::default() };
        assert_eq!(stored.partitions(), [0, 1]);
        // Partition 1's cached watermark is older than the offset: that is no lag, not negative lag.
        // The last offset before a high watermark is a transaction marker (see `lag`).
        let highs = HashMap::from([(0, 12), (1, 6)]);
        let s = stored.statuses(Some(&highs));
        assert_eq!(s[0], live("tasks", vec![part(0, 10, 12), part(1, 5, 6)]));
        assert_eq!(s[0].lag(), 1);
        assert_eq!(s[1], live("task_history", vec![part(1, 7, 6)]));
        assert_eq!(s[1].lag(), 0);
        let last = s.last().unwrap();
        assert_eq!((last.name.as_str(), last.lag()), ("zz_new", 8));
        assert_eq!(s.len(), PROJECTIONS.len() + 1);
    }

    #[test]
    fn without_watermarks_the_stored_offsets_stand_in() {
        let s = Stored { offsets: vec![("tasks".into(), 0, 10)], ..Stored::default() }.statuses(None);
        assert_eq!(s[0].partitions, vec![part(0, 10, 10)]);
        assert_eq!(s[0].lag(), 0);
        // So does a partition Kafka did not answer for.
        let s = Stored { offsets: vec![("tasks".into(), 3, 10)], ..Stored::default() }.statuses(Some(&HashMap::from([(0, 50)])));
        assert_eq!(s[0].partitions, vec![part(3, 10, 10)]);
    }

    #[test]
    fn a_rebuild_under_way_shows_in_the_state() {
        let stored = Stored { offsets: vec![], rebuilds: HashMap::from([("task_history".into(), (40, 100))]) };
        let s = stored.statuses(None);
        let state = &s.iter().find(|p| p.name == "task_history").unwrap().state;
        assert_eq!(*state, ProjectionState::Rebuilding { events_done: 40, events_total: 100 });
        assert_eq!((state.name(), state.to_string()), ("rebuilding", "rebuilding (40/100 events)".to_owned()));
        assert!(s.iter().filter(|p| p.name != "task_history").all(|p| p.state.to_string() == "live"));
    }
}
