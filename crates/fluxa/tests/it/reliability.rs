//! The figures that fault and hostile-input tests report for docs/RELIABILITY.md. A test
//! calls [`record`] once it has checked its outcome; when `FLUXA_RELIABILITY_OUT` names a file
//! (as `cargo xtask reliability` sets it), the trial is appended there as one JSON line, and
//! otherwise nothing is written. The doc is generated from those lines, so its figures are
//! what the tests measured, never typed by hand.

use std::io::Write;

use crate::helpers::Backend;

/// One fault or hostile-input trial and what came of it.
pub struct Trial<'a> {
    /// A stable short name, one per test (the doc's row).
    pub scenario: &'a str,
    /// What was tried, in a sentence.
    pub tried: &'a str,
    /// Requests sent (or connections opened, for connection-level scenarios).
    pub requests: u64,
    /// Events answered 202 (or items 202 in a batch).
    pub accepted: u64,
    /// Accepted events that were not stored, byte-identical, in the end.
    pub lost: u64,
    /// Accepted events stored more than once.
    pub duplicated: u64,
    /// What the server did, e.g. "closed after 1.1 s" or "408 after 2.0 s".
    pub observed: String,
}

/// Appends `trial` to `FLUXA_RELIABILITY_OUT`, if set.
pub fn record(trial: Trial<'_>) {
    let Some(path) = std::env::var_os("FLUXA_RELIABILITY_OUT") else {
        return;
    };
    let line = serde_json::json!({
        "backend": match Backend::from_env() {
            Backend::Embedded => "embedded",
            Backend::Postgres => "postgres",
            Backend::PostgresS3 => "postgres-s3",
            Backend::SqsS3 => "sqs-s3",
        },
        "scenario": trial.scenario,
        "tried": trial.tried,
        "requests": trial.requests,
        "accepted": trial.accepted,
        "lost": trial.lost,
        "duplicated": trial.duplicated,
        "observed": trial.observed,
    });
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .expect("open FLUXA_RELIABILITY_OUT");
    // One write per line: parallel tests append whole lines.
    file.write_all(format!("{line}\n").as_bytes())
        .expect("write FLUXA_RELIABILITY_OUT");
}
