//! The thin, non-pure pieces that more than one taskstream service needs: settings shared by all
//! binaries, the CloudEvents codec for Kafka records, Kafka client set-up, JWT auth, the consistency
//! position token, database set-up and telemetry. Nothing here holds business rules.

pub mod auth;
pub mod codec;
pub mod db;
pub mod http;
pub mod kafka;
pub mod position;
pub mod projections;
pub mod secret;
pub mod settings;
pub mod telemetry;
