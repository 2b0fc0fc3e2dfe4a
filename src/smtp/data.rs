//! Message content: DATA decoding, BDAT inspection, header checks and
//! dot-stuffing for the outgoing side.
//!
//! [`DotDecoder`] turns the bytes after `354` into message content: it removes
//! the transparency dots (RFC 5321 §4.5.2) and finds the end of data. Only
//! `<CRLF>.<CRLF>` ends DATA. A bare CR or LF never ends a line, so variants
//! such as `<LF>.<LF>` or `<CR>.<CR><LF>` cannot end a message early and
//! smuggle a second one; they are recorded as a [`ContentError`] while the
//! decoder keeps reading to the real end, so the client and server stay in
//! step and the whole message is rejected. [`ContentInspector`] applies the
//! same checks to BDAT chunks, which carry no dot transparency (RFC 3030).
//! [`HeaderInspector`] counts Received headers. [`DotStuffer`] writes content
//! to a downstream server with transparency dots added back.

use memchr::memchr3;

/// The first problem found in message content. Decoding goes on after it so
/// the session stays in step, but the message is rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContentError {
    /// A CR not followed by LF, or an LF not preceded by CR.
    BareLineEnding,
    Nul,
    LineTooLong,
}

/// Checks shared by DATA and BDAT: line endings, NUL bytes and line length.
#[derive(Clone, Debug)]
struct LineChecks {
    max_line: usize,
    reject_nul: bool,
    line_length: usize,
    error: Option<ContentError>,
}

impl LineChecks {
    fn new(max_line: usize, reject_nul: bool) -> LineChecks {
        LineChecks {
            max_line,
            reject_nul,
            line_length: 0,
            error: None,
        }
    }

    fn fail(&mut self, error: ContentError) {
        self.error.get_or_insert(error);
    }

    /// Accounts for a run of ordinary bytes (no CR or LF) in the current line.
    fn ordinary(&mut self, run: &[u8]) {
        self.line_length += run.len();
        if self.line_length > self.max_line {
            self.fail(ContentError::LineTooLong);
        }
        if self.reject_nul && memchr::memchr(0, run).is_some() {
            self.fail(ContentError::Nul);
        }
    }
}

/// The state of the DATA decoder between two input bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DotState {
    /// At the start of a line: the previous bytes were CRLF (or DATA's own CRLF).
    LineStart,
    /// Inside a line.
    Text,
    /// After a CR inside a line.
    Cr,
    /// After a "." at the start of a line.
    Dot,
    /// After "." and CR at the start of a line.
    DotCr,
}

/// Outcome of feeding bytes to a [`DotDecoder`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decoded {
    /// Input bytes consumed. After the end of data the rest is the next command.
    pub consumed: usize,
    /// True when `<CRLF>.<CRLF>` was found.
    pub finished: bool,
}

/// Decodes DATA content; see the module documentation.
#[derive(Clone, Debug)]
pub struct DotDecoder {
    state: DotState,
    checks: LineChecks,
}

impl DotDecoder {
    pub fn new(max_line: usize, reject_nul: bool) -> DotDecoder {
        DotDecoder {
            state: DotState::LineStart,
            checks: LineChecks::new(max_line, reject_nul),
        }
    }

    pub fn error(&self) -> Option<ContentError> {
        self.checks.error
    }

    /// Decodes `input`, appending content to `out`, until the input runs out
    /// or the end of data is found.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Decoded {
        let mut index = 0;
        while index < input.len() {
            let byte = input[index];
            match self.state {
                DotState::LineStart if byte == b'.' => {
                    self.state = DotState::Dot;
                    index += 1;
                }
                DotState::LineStart | DotState::Text => {
                    // Copy the run up to the next CR, LF or NUL in one step.
                    let rest = &input[index..];
                    let run_end = memchr3(b'\r', b'\n', 0, rest).unwrap_or(rest.len());
                    if run_end > 0 {
                        self.checks.ordinary(&rest[..run_end]);
                        out.extend_from_slice(&rest[..run_end]);
                        index += run_end;
                        self.state = DotState::Text;
                        continue;
                    }
                    match byte {
                        b'\r' => self.state = DotState::Cr,
                        b'\n' => {
                            // A bare LF does not end a line: an LF-only
                            // terminator must not end the message.
                            self.checks.fail(ContentError::BareLineEnding);
                            out.push(byte);
                            self.state = DotState::Text;
                        }
                        _ => {
                            self.checks.ordinary(&[byte]);
                            out.push(byte);
                            self.state = DotState::Text;
                        }
                    }
                    index += 1;
                }
                DotState::Cr => {
                    if byte == b'\n' {
                        out.extend_from_slice(b"\r\n");
                        self.checks.line_length = 0;
                        self.state = DotState::LineStart;
                        index += 1;
                    } else {
                        self.checks.fail(ContentError::BareLineEnding);
                        out.push(b'\r');
                        self.state = DotState::Text;
                    }
                }
                DotState::Dot => {
                    if byte == b'\r' {
                        self.state = DotState::DotCr;
                        index += 1;
                    } else {
                        // RFC 5321 §4.5.2: a leading dot followed by more
                        // text is a transparency dot and is removed.
                        self.state = DotState::Text;
                    }
                }
                DotState::DotCr => {
                    if byte == b'\n' {
                        return Decoded {
                            consumed: index + 1,
                            finished: true,
                        };
                    }
                    // "." CR and something else: a bare CR after a
                    // transparency dot.
                    self.checks.fail(ContentError::BareLineEnding);
                    out.push(b'\r');
                    self.state = DotState::Text;
                }
            }
        }
        Decoded {
            consumed: index,
            finished: false,
        }
    }
}

/// Checks BDAT content, whose chunks may split a CRLF pair.
#[derive(Clone, Debug)]
pub struct ContentInspector {
    checks: LineChecks,
    pending_cr: bool,
}

impl ContentInspector {
    pub fn new(max_line: usize, reject_nul: bool) -> ContentInspector {
        ContentInspector {
            checks: LineChecks::new(max_line, reject_nul),
            pending_cr: false,
        }
    }

    pub fn error(&self) -> Option<ContentError> {
        self.checks.error
    }

    pub fn inspect(&mut self, mut data: &[u8]) {
        if self.pending_cr && !data.is_empty() {
            self.pending_cr = false;
            if data[0] == b'\n' {
                self.checks.line_length = 0;
                data = &data[1..];
            } else {
                self.checks.fail(ContentError::BareLineEnding);
            }
        }
        while !data.is_empty() {
            let run_end = memchr::memchr2(b'\r', b'\n', data).unwrap_or(data.len());
            self.checks.ordinary(&data[..run_end]);
            data = &data[run_end..];
            match data {
                [] => {}
                [b'\r'] => {
                    self.pending_cr = true;
                    data = &[];
                }
                [b'\r', b'\n', rest @ ..] => {
                    self.checks.line_length = 0;
                    data = rest;
                }
                [_, rest @ ..] => {
                    self.checks.fail(ContentError::BareLineEnding);
                    data = rest;
                }
            }
        }
    }

    /// Called after the last chunk: a CR at the very end is a bare CR.
    pub fn finish(&mut self) {
        if self.pending_cr {
            self.pending_cr = false;
            self.checks.fail(ContentError::BareLineEnding);
        }
    }
}

/// Counts Received header fields in the header section of decoded content.
#[derive(Clone, Debug)]
pub struct HeaderInspector {
    in_headers: bool,
    at_line_start: bool,
    /// The first bytes of the current line, enough to recognise "Received:".
    prefix: Vec<u8>,
    received: usize,
}

const RECEIVED: &[u8] = b"received:";

impl Default for HeaderInspector {
    fn default() -> Self {
        HeaderInspector {
            in_headers: true,
            at_line_start: true,
            prefix: Vec::with_capacity(RECEIVED.len()),
            received: 0,
        }
    }
}

impl HeaderInspector {
    pub fn received_count(&self) -> usize {
        self.received
    }

    pub fn inspect(&mut self, data: &[u8]) {
        let mut index = 0;
        while self.in_headers && index < data.len() {
            let byte = data[index];
            index += 1;
            if byte == b'\n' {
                // An empty line (only CR before LF) ends the header section.
                if self.at_line_start || self.prefix.as_slice() == b"\r" {
                    self.in_headers = false;
                }
                self.at_line_start = true;
                self.prefix.clear();
                continue;
            }
            if self.at_line_start || self.prefix.len() < RECEIVED.len() {
                self.at_line_start = false;
                if self.prefix.len() < RECEIVED.len() {
                    self.prefix.push(byte.to_ascii_lowercase());
                    if self.prefix.as_slice() == RECEIVED {
                        self.received += 1;
                    }
                }
            }
        }
    }
}

/// Writes message content with transparency dots for a DATA command.
#[derive(Clone, Debug)]
pub struct DotStuffer {
    at_line_start: bool,
    last_two: [u8; 2],
    written: u64,
}

impl Default for DotStuffer {
    fn default() -> Self {
        DotStuffer {
            at_line_start: true,
            last_two: [0, 0],
            written: 0,
        }
    }
}

impl DotStuffer {
    /// Appends `data` to `out` with a dot doubled at every line start.
    pub fn stuff(&mut self, data: &[u8], out: &mut Vec<u8>) {
        let mut rest = data;
        while !rest.is_empty() {
            if self.at_line_start && rest[0] == b'.' {
                out.push(b'.');
            }
            let line_end = memchr::memchr(b'\n', rest)
                .map(|i| i + 1)
                .unwrap_or(rest.len());
            out.extend_from_slice(&rest[..line_end]);
            self.at_line_start = rest[line_end - 1] == b'\n';
            rest = &rest[line_end..];
        }
        self.written += data.len() as u64;
        match data {
            [] => {}
            [only] => self.last_two = [self.last_two[1], *only],
            [.., a, b] => self.last_two = [*a, *b],
        }
    }

    /// The terminator that ends the data: content that does not end in CRLF
    /// (possible with BDAT) gets one first, so the dot stands on its own line.
    pub fn terminator(&self) -> &'static [u8] {
        if self.written == 0 || self.last_two == *b"\r\n" {
            b".\r\n"
        } else {
            b"\r\n.\r\n"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8]) -> (Vec<u8>, Decoded, Option<ContentError>) {
        let mut decoder = DotDecoder::new(1000, true);
        let mut out = Vec::new();
        let decoded = decoder.decode(input, &mut out);
        (out, decoded, decoder.error())
    }

    #[test]
    fn plain_message_ends_at_crlf_dot_crlf() {
        let (out, decoded, error) = decode_all(b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n");
        assert_eq!(out, b"Subject: x\r\n\r\nbody\r\n");
        assert!(decoded.finished);
        assert_eq!(decoded.consumed, 23);
        assert_eq!(error, None);
    }

    #[test]
    fn empty_message_ends_at_first_dot() {
        let (out, decoded, _) = decode_all(b".\r\n");
        assert!(out.is_empty());
        assert!(decoded.finished);
    }

    #[test]
    fn transparency_dots_are_removed() {
        let (out, _, error) = decode_all(b"..leading\r\n...\r\n.\r\n");
        assert_eq!(out, b".leading\r\n..\r\n");
        assert_eq!(error, None);
    }

    #[test]
    fn smuggling_terminators_do_not_end_data() {
        for variant in [
            &b"\n.\n"[..],
            b"\n.\r\n",
            b"\r\n.\n",
            b"\r.\r\n",
            b"\r\n.\r",
        ] {
            let mut input = b"first\r\n".to_vec();
            input.extend_from_slice(variant);
            input.extend_from_slice(b"MAIL FROM:<x@y>\r\n");
            let (_, decoded, error) = decode_all(&input);
            assert!(!decoded.finished, "variant {variant:?} ended the data");
            assert_eq!(
                error,
                Some(ContentError::BareLineEnding),
                "variant {variant:?}"
            );
        }
    }

    #[test]
    fn decoding_is_the_same_byte_by_byte() {
        let input = b"a\r\n..b\r\n.c\r\n\r\n.\r\n";
        let (whole, _, _) = decode_all(input);
        let mut decoder = DotDecoder::new(1000, true);
        let mut out = Vec::new();
        let mut finished = false;
        for byte in input {
            finished = decoder.decode(&[*byte], &mut out).finished;
        }
        assert!(finished);
        assert_eq!(out, whole);
    }

    #[test]
    fn nul_and_long_lines_are_errors() {
        assert_eq!(decode_all(b"a\0b\r\n.\r\n").2, Some(ContentError::Nul));
        let mut long = vec![b'x'; 1001];
        long.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(decode_all(&long).2, Some(ContentError::LineTooLong));
        let mut allowed = DotDecoder::new(1000, false);
        allowed.decode(b"a\0b\r\n.\r\n", &mut Vec::new());
        assert_eq!(allowed.error(), None);
    }

    #[test]
    fn bdat_inspector_joins_crlf_across_chunks() {
        let mut inspector = ContentInspector::new(1000, true);
        inspector.inspect(b"line\r");
        inspector.inspect(b"\nnext\r\n");
        inspector.finish();
        assert_eq!(inspector.error(), None);
    }

    #[test]
    fn bdat_inspector_finds_bare_endings() {
        for chunks in [&[&b"a\nb"[..]][..], &[b"a\r", b"b"], &[b"a\r"]] {
            let mut inspector = ContentInspector::new(1000, true);
            for chunk in chunks {
                inspector.inspect(chunk);
            }
            inspector.finish();
            assert_eq!(
                inspector.error(),
                Some(ContentError::BareLineEnding),
                "{chunks:?}"
            );
        }
    }

    #[test]
    fn received_headers_are_counted_until_the_body() {
        let mut inspector = HeaderInspector::default();
        inspector.inspect(b"Received: a\r\nRECEIVED: b\r\n\tfolded\r\nSubject: x\r\n");
        inspector.inspect(b"\r\nReceived: in body\r\n");
        assert_eq!(inspector.received_count(), 2);
    }

    #[test]
    fn stuffer_doubles_leading_dots_across_calls() {
        let mut stuffer = DotStuffer::default();
        let mut out = Vec::new();
        stuffer.stuff(b".a\r\n", &mut out);
        stuffer.stuff(b".", &mut out);
        stuffer.stuff(b"b\r\nc.d\r\n", &mut out);
        assert_eq!(out, b"..a\r\n..b\r\nc.d\r\n");
        assert_eq!(stuffer.terminator(), b".\r\n");
        stuffer.stuff(b"no newline", &mut out);
        assert_eq!(stuffer.terminator(), b"\r\n.\r\n");
    }
}
