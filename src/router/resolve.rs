//! Resolution of one message's envelope recipients into deliveries.
//!
//! [`resolve_message`] is a pure function of the directory snapshot, the
//! message's sender and Delivered-To trace, and its envelope recipients. It
//! expands accounts (mailbox, forwards, relay target, auto-reply), lists
//! (recursively, with the list owner as reverse-path per RFC 5321 §3.9) and
//! remote addresses, removes duplicates so each address gets one copy,
//! detects cycles and caps the depth. Nothing here touches the database.

use std::collections::{BTreeMap, HashSet};

use crate::directory::{Account, DomainKind, Lookup, Snapshot, normalise_address};

/// The transport of a delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryKind {
    /// To an account's mailbox (Maildir or LMTP).
    Mailbox,
    /// SMTP to the MX hosts of the address's domain.
    Remote,
    /// SMTP to a downstream group.
    Relay,
}

impl DeliveryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryKind::Mailbox => "mailbox",
            DeliveryKind::Remote => "remote",
            DeliveryKind::Relay => "relay",
        }
    }
}

/// One envelope recipient to resolve.
#[derive(Clone, Debug)]
pub struct EnvelopeRecipient {
    pub id: i64,
    pub address: String,
    /// Set by the listener for relay-domain recipients of a spooled
    /// transaction: the group that receives them.
    pub route_group: Option<String>,
    pub orcpt: Option<String>,
    pub notify: Option<String>,
}

/// A delivery the router will write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedDelivery {
    pub recipient_id: i64,
    pub address: String,
    pub kind: DeliveryKind,
    pub destination: String,
    /// Reverse-path: the message's sender, or a list owner.
    pub sender: String,
    /// Header fields written before the stored body.
    pub header_prefix: String,
    pub trace: String,
    pub orcpt: Option<String>,
    pub notify: Option<String>,
}

/// An auto-reply to consider for an account reached directly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedAutoReply {
    pub recipient_id: i64,
    /// Index into [`Snapshot::accounts`].
    pub account: usize,
    /// The address of the account that the message reached.
    pub address: String,
}

/// The outcome for one envelope recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecipientOutcome {
    pub recipient_id: i64,
    /// The recipient's resolution as text, for `queue show`.
    pub resolution: String,
    /// Set when nothing could be delivered: the reason, for the bounce.
    pub failure: Option<String>,
}

/// Everything routing decided for one message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MessageRouting {
    pub deliveries: Vec<PlannedDelivery>,
    pub auto_replies: Vec<PlannedAutoReply>,
    pub outcomes: Vec<RecipientOutcome>,
    /// Cycles, loops and depth limits met, for the log.
    pub events: Vec<String>,
}

/// Limits of expansion.
#[derive(Clone, Copy, Debug)]
pub struct ResolveLimits {
    /// Nesting of lists and forwards.
    pub max_depth: usize,
}

/// Routes of the configuration for addresses outside the directory.
#[derive(Clone, Copy, Debug)]
pub struct ConfiguredRoutes<'a> {
    /// Relay domains and their groups.
    pub relay_domains: &'a BTreeMap<String, String>,
    /// Group that takes mail for all other remote domains (a smarthost);
    /// None sends it to the domain's MX hosts.
    pub outbound_group: Option<&'a str>,
}

/// Facts of the stored message that routing needs.
pub struct MessageFacts<'a> {
    /// Envelope sender, "" for `<>`.
    pub sender: &'a str,
    /// Addresses already named in Delivered-To header fields (normalised).
    pub delivered_to: &'a HashSet<String>,
}

struct Expansion<'a> {
    snapshot: &'a Snapshot,
    routes: ConfiguredRoutes<'a>,
    facts: &'a MessageFacts<'a>,
    limits: ResolveLimits,
    routing: MessageRouting,
    /// (address, destination) pairs already planned: one copy each.
    planned: HashSet<(String, String)>,
}

/// Context of one step of the expansion.
#[derive(Clone)]
struct Step {
    recipient: usize,
    depth: usize,
    sender: String,
    /// Accounts and lists passed through, to detect cycles.
    path: Vec<String>,
    trace: String,
    /// Delivered-To lines collected through forwards.
    header_prefix: String,
    /// True when reached through a list (no auto-reply then).
    via_list: bool,
}

/// Resolves every envelope recipient of one message.
pub fn resolve_message(
    snapshot: &Snapshot,
    facts: &MessageFacts<'_>,
    recipients: &[EnvelopeRecipient],
    limits: ResolveLimits,
    routes: ConfiguredRoutes<'_>,
) -> MessageRouting {
    let mut expansion = Expansion {
        snapshot,
        routes,
        facts,
        limits,
        routing: MessageRouting::default(),
        planned: HashSet::new(),
    };
    for (index, recipient) in recipients.iter().enumerate() {
        let before = expansion.routing.deliveries.len();
        let replies_before = expansion.routing.auto_replies.len();
        let step = Step {
            recipient: index,
            depth: 0,
            sender: facts.sender.to_string(),
            path: Vec::new(),
            trace: String::new(),
            header_prefix: String::new(),
            via_list: false,
        };
        let failure = match &recipient.route_group {
            Some(group) => {
                let address = normalise_address(&recipient.address);
                expansion.plan(
                    recipients,
                    &step,
                    &address,
                    DeliveryKind::Relay,
                    format!("group:{group}"),
                    format!("route group {group}"),
                );
                None
            }
            None => expansion.resolve(recipients, &step, &normalise_address(&recipient.address)),
        };
        let produced: Vec<String> = expansion.routing.deliveries[before..]
            .iter()
            .map(|d| format!("{} {} ({})", d.kind.as_str(), d.address, d.trace))
            .collect();
        let replies = expansion.routing.auto_replies.len() - replies_before;
        let mut resolution = if produced.is_empty() {
            "no new deliveries".to_string()
        } else {
            produced.join("; ")
        };
        if replies > 0 {
            resolution.push_str("; auto-reply");
        }
        let failure = if produced.is_empty() && replies == 0 {
            failure
        } else {
            None
        };
        expansion.routing.outcomes.push(RecipientOutcome {
            recipient_id: recipient.id,
            resolution: match &failure {
                Some(reason) => format!("failed: {reason}"),
                None => resolution,
            },
            failure,
        });
    }
    expansion.routing
}

impl Expansion<'_> {
    /// Resolves one address; returns a failure reason when it leads nowhere.
    fn resolve(
        &mut self,
        recipients: &[EnvelopeRecipient],
        step: &Step,
        address: &str,
    ) -> Option<String> {
        let domain = address.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
        match self.snapshot.lookup(address) {
            Lookup::Account { account, index, .. } => {
                self.resolve_account(recipients, step, account, index, address)
            }
            Lookup::List { list, matched } => {
                let key = format!("list {}", list.name);
                if step.path.contains(&key) {
                    self.routing
                        .events
                        .push(format!("list cycle: {} > {key}", step.path.join(" > ")));
                    return None;
                }
                if step.depth >= self.limits.max_depth {
                    self.routing.events.push(format!(
                        "expansion depth {} reached at {matched}",
                        self.limits.max_depth
                    ));
                    return Some(format!("expansion depth limit reached at {matched}"));
                }
                let mut next = step.clone();
                next.depth += 1;
                next.path.push(key.clone());
                next.trace = join_trace(&step.trace, &key);
                // RFC 5321 §3.9: mail expanded from a list goes out with the
                // list owner as reverse-path, so bounces reach the owner.
                next.sender = list.owner.clone();
                next.via_list = true;
                for member in &list.members {
                    let member = normalise_address(member);
                    if let Some(reason) = self.resolve(recipients, &next, &member) {
                        self.routing
                            .events
                            .push(format!("list {} member {member}: {reason}", list.name));
                    }
                }
                None
            }
            Lookup::Unknown { domain: entry } => match (entry.kind, &entry.legacy_group) {
                (DomainKind::Local, _) | (_, None) => {
                    Some(format!("5.1.1 no such user: {address}"))
                }
                (DomainKind::Relay | DomainKind::Migrating, Some(group)) => {
                    let trace = join_trace(
                        &step.trace,
                        &format!("{} domain {domain}", entry.kind.as_str()),
                    );
                    self.plan(
                        recipients,
                        step,
                        address,
                        DeliveryKind::Relay,
                        format!("group:{group}"),
                        trace,
                    );
                    None
                }
            },
            Lookup::NotInDirectory => {
                if domain.is_empty() {
                    return Some(format!("5.1.3 address without a domain: {address}"));
                }
                if let Some(group) = self.routes.relay_domains.get(domain) {
                    // A relay domain of the configuration: its mail goes to
                    // its group, as the listener would pass it through.
                    let trace = join_trace(&step.trace, &format!("relay domain {domain}"));
                    self.plan(
                        recipients,
                        step,
                        address,
                        DeliveryKind::Relay,
                        format!("group:{group}"),
                        trace,
                    );
                    return None;
                }
                if let Some(group) = self.routes.outbound_group {
                    let trace = join_trace(&step.trace, &format!("remote via {group}"));
                    self.plan(
                        recipients,
                        step,
                        address,
                        DeliveryKind::Relay,
                        format!("group:{group}"),
                        trace,
                    );
                    return None;
                }
                let trace = join_trace(&step.trace, "remote");
                self.plan(
                    recipients,
                    step,
                    address,
                    DeliveryKind::Remote,
                    format!("domain:{domain}"),
                    trace,
                );
                None
            }
        }
    }

    fn resolve_account(
        &mut self,
        recipients: &[EnvelopeRecipient],
        step: &Step,
        account: &Account,
        index: usize,
        requested: &str,
    ) -> Option<String> {
        let key = format!("account {}", account.name);
        if step.path.contains(&key) {
            self.routing
                .events
                .push(format!("forward cycle: {} > {key}", step.path.join(" > ")));
            return None;
        }
        let trace = join_trace(&step.trace, &key);
        // A catch-all or sub-address match keeps the address as requested,
        // so the mailbox sees which one was used.
        let address = requested.to_string();
        let mut methods = 0;
        let mut failure = None;

        if let Some(mailbox) = &account.mailbox {
            methods += 1;
            let mut inner = step.clone();
            inner.header_prefix = format!("{}Delivered-To: {address}\r\n", step.header_prefix);
            self.plan(
                recipients,
                &inner,
                &address,
                DeliveryKind::Mailbox,
                mailbox.destination(),
                format!("{trace} > mailbox"),
            );
        }
        if let Some(group) = &account.relay_group {
            methods += 1;
            self.plan(
                recipients,
                step,
                &address,
                DeliveryKind::Relay,
                format!("group:{group}"),
                format!("{trace} > relay {group}"),
            );
        }
        if !account.forwards.is_empty() {
            methods += 1;
            if self.facts.delivered_to.contains(&address) {
                // A copy forwarded earlier came back: the second pass stops.
                self.routing.events.push(format!(
                    "forward loop: message already delivered to {address}"
                ));
                failure = Some(format!("5.4.6 mail forwarding loop for {address}"));
            } else if step.depth >= self.limits.max_depth {
                self.routing.events.push(format!(
                    "expansion depth {} reached at {address}",
                    self.limits.max_depth
                ));
            } else {
                let mut next = step.clone();
                next.depth += 1;
                next.path.push(key.clone());
                next.trace = format!("{trace} > forward");
                next.header_prefix = format!("{}Delivered-To: {address}\r\n", step.header_prefix);
                for target in &account.forwards {
                    let target = normalise_address(target);
                    if let Some(reason) = self.resolve(recipients, &next, &target) {
                        self.routing
                            .events
                            .push(format!("forward of {} to {target}: {reason}", account.name));
                    }
                }
            }
        }
        if let Some(reply) = &account.auto_reply
            && !step.via_list
            && reply.enabled
        {
            methods += 1;
            let already = self.routing.auto_replies.iter().any(|r| r.account == index);
            if !already {
                self.routing.auto_replies.push(PlannedAutoReply {
                    recipient_id: recipients[step.recipient].id,
                    account: index,
                    address: address.clone(),
                });
            }
        }
        if methods == 0 {
            return Some(format!(
                "5.1.1 account {} has no delivery method",
                account.name
            ));
        }
        // Reported only when nothing else was delivered for the recipient.
        failure
    }

    fn plan(
        &mut self,
        recipients: &[EnvelopeRecipient],
        step: &Step,
        address: &str,
        kind: DeliveryKind,
        destination: String,
        trace: String,
    ) {
        if !self
            .planned
            .insert((address.to_string(), destination.clone()))
        {
            return;
        }
        let recipient = &recipients[step.recipient];
        self.routing.deliveries.push(PlannedDelivery {
            recipient_id: recipient.id,
            address: address.to_string(),
            kind,
            destination,
            sender: step.sender.clone(),
            header_prefix: step.header_prefix.clone(),
            trace,
            // ORCPT names the envelope recipient (RFC 3461 §4.2), so only a
            // delivery made without expansion keeps it. NOTIFY keeps applying
            // to every delivery the recipient expands to.
            orcpt: if step.depth == 0 {
                recipient.orcpt.clone()
            } else {
                None
            },
            notify: recipient.notify.clone(),
        });
    }
}

fn join_trace(prefix: &str, part: &str) -> String {
    if prefix.is_empty() {
        part.to_string()
    } else {
        format!("{prefix} > {part}")
    }
}

/// Splits deliveries into batches: one destination and sender each, at most
/// `batch_size` recipients, sorted by address.
pub fn plan_batches(deliveries: &[PlannedDelivery], batch_size: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..deliveries.len()).collect();
    order.sort_by(|a, b| {
        let (a, b) = (&deliveries[*a], &deliveries[*b]);
        (&a.destination, &a.sender, &a.address).cmp(&(&b.destination, &b.sender, &b.address))
    });
    let mut batches: Vec<Vec<usize>> = Vec::new();
    for index in order {
        let delivery = &deliveries[index];
        let joins = batches.last().is_some_and(|batch| {
            let first = &deliveries[batch[0]];
            batch.len() < batch_size.max(1)
                && first.destination == delivery.destination
                && first.sender == delivery.sender
        });
        match batches.last_mut() {
            Some(batch) if joins => batch.push(index),
            _ => batches.push(vec![index]),
        }
    }
    batches
}

#[cfg(test)]
#[path = "resolve_tests.rs"]
mod tests;
