//! Why a command is refused: the one error type of every decider.

use crate::values::FieldError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// The task does not exist, or belongs to someone else (answered the same way).
    #[error("task not found")]
    NotFound,
    #[error("a task with this id already exists")]
    AlreadyExists,
    #[error("the task was deleted")]
    Deleted,
    #[error("the task is already completed")]
    AlreadyCompleted,
    #[error("the task is not completed")]
    NotCompleted,
    #[error("no reminder is due for this task at that time (rescheduled, cancelled or already fired)")]
    NoReminderDue,
    #[error("the notification is already read")]
    AlreadyRead,
    #[error("the task is at version {actual}, not {expected}")]
    VersionMismatch { expected: u32, actual: u32 },
    #[error("validation failed")]
    Invalid(Vec<FieldError>),
}
