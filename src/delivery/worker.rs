//! Delivery workers: a scheduler finds destinations with due work and starts
//! sessions for them; each session claims deliveries of its destination,
//! sends each message once with all its recipients there, and records every
//! outcome right after the server's reply.
//!
//! Concurrency is bounded twice in each process: `delivery.workers`
//! sessions in all, and `delivery.max_per_destination` sessions per
//! destination. Several processes each apply their own bounds.
//!
//! Wake-ups: a router in the same process signals [`DeliveryWorkers::wake`]
//! after it wrote deliveries; otherwise the scheduler polls every
//! `delivery.poll_interval`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, GroupConfig, TlsMode};
use crate::metrics::{self, Component, DestinationKind, Metrics, NotificationKind};

use super::body::StoredBody;
use super::dsn::DsnAction;
use super::maildir::MaildirWriter;
use super::mx::MxResolver;
use super::store::{ClaimedDelivery, DeliveryResult, DeliveryStore, StoreError};
use super::tls::TlsClients;
use super::transport::{
    ConnectError, ConnectSettings, Connection, OutboundEnvelope, OutboundRecipient, Outcome,
    Protocol, Target,
};

/// Destinations looked at per scheduling round.
const DESTINATIONS_PER_ROUND: i64 = 256;

/// Sessions one scheduling round may add to a destination. Counting the due
/// deliveries of a destination reads one heap row each. So the count stops
/// at what this many sessions would claim, and later rounds add more.
const SESSIONS_ADDED_PER_ROUND: usize = 4;

/// Shortest time between two scheduling rounds. Each routed message wakes
/// the scheduler, so under load this bounds the rounds (and their queries)
/// to about 40 per second, at the cost of up to 25 ms more latency.
const MIN_ROUND_INTERVAL: std::time::Duration = std::time::Duration::from_millis(25);

/// Recipients per SMTP transaction. RFC 5321 §4.5.3.1.8 requires servers to
/// accept at least 100; a server that accepts fewer replies 452 to the rest,
/// which are retried.
const MAX_RECIPIENTS_PER_TRANSACTION: usize = 100;

/// Addresses tried for one destination before the attempt counts as failed.
const MAX_TARGETS: usize = 10;

/// The transport of a destination, parsed from its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    Group(String),
    Domain(String),
    Maildir(PathBuf),
    Lmtp(String),
}

impl Route {
    pub fn parse(destination: &str) -> Option<Route> {
        let (kind, value) = destination.split_once(':')?;
        if value.is_empty() {
            return None;
        }
        match kind {
            "group" => Some(Route::Group(value.to_string())),
            "domain" => Some(Route::Domain(value.to_string())),
            "maildir" => Some(Route::Maildir(PathBuf::from(value))),
            "lmtp" => Some(Route::Lmtp(value.to_string())),
            _ => None,
        }
    }
}

/// Failure to open any connection for a destination.
enum ConnectFailure {
    /// Every recipient of the destination fails, e.g. a null MX.
    Permanent(String),
    /// Try again later; the destination backs off.
    Temporary(String),
}

pub struct DeliveryWorkers {
    store: DeliveryStore,
    hostname: String,
    groups: BTreeMap<String, GroupConfig>,
    resolver: MxResolver,
    tls: TlsClients,
    wake: Arc<Notify>,
    session_ended: Notify,
    sessions: Arc<Semaphore>,
    /// Open sessions per destination.
    active: Mutex<HashMap<String, usize>>,
    shutdown_grace: std::time::Duration,
    metrics: Arc<Metrics>,
}

impl DeliveryWorkers {
    pub fn new(store: DeliveryStore, config: &Config) -> anyhow::Result<DeliveryWorkers> {
        let delivery = store.config();
        let resolver = MxResolver::new(&delivery.resolver_settings())?;
        let tls = TlsClients::new(delivery.tls_ca_file.as_deref())?;
        let sessions = Arc::new(Semaphore::new(delivery.workers));
        Ok(DeliveryWorkers {
            hostname: config.hostname.clone(),
            groups: config.groups.clone(),
            resolver,
            tls,
            wake: Arc::new(Notify::new()),
            session_ended: Notify::new(),
            sessions,
            active: Mutex::new(HashMap::new()),
            shutdown_grace: config.timeouts.shutdown_grace,
            store,
            metrics: Arc::new(Metrics::default()),
        })
    }

    /// Counts into `metrics` instead of a registry of the workers' own.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> DeliveryWorkers {
        self.metrics = metrics;
        self
    }

    /// A handle that wakes the scheduler when deliveries were written.
    pub fn wake_handle(&self) -> Arc<Notify> {
        Arc::clone(&self.wake)
    }

    /// Waits for `ready` (the queue's migrations, for instance), then runs
    /// like [`DeliveryWorkers::run`].
    pub async fn run_when(self: Arc<Self>, ready: CancellationToken, shutdown: CancellationToken) {
        tokio::select! {
            () = ready.cancelled() => self.run(shutdown).await,
            () = shutdown.cancelled() => {}
        }
    }

    /// Runs the scheduler until `shutdown`; open sessions finish their
    /// current transaction first.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        tracing::info!(owner = %self.store.owner(), "delivery workers started");
        let config = self.store.config();
        let count_limit =
            (config.claim_size * config.max_per_destination.min(SESSIONS_ADDED_PER_ROUND)) as i64;
        let mut failures: u32 = 0;
        while !shutdown.is_cancelled() {
            match self
                .store
                .due_destinations(DESTINATIONS_PER_ROUND, count_limit)
                .await
            {
                Ok(due) => {
                    failures = 0;
                    for destination in due {
                        self.start_sessions(
                            &destination.name,
                            destination.due,
                            destination.failures,
                            &shutdown,
                        );
                    }
                }
                Err(error) => {
                    failures = failures.saturating_add(1);
                    self.metrics.database_error(Component::Delivery);
                    crate::log_limited!(error.to_string(), suppressed => tracing::warn!(
                        error = %error,
                        failures,
                        suppressed,
                        "looking for due deliveries failed; retrying"
                    ));
                }
            }
            tokio::select! {
                () = tokio::time::sleep(MIN_ROUND_INTERVAL) => {}
                () = shutdown.cancelled() => {}
            }
            tokio::select! {
                () = self.wake.notified() => {}
                () = self.session_ended.notified() => {}
                () = tokio::time::sleep(config.poll_interval) => {}
                () = shutdown.cancelled() => {}
            }
        }
        // Every session holds a permit until it ends. Sessions still busy
        // after the grace period are cut off with the process; their work
        // returns when their leases end.
        let drained = tokio::time::timeout(
            self.shutdown_grace,
            self.sessions.acquire_many(config.workers as u32),
        )
        .await;
        if drained.is_err() {
            tracing::warn!(grace = ?self.shutdown_grace, "delivery sessions still busy at the end of the shutdown grace period");
        }
        tracing::info!("delivery workers stopped");
    }

    /// Starts sessions for a destination up to what its due work needs and
    /// the bounds allow.
    fn start_sessions(
        self: &Arc<Self>,
        destination: &str,
        due: i64,
        failures: i32,
        shutdown: &CancellationToken,
    ) {
        let config = self.store.config();
        // `due` counts unclaimed work only: running sessions claim more when
        // they finish their batch, so new sessions are added for the rest.
        let added = (due.max(1) as usize)
            .div_ceil(config.claim_size)
            .min(SESSIONS_ADDED_PER_ROUND);
        let running = self
            .active
            .lock()
            .expect("active sessions lock")
            .get(destination)
            .copied()
            .unwrap_or(0);
        let target = (running + added).min(config.max_per_destination);
        loop {
            {
                let active = self.active.lock().expect("active sessions lock");
                if active.get(destination).copied().unwrap_or(0) >= target {
                    return;
                }
            }
            let Ok(permit) = Arc::clone(&self.sessions).try_acquire_owned() else {
                return;
            };
            *self
                .active
                .lock()
                .expect("active sessions lock")
                .entry(destination.to_string())
                .or_insert(0) += 1;
            let workers = Arc::clone(self);
            let destination = destination.to_string();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                workers.metrics.delivery.sessions.inc();
                let claimed = workers.session(&destination, failures, &shutdown).await;
                workers.metrics.delivery.sessions.dec();
                {
                    let mut active = workers.active.lock().expect("active sessions lock");
                    if let Some(count) = active.get_mut(&destination) {
                        *count -= 1;
                        if *count == 0 {
                            active.remove(&destination);
                        }
                    }
                }
                drop(permit);
                // A session that found nothing (its work was held or taken
                // by another process) must not wake the scheduler, which
                // would start the same session again at once.
                if claimed > 0 {
                    workers.session_ended.notify_one();
                }
            });
        }
    }

    /// Runs one session; returns how many deliveries it claimed.
    async fn session(
        &self,
        destination: &str,
        failures: i32,
        shutdown: &CancellationToken,
    ) -> usize {
        let Some(route) = Route::parse(destination) else {
            let error = "the destination is of an unknown kind";
            tracing::error!(
                destination,
                "deliveries name a destination of unknown kind; they stay queued"
            );
            if let Err(store_error) = self
                .store
                .defer_destination(destination, failures + 1, error)
                .await
            {
                tracing::warn!(destination, error = %store_error, "backing off the destination failed");
            }
            return 0;
        };
        let result = match &route {
            Route::Maildir(path) => self.maildir_session(destination, path, shutdown).await,
            _ => {
                self.network_session(destination, &route, failures, shutdown)
                    .await
            }
        };
        match result {
            Ok(claimed) => claimed,
            Err(error) => {
                if matches!(error, StoreError::Pool(_) | StoreError::Database(_)) {
                    self.metrics.database_error(Component::Delivery);
                }
                crate::log_limited!(format!("{destination}: {error}"), suppressed => tracing::warn!(
                    destination,
                    error = %error,
                    suppressed,
                    "delivery session failed; its leases expire and the work is retried"
                ));
                1
            }
        }
    }

    /// Delivers claimed work over SMTP or LMTP, reusing the connection for
    /// several transactions.
    async fn network_session(
        &self,
        destination: &str,
        route: &Route,
        mut failures: i32,
        shutdown: &CancellationToken,
    ) -> Result<usize, StoreError> {
        let config = self.store.config();
        let mut connection: Option<Connection> = None;
        let mut total = 0;
        while !shutdown.is_cancelled() {
            let claimed = self
                .store
                .claim(destination, config.claim_size as i64)
                .await?;
            if claimed.is_empty() {
                break;
            }
            total += claimed.len();
            let transactions = transactions(&claimed);
            for (index, transaction) in transactions.iter().enumerate() {
                if connection.is_none() {
                    match self.connect(route).await {
                        Ok(opened) => {
                            if failures > 0 {
                                self.store.reset_destination(destination).await?;
                                failures = 0;
                            }
                            connection = Some(opened);
                        }
                        Err(failure) => {
                            let rest: Vec<&ClaimedDelivery> =
                                transactions[index..].iter().flatten().copied().collect();
                            self.connect_failed(destination, &mut failures, failure, &rest)
                                .await?;
                            return Ok(total);
                        }
                    }
                }
                let Some(open) = connection.as_mut() else {
                    break;
                };
                let reusable = self
                    .send_transaction(destination, open, transaction)
                    .await?;
                let used_up = open.transactions() >= config.max_transactions_per_connection;
                if (!reusable || used_up)
                    && let Some(done) = connection.take()
                    && reusable
                {
                    done.quit().await;
                }
                if shutdown.is_cancelled() {
                    // Claimed work not sent yet is handed back at once
                    // rather than when its lease ends.
                    let rest: Vec<&ClaimedDelivery> = transactions[index + 1..]
                        .iter()
                        .flatten()
                        .copied()
                        .collect();
                    self.store.release(&rest).await?;
                    break;
                }
            }
        }
        if let Some(open) = connection {
            open.quit().await;
        }
        Ok(total)
    }

    /// Sends one message to its recipients at this destination and records
    /// the outcomes; returns whether the connection may be used again.
    async fn send_transaction(
        &self,
        destination: &str,
        connection: &mut Connection,
        deliveries: &[&ClaimedDelivery],
    ) -> Result<bool, StoreError> {
        let first = deliveries[0];
        let envelope = OutboundEnvelope {
            sender: first.sender.clone(),
            size: first.message.size.max(0) as u64 + first.header_prefix.len() as u64,
            body_type: first.message.body_type.clone(),
            smtputf8: first.message.smtputf8,
            dsn_ret: first.message.dsn_ret.clone(),
            dsn_envid: first.message.dsn_envid.clone(),
        };
        let recipients: Vec<OutboundRecipient> = deliveries
            .iter()
            .map(|d| OutboundRecipient {
                address: d.address.clone(),
                orcpt: d.orcpt.clone(),
                notify: d.notify.clone(),
            })
            .collect();
        let mut body = StoredBody::new(
            self.store.queue().pool().clone(),
            first.message_id,
            first.message.chunk_count,
        );
        let started = std::time::Instant::now();
        let result = connection
            .send(&envelope, &recipients, &first.header_prefix, &mut body)
            .await;
        if let Some(kind) = DestinationKind::of(destination) {
            self.metrics.delivery.observe(kind, started.elapsed());
        }
        // A server without DSN support cannot report success, so we do.
        let success_action = match (connection.capabilities().dsn, route_is_mailbox(destination)) {
            (_, true) => Some(DsnAction::Delivered),
            (false, false) => Some(DsnAction::Relayed),
            (true, false) => None,
        };
        let peer = connection.peer().to_string();
        let results: Vec<(&ClaimedDelivery, DeliveryResult)> = deliveries
            .iter()
            .zip(result.outcomes)
            .map(|(delivery, outcome)| {
                (
                    *delivery,
                    DeliveryResult {
                        outcome,
                        remote_mta: Some(peer.clone()),
                        success_action,
                    },
                )
            })
            .collect();
        self.record(destination, &results).await?;
        Ok(result.reusable)
    }

    /// Records outcomes and logs one line per delivery.
    async fn record(
        &self,
        destination: &str,
        results: &[(&ClaimedDelivery, DeliveryResult)],
    ) -> Result<(), StoreError> {
        let summary = self.store.record(results).await?;
        self.count(destination, &summary);
        for (delivery, result) in results {
            let outcome = match &result.outcome {
                Outcome::Delivered { .. } => "delivered",
                Outcome::Permanent { .. } => "failed",
                Outcome::Temporary { .. } => "deferred",
            };
            tracing::info!(
                queue_id = %delivery.message_id.simple(),
                delivery_id = delivery.id,
                recipient = %delivery.address,
                destination,
                remote_mta = result.remote_mta.as_deref().unwrap_or(""),
                attempt = delivery.attempts + 1,
                outcome,
                reply = %result.outcome.reply(),
                "delivery attempted"
            );
        }
        if summary.lost > 0 {
            tracing::warn!(
                destination,
                lost = summary.lost,
                "outcomes dropped because their leases were taken over; those recipients may get a duplicate"
            );
        }
        if summary.expired > 0 {
            tracing::info!(destination, expired = summary.expired, "deliveries expired");
        }
        Ok(())
    }

    /// Counts what one record did in the metrics.
    fn count(&self, destination: &str, summary: &super::store::RecordSummary) {
        let delivery = &self.metrics.delivery;
        if let Some(kind) = DestinationKind::of(destination) {
            let results = [
                (metrics::DeliveryResult::Delivered, summary.delivered),
                (metrics::DeliveryResult::Deferred, summary.deferred),
                (metrics::DeliveryResult::Bounced, summary.failed),
                (metrics::DeliveryResult::Expired, summary.expired),
            ];
            for (result, count) in results {
                delivery.outcomes(kind, result, count as u64);
            }
            delivery.retries(kind, summary.retries as u64);
        }
        delivery.outcomes_lost.inc_by(summary.lost as u64);
        let notifications = [
            (NotificationKind::Failure, summary.failure_notifications),
            (NotificationKind::Delay, summary.delay_notifications),
            (NotificationKind::Success, summary.success_notifications),
        ];
        for (kind, count) in notifications {
            delivery.notifications(kind, count as u64);
        }
    }

    /// Records a failed connection attempt for the claimed deliveries and
    /// backs the destination off when the failure is temporary.
    async fn connect_failed(
        &self,
        destination: &str,
        failures: &mut i32,
        failure: ConnectFailure,
        deliveries: &[&ClaimedDelivery],
    ) -> Result<(), StoreError> {
        let outcome = match &failure {
            ConnectFailure::Permanent(reply) => Outcome::Permanent {
                reply: reply.clone(),
            },
            ConnectFailure::Temporary(reply) => Outcome::Temporary {
                reply: reply.clone(),
            },
        };
        if let ConnectFailure::Temporary(reply) = &failure {
            *failures += 1;
            if let Some(kind) = DestinationKind::of(destination) {
                self.metrics.delivery.connect_failed(kind);
            }
            tracing::warn!(destination, failures = *failures, error = %reply, "destination unreachable; backing off");
            self.store
                .defer_destination(destination, *failures, reply)
                .await?;
        }
        let results: Vec<(&ClaimedDelivery, DeliveryResult)> = deliveries
            .iter()
            .map(|delivery| {
                (
                    *delivery,
                    DeliveryResult {
                        outcome: outcome.clone(),
                        remote_mta: None,
                        success_action: None,
                    },
                )
            })
            .collect();
        self.record(destination, &results).await
    }

    /// Opens a connection for a network route, trying its hosts in order.
    async fn connect(&self, route: &Route) -> Result<Connection, ConnectFailure> {
        let config = self.store.config();
        let mut settings = ConnectSettings {
            protocol: Protocol::Smtp,
            helo_name: self.hostname.clone(),
            tls: config.tls,
            tls_clients: self.tls.clone(),
            connect_timeout: config.connect_timeout,
            command_timeout: config.command_timeout,
            final_reply_timeout: config.final_reply_timeout,
        };
        let targets = match route {
            Route::Group(name) => {
                let Some(group) = self.groups.get(name) else {
                    return Err(ConnectFailure::Temporary(format!(
                        "451 4.3.5 downstream group {name} is not configured"
                    )));
                };
                settings.tls = group.tls;
                settings.connect_timeout = group.connect_timeout;
                settings.command_timeout = group.command_timeout;
                settings.final_reply_timeout = group.final_reply_timeout;
                group.hosts.iter().cloned().map(Target::HostPort).collect()
            }
            Route::Lmtp(target) => {
                settings.protocol = Protocol::Lmtp;
                settings.tls = TlsMode::None;
                if target.starts_with('/') {
                    vec![Target::Unix(PathBuf::from(target))]
                } else {
                    vec![Target::HostPort(target.clone())]
                }
            }
            Route::Domain(domain) => {
                settings.tls = config.tls_for_domain(domain);
                self.mx_targets(domain).await?
            }
            Route::Maildir(_) => {
                return Err(ConnectFailure::Permanent(
                    "554 5.3.5 a maildir is not a network destination".to_string(),
                ));
            }
        };

        let mut errors = Vec::new();
        for target in targets.iter().take(MAX_TARGETS) {
            match Connection::open(target, &settings).await {
                Ok(connection) => return Ok(connection),
                Err(ConnectError::TlsFailed { host, detail }) if settings.tls == TlsMode::May => {
                    // Opportunistic TLS: a failed handshake is retried in
                    // plain text, as a server that offers STARTTLS but
                    // cannot complete it would otherwise never get mail.
                    tracing::info!(host = %host, detail = %detail, "TLS handshake failed; retrying without TLS");
                    let plain = ConnectSettings {
                        tls: TlsMode::None,
                        ..settings.clone()
                    };
                    match Connection::open(target, &plain).await {
                        Ok(connection) => return Ok(connection),
                        Err(error) => errors.push(error),
                    }
                }
                Err(error) => {
                    tracing::debug!(target = %target.name(), error = %error, "connection attempt failed");
                    errors.push(error);
                }
            }
        }
        let status = errors.last().map(ConnectError::status).unwrap_or("4.4.1");
        let detail: Vec<String> = errors.iter().map(ToString::to_string).collect();
        Err(ConnectFailure::Temporary(format!(
            "451 {status} no host answered: {}",
            detail.join("; ")
        )))
    }

    /// The addresses of a domain's MX hosts, in the order to try them.
    async fn mx_targets(&self, domain: &str) -> Result<Vec<Target>, ConnectFailure> {
        let port = self.store.config().smtp_port;
        let hosts = self.resolver.route(domain).await.map_err(|error| {
            let reply = format!(
                "{} {} {error}",
                if error.is_permanent() { 550 } else { 451 },
                error.status()
            );
            if error.is_permanent() {
                ConnectFailure::Permanent(reply)
            } else {
                ConnectFailure::Temporary(reply)
            }
        })?;
        let mut targets = Vec::new();
        for host in hosts {
            for address in host.addresses {
                targets.push(Target::Address {
                    address: std::net::SocketAddr::new(address, port),
                    name: host.name.clone(),
                });
            }
        }
        Ok(targets)
    }

    /// Writes claimed deliveries into a Maildir, one file each.
    async fn maildir_session(
        &self,
        destination: &str,
        path: &std::path::Path,
        shutdown: &CancellationToken,
    ) -> Result<usize, StoreError> {
        let config = self.store.config();
        let mut total = 0;
        while !shutdown.is_cancelled() {
            let claimed = self
                .store
                .claim(destination, config.claim_size as i64)
                .await?;
            if claimed.is_empty() {
                break;
            }
            total += claimed.len();
            for message in transactions(&claimed) {
                let mut results = Vec::with_capacity(message.len());
                for delivery in message {
                    let started = std::time::Instant::now();
                    let outcome = self.write_maildir(path, delivery).await;
                    self.metrics
                        .delivery
                        .observe(DestinationKind::Maildir, started.elapsed());
                    results.push((
                        delivery,
                        DeliveryResult {
                            outcome,
                            remote_mta: None,
                            success_action: Some(DsnAction::Delivered),
                        },
                    ));
                }
                self.record(destination, &results).await?;
            }
        }
        Ok(total)
    }

    async fn write_maildir(&self, path: &std::path::Path, delivery: &ClaimedDelivery) -> Outcome {
        let mut body = StoredBody::new(
            self.store.queue().pool().clone(),
            delivery.message_id,
            delivery.message.chunk_count,
        );
        let result = async {
            let mut writer = MaildirWriter::create(
                path,
                &self.hostname,
                &delivery.sender,
                &delivery.header_prefix,
            )
            .await?;
            loop {
                use super::transport::BodySource;
                match body.next_chunk().await {
                    Ok(Some(chunk)) => writer.write(&chunk).await?,
                    Ok(None) => break,
                    Err(error) => {
                        writer.abort().await;
                        return Ok(Err(error.to_string()));
                    }
                }
            }
            writer.commit().await.map(Ok)
        }
        .await;
        match result {
            Ok(Ok(file)) => Outcome::Delivered {
                reply: format!("250 2.0.0 delivered to maildir as {}", file.display()),
            },
            Ok(Err(read_error)) => Outcome::Temporary {
                reply: format!("451 4.3.0 {read_error}"),
            },
            Err(error) if error.is_permanent() => Outcome::Permanent {
                reply: format!("554 5.3.5 {error}"),
            },
            Err(error) => Outcome::Temporary {
                reply: format!("451 4.3.0 {error}"),
            },
        }
    }
}

fn route_is_mailbox(destination: &str) -> bool {
    destination.starts_with("lmtp:") || destination.starts_with("maildir:")
}

/// Groups claimed deliveries into transactions: one message, one
/// reverse-path and one header prefix each, at most
/// [`MAX_RECIPIENTS_PER_TRANSACTION`] recipients.
fn transactions(claimed: &[ClaimedDelivery]) -> Vec<Vec<&ClaimedDelivery>> {
    let mut groups: BTreeMap<(crate::queue::QueueId, &str, &[u8]), Vec<&ClaimedDelivery>> =
        BTreeMap::new();
    for delivery in claimed {
        groups
            .entry((
                delivery.message_id,
                delivery.sender.as_str(),
                delivery.header_prefix.as_slice(),
            ))
            .or_default()
            .push(delivery);
    }
    groups
        .into_values()
        .flat_map(|group| {
            group
                .chunks(MAX_RECIPIENTS_PER_TRANSACTION)
                .map(<[&ClaimedDelivery]>::to_vec)
                .collect::<Vec<_>>()
        })
        .collect()
}
