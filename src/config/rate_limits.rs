//! Rate limit classes: the top-level `rate_limits` mapping of class name to
//! limits.
//!
//! ```yaml
//! rate_limits:
//!   default:
//!     connections_per_ip: 60/1m
//!     messages_per_sender: 100/1h
//!   customers:
//!     networks: [10.20.0.0/16]
//!     max_connections_per_ip: 50
//!     messages_per_sender: 1000/1h
//!     recipients_per_ip: none
//! ```
//!
//! A rate is written `COUNT/WINDOW`. A class inherits every limit it does
//! not set from `default`, and `none` lifts a limit in that class. The
//! `default` class always exists: without the key it only has
//! `limits.max_connections_per_ip`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use serde_saphyr::Spanned;

use super::{Checker, Text, parse_duration, parse_network};

/// Name of the class that applies where no other class does.
pub const DEFAULT_CLASS: &str = "default";

const MIN_WINDOW: Duration = Duration::from_secs(1);
const MAX_WINDOW: Duration = Duration::from_secs(7 * 86_400);
const MAX_COUNT: u32 = 10_000_000;

/// A rate: at most `count` events in any `window`. governor enforces it
/// with GCRA: `count` events may come at once, and after that one more is
/// allowed every `window / count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub count: NonZeroU32,
    pub window: Duration,
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let seconds = self.window.as_secs();
        let window = if self.window.subsec_nanos() != 0 {
            format!("{}ms", self.window.as_millis())
        } else if seconds.is_multiple_of(86_400) {
            format!("{}d", seconds / 86_400)
        } else if seconds.is_multiple_of(3600) {
            format!("{}h", seconds / 3600)
        } else if seconds.is_multiple_of(60) {
            format!("{}m", seconds / 60)
        } else {
            format!("{seconds}s")
        };
        write!(f, "{}/{window}", self.count)
    }
}

/// The rate limits a class may set, named as in the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RateLimitName {
    /// New connections per client IP (IPv6: per /64).
    ConnectionsPerIp,
    MessagesPerIp,
    RecipientsPerIp,
    /// Per envelope sender address; the null sender `<>` is not counted.
    MessagesPerSender,
    RecipientsPerSender,
    /// Per account that authenticated with SMTP AUTH.
    MessagesPerUser,
    RecipientsPerUser,
}

impl RateLimitName {
    pub const ALL: [RateLimitName; 7] = [
        RateLimitName::ConnectionsPerIp,
        RateLimitName::MessagesPerIp,
        RateLimitName::RecipientsPerIp,
        RateLimitName::MessagesPerSender,
        RateLimitName::RecipientsPerSender,
        RateLimitName::MessagesPerUser,
        RateLimitName::RecipientsPerUser,
    ];

    /// Returns the configuration key, also used in log lines.
    pub fn as_str(self) -> &'static str {
        match self {
            RateLimitName::ConnectionsPerIp => "connections_per_ip",
            RateLimitName::MessagesPerIp => "messages_per_ip",
            RateLimitName::RecipientsPerIp => "recipients_per_ip",
            RateLimitName::MessagesPerSender => "messages_per_sender",
            RateLimitName::RecipientsPerSender => "recipients_per_sender",
            RateLimitName::MessagesPerUser => "messages_per_user",
            RateLimitName::RecipientsPerUser => "recipients_per_user",
        }
    }
}

/// One class with every limit resolved: its own values, else the default
/// class's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateClass {
    pub name: String,
    /// Clients in these networks get this class for their connections, and
    /// for their recipients unless a rule names another class.
    pub networks: Vec<IpNet>,
    /// Open connections per client IP (IPv6: per /64).
    pub max_connections_per_ip: usize,
    /// The rate of each limit; None means no limit.
    pub rates: BTreeMap<RateLimitName, Rate>,
}

impl RateClass {
    pub fn rate(&self, name: RateLimitName) -> Option<Rate> {
        self.rates.get(&name).copied()
    }
}

/// Every class, `default` included.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimitsConfig {
    pub classes: BTreeMap<String, RateClass>,
}

impl RateLimitsConfig {
    /// Returns the classes without the `rate_limits` key: `default` with
    /// the connection limit per IP and no rates.
    pub fn only_default(max_connections_per_ip: usize) -> RateLimitsConfig {
        let default = RateClass {
            name: DEFAULT_CLASS.to_string(),
            networks: Vec::new(),
            max_connections_per_ip,
            rates: BTreeMap::new(),
        };
        RateLimitsConfig {
            classes: BTreeMap::from([(DEFAULT_CLASS.to_string(), default)]),
        }
    }

    pub fn default_class(&self) -> &RateClass {
        &self.classes[DEFAULT_CLASS]
    }

    /// Returns the class of a connection from `client`: the class with the
    /// most specific network that contains it, else `default`.
    pub fn class_for_client(&self, client: IpAddr) -> &RateClass {
        let client = client.to_canonical();
        self.classes
            .values()
            .flat_map(|class| class.networks.iter().map(move |network| (network, class)))
            .filter(|(network, _)| network.contains(&client))
            .max_by_key(|(network, _)| network.prefix_len())
            .map(|(_, class)| class)
            .unwrap_or_else(|| self.default_class())
    }
}

impl std::fmt::Display for RateClass {
    /// Writes the class's name and limits, e.g.
    /// `customers (max_connections_per_ip 50, messages_per_sender 1000/1h)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (max_connections_per_ip {}",
            self.name, self.max_connections_per_ip
        )?;
        for (name, rate) in &self.rates {
            write!(f, ", {} {rate}", name.as_str())?;
        }
        write!(f, ")")
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateClass {
    #[serde(default)]
    networks: Vec<Text>,
    max_connections_per_ip: Option<Spanned<u64>>,
    connections_per_ip: Option<Text>,
    messages_per_ip: Option<Text>,
    recipients_per_ip: Option<Text>,
    messages_per_sender: Option<Text>,
    recipients_per_sender: Option<Text>,
    messages_per_user: Option<Text>,
    recipients_per_user: Option<Text>,
}

impl RawRateClass {
    fn rate_text(&self, name: RateLimitName) -> Option<&Text> {
        match name {
            RateLimitName::ConnectionsPerIp => self.connections_per_ip.as_ref(),
            RateLimitName::MessagesPerIp => self.messages_per_ip.as_ref(),
            RateLimitName::RecipientsPerIp => self.recipients_per_ip.as_ref(),
            RateLimitName::MessagesPerSender => self.messages_per_sender.as_ref(),
            RateLimitName::RecipientsPerSender => self.recipients_per_sender.as_ref(),
            RateLimitName::MessagesPerUser => self.messages_per_user.as_ref(),
            RateLimitName::RecipientsPerUser => self.recipients_per_user.as_ref(),
        }
    }
}

/// One class as written, before it inherits from `default`.
struct WrittenClass {
    networks: Vec<IpNet>,
    max_connections: Option<usize>,
    rates: BTreeMap<RateLimitName, Written>,
}

/// A limit as written in one class: not set, `none`, or a rate.
enum Written {
    Unset,
    Unlimited,
    Limited(Rate),
}

/// Parses `COUNT/WINDOW` such as `100/1m`; a window without a number, such
/// as `100/h`, means one of that unit.
pub fn parse_rate(text: &str) -> Result<Rate, String> {
    let invalid = || format!("invalid rate {text:?}; write COUNT/WINDOW, e.g. 100/1m or 5000/1d");
    let (count, window) = text.trim().split_once('/').ok_or_else(invalid)?;
    let count: u32 = count.trim().parse().map_err(|_| invalid())?;
    let window = window.trim();
    let window = if window.starts_with(|c: char| c.is_ascii_alphabetic()) {
        parse_duration(&format!("1{window}"))
    } else {
        parse_duration(window)
    }
    .ok_or_else(invalid)?;
    if count == 0 || count > MAX_COUNT {
        return Err(format!(
            "the count of {text:?} is out of range 1..={MAX_COUNT}; write none for no limit"
        ));
    }
    if !(MIN_WINDOW..=MAX_WINDOW).contains(&window) {
        return Err(format!("the window of {text:?} is out of range 1s..=7d"));
    }
    Ok(Rate {
        count: NonZeroU32::new(count).ok_or_else(invalid)?,
        window,
    })
}

/// Converts `rate_limits`. `max_connections_per_ip` is the value of
/// `limits.max_connections_per_ip`, and `limits_sets_it` is true when the
/// file set it there.
pub(super) fn convert_rate_limits(
    raw: &BTreeMap<String, Spanned<RawRateClass>>,
    max_connections_per_ip: usize,
    limits_sets_it: bool,
    checker: &mut Checker,
) -> RateLimitsConfig {
    let mut written: BTreeMap<String, WrittenClass> = BTreeMap::new();
    let mut claimed_networks: BTreeMap<IpNet, String> = BTreeMap::new();
    for (name, class) in raw {
        let line = class.referenced.line();
        let class = &class.value;
        let path = format!("rate_limits.{name}");
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            checker.problem(
                path.clone(),
                line,
                format!("invalid class name {name:?}; use letters, digits, '-' and '_'"),
            );
        }

        let mut networks = Vec::new();
        for (index, network) in class.networks.iter().enumerate() {
            let network_path = format!("{path}.networks[{index}]");
            let Some(net) = parse_network(&network.value) else {
                checker.problem(
                    network_path,
                    network.referenced.line(),
                    format!(
                        "invalid network {:?}; write CIDR notation, e.g. 192.0.2.0/24",
                        network.value.trim()
                    ),
                );
                continue;
            };
            if let Some(other) = claimed_networks.insert(net, name.clone()) {
                checker.problem(
                    network_path,
                    network.referenced.line(),
                    format!("network {net} is already in class {other:?}"),
                );
                continue;
            }
            networks.push(net);
        }
        if name == DEFAULT_CLASS && !class.networks.is_empty() {
            checker.problem(
                format!("{path}.networks"),
                line,
                "the default class applies to every client outside other classes' networks; remove networks here",
            );
        }

        let max_connections = class.max_connections_per_ip.as_ref().map(|_| {
            checker.bounded(
                &format!("{path}.max_connections_per_ip"),
                &class.max_connections_per_ip,
                max_connections_per_ip as u64,
                1,
                1_000_000,
            ) as usize
        });
        if name == DEFAULT_CLASS
            && limits_sets_it
            && let Some(value) = &class.max_connections_per_ip
        {
            checker.problem(
                format!("{path}.max_connections_per_ip"),
                value.referenced.line(),
                "limits.max_connections_per_ip sets the same limit; keep one of them",
            );
        }

        let mut rates = BTreeMap::new();
        for limit in RateLimitName::ALL {
            let value = match class.rate_text(limit) {
                None => Written::Unset,
                Some(text) if text.value.trim() == "none" => Written::Unlimited,
                Some(text) => match parse_rate(&text.value) {
                    Ok(rate) => Written::Limited(rate),
                    Err(message) => {
                        checker.problem(
                            format!("{path}.{}", limit.as_str()),
                            text.referenced.line(),
                            message,
                        );
                        Written::Unset
                    }
                },
            };
            rates.insert(limit, value);
        }
        written.insert(
            name.clone(),
            WrittenClass {
                networks,
                max_connections,
                rates,
            },
        );
    }

    let (default_max, default_rates) = match written.remove(DEFAULT_CLASS) {
        Some(class) => (
            class.max_connections.unwrap_or(max_connections_per_ip),
            class.rates,
        ),
        None => (max_connections_per_ip, BTreeMap::new()),
    };
    let resolve = |rates: &BTreeMap<RateLimitName, Written>, inherit: bool| {
        let mut resolved = BTreeMap::new();
        for limit in RateLimitName::ALL {
            let own = rates.get(&limit).unwrap_or(&Written::Unset);
            let value = match (own, inherit) {
                (Written::Limited(rate), _) => Some(*rate),
                (Written::Unlimited, _) => None,
                (Written::Unset, true) => match default_rates.get(&limit) {
                    Some(Written::Limited(rate)) => Some(*rate),
                    _ => None,
                },
                (Written::Unset, false) => None,
            };
            if let Some(rate) = value {
                resolved.insert(limit, rate);
            }
        }
        resolved
    };

    let mut classes = BTreeMap::new();
    classes.insert(
        DEFAULT_CLASS.to_string(),
        RateClass {
            name: DEFAULT_CLASS.to_string(),
            networks: Vec::new(),
            max_connections_per_ip: default_max,
            rates: resolve(&default_rates, false),
        },
    );
    for (name, class) in &written {
        classes.insert(
            name.clone(),
            RateClass {
                name: name.clone(),
                networks: class.networks.clone(),
                max_connections_per_ip: class.max_connections.unwrap_or(default_max),
                rates: resolve(&class.rates, true),
            },
        );
    }
    RateLimitsConfig { classes }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn rates_parse() {
        let rate = parse_rate("100/1m").expect("valid");
        assert_eq!(rate.count.get(), 100);
        assert_eq!(rate.window, Duration::from_secs(60));
        assert_eq!(rate.to_string(), "100/1m");
        assert_eq!(
            parse_rate("5/h").expect("valid").window,
            Duration::from_secs(3600)
        );
        assert_eq!(parse_rate(" 3 / 2s ").expect("valid").to_string(), "3/2s");
        assert_eq!(parse_rate("10/1d").expect("valid").to_string(), "10/1d");
        for invalid in [
            "100", "0/1m", "x/1m", "10/soon", "10/500ms", "10/30d", "/1m",
        ] {
            assert!(parse_rate(invalid).is_err(), "{invalid}");
        }
    }

    #[test]
    fn classes_inherit_from_default() {
        let text = "\
listeners:
  - address: 127.0.0.1:2525
limits:
  max_connections_per_ip: 7
rate_limits:
  default:
    connections_per_ip: 10/1m
    messages_per_sender: 5/1h
  customers:
    networks: [10.20.0.0/16, 2001:db8:20::/48]
    max_connections_per_ip: 50
    messages_per_sender: 50/1h
    connections_per_ip: none
";
        let config = Config::parse(text, None).expect("valid");
        let classes = &config.rate_limits.classes;
        let default = &classes["default"];
        assert_eq!(default.max_connections_per_ip, 7);
        assert_eq!(
            default
                .rate(RateLimitName::ConnectionsPerIp)
                .map(|r| r.to_string()),
            Some("10/1m".to_string())
        );
        let customers = &classes["customers"];
        assert_eq!(customers.max_connections_per_ip, 50);
        assert_eq!(customers.networks.len(), 2);
        assert_eq!(customers.rate(RateLimitName::ConnectionsPerIp), None);
        assert_eq!(
            customers
                .rate(RateLimitName::MessagesPerSender)
                .map(|r| r.to_string()),
            Some("50/1h".to_string())
        );
        assert_eq!(customers.rate(RateLimitName::RecipientsPerIp), None);
    }

    #[test]
    fn without_the_key_only_the_connection_limit_applies() {
        let config =
            Config::parse("listeners:\n  - address: 127.0.0.1:2525\n", None).expect("valid");
        let default = config.rate_limits.default_class();
        assert_eq!(default.max_connections_per_ip, 20);
        assert!(default.rates.is_empty());
        assert_eq!(config.rate_limits.classes.len(), 1);
    }

    #[test]
    fn problems_have_key_paths_and_lines() {
        let text = "\
listeners:
  - address: 127.0.0.1:2525
limits:
  max_connections_per_ip: 7
rate_limits:
  default:
    networks: [10.0.0.0/8]
    max_connections_per_ip: 9
    messages_per_ip: 10
  'bad name':
    recipients_per_user: 0/1m
  a:
    networks: [10.1.0.0/16, nonsense]
  b:
    networks: [10.1.0.0/16]
    connections_per_ip: 3/60d
";
        let problems = Config::parse(text, None).expect_err("invalid");
        let summary: Vec<(String, u64)> =
            problems.iter().map(|p| (p.path.clone(), p.line)).collect();
        for expected in [
            ("rate_limits.default.networks", 7),
            ("rate_limits.default.max_connections_per_ip", 8),
            ("rate_limits.default.messages_per_ip", 9),
            ("rate_limits.bad name", 11),
            ("rate_limits.bad name.recipients_per_user", 11),
            ("rate_limits.a.networks[1]", 13),
            ("rate_limits.b.networks[0]", 15),
            ("rate_limits.b.connections_per_ip", 16),
        ] {
            assert!(
                summary.contains(&(expected.0.to_string(), expected.1)),
                "missing {expected:?} in {summary:?}"
            );
        }
    }
}
