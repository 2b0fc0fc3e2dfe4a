//! Reading a stored message body chunk by chunk while it is delivered.

use bytes::Bytes;
use deadpool_postgres::Pool;

use crate::queue::QueueId;

use super::transport::BodySource;

/// The body of one stored message, read one chunk per query so that a
/// large message never sits whole in memory.
pub struct StoredBody {
    pool: Pool,
    message_id: QueueId,
    next_seq: i32,
    chunk_count: i32,
}

impl StoredBody {
    pub fn new(pool: Pool, message_id: QueueId, chunk_count: i32) -> StoredBody {
        StoredBody {
            pool,
            message_id,
            next_seq: 0,
            chunk_count,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("queue database unavailable: {}", crate::queue::describe_pool_error(.0))]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("queue database error: {}", crate::queue::describe_database_error(.0))]
    Database(#[from] tokio_postgres::Error),
    /// The message was deleted while it was being sent, e.g. by an operator.
    #[error("chunk {seq} of message {message_id} is missing")]
    Missing { message_id: String, seq: i32 },
}

impl BodySource for StoredBody {
    type Error = BodyError;

    async fn next_chunk(&mut self) -> Result<Option<Bytes>, BodyError> {
        if self.next_seq >= self.chunk_count {
            return Ok(None);
        }
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached("SELECT data FROM message_chunks WHERE message_id = $1 AND seq = $2")
            .await?;
        let row = client
            .query_opt(&statement, &[&self.message_id, &self.next_seq])
            .await?;
        let Some(row) = row else {
            return Err(BodyError::Missing {
                message_id: self.message_id.simple().to_string(),
                seq: self.next_seq,
            });
        };
        self.next_seq += 1;
        let data: Vec<u8> = row.get(0);
        Ok(Some(Bytes::from(data)))
    }
}
