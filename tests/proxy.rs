//! The PROXY protocol on a listener behind a load balancer: 127.0.0.1 plays
//! the trusted balancer and names the client in a version 1 or version 2
//! header. The named client is the one that relaying, the per-IP limit, the
//! Received header and the logs see.

mod common;

use std::net::{Ipv6Addr, SocketAddr};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use common::harness::{SmtpClient, TestServer, test_message};
use common::logs::CapturedLog;
use common::sink::Sink;

/// Returns the buffer that receives every log line of this test binary,
/// installing the capturing subscriber on first use.
fn captured_log() -> &'static CapturedLog {
    static LOG: OnceLock<CapturedLog> = OnceLock::new();
    LOG.get_or_init(|| {
        let log = CapturedLog::default();
        let writer = log.clone();
        tracing_subscriber::fmt()
            .with_env_filter("wsmtp=info")
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        log
    })
}

/// Returns the captured log lines that contain every one of `parts`.
fn log_lines_with(parts: &[&str]) -> Vec<String> {
    captured_log()
        .lines()
        .into_iter()
        .filter(|line| parts.iter().all(|part| line.contains(part)))
        .collect()
}

/// Starts wsmtp with a listener that expects PROXY headers from 127.0.0.1.
/// The relay networks are 127.0.0.1/32, 198.51.100.0/24 and 2001:db8:1::/48,
/// and mail for other domains goes to the sink through the group `legacy`.
async fn start_server(sink: &Sink, timeout: &str, max_per_ip: u32) -> TestServer {
    captured_log();
    let yaml = format!(
        "hostname: mx.test.example\n\
         listeners:\n  - address: 127.0.0.1:0\n    proxy_protocol:\n      trusted: [127.0.0.1/32]\n      timeout: {timeout}\n\
         limits:\n  max_connections_per_ip: {max_per_ip}\n\
         timeouts:\n  shutdown_grace: 5s\n\
         relay:\n  relay_domains:\n    - domain: example.net\n      group: legacy\n  \
         relay_networks: [127.0.0.1/32, 198.51.100.0/24, '2001:db8:1::/48']\n  outbound_group: legacy\n\
         downstream_groups:\n  - name: legacy\n    connect_timeout: 2s\n    command_timeout: 10s\n    hosts:\n      - {sink}\n",
        sink = sink.addr,
    );
    TestServer::start_yaml(&yaml, None).await
}

fn v1_header(family: &str, source: &str, destination: &str, port: u16) -> Vec<u8> {
    format!("PROXY {family} {source} {destination} {port} 25\r\n").into_bytes()
}

/// Builds a version 2 header. `command` 0 is LOCAL and 1 is PROXY, and
/// `family` is the address family and transport protocol byte (0x11 for TCP
/// over IPv4, 0x21 for TCP over IPv6).
fn v2_header(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.push(0x20 | command);
    header.push(family);
    header.extend_from_slice(&(addresses.len() as u16).to_be_bytes());
    header.extend_from_slice(addresses);
    header
}

fn v2_tcp4(source: [u8; 4], port: u16) -> Vec<u8> {
    let mut addresses = source.to_vec();
    addresses.extend_from_slice(&[192, 0, 2, 1]);
    addresses.extend_from_slice(&port.to_be_bytes());
    addresses.extend_from_slice(&25u16.to_be_bytes());
    v2_header(1, 0x11, &addresses)
}

fn v2_tcp6(source: &str, port: u16) -> Vec<u8> {
    let source: Ipv6Addr = source.parse().expect("IPv6 address");
    let destination: Ipv6Addr = "2001:db8::1".parse().expect("IPv6 address");
    let mut addresses = source.octets().to_vec();
    addresses.extend_from_slice(&destination.octets());
    addresses.extend_from_slice(&port.to_be_bytes());
    addresses.extend_from_slice(&25u16.to_be_bytes());
    // A NOOP TLV (type 0x04), which the server skips.
    addresses.extend_from_slice(&[0x04, 0, 2, 0, 0]);
    v2_header(1, 0x21, &addresses)
}

/// Connects from the balancer address, sends `header` and reads the greeting.
async fn connect_proxied(server: &TestServer, header: &[u8]) -> SmtpClient {
    let mut client = SmtpClient::connect_raw("127.0.0.1", server.address).await;
    client.send(header).await;
    let greeting = client.reply().await;
    assert_eq!(greeting.code, 220, "greeting: {}", greeting.text);
    client
}

/// Opens a transaction and returns the reply to one RCPT, after checking
/// that the EHLO reply names `expected_ip` as the client.
async fn rcpt_reply(client: &mut SmtpClient, expected_ip: &str, recipient: &str) -> u16 {
    let ehlo = client.expect("EHLO client.example", 250).await;
    assert!(
        ehlo.text
            .contains(&format!("client.example [{expected_ip}]")),
        "EHLO reply does not name {expected_ip}: {}",
        ehlo.text
    );
    client.expect("MAIL FROM:<sender@example.org>", 250).await;
    let reply = client.command(&format!("RCPT TO:<{recipient}>")).await;
    if reply.code == 550 {
        assert!(reply.text.starts_with("550 5.7.1"), "{}", reply.text);
    }
    reply.code
}

/// Connects from 127.0.0.1 with a raw stream and returns it with its local
/// address, which the server logs as the peer.
async fn connect_balancer(server: &TestServer) -> (TcpStream, SocketAddr) {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("address"))
        .expect("bind");
    let stream = socket.connect(server.address).await.expect("connect");
    let local = stream.local_addr().expect("local address");
    (stream, local)
}

/// Reads until the server closes the connection and returns what it sent,
/// or `None` when the connection stays open for 10 s.
async fn bytes_until_close(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut received = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk)).await;
        match read {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(received),
            Ok(Ok(n)) => received.extend_from_slice(&chunk[..n]),
        }
    }
}

#[tokio::test]
async fn v1_tcp4_source_decides_relaying() {
    let sink = Sink::start().await;
    let server = start_server(&sink, "5s", 20).await;

    let header = v1_header("TCP4", "203.0.113.7", "192.0.2.1", 40001);
    let mut outside = connect_proxied(&server, &header).await;
    let code = rcpt_reply(&mut outside, "203.0.113.7", "victim@example.org").await;
    assert_eq!(code, 550, "a proxied client outside relay_networks relayed");
    outside.expect("QUIT", 221).await;

    let header = v1_header("TCP4", "198.51.100.9", "192.0.2.1", 40002);
    let mut inside = connect_proxied(&server, &header).await;
    let code = rcpt_reply(&mut inside, "198.51.100.9", "friend@example.org").await;
    assert_eq!(code, 250, "a proxied client in relay_networks may relay");
    inside.expect("DATA", 354).await;
    inside.send(&test_message("proxied v1", 200)).await;
    inside.expect(".", 250).await;
    inside.expect("QUIT", 221).await;

    let messages = sink.wait_for_messages(1, Duration::from_secs(10)).await;
    assert_eq!(messages.len(), 1);
    let content = String::from_utf8_lossy(&messages[0].raw_data).into_owned();
    assert!(
        content.starts_with("Received: from client.example ([198.51.100.9])"),
        "{content}"
    );
    let finished = log_lines_with(&["transaction finished", "client_ip=198.51.100.9"]);
    assert_eq!(finished.len(), 1, "{finished:#?}");
    assert!(
        log_lines_with(&[
            "recipient decided",
            "client_ip=203.0.113.7",
            "victim@example.org"
        ])
        .len()
            == 1,
        "the refused recipient is logged with the proxied client"
    );
    server.stop().await;
}

#[tokio::test]
async fn v2_tcp4_source_decides_relaying() {
    let sink = Sink::start().await;
    let server = start_server(&sink, "5s", 20).await;

    let mut outside = connect_proxied(&server, &v2_tcp4([203, 0, 113, 17], 40003)).await;
    let code = rcpt_reply(&mut outside, "203.0.113.17", "victim@example.org").await;
    assert_eq!(code, 550, "a proxied client outside relay_networks relayed");
    outside.expect("QUIT", 221).await;

    let mut inside = connect_proxied(&server, &v2_tcp4([198, 51, 100, 19], 40004)).await;
    let code = rcpt_reply(&mut inside, "198.51.100.19", "friend@example.org").await;
    assert_eq!(code, 250, "a proxied client in relay_networks may relay");
    inside.expect("QUIT", 221).await;
    server.stop().await;
}

#[tokio::test]
async fn v2_tcp6_source_decides_relaying() {
    let sink = Sink::start().await;
    let server = start_server(&sink, "5s", 20).await;

    let mut outside = connect_proxied(&server, &v2_tcp6("2001:db8::7", 40005)).await;
    let code = rcpt_reply(&mut outside, "2001:db8::7", "victim@example.org").await;
    assert_eq!(code, 550, "a proxied client outside relay_networks relayed");
    outside.expect("QUIT", 221).await;

    let mut inside = connect_proxied(&server, &v2_tcp6("2001:db8:1::9", 40006)).await;
    let code = rcpt_reply(&mut inside, "2001:db8:1::9", "friend@example.org").await;
    assert_eq!(code, 250, "a proxied client in relay_networks may relay");
    inside.expect("QUIT", 221).await;
    server.stop().await;
}

#[tokio::test]
async fn v1_tcp6_source_is_the_client() {
    let sink = Sink::start().await;
    let server = start_server(&sink, "5s", 20).await;
    let header = v1_header("TCP6", "2001:db8::27", "2001:db8::1", 40007);
    let mut outside = connect_proxied(&server, &header).await;
    let code = rcpt_reply(&mut outside, "2001:db8::27", "victim@example.org").await;
    assert_eq!(code, 550);
    outside.expect("QUIT", 221).await;
    server.stop().await;
}

#[tokio::test]
async fn unknown_and_local_keep_the_balancer_address() {
    let sink = Sink::start().await;
    let server = start_server(&sink, "5s", 20).await;
    let headers = [
        ("v1 UNKNOWN", b"PROXY UNKNOWN\r\n".to_vec()),
        ("v2 LOCAL", v2_header(0, 0x00, &[])),
    ];
    for (name, header) in headers {
        let mut client = connect_proxied(&server, &header).await;
        // 127.0.0.1 is a relay network, so the balancer itself may relay.
        let code = rcpt_reply(&mut client, "127.0.0.1", "friend@example.org").await;
        assert_eq!(code, 250, "{name}");
        client.expect("QUIT", 221).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn command_pipelined_after_header_is_kept() {
    let sink = Sink::start().await;
    let server = start_server(&sink, "5s", 20).await;
    let mut client = SmtpClient::connect_raw("127.0.0.1", server.address).await;
    let mut input = v1_header("TCP4", "203.0.113.37", "192.0.2.1", 40008);
    input.extend_from_slice(b"EHLO early.example\r\n");
    client.send(&input).await;
    assert_eq!(client.reply().await.code, 220);
    let ehlo = client.reply().await;
    assert_eq!(ehlo.code, 250, "{}", ehlo.text);
    assert!(
        ehlo.text.contains("early.example [203.0.113.37]"),
        "{}",
        ehlo.text
    );
    server.stop().await;
}

#[tokio::test]
async fn malformed_header_closes_without_greeting() {
    let sink = Sink::start().await;
    let server = start_server(&sink, "5s", 20).await;
    let mut bad_version = v2_tcp4([203, 0, 113, 47], 40009);
    bad_version[12] = 0x31;
    let mut oversized = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    oversized.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("SMTP command", b"EHLO client.example\r\n".to_vec()),
        (
            "v1 address out of range",
            v1_header("TCP4", "203.0.113.300", "192.0.2.1", 40010),
        ),
        (
            "v1 bare LF",
            b"PROXY TCP4 203.0.113.7 192.0.2.1 40011 25\n".to_vec(),
        ),
        ("v1 over 107 bytes", {
            let mut line = b"PROXY UNKNOWN ".to_vec();
            line.resize(150, b'x');
            line
        }),
        ("v2 version 3", bad_version),
        ("v2 address block of 65535 bytes", oversized),
    ];
    for (name, input) in cases {
        let (mut stream, local) = connect_balancer(&server).await;
        stream.write_all(&input).await.expect("write");
        let received = bytes_until_close(&mut stream)
            .await
            .unwrap_or_else(|| panic!("{name}: connection stayed open"));
        assert!(
            received.is_empty(),
            "{name}: server sent {:?}",
            String::from_utf8_lossy(&received)
        );
        let warnings = log_lines_with(&[
            "WARN",
            "PROXY header missing or invalid",
            &format!("peer={local}"),
        ]);
        assert_eq!(warnings.len(), 1, "{name}: {warnings:#?}");
    }
    server.stop().await;
}

#[tokio::test]
async fn missing_header_times_out_without_greeting() {
    let sink = Sink::start().await;
    let server = start_server(&sink, "1s", 20).await;
    let cases: [(&str, &[u8]); 3] = [
        ("nothing sent", b""),
        ("partial v1 line", b"PROXY TCP4 203.0.113.57 "),
        (
            "partial v2 header",
            b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c\xcb\x00",
        ),
    ];
    for (name, input) in cases {
        let (mut stream, local) = connect_balancer(&server).await;
        let started = Instant::now();
        stream.write_all(input).await.expect("write");
        let received = bytes_until_close(&mut stream)
            .await
            .unwrap_or_else(|| panic!("{name}: connection stayed open"));
        let waited = started.elapsed();
        assert!(
            received.is_empty(),
            "{name}: server sent {:?}",
            String::from_utf8_lossy(&received)
        );
        assert!(
            waited >= Duration::from_millis(900),
            "{name}: closed after {waited:?}, before the 1 s timeout"
        );
        let warnings =
            log_lines_with(&["WARN", "no complete PROXY header", &format!("peer={local}")]);
        assert_eq!(warnings.len(), 1, "{name}: {warnings:#?}");
    }
    server.stop().await;
}

#[tokio::test]
async fn untrusted_peer_proxy_line_is_a_bad_command() {
    let sink = Sink::start().await;
    let server = start_server(&sink, "5s", 20).await;
    // 127.0.0.2 is neither trusted nor a relay network: it gets the greeting
    // at once, like any direct client.
    let mut client = server.connect_from("127.0.0.2").await;
    let reply = client
        .command("PROXY TCP4 198.51.100.9 192.0.2.1 40012 25")
        .await;
    assert_eq!(reply.code, 500, "{}", reply.text);
    assert!(reply.text.starts_with("500 5.5.2"), "{}", reply.text);
    let code = rcpt_reply(&mut client, "127.0.0.2", "victim@example.org").await;
    assert_eq!(code, 550, "the PROXY line made 127.0.0.2 a relay client");
    client.expect("QUIT", 221).await;
    server.stop().await;
}

#[tokio::test]
async fn per_ip_limit_counts_proxied_clients() {
    let sink = Sink::start().await;
    let server = start_server(&sink, "5s", 1).await;
    let header_a = v1_header("TCP4", "203.0.113.67", "192.0.2.1", 40013);
    let header_b = v2_tcp4([203, 0, 113, 68], 40014);
    let mut first = connect_proxied(&server, &header_a).await;
    let mut second = connect_proxied(&server, &header_b).await;
    first.expect("NOOP", 250).await;
    second.expect("NOOP", 250).await;

    // A second connection for a client that already has one is over the limit.
    let mut third = SmtpClient::connect_raw("127.0.0.1", server.address).await;
    third
        .send(&v1_header("TCP4", "203.0.113.67", "192.0.2.1", 40015))
        .await;
    let refused = third.reply().await;
    assert_eq!(refused.code, 421, "{}", refused.text);
    assert!(refused.text.starts_with("421 4.7.0"), "{}", refused.text);

    first.expect("QUIT", 221).await;
    second.expect("QUIT", 221).await;
    server.stop().await;
}
