//! The rows of the read models as PostgreSQL holds them, defined once for the projector (which
//! writes them) and the query API (which reads them), with the small pure facts about a row that
//! both sides rely on.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use domain::{Priority, RemindBefore};

/// The values of `tasks.status` (a check constraint allows only these).
pub mod status {
    pub const OPEN: &str = "open";
    pub const COMPLETED: &str = "completed";
}

/// One row of the `tasks` read model (every column).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct TaskRow {
    pub id: Uuid,
    pub user_id: String,
    pub title: String,
    pub description: Option<String>,
    /// [`status::OPEN`] or [`status::COMPLETED`].
    pub status: String,
    /// [`Priority::rank`]: 0 = low .. 3 = urgent.
    pub priority: i16,
    pub due_at: Option<DateTime<Utc>>,
    pub timezone: String,
    pub recurrence: Option<String>,
    /// ISO 8601 duration, as the command gave it.
    pub remind_before: Option<String>,
    /// `due_at - remind_before`.
    pub remind_at: Option<DateTime<Utc>>,
    pub tags: Vec<String>,
    pub version: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    pub recurrence_parent_id: Option<Uuid>,
    pub occurrence: Option<i32>,
    /// The reminder time that has already fired.
    pub reminded_for: Option<DateTime<Utc>>,
}

impl TaskRow {
    /// The select list of every column, in field order (`SELECT {COLUMNS} FROM tasks ...`).
    pub const COLUMNS: &'static str = "id, user_id, title, description, status, priority, due_at, timezone, recurrence, \
                                       remind_before, remind_at, tags, version, created_at, updated_at, completed_at, \
                                       recurrence_parent_id, occurrence, reminded_for";

    pub fn is_completed(&self) -> bool {
        self.status == status::COMPLETED
    }

    /// The stored priority rank as a [`Priority`] (the table's check constraint allows 0..=3 only).
    pub fn priority(&self) -> Priority {
        Priority::from_rank(self.priority).unwrap_or_default()
    }

    /// The reminder still to fire for this row, if any (open, scheduled, not fired yet).
    pub fn pending_reminder(&self) -> Option<DateTime<Utc>> {
        let at = self.remind_at?;
        (self.status == status::OPEN && self.reminded_for != Some(at)).then_some(at)
    }

    /// Derives `remind_at` from `due_at` and `remind_before` (none unless both are set).
    pub fn recompute_remind_at(&mut self) {
        self.remind_at = match (&self.due_at, &self.remind_before) {
            (Some(due), Some(rb)) => RemindBefore::parse(rb.clone()).ok().map(|r| r.remind_at(*due)),
            _ => None,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> TaskRow {
        let t = DateTime::from_timestamp(1_767_225_600, 0).unwrap();
        TaskRow {
            id: Uuid::nil(),
            user_id: "alice".into(),
            title: "t".into(),
            description: None,
            status: status::OPEN.into(),
            priority: 2,
            due_at: Some(t),
            timezone: "UTC".into(),
            recurrence: None,
            remind_before: Some("PT30M".into()),
            remind_at: None,
            tags: vec![],
            version: 1,
            created_at: t,
            updated_at: t,
            completed_at: None,
            recurrence_parent_id: None,
            occurrence: None,
            reminded_for: None,
        }
    }

    #[test]
    fn the_column_list_names_every_field_in_order() {
        let columns: Vec<&str> = TaskRow::COLUMNS.split(',').map(str::trim).collect();
        let fields = format!("{:?}", row());
        let mut at = 0;
        for c in &columns {
            let i = fields[at..].find(&format!(" {c}: ")).unwrap_or_else(|| panic!("{c} is not a field after position {at}: {fields}"));
            at += i + 1;
        }
        assert_eq!(columns.len(), fields.matches(": ").count());
    }

    #[test]
    fn a_reminder_is_pending_until_it_fired_or_the_task_is_completed() {
        let mut r = row();
        r.recompute_remind_at();
        let at = r.due_at.unwrap() - chrono::Duration::minutes(30);
        assert_eq!(r.remind_at, Some(at));
        assert_eq!(r.pending_reminder(), Some(at));
        r.reminded_for = Some(at);
        assert_eq!(r.pending_reminder(), None);
        r.reminded_for = None;
        r.status = status::COMPLETED.into();
        assert!(r.is_completed());
        assert_eq!(r.pending_reminder(), None);
        r.due_at = None;
        r.recompute_remind_at();
        assert_eq!(r.remind_at, None);
    }

    #[test]
    fn the_priority_rank_maps_to_the_domain_priority() {
        for p in Priority::ALL {
            assert_eq!(TaskRow { priority: p.rank(), ..row() }.priority(), p);
        }
    }
}
