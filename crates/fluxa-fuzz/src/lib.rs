//! The properties Fluxa's parsers must keep for any input whatsoever, one function per fuzz
//! target. A function returns normally when the property holds and panics when it does not,
//! which is what libFuzzer (through `fuzz/fuzz_targets/*`) and the corpus replay test
//! (`tests/corpus.rs`, on stable, in the normal suite) both look for.
//!
//! Each property restates the rule it checks independently of the code under test (a second,
//! simpler implementation), so a fuzzer finds wrong answers as well as crashes.

use fluxa_core::ingest::{parse_batch, parse_event, IngestError, PayloadLimits, ValidatedEvent};
use fluxa_core::{CorrelationId, EventId, EventType, FluxaTask, PayloadHash, Source};
use serde::de::IgnoredAny;

/// Small limits, so that the fuzzer reaches both sides of them with short inputs.
const SMALL: PayloadLimits = PayloadLimits {
    max_bytes: 64,
    max_depth: 4,
};

/// A property: returns when it holds for the input, panics when it does not.
pub type Property = fn(&[u8]);

/// The names of the targets, as `fuzz/fuzz_targets/<name>.rs` and `fuzz/corpus/<name>/`.
pub const TARGETS: &[(&str, Property)] = &[
    ("ingest_event", ingest_event),
    ("ingest_batch", ingest_batch),
    ("ids", ids),
    ("queue_message", queue_message),
    ("config_file", config_file),
    ("cursor", cursor),
];

/// The listing cursors' decoder: never panics on any text, refuses what another listing or
/// other filters made, and what it accepts re-encodes to a cursor naming the same position;
/// and any position survives an encode and decode unchanged.
pub fn cursor(data: &[u8]) {
    use fluxa_core::cursor::{decode, encode, fingerprint, Listing, Position};
    let filters = fingerprint(&[Some("t"), None]);
    let text = String::from_utf8_lossy(data);
    if let Ok(position) = decode(Listing::Events, &filters, &text) {
        let again = encode(Listing::Events, &filters, &position);
        assert_eq!(decode(Listing::Events, &filters, &again), Ok(position));
        assert!(decode(Listing::DeadLetters, &filters, &text).is_err());
        assert!(decode(Listing::Events, &fingerprint(&[]), &text).is_err());
    }
    // The same bytes as a position: 8 for the time, the rest for the id.
    if data.len() >= 8 {
        let (time, id) = data.split_at(8);
        let micros = i64::from_le_bytes(time.try_into().expect("8 bytes"));
        // Only the instants chrono can hold; the store never holds others.
        if let Some(at) = chrono::DateTime::from_timestamp_micros(micros) {
            let position = Position {
                at,
                id: String::from_utf8_lossy(id).into_owned(),
            };
            let text = encode(Listing::DeadLetters, &filters, &position);
            if text.len() <= fluxa_core::cursor::MAX_CURSOR_LEN {
                assert_eq!(decode(Listing::DeadLetters, &filters, &text), Ok(position));
            }
        }
    }
}

/// `POST /v1/events`' validator: never panics, and whatever it accepts keeps every rule.
pub fn ingest_event(data: &[u8]) {
    for limits in [SMALL, PayloadLimits::default()] {
        match parse_event(data, limits) {
            Ok(event) => check_accepted(data, &event, limits),
            Err(error) => check_refusal(&error),
        }
    }
}

/// `POST /v1/events/batch`' validator: the same rules per item, and never more items than
/// the contract allows.
pub fn ingest_batch(data: &[u8]) {
    for limits in [SMALL, PayloadLimits::default()] {
        match parse_batch(data, limits) {
            Ok(items) => {
                assert!(!items.is_empty() && items.len() <= fluxa_core::ingest::MAX_BATCH_EVENTS);
                for item in items {
                    match item {
                        Ok(event) => check_accepted(data, &event, limits),
                        Err(error) => check_refusal(&error),
                    }
                }
            }
            Err(error) => check_refusal(&error),
        }
    }
}

/// Every id and text field parser accepts exactly what the contract's rules allow.
pub fn ids(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let id_rule = |t: &str| {
        (1..=128).contains(&t.chars().count())
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._:-".contains(c))
    };
    assert_eq!(
        EventId::parse(text).is_ok(),
        id_rule(text) && text != "." && text != "..",
        "event_id {text:?}"
    );
    assert_eq!(
        CorrelationId::parse(text).is_ok(),
        id_rule(text),
        "correlation id {text:?}"
    );
    let no_control = !text.chars().any(char::is_control);
    let n = text.chars().count();
    assert_eq!(
        EventType::parse(text).is_ok(),
        (1..=128).contains(&n) && no_control,
        "event_type {text:?}"
    );
    assert_eq!(
        Source::parse(text).is_ok(),
        n <= 256 && no_control,
        "source {text:?}"
    );
    if let Ok(id) = EventId::parse(text) {
        assert_eq!(id.as_str(), text);
    }
}

/// The queue message decoder: never panics; a decoded message encodes to a message that
/// decodes to the same encoding, and an inline payload is borrowed from the input unchanged.
pub fn queue_message(data: &[u8]) {
    let Ok(FluxaTask::EventV1(message)) = FluxaTask::decode(data) else {
        return;
    };
    if let Some(payload) = message.payload_inline {
        assert!(is_within(data, payload.get().as_bytes()));
    }
    let encoded = FluxaTask::EventV1(message).encode();
    let again = FluxaTask::decode(&encoded).expect("an encoded message decodes");
    assert_eq!(again.encode(), encoded);
}

/// Secrets the config file property plants at the top of every file it loads.
const PLANTED_PASSWORD: &str = "s3cr3t-pw-7f1c";
const PLANTED_TOKEN: &str = "s3cr3t-token-9b2e";

/// The `--config` file loader: never panics, and whatever follows a database URL and API
/// tokens in the file, no error it gives quotes either secret.
pub fn config_file(data: &[u8]) {
    let Ok(rest) = std::str::from_utf8(data) else {
        return;
    };
    let text = format!(
        "database_url = \"postgres://fluxa:{PLANTED_PASSWORD}@db.internal/fluxa\"\n\
         api_tokens = \"ingest+read={PLANTED_TOKEN}\"\n{rest}"
    );
    // The loader reads a path, as the binary does; one file per process, rewritten each time.
    let path = std::env::temp_dir().join(format!("fluxa-fuzz-config-{}.toml", std::process::id()));
    std::fs::write(&path, text).expect("write the config file");
    let sources = fluxa_host::Sources {
        file: Some(path),
        ..fluxa_host::Sources::default()
    };
    if let Err(error) = fluxa_host::Config::load(sources) {
        let message = format!("{error:#} {error:?}");
        assert!(
            !message.contains(PLANTED_PASSWORD) && !message.contains(PLANTED_TOKEN),
            "a config error quotes a secret: {message}"
        );
    }
}

fn check_accepted(body: &[u8], event: &ValidatedEvent<'_>, limits: PayloadLimits) {
    let payload = event.payload.get().as_bytes();
    // The payload is the exact bytes of the body, not a re-serialisation.
    assert!(is_within(body, payload));
    assert_eq!(event.payload_sha256, PayloadHash::of(payload));
    assert!(payload.len() <= limits.max_bytes);
    assert!(serde_json::from_slice::<IgnoredAny>(payload).is_ok());
    // serde_json's tree parser gives up at 128 levels, so a payload accepted under a lower
    // limit must parse as a tree (unless a number is beyond f64, which JSON allows and the
    // tree cannot hold), and then its depth is measured independently.
    if limits.max_depth < 120 {
        match serde_json::from_slice::<serde_json::Value>(payload) {
            Ok(value) => assert!(depth(&value) <= limits.max_depth),
            Err(e) => assert!(
                e.to_string().starts_with("number out of range"),
                "an accepted shallow payload does not parse: {e}"
            ),
        }
    }
    assert!(EventId::parse(event.event_id.as_str()).is_ok());
}

fn check_refusal(error: &IngestError) {
    // A refusal always says why (its code is its variant, mapped once in fluxa-api).
    assert!(!error.to_string().is_empty());
}

fn depth(value: &serde_json::Value) -> usize {
    match value {
        serde_json::Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        serde_json::Value::Object(members) => 1 + members.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Whether `part` lies inside `whole` (is borrowed from it, not copied).
fn is_within(whole: &[u8], part: &[u8]) -> bool {
    let whole = whole.as_ptr_range();
    let part = part.as_ptr_range();
    whole.start <= part.start && part.end <= whole.end
}
