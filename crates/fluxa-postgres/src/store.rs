//! The store on PostgreSQL: batches of idempotency-record writes and event inserts.
//!
//! [`Store::apply`] works in two stages, so that the common case costs one statement:
//! 1. Every write that needs no existing record (a first delivery) is inserted with its final
//!    status in one statement, together with its event row: `INSERT … ON CONFLICT DO NOTHING`
//!    on `idempotency_keys` and, in the same statement, the events of the records it inserted.
//! 2. The rest (redeliveries, take-overs, writes that finish a lease) lock their records
//!    (`SELECT … FOR UPDATE`, in event id order so that concurrent batches cannot deadlock),
//!    are decided by [`fluxa_store::decide`], and are carried out in one transaction.

use std::collections::HashSet;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use fluxa_core::{EventId, FailureInfo};
use fluxa_store::{
    decide, Decision, Error, EventReader, EventStatus, Lease, RecordState, Result, Status, Store,
    StoredEvent, Write, WriteAction, WriteResult,
};
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};

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
    pool: PgPool,
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
        let mut columns = Columns::default();
        let mut updated = Vec::new();
        for &write_idx in idxs {
            let write = &writes[write_idx];
            let record = records.get(write.event_id.as_str());
            match decide(write, record) {
                Decision::Skip(result) => results[write_idx] = Some(result),
                // The record vanished since stage 1 (an operator evicted it): let the
                // delivery come back and start afresh.
                Decision::Insert => {
                    results[write_idx] = Some(WriteResult::Busy { until: Utc::now() });
                }
                Decision::Update { take_over } => {
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

fn record_state(row: &PgRow) -> Result<RecordState> {
    Ok(RecordState {
        status: parse_status(row)?,
        payload_sha256: row.get("payload_sha256"),
        lease_token: row.get("lease_token"),
        lease_live: row.get::<Option<bool>, _>("lease_live").unwrap_or(false),
        lease_expires_at: row.get("lease_expires_at"),
        attempts: u32::try_from(row.get::<i32, _>("attempts")).unwrap_or(0),
    })
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
                   updated_at = excluded.updated_at"#,
        )
        .bind(event_id.as_str())
        .bind(&error.code)
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
        .map_err(store_error)?;
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
        crate::ping(&self.pool).await.map_err(store_error)
    }
}

fn parse_status(row: &PgRow) -> Result<Status> {
    let text: String = row.get("status");
    Status::parse(&text).ok_or_else(|| Error::Corrupt(format!("unknown status {text:?}")))
}
