//! Fluxa's cluster backends on PostgreSQL: [`PgStore`] / [`PgReader`] and [`PgQueue`], all in
//! one database that any number of stateless `fluxa` replicas share.
//!
//! - Time comes from the database (`now()`), so replicas with skewed clocks agree on leases and
//!   visibility.
//! - Claims lock rows (`SELECT … FOR UPDATE`); receives skip rows other replicas hold
//!   (`FOR UPDATE SKIP LOCKED`). Transactions are short and READ COMMITTED.
//! - The reader pool's sessions are read-only (`default_transaction_read_only`), so the query API
//!   cannot write even by mistake (seed invariant 7).
//! - Migrations take PostgreSQL's advisory lock (sqlx's migrator does), so replicas starting at
//!   once migrate exactly once.
//! - The DSN is a `SecretString`; messages name only host, port and database, never the password.

mod queue;
mod store;

use std::str::FromStr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Executor, PgPool};

pub use queue::PgQueue;
pub use store::{PgReader, PgStore};

static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Failures connecting to or migrating the database. Messages never contain the password.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the database URL is not a valid PostgreSQL URL")]
    InvalidUrl,
    #[error("could not connect to PostgreSQL at {target}")]
    Connect {
        target: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("could not migrate PostgreSQL at {target}")]
    Migrate {
        target: String,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
}

/// How long a request waits for a pooled connection before the backend counts as unavailable
/// (the API then answers 503 instead of hanging).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// Statements slower than this are cancelled; every Fluxa statement is an index lookup.
const STATEMENT_TIMEOUT_MS: u64 = 10_000;

/// Queue behaviour (the same settings as the embedded queue's).
#[derive(Clone, Copy, Debug)]
pub struct QueueConfig {
    pub visibility_timeout: Duration,
    pub max_receives: u32,
}

/// The opened PostgreSQL backends.
#[derive(Debug)]
pub struct Backends {
    pub store: PgStore,
    pub reader: PgReader,
    pub queue: PgQueue,
}

/// `host:port/database` of a URL, for messages: never the user's password.
pub fn describe_url(url: &SecretString) -> String {
    match PgConnectOptions::from_str(url.expose_secret()) {
        Ok(options) => format!(
            "{}:{}/{}",
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or("(default database)")
        ),
        Err(_) => "(unparsable URL)".to_owned(),
    }
}

/// Whether `url` names a PostgreSQL database.
pub fn is_postgres_url(url: &SecretString) -> bool {
    let text = url.expose_secret();
    text.starts_with("postgres://") || text.starts_with("postgresql://")
}

/// Read-only connections for the query API; lookups are single index reads.
const READER_POOL_SIZE: u32 = 4;

/// Connects (the pools re-open connections by themselves after an outage), migrates, and
/// returns the backends. `pool_size` bounds the writing connections; with the readers and the
/// `LISTEN` connection a replica holds at most `pool_size + 5` connections.
pub async fn open(
    url: &SecretString,
    pool_size: u32,
    queue_config: QueueConfig,
) -> Result<Backends, Error> {
    let options = PgConnectOptions::from_str(url.expose_secret())
        .map_err(|_| Error::InvalidUrl)?
        .application_name("fluxa");
    let target = describe_url(url);
    create_database_if_missing(url, &target).await?;
    let writer = PgPoolOptions::new()
        .max_connections(pool_size.max(2))
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .after_connect(|connection, _| {
            Box::pin(async move {
                connection
                    .execute(format!("SET statement_timeout = {STATEMENT_TIMEOUT_MS}").as_str())
                    .await?;
                Ok(())
            })
        })
        .connect_with(options.clone())
        .await
        .map_err(|source| Error::Connect {
            target: target.clone(),
            source,
        })?;
    let reader = PgPoolOptions::new()
        .max_connections(READER_POOL_SIZE)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .after_connect(|connection, _| {
            Box::pin(async move {
                connection
                    .execute(
                        format!(
                            "SET default_transaction_read_only = on; \
                             SET statement_timeout = {STATEMENT_TIMEOUT_MS}"
                        )
                        .as_str(),
                    )
                    .await?;
                Ok(())
            })
        })
        .connect_lazy_with(options);
    MIGRATIONS
        .run(&writer)
        .await
        .map_err(|source| Error::Migrate {
            target: target.clone(),
            source,
        })?;
    let queue = PgQueue::new(writer.clone(), queue_config)
        .await
        .map_err(|source| Error::Connect {
            target: target.clone(),
            source,
        })?;
    Ok(Backends {
        store: PgStore::new(writer),
        reader: PgReader::new(reader),
        queue,
    })
}

/// Creates the database on first start, so pointing Fluxa at a fresh server is one command.
/// Needs the CREATEDB privilege only when the database is actually missing; concurrent
/// replicas racing to create it are fine (the loser sees it exists).
async fn create_database_if_missing(url: &SecretString, target: &str) -> Result<(), Error> {
    use sqlx::migrate::MigrateDatabase;
    let connect_error = |source| Error::Connect {
        target: target.to_owned(),
        source,
    };
    if sqlx::Postgres::database_exists(url.expose_secret())
        .await
        .map_err(connect_error)?
    {
        return Ok(());
    }
    tracing::info!(database = %target, "creating the database");
    match sqlx::Postgres::create_database(url.expose_secret()).await {
        Ok(()) => Ok(()),
        Err(e)
            if matches!(
                sqlx::Postgres::database_exists(url.expose_secret()).await,
                Ok(true)
            ) =>
        {
            tracing::debug!(error.message = %e, "another replica created the database first");
            Ok(())
        }
        Err(e) => Err(connect_error(e)),
    }
}

pub(crate) async fn ping(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT 1").execute(pool).await.map(|_| ())
}

pub(crate) fn seconds(duration: Duration) -> f64 {
    duration.as_secs_f64()
}
