//! The queue on PostgreSQL: SQS semantics over `queue_messages` and `dead_letters`, with
//! receives that skip rows other replicas are claiming (`FOR UPDATE SKIP LOCKED`).
//!
//! A receive is one statement: it locks the first visible messages in `(visible_at, seq)`
//! order (an index range scan that stops after the batch), moves those that have used up their
//! receives to `dead_letters`, and claims the rest. No receive ever scans the backlog.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use fluxa_core::{ErrorCode, FailureClass, FailureInfo};
use fluxa_queue::{
    BlobReferences, Consumer, DeadLetter, DeadLetterAdmin, Delivery, Error, ExhaustedNotice,
    MessageAttributes, NewMessage, PendingMessage, Producer, QueueDepth, Received, Receivers,
    RedriveSelector, Result, SendError,
};
use sqlx::postgres::{PgListener, PgRow};
use sqlx::{PgPool, Row};
use tokio::sync::Notify;

use crate::{is_refusal, seconds, QueueConfig};

/// How often an idle receiver looks again for messages whose retry delay or visibility timeout
/// has passed (new messages wake it at once through `LISTEN`/`NOTIFY`).
const IDLE_POLL: Duration = Duration::from_millis(250);

/// The `NOTIFY` channel on which every send and redrive announces new messages.
pub(crate) const ENQUEUED_CHANNEL: &str = "fluxa_enqueued";

/// A statement the database refused (see [`is_refusal`]) is `Rejected`; anything else (no
/// connection, a timed-out pool, a shutdown, a full disk) means the queue is `Unavailable`.
fn queue_error(error: sqlx::Error) -> Error {
    if is_refusal(&error) {
        Error::rejected(error)
    } else {
        Error::unavailable(error)
    }
}

/// The shared queue.
#[derive(Clone, Debug)]
pub struct PgQueue {
    pool: PgPool,
    config: QueueConfig,
    /// Woken whenever any replica enqueues (relayed from `LISTEN`).
    receivers: Receivers,
    /// Asks the announcer task to tell other replicas that messages are waiting.
    announce: Arc<Notify>,
    /// Stop the relay (and free its connection) and the announcer when the last clone of this
    /// queue is dropped.
    _tasks: Arc<[AbortOnDrop; 2]>,
}

/// Aborts a background task when dropped.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl PgQueue {
    pub(crate) async fn new(pool: PgPool, config: QueueConfig) -> Result<Self, sqlx::Error> {
        let receivers = Receivers::default();
        let listener = listen(&pool).await?;
        let relay = tokio::spawn(relay_notifications(
            pool.clone(),
            listener,
            receivers.clone(),
        ));
        let announce = Arc::new(Notify::new());
        let announcer = tokio::spawn(announce_enqueues(pool.clone(), Arc::clone(&announce)));
        Ok(Self {
            pool,
            config,
            receivers,
            announce,
            _tasks: Arc::new([AbortOnDrop(relay), AbortOnDrop(announcer)]),
        })
    }

    /// New messages are waiting: wake one receiver of this replica at once, and have the
    /// announcer tell the other replicas.
    fn announce_enqueued(&self) {
        self.receivers.wake_one();
        self.announce.notify_one();
    }

    async fn receive_now(&self, max_messages: usize) -> Result<Received> {
        let receipt = uuid::Uuid::new_v4().to_string();
        // One statement (so one round trip and its own transaction): lock the head of the
        // queue, dead-letter its exhausted messages (SQS redrive), claim the others.
        let rows = sqlx::query(
            r#"WITH head AS (
                 SELECT seq, receive_count FROM queue_messages WHERE visible_at <= now()
                 ORDER BY visible_at, seq LIMIT $4 FOR UPDATE SKIP LOCKED),
               exhausted AS (
                 DELETE FROM queue_messages q USING head
                 WHERE q.seq = head.seq AND head.receive_count >= $3
                 RETURNING q.*),
               dead AS (
                 INSERT INTO dead_letters
                   (message_id, body, event_id, correlation_id, blob_key, error_class,
                    error_code, error_message, receive_count, enqueued_at, first_failure_at,
                    last_failure_at, dead_lettered_at)
                 SELECT message_id, body, event_id, correlation_id, blob_key,
                        'retries_exhausted', 'retries_exhausted',
                        'gave up after ' || receive_count || ' receives; last error: ' ||
                          COALESCE(last_error_code || ': ' || last_error_message,
                                   'none recorded'),
                        receive_count, enqueued_at, COALESCE(first_failure_at, now()),
                        COALESCE(last_failure_at, now()), now()
                 FROM exhausted
                 RETURNING event_id, error_message),
               delivered AS (
                 UPDATE queue_messages q
                 SET receive_count = q.receive_count + 1, receipt = $1,
                     visible_at = now() + make_interval(secs => $2)
                 FROM head WHERE q.seq = head.seq AND head.receive_count < $3
                 RETURNING q.seq, q.message_id, q.body, q.event_id, q.correlation_id,
                           q.blob_key, q.receive_count, q.enqueued_at)
               SELECT seq, message_id, body, event_id, correlation_id, blob_key, receive_count,
                      enqueued_at, NULL::text AS error_message
               FROM delivered
               UNION ALL
               SELECT NULL, NULL, NULL, event_id, NULL, NULL, NULL, NULL, error_message
               FROM dead"#,
        )
        .bind(&receipt)
        .bind(seconds(self.config.visibility_timeout))
        .bind(i32::try_from(self.config.max_receives).unwrap_or(i32::MAX))
        .bind(i64::try_from(max_messages).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(queue_error)?;

        let mut received = Received::default();
        let mut deliveries: Vec<(i64, Delivery)> = Vec::with_capacity(rows.len());
        for row in &rows {
            let Some(seq) = row.get::<Option<i64>, _>("seq") else {
                let event_id: Option<String> = row.get("event_id");
                if let Some(event_id) = event_id {
                    received.exhausted.push(ExhaustedNotice {
                        event_id,
                        error: FailureInfo::new(
                            ErrorCode::RetriesExhausted,
                            row.get::<String, _>("error_message"),
                        ),
                    });
                }
                continue;
            };
            let receive_count = u32::try_from(row.get::<i32, _>("receive_count")).unwrap_or(0);
            let delivery = Delivery {
                message_id: row.get("message_id"),
                receipt: receipt.clone(),
                body: row.get::<Vec<u8>, _>("body").into(),
                attributes: attributes(row),
                receive_count,
                receives_left: self.config.max_receives.saturating_sub(receive_count),
                enqueued_at: row.get("enqueued_at"),
            };
            deliveries.push((seq, delivery));
        }
        deliveries.sort_by_key(|(seq, _)| *seq);
        received.deliveries = deliveries.into_iter().map(|(_, d)| d).collect();
        Ok(received)
    }
}

/// How often at most a replica sends `NOTIFY`. A `NOTIFY` takes a cluster-wide lock at
/// commit, so one per enqueue serialises every ingest commit; sends in the same interval share
/// one (other replicas hear of new messages within this delay, this replica at once).
const ANNOUNCE_INTERVAL: Duration = Duration::from_millis(5);

/// Sends one `NOTIFY` for every burst of enqueues, at most one per [`ANNOUNCE_INTERVAL`].
async fn announce_enqueues(pool: PgPool, announce: Arc<Notify>) {
    loop {
        announce.notified().await;
        if let Err(e) = sqlx::query("SELECT pg_notify($1, '')")
            .bind(ENQUEUED_CHANNEL)
            .execute(&pool)
            .await
        {
            // Other replicas still poll (IDLE_POLL); nothing is lost.
            tracing::debug!(error.message = %e, "could not announce enqueued messages");
        }
        tokio::time::sleep(ANNOUNCE_INTERVAL).await;
    }
}

/// A connection that listens on [`ENQUEUED_CHANNEL`].
async fn listen(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(ENQUEUED_CHANNEL).await?;
    Ok(listener)
}

/// How long the relay waits before listening again after its connection failed.
const RELISTEN_DELAY: Duration = Duration::from_secs(1);

/// Wakes this replica's idle receivers on every `NOTIFY`. While no connection listens,
/// receivers fall back to polling (`IDLE_POLL`), so nothing is lost.
///
/// `PgListener` reconnects by itself only after the few I/O errors it recognises as a dead
/// connection; after any other error its connection may be in any state. So on every error the
/// listener is thrown away (its drop returns the connection through the pool, which closes it if
/// it is broken) and a new one listens, rather than reusing a connection of unknown state.
async fn relay_notifications(pool: PgPool, mut listener: PgListener, receivers: Receivers) {
    loop {
        match listener.recv().await {
            Ok(_) => receivers.wake_one(),
            Err(e) => {
                tracing::debug!(error.message = %e, "queue notification listener interrupted");
                drop(listener);
                listener = loop {
                    tokio::time::sleep(RELISTEN_DELAY).await;
                    match listen(&pool).await {
                        Ok(listener) => break listener,
                        Err(e) => {
                            tracing::debug!(error.message = %e, "cannot listen for enqueued messages yet");
                        }
                    }
                };
                // Messages may have been enqueued while no one listened.
                receivers.wake_one();
            }
        }
    }
}

fn attributes(row: &PgRow) -> MessageAttributes {
    MessageAttributes {
        event_id: row.get("event_id"),
        correlation_id: row.get("correlation_id"),
        blob_key: row.get("blob_key"),
    }
}

#[async_trait]
impl Producer for PgQueue {
    async fn send(&self, messages: Vec<NewMessage>) -> Result<Vec<String>, SendError> {
        let n_messages = messages.len();
        let mut message_ids = Vec::with_capacity(n_messages);
        let mut bodies = Vec::with_capacity(n_messages);
        let mut event_ids = Vec::with_capacity(n_messages);
        let mut correlation_ids = Vec::with_capacity(n_messages);
        let mut blob_keys = Vec::with_capacity(n_messages);
        for message in messages {
            message_ids.push(uuid::Uuid::new_v4().to_string());
            bodies.push(message.body);
            event_ids.push(message.attributes.event_id);
            correlation_ids.push(message.attributes.correlation_id);
            blob_keys.push(message.attributes.blob_key);
        }
        // One statement for the whole batch: atomic and one round trip.
        sqlx::query(
            r#"INSERT INTO queue_messages
                 (message_id, body, event_id, correlation_id, blob_key, enqueued_at, visible_at)
               SELECT message_id, body, event_id, correlation_id, blob_key, now(), now()
               FROM UNNEST($1::text[], $2::bytea[], $3::text[], $4::text[], $5::text[])
                 WITH ORDINALITY AS m(message_id, body, event_id, correlation_id, blob_key, ord)
               ORDER BY ord"#,
        )
        .bind(&message_ids)
        .bind(&bodies)
        .bind(&event_ids)
        .bind(&correlation_ids)
        .bind(&blob_keys)
        .execute(&self.pool)
        .await
        .map_err(|e| SendError {
            sent: vec![None; n_messages],
            source: queue_error(e),
        })?;
        self.announce_enqueued();
        Ok(message_ids)
    }

    async fn ping(&self) -> Result<()> {
        crate::ping(&self.pool).await.map_err(queue_error)
    }
}

#[async_trait]
impl Consumer for PgQueue {
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
        let ids: Vec<&str> = deliveries.iter().map(|d| d.message_id.as_str()).collect();
        let receipts: Vec<&str> = deliveries.iter().map(|d| d.receipt.as_str()).collect();
        sqlx::query(
            r#"DELETE FROM queue_messages q
               USING UNNEST($1::text[], $2::text[]) AS s(message_id, receipt)
               WHERE q.message_id = s.message_id AND q.receipt = s.receipt"#,
        )
        .bind(&ids)
        .bind(&receipts)
        .execute(&self.pool)
        .await
        .map_err(queue_error)?;
        Ok(())
    }

    async fn retry_later(
        &self,
        delivery: &Delivery,
        delay: Duration,
        error: &FailureInfo,
    ) -> Result<()> {
        sqlx::query(
            r#"UPDATE queue_messages
               SET visible_at = now() + make_interval(secs => $3), receipt = NULL,
                   first_failure_at = COALESCE(first_failure_at, now()),
                   last_failure_at = now(), last_error_code = $4, last_error_message = $5
               WHERE message_id = $1 AND receipt = $2"#,
        )
        .bind(&delivery.message_id)
        .bind(&delivery.receipt)
        .bind(seconds(delay))
        .bind(&error.code)
        .bind(&error.message)
        .execute(&self.pool)
        .await
        .map_err(queue_error)?;
        Ok(())
    }

    async fn dead_letter(&self, delivery: &Delivery, error: &FailureInfo) -> Result<()> {
        sqlx::query(
            r#"WITH failed AS (
                 DELETE FROM queue_messages WHERE message_id = $1 AND receipt = $2
                 RETURNING *)
               INSERT INTO dead_letters
                 (message_id, body, event_id, correlation_id, blob_key, error_class, error_code,
                  error_message, receive_count, enqueued_at, first_failure_at, last_failure_at,
                  dead_lettered_at)
               SELECT message_id, body, event_id, correlation_id, blob_key, 'permanent', $3, $4,
                      receive_count, enqueued_at, COALESCE(first_failure_at, now()), now(), now()
               FROM failed"#,
        )
        .bind(&delivery.message_id)
        .bind(&delivery.receipt)
        .bind(&error.code)
        .bind(&error.message)
        .execute(&self.pool)
        .await
        .map_err(queue_error)?;
        Ok(())
    }
}

#[async_trait]
impl DeadLetterAdmin for PgQueue {
    async fn depth(&self) -> Result<QueueDepth> {
        let row = sqlx::query(
            r#"SELECT
                 (SELECT COUNT(*) FROM queue_messages
                    WHERE receipt IS NULL OR visible_at <= now()) AS pending,
                 (SELECT COUNT(*) FROM queue_messages
                    WHERE receipt IS NOT NULL AND visible_at > now()) AS in_flight,
                 (SELECT COUNT(*) FROM dead_letters) AS dead"#,
        )
        .fetch_one(&self.pool)
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
               FROM queue_messages ORDER BY seq LIMIT $1"#,
        )
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(queue_error)?;
        Ok(rows
            .iter()
            .map(|row| PendingMessage {
                message_id: row.get("message_id"),
                body: row.get("body"),
                attributes: attributes(row),
                receive_count: u32::try_from(row.get::<i32, _>("receive_count")).unwrap_or(0),
                enqueued_at: row.get("enqueued_at"),
            })
            .collect())
    }

    async fn list_dead_letters(
        &self,
        limit: usize,
        event_id: Option<&str>,
    ) -> Result<Vec<DeadLetter>> {
        let rows = sqlx::query(
            r#"SELECT * FROM dead_letters WHERE $1::text IS NULL OR event_id = $1
               ORDER BY seq LIMIT $2"#,
        )
        .bind(event_id)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(queue_error)?;
        Ok(rows.iter().map(dead_letter).collect())
    }

    async fn get_dead_letter(&self, id: &str) -> Result<Option<DeadLetter>> {
        let row = sqlx::query("SELECT * FROM dead_letters WHERE message_id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(queue_error)?;
        Ok(row.as_ref().map(dead_letter))
    }

    async fn redrive(&self, selector: &RedriveSelector) -> Result<u64> {
        let (event_id, message_id) = match selector {
            RedriveSelector::All => (None, None),
            RedriveSelector::EventId(event_id) => (Some(event_id.as_str()), None),
            RedriveSelector::Id(id) => (None, Some(id.as_str())),
        };
        let n_moved: i64 = sqlx::query_scalar(
            r#"WITH chosen AS (
                 DELETE FROM dead_letters
                 WHERE ($1::text IS NULL OR event_id = $1) AND ($2::text IS NULL OR message_id = $2)
                 RETURNING *),
               inserted AS (
                 INSERT INTO queue_messages
                   (message_id, body, event_id, correlation_id, blob_key, enqueued_at, visible_at)
                 SELECT message_id, body, event_id, correlation_id, blob_key, now(), now()
                 FROM chosen ORDER BY seq
                 RETURNING 1)
               SELECT COUNT(*) FROM inserted"#,
        )
        .bind(event_id)
        .bind(message_id)
        .fetch_one(&self.pool)
        .await
        .map_err(queue_error)?;
        if n_moved > 0 {
            self.announce_enqueued();
        }
        Ok(u64::try_from(n_moved).unwrap_or(0))
    }
}

#[async_trait]
impl BlobReferences for PgQueue {
    async fn references_blob(&self, key: &str) -> Result<bool> {
        let referenced: bool = sqlx::query_scalar(
            r#"SELECT EXISTS (SELECT 1 FROM queue_messages WHERE blob_key = $1)
                   OR EXISTS (SELECT 1 FROM dead_letters WHERE blob_key = $1)"#,
        )
        .bind(key)
        .fetch_one(&self.pool)
        .await
        .map_err(queue_error)?;
        Ok(referenced)
    }
}

fn dead_letter(row: &PgRow) -> DeadLetter {
    DeadLetter {
        id: row.get("message_id"),
        attributes: attributes(row),
        error_class: FailureClass::parse(&row.get::<String, _>("error_class"))
            .unwrap_or(FailureClass::Permanent),
        error: FailureInfo {
            code: row.get("error_code"),
            message: row.get("error_message"),
        },
        receive_count: u32::try_from(row.get::<i32, _>("receive_count")).unwrap_or(0),
        enqueued_at: row.get("enqueued_at"),
        first_failure_at: row.get("first_failure_at"),
        last_failure_at: row.get("last_failure_at"),
        dead_lettered_at: row.get("dead_lettered_at"),
        body: row.get("body"),
    }
}
