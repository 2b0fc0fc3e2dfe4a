//! Router claims and leases: two routers on one queue never route a message
//! twice, and work of a router that stopped is finished by another once its
//! lease expires.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::db::TestDb;
use common::directory::{add_account, add_domain, add_list};
use common::harness::{queue_config, spool_messages};
use wsmtp::directory::{Directory, load_snapshot};
use wsmtp::queue::Queue;
use wsmtp::router::worker::{Router, RouterError, RouterSettings};

/// Each spooled message goes to an account, a list of five and a remote address.
const RECIPIENTS: &[&str] = &[
    "alice@example.com",
    "team@example.com",
    "remote@example.org",
];

async fn setup() -> (TestDb, Queue) {
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
    let members: Vec<String> = (0..5).map(|n| format!("m{n}@example.org")).collect();
    add_list(
        &client,
        "team",
        "team@example.com",
        "team-owner@example.com",
        &members,
    )
    .await;
    (db, queue)
}

async fn router(db: &TestDb, lease: Duration) -> Router {
    let queue = Queue::new(&queue_config(&db.url)).expect("queue");
    let directory = Arc::new(Directory::new());
    let (mut client, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    directory.replace(load_snapshot(&mut client).await.expect("load directory"));
    let settings = RouterSettings {
        workers: 1,
        claim_messages: 7,
        lease,
        batch_size: 20,
        max_depth: 10,
        poll_interval: Duration::from_millis(20),
        hostname: "mx.test.example".into(),
        relay_domains: Default::default(),
        outbound_group: None,
    };
    Router::new(queue, directory, settings)
}

async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.expect("count").get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_routers_never_route_a_message_twice() {
    let (db, queue) = setup().await;
    spool_messages(&queue, 150, RECIPIENTS).await;
    let first = Arc::new(router(&db, Duration::from_secs(60)).await);
    let second = Arc::new(router(&db, Duration::from_secs(60)).await);

    let mut tasks = Vec::new();
    for router in [first, second] {
        tasks.push(tokio::spawn(async move {
            let mut routed = 0;
            loop {
                let batch = router.route_batch().await.expect("route batch");
                if batch == 0 {
                    return routed;
                }
                routed += batch;
            }
        }));
    }
    let mut per_router = Vec::new();
    for task in tasks {
        per_router.push(task.await.expect("router task"));
    }
    assert_eq!(
        per_router.iter().sum::<usize>(),
        150,
        "every message routed once: {per_router:?}"
    );

    let client = db.connect().await;
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM recipients WHERE state <> 'routed'"
        )
        .await,
        0
    );
    // alice + 5 list members + remote, per message.
    assert_eq!(
        count(&client, "SELECT count(*) FROM deliveries").await,
        150 * 7
    );
    let duplicates = count(
        &client,
        "SELECT count(*) FROM (SELECT message_id, address, destination FROM deliveries
                                GROUP BY 1, 2, 3 HAVING count(*) > 1) d",
    )
    .await;
    assert_eq!(duplicates, 0);
}

#[tokio::test]
async fn stopped_router_work_is_finished_after_lease_expiry() {
    let (db, queue) = setup().await;
    spool_messages(&queue, 3, RECIPIENTS).await;
    let stopped = router(&db, Duration::from_secs(2)).await;
    let claimed = stopped.claim().await.expect("claim");
    assert_eq!(claimed.len(), 3);
    // The first router now stops without routing anything.
    drop(stopped);

    let successor = router(&db, Duration::from_secs(60)).await;
    assert_eq!(
        successor.route_batch().await.expect("batch"),
        0,
        "leases still held"
    );
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(
        successor.route_batch().await.expect("batch"),
        3,
        "leases expired"
    );

    let client = db.connect().await;
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM recipients WHERE state = 'queued'"
        )
        .await,
        0
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM deliveries").await,
        3 * 7
    );
}

#[tokio::test]
async fn stale_router_cannot_complete_after_takeover() {
    let (db, queue) = setup().await;
    spool_messages(&queue, 1, RECIPIENTS).await;
    let slow = router(&db, Duration::from_secs(1)).await;
    let claimed = slow.claim().await.expect("claim");
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let successor = router(&db, Duration::from_secs(60)).await;
    assert_eq!(successor.route_batch().await.expect("batch"), 1);

    let (message_id, recipients) = claimed.into_iter().next().expect("one message");
    let result = slow.route_message(message_id, recipients).await;
    assert!(
        matches!(result, Err(RouterError::LeaseLost(_))),
        "{result:?}"
    );
    let client = db.connect().await;
    assert_eq!(
        count(&client, "SELECT count(*) FROM deliveries").await,
        7,
        "no second set of deliveries"
    );
}
