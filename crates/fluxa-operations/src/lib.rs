//! Fluxa's operator and ingest protocols, host-neutral: each is a function over the backend
//! traits (`Producer`, `DeadLetterAdmin`, `StoreAdmin`) and the `BlobStore`, so the HTTP
//! handlers, the CLI (through the API), the Lambda functions and the coming webhook route call
//! the same code, and its rules are tested without HTTP.
//! - [`accept`]: the payload to the blob store first (when it is too large to travel inline),
//!   then the messages to the queue, then the blobs of messages that were not sent deleted.
//! - [`erase`]: the event's dead letters, its row (or a tombstone) and its blobs.
//! - [`redrive`]: dead letters back to the queue, under the one cutoff rule
//!   ([`fluxa_queue::redrive_cutoff`]).
//!
//! Each change an operator makes is logged once here, under the `fluxa::audit` target.

mod accept;
mod erase;
mod redrive;

pub use accept::{accept, AcceptError, Acceptance, Accepted};
pub use erase::{erase, EraseError, ErasureReport};
pub use redrive::{redrive, RedriveOptions, RedriveReport};
