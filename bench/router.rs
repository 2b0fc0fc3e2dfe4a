//! Benchmark of the router: messages and deliveries routed per second.
//!
//! Run: `cargo run --release --example bench_router`. The server comes from
//! `PG_URL` (default `postgres://postgres@127.0.0.1:5432`). Every run
//! drops and creates the database `wsmtp_bench_router`, seeds a directory,
//! spools the messages with `Queue::begin` and `SpoolWriter::commit` (no
//! SMTP), loads the directory and routes until no recipient is queued.
//! `RUNS` sets the runs per case (default 3), `WORKERS` the worker counts
//! to measure (default `1,2`), and `MESSAGES` replaces the message count of
//! every scenario, for quick trials.
//!
//! Each worker repeats what `Router::route_batch` does: `Router::claim`,
//! then `Router::route_message` for each claimed message. Calling the two
//! separately lets the benchmark time the claims on their own, and a
//! routing error stops the run (`route_batch` only logs it). Only the routing is timed; seeding and
//! spooling are not.
//!
//! Linux only: CPU time comes from `/proc`, and the PostgreSQL server must
//! run on this machine for its backends' CPU time to be read.

#[path = "common.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use wsmtp::directory::{Directory, load_snapshot};
use wsmtp::queue::{Envelope, Queue, QueueConfig, SpoolRecipient};
use wsmtp::router::worker::{Router, RouterSettings};

use common::median;

const DATABASE: &str = "wsmtp_bench_router";
/// `application_name` of the router's connections, to find their backends.
const ROUTER_APPLICATION: &str = "wsmtp_bench_router";
/// Accounts `user0` … `user9999@example.com`, each with its own Maildir.
const ACCOUNTS: usize = 10_000;
/// Concurrent writers while spooling.
const SPOOL_WRITERS: usize = 16;

/// Directory of every run: accounts with Maildirs, accounts that only
/// forward, a list of 10 accounts, a list of 100 members (60 accounts and
/// 40 remote addresses at 4 domains) and a list that contains both lists.
///
/// The seed runs no ANALYZE. Statistics taken while the queue tables are
/// empty make PostgreSQL check the foreign keys of `deliveries` with
/// sequential scans, which then grow with every batch. A new database
/// without statistics gets index scans, as a fresh deployment does.
const SEED: &str = "
BEGIN;
INSERT INTO directory_domains (name, kind) VALUES ('example.com', 'local');
INSERT INTO accounts (name, mailbox_kind, mailbox_target)
     SELECT 'user' || n, 'maildir', '/var/mail/user' || n FROM generate_series(0, 9999) n;
INSERT INTO accounts (name) SELECT 'forward' || n FROM generate_series(0, 99) n;
INSERT INTO addresses (address, domain, account_id)
     SELECT name || '@example.com', 'example.com', id FROM accounts;
INSERT INTO forwards (account_id, target)
     SELECT id, 'away' || substr(name, 8) || '@example.org' FROM accounts WHERE name LIKE 'forward%';
INSERT INTO forwards (account_id, target)
     SELECT id, 'user' || substr(name, 8) || '@example.com' FROM accounts WHERE name LIKE 'forward%';
WITH list AS (INSERT INTO lists (name, owner) VALUES ('team10', 'team10-owner@example.com') RETURNING id),
     address AS (INSERT INTO addresses (address, domain, list_id)
                 SELECT 'team10@example.com', 'example.com', id FROM list)
INSERT INTO list_members (list_id, member)
     SELECT id, 'user' || n || '@example.com' FROM list, generate_series(0, 9) n;
WITH list AS (INSERT INTO lists (name, owner) VALUES ('team100', 'team100-owner@example.com') RETURNING id),
     address AS (INSERT INTO addresses (address, domain, list_id)
                 SELECT 'team100@example.com', 'example.com', id FROM list)
INSERT INTO list_members (list_id, member)
     SELECT id, member FROM list,
            (SELECT 'user' || n || '@example.com' FROM generate_series(100, 159) n
             UNION ALL
             SELECT 'member' || n || '@remote' || (n % 4) || '.example' FROM generate_series(0, 39) n) m (member);
WITH list AS (INSERT INTO lists (name, owner) VALUES ('everyone', 'everyone-owner@example.com') RETURNING id),
     address AS (INSERT INTO addresses (address, domain, list_id)
                 SELECT 'everyone@example.com', 'example.com', id FROM list)
INSERT INTO list_members (list_id, member)
     SELECT id, member FROM list,
            (VALUES ('team10@example.com'), ('team100@example.com')) m (member);
COMMIT;
";

struct Scenario {
    name: &'static str,
    /// Messages per run, chosen so a run with one worker takes 10–60 s on
    /// the 2-core machine of docs/benchmarks.md.
    messages: usize,
    /// Deliveries each message must produce.
    deliveries_per_message: usize,
    recipients: fn(usize) -> Vec<String>,
}

/// Returns one account, a different one for each message.
fn one_account(n: usize) -> Vec<String> {
    vec![format!("user{}@example.com", n % ACCOUNTS)]
}

/// Returns six accounts and four remote addresses at two domains: 6
/// Maildir batches and 2 remote batches.
fn ten_recipients(n: usize) -> Vec<String> {
    let accounts = (0..6).map(|i| format!("user{}@example.com", (n * 6 + i) % ACCOUNTS));
    let remote = (0..4).map(|i| format!("rcpt{n}-{i}@remote{}.example", i % 2));
    accounts.chain(remote).collect()
}

/// Returns the list of 100 members: 60 Maildir batches and 4 remote batches.
fn list_of_100(_n: usize) -> Vec<String> {
    vec!["team100@example.com".to_owned()]
}

/// Result of one run.
struct RunResult {
    seconds: f64,
    messages: usize,
    deliveries: i64,
    router_cpu: Duration,
    postgres_cpu: Duration,
    wal_bytes: i64,
    claim_seconds: f64,
    /// Mean claim time of the first and the last tenth of the claims.
    claim_first_ms: f64,
    claim_last_ms: f64,
    empty_claims: usize,
    load_average: String,
}

/// Work done by one worker.
#[derive(Default)]
struct WorkerTally {
    messages: usize,
    claim_times: Vec<Duration>,
    /// Claims that returned nothing although claimable recipients remained.
    empty_claims: usize,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let runs = env_number("RUNS")?.unwrap_or(3);
    let messages_override = env_number("MESSAGES")?;
    let worker_counts: Vec<usize> = match std::env::var("WORKERS") {
        Ok(text) => text
            .split(',')
            .map(|count| count.trim().parse())
            .collect::<Result<_, _>>()
            .with_context(|| format!("WORKERS must be a list such as 1,2, not {text:?}"))?,
        Err(_) => vec![1, 2],
    };
    let scenarios = [
        Scenario {
            name: "1 recipient (an account)",
            messages: 10_000,
            deliveries_per_message: 1,
            recipients: one_account,
        },
        Scenario {
            name: "10 recipients (6 accounts, 4 remote)",
            messages: 2_500,
            deliveries_per_message: 10,
            recipients: ten_recipients,
        },
        Scenario {
            name: "list of 100 members",
            messages: 600,
            deliveries_per_message: 100,
            recipients: list_of_100,
        },
    ];

    let mut summary = Vec::new();
    for scenario in &scenarios {
        let messages = messages_override.unwrap_or(scenario.messages);
        for &workers in &worker_counts {
            let mut results = Vec::new();
            for run in 1..=runs {
                let result = run_once(scenario, messages, workers).await?;
                println!(
                    "{} | {workers} worker(s) | run {run}: {} messages in {:.1} s, {:.1} msg/s, {:.0} deliveries/s, claims {:.0} % of the time ({:.1} ms first tenth, {:.1} ms last tenth), {} empty claims, load average {}",
                    scenario.name,
                    result.messages,
                    result.seconds,
                    result.messages as f64 / result.seconds,
                    result.deliveries as f64 / result.seconds,
                    100.0 * result.claim_seconds / result.seconds / workers as f64,
                    result.claim_first_ms,
                    result.claim_last_ms,
                    result.empty_claims,
                    result.load_average,
                );
                results.push(result);
            }
            summary.push((scenario.name, workers, messages, results));
        }
    }
    common::drop_database(DATABASE).await?;
    print_summary(&summary);
    Ok(())
}

fn env_number(name: &str) -> anyhow::Result<Option<usize>> {
    match std::env::var(name) {
        Ok(text) => Ok(Some(text.parse().with_context(|| {
            format!("{name} must be a positive number, not {text:?}")
        })?)),
        Err(_) => Ok(None),
    }
}

async fn run_once(
    scenario: &Scenario,
    messages: usize,
    workers: usize,
) -> anyhow::Result<RunResult> {
    let url = common::recreate_database(DATABASE).await?;
    Queue::new(&QueueConfig::new(url.clone()))?
        .migrate()
        .await?;
    let monitor = common::connect(&url).await?;
    monitor
        .batch_execute(SEED)
        .await
        .context("seeding the directory failed")?;
    spool(&url, scenario, messages).await?;

    let directory = Arc::new(Directory::new());
    let mut loader = common::connect(&url).await?;
    directory.replace(load_snapshot(&mut loader).await?);
    drop(loader);

    let queue = Queue::new(&QueueConfig::new(format!(
        "{url}?application_name={ROUTER_APPLICATION}"
    )))?;
    // The defaults of the `router` section of the configuration.
    let settings = RouterSettings {
        workers,
        claim_messages: 16,
        lease: Duration::from_secs(300),
        batch_size: 20,
        max_depth: 10,
        poll_interval: Duration::from_millis(250),
        hostname: "mx.bench.example".to_owned(),
        relay_domains: Default::default(),
        outbound_group: None,
    };
    let router = Arc::new(Router::new(queue.clone(), directory, settings));

    let wal_before = wal_position(&monitor).await?;
    let load_average = common::wait_for_quiet_machine();
    let cpu_before = common::own_cpu();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let router = Arc::clone(&router);
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            route_until_empty(&router, &queue).await
        }));
    }
    let mut tallies = Vec::new();
    for task in tasks {
        tallies.push(task.await.context("a router worker panicked")??);
    }
    let seconds = started.elapsed().as_secs_f64();
    let router_cpu = common::own_cpu() - cpu_before;
    let wal_bytes = wal_position(&monitor).await? - wal_before;

    // The router's pool keeps its connections, so their backends still
    // exist and their CPU time covers exactly the routing.
    let backends = monitor
        .query(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND application_name = $2",
            &[&DATABASE, &ROUTER_APPLICATION],
        )
        .await?;
    let postgres_cpu = backends
        .iter()
        .filter_map(|row| common::process_cpu(row.get::<_, i32>(0) as u32))
        .sum();
    drop(router);

    let routed: usize = tallies.iter().map(|t| t.messages).sum();
    ensure!(
        routed == messages,
        "{routed} messages routed, {messages} spooled"
    );
    let unfinished: i64 = monitor
        .query_one(
            "SELECT count(*) FROM recipients WHERE state <> 'routed'",
            &[],
        )
        .await?
        .get(0);
    ensure!(unfinished == 0, "{unfinished} recipients are not routed");
    let deliveries: i64 = monitor
        .query_one("SELECT count(*) FROM deliveries", &[])
        .await?
        .get(0);
    let expected = (messages * scenario.deliveries_per_message) as i64;
    ensure!(
        deliveries == expected,
        "{deliveries} deliveries written, {expected} expected"
    );

    let claim_seconds: f64 = tallies
        .iter()
        .map(|t| t.claim_times.iter().sum::<Duration>().as_secs_f64())
        .sum();
    let mean_ms = |times: &[Duration]| {
        times.iter().sum::<Duration>().as_secs_f64() * 1000.0 / times.len().max(1) as f64
    };
    // The first worker's claims, in order, show whether a claim gets slower
    // as routed messages accumulate.
    let claims = &tallies[0].claim_times;
    let tenth = (claims.len() / 10).max(1).min(claims.len());
    Ok(RunResult {
        seconds,
        messages: routed,
        deliveries,
        router_cpu,
        postgres_cpu,
        wal_bytes,
        claim_seconds,
        claim_first_ms: mean_ms(&claims[..tenth]),
        claim_last_ms: mean_ms(&claims[claims.len() - tenth..]),
        empty_claims: tallies.iter().map(|t| t.empty_claims).sum(),
        load_average,
    })
}

/// Claims and routes until no queued recipient is left without a lease.
///
/// An empty claim alone does not show that. When two claims run at the
/// same time, the later one can pick the messages the earlier one has just
/// leased. The recheck of its UPDATE then finds their recipients leased, and
/// the claim returns nothing. The worker counts such an empty claim and
/// tries again.
async fn route_until_empty(router: &Router, queue: &Queue) -> anyhow::Result<WorkerTally> {
    let mut tally = WorkerTally::default();
    loop {
        let claim_started = Instant::now();
        let claimed = router.claim().await.context("claim failed")?;
        tally.claim_times.push(claim_started.elapsed());
        if claimed.is_empty() {
            let client = queue.pool().get().await?;
            let claimable: i64 = client
                .query_one(
                    "SELECT count(*) FROM recipients
                      WHERE state = 'queued' AND (lease_until IS NULL OR lease_until < now())",
                    &[],
                )
                .await?
                .get(0);
            if claimable == 0 {
                return Ok(tally);
            }
            tally.empty_claims += 1;
            continue;
        }
        for (message_id, recipients) in claimed {
            router
                .route_message(message_id, recipients)
                .await
                .with_context(|| format!("routing message {message_id} failed"))?;
            tally.messages += 1;
        }
    }
}

/// Reads the server's current WAL position in bytes.
async fn wal_position(client: &tokio_postgres::Client) -> anyhow::Result<i64> {
    Ok(client
        .query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint", &[])
        .await?
        .get(0))
}

/// Spools `messages` messages of about 2 KiB with [`SPOOL_WRITERS`]
/// concurrent writers.
async fn spool(url: &str, scenario: &Scenario, messages: usize) -> anyhow::Result<()> {
    let queue = Queue::new(&QueueConfig::new(url))?;
    let mut writers = Vec::new();
    for writer in 0..SPOOL_WRITERS {
        let queue = queue.clone();
        let recipients = scenario.recipients;
        writers.push(tokio::spawn(async move {
            for n in (writer..messages).step_by(SPOOL_WRITERS) {
                spool_one(&queue, n, recipients(n)).await?;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for writer in writers {
        writer.await.context("a spool writer panicked")??;
    }
    Ok(())
}

async fn spool_one(queue: &Queue, n: usize, recipients: Vec<String>) -> anyhow::Result<()> {
    let id = wsmtp::queue::new_queue_id();
    let mut writer = queue.begin(Envelope {
        id,
        sender: format!("sender{n}@example.net"),
        client_ip: "192.0.2.25".parse().context("client address")?,
        helo: "client.example.net".to_owned(),
        smtputf8: false,
        body_type: None,
        dsn_ret: None,
        dsn_envid: None,
    });
    let header = format!(
        "Received: from client.example.net ([192.0.2.25]) by mx.bench.example\r\n\
         \tfor <{}>; Fri, 4 Dec 2026 22:00:00 +0000\r\n\
         From: Sender {n} <sender{n}@example.net>\r\n\
         To: {}\r\n\
         Subject: Benchmark message {n}\r\n\
         Date: Fri, 4 Dec 2026 22:00:00 +0000\r\n\
         Message-ID: <{}@example.net>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\r\n",
        recipients[0],
        recipients.join(", "),
        id.simple(),
    );
    writer.write(header.as_bytes()).await?;
    let line = b"The quick brown fox jumps over the lazy dog, and then some more text.\r\n";
    for _ in 0..24 {
        writer.write(line).await?;
    }
    let recipients: Vec<SpoolRecipient> = recipients
        .into_iter()
        .map(|address| SpoolRecipient {
            address,
            route_group: None,
            orcpt: None,
            notify: None,
        })
        .collect();
    writer.commit(&recipients).await?;
    Ok(())
}

type Summary<'a> = [(&'a str, usize, usize, Vec<RunResult>)];

fn print_summary(summary: &Summary<'_>) {
    println!();
    println!(
        "| Scenario | Workers | Messages | msg/s | deliveries/s | router CPU ms/msg | PostgreSQL backends CPU ms/msg | WAL KiB/msg | claims, share of worker time | claim ms, first / last tenth | empty claims | load average before each run |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for (name, workers, messages, results) in summary {
        let per_run = |value: &dyn Fn(&RunResult) -> f64| {
            median(&results.iter().map(value).collect::<Vec<_>>())
        };
        let rate = per_run(&|r| r.messages as f64 / r.seconds);
        let delivery_rate = per_run(&|r| r.deliveries as f64 / r.seconds);
        let router_cpu = per_run(&|r| r.router_cpu.as_secs_f64() * 1000.0 / r.messages as f64);
        let postgres_cpu = per_run(&|r| r.postgres_cpu.as_secs_f64() * 1000.0 / r.messages as f64);
        let wal = per_run(&|r| r.wal_bytes as f64 / 1024.0 / r.messages as f64);
        let claim_share = per_run(&|r| 100.0 * r.claim_seconds / r.seconds / *workers as f64);
        let claim_first = per_run(&|r| r.claim_first_ms);
        let claim_last = per_run(&|r| r.claim_last_ms);
        let empty_claims = per_run(&|r| r.empty_claims as f64);
        let loads: Vec<&str> = results.iter().map(|r| r.load_average.as_str()).collect();
        println!(
            "| {name} | {workers} | {messages} | {rate:.1} | {delivery_rate:.0} | {router_cpu:.2} | {postgres_cpu:.2} | {wal:.1} | {claim_share:.0} % | {claim_first:.1} / {claim_last:.1} | {empty_claims:.0} | {} |",
            loads.join("; ")
        );
    }
    println!("\nFigures are medians of the runs; load average is the 1, 5 and 15 minute values.");
}
