//! The queue boundary, cut so that pull hosts (the self-hosted workers) and push hosts (a Lambda
//! fed by SQS) use the same seams:
//! - [`Producer`]: what ingest needs (send).
//! - [`Consumer`]: what a processor host needs (receive, and apply a disposition).
//! - [`DeadLetterAdmin`]: an optional capability for operators (depth, DLQ list, show, redrive).
//! - [`BlobReferences`]: an optional capability for the blob sweeper (does a message still
//!   point at this blob?). Backends that cannot answer it (SQS) leave orphans to a lifecycle
//!   rule on the bucket instead.
//!
//! Backends: embedded SQLite (`fluxa-sqlite`) and PostgreSQL (`fluxa-postgres`) implement all
//! four. Semantics every backend keeps:
//! - `send` reports per message; a message is acknowledged only once it is durable.
//! - `receive` hides each returned message for the visibility timeout and counts the receive; a
//!   message whose receiver dies reappears after the timeout.
//! - A message that has already been received `max_receives` times is not delivered again: the
//!   receive that meets it moves it to the dead-letter queue as `retries_exhausted` (SQS
//!   redrive) and reports it in [`Received::exhausted`]. A receive costs O(batch): it never scans
//!   for exhausted messages.
//! - Settling with a stale receipt never settles someone else's newer receive on the database
//!   backends (SQS makes a weaker promise, so the core conformance checks do not require it).

#[cfg(feature = "conformance")]
pub mod conformance;
mod receivers;

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use fluxa_core::{FailureClass, FailureInfo};

pub use receivers::Receivers;

/// Queue failures. Every one of them is transient from the processor's point of view; the
/// variants tell an operator-facing caller (the admin API) an outage from a refusal.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The backend is out of reach or cannot work right now (no connection, a full disk, an
    /// I/O error): the same request may succeed later.
    #[error("queue unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The backend answered but refused the request (a constraint, a value it cannot store):
    /// it says nothing about the queue being down, and the same request will fail again.
    #[error("queue refused a request")]
    Rejected(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl Error {
    pub fn unavailable(source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Unavailable(Box::new(source))
    }

    pub fn rejected(source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Rejected(Box::new(source))
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

/// A send that did not fully succeed: `sent[i]` is message `i`'s id if that message was sent
/// (a partial batch on SQS), `None` if it was not. Database backends send all or nothing.
#[derive(Debug, thiserror::Error)]
#[error("{source}")]
pub struct SendError {
    pub sent: Vec<Option<String>>,
    #[source]
    pub source: Error,
}

/// A received message, hidden from other receivers until settled or timed out.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub message_id: String,
    /// Proves this receive is the current one.
    pub receipt: String,
    /// Shared, so the processor can hand slices of it (an inline payload) to the store
    /// without copying.
    pub body: Bytes,
    pub attributes: MessageAttributes,
    /// How many times the message has been received, this receive included.
    pub receive_count: u32,
    /// How many more times the queue will deliver this message after this receive before its
    /// redrive dead-letters it: 0 means a transient failure now is its last (`u32::MAX` when
    /// the queue has no limit).
    pub receives_left: u32,
    pub enqueued_at: DateTime<Utc>,
}

/// A message the queue's redrive moved to the DLQ as `retries_exhausted`: its last receiver
/// may have died without recording anything, so the store should hear of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExhaustedNotice {
    pub event_id: String,
    pub error: FailureInfo,
}

/// What one receive got.
#[derive(Debug, Default)]
pub struct Received {
    pub deliveries: Vec<Delivery>,
    /// Messages this receive dead-lettered as `retries_exhausted` (those with an event id).
    pub exhausted: Vec<ExhaustedNotice>,
}

/// A message waiting in the queue, as shown by [`DeadLetterAdmin::peek`] (operators, tests).
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
    pub error_class: FailureClass,
    pub error: FailureInfo,
    pub receive_count: u32,
    pub enqueued_at: DateTime<Utc>,
    pub first_failure_at: DateTime<Utc>,
    pub last_failure_at: DateTime<Utc>,
    pub dead_lettered_at: DateTime<Utc>,
    /// The original message body, byte for byte.
    pub body: Vec<u8>,
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

/// Ingest's side of the queue.
#[async_trait]
pub trait Producer: Send + Sync + 'static {
    /// Enqueues messages and returns their ids once durable, in order. On failure, says which
    /// messages were sent anyway (none, on the database backends).
    async fn send(&self, messages: Vec<NewMessage>) -> Result<Vec<String>, SendError>;

    /// Readiness: the backend answers.
    async fn ping(&self) -> Result<()>;
}

/// A processor host's side of the queue.
#[async_trait]
pub trait Consumer: Send + Sync + 'static {
    /// Receives up to `max_messages`, waiting up to `wait` for the first one (long polling).
    async fn receive(&self, max_messages: usize, wait: Duration) -> Result<Received>;

    /// Settles deliveries as done, in one round trip.
    async fn delete_many(&self, deliveries: &[&Delivery]) -> Result<()>;

    /// Makes a delivery visible again after `delay`, remembering why it failed.
    async fn retry_later(
        &self,
        delivery: &Delivery,
        delay: Duration,
        error: &FailureInfo,
    ) -> Result<()>;

    /// Moves a delivery to the dead-letter queue as a permanent failure.
    async fn dead_letter(&self, delivery: &Delivery, error: &FailureInfo) -> Result<()>;
}

/// Operators' view of the queue and its DLQ (an optional capability).
#[async_trait]
pub trait DeadLetterAdmin: Send + Sync + 'static {
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
}

/// Whether a queued or dead-lettered message points at a blob (an optional capability).
#[async_trait]
pub trait BlobReferences: Send + Sync + 'static {
    /// The blob sweeper deletes only blobs for which this is false.
    async fn references_blob(&self, key: &str) -> Result<bool>;
}
