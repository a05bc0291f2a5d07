//! The relational store boundary. Two traits, so that the query API can be handed something that
//! cannot write (seed invariant 7):
//! - [`Store`]: the processor's idempotency records and event inserts (seed invariants 1 and 2),
//!   batch-first: [`Store::apply`] takes a whole batch of [`Write`]s in one transaction.
//! - [`EventReader`]: read-only lookups for the query API.
//!
//! Backends (`fluxa-sqlite`, `fluxa-postgres`) implement both over their own migrations.
//!
//! **Architecture Invariant:** `events.event_id` is the primary key and inserts use
//! `ON CONFLICT (event_id) DO NOTHING`; an event row is written only by a [`WriteAction::Store`],
//! in the same transaction that marks its idempotency record `processed`.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use fluxa_core::{
    CorrelationId, EventId, EventType, FailureInfo, PayloadHash, PayloadMode, Source,
};

/// Store failures; all transient from the processor's point of view.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database is out of reach or cannot work right now (no connection, a full disk, an
    /// I/O error, a failed commit): the same statements may succeed later, and retrying them
    /// one by one now would only fail each in turn.
    #[error("store unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The database answered but refused a statement for what it asked (a constraint, a missing
    /// table, a value it cannot store): retrying the writes one by one may isolate the one it
    /// refuses. Never a sign that the database is down.
    #[error("store refused a statement")]
    Rejected(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A stored value does not parse as its domain type (an unknown error code, a malformed
    /// hash): the record was damaged outside Fluxa, since Fluxa writes only typed values. The
    /// database answered, so this is no outage; nothing guesses a value in its place.
    #[error("store holds a malformed record: {0}")]
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

/// The idempotency record's status, as the status API shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Processing,
    Processed,
    Failed,
    /// An operator erased the event: its row is gone and no payload hash is kept; a late
    /// redelivery of its message must never store it again (contract section 8).
    Erased,
}

impl Status {
    pub const ALL: [Self; 4] = [
        Self::Processing,
        Self::Processed,
        Self::Failed,
        Self::Erased,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Processing => "processing",
            Self::Processed => "processed",
            Self::Failed => "failed",
            Self::Erased => "erased",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "processing" => Some(Self::Processing),
            "processed" => Some(Self::Processed),
            "failed" => Some(Self::Failed),
            "erased" => Some(Self::Erased),
            _ => None,
        }
    }
}

#[cfg(feature = "conformance")]
pub mod conformance;
mod plan;

pub use plan::{decide, Decision, RecordState};

/// What a [`Write`] does to an event's idempotency record.
#[derive(Clone, Debug)]
pub enum WriteAction {
    /// Take a lease, because the work happens outside a transaction (fetching a blob).
    Lease(Duration),
    /// Insert the event (`ON CONFLICT DO NOTHING`) and mark the record `processed`.
    Store(NewEvent),
    /// Mark the record `failed` (a permanent failure, or the last transient one).
    Fail(FailureInfo),
    /// A transient failure: the record stays (or becomes) `processing` with an expired lease,
    /// so the next delivery may take over at once, and remembers `error`. With a lease, gives
    /// it back; without one, counts a failed attempt on an event that could not be stored.
    Release(FailureInfo),
}

/// One change to one event's idempotency record.
#[derive(Clone, Debug)]
pub struct Write {
    pub event_id: EventId,
    pub payload_sha256: PayloadHash,
    pub correlation_id: CorrelationId,
    /// The lease this write finishes. `None` claims the record in the same transaction: it
    /// applies if no record exists, or the record is `failed`, or its lease has expired (a
    /// take-over, which counts an attempt); it does not apply to a `processed` record or a
    /// live lease. That is how an inline event is claimed and stored with one commit.
    pub lease: Option<Lease>,
    pub action: WriteAction,
}

/// Proof that this worker, and no other, may finish an event while the lease lasts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub event_id: EventId,
    pub token: String,
    /// How many times the record has been claimed, this claim included.
    pub attempts: u32,
}

/// What happened to one [`Write`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteResult {
    /// The write took effect. A [`WriteAction::Lease`] returns its new lease.
    Applied { lease: Option<Lease> },
    /// The event is already stored, with this payload hash; nothing was written.
    AlreadyProcessed { payload_sha256: PayloadHash },
    /// Another worker holds a live lease until `until`; nothing was written.
    Busy { until: DateTime<Utc> },
    /// The write's lease is no longer the record's (it expired and was taken over); nothing
    /// was written.
    LeaseLost,
    /// The event was erased by an operator; nothing was written, and nothing ever will be.
    Erased,
}

/// The event columns a [`WriteAction::Store`] inserts beside the write's ids and hash.
#[derive(Clone, Debug)]
pub struct NewEvent {
    pub event_type: EventType,
    pub source: Option<Source>,
    pub occurred_at: Option<DateTime<Utc>>,
    /// The exact payload bytes; shared with the queue message they were read from.
    pub payload: Bytes,
    pub payload_mode: PayloadMode,
    pub received_at: DateTime<Utc>,
}

/// A persisted event, as the query API returns it. Each backend's row mapper parses every
/// column into its domain type once; a value that does not parse is [`Error::Corrupt`], never
/// a default.
#[derive(Clone, Debug)]
pub struct StoredEvent {
    pub event_id: EventId,
    pub event_type: EventType,
    pub source: Option<Source>,
    pub occurred_at: Option<DateTime<Utc>>,
    /// The exact payload bytes; `None` when a listing did not ask for them.
    pub payload: Option<Vec<u8>>,
    pub payload_sha256: PayloadHash,
    pub payload_size: u64,
    pub payload_mode: PayloadMode,
    pub correlation_id: CorrelationId,
    pub received_at: DateTime<Utc>,
    pub processed_at: DateTime<Utc>,
}

/// An idempotency record, as the status API returns it (parsed as [`StoredEvent`] is).
#[derive(Clone, Debug)]
pub struct EventStatus {
    pub event_id: EventId,
    pub status: Status,
    pub attempts: u32,
    pub last_error: Option<FailureInfo>,
    /// `None` for a record written without a message to take it from (an erasure's tombstone,
    /// an undecodable message's note).
    pub correlation_id: Option<CorrelationId>,
    pub updated_at: DateTime<Utc>,
}

/// The processor's view of the store.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies `writes` in order in one transaction and returns one result per write. Each
    /// write sees the ones before it (two writes for one event id are decided one after the
    /// other). An `Err` means nothing was written; the caller may retry the writes one by one
    /// to isolate a write that the database refuses.
    async fn apply(&self, writes: Vec<Write>) -> Result<Vec<WriteResult>>;

    /// Records an error against an event id without holding a lease: creates a `failed` record
    /// if none exists, and otherwise only sets `last_error`, never touching a `processed`
    /// record's status or a live lease (used for conflicts and undecodable messages).
    async fn record_error(&self, event_id: &EventId, error: &FailureInfo) -> Result<()>;

    /// The queue gave up on messages of these events (`retries_exhausted`): marks each
    /// `processing` record whose lease is no longer live `failed` with its error, so a worker
    /// that died on the last attempt does not leave the event looking in progress forever. Any
    /// other record is left alone. One statement or transaction for the lot.
    async fn mark_exhausted(&self, exhausted: &[(EventId, FailureInfo)]) -> Result<()>;

    async fn ping(&self) -> Result<()>;
}

/// Which events a listing returns (contract section 2): every filter is optional, and they
/// combine with AND.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventFilter {
    pub event_type: Option<EventType>,
    pub source: Option<Source>,
    /// Inclusive lower bound on `received_at`.
    pub since: Option<DateTime<Utc>>,
    /// Exclusive upper bound on `received_at`.
    pub until: Option<DateTime<Utc>>,
}

/// Where a page of events ends: listings run in `(received_at, event_id)` order, and the next
/// page starts strictly after this key (keyset paging, so a growing table never makes a page
/// skip or repeat a row that was there when paging began).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventPosition {
    pub received_at: DateTime<Utc>,
    pub event_id: EventId,
}

/// One page of a listing.
#[derive(Clone, Debug)]
pub struct EventPage {
    pub events: Vec<StoredEvent>,
    /// The last event's position when the page is full (more may follow); `None` at the end.
    pub next: Option<EventPosition>,
}

/// The query API's view of the store: reads only.
#[async_trait]
pub trait EventReader: Send + Sync + 'static {
    async fn event(&self, event_id: &EventId) -> Result<Option<StoredEvent>>;
    async fn status(&self, event_id: &EventId) -> Result<Option<EventStatus>>;
    async fn ping(&self) -> Result<()>;

    /// Up to `limit` events matching `filter`, oldest `received_at` first (ties by
    /// `event_id`), strictly after `after`. Served by an index for every filter combination,
    /// so a page costs the same whatever the table's size; `include_payload` false leaves
    /// `payload` `None` and does not read it.
    async fn list_events(
        &self,
        filter: &EventFilter,
        after: Option<&EventPosition>,
        limit: usize,
        include_payload: bool,
    ) -> Result<EventPage>;
}

/// An idempotency record in full, as the operator API shows it (contract section 8).
#[derive(Clone, Debug)]
pub struct IdempotencyRecord {
    pub event_id: EventId,
    pub status: Status,
    pub attempts: u32,
    /// `None` for an erased record (no hash is kept) or one that never learnt it.
    pub payload_sha256: Option<PayloadHash>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub last_error: Option<FailureInfo>,
    pub correlation_id: Option<CorrelationId>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What [`StoreAdmin::evict`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Eviction {
    /// A `processing` or `failed` record was deleted; the next delivery starts fresh.
    Evicted,
    /// The record is `processed` or `erased` and stays: evicting it would let a redelivery
    /// store the event twice, or bring an erased one back.
    Refused(Status),
    NotFound,
}

/// What [`StoreAdmin::erase`] found and removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Erasure {
    /// An event row was deleted.
    pub event_deleted: bool,
    /// An idempotency record existed before (it is now `erased`).
    pub had_record: bool,
}

/// Operators' and the retention pruner's view of the store: everything that deletes.
#[async_trait]
pub trait StoreAdmin: Send + Sync + 'static {
    async fn idempotency_record(&self, event_id: &EventId) -> Result<Option<IdempotencyRecord>>;

    /// Deletes a `processing` or `failed` record; never a `processed` or `erased` one.
    async fn evict(&self, event_id: &EventId) -> Result<Eviction>;

    /// In one transaction: deletes the event row (and so its payload), and turns the
    /// idempotency record into an `erased` tombstone without a payload hash, creating one
    /// when there is none and `always_tombstone` is set (the event is still in the queue) or
    /// a row was deleted. With nothing to erase and `always_tombstone` false, writes nothing.
    /// A live lease on the event is broken: its holder's write then finds the tombstone.
    async fn erase(&self, event_id: &EventId, always_tombstone: bool) -> Result<Erasure>;

    /// Deletes up to `limit` events received before `before`, oldest first; returns how many.
    /// Safe to run from many replicas at once.
    async fn prune_events(&self, before: DateTime<Utc>, limit: usize) -> Result<u64>;

    /// Deletes up to `limit` idempotency records last updated before `before` whose event row
    /// is gone (pruned, erased, or never stored); a `processing` record with a live lease is
    /// never deleted. Returns how many. Safe to run from many replicas at once.
    async fn prune_idempotency(&self, before: DateTime<Utc>, limit: usize) -> Result<u64>;
}
