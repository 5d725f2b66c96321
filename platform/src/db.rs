//! PostgreSQL set-up: pool and migrations (one folder, applied by every service at start).
//!
//! A service must not depend on PostgreSQL being up before it: [`Migrations::in_background`]
//! applies the migrations with retries (`platform::retry`), logging every failed attempt, while the
//! service already answers `/healthz` and a 503 `/readyz` that says why; the service starts its
//! work once [`Migrations::applied`] resolves. One-shot commands call [`migrate`] and fail fast.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection as _, PgConnection, PgPool};
use tokio::sync::watch;

use crate::retry::{Jitter, Policy};
use crate::settings::DatabaseSettings;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Retrying the start-up migrations while PostgreSQL is not there: 250 ms doubled up to 5 s, each
/// between half and all of it.
const START_RETRY: Policy = Policy::new(Duration::from_millis(250), Duration::from_secs(5)).with_jitter(Jitter::Equal);

/// Connects (lazily, so a service can start and report not-ready while the database is down).
pub fn pool(settings: &DatabaseSettings) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions = settings.database_url.expose().parse()?;
    Ok(PgPoolOptions::new()
        .max_connections(settings.database_max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options.application_name("taskstream")))
}

/// Applies pending migrations; several services may race here, PostgreSQL's advisory lock in sqlx
/// serialises them.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// A pool for a one-shot command (`projector status`, `dlq`, `rebuild`): fails at once, naming the
/// server, when PostgreSQL cannot be reached.
pub async fn connect(settings: &DatabaseSettings) -> anyhow::Result<PgPool> {
    let pool = pool(settings)?;
    check_reachable(&pool).await?;
    Ok(pool)
}

/// Opens (and closes) a connection of its own: an unreachable server is reported as such at once,
/// where the pool would retry silently until its acquire timeout.
async fn check_reachable(pool: &PgPool) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let options = pool.connect_options();
    let connection = PgConnection::connect_with(&options).await.with_context(|| {
        let database = options.get_database().unwrap_or("postgres");
        format!("PostgreSQL at {}:{} (database {database}, from DATABASE_URL) is not reachable", options.get_host(), options.get_port())
    })?;
    let _ = connection.close().await;
    Ok(())
}

/// One start-up attempt: reachable, then the migrations.
async fn try_migrate(pool: &PgPool) -> anyhow::Result<()> {
    check_reachable(pool).await?;
    migrate(pool).await
}

/// Where the start-up migrations are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationState {
    /// Not applied yet: `failed_attempts` attempts failed so far, the last one with `last_error`.
    Pending {
        failed_attempts: u32,
        last_error: Option<String>,
    },
    Applied,
}

/// The start-up migrations of a service, applied in the background until they succeed.
#[derive(Debug, Clone)]
pub struct Migrations(watch::Receiver<MigrationState>);

impl Migrations {
    /// Starts applying the migrations to `pool`, retrying with backoff until they are applied.
    pub fn in_background(pool: PgPool) -> Self {
        let (tx, rx) = watch::channel(MigrationState::Pending { failed_attempts: 0, last_error: None });
        tokio::spawn(async move {
            let mut backoff = START_RETRY.backoff();
            loop {
                match try_migrate(&pool).await {
                    Ok(()) => {
                        if backoff.attempts() > 0 {
                            tracing::info!(failed_attempts = backoff.attempts(), "PostgreSQL reached; migrations applied");
                        }
                        tx.send_replace(MigrationState::Applied);
                        return;
                    }
                    Err(e) => {
                        let delay = backoff.next_delay();
                        let error = format!("{e:#}");
                        tracing::warn!(
                            attempt = backoff.attempts(),
                            retry_in_ms = delay.as_millis() as u64,
                            error.message = %error,
                            "start-up migrations failed (is PostgreSQL up?); retrying, not ready until they are applied"
                        );
                        tx.send_replace(MigrationState::Pending { failed_attempts: backoff.attempts(), last_error: Some(error) });
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            // Nobody waits for them any more (the service stopped).
                            _ = tx.closed() => return,
                        }
                    }
                }
            }
        });
        Self(rx)
    }

    /// Migrations someone else applied (tests that build a service's state on a migrated database).
    pub fn already_applied() -> Self {
        Self(watch::channel(MigrationState::Applied).1)
    }

    pub fn state(&self) -> MigrationState {
        self.0.borrow().clone()
    }

    pub fn is_applied(&self) -> bool {
        *self.0.borrow() == MigrationState::Applied
    }

    /// Why the service is not ready yet (for `/readyz`; the errors themselves are in the log), or
    /// `None` once the migrations are applied.
    pub fn pending_reason(&self) -> Option<String> {
        match self.state() {
            MigrationState::Applied => None,
            MigrationState::Pending { failed_attempts: 0, .. } => Some("applying the database migrations".to_owned()),
            MigrationState::Pending { failed_attempts, .. } => {
                Some(format!("waiting for PostgreSQL: the start-up migrations failed {failed_attempts} time(s) and are retried (the log has the errors)"))
            }
        }
    }

    /// Resolves once the migrations are applied (never, while PostgreSQL stays away).
    pub async fn applied(&self) {
        let mut rx = self.0.clone();
        if rx.wait_for(|s| *s == MigrationState::Applied).await.is_err() {
            // The migrating task is gone without applying them: only when the runtime shuts down.
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unreachable_postgres_is_retried_and_reported_not_fatal() {
        // Nothing listens on port 1.
        let settings = DatabaseSettings { database_url: "postgres://postgres@127.0.0.1:1/none".parse().unwrap(), database_max_connections: 1 };
        let migrations = Migrations::in_background(pool(&settings).unwrap());
        let mut rx = migrations.0.clone();
        let state = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| matches!(s, MigrationState::Pending { failed_attempts: 2.., .. })))
            .await
            .expect("two attempts within 10 s")
            .expect("the migrating task keeps going")
            .clone();
        let MigrationState::Pending { last_error: Some(error), .. } = state else { panic!("{state:?}") };
        assert!(error.contains("PostgreSQL at 127.0.0.1:1 (database none, from DATABASE_URL) is not reachable"), "{error}");
        assert!(error.to_lowercase().contains("refused"), "{error}");
        let reason = migrations.pending_reason().expect("not ready");
        assert!(reason.starts_with("waiting for PostgreSQL: the start-up migrations failed"), "{reason}");
        assert!(!migrations.is_applied());
        assert!(tokio::time::timeout(Duration::from_millis(300), migrations.applied()).await.is_err(), "never applied without a database");
    }

    #[tokio::test]
    async fn a_one_shot_connect_fails_fast_naming_the_server() {
        let settings = DatabaseSettings { database_url: "postgres://postgres:pw@127.0.0.1:1/none".parse().unwrap(), database_max_connections: 1 };
        let started = std::time::Instant::now();
        let e = format!("{:#}", connect(&settings).await.unwrap_err());
        assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
        assert!(e.starts_with("PostgreSQL at 127.0.0.1:1 (database none, from DATABASE_URL) is not reachable"), "{e}");
        assert!(!e.contains("pw"), "the password stays out of the message: {e}");
    }

    #[tokio::test]
    async fn already_applied_is_ready_at_once() {
        let migrations = Migrations::already_applied();
        assert!(migrations.is_applied() && migrations.pending_reason().is_none());
        tokio::time::timeout(Duration::from_secs(1), migrations.applied()).await.expect("resolves at once");
    }
}
