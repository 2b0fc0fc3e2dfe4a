//! Streaming writer of one message body into the spool.

use std::time::Instant;

use deadpool_postgres::GenericClient;
use sha2::{Digest, Sha256};
use tokio_postgres::error::SqlState;

use super::{Envelope, Queue, QueueError, QueueId, SpoolRecipient};

const INSERT_MESSAGE: &str = "INSERT INTO messages
        (id, state, sender, client_ip, helo, smtputf8, body_type, dsn_ret, dsn_envid, expires_at)
    VALUES ($1, 'receiving', $2, $3, $4, $5, $6, $7, $8, now() + $9::float8 * interval '1 second')";

pub(super) const INSERT_CHUNK: &str =
    "INSERT INTO message_chunks (message_id, seq, data) VALUES ($1, $2, $3)";

const EXTEND_EXPIRY: &str =
    "UPDATE messages SET expires_at = now() + $2::float8 * interval '1 second'
    WHERE id = $1 AND state = 'receiving'";

pub(super) const INSERT_RECIPIENTS: &str =
    "INSERT INTO recipients (message_id, address, route_group, orcpt, notify)
    SELECT $1, address, route_group, orcpt, notify
      FROM unnest($2::text[], $3::text[], $4::text[], $5::text[])
           AS r (address, route_group, orcpt, notify)";

pub(super) const MARK_READY: &str = "UPDATE messages
    SET state = 'ready', ready_at = now(), size = $2, chunk_count = $3, body_sha256 = $4
    WHERE id = $1 AND state = 'receiving'";

/// Streams one message into the spool. Created by [`Queue::begin`].
///
/// The writer buffers at most `chunk_size` bytes. It flushes a full buffer
/// only when more data follows, so the last chunk is always stored by
/// [`SpoolWriter::commit`], and a message of at most `chunk_size` bytes costs
/// a single transaction. After any failed write the writer is failed: later
/// writes and `commit` return [`QueueError::WriterFailed`].
///
/// Dropping the writer without `commit` or `abort` leaves any flushed chunks
/// as a `receiving` message, which never becomes visible as `ready` and
/// which the janitor deletes after `expires_at`.
pub struct SpoolWriter {
    queue: Queue,
    envelope: Envelope,
    buffer: Vec<u8>,
    next_seq: i32,
    size: i64,
    hasher: Sha256,
    /// Set before the first insert of the message row is attempted, so
    /// `abort` also cleans up after an insert whose outcome is unknown.
    row_may_exist: bool,
    /// Set once the insert of the message row has committed.
    row_inserted: bool,
    /// When `expires_at` was last set.
    expiry_set_at: Instant,
    failed: bool,
}

impl SpoolWriter {
    pub(super) fn new(queue: Queue, mut envelope: Envelope) -> SpoolWriter {
        // ESMTP keywords are case-insensitive (RFC 5321 section 2.4), and the
        // table constraints accept the upper-case spelling.
        for value in [&mut envelope.body_type, &mut envelope.dsn_ret]
            .into_iter()
            .flatten()
        {
            value.make_ascii_uppercase();
        }
        SpoolWriter {
            buffer: Vec::new(),
            queue,
            envelope,
            next_seq: 0,
            size: 0,
            hasher: Sha256::new(),
            row_may_exist: false,
            row_inserted: false,
            expiry_set_at: Instant::now(),
            failed: false,
        }
    }

    pub fn id(&self) -> QueueId {
        self.envelope.id
    }

    /// Returns the number of body bytes written so far.
    pub fn size(&self) -> u64 {
        self.size as u64
    }

    /// Appends body data. Each full chunk is stored in its own short
    /// autocommit transaction once more data follows; the first one also
    /// inserts the message row as `receiving`.
    pub async fn write(&mut self, mut data: &[u8]) -> Result<(), QueueError> {
        if self.failed {
            return Err(QueueError::WriterFailed { id: self.id() });
        }
        let chunk_size = self.queue.inner.chunk_size;
        while !data.is_empty() {
            if self.buffer.len() == chunk_size
                && let Err(error) = self.flush_chunk().await
            {
                self.failed = true;
                return Err(error);
            }
            let take = data.len().min(chunk_size - self.buffer.len());
            let needed = self.buffer.len() + take;
            if needed > self.buffer.capacity() {
                // Grow geometrically but never past chunk_size, so a small
                // message keeps a small buffer.
                let target = (self.buffer.capacity() * 2).max(needed).min(chunk_size);
                self.buffer.reserve_exact(target - self.buffer.len());
            }
            let (head, rest) = data.split_at(take);
            self.buffer.extend_from_slice(head);
            self.hasher.update(head);
            // A body can never reach i64::MAX bytes, so plain addition is safe.
            self.size += head.len() as i64;
            data = rest;
        }
        Ok(())
    }

    /// Stores the full buffer as chunk `next_seq`.
    async fn flush_chunk(&mut self) -> Result<(), QueueError> {
        const ACTION: &str = "store a body chunk";
        let id = self.id();
        let ttl = self.queue.inner.receiving_ttl;
        // Extending expires_at once a quarter of the TTL has passed keeps an
        // active reception away from the janitor at the cost of one UPDATE
        // per quarter TTL, not one per chunk.
        let extend = self.row_inserted && self.expiry_set_at.elapsed() >= ttl / 4;

        let mut client = self.queue.client(ACTION).await?;
        if self.row_inserted && !extend {
            insert_chunk(&client, id, self.next_seq, &self.buffer).await?;
        } else {
            let now = Instant::now();
            let tx = client
                .transaction()
                .await
                .map_err(|e| pg_error(ACTION, id, e))?;
            if self.row_inserted {
                let updated =
                    execute_cached(&tx, ACTION, id, EXTEND_EXPIRY, &[&id, &ttl.as_secs_f64()])
                        .await?;
                if updated != 1 {
                    return Err(QueueError::NotReceiving { id });
                }
            } else {
                self.row_may_exist = true;
                self.insert_message(&tx).await?;
            }
            insert_chunk(&tx, id, self.next_seq, &self.buffer).await?;
            tx.commit().await.map_err(|e| pg_error(ACTION, id, e))?;
            self.row_inserted = true;
            self.expiry_set_at = now;
        }

        self.next_seq = self.next_seq.checked_add(1).ok_or_else(|| {
            QueueError::InvalidConfig(format!(
                "message {id} needs more than {} chunks; raise chunk_size",
                i32::MAX
            ))
        })?;
        self.buffer.clear();
        Ok(())
    }

    async fn insert_message(&self, client: &impl GenericClient) -> Result<(), QueueError> {
        const ACTION: &str = "insert the message row";
        let envelope = &self.envelope;
        let ttl_seconds = self.queue.inner.receiving_ttl.as_secs_f64();
        execute_cached(
            client,
            ACTION,
            envelope.id,
            INSERT_MESSAGE,
            &[
                &envelope.id,
                &envelope.sender,
                &envelope.client_ip,
                &envelope.helo,
                &envelope.smtputf8,
                &envelope.body_type,
                &envelope.dsn_ret,
                &envelope.dsn_envid,
                &ttl_seconds,
            ],
        )
        .await?;
        Ok(())
    }

    /// Stores the rest of the body and the recipients and marks the message
    /// `ready`, all in one transaction. Returns `Ok` only after the commit
    /// returned, so the caller may then send its 250 reply.
    ///
    /// If the connection breaks during COMMIT, the outcome is unknown: the
    /// message is then looked up once on another connection, and `ready`
    /// means success. On any error the partial message is deleted on a best
    /// effort basis.
    pub async fn commit(mut self, recipients: &[SpoolRecipient]) -> Result<(), QueueError> {
        let result = self.commit_transaction(recipients).await;
        match result {
            Ok(()) => Ok(()),
            Err(CommitFailure::Definite(error)) => {
                self.delete_partial().await;
                Err(error)
            }
            Err(CommitFailure::Unknown(error)) => self.resolve_unknown_commit(error).await,
        }
    }

    async fn commit_transaction(
        &mut self,
        recipients: &[SpoolRecipient],
    ) -> Result<(), CommitFailure> {
        const ACTION: &str = "commit the message";
        let id = self.id();
        if self.failed {
            return Err(QueueError::WriterFailed { id }.into());
        }
        if recipients.is_empty() {
            return Err(QueueError::NoRecipients { id }.into());
        }

        let mut client = self.queue.client(ACTION).await?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| pg_error(ACTION, id, e))?;

        // An empty body has no chunks. Otherwise the buffer contains the last
        // chunk, because write() flushes only when more data follows.
        let insert_row = !self.row_inserted;
        if insert_row {
            self.row_may_exist = true;
        }
        let last_chunk = (!self.buffer.is_empty()).then_some(self.next_seq);
        let chunk_count = self.next_seq + i32::from(last_chunk.is_some());

        let addresses: Vec<&str> = recipients.iter().map(|r| r.address.as_str()).collect();
        let route_groups: Vec<Option<&str>> = recipients
            .iter()
            .map(|r| r.route_group.as_deref())
            .collect();
        let orcpts: Vec<Option<&str>> = recipients.iter().map(|r| r.orcpt.as_deref()).collect();
        let notifies: Vec<Option<&str>> = recipients.iter().map(|r| r.notify.as_deref()).collect();
        let digest = self.hasher.clone().finalize();

        // The statements are issued together, so tokio-postgres pipelines
        // them: one round trip instead of four for a message that fits in one
        // chunk. They are prepared first (from the connection's cache after
        // its first message), so the executions leave in this order;
        // PostgreSQL runs them in order within the transaction, and after a
        // failure the later ones fail too, so the first error is the one
        // reported.
        let (insert_message, insert_chunk, insert_recipients, mark_ready) = tokio::try_join!(
            tx.prepare_cached(INSERT_MESSAGE),
            tx.prepare_cached(INSERT_CHUNK),
            tx.prepare_cached(INSERT_RECIPIENTS),
            tx.prepare_cached(MARK_READY),
        )
        .map_err(|e| pg_error(ACTION, id, e))?;

        let envelope = &self.envelope;
        let ttl_seconds = self.queue.inner.receiving_ttl.as_secs_f64();
        let message_params: [&(dyn tokio_postgres::types::ToSql + Sync); 9] = [
            &envelope.id,
            &envelope.sender,
            &envelope.client_ip,
            &envelope.helo,
            &envelope.smtputf8,
            &envelope.body_type,
            &envelope.dsn_ret,
            &envelope.dsn_envid,
            &ttl_seconds,
        ];
        let chunk_data: &[u8] = &self.buffer;
        let chunk_params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
            [&id, &self.next_seq, &chunk_data];
        let recipient_params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
            [&id, &addresses, &route_groups, &orcpts, &notifies];
        let digest = digest.as_slice();
        let ready_params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&id, &self.size, &chunk_count, &digest];

        let message_row = async {
            if insert_row {
                tx.execute(&insert_message, &message_params).await?;
            }
            Ok(())
        };
        let last_chunk_row = async {
            if last_chunk.is_some() {
                tx.execute(&insert_chunk, &chunk_params).await?;
            }
            Ok(())
        };
        let (_, _, _, updated) = tokio::try_join!(
            message_row,
            last_chunk_row,
            tx.execute(&insert_recipients, &recipient_params),
            tx.execute(&mark_ready, &ready_params),
        )
        .map_err(|e: tokio_postgres::Error| pg_error(ACTION, id, e))?;
        if updated != 1 {
            return Err(QueueError::NotReceiving { id }.into());
        }

        match tx.commit().await {
            Ok(()) => {
                tracing::debug!(queue_id = %id, size = self.size, chunk_count, "message ready");
                Ok(())
            }
            // The server returned an error, so the transaction was rolled back.
            Err(error) if error.as_db_error().is_some() => Err(pg_error(ACTION, id, error).into()),
            Err(error) => Err(CommitFailure::Unknown(QueueError::from_pg(ACTION, error))),
        }
    }

    /// Looks the message up after a commit whose outcome is unknown.
    /// `FOR SHARE` waits for the row lock of a commit still in progress on
    /// the server, so a commit that completes late is seen here.
    async fn resolve_unknown_commit(self, commit_error: QueueError) -> Result<(), QueueError> {
        const ACTION: &str = "check the outcome of a broken commit";
        let id = self.id();
        tracing::warn!(queue_id = %id, error = %commit_error, "connection lost during commit; checking the message state");

        let lookup = async {
            let client = self.queue.client(ACTION).await?;
            let row = client
                .query_opt("SELECT state FROM messages WHERE id = $1 FOR SHARE", &[&id])
                .await
                .map_err(|e| QueueError::from_pg(ACTION, e))?;
            Ok::<_, QueueError>(row.map(|row| row.get::<_, String>(0)))
        };
        match lookup.await {
            Ok(Some(state)) if state == "ready" => {
                tracing::info!(queue_id = %id, "commit succeeded despite the lost connection");
                Ok(())
            }
            Ok(_) => {
                // NOTE: a row first inserted by the lost transaction is not
                // locked for us to wait on, so in a rare race this lookup runs
                // before that commit finishes and reports a failure although
                // the message becomes ready. The client's retry then duplicates it.
                self.delete_partial().await;
                Err(commit_error)
            }
            Err(lookup_error) => {
                tracing::warn!(queue_id = %id, error = %lookup_error, "cannot check the outcome of a broken commit");
                Err(commit_error)
            }
        }
    }

    /// Deletes the partial message on a best-effort basis. Errors are
    /// logged and swallowed, because the janitor removes leftovers anyway.
    pub async fn abort(self) {
        self.delete_partial().await;
    }

    async fn delete_partial(&self) {
        if !self.row_may_exist {
            return;
        }
        let id = self.id();
        let result = async {
            let client = self.queue.client("delete a partial message").await?;
            // The state filter keeps a message that did become ready.
            client
                .execute(
                    "DELETE FROM messages WHERE id = $1 AND state = 'receiving'",
                    &[&id],
                )
                .await
                .map_err(|e| QueueError::from_pg("delete a partial message", e))
        }
        .await;
        match result {
            Ok(deleted) => tracing::debug!(queue_id = %id, deleted, "deleted partial message"),
            Err(error) => {
                tracing::warn!(queue_id = %id, error = %error, "cannot delete partial message; the janitor will remove it")
            }
        }
    }
}

impl std::fmt::Debug for SpoolWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpoolWriter")
            .field("id", &self.envelope.id)
            .field("size", &self.size)
            .field("next_seq", &self.next_seq)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

/// Failure of the commit transaction: definitely rolled back, or with an
/// unknown outcome because the connection broke during COMMIT.
enum CommitFailure {
    Definite(QueueError),
    Unknown(QueueError),
}

impl From<QueueError> for CommitFailure {
    fn from(error: QueueError) -> CommitFailure {
        CommitFailure::Definite(error)
    }
}

async fn insert_chunk(
    client: &impl GenericClient,
    id: QueueId,
    seq: i32,
    data: &[u8],
) -> Result<(), QueueError> {
    execute_cached(
        client,
        "store a body chunk",
        id,
        INSERT_CHUNK,
        &[&id, &seq, &data],
    )
    .await?;
    Ok(())
}

/// Executes `sql` as a statement prepared once per pooled connection.
async fn execute_cached(
    client: &impl GenericClient,
    action: &'static str,
    id: QueueId,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<u64, QueueError> {
    let statement = client
        .prepare_cached(sql)
        .await
        .map_err(|e| pg_error(action, id, e))?;
    client
        .execute(&statement, params)
        .await
        .map_err(|e| pg_error(action, id, e))
}

/// Maps a driver error, turning the errors that mean "message row gone or
/// no longer receiving" into [`QueueError::NotReceiving`].
fn pg_error(action: &'static str, id: QueueId, error: tokio_postgres::Error) -> QueueError {
    // 23503 comes from the chunk trigger or the foreign key when the janitor
    // deleted the message row.
    if error.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION) {
        return QueueError::NotReceiving { id };
    }
    QueueError::from_pg(action, error)
}
