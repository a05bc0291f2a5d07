//! The one scratch-database helper every PostgreSQL test uses (feature `testing`, which the
//! workspace's dev-dependencies turn on): this crate's unit and conformance tests, the Lambda
//! tests and the black-box suite. A test gets its own database on the server named by
//! `FLUXA_TEST_PG_URL`, dropped when the test lets go of it.
//!
//! Databases are named `fluxa_test_<uuid>`: `./test` drops leftovers with that prefix (a test
//! killed mid-run never reaches `Drop`), so keep it.
//!
//! Why not `#[sqlx::test]`: it hands a pool to a `#[test]` function, reads `DATABASE_URL` and
//! names its databases `_sqlx_test_…`. Most users here are not test functions but fixtures that
//! outlive several opens or processes (two `open`s on one database, `fluxa serve` children, a
//! Lambda's database secret), and they need a URL, not a pool.

use std::process::{Command, Stdio};

use secrecy::{ExposeSecret, SecretString};

/// The server tests create their databases on: `FLUXA_TEST_PG_URL`, else the local server
/// with trust authentication (`./test` starts it).
pub fn server_url() -> String {
    std::env::var("FLUXA_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database that lives as long as this value.
#[derive(Debug)]
pub struct ScratchDatabase {
    name: String,
}

impl ScratchDatabase {
    /// Creates a fresh, empty database (no migrations: opening it migrates).
    pub async fn create() -> Self {
        let database = Self::named();
        let admin = sqlx::PgPool::connect(&server_url())
            .await
            .expect("PostgreSQL for the tests is not reachable; run ./test, which starts it");
        sqlx::query(&format!("CREATE DATABASE {}", database.name))
            .execute(&admin)
            .await
            .expect("create the test database");
        admin.close().await;
        database
    }

    /// A fresh name only, for tests of `open` creating a missing database; it is still
    /// dropped with this value if something created it.
    pub fn named() -> Self {
        Self {
            name: format!("fluxa_test_{}", uuid::Uuid::new_v4().simple()),
        }
    }

    /// The database's name (as a Secrets Manager secret's `dbname` needs it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The URL of this database: the test server's URL with its database replaced.
    pub fn url(&self) -> SecretString {
        let server = server_url();
        let (server, _) = server.rsplit_once('/').expect("a URL with a database");
        SecretString::from(format!("{server}/{}", self.name))
    }

    /// Runs one statement on this database from a connection of its own, as damage done
    /// outside Fluxa would.
    pub async fn run_sql(&self, sql: &str) {
        let pool = sqlx::PgPool::connect(self.url().expose_secret())
            .await
            .expect("connect to the test database");
        sqlx::query(sql).execute(&pool).await.expect("run test SQL");
        pool.close().await;
    }
}

impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        // `psql`, not sqlx: `drop` cannot await, and the test's runtime may be shutting down.
        // FORCE ends the connections pools of the test still hold. Best effort; `./test`
        // sweeps whatever is left.
        let _ = Command::new("psql")
            .arg(server_url())
            .args([
                "-qc",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
