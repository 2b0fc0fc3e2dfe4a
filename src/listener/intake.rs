//! The transaction handler of the listener: joins the relay decision, the
//! pass-through relay and the queue.
//!
//! Each recipient is decided by [`policy::decide`]. The first
//! accepted recipient sets the transaction's mode:
//! - pass-through, when it goes to a downstream group: MAIL and RCPT are
//!   forwarded at once and the downstream's replies go back to the client;
//! - spool, when it is local.
//!
//! A later recipient for another route turns a pass-through transaction into
//! a spooled one (the downstream session is closed and every recipient is
//! spooled with its route), so a transaction that mixes routes is stored once.
//! Without a queue, such a recipient gets 452 4.5.3 and the client sends it in
//! another transaction.
//!
//! A relay domain with `fallback: queue` keeps accepting mail while its group
//! is down. When no host of the group accepts a connection, the session
//! breaks, or MAIL gets a 4xx, the recipient is spooled with the group as its
//! route instead of getting the 4xx, and the router hands it to the group
//! later. A 5xx from the downstream is always passed on.
//!
//! Rate limits: a recipient that the policy accepts is counted against the
//! recipient limits of its class, and the first one of each transaction
//! against the message limits too (see [`crate::ratelimit`]). Over a limit,
//! it gets `451 4.7.1` with the limit named instead. Postmaster at a local
//! domain is neither counted nor refused.
//!
//! When rules name DNS blocklist zones, the client is looked up at the first
//! RCPT of the session (so a client rejected earlier causes no query) and the
//! result is kept for the connection. The sender's domain is looked up at
//! the first RCPT of each transaction, again only when its domain changed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Notify;

use crate::config::Config;
use crate::directory::Directory;
use crate::metrics::{Component, LookupResult, Metrics, PassthroughStep, RecipientDecision};
use crate::passthrough::Relay;
use crate::policy::dnsbl::{Blocklists, DnsblResults, Listing};
use crate::policy::{self, Action, DirectoryView, Route, SessionFacts};
use crate::queue::{self, Queue, SpoolRecipient, SpoolWriter};
use crate::ratelimit::{self, RateLimits};
use crate::smtp::envelope::{Envelope, Recipient};
use crate::smtp::reply::Reply;
use crate::smtp::session::{ClientInfo, ContentRoute, Handler};

/// State shared by every session of the listener.
pub struct Shared {
    pub config: Arc<Config>,
    pub queue: Option<Queue>,
    /// The account directory; None when there is no queue database.
    pub directory: Option<Arc<Directory>>,
    /// Wakes the router of this process after a message was spooled.
    pub router_wake: Option<Arc<Notify>>,
    /// The DNS blocklists that rules name; None when no rule names one.
    pub blocklists: Option<Arc<Blocklists>>,
    pub metrics: Arc<Metrics>,
    /// The limiters of every rate limit class.
    pub rate_limits: Arc<RateLimits>,
}

/// A group's failure to take the transaction.
#[derive(Clone)]
struct GroupFailure {
    /// The reply a recipient for the group gets when it is not spooled.
    reply: Reply,
    /// True when the group is down for now (no host accepted a connection,
    /// the session broke, or MAIL got a 4xx), so the queue may take its
    /// recipients.
    unavailable: bool,
}

impl GroupFailure {
    fn unavailable(reply: Reply) -> GroupFailure {
        GroupFailure {
            reply,
            unavailable: true,
        }
    }
}

/// The mode of the open transaction.
enum Mode {
    /// No recipient accepted yet.
    Undecided,
    /// Relayed live to one group.
    Relaying(Box<Relay>),
    /// The downstream connection broke after it accepted recipients, and no
    /// queue can take them over: the transaction can only fail.
    Broken,
    Spooling,
}

/// The destination of message content while it streams.
enum Sink {
    None,
    Relay(Box<Relay>),
    Spool(Box<SpoolWriter>),
}

pub struct Intake {
    shared: Arc<Shared>,
    mode: Mode,
    sink: Sink,
    recipients: Vec<SpoolRecipient>,
    /// Group failures already seen in this transaction.
    failed_groups: HashMap<String, GroupFailure>,
    /// Whether this transaction already logged spooling for an unavailable group.
    fallback_logged: bool,
    /// A downstream session kept after a finished transaction, for the next one.
    idle_relay: Option<Relay>,
    /// Blocklist results of the client and of the last sender domain looked up.
    dnsbl: DnsblResults,
    /// Whether the client was looked up in this session.
    client_checked: bool,
    /// The sender domain whose results are in `dnsbl`.
    checked_domain: Option<String>,
    /// The destination of the current transaction's content.
    content_route: ContentRoute,
    /// Whether this transaction was counted against the message limits.
    message_counted: bool,
}

impl Intake {
    pub fn new(shared: Arc<Shared>) -> Intake {
        Intake {
            shared,
            mode: Mode::Undecided,
            sink: Sink::None,
            recipients: Vec::new(),
            failed_groups: HashMap::new(),
            fallback_logged: false,
            idle_relay: None,
            dnsbl: DnsblResults::new(),
            client_checked: false,
            checked_domain: None,
            message_counted: false,
            content_route: ContentRoute::None,
        }
    }

    /// Counts the results of one blocklist check by zone.
    fn count_lookups(&self, results: &[(String, Listing)]) {
        for (zone, listing) in results {
            let result = match listing {
                Listing::Listed { .. } => LookupResult::Listed,
                Listing::NotListed => LookupResult::NotListed,
                Listing::Failed(_) => LookupResult::Error,
            };
            self.shared.metrics.dnsbl.lookup(zone, result);
        }
    }

    /// Counts an accepted recipient against the rate limits of its class:
    /// the class its rule names, else the client's. Returns the reply for a
    /// limit that refuses it.
    fn check_rate_limits(
        &mut self,
        client: &ClientInfo,
        envelope: &Envelope,
        sender: &str,
        decision: &policy::Decision,
    ) -> Result<(), Reply> {
        let limits = &self.shared.rate_limits;
        let ip = client.peer.ip();
        let class = decision
            .rate_limit
            .as_deref()
            .and_then(|name| limits.class(name))
            .unwrap_or_else(|| limits.class_for_client(ip));
        let from = ratelimit::Sender {
            client: ip,
            user: client.authenticated.as_deref(),
            address: sender,
        };
        let mut result = Ok(());
        if !self.message_counted {
            result = class.check_message(&from);
            self.message_counted = result.is_ok();
        }
        let result = result.and_then(|()| class.check_recipient(&from));
        result.map_err(|hit| {
            let reply = hit.reply();
            self.shared.metrics.rate_limit_hit(hit.limit.as_str());
            tracing::info!(
                queue_id = %envelope.queue_id(),
                client_ip = %ip,
                account = client.authenticated.as_deref().unwrap_or(""),
                sender = %envelope.sender_text(),
                limit = hit.limit.as_str(),
                class = %hit.class,
                rate = %hit.rate,
                reply = %reply.summary(),
                "rate limit reached"
            );
            reply
        })
    }

    /// Looks up what the rules' blocklists need and is not known yet: the
    /// client once per session, the sender domain once per domain.
    async fn check_blocklists(&mut self, client: &ClientInfo, envelope: &Envelope) {
        let Some(blocklists) = self.shared.blocklists.clone() else {
            return;
        };
        if blocklists.has_ip_zones() && !self.client_checked {
            self.client_checked = true;
            let results = blocklists.check_client(client.peer.ip()).await;
            self.count_lookups(&results);
            self.dnsbl.extend(results);
        }
        let domain = envelope
            .sender
            .as_ref()
            .and_then(|sender| sender.domain().as_name());
        if blocklists.has_domain_zones()
            && let Some(domain) = domain
            && self.checked_domain.as_deref() != Some(domain)
        {
            let results = blocklists.check_domain(domain).await;
            self.count_lookups(&results);
            self.dnsbl.extend(results);
            self.checked_domain = Some(domain.to_string());
        }
    }

    fn spool_recipient(recipient: &Recipient, group: Option<&str>) -> SpoolRecipient {
        SpoolRecipient {
            address: recipient.address.to_smtp(),
            route_group: group.map(str::to_string),
            orcpt: recipient.orcpt.clone(),
            notify: recipient.notify.map(|n| n.value()),
        }
    }

    /// Switches the transaction to spooling, closing a live relay. Without a
    /// queue this is impossible, and the returned reply explains why.
    async fn switch_to_spool(&mut self) -> Result<(), Reply> {
        if self.shared.queue.is_none() {
            return Err(Reply::mixed_routes_need_new_transaction());
        }
        if let Mode::Relaying(relay) = std::mem::replace(&mut self.mode, Mode::Spooling) {
            relay.quit().await;
        }
        Ok(())
    }

    /// Opens a relay to `group`, reusing the idle session when it matches.
    async fn open_relay(
        &mut self,
        group: &str,
        envelope: &Envelope,
    ) -> Result<(Relay, Reply), GroupFailure> {
        let config = &self.shared.config;
        let Some(group_config) = config.groups.get(group) else {
            tracing::error!(group, "route names a group that is not configured");
            return Err(GroupFailure {
                reply: Reply::internal_error(),
                unavailable: false,
            });
        };
        let metrics = self.shared.metrics.passthrough.group(group);
        let connect = async || {
            let started = Instant::now();
            let opened = Relay::open(group_config, &config.hostname).await;
            match &opened {
                Ok(_) => metrics.observe(PassthroughStep::Connect, started.elapsed()),
                Err(error) => {
                    metrics.error(PassthroughStep::Connect);
                    crate::log_limited!(format!("{group}: {error}"), suppressed => tracing::warn!(
                        queue_id = %envelope.queue_id(),
                        group,
                        error = %error,
                        suppressed,
                        "downstream group unreachable"
                    ));
                }
            }
            opened.map_err(|_| GroupFailure::unavailable(Reply::downstream_unavailable()))
        };
        let idle = self.idle_relay.take();
        let mut relay = match idle {
            Some(relay) if relay.group() == group => relay,
            other => {
                if let Some(relay) = other {
                    relay.quit().await;
                }
                connect().await?
            }
        };
        let started = Instant::now();
        let mail_reply = match relay.mail(envelope).await {
            Ok(reply) => reply,
            Err(first_error) => {
                // A reused session may have been closed by the server while
                // idle; one fresh connection is worth a try.
                tracing::debug!(group, error = %first_error, "downstream session failed at MAIL, reconnecting");
                relay = connect().await?;
                let started = Instant::now();
                let reply = relay.mail(envelope).await.map_err(|error| {
                    metrics.error(PassthroughStep::Mail);
                    tracing::warn!(queue_id = %envelope.queue_id(), group, error = %error, "downstream failed at MAIL");
                    GroupFailure::unavailable(Reply::downstream_failed())
                })?;
                metrics.observe(PassthroughStep::Mail, started.elapsed());
                return Ok((relay, reply));
            }
        };
        metrics.observe(PassthroughStep::Mail, started.elapsed());
        Ok((relay, mail_reply))
    }

    /// Routes a recipient to a downstream group.
    async fn relay_recipient(
        &mut self,
        group: &str,
        envelope: &Envelope,
        recipient: &Recipient,
    ) -> Reply {
        match &mut self.mode {
            Mode::Spooling => {
                self.recipients
                    .push(Intake::spool_recipient(recipient, Some(group)));
                return Reply::recipient_ok();
            }
            Mode::Broken => return Reply::downstream_failed(),
            Mode::Relaying(relay) if relay.group() != group => {
                if let Err(reply) = self.switch_to_spool().await {
                    return reply;
                }
                self.recipients
                    .push(Intake::spool_recipient(recipient, Some(group)));
                return Reply::recipient_ok();
            }
            Mode::Relaying(_) | Mode::Undecided => {}
        }

        if let Mode::Undecided = self.mode {
            if let Some(failure) = self.failed_groups.get(group) {
                let failure = failure.clone();
                return self.spool_or_fail(group, envelope, recipient, failure);
            }
            let failure = match self.open_relay(group, envelope).await {
                Ok((relay, mail_reply)) if mail_reply.is_positive() => {
                    self.mode = Mode::Relaying(Box::new(relay));
                    None
                }
                Ok((relay, mail_reply)) => {
                    relay.quit().await;
                    Some(GroupFailure {
                        unavailable: mail_reply.is_transient(),
                        reply: mail_reply,
                    })
                }
                Err(failure) => Some(failure),
            };
            if let Some(failure) = failure {
                self.failed_groups
                    .insert(group.to_string(), failure.clone());
                return self.spool_or_fail(group, envelope, recipient, failure);
            }
        }

        let Mode::Relaying(relay) = &mut self.mode else {
            return Reply::internal_error();
        };
        let metrics = self.shared.metrics.passthrough.group(group);
        let started = Instant::now();
        let rcpt = relay.rcpt(recipient).await;
        match &rcpt {
            Ok(_) => metrics.observe(PassthroughStep::Rcpt, started.elapsed()),
            Err(_) => metrics.error(PassthroughStep::Rcpt),
        }
        match rcpt {
            Ok(reply) => {
                if reply.is_positive() {
                    self.recipients
                        .push(Intake::spool_recipient(recipient, Some(group)));
                }
                reply
            }
            Err(error) => {
                tracing::warn!(queue_id = %envelope.queue_id(), group, error = %error, "downstream failed at RCPT");
                self.relay_broke().await;
                let failure = GroupFailure::unavailable(Reply::downstream_failed());
                self.spool_or_fail(group, envelope, recipient, failure)
            }
        }
    }

    /// Handles a recipient whose group could not take the transaction: it is
    /// spooled for later delivery to the group when the group is only
    /// unavailable and the recipient's domain has `fallback: queue`.
    /// Otherwise the recipient gets the failure's reply.
    fn spool_or_fail(
        &mut self,
        group: &str,
        envelope: &Envelope,
        recipient: &Recipient,
        failure: GroupFailure,
    ) -> Reply {
        let can_spool =
            matches!(self.mode, Mode::Undecided | Mode::Spooling) && self.shared.queue.is_some();
        if !failure.unavailable || !can_spool || !self.has_queue_fallback(recipient) {
            return failure.reply;
        }
        if !self.fallback_logged {
            tracing::warn!(
                queue_id = %envelope.queue_id(),
                group,
                reply = %failure.reply.summary(),
                "downstream group unavailable, spooling its recipients for later delivery"
            );
            self.fallback_logged = true;
        }
        self.mode = Mode::Spooling;
        self.recipients
            .push(Intake::spool_recipient(recipient, Some(group)));
        Reply::recipient_ok()
    }

    /// Checks whether the recipient's domain is a relay domain with
    /// `fallback: queue`.
    fn has_queue_fallback(&self, recipient: &Recipient) -> bool {
        recipient
            .address
            .domain()
            .as_name()
            .is_some_and(|name| self.shared.config.relay.queue_fallback.contains(name))
    }

    /// The live relay failed: recipients it accepted move to the queue when
    /// there is one; otherwise the transaction cannot succeed.
    async fn relay_broke(&mut self) {
        let next = if self.shared.queue.is_some() && !self.recipients.is_empty() {
            Mode::Spooling
        } else if self.recipients.is_empty() {
            Mode::Undecided
        } else {
            Mode::Broken
        };
        self.mode = next;
    }

    /// Logs a recipient's decision and counts it. A refusal is counted with
    /// the rule that made it, or with downstream, queue or mixed_routes when
    /// the policy accepted the recipient but it could not be taken.
    fn log_decision(
        &self,
        client: &ClientInfo,
        envelope: &Envelope,
        recipient: &Recipient,
        decision: &policy::Decision,
        reply: &Reply,
    ) {
        let outcome = if reply.is_permanent() {
            RecipientDecision::Reject
        } else if reply.is_transient() {
            RecipientDecision::Tempfail
        } else {
            match &decision.action {
                Action::Accept(Route::Local) => RecipientDecision::Local,
                _ => RecipientDecision::Relay,
            }
        };
        // A refusal the policy did not make is a mix of routes without a
        // queue, a downstream that failed (X.4.X) or refused, or a queue
        // that could not take the recipient.
        let network_failure = reply.enhanced().is_some_and(|code| code.1 == 4);
        let reason = match &decision.action {
            _ if reply.is_positive() => "",
            Action::Reject(_) => decision.rule_label(),
            _ if *reply == Reply::mixed_routes_need_new_transaction() => "mixed_routes",
            Action::Accept(Route::Group(_)) => "downstream",
            Action::Accept(Route::Local) if network_failure => "downstream",
            Action::Accept(Route::Local) => "queue",
        };
        self.shared.metrics.smtp.recipient_decided(outcome, reason);
        tracing::info!(
            queue_id = %envelope.queue_id(),
            client_ip = %client.peer.ip(),
            helo = %client.helo,
            sender = %envelope.sender_text(),
            recipient = %recipient.address.to_smtp(),
            decision = %outcome.as_str(),
            rule = %decision.rule,
            reply = %reply.summary(),
            "recipient decided"
        );
    }

    /// Sends the end of the content and times the downstream's final reply.
    async fn finish_relay(
        metrics: &Metrics,
        relay: &mut Relay,
    ) -> Result<Reply, crate::passthrough::RelayError> {
        let metrics = metrics.passthrough.group(relay.group());
        let started = Instant::now();
        let result = relay.finish().await;
        match &result {
            Ok(reply) => {
                metrics.observe(PassthroughStep::Data, started.elapsed());
                metrics.message(reply.code());
            }
            Err(_) => metrics.error(PassthroughStep::Data),
        }
        result
    }

    fn queue_envelope(client_ip: IpAddr, helo: &str, envelope: &Envelope) -> queue::Envelope {
        queue::Envelope {
            id: envelope.id,
            sender: envelope.sender_text(),
            client_ip,
            helo: helo.to_string(),
            smtputf8: envelope.parameters.smtputf8,
            body_type: envelope.parameters.body.map(|b| b.as_str().to_string()),
            dsn_ret: envelope.parameters.ret.map(|r| r.as_str().to_string()),
            dsn_envid: envelope.parameters.envid.clone(),
        }
    }
}

impl Handler for Intake {
    async fn recipient(
        &mut self,
        client: &ClientInfo,
        envelope: &Envelope,
        recipient: &Recipient,
    ) -> Reply {
        self.check_blocklists(client, envelope).await;
        let snapshot = self.shared.directory.as_ref().and_then(|d| d.snapshot());
        let view = match (&self.shared.directory, &snapshot) {
            (None, _) => DirectoryView::Absent,
            (Some(_), None) => DirectoryView::Loading,
            (Some(_), Some(snapshot)) => DirectoryView::Ready(snapshot),
        };
        let sender = envelope.sender_text();
        let session = SessionFacts {
            client: client.peer.ip(),
            helo: &client.helo,
            auth: client.authenticated.as_deref(),
            tls: client.tls,
            sender: &sender,
            dnsbl: &self.dnsbl,
        };
        let decision = policy::decide(
            &self.shared.config.relay,
            &self.shared.config.rules,
            view,
            &session,
            &recipient.address,
            recipient.bare_postmaster,
        );
        // Postmaster is always accepted (RFC 5321 §4.5.1), whatever the limits.
        let limited = match &decision.action {
            Action::Accept(_) if decision.rule != "postmaster" => self
                .check_rate_limits(client, envelope, &sender, &decision)
                .err(),
            Action::Accept(_) | Action::Reject(_) => None,
        };
        let reply = match (&decision.action, limited) {
            (_, Some(reply)) => reply,
            (Action::Reject(reply), None) => reply.clone(),
            (Action::Accept(Route::Local), None) => {
                if self.shared.queue.is_none() {
                    Reply::queue_unavailable()
                } else if let Mode::Broken = self.mode {
                    Reply::downstream_failed()
                } else {
                    match self.switch_to_spool().await {
                        Ok(()) => {
                            self.recipients
                                .push(Intake::spool_recipient(recipient, None));
                            Reply::recipient_ok()
                        }
                        Err(reply) => reply,
                    }
                }
            }
            (Action::Accept(Route::Group(group)), None) => {
                let group = group.clone();
                self.relay_recipient(&group, envelope, recipient).await
            }
        };
        self.log_decision(client, envelope, recipient, &decision, &reply);
        reply
    }

    async fn start_message(
        &mut self,
        client: &ClientInfo,
        envelope: &Envelope,
    ) -> Result<(), Reply> {
        match std::mem::replace(&mut self.mode, Mode::Undecided) {
            Mode::Relaying(mut relay) => match relay.data().await {
                Ok(None) => {
                    self.sink = Sink::Relay(relay);
                    self.content_route = ContentRoute::Relay;
                    Ok(())
                }
                Ok(Some(reply)) => {
                    relay.quit().await;
                    Err(reply)
                }
                Err(error) => {
                    tracing::warn!(queue_id = %envelope.queue_id(), error = %error, "downstream failed at DATA");
                    Err(Reply::downstream_failed())
                }
            },
            Mode::Spooling => {
                let Some(queue) = &self.shared.queue else {
                    return Err(Reply::queue_unavailable());
                };
                let queue_envelope =
                    Intake::queue_envelope(client.peer.ip(), &client.helo, envelope);
                self.sink = Sink::Spool(Box::new(queue.begin(queue_envelope)));
                self.content_route = ContentRoute::Spool;
                Ok(())
            }
            Mode::Broken => Err(Reply::downstream_failed()),
            Mode::Undecided => Err(Reply::no_valid_recipients()),
        }
    }

    async fn message_data(&mut self, data: &[u8]) -> Result<(), Reply> {
        match &mut self.sink {
            Sink::Relay(relay) => relay.write(data).await.map_err(|error| {
                tracing::warn!(group = relay.group(), host = relay.host(), error = %error, "downstream failed during DATA");
                Reply::downstream_failed()
            }),
            Sink::Spool(writer) => writer.write(data).await.map_err(|error| {
                self.shared.metrics.database_error(Component::Listener);
                crate::log_limited!(error.to_string(), suppressed => tracing::warn!(
                    queue_id = %writer.id().simple(),
                    error = %error,
                    suppressed,
                    "queue write failed"
                ));
                Reply::queue_unavailable()
            }),
            Sink::None => Err(Reply::internal_error()),
        }
    }

    async fn finish_message(&mut self, _client: &ClientInfo, envelope: &Envelope) -> Reply {
        match std::mem::replace(&mut self.sink, Sink::None) {
            Sink::Relay(mut relay) => {
                match Intake::finish_relay(&self.shared.metrics, &mut relay).await {
                    Ok(reply) => {
                        tracing::info!(
                            queue_id = %envelope.queue_id(),
                            group = relay.group(),
                            host = relay.host(),
                            reply = %reply.summary(),
                            "passed through"
                        );
                        self.idle_relay = Some(*relay);
                        reply
                    }
                    Err(error) => {
                        tracing::warn!(queue_id = %envelope.queue_id(), error = %error, "downstream failed after DATA");
                        Reply::downstream_failed()
                    }
                }
            }
            Sink::Spool(writer) => match writer.commit(&self.recipients).await {
                Ok(()) => {
                    tracing::info!(queue_id = %envelope.queue_id(), recipients = self.recipients.len(), "spooled");
                    if let Some(wake) = &self.shared.router_wake {
                        wake.notify_one();
                    }
                    Reply::queued(&envelope.queue_id())
                }
                Err(error) => {
                    self.shared.metrics.database_error(Component::Listener);
                    crate::log_limited!(error.to_string(), suppressed => tracing::error!(
                        queue_id = %envelope.queue_id(),
                        error = %error,
                        suppressed,
                        "queue commit failed"
                    ));
                    Reply::queue_unavailable()
                }
            },
            Sink::None => Reply::internal_error(),
        }
    }

    async fn abort_message(&mut self) {
        match std::mem::replace(&mut self.sink, Sink::None) {
            // Closing the socket without the final dot makes the downstream
            // discard what it received.
            Sink::Relay(relay) => drop(relay),
            Sink::Spool(writer) => writer.abort().await,
            Sink::None => {}
        }
    }

    async fn reset(&mut self) {
        self.abort_message().await;
        match std::mem::replace(&mut self.mode, Mode::Undecided) {
            Mode::Relaying(mut relay) => {
                if relay.reset().await.is_ok() {
                    self.idle_relay = Some(*relay);
                }
            }
            Mode::Undecided | Mode::Broken | Mode::Spooling => {}
        }
        self.recipients.clear();
        self.failed_groups.clear();
        self.fallback_logged = false;
        self.message_counted = false;
        self.content_route = ContentRoute::None;
    }

    fn content_route(&self) -> ContentRoute {
        self.content_route
    }
}
