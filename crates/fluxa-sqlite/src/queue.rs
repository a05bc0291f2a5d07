//! The embedded queue: SQS semantics (visibility timeout, receive count, redrive to a
//! dead-letter table) on `queue.db`.
//!
//! A receive is one write transaction on the single writer connection: first it moves every
//! visible message that has used up its receives to `dead_letters`, then it claims the oldest
//! visible messages by bumping their receive count, receipt and `visible_at`. SQLite has no
//! `SKIP LOCKED`; the database's single write lock gives the same "one receiver per message"
//! guarantee, which the tests below check with concurrent receivers.
//!
//! A message waiting out a retry delay has no receipt; one with a receipt and a future
//! `visible_at` is in flight.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use fluxa_core::time::from_unix_millis;
use fluxa_core::FailureInfo;
use fluxa_queue::{
    DeadLetter, Delivery, Error, MessageAttributes, NewMessage, PendingMessage, Queue, QueueDepth,
    RedriveSelector, Result,
};
use sqlx::sqlite::SqliteRow;
use sqlx::Row;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::{millis, now_millis, Pools, QueueConfig};

/// How often an idle receiver looks again for messages whose delay has passed or that another
/// process enqueued (messages enqueued by this process wake it at once).
const IDLE_POLL: Duration = Duration::from_millis(100);

fn unavailable(error: sqlx::Error) -> Error {
    Error::unavailable(error)
}

/// Most messages one group commit writes; more waiting senders go in the next commit.
const GROUP_COMMIT_MAX_MESSAGES: usize = 2000;

/// Senders waiting for the group-commit writer; beyond this, `send` waits for room.
const GROUP_COMMIT_QUEUE: usize = 4096;

/// One caller's messages and where to tell it how their commit went.
struct SendRequest {
    messages: Vec<NewMessage>,
    reply: oneshot::Sender<Result<Vec<String>>>,
}

/// The embedded queue.
#[derive(Clone, Debug)]
pub struct SqliteQueue {
    pools: Pools,
    config: QueueConfig,
    /// Wakes this process's idle receivers when this process enqueues.
    enqueued: Arc<Notify>,
    /// Hands messages to the group-commit writer (see [`run_group_commit`]).
    sends: mpsc::Sender<SendRequest>,
}

impl SqliteQueue {
    pub(crate) fn new(pools: Pools, config: QueueConfig) -> Self {
        let enqueued = Arc::new(Notify::new());
        let (sends, requests) = mpsc::channel(GROUP_COMMIT_QUEUE);
        tokio::spawn(run_group_commit(
            pools.writer.clone(),
            requests,
            Arc::clone(&enqueued),
        ));
        Self {
            pools,
            config,
            enqueued,
            sends,
        }
    }

    async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>> {
        self.pools
            .writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(unavailable)
    }

    async fn receive_now(&self, max_messages: usize) -> Result<Vec<Delivery>> {
        let now = now_millis();
        let max_receives = i64::from(self.config.max_receives);
        let mut tx = self.begin().await?;
        // SQS redrive: a message that was already received max_receives times goes to the DLQ
        // instead of being delivered again.
        sqlx::query(
            r#"INSERT INTO dead_letters
                 (message_id, body, event_id, correlation_id, error_class, error_code,
                  error_message, receive_count, enqueued_at, first_failure_at, last_failure_at,
                  dead_lettered_at)
               SELECT message_id, body, event_id, correlation_id, 'retries_exhausted',
                      'retries_exhausted',
                      'gave up after ' || receive_count || ' receives; last error: ' ||
                        COALESCE(last_error_code || ': ' || last_error_message, 'none recorded'),
                      receive_count, enqueued_at, COALESCE(first_failure_at, ?1),
                      COALESCE(last_failure_at, ?1), ?1
               FROM queue_messages WHERE visible_at <= ?1 AND receive_count >= ?2"#,
        )
        .bind(now)
        .bind(max_receives)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        sqlx::query("DELETE FROM queue_messages WHERE visible_at <= ?1 AND receive_count >= ?2")
            .bind(now)
            .bind(max_receives)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;

        let receipt = uuid::Uuid::new_v4().to_string();
        let rows = sqlx::query(
            r#"UPDATE queue_messages
               SET receive_count = receive_count + 1, receipt = ?1, visible_at = ?2
               WHERE seq IN (SELECT seq FROM queue_messages WHERE visible_at <= ?3
                             ORDER BY seq LIMIT ?4)
               RETURNING seq, message_id, body, event_id, correlation_id, receive_count,
                         enqueued_at"#,
        )
        .bind(&receipt)
        .bind(now.saturating_add(millis(self.config.visibility_timeout)))
        .bind(now)
        .bind(i64::try_from(max_messages).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await
        .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;

        let mut deliveries: Vec<(i64, Delivery)> = rows
            .iter()
            .map(|row| {
                let delivery = Delivery {
                    message_id: row.get("message_id"),
                    receipt: receipt.clone(),
                    body: row.get("body"),
                    attributes: attributes(row),
                    receive_count: u32::try_from(row.get::<i64, _>("receive_count")).unwrap_or(0),
                    enqueued_at: from_unix_millis(row.get("enqueued_at")),
                };
                (row.get("seq"), delivery)
            })
            .collect();
        // RETURNING does not promise an order; deliver oldest first.
        deliveries.sort_by_key(|(seq, _)| *seq);
        Ok(deliveries.into_iter().map(|(_, d)| d).collect())
    }
}

/// Group commit: every `send` waiting when the writer is free goes into one transaction, so
/// concurrent producers share one fsync instead of queueing for one each. Each caller is
/// answered only after the commit, so a 202 still means "on disk". A failed commit fails every
/// caller in it (their messages are all rolled back together), and they answer 503.
async fn run_group_commit(
    writer: sqlx::SqlitePool,
    mut requests: mpsc::Receiver<SendRequest>,
    enqueued: Arc<Notify>,
) {
    while let Some(first) = requests.recv().await {
        let mut n_messages = first.messages.len();
        let mut group = vec![first];
        while n_messages < GROUP_COMMIT_MAX_MESSAGES {
            match requests.try_recv() {
                Ok(request) => {
                    n_messages += request.messages.len();
                    group.push(request);
                }
                Err(_) => break,
            }
        }
        let outcome = insert_group(&writer, &mut group).await;
        match outcome {
            Ok(ids) => {
                enqueued.notify_waiters();
                for (request, ids) in group.into_iter().zip(ids) {
                    let _ = request.reply.send(Ok(ids));
                }
            }
            Err(e) => {
                let text = e.to_string();
                for request in group {
                    let error = Error::unavailable(std::io::Error::other(text.clone()));
                    let _ = request.reply.send(Err(error));
                }
            }
        }
    }
}

async fn insert_group(
    writer: &sqlx::SqlitePool,
    group: &mut [SendRequest],
) -> std::result::Result<Vec<Vec<String>>, sqlx::Error> {
    let now = now_millis();
    let mut tx = writer.begin_with("BEGIN IMMEDIATE").await?;
    let mut ids_per_request = Vec::with_capacity(group.len());
    for request in group.iter_mut() {
        let mut message_ids = Vec::with_capacity(request.messages.len());
        for message in std::mem::take(&mut request.messages) {
            let message_id = uuid::Uuid::new_v4().to_string();
            sqlx::query(
                r#"INSERT INTO queue_messages
                     (message_id, body, event_id, correlation_id, enqueued_at, visible_at)
                   VALUES (?1, ?2, ?3, ?4, ?5, ?5)"#,
            )
            .bind(&message_id)
            .bind(message.body)
            .bind(message.attributes.event_id)
            .bind(message.attributes.correlation_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            message_ids.push(message_id);
        }
        ids_per_request.push(message_ids);
    }
    tx.commit().await?;
    Ok(ids_per_request)
}

fn attributes(row: &SqliteRow) -> MessageAttributes {
    MessageAttributes {
        event_id: row.get("event_id"),
        correlation_id: row.get("correlation_id"),
    }
}

#[async_trait]
impl Queue for SqliteQueue {
    async fn send(&self, messages: Vec<NewMessage>) -> Result<Vec<String>> {
        let (reply, answer) = oneshot::channel();
        let writer_gone = || Error::Corrupt("the queue's writer task has stopped".to_owned());
        self.sends
            .send(SendRequest { messages, reply })
            .await
            .map_err(|_| writer_gone())?;
        answer.await.map_err(|_| writer_gone())?
    }

    async fn receive(&self, max_messages: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Register interest before looking, so an enqueue between the look and the wait
            // still wakes us.
            let enqueued = self.enqueued.notified();
            tokio::pin!(enqueued);
            enqueued.as_mut().enable();
            let deliveries = self.receive_now(max_messages).await?;
            let now = tokio::time::Instant::now();
            if !deliveries.is_empty() || now >= deadline {
                return Ok(deliveries);
            }
            let nap = (deadline - now).min(IDLE_POLL);
            tokio::select! {
                () = &mut enqueued => {}
                () = tokio::time::sleep(nap) => {}
            }
        }
    }

    async fn delete(&self, delivery: &Delivery) -> Result<()> {
        sqlx::query("DELETE FROM queue_messages WHERE message_id = ?1 AND receipt = ?2")
            .bind(&delivery.message_id)
            .bind(&delivery.receipt)
            .execute(&self.pools.writer)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn delete_many(&self, deliveries: &[Delivery]) -> Result<()> {
        if deliveries.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin().await?;
        for delivery in deliveries {
            sqlx::query("DELETE FROM queue_messages WHERE message_id = ?1 AND receipt = ?2")
                .bind(&delivery.message_id)
                .bind(&delivery.receipt)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(())
    }

    async fn retry_later(
        &self,
        delivery: &Delivery,
        delay: Duration,
        error: &FailureInfo,
    ) -> Result<()> {
        let now = now_millis();
        sqlx::query(
            r#"UPDATE queue_messages
               SET visible_at = ?3, receipt = NULL, first_failure_at = COALESCE(first_failure_at, ?4),
                   last_failure_at = ?4, last_error_code = ?5, last_error_message = ?6
               WHERE message_id = ?1 AND receipt = ?2"#,
        )
        .bind(&delivery.message_id)
        .bind(&delivery.receipt)
        .bind(now.saturating_add(millis(delay)))
        .bind(now)
        .bind(&error.code)
        .bind(&error.message)
        .execute(&self.pools.writer)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn dead_letter(&self, delivery: &Delivery, error: &FailureInfo) -> Result<()> {
        let now = now_millis();
        let mut tx = self.begin().await?;
        let moved = sqlx::query(
            r#"INSERT INTO dead_letters
                 (message_id, body, event_id, correlation_id, error_class, error_code,
                  error_message, receive_count, enqueued_at, first_failure_at, last_failure_at,
                  dead_lettered_at)
               SELECT message_id, body, event_id, correlation_id, 'permanent', ?3, ?4,
                      receive_count, enqueued_at, COALESCE(first_failure_at, ?5), ?5, ?5
               FROM queue_messages WHERE message_id = ?1 AND receipt = ?2"#,
        )
        .bind(&delivery.message_id)
        .bind(&delivery.receipt)
        .bind(&error.code)
        .bind(&error.message)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        if moved.rows_affected() > 0 {
            sqlx::query("DELETE FROM queue_messages WHERE message_id = ?1 AND receipt = ?2")
                .bind(&delivery.message_id)
                .bind(&delivery.receipt)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(())
    }

    async fn depth(&self) -> Result<QueueDepth> {
        let now = now_millis();
        let row = sqlx::query(
            r#"SELECT
                 (SELECT COUNT(*) FROM queue_messages
                    WHERE receipt IS NULL OR visible_at <= ?1) AS pending,
                 (SELECT COUNT(*) FROM queue_messages
                    WHERE receipt IS NOT NULL AND visible_at > ?1) AS in_flight,
                 (SELECT COUNT(*) FROM dead_letters) AS dead"#,
        )
        .bind(now)
        .fetch_one(&self.pools.reader)
        .await
        .map_err(unavailable)?;
        let count = |name: &str| u64::try_from(row.get::<i64, _>(name)).unwrap_or(0);
        Ok(QueueDepth {
            pending: count("pending"),
            in_flight: count("in_flight"),
            dead_letters: count("dead"),
        })
    }

    async fn peek(&self, limit: usize) -> Result<Vec<PendingMessage>> {
        let rows = sqlx::query(
            r#"SELECT message_id, body, event_id, correlation_id, receive_count, enqueued_at
               FROM queue_messages ORDER BY seq LIMIT ?1"#,
        )
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pools.reader)
        .await
        .map_err(unavailable)?;
        Ok(rows
            .iter()
            .map(|row| PendingMessage {
                message_id: row.get("message_id"),
                body: row.get("body"),
                attributes: attributes(row),
                receive_count: u32::try_from(row.get::<i64, _>("receive_count")).unwrap_or(0),
                enqueued_at: from_unix_millis(row.get("enqueued_at")),
            })
            .collect())
    }

    async fn list_dead_letters(
        &self,
        limit: usize,
        event_id: Option<&str>,
    ) -> Result<Vec<DeadLetter>> {
        let rows = sqlx::query(
            r#"SELECT * FROM dead_letters WHERE ?1 IS NULL OR event_id = ?1
               ORDER BY seq LIMIT ?2"#,
        )
        .bind(event_id)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pools.reader)
        .await
        .map_err(unavailable)?;
        Ok(rows.iter().map(dead_letter).collect())
    }

    async fn get_dead_letter(&self, id: &str) -> Result<Option<DeadLetter>> {
        let row = sqlx::query("SELECT * FROM dead_letters WHERE message_id = ?1")
            .bind(id)
            .fetch_optional(&self.pools.reader)
            .await
            .map_err(unavailable)?;
        Ok(row.as_ref().map(dead_letter))
    }

    async fn redrive(&self, selector: &RedriveSelector) -> Result<u64> {
        let (event_id, message_id) = match selector {
            RedriveSelector::All => (None, None),
            RedriveSelector::EventId(event_id) => (Some(event_id.as_str()), None),
            RedriveSelector::Id(id) => (None, Some(id.as_str())),
        };
        let filter = "(?1 IS NULL OR event_id = ?1) AND (?2 IS NULL OR message_id = ?2)";
        let now = now_millis();
        let mut tx = self.begin().await?;
        let moved = sqlx::query(&format!(
            r#"INSERT INTO queue_messages
                 (message_id, body, event_id, correlation_id, enqueued_at, visible_at)
               SELECT message_id, body, event_id, correlation_id, ?3, ?3
               FROM dead_letters WHERE {filter} ORDER BY seq"#
        ))
        .bind(event_id)
        .bind(message_id)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        sqlx::query(&format!("DELETE FROM dead_letters WHERE {filter}"))
            .bind(event_id)
            .bind(message_id)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        if moved.rows_affected() > 0 {
            self.enqueued.notify_waiters();
        }
        Ok(moved.rows_affected())
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pools.reader)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

fn dead_letter(row: &SqliteRow) -> DeadLetter {
    DeadLetter {
        id: row.get("message_id"),
        attributes: attributes(row),
        error_class: row.get("error_class"),
        error: FailureInfo {
            code: row.get("error_code"),
            message: row.get("error_message"),
        },
        receive_count: u32::try_from(row.get::<i64, _>("receive_count")).unwrap_or(0),
        enqueued_at: from_unix_millis(row.get("enqueued_at")),
        first_failure_at: from_unix_millis(row.get("first_failure_at")),
        last_failure_at: from_unix_millis(row.get("last_failure_at")),
        dead_lettered_at: from_unix_millis(row.get("dead_lettered_at")),
        body: row.get("body"),
    }
}
