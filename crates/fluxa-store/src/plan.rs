//! How a [`Write`] meets the idempotency record it targets: the one set of rules both backends
//! apply, so the SQL in each backend only reads the record and carries out the decision.

use chrono::{DateTime, Utc};
use fluxa_core::{FailureInfo, PayloadHash};

use crate::{Status, Write, WriteAction, WriteResult};

/// The parts of an existing idempotency record that decide a write. A backend reads it from
/// the record's row; a row whose hash does not parse is `Error::Corrupt` there, so a decision
/// never rests on a guessed hash.
#[derive(Clone, Debug)]
pub struct RecordState {
    pub status: Status,
    pub payload_sha256: Option<PayloadHash>,
    pub lease_token: Option<String>,
    /// `processing` with a lease that has not expired, by the database's clock.
    pub lease_live: bool,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub attempts: u32,
}

/// What to do with one write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No record yet: insert one with `attempts = 1`.
    Insert,
    /// Update the record; a take-over (claiming a failed or expired record) counts an attempt.
    Update { take_over: bool },
    /// Write nothing and answer this.
    Skip(WriteResult),
    /// The record breaks a rule every write keeps, so no answer is right: the backend reports
    /// `Error::Corrupt` with this reason and writes nothing.
    Corrupt(&'static str),
}

/// The rules of contract section 3 and seed invariants 1 and 2, in one place.
pub fn decide(write: &Write, existing: Option<&RecordState>) -> Decision {
    match (&write.lease, existing) {
        // An erased event stays erased, whoever asks and whatever lease they hold.
        (_, Some(record)) if record.status == Status::Erased => Decision::Skip(WriteResult::Erased),
        (Some(lease), Some(record))
            if record.status == Status::Processing
                && record.lease_token.as_deref() == Some(lease.token.as_str()) =>
        {
            Decision::Update { take_over: false }
        }
        (Some(_), _) => Decision::Skip(WriteResult::LeaseLost),
        (None, None) => Decision::Insert,
        (None, Some(record)) => match (record.status, &record.payload_sha256) {
            (Status::Processed, Some(payload_sha256)) => {
                Decision::Skip(WriteResult::AlreadyProcessed {
                    payload_sha256: payload_sha256.clone(),
                })
            }
            // Every write that makes a record `processed` sets its hash, so one without is
            // damaged: answering with a made-up hash would turn a duplicate into a conflict.
            (Status::Processed, None) => {
                Decision::Corrupt("a processed record has no payload hash")
            }
            (Status::Processing, _) if record.lease_live => Decision::Skip(WriteResult::Busy {
                until: record.lease_expires_at.unwrap_or_else(Utc::now),
            }),
            // An expired lease (its worker died or gave up) or a failed record: take over.
            (Status::Processing | Status::Failed, _) => Decision::Update { take_over: true },
            (Status::Erased, _) => Decision::Skip(WriteResult::Erased),
        },
    }
}

impl WriteAction {
    /// The record's status once the write has applied.
    pub fn status(&self) -> Status {
        match self {
            Self::Lease(_) | Self::Release(_) => Status::Processing,
            Self::Store(_) => Status::Processed,
            Self::Fail(_) => Status::Failed,
        }
    }

    /// The error the record remembers afterwards: `Some(None)` clears it, `None` keeps
    /// whatever it had (a new lease does not forget why the last attempt failed).
    pub fn last_error(&self) -> Option<Option<&FailureInfo>> {
        match self {
            Self::Lease(_) => None,
            Self::Store(_) => Some(None),
            Self::Fail(error) | Self::Release(error) => Some(Some(error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use fluxa_core::{CorrelationId, EventId, PayloadHash};

    use super::*;
    use crate::Lease;

    fn write(lease: Option<&str>, action: WriteAction) -> Write {
        Write {
            event_id: EventId::parse("e").unwrap(),
            payload_sha256: PayloadHash::of(b"1"),
            correlation_id: CorrelationId::parse("c").unwrap(),
            lease: lease.map(|token| Lease {
                event_id: EventId::parse("e").unwrap(),
                token: token.to_owned(),
                attempts: 1,
            }),
            action,
        }
    }

    fn record(status: Status, token: Option<&str>, lease_live: bool) -> RecordState {
        RecordState {
            status,
            payload_sha256: Some(PayloadHash::of(b"1")),
            lease_token: token.map(str::to_owned),
            lease_live,
            lease_expires_at: None,
            attempts: 1,
        }
    }

    #[test]
    fn a_claim_without_a_lease_inserts_takes_over_or_steps_aside_as_the_record_says() {
        let lease = || write(None, WriteAction::Lease(Duration::from_secs(1)));
        assert_eq!(decide(&lease(), None), Decision::Insert);
        let failed = record(Status::Failed, None, false);
        assert_eq!(
            decide(&lease(), Some(&failed)),
            Decision::Update { take_over: true }
        );
        let expired = record(Status::Processing, Some("t"), false);
        assert_eq!(
            decide(&lease(), Some(&expired)),
            Decision::Update { take_over: true }
        );
        let live = record(Status::Processing, Some("t"), true);
        assert!(matches!(
            decide(&lease(), Some(&live)),
            Decision::Skip(WriteResult::Busy { .. })
        ));
        let processed = record(Status::Processed, None, false);
        assert_eq!(
            decide(&lease(), Some(&processed)),
            Decision::Skip(WriteResult::AlreadyProcessed {
                payload_sha256: PayloadHash::of(b"1")
            })
        );
    }

    #[test]
    fn a_processed_record_without_a_hash_is_corrupt_rather_than_answered_with_a_made_up_one() {
        let damaged = RecordState {
            payload_sha256: None,
            ..record(Status::Processed, None, false)
        };
        let lease = write(None, WriteAction::Lease(Duration::from_secs(1)));
        assert!(matches!(
            decide(&lease, Some(&damaged)),
            Decision::Corrupt(_)
        ));
    }

    #[test]
    fn an_erased_record_refuses_every_write_with_or_without_a_lease() {
        let erased = RecordState {
            payload_sha256: None,
            ..record(Status::Erased, None, false)
        };
        let store = WriteAction::Store(crate::NewEvent {
            event_type: fluxa_core::EventType::parse("t").unwrap(),
            source: None,
            occurred_at: None,
            payload: bytes::Bytes::from_static(b"1"),
            payload_mode: fluxa_core::PayloadMode::Inline,
            received_at: Utc::now(),
        });
        for write in [
            write(None, WriteAction::Lease(Duration::from_secs(1))),
            write(None, store.clone()),
            write(Some("t"), store),
        ] {
            assert_eq!(
                decide(&write, Some(&erased)),
                Decision::Skip(WriteResult::Erased)
            );
        }
    }

    #[test]
    fn only_the_current_lease_holder_can_finish_a_leased_event() {
        let fail = FailureInfo::new(fluxa_core::ErrorCode::BlobMissing, "gone");
        let held = record(Status::Processing, Some("mine"), true);
        assert_eq!(
            decide(
                &write(Some("mine"), WriteAction::Fail(fail.clone())),
                Some(&held)
            ),
            Decision::Update { take_over: false }
        );
        assert_eq!(
            decide(
                &write(Some("old"), WriteAction::Fail(fail.clone())),
                Some(&held)
            ),
            Decision::Skip(WriteResult::LeaseLost)
        );
        assert!(matches!(
            decide(&write(None, WriteAction::Release(fail)), Some(&held)),
            Decision::Skip(WriteResult::Busy { .. })
        ));
    }
}
