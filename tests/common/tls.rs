//! TLS for tests: a self-signed certificate for `mx.test.example` made with
//! rcgen, and an SMTP client over a TLS stream that trusts it.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::harness::TestReply;

/// A certificate and key written to PEM files in a temporary directory.
pub struct TestCertificate {
    _directory: tempfile::TempDir,
    pub certificate_path: std::path::PathBuf,
    pub key_path: std::path::PathBuf,
    pub der: rustls_pki_types::CertificateDer<'static>,
}

pub fn make_certificate() -> TestCertificate {
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

/// Runs a TLS handshake on `stream` that trusts only `certificate`.
pub async fn handshake(stream: TcpStream, certificate: &TestCertificate) -> TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(certificate.der.clone())
        .expect("trust test certificate");
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from("mx.test.example").expect("server name");
    tokio::time::timeout(Duration::from_secs(10), connector.connect(name, stream))
        .await
        .expect("TLS handshake in time")
        .expect("TLS handshake")
}

/// An SMTP client on a TLS stream.
pub struct TlsSmtpClient {
    stream: BufReader<TlsStream<TcpStream>>,
}

impl TlsSmtpClient {
    pub fn new(stream: TlsStream<TcpStream>) -> TlsSmtpClient {
        TlsSmtpClient {
            stream: BufReader::new(stream),
        }
    }

    pub async fn send(&mut self, data: &[u8]) {
        self.stream
            .get_mut()
            .write_all(data)
            .await
            .expect("write over TLS");
    }

    /// Reads one reply; panics after 20 s or if the connection closes.
    pub async fn reply(&mut self) -> TestReply {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let read =
                tokio::time::timeout(Duration::from_secs(20), self.stream.read_line(&mut line))
                    .await
                    .expect("reply in time")
                    .expect("read over TLS");
            assert!(read > 0, "connection closed before a reply");
            let line = line.trim_end_matches(['\r', '\n']).to_string();
            let last = line.as_bytes().get(3) != Some(&b'-');
            lines.push(line);
            if last {
                break;
            }
        }
        let code = lines[0]
            .get(..3)
            .and_then(|c| c.parse().ok())
            .expect("reply code");
        TestReply {
            code,
            text: lines.join("\n"),
        }
    }

    /// Sends a command line (CRLF added) and reads its reply.
    pub async fn command(&mut self, line: &str) -> TestReply {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    /// Sends a command and checks the reply code.
    pub async fn expect(&mut self, line: &str, code: u16) -> TestReply {
        let reply = self.command(line).await;
        assert_eq!(reply.code, code, "{line} got {}", reply.text);
        reply
    }
}
