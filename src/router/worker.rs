//! Router workers: claim spooled messages, resolve their recipients and
//! write the deliveries, for all messages of a claim in one transaction.
//! When that transaction fails, each message of the claim is routed in a
//! transaction of its own, so one message's problem does not delay the others.
//!
//! Claims follow the lease pattern: one statement locks up to N messages
//! with queued recipients (`FOR NO KEY UPDATE SKIP LOCKED`, so two routers
//! never take the same message) and gives all their queued recipients a lease
//! (owner, deadline, a token that grows with every claim). The routing
//! transaction updates the recipients only where owner and token still match:
//! a router whose lease expired and was taken over writes nothing, so a
//! message is never routed twice. A router that dies leaves its leases to
//! expire, and another router finishes the work.
//!
//! Wake-ups: a listener in the same process signals [`Router::wake`] after
//! each spooled message; otherwise routers poll every `poll_interval`.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::autoreply::{AutoReplySettings, StoredMessage, auto_reply};
use super::resolve::{
    ConfiguredRoutes, EnvelopeRecipient, MessageFacts, MessageRouting, ResolveLimits, plan_batches,
    resolve_message,
};
use crate::delivery::dsn::{DsnAction, DsnRecipient, notify_requests, status_from_reply};
use crate::delivery::notify::{NotificationSettings, spool_notification};
use crate::delivery::store::complete_messages;
use crate::directory::Directory;
use crate::metrics::{Component, Metrics, NotificationKind, RoutingResult};
use crate::queue::{Queue, QueueId};

/// Header section bytes read for loop detection and auto-replies.
pub const MAX_HEADER_BYTES: usize = 256 * 1024;

#[derive(Clone, Debug)]
pub struct RouterSettings {
    /// Concurrent claim loops in this process.
    pub workers: usize,
    /// Messages per claim.
    pub claim_messages: i64,
    pub lease: Duration,
    /// Recipients per delivery batch.
    pub batch_size: usize,
    /// Nesting of lists and forwards.
    pub max_depth: usize,
    pub poll_interval: Duration,
    /// Host name for generated messages.
    pub hostname: String,
    /// Relay domains of the configuration and their groups.
    pub relay_domains: std::collections::BTreeMap<String, String>,
    /// Group for mail to other remote domains; None means MX delivery.
    pub outbound_group: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("queue database unavailable: {}", crate::queue::describe_pool_error(.0))]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("queue database error: {}", crate::queue::describe_database_error(.0))]
    Database(#[from] tokio_postgres::Error),
    #[error("the directory is not loaded yet")]
    DirectoryNotLoaded,
    #[error("lease on message {0} was lost to another router; its routing was discarded")]
    LeaseLost(String),
    #[error("auto-reply failed: {0}")]
    AutoReply(String),
    #[error("failure notification failed: {0}")]
    Notification(String),
}

/// The start of the next claim's search for queued recipients.
///
/// The partial index on queued recipients keeps the entries of routed
/// recipients until vacuum removes them, and these sit at its start because
/// message ids grow with time. A claim that started at the oldest message
/// walked over all of them, so under load each claim read thousands of dead
/// entries. Claims therefore continue after the newest message claimed
/// before, where new mail arrives.
///
/// Work is also left behind the cursor. A message gets its id at MAIL but
/// becomes ready at the end of DATA, so under load many become ready after
/// a newer message was claimed. Leases expire, and another router may hold
/// a message locked. So a claim starts from the beginning when the last one that
/// did was full (more work is likely left behind) and otherwise at most
/// once per [`FULL_SCAN_INTERVAL`].
struct ClaimCursor {
    state: std::sync::Mutex<CursorState>,
}

struct CursorState {
    /// The newest message claimed so far.
    after: QueueId,
    /// When a claim last started from the beginning; None before the first.
    last_full_scan: Option<Instant>,
    /// Whether that claim took as many messages as a claim may.
    last_full_scan_was_full: bool,
}

/// Shortest time between two claims from the beginning that follow one
/// that was not full.
const FULL_SCAN_INTERVAL: Duration = Duration::from_millis(100);

impl ClaimCursor {
    fn new() -> ClaimCursor {
        ClaimCursor {
            state: std::sync::Mutex::new(CursorState {
                after: QueueId::nil(),
                last_full_scan: None,
                last_full_scan_was_full: false,
            }),
        }
    }

    /// Returns the id to claim after; the nil id means from the beginning.
    fn start(&self) -> QueueId {
        if self.full_scan_due() {
            return QueueId::nil();
        }
        self.state.lock().expect("claim cursor lock").after
    }

    /// Returns true, and notes the time, when a claim from the beginning is
    /// due.
    fn full_scan_due(&self) -> bool {
        let mut state = self.state.lock().expect("claim cursor lock");
        let due = state.last_full_scan_was_full
            || state
                .last_full_scan
                .is_none_or(|at| at.elapsed() >= FULL_SCAN_INTERVAL);
        if due {
            state.last_full_scan = Some(Instant::now());
            state.last_full_scan_was_full = false;
        }
        due
    }

    /// Moves the cursor past the newest claimed message, and notes whether a
    /// claim from the beginning was full.
    fn advance(&self, newest: Option<QueueId>, full_scan_was_full: Option<bool>) {
        let mut state = self.state.lock().expect("claim cursor lock");
        if let Some(id) = newest.filter(|id| *id > state.after) {
            state.after = id;
        }
        if let Some(full) = full_scan_was_full {
            state.last_full_scan_was_full = full;
        }
    }
}

/// One claimed recipient and its lease token.
#[derive(Clone, Debug)]
pub struct Claimed {
    recipient: EnvelopeRecipient,
    token: i64,
}

pub struct Router {
    queue: Queue,
    directory: Arc<Directory>,
    settings: RouterSettings,
    owner: String,
    cursor: ClaimCursor,
    wake: Arc<Notify>,
    /// Wakes the delivery workers of this process after deliveries were written.
    delivery_wake: Option<Arc<Notify>>,
    auto_reply_settings: AutoReplySettings,
    notifications: NotificationSettings,
    metrics: Arc<Metrics>,
}

impl RouterError {
    /// True for errors of the queue database itself.
    fn is_database(&self) -> bool {
        matches!(self, RouterError::Pool(_) | RouterError::Database(_))
    }
}

impl Router {
    pub fn new(queue: Queue, directory: Arc<Directory>, settings: RouterSettings) -> Router {
        let owner = format!(
            "{}:{}:{}",
            settings.hostname,
            std::process::id(),
            uuid::Uuid::now_v7().simple()
        );
        let auto_reply_settings = AutoReplySettings::new(settings.hostname.clone());
        let notifications = NotificationSettings::new(settings.hostname.clone());
        Router {
            queue,
            directory,
            settings,
            owner,
            cursor: ClaimCursor::new(),
            wake: Arc::new(Notify::new()),
            delivery_wake: None,
            notifications,
            auto_reply_settings,
            metrics: Arc::new(Metrics::default()),
        }
    }

    /// Counts into `metrics` instead of a registry of the router's own.
    pub fn set_metrics(&mut self, metrics: Arc<Metrics>) {
        self.metrics = metrics;
    }

    /// Wakes `wake` after each routed message that produced deliveries.
    pub fn set_delivery_wake(&mut self, wake: Arc<Notify>) {
        self.delivery_wake = Some(wake);
    }

    /// A handle that wakes idle workers when a message was spooled.
    pub fn wake_handle(&self) -> Arc<Notify> {
        Arc::clone(&self.wake)
    }

    /// Runs the workers until `shutdown`; in-flight messages finish first.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut workers = Vec::new();
        for worker in 0..self.settings.workers.max(1) {
            let router = Arc::clone(&self);
            let shutdown = shutdown.clone();
            workers.push(tokio::spawn(async move {
                router.worker_loop(worker, shutdown).await
            }));
        }
        for worker in workers {
            let _ = worker.await;
        }
    }

    async fn worker_loop(&self, worker: usize, shutdown: CancellationToken) {
        tracing::info!(worker, owner = %self.owner, "router worker started");
        let mut failures: u32 = 0;
        let mut empty_claims: u32 = 0;
        while !shutdown.is_cancelled() {
            let routed = match self.route_batch().await {
                Ok(routed) => {
                    failures = 0;
                    routed
                }
                Err(RouterError::DirectoryNotLoaded) => 0,
                Err(error) => {
                    failures = failures.saturating_add(1);
                    if error.is_database() {
                        self.metrics.database_error(Component::Router);
                    }
                    crate::log_limited!(error.to_string(), suppressed => tracing::warn!(
                        error = %error,
                        failures,
                        suppressed,
                        "routing failed; retrying"
                    ));
                    0
                }
            };
            if routed > 0 {
                empty_claims = 0;
                continue;
            }
            // A claim that raced another router's comes back empty although
            // work remains. So one empty claim is retried at once, and only
            // a second one in a row counts as an idle queue.
            empty_claims += 1;
            if empty_claims == 1 && failures == 0 {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                continue;
            }
            empty_claims = 0;
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(self.settings.poll_interval) => {}
                () = shutdown.cancelled() => {}
            }
        }
    }

    /// Claims up to `claim_messages` messages and routes each. Returns how
    /// many were routed.
    pub async fn route_batch(&self) -> Result<usize, RouterError> {
        let Some(_) = self.directory.snapshot() else {
            return Err(RouterError::DirectoryNotLoaded);
        };
        let claimed = self.claim().await?;
        let count = claimed.len();
        if count == 0 {
            return Ok(0);
        }
        if count > 1 {
            match self.route_together(&claimed).await {
                Ok(()) => return Ok(count),
                // One message's problem (a lease taken over, a failed
                // auto-reply) rolled the whole claim back. Routing each
                // message on its own confines the problem to that message.
                Err(error) => {
                    tracing::info!(messages = count, error = %error, "routing the claim in one transaction failed; routing its messages one by one")
                }
            }
        }
        for (message_id, recipients) in claimed {
            match self.route_message(message_id, recipients).await {
                Ok(()) => self.metrics.router.message(RoutingResult::Routed),
                Err(error) => {
                    let result = match &error {
                        RouterError::LeaseLost(_) => RoutingResult::LeaseLost,
                        _ => RoutingResult::Failed,
                    };
                    self.metrics.router.message(result);
                    if error.is_database() {
                        self.metrics.database_error(Component::Router);
                    }
                    tracing::warn!(queue_id = %message_id.simple(), error = %error, "message not routed; its lease will expire and it is retried");
                }
            }
        }
        Ok(count)
    }

    /// Routes every claimed message in one transaction: one commit and a
    /// fixed number of statements for the whole claim, where routing message
    /// by message costs a transaction each.
    async fn route_together(
        &self,
        claimed: &BTreeMap<QueueId, Vec<Claimed>>,
    ) -> Result<(), RouterError> {
        let started = Instant::now();
        let snapshot = self
            .directory
            .snapshot()
            .ok_or(RouterError::DirectoryNotLoaded)?;
        let mut client = self.queue.pool().get().await?;
        let ids: Vec<QueueId> = claimed.keys().copied().collect();
        let mut stored = self.messages_facts(&client, &ids).await?;

        let mut routed = Vec::with_capacity(claimed.len());
        for (message_id, recipients) in claimed {
            let Some(facts) = stored.remove(message_id) else {
                // Deleted since the claim (by `queue delete`): nothing to route.
                continue;
            };
            let routing = self.resolve(&snapshot, &facts, recipients);
            routed.push((*message_id, recipients.as_slice(), facts, routing));
        }

        let transaction = client.transaction().await?;
        let planned: Vec<(QueueId, &MessageRouting)> = routed
            .iter()
            .map(|(id, _, _, routing)| (*id, routing))
            .collect();
        let batches = write_deliveries(&transaction, &planned, self.settings.batch_size).await?;
        for (message_id, _, facts, routing) in &mut routed {
            self.send_auto_replies(&transaction, *message_id, facts, &snapshot, routing)
                .await?;
        }
        let marked: Vec<(&[Claimed], &MessageRouting)> = routed
            .iter()
            .map(|(_, recipients, _, routing)| (*recipients, routing))
            .collect();
        let expected: usize = routed.iter().map(|(_, r, _, _)| r.len()).sum();
        let updated = mark_recipients(&transaction, &self.owner, &marked).await?;
        if updated != expected as u64 {
            transaction.rollback().await?;
            return Err(RouterError::LeaseLost(format!(
                "one of {} claimed messages",
                routed.len()
            )));
        }
        for (message_id, recipients, facts, routing) in &routed {
            self.bounce_failures(
                &transaction,
                *message_id,
                &facts.sender,
                recipients,
                routing,
            )
            .await?;
        }
        let finished: Vec<QueueId> = routed
            .iter()
            .filter(|(_, _, _, routing)| routing.deliveries.is_empty())
            .map(|(id, _, _, _)| *id)
            .collect();
        if !finished.is_empty() {
            complete_messages(&transaction, &finished).await?;
        }
        transaction.commit().await?;
        if let (Some(wake), true) = (&self.delivery_wake, finished.len() < routed.len()) {
            wake.notify_one();
        }

        let elapsed = started.elapsed();
        for (message_id, recipients, _, routing) in &routed {
            self.metrics.router.message(RoutingResult::Routed);
            self.record_routing(*message_id, recipients.len(), routing, elapsed);
        }
        tracing::debug!(
            messages = routed.len(),
            batches,
            duration_ms = elapsed.as_millis() as u64,
            "claim routed in one transaction"
        );
        Ok(())
    }

    /// Reads sender, size and header section of several messages with one
    /// query. A header section longer than the first chunk is read chunk by
    /// chunk, as [`Self::message_facts`] does.
    async fn messages_facts(
        &self,
        client: &deadpool_postgres::Object,
        ids: &[QueueId],
    ) -> Result<std::collections::HashMap<QueueId, StoredFacts>, RouterError> {
        let statement = client
            .prepare_cached(
                "SELECT m.id, m.sender, m.size, m.smtputf8, m.chunk_count,
                        substring(c.data FROM 1 FOR $2)
                   FROM messages m
                   LEFT JOIN message_chunks c ON c.message_id = m.id AND c.seq = 0
                  WHERE m.id = ANY($1)",
            )
            .await?;
        let rows = client
            .query(&statement, &[&ids, &(MAX_HEADER_BYTES as i32)])
            .await?;
        let mut facts = std::collections::HashMap::with_capacity(rows.len());
        for row in rows {
            let id: QueueId = row.get(0);
            let chunk_count: Option<i32> = row.get(4);
            let mut headers: Vec<u8> = row.get::<_, Option<Vec<u8>>>(5).unwrap_or_default();
            match header_end(&headers) {
                Some(end) => headers.truncate(end),
                None if chunk_count.unwrap_or(0) > 1 && headers.len() < MAX_HEADER_BYTES => {
                    facts.insert(id, self.message_facts(client, id).await?);
                    continue;
                }
                None => {}
            }
            let size: Option<i64> = row.get(2);
            facts.insert(
                id,
                StoredFacts {
                    sender: row.get(1),
                    headers,
                    size: size.unwrap_or(0).max(0) as u64,
                    smtputf8: row.get(3),
                },
            );
        }
        Ok(facts)
    }

    /// Claims up to `claim_messages` messages: every queued recipient of
    /// each gets this router's lease. Public for tests that stop a router
    /// between its claim and its routing.
    pub async fn claim(&self) -> Result<BTreeMap<QueueId, Vec<Claimed>>, RouterError> {
        let mut after = self.cursor.start();
        let mut rows = self.claim_after(after).await?;
        if rows.is_empty() && !after.is_nil() && self.cursor.full_scan_due() {
            after = QueueId::nil();
            rows = self.claim_after(after).await?;
        }
        let messages: HashSet<QueueId> = rows.iter().map(|row| row.get(0)).collect();
        let full = messages.len() as i64 >= self.settings.claim_messages;
        self.cursor
            .advance(messages.into_iter().max(), after.is_nil().then_some(full));
        let mut claimed: BTreeMap<QueueId, Vec<Claimed>> = BTreeMap::new();
        for row in rows {
            claimed.entry(row.get(0)).or_default().push(Claimed {
                recipient: EnvelopeRecipient {
                    id: row.get(1),
                    address: row.get(2),
                    route_group: row.get(3),
                    orcpt: row.get(4),
                    notify: row.get(5),
                },
                token: row.get(6),
            });
        }
        for recipients in claimed.values_mut() {
            recipients.sort_by_key(|c| c.recipient.id);
        }
        Ok(claimed)
    }

    /// Claims messages whose id is greater than `after` (ids grow with
    /// time); returns one row per claimed recipient.
    async fn claim_after(&self, after: QueueId) -> Result<Vec<tokio_postgres::Row>, RouterError> {
        let client = self.queue.pool().get().await?;
        // The id lists keep every step an index scan of its table, whatever
        // the planner's statistics estimate for the table sizes.
        let statement = client
            .prepare_cached(
                "WITH candidates AS (
                     -- Served by the partial index on queued recipients.
                     SELECT DISTINCT message_id FROM recipients
                      WHERE state = 'queued' AND message_id > $4
                        AND (lease_until IS NULL OR lease_until < now())
                      ORDER BY message_id
                      LIMIT $1::bigint * 4
                 ), picked AS (
                     SELECT m.id FROM messages m
                      WHERE m.id = ANY(ARRAY(SELECT message_id FROM candidates))
                        AND m.state = 'ready'
                      ORDER BY m.id
                      LIMIT $1
                      FOR NO KEY UPDATE OF m SKIP LOCKED
                 )
                 UPDATE recipients r
                    SET lease_owner = $2,
                        lease_until = now() + make_interval(secs => $3),
                        lease_token = r.lease_token + 1
                  WHERE r.message_id = ANY(ARRAY(SELECT id FROM picked)) AND r.state = 'queued'
                    AND (r.lease_until IS NULL OR r.lease_until < now())
              RETURNING r.message_id, r.id, r.address, r.route_group, r.orcpt, r.notify, r.lease_token",
            )
            .await?;
        let lease_seconds = self.settings.lease.as_secs_f64();
        Ok(client
            .query(
                &statement,
                &[
                    &self.settings.claim_messages,
                    &self.owner,
                    &lease_seconds,
                    &after,
                ],
            )
            .await?)
    }

    /// Reads the sender and the start of the header section of a message.
    async fn message_facts(
        &self,
        client: &deadpool_postgres::Object,
        message_id: QueueId,
    ) -> Result<StoredFacts, RouterError> {
        // Prepared once per pooled connection: a plain query string costs a
        // round trip to prepare it every time.
        let facts = client
            .prepare_cached("SELECT sender, size, smtputf8 FROM messages WHERE id = $1")
            .await?;
        let chunk = client
            .prepare_cached(
                "SELECT substring(data FROM 1 FOR $3) FROM message_chunks WHERE message_id = $1 AND seq = $2",
            )
            .await?;
        let row = client.query_one(&facts, &[&message_id]).await?;
        let sender: String = row.get(0);
        let size: Option<i64> = row.get(1);
        let smtputf8: bool = row.get(2);
        let mut headers = Vec::new();
        let mut seq = 0i32;
        while headers.len() < MAX_HEADER_BYTES {
            let Some(row) = client
                .query_opt(
                    &chunk,
                    &[
                        &message_id,
                        &seq,
                        &((MAX_HEADER_BYTES - headers.len()) as i32),
                    ],
                )
                .await?
            else {
                break;
            };
            let data: Vec<u8> = row.get(0);
            headers.extend_from_slice(&data);
            if let Some(end) = header_end(&headers) {
                headers.truncate(end);
                break;
            }
            seq += 1;
        }
        Ok(StoredFacts {
            sender,
            headers,
            size: size.unwrap_or(0).max(0) as u64,
            smtputf8,
        })
    }

    /// Routes one claimed message in one transaction; fails with
    /// [`RouterError::LeaseLost`] when another router took the lease over.
    pub async fn route_message(
        &self,
        message_id: QueueId,
        claimed: Vec<Claimed>,
    ) -> Result<(), RouterError> {
        let started = Instant::now();
        let snapshot = self
            .directory
            .snapshot()
            .ok_or(RouterError::DirectoryNotLoaded)?;
        let mut client = self.queue.pool().get().await?;
        let stored = self.message_facts(&client, message_id).await?;
        let mut routing = self.resolve(&snapshot, &stored, &claimed);

        let transaction = client.transaction().await?;
        let batches = write_deliveries(
            &transaction,
            &[(message_id, &routing)],
            self.settings.batch_size,
        )
        .await?;
        self.send_auto_replies(&transaction, message_id, &stored, &snapshot, &mut routing)
            .await?;
        let updated =
            mark_recipients(&transaction, &self.owner, &[(claimed.as_slice(), &routing)]).await?;
        if updated != claimed.len() as u64 {
            transaction.rollback().await?;
            return Err(RouterError::LeaseLost(message_id.simple().to_string()));
        }
        let bounced = self
            .bounce_failures(&transaction, message_id, &stored.sender, &claimed, &routing)
            .await?;
        if routing.deliveries.is_empty() {
            complete_messages(&transaction, &[message_id]).await?;
        }
        transaction.commit().await?;
        if bounced {
            self.metrics
                .delivery
                .notification(NotificationKind::Failure);
        }
        if let (Some(wake), false) = (&self.delivery_wake, routing.deliveries.is_empty()) {
            wake.notify_one();
        }

        self.record_routing(message_id, claimed.len(), &routing, started.elapsed());
        tracing::debug!(queue_id = %message_id.simple(), batches, "message routed on its own");
        Ok(())
    }
}

impl Router {
    /// Resolves the claimed recipients of a stored message with the
    /// directory snapshot and the configured routes.
    fn resolve(
        &self,
        snapshot: &crate::directory::Snapshot,
        stored: &StoredFacts,
        claimed: &[Claimed],
    ) -> MessageRouting {
        let delivered_to = delivered_to_addresses(&stored.headers);
        let recipients: Vec<EnvelopeRecipient> =
            claimed.iter().map(|c| c.recipient.clone()).collect();
        resolve_message(
            snapshot,
            &MessageFacts {
                sender: &stored.sender,
                delivered_to: &delivered_to,
            },
            &recipients,
            ResolveLimits {
                max_depth: self.settings.max_depth,
            },
            ConfiguredRoutes {
                relay_domains: &self.settings.relay_domains,
                outbound_group: self.settings.outbound_group.as_deref(),
            },
        )
    }

    /// Counts a routed message in the metrics and logs its routing events,
    /// one line per routed recipient and one for the message.
    fn record_routing(
        &self,
        message_id: QueueId,
        recipients: usize,
        routing: &MessageRouting,
        elapsed: Duration,
    ) {
        let failed = routing
            .outcomes
            .iter()
            .filter(|o| o.failure.is_some())
            .count();
        let router_metrics = &self.metrics.router;
        router_metrics
            .recipients_routed
            .inc_by((recipients - failed.min(recipients)) as u64);
        router_metrics.recipients_failed.inc_by(failed as u64);
        router_metrics
            .deliveries_created
            .inc_by(routing.deliveries.len() as u64);
        router_metrics.duration.observe_duration(elapsed);

        for event in &routing.events {
            tracing::warn!(queue_id = %message_id.simple(), event = %event, "routing event");
        }
        for outcome in &routing.outcomes {
            tracing::info!(
                queue_id = %message_id.simple(),
                recipient_id = outcome.recipient_id,
                resolution = %outcome.resolution,
                "recipient routed"
            );
        }
        tracing::info!(
            queue_id = %message_id.simple(),
            recipients,
            deliveries = routing.deliveries.len(),
            failed,
            duration_ms = elapsed.as_millis() as u64,
            "message routed"
        );
    }
}

/// The stored message as routing reads it.
struct StoredFacts {
    sender: String,
    /// The header section, or its first [`MAX_HEADER_BYTES`].
    headers: Vec<u8>,
    size: u64,
    smtputf8: bool,
}

impl Router {
    /// Spools one failure notification for the recipients that routing
    /// could not deliver anywhere, in the routing transaction; returns
    /// whether one was spooled.
    async fn bounce_failures(
        &self,
        transaction: &tokio_postgres::Transaction<'_>,
        message_id: QueueId,
        sender: &str,
        claimed: &[Claimed],
        routing: &MessageRouting,
    ) -> Result<bool, RouterError> {
        let now = time::OffsetDateTime::now_utc();
        let mut failed = Vec::new();
        for outcome in &routing.outcomes {
            let Some(reason) = &outcome.failure else {
                continue;
            };
            let Some(entry) = claimed
                .iter()
                .find(|c| c.recipient.id == outcome.recipient_id)
            else {
                continue;
            };
            let recipient = &entry.recipient;
            if !notify_requests(recipient.notify.as_deref(), DsnAction::Failed) {
                continue;
            }
            // Routing failures carry an enhanced status code but no reply
            // code; 550 makes them a complete reply.
            let diagnostic = format!("550 {reason}");
            failed.push(DsnRecipient {
                final_recipient: recipient.address.clone(),
                original_recipient: recipient.orcpt.clone(),
                action: DsnAction::Failed,
                status: status_from_reply(&diagnostic, true),
                remote_mta: None,
                diagnostic: Some(diagnostic),
                last_attempt: Some(now),
                will_retry_until: None,
            });
        }
        if failed.is_empty() {
            return Ok(false);
        }
        let spooled = spool_notification(
            transaction,
            &self.notifications,
            message_id,
            sender,
            &failed,
        )
        .await
        .map_err(|error| RouterError::Notification(error.to_string()))?;
        if let Some(notification_id) = spooled {
            tracing::info!(
                queue_id = %message_id.simple(),
                notification_id = %notification_id.simple(),
                recipients = failed.len(),
                "failure notification spooled for recipients that routing could not deliver"
            );
        }
        Ok(spooled.is_some())
    }

    /// Generates the planned auto-replies inside the routing transaction and
    /// notes each outcome in its recipient's resolution.
    async fn send_auto_replies(
        &self,
        transaction: &tokio_postgres::Transaction<'_>,
        message_id: QueueId,
        stored: &StoredFacts,
        snapshot: &crate::directory::Snapshot,
        routing: &mut MessageRouting,
    ) -> Result<(), RouterError> {
        let message = StoredMessage {
            id: message_id,
            sender: &stored.sender,
            header_section: &stored.headers,
            size: stored.size,
            smtputf8: stored.smtputf8,
        };
        let now = time::OffsetDateTime::now_utc();
        for planned in routing.auto_replies.clone() {
            let Some(account) = snapshot.accounts.get(planned.account) else {
                continue;
            };
            let outcome = auto_reply(
                transaction,
                &self.auto_reply_settings,
                account,
                &planned.address,
                &message,
                now,
            )
            .await
            .map_err(|error| RouterError::AutoReply(error.to_string()))?;
            tracing::info!(
                queue_id = %message_id.simple(),
                account = %account.name,
                outcome = %outcome,
                "auto-reply"
            );
            if let Some(entry) = routing
                .outcomes
                .iter_mut()
                .find(|o| o.recipient_id == planned.recipient_id)
            {
                entry.resolution.push_str(&format!(" ({outcome})"));
            }
        }
        Ok(())
    }
}

/// Inserts the batches and deliveries of routed messages, and any new
/// destination rows; returns the number of batches.
async fn write_deliveries(
    transaction: &deadpool_postgres::Transaction<'_>,
    messages: &[(QueueId, &MessageRouting)],
    batch_size: usize,
) -> Result<usize, RouterError> {
    let planned: Vec<(QueueId, &MessageRouting, Vec<Vec<usize>>)> = messages
        .iter()
        .map(|(id, routing)| (*id, *routing, plan_batches(&routing.deliveries, batch_size)))
        .collect();
    let batch_count: usize = planned.iter().map(|(_, _, batches)| batches.len()).sum();
    if batch_count == 0 {
        return Ok(0);
    }

    // A fixed number of statements however many messages and batches: batch
    // ids are taken from the sequence first, so batches and deliveries go in
    // with one INSERT each.
    let reserve = transaction
        .prepare_cached("SELECT nextval(pg_get_serial_sequence('delivery_batches', 'id')) FROM generate_series(1, $1)")
        .await?;
    let batch_ids: Vec<i64> = transaction
        .query(&reserve, &[&(batch_count as i32)])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();

    let delivery_count: usize = messages.iter().map(|(_, r)| r.deliveries.len()).sum();
    let mut batch_messages = Vec::with_capacity(batch_count);
    let mut batch_destinations = Vec::with_capacity(batch_count);
    let mut batch_senders = Vec::with_capacity(batch_count);
    let mut batch_sizes = Vec::with_capacity(batch_count);
    let mut delivery_messages = Vec::with_capacity(delivery_count);
    let mut delivery_batch_ids = Vec::with_capacity(delivery_count);
    let mut recipient_ids = Vec::with_capacity(delivery_count);
    let mut addresses = Vec::with_capacity(delivery_count);
    let mut kinds = Vec::with_capacity(delivery_count);
    let mut destinations = Vec::with_capacity(delivery_count);
    let mut prefixes: Vec<&[u8]> = Vec::with_capacity(delivery_count);
    let mut traces = Vec::with_capacity(delivery_count);
    let mut orcpts = Vec::with_capacity(delivery_count);
    let mut notifies = Vec::with_capacity(delivery_count);
    let mut next_id = batch_ids.iter();
    for (message_id, routing, batches) in &planned {
        for batch in batches {
            let batch_id = *next_id.next().expect("one reserved id per batch");
            let first = &routing.deliveries[batch[0]];
            batch_messages.push(*message_id);
            batch_destinations.push(first.destination.as_str());
            batch_senders.push(first.sender.as_str());
            batch_sizes.push(batch.len() as i32);
            for index in batch {
                let delivery = &routing.deliveries[*index];
                delivery_messages.push(*message_id);
                delivery_batch_ids.push(batch_id);
                recipient_ids.push(delivery.recipient_id);
                addresses.push(delivery.address.as_str());
                kinds.push(delivery.kind.as_str());
                destinations.push(delivery.destination.as_str());
                prefixes.push(delivery.header_prefix.as_bytes());
                traces.push(delivery.trace.as_str());
                orcpts.push(delivery.orcpt.as_deref());
                notifies.push(delivery.notify.as_deref());
            }
        }
    }

    let insert_batches = transaction
        .prepare_cached(
            "INSERT INTO delivery_batches (id, message_id, destination, sender, recipients)
             SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::text[], $5::int[])",
        )
        .await?;
    let insert_deliveries = transaction
        .prepare_cached(
            "INSERT INTO deliveries
                 (message_id, batch_id, recipient_id, address, kind, destination, header_prefix, trace, orcpt, notify)
             SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::text[], $5::text[], $6::text[],
                                  $7::bytea[], $8::text[], $9::text[], $10::text[])",
        )
        .await?;
    // Delivery workers find due work through the destination rows. Sorted,
    // so two routers that add the same new destinations cannot deadlock.
    let insert_destinations = transaction
        .prepare_cached(
            "INSERT INTO destinations (name)
             SELECT DISTINCT d FROM unnest($1::text[]) AS d ORDER BY d
             ON CONFLICT DO NOTHING",
        )
        .await?;
    transaction
        .execute(&insert_destinations, &[&batch_destinations])
        .await?;
    transaction
        .execute(
            &insert_batches,
            &[
                &batch_ids,
                &batch_messages,
                &batch_destinations,
                &batch_senders,
                &batch_sizes,
            ],
        )
        .await?;
    transaction
        .execute(
            &insert_deliveries,
            &[
                &delivery_messages,
                &delivery_batch_ids,
                &recipient_ids,
                &addresses,
                &kinds,
                &destinations,
                &prefixes,
                &traces,
                &orcpts,
                &notifies,
            ],
        )
        .await?;
    Ok(batch_count)
}

/// Marks the claimed recipients of routed messages routed or failed, where
/// the lease still matches; returns how many rows matched.
async fn mark_recipients(
    transaction: &deadpool_postgres::Transaction<'_>,
    owner: &str,
    messages: &[(&[Claimed], &MessageRouting)],
) -> Result<u64, RouterError> {
    let count: usize = messages.iter().map(|(claimed, _)| claimed.len()).sum();
    let mut ids = Vec::with_capacity(count);
    let mut tokens = Vec::with_capacity(count);
    let mut states = Vec::with_capacity(count);
    let mut resolutions = Vec::with_capacity(count);
    for (claimed, routing) in messages {
        for entry in claimed.iter() {
            let outcome = routing
                .outcomes
                .iter()
                .find(|o| o.recipient_id == entry.recipient.id);
            ids.push(entry.recipient.id);
            tokens.push(entry.token);
            let failed = outcome.is_some_and(|o| o.failure.is_some());
            states.push(if failed { "failed" } else { "routed" });
            resolutions.push(outcome.map(|o| o.resolution.clone()).unwrap_or_default());
        }
    }
    let statement = transaction
        .prepare_cached(
            "UPDATE recipients r
                SET state = u.state, resolution = u.resolution, lease_owner = NULL, lease_until = NULL,
                    last_reply = CASE WHEN u.state = 'failed' THEN u.resolution ELSE r.last_reply END
               FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[]) AS u(id, token, state, resolution)
              WHERE r.id = u.id AND r.lease_token = u.token AND r.lease_owner = $5 AND r.state = 'queued'",
        )
        .await?;
    let updated = transaction
        .execute(&statement, &[&ids, &tokens, &states, &resolutions, &owner])
        .await?;
    Ok(updated)
}

/// The offset just past the blank line that ends the header section.
pub fn header_end(data: &[u8]) -> Option<usize> {
    data.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
}

/// Addresses named in Delivered-To header fields, lowercased.
pub fn delivered_to_addresses(headers: &[u8]) -> HashSet<String> {
    let mut found = HashSet::new();
    for line in headers.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        if !line[..colon].eq_ignore_ascii_case(b"delivered-to") {
            continue;
        }
        let value = String::from_utf8_lossy(&line[colon + 1..])
            .trim()
            .trim_matches(['<', '>'])
            .to_lowercase();
        if !value.is_empty() {
            found.insert(value);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivered_to_fields_are_collected() {
        let headers = b"Received: x\r\nDelivered-To: Alice@Example.com\r\ndelivered-to: <bob@example.com>\r\nSubject: Delivered-To: no\r\n\r\n";
        let found = delivered_to_addresses(headers);
        assert!(found.contains("alice@example.com"));
        assert!(found.contains("bob@example.com"));
        assert_eq!(found.len(), 2);
    }
}
