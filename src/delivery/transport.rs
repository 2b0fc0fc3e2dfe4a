//! Outbound SMTP and LMTP sessions of the delivery tier.
//!
//! A [`Connection`] is one session with one host: greeting, EHLO (or LHLO),
//! STARTTLS according to the destination's policy, then any number of
//! transactions. [`Connection::send`] sends one message to several
//! recipients: MAIL, RCPT and DATA go out in one write when the server
//! offers PIPELINING (RFC 2920), parameters (SIZE, BODY, SMTPUTF8, and the
//! DSN ones RET, ENVID, NOTIFY, ORCPT) only when the server announced them,
//! and the body streams from its [`BodySource`] with transparency dots
//! added, never held whole. The result has one [`Outcome`] per recipient,
//! in order: LMTP servers answer each recipient after the data (RFC 2033
//! §4.2), SMTP servers once for all.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::TlsMode;
use crate::smtp::client::{Capabilities, Client, ClientError, ServerReply};
use crate::smtp::data::DotStuffer;
use crate::smtp::envelope::xtext_encode;

use super::tls::{TlsClients, server_name};

/// Content is written to the server in pieces of about this size.
const WRITE_BUFFER: usize = 64 * 1024;

/// Wait for the reply to QUIT before the socket is closed anyway.
const QUIT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Smtp,
    Lmtp,
}

/// Destination of a connection.
#[derive(Clone, Debug)]
pub enum Target {
    /// A resolved address; `name` is the host name for TLS and logs.
    Address { address: SocketAddr, name: String },
    /// `host:port`, resolved by the system when connecting.
    HostPort(String),
    /// A Unix socket (LMTP).
    Unix(PathBuf),
}

impl Target {
    /// Name of the peer for logs and the Remote-MTA field of notifications.
    pub fn name(&self) -> String {
        match self {
            Target::Address { address, name } => format!("{name}[{}]", address.ip()),
            Target::HostPort(host) => host.clone(),
            Target::Unix(path) => path.display().to_string(),
        }
    }

    /// Host name to present in the TLS handshake.
    fn tls_name(&self) -> Option<String> {
        match self {
            Target::Address { name, .. } => Some(name.clone()),
            Target::HostPort(host) => {
                let host = match host.rsplit_once(':') {
                    Some((host, _)) => host,
                    None => host,
                };
                Some(
                    host.trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_string(),
                )
            }
            Target::Unix(_) => None,
        }
    }
}

/// Settings of one connection attempt.
#[derive(Clone)]
pub struct ConnectSettings {
    pub protocol: Protocol,
    /// Name sent in EHLO or LHLO.
    pub helo_name: String,
    pub tls: TlsMode,
    pub tls_clients: TlsClients,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    pub final_reply_timeout: Duration,
}

/// Failure to set up a connection. All of these are temporary for the
/// messages: another host, or a later attempt, may succeed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{host} greeted with {reply}")]
    Greeting { host: String, reply: String },
    #[error("{host} rejected {command}: {reply}")]
    Refused {
        host: String,
        command: &'static str,
        reply: String,
    },
    #[error("{host} does not offer STARTTLS, which the TLS policy {policy} requires")]
    TlsRequired { host: String, policy: &'static str },
    /// The handshake failed; with the `may` policy a new connection without
    /// TLS is worth a try.
    #[error("TLS with {host} failed: {detail}")]
    TlsFailed { host: String, detail: String },
}

impl ConnectError {
    /// Enhanced status code for notifications about this failure.
    pub fn status(&self) -> &'static str {
        match self {
            ConnectError::TlsRequired { .. } | ConnectError::TlsFailed { .. } => "4.7.5",
            _ => "4.4.1",
        }
    }
}

/// The envelope of one transaction.
#[derive(Clone, Debug)]
pub struct OutboundEnvelope {
    /// Reverse-path; "" for `<>`.
    pub sender: String,
    /// Size of the stored body plus the header prefix, for SIZE=.
    pub size: u64,
    /// BODY= value as received (7BIT or 8BITMIME).
    pub body_type: Option<String>,
    pub smtputf8: bool,
    /// RET= value (FULL or HDRS).
    pub dsn_ret: Option<String>,
    /// ENVID, decoded.
    pub dsn_envid: Option<String>,
}

#[derive(Clone, Debug)]
pub struct OutboundRecipient {
    pub address: String,
    /// ORCPT address (type rfc822), decoded.
    pub orcpt: Option<String>,
    /// NOTIFY= value as given, e.g. `SUCCESS,FAILURE`.
    pub notify: Option<String>,
}

/// Outcome for one recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The server took responsibility (2xx after the data).
    Delivered { reply: String },
    /// 5xx: the recipient fails now.
    Permanent { reply: String },
    /// 4xx, or the session broke: retry later.
    Temporary { reply: String },
}

impl Outcome {
    fn from_reply(reply: &ServerReply) -> Outcome {
        let text = reply_text(reply);
        match reply.class() {
            2 => Outcome::Delivered { reply: text },
            5 => Outcome::Permanent { reply: text },
            _ => Outcome::Temporary { reply: text },
        }
    }

    pub fn reply(&self) -> &str {
        match self {
            Outcome::Delivered { reply }
            | Outcome::Permanent { reply }
            | Outcome::Temporary { reply } => reply,
        }
    }
}

/// A reply as one line: code and text, continuation lines joined by spaces.
fn reply_text(reply: &ServerReply) -> String {
    let mut text = reply.code.to_string();
    for line in &reply.lines {
        text.push(' ');
        text.push_str(line.trim());
    }
    text
}

/// The body of a message, delivered in pieces.
pub trait BodySource {
    type Error: std::fmt::Display;

    /// The next piece, or None at the end.
    fn next_chunk(
        &mut self,
    ) -> impl std::future::Future<Output = Result<Option<bytes::Bytes>, Self::Error>> + Send;
}

/// Result of one transaction.
#[derive(Debug)]
pub struct TransactionResult {
    /// One per recipient, in the order given.
    pub outcomes: Vec<Outcome>,
    /// False when the session broke or is in an unknown state; the caller
    /// must open a new connection for the next transaction.
    pub reusable: bool,
}

pub struct Connection {
    client: Client,
    protocol: Protocol,
    capabilities: Capabilities,
    peer: String,
    command_timeout: Duration,
    final_reply_timeout: Duration,
    transactions: usize,
}

impl Connection {
    /// Connects, reads the greeting, sends EHLO (HELO as a fallback for
    /// SMTP), and starts TLS as `settings.tls` asks.
    pub async fn open(
        target: &Target,
        settings: &ConnectSettings,
    ) -> Result<Connection, ConnectError> {
        let mut client = match target {
            Target::Address { address, name } => {
                Client::connect_addr(*address, name, settings.connect_timeout).await?
            }
            Target::HostPort(host) => Client::connect(host, settings.connect_timeout).await?,
            Target::Unix(path) => Client::connect_unix(path, settings.connect_timeout).await?,
        };
        let peer = target.name();
        let greeting = client.read_reply(settings.command_timeout).await?;
        if greeting.class() != 2 {
            let reply = reply_text(&greeting);
            let _ = client.command("QUIT", QUIT_TIMEOUT).await;
            return Err(ConnectError::Greeting { host: peer, reply });
        }
        let mut capabilities = hello(&mut client, &peer, settings).await?;

        let wants_tls = settings.tls != TlsMode::None && target.tls_name().is_some();
        if wants_tls && capabilities.starttls {
            start_tls(&mut client, &peer, target, settings).await?;
            capabilities = hello(&mut client, &peer, settings).await?;
        } else if matches!(settings.tls, TlsMode::Encrypt | TlsMode::Verify) {
            let _ = client.command("QUIT", QUIT_TIMEOUT).await;
            return Err(ConnectError::TlsRequired {
                host: peer,
                policy: settings.tls.as_str(),
            });
        }

        Ok(Connection {
            client,
            protocol: settings.protocol,
            capabilities,
            peer,
            command_timeout: settings.command_timeout,
            final_reply_timeout: settings.final_reply_timeout,
            transactions: 0,
        })
    }

    /// Name of the peer, e.g. `mx1.example.org[192.0.2.1]`.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    pub fn is_tls(&self) -> bool {
        self.client.is_tls()
    }

    pub fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    /// Transactions sent over this connection so far.
    pub fn transactions(&self) -> usize {
        self.transactions
    }

    /// Sends one message to `recipients`: `prefix` (header fields of ours)
    /// followed by the body from `body`.
    pub async fn send<B: BodySource>(
        &mut self,
        envelope: &OutboundEnvelope,
        recipients: &[OutboundRecipient],
        prefix: &[u8],
        body: &mut B,
    ) -> TransactionResult {
        self.transactions += 1;
        if let Some(reply) = self.refusal_before_mail(envelope, recipients) {
            return TransactionResult {
                outcomes: vec![Outcome::Permanent { reply }; recipients.len()],
                reusable: true,
            };
        }
        match self.transaction(envelope, recipients, prefix, body).await {
            Ok(result) => result,
            Err(failure) => {
                let reply = format!("451 4.4.2 session with {} failed: {}", self.peer, failure);
                let outcomes = failure
                    .answered
                    .into_iter()
                    .chain(std::iter::repeat(None))
                    .take(recipients.len())
                    .map(|known| {
                        known.unwrap_or_else(|| Outcome::Temporary {
                            reply: reply.clone(),
                        })
                    })
                    .collect();
                TransactionResult {
                    outcomes,
                    reusable: false,
                }
            }
        }
    }

    /// A reply of ours when the message cannot go to this server as it is.
    fn refusal_before_mail(
        &self,
        envelope: &OutboundEnvelope,
        recipients: &[OutboundRecipient],
    ) -> Option<String> {
        if let Some(max) = self.capabilities.max_size
            && envelope.size > max
        {
            return Some(format!(
                "552 5.3.4 message of {} octets exceeds the limit of {} octets at {}",
                envelope.size, max, self.peer
            ));
        }
        let needs_utf8 =
            !envelope.sender.is_ascii() || recipients.iter().any(|r| !r.address.is_ascii());
        if needs_utf8 && !self.capabilities.smtputf8 {
            // RFC 6531 §3.4: a non-ASCII address cannot be sent to a server
            // without SMTPUTF8.
            return Some(format!(
                "553 5.6.7 {} does not support SMTPUTF8, which the addresses need",
                self.peer
            ));
        }
        None
    }

    fn mail_command(&self, envelope: &OutboundEnvelope) -> String {
        let capabilities = &self.capabilities;
        let mut command = format!("MAIL FROM:<{}>", envelope.sender);
        if capabilities.size {
            command.push_str(&format!(" SIZE={}", envelope.size));
        }
        if let (true, Some(body)) = (capabilities.eight_bit_mime, &envelope.body_type) {
            command.push_str(&format!(" BODY={}", body.to_ascii_uppercase()));
        }
        if envelope.smtputf8 && capabilities.smtputf8 {
            command.push_str(" SMTPUTF8");
        }
        if capabilities.dsn {
            if let Some(ret) = &envelope.dsn_ret {
                command.push_str(&format!(" RET={}", ret.to_ascii_uppercase()));
            }
            if let Some(envid) = &envelope.dsn_envid {
                command.push_str(&format!(" ENVID={}", xtext_encode(envid)));
            }
        }
        command
    }

    fn rcpt_command(&self, recipient: &OutboundRecipient) -> String {
        let mut command = format!("RCPT TO:<{}>", recipient.address);
        if self.capabilities.dsn {
            if let Some(notify) = &recipient.notify {
                command.push_str(&format!(" NOTIFY={notify}"));
            }
            if let Some(orcpt) = &recipient.orcpt {
                command.push_str(&format!(" ORCPT=rfc822;{}", xtext_encode(orcpt)));
            }
        }
        command
    }

    async fn transaction<B: BodySource>(
        &mut self,
        envelope: &OutboundEnvelope,
        recipients: &[OutboundRecipient],
        prefix: &[u8],
        body: &mut B,
    ) -> Result<TransactionResult, SessionFailure> {
        let mut answered: Vec<Option<Outcome>> = vec![None; recipients.len()];
        let mail = self.mail_command(envelope);
        let pipelining = self.capabilities.pipelining;

        // Envelope: MAIL, every RCPT and DATA in one write when pipelining.
        let data_reply;
        let mut accepted = Vec::new();
        if pipelining {
            let mut commands = String::with_capacity(64 * (recipients.len() + 2));
            commands.push_str(&mail);
            commands.push_str("\r\n");
            for recipient in recipients {
                commands.push_str(&self.rcpt_command(recipient));
                commands.push_str("\r\n");
            }
            commands.push_str("DATA\r\n");
            self.write(commands.as_bytes(), &answered).await?;
            let mail_reply = self.read(self.command_timeout, &answered).await?;
            for (index, _) in recipients.iter().enumerate() {
                let reply = self.read(self.command_timeout, &answered).await?;
                if mail_reply.class() == 2 && reply.class() == 2 {
                    accepted.push(index);
                } else if mail_reply.class() == 2 {
                    answered[index] = Some(Outcome::from_reply(&reply));
                }
            }
            let reply = self.read(self.command_timeout, &answered).await?;
            if mail_reply.class() != 2 {
                return self
                    .abandon(&mail_reply, recipients.len(), reply.code == 354)
                    .await;
            }
            data_reply = reply;
        } else {
            let mail_reply = self.command(&mail, &answered).await?;
            if mail_reply.class() != 2 {
                return self.abandon(&mail_reply, recipients.len(), false).await;
            }
            for (index, recipient) in recipients.iter().enumerate() {
                let reply = self
                    .command(&self.rcpt_command(recipient), &answered)
                    .await?;
                if reply.class() == 2 {
                    accepted.push(index);
                } else {
                    answered[index] = Some(Outcome::from_reply(&reply));
                }
            }
            if accepted.is_empty() {
                self.reset(&answered).await?;
                return Ok(TransactionResult {
                    outcomes: complete(answered),
                    reusable: true,
                });
            }
            data_reply = self.command("DATA", &answered).await?;
        }

        if data_reply.code != 354 {
            for index in &accepted {
                answered[*index] = Some(Outcome::from_reply(&data_reply));
            }
            if !accepted.is_empty() || pipelining {
                self.reset(&answered).await?;
            }
            return Ok(TransactionResult {
                outcomes: complete(answered),
                reusable: true,
            });
        }
        if accepted.is_empty() {
            // A pipelining server may start DATA although it accepted no
            // recipient; an empty message ends it and the server rejects it.
            self.write(b".\r\n", &answered).await?;
            let _ = self.read(self.final_reply_timeout, &answered).await?;
            return Ok(TransactionResult {
                outcomes: complete(answered),
                reusable: true,
            });
        }

        self.stream_content(prefix, body, &answered).await?;

        match self.protocol {
            Protocol::Smtp => {
                let reply = self.read(self.final_reply_timeout, &answered).await?;
                for index in &accepted {
                    answered[*index] = Some(Outcome::from_reply(&reply));
                }
            }
            Protocol::Lmtp => {
                for index in &accepted {
                    let reply = self.read(self.final_reply_timeout, &answered).await?;
                    answered[*index] = Some(Outcome::from_reply(&reply));
                }
            }
        }
        Ok(TransactionResult {
            outcomes: complete(answered),
            reusable: true,
        })
    }

    /// MAIL was refused: every recipient gets its reply, and the session is
    /// reset for the next message.
    async fn abandon(
        &mut self,
        mail_reply: &ServerReply,
        recipients: usize,
        data_started: bool,
    ) -> Result<TransactionResult, SessionFailure> {
        let outcome = Outcome::from_reply(mail_reply);
        let answered = vec![Some(outcome.clone()); recipients];
        if data_started {
            self.write(b".\r\n", &answered).await?;
            let _ = self.read(self.final_reply_timeout, &answered).await?;
        }
        self.reset(&answered).await?;
        Ok(TransactionResult {
            outcomes: vec![outcome; recipients],
            reusable: true,
        })
    }

    async fn stream_content<B: BodySource>(
        &mut self,
        prefix: &[u8],
        body: &mut B,
        answered: &[Option<Outcome>],
    ) -> Result<(), SessionFailure> {
        let mut stuffer = DotStuffer::default();
        let mut buffer = Vec::with_capacity(WRITE_BUFFER + 1024);
        stuffer.stuff(prefix, &mut buffer);
        loop {
            let chunk = match body.next_chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                // The connection is dropped without the final dot, so the
                // server discards the partial message.
                Err(error) => {
                    return Err(SessionFailure {
                        detail: format!("reading the stored message failed: {error}"),
                        answered: answered.to_vec(),
                    });
                }
            };
            stuffer.stuff(&chunk, &mut buffer);
            if buffer.len() >= WRITE_BUFFER {
                self.write(&buffer, answered).await?;
                buffer.clear();
            }
        }
        buffer.extend_from_slice(stuffer.terminator());
        self.write(&buffer, answered).await
    }

    async fn reset(&mut self, answered: &[Option<Outcome>]) -> Result<(), SessionFailure> {
        let reply = self.command("RSET", answered).await?;
        if reply.class() == 2 {
            Ok(())
        } else {
            Err(SessionFailure {
                detail: format!("RSET refused: {}", reply_text(&reply)),
                answered: answered.to_vec(),
            })
        }
    }

    async fn command(
        &mut self,
        command: &str,
        answered: &[Option<Outcome>],
    ) -> Result<ServerReply, SessionFailure> {
        let mut line = Vec::with_capacity(command.len() + 2);
        line.extend_from_slice(command.as_bytes());
        line.extend_from_slice(b"\r\n");
        self.write(&line, answered).await?;
        self.read(self.command_timeout, answered).await
    }

    async fn write(
        &mut self,
        data: &[u8],
        answered: &[Option<Outcome>],
    ) -> Result<(), SessionFailure> {
        self.client
            .write_all(data)
            .await
            .map_err(|error| SessionFailure::new(error, answered))
    }

    async fn read(
        &mut self,
        timeout: Duration,
        answered: &[Option<Outcome>],
    ) -> Result<ServerReply, SessionFailure> {
        let reply = self
            .client
            .read_reply(timeout)
            .await
            .map_err(|error| SessionFailure::new(error, answered))?;
        // 421 closes the session (RFC 5321 §3.8).
        if reply.code == 421 {
            return Err(SessionFailure {
                detail: reply_text(&reply),
                answered: answered.to_vec(),
            });
        }
        Ok(reply)
    }

    /// Ends the session politely.
    pub async fn quit(mut self) {
        let _ = self.client.command("QUIT", QUIT_TIMEOUT).await;
    }
}

/// The session broke in the middle of a transaction. Recipients that had
/// already been answered keep their outcome; the others are retried.
#[derive(Debug)]
struct SessionFailure {
    detail: String,
    answered: Vec<Option<Outcome>>,
}

impl SessionFailure {
    fn new(error: ClientError, answered: &[Option<Outcome>]) -> SessionFailure {
        SessionFailure {
            detail: error.to_string(),
            answered: answered.to_vec(),
        }
    }
}

impl std::fmt::Display for SessionFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

/// The outcomes of a finished transaction. A recipient without one was
/// accepted but never answered, which a correct server cannot cause; it is
/// retried.
fn complete(answered: Vec<Option<Outcome>>) -> Vec<Outcome> {
    answered
        .into_iter()
        .map(|outcome| {
            outcome.unwrap_or_else(|| Outcome::Temporary {
                reply: "451 4.3.0 no reply recorded for this recipient".to_string(),
            })
        })
        .collect()
}

async fn hello(
    client: &mut Client,
    peer: &str,
    settings: &ConnectSettings,
) -> Result<Capabilities, ConnectError> {
    let (command, fallback) = match settings.protocol {
        Protocol::Smtp => ("EHLO", Some("HELO")),
        Protocol::Lmtp => ("LHLO", None),
    };
    let reply = client
        .command(
            &format!("{command} {}", settings.helo_name),
            settings.command_timeout,
        )
        .await?;
    if reply.class() == 2 {
        return Ok(Capabilities::from_ehlo(&reply));
    }
    let Some(fallback) = fallback else {
        return Err(ConnectError::Refused {
            host: peer.to_string(),
            command,
            reply: reply_text(&reply),
        });
    };
    let reply = client
        .command(
            &format!("{fallback} {}", settings.helo_name),
            settings.command_timeout,
        )
        .await?;
    if reply.class() == 2 {
        Ok(Capabilities::default())
    } else {
        Err(ConnectError::Refused {
            host: peer.to_string(),
            command: fallback,
            reply: reply_text(&reply),
        })
    }
}

async fn start_tls(
    client: &mut Client,
    peer: &str,
    target: &Target,
    settings: &ConnectSettings,
) -> Result<(), ConnectError> {
    let failed = |detail: String| ConnectError::TlsFailed {
        host: peer.to_string(),
        detail,
    };
    let reply = client.command("STARTTLS", settings.command_timeout).await?;
    if reply.code != 220 {
        return Err(failed(format!("STARTTLS refused: {}", reply_text(&reply))));
    }
    let name = target
        .tls_name()
        .and_then(|name| server_name(&name))
        .ok_or_else(|| failed("no host name to present".to_string()))?;
    let config = match settings.tls {
        TlsMode::Verify => settings.tls_clients.verified.clone(),
        _ => settings.tls_clients.unverified.clone(),
    };
    client
        .start_tls(config, name, settings.command_timeout)
        .await
        .map_err(|error| failed(error.to_string()))
}
