//! Validated identifiers and text fields: once constructed, a value is known to follow the
//! contract's rules, so nothing downstream re-checks them.

use std::fmt;

use serde::{Deserialize, Serialize};

const ID_MAX_CHARS: usize = 128;

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')
}

/// `text` as an owned id if it keeps the id rules, else the rule it breaks.
fn checked_id(text: &str) -> Result<String, String> {
    if is_valid_id(text) {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "must be 1 to {ID_MAX_CHARS} characters of [A-Za-z0-9._:-]"
        ))
    }
}

fn is_valid_id(text: &str) -> bool {
    // Every allowed character is ASCII, so the byte length is the character count.
    !text.is_empty() && text.len() <= ID_MAX_CHARS && text.chars().all(is_id_char)
}

macro_rules! string_newtype {
    ($name:ident) => {
        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(text: String) -> Result<Self, String> {
                Self::parse(&text)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }
    };
}

/// A producer-chosen event identifier: 1..=128 characters of `[A-Za-z0-9._:-]`, never `.` or
/// `..` (so it is safe inside blob keys and URL paths).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EventId(String);

impl EventId {
    pub fn parse(text: &str) -> Result<Self, String> {
        if is_valid_id(text) && text != "." && text != ".." {
            Ok(Self(text.to_owned()))
        } else {
            Err(format!(
                "must be 1 to {ID_MAX_CHARS} characters of [A-Za-z0-9._:-] and not \".\" or \"..\""
            ))
        }
    }
}
string_newtype!(EventId);

/// A dead letter's id, as the queue backend chose it (a UUID on the database backends) and the
/// admin API and CLI show it. Fluxa promises only the id charset, so that an id from a path or a
/// body that could never be one (NUL, control characters, too long) is turned away before it
/// reaches a database: 1..=128 characters of `[A-Za-z0-9._:-]`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeadLetterId(String);

impl DeadLetterId {
    pub fn parse(text: &str) -> Result<Self, String> {
        checked_id(text).map(Self)
    }
}
string_newtype!(DeadLetterId);

/// The id that ties one request's logs, queue message and stored row together (seed invariant 9).
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CorrelationId(String);

impl CorrelationId {
    pub fn parse(text: &str) -> Result<Self, String> {
        checked_id(text).map(Self)
    }

    /// A fresh UUIDv4, used when a request carries none (or an invalid one).
    pub fn generate() -> Self {
        Self(uuid::Uuid::new_v4().to_string())
    }
}
string_newtype!(CorrelationId);

fn has_control_chars(text: &str) -> bool {
    text.chars().any(char::is_control)
}

/// What happened, e.g. `order.created`: 1..=128 characters, none of them control characters.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EventType(String);

impl EventType {
    pub const MAX_CHARS: usize = 128;

    pub fn parse(text: &str) -> Result<Self, String> {
        let n_chars = text.chars().count();
        if n_chars == 0 || n_chars > Self::MAX_CHARS {
            return Err(format!("must be 1 to {} characters", Self::MAX_CHARS));
        }
        if has_control_chars(text) {
            return Err("must not contain control characters".to_owned());
        }
        Ok(Self(text.to_owned()))
    }
}
string_newtype!(EventType);

/// Which producer sent the event: at most 256 characters, no control characters.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Source(String);

impl Source {
    pub const MAX_CHARS: usize = 256;

    pub fn parse(text: &str) -> Result<Self, String> {
        if text.chars().count() > Self::MAX_CHARS {
            return Err(format!("must be at most {} characters", Self::MAX_CHARS));
        }
        if has_control_chars(text) {
            return Err("must not contain control characters".to_owned());
        }
        Ok(Self(text.to_owned()))
    }
}
string_newtype!(Source);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_follow_the_contract_charset_and_length() {
        assert!(EventId::parse("ord-123").is_ok());
        assert!(EventId::parse("a.b_c:d-e").is_ok());
        assert!(EventId::parse(&"x".repeat(128)).is_ok());
        assert!(EventId::parse(&"x".repeat(129)).is_err());
        assert!(EventId::parse("").is_err());
        assert!(EventId::parse(".").is_err());
        assert!(EventId::parse("..").is_err());
        assert!(EventId::parse("...").is_ok());
        assert!(EventId::parse("a/b").is_err());
        assert!(EventId::parse("é").is_err());
    }

    #[test]
    fn correlation_ids_allow_dots_but_not_spaces_or_emptiness() {
        assert!(CorrelationId::parse(".").is_ok());
        assert!(CorrelationId::parse("").is_err());
        assert!(CorrelationId::parse("a b").is_err());
        assert!(CorrelationId::parse(&"c".repeat(129)).is_err());
        assert!(CorrelationId::parse(CorrelationId::generate().as_str()).is_ok());
    }

    #[test]
    fn dead_letter_ids_take_the_id_charset_and_nothing_a_database_could_choke_on() {
        assert!(DeadLetterId::parse(&uuid::Uuid::new_v4().to_string()).is_ok());
        assert!(DeadLetterId::parse(&"d".repeat(128)).is_ok());
        assert!(DeadLetterId::parse(&"d".repeat(129)).is_err());
        assert!(DeadLetterId::parse("").is_err());
        assert!(DeadLetterId::parse("a\0b").is_err());
        assert!(DeadLetterId::parse("a\nb").is_err());
        assert!(DeadLetterId::parse("a/b").is_err());
    }

    #[test]
    fn lengths_are_counted_in_characters_not_bytes() {
        assert!(EventType::parse(&"é".repeat(128)).is_ok());
        assert!(EventType::parse(&"é".repeat(129)).is_err());
        assert!(Source::parse(&"ü".repeat(256)).is_ok());
        assert!(Source::parse(&"ü".repeat(257)).is_err());
    }

    #[test]
    fn control_characters_are_rejected_in_text_fields() {
        assert!(EventType::parse("a\nb").is_err());
        assert!(EventType::parse("a\u{7f}").is_err());
        assert!(EventType::parse("a\u{85}").is_err());
        assert!(Source::parse("tab\there").is_err());
        assert!(EventType::parse("").is_err());
    }
}
