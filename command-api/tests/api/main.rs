//! The command API's contract (CONTRACT.md §2–§4) checked through `command_api::router` with
//! `oneshot`, over an in-memory fake of the event log (`helpers`), one file per family of routes
//! or concern: the task routes and the records they append (`tasks`), authentication (`auth`),
//! problem+json answers to bad input (`problems`), `If-Match` (`conditional`), `Idempotency-Key`
//! (`idempotency`, also across a restart), ordering, log outages and restarts (`log`), the
//! notifications the user's stream records and reads (`notifications`), the export relayed to the
//! query API (`me`), erasure by crypto-shredding (`erasure`), and the documentation and operations endpoints (`operations`).

mod auth;
mod conditional;
mod erasure;
mod helpers;
mod idempotency;
mod log;
mod me;
mod notifications;
mod operations;
mod problems;
mod tasks;
mod updates;
