//! [`accept`]: validated events onto the queue, durably, with their large payloads in the blob
//! store first (seed invariants 4 and 5, contract sections 1 and 1b).

use std::sync::Arc;

use bytes::Bytes;
use chrono::Utc;
use fluxa_blob::BlobStore;
use fluxa_core::ingest::ValidatedEvent;
use fluxa_core::{CorrelationId, EventId, EventMessageV1, FluxaTask, PayloadHash, PayloadMode};
use fluxa_queue::{MessageAttributes, NewMessage, Producer};

/// An event that is durably in the queue (and its payload, if large, in the blob store).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    pub event_id: EventId,
    pub payload_sha256: PayloadHash,
    pub payload_size: u64,
    pub payload_mode: PayloadMode,
}

/// One result per event, in order: accepted, or not sent because of the queue's error (a
/// partial send: SQS sends per entry). Shared, since one error may refuse several events.
pub type Acceptance = Vec<Result<Accepted, Arc<fluxa_queue::Error>>>;

/// Why nothing was accepted. Whatever was written on the way is deleted again (best effort: a
/// blob left behind is unreferenced, and the sweeper or the bucket's lifecycle takes it).
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// The blob store could not take a payload.
    #[error("the blob store could not take a payload")]
    BlobStore(#[source] fluxa_blob::Error),
    /// The queue took none of the messages.
    #[error("the queue took none of the messages")]
    Queue(#[source] Arc<fluxa_queue::Error>),
}

/// Accepts `events`, each parsed from `body` (its payload is handed to the blob store as a
/// slice of `body`, never copied), under `correlation_id`. The order is the contract's: a
/// large payload is durable in the blob store before its message is sent, and a message is
/// durable in the queue before its event counts as accepted.
pub async fn accept(
    producer: &dyn Producer,
    blobs: &BlobStore,
    body: &Bytes,
    events: &[ValidatedEvent<'_>],
    correlation_id: &CorrelationId,
) -> Result<Acceptance, AcceptError> {
    let mut messages = Vec::with_capacity(events.len());
    let mut written: Vec<Option<String>> = Vec::with_capacity(events.len());
    for event in events {
        let header = event.header(correlation_id.clone(), Utc::now());
        let (message, blob_key) = match event.payload_mode() {
            PayloadMode::Inline => (EventMessageV1::inline(header, event.payload), None),
            PayloadMode::Blob => {
                let key = BlobStore::new_key(&event.event_id);
                let bytes = body.slice_ref(event.payload.get().as_bytes());
                match blobs.put(&key, bytes).await {
                    Ok(blob) => {
                        // The whole key, as the message body names it: the attribute is what
                        // the sweeper and SQS's attributes go by.
                        let key = blob.key.clone();
                        (EventMessageV1::in_blob(header, blob), Some(key))
                    }
                    Err(e) => {
                        delete_blobs(blobs, written.iter().flatten()).await;
                        return Err(AcceptError::BlobStore(e));
                    }
                }
            }
        };
        messages.push(NewMessage {
            body: FluxaTask::EventV1(message).encode(),
            attributes: MessageAttributes {
                event_id: Some(event.event_id.clone()),
                correlation_id: Some(correlation_id.clone()),
                blob_key: blob_key.clone(),
                event_type: Some(event.event_type.clone()),
            },
        });
        written.push(blob_key);
    }
    if messages.is_empty() {
        return Ok(Vec::new());
    }
    let (sent, error) = match producer.send(messages).await {
        Ok(_) => (vec![true; events.len()], None),
        Err(e) => (
            e.sent.iter().map(Option::is_some).collect::<Vec<_>>(),
            Some(Arc::new(e.source)),
        ),
    };
    let unsent_blobs = written
        .iter()
        .zip(&sent)
        .filter(|(_, sent)| !**sent)
        .filter_map(|(key, _)| key.as_ref());
    delete_blobs(blobs, unsent_blobs).await;
    if let Some(error) = &error {
        if !sent.contains(&true) {
            return Err(AcceptError::Queue(Arc::clone(error)));
        }
    }
    Ok(events
        .iter()
        .zip(&sent)
        .map(|(event, sent)| match (sent, &error) {
            (false, Some(error)) => Err(Arc::clone(error)),
            _ => {
                let mode = event.payload_mode();
                metrics::counter!("fluxa_events_ingested_total", "payload_mode" => mode.as_str())
                    .increment(1);
                Ok(Accepted {
                    event_id: event.event_id.clone(),
                    payload_sha256: event.payload_sha256.clone(),
                    payload_size: event.payload_size() as u64,
                    payload_mode: mode,
                })
            }
        })
        .collect())
}

async fn delete_blobs(blobs: &BlobStore, keys: impl Iterator<Item = &String>) {
    for key in keys {
        if let Err(e) = blobs.delete(key).await {
            tracing::warn!(blob_key = %key, error.message = %e, "could not delete an orphaned blob");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;
    use fluxa_core::ingest::{parse_batch, PayloadLimits};
    use fluxa_queue::SendError;

    use super::*;

    /// A queue that takes the messages at the positions `takes` says, and records them.
    struct Picky {
        takes: fn(usize) -> bool,
        got: Mutex<Vec<MessageAttributes>>,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("the queue is down")]
    struct Down;

    #[async_trait]
    impl Producer for Picky {
        async fn send(&self, messages: Vec<NewMessage>) -> Result<Vec<String>, SendError> {
            let mut sent = Vec::new();
            for (i, message) in messages.into_iter().enumerate() {
                let taken = (self.takes)(i);
                if taken {
                    self.got.lock().unwrap().push(message.attributes);
                }
                sent.push(taken.then(|| format!("m{i}")));
            }
            if sent.iter().all(Option::is_some) {
                Ok(sent.into_iter().flatten().collect())
            } else {
                Err(SendError {
                    sent,
                    source: fluxa_queue::Error::unavailable(Down),
                })
            }
        }
        async fn ping(&self) -> fluxa_queue::Result<()> {
            Ok(())
        }
    }

    /// Three events: a large payload, a small one, a large one.
    fn batch() -> Bytes {
        let large = format!("\"{}\"", "x".repeat(300_000));
        Bytes::from(format!(
            r#"{{"events":[{{"event_id":"a","event_type":"t","payload":{large}}},
                {{"event_id":"b","event_type":"t","payload":1}},
                {{"event_id":"c","event_type":"t","payload":{large}}}]}}"#
        ))
    }

    async fn blob_keys(blobs: &BlobStore) -> Vec<String> {
        let every = Utc::now() + chrono::Duration::hours(1);
        blobs.payload_keys_older_than(every).await.unwrap()
    }

    #[tokio::test]
    async fn a_partial_send_accepts_the_sent_events_and_deletes_only_the_unsent_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::local(dir.path()).unwrap();
        let body = batch();
        let events: Vec<_> = parse_batch(&body, PayloadLimits::default())
            .unwrap()
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let queue = Picky {
            takes: |i| i != 2,
            got: Mutex::default(),
        };
        let id = CorrelationId::parse("c-1").unwrap();
        let results = accept(&queue, &blobs, &body, &events, &id).await.unwrap();
        assert_eq!(results[0].as_ref().unwrap().payload_mode, PayloadMode::Blob);
        assert_eq!(
            results[1].as_ref().unwrap().payload_mode,
            PayloadMode::Inline
        );
        assert!(results[2].is_err());
        // The sent message's blob stays, named by the key its message carries.
        let kept = queue.got.lock().unwrap()[0].blob_key.clone().unwrap();
        assert_eq!(blob_keys(&blobs).await, [kept]);
    }

    #[tokio::test]
    async fn when_the_queue_takes_nothing_every_blob_written_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::local(dir.path()).unwrap();
        let body = batch();
        let events: Vec<_> = parse_batch(&body, PayloadLimits::default())
            .unwrap()
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let queue = Picky {
            takes: |_| false,
            got: Mutex::default(),
        };
        let id = CorrelationId::parse("c-2").unwrap();
        let error = accept(&queue, &blobs, &body, &events, &id)
            .await
            .unwrap_err();
        assert!(matches!(error, AcceptError::Queue(_)), "{error:?}");
        assert!(blob_keys(&blobs).await.is_empty());
    }
}
