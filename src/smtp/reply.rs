//! SMTP replies: every reply wsmtp sends is built here.
//!
//! A [`Reply`] is a basic code (RFC 5321 §4.2), an enhanced status code
//! (RFC 3463, advertised as ENHANCEDSTATUSCODES per RFC 2034) and text lines.
//! The named constructors below are the only place where reply codes are
//! written, so the basic and enhanced codes cannot drift apart between call
//! sites. Replies from a downstream server are checked by
//! [`Reply::from_downstream`] before they are passed on to a client.

use std::fmt::Write as _;

/// An enhanced status code, class.subject.detail (RFC 3463 §2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Enhanced(pub u8, pub u16, pub u16);

impl std::fmt::Display for Enhanced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// One SMTP reply, possibly multi-line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    code: u16,
    enhanced: Option<Enhanced>,
    lines: Vec<String>,
}

impl Reply {
    fn new(code: u16, enhanced: Enhanced, text: impl Into<String>) -> Reply {
        Reply {
            code,
            enhanced: Some(enhanced),
            lines: vec![text.into()],
        }
    }

    pub fn code(&self) -> u16 {
        self.code
    }

    pub fn enhanced(&self) -> Option<Enhanced> {
        self.enhanced
    }

    /// The text of the reply's lines, without codes.
    pub fn lines(&self) -> &[String] {
        &self.lines
    }

    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    /// True for 421: the server closes the connection after sending it
    /// (RFC 5321 §3.8).
    pub fn closes_connection(&self) -> bool {
        self.code == 421
    }

    /// The reply as written on the wire, every line ended by CRLF.
    pub fn to_wire(&self) -> String {
        let mut out = String::new();
        let last = self.lines.len().saturating_sub(1);
        for (index, line) in self.lines.iter().enumerate() {
            let separator = if index == last { ' ' } else { '-' };
            match self.enhanced {
                Some(enhanced) => {
                    let _ = write!(out, "{}{}{} {}\r\n", self.code, separator, enhanced, line);
                }
                None => {
                    let _ = write!(out, "{}{}{}\r\n", self.code, separator, line);
                }
            }
        }
        out
    }

    /// A compact single-line form for log lines.
    pub fn summary(&self) -> String {
        let text = self.lines.first().map(String::as_str).unwrap_or("");
        match self.enhanced {
            Some(enhanced) => format!("{} {} {}", self.code, enhanced, text),
            None => format!("{} {}", self.code, text),
        }
    }

    // --- Connection phase ---------------------------------------------------

    /// Greeting banner (RFC 5321 §4.3.1). The greeting has no enhanced code
    /// because ENHANCEDSTATUSCODES is not yet negotiated (RFC 2034 §3).
    pub fn greeting(hostname: &str) -> Reply {
        Reply {
            code: 220,
            enhanced: None,
            lines: vec![format!("{hostname} ESMTP wsmtp")],
        }
    }

    /// EHLO reply: the first line greets, the others list extensions.
    pub fn ehlo(hostname: &str, client: &str, extensions: Vec<String>) -> Reply {
        let mut lines = vec![format!("{hostname} greets {client}")];
        lines.extend(extensions);
        Reply {
            code: 250,
            enhanced: None,
            lines,
        }
    }

    pub fn helo(hostname: &str, client: &str) -> Reply {
        Reply {
            code: 250,
            enhanced: None,
            lines: vec![format!("{hostname} greets {client}")],
        }
    }

    pub fn closing(hostname: &str) -> Reply {
        Reply::new(
            221,
            Enhanced(2, 0, 0),
            format!("{hostname} closing connection"),
        )
    }

    pub fn ok() -> Reply {
        Reply::new(250, Enhanced(2, 0, 0), "OK")
    }

    pub fn reset() -> Reply {
        Reply::new(250, Enhanced(2, 0, 0), "Reset state")
    }

    pub fn help() -> Reply {
        Reply::new(
            214,
            Enhanced(2, 0, 0),
            "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT HELP VRFY STARTTLS",
        )
    }

    /// VRFY never confirms an address, so it cannot be used to harvest
    /// addresses (RFC 5321 §3.5.3 allows 252).
    pub fn cannot_verify() -> Reply {
        Reply::new(
            252,
            Enhanced(2, 5, 2),
            "Cannot VRFY user, but will accept message and attempt delivery",
        )
    }

    pub fn ready_to_start_tls() -> Reply {
        Reply::new(220, Enhanced(2, 0, 0), "Ready to start TLS")
    }

    // --- Transaction ----------------------------------------------------------

    pub fn sender_ok() -> Reply {
        Reply::new(250, Enhanced(2, 1, 0), "Sender OK")
    }

    pub fn recipient_ok() -> Reply {
        Reply::new(250, Enhanced(2, 1, 5), "Recipient OK")
    }

    pub fn start_data() -> Reply {
        Reply {
            code: 354,
            enhanced: None,
            lines: vec!["End data with <CR><LF>.<CR><LF>".to_string()],
        }
    }

    /// Final reply after a message was committed to the queue.
    pub fn queued(queue_id: &str) -> Reply {
        Reply::new(250, Enhanced(2, 0, 0), format!("OK: queued as {queue_id}"))
    }

    /// Reply to a BDAT chunk that is not the last one (RFC 3030 §2).
    pub fn chunk_received(octets: usize) -> Reply {
        Reply::new(250, Enhanced(2, 0, 0), format!("{octets} octets received"))
    }

    // --- Client errors: sequence and syntax ----------------------------------

    pub fn unrecognized_command() -> Reply {
        Reply::new(500, Enhanced(5, 5, 2), "Command not recognized")
    }

    pub fn command_line_too_long(max: usize) -> Reply {
        Reply::new(
            500,
            Enhanced(5, 5, 2),
            format!("Command line too long (maximum {max} octets)"),
        )
    }

    /// A command line with a bare CR or LF, or a NUL byte. Such input is the
    /// raw material of command injection, so it is never interpreted.
    pub fn bad_command_line_ending() -> Reply {
        Reply::new(
            500,
            Enhanced(5, 5, 2),
            "Command lines must end with CRLF and contain no bare CR, bare LF or NUL",
        )
    }

    pub fn syntax_error(syntax: &str) -> Reply {
        Reply::new(501, Enhanced(5, 5, 4), format!("Syntax: {syntax}"))
    }

    pub fn invalid_parameter(detail: &str) -> Reply {
        Reply::new(
            501,
            Enhanced(5, 5, 4),
            format!("Invalid parameter: {detail}"),
        )
    }

    pub fn unsupported_parameter(name: &str) -> Reply {
        Reply::new(
            555,
            Enhanced(5, 5, 4),
            format!("Unsupported parameter {name}"),
        )
    }

    pub fn invalid_sender(detail: &str) -> Reply {
        Reply::new(
            501,
            Enhanced(5, 1, 7),
            format!("Invalid sender address: {detail}"),
        )
    }

    pub fn invalid_recipient(detail: &str) -> Reply {
        Reply::new(
            501,
            Enhanced(5, 1, 3),
            format!("Invalid recipient address: {detail}"),
        )
    }

    pub fn not_implemented(command: &str) -> Reply {
        Reply::new(502, Enhanced(5, 5, 1), format!("{command} not implemented"))
    }

    pub fn bad_sequence(detail: &str) -> Reply {
        Reply::new(
            503,
            Enhanced(5, 5, 1),
            format!("Bad sequence of commands: {detail}"),
        )
    }

    pub fn tls_already_active() -> Reply {
        Reply::new(503, Enhanced(5, 5, 1), "TLS already active")
    }

    pub fn tls_not_available() -> Reply {
        Reply::new(454, Enhanced(4, 7, 0), "TLS not available")
    }

    pub fn smtputf8_not_negotiated() -> Reply {
        Reply::new(
            553,
            Enhanced(5, 6, 7),
            "Non-ASCII address requires the SMTPUTF8 parameter",
        )
    }

    // --- Authentication (RFC 4954) -------------------------------------------

    /// A SASL challenge, base64 encoded; `334 ` with an empty one. Challenges
    /// carry no enhanced status code (RFC 4954).
    pub fn auth_challenge(base64: &str) -> Reply {
        Reply {
            code: 334,
            enhanced: None,
            lines: vec![base64.to_string()],
        }
    }

    pub fn auth_succeeded() -> Reply {
        Reply::new(235, Enhanced(2, 7, 0), "Authentication succeeded")
    }

    pub fn auth_failed() -> Reply {
        Reply::new(535, Enhanced(5, 7, 8), "Authentication credentials invalid")
    }

    /// The client sent `*` in place of a response (RFC 4954).
    pub fn auth_cancelled() -> Reply {
        Reply::new(501, Enhanced(5, 0, 0), "Authentication cancelled")
    }

    pub fn auth_invalid_base64() -> Reply {
        Reply::new(
            501,
            Enhanced(5, 5, 2),
            "Cannot decode the response: invalid base64",
        )
    }

    /// A response that decodes but is not what the mechanism expects.
    pub fn auth_malformed_response(detail: &str) -> Reply {
        Reply::new(
            501,
            Enhanced(5, 5, 2),
            format!("Malformed authentication response: {detail}"),
        )
    }

    pub fn auth_line_too_long(max: usize) -> Reply {
        Reply::new(
            500,
            Enhanced(5, 5, 6),
            format!("Authentication exchange line is too long (maximum {max} octets)"),
        )
    }

    pub fn already_authenticated() -> Reply {
        Reply::new(503, Enhanced(5, 5, 1), "Already authenticated")
    }

    pub fn auth_during_transaction() -> Reply {
        Reply::new(
            503,
            Enhanced(5, 5, 1),
            "AUTH is not allowed during a mail transaction",
        )
    }

    /// RFC 4954 §6: the mechanism may only be used over an encrypted connection.
    pub fn encryption_required() -> Reply {
        Reply::new(
            538,
            Enhanced(5, 7, 11),
            "Encryption required for requested authentication mechanism",
        )
    }

    pub fn unknown_auth_mechanism() -> Reply {
        Reply::new(504, Enhanced(5, 5, 4), "Unrecognized authentication type")
    }

    pub fn too_many_auth_failures() -> Reply {
        Reply::new(
            454,
            Enhanced(4, 7, 0),
            "too many authentication failures, try later",
        )
    }

    /// RFC 4954 §6: a temporary server failure, here an unloaded directory.
    pub fn auth_temporarily_unavailable() -> Reply {
        Reply::new(
            454,
            Enhanced(4, 7, 0),
            "Temporary authentication failure, try again later",
        )
    }

    /// MAIL FROM of an authenticated client that is not one of its account's
    /// addresses.
    pub fn sender_not_owned() -> Reply {
        Reply::new(
            553,
            Enhanced(5, 7, 1),
            "sender address not owned by the authenticated user",
        )
    }

    // --- Limits --------------------------------------------------------------

    pub fn message_too_large(max: u64) -> Reply {
        Reply::new(
            552,
            Enhanced(5, 3, 4),
            format!("Message size exceeds the limit of {max} octets"),
        )
    }

    pub fn too_many_recipients(max: usize) -> Reply {
        Reply::new(
            452,
            Enhanced(4, 5, 3),
            format!("Too many recipients (maximum {max} per message)"),
        )
    }

    pub fn too_many_connections() -> Reply {
        Reply::new(
            421,
            Enhanced(4, 7, 0),
            "Too many connections, try again later",
        )
    }

    pub fn too_many_connections_from_ip() -> Reply {
        Reply::new(
            421,
            Enhanced(4, 7, 0),
            "Too many connections from your address, try again later",
        )
    }

    /// A connection over the rate of new connections allowed per client
    /// address.
    pub fn too_many_new_connections() -> Reply {
        Reply::new(
            421,
            Enhanced(4, 7, 0),
            "Too many new connections from your address, try again later",
        )
    }

    /// A message or recipient over a rate limit. `what` names the limit,
    /// e.g. "messages from this sender".
    pub fn rate_limited(what: &str) -> Reply {
        Reply::new(
            451,
            Enhanced(4, 7, 1),
            format!("Too many {what}, try again later"),
        )
    }

    pub fn too_many_errors() -> Reply {
        Reply::new(
            421,
            Enhanced(4, 7, 0),
            "Too many errors, closing connection",
        )
    }

    pub fn timeout(hostname: &str) -> Reply {
        Reply::new(
            421,
            Enhanced(4, 4, 2),
            format!("{hostname} timeout exceeded, closing connection"),
        )
    }

    pub fn shutting_down(hostname: &str) -> Reply {
        Reply::new(
            421,
            Enhanced(4, 3, 2),
            format!("{hostname} shutting down, try again later"),
        )
    }

    // --- Message content -----------------------------------------------------

    /// A bare CR or LF in message content. Accepting it would let a client
    /// smuggle a second message past servers that end DATA differently.
    pub fn bare_line_ending_in_data() -> Reply {
        Reply::new(
            550,
            Enhanced(5, 6, 0),
            "Message rejected: bare CR or LF found; lines must end with CRLF",
        )
    }

    pub fn nul_in_data() -> Reply {
        Reply::new(
            550,
            Enhanced(5, 6, 0),
            "Message rejected: NUL byte in message",
        )
    }

    pub fn data_line_too_long(max: usize) -> Reply {
        Reply::new(
            550,
            Enhanced(5, 6, 0),
            format!("Message rejected: line longer than {max} octets"),
        )
    }

    /// RFC 5321 §6.3: a message with too many Received headers is looping.
    pub fn too_many_hops(max: usize) -> Reply {
        Reply::new(
            554,
            Enhanced(5, 4, 6),
            format!("Routing loop detected: more than {max} Received headers"),
        )
    }

    // --- Policy --------------------------------------------------------------

    /// A reply written in a relay rule; the rule loader checks that the
    /// basic and enhanced codes agree.
    pub fn configured(code: u16, enhanced: Enhanced, text: &str) -> Reply {
        Reply::new(code, enhanced, text)
    }

    /// Reply of a rule that names a DNS blocklist zone with
    /// `on_error: tempfail` whose lookup failed.
    pub fn blocklist_unavailable(zone: &str) -> Reply {
        Reply::new(
            451,
            Enhanced(4, 4, 3),
            format!("DNS blocklist {zone} unavailable, try again later"),
        )
    }

    /// Default reply of a `tempfail` rule.
    pub fn rule_tempfail() -> Reply {
        Reply::new(451, Enhanced(4, 7, 1), "Try again later")
    }

    pub fn no_group_for_recipient() -> Reply {
        Reply::new(
            451,
            Enhanced(4, 3, 5),
            "No downstream group is configured for this recipient, try again later",
        )
    }

    pub fn relay_denied() -> Reply {
        Reply::new(550, Enhanced(5, 7, 1), "Relay access denied")
    }

    pub fn unknown_user() -> Reply {
        Reply::new(
            550,
            Enhanced(5, 1, 1),
            "Recipient address rejected: user unknown",
        )
    }

    pub fn directory_unavailable() -> Reply {
        Reply::new(
            451,
            Enhanced(4, 3, 0),
            "Recipient directory not available, try again later",
        )
    }

    pub fn routing_characters_denied() -> Reply {
        Reply::new(
            550,
            Enhanced(5, 7, 1),
            "Sender-specified routing (@, % or ! in the local part) is not allowed",
        )
    }

    pub fn mixed_routes_need_new_transaction() -> Reply {
        Reply::new(
            452,
            Enhanced(4, 5, 3),
            "Recipient routes differ; send this recipient in another transaction",
        )
    }

    // --- Downstream and queue ------------------------------------------------

    pub fn downstream_unavailable() -> Reply {
        Reply::new(
            451,
            Enhanced(4, 4, 1),
            "Downstream server not reachable, try again later",
        )
    }

    pub fn downstream_failed() -> Reply {
        Reply::new(
            451,
            Enhanced(4, 4, 2),
            "Connection to the downstream server failed, try again later",
        )
    }

    /// A downstream reply that made no sense at that point of the dialogue.
    pub fn downstream_protocol_error() -> Reply {
        Reply::new(
            451,
            Enhanced(4, 4, 0),
            "Unexpected reply from the downstream server, try again later",
        )
    }

    pub fn queue_unavailable() -> Reply {
        Reply::new(
            451,
            Enhanced(4, 3, 0),
            "Mail queue temporarily unavailable, try again later",
        )
    }

    pub fn transaction_failed_earlier() -> Reply {
        Reply::new(
            554,
            Enhanced(5, 5, 0),
            "Transaction failed earlier; send RSET and start again",
        )
    }

    pub fn no_valid_recipients() -> Reply {
        Reply::new(554, Enhanced(5, 5, 1), "No valid recipients")
    }

    pub fn internal_error() -> Reply {
        Reply::new(451, Enhanced(4, 3, 0), "Internal error, try again later")
    }

    /// Checks a reply from a downstream server before it goes to a client.
    ///
    /// `expected` contains the first digits acceptable at this point of the
    /// dialogue (2 for RCPT, 3 for DATA, …). A positive reply that does not
    /// fit becomes a transient error of ours, because passing it on could
    /// make the client believe a step succeeded that did not. A 4xx or 5xx
    /// is passed on with its text; a missing enhanced code gets the generic
    /// one of its class (RFC 3463 §3.1), since we advertise
    /// ENHANCEDSTATUSCODES. Text is limited to printable ASCII.
    pub fn from_downstream(code: u16, lines: &[String], expected: &[u16]) -> Reply {
        let class = code / 100;
        let acceptable = expected.contains(&class);
        if !(200..600).contains(&code) || (class <= 3 && !acceptable) {
            return Reply::downstream_protocol_error();
        }

        let mut enhanced = None;
        let mut texts = Vec::with_capacity(lines.len());
        for line in lines {
            let (parsed, text) = split_enhanced(line);
            if enhanced.is_none() {
                enhanced = parsed.filter(|e| u16::from(e.0) == class);
            }
            texts.push(sanitize_text(text));
        }
        if texts.is_empty() {
            texts.push(String::new());
        }
        let enhanced = match enhanced {
            Some(enhanced) => Some(enhanced),
            None if class == 3 => None,
            None => Some(Enhanced(class as u8, 0, 0)),
        };
        Reply {
            code,
            enhanced,
            lines: texts,
        }
    }
}

/// Splits a leading enhanced status code off a reply line's text.
fn split_enhanced(line: &str) -> (Option<Enhanced>, &str) {
    let (first, rest) = match line.split_once(' ') {
        Some((first, rest)) => (first, rest),
        None => (line, ""),
    };
    let mut parts = first.split('.');
    let parsed = (|| {
        let class: u8 = parts.next()?.parse().ok()?;
        let subject: u16 = parts.next()?.parse().ok()?;
        let detail: u16 = parts.next()?.parse().ok()?;
        if parts.next().is_some() || !(2..=5).contains(&class) {
            return None;
        }
        Some(Enhanced(class, subject, detail))
    })();
    match parsed {
        Some(enhanced) => (Some(enhanced), rest),
        None => (None, line),
    }
}

fn sanitize_text(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(500)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiline_wire_form() {
        let reply = Reply::ehlo("mx", "client", vec!["PIPELINING".into(), "SIZE 10".into()]);
        assert_eq!(
            reply.to_wire(),
            "250-mx greets client\r\n250-PIPELINING\r\n250 SIZE 10\r\n"
        );
    }

    #[test]
    fn single_line_with_enhanced_code() {
        assert_eq!(
            Reply::relay_denied().to_wire(),
            "550 5.7.1 Relay access denied\r\n"
        );
    }

    #[test]
    fn auth_challenges_have_no_enhanced_code() {
        assert_eq!(Reply::auth_challenge("").to_wire(), "334 \r\n");
        assert_eq!(
            Reply::auth_challenge("VXNlcm5hbWU6").to_wire(),
            "334 VXNlcm5hbWU6\r\n"
        );
    }

    #[test]
    fn auth_replies_carry_rfc_4954_codes() {
        let cases = [
            (Reply::auth_succeeded(), 235, Enhanced(2, 7, 0)),
            (Reply::auth_failed(), 535, Enhanced(5, 7, 8)),
            (Reply::auth_cancelled(), 501, Enhanced(5, 0, 0)),
            (Reply::auth_invalid_base64(), 501, Enhanced(5, 5, 2)),
            (Reply::auth_line_too_long(10), 500, Enhanced(5, 5, 6)),
            (Reply::encryption_required(), 538, Enhanced(5, 7, 11)),
            (Reply::unknown_auth_mechanism(), 504, Enhanced(5, 5, 4)),
            (Reply::too_many_auth_failures(), 454, Enhanced(4, 7, 0)),
        ];
        for (reply, code, enhanced) in cases {
            assert_eq!(reply.code(), code, "{}", reply.summary());
            assert_eq!(reply.enhanced(), Some(enhanced), "{}", reply.summary());
        }
    }

    #[test]
    fn downstream_reply_keeps_its_enhanced_code() {
        let reply = Reply::from_downstream(550, &["5.1.1 No such user".into()], &[2]);
        assert_eq!(reply.to_wire(), "550 5.1.1 No such user\r\n");
    }

    #[test]
    fn downstream_reply_without_enhanced_code_gets_one() {
        let reply = Reply::from_downstream(450, &["mailbox busy".into()], &[2]);
        assert_eq!(reply.to_wire(), "450 4.0.0 mailbox busy\r\n");
    }

    #[test]
    fn downstream_positive_reply_out_of_place_becomes_transient() {
        let reply = Reply::from_downstream(354, &["go ahead".into()], &[2]);
        assert_eq!(reply.code(), 451);
        let reply = Reply::from_downstream(250, &["2.0.0 ok".into()], &[3]);
        assert_eq!(reply.code(), 451);
    }

    #[test]
    fn downstream_enhanced_code_of_other_class_is_replaced() {
        let reply = Reply::from_downstream(550, &["2.1.5 confused".into()], &[2]);
        assert_eq!(reply.enhanced(), Some(Enhanced(5, 0, 0)));
    }

    #[test]
    fn downstream_text_is_sanitized() {
        let reply = Reply::from_downstream(550, &["5.7.1 bad\tthing\u{7}".into()], &[2]);
        assert_eq!(reply.lines(), &["bad?thing?".to_string()]);
    }
}
