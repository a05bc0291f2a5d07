//! The queue on PostgreSQL: SQS semantics over `queue_messages` and `dead_letters`, with
//! receives that skip rows other replicas are claiming (`FOR UPDATE SKIP LOCKED`).
//!
//! A receive is one statement: it locks the first visible messages in `(visible_at, seq)`
//! order (an index range scan that stops after the batch), moves those that have used up their
//! receives to `dead_letters`, and claims the rest. No receive ever scans the backlog.
//!
//! Operators' reads never count a whole table either: statement triggers keep the number of
//! queued messages and of dead letters per error code in `queue_message_counts` and
//! `dead_letter_counts` (the migration says how they stay uncontended and deadlock-free), and
//! DLQ listings page by key over indexes in `(dead_lettered_at, message_id)` order. Bulk DLQ
//! changes (redrive, prune) lock what they take with `SKIP LOCKED`, so concurrent runs share
//! the work instead of moving an entry twice.

use crate::sql_limit;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use fluxa_core::ids::DeadLetterId;
use fluxa_core::{ErrorCode, EventId, FailureInfo};
use fluxa_queue::{
    BlobReferences, Consumer, DeadLetter, DeadLetterAdmin, DeadLetterFilter, DeadLetterPage,
    DeadLetterPosition, Delivery, EventPurge, ExhaustedNotice, NewMessage, PendingMessage,
    Producer, QueueDepth, Received, Receivers, RedriveSelector, Result, SendError,
};
use sqlx::postgres::PgListener;
use sqlx::{PgPool, QueryBuilder, Row};
use tokio::sync::Notify;

use crate::dead_letters::{count, push_conditions, DeadLetterTable, Selection};
use fluxa_queue::QueueSettings;

use crate::rows::{attributes, lenient};
use crate::{queue_error, seconds};

/// How often an idle receiver looks again for messages whose retry delay or visibility timeout
/// has passed (new messages wake it at once through `LISTEN`/`NOTIFY`).
const IDLE_POLL: Duration = Duration::from_millis(250);

/// The `NOTIFY` channel on which every send and redrive announces new messages.
pub(crate) const ENQUEUED_CHANNEL: &str = "fluxa_enqueued";

/// The shared queue.
#[derive(Clone, Debug)]
pub struct PgQueue {
    pool: PgPool,
    config: QueueSettings,
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
    pub(crate) async fn new(pool: PgPool, config: QueueSettings) -> Result<Self, sqlx::Error> {
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

    /// The dead letters, as a table of their own.
    fn table(&self) -> DeadLetterTable {
        DeadLetterTable::new(self.pool.clone())
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
                   (message_id, body, event_id, correlation_id, blob_key, event_type,
                    error_class, error_code, error_message, receive_count, enqueued_at,
                    first_failure_at, last_failure_at, dead_lettered_at)
                 SELECT message_id, body, event_id, correlation_id, blob_key, event_type,
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
                           q.blob_key, q.event_type, q.receive_count, q.enqueued_at)
               SELECT seq, message_id, body, event_id, correlation_id, blob_key, event_type,
                      receive_count, enqueued_at, NULL::text AS error_message
               FROM delivered
               UNION ALL
               SELECT NULL, NULL, NULL, event_id, NULL, NULL, NULL, NULL, NULL, error_message
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
                if let Some(event_id) = lenient(row, "event_id", |text| EventId::parse(text).ok()) {
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

#[async_trait]
impl Producer for PgQueue {
    async fn send(&self, messages: Vec<NewMessage>) -> Result<Vec<String>, SendError> {
        let n_messages = messages.len();
        let mut message_ids = Vec::with_capacity(n_messages);
        let mut bodies = Vec::with_capacity(n_messages);
        let mut event_ids = Vec::with_capacity(n_messages);
        let mut correlation_ids = Vec::with_capacity(n_messages);
        let mut blob_keys = Vec::with_capacity(n_messages);
        let mut event_types = Vec::with_capacity(n_messages);
        for message in messages {
            message_ids.push(uuid::Uuid::new_v4().to_string());
            bodies.push(message.body);
            event_ids.push(message.attributes.event_id.map(String::from));
            correlation_ids.push(message.attributes.correlation_id.map(String::from));
            blob_keys.push(message.attributes.blob_key);
            event_types.push(message.attributes.event_type.map(String::from));
        }
        // One statement for the whole batch: atomic and one round trip.
        sqlx::query(
            r#"INSERT INTO queue_messages
                 (message_id, body, event_id, correlation_id, blob_key, event_type, enqueued_at,
                  visible_at)
               SELECT message_id, body, event_id, correlation_id, blob_key, event_type, now(),
                      now()
               FROM UNNEST($1::text[], $2::bytea[], $3::text[], $4::text[], $5::text[],
                           $6::text[])
                 WITH ORDINALITY
                   AS m(message_id, body, event_id, correlation_id, blob_key, event_type, ord)
               ORDER BY ord"#,
        )
        .bind(&message_ids)
        .bind(&bodies)
        .bind(&event_ids)
        .bind(&correlation_ids)
        .bind(&blob_keys)
        .bind(&event_types)
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
        .bind(error.code.as_str())
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
                 (message_id, body, event_id, correlation_id, blob_key, event_type, error_class,
                  error_code, error_message, receive_count, enqueued_at, first_failure_at,
                  last_failure_at, dead_lettered_at)
               SELECT message_id, body, event_id, correlation_id, blob_key, event_type,
                      'permanent', $3, $4, receive_count, enqueued_at,
                      COALESCE(first_failure_at, now()), now(), now()
               FROM failed"#,
        )
        .bind(&delivery.message_id)
        .bind(&delivery.receipt)
        .bind(error.code.as_str())
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
        let row = sqlx::query(DEPTH_SQL)
            .fetch_one(&self.pool)
            .await
            .map_err(queue_error)?;
        let total = count(row.get("total"));
        let in_flight = count(row.get("in_flight"));
        let codes: Vec<String> = row.get("codes");
        let code_counts: Vec<i64> = row.get("code_counts");
        let dead_letters_by_code: Vec<(String, u64)> = codes
            .into_iter()
            .zip(code_counts.into_iter().map(count))
            .collect();
        Ok(QueueDepth {
            pending: total.saturating_sub(in_flight),
            in_flight,
            dead_letters: dead_letters_by_code.iter().map(|(_, n)| n).sum(),
            oldest_enqueued_at: row.get("oldest_enqueued_at"),
            dead_letters_by_code,
        })
    }

    async fn peek(&self, limit: usize) -> Result<Vec<PendingMessage>> {
        let rows = sqlx::query(
            r#"SELECT message_id, body, event_id, correlation_id, blob_key, event_type,
                      receive_count, enqueued_at
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
        filter: &DeadLetterFilter,
        after: Option<&DeadLetterPosition>,
        limit: usize,
    ) -> Result<DeadLetterPage> {
        self.table().list(filter, after, limit).await
    }

    async fn count_dead_letters(&self, filter: &DeadLetterFilter) -> Result<u64> {
        self.table().count(filter).await
    }

    async fn get_dead_letter(&self, id: &DeadLetterId) -> Result<Option<DeadLetter>> {
        self.table().get(id).await
    }

    async fn redrive(&self, selector: &RedriveSelector, limit: usize) -> Result<u64> {
        if limit == 0 {
            return Ok(0);
        }
        let selection = match selector {
            RedriveSelector::Filter(filter) => Selection::Filter(filter.clone()),
            RedriveSelector::Id(id) => Selection::Id(id.to_string()),
        };
        // One statement: lock the oldest selected entries (skipping those a concurrent redrive
        // or prune holds, so no entry moves twice), delete them and enqueue them afresh.
        let mut query = QueryBuilder::new("WITH chosen AS (SELECT seq FROM dead_letters");
        push_conditions(&mut query, &selection, None);
        query
            .push(" ORDER BY dead_lettered_at, message_id LIMIT ")
            .push_bind(sql_limit(limit))
            .push(
                r#" FOR UPDATE SKIP LOCKED),
                moved AS (
                  DELETE FROM dead_letters d USING chosen WHERE d.seq = chosen.seq
                  RETURNING d.*),
                inserted AS (
                  INSERT INTO queue_messages
                    (message_id, body, event_id, correlation_id, blob_key, event_type,
                     enqueued_at, visible_at)
                  SELECT message_id, body, event_id, correlation_id, blob_key, event_type, now(),
                         now()
                  FROM moved ORDER BY dead_lettered_at, message_id
                  RETURNING 1)
                SELECT COUNT(*) FROM inserted"#,
            );
        let n_moved: i64 = query
            .build_query_scalar()
            .fetch_one(&self.pool)
            .await
            .map_err(queue_error)?;
        if n_moved > 0 {
            self.announce_enqueued();
        }
        Ok(count(n_moved))
    }

    async fn purge_event(&self, event_id: &str) -> Result<EventPurge> {
        // No index on queue_messages.event_id: every send and every settle would pay for one,
        // while this count runs once per erasure over a queue the workers keep short. A long
        // backlog makes an erasure slower (a scan that locks nothing), not the pipeline.
        let row = sqlx::query(
            r#"WITH purged AS (
                 DELETE FROM dead_letters WHERE event_id = $1 RETURNING blob_key)
               SELECT (SELECT COUNT(*) FROM purged) AS dead_letters,
                      ARRAY(SELECT DISTINCT blob_key FROM purged WHERE blob_key IS NOT NULL
                            ORDER BY blob_key) AS blob_keys,
                      (SELECT COUNT(*) FROM queue_messages WHERE event_id = $1) AS queued"#,
        )
        .bind(event_id)
        .fetch_one(&self.pool)
        .await
        .map_err(queue_error)?;
        Ok(EventPurge {
            dead_letters: count(row.get("dead_letters")),
            blob_keys: row.get("blob_keys"),
            queued: count(row.get("queued")),
            queue_unsearchable: false,
        })
    }

    async fn prune_dead_letters(&self, before: DateTime<Utc>, limit: usize) -> Result<u64> {
        self.table().prune(before, limit).await
    }
}

/// Everything `depth` reports, from one snapshot: the message counter's slots, the messages
/// in flight (a range over the `(visible_at, seq)` index: it reads only in-flight and delayed
/// messages), the head of the queue (the first row in `seq` order) and the dead-letter
/// counters by code.
const DEPTH_SQL: &str = r#"WITH codes AS (
     SELECT error_code, SUM(n)::bigint AS n FROM dead_letter_counts
     GROUP BY error_code HAVING SUM(n) > 0)
   SELECT
     (SELECT COALESCE(SUM(n), 0) FROM queue_message_counts)::bigint AS total,
     (SELECT COUNT(*) FROM queue_messages
        WHERE visible_at > now() AND receipt IS NOT NULL) AS in_flight,
     (SELECT enqueued_at FROM queue_messages ORDER BY seq LIMIT 1) AS oldest_enqueued_at,
     ARRAY(SELECT error_code FROM codes ORDER BY error_code) AS codes,
     ARRAY(SELECT n FROM codes ORDER BY error_code) AS code_counts"#;

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

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use fluxa_core::FailureClass;
    use sqlx::Postgres;

    use super::*;
    use crate::testing::ScratchDatabase;

    /// The plan PostgreSQL picks for `query` (an `EXPLAIN`), one line per node.
    async fn plan_of<'q>(
        pool: &PgPool,
        query: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    ) -> String {
        let rows = query.fetch_all(pool).await.unwrap();
        rows.iter()
            .map(|row| row.get::<String, _>(0))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// 200 000 messages (1 in 100 in flight, 1 in 100 waiting out a retry delay) and 200 000
    /// dead letters, dead-lettered one millisecond apart from 2027-01-15 08:00: 8 common codes
    /// and 20 common types, one rare code and one rare type (0.25% each), 0.25% exhausted.
    /// Analyzed, as autovacuum would.
    async fn big_queue(db: &ScratchDatabase) -> PgQueue {
        let config = fluxa_queue::QueueSettings {
            visibility_timeout: Duration::from_secs(60),
            max_receives: 3,
        };
        let queue = crate::open(&db.url(), 2, config).await.unwrap().queue;
        // Filling takes seconds, more on a loaded machine: not bound by the 10 s timeout
        // every Fluxa statement is.
        let mut fill = queue.pool.begin().await.unwrap();
        sqlx::query("SET LOCAL statement_timeout = 0")
            .execute(&mut *fill)
            .await
            .unwrap();
        sqlx::query(
            r#"INSERT INTO queue_messages
                 (message_id, body, event_id, enqueued_at, visible_at, receipt)
               SELECT 'm' || i, '\x31', 'e' || i, now(),
                      CASE WHEN i % 100 IN (0, 1) THEN now() + interval '1 hour' ELSE now() END,
                      CASE WHEN i % 100 = 0 THEN 'r' END
               FROM generate_series(1, 200000) AS i"#,
        )
        .execute(&mut *fill)
        .await
        .unwrap();
        sqlx::query(
            r#"INSERT INTO dead_letters
                 (message_id, body, event_id, event_type, error_class, error_code,
                  error_message, receive_count, enqueued_at, first_failure_at, last_failure_at,
                  dead_lettered_at)
               SELECT 'd' || i, '\x31', 'e' || i,
                      CASE WHEN i % 400 = 207 THEN 'rare-type' ELSE 'type-' || (i % 20) END,
                      CASE WHEN i % 400 = 3 THEN 'retries_exhausted' ELSE 'permanent' END,
                      CASE WHEN i % 400 = 7 THEN 'lease_held'
                           ELSE (ARRAY['invalid_message', 'hash_mismatch', 'blob_missing',
                                       'event_id_conflict', 'store_unavailable',
                                       'blob_store_unavailable', 'internal',
                                       'retries_exhausted'])[i % 8 + 1] END,
                      'm', 1, now(), now(), now(),
                      timestamptz '2027-01-15 08:00:00Z' + i * interval '1 ms'
               FROM generate_series(1, 200000) AS i"#,
        )
        .execute(&mut *fill)
        .await
        .unwrap();
        fill.commit().await.unwrap();
        sqlx::query("ANALYZE queue_messages, dead_letters")
            .execute(&queue.pool)
            .await
            .unwrap();
        queue
    }

    /// Contract section 7: the gauges are "computed without full scans". On 200 000 messages
    /// and 200 000 dead letters, `depth` reads the counters, counts what is in flight over the
    /// `(visible_at, seq)` index and takes the head of the queue from the primary key: no
    /// sequential scan of `queue_messages` or `dead_letters`. And the counters saw the bulk
    /// inserts (one statement each, so one trigger call each).
    #[tokio::test]
    async fn depth_reads_counters_and_index_ranges_and_never_scans_the_queue_or_the_dlq() {
        let db = ScratchDatabase::named();
        let queue = big_queue(&db).await;
        let plan = plan_of(&queue.pool, sqlx::query(&format!("EXPLAIN {DEPTH_SQL}"))).await;
        for table in ["queue_messages", "dead_letters"] {
            assert!(
                !plan.contains(&format!("Seq Scan on {table}")),
                "depth scans {table}:\n{plan}"
            );
        }
        assert!(
            plan.lines()
                .any(|line| line.contains("Index Scan on queue_messages_visible")
                    || line.contains("Index Scan using queue_messages_visible")),
            "in-flight messages are counted over the (visible_at, seq) index:\n{plan}"
        );
        assert!(
            plan.contains("Index Scan using queue_messages_pkey"),
            "the head of the queue comes from the primary key:\n{plan}"
        );
        let depth = queue.depth().await.unwrap();
        assert_eq!((depth.pending, depth.in_flight), (198_000, 2_000));
        assert_eq!(depth.dead_letters, 200_000);
        assert_eq!(depth.dead_letters_by_code.len(), 9);
    }

    /// Contract section 4: a DLQ page is one walk of an index in page order that stops after
    /// the page: no Sort, no sequential or bitmap scan, and a cursor is an index condition (so
    /// page n does not step over pages 1 to n - 1). A selective filter is served by the index
    /// made for it; one that matches a large share of the rows may instead be walked along
    /// `dead_letters_dead_lettered` with the filter applied as it goes (still no sort, and a
    /// page costs about `limit / share` rows whatever the DLQ's size), as the planner sees fit.
    #[tokio::test]
    async fn every_dead_letter_filter_is_served_by_an_index_in_page_order() {
        let db = ScratchDatabase::named();
        let queue = big_queue(&db).await;
        let start = Utc.with_ymd_and_hms(2027, 1, 15, 8, 0, 0).unwrap();
        let cursor = DeadLetterPosition {
            dead_lettered_at: start + chrono::TimeDelta::milliseconds(100_000),
            id: "d100000".into(),
        };
        let any_listing_index = "dead_letters_";
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
                    error_code: Some(ErrorCode::LeaseHeld),
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
                    event_type: Some("rare-type".into()),
                    ..DeadLetterFilter::default()
                },
                "dead_letters_event_type",
            ),
            (
                DeadLetterFilter {
                    since: Some(start + chrono::TimeDelta::seconds(50)),
                    until: Some(start + chrono::TimeDelta::seconds(180)),
                    ..DeadLetterFilter::default()
                },
                "dead_letters_dead_lettered",
            ),
            (
                DeadLetterFilter {
                    error_code: Some(ErrorCode::HashMismatch),
                    ..DeadLetterFilter::default()
                },
                any_listing_index,
            ),
            (
                DeadLetterFilter {
                    error_code: Some(ErrorCode::HashMismatch),
                    event_type: Some("type-3".into()),
                    since: Some(start),
                    ..DeadLetterFilter::default()
                },
                any_listing_index,
            ),
        ];
        for (filter, index) in &filters {
            for after in [None, Some(&cursor)] {
                let plan = plan_of(
                    &queue.pool,
                    crate::dead_letters::list_query("EXPLAIN ", filter, after, 50).build(),
                )
                .await;
                let case = format!("{filter:?}, cursor: {}", after.is_some());
                crate::assert_keyset_plan(
                    &plan,
                    &case,
                    index,
                    "dead_lettered_at, message_id",
                    after.is_some(),
                );
            }
        }
    }
}
