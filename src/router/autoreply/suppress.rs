//! Rules that forbid an auto-reply to a message, after RFC 3834 section 2.

use std::fmt;

use super::headers::OriginalHeaders;
use crate::directory::SUBADDRESS_SEPARATOR;

/// Local parts of senders that are programs, not people. A reply to them
/// reaches list software or a bounce processor, or is discarded unread.
///
/// `owner-*`, `*-request`, `MAILER-DAEMON`, `LISTSERV` and `majordomo` are
/// return addresses of mailing list managers and mail systems, which
/// vacation programs have long skipped. `*-owner` and `*-bounces` (with a
/// `+` VERP suffix) are the owner and envelope sender addresses of GNU
/// Mailman lists. The no-reply forms state in their name that replies are
/// unread.
///
/// `postmaster` is not listed: it is a mailbox that a person reads
/// (RFC 5321 section 4.5.1), so a personal message from it gets a reply.
const AUTOMATED_LOCAL_PARTS: &[&str] = &[
    "mailer-daemon",
    "listserv",
    "majordomo",
    "noreply",
    "no-reply",
    "donotreply",
    "do-not-reply",
];
const AUTOMATED_PREFIXES: &[&str] = &["owner-"];
const AUTOMATED_SUFFIXES: &[&str] = &["-request", "-owner", "-bounces"];
/// Infix of Mailman's VERP bounce addresses, `list-bounces+user=host@…`.
const AUTOMATED_INFIXES: &[&str] = &["-bounces+"];

/// X-Auto-Response-Suppress items that cover auto-replies: `all`, `oof`
/// (out of office) and `autoreply` (other automatic replies). Each of them
/// suppresses every kind of wsmtp auto-reply, because a vacation notice is
/// an out-of-office reply and echo and every-time replies are automatic
/// replies, and erring towards no reply avoids loops.
const SUPPRESSING_ITEMS: &[&str] = &["all", "oof", "autoreply"];

/// Reason that forbids an auto-reply to a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Suppression {
    /// The envelope sender is the null reverse-path `<>`, used by bounces
    /// and other notifications (RFC 3834 section 2, RFC 5321 section 4.5.5).
    NullSender,
    /// The envelope sender has no `@` domain part or contains control
    /// characters, so a reply could not be addressed.
    InvalidSender(String),
    /// The envelope sender is one of the account's own addresses, so the
    /// account would reply to itself.
    OwnAddress,
    /// The envelope sender or a From address is a program (mailer-daemon,
    /// list software, a no-reply address). Contains the address.
    AutomatedSender(String),
    /// An Auto-Submitted field with a value other than `no` (RFC 3834
    /// sections 2 and 5). Contains the keyword.
    AutoSubmitted(String),
    /// X-Auto-Response-Suppress requests no automatic replies. Contains the
    /// item that matched.
    ResponseSuppressRequested(String),
    /// A List-* field marks mailing list traffic (RFC 3834 section 2).
    ListHeader,
    /// Precedence is bulk, list or junk. Precedence is not standard, and
    /// RFC 3834 section 2 recommends no behaviour for it, but these values
    /// have long marked list and bulk mail.
    Precedence(String),
    /// The header section was longer than the bound that was read, so a
    /// field that forbids a reply may lie beyond it. Such a section is
    /// abnormal, and erring towards no reply avoids loops.
    HeaderSectionTruncated,
    /// None of the account's addresses appears in a recipient field, so the
    /// message probably came through a list or a Bcc. RFC 3834 section 2
    /// states that vacation notices SHOULD NOT be sent then.
    NotPersonal,
}

impl Suppression {
    /// Short stable name for logs, metrics and routing traces.
    pub fn code(&self) -> &'static str {
        match self {
            Suppression::NullSender => "null-sender",
            Suppression::InvalidSender(_) => "invalid-sender",
            Suppression::OwnAddress => "own-address",
            Suppression::AutomatedSender(_) => "automated-sender",
            Suppression::AutoSubmitted(_) => "auto-submitted",
            Suppression::ResponseSuppressRequested(_) => "auto-response-suppress",
            Suppression::ListHeader => "list-header",
            Suppression::Precedence(_) => "precedence",
            Suppression::HeaderSectionTruncated => "header-section-truncated",
            Suppression::NotPersonal => "not-personal",
        }
    }
}

impl fmt::Display for Suppression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Suppression::NullSender => f.write_str("the envelope sender is <>"),
            Suppression::InvalidSender(sender) => {
                write!(f, "the envelope sender {sender:?} is not a usable address")
            }
            Suppression::OwnAddress => f.write_str("the sender is the account's own address"),
            Suppression::AutomatedSender(address) => {
                write!(f, "the sender {address} is an automated address")
            }
            Suppression::AutoSubmitted(keyword) => {
                write!(f, "the message has Auto-Submitted: {keyword}")
            }
            Suppression::ResponseSuppressRequested(item) => {
                write!(f, "the message has X-Auto-Response-Suppress: {item}")
            }
            Suppression::ListHeader => f.write_str("the message has a List-* header field"),
            Suppression::Precedence(value) => write!(f, "the message has Precedence: {value}"),
            Suppression::HeaderSectionTruncated => {
                f.write_str("the header section exceeds the size read for auto-replies")
            }
            Suppression::NotPersonal => {
                f.write_str("no address of the account is in To, Cc, Bcc or Resent-*")
            }
        }
    }
}

/// Returns why no auto-reply may go to `sender`, or None when one may.
///
/// `sender` is the envelope sender (MAIL FROM), `""` for `<>`.
/// `own_addresses` are the addresses of the replying account, normalised:
/// the envelope recipient that reached it first, then its other addresses.
/// Catch-all entries (`@domain`) are ignored. Addresses compare without
/// case and without a `+tag` sub-address.
///
/// With `require_personal`, a message that names none of `own_addresses`
/// in a recipient field is suppressed, as RFC 3834 section 2 recommends
/// for vacation notices. Service replies such as echo may skip that check.
pub fn suppression(
    sender: &str,
    headers: &OriginalHeaders,
    own_addresses: &[&str],
    require_personal: bool,
) -> Option<Suppression> {
    if sender.is_empty() {
        return Some(Suppression::NullSender);
    }
    let Some(sender_key) = address_key(sender) else {
        return Some(Suppression::InvalidSender(sender.to_owned()));
    };
    if sender.chars().any(char::is_control) {
        return Some(Suppression::InvalidSender(sender.to_owned()));
    }

    let own_keys: Vec<String> = own_addresses
        .iter()
        .filter(|address| !address.starts_with('@'))
        .filter_map(|address| address_key(address))
        .collect();
    if own_keys.contains(&sender_key) {
        return Some(Suppression::OwnAddress);
    }

    let senders = std::iter::once(sender).chain(headers.from.iter().map(String::as_str));
    for address in senders {
        if is_automated_address(address) {
            return Some(Suppression::AutomatedSender(address.to_owned()));
        }
    }

    if let Some(keyword) = headers.auto_submitted.iter().find(|k| *k != "no") {
        return Some(Suppression::AutoSubmitted(keyword.clone()));
    }
    if let Some(item) = headers
        .auto_response_suppress
        .iter()
        .find(|item| SUPPRESSING_ITEMS.contains(&item.as_str()))
    {
        return Some(Suppression::ResponseSuppressRequested(item.clone()));
    }
    if headers.has_list_headers {
        return Some(Suppression::ListHeader);
    }
    if let Some(value) = headers
        .precedence
        .iter()
        .find(|value| matches!(value.as_str(), "bulk" | "list" | "junk"))
    {
        return Some(Suppression::Precedence(value.clone()));
    }
    if headers.truncated {
        return Some(Suppression::HeaderSectionTruncated);
    }

    if require_personal {
        let named = headers
            .recipients
            .iter()
            .filter_map(|address| address_key(address))
            .any(|key| own_keys.contains(&key));
        if !named {
            return Some(Suppression::NotPersonal);
        }
    }
    None
}

/// Returns true when the local part of `address` names a program.
pub fn is_automated_address(address: &str) -> bool {
    let local = address
        .rsplit_once('@')
        .map_or(address, |(local, _)| local)
        .to_lowercase();
    AUTOMATED_LOCAL_PARTS.contains(&local.as_str())
        || AUTOMATED_PREFIXES
            .iter()
            .any(|prefix| local.starts_with(prefix))
        || AUTOMATED_SUFFIXES
            .iter()
            .any(|suffix| local.ends_with(suffix))
        || AUTOMATED_INFIXES.iter().any(|infix| local.contains(infix))
}

/// Returns the comparison form of an address: lowercase, without a `+tag`
/// sub-address, or None when it has no `local@domain` form.
fn address_key(address: &str) -> Option<String> {
    let (local, domain) = address.rsplit_once('@')?;
    if local.is_empty() || domain.is_empty() {
        return None;
    }
    let base = match local.split_once(SUBADDRESS_SEPARATOR) {
        Some((base, _tag)) if !base.is_empty() => base,
        _ => local,
    };
    Some(format!("{base}@{domain}").to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_key_drops_tag_and_case() {
        assert_eq!(
            address_key("Alice+News@Example.COM").as_deref(),
            Some("alice@example.com")
        );
        assert_eq!(
            address_key("+x@example.com").as_deref(),
            Some("+x@example.com")
        );
        assert_eq!(address_key("nodomain@"), None);
        assert_eq!(address_key("plain"), None);
    }

    #[test]
    fn automated_addresses() {
        for address in [
            "MAILER-DAEMON@example.com",
            "owner-staff@lists.example",
            "staff-request@lists.example",
            "staff-bounces+bob=example.com@lists.example",
            "no-reply@shop.example",
        ] {
            assert!(is_automated_address(address), "{address}");
        }
        for address in [
            "postmaster@example.com",
            "bob@example.com",
            "requester@example.com",
        ] {
            assert!(!is_automated_address(address), "{address}");
        }
    }
}
