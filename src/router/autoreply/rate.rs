//! Per-correspondent reply state in `auto_reply_log`: the vacation interval
//! and a storm limit for every kind of auto-reply.

use std::time::Duration;

use time::OffsetDateTime;

use crate::directory::AutoReplyKind;
use crate::queue::QueueError;

/// Maximum replies of one account to one correspondent within
/// [`STORM_WINDOW`], for every kind. It stops two responders that ignore
/// Auto-Submitted from mailing each other without end, and bounds the
/// replies to a sender who floods an every-time or echo address.
pub const STORM_LIMIT: i32 = 10;

/// Length of the fixed window that [`STORM_LIMIT`] counts in. A window
/// starts with the first reply after the previous window ended.
pub const STORM_WINDOW: Duration = Duration::from_secs(3600);

/// Takes or updates the row of (account, correspondent) and returns whether
/// a reply may be sent now. A reply is allowed when:
///
/// - for [`AutoReplyKind::Vacation`], the last reply to this correspondent
///   is at least `interval` old (RFC 3834 section 2 recommends at most one
///   reply per period, 7 days by default in the schema), and
/// - for every kind, fewer than [`STORM_LIMIT`] replies went to the
///   correspondent in the current [`STORM_WINDOW`].
///
/// `interval` is ignored for echo and every-time replies. `correspondent`
/// should be the normalised envelope sender.
///
/// A single `INSERT … ON CONFLICT DO UPDATE … WHERE` both checks and
/// records the reply, so it is safe under concurrency: a second transaction
/// for the same pair waits for the row lock of the first and then sees its
/// update, so two routers never both get true for one vacation period. In
/// REPEATABLE READ or SERIALIZABLE transactions the waiting one fails with
/// a serialization error instead, which [`QueueError::is_transient`]
/// reports as transient. The reservation is undone if `tx` rolls back.
///
/// `now` comes from the caller. A `now` earlier than a stored reply time
/// (clock skew between routers) denies vacation replies until it passes
/// that time, and keeps the current storm window open longer.
pub async fn reserve_reply(
    tx: &tokio_postgres::Transaction<'_>,
    account_id: i64,
    correspondent: &str,
    kind: AutoReplyKind,
    interval: Duration,
    now: OffsetDateTime,
) -> Result<bool, QueueError> {
    const ACTION: &str = "reserve an auto-reply";
    // Null skips the interval test of the WHERE clause.
    let interval_seconds = match kind {
        AutoReplyKind::Vacation => Some(interval.as_secs_f64()),
        AutoReplyKind::Echo | AutoReplyKind::EveryTime => None,
    };
    let window_seconds = STORM_WINDOW.as_secs_f64();

    // EXCLUDED.last_sent_at is `now`. A window that started at least
    // STORM_WINDOW ago restarts at `now` with a count of 1.
    let row = tx
        .query_opt(
            "INSERT INTO auto_reply_log AS log
                    (account_id, correspondent, last_sent_at, window_start, window_count)
             VALUES ($1, $2, $3, $3, 1)
             ON CONFLICT (account_id, correspondent) DO UPDATE
                SET last_sent_at = EXCLUDED.last_sent_at,
                    window_start = CASE
                        WHEN log.window_start <= EXCLUDED.last_sent_at - $5::float8 * interval '1 second'
                        THEN EXCLUDED.last_sent_at ELSE log.window_start END,
                    window_count = CASE
                        WHEN log.window_start <= EXCLUDED.last_sent_at - $5::float8 * interval '1 second'
                        THEN 1 ELSE log.window_count + 1 END
              WHERE ($4::float8 IS NULL
                     OR log.last_sent_at <= EXCLUDED.last_sent_at - $4::float8 * interval '1 second')
                AND (log.window_start <= EXCLUDED.last_sent_at - $5::float8 * interval '1 second'
                     OR log.window_count < $6)
             RETURNING window_count",
            &[
                &account_id,
                &correspondent,
                &now,
                &interval_seconds,
                &window_seconds,
                &STORM_LIMIT,
            ],
        )
        .await
        .map_err(|e| QueueError::from_pg(ACTION, e))?;
    Ok(row.is_some())
}
