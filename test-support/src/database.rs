//! A database of the test's own: a unique name on a shared server, so that tests run in parallel
//! without sharing state, dropped when the test is done (also when it failed).

use std::str::FromStr;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

use crate::env::required_env;

/// A uniquely named database; dropped (`WITH (FORCE)`) by `drop_database` or, failing that, when
/// the value is dropped.
pub struct TestDatabase {
    /// A pool over this database; it connects on first use.
    pub pool: PgPool,
    url: String,
    name: String,
    admin_url: String,
    dropped: bool,
}

/// A fresh database on the server `DATABASE_URL` points at (a superuser URL), with the
/// workspace's migrations applied: what the store and API tests need. Panics, saying how to fix
/// it, when `DATABASE_URL` is not set or the server cannot be used.
pub async fn fresh_database() -> TestDatabase {
    let db = TestDatabase::create(&required_env("DATABASE_URL")).await.expect("create a test database on DATABASE_URL's server");
    platform::db::migrate(&db.pool).await.expect("apply the workspace migrations to the test database");
    db
}

impl TestDatabase {
    /// Creates an empty database with a unique name on the server of `admin_url` (which may be
    /// another server than `DATABASE_URL`'s, e.g. a private cluster). Nothing is migrated: a
    /// service started on it migrates it itself.
    pub async fn create(admin_url: &str) -> anyhow::Result<Self> {
        let name = format!("ts_test_{}", &Uuid::new_v4().simple().to_string()[..12]);
        let url = with_database(admin_url, &name)?;
        let mut conn = PgConnection::connect(admin_url).await.context("connecting to the PostgreSQL server of the test database")?;
        // A generated identifier, not input: DDL cannot take a bound parameter.
        sqlx::query(&format!(r#"CREATE DATABASE "{name}""#)).execute(&mut conn).await.with_context(|| format!("CREATE DATABASE {name}"))?;
        conn.close().await.ok();
        let pool = PgPoolOptions::new().connect_lazy_with(PgConnectOptions::from_str(&url)?);
        Ok(Self { pool, url, name, admin_url: admin_url.to_owned(), dropped: false })
    }

    /// The URL of this database (the admin URL with the database name replaced).
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Closes the pool and drops the database, cutting any connection still open.
    pub async fn drop_database(mut self) -> anyhow::Result<()> {
        self.dropped = true;
        self.pool.close().await;
        drop_database(&self.admin_url, &self.name).await
    }
}

impl Drop for TestDatabase {
    /// Drops the database when the test did not (it failed, or it let the value go), on a thread
    /// of its own, since the test's runtime may be unwinding.
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(drop_database(&admin_url, &name))
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test database {}: {dropped:?}", self.name);
        }
    }
}

async fn drop_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    let mut conn = PgConnection::connect(admin_url).await?;
    sqlx::query(&format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#)).execute(&mut conn).await?;
    conn.close().await?;
    Ok(())
}

/// `url` with its database name replaced by `database` (query parameters kept).
pub fn with_database(url: &str, database: &str) -> anyhow::Result<String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").context("the PostgreSQL URL has no scheme")? + 3;
    let path_start = base[scheme_end..].find('/').map(|i| i + scheme_end).unwrap_or(base.len());
    let mut out = format!("{}/{}", &base[..path_start], database);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use sqlx::Connection;

    #[test]
    fn database_name_is_replaced() {
        assert_eq!(super::with_database("postgres://u@h:1/db?x=1", "n").unwrap(), "postgres://u@h:1/n?x=1");
        assert_eq!(super::with_database("postgres://u@h:1", "n").unwrap(), "postgres://u@h:1/n");
    }

    #[tokio::test]
    async fn a_fresh_database_is_migrated_and_gone_after_the_test() {
        let db = super::fresh_database().await;
        let name = db.name().to_owned();
        let tasks: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks").fetch_one(&db.pool).await.unwrap();
        assert_eq!(tasks, 0);
        db.drop_database().await.unwrap();
        let mut admin = sqlx::PgConnection::connect(&crate::required_env("DATABASE_URL")).await.unwrap();
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1").bind(&name).fetch_one(&mut admin).await.unwrap();
        assert_eq!(left, 0);
    }
}
