//! Queue fallback for relay domains: recipients whose downstream group is
//! unavailable at RCPT time are spooled when their domain has
//! `fallback: queue`, and get the group's 4xx otherwise.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::db::TestDb;
use common::directory::{add_domain, wait_until_current};
use common::harness::{SmtpClient, TestServer};
use common::sink::{DropAt, Sink};
use wsmtp::queue::{MessageDetail, QueueId};

/// A port nothing listens on.
const CLOSED_PORT: &str = "127.0.0.1:9";

/// Domains of the test configuration:
/// - `queued.example`: group `down`, `fallback: queue`;
/// - `plain.example`: group `down`, default fallback (tempfail);
/// - `live.example`: group `up`, `fallback: queue`;
/// - `old.example`: group `down`, `fallback: queue` (also a migrating
///   directory domain in one test).
async fn start_server(down: &str, up: SocketAddr) -> TestServer {
    let db = TestDb::create().await;
    let yaml = format!(
        "hostname: mx.test.example\n\
         listeners:\n  - address: 127.0.0.1:0\n\
         timeouts:\n  shutdown_grace: 5s\n\
         relay:\n  local_domains: [example.com]\n  relay_domains:\n    \
         - {{domain: queued.example, group: down, fallback: queue}}\n    \
         - {{domain: plain.example, group: down}}\n    \
         - {{domain: live.example, group: up, fallback: queue}}\n    \
         - {{domain: old.example, group: down, fallback: queue}}\n  \
         relay_networks: [127.0.0.1/32]\n\
         downstream_groups:\n  \
         - {{name: down, connect_timeout: 2s, command_timeout: 10s, hosts: ['{down}']}}\n  \
         - {{name: up, connect_timeout: 2s, command_timeout: 10s, hosts: ['{up}']}}\n\
         queue:\n  url: {url}\n",
        url = db.url,
    );
    TestServer::start_yaml(&yaml, Some(db)).await
}

/// Sends DATA and a small message; returns the queue id of the 250 reply.
async fn send_data(client: &mut SmtpClient) -> QueueId {
    client.expect("DATA", 354).await;
    client.send(b"Subject: fallback\r\n\r\nbody\r\n.\r\n").await;
    let reply = client.reply().await;
    assert!(
        reply.text.starts_with("250 2.0.0 OK: queued as "),
        "{}",
        reply.text
    );
    QueueId::parse_str(reply.text.rsplit(' ').next().expect("queue id")).expect("queue id")
}

async fn show(server: &TestServer, id: QueueId) -> MessageDetail {
    server
        .queue()
        .show(id)
        .await
        .expect("show")
        .expect("message is in the queue")
}

/// Returns (address, route_group) of each recipient, in RCPT order.
fn routes(detail: &MessageDetail) -> Vec<(String, Option<String>)> {
    detail
        .recipients
        .iter()
        .map(|r| (r.address.clone(), r.route_group.clone()))
        .collect()
}

/// Waits until the router has planned the message's deliveries.
async fn wait_routed(server: &TestServer, id: QueueId) -> MessageDetail {
    for _ in 0..400 {
        let detail = show(server, id).await;
        if detail.recipients.iter().all(|r| r.state != "queued") {
            return detail;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("message {} was not routed within 10 s", id.simple());
}

#[tokio::test]
async fn unreachable_group_spools_fallback_recipient() {
    let up = Sink::start().await;
    let server = start_server(CLOSED_PORT, up.addr).await;
    let mut client = server.connect_from("127.0.0.2").await;
    client.expect("EHLO sender.example", 250).await;
    client.expect("MAIL FROM:<a@example.org>", 250).await;
    let reply = client.expect("RCPT TO:<bob@queued.example>", 250).await;
    assert!(reply.text.starts_with("250 2.1.5"), "{}", reply.text);
    let id = send_data(&mut client).await;

    let detail = show(&server, id).await;
    assert_eq!(
        routes(&detail),
        vec![("bob@queued.example".to_string(), Some("down".to_string()))]
    );

    let detail = wait_routed(&server, id).await;
    let destinations: Vec<(String, String)> = detail
        .deliveries
        .iter()
        .map(|d| (d.address.clone(), d.destination.clone()))
        .collect();
    assert_eq!(
        destinations,
        vec![("bob@queued.example".to_string(), "group:down".to_string())]
    );
    assert!(up.messages().is_empty(), "nothing went to the live group");
    server.stop().await;
}

#[tokio::test]
async fn unreachable_group_without_fallback_gives_451() {
    let up = Sink::start().await;
    let server = start_server(CLOSED_PORT, up.addr).await;
    let mut client = server.connect_from("127.0.0.2").await;
    client.expect("EHLO sender.example", 250).await;
    client.expect("MAIL FROM:<a@example.org>", 250).await;
    let reply = client.expect("RCPT TO:<bob@plain.example>", 451).await;
    assert!(reply.text.starts_with("451 4.4.1"), "{}", reply.text);
    client.expect("DATA", 554).await;
    assert!(server.all_messages().await.is_empty(), "nothing spooled");
    client.expect("QUIT", 221).await;
    server.stop().await;
}

#[tokio::test]
async fn fallback_domain_with_live_group_passes_through() {
    let up = Sink::start().await;
    let server = start_server(CLOSED_PORT, up.addr).await;
    let mut client = server.connect_from("127.0.0.2").await;
    client.expect("EHLO sender.example", 250).await;
    client.expect("MAIL FROM:<a@example.org>", 250).await;
    client.expect("RCPT TO:<carol@live.example>", 250).await;
    client.expect("DATA", 354).await;
    client.send(b"Subject: live\r\n\r\nbody\r\n.\r\n").await;
    let reply = client.reply().await;
    assert_eq!(reply.code, 250, "{}", reply.text);

    let messages = up.wait_for_messages(1, Duration::from_secs(10)).await;
    assert_eq!(
        messages[0].rcpt_to,
        vec!["<carol@live.example>".to_string()]
    );
    assert!(server.all_messages().await.is_empty(), "queue stays empty");
    server.stop().await;
}

#[tokio::test]
async fn later_recipient_for_failed_group_spools_without_reconnect() {
    let up = Sink::start().await;
    let down = Sink::start().await;
    down.set_drop(DropAt::Connect);
    let server = start_server(&down.addr.to_string(), up.addr).await;
    let mut client = server.connect_from("127.0.0.2").await;
    client.expect("EHLO sender.example", 250).await;
    client.expect("MAIL FROM:<a@example.org>", 250).await;
    let reply = client.expect("RCPT TO:<bob@plain.example>", 451).await;
    assert!(reply.text.starts_with("451 4.4.1"), "{}", reply.text);
    let attempts = down.connection_count();
    assert_eq!(
        attempts, 1,
        "one connection attempt for the first recipient"
    );

    client.expect("RCPT TO:<bob@queued.example>", 250).await;
    client.expect("RCPT TO:<dave@queued.example>", 250).await;
    assert_eq!(down.connection_count(), 1, "the failure was remembered");
    // The group is down for plain.example recipients too while the
    // transaction lasts, but spooling mode takes every group recipient.
    client.expect("RCPT TO:<erin@plain.example>", 250).await;
    let id = send_data(&mut client).await;

    assert_eq!(down.connection_count(), 1, "no connection at DATA");
    let detail = show(&server, id).await;
    assert_eq!(
        routes(&detail),
        vec![
            ("bob@queued.example".to_string(), Some("down".to_string())),
            ("dave@queued.example".to_string(), Some("down".to_string())),
            ("erin@plain.example".to_string(), Some("down".to_string())),
        ]
    );
    server.stop().await;
}

#[tokio::test]
async fn mail_4xx_spools_but_5xx_rejects() {
    let up = Sink::start().await;
    let down = Sink::start().await;
    down.set_mail_reply("452 4.3.1 Insufficient system storage");
    let server = start_server(&down.addr.to_string(), up.addr).await;
    let mut client = server.connect_from("127.0.0.2").await;
    client.expect("EHLO sender.example", 250).await;
    client.expect("MAIL FROM:<a@example.org>", 250).await;
    client.expect("RCPT TO:<bob@queued.example>", 250).await;
    let id = send_data(&mut client).await;
    assert_eq!(
        routes(&show(&server, id).await),
        vec![("bob@queued.example".to_string(), Some("down".to_string()))]
    );

    down.set_mail_reply("550 5.7.1 Sender rejected");
    client.expect("MAIL FROM:<b@example.org>", 250).await;
    let reply = client.expect("RCPT TO:<bob@queued.example>", 550).await;
    assert_eq!(reply.text, "550 5.7.1 Sender rejected");
    client.expect("DATA", 554).await;
    assert_eq!(
        server.all_messages().await.len(),
        1,
        "only the first message"
    );
    client.expect("QUIT", 221).await;
    server.stop().await;
}

#[tokio::test]
async fn rcpt_reply_4xx_is_not_spooled() {
    let up = Sink::start().await;
    up.set_rcpt_reply("busy@live.example", "450 4.2.1 Mailbox busy");
    let server = start_server(CLOSED_PORT, up.addr).await;
    let mut client = server.connect_from("127.0.0.2").await;
    client.expect("EHLO sender.example", 250).await;
    client.expect("MAIL FROM:<a@example.org>", 250).await;
    let reply = client.expect("RCPT TO:<busy@live.example>", 450).await;
    assert_eq!(reply.text, "450 4.2.1 Mailbox busy");
    client.expect("DATA", 554).await;
    assert!(server.all_messages().await.is_empty(), "nothing spooled");
    client.expect("QUIT", 221).await;
    server.stop().await;
}

#[tokio::test]
async fn live_relay_switches_to_spool_for_fallback() {
    let up = Sink::start().await;
    let server = start_server(CLOSED_PORT, up.addr).await;
    let mut client = server.connect_from("127.0.0.2").await;
    client.expect("EHLO sender.example", 250).await;
    client.expect("MAIL FROM:<a@example.org>", 250).await;
    client.expect("RCPT TO:<carol@live.example>", 250).await;
    client.expect("RCPT TO:<bob@queued.example>", 250).await;
    let id = send_data(&mut client).await;

    assert_eq!(
        routes(&show(&server, id).await),
        vec![
            ("carol@live.example".to_string(), Some("up".to_string())),
            ("bob@queued.example".to_string(), Some("down".to_string())),
        ]
    );
    assert!(up.messages().is_empty(), "the live relay was abandoned");
    server.stop().await;
}

#[tokio::test]
async fn broken_session_at_rcpt_spools_fallback_recipient() {
    let up = Sink::start().await;
    let down = Sink::start().await;
    down.set_drop(DropAt::Rcpt);
    let server = start_server(&down.addr.to_string(), up.addr).await;
    let mut client = server.connect_from("127.0.0.2").await;
    client.expect("EHLO sender.example", 250).await;
    client.expect("MAIL FROM:<a@example.org>", 250).await;
    let reply = client.expect("RCPT TO:<bob@plain.example>", 451).await;
    assert!(reply.text.starts_with("451 4.4.2"), "{}", reply.text);
    client.expect("RCPT TO:<dave@queued.example>", 250).await;
    let id = send_data(&mut client).await;
    assert_eq!(
        routes(&show(&server, id).await),
        vec![("dave@queued.example".to_string(), Some("down".to_string()))]
    );
    server.stop().await;
}

#[tokio::test]
async fn directory_group_route_falls_back_by_domain() {
    let up = Sink::start().await;
    let server = start_server(CLOSED_PORT, up.addr).await;
    let db = server.db.as_ref().expect("db").connect().await;
    add_domain(&db, "old.example", "migrating", Some("down")).await;
    add_domain(&db, "older.example", "migrating", Some("down")).await;
    wait_until_current(&db, server.directory.as_ref().expect("directory")).await;

    let mut client = server.connect_from("127.0.0.2").await;
    client.expect("EHLO sender.example", 250).await;
    client.expect("MAIL FROM:<a@example.org>", 250).await;
    let reply = client.expect("RCPT TO:<unknown@older.example>", 451).await;
    assert!(reply.text.starts_with("451 4.4.1"), "{}", reply.text);
    client.expect("RCPT TO:<unknown@old.example>", 250).await;
    let id = send_data(&mut client).await;
    assert_eq!(
        routes(&show(&server, id).await),
        vec![("unknown@old.example".to_string(), Some("down".to_string()))]
    );
    server.stop().await;
}

#[tokio::test]
async fn next_transaction_tries_the_group_again() {
    let up = Sink::start().await;
    let down = Sink::start().await;
    down.set_drop_once(DropAt::Connect);
    let server = start_server(&down.addr.to_string(), up.addr).await;
    let mut client = server.connect_from("127.0.0.2").await;
    client.expect("EHLO sender.example", 250).await;
    client.expect("MAIL FROM:<a@example.org>", 250).await;
    client.expect("RCPT TO:<bob@queued.example>", 250).await;
    send_data(&mut client).await;

    client.expect("MAIL FROM:<a@example.org>", 250).await;
    client.expect("RCPT TO:<bob@queued.example>", 250).await;
    client.expect("DATA", 354).await;
    client.send(b"Subject: second\r\n\r\nbody\r\n.\r\n").await;
    let reply = client.reply().await;
    assert_eq!(reply.code, 250, "{}", reply.text);
    let messages = down.wait_for_messages(1, Duration::from_secs(10)).await;
    assert_eq!(
        messages[0].rcpt_to,
        vec!["<bob@queued.example>".to_string()]
    );
    assert_eq!(
        server.all_messages().await.len(),
        1,
        "only the first is queued"
    );
    server.stop().await;
}
