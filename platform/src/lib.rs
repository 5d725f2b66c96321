//! The thin, non-pure pieces that more than one taskstream service needs: settings shared by all
//! binaries, the CloudEvents codec for Kafka records, Kafka client set-up, JWT auth, the consistency
//! position token, the users' data keys and the sealing of personal fields (`keys`), database set-up, the retry/backoff policy, the APIs' request budgets (`ratelimit`)
//! and telemetry. Nothing here holds business rules.
//!
//! Read side, shared by the projector (writer) and the query API (reader): `readmodel` holds the
//! read-model rows (`TaskRow`) as PostgreSQL stores them; `projections` the projection names, the
//! NOTIFY channels and the projection status (stored offsets + high watermarks -> lag, state).
//! `export` holds the document of `GET /v1/me/export`, which the query API writes from those rows
//! and the command API describes in its OpenAPI document.

pub mod auth;
pub mod catalogue;
pub mod codec;
pub mod db;
pub mod export;
pub mod http;
pub mod kafka;
pub mod kafka_properties;
pub mod keys;
pub mod position;
pub mod projections;
pub mod ratelimit;
pub mod readmodel;
pub mod retry;
pub mod secret;
pub mod settings;
pub mod telemetry;
pub mod webhook;
