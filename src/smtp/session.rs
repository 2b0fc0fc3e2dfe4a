//! The SMTP server session: one per connection, driven by the listener.
//!
//! The session owns the protocol: it reads command lines, parses them with
//! smtp-proto, enforces sequence, limits and timeouts, reads message data
//! (DATA and BDAT) and sends every reply through [`Session::reply`], which
//! counts errors and hangs up after a 421. What happens to recipients and
//! message data is decided by a [`Handler`], so this module never touches
//! policy, sockets of other servers or the queue.
//!
//! Phases are types: a transaction only exists inside [`Phase::Transaction`],
//! so RCPT before MAIL or DATA outside a transaction cannot be represented.
//! Authentication (AUTH, in the child module `auth`) is a fact about the
//! client, [`ClientInfo::authenticated`], which lasts until STARTTLS.

mod auth;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use smtp_proto::{Error as ParseError, Request};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::connection::{Connection, InputError, Line, Stream};
use super::envelope::{Envelope, MailParameters, Notify, Recipient};
use super::message::{self, MessageOutcome};
use super::reply::Reply;
use crate::auth::Authenticator;
use crate::config::{Limits, Mechanism, Timeouts};
use crate::metrics::{Metrics, TlsMode, TlsResult, TransactionResult};
use crate::policy::address::Address;

/// Settings shared by all sessions of a listener.
pub struct SessionConfig {
    pub hostname: String,
    pub limits: Limits,
    pub timeouts: Timeouts,
    pub tls: Option<TlsAcceptor>,
    /// The TLS handshake happens on connect, before the greeting (RFC 8314).
    /// Needs `tls`.
    pub implicit_tls: bool,
    /// SMTP AUTH; None when the listener does not offer it.
    pub auth: Option<SessionAuth>,
    pub metrics: Arc<Metrics>,
}

/// SMTP AUTH on one listener.
#[derive(Clone)]
pub struct SessionAuth {
    /// Offered mechanisms, in EHLO order.
    pub mechanisms: Vec<Mechanism>,
    /// AUTH is offered and accepted only over TLS.
    pub require_tls: bool,
    pub authenticator: Arc<Authenticator>,
}

/// Facts about the client, fixed for the whole connection except TLS, HELO
/// and authentication.
#[derive(Clone, Debug)]
pub struct ClientInfo {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// The EHLO/HELO argument, empty before the greeting.
    pub helo: String,
    pub extended: bool,
    pub tls: bool,
    /// The account name after a successful AUTH.
    pub authenticated: Option<String>,
}

/// The destination of a transaction's content, as the handler chose it
/// when the content started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContentRoute {
    /// No content was taken.
    None,
    /// Into the queue.
    Spool,
    /// Live to a downstream server.
    Relay,
}

impl ContentRoute {
    /// Returns the value of the `decision` field of the transaction's log line.
    pub fn as_str(self) -> &'static str {
        match self {
            ContentRoute::None => "none",
            ContentRoute::Spool => "spool",
            ContentRoute::Relay => "relay",
        }
    }
}

/// Interface between the session and the code that routes and stores mail.
///
/// Every method returns the reply to send (or `Err(reply)`); the session
/// sends it. Replies from a downstream server must be checked with
/// [`Reply::from_downstream`] before they are returned.
pub trait Handler: Send {
    /// Decides one recipient. A positive reply adds it to the envelope.
    fn recipient(
        &mut self,
        client: &ClientInfo,
        envelope: &Envelope,
        recipient: &Recipient,
    ) -> impl Future<Output = Reply> + Send;
    /// Prepares to receive message content for the accepted recipients.
    fn start_message(
        &mut self,
        client: &ClientInfo,
        envelope: &Envelope,
    ) -> impl Future<Output = Result<(), Reply>> + Send;
    /// Takes decoded content (no transparency dots), in order.
    fn message_data(&mut self, data: &[u8]) -> impl Future<Output = Result<(), Reply>> + Send;
    /// The content is complete; returns the final reply.
    fn finish_message(
        &mut self,
        client: &ClientInfo,
        envelope: &Envelope,
    ) -> impl Future<Output = Reply> + Send;
    /// The content was rejected or the client vanished: nothing may be delivered.
    fn abort_message(&mut self) -> impl Future<Output = ()> + Send;
    /// The transaction ended (RSET, a new EHLO, QUIT, or after the final reply).
    fn reset(&mut self) -> impl Future<Output = ()> + Send;
    /// Returns the destination of the current transaction's content. The
    /// session calls it after the final reply and before `reset`.
    fn content_route(&self) -> ContentRoute {
        ContentRoute::None
    }
}

#[derive(Debug)]
enum Phase {
    /// Before EHLO/HELO.
    Connected,
    /// Greeted, no transaction.
    Ready,
    Transaction(Box<Transaction>),
}

#[derive(Debug)]
struct Transaction {
    envelope: Envelope,
    started: Instant,
    chunking: Chunking,
}

/// BDAT progress within a transaction (RFC 3030).
#[derive(Debug)]
enum Chunking {
    NotStarted,
    Receiving(message::BdatState),
    /// A chunk was refused; later chunks are consumed and refused too.
    Failed,
}

/// Whether the session goes on after a command.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Close,
}

pub struct Session<H: Handler> {
    config: Arc<SessionConfig>,
    connection: Connection,
    client: ClientInfo,
    handler: H,
    phase: Phase,
    errors: usize,
    shutdown: CancellationToken,
    transactions: u64,
    /// Reason the session ended, when there is a more precise one than "closed".
    end: Option<String>,
}

impl<H: Handler> Session<H> {
    pub fn new(
        config: Arc<SessionConfig>,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
        handler: H,
        shutdown: CancellationToken,
    ) -> Session<H> {
        Session {
            config,
            connection: Connection::new(Stream::Plain(stream)),
            client: ClientInfo {
                peer,
                local,
                helo: String::new(),
                extended: false,
                tls: false,
                authenticated: None,
            },
            handler,
            phase: Phase::Connected,
            errors: 0,
            shutdown,
            transactions: 0,
            end: None,
        }
    }

    /// Runs the session to its end and logs one line for the connection.
    pub async fn run(mut self) {
        let started = Instant::now();
        let end = match self.start_implicit_tls().await {
            Err(reason) => reason,
            Ok(()) => {
                let greeting = Reply::greeting(&self.config.hostname);
                match self.reply(greeting).await {
                    Flow::Continue => self.command_loop().await,
                    Flow::Close => "write failed".to_string(),
                }
            }
        };
        if let Phase::Transaction(_) = self.phase {
            self.handler.abort_message().await;
            self.handler.reset().await;
        }
        self.connection.shutdown().await;
        self.count_received_bytes();
        tracing::info!(
            client_ip = %self.client.peer.ip(),
            helo = %self.client.helo,
            tls = self.client.tls,
            account = self.client.authenticated.as_deref().unwrap_or(""),
            transactions = self.transactions,
            errors = self.errors,
            duration_ms = started.elapsed().as_millis() as u64,
            end = %end,
            "connection closed"
        );
    }

    /// Reads and handles commands until the session ends; returns why it ended.
    async fn command_loop(&mut self) -> String {
        loop {
            let Some(line) = self
                .connection
                .take_line(self.config.limits.max_command_line)
            else {
                if let Err(reason) = self.wait_for_input().await {
                    return reason;
                }
                continue;
            };
            let flow = match line {
                Line::Command(bytes) => self.handle_line(&bytes).await,
                Line::TooLong => {
                    self.reply(Reply::command_line_too_long(
                        self.config.limits.max_command_line,
                    ))
                    .await
                }
                Line::Malformed => self.reply(Reply::bad_command_line_ending()).await,
            };
            if flow == Flow::Close {
                return self
                    .end
                    .take()
                    .unwrap_or_else(|| "closed by server".to_string());
            }
        }
    }

    /// Flushes pending replies and reads more input. Outside a transaction a
    /// shutdown ends the session with 421 (RFC 5321 §3.8).
    async fn wait_for_input(&mut self) -> Result<(), String> {
        if let Err(error) = self.connection.flush().await {
            return Err(format!("write failed: {error}"));
        }
        let idle = !matches!(self.phase, Phase::Transaction(_));
        let timeout = self.config.timeouts.command;
        let result = if idle {
            tokio::select! {
                result = self.connection.fill(timeout) => result,
                () = self.shutdown.cancelled() => {
                    self.reply(Reply::shutting_down(&self.config.hostname)).await;
                    return Err("server shutdown".to_string());
                }
            }
        } else {
            self.connection.fill(timeout).await
        };
        match result {
            Ok(_) => Ok(()),
            Err(InputError::Timeout) => {
                self.reply(Reply::timeout(&self.config.hostname)).await;
                Err("command timeout".to_string())
            }
            Err(error) => Err(error.to_string()),
        }
    }

    /// Sends a reply (buffered while pipelined input waits), counts errors
    /// and closes after 421 or when the error limit is passed.
    async fn reply(&mut self, reply: Reply) -> Flow {
        if reply.code() >= 400 && !reply.closes_connection() {
            self.errors += 1;
        }
        self.queue_reply(&reply);
        let mut flow = Flow::Continue;
        if reply.closes_connection() {
            self.end
                .get_or_insert_with(|| format!("sent {}", reply.summary()));
            flow = Flow::Close;
        } else if self.errors > self.config.limits.max_errors {
            tracing::info!(client_ip = %self.client.peer.ip(), errors = self.errors, "error limit reached");
            self.queue_reply(&Reply::too_many_errors());
            self.end = Some("error limit reached".to_string());
            flow = Flow::Close;
        }
        if (flow == Flow::Close || !self.connection.has_buffered_input())
            && self.connection.flush().await.is_err()
        {
            return Flow::Close;
        }
        flow
    }

    /// Queues a reply to send with the next flush and counts it.
    fn queue_reply(&mut self, reply: &Reply) {
        self.config.metrics.smtp.reply_sent(reply.code());
        self.connection.queue_reply(reply);
    }

    /// Adds the octets read since the last call to the received counter.
    fn count_received_bytes(&mut self) {
        let read = self.connection.take_bytes_read();
        self.config.metrics.smtp.received_bytes.inc_by(read);
    }

    async fn handle_line(&mut self, line: &[u8]) -> Flow {
        let mut bytes = line.iter();
        let request = match Request::parse(&mut bytes) {
            Ok(request) => request,
            Err(error) => {
                let reply = parse_error_reply(&error);
                return self.reply(reply).await;
            }
        };
        match request {
            Request::Ehlo { host } => self.handle_hello(host.into_owned(), true).await,
            Request::Helo { host } => self.handle_hello(host.into_owned(), false).await,
            Request::Mail { from } => {
                let envid = from.env_id.as_ref().map(|e| e.to_string());
                let unsupported = unsupported_mail_parameter(&from, self.config.auth.is_some());
                let parameters = MailParameters::from_flags(from.flags, from.size, envid);
                let reply = match (unsupported, parameters) {
                    (Some(name), _) | (None, Err(name)) => Reply::unsupported_parameter(name),
                    (None, Ok(parameters)) => self.handle_mail(&from.address, parameters),
                };
                self.reply(reply).await
            }
            Request::Rcpt { to } => {
                let postmaster = to.address.is_empty() && is_bare_postmaster(line);
                let orcpt = to.orcpt.as_ref().map(|o| o.to_string());
                let reply = self
                    .handle_rcpt(&to.address, postmaster, orcpt, to.flags)
                    .await;
                self.reply(reply).await
            }
            Request::Data => self.handle_data().await,
            Request::Bdat {
                chunk_size,
                is_last,
            } => self.handle_bdat(chunk_size, is_last).await,
            Request::Rset => {
                self.end_transaction().await;
                self.reply(Reply::reset()).await
            }
            Request::Noop { .. } => self.reply(Reply::ok()).await,
            Request::Help { .. } => self.reply(Reply::help()).await,
            Request::Vrfy { .. } => self.reply(Reply::cannot_verify()).await,
            Request::Quit => {
                self.end = Some("client sent QUIT".to_string());
                self.end_transaction().await;
                self.reply(Reply::closing(&self.config.hostname)).await;
                Flow::Close
            }
            Request::StartTls => self.handle_starttls().await,
            Request::Auth {
                mechanism,
                initial_response,
            } => self.handle_auth(mechanism, &initial_response).await,
            other => self.reply(Reply::not_implemented(other.name())).await,
        }
    }

    async fn handle_hello(&mut self, host: String, extended: bool) -> Flow {
        // RFC 5321 §4.1.4: EHLO/HELO ends any open transaction.
        self.end_transaction().await;
        self.client.helo = sanitize_helo(&host);
        self.client.extended = extended;
        self.phase = Phase::Ready;
        let client_name = format!("{} [{}]", self.client.helo, self.client.peer.ip());
        let reply = if extended {
            Reply::ehlo(&self.config.hostname, &client_name, self.extensions())
        } else {
            Reply::helo(&self.config.hostname, &client_name)
        };
        self.reply(reply).await
    }

    fn extensions(&self) -> Vec<String> {
        let mut extensions = vec![
            "PIPELINING".to_string(),
            format!("SIZE {}", self.config.limits.max_message_size),
            "8BITMIME".to_string(),
            "ENHANCEDSTATUSCODES".to_string(),
            "SMTPUTF8".to_string(),
            "CHUNKING".to_string(),
            "DSN".to_string(),
            "HELP".to_string(),
        ];
        if self.config.tls.is_some() && !self.client.tls {
            extensions.push("STARTTLS".to_string());
        }
        if let Some(auth) = self.auth_extension() {
            extensions.push(auth);
        }
        extensions
    }

    fn handle_mail(&mut self, address: &str, parameters: MailParameters) -> Reply {
        match self.phase {
            Phase::Connected => return Reply::bad_sequence("send EHLO or HELO first"),
            Phase::Transaction(_) => return Reply::bad_sequence("nested MAIL command"),
            Phase::Ready => {}
        }
        let max_size = self.config.limits.max_message_size;
        if parameters.size.is_some_and(|size| size > max_size) {
            return Reply::message_too_large(max_size);
        }
        if parameters.smtputf8 && !self.client.extended {
            return Reply::bad_sequence("SMTPUTF8 requires EHLO");
        }
        let sender = if address.is_empty() {
            None
        } else {
            match Address::parse(address) {
                Ok(sender) => Some(sender),
                Err(error) => return Reply::invalid_sender(&error.to_string()),
            }
        };
        // RFC 6531 §3.4: a non-ASCII address needs SMTPUTF8 on MAIL.
        if !address.is_ascii() && !parameters.smtputf8 {
            return Reply::smtputf8_not_negotiated();
        }
        if let Some(reply) = self.check_authenticated_sender(sender.as_ref()) {
            return reply;
        }
        let envelope = Envelope {
            id: uuid::Uuid::now_v7(),
            sender,
            parameters,
            recipients: Vec::new(),
        };
        tracing::debug!(queue_id = %envelope.queue_id(), sender = %envelope.sender_text(), "transaction started");
        self.phase = Phase::Transaction(Box::new(Transaction {
            envelope,
            started: Instant::now(),
            chunking: Chunking::NotStarted,
        }));
        Reply::sender_ok()
    }

    async fn handle_rcpt(
        &mut self,
        address: &str,
        postmaster: bool,
        orcpt: Option<String>,
        flags: u64,
    ) -> Reply {
        let max_recipients = self.config.limits.max_recipients;
        let Phase::Transaction(transaction) = &mut self.phase else {
            return Reply::bad_sequence("send MAIL first");
        };
        if !matches!(transaction.chunking, Chunking::NotStarted) {
            return Reply::bad_sequence("RCPT after BDAT");
        }
        if transaction.envelope.recipients.len() >= max_recipients {
            return Reply::too_many_recipients(max_recipients);
        }
        let address = if postmaster {
            // RFC 5321 §4.5.1: <Postmaster> without a domain is ours.
            Address::parse(&format!("postmaster@{}", self.config.hostname))
        } else if address.is_empty() {
            return Reply::invalid_recipient("the null address cannot be a recipient");
        } else {
            Address::parse(address)
        };
        let address = match address {
            Ok(address) => address,
            Err(error) => return Reply::invalid_recipient(&error.to_string()),
        };
        if !address.to_smtp().is_ascii() && !transaction.envelope.parameters.smtputf8 {
            return Reply::smtputf8_not_negotiated();
        }
        let recipient = Recipient {
            address,
            bare_postmaster: postmaster,
            orcpt,
            notify: Notify::from_flags(flags),
        };
        let reply = self
            .handler
            .recipient(&self.client, &transaction.envelope, &recipient)
            .await;
        if reply.is_positive() {
            transaction.envelope.recipients.push(recipient);
        }
        reply
    }

    async fn handle_data(&mut self) -> Flow {
        let reply = match &self.phase {
            Phase::Transaction(transaction)
                if !matches!(transaction.chunking, Chunking::NotStarted) =>
            {
                Some(Reply::bad_sequence("DATA after BDAT"))
            }
            Phase::Transaction(transaction) if transaction.envelope.recipients.is_empty() => {
                // RFC 2920 §3.1: DATA after all RCPTs failed gets 554.
                Some(Reply::no_valid_recipients())
            }
            Phase::Transaction(_) => None,
            _ => Some(Reply::bad_sequence("send MAIL and RCPT first")),
        };
        if let Some(reply) = reply {
            return self.reply(reply).await;
        }
        let Phase::Transaction(transaction) = &self.phase else {
            return Flow::Continue;
        };
        if let Err(reply) = self
            .handler
            .start_message(&self.client, &transaction.envelope)
            .await
        {
            return self.reply(reply).await;
        }
        self.config.metrics.smtp.reply_sent(354);
        self.connection.queue_reply(&Reply::start_data());
        if self.connection.flush().await.is_err() {
            return Flow::Close;
        }
        let (outcome, size) = message::receive_data(
            &mut self.connection,
            &mut self.handler,
            &self.config,
            &self.client,
            &transaction.envelope,
        )
        .await;
        self.finish_transaction(outcome, size).await
    }

    async fn handle_bdat(&mut self, size: usize, last: bool) -> Flow {
        let refusal = match &self.phase {
            Phase::Transaction(transaction) => match transaction.chunking {
                Chunking::Failed => Some(Reply::transaction_failed_earlier()),
                _ if transaction.envelope.recipients.is_empty() => {
                    Some(Reply::no_valid_recipients())
                }
                _ => None,
            },
            _ => Some(Reply::bad_sequence("send MAIL and RCPT first")),
        };
        if let Some(reply) = refusal {
            // RFC 3030 §2: a refused chunk is still read, so the session
            // stays in step with the client.
            if let Err(end) =
                message::discard(&mut self.connection, size, self.config.timeouts.data).await
            {
                tracing::info!(client_ip = %self.client.peer.ip(), end = %end, "client disconnected during a refused BDAT chunk");
                return Flow::Close;
            }
            return self.reply(reply).await;
        }
        let Phase::Transaction(transaction) = &mut self.phase else {
            return Flow::Continue;
        };
        if matches!(transaction.chunking, Chunking::NotStarted) {
            if let Err(reply) = self
                .handler
                .start_message(&self.client, &transaction.envelope)
                .await
            {
                transaction.chunking = Chunking::Failed;
                if let Err(end) =
                    message::discard(&mut self.connection, size, self.config.timeouts.data).await
                {
                    tracing::info!(client_ip = %self.client.peer.ip(), end = %end, "client disconnected during BDAT");
                    return Flow::Close;
                }
                return self.reply(reply).await;
            }
            let state = message::BdatState::new(&self.config, &self.client, &transaction.envelope);
            transaction.chunking = Chunking::Receiving(state);
        }
        let Chunking::Receiving(state) = &mut transaction.chunking else {
            return Flow::Continue;
        };
        let outcome = message::receive_chunk(
            &mut self.connection,
            &mut self.handler,
            &self.config,
            state,
            size,
            last,
        )
        .await;
        let received = state.size();
        match outcome {
            MessageOutcome::ChunkAccepted => self.reply(Reply::chunk_received(size)).await,
            MessageOutcome::Rejected(reply) if !last => {
                // The handler already aborted; later chunks are refused until RSET.
                transaction.chunking = Chunking::Failed;
                self.reply(reply).await
            }
            MessageOutcome::Complete => {
                let reply = self
                    .handler
                    .finish_message(&self.client, &transaction.envelope)
                    .await;
                self.finish_transaction(MessageOutcome::Final(reply), received)
                    .await
            }
            other => self.finish_transaction(other, received).await,
        }
    }

    /// Sends the final reply of a message and ends the transaction.
    async fn finish_transaction(&mut self, outcome: MessageOutcome, size: u64) -> Flow {
        let Phase::Transaction(transaction) = std::mem::replace(&mut self.phase, Phase::Ready)
        else {
            return Flow::Continue;
        };
        let envelope = &transaction.envelope;
        let (reply, gone) = match outcome {
            MessageOutcome::Final(reply) | MessageOutcome::Rejected(reply) => (reply, None),
            MessageOutcome::Complete | MessageOutcome::ChunkAccepted => {
                (Reply::internal_error(), None)
            }
            MessageOutcome::ClientGone(reason) => (Reply::internal_error(), Some(reason)),
        };
        let route = self.handler.content_route();
        self.handler.reset().await;
        self.transactions += 1;

        let smtp = &self.config.metrics.smtp;
        let result = match (&gone, route) {
            (Some(_), _) => TransactionResult::Aborted,
            (None, _) if reply.is_permanent() => TransactionResult::Rejected,
            (None, _) if reply.is_transient() => TransactionResult::Tempfailed,
            (None, ContentRoute::Relay) => TransactionResult::Relayed,
            (None, _) => TransactionResult::Spooled,
        };
        smtp.transaction_ended(result);
        if matches!(
            result,
            TransactionResult::Spooled | TransactionResult::Relayed
        ) {
            smtp.message_size.observe(size as f64);
        }
        self.count_received_bytes();

        let recipients: Vec<String> = envelope
            .recipients
            .iter()
            .map(|r| r.address.to_smtp())
            .collect();
        tracing::info!(
            queue_id = %envelope.queue_id(),
            client_ip = %self.client.peer.ip(),
            helo = %self.client.helo,
            sender = %envelope.sender_text(),
            recipients = %recipients.join(","),
            decision = %route.as_str(),
            reply = %if gone.is_some() { "none (client gone)".to_string() } else { reply.summary() },
            size,
            duration_ms = transaction.started.elapsed().as_millis() as u64,
            "transaction finished"
        );
        if let Some(reason) = gone {
            tracing::debug!(queue_id = %envelope.queue_id(), reason = %reason, "client left during message data");
            return Flow::Close;
        }
        self.reply(reply).await
    }

    /// Abandons any open transaction (RSET, EHLO, QUIT, STARTTLS).
    async fn end_transaction(&mut self) {
        let previous = std::mem::replace(&mut self.phase, Phase::Ready);
        match previous {
            Phase::Transaction(transaction) => {
                if matches!(transaction.chunking, Chunking::Receiving(_)) {
                    self.handler.abort_message().await;
                }
                self.handler.reset().await;
                self.config
                    .metrics
                    .smtp
                    .transaction_ended(TransactionResult::Abandoned);
                let envelope = &transaction.envelope;
                tracing::info!(
                    queue_id = %envelope.queue_id(),
                    client_ip = %self.client.peer.ip(),
                    helo = %self.client.helo,
                    sender = %envelope.sender_text(),
                    recipients = %envelope
                        .recipients
                        .iter()
                        .map(|r| r.address.to_smtp())
                        .collect::<Vec<_>>()
                        .join(","),
                    decision = %ContentRoute::None.as_str(),
                    duration_ms = transaction.started.elapsed().as_millis() as u64,
                    "transaction abandoned without a message"
                );
            }
            Phase::Connected => self.phase = Phase::Connected,
            Phase::Ready => {}
        }
    }

    /// On an implicit-TLS listener, runs the TLS handshake before the
    /// greeting (RFC 8314); elsewhere does nothing. Returns why the
    /// session ends when the handshake fails.
    async fn start_implicit_tls(&mut self) -> Result<(), String> {
        if !self.config.implicit_tls {
            return Ok(());
        }
        let (Some(acceptor), Some(plain)) =
            (self.config.tls.clone(), self.connection.take_plain_stream())
        else {
            tracing::error!(client_ip = %self.client.peer.ip(), "implicit TLS listener without a TLS configuration");
            return Err("no TLS configuration".to_string());
        };
        let handshake =
            tokio::time::timeout(self.config.timeouts.tls_handshake, acceptor.accept(plain)).await;
        let tls = &self.config.metrics.smtp;
        match handshake {
            Ok(Ok(stream)) => {
                tls.tls_handshake(TlsMode::Implicit, TlsResult::Success);
                self.connection.set_stream(Stream::Tls(Box::new(stream)));
                self.client.tls = true;
                Ok(())
            }
            Ok(Err(error)) => {
                tls.tls_handshake(TlsMode::Implicit, TlsResult::Failure);
                Err(format!("TLS handshake failed: {error}"))
            }
            Err(_) => {
                tls.tls_handshake(TlsMode::Implicit, TlsResult::Timeout);
                Err("TLS handshake timed out".to_string())
            }
        }
    }

    async fn handle_starttls(&mut self) -> Flow {
        let Some(acceptor) = self.config.tls.clone() else {
            return self.reply(Reply::not_implemented("STARTTLS")).await;
        };
        if self.client.tls {
            return self.reply(Reply::tls_already_active()).await;
        }
        if !self.client.extended {
            return self.reply(Reply::bad_sequence("send EHLO first")).await;
        }
        self.queue_reply(&Reply::ready_to_start_tls());
        if self.connection.flush().await.is_err() {
            return Flow::Close;
        }

        // RFC 3207 §4.2: commands pipelined after STARTTLS came before the
        // TLS handshake and must not be acted on.
        let discarded = self.connection.discard_buffered_input();
        if discarded > 0 {
            tracing::info!(client_ip = %self.client.peer.ip(), bytes = discarded, "discarded input pipelined after STARTTLS");
        }
        let Some(plain) = self.connection.take_plain_stream() else {
            return Flow::Close;
        };
        let handshake =
            tokio::time::timeout(self.config.timeouts.tls_handshake, acceptor.accept(plain)).await;
        let metrics = Arc::clone(&self.config.metrics);
        let count = |result| metrics.smtp.tls_handshake(TlsMode::Starttls, result);
        match handshake {
            Ok(Ok(tls)) => {
                count(TlsResult::Success);
                self.connection.set_stream(Stream::Tls(Box::new(tls)));
                self.client.tls = true;
                // RFC 3207 §4.2: the session starts over, EHLO and AUTH
                // included.
                self.end_transaction().await;
                self.phase = Phase::Connected;
                self.client.helo.clear();
                self.client.extended = false;
                self.client.authenticated = None;
                Flow::Continue
            }
            Ok(Err(error)) => {
                count(TlsResult::Failure);
                tracing::info!(client_ip = %self.client.peer.ip(), error = %error, "TLS handshake failed");
                Flow::Close
            }
            Err(_) => {
                count(TlsResult::Timeout);
                tracing::info!(client_ip = %self.client.peer.ip(), "TLS handshake timed out");
                Flow::Close
            }
        }
    }
}

/// Maps a command parse error to its reply.
fn parse_error_reply(error: &ParseError) -> Reply {
    match error {
        ParseError::UnknownCommand => Reply::unrecognized_command(),
        ParseError::InvalidSenderAddress => Reply::invalid_sender("not a valid address"),
        ParseError::InvalidRecipientAddress => Reply::invalid_recipient("not a valid address"),
        ParseError::SyntaxError { syntax } => Reply::syntax_error(syntax),
        ParseError::InvalidParameter { param } => Reply::invalid_parameter(param),
        ParseError::UnsupportedParameter { param } => Reply::unsupported_parameter(param),
        _ => Reply::unrecognized_command(),
    }
}

/// Names a MAIL parameter that smtp-proto parsed but wsmtp does not offer.
/// An AUTH= parameter is read and discarded on a listener that offers AUTH,
/// because RFC 4954 §5 allows a server to treat every client as not trusted
/// to name the original submitter.
fn unsupported_mail_parameter(
    from: &smtp_proto::MailFrom<std::borrow::Cow<'_, str>>,
    auth_offered: bool,
) -> Option<&'static str> {
    use smtp_proto::*;
    let offered = MAIL_BODY_7BIT
        | MAIL_BODY_8BITMIME
        | MAIL_BODY_BINARYMIME
        | MAIL_RET_FULL
        | MAIL_RET_HDRS
        | MAIL_SMTPUTF8;
    if from.flags & !offered != 0 {
        return Some("(extension not offered)");
    }
    if from.auth.is_some() && !auth_offered {
        return Some("AUTH");
    }
    if from.trans_id.is_some() || from.by != 0 || from.solicit.is_some() || from.mtrk.is_some() {
        return Some("(extension not offered)");
    }
    if from.hold_for != 0 || from.hold_until != 0 || from.mt_priority != 0 {
        return Some("(extension not offered)");
    }
    None
}

/// True when a RCPT line names `<Postmaster>` without a domain; the command
/// parser returns an empty address for it, as it does for `<>`.
fn is_bare_postmaster(line: &[u8]) -> bool {
    let text = String::from_utf8_lossy(line).to_ascii_lowercase();
    text.contains("<postmaster>")
}

/// Keeps the HELO name printable, so it is safe in Received headers and logs.
fn sanitize_helo(host: &str) -> String {
    host.chars()
        .filter(|c| c.is_ascii_graphic() && !matches!(c, '(' | ')' | '\\' | '"'))
        .take(255)
        .collect()
}
