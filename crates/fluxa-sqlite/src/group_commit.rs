//! Group commit: one task per database file runs every write of this process, packing the
//! writes that arrive while it is busy into one `BEGIN IMMEDIATE` transaction, so concurrent
//! API requests and workers share one fsync instead of queueing for one each.
//!
//! Each write runs inside its own savepoint: a write that fails is rolled back alone and its
//! caller gets its own error, while the others still commit. A caller is answered only after
//! the group's COMMIT (so "Ok" still means "on disk"); if the COMMIT fails, every caller in the
//! group gets an error and none of their writes happened.

use futures::future::BoxFuture;
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
                    let outcome = match commit_error {
                        None => result,
                        Some(text) => Err(aborted(&text)),
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
        let (succeeded, finish) = write(&mut savepoint).await;
        finishes.push(finish);
        if succeeded {
            savepoint.commit().await?;
        } else {
            savepoint.rollback().await?;
        }
    }
    transaction.commit().await
}
