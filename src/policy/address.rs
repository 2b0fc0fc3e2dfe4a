//! Address normalisation for the anti-relay decision.
//!
//! [`Address::parse`] takes the path from `MAIL FROM:<…>` or `RCPT TO:<…>` as the
//! SMTP command parser hands it over, and splits it into a local part and a
//! normalised [`Domain`]. The relay decision compares that domain with the
//! configured local and relay domains, which go through [`Domain::parse`] as
//! well. Both sides of the comparison then have one spelling, which is
//! lowercase A-labels without a trailing dot, or an IP address for a literal.
//!
//! Trusted input: the command parser has already removed a source route
//! (`@a,@b:user@dom` arrives as `user@dom`) and the quotes and backslash escapes
//! of a quoted local part (`"a@b"@x` arrives as `a@b@x`). This module therefore
//! splits at the last `@`, because a domain never contains `@` but an unquoted
//! local part may. It does not check the local part against the RFC 5321
//! grammar, since the quoting is gone. It only rejects control characters and
//! an empty or over-long local part. [`Address::has_routing_characters`] reports
//! `@`, `%` and `!` in the local part so that policy can reject them.
//!
//! Errors: every failure is an [`AddressError`] whose message quotes the
//! offending value in Rust debug form, so that control characters from the
//! network are escaped in logs.
//!
//! Known gaps: the null reverse path `<>` is the caller's case, because an empty
//! string is [`AddressError::Empty`] here. Only the `IPv6:` tag of RFC 5321
//! section 4.1.3 is accepted in an address literal. General address literals
//! (`[tag:…]`) are rejected. Length limits are checked on the input as given,
//! so the A-label form of a long internationalised address may exceed 254 octets.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Maximum length of a local part in octets (RFC 5321 section 4.5.3.1.1).
const MAX_LOCAL_PART_OCTETS: usize = 64;
/// Maximum length of an address in octets: a path is at most 256 octets
/// including its angle brackets (RFC 5321 section 4.5.3.1.3).
const MAX_ADDRESS_OCTETS: usize = 254;
/// Maximum length of a domain name in octets without a trailing dot (RFC 1035
/// section 2.3.4 allows 255 octets in wire form, which is 253 in text form).
const MAX_DOMAIN_OCTETS: usize = 253;
/// Maximum length of a label in octets (RFC 1035 section 2.3.4).
const MAX_LABEL_OCTETS: usize = 63;

/// Tag of an IPv6 address literal (RFC 5321 section 4.1.3), matched in any case.
const IPV6_TAG: &str = "IPv6:";

/// Reasons why an address or a domain is rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("address is empty")]
    Empty,

    #[error("{value:?} contains a control character (below 0x20 or 0x7f)")]
    ControlCharacter { value: String },

    #[error("address {address:?} has no '@' and so no domain")]
    MissingDomain { address: String },

    #[error("address {address:?} has an empty local part before the '@'")]
    EmptyLocalPart { address: String },

    #[error(
        "local part {local_part:?} is {length} octets long, more than the maximum of 64 octets (RFC 5321 section 4.5.3.1.1)"
    )]
    LocalPartTooLong { local_part: String, length: usize },

    #[error("invalid domain {domain:?}: {reason}")]
    InvalidDomain { domain: String, reason: String },

    #[error(
        "invalid address literal {literal:?}: expected [a.b.c.d] or [IPv6:address] (RFC 5321 section 4.1.3)"
    )]
    InvalidLiteral { literal: String },

    #[error("address {address:?} is {length} octets long, more than the maximum of 254 octets")]
    TooLong { address: String, length: usize },
}

/// The domain of an address or of a configuration entry, in the one form used
/// for comparison.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Domain {
    /// A domain name as lowercase A-labels, without a trailing dot.
    Name(String),
    /// An address literal. IPv4-mapped IPv6 addresses are stored as IPv4, so
    /// `[IPv6:::ffff:192.0.2.1]` and `[192.0.2.1]` compare equal.
    Literal(IpAddr),
}

impl Domain {
    /// Normalises a domain from configuration or from an address.
    ///
    /// A name is mapped with UTS #46 to lowercase A-labels, one trailing dot is
    /// removed, and the result must be an LDH host name that is not all-numeric.
    /// A value in square brackets must be an IPv4 or `IPv6:` address literal.
    ///
    /// # Errors
    ///
    /// [`AddressError::ControlCharacter`], [`AddressError::InvalidLiteral`] or
    /// [`AddressError::InvalidDomain`] with the reason.
    pub fn parse(raw: &str) -> Result<Domain, AddressError> {
        reject_control_characters(raw)?;

        if raw.starts_with('[') {
            return parse_literal(raw);
        }

        parse_name(raw)
    }

    /// Returns the A-label name, or `None` for an address literal.
    pub fn as_name(&self) -> Option<&str> {
        match self {
            Domain::Name(name) => Some(name),
            Domain::Literal(_) => None,
        }
    }
}

impl fmt::Display for Domain {
    /// Writes the domain as it appears in an SMTP command (RFC 5321 section 4.1.3).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Domain::Name(name) => f.write_str(name),
            Domain::Literal(IpAddr::V4(ip)) => write!(f, "[{ip}]"),
            Domain::Literal(IpAddr::V6(ip)) => write!(f, "[IPv6:{ip}]"),
        }
    }
}

/// Parses `[a.b.c.d]` or `[IPv6:…]`, with the tag in any letter case.
fn parse_literal(raw: &str) -> Result<Domain, AddressError> {
    let invalid = || AddressError::InvalidLiteral {
        literal: raw.to_owned(),
    };

    let inner = raw
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .ok_or_else(invalid)?;

    // The tag is matched on bytes so that a multi-byte character at offset 5
    // cannot cause a slicing panic.
    let has_ipv6_tag = inner.len() >= IPV6_TAG.len()
        && inner.as_bytes()[..IPV6_TAG.len()].eq_ignore_ascii_case(IPV6_TAG.as_bytes());

    let ip = if has_ipv6_tag {
        // Ipv6Addr's parser rejects zone identifiers and surrounding spaces.
        let ip: Ipv6Addr = inner[IPV6_TAG.len()..].parse().map_err(|_| invalid())?;
        IpAddr::V6(ip)
    } else {
        // Ipv4Addr's parser accepts only four decimal octets without leading
        // zeros, so octal or hexadecimal spellings are rejected.
        let ip: Ipv4Addr = inner.parse().map_err(|_| invalid())?;
        IpAddr::V4(ip)
    };

    Ok(Domain::Literal(ip.to_canonical()))
}

/// Maps a domain name to lowercase A-labels and checks its syntax.
fn parse_name(raw: &str) -> Result<Domain, AddressError> {
    let invalid = |reason: String| AddressError::InvalidDomain {
        domain: raw.to_owned(),
        reason,
    };

    if raw.is_empty() {
        return Err(invalid("the domain is empty".to_owned()));
    }

    // UTS #46 mapping lowercases, applies NFC, maps full-width and ideographic
    // full stops to '.', and converts U-labels to A-labels. It also decodes
    // existing A-labels and rejects them when the Punycode is invalid.
    let mapped = idna::domain_to_ascii(raw).map_err(|_| {
        invalid("not a valid internationalised domain name (UTS #46 processing failed)".to_owned())
    })?;

    // The trailing dot is removed after mapping so that a trailing full-width
    // dot is removed too. Only one dot goes, so "example.com.." keeps an empty
    // label and is rejected below.
    let name = mapped.strip_suffix('.').unwrap_or(&mapped);

    if name.is_empty() {
        return Err(invalid("the domain is empty".to_owned()));
    }
    if name.len() > MAX_DOMAIN_OCTETS {
        return Err(invalid(format!(
            "the A-label form is {} octets long, more than the maximum of {MAX_DOMAIN_OCTETS}",
            name.len()
        )));
    }

    for label in name.split('.') {
        check_label(label).map_err(invalid)?;
    }

    // A final label of digits only makes the name look like an IPv4 address
    // (for example "192.0.2.1" or the short form "3221225985" that inet_aton
    // accepts), and no top-level domain is all-numeric. An IP address must be
    // written as a literal in square brackets (RFC 5321 section 4.1.3).
    let last_label = name.rsplit('.').next().unwrap_or(name);
    if last_label.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(invalid(
            "the last label is all digits; write an IP address as [a.b.c.d]".to_owned(),
        ));
    }

    Ok(Domain::Name(name.to_owned()))
}

/// Checks one A-label against the LDH rule of RFC 1123 section 2.1.
fn check_label(label: &str) -> Result<(), String> {
    if label.is_empty() {
        return Err("the domain has an empty label".to_owned());
    }
    if label.len() > MAX_LABEL_OCTETS {
        return Err(format!(
            "label {label:?} is {} octets long, more than the maximum of {MAX_LABEL_OCTETS}",
            label.len()
        ));
    }
    if let Some(bad) = label
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
    {
        return Err(format!(
            "label {label:?} contains {bad:?}; only letters, digits and '-' are allowed"
        ));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(format!("label {label:?} starts or ends with '-'"));
    }
    Ok(())
}

/// A mail address split into its local part and normalised domain.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Address {
    /// The local part without quotes or escapes, in the case given, because
    /// only the receiving host may interpret its case (RFC 5321 section 2.4).
    local_part: String,
    domain: Domain,
}

impl Address {
    /// Parses an address as the command parser hands it over, splitting at the
    /// last '@' because a quoted local part may contain '@'.
    ///
    /// # Errors
    ///
    /// Any [`AddressError`] variant, for the first check that fails.
    pub fn parse(raw: &str) -> Result<Address, AddressError> {
        if raw.is_empty() {
            return Err(AddressError::Empty);
        }
        reject_control_characters(raw)?;
        if raw.len() > MAX_ADDRESS_OCTETS {
            return Err(AddressError::TooLong {
                address: raw.to_owned(),
                length: raw.len(),
            });
        }

        let Some((local_part, domain)) = raw.rsplit_once('@') else {
            return Err(AddressError::MissingDomain {
                address: raw.to_owned(),
            });
        };

        if local_part.is_empty() {
            return Err(AddressError::EmptyLocalPart {
                address: raw.to_owned(),
            });
        }
        if local_part.len() > MAX_LOCAL_PART_OCTETS {
            return Err(AddressError::LocalPartTooLong {
                local_part: local_part.to_owned(),
                length: local_part.len(),
            });
        }

        let domain = Domain::parse(domain)?;

        Ok(Address {
            local_part: local_part.to_owned(),
            domain,
        })
    }

    /// Returns the local part without quotes or escapes, case preserved.
    pub fn local_part(&self) -> &str {
        &self.local_part
    }

    pub fn domain(&self) -> &Domain {
        &self.domain
    }

    /// Reports whether the local part contains '@', '%' or '!'.
    ///
    /// A downstream MTA may treat these as sender-specified routing
    /// (`user%foreign.org@example.com`, `foreign.org!user@example.com`, or a
    /// quoted `"user@foreign.org"@example.com`), which would turn a local
    /// recipient into a relay to a foreign domain.
    pub fn has_routing_characters(&self) -> bool {
        self.local_part.contains(['@', '%', '!'])
    }

    /// Reports whether the local part is "postmaster" in any letter case, which
    /// RFC 5321 section 4.5.1 requires to be matched case-insensitively.
    pub fn is_postmaster(&self) -> bool {
        self.local_part.eq_ignore_ascii_case("postmaster")
    }

    /// Formats the address as it must be written in an SMTP command.
    ///
    /// The local part is written as a dot-atom when it is one, and otherwise as
    /// a quoted-string with '"' and '\' escaped (RFC 5321 section 4.1.2). The
    /// domain is written in A-label form, and literals as `[a.b.c.d]` or
    /// `[IPv6:…]`.
    pub fn to_smtp(&self) -> String {
        let mut out = String::with_capacity(self.local_part.len() + 2 + 32);

        if is_dot_atom(&self.local_part) {
            out.push_str(&self.local_part);
        } else {
            out.push('"');
            for c in self.local_part.chars() {
                if c == '"' || c == '\\' {
                    out.push('\\');
                }
                out.push(c);
            }
            out.push('"');
        }

        out.push('@');
        out.push_str(&self.domain.to_string());
        out
    }
}

impl fmt::Display for Address {
    /// Writes the same text as [`Address::to_smtp`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_smtp())
    }
}

/// Rejects C0 control characters and DEL, which no part of an address may
/// contain (RFC 5321 section 4.1.2 excludes them from atext and qtextSMTP).
fn reject_control_characters(value: &str) -> Result<(), AddressError> {
    if value.bytes().any(|byte| byte < 0x20 || byte == 0x7f) {
        return Err(AddressError::ControlCharacter {
            value: value.to_owned(),
        });
    }
    Ok(())
}

/// Reports whether `local_part` is a Dot-string: atoms separated by single dots
/// (RFC 5321 section 4.1.2). Non-ASCII characters count as atext because
/// SMTPUTF8 (RFC 6531) adds UTF-8 characters to atext.
fn is_dot_atom(local_part: &str) -> bool {
    local_part
        .split('.')
        .all(|atom| !atom.is_empty() && atom.chars().all(is_atext))
}

/// Reports whether `c` is atext (RFC 5322 section 3.2.3) or a non-ASCII
/// character, which SMTPUTF8 allows in atext.
fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii()
}

#[cfg(test)]
mod tests;
