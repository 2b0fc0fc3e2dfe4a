//! Rate limits in real SMTP sessions. Each limit refuses the event after
//! its count with a reply that names it, and allows it again once the
//! window has passed. A class from a client network or from a relay rule
//! gives other limits than `default`.
//!
//! Windows are a few seconds, with at least one second per event of the
//! count, so a test machine under load does not earn a new event between
//! the first one counted and the one that must be refused.

mod common;

use std::time::Duration;

use common::directory::wait_until_current;
use common::harness::{SmtpClient, TestConfig, TestReply, TestServer};
use common::sink::Sink;

/// Connects from `ip` and returns the greeting or refusal.
async fn greeting(server: &TestServer, ip: &str) -> (SmtpClient, TestReply) {
    let mut client = SmtpClient::connect_raw(ip, server.address).await;
    let reply = client.reply().await;
    (client, reply)
}

/// Connects from `ip`, expecting a 421 that names the connection rate, and
/// checks that the server closes the connection.
async fn refused_connection(server: &TestServer, ip: &str, text: &str) {
    let (mut client, reply) = greeting(server, ip).await;
    assert_eq!(reply.text, text, "connection from {ip}");
    assert!(client.is_closed().await, "closed after the 421");
}

/// Runs one transaction from a greeted session: MAIL, each RCPT, then the
/// message when a recipient was accepted (RSET otherwise). Returns the
/// RCPT replies.
async fn transaction(client: &mut SmtpClient, sender: &str, recipients: &[&str]) -> Vec<TestReply> {
    client.expect(&format!("MAIL FROM:<{sender}>"), 250).await;
    let mut replies = Vec::new();
    for recipient in recipients {
        replies.push(client.command(&format!("RCPT TO:<{recipient}>")).await);
    }
    if replies.iter().any(|reply| reply.code == 250) {
        client.expect("DATA", 354).await;
        client.send(b"Subject: limits\r\n\r\nHello.\r\n.\r\n").await;
        let reply = client.reply().await;
        assert_eq!(reply.code, 250, "{}", reply.text);
    } else {
        client.expect("RSET", 250).await;
    }
    replies
}

fn codes(replies: &[TestReply]) -> Vec<u16> {
    replies.iter().map(|reply| reply.code).collect()
}

/// Starts a pass-through server whose outbound group is `sink`, with
/// `yaml` appended at the top level.
async fn start(sink: &Sink, limits: &str, yaml: &str) -> TestServer {
    TestServer::start(
        TestConfig::new(&[sink.addr])
            .without_queue()
            .limits(limits)
            .extra(yaml),
    )
    .await
}

const NEW_CONNECTIONS: &str =
    "421 4.7.0 Too many new connections from your address, try again later";
const OPEN_CONNECTIONS: &str = "421 4.7.0 Too many connections from your address, try again later";

#[tokio::test(flavor = "multi_thread")]
async fn connection_rate_trips_and_recovers() {
    let sink = Sink::start().await;
    let server = start(
        &sink,
        "",
        "rate_limits:\n  default:\n    connections_per_ip: 3/4s\n  \
         customers:\n    networks: [127.0.0.5/32]\n    connections_per_ip: 6/6s\n",
    )
    .await;

    for _ in 0..3 {
        let (mut client, reply) = greeting(&server, "127.0.0.3").await;
        assert_eq!(reply.code, 220, "{}", reply.text);
        client.expect("QUIT", 221).await;
    }
    refused_connection(&server, "127.0.0.3", NEW_CONNECTIONS).await;
    let (_, other) = greeting(&server, "127.0.0.4").await;
    assert_eq!(other.code, 220, "another address has its own count");

    // The customers network has a larger rate.
    for _ in 0..6 {
        let (_, reply) = greeting(&server, "127.0.0.5").await;
        assert_eq!(reply.code, 220, "{}", reply.text);
    }
    refused_connection(&server, "127.0.0.5", NEW_CONNECTIONS).await;

    tokio::time::sleep(Duration::from_millis(4_200)).await;
    for _ in 0..3 {
        let (_, reply) = greeting(&server, "127.0.0.3").await;
        assert_eq!(reply.code, 220, "the window has passed: {}", reply.text);
    }
    refused_connection(&server, "127.0.0.3", NEW_CONNECTIONS).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn open_connections_per_class() {
    let sink = Sink::start().await;
    let server = start(
        &sink,
        "  max_connections_per_ip: 2\n",
        "rate_limits:\n  customers:\n    networks: [127.0.0.5/32]\n    max_connections_per_ip: 4\n",
    )
    .await;

    let first = server.connect_from("127.0.0.3").await;
    let _second = server.connect_from("127.0.0.3").await;
    refused_connection(&server, "127.0.0.3", OPEN_CONNECTIONS).await;
    drop(first);
    // The server frees the slot once it reads the end of the connection.
    let mut admitted = false;
    for _ in 0..50 {
        let (_, reply) = greeting(&server, "127.0.0.3").await;
        if reply.code == 220 {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(admitted, "a closed connection frees its slot");

    let mut open = Vec::new();
    for _ in 0..4 {
        open.push(server.connect_from("127.0.0.5").await);
    }
    refused_connection(&server, "127.0.0.5", OPEN_CONNECTIONS).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_per_sender_trip_and_recover() {
    let sink = Sink::start().await;
    let server = start(
        &sink,
        "",
        "rate_limits:\n  default:\n    messages_per_sender: 2/4s\n",
    )
    .await;
    let mut client = server.connect().await;
    client.expect("EHLO client.example", 250).await;

    for _ in 0..2 {
        let replies = transaction(&mut client, "a@example.org", &["bob@example.net"]).await;
        assert_eq!(codes(&replies), [250]);
    }
    // Counted once per message, whatever the number of recipients.
    let replies = transaction(
        &mut client,
        "A@Example.ORG",
        &["bob@example.net", "carol@example.net"],
    )
    .await;
    assert_eq!(
        replies[0].text,
        "451 4.7.1 Too many messages from this sender, try again later"
    );
    assert_eq!(codes(&replies), [451, 451]);
    let replies = transaction(&mut client, "b@example.org", &["bob@example.net"]).await;
    assert_eq!(codes(&replies), [250], "another sender has its own count");
    for _ in 0..5 {
        let replies = transaction(&mut client, "", &["bob@example.net"]).await;
        assert_eq!(codes(&replies), [250], "the null sender is not counted");
    }

    tokio::time::sleep(Duration::from_millis(4_200)).await;
    for _ in 0..2 {
        let replies = transaction(&mut client, "a@example.org", &["bob@example.net"]).await;
        assert_eq!(codes(&replies), [250], "the window has passed");
    }
    let replies = transaction(&mut client, "a@example.org", &["bob@example.net"]).await;
    assert_eq!(codes(&replies), [451]);
    assert_eq!(sink.messages().len(), 10);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn recipients_per_ip_trip_and_recover() {
    let sink = Sink::start().await;
    let server = start(
        &sink,
        "",
        "rate_limits:\n  default:\n    recipients_per_ip: 3/6s\n",
    )
    .await;
    let mut client = server.connect().await;
    client.expect("EHLO client.example", 250).await;

    let replies = transaction(
        &mut client,
        "a@example.org",
        &[
            "r1@example.net",
            "r2@example.net",
            "r3@example.net",
            "r4@example.net",
        ],
    )
    .await;
    assert_eq!(codes(&replies), [250, 250, 250, 451]);
    assert_eq!(
        replies[3].text,
        "451 4.7.1 Too many recipients from your address, try again later"
    );
    let replies = transaction(&mut client, "b@example.org", &["r5@example.net"]).await;
    assert_eq!(
        codes(&replies),
        [451],
        "the address is still over its limit"
    );
    // Rejected recipients keep their own reply and are not counted.
    let mut outside = server.connect_from("127.0.0.2").await;
    outside.expect("EHLO client.example", 250).await;
    let replies = transaction(
        &mut outside,
        "a@example.org",
        &[
            "x1@example.org",
            "x2@example.org",
            "x3@example.org",
            "x4@example.org",
        ],
    )
    .await;
    assert_eq!(codes(&replies), [550, 550, 550, 550]);
    let replies = transaction(
        &mut outside,
        "a@example.org",
        &[
            "r1@example.net",
            "r2@example.net",
            "r3@example.net",
            "r4@example.net",
        ],
    )
    .await;
    assert_eq!(codes(&replies), [250, 250, 250, 451]);

    tokio::time::sleep(Duration::from_millis(6_200)).await;
    let replies = transaction(
        &mut client,
        "a@example.org",
        &[
            "r1@example.net",
            "r2@example.net",
            "r3@example.net",
            "r4@example.net",
        ],
    )
    .await;
    assert_eq!(
        codes(&replies),
        [250, 250, 250, 451],
        "the window has passed"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rule_class_gives_larger_limit() {
    let sink = Sink::start().await;
    let rules = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        rules.path().join("10-customers.yaml"),
        "- name: customers-relay\n  client: [127.0.0.6/32]\n  recipient_kind: [relay_domain]\n  \
         action: relay\n  rate_limit: customers\n",
    )
    .expect("write rules");
    let server = start(
        &sink,
        "",
        &format!(
            "rules: '{}'\nrate_limits:\n  default:\n    messages_per_ip: 1/4s\n  \
             customers:\n    messages_per_ip: 3/6s\n",
            rules.path().display()
        ),
    )
    .await;

    let mut customer = server.connect_from("127.0.0.6").await;
    customer.expect("EHLO customer.example", 250).await;
    for _ in 0..3 {
        let replies = transaction(&mut customer, "a@example.org", &["bob@example.net"]).await;
        assert_eq!(codes(&replies), [250]);
    }
    let replies = transaction(&mut customer, "a@example.org", &["bob@example.net"]).await;
    assert_eq!(
        replies[0].text,
        "451 4.7.1 Too many messages from your address, try again later"
    );

    let mut other = server.connect_from("127.0.0.7").await;
    other.expect("EHLO other.example", 250).await;
    let replies = transaction(&mut other, "a@example.org", &["bob@example.net"]).await;
    assert_eq!(codes(&replies), [250]);
    let replies = transaction(&mut other, "a@example.org", &["bob@example.net"]).await;
    assert_eq!(
        codes(&replies),
        [451],
        "no rule names a class: default applies"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_per_user_count_the_account() {
    let sink = Sink::start().await;
    let server = TestServer::start(
        TestConfig::new(&[sink.addr])
            .auth("{require_tls: false}")
            .auth_settings("  failure_delay: 0s\n  sender_must_match: false\n")
            .extra(
                "rate_limits:\n  default:\n    messages_per_user: 2/4s\n    recipients_per_user: 3/6s\n",
            ),
    )
    .await;
    let client = server.db.as_ref().expect("test database").connect().await;
    let hash = wsmtp::auth::password::hash_password(b"secret").expect("hash");
    let updated = client
        .execute(
            "UPDATE accounts SET password_hash = $1 WHERE name IN ('alice', 'carol')",
            &[&hash],
        )
        .await
        .expect("store password hashes");
    assert_eq!(updated, 2);
    wait_until_current(&client, server.directory.as_ref().expect("directory")).await;

    let login = base64_plain("alice@example.com", "secret");
    // Two sessions from two addresses: the account is counted across both.
    let mut first = server.connect_from("127.0.0.3").await;
    first.expect("EHLO client.example", 250).await;
    first.expect(&format!("AUTH PLAIN {login}"), 235).await;
    let mut second = server.connect_from("127.0.0.4").await;
    second.expect("EHLO client.example", 250).await;
    second.expect(&format!("AUTH PLAIN {login}"), 235).await;

    let replies = transaction(&mut first, "one@example.org", &["x@example.org"]).await;
    assert_eq!(codes(&replies), [250]);
    let replies = transaction(&mut second, "two@example.org", &["x@example.org"]).await;
    assert_eq!(codes(&replies), [250]);
    let replies = transaction(&mut first, "three@example.org", &["x@example.org"]).await;
    assert_eq!(
        replies[0].text,
        "451 4.7.1 Too many messages from your account, try again later"
    );
    // Without AUTH the same address is not counted per user.
    let mut anonymous = server.connect_from("127.0.0.3").await;
    anonymous.expect("EHLO client.example", 250).await;
    let replies = transaction(&mut anonymous, "a@example.org", &["bob@example.net"]).await;
    assert_eq!(codes(&replies), [250]);

    // Carol's recipients are counted apart from alice's.
    let mut carol = server.connect_from("127.0.0.5").await;
    carol.expect("EHLO client.example", 250).await;
    carol
        .expect(
            &format!("AUTH PLAIN {}", base64_plain("carol@example.com", "secret")),
            235,
        )
        .await;
    let replies = transaction(
        &mut carol,
        "c@example.org",
        &[
            "x1@example.org",
            "x2@example.org",
            "x3@example.org",
            "x4@example.org",
        ],
    )
    .await;
    assert_eq!(codes(&replies), [250, 250, 250, 451]);
    assert_eq!(
        replies[3].text,
        "451 4.7.1 Too many recipients from your account, try again later"
    );
    let replies = transaction(&mut carol, "c@example.org", &["postmaster@example.com"]).await;
    assert_eq!(codes(&replies), [250], "postmaster is never rate limited");

    tokio::time::sleep(Duration::from_millis(4_200)).await;
    let replies = transaction(&mut second, "four@example.org", &["x@example.org"]).await;
    assert_eq!(codes(&replies), [250], "the window has passed");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_per_ip_and_recipients_per_sender() {
    let sink = Sink::start().await;
    let by_address = start(
        &sink,
        "",
        "rate_limits:\n  default:\n    messages_per_ip: 2/4s\n",
    )
    .await;
    let by_sender = start(
        &sink,
        "",
        "rate_limits:\n  default:\n    recipients_per_sender: 3/6s\n",
    )
    .await;

    let mut client = by_address.connect().await;
    client.expect("EHLO client.example", 250).await;
    for sender in ["a@example.org", "b@example.org"] {
        let replies = transaction(&mut client, sender, &["bob@example.net"]).await;
        assert_eq!(codes(&replies), [250]);
    }
    let replies = transaction(&mut client, "c@example.org", &["bob@example.net"]).await;
    assert_eq!(
        replies[0].text,
        "451 4.7.1 Too many messages from your address, try again later"
    );

    let mut sender = by_sender.connect().await;
    sender.expect("EHLO client.example", 250).await;
    let replies = transaction(
        &mut sender,
        "a@example.org",
        &[
            "r1@example.net",
            "r2@example.net",
            "r3@example.net",
            "r4@example.net",
        ],
    )
    .await;
    assert_eq!(codes(&replies), [250, 250, 250, 451]);
    assert_eq!(
        replies[3].text,
        "451 4.7.1 Too many recipients from this sender, try again later"
    );
    let replies = transaction(&mut sender, "b@example.org", &["r1@example.net"]).await;
    assert_eq!(codes(&replies), [250], "another sender has its own count");

    tokio::time::sleep(Duration::from_millis(6_200)).await;
    for sender in ["a@example.org", "b@example.org"] {
        let replies = transaction(&mut client, sender, &["bob@example.net"]).await;
        assert_eq!(codes(&replies), [250], "the window has passed");
    }
    let replies = transaction(&mut client, "c@example.org", &["bob@example.net"]).await;
    assert_eq!(codes(&replies), [451]);
    let replies = transaction(
        &mut sender,
        "a@example.org",
        &[
            "r1@example.net",
            "r2@example.net",
            "r3@example.net",
            "r4@example.net",
        ],
    )
    .await;
    assert_eq!(
        codes(&replies),
        [250, 250, 250, 451],
        "the window has passed"
    );
    by_address.stop().await;
    by_sender.stop().await;
}

fn base64_plain(login: &str, password: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("\0{login}\0{password}"))
}
