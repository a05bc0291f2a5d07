//! Timestamp helpers: every timestamp Fluxa writes or returns is RFC 3339 in UTC.

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};

/// Formats a timestamp the way the HTTP contract shows it: RFC 3339, UTC, `Z` suffix, with only
/// as many fractional digits as the value needs.
pub fn format_rfc3339(at: &DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// Converts Unix milliseconds (how the SQLite backends keep time) into a UTC timestamp.
pub fn from_unix_millis(millis: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(millis)
        .single()
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

/// `at` rounded up to whole microseconds (PostgreSQL's resolution). Stored times are whole
/// microseconds, so a stored `t` is at or after `at` exactly when `t >= ceil(at)`, and before it
/// exactly when `t < ceil(at)`; truncating, as the driver would, lets a bound with nanoseconds
/// admit the microsecond before it.
pub fn ceil_to_micros(at: DateTime<Utc>) -> DateTime<Utc> {
    match at.timestamp_subsec_nanos() % 1_000 {
        0 => at,
        extra => at + chrono::Duration::nanoseconds(i64::from(1_000 - extra)),
    }
}

/// `at` in Unix milliseconds (how the SQLite backends keep time), rounded up for the same
/// reason as [`ceil_to_micros`].
pub fn ceil_to_unix_millis(at: DateTime<Utc>) -> i64 {
    let floor = at.timestamp_millis();
    if at.timestamp_subsec_nanos().is_multiple_of(1_000_000) {
        floor
    } else {
        floor.saturating_add(1)
    }
}

/// Serde adapter so the queue message and API bodies carry timestamps in the same format.
pub mod rfc3339 {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(at: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&super::format_rfc3339(at))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<DateTime<Utc>, D::Error> {
        let text = String::deserialize(deserializer)?;
        DateTime::parse_from_rfc3339(&text)
            .map(|at| at.with_timezone(&Utc))
            .map_err(serde::de::Error::custom)
    }

    /// The same for optional timestamps; `None` is written as `null`.
    pub mod option {
        use chrono::{DateTime, Utc};
        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(
            at: &Option<DateTime<Utc>>,
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            match at {
                Some(at) => super::serialize(at, serializer),
                None => serializer.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Option<DateTime<Utc>>, D::Error> {
            let text: Option<String> = Option::deserialize(deserializer)?;
            text.map(|text| {
                DateTime::parse_from_rfc3339(&text)
                    .map(|at| at.with_timezone(&Utc))
                    .map_err(serde::de::Error::custom)
            })
            .transpose()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_between_two_stored_instants_rounds_up_to_the_next_one() {
        let whole = Utc.timestamp_micros(1_700_000_000_123_456).unwrap();
        assert_eq!(ceil_to_micros(whole), whole);
        let later = whole + chrono::Duration::nanoseconds(1);
        assert_eq!(
            ceil_to_micros(later),
            whole + chrono::Duration::microseconds(1)
        );
        let whole = Utc.timestamp_millis_opt(1_700_000_000_123).unwrap();
        assert_eq!(ceil_to_unix_millis(whole), 1_700_000_000_123);
        let later = whole + chrono::Duration::microseconds(1);
        assert_eq!(ceil_to_unix_millis(later), 1_700_000_000_124);
    }

    #[test]
    fn whole_seconds_are_formatted_without_a_fraction_and_with_a_z() {
        let at = DateTime::parse_from_rfc3339("2026-11-23T12:00:00+02:00").unwrap();
        assert_eq!(
            format_rfc3339(&at.with_timezone(&Utc)),
            "2026-11-23T10:00:00Z"
        );
    }
}
