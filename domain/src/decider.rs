//! The task aggregate: its commands, state and decider. `decide` holds every business rule; `evolve`
//! only applies facts.

use chrono::{DateTime, Utc};

use crate::aggregate::{Decider, Receipt, StreamId};
pub use crate::error::DomainError;
use crate::events::{NewTask, ReminderDue, TaskEvent, TaskPatch};
use crate::recurrence::recurs_after;
use crate::values::{FieldError, Recurrence, RemindBefore, TaskId, TimeZone, UserId, ValidationError};

/// An intent, already parsed at the edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub task_id: TaskId,
    pub user: UserId,
    /// `If-Match`: the task must be at this version (0 = does not exist yet).
    pub expected_version: Option<u32>,
    pub kind: CommandKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandKind {
    Create(NewTask),
    Update(TaskPatch),
    Complete,
    Reopen,
    Delete,
    /// Fire the reminder scheduled for `remind_at` (sent by the projector's scheduler).
    FireReminder {
        remind_at: DateTime<Utc>,
    },
}

impl CommandKind {
    pub fn name(&self) -> &'static str {
        match self {
            CommandKind::Create(_) => "CreateTask",
            CommandKind::Update(_) => "UpdateTask",
            CommandKind::Complete => "CompleteTask",
            CommandKind::Reopen => "ReopenTask",
            CommandKind::Delete => "DeleteTask",
            CommandKind::FireReminder { .. } => "FireReminder",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TaskStatus {
    Open,
    Completed,
}

/// What the decider needs to know about a live task: only the fields its rules look at.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LiveTask {
    pub owner: UserId,
    pub version: u32,
    pub status: TaskStatus,
    pub due_at: Option<DateTime<Utc>>,
    pub remind_before: Option<RemindBefore>,
    pub recurrence: Option<Recurrence>,
    pub timezone: TimeZone,
    /// The remind time whose reminder already fired, if any.
    pub reminded_for: Option<DateTime<Utc>>,
}

impl LiveTask {
    /// When the reminder of the current schedule fires (`due_at - remind_before`).
    pub fn remind_at(&self) -> Option<DateTime<Utc>> {
        Some(self.remind_before.as_ref()?.remind_at(self.due_at?))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum TaskState {
    #[default]
    Absent,
    /// Boxed, so that the map slot of every stream (and of every deleted task's tombstone) is the
    /// size of the small variants, not of a live task.
    Live(Box<LiveTask>),
    Deleted {
        owner: UserId,
        version: u32,
    },
}

impl TaskState {
    pub fn version(&self) -> u32 {
        match self {
            TaskState::Absent => 0,
            TaskState::Live(t) => t.version,
            TaskState::Deleted { version, .. } => *version,
        }
    }
    fn owner(&self) -> Option<&UserId> {
        match self {
            TaskState::Absent => None,
            TaskState::Live(t) => Some(&t.owner),
            TaskState::Deleted { owner, .. } => Some(owner),
        }
    }
}

/// The task aggregate's decider; its stream is keyed by the task id.
pub struct TaskDecider;

impl StreamId for TaskId {
    fn parse_subject(subject: &str) -> Result<Self, ValidationError> {
        subject.parse()
    }
}

impl Decider for TaskDecider {
    type Command = Command;
    type Event = TaskEvent;
    type State = TaskState;

    fn stream_id(cmd: &Command) -> TaskId {
        cmd.task_id
    }
    fn actor(cmd: &Command) -> &UserId {
        &cmd.user
    }
    fn command_name(cmd: &Command) -> &'static str {
        cmd.kind.name()
    }

    /// Decides which events a command produces against the task's current state.
    fn decide(cmd: &Command, state: &TaskState) -> Result<Vec<TaskEvent>, DomainError> {
        // Another user's task is indistinguishable from a missing one, except that its id is taken.
        let foreign = state.owner().is_some_and(|o| o != &cmd.user);
        match (&cmd.kind, state) {
            (CommandKind::Create(_), _) if foreign => return Err(DomainError::AlreadyExists),
            (_, TaskState::Absent) if !matches!(cmd.kind, CommandKind::Create(_)) => return Err(DomainError::NotFound),
            _ if foreign => return Err(DomainError::NotFound),
            _ => {}
        }
        if let Some(expected) = cmd.expected_version {
            if expected != state.version() {
                return Err(DomainError::VersionMismatch { expected, actual: state.version() });
            }
        }
        let live = match (state, &cmd.kind) {
            (TaskState::Absent, CommandKind::Create(new)) => {
                check_schedule(new.due_at, new.remind_before.is_some(), new.recurrence.as_ref().map(|r| (r, new.timezone)), true)?;
                return Ok(vec![TaskEvent::Created(new.clone())]);
            }
            (_, CommandKind::Create(_)) => return Err(DomainError::AlreadyExists),
            (TaskState::Deleted { .. }, _) => return Err(DomainError::Deleted),
            (TaskState::Live(t), _) => t,
            (TaskState::Absent, _) => return Err(DomainError::NotFound),
        };
        match &cmd.kind {
            CommandKind::Create(_) => unreachable!("handled above"),
            CommandKind::Update(patch) => {
                if patch.is_empty() {
                    return Err(DomainError::Invalid(vec![FieldError::new("", "the update changes no field")]));
                }
                let due_at = patch.due_at.unwrap_or(live.due_at);
                let remind = patch.remind_before.as_ref().map_or(live.remind_before.is_some(), Option::is_some);
                let rule = patch.recurrence.as_ref().map_or(live.recurrence.as_ref(), Option::as_ref);
                let recurrence = rule.map(|r| (r, patch.timezone.unwrap_or(live.timezone)));
                let rescheduled = patch.due_at.is_some() || patch.recurrence.is_some() || patch.timezone.is_some();
                check_schedule(due_at, remind, recurrence, rescheduled)?;
                Ok(vec![TaskEvent::Updated(patch.clone())])
            }
            CommandKind::Complete => match live.status {
                TaskStatus::Open => Ok(vec![TaskEvent::Completed]),
                TaskStatus::Completed => Err(DomainError::AlreadyCompleted),
            },
            CommandKind::Reopen => match live.status {
                TaskStatus::Completed => Ok(vec![TaskEvent::Reopened]),
                TaskStatus::Open => Err(DomainError::NotCompleted),
            },
            CommandKind::Delete => Ok(vec![TaskEvent::Deleted]),
            CommandKind::FireReminder { remind_at } => {
                // At most once per (task, remind time), and only for the current schedule of an open task.
                let current = live.remind_at();
                match (live.status, current, live.due_at) {
                    (TaskStatus::Open, Some(at), Some(due_at)) if same_instant(at, *remind_at) && live.reminded_for != Some(at) => {
                        Ok(vec![TaskEvent::ReminderDue(ReminderDue { remind_at: at, due_at })])
                    }
                    _ => Err(DomainError::NoReminderDue),
                }
            }
        }
    }

    /// Applies one fact (already accepted) to the state. `owner` is the user who produced it.
    fn evolve(state: TaskState, owner: &UserId, event: &TaskEvent) -> TaskState {
        let version = state.version() + 1;
        match (state, event) {
            (_, TaskEvent::Created(t)) => TaskState::Live(Box::new(LiveTask {
                owner: owner.clone(),
                version,
                status: TaskStatus::Open,
                due_at: t.due_at,
                remind_before: t.remind_before.clone(),
                recurrence: t.recurrence.clone(),
                timezone: t.timezone,
                reminded_for: None,
            })),
            (TaskState::Live(mut t), TaskEvent::Updated(p)) => {
                t.version = version;
                if let Some(due) = &p.due_at {
                    t.due_at = *due;
                }
                if let Some(r) = &p.remind_before {
                    t.remind_before = r.clone();
                }
                if let Some(r) = &p.recurrence {
                    t.recurrence = r.clone();
                }
                if let Some(z) = p.timezone {
                    t.timezone = z;
                }
                TaskState::Live(t)
            }
            (TaskState::Live(mut t), TaskEvent::Completed) => {
                t.version = version;
                t.status = TaskStatus::Completed;
                TaskState::Live(t)
            }
            (TaskState::Live(mut t), TaskEvent::Reopened) => {
                t.version = version;
                t.status = TaskStatus::Open;
                TaskState::Live(t)
            }
            (TaskState::Live(mut t), TaskEvent::ReminderDue(r)) => {
                t.version = version;
                t.reminded_for = Some(r.remind_at);
                TaskState::Live(t)
            }
            (TaskState::Live(t), TaskEvent::Deleted) => TaskState::Deleted { owner: t.owner, version },
            // A fact that does not fit the state cannot come from `decide`; keep counting versions so
            // that a log written by other code still yields the right sequence numbers.
            (TaskState::Absent, _) => TaskState::Absent,
            (TaskState::Deleted { owner, .. }, _) => TaskState::Deleted { owner, version },
        }
    }

    fn version(state: &TaskState) -> u32 {
        state.version()
    }

    fn receipt(task: &TaskId, event: &TaskEvent) -> Receipt {
        let created = matches!(event, TaskEvent::Created(_));
        Receipt { id_field: "task_id", id: *task.as_uuid(), created, etag: true, secret: None }
    }
}

/// Timestamps are compared at microsecond precision (what the read models store).
fn same_instant(a: DateTime<Utc>, b: DateTime<Utc>) -> bool {
    a.timestamp_micros() == b.timestamp_micros()
}

/// A reminder and a recurrence are both anchored on the due date, and a recurrence must have an
/// occurrence after it (a rule that never matches would have its next occurrence searched for at
/// every completion). That search runs when the schedule is set or changed (`rescheduled`), not
/// for every edit of a task whose rule was stored before the check.
fn check_schedule(due_at: Option<DateTime<Utc>>, remind: bool, recurrence: Option<(&Recurrence, TimeZone)>, rescheduled: bool) -> Result<(), DomainError> {
    let mut errors = Vec::new();
    if due_at.is_none() && remind {
        errors.push(FieldError::new("remind_before", "needs due_at"));
    }
    match (due_at, recurrence) {
        (None, Some(_)) => errors.push(FieldError::new("recurrence", "needs due_at (the first occurrence)")),
        (Some(due_at), Some((rule, timezone))) if rescheduled && !recurs_after(rule, timezone, due_at) => errors.push(FieldError::new(
            "recurrence",
            "has no occurrence after due_at: the rule never matches again from there (e.g. BYMONTH=2;BYMONTHDAY=30), or not for centuries",
        )),
        _ => {}
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(DomainError::Invalid(errors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::values::{Recurrence, Title};
    use chrono::TimeZone as _;

    const ID: u128 = 0x0193_0000_0000_7000_8000_0000_0000_0001;

    fn alice() -> UserId {
        UserId::parse("alice".into()).unwrap()
    }
    fn bob() -> UserId {
        UserId::parse("bob".into()).unwrap()
    }
    fn new_task() -> NewTask {
        NewTask::new(Title::parse("Write the decider".into()).unwrap())
    }
    fn due() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 1, 9, 0, 0).unwrap()
    }
    fn remind() -> RemindBefore {
        RemindBefore::parse("PT30M".into()).unwrap()
    }
    fn create() -> CommandKind {
        CommandKind::Create(new_task())
    }
    fn patch_title(t: &str) -> CommandKind {
        CommandKind::Update(TaskPatch { title: Some(Title::parse(t.into()).unwrap()), ..Default::default() })
    }

    /// given(events by alice).when(command by user).then(events) / then_error(..)
    struct Spec {
        state: TaskState,
    }
    struct When {
        result: Result<Vec<TaskEvent>, DomainError>,
    }
    fn given(events: &[TaskEvent]) -> Spec {
        let owner = alice();
        Spec { state: events.iter().fold(TaskState::Absent, |s, e| TaskDecider::evolve(s, &owner, e)) }
    }
    impl Spec {
        fn when(self, kind: CommandKind) -> When {
            self.when_by(alice(), None, kind)
        }
        fn when_by(self, user: UserId, expected_version: Option<u32>, kind: CommandKind) -> When {
            let cmd = Command { task_id: TaskId::from_uuid(uuid::Uuid::from_u128(ID)), user, expected_version, kind };
            When { result: TaskDecider::decide(&cmd, &self.state) }
        }
    }
    impl When {
        #[track_caller]
        fn then(self, events: Vec<TaskEvent>) {
            assert_eq!(self.result, Ok(events));
        }
        #[track_caller]
        fn then_error(self, err: DomainError) {
            assert_eq!(self.result, Err(err));
        }
        /// Refused as invalid, naming exactly `fields`.
        #[track_caller]
        fn then_invalid(self, fields: &[&str]) {
            let Err(DomainError::Invalid(errors)) = &self.result else { panic!("expected invalid, got {:?}", self.result) };
            assert_eq!(errors.iter().map(|e| e.field.as_str()).collect::<Vec<_>>(), fields, "{errors:?}");
        }
    }

    #[test]
    fn create_on_nothing_creates() {
        given(&[]).when(create()).then(vec![TaskEvent::Created(new_task())]);
    }
    #[test]
    fn create_twice_conflicts() {
        given(&[TaskEvent::Created(new_task())]).when(create()).then_error(DomainError::AlreadyExists);
    }
    #[test]
    fn create_over_a_deleted_task_conflicts() {
        given(&[TaskEvent::Created(new_task()), TaskEvent::Deleted]).when(create()).then_error(DomainError::AlreadyExists);
    }
    #[test]
    fn create_with_a_taken_foreign_id_conflicts() {
        given(&[TaskEvent::Created(new_task())]).when_by(bob(), None, create()).then_error(DomainError::AlreadyExists);
    }
    #[test]
    fn create_with_reminder_needs_due_date() {
        let mut t = new_task();
        t.remind_before = Some(remind());
        t.recurrence = Some(Recurrence::parse("FREQ=DAILY".into()).unwrap());
        given(&[]).when(CommandKind::Create(t)).then_error(DomainError::Invalid(vec![
            FieldError::new("remind_before", "needs due_at"),
            FieldError::new("recurrence", "needs due_at (the first occurrence)"),
        ]));
    }
    #[test]
    fn create_with_reminder_and_due_date_creates() {
        let mut t = new_task();
        t.remind_before = Some(remind());
        t.due_at = Some(due());
        given(&[]).when(CommandKind::Create(t.clone())).then(vec![TaskEvent::Created(t)]);
    }
    fn recurring(rule: &str, due_at: DateTime<Utc>) -> NewTask {
        let mut t = new_task();
        t.due_at = Some(due_at);
        t.recurrence = Some(Recurrence::parse(rule.into()).unwrap());
        t
    }
    #[test]
    fn create_with_a_rule_that_never_matches_after_due_at_is_invalid() {
        let march = Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap();
        for rule in ["FREQ=DAILY;BYMONTH=2;BYMONTHDAY=30", "FREQ=MINUTELY;BYMONTH=2;BYMONTHDAY=30", "FREQ=YEARLY;BYMONTH=4;BYMONTHDAY=31"] {
            given(&[]).when(CommandKind::Create(recurring(rule, march))).then_invalid(&["recurrence"]);
        }
        // A rule whose next match is years away is fine; COUNT and UNTIL end a series on purpose
        // (the last occurrence of a series is created like any other).
        for rule in ["FREQ=YEARLY;BYMONTH=2;BYMONTHDAY=29", "FREQ=DAILY;COUNT=1", "FREQ=DAILY;UNTIL=20260301T000000Z"] {
            let t = recurring(rule, march);
            given(&[]).when(CommandKind::Create(t.clone())).then(vec![TaskEvent::Created(t)]);
        }
    }
    #[test]
    fn update_leaving_a_rule_without_an_occurrence_after_due_at_is_invalid() {
        // 2026-03-03 is a Tuesday: every seventh day from it is a Tuesday, from a Monday never.
        let tuesday = Utc.with_ymd_and_hms(2026, 3, 3, 9, 0, 0).unwrap();
        let created = TaskEvent::Created(recurring("FREQ=DAILY;INTERVAL=7;BYDAY=TU", tuesday));
        let to_monday = TaskPatch { due_at: Some(Some(tuesday - chrono::Duration::days(1))), ..Default::default() };
        given(std::slice::from_ref(&created)).when(CommandKind::Update(to_monday)).then_invalid(&["recurrence"]);
        let never = Recurrence::parse("FREQ=MINUTELY;BYMONTH=2;BYMONTHDAY=30".into()).unwrap();
        let to_never = TaskPatch { recurrence: Some(Some(never.clone())), ..Default::default() };
        given(std::slice::from_ref(&created)).when(CommandKind::Update(to_never)).then_invalid(&["recurrence"]);
        let next_week = TaskPatch { due_at: Some(Some(tuesday + chrono::Duration::days(7))), ..Default::default() };
        given(std::slice::from_ref(&created)).when(CommandKind::Update(next_week.clone())).then(vec![TaskEvent::Updated(next_week)]);
        // A task stored with such a rule before the check can still be edited, or its rule cleared.
        let stored = TaskEvent::Created(NewTask { recurrence: Some(never), ..recurring("FREQ=DAILY", tuesday) });
        let CommandKind::Update(retitle) = patch_title("New") else { unreachable!() };
        given(std::slice::from_ref(&stored)).when(patch_title("New")).then(vec![TaskEvent::Updated(retitle)]);
        let clear = TaskPatch { recurrence: Some(None), ..Default::default() };
        given(&[stored]).when(CommandKind::Update(clear.clone())).then(vec![TaskEvent::Updated(clear)]);
    }
    #[test]
    fn create_if_match_zero_creates_and_other_versions_fail() {
        given(&[]).when_by(alice(), Some(0), create()).then(vec![TaskEvent::Created(new_task())]);
        given(&[]).when_by(alice(), Some(1), create()).then_error(DomainError::VersionMismatch { expected: 1, actual: 0 });
    }

    #[test]
    fn update_a_live_task_updates() {
        let CommandKind::Update(p) = patch_title("New") else { unreachable!() };
        given(&[TaskEvent::Created(new_task())]).when(patch_title("New")).then(vec![TaskEvent::Updated(p)]);
    }
    #[test]
    fn update_a_completed_task_is_allowed() {
        let CommandKind::Update(p) = patch_title("New") else { unreachable!() };
        given(&[TaskEvent::Created(new_task()), TaskEvent::Completed]).when(patch_title("New")).then(vec![TaskEvent::Updated(p)]);
    }
    #[test]
    fn update_nothing_is_invalid() {
        given(&[TaskEvent::Created(new_task())])
            .when(CommandKind::Update(TaskPatch::default()))
            .then_error(DomainError::Invalid(vec![FieldError::new("", "the update changes no field")]));
    }
    #[test]
    fn update_a_missing_task_is_not_found() {
        given(&[]).when(patch_title("x")).then_error(DomainError::NotFound);
    }
    #[test]
    fn update_a_deleted_task_conflicts() {
        given(&[TaskEvent::Created(new_task()), TaskEvent::Deleted]).when(patch_title("x")).then_error(DomainError::Deleted);
    }
    #[test]
    fn update_another_users_task_is_not_found() {
        given(&[TaskEvent::Created(new_task())]).when_by(bob(), None, patch_title("x")).then_error(DomainError::NotFound);
    }
    #[test]
    fn update_clearing_due_date_while_reminder_set_is_invalid() {
        let mut t = new_task();
        t.due_at = Some(due());
        t.remind_before = Some(remind());
        let clear = CommandKind::Update(TaskPatch { due_at: Some(None), ..Default::default() });
        given(&[TaskEvent::Created(t.clone())]).when(clear).then_error(DomainError::Invalid(vec![FieldError::new("remind_before", "needs due_at")]));
        let clear_both = TaskPatch { due_at: Some(None), remind_before: Some(None), ..Default::default() };
        given(&[TaskEvent::Created(t)]).when(CommandKind::Update(clear_both.clone())).then(vec![TaskEvent::Updated(clear_both)]);
    }
    #[test]
    fn update_with_matching_version_updates_and_mismatch_fails() {
        let CommandKind::Update(p) = patch_title("New") else { unreachable!() };
        given(&[TaskEvent::Created(new_task())]).when_by(alice(), Some(1), patch_title("New")).then(vec![TaskEvent::Updated(p)]);
        given(&[TaskEvent::Created(new_task()), TaskEvent::Completed])
            .when_by(alice(), Some(1), patch_title("New"))
            .then_error(DomainError::VersionMismatch { expected: 1, actual: 2 });
    }

    #[test]
    fn complete_an_open_task_completes() {
        given(&[TaskEvent::Created(new_task())]).when(CommandKind::Complete).then(vec![TaskEvent::Completed]);
    }
    #[test]
    fn complete_a_completed_task_conflicts() {
        given(&[TaskEvent::Created(new_task()), TaskEvent::Completed]).when(CommandKind::Complete).then_error(DomainError::AlreadyCompleted);
    }
    #[test]
    fn complete_a_deleted_task_conflicts() {
        given(&[TaskEvent::Created(new_task()), TaskEvent::Deleted]).when(CommandKind::Complete).then_error(DomainError::Deleted);
    }
    #[test]
    fn complete_a_missing_task_is_not_found() {
        given(&[]).when(CommandKind::Complete).then_error(DomainError::NotFound);
    }

    #[test]
    fn reopen_a_completed_task_reopens() {
        given(&[TaskEvent::Created(new_task()), TaskEvent::Completed]).when(CommandKind::Reopen).then(vec![TaskEvent::Reopened]);
    }
    #[test]
    fn reopen_an_open_task_conflicts() {
        given(&[TaskEvent::Created(new_task())]).when(CommandKind::Reopen).then_error(DomainError::NotCompleted);
    }
    #[test]
    fn reopen_a_deleted_task_conflicts() {
        given(&[TaskEvent::Created(new_task()), TaskEvent::Completed, TaskEvent::Deleted]).when(CommandKind::Reopen).then_error(DomainError::Deleted);
    }
    #[test]
    fn reopen_a_missing_task_is_not_found() {
        given(&[]).when(CommandKind::Reopen).then_error(DomainError::NotFound);
    }

    #[test]
    fn delete_an_open_or_completed_task_deletes() {
        given(&[TaskEvent::Created(new_task())]).when(CommandKind::Delete).then(vec![TaskEvent::Deleted]);
        given(&[TaskEvent::Created(new_task()), TaskEvent::Completed]).when(CommandKind::Delete).then(vec![TaskEvent::Deleted]);
    }
    #[test]
    fn a_deleted_task_keeps_a_small_tombstone() {
        // The writer keeps one state per stream forever (a deleted id must stay refused), so the map
        // slot must not be the size of a live task: the live one is boxed.
        eprintln!("TaskState {} bytes, LiveTask {} bytes", std::mem::size_of::<TaskState>(), std::mem::size_of::<LiveTask>());
        assert!(std::mem::size_of::<TaskState>() <= 32, "TaskState is {} bytes", std::mem::size_of::<TaskState>());
    }

    #[test]
    fn delete_a_deleted_task_conflicts() {
        given(&[TaskEvent::Created(new_task()), TaskEvent::Deleted]).when(CommandKind::Delete).then_error(DomainError::Deleted);
    }
    #[test]
    fn delete_a_missing_or_foreign_task_is_not_found() {
        given(&[]).when(CommandKind::Delete).then_error(DomainError::NotFound);
        given(&[TaskEvent::Created(new_task())]).when_by(bob(), None, CommandKind::Delete).then_error(DomainError::NotFound);
        given(&[TaskEvent::Created(new_task()), TaskEvent::Deleted]).when_by(bob(), None, CommandKind::Delete).then_error(DomainError::NotFound);
    }
    #[test]
    fn foreign_task_is_not_found_even_with_a_wrong_version() {
        given(&[TaskEvent::Created(new_task())]).when_by(bob(), Some(7), CommandKind::Complete).then_error(DomainError::NotFound);
    }

    fn with_reminder() -> NewTask {
        let mut t = new_task();
        t.due_at = Some(due());
        t.remind_before = Some(remind());
        t
    }
    fn fire(at: DateTime<Utc>) -> CommandKind {
        CommandKind::FireReminder { remind_at: at }
    }
    fn remind_at() -> DateTime<Utc> {
        due() - chrono::Duration::minutes(30)
    }

    #[test]
    fn fire_the_current_reminder_of_an_open_task() {
        given(&[TaskEvent::Created(with_reminder())])
            .when(fire(remind_at()))
            .then(vec![TaskEvent::ReminderDue(ReminderDue { remind_at: remind_at(), due_at: due() })]);
    }
    #[test]
    fn a_reminder_fires_at_most_once() {
        let fired = TaskEvent::ReminderDue(ReminderDue { remind_at: remind_at(), due_at: due() });
        given(&[TaskEvent::Created(with_reminder()), fired]).when(fire(remind_at())).then_error(DomainError::NoReminderDue);
    }
    #[test]
    fn a_rescheduled_reminder_fires_for_the_new_time_only() {
        let later = due() + chrono::Duration::days(1);
        let moved = TaskEvent::Updated(TaskPatch { due_at: Some(Some(later)), ..Default::default() });
        given(&[TaskEvent::Created(with_reminder()), moved.clone()]).when(fire(remind_at())).then_error(DomainError::NoReminderDue);
        let new_at = later - chrono::Duration::minutes(30);
        given(&[TaskEvent::Created(with_reminder()), moved])
            .when(fire(new_at))
            .then(vec![TaskEvent::ReminderDue(ReminderDue { remind_at: new_at, due_at: later })]);
    }
    #[test]
    fn completed_deleted_or_unscheduled_tasks_fire_no_reminder() {
        given(&[TaskEvent::Created(with_reminder()), TaskEvent::Completed]).when(fire(remind_at())).then_error(DomainError::NoReminderDue);
        given(&[TaskEvent::Created(with_reminder()), TaskEvent::Deleted]).when(fire(remind_at())).then_error(DomainError::Deleted);
        given(&[TaskEvent::Created(new_task())]).when(fire(remind_at())).then_error(DomainError::NoReminderDue);
        given(&[]).when(fire(remind_at())).then_error(DomainError::NotFound);
    }

    #[test]
    fn evolve_counts_versions() {
        let s = given(&[TaskEvent::Created(new_task()), TaskEvent::Completed, TaskEvent::Reopened, TaskEvent::Deleted]).state;
        assert_eq!(s, TaskState::Deleted { owner: alice(), version: 4 });
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn any_command() -> impl Strategy<Value = CommandKind> {
            prop_oneof![Just(create()), Just(patch_title("p")), Just(CommandKind::Complete), Just(CommandKind::Reopen), Just(CommandKind::Delete),]
        }

        proptest! {
            /// Whatever commands arrive, accepted events applied in order give contiguous versions,
            /// and replaying the accepted events gives the same state (deterministic replay).
            #[test]
            fn accepted_events_replay_to_the_same_state(cmds in proptest::collection::vec(any_command(), 0..40)) {
                let owner = alice();
                let mut state = TaskState::Absent;
                let mut log = Vec::new();
                for kind in cmds {
                    let cmd = Command { task_id: TaskId::from_uuid(uuid::Uuid::from_u128(ID)), user: owner.clone(), expected_version: None, kind };
                    if let Ok(events) = TaskDecider::decide(&cmd, &state) {
                        for e in events {
                            let before = state.version();
                            state = TaskDecider::evolve(state, &owner, &e);
                            prop_assert_eq!(state.version(), before + 1);
                            log.push(e);
                        }
                    }
                }
                let replayed = log.iter().fold(TaskState::Absent, |s, e| TaskDecider::evolve(s, &owner, e));
                prop_assert_eq!(replayed, state);
            }
        }
    }
}
