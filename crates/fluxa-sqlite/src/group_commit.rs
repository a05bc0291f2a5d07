//! Group commit: one task per database file runs every write of this process, packing the
//! writes that arrive while it is busy into one `BEGIN IMMEDIATE` transaction, so concurrent
//! API requests and workers share one fsync instead of queueing for one each.
//!
//! Each write runs inside its own savepoint: a write that fails is rolled back alone and its
//! caller gets its own error, while the others still commit. A caller is answered only after
//! the group's COMMIT (so "Ok" still means "on disk"); if the COMMIT fails, every caller in the
//! group gets an error and none of their writes happened.
//!
//! A group whose transaction fails (a full disk, an I/O error) hands its connection back to the
//! pool, which closes it if it is still inside a transaction (`crate::pool_options`): the next
//! group starts on a clean connection, so the writer recovers as soon as the cause is gone.

use std::panic::AssertUnwindSafe;

use futures::future::BoxFuture;
use futures::FutureExt;
use sqlx::{Connection, SqliteConnection, SqlitePool};
use tokio::sync::{mpsc, oneshot};

/// Most writes one transaction carries; more waiting writes go in the next one.
const MAX_GROUP: usize = 64;

/// Writes waiting for the writer task; beyond this, callers wait for room.
const QUEUE_CAPACITY: usize = 1024;

/// Tells a caller how its write ended, once the group's fate is known: `None` means committed.
type Finish = Box<dyn FnOnce(Option<String>) + Send>;

/// One caller's write: runs on the group's connection, says whether it succeeded, and returns
/// how to answer its caller.
type Write =
    Box<dyn for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, (bool, Finish)> + Send>;

/// The handle callers use; cheap to clone. The writer task stops when the last clone drops.
#[derive(Clone, Debug)]
pub(crate) struct GroupCommit {
    writes: mpsc::Sender<Write>,
}

impl GroupCommit {
    /// Starts the writer task for the database behind `pool`.
    pub(crate) fn start(pool: SqlitePool) -> Self {
        let (writes, queue) = mpsc::channel(QUEUE_CAPACITY);
        tokio::spawn(run_writer(pool, queue));
        Self { writes }
    }

    /// Runs `write` in the next group and returns its result once the group has committed.
    pub(crate) async fn run<T, F>(&self, write: F) -> Result<T, sqlx::Error>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Result<T, sqlx::Error>>
            + Send
            + 'static,
    {
        let (answer, answered) = oneshot::channel::<Result<T, sqlx::Error>>();
        let job: Write = Box::new(move |connection| {
            Box::pin(async move {
                let result = write(connection).await;
                let succeeded = result.is_ok();
                let finish: Finish = Box::new(move |commit_error| {
                    // A write that failed reports its own error whatever became of the group:
                    // it is the precise cause (a full disk, a refused value), and either way
                    // nothing of it was committed.
                    let outcome = match (commit_error, result) {
                        (None, result) | (Some(_), result @ Err(_)) => result,
                        (Some(text), Ok(_)) => Err(aborted(&text)),
                    };
                    let _ = answer.send(outcome);
                });
                (succeeded, finish)
            })
        });
        self.writes
            .send(job)
            .await
            .map_err(|_| aborted("the writer task has stopped"))?;
        // A dropped answer means the group failed before this write ran.
        answered
            .await
            .unwrap_or_else(|_| Err(aborted("the group's transaction failed")))
    }
}

fn aborted(reason: &str) -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::other(format!(
        "write not committed: {reason}"
    )))
}

async fn run_writer(pool: SqlitePool, mut queue: mpsc::Receiver<Write>) {
    while let Some(first) = queue.recv().await {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(write) => group.push(write),
                Err(_) => break,
            }
        }
        let mut finishes: Vec<Finish> = Vec::with_capacity(group.len());
        let committed = commit_group(&pool, group, &mut finishes).await;
        let commit_error = committed.err().map(|e| {
            tracing::warn!(error.message = %e, "a group commit failed");
            e.to_string()
        });
        for finish in finishes {
            finish(commit_error.clone());
        }
    }
}

async fn commit_group(
    pool: &SqlitePool,
    group: Vec<Write>,
    finishes: &mut Vec<Finish>,
) -> Result<(), sqlx::Error> {
    let mut transaction = pool.begin_with("BEGIN IMMEDIATE").await?;
    for write in group {
        // A nested sqlx transaction is a SAVEPOINT.
        let mut savepoint = transaction.begin().await?;
        // A panicking write must not take the writer (and with it every later write) down:
        // its savepoint is rolled back and its caller, whose answer channel the panic dropped,
        // gets an error.
        match AssertUnwindSafe(write(&mut savepoint)).catch_unwind().await {
            // Each caller is owed an answer once its write has run, even if what follows
            // fails the group.
            Ok((true, finish)) => {
                finishes.push(finish);
                savepoint.commit().await?;
            }
            Ok((false, finish)) => {
                finishes.push(finish);
                savepoint.rollback().await?;
            }
            Err(_) => {
                tracing::error!("a database write panicked; it was rolled back");
                savepoint.rollback().await?;
            }
        }
    }
    transaction.commit().await
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use super::*;

    async fn writer() -> (tempfile::TempDir, GroupCommit) {
        let dir = tempfile::tempdir().unwrap();
        let pool = SqlitePool::connect(&format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("t.db").display()
        ))
        .await
        .unwrap();
        sqlx::query("CREATE TABLE t (n INTEGER NOT NULL UNIQUE)")
            .execute(&pool)
            .await
            .unwrap();
        (dir, GroupCommit::start(pool))
    }

    fn insert(
        n: i64,
    ) -> impl for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Result<(), sqlx::Error>>
    {
        move |connection| {
            Box::pin(async move {
                sqlx::query("INSERT INTO t (n) VALUES (?1)")
                    .bind(n)
                    .execute(&mut *connection)
                    .await
                    .map(|_| ())
            })
        }
    }

    async fn count(commit: &GroupCommit) -> i64 {
        commit
            .run(|connection| {
                Box::pin(async move {
                    sqlx::query_scalar("SELECT COUNT(*) FROM t")
                        .fetch_one(&mut *connection)
                        .await
                })
            })
            .await
            .unwrap()
    }

    /// A writer whose every connection fails its COMMITs while `failing` is set, the way a full
    /// disk or an I/O error does: SQLite turns the COMMIT into a ROLLBACK and reports an error.
    async fn failing_writer(failing: Arc<AtomicBool>) -> (tempfile::TempDir, GroupCommit) {
        let dir = tempfile::tempdir().unwrap();
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(dir.path().join("t.db"))
            .create_if_missing(true);
        let pool = crate::pool_options(1)
            .after_connect(move |connection, _| {
                let failing = Arc::clone(&failing);
                Box::pin(async move {
                    let mut handle = connection.lock_handle().await?;
                    handle.set_commit_hook(move || !failing.load(Ordering::SeqCst));
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .unwrap();
        sqlx::query("CREATE TABLE t (n INTEGER NOT NULL UNIQUE)")
            .execute(&pool)
            .await
            .unwrap();
        (dir, GroupCommit::start(pool))
    }

    #[tokio::test]
    async fn after_a_failed_commit_the_writer_recovers_once_commits_succeed_again() {
        let failing = Arc::new(AtomicBool::new(false));
        let (_dir, commit) = failing_writer(Arc::clone(&failing)).await;
        commit.run(insert(1)).await.unwrap();
        failing.store(true, Ordering::SeqCst);
        for n in [2, 3] {
            let error = commit.run(insert(n)).await.unwrap_err();
            assert!(
                error.to_string().contains("not committed"),
                "unexpected error: {error}"
            );
        }
        failing.store(false, Ordering::SeqCst);
        // The same writer, without reopening anything: the connection that was left inside the
        // failed transaction must not be reused as it is.
        commit
            .run(insert(4))
            .await
            .expect("a write after the cause is gone");
        assert_eq!(count(&commit).await, 2, "only 1 and 4 were committed");
    }

    #[tokio::test]
    async fn a_failing_write_is_rolled_back_alone_and_the_others_in_its_group_commit() {
        let (_dir, commit) = writer().await;
        let results = futures::future::join_all([
            commit.run(insert(1)),
            commit.run(insert(1)),
            commit.run(insert(2)),
        ])
        .await;
        assert!(results[0].is_ok());
        assert!(results[1].is_err(), "the duplicate must fail on its own");
        assert!(results[2].is_ok());
        assert_eq!(count(&commit).await, 2);
    }

    #[tokio::test]
    async fn a_panicking_write_fails_alone_and_the_writer_keeps_working() {
        let (_dir, commit) = writer().await;
        let panicking = commit.run::<(), _>(|_connection| Box::pin(async { panic!("bad write") }));
        let (panicked, fine) = futures::join!(panicking, commit.run(insert(7)));
        assert!(panicked.is_err());
        assert!(fine.is_ok());
        commit.run(insert(8)).await.unwrap();
        assert_eq!(count(&commit).await, 2);
    }
}
