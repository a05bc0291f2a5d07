//! The store on PostgreSQL: batches of idempotency-record writes and event inserts, the query
//! API's reads (lookups and keyset-paged listings), and the operator's and the retention
//! pruner's deletes ([`StoreAdmin`]).
//!
//! [`Store::apply`] works in two stages, so that the common case costs one statement:
//! 1. Every write that needs no existing record (a first delivery) is inserted with its final
//!    status in one statement, together with its event row: `INSERT … ON CONFLICT DO NOTHING`
//!    on `idempotency_keys` and, in the same statement, the events of the records it inserted.
//! 2. The rest (redeliveries, take-overs, writes that finish a lease) lock their records
//!    (`SELECT … FOR UPDATE`, in event id order so that concurrent batches cannot deadlock),
//!    are decided by [`fluxa_store::decide`], and are carried out in one transaction.
//!
//! The pruners delete in bounded batches whose rows are picked `FOR UPDATE SKIP LOCKED`, so
//! replicas pruning at once share the work instead of queueing behind each other's locks.

use crate::sql_limit;
use fluxa_core::time::ceil_to_micros;
use std::collections::HashSet;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use fluxa_core::{
    CorrelationId, ErrorCode, EventId, EventType, FailureInfo, PayloadHash, PayloadMode, Source,
};
use fluxa_store::{
    decide, Decision, Erasure, Error, EventFilter, EventPage, EventPosition, EventReader,
    EventStatus, Eviction, IdempotencyRecord, Lease, RecordState, Result, Status, Store,
    StoreAdmin, StoredEvent, Write, WriteAction, WriteResult,
};
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};

use crate::rows::{column, parsed, parsed_optional, unsigned};
use crate::{is_refusal, seconds};

/// A statement the database refused (see [`is_refusal`]) is `Rejected`; anything else (no
/// connection, a timed-out pool, a shutdown, a full disk) means the store is `Unavailable`.
fn store_error(error: sqlx::Error) -> Error {
    if is_refusal(&error) {
        Error::rejected(error)
    } else {
        Error::unavailable(error)
    }
}

/// The processor's side of the database.
#[derive(Clone, Debug)]
pub struct PgStore {
    pub(crate) pool: PgPool,
}

impl PgStore {
    pub(crate) fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

/// Inserts the events of `$9…$17` (one array per column); `{filter}` narrows them.
fn insert_events_sql(filter: &str) -> String {
    format!(
        r#"INSERT INTO events
             (event_id, event_type, source, occurred_at, payload, payload_sha256, payload_size,
              payload_mode, correlation_id, received_at, processed_at)
           SELECT e.event_id, e.event_type, e.source, e.occurred_at, e.payload, e.payload_sha256,
                  octet_length(e.payload), e.payload_mode, e.correlation_id, e.received_at, now()
           FROM UNNEST($9::text[], $10::text[], $11::text[], $12::timestamptz[], $13::bytea[],
                       $14::text[], $15::text[], $16::text[], $17::timestamptz[])
                AS e(event_id, event_type, source, occurred_at, payload, payload_sha256,
                     payload_mode, correlation_id, received_at)
           {filter}
           ON CONFLICT (event_id) DO NOTHING"#
    )
}

/// Column arrays for the record values of some writes (`$1…$8`) and the events among them
/// (`$9…$17`), in the order given.
#[derive(Default)]
struct Columns<'w> {
    event_ids: Vec<&'w str>,
    statuses: Vec<&'static str>,
    hashes: Vec<&'w str>,
    tokens: Vec<Option<String>>,
    lease_secs: Vec<Option<f64>>,
    error_codes: Vec<Option<&'w str>>,
    error_messages: Vec<Option<&'w str>>,
    correlation_ids: Vec<&'w str>,
    /// Whether the write sets `last_error` (a new lease keeps the old one).
    set_errors: Vec<bool>,
    /// Take-overs count an attempt.
    bumps: Vec<i32>,
    events: EventColumns<'w>,
}

#[derive(Default)]
struct EventColumns<'w> {
    event_ids: Vec<&'w str>,
    event_types: Vec<&'w str>,
    sources: Vec<Option<&'w str>>,
    occurred_at: Vec<Option<DateTime<Utc>>>,
    payloads: Vec<&'w [u8]>,
    hashes: Vec<&'w str>,
    modes: Vec<&'static str>,
    correlation_ids: Vec<&'w str>,
    received_at: Vec<DateTime<Utc>>,
}

impl<'w> Columns<'w> {
    fn push(&mut self, write: &'w Write, bump: bool) {
        let action = &write.action;
        self.event_ids.push(write.event_id.as_str());
        self.statuses.push(action.status().as_str());
        self.hashes.push(write.payload_sha256.as_str());
        self.tokens.push(
            matches!(action, WriteAction::Lease(_)).then(|| uuid::Uuid::new_v4().to_string()),
        );
        self.lease_secs.push(match action {
            WriteAction::Lease(duration) => Some(seconds(*duration)),
            // Expired at once: the next delivery may take over without waiting.
            WriteAction::Release(_) => Some(0.0),
            WriteAction::Store(_) | WriteAction::Fail(_) => None,
        });
        let last_error = action.last_error();
        self.error_codes
            .push(last_error.flatten().map(|e| e.code.as_str()));
        self.error_messages
            .push(last_error.flatten().map(|e| e.message.as_str()));
        self.set_errors.push(last_error.is_some());
        self.correlation_ids.push(write.correlation_id.as_str());
        self.bumps.push(i32::from(bump));
        if let WriteAction::Store(event) = action {
            let events = &mut self.events;
            events.event_ids.push(write.event_id.as_str());
            events.event_types.push(event.event_type.as_str());
            events
                .sources
                .push(event.source.as_ref().map(|s| s.as_str()));
            events.occurred_at.push(event.occurred_at);
            events.payloads.push(event.payload.as_ref());
            events.hashes.push(write.payload_sha256.as_str());
            events.modes.push(event.payload_mode.as_str());
            events.correlation_ids.push(write.correlation_id.as_str());
            events.received_at.push(event.received_at);
        }
    }

    /// Binds `$1…$8` then `$9…$17`.
    fn bind<'q>(
        &'q self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        let events = &self.events;
        query
            .bind(&self.event_ids)
            .bind(&self.statuses)
            .bind(&self.hashes)
            .bind(&self.tokens)
            .bind(&self.lease_secs)
            .bind(&self.error_codes)
            .bind(&self.error_messages)
            .bind(&self.correlation_ids)
            .bind(&events.event_ids)
            .bind(&events.event_types)
            .bind(&events.sources)
            .bind(&events.occurred_at)
            .bind(&events.payloads)
            .bind(&events.hashes)
            .bind(&events.modes)
            .bind(&events.correlation_ids)
            .bind(&events.received_at)
    }
}

impl PgStore {
    /// Stage 1: inserts the records (and events) of writes whose event has no record yet.
    /// Returns the indices (into `idxs`) it inserted.
    async fn insert_fresh(
        &self,
        writes: &[Write],
        idxs: &[usize],
    ) -> Result<Vec<(usize, Option<Lease>)>> {
        let mut columns = Columns::default();
        for &write_idx in idxs {
            columns.push(&writes[write_idx], false);
        }
        // The events CTE only when there are events: a batch of failure notes must not
        // depend on the events table at all.
        let new_events = if columns.events.event_ids.is_empty() {
            String::new()
        } else {
            format!(
                ", new_events AS ({})",
                insert_events_sql("WHERE e.event_id IN (SELECT event_id FROM new_keys)")
            )
        };
        let sql = format!(
            r#"WITH new_keys AS (
                 INSERT INTO idempotency_keys
                   (event_id, status, payload_sha256, attempts, lease_token, lease_expires_at,
                    last_error_code, last_error_message, correlation_id, created_at, updated_at)
                 SELECT w.event_id, w.status, w.payload_sha256, 1, w.lease_token,
                        now() + make_interval(secs => w.lease_secs), w.error_code,
                        w.error_message, w.correlation_id, now(), now()
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::float8[],
                             $6::text[], $7::text[], $8::text[])
                      AS w(event_id, status, payload_sha256, lease_token, lease_secs, error_code,
                           error_message, correlation_id)
                 ORDER BY w.event_id
                 ON CONFLICT (event_id) DO NOTHING
                 RETURNING event_id){new_events}
               SELECT event_id FROM new_keys"#
        );
        let rows = columns
            .bind(sqlx::query(&sql))
            .fetch_all(&self.pool)
            .await
            .map_err(store_error)?;
        let inserted: HashSet<String> = rows.iter().map(|row| row.get("event_id")).collect();
        Ok(idxs
            .iter()
            .zip(&columns.tokens)
            .filter(|(&write_idx, _)| inserted.contains(writes[write_idx].event_id.as_str()))
            .map(|(&write_idx, token)| {
                let lease = token.clone().map(|token| Lease {
                    event_id: writes[write_idx].event_id.clone(),
                    token,
                    attempts: 1,
                });
                (write_idx, lease)
            })
            .collect())
    }

    /// Stage 2: locks the existing records of `idxs`, decides each write, and carries the
    /// decisions out in one transaction.
    async fn update_existing(
        &self,
        writes: &[Write],
        idxs: &[usize],
        results: &mut [Option<WriteResult>],
    ) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(store_error)?;
        let event_ids: Vec<&str> = idxs.iter().map(|&i| writes[i].event_id.as_str()).collect();
        let rows = sqlx::query(
            r#"SELECT event_id, status, payload_sha256, lease_token, lease_expires_at, attempts,
                      (status = 'processing' AND lease_expires_at > now()) AS lease_live
               FROM idempotency_keys WHERE event_id = ANY($1)
               ORDER BY event_id FOR UPDATE"#,
        )
        .bind(&event_ids)
        .fetch_all(&mut *tx)
        .await
        .map_err(store_error)?;
        let mut records = std::collections::HashMap::with_capacity(rows.len());
        for row in &rows {
            records.insert(row.get::<String, _>("event_id"), record_state(row)?);
        }
        // Corrupt records are reported before anything is written (dropping the transaction
        // rolls it back), so a batch meeting one writes nothing in this stage.
        let mut columns = Columns::default();
        let mut updated = Vec::new();
        let mut n_lease_expiries = 0u64;
        for &write_idx in idxs {
            let write = &writes[write_idx];
            let record = records.get(write.event_id.as_str());
            match decide(write, record) {
                Decision::Skip(result) => results[write_idx] = Some(result),
                Decision::Corrupt(reason) => {
                    return Err(Error::Corrupt(format!(
                        "idempotency_keys row of {:?}: {reason}",
                        write.event_id.as_str()
                    )))
                }
                // The record vanished since stage 1 (an operator evicted it): let the
                // delivery come back and start afresh.
                Decision::Insert => {
                    results[write_idx] = Some(WriteResult::Busy { until: Utc::now() });
                }
                Decision::Update { take_over } => {
                    if take_over && record.is_some_and(held_lease_expired) {
                        n_lease_expiries += 1;
                    }
                    columns.push(write, take_over);
                    let attempts = record.map_or(0, |r| r.attempts) + u32::from(take_over);
                    updated.push((write_idx, attempts));
                }
            }
        }
        if !updated.is_empty() {
            let sql = format!(
                r#"WITH updated AS (
                     UPDATE idempotency_keys k
                     SET status = w.status, payload_sha256 = w.payload_sha256,
                         attempts = k.attempts + w.bump, lease_token = w.lease_token,
                         lease_expires_at = now() + make_interval(secs => w.lease_secs),
                         last_error_code = CASE WHEN w.set_error THEN w.error_code
                                                ELSE k.last_error_code END,
                         last_error_message = CASE WHEN w.set_error THEN w.error_message
                                                   ELSE k.last_error_message END,
                         correlation_id = w.correlation_id, updated_at = now()
                     FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::float8[],
                                 $6::text[], $7::text[], $8::text[], $18::bool[], $19::int[])
                          AS w(event_id, status, payload_sha256, lease_token, lease_secs,
                               error_code, error_message, correlation_id, set_error, bump)
                     WHERE k.event_id = w.event_id
                     RETURNING k.event_id)
                   {}"#,
                if columns.events.event_ids.is_empty() {
                    "SELECT 1".to_owned()
                } else {
                    insert_events_sql("")
                }
            );
            columns
                .bind(sqlx::query(&sql))
                .bind(&columns.set_errors)
                .bind(&columns.bumps)
                .execute(&mut *tx)
                .await
                .map_err(store_error)?;
        }
        tx.commit().await.map_err(store_error)?;
        if n_lease_expiries > 0 {
            metrics::counter!("fluxa_lease_expiries_total").increment(n_lease_expiries);
        }
        for ((write_idx, attempts), token) in updated.into_iter().zip(columns.tokens) {
            let lease = token.map(|token| Lease {
                event_id: writes[write_idx].event_id.clone(),
                token,
                attempts,
            });
            results[write_idx] = Some(WriteResult::Applied { lease });
        }
        Ok(())
    }

    /// Applies writes whose event ids are all different.
    async fn apply_distinct(
        &self,
        writes: &[Write],
        mut idxs: Vec<usize>,
        results: &mut [Option<WriteResult>],
    ) -> Result<()> {
        idxs.sort_by(|&a, &b| writes[a].event_id.cmp(&writes[b].event_id));
        let fresh: Vec<usize> = idxs
            .iter()
            .copied()
            .filter(|&i| writes[i].lease.is_none())
            .collect();
        if !fresh.is_empty() {
            for (write_idx, lease) in self.insert_fresh(writes, &fresh).await? {
                results[write_idx] = Some(WriteResult::Applied { lease });
            }
        }
        let rest: Vec<usize> = idxs.into_iter().filter(|&i| results[i].is_none()).collect();
        if !rest.is_empty() {
            self.update_existing(writes, &rest, results).await?;
        }
        Ok(())
    }
}

/// Whether a take-over of `record` takes a lease that a worker held and let run out (it died,
/// or took longer than the lease), as opposed to a `failed` record or a `processing` one whose
/// lease was given back on purpose (a released record keeps no token).
fn held_lease_expired(record: &RecordState) -> bool {
    record.status == Status::Processing && record.lease_token.is_some()
}

fn record_state(row: &PgRow) -> Result<RecordState> {
    let read = || -> std::result::Result<RecordState, String> {
        Ok(RecordState {
            status: parsed(row, "status", Status::parse)?,
            payload_sha256: parsed_optional(row, "payload_sha256", |text| {
                PayloadHash::parse(text).ok()
            })?,
            lease_token: column(row, "lease_token")?,
            lease_live: column::<Option<bool>>(row, "lease_live")?.unwrap_or(false),
            lease_expires_at: column(row, "lease_expires_at")?,
            attempts: unsigned::<i32, _>(row, "attempts")?,
        })
    };
    read().map_err(corrupt("idempotency_keys", row))
}

#[async_trait]
impl Store for PgStore {
    async fn apply(&self, writes: Vec<Write>) -> Result<Vec<WriteResult>> {
        let mut results: Vec<Option<WriteResult>> = vec![None; writes.len()];
        // Writes for the same event id go in successive rounds, so each sees the one before.
        let mut pending: Vec<usize> = (0..writes.len()).collect();
        while !pending.is_empty() {
            let mut seen = HashSet::new();
            let (round, later): (Vec<usize>, Vec<usize>) = pending
                .into_iter()
                .partition(|&i| seen.insert(writes[i].event_id.as_str()));
            self.apply_distinct(&writes, round, &mut results).await?;
            pending = later;
        }
        results
            .into_iter()
            .map(|result| result.ok_or_else(|| Error::Corrupt("a write was not decided".into())))
            .collect()
    }

    async fn record_error(&self, event_id: &EventId, error: &FailureInfo) -> Result<()> {
        sqlx::query(
            r#"INSERT INTO idempotency_keys
                 (event_id, status, attempts, last_error_code, last_error_message,
                  created_at, updated_at)
               VALUES ($1, 'failed', 0, $2, $3, now(), now())
               ON CONFLICT (event_id) DO UPDATE
               SET last_error_code = excluded.last_error_code,
                   last_error_message = excluded.last_error_message,
                   updated_at = excluded.updated_at
               WHERE idempotency_keys.status <> 'erased'"#,
        )
        .bind(event_id.as_str())
        .bind(error.code.as_str())
        .bind(&error.message)
        .execute(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(())
    }

    async fn mark_exhausted(&self, exhausted: &[(EventId, FailureInfo)]) -> Result<()> {
        if exhausted.is_empty() {
            return Ok(());
        }
        let event_ids: Vec<&str> = exhausted.iter().map(|(id, _)| id.as_str()).collect();
        let codes: Vec<&str> = exhausted.iter().map(|(_, e)| e.code.as_str()).collect();
        let messages: Vec<&str> = exhausted.iter().map(|(_, e)| e.message.as_str()).collect();
        sqlx::query(
            r#"UPDATE idempotency_keys k
               SET status = 'failed', lease_token = NULL, lease_expires_at = NULL,
                   last_error_code = x.code, last_error_message = x.message, updated_at = now()
               FROM UNNEST($1::text[], $2::text[], $3::text[]) AS x(event_id, code, message)
               WHERE k.event_id = x.event_id AND k.status = 'processing'
                 AND (k.lease_expires_at IS NULL OR k.lease_expires_at <= now())"#,
        )
        .bind(&event_ids)
        .bind(&codes)
        .bind(&messages)
        .execute(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(())
    }

    async fn ping(&self) -> Result<()> {
        crate::ping(&self.pool).await.map_err(store_error)
    }
}

#[async_trait]
impl StoreAdmin for PgStore {
    async fn idempotency_record(&self, event_id: &EventId) -> Result<Option<IdempotencyRecord>> {
        let row = sqlx::query(
            r#"SELECT event_id, status, attempts, payload_sha256, lease_expires_at,
                      last_error_code, last_error_message, correlation_id, created_at, updated_at
               FROM idempotency_keys WHERE event_id = $1"#,
        )
        .bind(event_id.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(store_error)?;
        row.map(|row| idempotency_record(&row)).transpose()
    }

    async fn evict(&self, event_id: &EventId) -> Result<Eviction> {
        // The row lock keeps a concurrent claim from turning the record `processed` between
        // the read and the delete.
        let mut tx = self.pool.begin().await.map_err(store_error)?;
        let status: Option<String> = sqlx::query_scalar(
            "SELECT status FROM idempotency_keys WHERE event_id = $1 FOR UPDATE",
        )
        .bind(event_id.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(store_error)?;
        let Some(status) = status else {
            return Ok(Eviction::NotFound);
        };
        let status = Status::parse(&status)
            .ok_or_else(|| Error::Corrupt(format!("unknown status {status:?}")))?;
        if !matches!(status, Status::Processing | Status::Failed) {
            return Ok(Eviction::Refused(status));
        }
        sqlx::query("DELETE FROM idempotency_keys WHERE event_id = $1")
            .bind(event_id.as_str())
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
        tx.commit().await.map_err(store_error)?;
        Ok(Eviction::Evicted)
    }

    async fn erase(&self, event_id: &EventId, always_tombstone: bool) -> Result<Erasure> {
        // The tombstone is written before the row is deleted: once it holds the record's row
        // (updated, or inserted), a concurrent store of the event either committed before it,
        // and its row is visible to the DELETE that follows (a new snapshot, READ COMMITTED),
        // or comes after it, and finds the tombstone. The other order could miss an event
        // stored between the DELETE and the tombstone.
        let mut tx = self.pool.begin().await.map_err(store_error)?;
        let had_record = sqlx::query_scalar::<_, i32>(
            "SELECT 1 FROM idempotency_keys WHERE event_id = $1 FOR UPDATE",
        )
        .bind(event_id.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(store_error)?
        .is_some();
        sqlx::query(
            r#"INSERT INTO idempotency_keys (event_id, status, attempts, created_at, updated_at)
               VALUES ($1, 'erased', 0, now(), now())
               ON CONFLICT (event_id) DO UPDATE
               SET status = 'erased', payload_sha256 = NULL, lease_token = NULL,
                   lease_expires_at = NULL, last_error_code = NULL, last_error_message = NULL,
                   updated_at = now()"#,
        )
        .bind(event_id.as_str())
        .execute(&mut *tx)
        .await
        .map_err(store_error)?;
        let event_deleted = sqlx::query("DELETE FROM events WHERE event_id = $1")
            .bind(event_id.as_str())
            .execute(&mut *tx)
            .await
            .map_err(store_error)?
            .rows_affected()
            > 0;
        let erasure = Erasure {
            event_deleted,
            had_record,
        };
        if had_record || event_deleted || always_tombstone {
            tx.commit().await.map_err(store_error)?;
        } else {
            // Nothing to erase and no tombstone asked for: leave no trace.
            tx.rollback().await.map_err(store_error)?;
        }
        Ok(erasure)
    }

    async fn prune_events(&self, before: DateTime<Utc>, limit: usize) -> Result<u64> {
        let done = sqlx::query(PRUNE_EVENTS_SQL)
            .bind(ceil_to_micros(before))
            .bind(sql_limit(limit))
            .execute(&self.pool)
            .await
            .map_err(store_error)?;
        Ok(done.rows_affected())
    }

    async fn prune_idempotency(&self, before: DateTime<Utc>, limit: usize) -> Result<u64> {
        let before = ceil_to_micros(before);
        // Two statements, each a bounded batch that stands on its own (no transaction needed
        // between them): the second takes what the first left of `limit`.
        let mut n_deleted = 0;
        for sql in [PRUNE_IDEMPOTENCY_SQL, PRUNE_UNPROCESSED_IDEMPOTENCY_SQL] {
            let n_left = limit.saturating_sub(n_deleted);
            if n_left == 0 {
                break;
            }
            let done = sqlx::query(sql)
                .bind(before)
                .bind(sql_limit(n_left))
                .execute(&self.pool)
                .await
                .map_err(store_error)?;
            n_deleted += usize::try_from(done.rows_affected()).unwrap_or(usize::MAX);
        }
        Ok(n_deleted as u64)
    }
}

/// One bounded batch of the events received before `$1`, oldest first, walking
/// `events_received`; rows another replica's batch holds are skipped, not waited for.
const PRUNE_EVENTS_SQL: &str = r#"
    DELETE FROM events WHERE event_id IN (
        SELECT event_id FROM events WHERE received_at < $1
        ORDER BY received_at, event_id LIMIT $2
        FOR UPDATE SKIP LOCKED)"#;

/// The first of the idempotency pruner's two bounded batches, oldest first: records last
/// updated before `$1` and before the oldest stored event was received. Such a record's event,
/// received before the record was last written, cannot still be stored, so nearly every record
/// this walks along `idempotency_keys_updated` is deleted; the check that the event row is gone
/// stays, for clocks that disagree (`received_at` comes from the API's host). No walk over the
/// processed records whose events are still stored, however many there are (when events are
/// kept longer than idempotency records). A record a live lease holds stays; one a worker is
/// writing is locked, so skipped (and its write moves `updated_at` past `$1` anyway).
const PRUNE_IDEMPOTENCY_SQL: &str = r#"
    DELETE FROM idempotency_keys WHERE event_id IN (
        SELECT k.event_id FROM idempotency_keys k
        WHERE k.updated_at < LEAST($1, (SELECT COALESCE(min(received_at), 'infinity')
                                        FROM events))
          AND NOT (k.status = 'processing' AND k.lease_expires_at IS NOT NULL
                   AND k.lease_expires_at > now())
          AND NOT EXISTS (SELECT 1 FROM events e WHERE e.event_id = k.event_id)
        ORDER BY k.updated_at LIMIT $2
        FOR UPDATE OF k SKIP LOCKED)"#;

/// The second batch: the records that never have an event row (every status but `processed`:
/// failed, erased, abandoned) last updated before `$1`, along the partial index
/// `idempotency_keys_unprocessed_updated`. A processed record whose event was pruned but that
/// was written after the oldest stored event's arrival waits for the first batch to reach it.
const PRUNE_UNPROCESSED_IDEMPOTENCY_SQL: &str = r#"
    DELETE FROM idempotency_keys WHERE event_id IN (
        SELECT k.event_id FROM idempotency_keys k
        WHERE k.status <> 'processed' AND k.updated_at < $1
          AND NOT (k.status = 'processing' AND k.lease_expires_at IS NOT NULL
                   AND k.lease_expires_at > now())
          AND NOT EXISTS (SELECT 1 FROM events e WHERE e.event_id = k.event_id)
        ORDER BY k.updated_at LIMIT $2
        FOR UPDATE OF k SKIP LOCKED)"#;

/// The query API's side of the database: read-only sessions only.
#[derive(Clone, Debug)]
pub struct PgReader {
    pool: PgPool,
}

impl PgReader {
    pub(crate) fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// The read-only pool, for tests that prove it refuses writes.
    #[doc(hidden)]
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

#[async_trait]
impl EventReader for PgReader {
    async fn event(&self, event_id: &EventId) -> Result<Option<StoredEvent>> {
        let row = sqlx::query(
            r#"SELECT event_id, event_type, source, occurred_at, payload, payload_sha256,
                      payload_size, payload_mode, correlation_id, received_at, processed_at
               FROM events WHERE event_id = $1"#,
        )
        .bind(event_id.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(store_error)?;
        row.map(|row| stored_event(&row, true)).transpose()
    }

    async fn status(&self, event_id: &EventId) -> Result<Option<EventStatus>> {
        let row = sqlx::query(
            r#"SELECT event_id, status, attempts, last_error_code, last_error_message,
                      correlation_id, updated_at
               FROM idempotency_keys WHERE event_id = $1"#,
        )
        .bind(event_id.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(store_error)?;
        row.map(|row| event_status(&row)).transpose()
    }

    async fn ping(&self) -> Result<()> {
        crate::ping(&self.pool).await.map_err(store_error)
    }

    async fn list_events(
        &self,
        filter: &EventFilter,
        after: Option<&EventPosition>,
        limit: usize,
        include_payload: bool,
    ) -> Result<EventPage> {
        let rows = list_events_query("", filter, after, limit, include_payload)
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(store_error)?;
        let events = rows
            .iter()
            .map(|row| stored_event(row, include_payload))
            .collect::<Result<Vec<_>>>()?;
        let next = match events.last() {
            Some(last) if events.len() == limit => Some(EventPosition {
                received_at: last.received_at,
                event_id: last.event_id.clone(),
            }),
            _ => None,
        };
        Ok(EventPage { events, next })
    }
}

/// The listing's columns; `payload` only when asked for, so a listing without it never reads
/// the payload (nor its TOAST chunks).
const LISTED_COLUMNS: &str = "event_id, event_type, source, occurred_at, payload_sha256, \
                              payload_size, payload_mode, correlation_id, received_at, processed_at";

/// The listing query (`prefix` is empty, or `EXPLAIN ` in the test that checks its plans):
/// only the filters present, so that each combination meets the index made for it
/// (`events_received`, `events_type_received`, `events_source_received`,
/// `events_type_source_received`: the equality filters, then `received_at, event_id`), and
/// exactly one lower bound, the later of `since` and the cursor, so the index scan starts where
/// the page starts. The cursor is a row comparison, which PostgreSQL turns into one index
/// condition on `(received_at, event_id)`.
fn list_events_query<'a>(
    prefix: &str,
    filter: &'a EventFilter,
    after: Option<&'a EventPosition>,
    limit: usize,
    include_payload: bool,
) -> sqlx::QueryBuilder<'a, sqlx::Postgres> {
    let mut query = sqlx::QueryBuilder::new(prefix);
    query.push("SELECT ").push(LISTED_COLUMNS);
    if include_payload {
        query.push(", payload");
    }
    query.push(" FROM events WHERE true");
    if let Some(event_type) = &filter.event_type {
        query
            .push(" AND event_type = ")
            .push_bind(event_type.as_str());
    }
    if let Some(source) = &filter.source {
        query.push(" AND source = ").push_bind(source.as_str());
    }
    let since = filter.since.map(ceil_to_micros);
    match after {
        // Positions come from stored rows: whole microseconds, so exact.
        Some(after) if since.is_none_or(|since| after.received_at >= since) => {
            query
                .push(" AND (received_at, event_id) > (")
                .push_bind(after.received_at)
                .push(", ")
                .push_bind(after.event_id.as_str())
                .push(")");
        }
        // A cursor before `since` bounds nothing that `since` does not.
        _ => {
            if let Some(since) = since {
                query.push(" AND received_at >= ").push_bind(since);
            }
        }
    }
    if let Some(until) = filter.until {
        query
            .push(" AND received_at < ")
            .push_bind(ceil_to_micros(until));
    }
    query
        .push(" ORDER BY received_at, event_id LIMIT ")
        .push_bind(sql_limit(limit));
    query
}

/// `Error::Corrupt` for the row of `table` that `row` is.
fn corrupt(table: &str, row: &PgRow) -> impl FnOnce(String) -> Error {
    let event_id = row
        .try_get::<String, _>("event_id")
        .unwrap_or_else(|_| "(unreadable)".to_owned());
    let table = table.to_owned();
    move |reason| Error::Corrupt(format!("{table} row of {event_id:?}: {reason}"))
}

/// An events row; `with_payload` says whether the query selected the payload.
fn stored_event(row: &PgRow, with_payload: bool) -> Result<StoredEvent> {
    let read = || -> std::result::Result<StoredEvent, String> {
        Ok(StoredEvent {
            event_id: parsed(row, "event_id", |text| EventId::parse(text).ok())?,
            event_type: parsed(row, "event_type", |text| EventType::parse(text).ok())?,
            source: parsed_optional(row, "source", |text| Source::parse(text).ok())?,
            occurred_at: column(row, "occurred_at")?,
            payload: if with_payload {
                column(row, "payload")?
            } else {
                None
            },
            payload_sha256: parsed(row, "payload_sha256", |text| PayloadHash::parse(text).ok())?,
            payload_size: unsigned::<i64, _>(row, "payload_size")?,
            payload_mode: parsed(row, "payload_mode", PayloadMode::parse)?,
            correlation_id: parsed(row, "correlation_id", |text| {
                CorrelationId::parse(text).ok()
            })?,
            received_at: column(row, "received_at")?,
            processed_at: column(row, "processed_at")?,
        })
    };
    read().map_err(corrupt("events", row))
}

/// A record's last error: its code must be one Fluxa knows (every code it ever wrote is).
fn last_error(row: &PgRow) -> std::result::Result<Option<FailureInfo>, String> {
    let code = parsed_optional(row, "last_error_code", ErrorCode::parse)?;
    let message: Option<String> = column(row, "last_error_message")?;
    Ok(code.map(|code| FailureInfo {
        code,
        message: message.unwrap_or_default(),
    }))
}

fn event_status(row: &PgRow) -> Result<EventStatus> {
    let read = || -> std::result::Result<EventStatus, String> {
        Ok(EventStatus {
            event_id: parsed(row, "event_id", |text| EventId::parse(text).ok())?,
            status: parsed(row, "status", Status::parse)?,
            attempts: unsigned::<i32, _>(row, "attempts")?,
            last_error: last_error(row)?,
            correlation_id: parsed_optional(row, "correlation_id", |text| {
                CorrelationId::parse(text).ok()
            })?,
            updated_at: column(row, "updated_at")?,
        })
    };
    read().map_err(corrupt("idempotency_keys", row))
}

fn idempotency_record(row: &PgRow) -> Result<IdempotencyRecord> {
    let read = || -> std::result::Result<IdempotencyRecord, String> {
        Ok(IdempotencyRecord {
            event_id: parsed(row, "event_id", |text| EventId::parse(text).ok())?,
            status: parsed(row, "status", Status::parse)?,
            attempts: unsigned::<i32, _>(row, "attempts")?,
            payload_sha256: parsed_optional(row, "payload_sha256", |text| {
                PayloadHash::parse(text).ok()
            })?,
            lease_expires_at: column(row, "lease_expires_at")?,
            last_error: last_error(row)?,
            correlation_id: parsed_optional(row, "correlation_id", |text| {
                CorrelationId::parse(text).ok()
            })?,
            created_at: column(row, "created_at")?,
            updated_at: column(row, "updated_at")?,
        })
    };
    read().map_err(corrupt("idempotency_keys", row))
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use fluxa_core::{EventType, Source};

    use super::*;
    use crate::testing::ScratchDatabase;

    /// The plan PostgreSQL picks for the listing query, one line per node.
    async fn plan_of(pool: &PgPool, filter: &EventFilter, after: Option<&EventPosition>) -> String {
        let rows = list_events_query("EXPLAIN ", filter, after, 100, true)
            .build()
            .fetch_all(pool)
            .await
            .unwrap();
        rows.iter()
            .map(|row| row.get::<String, _>(0))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Contract section 2: "an index serves every filter combination". For each combination of
    /// the filters, with and without a time window and a cursor, the listing is one walk of an
    /// index in page order that stops after a page: no Sort node, no sequential or bitmap scan,
    /// and a cursor is an index condition (so page n does not step over pages 1 to n - 1).
    ///
    /// The planner is left to choose freely (no `enable_*` settings), on statistics (ANALYZE,
    /// which autovacuum runs on any table that takes inserts), over 100 000 rows: enough that
    /// every filter below matches many pages, which is where the choice matters. A selective
    /// filter must be served by the index made for it. A filter that matches a large share of
    /// the rows may instead be walked along `events_received` with the filter applied as it
    /// goes, since received_at follows the table's physical order: still no sort, and a page
    /// costs about `limit / share` rows whatever the table's size, so that is accepted too.
    /// (On a table of a few pages, or before any statistics, PostgreSQL may rightly prefer a
    /// bitmap scan and a sort of what it expects to be less than a page.)
    #[tokio::test]
    async fn every_filter_combination_of_the_listing_is_served_by_its_index_without_sorting() {
        let db = ScratchDatabase::named();
        let config = fluxa_queue::QueueSettings {
            visibility_timeout: std::time::Duration::from_secs(1),
            max_receives: 3,
        };
        let backends = crate::open(&db.url(), 2, config).await.unwrap();
        // Filling is not bound by the 10 s timeout of Fluxa's own statements (a loaded
        // machine may need longer).
        let mut fill = backends.store.pool.begin().await.unwrap();
        sqlx::query("SET LOCAL statement_timeout = 0")
            .execute(&mut *fill)
            .await
            .unwrap();
        // 20 common types (5% each), sources that follow the type (as they do in practice) or
        // are absent, and one rare type and one rare source (1% each), spread over time.
        sqlx::query(
            r#"INSERT INTO events
                 (event_id, event_type, source, occurred_at, payload, payload_sha256,
                  payload_size, payload_mode, correlation_id, received_at, processed_at)
               SELECT 'e' || i,
                      CASE WHEN i % 100 = 7 THEN 'rare-type' ELSE 'type-' || (i % 20) END,
                      CASE WHEN i % 100 = 57 THEN 'rare-source' WHEN i % 3 = 0 THEN NULL
                           ELSE 'source-' || (i % 20 % 4) END,
                      NULL, '\x31', 'h', 1, 'INLINE', 'c',
                      timestamptz '2027-01-15 08:00:00Z' + i * interval '1 ms', now()
               FROM generate_series(1, 100000) AS i"#,
        )
        .execute(&mut *fill)
        .await
        .unwrap();
        fill.commit().await.unwrap();
        sqlx::query("ANALYZE events")
            .execute(&backends.store.pool)
            .await
            .unwrap();
        let reader = &backends.reader.pool;
        let start = Utc.with_ymd_and_hms(2027, 1, 15, 8, 0, 0).unwrap();
        let at = |ms| start + chrono::Duration::milliseconds(ms);
        let cursor = EventPosition {
            received_at: at(50_000),
            event_id: EventId::parse("e50000").unwrap(),
        };
        let any_listing_index = "events_";
        let combinations = [
            (None, None, "events_received"),
            (Some("rare-type"), None, "events_type_received"),
            (None, Some("rare-source"), "events_source_received"),
            (
                Some("type-1"),
                Some("source-1"),
                "events_type_source_received",
            ),
            (Some("type-1"), None, any_listing_index),
            (None, Some("source-1"), any_listing_index),
        ];
        for (event_type, source, index) in combinations {
            for window in [false, true] {
                let filter = EventFilter {
                    event_type: event_type.map(|t| EventType::parse(t).unwrap()),
                    source: source.map(|s| Source::parse(s).unwrap()),
                    since: window.then(|| at(1_000)),
                    until: window.then(|| at(90_000)),
                };
                for after in [None, Some(&cursor)] {
                    let plan = plan_of(reader, &filter, after).await;
                    let case = format!("{filter:?}, cursor: {}", after.is_some());
                    crate::assert_keyset_plan(
                        &plan,
                        &case,
                        index,
                        "received_at, event_id",
                        after.is_some(),
                    );
                }
            }
        }
    }
}
