//! The `dead_letters` table on its own: listing, counting, showing and pruning dead letters, for
//! [`PgQueue`](crate::PgQueue) and for a queue that lives elsewhere ([`DeadLetterTable`] is how
//! an SQS deployment keeps its dead letters operable: a drain of the SQS DLQ records them here,
//! and a redrive sends them back through the queue's [`Producer`]).
//!
//! Listings page by key over indexes in `(dead_lettered_at, message_id)` order, counts by error
//! code come from the trigger-kept `dead_letter_counts`, and bulk changes lock what they take
//! with `SKIP LOCKED`, whichever queue the dead letters came from.

use chrono::{DateTime, Utc};
use fluxa_core::ids::DeadLetterId;
use fluxa_core::time::ceil_to_micros;
use fluxa_core::{CorrelationId, ErrorCode, EventId, EventType, FailureClass, FailureInfo};
use fluxa_queue::{
    DeadLetter, DeadLetterFilter, DeadLetterPage, DeadLetterPosition, Error, NewMessage, Producer,
    RedriveSelector, Result,
};
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Postgres, QueryBuilder, Row};

use crate::rows::{attributes, column, parsed, unsigned};
use crate::{queue_error, sql_limit};

/// The dead letters of one database. Cheap to clone (it holds the pool).
#[derive(Clone, Debug)]
pub struct DeadLetterTable {
    pool: PgPool,
}

/// What [`DeadLetterTable::purge_event`] deleted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PurgedDeadLetters {
    pub dead_letters: u64,
    /// Their blobs, each once.
    pub blob_keys: Vec<String>,
}

/// Dead-letter counts, from the trigger-kept counters (no table scan).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeadLetterCounts {
    pub total: u64,
    /// Per error code, in code order; codes with none are left out.
    pub by_code: Vec<(String, u64)>,
}

impl DeadLetterTable {
    pub(crate) fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    pub async fn list(
        &self,
        filter: &DeadLetterFilter,
        after: Option<&DeadLetterPosition>,
        limit: usize,
    ) -> Result<DeadLetterPage> {
        let rows = list_query("", filter, after, limit)
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(queue_error)?;
        let dead_letters = rows.iter().map(dead_letter).collect::<Result<Vec<_>>>()?;
        Ok(page(dead_letters, limit))
    }

    pub async fn count(&self, filter: &DeadLetterFilter) -> Result<u64> {
        // The counters answer the common questions (everything, one error code) at once; other
        // filters count over their index.
        let code_only = DeadLetterFilter {
            error_code: filter.error_code,
            ..DeadLetterFilter::default()
        };
        let n: i64 = if *filter == code_only {
            sqlx::query_scalar(
                "SELECT COALESCE(SUM(n), 0)::bigint FROM dead_letter_counts \
                 WHERE $1::text IS NULL OR error_code = $1",
            )
            .bind(filter.error_code.map(ErrorCode::as_str))
            .fetch_one(&self.pool)
            .await
        } else {
            let mut query = QueryBuilder::new("SELECT COUNT(*) FROM dead_letters");
            push_conditions(&mut query, &Selection::Filter(filter.clone()), None);
            query.build_query_scalar().fetch_one(&self.pool).await
        }
        .map_err(queue_error)?;
        Ok(count(n))
    }

    /// The totals by error code, from the counters.
    pub async fn counts(&self) -> Result<DeadLetterCounts> {
        let rows = sqlx::query(
            "SELECT error_code, SUM(n)::bigint AS n FROM dead_letter_counts \
             GROUP BY error_code HAVING SUM(n) > 0 ORDER BY error_code",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(queue_error)?;
        let by_code: Vec<(String, u64)> = rows
            .iter()
            .map(|row| (row.get("error_code"), count(row.get("n"))))
            .collect();
        Ok(DeadLetterCounts {
            total: by_code.iter().map(|(_, n)| n).sum(),
            by_code,
        })
    }

    pub async fn get(&self, id: &DeadLetterId) -> Result<Option<DeadLetter>> {
        let row = sqlx::query("SELECT * FROM dead_letters WHERE message_id = $1")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(queue_error)?;
        row.as_ref().map(dead_letter).transpose()
    }

    /// Records dead letters that a queue elsewhere dead-lettered (the SQS DLQ drain), in one
    /// statement. An id already recorded is left as it is, so recording the same DLQ message
    /// twice (its delete from the DLQ failed, and it came back) keeps one entry. Returns how
    /// many were new.
    pub async fn record(&self, dead_letters: &[DeadLetter]) -> Result<u64> {
        if dead_letters.is_empty() {
            return Ok(0);
        }
        let mut query = QueryBuilder::<Postgres>::new(
            "INSERT INTO dead_letters (message_id, body, event_id, correlation_id, blob_key, \
             event_type, error_class, error_code, error_message, receive_count, enqueued_at, \
             first_failure_at, last_failure_at, dead_lettered_at) ",
        );
        query.push_values(dead_letters, |mut row, d| {
            row.push_bind(d.id.as_str())
                .push_bind(&d.body)
                .push_bind(d.attributes.event_id.as_ref().map(EventId::as_str))
                .push_bind(
                    d.attributes
                        .correlation_id
                        .as_ref()
                        .map(CorrelationId::as_str),
                )
                .push_bind(&d.attributes.blob_key)
                .push_bind(d.attributes.event_type.as_ref().map(EventType::as_str))
                .push_bind(d.error_class.as_str())
                .push_bind(d.error.code.as_str())
                .push_bind(&d.error.message)
                .push_bind(i32::try_from(d.receive_count).unwrap_or(i32::MAX))
                .push_bind(d.enqueued_at)
                .push_bind(d.first_failure_at)
                .push_bind(d.last_failure_at)
                .push_bind(d.dead_lettered_at);
        });
        query.push(" ON CONFLICT (message_id) DO NOTHING");
        let inserted = query
            .build()
            .execute(&self.pool)
            .await
            .map_err(queue_error)?;
        Ok(inserted.rows_affected())
    }

    /// Sends up to `limit` of the selected dead letters, oldest first, back through `queue`
    /// and deletes those it sent, in one transaction that holds their rows (`SKIP LOCKED`, so
    /// concurrent redrives share the work). A message the queue took is deleted here even if
    /// a later one of the same call was refused, and the refusal is returned after the commit:
    /// nothing is sent twice by one call, and nothing unsent is lost.
    pub async fn redrive_through(
        &self,
        queue: &dyn Producer,
        selector: &RedriveSelector,
        limit: usize,
    ) -> Result<u64> {
        if limit == 0 {
            return Ok(0);
        }
        let selection = match selector {
            RedriveSelector::Filter(filter) => Selection::Filter(filter.clone()),
            RedriveSelector::Id(id) => Selection::Id(id.to_string()),
        };
        let mut transaction = self.pool.begin().await.map_err(queue_error)?;
        let mut query = QueryBuilder::new(
            "SELECT seq, message_id, body, event_id, correlation_id, blob_key, event_type \
             FROM dead_letters",
        );
        push_conditions(&mut query, &selection, None);
        query
            .push(" ORDER BY dead_lettered_at, message_id LIMIT ")
            .push_bind(sql_limit(limit))
            .push(" FOR UPDATE SKIP LOCKED");
        let rows = query
            .build()
            .fetch_all(&mut *transaction)
            .await
            .map_err(queue_error)?;
        if rows.is_empty() {
            return Ok(0);
        }
        let messages = rows
            .iter()
            .map(|row| NewMessage {
                body: row.get("body"),
                attributes: attributes(row),
            })
            .collect();
        let (sent, refused) = match queue.send(messages).await {
            Ok(_) => (vec![true; rows.len()], None),
            Err(e) => (e.sent.iter().map(Option::is_some).collect(), Some(e.source)),
        };
        let moved: Vec<i64> = rows
            .iter()
            .zip(&sent)
            .filter(|(_, sent)| **sent)
            .map(|(row, _)| row.get("seq"))
            .collect();
        sqlx::query("DELETE FROM dead_letters WHERE seq = ANY($1)")
            .bind(&moved)
            .execute(&mut *transaction)
            .await
            .map_err(queue_error)?;
        transaction.commit().await.map_err(queue_error)?;
        match refused {
            Some(error) => Err(error),
            None => Ok(moved.len() as u64),
        }
    }

    /// Deletes every dead letter of `event_id` (an erasure).
    pub async fn purge_event(&self, event_id: &str) -> Result<PurgedDeadLetters> {
        let row = sqlx::query(
            r#"WITH purged AS (
                 DELETE FROM dead_letters WHERE event_id = $1 RETURNING blob_key)
               SELECT (SELECT COUNT(*) FROM purged) AS dead_letters,
                      ARRAY(SELECT DISTINCT blob_key FROM purged WHERE blob_key IS NOT NULL
                            ORDER BY blob_key) AS blob_keys"#,
        )
        .bind(event_id)
        .fetch_one(&self.pool)
        .await
        .map_err(queue_error)?;
        Ok(PurgedDeadLetters {
            dead_letters: count(row.get("dead_letters")),
            blob_keys: row.get("blob_keys"),
        })
    }

    /// Deletes up to `limit` dead letters dead-lettered before `before`, oldest first.
    pub async fn prune(&self, before: DateTime<Utc>, limit: usize) -> Result<u64> {
        if limit == 0 {
            return Ok(0);
        }
        let pruned = sqlx::query(
            r#"WITH chosen AS (
                 SELECT seq FROM dead_letters WHERE dead_lettered_at < $1
                 ORDER BY dead_lettered_at, message_id LIMIT $2
                 FOR UPDATE SKIP LOCKED)
               DELETE FROM dead_letters d USING chosen WHERE d.seq = chosen.seq"#,
        )
        .bind(ceil_to_micros(before))
        .bind(sql_limit(limit))
        .execute(&self.pool)
        .await
        .map_err(queue_error)?;
        Ok(pruned.rows_affected())
    }

    /// Whether a dead letter points at `key`.
    pub async fn references_blob(&self, key: &str) -> Result<bool> {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM dead_letters WHERE blob_key = $1)")
            .bind(key)
            .fetch_one(&self.pool)
            .await
            .map_err(queue_error)
    }
}

/// A count read from the database, where it is never negative.
pub(crate) fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// A page of the DLQ: `SELECT *` of up to `limit` entries matching `filter` after `after`, in
/// `(dead_lettered_at, message_id)` order, preceded by `prefix` (tests explain the plan).
pub(crate) fn list_query(
    prefix: &str,
    filter: &DeadLetterFilter,
    after: Option<&DeadLetterPosition>,
    limit: usize,
) -> QueryBuilder<'static, Postgres> {
    let mut query = QueryBuilder::new(format!("{prefix}SELECT * FROM dead_letters"));
    push_conditions(&mut query, &Selection::Filter(filter.clone()), after);
    query
        .push(" ORDER BY dead_lettered_at, message_id LIMIT ")
        .push_bind(sql_limit(limit));
    query
}

/// Which dead letters a statement works on.
pub(crate) enum Selection {
    Filter(DeadLetterFilter),
    Id(String),
}

/// Appends ` WHERE` and the conditions for `selection` (and, with `after`, for the rows
/// strictly after it in `(dead_lettered_at, message_id)` order). Only the filters given become
/// conditions, so each combination gets a plan that uses the index that fits.
pub(crate) fn push_conditions(
    query: &mut QueryBuilder<'_, Postgres>,
    selection: &Selection,
    after: Option<&DeadLetterPosition>,
) {
    query.push(" WHERE TRUE");
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
            .push_bind(ceil_to_micros(since));
    }
    if let Some(until) = filter.until {
        query
            .push(" AND dead_lettered_at < ")
            .push_bind(ceil_to_micros(until));
    }
    if let Some(after) = after {
        // A position between two microseconds (not one this backend handed out) goes on from
        // the next microsecond: every id sorts after the empty string.
        let at = ceil_to_micros(after.dead_lettered_at);
        let id = if at == after.dead_lettered_at {
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

/// A `dead_letters` row. Its own record (id, class, code, counts, times) must parse, or it is
/// `Corrupt`; its attributes are hints and read as absent when they do not parse.
pub(crate) fn dead_letter(row: &PgRow) -> Result<DeadLetter> {
    let read = || -> std::result::Result<DeadLetter, String> {
        Ok(DeadLetter {
            id: parsed(row, "message_id", |text| DeadLetterId::parse(text).ok())?,
            attributes: attributes(row),
            error_class: parsed(row, "error_class", FailureClass::parse)?,
            error: FailureInfo {
                code: parsed(row, "error_code", ErrorCode::parse)?,
                message: column(row, "error_message")?,
            },
            receive_count: unsigned::<i32, _>(row, "receive_count")?,
            enqueued_at: column(row, "enqueued_at")?,
            first_failure_at: column(row, "first_failure_at")?,
            last_failure_at: column(row, "last_failure_at")?,
            dead_lettered_at: column(row, "dead_lettered_at")?,
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
