//! SMTP smuggling: end-of-data variants other than <CRLF>.<CRLF> must not end
//! the message, and the smuggled second message must appear nowhere.

mod common;

use std::time::Duration;

use common::harness::{TestConfig, TestServer};
use common::sink::Sink;

const VARIANTS: &[&[u8]] = &[b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r"];

async fn attempt_smuggling(server: &TestServer, recipient: &str, variant: &[u8]) {
    let mut client = server.connect_from("127.0.0.2").await;
    client.expect("EHLO sender.example", 250).await;
    client.expect("MAIL FROM:<honest@example.org>", 250).await;
    client.expect(&format!("RCPT TO:<{recipient}>"), 250).await;
    client.expect("DATA", 354).await;

    let mut payload = b"Subject: honest\r\n\r\nfirst message".to_vec();
    payload.extend_from_slice(variant);
    payload.extend_from_slice(
        b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nSubject: smuggled\r\n\r\nevil\r\n",
    );
    payload.extend_from_slice(b"\r\n.\r\n");
    client.send(&payload).await;

    let reply = client.reply().await;
    assert!(
        reply.text.starts_with("550 5.6.0"),
        "variant {variant:?}: {}",
        reply.text
    );
    // Nothing else was taken as a command: the next reply answers NOOP.
    client.expect("NOOP", 250).await;
    client.expect("QUIT", 221).await;
}

#[tokio::test]
async fn smuggling_variants_are_rejected_for_pass_through() {
    let sink = Sink::start().await;
    let server = TestServer::start(TestConfig::new(&[sink.addr])).await;
    for variant in VARIANTS {
        attempt_smuggling(&server, "bob@example.net", variant).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        sink.messages().is_empty(),
        "a message reached the sink: {:?}",
        sink.messages().len()
    );
    let commands = sink.commands();
    assert!(
        !commands
            .iter()
            .any(|c| c.contains("evil") || c.contains("victim")),
        "smuggled commands reached the sink: {commands:?}"
    );
    assert!(server.all_messages().await.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn smuggling_variants_are_rejected_for_spool() {
    let sink = Sink::start().await;
    let server = TestServer::start(TestConfig::new(&[sink.addr])).await;
    for variant in VARIANTS {
        attempt_smuggling(&server, "alice@example.com", variant).await;
    }
    assert!(
        server.ready_messages().await.is_empty(),
        "a message became visible in the spool"
    );
    assert!(
        server.all_messages().await.is_empty(),
        "partial messages were left behind"
    );
    assert_eq!(
        sink.connection_count(),
        0,
        "nothing should have been relayed"
    );
    server.stop().await;
}

#[tokio::test]
async fn bare_line_endings_in_bdat_are_rejected() {
    let sink = Sink::start().await;
    let server = TestServer::start(TestConfig::new(&[sink.addr])).await;
    let mut client = server.connect_from("127.0.0.2").await;
    client.expect("EHLO sender.example", 250).await;
    client.expect("MAIL FROM:<honest@example.org>", 250).await;
    client.expect("RCPT TO:<alice@example.com>", 250).await;
    let content = b"Subject: x\r\n\r\nline\n.\nMAIL FROM:<evil@example.org>\r\n";
    client
        .send(format!("BDAT {} LAST\r\n", content.len()).as_bytes())
        .await;
    client.send(content).await;
    let reply = client.reply().await;
    assert!(reply.text.starts_with("550 5.6.0"), "{}", reply.text);
    client.expect("NOOP", 250).await;
    assert!(server.all_messages().await.is_empty());
    server.stop().await;
}
