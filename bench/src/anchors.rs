//! The anchors every Fluxa figure is divided by, measured in the same run on the same machine
//! and disk: what the database alone does with rows shaped like Fluxa's `events` rows.
//!
//! - pgbench, 16 clients, `synchronous_commit = on`, 1 row per transaction and 100 rows per
//!   transaction, in a scratch database it creates and drops.
//! - SQLite, WAL, `synchronous = FULL`, one writer, 100 rows per transaction (and 1, the cost
//!   of one durable commit, which anchors the embedded latencies).

use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection, PgPool};

use crate::load::PAYLOAD_BYTES;
use crate::server::{admin_pool, bench_database_name, with_database};

/// pgbench's clients and threads, as the issue fixes them.
const PGBENCH_CLIENTS: usize = 16;
const PGBENCH_THREADS: usize = 2;

/// Stands in for a SHA-256 hex digest, so rows have Fluxa's width without hashing in SQL.
const FAKE_SHA256: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

/// One pgbench run.
pub struct Pgbench {
    pub rows_per_s: f64,
    /// pgbench's average transaction latency.
    pub latency_ms: f64,
}

/// The two PostgreSQL anchors: 1 row per transaction, then 100.
pub struct PgAnchors {
    pub one_row: Pgbench,
    pub hundred_rows: Pgbench,
}

/// Runs pgbench for `seconds` per anchor against a scratch database beside the bench database
/// of `url`, dropping it afterwards whatever happened.
pub async fn pgbench_anchors(
    pgbench: &Path,
    url: &str,
    seconds: u64,
    scratch: &Path,
) -> anyhow::Result<PgAnchors> {
    let name = format!("{}_anchor", bench_database_name(url)?);
    let admin = admin_pool(url).await?;
    let drop_anchor = format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#);
    sqlx::query(&drop_anchor).execute(&admin).await?;
    sqlx::query(&format!(r#"CREATE DATABASE "{name}""#))
        .execute(&admin)
        .await
        .with_context(|| format!("cannot create the anchor database {name}"))?;
    let anchor_url = with_database(url, &name)?;
    let result = run_pgbench_anchors(pgbench, &anchor_url, seconds, scratch).await;
    sqlx::query(&drop_anchor).execute(&admin).await?;
    admin.close().await;
    result
}

async fn run_pgbench_anchors(
    pgbench: &Path,
    anchor_url: &str,
    seconds: u64,
    scratch: &Path,
) -> anyhow::Result<PgAnchors> {
    let pool =
        PgPool::connect_with(sqlx::postgres::PgConnectOptions::from_str(anchor_url)?).await?;
    // The shape of Fluxa's `events` table (crates/fluxa-postgres/migrations): same columns,
    // same primary key, nothing else.
    sqlx::query(
        r"CREATE TABLE events (
            event_id        text PRIMARY KEY,
            event_type      text NOT NULL,
            source          text,
            occurred_at     timestamptz,
            payload         bytea NOT NULL,
            payload_sha256  text NOT NULL,
            payload_size    bigint NOT NULL,
            payload_mode    text NOT NULL CHECK (payload_mode IN ('INLINE', 'S3')),
            correlation_id  text NOT NULL,
            received_at     timestamptz NOT NULL,
            processed_at    timestamptz NOT NULL
        )",
    )
    .execute(&pool)
    .await?;
    let one_row = run_pgbench(pgbench, anchor_url, 1, seconds, scratch).await?;
    sqlx::query("TRUNCATE events").execute(&pool).await?;
    let hundred_rows = run_pgbench(pgbench, anchor_url, 100, seconds, scratch).await?;
    pool.close().await;
    Ok(PgAnchors {
        one_row,
        hundred_rows,
    })
}

/// The pgbench script inserting `rows` rows per transaction, with ids unique per transaction
/// (client id and a random 40-bit number) and per row (`generate_series`).
fn pgbench_script(rows: usize) -> String {
    let columns = "event_id, event_type, source, occurred_at, payload, payload_sha256, \
                   payload_size, payload_mode, correlation_id, received_at, processed_at";
    let row = |id: &str| {
        format!(
            "{id}, 'bench.event', 'pgbench', now(), convert_to(repeat('x', {PAYLOAD_BYTES}), 'UTF8'), \
             '{FAKE_SHA256}', {PAYLOAD_BYTES}, 'INLINE', 'pgbench-' || (:client_id)::text, now(), now()"
        )
    };
    let id = "'pgbench-' || (:client_id)::text || '-' || (:r)::text";
    let insert = if rows == 1 {
        format!("INSERT INTO events ({columns})\nVALUES ({})", row(id))
    } else {
        format!(
            "INSERT INTO events ({columns})\nSELECT {}\nFROM generate_series(1, {rows}) AS g",
            row(&format!("{id} || '-' || g::text"))
        )
    };
    format!("\\set r random(1, 1000000000000)\n{insert}\nON CONFLICT (event_id) DO NOTHING;\n")
}

async fn run_pgbench(
    pgbench: &Path,
    anchor_url: &str,
    rows: usize,
    seconds: u64,
    scratch: &Path,
) -> anyhow::Result<Pgbench> {
    let script = scratch.join(format!("pgbench-{rows}-rows.sql"));
    std::fs::write(&script, pgbench_script(rows))?;
    // The password travels in the environment, never on a command line others can read.
    let mut url = reqwest::Url::parse(anchor_url)?;
    let password = url.password().map(str::to_owned);
    let _ = url.set_password(None);
    let mut command = tokio::process::Command::new(pgbench);
    command
        .args(["-n", "-M", "prepared"])
        .args(["-c", &PGBENCH_CLIENTS.to_string()])
        .args(["-j", &PGBENCH_THREADS.to_string()])
        .args(["-T", &seconds.to_string()])
        .arg("-f")
        .arg(&script)
        .arg(url.as_str())
        .env("PGOPTIONS", "-c synchronous_commit=on");
    if let Some(password) = password {
        command.env("PGPASSWORD", password);
    }
    let output = command
        .output()
        .await
        .with_context(|| format!("cannot run {}", pgbench.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "pgbench failed ({}): {}{}",
            output.status,
            stdout,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let report = parse_pgbench(&stdout)?;
    Ok(Pgbench {
        rows_per_s: report.tps * rows as f64,
        latency_ms: report.latency_ms,
    })
}

struct PgbenchReport {
    tps: f64,
    latency_ms: f64,
}

/// Reads pgbench's summary; a run with failed transactions is no anchor.
fn parse_pgbench(stdout: &str) -> anyhow::Result<PgbenchReport> {
    let number_after = |prefix: &str| {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<f64>().ok())
    };
    if let Some(failed) = number_after("number of failed transactions:") {
        if failed > 0.0 {
            bail!("pgbench had {failed} failed transactions:\n{stdout}");
        }
    }
    Ok(PgbenchReport {
        tps: number_after("tps =").context("no `tps =` in pgbench's output")?,
        latency_ms: number_after("latency average =")
            .context("no `latency average =` in pgbench's output")?,
    })
}

/// Rows per second that one SQLite writer commits in transactions of `rows` rows, for
/// `duration`, in a new file under `dir`.
pub async fn sqlite_rows_per_second(
    dir: &Path,
    rows: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    let mut connection = SqliteConnectOptions::new()
        .filename(dir.join(format!("anchor-{rows}-rows.db")))
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .connect()
        .await?;
    // The shape of Fluxa's embedded `events` table (crates/fluxa-sqlite/migrations/store).
    sqlx::query(
        r"CREATE TABLE events (
            event_id        TEXT PRIMARY KEY NOT NULL,
            event_type      TEXT NOT NULL,
            source          TEXT,
            occurred_at     TEXT,
            payload         BLOB NOT NULL,
            payload_sha256  TEXT NOT NULL,
            payload_size    INTEGER NOT NULL,
            payload_mode    TEXT NOT NULL CHECK (payload_mode IN ('INLINE', 'S3')),
            correlation_id  TEXT NOT NULL,
            received_at     INTEGER NOT NULL,
            processed_at    INTEGER NOT NULL
        ) STRICT",
    )
    .execute(&mut connection)
    .await?;
    // One multi-row statement is one transaction, as pgbench's INSERT … SELECT is.
    let row = format!(
        "(?, 'bench.event', 'sqlite', '2026-01-01T00:00:00Z', ?, '{FAKE_SHA256}', \
         {PAYLOAD_BYTES}, 'INLINE', 'sqlite', ?, ?)"
    );
    let sql = format!(
        "INSERT INTO events (event_id, event_type, source, occurred_at, payload, payload_sha256, \
         payload_size, payload_mode, correlation_id, received_at, processed_at) VALUES {} \
         ON CONFLICT (event_id) DO NOTHING",
        vec![row; rows].join(", ")
    );
    let payload = vec![b'x'; PAYLOAD_BYTES];
    let started = Instant::now();
    let mut n_rows = 0_usize;
    while started.elapsed() < duration {
        let now_ms = i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis(),
        )?;
        let mut query = sqlx::query(&sql);
        for _ in 0..rows {
            query = query
                .bind(format!("sqlite-{n_rows}"))
                .bind(&payload)
                .bind(now_ms)
                .bind(now_ms);
            n_rows += 1;
        }
        query.execute(&mut connection).await?;
    }
    let rate = n_rows as f64 / started.elapsed().as_secs_f64();
    connection.close().await?;
    Ok(rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pgbench_summary_gives_tps_and_latency() {
        let stdout = "number of transactions actually processed: 5000\n\
                      number of failed transactions: 0 (0.000%)\n\
                      latency average = 12.345 ms\n\
                      initial connection time = 20.1 ms\n\
                      tps = 1296.123456 (without initial connection time)\n";
        let report = parse_pgbench(stdout).unwrap();
        assert_eq!(report.tps, 1296.123456);
        assert_eq!(report.latency_ms, 12.345);
    }

    #[test]
    fn a_pgbench_run_with_failed_transactions_is_no_anchor() {
        let stdout = "number of failed transactions: 3 (0.100%)\n\
                      latency average = 1 ms\ntps = 10 (without initial connection time)\n";
        assert!(parse_pgbench(stdout).is_err());
    }

    #[test]
    fn the_batch_script_makes_a_hundred_distinct_ids_per_transaction() {
        let script = pgbench_script(100);
        assert!(script.starts_with("\\set r random(1, 1000000000000)\n"));
        assert!(script.contains("|| '-' || g::text"));
        assert!(script.contains("generate_series(1, 100)"));
        assert!(script
            .trim_end()
            .ends_with("ON CONFLICT (event_id) DO NOTHING;"));
        assert!(!pgbench_script(1).contains("generate_series"));
    }
}
