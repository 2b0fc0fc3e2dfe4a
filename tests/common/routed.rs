//! A migrated queue with a small directory, messages spooled by the real
//! spool writer and routed by the real router, and SQL that puts deliveries
//! into the states that delivery workers leave them in.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;
use wsmtp::directory::{Directory, load_snapshot};
use wsmtp::queue::{Envelope, Queue, QueueId, SpoolRecipient, new_queue_id};
use wsmtp::router::worker::{Router, RouterSettings};

use super::db::TestDb;
use super::directory::{add_account, add_domain};
use super::harness::queue_config;

/// Directory of every [`RoutedQueue`]: example.com is local, alice has a
/// Maildir, and dora's mail is forwarded to dora@example.org. Any other
/// domain is remote and routed to `domain:NAME`.
pub struct RoutedQueue {
    pub db: TestDb,
    pub queue: Queue,
}

impl RoutedQueue {
    pub async fn create() -> RoutedQueue {
        let db = TestDb::create().await;
        let queue = Queue::new(&queue_config(&db.url)).expect("queue");
        queue.migrate().await.expect("migrate");
        let client = db.connect().await;
        add_domain(&client, "example.com", "local", None).await;
        add_account(
            &client,
            "alice",
            &["alice@example.com"],
            Some("/var/mail/alice"),
            &[],
        )
        .await;
        add_account(
            &client,
            "dora",
            &["dora@example.com"],
            None,
            &["dora@example.org"],
        )
        .await;
        RoutedQueue { db, queue }
    }

    pub async fn connect(&self) -> Client {
        self.db.connect().await
    }

    /// Spools one small message and returns its id.
    pub async fn spool(&self, sender: &str, recipients: &[&str]) -> QueueId {
        let id = new_queue_id();
        let mut writer = self.queue.begin(Envelope {
            id,
            sender: sender.to_owned(),
            client_ip: "127.0.0.2".parse().expect("ip"),
            helo: "client.example".into(),
            smtputf8: false,
            body_type: None,
            dsn_ret: None,
            dsn_envid: None,
        });
        writer
            .write(b"Subject: queue administration\r\n\r\nbody\r\n")
            .await
            .expect("write");
        let recipients: Vec<SpoolRecipient> = recipients
            .iter()
            .map(|address| SpoolRecipient {
                address: address.to_string(),
                route_group: None,
                orcpt: None,
                notify: None,
            })
            .collect();
        writer.commit(&recipients).await.expect("commit");
        id
    }

    /// Routes every queued recipient with a router that loads the
    /// directory as it is now.
    pub async fn route(&self) {
        let (mut client, connection) = tokio_postgres::connect(&self.db.url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(connection);
        let directory = Arc::new(Directory::new());
        directory.replace(load_snapshot(&mut client).await.expect("load directory"));
        let settings = RouterSettings {
            workers: 1,
            claim_messages: 50,
            lease: Duration::from_secs(60),
            batch_size: 20,
            max_depth: 10,
            poll_interval: Duration::from_millis(20),
            hostname: "mx.test.example".into(),
            relay_domains: Default::default(),
            outbound_group: None,
        };
        let router = Router::new(self.queue.clone(), directory, settings);
        while router.route_batch().await.expect("route batch") > 0 {}
    }
}

/// Records a failed attempt on the delivery of `message` to `address`, as a
/// worker does after a 4xx reply: the next attempt is `retry_in` away.
pub async fn defer(client: &Client, message: QueueId, address: &str, retry_in: &str) {
    let changed = client
        .execute(
            "UPDATE deliveries
                SET attempts = attempts + 1, last_attempt_at = now(),
                    next_attempt_at = now() + $3::text::interval,
                    last_reply = '451 4.3.0 try again later', remote_mta = 'mx.example.org'
              WHERE message_id = $1 AND address = $2",
            &[&message, &address, &retry_in],
        )
        .await
        .expect("defer delivery");
    assert_eq!(changed, 1, "one delivery of {message} to {address}");
}

/// Claims the delivery of `message` to `address` for `owner` as a worker
/// does: the lease and the next attempt end `length` from now.
pub async fn lease(client: &Client, message: QueueId, address: &str, owner: &str, length: &str) {
    let changed = client
        .execute(
            "UPDATE deliveries
                SET lease_owner = $3, lease_until = now() + $4::text::interval,
                    next_attempt_at = now() + $4::text::interval,
                    lease_token = lease_token + 1
              WHERE message_id = $1 AND address = $2",
            &[&message, &address, &owner, &length],
        )
        .await
        .expect("lease delivery");
    assert_eq!(changed, 1, "one delivery of {message} to {address}");
}

/// Records failed connections to a destination, as a worker does.
pub async fn back_off(client: &Client, destination: &str, failures: i32, retry_in: &str) {
    let changed = client
        .execute(
            "UPDATE destinations
                SET failures = $2, next_attempt_at = now() + $3::text::interval,
                    last_error = 'connection refused', updated_at = now()
              WHERE name = $1",
            &[&destination, &failures, &retry_in],
        )
        .await
        .expect("back off destination");
    assert_eq!(changed, 1, "destination {destination} has a row");
}

/// Scheduling columns of one delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryRow {
    /// next_attempt_at <= now()
    pub due: bool,
    pub next_attempt_at: time::OffsetDateTime,
    pub lease_owner: Option<String>,
    pub lease_until: Option<time::OffsetDateTime>,
    pub lease_token: i64,
    pub attempts: i32,
}

pub async fn delivery_row(client: &Client, message: QueueId, address: &str) -> DeliveryRow {
    let row = client
        .query_one(
            "SELECT next_attempt_at <= now(), next_attempt_at, lease_owner, lease_until,
                    lease_token, attempts
               FROM deliveries WHERE message_id = $1 AND address = $2",
            &[&message, &address],
        )
        .await
        .expect("delivery row");
    DeliveryRow {
        due: row.get(0),
        next_attempt_at: row.get(1),
        lease_owner: row.get(2),
        lease_until: row.get(3),
        lease_token: row.get(4),
        attempts: row.get(5),
    }
}

/// Backoff columns of one destination: (due now, failures, held).
pub async fn destination_row(client: &Client, name: &str) -> Option<(bool, i32, bool)> {
    client
        .query_opt(
            "SELECT next_attempt_at <= now(), failures, held FROM destinations WHERE name = $1",
            &[&name],
        )
        .await
        .expect("destination row")
        .map(|row| (row.get(0), row.get(1), row.get(2)))
}
