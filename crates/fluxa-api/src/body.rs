//! Request bodies, read the contract's way and under the server's protections (sections 1 and
//! 7 of the contract):
//! - [`read_body`], shared by every handler that takes a body: `Content-Type: application/json`
//!   or 415, and a size limit or 413 (at once, without `100 Continue`, when `Content-Length`
//!   already says so);
//! - [`guard`], the middleware in front of those handlers: it reserves a body's bytes from the
//!   server-wide memory budget before anything is read (503 when the budget is spent), and
//!   makes a body that arrives slower than the minimum data rate fail, which [`read_body`]
//!   answers with 408. A body answered before it was read (a 503, a 401) is then read and
//!   thrown away for a while, so that a client still sending it gets to read the answer.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use crate::error::{ApiError, ApiErrorCode};
use crate::Limits;

/// Checks `Content-Type: application/json`. Parameters are allowed, but a `charset` must be
/// UTF-8: JSON exchanged between systems is UTF-8 (RFC 8259 §8.1), and the body is read as
/// such, so a body declared in another charset would be misread rather than refused.
pub fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mut parts = content_type.split(';');
    let is_json = parts
        .next()
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(ApiError::new(
            ApiErrorCode::UnsupportedMediaType,
            "Content-Type must be application/json",
        ));
    }
    for parameter in parts {
        let (name, value) = parameter.split_once('=').unwrap_or((parameter, ""));
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        if name.trim().eq_ignore_ascii_case("charset") && !value.eq_ignore_ascii_case("utf-8") {
            return Err(ApiError::new(
                ApiErrorCode::UnsupportedMediaType,
                "JSON must be UTF-8: Content-Type may declare charset=utf-8 or no charset",
            ));
        }
    }
    Ok(())
}

/// Past the limit we keep reading (and discarding) up to this much more, so the client gets a
/// clean 413 instead of a connection reset mid-upload; beyond it we stop reading.
const DRAIN_CAP: usize = 64 * 1024 * 1024;

/// Reads the whole body, refusing (413) anything over `limit` bytes without keeping it.
pub async fn read_body(
    headers: &HeaderMap,
    mut body: Body,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let declared = declared_length(headers);
    let mut too_large = declared.is_some_and(|n| n > limit as u64);
    if too_large && expects_continue(headers) {
        // hyper sends `100 Continue` only when the body is first polled, so answering before
        // polling it tells the client not to send the body at all.
        return Err(payload_too_large(limit));
    }
    // Sized from Content-Length (when honest and within the limit) so a large body is not
    // copied again each time the buffer would have grown.
    let capacity = declared.filter(|n| *n <= limit as u64).unwrap_or(0);
    let mut buffer = BytesMut::with_capacity(usize::try_from(capacity).unwrap_or(0));
    let mut n_read: usize = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| unreadable(&e))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        n_read = n_read.saturating_add(data.len());
        too_large |= n_read > limit;
        if too_large {
            if n_read > limit.saturating_add(DRAIN_CAP) {
                break;
            }
        } else {
            buffer.extend_from_slice(&data);
        }
    }
    if too_large {
        return Err(payload_too_large(limit));
    }
    Ok(buffer.freeze())
}

fn payload_too_large(limit: usize) -> ApiError {
    ApiError::payload_too_large(format!("the request body is over {limit} bytes"))
}

/// The answer to a body that failed mid-read: one of [`guard`]'s refusals, or a client that
/// broke off or sent bad chunked framing.
fn unreadable(error: &axum::Error) -> ApiError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = cause {
        if let Some(refusal) = error.downcast_ref::<Refusal>() {
            return refusal.into();
        }
        cause = error.source();
    }
    ApiError::new(
        ApiErrorCode::InvalidJson,
        "the request body could not be read completely",
    )
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("100-continue"))
}

/// Why [`guard`] stopped a body; it travels as the body's error to [`read_body`].
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("the request body arrived slower than {min_rate} bytes per second")]
    TooSlow { min_rate: u64 },
    #[error("the server is holding too many request bodies; retry later")]
    MemorySpent,
}

impl From<&Refusal> for ApiError {
    fn from(refusal: &Refusal) -> Self {
        match refusal {
            Refusal::TooSlow { .. } => ApiError::request_timeout(refusal.to_string()),
            Refusal::MemorySpent => ApiError::overloaded(refusal.to_string()),
        }
    }
}

/// The body protections, built once per router and shared by every request.
#[derive(Clone)]
pub(crate) struct BodyGuards {
    /// The bytes of request bodies held at once, counted in KiB: a semaphore hands out at most
    /// `u32::MAX` permits per acquire, and KiB lets one body (and the budget) pass 4 GiB. A
    /// permit is taken before a body is read and kept until its handler has answered, since
    /// handlers keep the bytes they read until then.
    memory: Arc<Semaphore>,
    /// The most any route buffers ([`Limits::largest_body`]): a larger body is refused with
    /// 413 and drained, never kept, so nothing past this is reserved.
    largest_body: u64,
    /// Bytes per second a body must average once `grace` has passed.
    min_rate: u64,
    grace: Duration,
}

impl BodyGuards {
    pub(crate) fn new(limits: &Limits) -> Self {
        let budget_kib = kib(limits.max_body_memory as u64) as usize;
        Self {
            memory: Arc::new(Semaphore::new(budget_kib.min(Semaphore::MAX_PERMITS))),
            largest_body: limits.largest_body() as u64,
            min_rate: limits.min_body_rate.max(1),
            grace: limits.body_rate_grace,
        }
    }

    /// Takes `bytes` (rounded up to KiB) from the budget now, or says it is spent.
    fn reserve(&self, bytes: u64) -> Option<OwnedSemaphorePermit> {
        let n_kib = u32::try_from(kib(bytes)).ok()?;
        Arc::clone(&self.memory).try_acquire_many_owned(n_kib).ok()
    }
}

fn kib(bytes: u64) -> u64 {
    bytes.div_ceil(1024)
}

/// The middleware in front of every route that may read a body, outside the concurrency limit
/// so that it also lingers on the bodies of shed requests. A body with a `Content-Length`
/// reserves it before the handler runs (503 at once if the budget cannot hold it); a chunked
/// body reserves chunk by chunk as it arrives. Either way the body is watched for its data
/// rate, and the connection is closed after the answer if the body was not read to its end (a
/// 408, an early 413 or 503), since what is left of it cannot be told apart from the next
/// request.
pub(crate) async fn guard(
    State(guards): State<BodyGuards>,
    request: Request,
    next: Next,
) -> Response {
    let declared = declared_length(request.headers());
    let has_body = match declared {
        Some(n) => n > 0,
        None => request.headers().contains_key(header::TRANSFER_ENCODING),
    };
    if !has_body {
        return next.run(request).await;
    }
    // A client that asked whether to send its body is answered before it sends any: nothing to
    // linger on.
    let linger = !expects_continue(request.headers());
    let reserved = match declared {
        Some(n) if n <= guards.largest_body => match guards.reserve(n) {
            Some(permit) => Some(permit),
            None => {
                metrics::counter!("fluxa_http_body_memory_refusals_total").increment(1);
                if linger {
                    discard_rest(request.into_body());
                }
                let mut response = ApiError::from(&Refusal::MemorySpent).into_response();
                close_connection(&mut response);
                return response;
            }
        },
        _ => None,
    };
    let progress = Arc::new(Progress::default());
    let (parts, body) = request.into_parts();
    let body = GuardedBody {
        inner: body,
        linger,
        started: None,
        received: 0,
        deadline: None,
        chunked_budget: declared.is_none().then(|| guards.clone()),
        progress: Arc::clone(&progress),
        min_rate: guards.min_rate,
        grace: guards.grace,
    };
    let mut response = next.run(Request::from_parts(parts, Body::new(body))).await;
    if !progress.finished.load(Ordering::Relaxed) {
        close_connection(&mut response);
    }
    // The handler has answered and dropped the bytes it read: give their memory back.
    drop(reserved);
    drop(progress);
    response
}

/// How long, at most, the rest of a body answered before it was read is read and thrown away:
/// closing a socket with unread data makes the kernel reset the connection, and a client still
/// sending its body may then never read the answer (nginx calls this a lingering close).
const LINGER_FOR: Duration = Duration::from_secs(10);

/// Reads the rest of `body` and throws it away, in the background, for at most [`LINGER_FOR`]
/// and [`DRAIN_CAP`] bytes. hyper writes the answer meanwhile and closes the connection once
/// the body is read, or when this gives up and drops it.
fn discard_rest(mut body: Body) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let discard = async {
            let mut n_read: usize = 0;
            while let Some(Ok(frame)) = body.frame().await {
                if let Ok(data) = frame.into_data() {
                    n_read = n_read.saturating_add(data.len());
                    if n_read > DRAIN_CAP {
                        break;
                    }
                }
            }
        };
        let _ = tokio::time::timeout(LINGER_FOR, discard).await;
    });
}

fn close_connection(response: &mut Response) {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
}

/// What [`guard`] learns from a body as its handler reads it.
#[derive(Default)]
struct Progress {
    /// The body was read to its end.
    finished: AtomicBool,
    /// The memory a chunked body reserved as it arrived, kept until the handler has answered.
    held: Mutex<Option<OwnedSemaphorePermit>>,
}

/// A request body under [`guard`]'s watch: its data rate, and for a chunked body its memory.
struct GuardedBody {
    inner: Body,
    /// Whether to read the rest of the body after an early answer ([`discard_rest`]): not for a
    /// client that waits for `100 Continue`, nor for one refused as too slow.
    linger: bool,
    /// When the handler first asked for the body: the rate is measured from then, so time spent
    /// waiting before the handler runs does not count against the client.
    started: Option<Instant>,
    received: u64,
    /// The moment the average rate would fall below the minimum if nothing more arrived.
    deadline: Option<Pin<Box<Sleep>>>,
    /// Set for a body without `Content-Length`, which reserves memory as it arrives.
    chunked_budget: Option<BodyGuards>,
    progress: Arc<Progress>,
    min_rate: u64,
    grace: Duration,
}

impl GuardedBody {
    /// Until when the body may take to arrive, given what has arrived: the grace period, or
    /// as long as the bytes so far would take at the minimum rate, whichever is longer.
    fn allowed_until(&self, started: Instant) -> Instant {
        let at_min_rate = Duration::from_millis(self.received.saturating_mul(1000) / self.min_rate);
        started + self.grace.max(at_min_rate)
    }

    /// Reserves memory for the chunked body's bytes so far (up to the most any route keeps).
    fn reserve_received(&mut self) -> Result<(), Refusal> {
        let Some(guards) = &self.chunked_budget else {
            return Ok(());
        };
        let mut held = self.progress.held.lock().unwrap_or_else(|e| e.into_inner());
        let held_kib = held.as_ref().map_or(0, |p| p.num_permits() as u64);
        let wanted_kib = kib(self.received.min(guards.largest_body));
        if wanted_kib > held_kib {
            let more = guards
                .reserve((wanted_kib - held_kib) * 1024)
                .ok_or(Refusal::MemorySpent)?;
            match held.as_mut() {
                Some(permit) => permit.merge(more),
                None => *held = Some(more),
            }
        }
        Ok(())
    }
}

impl http_body::Body for GuardedBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let started = *this.started.get_or_insert_with(Instant::now);
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.received = this.received.saturating_add(data.len() as u64);
                    if let Err(refusal) = this.reserve_received() {
                        metrics::counter!("fluxa_http_body_memory_refusals_total").increment(1);
                        return Poll::Ready(Some(Err(refusal.into())));
                    }
                }
                if this.inner.is_end_stream() {
                    this.progress.finished.store(true, Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error.into()))),
            Poll::Ready(None) => {
                this.progress.finished.store(true, Ordering::Relaxed);
                Poll::Ready(None)
            }
            Poll::Pending => {
                let until = this.allowed_until(started);
                let deadline = this
                    .deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
                if deadline.deadline() != until {
                    deadline.as_mut().reset(until);
                }
                if deadline.as_mut().poll(cx).is_ready() {
                    metrics::counter!("fluxa_http_body_too_slow_total").increment(1);
                    this.linger = false;
                    let refusal = Refusal::TooSlow {
                        min_rate: this.min_rate,
                    };
                    return Poll::Ready(Some(Err(refusal.into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for GuardedBody {
    fn drop(&mut self) {
        if self.linger && !self.progress.finished.load(Ordering::Relaxed) {
            discard_rest(std::mem::take(&mut self.inner));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judged(content_type: &str) -> Result<(), ApiError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_str(content_type).unwrap(),
        );
        require_json(&headers)
    }

    #[test]
    fn json_in_utf8_or_with_no_charset_is_accepted_with_any_other_parameters() {
        for content_type in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            "application/json;charset=UTF-8",
            "application/json; charset=\"utf-8\"",
            "application/json; profile=x; charset=Utf-8",
        ] {
            assert!(judged(content_type).is_ok(), "{content_type}");
        }
    }

    #[test]
    fn json_declared_in_another_charset_is_an_unsupported_media_type() {
        for content_type in [
            "application/json; charset=latin1",
            "application/json; charset=\"ISO-8859-1\"",
            "application/json; charset=utf-16",
            "application/json; charset=utf8",
            "application/json; charset=",
            "text/plain; charset=utf-8",
        ] {
            let error = judged(content_type).expect_err(content_type);
            assert_eq!(
                error.code,
                ApiErrorCode::UnsupportedMediaType,
                "{content_type}"
            );
        }
    }
}
