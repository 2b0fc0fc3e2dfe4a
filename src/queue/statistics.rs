//! Planner statistics for the queue tables.
//!
//! The queue tables can grow from empty to tens of thousands of rows within
//! seconds of a burst. Every pooled connection caches the plans of its
//! prepared statements, and a plan made while a table looked empty scans
//! the whole table (a sequential scan is the cheapest way to read ten
//! pages). PostgreSQL replans only after the table's statistics change.
//! With PostgreSQL 15's defaults, autovacuum looks at a database once a
//! minute (`autovacuum_naptime`) and analyzes a table only after 10 % of it
//! changed (`autovacuum_analyze_scale_factor`). Until then every
//! claim and record statement scans the whole table: on a 2-core machine
//! that made PostgreSQL spend about 3 times longer per message than with
//! fresh statistics.
//!
//! So each process that runs a queue tier checks the tables every
//! [`CHECK_INTERVAL`] and analyzes one whose live row count has more than
//! doubled since its last analysis. A queue growing from 0 to a million rows
//! is analyzed about ten times; a steady queue is not analyzed at all.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Queue, QueueError};

/// How often the row counts are compared with the statistics.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Tables whose size follows the queue's depth.
const QUEUE_TABLES: [&str; 6] = [
    "messages",
    "message_chunks",
    "recipients",
    "delivery_batches",
    "deliveries",
    "destinations",
];

/// Below this many rows, any plan is cheap enough.
const MIN_ROWS: f64 = 1000.0;

impl Queue {
    /// Analyzes the queue tables that grew past twice the row count of their
    /// statistics; returns their names.
    pub async fn refresh_statistics(&self) -> Result<Vec<String>, QueueError> {
        const ACTION: &str = "refresh queue statistics";
        let client = self.client(ACTION).await?;
        let statement = client
            .prepare_cached(
                "SELECT c.relname::text
                   FROM pg_class c
                   JOIN pg_stat_user_tables s ON s.relid = c.oid
                  WHERE c.relname = ANY($1) AND c.relnamespace = current_schema()::regnamespace
                    AND s.n_live_tup > $2::float8 + 2 * greatest(c.reltuples, 0)",
            )
            .await
            .map_err(|e| QueueError::from_pg(ACTION, e))?;
        let tables: Vec<&str> = QUEUE_TABLES.to_vec();
        let rows = client
            .query(&statement, &[&tables, &MIN_ROWS])
            .await
            .map_err(|e| QueueError::from_pg(ACTION, e))?;
        let mut analyzed = Vec::with_capacity(rows.len());
        for row in rows {
            let table: String = row.get(0);
            // The name comes from the fixed list above. SKIP_LOCKED leaves a
            // table alone while another process or autovacuum analyzes it.
            client
                .batch_execute(&format!("ANALYZE (SKIP_LOCKED) {table}"))
                .await
                .map_err(|e| QueueError::from_pg(ACTION, e))?;
            analyzed.push(table);
        }
        Ok(analyzed)
    }
}

/// Runs [`Queue::refresh_statistics`] every [`CHECK_INTERVAL`] until
/// shutdown. Failures are logged once per run of failures.
pub async fn keep_statistics(queue: Queue, shutdown: CancellationToken) {
    let mut failing = false;
    loop {
        tokio::select! {
            () = tokio::time::sleep(CHECK_INTERVAL) => {}
            () = shutdown.cancelled() => return,
        }
        match queue.refresh_statistics().await {
            Ok(analyzed) => {
                failing = false;
                if !analyzed.is_empty() {
                    tracing::debug!(tables = ?analyzed, "queue tables analyzed after growth");
                }
            }
            Err(error) => {
                if !failing {
                    tracing::warn!(error = %error, "refreshing queue statistics failed; retrying");
                }
                failing = true;
            }
        }
    }
}
