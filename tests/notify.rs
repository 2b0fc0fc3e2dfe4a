//! Integration tests of delivery status notifications: an original is
//! spooled with the real spool writer, a notification is spooled in a
//! transaction and read back from the queue, against a real PostgreSQL
//! server (127.0.0.1:5432 or `WSMTP_TEST_PG`, see `tests/common/db.rs`).

mod common;

use std::net::{IpAddr, Ipv4Addr};

use common::db::TestDb;
use common::harness::queue_config;
use mail_parser::{Message, MessageParser, MessagePart, MimeHeaders};
use time::macros::datetime;
use wsmtp::delivery::dsn::{DsnAction, DsnRecipient};
use wsmtp::delivery::notify::{NotificationSettings, NotifyError, spool_notification};
use wsmtp::queue::{Envelope, Queue, QueueError, QueueId, SpoolRecipient, new_queue_id};

const SENDER: &str = "bob@example.org";
const ALICE: &str = "alice@example.net";
const HOST: &str = "mx.example.com";

async fn migrated_queue(db: &TestDb) -> Queue {
    let queue = Queue::new(&queue_config(&db.url)).expect("valid queue config");
    queue.migrate().await.expect("migrate");
    queue
}

fn original_message() -> Vec<u8> {
    b"From: Bob <bob@example.org>\r\n\
      To: Alice <alice@example.net>\r\n\
      Subject: Lunch\r\n\
      Message-ID: <orig-1@example.org>\r\n\
      \r\n\
      See you at noon.\r\n"
        .to_vec()
}

fn envelope(sender: &str, dsn_ret: Option<&str>) -> Envelope {
    Envelope {
        id: new_queue_id(),
        sender: sender.to_owned(),
        client_ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
        helo: "client.example.org".to_owned(),
        smtputf8: false,
        body_type: None,
        dsn_ret: dsn_ret.map(str::to_owned),
        dsn_envid: Some("QQ314159".to_owned()),
    }
}

/// Spools `body` with `envelope` to Alice through the ordinary writer.
async fn spool(queue: &Queue, envelope: Envelope, body: &[u8]) -> QueueId {
    let id = envelope.id;
    let mut writer = queue.begin(envelope);
    writer.write(body).await.expect("write original");
    writer
        .commit(&[SpoolRecipient {
            address: ALICE.to_owned(),
            route_group: None,
            orcpt: Some(ALICE.to_owned()),
            notify: None,
        }])
        .await
        .expect("commit original");
    id
}

/// Spools `body` from `sender` to Alice with the given RET value and
/// ENVID QQ314159.
async fn spool_original(
    queue: &Queue,
    sender: &str,
    dsn_ret: Option<&str>,
    body: &[u8],
) -> QueueId {
    spool(queue, envelope(sender, dsn_ret), body).await
}

fn failed(address: &str) -> DsnRecipient {
    DsnRecipient {
        final_recipient: address.to_owned(),
        original_recipient: Some(address.to_owned()),
        action: DsnAction::Failed,
        status: "5.1.1".to_owned(),
        remote_mta: Some("mx.example.net".to_owned()),
        diagnostic: Some("550 5.1.1 no such user".to_owned()),
        last_attempt: Some(datetime!(2025-03-10 11:59 UTC)),
        will_retry_until: None,
    }
}

fn settings() -> NotificationSettings {
    NotificationSettings {
        // Small chunks store the notification in several rows.
        chunk_size: 256,
        ..NotificationSettings::new(HOST)
    }
}

/// Spools a notification about `recipients` in one transaction and
/// commits it.
async fn notify(
    db: &TestDb,
    settings: &NotificationSettings,
    original: QueueId,
    to: &str,
    recipients: &[DsnRecipient],
) -> Option<QueueId> {
    let mut client = db.connect().await;
    let tx = client.transaction().await.expect("begin");
    let id = spool_notification(&tx, settings, original, to, recipients)
        .await
        .expect("spool notification");
    tx.commit().await.expect("commit");
    id
}

async fn message_count(db: &TestDb) -> i64 {
    db.connect()
        .await
        .query_one("SELECT count(*) FROM messages", &[])
        .await
        .expect("count messages")
        .get(0)
}

fn report_parts<'a>(message: &'a Message<'a>) -> Vec<&'a MessagePart<'a>> {
    let ids = message
        .root_part()
        .sub_parts()
        .expect("the root part is multipart");
    ids.iter()
        .map(|id| message.part(*id).expect("sub part exists"))
        .collect()
}

fn content_type(part: &MessagePart<'_>) -> String {
    let content_type = part.content_type().expect("part has a Content-Type");
    format!(
        "{}/{}",
        content_type.ctype(),
        content_type.subtype().unwrap_or_default()
    )
}

/// Returns the unfolded lines of a message/delivery-status body.
fn status_lines(part: &MessagePart<'_>) -> Vec<String> {
    std::str::from_utf8(part.contents())
        .expect("delivery status is UTF-8")
        .replace("\r\n ", " ")
        .split("\r\n")
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn failure_notification_returns_original() {
    let db = TestDb::create().await;
    let queue = migrated_queue(&db).await;
    let original_message = original_message();
    let original = spool_original(&queue, SENDER, None, &original_message).await;
    let received_at = queue
        .show(original)
        .await
        .expect("show original")
        .expect("original exists")
        .received_at;

    let id = notify(&db, &settings(), original, SENDER, &[failed(ALICE)])
        .await
        .expect("a notification is spooled");

    let detail = queue
        .show(id)
        .await
        .expect("show")
        .expect("notification exists");
    assert_eq!(detail.state, "ready");
    assert_eq!(detail.sender, "", "null reverse-path");
    assert_eq!(detail.helo, HOST);
    assert!(!detail.smtputf8);
    assert_eq!(
        detail.body_type, None,
        "an ASCII notification needs no 8BITMIME"
    );
    assert_eq!(detail.recipients.len(), 1);
    assert_eq!(detail.recipients[0].address, SENDER);
    assert_eq!(detail.recipients[0].route_group, None);
    assert_eq!(detail.recipients[0].state, "queued");
    assert!(
        detail.chunk_count.is_some_and(|count| count > 1),
        "stored in chunks of 256 bytes"
    );

    let raw = queue.read_body(id).await.expect("read notification");
    assert!(
        !raw.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'),
        "only CRLF line endings"
    );
    let message = MessageParser::new()
        .parse(&raw)
        .expect("parse notification");
    assert_eq!(
        message.subject(),
        Some("Undelivered Mail Returned to Sender")
    );
    assert_eq!(
        message.message_id(),
        Some(format!("{}@{HOST}", id.simple()).as_str())
    );
    assert_eq!(
        message
            .to()
            .and_then(|a| a.first())
            .and_then(|a| a.address()),
        Some(SENDER)
    );
    let top = message.content_type().expect("Content-Type");
    assert_eq!(top.attribute("report-type"), Some("delivery-status"));

    let parts = report_parts(&message);
    let types: Vec<String> = parts.iter().map(|p| content_type(p)).collect();
    assert_eq!(
        types,
        ["text/plain", "message/delivery-status", "message/rfc822"]
    );
    let text = parts[0].text_contents().expect("text part");
    assert!(
        text.contains(&format!("<{ALICE}>: delivery failed")),
        "{text}"
    );
    assert!(text.contains("550 5.1.1 no such user"), "{text}");
    assert!(text.contains(&original.simple().to_string()), "{text}");

    let lines = status_lines(parts[1]);
    let arrival = received_at
        .format(&time::format_description::well_known::Rfc2822)
        .expect("format arrival");
    for expected in [
        format!("Reporting-MTA: dns; {HOST}"),
        "Original-Envelope-Id: QQ314159".to_owned(),
        format!("Arrival-Date: {arrival}"),
        format!("Original-Recipient: rfc822; {ALICE}"),
        format!("Final-Recipient: rfc822; {ALICE}"),
        "Action: failed".to_owned(),
        "Status: 5.1.1".to_owned(),
        "Remote-MTA: dns; mx.example.net".to_owned(),
        "Diagnostic-Code: smtp; 550 5.1.1 no such user".to_owned(),
    ] {
        assert!(lines.contains(&expected), "{expected} in {lines:?}");
    }

    let returned = parts[2].message().expect("nested message");
    assert_eq!(returned.raw_message(), &original_message[..]);
}

#[tokio::test]
async fn ret_hdrs_returns_header_section() {
    let db = TestDb::create().await;
    let queue = migrated_queue(&db).await;
    let original_message = original_message();
    let original = spool_original(&queue, SENDER, Some("HDRS"), &original_message).await;

    let id = notify(&db, &settings(), original, SENDER, &[failed(ALICE)])
        .await
        .expect("a notification is spooled");

    let raw = queue.read_body(id).await.expect("read notification");
    let message = MessageParser::new()
        .parse(&raw)
        .expect("parse notification");
    let parts = report_parts(&message);
    assert_eq!(content_type(parts[2]), "text/rfc822-headers");
    let end = original_message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("blank line")
        + 2;
    assert_eq!(parts[2].contents(), &original_message[..end]);
}

#[tokio::test]
async fn large_original_returns_header_section() {
    let db = TestDb::create().await;
    let queue = migrated_queue(&db).await;
    let original_message = original_message();
    let original = spool_original(&queue, SENDER, Some("FULL"), &original_message).await;
    let mut settings = settings();

    settings.return_limit = original_message.len() as u64;
    let id = notify(&db, &settings, original, SENDER, &[failed(ALICE)])
        .await
        .expect("a notification is spooled");
    let raw = queue.read_body(id).await.expect("read notification");
    let message = MessageParser::new()
        .parse(&raw)
        .expect("parse notification");
    assert_eq!(
        content_type(report_parts(&message)[2]),
        "message/rfc822",
        "size equal to the limit"
    );

    settings.return_limit = original_message.len() as u64 - 1;
    let id = notify(&db, &settings, original, SENDER, &[failed(ALICE)])
        .await
        .expect("a notification is spooled");
    let raw = queue.read_body(id).await.expect("read notification");
    let message = MessageParser::new()
        .parse(&raw)
        .expect("parse notification");
    assert_eq!(
        content_type(report_parts(&message)[2]),
        "text/rfc822-headers",
        "size above the limit"
    );
}

#[tokio::test]
async fn delay_returns_header_section() {
    let db = TestDb::create().await;
    let queue = migrated_queue(&db).await;
    let original = spool_original(&queue, SENDER, Some("FULL"), &original_message()).await;
    let delayed = DsnRecipient {
        action: DsnAction::Delayed,
        status: "4.4.1".to_owned(),
        diagnostic: Some("451 4.4.1 try again later".to_owned()),
        will_retry_until: Some(datetime!(2025-03-15 12:00 UTC)),
        ..failed(ALICE)
    };

    let id = notify(
        &db,
        &settings(),
        original,
        SENDER,
        std::slice::from_ref(&delayed),
    )
    .await
    .expect("a notification is spooled");
    let raw = queue.read_body(id).await.expect("read notification");
    let message = MessageParser::new()
        .parse(&raw)
        .expect("parse notification");
    assert_eq!(
        message.subject(),
        Some("Delayed Mail (still being retried)")
    );
    let parts = report_parts(&message);
    assert_eq!(content_type(parts[2]), "text/rfc822-headers");
    assert!(
        status_lines(parts[1])
            .contains(&"Will-Retry-Until: Sat, 15 Mar 2025 12:00:00 +0000".to_owned())
    );

    // One failed recipient among delayed ones returns the whole message.
    let id = notify(
        &db,
        &settings(),
        original,
        SENDER,
        &[delayed, failed("carol@example.net")],
    )
    .await
    .expect("a notification is spooled");
    let raw = queue.read_body(id).await.expect("read notification");
    let message = MessageParser::new()
        .parse(&raw)
        .expect("parse notification");
    assert_eq!(
        message.subject(),
        Some("Undelivered Mail Returned to Sender")
    );
    assert_eq!(content_type(report_parts(&message)[2]), "message/rfc822");
}

#[tokio::test]
async fn null_sender_and_no_recipients_spool_nothing() {
    let db = TestDb::create().await;
    let queue = migrated_queue(&db).await;
    let bounce = spool_original(&queue, "", None, &original_message()).await;
    let before = message_count(&db).await;

    let id = notify(&db, &settings(), bounce, "", &[failed(ALICE)]).await;
    assert_eq!(id, None, "no notification to <>");
    let id = notify(&db, &settings(), bounce, SENDER, &[]).await;
    assert_eq!(id, None, "no recipients to report");

    assert_eq!(message_count(&db).await, before, "nothing inserted");
}

#[tokio::test]
async fn rollback_leaves_nothing() {
    let db = TestDb::create().await;
    let queue = migrated_queue(&db).await;
    let original = spool_original(&queue, SENDER, None, &original_message()).await;
    let before = message_count(&db).await;

    let mut client = db.connect().await;
    let tx = client.transaction().await.expect("begin");
    let id = spool_notification(&tx, &settings(), original, SENDER, &[failed(ALICE)])
        .await
        .expect("spool notification")
        .expect("a notification is spooled");
    tx.rollback().await.expect("rollback");

    assert!(
        queue.show(id).await.expect("show").is_none(),
        "gone after rollback"
    );
    assert_eq!(message_count(&db).await, before);
}

#[tokio::test]
async fn missing_original_is_not_found() {
    let db = TestDb::create().await;
    let _queue = migrated_queue(&db).await;
    let mut client = db.connect().await;
    let tx = client.transaction().await.expect("begin");
    let missing = new_queue_id();

    let error = spool_notification(&tx, &settings(), missing, SENDER, &[failed(ALICE)])
        .await
        .expect_err("no such message");
    assert!(
        matches!(error, NotifyError::Queue(QueueError::NotFound { id }) if id == missing),
        "{error}"
    );
    assert!(!error.is_transient());
}

#[tokio::test]
async fn smtputf8_and_8bitmime_flags() {
    let db = TestDb::create().await;
    let queue = migrated_queue(&db).await;
    let original_message =
        "From: bob@example.org\r\nSubject: Gr\u{fc}\u{df}e\r\n\r\nH\u{e9}\r\n".as_bytes();
    let original = spool_original(&queue, SENDER, None, original_message).await;

    let id = notify(&db, &settings(), original, SENDER, &[failed(ALICE)])
        .await
        .expect("a notification is spooled");
    let detail = queue.show(id).await.expect("show").expect("exists");
    assert!(
        !detail.smtputf8,
        "ASCII addresses, original without SMTPUTF8"
    );
    assert_eq!(
        detail.body_type.as_deref(),
        Some("8BITMIME"),
        "the returned original is 8bit"
    );
    let raw = queue.read_body(id).await.expect("read notification");
    let message = MessageParser::new()
        .parse(&raw)
        .expect("parse notification");
    let parts = report_parts(&message);
    assert_eq!(parts[2].content_transfer_encoding(), Some("8bit"));

    let id = notify(
        &db,
        &settings(),
        original,
        SENDER,
        &[failed("j\u{f6}rg@example.net")],
    )
    .await
    .expect("a notification is spooled");
    let detail = queue.show(id).await.expect("show").expect("exists");
    assert!(detail.smtputf8, "non-ASCII recipient");

    let id = notify(
        &db,
        &settings(),
        original,
        "b\u{f6}b@example.org",
        &[failed(ALICE)],
    )
    .await
    .expect("a notification is spooled");
    let detail = queue.show(id).await.expect("show").expect("exists");
    assert!(detail.smtputf8, "non-ASCII notification address");
    assert_eq!(detail.recipients[0].address, "b\u{f6}b@example.org");

    // An SMTPUTF8 original whose returned header section has UTF-8.
    let utf8_original = spool(
        &queue,
        Envelope {
            smtputf8: true,
            ..envelope(SENDER, None)
        },
        "From: b\u{f6}b@example.org\r\nSubject: Hi\r\n\r\nHi\r\n".as_bytes(),
    )
    .await;
    let id = notify(&db, &settings(), utf8_original, SENDER, &[failed(ALICE)])
        .await
        .expect("a notification is spooled");
    let detail = queue.show(id).await.expect("show").expect("exists");
    assert!(detail.smtputf8, "UTF-8 header fields returned");
}
