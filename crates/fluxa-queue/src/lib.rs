//! The queue boundary: a small trait with SQS semantics that every backend implements
//! (embedded SQLite in `fluxa-sqlite`; PostgreSQL and SQS later), plus the types that cross it.
//!
//! Semantics every backend keeps:
//! - `send` returns only once the messages are durable (the API answers 202 after it).
//! - `receive` hides each returned message for the visibility timeout and counts the receive; a
//!   message whose receiver dies reappears after the timeout.
//! - A message that has already been received `max_receives` times is not delivered again: the
//!   next receive moves it to the dead-letter queue as `retries_exhausted` (SQS redrive).
//! - `delete`, `retry_later` and `dead_letter` act only if the delivery's receipt is still the
//!   current one, so a slow worker can never settle a message someone else now holds.

#[cfg(feature = "conformance")]
pub mod conformance;
mod receivers;

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use fluxa_core::FailureInfo;

pub use receivers::Receivers;

/// Queue failures. Every one of them is transient from the processor's point of view.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("queue unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("queue holds a malformed record: {0}")]
    Corrupt(String),
}

impl Error {
    pub fn unavailable(source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Unavailable(Box::new(source))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Ids that travel beside the body (SQS message attributes), so they are known even when the
/// body cannot be parsed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MessageAttributes {
    pub event_id: Option<String>,
    pub correlation_id: Option<String>,
    /// The blob holding the payload, for messages that carry only its key.
    pub blob_key: Option<String>,
}

/// A message to enqueue.
#[derive(Clone, Debug)]
pub struct NewMessage {
    pub body: Vec<u8>,
    pub attributes: MessageAttributes,
}

/// A received message, hidden from other receivers until settled or timed out.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub message_id: String,
    /// Proves this receive is the current one; settling with a stale receipt does nothing.
    pub receipt: String,
    pub body: Vec<u8>,
    pub attributes: MessageAttributes,
    /// How many times the message has been received, this receive included.
    pub receive_count: u32,
    pub enqueued_at: DateTime<Utc>,
}

/// A message waiting in the queue, as shown by [`Queue::peek`] (for operators and tests).
#[derive(Clone, Debug)]
pub struct PendingMessage {
    pub message_id: String,
    pub body: Vec<u8>,
    pub attributes: MessageAttributes,
    pub receive_count: u32,
    pub enqueued_at: DateTime<Utc>,
}

/// A dead-lettered message with everything the contract's section 4 asks an entry to show.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    pub id: String,
    pub attributes: MessageAttributes,
    /// `permanent` or `retries_exhausted`.
    pub error_class: String,
    pub error: FailureInfo,
    pub receive_count: u32,
    pub enqueued_at: DateTime<Utc>,
    pub first_failure_at: DateTime<Utc>,
    pub last_failure_at: DateTime<Utc>,
    pub dead_lettered_at: DateTime<Utc>,
    /// The original message body, byte for byte.
    pub body: Vec<u8>,
}

/// A message the queue's redrive just moved to the DLQ as `retries_exhausted`: its last
/// receiver may have died without recording anything, so the store should hear of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExhaustedNotice {
    pub event_id: String,
    pub error: FailureInfo,
}

/// Which dead letters to move back to the queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedriveSelector {
    All,
    EventId(String),
    Id(String),
}

/// Message counts, for `/metrics` and operators.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueDepth {
    /// Visible now or waiting out a retry delay.
    pub pending: u64,
    /// Received and not yet settled.
    pub in_flight: u64,
    pub dead_letters: u64,
}

/// A durable queue with a dead-letter queue beside it.
#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Enqueues messages atomically (all or none) and returns their ids once durable.
    async fn send(&self, messages: Vec<NewMessage>) -> Result<Vec<String>>;

    /// Receives up to `max_messages`, waiting up to `wait` for the first one (long polling).
    async fn receive(&self, max_messages: usize, wait: Duration) -> Result<Vec<Delivery>>;

    /// Settles a delivery as done.
    async fn delete(&self, delivery: &Delivery) -> Result<()>;

    /// Settles several deliveries as done; backends override this with one round trip.
    async fn delete_many(&self, deliveries: &[Delivery]) -> Result<()> {
        for delivery in deliveries {
            self.delete(delivery).await?;
        }
        Ok(())
    }

    /// Makes a delivery visible again after `delay`, remembering why it failed.
    async fn retry_later(
        &self,
        delivery: &Delivery,
        delay: Duration,
        error: &FailureInfo,
    ) -> Result<()>;

    /// Moves a delivery to the dead-letter queue as a permanent failure.
    async fn dead_letter(&self, delivery: &Delivery, error: &FailureInfo) -> Result<()>;

    async fn depth(&self) -> Result<QueueDepth>;

    /// The oldest waiting messages, without receiving them.
    async fn peek(&self, limit: usize) -> Result<Vec<PendingMessage>>;

    /// Dead letters, oldest first, optionally only those of one event id.
    async fn list_dead_letters(
        &self,
        limit: usize,
        event_id: Option<&str>,
    ) -> Result<Vec<DeadLetter>>;

    async fn get_dead_letter(&self, id: &str) -> Result<Option<DeadLetter>>;

    /// Moves dead letters back to the queue with a fresh receive count; returns how many.
    async fn redrive(&self, selector: &RedriveSelector) -> Result<u64>;

    /// Whether any waiting, in-flight or dead-lettered message points at the blob `key`; the
    /// blob sweeper deletes only blobs that none does.
    async fn references_blob(&self, key: &str) -> Result<bool>;

    /// Readiness: the backend answers.
    async fn ping(&self) -> Result<()>;

    /// Drains the notices of messages this handle's receives dead-lettered as
    /// `retries_exhausted` (only those with an event id). Backends whose redrive happens
    /// elsewhere (SQS) have none.
    fn take_exhausted(&self) -> Vec<ExhaustedNotice> {
        Vec::new()
    }
}
