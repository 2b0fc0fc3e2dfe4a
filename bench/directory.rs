//! Benchmark of the in-memory account directory with 1,000,000 addresses.
//!
//! Run: `cargo run --release --example bench_directory`. The server comes
//! from `PG_URL` (default `postgres://postgres@127.0.0.1:5432`); the
//! database `wsmtp_bench_directory` is dropped and created again, filled,
//! and dropped at the end. `ACCOUNTS` changes the number of accounts
//! (default 500,000, two addresses each).
//!
//! Measured:
//! - `load_snapshot`: wall time (median of 3), CPU time of this process and
//!   of its PostgreSQL backend, and resident memory growth;
//! - `Snapshot::lookup` per second on a fixed mix of addresses, on one
//!   thread and on two threads sharing one `Arc<Snapshot>`;
//! - the same mix through a lookup that allocates nothing, written here as
//!   a comparison (it is not in `src/`);
//! - `policy::decide_recipient` per second on the same mix.
//!
//! Linux only: CPU time and memory come from `/proc`.

#[path = "common.rs"]
mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use wsmtp::config::RelayConfig;
use wsmtp::directory::{Lookup, Owner, SUBADDRESS_SEPARATOR, Snapshot, load_snapshot};
use wsmtp::policy::address::Address;
use wsmtp::policy::{DirectoryView, decide_recipient};
use wsmtp::queue::{Queue, QueueConfig};

use common::{SplitMix, median};

const DATABASE: &str = "wsmtp_bench_directory";
const DOMAINS: usize = 10;
const LISTS: usize = 1_000;
const MEMBERS_PER_LIST: usize = 20;
const LOADS: usize = 3;
/// Each rate is measured this long, three times.
const RATE_DURATION: Duration = Duration::from_secs(2);
const RATE_RUNS: usize = 3;
/// Addresses in the lookup mix, visited in order and repeated.
const MIX_SIZE: usize = 1 << 20;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let accounts: usize = match std::env::var("ACCOUNTS") {
        Ok(text) => text
            .parse()
            .with_context(|| format!("ACCOUNTS must be a number, not {text:?}"))?,
        Err(_) => 500_000,
    };

    let url = common::recreate_database(DATABASE).await?;
    Queue::new(&QueueConfig::new(url.clone()))?
        .migrate()
        .await?;
    let mut client = common::connect(&url).await?;
    let started = Instant::now();
    fill_directory(&client, accounts).await?;
    let address_count: i64 = client
        .query_one("SELECT count(*) FROM addresses", &[])
        .await?
        .get(0);
    println!(
        "filled the directory: {address_count} addresses, {accounts} accounts, {LISTS} lists in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let snapshot = Arc::new(measure_loads(&mut client).await?);
    drop(client);

    let mix = address_mix(&snapshot);
    measure_lookups(&snapshot, &mix);
    measure_decisions(&snapshot, &mix)?;

    common::drop_database(DATABASE).await?;
    Ok(())
}

/// Fills the directory with server-side `INSERT … SELECT` statements in one
/// transaction, so the version trigger runs once per statement. Domains
/// `d0.example` … `d9.example` are local and `d9.example` has a catch-all.
/// Account N has `userN@dK.example` and `first.lastN@dK+1.example`; every
/// 50th account also forwards to a remote address and every 1000th has a
/// vacation reply. List N has the address `listN@dK.example` and 20
/// members.
async fn fill_directory(client: &tokio_postgres::Client, accounts: usize) -> anyhow::Result<()> {
    let accounts = accounts as i64;
    let sql = format!(
        "BEGIN;
         INSERT INTO directory_domains (name, kind)
              SELECT 'd' || n || '.example', 'local' FROM generate_series(0, {last_domain}) n;
         INSERT INTO accounts (name, mailbox_kind, mailbox_target)
              SELECT 'user' || n, 'maildir', '/var/mail/user' || n FROM generate_series(1, {accounts}) n;
         INSERT INTO addresses (address, domain, account_id)
              SELECT name || '@d' || (id % {DOMAINS}) || '.example', 'd' || (id % {DOMAINS}) || '.example', id
                FROM accounts
              UNION ALL
              SELECT 'first.last' || id || '@d' || ((id + 1) % {DOMAINS}) || '.example',
                     'd' || ((id + 1) % {DOMAINS}) || '.example', id
                FROM accounts;
         INSERT INTO forwards (account_id, target)
              SELECT id, 'elsewhere' || id || '@example.net' FROM accounts WHERE id % 50 = 0;
         INSERT INTO auto_replies (account_id, kind, subject, body)
              SELECT id, 'vacation', 'Away', 'Back on Monday.' FROM accounts WHERE id % 1000 = 0;
         WITH catcher AS (INSERT INTO accounts (name, mailbox_kind, mailbox_target)
                          VALUES ('catch-all', 'maildir', '/var/mail/catch-all') RETURNING id)
         INSERT INTO addresses (address, domain, account_id)
              SELECT '@d{last_domain}.example', 'd{last_domain}.example', id FROM catcher;
         INSERT INTO lists (name, owner)
              SELECT 'list' || n, 'list' || n || '-owner@d0.example' FROM generate_series(1, {LISTS}) n;
         INSERT INTO addresses (address, domain, list_id)
              SELECT name || '@d' || (id % {DOMAINS}) || '.example', 'd' || (id % {DOMAINS}) || '.example', id
                FROM lists;
         INSERT INTO list_members (list_id, member)
              SELECT l.id, 'user' || ((l.id * {MEMBERS_PER_LIST} + m) % {accounts} + 1) || '@d'
                           || (((l.id * {MEMBERS_PER_LIST} + m) % {accounts} + 1) % {DOMAINS}) || '.example'
                FROM lists l, generate_series(0, {last_member}) m;
         COMMIT;
         ANALYZE;",
        last_domain = DOMAINS - 1,
        last_member = MEMBERS_PER_LIST - 1,
    );
    client
        .batch_execute(&sql)
        .await
        .context("filling the directory failed")?;
    Ok(())
}

/// Loads the snapshot [`LOADS`] times and prints time, CPU and memory.
/// From the second load on, the previous snapshot stays in memory during
/// the load, as in a running server, where the old snapshot serves
/// lookups until the new one replaces it.
async fn measure_loads(client: &mut tokio_postgres::Client) -> anyhow::Result<Snapshot> {
    let backend_pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await?
        .get(0);
    let load_average = common::wait_for_quiet_machine();

    let mut seconds = Vec::new();
    let mut current: Option<Snapshot> = None;
    println!("\nload_snapshot (load average before: {load_average})");
    println!(
        "| load | wall s | this process CPU s | backend CPU s | VmRSS before MiB | VmRSS after MiB | VmHWM after MiB |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for load in 1..=LOADS {
        let rss_before = common::memory_kib("VmRSS");
        let own_before = common::own_cpu();
        let backend_before = common::process_cpu(backend_pid as u32).unwrap_or_default();
        let started = Instant::now();
        let snapshot = load_snapshot(client)
            .await
            .context("load_snapshot failed")?;
        let wall = started.elapsed();
        let own = common::own_cpu() - own_before;
        let backend = common::process_cpu(backend_pid as u32).unwrap_or_default() - backend_before;
        let rss_after = common::memory_kib("VmRSS");
        seconds.push(wall.as_secs_f64());
        println!(
            "| {load} | {:.2} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} |",
            wall.as_secs_f64(),
            own.as_secs_f64(),
            backend.as_secs_f64(),
            rss_before as f64 / 1024.0,
            rss_after as f64 / 1024.0,
            common::memory_kib("VmHWM") as f64 / 1024.0,
        );
        if load == 1 {
            println!(
                "| | addresses {}, accounts {}, lists {}; size_of Account {} B, AutoReply {} B | | | | | |",
                snapshot.address_count(),
                snapshot.accounts.len(),
                snapshot.lists.len(),
                std::mem::size_of::<wsmtp::directory::Account>(),
                std::mem::size_of::<wsmtp::directory::AutoReply>(),
            );
        }
        // The old snapshot is freed only now, after the new one is built.
        current = Some(snapshot);
    }
    println!(
        "median load time: {:.2} s; load average after: {}",
        median(&seconds),
        common::load_average()
    );
    current.context("no snapshot was loaded")
}

/// Builds the lookup mix from the loaded snapshot. It has 55 % exact hits
/// on account addresses, 15 % `+tag` hits, 5 % list addresses and 10 %
/// foreign domains. The other 15 % are unknown local parts at directory
/// domains, and the catch-all of `d9.example` takes a tenth of them.
fn address_mix(snapshot: &Snapshot) -> Vec<String> {
    let mut random = SplitMix(0x5eed);
    let accounts: Vec<_> = snapshot
        .accounts
        .iter()
        .filter(|a| a.addresses.len() == 2)
        .collect();
    let mut mix = Vec::with_capacity(MIX_SIZE);
    for n in 0..MIX_SIZE {
        let pick = random.below(100);
        let address = if pick < 55 {
            let account = accounts[random.below(accounts.len())];
            account.addresses[random.below(2)].clone()
        } else if pick < 70 {
            let account = accounts[random.below(accounts.len())];
            let (local, domain) = account.addresses[0]
                .rsplit_once('@')
                .expect("addresses of the fill contain '@'");
            format!("{local}{SUBADDRESS_SEPARATOR}news{n}@{domain}")
        } else if pick < 75 {
            let list = &snapshot.lists[random.below(snapshot.lists.len())];
            list.addresses[0].clone()
        } else if pick < 90 {
            format!("nobody{n}@d{}.example", random.below(DOMAINS))
        } else {
            format!("someone{n}@foreign{}.example", random.below(50))
        };
        mix.push(address);
    }
    mix
}

/// Counts of lookup results, to check the mix and keep the work observable.
#[derive(Default, Debug)]
struct Tally {
    accounts: u64,
    lists: u64,
    unknown: u64,
    not_in_directory: u64,
}

impl Tally {
    fn add(&mut self, lookup: &Lookup<'_>) {
        match lookup {
            Lookup::Account { .. } => self.accounts += 1,
            Lookup::List { .. } => self.lists += 1,
            Lookup::Unknown { .. } => self.unknown += 1,
            Lookup::NotInDirectory => self.not_in_directory += 1,
        }
    }
}

/// Calls `work` with the indexes `0..len` in turn, starting at `offset`
/// and wrapping around, for [`RATE_DURATION`]; returns calls per second.
fn rate(len: usize, offset: usize, mut work: impl FnMut(usize)) -> f64 {
    let started = Instant::now();
    let mut calls: u64 = 0;
    let mut index = offset % len;
    loop {
        // Checking the clock every 4096 calls keeps its cost out of the figure.
        for _ in 0..4096 {
            work(index);
            index += 1;
            if index == len {
                index = 0;
            }
        }
        calls += 4096;
        let elapsed = started.elapsed();
        if elapsed >= RATE_DURATION {
            return calls as f64 / elapsed.as_secs_f64();
        }
    }
}

/// Runs `measure` [`RATE_RUNS`] times and returns the median.
fn median_rate(mut measure: impl FnMut() -> f64) -> f64 {
    let rates: Vec<f64> = (0..RATE_RUNS).map(|_| measure()).collect();
    median(&rates)
}

fn measure_lookups(snapshot: &Arc<Snapshot>, mix: &[String]) {
    let mut tally = Tally::default();
    for address in mix {
        tally.add(&snapshot.lookup(address));
    }
    println!("\nlookup mix of {} addresses: {tally:?}", mix.len());

    let load_average = common::wait_for_quiet_machine();
    let single = median_rate(|| {
        rate(mix.len(), 0, |i| {
            black_box(snapshot.lookup(black_box(&mix[i])));
        })
    });
    let double = median_rate(|| {
        std::thread::scope(|scope| {
            let threads: Vec<_> = (0..2)
                .map(|thread| {
                    let snapshot = Arc::clone(snapshot);
                    scope.spawn(move || {
                        rate(mix.len(), thread * mix.len() / 2, |i| {
                            black_box(snapshot.lookup(black_box(&mix[i])));
                        })
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| t.join().expect("lookup threads do not panic"))
                .sum()
        })
    });
    let mut buffer = String::new();
    let sketch = median_rate(|| {
        rate(mix.len(), 0, |i| {
            black_box(lookup_without_allocation(
                snapshot,
                black_box(&mix[i]),
                &mut buffer,
            ));
        })
    });
    println!(
        "\n| operation (median of {RATE_RUNS} runs of {} s) | calls per second |",
        RATE_DURATION.as_secs()
    );
    println!("|---|---:|");
    println!("| Snapshot::lookup, 1 thread | {single:.0} |");
    println!("| Snapshot::lookup, 2 threads, one Arc<Snapshot> | {double:.0} |");
    println!("| lookup without allocation (comparison, not in src), 1 thread | {sketch:.0} |");
    println!(
        "load average before: {load_average}; after: {}",
        common::load_average()
    );
}

/// Looks an address up in the order of [`Snapshot::lookup`] (exact,
/// without `+tag`, catch-all), with one hash probe per candidate and a
/// reused buffer in place of a new `String` per candidate. Returns the
/// owner only.
fn lookup_without_allocation(
    snapshot: &Snapshot,
    address: &str,
    buffer: &mut String,
) -> Option<Owner> {
    let (local, domain) = address.rsplit_once('@')?;
    snapshot.domains.get(domain)?;
    if let Some(owner) = snapshot.addresses.get(address) {
        return Some(*owner);
    }
    if let Some((base, _tag)) = local.split_once(SUBADDRESS_SEPARATOR)
        && !base.is_empty()
    {
        buffer.clear();
        buffer.push_str(base);
        buffer.push('@');
        buffer.push_str(domain);
        if let Some(owner) = snapshot.addresses.get(buffer.as_str()) {
            return Some(*owner);
        }
    }
    buffer.clear();
    buffer.push('@');
    buffer.push_str(domain);
    snapshot.addresses.get(buffer.as_str()).copied()
}

fn measure_decisions(snapshot: &Arc<Snapshot>, mix: &[String]) -> anyhow::Result<()> {
    let relay = RelayConfig::default();
    let client = "192.0.2.10".parse().context("client address")?;
    let parsed: Vec<Address> = mix
        .iter()
        .map(|address| Address::parse(address))
        .collect::<Result<_, _>>()
        .context("an address of the mix does not parse")?;
    let load_average = common::wait_for_quiet_machine();

    let decide = median_rate(|| {
        rate(parsed.len(), 0, |i| {
            black_box(decide_recipient(
                &relay,
                DirectoryView::Ready(snapshot),
                client,
                None,
                black_box(&parsed[i]),
                false,
            ));
        })
    });
    let parse_and_decide = median_rate(|| {
        rate(mix.len(), 0, |i| {
            if let Ok(address) = Address::parse(black_box(&mix[i])) {
                black_box(decide_recipient(
                    &relay,
                    DirectoryView::Ready(snapshot),
                    client,
                    None,
                    &address,
                    false,
                ));
            }
        })
    });
    println!(
        "\n| operation (median of {RATE_RUNS} runs of {} s, 1 thread) | calls per second |",
        RATE_DURATION.as_secs()
    );
    println!("|---|---:|");
    println!("| decide_recipient on a parsed address | {decide:.0} |");
    println!("| Address::parse and decide_recipient | {parse_and_decide:.0} |");
    println!(
        "load average before: {load_average}; after: {}",
        common::load_average()
    );
    Ok(())
}
