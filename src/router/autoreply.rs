//! Auto-replies of accounts (echo, vacation, every-time) after RFC 3834.
//!
//! Interface: the router calls [`auto_reply`] inside its routing
//! transaction for each recipient that resolves to an account with an
//! auto-reply. It checks, in order: that the auto-reply is active, the
//! suppression rules of [`suppression`], and the per-correspondent rate
//! state of [`reserve_reply`]. It then builds the reply with mail-builder
//! and inserts it into the spool with [`crate::queue::insert_generated`]
//! as a `ready` message. The reply has the null sender `<>`, as RFC 3834
//! recommends, and one recipient without a route group: the original
//! envelope sender. The router thus routes it like any other mail. The
//! returned [`AutoReplyOutcome`] is one line for the log and the routing
//! trace.
//!
//! The parts are public for tests and other callers: [`OriginalHeaders`]
//! (header facts, parsed with mail-parser), [`suppression`], the rate state
//! [`reserve_reply`], [`build_reply`], and the transaction-bound readers
//! [`read_header_section`] and [`read_body_within`].
//!
//! Trust: the stored message comes from an unauthenticated sender. Its
//! header values are only compared, except the subject and message ids,
//! which are cleaned or checked before they are copied into the reply.
//! Addresses from the directory are trusted to be normalised.
//!
//! Errors: [`AutoReplyError`], whose [`AutoReplyError::is_transient`] tells
//! the router whether to retry the routing transaction later. Every write
//! (rate state, reply message) happens in the caller's transaction, so a
//! rollback undoes all of it.
//!
//! Known gaps: replies are limited per correspondent only, so a flood of
//! messages with forged, distinct senders still draws one reply each.
//! Echo attaches originals with UTF-8 header fields as `message/rfc822`,
//! not `message/global` (RFC 6532).

mod build;
mod headers;
mod original;
mod rate;
mod suppress;

use std::net::{IpAddr, Ipv6Addr};

use time::OffsetDateTime;

pub use build::{Attachment, Reply, build_reply, message_transfer_encoding, reply_subject};
pub use headers::{MAX_HEADER_SECTION, OriginalHeaders, header_section};
pub use original::{read_body_within, read_header_section};
pub use rate::{STORM_LIMIT, STORM_WINDOW, reserve_reply};
pub use suppress::{Suppression, is_automated_address, suppression};

use crate::directory::{Account, AutoReplyKind, normalise_address};
use crate::queue::{
    DEFAULT_CHUNK_SIZE, Envelope, QueueError, QueueId, SpoolRecipient, insert_generated,
    new_queue_id,
};

/// Default largest original that an echo reply attaches whole: 10 MiB.
/// Larger originals get only their header section attached.
pub const DEFAULT_ECHO_ATTACHMENT_LIMIT: u64 = 10 * 1024 * 1024;

/// Text of an echo reply when the account configured none.
const DEFAULT_ECHO_TEXT: &str = "This is an automatic echo of your message, which is attached.";

/// Added to the echo text when only the header section is attached.
const HEADERS_ONLY_NOTE: &str = "Only the header section of your message is attached, \
    because the whole message is too large or cannot be attached unchanged.";

/// Settings of the auto-reply generator, shared by all accounts.
#[derive(Clone, Debug)]
pub struct AutoReplySettings {
    /// Host name of this server, used in the Message-ID of replies and as
    /// the HELO of the generated spool entry.
    pub hostname: String,
    /// Whether vacation replies require one of the account's addresses in a
    /// recipient field of the original (RFC 3834 section 2). Echo and
    /// every-time replies never require it, because they are services that
    /// reply to any message sent to the address.
    pub require_personal: bool,
    /// Largest original, in bytes, that an echo reply attaches whole.
    pub echo_attachment_limit: u64,
    /// Chunk size for storing the reply in the spool.
    pub chunk_size: usize,
}

impl AutoReplySettings {
    /// Settings with `require_personal` on, the 10 MiB echo limit and the
    /// default spool chunk size.
    pub fn new(hostname: impl Into<String>) -> AutoReplySettings {
        AutoReplySettings {
            hostname: hostname.into(),
            require_personal: true,
            echo_attachment_limit: DEFAULT_ECHO_ATTACHMENT_LIMIT,
            chunk_size: DEFAULT_CHUNK_SIZE,
        }
    }
}

/// The stored message that an auto-reply responds to.
#[derive(Clone, Copy, Debug)]
pub struct StoredMessage<'a> {
    pub id: QueueId,
    /// Envelope sender, `""` for `<>`.
    pub sender: &'a str,
    /// The start of the body: at least the header section, or its first
    /// [`MAX_HEADER_SECTION`] bytes (see [`read_header_section`]).
    pub header_section: &'a [u8],
    /// Size of the whole body in bytes.
    pub size: u64,
    /// Whether the message was received with SMTPUTF8.
    pub smtputf8: bool,
}

/// Result of [`auto_reply`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AutoReplyOutcome {
    /// A reply was queued under this id.
    Sent(QueueId),
    /// A rule forbids a reply to this message.
    Suppressed(Suppression),
    /// The correspondent got a reply recently (vacation interval or storm
    /// limit).
    RateLimited,
    /// The account has no auto-reply, or it is disabled or outside its
    /// active window.
    Inactive,
}

impl std::fmt::Display for AutoReplyOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AutoReplyOutcome::Sent(id) => write!(f, "auto-reply queued as {}", id.simple()),
            AutoReplyOutcome::Suppressed(reason) => {
                write!(f, "auto-reply suppressed ({}): {reason}", reason.code())
            }
            AutoReplyOutcome::RateLimited => {
                f.write_str("auto-reply skipped: the sender got one recently")
            }
            AutoReplyOutcome::Inactive => f.write_str("auto-reply inactive"),
        }
    }
}

/// Failure of [`auto_reply`].
#[derive(Debug, thiserror::Error)]
pub enum AutoReplyError {
    /// Reading the original, the rate state or inserting the reply failed.
    #[error(transparent)]
    Queue(#[from] QueueError),
}

impl AutoReplyError {
    /// Returns true when retrying the routing transaction may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            AutoReplyError::Queue(error) => error.is_transient(),
        }
    }
}

/// Sends the auto-reply of `account` to the sender of `message`, if its
/// auto-reply is active, no rule suppresses it and the rate state allows
/// it. `account_address` is the normalised envelope recipient that reached
/// the account: the reply comes from it (RFC 3834 section 3.1.1 suggests
/// the address the message was sent to).
///
/// All writes happen in `tx`, which the caller commits together with the
/// routing of the original recipient.
pub async fn auto_reply(
    tx: &tokio_postgres::Transaction<'_>,
    settings: &AutoReplySettings,
    account: &Account,
    account_address: &str,
    message: &StoredMessage<'_>,
    now: OffsetDateTime,
) -> Result<AutoReplyOutcome, AutoReplyError> {
    let Some(config) = account.auto_reply.as_ref().filter(|a| a.is_active(now)) else {
        return Ok(AutoReplyOutcome::Inactive);
    };

    let headers = OriginalHeaders::parse(message.header_section, message.size);
    let own_addresses: Vec<&str> = std::iter::once(account_address)
        .chain(account.addresses.iter().map(String::as_str))
        .collect();
    let require_personal = settings.require_personal && config.kind == AutoReplyKind::Vacation;
    if let Some(reason) = suppression(message.sender, &headers, &own_addresses, require_personal) {
        return Ok(AutoReplyOutcome::Suppressed(reason));
    }

    let correspondent = normalise_address(message.sender);
    let allowed = reserve_reply(
        tx,
        account.id,
        &correspondent,
        config.kind,
        config.interval,
        now,
    )
    .await?;
    if !allowed {
        return Ok(AutoReplyOutcome::RateLimited);
    }

    // The echo original is read only after the reservation, so a rate
    // limited echo costs no body read.
    let echoed = match config.kind {
        AutoReplyKind::Echo => read_body_within(tx, message.id, settings.echo_attachment_limit)
            .await?
            .filter(|body| message_transfer_encoding(body).is_some()),
        AutoReplyKind::Vacation | AutoReplyKind::EveryTime => None,
    };
    let (section, _) = header_section(message.header_section);
    let (attachment, text) = match config.kind {
        AutoReplyKind::Echo => {
            let configured = if config.body.trim().is_empty() {
                DEFAULT_ECHO_TEXT
            } else {
                config.body.as_str()
            };
            match &echoed {
                Some(body) => (Attachment::Message(body), configured.to_owned()),
                None => (
                    Attachment::Headers(section),
                    format!("{configured}\n\n{HEADERS_ONLY_NOTE}\n"),
                ),
            }
        }
        AutoReplyKind::Vacation | AutoReplyKind::EveryTime => {
            (Attachment::None, config.body.clone())
        }
    };

    let id = new_queue_id();
    let message_id = format!("{}@{}", id.simple(), settings.hostname);
    let subject = reply_subject(config.kind, &config.subject, headers.subject.as_deref());
    let reply = build_reply(&Reply {
        from: account_address,
        to: message.sender,
        subject: &subject,
        text: &text,
        attachment,
        message_id: &message_id,
        date: now,
        original: &headers,
    });

    let attached_raw = matches!(attachment, Attachment::Message(_));
    let envelope = Envelope {
        id,
        // The null reverse-path, as RFC 3834 recommends, so a failure to
        // deliver the reply never produces another message.
        sender: String::new(),
        // The reply is generated locally, so loopback is its client.
        client_ip: IpAddr::V6(Ipv6Addr::LOCALHOST),
        helo: settings.hostname.clone(),
        smtputf8: !message.sender.is_ascii()
            || !account_address.is_ascii()
            || (attached_raw && message.smtputf8),
        body_type: (!reply.is_ascii()).then(|| "8BITMIME".to_owned()),
        dsn_ret: None,
        dsn_envid: None,
    };
    let recipient = SpoolRecipient {
        address: message.sender.to_owned(),
        route_group: None,
        orcpt: None,
        notify: None,
    };
    insert_generated(tx, &envelope, &reply, &[recipient], settings.chunk_size).await?;

    tracing::debug!(
        queue_id = %id,
        original = %message.id,
        account = account.id,
        kind = config.kind.as_str(),
        "auto-reply queued"
    );
    Ok(AutoReplyOutcome::Sent(id))
}
