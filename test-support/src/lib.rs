//! What every taskstream test crate shares, so that there is one way to do each of these things
//! (the API tests of `command-api` and `query-api`, the projector's store tests, the end-to-end
//! harness in `tests/`):
//!
//! - `env`: `required_env(name)`, which fails loudly, naming the variable and the command that
//!   provisions it, when a test needs PostgreSQL or Kafka and they are not there (no test skips
//!   silently);
//! - `wait`: `eventually(what, timeout, f)`, polling a condition with a deadline (never a sleep
//!   to wait for readiness);
//! - `database`: `fresh_database()`, a uniquely named database with the workspace migrations
//!   applied, dropped when the test is done, and `TestDatabase::create` for an empty one on any
//!   server (the end-to-end stacks, whose services migrate it themselves);
//! - `tokens`: user, expired and service tokens signed by `platform::auth`, the code the services
//!   verify them with, and the secrets the tests configure the services with.
//!
//! The modules are independent of each other except `database` → `env` (for `DATABASE_URL`).
//! Nothing does IO when the crate is loaded; only the functions do.

pub mod database;
pub mod env;
pub mod tokens;
pub mod wait;

pub use database::{fresh_database, TestDatabase};
pub use env::required_env;
pub use tokens::Tokens;
pub use wait::eventually;
