//! The HTTP/1 connection loop that [`crate::run`] serves the API with, in place of
//! `axum::serve`, for the protections section 7 of the contract asks of a server (the request
//! side of them, body rate, concurrency and body memory, lives in `fluxa-api`):
//!
//! - **Header and keep-alive timeouts**, kept by a watchdog beside each connection. hyper's own
//!   `header_read_timeout` restarts the moment a keep-alive connection goes idle, so it would
//!   close idle connections after the header timeout (10 s) instead of the keep-alive one
//!   (60 s). The watchdog instead knows the connection's phase: waiting for headers (since the
//!   connection opened, or since the first byte of a later request), busy with requests (no
//!   connection deadline: the body rate guard covers a slow body), or idle between requests.
//! - **A cap on open connections** below the open-file limit, which [`raise_file_limit`] first
//!   raises to the hard limit. At the cap the loop stops accepting, so new clients wait in the
//!   kernel's accept queue instead of making `accept()` fail for want of descriptors.
//! - **`accept()` errors** (`EMFILE`, `ENFILE`, …) back off from 10 ms, doubling to 1 s, are
//!   logged at most once per 5 s with a count of those held back, and are counted in
//!   `fluxa_accept_errors_total{kind}`.
//! - **Shutdown**: stop accepting, let requests in flight finish (hyper closes each connection
//!   once its request is answered; connections with no request close at once), and after the
//!   grace period drop whatever is left, so a stalled client cannot hold the process.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use fluxa_host::Config;

/// How the loop treats connections; see [`ServeOptions::new`].
#[derive(Clone, Copy, Debug)]
pub struct ServeOptions {
    /// A request's headers must be in within this, from the connection's start or from the
    /// first byte of a later request on it.
    pub header_read_timeout: Duration,
    /// A connection idle between requests is closed after this.
    pub keep_alive_timeout: Duration,
    /// Open connections at most.
    pub max_connections: usize,
    /// How long in-flight requests may take to finish once shutdown starts.
    pub shutdown_grace: Duration,
}

/// Descriptors kept back from connections whatever else is configured: the runtime's own
/// (epoll, eventfd, signal pipe), the listener, standard streams and logs, and the database's
/// files (SQLite keeps each pool connection's database, WAL and shared-memory files open) or
/// sockets (PostgreSQL).
const FIXED_RESERVE: u64 = 128;

/// The connection cap when the platform has no open-file limit to derive it from.
const CAP_WITHOUT_FILE_LIMIT: usize = 10_000;

impl ServeOptions {
    /// The options `config` asks for. An automatic connection cap is the open-file limit less a
    /// reserve: [`FIXED_RESERVE`], plus one descriptor per worker and per concurrent request,
    /// each of which may have a blob file open; the reserve never takes more than half the
    /// limit, so a small limit still serves.
    pub fn new(config: &Config, file_limit: Option<u64>) -> Self {
        let workers = if config.role.runs_workers() {
            config.workers
        } else {
            0
        };
        let reserve = FIXED_RESERVE
            .saturating_add(workers as u64)
            .saturating_add(config.limits.max_concurrent_requests as u64);
        let auto = file_limit.map(|limit| {
            let cap = limit.saturating_sub(reserve.min(limit / 2)).max(1);
            usize::try_from(cap).unwrap_or(usize::MAX)
        });
        let max_connections = match (config.max_connections, auto) {
            (Some(configured), Some(auto)) => {
                if configured > auto {
                    tracing::warn!(
                        max_connections = configured,
                        below_file_limit = auto,
                        "max_connections leaves too few descriptors below the open-file limit; \
                         accept() may fail with EMFILE (it is retried with back-off)"
                    );
                }
                configured
            }
            (Some(configured), None) => configured,
            (None, Some(auto)) => auto,
            (None, None) => CAP_WITHOUT_FILE_LIMIT,
        };
        Self {
            header_read_timeout: config.header_read_timeout,
            keep_alive_timeout: config.keep_alive_timeout,
            max_connections,
            shutdown_grace: config.shutdown_grace,
        }
    }
}

/// Raises the soft open-file limit to the hard limit and returns the limit now in force
/// (`None` where the platform has none). The first call logs the figure; later calls return it.
pub fn raise_file_limit() -> Option<u64> {
    static LIMIT: OnceLock<Option<u64>> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        if !rlimit::Resource::NOFILE.is_supported() {
            return None;
        }
        let before = rlimit::Resource::NOFILE.get().ok();
        match rlimit::increase_nofile_limit(u64::MAX) {
            Ok(limit) => {
                tracing::info!(
                    open_file_limit = limit,
                    soft_limit_was = before.map(|(soft, _)| soft),
                    "open-file limit raised to the hard limit"
                );
                Some(limit)
            }
            Err(e) => {
                let soft = before.map(|(soft, _)| soft);
                tracing::warn!(
                    error.message = %e,
                    open_file_limit = soft,
                    "cannot raise the open-file limit; keeping it"
                );
                soft
            }
        }
    })
}

/// Bounds each connection's read buffer (hyper's default lets it grow to about 400 KiB), so
/// that many concurrent uploads hold little beyond the body bytes `fluxa-api` accounts for.
/// It also bounds a request's headers, which get 431 past it.
const MAX_BUF_SIZE: usize = 64 * 1024;

/// How often, at most, a repeated problem of the accept loop is logged.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// Serves `app` on `listener` until `shutdown` is cancelled, then shuts down as the module
/// docs say and returns.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    options: ServeOptions,
    shutdown: CancellationToken,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // The watchdog keeps the header timeout, so that it does not cut idle keep-alive
        // connections short (see the module docs).
        .header_read_timeout(None)
        .max_buf_size(MAX_BUF_SIZE);
    // One permit per open connection: taken before `accept()`, so at the cap the loop waits
    // instead of accepting.
    let slots = Arc::new(Semaphore::new(options.max_connections));
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    let mut accept_errors = AcceptErrors::default();
    let mut at_cap_log = Throttle::default();

    loop {
        while connections.try_join_next().is_some() {}
        let slot = match Arc::clone(&slots).try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                metrics::counter!("fluxa_http_connection_limit_reached_total").increment(1);
                if let Some(suppressed) = at_cap_log.ready() {
                    tracing::warn!(
                        max_connections = options.max_connections,
                        suppressed,
                        "connection limit reached; new clients wait in the accept queue until \
                         a connection closes"
                    );
                }
                tokio::select! {
                    slot = Arc::clone(&slots).acquire_owned() => {
                        slot.expect("the connection semaphore is never closed")
                    }
                    () = shutdown.cancelled() => break,
                }
            }
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => {
                accept_errors.succeeded();
                stream
            }
            Err(error) => {
                drop(slot);
                let pause = accept_errors.failed(&error);
                tokio::select! {
                    () = tokio::time::sleep(pause) => continue,
                    () = shutdown.cancelled() => break,
                }
            }
        };

        let watch = Arc::new(ConnectionWatch::new());
        let io = TokioIo::new(WatchedStream {
            stream,
            watch: Arc::clone(&watch),
        });
        let service = ApiService {
            app: app.clone(),
            watch: Arc::clone(&watch),
        };
        let connection = graceful.watch(builder.serve_connection(io, service));
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let _slot = slot;
            let _open = OpenConnection::new();
            tokio::select! {
                // The connection first: after a late wake-up (a busy runtime), headers that did
                // arrive in time are parsed before the watchdog can call them late.
                biased;
                served = connection => {
                    if let Err(e) = served {
                        tracing::debug!(error.message = %e, "connection ended with an error");
                    }
                }
                reason = watchdog(&watch, &options, &shutdown) => {
                    metrics::counter!("fluxa_http_connections_closed_total",
                        "reason" => reason.as_str())
                    .increment(1);
                    tracing::debug!(reason = reason.as_str(), "connection closed");
                }
            }
        });
    }

    // Stop accepting: clients connecting from now on are refused rather than left waiting.
    drop(listener);
    let n_open = graceful.count();
    tracing::info!(
        n_open,
        grace_ms = u64::try_from(options.shutdown_grace.as_millis()).unwrap_or(u64::MAX),
        "HTTP server stopping: finishing the requests in flight"
    );
    if tokio::time::timeout(options.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        while connections.try_join_next().is_some() {}
        tracing::warn!(
            n_closed = connections.len(),
            "shutdown grace period over; closing the connections still open"
        );
        metrics::counter!("fluxa_http_connections_closed_total", "reason" => "shutdown_grace")
            .increment(connections.len() as u64);
    }
    connections.shutdown().await;
    tracing::info!("HTTP server stopped");
}

/// Why the watchdog closed a connection: the values of the `reason` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CloseReason {
    HeaderTimeout,
    KeepAliveTimeout,
    /// Shutdown began while the connection had no request in flight.
    Shutdown,
}

impl CloseReason {
    fn as_str(self) -> &'static str {
        match self {
            Self::HeaderTimeout => "header_timeout",
            Self::KeepAliveTimeout => "keep_alive_timeout",
            Self::Shutdown => "shutdown",
        }
    }
}

/// Where a connection stands, as its watchdog needs to know.
#[derive(Clone, Copy, Debug)]
enum Phase {
    /// Waiting for a request's headers since `since`: the connection's start, or the first
    /// byte of a later request. `got_bytes` says whether any of it has arrived.
    AwaitingHeaders { since: Instant, got_bytes: bool },
    /// This many requests are being handled (more than one only when pipelined).
    Busy(usize),
    /// Between requests since `since`.
    Idle { since: Instant },
}

/// One connection's phase, written by its stream (bytes arriving) and its service (requests
/// starting and ending), read by its watchdog, all on the connection's one task; the mutex is
/// never contended.
struct ConnectionWatch {
    phase: Mutex<Phase>,
    /// Wakes the watchdog after a change. `notify_one` keeps a wake-up for a watchdog that is
    /// not waiting yet, so none is lost between reading the phase and waiting.
    changed: Notify,
}

impl ConnectionWatch {
    fn new() -> Self {
        Self {
            phase: Mutex::new(Phase::AwaitingHeaders {
                since: Instant::now(),
                got_bytes: false,
            }),
            changed: Notify::new(),
        }
    }

    fn update(&self, change: impl FnOnce(Phase) -> Option<Phase>) {
        let mut phase = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(next) = change(*phase) {
            *phase = next;
            self.changed.notify_one();
        }
    }

    fn bytes_arrived(&self) {
        self.update(|phase| match phase {
            Phase::Idle { .. } => Some(Phase::AwaitingHeaders {
                since: Instant::now(),
                got_bytes: true,
            }),
            Phase::AwaitingHeaders {
                since,
                got_bytes: false,
            } => Some(Phase::AwaitingHeaders {
                since,
                got_bytes: true,
            }),
            _ => None,
        });
    }

    fn request_started(self: &Arc<Self>) -> InFlight {
        self.update(|phase| match phase {
            Phase::Busy(n) => Some(Phase::Busy(n + 1)),
            _ => Some(Phase::Busy(1)),
        });
        InFlight(Arc::clone(self))
    }

    fn request_finished(&self) {
        self.update(|phase| match phase {
            Phase::Busy(n) if n > 1 => Some(Phase::Busy(n - 1)),
            _ => Some(Phase::Idle {
                since: Instant::now(),
            }),
        });
    }

    /// When the connection must be closed, and why; `None` while requests are in flight.
    fn deadline(
        &self,
        options: &ServeOptions,
        shutting_down: bool,
    ) -> Option<(Instant, CloseReason)> {
        let phase = *self.phase.lock().unwrap_or_else(|e| e.into_inner());
        match phase {
            Phase::Busy(_) => None,
            // Nothing is in flight: a stopping server has nothing to wait for.
            Phase::Idle { .. }
            | Phase::AwaitingHeaders {
                got_bytes: false, ..
            } if shutting_down => Some((Instant::now(), CloseReason::Shutdown)),
            Phase::Idle { since } => Some((
                since + options.keep_alive_timeout,
                CloseReason::KeepAliveTimeout,
            )),
            // A request partly sent keeps its header deadline (the grace period still bounds
            // it).
            Phase::AwaitingHeaders { since, .. } => Some((
                since + options.header_read_timeout,
                CloseReason::HeaderTimeout,
            )),
        }
    }
}

/// Resolves when the connection must be closed; the connection's task then drops it.
async fn watchdog(
    watch: &ConnectionWatch,
    options: &ServeOptions,
    shutdown: &CancellationToken,
) -> CloseReason {
    loop {
        let shutting_down = shutdown.is_cancelled();
        let deadline = watch.deadline(options, shutting_down);
        if let Some((at, reason)) = deadline {
            if at <= Instant::now() {
                return reason;
            }
        }
        let until_deadline = async {
            match deadline {
                Some((at, _)) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = until_deadline => {}
            () = watch.changed.notified() => {}
            () = shutdown.cancelled(), if !shutting_down => {}
        }
    }
}

/// A request being handled; dropped once its response has been written (it rides in the
/// response body), which makes the connection idle.
struct InFlight(Arc<ConnectionWatch>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

/// The accepted socket, telling the watch when bytes arrive.
struct WatchedStream {
    stream: TcpStream,
    watch: Arc<ConnectionWatch>,
}

impl AsyncRead for WatchedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let n_before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > n_before {
            this.watch.bytes_arrived();
        }
        polled
    }
}

impl AsyncWrite for WatchedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The router as a hyper service, marking each request's start and end on the watch.
#[derive(Clone)]
struct ApiService {
    app: Router,
    watch: Arc<ConnectionWatch>,
}

type ServiceFuture =
    Pin<Box<dyn Future<Output = Result<hyper::Response<TrackedBody>, Infallible>> + Send>>;

impl hyper::service::Service<hyper::Request<Incoming>> for ApiService {
    type Response = hyper::Response<TrackedBody>;
    type Error = Infallible;
    type Future = ServiceFuture;

    fn call(&self, request: hyper::Request<Incoming>) -> Self::Future {
        let in_flight = self.watch.request_started();
        let app = self.app.clone();
        Box::pin(async move {
            let response = app.oneshot(request).await?;
            Ok(response.map(|body| TrackedBody {
                body,
                _in_flight: in_flight,
            }))
        })
    }
}

/// A response body that ends its request's [`InFlight`] when hyper drops it, after writing it.
struct TrackedBody {
    body: Body,
    _in_flight: InFlight,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Counts an open connection in the `fluxa_http_connections_open` gauge while it lives.
struct OpenConnection;

impl OpenConnection {
    fn new() -> Self {
        metrics::gauge!("fluxa_http_connections_open").increment(1.0);
        Self
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        metrics::gauge!("fluxa_http_connections_open").decrement(1.0);
    }
}

/// The kinds of `accept()` failure: the fixed values of `fluxa_accept_errors_total{kind}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AcceptErrorKind {
    /// `EMFILE`: this process is out of descriptors.
    Emfile,
    /// `ENFILE`: the system is out of descriptors.
    Enfile,
    /// `ENOBUFS`, `ENOMEM`: the kernel is out of socket memory.
    NoMemory,
    /// The new connection failed before it was accepted (`ECONNABORTED` and the network
    /// errors accept(2) says to retry like `EAGAIN`); nothing is wrong with the server.
    Connection,
    Other,
}

impl AcceptErrorKind {
    fn of(error: &io::Error) -> Self {
        match error.raw_os_error() {
            Some(libc::EMFILE) => Self::Emfile,
            Some(libc::ENFILE) => Self::Enfile,
            Some(libc::ENOBUFS | libc::ENOMEM) => Self::NoMemory,
            Some(
                libc::ECONNABORTED
                | libc::ECONNRESET
                | libc::EPROTO
                | libc::EPERM
                | libc::ENETDOWN
                | libc::ENETUNREACH
                | libc::EHOSTDOWN
                | libc::EHOSTUNREACH
                | libc::ENOPROTOOPT
                | libc::EOPNOTSUPP,
            ) => Self::Connection,
            _ => Self::Other,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Emfile => "emfile",
            Self::Enfile => "enfile",
            Self::NoMemory => "no_memory",
            Self::Connection => "connection",
            Self::Other => "other",
        }
    }
}

/// First and last pause after an `accept()` failure that is not the client's.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The accept loop's failures: counted, logged at most once per [`LOG_EVERY`], and paused on.
struct AcceptErrors {
    backoff: Duration,
    log: Throttle,
}

impl Default for AcceptErrors {
    fn default() -> Self {
        Self {
            backoff: BACKOFF_MIN,
            log: Throttle::default(),
        }
    }
}

impl AcceptErrors {
    /// Records `error` and says how long to pause before accepting again. A failed incoming
    /// connection is retried at once; anything else (descriptors or memory short) would fail
    /// again at once, so the loop backs off until something is freed.
    fn failed(&mut self, error: &io::Error) -> Duration {
        let kind = AcceptErrorKind::of(error);
        metrics::counter!("fluxa_accept_errors_total", "kind" => kind.as_str()).increment(1);
        if kind == AcceptErrorKind::Connection {
            tracing::debug!(error.message = %error, "an incoming connection failed before accept");
            return Duration::ZERO;
        }
        let pause = self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        if let Some(suppressed) = self.log.ready() {
            tracing::warn!(
                kind = kind.as_str(),
                error.message = %error,
                suppressed,
                retry_in_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX),
                "accept() failed; retrying with back-off (suppressed: failures not logged \
                 since the last report)"
            );
        }
        pause
    }

    fn succeeded(&mut self) {
        self.backoff = BACKOFF_MIN;
    }
}

/// Lets a repeated log line through at most once per [`LOG_EVERY`], counting the others.
#[derive(Default)]
struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// Whether to log now and, if so, how many were held back since the last one logged.
    fn ready(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.last.is_some_and(|last| now < last + LOG_EVERY) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> ServeOptions {
        ServeOptions {
            header_read_timeout: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(60),
            max_connections: 100,
            shutdown_grace: Duration::from_secs(20),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_keep_alive_connection_gets_the_keep_alive_timeout_not_the_header_one() {
        let watch = Arc::new(ConnectionWatch::new());
        let opened = Instant::now();
        assert_eq!(
            watch.deadline(&options(), false),
            Some((opened + Duration::from_secs(10), CloseReason::HeaderTimeout))
        );
        let request = watch.request_started();
        assert_eq!(watch.deadline(&options(), false), None);
        tokio::time::advance(Duration::from_secs(30)).await;
        drop(request);
        let idle_since = Instant::now();
        assert_eq!(
            watch.deadline(&options(), false),
            Some((
                idle_since + Duration::from_secs(60),
                CloseReason::KeepAliveTimeout
            ))
        );
        tokio::time::advance(Duration::from_secs(50)).await;
        watch.bytes_arrived();
        assert_eq!(
            watch.deadline(&options(), false),
            Some((
                Instant::now() + Duration::from_secs(10),
                CloseReason::HeaderTimeout
            )),
            "the next request's first byte starts its header timeout"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn at_shutdown_only_a_connection_with_a_request_started_is_kept() {
        let watch = Arc::new(ConnectionWatch::new());
        assert_eq!(
            watch.deadline(&options(), true).map(|(_, reason)| reason),
            Some(CloseReason::Shutdown)
        );
        watch.bytes_arrived();
        assert_eq!(
            watch.deadline(&options(), true).map(|(_, reason)| reason),
            Some(CloseReason::HeaderTimeout)
        );
        let request = watch.request_started();
        assert_eq!(watch.deadline(&options(), true), None);
        drop(request);
        assert_eq!(
            watch.deadline(&options(), true).map(|(_, reason)| reason),
            Some(CloseReason::Shutdown)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_fires_at_the_header_deadline() {
        let watch = ConnectionWatch::new();
        let started = Instant::now();
        let reason = watchdog(&watch, &options(), &CancellationToken::new()).await;
        assert_eq!(reason, CloseReason::HeaderTimeout);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }

    #[test]
    fn accept_errors_are_sorted_into_a_fixed_set_of_kinds() {
        let kind = |errno| AcceptErrorKind::of(&io::Error::from_raw_os_error(errno));
        assert_eq!(kind(libc::EMFILE), AcceptErrorKind::Emfile);
        assert_eq!(kind(libc::ENFILE), AcceptErrorKind::Enfile);
        assert_eq!(kind(libc::ENOBUFS), AcceptErrorKind::NoMemory);
        assert_eq!(kind(libc::ECONNABORTED), AcceptErrorKind::Connection);
        assert_eq!(kind(libc::EINVAL), AcceptErrorKind::Other);
    }

    #[tokio::test(start_paused = true)]
    async fn descriptor_shortages_back_off_doubling_to_a_second_and_reset_on_success() {
        let mut errors = AcceptErrors::default();
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let pauses: Vec<u128> = (0..9).map(|_| errors.failed(&emfile).as_millis()).collect();
        assert_eq!(pauses, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        let aborted = io::Error::from_raw_os_error(libc::ECONNABORTED);
        assert_eq!(errors.failed(&aborted), Duration::ZERO);
        errors.succeeded();
        assert_eq!(errors.failed(&emfile), BACKOFF_MIN);
    }

    #[tokio::test(start_paused = true)]
    async fn a_repeated_log_line_passes_once_per_period_with_the_count_held_back() {
        let mut throttle = Throttle::default();
        assert_eq!(throttle.ready(), Some(0));
        for _ in 0..7 {
            assert_eq!(throttle.ready(), None);
        }
        tokio::time::advance(LOG_EVERY).await;
        assert_eq!(throttle.ready(), Some(7));
        assert_eq!(throttle.ready(), None);
    }

    #[test]
    fn the_automatic_connection_cap_stays_below_the_file_limit() {
        let config = Config::default();
        let reserve =
            FIXED_RESERVE + config.workers as u64 + config.limits.max_concurrent_requests as u64;
        let cap = |limit| ServeOptions::new(&config, Some(limit)).max_connections as u64;
        assert_eq!(cap(20_000), 20_000 - reserve);
        assert_eq!(cap(256), 128, "a small limit keeps half for connections");
        let configured = Config {
            max_connections: Some(50),
            ..Config::default()
        };
        assert_eq!(
            ServeOptions::new(&configured, Some(20_000)).max_connections,
            50
        );
    }
}
