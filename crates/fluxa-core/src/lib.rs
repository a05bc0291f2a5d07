//! Fluxa's domain model: everything about an event that can be decided without IO.
//!
//! # Layout
//! - [`ids`]: validated identifiers (`EventId`, `CorrelationId`) and other field newtypes.
//! - [`ingest`]: turns a request body into a [`ingest::ValidatedEvent`] that borrows the exact
//!   payload bytes, or an [`ingest::IngestError`] that maps onto the HTTP contract's error codes.
//! - [`hash`]: the SHA-256 of payload bytes, as a lower-case hex newtype.
//! - [`task`]: the versioned queue message, the only type that crosses process boundaries.
//! - [`failure`]: error codes and classes shared by the processor, the queue and the API.
//! - [`cursor`]: the opaque paging cursors of the listing APIs.
//!
//! **Architecture Invariant:** this crate does no IO (no tokio, no sqlx, no HTTP), so every rule
//! in it is unit-testable and identical on every host (self-hosted, Lambda, tests).

pub mod cursor;
pub mod failure;
pub mod hash;
pub mod ids;
pub mod ingest;
pub mod task;
pub mod time;

pub use failure::{ErrorCode, FailureClass, FailureInfo};
pub use hash::PayloadHash;
pub use ids::{CorrelationId, EventId, EventType, Source};
pub use task::{BlobRef, EventMessageV1, FluxaTask, PayloadMode};

/// Payloads of at most this many bytes travel inside the queue message (seed invariant 4);
/// larger ones go to the blob store and only their key travels (seed invariant 5).
pub const INLINE_PAYLOAD_LIMIT: usize = 256 * 1024;

/// Chooses where a payload of `payload_size` bytes travels.
pub fn payload_mode_for(payload_size: usize) -> PayloadMode {
    if payload_size <= INLINE_PAYLOAD_LIMIT {
        PayloadMode::Inline
    } else {
        PayloadMode::Blob
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_of_exactly_256_kib_stays_inline_and_one_byte_more_goes_to_the_blob_store() {
        assert_eq!(payload_mode_for(0), PayloadMode::Inline);
        assert_eq!(payload_mode_for(262_144), PayloadMode::Inline);
        assert_eq!(payload_mode_for(262_145), PayloadMode::Blob);
    }
}
