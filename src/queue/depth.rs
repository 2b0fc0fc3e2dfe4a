//! Counts of the queue's content by state, for the metrics collector.
//!
//! The counts come from one read-only repeatable-read transaction, so they
//! agree with each other. Each count scans the pending part of its table,
//! so the cost grows with the queue's size. The collector runs it every
//! `admin.queue_interval` under its own statement timeout.

use std::time::Duration;

use super::{Queue, QueueError};

/// A count and the age of the oldest message it covers, in seconds (0 when
/// the count is 0).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CountAndAge {
    pub count: i64,
    pub oldest_seconds: f64,
}

/// The queue's content by state.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct QueueDepth {
    /// Messages whose body is still arriving, not held.
    pub receiving: CountAndAge,
    /// Messages received completely, not held.
    pub ready: CountAndAge,
    /// Messages held with `queue hold`.
    pub held: CountAndAge,
    /// Envelope recipients waiting for the router.
    pub unrouted: CountAndAge,
    /// Pending deliveries a worker may claim now.
    pub due: CountAndAge,
    /// Pending deliveries whose own or destination's next attempt lies ahead.
    pub deferred: CountAndAge,
    /// Pending deliveries under a live lease.
    pub leased: CountAndAge,
    /// Pending deliveries of a held message or to a held destination.
    pub delivery_held: CountAndAge,
    pub destinations_backed_off: i64,
    pub destinations_held: i64,
}

fn count_and_age(row: &tokio_postgres::Row, count: usize) -> CountAndAge {
    CountAndAge {
        count: row.get(count),
        oldest_seconds: row.get::<_, Option<f64>>(count + 1).unwrap_or(0.0),
    }
}

impl Queue {
    /// Counts the queue's content; each statement ends after `timeout`.
    pub async fn depth(&self, timeout: Duration) -> Result<QueueDepth, QueueError> {
        const ACTION: &str = "count the queue for metrics";
        let pg = |e| QueueError::from_pg(ACTION, e);
        let mut client = self.client(ACTION).await?;
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(pg)?;
        tx.batch_execute(&format!(
            "SET LOCAL statement_timeout = {}",
            timeout.as_millis().max(1)
        ))
        .await
        .map_err(pg)?;

        let messages = tx
            .query_one(
                "SELECT count(*) FILTER (WHERE state = 'receiving' AND NOT held),
                        extract(epoch FROM now() - min(received_at)
                            FILTER (WHERE state = 'receiving' AND NOT held))::float8,
                        count(*) FILTER (WHERE state = 'ready' AND NOT held),
                        extract(epoch FROM now() - min(received_at)
                            FILTER (WHERE state = 'ready' AND NOT held))::float8,
                        count(*) FILTER (WHERE held),
                        extract(epoch FROM now() - min(received_at) FILTER (WHERE held))::float8
                   FROM messages",
                &[],
            )
            .await
            .map_err(pg)?;
        let unrouted = tx
            .query_one(
                "SELECT count(*), extract(epoch FROM now() - min(m.received_at))::float8
                   FROM recipients r JOIN messages m ON m.id = r.message_id
                  WHERE r.state = 'queued'",
                &[],
            )
            .await
            .map_err(pg)?;
        // The same classes as `queue stats`: a live lease first, then a
        // hold, then a next attempt ahead.
        let deliveries = tx
            .query_one(
                "SELECT count(*) FILTER (WHERE class = 'due'),
                        extract(epoch FROM now() - min(received_at) FILTER (WHERE class = 'due'))::float8,
                        count(*) FILTER (WHERE class = 'deferred'),
                        extract(epoch FROM now() - min(received_at) FILTER (WHERE class = 'deferred'))::float8,
                        count(*) FILTER (WHERE class = 'leased'),
                        extract(epoch FROM now() - min(received_at) FILTER (WHERE class = 'leased'))::float8,
                        count(*) FILTER (WHERE class = 'held'),
                        extract(epoch FROM now() - min(received_at) FILTER (WHERE class = 'held'))::float8
                   FROM (SELECT m.received_at,
                                CASE WHEN d.lease_until > now() THEN 'leased'
                                     WHEN m.held OR coalesce(t.held, false) THEN 'held'
                                     WHEN d.next_attempt_at > now()
                                          OR t.next_attempt_at > now() THEN 'deferred'
                                     ELSE 'due'
                                END AS class
                           FROM deliveries d
                           JOIN messages m ON m.id = d.message_id
                           LEFT JOIN destinations t ON t.name = d.destination
                          WHERE d.state = 'pending') c",
                &[],
            )
            .await
            .map_err(pg)?;
        let destinations = tx
            .query_one(
                "SELECT count(*) FILTER (WHERE next_attempt_at > now() AND NOT held),
                        count(*) FILTER (WHERE held)
                   FROM destinations",
                &[],
            )
            .await
            .map_err(pg)?;
        tx.commit().await.map_err(pg)?;

        Ok(QueueDepth {
            receiving: count_and_age(&messages, 0),
            ready: count_and_age(&messages, 2),
            held: count_and_age(&messages, 4),
            unrouted: count_and_age(&unrouted, 0),
            due: count_and_age(&deliveries, 0),
            deferred: count_and_age(&deliveries, 2),
            leased: count_and_age(&deliveries, 4),
            delivery_held: count_and_age(&deliveries, 6),
            destinations_backed_off: destinations.get(0),
            destinations_held: destinations.get(1),
        })
    }
}
