//! The embedded store: idempotency claims with leases and event inserts on `store.db`, the
//! query API's reads (lookups and keyset-paged listings), and the operator's and the retention
//! pruner's deletes ([`StoreAdmin`]).
//!
//! Every write goes through the file's [`GroupCommit`] writer: one `BEGIN IMMEDIATE`
//! transaction holds the database's write lock from its start, which is what makes a
//! read-then-write claim atomic on SQLite, and concurrent workers' writes share its commit.
//! The admin writes (evict, erase, prune) take the same path, so each is atomic against every
//! claim and store of this process, and a prune batch holds the lock only for one bounded batch.

use crate::sql_limit;
use fluxa_core::time::ceil_to_unix_millis;
use std::collections::HashSet;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use fluxa_core::time::{format_rfc3339, from_unix_millis};
use fluxa_core::{
    CorrelationId, ErrorCode, EventId, EventType, FailureInfo, PayloadHash, PayloadMode, Source,
};
use fluxa_store::{
    decide, Decision, Erasure, Error, EventFilter, EventPage, EventPosition, EventReader,
    EventStatus, Eviction, IdempotencyRecord, Lease, NewEvent, RecordState, Result, Status, Store,
    StoreAdmin, StoredEvent, Write, WriteAction, WriteResult,
};
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};

use crate::group_commit::GroupCommit;
use crate::rows::{column, parsed, parsed_optional, unsigned};
use crate::{is_refusal, millis, now_millis, Pools};

/// A record that does not parse, found inside a group-commit job. Jobs answer `sqlx::Error`,
/// so it travels as a decode error carrying this, and [`store_error`] turns it back into
/// `Error::Corrupt` (the job's savepoint is rolled back like any failed write's).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct CorruptRecord(String);

fn corrupt_in_job(reason: String) -> sqlx::Error {
    sqlx::Error::Decode(Box::new(CorruptRecord(reason)))
}

/// A record that does not parse is `Corrupt`; a statement the database refused (see
/// [`is_refusal`]) is `Rejected`; anything else (a full disk, an I/O error, a timed-out pool, a
/// failed commit) means the store is `Unavailable`.
fn store_error(error: sqlx::Error) -> Error {
    if let sqlx::Error::Decode(source) = &error {
        if let Some(CorruptRecord(reason)) = source.downcast_ref::<CorruptRecord>() {
            return Error::Corrupt(reason.clone());
        }
    }
    if is_refusal(&error) {
        Error::rejected(error)
    } else {
        Error::unavailable(error)
    }
}

/// The processor's side of `store.db`.
#[derive(Clone, Debug)]
pub struct SqliteStore {
    pools: Pools,
    writes: GroupCommit,
}

impl SqliteStore {
    pub(crate) fn new(pools: Pools) -> Self {
        let writes = GroupCommit::start(pools.writer.clone());
        Self { pools, writes }
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn apply(&self, writes: Vec<Write>) -> Result<Vec<WriteResult>> {
        // One group-commit job: the whole batch is one savepoint inside a shared transaction,
        // whose commit it shares with every other writer.
        self.writes
            .run(move |connection| Box::pin(apply_batch(connection, writes)))
            .await
            .map_err(store_error)
    }

    async fn record_error(&self, event_id: &EventId, error: &FailureInfo) -> Result<()> {
        let (event_id, error) = (event_id.clone(), error.clone());
        self.writes
            .run(move |connection| {
                Box::pin(async move {
                    sqlx::query(
                        r#"INSERT INTO idempotency_keys
                             (event_id, status, attempts, last_error_code, last_error_message,
                              created_at, updated_at)
                           VALUES (?1, 'failed', 0, ?2, ?3, ?4, ?4)
                           ON CONFLICT (event_id) DO UPDATE
                           SET last_error_code = excluded.last_error_code,
                               last_error_message = excluded.last_error_message,
                               updated_at = excluded.updated_at
                           WHERE idempotency_keys.status <> 'erased'"#,
                    )
                    .bind(event_id.as_str())
                    .bind(error.code.as_str())
                    .bind(&error.message)
                    .bind(now_millis())
                    .execute(&mut *connection)
                    .await
                    .map(|_| ())
                })
            })
            .await
            .map_err(store_error)
    }

    async fn mark_exhausted(&self, exhausted: &[(EventId, FailureInfo)]) -> Result<()> {
        if exhausted.is_empty() {
            return Ok(());
        }
        let exhausted = exhausted.to_vec();
        self.writes
            .run(move |connection| {
                Box::pin(async move {
                    let now = now_millis();
                    for (event_id, error) in &exhausted {
                        sqlx::query(
                            r#"UPDATE idempotency_keys
                               SET status = 'failed', lease_token = NULL, lease_expires_at = NULL,
                                   last_error_code = ?2, last_error_message = ?3, updated_at = ?4
                               WHERE event_id = ?1 AND status = 'processing'
                                 AND (lease_expires_at IS NULL OR lease_expires_at <= ?4)"#,
                        )
                        .bind(event_id.as_str())
                        .bind(error.code.as_str())
                        .bind(&error.message)
                        .bind(now)
                        .execute(&mut *connection)
                        .await?;
                    }
                    Ok(())
                })
            })
            .await
            .map_err(store_error)
    }

    async fn ping(&self) -> Result<()> {
        ping(&self.pools.writer).await
    }
}

#[async_trait]
impl StoreAdmin for SqliteStore {
    async fn idempotency_record(&self, event_id: &EventId) -> Result<Option<IdempotencyRecord>> {
        let row = sqlx::query(
            r#"SELECT event_id, status, attempts, payload_sha256, lease_expires_at,
                      last_error_code, last_error_message, correlation_id, created_at, updated_at
               FROM idempotency_keys WHERE event_id = ?1"#,
        )
        .bind(event_id.as_str())
        .fetch_optional(&self.pools.reader)
        .await
        .map_err(store_error)?;
        row.map(|row| idempotency_record(&row)).transpose()
    }

    async fn evict(&self, event_id: &EventId) -> Result<Eviction> {
        let event_id = event_id.clone();
        // Read and delete in one job: the writer's transaction holds the write lock, so no
        // claim can turn the record `processed` between the two.
        let status = self
            .writes
            .run(move |connection| {
                Box::pin(async move {
                    let status: Option<String> = sqlx::query_scalar(
                        "SELECT status FROM idempotency_keys WHERE event_id = ?1",
                    )
                    .bind(event_id.as_str())
                    .fetch_optional(&mut *connection)
                    .await?;
                    if matches!(status.as_deref(), Some("processing" | "failed")) {
                        sqlx::query(
                            r#"DELETE FROM idempotency_keys
                               WHERE event_id = ?1 AND status IN ('processing', 'failed')"#,
                        )
                        .bind(event_id.as_str())
                        .execute(&mut *connection)
                        .await?;
                    }
                    Ok(status)
                })
            })
            .await
            .map_err(store_error)?;
        let Some(status) = status else {
            return Ok(Eviction::NotFound);
        };
        match Status::parse(&status) {
            Some(Status::Processing | Status::Failed) => Ok(Eviction::Evicted),
            Some(status) => Ok(Eviction::Refused(status)),
            None => Err(Error::Corrupt(format!("unknown status {status:?}"))),
        }
    }

    async fn erase(&self, event_id: &EventId, always_tombstone: bool) -> Result<Erasure> {
        let event_id = event_id.clone();
        self.writes
            .run(move |connection| {
                Box::pin(async move {
                    let had_record = sqlx::query_scalar::<_, i64>(
                        "SELECT 1 FROM idempotency_keys WHERE event_id = ?1",
                    )
                    .bind(event_id.as_str())
                    .fetch_optional(&mut *connection)
                    .await?
                    .is_some();
                    let event_deleted = sqlx::query("DELETE FROM events WHERE event_id = ?1")
                        .bind(event_id.as_str())
                        .execute(&mut *connection)
                        .await?
                        .rows_affected()
                        > 0;
                    if had_record || event_deleted || always_tombstone {
                        sqlx::query(ERASE_RECORD_SQL)
                            .bind(event_id.as_str())
                            .bind(now_millis())
                            .execute(&mut *connection)
                            .await?;
                    }
                    Ok(Erasure {
                        event_deleted,
                        had_record,
                    })
                })
            })
            .await
            .map_err(store_error)
    }

    async fn prune_events(&self, before: DateTime<Utc>, limit: usize) -> Result<u64> {
        let (before, limit) = (ceil_to_unix_millis(before), sql_limit(limit));
        self.writes
            .run(move |connection| {
                Box::pin(async move {
                    sqlx::query(PRUNE_EVENTS_SQL)
                        .bind(before)
                        .bind(limit)
                        .execute(&mut *connection)
                        .await
                        .map(|done| done.rows_affected())
                })
            })
            .await
            .map_err(store_error)
    }

    async fn prune_idempotency(&self, before: DateTime<Utc>, limit: usize) -> Result<u64> {
        let before = ceil_to_unix_millis(before);
        self.writes
            .run(move |connection| {
                Box::pin(async move {
                    let now = now_millis();
                    let mut n_deleted = 0;
                    for sql in [PRUNE_IDEMPOTENCY_SQL, PRUNE_UNPROCESSED_IDEMPOTENCY_SQL] {
                        let n_left = limit.saturating_sub(n_deleted);
                        if n_left == 0 {
                            break;
                        }
                        let done = sqlx::query(sql)
                            .bind(before)
                            .bind(now)
                            .bind(sql_limit(n_left))
                            .execute(&mut *connection)
                            .await?;
                        n_deleted += usize::try_from(done.rows_affected()).unwrap_or(usize::MAX);
                    }
                    Ok(n_deleted as u64)
                })
            })
            .await
            .map_err(store_error)
    }
}

/// Turns the record of `?1` into an `erased` tombstone, creating it if need be: no payload
/// hash, no lease (a holder's later write finds the tombstone and stores nothing), no error.
/// The attempts and the correlation id stay, as the history of what happened.
const ERASE_RECORD_SQL: &str = r#"
    INSERT INTO idempotency_keys (event_id, status, attempts, created_at, updated_at)
    VALUES (?1, 'erased', 0, ?2, ?2)
    ON CONFLICT (event_id) DO UPDATE
    SET status = 'erased', payload_sha256 = NULL, lease_token = NULL, lease_expires_at = NULL,
        last_error_code = NULL, last_error_message = NULL, updated_at = excluded.updated_at"#;

/// One bounded batch of the events received before `?1` (Unix ms), oldest first: the
/// subquery walks `events_received` from its start and stops after `?2` rows.
const PRUNE_EVENTS_SQL: &str = r#"
    DELETE FROM events WHERE event_id IN (
        SELECT event_id FROM events WHERE received_at < ?1
        ORDER BY received_at, event_id LIMIT ?2)"#;

/// The first of the idempotency pruner's two bounded batches, oldest first: records last
/// updated before `?1` and before the oldest stored event was received. Such a record's event,
/// received before the record was last written, cannot still be stored, so nearly every record
/// this walks along `idempotency_keys_updated` is deleted; the check that the event row is gone
/// stays, for clocks that disagree. No walk over the processed records whose events are still
/// stored, however many there are (when events are kept longer than idempotency records).
/// A record a live lease holds (`?2` is now) stays.
const PRUNE_IDEMPOTENCY_SQL: &str = r#"
    DELETE FROM idempotency_keys WHERE event_id IN (
        SELECT k.event_id FROM idempotency_keys k
        WHERE k.updated_at < MIN(?1, COALESCE((SELECT MIN(received_at) FROM events), ?1))
          AND NOT (k.status = 'processing' AND k.lease_expires_at IS NOT NULL
                   AND k.lease_expires_at > ?2)
          AND NOT EXISTS (SELECT 1 FROM events e WHERE e.event_id = k.event_id)
        ORDER BY k.updated_at LIMIT ?3)"#;

/// The second batch: the records that never have an event row (every status but `processed`:
/// failed, erased, abandoned) last updated before `?1`, along the partial index
/// `idempotency_keys_unprocessed_updated`. A processed record whose event was pruned but that
/// was written after the oldest stored event's arrival waits for the first batch to reach it.
const PRUNE_UNPROCESSED_IDEMPOTENCY_SQL: &str = r#"
    DELETE FROM idempotency_keys WHERE event_id IN (
        SELECT k.event_id FROM idempotency_keys k
        WHERE k.status <> 'processed' AND k.updated_at < ?1
          AND NOT (k.status = 'processing' AND k.lease_expires_at IS NOT NULL
                   AND k.lease_expires_at > ?2)
          AND NOT EXISTS (SELECT 1 FROM events e WHERE e.event_id = k.event_id)
        ORDER BY k.updated_at LIMIT ?3)"#;

/// Most rows one multi-row statement carries: far below SQLite's limit on bound parameters
/// (32766) at 11 parameters a row.
const ROWS_PER_STATEMENT: usize = 500;

/// Applies a batch in order. Every statement is a hop to sqlx's SQLite worker thread, so the
/// common case (first deliveries) is two multi-row statements for the whole batch: the new
/// records, then the events of those it inserted. The rest (a record that exists, a held lease,
/// an event id met earlier in the batch) is decided one write at a time, after them, which
/// keeps each event's writes in order.
async fn apply_batch(
    connection: &mut SqliteConnection,
    writes: Vec<Write>,
) -> std::result::Result<Vec<WriteResult>, sqlx::Error> {
    let mut results: Vec<Option<WriteResult>> = vec![None; writes.len()];
    let mut seen = HashSet::new();
    let fresh: Vec<usize> = (0..writes.len())
        .filter(|&i| seen.insert(writes[i].event_id.as_str()) && writes[i].lease.is_none())
        .collect();
    for chunk in fresh.chunks(ROWS_PER_STATEMENT) {
        for (write_idx, result) in insert_fresh(connection, &writes, chunk).await? {
            results[write_idx] = Some(result);
        }
    }
    let mut decided = Vec::with_capacity(writes.len());
    for (write, result) in writes.iter().zip(results) {
        decided.push(match result {
            Some(result) => result,
            None => apply_one(connection, write).await?,
        });
    }
    Ok(decided)
}

/// Inserts the records of `idxs` that do not exist yet, with their final status, and the
/// events of the `Store` writes among those; returns the results of the writes it applied.
async fn insert_fresh(
    connection: &mut SqliteConnection,
    writes: &[Write],
    idxs: &[usize],
) -> std::result::Result<Vec<(usize, WriteResult)>, sqlx::Error> {
    let now = now_millis();
    let rows: Vec<(usize, Option<String>)> = idxs
        .iter()
        .map(|&i| {
            let token = matches!(writes[i].action, WriteAction::Lease(_))
                .then(|| uuid::Uuid::new_v4().to_string());
            (i, token)
        })
        .collect();
    let mut records = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
        "INSERT INTO idempotency_keys (event_id, status, payload_sha256, attempts, lease_token, \
         lease_expires_at, last_error_code, last_error_message, correlation_id, created_at, \
         updated_at) ",
    );
    records.push_values(&rows, |mut row, (write_idx, token)| {
        let write = &writes[*write_idx];
        let last_error = write.action.last_error().flatten();
        row.push_bind(write.event_id.as_str())
            .push_bind(write.action.status().as_str())
            .push_bind(write.payload_sha256.as_str())
            .push_bind(1_i64)
            .push_bind(token.as_deref())
            .push_bind(lease_expires_at(&write.action, now))
            .push_bind(last_error.map(|error| error.code.as_str()))
            .push_bind(last_error.map(|error| error.message.as_str()))
            .push_bind(write.correlation_id.as_str())
            .push_bind(now)
            .push_bind(now);
    });
    records.push(" ON CONFLICT (event_id) DO NOTHING RETURNING event_id");
    let inserted: HashSet<String> = records
        .build_query_scalar::<String>()
        .fetch_all(&mut *connection)
        .await?
        .into_iter()
        .collect();
    let applied: Vec<(usize, Option<String>)> = rows
        .into_iter()
        .filter(|(write_idx, _)| inserted.contains(writes[*write_idx].event_id.as_str()))
        .collect();
    let events: Vec<(&Write, &NewEvent)> = applied
        .iter()
        .filter_map(|(write_idx, _)| match &writes[*write_idx].action {
            WriteAction::Store(event) => Some((&writes[*write_idx], event)),
            _ => None,
        })
        .collect();
    insert_events(connection, &events, now).await?;
    Ok(applied
        .into_iter()
        .map(|(write_idx, token)| {
            let lease = token.map(|token| Lease {
                event_id: writes[write_idx].event_id.clone(),
                token,
                attempts: 1,
            });
            (write_idx, WriteResult::Applied { lease })
        })
        .collect())
}

/// Inserts events (`ON CONFLICT DO NOTHING`), one multi-row statement for the lot.
async fn insert_events(
    connection: &mut SqliteConnection,
    events: &[(&Write, &NewEvent)],
    now: i64,
) -> std::result::Result<(), sqlx::Error> {
    if events.is_empty() {
        return Ok(());
    }
    let mut insert = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
        "INSERT INTO events (event_id, event_type, source, occurred_at, payload, payload_sha256, \
         payload_size, payload_mode, correlation_id, received_at, processed_at) ",
    );
    insert.push_values(events, |mut row, (write, event)| {
        row.push_bind(write.event_id.as_str())
            .push_bind(event.event_type.as_str())
            .push_bind(event.source.as_ref().map(|source| source.as_str()))
            .push_bind(event.occurred_at.as_ref().map(format_rfc3339))
            .push_bind(event.payload.as_ref())
            .push_bind(write.payload_sha256.as_str())
            .push_bind(i64::try_from(event.payload.len()).unwrap_or(i64::MAX))
            .push_bind(event.payload_mode.as_str())
            .push_bind(write.correlation_id.as_str())
            .push_bind(event.received_at.timestamp_millis())
            .push_bind(now);
    });
    insert.push(" ON CONFLICT (event_id) DO NOTHING");
    insert.build().execute(&mut *connection).await.map(|_| ())
}

/// When the record's lease runs out once `action` has applied: a new lease lasts its
/// duration, a released one has run out already (the next delivery may take over at once),
/// a finished record has none.
fn lease_expires_at(action: &WriteAction, now: i64) -> Option<i64> {
    match action {
        WriteAction::Lease(duration) => Some(now.saturating_add(millis(*duration))),
        WriteAction::Release(_) => Some(now),
        WriteAction::Store(_) | WriteAction::Fail(_) => None,
    }
}

/// Reads the record `write` targets, decides, and carries the decision out.
async fn apply_one(
    connection: &mut SqliteConnection,
    write: &Write,
) -> std::result::Result<WriteResult, sqlx::Error> {
    let now = now_millis();
    let row = sqlx::query(
        r#"SELECT status, payload_sha256, lease_token, lease_expires_at, attempts
           FROM idempotency_keys WHERE event_id = ?1"#,
    )
    .bind(write.event_id.as_str())
    .fetch_optional(&mut *connection)
    .await?;
    let existing = row
        .map(|row| record_state(&row, now))
        .transpose()
        .map_err(|reason| corrupt_in_job(record_corrupt(write, &reason)))?;
    let decision = decide(write, existing.as_ref());
    let attempts = match decision {
        Decision::Skip(result) => return Ok(result),
        Decision::Corrupt(reason) => return Err(corrupt_in_job(record_corrupt(write, reason))),
        Decision::Insert => 1,
        Decision::Update { take_over } => {
            existing.as_ref().map_or(0, |record| record.attempts) + u32::from(take_over)
        }
    };
    let lease_expired = matches!(decision, Decision::Update { take_over: true })
        && existing.as_ref().is_some_and(held_lease_expired);
    let action = &write.action;
    let token = matches!(action, WriteAction::Lease(_)).then(|| uuid::Uuid::new_v4().to_string());
    let lease_expires_at = lease_expires_at(action, now);
    let last_error = action.last_error();
    // One upsert serves the insert and both kinds of update: the decision above already ruled
    // out every case where the record must stay as it is.
    sqlx::query(
        r#"INSERT INTO idempotency_keys
             (event_id, status, payload_sha256, attempts, lease_token, lease_expires_at,
              last_error_code, last_error_message, correlation_id, created_at, updated_at)
           VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10)
           ON CONFLICT (event_id) DO UPDATE
           SET status = excluded.status, payload_sha256 = excluded.payload_sha256,
               attempts = excluded.attempts, lease_token = excluded.lease_token,
               lease_expires_at = excluded.lease_expires_at,
               last_error_code = CASE WHEN ?11 THEN excluded.last_error_code
                                      ELSE last_error_code END,
               last_error_message = CASE WHEN ?11 THEN excluded.last_error_message
                                         ELSE last_error_message END,
               correlation_id = excluded.correlation_id, updated_at = excluded.updated_at"#,
    )
    .bind(write.event_id.as_str())
    .bind(action.status().as_str())
    .bind(write.payload_sha256.as_str())
    .bind(i64::from(attempts))
    .bind(token.as_deref())
    .bind(lease_expires_at)
    .bind(last_error.flatten().map(|error| error.code.as_str()))
    .bind(last_error.flatten().map(|error| error.message.as_str()))
    .bind(write.correlation_id.as_str())
    .bind(now)
    .bind(last_error.is_some())
    .execute(&mut *connection)
    .await?;
    if let WriteAction::Store(event) = action {
        insert_events(connection, &[(write, event)], now).await?;
    }
    if lease_expired {
        metrics::counter!("fluxa_lease_expiries_total").increment(1);
    }
    Ok(WriteResult::Applied {
        lease: token.map(|token| Lease {
            event_id: write.event_id.clone(),
            token,
            attempts,
        }),
    })
}

/// Whether a take-over of `record` takes a lease that a worker held and let run out (it died,
/// or took longer than the lease), as opposed to a `failed` record or a `processing` one whose
/// lease was given back on purpose (a released record keeps no token).
fn held_lease_expired(record: &RecordState) -> bool {
    record.status == Status::Processing && record.lease_token.is_some()
}

/// Why the record `write` meets is corrupt, as `Error::Corrupt` says it.
fn record_corrupt(write: &Write, reason: &str) -> String {
    format!(
        "idempotency_keys row of {:?}: {reason}",
        write.event_id.as_str()
    )
}

/// The record a write meets; `Err` says why it is corrupt.
fn record_state(row: &SqliteRow, now: i64) -> std::result::Result<RecordState, String> {
    let status = parsed(row, "status", Status::parse)?;
    let lease_expires_at: Option<i64> = column(row, "lease_expires_at")?;
    Ok(RecordState {
        status,
        payload_sha256: parsed_optional(row, "payload_sha256", |text| {
            PayloadHash::parse(text).ok()
        })?,
        lease_token: column(row, "lease_token")?,
        lease_live: status == Status::Processing && lease_expires_at.is_some_and(|at| at > now),
        lease_expires_at: lease_expires_at.map(from_unix_millis),
        attempts: unsigned(row, "attempts")?,
    })
}

/// The query API's side of `store.db`, over read-only connections only.
#[derive(Clone, Debug)]
pub struct SqliteReader {
    reader: sqlx::SqlitePool,
}

impl SqliteReader {
    pub(crate) fn new(pools: Pools) -> Self {
        Self {
            reader: pools.reader,
        }
    }
}

#[async_trait]
impl EventReader for SqliteReader {
    async fn event(&self, event_id: &EventId) -> Result<Option<StoredEvent>> {
        let row = sqlx::query(
            r#"SELECT event_id, event_type, source, occurred_at, payload, payload_sha256,
                      payload_size, payload_mode, correlation_id, received_at, processed_at
               FROM events WHERE event_id = ?1"#,
        )
        .bind(event_id.as_str())
        .fetch_optional(&self.reader)
        .await
        .map_err(store_error)?;
        row.map(|row| stored_event(&row, true)).transpose()
    }

    async fn status(&self, event_id: &EventId) -> Result<Option<EventStatus>> {
        let row = sqlx::query(
            r#"SELECT event_id, status, attempts, last_error_code, last_error_message,
                      correlation_id, updated_at
               FROM idempotency_keys WHERE event_id = ?1"#,
        )
        .bind(event_id.as_str())
        .fetch_optional(&self.reader)
        .await
        .map_err(store_error)?;
        row.map(|row| event_status(&row)).transpose()
    }

    async fn ping(&self) -> Result<()> {
        ping(&self.reader).await
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
            .fetch_all(&self.reader)
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
/// the payload's pages.
const LISTED_COLUMNS: &str = "event_id, event_type, source, occurred_at, payload_sha256, \
                              payload_size, payload_mode, correlation_id, received_at, processed_at";

/// The listing query (`prefix` is empty, or `EXPLAIN QUERY PLAN ` in the tests that check it):
/// only the filters present, so that each combination meets the index made for it
/// (`events_received`, `events_type_received`, `events_source_received`,
/// `events_type_source_received`: the equality filters, then `received_at, event_id`), and
/// exactly one lower bound, the later of `since` and the cursor, so the search starts where the
/// page starts rather than at `since` with every earlier page to step over.
fn list_events_query<'a>(
    prefix: &str,
    filter: &'a EventFilter,
    after: Option<&'a EventPosition>,
    limit: usize,
    include_payload: bool,
) -> sqlx::QueryBuilder<'a, sqlx::Sqlite> {
    let mut query = sqlx::QueryBuilder::new(prefix);
    query.push("SELECT ").push(LISTED_COLUMNS);
    if include_payload {
        query.push(", payload");
    }
    query.push(" FROM events WHERE 1 = 1");
    if let Some(event_type) = &filter.event_type {
        query
            .push(" AND event_type = ")
            .push_bind(event_type.as_str());
    }
    if let Some(source) = &filter.source {
        query.push(" AND source = ").push_bind(source.as_str());
    }
    let since = filter.since.map(ceil_to_unix_millis);
    match after {
        // Positions come from stored rows: whole milliseconds, so exact.
        Some(after) if since.is_none_or(|since| after.received_at.timestamp_millis() >= since) => {
            query
                .push(" AND (received_at, event_id) > (")
                .push_bind(after.received_at.timestamp_millis())
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
    if let Some(until) = &filter.until {
        query
            .push(" AND received_at < ")
            .push_bind(ceil_to_unix_millis(*until));
    }
    query
        .push(" ORDER BY received_at, event_id LIMIT ")
        .push_bind(sql_limit(limit));
    query
}

async fn ping(pool: &sqlx::SqlitePool) -> Result<()> {
    sqlx::query("SELECT 1")
        .execute(pool)
        .await
        .map_err(store_error)?;
    Ok(())
}

/// `Error::Corrupt` for the row of `table` that `row` is.
fn corrupt(table: &str, row: &SqliteRow) -> impl FnOnce(String) -> Error {
    let event_id = row
        .try_get::<String, _>("event_id")
        .unwrap_or_else(|_| "(unreadable)".to_owned());
    let table = table.to_owned();
    move |reason| Error::Corrupt(format!("{table} row of {event_id:?}: {reason}"))
}

/// An RFC 3339 timestamp column that may be NULL.
fn parsed_time(row: &SqliteRow, name: &str) -> std::result::Result<Option<DateTime<Utc>>, String> {
    parsed_optional(row, name, |text| {
        DateTime::parse_from_rfc3339(text)
            .ok()
            .map(|at| at.with_timezone(&Utc))
    })
}

/// An events row; `with_payload` says whether the query selected the payload.
fn stored_event(row: &SqliteRow, with_payload: bool) -> Result<StoredEvent> {
    let read = || -> std::result::Result<StoredEvent, String> {
        Ok(StoredEvent {
            event_id: parsed(row, "event_id", |text| EventId::parse(text).ok())?,
            event_type: parsed(row, "event_type", |text| EventType::parse(text).ok())?,
            source: parsed_optional(row, "source", |text| Source::parse(text).ok())?,
            occurred_at: parsed_time(row, "occurred_at")?,
            payload: if with_payload {
                column(row, "payload")?
            } else {
                None
            },
            payload_sha256: parsed(row, "payload_sha256", |text| PayloadHash::parse(text).ok())?,
            payload_size: unsigned(row, "payload_size")?,
            payload_mode: parsed(row, "payload_mode", PayloadMode::parse)?,
            correlation_id: parsed(row, "correlation_id", |text| {
                CorrelationId::parse(text).ok()
            })?,
            received_at: from_unix_millis(column(row, "received_at")?),
            processed_at: from_unix_millis(column(row, "processed_at")?),
        })
    };
    read().map_err(corrupt("events", row))
}

/// A record's last error: its code must be one Fluxa knows (every code it ever wrote is).
fn last_error(row: &SqliteRow) -> std::result::Result<Option<FailureInfo>, String> {
    let code = parsed_optional(row, "last_error_code", ErrorCode::parse)?;
    let message: Option<String> = column(row, "last_error_message")?;
    Ok(code.map(|code| FailureInfo {
        code,
        message: message.unwrap_or_default(),
    }))
}

fn event_status(row: &SqliteRow) -> Result<EventStatus> {
    let read = || -> std::result::Result<EventStatus, String> {
        Ok(EventStatus {
            event_id: parsed(row, "event_id", |text| EventId::parse(text).ok())?,
            status: parsed(row, "status", Status::parse)?,
            attempts: unsigned(row, "attempts")?,
            last_error: last_error(row)?,
            correlation_id: parsed_optional(row, "correlation_id", |text| {
                CorrelationId::parse(text).ok()
            })?,
            updated_at: from_unix_millis(column(row, "updated_at")?),
        })
    };
    read().map_err(corrupt("idempotency_keys", row))
}

fn idempotency_record(row: &SqliteRow) -> Result<IdempotencyRecord> {
    let read = || -> std::result::Result<IdempotencyRecord, String> {
        Ok(IdempotencyRecord {
            event_id: parsed(row, "event_id", |text| EventId::parse(text).ok())?,
            status: parsed(row, "status", Status::parse)?,
            attempts: unsigned(row, "attempts")?,
            payload_sha256: parsed_optional(row, "payload_sha256", |text| {
                PayloadHash::parse(text).ok()
            })?,
            lease_expires_at: column::<Option<i64>>(row, "lease_expires_at")?.map(from_unix_millis),
            last_error: last_error(row)?,
            correlation_id: parsed_optional(row, "correlation_id", |text| {
                CorrelationId::parse(text).ok()
            })?,
            created_at: from_unix_millis(column(row, "created_at")?),
            updated_at: from_unix_millis(column(row, "updated_at")?),
        })
    };
    read().map_err(corrupt("idempotency_keys", row))
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use fluxa_core::{EventType, Source};

    use super::*;
    use fluxa_queue::QueueSettings;

    /// Seed invariant 7 at the connection level: the query API's reader refuses writes.
    #[tokio::test]
    async fn the_query_readers_connections_refuse_writes() {
        let dir = tempfile::tempdir().unwrap();
        let config = QueueSettings {
            visibility_timeout: std::time::Duration::from_secs(1),
            max_receives: 3,
        };
        let backends = crate::open(dir.path(), config).await.unwrap();
        let attempt = sqlx::query("DELETE FROM idempotency_keys")
            .execute(&backends.reader.reader)
            .await;
        let error = attempt.expect_err("the reader accepted a write");
        assert!(
            error.to_string().contains("readonly"),
            "unexpected error: {error}"
        );
    }

    /// The plan SQLite picks for the listing query, one line per step.
    async fn plan_of(
        pool: &sqlx::SqlitePool,
        filter: &EventFilter,
        after: Option<&EventPosition>,
    ) -> String {
        let rows = list_events_query("EXPLAIN QUERY PLAN ", filter, after, 100, true)
            .build()
            .fetch_all(pool)
            .await
            .unwrap();
        rows.iter()
            .map(|row| row.get::<String, _>("detail"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Contract section 2: "an index serves every filter combination". For each combination of
    /// the filters, with and without a time window and a cursor, the listing searches the index
    /// made for it, in page order (no temporary B-tree for the ORDER BY), and a cursor bounds
    /// the search itself (so page n does not step over pages 1 to n - 1). Checked on a table of
    /// mixed types and sources both before and after ANALYZE, since a deployment may run either.
    #[tokio::test]
    async fn every_filter_combination_of_the_listing_is_served_by_its_index_without_sorting() {
        let dir = tempfile::tempdir().unwrap();
        let config = QueueSettings {
            visibility_timeout: std::time::Duration::from_secs(1),
            max_receives: 3,
        };
        let backends = crate::open(dir.path(), config).await.unwrap();
        sqlx::query(
            r#"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000)
               INSERT INTO events
                 (event_id, event_type, source, occurred_at, payload, payload_sha256,
                  payload_size, payload_mode, correlation_id, received_at, processed_at)
               SELECT 'e' || i, 'type-' || (i % 5), CASE WHEN i % 3 = 0 THEN NULL
                      ELSE 'source-' || (i % 4) END, NULL, x'31', 'h', 1, 'INLINE', 'c',
                      1800000000000 + i, 1800000000000 + i
               FROM n"#,
        )
        .execute(&backends.store.pools.writer)
        .await
        .unwrap();
        let reader = &backends.reader.reader;
        let at = |ms| Utc.timestamp_millis_opt(ms).unwrap();
        let cursor = EventPosition {
            received_at: at(1_800_000_010_000),
            event_id: EventId::parse("e10000").unwrap(),
        };
        let combinations = [
            (None, None, "events_received"),
            (Some("type-1"), None, "events_type_received"),
            (None, Some("source-1"), "events_source_received"),
            (
                Some("type-1"),
                Some("source-1"),
                "events_type_source_received",
            ),
        ];
        for analyzed in [false, true] {
            if analyzed {
                sqlx::query("ANALYZE")
                    .execute(&backends.store.pools.writer)
                    .await
                    .unwrap();
            }
            for (event_type, source, index) in combinations {
                for window in [false, true] {
                    let filter = EventFilter {
                        event_type: event_type.map(|t| EventType::parse(t).unwrap()),
                        source: source.map(|s| Source::parse(s).unwrap()),
                        since: window.then(|| at(1_800_000_001_000)),
                        until: window.then(|| at(1_800_000_019_000)),
                    };
                    for after in [None, Some(&cursor)] {
                        let plan = plan_of(reader, &filter, after).await;
                        let case = format!(
                            "{filter:?}, cursor: {}, analyzed: {analyzed}",
                            after.is_some()
                        );
                        assert!(
                            plan.lines().any(|line| format!("{line} ")
                                .contains(&format!("USING INDEX {index} "))),
                            "{case}: expected {index}, got:\n{plan}"
                        );
                        assert!(
                            !plan.contains("TEMP B-TREE"),
                            "{case}: the listing sorts:\n{plan}"
                        );
                        if after.is_some() {
                            assert!(
                                plan.contains("(received_at,event_id)>(?,?)"),
                                "{case}: the cursor does not bound the search:\n{plan}"
                            );
                        }
                        if event_type.is_some() || source.is_some() || window || after.is_some() {
                            assert!(plan.starts_with("SEARCH"), "{case}: scans:\n{plan}");
                        }
                    }
                }
            }
        }
    }
}
