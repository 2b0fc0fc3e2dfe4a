//! Operator commands on the spool: retry, hold, release, delete and queue
//! statistics, the counterparts of Postfix's `postqueue -f`/`-i`,
//! `postsuper -h`/`-H`/`-d` and `qshape`.
//!
//! Every command is safe while listeners, routers and delivery workers run,
//! because its statements are short. Work on the whole queue goes in
//! batches of [`ADMIN_BATCH_SIZE`] rows, each in its own transaction. No
//! command changes a delivery whose lease is live (`lease_until > now()`),
//! except [`Queue::delete`], which removes a message even while one of its
//! deliveries is in progress. The worker's later update then matches no row
//! and is dropped, but the remote side may still have received the message.
//!
//! Holds are flags that delivery workers check before a claim.
//! `messages.held` stops every delivery of a message, and
//! `destinations.held` stops every delivery to a destination. A delivery
//! already claimed finishes its attempt.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use time::OffsetDateTime;

use super::{Queue, QueueError, QueueId, json};

/// Channel on which delivery workers listen for a wake-up. A notification
/// is only a hint, because workers also poll.
pub const DELIVERY_WAKEUP_CHANNEL: &str = "wsmtp_delivery";

/// Rows changed per statement when a command covers the whole queue.
pub const ADMIN_BATCH_SIZE: i64 = 1000;

/// Upper bounds, in minutes, of the age buckets of [`DestinationStats`].
/// The first bucket counts mail younger than 5 minutes, the next 5 to 10
/// minutes, and the last one 1280 minutes or older, as qshape's defaults do.
pub const AGE_BUCKET_MINUTES: [u32; 9] = [5, 10, 20, 40, 80, 160, 320, 640, 1280];

/// Kinds of destination names, the part before the first `:`.
const DESTINATION_KINDS: &[&str] = &["domain", "group", "maildir", "lmtp", "mx"];

/// Selection of messages or destinations for a retry, hold or release.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// These messages.
    Messages(Vec<QueueId>),
    /// One destination: a full name or a bare domain or group name, see
    /// [`destination_names`].
    Destination(String),
    /// Every message, and for retry and release every destination.
    All,
}

/// Scheduling state of one destination (a row of `destinations`).
#[derive(Clone, Debug, Serialize)]
pub struct DestinationState {
    pub name: String,
    /// Held by an operator: no delivery to it starts until it is released.
    pub held: bool,
    /// Consecutive connection attempts that failed.
    pub failures: i32,
    /// No connection is attempted before this time.
    #[serde(serialize_with = "json::time")]
    pub next_attempt_at: OffsetDateTime,
    pub last_error: Option<String>,
    #[serde(serialize_with = "json::time")]
    pub updated_at: OffsetDateTime,
}

impl DestinationState {
    /// Reads the columns `name, held, failures, next_attempt_at, last_error,
    /// updated_at`, in this order.
    pub(crate) fn from_row(row: &tokio_postgres::Row) -> DestinationState {
        DestinationState {
            name: row.get(0),
            held: row.get(1),
            failures: row.get(2),
            next_attempt_at: row.get(3),
            last_error: row.get(4),
            updated_at: row.get(5),
        }
    }
}

/// Result of [`Queue::retry`].
#[derive(Clone, Debug, Default)]
pub struct RetryOutcome {
    /// Deliveries whose next attempt was moved to now.
    pub deliveries: u64,
    /// Destination rows whose next attempt was moved to now (their failure
    /// count is kept).
    pub destinations: Vec<String>,
    /// Given queue ids that are not in the queue.
    pub missing: Vec<QueueId>,
    /// Pending deliveries left alone because a worker holds a live lease.
    pub leased: i64,
    /// Messages with pending deliveries that stay held.
    pub held_messages: i64,
    /// Destinations of the selected pending deliveries that are held, or
    /// that stay backed off because only `--destination` or `--all` reset
    /// a destination.
    pub blocked_destinations: Vec<DestinationState>,
}

/// Result of [`Queue::hold`].
#[derive(Clone, Debug, Default)]
pub struct HoldOutcome {
    /// Messages that were not held before.
    pub messages: u64,
    /// Given messages that were held already.
    pub already_held: u64,
    /// Destinations held now, including any held before.
    pub destinations: Vec<String>,
    /// Given queue ids that are not in the queue.
    pub missing: Vec<QueueId>,
    /// Deliveries in progress under a live lease, which finish their attempt.
    pub in_flight: i64,
}

/// Result of [`Queue::release`].
#[derive(Clone, Debug, Default)]
pub struct ReleaseOutcome {
    /// Messages that were held and are released now.
    pub messages: u64,
    /// Destinations that were held and are released now.
    pub destinations: Vec<String>,
    /// Deliveries of the released messages and destinations whose next
    /// attempt was moved to now.
    pub deliveries: u64,
    /// Given queue ids that are not in the queue.
    pub missing: Vec<QueueId>,
    /// Destinations of the released messages that still wait: held, or
    /// backed off after failed connections.
    pub blocked_destinations: Vec<DestinationState>,
}

/// Result of [`Queue::delete`].
#[derive(Clone, Debug, Default)]
pub struct DeleteOutcome {
    /// Messages deleted.
    pub deleted: Vec<QueueId>,
    /// Given queue ids that are not in the queue.
    pub missing: Vec<QueueId>,
    /// Deliveries (and recipients being routed) that were under a live
    /// lease when their message was deleted. Such a delivery may still
    /// reach its destination.
    pub in_flight: i64,
}

/// Pending deliveries by what they wait for. Every pending delivery is
/// counted in exactly one of `due`, `deferred`, `leased` and `held`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DeliveryCounts {
    pub pending: i64,
    /// Claimable now.
    pub due: i64,
    /// Waiting for the delivery's or its destination's next attempt time.
    pub deferred: i64,
    /// Under a live lease: a worker is delivering them.
    pub leased: i64,
    /// Stopped by a hold on the message or the destination.
    pub held: i64,
}

impl DeliveryCounts {
    fn add(&mut self, other: &DeliveryCounts) {
        self.pending += other.pending;
        self.due += other.due;
        self.deferred += other.deferred;
        self.leased += other.leased;
        self.held += other.held;
    }
}

/// Pending deliveries of one destination, with its scheduling state.
#[derive(Clone, Debug, Serialize)]
pub struct DestinationStats {
    pub name: String,
    pub deliveries: DeliveryCounts,
    /// Receipt time of the oldest message with a pending delivery here.
    #[serde(serialize_with = "json::optional_time")]
    pub oldest_received_at: Option<OffsetDateTime>,
    /// Pending deliveries by message age, in the buckets of
    /// [`AGE_BUCKET_MINUTES`] (one more entry than that array).
    pub age_buckets: Vec<i64>,
    /// The destination row; None until a router or the upkeep writes it.
    pub state: Option<DestinationState>,
}

/// Summary of the queue for `queue stats`.
#[derive(Clone, Debug, Serialize)]
pub struct QueueStats {
    /// Database time at which the counts were taken.
    #[serde(serialize_with = "json::time")]
    pub now: OffsetDateTime,
    /// Messages still being received and not held.
    pub messages_receiving: i64,
    /// Messages received completely and not held.
    pub messages_ready: i64,
    /// Messages held by an operator.
    pub messages_held: i64,
    #[serde(serialize_with = "json::optional_time")]
    pub oldest_received_at: Option<OffsetDateTime>,
    /// Envelope recipients that no router has resolved yet.
    pub recipients_awaiting_routing: i64,
    pub deliveries: DeliveryCounts,
    /// Rows in `destinations`.
    pub destinations: i64,
    /// Destinations whose next attempt time is in the future.
    pub destinations_backed_off: i64,
    pub destinations_held: i64,
    /// Destinations by pending deliveries, most first, then held
    /// destinations without pending deliveries; at most the `top` given.
    pub top_destinations: Vec<DestinationStats>,
}

/// Returns the destination names that `name` selects. A full name such as
/// `domain:example.org` or `group:legacy` selects itself (the domain of a
/// `domain:` name is converted to a lowercase A-label). A bare name selects
/// both `domain:NAME` and `group:NAME`.
pub fn destination_names(name: &str) -> Result<Vec<String>, QueueError> {
    let name = name.trim();
    if name.is_empty() {
        return Err(QueueError::InvalidArgument(
            "the destination name is empty".to_owned(),
        ));
    }
    if let Some((kind, rest)) = name.split_once(':')
        && DESTINATION_KINDS.contains(&kind)
    {
        if rest.is_empty() {
            return Err(QueueError::InvalidArgument(format!(
                "destination {name:?} has no name after \"{kind}:\""
            )));
        }
        if kind == "domain" {
            return Ok(vec![format!("domain:{}", normalize_domain(rest))]);
        }
        return Ok(vec![name.to_owned()]);
    }
    Ok(vec![
        format!("domain:{}", normalize_domain(name)),
        format!("group:{name}"),
    ])
}

/// True when `name` is a full destination name, with a known kind prefix.
fn is_full_destination_name(name: &str) -> bool {
    name.trim()
        .split_once(':')
        .is_some_and(|(kind, _)| DESTINATION_KINDS.contains(&kind))
}

/// Returns the lowercase A-label form of a domain, without a trailing dot,
/// as the router writes it into destination names.
fn normalize_domain(domain: &str) -> String {
    let domain = domain.trim_end_matches('.');
    idna::domain_to_ascii(domain).unwrap_or_else(|_| domain.to_ascii_lowercase())
}

/// Selection of deliveries: null members select everything.
#[derive(Default)]
struct Scope {
    messages: Option<Vec<QueueId>>,
    destinations: Option<Vec<String>>,
}

/// Returns `ids` without repeats, in their first order.
fn unique(ids: &[QueueId]) -> Vec<QueueId> {
    let mut seen = BTreeSet::new();
    ids.iter().copied().filter(|id| seen.insert(*id)).collect()
}

fn no_ids_given() -> QueueError {
    QueueError::InvalidArgument("no queue ids given".to_owned())
}

impl Queue {
    /// Makes pending deliveries without a live lease due now: of the given
    /// messages, of one destination (and resets that destination's next
    /// attempt time, keeping its failure count), or of the whole queue (and
    /// every destination). Then sends a wake-up on
    /// [`DELIVERY_WAKEUP_CHANNEL`].
    pub async fn retry(&self, target: &Target) -> Result<RetryOutcome, QueueError> {
        let mut outcome = RetryOutcome::default();
        let scope = match target {
            Target::Messages(ids) => {
                let (found, missing) = self.existing_messages(ids).await?;
                outcome.missing = missing;
                Scope {
                    messages: Some(found),
                    destinations: None,
                }
            }
            Target::Destination(name) => {
                let names = destination_names(name)?;
                outcome.destinations = self.make_destinations_due(Some(&names)).await?;
                Scope {
                    messages: None,
                    destinations: Some(names),
                }
            }
            Target::All => {
                outcome.destinations = self.make_destinations_due(None).await?;
                Scope::default()
            }
        };
        outcome.deliveries = self.make_deliveries_due(&scope).await?;

        let (leased, held_messages) = self.leased_and_held(&scope).await?;
        outcome.leased = leased;
        outcome.held_messages = held_messages;
        outcome.blocked_destinations = self.blocked_destinations(&scope).await?;
        self.wake_delivery().await?;
        tracing::info!(
            selection = ?target,
            deliveries = outcome.deliveries,
            destinations = outcome.destinations.len(),
            "deliveries made due by an operator"
        );
        Ok(outcome)
    }

    /// Holds the given messages, one destination, or every message. A held
    /// destination that has no row yet gets one when given by its full
    /// name, so mail for it is held from its arrival on.
    pub async fn hold(&self, target: &Target) -> Result<HoldOutcome, QueueError> {
        const ACTION: &str = "hold messages";
        let mut outcome = HoldOutcome::default();
        let scope = match target {
            Target::Messages(ids) => {
                let ids = unique(ids);
                if ids.is_empty() {
                    return Err(no_ids_given());
                }
                let mut client = self.client(ACTION).await?;
                let tx = client
                    .transaction()
                    .await
                    .map_err(|e| QueueError::from_pg(ACTION, e))?;
                let found: Vec<QueueId> = tx
                    .query("SELECT id FROM messages WHERE id = ANY($1)", &[&ids])
                    .await
                    .map_err(|e| QueueError::from_pg(ACTION, e))?
                    .iter()
                    .map(|row| row.get(0))
                    .collect();
                let changed = tx
                    .execute(
                        "UPDATE messages SET held = true WHERE id = ANY($1) AND NOT held",
                        &[&ids],
                    )
                    .await
                    .map_err(|e| QueueError::from_pg(ACTION, e))?;
                tx.commit()
                    .await
                    .map_err(|e| QueueError::from_pg(ACTION, e))?;
                outcome.messages = changed;
                outcome.already_held = (found.len() as u64).saturating_sub(changed);
                outcome.missing = ids.into_iter().filter(|id| !found.contains(id)).collect();
                Scope {
                    messages: Some(found),
                    destinations: None,
                }
            }
            Target::Destination(name) => {
                outcome.destinations = self.hold_destination(name).await?;
                Scope {
                    messages: None,
                    destinations: Some(outcome.destinations.clone()),
                }
            }
            Target::All => {
                outcome.messages = self.set_held_batched(true, |_| {}).await?;
                Scope::default()
            }
        };
        outcome.in_flight = self.leased_and_held(&scope).await?.0;
        tracing::info!(
            selection = ?target,
            messages = outcome.messages,
            destinations = ?outcome.destinations,
            "held by an operator"
        );
        Ok(outcome)
    }

    /// Releases held messages or destinations and makes their pending
    /// deliveries without a live lease due now. A released destination's
    /// next attempt time is moved to now as well; its failure count stays.
    /// [`Target::All`] releases every held message and destination. Sends a
    /// wake-up on [`DELIVERY_WAKEUP_CHANNEL`].
    pub async fn release(&self, target: &Target) -> Result<ReleaseOutcome, QueueError> {
        const ACTION: &str = "release messages";
        let mut outcome = ReleaseOutcome::default();
        match target {
            Target::Messages(ids) => {
                let (found, missing) = self.existing_messages(ids).await?;
                outcome.missing = missing;
                let client = self.client(ACTION).await?;
                let released: Vec<QueueId> = client
                    .query(
                        "UPDATE messages SET held = false WHERE id = ANY($1) AND held RETURNING id",
                        &[&found],
                    )
                    .await
                    .map_err(|e| QueueError::from_pg(ACTION, e))?
                    .iter()
                    .map(|row| row.get(0))
                    .collect();
                drop(client);
                outcome.messages = released.len() as u64;
                outcome.deliveries = self.make_message_deliveries_due(released).await?;
                let scope = Scope {
                    messages: Some(found),
                    destinations: None,
                };
                outcome.blocked_destinations = self.blocked_destinations(&scope).await?;
            }
            Target::Destination(name) => {
                let names = destination_names(name)?;
                outcome.destinations = self.release_destinations(Some(&names)).await?;
                outcome.deliveries = self
                    .make_destination_deliveries_due(&outcome.destinations)
                    .await?;
            }
            Target::All => {
                let mut released = Vec::new();
                outcome.messages = self
                    .set_held_batched(false, |batch| released.extend_from_slice(batch))
                    .await?;
                for chunk in released.chunks(ADMIN_BATCH_SIZE as usize) {
                    outcome.deliveries += self.make_message_deliveries_due(chunk.to_vec()).await?;
                }
                outcome.destinations = self.release_destinations(None).await?;
                outcome.deliveries += self
                    .make_destination_deliveries_due(&outcome.destinations)
                    .await?;
            }
        }
        self.wake_delivery().await?;
        tracing::info!(
            selection = ?target,
            messages = outcome.messages,
            destinations = ?outcome.destinations,
            deliveries = outcome.deliveries,
            "released by an operator"
        );
        Ok(outcome)
    }

    /// Deletes messages with their body, recipients and deliveries, without
    /// notifying anyone. A message is deleted even while a worker delivers
    /// it; [`DeleteOutcome::in_flight`] counts such deliveries.
    pub async fn delete(&self, ids: &[QueueId]) -> Result<DeleteOutcome, QueueError> {
        const ACTION: &str = "delete messages";
        let ids = unique(ids);
        if ids.is_empty() {
            return Err(no_ids_given());
        }
        let client = self.client(ACTION).await?;
        // One statement per message keeps each transaction short however
        // large the bodies are. RETURNING reads the deliveries before the
        // cascade removes them at the end of the statement.
        let statement = client
            .prepare_cached(
                "DELETE FROM messages m WHERE m.id = $1
                 RETURNING (SELECT count(*) FROM deliveries d
                             WHERE d.message_id = m.id AND d.state = 'pending'
                               AND d.lease_until > now())
                         + (SELECT count(*) FROM recipients r
                             WHERE r.message_id = m.id AND r.state = 'queued'
                               AND r.lease_until > now())",
            )
            .await
            .map_err(|e| QueueError::from_pg(ACTION, e))?;
        let mut outcome = DeleteOutcome::default();
        for id in ids {
            let row = client
                .query_opt(&statement, &[&id])
                .await
                .map_err(|e| QueueError::from_pg(ACTION, e))?;
            match row {
                Some(row) => {
                    let in_flight: i64 = row.get(0);
                    tracing::info!(queue_id = %id.simple(), in_flight, "message deleted by an operator");
                    outcome.in_flight += in_flight;
                    outcome.deleted.push(id);
                }
                None => outcome.missing.push(id),
            }
        }
        Ok(outcome)
    }

    /// Counts messages, recipients awaiting routing and pending deliveries,
    /// and returns the `top` destinations by pending deliveries (all of them
    /// when `top` is 0 or less). One read-only snapshot.
    pub async fn stats(&self, top: i64) -> Result<QueueStats, QueueError> {
        const ACTION: &str = "count the queue";
        let mut client = self.client(ACTION).await?;
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(|e| QueueError::from_pg(ACTION, e))?;

        let totals = tx
            .query_one(
                "SELECT now(),
                        count(*) FILTER (WHERE state = 'receiving' AND NOT held),
                        count(*) FILTER (WHERE state = 'ready' AND NOT held),
                        count(*) FILTER (WHERE held),
                        min(received_at),
                        (SELECT count(*) FROM recipients WHERE state = 'queued')
                   FROM messages",
                &[],
            )
            .await
            .map_err(|e| QueueError::from_pg(ACTION, e))?;

        let thresholds: Vec<f64> = AGE_BUCKET_MINUTES.iter().map(|m| f64::from(*m)).collect();
        let delivery_rows = tx
            .query(
                "SELECT c.destination, c.bucket, count(*),
                        count(*) FILTER (WHERE c.class = 'due'),
                        count(*) FILTER (WHERE c.class = 'deferred'),
                        count(*) FILTER (WHERE c.class = 'leased'),
                        count(*) FILTER (WHERE c.class = 'held'),
                        min(c.received_at)
                   FROM (SELECT d.destination, m.received_at,
                                CASE WHEN d.lease_until > now() THEN 'leased'
                                     WHEN m.held OR coalesce(t.held, false) THEN 'held'
                                     WHEN d.next_attempt_at > now()
                                          OR t.next_attempt_at > now() THEN 'deferred'
                                     ELSE 'due'
                                END AS class,
                                width_bucket(extract(epoch FROM now() - m.received_at)::float8 / 60,
                                             $1::float8[]) AS bucket
                           FROM deliveries d
                           JOIN messages m ON m.id = d.message_id
                           LEFT JOIN destinations t ON t.name = d.destination
                          WHERE d.state = 'pending') c
                  GROUP BY c.destination, c.bucket",
                &[&thresholds],
            )
            .await
            .map_err(|e| QueueError::from_pg(ACTION, e))?;

        let destination_rows = tx
            .query(
                "SELECT name, held, failures, next_attempt_at, last_error, updated_at,
                        next_attempt_at > now()
                   FROM destinations",
                &[],
            )
            .await
            .map_err(|e| QueueError::from_pg(ACTION, e))?;
        tx.commit()
            .await
            .map_err(|e| QueueError::from_pg(ACTION, e))?;

        let mut per_destination: BTreeMap<String, DestinationStats> = BTreeMap::new();
        for row in &delivery_rows {
            let name: String = row.get(0);
            let bucket: i32 = row.get(1);
            let counts = DeliveryCounts {
                pending: row.get(2),
                due: row.get(3),
                deferred: row.get(4),
                leased: row.get(5),
                held: row.get(6),
            };
            let oldest: Option<OffsetDateTime> = row.get(7);
            let entry = per_destination
                .entry(name.clone())
                .or_insert_with(|| DestinationStats {
                    name,
                    deliveries: DeliveryCounts::default(),
                    oldest_received_at: None,
                    age_buckets: vec![0; AGE_BUCKET_MINUTES.len() + 1],
                    state: None,
                });
            entry.deliveries.add(&counts);
            let bucket = usize::try_from(bucket)
                .unwrap_or(0)
                .min(AGE_BUCKET_MINUTES.len());
            entry.age_buckets[bucket] += counts.pending;
            entry.oldest_received_at = match (entry.oldest_received_at, oldest) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }

        let mut deliveries = DeliveryCounts::default();
        for stats in per_destination.values() {
            deliveries.add(&stats.deliveries);
        }
        let mut backed_off = 0;
        let mut held = 0;
        for row in &destination_rows {
            let state = DestinationState::from_row(row);
            let in_backoff: bool = row.get(6);
            backed_off += i64::from(in_backoff);
            held += i64::from(state.held);
            match per_destination.get_mut(&state.name) {
                Some(stats) => stats.state = Some(state),
                None if state.held => {
                    per_destination.insert(
                        state.name.clone(),
                        DestinationStats {
                            name: state.name.clone(),
                            deliveries: DeliveryCounts::default(),
                            oldest_received_at: None,
                            age_buckets: vec![0; AGE_BUCKET_MINUTES.len() + 1],
                            state: Some(state),
                        },
                    );
                }
                None => {}
            }
        }

        let mut top_destinations: Vec<DestinationStats> = per_destination.into_values().collect();
        top_destinations.sort_by(|a, b| {
            b.deliveries
                .pending
                .cmp(&a.deliveries.pending)
                .then_with(|| a.name.cmp(&b.name))
        });
        if top > 0 {
            top_destinations.truncate(usize::try_from(top).unwrap_or(usize::MAX));
        }

        Ok(QueueStats {
            now: totals.get(0),
            messages_receiving: totals.get(1),
            messages_ready: totals.get(2),
            messages_held: totals.get(3),
            oldest_received_at: totals.get(4),
            recipients_awaiting_routing: totals.get(5),
            deliveries,
            destinations: destination_rows.len() as i64,
            destinations_backed_off: backed_off,
            destinations_held: held,
            top_destinations,
        })
    }

    /// Splits `ids` into those in the queue and those missing, both without
    /// repeats.
    async fn existing_messages(
        &self,
        ids: &[QueueId],
    ) -> Result<(Vec<QueueId>, Vec<QueueId>), QueueError> {
        const ACTION: &str = "look up messages";
        let ids = unique(ids);
        if ids.is_empty() {
            return Err(no_ids_given());
        }
        let client = self.client(ACTION).await?;
        let found: BTreeSet<QueueId> = client
            .query("SELECT id FROM messages WHERE id = ANY($1)", &[&ids])
            .await
            .map_err(|e| QueueError::from_pg(ACTION, e))?
            .iter()
            .map(|row| row.get(0))
            .collect();
        Ok(ids.into_iter().partition(|id| found.contains(id)))
    }

    /// Moves the next attempt of pending deliveries in `scope` that are
    /// neither leased nor already due to now, in batches; returns how many.
    async fn make_deliveries_due(&self, scope: &Scope) -> Result<u64, QueueError> {
        const ACTION: &str = "make deliveries due";
        if scope.messages.as_ref().is_some_and(Vec::is_empty)
            || scope.destinations.as_ref().is_some_and(Vec::is_empty)
        {
            return Ok(0);
        }

        // Batches walk the ids upwards, so each row is looked at once. The
        // UPDATE repeats the conditions: for a row that a worker claimed
        // meanwhile, PostgreSQL rechecks them on the new row version, so a
        // fresh lease is left alone. The statement is not cached, because a
        // cached generic plan could not drop the conditions whose parameter
        // is null.
        const STATEMENT: &str = "WITH picked AS (
             SELECT id FROM deliveries
              WHERE state = 'pending' AND next_attempt_at > now()
                AND (lease_until IS NULL OR lease_until <= now())
                AND ($1::uuid[] IS NULL OR message_id = ANY($1))
                AND ($2::text[] IS NULL OR destination = ANY($2))
                AND id > $3
              ORDER BY id
              LIMIT $4),
         updated AS (
             UPDATE deliveries d SET next_attempt_at = now()
               FROM picked
              WHERE d.id = picked.id AND d.state = 'pending'
                AND d.next_attempt_at > now()
                AND (d.lease_until IS NULL OR d.lease_until <= now())
             RETURNING d.id)
         SELECT (SELECT count(*) FROM picked),
                (SELECT max(id) FROM picked),
                (SELECT count(*) FROM updated)";
        let client = self.client(ACTION).await?;
        let mut after: i64 = 0;
        let mut made_due: u64 = 0;
        loop {
            let row = client
                .query_one(
                    STATEMENT,
                    &[
                        &scope.messages,
                        &scope.destinations,
                        &after,
                        &ADMIN_BATCH_SIZE,
                    ],
                )
                .await
                .map_err(|e| QueueError::from_pg(ACTION, e))?;
            let picked: i64 = row.get(0);
            let updated: i64 = row.get(2);
            made_due += updated as u64;
            match row.get::<_, Option<i64>>(1) {
                Some(last) if picked >= ADMIN_BATCH_SIZE => after = last,
                _ => break,
            }
        }
        Ok(made_due)
    }

    async fn make_message_deliveries_due(&self, ids: Vec<QueueId>) -> Result<u64, QueueError> {
        self.make_deliveries_due(&Scope {
            messages: Some(ids),
            destinations: None,
        })
        .await
    }

    async fn make_destination_deliveries_due(&self, names: &[String]) -> Result<u64, QueueError> {
        self.make_deliveries_due(&Scope {
            messages: None,
            destinations: Some(names.to_vec()),
        })
        .await
    }

    /// Moves the next attempt time of the named destinations (every
    /// destination for None) to now where it lies ahead. The failure count
    /// stays. Returns the names changed.
    async fn make_destinations_due(
        &self,
        names: Option<&[String]>,
    ) -> Result<Vec<String>, QueueError> {
        const ACTION: &str = "make destinations due";
        let client = self.client(ACTION).await?;
        let rows = client
            .query(
                "UPDATE destinations SET next_attempt_at = now(), updated_at = now()
                  WHERE ($1::text[] IS NULL OR name = ANY($1)) AND next_attempt_at > now()
                 RETURNING name",
                &[&names],
            )
            .await
            .map_err(|e| QueueError::from_pg(ACTION, e))?;
        let mut changed: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
        changed.sort();
        Ok(changed)
    }

    /// Holds the destinations that `name` selects. A full name is held even
    /// without a row or queued mail. A bare name must match a destination
    /// that has a row or pending deliveries.
    async fn hold_destination(&self, name: &str) -> Result<Vec<String>, QueueError> {
        const ACTION: &str = "hold a destination";
        let names = destination_names(name)?;
        let client = self.client(ACTION).await?;
        let names: Vec<String> = if is_full_destination_name(name) {
            names
        } else {
            let rows = client
                .query(
                    "SELECT name FROM destinations WHERE name = ANY($1)
                     UNION
                     SELECT DISTINCT destination FROM deliveries
                      WHERE state = 'pending' AND destination = ANY($1)",
                    &[&names],
                )
                .await
                .map_err(|e| QueueError::from_pg(ACTION, e))?;
            if rows.is_empty() {
                return Err(QueueError::InvalidArgument(format!(
                    "no destination named {name:?} has queued mail; give the full name, \
                     such as domain:{name} or group:{name}, to hold it in advance"
                )));
            }
            rows.iter().map(|row| row.get(0)).collect()
        };
        let rows = client
            .query(
                "INSERT INTO destinations (name, held)
                 SELECT n, true FROM unnest($1::text[]) AS n ORDER BY n
                 ON CONFLICT (name) DO UPDATE SET held = true, updated_at = now()
                 RETURNING name",
                &[&names],
            )
            .await
            .map_err(|e| QueueError::from_pg(ACTION, e))?;
        let mut held: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
        held.sort();
        Ok(held)
    }

    /// Releases the named held destinations (every held destination for
    /// None) and moves their next attempt time to now where it lies ahead.
    /// Returns the names released.
    async fn release_destinations(
        &self,
        names: Option<&[String]>,
    ) -> Result<Vec<String>, QueueError> {
        const ACTION: &str = "release destinations";
        let client = self.client(ACTION).await?;
        let rows = client
            .query(
                "UPDATE destinations
                    SET held = false, next_attempt_at = least(next_attempt_at, now()),
                        updated_at = now()
                  WHERE ($1::text[] IS NULL OR name = ANY($1)) AND held
                 RETURNING name",
                &[&names],
            )
            .await
            .map_err(|e| QueueError::from_pg(ACTION, e))?;
        let mut released: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
        released.sort();
        Ok(released)
    }

    /// Sets `held` on every message where it differs, in batches; calls
    /// `changed` with the ids of each batch and returns how many changed.
    async fn set_held_batched(
        &self,
        held: bool,
        mut changed: impl FnMut(&[QueueId]),
    ) -> Result<u64, QueueError> {
        const ACTION: &str = "change the hold of all messages";
        const STATEMENT: &str = "WITH picked AS (
             SELECT id FROM messages
              WHERE held <> $1 AND id > $2
              ORDER BY id
              LIMIT $3),
         updated AS (
             UPDATE messages m SET held = $1
               FROM picked
              WHERE m.id = picked.id AND m.held <> $1
             RETURNING m.id)
         SELECT (SELECT count(*) FROM picked),
                (SELECT id FROM picked ORDER BY id DESC LIMIT 1),
                ARRAY(SELECT id FROM updated)";
        let client = self.client(ACTION).await?;
        // Queue ids are never nil, so the walk starts below every id.
        let mut after = QueueId::nil();
        let mut total: u64 = 0;
        loop {
            let row = client
                .query_one(STATEMENT, &[&held, &after, &ADMIN_BATCH_SIZE])
                .await
                .map_err(|e| QueueError::from_pg(ACTION, e))?;
            let picked: i64 = row.get(0);
            let updated: Vec<QueueId> = row.get(2);
            total += updated.len() as u64;
            changed(&updated);
            match row.get::<_, Option<QueueId>>(1) {
                Some(last) if picked >= ADMIN_BATCH_SIZE => after = last,
                _ => break,
            }
        }
        Ok(total)
    }

    /// Counts, in `scope`, pending deliveries under a live lease and
    /// messages with pending deliveries that are held.
    async fn leased_and_held(&self, scope: &Scope) -> Result<(i64, i64), QueueError> {
        const ACTION: &str = "count leased deliveries";
        let client = self.client(ACTION).await?;
        let row = client
            .query_one(
                "SELECT count(*) FILTER (WHERE d.lease_until > now()),
                        count(DISTINCT d.message_id) FILTER (WHERE m.held)
                   FROM deliveries d JOIN messages m ON m.id = d.message_id
                  WHERE d.state = 'pending'
                    AND ($1::uuid[] IS NULL OR d.message_id = ANY($1))
                    AND ($2::text[] IS NULL OR d.destination = ANY($2))",
                &[&scope.messages, &scope.destinations],
            )
            .await
            .map_err(|e| QueueError::from_pg(ACTION, e))?;
        Ok((row.get(0), row.get(1)))
    }

    /// Returns the destinations of pending deliveries in `scope` that are
    /// held or whose next attempt time lies ahead.
    async fn blocked_destinations(
        &self,
        scope: &Scope,
    ) -> Result<Vec<DestinationState>, QueueError> {
        const ACTION: &str = "look up destinations";
        let client = self.client(ACTION).await?;
        let rows = client
            .query(
                "SELECT t.name, t.held, t.failures, t.next_attempt_at, t.last_error, t.updated_at
                   FROM destinations t
                  WHERE (t.held OR t.next_attempt_at > now())
                    AND EXISTS (SELECT 1 FROM deliveries d
                                 WHERE d.destination = t.name AND d.state = 'pending'
                                   AND ($1::uuid[] IS NULL OR d.message_id = ANY($1))
                                   AND ($2::text[] IS NULL OR d.destination = ANY($2)))
                  ORDER BY t.name",
                &[&scope.messages, &scope.destinations],
            )
            .await
            .map_err(|e| QueueError::from_pg(ACTION, e))?;
        Ok(rows.iter().map(DestinationState::from_row).collect())
    }

    /// Sends the wake-up hint to delivery workers.
    async fn wake_delivery(&self) -> Result<(), QueueError> {
        const ACTION: &str = "wake the delivery workers";
        let client = self.client(ACTION).await?;
        client
            .batch_execute(&format!("NOTIFY {DELIVERY_WAKEUP_CHANNEL}"))
            .await
            .map_err(|e| QueueError::from_pg(ACTION, e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_destination_names_select_themselves() {
        assert_eq!(
            destination_names("domain:Example.ORG.").unwrap(),
            vec!["domain:example.org"]
        );
        assert_eq!(
            destination_names("group:legacy").unwrap(),
            vec!["group:legacy"]
        );
        assert_eq!(
            destination_names("lmtp:127.0.0.1:24").unwrap(),
            vec!["lmtp:127.0.0.1:24"]
        );
        assert_eq!(
            destination_names("maildir:/var/mail/a").unwrap(),
            vec!["maildir:/var/mail/a"]
        );
    }

    #[test]
    fn bare_names_select_domain_and_group() {
        assert_eq!(
            destination_names("Bücher.example").unwrap(),
            vec!["domain:xn--bcher-kva.example", "group:Bücher.example"]
        );
        assert_eq!(
            destination_names(" legacy ").unwrap(),
            vec!["domain:legacy", "group:legacy"]
        );
    }

    #[test]
    fn empty_destination_names_are_rejected() {
        assert!(destination_names("").is_err());
        assert!(destination_names("  ").is_err());
        assert!(destination_names("domain:").is_err());
    }

    #[test]
    fn unique_keeps_first_order() {
        let a = QueueId::from_u128(1);
        let b = QueueId::from_u128(2);
        assert_eq!(unique(&[b, a, b, a]), vec![b, a]);
    }
}
