//! The AUTH command (RFC 4954) in a session: when it is offered, the SASL
//! exchange for PLAIN and LOGIN, and the sender rule for authenticated
//! clients. Credentials are checked by [`crate::auth::Authenticator`].
//!
//! Exchange lines are bounded by `limits.max_command_line`, like commands,
//! and are never logged.

use std::sync::Arc;

use super::{Flow, Handler, Phase, Session, SessionAuth};
use crate::auth::{AuthResult, Credentials};
use crate::config::Mechanism;
use crate::metrics::AuthOutcome;
use crate::policy::address::Address;
use crate::smtp::connection::Line;
use crate::smtp::reply::Reply;
use crate::smtp::sasl;

/// The end of an AUTH exchange that stopped before the credentials were
/// complete.
enum ExchangeEnd {
    /// The reply that ends the AUTH command.
    Reply(Reply),
    /// The connection is gone or timed out; the reason for the log.
    Closed(String),
}

impl<H: Handler> Session<H> {
    /// Returns the EHLO keyword, e.g. `AUTH PLAIN LOGIN`, when AUTH may be
    /// used now. With `require_tls` that is only after the TLS handshake.
    pub(super) fn auth_extension(&self) -> Option<String> {
        let auth = self.config.auth.as_ref()?;
        if auth.require_tls && !self.client.tls {
            return None;
        }
        let names: Vec<&str> = auth.mechanisms.iter().map(|m| m.as_str()).collect();
        Some(format!("AUTH {}", names.join(" ")))
    }

    pub(super) async fn handle_auth(&mut self, mechanism: u64, initial_response: &str) -> Flow {
        let config = Arc::clone(&self.config);
        let Some(auth) = config.auth.as_ref() else {
            return self.reply(Reply::not_implemented("AUTH")).await;
        };
        let mechanism = match self.auth_allowed(auth, mechanism) {
            Ok(mechanism) => mechanism,
            Err(reply) => return self.reply(reply).await,
        };

        let credentials = match mechanism {
            Mechanism::Plain => self.read_plain(initial_response).await,
            Mechanism::Login => self.read_login(initial_response).await,
        };
        let credentials = match credentials {
            Ok(credentials) => credentials,
            Err(ExchangeEnd::Reply(reply)) => return self.reply(reply).await,
            Err(ExchangeEnd::Closed(reason)) => {
                self.end = Some(reason);
                return Flow::Close;
            }
        };

        let result = auth
            .authenticator
            .authenticate(self.client.peer.ip(), mechanism, credentials)
            .await;
        let (reply, outcome) = match result {
            AuthResult::Success(account) => {
                self.client.authenticated = Some(account);
                (Reply::auth_succeeded(), AuthOutcome::Success)
            }
            AuthResult::Failed => (Reply::auth_failed(), AuthOutcome::Failure),
            AuthResult::Blocked => (Reply::too_many_auth_failures(), AuthOutcome::Blocked),
            AuthResult::Unavailable => (
                Reply::auth_temporarily_unavailable(),
                AuthOutcome::Unavailable,
            ),
        };
        self.config.metrics.smtp.auth_attempt(mechanism, outcome);
        self.reply(reply).await
    }

    /// Checks that AUTH with this mechanism may start now: after EHLO, once
    /// per session and outside a transaction (RFC 4954), over TLS where
    /// required, with an offered mechanism, and from a client under the
    /// failure limit.
    fn auth_allowed(&self, auth: &SessionAuth, flag: u64) -> Result<Mechanism, Reply> {
        if !self.client.extended {
            return Err(Reply::bad_sequence("send EHLO first"));
        }
        if self.client.authenticated.is_some() {
            return Err(Reply::already_authenticated());
        }
        if matches!(self.phase, Phase::Transaction(_)) {
            return Err(Reply::auth_during_transaction());
        }
        if auth.require_tls && !self.client.tls {
            return Err(Reply::encryption_required());
        }
        let Some(mechanism) = offered_mechanism(flag, &auth.mechanisms) else {
            return Err(Reply::unknown_auth_mechanism());
        };
        if auth.authenticator.is_blocked(self.client.peer.ip()) {
            tracing::debug!(client_ip = %self.client.peer.ip(), "AUTH rejected: too many failures");
            return Err(Reply::too_many_auth_failures());
        }
        Ok(mechanism)
    }

    /// Reads PLAIN credentials from the initial response, or from the
    /// response to an empty challenge.
    async fn read_plain(&mut self, initial_response: &str) -> Result<Credentials, ExchangeEnd> {
        let message = if initial_response.is_empty() {
            self.read_response("").await?
        } else {
            sasl::decode_response(initial_response.as_bytes()).map_err(ExchangeEnd::Reply)?
        };
        sasl::parse_plain(&message).map_err(ExchangeEnd::Reply)
    }

    /// Reads LOGIN credentials: the user name (from the initial response when
    /// the client sent one), then the password.
    async fn read_login(&mut self, initial_response: &str) -> Result<Credentials, ExchangeEnd> {
        let name = if initial_response.is_empty() {
            self.read_response(sasl::USERNAME_CHALLENGE).await?
        } else {
            sasl::decode_response(initial_response.as_bytes()).map_err(ExchangeEnd::Reply)?
        };
        let login = sasl::parse_login_name(&name).map_err(ExchangeEnd::Reply)?;
        let password = self.read_response(sasl::PASSWORD_CHALLENGE).await?;
        if password.is_empty() {
            return Err(ExchangeEnd::Reply(Reply::auth_malformed_response(
                "empty password",
            )));
        }
        Ok(Credentials {
            authorization: None,
            login,
            password,
        })
    }

    /// Sends a 334 challenge and reads the client's decoded response.
    async fn read_response(&mut self, challenge: &str) -> Result<Vec<u8>, ExchangeEnd> {
        self.queue_reply(&Reply::auth_challenge(challenge));
        let max = self.config.limits.max_command_line;
        loop {
            match self.connection.take_line(max) {
                Some(Line::Command(line)) => {
                    return sasl::decode_response(&line).map_err(ExchangeEnd::Reply);
                }
                Some(Line::TooLong) => {
                    return Err(ExchangeEnd::Reply(Reply::auth_line_too_long(max)));
                }
                Some(Line::Malformed) => {
                    return Err(ExchangeEnd::Reply(Reply::bad_command_line_ending()));
                }
                None => {
                    if let Err(reason) = self.wait_for_input().await {
                        return Err(ExchangeEnd::Closed(reason));
                    }
                }
            }
        }
    }

    /// With `auth.sender_must_match`, rejects a MAIL FROM of an authenticated
    /// client that is not an address of its account. Returns None when the
    /// sender may be used.
    pub(super) fn check_authenticated_sender(&self, sender: Option<&Address>) -> Option<Reply> {
        let account = self.client.authenticated.as_deref()?;
        let auth = self.config.auth.as_ref()?;
        if auth.authenticator.sender_allowed(account, sender) {
            return None;
        }
        tracing::info!(
            client_ip = %self.client.peer.ip(),
            account,
            sender = %sender.map(Address::to_smtp).unwrap_or_default(),
            "sender rejected: not an address of the authenticated account"
        );
        Some(Reply::sender_not_owned())
    }
}

/// Maps smtp-proto's mechanism flag to an offered mechanism.
fn offered_mechanism(flag: u64, offered: &[Mechanism]) -> Option<Mechanism> {
    let mechanism = match flag {
        smtp_proto::AUTH_PLAIN => Mechanism::Plain,
        smtp_proto::AUTH_LOGIN => Mechanism::Login,
        _ => return None,
    };
    offered.contains(&mechanism).then_some(mechanism)
}
