//! Error codes and failure classes shared by the processor, the queues' dead-letter records and
//! the status API, so the same failure has the same name everywhere.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why processing a message did not (yet) succeed. Stored as its `as_str()` text, and written
/// the same way in JSON and on SQS.
///
/// Every code Fluxa has ever written is one of these (the only code ever removed,
/// `validation_error`, was never constructed), so a stored code that [`ErrorCode::parse`] does
/// not know is a damaged record, not an older version's: readers report it as corrupt rather
/// than guess a code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    // Permanent: the same message can never succeed.
    /// The queue message is not a Fluxa task we understand (or one of its event fields breaks
    /// the contract's rules, which decoding checks).
    InvalidMessage,
    /// The payload bytes do not hash to the message's `payload_sha256`.
    HashMismatch,
    /// The message points at a blob that does not exist.
    BlobMissing,
    /// The event id was already processed with a different payload.
    EventIdConflict,
    // Transient: worth another delivery.
    /// The relational store failed or timed out.
    StoreUnavailable,
    /// The blob store failed or timed out.
    BlobStoreUnavailable,
    /// Another worker holds a live lease on this event id.
    LeaseHeld,
    /// The processing code panicked; treated as transient so a fixed deployment can retry.
    Internal,
    // Set by the queue's redrive, never by the processor.
    /// The message failed transiently on every one of its allowed receives.
    RetriesExhausted,
}

impl ErrorCode {
    /// Every code, for listings that filter by one (an unknown code is a client's typo).
    pub const ALL: [Self; 9] = [
        Self::InvalidMessage,
        Self::HashMismatch,
        Self::BlobMissing,
        Self::EventIdConflict,
        Self::StoreUnavailable,
        Self::BlobStoreUnavailable,
        Self::LeaseHeld,
        Self::Internal,
        Self::RetriesExhausted,
    ];

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|code| code.as_str() == text)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidMessage => "invalid_message",
            Self::HashMismatch => "hash_mismatch",
            Self::BlobMissing => "blob_missing",
            Self::EventIdConflict => "event_id_conflict",
            Self::StoreUnavailable => "store_unavailable",
            Self::BlobStoreUnavailable => "blob_store_unavailable",
            Self::LeaseHeld => "lease_held",
            Self::Internal => "internal",
            Self::RetriesExhausted => "retries_exhausted",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a dead-lettered message failed (contract section 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureClass {
    /// The processor decided the message can never succeed.
    Permanent,
    /// The queue's redrive gave up after the maximum number of receives.
    RetriesExhausted,
}

impl FailureClass {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Permanent => "permanent",
            Self::RetriesExhausted => "retries_exhausted",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "permanent" => Some(Self::Permanent),
            "retries_exhausted" => Some(Self::RetriesExhausted),
            _ => None,
        }
    }
}

/// A failure's code and human-readable message. Messages never contain payload bytes or
/// secrets: they are built from our own words and ids only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureInfo {
    pub code: ErrorCode,
    pub message: String,
}

impl FailureInfo {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_reads_back_from_its_text_and_serialises_as_that_text() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(code.as_str()), Some(code));
            assert_eq!(
                serde_json::to_value(code).unwrap(),
                serde_json::Value::from(code.as_str())
            );
        }
        assert_eq!(ErrorCode::parse("validation_error"), None);
        assert_eq!(ErrorCode::parse("Internal"), None);
    }

    #[test]
    fn a_failure_serialises_its_code_as_the_snake_case_text() {
        let failure = FailureInfo::new(ErrorCode::BlobStoreUnavailable, "down");
        assert_eq!(
            serde_json::to_string(&failure).unwrap(),
            r#"{"code":"blob_store_unavailable","message":"down"}"#
        );
    }
}
