//! Real-time relay of a transaction to a downstream group.
//!
//! A [`Relay`] is one SMTP session with the first host of a group that
//! answers. MAIL and RCPT are forwarded with the parameters the downstream
//! announced (SIZE, BODY, SMTPUTF8, and the DSN ones RET, ENVID, NOTIFY,
//! ORCPT), and each reply is checked with [`Reply::from_downstream`] before it
//! goes back to the client. Message content streams through with
//! transparency dots added back ([`DotStuffer`]); it is never held whole.
//! Dropping a `Relay` in the middle of DATA closes the socket without the
//! final dot, so the downstream discards the partial message.

use std::time::Duration;

use crate::config::GroupConfig;
use crate::smtp::client::{Capabilities, Client, ClientError, ServerReply};
use crate::smtp::data::DotStuffer;
use crate::smtp::envelope::{Envelope, Recipient, xtext_encode};
use crate::smtp::reply::Reply;

/// Content is written to the downstream in pieces of about this size.
const WRITE_BUFFER: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("no host of group {group} answered: {}", .failures.join("; "))]
    Unreachable {
        group: String,
        failures: Vec<String>,
    },
    #[error(transparent)]
    Client(#[from] ClientError),
}

pub struct Relay {
    group: String,
    client: Client,
    capabilities: Capabilities,
    command_timeout: Duration,
    final_reply_timeout: Duration,
    stuffer: DotStuffer,
    buffer: Vec<u8>,
}

impl Relay {
    /// Connects to the first host of the group that greets with 2xx and
    /// accepts EHLO (or HELO, for servers without ESMTP).
    pub async fn open(group: &GroupConfig, ehlo_name: &str) -> Result<Relay, RelayError> {
        let mut failures = Vec::new();
        for host in &group.hosts {
            match Relay::open_host(group, host, ehlo_name).await {
                Ok(relay) => return Ok(relay),
                Err(error) => {
                    crate::log_limited!(format!("{host}: {error}"), suppressed => tracing::warn!(
                        group = %group.name,
                        host = %host,
                        error = %error,
                        suppressed,
                        "downstream host failed"
                    ));
                    failures.push(error);
                }
            }
        }
        Err(RelayError::Unreachable {
            group: group.name.clone(),
            failures,
        })
    }

    async fn open_host(group: &GroupConfig, host: &str, ehlo_name: &str) -> Result<Relay, String> {
        let mut client = Client::connect(host, group.connect_timeout)
            .await
            .map_err(|e| e.to_string())?;
        let greeting = client
            .read_reply(group.command_timeout)
            .await
            .map_err(|e| e.to_string())?;
        if greeting.class() != 2 {
            return Err(format!("{host} greeted with {}", greeting.summary()));
        }
        let ehlo = client
            .command(&format!("EHLO {ehlo_name}"), group.command_timeout)
            .await
            .map_err(|e| e.to_string())?;
        let capabilities = if ehlo.class() == 2 {
            Capabilities::from_ehlo(&ehlo)
        } else {
            let helo = client
                .command(&format!("HELO {ehlo_name}"), group.command_timeout)
                .await
                .map_err(|e| e.to_string())?;
            if helo.class() != 2 {
                return Err(format!("{host} refused EHLO and HELO: {}", helo.summary()));
            }
            Capabilities::default()
        };
        Ok(Relay {
            group: group.name.clone(),
            client,
            capabilities,
            command_timeout: group.command_timeout,
            final_reply_timeout: group.final_reply_timeout,
            stuffer: DotStuffer::default(),
            buffer: Vec::with_capacity(WRITE_BUFFER + 1024),
        })
    }

    pub fn group(&self) -> &str {
        &self.group
    }

    pub fn host(&self) -> &str {
        self.client.host()
    }

    /// Forwards MAIL FROM. Returns the checked reply, or a reply of ours when
    /// the downstream cannot take the message as sent.
    pub async fn mail(&mut self, envelope: &Envelope) -> Result<Reply, RelayError> {
        let parameters = &envelope.parameters;
        if parameters.smtputf8 && !self.capabilities.smtputf8 {
            // RFC 6531 §3.2: without SMTPUTF8 at the next hop the message
            // cannot be relayed as it is.
            return Ok(Reply::smtputf8_not_negotiated());
        }
        if let (Some(size), Some(max)) = (parameters.size, self.capabilities.max_size)
            && size > max
        {
            return Ok(Reply::message_too_large(max));
        }

        let mut command = format!("MAIL FROM:<{}>", envelope.sender_text());
        if let (true, Some(size)) = (self.capabilities.size, parameters.size) {
            command.push_str(&format!(" SIZE={size}"));
        }
        if let (true, Some(body)) = (self.capabilities.eight_bit_mime, parameters.body) {
            command.push_str(&format!(" BODY={}", body.as_str()));
        }
        if parameters.smtputf8 {
            command.push_str(" SMTPUTF8");
        }
        if self.capabilities.dsn {
            if let Some(ret) = parameters.ret {
                command.push_str(&format!(" RET={}", ret.as_str()));
            }
            if let Some(envid) = &parameters.envid {
                command.push_str(&format!(" ENVID={}", xtext_encode(envid)));
            }
        }
        let reply = self.client.command(&command, self.command_timeout).await?;
        Ok(check(&reply, &[2]))
    }

    /// Forwards one RCPT TO and returns the checked reply.
    pub async fn rcpt(&mut self, recipient: &Recipient) -> Result<Reply, RelayError> {
        let mut command = format!("RCPT TO:<{}>", recipient.address.to_smtp());
        if self.capabilities.dsn {
            if let Some(notify) = recipient.notify {
                command.push_str(&format!(" NOTIFY={}", notify.value()));
            }
            if let Some(orcpt) = &recipient.orcpt {
                command.push_str(&format!(" ORCPT=rfc822;{}", xtext_encode(orcpt)));
            }
        }
        let reply = self.client.command(&command, self.command_timeout).await?;
        Ok(check(&reply, &[2]))
    }

    /// Sends DATA. Ok(None) means the downstream is ready for content;
    /// Ok(Some(reply)) is its refusal, checked.
    pub async fn data(&mut self) -> Result<Option<Reply>, RelayError> {
        let reply = self.client.command("DATA", self.command_timeout).await?;
        if reply.code == 354 {
            self.stuffer = DotStuffer::default();
            return Ok(None);
        }
        Ok(Some(check(&reply, &[3])))
    }

    /// Writes decoded content, adding transparency dots.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), RelayError> {
        self.stuffer.stuff(data, &mut self.buffer);
        if self.buffer.len() >= WRITE_BUFFER {
            self.client.write_all(&self.buffer).await?;
            self.buffer.clear();
        }
        Ok(())
    }

    /// Ends the content and returns the downstream's final reply, checked.
    pub async fn finish(&mut self) -> Result<Reply, RelayError> {
        let terminator = self.stuffer.terminator();
        self.buffer.extend_from_slice(terminator);
        self.client.write_all(&self.buffer).await?;
        self.buffer.clear();
        let reply = self.client.read_reply(self.final_reply_timeout).await?;
        Ok(check(&reply, &[2]))
    }

    /// Ends an open transaction so the connection can be used again.
    pub async fn reset(&mut self) -> Result<(), RelayError> {
        self.buffer.clear();
        let reply = self.client.command("RSET", self.command_timeout).await?;
        if reply.class() == 2 {
            Ok(())
        } else {
            Err(RelayError::Client(ClientError::Protocol {
                host: self.client.host().to_string(),
                detail: format!("RSET refused: {}", reply.summary()),
            }))
        }
    }

    /// Says goodbye; errors do not matter any more at this point.
    pub async fn quit(mut self) {
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            self.client.command("QUIT", self.command_timeout),
        )
        .await;
    }
}

fn check(reply: &ServerReply, expected: &[u16]) -> Reply {
    Reply::from_downstream(reply.code, &reply.lines, expected)
}
