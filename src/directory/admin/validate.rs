//! Checks and normalises operator input before it reaches the directory
//! tables: addresses, domain names, account and list names, mailboxes, group
//! names, times and intervals.
//!
//! Every function returns the value in its stored form, or an
//! [`AdminError::Invalid`] that names the rejected value and the expected
//! form. Addresses come out as `local-part@domain` with the local part
//! lowercased (as [`crate::directory::normalise_address`] does for lookups) and
//! the domain in lowercase A-labels. The local part is stored without quotes.

use std::time::Duration;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::AdminError;
use crate::directory::Mailbox;
use crate::policy::address::{Address, AddressError, Domain};

/// Maximum length of an account or list name, in characters.
const MAX_NAME_CHARS: usize = 255;
/// Maximum length of an auto-reply subject, in octets. A header line has at
/// most 998 octets (RFC 5322 section 2.1.1), and this leaves room for the
/// `Subject: ` field name and encoding.
const MAX_SUBJECT_OCTETS: usize = 900;

fn invalid(what: &'static str, value: &str, reason: impl Into<String>) -> AdminError {
    AdminError::Invalid {
        what,
        value: value.to_owned(),
        reason: reason.into(),
    }
}

/// Rewords an address parser error without repeating the value, which
/// [`AdminError::Invalid`] already shows.
fn address_reason(error: &AddressError) -> String {
    match error {
        AddressError::Empty => "the address is empty; expected local-part@domain".to_owned(),
        AddressError::MissingDomain { .. } => {
            "it has no '@domain'; expected local-part@domain, such as alice@example.com".to_owned()
        }
        AddressError::EmptyLocalPart { .. } => {
            "the local part before '@' is empty; expected local-part@domain".to_owned()
        }
        other => other.to_string(),
    }
}

/// Normalises a domain name: lowercase A-labels without a trailing dot.
///
/// # Errors
///
/// [`AdminError::Invalid`] for a syntax error or an address literal, because
/// the directory lists domain names only.
pub fn domain_name(text: &str) -> Result<String, AdminError> {
    let domain = Domain::parse(text.trim())
        .map_err(|error| invalid("domain", text, address_reason(&error)))?;
    match domain {
        Domain::Name(name) => Ok(name),
        Domain::Literal(_) => Err(invalid(
            "domain",
            text,
            "address literals cannot be directory domains; expected a domain name such as example.com",
        )),
    }
}

/// Normalises an address to `local-part@domain` and returns it with its
/// domain.
///
/// # Errors
///
/// [`AdminError::Invalid`] when the address does not parse, when its local
/// part contains `@`, `%` or `!`, or when its domain is an address literal.
/// A downstream MTA may take those characters as source routing, so such an
/// address could relay to a foreign domain.
pub fn address(text: &str) -> Result<(String, String), AdminError> {
    let text = text.trim();
    let parsed =
        Address::parse(text).map_err(|error| invalid("address", text, address_reason(&error)))?;
    if parsed.has_routing_characters() {
        return Err(invalid(
            "address",
            text,
            "the local part contains '@', '%' or '!', which mail routers may treat as a route to another host",
        ));
    }
    let Some(domain) = parsed.domain().as_name() else {
        return Err(invalid(
            "address",
            text,
            "address literals such as user@[192.0.2.1] cannot be stored in the directory; use a domain name",
        ));
    };
    let normalised = format!("{}@{}", parsed.local_part().to_lowercase(), domain);
    Ok((normalised, domain.to_owned()))
}

/// Normalises an address, or a catch-all `@domain`, and returns it with its
/// domain. A catch-all is stored with an empty local part.
///
/// # Errors
///
/// As [`address`], and [`domain_name`] for the domain of a catch-all.
pub fn address_or_catch_all(text: &str) -> Result<(String, String), AdminError> {
    let text = text.trim();
    match text.strip_prefix('@') {
        Some(domain) if !domain.contains('@') => {
            let domain = domain_name(domain).map_err(|error| match error {
                AdminError::Invalid { reason, .. } => invalid("catch-all address", text, reason),
                other => other,
            })?;
            Ok((format!("@{domain}"), domain))
        }
        _ => address(text),
    }
}

/// Checks an account or list name: 1 to 255 characters, no whitespace or
/// control characters, and not starting with '-' (it would read as an option).
///
/// # Errors
///
/// [`AdminError::Invalid`] with `what` as the kind of name.
pub fn object_name(what: &'static str, text: &str) -> Result<String, AdminError> {
    if text.is_empty() {
        return Err(invalid(what, text, "the name is empty"));
    }
    if text.chars().count() > MAX_NAME_CHARS {
        return Err(invalid(
            what,
            text,
            format!("the name is longer than {MAX_NAME_CHARS} characters"),
        ));
    }
    if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(
            what,
            text,
            "the name contains whitespace or a control character",
        ));
    }
    if text.starts_with('-') {
        return Err(invalid(what, text, "the name starts with '-'"));
    }
    Ok(text.to_owned())
}

/// Checks a downstream group name, with the same rule as the configuration:
/// letters, digits, '-' and '_'.
///
/// # Errors
///
/// [`AdminError::Invalid`] naming the group.
pub fn group_name(text: &str) -> Result<String, AdminError> {
    let valid = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if valid {
        Ok(text.to_owned())
    } else {
        Err(invalid(
            "group name",
            text,
            "expected letters, digits, '-' and '_', as in downstream_groups of the configuration",
        ))
    }
}

/// Checks a mailbox: a Maildir must be an absolute path; an LMTP target is
/// `host:port` or the absolute path of a Unix socket.
///
/// # Errors
///
/// [`AdminError::Invalid`] naming the path or target.
pub fn mailbox(mailbox: &Mailbox) -> Result<Mailbox, AdminError> {
    match mailbox {
        Mailbox::Maildir(path) => {
            if !path.starts_with('/') || path.chars().any(char::is_control) {
                return Err(invalid(
                    "Maildir path",
                    path,
                    "expected an absolute path without control characters, such as /var/mail/alice",
                ));
            }
            Ok(Mailbox::Maildir(path.clone()))
        }
        Mailbox::Lmtp(target) => {
            let is_socket = target.starts_with('/') && !target.chars().any(char::is_control);
            if !is_socket && !is_host_port(target) {
                return Err(invalid(
                    "LMTP target",
                    target,
                    "expected host:port (such as 127.0.0.1:24) or the absolute path of a Unix socket",
                ));
            }
            Ok(Mailbox::Lmtp(target.clone()))
        }
    }
}

/// True for `host:port` or `[v6]:port` with a non-empty host of letters,
/// digits, '.', '-', ':' and a port from 1 to 65535.
fn is_host_port(text: &str) -> bool {
    let Some((host, port)) = text.rsplit_once(':') else {
        return false;
    };
    let host = host
        .strip_prefix('[')
        .and_then(|inner| inner.strip_suffix(']'))
        .unwrap_or(host);
    let host_valid = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'));
    host_valid && port.parse::<u16>().is_ok_and(|port| port > 0)
}

/// Checks an auto-reply subject: not empty, at most 900 octets, and no
/// control characters, because a CR or LF would start a new header field.
///
/// # Errors
///
/// [`AdminError::Invalid`] naming the subject.
pub fn subject(text: &str) -> Result<String, AdminError> {
    if text.trim().is_empty() {
        return Err(invalid("subject", text, "the subject is empty"));
    }
    if text.len() > MAX_SUBJECT_OCTETS {
        return Err(invalid(
            "subject",
            text,
            format!("the subject is longer than {MAX_SUBJECT_OCTETS} octets"),
        ));
    }
    if text.chars().any(char::is_control) {
        return Err(invalid(
            "subject",
            text,
            "the subject contains a control character such as a line break",
        ));
    }
    Ok(text.to_owned())
}

/// Parses an RFC 3339 timestamp such as `2025-07-01T08:00:00+02:00`.
///
/// # Errors
///
/// [`AdminError::Invalid`] with `what` naming the option.
pub fn timestamp(what: &'static str, text: &str) -> Result<OffsetDateTime, AdminError> {
    OffsetDateTime::parse(text.trim(), &Rfc3339).map_err(|_| {
        invalid(
            what,
            text,
            "expected an RFC 3339 time with offset, such as 2025-07-01T08:00:00+02:00 or 2025-07-01T06:00:00Z",
        )
    })
}

/// Parses an interval: a positive whole number with the unit `s`, `m`, `h`,
/// `d` or `w`, such as `12h` or `7d`.
///
/// # Errors
///
/// [`AdminError::Invalid`] naming the interval.
pub fn interval(text: &str) -> Result<Duration, AdminError> {
    let reject = || {
        invalid(
            "interval",
            text,
            "expected a positive number with the unit s, m, h, d or w, such as 12h or 7d",
        )
    };
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let number: u64 = number.parse().map_err(|_| reject())?;
    let unit_seconds: u64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 604_800,
        _ => return Err(reject()),
    };
    let seconds = number.checked_mul(unit_seconds).ok_or_else(reject)?;
    // The column is a bigint, so the value must fit an i64.
    if seconds == 0 || i64::try_from(seconds).is_err() {
        return Err(reject());
    }
    Ok(Duration::from_secs(seconds))
}

/// Formats an interval in the largest unit that divides it, e.g. `7d`.
pub fn format_interval(interval: Duration) -> String {
    let seconds = interval.as_secs();
    for (unit, size) in [("w", 604_800), ("d", 86_400), ("h", 3600), ("m", 60)] {
        if seconds >= size && seconds.is_multiple_of(size) {
            return format!("{}{unit}", seconds / size);
        }
    }
    format!("{seconds}s")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_is_lowercased_with_a_label_domain() {
        let (address, domain) = address("Alice.Smith@Bücher.Example").expect("valid");
        assert_eq!(address, "alice.smith@xn--bcher-kva.example");
        assert_eq!(domain, "xn--bcher-kva.example");
    }

    #[test]
    fn address_rejects_routing_characters() {
        for text in ["a%b@example.com", "a!b@example.com", "a@b@example.com"] {
            let error = address(text).expect_err(text);
            assert!(error.to_string().contains("'%' or '!'"), "{error}");
        }
    }

    #[test]
    fn address_rejects_literal_and_missing_domain() {
        assert!(address("a@[192.0.2.1]").is_err());
        let error = address("alice").expect_err("no domain");
        assert!(error.to_string().contains("\"alice\""), "{error}");
    }

    #[test]
    fn catch_all_keeps_empty_local_part() {
        let (address, domain) = address_or_catch_all("@Example.COM").expect("valid");
        assert_eq!(address, "@example.com");
        assert_eq!(domain, "example.com");
        assert!(address_or_catch_all("@").is_err());
    }

    #[test]
    fn interval_units_and_limits() {
        assert_eq!(interval("7d").ok(), Some(Duration::from_secs(604_800)));
        assert_eq!(interval("12h").ok(), Some(Duration::from_secs(43_200)));
        assert_eq!(interval("90s").ok(), Some(Duration::from_secs(90)));
        for bad in ["", "0d", "7", "d", "1y", "-1h", "99999999999999999999w"] {
            assert!(interval(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn interval_formats_in_largest_unit() {
        assert_eq!(format_interval(Duration::from_secs(604_800)), "1w");
        assert_eq!(format_interval(Duration::from_secs(86_400 * 3)), "3d");
        assert_eq!(format_interval(Duration::from_secs(5400)), "90m");
        assert_eq!(format_interval(Duration::from_secs(61)), "61s");
    }

    #[test]
    fn mailbox_checks_paths_and_targets() {
        assert!(mailbox(&Mailbox::Maildir("/var/mail/a".into())).is_ok());
        assert!(mailbox(&Mailbox::Maildir("var/mail/a".into())).is_err());
        assert!(mailbox(&Mailbox::Lmtp("127.0.0.1:24".into())).is_ok());
        assert!(mailbox(&Mailbox::Lmtp("[::1]:24".into())).is_ok());
        assert!(mailbox(&Mailbox::Lmtp("/run/dovecot/lmtp".into())).is_ok());
        assert!(mailbox(&Mailbox::Lmtp("mail.example:0".into())).is_err());
        assert!(mailbox(&Mailbox::Lmtp("mail.example".into())).is_err());
    }

    #[test]
    fn names_reject_whitespace_and_leading_dash() {
        assert!(object_name("account name", "alice").is_ok());
        assert!(object_name("account name", "@example.com").is_ok());
        assert!(object_name("account name", "").is_err());
        assert!(object_name("account name", "a b").is_err());
        assert!(object_name("account name", "-a").is_err());
        assert!(group_name("legacy_1").is_ok());
        assert!(group_name("legacy 1").is_err());
    }

    #[test]
    fn subject_rejects_line_breaks() {
        assert!(subject("Away").is_ok());
        assert!(subject("Away\r\nBcc: x@example.com").is_err());
        assert!(subject(" ").is_err());
    }
}
