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
use fluxa_core::ids::DeadLetterId;
use fluxa_core::{CorrelationId, ErrorCode, EventId, EventType, FailureClass, FailureInfo};

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
    /// A dead letter's own record does not parse (an unknown error code, an id that cannot be
    /// one): it was damaged outside Fluxa, which writes only typed values. The backend
    /// answered, so this is no outage; nothing guesses a value in its place.
    #[error("queue holds a malformed record: {0}")]
    Corrupt(String),
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
///
/// They are hints; the body is authoritative (the processor decodes it either way). So every
/// backend reads an attribute that does not parse as its type as absent, wherever it comes
/// from: on SQS attributes come from whoever sent the message, and in a database row only
/// damage could make one unparsable. A receive, a peek or a dead-letter listing never fails
/// over a hint, and an exhaustion notice without a valid event id is not made.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MessageAttributes {
    pub event_id: Option<EventId>,
    pub correlation_id: Option<CorrelationId>,
    /// The blob holding the payload, for messages that carry only its key. Left as text: it
    /// names an object in the blob store, which checks keys itself.
    pub blob_key: Option<String>,
    /// The event's type, so dead letters can be filtered by it without parsing bodies.
    pub event_type: Option<EventType>,
}

impl MessageAttributes {
    /// Attributes read from outside text: each value that does not parse (or is absent) is
    /// `None`, by the rule above.
    pub fn parse_lenient(
        event_id: Option<&str>,
        correlation_id: Option<&str>,
        blob_key: Option<String>,
        event_type: Option<&str>,
    ) -> Self {
        Self {
            event_id: event_id.and_then(|id| EventId::parse(id).ok()),
            correlation_id: correlation_id.and_then(|id| CorrelationId::parse(id).ok()),
            blob_key,
            event_type: event_type.and_then(|t| EventType::parse(t).ok()),
        }
    }
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
/// may have died without recording anything, so the store should hear of it. Only messages
/// whose `event_id` attribute is a valid id get one (see [`MessageAttributes`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExhaustedNotice {
    pub event_id: EventId,
    pub error: FailureInfo,
}

/// What one receive got.
#[derive(Debug, Default)]
pub struct Received {
    pub deliveries: Vec<Delivery>,
    /// Messages this receive dead-lettered as `retries_exhausted` (those with a valid event id).
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
    pub id: DeadLetterId,
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

/// Which dead letters a listing, a count or a redrive selects (contract section 4): every
/// filter is optional, and they combine with AND.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeadLetterFilter {
    pub event_id: Option<String>,
    pub error_code: Option<ErrorCode>,
    pub error_class: Option<FailureClass>,
    pub event_type: Option<String>,
    /// Inclusive lower bound on `dead_lettered_at`.
    pub since: Option<DateTime<Utc>>,
    /// Exclusive upper bound on `dead_lettered_at`.
    pub until: Option<DateTime<Utc>>,
}

/// The one cutoff rule of a redrive: it takes only what was dead-lettered before it started
/// (and before the `until` it was given). So an entry that fails again while a redrive runs is
/// not picked up a second time, a redrive always ends, and a dry run's count and the moves
/// that follow agree. Every redrive applies it: [`DeadLetterFilter::as_of`] for the servers, and
/// the CLI for the `until` it fixes before its chunked requests.
pub fn redrive_cutoff(until: Option<DateTime<Utc>>, started: DateTime<Utc>) -> DateTime<Utc> {
    until.map_or(started, |until| until.min(started))
}

impl DeadLetterFilter {
    /// This filter as a redrive that started at `started` sees it ([`redrive_cutoff`]).
    pub fn as_of(&self, started: DateTime<Utc>) -> Self {
        Self {
            until: Some(redrive_cutoff(self.until, started)),
            ..self.clone()
        }
    }
}

/// Where a page of dead letters ends: listings run in `(dead_lettered_at, id)` order and the
/// next page starts strictly after this key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetterPosition {
    pub dead_lettered_at: DateTime<Utc>,
    pub id: String,
}

/// One page of dead letters.
#[derive(Clone, Debug)]
pub struct DeadLetterPage {
    pub dead_letters: Vec<DeadLetter>,
    /// The last entry's position when the page is full (more may follow); `None` at the end.
    pub next: Option<DeadLetterPosition>,
}

/// Which dead letters to move back to the queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedriveSelector {
    /// Every dead letter the filter matches (the default filter matches all).
    Filter(DeadLetterFilter),
    /// One dead letter by its id.
    Id(DeadLetterId),
}

/// What [`DeadLetterAdmin::purge_event`] found for one event id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventPurge {
    /// Dead letters deleted.
    pub dead_letters: u64,
    /// The blobs those dead letters pointed at, each once, for the caller to delete.
    pub blob_keys: Vec<String>,
    /// Messages of the event still waiting in the queue (left there: their delivery finds
    /// the event erased).
    pub queued: u64,
    /// The queue cannot be searched by event id (SQS): some of the event's messages may be
    /// waiting there unseen, so an erasure must leave a tombstone either way.
    pub queue_unsearchable: bool,
}

/// Message counts, for `/metrics` and operators; read without scanning the queue or the DLQ.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueDepth {
    /// Visible now or waiting out a retry delay.
    pub pending: u64,
    /// Received and not yet settled.
    pub in_flight: u64,
    pub dead_letters: u64,
    /// When the oldest message still in the queue was sent.
    pub oldest_enqueued_at: Option<DateTime<Utc>>,
    /// Dead letters per error code, in code order; codes with none are left out.
    pub dead_letters_by_code: Vec<(String, u64)>,
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
    /// The gauges, from counters the backend keeps and bounded index reads: its cost does not
    /// grow with the backlog or the DLQ.
    async fn depth(&self) -> Result<QueueDepth>;

    /// The oldest waiting messages, without receiving them.
    async fn peek(&self, limit: usize) -> Result<Vec<PendingMessage>>;

    /// Up to `limit` dead letters matching `filter`, oldest `dead_lettered_at` first (ties by
    /// id), strictly after `after`.
    async fn list_dead_letters(
        &self,
        filter: &DeadLetterFilter,
        after: Option<&DeadLetterPosition>,
        limit: usize,
    ) -> Result<DeadLetterPage>;

    /// How many dead letters match `filter` (a redrive's dry run).
    async fn count_dead_letters(&self, filter: &DeadLetterFilter) -> Result<u64>;

    async fn get_dead_letter(&self, id: &DeadLetterId) -> Result<Option<DeadLetter>>;

    /// Moves up to `limit` of the selected dead letters, oldest first, back to the queue with
    /// a fresh receive count, in one transaction; returns how many. [`redrive_in_batches`]
    /// moves any number this way.
    async fn redrive(&self, selector: &RedriveSelector, limit: usize) -> Result<u64>;

    /// Deletes every dead letter of `event_id` and counts its messages still queued (an
    /// erasure).
    async fn purge_event(&self, event_id: &str) -> Result<EventPurge>;

    /// Deletes up to `limit` dead letters dead-lettered before `before`, oldest first; returns
    /// how many (their blobs are left to the blob sweeper). Safe to run from many replicas.
    async fn prune_dead_letters(&self, before: DateTime<Utc>, limit: usize) -> Result<u64>;
}

/// Dead letters one [`DeadLetterAdmin::redrive`] call moves: small enough that a transaction
/// stays short, large enough that a big redrive is not all round trips.
pub const REDRIVE_BATCH: usize = 500;

/// Redrives everything `filter` matches that was dead-lettered before this call began, in
/// transactions of at most `batch` entries, calling `progress` with the running total after
/// each. Entries that fail again and come back to the DLQ while it runs are not picked up a
/// second time, so it always ends; running it again is safe (what moved is no longer there).
pub async fn redrive_in_batches(
    admin: &dyn DeadLetterAdmin,
    filter: &DeadLetterFilter,
    batch: usize,
    mut progress: impl FnMut(u64) + Send,
) -> Result<u64> {
    let selector = RedriveSelector::Filter(filter.as_of(Utc::now()));
    let mut total = 0;
    loop {
        let moved = admin.redrive(&selector, batch.max(1)).await?;
        total += moved;
        progress(total);
        if moved < batch.max(1) as u64 {
            return Ok(total);
        }
    }
}

/// How a database queue treats its messages: the settings every Fluxa queue backend takes
/// (an SQS queue has them as its own attributes and redrive policy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueSettings {
    /// How long a received message stays hidden before it is delivered again.
    pub visibility_timeout: Duration,
    /// Receives after which the next receive dead-letters the message as `retries_exhausted`.
    pub max_receives: u32,
}

/// Whether a queued or dead-lettered message points at a blob (an optional capability).
#[async_trait]
pub trait BlobReferences: Send + Sync + 'static {
    /// The blob sweeper deletes only blobs for which this is false.
    async fn references_blob(&self, key: &str) -> Result<bool>;
}
