//! The embedded store: idempotency claims with leases and event inserts on `store.db`.
//!
//! Every write goes through the file's [`GroupCommit`] writer: one `BEGIN IMMEDIATE`
//! transaction holds the database's write lock from its start, which is what makes a
//! read-then-write claim atomic on SQLite, and concurrent workers' writes share its commit.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use fluxa_core::time::{format_rfc3339, from_unix_millis};
use fluxa_core::{CorrelationId, EventId, FailureInfo, PayloadHash};
use fluxa_store::{
    Claim, ClaimRequest, Completion, Error, EventReader, EventStatus, Lease, NewEvent, Result,
    Status, Store, StoredEvent,
};
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};

use crate::group_commit::GroupCommit;
use crate::{millis, now_millis, Pools};

fn unavailable(error: sqlx::Error) -> Error {
    Error::unavailable(error)
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

    /// Runs `sql` against the record `lease` holds (`?1` event id, `?2` lease token) with the
    /// error's code and message as `?3` and `?4` and the time as `?5`; a lost lease matches
    /// nothing.
    async fn update_leased(
        &self,
        sql: &'static str,
        lease: &Lease,
        error: &FailureInfo,
    ) -> Result<()> {
        let (lease, error) = (lease.clone(), error.clone());
        self.writes
            .run(move |connection| {
                Box::pin(async move {
                    sqlx::query(sql)
                        .bind(lease.event_id.as_str())
                        .bind(&lease.token)
                        .bind(&error.code)
                        .bind(&error.message)
                        .bind(now_millis())
                        .execute(&mut *connection)
                        .await
                        .map(|_| ())
                })
            })
            .await
            .map_err(unavailable)
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn claim(&self, request: ClaimRequest<'_>) -> Result<Claim> {
        let event_id = request.event_id.clone();
        let payload_sha256 = request.payload_sha256.clone();
        let correlation_id = request.correlation_id.clone();
        let lease_ms = millis(request.lease);
        self.writes
            .run(move |connection| {
                Box::pin(claim(
                    connection,
                    event_id,
                    payload_sha256,
                    correlation_id,
                    lease_ms,
                ))
            })
            .await
            .map_err(unavailable)
    }

    async fn complete(&self, lease: &Lease, event: NewEvent) -> Result<Completion> {
        let lease = lease.clone();
        self.writes
            .run(move |connection| Box::pin(complete(connection, lease, event)))
            .await
            .map_err(unavailable)
    }

    async fn fail(&self, lease: &Lease, error: &FailureInfo) -> Result<()> {
        self.update_leased(
            r#"UPDATE idempotency_keys
               SET status = 'failed', lease_token = NULL, lease_expires_at = NULL,
                   last_error_code = ?3, last_error_message = ?4, updated_at = ?5
               WHERE event_id = ?1 AND lease_token = ?2"#,
            lease,
            error,
        )
        .await
    }

    async fn release(&self, lease: &Lease, error: &FailureInfo) -> Result<()> {
        self.update_leased(
            r#"UPDATE idempotency_keys
               SET lease_token = NULL, lease_expires_at = ?5,
                   last_error_code = ?3, last_error_message = ?4, updated_at = ?5
               WHERE event_id = ?1 AND lease_token = ?2"#,
            lease,
            error,
        )
        .await
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
            .map_err(unavailable)
    }

    async fn mark_exhausted(&self, event_id: &EventId, error: &FailureInfo) -> Result<()> {
        let (event_id, error) = (event_id.clone(), error.clone());
        self.writes
            .run(move |connection| {
                Box::pin(async move {
                    let now = now_millis();
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
                    .await
                    .map(|_| ())
                })
            })
            .await
            .map_err(unavailable)
    }

    async fn ping(&self) -> Result<()> {
        ping(&self.pools.writer).await
    }
}

/// Checks the idempotency record and takes a lease if no one else may be working on the event.
async fn claim(
    connection: &mut SqliteConnection,
    event_id: EventId,
    payload_sha256: PayloadHash,
    correlation_id: CorrelationId,
    lease_ms: i64,
) -> std::result::Result<Claim, sqlx::Error> {
    let now = now_millis();
    let expires_at = now.saturating_add(lease_ms);
    let token = uuid::Uuid::new_v4().to_string();
    let existing = sqlx::query(
        r#"SELECT status, payload_sha256, lease_expires_at, attempts
           FROM idempotency_keys WHERE event_id = ?1"#,
    )
    .bind(event_id.as_str())
    .fetch_optional(&mut *connection)
    .await?;

    let attempts: i64 = match existing {
        None => {
            sqlx::query(
                r#"INSERT INTO idempotency_keys
                     (event_id, status, payload_sha256, attempts, lease_token, lease_expires_at,
                      correlation_id, created_at, updated_at)
                   VALUES (?1, 'processing', ?2, 1, ?3, ?4, ?5, ?6, ?6)"#,
            )
            .bind(event_id.as_str())
            .bind(payload_sha256.as_str())
            .bind(&token)
            .bind(expires_at)
            .bind(correlation_id.as_str())
            .bind(now)
            .execute(&mut *connection)
            .await?;
            1
        }
        Some(row) => {
            let status: String = row.get("status");
            let lease_expires_at: Option<i64> = row.get("lease_expires_at");
            match Status::parse(&status) {
                Some(Status::Processed) => {
                    let payload_sha256: Option<String> = row.get("payload_sha256");
                    return Ok(Claim::AlreadyProcessed {
                        payload_sha256: payload_sha256.unwrap_or_default(),
                    });
                }
                Some(Status::Processing) if lease_expires_at.is_some_and(|at| at > now) => {
                    return Ok(Claim::Busy {
                        until: from_unix_millis(lease_expires_at.unwrap_or(now)),
                    });
                }
                // An expired lease (its worker died or gave up) or a failed record: take over.
                Some(Status::Processing | Status::Failed) => {
                    let attempts: i64 = row.get::<i64, _>("attempts") + 1;
                    sqlx::query(
                        r#"UPDATE idempotency_keys
                           SET status = 'processing', payload_sha256 = ?2, attempts = ?3,
                               lease_token = ?4, lease_expires_at = ?5, correlation_id = ?6,
                               updated_at = ?7
                           WHERE event_id = ?1"#,
                    )
                    .bind(event_id.as_str())
                    .bind(payload_sha256.as_str())
                    .bind(attempts)
                    .bind(&token)
                    .bind(expires_at)
                    .bind(correlation_id.as_str())
                    .bind(now)
                    .execute(&mut *connection)
                    .await?;
                    attempts
                }
                None => {
                    return Err(sqlx::Error::Protocol(format!(
                        "idempotency record of {event_id} has unknown status {status:?}"
                    )))
                }
            }
        }
    };
    Ok(Claim::Acquired(Lease {
        event_id,
        token,
        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
        expires_at: from_unix_millis(expires_at),
    }))
}

/// Marks the record processed and inserts the event, provided the lease is still ours.
async fn complete(
    connection: &mut SqliteConnection,
    lease: Lease,
    event: NewEvent,
) -> std::result::Result<Completion, sqlx::Error> {
    let now = now_millis();
    let marked = sqlx::query(
        r#"UPDATE idempotency_keys
           SET status = 'processed', payload_sha256 = ?3, lease_token = NULL,
               lease_expires_at = NULL, last_error_code = NULL, last_error_message = NULL,
               updated_at = ?4
           WHERE event_id = ?1 AND lease_token = ?2 AND status = 'processing'"#,
    )
    .bind(lease.event_id.as_str())
    .bind(&lease.token)
    .bind(event.payload_sha256.as_str())
    .bind(now)
    .execute(&mut *connection)
    .await?;
    if marked.rows_affected() == 0 {
        return Ok(Completion::LeaseLost);
    }
    sqlx::query(
        r#"INSERT INTO events
             (event_id, event_type, source, occurred_at, payload, payload_sha256, payload_size,
              payload_mode, correlation_id, received_at, processed_at)
           VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
           ON CONFLICT (event_id) DO NOTHING"#,
    )
    .bind(event.event_id.as_str())
    .bind(&event.event_type)
    .bind(event.source.as_deref())
    .bind(event.occurred_at.as_ref().map(format_rfc3339))
    .bind(event.payload.as_slice())
    .bind(event.payload_sha256.as_str())
    .bind(i64::try_from(event.payload.len()).unwrap_or(i64::MAX))
    .bind(event.payload_mode.as_str())
    .bind(event.correlation_id.as_str())
    .bind(event.received_at.timestamp_millis())
    .bind(now)
    .execute(&mut *connection)
    .await?;
    Ok(Completion::Stored)
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
        .map_err(unavailable)?;
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
        .map_err(unavailable)?;
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
        .map_err(unavailable)?;
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
