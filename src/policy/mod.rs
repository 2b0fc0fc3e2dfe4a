//! The per-recipient relay decision.
//!
//! [`decide_recipient`] is a pure function of the client address, the
//! account the client authenticated as (SMTP AUTH), the normalised recipient
//! and the relay settings: it returns where the
//! recipient goes (spooled for local routing, or passed to a named downstream
//! group) or the reply that rejects it, and always the name of the rule that
//! decided, for the log line. It never waits on I/O.
//!
//! A trusted client is an authenticated one or one in a relay network. Its
//! rule name is `authenticated[ACCOUNT]` or `relay_networks[CIDR]`, and
//! authentication wins when both apply.
//!
//! The rules, first match wins:
//! 1. `routing_characters`: a local part with `@`, `%` or `!` from a client
//!    that is not trusted is rejected, because a downstream MTA might
//!    route on it (the `%` hack, `!` paths, quoted `@`).
//! 2. `address_literal`: a domain written as an address literal goes to the
//!    outbound group from a trusted client, and is rejected from elsewhere.
//! 3. `postmaster`: postmaster at a local domain, and `<Postmaster>` without
//!    a domain, are always accepted (RFC 5321 §4.5.1).
//! 4. `local_domains`: spooled for local routing.
//! 5. `relay_domains`: passed to the domain's group.
//! 6. `authenticated` or `relay_networks`: a trusted client may send
//!    anywhere: through the outbound group when one is set, otherwise into
//!    the queue, whose delivery tier sends it to the domain's MX hosts.
//! 7. `no_relay`: anything else is rejected with 550 5.7.1.
//!
//! Domains match exactly: a local domain does not cover its subdomains.

pub mod address;
pub mod dnsbl;
pub mod lists;
pub mod rules;

use std::net::IpAddr;

use address::{Address, Domain};
use dnsbl::DnsblResults;
use rules::{Facts, RecipientKind, RuleAction, RuleMatch, RuleSet};

use crate::config::RelayConfig;
use crate::directory::{DomainEntry, DomainKind, Lookup, Snapshot, normalise_address};
use crate::smtp::reply::Reply;

/// State of the account directory, as the decision uses it.
#[derive(Clone, Copy, Debug)]
pub enum DirectoryView<'a> {
    /// No directory: there is no queue database.
    Absent,
    /// A directory exists but has not been loaded yet.
    Loading,
    Ready(&'a Snapshot),
}

/// Destination of an accepted recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Spooled in the queue for wsmtp's own routing.
    Local,
    /// Passed through to the named downstream group.
    Group(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Accept(Route),
    Reject(Reply),
}

/// The names of the built-in rules, as they start [`Decision::rule`]; some
/// are followed by the network, domain, account or list in brackets.
pub const BUILT_IN_RULES: &[&str] = &[
    "postmaster",
    "routing_characters",
    "address_literal",
    "local_domains",
    "directory_loading",
    "unknown_user",
    "relay_domains",
    "directory_relay",
    "migrating",
    "account",
    "list",
    "authenticated",
    "relay_networks",
    "no_relay",
];

/// A decision and the rule that made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    pub rule: String,
    /// The name of the operator's rule that decided; None for a built-in rule.
    rule_name: Option<String>,
    /// The rate limit class that the deciding rule names, if any.
    pub rate_limit: Option<String>,
}

impl Decision {
    fn accept(route: Route, rule: impl Into<String>) -> Decision {
        Decision {
            action: Action::Accept(route),
            rule: rule.into(),
            rule_name: None,
            rate_limit: None,
        }
    }

    fn reject(reply: Reply, rule: impl Into<String>) -> Decision {
        Decision {
            action: Action::Reject(reply),
            rule: rule.into(),
            rule_name: None,
            rate_limit: None,
        }
    }

    /// The rule's name without what follows it in brackets, for metric
    /// labels: one of [`BUILT_IN_RULES`], or the name of the operator's
    /// rule. It never contains an address, a network or an account.
    pub fn rule_label(&self) -> &str {
        if let Some(name) = &self.rule_name {
            return name;
        }
        let base = self.rule.split('[').next().unwrap_or_default();
        BUILT_IN_RULES
            .iter()
            .find(|name| **name == base)
            .copied()
            .unwrap_or("other")
    }

    /// A short name of the action for log lines: local, relay or reject.
    pub fn kind(&self) -> &'static str {
        match &self.action {
            Action::Accept(Route::Local) => "local",
            Action::Accept(Route::Group(_)) => "relay",
            Action::Reject(_) => "reject",
        }
    }
}

/// Decides one recipient; see the module documentation for the rules.
/// `authenticated` is the account name after SMTP AUTH. `bare_postmaster`
/// is true for `<Postmaster>` written without a domain, which is always
/// accepted for local routing (RFC 5321 §4.5.1).
pub fn decide_recipient(
    relay: &RelayConfig,
    directory: DirectoryView<'_>,
    client: IpAddr,
    authenticated: Option<&str>,
    recipient: &Address,
    bare_postmaster: bool,
) -> Decision {
    if bare_postmaster {
        return Decision::accept(Route::Local, "postmaster");
    }
    let client = canonical_ip(client);
    let trusted = match authenticated {
        Some(account) => Some(Trust::Authenticated(account)),
        None => relay
            .relay_networks
            .iter()
            .find(|network| network.contains(&client))
            .map(Trust::Network),
    };

    if recipient.has_routing_characters() && trusted.is_none() {
        return Decision::reject(Reply::routing_characters_denied(), "routing_characters");
    }

    let name = match recipient.domain() {
        Domain::Literal(_) => {
            return match (trusted, &relay.outbound_group) {
                (Some(trust), Some(group)) => {
                    Decision::accept(Route::Group(group.clone()), trust.rule())
                }
                _ => Decision::reject(Reply::relay_denied(), "address_literal"),
            };
        }
        Domain::Name(name) => name,
    };

    let directory_entry = match directory {
        DirectoryView::Ready(snapshot) => snapshot.domain(name).map(|entry| (snapshot, entry)),
        DirectoryView::Absent | DirectoryView::Loading => None,
    };
    let configured_local = relay.local_domains.contains(name);
    let directory_local = directory_entry.is_some_and(|(_, entry)| entry.kind != DomainKind::Relay);
    if recipient.is_postmaster() && (configured_local || directory_local) {
        return Decision::accept(Route::Local, "postmaster");
    }

    if let Some((snapshot, entry)) = directory_entry {
        return decide_in_directory(snapshot, entry, name, recipient);
    }
    if configured_local {
        return match directory {
            DirectoryView::Absent => Decision::accept(Route::Local, "local_domains"),
            // The RCPT path never waits on the database: until the directory
            // is loaded, local recipients are deferred.
            DirectoryView::Loading => {
                Decision::reject(Reply::directory_unavailable(), "directory_loading")
            }
            DirectoryView::Ready(_) => Decision::reject(Reply::unknown_user(), "unknown_user"),
        };
    }
    if let Some(group) = relay.relay_domains.get(name) {
        return Decision::accept(
            Route::Group(group.clone()),
            format!("relay_domains[{name}]"),
        );
    }
    match (trusted, &relay.outbound_group, directory) {
        (Some(trust), Some(group), _) => {
            Decision::accept(Route::Group(group.clone()), trust.rule())
        }
        // Without a queue there is nowhere to keep the message for MX delivery.
        (Some(trust), None, DirectoryView::Loading | DirectoryView::Ready(_)) => {
            Decision::accept(Route::Local, trust.rule())
        }
        _ => Decision::reject(Reply::relay_denied(), "no_relay"),
    }
}

/// The reason a client may relay to any domain.
#[derive(Clone, Copy, Debug)]
enum Trust<'a> {
    /// The client authenticated as this account.
    Authenticated(&'a str),
    /// The client is in this relay network.
    Network(&'a ipnet::IpNet),
}

impl Trust<'_> {
    fn rule(self) -> String {
        match self {
            Trust::Authenticated(account) => format!("authenticated[{account}]"),
            Trust::Network(network) => format!("relay_networks[{network}]"),
        }
    }
}

/// Decides a recipient whose domain is in the directory.
fn decide_in_directory(
    snapshot: &Snapshot,
    entry: &DomainEntry,
    name: &str,
    recipient: &Address,
) -> Decision {
    let group = entry.legacy_group.clone().unwrap_or_default();
    if entry.kind == DomainKind::Relay {
        return Decision::accept(Route::Group(group), format!("directory_relay[{name}]"));
    }
    let address = normalise_address(&recipient.to_smtp());
    match snapshot.lookup(&address) {
        Lookup::Account { account, .. } => {
            Decision::accept(Route::Local, format!("account[{}]", account.name))
        }
        Lookup::List { list, .. } => Decision::accept(Route::Local, format!("list[{}]", list.name)),
        Lookup::Unknown { .. } if entry.kind == DomainKind::Migrating => {
            Decision::accept(Route::Group(group), format!("migrating[{name}]"))
        }
        // No backscatter: an unknown local recipient is refused now rather
        // than bounced later.
        Lookup::Unknown { .. } | Lookup::NotInDirectory => {
            Decision::reject(Reply::unknown_user(), "unknown_user")
        }
    }
}

/// The session facts that relay rules may look at, besides the recipient.
#[derive(Clone, Copy, Debug)]
pub struct SessionFacts<'a> {
    pub client: IpAddr,
    pub helo: &'a str,
    /// Authenticated account name.
    pub auth: Option<&'a str>,
    pub tls: bool,
    /// Reverse-path; "" for `<>`.
    pub sender: &'a str,
    /// DNS blocklist results of the client and the sender's domain, for the
    /// zones that rules name; [`DnsblResults::none`] without lookups.
    pub dnsbl: &'a DnsblResults,
}

/// Decides one recipient: `<Postmaster>` and the anti-relay check on routing
/// characters first, then the operator's rules (first match wins), then the
/// built-in decision of [`decide_recipient`] from the configuration and the
/// directory.
pub fn decide(
    relay: &RelayConfig,
    rules: &RuleSet,
    directory: DirectoryView<'_>,
    session: &SessionFacts<'_>,
    recipient: &Address,
    bare_postmaster: bool,
) -> Decision {
    let client = canonical_ip(session.client);
    let trusted = relay.relay_networks.iter().any(|n| n.contains(&client));
    let guarded = bare_postmaster || (recipient.has_routing_characters() && !trusted);
    if recipient.is_postmaster() {
        // Postmaster at a local domain is accepted whatever the rules say
        // (RFC 5321 §4.5.1).
        let built_in = decide_recipient(
            relay,
            directory,
            session.client,
            session.auth,
            recipient,
            false,
        );
        if built_in.rule == "postmaster" {
            return built_in;
        }
    }
    if !guarded && !rules.is_empty() {
        let kind = classify(relay, directory, recipient);
        let facts = Facts {
            client,
            helo: session.helo,
            auth: session.auth,
            tls: session.tls,
            sender: session.sender,
            recipient,
            kind,
            dnsbl: session.dnsbl,
        };
        if let Some(found) = rules.first_match(&facts) {
            let name = found.rule().name.clone();
            let mut decision = rule_decision(relay, directory, recipient, found);
            decision.rule_name = Some(name);
            return decision;
        }
    }
    decide_recipient(
        relay,
        directory,
        session.client,
        session.auth,
        recipient,
        bare_postmaster,
    )
}

/// Turns a rule match into a decision: the rule's action, or `451 4.4.3`
/// when a blocklist that the rule names could not be queried.
fn rule_decision(
    relay: &RelayConfig,
    directory: DirectoryView<'_>,
    recipient: &Address,
    found: RuleMatch<'_>,
) -> Decision {
    let rule = found.rule();
    let reference = rule.reference();
    let listed = match &found {
        RuleMatch::BlocklistUnavailable { zone, .. } => {
            return Decision::reject(Reply::blocklist_unavailable(zone), reference);
        }
        RuleMatch::Matched { listed, .. } => listed.as_ref(),
    };
    let decision = match &rule.action {
        RuleAction::Accept => Decision::accept(Route::Local, reference),
        RuleAction::Reject(reply) | RuleAction::Tempfail(reply) => {
            let reply = match listed {
                Some(listed) => rules::fill_reply(reply, listed),
                None => reply.clone(),
            };
            Decision::reject(reply, reference)
        }
        RuleAction::Relay { group } => {
            let group = group
                .clone()
                .or_else(|| default_group(relay, directory, recipient));
            match group {
                Some(group) => Decision::accept(Route::Group(group), reference),
                None => {
                    tracing::error!(rule = %reference, recipient = %recipient.to_smtp(), "relay rule without a group matched a domain that has none, and no outbound_group is set");
                    Decision::reject(Reply::no_group_for_recipient(), reference)
                }
            }
        }
    };
    Decision {
        rate_limit: rule.rate_limit.clone(),
        ..decision
    }
}

/// The group a recipient's domain relays to, else the outbound group.
fn default_group(
    relay: &RelayConfig,
    directory: DirectoryView<'_>,
    recipient: &Address,
) -> Option<String> {
    if let Domain::Name(name) = recipient.domain() {
        if let Some(group) = relay.relay_domains.get(name) {
            return Some(group.clone());
        }
        if let DirectoryView::Ready(snapshot) = directory
            && let Some(group) = snapshot.domain(name).and_then(|e| e.legacy_group.clone())
        {
            return Some(group);
        }
    }
    relay.outbound_group.clone()
}

/// What the configuration and the directory say about a recipient.
pub fn classify(
    relay: &RelayConfig,
    directory: DirectoryView<'_>,
    recipient: &Address,
) -> RecipientKind {
    let name = match recipient.domain() {
        Domain::Literal(_) => return RecipientKind::Foreign,
        Domain::Name(name) => name,
    };
    if let DirectoryView::Ready(snapshot) = directory
        && let Some(entry) = snapshot.domain(name)
    {
        if entry.kind == DomainKind::Relay {
            return RecipientKind::RelayDomain;
        }
        return match snapshot.lookup(&normalise_address(&recipient.to_smtp())) {
            Lookup::Account { .. } => RecipientKind::LocalAccount,
            Lookup::List { .. } => RecipientKind::List,
            Lookup::Unknown { .. } | Lookup::NotInDirectory
                if entry.kind == DomainKind::Migrating =>
            {
                RecipientKind::RelayDomain
            }
            Lookup::Unknown { .. } | Lookup::NotInDirectory => RecipientKind::UnknownLocal,
        };
    }
    if relay.relay_domains.contains_key(name) {
        return RecipientKind::RelayDomain;
    }
    match directory {
        DirectoryView::Ready(_) if relay.local_domains.contains(name) => {
            RecipientKind::UnknownLocal
        }
        DirectoryView::Ready(_) => RecipientKind::Foreign,
        // A loading directory may still name the domain.
        DirectoryView::Loading => RecipientKind::Unknown,
        DirectoryView::Absent if relay.local_domains.contains(name) => RecipientKind::Unknown,
        DirectoryView::Absent => RecipientKind::Foreign,
    }
}

/// Maps an IPv4-mapped IPv6 client address (from a dual-stack socket) to IPv4,
/// so IPv4 relay networks match it.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay_config() -> RelayConfig {
        let mut relay = RelayConfig::default();
        relay.local_domains.insert("example.com".to_string());
        relay
            .relay_domains
            .insert("example.net".to_string(), "legacy".to_string());
        relay
            .relay_networks
            .push("127.0.0.1/32".parse().expect("network"));
        relay.outbound_group = Some("outbound".to_string());
        relay
    }

    fn decide(client: &str, recipient: &str) -> Decision {
        decide_with(DirectoryView::Absent, client, recipient)
    }

    fn decide_with(directory: DirectoryView<'_>, client: &str, recipient: &str) -> Decision {
        decide_as(directory, client, None, recipient)
    }

    fn decide_as(
        directory: DirectoryView<'_>,
        client: &str,
        authenticated: Option<&str>,
        recipient: &str,
    ) -> Decision {
        let address = Address::parse(recipient).expect("valid address");
        decide_recipient(
            &relay_config(),
            directory,
            client.parse().expect("ip"),
            authenticated,
            &address,
            false,
        )
    }

    fn snapshot() -> Snapshot {
        use crate::directory::{Account, Owner};
        let mut snapshot = Snapshot::default();
        for (name, kind, group) in [
            ("example.com", DomainKind::Local, None),
            ("old.example", DomainKind::Migrating, Some("legacy")),
            ("passed.example", DomainKind::Relay, Some("legacy")),
        ] {
            snapshot.domains.insert(
                name.to_string(),
                DomainEntry {
                    kind,
                    legacy_group: group.map(str::to_string),
                },
            );
        }
        for (index, address) in ["alice@example.com", "moved@old.example"]
            .iter()
            .enumerate()
        {
            snapshot.accounts.push(Account {
                id: index as i64,
                name: format!("account{index}"),
                addresses: vec![address.to_string()],
                mailbox: None,
                forwards: vec![],
                relay_group: None,
                auto_reply: None,
                password_hash: None,
            });
            snapshot
                .addresses
                .insert(address.to_string(), Owner::Account(index as u32));
        }
        snapshot
    }

    #[test]
    fn directory_decisions() {
        let snapshot = snapshot();
        let ready = DirectoryView::Ready(&snapshot);
        let cases = [
            ("Alice@Example.COM", "local", "account[account0]"),
            ("alice+tag@example.com", "local", "account[account0]"),
            ("bob@example.com", "reject", "unknown_user"),
            ("postmaster@example.com", "local", "postmaster"),
            ("moved@old.example", "local", "account[account1]"),
            ("other@old.example", "relay", "migrating[old.example]"),
            (
                "anyone@passed.example",
                "relay",
                "directory_relay[passed.example]",
            ),
        ];
        for (recipient, kind, rule) in cases {
            let decision = decide_with(ready, "127.0.0.2", recipient);
            assert_eq!(decision.kind(), kind, "{recipient}");
            assert_eq!(decision.rule, rule, "{recipient}");
        }
        let unknown = decide_with(ready, "127.0.0.2", "bob@example.com");
        assert_eq!(unknown.action, Action::Reject(Reply::unknown_user()));
    }

    #[test]
    fn local_domain_waits_for_directory() {
        let decision = decide_with(DirectoryView::Loading, "127.0.0.2", "alice@example.com");
        assert_eq!(
            decision.action,
            Action::Reject(Reply::directory_unavailable())
        );
        let decision = decide_with(
            DirectoryView::Loading,
            "127.0.0.2",
            "postmaster@example.com",
        );
        assert_eq!(decision.kind(), "local", "postmaster never waits");
    }

    #[test]
    fn rule_labels_drop_bracketed_values() {
        let cases = [
            (
                "127.0.0.2",
                Some("alice"),
                "carol@example.org",
                "authenticated",
            ),
            ("127.0.0.1", None, "carol@example.org", "relay_networks"),
            ("127.0.0.2", None, "bob@example.net", "relay_domains"),
            ("127.0.0.2", None, "carol@example.org", "no_relay"),
        ];
        for (client, account, recipient, label) in cases {
            let decision = decide_as(DirectoryView::Absent, client, account, recipient);
            assert_eq!(decision.rule_label(), label, "{client} {recipient}");
        }

        let rules = RuleSet::parse_text(
            std::path::Path::new("rules/10-block.yaml"),
            "- name: block-test-net\n  client: [192.0.2.0/24]\n  action: reject\n",
            &std::collections::HashSet::new(),
            &rules::Lists::default(),
        )
        .expect("valid rules");
        let session = SessionFacts {
            client: "192.0.2.7".parse().expect("ip"),
            helo: "client.example",
            auth: None,
            tls: false,
            sender: "a@example.org",
            dnsbl: DnsblResults::none(),
        };
        let recipient = Address::parse("bob@example.net").expect("address");
        let decision = super::decide(
            &relay_config(),
            &rules,
            DirectoryView::Absent,
            &session,
            &recipient,
            false,
        );
        assert_eq!(decision.rule, "rules/10-block.yaml:1 block-test-net");
        assert_eq!(decision.rule_label(), "block-test-net");
    }

    #[test]
    fn authenticated_clients_relay_anywhere() {
        let cases = [
            (
                "127.0.0.2",
                "carol@example.org",
                "relay",
                "authenticated[alice]",
            ),
            (
                "127.0.0.1",
                "carol@example.org",
                "relay",
                "authenticated[alice]",
            ),
            (
                "127.0.0.2",
                "user%example.org@example.net",
                "relay",
                "relay_domains[example.net]",
            ),
            (
                "127.0.0.2",
                "user@[192.0.2.1]",
                "relay",
                "authenticated[alice]",
            ),
            ("127.0.0.2", "bob@example.com", "local", "local_domains"),
        ];
        for (client, recipient, kind, rule) in cases {
            let decision = decide_as(DirectoryView::Absent, client, Some("alice"), recipient);
            assert_eq!(decision.kind(), kind, "{client} {recipient}");
            assert_eq!(decision.rule, rule, "{client} {recipient}");
        }

        // Without a queue there is no route to MX hosts, so an authenticated
        // client with no outbound group is refused as before.
        let mut relay = relay_config();
        relay.outbound_group = None;
        let address = Address::parse("carol@example.org").expect("address");
        let client = "127.0.0.2".parse().expect("ip");
        let decision = decide_recipient(
            &relay,
            DirectoryView::Absent,
            client,
            Some("alice"),
            &address,
            false,
        );
        assert_eq!(decision.rule, "no_relay");
        let snapshot = Snapshot::default();
        let decision = decide_recipient(
            &relay,
            DirectoryView::Ready(&snapshot),
            client,
            Some("alice"),
            &address,
            false,
        );
        assert_eq!(decision.kind(), "local");
        assert_eq!(decision.rule, "authenticated[alice]");
    }

    #[test]
    fn decisions_from_outside_and_inside() {
        let cases = [
            ("127.0.0.2", "alice@example.com", "local", "local_domains"),
            ("127.0.0.2", "ALICE@Example.COM.", "local", "local_domains"),
            (
                "127.0.0.2",
                "bob@example.net",
                "relay",
                "relay_domains[example.net]",
            ),
            ("127.0.0.2", "carol@example.org", "reject", "no_relay"),
            (
                "127.0.0.1",
                "carol@example.org",
                "relay",
                "relay_networks[127.0.0.1/32]",
            ),
            (
                "::ffff:127.0.0.1",
                "carol@example.org",
                "relay",
                "relay_networks[127.0.0.1/32]",
            ),
            ("127.0.0.2", "Postmaster@example.com", "local", "postmaster"),
            (
                "127.0.0.2",
                "user%example.org@example.com",
                "reject",
                "routing_characters",
            ),
            (
                "127.0.0.2",
                "example.org!user@example.net",
                "reject",
                "routing_characters",
            ),
            (
                "127.0.0.2",
                "user@example.org@example.com",
                "reject",
                "routing_characters",
            ),
            ("127.0.0.2", "user@[127.0.0.1]", "reject", "address_literal"),
            (
                "127.0.0.1",
                "user@[192.0.2.1]",
                "relay",
                "relay_networks[127.0.0.1/32]",
            ),
            ("127.0.0.2", "user@sub.example.com", "reject", "no_relay"),
        ];
        for (client, recipient, kind, rule) in cases {
            let decision = decide(client, recipient);
            assert_eq!(decision.kind(), kind, "{client} {recipient}");
            assert_eq!(decision.rule, rule, "{client} {recipient}");
        }
    }
}
