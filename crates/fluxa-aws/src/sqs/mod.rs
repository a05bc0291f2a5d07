//! The queue on Amazon SQS (`FLUXA_QUEUE_URL`, contract section 9): Fluxa's [`Producer`] and
//! [`Consumer`] over a standard queue and the dead-letter queue its `RedrivePolicy` names.
//!
//! The same traits are implemented over SQLite (`fluxa-sqlite`) and PostgreSQL
//! (`fluxa-postgres`); this backend keeps the promises the core conformance checks hold every
//! backend to, and maps them onto SQS like this:
//! - A queue message's body is the event message (UTF-8 JSON); `correlation_id`, `event_id`,
//!   `payload_mode` (`INLINE`, or `S3` when only a blob key travels), `schema` (`event.v1`),
//!   `blob_key` and `event_type` travel as String message attributes.
//! - Sends use `SendMessageBatch`, at most 10 entries and 1 MiB per call, and report per
//!   message ([`SendError::sent`]).
//! - `ApproximateReceiveCount` is the receive count, and the queue's own `RedrivePolicy`
//!   (`maxReceiveCount`) says how many receives a message gets. [`SqsQueue::open`] refuses a
//!   queue without one, and a queue (or DLQ) whose `MaximumMessageSize` is below 1 MiB.
//! - A transient failure changes the message's visibility to its back-off (at most 12 hours,
//!   the SQS limit). SQS keeps no record of the failure itself.
//! - A permanent failure is sent to the DLQ with its reason as message attributes, then
//!   deleted from the queue. If that delete fails the message comes back and is dead-lettered
//!   again, so the DLQ may hold a permanent failure twice (SQS standard queues are at least once
//!   anyway).
//! - SQS moves an exhausted message to the DLQ silently, on the receive that meets it, so
//!   [`Received::exhausted`] stays empty here: the DLQ drain learns of those messages instead.
//! - SQS makes the weaker promise on stale receipts (a late receiver's delete may still
//!   delete), which the core conformance checks allow.
//!
//! What this backend does not implement: [`fluxa_queue::DeadLetterAdmin`] (dead letters on SQS
//! are operated through the DLQ recorded in the store, which a drain of the SQS DLQ fills) and
//! [`fluxa_queue::BlobReferences`] (SQS cannot say whether a message points at a blob, so blob
//! orphans are left to the bucket's lifecycle rule).
//!
//! No error from here quotes a message body or a credential: errors carry the operation, the
//! service's error code and message, or why no answer came.

mod message;
mod open;
mod queue;

use std::time::Duration;

use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, MessageSystemAttributeName, QueueAttributeName,
};
use aws_sdk_sqs::Client;
use bytes::Bytes;
use chrono::Utc;
use fluxa_queue::{Delivery, Error, Result};

pub use message::{DrainedDeadLetter, ReceivedMessage, SCHEMA};
pub use open::{OpenError, MIN_MAXIMUM_MESSAGE_SIZE};

/// SQS's limits on one `SendMessageBatch` (or `DeleteMessageBatch`) call.
pub(crate) const MAX_BATCH_ENTRIES: usize = 10;
pub(crate) const MAX_BATCH_BYTES: usize = 1024 * 1024;
/// The longest long poll SQS allows.
const MAX_WAIT_SECONDS: u64 = 20;
/// The longest visibility timeout SQS allows (12 hours).
const MAX_VISIBILITY_SECONDS: u64 = 43_200;

/// An SQS queue and its dead-letter queue, read once at [`SqsQueue::open`]. Cheap to clone
/// (the SDK client is shared); build it once per process or Lambda container.
#[derive(Clone, Debug)]
pub struct SqsQueue {
    client: Client,
    queue_url: String,
    dead_letter_queue_url: String,
    /// The DLQ's ARN, from the `RedrivePolicy` (a Lambda event's records name their queue by
    /// ARN).
    dead_letter_arn: String,
    /// The `maxReceiveCount` of the queue's `RedrivePolicy`.
    max_receives: u32,
    /// The visibility timeout each receive asks for; `None` leaves the queue's own.
    visibility_timeout: Option<Duration>,
    /// Tests only: (message index, DelaySeconds) to put on one entry of each send.
    entry_delay: Option<(usize, i32)>,
}

impl SqsQueue {
    /// The main queue's URL (`FLUXA_QUEUE_URL`).
    pub fn queue_url(&self) -> &str {
        &self.queue_url
    }

    /// The ARN of the queue's dead-letter queue, from its `RedrivePolicy`.
    pub fn dead_letter_arn(&self) -> &str {
        &self.dead_letter_arn
    }

    /// The URL of the queue's dead-letter queue, from its `RedrivePolicy`.
    pub fn dead_letter_queue_url(&self) -> &str {
        &self.dead_letter_queue_url
    }

    /// How many receives a message gets before the queue's redrive dead-letters it
    /// (`maxReceiveCount`).
    pub fn max_receives(&self) -> u32 {
        self.max_receives
    }

    /// Has every receive hide its messages for `timeout` (whole seconds, at most 12 hours)
    /// rather than for the queue's own visibility timeout: `fluxa serve` passes its
    /// `visibility_timeout` setting, so it means the same on every queue backend.
    pub fn with_visibility_timeout(mut self, timeout: Duration) -> Self {
        self.visibility_timeout = Some(timeout);
        self
    }

    /// Counts of the main queue, from its approximate attributes: waiting (visible or
    /// delayed) and in flight.
    pub async fn approximate_counts(&self) -> Result<(u64, u64)> {
        let output = self
            .client
            .get_queue_attributes()
            .queue_url(&self.queue_url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .map_err(|e| sdk_error("GetQueueAttributes", &e))?;
        let count = |name: QueueAttributeName| {
            output
                .attributes()
                .and_then(|a| a.get(&name))
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Ok((
            count(QueueAttributeName::ApproximateNumberOfMessages)
                + count(QueueAttributeName::ApproximateNumberOfMessagesDelayed),
            count(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        ))
    }

    /// Receives up to 10 messages from the dead-letter queue, long-polling up to `wait`, as
    /// dead letters (the drain that records them in the store).
    pub async fn receive_dead_letters(&self, wait: Duration) -> Result<Vec<DrainedDeadLetter>> {
        let output = self
            .client
            .receive_message()
            .queue_url(&self.dead_letter_queue_url)
            .max_number_of_messages(MAX_BATCH_ENTRIES as i32)
            .wait_time_seconds(wait_seconds(wait))
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
            .message_attribute_names("All")
            .send()
            .await
            .map_err(|e| sdk_error("ReceiveMessage (from the dead-letter queue)", &e))?;
        let now = Utc::now();
        output
            .messages()
            .iter()
            .map(|message| {
                let message = ReceivedMessage::of(message)?;
                Ok(DrainedDeadLetter {
                    dead_letter: message.dead_letter(self.max_receives, now)?,
                    receipt: message.receipt,
                })
            })
            .collect()
    }

    /// Deletes drained messages from the dead-letter queue, in calls of 10.
    pub async fn delete_dead_letters(&self, receipts: &[&str]) -> Result<()> {
        self.delete_receipts(&self.dead_letter_queue_url, receipts)
            .await
    }

    /// A message received from this queue (by `ReceiveMessage` or a Lambda event) as a
    /// delivery.
    pub fn delivery_of(&self, message: ReceivedMessage) -> Delivery {
        let receive_count = message.receive_count();
        Delivery {
            attributes: message.ids(),
            enqueued_at: message.sent_at().unwrap_or_else(Utc::now),
            message_id: message.message_id,
            receipt: message.receipt,
            body: Bytes::from(message.body),
            receive_count,
            receives_left: self.max_receives.saturating_sub(receive_count),
        }
    }

    /// `DeleteMessageBatch` on `queue_url` in calls of 10; every call is made, and the first
    /// failed entry (or call) is the error.
    async fn delete_receipts(&self, queue_url: &str, receipts: &[&str]) -> Result<()> {
        let mut first_failure = None;
        for chunk in receipts.chunks(MAX_BATCH_ENTRIES) {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(entry_idx, receipt)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(entry_idx.to_string())
                        .receipt_handle(*receipt)
                        .build()
                        .map_err(Error::rejected)
                })
                .collect::<Result<Vec<_>>>()?;
            let failure = match self
                .client
                .delete_message_batch()
                .queue_url(queue_url)
                .set_entries(Some(entries))
                .send()
                .await
            {
                Ok(output) => output
                    .failed()
                    .first()
                    .map(|entry| entry_error("DeleteMessageBatch", entry)),
                Err(e) => Some(sdk_error("DeleteMessageBatch", &e)),
            };
            if let Some(failure) = failure {
                first_failure.get_or_insert(failure);
            }
        }
        first_failure.map_or(Ok(()), Err)
    }
}

/// A long poll's wait in whole seconds (rounded to the nearest), at most 20.
fn wait_seconds(wait: Duration) -> i32 {
    let rounded = (wait.as_millis() + 500) / 1000;
    rounded.min(u128::from(MAX_WAIT_SECONDS)) as i32
}

/// A visibility timeout of at least `delay`, in whole seconds, at most 12 hours.
fn visibility_seconds(delay: Duration) -> i32 {
    let seconds = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
    seconds.min(MAX_VISIBILITY_SECONDS) as i32
}

/// An SQS call that failed, described without the request or response bodies.
#[derive(Debug, thiserror::Error)]
#[error("SQS {operation} failed: {detail}")]
struct SqsError {
    operation: &'static str,
    detail: String,
}

/// A failed call: a request SQS refused (a 4xx other than throttling, or one the SDK could not
/// build) is `Rejected`; no answer, a throttle or a service fault (5xx) is `Unavailable`.
fn sdk_error<E>(operation: &'static str, error: &SdkError<E>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let refused = match error {
        SdkError::ConstructionFailure(_) => true,
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            let throttled = status == 429
                || error.code().is_some_and(|code| {
                    code.contains("Throttl") || code.contains("RequestThrottled")
                });
            (400..500).contains(&status) && !throttled
        }
        _ => false,
    };
    let failure = SqsError {
        operation,
        detail: crate::error_detail(error),
    };
    if refused {
        Error::rejected(failure)
    } else {
        Error::unavailable(failure)
    }
}

/// A failed batch entry: the sender's fault is `Rejected`, the service's `Unavailable`.
fn entry_error(
    operation: &'static str,
    entry: &aws_sdk_sqs::types::BatchResultErrorEntry,
) -> Error {
    let failure = SqsError {
        operation,
        detail: match entry.message() {
            Some(message) => format!("entry {}: {}: {message}", entry.id(), entry.code()),
            None => format!("entry {}: {}", entry.id(), entry.code()),
        },
    };
    if entry.sender_fault() {
        Error::rejected(failure)
    } else {
        Error::unavailable(failure)
    }
}

#[cfg(test)]
mod tests {
    use fluxa_core::{CorrelationId, ErrorCode, EventId, EventType, FailureClass, FailureInfo};
    use fluxa_queue::MessageAttributes;

    use super::message::{
        dead_letter_attributes, message_attributes, sqs_text, MAX_ERROR_MESSAGE_CHARS,
        MAX_MESSAGE_ATTRIBUTES,
    };
    use super::open::RedrivePolicy;
    use super::*;

    #[test]
    fn a_batch_entry_the_service_failed_is_an_outage_and_one_it_refused_is_a_refusal() {
        let entry = |sender_fault| {
            aws_sdk_sqs::types::BatchResultErrorEntry::builder()
                .id("3")
                .code("InternalError")
                .sender_fault(sender_fault)
                .build()
                .unwrap()
        };
        // Ingest answers the item 503 (retry it) for the first and 500 for the second.
        assert!(matches!(
            entry_error("SendMessageBatch", &entry(false)),
            Error::Unavailable(_)
        ));
        assert!(matches!(
            entry_error("SendMessageBatch", &entry(true)),
            Error::Rejected(_)
        ));
    }

    #[test]
    fn a_redrive_policy_gives_the_dead_letter_queue_and_the_receive_limit() {
        let policy = RedrivePolicy::parse(
            r#"{"deadLetterTargetArn":"arn:aws:sqs:eu-west-1:123456789012:fluxa-dlq","maxReceiveCount":3}"#,
        )
        .unwrap();
        assert_eq!(
            policy,
            RedrivePolicy {
                dead_letter_arn: "arn:aws:sqs:eu-west-1:123456789012:fluxa-dlq".into(),
                dead_letter_name: "fluxa-dlq".into(),
                dead_letter_account: "123456789012".into(),
                max_receives: 3,
            }
        );
        let as_string = RedrivePolicy::parse(
            r#"{"deadLetterTargetArn":"arn:aws:sqs:us-east-1:1:q","maxReceiveCount":"5"}"#,
        )
        .unwrap();
        assert_eq!(as_string.max_receives, 5);
        for bad in [
            "not json",
            r#"{"maxReceiveCount":3}"#,
            r#"{"deadLetterTargetArn":"arn:aws:sns:us-east-1:1:q","maxReceiveCount":3}"#,
            r#"{"deadLetterTargetArn":"arn:aws:sqs:us-east-1:1:q","maxReceiveCount":0}"#,
        ] {
            assert!(RedrivePolicy::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_dead_letter_with_every_id_stays_within_the_sqs_attribute_limit() {
        let attributes = MessageAttributes {
            event_id: EventId::parse("e-1").ok(),
            correlation_id: CorrelationId::parse("c-1").ok(),
            blob_key: Some("events/e-1".into()),
            event_type: EventType::parse("order.created").ok(),
        };
        let error = FailureInfo::new(ErrorCode::HashMismatch, "x".repeat(10_000));
        let dead = dead_letter_attributes(&attributes, &error, 2, Utc::now());
        assert_eq!(dead.len(), MAX_MESSAGE_ATTRIBUTES);
        let message = &dead.iter().find(|(n, _)| *n == "error_message").unwrap().1;
        assert_eq!(message.len(), MAX_ERROR_MESSAGE_CHARS);
        assert!(message_attributes(&attributes).len() <= MAX_MESSAGE_ATTRIBUTES);
    }

    #[test]
    fn waits_and_delays_become_the_whole_seconds_sqs_takes() {
        assert_eq!(wait_seconds(Duration::ZERO), 0);
        assert_eq!(wait_seconds(Duration::from_millis(1_499)), 1);
        assert_eq!(wait_seconds(Duration::from_secs(60)), 20);
        assert_eq!(visibility_seconds(Duration::ZERO), 0);
        assert_eq!(visibility_seconds(Duration::from_millis(1_001)), 2);
        assert_eq!(visibility_seconds(Duration::from_secs(86_400)), 43_200);
    }

    /// A message's attributes come from whoever sent it: an id that does not parse is left
    /// out, and the receive goes on (the processor decodes the body either way).
    #[test]
    fn attributes_that_do_not_parse_are_read_as_absent_not_as_a_failed_receive() {
        let message = ReceivedMessage {
            message_id: "3b241101-e2bb-4255-8caf-4136c566a962".into(),
            attributes: [
                ("event_id", "not/an id"),
                ("correlation_id", "c-1"),
                ("blob_key", "events/x"),
                ("event_type", "bad\u{1}type"),
            ]
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value.to_owned()))
            .collect(),
            ..ReceivedMessage::default()
        };
        assert_eq!(
            message.ids(),
            MessageAttributes {
                event_id: None,
                correlation_id: CorrelationId::parse("c-1").ok(),
                blob_key: Some("events/x".into()),
                event_type: None,
            }
        );
    }

    /// The DLQ drain must not stall on one message, nor record an unknown code as another
    /// silently: it becomes `internal`, and the message says which code it carried.
    #[test]
    fn a_dead_letter_with_an_unknown_error_code_is_recorded_as_internal_naming_the_code() {
        let message = |code: &str| ReceivedMessage {
            message_id: "3b241101-e2bb-4255-8caf-4136c566a962".into(),
            attributes: [
                ("error_class", "permanent"),
                ("error_code", code),
                ("error_message", "why"),
            ]
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value.to_owned()))
            .collect(),
            ..ReceivedMessage::default()
        };
        let known = message("hash_mismatch").dead_letter(3, Utc::now()).unwrap();
        assert_eq!(known.error_class, FailureClass::Permanent);
        assert_eq!(
            known.error,
            FailureInfo::new(ErrorCode::HashMismatch, "why")
        );
        let unknown = message("gremlins").dead_letter(3, Utc::now()).unwrap();
        assert_eq!(unknown.error.code, ErrorCode::Internal);
        assert!(
            unknown.error.message.contains("\"gremlins\""),
            "{}",
            unknown.error.message
        );
    }

    #[test]
    fn a_dead_letter_whose_message_id_cannot_be_an_id_stays_in_the_sqs_dlq() {
        let message = ReceivedMessage {
            message_id: String::new(),
            ..ReceivedMessage::default()
        };
        assert!(message.dead_letter(3, Utc::now()).is_err());
    }

    #[test]
    fn characters_sqs_refuses_are_replaced_in_attribute_values() {
        assert_eq!(sqs_text("a\u{1}b\u{FFFF}\tc"), "a\u{FFFD}b\u{FFFD}\tc");
    }
}
