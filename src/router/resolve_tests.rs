use std::collections::HashSet;

use super::*;
use crate::directory::{
    Account, AutoReply, AutoReplyKind, DomainEntry, DomainKind, List, Mailbox, Owner, Snapshot,
};

fn domain(snapshot: &mut Snapshot, name: &str, kind: DomainKind, group: Option<&str>) {
    snapshot.domains.insert(
        name.to_string(),
        DomainEntry {
            kind,
            legacy_group: group.map(str::to_string),
        },
    );
}

fn account(
    snapshot: &mut Snapshot,
    name: &str,
    addresses: &[&str],
    mailbox: bool,
    forwards: &[&str],
) -> usize {
    let index = snapshot.accounts.len();
    snapshot.accounts.push(Account {
        id: index as i64 + 1,
        name: name.to_string(),
        addresses: addresses.iter().map(|a| a.to_string()).collect(),
        mailbox: mailbox.then(|| Mailbox::Maildir(format!("/var/mail/{name}"))),
        forwards: forwards.iter().map(|a| a.to_string()).collect(),
        relay_group: None,
        auto_reply: None,
        password_hash: None,
    });
    for address in addresses {
        snapshot
            .addresses
            .insert(address.to_string(), Owner::Account(index as u32));
    }
    index
}

fn list(snapshot: &mut Snapshot, name: &str, address: &str, members: &[&str]) {
    let index = snapshot.lists.len();
    snapshot.lists.push(List {
        id: index as i64 + 1,
        name: name.to_string(),
        addresses: vec![address.to_string()],
        owner: format!("owner-{name}@example.com"),
        members: members.iter().map(|a| a.to_string()).collect(),
    });
    snapshot
        .addresses
        .insert(address.to_string(), Owner::List(index as u32));
}

fn recipients(addresses: &[&str]) -> Vec<EnvelopeRecipient> {
    addresses
        .iter()
        .enumerate()
        .map(|(index, address)| EnvelopeRecipient {
            id: index as i64 + 100,
            address: address.to_string(),
            route_group: None,
            orcpt: None,
            notify: None,
        })
        .collect()
}

fn route(snapshot: &Snapshot, addresses: &[&str], delivered_to: &[&str]) -> MessageRouting {
    let delivered: HashSet<String> = delivered_to.iter().map(|a| a.to_string()).collect();
    let facts = MessageFacts {
        sender: "sender@example.org",
        delivered_to: &delivered,
    };
    resolve_message(
        snapshot,
        &facts,
        &recipients(addresses),
        ResolveLimits { max_depth: 10 },
        ConfiguredRoutes {
            relay_domains: &relay_domains(),
            outbound_group: None,
        },
    )
}

fn relay_domains() -> std::collections::BTreeMap<String, String> {
    [("example.net".to_string(), "legacy".to_string())]
        .into_iter()
        .collect()
}

fn summary(routing: &MessageRouting) -> Vec<(String, &'static str, String)> {
    let mut rows: Vec<_> = routing
        .deliveries
        .iter()
        .map(|d| (d.address.clone(), d.kind.as_str(), d.destination.clone()))
        .collect();
    rows.sort();
    rows
}

fn base() -> Snapshot {
    let mut snapshot = Snapshot::default();
    domain(&mut snapshot, "example.com", DomainKind::Local, None);
    domain(
        &mut snapshot,
        "old.example",
        DomainKind::Migrating,
        Some("legacy"),
    );
    snapshot
}

#[test]
fn account_with_mailbox_forwards_and_vacation() {
    let mut snapshot = base();
    let alice = account(
        &mut snapshot,
        "alice",
        &["alice@example.com", "a.smith@example.com"],
        true,
        &["alice@example.org", "bob@example.com"],
    );
    account(&mut snapshot, "bob", &["bob@example.com"], true, &[]);
    snapshot.accounts[alice].auto_reply = Some(AutoReply {
        kind: AutoReplyKind::Vacation,
        subject: "away".into(),
        body: "back soon".into(),
        active_from: None,
        active_until: None,
        interval: std::time::Duration::from_secs(3600),
        enabled: true,
    });

    let routing = route(&snapshot, &["a.smith@example.com"], &[]);
    assert_eq!(
        summary(&routing),
        vec![
            (
                "a.smith@example.com".into(),
                "mailbox",
                "maildir:/var/mail/alice".into()
            ),
            (
                "alice@example.org".into(),
                "remote",
                "domain:example.org".into()
            ),
            (
                "bob@example.com".into(),
                "mailbox",
                "maildir:/var/mail/bob".into()
            ),
        ]
    );
    assert_eq!(routing.auto_replies.len(), 1);
    assert_eq!(routing.auto_replies[0].address, "a.smith@example.com");
    let forwarded = routing
        .deliveries
        .iter()
        .find(|d| d.address == "bob@example.com")
        .expect("forward");
    assert_eq!(
        forwarded.header_prefix,
        "Delivered-To: a.smith@example.com\r\nDelivered-To: bob@example.com\r\n"
    );
    assert_eq!(
        forwarded.trace,
        "account alice > forward > account bob > mailbox"
    );
    assert!(routing.outcomes[0].failure.is_none());
}

#[test]
fn nested_list_cycle_delivers_once_and_is_reported() {
    let mut snapshot = base();
    account(&mut snapshot, "carol", &["carol@example.com"], true, &[]);
    list(
        &mut snapshot,
        "outer",
        "outer@example.com",
        &["inner@example.com", "carol@example.com"],
    );
    list(
        &mut snapshot,
        "inner",
        "inner@example.com",
        &["outer@example.com", "carol@example.com", "dave@example.org"],
    );

    let routing = route(&snapshot, &["outer@example.com"], &[]);
    assert_eq!(
        summary(&routing),
        vec![
            (
                "carol@example.com".into(),
                "mailbox",
                "maildir:/var/mail/carol".into()
            ),
            (
                "dave@example.org".into(),
                "remote",
                "domain:example.org".into()
            ),
        ]
    );
    assert!(
        routing.events.iter().any(|e| e.starts_with("list cycle")),
        "{:?}",
        routing.events
    );
    // Both members are first reached through the inner list, whose owner
    // becomes the reverse-path.
    for delivery in &routing.deliveries {
        assert_eq!(
            delivery.sender, "owner-inner@example.com",
            "{}",
            delivery.address
        );
    }
}

#[test]
fn direct_and_list_recipient_get_one_copy() {
    let mut snapshot = base();
    account(&mut snapshot, "carol", &["carol@example.com"], true, &[]);
    list(
        &mut snapshot,
        "staff",
        "staff@example.com",
        &["carol@example.com"],
    );
    let routing = route(&snapshot, &["carol@example.com", "staff@example.com"], &[]);
    assert_eq!(routing.deliveries.len(), 1);
    assert_eq!(
        routing.deliveries[0].sender, "sender@example.org",
        "the direct copy keeps the sender"
    );
}

#[test]
fn unknown_local_address_fails() {
    let routing = route(&base(), &["nobody@example.com"], &[]);
    assert!(routing.deliveries.is_empty());
    let failure = routing.outcomes[0].failure.as_deref().expect("failure");
    assert!(failure.starts_with("5.1.1"), "{failure}");
}

#[test]
fn configured_relay_domain_goes_to_its_group() {
    let routing = route(&base(), &["bob@example.net"], &[]);
    assert_eq!(
        summary(&routing),
        vec![("bob@example.net".into(), "relay", "group:legacy".into())]
    );
}

#[test]
fn unknown_migrating_address_goes_to_legacy_group() {
    let routing = route(&base(), &["someone@old.example"], &[]);
    assert_eq!(
        summary(&routing),
        vec![("someone@old.example".into(), "relay", "group:legacy".into())]
    );
}

#[test]
fn forward_loop_stops_on_second_pass() {
    let mut snapshot = base();
    account(
        &mut snapshot,
        "erin",
        &["erin@example.com"],
        false,
        &["erin@example.org"],
    );
    let routing = route(&snapshot, &["erin@example.com"], &["erin@example.com"]);
    assert!(routing.deliveries.is_empty());
    assert!(
        routing.events.iter().any(|e| e.starts_with("forward loop")),
        "{:?}",
        routing.events
    );
}

#[test]
fn internal_forward_cycle_is_cut() {
    let mut snapshot = base();
    account(
        &mut snapshot,
        "one",
        &["one@example.com"],
        true,
        &["two@example.com"],
    );
    account(
        &mut snapshot,
        "two",
        &["two@example.com"],
        true,
        &["one@example.com"],
    );
    let routing = route(&snapshot, &["one@example.com"], &[]);
    assert_eq!(routing.deliveries.len(), 2);
    assert!(
        routing
            .events
            .iter()
            .any(|e| e.starts_with("forward cycle")),
        "{:?}",
        routing.events
    );
}

#[test]
fn subaddress_and_catch_all_reach_the_account() {
    let mut snapshot = base();
    account(
        &mut snapshot,
        "frank",
        &["frank@example.com", "@example.com"],
        true,
        &[],
    );
    let routing = route(
        &snapshot,
        &["frank+news@example.com", "anyone@example.com"],
        &[],
    );
    assert_eq!(
        summary(&routing),
        vec![
            (
                "anyone@example.com".into(),
                "mailbox",
                "maildir:/var/mail/frank".into()
            ),
            (
                "frank+news@example.com".into(),
                "mailbox",
                "maildir:/var/mail/frank".into()
            ),
        ]
    );
}

#[test]
fn depth_limit_stops_deep_lists() {
    let mut snapshot = base();
    for level in 0..15 {
        let next = format!("level{}@example.com", level + 1);
        list(
            &mut snapshot,
            &format!("level{level}"),
            &format!("level{level}@example.com"),
            &[next.as_str()],
        );
    }
    let routing = route(&snapshot, &["level0@example.com"], &[]);
    assert!(routing.deliveries.is_empty());
    assert!(
        routing.events.iter().any(|e| e.contains("depth")),
        "{:?}",
        routing.events
    );
}

#[test]
fn batches_group_by_destination_and_cap_size() {
    let addresses: Vec<String> = (0..45).map(|n| format!("user{n:02}@example.org")).collect();
    let mut all: Vec<&str> = addresses.iter().map(String::as_str).collect();
    all.push("someone@example.net");
    let routing = route(&base(), &all, &[]);
    let batches = plan_batches(&routing.deliveries, 20);
    let sizes: Vec<usize> = batches.iter().map(Vec::len).collect();
    // domain:example.org sorts before group:legacy (example.net is a relay domain).
    assert_eq!(sizes, vec![20, 20, 5, 1]);
    let first_org = &routing.deliveries[batches[0][0]];
    assert_eq!(first_org.address, "user00@example.org", "sorted by address");
}
