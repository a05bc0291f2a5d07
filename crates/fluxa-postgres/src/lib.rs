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

mod dead_letters;
mod queue;
mod rows;
mod store;
/// Scratch databases for tests (feature `testing`).
#[cfg(any(test, feature = "testing"))]
pub mod testing;

use std::str::FromStr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, Executor, PgPool};

pub use dead_letters::{DeadLetterCounts, DeadLetterTable, PurgedDeadLetters};
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
pub const READER_POOL_SIZE: u32 = 4;

/// The most connections each pool of one process may hold.
#[derive(Clone, Copy, Debug)]
pub struct PoolSizes {
    /// The store's writes (and the queue's, when it lives here).
    pub writer: u32,
    /// The query API's read-only sessions, opened on first use.
    pub reader: u32,
}

/// The store without the queue: for a deployment whose queue is elsewhere (SQS), where the
/// database keeps the events, the idempotency records and the recorded dead letters.
#[derive(Debug)]
pub struct StoreBackends {
    pub store: PgStore,
    pub reader: PgReader,
    pub dead_letters: DeadLetterTable,
}

/// Connects (the pools re-open connections by themselves after an outage), migrates, and
/// returns the backends. `pool_size` bounds the writing connections; with the readers and the
/// `LISTEN` connection a replica holds at most `pool_size + 5` connections.
pub async fn open(
    url: &SecretString,
    pool_size: u32,
    queue_config: fluxa_queue::QueueSettings,
) -> Result<Backends, Error> {
    let sizes = PoolSizes {
        writer: pool_size.max(2),
        reader: READER_POOL_SIZE,
    };
    let opened = open_store(url, sizes).await?;
    let queue = PgQueue::new(opened.store.pool.clone(), queue_config)
        .await
        .map_err(|source| Error::Connect {
            target: describe_url(url),
            source,
        })?;
    Ok(Backends {
        store: opened.store,
        reader: opened.reader,
        queue,
    })
}

/// Connects and migrates the store alone (no queue, no `LISTEN` connection): at most
/// `sizes.writer + sizes.reader` connections.
pub async fn open_store(url: &SecretString, sizes: PoolSizes) -> Result<StoreBackends, Error> {
    let options = connect_options(url)?;
    let target = describe_url(url);
    create_database_if_missing(url, &target).await?;
    let writer = pool_options(sizes.writer.max(1))
        .after_connect(|connection, _| {
            Box::pin(async move {
                connection
                    .execute(format!("SET statement_timeout = {STATEMENT_TIMEOUT_MS}").as_str())
                    .await?;
                Ok(())
            })
        })
        .connect_with(options)
        .await
        .map_err(|source| Error::Connect {
            target: target.clone(),
            source,
        })?;
    MIGRATIONS
        .run(&writer)
        .await
        .map_err(|source| Error::Migrate {
            target: target.clone(),
            source,
        })?;
    Ok(StoreBackends {
        store: PgStore::new(writer.clone()),
        reader: open_reader(url, sizes.reader)?,
        dead_letters: DeadLetterTable::new(writer),
    })
}

/// The query API's read-only connections alone, opened on first use: no migration and no
/// write, so a role that may only read (the query Lambda's) can use it.
pub fn open_reader(url: &SecretString, size: u32) -> Result<PgReader, Error> {
    let reader = pool_options(size.max(1))
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
        .connect_lazy_with(connect_options(url)?);
    Ok(PgReader::new(reader))
}

fn connect_options(url: &SecretString) -> Result<PgConnectOptions, Error> {
    Ok(PgConnectOptions::from_str(url.expose_secret())
        .map_err(|_| Error::InvalidUrl)?
        .application_name("fluxa"))
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

/// Pool settings shared by every pool of this crate.
///
/// A connection that comes back to its pool while sqlx still counts it inside a transaction is
/// closed, never handed out again: it may hold locks or an aborted transaction that would fail
/// every later statement. sqlx's `Transaction` already rolls back on drop and a failed ping on
/// release drops a broken connection; this makes "never reused mid-transaction" hold for every
/// connection of the crate however it was used, the same rule as the embedded backend's.
fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .after_release(|connection, _| Box::pin(async move { Ok(!connection.is_in_transaction()) }))
}

/// A statement the database refused (see [`is_refusal`]) is `Rejected`; anything else (no
/// connection, a timed-out pool, a shutdown, a full disk) means the queue is `Unavailable`.
pub(crate) fn queue_error(error: sqlx::Error) -> fluxa_queue::Error {
    if is_refusal(&error) {
        fluxa_queue::Error::rejected(error)
    } else {
        fluxa_queue::Error::unavailable(error)
    }
}

/// Whether a failed statement was refused for what it asked (a constraint, a value PostgreSQL
/// cannot take such as a NUL in text, a missing table) rather than failed for the state of the
/// server (a lost connection, a shutdown, a full disk, a read-only failover, a cancelled or
/// conflicting transaction: conditions that pass). A refusal is never reported as the database
/// being down, nor an outage as a refusal.
pub(crate) fn is_refusal(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(error) => {
            let sqlstate = error.code().unwrap_or_default();
            let class = sqlstate.get(..2).unwrap_or_default();
            !(matches!(class, "08" | "40" | "53" | "57" | "58" | "F0" | "XX")
                || matches!(&*sqlstate, "25006" | "55P03" | "55006"))
        }
        sqlx::Error::Encode(_) => true,
        _ => false,
    }
}

pub(crate) async fn ping(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT 1").execute(pool).await.map(|_| ())
}

pub(crate) fn seconds(duration: Duration) -> f64 {
    duration.as_secs_f64()
}

/// Asserts that an `EXPLAIN` of a listing reads `index` in order (no sort, no sequential or
/// bitmap scan) and, with a cursor, starts at it: the index condition bounds the `key` row.
#[cfg(test)]
pub(crate) fn assert_keyset_plan(plan: &str, case: &str, index: &str, key: &str, cursor: bool) {
    assert!(
        plan.contains(&format!("Index Scan using {index}")),
        "{case}: expected {index}, got:\n{plan}"
    );
    for step in ["Sort", "Seq Scan", "Bitmap"] {
        assert!(!plan.contains(step), "{case}: {step}:\n{plan}");
    }
    if cursor {
        assert!(
            plan.lines().any(|line| {
                line.trim_start().starts_with("Index Cond:")
                    && line.contains(&format!("ROW({key}) > ROW("))
            }),
            "{case}: the cursor does not bound the scan:\n{plan}"
        );
    }
}

/// A row limit as SQL takes it (a signed 64-bit integer).
pub(crate) fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use sqlx::error::{DatabaseError, ErrorKind};

    /// A server error with only a SQLSTATE, as PostgreSQL would send it.
    #[derive(Debug, thiserror::Error)]
    #[error("SQLSTATE {0}")]
    struct ServerError(&'static str);

    impl DatabaseError for ServerError {
        fn message(&self) -> &str {
            self.0
        }

        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }

        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }

        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }

        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }

        fn kind(&self) -> ErrorKind {
            ErrorKind::Other
        }
    }

    fn is_refusal(sqlstate: &'static str) -> bool {
        super::is_refusal(&sqlx::Error::Database(Box::new(ServerError(sqlstate))))
    }

    #[test]
    fn the_state_of_the_server_is_an_outage_and_what_a_statement_asked_is_a_refusal() {
        let outages = [
            ("08006", "connection failure"),
            ("40001", "serialization failure"),
            ("53100", "disk full"),
            ("57P01", "admin shutdown"),
            ("57014", "statement timeout"),
            ("58030", "I/O error"),
            ("25006", "read-only transaction (a failover to a standby)"),
            ("55P03", "lock not available"),
        ];
        for (sqlstate, what) in outages {
            assert!(!is_refusal(sqlstate), "{what} ({sqlstate}) is an outage");
        }
        let refusals = [
            ("22021", "a NUL in text"),
            ("22001", "a value too long"),
            ("23505", "a unique violation"),
            ("42P01", "a missing table"),
        ];
        for (sqlstate, what) in refusals {
            assert!(is_refusal(sqlstate), "{what} ({sqlstate}) is a refusal");
        }
        assert!(!super::is_refusal(&sqlx::Error::PoolTimedOut));
        assert!(!super::is_refusal(&sqlx::Error::Io(std::io::Error::other(
            "connection reset"
        ))));
    }
}
