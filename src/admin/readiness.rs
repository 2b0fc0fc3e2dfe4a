//! Readiness: whether this process accepts mail now.
//!
//! A process is ready when
//! - it is not shutting down;
//! - its SMTP listeners are bound and accepting, when it runs the listener;
//! - when it has a queue, the queue database returns `SELECT 1` within
//!   `admin.check_timeout` and the migrations are applied.
//!
//! The database is checked on a connection of its own, outside the pool, so
//! a pool that is busy with mail does not make the process look unready. The
//! result is kept for [`CACHE_TIME`], so frequent checks by several load
//! balancers cost one query per second at most.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::queue::Queue;

/// How long a database check result is reused.
pub const CACHE_TIME: Duration = Duration::from_secs(1);

/// The database part of the readiness check.
struct DatabaseProbe {
    queue: Queue,
    timeout: Duration,
    /// Cancelled once the queue's migrations are applied.
    migrated: CancellationToken,
    client: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
    cached: Mutex<Option<(Instant, Result<(), String>)>>,
}

impl DatabaseProbe {
    fn cached(&self) -> Option<Result<(), String>> {
        let cached = self
            .cached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &*cached {
            Some((at, result)) if at.elapsed() < CACHE_TIME => Some(result.clone()),
            _ => None,
        }
    }

    async fn check(&self) -> Result<(), String> {
        if let Some(result) = self.cached() {
            return result;
        }
        let mut client = self.client.lock().await;
        // Another check may have refreshed the result while this one waited.
        if let Some(result) = self.cached() {
            return result;
        }
        let result = match tokio::time::timeout(self.timeout, self.query(&mut client)).await {
            Ok(result) => result,
            Err(_) => Err(format!(
                "queue database did not answer within {:?}",
                self.timeout
            )),
        };
        if result.is_err() {
            // A connection that failed or timed out is not used again.
            *client = None;
        }
        *self
            .cached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((Instant::now(), result.clone()));
        result
    }

    async fn query(&self, client: &mut Option<tokio_postgres::Client>) -> Result<(), String> {
        if client.as_ref().is_none_or(|open| open.is_closed()) {
            let opened = self
                .queue
                .connect_unpooled()
                .await
                .map_err(|error| format!("queue database unreachable: {error}"))?;
            *client = Some(opened);
        }
        let Some(open) = client.as_ref() else {
            return Err("queue database unreachable".to_string());
        };
        open.simple_query("SELECT 1").await.map_err(|error| {
            format!(
                "queue database unreachable: {}",
                crate::queue::describe_database_error(&error)
            )
        })?;
        if !self.migrated.is_cancelled() {
            return Err("queue migrations are not applied yet".to_string());
        }
        Ok(())
    }
}

/// The readiness state of one process.
pub struct Readiness {
    /// Whether the process runs SMTP listeners.
    runs_listener: bool,
    listening: AtomicBool,
    shutting_down: AtomicBool,
    database: Option<DatabaseProbe>,
}

impl Readiness {
    /// `queue` with the token that `serve` cancels once the migrations are
    /// applied; None without a queue.
    pub fn new(
        runs_listener: bool,
        queue: Option<(Queue, CancellationToken)>,
        timeout: Duration,
    ) -> Readiness {
        Readiness {
            runs_listener,
            listening: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            database: queue.map(|(queue, migrated)| DatabaseProbe {
                queue,
                timeout,
                migrated,
                client: tokio::sync::Mutex::new(None),
                cached: Mutex::new(None),
            }),
        }
    }

    /// Called when the SMTP listeners accept connections.
    pub fn set_listening(&self) {
        self.listening.store(true, Ordering::Relaxed);
    }

    /// Called when shutdown starts: from then on the process is not ready.
    pub fn set_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
    }

    /// Ok when the process accepts mail, else the reason it does not.
    pub async fn check(&self) -> Result<(), String> {
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err("shutting down".to_string());
        }
        if self.runs_listener && !self.listening.load(Ordering::Relaxed) {
            return Err("SMTP listeners are not accepting yet".to_string());
        }
        match &self.database {
            Some(probe) => probe.check().await,
            None => Ok(()),
        }
    }
}
