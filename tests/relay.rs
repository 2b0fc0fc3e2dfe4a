//! The anti-relay decision seen from outside: every address trick from a
//! client outside the relay networks is refused, and nothing reaches the
//! downstream or the queue.

mod common;

use common::harness::{TestConfig, TestServer};
use common::sink::Sink;

/// Recipients that must not get past from 127.0.0.2, with the reply code.
const TRICKS: &[(&str, u16)] = &[
    ("<victim@example.org>", 550),
    ("<@example.com:victim@example.org>", 550),
    ("<@example.com,@example.net:victim@example.org>", 550),
    ("<victim%example.org@example.com>", 550),
    ("<victim%example.org@example.net>", 550),
    ("<example.org!victim@example.com>", 550),
    ("<example.org!victim@example.net>", 550),
    ("<\"victim@example.org\"@example.com>", 550),
    ("<\"victim@example.org\"@example.net>", 550),
    ("<\"victim%example.org\"@example.net>", 550),
    // The command parser refuses address literals outright.
    ("<victim@[127.0.0.1]>", 501),
    ("<victim@[IPv6:::1]>", 501),
    ("<victim@example.org.>", 550),
    ("<victim@EXAMPLE.ORG>", 550),
    ("<victim@example.com.example.org>", 550),
    ("<victim@sub.example.net>", 550),
    ("<victim@xn--exmple-cua.org>", 550),
    ("<victim@127.0.0.1>", 501),
    ("<victim@example.org..>", 501),
    ("<victim@.example.com>", 501),
    ("<victim@exa mple.com>", 501),
];

#[tokio::test]
async fn relay_tricks_from_outside_are_refused() {
    let sink = Sink::start().await;
    // Every trick is an error reply; keep the session below the error limit.
    let server =
        TestServer::start(TestConfig::new(&[sink.addr]).limits("  max_errors: 100\n")).await;
    let mut client = server.connect_from("127.0.0.2").await;
    client.expect("EHLO outside.example", 250).await;
    client.expect("MAIL FROM:<spammer@example.org>", 250).await;
    let mut mismatches = Vec::new();
    for (recipient, code) in TRICKS {
        let reply = client.command(&format!("RCPT TO:{recipient}")).await;
        let expected_prefix = if *code == 550 { "550 5.7.1" } else { "501 5." };
        if !reply.text.starts_with(expected_prefix) {
            mismatches.push(format!(
                "{recipient}: expected {expected_prefix}, got {}",
                reply.text
            ));
        }
    }
    assert!(mismatches.is_empty(), "{mismatches:#?}");
    assert_eq!(
        client.command("DATA").await.code,
        554,
        "no recipient was accepted"
    );
    client.expect("QUIT", 221).await;
    assert!(
        sink.commands().iter().all(|c| !c.starts_with("RCPT")),
        "a trick reached the downstream: {:?}",
        sink.commands()
    );
    assert!(server.all_messages().await.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn normalised_local_and_relay_domains_are_accepted_from_outside() {
    let sink = Sink::start().await;
    let server = TestServer::start(TestConfig::new(&[sink.addr])).await;
    let mut client = server.connect_from("127.0.0.2").await;
    client.expect("EHLO outside.example", 250).await;
    client.expect("MAIL FROM:<sender@example.org>", 250).await;
    for recipient in [
        "<alice@example.com>",
        "<ALICE@EXAMPLE.COM.>",
        "<@relay.example.org:alice@example.com>",
        "<postmaster@example.com>",
        "<Postmaster>",
    ] {
        client.expect(&format!("RCPT TO:{recipient}"), 250).await;
    }
    client.expect("RSET", 250).await;
    client.expect("MAIL FROM:<sender@example.org>", 250).await;
    client.expect("RCPT TO:<bob@Example.NET.>", 250).await;
    server.stop().await;
}

#[tokio::test]
async fn relay_network_may_relay_anywhere() {
    let sink = Sink::start().await;
    let server = TestServer::start(TestConfig::new(&[sink.addr]).without_queue()).await;
    let mut client = server.connect().await;
    client.expect("EHLO inside.example", 250).await;
    client.expect("MAIL FROM:<sender@example.net>", 250).await;
    client.expect("RCPT TO:<someone@example.org>", 250).await;
    client.expect("DATA", 354).await;
    client.send(b"Subject: outbound\r\n\r\nhi\r\n.\r\n").await;
    assert_eq!(client.reply().await.code, 250);
    let messages = sink
        .wait_for_messages(1, std::time::Duration::from_secs(5))
        .await;
    assert_eq!(
        messages[0].rcpt_to,
        vec!["<someone@example.org>".to_string()]
    );
    server.stop().await;
}

#[tokio::test]
async fn postmaster_is_accepted_even_with_mixed_case() {
    let sink = Sink::start().await;
    let server = TestServer::start(TestConfig::new(&[sink.addr])).await;
    let mut client = server.connect_from("127.0.0.9").await;
    client.expect("EHLO outside.example", 250).await;
    client.expect("MAIL FROM:<>", 250).await;
    client.expect("RCPT TO:<PostMaster@example.com>", 250).await;
    client.expect("DATA", 354).await;
    client
        .send(b"Subject: to postmaster\r\n\r\nhello\r\n.\r\n")
        .await;
    assert_eq!(client.reply().await.code, 250);
    let messages = server.ready_messages().await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].sender, "");
    server.stop().await;
}
