//! Named schemas of the values the API takes and answers (ids, hashes, types, codes), for
//! fields and parameters to refer to by `value_type`. Each reads its rules from the Rust type
//! that enforces them where it can (lengths, enum values), so the document follows the code.
//! They are schema-only types: uninhabited, never built.

use utoipa::openapi::{ObjectBuilder, RefOr, Schema, Type};
use utoipa::{PartialSchema, ToSchema};

/// The pattern of event ids and correlation ids (contract section 1).
pub(crate) const ID_PATTERN: &str = "^[A-Za-z0-9._:-]{1,128}$";

/// Declares a named string schema with a pattern, for fields to refer to by
/// `value_type`.
macro_rules! string_schema {
    ($name:ident, $pattern:expr, $description:literal) => {
        #[doc = $description]
        pub enum $name {}

        impl PartialSchema for $name {
            fn schema() -> RefOr<Schema> {
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some($pattern))
                    .description(Some($description))
                    .into()
            }
        }

        impl ToSchema for $name {}
    };
}

string_schema!(
    EventId,
    ID_PATTERN,
    "A producer-chosen event id: 1 to 128 characters of `[A-Za-z0-9._:-]`, not `.` or `..`."
);
string_schema!(
    DeadLetterId,
    ID_PATTERN,
    "A dead letter's id, as the list shows it: 1 to 128 characters of `[A-Za-z0-9._:-]`."
);
string_schema!(
    CorrelationId,
    ID_PATTERN,
    "A correlation id: 1 to 128 characters of `[A-Za-z0-9._:-]`."
);
string_schema!(
    PayloadSha256,
    "^[0-9a-f]{64}$",
    "The SHA-256 of the payload bytes, in lowercase hex."
);

/// What `char::is_control` refuses (Unicode's Cc: C0, DEL and C1), which is what
/// `fluxa_core`'s text fields check.
pub(crate) const NO_CONTROL_CHARS: &str = "^[^\\x00-\\x1f\\x7f-\\x9f]*$";

/// The alphabet of base64url without padding, which is what a cursor is.
pub(crate) const CURSOR_PATTERN: &str = "^[A-Za-z0-9_-]*$";

/// An event type as a filter takes it: the rules of [`fluxa_core::EventType::parse`].
pub enum EventType {}

impl PartialSchema for EventType {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1))
            .max_length(Some(fluxa_core::EventType::MAX_CHARS))
            .pattern(Some(NO_CONTROL_CHARS))
            .description(Some(
                "An event type, e.g. `order.created`: 1 to 128 characters, no control \
                 characters.",
            ))
            .into()
    }
}

impl ToSchema for EventType {}

/// A source as a filter takes it: the rules of [`fluxa_core::Source::parse`].
pub enum Source {}

impl PartialSchema for Source {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .max_length(Some(fluxa_core::Source::MAX_CHARS))
            .pattern(Some(NO_CONTROL_CHARS))
            .description(Some(
                "The producer: at most 256 characters, no control characters.",
            ))
            .into()
    }
}

impl ToSchema for Source {}

/// A paging cursor: only its alphabet and length can be described; whether this server
/// made it, for this listing and these filters, is checked when it is used.
pub enum Cursor {}

impl PartialSchema for Cursor {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1))
            .max_length(Some(fluxa_core::cursor::MAX_CURSOR_LEN))
            .pattern(Some(CURSOR_PATTERN))
            .description(Some(
                "The `next_cursor` of the previous page, passed back with the same filters. \
                 Opaque: any other value, or one from another listing or other filters, \
                 is 400 `validation_error` naming `cursor`.",
            ))
            .into()
    }
}

impl ToSchema for Cursor {}

/// The codes a processing failure is recorded with, listed from
/// [`fluxa_core::ErrorCode::ALL`], which is also what a filter is parsed against.
pub enum ProcessingErrorCode {}

impl PartialSchema for ProcessingErrorCode {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(
                fluxa_core::ErrorCode::ALL.map(fluxa_core::ErrorCode::as_str),
            ))
            .description(Some(
                "A processing error code, as dead letters and status records carry it.",
            ))
            .into()
    }
}

impl ToSchema for ProcessingErrorCode {}

/// How a dead letter failed, from [`fluxa_core::FailureClass`].
pub enum ErrorClass {}

impl PartialSchema for ErrorClass {
    fn schema() -> RefOr<Schema> {
        use fluxa_core::FailureClass;
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(
                [FailureClass::Permanent, FailureClass::RetriesExhausted].map(FailureClass::as_str),
            ))
            .description(Some(
                "`permanent`: the processor decided the message can never succeed; \
                 `retries_exhausted`: it failed transiently on every allowed receive.",
            ))
            .into()
    }
}

impl ToSchema for ErrorClass {}

/// Where a payload travels, from [`fluxa_core::PayloadMode`]: inside the queue message, or in
/// the blob store (over 256 KiB).
pub enum PayloadMode {}

impl PartialSchema for PayloadMode {
    fn schema() -> RefOr<Schema> {
        use fluxa_core::PayloadMode;
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(
                [PayloadMode::Inline, PayloadMode::Blob].map(PayloadMode::as_str),
            ))
            .description(Some(
                "`INLINE`: the payload travelled inside the queue message; `S3`: over 256 KiB, \
                 it travelled in the blob store.",
            ))
            .into()
    }
}

impl ToSchema for PayloadMode {}

/// An idempotency record's status, from [`fluxa_store::Status`].
pub enum ProcessingStatus {}

impl PartialSchema for ProcessingStatus {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(
                fluxa_store::Status::ALL.map(fluxa_store::Status::as_str),
            ))
            .into()
    }
}

impl ToSchema for ProcessingStatus {}
