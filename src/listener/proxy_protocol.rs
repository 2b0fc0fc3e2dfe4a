//! The receiving side of the PROXY protocol (HAProxy's proxy-protocol.txt,
//! version 1 text and version 2 binary): a TCP load balancer opens each
//! connection with a header that names the client it forwards.
//!
//! The header is parsed with the `ppp` crate, plus stricter checks of our
//! own: a version 1 line must end in CRLF, and a version 2 address block may
//! be at most [`MAX_V2_PAYLOAD`] bytes. [`read_header`] consumes exactly the
//! header's bytes, so a command pipelined right after it stays in the socket
//! for the SMTP session.

use std::net::SocketAddr;
use std::time::Duration;

use ppp::PartialResult as _;
use ppp::{v1, v2};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Maximum length of a version 1 header, CRLF included (set by the protocol).
const MAX_V1_LENGTH: usize = 107;

/// Fixed part of a version 2 header: 12-byte signature, version and command,
/// family and protocol, 2-byte length of the address block.
const V2_FIXED_LENGTH: usize = 16;

/// Maximum length accepted for the version 2 address block (addresses and
/// TLVs). The length field allows 65,535 bytes, but addresses take at most
/// 216 (two Unix socket paths) and load balancers' TLVs usually a few
/// hundred, so this bound is a generous estimate rather than a protocol limit.
pub const MAX_V2_PAYLOAD: usize = 4096;

const MAX_HEADER_LENGTH: usize = V2_FIXED_LENGTH + MAX_V2_PAYLOAD;

/// The client named by a header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The forwarded client's address and port.
    Client(SocketAddr),
    /// No client address: a version 1 `UNKNOWN`, a version 2 `LOCAL` (the
    /// balancer's own health check) or an address family other than IPv4 and
    /// IPv6. The connection's peer address stays the client address.
    Peer,
}

/// Failure to read a PROXY header.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("no complete PROXY header within {0:?}")]
    Timeout(Duration),
    #[error("connection closed after {received} bytes of the PROXY header")]
    Closed { received: usize },
    #[error("invalid PROXY header: {0}")]
    Invalid(String),
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Result of parsing the start of a connection's input.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    /// A header of `length` bytes starts the input.
    Complete { length: usize, source: Source },
    /// The input is a valid beginning of a header; more bytes are needed.
    Incomplete,
    /// The input cannot become a valid header.
    Invalid(String),
}

/// Reads one PROXY header from the start of `stream` within `timeout`.
///
/// Input is peeked first and consumed only up to the end of the header, so
/// the bytes after it are left for the SMTP session.
pub async fn read_header(stream: &mut TcpStream, timeout: Duration) -> Result<Source, HeaderError> {
    tokio::time::timeout(timeout, read_header_bytes(stream))
        .await
        .map_err(|_| HeaderError::Timeout(timeout))?
}

async fn read_header_bytes(stream: &mut TcpStream) -> Result<Source, HeaderError> {
    // Bytes already consumed from the socket, all of them part of the header.
    let mut received: Vec<u8> = Vec::with_capacity(MAX_V1_LENGTH);
    let mut window = vec![0u8; MAX_HEADER_LENGTH];
    loop {
        let room = MAX_HEADER_LENGTH - received.len();
        if room == 0 {
            return Err(HeaderError::Invalid("header too long".to_string()));
        }
        let peeked = stream.peek(&mut window[..room]).await?;
        if peeked == 0 {
            return Err(HeaderError::Closed {
                received: received.len(),
            });
        }
        let consumed = received.len();
        received.extend_from_slice(&window[..peeked]);
        match parse(&received) {
            Parsed::Complete { length, source } => {
                stream.read_exact(&mut window[..length - consumed]).await?;
                return Ok(source);
            }
            Parsed::Incomplete => {
                // Every peeked byte belongs to the header, because the header
                // does not end within them.
                stream.read_exact(&mut window[..peeked]).await?;
            }
            Parsed::Invalid(reason) => return Err(HeaderError::Invalid(reason)),
        }
    }
}

/// Parses a header at the start of `input`, which may hold more bytes after it.
fn parse(input: &[u8]) -> Parsed {
    // The version 2 signature starts with CR, a version 1 line with "PROXY".
    if input.first() == Some(&b'\r') {
        parse_v2(input)
    } else {
        parse_v1(input)
    }
}

fn parse_v1(input: &[u8]) -> Parsed {
    const PREFIX: &[u8] = b"PROXY ";
    let window = &input[..input.len().min(MAX_V1_LENGTH)];
    let Some(newline) = memchr::memchr(b'\n', window) else {
        if window.len() == MAX_V1_LENGTH {
            return Parsed::Invalid(format!("version 1 line longer than {MAX_V1_LENGTH} bytes"));
        }
        let plausible = window.starts_with(PREFIX) || PREFIX.starts_with(window);
        return if plausible {
            Parsed::Incomplete
        } else {
            Parsed::Invalid(
                "input starts with neither PROXY nor the version 2 signature".to_string(),
            )
        };
    };
    if newline == 0 || window[newline - 1] != b'\r' {
        return Parsed::Invalid("version 1 line does not end with CRLF".to_string());
    }
    // The crate's detection of partial input rejects some valid prefixes
    // (ppp 2.3 fails one that ends in the space before the destination
    // port), so the crate is given whole lines only.
    let line = &window[..=newline];
    let header = match v1::Header::try_from(line) {
        Ok(header) => header,
        Err(error) => return Parsed::Invalid(error.to_string()),
    };
    let source = match header.addresses {
        v1::Addresses::Tcp4(addresses) => Source::Client(SocketAddr::from((
            addresses.source_address,
            addresses.source_port,
        ))),
        v1::Addresses::Tcp6(addresses) => Source::Client(SocketAddr::from((
            addresses.source_address,
            addresses.source_port,
        ))),
        v1::Addresses::Unknown => Source::Peer,
    };
    Parsed::Complete {
        length: header.header.len(),
        source,
    }
}

fn parse_v2(input: &[u8]) -> Parsed {
    if input.len() >= V2_FIXED_LENGTH && input[..12] == *v2::PROTOCOL_PREFIX {
        let payload = usize::from(u16::from_be_bytes([input[14], input[15]]));
        if payload > MAX_V2_PAYLOAD {
            return Parsed::Invalid(format!(
                "version 2 address block of {payload} bytes exceeds the maximum of {MAX_V2_PAYLOAD}"
            ));
        }
    }
    let header = match v2::Header::try_from(input) {
        Ok(header) => header,
        Err(error) if error.is_incomplete() => return Parsed::Incomplete,
        Err(error) => return Parsed::Invalid(error.to_string()),
    };
    let length = header.len();
    if header.command == v2::Command::Local {
        return Parsed::Complete {
            length,
            source: Source::Peer,
        };
    }
    let source = match header.addresses {
        v2::Addresses::IPv4(addresses) => Some(SocketAddr::from((
            addresses.source_address,
            addresses.source_port,
        ))),
        v2::Addresses::IPv6(addresses) => Some(SocketAddr::from((
            addresses.source_address,
            addresses.source_port,
        ))),
        v2::Addresses::Unspecified | v2::Addresses::Unix(_) => None,
    };
    match (source, header.protocol) {
        (Some(_), v2::Protocol::Datagram) => {
            Parsed::Invalid("version 2 header describes a UDP connection".to_string())
        }
        (Some(client), _) => Parsed::Complete {
            length,
            source: Source::Client(client),
        },
        (None, _) => Parsed::Complete {
            length,
            source: Source::Peer,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

    /// A version 2 header with the given command, family/protocol byte and
    /// address block.
    fn v2_header(command: u8, family: u8, payload: &[u8]) -> Vec<u8> {
        let mut header = SIGNATURE.to_vec();
        header.push(0x20 | command);
        header.push(family);
        header.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        header.extend_from_slice(payload);
        header
    }

    /// Parses and checks the length separately, so each failure names one cause.
    fn parsed_source(input: &[u8], expected_length: usize) -> Source {
        match parse(input) {
            Parsed::Complete { length, source } => {
                assert_eq!(length, expected_length, "header length");
                source
            }
            other => panic!("expected a complete header, got {other:?}"),
        }
    }

    #[test]
    fn v1_tcp4_names_the_client() {
        let line = b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 25\r\n";
        let mut input = line.to_vec();
        input.extend_from_slice(b"EHLO client.example\r\n");
        assert_eq!(
            parsed_source(&input, line.len()),
            Source::Client("203.0.113.7:40000".parse().expect("address"))
        );
    }

    #[test]
    fn v1_tcp6_names_the_client() {
        let line = b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 25\r\n";
        assert_eq!(
            parsed_source(line, line.len()),
            Source::Client("[2001:db8::7]:40000".parse().expect("address"))
        );
    }

    #[test]
    fn v1_unknown_keeps_the_peer() {
        let line = b"PROXY UNKNOWN\r\n";
        assert_eq!(parsed_source(line, line.len()), Source::Peer);
        let with_addresses = b"PROXY UNKNOWN 203.0.113.7 192.0.2.1 40000 25\r\n";
        assert_eq!(
            parsed_source(with_addresses, with_addresses.len()),
            Source::Peer
        );
    }

    #[test]
    fn v1_prefixes_are_incomplete() {
        let line = b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 25\r\n";
        for end in 1..line.len() {
            assert_eq!(
                parse(&line[..end]),
                Parsed::Incomplete,
                "prefix {:?}",
                String::from_utf8_lossy(&line[..end])
            );
        }
    }

    #[test]
    fn v1_malformed_lines_are_invalid() {
        let cases: &[&[u8]] = &[
            b"EHLO client.example\r\n",
            b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 25\n",
            b"PROXY TCP4 203.0.113.7\n",
            b"PROXY TCP4 203.0.113.300 192.0.2.1 40000 25\r\n",
            b"PROXY TCP4 2001:db8::7 192.0.2.1 40000 25\r\n",
            b"PROXY TCP4 203.0.113.7 192.0.2.1 70000 25\r\n",
            b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 25 extra\r\n",
            b"PROXY TCP4  203.0.113.7 192.0.2.1 40000 25\r\n",
            b"PROXY UDP4 203.0.113.7 192.0.2.1 40000 25\r\n",
            b"proxy TCP4 203.0.113.7 192.0.2.1 40000 25\r\n",
        ];
        for input in cases {
            assert!(
                matches!(parse(input), Parsed::Invalid(_)),
                "{:?} gave {:?}",
                String::from_utf8_lossy(input),
                parse(input)
            );
        }
    }

    #[test]
    fn v1_line_over_107_bytes_is_invalid() {
        let mut input = b"PROXY UNKNOWN ".to_vec();
        input.resize(120, b'x');
        assert!(
            matches!(parse(&input), Parsed::Invalid(_)),
            "{:?}",
            parse(&input)
        );
        input.truncate(105);
        input.extend_from_slice(b"\r\n");
        assert_eq!(input.len(), 107);
        assert_eq!(parsed_source(&input, 107), Source::Peer);
    }

    #[test]
    fn v2_ipv4_names_the_client() {
        let payload = [203, 0, 113, 7, 192, 0, 2, 1, 0x9c, 0x40, 0, 25];
        let mut input = v2_header(1, 0x11, &payload);
        let length = input.len();
        input.extend_from_slice(b"EHLO client.example\r\n");
        assert_eq!(
            parsed_source(&input, length),
            Source::Client("203.0.113.7:40000".parse().expect("address"))
        );
    }

    #[test]
    fn v2_ipv6_with_tlvs_names_the_client() {
        let mut payload = Vec::new();
        payload.extend_from_slice(
            &"2001:db8::7"
                .parse::<std::net::Ipv6Addr>()
                .expect("ip")
                .octets(),
        );
        payload.extend_from_slice(
            &"2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .expect("ip")
                .octets(),
        );
        payload.extend_from_slice(&[0x9c, 0x40, 0, 25]);
        // A NOOP TLV (type 0x04) with three bytes of value.
        payload.extend_from_slice(&[0x04, 0, 3, 1, 2, 3]);
        let input = v2_header(1, 0x21, &payload);
        assert_eq!(
            parsed_source(&input, input.len()),
            Source::Client("[2001:db8::7]:40000".parse().expect("address"))
        );
    }

    #[test]
    fn v2_local_keeps_the_peer() {
        let input = v2_header(0, 0x00, &[]);
        assert_eq!(parsed_source(&input, 16), Source::Peer);
        let with_addresses = v2_header(0, 0x11, &[203, 0, 113, 7, 192, 0, 2, 1, 0, 1, 0, 25]);
        assert_eq!(parsed_source(&with_addresses, 28), Source::Peer);
    }

    #[test]
    fn v2_unspecified_family_keeps_the_peer() {
        let input = v2_header(1, 0x00, &[]);
        assert_eq!(parsed_source(&input, 16), Source::Peer);
    }

    #[test]
    fn v2_prefixes_are_incomplete() {
        let input = v2_header(1, 0x11, &[203, 0, 113, 7, 192, 0, 2, 1, 0, 1, 0, 25]);
        for end in 1..input.len() {
            assert_eq!(
                parse(&input[..end]),
                Parsed::Incomplete,
                "prefix of {end} bytes"
            );
        }
    }

    #[test]
    fn v2_oversized_length_is_invalid() {
        let mut input = SIGNATURE.to_vec();
        input.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(
            matches!(parse(&input), Parsed::Invalid(_)),
            "{:?}",
            parse(&input)
        );
        let largest = v2_header(1, 0x00, &vec![0; MAX_V2_PAYLOAD]);
        assert_eq!(parsed_source(&largest, 16 + MAX_V2_PAYLOAD), Source::Peer);
    }

    #[test]
    fn v2_malformed_headers_are_invalid() {
        let address = [203, 0, 113, 7, 192, 0, 2, 1, 0, 1, 0, 25];
        let mut bad_version = v2_header(1, 0x11, &address);
        bad_version[12] = 0x11;
        let mut bad_signature = v2_header(1, 0x11, &address);
        bad_signature[8] = b'X';
        let cases = [
            ("version 1 in the binary form", bad_version),
            ("signature", bad_signature),
            ("command", v2_header(2, 0x11, &address)),
            ("family", v2_header(1, 0x41, &address)),
            ("UDP", v2_header(1, 0x12, &address)),
            ("short address block", v2_header(1, 0x11, &address[..8])),
        ];
        for (name, input) in cases {
            assert!(
                matches!(parse(&input), Parsed::Invalid(_)),
                "{name}: {:?}",
                parse(&input)
            );
        }
    }
}
