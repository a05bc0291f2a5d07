//! The embedded store: idempotency claims with leases and event inserts on `store.db`.
//!
//! Every write goes through the file's [`GroupCommit`] writer: one `BEGIN IMMEDIATE`
//! transaction holds the database's write lock from its start, which is what makes a
//! read-then-write claim atomic on SQLite, and concurrent workers' writes share its commit.

use std::collections::HashSet;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use fluxa_core::time::{format_rfc3339, from_unix_millis};
use fluxa_core::{EventId, FailureInfo};
use fluxa_store::{
    decide, Decision, Error, EventReader, EventStatus, Lease, NewEvent, RecordState, Result,
    Status, Store, StoredEvent, Write, WriteAction, WriteResult,
};
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};

use crate::group_commit::GroupCommit;
use crate::{is_refusal, millis, now_millis, Pools};

/// A statement the database refused (see [`is_refusal`]) is `Rejected`; anything else (a full
/// disk, an I/O error, a timed-out pool, a failed commit) means the store is `Unavailable`.
fn store_error(error: sqlx::Error) -> Error {
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
                               updated_at = excluded.updated_at"#,
                    )
                    .bind(event_id.as_str())
                    .bind(&error.code)
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
                        .bind(&error.code)
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
    let existing = row.map(|row| record_state(&row, now)).transpose()?;
    let attempts = match decide(write, existing.as_ref()) {
        Decision::Skip(result) => return Ok(result),
        Decision::Insert => 1,
        Decision::Update { take_over } => {
            existing.as_ref().map_or(0, |record| record.attempts) + u32::from(take_over)
        }
    };
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
    Ok(WriteResult::Applied {
        lease: token.map(|token| Lease {
            event_id: write.event_id.clone(),
            token,
            attempts,
        }),
    })
}

fn record_state(row: &SqliteRow, now: i64) -> std::result::Result<RecordState, sqlx::Error> {
    let status: String = row.try_get("status")?;
    let status = Status::parse(&status).ok_or_else(|| {
        sqlx::Error::Decode(format!("idempotency record has unknown status {status:?}").into())
    })?;
    let lease_expires_at: Option<i64> = row.try_get("lease_expires_at")?;
    Ok(RecordState {
        status,
        payload_sha256: row.try_get("payload_sha256")?,
        lease_token: row.try_get("lease_token")?,
        lease_live: status == Status::Processing && lease_expires_at.is_some_and(|at| at > now),
        lease_expires_at: lease_expires_at.map(from_unix_millis),
        attempts: u32::try_from(row.try_get::<i64, _>("attempts")?).unwrap_or(0),
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
        row.map(|row| stored_event(&row)).transpose()
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
}

async fn ping(pool: &sqlx::SqlitePool) -> Result<()> {
    sqlx::query("SELECT 1")
        .execute(pool)
        .await
        .map_err(store_error)?;
    Ok(())
}

fn parse_status(row: &SqliteRow) -> Result<Status> {
    let text: String = row.get("status");
    Status::parse(&text).ok_or_else(|| Error::Corrupt(format!("unknown status {text:?}")))
}

fn parse_time(text: Option<String>) -> Result<Option<DateTime<Utc>>> {
    text.map(|text| {
        DateTime::parse_from_rfc3339(&text)
            .map(|at| at.with_timezone(&Utc))
            .map_err(|_| Error::Corrupt(format!("bad timestamp {text:?}")))
    })
    .transpose()
}

fn stored_event(row: &SqliteRow) -> Result<StoredEvent> {
    Ok(StoredEvent {
        event_id: row.get("event_id"),
        event_type: row.get("event_type"),
        source: row.get("source"),
        occurred_at: parse_time(row.get("occurred_at"))?,
        payload: row.get("payload"),
        payload_sha256: row.get("payload_sha256"),
        payload_size: u64::try_from(row.get::<i64, _>("payload_size")).unwrap_or(0),
        payload_mode: row.get("payload_mode"),
        correlation_id: row.get("correlation_id"),
        received_at: from_unix_millis(row.get("received_at")),
        processed_at: from_unix_millis(row.get("processed_at")),
    })
}

fn event_status(row: &SqliteRow) -> Result<EventStatus> {
    let code: Option<String> = row.get("last_error_code");
    let message: Option<String> = row.get("last_error_message");
    Ok(EventStatus {
        event_id: row.get("event_id"),
        status: parse_status(row)?,
        attempts: u32::try_from(row.get::<i64, _>("attempts")).unwrap_or(0),
        last_error: code.map(|code| FailureInfo {
            code,
            message: message.unwrap_or_default(),
        }),
        correlation_id: row.get("correlation_id"),
        updated_at: from_unix_millis(row.get("updated_at")),
    })
}

#[cfg(test)]
mod tests {
    use crate::QueueConfig;

    /// Seed invariant 7 at the connection level: the query API's reader refuses writes.
    #[tokio::test]
    async fn the_query_readers_connections_refuse_writes() {
        let dir = tempfile::tempdir().unwrap();
        let config = QueueConfig {
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
}
