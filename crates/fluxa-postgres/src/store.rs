//! The store on PostgreSQL: idempotency claims with leases (row locks) and event inserts.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use fluxa_core::{EventId, FailureInfo};
use fluxa_store::{
    Claim, ClaimRequest, Completion, Error, EventReader, EventStatus, Lease, NewEvent, Result,
    Status, Store, StoredEvent,
};
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};

use crate::seconds;

fn unavailable(error: sqlx::Error) -> Error {
    Error::unavailable(error)
}

/// The processor's side of the database.
#[derive(Clone, Debug)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    pub(crate) fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Runs `sql` against the record `lease` holds (`$1` event id, `$2` lease token) with the
    /// error's code and message as `$3` and `$4`; a lost lease matches nothing.
    async fn update_leased(
        &self,
        sql: &'static str,
        lease: &Lease,
        error: &FailureInfo,
    ) -> Result<()> {
        sqlx::query(sql)
            .bind(lease.event_id.as_str())
            .bind(&lease.token)
            .bind(&error.code)
            .bind(&error.message)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

#[async_trait]
impl Store for PgStore {
    async fn claim(&self, request: ClaimRequest<'_>) -> Result<Claim> {
        let token = uuid::Uuid::new_v4().to_string();
        let lease_seconds = seconds(request.lease);
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        // The common case in one statement: nobody has seen this event yet. A concurrent insert
        // of the same id makes this wait for that transaction and then do nothing.
        let inserted = sqlx::query(
            r#"INSERT INTO idempotency_keys
                 (event_id, status, payload_sha256, attempts, lease_token, lease_expires_at,
                  correlation_id, created_at, updated_at)
               VALUES ($1, 'processing', $2, 1, $3, now() + make_interval(secs => $4), $5,
                       now(), now())
               ON CONFLICT (event_id) DO NOTHING
               RETURNING attempts, lease_expires_at"#,
        )
        .bind(request.event_id.as_str())
        .bind(request.payload_sha256.as_str())
        .bind(&token)
        .bind(lease_seconds)
        .bind(request.correlation_id.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(unavailable)?;
        if let Some(row) = inserted {
            tx.commit().await.map_err(unavailable)?;
            return Ok(acquired(request.event_id, token, &row));
        }

        let row = sqlx::query(
            r#"SELECT status, payload_sha256, lease_expires_at,
                      (status = 'processing' AND lease_expires_at > now()) AS lease_live
               FROM idempotency_keys WHERE event_id = $1 FOR UPDATE"#,
        )
        .bind(request.event_id.as_str())
        .fetch_one(&mut *tx)
        .await
        .map_err(unavailable)?;
        let status = parse_status(&row)?;
        if status == Status::Processed {
            let payload_sha256: Option<String> = row.get("payload_sha256");
            return Ok(Claim::AlreadyProcessed {
                payload_sha256: payload_sha256.unwrap_or_default(),
            });
        }
        if row.get::<Option<bool>, _>("lease_live").unwrap_or(false) {
            let until: Option<DateTime<Utc>> = row.get("lease_expires_at");
            return Ok(Claim::Busy {
                until: until.unwrap_or_else(Utc::now),
            });
        }
        // An expired lease (its worker died or gave up) or a failed record: take over.
        let row = sqlx::query(
            r#"UPDATE idempotency_keys
               SET status = 'processing', payload_sha256 = $2, attempts = attempts + 1,
                   lease_token = $3, lease_expires_at = now() + make_interval(secs => $4),
                   correlation_id = $5, updated_at = now()
               WHERE event_id = $1
               RETURNING attempts, lease_expires_at"#,
        )
        .bind(request.event_id.as_str())
        .bind(request.payload_sha256.as_str())
        .bind(&token)
        .bind(lease_seconds)
        .bind(request.correlation_id.as_str())
        .fetch_one(&mut *tx)
        .await
        .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(acquired(request.event_id, token, &row))
    }

    async fn complete(&self, lease: &Lease, event: NewEvent) -> Result<Completion> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        let marked = sqlx::query(
            r#"UPDATE idempotency_keys
               SET status = 'processed', payload_sha256 = $3, lease_token = NULL,
                   lease_expires_at = NULL, last_error_code = NULL, last_error_message = NULL,
                   updated_at = now()
               WHERE event_id = $1 AND lease_token = $2 AND status = 'processing'"#,
        )
        .bind(lease.event_id.as_str())
        .bind(&lease.token)
        .bind(event.payload_sha256.as_str())
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        if marked.rows_affected() == 0 {
            tx.rollback().await.map_err(unavailable)?;
            return Ok(Completion::LeaseLost);
        }
        sqlx::query(
            r#"INSERT INTO events
                 (event_id, event_type, source, occurred_at, payload, payload_sha256, payload_size,
                  payload_mode, correlation_id, received_at, processed_at)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, now())
               ON CONFLICT (event_id) DO NOTHING"#,
        )
        .bind(event.event_id.as_str())
        .bind(&event.event_type)
        .bind(event.source.as_deref())
        .bind(event.occurred_at)
        .bind(event.payload.as_slice())
        .bind(event.payload_sha256.as_str())
        .bind(i64::try_from(event.payload.len()).unwrap_or(i64::MAX))
        .bind(event.payload_mode.as_str())
        .bind(event.correlation_id.as_str())
        .bind(event.received_at)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(Completion::Stored)
    }

    async fn fail(&self, lease: &Lease, error: &FailureInfo) -> Result<()> {
        self.update_leased(
            r#"UPDATE idempotency_keys
               SET status = 'failed', lease_token = NULL, lease_expires_at = NULL,
                   last_error_code = $3, last_error_message = $4, updated_at = now()
               WHERE event_id = $1 AND lease_token = $2"#,
            lease,
            error,
        )
        .await
    }

    async fn release(&self, lease: &Lease, error: &FailureInfo) -> Result<()> {
        self.update_leased(
            r#"UPDATE idempotency_keys
               SET lease_token = NULL, lease_expires_at = now(),
                   last_error_code = $3, last_error_message = $4, updated_at = now()
               WHERE event_id = $1 AND lease_token = $2"#,
            lease,
            error,
        )
        .await
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
                   updated_at = excluded.updated_at"#,
        )
        .bind(event_id.as_str())
        .bind(&error.code)
        .bind(&error.message)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn mark_exhausted(&self, event_id: &EventId, error: &FailureInfo) -> Result<()> {
        sqlx::query(
            r#"UPDATE idempotency_keys
               SET status = 'failed', lease_token = NULL, lease_expires_at = NULL,
                   last_error_code = $2, last_error_message = $3, updated_at = now()
               WHERE event_id = $1 AND status = 'processing'
                 AND (lease_expires_at IS NULL OR lease_expires_at <= now())"#,
        )
        .bind(event_id.as_str())
        .bind(&error.code)
        .bind(&error.message)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn ping(&self) -> Result<()> {
        crate::ping(&self.pool).await.map_err(unavailable)
    }
}

fn acquired(event_id: &EventId, token: String, row: &PgRow) -> Claim {
    let attempts: i32 = row.get("attempts");
    let expires_at: Option<DateTime<Utc>> = row.get("lease_expires_at");
    Claim::Acquired(Lease {
        event_id: event_id.clone(),
        token,
        attempts: u32::try_from(attempts).unwrap_or(0),
        expires_at: expires_at.unwrap_or_else(Utc::now),
    })
}

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
        .map_err(unavailable)?;
        Ok(row.map(|row| StoredEvent {
            event_id: row.get("event_id"),
            event_type: row.get("event_type"),
            source: row.get("source"),
            occurred_at: row.get("occurred_at"),
            payload: row.get("payload"),
            payload_sha256: row.get("payload_sha256"),
            payload_size: u64::try_from(row.get::<i64, _>("payload_size")).unwrap_or(0),
            payload_mode: row.get("payload_mode"),
            correlation_id: row.get("correlation_id"),
            received_at: row.get("received_at"),
            processed_at: row.get("processed_at"),
        }))
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
        .map_err(unavailable)?;
        row.map(|row| {
            let code: Option<String> = row.get("last_error_code");
            let message: Option<String> = row.get("last_error_message");
            Ok(EventStatus {
                event_id: row.get("event_id"),
                status: parse_status(&row)?,
                attempts: u32::try_from(row.get::<i32, _>("attempts")).unwrap_or(0),
                last_error: code.map(|code| FailureInfo {
                    code,
                    message: message.unwrap_or_default(),
                }),
                correlation_id: row.get("correlation_id"),
                updated_at: row.get("updated_at"),
            })
        })
        .transpose()
    }

    async fn ping(&self) -> Result<()> {
        crate::ping(&self.pool).await.map_err(unavailable)
    }
}

fn parse_status(row: &PgRow) -> Result<Status> {
    let text: String = row.get("status");
    Status::parse(&text).ok_or_else(|| Error::Corrupt(format!("unknown status {text:?}")))
}
