//! Text of the `message/delivery-status` fields (RFC 3464 section 2) and of
//! the human-readable part: US-ASCII cleaning, typed addresses, xtext
//! decoding, dates, folding and wrapping.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc2822;

/// Preferred maximum length of a line, without CRLF (RFC 5322 section
/// 2.1.1).
const FOLD_WIDTH: usize = 78;

/// Maximum length of a line of the human-readable text. mail-builder
/// 2.0 encodes a text part as quoted-printable when a line exceeds 75
/// octets, so ASCII text within this width stays readable 7bit.
const TEXT_WIDTH: usize = 72;

/// Maximum bytes of a run without spaces on one line. A longer run is cut
/// into pieces, which adds a space when the field is unfolded but keeps
/// every line far below the 998-octet limit.
const MAX_WORD: usize = 900;

/// Returns `text` as printable US-ASCII on one line: control characters
/// (line breaks included) become spaces, runs of white space collapse to
/// one space, and each non-ASCII character becomes `?`.
pub(super) fn ascii_text(text: &str) -> String {
    let replaced: String = text
        .chars()
        .map(|ch| match ch {
            ' '..='~' => ch,
            _ if ch.is_control() => ' ',
            _ => '?',
        })
        .collect();
    collapse_spaces(&replaced)
}

/// Returns `text` on one line for the human-readable part: control
/// characters become spaces and runs of white space collapse. Non-ASCII
/// characters stay, because that part is UTF-8.
pub(super) fn display_text(text: &str) -> String {
    let replaced: String = text
        .chars()
        .map(|ch| if ch.is_control() { ' ' } else { ch })
        .collect();
    collapse_spaces(&replaced)
}

fn collapse_spaces(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Returns a host name for a `dns` MTA name type: the A-label form when
/// `host` is an internationalised name, otherwise `host` as US-ASCII.
pub(super) fn ascii_host(host: &str) -> String {
    if host.is_ascii() {
        return ascii_text(host);
    }
    match idna::domain_to_ascii(host) {
        Ok(name) => name,
        Err(_) => ascii_text(host),
    }
}

/// Returns the value of a Final-Recipient field: `rfc822; address` for an
/// ASCII address, and `utf-8; ` with the utf-8-addr-xtext form for an
/// internationalised one (RFC 6533 section 3), which keeps the field
/// US-ASCII.
pub(super) fn typed_address(address: &str) -> String {
    if address.is_ascii() {
        format!("rfc822; {}", ascii_text(address))
    } else {
        format!("utf-8; {}", utf8_addr_xtext(address))
    }
}

/// Returns the value of an Original-Recipient field for an ORCPT value.
///
/// Two forms are accepted: `addr-type;xtext` as given in the RCPT command
/// (RFC 3461 section 4.2), whose xtext is decoded, and a bare address,
/// which is taken as already decoded and of type `rfc822`. wsmtp's listener
/// stores the second form. An address of type `utf-8`, or an `rfc822` one
/// that turns out non-ASCII, is written in the utf-8-addr-xtext form.
pub(super) fn original_recipient(orcpt: &str) -> String {
    let (address_type, address) = match split_address_type(orcpt) {
        Some((address_type, encoded)) => (address_type, xtext_decode(encoded)),
        None => ("rfc822", orcpt.to_owned()),
    };
    if address_type.eq_ignore_ascii_case("utf-8") {
        return format!(
            "utf-8; {}",
            utf8_addr_xtext(&decode_embedded_unicode(&address))
        );
    }
    if address_type.eq_ignore_ascii_case("rfc822") && !address.is_ascii() {
        return format!("utf-8; {}", utf8_addr_xtext(&address));
    }
    format!("{address_type}; {}", ascii_text(&address))
}

/// Splits `addr-type;value` when the part before the first `;` is a valid
/// address type: letters, digits and hyphens, starting with a letter or
/// digit, like the registered types `rfc822` and `utf-8`.
fn split_address_type(value: &str) -> Option<(&str, &str)> {
    let (address_type, rest) = value.split_once(';')?;
    let valid = address_type
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric())
        && address_type
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
    valid.then_some((address_type, rest))
}

/// Decodes xtext (RFC 3461 section 4): each `+` and two upper-case hex
/// digits stand for one octet. A `+` without two hex digits after it is
/// kept as it is. Octets that do not form UTF-8 become U+FFFD.
pub(super) fn xtext_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'+'
            && let Some(octet) = bytes.get(index + 1..index + 3).and_then(hex_octet)
        {
            decoded.push(octet);
            index += 3;
            continue;
        }
        decoded.push(bytes[index]);
        index += 1;
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

fn hex_octet(digits: &[u8]) -> Option<u8> {
    let text = std::str::from_utf8(digits).ok()?;
    // RFC 3461 requires upper-case digits, but lower case is accepted
    // because its meaning is clear.
    if !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u8::from_str_radix(text, 16).ok()
}

/// Encodes an address in the utf-8-addr-xtext form of RFC 6533 section 3:
/// printable ASCII except `+`, `=` and `\` stays, and every other character
/// becomes `\x{HEX}` with its code point in upper-case hex.
fn utf8_addr_xtext(address: &str) -> String {
    let mut encoded = String::with_capacity(address.len() + 16);
    for ch in address.chars() {
        match ch {
            '!'..='~' if !matches!(ch, '+' | '=' | '\\') => encoded.push(ch),
            _ => encoded.push_str(&format!("\\x{{{:X}}}", u32::from(ch))),
        }
    }
    encoded
}

/// Replaces each `\x{HEX}` of a utf-8-addr-xtext value with its character,
/// so the value can be encoded again uniformly. Other text stays.
fn decode_embedded_unicode(value: &str) -> String {
    let mut decoded = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("\\x{") {
        decoded.push_str(&rest[..start]);
        let after = &rest[start + 3..];
        let character = after.find('}').and_then(|end| {
            let digits = &after[..end];
            let valid =
                (1..=6).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_hexdigit());
            valid
                .then(|| u32::from_str_radix(digits, 16).ok())
                .flatten()
                .and_then(char::from_u32)
                .map(|ch| (ch, end))
        });
        match character {
            Some((ch, end)) => {
                decoded.push(ch);
                rest = &after[end + 1..];
            }
            None => {
                decoded.push_str("\\x{");
                rest = after;
            }
        }
    }
    decoded.push_str(rest);
    decoded
}

/// Formats a date-time as RFC 5322 requires, in UTC. Returns None for a
/// year before 1900, which that format cannot express.
pub(super) fn format_date(at: OffsetDateTime) -> Option<String> {
    at.to_offset(time::UtcOffset::UTC).format(&Rfc2822).ok()
}

/// Appends `name: value` and CRLF, folded before spaces so that lines stay
/// near 78 octets (RFC 5322 section 2.2.3). `value` must be US-ASCII
/// without line breaks, as the functions above return it.
pub(super) fn push_field(out: &mut String, name: &str, value: &str) {
    debug_assert!(value.is_ascii() && !value.contains(['\r', '\n']));
    out.push_str(name);
    out.push(':');
    let mut column = name.len() + 1;
    let mut line_has_word = false;
    for word in value.split(' ') {
        for (index, piece) in word_pieces(word).into_iter().enumerate() {
            // A cut piece always starts a new line, so the space that the
            // fold adds separates the pieces of one run.
            let overflows = column + 1 + piece.len() > FOLD_WIDTH || index > 0;
            if line_has_word && !piece.is_empty() && overflows {
                out.push_str("\r\n");
                column = 0;
            }
            out.push(' ');
            out.push_str(piece);
            column += 1 + piece.len();
            line_has_word |= !piece.is_empty();
        }
    }
    out.push_str("\r\n");
}

/// Appends `text` as lines of at most `TEXT_WIDTH` bytes where its words allow, each
/// line starting with `indent` and ending with CRLF. White space in `text`
/// is collapsed.
pub(super) fn push_wrapped(out: &mut String, text: &str, indent: &str) {
    let mut line = String::from(indent);
    for word in text.split_whitespace().flat_map(word_pieces) {
        if line.len() > indent.len() && line.len() + 1 + word.len() > TEXT_WIDTH {
            out.push_str(&line);
            out.push_str("\r\n");
            line.truncate(0);
            line.push_str(indent);
        }
        if line.len() > indent.len() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if line.len() > indent.len() {
        out.push_str(&line);
        out.push_str("\r\n");
    }
}

/// Cuts `word` into pieces of at most `MAX_WORD` bytes at character
/// boundaries. An empty word gives one empty piece.
fn word_pieces(word: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut rest = word;
    while rest.len() > MAX_WORD {
        let mut end = MAX_WORD;
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        pieces.push(&rest[..end]);
        rest = &rest[end..];
    }
    pieces.push(rest);
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xtext_decoding() {
        assert_eq!(xtext_decode("a+2Bb+3Dc+20d"), "a+b=c d");
        assert_eq!(
            xtext_decode("George+20@Tax-+20ME+20.GOV"),
            "George @Tax- ME .GOV"
        );
        assert_eq!(xtext_decode("plain"), "plain");
        assert_eq!(xtext_decode("a+"), "a+", "incomplete escape kept");
        assert_eq!(xtext_decode("a+G1"), "a+G1", "invalid escape kept");
        assert_eq!(xtext_decode("+C3+A9"), "\u{e9}", "octets form UTF-8");
        assert_eq!(xtext_decode("+0D+0A"), "\r\n", "decoding only, no cleaning");
    }

    #[test]
    fn original_recipient_forms() {
        assert_eq!(
            original_recipient("rfc822;a+2Bb@x.org"),
            "rfc822; a+b@x.org"
        );
        assert_eq!(original_recipient("RFC822;a@x.org"), "RFC822; a@x.org");
        assert_eq!(
            original_recipient("a+b@x.org"),
            "rfc822; a+b@x.org",
            "a bare address is already decoded"
        );
        assert_eq!(
            original_recipient("rfc822;b+C3+BCr@x.org"),
            "utf-8; b\\x{FC}r@x.org",
            "non-ASCII after decoding"
        );
        assert_eq!(
            original_recipient("utf-8;b\\x{FC}r@x.org"),
            "utf-8; b\\x{FC}r@x.org",
            "utf-8-addr-xtext kept"
        );
        assert_eq!(
            original_recipient("utf-8;b\u{fc}r@x.org"),
            "utf-8; b\\x{FC}r@x.org",
            "utf-8-addr-unitext encoded"
        );
        assert_eq!(
            original_recipient("rfc822;a+0D+0ABcc:@x.org"),
            "rfc822; a Bcc:@x.org",
            "decoded line breaks removed"
        );
        assert_eq!(
            original_recipient("\"a;b\"@x.org"),
            "rfc822; \"a;b\"@x.org",
            "a quoted semicolon is no type"
        );
    }

    #[test]
    fn typed_addresses() {
        assert_eq!(typed_address("bob@example.org"), "rfc822; bob@example.org");
        assert_eq!(
            typed_address("j\u{f6}rg+x=y@b\u{fc}cher.example"),
            "utf-8; j\\x{F6}rg\\x{2B}x\\x{3D}y@b\\x{FC}cher.example"
        );
        assert_eq!(typed_address("\u{4e2d}@x.org"), "utf-8; \\x{4E2D}@x.org");
    }

    #[test]
    fn embedded_unicode_decoding() {
        assert_eq!(decode_embedded_unicode("a\\x{E9}b"), "a\u{e9}b");
        assert_eq!(decode_embedded_unicode("a\\x{}b"), "a\\x{}b");
        assert_eq!(decode_embedded_unicode("a\\x{110000}"), "a\\x{110000}");
        assert_eq!(decode_embedded_unicode("a\\x{E9"), "a\\x{E9");
    }

    #[test]
    fn ascii_cleaning() {
        assert_eq!(ascii_text("550 no\r\nsuch\tuser "), "550 no such user");
        assert_eq!(ascii_text("caf\u{e9}\u{7}"), "caf?");
        assert_eq!(display_text("caf\u{e9}\r\n ok"), "caf\u{e9} ok");
    }

    #[test]
    fn hosts_become_ascii() {
        assert_eq!(ascii_host("mx.example.org"), "mx.example.org");
        assert_eq!(ascii_host("b\u{fc}cher.example"), "xn--bcher-kva.example");
        assert_eq!(ascii_host("[192.0.2.1]"), "[192.0.2.1]");
    }

    #[test]
    fn dates_in_rfc5322_form() {
        let at = time::macros::datetime!(2025-03-10 12:00:05 +01:00);
        assert_eq!(
            format_date(at).as_deref(),
            Some("Mon, 10 Mar 2025 11:00:05 +0000")
        );
        assert_eq!(
            format_date(time::macros::datetime!(1850-01-01 0:00 UTC)),
            None
        );
    }

    #[test]
    fn fields_fold_at_spaces() {
        let mut out = String::new();
        push_field(&mut out, "Status", "5.1.1");
        assert_eq!(out, "Status: 5.1.1\r\n");

        let value = format!("smtp; 550 5.1.1 {}", "word ".repeat(40).trim_end());
        let mut out = String::new();
        push_field(&mut out, "Diagnostic-Code", &value);
        let lines: Vec<&str> = out.trim_end_matches("\r\n").split("\r\n").collect();
        assert!(lines.len() > 1, "folded: {out}");
        assert!(lines.iter().all(|l| l.len() <= FOLD_WIDTH), "{out}");
        assert!(lines[1..].iter().all(|l| l.starts_with(' ')), "{out}");
        let unfolded = out.trim_end_matches("\r\n").replace("\r\n", "");
        assert_eq!(unfolded, format!("Diagnostic-Code: {value}"));
    }

    #[test]
    fn fields_cut_long_runs() {
        let run = "x".repeat(2500);
        let mut out = String::new();
        push_field(&mut out, "Diagnostic-Code", &format!("smtp; {run}"));
        let lines: Vec<&str> = out.trim_end_matches("\r\n").split("\r\n").collect();
        assert!(
            lines.iter().all(|l| l.len() <= 998),
            "every line within 998"
        );
        assert_eq!(lines.len(), 4, "smtp; and three pieces");
        let unfolded = out.trim_end_matches("\r\n").replace("\r\n", "");
        assert_eq!(unfolded.matches('x').count(), 2500, "no octet lost");
    }

    #[test]
    fn text_wraps_at_words() {
        let mut out = String::new();
        push_wrapped(&mut out, &"alpha beta ".repeat(20), "  ");
        let lines: Vec<&str> = out.trim_end_matches("\r\n").split("\r\n").collect();
        assert!(lines.len() > 2);
        assert!(
            lines
                .iter()
                .all(|l| l.len() <= TEXT_WIDTH && l.starts_with("  "))
        );

        let mut out = String::new();
        push_wrapped(&mut out, &"y".repeat(1000), "");
        assert!(out.split("\r\n").all(|l| l.len() <= MAX_WORD));
    }
}
