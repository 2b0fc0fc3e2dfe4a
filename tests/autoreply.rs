//! Integration tests of auto-replies: suppression rules, rate state in
//! `auto_reply_log`, reply composition, and insertion of generated messages
//! into the spool, against a real PostgreSQL server (127.0.0.1:5432 or
//! `WSMTP_TEST_PG`, see `tests/common/db.rs`).

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use common::db::TestDb;
use mail_parser::{MessageParser, MimeHeaders};
use time::OffsetDateTime;
use time::macros::datetime;
use wsmtp::directory::{Account, AutoReply, AutoReplyKind};
use wsmtp::queue::{
    Envelope, Queue, QueueConfig, QueueError, QueueId, SpoolRecipient, insert_generated,
    new_queue_id,
};
use wsmtp::router::autoreply::{
    AutoReplyOutcome, AutoReplySettings, MAX_HEADER_SECTION, OriginalHeaders, STORM_LIMIT,
    STORM_WINDOW, StoredMessage, Suppression, auto_reply, read_body_within, read_header_section,
    reserve_reply, suppression,
};

const NOW: OffsetDateTime = datetime!(2025-03-10 12:00 UTC);
const WEEK: Duration = Duration::from_secs(7 * 24 * 3600);
const ALICE: &str = "alice@example.com";
const BOB: &str = "bob@example.org";

async fn migrated_queue(db: &TestDb, chunk_size: usize) -> Queue {
    let queue = Queue::new(&QueueConfig {
        pool_size: 4,
        chunk_size,
        ..QueueConfig::new(db.url.clone())
    })
    .expect("valid queue config");
    queue.migrate().await.expect("migrate");
    queue
}

async fn insert_account(client: &tokio_postgres::Client, name: &str) -> i64 {
    client
        .query_one(
            "INSERT INTO accounts (name) VALUES ($1) RETURNING id",
            &[&name],
        )
        .await
        .expect("insert account")
        .get(0)
}

fn account(id: i64, kind: AutoReplyKind) -> Account {
    Account {
        id,
        name: "alice".to_owned(),
        addresses: vec![ALICE.to_owned(), "a.smith@example.com".to_owned()],
        mailbox: None,
        forwards: vec![],
        relay_group: None,
        auto_reply: Some(AutoReply {
            kind,
            subject: "Out of office".to_owned(),
            body: "I am away until Monday.\nRegards, Alice".to_owned(),
            active_from: None,
            active_until: None,
            interval: WEEK,
            enabled: true,
        }),
        password_hash: None,
    }
}

fn envelope(sender: &str) -> Envelope {
    Envelope {
        id: new_queue_id(),
        sender: sender.to_owned(),
        client_ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
        helo: "client.example.org".to_owned(),
        smtputf8: false,
        body_type: None,
        dsn_ret: None,
        dsn_envid: None,
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

/// Spools `body` from `sender` to Alice through the ordinary writer.
async fn spool_original(queue: &Queue, sender: &str, body: &[u8]) -> QueueId {
    let envelope = envelope(sender);
    let id = envelope.id;
    let mut writer = queue.begin(envelope);
    writer.write(body).await.expect("write original");
    writer
        .commit(&[recipient(ALICE)])
        .await
        .expect("commit original");
    id
}

fn personal_message(subject: &str) -> Vec<u8> {
    format!(
        "From: Bob <{BOB}>\r\n\
         To: Alice <{ALICE}>\r\n\
         Subject: {subject}\r\n\
         Message-ID: <orig-2@example.org>\r\n\
         In-Reply-To: <orig-1@example.org>\r\n\
         References: <root@example.org> <orig-1@example.org>\r\n\
         \r\n\
         Hello Alice,\r\nsee you.\r\n"
    )
    .into_bytes()
}

/// Routes `original` to Alice's account in one transaction, as the router
/// does, and commits.
async fn run_auto_reply(
    db: &TestDb,
    settings: &AutoReplySettings,
    account: &Account,
    original: QueueId,
    sender: &str,
    size: u64,
    now: OffsetDateTime,
) -> AutoReplyOutcome {
    let mut client = db.connect().await;
    let tx = client.transaction().await.expect("begin");
    let section = read_header_section(&tx, original, MAX_HEADER_SECTION)
        .await
        .expect("read header section");
    let message = StoredMessage {
        id: original,
        sender,
        header_section: &section,
        size,
        smtputf8: false,
    };
    let outcome = auto_reply(&tx, settings, account, ALICE, &message, now)
        .await
        .expect("auto_reply");
    tx.commit().await.expect("commit");
    outcome
}

#[test]
fn suppression_rules() {
    // (case, envelope sender, extra header lines, require_personal, expected code)
    let cases: &[(&str, &str, &str, bool, Option<&str>)] = &[
        ("personal message", BOB, "", true, None),
        ("null sender", "", "", true, Some("null-sender")),
        (
            "sender without domain",
            "bob",
            "",
            true,
            Some("invalid-sender"),
        ),
        (
            "sender is the account",
            ALICE,
            "",
            true,
            Some("own-address"),
        ),
        (
            "sender is an alias",
            "A.Smith@example.com",
            "",
            true,
            Some("own-address"),
        ),
        (
            "sender is a sub-address",
            "alice+x@example.com",
            "",
            true,
            Some("own-address"),
        ),
        (
            "mailer-daemon",
            "MAILER-DAEMON@example.org",
            "",
            true,
            Some("automated-sender"),
        ),
        (
            "owner- prefix",
            "owner-staff@lists.example",
            "",
            true,
            Some("automated-sender"),
        ),
        (
            "-request suffix",
            "staff-request@lists.example",
            "",
            true,
            Some("automated-sender"),
        ),
        (
            "listserv",
            "listserv@lists.example",
            "",
            true,
            Some("automated-sender"),
        ),
        (
            "majordomo",
            "Majordomo@lists.example",
            "",
            true,
            Some("automated-sender"),
        ),
        (
            "mailman bounces",
            "staff-bounces+alice=example.com@lists.example",
            "",
            true,
            Some("automated-sender"),
        ),
        (
            "no-reply",
            "no-reply@shop.example",
            "",
            true,
            Some("automated-sender"),
        ),
        (
            "postmaster is a person",
            "postmaster@example.org",
            "",
            true,
            None,
        ),
        (
            "From is mailer-daemon",
            BOB,
            "From: MAILER-DAEMON@example.org\r\n",
            true,
            Some("automated-sender"),
        ),
        (
            "auto-replied",
            BOB,
            "Auto-Submitted: auto-replied\r\n",
            true,
            Some("auto-submitted"),
        ),
        (
            "auto-generated with comment",
            BOB,
            "Auto-Submitted: (robot) Auto-Generated; x=1\r\n",
            true,
            Some("auto-submitted"),
        ),
        (
            "empty auto-submitted",
            BOB,
            "Auto-Submitted:\r\n",
            true,
            Some("auto-submitted"),
        ),
        (
            "auto-submitted no",
            BOB,
            "Auto-Submitted: No\r\n",
            true,
            None,
        ),
        (
            "x-auto-response-suppress oof",
            BOB,
            "X-Auto-Response-Suppress: DR, OOF\r\n",
            true,
            Some("auto-response-suppress"),
        ),
        (
            "x-auto-response-suppress all",
            BOB,
            "X-Auto-Response-Suppress: All\r\n",
            true,
            Some("auto-response-suppress"),
        ),
        (
            "x-auto-response-suppress rn",
            BOB,
            "X-Auto-Response-Suppress: RN, NRN\r\n",
            true,
            None,
        ),
        (
            "list-id",
            BOB,
            "List-Id: Staff <staff.lists.example>\r\n",
            true,
            Some("list-header"),
        ),
        (
            "folded list-unsubscribe",
            BOB,
            "List-Unsubscribe:\r\n <mailto:leave@lists.example>\r\n",
            true,
            Some("list-header"),
        ),
        (
            "list-post",
            BOB,
            "LIST-POST: <mailto:staff@lists.example>\r\n",
            true,
            Some("list-header"),
        ),
        (
            "precedence bulk",
            BOB,
            "Precedence: bulk\r\n",
            true,
            Some("precedence"),
        ),
        (
            "precedence list",
            BOB,
            "Precedence: List\r\n",
            true,
            Some("precedence"),
        ),
        (
            "precedence junk",
            BOB,
            "Precedence: junk (spam)\r\n",
            true,
            Some("precedence"),
        ),
        (
            "precedence first-class",
            BOB,
            "Precedence: first-class\r\n",
            true,
            None,
        ),
    ];
    for (case, sender, extra, require_personal, expected) in cases {
        let message = format!(
            "From: Bob <{BOB}>\r\nTo: Alice <{ALICE}>\r\n{extra}Subject: hi\r\n\r\nbody\r\n"
        );
        let headers = OriginalHeaders::parse(message.as_bytes(), message.len() as u64);
        let result = suppression(
            sender,
            &headers,
            &[ALICE, "a.smith@example.com"],
            *require_personal,
        );
        assert_eq!(
            result.as_ref().map(Suppression::code),
            *expected,
            "case {case}: {result:?}"
        );
    }
}

#[test]
fn suppression_personal_rules() {
    // (case, recipient header lines, require_personal, expected code)
    let cases: &[(&str, &str, bool, Option<&str>)] = &[
        (
            "not named",
            "To: carol@example.net\r\n",
            true,
            Some("not-personal"),
        ),
        (
            "not named, check off",
            "To: carol@example.net\r\n",
            false,
            None,
        ),
        ("no recipient fields", "", true, Some("not-personal")),
        (
            "named in Cc",
            "To: carol@example.net\r\nCc: ALICE@Example.com\r\n",
            true,
            None,
        ),
        ("named in Bcc", "Bcc: alice@example.com\r\n", true, None),
        (
            "named in Resent-To",
            "To: staff@example.com\r\nResent-To: alice@example.com\r\n",
            true,
            None,
        ),
        ("named by alias", "To: a.smith@example.com\r\n", true, None),
        (
            "named by sub-address",
            "To: alice+work@example.com\r\n",
            true,
            None,
        ),
        (
            "named in a group",
            "To: Team: carol@example.net, alice@example.com;\r\n",
            true,
            None,
        ),
        (
            "encoded name, folded",
            "To: =?utf-8?q?Alice_Sm=C3=AFth?=\r\n <alice@example.com>\r\n",
            true,
            None,
        ),
        (
            "named in catch-all only",
            "To: anyone@example.com\r\n",
            true,
            Some("not-personal"),
        ),
    ];
    for (case, fields, require_personal, expected) in cases {
        let message = format!("From: {BOB}\r\n{fields}Subject: hi\r\n\r\nbody\r\n");
        let headers = OriginalHeaders::parse(message.as_bytes(), message.len() as u64);
        let result = suppression(
            BOB,
            &headers,
            &[ALICE, "a.smith@example.com", "@example.com"],
            *require_personal,
        );
        assert_eq!(
            result.as_ref().map(Suppression::code),
            *expected,
            "case {case}: {result:?}"
        );
    }
}

#[test]
fn suppression_truncated_header_section() {
    let cut = format!("From: {BOB}\r\nTo: {ALICE}\r\nX-Filler: ");
    let headers = OriginalHeaders::parse(cut.as_bytes(), 10 * cut.len() as u64);
    assert!(headers.truncated);
    assert_eq!(
        suppression(BOB, &headers, &[ALICE], true),
        Some(Suppression::HeaderSectionTruncated)
    );

    // A message that is only a header section, without a blank line, is
    // complete.
    let whole = headers_only_message();
    let headers = OriginalHeaders::parse(whole.as_bytes(), whole.len() as u64);
    assert!(!headers.truncated);
    assert_eq!(suppression(BOB, &headers, &[ALICE], true), None);
}

fn headers_only_message() -> String {
    format!("From: {BOB}\r\nTo: {ALICE}\r\nSubject: no body\r\n")
}

#[test]
fn original_headers_parse_fields() {
    let message = b"From: Bob <Bob@Example.org>\r\n\
        To: Alice <alice@example.com>\r\n\
        Subject: =?utf-8?q?Caf=C3=A9?=\r\n\x20menu\r\n\
        Message-ID: <m-3@example.org>\r\n\
        In-Reply-To: <m-2@example.org>\r\n\
        References: <m-1@example.org>\r\n <m-2@example.org>\r\n\
        Auto-Submitted: no\r\n\
        Precedence: Bulk\r\n\
        \r\n\
        Auto-Submitted: auto-replied\r\n";
    let headers = OriginalHeaders::parse(message, message.len() as u64);
    assert_eq!(headers.message_id.as_deref(), Some("m-3@example.org"));
    assert_eq!(headers.subject.as_deref(), Some("Café menu"));
    assert_eq!(headers.from, vec!["bob@example.org".to_owned()]);
    assert_eq!(headers.recipients, vec![ALICE.to_owned()]);
    assert_eq!(headers.in_reply_to, vec!["m-2@example.org".to_owned()]);
    assert_eq!(
        headers.references,
        vec!["m-1@example.org".to_owned(), "m-2@example.org".to_owned()]
    );
    assert_eq!(
        headers.auto_submitted,
        vec!["no".to_owned()],
        "body ignored"
    );
    assert_eq!(headers.precedence, vec!["bulk".to_owned()]);
    assert!(!headers.has_list_headers);
    assert!(!headers.truncated);
}

#[tokio::test]
async fn vacation_once_per_interval() {
    let db = TestDb::create().await;
    migrated_queue(&db, 1024).await;
    let mut client = db.connect().await;
    let account_id = insert_account(&client, "alice").await;
    let tx = client.transaction().await.expect("begin");
    let days = time::Duration::days;

    assert!(vacation(&tx, account_id, BOB, NOW).await, "first reply");
    assert!(!vacation(&tx, account_id, BOB, NOW).await, "same time");
    assert!(
        !vacation(&tx, account_id, BOB, NOW + days(7) - time::Duration::SECOND).await,
        "within the interval"
    );
    assert!(
        vacation(&tx, account_id, "carol@example.net", NOW).await,
        "another correspondent"
    );
    assert!(
        vacation(&tx, account_id, BOB, NOW + days(7)).await,
        "once the interval has passed"
    );
    assert!(
        !vacation(&tx, account_id, BOB, NOW + days(8)).await,
        "the interval restarts at the last reply"
    );
    assert!(
        !vacation(&tx, account_id, BOB, NOW).await,
        "a clock that went back allows no reply"
    );
}

async fn vacation(
    tx: &tokio_postgres::Transaction<'_>,
    account_id: i64,
    correspondent: &str,
    now: OffsetDateTime,
) -> bool {
    reserve_reply(
        tx,
        account_id,
        correspondent,
        AutoReplyKind::Vacation,
        WEEK,
        now,
    )
    .await
    .expect("reserve vacation reply")
}

#[tokio::test]
async fn every_time_storm_limit() {
    let db = TestDb::create().await;
    migrated_queue(&db, 1024).await;
    let mut client = db.connect().await;
    let account_id = insert_account(&client, "alice").await;
    let tx = client.transaction().await.expect("begin");

    for kind in [AutoReplyKind::EveryTime, AutoReplyKind::Echo] {
        let correspondent = format!("{}@example.org", kind.as_str());
        let mut allowed = 0;
        for minute in 0..(STORM_LIMIT + 5) {
            let now = NOW + time::Duration::minutes(i64::from(minute));
            if reserve_reply(&tx, account_id, &correspondent, kind, WEEK, now)
                .await
                .expect("reserve")
            {
                allowed += 1;
            }
        }
        assert_eq!(allowed, STORM_LIMIT, "{kind:?}: replies within one window");

        let next_window = NOW + time::Duration::try_from(STORM_WINDOW).expect("window");
        assert!(
            reserve_reply(&tx, account_id, &correspondent, kind, WEEK, next_window)
                .await
                .expect("reserve"),
            "{kind:?}: a new window allows replies again"
        );
    }
}

#[tokio::test]
async fn concurrent_vacation_reserves_once() {
    let db = TestDb::create().await;
    migrated_queue(&db, 1024).await;
    let account_id = insert_account(&db.connect().await, "alice").await;

    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut client = db.connect().await;
        tasks.push(tokio::spawn(async move {
            let tx = client.transaction().await.expect("begin");
            let reserved = reserve_reply(&tx, account_id, BOB, AutoReplyKind::Vacation, WEEK, NOW)
                .await
                .expect("reserve");
            // Hold the transaction open a little, so the others queue up
            // behind its row lock.
            tokio::time::sleep(Duration::from_millis(50)).await;
            tx.commit().await.expect("commit");
            reserved
        }));
    }
    let mut granted = 0;
    for task in tasks {
        if task.await.expect("task") {
            granted += 1;
        }
    }
    assert_eq!(granted, 1, "exactly one of 8 concurrent routers may reply");
}

#[tokio::test]
async fn waiting_reservation_sees_commit_or_rollback() {
    let db = TestDb::create().await;
    migrated_queue(&db, 1024).await;
    let account_id = insert_account(&db.connect().await, "alice").await;

    for commit_first in [true, false] {
        let correspondent = if commit_first {
            BOB
        } else {
            "carol@example.net"
        };
        let mut first_client = db.connect().await;
        let mut second_client = db.connect().await;
        let first = first_client.transaction().await.expect("begin first");
        let second = second_client.transaction().await.expect("begin second");

        assert!(
            reserve_reply(
                &first,
                account_id,
                correspondent,
                AutoReplyKind::Vacation,
                WEEK,
                NOW
            )
            .await
            .expect("first reserve")
        );
        let finish_first = async {
            // The second reservation is waiting on the row lock by now.
            tokio::time::sleep(Duration::from_millis(200)).await;
            if commit_first {
                first.commit().await.expect("commit first");
            } else {
                first.rollback().await.expect("rollback first");
            }
        };
        let (second_reserved, ()) = tokio::join!(
            reserve_reply(
                &second,
                account_id,
                correspondent,
                AutoReplyKind::Vacation,
                WEEK,
                NOW
            ),
            finish_first
        );
        assert_eq!(
            second_reserved.expect("second reserve"),
            !commit_first,
            "second reservation after the first {}",
            if commit_first {
                "committed"
            } else {
                "rolled back"
            }
        );
        second.commit().await.expect("commit second");
    }
}

#[tokio::test]
async fn insert_generated_reads_back() {
    let db = TestDb::create().await;
    let queue = migrated_queue(&db, 1024).await;
    let mut client = db.connect().await;
    let body: Vec<u8> = (0..100u8).cycle().take(1000).collect();

    let tx = client.transaction().await.expect("begin");
    let envelope = Envelope {
        body_type: Some("8bitmime".to_owned()),
        ..envelope("")
    };
    let id = insert_generated(&tx, &envelope, &body, &[recipient(BOB)], 64)
        .await
        .expect("insert");
    tx.commit().await.expect("commit");

    assert_eq!(id, envelope.id);
    assert_eq!(queue.read_body(id).await.expect("read body"), body);
    let detail = queue.show(id).await.expect("show").expect("message exists");
    assert_eq!(detail.state, "ready");
    assert_eq!(detail.sender, "");
    assert_eq!(detail.chunk_count, Some(16));
    assert_eq!(detail.body_type.as_deref(), Some("8BITMIME"));
    assert_eq!(detail.recipients.len(), 1);
    assert_eq!(detail.recipients[0].address, BOB);
    assert_eq!(detail.recipients[0].route_group, None);
    assert_eq!(detail.recipients[0].state, "queued");
}

#[tokio::test]
async fn insert_generated_rolls_back_and_checks() {
    let db = TestDb::create().await;
    let queue = migrated_queue(&db, 1024).await;
    let mut client = db.connect().await;

    let tx = client.transaction().await.expect("begin");
    let rolled_back = envelope("");
    let id = insert_generated(&tx, &rolled_back, b"x\r\n", &[recipient(BOB)], 1024)
        .await
        .expect("insert");
    tx.rollback().await.expect("rollback");
    assert!(
        queue.show(id).await.expect("show").is_none(),
        "gone after rollback"
    );

    let tx = client.transaction().await.expect("begin");
    let error = insert_generated(&tx, &rolled_back, b"x\r\n", &[], 1024)
        .await
        .expect_err("no recipients");
    assert!(matches!(error, QueueError::NoRecipients { .. }), "{error}");
    let error = insert_generated(&tx, &rolled_back, b"x\r\n", &[recipient(BOB)], 0)
        .await
        .expect_err("chunk size 0");
    assert!(matches!(error, QueueError::InvalidConfig(_)), "{error}");

    let empty = envelope("");
    let id = insert_generated(&tx, &empty, b"", &[recipient(BOB)], 1024)
        .await
        .expect("empty body");
    tx.commit().await.expect("commit");
    assert_eq!(queue.read_body(id).await.expect("read empty"), b"");
}

#[tokio::test]
async fn header_section_read_across_chunks() {
    let db = TestDb::create().await;
    // 16-byte chunks put the blank line across a chunk boundary.
    let queue = migrated_queue(&db, 16).await;
    let message = personal_message("chunks");
    let id = spool_original(&queue, BOB, &message).await;
    let end = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("blank line")
        + 4;

    let mut client = db.connect().await;
    let tx = client.transaction().await.expect("begin");
    let section = read_header_section(&tx, id, MAX_HEADER_SECTION)
        .await
        .expect("read");
    assert_eq!(
        section,
        &message[..end],
        "up to and including the blank line"
    );

    let bounded = read_header_section(&tx, id, 40)
        .await
        .expect("read bounded");
    assert_eq!(bounded, &message[..40], "cut at the limit");

    let whole = read_body_within(&tx, id, message.len() as u64)
        .await
        .expect("read body");
    assert_eq!(whole.as_deref(), Some(&message[..]));
    let too_large = read_body_within(&tx, id, message.len() as u64 - 1)
        .await
        .expect("read body");
    assert_eq!(too_large, None);
}

#[tokio::test]
async fn vacation_reply_headers_and_body() {
    let db = TestDb::create().await;
    let queue = migrated_queue(&db, 64).await;
    let client = db.connect().await;
    let account_id = insert_account(&client, "alice").await;
    let account = account(account_id, AutoReplyKind::Vacation);
    let settings = AutoReplySettings::new("mx.example.com");
    let original_message = personal_message("Lunch =?utf-8?q?caf=C3=A9?=");
    let original = spool_original(&queue, BOB, &original_message).await;
    let size = original_message.len() as u64;

    let outcome = run_auto_reply(&db, &settings, &account, original, BOB, size, NOW).await;
    let AutoReplyOutcome::Sent(reply_id) = outcome else {
        panic!("expected a reply, got {outcome:?}");
    };

    let detail = queue
        .show(reply_id)
        .await
        .expect("show")
        .expect("reply exists");
    assert_eq!(detail.state, "ready");
    assert_eq!(detail.sender, "", "null reverse-path");
    assert_eq!(detail.recipients.len(), 1);
    assert_eq!(detail.recipients[0].address, BOB);
    assert_eq!(detail.recipients[0].route_group, None);
    assert_eq!(detail.body_type, None, "an ASCII reply needs no 8BITMIME");
    assert!(!detail.smtputf8);

    let raw = queue.read_body(reply_id).await.expect("read reply");
    assert!(
        !raw.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'),
        "only CRLF line endings"
    );
    let reply = MessageParser::new().parse(&raw).expect("parse reply");
    assert_eq!(
        reply.header_raw("Auto-Submitted").map(str::trim),
        Some("auto-replied")
    );
    assert_eq!(reply.in_reply_to().as_text(), Some("orig-2@example.org"));
    assert_eq!(
        reply.references().as_text_list().map(|ids| ids.to_vec()),
        Some(vec![
            "root@example.org".into(),
            "orig-1@example.org".into(),
            "orig-2@example.org".into()
        ])
    );
    assert_eq!(
        reply.to().and_then(|a| a.first()).and_then(|a| a.address()),
        Some(BOB)
    );
    assert_eq!(
        reply
            .from()
            .and_then(|a| a.first())
            .and_then(|a| a.address()),
        Some(ALICE)
    );
    assert_eq!(reply.subject(), Some("Out of office"));
    assert_eq!(
        reply.message_id(),
        Some(format!("{}@mx.example.com", reply_id.simple()).as_str())
    );
    assert_eq!(
        reply.date().map(|d| d.to_timestamp()),
        Some(NOW.unix_timestamp())
    );
    assert_eq!(
        reply.body_text(0).as_deref(),
        Some("I am away until Monday.\r\nRegards, Alice\r\n")
    );
    assert_eq!(reply.attachment_count(), 0);

    // A second message from Bob within the week gets no reply.
    let second = spool_original(&queue, BOB, &personal_message("Again")).await;
    let outcome = run_auto_reply(&db, &settings, &account, second, BOB, size, NOW).await;
    assert_eq!(outcome, AutoReplyOutcome::RateLimited);
}

#[tokio::test]
async fn auto_reply_suppressed_and_inactive() {
    let db = TestDb::create().await;
    let queue = migrated_queue(&db, 1024).await;
    let client = db.connect().await;
    let account_id = insert_account(&client, "alice").await;
    let settings = AutoReplySettings::new("mx.example.com");
    let message = personal_message("Hi");
    let size = message.len() as u64;

    let bounce = spool_original(&queue, "", &message).await;
    let outcome = run_auto_reply(
        &db,
        &settings,
        &account(account_id, AutoReplyKind::Vacation),
        bounce,
        "",
        size,
        NOW,
    )
    .await;
    assert_eq!(
        outcome,
        AutoReplyOutcome::Suppressed(Suppression::NullSender)
    );

    let mut disabled = account(account_id, AutoReplyKind::Vacation);
    if let Some(auto) = disabled.auto_reply.as_mut() {
        auto.active_until = Some(NOW);
    }
    let original = spool_original(&queue, BOB, &message).await;
    let outcome = run_auto_reply(&db, &settings, &disabled, original, BOB, size, NOW).await;
    assert_eq!(outcome, AutoReplyOutcome::Inactive, "active window ended");

    let count: i64 = client
        .query_one("SELECT count(*) FROM auto_reply_log", &[])
        .await
        .expect("count log")
        .get(0);
    assert_eq!(count, 0, "no rate state written");
    let count: i64 = client
        .query_one("SELECT count(*) FROM messages WHERE sender = ''", &[])
        .await
        .expect("count replies")
        .get(0);
    assert_eq!(count, 1, "only the spooled bounce has sender <>");
}

#[tokio::test]
async fn echo_attaches_original() {
    let db = TestDb::create().await;
    let queue = migrated_queue(&db, 64).await;
    let client = db.connect().await;
    let account_id = insert_account(&client, "alice").await;
    let mut account = account(account_id, AutoReplyKind::Echo);
    if let Some(auto) = account.auto_reply.as_mut() {
        auto.body = String::new();
    }
    let original_message = personal_message("Ping \u{00fc}");
    let size = original_message.len() as u64;
    let mut settings = AutoReplySettings::new("mx.example.com");

    // Within the limit: the whole original as message/rfc822.
    let original = spool_original(&queue, BOB, &original_message).await;
    let outcome = run_auto_reply(&db, &settings, &account, original, BOB, size, NOW).await;
    let AutoReplyOutcome::Sent(reply_id) = outcome else {
        panic!("expected an echo, got {outcome:?}");
    };
    let detail = queue
        .show(reply_id)
        .await
        .expect("show")
        .expect("echo exists");
    assert_eq!(
        detail.body_type.as_deref(),
        Some("8BITMIME"),
        "the attached original is 8bit"
    );
    let raw = queue.read_body(reply_id).await.expect("read echo");
    let reply = MessageParser::new().parse(&raw).expect("parse echo");
    assert_eq!(reply.subject(), Some("Echo: Ping \u{00fc}"));
    assert_eq!(
        reply.header_raw("Auto-Submitted").map(str::trim),
        Some("auto-replied")
    );
    assert_eq!(reply.attachment_count(), 1);
    let attached = reply.attachment(0).expect("attachment");
    let content_type = attached.content_type().expect("content type");
    assert_eq!(
        (content_type.ctype(), content_type.subtype()),
        ("message", Some("rfc822"))
    );
    let echoed = attached.message().expect("nested message");
    assert_eq!(
        echoed.raw_message(),
        &original_message[..],
        "attached unchanged"
    );
    assert_eq!(echoed.message_id(), Some("orig-2@example.org"));
    assert!(
        reply
            .body_text(0)
            .is_some_and(|t| t.contains("automatic echo")),
        "default echo text"
    );

    // Above the limit: only the header section as text/rfc822-headers.
    settings.echo_attachment_limit = size - 1;
    let original = spool_original(&queue, BOB, &original_message).await;
    let outcome = run_auto_reply(&db, &settings, &account, original, BOB, size, NOW).await;
    let AutoReplyOutcome::Sent(reply_id) = outcome else {
        panic!("expected an echo, got {outcome:?}");
    };
    let raw = queue.read_body(reply_id).await.expect("read echo");
    let reply = MessageParser::new().parse(&raw).expect("parse echo");
    assert_eq!(reply.attachment_count(), 1);
    let attached = reply.attachment(0).expect("attachment");
    let content_type = attached.content_type().expect("content type");
    assert_eq!(
        (content_type.ctype(), content_type.subtype()),
        ("text", Some("rfc822-headers"))
    );
    let end = original_message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("blank line")
        + 2;
    assert_eq!(
        attached.contents(),
        &original_message[..end],
        "header section only"
    );
    assert!(
        reply
            .body_text(0)
            .is_some_and(|t| t.contains("Only the header section")),
        "the text says so"
    );
}

#[tokio::test]
async fn echo_of_bare_lf_attaches_headers() {
    let db = TestDb::create().await;
    let queue = migrated_queue(&db, 1024).await;
    let client = db.connect().await;
    let account_id = insert_account(&client, "alice").await;
    let account = account(account_id, AutoReplyKind::Echo);
    let settings = AutoReplySettings::new("mx.example.com");
    let message = format!("From: {BOB}\r\nTo: {ALICE}\r\nSubject: lf\r\n\r\nbare\nline\r\n");
    let size = message.len() as u64;

    let original = spool_original(&queue, BOB, message.as_bytes()).await;
    let outcome = run_auto_reply(&db, &settings, &account, original, BOB, size, NOW).await;
    let AutoReplyOutcome::Sent(reply_id) = outcome else {
        panic!("expected an echo, got {outcome:?}");
    };
    let raw = queue.read_body(reply_id).await.expect("read echo");
    let reply = MessageParser::new().parse(&raw).expect("parse echo");
    let attached = reply.attachment(0).expect("attachment");
    assert_eq!(
        attached.content_type().and_then(|c| c.subtype()),
        Some("rfc822-headers"),
        "a body that is not valid 8bit is not attached as message/rfc822"
    );
}
