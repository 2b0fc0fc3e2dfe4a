//! Reading message content: DATA and BDAT chunks, with the checks that apply
//! while the content streams (size, line endings, NUL, line length, hop
//! count), and our Received header in front.
//!
//! Content goes to the handler in pieces as it arrives, never held whole. The
//! first problem found stops the flow to the handler, but the rest of the
//! content is still read so the session stays in step with the client; the
//! handler's `abort_message` is then called and the client gets the problem's reply.

use std::time::Duration;

use super::connection::{Connection, InputError};
use super::data::{ContentError, ContentInspector, DotDecoder, HeaderInspector};
use super::envelope::Envelope;
use super::reply::Reply;
use super::session::{ClientInfo, Handler, SessionConfig};

/// The end of a message (or of one BDAT chunk).
#[derive(Debug)]
pub enum MessageOutcome {
    /// The content is complete and accepted by every check; the handler must finish it.
    Complete,
    /// A BDAT chunk that is not the last was passed on.
    ChunkAccepted,
    /// The final reply, from the handler.
    Final(Reply),
    /// The content was refused with this reply; the handler's `abort_message` was called.
    Rejected(Reply),
    /// The client closed, timed out or failed; the handler's `abort_message` was called.
    ClientGone(String),
}

/// Checks applied to content as it streams, shared by DATA and BDAT.
#[derive(Debug)]
struct ContentLimits {
    max_size: u64,
    max_line: usize,
    max_hops: usize,
    size: u64,
    headers: HeaderInspector,
    refusal: Option<Reply>,
}

impl ContentLimits {
    fn new(config: &SessionConfig) -> ContentLimits {
        ContentLimits {
            max_size: config.limits.max_message_size,
            max_line: config.limits.max_data_line,
            max_hops: config.limits.max_received_headers,
            size: 0,
            headers: HeaderInspector::default(),
            refusal: None,
        }
    }

    /// Checks the next piece of decoded content; false once it is refused.
    fn check(&mut self, data: &[u8], content_error: Option<ContentError>) -> bool {
        if self.refusal.is_some() {
            return false;
        }
        self.size += data.len() as u64;
        self.headers.inspect(data);
        let refusal = if let Some(error) = content_error {
            Some(match error {
                ContentError::BareLineEnding => Reply::bare_line_ending_in_data(),
                ContentError::Nul => Reply::nul_in_data(),
                ContentError::LineTooLong => Reply::data_line_too_long(self.max_line),
            })
        } else if self.size > self.max_size {
            Some(Reply::message_too_large(self.max_size))
        } else if self.headers.received_count() >= self.max_hops {
            // Our own Received header is one of them, so the limit counts hops
            // including this one (RFC 5321 §6.3).
            Some(Reply::too_many_hops(self.max_hops))
        } else {
            None
        };
        self.refusal = refusal;
        self.refusal.is_none()
    }
}

/// Builds our Received header (RFC 5321 §4.4), with the queue id.
pub fn received_header(
    config: &SessionConfig,
    client: &ClientInfo,
    envelope: &Envelope,
) -> Vec<u8> {
    // RFC 3848: S for TLS, A for an authenticated client.
    let protocol = match (client.extended, client.tls, client.authenticated.is_some()) {
        (false, _, _) => "SMTP",
        (true, false, false) => "ESMTP",
        (true, true, false) => "ESMTPS",
        (true, false, true) => "ESMTPA",
        (true, true, true) => "ESMTPSA",
    };
    let protocol = if envelope.parameters.smtputf8 {
        format!("UTF8{protocol}")
    } else {
        protocol.to_string()
    };
    let for_clause = match envelope.recipients.as_slice() {
        [only] => format!("\r\n\tfor <{}>", only.address.to_smtp()),
        _ => String::new(),
    };
    let date = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc2822)
        .unwrap_or_default();
    let helo = if client.helo.is_empty() {
        "unknown"
    } else {
        client.helo.as_str()
    };
    format!(
        "Received: from {helo} ([{ip}])\r\n\tby {host} (wsmtp) with {protocol} id {id}{for_clause};\r\n\t{date}\r\n",
        ip = client.peer.ip(),
        host = config.hostname,
        id = envelope.queue_id(),
    )
    .into_bytes()
}

/// Reads DATA content up to `<CRLF>.<CRLF>` and returns how it ended, with
/// the content's size in octets so far (our Received header included).
pub async fn receive_data<H: Handler>(
    connection: &mut Connection,
    handler: &mut H,
    config: &SessionConfig,
    client: &ClientInfo,
    envelope: &Envelope,
) -> (MessageOutcome, u64) {
    let reject_nul = config.limits.nul_bytes == crate::config::NulPolicy::Reject;
    let mut decoder = DotDecoder::new(config.limits.max_data_line, reject_nul);
    let mut limits = ContentLimits::new(config);
    let mut decoded = Vec::with_capacity(64 * 1024);

    let header = received_header(config, client, envelope);
    limits.check(&header, None);
    if let Err(reply) = handler.message_data(&header).await {
        limits.refusal = Some(reply);
    }

    loop {
        if connection.buffered().is_empty()
            && let Err(error) = connection.fill(config.timeouts.data).await
        {
            handler.abort_message().await;
            return (MessageOutcome::ClientGone(describe(error)), limits.size);
        }
        let result = decoder.decode(connection.buffered(), &mut decoded);
        connection.consume(result.consumed);
        if limits.check(&decoded, decoder.error())
            && !decoded.is_empty()
            && let Err(reply) = handler.message_data(&decoded).await
        {
            limits.refusal = Some(reply);
        }
        decoded.clear();
        if result.finished {
            break;
        }
    }

    let outcome = match limits.refusal {
        Some(reply) => {
            handler.abort_message().await;
            MessageOutcome::Rejected(reply)
        }
        None => MessageOutcome::Final(handler.finish_message(client, envelope).await),
    };
    (outcome, limits.size)
}

/// State of a message received in BDAT chunks.
#[derive(Debug)]
pub struct BdatState {
    inspector: ContentInspector,
    limits: ContentLimits,
    header: Option<Vec<u8>>,
}

impl BdatState {
    /// Octets of content received so far, our Received header included.
    pub fn size(&self) -> u64 {
        self.limits.size
    }

    pub fn new(config: &SessionConfig, client: &ClientInfo, envelope: &Envelope) -> BdatState {
        let reject_nul = config.limits.nul_bytes == crate::config::NulPolicy::Reject;
        BdatState {
            inspector: ContentInspector::new(config.limits.max_data_line, reject_nul),
            limits: ContentLimits::new(config),
            header: Some(received_header(config, client, envelope)),
        }
    }
}

/// Reads one BDAT chunk of `size` octets (RFC 3030 §2). The chunk is read in
/// full even when refused.
pub async fn receive_chunk<H: Handler>(
    connection: &mut Connection,
    handler: &mut H,
    config: &SessionConfig,
    state: &mut BdatState,
    size: usize,
    last: bool,
) -> MessageOutcome {
    if let Some(header) = state.header.take() {
        state.limits.check(&header, None);
        if let Err(reply) = handler.message_data(&header).await {
            state.limits.refusal = Some(reply);
        }
    }

    let mut remaining = size;
    while remaining > 0 {
        if connection.buffered().is_empty()
            && let Err(error) = connection.fill(config.timeouts.data).await
        {
            handler.abort_message().await;
            return MessageOutcome::ClientGone(describe(error));
        }
        let take = remaining.min(connection.buffered().len());
        let piece = &connection.buffered()[..take];
        state.inspector.inspect(piece);
        if state.limits.check(piece, state.inspector.error())
            && let Err(reply) = handler.message_data(piece).await
        {
            state.limits.refusal = Some(reply);
        }
        connection.consume(take);
        remaining -= take;
    }

    if last {
        state.inspector.finish();
        state.limits.check(&[], state.inspector.error());
    }
    match (state.limits.refusal.take(), last) {
        (Some(reply), _) => {
            handler.abort_message().await;
            MessageOutcome::Rejected(reply)
        }
        (None, true) => MessageOutcome::Complete,
        (None, false) => MessageOutcome::ChunkAccepted,
    }
}

/// Reads and drops `size` octets of a refused BDAT chunk.
pub async fn discard(
    connection: &mut Connection,
    size: usize,
    timeout: Duration,
) -> Result<(), String> {
    let mut remaining = size;
    while remaining > 0 {
        if connection.buffered().is_empty() {
            connection.fill(timeout).await.map_err(describe)?;
        }
        let take = remaining.min(connection.buffered().len());
        connection.consume(take);
        remaining -= take;
    }
    Ok(())
}

fn describe(error: InputError) -> String {
    error.to_string()
}
