use mail_parser::{Message, MessageParser, MessagePart, MimeHeaders};
use time::macros::datetime;

use super::*;

const NOW: OffsetDateTime = datetime!(2025-03-10 12:00 UTC);
const ARRIVAL: OffsetDateTime = datetime!(2025-03-10 11:58:30 UTC);
const HOST: &str = "mx.example.com";
const SENDER: &str = "bob@example.org";

fn original_message() -> Vec<u8> {
    b"From: Bob <bob@example.org>\r\n\
      To: Alice <alice@example.net>\r\n\
      Subject: Lunch\r\n\
      Message-ID: <orig-1@example.org>\r\n\
      \r\n\
      See you at noon.\r\n"
        .to_vec()
}

fn failed(address: &str) -> DsnRecipient {
    DsnRecipient {
        final_recipient: address.to_owned(),
        original_recipient: None,
        action: DsnAction::Failed,
        status: "5.1.1".to_owned(),
        remote_mta: Some("mx.example.net".to_owned()),
        diagnostic: Some("550 5.1.1 no such user".to_owned()),
        last_attempt: Some(datetime!(2025-03-10 11:59 UTC)),
        will_retry_until: None,
    }
}

fn delayed(address: &str) -> DsnRecipient {
    DsnRecipient {
        action: DsnAction::Delayed,
        status: "4.4.1".to_owned(),
        diagnostic: Some("451 4.4.1 try again later".to_owned()),
        will_retry_until: Some(datetime!(2025-03-15 11:58:30 UTC)),
        ..failed(address)
    }
}

fn report<'a>(recipients: &'a [DsnRecipient], original: ReturnedContent<'a>) -> DsnReport<'a> {
    DsnReport {
        reporting_mta: HOST,
        queue_id: uuid::Uuid::from_u128(0x0195_7f3a_0000_7000_8000_0000_0000_0001),
        envid: Some("QQ314159"),
        arrival: ARRIVAL,
        recipients,
        to: SENDER,
        original,
    }
}

fn build(report: &DsnReport<'_>) -> Vec<u8> {
    build_dsn(report, "dsn-1@mx.example.com", NOW)
}

/// Returns the parts of the top-level multipart/report.
fn report_parts<'a>(message: &'a Message<'a>) -> Vec<&'a MessagePart<'a>> {
    let root = message.root_part();
    let ids = root.sub_parts().expect("the root part is multipart");
    ids.iter()
        .map(|id| message.part(*id).expect("sub part exists"))
        .collect()
}

fn content_type(part: &MessagePart<'_>) -> String {
    let content_type = part.content_type().expect("part has a Content-Type");
    format!(
        "{}/{}",
        content_type.ctype(),
        content_type.subtype().unwrap_or_default()
    )
}

/// Parses a message/delivery-status body into blocks of unfolded fields.
fn status_blocks(body: &[u8]) -> Vec<Vec<(String, String)>> {
    let text = std::str::from_utf8(body).expect("delivery status is UTF-8");
    text.trim_end_matches("\r\n")
        .split("\r\n\r\n")
        .map(|block| {
            block
                .replace("\r\n ", " ")
                .split("\r\n")
                .map(|line| {
                    let (name, value) = line.split_once(':').expect("field has a colon");
                    (name.to_owned(), value.trim().to_owned())
                })
                .collect()
        })
        .collect()
}

fn field<'a>(block: &'a [(String, String)], name: &str) -> Option<&'a str> {
    block
        .iter()
        .find(|(field_name, _)| field_name == name)
        .map(|(_, value)| value.as_str())
}

fn assert_line_rules(raw: &[u8]) {
    for (index, &byte) in raw.iter().enumerate() {
        if byte == b'\n' {
            assert_eq!(
                raw.get(index.wrapping_sub(1)),
                Some(&b'\r'),
                "bare LF at {index}"
            );
        }
        if byte == b'\r' {
            assert_eq!(raw.get(index + 1), Some(&b'\n'), "bare CR at {index}");
        }
    }
    for line in raw.split(|&b| b == b'\n') {
        assert!(line.len() <= 999, "line of {} octets", line.len());
    }
}

#[test]
fn failure_report_structure() {
    let mut first = failed("alice@example.net");
    first.original_recipient = Some("rfc822;Alice+2Bx@example.net".to_owned());
    let second = DsnRecipient {
        remote_mta: None,
        diagnostic: None,
        last_attempt: None,
        ..failed("carol@example.net")
    };
    let recipients = [first, second];
    let original = original_message();
    let raw = build(&report(&recipients, ReturnedContent::Full(&original)));
    assert_line_rules(&raw);

    let message = MessageParser::new().parse(&raw).expect("parse DSN");
    let from = message.from().and_then(|a| a.first()).expect("From");
    assert_eq!(from.address(), Some("MAILER-DAEMON@mx.example.com"));
    assert_eq!(from.name(), Some("Mail Delivery System"));
    assert_eq!(
        message
            .to()
            .and_then(|a| a.first())
            .and_then(|a| a.address()),
        Some(SENDER)
    );
    assert_eq!(
        message.subject(),
        Some("Undelivered Mail Returned to Sender")
    );
    assert_eq!(message.message_id(), Some("dsn-1@mx.example.com"));
    assert_eq!(
        message.date().map(|d| d.to_timestamp()),
        Some(NOW.unix_timestamp())
    );
    assert_eq!(
        message.header_raw("Auto-Submitted").map(str::trim),
        Some("auto-replied")
    );
    assert_eq!(
        message.header_raw("MIME-Version").map(str::trim),
        Some("1.0")
    );
    let top = message.content_type().expect("Content-Type");
    assert_eq!((top.ctype(), top.subtype()), ("multipart", Some("report")));
    assert_eq!(top.attribute("report-type"), Some("delivery-status"));

    let parts = report_parts(&message);
    let types: Vec<String> = parts.iter().map(|p| content_type(p)).collect();
    assert_eq!(
        types,
        ["text/plain", "message/delivery-status", "message/rfc822"]
    );

    assert_eq!(
        parts[0].content_transfer_encoding(),
        Some("7bit"),
        "short ASCII lines need no encoding"
    );
    let text = parts[0].text_contents().expect("text part");
    assert!(text.contains("could not be delivered"), "{text}");
    assert!(
        text.contains("<alice@example.net>: delivery failed (status 5.1.1)"),
        "{text}"
    );
    assert!(
        text.contains("mx.example.net replied: 550 5.1.1 no such user"),
        "{text}"
    );
    assert!(text.contains("<carol@example.net>"), "{text}");
    assert!(text.contains("Your message is attached."), "{text}");

    let blocks = status_blocks(parts[1].contents());
    assert_eq!(blocks.len(), 3, "per-message block and two recipients");
    let per_message = &blocks[0];
    assert_eq!(
        field(per_message, "Reporting-MTA"),
        Some("dns; mx.example.com")
    );
    assert_eq!(field(per_message, "Original-Envelope-Id"), Some("QQ314159"));
    assert_eq!(
        field(per_message, "Arrival-Date"),
        Some("Mon, 10 Mar 2025 11:58:30 +0000")
    );

    let alice = &blocks[1];
    assert_eq!(
        field(alice, "Original-Recipient"),
        Some("rfc822; Alice+x@example.net"),
        "ORCPT decoded from xtext"
    );
    assert_eq!(
        field(alice, "Final-Recipient"),
        Some("rfc822; alice@example.net")
    );
    assert_eq!(field(alice, "Action"), Some("failed"));
    assert_eq!(field(alice, "Status"), Some("5.1.1"));
    assert_eq!(field(alice, "Remote-MTA"), Some("dns; mx.example.net"));
    assert_eq!(
        field(alice, "Diagnostic-Code"),
        Some("smtp; 550 5.1.1 no such user")
    );
    assert_eq!(
        field(alice, "Last-Attempt-Date"),
        Some("Mon, 10 Mar 2025 11:59:00 +0000")
    );
    assert_eq!(
        field(alice, "Will-Retry-Until"),
        None,
        "failed, not delayed"
    );

    let carol = &blocks[2];
    assert_eq!(field(carol, "Original-Recipient"), None);
    assert_eq!(
        field(carol, "Final-Recipient"),
        Some("rfc822; carol@example.net")
    );
    assert_eq!(field(carol, "Remote-MTA"), None);
    assert_eq!(field(carol, "Diagnostic-Code"), None);
    assert_eq!(field(carol, "Last-Attempt-Date"), None);

    assert_eq!(
        parts[2].content_transfer_encoding(),
        Some("7bit"),
        "ASCII original"
    );
    let returned = parts[2].message().expect("nested message");
    assert_eq!(returned.raw_message(), &original[..], "returned unchanged");
    assert_eq!(returned.message_id(), Some("orig-1@example.org"));
}

#[test]
fn eight_bit_original_is_8bit() {
    let original = "From: b\u{fc}ro@example.org\r\nSubject: Gr\u{fc}\u{df}e\r\n\r\nH\u{e9}\r\n";
    let recipients = [failed("alice@example.net")];
    let raw = build(&report(
        &recipients,
        ReturnedContent::Full(original.as_bytes()),
    ));
    assert_line_rules(&raw);
    let message = MessageParser::new().parse(&raw).expect("parse DSN");
    let parts = report_parts(&message);
    assert_eq!(content_type(parts[2]), "message/rfc822");
    assert_eq!(parts[2].content_transfer_encoding(), Some("8bit"));
    assert_eq!(
        parts[2].message().expect("nested").raw_message(),
        original.as_bytes()
    );
}

#[test]
fn headers_returned_as_rfc822_headers() {
    let original = original_message();
    let recipients = [failed("alice@example.net")];
    let raw = build(&report(&recipients, ReturnedContent::Headers(&original)));
    let message = MessageParser::new().parse(&raw).expect("parse DSN");
    let parts = report_parts(&message);
    assert_eq!(content_type(parts[2]), "text/rfc822-headers");
    let end = original
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("blank line")
        + 2;
    assert_eq!(parts[2].contents(), &original[..end], "header fields only");
    let text = parts[0].text_contents().expect("text part");
    assert!(text.contains("The header section of your message is attached."));
}

#[test]
fn cut_header_section_ends_at_line() {
    let start = b"From: a@example.org\r\nSubject: cut off here";
    let recipients = [failed("alice@example.net")];
    let raw = build(&report(&recipients, ReturnedContent::Headers(start)));
    let message = MessageParser::new().parse(&raw).expect("parse DSN");
    let parts = report_parts(&message);
    assert_eq!(parts[2].contents(), b"From: a@example.org\r\n");
}

#[test]
fn invalid_original_returns_headers() {
    let bare_lf = b"From: a@example.org\r\nSubject: x\r\n\r\nbare\nline\r\n";
    let recipients = [failed("alice@example.net")];
    let raw = build(&report(&recipients, ReturnedContent::Full(bare_lf)));
    assert_line_rules(&raw);
    let message = MessageParser::new().parse(&raw).expect("parse DSN");
    let parts = report_parts(&message);
    assert_eq!(content_type(parts[2]), "text/rfc822-headers");
    assert_eq!(
        parts[2].contents(),
        b"From: a@example.org\r\nSubject: x\r\n"
    );
}

#[test]
fn nothing_returned_has_two_parts() {
    let recipients = [failed("alice@example.net")];
    let raw = build(&report(&recipients, ReturnedContent::Nothing));
    let message = MessageParser::new().parse(&raw).expect("parse DSN");
    let types: Vec<String> = report_parts(&message)
        .iter()
        .map(|p| content_type(p))
        .collect();
    assert_eq!(types, ["text/plain", "message/delivery-status"]);
    let text = message.body_text(0).expect("text");
    assert!(!text.contains("attached"), "{text}");
}

#[test]
fn delayed_report_fields() {
    let recipients = [delayed("alice@example.net")];
    let original = original_message();
    let raw = build(&report(&recipients, ReturnedContent::Headers(&original)));
    let message = MessageParser::new().parse(&raw).expect("parse DSN");
    assert_eq!(
        message.subject(),
        Some("Delayed Mail (still being retried)")
    );
    let parts = report_parts(&message);
    let blocks = status_blocks(parts[1].contents());
    assert_eq!(field(&blocks[1], "Action"), Some("delayed"));
    assert_eq!(field(&blocks[1], "Status"), Some("4.4.1"));
    assert_eq!(
        field(&blocks[1], "Will-Retry-Until"),
        Some("Sat, 15 Mar 2025 11:58:30 +0000")
    );
    let text = parts[0].text_contents().expect("text");
    assert!(text.contains("do not need to send it again"), "{text}");
    assert!(text.contains("retried until Sat, 15 Mar 2025"), "{text}");
}

#[test]
fn subjects_by_strongest_action() {
    let success = DsnRecipient {
        action: DsnAction::Delivered,
        status: "2.0.0".to_owned(),
        diagnostic: Some("250 2.0.0 ok".to_owned()),
        ..failed("carol@example.net")
    };
    let cases = [
        (
            vec![success.clone(), delayed("a@x.org"), failed("b@x.org")],
            "Undelivered Mail Returned to Sender",
        ),
        (
            vec![success.clone(), delayed("a@x.org")],
            "Delayed Mail (still being retried)",
        ),
        (vec![success.clone()], "Successful Mail Delivery Report"),
        (
            vec![DsnRecipient {
                action: DsnAction::Relayed,
                ..success.clone()
            }],
            "Successful Mail Delivery Report",
        ),
    ];
    for (recipients, expected) in cases {
        let raw = build(&report(&recipients, ReturnedContent::Nothing));
        let message = MessageParser::new().parse(&raw).expect("parse DSN");
        assert_eq!(message.subject(), Some(expected), "{recipients:?}");
        let blocks = status_blocks(report_parts(&message)[1].contents());
        assert_eq!(blocks.len(), recipients.len() + 1);
        for (block, recipient) in blocks[1..].iter().zip(&recipients) {
            assert_eq!(field(block, "Action"), Some(recipient.action.as_str()));
        }
    }
}

#[test]
fn hostile_values_stay_in_their_fields() {
    let mut recipient = failed("alice@example.net");
    recipient.diagnostic = Some(format!(
        "550-5.7.1 caf\u{e9}\r\nX-Injected: yes\r\n550 5.7.1 {}\u{0}end",
        "long ".repeat(300)
    ));
    recipient.remote_mta = Some("mx.example.net\r\nX-Injected: yes".to_owned());
    recipient.status = "5.1.1\r\nX-Injected: yes".to_owned();
    let recipients = [recipient];
    let mut report = report(&recipients, ReturnedContent::Nothing);
    report.envid = Some("id\r\nX-Injected: yes");
    let raw = build(&report);
    assert_line_rules(&raw);

    let message = MessageParser::new().parse(&raw).expect("parse DSN");
    let parts = report_parts(&message);
    let body = parts[1].contents();
    assert!(body.is_ascii(), "report fields are US-ASCII");
    let blocks = status_blocks(body);
    for block in &blocks {
        assert_eq!(field(block, "X-Injected"), None, "{block:?}");
    }
    assert_eq!(
        field(&blocks[0], "Original-Envelope-Id"),
        Some("id X-Injected: yes")
    );
    assert_eq!(field(&blocks[1], "Status"), Some("5.0.0"), "invalid status");
    let diagnostic = field(&blocks[1], "Diagnostic-Code").expect("diagnostic");
    assert!(
        diagnostic.starts_with("smtp; 550-5.7.1 caf? X-Injected: yes 550 5.7.1 long long"),
        "{diagnostic}"
    );
    assert!(diagnostic.ends_with("long end"), "{diagnostic}");
    let text = parts[0].text_contents().expect("text");
    assert!(!text.lines().any(|l| l.starts_with("X-Injected")), "{text}");
}

#[test]
fn long_diagnostic_run_is_cut() {
    let mut recipient = failed("alice@example.net");
    recipient.diagnostic = Some(format!("550 {}", "x".repeat(3000)));
    let recipients = [recipient];
    let raw = build(&report(&recipients, ReturnedContent::Nothing));
    assert_line_rules(&raw);
    let message = MessageParser::new().parse(&raw).expect("parse DSN");
    let blocks = status_blocks(report_parts(&message)[1].contents());
    let diagnostic = field(&blocks[1], "Diagnostic-Code").expect("diagnostic");
    assert_eq!(diagnostic.matches('x').count(), 3000);
}

#[test]
fn utf8_recipient_uses_utf8_type() {
    let recipients = [failed("j\u{f6}rg@b\u{fc}cher.example")];
    let raw = build(&report(&recipients, ReturnedContent::Nothing));
    assert_line_rules(&raw);
    let message = MessageParser::new().parse(&raw).expect("parse DSN");
    let parts = report_parts(&message);
    let blocks = status_blocks(parts[1].contents());
    assert_eq!(
        field(&blocks[1], "Final-Recipient"),
        Some("utf-8; j\\x{F6}rg@b\\x{FC}cher.example")
    );
    let text = parts[0].text_contents().expect("text");
    assert!(
        text.contains("<j\u{f6}rg@b\u{fc}cher.example>"),
        "the text part keeps the address readable: {text}"
    );
}

#[test]
fn notify_table() {
    use DsnAction::*;
    let all = [Failed, Delayed, Delivered, Relayed, Expanded];
    let cases: [(Option<&str>, [bool; 5]); 8] = [
        (None, [true, true, false, false, false]),
        (Some(""), [true, true, false, false, false]),
        (Some("NEVER"), [false; 5]),
        (Some("never"), [false; 5]),
        (Some("SUCCESS"), [false, false, true, true, true]),
        (Some("FAILURE"), [true, false, false, false, false]),
        (Some("DELAY,FAILURE"), [true, true, false, false, false]),
        (Some("success, delay"), [false, true, true, true, true]),
    ];
    for (notify, expected) in cases {
        for (action, want) in all.into_iter().zip(expected) {
            assert_eq!(
                notify_requests(notify, action),
                want,
                "NOTIFY={notify:?} action {action}"
            );
        }
    }
}

#[test]
fn status_from_reply_table() {
    let cases = [
        ("550 5.1.1 no such user", true, "5.1.1"),
        ("550 5.1.1 no such user", false, "5.1.1"),
        ("550-5.7.1 first line\r\n550 5.7.1 last", true, "5.7.1"),
        ("451 4.3.0 try later", true, "4.3.0"),
        ("452 4.2.2 mailbox full", false, "4.2.2"),
        ("250 2.0.0 ok", true, "2.0.0"),
        ("550 4.1.1 class mismatch", false, "5.0.0"),
        ("450 5.1.1 class mismatch", true, "4.0.0"),
        ("550 no enhanced code", false, "5.0.0"),
        ("421 service closing", true, "4.0.0"),
        ("554", false, "5.0.0"),
        ("550 5.1 short code", false, "5.0.0"),
        ("550 5.1.1234 long detail", false, "5.0.0"),
        ("  550 5.2.2 leading space", false, "5.2.2"),
        ("connection refused", true, "5.0.0"),
        ("connection refused", false, "4.0.0"),
        ("", false, "4.0.0"),
        ("354 go ahead", true, "5.0.0"),
        ("5500 5.1.1 four digits", false, "4.0.0"),
        ("590 5.1.1 bad second digit", false, "4.0.0"),
    ];
    for (reply, permanent, expected) in cases {
        assert_eq!(
            status_from_reply(reply, permanent),
            expected,
            "reply {reply:?}, permanent default {permanent}"
        );
    }
}

#[test]
fn status_codes_checked() {
    for valid in ["2.0.0", "4.4.1", "5.1.10", "5.999.999"] {
        assert!(is_status_code(valid), "{valid}");
    }
    for invalid in [
        "", "5", "5.1", "3.1.1", "5.1.1.1", "5.a.1", "5..1", "5.1.1000",
    ] {
        assert!(!is_status_code(invalid), "{invalid}");
    }
}
