//! Delivery leases: a worker that stops after the server's reply but before
//! recording it causes at most one duplicate and loses nothing, and two
//! delivery processes never deliver the same recipient twice.

mod common;

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::db::TestDb;
use common::harness::{queue_config, spool_messages_for_group};
use common::sink::Sink;
use tokio_util::sync::CancellationToken;
use wsmtp::config::Config;
use wsmtp::delivery::body::StoredBody;
use wsmtp::delivery::dsn::DsnAction;
use wsmtp::delivery::notify::NotificationSettings;
use wsmtp::delivery::store::{DeliveryResult, DeliveryStore};
use wsmtp::delivery::tls::TlsClients;
use wsmtp::delivery::transport::{
    ConnectSettings, Connection, OutboundEnvelope, OutboundRecipient, Outcome, Protocol, Target,
};
use wsmtp::delivery::worker::DeliveryWorkers;
use wsmtp::directory::{Directory, load_snapshot};
use wsmtp::queue::Queue;
use wsmtp::router::worker::{Router, RouterSettings};

fn config(db: &TestDb, sink: &Sink, delivery: &str) -> String {
    format!(
        "hostname: mx.test.example\n\
         listeners:\n  - address: 127.0.0.1:9\n\
         relay:\n  relay_domains:\n    - domain: example.net\n      group: legacy\n\
         downstream_groups:\n  - name: legacy\n    tls: none\n    connect_timeout: 1s\n    hosts: [{}]\n\
         queue:\n  url: {}\n\
         delivery:\n  poll_interval: 50ms\n  retry_intervals: [1s]\n{delivery}",
        sink.addr, db.url
    )
}

/// Routes every spooled message with an in-process router.
async fn route_all(db: &TestDb, queue: &Queue) {
    let directory = Arc::new(Directory::new());
    let (mut client, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    directory.replace(load_snapshot(&mut client).await.expect("load directory"));
    let router = Router::new(
        queue.clone(),
        directory,
        RouterSettings {
            workers: 1,
            claim_messages: 50,
            lease: Duration::from_secs(60),
            batch_size: 20,
            max_depth: 10,
            poll_interval: Duration::from_millis(20),
            hostname: "mx.test.example".into(),
            relay_domains: Default::default(),
            outbound_group: None,
        },
    );
    while router.route_batch().await.expect("route") > 0 {}
}

async fn message_count(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM messages", &[])
        .await
        .expect("count")
        .get(0)
}

async fn wait_until_empty(client: &tokio_postgres::Client, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while message_count(client).await > 0 {
        assert!(
            Instant::now() < deadline,
            "queue not empty after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_stopped_before_recording_causes_one_duplicate() {
    let db = TestDb::create().await;
    let queue = Queue::new(&queue_config(&db.url)).expect("queue");
    queue.migrate().await.expect("migrate");
    let sink = Sink::start().await;
    spool_messages_for_group(&queue, 1, &["kim@example.net"], Some("legacy")).await;
    route_all(&db, &queue).await;
    let config = Config::parse(&config(&db, &sink, "  lease: 1s\n"), None).expect("config");

    // The first worker claims and sends, and stops before it records.
    let crashed = DeliveryStore::new(
        queue.clone(),
        "crashed".into(),
        config.delivery.clone(),
        NotificationSettings::new("mx.test.example"),
    );
    let claimed = crashed.claim("group:legacy", 10).await.expect("claim");
    assert_eq!(claimed.len(), 1);
    let delivery = &claimed[0];
    let settings = ConnectSettings {
        protocol: Protocol::Smtp,
        helo_name: "mx.test.example".into(),
        tls: wsmtp::config::TlsMode::None,
        tls_clients: TlsClients::new(None).expect("tls"),
        connect_timeout: Duration::from_secs(2),
        command_timeout: Duration::from_secs(5),
        final_reply_timeout: Duration::from_secs(5),
    };
    let mut connection = Connection::open(&Target::HostPort(sink.addr.to_string()), &settings)
        .await
        .expect("connect to the sink");
    let mut body = StoredBody::new(
        queue.pool().clone(),
        delivery.message_id,
        delivery.message.chunk_count,
    );
    let envelope = OutboundEnvelope {
        sender: delivery.sender.clone(),
        size: delivery.message.size as u64,
        body_type: None,
        smtputf8: false,
        dsn_ret: None,
        dsn_envid: None,
    };
    let recipient = OutboundRecipient {
        address: delivery.address.clone(),
        orcpt: None,
        notify: None,
    };
    let result = connection
        .send(&envelope, &[recipient], &delivery.header_prefix, &mut body)
        .await;
    assert!(matches!(result.outcomes[0], Outcome::Delivered { .. }));
    connection.quit().await;
    assert_eq!(sink.messages().len(), 1);

    // Another worker takes the delivery over once the lease has expired.
    let shutdown = CancellationToken::new();
    let survivor = DeliveryStore::new(
        queue.clone(),
        "survivor".into(),
        config.delivery.clone(),
        NotificationSettings::new("mx.test.example"),
    );
    let workers = Arc::new(DeliveryWorkers::new(survivor, &config).expect("workers"));
    let running = tokio::spawn(Arc::clone(&workers).run(shutdown.clone()));
    let client = db.connect().await;
    wait_until_empty(&client, Duration::from_secs(15)).await;
    shutdown.cancel();
    let _ = running.await;

    let messages = sink.messages();
    assert_eq!(messages.len(), 2, "the recipient got exactly one duplicate");
    assert_eq!(messages[0].unstuffed(), messages[1].unstuffed());

    // The stopped worker's late record is dropped.
    let late = DeliveryResult {
        outcome: result.outcomes[0].clone(),
        remote_mta: None,
        success_action: Some(DsnAction::Relayed),
    };
    let summary = crashed.record(&[(delivery, late)]).await.expect("record");
    assert_eq!(summary.lost, 1);
    assert_eq!(summary.delivered, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_delivery_processes_deliver_each_recipient_once() {
    const MESSAGES: usize = 200;
    let db = TestDb::create().await;
    let queue = Queue::new(&queue_config(&db.url)).expect("queue");
    queue.migrate().await.expect("migrate");
    let sink = Sink::start().await;
    spool_messages_for_group(
        &queue,
        MESSAGES,
        &["kim@example.net", "lou@example.net"],
        Some("legacy"),
    )
    .await;
    route_all(&db, &queue).await;

    let directory = tempfile::tempdir().expect("temp dir");
    let path = directory.path().join("config.yaml");
    std::fs::write(
        &path,
        config(&db, &sink, "  claim_size: 5\n  max_per_destination: 4\n"),
    )
    .expect("write config");
    let mut workers: Vec<std::process::Child> = (0..2)
        .map(|n| {
            let log = std::fs::File::create(directory.path().join(format!("delivery{n}.log")))
                .expect("log file");
            Command::new(env!("CARGO_BIN_EXE_wsmtp"))
                .args(["serve", "--roles", "delivery", "--config"])
                .arg(&path)
                .env_remove("DATABASE_URL")
                .env("RUST_LOG", "wsmtp=info")
                .stderr(Stdio::from(log))
                .spawn()
                .expect("start a delivery process")
        })
        .collect();

    let client = db.connect().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while message_count(&client).await > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for worker in &mut workers {
        let _ = worker.kill();
        let _ = worker.wait();
    }
    assert_eq!(message_count(&client).await, 0, "queue drained");

    let messages = sink.messages();
    let mut seen = HashSet::new();
    for message in &messages {
        let content = message.unstuffed();
        let subject = String::from_utf8_lossy(&content)
            .lines()
            .find(|line| line.starts_with("Subject: "))
            .expect("subject")
            .to_string();
        for recipient in &message.rcpt_to {
            assert!(
                seen.insert((subject.clone(), recipient.trim().to_string())),
                "{recipient} got {subject} twice"
            );
        }
    }
    assert_eq!(
        seen.len(),
        MESSAGES * 2,
        "every recipient got every message"
    );
    let logs: Vec<String> = (0..2)
        .map(|n| {
            std::fs::read_to_string(directory.path().join(format!("delivery{n}.log")))
                .expect("read log")
        })
        .collect();
    assert!(
        logs.iter().all(|log| log.contains("delivery attempted")),
        "both processes delivered"
    );
}
