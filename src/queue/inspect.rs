//! Read access to the spool: listing, details of one message, and its body.

use std::net::IpAddr;
use std::time::Duration;

use serde::Serialize;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::admin::DestinationState;
use super::{Queue, QueueError, QueueId, json};

/// Message selection of `queue list --state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListState {
    /// Still being received: the body is incomplete and no 250 was sent.
    Receiving,
    /// Received completely and not held.
    Ready,
    /// Held by an operator, whatever its state.
    Held,
    /// With at least one pending delivery that was attempted before.
    Deferred,
}

impl ListState {
    pub fn as_str(self) -> &'static str {
        match self {
            ListState::Receiving => "receiving",
            ListState::Ready => "ready",
            ListState::Held => "held",
            ListState::Deferred => "deferred",
        }
    }
}

impl std::fmt::Display for ListState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ListState {
    type Err = QueueError;

    fn from_str(text: &str) -> Result<ListState, QueueError> {
        match text {
            "receiving" => Ok(ListState::Receiving),
            "ready" => Ok(ListState::Ready),
            "held" => Ok(ListState::Held),
            "deferred" => Ok(ListState::Deferred),
            _ => Err(QueueError::InvalidArgument(format!(
                "invalid message state {text:?}; expected receiving, ready, held or deferred"
            ))),
        }
    }
}

/// Selection for [`Queue::list`]. Every condition that is set must hold.
#[derive(Default, Clone, Debug)]
pub struct ListFilter {
    /// Only messages in this state; None for all.
    pub state: Option<ListState>,
    /// Only messages with a pending delivery to this destination: a full
    /// name such as `domain:example.org`, or a bare domain or group name
    /// (see [`destination_names`](super::destination_names)).
    pub destination: Option<String>,
    /// Only messages received longer ago than this.
    pub older_than: Option<Duration>,
    /// Only messages from this sender (see [`AddressPattern`]).
    pub sender: Option<String>,
    /// Only messages with this envelope recipient or delivery address (see
    /// [`AddressPattern`]).
    pub recipient: Option<String>,
    /// Maximum number of messages; 0 or less means no limit.
    pub limit: i64,
}

/// An address given to `--sender` or `--recipient`, compared without regard
/// to case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddressPattern {
    /// One address; angle brackets around it are removed.
    Exact(String),
    /// Every address at a domain, written `@example.org`.
    Domain(String),
    /// The null reverse-path, written `<>` or as the empty string.
    Null,
}

impl AddressPattern {
    /// Parses `user@example.org`, `<user@example.org>`, `@example.org`, or
    /// `<>` and the empty string for the null reverse-path.
    pub fn parse(text: &str) -> AddressPattern {
        let text = text.trim();
        let inner = text
            .strip_prefix('<')
            .and_then(|rest| rest.strip_suffix('>'))
            .unwrap_or(text);
        if inner.is_empty() {
            AddressPattern::Null
        } else if let Some(domain) = inner.strip_prefix('@') {
            AddressPattern::Domain(domain.to_owned())
        } else {
            AddressPattern::Exact(inner.to_owned())
        }
    }

    /// Returns the SQL parameters `(exact, domain)`: the whole address to
    /// compare, or the domain that must follow the last `@`.
    fn parameters(&self) -> (Option<&str>, Option<&str>) {
        match self {
            AddressPattern::Exact(address) => (Some(address.as_str()), None),
            AddressPattern::Domain(domain) => (None, Some(domain.as_str())),
            AddressPattern::Null => (Some(""), None),
        }
    }
}

/// One line of [`Queue::list`].
#[derive(Clone, Debug, Serialize)]
pub struct MessageSummary {
    #[serde(serialize_with = "json::queue_id")]
    pub id: QueueId,
    /// `receiving` or `ready`.
    pub state: String,
    /// Held by an operator.
    pub held: bool,
    /// Reverse-path ("" for <>).
    pub sender: String,
    #[serde(serialize_with = "json::time")]
    pub received_at: OffsetDateTime,
    /// Body size in octets; None while `receiving`.
    pub size: Option<i64>,
    pub recipient_count: i64,
    /// Deliveries in state `pending`.
    pub pending_deliveries: i64,
    /// Pending deliveries that were attempted before (`attempts > 0`).
    pub deferred_deliveries: i64,
    /// Pending deliveries whose destination is held.
    pub held_destination_deliveries: i64,
}

/// Everything stored about one message except its body.
#[derive(Clone, Debug, Serialize)]
pub struct MessageDetail {
    #[serde(serialize_with = "json::queue_id")]
    pub id: QueueId,
    pub state: String,
    /// Held by an operator: no delivery starts until it is released.
    pub held: bool,
    pub sender: String,
    #[serde(serialize_with = "json::time")]
    pub received_at: OffsetDateTime,
    pub size: Option<i64>,
    pub recipient_count: i64,
    pub client_ip: IpAddr,
    pub helo: String,
    pub smtputf8: bool,
    pub body_type: Option<String>,
    pub dsn_ret: Option<String>,
    pub dsn_envid: Option<String>,
    pub chunk_count: Option<i32>,
    #[serde(serialize_with = "json::optional_hex")]
    pub body_sha256: Option<Vec<u8>>,
    #[serde(serialize_with = "json::optional_time")]
    pub ready_at: Option<OffsetDateTime>,
    #[serde(serialize_with = "json::time")]
    pub expires_at: OffsetDateTime,
    /// Recipients in the order `commit` received them.
    pub recipients: Vec<RecipientDetail>,
    /// Deliveries the router planned, ordered by batch.
    pub deliveries: Vec<DeliveryDetail>,
    /// Scheduling state of the destinations of the deliveries, by name;
    /// a destination without a row yet is missing.
    pub destinations: Vec<DestinationState>,
}

/// One delivery of a routed message.
#[derive(Clone, Debug, Serialize)]
pub struct DeliveryDetail {
    pub id: i64,
    pub batch_id: i64,
    pub destination: String,
    /// Reverse-path of the batch ("" for <>).
    pub sender: String,
    pub address: String,
    pub kind: String,
    /// `pending`, `delivered`, `failed` or `expired`.
    pub state: String,
    /// Path by which the router reached the address.
    pub trace: String,
    /// The envelope recipient it came from.
    pub recipient_id: i64,
    pub attempts: i32,
    /// Earliest time of the next attempt; while leased, the end of the lease.
    #[serde(serialize_with = "json::time")]
    pub next_attempt_at: OffsetDateTime,
    #[serde(serialize_with = "json::optional_time")]
    pub last_attempt_at: Option<OffsetDateTime>,
    pub last_reply: Option<String>,
    /// Host that gave `last_reply`.
    pub remote_mta: Option<String>,
    /// The worker's lease, only while it lasts.
    pub lease: Option<DeliveryLease>,
}

/// A delivery worker's lease on a delivery.
#[derive(Clone, Debug, Serialize)]
pub struct DeliveryLease {
    pub owner: String,
    #[serde(serialize_with = "json::time")]
    pub until: OffsetDateTime,
}

/// One recipient of a message with its delivery state.
#[derive(Clone, Debug, Serialize)]
pub struct RecipientDetail {
    pub id: i64,
    pub address: String,
    pub route_group: Option<String>,
    pub orcpt: Option<String>,
    pub notify: Option<String>,
    pub state: String,
    pub attempts: i32,
    #[serde(serialize_with = "json::time")]
    pub next_attempt_at: OffsetDateTime,
    pub last_reply: Option<String>,
    /// The router's resolution of the recipient.
    pub resolution: Option<String>,
}

impl Queue {
    /// Lists messages, oldest first.
    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<MessageSummary>, QueueError> {
        const ACTION: &str = "list messages";
        let limit = (filter.limit > 0).then_some(filter.limit);
        let state = filter.state.map(ListState::as_str);
        let destinations = filter
            .destination
            .as_deref()
            .map(super::destination_names)
            .transpose()?;
        let older_than = filter.older_than.map(|age| age.as_secs_f64());
        let sender = filter.sender.as_deref().map(AddressPattern::parse);
        let (sender_exact, sender_domain) = sender
            .as_ref()
            .map_or((None, None), AddressPattern::parameters);
        let recipient = filter.recipient.as_deref().map(AddressPattern::parse);
        if recipient == Some(AddressPattern::Null) {
            return Err(QueueError::InvalidArgument(
                "a recipient address cannot be empty or <>".to_owned(),
            ));
        }
        let (recipient_exact, recipient_domain) = recipient
            .as_ref()
            .map_or((None, None), AddressPattern::parameters);

        let client = self.client(ACTION).await?;
        // Unnamed statements are planned with the actual parameters, so the
        // conditions whose parameter is null cost nothing.
        let rows = client
            .query(
                "SELECT m.id, m.state, m.held, m.sender, m.received_at, m.size,
                        (SELECT count(*) FROM recipients r WHERE r.message_id = m.id),
                        p.pending, p.deferred, p.held_destination
                   FROM messages m
                  CROSS JOIN LATERAL (
                        SELECT count(*) AS pending,
                               count(*) FILTER (WHERE d.attempts > 0) AS deferred,
                               count(*) FILTER (WHERE t.held) AS held_destination
                          FROM deliveries d
                          LEFT JOIN destinations t ON t.name = d.destination
                         WHERE d.message_id = m.id AND d.state = 'pending') p
                  WHERE CASE $1::text
                            WHEN 'receiving' THEN m.state = 'receiving'
                            WHEN 'ready' THEN m.state = 'ready' AND NOT m.held
                            WHEN 'held' THEN m.held
                            WHEN 'deferred' THEN p.deferred > 0
                            ELSE true
                        END
                    AND ($2::text[] IS NULL OR EXISTS (
                            SELECT 1 FROM deliveries d
                             WHERE d.message_id = m.id AND d.state = 'pending'
                               AND d.destination = ANY($2)))
                    AND ($3::float8 IS NULL
                         OR m.received_at < now() - make_interval(secs => $3))
                    AND ($4::text IS NULL OR lower(m.sender) = lower($4))
                    AND ($5::text IS NULL OR lower(m.sender) LIKE '%@' || lower($5))
                    AND ($6::text IS NULL
                         OR EXISTS (SELECT 1 FROM recipients r
                                     WHERE r.message_id = m.id AND lower(r.address) = lower($6))
                         OR EXISTS (SELECT 1 FROM deliveries d
                                     WHERE d.message_id = m.id AND lower(d.address) = lower($6)))
                    AND ($7::text IS NULL
                         OR EXISTS (SELECT 1 FROM recipients r
                                     WHERE r.message_id = m.id
                                       AND lower(r.address) LIKE '%@' || lower($7))
                         OR EXISTS (SELECT 1 FROM deliveries d
                                     WHERE d.message_id = m.id
                                       AND lower(d.address) LIKE '%@' || lower($7)))
                  ORDER BY m.received_at, m.id
                  LIMIT $8",
                &[
                    &state,
                    &destinations,
                    &older_than,
                    &sender_exact,
                    &sender_domain.map(escape_like),
                    &recipient_exact,
                    &recipient_domain.map(escape_like),
                    &limit,
                ],
            )
            .await
            .map_err(|e| QueueError::from_pg(ACTION, e))?;

        let summaries = rows
            .iter()
            .map(|row| MessageSummary {
                id: row.get(0),
                state: row.get(1),
                held: row.get(2),
                sender: row.get(3),
                received_at: row.get(4),
                size: row.get(5),
                recipient_count: row.get(6),
                pending_deliveries: row.get(7),
                deferred_deliveries: row.get(8),
                held_destination_deliveries: row.get(9),
            })
            .collect();
        Ok(summaries)
    }

    /// Returns the envelope, body metadata, recipients and deliveries of one
    /// message, or None when no message has this id.
    pub async fn show(&self, id: QueueId) -> Result<Option<MessageDetail>, QueueError> {
        const ACTION: &str = "show a message";
        let mut client = self.client(ACTION).await?;
        // One snapshot for all queries, so the recipient count and list agree.
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(|e| QueueError::from_pg(ACTION, e))?;

        let Some(row) = tx
            .query_opt(
                "SELECT id, state, sender, received_at, size, client_ip, helo, smtputf8,
                        body_type, dsn_ret, dsn_envid, chunk_count, body_sha256,
                        ready_at, expires_at, held
                   FROM messages WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(|e| QueueError::from_pg(ACTION, e))?
        else {
            return Ok(None);
        };

        let delivery_rows = tx
            .query(
                "SELECT d.batch_id, b.destination, b.sender, d.address, d.kind, d.state, d.trace,
                        d.recipient_id, d.id, d.attempts, d.next_attempt_at, d.last_attempt_at,
                        d.last_reply, d.remote_mta,
                        CASE WHEN d.lease_until > now() THEN d.lease_owner END,
                        CASE WHEN d.lease_until > now() THEN d.lease_until END
                   FROM deliveries d JOIN delivery_batches b ON b.id = d.batch_id
                  WHERE d.message_id = $1 ORDER BY d.batch_id, d.address",
                &[&id],
            )
            .await
            .map_err(|e| QueueError::from_pg(ACTION, e))?;
        let deliveries = delivery_rows.iter().map(delivery_detail).collect();

        let destination_rows = tx
            .query(
                "SELECT name, held, failures, next_attempt_at, last_error, updated_at
                   FROM destinations
                  WHERE name IN (SELECT destination FROM deliveries WHERE message_id = $1)
                  ORDER BY name",
                &[&id],
            )
            .await
            .map_err(|e| QueueError::from_pg(ACTION, e))?;
        let destinations = destination_rows
            .iter()
            .map(DestinationState::from_row)
            .collect();

        let recipient_rows = tx
            .query(
                "SELECT id, address, route_group, orcpt, notify, state, attempts,
                        next_attempt_at, last_reply, resolution
                   FROM recipients WHERE message_id = $1 ORDER BY id",
                &[&id],
            )
            .await
            .map_err(|e| QueueError::from_pg(ACTION, e))?;
        tx.commit()
            .await
            .map_err(|e| QueueError::from_pg(ACTION, e))?;

        let recipients: Vec<RecipientDetail> = recipient_rows
            .iter()
            .map(|r| RecipientDetail {
                id: r.get(0),
                address: r.get(1),
                route_group: r.get(2),
                orcpt: r.get(3),
                notify: r.get(4),
                state: r.get(5),
                attempts: r.get(6),
                next_attempt_at: r.get(7),
                last_reply: r.get(8),
                resolution: r.get(9),
            })
            .collect();

        Ok(Some(MessageDetail {
            id: row.get(0),
            state: row.get(1),
            held: row.get(15),
            sender: row.get(2),
            received_at: row.get(3),
            size: row.get(4),
            recipient_count: recipients.len() as i64,
            client_ip: row.get(5),
            helo: row.get(6),
            smtputf8: row.get(7),
            body_type: row.get(8),
            dsn_ret: row.get(9),
            dsn_envid: row.get(10),
            chunk_count: row.get(11),
            body_sha256: row.get(12),
            ready_at: row.get(13),
            expires_at: row.get(14),
            recipients,
            deliveries,
            destinations,
        }))
    }

    /// Reads the whole body of a `ready` message into memory. Meant for tests
    /// and `queue show --body`; delivery should use [`Queue::copy_body`].
    pub async fn read_body(&self, id: QueueId) -> Result<Vec<u8>, QueueError> {
        let mut body = Vec::new();
        self.copy_body(id, &mut body).await?;
        Ok(body)
    }

    /// Writes the body of a `ready` message to `out`, one chunk at a time, so
    /// memory use stays bounded by the chunk size. Returns the number of
    /// bytes written. One pooled connection stays checked out until the
    /// copy ends, but no transaction stays open.
    ///
    /// The chunk count, size and SHA-256 digest are checked against the
    /// message row. A mismatch is reported as [`QueueError::Integrity`], but
    /// only after the mismatching data was written to `out`, so callers that
    /// forward the data must discard it on error.
    pub async fn copy_body<W>(&self, id: QueueId, out: &mut W) -> Result<u64, QueueError>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        const ACTION: &str = "read a message body";
        let client = self.client(ACTION).await?;
        let row = client
            .query_opt(
                "SELECT state, size, chunk_count, body_sha256 FROM messages WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(|e| QueueError::from_pg(ACTION, e))?;
        let Some(row) = row else {
            return Err(QueueError::NotFound { id });
        };
        let state: String = row.get(0);
        let (Some(size), Some(chunk_count), Some(expected_digest)) = (
            row.get::<_, Option<i64>>(1),
            row.get::<_, Option<i32>>(2),
            row.get::<_, Option<Vec<u8>>>(3),
        ) else {
            return Err(QueueError::NotReady { id, state });
        };

        // The body of a ready message never changes (a trigger rejects chunk
        // writes), so reading chunk by chunk without a transaction is
        // consistent. Separate queries keep one chunk in memory at a time and
        // hold no transaction open while `out` is slow.
        let statement = client
            .prepare_cached("SELECT data FROM message_chunks WHERE message_id = $1 AND seq = $2")
            .await
            .map_err(|e| QueueError::from_pg(ACTION, e))?;
        let mut hasher = Sha256::new();
        let mut written: u64 = 0;
        for seq in 0..chunk_count {
            let chunk = client
                .query_opt(&statement, &[&id, &seq])
                .await
                .map_err(|e| QueueError::from_pg(ACTION, e))?;
            let Some(chunk) = chunk else {
                return Err(integrity(
                    id,
                    &format!("chunk {seq} of {chunk_count} is missing"),
                ));
            };
            let data: &[u8] = chunk.get(0);
            hasher.update(data);
            out.write_all(data)
                .await
                .map_err(|source| QueueError::Output { id, source })?;
            written += data.len() as u64;
        }
        out.flush()
            .await
            .map_err(|source| QueueError::Output { id, source })?;

        if written != size as u64 {
            return Err(integrity(
                id,
                &format!("chunks hold {written} octets, size is {size}"),
            ));
        }
        if hasher.finalize().as_slice() != expected_digest.as_slice() {
            return Err(integrity(
                id,
                "SHA-256 digest of the stored chunks does not match body_sha256",
            ));
        }
        Ok(written)
    }
}

fn integrity(id: QueueId, detail: &str) -> QueueError {
    QueueError::Integrity {
        id,
        detail: detail.to_owned(),
    }
}

fn delivery_detail(row: &tokio_postgres::Row) -> DeliveryDetail {
    let lease_owner: Option<String> = row.get(14);
    let lease_until: Option<OffsetDateTime> = row.get(15);
    DeliveryDetail {
        batch_id: row.get(0),
        destination: row.get(1),
        sender: row.get(2),
        address: row.get(3),
        kind: row.get(4),
        state: row.get(5),
        trace: row.get(6),
        recipient_id: row.get(7),
        id: row.get(8),
        attempts: row.get(9),
        next_attempt_at: row.get(10),
        last_attempt_at: row.get(11),
        last_reply: row.get(12),
        remote_mta: row.get(13),
        lease: lease_owner
            .zip(lease_until)
            .map(|(owner, until)| DeliveryLease { owner, until }),
    }
}

/// Escapes the LIKE wildcards `%`, `_` and the escape character `\`, so a
/// domain is compared literally.
fn escape_like(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}
