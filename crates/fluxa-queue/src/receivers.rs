//! What a database-backed queue handle shares with its own receivers: the long-poll loop with
//! wake-one notifications, and the buffer of `retries_exhausted` notices. Both backends
//! (`fluxa-sqlite`, `fluxa-postgres`) use it, so the wake-up rules exist once.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

use crate::{Delivery, ExhaustedNotice, Result};

/// Cheap to clone; clones share the same wake-ups and notices.
#[derive(Clone, Debug, Default)]
pub struct Receivers {
    enqueued: Arc<Notify>,
    exhausted: Arc<Mutex<Vec<ExhaustedNotice>>>,
}

impl Receivers {
    /// New messages are waiting: wake one idle receiver (it passes the wake-up on if it finds
    /// a full batch), rather than every receiver for every message.
    pub fn wake_one(&self) {
        self.enqueued.notify_one();
    }

    /// Keeps notices of messages a receive dead-lettered, for [`Receivers::take_exhausted`].
    pub fn announce_exhausted(&self, notices: impl IntoIterator<Item = ExhaustedNotice>) {
        self.exhausted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(notices);
    }

    /// Drains the notices (the `Queue::take_exhausted` of every backend that uses this).
    pub fn take_exhausted(&self) -> Vec<ExhaustedNotice> {
        std::mem::take(
            &mut *self
                .exhausted
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
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
    ) -> Result<Vec<Delivery>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Vec<Delivery>>>,
    {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Register interest before looking, so an enqueue between the look and the wait
            // still wakes us.
            let enqueued = self.enqueued.notified();
            tokio::pin!(enqueued);
            enqueued.as_mut().enable();
            let deliveries = receive_now().await?;
            let now = tokio::time::Instant::now();
            if deliveries.len() == max_messages {
                // A full batch suggests more is waiting: wake one idle peer to help.
                self.wake_one();
            }
            if !deliveries.is_empty() || now >= deadline {
                return Ok(deliveries);
            }
            tokio::select! {
                () = &mut enqueued => {}
                () = tokio::time::sleep((deadline - now).min(idle_poll)) => {}
            }
        }
    }
}
