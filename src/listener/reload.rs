//! Configuration reload: SIGHUP (and so `wsmtp reload`) makes the server
//! read its configuration file, the rules directory and the lists again,
//! check all of it, and replace the listener's state in one atomic swap.
//!
//! A configuration with any problem changes nothing: the old state keeps
//! serving and the problems are logged. Open sessions keep the state they
//! were admitted with. Rate limiters whose class, rate and key bound are
//! unchanged are carried over with their counts, and the counts of open
//! connections are never reset.
//!
//! Settings that only a restart can apply ([`RESTART_ONLY`]) keep their
//! running values, and a warning names the ones that changed. `relay` and
//! `downstream_groups` reach the listener at once, but a router or delivery
//! tier in the same process keeps the values it started with.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;

use super::ListenerState;
use super::intake::Shared;
use crate::config::{Config, ConfigError};
use crate::policy::dnsbl::Blocklists;
use crate::ratelimit::RateLimits;

/// Keys that only change with a restart.
pub const RESTART_ONLY: &[&str] = &[
    "hostname",
    "listeners",
    "queue",
    "router",
    "delivery",
    "directory",
    "auth",
    "log",
    "pid_file",
];

/// Counts of reloads, for metrics and status output.
#[derive(Debug, Default)]
pub struct ReloadStats {
    successes: AtomicU64,
    failures: AtomicU64,
    /// Milliseconds since the Unix epoch; 0 when there was none.
    last_attempt_ms: AtomicU64,
    last_success_ms: AtomicU64,
}

fn from_millis(millis: u64) -> Option<SystemTime> {
    (millis > 0).then(|| UNIX_EPOCH + Duration::from_millis(millis))
}

impl ReloadStats {
    /// Reloads that were applied since the process started.
    pub fn successes(&self) -> u64 {
        self.successes.load(Ordering::Relaxed)
    }

    /// Reloads that failed and left the running state alone.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Time of the last reload, applied or failed.
    pub fn last_attempt(&self) -> Option<SystemTime> {
        from_millis(self.last_attempt_ms.load(Ordering::Relaxed))
    }

    /// Time of the last reload that was applied.
    pub fn last_success(&self) -> Option<SystemTime> {
        from_millis(self.last_success_ms.load(Ordering::Relaxed))
    }

    fn record(&self, success: bool) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| elapsed.as_millis() as u64)
            .unwrap_or(1);
        self.last_attempt_ms.store(now, Ordering::Relaxed);
        if success {
            self.last_success_ms.store(now, Ordering::Relaxed);
            self.successes.fetch_add(1, Ordering::Relaxed);
        } else {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The counts of an applied reload, and the settings it could not apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReloadReport {
    pub rules: usize,
    /// Entries of all network and address lists.
    pub list_entries: usize,
    pub rate_limit_classes: usize,
    /// Restart-only keys that changed in the file; their running values
    /// were kept.
    pub needs_restart: Vec<&'static str>,
    /// Keys that changed for the listener, while the router or delivery
    /// tier of this process keeps the values it started with.
    pub listener_only: Vec<&'static str>,
}

/// The reason a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the configuration was not read from a file, so there is nothing to read again")]
    NoFile,
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("cannot set up the DNS blocklists: {0}")]
    Blocklists(String),
    #[error("reading the configuration failed: {0}")]
    Task(String),
}

/// Reloads the configuration of a running server. One reload runs at a
/// time; a second request waits for the first.
pub struct Reloader {
    /// The configuration in force, with the restart-only values it started
    /// with. The lock also serialises reloads.
    current: tokio::sync::Mutex<Arc<Config>>,
    /// The listener's state; None when this process runs no listener.
    listener: Option<Arc<ArcSwap<ListenerState>>>,
    /// True when a router or delivery tier runs in this process.
    other_tiers: bool,
    stats: Arc<ReloadStats>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Reloader {
    pub fn new(
        config: Arc<Config>,
        listener: Option<Arc<ArcSwap<ListenerState>>>,
        other_tiers: bool,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Reloader {
        Reloader {
            current: tokio::sync::Mutex::new(config),
            listener,
            other_tiers,
            stats: Arc::new(ReloadStats::default()),
            metrics,
        }
    }

    pub fn stats(&self) -> Arc<ReloadStats> {
        Arc::clone(&self.stats)
    }

    /// Reads the configuration file again and applies it, or changes
    /// nothing when it has a problem. Logs the outcome either way.
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let mut current = self.current.lock().await;
        let path = current.path.clone();
        let result = self.apply(&mut current).await;
        self.stats.record(result.is_ok());
        self.metrics.config_reloaded(result.is_ok());
        let path = path.map(|p| p.display().to_string()).unwrap_or_default();
        match &result {
            Ok(report) => {
                if !report.needs_restart.is_empty() {
                    tracing::warn!(
                        path = %path,
                        keys = %report.needs_restart.join(","),
                        "config reload: these settings change only with a restart; their running values are kept"
                    );
                }
                if !report.listener_only.is_empty() {
                    tracing::warn!(
                        path = %path,
                        keys = %report.listener_only.join(","),
                        "config reload: the listener uses the new values; the router and delivery tiers of this process keep theirs until a restart"
                    );
                }
                tracing::info!(
                    path = %path,
                    rules = report.rules,
                    list_entries = report.list_entries,
                    rate_limit_classes = report.rate_limit_classes,
                    "config reloaded"
                );
            }
            Err(error) => {
                // One problem per line in the error; one log line keeps
                // the entry greppable in the text format.
                let problems = error.to_string().replace('\n', "; ");
                tracing::error!(path = %path, error = %problems, "config reload failed; the running configuration stays in force");
            }
        }
        result
    }

    async fn apply(&self, current: &mut Arc<Config>) -> Result<ReloadReport, ReloadError> {
        let path = current.path.clone().ok_or(ReloadError::NoFile)?;
        // Large lists take a while to parse; keep that off the session tasks.
        let loaded = tokio::task::spawn_blocking(move || Config::load(&path))
            .await
            .map_err(|error| ReloadError::Task(error.to_string()))??;
        let (config, needs_restart) = keep_restart_only(current, loaded);
        let mut listener_only = Vec::new();
        if self.other_tiers {
            if config.relay != current.relay {
                listener_only.push("relay");
            }
            if config.groups != current.groups {
                listener_only.push("downstream_groups");
            }
        }
        let report = ReloadReport {
            rules: config.rules.rules().len(),
            list_entries: config.lists.entry_count(),
            rate_limit_classes: config.rate_limits.classes.len(),
            needs_restart,
            listener_only,
        };
        let config = Arc::new(config);
        if let Some(listener) = &self.listener {
            let blocklists = Blocklists::from_config(&config)
                .map_err(|error| ReloadError::Blocklists(error.to_string()))?
                .map(Arc::new);
            let old = listener.load_full();
            let rate_limits = RateLimits::new(
                &config.rate_limits,
                config.limits.rate_limit_keys,
                Some(&old.shared.rate_limits),
            );
            let shared = Arc::new(Shared {
                config: Arc::clone(&config),
                queue: old.shared.queue.clone(),
                directory: old.shared.directory.clone(),
                router_wake: old.shared.router_wake.clone(),
                blocklists,
                metrics: Arc::clone(&old.shared.metrics),
                rate_limits: Arc::new(rate_limits),
            });
            listener.store(Arc::new(old.reloaded(shared)));
        }
        *current = config;
        Ok(report)
    }
}

/// Returns `loaded` with the restart-only settings of `running`, and the
/// names of those that differ.
fn keep_restart_only(running: &Config, mut loaded: Config) -> (Config, Vec<&'static str>) {
    let mut changed = Vec::new();
    macro_rules! keep {
        ($key:literal, $($field:ident).+) => {
            if loaded.$($field).+ != running.$($field).+ {
                changed.push($key);
                loaded.$($field).+ = running.$($field).+.clone();
            }
        };
    }
    keep!("hostname", hostname);
    keep!("listeners", listeners);
    keep!("queue", queue);
    keep!("router", router);
    keep!("delivery", delivery);
    keep!("directory", directory_poll_interval);
    keep!("auth", auth);
    keep!("log", log);
    keep!("pid_file", pid_file);
    debug_assert!(changed.iter().all(|key| RESTART_ONLY.contains(key)));
    (loaded, changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "\
hostname: mx.example.com
listeners:
  - address: 127.0.0.1:2525
limits:
  max_recipients: 100
";

    #[test]
    fn restart_only_keys_keep_running_values() {
        let running = Config::parse(BASE, None).expect("valid");
        let text = BASE
            .replace("mx.example.com", "mx2.example.com")
            .replace("2525", "2526")
            .replace("max_recipients: 100", "max_recipients: 7");
        let loaded = Config::parse(&text, None).expect("valid");
        let (config, changed) = keep_restart_only(&running, loaded);
        assert_eq!(changed, vec!["hostname", "listeners"]);
        assert_eq!(config.hostname, "mx.example.com");
        assert_eq!(config.listeners[0].address.port(), 2525);
        assert_eq!(config.limits.max_recipients, 7, "limits are reloaded");
    }

    #[test]
    fn stats_count_each_outcome() {
        let stats = ReloadStats::default();
        assert_eq!(stats.last_attempt(), None);
        stats.record(false);
        assert_eq!((stats.successes(), stats.failures()), (0, 1));
        assert!(stats.last_attempt().is_some());
        assert_eq!(stats.last_success(), None);
        stats.record(true);
        assert_eq!((stats.successes(), stats.failures()), (1, 1));
        assert!(stats.last_success().is_some());
    }
}
