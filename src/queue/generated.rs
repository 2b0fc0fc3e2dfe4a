//! Insertion of a message that wsmtp generates itself (auto-replies,
//! notifications) into the spool, inside a transaction owned by the caller.
//!
//! Unlike [`super::SpoolWriter`], which streams a body from an SMTP client in
//! several short transactions, [`insert_generated`] has the whole body in
//! memory and writes the message row, its chunks and its recipients and
//! marks the message `ready` in the caller's transaction. The message thus
//! becomes visible exactly when that transaction commits and disappears with
//! it on rollback, so a router can generate a reply and mark the original
//! recipient routed atomically.
//!
//! The `messages_check_ready` trigger checks the chunk count and size as for
//! received mail. The SHA-256 digest covers the whole body, as the writer's.

use sha2::{Digest, Sha256};

use super::writer::{INSERT_CHUNK, INSERT_RECIPIENTS, MARK_READY};
use super::{Envelope, MAX_CHUNK_SIZE, QueueError, QueueId, SpoolRecipient};

// A generated message is complete when inserted, so expires_at only matters
// while the row is 'receiving' inside the caller's transaction. The column
// default (one hour) is therefore kept.
const INSERT_MESSAGE: &str = "INSERT INTO messages
        (id, state, sender, client_ip, helo, smtputf8, body_type, dsn_ret, dsn_envid)
    VALUES ($1, 'receiving', $2, $3, $4, $5, $6, $7, $8)";

/// Inserts a complete message with its recipients as `ready`, in `tx`.
/// Returns the envelope's id, which names the new message.
///
/// The body is split into chunks of `chunk_size` bytes. `body_type` and
/// `dsn_ret` are upper-cased as by the spool writer. Nothing is committed:
/// the caller commits or rolls back `tx`.
///
/// Errors: [`QueueError::NoRecipients`] for an empty recipient list,
/// [`QueueError::InvalidConfig`] for a chunk size outside
/// `1..=MAX_CHUNK_SIZE` or a body too large for the chunk count column, and
/// [`QueueError::Database`] or [`QueueError::Unavailable`] from the
/// statements, for example a duplicate id.
pub async fn insert_generated(
    tx: &tokio_postgres::Transaction<'_>,
    envelope: &Envelope,
    body: &[u8],
    recipients: &[SpoolRecipient],
    chunk_size: usize,
) -> Result<QueueId, QueueError> {
    const ACTION: &str = "insert a generated message";
    let id = envelope.id;
    if recipients.is_empty() {
        return Err(QueueError::NoRecipients { id });
    }
    if chunk_size == 0 || chunk_size > MAX_CHUNK_SIZE {
        return Err(QueueError::InvalidConfig(format!(
            "chunk_size {chunk_size} is out of range 1..={MAX_CHUNK_SIZE}"
        )));
    }
    let chunk_count = i32::try_from(body.len().div_ceil(chunk_size)).map_err(|_| {
        QueueError::InvalidConfig(format!(
            "generated message {id} needs more than {} chunks; raise chunk_size",
            i32::MAX
        ))
    })?;
    // A slice never contains more than isize::MAX bytes, so the length fits i64.
    let size = body.len() as i64;

    let body_type = envelope.body_type.as_deref().map(str::to_ascii_uppercase);
    let dsn_ret = envelope.dsn_ret.as_deref().map(str::to_ascii_uppercase);
    tx.execute(
        INSERT_MESSAGE,
        &[
            &id,
            &envelope.sender,
            &envelope.client_ip,
            &envelope.helo,
            &envelope.smtputf8,
            &body_type,
            &dsn_ret,
            &envelope.dsn_envid,
        ],
    )
    .await
    .map_err(|e| QueueError::from_pg(ACTION, e))?;

    let insert_chunk = tx
        .prepare(INSERT_CHUNK)
        .await
        .map_err(|e| QueueError::from_pg(ACTION, e))?;
    for (seq, chunk) in (0_i32..).zip(body.chunks(chunk_size)) {
        tx.execute(&insert_chunk, &[&id, &seq, &chunk])
            .await
            .map_err(|e| QueueError::from_pg(ACTION, e))?;
    }

    let addresses: Vec<&str> = recipients.iter().map(|r| r.address.as_str()).collect();
    let route_groups: Vec<Option<&str>> = recipients
        .iter()
        .map(|r| r.route_group.as_deref())
        .collect();
    let orcpts: Vec<Option<&str>> = recipients.iter().map(|r| r.orcpt.as_deref()).collect();
    let notifies: Vec<Option<&str>> = recipients.iter().map(|r| r.notify.as_deref()).collect();
    tx.execute(
        INSERT_RECIPIENTS,
        &[&id, &addresses, &route_groups, &orcpts, &notifies],
    )
    .await
    .map_err(|e| QueueError::from_pg(ACTION, e))?;

    let digest = Sha256::digest(body);
    let updated = tx
        .execute(MARK_READY, &[&id, &size, &chunk_count, &digest.as_slice()])
        .await
        .map_err(|e| QueueError::from_pg(ACTION, e))?;
    if updated != 1 {
        return Err(QueueError::NotReceiving { id });
    }

    tracing::debug!(queue_id = %id, size, chunk_count, "generated message ready");
    Ok(id)
}
