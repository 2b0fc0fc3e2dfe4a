//! The admin listener against a real wsmtp: metrics that move with SMTP
//! traffic through spooling, routing, delivery and pass-through, readiness
//! that follows the queue database, and the Grafana dashboard's queries.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

use common::admin::{self, Samples, value};
use common::db::TestDb;
use common::directory::wait_until_current;
use common::harness::{TestServer, send_spooled, test_message};
use common::sink::Sink;
use common::tls::{TlsSmtpClient, handshake, make_certificate};
use wsmtp::cli::serve::Role;

const ALL_ROLES: &[Role] = &[Role::Listener, Role::Router, Role::Delivery];

/// Returns a configuration with example.com local, example.net relayed to the sink's
/// group `legacy`, 127.0.0.1 a relay network and the admin listener on. The
/// blocklist zone is named by no rule, so it is never queried, but its
/// series exist.
fn config(sink: SocketAddr, database_url: &str) -> String {
    format!(
        "hostname: mx.test.example\n\
         dnsbl:\n  - zone: bl.test.example\n\
         listeners:\n  - address: 127.0.0.1:0\n\
         timeouts:\n  shutdown_grace: 5s\n\
         relay:\n  local_domains: [example.com]\n  \
         relay_domains:\n    - domain: example.net\n      group: legacy\n  \
         relay_networks: [127.0.0.1/32]\n  outbound_group: legacy\n\
         downstream_groups:\n  - name: legacy\n    connect_timeout: 2s\n    command_timeout: 10s\n    tls: none\n    hosts:\n      - {sink}\n\
         queue:\n  url: {database_url}\n  chunk_size: 65536\n\
         router:\n  poll_interval: 100ms\n\
         delivery:\n  poll_interval: 100ms\n\
         admin:\n  address: 127.0.0.1:0\n  queue_interval: 1s\n  check_timeout: 1s\n"
    )
}

async fn start(sink: &Sink) -> TestServer {
    let db = TestDb::create().await;
    let yaml = config(sink.addr, &db.url);
    TestServer::start_yaml_roles(&yaml, Some(db), Some(ALL_ROLES)).await
}

/// Scrapes until `done` holds for the scrape, or panics after 20 s.
async fn scrape_until(address: SocketAddr, what: &str, done: impl Fn(&Samples) -> bool) -> Samples {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let samples = admin::scrape(address).await;
        if done(&samples) {
            return samples;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends traffic that reaches every tier. Three messages are spooled for a
/// local and a relay-domain recipient (routed to a Maildir and to the
/// group), one message is passed through live, and one relay attempt comes
/// from a client outside the relay networks and is rejected.
async fn send_traffic(server: &TestServer) {
    let mut client = server.connect().await;
    client.expect("EHLO client.example", 250).await;
    for n in 0..3 {
        send_spooled(
            &mut client,
            "sender@example.org",
            &["alice@example.com", "bob@example.net"],
            &test_message(&format!("spooled {n}"), 2000),
        )
        .await;
    }
    client.expect("MAIL FROM:<sender@example.org>", 250).await;
    client.expect("RCPT TO:<bob@example.net>", 250).await;
    client.expect("DATA", 354).await;
    client.send(&test_message("passed through", 500)).await;
    client.send(b".\r\n").await;
    let reply = client.reply().await;
    assert_eq!(reply.code, 250, "{}", reply.text);
    client.expect("QUIT", 221).await;

    let mut outsider = server.connect_from("127.0.0.2").await;
    outsider.expect("EHLO outside.example", 250).await;
    outsider.expect("MAIL FROM:<spam@example.org>", 250).await;
    outsider.expect("RCPT TO:<victim@example.org>", 550).await;
    outsider.expect("QUIT", 221).await;
}

/// Returns the change of a series between two scrapes.
fn delta(before: &Samples, after: &Samples, series: &str) -> f64 {
    value(after, series) - before.get(series).copied().unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_move_with_traffic() {
    let sink = Sink::start().await;
    let server = start(&sink).await;
    let address = server.admin.expect("admin listener");
    let before = admin::scrape(address).await;

    send_traffic(&server).await;
    sink.wait_for_messages(4, Duration::from_secs(20)).await;
    let delivered = |kind: &str| {
        format!("wsmtp_delivery_outcomes_total{{kind=\"{kind}\",result=\"delivered\"}}")
    };
    let after = scrape_until(
        address,
        "three deliveries to the group and three to the Maildir",
        |s| {
            delta(&before, s, &delivered("group")) >= 3.0
                && delta(&before, s, &delivered("maildir")) >= 3.0
        },
    )
    .await;

    let expected: &[(&str, f64)] = &[
        ("wsmtp_connections_accepted_total", 2.0),
        ("wsmtp_transactions_total{result=\"spooled\"}", 3.0),
        ("wsmtp_transactions_total{result=\"relayed\"}", 1.0),
        ("wsmtp_transactions_total{result=\"abandoned\"}", 1.0),
        ("wsmtp_transactions_total{result=\"rejected\"}", 0.0),
        ("wsmtp_recipients_total{decision=\"local\"}", 3.0),
        ("wsmtp_recipients_total{decision=\"relay\"}", 4.0),
        ("wsmtp_recipients_total{decision=\"reject\"}", 1.0),
        ("wsmtp_recipients_total{decision=\"tempfail\"}", 0.0),
        (
            "wsmtp_recipients_refused_total{decision=\"reject\",reason=\"no_relay\"}",
            1.0,
        ),
        ("wsmtp_smtp_replies_total{class=\"5xx\"}", 1.0),
        ("wsmtp_smtp_replies_total{class=\"4xx\"}", 0.0),
        ("wsmtp_message_size_bytes_count", 4.0),
        (
            "wsmtp_passthrough_messages_total{group=\"legacy\",reply_class=\"2xx\"}",
            1.0,
        ),
        (
            "wsmtp_passthrough_latency_seconds_count{group=\"legacy\",step=\"data\"}",
            1.0,
        ),
        (
            "wsmtp_passthrough_latency_seconds_count{group=\"legacy\",step=\"rcpt\"}",
            1.0,
        ),
        ("wsmtp_router_messages_total{result=\"routed\"}", 3.0),
        ("wsmtp_router_recipients_total{result=\"routed\"}", 6.0),
        ("wsmtp_router_deliveries_created_total", 6.0),
        (&delivered("group"), 3.0),
        (&delivered("maildir"), 3.0),
        (
            "wsmtp_delivery_outcomes_total{kind=\"group\",result=\"deferred\"}",
            0.0,
        ),
        ("wsmtp_notifications_total{type=\"failure\"}", 0.0),
    ];
    let mut wrong = Vec::new();
    for (series, change) in expected {
        let actual = delta(&before, &after, series);
        if actual != *change {
            wrong.push(format!("{series}: expected +{change}, got +{actual}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    // Octets read include every command and the content of four messages.
    assert!(delta(&before, &after, "wsmtp_received_bytes_total") > 4.0 * 500.0);
    assert_eq!(value(&after, "wsmtp_connections_open"), 0.0);
    // The sum of the size histogram is the content with our Received header.
    let size_sum = delta(&before, &after, "wsmtp_message_size_bytes_sum");
    assert!(size_sum > 3.0 * 2000.0 + 500.0, "{size_sum}");

    // The collector counts the queue: once everything is delivered, no
    // pending delivery is left.
    let database = server.db.as_ref().expect("database").name.clone();
    let queue_empty = scrape_until(address, "an empty queue in the gauges", |s| {
        let pending: f64 = ["due", "deferred", "leased", "held"]
            .iter()
            .map(|state| {
                value(
                    s,
                    &format!("wsmtp_queue_deliveries{{database=\"{database}\",state=\"{state}\"}}"),
                )
            })
            .sum();
        pending == 0.0
            && value(
                s,
                &format!("wsmtp_queue_collect_timestamp_seconds{{database=\"{database}\"}}"),
            ) > 0.0
    })
    .await;
    assert!(
        value(
            &queue_empty,
            &format!("wsmtp_database_pool_max_connections{{database=\"{database}\"}}")
        ) > 0.0
    );
    assert_eq!(value(&queue_empty, "wsmtp_directory_accounts"), 2.0);
    server.stop().await;
}

#[tokio::test]
async fn queue_gauges_count_waiting_mail() {
    // The group is down, so spooled mail for it waits as a deferred delivery.
    let db = TestDb::create().await;
    let unreachable: SocketAddr = "127.0.0.1:9".parse().expect("address");
    let yaml = config(unreachable, &db.url);
    let server = TestServer::start_yaml_roles(&yaml, Some(db), Some(ALL_ROLES)).await;
    let address = server.admin.expect("admin listener");
    let database = server.db.as_ref().expect("database").name.clone();

    let mut client = server.connect().await;
    client.expect("EHLO client.example", 250).await;
    send_spooled(
        &mut client,
        "sender@example.org",
        &["carol@example.com", "bob@example.net"],
        &test_message("waits", 300),
    )
    .await;
    client.expect("QUIT", 221).await;

    let deferred = format!("wsmtp_queue_deliveries{{database=\"{database}\",state=\"deferred\"}}");
    let ready = format!("wsmtp_queue_messages{{database=\"{database}\",state=\"ready\"}}");
    let samples = scrape_until(address, "a deferred delivery in the gauges", |s| {
        value(s, &deferred) == 1.0 && value(s, &ready) == 1.0
    })
    .await;
    let oldest = value(
        &samples,
        &format!(
            "wsmtp_queue_deliveries_oldest_age_seconds{{database=\"{database}\",state=\"deferred\"}}"
        ),
    );
    assert!((0.0..60.0).contains(&oldest), "{oldest}");
    assert!(
        value(
            &samples,
            "wsmtp_delivery_connect_failures_total{kind=\"group\"}"
        ) >= 1.0
    );
    assert!(
        value(
            &samples,
            &format!("wsmtp_queue_destinations{{database=\"{database}\",state=\"backed_off\"}}")
        ) >= 1.0
    );
    server.stop().await;
}

#[tokio::test]
async fn tls_auth_and_bounces_are_counted() {
    use base64::Engine as _;
    let certificate = make_certificate();
    let sink = Sink::start().await;
    sink.set_rcpt_reply("nobody@example.net", "550 5.1.1 no such user");
    let db = TestDb::create().await;
    let listener = format!(
        "  - address: 127.0.0.1:0\n    tls: {{certificate: '{}', key: '{}'}}\n    auth: {{require_tls: false}}\n",
        certificate.certificate_path.display(),
        certificate.key_path.display()
    );
    let yaml = config(sink.addr, &db.url).replace("  - address: 127.0.0.1:0\n", &listener)
        + "auth:\n  failure_delay: 0s\n";
    let server = TestServer::start_yaml_roles(&yaml, Some(db), Some(ALL_ROLES)).await;
    let address = server.admin.expect("admin listener");
    let database = server.db.as_ref().expect("database").connect().await;
    let hash = wsmtp::auth::password::hash_password(b"alice's password").expect("hash");
    database
        .execute(
            "UPDATE accounts SET password_hash = $1 WHERE name = 'alice'",
            &[&hash],
        )
        .await
        .expect("store password hash");
    wait_until_current(&database, server.directory.as_ref().expect("directory")).await;
    let before = admin::scrape(address).await;

    // One STARTTLS handshake that succeeds and one that the client breaks.
    let mut client = server.connect().await;
    client.expect("EHLO client.example", 250).await;
    client.expect("STARTTLS", 220).await;
    let mut secure = TlsSmtpClient::new(handshake(client.into_stream(), &certificate).await);
    secure.expect("EHLO client.example", 250).await;
    secure.expect("QUIT", 221).await;
    let mut broken = server.connect().await;
    broken.expect("EHLO client.example", 250).await;
    broken.expect("STARTTLS", 220).await;
    broken.send(b"this is not a TLS client hello\r\n").await;
    // The server may send a TLS alert before it closes the connection.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut broken.into_stream(), &mut rest),
    )
    .await;
    assert!(
        closed.is_ok(),
        "the server kept the broken TLS connection open"
    );

    // One AUTH PLAIN with the right password and one with a wrong one.
    let plain = |password: &str| {
        base64::engine::general_purpose::STANDARD.encode(format!("\0alice\0{password}"))
    };
    let mut client = server.connect().await;
    client.expect("EHLO client.example", 250).await;
    client
        .expect(&format!("AUTH PLAIN {}", plain("wrong")), 535)
        .await;
    client
        .expect(&format!("AUTH PLAIN {}", plain("alice's password")), 235)
        .await;

    // A recipient the group rejects bounces; the failure notification goes
    // back to the sender through the group.
    send_spooled(
        &mut client,
        "alice@example.com",
        &["carol@example.com", "nobody@example.net"],
        &test_message("bounces", 300),
    )
    .await;
    client.expect("QUIT", 221).await;
    let bounced = "wsmtp_delivery_outcomes_total{kind=\"group\",result=\"bounced\"}";
    let after = scrape_until(address, "a bounced delivery", |s| {
        delta(&before, s, bounced) >= 1.0
            && delta(&before, s, "wsmtp_notifications_total{type=\"failure\"}") >= 1.0
    })
    .await;

    let expected: &[(&str, f64)] = &[
        (
            "wsmtp_tls_handshakes_total{mode=\"starttls\",result=\"success\"}",
            1.0,
        ),
        (
            "wsmtp_tls_handshakes_total{mode=\"starttls\",result=\"failure\"}",
            1.0,
        ),
        (
            "wsmtp_auth_attempts_total{mechanism=\"plain\",result=\"success\"}",
            1.0,
        ),
        (
            "wsmtp_auth_attempts_total{mechanism=\"plain\",result=\"failure\"}",
            1.0,
        ),
        (bounced, 1.0),
        ("wsmtp_notifications_total{type=\"failure\"}", 1.0),
    ];
    let mut wrong = Vec::new();
    for (series, change) in expected {
        let actual = delta(&before, &after, series);
        if actual != *change {
            wrong.push(format!("{series}: expected +{change}, got +{actual}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    server.stop().await;
}

/// A TCP proxy between wsmtp and PostgreSQL that the test can cut, so the
/// database becomes unreachable for wsmtp alone while other tests keep it.
struct DatabaseProxy {
    address: SocketAddr,
    open: Arc<Mutex<bool>>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
}

impl DatabaseProxy {
    async fn start(upstream: SocketAddr) -> DatabaseProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let address = listener.local_addr().expect("proxy address");
        let open = Arc::new(Mutex::new(true));
        let connections: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let (accept_open, accept_connections) = (Arc::clone(&open), Arc::clone(&connections));
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if !*accept_open.lock().expect("proxy state") {
                    // Cut: the connection closes at once, as if nothing listened.
                    drop(inbound);
                    continue;
                }
                let task = tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
                accept_connections
                    .lock()
                    .expect("proxy connections")
                    .push(task.abort_handle());
            }
        });
        DatabaseProxy {
            address,
            open,
            connections,
        }
    }

    /// Closes every proxied connection and refuses new ones.
    fn cut(&self) {
        *self.open.lock().expect("proxy state") = false;
        for connection in self
            .connections
            .lock()
            .expect("proxy connections")
            .drain(..)
        {
            connection.abort();
        }
    }

    fn restore(&self) {
        *self.open.lock().expect("proxy state") = true;
    }
}

/// Polls `/readyz` until it returns `status`, or panics after 20 s.
async fn wait_for_readiness(address: SocketAddr, status: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = admin::get(address, "/readyz").await;
        if code == status {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz stayed {code} ({body}) instead of {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn readiness_follows_the_queue_database() {
    let sink = Sink::start().await;
    let db = TestDb::create().await;
    let proxy = DatabaseProxy::start("127.0.0.1:5432".parse().expect("address")).await;
    let proxied_url = format!("postgres://postgres@{}/{}", proxy.address, db.name);
    let yaml = config(sink.addr, &proxied_url);
    let server = TestServer::start_yaml_roles(&yaml, Some(db), Some(ALL_ROLES)).await;
    let address = server.admin.expect("admin listener");

    assert_eq!(wait_for_readiness(address, 200).await, "ready\n");
    assert_eq!(admin::get(address, "/healthz").await.0, 200);

    proxy.cut();
    let reason = wait_for_readiness(address, 503).await;
    assert!(reason.contains("queue database"), "{reason}");
    // The process is alive although it is not ready.
    assert_eq!(admin::get(address, "/healthz").await.0, 200);
    let samples = admin::scrape(address).await;
    assert!(admin::sample_names(&samples).contains("wsmtp_database_errors_total"));

    proxy.restore();
    assert_eq!(wait_for_readiness(address, 200).await, "ready\n");
    // Mail is spooled again once the database is back.
    let mut client = server.connect().await;
    client.expect("EHLO client.example", 250).await;
    let mut spooled = false;
    for _ in 0..20 {
        client.expect("MAIL FROM:<sender@example.org>", 250).await;
        let reply = client.command("RCPT TO:<alice@example.com>").await;
        if reply.code == 250 {
            client.expect("DATA", 354).await;
            client.send(&test_message("after the outage", 300)).await;
            client.send(b".\r\n").await;
            let reply = client.reply().await;
            if reply.code == 250 {
                spooled = true;
                break;
            }
        } else {
            client.expect("RSET", 250).await;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        spooled,
        "no message was spooled after the database came back"
    );
    server.stop().await;
}

#[tokio::test]
async fn admin_rejects_other_paths_and_methods() {
    let sink = Sink::start().await;
    let server = start(&sink).await;
    let address = server.admin.expect("admin listener");
    assert_eq!(admin::get(address, "/nothing").await.0, 404);

    let mut stream = TcpStream::connect(address).await.expect("connect");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await
        .expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    assert!(response.starts_with("HTTP/1.1 405"), "{response}");
    server.stop().await;
}

/// Collects the metric names in the PromQL expressions of a Grafana dashboard.
fn dashboard_metric_names(dashboard: &serde_json::Value) -> BTreeSet<String> {
    fn collect(value: &serde_json::Value, expressions: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, item) in map {
                    match (key.as_str(), item) {
                        ("expr" | "query", serde_json::Value::String(text)) => {
                            expressions.push(text.clone())
                        }
                        _ => collect(item, expressions),
                    }
                }
            }
            serde_json::Value::Array(items) => {
                for item in items {
                    collect(item, expressions);
                }
            }
            _ => {}
        }
    }
    let mut expressions = Vec::new();
    collect(dashboard, &mut expressions);
    let name = regex::Regex::new(r"\bwsmtp_[a-zA-Z0-9_]+").expect("regex");
    expressions
        .iter()
        .flat_map(|expression| name.find_iter(expression).map(|m| m.as_str().to_string()))
        .collect()
}

#[tokio::test]
async fn dashboard_metrics_are_exported() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/grafana/wsmtp.json");
    let text = std::fs::read_to_string(path).expect("read grafana/wsmtp.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    let names = dashboard_metric_names(&dashboard);
    assert!(
        names.len() >= 30,
        "only {} metric names found: {names:?}",
        names.len()
    );

    let titles: Vec<&str> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .filter(|panel| panel["type"] == "row")
        .filter_map(|panel| panel["title"].as_str())
        .collect();
    for row in [
        "Traffic",
        "Decisions",
        "Pass-through",
        "Queue",
        "Delivery",
        "Errors",
    ] {
        assert!(titles.contains(&row), "no row {row} in {titles:?}");
    }

    let sink = Sink::start().await;
    let server = start(&sink).await;
    let address = server.admin.expect("admin listener");
    send_traffic(&server).await;
    sink.wait_for_messages(4, Duration::from_secs(20)).await;
    let samples = scrape_until(address, "the first queue collection", |s| {
        admin::sample_names(s).contains("wsmtp_queue_collect_timestamp_seconds")
    })
    .await;
    let exported = admin::sample_names(&samples);
    let missing: Vec<&String> = names
        .iter()
        .filter(|name| !exported.contains(*name))
        .collect();
    assert!(
        missing.is_empty(),
        "dashboard metrics without a sample: {missing:?}"
    );
    server.stop().await;
}
