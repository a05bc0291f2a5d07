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
//!
//! Operators' reads never count a whole table: triggers keep the number of queued messages and
//! of dead letters per error code in `queue_message_count` and `dead_letter_counts`, and DLQ
//! listings page by key over indexes in `(dead_lettered_at, message_id)` order.

use crate::sql_limit;
use fluxa_core::time::ceil_to_unix_millis;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use fluxa_core::ids::DeadLetterId;
use fluxa_core::time::from_unix_millis;
use fluxa_core::{CorrelationId, ErrorCode, EventId, EventType, FailureClass, FailureInfo};
use fluxa_queue::{
    BlobReferences, Consumer, DeadLetter, DeadLetterAdmin, DeadLetterFilter, DeadLetterPage,
    DeadLetterPosition, Delivery, Error, EventPurge, ExhaustedNotice, MessageAttributes,
    NewMessage, PendingMessage, Producer, QueueDepth, Received, Receivers, RedriveSelector, Result,
    SendError,
};
use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};

use crate::group_commit::GroupCommit;
use fluxa_queue::QueueSettings;

use crate::rows::{column, lenient, parsed, unsigned};
use crate::{is_refusal, millis, now_millis, Pools};

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
    config: QueueSettings,
    writes: GroupCommit,
    /// Wake-ups for this process's idle receivers.
    receivers: Receivers,
}

impl SqliteQueue {
    pub(crate) fn new(pools: Pools, config: QueueSettings) -> Self {
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
    config: QueueSettings,
    max_messages: usize,
) -> std::result::Result<Received, sqlx::Error> {
    let now = now_millis();
    let max_receives = i64::from(config.max_receives);
    let limit = i64::try_from(max_messages).unwrap_or(i64::MAX);
    // A message that was already received max_receives times goes to the DLQ instead of being
    // delivered again.
    let exhausted = sqlx::query(&format!(
        r#"INSERT INTO dead_letters
             (message_id, body, event_id, correlation_id, blob_key, event_type, error_class,
              error_code, error_message, receive_count, enqueued_at, first_failure_at,
              last_failure_at, dead_lettered_at)
           SELECT message_id, body, event_id, correlation_id, blob_key, event_type,
                  'retries_exhausted', 'retries_exhausted',
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
           RETURNING seq, message_id, body, event_id, correlation_id, blob_key, event_type,
                     receive_count, enqueued_at"#
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

/// Notices for dead-lettered rows (`event_id`, `error_message`) that carry a valid event id.
fn exhausted_notices(rows: &[SqliteRow]) -> Vec<ExhaustedNotice> {
    rows.iter()
        .filter_map(|row| {
            Some(ExhaustedNotice {
                event_id: lenient(row, "event_id", |text| EventId::parse(text).ok())?,
                error: FailureInfo::new(
                    ErrorCode::RetriesExhausted,
                    row.get::<String, _>("error_message"),
                ),
            })
        })
        .collect()
}

/// A row's attributes; one that does not parse reads as absent (see [`MessageAttributes`]).
fn attributes(row: &SqliteRow) -> MessageAttributes {
    MessageAttributes {
        event_id: lenient(row, "event_id", |text| EventId::parse(text).ok()),
        correlation_id: lenient(row, "correlation_id", |text| {
            CorrelationId::parse(text).ok()
        }),
        blob_key: lenient(row, "blob_key", |text| Some(text.to_owned())),
        event_type: lenient(row, "event_type", |text| EventType::parse(text).ok()),
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
     (message_id, body, event_id, correlation_id, blob_key, event_type, error_class,
      error_code, error_message, receive_count, enqueued_at, first_failure_at, last_failure_at,
      dead_lettered_at)
   SELECT message_id, body, event_id, correlation_id, blob_key, event_type, 'permanent', ?4,
          ?5, receive_count, enqueued_at, COALESCE(first_failure_at, ?3), ?3, ?3
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
                             correlation_id, blob_key, event_type, enqueued_at, visible_at) ",
                        );
                        insert.push_values(
                            messages.iter().zip(message_ids),
                            |mut row, (message, message_id)| {
                                let attributes = &message.attributes;
                                row.push_bind(message_id.as_str())
                                    .push_bind(message.body.as_slice())
                                    .push_bind(attributes.event_id.as_ref().map(EventId::as_str))
                                    .push_bind(
                                        attributes
                                            .correlation_id
                                            .as_ref()
                                            .map(CorrelationId::as_str),
                                    )
                                    .push_bind(attributes.blob_key.as_deref())
                                    .push_bind(
                                        attributes.event_type.as_ref().map(EventType::as_str),
                                    )
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
                        .bind(error.code.as_str())
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
                        .bind(error.code.as_str())
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
        // One read transaction, so the numbers come from one snapshot.
        let mut snapshot = self.pools.reader.begin().await.map_err(queue_error)?;
        let row = sqlx::query(DEPTH_SQL)
            .bind(now_millis())
            .fetch_one(&mut *snapshot)
            .await
            .map_err(queue_error)?;
        let by_code = sqlx::query(DEAD_LETTERS_BY_CODE_SQL)
            .fetch_all(&mut *snapshot)
            .await
            .map_err(queue_error)?;
        snapshot.rollback().await.map_err(queue_error)?;
        let total = count(row.get("total"));
        let in_flight = count(row.get("in_flight"));
        let dead_letters_by_code: Vec<(String, u64)> = by_code
            .iter()
            .map(|row| (row.get("error_code"), count(row.get("n"))))
            .collect();
        Ok(QueueDepth {
            pending: total.saturating_sub(in_flight),
            in_flight,
            dead_letters: dead_letters_by_code.iter().map(|(_, n)| n).sum(),
            oldest_enqueued_at: row
                .get::<Option<i64>, _>("oldest_enqueued_at")
                .map(from_unix_millis),
            dead_letters_by_code,
        })
    }

    async fn peek(&self, limit: usize) -> Result<Vec<PendingMessage>> {
        let rows = sqlx::query(
            r#"SELECT message_id, body, event_id, correlation_id, blob_key, event_type,
                      receive_count, enqueued_at
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
        filter: &DeadLetterFilter,
        after: Option<&DeadLetterPosition>,
        limit: usize,
    ) -> Result<DeadLetterPage> {
        let rows = list_query("", filter, after, limit)
            .build()
            .fetch_all(&self.pools.reader)
            .await
            .map_err(queue_error)?;
        let dead_letters = rows.iter().map(dead_letter).collect::<Result<Vec<_>>>()?;
        Ok(page(dead_letters, limit))
    }

    async fn count_dead_letters(&self, filter: &DeadLetterFilter) -> Result<u64> {
        // The counters answer the common questions (everything, one error code) at once; other
        // filters count over their index.
        let code_only = DeadLetterFilter {
            error_code: filter.error_code,
            ..DeadLetterFilter::default()
        };
        let n: i64 = if *filter == code_only {
            sqlx::query_scalar(
                "SELECT COALESCE(SUM(n), 0) FROM dead_letter_counts \
                 WHERE ?1 IS NULL OR error_code = ?1",
            )
            .bind(filter.error_code.map(ErrorCode::as_str))
            .fetch_one(&self.pools.reader)
            .await
        } else {
            let mut query = QueryBuilder::new("SELECT COUNT(*) FROM dead_letters");
            push_conditions(&mut query, &Selection::Filter(filter.clone()), None);
            query
                .build_query_scalar()
                .fetch_one(&self.pools.reader)
                .await
        }
        .map_err(queue_error)?;
        Ok(count(n))
    }

    async fn get_dead_letter(&self, id: &DeadLetterId) -> Result<Option<DeadLetter>> {
        let row = sqlx::query("SELECT * FROM dead_letters WHERE message_id = ?1")
            .bind(id.as_str())
            .fetch_optional(&self.pools.reader)
            .await
            .map_err(queue_error)?;
        row.as_ref().map(dead_letter).transpose()
    }

    async fn redrive(&self, selector: &RedriveSelector, limit: usize) -> Result<u64> {
        if limit == 0 {
            return Ok(0);
        }
        let selection = match selector {
            RedriveSelector::Filter(filter) => Selection::Filter(filter.clone()),
            RedriveSelector::Id(id) => Selection::Id(id.to_string()),
        };
        let n_moved = self
            .writes
            .run(move |connection| {
                Box::pin(async move {
                    // The same choice twice in one write transaction: nothing else writes in
                    // between and the order is total, so the DELETE removes exactly the rows
                    // the INSERT copied.
                    let chosen = |query: &mut QueryBuilder<'_, Sqlite>| {
                        query.push("SELECT seq FROM dead_letters");
                        push_conditions(query, &selection, None);
                        query
                            .push(" ORDER BY dead_lettered_at, message_id LIMIT ")
                            .push_bind(sql_limit(limit));
                    };
                    let now = now_millis();
                    let mut insert = QueryBuilder::new(
                        "INSERT INTO queue_messages (message_id, body, event_id, correlation_id, \
                         blob_key, event_type, enqueued_at, visible_at) \
                         SELECT message_id, body, event_id, correlation_id, blob_key, event_type, ",
                    );
                    insert
                        .push_bind(now)
                        .push(", ")
                        .push_bind(now)
                        .push(" FROM dead_letters WHERE seq IN (");
                    chosen(&mut insert);
                    insert.push(") ORDER BY dead_lettered_at, message_id");
                    let moved = insert.build().execute(&mut *connection).await?;
                    let mut delete = QueryBuilder::new("DELETE FROM dead_letters WHERE seq IN (");
                    chosen(&mut delete);
                    delete.push(")");
                    delete.build().execute(&mut *connection).await?;
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

    async fn purge_event(&self, event_id: &str) -> Result<EventPurge> {
        let owned_event_id = event_id.to_owned();
        let blob_keys: Vec<Option<String>> = self
            .writes
            .run(move |connection| {
                Box::pin(async move {
                    sqlx::query_scalar(
                        "DELETE FROM dead_letters WHERE event_id = ?1 RETURNING blob_key",
                    )
                    .bind(owned_event_id)
                    .fetch_all(&mut *connection)
                    .await
                })
            })
            .await
            .map_err(queue_error)?;
        // No index on queue_messages.event_id: every send and every settle would pay for one,
        // while this count runs once per erasure, on a reader (it never holds up the writer),
        // over a queue the workers keep short. A long backlog makes an erasure slower, not the
        // pipeline.
        let queued: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM queue_messages WHERE event_id = ?1")
                .bind(event_id)
                .fetch_one(&self.pools.reader)
                .await
                .map_err(queue_error)?;
        Ok(EventPurge {
            dead_letters: u64::try_from(blob_keys.len()).unwrap_or(u64::MAX),
            blob_keys: distinct_blob_keys(blob_keys),
            queued: count(queued),
            queue_unsearchable: false,
        })
    }

    async fn prune_dead_letters(&self, before: DateTime<Utc>, limit: usize) -> Result<u64> {
        if limit == 0 {
            return Ok(0);
        }
        let before = ceil_to_unix_millis(before);
        self.writes
            .run(move |connection| {
                Box::pin(async move {
                    let pruned = sqlx::query(
                        r#"DELETE FROM dead_letters WHERE seq IN (
                             SELECT seq FROM dead_letters WHERE dead_lettered_at < ?1
                             ORDER BY dead_lettered_at, message_id LIMIT ?2)"#,
                    )
                    .bind(before)
                    .bind(sql_limit(limit))
                    .execute(&mut *connection)
                    .await?;
                    Ok(pruned.rows_affected())
                })
            })
            .await
            .map_err(queue_error)
    }
}

/// Everything but the per-code counts for `depth`: the message counter, the messages in
/// flight (a range over the `(visible_at, seq)` index: it reads only in-flight and delayed
/// messages) and the head of the queue (`MIN(seq)` is one seek to the first row). `?1` is now.
const DEPTH_SQL: &str = r#"SELECT
     (SELECT n FROM queue_message_count) AS total,
     (SELECT COUNT(*) FROM queue_messages
        WHERE visible_at > ?1 AND receipt IS NOT NULL) AS in_flight,
     (SELECT enqueued_at FROM queue_messages
        WHERE seq = (SELECT MIN(seq) FROM queue_messages)) AS oldest_enqueued_at"#;

/// The dead-letter counters, by code.
const DEAD_LETTERS_BY_CODE_SQL: &str =
    "SELECT error_code, n FROM dead_letter_counts WHERE n > 0 ORDER BY error_code";

/// A page of the DLQ: `SELECT *` of up to `limit` entries matching `filter` after `after`, in
/// `(dead_lettered_at, message_id)` order, preceded by `prefix` (tests explain the plan).
fn list_query(
    prefix: &str,
    filter: &DeadLetterFilter,
    after: Option<&DeadLetterPosition>,
    limit: usize,
) -> QueryBuilder<'static, Sqlite> {
    let mut query = QueryBuilder::new(format!("{prefix}SELECT * FROM dead_letters"));
    push_conditions(&mut query, &Selection::Filter(filter.clone()), after);
    query
        .push(" ORDER BY dead_lettered_at, message_id LIMIT ")
        .push_bind(sql_limit(limit));
    query
}

/// Which dead letters a statement works on.
enum Selection {
    Filter(DeadLetterFilter),
    Id(String),
}

/// Appends ` WHERE` and the conditions for `selection` (and, with `after`, for the rows
/// strictly after it in `(dead_lettered_at, message_id)` order). Only the filters given become
/// conditions, so SQLite sees plain equalities and ranges and can pick the index that fits.
fn push_conditions(
    query: &mut QueryBuilder<'_, Sqlite>,
    selection: &Selection,
    after: Option<&DeadLetterPosition>,
) {
    query.push(" WHERE 1");
    let filter = match selection {
        Selection::Id(id) => {
            query.push(" AND message_id = ").push_bind(id.clone());
            return;
        }
        Selection::Filter(filter) => filter,
    };
    let equalities = [
        ("event_id", filter.event_id.clone()),
        (
            "error_code",
            filter.error_code.map(|c| c.as_str().to_owned()),
        ),
        (
            "error_class",
            filter.error_class.map(|c| c.as_str().to_owned()),
        ),
        ("event_type", filter.event_type.clone()),
    ];
    for (column, value) in equalities {
        if let Some(value) = value {
            query.push(format!(" AND {column} = ")).push_bind(value);
        }
    }
    // A cursor at or after `since` already implies it; leaving it out lets the index search
    // start at the cursor instead of at `since` (which would step over every earlier page).
    let since = filter
        .since
        .filter(|since| after.is_none_or(|after| after.dead_lettered_at < *since));
    if let Some(since) = since {
        query
            .push(" AND dead_lettered_at >= ")
            .push_bind(ceil_to_unix_millis(since));
    }
    if let Some(until) = filter.until {
        query
            .push(" AND dead_lettered_at < ")
            .push_bind(ceil_to_unix_millis(until));
    }
    if let Some(after) = after {
        // A position between two milliseconds (not one this backend handed out) goes on from
        // the next millisecond: every id sorts after the empty string.
        let at = ceil_to_unix_millis(after.dead_lettered_at);
        let id = if from_unix_millis(at) == after.dead_lettered_at {
            after.id.clone()
        } else {
            String::new()
        };
        query
            .push(" AND (dead_lettered_at, message_id) > (")
            .push_bind(at)
            .push(", ")
            .push_bind(id)
            .push(")");
    }
}

/// A page of up to `limit` dead letters; it says where the next starts only when it is full.
fn page(dead_letters: Vec<DeadLetter>, limit: usize) -> DeadLetterPage {
    let next = match dead_letters.last() {
        Some(last) if dead_letters.len() >= limit => Some(DeadLetterPosition {
            dead_lettered_at: last.dead_lettered_at,
            id: last.id.to_string(),
        }),
        _ => None,
    };
    DeadLetterPage { dead_letters, next }
}

/// A count read from the database, where it is never negative.
fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// The blobs of purged dead letters, each once.
fn distinct_blob_keys(blob_keys: Vec<Option<String>>) -> Vec<String> {
    let mut blob_keys: Vec<String> = blob_keys.into_iter().flatten().collect();
    blob_keys.sort();
    blob_keys.dedup();
    blob_keys
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

/// A `dead_letters` row. Its own record (id, class, code, counts, times) must parse, or it is
/// `Corrupt`; its attributes are hints and read as absent when they do not parse.
fn dead_letter(row: &SqliteRow) -> Result<DeadLetter> {
    let read = || -> std::result::Result<DeadLetter, String> {
        Ok(DeadLetter {
            id: parsed(row, "message_id", |text| DeadLetterId::parse(text).ok())?,
            attributes: attributes(row),
            error_class: parsed(row, "error_class", FailureClass::parse)?,
            error: FailureInfo {
                code: parsed(row, "error_code", ErrorCode::parse)?,
                message: column(row, "error_message")?,
            },
            receive_count: unsigned(row, "receive_count")?,
            enqueued_at: from_unix_millis(column(row, "enqueued_at")?),
            first_failure_at: from_unix_millis(column(row, "first_failure_at")?),
            last_failure_at: from_unix_millis(column(row, "last_failure_at")?),
            dead_lettered_at: from_unix_millis(column(row, "dead_lettered_at")?),
            body: column(row, "body")?,
        })
    };
    read().map_err(|reason| {
        let id = row
            .try_get::<String, _>("message_id")
            .unwrap_or_else(|_| "(unreadable)".to_owned());
        Error::Corrupt(format!("dead_letters row {id:?}: {reason}"))
    })
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use sqlx::sqlite::SqliteArguments;

    use super::*;

    /// The plan SQLite picks for `query` (an `EXPLAIN QUERY PLAN`), one line per step.
    async fn plan_of<'q>(
        pool: &sqlx::SqlitePool,
        query: sqlx::query::Query<'q, Sqlite, SqliteArguments<'q>>,
    ) -> String {
        let rows = query.fetch_all(pool).await.unwrap();
        rows.iter()
            .map(|row| row.get::<String, _>("detail"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// A queue holding 20 000 messages (1 in 100 in flight) and 20 000 dead letters of four
    /// codes, two classes and five types, dead-lettered one millisecond apart from
    /// 1 800 000 000 000.
    async fn big_queue(dir: &std::path::Path) -> SqliteQueue {
        let config = QueueSettings {
            visibility_timeout: Duration::from_secs(60),
            max_receives: 3,
        };
        let queue = crate::open(dir, config).await.unwrap().queue;
        sqlx::query(
            r#"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000)
               INSERT INTO queue_messages
                 (message_id, body, event_id, enqueued_at, visible_at, receipt)
               SELECT 'm' || i, x'31', 'e' || i, 1800000000000 + i,
                      CASE WHEN i % 100 = 0 THEN 1900000000000 ELSE 1800000000000 END,
                      CASE WHEN i % 100 = 0 THEN 'r' END
               FROM n"#,
        )
        .execute(&queue.pools.writer)
        .await
        .unwrap();
        sqlx::query(
            r#"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000)
               INSERT INTO dead_letters
                 (message_id, body, event_id, event_type, error_class, error_code,
                  error_message, receive_count, enqueued_at, first_failure_at, last_failure_at,
                  dead_lettered_at)
               SELECT 'd' || i, x'31', 'e' || i, 'type-' || (i % 5),
                      CASE WHEN i % 4 = 0 THEN 'retries_exhausted' ELSE 'permanent' END,
                      CASE i % 4 WHEN 0 THEN 'retries_exhausted' WHEN 1 THEN 'hash_mismatch'
                                 WHEN 2 THEN 'blob_missing' ELSE 'event_id_conflict' END,
                      'm', 1, 0, 0, 0, 1800000000000 + i
               FROM n"#,
        )
        .execute(&queue.pools.writer)
        .await
        .unwrap();
        queue
    }

    /// Contract section 7: the gauges are "computed without full scans". On a queue and a DLQ
    /// of 20 000 rows each, before and after ANALYZE, `depth` reads the counters, searches the
    /// `(visible_at, seq)` index for what is in flight and seeks the head of the queue: no step
    /// scans `queue_messages` or `dead_letters`. And the counters saw the bulk inserts.
    #[tokio::test]
    async fn depth_reads_counters_and_index_ranges_and_never_scans_the_queue_or_the_dlq() {
        let dir = tempfile::tempdir().unwrap();
        let queue = big_queue(dir.path()).await;
        for analyzed in [false, true] {
            if analyzed {
                sqlx::query("ANALYZE")
                    .execute(&queue.pools.writer)
                    .await
                    .unwrap();
            }
            let pool = &queue.pools.reader;
            let depth = format!("EXPLAIN QUERY PLAN {DEPTH_SQL}");
            let by_code = format!("EXPLAIN QUERY PLAN {DEAD_LETTERS_BY_CODE_SQL}");
            let plan = format!(
                "{}\n{}",
                plan_of(pool, sqlx::query(&depth).bind(now_millis())).await,
                plan_of(pool, sqlx::query(&by_code)).await
            );
            for line in plan.lines() {
                assert!(
                    !line.starts_with("SCAN queue_messages")
                        && !line.starts_with("SCAN dead_letters"),
                    "depth scans a table (analyzed: {analyzed}):\n{plan}"
                );
            }
            assert!(
                plan.contains("SEARCH queue_messages USING INDEX queue_messages_visible (visible_at>?)"),
                "in-flight messages are counted over an index range (analyzed: {analyzed}):\n{plan}"
            );
        }
        let depth = queue.depth().await.unwrap();
        assert_eq!((depth.pending, depth.in_flight), (19_800, 200));
        assert_eq!(depth.dead_letters, 20_000);
        assert_eq!(depth.dead_letters_by_code.len(), 4);
        assert_eq!(
            depth.oldest_enqueued_at,
            Some(from_unix_millis(1_800_000_000_001))
        );
    }

    /// Contract section 4: each DLQ filter is served by its index in page order (no temporary
    /// B-tree to sort), and a cursor bounds the index search itself, so page n does not step
    /// over pages 1 to n - 1. Checked on 20 000 dead letters before and after ANALYZE.
    #[tokio::test]
    async fn every_dead_letter_filter_is_served_by_its_index_in_page_order() {
        let dir = tempfile::tempdir().unwrap();
        let queue = big_queue(dir.path()).await;
        let at = Utc.timestamp_millis_opt(1_800_000_010_000).unwrap();
        let cursor = DeadLetterPosition {
            dead_lettered_at: at,
            id: "d10000".into(),
        };
        let filters = [
            (DeadLetterFilter::default(), "dead_letters_dead_lettered"),
            (
                DeadLetterFilter {
                    event_id: Some("e5".into()),
                    ..DeadLetterFilter::default()
                },
                "dead_letters_event_id",
            ),
            (
                DeadLetterFilter {
                    error_code: Some(ErrorCode::HashMismatch),
                    ..DeadLetterFilter::default()
                },
                "dead_letters_error_code",
            ),
            (
                DeadLetterFilter {
                    error_class: Some(FailureClass::RetriesExhausted),
                    ..DeadLetterFilter::default()
                },
                "dead_letters_error_class",
            ),
            (
                DeadLetterFilter {
                    event_type: Some("type-1".into()),
                    ..DeadLetterFilter::default()
                },
                "dead_letters_event_type",
            ),
            (
                DeadLetterFilter {
                    since: Some(at),
                    until: Some(at + chrono::TimeDelta::seconds(5)),
                    ..DeadLetterFilter::default()
                },
                "dead_letters_dead_lettered",
            ),
            (
                DeadLetterFilter {
                    error_code: Some(ErrorCode::HashMismatch),
                    event_type: Some("type-1".into()),
                    since: Some(at),
                    ..DeadLetterFilter::default()
                },
                "dead_letters_",
            ),
        ];
        for analyzed in [false, true] {
            if analyzed {
                sqlx::query("ANALYZE")
                    .execute(&queue.pools.writer)
                    .await
                    .unwrap();
            }
            for (filter, index) in &filters {
                for after in [None, Some(&cursor)] {
                    let plan = plan_of(
                        &queue.pools.reader,
                        list_query("EXPLAIN QUERY PLAN ", filter, after, 50).build(),
                    )
                    .await;
                    let context = format!("{filter:?} after {after:?} (analyzed: {analyzed})");
                    assert!(
                        plan.contains(&format!("USING INDEX {index}")),
                        "{context} must use {index}:\n{plan}"
                    );
                    assert!(
                        !plan.contains("TEMP B-TREE"),
                        "{context} must read in page order:\n{plan}"
                    );
                    if after.is_some() {
                        assert!(
                            plan.contains("(dead_lettered_at,message_id)>(?,?)"),
                            "{context}: the cursor must bound the index search:\n{plan}"
                        );
                    }
                }
            }
        }
    }
}
