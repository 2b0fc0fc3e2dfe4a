//! Delivery status notifications (RFC 3464), built in memory.
//!
//! [`build_dsn`] composes a `multipart/report` message with mail-builder:
//! a human-readable `text/plain` part, a `message/delivery-status` part with
//! one block of fields per recipient, and the returned original as
//! `message/rfc822` or its header section as `text/rfc822-headers`.
//! [`status_from_reply`] takes the status code from an SMTP reply, and
//! [`notify_requests`] applies the NOTIFY parameter of RFC 3461.
//!
//! Trust: addresses, ORCPT and ENVID values and diagnostics come from
//! remote parties. The report fields are written as printable US-ASCII and
//! folded, so no value can add a field, a line break or a line longer than
//! 998 octets. The returned original is copied unchanged.
//!
//! Known gaps: an original with UTF-8 header fields is returned as
//! `message/rfc822` or `text/rfc822-headers`, not as `message/global` or
//! `message/global-headers` (RFC 6533 section 6), and diagnostics lose
//! their non-ASCII characters instead of using `message/global-delivery-status`.

mod fields;
#[cfg(test)]
mod tests;

use mail_builder::MessageBuilder;
use mail_builder::headers::address::Address;
use mail_builder::headers::content_type::ContentType;
use mail_builder::headers::date::Date;
use mail_builder::headers::message_id::MessageId;
use mail_builder::headers::raw::Raw;
use mail_builder::headers::text::Text;
use mail_builder::mime::{BodyPart, MimePart};
use time::OffsetDateTime;

use self::fields::{
    ascii_host, ascii_text, display_text, format_date, original_recipient, push_field,
    push_wrapped, typed_address,
};
use crate::queue::QueueId;
use crate::router::autoreply::{header_section, message_transfer_encoding};

/// Display name of the From address of every notification.
const SENDER_NAME: &str = "Mail Delivery System";

/// Action of one recipient (RFC 3464 section 2.3.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DsnAction {
    /// Delivery failed permanently, or retries ran out.
    Failed,
    /// Delivery failed temporarily and will be retried.
    Delayed,
    /// The message reached the recipient's mailbox.
    Delivered,
    /// The message went to a system that sends no delivery notifications.
    Relayed,
    /// The message was delivered and forwarded to further addresses, such
    /// as the members of a list.
    Expanded,
}

impl DsnAction {
    /// Returns the value of the Action field: `failed`, `delayed`,
    /// `delivered`, `relayed` or `expanded`.
    pub fn as_str(self) -> &'static str {
        match self {
            DsnAction::Failed => "failed",
            DsnAction::Delayed => "delayed",
            DsnAction::Delivered => "delivered",
            DsnAction::Relayed => "relayed",
            DsnAction::Expanded => "expanded",
        }
    }

    /// Returns the NOTIFY keyword that requests this action: FAILURE,
    /// DELAY, or SUCCESS for the three kinds of success.
    fn notify_keyword(self) -> &'static str {
        match self {
            DsnAction::Failed => "FAILURE",
            DsnAction::Delayed => "DELAY",
            DsnAction::Delivered | DsnAction::Relayed | DsnAction::Expanded => "SUCCESS",
        }
    }

    /// Returns the status used when a recipient's own status is not a valid
    /// status code.
    fn default_status(self) -> &'static str {
        match self {
            DsnAction::Failed => "5.0.0",
            DsnAction::Delayed => "4.0.0",
            DsnAction::Delivered | DsnAction::Relayed | DsnAction::Expanded => "2.0.0",
        }
    }
}

impl std::fmt::Display for DsnAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One recipient of a notification with the outcome of its delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DsnRecipient {
    /// The recipient address that the delivery attempt used.
    pub final_recipient: String,
    /// ORCPT value: either `addr-type;xtext` as given in RCPT, for example
    /// `rfc822;a+2Bb@example.org`, whose xtext is decoded, or the bare
    /// decoded address that the listener stores, taken as type `rfc822`.
    pub original_recipient: Option<String>,
    pub action: DsnAction,
    /// Status code such as `5.1.1` (RFC 3463). An invalid code is replaced
    /// by `5.0.0`, `4.0.0` or `2.0.0` according to `action`.
    pub status: String,
    /// Host name of the remote server that replied.
    pub remote_mta: Option<String>,
    /// The server's reply text, for example `550 5.1.1 no such user`,
    /// written as `Diagnostic-Code: smtp; …`.
    pub diagnostic: Option<String>,
    pub last_attempt: Option<OffsetDateTime>,
    /// End of the retry period, written for `Delayed` recipients only.
    pub will_retry_until: Option<OffsetDateTime>,
}

/// Part of the original message that a notification returns.
#[derive(Clone, Copy, Debug)]
pub enum ReturnedContent<'a> {
    /// The whole message, returned as `message/rfc822` when it is valid as
    /// a 7bit or 8bit body. Otherwise only its header section is returned.
    Full(&'a [u8]),
    /// The start of the message, at least its header section. Only the
    /// header fields are returned, as `text/rfc822-headers`.
    Headers(&'a [u8]),
    Nothing,
}

/// Everything that goes into one notification about one message.
#[derive(Clone, Copy, Debug)]
pub struct DsnReport<'a> {
    /// Host name of this server, for Reporting-MTA and the From address.
    pub reporting_mta: &'a str,
    /// Queue id of the original message, named in the human-readable part.
    pub queue_id: QueueId,
    /// ENVID of the original as stored, already decoded from xtext by the
    /// SMTP parser, so it is not decoded again.
    pub envid: Option<&'a str>,
    /// Time the original message arrived.
    pub arrival: OffsetDateTime,
    pub recipients: &'a [DsnRecipient],
    /// Address that receives the notification: the original's envelope
    /// sender.
    pub to: &'a str,
    pub original: ReturnedContent<'a>,
}

/// The part of the original that a notification actually carries, after
/// checks.
enum Returned<'a> {
    Message {
        message: &'a [u8],
        encoding: &'static str,
    },
    Headers(&'a [u8]),
    Nothing,
}

impl<'a> Returned<'a> {
    /// Returns the whole message when `message/rfc822` can carry it
    /// unchanged, which allows only 7bit or 8bit (RFC 2046 section 5.2.1),
    /// and the complete header fields otherwise.
    fn from_content(content: ReturnedContent<'a>) -> Returned<'a> {
        match content {
            ReturnedContent::Full(message) => match message_transfer_encoding(message) {
                Some(encoding) => Returned::Message { message, encoding },
                None => Returned::Headers(header_fields(message)),
            },
            ReturnedContent::Headers(start) => Returned::Headers(header_fields(start)),
            ReturnedContent::Nothing => Returned::Nothing,
        }
    }
}

/// Returns the header fields at the start of `message`, without the blank
/// line. When the blank line is missing, because the message has no body
/// or the start was cut off, the fields end at the last line break.
fn header_fields(message: &[u8]) -> &[u8] {
    let (section, complete) = header_section(message);
    if complete {
        return section;
    }
    match memchr::memrchr(b'\n', section) {
        Some(end) => &section[..=end],
        None => section,
    }
}

/// Builds the notification and returns it with CRLF line endings, ready
/// for the spool. `message_id` is its Message-ID without angle brackets,
/// and `now` its Date.
///
/// Header fields: From `Mail Delivery System <MAILER-DAEMON@host>`, To,
/// Date, Message-ID, a Subject that names the strongest action (failed,
/// then delayed, then success), `Auto-Submitted: auto-replied` (RFC 3834
/// section 5) and MIME-Version. The body is `multipart/report;
/// report-type=delivery-status` (RFC 6522).
pub fn build_dsn(report: &DsnReport<'_>, message_id: &str, now: OffsetDateTime) -> Vec<u8> {
    let host = ascii_host(report.reporting_mta);
    let returned = Returned::from_content(report.original);

    let text = MimePart::new(
        "text/plain",
        BodyPart::Text(human_text(report, &host, &returned).into()),
    );
    // The fields are US-ASCII with short lines, so they need no encoding.
    let status = MimePart::new(
        "message/delivery-status",
        BodyPart::Binary(delivery_status(report, &host).into_bytes().into()),
    )
    .transfer_encoding("7bit");
    let mut parts = vec![text, status];
    match returned {
        Returned::Message { message, encoding } => parts.push(
            MimePart::new("message/rfc822", BodyPart::Binary(message.into()))
                .transfer_encoding(encoding),
        ),
        Returned::Headers(fields) => {
            let mut part = MimePart::new("text/rfc822-headers", BodyPart::Binary(fields.into()));
            // Sent unchanged when valid as 7bit or 8bit, so the fields stay
            // readable. Otherwise mail-builder picks quoted-printable or
            // base64.
            if let Some(encoding) = message_transfer_encoding(fields) {
                part = part.transfer_encoding(encoding);
            }
            parts.push(part);
        }
        Returned::Nothing => {}
    }
    let body = MimePart::new(
        ContentType::new("multipart/report").attribute("report-type", "delivery-status"),
        parts,
    );

    let mut output = Vec::new();
    MessageBuilder::new()
        .from(Address::new_address(
            Some(SENDER_NAME),
            format!("MAILER-DAEMON@{host}"),
        ))
        .to(Address::new_address(None::<&str>, report.to))
        .subject(Text::new(subject(report.recipients)))
        .date(Date::new(now.unix_timestamp()))
        .message_id(MessageId::new(message_id))
        .header("Auto-Submitted", Raw::new("auto-replied"))
        .body(body)
        .serialize(&mut output);
    output
}

/// Returns the Subject for a notification about `recipients`.
fn subject(recipients: &[DsnRecipient]) -> &'static str {
    if has_action(recipients, DsnAction::Failed) {
        "Undelivered Mail Returned to Sender"
    } else if has_action(recipients, DsnAction::Delayed) {
        "Delayed Mail (still being retried)"
    } else {
        "Successful Mail Delivery Report"
    }
}

fn has_action(recipients: &[DsnRecipient], action: DsnAction) -> bool {
    recipients.iter().any(|r| r.action == action)
}

/// Returns the recipient's status when it is a valid status code
/// (`class.subject.detail`, RFC 3463 section 2), else the action's default.
fn checked_status(recipient: &DsnRecipient) -> &str {
    if is_status_code(&recipient.status) {
        &recipient.status
    } else {
        recipient.action.default_status()
    }
}

fn is_status_code(code: &str) -> bool {
    let mut parts = code.split('.');
    let (Some(class), Some(subject), Some(detail), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let is_number =
        |part: &str| (1..=3).contains(&part.len()) && part.bytes().all(|b| b.is_ascii_digit());
    matches!(class, "2" | "4" | "5") && is_number(subject) && is_number(detail)
}

/// Builds the `message/delivery-status` body: the per-message fields, then
/// one block of per-recipient fields for each recipient, each block after
/// a blank line (RFC 3464 section 2.1).
fn delivery_status(report: &DsnReport<'_>, host: &str) -> String {
    let mut out = String::new();
    push_field(&mut out, "Reporting-MTA", &format!("dns; {host}"));
    if let Some(envid) = report.envid {
        push_field(&mut out, "Original-Envelope-Id", &ascii_text(envid));
    }
    if let Some(date) = format_date(report.arrival) {
        push_field(&mut out, "Arrival-Date", &date);
    }

    for recipient in report.recipients {
        out.push_str("\r\n");
        if let Some(orcpt) = &recipient.original_recipient {
            push_field(&mut out, "Original-Recipient", &original_recipient(orcpt));
        }
        push_field(
            &mut out,
            "Final-Recipient",
            &typed_address(&recipient.final_recipient),
        );
        push_field(&mut out, "Action", recipient.action.as_str());
        push_field(&mut out, "Status", checked_status(recipient));
        if let Some(remote) = &recipient.remote_mta {
            push_field(
                &mut out,
                "Remote-MTA",
                &format!("dns; {}", ascii_host(remote)),
            );
        }
        if let Some(diagnostic) = &recipient.diagnostic {
            // "smtp" marks a reply from the remote server; a reason of our
            // own (routing, expiry before any reply, the operator) gets a
            // private type (RFC 3464 §2.3.6 allows X- types).
            let kind = if recipient.remote_mta.is_some() {
                "smtp"
            } else {
                "X-wsmtp"
            };
            push_field(
                &mut out,
                "Diagnostic-Code",
                &format!("{kind}; {}", ascii_text(diagnostic)),
            );
        }
        if let Some(date) = recipient.last_attempt.and_then(format_date) {
            push_field(&mut out, "Last-Attempt-Date", &date);
        }
        if recipient.action == DsnAction::Delayed
            && let Some(date) = recipient.will_retry_until.and_then(format_date)
        {
            push_field(&mut out, "Will-Retry-Until", &date);
        }
    }
    out
}

/// Builds the human-readable part: what happened, one paragraph per
/// recipient with its server's reply, and what is returned.
fn human_text(report: &DsnReport<'_>, host: &str, returned: &Returned<'_>) -> String {
    let recipients = report.recipients;
    let mut out = String::new();
    push_wrapped(&mut out, &format!("This is the mail system at {host}."), "");
    out.push_str("\r\n");
    let summary = if has_action(recipients, DsnAction::Failed) {
        "Your message could not be delivered to one or more of its recipients. \
         The details follow."
    } else if has_action(recipients, DsnAction::Delayed) {
        "Your message has not been delivered to one or more of its recipients \
         yet. The mail system keeps trying, so you do not need to send it again."
    } else {
        "This is the delivery report for your message that you requested."
    };
    push_wrapped(&mut out, summary, "");
    out.push_str("\r\n");

    let arrival = format_date(report.arrival)
        .map(|date| format!(", received {date}"))
        .unwrap_or_default();
    push_wrapped(
        &mut out,
        &format!("Message {}{arrival}:", report.queue_id.simple()),
        "",
    );
    out.push_str("\r\n");

    for recipient in recipients {
        push_recipient_text(&mut out, recipient);
        out.push_str("\r\n");
    }

    match returned {
        Returned::Message { .. } => push_wrapped(&mut out, "Your message is attached.", ""),
        Returned::Headers(_) => push_wrapped(
            &mut out,
            "The header section of your message is attached.",
            "",
        ),
        Returned::Nothing => {}
    }
    out
}

fn push_recipient_text(out: &mut String, recipient: &DsnRecipient) {
    let outcome = match recipient.action {
        DsnAction::Failed => "delivery failed",
        DsnAction::Delayed => "delivery delayed",
        DsnAction::Delivered => "delivered",
        DsnAction::Relayed => "relayed to a system that sends no delivery reports",
        DsnAction::Expanded => "delivered and forwarded to further recipients",
    };
    push_wrapped(
        out,
        &format!(
            "<{}>: {outcome} (status {}).",
            display_text(&recipient.final_recipient),
            checked_status(recipient)
        ),
        "",
    );
    if let Some(diagnostic) = &recipient.diagnostic {
        let text = match recipient.remote_mta.as_deref() {
            Some(server) => format!(
                "{} replied: {}",
                display_text(server),
                display_text(diagnostic)
            ),
            None => format!("Reason: {}", display_text(diagnostic)),
        };
        push_wrapped(out, &text, "    ");
    }
    if recipient.action == DsnAction::Delayed
        && let Some(until) = recipient.will_retry_until.and_then(format_date)
    {
        push_wrapped(out, &format!("Delivery is retried until {until}."), "    ");
    }
}

/// Returns the status code for an SMTP reply such as `550 5.1.1 no such
/// user`: the enhanced status code after the basic code (RFC 2034) when its
/// class matches the basic code's first digit, else `2.0.0`, `4.0.0` or
/// `5.0.0` from that digit. A reply without a valid 2xx, 4xx or 5xx code
/// gives `5.0.0` when `permanent_default` is set and `4.0.0` otherwise.
pub fn status_from_reply(reply: &str, permanent_default: bool) -> String {
    let reply = reply.trim_start();
    let Some(class) = basic_code_class(reply) else {
        let default = if permanent_default { "5.0.0" } else { "4.0.0" };
        return default.to_owned();
    };
    let enhanced = reply
        .get(4..)
        .and_then(|rest| rest.split_whitespace().next())
        .filter(|code| is_status_code(code) && code.starts_with(class));
    match enhanced {
        Some(code) => code.to_owned(),
        None => format!("{class}.0.0"),
    }
}

/// Returns the first digit of the reply code at the start of `reply` when
/// it is a valid 2xx, 4xx or 5xx code (RFC 5321 section 4.2) followed by a
/// space, a hyphen or the end. Classes 1 and 3 have no status code class.
fn basic_code_class(reply: &str) -> Option<char> {
    let bytes = reply.as_bytes();
    let code = bytes.get(..3)?;
    let valid = matches!(code[0], b'2' | b'4' | b'5')
        && (b'0'..=b'5').contains(&code[1])
        && code[2].is_ascii_digit()
        && matches!(bytes.get(3), None | Some(b' ' | b'-' | b'\r' | b'\n'));
    valid.then_some(char::from(code[0]))
}

/// Tells whether a recipient's NOTIFY parameter requests a notification for
/// `action` (RFC 3461 section 4.1). NEVER requests none. A list of SUCCESS,
/// FAILURE and DELAY requests exactly those: FAILURE for `Failed`, DELAY
/// for `Delayed`, SUCCESS for `Delivered`, `Relayed` and `Expanded`. Without
/// NOTIFY, failures and delays are reported and successes are not.
/// Keywords are compared without regard to case.
pub fn notify_requests(notify: Option<&str>, action: DsnAction) -> bool {
    let Some(list) = notify.map(str::trim).filter(|list| !list.is_empty()) else {
        return matches!(action, DsnAction::Failed | DsnAction::Delayed);
    };
    let mut requested = false;
    for keyword in list.split(',').map(str::trim) {
        if keyword.eq_ignore_ascii_case("NEVER") {
            return false;
        }
        requested |= keyword.eq_ignore_ascii_case(action.notify_keyword());
    }
    requested
}
