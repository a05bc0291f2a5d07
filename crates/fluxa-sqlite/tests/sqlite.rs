//! The SQLite backends against the shared conformance checks (`fluxa_queue::conformance`, `fluxa_store::conformance`).
//! SQLite has no `SKIP LOCKED`; these prove its single write lock gives the same guarantees,
//! with real concurrency against a real database file (two handles play two processes).

use std::time::Duration;

use fluxa_queue::QueueSettings;
use fluxa_sqlite::Backends;

async fn open(dir: &std::path::Path, visibility: Duration) -> Backends {
    let config = QueueSettings {
        visibility_timeout: visibility,
        max_receives: 3,
    };
    fluxa_sqlite::open(dir, config).await.unwrap()
}

fluxa_queue::queue_conformance_tests! {
    database: dir = tempfile::tempdir().unwrap(),
    open: |visibility| open(dir.path(), visibility).await.queue,
    run_sql: |sql| run_sql_on(dir.path(), "queue.db", sql),
}

fluxa_store::store_conformance_tests! {
    database: dir = tempfile::tempdir().unwrap(),
    open: {
        let backends = open(dir.path(), Duration::from_secs(1)).await;
        (backends.store, backends.reader)
    },
    run_sql: |sql| run_sql_on(dir.path(), "store.db", sql),
}

/// Runs one statement on the database file `name` in `dir` from a connection of its own, as
/// damage done outside Fluxa would.
async fn run_sql_on(dir: &std::path::Path, name: &str, sql: &str) {
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(dir.join(name));
    let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
    sqlx::query(sql).execute(&pool).await.unwrap();
    pool.close().await;
}

/// Right to erasure on disk: SQLite keeps deleted content in free space until it is reused, so
/// without `secure_delete` an erased payload could still be read from `store.db` with a hex
/// editor. Once the WAL is checkpointed, none of its bytes may remain, on b-tree pages or on
/// the overflow pages a large payload spills onto.
#[tokio::test]
async fn an_erased_payload_leaves_none_of_its_bytes_in_the_store_file() {
    use fluxa_core::{CorrelationId, EventId, EventType, PayloadHash, PayloadMode};
    use fluxa_store::{NewEvent, Store, StoreAdmin, Write, WriteAction};

    let dir = tempfile::tempdir().unwrap();
    let backends = open(dir.path(), Duration::from_secs(60)).await;
    let marker = "erase-me-7f3a";
    let small = format!("{{\"secret\":\"{marker}\"}}");
    let large = format!("{{\"secret\":\"{}\"}}", marker.repeat(3000));
    let mut writes = Vec::new();
    for (event_id, payload) in [("small", &small), ("large", &large)] {
        let payload = bytes::Bytes::from(payload.clone().into_bytes());
        writes.push(Write {
            event_id: EventId::parse(event_id).unwrap(),
            payload_sha256: PayloadHash::of(&payload),
            correlation_id: CorrelationId::parse("c").unwrap(),
            lease: None,
            action: WriteAction::Store(NewEvent {
                event_type: EventType::parse("t").unwrap(),
                source: None,
                occurred_at: None,
                payload,
                payload_mode: PayloadMode::Inline,
                received_at: chrono::Utc::now(),
            }),
        });
    }
    backends.store.apply(writes).await.unwrap();
    for event_id in ["small", "large"] {
        let erasure = backends
            .store
            .erase(&EventId::parse(event_id).unwrap(), false)
            .await
            .unwrap();
        assert!(erasure.event_deleted, "{event_id}");
    }
    drop(backends);

    let path = dir.path().join("store.db");
    let mut connection: sqlx::SqliteConnection =
        sqlx::Connection::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&mut connection)
        .await
        .unwrap();
    sqlx::Connection::close(connection).await.unwrap();
    for file in ["store.db", "store.db-wal"] {
        let bytes = std::fs::read(dir.path().join(file)).unwrap_or_default();
        let found = bytes
            .windows(marker.len())
            .filter(|window| *window == marker.as_bytes())
            .count();
        assert_eq!(
            found, 0,
            "{file} still holds the erased payload {found} times"
        );
    }
}
