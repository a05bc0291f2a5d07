//! The wire format of a message on SQS beside its body: the String message attributes Fluxa
//! writes on every message (its ids, `payload_mode` and `schema`) and on a dead letter (the ids
//! and the reason), and how a received message, or a Lambda `SqsEvent` record, is read back.

use aws_sdk_sqs::types::{Message, MessageAttributeValue, MessageSystemAttributeName};
use chrono::{DateTime, SecondsFormat, Utc};
use fluxa_core::ids::DeadLetterId;
use fluxa_core::{
    CorrelationId, ErrorCode, EventId, EventType, FailureClass, FailureInfo, PayloadMode,
};
use fluxa_queue::{DeadLetter, Error, MessageAttributes, Result};

use super::SqsError;

/// The value of the `schema` attribute on every message Fluxa sends.
pub const SCHEMA: &str = "event.v1";

/// SQS refuses a message with more message attributes than this.
pub(super) const MAX_MESSAGE_ATTRIBUTES: usize = 10;
/// An error message longer than this is cut on the DLQ (attributes count towards the message's
/// size).
pub(super) const MAX_ERROR_MESSAGE_CHARS: usize = 4096;

/// A received SQS message as Fluxa reads it, whichever API delivered it: `ReceiveMessage`, or
/// a Lambda event source mapping's `SqsEvent` record (the processor function builds these from
/// its records, so both hosts read a message alike).
#[derive(Clone, Debug, Default)]
pub struct ReceivedMessage {
    pub message_id: String,
    pub receipt: String,
    pub body: String,
    /// `ApproximateReceiveCount`.
    pub receive_count: Option<String>,
    /// `SentTimestamp`, in milliseconds since the epoch.
    pub sent_timestamp: Option<String>,
    /// The String message attributes, by name.
    pub attributes: std::collections::HashMap<String, String>,
}

impl ReceivedMessage {
    pub(super) fn of(message: &Message) -> Result<Self> {
        let malformed = |what: &str| {
            Error::unavailable(SqsError {
                operation: "ReceiveMessage",
                detail: format!("a received message has no {what}"),
            })
        };
        let system = |name: MessageSystemAttributeName| {
            message
                .attributes()
                .and_then(|a| a.get(&name))
                .map(String::to_owned)
        };
        Ok(Self {
            message_id: message
                .message_id()
                .ok_or_else(|| malformed("message id"))?
                .to_owned(),
            receipt: message
                .receipt_handle()
                .ok_or_else(|| malformed("receipt handle"))?
                .to_owned(),
            body: message.body().unwrap_or_default().to_owned(),
            receive_count: system(MessageSystemAttributeName::ApproximateReceiveCount),
            sent_timestamp: system(MessageSystemAttributeName::SentTimestamp),
            attributes: message
                .message_attributes()
                .map(|attributes| {
                    attributes
                        .iter()
                        .filter_map(|(name, value)| {
                            Some((name.clone(), value.string_value()?.to_owned()))
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    fn attribute(&self, name: &str) -> Option<String> {
        self.attributes.get(name).filter(|v| !v.is_empty()).cloned()
    }

    /// The ids among the attributes. They come from whoever sent the message, so one that does
    /// not parse is left out rather than failing the receive (the body is authoritative; see
    /// [`MessageAttributes`]).
    pub(super) fn ids(&self) -> MessageAttributes {
        MessageAttributes::parse_lenient(
            self.attribute("event_id").as_deref(),
            self.attribute("correlation_id").as_deref(),
            self.attribute("blob_key"),
            self.attribute("event_type").as_deref(),
        )
    }

    pub(super) fn receive_count(&self) -> u32 {
        self.receive_count
            .as_deref()
            .and_then(|count| count.parse::<u32>().ok())
            .unwrap_or(1)
    }

    pub(super) fn sent_at(&self) -> Option<DateTime<Utc>> {
        self.sent_timestamp
            .as_deref()
            .and_then(|millis| millis.parse::<i64>().ok())
            .and_then(DateTime::<Utc>::from_timestamp_millis)
    }

    /// This message, received from the dead-letter queue, as the dead letter it records.
    ///
    /// A message Fluxa dead-lettered carries its reason as attributes (`error_class`
    /// `permanent`). One without them was moved by the queue's `RedrivePolicy` after
    /// `max_receives` receives: its last receiver gave up or died, so it is
    /// `retries_exhausted`. SQS keeps no earlier failure times, so those fall back to
    /// `now`, the time the drain read it.
    ///
    /// The reason's attributes come from outside too, and the drain must not stall on one
    /// message: a permanent failure without an `error_code` Fluxa knows is recorded as
    /// `internal`, its message saying which code it carried. A message id that cannot be a
    /// dead letter's id (SQS's are UUIDs) is an error: the message stays in the SQS DLQ.
    pub fn dead_letter(&self, max_receives: u32, now: DateTime<Utc>) -> Result<DeadLetter> {
        let id = DeadLetterId::parse(&self.message_id).map_err(|rule| {
            Error::unavailable(SqsError {
                operation: "ReceiveMessage",
                detail: format!(
                    "a dead letter's message id {:?} cannot be an id: {rule}",
                    self.message_id
                ),
            })
        })?;
        let time = |name: &str| {
            self.attribute(name)
                .and_then(|text| DateTime::parse_from_rfc3339(&text).ok())
                .map(|at| at.with_timezone(&Utc))
        };
        let permanent = self
            .attribute("error_class")
            .as_deref()
            .and_then(FailureClass::parse)
            == Some(FailureClass::Permanent);
        let (error_class, error, receive_count) = if permanent {
            (
                FailureClass::Permanent,
                self.permanent_failure(),
                self.attribute("receive_count")
                    .and_then(|count| count.parse().ok())
                    .unwrap_or(1),
            )
        } else {
            (
                FailureClass::RetriesExhausted,
                FailureInfo::new(
                    ErrorCode::RetriesExhausted,
                    format!(
                        "the SQS queue moved the message to its dead-letter queue after \
                         {max_receives} receives"
                    ),
                ),
                max_receives,
            )
        };
        let dead_lettered_at = time("dead_lettered_at").unwrap_or(now);
        Ok(DeadLetter {
            id,
            attributes: self.ids(),
            error_class,
            error,
            receive_count,
            enqueued_at: self.sent_at().unwrap_or(now).min(dead_lettered_at),
            first_failure_at: time("first_failure_at").unwrap_or(dead_lettered_at),
            last_failure_at: dead_lettered_at,
            dead_lettered_at,
            body: self.body.clone().into_bytes(),
        })
    }

    /// The reason Fluxa wrote on a permanent failure's attributes.
    fn permanent_failure(&self) -> FailureInfo {
        let message = self.attribute("error_message").unwrap_or_default();
        match self.attribute("error_code") {
            Some(text) => match ErrorCode::parse(&text) {
                Some(code) => FailureInfo { code, message },
                None => FailureInfo::new(
                    ErrorCode::Internal,
                    format!("unknown error code {text:?} on the SQS message: {message}"),
                ),
            },
            None => FailureInfo::new(
                ErrorCode::Internal,
                format!("no error code on the SQS message: {message}"),
            ),
        }
    }
}

/// A dead letter read from the SQS dead-letter queue, with the receipt that deletes it there
/// once it is recorded.
#[derive(Clone, Debug)]
pub struct DrainedDeadLetter {
    pub dead_letter: DeadLetter,
    pub receipt: String,
}

/// The message attributes of a message Fluxa sends, absent and empty ones left out (SQS
/// refuses an empty value).
pub(super) fn message_attributes(attributes: &MessageAttributes) -> Vec<(&'static str, String)> {
    let payload_mode = if attributes.blob_key.is_some() {
        PayloadMode::Blob
    } else {
        PayloadMode::Inline
    };
    let mut out = vec![
        ("payload_mode", payload_mode.as_str().to_owned()),
        ("schema", SCHEMA.to_owned()),
    ];
    push_ids(&mut out, attributes);
    out
}

/// The ids of a message, absent and empty ones left out.
fn push_ids(out: &mut Vec<(&'static str, String)>, attributes: &MessageAttributes) {
    for (name, value) in [
        (
            "correlation_id",
            attributes
                .correlation_id
                .as_ref()
                .map(CorrelationId::as_str),
        ),
        (
            "event_id",
            attributes.event_id.as_ref().map(EventId::as_str),
        ),
        ("blob_key", attributes.blob_key.as_deref()),
        (
            "event_type",
            attributes.event_type.as_ref().map(EventType::as_str),
        ),
    ] {
        if let Some(value) = value.filter(|v| !v.is_empty()) {
            out.push((name, sqs_text(value)));
        }
    }
}

/// The attributes of a dead letter sent to the DLQ: the message's ids and the reason.
///
/// SQS allows 10 message attributes, and the ids (4) plus the reason (6) already make 10, so
/// `payload_mode` and `schema` are left out: `payload_mode` is `S3` exactly when `blob_key` is
/// there, and the schema is in the body. SQS keeps no record of earlier transient failures, so
/// `first_failure_at` is this failure's time, like `dead_lettered_at`.
pub(super) fn dead_letter_attributes(
    attributes: &MessageAttributes,
    error: &FailureInfo,
    receive_count: u32,
    now: DateTime<Utc>,
) -> Vec<(&'static str, String)> {
    let now = now.to_rfc3339_opts(SecondsFormat::Millis, true);
    let mut out = Vec::with_capacity(MAX_MESSAGE_ATTRIBUTES);
    push_ids(&mut out, attributes);
    let error_message: String = error
        .message
        .chars()
        .take(MAX_ERROR_MESSAGE_CHARS)
        .collect();
    out.push(("error_code", error.code.as_str().to_owned()));
    // An empty value is refused; an empty message says so.
    out.push((
        "error_message",
        if error_message.is_empty() {
            "(none)".to_owned()
        } else {
            sqs_text(&error_message)
        },
    ));
    out.push(("error_class", FailureClass::Permanent.as_str().to_owned()));
    out.push(("receive_count", receive_count.to_string()));
    out.push(("first_failure_at", now.clone()));
    out.push(("dead_lettered_at", now));
    debug_assert!(out.len() <= MAX_MESSAGE_ATTRIBUTES);
    out
}

pub(super) fn string_attribute(value: String) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(value)
        .build()
        .expect("a String attribute with a value is complete")
}

/// What message attributes add to a message's size as SQS counts it (name, type, value).
pub(super) fn attributes_size(attributes: &[(&'static str, String)]) -> usize {
    attributes
        .iter()
        .map(|(name, value)| name.len() + "String".len() + value.len())
        .sum()
}

/// `text` with every character SQS refuses in an attribute value replaced by U+FFFD (SQS takes
/// tab, newline, carriage return, and U+0020 to U+10FFFF except surrogates, U+FFFE and
/// U+FFFF).
pub(super) fn sqs_text(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' => c,
            '\u{10000}'..='\u{10FFFF}' => c,
            _ => '\u{FFFD}',
        })
        .collect()
}
