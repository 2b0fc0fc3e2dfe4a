//! Integration tests of the PostgreSQL spool against a real server
//! (127.0.0.1:5432 or `WSMTP_TEST_PG`, see `tests/common/db.rs`).

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use common::db::TestDb;
use sha2::{Digest, Sha256};
use tokio_postgres::error::SqlState;
use wsmtp::queue::{
    Envelope, ListFilter, ListState, Queue, QueueConfig, QueueError, QueueId, SpoolRecipient,
    new_queue_id,
};

fn config(db: &TestDb) -> QueueConfig {
    QueueConfig {
        pool_size: 4,
        ..QueueConfig::new(db.url.clone())
    }
}

async fn migrated_queue(db: &TestDb, chunk_size: usize) -> Queue {
    let queue = Queue::new(&QueueConfig {
        chunk_size,
        ..config(db)
    })
    .expect("valid queue config");
    queue.migrate().await.expect("migrate");
    queue
}

fn envelope() -> Envelope {
    Envelope {
        id: new_queue_id(),
        sender: "alice@example.org".to_owned(),
        client_ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
        helo: "client.example.org".to_owned(),
        smtputf8: false,
        body_type: Some("8bitmime".to_owned()),
        dsn_ret: Some("HDRS".to_owned()),
        dsn_envid: Some("envid-42".to_owned()),
    }
}

fn recipient(address: &str) -> SpoolRecipient {
    SpoolRecipient {
        address: address.to_owned(),
        route_group: None,
        orcpt: None,
        notify: None,
    }
}

async fn count(client: &tokio_postgres::Client, sql: &str, id: QueueId) -> i64 {
    client
        .query_one(sql, &[&id])
        .await
        .expect("count query")
        .get(0)
}

async fn message_state(client: &tokio_postgres::Client, id: QueueId) -> Option<String> {
    client
        .query_opt("SELECT state FROM messages WHERE id = $1", &[&id])
        .await
        .expect("state query")
        .map(|row| row.get(0))
}

#[tokio::test]
async fn migrate_twice_succeeds() {
    let db = TestDb::create().await;
    let queue = Queue::new(&config(&db)).expect("valid queue config");

    queue.migrate().await.expect("first migrate");
    queue.migrate().await.expect("second migrate");

    let client = db.connect().await;
    let rows = client
        .query(
            "SELECT version FROM refinery_schema_history ORDER BY version",
            &[],
        )
        .await
        .expect("history query");
    let versions: Vec<i32> = rows.iter().map(|row| row.get(0)).collect();
    let migration_files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .expect("migrations folder")
        .count();
    assert_eq!(
        versions.len(),
        migration_files,
        "each migration is recorded once: {versions:?}"
    );
    assert_eq!(versions[0], 1);
}

#[tokio::test]
async fn small_message_reads_back_exactly() {
    let db = TestDb::create().await;
    let queue = migrated_queue(&db, 256 * 1024).await;
    let body = b"Subject: test\r\n\r\nHello \xc3\xa9\r\n".to_vec();
    let envelope = envelope();
    let id = envelope.id;

    let mut writer = queue.begin(envelope);
    assert_eq!(writer.id(), id);
    writer.write(&body[..10]).await.expect("write head");
    writer.write(&body[10..]).await.expect("write tail");
    let client = db.connect().await;
    assert_eq!(
        message_state(&client, id).await,
        None,
        "no row before commit"
    );

    let recipients = vec![
        SpoolRecipient {
            address: "bob@example.net".to_owned(),
            route_group: Some("relay-a".to_owned()),
            orcpt: Some("rfc822;bob@example.net".to_owned()),
            notify: Some("SUCCESS,FAILURE".to_owned()),
        },
        recipient("carol@example.com"),
    ];
    writer.commit(&recipients).await.expect("commit");

    assert_eq!(queue.read_body(id).await.expect("read body"), body);

    let detail = queue.show(id).await.expect("show").expect("message exists");
    assert_eq!(detail.state, "ready");
    assert_eq!(detail.size, Some(body.len() as i64));
    assert_eq!(detail.chunk_count, Some(1));
    assert_eq!(
        detail.body_sha256.as_deref(),
        Some(Sha256::digest(&body).as_slice())
    );
    assert_eq!(
        detail.body_type.as_deref(),
        Some("8BITMIME"),
        "keyword upper-cased"
    );
    assert!(detail.ready_at.is_some());
    assert_eq!(detail.recipient_count, 2);
    assert_eq!(detail.recipients.len(), 2);
    let bob = &detail.recipients[0];
    assert_eq!(bob.address, "bob@example.net");
    assert_eq!(bob.route_group.as_deref(), Some("relay-a"));
    assert_eq!(bob.orcpt.as_deref(), Some("rfc822;bob@example.net"));
    assert_eq!(bob.notify.as_deref(), Some("SUCCESS,FAILURE"));
    assert_eq!(bob.state, "queued");
    assert_eq!(bob.attempts, 0);
    assert_eq!(bob.last_reply, None);
    let carol = &detail.recipients[1];
    assert_eq!(carol.address, "carol@example.com");
    assert_eq!(carol.route_group, None);
    assert_eq!(carol.notify, None);
}

#[tokio::test]
async fn three_chunk_message_reads_back_exactly() {
    let db = TestDb::create().await;
    let queue = migrated_queue(&db, 16).await;
    let body: Vec<u8> = (0u8..40).collect();
    let envelope = envelope();
    let id = envelope.id;

    let mut writer = queue.begin(envelope);
    for piece in body.chunks(7) {
        writer.write(piece).await.expect("write");
    }
    let client = db.connect().await;
    assert_eq!(
        message_state(&client, id).await.as_deref(),
        Some("receiving"),
        "first full chunk inserted the row"
    );
    writer
        .commit(&[recipient("bob@example.net")])
        .await
        .expect("commit");

    let chunks = client
        .query(
            "SELECT seq, octet_length(data) FROM message_chunks WHERE message_id = $1 ORDER BY seq",
            &[&id],
        )
        .await
        .expect("chunk query");
    let layout: Vec<(i32, i32)> = chunks.iter().map(|row| (row.get(0), row.get(1))).collect();
    assert_eq!(layout, vec![(0, 16), (1, 16), (2, 8)]);
    assert_eq!(queue.read_body(id).await.expect("read body"), body);
}

#[tokio::test]
async fn exact_multiple_skips_empty_chunk() {
    let db = TestDb::create().await;
    let queue = migrated_queue(&db, 16).await;
    let body = vec![b'x'; 32];
    let envelope = envelope();
    let id = envelope.id;

    let mut writer = queue.begin(envelope);
    writer.write(&body).await.expect("write");
    writer
        .commit(&[recipient("bob@example.net")])
        .await
        .expect("commit");

    let detail = queue.show(id).await.expect("show").expect("message exists");
    assert_eq!(detail.chunk_count, Some(2));
    assert_eq!(queue.read_body(id).await.expect("read body"), body);
}

#[tokio::test]
async fn empty_body_commits() {
    let db = TestDb::create().await;
    let queue = migrated_queue(&db, 16).await;
    let envelope = envelope();
    let id = envelope.id;

    queue
        .begin(envelope)
        .commit(&[recipient("bob@example.net")])
        .await
        .expect("commit");

    let detail = queue.show(id).await.expect("show").expect("message exists");
    assert_eq!(detail.size, Some(0));
    assert_eq!(detail.chunk_count, Some(0));
    assert!(queue.read_body(id).await.expect("read body").is_empty());
}

/// Returns the peak resident set size of this process (Linux only).
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Streams 100 MiB in 64 KiB writes and checks size, digest and, on Linux,
/// the peak RSS. The body is read back through `copy_body` into a sink, so
/// the test itself keeps no full copy either.
#[tokio::test]
async fn hundred_mib_message_commits() {
    const TOTAL: usize = 100 * 1024 * 1024;
    const WRITE: usize = 64 * 1024;
    let db = TestDb::create().await;
    let queue = migrated_queue(&db, wsmtp::queue::DEFAULT_CHUNK_SIZE).await;
    let envelope = envelope();
    let id = envelope.id;

    let started = Instant::now();
    let mut writer = queue.begin(envelope);
    let mut block = vec![0u8; WRITE];
    let mut expected = Sha256::new();
    for index in 0..TOTAL / WRITE {
        // Vary the content per write so misordered chunks change the digest.
        block[..8].copy_from_slice(&(index as u64).to_be_bytes());
        block[8..].fill((index % 251) as u8);
        expected.update(&block);
        writer.write(&block).await.expect("write");
    }
    assert_eq!(writer.size(), TOTAL as u64);
    writer
        .commit(&[recipient("bob@example.net")])
        .await
        .expect("commit");
    eprintln!("stored 100 MiB in {:?}", started.elapsed());
    if let Some(peak_kib) = peak_rss_kib() {
        // The body is 100 MiB; a peak far below that shows that neither the
        // writer nor the driver held the whole body. Other tests of this
        // binary run in parallel but use little memory.
        assert!(peak_kib < 64 * 1024, "peak RSS {peak_kib} KiB");
    }

    let detail = queue.show(id).await.expect("show").expect("message exists");
    assert_eq!(detail.size, Some(TOTAL as i64));
    assert_eq!(detail.chunk_count, Some(400));
    assert_eq!(
        detail.body_sha256.as_deref(),
        Some(expected.finalize().as_slice())
    );

    // copy_body checks size and digest against the message row.
    let copied = queue
        .copy_body(id, &mut tokio::io::sink())
        .await
        .expect("copy body");
    assert_eq!(copied, TOTAL as u64);
}

#[tokio::test]
async fn abort_leaves_nothing() {
    let db = TestDb::create().await;
    let queue = migrated_queue(&db, 16).await;
    let envelope = envelope();
    let id = envelope.id;

    let mut writer = queue.begin(envelope);
    writer.write(&[b'a'; 50]).await.expect("write");
    let client = db.connect().await;
    assert_eq!(
        message_state(&client, id).await.as_deref(),
        Some("receiving")
    );
    writer.abort().await;

    assert_eq!(message_state(&client, id).await, None);
    let chunks = count(
        &client,
        "SELECT count(*) FROM message_chunks WHERE message_id = $1",
        id,
    )
    .await;
    assert_eq!(chunks, 0);
}

#[tokio::test]
async fn dropped_writer_is_removed_by_janitor() {
    let db = TestDb::create().await;
    let queue = migrated_queue(&db, 16).await;
    let envelope = envelope();
    let id = envelope.id;

    let mut writer = queue.begin(envelope);
    writer.write(&[b'a'; 50]).await.expect("write");
    drop(writer);

    let client = db.connect().await;
    assert_eq!(
        message_state(&client, id).await.as_deref(),
        Some("receiving")
    );
    let listed = queue
        .list(&ListFilter {
            state: Some(ListState::Ready),
            ..ListFilter::default()
        })
        .await
        .expect("list");
    assert!(
        listed.is_empty(),
        "a dropped writer leaves no ready message"
    );

    assert_eq!(
        queue.remove_expired_receiving().await.expect("janitor"),
        0,
        "not expired yet"
    );
    client
        .execute(
            "UPDATE messages SET expires_at = now() - interval '1 second' WHERE id = $1",
            &[&id],
        )
        .await
        .expect("expire");
    assert_eq!(queue.remove_expired_receiving().await.expect("janitor"), 1);
    assert_eq!(message_state(&client, id).await, None);
    let chunks = count(
        &client,
        "SELECT count(*) FROM message_chunks WHERE message_id = $1",
        id,
    )
    .await;
    assert_eq!(chunks, 0, "chunks cascade");
}

#[tokio::test]
async fn commit_after_janitor_removal_fails() {
    let db = TestDb::create().await;
    let queue = migrated_queue(&db, 16).await;
    let envelope = envelope();
    let id = envelope.id;

    let mut writer = queue.begin(envelope);
    writer.write(&[b'a'; 50]).await.expect("write");
    let client = db.connect().await;
    client
        .execute(
            "UPDATE messages SET expires_at = now() - interval '1 second' WHERE id = $1",
            &[&id],
        )
        .await
        .expect("expire");
    assert_eq!(queue.remove_expired_receiving().await.expect("janitor"), 1);

    let error = writer
        .commit(&[recipient("bob@example.net")])
        .await
        .expect_err("commit of a removed message");
    assert!(matches!(error, QueueError::NotReceiving { .. }), "{error}");
    assert!(error.is_transient());
    assert_eq!(message_state(&client, id).await, None);
}

#[tokio::test]
async fn write_after_removal_fails() {
    let db = TestDb::create().await;
    let queue = migrated_queue(&db, 16).await;
    let envelope = envelope();
    let id = envelope.id;

    let mut writer = queue.begin(envelope);
    writer.write(&[b'a'; 20]).await.expect("write");
    let client = db.connect().await;
    client
        .execute(
            "UPDATE messages SET expires_at = now() - interval '1 second' WHERE id = $1",
            &[&id],
        )
        .await
        .expect("expire");
    assert_eq!(queue.remove_expired_receiving().await.expect("janitor"), 1);

    // The next full chunk finds the row gone.
    let error = writer
        .write(&[b'b'; 20])
        .await
        .expect_err("write to removed message");
    assert!(matches!(error, QueueError::NotReceiving { .. }), "{error}");
    let error = writer.write(b"c").await.expect_err("write after failure");
    assert!(matches!(error, QueueError::WriterFailed { .. }), "{error}");
    let error = writer
        .commit(&[recipient("bob@example.net")])
        .await
        .expect_err("commit after failure");
    assert!(matches!(error, QueueError::WriterFailed { .. }), "{error}");
    assert_eq!(message_state(&client, id).await, None);
}

#[tokio::test]
async fn active_writer_extends_expiry() {
    let db = TestDb::create().await;
    let queue = Queue::new(&QueueConfig {
        chunk_size: 16,
        receiving_ttl: Duration::from_secs(4),
        ..config(&db)
    })
    .expect("valid queue config");
    queue.migrate().await.expect("migrate");
    let envelope = envelope();
    let id = envelope.id;
    let client = db.connect().await;
    let expires_at = async || -> time::OffsetDateTime {
        client
            .query_one("SELECT expires_at FROM messages WHERE id = $1", &[&id])
            .await
            .expect("expires_at query")
            .get(0)
    };

    let mut writer = queue.begin(envelope);
    writer.write(&[b'a'; 20]).await.expect("first chunk");
    let first = expires_at().await;

    // Past a quarter of the TTL, the next chunk flush moves expires_at.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    writer.write(&[b'b'; 20]).await.expect("second chunk");
    let second = expires_at().await;
    assert!(second > first, "expires_at {second} not after {first}");

    writer
        .commit(&[recipient("bob@example.net")])
        .await
        .expect("commit");
    assert_eq!(queue.read_body(id).await.expect("read body").len(), 40);
}

#[tokio::test]
async fn janitor_keeps_ready_messages() {
    let db = TestDb::create().await;
    let queue = migrated_queue(&db, 16).await;
    let envelope = envelope();
    let id = envelope.id;
    let mut writer = queue.begin(envelope);
    writer.write(b"body").await.expect("write");
    writer
        .commit(&[recipient("bob@example.net")])
        .await
        .expect("commit");

    let client = db.connect().await;
    client
        .execute(
            "UPDATE messages SET expires_at = now() - interval '1 second' WHERE id = $1",
            &[&id],
        )
        .await
        .expect("expire");
    assert_eq!(queue.remove_expired_receiving().await.expect("janitor"), 0);
    assert_eq!(message_state(&client, id).await.as_deref(), Some("ready"));
}

#[tokio::test]
async fn commit_without_recipients_fails() {
    let db = TestDb::create().await;
    let queue = migrated_queue(&db, 16).await;
    let envelope = envelope();
    let id = envelope.id;
    let mut writer = queue.begin(envelope);
    writer.write(&[b'a'; 50]).await.expect("write");

    let error = writer
        .commit(&[])
        .await
        .expect_err("commit without recipients");
    assert!(matches!(error, QueueError::NoRecipients { .. }), "{error}");

    let client = db.connect().await;
    assert_eq!(
        message_state(&client, id).await,
        None,
        "partial message deleted"
    );
}

/// Inserts a `receiving` message with `chunks` chunks of 4 bytes each.
async fn insert_raw_message(client: &tokio_postgres::Client, chunks: i32) -> QueueId {
    let id = new_queue_id();
    client
        .execute(
            "INSERT INTO messages (id, sender, client_ip, helo) VALUES ($1, '', '127.0.0.1', 'raw')",
            &[&id],
        )
        .await
        .expect("insert message");
    for seq in 0..chunks {
        client
            .execute(
                "INSERT INTO message_chunks (message_id, seq, data) VALUES ($1, $2, '\\x01020304')",
                &[&id, &seq],
            )
            .await
            .expect("insert chunk");
    }
    id
}

async fn try_mark_ready(
    client: &tokio_postgres::Client,
    id: QueueId,
    size: Option<i64>,
    chunk_count: Option<i32>,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "UPDATE messages SET state = 'ready', ready_at = now(), size = $2, chunk_count = $3,
                    body_sha256 = sha256('x'::bytea)
              WHERE id = $1",
            &[&id, &size, &chunk_count],
        )
        .await
}

fn assert_check_violation(result: Result<u64, tokio_postgres::Error>, expected_text: &str) {
    let error = result.expect_err("trigger rejects ready");
    let db_error = error.as_db_error().expect("server error");
    assert_eq!(
        db_error.code(),
        &SqlState::CHECK_VIOLATION,
        "{}",
        db_error.message()
    );
    assert!(
        db_error.message().contains(expected_text),
        "message {:?} lacks {expected_text:?}",
        db_error.message()
    );
}

#[tokio::test]
async fn trigger_rejects_incomplete_ready() {
    let db = TestDb::create().await;
    migrated_queue(&db, 16).await;
    let client = db.connect().await;

    // Two chunks stored, three claimed.
    let id = insert_raw_message(&client, 2).await;
    assert_check_violation(
        try_mark_ready(&client, id, Some(8), Some(3)).await,
        "2 chunks stored",
    );

    // A gap: chunks 0 and 2, two claimed.
    client
        .execute(
            "DELETE FROM message_chunks WHERE message_id = $1 AND seq = 1",
            &[&id],
        )
        .await
        .expect("delete chunk");
    client
        .execute(
            "INSERT INTO message_chunks (message_id, seq, data) VALUES ($1, 2, '\\x01020304')",
            &[&id],
        )
        .await
        .expect("insert chunk 2");
    assert_check_violation(
        try_mark_ready(&client, id, Some(8), Some(2)).await,
        "last seq 2",
    );

    // Size disagrees with the stored octets.
    let id = insert_raw_message(&client, 2).await;
    assert_check_violation(
        try_mark_ready(&client, id, Some(9), Some(2)).await,
        "chunks hold 8 octets",
    );

    // Body fields missing.
    assert_check_violation(try_mark_ready(&client, id, None, Some(2)).await, "missing");

    // The complete message passes.
    assert_eq!(
        try_mark_ready(&client, id, Some(8), Some(2))
            .await
            .expect("complete"),
        1
    );
}

#[tokio::test]
async fn trigger_freezes_ready_body() {
    let db = TestDb::create().await;
    migrated_queue(&db, 16).await;
    let client = db.connect().await;
    let id = insert_raw_message(&client, 1).await;
    try_mark_ready(&client, id, Some(4), Some(1))
        .await
        .expect("complete");

    let result = client
        .execute(
            "INSERT INTO message_chunks (message_id, seq, data) VALUES ($1, 1, '\\x05')",
            &[&id],
        )
        .await;
    assert_check_violation(result, "cannot change");

    let result = client
        .execute(
            "UPDATE messages SET state = 'receiving' WHERE id = $1",
            &[&id],
        )
        .await;
    assert_check_violation(result, "cannot return");
}

#[tokio::test]
async fn list_and_show_return_stored_values() {
    let db = TestDb::create().await;
    let queue = migrated_queue(&db, 16).await;

    let first = Envelope {
        sender: String::new(),
        client_ip: IpAddr::V6(Ipv6Addr::LOCALHOST),
        smtputf8: true,
        body_type: None,
        dsn_ret: None,
        dsn_envid: None,
        ..envelope()
    };
    let first_id = first.id;
    let mut writer = queue.begin(first);
    writer.write(b"first body").await.expect("write");
    writer
        .commit(&[recipient("a@example.org"), recipient("b@example.org")])
        .await
        .expect("commit");

    let second = envelope();
    let second_id = second.id;
    let mut receiving = queue.begin(second);
    receiving.write(&[b'z'; 40]).await.expect("write");

    let all = queue.list(&ListFilter::default()).await.expect("list all");
    let ids: Vec<QueueId> = all.iter().map(|m| m.id).collect();
    assert_eq!(ids, vec![first_id, second_id], "oldest first");
    assert_eq!(all[0].state, "ready");
    assert_eq!(all[0].sender, "", "null reverse-path");
    assert_eq!(all[0].size, Some(10));
    assert_eq!(all[0].recipient_count, 2);
    assert_eq!(all[1].state, "receiving");
    assert_eq!(all[1].size, None);
    assert_eq!(all[1].recipient_count, 0);

    let ready = queue
        .list(&ListFilter {
            state: Some(ListState::Ready),
            limit: 10,
            ..ListFilter::default()
        })
        .await
        .expect("list ready");
    assert_eq!(ready.len(), 1);
    assert_eq!(ready[0].id, first_id);

    let limited = queue
        .list(&ListFilter {
            limit: 1,
            ..ListFilter::default()
        })
        .await
        .expect("list limited");
    assert_eq!(limited.len(), 1);

    let detail = queue
        .show(first_id)
        .await
        .expect("show")
        .expect("message exists");
    assert_eq!(detail.client_ip, IpAddr::V6(Ipv6Addr::LOCALHOST));
    assert_eq!(detail.helo, "client.example.org");
    assert!(detail.smtputf8);
    assert_eq!(detail.body_type, None);
    assert_eq!(detail.dsn_ret, None);
    assert_eq!(detail.dsn_envid, None);
    assert_eq!(detail.received_at, all[0].received_at);

    let detail = queue
        .show(second_id)
        .await
        .expect("show")
        .expect("message exists");
    assert_eq!(detail.client_ip, IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)));
    assert_eq!(detail.dsn_ret.as_deref(), Some("HDRS"));
    assert_eq!(detail.dsn_envid.as_deref(), Some("envid-42"));
    assert_eq!(detail.chunk_count, None);

    let error = queue
        .read_body(second_id)
        .await
        .expect_err("body of receiving message");
    assert!(matches!(error, QueueError::NotReady { .. }), "{error}");

    assert!(queue.show(new_queue_id()).await.expect("show").is_none());
    let error = queue
        .read_body(new_queue_id())
        .await
        .expect_err("body of unknown message");
    assert!(matches!(error, QueueError::NotFound { .. }), "{error}");
    receiving.abort().await;
}

#[tokio::test]
async fn read_body_detects_corruption() {
    let db = TestDb::create().await;
    let queue = migrated_queue(&db, 16).await;
    let envelope = envelope();
    let id = envelope.id;
    let mut writer = queue.begin(envelope);
    writer.write(b"original body").await.expect("write");
    writer
        .commit(&[recipient("bob@example.net")])
        .await
        .expect("commit");

    let client = db.connect().await;
    // The chunk trigger rejects updates of a ready body, so this session
    // disables triggers (superuser only) to simulate corruption on disk.
    client
        .batch_execute("SET session_replication_role = replica")
        .await
        .expect("disable triggers");
    client
        .execute(
            "UPDATE message_chunks SET data = 'tampered body'::bytea WHERE message_id = $1",
            &[&id],
        )
        .await
        .expect("tamper");

    let error = queue.read_body(id).await.expect_err("digest mismatch");
    assert!(matches!(error, QueueError::Integrity { .. }), "{error}");
}

#[tokio::test]
async fn pooled_sessions_use_queue_settings() {
    let db = TestDb::create().await;
    let queue = Queue::new(&QueueConfig {
        statement_timeout: Duration::from_secs(7),
        ..config(&db)
    })
    .expect("valid queue config");
    let client = queue.pool().get().await.expect("pooled connection");

    let setting = |name: &'static str| {
        let client = &client;
        async move {
            let row = client
                .query_one("SELECT current_setting($1)", &[&name])
                .await
                .expect("current_setting");
            row.get::<_, String>(0)
        }
    };
    assert_eq!(setting("synchronous_commit").await, "on");
    assert_eq!(setting("statement_timeout").await, "7s");
    assert_eq!(setting("idle_in_transaction_session_timeout").await, "7s");
    assert_eq!(setting("application_name").await, "wsmtp");
}

#[tokio::test]
async fn migrate_creates_missing_database() {
    let db = TestDb::reserve();
    let queue = Queue::new(&QueueConfig {
        create_database: true,
        ..config(&db)
    })
    .expect("valid queue config");

    // Several concurrent callers race to create and migrate.
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move { queue.migrate().await }));
    }
    for task in tasks {
        task.await.expect("task").expect("migrate");
    }

    queue.ping().await.expect("ping");
    assert!(
        queue
            .list(&ListFilter::default())
            .await
            .expect("list")
            .is_empty()
    );
}

#[tokio::test]
async fn missing_database_without_create_fails() {
    let db = TestDb::reserve();
    let queue = Queue::new(&config(&db)).expect("valid queue config");

    let error = queue.migrate().await.expect_err("missing database");
    assert_eq!(
        error.sqlstate(),
        Some(&SqlState::INVALID_CATALOG_NAME),
        "{error}"
    );
    assert!(!error.is_transient());
}

#[tokio::test]
async fn unreachable_database_fails_fast() {
    // Nothing listens on port 1 of the loopback address.
    let queue = Queue::new(&QueueConfig::new("postgres://postgres@127.0.0.1:1/wsmtp"))
        .expect("valid queue config");

    let started = Instant::now();
    let error = queue.ping().await.expect_err("connection refused");
    assert!(error.is_transient(), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );

    let mut writer = queue.begin(envelope());
    writer
        .write(b"short body")
        .await
        .expect("buffered without I/O");
    let error = writer
        .commit(&[recipient("bob@example.net")])
        .await
        .expect_err("commit without database");
    assert!(error.is_transient(), "{error}");
}

#[test]
fn invalid_url_is_rejected() {
    let error =
        Queue::new(&QueueConfig::new("postgres://host:notaport/db")).expect_err("invalid URL");
    assert!(matches!(error, QueueError::InvalidUrl { .. }), "{error}");
}
