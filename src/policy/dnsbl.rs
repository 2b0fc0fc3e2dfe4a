//! DNS blocklists for the `dnsbl` and `rhsbl` conditions of relay rules:
//! DNSBL lookups of the client address and RHSBL lookups of the sender's
//! domain, in the form of RFC 5782.
//!
//! The query name is the client address reversed in front of the zone
//! (`7.113.0.203.bl.example` for 203.0.113.7, and the 32 nibbles of an IPv6
//! address in reverse order), or the sender domain in front of the zone. The
//! A records of the response decide:
//! - an address in 127.0.0.0/8 means listed, and the TXT record of the same
//!   name, when there is one, gives the reason;
//! - an address in 127.255.255.0/24 is an error, because several lists return
//!   one to reject a query (from a public resolver, or over a query quota);
//! - any other address is an error too: the zone is not a blocklist, or it
//!   answers every name;
//! - NXDOMAIN, or a name without A records, means not listed;
//! - SERVFAIL, a timeout or any other failure is an error.
//!
//! All zones of one check are queried concurrently, and each zone's lookups,
//! the TXT lookup included, end at the zone's timeout. The resolver caches
//! answers for their TTL, so repeated clients cost no queries.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use futures_util::future::join_all;
use hickory_resolver::TokioResolver;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use tokio::time::Instant;

use super::address::Domain;
use crate::config::Config;
use crate::delivery::mx::{ResolverSettings, ResolverSetupError, build_resolver, no_records_code};

/// Maximum length, in characters, of a reason taken from a TXT record.
pub const MAX_REASON_LENGTH: usize = 200;

/// Minimum time between two log lines about failures of one zone; the
/// failures in between are counted in the next line.
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// The subject that a zone lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZoneKind {
    /// Client addresses (DNSBL).
    Ip,
    /// Sender domains (RHSBL).
    Domain,
}

impl ZoneKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ZoneKind::Ip => "ip",
            ZoneKind::Domain => "domain",
        }
    }
}

/// Policy of a rule that names a zone whose lookup failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnError {
    /// The zone counts as not listing the client or domain.
    Ignore,
    /// The rule decides `451 4.4.3`, so the client retries later.
    Tempfail,
}

impl OnError {
    pub fn as_str(self) -> &'static str {
        match self {
            OnError::Ignore => "ignore",
            OnError::Tempfail => "tempfail",
        }
    }
}

/// One configured blocklist zone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlocklistZone {
    /// Zone name in lowercase A-labels, without a trailing dot.
    pub zone: String,
    pub kind: ZoneKind,
    /// Bound on the zone's lookups, the TXT lookup included.
    pub timeout: Duration,
    pub on_error: OnError,
}

/// Result of one zone's lookup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listing {
    /// Listed; the reason is the sanitised TXT record, when there is one.
    Listed {
        reason: Option<String>,
    },
    NotListed,
    /// The lookup failed: a timeout, SERVFAIL, or an error code in the A record.
    Failed(String),
}

/// Lookup results of a session, by zone name. Zone names are unique across
/// both kinds, so client and sender domain results share one map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DnsblResults {
    zones: BTreeMap<String, Listing>,
}

static NO_RESULTS: DnsblResults = DnsblResults::new();

impl DnsblResults {
    pub const fn new() -> DnsblResults {
        DnsblResults {
            zones: BTreeMap::new(),
        }
    }

    /// Returns an empty result set, for decisions made without lookups.
    pub fn none() -> &'static DnsblResults {
        &NO_RESULTS
    }

    pub fn get(&self, zone: &str) -> Option<&Listing> {
        self.zones.get(zone)
    }

    /// Stores results, replacing earlier ones of the same zones.
    pub fn extend(&mut self, results: impl IntoIterator<Item = (String, Listing)>) {
        self.zones.extend(results);
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Listing)> {
        self.zones
            .iter()
            .map(|(zone, listing)| (zone.as_str(), listing))
    }
}

impl FromIterator<(String, Listing)> for DnsblResults {
    fn from_iter<I: IntoIterator<Item = (String, Listing)>>(iter: I) -> DnsblResults {
        DnsblResults {
            zones: iter.into_iter().collect(),
        }
    }
}

/// A zone and its failure log state.
#[derive(Debug)]
struct Zone {
    config: BlocklistZone,
    failures: Mutex<FailureLog>,
}

#[derive(Debug, Default)]
struct FailureLog {
    last_logged: Option<Instant>,
    suppressed: u64,
}

/// The blocklist zones that rules name, with one caching resolver.
#[derive(Debug)]
pub struct Blocklists {
    resolver: TokioResolver,
    ip_zones: Vec<Zone>,
    domain_zones: Vec<Zone>,
}

impl Blocklists {
    /// Builds the service for `zones` with a resolver from `settings`.
    ///
    /// # Errors
    ///
    /// See [`crate::delivery::mx::MxResolver::new`].
    pub fn new(
        settings: &ResolverSettings,
        zones: Vec<BlocklistZone>,
    ) -> Result<Blocklists, ResolverSetupError> {
        let resolver = build_resolver(settings)?;
        let (ip_zones, domain_zones): (Vec<_>, Vec<_>) = zones
            .into_iter()
            .map(|config| Zone {
                config,
                failures: Mutex::default(),
            })
            .partition(|zone| zone.config.kind == ZoneKind::Ip);
        Ok(Blocklists {
            resolver,
            ip_zones,
            domain_zones,
        })
    }

    /// Builds the service for the configured zones that some rule names,
    /// with the resolver of `delivery.resolver`. Returns None when no rule
    /// names a zone, so nothing is ever queried.
    ///
    /// # Errors
    ///
    /// See [`crate::delivery::mx::MxResolver::new`].
    pub fn from_config(config: &Config) -> Result<Option<Blocklists>, ResolverSetupError> {
        let named = config.rules.blocklist_zones();
        for zone in &config.dnsbl {
            if !named.contains(&zone.zone) {
                tracing::info!(zone = %zone.zone, "DNS blocklist zone is configured but no rule names it; it is not queried");
            }
        }
        let zones: Vec<BlocklistZone> = config
            .dnsbl
            .iter()
            .filter(|zone| named.contains(&zone.zone))
            .cloned()
            .collect();
        if zones.is_empty() {
            return Ok(None);
        }
        Blocklists::new(&config.delivery.resolver_settings(), zones).map(Some)
    }

    /// True when some zone lists client addresses.
    pub fn has_ip_zones(&self) -> bool {
        !self.ip_zones.is_empty()
    }

    /// True when some zone lists sender domains.
    pub fn has_domain_zones(&self) -> bool {
        !self.domain_zones.is_empty()
    }

    /// Looks the client address up in every `ip` zone. An IPv4-mapped IPv6
    /// address is looked up as IPv4.
    pub async fn check_client(&self, ip: IpAddr) -> Vec<(String, Listing)> {
        let prefix = reversed_address(ip);
        self.check_all(&self.ip_zones, &prefix, &ip.to_string())
            .await
    }

    /// Looks the sender domain up in every `domain` zone. An address literal,
    /// or a domain too long to fit in front of a zone, is not listed
    /// anywhere because no DNS name can hold it.
    pub async fn check_domain(&self, domain: &str) -> Vec<(String, Listing)> {
        let Ok(Domain::Name(name)) = Domain::parse(domain) else {
            return self.not_listed_everywhere();
        };
        self.check_all(&self.domain_zones, &name, &name).await
    }

    fn not_listed_everywhere(&self) -> Vec<(String, Listing)> {
        self.domain_zones
            .iter()
            .map(|zone| (zone.config.zone.clone(), Listing::NotListed))
            .collect()
    }

    async fn check_all(
        &self,
        zones: &[Zone],
        prefix: &str,
        subject: &str,
    ) -> Vec<(String, Listing)> {
        let lookups = zones.iter().map(|zone| async move {
            let listing = self.check_zone(zone, prefix).await;
            match &listing {
                Listing::Listed { reason } => {
                    tracing::debug!(zone = %zone.config.zone, subject, reason = reason.as_deref().unwrap_or(""), "listed in DNS blocklist")
                }
                Listing::NotListed => {}
                Listing::Failed(error) => log_failure(zone, subject, error),
            }
            (zone.config.zone.clone(), listing)
        });
        join_all(lookups).await
    }

    /// Queries `prefix.zone` for A records, then, when listed, for TXT
    /// records, all before the zone's deadline.
    async fn check_zone(&self, zone: &Zone, prefix: &str) -> Listing {
        let timeout = zone.config.timeout;
        let deadline = Instant::now() + timeout;
        let Ok(name) = Name::from_ascii(format!("{prefix}.{}.", zone.config.zone)) else {
            return Listing::NotListed;
        };

        let answer =
            tokio::time::timeout_at(deadline, self.resolver.lookup(name.clone(), RecordType::A))
                .await;
        let lookup = match answer {
            Err(_) => return Listing::Failed(format!("timed out after {timeout:?}")),
            Ok(Err(error)) => {
                return match no_records_code(&error) {
                    // NXDOMAIN, or NOERROR without A records.
                    Some(ResponseCode::NXDomain | ResponseCode::NoError) => Listing::NotListed,
                    Some(code) => Listing::Failed(format!("DNS answered {code}")),
                    None => Listing::Failed(error.to_string()),
                };
            }
            Ok(Ok(lookup)) => lookup,
        };
        let addresses: Vec<Ipv4Addr> = lookup
            .answers()
            .iter()
            .filter_map(|record| match &record.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect();
        match classify_answer(&addresses) {
            Ok(true) => {}
            Ok(false) => return Listing::NotListed,
            Err(error) => return Listing::Failed(error),
        }

        let reason =
            match tokio::time::timeout_at(deadline, self.resolver.lookup(name, RecordType::TXT))
                .await
            {
                Ok(Ok(lookup)) => lookup
                    .answers()
                    .iter()
                    .find_map(|record| match &record.data {
                        RData::TXT(txt) => {
                            let joined: Vec<u8> = txt.txt_data.iter().flatten().copied().collect();
                            Some(sanitise(
                                &String::from_utf8_lossy(&joined),
                                MAX_REASON_LENGTH,
                            ))
                        }
                        _ => None,
                    }),
                // Without a TXT record the client or domain is still listed.
                Ok(Err(_)) | Err(_) => None,
            };
        Listing::Listed {
            reason: reason.filter(|text| !text.is_empty()),
        }
    }
}

/// Logs a zone's lookup failure, at most once per [`FAILURE_LOG_INTERVAL`]
/// per zone, with the number of failures not logged since the last line.
fn log_failure(zone: &Zone, subject: &str, error: &str) {
    let now = Instant::now();
    let mut log = zone.failures.lock().unwrap_or_else(PoisonError::into_inner);
    let due = log
        .last_logged
        .is_none_or(|last| now.duration_since(last) >= FAILURE_LOG_INTERVAL);
    if !due {
        log.suppressed += 1;
        return;
    }
    let suppressed = std::mem::take(&mut log.suppressed);
    log.last_logged = Some(now);
    drop(log);
    tracing::warn!(
        zone = %zone.config.zone,
        subject,
        error,
        on_error = zone.config.on_error.as_str(),
        failures_not_logged = suppressed,
        "DNS blocklist lookup failed"
    );
}

/// Classifies the A records of a response: Ok(true) for listed, Ok(false)
/// for no record, or the error that an address outside the listing range means.
fn classify_answer(addresses: &[Ipv4Addr]) -> Result<bool, String> {
    if let Some(code) = addresses
        .iter()
        .find(|a| a.octets()[..3] == [127, 255, 255])
    {
        return Err(format!("the list answered {code}, an error code"));
    }
    if addresses.iter().any(|a| a.octets()[0] == 127) {
        return Ok(true);
    }
    match addresses.first() {
        Some(other) => Err(format!("unexpected answer {other} outside 127.0.0.0/8")),
        None => Ok(false),
    }
}

/// Returns the query name prefix of an address: IPv4 octets in reverse
/// order, or the 32 nibbles of an IPv6 address in reverse order (RFC 5782
/// section 2.4).
pub fn reversed_address(ip: IpAddr) -> String {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            format!("{d}.{c}.{b}.{a}")
        }
        IpAddr::V6(v6) => {
            let nibbles: Vec<String> = v6
                .octets()
                .iter()
                .rev()
                .flat_map(|byte| [byte & 0x0f, byte >> 4])
                .map(|nibble| format!("{nibble:x}"))
                .collect();
            nibbles.join(".")
        }
    }
}

/// Makes text safe for an SMTP reply line: every character outside
/// printable ASCII becomes `?`, and the result is trimmed and cut to
/// `max_length` characters.
pub fn sanitise(text: &str, max_length: usize) -> String {
    let printable: String = text
        .chars()
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .collect();
    let trimmed = printable.trim();
    trimmed[..trimmed.len().min(max_length)]
        .trim_end()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_query_reverses_octets() {
        let ip: IpAddr = "203.0.113.7".parse().unwrap();
        assert_eq!(reversed_address(ip), "7.113.0.203");
    }

    #[test]
    fn mapped_ipv6_query_uses_ipv4() {
        let ip: IpAddr = "::ffff:192.0.2.99".parse().unwrap();
        assert_eq!(reversed_address(ip), "99.2.0.192");
    }

    #[test]
    fn ipv6_query_reverses_nibbles() {
        // The example of RFC 5782 section 2.4.
        let ip: IpAddr = "2001:db8:1:2:3:4:567:89ab".parse().unwrap();
        assert_eq!(
            reversed_address(ip),
            "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2"
        );
    }

    #[test]
    fn answer_classification() {
        let listed = [Ipv4Addr::new(127, 0, 0, 2)];
        assert_eq!(classify_answer(&listed), Ok(true));
        assert_eq!(classify_answer(&[]), Ok(false));
        let refused = [
            Ipv4Addr::new(127, 0, 0, 2),
            Ipv4Addr::new(127, 255, 255, 254),
        ];
        assert!(
            classify_answer(&refused)
                .unwrap_err()
                .contains("127.255.255.254")
        );
        let outside = [Ipv4Addr::new(192, 0, 2, 1)];
        assert!(classify_answer(&outside).unwrap_err().contains("192.0.2.1"));
    }

    #[test]
    fn sanitise_keeps_printable_ascii() {
        assert_eq!(sanitise("  Listed\r\nsee é  ", 100), "Listed??see ?");
        assert_eq!(sanitise("abcdef", 3), "abc");
        assert_eq!(sanitise("ab  cdef", 4), "ab");
        assert_eq!(sanitise("\u{7f}", 10), "?");
    }
}
