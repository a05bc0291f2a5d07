//! What a database-backed queue handle shares with its own receivers: the long-poll loop with
//! wake-one notifications. Both backends (`fluxa-sqlite`, `fluxa-postgres`) use it, so the
//! wake-up rules exist once.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::{Received, Result};

/// Cheap to clone; clones share the same wake-ups.
#[derive(Clone, Debug, Default)]
pub struct Receivers {
    enqueued: Arc<Notify>,
}

impl Receivers {
    /// New messages are waiting: wake one idle receiver (it passes the wake-up on if it finds
    /// a full batch), rather than every receiver for every message.
    pub fn wake_one(&self) {
        self.enqueued.notify_one();
    }

    /// Long polling: calls `receive_now` until it returns something or `wait` has passed,
    /// sleeping between tries until a wake-up or `idle_poll` (which catches retry delays and
    /// visibility timeouts running out, and other processes' enqueues).
    pub async fn long_poll<F, Fut>(
        &self,
        max_messages: usize,
        wait: Duration,
        idle_poll: Duration,
        mut receive_now: F,
    ) -> Result<Received>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Received>>,
    {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Register interest before looking, so an enqueue between the look and the wait
            // still wakes us.
            let enqueued = self.enqueued.notified();
            tokio::pin!(enqueued);
            enqueued.as_mut().enable();
            let received = receive_now().await?;
            let now = tokio::time::Instant::now();
            let n_met = received.deliveries.len() + received.exhausted.len();
            if n_met == max_messages {
                // A full batch suggests more is waiting: wake one idle peer to help.
                self.wake_one();
            }
            // Exhausted notices are news for the caller too (the store must hear of them).
            if n_met > 0 || now >= deadline {
                return Ok(received);
            }
            tokio::select! {
                () = &mut enqueued => {}
                () = tokio::time::sleep((deadline - now).min(idle_poll)) => {}
            }
        }
    }
}
