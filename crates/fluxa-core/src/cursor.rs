//! Opaque paging cursors for the listing APIs (contract sections 2 and 4).
//!
//! A cursor names the last row of a page by its sort key (a timestamp and an id), so the next
//! page is a keyset query that neither skips nor repeats a row that existed when paging began.
//! It also carries which listing it belongs to and a fingerprint of the filters it was made
//! under: passed to another listing, or back with other filters, it is refused (a client would
//! otherwise silently get a page of something else). It is base64url of a small JSON object;
//! clients must treat it as opaque, and nothing in it is secret or trusted beyond being parsed.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Longest cursor text accepted; real ones are about 150 characters.
pub const MAX_CURSOR_LEN: usize = 1024;

/// The listing a cursor pages through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listing {
    Events,
    DeadLetters,
}

impl Listing {
    fn tag(self) -> &'static str {
        match self {
            Self::Events => "events",
            Self::DeadLetters => "dlq",
        }
    }
}

/// The sort key of the last row of a page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Position {
    pub at: DateTime<Utc>,
    pub id: String,
}

/// Why a cursor was refused. The message is safe to show a client.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    #[error("not a cursor this server made")]
    Malformed,
    #[error("made for another listing or other filters; start again without it")]
    Foreign,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    /// Format version, so a future layout can refuse or read an old one deliberately.
    v: u8,
    /// Which listing.
    l: String,
    /// The filters' fingerprint.
    f: String,
    /// The sort timestamp, in microseconds since the epoch (PostgreSQL's precision).
    t: i64,
    i: String,
}

/// A fingerprint of a listing's filters: `parts` are the filter values in a fixed order, each
/// `None` when absent. Two filter sets share a fingerprint only if they are equal.
pub fn fingerprint(parts: &[Option<&str>]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        // A length prefix keeps ("ab", "c") and ("a", "bc") apart; 0xff marks an absent value.
        match part {
            Some(text) => {
                hasher.update((text.len() as u64).to_be_bytes());
                hasher.update(text.as_bytes());
            }
            None => hasher.update([0xff]),
        }
    }
    hex::encode(&hasher.finalize()[..8])
}

/// Encodes the position after which the next page starts.
pub fn encode(listing: Listing, filters: &str, position: &Position) -> String {
    let wire = Wire {
        v: 1,
        l: listing.tag().to_owned(),
        f: filters.to_owned(),
        t: position.at.timestamp_micros(),
        i: position.id.clone(),
    };
    let json = serde_json::to_vec(&wire).unwrap_or_default();
    URL_SAFE_NO_PAD.encode(json)
}

/// Decodes a cursor made by [`encode`] for `listing` under the filters `filters`.
pub fn decode(listing: Listing, filters: &str, text: &str) -> Result<Position, CursorError> {
    if text.is_empty() || text.len() > MAX_CURSOR_LEN {
        return Err(CursorError::Malformed);
    }
    let json = URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| CursorError::Malformed)?;
    let wire: Wire = serde_json::from_slice(&json).map_err(|_| CursorError::Malformed)?;
    if wire.v != 1 {
        return Err(CursorError::Malformed);
    }
    if wire.l != listing.tag() || wire.f != filters {
        return Err(CursorError::Foreign);
    }
    let at = Utc
        .timestamp_micros(wire.t)
        .single()
        .ok_or(CursorError::Malformed)?;
    Ok(Position { at, id: wire.i })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn position() -> Position {
        Position {
            at: DateTime::parse_from_rfc3339("2026-11-30T12:00:00.123456Z")
                .unwrap()
                .with_timezone(&Utc),
            id: "evt-1".to_owned(),
        }
    }

    #[test]
    fn a_cursor_round_trips_its_position_to_the_microsecond() {
        let filters = fingerprint(&[Some("order.created"), None]);
        let text = encode(Listing::Events, &filters, &position());
        assert_eq!(decode(Listing::Events, &filters, &text), Ok(position()));
        assert!(text.len() < 200, "{text}");
    }

    #[test]
    fn a_cursor_is_refused_by_another_listing_or_under_other_filters() {
        let filters = fingerprint(&[Some("a"), None]);
        let text = encode(Listing::Events, &filters, &position());
        assert_eq!(
            decode(Listing::DeadLetters, &filters, &text),
            Err(CursorError::Foreign)
        );
        let other = fingerprint(&[Some("b"), None]);
        assert_eq!(
            decode(Listing::Events, &other, &text),
            Err(CursorError::Foreign)
        );
    }

    #[test]
    fn filter_fingerprints_tell_apart_values_that_concatenate_alike() {
        assert_ne!(
            fingerprint(&[Some("ab"), Some("c")]),
            fingerprint(&[Some("a"), Some("bc")])
        );
        assert_ne!(
            fingerprint(&[Some(""), None]),
            fingerprint(&[None, Some("")])
        );
    }

    #[test]
    fn garbage_is_malformed_never_a_panic() {
        let filters = fingerprint(&[]);
        for text in ["", "!!!", "e30", &"A".repeat(5000), "eyJ2IjoyfQ"] {
            assert_eq!(
                decode(Listing::Events, &filters, text),
                Err(CursorError::Malformed),
                "{text}"
            );
        }
    }
}
