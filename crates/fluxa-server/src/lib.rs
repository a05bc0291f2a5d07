//! The self-hosted runtime: [`Config`] in, backends opened, then the API and/or the worker pool
//! run until the shutdown token is cancelled. The `fluxa` binary is a thin CLI over this.
//!
//! Entry points take a pre-bound listener and a `CancellationToken`, so tests can bind port 0
//! and stop a server without signals. [`http`] is the connection loop the API is served with:
//! timeouts, the connection cap and the shutdown deadline.

use std::sync::Arc;

use anyhow::Context;
use fluxa_api::AppState;
use fluxa_host::{backend_name, open_validated, Backends, Config, ValidatedConfig};
use fluxa_processor::Processor;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub mod http;

/// What the API's handlers share, over opened backends: the server's, and the CLI's when it
/// works on the backends directly (it then runs the same handlers in-process).
pub fn app_state(validated: &ValidatedConfig, backends: &Backends) -> AppState {
    AppState {
        queue: Some(Arc::clone(&backends.queue.producer)),
        dead_letters: Some(Arc::clone(&backends.queue.dead_letters)),
        blobs: Some(backends.blobs.clone()),
        reader: Some(Arc::clone(&backends.reader)),
        store_admin: Some(Arc::clone(&backends.store_admin)),
        limits: validated.config().limits,
        tokens: Arc::new(validated.tokens().to_vec()),
        metrics: fluxa_telemetry::metrics_handle(),
    }
}

/// Clients the kernel holds, connected but not yet accepted. tokio's `bind` asks for 128, which
/// a burst fills while the server is at its connection cap; past it new clients' handshakes are
/// dropped and retried only after seconds. Linux caps it at `net.core.somaxconn` (4096).
const LISTEN_BACKLOG: u32 = 1024;

/// Binds the configured address.
pub async fn bind(config: &Config) -> anyhow::Result<TcpListener> {
    let bound = || -> std::io::Result<TcpListener> {
        let socket = if config.bind.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // As `TcpListener::bind` does, so a restart does not wait out TIME_WAIT.
        #[cfg(unix)]
        socket.set_reuseaddr(true)?;
        socket.bind(config.bind)?;
        socket.listen(LISTEN_BACKLOG)
    };
    bound().with_context(|| format!("failed to bind {}", config.bind))
}

/// Runs Fluxa until `shutdown` is cancelled, then stops accepting, finishes in-flight requests
/// and messages, and returns. Requests get at most `shutdown_grace` to finish; connections
/// still open after it are dropped, so a stalled client cannot keep the process alive.
pub async fn run(
    validated: ValidatedConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let config = validated.config();
    // Before anything opens a file: the database and the connection cap both need the room.
    let file_limit = http::raise_file_limit();
    let backends = open_validated(&validated).await?;
    let local_addr = listener
        .local_addr()
        .context("the listener has no local address")?;

    let serve_options = http::ServeOptions::new(config, file_limit);
    let api = config.role.runs_api().then(|| {
        let app = fluxa_api::app(app_state(&validated, &backends));
        let shutdown = shutdown.clone();
        http::serve(listener, app, serve_options, shutdown)
    });
    let workers = config.role.runs_workers().then(|| {
        let processor = Processor::new(
            Arc::clone(&backends.store),
            backends.blobs.clone(),
            config.into(),
        );
        // With an SQS queue nothing can tell an orphan from a waiting message's payload: the
        // bucket's lifecycle rule collects orphans, and listing the bucket every interval
        // would only cost requests.
        let sweeper = backends.dead_letter_drain.is_none().then(|| {
            fluxa_processor::run_blob_sweeper(
                Arc::clone(&backends.queue.blob_references),
                backends.blobs.clone(),
                config.blob_sweep_interval,
                config.blob_grace,
                shutdown.clone(),
            )
        });
        let sweeper = async move {
            if let Some(sweeper) = sweeper {
                sweeper.await;
            }
        };
        let pruner = fluxa_processor::run_pruner(
            Arc::clone(&backends.store_admin),
            Arc::clone(&backends.queue.dead_letters),
            config.into(),
            shutdown.clone(),
        );
        let drain = backends.dead_letter_drain.clone().map(|drain| {
            fluxa_host::sqs::run_dead_letter_drain(
                drain.queue,
                drain.table,
                Arc::clone(&backends.store),
                Arc::clone(&backends.store_admin),
                shutdown.clone(),
            )
        });
        let drain = async move {
            if let Some(drain) = drain {
                drain.await;
            }
        };
        let workers = fluxa_processor::run_workers(
            processor,
            Arc::clone(&backends.queue.consumer),
            config.workers,
            config.batch_size,
            shutdown.clone(),
        );
        async move {
            tokio::join!(workers, sweeper, pruner, drain);
        }
    });

    tracing::info!(
        addr = %local_addr,
        role = ?config.role,
        workers = if config.role.runs_workers() { config.workers } else { 0 },
        data_dir = %config.data_dir.display(),
        backend = backend_name(config),
        max_connections = serve_options.max_connections,
        "fluxa started"
    );
    let api_task = async {
        match api {
            Some(api) => api.await,
            None => shutdown.cancelled().await,
        }
    };
    let worker_task = async {
        if let Some(workers) = workers {
            workers.await;
        }
    };
    tokio::join!(api_task, worker_task);
    tracing::info!("fluxa stopped");
    Ok(())
}

/// Cancels `token` on SIGINT or SIGTERM.
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(e) => {
                    tracing::warn!(error.message = %e, "cannot listen for SIGTERM");
                    std::future::pending::<()>().await;
                }
            }
        };
        #[cfg(not(unix))]
        let terminate = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => tracing::info!("SIGINT received; shutting down"),
            () = terminate => tracing::info!("SIGTERM received; shutting down"),
        }
        token.cancel();
    });
}
