//! The router tier: spooled mail resolved through the directory, end to end
//! from SMTP into the listener.

mod common;

use std::time::Duration;

use common::directory::{add_account, add_domain, add_list, add_vacation, wait_until_current};
use common::harness::{TestConfig, TestServer, send_spooled as send};
use common::sink::Sink;
use wsmtp::queue::QueueId;

/// Waits until no recipient of the message is left to route.
async fn wait_routed(server: &TestServer, id: QueueId) -> wsmtp::queue::MessageDetail {
    for _ in 0..400 {
        let detail = server
            .queue()
            .show(id)
            .await
            .expect("show")
            .expect("message exists");
        if detail.recipients.iter().all(|r| r.state != "queued") {
            return detail;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("message {} was not routed within 10 s", id.simple());
}

fn deliveries(detail: &wsmtp::queue::MessageDetail) -> Vec<(String, String, String)> {
    let mut rows: Vec<_> = detail
        .deliveries
        .iter()
        .map(|d| (d.address.clone(), d.kind.clone(), d.destination.clone()))
        .collect();
    rows.sort();
    rows
}

/// Auto-replies in the queue: messages from the null sender.
async fn auto_replies(db: &tokio_postgres::Client) -> Vec<(QueueId, String)> {
    db.query(
        "SELECT m.id, r.address FROM messages m JOIN recipients r ON r.message_id = m.id
          WHERE m.sender = '' ORDER BY m.id",
        &[],
    )
    .await
    .expect("auto-replies")
    .iter()
    .map(|row| (row.get(0), row.get(1)))
    .collect()
}

#[tokio::test]
async fn account_with_two_addresses_forwards_mailbox_and_vacation() {
    let sink = Sink::start().await;
    let server = TestServer::start(TestConfig::new(&[sink.addr])).await;
    let db = server.db.as_ref().expect("db").connect().await;
    let dora = add_account(
        &db,
        "dora",
        &["dora@example.com", "d.explorer@example.com"],
        Some("/var/mail/dora"),
        &["dora@example.org", "carol@example.com"],
    )
    .await;
    add_vacation(&db, dora, 3600).await;
    wait_until_current(&db, server.directory.as_ref().expect("directory")).await;

    let mut client = server.connect_from("127.0.0.2").await;
    client.expect("EHLO sender.example", 250).await;
    let content = b"From: friend@example.net\r\nTo: d.explorer@example.com\r\nMessage-ID: <first@example.net>\r\nSubject: hi\r\n\r\nhello\r\n";
    let id = send(
        &mut client,
        "friend@example.net",
        &["d.explorer@example.com"],
        content,
    )
    .await;
    let detail = wait_routed(&server, id).await;
    assert_eq!(
        deliveries(&detail),
        vec![
            (
                "carol@example.com".into(),
                "mailbox".into(),
                "maildir:/tmp/wsmtp-test-maildir/carol".into()
            ),
            (
                "d.explorer@example.com".into(),
                "mailbox".into(),
                "maildir:/var/mail/dora".into()
            ),
            (
                "dora@example.org".into(),
                "relay".into(),
                "group:legacy".into()
            ),
        ]
    );
    assert_eq!(detail.recipients[0].state, "routed");
    let resolution = detail.recipients[0]
        .resolution
        .as_deref()
        .expect("resolution");
    assert!(
        resolution.contains("account dora > forward"),
        "{resolution}"
    );

    // Exactly one auto-reply, to the sender, from <>, routed like any mail.
    let replies = auto_replies(&db).await;
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_eq!(replies[0].1, "friend@example.net");
    let reply = wait_routed(&server, replies[0].0).await;
    // example.net is a relay domain of the test configuration.
    assert_eq!(
        deliveries(&reply),
        vec![(
            "friend@example.net".into(),
            "relay".into(),
            "group:legacy".into()
        )]
    );
    let body = server
        .queue()
        .read_body(replies[0].0)
        .await
        .expect("reply body");
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("Auto-Submitted: auto-replied"), "{text}");
    assert!(text.contains("In-Reply-To: <first@example.net>"), "{text}");

    // A second message from the same sender within the interval: no reply.
    let second = b"From: friend@example.net\r\nTo: dora@example.com\r\nSubject: again\r\n\r\nhello again\r\n";
    let id = send(
        &mut client,
        "friend@example.net",
        &["dora@example.com"],
        second,
    )
    .await;
    let detail = wait_routed(&server, id).await;
    assert_eq!(detail.deliveries.len(), 3);
    assert_eq!(auto_replies(&db).await.len(), 1, "no second vacation reply");
    server.stop().await;
}

#[tokio::test]
async fn nested_lists_with_a_cycle_deliver_once_per_member() {
    let sink = Sink::start().await;
    let server = TestServer::start(TestConfig::new(&[sink.addr])).await;
    let db = server.db.as_ref().expect("db").connect().await;
    add_list(
        &db,
        "outer",
        "outer@example.com",
        "outer-owner@example.com",
        &["inner@example.com".into(), "alice@example.com".into()],
    )
    .await;
    add_list(
        &db,
        "inner",
        "inner@example.com",
        "inner-owner@example.com",
        &[
            "outer@example.com".into(),
            "carol@example.com".into(),
            "alice@example.com".into(),
        ],
    )
    .await;
    wait_until_current(&db, server.directory.as_ref().expect("directory")).await;

    let mut client = server.connect_from("127.0.0.2").await;
    client.expect("EHLO sender.example", 250).await;
    let id = send(
        &mut client,
        "friend@example.net",
        &["outer@example.com"],
        b"Subject: to all\r\n\r\nhi\r\n",
    )
    .await;
    let detail = wait_routed(&server, id).await;
    let addresses: Vec<String> = deliveries(&detail).into_iter().map(|(a, _, _)| a).collect();
    assert_eq!(
        addresses,
        vec![
            "alice@example.com".to_string(),
            "carol@example.com".to_string()
        ]
    );
    // The list that first reaches a member gives its owner as reverse-path;
    // members are expanded in address order.
    for delivery in &detail.deliveries {
        let expected = match delivery.address.as_str() {
            "alice@example.com" => "outer-owner@example.com",
            _ => "inner-owner@example.com",
        };
        assert_eq!(delivery.sender, expected, "{}", delivery.address);
    }
    server.stop().await;
}

#[tokio::test]
async fn list_of_500_members_stores_one_body() {
    let sink = Sink::start().await;
    let server = TestServer::start(TestConfig::new(&[sink.addr])).await;
    let db = server.db.as_ref().expect("db").connect().await;
    let members: Vec<String> = (0..500)
        .map(|n| format!("member{n:03}@example.org"))
        .collect();
    add_list(
        &db,
        "big",
        "big@example.com",
        "big-owner@example.com",
        &members,
    )
    .await;
    wait_until_current(&db, server.directory.as_ref().expect("directory")).await;

    let mut client = server.connect_from("127.0.0.2").await;
    client.expect("EHLO sender.example", 250).await;
    let id = send(
        &mut client,
        "friend@example.net",
        &["big@example.com"],
        b"Subject: big\r\n\r\nto many\r\n",
    )
    .await;
    let detail = wait_routed(&server, id).await;
    assert_eq!(detail.deliveries.len(), 500);
    let batches: std::collections::HashSet<i64> =
        detail.deliveries.iter().map(|d| d.batch_id).collect();
    assert_eq!(batches.len(), 25, "500 recipients in batches of 20");

    let messages: i64 = db
        .query_one("SELECT count(*) FROM messages", &[])
        .await
        .expect("count")
        .get(0);
    let chunks: i64 = db
        .query_one("SELECT count(*) FROM message_chunks", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(messages, 1, "one stored message");
    assert_eq!(chunks, 1, "one stored body");
    server.stop().await;
}

#[tokio::test]
async fn unknown_local_user_is_rejected_at_rcpt() {
    let sink = Sink::start().await;
    let server = TestServer::start(TestConfig::new(&[sink.addr])).await;
    let mut client = server.connect_from("127.0.0.2").await;
    client.expect("EHLO sender.example", 250).await;
    client.expect("MAIL FROM:<friend@example.net>", 250).await;
    let reply = client.expect("RCPT TO:<nobody@example.com>", 550).await;
    assert!(reply.text.starts_with("550 5.1.1"), "{}", reply.text);
    client.expect("RCPT TO:<postmaster@example.com>", 250).await;
    server.stop().await;
}

#[tokio::test]
async fn migrating_domain_passes_unknown_addresses_to_legacy() {
    let sink = Sink::start().await;
    sink.set_rcpt_reply("gone@old.example", "550 5.1.1 unknown here too");
    let server = TestServer::start(TestConfig::new(&[sink.addr])).await;
    let db = server.db.as_ref().expect("db").connect().await;
    add_domain(&db, "old.example", "migrating", Some("legacy")).await;
    add_account(
        &db,
        "moved",
        &["moved@old.example"],
        Some("/var/mail/moved"),
        &[],
    )
    .await;
    wait_until_current(&db, server.directory.as_ref().expect("directory")).await;

    let mut client = server.connect_from("127.0.0.2").await;
    client.expect("EHLO sender.example", 250).await;
    client.expect("MAIL FROM:<friend@example.net>", 250).await;
    // Not migrated yet: passed through live, so the legacy server decides.
    client.expect("RCPT TO:<stays@old.example>", 250).await;
    let reply = client.expect("RCPT TO:<gone@old.example>", 550).await;
    assert_eq!(reply.text, "550 5.1.1 unknown here too");
    client.expect("DATA", 354).await;
    client.send(b"Subject: legacy\r\n\r\nx\r\n.\r\n").await;
    assert_eq!(client.reply().await.code, 250);
    let messages = sink.wait_for_messages(1, Duration::from_secs(10)).await;
    assert_eq!(messages[0].rcpt_to, vec!["<stays@old.example>".to_string()]);

    // Migrated: spooled for local delivery.
    let id = send(
        &mut client,
        "friend@example.net",
        &["moved@old.example"],
        b"Subject: new home\r\n\r\nx\r\n",
    )
    .await;
    let detail = wait_routed(&server, id).await;
    assert_eq!(
        deliveries(&detail),
        vec![(
            "moved@old.example".into(),
            "mailbox".into(),
            "maildir:/var/mail/moved".into()
        )]
    );
    server.stop().await;
}

#[tokio::test]
async fn directory_changes_apply_without_restart() {
    let sink = Sink::start().await;
    let server = TestServer::start(TestConfig::new(&[sink.addr])).await;
    let db = server.db.as_ref().expect("db").connect().await;
    let mut client = server.connect_from("127.0.0.2").await;
    client.expect("EHLO sender.example", 250).await;
    client.expect("MAIL FROM:<friend@example.net>", 250).await;
    client.expect("RCPT TO:<newcomer@example.com>", 550).await;

    add_account(
        &db,
        "newcomer",
        &["newcomer@example.com"],
        Some("/var/mail/newcomer"),
        &[],
    )
    .await;
    wait_until_current(&db, server.directory.as_ref().expect("directory")).await;
    client.expect("RCPT TO:<newcomer@example.com>", 250).await;
    server.stop().await;
}

#[tokio::test]
async fn forward_loop_stops_on_second_pass() {
    let sink = Sink::start().await;
    let server = TestServer::start(TestConfig::new(&[sink.addr])).await;
    let db = server.db.as_ref().expect("db").connect().await;
    add_account(
        &db,
        "erin",
        &["erin@example.com"],
        None,
        &["erin@example.org"],
    )
    .await;
    wait_until_current(&db, server.directory.as_ref().expect("directory")).await;

    let mut client = server.connect_from("127.0.0.2").await;
    client.expect("EHLO sender.example", 250).await;
    // First pass: forwarded, with a Delivered-To trace in front.
    let first = send(
        &mut client,
        "friend@example.net",
        &["erin@example.com"],
        b"Subject: loop\r\n\r\nx\r\n",
    )
    .await;
    let detail = wait_routed(&server, first).await;
    assert_eq!(
        deliveries(&detail),
        vec![(
            "erin@example.org".into(),
            "relay".into(),
            "group:legacy".into()
        )]
    );
    let prefix: Vec<u8> = db
        .query_one(
            "SELECT header_prefix FROM deliveries WHERE message_id = $1",
            &[&first],
        )
        .await
        .expect("prefix")
        .get(0);
    assert_eq!(prefix, b"Delivered-To: erin@example.com\r\n");

    // The forwarded copy comes back carrying that trace: not forwarded again.
    let returned = b"Delivered-To: erin@example.com\r\nSubject: loop\r\n\r\nx\r\n";
    let second = send(
        &mut client,
        "friend@example.net",
        &["erin@example.com"],
        returned,
    )
    .await;
    // With nothing to deliver, the message is bounced and then complete,
    // so it leaves the queue and a notification takes its place.
    let mut notification = None;
    for _ in 0..400 {
        if server.queue().show(second).await.expect("show").is_none() {
            notification = db
                .query_opt(
                    "SELECT m.id FROM messages m JOIN recipients r ON r.message_id = m.id
                      WHERE m.sender = '' AND r.address = 'friend@example.net'",
                    &[],
                )
                .await
                .expect("query");
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let notification: QueueId = notification
        .expect("the looping message is bounced and removed")
        .get(0);
    let report = server.queue().read_body(notification).await.expect("body");
    let report = String::from_utf8_lossy(&report);
    assert!(report.contains("Action: failed"), "{report}");
    assert!(report.contains("5.4.6 mail forwarding loop"), "{report}");
    server.stop().await;
}
