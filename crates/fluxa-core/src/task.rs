//! The queue message: the only serialized type that crosses process boundaries, so it is
//! versioned. Every queue backend carries these bytes opaquely.
//!
//! **API Boundary:** a message written by one Fluxa version must be readable by the next; add
//! `event.v2` rather than changing `event.v1`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::{CorrelationId, EventId, EventType, PayloadHash, Source};

/// Where a message's payload bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PayloadMode {
    /// Inside the queue message (at most 256 KiB, seed invariant 4).
    #[serde(rename = "INLINE")]
    Inline,
    /// In the blob store; the message carries only the key (seed invariant 5). Named `S3` on
    /// the wire and in the database whichever blob backend holds it (the contract's name).
    #[serde(rename = "S3")]
    Blob,
}

impl PayloadMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inline => "INLINE",
            Self::Blob => "S3",
        }
    }

    /// Reads the wire text back (a stored row's `payload_mode`).
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "INLINE" => Some(Self::Inline),
            "S3" => Some(Self::Blob),
            _ => None,
        }
    }
}

/// The location of a payload in the blob store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    pub bucket: String,
    pub key: String,
}

/// The message-type tag; a single-variant enum so that an unknown tag fails to parse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum EventV1Tag {
    #[serde(rename = "event.v1")]
    EventV1,
}

/// One accepted event on its way to the processor. It borrows its inline payload from the
/// buffer it was built from or read out of (the request body at ingest, the message body in the
/// processor), so the payload bytes are never copied to build or read a message.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventMessageV1<'a> {
    #[serde(rename = "type")]
    tag: EventV1Tag,
    pub event_id: EventId,
    pub event_type: EventType,
    pub source: Option<Source>,
    #[serde(with = "crate::time::rfc3339::option")]
    pub occurred_at: Option<DateTime<Utc>>,
    pub correlation_id: CorrelationId,
    #[serde(with = "crate::time::rfc3339")]
    pub received_at: DateTime<Utc>,
    pub payload_sha256: PayloadHash,
    pub payload_size: u64,
    pub payload_mode: PayloadMode,
    /// The payload's exact bytes, embedded verbatim (a `RawValue` is written as-is), present
    /// only in `INLINE` mode.
    #[serde(
        default,
        borrow,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present_raw_value"
    )]
    pub payload_inline: Option<&'a RawValue>,
    /// The payload's blob, present only in `S3` mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_blob: Option<BlobRef>,
}

/// A present member is `Some`, even when its value is `null` (a valid payload); plain
/// `Option<&RawValue>` would turn a `null` payload into "no payload".
fn present_raw_value<'de: 'a, 'a, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<&'a RawValue>, D::Error> {
    <&'a RawValue>::deserialize(deserializer).map(Some)
}

/// Fields of an accepted event other than its payload's location.
#[derive(Clone, Debug)]
pub struct EventHeader {
    pub event_id: EventId,
    pub event_type: EventType,
    pub source: Option<Source>,
    pub occurred_at: Option<DateTime<Utc>>,
    pub correlation_id: CorrelationId,
    pub received_at: DateTime<Utc>,
    pub payload_sha256: PayloadHash,
    pub payload_size: u64,
}

impl<'a> EventMessageV1<'a> {
    /// A message that carries its payload inline.
    pub fn inline(header: EventHeader, payload: &'a RawValue) -> Self {
        Self::build(header, PayloadMode::Inline, Some(payload), None)
    }

    /// A message that carries only the key of a payload already in the blob store.
    pub fn in_blob(header: EventHeader, blob: BlobRef) -> Self {
        Self::build(header, PayloadMode::Blob, None, Some(blob))
    }

    fn build(
        header: EventHeader,
        payload_mode: PayloadMode,
        payload_inline: Option<&'a RawValue>,
        payload_blob: Option<BlobRef>,
    ) -> Self {
        Self {
            tag: EventV1Tag::EventV1,
            event_id: header.event_id,
            event_type: header.event_type,
            source: header.source,
            occurred_at: header.occurred_at,
            correlation_id: header.correlation_id,
            received_at: header.received_at,
            payload_sha256: header.payload_sha256,
            payload_size: header.payload_size,
            payload_mode,
            payload_inline,
            payload_blob,
        }
    }
}

/// Every kind of message a Fluxa queue carries.
#[derive(Clone, Debug)]
pub enum FluxaTask<'a> {
    EventV1(EventMessageV1<'a>),
}

/// Why a message body could not be read as a [`FluxaTask`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(String);

#[derive(Deserialize)]
struct TaskTag<'a> {
    #[serde(rename = "type", borrow)]
    tag: Option<&'a str>,
}

impl<'a> FluxaTask<'a> {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            // Serialising plain structs, strings and a RawValue cannot fail.
            Self::EventV1(message) => {
                serde_json::to_vec(message).expect("an event message always serialises")
            }
        }
    }

    /// Reads a message body in one parse, borrowing the inline payload from `body`. Tagging is
    /// done by the message struct's own `type` field rather than `#[serde(tag)]`, because serde
    /// buffers internally-tagged enums, which loses `RawValue`'s exact bytes. Only a body that
    /// fails to parse is looked at again, to say why.
    pub fn decode(body: &'a [u8]) -> Result<Self, DecodeError> {
        match serde_json::from_slice::<EventMessageV1<'a>>(body) {
            Ok(message) => {
                message.check_shape()?;
                Ok(Self::EventV1(message))
            }
            Err(e) => Err(match serde_json::from_slice::<TaskTag<'_>>(body) {
                Err(e) => DecodeError(format!("message is not a JSON object: {e}")),
                Ok(TaskTag {
                    tag: Some("event.v1"),
                }) => DecodeError(format!("invalid event.v1 message: {e}")),
                Ok(TaskTag { tag: Some(other) }) => {
                    DecodeError(format!("unknown message type {other:?}"))
                }
                Ok(TaskTag { tag: None }) => DecodeError("message has no type".to_owned()),
            }),
        }
    }
}

impl EventMessageV1<'_> {
    fn check_shape(&self) -> Result<(), DecodeError> {
        match (self.payload_mode, &self.payload_inline, &self.payload_blob) {
            (PayloadMode::Inline, Some(_), None) | (PayloadMode::Blob, None, Some(_)) => Ok(()),
            _ => Err(DecodeError(format!(
                "payload_mode {} does not match the payload fields",
                self.payload_mode.as_str()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> EventHeader {
        EventHeader {
            event_id: EventId::parse("e1").unwrap(),
            event_type: EventType::parse("t").unwrap(),
            source: None,
            occurred_at: None,
            correlation_id: CorrelationId::parse("c1").unwrap(),
            received_at: Utc::now(),
            payload_sha256: PayloadHash::of(b"{ \"a\" :1 }"),
            payload_size: 10,
        }
    }

    #[test]
    fn an_inline_payload_survives_encode_and_decode_byte_for_byte() {
        let raw = RawValue::from_string("{ \"a\" :1 }".to_owned()).unwrap();
        let body = FluxaTask::EventV1(EventMessageV1::inline(header(), &raw)).encode();
        let FluxaTask::EventV1(decoded) = FluxaTask::decode(&body).unwrap();
        assert_eq!(decoded.payload_inline.unwrap().get(), "{ \"a\" :1 }");
    }

    #[test]
    fn a_null_inline_payload_is_still_a_payload() {
        let raw = RawValue::from_string("null".to_owned()).unwrap();
        let body = FluxaTask::EventV1(EventMessageV1::inline(header(), &raw)).encode();
        let FluxaTask::EventV1(decoded) = FluxaTask::decode(&body).unwrap();
        assert_eq!(decoded.payload_inline.unwrap().get(), "null");
    }

    #[test]
    fn a_blob_message_carries_no_payload_member() {
        let blob = BlobRef {
            bucket: "b".into(),
            key: "k".into(),
        };
        let body = FluxaTask::EventV1(EventMessageV1::in_blob(header(), blob)).encode();
        let text = String::from_utf8(body.clone()).unwrap();
        assert!(!text.contains("payload_inline"));
        assert!(FluxaTask::decode(&body).is_ok());
    }

    #[test]
    fn a_blob_payload_mode_is_still_written_and_read_as_s3() {
        assert_eq!(
            serde_json::to_string(&PayloadMode::Blob).unwrap(),
            r#""S3""#
        );
        assert_eq!(PayloadMode::parse("S3"), Some(PayloadMode::Blob));
        assert_eq!(PayloadMode::parse("INLINE"), Some(PayloadMode::Inline));
        assert_eq!(PayloadMode::parse("Blob"), None);
    }

    #[test]
    fn unknown_types_and_garbage_are_decode_errors() {
        assert!(FluxaTask::decode(b"not json").is_err());
        assert!(FluxaTask::decode(br#"{"type":"event.v9"}"#).is_err());
        assert!(FluxaTask::decode(br#"{"no":"type"}"#).is_err());
    }
}
