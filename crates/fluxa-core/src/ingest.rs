//! Ingest validation: a request body in, a [`ValidatedEvent`] (borrowing the exact payload
//! bytes) or a contract error out. Shared by the single and batch endpoints and every host.

use chrono::{DateTime, SubsecRound, Utc};
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::task::EventHeader;
use crate::{
    payload_mode_for, CorrelationId, EventId, EventType, PayloadHash, PayloadMode, Source,
};

/// Why an event was refused at the door. Each variant is one of the contract's error codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    /// `invalid_json`: the body is not syntactically JSON.
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(String),
    /// `validation_error`: the message names the field.
    #[error("{field}: {message}")]
    Validation { field: String, message: String },
    /// `hash_mismatch`: the producer's `payload_sha256` is not the hash of the payload bytes.
    #[error("payload_sha256: the given hash {given} does not match the payload's hash {actual}")]
    HashMismatch { given: String, actual: String },
    /// `payload_too_large`.
    #[error("payload: {size} bytes is more than the maximum of {max} bytes")]
    PayloadTooLarge { size: usize, max: usize },
}

impl IngestError {
    pub fn validation(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Validation {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The size and shape bounds a payload must keep (contract section 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PayloadLimits {
    /// Largest accepted payload in bytes (`max_payload_bytes`, default 10 MiB).
    pub max_bytes: usize,
    /// Deepest accepted nesting of arrays and objects (`max_payload_depth`, default 128; a
    /// scalar is depth 0).
    pub max_depth: usize,
}

impl Default for PayloadLimits {
    fn default() -> Self {
        Self {
            max_bytes: 10 * 1024 * 1024,
            max_depth: 128,
        }
    }
}

/// An event that passed every ingest rule. `payload` borrows the request body.
#[derive(Debug)]
pub struct ValidatedEvent<'body> {
    pub event_id: EventId,
    pub event_type: EventType,
    pub source: Option<Source>,
    pub occurred_at: Option<DateTime<Utc>>,
    pub payload: &'body RawValue,
    pub payload_sha256: PayloadHash,
}

impl ValidatedEvent<'_> {
    pub fn payload_size(&self) -> usize {
        self.payload.get().len()
    }

    pub fn payload_mode(&self) -> PayloadMode {
        payload_mode_for(self.payload_size())
    }

    /// The message header for this event as received now under `correlation_id`.
    pub fn header(&self, correlation_id: CorrelationId, received_at: DateTime<Utc>) -> EventHeader {
        EventHeader {
            event_id: self.event_id.clone(),
            event_type: self.event_type.clone(),
            source: self.source.clone(),
            occurred_at: self.occurred_at,
            correlation_id,
            received_at,
            payload_sha256: self.payload_sha256.clone(),
            payload_size: self.payload_size() as u64,
        }
    }
}

/// The wire shape of one event. Unknown members are refused so typos never drop data silently.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventIn<'body> {
    event_id: String,
    event_type: String,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    occurred_at: Option<String>,
    #[serde(borrow)]
    payload: &'body RawValue,
    #[serde(default)]
    payload_sha256: Option<String>,
}

/// Checks that `body` is syntactically JSON, without building anything.
pub fn check_json_syntax(body: &[u8]) -> Result<(), IngestError> {
    // JSON text is UTF-8 (RFC 8259), and skipping over values does not check that.
    std::str::from_utf8(body)
        .map_err(|e| IngestError::InvalidJson(format!("the body is not UTF-8: {e}")))?;
    serde_json::from_slice::<IgnoredAny>(body)
        .map(|_| ())
        .map_err(|e| IngestError::InvalidJson(e.to_string()))
}

/// Validates one event body (syntax is checked first, so a syntax error anywhere is always
/// `invalid_json` even if a type error comes earlier in the text).
pub fn parse_event(body: &[u8], limits: PayloadLimits) -> Result<ValidatedEvent<'_>, IngestError> {
    check_json_syntax(body)?;
    parse_checked_event(body, limits)
}

/// Validates one event whose JSON syntax is already known to be fine (a batch item).
pub fn parse_checked_event(
    body: &[u8],
    limits: PayloadLimits,
) -> Result<ValidatedEvent<'_>, IngestError> {
    let event_in: EventIn<'_> = read_object(body, "the event")?;
    validate(event_in, limits)
}

/// Reads a JSON object whose syntax is already known to be fine into `T`. A member of the
/// wrong type, a missing or an unknown one is a `validation_error` that names it by its path
/// (`dry_run`, `filter.error_code`), as contract section 6 asks of every body; `what` names the
/// object in the message when the problem is the object as a whole.
pub fn read_object<'de, T: Deserialize<'de>>(
    body: &'de [u8],
    what: &str,
) -> Result<T, IngestError> {
    // serde would happily read a struct from a JSON array, so insist on an object first.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(IngestError::validation(
            "body",
            format!("{what} must be a JSON object with its members"),
        ));
    }
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut deserializer)
        .map_err(|e| data_error(e.path().to_string(), e.into_inner(), what))
}

/// Most events one batch may carry (contract section 1b).
pub const MAX_BATCH_EVENTS: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchIn<'body> {
    #[serde(borrow)]
    events: Vec<&'body RawValue>,
}

/// Validates a batch body (`{"events": [...]}`): the whole body's problems are one error,
/// each item's are its own, in order. The body is scanned for syntax once; items are then
/// borrowed from it, never copied.
#[allow(clippy::type_complexity)]
pub fn parse_batch(
    body: &[u8],
    limits: PayloadLimits,
) -> Result<Vec<Result<ValidatedEvent<'_>, IngestError>>, IngestError> {
    check_json_syntax(body)?;
    let batch: BatchIn<'_> = read_object(body, "a batch")?;
    if batch.events.is_empty() || batch.events.len() > MAX_BATCH_EVENTS {
        return Err(IngestError::validation(
            "events",
            format!(
                "must hold 1 to {MAX_BATCH_EVENTS} events, not {}",
                batch.events.len()
            ),
        ));
    }
    Ok(batch
        .events
        .into_iter()
        .map(|raw| parse_checked_event(raw.get().as_bytes(), limits))
        .collect())
}

fn data_error(path: String, error: serde_json::Error, what: &str) -> IngestError {
    // serde_json appends " at line L column C"; the field name is the useful part.
    let text = error.to_string();
    let text = match text.rfind(" at line ") {
        Some(at) => text[..at].to_owned(),
        None => text,
    };
    if path == "." || path.is_empty() {
        let field = text
            .split('`')
            .nth(1)
            .filter(|_| text.contains("field"))
            .unwrap_or("body")
            .to_owned();
        let message = if field == "body" {
            format!("{what} must be a JSON object with its members ({text})")
        } else {
            text
        };
        IngestError::validation(field, message)
    } else {
        IngestError::validation(path, text)
    }
}

fn validate(
    event_in: EventIn<'_>,
    limits: PayloadLimits,
) -> Result<ValidatedEvent<'_>, IngestError> {
    let event_id =
        EventId::parse(&event_in.event_id).map_err(|m| IngestError::validation("event_id", m))?;
    let event_type = EventType::parse(&event_in.event_type)
        .map_err(|m| IngestError::validation("event_type", m))?;
    let source = event_in
        .source
        .as_deref()
        .map(Source::parse)
        .transpose()
        .map_err(|m| IngestError::validation("source", m))?;
    let occurred_at = event_in
        .occurred_at
        .as_deref()
        .map(|text| {
            // Normalised to UTC and to microseconds, the precision every store keeps, so an
            // event reads back the same from every backend.
            DateTime::parse_from_rfc3339(text)
                .map(|at| at.with_timezone(&Utc).trunc_subsecs(6))
                .map_err(|_| {
                    IngestError::validation(
                        "occurred_at",
                        "must be an RFC 3339 timestamp such as 2026-11-23T10:00:00Z",
                    )
                })
        })
        .transpose()?;
    let given_hash = event_in
        .payload_sha256
        .as_deref()
        .map(PayloadHash::parse)
        .transpose()
        .map_err(|m| IngestError::validation("payload_sha256", m))?;

    let payload = event_in.payload;
    let payload_size = payload.get().len();
    if payload_size > limits.max_bytes {
        return Err(IngestError::PayloadTooLarge {
            size: payload_size,
            max: limits.max_bytes,
        });
    }
    if nesting_exceeds(payload.get().as_bytes(), limits.max_depth) {
        return Err(IngestError::validation(
            "payload",
            format!(
                "nested more than {} levels of arrays and objects deep",
                limits.max_depth
            ),
        ));
    }
    let payload_sha256 = PayloadHash::of(payload.get().as_bytes());
    if let Some(given) = given_hash {
        if given != payload_sha256 {
            return Err(IngestError::HashMismatch {
                given: given.to_string(),
                actual: payload_sha256.to_string(),
            });
        }
    }
    Ok(ValidatedEvent {
        event_id,
        event_type,
        source,
        occurred_at,
        payload,
        payload_sha256,
    })
}

/// Whether the JSON text `value` nests arrays and objects more than `max_depth` deep.
///
/// `value` is already known to be valid JSON (serde_json skipped over it to borrow it as a
/// `RawValue`, which it does without recursion, so depth costs it nothing and proves nothing).
/// So this is a byte scan, not a parse: brackets count unless they are inside a string, and
/// a string ends at the first quote not escaped by a backslash. It stops at the first level
/// too deep, so a hostile 10 MiB of `[` costs no more than the depth limit.
fn nesting_exceeds(value: &[u8], max_depth: usize) -> bool {
    let mut depth = 0usize;
    let mut bytes = value.iter();
    while let Some(&byte) = bytes.next() {
        match byte {
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'"' => {
                while let Some(&byte) = bytes.next() {
                    match byte {
                        b'\\' => {
                            bytes.next();
                        }
                        b'"' => break,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: PayloadLimits = PayloadLimits {
        max_bytes: 10 * 1024 * 1024,
        max_depth: 128,
    };

    /// A payload `depth` levels deep: a scalar inside `depth` arrays.
    fn nested(depth: usize) -> String {
        format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
    }

    fn with_payload(payload: &str) -> String {
        format!(r#"{{"event_id":"e","event_type":"t","payload":{payload}}}"#)
    }

    fn field_of(result: Result<ValidatedEvent<'_>, IngestError>) -> String {
        match result {
            Err(IngestError::Validation { field, .. }) => field,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn the_payload_bytes_are_exactly_the_value_text_without_surrounding_whitespace() {
        let body = br#"{"event_id":"e","event_type":"t","payload":  { "b" : [1, 2.50] }  }"#;
        let event = parse_event(body, MAX).unwrap();
        assert_eq!(event.payload.get(), r#"{ "b" : [1, 2.50] }"#);
        assert_eq!(
            event.payload_sha256,
            PayloadHash::of(br#"{ "b" : [1, 2.50] }"#)
        );
        assert_eq!(event.payload_size(), 19);
    }

    #[test]
    fn every_json_value_kind_is_a_valid_payload() {
        for payload in ["null", "true", "0", "\"s\"", "[]", "{}", "-1.5e3"] {
            let body = format!(r#"{{"event_id":"e","event_type":"t","payload":{payload}}}"#);
            assert_eq!(
                parse_event(body.as_bytes(), MAX).unwrap().payload.get(),
                payload
            );
        }
    }

    #[test]
    fn a_syntax_error_is_invalid_json_even_after_a_type_error() {
        let body = br#"{"event_id": 5, "event_type": "t", "payload": {]}"#;
        assert!(matches!(
            parse_event(body, MAX).unwrap_err(),
            IngestError::InvalidJson(_)
        ));
        assert!(matches!(
            parse_event(b"", MAX).unwrap_err(),
            IngestError::InvalidJson(_)
        ));
        assert!(matches!(
            parse_event(b"{} trailing", MAX).unwrap_err(),
            IngestError::InvalidJson(_)
        ));
        let not_utf8 = b"{\"event_id\":\"a\xff\",\"event_type\":\"t\",\"payload\":1}";
        assert!(matches!(
            parse_event(not_utf8, MAX).unwrap_err(),
            IngestError::InvalidJson(_)
        ));
    }

    #[test]
    fn validation_errors_name_the_field() {
        let cases: &[(&str, &str)] = &[
            (r#"{"event_type":"t","payload":1}"#, "event_id"),
            (r#"{"event_id":"e","payload":1}"#, "event_type"),
            (r#"{"event_id":"e","event_type":"t"}"#, "payload"),
            (r#"{"event_id":5,"event_type":"t","payload":1}"#, "event_id"),
            (
                r#"{"event_id":"e","event_type":["t"],"payload":1}"#,
                "event_type",
            ),
            (
                r#"{"event_id":"e","event_type":"t","payload":1,"extra":1}"#,
                "extra",
            ),
            (
                r#"{"event_id":"a/b","event_type":"t","payload":1}"#,
                "event_id",
            ),
            (
                r#"{"event_id":"e","event_type":"","payload":1}"#,
                "event_type",
            ),
            (
                r#"{"event_id":"e","event_type":"t","source":"a\u0001","payload":1}"#,
                "source",
            ),
            (
                r#"{"event_id":"e","event_type":"t","occurred_at":"yesterday","payload":1}"#,
                "occurred_at",
            ),
            (
                r#"{"event_id":"e","event_type":"t","payload":1,"payload_sha256":"ABC"}"#,
                "payload_sha256",
            ),
            (r#"[1,2]"#, "body"),
            (r#""just a string""#, "body"),
        ];
        for (body, field) in cases {
            assert_eq!(
                &field_of(parse_event(body.as_bytes(), MAX)),
                field,
                "body: {body}"
            );
        }
    }

    #[test]
    fn a_wrong_client_hash_is_a_hash_mismatch_and_a_right_one_is_accepted() {
        let wrong = format!(
            r#"{{"event_id":"e","event_type":"t","payload":{{"a":1}},"payload_sha256":"{}"}}"#,
            "0".repeat(64)
        );
        assert!(matches!(
            parse_event(wrong.as_bytes(), MAX).unwrap_err(),
            IngestError::HashMismatch { .. }
        ));
        let right = format!(
            r#"{{"event_id":"e","event_type":"t","payload":{{"a":1}},"payload_sha256":"{}"}}"#,
            PayloadHash::of(br#"{"a":1}"#)
        );
        assert!(parse_event(right.as_bytes(), MAX).is_ok());
    }

    #[test]
    fn a_payload_over_the_maximum_is_too_large() {
        let body = br#"{"event_id":"e","event_type":"t","payload":"12345678"}"#;
        let limit = |max_bytes| PayloadLimits { max_bytes, ..MAX };
        assert!(matches!(
            parse_event(body, limit(9)).unwrap_err(),
            IngestError::PayloadTooLarge { .. }
        ));
        assert!(parse_event(body, limit(10)).is_ok());
    }

    #[test]
    fn occurred_at_is_normalised_to_utc_and_null_optionals_are_absent() {
        let body = br#"{"event_id":"e","event_type":"t","source":null,"occurred_at":"2026-11-23T12:00:00+02:00","payload":1}"#;
        let event = parse_event(body, MAX).unwrap();
        assert_eq!(
            crate::time::format_rfc3339(&event.occurred_at.unwrap()),
            "2026-11-23T10:00:00Z"
        );
        assert!(event.source.is_none());
    }

    #[test]
    fn occurred_at_keeps_microseconds_and_drops_finer_digits() {
        let body = br#"{"event_id":"e","event_type":"t","occurred_at":"2026-11-23T10:00:00.123456789Z","payload":1}"#;
        let event = parse_event(body, MAX).unwrap();
        assert_eq!(
            crate::time::format_rfc3339(&event.occurred_at.unwrap()),
            "2026-11-23T10:00:00.123456Z"
        );
    }

    #[test]
    fn a_payload_127_or_128_levels_deep_is_accepted_and_129_is_a_validation_error_on_payload() {
        for depth in [0, 1, 127, 128] {
            let body = with_payload(&nested(depth));
            assert!(parse_event(body.as_bytes(), MAX).is_ok(), "depth {depth}");
        }
        let body = with_payload(&nested(129));
        assert_eq!(field_of(parse_event(body.as_bytes(), MAX)), "payload");
        let objects = format!(r#"{}1{}"#, r#"{"a":"#.repeat(129), "}".repeat(129));
        assert_eq!(
            field_of(parse_event(with_payload(&objects).as_bytes(), MAX)),
            "payload"
        );
    }

    #[test]
    fn a_payload_100000_levels_deep_is_refused_without_exhausting_the_stack() {
        let body = with_payload(&nested(100_000));
        assert_eq!(field_of(parse_event(body.as_bytes(), MAX)), "payload");
    }

    #[test]
    fn brackets_inside_strings_do_not_count_towards_the_depth() {
        let limits = PayloadLimits {
            max_depth: 2,
            ..MAX
        };
        let payload = r#"[{"k[{":"]]]\"[[[[{{{{\\"}, "[[[["]"#;
        assert!(parse_event(with_payload(payload).as_bytes(), limits).is_ok());
        // An escaped quote does not end a string; an escaped backslash before a quote does.
        assert!(nesting_exceeds(br#"[["\"", [[1]]]]"#, 3));
        assert!(nesting_exceeds(br#"[["\\", [[1]]]]"#, 3));
        assert!(!nesting_exceeds(br#"[["\\", [1]]]"#, 3));
    }
}
