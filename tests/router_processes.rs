//! Two `wsmtp serve --roles router` processes drain one queue: every
//! recipient is routed exactly once.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::db::TestDb;
use common::directory::{add_account, add_domain, add_list};
use common::harness::{queue_config, spool_messages};
use wsmtp::queue::Queue;

const MESSAGES: usize = 300;

#[tokio::test(flavor = "multi_thread")]
async fn two_router_processes_route_each_recipient_once() {
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
    let members: Vec<String> = (0..3).map(|n| format!("m{n}@example.org")).collect();
    add_list(
        &client,
        "team",
        "team@example.com",
        "team-owner@example.com",
        &members,
    )
    .await;
    spool_messages(&queue, MESSAGES, &["alice@example.com", "team@example.com"]).await;

    let directory = tempfile::tempdir().expect("temp dir");
    let config = directory.path().join("config.yaml");
    // The listener entry is required by the configuration but not bound
    // with --roles router.
    std::fs::write(
        &config,
        format!(
            "listeners:\n  - address: 127.0.0.1:9\nrelay:\n  local_domains: [example.com]\n\
             queue:\n  url: {}\nrouter:\n  claim_messages: 4\n  poll_interval: 50ms\n",
            db.url
        ),
    )
    .expect("write config");
    // Logs go to files: a pipe nobody reads would fill and block the routers.
    let logs: Vec<std::path::PathBuf> = (0..2)
        .map(|n| directory.path().join(format!("router{n}.log")))
        .collect();
    let mut routers: Vec<std::process::Child> = logs
        .iter()
        .map(|log| {
            Command::new(env!("CARGO_BIN_EXE_wsmtp"))
                .args(["serve", "--roles", "router", "--config"])
                .arg(&config)
                .env_remove("DATABASE_URL")
                .env("RUST_LOG", "wsmtp=info")
                .stderr(Stdio::from(std::fs::File::create(log).expect("log file")))
                .spawn()
                .expect("start a router process")
        })
        .collect();

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let queued: i64 = client
            .query_one(
                "SELECT count(*) FROM recipients WHERE state = 'queued'",
                &[],
            )
            .await
            .expect("count")
            .get(0);
        if queued == 0 {
            break;
        }
        if Instant::now() > deadline {
            for router in &mut routers {
                let _ = router.kill();
            }
            panic!("{queued} recipients still queued after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut routed_per_process = Vec::new();
    for (router, log) in routers.iter_mut().zip(&logs) {
        let status = Command::new("kill")
            .args(["-TERM", &router.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let exit = router.wait().expect("router exit");
        assert!(exit.success(), "{exit:?}");
        let log = std::fs::read_to_string(log).expect("router log");
        routed_per_process.push(log.matches("message routed").count());
    }
    assert_eq!(
        routed_per_process.iter().sum::<usize>(),
        MESSAGES,
        "{routed_per_process:?}"
    );

    let deliveries: i64 = client
        .query_one("SELECT count(*) FROM deliveries", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        deliveries,
        (MESSAGES * 4) as i64,
        "alice and three members per message"
    );
    let duplicates: i64 = client
        .query_one(
            "SELECT count(*) FROM (SELECT message_id, address FROM deliveries
                                    GROUP BY 1, 2 HAVING count(*) > 1) d",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(duplicates, 0);
}
