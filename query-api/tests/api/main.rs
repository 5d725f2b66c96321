//! The query API against a real PostgreSQL (a database of its own per test), read models seeded
//! directly, one file per family of queries; `helpers` holds the app under test and the seeding.
//! Needs `DATABASE_URL` (a superuser URL): without it every test fails saying how to run it
//! (`./dev test`); the GraphiQL test also needs Chromium (which `./dev test` installs).

mod apq;
mod auth;
mod consistency;
mod cost;
mod errors;
mod export;
mod graphiql;
mod health;
mod helpers;
mod history;
mod introspection;
mod live;
mod notifications;
mod projections;
mod ratelimit;
mod tasks;
