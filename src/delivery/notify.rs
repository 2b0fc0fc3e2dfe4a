//! Spooling of delivery status notifications inside the caller's
//! transaction.
//!
//! [`spool_notification`] reads what it needs of the original message
//! through the caller's transaction, builds the notification with
//! [`build_dsn`] and inserts it with [`insert_generated`] as a `ready`
//! message from the null sender `<>` (RFC 5321 section 4.5.5) to the
//! original's sender. The notification thus becomes visible when the caller
//! commits, together with the recipient states that it reports, and
//! disappears with them on rollback.

use std::net::{IpAddr, Ipv6Addr};

use time::OffsetDateTime;

use super::dsn::{DsnAction, DsnRecipient, DsnReport, ReturnedContent, build_dsn};
use crate::queue::{
    DEFAULT_CHUNK_SIZE, Envelope, QueueError, QueueId, SpoolRecipient, insert_generated,
    new_queue_id,
};
use crate::router::autoreply::{
    MAX_HEADER_SECTION, header_section, message_transfer_encoding, read_body_within,
    read_header_section,
};

/// Default largest original that a failure notification returns whole:
/// 10 MiB. Larger originals get only their header section returned.
pub const DEFAULT_RETURN_LIMIT: u64 = 10 * 1024 * 1024;

/// Settings of the notification generator.
#[derive(Clone, Debug)]
pub struct NotificationSettings {
    /// Host name of this server: the Reporting-MTA, the domain of the From
    /// address and Message-ID, and the HELO of the generated spool entry.
    pub hostname: String,
    /// Largest original, in bytes, that a failure notification returns
    /// whole.
    pub return_limit: u64,
    /// Chunk size for storing the notification in the spool.
    pub chunk_size: usize,
}

impl NotificationSettings {
    /// Settings with the 10 MiB return limit and the default spool chunk
    /// size.
    pub fn new(hostname: impl Into<String>) -> NotificationSettings {
        NotificationSettings {
            hostname: hostname.into(),
            return_limit: DEFAULT_RETURN_LIMIT,
            chunk_size: DEFAULT_CHUNK_SIZE,
        }
    }
}

/// Failure of [`spool_notification`].
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// Reading the original or inserting the notification failed. A
    /// missing original is [`QueueError::NotFound`].
    #[error(transparent)]
    Queue(#[from] QueueError),
}

impl NotifyError {
    /// Returns true when retrying the caller's transaction may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            NotifyError::Queue(error) => error.is_transient(),
        }
    }
}

/// The envelope facts of the original message that a notification uses.
struct Original {
    /// RET= value, upper-cased by the spool: FULL or HDRS.
    dsn_ret: Option<String>,
    /// ENVID= value, decoded from xtext by the SMTP parser.
    dsn_envid: Option<String>,
    received_at: OffsetDateTime,
    smtputf8: bool,
}

async fn read_original(
    tx: &tokio_postgres::Transaction<'_>,
    id: QueueId,
) -> Result<Original, QueueError> {
    const ACTION: &str = "read the envelope of a message";
    let row = tx
        .query_opt(
            "SELECT dsn_ret, dsn_envid, received_at, smtputf8 FROM messages WHERE id = $1",
            &[&id],
        )
        .await
        .map_err(|e| QueueError::from_pg(ACTION, e))?
        .ok_or(QueueError::NotFound { id })?;
    Ok(Original {
        dsn_ret: row.get(0),
        dsn_envid: row.get(1),
        received_at: row.get(2),
        smtputf8: row.get(3),
    })
}

/// Builds a notification about `recipients` of the message `message_id`
/// and inserts it into the spool as a `ready` message from `<>` to `to`,
/// in `tx`. Returns the new message's id. Nothing is committed: the
/// caller commits or rolls back `tx`.
///
/// Returns None without writing when `recipients` is empty, and when `to`
/// is empty: the null sender `<>` marks a notification or a similar
/// message, which must not draw another one (RFC 5321 section 4.5.5). The
/// caller selects the recipients, for example with
/// [`super::dsn::notify_requests`].
///
/// What is returned of the original: when any recipient `Failed`, the
/// whole message if RET is FULL or absent and its size is at most
/// `settings.return_limit`, else its header section. Notifications without
/// a failure return the header section only, as RFC 3461 section 4.3
/// recommends. The new message needs SMTPUTF8 when `to` or a recipient
/// address is non-ASCII, or when the original was received with SMTPUTF8
/// and its returned header section contains non-ASCII octets.
pub async fn spool_notification(
    tx: &tokio_postgres::Transaction<'_>,
    settings: &NotificationSettings,
    message_id: QueueId,
    to: &str,
    recipients: &[DsnRecipient],
) -> Result<Option<QueueId>, NotifyError> {
    if recipients.is_empty() {
        return Ok(None);
    }
    if to.is_empty() {
        tracing::info!(queue_id = %message_id, "notification to the null sender dropped");
        return Ok(None);
    }

    let original = read_original(tx, message_id).await?;
    let failure = recipients.iter().any(|r| r.action == DsnAction::Failed);
    let return_full = failure
        && original
            .dsn_ret
            .as_deref()
            .is_none_or(|ret| ret.eq_ignore_ascii_case("FULL"));
    // An original that message/rfc822 cannot carry unchanged gets its
    // header section returned instead.
    let whole = if return_full {
        read_body_within(tx, message_id, settings.return_limit)
            .await?
            .filter(|body| message_transfer_encoding(body).is_some())
    } else {
        None
    };
    let (content, is_whole) = match whole {
        Some(body) => (body, true),
        None => (
            read_header_section(tx, message_id, MAX_HEADER_SECTION).await?,
            false,
        ),
    };
    let returned = if is_whole {
        ReturnedContent::Full(&content)
    } else {
        ReturnedContent::Headers(&content)
    };

    let id = new_queue_id();
    let report = DsnReport {
        reporting_mta: &settings.hostname,
        queue_id: message_id,
        envid: original.dsn_envid.as_deref(),
        arrival: original.received_at,
        recipients,
        to,
        original: returned,
    };
    let notification = build_dsn(
        &report,
        &format!("{}@{}", id.simple(), settings.hostname),
        OffsetDateTime::now_utc(),
    );

    let utf8_addresses = !to.is_ascii() || recipients.iter().any(|r| !r.final_recipient.is_ascii());
    // Only the header section decides, because non-ASCII body octets need
    // 8BITMIME, not SMTPUTF8.
    let utf8_headers = original.smtputf8 && !header_section(&content).0.is_ascii();
    let envelope = Envelope {
        id,
        sender: String::new(),
        // The notification is generated locally, so loopback is its client.
        client_ip: IpAddr::V6(Ipv6Addr::LOCALHOST),
        helo: settings.hostname.clone(),
        smtputf8: utf8_addresses || utf8_headers,
        body_type: (!notification.is_ascii()).then(|| "8BITMIME".to_owned()),
        dsn_ret: None,
        dsn_envid: None,
    };
    let recipient = SpoolRecipient {
        address: to.to_owned(),
        route_group: None,
        orcpt: None,
        notify: None,
    };
    insert_generated(
        tx,
        &envelope,
        &notification,
        &[recipient],
        settings.chunk_size,
    )
    .await?;

    tracing::info!(
        queue_id = %id,
        original = %message_id,
        recipients = recipients.len(),
        failure,
        returned = if is_whole { "message" } else { "headers" },
        "delivery status notification queued"
    );
    Ok(Some(id))
}
