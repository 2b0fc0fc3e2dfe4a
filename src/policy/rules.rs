//! Operator relay rules: YAML files in the rules directory, read in file
//! name order, first match wins.
//!
//! Each file holds a list of rules. A rule has a unique `name`, any number of
//! conditions (all must hold; within one condition, any listed value may
//! match) and one action:
//!
//! ```yaml
//! - name: customers-may-relay
//!   client: [192.0.2.0/24, 2001:db8::/32]
//!   recipient_kind: [foreign]
//!   action: relay
//!   group: outbound
//! - name: no-mail-from-this-host
//!   helo: ["*.bad.example"]
//!   action: reject
//!   reply: "550 5.7.1 Mail from this host is not accepted"
//! ```
//!
//! Conditions: `client` (CIDRs), `client_list` (named network lists: the
//! client matches when the list's most specific entry for it blocks it),
//! `sender_list` (named address lists), `auth` (`any`, `none`, or account names),
//! `helo` (patterns), `sender` and `recipient` (addresses, `@domain`,
//! patterns, and `<>` for the null sender), `recipient_kind` (`local_account`,
//! `list`, `unknown_local`, `relay_domain`, `foreign`), `tls` (true or false),
//! `dnsbl` (DNS blocklist zones of kind `ip`: the client is listed in one of
//! them) and `rhsbl` (zones of kind `domain`: the sender's domain is listed in
//! one of them; `<>` never matches).
//! A pattern is a shell-style wildcard (`*`, `?`) or, between slashes, a
//! regular expression; both match case-insensitively and whole values.
//!
//! Actions: `accept` spools the recipient for local routing; `relay` passes
//! it through to `group` (default: the domain's group, else the outbound
//! group); `reject` and `tempfail` reply with `reply` (defaults `550 5.7.1`
//! and `451 4.7.1`). In the reply of a rule with `dnsbl` or `rhsbl`,
//! `{reason}` becomes the listing's TXT text (or "listed in ZONE") and
//! `{zone}` the zone that listed the client or sender. An `accept` or
//! `relay` rule may name a rate limit class in `rate_limit`; the
//! recipients it decides are counted under that class.
//!
//! A named zone whose lookup failed counts as not listing anyone, unless the
//! zone has `on_error: tempfail`: then a rule that could only match through
//! that zone decides `451 4.4.3` instead of its action.
//!
//! Every problem is reported with its file and line, all at once.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ipnet::IpNet;
use regex::Regex;
use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::smtp::reply::{Enhanced, Reply};

use super::address::Address;
use super::dnsbl::{self, BlocklistZone, DnsblResults, Listing, OnError, ZoneKind};
use super::lists::{AddressList, NetworkList};

/// Longest reply text after `{reason}` and `{zone}` are filled in. A reply
/// line has at most 512 octets with its CRLF (RFC 5321 section 4.5.3.1.5),
/// and the codes in front take at most 14 of them.
const MAX_REPLY_TEXT: usize = 490;

/// Named lists, zones and rate limit classes that rules may refer to.
#[derive(Clone, Debug, Default)]
pub struct Lists {
    pub networks: HashMap<String, Arc<NetworkList>>,
    pub addresses: HashMap<String, Arc<AddressList>>,
    /// DNS blocklist zones by zone name.
    pub blocklists: HashMap<String, BlocklistZone>,
    /// Names of the rate limit classes under `rate_limits`.
    pub rate_limit_classes: HashSet<String>,
}

impl Lists {
    /// Entries in all network and address lists.
    pub fn entry_count(&self) -> usize {
        let networks: usize = self.networks.values().map(|list| list.len()).sum();
        let addresses: usize = self.addresses.values().map(|list| list.len()).sum();
        networks + addresses
    }
}

/// What the directory and configuration say about a recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RecipientKind {
    /// An address of an account in the directory.
    LocalAccount,
    /// The address of a distribution list.
    List,
    /// An address at a local or migrating domain that the directory lacks.
    UnknownLocal,
    /// An address at a relay domain, from the configuration or the directory.
    RelayDomain,
    /// Any other domain.
    Foreign,
    /// Not known yet: the directory is still loading.
    Unknown,
}

impl RecipientKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RecipientKind::LocalAccount => "local_account",
            RecipientKind::List => "list",
            RecipientKind::UnknownLocal => "unknown_local",
            RecipientKind::RelayDomain => "relay_domain",
            RecipientKind::Foreign => "foreign",
            RecipientKind::Unknown => "unknown",
        }
    }

    fn parse(text: &str) -> Option<RecipientKind> {
        Some(match text {
            "local_account" => RecipientKind::LocalAccount,
            "list" => RecipientKind::List,
            "unknown_local" => RecipientKind::UnknownLocal,
            "relay_domain" => RecipientKind::RelayDomain,
            "foreign" => RecipientKind::Foreign,
            _ => return None,
        })
    }
}

/// Everything a rule may look at for one recipient.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    pub client: IpAddr,
    pub helo: &'a str,
    /// Authenticated account name.
    pub auth: Option<&'a str>,
    pub tls: bool,
    /// Reverse-path; "" for `<>`.
    pub sender: &'a str,
    pub recipient: &'a Address,
    pub kind: RecipientKind,
    /// DNS blocklist results of the client and of the sender's domain.
    pub dnsbl: &'a DnsblResults,
}

/// What a matching rule does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuleAction {
    Accept,
    Relay { group: Option<String> },
    Reject(Reply),
    Tempfail(Reply),
}

/// Where a rule was written, for decisions and errors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleSource {
    pub file: PathBuf,
    pub line: u64,
}

#[derive(Clone, Debug)]
pub struct Rule {
    pub name: String,
    pub source: RuleSource,
    client: Option<Vec<IpNet>>,
    client_list: Option<Vec<Arc<NetworkList>>>,
    sender_list: Option<Vec<Arc<AddressList>>>,
    auth: Option<AuthMatch>,
    helo: Option<Vec<Pattern>>,
    sender: Option<Vec<AddressMatch>>,
    recipient: Option<Vec<AddressMatch>>,
    recipient_kind: Option<HashSet<RecipientKind>>,
    tls: Option<bool>,
    dnsbl: Option<Vec<ZoneCondition>>,
    rhsbl: Option<Vec<ZoneCondition>>,
    pub action: RuleAction,
    /// The rate limit class for the recipients this rule accepts or relays.
    pub rate_limit: Option<String>,
}

/// A blocklist zone named by a rule, with its error policy.
#[derive(Clone, Debug)]
struct ZoneCondition {
    zone: String,
    on_error: OnError,
}

/// The blocklist entry that made a rule match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedIn {
    pub zone: String,
    /// The sanitised TXT text, when the list published one.
    pub reason: Option<String>,
}

/// The first rule that decides a recipient.
#[derive(Clone, Debug)]
pub enum RuleMatch<'a> {
    /// Every condition holds. `listed` is the blocklist entry behind a
    /// `dnsbl` or `rhsbl` condition, the client's first.
    Matched {
        rule: &'a Rule,
        listed: Option<ListedIn>,
    },
    /// The other conditions hold, but a named zone with `on_error: tempfail`
    /// failed and no named zone lists the client or sender.
    BlocklistUnavailable { rule: &'a Rule, zone: String },
}

impl RuleMatch<'_> {
    pub fn rule(&self) -> &Rule {
        match self {
            RuleMatch::Matched { rule, .. } | RuleMatch::BlocklistUnavailable { rule, .. } => rule,
        }
    }
}

/// Outcome of one `dnsbl` or `rhsbl` condition.
enum ZoneOutcome {
    Listed(ListedIn),
    NotListed,
    /// A zone with `on_error: tempfail` failed.
    Unavailable(String),
}

/// Checks the zones of one condition: listed in any of them wins, then a
/// failed zone with `on_error: tempfail`. A zone without a result counts as
/// not listing.
fn check_zones(zones: &[ZoneCondition], results: &DnsblResults) -> ZoneOutcome {
    let mut unavailable = None;
    for condition in zones {
        match results.get(&condition.zone) {
            Some(Listing::Listed { reason }) => {
                return ZoneOutcome::Listed(ListedIn {
                    zone: condition.zone.clone(),
                    reason: reason.clone(),
                });
            }
            Some(Listing::Failed(_)) if condition.on_error == OnError::Tempfail => {
                unavailable.get_or_insert_with(|| condition.zone.clone());
            }
            Some(Listing::Failed(_) | Listing::NotListed) | None => {}
        }
    }
    match unavailable {
        Some(zone) => ZoneOutcome::Unavailable(zone),
        None => ZoneOutcome::NotListed,
    }
}

impl Rule {
    /// The reference written in logs and `wsmtp route`: `file:line name`.
    pub fn reference(&self) -> String {
        format!(
            "{}:{} {}",
            self.source.file.display(),
            self.source.line,
            self.name
        )
    }

    /// Checks every condition: the ones on the session and recipient first,
    /// then the blocklist conditions.
    fn evaluate(&self, facts: &Facts<'_>, recipient: &str) -> Option<RuleMatch<'_>> {
        if !self.matches_without_blocklists(facts, recipient) {
            return None;
        }
        let client = self
            .dnsbl
            .as_ref()
            .map(|zones| check_zones(zones, facts.dnsbl));
        let sender = self.rhsbl.as_ref().map(|zones| {
            if facts.sender.is_empty() {
                ZoneOutcome::NotListed
            } else {
                check_zones(zones, facts.dnsbl)
            }
        });
        let outcomes = [client, sender];
        if outcomes
            .iter()
            .any(|outcome| matches!(outcome, Some(ZoneOutcome::NotListed)))
        {
            return None;
        }
        let mut listed = None;
        for outcome in outcomes.into_iter().flatten() {
            match outcome {
                ZoneOutcome::Unavailable(zone) => {
                    return Some(RuleMatch::BlocklistUnavailable { rule: self, zone });
                }
                ZoneOutcome::Listed(entry) => {
                    listed.get_or_insert(entry);
                }
                ZoneOutcome::NotListed => {}
            }
        }
        Some(RuleMatch::Matched { rule: self, listed })
    }

    /// `recipient` is `facts.recipient` as written in SMTP, made once for
    /// all rules.
    fn matches_without_blocklists(&self, facts: &Facts<'_>, recipient: &str) -> bool {
        if let Some(networks) = &self.client
            && !networks.iter().any(|net| net.contains(&facts.client))
        {
            return false;
        }
        if let Some(lists) = &self.client_list
            && !lists.iter().any(|list| list.blocks(facts.client))
        {
            return false;
        }
        if let Some(lists) = &self.sender_list
            && (facts.sender.is_empty() || !lists.iter().any(|list| list.contains(facts.sender)))
        {
            return false;
        }
        if let Some(auth) = &self.auth
            && !auth.matches(facts.auth)
        {
            return false;
        }
        if let Some(patterns) = &self.helo
            && !patterns.iter().any(|p| p.is_match(facts.helo))
        {
            return false;
        }
        if let Some(senders) = &self.sender
            && !senders.iter().any(|m| m.matches_text(facts.sender))
        {
            return false;
        }
        if let Some(recipients) = &self.recipient
            && !recipients.iter().any(|m| m.matches_text(recipient))
        {
            return false;
        }
        if let Some(kinds) = &self.recipient_kind
            && !kinds.contains(&facts.kind)
        {
            return false;
        }
        if let Some(tls) = self.tls
            && tls != facts.tls
        {
            return false;
        }
        true
    }
}

#[derive(Clone, Debug)]
enum AuthMatch {
    Any,
    None,
    Accounts(HashSet<String>),
}

impl AuthMatch {
    fn matches(&self, auth: Option<&str>) -> bool {
        match (self, auth) {
            (AuthMatch::Any, Some(_)) => true,
            (AuthMatch::None, None) => true,
            (AuthMatch::Accounts(names), Some(name)) => names.contains(&name.to_lowercase()),
            _ => false,
        }
    }
}

#[derive(Clone, Debug)]
enum AddressMatch {
    Null,
    Exact(String),
    Domain(String),
    Pattern(Pattern),
}

impl AddressMatch {
    /// Matches an address written without angle brackets; "" is `<>`.
    fn matches_text(&self, address: &str) -> bool {
        match self {
            AddressMatch::Null => address.is_empty(),
            AddressMatch::Exact(expected) => {
                !address.is_empty() && address.eq_ignore_ascii_case(expected)
            }
            AddressMatch::Domain(domain) => address
                .rsplit_once('@')
                .is_some_and(|(_, d)| d.trim_end_matches('.').eq_ignore_ascii_case(domain)),
            AddressMatch::Pattern(pattern) => !address.is_empty() && pattern.is_match(address),
        }
    }
}

/// The rules of all files, in order.
#[derive(Clone, Debug, Default)]
pub struct RuleSet {
    rules: Vec<Rule>,
    files: Vec<PathBuf>,
    /// Blocklist zones named by any rule.
    zones: BTreeSet<String>,
}

/// A problem in a rules file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleProblem {
    pub file: PathBuf,
    pub line: u64,
    pub message: String,
}

impl std::fmt::Display for RuleProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
    }
}

type Text = Spanned<String>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Text,
    client: Option<Vec<Text>>,
    client_list: Option<Vec<Text>>,
    sender_list: Option<Vec<Text>>,
    auth: Option<Vec<Text>>,
    helo: Option<Vec<Text>>,
    sender: Option<Vec<Text>>,
    recipient: Option<Vec<Text>>,
    recipient_kind: Option<Vec<Text>>,
    tls: Option<bool>,
    dnsbl: Option<Vec<Text>>,
    rhsbl: Option<Vec<Text>>,
    action: Text,
    group: Option<Text>,
    reply: Option<Text>,
    rate_limit: Option<Text>,
}

impl RuleSet {
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The files read, in order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Returns the first rule that matches, or whose blocklist failed with
    /// `on_error: tempfail`, if any.
    // NOTE: rules are checked one by one, so the cost grows with their
    // number: about 0.36 ms per recipient at 10,000 rules (docs/benchmarks.md).
    pub fn first_match(&self, facts: &Facts<'_>) -> Option<RuleMatch<'_>> {
        let recipient = facts.recipient.to_smtp();
        self.rules
            .iter()
            .find_map(|rule| rule.evaluate(facts, &recipient))
    }

    /// Returns the blocklist zones that rules name, which are the only ones
    /// ever queried.
    pub fn blocklist_zones(&self) -> &BTreeSet<String> {
        &self.zones
    }

    /// Reads every `*.yaml` and `*.yml` file of `directory` in name order.
    /// `groups` are the configured downstream groups a `relay` rule may name.
    pub fn load(
        directory: &Path,
        groups: &HashSet<String>,
        lists: &Lists,
    ) -> Result<RuleSet, Vec<RuleProblem>> {
        let mut problems = Vec::new();
        let entries = std::fs::read_dir(directory).map_err(|error| {
            vec![RuleProblem {
                file: directory.to_path_buf(),
                line: 0,
                message: format!("cannot read the rules directory: {error}"),
            }]
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| {
                path.is_file()
                    && path
                        .extension()
                        .is_some_and(|ext| ext == "yaml" || ext == "yml")
            })
            .collect();
        files.sort();

        let mut set = RuleSet::default();
        let mut names: HashSet<String> = HashSet::new();
        for file in &files {
            let text = match std::fs::read_to_string(file) {
                Ok(text) => text,
                Err(error) => {
                    problems.push(RuleProblem {
                        file: file.clone(),
                        line: 0,
                        message: format!("cannot read: {error}"),
                    });
                    continue;
                }
            };
            set.parse_file(file, &text, groups, lists, &mut names, &mut problems);
        }
        set.files = files;
        if problems.is_empty() {
            Ok(set)
        } else {
            Err(problems)
        }
    }

    /// Parses one file's text; public for tests.
    pub fn parse_text(
        file: &Path,
        text: &str,
        groups: &HashSet<String>,
        lists: &Lists,
    ) -> Result<RuleSet, Vec<RuleProblem>> {
        let mut set = RuleSet::default();
        let mut problems = Vec::new();
        set.parse_file(
            file,
            text,
            groups,
            lists,
            &mut HashSet::new(),
            &mut problems,
        );
        set.files.push(file.to_path_buf());
        if problems.is_empty() {
            Ok(set)
        } else {
            Err(problems)
        }
    }

    fn parse_file(
        &mut self,
        file: &Path,
        text: &str,
        groups: &HashSet<String>,
        lists: &Lists,
        names: &mut HashSet<String>,
        problems: &mut Vec<RuleProblem>,
    ) {
        if text.trim().is_empty() {
            return;
        }
        let raw: Vec<RawRule> = match serde_saphyr::from_str(text) {
            Ok(raw) => raw,
            Err(error) => {
                let line = error.location().map(|l| l.line()).unwrap_or(0);
                let rendered = error.to_string();
                let message = rendered
                    .lines()
                    .next()
                    .unwrap_or("invalid YAML")
                    .to_string();
                problems.push(RuleProblem {
                    file: file.to_path_buf(),
                    line,
                    message: format!("{message} (a rules file is a list of rules)"),
                });
                return;
            }
        };
        for raw_rule in raw {
            let mut report = |line: u64, message: String| {
                problems.push(RuleProblem {
                    file: file.to_path_buf(),
                    line,
                    message,
                })
            };
            // Checked before the rule itself, so a reused name is reported
            // even when the rule has other problems.
            let name = raw_rule.name.value.trim().to_string();
            if !name.is_empty() && !names.insert(name.clone()) {
                report(
                    raw_rule.name.referenced.line(),
                    format!("rule name {name:?} is used twice"),
                );
            }
            if let Some(rule) = convert(file, raw_rule, groups, lists, &mut report) {
                for condition in rule.dnsbl.iter().chain(&rule.rhsbl).flatten() {
                    self.zones.insert(condition.zone.clone());
                }
                self.rules.push(rule);
            }
        }
    }
}

fn convert(
    file: &Path,
    raw: RawRule,
    groups: &HashSet<String>,
    lists: &Lists,
    report: &mut impl FnMut(u64, String),
) -> Option<Rule> {
    let line = raw.name.referenced.line();
    let mut ok = true;
    let name = raw.name.value.trim().to_string();
    if name.is_empty() {
        report(line, "a rule needs a name".to_string());
        ok = false;
    }

    let client = raw.client.map(|list| {
        list.iter()
            .filter_map(|text| {
                let value = text.value.trim();
                let parsed = value
                    .parse::<IpNet>()
                    .or_else(|_| value.parse::<IpAddr>().map(IpNet::from));
                match parsed {
                    Ok(net) => Some(net.trunc()),
                    Err(_) => {
                        report(
                            text.referenced.line(),
                            format!(
                                "invalid network {value:?}; write CIDR notation, e.g. 192.0.2.0/24"
                            ),
                        );
                        ok = false;
                        None
                    }
                }
            })
            .collect()
    });

    let client_list = raw.client_list.map(|names| {
        names
            .iter()
            .filter_map(|name| match lists.networks.get(name.value.trim()) {
                Some(list) => Some(Arc::clone(list)),
                None => {
                    report(
                        name.referenced.line(),
                        format!(
                            "unknown network list {:?}; define it under lists with kind networks",
                            name.value
                        ),
                    );
                    ok = false;
                    None
                }
            })
            .collect()
    });
    let sender_list = raw.sender_list.map(|names| {
        names
            .iter()
            .filter_map(|name| match lists.addresses.get(name.value.trim()) {
                Some(list) => Some(Arc::clone(list)),
                None => {
                    report(
                        name.referenced.line(),
                        format!(
                            "unknown address list {:?}; define it under lists with kind addresses",
                            name.value
                        ),
                    );
                    ok = false;
                    None
                }
            })
            .collect()
    });

    let auth = raw.auth.map(|list| {
        let values: Vec<String> = list.iter().map(|t| t.value.trim().to_lowercase()).collect();
        if values.iter().any(|v| v == "any") {
            AuthMatch::Any
        } else if values.iter().any(|v| v == "none") {
            AuthMatch::None
        } else {
            AuthMatch::Accounts(values.into_iter().collect())
        }
    });

    let mut patterns = |list: Option<Vec<Text>>, ok: &mut bool| {
        list.map(|list| {
            list.iter()
                .filter_map(|text| match compile_pattern(&text.value) {
                    Ok(regex) => Some(regex),
                    Err(message) => {
                        report(text.referenced.line(), message);
                        *ok = false;
                        None
                    }
                })
                .collect::<Vec<_>>()
        })
    };
    let helo = patterns(raw.helo, &mut ok);

    let mut addresses = |list: Option<Vec<Text>>, ok: &mut bool| {
        list.map(|list| {
            list.iter()
                .filter_map(|text| match address_match(&text.value) {
                    Ok(matcher) => Some(matcher),
                    Err(message) => {
                        report(text.referenced.line(), message);
                        *ok = false;
                        None
                    }
                })
                .collect::<Vec<_>>()
        })
    };
    let sender = addresses(raw.sender, &mut ok);
    let recipient = addresses(raw.recipient, &mut ok);

    let recipient_kind = raw.recipient_kind.map(|list| {
        list.iter()
            .filter_map(|text| match RecipientKind::parse(text.value.trim()) {
                Some(kind) => Some(kind),
                None => {
                    report(
                        text.referenced.line(),
                        format!(
                            "unknown recipient kind {:?}; use local_account, list, unknown_local, relay_domain or foreign",
                            text.value
                        ),
                    );
                    ok = false;
                    None
                }
            })
            .collect()
    });

    let mut zones = |list: Option<Vec<Text>>, kind: ZoneKind, ok: &mut bool| {
        list.map(|list| {
            list.iter()
                .filter_map(|text| match zone_condition(&text.value, kind, lists) {
                    Ok(condition) => Some(condition),
                    Err(message) => {
                        report(text.referenced.line(), message);
                        *ok = false;
                        None
                    }
                })
                .collect::<Vec<_>>()
        })
    };
    let dnsbl = zones(raw.dnsbl, ZoneKind::Ip, &mut ok);
    let rhsbl = zones(raw.rhsbl, ZoneKind::Domain, &mut ok);
    if let Some(reply) = &raw.reply
        && (reply.value.contains("{reason}") || reply.value.contains("{zone}"))
        && dnsbl.is_none()
        && rhsbl.is_none()
    {
        report(
            reply.referenced.line(),
            "{reason} and {zone} are only filled in for rules with a dnsbl or rhsbl condition"
                .to_string(),
        );
        ok = false;
    }

    let action_line = raw.action.referenced.line();
    let reply = |default: Reply, class: u16, report: &mut dyn FnMut(u64, String)| match &raw.reply {
        None => Some(default),
        Some(text) => match parse_reply(&text.value, class) {
            Ok(reply) => Some(reply),
            Err(message) => {
                report(text.referenced.line(), message);
                None
            }
        },
    };
    let action = match raw.action.value.trim() {
        "accept" => Some(RuleAction::Accept),
        "relay" => {
            if let Some(group) = &raw.group
                && !groups.contains(&group.value)
            {
                report(
                    group.referenced.line(),
                    format!(
                        "unknown downstream group {:?}; define it under downstream_groups",
                        group.value
                    ),
                );
                ok = false;
            }
            Some(RuleAction::Relay {
                group: raw.group.as_ref().map(|g| g.value.clone()),
            })
        }
        "reject" => reply(Reply::relay_denied(), 5, report).map(RuleAction::Reject),
        "tempfail" => reply(Reply::rule_tempfail(), 4, report).map(RuleAction::Tempfail),
        other => {
            report(
                action_line,
                format!("unknown action {other:?}; use accept, relay, reject or tempfail"),
            );
            None
        }
    };
    if raw.group.is_some() && !matches!(action, Some(RuleAction::Relay { .. })) {
        report(
            action_line,
            "group is only used with action relay".to_string(),
        );
        ok = false;
    }
    // Judged by the action's name: a reject whose reply is invalid has no
    // action value, and its reply error is reported already.
    if raw.reply.is_some() && !matches!(raw.action.value.trim(), "reject" | "tempfail") {
        report(
            action_line,
            "reply is only used with actions reject and tempfail".to_string(),
        );
        ok = false;
    }
    let rate_limit = match &raw.rate_limit {
        None => None,
        Some(class) => {
            let name = class.value.trim().to_string();
            if !lists.rate_limit_classes.contains(&name) {
                report(
                    class.referenced.line(),
                    format!("unknown rate limit class {name:?}; define it under rate_limits"),
                );
                ok = false;
            }
            if !matches!(action, Some(RuleAction::Accept | RuleAction::Relay { .. })) {
                report(
                    class.referenced.line(),
                    "rate_limit is only used with actions accept and relay".to_string(),
                );
                ok = false;
            }
            Some(name)
        }
    };
    let action = action?;
    if !ok {
        return None;
    }
    Some(Rule {
        name,
        source: RuleSource {
            file: file.to_path_buf(),
            line,
        },
        client,
        client_list,
        sender_list,
        auth,
        helo,
        sender,
        recipient,
        recipient_kind,
        tls: raw.tls,
        dnsbl,
        rhsbl,
        action,
        rate_limit,
    })
}

/// Resolves a zone named in a `dnsbl` (kind ip) or `rhsbl` (kind domain)
/// condition.
fn zone_condition(text: &str, kind: ZoneKind, lists: &Lists) -> Result<ZoneCondition, String> {
    // Zones are configured as lowercase A-labels without a trailing dot.
    let name = match super::address::Domain::parse(text.trim()) {
        Ok(super::address::Domain::Name(name)) => name,
        _ => text.trim().to_ascii_lowercase(),
    };
    let key = match kind {
        ZoneKind::Ip => "dnsbl",
        ZoneKind::Domain => "rhsbl",
    };
    let Some(zone) = lists.blocklists.get(&name) else {
        return Err(format!(
            "unknown DNS blocklist zone {text:?}; define it under dnsbl with kind {}",
            kind.as_str()
        ));
    };
    if zone.kind != kind {
        return Err(format!(
            "zone {name} has kind {}, but {key} needs a zone of kind {}",
            zone.kind.as_str(),
            kind.as_str()
        ));
    }
    Ok(ZoneCondition {
        zone: name,
        on_error: zone.on_error,
    })
}

/// Fills `{reason}` and `{zone}` in the text of a matched rule's reply. The
/// reason is the list's TXT text, or "listed in ZONE" without one. Text that
/// a value brings in is not scanned again, so a TXT record cannot inject a
/// placeholder.
pub fn fill_reply(reply: &Reply, listed: &ListedIn) -> Reply {
    let Some(template) = reply.lines().first() else {
        return reply.clone();
    };
    if !template.contains('{') {
        return reply.clone();
    }
    let zone = dnsbl::sanitise(&listed.zone, MAX_REPLY_TEXT);
    let reason = match &listed.reason {
        Some(reason) => dnsbl::sanitise(reason, dnsbl::MAX_REASON_LENGTH),
        None => format!("listed in {zone}"),
    };
    let mut text = String::new();
    let mut rest = template.as_str();
    while let Some(start) = rest.find('{') {
        text.push_str(&rest[..start]);
        let tail = &rest[start..];
        if let Some(after) = tail.strip_prefix("{reason}") {
            text.push_str(&reason);
            rest = after;
        } else if let Some(after) = tail.strip_prefix("{zone}") {
            text.push_str(&zone);
            rest = after;
        } else {
            text.push('{');
            rest = &tail[1..];
        }
    }
    text.push_str(rest);
    let text = dnsbl::sanitise(&text, MAX_REPLY_TEXT);
    let enhanced = reply
        .enhanced()
        .unwrap_or(Enhanced((reply.code() / 100) as u8, 0, 0));
    Reply::configured(reply.code(), enhanced, &text)
}

/// A wildcard or `/regex/` pattern that must match a whole value,
/// case-insensitively.
#[derive(Clone, Debug)]
struct Pattern {
    regex: Regex,
    /// The same test without the regex engine, for a wildcard whose only
    /// `*` are at its ends and which has no `?`: the literal part in
    /// lowercase ASCII.
    literal: Option<Literal>,
}

#[derive(Clone, Debug)]
enum Literal {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
}

impl Pattern {
    fn is_match(&self, value: &str) -> bool {
        // For an ASCII value and an ASCII literal, the regex's Unicode case
        // folding is ASCII case folding, so both tests agree.
        match &self.literal {
            // `.*` in the regex stops at a line feed; the literal test would not.
            Some(literal) if value.is_ascii() && !value.contains('\n') => {
                let value = value.as_bytes();
                match literal {
                    Literal::Exact(text) => value.eq_ignore_ascii_case(text.as_bytes()),
                    Literal::Prefix(text) => {
                        value.len() >= text.len()
                            && value[..text.len()].eq_ignore_ascii_case(text.as_bytes())
                    }
                    Literal::Suffix(text) => {
                        value.len() >= text.len()
                            && value[value.len() - text.len()..]
                                .eq_ignore_ascii_case(text.as_bytes())
                    }
                    Literal::Contains(text) => {
                        value
                            .windows(text.len().max(1))
                            .any(|window| window.eq_ignore_ascii_case(text.as_bytes()))
                            || text.is_empty()
                    }
                }
            }
            _ => self.regex.is_match(value),
        }
    }
}

/// Returns the literal form of a wildcard, when it has one.
fn literal_of(wildcard: &str) -> Option<Literal> {
    if !wildcard.is_ascii() || wildcard.contains('?') {
        return None;
    }
    let starts = wildcard.starts_with('*');
    let inner = wildcard.trim_start_matches('*');
    let ends = inner.ends_with('*');
    let inner = inner.trim_end_matches('*');
    if inner.contains('*') {
        return None;
    }
    let text = inner.to_ascii_lowercase();
    Some(match (starts, ends) {
        (false, false) => Literal::Exact(text),
        (false, true) => Literal::Prefix(text),
        (true, false) => Literal::Suffix(text),
        (true, true) => Literal::Contains(text),
    })
}

/// Compiles a wildcard or `/regex/` pattern that must match a whole value,
/// case-insensitively.
fn compile_pattern(text: &str) -> Result<Pattern, String> {
    let text = text.trim();
    let source = if let Some(inner) = text
        .strip_prefix('/')
        .and_then(|rest| rest.strip_suffix('/'))
        .filter(|inner| !inner.is_empty())
    {
        format!("(?i)^(?:{inner})$")
    } else {
        let mut source = String::from("(?i)^");
        for c in text.chars() {
            match c {
                '*' => source.push_str(".*"),
                '?' => source.push('.'),
                other => source.push_str(&regex::escape(&other.to_string())),
            }
        }
        source.push('$');
        source
    };
    let regex =
        Regex::new(&source).map_err(|error| format!("invalid pattern {text:?}: {error}"))?;
    let is_regex = text.starts_with('/') && text.ends_with('/') && text.len() > 2;
    Ok(Pattern {
        regex,
        literal: if is_regex { None } else { literal_of(text) },
    })
}

fn address_match(text: &str) -> Result<AddressMatch, String> {
    let value = text.trim();
    if value == "<>" {
        return Ok(AddressMatch::Null);
    }
    let value = value.trim_start_matches('<').trim_end_matches('>');
    if let Some(domain) = value.strip_prefix('@')
        && !domain.contains(['*', '?', '/'])
    {
        return match super::address::Domain::parse(domain) {
            Ok(super::address::Domain::Name(name)) => Ok(AddressMatch::Domain(name)),
            _ => Err(format!("invalid domain in {text:?}")),
        };
    }
    if value.contains(['*', '?']) || (value.starts_with('/') && value.ends_with('/')) {
        return compile_pattern(value).map(AddressMatch::Pattern);
    }
    match Address::parse(value) {
        Ok(address) => Ok(AddressMatch::Exact(address.to_smtp())),
        Err(error) => Err(format!("invalid address {text:?}: {error}")),
    }
}

/// Parses "550 5.7.1 text": a basic code of the class the action needs, an
/// enhanced code of the same class, and text.
fn parse_reply(text: &str, class: u16) -> Result<Reply, String> {
    let invalid = || {
        format!(
            "invalid reply {text:?}; write e.g. \"{}50 {}.7.1 explanation\"",
            class, class
        )
    };
    let mut parts = text.trim().splitn(3, ' ');
    let code: u16 = parts
        .next()
        .and_then(|c| c.parse().ok())
        .ok_or_else(invalid)?;
    if code / 100 != class || code % 100 > 59 {
        return Err(invalid());
    }
    let enhanced = parts.next().ok_or_else(invalid)?;
    let numbers: Vec<u16> = enhanced
        .split('.')
        .map(|n| n.parse().ok())
        .collect::<Option<Vec<u16>>>()
        .ok_or_else(invalid)?;
    if numbers.len() != 3 || numbers[0] != class || numbers[1] > 999 || numbers[2] > 999 {
        return Err(invalid());
    }
    let explanation = parts.next().unwrap_or("").trim();
    if explanation.is_empty() || explanation.chars().any(|c| c.is_control()) {
        return Err(format!(
            "{}: the text must be one line and not empty",
            invalid()
        ));
    }
    Ok(Reply::configured(
        code,
        Enhanced(class as u8, numbers[1], numbers[2]),
        explanation,
    ))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn lists() -> Lists {
        let mut lists = Lists::default();
        for (zone, kind, on_error) in [
            ("a.test", ZoneKind::Ip, OnError::Tempfail),
            ("b.test", ZoneKind::Ip, OnError::Ignore),
            ("d.test", ZoneKind::Domain, OnError::Ignore),
        ] {
            lists.blocklists.insert(
                zone.to_string(),
                BlocklistZone {
                    zone: zone.to_string(),
                    kind,
                    timeout: Duration::from_secs(1),
                    on_error,
                },
            );
        }
        lists
    }

    const RULES: &str = "\
- name: either-list
  dnsbl: [a.test, b.test]
  action: reject
  reply: \"554 5.7.1 {zone}: {reason} {unknown}\"
- name: client-and-sender
  dnsbl: [a.test]
  rhsbl: [d.test]
  action: tempfail
";

    fn results(entries: &[(&str, Listing)]) -> DnsblResults {
        entries
            .iter()
            .map(|(zone, listing)| (zone.to_string(), listing.clone()))
            .collect()
    }

    /// Returns the name of the deciding rule, with "unavailable:ZONE" for a
    /// blocklist failure and the filled reply for a match.
    fn first(results: &DnsblResults, sender: &str) -> Option<String> {
        first_in(RULES, results, sender)
    }

    fn first_in(rules: &str, results: &DnsblResults, sender: &str) -> Option<String> {
        let set = RuleSet::parse_text(Path::new("rules.yaml"), rules, &HashSet::new(), &lists())
            .expect("valid rules");
        let recipient = Address::parse("bob@example.net").expect("recipient");
        let facts = Facts {
            client: "192.0.2.1".parse().expect("ip"),
            helo: "client.example",
            auth: None,
            tls: false,
            sender,
            recipient: &recipient,
            kind: RecipientKind::Foreign,
            dnsbl: results,
        };
        set.first_match(&facts).map(|found| match found {
            RuleMatch::BlocklistUnavailable { rule, zone } => {
                format!("{} unavailable:{zone}", rule.name)
            }
            RuleMatch::Matched {
                rule,
                listed: Some(listed),
            } => match &rule.action {
                RuleAction::Reject(reply) | RuleAction::Tempfail(reply) => {
                    format!("{} {}", rule.name, fill_reply(reply, &listed).summary())
                }
                other => format!("{} {other:?}", rule.name),
            },
            RuleMatch::Matched { rule, listed: None } => rule.name.clone(),
        })
    }

    fn listed(reason: Option<&str>) -> Listing {
        Listing::Listed {
            reason: reason.map(str::to_string),
        }
    }

    #[test]
    fn listed_zone_wins_over_failed_zone() {
        let found = first(
            &results(&[
                ("a.test", Listing::Failed("timed out".into())),
                ("b.test", listed(Some("bad host"))),
            ]),
            "a@example.org",
        );
        assert_eq!(
            found.as_deref(),
            Some("either-list 554 5.7.1 b.test: bad host {unknown}")
        );
    }

    #[test]
    fn failed_tempfail_zone_decides() {
        let found = first(
            &results(&[
                ("a.test", Listing::Failed("timed out".into())),
                ("b.test", Listing::NotListed),
            ]),
            "a@example.org",
        );
        assert_eq!(found.as_deref(), Some("either-list unavailable:a.test"));
    }

    #[test]
    fn failed_ignore_zone_is_not_listed() {
        let found = first(
            &results(&[
                ("a.test", Listing::NotListed),
                ("b.test", Listing::Failed("SERVFAIL".into())),
            ]),
            "a@example.org",
        );
        assert_eq!(found, None);
    }

    #[test]
    fn unlisted_condition_beats_failed_one() {
        // Without a.test in the first rule, only client-and-sender names it,
        // and that rule needs the sender listed as well.
        let rules = RULES.replace("dnsbl: [a.test, b.test]", "dnsbl: [b.test]");
        let sender_clean = results(&[
            ("a.test", Listing::Failed("timed out".into())),
            ("b.test", Listing::NotListed),
            ("d.test", Listing::NotListed),
        ]);
        assert_eq!(first_in(&rules, &sender_clean, "a@example.org"), None);

        let sender_listed = results(&[
            ("a.test", Listing::Failed("timed out".into())),
            ("b.test", Listing::NotListed),
            ("d.test", listed(None)),
        ]);
        assert_eq!(
            first_in(&rules, &sender_listed, "a@spam.example").as_deref(),
            Some("client-and-sender unavailable:a.test")
        );
        assert_eq!(
            first_in(&rules, &sender_listed, "").as_deref(),
            None,
            "rhsbl never matches <>"
        );

        let both_listed = results(&[("a.test", listed(None)), ("d.test", listed(None))]);
        assert_eq!(
            first_in(&rules, &both_listed, "a@spam.example").as_deref(),
            Some("client-and-sender 451 4.7.1 Try again later")
        );
    }

    #[test]
    fn wildcard_fast_path_agrees_with_regex() {
        let patterns = [
            "*.bad.example",
            "mail*",
            "*spam*",
            "localhost.localdomain",
            "*",
            "*@Sender1.EXAMPLE",
            "a*b",
            "h?st.example",
        ];
        let values = [
            "host.bad.example",
            "HOST.BAD.EXAMPLE",
            "bad.example",
            "mail.example",
            "MAILER",
            "xspamx",
            "spam",
            "localhost.localdomain",
            "LocalHost.LocalDomain",
            "",
            "x@sender1.example",
            "x@sender1.example.org",
            "ab",
            "axxb",
            "host.example",
            "ho\u{17f}t.bad.example",
            "\u{212a}.bad.example",
            "line\nfeed.bad.example",
        ];
        for pattern in patterns {
            let compiled = compile_pattern(pattern).expect("valid pattern");
            for value in values {
                assert_eq!(
                    compiled.is_match(value),
                    compiled.regex.is_match(value),
                    "{pattern} against {value:?}"
                );
            }
        }
        assert!(
            compile_pattern("*.bad.example")
                .expect("valid")
                .literal
                .is_some()
        );
        assert!(compile_pattern("a*b").expect("valid").literal.is_none());
        assert!(
            compile_pattern("/.*bad.*/")
                .expect("valid")
                .literal
                .is_none()
        );
    }

    #[test]
    fn fill_reply_keeps_one_line() {
        let reply = parse_reply("550 5.7.1 Blocked: {reason}", 5).expect("reply");
        let listed = ListedIn {
            zone: "a.test".to_string(),
            reason: Some("line one\r\n550 fake {zone}".to_string()),
        };
        let filled = fill_reply(&reply, &listed);
        assert_eq!(filled.lines().len(), 1);
        assert_eq!(
            filled.summary(),
            "550 5.7.1 Blocked: line one??550 fake {zone}"
        );
    }
}
