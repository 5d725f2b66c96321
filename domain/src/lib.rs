//! The pure core of taskstream: value types parsed once, commands, past-tense events and the task
//! decider (`decide` holds every business rule, `evolve` only applies facts). No IO, no async.

pub mod decider;
pub mod events;
pub mod ids;
pub mod recurrence;
pub mod user;
pub mod values;

pub use decider::{decide, evolve, Command, CommandKind, DomainError, LiveTask, TaskState, TaskStatus};
pub use events::{NewTask, ReminderDue, TaskEvent, TaskPatch, UnknownEventType};
pub use values::{
    Description, FieldError, Priority, Recurrence, RemindBefore, Tag, Tags, TaskId, TimeZone, Title,
    UserId, ValidationError,
};
