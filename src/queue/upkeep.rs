//! Periodic upkeep of the queue, run by every process's janitor.

use super::{Queue, QueueError};

/// Counts of one round of upkeep: expired leases returned, missing
/// destination rows re-created, and complete messages deleted. Any process
/// with a queue may run it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Upkeep {
    pub leases_returned: u64,
    pub destinations_added: u64,
    pub messages_completed: u64,
}

impl Queue {
    /// Runs one round of upkeep; see [`Upkeep`].
    pub async fn upkeep(&self) -> Result<Upkeep, QueueError> {
        const ACTION: &str = "run queue upkeep";
        let client = self.client(ACTION).await?;
        // Expired leases are due again already; clearing them keeps `queue
        // show` truthful and counts the expiries.
        let deliveries = client
            .execute(
                "UPDATE deliveries SET lease_owner = NULL, lease_until = NULL
                  WHERE state = 'pending' AND lease_until < now()",
                &[],
            )
            .await
            .map_err(|e| QueueError::from_pg(ACTION, e))?;
        let recipients = client
            .execute(
                "UPDATE recipients SET lease_owner = NULL, lease_until = NULL
                  WHERE state = 'queued' AND lease_until < now()",
                &[],
            )
            .await
            .map_err(|e| QueueError::from_pg(ACTION, e))?;
        // One index probe per distinct destination of pending deliveries.
        let destinations_added = client
            .execute(
                "WITH RECURSIVE names(name) AS (
                     (SELECT destination FROM deliveries WHERE state = 'pending'
                       ORDER BY destination LIMIT 1)
                     UNION ALL
                     SELECT (SELECT d.destination FROM deliveries d
                              WHERE d.state = 'pending' AND d.destination > names.name
                              ORDER BY d.destination LIMIT 1)
                       FROM names WHERE names.name IS NOT NULL
                 )
                 INSERT INTO destinations (name)
                 SELECT name FROM names WHERE name IS NOT NULL ORDER BY name
                 ON CONFLICT DO NOTHING",
                &[],
            )
            .await
            .map_err(|e| QueueError::from_pg(ACTION, e))?;
        let messages_completed = client
            .execute(
                "DELETE FROM messages m
                  WHERE m.id IN (
                        SELECT c.id FROM messages c
                         WHERE c.state = 'ready'
                           AND NOT EXISTS (SELECT 1 FROM recipients r
                                            WHERE r.message_id = c.id AND r.state = 'queued')
                           AND NOT EXISTS (SELECT 1 FROM deliveries d
                                            WHERE d.message_id = c.id AND d.state = 'pending')
                         LIMIT 1000)",
                &[],
            )
            .await
            .map_err(|e| QueueError::from_pg(ACTION, e))?;
        Ok(Upkeep {
            leases_returned: deliveries + recipients,
            destinations_added,
            messages_completed,
        })
    }
}
