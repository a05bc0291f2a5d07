//! The relational store boundary. Two traits, so that the query API can be handed something that
//! cannot write (seed invariant 7):
//! - [`Store`]: the processor's idempotency claims and event inserts (seed invariants 1 and 2).
//! - [`EventReader`]: read-only lookups for the query API.
//!
//! Backends (`fluxa-sqlite`, later PostgreSQL) implement both over their own migrations.
//!
//! **Architecture Invariant:** `events.event_id` is the primary key and inserts use
//! `ON CONFLICT (event_id) DO NOTHING`; an event row is written only by [`Store::complete`],
//! in the same transaction that marks its idempotency record `processed`.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use fluxa_core::{CorrelationId, EventId, FailureInfo, PayloadHash, PayloadMode};

/// Store failures; all transient from the processor's point of view.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("store unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("store holds a malformed record: {0}")]
    Corrupt(String),
}

impl Error {
    pub fn unavailable(source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Unavailable(Box::new(source))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The idempotency record's status, as the status API shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Processing,
    Processed,
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Processing => "processing",
            Self::Processed => "processed",
            Self::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "processing" => Some(Self::Processing),
            "processed" => Some(Self::Processed),
            "failed" => Some(Self::Failed),
            _ => None,
        }
    }
}

/// What the processor asks for before doing any work on an event.
#[derive(Clone, Debug)]
pub struct ClaimRequest<'a> {
    pub event_id: &'a EventId,
    pub payload_sha256: &'a PayloadHash,
    pub correlation_id: &'a CorrelationId,
    pub lease: Duration,
}

/// Proof that this worker, and no other, may finish an event until `expires_at`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub event_id: EventId,
    pub token: String,
    pub attempts: u32,
    pub expires_at: DateTime<Utc>,
}

/// The answer to a claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// Go ahead: no one has processed this event and no live lease is held on it.
    Acquired(Lease),
    /// The event is already stored, with this payload hash.
    AlreadyProcessed { payload_sha256: String },
    /// Another worker holds a live lease until `until`.
    Busy { until: DateTime<Utc> },
}

/// What [`Store::complete`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Completion {
    /// The event row was inserted and the record marked `processed`.
    Stored,
    /// Our lease was taken over (it had expired); nothing was written.
    LeaseLost,
}

/// An event ready to be persisted.
#[derive(Clone, Debug)]
pub struct NewEvent {
    pub event_id: EventId,
    pub event_type: String,
    pub source: Option<String>,
    pub occurred_at: Option<DateTime<Utc>>,
    pub payload: Vec<u8>,
    pub payload_sha256: PayloadHash,
    pub payload_mode: PayloadMode,
    pub correlation_id: CorrelationId,
    pub received_at: DateTime<Utc>,
}

/// A persisted event, as the query API returns it.
#[derive(Clone, Debug)]
pub struct StoredEvent {
    pub event_id: String,
    pub event_type: String,
    pub source: Option<String>,
    pub occurred_at: Option<DateTime<Utc>>,
    pub payload: Vec<u8>,
    pub payload_sha256: String,
    pub payload_size: u64,
    pub payload_mode: String,
    pub correlation_id: String,
    pub received_at: DateTime<Utc>,
    pub processed_at: DateTime<Utc>,
}

/// An idempotency record, as the status API returns it.
#[derive(Clone, Debug)]
pub struct EventStatus {
    pub event_id: String,
    pub status: Status,
    pub attempts: u32,
    pub last_error: Option<FailureInfo>,
    pub correlation_id: Option<String>,
    pub updated_at: DateTime<Utc>,
}

/// The processor's view of the store.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Atomically checks the idempotency record and, if no one else may be working on the
    /// event, takes a lease on it (creating the record, or taking over an expired or failed
    /// one; `attempts` counts the takes).
    async fn claim(&self, request: ClaimRequest<'_>) -> Result<Claim>;

    /// In one transaction: inserts the event (`ON CONFLICT DO NOTHING`) and marks the record
    /// `processed`, provided the lease is still ours.
    async fn complete(&self, lease: &Lease, event: NewEvent) -> Result<Completion>;

    /// Marks a leased record `failed` with `error` (a permanent failure, or the last transient
    /// one before the queue gives up).
    async fn fail(&self, lease: &Lease, error: &FailureInfo) -> Result<()>;

    /// Gives a lease back after a transient failure so the next delivery can take over at once;
    /// the record stays `processing` and remembers `error`.
    async fn release(&self, lease: &Lease, error: &FailureInfo) -> Result<()>;

    /// Records an error against an event id without holding a lease: creates a `failed` record
    /// if none exists, and otherwise only sets `last_error`, never touching a `processed`
    /// record's status or a live lease (used for conflicts and undecodable messages).
    async fn record_error(&self, event_id: &EventId, error: &FailureInfo) -> Result<()>;

    /// The queue gave up on a message of this event (`retries_exhausted`): marks a `processing`
    /// record whose lease is no longer live `failed` with `error`, so a worker that died on the
    /// last attempt does not leave the event looking in progress forever. Any other record is
    /// left alone.
    async fn mark_exhausted(&self, event_id: &EventId, error: &FailureInfo) -> Result<()>;

    async fn ping(&self) -> Result<()>;
}

/// The query API's view of the store: reads only.
#[async_trait]
pub trait EventReader: Send + Sync + 'static {
    async fn event(&self, event_id: &EventId) -> Result<Option<StoredEvent>>;
    async fn status(&self, event_id: &EventId) -> Result<Option<EventStatus>>;
    async fn ping(&self) -> Result<()>;
}
