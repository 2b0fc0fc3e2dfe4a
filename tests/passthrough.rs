//! Real-time pass-through to a downstream group.

mod common;

use std::time::Duration;

use common::harness::{TestConfig, TestServer, test_message, without_first_received};
use common::sink::{DropAt, Sink};
use lettre::address::Envelope;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

fn lettre_transport(server: &TestServer) -> AsyncSmtpTransport<Tokio1Executor> {
    AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(server.address.ip().to_string())
        .port(server.address.port())
        .timeout(Some(Duration::from_secs(20)))
        .build()
}

#[tokio::test]
async fn lettre_message_arrives_byte_exact() {
    let sink = Sink::start().await;
    let server = TestServer::start(TestConfig::new(&[sink.addr]).without_queue()).await;
    // Lines starting with dots exercise transparency on both hops. lettre
    // always writes CRLF before the final dot, so the content it sends ends
    // in "end" and arrives with that CRLF added.
    let content = b"From: a@example.org\r\nTo: bob@example.net\r\nSubject: exact\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nend";
    let envelope = Envelope::new(
        Some("a@example.org".parse().expect("sender")),
        vec!["bob@example.net".parse().expect("recipient")],
    )
    .expect("envelope");
    lettre_transport(&server)
        .send_raw(&envelope, content)
        .await
        .expect("lettre send");

    let messages = sink.wait_for_messages(1, Duration::from_secs(10)).await;
    let received = messages[0].unstuffed();
    let mut expected = content.to_vec();
    expected.extend_from_slice(b"\r\n");
    assert_eq!(
        without_first_received(&received),
        expected,
        "content changed on the way"
    );
    assert!(
        received.starts_with(b"Received: from "),
        "our Received header is first"
    );
    assert_eq!(
        messages[0].mail_from.split(' ').next(),
        Some("<a@example.org>")
    );
    assert_eq!(messages[0].rcpt_to, vec!["<bob@example.net>".to_string()]);
    server.stop().await;
}

#[tokio::test]
async fn downstream_recipient_refusal_reaches_client() {
    let sink = Sink::start().await;
    sink.set_rcpt_reply("nobody@example.net", "550 5.1.1 No such user here");
    sink.set_rcpt_reply("busy@example.net", "450 mailbox busy");
    let server = TestServer::start(TestConfig::new(&[sink.addr]).without_queue()).await;
    let mut client = server.connect_from("127.0.0.2").await;
    client.expect("EHLO sender.example", 250).await;
    client.expect("MAIL FROM:<a@example.org>", 250).await;
    let reply = client.expect("RCPT TO:<nobody@example.net>", 550).await;
    assert_eq!(reply.text, "550 5.1.1 No such user here");
    let reply = client.expect("RCPT TO:<busy@example.net>", 450).await;
    assert_eq!(reply.text, "450 4.0.0 mailbox busy", "enhanced code added");
    client.expect("RCPT TO:<bob@example.net>", 250).await;
    client.expect("DATA", 354).await;
    client
        .send(b"Subject: one of three\r\n\r\nx\r\n.\r\n")
        .await;
    assert_eq!(client.reply().await.code, 250);
    let messages = sink.wait_for_messages(1, Duration::from_secs(10)).await;
    assert_eq!(messages[0].rcpt_to, vec!["<bob@example.net>".to_string()]);
    server.stop().await;
}

#[tokio::test]
async fn downstream_final_reply_becomes_ours() {
    let sink = Sink::start().await;
    sink.set_final_reply("554 5.7.1 Message refused by content filter");
    let server = TestServer::start(TestConfig::new(&[sink.addr]).without_queue()).await;
    let mut client = server.connect_from("127.0.0.2").await;
    client.expect("EHLO sender.example", 250).await;
    client.expect("MAIL FROM:<a@example.org>", 250).await;
    client.expect("RCPT TO:<bob@example.net>", 250).await;
    client.expect("DATA", 354).await;
    client.send(b"Subject: spam\r\n\r\nbuy\r\n.\r\n").await;
    let reply = client.reply().await;
    assert_eq!(reply.text, "554 5.7.1 Message refused by content filter");
    server.stop().await;
}

#[tokio::test]
async fn unreachable_group_gives_451_4_4_1() {
    let server = TestServer::start(TestConfig::new(&[]).without_queue()).await;
    let mut client = server.connect_from("127.0.0.2").await;
    client.expect("EHLO sender.example", 250).await;
    client.expect("MAIL FROM:<a@example.org>", 250).await;
    let reply = client.expect("RCPT TO:<bob@example.net>", 451).await;
    assert!(reply.text.starts_with("451 4.4.1"), "{}", reply.text);
    server.stop().await;
}

#[tokio::test]
async fn group_fails_over_to_next_host() {
    let dead = Sink::start().await;
    dead.stop();
    let refusing = Sink::start().await;
    refusing.set_drop(DropAt::Connect);
    let live = Sink::start().await;
    let server =
        TestServer::start(TestConfig::new(&[dead.addr, refusing.addr, live.addr]).without_queue())
            .await;
    let mut client = server.connect_from("127.0.0.2").await;
    client.expect("EHLO sender.example", 250).await;
    client.expect("MAIL FROM:<a@example.org>", 250).await;
    client.expect("RCPT TO:<bob@example.net>", 250).await;
    client.expect("DATA", 354).await;
    client.send(b"Subject: failover\r\n\r\nx\r\n.\r\n").await;
    assert_eq!(client.reply().await.code, 250);
    assert_eq!(
        live.wait_for_messages(1, Duration::from_secs(10))
            .await
            .len(),
        1
    );
    server.stop().await;
}

#[tokio::test]
async fn dsn_and_body_parameters_are_forwarded_when_offered() {
    let sink = Sink::start().await;
    let server = TestServer::start(TestConfig::new(&[sink.addr]).without_queue()).await;
    let mut client = server.connect_from("127.0.0.2").await;
    client.expect("EHLO sender.example", 250).await;
    client
        .expect(
            "MAIL FROM:<a@example.org> BODY=8BITMIME RET=HDRS ENVID=abc+2Bdef SIZE=100",
            250,
        )
        .await;
    client
        .expect(
            "RCPT TO:<bob@example.net> NOTIFY=FAILURE,DELAY ORCPT=rfc822;bob+40example.net",
            250,
        )
        .await;
    client.expect("DATA", 354).await;
    client.send(b"Subject: dsn\r\n\r\nx\r\n.\r\n").await;
    assert_eq!(client.reply().await.code, 250);
    let messages = sink.wait_for_messages(1, Duration::from_secs(10)).await;
    assert_eq!(
        messages[0].mail_from,
        "<a@example.org> SIZE=100 BODY=8BITMIME RET=HDRS ENVID=abc+2Bdef"
    );
    assert_eq!(
        messages[0].rcpt_to,
        vec!["<bob@example.net> NOTIFY=FAILURE,DELAY ORCPT=rfc822;bob@example.net".to_string()]
    );
    server.stop().await;
}

#[tokio::test]
async fn parameters_not_offered_downstream_are_left_out() {
    let sink = Sink::start().await;
    sink.set_capabilities(&["PIPELINING"]);
    let server = TestServer::start(TestConfig::new(&[sink.addr]).without_queue()).await;
    let mut client = server.connect_from("127.0.0.2").await;
    client.expect("EHLO sender.example", 250).await;
    client
        .expect("MAIL FROM:<a@example.org> BODY=8BITMIME RET=FULL", 250)
        .await;
    client
        .expect("RCPT TO:<bob@example.net> NOTIFY=NEVER", 250)
        .await;
    client.expect("DATA", 354).await;
    client.send(b"Subject: plain\r\n\r\nx\r\n.\r\n").await;
    assert_eq!(client.reply().await.code, 250);
    let messages = sink.wait_for_messages(1, Duration::from_secs(10)).await;
    assert_eq!(messages[0].mail_from, "<a@example.org>");
    assert_eq!(messages[0].rcpt_to, vec!["<bob@example.net>".to_string()]);
    server.stop().await;
}

#[tokio::test]
async fn downstream_dropping_during_data_gives_451() {
    let sink = Sink::start().await;
    sink.set_drop(DropAt::DuringData);
    let server = TestServer::start(TestConfig::new(&[sink.addr]).without_queue()).await;
    let mut client = server.connect_from("127.0.0.2").await;
    client.expect("EHLO sender.example", 250).await;
    client.expect("MAIL FROM:<a@example.org>", 250).await;
    client.expect("RCPT TO:<bob@example.net>", 250).await;
    client.expect("DATA", 354).await;
    client.send(&test_message("dropped", 300_000)).await;
    client.send(b".\r\n").await;
    let reply = client.reply().await;
    assert_eq!(reply.code, 451, "{}", reply.text);
    client.expect("NOOP", 250).await;
    server.stop().await;
}

#[tokio::test]
async fn bdat_is_relayed_as_data() {
    let sink = Sink::start().await;
    let server = TestServer::start(TestConfig::new(&[sink.addr]).without_queue()).await;
    let mut client = server.connect_from("127.0.0.2").await;
    client.expect("EHLO sender.example", 250).await;
    client.expect("MAIL FROM:<a@example.org>", 250).await;
    client.expect("RCPT TO:<bob@example.net>", 250).await;
    let first = b"Subject: chunks\r\n\r\n.dot line\r\n";
    let second = b"last line without CRLF";
    client
        .send(format!("BDAT {}\r\n", first.len()).as_bytes())
        .await;
    client.send(first).await;
    assert_eq!(client.reply().await.code, 250);
    client
        .send(format!("BDAT {} LAST\r\n", second.len()).as_bytes())
        .await;
    client.send(second).await;
    assert_eq!(client.reply().await.code, 250);
    let messages = sink.wait_for_messages(1, Duration::from_secs(10)).await;
    let content = messages[0].unstuffed();
    assert_eq!(
        without_first_received(&content),
        b"Subject: chunks\r\n\r\n.dot line\r\nlast line without CRLF\r\n"
    );
    server.stop().await;
}

#[tokio::test]
async fn refused_bdat_chunk_is_consumed() {
    let sink = Sink::start().await;
    let server = TestServer::start(TestConfig::new(&[sink.addr]).without_queue()).await;
    let mut client = server.connect_from("127.0.0.2").await;
    client.expect("EHLO sender.example", 250).await;
    // BDAT without a transaction: refused, but its 20 octets are read.
    client.send(b"BDAT 20\r\nNOOP\r\nNOOP\r\nNOOP\r\nxx").await;
    let reply = client.reply().await;
    assert_eq!(reply.code, 503, "{}", reply.text);
    client.expect("MAIL FROM:<a@example.org>", 250).await;
    let reply = client.expect("RCPT TO:<nobody@example.org>", 550).await;
    assert!(reply.text.contains("5.7.1"));
    client.send(b"BDAT 12 LAST\r\nQUIT\r\nQUIT\r\n").await;
    assert_eq!(client.reply().await.code, 554);
    client.expect("NOOP", 250).await;
    server.stop().await;
}

#[tokio::test]
async fn hundred_megabyte_message_passes_through() {
    let sink = Sink::start().await;
    let server = TestServer::start(TestConfig::new(&[sink.addr]).without_queue()).await;
    let mut client = server.connect_from("127.0.0.2").await;
    client.expect("EHLO sender.example", 250).await;
    client
        .expect("MAIL FROM:<a@example.org> SIZE=104857600", 250)
        .await;
    client.expect("RCPT TO:<bob@example.net>", 250).await;
    client.expect("DATA", 354).await;
    let content = test_message("large", 100 * 1024 * 1024);
    for piece in content.chunks(1024 * 1024) {
        client.send(piece).await;
    }
    client.send(b".\r\n").await;
    let reply = client.reply().await;
    assert_eq!(reply.code, 250, "{}", reply.text);
    let messages = sink.wait_for_messages(1, Duration::from_secs(60)).await;
    let received = messages[0].unstuffed();
    assert_eq!(without_first_received(&received).len(), content.len());
    assert!(
        without_first_received(&received) == content.as_slice(),
        "content differs"
    );
    server.stop().await;
}
