//! Typed configuration, read from `config.yaml`.
//!
//! The file is read in two steps: serde deserializes it into raw types that
//! remember where each value came from (line and column), then [`Config::load`]
//! converts them into checked types, collecting every problem with its key path
//! and line instead of stopping at the first. A YAML syntax error or a value of
//! the wrong type stops the parse at once, because nothing after it can be
//! trusted; those errors also carry the line.
//!
//! Every bound sits beside its default in [`Limits`] and [`Timeouts`].
//! `DATABASE_URL`, when set, overrides `queue.url`.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use serde_saphyr::Spanned;

mod admin;
mod auth;
mod delivery;
mod rate_limits;

pub use admin::AdminConfig;
pub use auth::{AuthSettings, ListenerAuth, Mechanism};
pub use delivery::{DeliveryConfig, TlsMode};
pub use rate_limits::{
    DEFAULT_CLASS, Rate, RateClass, RateLimitName, RateLimitsConfig, parse_rate,
};

use crate::policy::address::Domain;
use crate::policy::dnsbl::{BlocklistZone, OnError, ZoneKind};
use crate::policy::lists::{AddressList, NetworkList, read_list_file};
use crate::policy::rules::{Lists, RuleSet};
use crate::queue::QueueConfig;

/// One configuration problem: where it is and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The key path in the configuration file, or the path of another file
    /// (a rules file) when `in_file` is set.
    pub path: String,
    pub line: u64,
    pub message: String,
    /// Whether `path` names a file of its own rather than a configuration key.
    pub in_file: bool,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.in_file {
            write!(f, "{}:{}: {}", self.path, self.line, self.message)
        } else if self.line > 0 {
            write!(f, "line {}: {}: {}", self.line, self.path, self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Everything wrong with a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {}", render_problems(.problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

/// Lists the problems of the configuration file first, then those of each
/// other file, each group in line order.
fn render_problems(problems: &[Problem]) -> String {
    let mut sorted: Vec<&Problem> = problems.iter().collect();
    sorted.sort_by(|a, b| {
        let file = |p: &Problem| {
            if p.in_file {
                p.path.clone()
            } else {
                String::new()
            }
        };
        (a.in_file, file(a), a.line).cmp(&(b.in_file, file(b), b.line))
    });
    let lines: Vec<String> = sorted.iter().map(|p| format!("\n  {p}")).collect();
    format!("{} problem(s):{}", problems.len(), lines.concat())
}

// --- Checked configuration ---------------------------------------------------

#[derive(Clone, Debug)]
pub struct Config {
    /// Name used in the greeting, EHLO reply and Received headers.
    pub hostname: String,
    pub listeners: Vec<ListenerConfig>,
    pub limits: Limits,
    pub timeouts: Timeouts,
    pub relay: RelayConfig,
    pub groups: BTreeMap<String, GroupConfig>,
    pub queue: Option<QueueSettings>,
    pub router: RouterConfig,
    pub delivery: DeliveryConfig,
    /// SMTP AUTH settings shared by every listener.
    pub auth: AuthSettings,
    /// Relay rules from the rules directory; empty when there is none.
    pub rules: std::sync::Arc<RuleSet>,
    /// The rules directory read, if any.
    pub rules_directory: Option<PathBuf>,
    /// DNS blocklist zones that rules may name; only the named ones are
    /// queried.
    pub dnsbl: Vec<BlocklistZone>,
    /// The named lists, as the rules refer to them.
    pub lists: Lists,
    /// Rate limit classes; `default` is always there.
    pub rate_limits: RateLimitsConfig,
    /// The file that `serve` writes its process id to, for `wsmtp reload`.
    /// None when the configuration was not read from disk and sets no
    /// `pid_file`.
    pub pid_file: Option<PathBuf>,
    /// The file this configuration was read from, which a reload reads
    /// again; None for text parsed in memory.
    pub path: Option<PathBuf>,
    /// How often the directory version is polled when no notification came.
    pub directory_poll_interval: Duration,
    pub log: LogConfig,
    /// The HTTP listener for metrics and health checks; None: not served.
    pub admin: Option<AdminConfig>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouterConfig {
    /// Concurrent routing loops per process.
    pub workers: usize,
    /// Messages claimed at once by one loop.
    pub claim_messages: usize,
    /// How long a claim lasts before another router may take the work over.
    pub lease: Duration,
    /// Recipients per delivery batch.
    pub batch_size: usize,
    /// Nesting of lists and forwards followed.
    pub max_depth: usize,
    /// Wait between polls when idle.
    pub poll_interval: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerConfig {
    pub address: SocketAddr,
    pub tls: Option<TlsFiles>,
    /// SMTP AUTH on this listener; None: AUTH is not offered.
    pub auth: Option<ListenerAuth>,
    /// PROXY protocol from load balancers; without it every peer is the client.
    pub proxy_protocol: Option<ProxyProtocolConfig>,
}

/// Load balancers whose connections open with a PROXY protocol header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyProtocolConfig {
    /// Peers that must send the header; other peers are clients themselves.
    pub trusted: Vec<IpNet>,
    /// Time a trusted peer has to send the whole header.
    pub timeout: Duration,
}

impl ProxyProtocolConfig {
    /// True when connections from `peer` must start with a PROXY header.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.trusted.iter().any(|network| network.contains(&peer))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub certificate: PathBuf,
    pub key: PathBuf,
    /// TLS starts on connect, before the greeting (RFC 8314), and STARTTLS
    /// is not offered.
    pub implicit: bool,
}

/// Policy for a NUL byte in message content.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NulPolicy {
    /// Reject the message with 550 5.6.0.
    Reject,
    /// Accept NUL bytes as data.
    Allow,
}

#[derive(Clone, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub max_command_line: usize,
    pub max_data_line: usize,
    pub max_received_headers: usize,
    pub max_errors: usize,
    pub nul_bytes: NulPolicy,
    /// Keys (client addresses, senders or users) that each rate limit of
    /// each class tracks at most.
    pub rate_limit_keys: usize,
}

#[derive(Clone, Debug)]
pub struct Timeouts {
    /// Server wait for the next command (RFC 5321 §4.5.3.2.7: 5 minutes).
    pub command: Duration,
    /// Server wait for more message data, per read.
    pub data: Duration,
    pub tls_handshake: Duration,
    /// After SIGTERM/SIGINT, how long open sessions may run before they are cut.
    pub shutdown_grace: Duration,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RelayConfig {
    /// Domains whose recipients are spooled for local routing (A-labels, lowercase).
    pub local_domains: HashSet<String>,
    /// Domain to downstream group.
    pub relay_domains: BTreeMap<String, String>,
    /// Clients in these networks may relay to any domain.
    pub relay_networks: Vec<IpNet>,
    /// Group that receives mail relayed for relay networks to foreign domains.
    pub outbound_group: Option<String>,
    /// Relay domains whose recipients are spooled for later delivery to
    /// their group when the group is unreachable at RCPT time.
    pub queue_fallback: HashSet<String>,
}

/// What the listener does with a relay domain's recipient when its
/// downstream group is unreachable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    /// Reply 451 4.4.1, so the client retries later.
    Tempfail,
    /// Accept into the queue and deliver to the group when it is back.
    Queue,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupConfig {
    pub name: String,
    /// `host:port` entries tried in order.
    pub hosts: Vec<String>,
    pub connect_timeout: Duration,
    /// Wait for the reply to greeting, EHLO, MAIL, RCPT and DATA (RFC 5321 §4.5.3.2: 5 minutes).
    pub command_timeout: Duration,
    /// Wait for the reply after the final dot (RFC 5321 §4.5.3.2.6: 10 minutes).
    pub final_reply_timeout: Duration,
    /// STARTTLS towards the group's hosts by the delivery tier.
    pub tls: TlsMode,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueSettings {
    pub database: QueueConfig,
    /// How often the janitor looks for unfinished (`receiving`) messages past their deadline.
    pub janitor_interval: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing `EnvFilter` directive, e.g. `info` or `wsmtp=debug`. `RUST_LOG` overrides it.
    pub filter: String,
}

// --- Raw configuration, as written in YAML ----------------------------------

type Text = Spanned<String>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    hostname: Option<Text>,
    rules: Option<Text>,
    pid_file: Option<Text>,
    #[serde(default)]
    lists: Vec<RawList>,
    #[serde(default)]
    rate_limits: BTreeMap<String, Spanned<rate_limits::RawRateClass>>,
    #[serde(default)]
    dnsbl: Vec<RawDnsbl>,
    #[serde(default)]
    listeners: Vec<RawListener>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    relay: RawRelay,
    #[serde(default)]
    downstream_groups: Vec<RawGroup>,
    queue: Option<RawQueue>,
    #[serde(default)]
    router: RawRouter,
    #[serde(default)]
    delivery: delivery::RawDelivery,
    #[serde(default)]
    directory: RawDirectory,
    #[serde(default)]
    auth: auth::RawAuth,
    #[serde(default)]
    log: RawLog,
    admin: Option<admin::RawAdmin>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawList {
    name: Text,
    kind: Text,
    file: Text,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawDnsbl {
    zone: Text,
    kind: Option<Text>,
    timeout: Option<Text>,
    on_error: Option<Text>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRouter {
    workers: Option<Spanned<u64>>,
    claim_messages: Option<Spanned<u64>>,
    lease: Option<Text>,
    batch_size: Option<Spanned<u64>>,
    max_depth: Option<Spanned<u64>>,
    poll_interval: Option<Text>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDirectory {
    poll_interval: Option<Text>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    address: Text,
    tls: Option<RawTls>,
    auth: Option<auth::RawListenerAuth>,
    proxy_protocol: Option<Spanned<RawProxyProtocol>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxyProtocol {
    #[serde(default)]
    trusted: Vec<Text>,
    timeout: Option<Text>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    certificate: Text,
    key: Text,
    implicit: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_connections: Option<Spanned<u64>>,
    max_connections_per_ip: Option<Spanned<u64>>,
    max_message_size: Option<Spanned<u64>>,
    max_recipients: Option<Spanned<u64>>,
    max_command_line: Option<Spanned<u64>>,
    max_data_line: Option<Spanned<u64>>,
    max_received_headers: Option<Spanned<u64>>,
    max_errors: Option<Spanned<u64>>,
    nul_bytes: Option<NulPolicy>,
    rate_limit_keys: Option<Spanned<u64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    command: Option<Text>,
    data: Option<Text>,
    tls_handshake: Option<Text>,
    shutdown_grace: Option<Text>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRelay {
    #[serde(default)]
    local_domains: Vec<Text>,
    #[serde(default)]
    relay_domains: Vec<RawRelayDomain>,
    #[serde(default)]
    relay_networks: Vec<Text>,
    outbound_group: Option<Text>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRelayDomain {
    domain: Text,
    group: Text,
    fallback: Option<Fallback>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    name: Text,
    hosts: Vec<Text>,
    connect_timeout: Option<Text>,
    command_timeout: Option<Text>,
    final_reply_timeout: Option<Text>,
    tls: Option<TlsMode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQueue {
    url: Option<Text>,
    pool_size: Option<Spanned<u64>>,
    chunk_size: Option<Spanned<u64>>,
    statement_timeout: Option<Text>,
    janitor_interval: Option<Text>,
    receiving_ttl: Option<Text>,
    create_database: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<LogFormat>,
    filter: Option<String>,
}

// --- Conversion ----------------------------------------------------------------

/// Collects problems while raw values are converted.
struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    fn problem(&mut self, path: impl Into<String>, line: u64, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.into(),
            line,
            message: message.into(),
            in_file: false,
        });
    }

    /// Notes a problem in another file than the configuration file.
    fn file_problem(&mut self, file: impl Into<String>, line: u64, message: impl Into<String>) {
        self.problems.push(Problem {
            path: file.into(),
            line,
            message: message.into(),
            in_file: true,
        });
    }

    /// An integer setting with its default and inclusive bounds.
    fn bounded(
        &mut self,
        path: &str,
        raw: &Option<Spanned<u64>>,
        default: u64,
        min: u64,
        max: u64,
    ) -> u64 {
        let Some(value) = raw else { return default };
        if value.value < min || value.value > max {
            self.problem(
                path,
                value.referenced.line(),
                format!("{} is out of range {min}..={max}", value.value),
            );
            return default;
        }
        value.value
    }

    /// A duration setting such as `30s`, `5m`, `1h` or `250ms`, with bounds.
    fn duration(
        &mut self,
        path: &str,
        raw: &Option<Text>,
        default: Duration,
        min: Duration,
        max: Duration,
    ) -> Duration {
        let Some(text) = raw else { return default };
        let line = text.referenced.line();
        match parse_duration(&text.value) {
            Some(value) if value >= min && value <= max => value,
            Some(_) => {
                self.problem(
                    path,
                    line,
                    format!("{} is out of range {:?}..={:?}", text.value, min, max),
                );
                default
            }
            None => {
                self.problem(
                    path,
                    line,
                    format!(
                        "invalid duration {:?}; write a number with ms, s, m or h, e.g. 30s",
                        text.value
                    ),
                );
                default
            }
        }
    }

    fn domain(&mut self, path: &str, raw: &Text) -> Option<String> {
        match Domain::parse(&raw.value) {
            Ok(Domain::Name(name)) => Some(name),
            Ok(Domain::Literal(_)) => {
                self.problem(
                    path,
                    raw.referenced.line(),
                    "an address literal cannot be a configured domain",
                );
                None
            }
            Err(error) => {
                self.problem(path, raw.referenced.line(), error.to_string());
                None
            }
        }
    }
}

/// The first line of a YAML parse error without the location prefix, which
/// [`Problem`] shows on its own.
fn parse_error_message(rendered: &str) -> String {
    let first = rendered.lines().next().unwrap_or("invalid YAML");
    let text = first.strip_prefix("error: ").unwrap_or(first);
    // Drop "line N column M: " when present.
    match text.split_once(": ") {
        Some((location, rest))
            if location.starts_with("line ") && location.contains(" column ") =>
        {
            rest.to_string()
        }
        _ => text.to_string(),
    }
}

/// Parses `250ms`, `30s`, `5m`, `2h`, `5d`; a bare number means seconds.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    match unit.trim() {
        "ms" => Some(Duration::from_millis(number)),
        "" | "s" => Some(Duration::from_secs(number)),
        "m" => Some(Duration::from_secs(number.checked_mul(60)?)),
        "h" => Some(Duration::from_secs(number.checked_mul(3600)?)),
        "d" => Some(Duration::from_secs(number.checked_mul(86_400)?)),
        _ => None,
    }
}

/// True for `host:port` with a non-empty host and a port number.
fn is_host_port(text: &str) -> bool {
    let Some((host, port)) = text.rsplit_once(':') else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    !host.is_empty() && port.parse::<u16>().is_ok_and(|port| port > 0)
}

impl Config {
    /// Reads and checks a configuration file, reporting every problem found.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let database_url = std::env::var("DATABASE_URL")
            .ok()
            .filter(|url| !url.is_empty());
        let base = path.parent().unwrap_or(Path::new("."));
        let mut config =
            Config::parse_at(&text, database_url.as_deref(), Some(base)).map_err(|problems| {
                ConfigError::Invalid {
                    path: path.to_path_buf(),
                    problems,
                }
            })?;
        config.path = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses configuration text; `database_url` overrides `queue.url`. A
    /// relative `rules` directory is taken from the current directory, and
    /// without the key no rules are read.
    pub fn parse(text: &str, database_url: Option<&str>) -> Result<Config, Vec<Problem>> {
        Config::parse_at(text, database_url, None)
    }

    /// Parses configuration text read from a file in `base`: a relative
    /// rules directory is taken from there, and without the key `base/rules`
    /// is read when it exists.
    pub fn parse_at(
        text: &str,
        database_url: Option<&str>,
        base: Option<&Path>,
    ) -> Result<Config, Vec<Problem>> {
        let raw: RawConfig = serde_saphyr::from_str(text).map_err(|error| {
            let line = error.location().map(|l| l.line()).unwrap_or(0);
            vec![Problem {
                path: "(yaml)".to_string(),
                line,
                message: parse_error_message(&error.to_string()),
                in_file: false,
            }]
        })?;
        let mut checker = Checker {
            problems: Vec::new(),
        };
        let rules = raw.rules.clone();
        let raw_lists = raw.lists.clone();
        let raw_dnsbl = raw.dnsbl.clone();
        let mut config = convert(raw, database_url, base, &mut checker);
        let mut lists = load_lists(&raw_lists, base, &mut checker);
        config.dnsbl = convert_dnsbl(&raw_dnsbl, &mut checker);
        lists.blocklists = config
            .dnsbl
            .iter()
            .map(|zone| (zone.zone.clone(), zone.clone()))
            .collect();
        lists.rate_limit_classes = config.rate_limits.classes.keys().cloned().collect();
        load_rules(&mut config, rules.as_ref(), base, &lists, &mut checker);
        config.lists = lists;
        if checker.problems.is_empty() {
            Ok(config)
        } else {
            Err(checker.problems)
        }
    }
}

fn convert(
    raw: RawConfig,
    database_url: Option<&str>,
    base: Option<&Path>,
    checker: &mut Checker,
) -> Config {
    let hostname = match raw.hostname {
        Some(name) => match Domain::parse(&name.value) {
            Ok(Domain::Name(_)) => name.value.trim_end_matches('.').to_string(),
            _ => {
                checker.problem(
                    "hostname",
                    name.referenced.line(),
                    format!("invalid host name {:?}", name.value),
                );
                name.value
            }
        },
        None => "localhost".to_string(),
    };

    let listeners = convert_listeners(&raw.listeners, checker);
    let limits = convert_limits(&raw.limits, checker);
    let rate_limits = rate_limits::convert_rate_limits(
        &raw.rate_limits,
        limits.max_connections_per_ip,
        raw.limits.max_connections_per_ip.is_some(),
        checker,
    );
    // A relative pid file is taken from the configuration's directory.
    let pid_file = match (&raw.pid_file, base) {
        (Some(text), _) if text.value.trim().is_empty() => {
            checker.problem("pid_file", text.referenced.line(), "empty path");
            None
        }
        (Some(text), base) => Some(base.unwrap_or(Path::new("")).join(text.value.trim())),
        (None, Some(base)) => Some(base.join(DEFAULT_PID_FILE)),
        (None, None) => None,
    };
    let timeouts = convert_timeouts(&raw.timeouts, checker);
    let groups = convert_groups(&raw.downstream_groups, checker);
    let relay = convert_relay(&raw.relay, &groups, checker);
    let queue = convert_queue(raw.queue.as_ref(), database_url, checker);

    if queue.is_none() && !relay.queue_fallback.is_empty() {
        checker.problem(
            "queue",
            0,
            "relay_domains with fallback: queue need a queue database; add a queue section or set DATABASE_URL",
        );
    }
    if queue.is_none() {
        for (index, listener) in listeners.iter().enumerate() {
            if listener.auth.is_some() {
                checker.problem(
                    format!("listeners[{index}].auth"),
                    0,
                    "AUTH checks passwords in the account directory, which needs a queue database; add a queue section or set DATABASE_URL",
                );
            }
        }
    }
    if queue.is_none() && !relay.local_domains.is_empty() {
        checker.problem(
            "queue",
            0,
            "relay.local_domains needs a queue database; add a queue section or set DATABASE_URL",
        );
    }

    let router = convert_router(&raw.router, checker);
    let delivery = delivery::convert_delivery(&raw.delivery, checker);
    let auth = auth::convert_auth(&raw.auth, checker);
    let second = Duration::from_secs(1);
    let directory_poll_interval = checker.duration(
        "directory.poll_interval",
        &raw.directory.poll_interval,
        Duration::from_secs(30),
        second,
        Duration::from_secs(3600),
    );

    let log = LogConfig {
        format: raw.log.format.unwrap_or(LogFormat::Text),
        filter: raw.log.filter.unwrap_or_else(|| "info".to_string()),
    };
    let admin = admin::convert_admin(raw.admin.as_ref(), checker);

    Config {
        hostname,
        listeners,
        limits,
        timeouts,
        relay,
        groups,
        queue,
        router,
        delivery,
        auth,
        rules: Default::default(),
        rules_directory: None,
        dnsbl: Vec::new(),
        lists: Lists::default(),
        rate_limits,
        pid_file,
        path: None,
        directory_poll_interval,
        log,
        admin,
    }
}

/// File name of the pid file beside the configuration, without `pid_file`.
pub const DEFAULT_PID_FILE: &str = "wsmtp.pid";

/// Reads the named lists; relative files are taken from `base`.
fn load_lists(raw: &[RawList], base: Option<&Path>, checker: &mut Checker) -> Lists {
    let mut lists = Lists::default();
    let mut names = HashSet::new();
    for (index, entry) in raw.iter().enumerate() {
        let path = format!("lists[{index}]");
        let name = entry.name.value.trim().to_string();
        if !names.insert(name.clone()) {
            checker.problem(
                format!("{path}.name"),
                entry.name.referenced.line(),
                format!("list {name:?} is defined twice"),
            );
            continue;
        }
        let file = base.unwrap_or(Path::new("")).join(&entry.file.value);
        let text = match read_list_file(&file) {
            Ok(text) => text,
            Err(message) => {
                checker.problem(
                    format!("{path}.file"),
                    entry.file.referenced.line(),
                    message,
                );
                continue;
            }
        };
        let report = |checker: &mut Checker, problems: Vec<(u64, String)>| {
            for (line, message) in problems {
                checker.file_problem(file.display().to_string(), line, message);
            }
        };
        match entry.kind.value.trim() {
            "networks" => match NetworkList::parse(&text) {
                Ok(list) => {
                    lists.networks.insert(name, std::sync::Arc::new(list));
                }
                Err(problems) => report(checker, problems),
            },
            "addresses" => match AddressList::parse(&text) {
                Ok(list) => {
                    lists.addresses.insert(name, std::sync::Arc::new(list));
                }
                Err(problems) => report(checker, problems),
            },
            other => checker.problem(
                format!("{path}.kind"),
                entry.kind.referenced.line(),
                format!("unknown list kind {other:?}; use networks or addresses"),
            ),
        }
    }
    lists
}

/// Checks the `dnsbl` zones: a valid, unique zone name, `kind` ip or domain
/// (default ip), a timeout (default 2s) and `on_error` ignore or tempfail
/// (default ignore).
fn convert_dnsbl(raw: &[RawDnsbl], checker: &mut Checker) -> Vec<BlocklistZone> {
    let mut zones: Vec<BlocklistZone> = Vec::new();
    for (index, entry) in raw.iter().enumerate() {
        let path = format!("dnsbl[{index}]");
        let zone_line = entry.zone.referenced.line();
        let zone = checker.domain(&format!("{path}.zone"), &entry.zone);
        let kind = match entry.kind.as_ref().map(|k| (k.value.trim(), k)) {
            None | Some(("ip", _)) => ZoneKind::Ip,
            Some(("domain", _)) => ZoneKind::Domain,
            Some((other, text)) => {
                checker.problem(
                    format!("{path}.kind"),
                    text.referenced.line(),
                    format!("unknown zone kind {other:?}; use ip (client addresses) or domain (sender domains)"),
                );
                ZoneKind::Ip
            }
        };
        let on_error = match entry.on_error.as_ref().map(|k| (k.value.trim(), k)) {
            None | Some(("ignore", _)) => OnError::Ignore,
            Some(("tempfail", _)) => OnError::Tempfail,
            Some((other, text)) => {
                checker.problem(
                    format!("{path}.on_error"),
                    text.referenced.line(),
                    format!("unknown on_error value {other:?}; use ignore or tempfail"),
                );
                OnError::Ignore
            }
        };
        let timeout = checker.duration(
            &format!("{path}.timeout"),
            &entry.timeout,
            Duration::from_secs(2),
            Duration::from_millis(10),
            Duration::from_secs(60),
        );
        let Some(zone) = zone else { continue };
        // The longest query name is 32 IPv6 nibbles with their dots (64
        // characters) in front of the zone, and a DNS name has at most 253.
        if zone.len() > MAX_ZONE_LENGTH {
            checker.problem(
                format!("{path}.zone"),
                zone_line,
                format!("zone {zone} is longer than {MAX_ZONE_LENGTH} characters, which leaves no room for the query"),
            );
            continue;
        }
        if zones.iter().any(|existing| existing.zone == zone) {
            checker.problem(
                format!("{path}.zone"),
                zone_line,
                format!("zone {zone} is defined twice"),
            );
            continue;
        }
        zones.push(BlocklistZone {
            zone,
            kind,
            timeout,
            on_error,
        });
    }
    zones
}

/// Longest zone name that leaves room for an IPv6 query in front of it.
const MAX_ZONE_LENGTH: usize = 253 - 64;

/// Reads the rules directory: the `rules` key, else `rules` beside the
/// configuration file when that directory exists.
fn load_rules(
    config: &mut Config,
    key: Option<&Text>,
    base: Option<&Path>,
    lists: &Lists,
    checker: &mut Checker,
) {
    let directory = match (key, base) {
        (Some(text), _) => {
            let path = base.unwrap_or(Path::new("")).join(&text.value);
            if !path.is_dir() {
                checker.problem(
                    "rules",
                    text.referenced.line(),
                    format!("rules directory {} does not exist", path.display()),
                );
                return;
            }
            path
        }
        (None, Some(base)) => {
            let path = base.join("rules");
            if !path.is_dir() {
                return;
            }
            path
        }
        (None, None) => return,
    };
    let groups: HashSet<String> = config.groups.keys().cloned().collect();
    match RuleSet::load(&directory, &groups, lists) {
        Ok(rules) => config.rules = std::sync::Arc::new(rules),
        Err(problems) => {
            for problem in problems {
                checker.file_problem(
                    problem.file.display().to_string(),
                    problem.line,
                    problem.message,
                );
            }
        }
    }
    config.rules_directory = Some(directory);
}

fn convert_router(raw: &RawRouter, checker: &mut Checker) -> RouterConfig {
    let hour = Duration::from_secs(3600);
    RouterConfig {
        workers: checker.bounded("router.workers", &raw.workers, 8, 1, 256) as usize,
        claim_messages: checker.bounded("router.claim_messages", &raw.claim_messages, 16, 1, 10_000)
            as usize,
        lease: checker.duration(
            "router.lease",
            &raw.lease,
            Duration::from_secs(300),
            Duration::from_secs(1),
            hour,
        ),
        batch_size: checker.bounded("router.batch_size", &raw.batch_size, 20, 1, 1000) as usize,
        max_depth: checker.bounded("router.max_depth", &raw.max_depth, 10, 1, 100) as usize,
        poll_interval: checker.duration(
            "router.poll_interval",
            &raw.poll_interval,
            Duration::from_millis(250),
            Duration::from_millis(10),
            Duration::from_secs(60),
        ),
    }
}

fn convert_listeners(raw: &[RawListener], checker: &mut Checker) -> Vec<ListenerConfig> {
    if raw.is_empty() {
        checker.problem("listeners", 0, "at least one listener is needed");
    }
    let mut listeners = Vec::new();
    for (index, listener) in raw.iter().enumerate() {
        let path = format!("listeners[{index}].address");
        let address = match listener.address.value.parse::<SocketAddr>() {
            Ok(address) => address,
            Err(_) => {
                checker.problem(
                    path,
                    listener.address.referenced.line(),
                    format!(
                        "invalid socket address {:?}; write IP:port, e.g. 127.0.0.1:2525",
                        listener.address.value
                    ),
                );
                continue;
            }
        };
        let tls = listener.tls.as_ref().map(|tls| {
            for (key, file) in [("certificate", &tls.certificate), ("key", &tls.key)] {
                if !Path::new(&file.value).is_file() {
                    checker.problem(
                        format!("listeners[{index}].tls.{key}"),
                        file.referenced.line(),
                        format!("file {:?} not found", file.value),
                    );
                }
            }
            TlsFiles {
                certificate: PathBuf::from(&tls.certificate.value),
                key: PathBuf::from(&tls.key.value),
                implicit: tls.implicit.unwrap_or(false),
            }
        });
        let proxy_protocol = listener
            .proxy_protocol
            .as_ref()
            .map(|raw| convert_proxy_protocol(index, raw, checker));
        let auth = listener.auth.as_ref().map(|raw| {
            let line = listener.address.referenced.line();
            auth::convert_listener_auth(raw, index, tls.is_some(), line, checker)
        });
        listeners.push(ListenerConfig {
            address,
            tls,
            auth,
            proxy_protocol,
        });
    }
    listeners
}

fn convert_proxy_protocol(
    index: usize,
    raw: &Spanned<RawProxyProtocol>,
    checker: &mut Checker,
) -> ProxyProtocolConfig {
    let path = format!("listeners[{index}].proxy_protocol");
    if raw.value.trusted.is_empty() {
        checker.problem(
            format!("{path}.trusted"),
            raw.referenced.line(),
            "list the load balancers' networks, or remove proxy_protocol",
        );
    }
    let mut trusted = Vec::new();
    for (network_index, network) in raw.value.trusted.iter().enumerate() {
        match parse_network(&network.value) {
            Some(net) => trusted.push(net),
            None => checker.problem(
                format!("{path}.trusted[{network_index}]"),
                network.referenced.line(),
                format!(
                    "invalid network {:?}; write CIDR notation, e.g. 192.0.2.0/24",
                    network.value.trim()
                ),
            ),
        }
    }
    ProxyProtocolConfig {
        trusted,
        timeout: checker.duration(
            &format!("{path}.timeout"),
            &raw.value.timeout,
            Duration::from_secs(5),
            Duration::from_millis(100),
            Duration::from_secs(300),
        ),
    }
}

/// Parses a network in CIDR notation, or a bare address as a one-address
/// network; host bits are cleared.
fn parse_network(text: &str) -> Option<IpNet> {
    let text = text.trim();
    let parsed = text
        .parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from));
    parsed.ok().map(|net| net.trunc())
}

fn convert_limits(raw: &RawLimits, checker: &mut Checker) -> Limits {
    const MIB: u64 = 1024 * 1024;
    Limits {
        max_connections: checker.bounded(
            "limits.max_connections",
            &raw.max_connections,
            1000,
            1,
            1_000_000,
        ) as usize,
        max_connections_per_ip: checker.bounded(
            "limits.max_connections_per_ip",
            &raw.max_connections_per_ip,
            20,
            1,
            1_000_000,
        ) as usize,
        max_message_size: checker.bounded(
            "limits.max_message_size",
            &raw.max_message_size,
            50 * MIB,
            1024,
            4096 * MIB,
        ),
        // RFC 5321 §4.5.3.1.8: at least 100 recipients must be accepted.
        max_recipients: checker.bounded(
            "limits.max_recipients",
            &raw.max_recipients,
            100,
            1,
            100_000,
        ) as usize,
        // RFC 5321 §4.5.3.1.4: at least 512 octets; ESMTP parameters need more.
        max_command_line: checker.bounded(
            "limits.max_command_line",
            &raw.max_command_line,
            2048,
            512,
            65_536,
        ) as usize,
        // RFC 5322 §2.1.1 sets 998 octets, but real mail breaks it often; the
        // default accepts that mail while still bounding the line.
        max_data_line: checker.bounded(
            "limits.max_data_line",
            &raw.max_data_line,
            10_000,
            998,
            1_048_576,
        ) as usize,
        max_received_headers: checker.bounded(
            "limits.max_received_headers",
            &raw.max_received_headers,
            50,
            1,
            1000,
        ) as usize,
        max_errors: checker.bounded("limits.max_errors", &raw.max_errors, 20, 1, 10_000) as usize,
        nul_bytes: raw.nul_bytes.unwrap_or(NulPolicy::Reject),
        rate_limit_keys: checker.bounded(
            "limits.rate_limit_keys",
            &raw.rate_limit_keys,
            100_000,
            100,
            10_000_000,
        ) as usize,
    }
}

fn convert_timeouts(raw: &RawTimeouts, checker: &mut Checker) -> Timeouts {
    let second = Duration::from_secs(1);
    let day = Duration::from_secs(86_400);
    Timeouts {
        command: checker.duration(
            "timeouts.command",
            &raw.command,
            Duration::from_secs(300),
            second,
            day,
        ),
        data: checker.duration(
            "timeouts.data",
            &raw.data,
            Duration::from_secs(300),
            second,
            day,
        ),
        tls_handshake: checker.duration(
            "timeouts.tls_handshake",
            &raw.tls_handshake,
            Duration::from_secs(30),
            second,
            day,
        ),
        shutdown_grace: checker.duration(
            "timeouts.shutdown_grace",
            &raw.shutdown_grace,
            Duration::from_secs(30),
            Duration::ZERO,
            day,
        ),
    }
}

fn convert_groups(raw: &[RawGroup], checker: &mut Checker) -> BTreeMap<String, GroupConfig> {
    let second = Duration::from_secs(1);
    let hour = Duration::from_secs(3600);
    let mut groups = BTreeMap::new();
    for (index, group) in raw.iter().enumerate() {
        let path = format!("downstream_groups[{index}]");
        let name = group.name.value.clone();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            checker.problem(
                format!("{path}.name"),
                group.name.referenced.line(),
                format!("invalid group name {name:?}; use letters, digits, '-' and '_'"),
            );
        }
        if group.hosts.is_empty() {
            checker.problem(
                format!("{path}.hosts"),
                group.name.referenced.line(),
                "a group needs at least one host",
            );
        }
        for (host_index, host) in group.hosts.iter().enumerate() {
            if !is_host_port(&host.value) {
                checker.problem(
                    format!("{path}.hosts[{host_index}]"),
                    host.referenced.line(),
                    format!(
                        "invalid host {:?}; write host:port, e.g. 127.0.0.1:2526",
                        host.value
                    ),
                );
            }
        }
        let config = GroupConfig {
            name: name.clone(),
            hosts: group.hosts.iter().map(|h| h.value.clone()).collect(),
            connect_timeout: checker.duration(
                &format!("{path}.connect_timeout"),
                &group.connect_timeout,
                Duration::from_secs(30),
                second,
                hour,
            ),
            command_timeout: checker.duration(
                &format!("{path}.command_timeout"),
                &group.command_timeout,
                Duration::from_secs(300),
                second,
                hour,
            ),
            final_reply_timeout: checker.duration(
                &format!("{path}.final_reply_timeout"),
                &group.final_reply_timeout,
                Duration::from_secs(600),
                second,
                hour,
            ),
            tls: group.tls.unwrap_or(TlsMode::May),
        };
        if groups.insert(name.clone(), config).is_some() {
            checker.problem(
                format!("{path}.name"),
                group.name.referenced.line(),
                format!("group {name:?} is defined twice"),
            );
        }
    }
    groups
}

fn convert_relay(
    raw: &RawRelay,
    groups: &BTreeMap<String, GroupConfig>,
    checker: &mut Checker,
) -> RelayConfig {
    let mut relay = RelayConfig::default();
    let check_group = |checker: &mut Checker, path: String, group: &Text| {
        if !groups.contains_key(&group.value) {
            checker.problem(
                path,
                group.referenced.line(),
                format!(
                    "unknown downstream group {:?}; define it under downstream_groups",
                    group.value
                ),
            );
        }
    };

    for (index, domain) in raw.local_domains.iter().enumerate() {
        let path = format!("relay.local_domains[{index}]");
        if let Some(name) = checker.domain(&path, domain)
            && !relay.local_domains.insert(name.clone())
        {
            checker.problem(
                path,
                domain.referenced.line(),
                format!("domain {name} is listed twice"),
            );
        }
    }
    for (index, entry) in raw.relay_domains.iter().enumerate() {
        let path = format!("relay.relay_domains[{index}]");
        check_group(checker, format!("{path}.group"), &entry.group);
        let Some(name) = checker.domain(&format!("{path}.domain"), &entry.domain) else {
            continue;
        };
        if relay.local_domains.contains(&name) || relay.relay_domains.contains_key(&name) {
            checker.problem(
                format!("{path}.domain"),
                entry.domain.referenced.line(),
                format!("domain {name} is already a local or relay domain"),
            );
            continue;
        }
        if entry.fallback == Some(Fallback::Queue) {
            relay.queue_fallback.insert(name.clone());
        }
        relay.relay_domains.insert(name, entry.group.value.clone());
    }
    for (index, network) in raw.relay_networks.iter().enumerate() {
        match parse_network(&network.value) {
            Some(net) => relay.relay_networks.push(net),
            None => checker.problem(
                format!("relay.relay_networks[{index}]"),
                network.referenced.line(),
                format!(
                    "invalid network {:?}; write CIDR notation, e.g. 192.0.2.0/24",
                    network.value.trim()
                ),
            ),
        }
    }
    if let Some(group) = &raw.outbound_group {
        check_group(checker, "relay.outbound_group".to_string(), group);
        relay.outbound_group = Some(group.value.clone());
    }
    relay
}

fn convert_queue(
    raw: Option<&RawQueue>,
    database_url: Option<&str>,
    checker: &mut Checker,
) -> Option<QueueSettings> {
    let raw_url = raw.and_then(|queue| queue.url.as_ref());
    let url = match (database_url, raw_url) {
        (Some(url), _) => url.to_string(),
        (None, Some(url)) => url.value.clone(),
        (None, None) if raw.is_some() => {
            checker.problem("queue.url", 0, "missing; set queue.url or DATABASE_URL");
            return None;
        }
        (None, None) => return None,
    };
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        let line = raw_url.map(|u| u.referenced.line()).unwrap_or(0);
        checker.problem("queue.url", line, "must be a postgres:// URL");
    }
    let empty = RawQueue {
        url: None,
        pool_size: None,
        chunk_size: None,
        statement_timeout: None,
        janitor_interval: None,
        receiving_ttl: None,
        create_database: None,
    };
    let raw = raw.unwrap_or(&empty);
    let second = Duration::from_secs(1);
    let database = QueueConfig {
        url,
        pool_size: checker.bounded("queue.pool_size", &raw.pool_size, 32, 1, 1024) as usize,
        chunk_size: checker.bounded(
            "queue.chunk_size",
            &raw.chunk_size,
            256 * 1024,
            4096,
            16 * 1024 * 1024,
        ) as usize,
        statement_timeout: checker.duration(
            "queue.statement_timeout",
            &raw.statement_timeout,
            Duration::from_secs(30),
            second,
            Duration::from_secs(3600),
        ),
        create_database: raw.create_database.unwrap_or(true),
        receiving_ttl: checker.duration(
            "queue.receiving_ttl",
            &raw.receiving_ttl,
            Duration::from_secs(3600),
            Duration::from_secs(60),
            Duration::from_secs(7 * 86_400),
        ),
    };
    Some(QueueSettings {
        database,
        janitor_interval: checker.duration(
            "queue.janitor_interval",
            &raw.janitor_interval,
            Duration::from_secs(60),
            second,
            Duration::from_secs(86_400),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "listeners:\n  - address: 127.0.0.1:2525\n";

    #[test]
    fn minimal_config_gets_defaults() {
        let config = Config::parse(MINIMAL, None).expect("minimal config is valid");
        assert_eq!(config.limits.max_recipients, 100);
        assert_eq!(config.timeouts.command, Duration::from_secs(300));
        assert!(config.queue.is_none());
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let text = "\
listeners:
  - address: nowhere
relay:
  local_domains: [example.com, 'bad domain']
  relay_domains:
    - domain: example.net
      group: missing
  relay_networks: [10.0.0.0/33]
";
        let problems = Config::parse(text, None).expect_err("config is invalid");
        let summary: Vec<(String, u64)> =
            problems.iter().map(|p| (p.path.clone(), p.line)).collect();
        assert!(
            summary.contains(&("listeners[0].address".to_string(), 2)),
            "{summary:?}"
        );
        assert!(
            summary.contains(&("relay.local_domains[1]".to_string(), 4)),
            "{summary:?}"
        );
        assert!(
            summary.contains(&("relay.relay_domains[0].group".to_string(), 7)),
            "{summary:?}"
        );
        assert!(
            summary.contains(&("relay.relay_networks[0]".to_string(), 8)),
            "{summary:?}"
        );
        assert!(
            summary.iter().any(|(path, _)| path == "queue"),
            "{summary:?}"
        );
    }

    #[test]
    fn unknown_key_is_reported_with_its_line() {
        let text = "listeners:\n  - address: 127.0.0.1:2525\nlimits:\n  max_connectionz: 5\n";
        let problems = Config::parse(text, None).expect_err("unknown key");
        assert_eq!(problems[0].line, 4, "{problems:?}");
    }

    #[test]
    fn database_url_overrides_queue_url() {
        let text =
            "listeners:\n  - address: 127.0.0.1:2525\nqueue:\n  url: postgres://a@127.0.0.1/x\n";
        let config = Config::parse(text, Some("postgres://b@127.0.0.1/y")).expect("valid");
        assert_eq!(
            config.queue.expect("queue").database.url,
            "postgres://b@127.0.0.1/y"
        );
    }

    #[test]
    fn parse_errors_name_the_problem_once() {
        let problems = Config::parse(
            "listeners:\n  - address: 127.0.0.1:2525\nlimits:\n  max_errors: many\n",
            None,
        )
        .expect_err("invalid value");
        assert_eq!(problems[0].line, 4);
        assert!(
            !problems[0].message.contains("line 4"),
            "{}",
            problems[0].message
        );
        assert!(
            !problems[0].message.starts_with("error:"),
            "{}",
            problems[0].message
        );
    }

    #[test]
    fn proxy_protocol_is_read_per_listener() {
        let text = "\
listeners:
  - address: 127.0.0.1:2525
    proxy_protocol:
      trusted: [10.1.0.0/16, 192.0.2.7, '2001:db8::/32']
  - address: 127.0.0.1:2526
";
        let config = Config::parse(text, None).expect("valid");
        let settings = config.listeners[0]
            .proxy_protocol
            .as_ref()
            .expect("first listener has proxy_protocol");
        assert_eq!(settings.timeout, Duration::from_secs(5));
        assert_eq!(settings.trusted.len(), 3);
        assert!(settings.trusts("10.1.200.3".parse().expect("ip")));
        assert!(settings.trusts("::ffff:192.0.2.7".parse().expect("ip")));
        assert!(settings.trusts("2001:db8::1".parse().expect("ip")));
        assert!(!settings.trusts("192.0.2.8".parse().expect("ip")));
        assert!(config.listeners[1].proxy_protocol.is_none());
    }

    #[test]
    fn proxy_protocol_problems_have_lines() {
        let text = "\
listeners:
  - address: 127.0.0.1:2525
    proxy_protocol:
      trusted:
        - 10.0.0.0/8
        - 10.0.0.0/99
        - balancer.example
      timeout: 10m
  - address: 127.0.0.1:2526
    proxy_protocol: {trusted: []}
";
        let problems = Config::parse(text, None).expect_err("config is invalid");
        let summary: Vec<(String, u64)> =
            problems.iter().map(|p| (p.path.clone(), p.line)).collect();
        for expected in [
            ("listeners[0].proxy_protocol.trusted[1]", 6),
            ("listeners[0].proxy_protocol.trusted[2]", 7),
            ("listeners[0].proxy_protocol.timeout", 8),
            ("listeners[1].proxy_protocol.trusted", 10),
        ] {
            assert!(
                summary.contains(&(expected.0.to_string(), expected.1)),
                "missing {expected:?} in {summary:?}"
            );
        }
        assert_eq!(problems.len(), 4, "{problems:?}");
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_duration("5 weeks"), None);
    }
}
