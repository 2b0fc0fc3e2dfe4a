//! The delivery tier's statements: finding due destinations, claiming
//! deliveries with a lease, recording outcomes with their notifications,
//! destination backoff, completion of messages, and the queue's upkeep.
//!
//! Leases: a claim sets the owner, a deadline and a new token, and moves
//! `next_attempt_at` to the deadline, so an expired lease is simply due
//! again. Records match on id, owner and token: a worker whose lease was
//! taken over records nothing, and its outcome is dropped.
//!
//! Completion: the transaction that makes a message's last delivery
//! terminal deletes the message. It locks the message row first and checks
//! for remaining work in a later statement. That statement's snapshot
//! includes every transaction that held the lock before, so two workers that
//! finish the last deliveries of one message at once cannot both miss the end.

use std::collections::BTreeMap;
use std::time::Duration;

use time::OffsetDateTime;

use crate::config::DeliveryConfig;
use crate::queue::{Queue, QueueId};

use super::dsn::{DsnAction, DsnRecipient, notify_requests, status_from_reply};
use super::notify::{NotificationSettings, spool_notification};
use super::transport::Outcome;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("queue database unavailable: {}", crate::queue::describe_pool_error(.0))]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("queue database error: {}", crate::queue::describe_database_error(.0))]
    Database(#[from] tokio_postgres::Error),
    #[error("notification failed: {0}")]
    Notification(String),
}

/// A destination with work due now.
#[derive(Clone, Debug)]
pub struct DueDestination {
    pub name: String,
    /// Deliveries due, counted up to the limit given to the query.
    pub due: i64,
    /// Consecutive failed connection attempts.
    pub failures: i32,
}

/// Facts of a message that delivery and notifications need.
#[derive(Clone, Debug)]
pub struct MessageFacts {
    pub received_at: OffsetDateTime,
    pub size: i64,
    pub chunk_count: i32,
    pub smtputf8: bool,
    pub body_type: Option<String>,
    pub dsn_ret: Option<String>,
    pub dsn_envid: Option<String>,
}

/// One delivery under this worker's lease.
#[derive(Clone, Debug)]
pub struct ClaimedDelivery {
    pub id: i64,
    pub token: i64,
    pub message_id: QueueId,
    /// Reverse-path of the delivery's batch; "" for `<>`.
    pub sender: String,
    pub address: String,
    pub kind: String,
    pub header_prefix: Vec<u8>,
    pub orcpt: Option<String>,
    pub notify: Option<String>,
    pub attempts: i32,
    pub delay_notices: i32,
    pub message: MessageFacts,
}

/// The outcome of one claimed delivery, to record.
#[derive(Clone, Debug)]
pub struct DeliveryResult {
    pub outcome: Outcome,
    /// Host that gave the reply, when one did.
    pub remote_mta: Option<String>,
    /// For a delivered outcome: the notification a NOTIFY=SUCCESS sender
    /// gets from us. Delivered for mailboxes, Relayed for servers without
    /// DSN support; None when the server took the request over.
    pub success_action: Option<DsnAction>,
}

/// Counts of what a record did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordSummary {
    pub delivered: usize,
    pub failed: usize,
    pub deferred: usize,
    pub expired: usize,
    /// Outcomes dropped because another worker holds the lease now.
    pub lost: usize,
    pub notifications: usize,
    /// Notifications by type: failure (bounces), delay, and success.
    pub failure_notifications: usize,
    pub delay_notifications: usize,
    pub success_notifications: usize,
    /// Recorded outcomes of deliveries that had been attempted before.
    pub retries: usize,
    pub completed_messages: usize,
}

/// The new state of one delivery.
struct Transition {
    id: i64,
    token: i64,
    state: &'static str,
    reply: String,
    remote_mta: Option<String>,
    next_attempt_at: OffsetDateTime,
    delay_notices: i32,
    /// Notification owed to the batch's sender.
    notice: Option<DsnAction>,
}

pub struct DeliveryStore {
    queue: Queue,
    owner: String,
    lease: Duration,
    config: DeliveryConfig,
    notifications: NotificationSettings,
}

impl DeliveryStore {
    pub fn new(
        queue: Queue,
        owner: String,
        config: DeliveryConfig,
        notifications: NotificationSettings,
    ) -> DeliveryStore {
        DeliveryStore {
            queue,
            owner,
            lease: config.lease,
            config,
            notifications,
        }
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    pub fn config(&self) -> &DeliveryConfig {
        &self.config
    }

    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// Destinations that are not held or backed off and have due deliveries,
    /// the longest waiting first.
    pub async fn due_destinations(
        &self,
        limit: i64,
        count_limit: i64,
    ) -> Result<Vec<DueDestination>, StoreError> {
        let client = self.queue.pool().get().await?;
        let statement = client
            .prepare_cached(
                // Both subqueries are ordered by next_attempt_at and
                // limited, so each is a scan of the destination's range of
                // deliveries_due_idx. As a plain EXISTS and count, the
                // planner joined all pending deliveries by a sequential scan.
                "SELECT t.name, t.failures,
                        (SELECT count(*) FROM (
                             SELECT 1 FROM deliveries d
                              WHERE d.destination = t.name AND d.state = 'pending'
                                AND d.next_attempt_at <= now()
                              ORDER BY d.next_attempt_at
                              LIMIT $2) AS due)
                   FROM destinations t
                  CROSS JOIN LATERAL (
                        SELECT 1 FROM deliveries d JOIN messages m ON m.id = d.message_id
                         WHERE d.destination = t.name AND d.state = 'pending'
                           AND d.next_attempt_at <= now() AND NOT m.held
                         ORDER BY d.next_attempt_at
                         LIMIT 1) AS ready
                  WHERE NOT t.held AND t.next_attempt_at <= now()
                  ORDER BY t.next_attempt_at
                  LIMIT $1",
            )
            .await?;
        let rows = client.query(&statement, &[&limit, &count_limit]).await?;
        Ok(rows
            .iter()
            .map(|row| DueDestination {
                name: row.get(0),
                failures: row.get(1),
                due: row.get(2),
            })
            .collect())
    }

    /// Claims up to `limit` due deliveries of `destination`, oldest due
    /// first, skipping held messages and rows locked by other claims.
    pub async fn claim(
        &self,
        destination: &str,
        limit: i64,
    ) -> Result<Vec<ClaimedDelivery>, StoreError> {
        let client = self.queue.pool().get().await?;
        let statement = client
            .prepare_cached(
                "WITH picked AS (
                     SELECT d.id, b.sender, m.received_at, m.size, m.smtputf8, m.body_type,
                            m.dsn_ret, m.dsn_envid, m.chunk_count
                       FROM deliveries d
                       JOIN messages m ON m.id = d.message_id
                       JOIN delivery_batches b ON b.id = d.batch_id
                      WHERE d.destination = $1 AND d.state = 'pending'
                        AND d.next_attempt_at <= now() AND NOT m.held
                      ORDER BY d.next_attempt_at
                      LIMIT $2
                      FOR UPDATE OF d SKIP LOCKED
                 )
                 UPDATE deliveries d
                    SET lease_owner = $3,
                        lease_until = now() + make_interval(secs => $4),
                        next_attempt_at = now() + make_interval(secs => $4),
                        lease_token = d.lease_token + 1
                   FROM picked
                  -- The id list makes the update an index scan; joined to
                  -- the CTE alone, the planner hashed it against a
                  -- sequential scan of all deliveries.
                  WHERE d.id = picked.id AND d.id = ANY(ARRAY(SELECT id FROM picked))
              RETURNING d.id, d.lease_token, d.message_id, picked.sender, d.address, d.kind,
                        d.header_prefix, d.orcpt, d.notify, d.attempts, d.delay_notices,
                        picked.received_at, picked.size, picked.smtputf8, picked.body_type,
                        picked.dsn_ret, picked.dsn_envid, picked.chunk_count",
            )
            .await?;
        let lease_seconds = self.lease.as_secs_f64();
        let rows = client
            .query(
                &statement,
                &[&destination, &limit, &self.owner, &lease_seconds],
            )
            .await?;
        let mut claimed: Vec<ClaimedDelivery> = rows
            .iter()
            .map(|row| ClaimedDelivery {
                id: row.get(0),
                token: row.get(1),
                message_id: row.get(2),
                sender: row.get(3),
                address: row.get(4),
                kind: row.get(5),
                header_prefix: row.get(6),
                orcpt: row.get(7),
                notify: row.get(8),
                attempts: row.get(9),
                delay_notices: row.get(10),
                message: MessageFacts {
                    received_at: row.get(11),
                    size: row.get::<_, Option<i64>>(12).unwrap_or(0),
                    smtputf8: row.get(13),
                    body_type: row.get(14),
                    dsn_ret: row.get(15),
                    dsn_envid: row.get(16),
                    chunk_count: row.get::<_, Option<i32>>(17).unwrap_or(0),
                },
            })
            .collect();
        claimed.sort_by_key(|d| (d.message_id, d.id));
        Ok(claimed)
    }

    /// Records outcomes in one transaction: new states, notifications owed,
    /// and the deletion of messages that are now complete.
    pub async fn record(
        &self,
        results: &[(&ClaimedDelivery, DeliveryResult)],
    ) -> Result<RecordSummary, StoreError> {
        let now = OffsetDateTime::now_utc();
        let transitions: Vec<Transition> = results
            .iter()
            .map(|(delivery, result)| self.transition(delivery, result, now))
            .collect();

        let mut client = self.queue.pool().get().await?;
        let transaction = client.transaction().await?;
        let fenced = update_deliveries(&transaction, &self.owner, &transitions).await?;

        let mut summary = RecordSummary::default();
        let mut notices: BTreeMap<(QueueId, String), Vec<DsnRecipient>> = BTreeMap::new();
        let mut finished_messages = Vec::new();
        for ((delivery, result), transition) in results.iter().zip(&transitions) {
            if !fenced.contains(&transition.id) {
                summary.lost += 1;
                continue;
            }
            if delivery.attempts > 0 {
                summary.retries += 1;
            }
            match transition.state {
                "delivered" => summary.delivered += 1,
                "failed" => summary.failed += 1,
                "expired" => summary.expired += 1,
                _ => summary.deferred += 1,
            }
            if transition.state != "pending" {
                finished_messages.push(delivery.message_id);
            }
            if let Some(action) = transition.notice {
                notices
                    .entry((delivery.message_id, delivery.sender.clone()))
                    .or_default()
                    .push(self.dsn_recipient(delivery, result, transition, action, now));
            }
        }

        for ((message_id, sender), recipients) in &notices {
            let spooled = spool_notification(
                &transaction,
                &self.notifications,
                *message_id,
                sender,
                recipients,
            )
            .await
            .map_err(|error| StoreError::Notification(error.to_string()))?;
            if let Some(notification_id) = spooled {
                summary.notifications += 1;
                // A notification with any failed recipient is a bounce.
                let actions = || recipients.iter().map(|recipient| recipient.action);
                if actions().any(|action| action == DsnAction::Failed) {
                    summary.failure_notifications += 1;
                } else if actions().any(|action| action == DsnAction::Delayed) {
                    summary.delay_notifications += 1;
                } else {
                    summary.success_notifications += 1;
                }
                tracing::info!(
                    queue_id = %message_id.simple(),
                    notification_id = %notification_id.simple(),
                    recipients = recipients.len(),
                    action = ?recipients[0].action,
                    "delivery status notification spooled"
                );
            }
        }

        finished_messages.sort();
        finished_messages.dedup();
        summary.completed_messages = complete_messages(&transaction, &finished_messages)
            .await?
            .len();
        transaction.commit().await?;
        Ok(summary)
    }

    /// Computes the new state of a delivery from its outcome.
    fn transition(
        &self,
        delivery: &ClaimedDelivery,
        result: &DeliveryResult,
        now: OffsetDateTime,
    ) -> Transition {
        let mut transition = Transition {
            id: delivery.id,
            token: delivery.token,
            state: "pending",
            reply: result.outcome.reply().to_string(),
            remote_mta: result.remote_mta.clone(),
            next_attempt_at: now,
            delay_notices: delivery.delay_notices,
            notice: None,
        };
        let notify = delivery.notify.as_deref();
        match &result.outcome {
            Outcome::Delivered { .. } => {
                transition.state = "delivered";
                transition.notice = result
                    .success_action
                    .filter(|action| notify_requests(notify, *action));
            }
            Outcome::Permanent { .. } => {
                transition.state = "failed";
                transition.notice =
                    notify_requests(notify, DsnAction::Failed).then_some(DsnAction::Failed);
            }
            Outcome::Temporary { .. } => {
                let age = now - delivery.message.received_at;
                let age = Duration::try_from(age).unwrap_or_default();
                if age >= self.config.max_lifetime {
                    transition.state = "expired";
                    transition.notice =
                        notify_requests(notify, DsnAction::Failed).then_some(DsnAction::Failed);
                } else {
                    let failures = (delivery.attempts + 1).max(1) as u32;
                    transition.next_attempt_at = now + self.config.retry_interval(failures);
                    let passed = self
                        .config
                        .delay_notices
                        .iter()
                        .filter(|notice_age| age >= **notice_age)
                        .count() as i32;
                    if passed > delivery.delay_notices {
                        transition.delay_notices = passed;
                        transition.notice = notify_requests(notify, DsnAction::Delayed)
                            .then_some(DsnAction::Delayed);
                    }
                }
            }
        }
        transition
    }

    fn dsn_recipient(
        &self,
        delivery: &ClaimedDelivery,
        result: &DeliveryResult,
        transition: &Transition,
        action: DsnAction,
        now: OffsetDateTime,
    ) -> DsnRecipient {
        let permanent = !matches!(result.outcome, Outcome::Temporary { .. });
        let mut diagnostic = Some(transition.reply.clone());
        if transition.state == "expired" {
            diagnostic = Some(format!(
                "{} (gave up after {} in the queue)",
                transition.reply,
                humanize(self.config.max_lifetime)
            ));
        }
        DsnRecipient {
            final_recipient: delivery.address.clone(),
            original_recipient: delivery.orcpt.clone(),
            action,
            status: status_from_reply(&transition.reply, permanent),
            remote_mta: transition.remote_mta.clone(),
            diagnostic,
            last_attempt: Some(now),
            will_retry_until: (action == DsnAction::Delayed)
                .then(|| delivery.message.received_at + self.config.max_lifetime),
        }
    }

    /// Hands claimed deliveries back unattempted, due at once, where the
    /// lease is still ours.
    pub async fn release(&self, deliveries: &[&ClaimedDelivery]) -> Result<(), StoreError> {
        if deliveries.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = deliveries.iter().map(|d| d.id).collect();
        let tokens: Vec<i64> = deliveries.iter().map(|d| d.token).collect();
        let client = self.queue.pool().get().await?;
        client
            .execute(
                "UPDATE deliveries d
                    SET lease_owner = NULL, lease_until = NULL, next_attempt_at = now()
                   FROM unnest($1::bigint[], $2::bigint[]) AS u(id, token)
                  WHERE d.id = u.id AND d.lease_token = u.token AND d.lease_owner = $3
                    AND d.state = 'pending'",
                &[&ids, &tokens, &self.owner],
            )
            .await?;
        Ok(())
    }

    /// Backs a destination off after a failed connection attempt; the
    /// claimed deliveries are recorded separately.
    pub async fn defer_destination(
        &self,
        name: &str,
        failures: i32,
        error: &str,
    ) -> Result<(), StoreError> {
        let wait = self.config.retry_interval(failures.max(1) as u32);
        let client = self.queue.pool().get().await?;
        client
            .execute(
                "UPDATE destinations
                    SET failures = $2, last_error = $3, updated_at = now(),
                        next_attempt_at = now() + make_interval(secs => $4)
                  WHERE name = $1",
                &[&name, &failures, &error, &wait.as_secs_f64()],
            )
            .await?;
        Ok(())
    }

    /// Clears a destination's backoff after a connection succeeded.
    pub async fn reset_destination(&self, name: &str) -> Result<(), StoreError> {
        let client = self.queue.pool().get().await?;
        client
            .execute(
                "UPDATE destinations SET failures = 0, last_error = NULL, updated_at = now(),
                        next_attempt_at = now()
                  WHERE name = $1 AND failures > 0",
                &[&name],
            )
            .await?;
        Ok(())
    }
}

/// Deletes those of `messages` that have no queued recipient and no pending
/// delivery left; returns the deleted ids. Runs inside the caller's
/// transaction, after the statements that finished their work.
pub async fn complete_messages(
    transaction: &deadpool_postgres::Transaction<'_>,
    messages: &[QueueId],
) -> Result<Vec<QueueId>, tokio_postgres::Error> {
    if messages.is_empty() {
        return Ok(Vec::new());
    }
    // The lock comes first and the check in a separate statement: the
    // check's snapshot then sees every transaction that held the lock.
    let lock = transaction
        .prepare_cached("SELECT id FROM messages WHERE id = ANY($1) ORDER BY id FOR UPDATE")
        .await?;
    transaction.query(&lock, &[&messages]).await?;
    let delete = transaction
        .prepare_cached(
            "DELETE FROM messages m
              WHERE m.id = ANY($1)
                AND NOT EXISTS (SELECT 1 FROM recipients r
                                 WHERE r.message_id = m.id AND r.state = 'queued')
                AND NOT EXISTS (SELECT 1 FROM deliveries d
                                 WHERE d.message_id = m.id AND d.state = 'pending')
          RETURNING m.id",
        )
        .await?;
    let rows = transaction.query(&delete, &[&messages]).await?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// Writes the transitions where the lease still matches; returns the ids
/// written.
async fn update_deliveries(
    transaction: &deadpool_postgres::Transaction<'_>,
    owner: &str,
    transitions: &[Transition],
) -> Result<std::collections::HashSet<i64>, tokio_postgres::Error> {
    let ids: Vec<i64> = transitions.iter().map(|t| t.id).collect();
    let tokens: Vec<i64> = transitions.iter().map(|t| t.token).collect();
    let states: Vec<&str> = transitions.iter().map(|t| t.state).collect();
    let replies: Vec<&str> = transitions.iter().map(|t| t.reply.as_str()).collect();
    let remote: Vec<Option<&str>> = transitions
        .iter()
        .map(|t| t.remote_mta.as_deref())
        .collect();
    let next: Vec<OffsetDateTime> = transitions.iter().map(|t| t.next_attempt_at).collect();
    let notices: Vec<i32> = transitions.iter().map(|t| t.delay_notices).collect();
    let statement = transaction
        .prepare_cached(
            "UPDATE deliveries d
                SET state = u.state, last_reply = u.reply, remote_mta = u.remote_mta,
                    next_attempt_at = u.next_attempt_at, delay_notices = u.delay_notices,
                    attempts = d.attempts + 1, last_attempt_at = now(),
                    lease_owner = NULL, lease_until = NULL
               FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[],
                           $6::timestamptz[], $7::int[])
                    AS u(id, token, state, reply, remote_mta, next_attempt_at, delay_notices)
              WHERE d.id = u.id AND d.lease_token = u.token AND d.lease_owner = $8
                AND d.state = 'pending'
          RETURNING d.id",
        )
        .await?;
    let rows = transaction
        .query(
            &statement,
            &[
                &ids, &tokens, &states, &replies, &remote, &next, &notices, &owner,
            ],
        )
        .await?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// A duration in the largest whole unit, e.g. "5 days" or "90 minutes".
fn humanize(duration: Duration) -> String {
    let seconds = duration.as_secs();
    for (unit, name) in [(86_400, "day"), (3600, "hour"), (60, "minute")] {
        if seconds >= unit && seconds.is_multiple_of(unit) {
            let count = seconds / unit;
            return format!("{count} {name}{}", if count == 1 { "" } else { "s" });
        }
    }
    format!("{seconds} seconds")
}

/// What [`bounce_and_delete`] did.
#[derive(Clone, Debug, Default)]
pub struct BounceOutcome {
    pub deleted: Vec<QueueId>,
    pub missing: Vec<QueueId>,
    /// Notifications spooled, one per message and reverse-path.
    pub notifications: usize,
    /// Recipients named in them.
    pub bounced: usize,
}

/// Deletes messages after telling their senders, in one failure
/// notification per message and reverse-path, that every recipient not yet
/// delivered was not. Each message is handled in its own transaction.
pub async fn bounce_and_delete(
    queue: &Queue,
    settings: &NotificationSettings,
    ids: &[QueueId],
) -> Result<BounceOutcome, StoreError> {
    const DIAGNOSTIC: &str = "550 5.0.0 message deleted from the queue by the operator";
    let mut outcome = BounceOutcome::default();
    let mut client = queue.pool().get().await?;
    for id in ids {
        let transaction = client.transaction().await?;
        let Some(message) = transaction
            .query_opt(
                "SELECT sender FROM messages WHERE id = $1 FOR UPDATE",
                &[id],
            )
            .await?
        else {
            outcome.missing.push(*id);
            continue;
        };
        let sender: String = message.get(0);
        // Deliveries not yet made, and recipients not yet routed, each with
        // the reverse-path its notification goes to.
        let rows = transaction
            .query(
                "SELECT b.sender, d.address, d.orcpt, d.notify
                   FROM deliveries d JOIN delivery_batches b ON b.id = d.batch_id
                  WHERE d.message_id = $1 AND d.state = 'pending'
                 UNION ALL
                 SELECT $2, r.address, r.orcpt, r.notify
                   FROM recipients r
                  WHERE r.message_id = $1 AND r.state = 'queued'",
                &[id, &sender],
            )
            .await?;
        let now = OffsetDateTime::now_utc();
        let mut by_sender: BTreeMap<String, Vec<DsnRecipient>> = BTreeMap::new();
        for row in &rows {
            let notify: Option<String> = row.get(3);
            if !notify_requests(notify.as_deref(), DsnAction::Failed) {
                continue;
            }
            by_sender.entry(row.get(0)).or_default().push(DsnRecipient {
                final_recipient: row.get(1),
                original_recipient: row.get(2),
                action: DsnAction::Failed,
                status: "5.0.0".to_string(),
                remote_mta: None,
                diagnostic: Some(DIAGNOSTIC.to_string()),
                last_attempt: Some(now),
                will_retry_until: None,
            });
        }
        for (to, recipients) in &by_sender {
            let spooled = spool_notification(&transaction, settings, *id, to, recipients)
                .await
                .map_err(|error| StoreError::Notification(error.to_string()))?;
            if spooled.is_some() {
                outcome.notifications += 1;
                outcome.bounced += recipients.len();
            }
        }
        transaction
            .execute("DELETE FROM messages WHERE id = $1", &[id])
            .await?;
        transaction.commit().await?;
        tracing::info!(queue_id = %id.simple(), bounced = rows.len(), "message bounced and deleted by the operator");
        outcome.deleted.push(*id);
    }
    Ok(outcome)
}
