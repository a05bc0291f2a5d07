//! Reading typed values out of rows, for the store's and the queue's row mappers. Fluxa writes
//! every column from a domain type, so each is parsed back into it here, once; a value that
//! does not parse makes the record corrupt (the reason is returned for the caller's `Corrupt`
//! error), and is never replaced by a default. Attributes are the exception ([`lenient`]).

use fluxa_core::{CorrelationId, EventId, EventType};
use fluxa_queue::MessageAttributes;
use sqlx::postgres::PgRow;
use sqlx::{Postgres, Row};

/// The value of `name`, or why it cannot be read as a `T`.
pub(crate) fn column<'r, T>(row: &'r PgRow, name: &str) -> Result<T, String>
where
    T: sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres>,
{
    row.try_get(name)
        .map_err(|e| format!("column {name} cannot be read: {e}"))
}

/// The text of `name` parsed by `parse`, or why it is not a valid value.
pub(crate) fn parsed<T>(
    row: &PgRow,
    name: &str,
    parse: impl FnOnce(&str) -> Option<T>,
) -> Result<T, String> {
    let text: String = column(row, name)?;
    parse(&text).ok_or_else(|| invalid(name, &text))
}

/// As [`parsed`], for a column that may be NULL.
pub(crate) fn parsed_optional<T>(
    row: &PgRow,
    name: &str,
    parse: impl FnOnce(&str) -> Option<T>,
) -> Result<Option<T>, String> {
    let text: Option<String> = column(row, name)?;
    text.map(|text| parse(&text).ok_or_else(|| invalid(name, &text)))
        .transpose()
}

/// A message attribute: `None` when absent or when it does not parse, since attributes are
/// hints beside an authoritative body (`fluxa_queue::MessageAttributes`).
pub(crate) fn lenient<T>(
    row: &PgRow,
    name: &str,
    parse: impl FnOnce(&str) -> Option<T>,
) -> Option<T> {
    let text: Option<String> = row.try_get(name).ok().flatten();
    text.as_deref().and_then(parse)
}

/// A count or size, stored as an integer (of the column's type `S`) that is never negative.
pub(crate) fn unsigned<S, T>(row: &PgRow, name: &str) -> Result<T, String>
where
    S: for<'r> sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres> + ToString + Copy,
    T: TryFrom<S>,
{
    let n: S = column(row, name)?;
    T::try_from(n).map_err(|_| invalid(name, &n.to_string()))
}

fn invalid(name: &str, text: &str) -> String {
    format!("column {name} holds {text:?}, which is not a valid value")
}

/// A row's attributes; one that does not parse reads as absent (see [`MessageAttributes`]).
pub(crate) fn attributes(row: &PgRow) -> MessageAttributes {
    MessageAttributes {
        event_id: lenient(row, "event_id", |text| EventId::parse(text).ok()),
        correlation_id: lenient(row, "correlation_id", |text| {
            CorrelationId::parse(text).ok()
        }),
        blob_key: lenient(row, "blob_key", |text| Some(text.to_owned())),
        event_type: lenient(row, "event_type", |text| EventType::parse(text).ok()),
    }
}
