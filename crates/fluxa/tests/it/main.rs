//! Fluxa's black-box suite: every test starts the real `fluxa` binary on port 0 with its own
//! data directory and talks HTTP to it, like a user would.
//!
//! The backend under test is chosen in one place, `helpers::Backend` (env `FLUXA_TEST_BACKEND`),
//! so the same tests run against every backend combination the binary supports.

mod helpers;
mod reliability;

mod aws;
mod cluster;
mod dlq;
mod faults;
mod hostile;
mod ids;
mod ingest;
mod invariants;
mod operations;
mod operator;
mod query;
mod security;
