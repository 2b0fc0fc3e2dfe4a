//! Read access to the spool: listing, details of one message, and its body.

use std::net::IpAddr;

use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::{Queue, QueueError, QueueId};

/// Selection for [`Queue::list`].
#[derive(Default, Clone, Debug)]
pub struct ListFilter {
    /// Only messages in this state (`receiving` or `ready`); None for all.
    pub state: Option<String>,
    /// Maximum number of messages; 0 or less means no limit.
    pub limit: i64,
}

/// One line of [`Queue::list`].
#[derive(Clone, Debug)]
pub struct MessageSummary {
    pub id: QueueId,
    pub state: String,
    pub sender: String,
    pub received_at: OffsetDateTime,
    /// Body size in octets; None while `receiving`.
    pub size: Option<i64>,
    pub recipient_count: i64,
}

/// Everything stored about one message except its body.
#[derive(Clone, Debug)]
pub struct MessageDetail {
    pub id: QueueId,
    pub state: String,
    pub sender: String,
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
    pub body_sha256: Option<Vec<u8>>,
    pub ready_at: Option<OffsetDateTime>,
    pub expires_at: OffsetDateTime,
    /// Recipients in the order `commit` received them.
    pub recipients: Vec<RecipientDetail>,
    /// Deliveries the router planned, ordered by batch.
    pub deliveries: Vec<DeliveryDetail>,
}

/// One delivery of a routed message.
#[derive(Clone, Debug)]
pub struct DeliveryDetail {
    pub batch_id: i64,
    pub destination: String,
    /// Reverse-path of the batch ("" for <>).
    pub sender: String,
    pub address: String,
    pub kind: String,
    pub state: String,
    /// Path by which the router reached the address.
    pub trace: String,
    /// The envelope recipient it came from.
    pub recipient_id: i64,
}

/// One recipient of a message with its delivery state.
#[derive(Clone, Debug)]
pub struct RecipientDetail {
    pub id: i64,
    pub address: String,
    pub route_group: Option<String>,
    pub orcpt: Option<String>,
    pub notify: Option<String>,
    pub state: String,
    pub attempts: i32,
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
        let client = self.client(ACTION).await?;
        let rows = client
            .query(
                "SELECT m.id, m.state, m.sender, m.received_at, m.size,
                        (SELECT count(*) FROM recipients r WHERE r.message_id = m.id)
                   FROM messages m
                  WHERE $1::text IS NULL OR m.state = $1
                  ORDER BY m.received_at, m.id
                  LIMIT $2",
                &[&filter.state, &limit],
            )
            .await
            .map_err(|e| QueueError::from_pg(ACTION, e))?;

        let summaries = rows
            .iter()
            .map(|row| MessageSummary {
                id: row.get(0),
                state: row.get(1),
                sender: row.get(2),
                received_at: row.get(3),
                size: row.get(4),
                recipient_count: row.get(5),
            })
            .collect();
        Ok(summaries)
    }

    /// Returns the envelope, body metadata and recipients of one message, or
    /// None when no message has this id.
    pub async fn show(&self, id: QueueId) -> Result<Option<MessageDetail>, QueueError> {
        const ACTION: &str = "show a message";
        let mut client = self.client(ACTION).await?;
        // One snapshot for both queries, so the recipient count and list agree.
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
                        ready_at, expires_at
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
                "SELECT d.batch_id, b.destination, b.sender, d.address, d.kind, d.state, d.trace, d.recipient_id
                   FROM deliveries d JOIN delivery_batches b ON b.id = d.batch_id
                  WHERE d.message_id = $1 ORDER BY d.batch_id, d.address",
                &[&id],
            )
            .await
            .map_err(|e| QueueError::from_pg(ACTION, e))?;
        let deliveries = delivery_rows
            .iter()
            .map(|r| DeliveryDetail {
                batch_id: r.get(0),
                destination: r.get(1),
                sender: r.get(2),
                address: r.get(3),
                kind: r.get(4),
                state: r.get(5),
                trace: r.get(6),
                recipient_id: r.get(7),
            })
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
