//! Bounded reads of a stored message through the router's transaction.
//!
//! [`crate::queue::Queue::copy_body`] reads on a pooled connection of its
//! own, outside any transaction. These helpers read through the caller's
//! transaction instead, and stop at a size limit so a large message never
//! lands in memory whole.

use sha2::{Digest, Sha256};

use super::headers::header_section;
use crate::queue::{QueueError, QueueId};

/// Size and body facts of a stored message.
struct StoredBody {
    size: i64,
    chunk_count: i32,
    digest: Vec<u8>,
}

async fn stored_body(
    tx: &tokio_postgres::Transaction<'_>,
    id: QueueId,
    action: &'static str,
) -> Result<StoredBody, QueueError> {
    let row = tx
        .query_opt(
            "SELECT state, size, chunk_count, body_sha256 FROM messages WHERE id = $1",
            &[&id],
        )
        .await
        .map_err(|e| QueueError::from_pg(action, e))?
        .ok_or(QueueError::NotFound { id })?;
    match (
        row.get::<_, Option<i64>>(1),
        row.get::<_, Option<i32>>(2),
        row.get::<_, Option<Vec<u8>>>(3),
    ) {
        (Some(size), Some(chunk_count), Some(digest)) => Ok(StoredBody {
            size,
            chunk_count,
            digest,
        }),
        _ => Err(QueueError::NotReady {
            id,
            state: row.get(0),
        }),
    }
}

/// Reads the start of a `ready` message up to and including the blank line
/// that ends its header section, or its first `limit` bytes when the
/// section is longer (pass [`super::MAX_HEADER_SECTION`]). Only the bytes
/// needed are fetched from each chunk.
pub async fn read_header_section(
    tx: &tokio_postgres::Transaction<'_>,
    id: QueueId,
    limit: usize,
) -> Result<Vec<u8>, QueueError> {
    const ACTION: &str = "read the header section of a message";
    let body = stored_body(tx, id, ACTION).await?;
    let statement = tx
        .prepare("SELECT substring(data FROM 1 FOR $3) FROM message_chunks WHERE message_id = $1 AND seq = $2")
        .await
        .map_err(|e| QueueError::from_pg(ACTION, e))?;

    let mut start = Vec::new();
    for seq in 0..body.chunk_count {
        if start.len() >= limit {
            break;
        }
        // limit - len fits i32 because the limit is far below 2 GiB in
        // practice; saturate anyway instead of wrapping.
        let wanted = i32::try_from(limit - start.len()).unwrap_or(i32::MAX);
        let row = tx
            .query_opt(&statement, &[&id, &seq, &wanted])
            .await
            .map_err(|e| QueueError::from_pg(ACTION, e))?
            .ok_or_else(|| QueueError::Integrity {
                id,
                detail: format!("chunk {seq} of {} is missing", body.chunk_count),
            })?;
        start.extend_from_slice(row.get::<_, &[u8]>(0));
        // The whole buffer is searched again, because the blank line may
        // straddle two chunks. Chunks are large, so this rarely repeats.
        let (section, complete) = header_section(&start);
        if complete {
            // `section` ends with the last field's line break, and the
            // blank line follows it.
            let mut end = section.len();
            end += if start[end..].starts_with(b"\r\n") {
                2
            } else {
                1
            };
            start.truncate(end);
            break;
        }
    }
    start.truncate(limit);
    Ok(start)
}

/// Reads the whole body of a `ready` message when its size is at most
/// `limit` bytes, and returns None without reading when it is larger. The
/// size and SHA-256 digest are checked against the message row.
pub async fn read_body_within(
    tx: &tokio_postgres::Transaction<'_>,
    id: QueueId,
    limit: u64,
) -> Result<Option<Vec<u8>>, QueueError> {
    const ACTION: &str = "read a message body";
    let body = stored_body(tx, id, ACTION).await?;
    if u64::try_from(body.size).map_or(true, |size| size > limit) {
        return Ok(None);
    }
    let statement = tx
        .prepare("SELECT data FROM message_chunks WHERE message_id = $1 AND seq = $2")
        .await
        .map_err(|e| QueueError::from_pg(ACTION, e))?;

    // size <= limit was checked, and a u64 limit this large would not fit
    // in memory anyway, so the capacity hint is capped.
    let mut data = Vec::with_capacity(usize::try_from(body.size).unwrap_or(0).min(1 << 26));
    let mut hasher = Sha256::new();
    for seq in 0..body.chunk_count {
        let row = tx
            .query_opt(&statement, &[&id, &seq])
            .await
            .map_err(|e| QueueError::from_pg(ACTION, e))?
            .ok_or_else(|| QueueError::Integrity {
                id,
                detail: format!("chunk {seq} of {} is missing", body.chunk_count),
            })?;
        let chunk: &[u8] = row.get(0);
        if (data.len() + chunk.len()) as u64 > body.size as u64 {
            return Err(QueueError::Integrity {
                id,
                detail: format!("chunks hold more than the recorded size {}", body.size),
            });
        }
        hasher.update(chunk);
        data.extend_from_slice(chunk);
    }
    if data.len() as u64 != body.size as u64 {
        return Err(QueueError::Integrity {
            id,
            detail: format!("chunks hold {} octets, size is {}", data.len(), body.size),
        });
    }
    if hasher.finalize().as_slice() != body.digest.as_slice() {
        return Err(QueueError::Integrity {
            id,
            detail: "SHA-256 digest of the stored chunks does not match body_sha256".to_owned(),
        });
    }
    Ok(Some(data))
}
