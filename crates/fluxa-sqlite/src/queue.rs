//! The embedded queue: SQS semantics (visibility timeout, receive count, redrive to a
//! dead-letter table) on `queue.db`.
//!
//! Every write goes through the file's [`GroupCommit`] writer, so concurrent enqueues from the
//! API and receives from the workers share commits. A receive looks at the first visible
//! messages in `(visible_at, seq)` order, an index range scan that stops after the batch: those
//! that have used up their receives go to `dead_letters` (and are reported in the result), the
//! others are claimed by bumping their receive count, receipt and `visible_at`. No receive ever
//! scans the backlog, so its cost does not grow with it. SQLite has no `SKIP LOCKED`; the
//! database's single write lock gives the same "one receiver per message" guarantee, which the
//! conformance checks prove with concurrent receivers in two processes' worth of handles.
//!
//! A message waiting out a retry delay has no receipt; one with a receipt and a future
//! `visible_at` is in flight.

use std::time::Duration;

use async_trait::async_trait;
use fluxa_core::time::from_unix_millis;
use fluxa_core::FailureClass;
use fluxa_core::{ErrorCode, FailureInfo};
use fluxa_queue::{
    BlobReferences, Consumer, DeadLetter, DeadLetterAdmin, Delivery, Error, ExhaustedNotice,
    MessageAttributes, NewMessage, PendingMessage, Producer, QueueDepth, Received, Receivers,
    RedriveSelector, Result, SendError,
};
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};

use crate::group_commit::GroupCommit;
use crate::{is_refusal, millis, now_millis, Pools, QueueConfig};

/// Most rows one multi-row statement carries, far below SQLite's limit on bound parameters.
const ROWS_PER_STATEMENT: usize = 500;

/// How often an idle receiver looks again for messages whose delay has passed or that another
/// process enqueued (messages enqueued by this process wake it at once).
const IDLE_POLL: Duration = Duration::from_millis(250);

/// A statement the database refused (see [`is_refusal`]) is `Rejected`; anything else (a full
/// disk, an I/O error, a timed-out pool, a failed commit) means the queue is `Unavailable`.
fn queue_error(error: sqlx::Error) -> Error {
    if is_refusal(&error) {
        Error::rejected(error)
    } else {
        Error::unavailable(error)
    }
}

/// The embedded queue.
#[derive(Clone, Debug)]
pub struct SqliteQueue {
    pools: Pools,
    config: QueueConfig,
    writes: GroupCommit,
    /// Wake-ups for this process's idle receivers.
    receivers: Receivers,
}

impl SqliteQueue {
    pub(crate) fn new(pools: Pools, config: QueueConfig) -> Self {
        let writes = GroupCommit::start(pools.writer.clone());
        Self {
            pools,
            config,
            writes,
            receivers: Receivers::default(),
        }
    }

    async fn receive_now(&self, max_messages: usize) -> Result<Received> {
        let config = self.config;
        self.writes
            .run(move |connection| Box::pin(receive(connection, config, max_messages)))
            .await
            .map_err(queue_error)
    }
}

/// The first `?3` visible messages, oldest `visible_at` first: served by the
/// `(visible_at, seq)` index, so it reads only the rows it returns.
const HEAD_SQL: &str = "SELECT seq FROM queue_messages WHERE visible_at <= ?1 \
                        ORDER BY visible_at, seq LIMIT ?3";

/// One receive: the SQS redrive of the exhausted messages at the head of the queue, then the
/// claim of the visible ones.
async fn receive(
    connection: &mut SqliteConnection,
    config: QueueConfig,
    max_messages: usize,
) -> std::result::Result<Received, sqlx::Error> {
    let now = now_millis();
    let max_receives = i64::from(config.max_receives);
    let limit = i64::try_from(max_messages).unwrap_or(i64::MAX);
    // A message that was already received max_receives times goes to the DLQ instead of being
    // delivered again.
    let exhausted = sqlx::query(&format!(
        r#"INSERT INTO dead_letters
             (message_id, body, event_id, correlation_id, blob_key, error_class, error_code,
              error_message, receive_count, enqueued_at, first_failure_at, last_failure_at,
              dead_lettered_at)
           SELECT message_id, body, event_id, correlation_id, blob_key, 'retries_exhausted',
                  'retries_exhausted',
                  'gave up after ' || receive_count || ' receives; last error: ' ||
                    COALESCE(last_error_code || ': ' || last_error_message, 'none recorded'),
                  receive_count, enqueued_at, COALESCE(first_failure_at, ?1),
                  COALESCE(last_failure_at, ?1), ?1
           FROM queue_messages WHERE seq IN ({HEAD_SQL}) AND receive_count >= ?2
           RETURNING event_id, error_message"#
    ))
    .bind(now)
    .bind(max_receives)
    .bind(limit)
    .fetch_all(&mut *connection)
    .await?;
    if !exhausted.is_empty() {
        sqlx::query(&format!(
            "DELETE FROM queue_messages WHERE seq IN ({HEAD_SQL}) AND receive_count >= ?2"
        ))
        .bind(now)
        .bind(max_receives)
        .bind(limit)
        .execute(&mut *connection)
        .await?;
    }

    let receipt = uuid::Uuid::new_v4().to_string();
    let rows = sqlx::query(&format!(
        r#"UPDATE queue_messages
           SET receive_count = receive_count + 1, receipt = ?4, visible_at = ?5
           WHERE seq IN ({HEAD_SQL}) AND receive_count < ?2
           RETURNING seq, message_id, body, event_id, correlation_id, blob_key, receive_count,
                     enqueued_at"#
    ))
    .bind(now)
    .bind(max_receives)
    .bind(limit)
    .bind(&receipt)
    .bind(now.saturating_add(millis(config.visibility_timeout)))
    .fetch_all(&mut *connection)
    .await?;

    let mut deliveries: Vec<(i64, Delivery)> = rows
        .iter()
        .map(|row| {
            let receive_count = u32::try_from(row.get::<i64, _>("receive_count")).unwrap_or(0);
            let delivery = Delivery {
                message_id: row.get("message_id"),
                receipt: receipt.clone(),
                body: row.get::<Vec<u8>, _>("body").into(),
                attributes: attributes(row),
                receive_count,
                receives_left: config.max_receives.saturating_sub(receive_count),
                enqueued_at: from_unix_millis(row.get("enqueued_at")),
            };
            (row.get("seq"), delivery)
        })
        .collect();
    // RETURNING does not promise an order; deliver oldest first.
    deliveries.sort_by_key(|(seq, _)| *seq);
    Ok(Received {
        deliveries: deliveries.into_iter().map(|(_, d)| d).collect(),
        exhausted: exhausted_notices(&exhausted),
    })
}

/// Notices for dead-lettered rows (`event_id`, `error_message`) that carry an event id.
fn exhausted_notices(rows: &[SqliteRow]) -> Vec<ExhaustedNotice> {
    rows.iter()
        .filter_map(|row| {
            let event_id: Option<String> = row.get("event_id");
            Some(ExhaustedNotice {
                event_id: event_id?,
                error: FailureInfo::new(
                    ErrorCode::RetriesExhausted,
                    row.get::<String, _>("error_message"),
                ),
            })
        })
        .collect()
}

fn attributes(row: &SqliteRow) -> MessageAttributes {
    MessageAttributes {
        event_id: row.get("event_id"),
        correlation_id: row.get("correlation_id"),
        blob_key: row.get("blob_key"),
    }
}

// Statements that settle one delivery; `?1` is its message id and `?2` its receipt, so a stale
// receipt matches nothing.
const DELETE_SQL: &str = "DELETE FROM queue_messages WHERE message_id = ?1 AND receipt = ?2";

/// `?3` now, `?4` when to deliver again, `?5`/`?6` the error's code and message.
const RETRY_LATER_SQL: &str = r#"UPDATE queue_messages
   SET visible_at = ?4, receipt = NULL, first_failure_at = COALESCE(first_failure_at, ?3),
       last_failure_at = ?3, last_error_code = ?5, last_error_message = ?6
   WHERE message_id = ?1 AND receipt = ?2"#;

/// Copies a delivery to the DLQ (`?3` now, `?4`/`?5` error code and message); the DELETE that
/// follows runs in the same savepoint, so the move is all or nothing.
const DEAD_LETTER_SQL: &str = r#"INSERT INTO dead_letters
     (message_id, body, event_id, correlation_id, blob_key, error_class, error_code,
      error_message, receive_count, enqueued_at, first_failure_at, last_failure_at,
      dead_lettered_at)
   SELECT message_id, body, event_id, correlation_id, blob_key, 'permanent', ?4, ?5,
          receive_count, enqueued_at, COALESCE(first_failure_at, ?3), ?3, ?3
   FROM queue_messages WHERE message_id = ?1 AND receipt = ?2"#;

#[async_trait]
impl Producer for SqliteQueue {
    async fn send(&self, messages: Vec<NewMessage>) -> Result<Vec<String>, SendError> {
        let n_messages = messages.len();
        let message_ids = self
            .writes
            .run(move |connection| {
                Box::pin(async move {
                    let now = now_millis();
                    let message_ids: Vec<String> = messages
                        .iter()
                        .map(|_| uuid::Uuid::new_v4().to_string())
                        .collect();
                    // One multi-row statement per chunk: each statement is a hop to sqlx's
                    // SQLite worker thread.
                    for (messages, message_ids) in messages
                        .chunks(ROWS_PER_STATEMENT)
                        .zip(message_ids.chunks(ROWS_PER_STATEMENT))
                    {
                        let mut insert = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                            "INSERT INTO queue_messages (message_id, body, event_id, \
                             correlation_id, blob_key, enqueued_at, visible_at) ",
                        );
                        insert.push_values(
                            messages.iter().zip(message_ids),
                            |mut row, (message, message_id)| {
                                let attributes = &message.attributes;
                                row.push_bind(message_id.as_str())
                                    .push_bind(message.body.as_slice())
                                    .push_bind(attributes.event_id.as_deref())
                                    .push_bind(attributes.correlation_id.as_deref())
                                    .push_bind(attributes.blob_key.as_deref())
                                    .push_bind(now)
                                    .push_bind(now);
                            },
                        );
                        insert.build().execute(&mut *connection).await?;
                    }
                    Ok(message_ids)
                })
            })
            .await
            .map_err(|e| SendError {
                sent: vec![None; n_messages],
                source: queue_error(e),
            })?;
        self.receivers.wake_one();
        Ok(message_ids)
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pools.reader)
            .await
            .map_err(queue_error)?;
        Ok(())
    }
}

#[async_trait]
impl Consumer for SqliteQueue {
    async fn receive(&self, max_messages: usize, wait: Duration) -> Result<Received> {
        self.receivers
            .long_poll(max_messages, wait, IDLE_POLL, || {
                self.receive_now(max_messages)
            })
            .await
    }

    async fn delete_many(&self, deliveries: &[&Delivery]) -> Result<()> {
        if deliveries.is_empty() {
            return Ok(());
        }
        let keys: Vec<(String, String)> = deliveries
            .iter()
            .map(|d| (d.message_id.clone(), d.receipt.clone()))
            .collect();
        self.writes
            .run(move |connection| {
                Box::pin(async move {
                    for keys in keys.chunks(ROWS_PER_STATEMENT) {
                        let mut delete = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                            "DELETE FROM queue_messages WHERE (message_id, receipt) IN (",
                        );
                        delete.push_values(keys, |mut row, (message_id, receipt)| {
                            row.push_bind(message_id.as_str())
                                .push_bind(receipt.as_str());
                        });
                        delete.push(")");
                        delete.build().execute(&mut *connection).await?;
                    }
                    Ok(())
                })
            })
            .await
            .map_err(queue_error)
    }

    async fn retry_later(
        &self,
        delivery: &Delivery,
        delay: Duration,
        error: &FailureInfo,
    ) -> Result<()> {
        let (message_id, receipt, error) = (
            delivery.message_id.clone(),
            delivery.receipt.clone(),
            error.clone(),
        );
        self.writes
            .run(move |connection| {
                Box::pin(async move {
                    let now = now_millis();
                    sqlx::query(RETRY_LATER_SQL)
                        .bind(message_id)
                        .bind(receipt)
                        .bind(now)
                        .bind(now.saturating_add(millis(delay)))
                        .bind(error.code)
                        .bind(error.message)
                        .execute(&mut *connection)
                        .await
                        .map(|_| ())
                })
            })
            .await
            .map_err(queue_error)
    }

    async fn dead_letter(&self, delivery: &Delivery, error: &FailureInfo) -> Result<()> {
        let (message_id, receipt, error) = (
            delivery.message_id.clone(),
            delivery.receipt.clone(),
            error.clone(),
        );
        self.writes
            .run(move |connection| {
                Box::pin(async move {
                    let now = now_millis();
                    let moved = sqlx::query(DEAD_LETTER_SQL)
                        .bind(&message_id)
                        .bind(&receipt)
                        .bind(now)
                        .bind(&error.code)
                        .bind(&error.message)
                        .execute(&mut *connection)
                        .await?;
                    if moved.rows_affected() > 0 {
                        sqlx::query(DELETE_SQL)
                            .bind(&message_id)
                            .bind(&receipt)
                            .execute(&mut *connection)
                            .await?;
                    }
                    Ok(())
                })
            })
            .await
            .map_err(queue_error)
    }
}

#[async_trait]
impl DeadLetterAdmin for SqliteQueue {
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
        .map_err(queue_error)?;
        let count = |name: &str| u64::try_from(row.get::<i64, _>(name)).unwrap_or(0);
        Ok(QueueDepth {
            pending: count("pending"),
            in_flight: count("in_flight"),
            dead_letters: count("dead"),
        })
    }

    async fn peek(&self, limit: usize) -> Result<Vec<PendingMessage>> {
        let rows = sqlx::query(
            r#"SELECT message_id, body, event_id, correlation_id, blob_key, receive_count, enqueued_at
               FROM queue_messages ORDER BY seq LIMIT ?1"#,
        )
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pools.reader)
        .await
        .map_err(queue_error)?;
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
        .map_err(queue_error)?;
        Ok(rows.iter().map(dead_letter).collect())
    }

    async fn get_dead_letter(&self, id: &str) -> Result<Option<DeadLetter>> {
        let row = sqlx::query("SELECT * FROM dead_letters WHERE message_id = ?1")
            .bind(id)
            .fetch_optional(&self.pools.reader)
            .await
            .map_err(queue_error)?;
        Ok(row.as_ref().map(dead_letter))
    }

    async fn redrive(&self, selector: &RedriveSelector) -> Result<u64> {
        let (event_id, message_id) = match selector {
            RedriveSelector::All => (None, None),
            RedriveSelector::EventId(event_id) => (Some(event_id.clone()), None),
            RedriveSelector::Id(id) => (None, Some(id.clone())),
        };
        let n_moved = self
            .writes
            .run(move |connection| {
                Box::pin(async move {
                    let filter =
                        "(?1 IS NULL OR event_id = ?1) AND (?2 IS NULL OR message_id = ?2)";
                    let moved = sqlx::query(&format!(
                        r#"INSERT INTO queue_messages
                             (message_id, body, event_id, correlation_id, blob_key, enqueued_at, visible_at)
                           SELECT message_id, body, event_id, correlation_id, blob_key, ?3, ?3
                           FROM dead_letters WHERE {filter} ORDER BY seq"#
                    ))
                    .bind(&event_id)
                    .bind(&message_id)
                    .bind(now_millis())
                    .execute(&mut *connection)
                    .await?;
                    sqlx::query(&format!("DELETE FROM dead_letters WHERE {filter}"))
                        .bind(&event_id)
                        .bind(&message_id)
                        .execute(&mut *connection)
                        .await?;
                    Ok(moved.rows_affected())
                })
            })
            .await
            .map_err(queue_error)?;
        if n_moved > 0 {
            self.receivers.wake_one();
        }
        Ok(n_moved)
    }
}

#[async_trait]
impl BlobReferences for SqliteQueue {
    async fn references_blob(&self, key: &str) -> Result<bool> {
        let referenced: bool = sqlx::query_scalar(
            r#"SELECT EXISTS (SELECT 1 FROM queue_messages WHERE blob_key = ?1)
                   OR EXISTS (SELECT 1 FROM dead_letters WHERE blob_key = ?1)"#,
        )
        .bind(key)
        .fetch_one(&self.pools.reader)
        .await
        .map_err(queue_error)?;
        Ok(referenced)
    }
}

fn dead_letter(row: &SqliteRow) -> DeadLetter {
    DeadLetter {
        id: row.get("message_id"),
        attributes: attributes(row),
        error_class: FailureClass::parse(&row.get::<String, _>("error_class"))
            .unwrap_or(FailureClass::Permanent),
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
