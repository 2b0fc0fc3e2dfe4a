//! Protocol behaviour of the listener: sequence, pipelining, limits, replies.

mod common;

use std::time::Duration;

use common::harness::{TestConfig, TestServer};
use common::sink::Sink;

#[tokio::test]
async fn ehlo_announces_extensions() {
    let sink = Sink::start().await;
    let server = TestServer::start(TestConfig::new(&[sink.addr]).without_queue()).await;
    let mut client = server.connect().await;
    let reply = client.expect("EHLO client.example", 250).await;
    for keyword in [
        "PIPELINING",
        "SIZE 209715200",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
        "SMTPUTF8",
        "CHUNKING",
        "DSN",
    ] {
        assert!(
            reply.text.contains(keyword),
            "EHLO lacks {keyword}: {}",
            reply.text
        );
    }
    assert!(
        !reply.text.contains("STARTTLS"),
        "STARTTLS offered without a certificate"
    );
    server.stop().await;
}

#[tokio::test]
async fn commands_out_of_sequence_are_refused() {
    let sink = Sink::start().await;
    let server = TestServer::start(TestConfig::new(&[sink.addr]).without_queue()).await;
    let mut client = server.connect().await;
    let reply = client.expect("MAIL FROM:<a@example.org>", 503).await;
    assert!(reply.text.starts_with("503 5.5.1"), "{}", reply.text);
    client.expect("EHLO client.example", 250).await;
    client.expect("RCPT TO:<b@example.net>", 503).await;
    client.expect("DATA", 503).await;
    client.expect("MAIL FROM:<a@example.org>", 250).await;
    client.expect("MAIL FROM:<a@example.org>", 503).await;
    let reply = client.expect("DATA", 554).await;
    assert!(reply.text.starts_with("554 5.5.1"), "{}", reply.text);
    client.expect("RSET", 250).await;
    client.expect("NOOP", 250).await;
    client.expect("HELP", 214).await;
    let reply = client.expect("VRFY alice", 252).await;
    assert!(reply.text.starts_with("252 2.5.2"), "{}", reply.text);
    client.expect("EXPN staff", 502).await;
    let reply = client.expect("FOO bar", 500).await;
    assert!(reply.text.starts_with("500 5.5.2"), "{}", reply.text);
    client.expect("QUIT", 221).await;
    server.stop().await;
}

#[tokio::test]
async fn pipelined_transactions_relay_in_order() {
    let sink = Sink::start().await;
    let server = TestServer::start(TestConfig::new(&[sink.addr]).without_queue()).await;
    let mut client = server.connect().await;
    client.expect("EHLO client.example", 250).await;
    let mut batch = Vec::new();
    for n in 0..3 {
        batch.extend_from_slice(
            format!("MAIL FROM:<s{n}@example.org>\r\nRCPT TO:<r{n}@example.net>\r\nRCPT TO:<x{n}@example.net>\r\nDATA\r\n").as_bytes(),
        );
        // The whole group, data included, goes in one write: the server must
        // keep the order of replies and not lose pipelined bytes.
        batch.extend_from_slice(format!("Subject: {n}\r\n\r\nbody {n}\r\n.\r\n").as_bytes());
    }
    batch.extend_from_slice(b"QUIT\r\n");
    client.send(&batch).await;
    for _ in 0..3 {
        assert_eq!(client.reply().await.code, 250, "MAIL");
        assert_eq!(client.reply().await.code, 250, "RCPT");
        assert_eq!(client.reply().await.code, 250, "RCPT");
        assert_eq!(client.reply().await.code, 354, "DATA");
        assert_eq!(client.reply().await.code, 250, "final");
    }
    assert_eq!(client.reply().await.code, 221);
    let messages = sink.wait_for_messages(3, Duration::from_secs(10)).await;
    for (n, message) in messages.iter().enumerate() {
        assert_eq!(message.mail_from, format!("<s{n}@example.org>"));
        assert_eq!(
            message.rcpt_to,
            vec![format!("<r{n}@example.net>"), format!("<x{n}@example.net>")]
        );
        assert!(
            message
                .unstuffed()
                .ends_with(format!("\r\n\r\nbody {n}\r\n").as_bytes())
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn rset_starts_a_new_transaction() {
    let sink = Sink::start().await;
    let server = TestServer::start(TestConfig::new(&[sink.addr]).without_queue()).await;
    let mut client = server.connect().await;
    client.expect("EHLO client.example", 250).await;
    client.expect("MAIL FROM:<first@example.org>", 250).await;
    client.expect("RCPT TO:<dropped@example.net>", 250).await;
    client.expect("RSET", 250).await;
    client.expect("MAIL FROM:<second@example.org>", 250).await;
    client.expect("RCPT TO:<kept@example.net>", 250).await;
    client.expect("DATA", 354).await;
    client.send(b"Subject: after rset\r\n\r\nx\r\n.\r\n").await;
    assert_eq!(client.reply().await.code, 250);
    client.expect("MAIL FROM:<third@example.org>", 250).await;
    client.expect("RCPT TO:<again@example.net>", 250).await;
    client.expect("DATA", 354).await;
    client.send(b"Subject: third\r\n\r\ny\r\n.\r\n").await;
    assert_eq!(client.reply().await.code, 250);
    let messages = sink.wait_for_messages(2, Duration::from_secs(10)).await;
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0].mail_from, "<second@example.org>");
    assert_eq!(messages[0].rcpt_to, vec!["<kept@example.net>".to_string()]);
    assert_eq!(messages[1].mail_from, "<third@example.org>");
    server.stop().await;
}

#[tokio::test]
async fn recipient_limit_gives_452() {
    let sink = Sink::start().await;
    let server = TestServer::start(
        TestConfig::new(&[sink.addr])
            .without_queue()
            .limits("  max_recipients: 2\n"),
    )
    .await;
    let mut client = server.connect().await;
    client.expect("EHLO client.example", 250).await;
    client.expect("MAIL FROM:<a@example.org>", 250).await;
    client.expect("RCPT TO:<r1@example.net>", 250).await;
    client.expect("RCPT TO:<r2@example.net>", 250).await;
    let reply = client.expect("RCPT TO:<r3@example.net>", 452).await;
    assert!(reply.text.starts_with("452 4.5.3"), "{}", reply.text);
    server.stop().await;
}

#[tokio::test]
async fn declared_size_over_limit_gives_552() {
    let sink = Sink::start().await;
    let server = TestServer::start(TestConfig::new(&[sink.addr]).without_queue()).await;
    let mut client = server.connect().await;
    client.expect("EHLO client.example", 250).await;
    let reply = client
        .expect("MAIL FROM:<a@example.org> SIZE=999999999999", 552)
        .await;
    assert!(reply.text.starts_with("552 5.3.4"), "{}", reply.text);
    client
        .expect("MAIL FROM:<a@example.org> SIZE=1000", 250)
        .await;
    server.stop().await;
}

#[tokio::test]
async fn streamed_size_over_limit_gives_552_and_nothing_relayed() {
    let sink = Sink::start().await;
    let server = TestServer::start(
        TestConfig::new(&[sink.addr])
            .without_queue()
            .limits("  max_message_size: 10000\n"),
    )
    .await;
    let mut client = server.connect().await;
    client.expect("EHLO client.example", 250).await;
    client.expect("MAIL FROM:<a@example.org>", 250).await;
    client.expect("RCPT TO:<b@example.net>", 250).await;
    client.expect("DATA", 354).await;
    client
        .send(&common::harness::test_message("big", 20_000))
        .await;
    let reply = client.command(".").await;
    assert_eq!(reply.code, 552, "{}", reply.text);
    // The session goes on.
    client.expect("NOOP", 250).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        sink.messages().is_empty(),
        "an oversized message reached the sink"
    );
    server.stop().await;
}

#[tokio::test]
async fn malformed_command_lines_get_500_and_session_survives() {
    let sink = Sink::start().await;
    let server = TestServer::start(TestConfig::new(&[sink.addr]).without_queue()).await;
    let mut client = server.connect().await;
    client.expect("EHLO client.example", 250).await;
    client.send(b"NOOP\n").await;
    let reply = client.reply().await;
    assert!(
        reply.text.starts_with("500 5.5.2"),
        "bare LF: {}",
        reply.text
    );
    client.send(b"NO\rOP\r\n").await;
    assert_eq!(client.reply().await.code, 500, "bare CR");
    client.send(b"NO\0OP\r\n").await;
    assert_eq!(client.reply().await.code, 500, "NUL");
    let long = format!("NOOP {}\r\n", "x".repeat(5000));
    client.send(long.as_bytes()).await;
    let reply = client.reply().await;
    assert!(reply.text.contains("too long"), "{}", reply.text);
    client.expect("NOOP", 250).await;
    server.stop().await;
}

#[tokio::test]
async fn error_limit_closes_with_421() {
    let sink = Sink::start().await;
    let server = TestServer::start(
        TestConfig::new(&[sink.addr])
            .without_queue()
            .limits("  max_errors: 3\n"),
    )
    .await;
    let mut client = server.connect().await;
    for _ in 0..3 {
        assert_eq!(client.command("BOGUS").await.code, 500);
    }
    let reply = client.command("BOGUS").await;
    assert_eq!(reply.code, 500);
    let closing = client.reply().await;
    assert!(closing.text.starts_with("421 4.7.0"), "{}", closing.text);
    assert!(client.is_closed().await);
    // Others are still served.
    let mut other = server.connect().await;
    other.expect("EHLO other.example", 250).await;
    server.stop().await;
}

#[tokio::test]
async fn connection_limits_give_421() {
    let sink = Sink::start().await;
    let config = TestConfig::new(&[sink.addr])
        .without_queue()
        .limits("  max_connections: 3\n  max_connections_per_ip: 2\n");
    let server = TestServer::start(config).await;
    let _first = server.connect_from("127.0.0.2").await;
    let _second = server.connect_from("127.0.0.2").await;
    let mut third = common::harness::SmtpClient::connect_raw("127.0.0.2", server.address).await;
    let reply = third.reply().await;
    assert!(
        reply.text.starts_with("421 4.7.0"),
        "per-IP limit: {}",
        reply.text
    );
    let _other_ip = server.connect_from("127.0.0.3").await;
    let mut over_total =
        common::harness::SmtpClient::connect_raw("127.0.0.4", server.address).await;
    let reply = over_total.reply().await;
    assert!(
        reply.text.starts_with("421 4.7.0"),
        "total limit: {}",
        reply.text
    );
    drop(_first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut again = server.connect_from("127.0.0.2").await;
    again.expect("NOOP", 250).await;
    server.stop().await;
}

#[tokio::test]
async fn idle_client_times_out_with_421() {
    let sink = Sink::start().await;
    let server = TestServer::start(
        TestConfig::new(&[sink.addr])
            .without_queue()
            .timeouts("  command: 1s\n"),
    )
    .await;
    let mut client = server.connect().await;
    let reply = client
        .try_reply(Duration::from_secs(10))
        .await
        .expect("timeout reply");
    assert!(reply.text.starts_with("421 4.4.2"), "{}", reply.text);
    assert!(client.is_closed().await);
    server.stop().await;
}

#[tokio::test]
async fn shutdown_lets_open_transaction_finish_then_421() {
    let sink = Sink::start().await;
    let server = TestServer::start(TestConfig::new(&[sink.addr]).without_queue()).await;
    let mut busy = server.connect().await;
    let mut idle = server.connect().await;
    busy.expect("EHLO client.example", 250).await;
    busy.expect("MAIL FROM:<a@example.org>", 250).await;
    busy.expect("RCPT TO:<b@example.net>", 250).await;
    busy.expect("DATA", 354).await;
    busy.send(b"Subject: during shutdown\r\n\r\n").await;

    let stopping = tokio::spawn(server.stop());
    let reply = idle
        .try_reply(Duration::from_secs(10))
        .await
        .expect("idle session reply");
    assert!(
        reply.text.starts_with("421 4.3.2"),
        "idle session: {}",
        reply.text
    );

    busy.send(b"body\r\n.\r\n").await;
    assert_eq!(busy.reply().await.code, 250, "open transaction finishes");
    busy.send(b"NOOP\r\n").await;
    let reply = busy
        .try_reply(Duration::from_secs(10))
        .await
        .expect("421 after the transaction");
    assert_eq!(reply.code, 421, "{}", reply.text);
    stopping.await.expect("server stopped");
    assert_eq!(sink.messages().len(), 1);
}
