//! `fluxa import FILE|-`: bulk ingest from NDJSON, one event in the ingest shape per line.
//!
//! Every line goes through `POST /v1/events/batch`, the same handler and validation as any
//! producer's events (in-process, or on `--server`), a thousand lines per request and a few
//! requests in flight. The summary names every rejected line by number. Re-running after an
//! interruption is safe: an event already accepted is accepted again and the processor drops
//! the duplicate.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::http::{Method, StatusCode};
use bytes::Bytes;
use clap::Args;
use futures::StreamExt;
use serde_json::{json, Value};

use crate::client::{success, Client};
use crate::output::{self, Format};

#[derive(Args, Debug, Clone)]
pub struct ImportArgs {
    /// The NDJSON file to import, or `-` for stdin.
    pub file: PathBuf,
    /// Events per request (1 to 1000).
    #[arg(long, default_value_t = 1000)]
    pub batch_size: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
}

/// A request's body stays under this, well inside the default `max_batch_bytes` (32 MiB); a
/// longer line goes alone.
const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;

/// Attempts per batch while the server answers 503 (an outage or a load limit).
const ATTEMPTS: u32 = 8;

/// Lines of input that one request carries: their numbers (from 1), and the request body
/// built as they are read.
struct Batch {
    /// The input line number of each event in `body`, in order.
    lines: Vec<u64>,
    /// `{"events":[line,line,…` without its closing `]}`: the lines are JSON already, so they
    /// are spliced in as they are, never re-serialized (the payload bytes must stay exactly as
    /// written), and the body is built once, without keeping the lines a second time.
    body: String,
    /// Lines refused before sending (not JSON); they are reported with the batch.
    refused: Vec<Rejected>,
    bytes: u64,
}

#[derive(Clone, Debug)]
struct Rejected {
    line: u64,
    code: String,
    message: String,
}

/// What importing one batch came to.
struct Outcome {
    accepted: u64,
    rejected: Vec<Rejected>,
    bytes: u64,
}

pub async fn run(client: &Client, args: ImportArgs, format: Format) -> anyhow::Result<Summary> {
    anyhow::ensure!(
        (1..=1000).contains(&args.batch_size),
        "--batch-size must be 1 to 1000"
    );
    anyhow::ensure!(
        (1..=64).contains(&args.concurrency),
        "--concurrency must be 1 to 64"
    );
    let (input, size): (Box<dyn Read + Send>, Option<u64>) = if args.file.as_os_str() == "-" {
        (Box::new(std::io::stdin()), None)
    } else {
        let file = std::fs::File::open(&args.file)
            .with_context(|| format!("cannot open {}", args.file.display()))?;
        let size = file.metadata().map(|m| m.len()).ok();
        (Box::new(file), size)
    };
    let progress = match size {
        Some(size) => {
            let bar = output::bar(size, "importing");
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} {msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} \
                     ({binary_bytes_per_sec}, eta {eta})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar
        }
        None => output::spinner("importing (bytes)"),
    };

    // Lines are read and batched on a thread of their own, so reading overlaps sending.
    let (batches_tx, batches_rx) = tokio::sync::mpsc::channel::<anyhow::Result<Batch>>(8);
    let batch_size = args.batch_size;
    let reader = std::thread::spawn(move || read_batches(input, batch_size, &batches_tx));
    let batches = Box::pin(futures::stream::unfold(batches_rx, |mut rx| async move {
        rx.recv().await.map(|batch| (batch, rx))
    }));
    let started = Instant::now();
    let mut summary = Summary::default();
    let mut failure = None;
    {
        // In a block of its own: leaving it drops the receiver, which stops the reader at
        // its next send if the import ended early.
        let mut outcomes = std::pin::pin!(batches
            .map(|batch| async move { send_batch(client, batch?).await })
            .buffered(args.concurrency));
        while let Some(outcome) = outcomes.next().await {
            match outcome {
                Ok(outcome) => {
                    progress.inc(outcome.bytes);
                    summary.accepted += outcome.accepted;
                    summary.rejected.extend(outcome.rejected);
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
    }
    progress.finish_and_clear();
    // The reader stops at the next send once the receiver is gone.
    let _ = reader.join();
    summary.seconds = started.elapsed().as_secs_f64();
    summary.rejected.sort_by_key(|r| r.line);
    tracing::info!(
        target: "fluxa::audit",
        action = "import",
        file = %args.file.display(),
        accepted = summary.accepted,
        rejected = summary.rejected.len(),
        completed = failure.is_none(),
        "operator action"
    );
    summary.print(format);
    match failure {
        None => Ok(summary),
        Some(e) => Err(e.context(
            "import stopped; the lines counted as accepted are queued, and running the same \
             import again is safe (duplicates are dropped)",
        )),
    }
}

/// Reads `input` into batches of at most `batch_size` lines and [`MAX_BATCH_BYTES`]; blank
/// lines are skipped, and a line that is not JSON is refused here with the `invalid_json` the
/// API would give it (in a batch, one such line would refuse the whole request).
fn read_batches(
    input: Box<dyn Read + Send>,
    batch_size: usize,
    tx: &tokio::sync::mpsc::Sender<anyhow::Result<Batch>>,
) {
    let mut reader = BufReader::with_capacity(1 << 20, input);
    let mut batch = Batch::empty();
    let mut line_no = 0u64;
    let mut buffer = String::new();
    loop {
        buffer.clear();
        let n_read = match reader.read_line(&mut buffer) {
            Ok(n) => n,
            Err(e) => {
                let _ = tx.blocking_send(Err(anyhow::Error::new(e)
                    .context(format!("cannot read line {} (is it UTF-8?)", line_no + 1))));
                return;
            }
        };
        if n_read == 0 {
            break;
        }
        line_no += 1;
        batch.bytes += n_read as u64;
        let line = buffer.trim();
        if line.is_empty() {
            continue;
        }
        if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(line) {
            batch.refused.push(Rejected {
                line: line_no,
                code: fluxa_api::error::ApiErrorCode::InvalidJson
                    .as_str()
                    .to_owned(),
                message: format!("not JSON: {e}"),
            });
            continue;
        }
        let full = batch.lines.len() >= batch_size
            || batch.body.len() + line.len() + 3 > MAX_BATCH_BYTES && !batch.lines.is_empty();
        if full {
            let ready = std::mem::replace(&mut batch, Batch::empty());
            if tx.blocking_send(Ok(ready)).is_err() {
                return;
            }
        }
        batch.push(line_no, line);
    }
    if !batch.lines.is_empty() || !batch.refused.is_empty() || batch.bytes > 0 {
        let _ = tx.blocking_send(Ok(batch));
    }
}

impl Batch {
    fn empty() -> Self {
        Self {
            lines: Vec::new(),
            body: String::from("{\"events\":["),
            refused: Vec::new(),
            bytes: 0,
        }
    }

    fn push(&mut self, line_no: u64, line: &str) {
        if !self.lines.is_empty() {
            self.body.push(',');
        }
        self.body.push_str(line);
        self.lines.push(line_no);
    }

    /// The request body, closed.
    fn take_body(&mut self) -> Bytes {
        let mut body = std::mem::take(&mut self.body);
        body.push_str("]}");
        Bytes::from(body)
    }
}

/// Sends one batch, retrying while the server answers 503, and maps each result back to
/// its line.
async fn send_batch(client: &Client, mut batch: Batch) -> anyhow::Result<Outcome> {
    let mut outcome = Outcome {
        accepted: 0,
        rejected: batch.refused.clone(),
        bytes: batch.bytes,
    };
    if batch.lines.is_empty() {
        return Ok(outcome);
    }
    let body = batch.take_body();
    let mut attempt = 0;
    let reply = loop {
        attempt += 1;
        let reply = client
            .send(Method::POST, "/v1/events/batch", Some(body.clone()))
            .await;
        let retry = match &reply {
            Ok(reply) => reply.status == StatusCode::SERVICE_UNAVAILABLE,
            Err(_) => true,
        };
        if !retry || attempt >= ATTEMPTS {
            break reply?;
        }
        tokio::time::sleep(Duration::from_millis(250 << attempt.min(5))).await;
    };
    let first_line = batch.lines[0];
    let reply = match success(reply) {
        Ok(reply) => reply,
        // The request as a whole was refused (one line too large, say): every line in it
        // gets that answer; a 5xx after the retries stops the import.
        Err(failure) if failure.status.is_client_error() => {
            outcome
                .rejected
                .extend(batch.lines.iter().map(|line| Rejected {
                    line: *line,
                    code: failure.code.clone(),
                    message: failure.message.clone(),
                }));
            return Ok(outcome);
        }
        Err(failure) => {
            return Err(anyhow::Error::new(failure)
                .context(format!("the batch starting at line {first_line} failed")))
        }
    };
    let answer: Value =
        serde_json::from_slice(&reply.body).context("the batch answer is not JSON")?;
    let results = answer["results"]
        .as_array()
        .context("the batch answer has no results")?;
    for result in results {
        let Some(line) = result["index"]
            .as_u64()
            .and_then(|index| batch.lines.get(index as usize))
        else {
            anyhow::bail!("the batch answer names an item it was not sent");
        };
        if result["status"].as_u64() == Some(202) {
            outcome.accepted += 1;
        } else if result["status"].as_u64() == Some(503) {
            // The queue took the others but not this one: an outage, not bad input.
            anyhow::bail!("line {line} could not be queued (503); the queue is unavailable");
        } else {
            outcome.rejected.push(Rejected {
                line: *line,
                code: result["error"]["code"]
                    .as_str()
                    .unwrap_or("unknown")
                    .to_owned(),
                message: result["error"]["message"].as_str().unwrap_or("").to_owned(),
            });
        }
    }
    Ok(outcome)
}

/// What an import did.
#[derive(Default)]
pub struct Summary {
    pub accepted: u64,
    rejected: Vec<Rejected>,
    seconds: f64,
}

/// Rejected lines a table shows before it says how many more there are.
const SHOWN_REJECTIONS: usize = 50;

impl Summary {
    pub fn n_rejected(&self) -> usize {
        self.rejected.len()
    }

    fn print(&self, format: Format) {
        let rate = self.accepted as f64 / self.seconds.max(1e-9);
        let totals = json!({
            "accepted": self.accepted,
            "rejected": self.rejected.len(),
            "seconds": (self.seconds * 1000.0).round() / 1000.0,
            "events_per_second": rate.round(),
        });
        let rows: Vec<Value> = self
            .rejected
            .iter()
            .map(|r| json!({"line": r.line, "code": r.code, "message": r.message}))
            .collect();
        match format {
            Format::Json => {
                for row in &rows {
                    println!("{row}");
                }
                println!("{}", json!({ "summary": totals }));
            }
            Format::Table => {
                if !rows.is_empty() {
                    let shown = rows.len().min(SHOWN_REJECTIONS);
                    output::print_rows(
                        format,
                        &[("line", "line"), ("code", "code"), ("message", "message")],
                        &rows[..shown],
                    );
                    if rows.len() > shown {
                        println!(
                            "… and {} more rejected lines (--json lists them all)",
                            rows.len() - shown
                        );
                    }
                }
                println!(
                    "imported: {} accepted, {} rejected in {:.1} s ({:.0} events/s)",
                    self.accepted,
                    self.rejected.len(),
                    self.seconds,
                    rate
                );
            }
        }
    }
}
