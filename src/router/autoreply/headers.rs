//! Header facts of a stored message that decide whether to reply and how
//! to thread the reply, parsed with mail-parser from the header section
//! alone.

use mail_parser::{HeaderName, HeaderValue, MessageParser};

/// Largest header section read for an auto-reply decision. A longer section
/// is cut at this bound and marked [`OriginalHeaders::truncated`].
pub const MAX_HEADER_SECTION: usize = 256 * 1024;

/// Maximum length of a message id copied into In-Reply-To and References. RFC 5322
/// sets no limit, but an id longer than a header line (998 octets) cannot
/// be written, and real ids are far shorter.
const MAX_MESSAGE_ID_LEN: usize = 250;

/// The header fields of a stored message that auto-replies use.
///
/// Addresses are lowercased. Values come from an unauthenticated message,
/// so they are only compared or, after checks, copied into a reply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OriginalHeaders {
    /// Message-ID without angle brackets, when it is an id that can be
    /// written back into In-Reply-To and References.
    pub message_id: Option<String>,
    /// Subject, unfolded and with encoded words decoded.
    pub subject: Option<String>,
    /// Addresses of every From field.
    pub from: Vec<String>,
    /// Addresses of every To, Cc, Bcc, Resent-To, Resent-Cc and Resent-Bcc
    /// field: the recipient fields of RFC 3834 section 2.
    pub recipients: Vec<String>,
    /// First keyword of every Auto-Submitted field, lowercased (RFC 3834
    /// section 5), for example `no` or `auto-replied`. An empty field gives
    /// an empty string.
    pub auto_submitted: Vec<String>,
    /// First word of every Precedence field, lowercased, for example `bulk`.
    pub precedence: Vec<String>,
    /// Items of every X-Auto-Response-Suppress field, lowercased, for
    /// example `all` or `oof`. Microsoft Exchange and Outlook set this field
    /// to ask that no automatic replies be sent.
    pub auto_response_suppress: Vec<String>,
    /// True when any List-* field (RFC 2369, RFC 2919) is present.
    pub has_list_headers: bool,
    /// Message ids of the References field, in order, without brackets.
    pub references: Vec<String>,
    /// Message ids of the In-Reply-To field, without brackets.
    pub in_reply_to: Vec<String>,
    /// True when the bytes given ended before the blank line that closes
    /// the header section, so fields after the cut are unknown.
    pub truncated: bool,
}

impl OriginalHeaders {
    /// Parses the header section at the start of `message`, which may be
    /// the whole message or any prefix of it. `message_size` is the size of
    /// the whole stored message: when `message` contains no blank line and
    /// is shorter than that, the header section was cut off.
    pub fn parse(message: &[u8], message_size: u64) -> OriginalHeaders {
        let (section, complete) = header_section(message);
        let mut headers = OriginalHeaders {
            truncated: !complete && (message.len() as u64) < message_size,
            ..OriginalHeaders::default()
        };

        // mail-parser returns None when it finds no header field at all.
        let Some(parsed) = MessageParser::new().parse_headers(section) else {
            return headers;
        };
        for header in parsed.headers() {
            headers.add_field(&header.name, &header.value);
        }
        headers
    }

    fn add_field(&mut self, name: &HeaderName<'_>, value: &HeaderValue<'_>) {
        match name {
            HeaderName::MessageId => {
                if self.message_id.is_none() {
                    self.message_id = value
                        .as_text()
                        .filter(|id| is_usable_message_id(id))
                        .map(str::to_owned);
                }
            }
            HeaderName::Subject => {
                if self.subject.is_none() {
                    self.subject = value.as_text().map(str::to_owned);
                }
            }
            HeaderName::From => add_addresses(&mut self.from, value),
            HeaderName::To
            | HeaderName::Cc
            | HeaderName::Bcc
            | HeaderName::ResentTo
            | HeaderName::ResentCc
            | HeaderName::ResentBcc => add_addresses(&mut self.recipients, value),
            HeaderName::AutoSubmitted => {
                self.auto_submitted.push(first_keyword(raw_text(value)));
            }
            HeaderName::References => add_message_ids(&mut self.references, value),
            HeaderName::InReplyTo => add_message_ids(&mut self.in_reply_to, value),
            _ => {
                let field = name.as_str();
                if field.eq_ignore_ascii_case("precedence") {
                    self.precedence.push(first_keyword(raw_text(value)));
                } else if field.eq_ignore_ascii_case("x-auto-response-suppress") {
                    self.auto_response_suppress.extend(
                        raw_text(value)
                            .split(',')
                            .map(|item| item.trim().to_ascii_lowercase())
                            .filter(|item| !item.is_empty()),
                    );
                } else if field
                    .get(..5)
                    .is_some_and(|prefix| prefix.eq_ignore_ascii_case("list-"))
                {
                    self.has_list_headers = true;
                }
            }
        }
    }
}

/// Splits the header section off the start of `message`. Returns the
/// section including the line break of its last field, and whether the
/// blank line that ends it was found.
pub fn header_section(message: &[u8]) -> (&[u8], bool) {
    // A message that starts with a blank line has an empty header section.
    if message.starts_with(b"\r\n") || message.starts_with(b"\n") {
        return (&message[..0], true);
    }
    for newline in memchr::memchr_iter(b'\n', message) {
        let rest = &message[newline + 1..];
        if rest.starts_with(b"\r\n") || rest.starts_with(b"\n") {
            return (&message[..=newline], true);
        }
    }
    (message, false)
}

/// Returns true when `id` can be written back between angle brackets: a
/// non-empty run of visible ASCII characters without brackets or spaces.
fn is_usable_message_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_MESSAGE_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'<' && b != b'>')
}

fn add_addresses(target: &mut Vec<String>, value: &HeaderValue<'_>) {
    let Some(addresses) = value.as_address() else {
        return;
    };
    target.extend(
        addresses
            .iter()
            .filter_map(|addr| addr.address())
            .map(str::to_lowercase),
    );
}

fn add_message_ids(target: &mut Vec<String>, value: &HeaderValue<'_>) {
    let Some(ids) = value.as_text_list() else {
        return;
    };
    target.extend(
        ids.iter()
            .filter(|id| is_usable_message_id(id))
            .map(|id| id.to_string()),
    );
}

/// Returns the text of a field that mail-parser keeps unparsed (fields it does not
/// know, and Auto-Submitted).
fn raw_text<'a>(value: &'a HeaderValue<'_>) -> &'a str {
    value.as_text().unwrap_or("")
}

/// Returns the first word of a field value, lowercased, after leading
/// white space and comments. The word ends at white space, `;` or `(`, as
/// the keyword of an Auto-Submitted field does (RFC 3834 section 5).
fn first_keyword(value: &str) -> String {
    let mut rest = value.trim_start();
    // Skip leading comments, which may nest (RFC 5322 section 3.2.2).
    while rest.starts_with('(') {
        let mut depth = 0_usize;
        let mut end = rest.len();
        for (index, ch) in rest.char_indices() {
            match ch {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = index + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = rest[end..].trim_start();
    }
    let end = rest
        .find(|ch: char| ch.is_whitespace() || ch == ';' || ch == '(')
        .unwrap_or(rest.len());
    rest[..end].to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_keyword_skips_comments() {
        assert_eq!(first_keyword("  auto-replied"), "auto-replied");
        assert_eq!(first_keyword("(vacation (nested)) No"), "no");
        assert_eq!(first_keyword("auto-generated; type=x"), "auto-generated");
        assert_eq!(first_keyword("Bulk(comment)"), "bulk");
        assert_eq!(first_keyword(""), "");
        assert_eq!(first_keyword("(unclosed"), "");
    }

    #[test]
    fn header_section_finds_blank_line() {
        assert_eq!(
            header_section(b"A: 1\r\nB: 2\r\n\r\nbody"),
            (&b"A: 1\r\nB: 2\r\n"[..], true)
        );
        assert_eq!(header_section(b"A: 1\n\nbody"), (&b"A: 1\n"[..], true));
        assert_eq!(header_section(b"\r\nbody"), (&b""[..], true));
        assert_eq!(
            header_section(b"A: 1\r\nB: 2"),
            (&b"A: 1\r\nB: 2"[..], false)
        );
    }

    #[test]
    fn message_id_checks() {
        assert!(is_usable_message_id("abc.123@example.com"));
        assert!(!is_usable_message_id(""));
        assert!(!is_usable_message_id("a b@example.com"));
        assert!(!is_usable_message_id("a>b@example.com"));
        assert!(!is_usable_message_id(&"x".repeat(MAX_MESSAGE_ID_LEN + 1)));
    }
}
