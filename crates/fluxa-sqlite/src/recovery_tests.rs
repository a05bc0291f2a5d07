//! Storage faults end without a restart: a database that cannot grow (SQLite's
//! `max_page_count`, standing in for a full disk) fails writes as `Unavailable`, and the same
//! open store and queue work again once it has room. The group-commit writer's own test
//! (`group_commit.rs`) covers a failing COMMIT; these cover the store and queue above it, and
//! the line between an outage and a refused statement ([`crate::is_refusal`]).

use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fluxa_core::{CorrelationId, EventId, EventType, PayloadHash, PayloadMode};
use fluxa_queue::{
    Consumer, DeadLetterAdmin, MessageAttributes, NewMessage, Producer, RedriveSelector,
};
use fluxa_store::{EventReader, NewEvent, Store, Write, WriteAction, WriteResult};
use sqlx::SqliteConnection;

use crate::{
    connect_options, migrate, pool_options, Pools, SecureDelete, SqliteQueue, SqliteReader,
    SqliteStore,
};

/// A payload far bigger than any free page the file may hold, so writing it needs new pages.
const BIG: usize = 256 * 1024;

/// A database file whose writer connections cannot grow it past the page count in `cap` (0: no
/// cap): SQLite's `max_page_count`, standing in for a full disk. The setting belongs to a
/// connection, and a failed transaction makes the pool throw its connection away, so every new
/// writer connection applies the cap too.
struct CappedFile {
    pools: Pools,
    cap: Arc<AtomicI64>,
}

impl CappedFile {
    async fn open(path: &Path, migrator: &sqlx::migrate::Migrator) -> Self {
        let cap = Arc::new(AtomicI64::new(0));
        let connection_cap = Arc::clone(&cap);
        let writer = pool_options(1)
            .after_connect(move |connection, _| {
                let n_pages = connection_cap.load(Ordering::SeqCst);
                Box::pin(async move {
                    if n_pages > 0 {
                        set_max_page_count(connection, n_pages).await;
                    }
                    Ok(())
                })
            })
            .connect_with(connect_options(path, SecureDelete::On).create_if_missing(true))
            .await
            .unwrap();
        let reader = pool_options(1)
            .connect_with(connect_options(path, SecureDelete::On).read_only(true))
            .await
            .unwrap();
        let pools = Pools { writer, reader };
        migrate(&pools, migrator, path).await.unwrap();
        Self { pools, cap }
    }

    /// Compacts the file and forbids it to grow: every write that needs a new page now fails
    /// with `SQLITE_FULL`, as on a full disk.
    async fn fill(&self) {
        let mut connection = self.pools.writer.acquire().await.unwrap();
        sqlx::query("VACUUM")
            .execute(&mut *connection)
            .await
            .unwrap();
        let n_pages: i64 = sqlx::query_scalar("PRAGMA page_count")
            .fetch_one(&mut *connection)
            .await
            .unwrap();
        self.cap.store(n_pages, Ordering::SeqCst);
        set_max_page_count(&mut connection, n_pages).await;
    }

    /// Gives the file room again.
    async fn free(&self) {
        self.cap.store(0, Ordering::SeqCst);
        let mut connection = self.pools.writer.acquire().await.unwrap();
        set_max_page_count(&mut connection, i64::from(u32::MAX - 1)).await;
    }
}

async fn set_max_page_count(connection: &mut SqliteConnection, n_pages: i64) {
    sqlx::query(&format!("PRAGMA max_page_count = {n_pages}"))
        .execute(connection)
        .await
        .unwrap();
}

fn message(n_bytes: usize) -> NewMessage {
    NewMessage {
        body: vec![b'm'; n_bytes],
        attributes: MessageAttributes::default(),
    }
}

fn store_write(event_id: &str, payload: Vec<u8>) -> Write {
    Write {
        event_id: EventId::parse(event_id).unwrap(),
        payload_sha256: PayloadHash::of(&payload),
        correlation_id: CorrelationId::parse("c").unwrap(),
        lease: None,
        action: WriteAction::Store(NewEvent {
            event_type: EventType::parse("t").unwrap(),
            source: None,
            occurred_at: None,
            payload: payload.into(),
            payload_mode: PayloadMode::Inline,
            received_at: chrono::Utc::now(),
        }),
    }
}

#[tokio::test]
async fn a_store_that_cannot_grow_fails_writes_as_unavailable_and_works_again_once_it_can() {
    let dir = tempfile::tempdir().unwrap();
    let file = CappedFile::open(&dir.path().join("store.db"), &crate::STORE_MIGRATIONS).await;
    let store = SqliteStore::new(file.pools.clone());
    let reader = SqliteReader::new(file.pools.clone());

    file.fill().await;
    for attempt in 0..3 {
        let error = store
            .apply(vec![store_write("big", vec![b'p'; BIG])])
            .await
            .expect_err("a write into a full database must fail");
        assert!(
            matches!(error, fluxa_store::Error::Unavailable(_)),
            "attempt {attempt}: a full database is an outage, not a refused value: {error:?}"
        );
    }

    file.free().await;
    let results = store
        .apply(vec![store_write("big", vec![b'p'; BIG])])
        .await
        .expect("the same store writes again once the database has room");
    assert_eq!(results, vec![WriteResult::Applied { lease: None }]);
    let stored = reader
        .event(&EventId::parse("big").unwrap())
        .await
        .unwrap()
        .expect("the event written after the fault is stored");
    assert_eq!(stored.payload, Some(vec![b'p'; BIG]));
}

#[tokio::test]
async fn a_queue_that_cannot_grow_fails_sends_and_redrives_as_unavailable_and_works_again_once_it_can(
) {
    let dir = tempfile::tempdir().unwrap();
    let file = CappedFile::open(&dir.path().join("queue.db"), &crate::QUEUE_MIGRATIONS).await;
    let config = fluxa_queue::QueueSettings {
        visibility_timeout: Duration::from_secs(60),
        max_receives: 3,
    };
    let queue = SqliteQueue::new(file.pools.clone(), config);
    // A dead letter big enough that moving it back needs new pages.
    queue.send(vec![message(BIG)]).await.unwrap();
    let received = queue.receive(1, Duration::ZERO).await.unwrap();
    let failure = fluxa_core::FailureInfo::new(fluxa_core::ErrorCode::InvalidMessage, "test");
    queue
        .dead_letter(&received.deliveries[0], &failure)
        .await
        .unwrap();
    let dead_letter_id =
        fluxa_core::ids::DeadLetterId::parse(&received.deliveries[0].message_id).unwrap();

    file.fill().await;
    for attempt in 0..3 {
        let error = queue
            .send(vec![message(BIG)])
            .await
            .expect_err("a send into a full database must fail");
        assert!(
            matches!(error.source, fluxa_queue::Error::Unavailable(_)),
            "attempt {attempt}: a full database is an outage: {error:?}"
        );
        let error = queue
            .redrive(&RedriveSelector::Filter(Default::default()), 500)
            .await
            .expect_err("a redrive into a full database must fail");
        assert!(
            matches!(error, fluxa_queue::Error::Unavailable(_)),
            "attempt {attempt}: a full database is an outage: {error:?}"
        );
    }

    file.free().await;
    queue
        .send(vec![message(BIG)])
        .await
        .expect("the same queue sends again once the database has room");
    let n_redriven = queue
        .redrive(&RedriveSelector::Id(dead_letter_id.clone()), 1)
        .await
        .expect("the same queue redrives again once the database has room");
    assert_eq!(n_redriven, 1);
    let received = queue.receive(10, Duration::ZERO).await.unwrap();
    assert_eq!(
        received.deliveries.len(),
        2,
        "the message sent after the fault and the redriven one"
    );
    assert!(received
        .deliveries
        .iter()
        .any(|delivery| delivery.message_id == dead_letter_id.as_str()));
}

#[tokio::test]
async fn what_a_statement_asked_is_a_refusal_and_an_unwritable_database_is_an_outage() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let writer = pool_options(1)
        .connect_with(connect_options(&path, SecureDelete::On).create_if_missing(true))
        .await
        .unwrap();
    let reader = pool_options(1)
        .connect_with(connect_options(&path, SecureDelete::On).read_only(true))
        .await
        .unwrap();
    sqlx::query("CREATE TABLE t (n INTEGER PRIMARY KEY)")
        .execute(&writer)
        .await
        .unwrap();
    sqlx::query("INSERT INTO t VALUES (1)")
        .execute(&writer)
        .await
        .unwrap();
    for (sql, what) in [
        ("INSERT INTO t VALUES (1)", "a unique violation"),
        ("SELECT * FROM missing", "a missing table"),
    ] {
        let error = sqlx::query(sql).execute(&writer).await.unwrap_err();
        assert!(crate::is_refusal(&error), "{what} is a refusal: {error}");
    }
    let error = sqlx::query("INSERT INTO t VALUES (2)")
        .execute(&reader)
        .await
        .unwrap_err();
    assert!(
        !crate::is_refusal(&error),
        "a database that cannot be written is an outage: {error}"
    );
}
