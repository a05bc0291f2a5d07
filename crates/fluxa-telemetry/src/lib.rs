//! Telemetry set-up, done once per process by each binary's `main`.
//!
//! Logs: one JSON object per line on stdout with top-level `timestamp`, `level`, `message`,
//! `target`, every field of the enclosing spans (so `correlation_id` and `event_id` appear on
//! every line about a request or a message) and the event's own fields. Code that logs must not
//! repeat a field its span already carries, or the line would hold the key twice.
//!
//! Metrics: a process-wide Prometheus recorder whose text rendering `/metrics` serves.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Default filter when `RUST_LOG` is unset: our crates at info (a target directive matches by
/// prefix, so `fluxa` covers every `fluxa_*` crate), dependencies at warn.
const DEFAULT_FILTER: &str = "warn,fluxa=info";

/// Where log lines go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogOutput {
    /// The server's choice: logs are its output.
    Stdout,
    /// For CLI commands whose stdout is their result.
    Stderr,
    /// For the operator commands: stderr, and only warnings and the audit lines of what the
    /// operator did (the handlers they run in-process would otherwise log every request).
    Operator,
}

/// [`LogOutput::Operator`]'s default filter.
const OPERATOR_FILTER: &str = "warn,fluxa::audit=info";

/// Installs the JSON log subscriber and a panic hook that logs panics as JSON error lines.
/// Calling it twice is harmless (the second call does nothing).
pub fn init_logging(output: LogOutput) {
    let default = match output {
        LogOutput::Operator => OPERATOR_FILTER,
        LogOutput::Stdout | LogOutput::Stderr => DEFAULT_FILTER,
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let writer: fn() -> Box<dyn std::io::Write> = match output {
        LogOutput::Stdout => || Box::new(std::io::stdout()),
        LogOutput::Stderr | LogOutput::Operator => || Box::new(std::io::stderr()),
    };
    let mut json = json_subscriber::JsonLayer::new(writer);
    json.with_timer("timestamp", tracing_subscriber::fmt::time::SystemTime);
    json.with_level("level");
    json.with_target("target");
    json.with_top_level_flattened_span_list();
    json.with_flattened_event();
    if tracing_subscriber::registry()
        .with(filter)
        .with(json)
        .try_init()
        .is_ok()
    {
        install_panic_hook();
    }
}

/// Replaces the default panic printout (plain text on stderr) with one JSON error line. The
/// panic message is logged, never the values in scope, so payloads and secrets stay out.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let payload = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".to_owned());
        tracing::error!(panic.location = %location, panic.message = %payload, "a task panicked");
    }));
}

/// Buckets for latency histograms, in seconds: 1 ms to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The process-wide Prometheus recorder, installed on first use.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), LATENCY_BUCKETS)
                .expect("constant buckets are valid")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (an embedding application's); our
            // handle then renders only what it saw, which is still correct output.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}
