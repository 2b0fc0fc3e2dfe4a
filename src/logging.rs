//! Log output and the rate limit for repeated log lines.
//!
//! Logs go to stderr through tracing, as text or as JSON objects with every
//! field at the top level (`log.format`). [`dispatch`] builds the subscriber
//! for any writer, so tests can capture exactly what the server writes.
//!
//! A failure that repeats in a loop (an unreachable database, a downstream
//! that keeps refusing) would fill the log with one line per attempt.
//! [`log_limited!`](crate::log_limited) lets the same message from the same
//! place through at most once per [`REPEAT_INTERVAL`] and reports how many
//! were suppressed in between in the field `suppressed`.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::config::{LogConfig, LogFormat};

/// Minimum time between two lines with the same message from the same place.
pub const REPEAT_INTERVAL: Duration = Duration::from_secs(10);

/// Places and messages remembered at most; past this the oldest half is
/// forgotten, so a flood of distinct messages cannot grow the map.
const MAX_REMEMBERED: usize = 1024;

/// Builds the subscriber for `config` writing to `writer`; `filter`
/// replaces `log.filter` when given. `RUST_LOG` overrides both.
pub fn dispatch<W>(
    config: &LogConfig,
    filter: Option<&str>,
    writer: W,
    ansi: bool,
) -> tracing::Dispatch
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        // Library chatter (PostgreSQL notices, migration steps) only at warn,
        // unless the configured filter names those targets itself.
        EnvFilter::new(format!(
            "tokio_postgres=warn,refinery_core=warn,{}",
            filter.unwrap_or(&config.filter)
        ))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    match config.format {
        LogFormat::Text => tracing::Dispatch::new(builder.finish()),
        LogFormat::Json => tracing::Dispatch::new(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .finish(),
        ),
    }
}

/// Sends logs to stderr for the rest of the process; a subscriber set
/// already (in tests) stays.
pub fn init(config: &LogConfig, filter: Option<&str>) {
    // Colour only for a terminal: logs redirected to a file stay plain text.
    let ansi =
        std::io::IsTerminal::is_terminal(&std::io::stderr()) && config.format == LogFormat::Text;
    let _ =
        tracing::dispatcher::set_global_default(dispatch(config, filter, std::io::stderr, ansi));
}

#[derive(Debug)]
struct Seen {
    last_logged: Instant,
    suppressed: u64,
}

/// Remembers when each (place, message) was last logged.
#[derive(Debug, Default)]
pub struct RepeatLimiter {
    seen: Mutex<HashMap<(&'static str, String), Seen>>,
}

impl RepeatLimiter {
    /// Returns `Some(suppressed)` when a line for `message` from `place` may
    /// be written at `now`, with the number of lines held back since the
    /// last one; None when it is a repeat within `interval`.
    pub fn allow(
        &self,
        place: &'static str,
        message: &str,
        now: Instant,
        interval: Duration,
    ) -> Option<u64> {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = seen.get_mut(&(place, message.to_string())) {
            if now.saturating_duration_since(entry.last_logged) < interval {
                entry.suppressed += 1;
                return None;
            }
            let suppressed = entry.suppressed;
            entry.last_logged = now;
            entry.suppressed = 0;
            return Some(suppressed);
        }
        if seen.len() >= MAX_REMEMBERED {
            let mut ages: Vec<Instant> = seen.values().map(|entry| entry.last_logged).collect();
            ages.sort_unstable();
            let cutoff = ages[ages.len() / 2];
            seen.retain(|_, entry| entry.last_logged > cutoff);
        }
        seen.insert(
            (place, message.to_string()),
            Seen {
                last_logged: now,
                suppressed: 0,
            },
        );
        Some(0)
    }
}

/// The limiter behind [`log_limited!`](crate::log_limited).
pub static REPEATS: LazyLock<RepeatLimiter> = LazyLock::new(RepeatLimiter::default);

/// Checks the process-wide limiter; see [`RepeatLimiter::allow`].
pub fn allow_repeat(place: &'static str, message: &str) -> Option<u64> {
    REPEATS.allow(place, message, Instant::now(), REPEAT_INTERVAL)
}

/// Runs a logging statement unless the same message was logged from the same
/// place within [`REPEAT_INTERVAL`]. The statement gets the number of lines
/// held back since the last one under the given name:
///
/// ```ignore
/// log_limited!(error.to_string(), suppressed => tracing::warn!(error = %error, suppressed, "janitor failed"));
/// ```
#[macro_export]
macro_rules! log_limited {
    ($message:expr, $suppressed:ident => $log:expr) => {
        if let Some($suppressed) =
            $crate::logging::allow_repeat(concat!(module_path!(), ":", line!()), &$message)
        {
            $log;
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_within_interval_are_suppressed_and_counted() {
        let limiter = RepeatLimiter::default();
        let start = Instant::now();
        let interval = Duration::from_secs(10);
        assert_eq!(limiter.allow("a", "down", start, interval), Some(0));
        for second in 1..=3 {
            let now = start + Duration::from_secs(second);
            assert_eq!(limiter.allow("a", "down", now, interval), None);
        }
        // Another message or another place is not a repeat.
        assert_eq!(limiter.allow("a", "other", start, interval), Some(0));
        assert_eq!(limiter.allow("b", "down", start, interval), Some(0));
        let later = start + Duration::from_secs(11);
        assert_eq!(limiter.allow("a", "down", later, interval), Some(3));
        assert_eq!(limiter.allow("a", "down", later, interval), None);
    }

    #[test]
    fn memory_stays_bounded() {
        let limiter = RepeatLimiter::default();
        let start = Instant::now();
        for index in 0..(MAX_REMEMBERED * 3) {
            let now = start + Duration::from_millis(index as u64);
            limiter.allow("a", &index.to_string(), now, Duration::from_secs(10));
        }
        let remembered = limiter.seen.lock().expect("lock").len();
        assert!(remembered <= MAX_REMEMBERED, "{remembered}");
    }
}
