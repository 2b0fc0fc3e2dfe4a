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
//! `list`, `unknown_local`, `relay_domain`, `foreign`), `tls` (true or false).
//! A pattern is a shell-style wildcard (`*`, `?`) or, between slashes, a
//! regular expression; both match case-insensitively and whole values.
//!
//! Actions: `accept` spools the recipient for local routing; `relay` passes
//! it through to `group` (default: the domain's group, else the outbound
//! group); `reject` and `tempfail` reply with `reply` (defaults `550 5.7.1`
//! and `451 4.7.1`).
//!
//! Every problem is reported with its file and line, all at once.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ipnet::IpNet;
use regex::Regex;
use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::smtp::reply::{Enhanced, Reply};

use super::address::Address;
use super::lists::{AddressList, NetworkList};

/// Named lists that rules may refer to.
#[derive(Clone, Debug, Default)]
pub struct Lists {
    pub networks: HashMap<String, Arc<NetworkList>>,
    pub addresses: HashMap<String, Arc<AddressList>>,
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
    helo: Option<Vec<Regex>>,
    sender: Option<Vec<AddressMatch>>,
    recipient: Option<Vec<AddressMatch>>,
    recipient_kind: Option<HashSet<RecipientKind>>,
    tls: Option<bool>,
    pub action: RuleAction,
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

    fn matches(&self, facts: &Facts<'_>) -> bool {
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
        if let Some(recipients) = &self.recipient {
            let text = facts.recipient.to_smtp();
            if !recipients.iter().any(|m| m.matches_text(&text)) {
                return false;
            }
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
    Pattern(Regex),
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
    action: Text,
    group: Option<Text>,
    reply: Option<Text>,
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

    /// The first rule that matches, if any.
    pub fn first_match(&self, facts: &Facts<'_>) -> Option<&Rule> {
        self.rules.iter().find(|rule| rule.matches(facts))
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
            if let Some(rule) = convert(file, raw_rule, groups, lists, &mut report) {
                if !names.insert(rule.name.clone()) {
                    report(
                        rule.source.line,
                        format!("rule name {:?} is used twice", rule.name),
                    );
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
    if raw.reply.is_some()
        && !matches!(
            action,
            Some(RuleAction::Reject(_) | RuleAction::Tempfail(_))
        )
    {
        report(
            action_line,
            "reply is only used with actions reject and tempfail".to_string(),
        );
        ok = false;
    }
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
        action,
    })
}

/// Compiles a wildcard or `/regex/` pattern that must match a whole value,
/// case-insensitively.
fn compile_pattern(text: &str) -> Result<Regex, String> {
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
    Regex::new(&source).map_err(|error| format!("invalid pattern {text:?}: {error}"))
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
