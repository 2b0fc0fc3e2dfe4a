//! Helpers shared by the directory and router benchmarks: a dedicated
//! database, CPU time and memory read from `/proc` (Linux only), the load
//! average, a check for other benchmarks running, and medians.

// Each example uses only part of this module.
#![allow(dead_code)]

use std::time::Duration;

use anyhow::Context;
use tokio_postgres::{Client, NoTls};

/// Server URL used when `PG_URL` is not set, without a database name.
pub const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432";

/// Returns the server URL from `PG_URL`, without a trailing database name.
pub fn server_url() -> String {
    let url = std::env::var("PG_URL").unwrap_or_else(|_| DEFAULT_PG_URL.to_owned());
    let authority_start = url.find("://").map_or(0, |i| i + 3);
    match url[authority_start..].find('/') {
        Some(slash) => url[..authority_start + slash].to_owned(),
        None => url,
    }
}

/// Returns the URL of database `name` on the server of `PG_URL`.
pub fn database_url(name: &str) -> String {
    format!("{}/{name}", server_url())
}

/// Opens a connection and drives it on a spawned task.
pub async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    tokio::spawn(async move {
        // A failure surfaces as an error of the next query on `client`. The
        // connection also fails when a later run drops the database while
        // it is still closing, which is of no interest here.
        let _ = connection.await;
    });
    Ok(client)
}

/// Drops database `name` if it exists and creates it empty; returns its URL.
pub async fn recreate_database(name: &str) -> anyhow::Result<String> {
    let admin = connect(&database_url("postgres")).await?;
    // Two calls, because a multi-statement string runs as one transaction
    // and DROP DATABASE cannot run inside one.
    for statement in [
        format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"),
        format!("CREATE DATABASE \"{name}\""),
    ] {
        admin
            .batch_execute(&statement)
            .await
            .with_context(|| format!("{statement} failed"))?;
    }
    Ok(database_url(name))
}

/// Drops database `name`, ending any connection still open to it.
pub async fn drop_database(name: &str) -> anyhow::Result<()> {
    let admin = connect(&database_url("postgres")).await?;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .await
        .with_context(|| format!("cannot drop database {name}"))?;
    Ok(())
}

/// Reads the clock ticks per second of `/proc/PID/stat` from `getconf CLK_TCK`.
fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        // Linux reports 100 on every common architecture.
        .unwrap_or(100)
}

/// Returns the user plus system CPU time of process `pid` (all its threads), or None
/// when the process is gone.
pub fn process_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name in field 2 may contain spaces, so fields are counted
    // after its closing parenthesis: utime and stime are fields 14 and 15.
    let after_name = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks = clock_ticks();
    Some(Duration::from_millis((utime + stime) * 1000 / ticks))
}

/// Returns the CPU time of this process.
pub fn own_cpu() -> Duration {
    process_cpu(std::process::id()).unwrap_or_default()
}

/// Reads a field of `/proc/self/status` in KiB, such as `VmRSS` or `VmHWM`.
pub fn memory_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Reads the 1, 5 and 15 minute load averages from `/proc/loadavg`.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Returns true when a process named `smtp-source` runs, which means the
/// SMTP benchmark (`bench/run.sh`) is taking measurements.
fn other_benchmark_running() -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|entry| {
        std::fs::read_to_string(entry.path().join("comm"))
            .is_ok_and(|name| name.trim() == "smtp-source")
    })
}

/// Waits, polling every 30 s for at most 20 minutes, while the SMTP
/// benchmark runs, so that the two do not share the CPUs. Returns the load
/// average when it is done. It blocks the thread, so callers run it only
/// between measurements, when no database work is in flight.
pub fn wait_for_quiet_machine() -> String {
    let mut waited = Duration::ZERO;
    while other_benchmark_running() && waited < Duration::from_secs(20 * 60) {
        if waited.is_zero() {
            eprintln!("smtp-source is running; waiting for the other benchmark to finish");
        }
        std::thread::sleep(Duration::from_secs(30));
        waited += Duration::from_secs(30);
    }
    if other_benchmark_running() {
        eprintln!("smtp-source still runs after 20 minutes; measuring anyway");
    }
    load_average()
}

/// Returns the median of `values`: the mean of the two middle values for
/// an even count, and 0 for none.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let count = sorted.len();
    match count {
        0 => 0.0,
        _ if count % 2 == 1 => sorted[count / 2],
        _ => (sorted[count / 2 - 1] + sorted[count / 2]) / 2.0,
    }
}

/// A small deterministic pseudo-random generator (SplitMix64), so every run
/// uses the same address mix.
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Returns a value in `0..bound`.
    pub fn below(&mut self, bound: usize) -> usize {
        (self.next_u64() % bound as u64) as usize
    }
}
