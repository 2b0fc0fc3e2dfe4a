//! Composition of the reply message with mail-builder (RFC 3834 section 3).

use mail_builder::MessageBuilder;
use mail_builder::headers::address::Address;
use mail_builder::headers::date::Date;
use mail_builder::headers::message_id::MessageId;
use mail_builder::headers::raw::Raw;
use mail_builder::headers::text::Text;
use mail_builder::mime::{BodyPart, MimePart};
use time::OffsetDateTime;

use super::headers::OriginalHeaders;
use crate::directory::AutoReplyKind;

/// Maximum characters of the original subject copied into a reply subject.
const MAX_SUBJECT_CHARS: usize = 200;

/// Maximum message ids in References. RFC 5322 sets no limit. Keeping the
/// first id (the thread root) and the latest ones bounds the field on long
/// threads and still lets readers thread the reply.
const MAX_REFERENCES: usize = 20;

/// Maximum line length, without CRLF, of a 7bit or 8bit MIME body
/// (RFC 5322 section 2.1.1, RFC 2045 section 2.8).
const MAX_LINE_OCTETS: usize = 998;

/// Attachment of a reply, besides its text.
#[derive(Clone, Copy, Debug)]
pub enum Attachment<'a> {
    None,
    /// The whole original message, attached as `message/rfc822`.
    Message(&'a [u8]),
    /// The header section of the original, attached as
    /// `text/rfc822-headers` (RFC 6522).
    Headers(&'a [u8]),
}

/// Everything that goes into one reply message.
#[derive(Clone, Debug)]
pub struct Reply<'a> {
    /// From: the account's address (RFC 3834 section 3.1.1).
    pub from: &'a str,
    /// To: the envelope sender of the original (RFC 3834 section 3.1.3).
    pub to: &'a str,
    pub subject: &'a str,
    /// Plain text body. Line breaks may be LF or CRLF.
    pub text: &'a str,
    pub attachment: Attachment<'a>,
    /// Message-ID of the reply, without angle brackets.
    pub message_id: &'a str,
    pub date: OffsetDateTime,
    /// Threading facts of the original.
    pub original: &'a OriginalHeaders,
}

/// Builds the reply and returns it with CRLF line endings, ready for the
/// spool. Header fields: From, To, Subject, Date, Message-ID, In-Reply-To
/// and References when the original had a Message-ID (RFC 3834 section
/// 3.1.6, RFC 5322 section 3.6.4), `Auto-Submitted: auto-replied` (RFC 3834
/// section 3.1.7) and `X-Auto-Response-Suppress: All`, which requests that
/// Microsoft Exchange responders send no reply to the reply.
///
/// An attached message must be valid as a 7bit or 8bit body (see
/// [`message_transfer_encoding`]) because `message/rfc822` allows no other
/// encoding (RFC 2046 section 5.2.1). The caller checks that first.
pub fn build_reply(reply: &Reply<'_>) -> Vec<u8> {
    let mut builder = MessageBuilder::new()
        .from(Address::new_address(None::<&str>, reply.from))
        .to(Address::new_address(None::<&str>, reply.to))
        .subject(Text::new(reply.subject))
        .date(Date::new(reply.date.unix_timestamp()))
        .message_id(MessageId::new(reply.message_id));

    if let Some(id) = &reply.original.message_id {
        builder = builder
            .in_reply_to(MessageId::new(id.as_str()))
            .references(MessageId::new_list(
                reference_ids(reply.original).into_iter(),
            ));
    }
    builder = builder
        .header("Auto-Submitted", Raw::new("auto-replied"))
        .header("X-Auto-Response-Suppress", Raw::new("All"));

    let text = MimePart::new("text/plain", BodyPart::Text(crlf_lines(reply.text).into()));
    let body = match reply.attachment {
        Attachment::None => text,
        Attachment::Message(message) => {
            // message_transfer_encoding was checked by the caller; 8bit is
            // the safe label if it was not, because it only claims CRLF
            // lines of at most 998 octets.
            let encoding = message_transfer_encoding(message).unwrap_or("8bit");
            let attached = MimePart::new("message/rfc822", BodyPart::Binary(message.into()))
                .transfer_encoding(encoding)
                .attachment("original.eml");
            MimePart::new("multipart/mixed", vec![text, attached])
        }
        Attachment::Headers(section) => {
            let mut attached =
                MimePart::new("text/rfc822-headers", BodyPart::Binary(section.into()));
            // Sent unchanged when valid as 7bit or 8bit, so the fields stay
            // readable. Otherwise mail-builder picks quoted-printable or
            // base64.
            if let Some(encoding) = message_transfer_encoding(section) {
                attached = attached.transfer_encoding(encoding);
            }
            MimePart::new(
                "multipart/mixed",
                vec![text, attached.attachment("original-headers.txt")],
            )
        }
    };
    let mut output = Vec::new();
    builder.body(body).serialize(&mut output);
    output
}

/// Returns the subject of a reply of `kind`.
///
/// Vacation and every-time replies use the configured subject. When it is
/// empty, they use `Auto: ` and the original subject, the prefix that RFC
/// 3834 section 3.1.5 suggests. Echo replies use `Echo: ` and the original
/// subject, or the configured subject when the original has none. The
/// copied subject loses control characters and is cut to
/// `MAX_SUBJECT_CHARS` characters.
pub fn reply_subject(kind: AutoReplyKind, configured: &str, original: Option<&str>) -> String {
    let configured = clean_subject(configured);
    let original = original.map(clean_subject).filter(|s| !s.is_empty());
    match (kind, original) {
        (AutoReplyKind::Echo, Some(original)) => format!("Echo: {original}"),
        (AutoReplyKind::Echo, None) if configured.is_empty() => "Echo".to_owned(),
        (AutoReplyKind::Echo, None) => configured,
        (_, _) if !configured.is_empty() => configured,
        (_, Some(original)) => format!("Auto: {original}"),
        (_, None) => "Auto: automatic reply".to_owned(),
    }
}

/// Returns the Content-Transfer-Encoding under which `message` can be sent
/// unchanged: `7bit` for ASCII and `8bit` otherwise. Returns None when it
/// is valid for neither, because of a NUL, a bare CR or LF, or a line
/// longer than 998 octets. RFC 2046 section 5.2.1 allows no other encoding
/// for `message/rfc822`.
pub fn message_transfer_encoding(message: &[u8]) -> Option<&'static str> {
    if message.contains(&0) {
        return None;
    }
    let mut line_start = 0;
    for (index, &byte) in message.iter().enumerate() {
        match byte {
            b'\r' if message.get(index + 1) != Some(&b'\n') => return None,
            b'\n' => {
                if index == 0 || message[index - 1] != b'\r' {
                    return None;
                }
                // index - 1 >= line_start holds, because the CR before this
                // LF is on the current line.
                if index - 1 - line_start > MAX_LINE_OCTETS {
                    return None;
                }
                line_start = index + 1;
            }
            _ => {}
        }
    }
    if message.len() - line_start > MAX_LINE_OCTETS {
        return None;
    }
    Some(if message.is_ascii() { "7bit" } else { "8bit" })
}

/// Returns the References ids of a reply: the original's References, or
/// its In-Reply-To when that names a single id and References is absent,
/// followed by the original's Message-ID (RFC 5322 section 3.6.4).
fn reference_ids(original: &OriginalHeaders) -> Vec<String> {
    let mut ids: Vec<String> = if !original.references.is_empty() {
        original.references.clone()
    } else if original.in_reply_to.len() == 1 {
        original.in_reply_to.clone()
    } else {
        Vec::new()
    };
    ids.extend(original.message_id.iter().cloned());
    if ids.len() > MAX_REFERENCES {
        ids.drain(1..ids.len() - (MAX_REFERENCES - 1));
    }
    ids
}

/// Replaces control characters (which includes CR and LF that a decoded
/// encoded word may contain) with spaces, collapses runs of white space and
/// cuts the result to `MAX_SUBJECT_CHARS` characters.
fn clean_subject(subject: &str) -> String {
    let spaced: String = subject
        .chars()
        .map(|ch| if ch.is_control() { ' ' } else { ch })
        .collect();
    spaced
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(MAX_SUBJECT_CHARS)
        .collect()
}

/// Converts every line break (LF, CR or CRLF) to CRLF and ends the text
/// with one, because the spool stores bodies as SMTP sends them.
fn crlf_lines(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 32 + 2);
    let mut chars = text.chars().peekable();
    while let Some(ch) = chars.next() {
        match ch {
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                out.push_str("\r\n");
            }
            '\n' => out.push_str("\r\n"),
            _ => out.push(ch),
        }
    }
    if !out.ends_with("\r\n") {
        out.push_str("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfer_encoding_classes() {
        assert_eq!(
            message_transfer_encoding(b"A: b\r\n\r\nhi\r\n"),
            Some("7bit")
        );
        assert_eq!(
            message_transfer_encoding("A: b\r\n\r\nh\u{e9}\r\n".as_bytes()),
            Some("8bit")
        );
        assert_eq!(message_transfer_encoding(b"A: b\n\nbare\n"), None);
        assert_eq!(message_transfer_encoding(b"A: b\r\n\r\nbare\rcr\r\n"), None);
        assert_eq!(message_transfer_encoding(b"A: b\r\n\r\nnul\0\r\n"), None);
        let mut long = b"A: b\r\n\r\n".to_vec();
        long.extend(std::iter::repeat_n(b'x', MAX_LINE_OCTETS));
        assert_eq!(message_transfer_encoding(&long), Some("7bit"));
        long.push(b'x');
        assert_eq!(message_transfer_encoding(&long), None);
        long.extend_from_slice(b"\r\n");
        assert_eq!(message_transfer_encoding(&long), None);
    }

    #[test]
    fn subjects_per_kind() {
        assert_eq!(
            reply_subject(AutoReplyKind::Vacation, "Away", Some("Hi")),
            "Away"
        );
        assert_eq!(
            reply_subject(AutoReplyKind::EveryTime, " ", Some("Hi\r\n there")),
            "Auto: Hi there"
        );
        assert_eq!(
            reply_subject(AutoReplyKind::Echo, "ignored", Some("Test")),
            "Echo: Test"
        );
        assert_eq!(reply_subject(AutoReplyKind::Echo, "", None), "Echo");
        let long = "x".repeat(500);
        assert_eq!(
            reply_subject(AutoReplyKind::Vacation, "", Some(&long)).len(),
            "Auto: ".len() + MAX_SUBJECT_CHARS
        );
    }

    #[test]
    fn references_are_bounded() {
        let original = OriginalHeaders {
            message_id: Some("last@x".into()),
            references: (0..30).map(|i| format!("{i}@x")).collect(),
            ..OriginalHeaders::default()
        };
        let ids = reference_ids(&original);
        assert_eq!(ids.len(), MAX_REFERENCES);
        assert_eq!(ids.first().map(String::as_str), Some("0@x"));
        assert_eq!(ids.get(1).map(String::as_str), Some("12@x"));
        assert_eq!(ids.last().map(String::as_str), Some("last@x"));
    }

    #[test]
    fn crlf_lines_normalises() {
        assert_eq!(crlf_lines("a\nb\r\nc\rd"), "a\r\nb\r\nc\r\nd\r\n");
        assert_eq!(crlf_lines(""), "\r\n");
    }
}
