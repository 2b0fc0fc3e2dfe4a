//! STARTTLS: the upgrade, and that commands pipelined behind STARTTLS are
//! discarded (RFC 3207 §4.2).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::harness::{TestConfig, TestServer, without_first_received};
use common::sink::Sink;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

struct TestCertificate {
    _directory: tempfile::TempDir,
    certificate_path: std::path::PathBuf,
    key_path: std::path::PathBuf,
    der: rustls_pki_types::CertificateDer<'static>,
}

fn make_certificate() -> TestCertificate {
    let certified = rcgen::generate_simple_self_signed(vec!["mx.test.example".to_string()])
        .expect("certificate");
    let directory = tempfile::tempdir().expect("temp dir");
    let certificate_path = directory.path().join("cert.pem");
    let key_path = directory.path().join("key.pem");
    std::fs::write(&certificate_path, certified.cert.pem()).expect("write certificate");
    std::fs::write(&key_path, certified.signing_key.serialize_pem()).expect("write key");
    TestCertificate {
        _directory: directory,
        certificate_path,
        key_path,
        der: certified.cert.der().clone(),
    }
}

async fn read_reply<R: tokio::io::AsyncBufRead + Unpin>(reader: &mut R) -> String {
    let mut text = String::new();
    loop {
        let mut line = String::new();
        let read = tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line))
            .await
            .expect("reply in time")
            .expect("read");
        assert!(read > 0, "connection closed");
        text.push_str(&line);
        if line.as_bytes().get(3) == Some(&b' ') {
            return text;
        }
    }
}

#[tokio::test]
async fn starttls_discards_pipelined_commands_and_resets() {
    let certificate = make_certificate();
    let sink = Sink::start().await;
    let config = TestConfig::new(&[sink.addr])
        .without_queue()
        .tls(&certificate.certificate_path, &certificate.key_path);
    let server = TestServer::start(config).await;

    let mut client = server.connect_from("127.0.0.2").await;
    let ehlo = client.expect("EHLO sender.example", 250).await;
    assert!(ehlo.text.contains("STARTTLS"), "{}", ehlo.text);
    // Injected commands after STARTTLS in the same packet.
    client
        .send(b"STARTTLS\r\nMAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.net>\r\n")
        .await;
    let reply = client.reply().await;
    assert!(reply.text.starts_with("220 2.0.0"), "{}", reply.text);

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(certificate.der.clone())
        .expect("trust test certificate");
    let tls_config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_config));
    let name = ServerName::try_from("mx.test.example").expect("server name");
    let tls = connector
        .connect(name, client.into_stream())
        .await
        .expect("TLS handshake");
    let mut tls = BufReader::new(tls);

    // The injected MAIL was dropped: RCPT now has no transaction. Before EHLO
    // again, MAIL is refused too, since the session started over.
    tls.get_mut()
        .write_all(b"MAIL FROM:<a@example.org>\r\n")
        .await
        .expect("write");
    assert!(
        read_reply(&mut tls).await.starts_with("503"),
        "session was not reset"
    );
    tls.get_mut()
        .write_all(b"EHLO sender.example\r\n")
        .await
        .expect("write");
    let ehlo = read_reply(&mut tls).await;
    assert!(!ehlo.contains("STARTTLS"), "STARTTLS offered twice: {ehlo}");
    tls.get_mut()
        .write_all(b"RCPT TO:<bob@example.net>\r\n")
        .await
        .expect("write");
    assert!(
        read_reply(&mut tls).await.starts_with("503"),
        "pipelined MAIL was acted on"
    );

    tls.get_mut()
        .write_all(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n")
        .await
        .expect("write");
    assert!(read_reply(&mut tls).await.starts_with("250"));
    assert!(read_reply(&mut tls).await.starts_with("250"));
    assert!(read_reply(&mut tls).await.starts_with("354"));
    tls.get_mut()
        .write_all(b"Subject: over TLS\r\n\r\nsecret\r\n.\r\n")
        .await
        .expect("write");
    assert!(read_reply(&mut tls).await.starts_with("250"));

    let messages = sink.wait_for_messages(1, Duration::from_secs(10)).await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].mail_from, "<a@example.org>");
    let content = messages[0].unstuffed();
    assert!(
        String::from_utf8_lossy(&content).contains("with ESMTPS id"),
        "Received header notes TLS"
    );
    assert_eq!(
        without_first_received(&content),
        b"Subject: over TLS\r\n\r\nsecret\r\n"
    );
    assert!(
        !sink
            .commands()
            .iter()
            .any(|c| c.contains("evil") || c.contains("victim"))
    );
    server.stop().await;
}

#[tokio::test]
async fn starttls_without_certificate_is_not_offered() {
    let sink = Sink::start().await;
    let server = TestServer::start(TestConfig::new(&[sink.addr]).without_queue()).await;
    let mut client = server.connect().await;
    client.expect("EHLO sender.example", 250).await;
    let reply = client.expect("STARTTLS", 502).await;
    assert!(reply.text.starts_with("502 5.5.1"), "{}", reply.text);
    server.stop().await;
}
