//! Benchmark of the relay policy at scale: 10,000 rules and a network list
//! of 1,000,000 entries.
//!
//! Run: `cargo run --release --example bench_policy`. It writes a
//! configuration, a rules directory and the list into a temporary
//! directory (or into `POLICY_DIR`, which is kept, for bench/policy.sh),
//! and measures:
//! - loading: `Config::load` wall time and resident memory growth, which
//!   covers parsing, checking and indexing every rule and list entry;
//! - deciding: `policy::decide` for one recipient, timed call by call over
//!   a fixed mix of clients (`DECISIONS`, default 20,000), with p50, p99
//!   and mean for the whole mix and for each kind of client;
//! - rate limit memory: resident memory growth after 100,000 client
//!   addresses and then 100,000 senders in one limit each, as many as the
//!   default `limits.rate_limit_keys`. A limit keeps somewhat fewer than
//!   that, because its shards fill unevenly.
//!
//! The rules follow one pattern, rotating through four kinds: a client
//! /28, a sender domain pattern, a HELO pattern and a recipient domain. The
//! last rule names the list. No client of the mix matches an early rule by
//! chance, so most decisions walk every rule.
//!
//! Linux only: memory comes from `/proc/self/status`.

#[path = "common.rs"]
mod common;

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use wsmtp::config::Config;
use wsmtp::policy::address::Address;
use wsmtp::policy::dnsbl::DnsblResults;
use wsmtp::policy::{DirectoryView, SessionFacts, decide};
use wsmtp::ratelimit::{RateLimits, Sender};

use common::SplitMix;

const RULES: usize = 10_000;
const LIST_ENTRIES: usize = 1_000_000;
const RATE_LIMIT_KEYS: usize = 100_000;

fn main() -> anyhow::Result<()> {
    let decisions: usize = match std::env::var("DECISIONS") {
        Ok(text) => text
            .parse()
            .with_context(|| format!("DECISIONS must be a number, not {text:?}"))?,
        Err(_) => 20_000,
    };
    let policy_dir = std::env::var_os("POLICY_DIR").map(std::path::PathBuf::from);
    let temporary = tempfile::tempdir()?;
    let directory = policy_dir.as_deref().unwrap_or(temporary.path());
    std::fs::create_dir_all(directory)?;

    let load_average = common::wait_for_quiet_machine();
    println!("load average at start: {load_average}");
    // First, while the heap has no freed memory that the limiters could
    // reuse unseen.
    measure_rate_limit_memory();
    let listed = write_inputs(directory)?;

    let rss_before = common::memory_kib("VmRSS");
    let started = Instant::now();
    let config =
        Config::load(&directory.join("config.yaml")).map_err(|error| anyhow::anyhow!("{error}"))?;
    let load_time = started.elapsed();
    let rss_after = common::memory_kib("VmRSS");
    println!(
        "load: {} rules, {} list entries in {:.2} s; VmRSS {:.0} -> {:.0} MiB (+{:.0} MiB), VmHWM {:.0} MiB",
        config.rules.rules().len(),
        config.lists.entry_count(),
        load_time.as_secs_f64(),
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        (rss_after - rss_before) as f64 / 1024.0,
        common::memory_kib("VmHWM") as f64 / 1024.0,
    );

    measure_decisions(&config, &listed, decisions);
    println!("load average at end: {}", common::load_average());
    Ok(())
}

/// Writes `config.yaml`, `rules/` and `lists/big.cidr` into `directory`
/// and returns some listed addresses for the decision mix.
fn write_inputs(directory: &Path) -> anyhow::Result<Vec<IpAddr>> {
    std::fs::create_dir_all(directory.join("rules"))?;
    std::fs::create_dir_all(directory.join("lists"))?;
    std::fs::write(
        directory.join("config.yaml"),
        "hostname: wsmtp-bench.localdomain\n\
         listeners:\n  - address: 127.0.0.1:24625\n\
         limits:\n  max_connections: 1000\n  max_connections_per_ip: 1000\n\
         relay:\n  relay_domains:\n    - domain: example.net\n      group: sink\n\
         downstream_groups:\n  - name: sink\n    hosts: [127.0.0.1:24626]\n\
         lists:\n  - {name: big, kind: networks, file: lists/big.cidr}\n\
         rate_limits:\n  default:\n    connections_per_ip: 1000000/1m\n    \
         messages_per_ip: 10000000/1h\n    recipients_per_ip: 10000000/1h\n    \
         messages_per_sender: 10000000/1h\n    recipients_per_sender: 10000000/1h\n  \
         customers:\n    messages_per_ip: 10000000/1h\n",
    )?;

    let mut rules = String::with_capacity(RULES * 120);
    for index in 0..RULES - 1 {
        let name = format!("- name: rule-{index}\n");
        rules.push_str(&name);
        match index % 4 {
            0 => rules.push_str(&format!(
                "  client: [172.{}.{}.{}/28]\n  action: reject\n  reply: \"554 5.7.1 Network {index} is blocked\"\n",
                16 + (index >> 12),
                (index >> 4) & 255,
                (index & 15) * 16
            )),
            1 => rules.push_str(&format!(
                "  sender: [\"*@sender{index}.example\"]\n  action: reject\n"
            )),
            2 => rules.push_str(&format!(
                "  helo: [\"*.host{index}.example\"]\n  recipient_kind: [foreign]\n  action: reject\n"
            )),
            _ => rules.push_str(&format!(
                "  recipient: [\"@rcpt{index}.example\"]\n  action: relay\n  group: sink\n  rate_limit: customers\n"
            )),
        }
    }
    rules.push_str("- name: listed-networks\n  client_list: [big]\n  action: reject\n  reply: \"554 5.7.1 Your network is listed\"\n");
    std::fs::write(directory.join("rules/50-bench.yaml"), rules)?;

    // 90% IPv4 (/32 and /24 blocks, a few /16 allow entries), 10% IPv6 /48
    // and /64, none in 127.0.0.0/8 or 172.16.0.0/12, which the mix uses.
    let mut random = SplitMix(7);
    let mut list = String::with_capacity(LIST_ENTRIES * 24);
    let mut listed = Vec::new();
    for index in 0..LIST_ENTRIES {
        let line = if index % 10 == 9 {
            let network = Ipv6Addr::new(
                0x2001,
                0x0db8,
                random.below(65_536) as u16,
                random.below(65_536) as u16,
                0,
                0,
                0,
                0,
            );
            let length = if index % 20 == 9 { 48 } else { 64 };
            format!("{network}/{length}\n")
        } else {
            let mut octets = (random.next_u64() as u32).to_be_bytes();
            if octets[0] == 127 || octets[0] == 172 {
                octets[0] = 11;
            }
            let address = Ipv4Addr::from(octets);
            if listed.len() < 1_000 && index % 3 == 0 && index % 100 != 0 {
                listed.push(IpAddr::V4(address));
            }
            match index % 100 {
                0 => format!("{}.{}.0.0/16 allow\n", octets[0], octets[1]),
                n if n % 2 == 0 => format!("{}.{}.{}.0/24\n", octets[0], octets[1], octets[2]),
                _ => format!("{address}\n"),
            }
        };
        list.push_str(&line);
    }
    std::fs::write(directory.join("lists/big.cidr"), list)?;
    Ok(listed)
}

/// One kind of client in the decision mix.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// In no rule and not in the list: every rule is checked.
    Unlisted,
    /// In the list: decided by the last rule.
    Listed,
    /// In a client /28 of a rule: decided there.
    RuleClient,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Unlisted => "client in no rule and not listed",
            Kind::Listed => "client in the list (last rule)",
            Kind::RuleClient => "client matched by a client rule",
        }
    }
}

fn measure_decisions(config: &Config, listed: &[IpAddr], decisions: usize) {
    let mut random = SplitMix(11);
    let recipient = Address::parse("bob@example.net").expect("recipient");
    let none = DnsblResults::new();
    let mut timings: Vec<(Kind, Duration)> = Vec::with_capacity(decisions);
    for _ in 0..decisions {
        let (kind, client) = match random.below(4) {
            0 | 1 => {
                // 198.51.100.0/24 and 203.0.113.0/24 (documentation
                // ranges); a random list entry may still cover one.
                let octets = [203, 0, 113, random.below(256) as u8];
                (Kind::Unlisted, IpAddr::V4(Ipv4Addr::from(octets)))
            }
            2 => (Kind::Listed, listed[random.below(listed.len())]),
            _ => {
                let rule = 4 * random.below(RULES / 4);
                let octets = [
                    172,
                    16 + (rule >> 12) as u8,
                    ((rule >> 4) & 255) as u8,
                    ((rule & 15) * 16 + 1) as u8,
                ];
                (Kind::RuleClient, IpAddr::V4(Ipv4Addr::from(octets)))
            }
        };
        let session = SessionFacts {
            client,
            helo: "client.example",
            auth: None,
            tls: false,
            sender: "a@example.org",
            dnsbl: &none,
        };
        let started = Instant::now();
        let decision = decide(
            &config.relay,
            &config.rules,
            DirectoryView::Absent,
            &session,
            &recipient,
            false,
        );
        let elapsed = started.elapsed();
        black_box(decision);
        timings.push((kind, elapsed));
    }

    println!("decisions per recipient ({decisions} in all):");
    println!("| clients | decisions | p50 µs | p99 µs | mean µs |");
    println!("| --- | --- | --- | --- | --- |");
    let all: Vec<Duration> = timings.iter().map(|(_, time)| *time).collect();
    print_row("all", &all);
    for kind in [Kind::Unlisted, Kind::Listed, Kind::RuleClient] {
        let times: Vec<Duration> = timings
            .iter()
            .filter(|(k, _)| *k == kind)
            .map(|(_, time)| *time)
            .collect();
        print_row(kind.name(), &times);
    }
}

fn print_row(label: &str, times: &[Duration]) {
    let mut micros: Vec<f64> = times.iter().map(|t| t.as_secs_f64() * 1e6).collect();
    micros.sort_by(f64::total_cmp);
    let percentile = |p: f64| micros[((micros.len() as f64 - 1.0) * p).round() as usize];
    let mean = micros.iter().sum::<f64>() / micros.len() as f64;
    println!(
        "| {label} | {} | {:.1} | {:.1} | {:.1} |",
        micros.len(),
        percentile(0.50),
        percentile(0.99),
        mean
    );
}

fn measure_rate_limit_memory() {
    let config = Config::parse(
        "listeners:\n  - address: 127.0.0.1:24625\n\
         rate_limits:\n  default:\n    recipients_per_ip: 10000000/1h\n    recipients_per_sender: 1000/1h\n",
        None,
    )
    .expect("valid configuration");
    let limits = RateLimits::new(&config.rate_limits, RATE_LIMIT_KEYS, None);
    let class = limits.default_class();
    let before = common::memory_kib("VmRSS");
    for index in 0..RATE_LIMIT_KEYS as u32 {
        let client = IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + index));
        let sender = Sender {
            client,
            user: None,
            address: "",
        };
        let _ = class.check_recipient(&sender);
    }
    let by_address = common::memory_kib("VmRSS");
    for index in 0..RATE_LIMIT_KEYS {
        let address = format!("sender{index}@bulk{}.example", index % 1000);
        let sender = Sender {
            client: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
            user: None,
            address: &address,
        };
        let _ = class.check_recipient(&sender);
    }
    let by_sender = common::memory_kib("VmRSS");
    println!(
        "rate limit memory: {} keys tracked; +{:.1} MiB for {RATE_LIMIT_KEYS} client addresses, +{:.1} MiB for {RATE_LIMIT_KEYS} senders (about 25 characters each)",
        limits.tracked_keys(),
        (by_address - before) as f64 / 1024.0,
        (by_sender - by_address) as f64 / 1024.0,
    );
}
