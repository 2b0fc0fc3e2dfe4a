//! The per-recipient relay decision.
//!
//! [`decide_recipient`] is a pure function of the client address, the
//! normalised recipient and the relay settings: it returns where the
//! recipient goes (spooled for local routing, or passed to a named downstream
//! group) or the reply that rejects it, and always the name of the rule that
//! decided, for the log line. It never waits on I/O.
//!
//! The rules, first match wins:
//! 1. `routing_characters`: a local part with `@`, `%` or `!` from a client
//!    outside the relay networks is rejected, because a downstream MTA might
//!    route on it (the `%` hack, `!` paths, quoted `@`).
//! 2. `address_literal`: a domain written as an address literal goes to the
//!    outbound group from a relay network, and is rejected from elsewhere.
//! 3. `postmaster`: postmaster at a local domain, and `<Postmaster>` without
//!    a domain, are always accepted (RFC 5321 §4.5.1).
//! 4. `local_domains`: spooled for local routing.
//! 5. `relay_domains`: passed to the domain's group.
//! 6. `relay_networks`: a client in a relay network may send anywhere, through
//!    the outbound group.
//! 7. `no_relay`: anything else is rejected with 550 5.7.1.
//!
//! Domains match exactly: a local domain does not cover its subdomains.

pub mod address;

use std::net::IpAddr;

use address::{Address, Domain};

use crate::config::RelayConfig;
use crate::smtp::reply::Reply;

/// Where an accepted recipient goes.
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

/// A decision and the rule that made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    pub rule: String,
}

impl Decision {
    fn accept(route: Route, rule: impl Into<String>) -> Decision {
        Decision {
            action: Action::Accept(route),
            rule: rule.into(),
        }
    }

    fn reject(reply: Reply, rule: impl Into<String>) -> Decision {
        Decision {
            action: Action::Reject(reply),
            rule: rule.into(),
        }
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
/// `bare_postmaster` is true for `<Postmaster>` written without a domain,
/// which is always accepted for local routing (RFC 5321 §4.5.1).
pub fn decide_recipient(
    relay: &RelayConfig,
    client: IpAddr,
    recipient: &Address,
    bare_postmaster: bool,
) -> Decision {
    if bare_postmaster {
        return Decision::accept(Route::Local, "postmaster");
    }
    let client = canonical_ip(client);
    let trusted_network = relay
        .relay_networks
        .iter()
        .find(|network| network.contains(&client));

    if recipient.has_routing_characters() && trusted_network.is_none() {
        return Decision::reject(Reply::routing_characters_denied(), "routing_characters");
    }

    let name = match recipient.domain() {
        Domain::Literal(_) => {
            return match (trusted_network, &relay.outbound_group) {
                (Some(network), Some(group)) => Decision::accept(
                    Route::Group(group.clone()),
                    format!("relay_networks[{network}]"),
                ),
                _ => Decision::reject(Reply::relay_denied(), "address_literal"),
            };
        }
        Domain::Name(name) => name,
    };

    if relay.local_domains.contains(name) {
        let rule = if recipient.is_postmaster() {
            "postmaster"
        } else {
            "local_domains"
        };
        return Decision::accept(Route::Local, rule);
    }
    if let Some(group) = relay.relay_domains.get(name) {
        return Decision::accept(
            Route::Group(group.clone()),
            format!("relay_domains[{name}]"),
        );
    }
    match (trusted_network, &relay.outbound_group) {
        (Some(network), Some(group)) => Decision::accept(
            Route::Group(group.clone()),
            format!("relay_networks[{network}]"),
        ),
        _ => Decision::reject(Reply::relay_denied(), "no_relay"),
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
        let address = Address::parse(recipient).expect("valid address");
        decide_recipient(
            &relay_config(),
            client.parse().expect("ip"),
            &address,
            false,
        )
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
