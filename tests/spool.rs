//! The durable spool: what is stored, and that nothing incomplete becomes
//! visible.

mod common;

use std::time::Duration;

use common::harness::{SmtpClient, TestConfig, TestServer, test_message, without_first_received};
use common::sink::Sink;
use lettre::address::Envelope;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

async fn start_transaction(client: &mut SmtpClient, recipients: &[&str]) {
    client.expect("EHLO sender.example", 250).await;
    client.expect("MAIL FROM:<sender@example.org>", 250).await;
    for recipient in recipients {
        client.expect(&format!("RCPT TO:<{recipient}>"), 250).await;
    }
}

#[tokio::test]
async fn lettre_message_is_spooled_byte_exact() {
    let sink = Sink::start().await;
    let server = TestServer::start(TestConfig::new(&[sink.addr])).await;
    let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(server.address.port())
        .build();
    let content = b"From: sender@example.org\r\nTo: alice@example.com\r\nSubject: spooled\r\n\r\n.dot\r\nline two";
    let envelope = Envelope::new(
        Some("sender@example.org".parse().expect("sender")),
        vec![
            "alice@example.com".parse().expect("rcpt"),
            "carol@example.com".parse().expect("rcpt"),
        ],
    )
    .expect("envelope");
    let response = transport
        .send_raw(&envelope, content)
        .await
        .expect("lettre send");
    let queue_id = response
        .message()
        .next()
        .and_then(|m| m.rsplit(' ').next())
        .expect("queue id in reply")
        .to_string();

    let messages = server.ready_messages().await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].id.simple().to_string(), queue_id);
    let detail = server
        .queue()
        .show(messages[0].id)
        .await
        .expect("show")
        .expect("message exists");
    let addresses: Vec<&str> = detail
        .recipients
        .iter()
        .map(|r| r.address.as_str())
        .collect();
    assert_eq!(addresses, vec!["alice@example.com", "carol@example.com"]);
    assert!(
        detail.recipients.iter().all(|r| r.route_group.is_none()),
        "local recipients have no group"
    );

    let body = server
        .queue()
        .read_body(messages[0].id)
        .await
        .expect("body");
    let mut expected = content.to_vec();
    expected.extend_from_slice(b"\r\n");
    assert_eq!(without_first_received(&body), expected.as_slice());
    assert!(
        String::from_utf8_lossy(&body).contains(&format!("id {queue_id}")),
        "Received header names the queue id"
    );
    assert_eq!(sink.connection_count(), 0);
    server.stop().await;
}

#[tokio::test]
async fn mixed_routes_are_spooled_once() {
    let sink = Sink::start().await;
    let server = TestServer::start(TestConfig::new(&[sink.addr])).await;
    let mut client = server.connect_from("127.0.0.2").await;
    start_transaction(&mut client, &["bob@example.net", "alice@example.com"]).await;
    client.expect("DATA", 354).await;
    client
        .send(b"Subject: mixed\r\n\r\nfor two routes\r\n.\r\n")
        .await;
    let reply = client.reply().await;
    assert!(
        reply.text.starts_with("250 2.0.0 OK: queued as"),
        "{}",
        reply.text
    );

    let messages = server.ready_messages().await;
    assert_eq!(messages.len(), 1, "one stored copy");
    let detail = server
        .queue()
        .show(messages[0].id)
        .await
        .expect("show")
        .expect("exists");
    let routes: Vec<(String, Option<String>)> = detail
        .recipients
        .iter()
        .map(|r| (r.address.clone(), r.route_group.clone()))
        .collect();
    assert_eq!(
        routes,
        vec![
            ("bob@example.net".to_string(), Some("legacy".to_string())),
            ("alice@example.com".to_string(), None)
        ]
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        sink.messages().is_empty(),
        "a mixed transaction must not be relayed live"
    );
    server.stop().await;
}

#[tokio::test]
async fn mixed_routes_without_queue_get_452() {
    let first = Sink::start().await;
    let second = Sink::start().await;
    let yaml = format!(
        "listeners:\n  - address: 127.0.0.1:0\n\
         relay:\n  relay_domains:\n    - {{domain: example.net, group: one}}\n    - {{domain: example.org, group: two}}\n\
         downstream_groups:\n  - {{name: one, hosts: ['{}']}}\n  - {{name: two, hosts: ['{}']}}\n",
        first.addr, second.addr
    );
    let server = TestServer::start_yaml(&yaml, None).await;
    let mut client = server.connect_from("127.0.0.2").await;
    start_transaction(&mut client, &["bob@example.net"]).await;
    let reply = client.expect("RCPT TO:<carol@example.org>", 452).await;
    assert!(reply.text.starts_with("452 4.5.3"), "{}", reply.text);
    client.expect("DATA", 354).await;
    client
        .send(b"Subject: first route only\r\n\r\nx\r\n.\r\n")
        .await;
    assert_eq!(client.reply().await.code, 250);
    let messages = first.wait_for_messages(1, Duration::from_secs(10)).await;
    assert_eq!(messages[0].rcpt_to, vec!["<bob@example.net>".to_string()]);
    assert!(second.messages().is_empty());
    server.stop().await;
}

#[tokio::test]
async fn client_vanishing_mid_data_leaves_no_message() {
    let sink = Sink::start().await;
    let server = TestServer::start(TestConfig::new(&[sink.addr])).await;
    let mut client = server.connect_from("127.0.0.2").await;
    start_transaction(&mut client, &["alice@example.com"]).await;
    client.expect("DATA", 354).await;
    // More than one 64 KiB chunk, so partial rows reach the database.
    client.send(&test_message("vanishing", 300_000)).await;
    drop(client);

    let mut remaining = usize::MAX;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            server.ready_messages().await.is_empty(),
            "an incomplete message became visible"
        );
        remaining = server.all_messages().await.len();
        if remaining == 0 {
            break;
        }
    }
    assert_eq!(remaining, 0, "the partial message was not removed");
    server.stop().await;
}

/// Cuts the test database off: ends its sessions and refuses new ones.
async fn stop_database(name: &str, allow: bool) {
    let (admin, connection) = tokio_postgres::connect(
        "postgres://postgres@127.0.0.1:5432/postgres",
        tokio_postgres::NoTls,
    )
    .await
    .expect("admin connection");
    tokio::spawn(connection);
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS {allow}"
        ))
        .await
        .expect("alter database");
    if !allow {
        admin
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                &[&name],
            )
            .await
            .expect("terminate sessions");
    }
}

#[tokio::test]
async fn database_stopped_mid_transaction_gives_4xx_and_no_message() {
    let sink = Sink::start().await;
    let server = TestServer::start(TestConfig::new(&[sink.addr])).await;
    let name = server.db.as_ref().expect("db").name.clone();
    let mut client = server.connect_from("127.0.0.2").await;
    start_transaction(&mut client, &["alice@example.com"]).await;
    client.expect("DATA", 354).await;
    client.send(&test_message("first half", 200_000)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    stop_database(&name, false).await;
    client.send(&test_message("second half", 200_000)).await;
    client.send(b".\r\n").await;
    let reply = client.reply().await;
    assert!(reply.text.starts_with("451 4.3.0"), "{}", reply.text);
    client.expect("NOOP", 250).await;

    stop_database(&name, true).await;
    assert!(
        server.ready_messages().await.is_empty(),
        "a message became visible"
    );

    // The queue recovers once the database is back.
    client.expect("MAIL FROM:<sender@example.org>", 250).await;
    client.expect("RCPT TO:<alice@example.com>", 250).await;
    client.expect("DATA", 354).await;
    client
        .send(b"Subject: after the outage\r\n\r\nx\r\n.\r\n")
        .await;
    let reply = client.reply().await;
    assert_eq!(reply.code, 250, "{}", reply.text);
    assert_eq!(server.ready_messages().await.len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn hundred_megabyte_message_is_spooled() {
    let sink = Sink::start().await;
    let server = TestServer::start(TestConfig::new(&[sink.addr])).await;
    let mut client = server.connect_from("127.0.0.2").await;
    start_transaction(&mut client, &["alice@example.com"]).await;
    client.expect("DATA", 354).await;
    let content = test_message("large", 100 * 1024 * 1024);
    for piece in content.chunks(1024 * 1024) {
        client.send(piece).await;
    }
    client.send(b".\r\n").await;
    let reply = client.reply().await;
    assert_eq!(reply.code, 250, "{}", reply.text);
    let messages = server.ready_messages().await;
    assert_eq!(messages.len(), 1);
    let body = server
        .queue()
        .read_body(messages[0].id)
        .await
        .expect("body");
    assert!(
        without_first_received(&body) == content.as_slice(),
        "stored content differs"
    );
    server.stop().await;
}

#[tokio::test]
async fn bdat_message_is_spooled() {
    let sink = Sink::start().await;
    let server = TestServer::start(TestConfig::new(&[sink.addr])).await;
    let mut client = server.connect_from("127.0.0.2").await;
    start_transaction(&mut client, &["alice@example.com"]).await;
    let chunks: [&[u8]; 3] = [b"Subject: bdat\r\n\r\nfirst\r", b"\n.second\r\n", b"third"];
    for (index, chunk) in chunks.iter().enumerate() {
        let last = if index == chunks.len() - 1 {
            " LAST"
        } else {
            ""
        };
        client
            .send(format!("BDAT {}{last}\r\n", chunk.len()).as_bytes())
            .await;
        client.send(chunk).await;
        let reply = client.reply().await;
        assert_eq!(reply.code, 250, "chunk {index}: {}", reply.text);
    }
    let messages = server.ready_messages().await;
    assert_eq!(messages.len(), 1);
    let body = server
        .queue()
        .read_body(messages[0].id)
        .await
        .expect("body");
    assert_eq!(
        without_first_received(&body),
        b"Subject: bdat\r\n\r\nfirst\r\n.second\r\nthird"
    );
    server.stop().await;
}

fn message_with_hops(hops: usize) -> Vec<u8> {
    let mut message = Vec::new();
    for hop in 0..hops {
        message.extend_from_slice(format!("Received: from hop{hop}.example by next.example; Fri, 4 Dec 2026 00:00:00 +0000\r\n").as_bytes());
    }
    message.extend_from_slice(b"Subject: loop\r\n\r\nbody\r\n.\r\n");
    message
}

#[tokio::test]
async fn too_many_received_headers_give_554() {
    let sink = Sink::start().await;
    let server = TestServer::start(TestConfig::new(&[sink.addr])).await;
    let mut client = server.connect_from("127.0.0.2").await;
    // Our own Received header counts: 49 plus ours reach the limit of 50.
    start_transaction(&mut client, &["alice@example.com"]).await;
    client.expect("DATA", 354).await;
    client.send(&message_with_hops(49)).await;
    let reply = client.reply().await;
    assert!(reply.text.starts_with("554 5.4.6"), "{}", reply.text);
    client.expect("MAIL FROM:<sender@example.org>", 250).await;
    client.expect("RCPT TO:<alice@example.com>", 250).await;
    client.expect("DATA", 354).await;
    client.send(&message_with_hops(48)).await;
    assert_eq!(client.reply().await.code, 250);
    assert_eq!(server.ready_messages().await.len(), 1);
    server.stop().await;
}
