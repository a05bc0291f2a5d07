//! Fluxa's embedded backends on SQLite: [`SqliteStore`] / [`SqliteReader`] over `store.db` and
//! [`SqliteQueue`] over `queue.db`, both in WAL mode with `synchronous = FULL` so a commit is on
//! disk before the API or the processor reports success.
//!
//! Why two files: SQLite allows one writer per database, and the API (enqueue) and the processor
//! (claims, inserts) write all the time; separate files let them write concurrently.
//!
//! Why one writer connection per file: SQLite has no `SKIP LOCKED`; serialising this process's
//! writes through one connection makes every claim atomic without lock-upgrade failures, and the
//! busy timeout covers other processes (a CLI, a restarted server) on the same files.

mod group_commit;
mod queue;
#[cfg(test)]
mod recovery_tests;
mod rows;
mod store;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, SqlitePool};

pub use queue::SqliteQueue;
pub use store::{SqliteReader, SqliteStore};

static STORE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/store");
static QUEUE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/queue");

/// Failures opening or migrating a database.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("could not open SQLite database {path}")]
    Open {
        path: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("could not migrate SQLite database {path}")]
    Migrate {
        path: String,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
}

/// WAL pages (4 KiB each) after which a commit checkpoints the WAL into the database.
const WAL_AUTOCHECKPOINT_PAGES: &str = "10000";

/// How long a statement waits for another process's write lock before failing (transiently).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The writer and reader pools of one database file.
#[derive(Clone, Debug)]
pub(crate) struct Pools {
    /// Exactly one connection: every write in this process goes through it.
    pub writer: SqlitePool,
    /// Read-only connections (`SQLITE_OPEN_READONLY`): cannot write even by mistake.
    pub reader: SqlitePool,
}

/// What a delete leaves in the file (`PRAGMA secure_delete`).
#[derive(Clone, Copy, Debug)]
enum SecureDelete {
    /// Deleted content is overwritten with zeros, overflow pages included: an erased or pruned
    /// payload leaves no bytes in `store.db` once the WAL is checkpointed (right to erasure).
    /// Deletes there are rare (erasure, retention), so the extra writes cost little.
    On,
    /// Zeros what costs no extra I/O (content on b-tree pages, not freed overflow pages):
    /// `queue.db` deletes every message once processed, and zeroing its large payloads' overflow
    /// pages would add writes to the hot path.
    Fast,
}

impl SecureDelete {
    fn pragma(self) -> &'static str {
        match self {
            Self::On => "ON",
            Self::Fast => "FAST",
        }
    }
}

fn connect_options(path: &Path, secure_delete: SecureDelete) -> SqliteConnectOptions {
    SqliteConnectOptions::from_str("sqlite://")
        .expect("a constant SQLite URL parses")
        .filename(path)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(BUSY_TIMEOUT)
        .foreign_keys(true)
        // Checkpoint every ~40 MiB of WAL rather than SQLite's 4 MiB: the hot pages (the
        // queue's head and tail, the newest events) are rewritten by almost every commit, and a
        // longer interval copies each of them back to the database once instead of many
        // times (a 200k-event drain went from ~17k to ~22k events/s).
        .pragma("wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)
        .pragma("secure_delete", secure_delete.pragma())
}

/// Pool settings shared by every pool of this crate.
///
/// A connection that comes back to its pool while sqlx still counts it inside a transaction is
/// closed, never handed out again. Why: when a transaction fails (a COMMIT on a full disk, an
/// I/O error), dropping sqlx's `Transaction` only queues a `ROLLBACK`; if SQLite has already
/// rolled the transaction back by itself, that `ROLLBACK` fails, sqlx never lowers its
/// transaction depth, and every later `BEGIN` on the connection fails with "attempted to call
/// begin_with at non-zero transaction depth" for as long as the process lives. A fresh
/// connection costs one open, and only after a failure. This check runs on every release, so it
/// covers every transaction of this crate (the group-commit writers' above all), present and
/// future, rather than one call site.
pub(crate) fn pool_options(max_connections: u32) -> SqlitePoolOptions {
    SqlitePoolOptions::new()
        .max_connections(max_connections)
        .after_release(|connection, _| Box::pin(async move { Ok(!connection.is_in_transaction()) }))
}

async fn open_pools(
    path: &Path,
    n_readers: u32,
    secure_delete: SecureDelete,
) -> Result<Pools, Error> {
    let open_error = |source| Error::Open {
        path: path.display().to_string(),
        source,
    };
    let writer = pool_options(1)
        .connect_with(connect_options(path, secure_delete).create_if_missing(true))
        .await
        .map_err(open_error)?;
    let reader = pool_options(n_readers.max(1))
        .connect_with(connect_options(path, secure_delete).read_only(true))
        .await
        .map_err(open_error)?;
    Ok(Pools { writer, reader })
}

async fn migrate(
    pools: &Pools,
    migrator: &sqlx::migrate::Migrator,
    path: &Path,
) -> Result<(), Error> {
    migrator
        .run(&pools.writer)
        .await
        .map_err(|source| Error::Migrate {
            path: path.display().to_string(),
            source,
        })
}

/// Opens (creating if needed) and migrates the embedded store and queue under `data_dir`.
pub async fn open(
    data_dir: &Path,
    queue_config: fluxa_queue::QueueSettings,
) -> Result<Backends, Error> {
    let store_path = data_dir.join("store.db");
    let queue_path = data_dir.join("queue.db");
    let store_pools = open_pools(&store_path, 4, SecureDelete::On).await?;
    migrate(&store_pools, &STORE_MIGRATIONS, &store_path).await?;
    let queue_pools = open_pools(&queue_path, 2, SecureDelete::Fast).await?;
    migrate(&queue_pools, &QUEUE_MIGRATIONS, &queue_path).await?;
    Ok(Backends {
        store: SqliteStore::new(store_pools.clone()),
        reader: SqliteReader::new(store_pools),
        queue: SqliteQueue::new(queue_pools, queue_config),
    })
}

/// The embedded backends, opened and migrated.
#[derive(Debug)]
pub struct Backends {
    pub store: SqliteStore,
    pub reader: SqliteReader,
    pub queue: SqliteQueue,
}

/// Whether a failed statement was refused for what it asked (a constraint, a missing table, a
/// value SQLite cannot take) rather than failed for the state of the database (full, unwritable,
/// broken, locked, out of memory: conditions that pass, after which the same statement works).
/// A refusal is never reported as the backend being down, nor an outage as a refusal.
pub(crate) fn is_refusal(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(error) => {
            let code = error.code().and_then(|code| code.parse::<i32>().ok());
            // The primary result code is the low byte of the extended one.
            !matches!(
                code.map(|code| code & 0xff),
                Some(
                    SQLITE_PERM
                        | SQLITE_BUSY
                        | SQLITE_LOCKED
                        | SQLITE_NOMEM
                        | SQLITE_READONLY
                        | SQLITE_INTERRUPT
                        | SQLITE_IOERR
                        | SQLITE_CORRUPT
                        | SQLITE_FULL
                        | SQLITE_CANTOPEN
                        | SQLITE_PROTOCOL
                        | SQLITE_NOTADB
                )
            )
        }
        sqlx::Error::Encode(_) => true,
        _ => false,
    }
}

// SQLite's primary result codes for the state of the database (https://sqlite.org/rescode.html).
const SQLITE_PERM: i32 = 3;
const SQLITE_BUSY: i32 = 5;
const SQLITE_LOCKED: i32 = 6;
const SQLITE_NOMEM: i32 = 7;
const SQLITE_READONLY: i32 = 8;
const SQLITE_INTERRUPT: i32 = 9;
const SQLITE_IOERR: i32 = 10;
const SQLITE_CORRUPT: i32 = 11;
const SQLITE_FULL: i32 = 13;
const SQLITE_CANTOPEN: i32 = 14;
const SQLITE_PROTOCOL: i32 = 15;
const SQLITE_NOTADB: i32 = 26;

pub(crate) fn now_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

pub(crate) fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// A row limit as SQL takes it (a signed 64-bit integer).
pub(crate) fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}
