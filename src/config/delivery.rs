//! The `delivery` section: delivery workers, retries, notifications, MX
//! delivery and its resolver.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::{Checker, Text, parse_duration};
use crate::delivery::mx::ResolverSettings;

/// Use of STARTTLS towards a destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Never send STARTTLS.
    None,
    /// STARTTLS when the server offers it, without checking its certificate;
    /// plain text when it is not offered or the handshake fails.
    May,
    /// STARTTLS required, certificate not checked: a server without it gets
    /// a temporary failure.
    Encrypt,
    /// STARTTLS required with a certificate valid for the host name.
    Verify,
}

impl TlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::None => "none",
            TlsMode::May => "may",
            TlsMode::Encrypt => "encrypt",
            TlsMode::Verify => "verify",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct DeliveryConfig {
    /// Concurrent delivery sessions in this process.
    pub workers: usize,
    /// Concurrent sessions to one destination in this process.
    pub max_per_destination: usize,
    /// Deliveries one session claims at once.
    pub claim_size: usize,
    /// How long a claim lasts before another worker may take the work over.
    pub lease: Duration,
    /// Wait between polls for due destinations when no wake-up came.
    pub poll_interval: Duration,
    /// SMTP transactions sent over one connection before it is closed.
    pub max_transactions_per_connection: usize,
    /// Port of MX hosts (25; tests point it at a sink).
    pub smtp_port: u16,
    pub connect_timeout: Duration,
    /// Wait for each reply before the message content (RFC 5321 §4.5.3.2: 5 minutes).
    pub command_timeout: Duration,
    /// Wait for the reply after the final dot (RFC 5321 §4.5.3.2.6: 10 minutes).
    pub final_reply_timeout: Duration,
    /// STARTTLS policy of MX delivery, unless `tls_policy` names the domain.
    pub tls: TlsMode,
    /// Domain (A-label, lowercase) to STARTTLS policy.
    pub tls_policy: BTreeMap<String, TlsMode>,
    /// PEM file of extra trust anchors for `verify`, besides the built-in roots.
    pub tls_ca_file: Option<PathBuf>,
    /// Waits after the 1st, 2nd, … temporary failure; the last one repeats.
    pub retry_intervals: Vec<Duration>,
    /// Age after which a message that still fails temporarily is returned.
    pub max_lifetime: Duration,
    /// Ages at which a delay notification is sent, in increasing order.
    pub delay_notices: Vec<Duration>,
    /// Largest original, in octets, returned whole in a failure notification.
    pub bounce_return_limit: u64,
    /// DNS servers for all of wsmtp's lookups (MX hosts and DNS
    /// blocklists); empty means the system's resolv.conf.
    pub nameservers: Vec<SocketAddr>,
    pub resolver_timeout: Duration,
    pub resolver_attempts: usize,
}

impl Default for DeliveryConfig {
    fn default() -> DeliveryConfig {
        let minute = Duration::from_secs(60);
        DeliveryConfig {
            workers: 100,
            max_per_destination: 20,
            claim_size: 100,
            lease: 10 * minute,
            poll_interval: Duration::from_secs(1),
            max_transactions_per_connection: 100,
            smtp_port: 25,
            connect_timeout: Duration::from_secs(30),
            command_timeout: 5 * minute,
            final_reply_timeout: 10 * minute,
            tls: TlsMode::May,
            tls_policy: BTreeMap::new(),
            tls_ca_file: None,
            retry_intervals: [5, 10, 30, 60, 120, 240]
                .iter()
                .map(|m: &u32| minute * *m)
                .collect(),
            max_lifetime: 5 * 24 * 60 * minute,
            delay_notices: vec![4 * 60 * minute],
            bounce_return_limit: 10 * 1024 * 1024,
            nameservers: Vec::new(),
            resolver_timeout: Duration::from_secs(5),
            resolver_attempts: 2,
        }
    }
}

impl DeliveryConfig {
    /// Wait after the given number of temporary failures (1 for the first).
    pub fn retry_interval(&self, failures: u32) -> Duration {
        let index = (failures.max(1) as usize - 1).min(self.retry_intervals.len() - 1);
        self.retry_intervals[index]
    }

    /// STARTTLS policy for MX delivery to `domain`.
    pub fn tls_for_domain(&self, domain: &str) -> TlsMode {
        self.tls_policy.get(domain).copied().unwrap_or(self.tls)
    }

    /// The `resolver` settings, which serve MX lookups and DNS blocklists.
    pub fn resolver_settings(&self) -> ResolverSettings {
        ResolverSettings {
            nameservers: self.nameservers.clone(),
            timeout: self.resolver_timeout,
            attempts: self.resolver_attempts,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDelivery {
    workers: Option<Spanned<u64>>,
    max_per_destination: Option<Spanned<u64>>,
    claim_size: Option<Spanned<u64>>,
    lease: Option<Text>,
    poll_interval: Option<Text>,
    max_transactions_per_connection: Option<Spanned<u64>>,
    smtp_port: Option<Spanned<u64>>,
    connect_timeout: Option<Text>,
    command_timeout: Option<Text>,
    final_reply_timeout: Option<Text>,
    tls: Option<TlsMode>,
    #[serde(default)]
    tls_policy: Vec<RawTlsPolicy>,
    tls_ca_file: Option<Text>,
    retry_intervals: Option<Vec<Text>>,
    max_lifetime: Option<Text>,
    delay_notices: Option<Vec<Text>>,
    bounce_return_limit: Option<Spanned<u64>>,
    #[serde(default)]
    resolver: RawResolver,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTlsPolicy {
    domain: Text,
    tls: TlsMode,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawResolver {
    #[serde(default)]
    nameservers: Vec<Text>,
    timeout: Option<Text>,
    attempts: Option<Spanned<u64>>,
}

pub(super) fn convert_delivery(raw: &RawDelivery, checker: &mut Checker) -> DeliveryConfig {
    let defaults = DeliveryConfig::default();
    let second = Duration::from_secs(1);
    let hour = Duration::from_secs(3600);
    let day = 24 * hour;
    let mut config = DeliveryConfig {
        workers: checker.bounded("delivery.workers", &raw.workers, 100, 1, 10_000) as usize,
        max_per_destination: checker.bounded(
            "delivery.max_per_destination",
            &raw.max_per_destination,
            20,
            1,
            10_000,
        ) as usize,
        claim_size: checker.bounded("delivery.claim_size", &raw.claim_size, 100, 1, 10_000)
            as usize,
        lease: checker.duration("delivery.lease", &raw.lease, defaults.lease, second, day),
        poll_interval: checker.duration(
            "delivery.poll_interval",
            &raw.poll_interval,
            defaults.poll_interval,
            Duration::from_millis(10),
            hour,
        ),
        max_transactions_per_connection: checker.bounded(
            "delivery.max_transactions_per_connection",
            &raw.max_transactions_per_connection,
            100,
            1,
            100_000,
        ) as usize,
        smtp_port: checker.bounded("delivery.smtp_port", &raw.smtp_port, 25, 1, 65_535) as u16,
        connect_timeout: checker.duration(
            "delivery.connect_timeout",
            &raw.connect_timeout,
            defaults.connect_timeout,
            Duration::from_millis(100),
            hour,
        ),
        command_timeout: checker.duration(
            "delivery.command_timeout",
            &raw.command_timeout,
            defaults.command_timeout,
            Duration::from_millis(100),
            hour,
        ),
        final_reply_timeout: checker.duration(
            "delivery.final_reply_timeout",
            &raw.final_reply_timeout,
            defaults.final_reply_timeout,
            Duration::from_millis(100),
            hour,
        ),
        tls: raw.tls.unwrap_or(defaults.tls),
        tls_policy: BTreeMap::new(),
        tls_ca_file: raw.tls_ca_file.as_ref().map(|f| PathBuf::from(&f.value)),
        retry_intervals: defaults.retry_intervals.clone(),
        max_lifetime: checker.duration(
            "delivery.max_lifetime",
            &raw.max_lifetime,
            defaults.max_lifetime,
            second,
            100 * day,
        ),
        delay_notices: defaults.delay_notices.clone(),
        bounce_return_limit: checker.bounded(
            "delivery.bounce_return_limit",
            &raw.bounce_return_limit,
            defaults.bounce_return_limit,
            0,
            1 << 40,
        ),
        nameservers: Vec::new(),
        resolver_timeout: checker.duration(
            "delivery.resolver.timeout",
            &raw.resolver.timeout,
            defaults.resolver_timeout,
            Duration::from_millis(10),
            Duration::from_secs(60),
        ),
        resolver_attempts: checker.bounded(
            "delivery.resolver.attempts",
            &raw.resolver.attempts,
            2,
            1,
            10,
        ) as usize,
    };

    for (index, entry) in raw.tls_policy.iter().enumerate() {
        let path = format!("delivery.tls_policy[{index}].domain");
        if let Some(domain) = checker.domain(&path, &entry.domain)
            && config
                .tls_policy
                .insert(domain.clone(), entry.tls)
                .is_some()
        {
            checker.problem(
                path,
                entry.domain.referenced.line(),
                format!("domain {domain} has two TLS policies"),
            );
        }
    }
    if let Some(list) = &raw.retry_intervals {
        let intervals = durations(checker, "delivery.retry_intervals", list, second, day);
        if intervals.is_empty() {
            checker.problem(
                "delivery.retry_intervals",
                0,
                "needs at least one interval, e.g. [5m, 30m, 1h]",
            );
        } else {
            config.retry_intervals = intervals;
        }
    }
    if let Some(list) = &raw.delay_notices {
        let ages = durations(checker, "delivery.delay_notices", list, second, 100 * day);
        if ages.windows(2).any(|pair| pair[0] >= pair[1]) {
            checker.problem(
                "delivery.delay_notices",
                list.first().map(|t| t.referenced.line()).unwrap_or(0),
                "ages must increase, e.g. [4h, 1d]",
            );
        }
        config.delay_notices = ages;
    }
    for (index, server) in raw.resolver.nameservers.iter().enumerate() {
        match parse_nameserver(&server.value) {
            Some(address) => config.nameservers.push(address),
            None => checker.problem(
                format!("delivery.resolver.nameservers[{index}]"),
                server.referenced.line(),
                format!(
                    "invalid name server {:?}; write IP or IP:port, e.g. 127.0.0.1:53",
                    server.value
                ),
            ),
        }
    }
    config
}

/// Converts a list of durations, reporting each invalid entry.
fn durations(
    checker: &mut Checker,
    path: &str,
    list: &[Text],
    min: Duration,
    max: Duration,
) -> Vec<Duration> {
    let mut values = Vec::with_capacity(list.len());
    for (index, text) in list.iter().enumerate() {
        match parse_duration(&text.value) {
            Some(value) if value >= min && value <= max => values.push(value),
            _ => checker.problem(
                format!("{path}[{index}]"),
                text.referenced.line(),
                format!(
                    "invalid duration {:?}; write a number with s, m, h or d within {min:?}..={max:?}",
                    text.value
                ),
            ),
        }
    }
    values
}

/// Parses `IP` (port 53) or `IP:port`, IPv6 as `[::1]:53`.
fn parse_nameserver(text: &str) -> Option<SocketAddr> {
    let text = text.trim();
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Some(address);
    }
    text.parse::<std::net::IpAddr>()
        .ok()
        .map(|ip| SocketAddr::new(ip, 53))
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::*;

    const BASE: &str = "listeners:\n  - address: 127.0.0.1:2525\n";

    #[test]
    fn delivery_defaults() {
        let config = Config::parse(BASE, None).unwrap();
        let delivery = &config.delivery;
        assert_eq!(delivery.smtp_port, 25);
        assert_eq!(delivery.tls, TlsMode::May);
        assert_eq!(delivery.max_lifetime, Duration::from_secs(5 * 86_400));
        assert_eq!(delivery.retry_interval(1), Duration::from_secs(300));
        assert_eq!(delivery.retry_interval(100), Duration::from_secs(4 * 3600));
    }

    #[test]
    fn delivery_section_is_read() {
        let yaml = format!(
            "{BASE}delivery:\n  smtp_port: 2600\n  retry_intervals: [1s, 2s]\n  max_lifetime: 2d\n  \
             delay_notices: []\n  tls_policy:\n    - {{domain: Example.ORG, tls: verify}}\n  \
             resolver:\n    nameservers: [127.0.0.1:5300, 127.0.0.2]\n"
        );
        let config = Config::parse(&yaml, None).unwrap();
        let delivery = &config.delivery;
        assert_eq!(delivery.smtp_port, 2600);
        assert_eq!(delivery.retry_interval(1), Duration::from_secs(1));
        assert_eq!(delivery.retry_interval(5), Duration::from_secs(2));
        assert_eq!(delivery.max_lifetime, Duration::from_secs(2 * 86_400));
        assert!(delivery.delay_notices.is_empty());
        assert_eq!(delivery.tls_for_domain("example.org"), TlsMode::Verify);
        assert_eq!(delivery.tls_for_domain("example.net"), TlsMode::May);
        assert_eq!(
            delivery.nameservers,
            vec![
                "127.0.0.1:5300".parse().unwrap(),
                "127.0.0.2:53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn delivery_problems_name_their_keys() {
        let yaml = format!(
            "{BASE}delivery:\n  retry_intervals: [soon]\n  delay_notices: [1d, 4h]\n  \
             resolver:\n    nameservers: [dns.example]\n"
        );
        let problems = Config::parse(&yaml, None).unwrap_err();
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        assert!(paths.contains(&"delivery.retry_intervals[0]"), "{paths:?}");
        assert!(paths.contains(&"delivery.delay_notices"), "{paths:?}");
        assert!(
            paths.contains(&"delivery.resolver.nameservers[0]"),
            "{paths:?}"
        );
    }
}
