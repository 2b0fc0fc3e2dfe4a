//! MX resolution: the hosts that remote delivery tries for a domain.
//!
//! [`MxResolver::route`] maps a recipient domain to a list of [`MxHost`]s in
//! the order delivery must try them (RFC 5321 section 5.1):
//!
//! - MX records sorted by preference, with hosts of equal preference in a
//!   random order on each call, so that load spreads over them.
//! - No MX records (NOERROR with an empty answer) gives the implicit MX: the
//!   domain itself with preference 0.
//! - A single MX record whose exchange is the root "." is a null MX (RFC 7505),
//!   which says that the domain accepts no mail. A "." exchange among other MX
//!   records is ignored.
//! - Each host's A and AAAA records are looked up. A host without an address
//!   is skipped.
//!
//! Domains may be U-labels (SMTPUTF8). They are mapped to lowercase A-labels
//! with UTS #46 before the query, and every name is queried as fully
//! qualified, so no search domain is ever appended. Lookups go to DNS only:
//! /etc/hosts is not read.
//!
//! Errors: [`MxError`] tells a permanent failure (the message bounces) from a
//! temporary one (the message stays queued) and carries the enhanced status
//! code for the DSN.
//!
//! Known gaps: the module does not drop MX hosts that point back to this
//! server (RFC 5321 section 5.1), does not validate DNSSEC, and does not look
//! up DANE or MTA-STS policies.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures_util::future::join_all;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError, NoRecords};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use rand::seq::SliceRandom;
use tracing::debug;

use crate::policy::address::Domain;

/// Maximum number of MX hosts that [`MxResolver::route`] follows for one
/// domain. The most preferred hosts are kept. The limit bounds the address
/// queries that one domain can cause to two per host.
pub const MAX_MX_HOSTS: usize = 10;

/// Name servers and query limits of an [`MxResolver`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolverSettings {
    /// Name servers to query, over UDP with a retry over TCP when a response
    /// is truncated. Empty means the name servers of the system configuration
    /// (/etc/resolv.conf). Only the name servers are taken from that file, not
    /// its search domains or options.
    pub nameservers: Vec<SocketAddr>,
    /// Time to wait for the response to one query.
    pub timeout: Duration,
    /// Number of times a query is sent before the lookup fails, at least 1.
    pub attempts: usize,
}

impl Default for ResolverSettings {
    /// Returns settings with the system name servers, a 5 second timeout and
    /// 2 attempts.
    fn default() -> Self {
        ResolverSettings {
            nameservers: Vec::new(),
            timeout: Duration::from_secs(5),
            attempts: 2,
        }
    }
}

/// Failure to set up an [`MxResolver`].
#[derive(Debug, thiserror::Error)]
pub enum ResolverSetupError {
    #[error("invalid resolver settings: {0}")]
    InvalidSettings(String),

    #[error(
        "failed to read the system DNS configuration (/etc/resolv.conf): {0}; \
         fix the file or configure the name servers explicitly"
    )]
    SystemConfig(String),

    #[error("failed to build the DNS resolver: {0}")]
    Build(String),
}

/// One host to deliver to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MxHost {
    /// Host name as lowercase A-labels without a trailing dot.
    pub name: String,
    /// MX preference, lower first. The implicit MX has preference 0.
    pub preference: u16,
    /// IPv4 addresses first, then IPv6 addresses, each in the order DNS
    /// returned them. Never empty.
    pub addresses: Vec<IpAddr>,
}

/// Reasons why a domain has no host to deliver to.
///
/// Every variant carries the domain as given to [`MxResolver::route`], so that
/// the message names the recipient domain that the sender wrote.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MxError {
    /// The domain is not a DNS host name: it is empty, fails UTS #46 mapping,
    /// breaks the LDH rule, or is an address literal such as `[192.0.2.1]`.
    /// Delivery to an address literal connects to that address directly and
    /// does not come here.
    #[error("invalid mail domain {domain:?}: {reason}")]
    InvalidDomain { domain: String, reason: String },

    /// The domain publishes a null MX (RFC 7505) and accepts no mail.
    #[error("domain {domain} accepts no mail (null MX record, RFC 7505)")]
    NullMx { domain: String },

    /// The DNS answered NXDOMAIN for the domain.
    #[error("domain {domain} does not exist (DNS returned NXDOMAIN)")]
    NoSuchDomain { domain: String },

    /// No MX host of the domain (or, without MX records, the domain itself)
    /// has an A or AAAA record, and no lookup failed temporarily.
    ///
    /// This counts as temporary (4.4.3) although the DNS answered: missing
    /// addresses are often a transient state, such as a zone being edited or a
    /// host renumbered, and a retry costs little while a bounce loses the
    /// message.
    #[error("no mail host of domain {domain} has an IPv4 or IPv6 address")]
    NoAddresses { domain: String },

    /// A lookup failed without an answer about the domain: SERVFAIL, REFUSED,
    /// a timeout, or a network error.
    #[error("DNS lookup for domain {domain} failed temporarily: {reason}")]
    Temporary { domain: String, reason: String },
}

impl MxError {
    /// Returns true if delivery to the domain must not be retried.
    pub fn is_permanent(&self) -> bool {
        match self {
            MxError::InvalidDomain { .. }
            | MxError::NullMx { .. }
            | MxError::NoSuchDomain { .. } => true,
            MxError::NoAddresses { .. } | MxError::Temporary { .. } => false,
        }
    }

    /// Returns the enhanced status code (RFC 3463) for a DSN or a log line.
    pub fn status(&self) -> &'static str {
        match self {
            // 5.1.2: bad destination system address.
            MxError::InvalidDomain { .. } | MxError::NoSuchDomain { .. } => "5.1.2",
            // 5.1.10: recipient address has null MX (RFC 7505 section 4.2).
            MxError::NullMx { .. } => "5.1.10",
            // 4.4.3: directory server failure.
            MxError::NoAddresses { .. } | MxError::Temporary { .. } => "4.4.3",
        }
    }

    /// Returns the domain as given to [`MxResolver::route`].
    pub fn domain(&self) -> &str {
        match self {
            MxError::InvalidDomain { domain, .. }
            | MxError::NullMx { domain }
            | MxError::NoSuchDomain { domain }
            | MxError::NoAddresses { domain }
            | MxError::Temporary { domain, .. } => domain,
        }
    }
}

/// A DNS resolver that finds the delivery hosts of a domain.
///
/// The resolver caches answers for their TTL. A clone shares the cache and the
/// connections to the name servers.
#[derive(Clone, Debug)]
pub struct MxResolver {
    resolver: TokioResolver,
}

/// Outcome of the address lookups of one host.
enum HostAddresses {
    Found(Vec<IpAddr>),
    /// The DNS answered but the host has neither an A nor an AAAA record.
    None,
    /// A lookup failed temporarily and the other one found no address.
    Failed(String),
}

/// Result of the MX query before the address lookups.
enum MxAnswer {
    /// Candidate hosts as (preference, fully qualified name), in delivery order.
    Hosts(Vec<(u16, Name)>),
    /// NOERROR without MX records: the domain is its own implicit MX.
    NoMx,
}

impl MxResolver {
    /// Builds a resolver from the settings. With explicit name servers nothing
    /// is read from the system. Otherwise /etc/resolv.conf is read once here.
    ///
    /// # Errors
    ///
    /// [`ResolverSetupError::InvalidSettings`] for a zero timeout or zero
    /// attempts, [`ResolverSetupError::SystemConfig`] when /etc/resolv.conf
    /// cannot be read or lists no name server, and
    /// [`ResolverSetupError::Build`] when hickory-resolver rejects the
    /// configuration.
    pub fn new(settings: &ResolverSettings) -> Result<MxResolver, ResolverSetupError> {
        Ok(MxResolver {
            resolver: build_resolver(settings)?,
        })
    }

    /// Looks up the hosts to deliver to for `domain`, in the order to try
    /// them, at most [`MAX_MX_HOSTS`] of them.
    ///
    /// A host whose address lookups failed temporarily is skipped like a host
    /// without addresses. The call fails with [`MxError::Temporary`] only when
    /// no host has an address and at least one lookup failed temporarily.
    ///
    /// # Errors
    ///
    /// See [`MxError`] for each case and whether it is permanent.
    pub async fn route(&self, domain: &str) -> Result<Vec<MxHost>, MxError> {
        let query_name = fully_qualified_name(domain)?;

        let answer = self.lookup_mx(domain, &query_name).await?;
        let candidates = match answer {
            MxAnswer::Hosts(hosts) => hosts,
            MxAnswer::NoMx => {
                debug!(domain, "no MX records, using the domain as implicit MX");
                vec![(0, query_name)]
            }
        };

        let lookups = candidates
            .iter()
            .map(|(_, name)| self.lookup_addresses(name.clone()));
        let results = join_all(lookups).await;

        let mut hosts = Vec::with_capacity(candidates.len());
        let mut first_failure = None;
        for ((preference, name), result) in candidates.into_iter().zip(results) {
            let name = host_name_string(&name);
            match result {
                HostAddresses::Found(addresses) => hosts.push(MxHost {
                    name,
                    preference,
                    addresses,
                }),
                HostAddresses::None => {
                    debug!(domain, host = %name, "skipping mail host without A or AAAA record");
                }
                HostAddresses::Failed(reason) => {
                    debug!(domain, host = %name, %reason, "skipping mail host whose address lookup failed");
                    first_failure.get_or_insert(format!(
                        "address lookup for mail host {name} failed: {reason}"
                    ));
                }
            }
        }

        if !hosts.is_empty() {
            return Ok(hosts);
        }
        Err(match first_failure {
            Some(reason) => MxError::Temporary {
                domain: domain.to_owned(),
                reason,
            },
            None => MxError::NoAddresses {
                domain: domain.to_owned(),
            },
        })
    }

    /// Queries the MX records of `name` and orders the hosts.
    async fn lookup_mx(&self, domain: &str, name: &Name) -> Result<MxAnswer, MxError> {
        let lookup = match self.resolver.lookup(name.clone(), RecordType::MX).await {
            Ok(lookup) => lookup,
            Err(error) => {
                return match no_records_code(&error) {
                    Some(ResponseCode::NXDomain) => Err(MxError::NoSuchDomain {
                        domain: domain.to_owned(),
                    }),
                    Some(_) => Ok(MxAnswer::NoMx),
                    None => Err(MxError::Temporary {
                        domain: domain.to_owned(),
                        reason: format!("MX lookup for {} failed: {error}", host_name_string(name)),
                    }),
                };
            }
        };

        // The answer may also hold the CNAME records that led to the MX set.
        let records: Vec<(u16, Name)> = lookup
            .answers()
            .iter()
            .filter_map(|record| match &record.data {
                RData::MX(mx) => Some((mx.preference, mx.exchange.to_lowercase())),
                _ => None,
            })
            .collect();
        if records.is_empty() {
            return Ok(MxAnswer::NoMx);
        }

        // RFC 7505 section 3 defines a null MX as a single record with the
        // exchange ".". A "." among real exchanges is a configuration error,
        // and section 4.3 lets the sender ignore it.
        let records: Vec<(u16, Name)> = records
            .into_iter()
            .filter(|(_, exchange)| !exchange.is_root())
            .collect();
        if records.is_empty() {
            return Err(MxError::NullMx {
                domain: domain.to_owned(),
            });
        }

        Ok(MxAnswer::Hosts(order_mx_hosts(records)))
    }

    /// Queries the A and AAAA records of one host at the same time.
    async fn lookup_addresses(&self, name: Name) -> HostAddresses {
        let (ipv4, ipv6) = tokio::join!(
            self.resolver.lookup(name.clone(), RecordType::A),
            self.resolver.lookup(name.clone(), RecordType::AAAA),
        );

        let mut addresses = Vec::new();
        let mut failure = None;
        for result in [ipv4, ipv6] {
            match result {
                Ok(lookup) => {
                    addresses.extend(lookup.answers().iter().filter_map(
                        |record| match &record.data {
                            RData::A(a) => Some(IpAddr::V4(a.0)),
                            RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
                            _ => None,
                        },
                    ));
                }
                // NXDOMAIN or NODATA: the host has no address of this family.
                Err(error) if no_records_code(&error).is_some() => {}
                Err(error) => {
                    failure.get_or_insert(error.to_string());
                }
            }
        }

        match (addresses.is_empty(), failure) {
            (false, _) => HostAddresses::Found(addresses),
            (true, Some(reason)) => HostAddresses::Failed(reason),
            (true, None) => HostAddresses::None,
        }
    }
}

/// Builds a hickory resolver with its answer cache from the settings. With
/// explicit name servers nothing is read from the system. Otherwise
/// /etc/resolv.conf is read once here. Names are always queried as given: no
/// search domain is appended and /etc/hosts is not read.
///
/// # Errors
///
/// See [`MxResolver::new`].
pub(crate) fn build_resolver(
    settings: &ResolverSettings,
) -> Result<TokioResolver, ResolverSetupError> {
    if settings.timeout.is_zero() {
        return Err(ResolverSetupError::InvalidSettings(
            "the DNS timeout is zero; set a timeout of at least 1 ms".to_owned(),
        ));
    }
    if settings.attempts == 0 {
        return Err(ResolverSetupError::InvalidSettings(
            "the number of DNS attempts is zero; set at least 1".to_owned(),
        ));
    }

    let name_servers = if settings.nameservers.is_empty() {
        system_name_servers()?
    } else {
        settings
            .nameservers
            .iter()
            .map(|address| udp_and_tcp_name_server(*address))
            .collect()
    };

    // No domain and no search list: names are always queried as given.
    let config = ResolverConfig::from_parts(None, Vec::new(), name_servers);

    let mut options = ResolverOpts::default();
    options.timeout = settings.timeout;
    // hickory-resolver counts the retries after the first query.
    options.attempts = settings.attempts - 1;
    options.use_hosts_file = ResolveHosts::Never;

    let resolver = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
        .with_options(options)
        .build()
        .map_err(|error| ResolverSetupError::Build(error.to_string()))?;

    Ok(resolver)
}

/// Maps a mail domain to a fully qualified DNS name of lowercase A-labels.
fn fully_qualified_name(domain: &str) -> Result<Name, MxError> {
    let invalid = |reason: String| MxError::InvalidDomain {
        domain: domain.to_owned(),
        reason,
    };

    let ascii = match Domain::parse(domain) {
        Ok(Domain::Name(ascii)) => ascii,
        Ok(Domain::Literal(_)) => {
            return Err(invalid(
                "an address literal has no MX records; connect to the address directly".to_owned(),
            ));
        }
        Err(error) => return Err(invalid(error.to_string())),
    };

    Name::from_ascii(format!("{ascii}."))
        .map_err(|error| invalid(format!("not a valid DNS name: {error}")))
}

/// Removes duplicate exchanges (keeping the lowest preference), puts hosts of
/// equal preference in a random order, sorts by preference and keeps the first
/// [`MAX_MX_HOSTS`].
fn order_mx_hosts(mut records: Vec<(u16, Name)>) -> Vec<(u16, Name)> {
    records.sort();
    let mut seen = HashSet::new();
    records.retain(|(_, exchange)| seen.insert(exchange.clone()));

    // Shuffling first and then sorting stably by preference leaves each group
    // of equal preference in a uniformly random order.
    records.shuffle(&mut rand::rng());
    records.sort_by_key(|(preference, _)| *preference);
    records.truncate(MAX_MX_HOSTS);
    records
}

/// Returns the response code of a negative answer (NXDOMAIN, or NOERROR
/// without records), or `None` for any other error.
pub(crate) fn no_records_code(error: &NetError) -> Option<ResponseCode> {
    match error {
        NetError::Dns(DnsError::NoRecordsFound(NoRecords { response_code, .. })) => {
            Some(*response_code)
        }
        _ => None,
    }
}

/// Formats a DNS name without the trailing dot of the root.
fn host_name_string(name: &Name) -> String {
    let ascii = name.to_ascii();
    match ascii.strip_suffix('.') {
        Some(stripped) => stripped.to_owned(),
        None => ascii,
    }
}

/// Reads the name servers from /etc/resolv.conf.
fn system_name_servers() -> Result<Vec<NameServerConfig>, ResolverSetupError> {
    let (config, _options) = hickory_resolver::system_conf::read_system_conf()
        .map_err(|error| ResolverSetupError::SystemConfig(error.to_string()))?;
    let name_servers = config.name_servers().to_vec();
    if name_servers.is_empty() {
        return Err(ResolverSetupError::SystemConfig(
            "the file has no nameserver line".to_owned(),
        ));
    }
    Ok(name_servers)
}

/// Builds the configuration of a name server queried over UDP, with a retry
/// over TCP after a truncated response.
fn udp_and_tcp_name_server(address: SocketAddr) -> NameServerConfig {
    let mut config = NameServerConfig::udp_and_tcp(address.ip());
    for connection in &mut config.connections {
        connection.port = address.port();
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> Name {
        Name::from_ascii(text).unwrap()
    }

    #[test]
    fn fully_qualified_name_maps_u_labels() {
        let fqdn = fully_qualified_name("Bücher.Example").unwrap();
        assert_eq!(fqdn.to_ascii(), "xn--bcher-kva.example.");
        assert!(fqdn.is_fqdn());
    }

    #[test]
    fn fully_qualified_name_rejects_literals_and_bad_names() {
        for input in [
            "[192.0.2.1]",
            "[IPv6:2001:db8::1]",
            "",
            "a..b",
            "under_score.example",
            "192.0.2.1",
        ] {
            let error = fully_qualified_name(input).unwrap_err();
            assert!(
                matches!(error, MxError::InvalidDomain { .. }),
                "{input:?} gave {error:?}"
            );
            assert!(error.is_permanent(), "{input:?}");
            assert_eq!(error.status(), "5.1.2", "{input:?}");
        }
    }

    #[test]
    fn order_mx_hosts_sorts_dedups_and_caps() {
        let mut records = vec![
            (20, name("b.example.")),
            (10, name("a.example.")),
            (30, name("a.example.")),
        ];
        for index in 0..12 {
            records.push((40, name(&format!("h{index}.example."))));
        }

        let ordered = order_mx_hosts(records);

        assert_eq!(ordered.len(), MAX_MX_HOSTS);
        assert_eq!(ordered[0], (10, name("a.example.")));
        assert_eq!(ordered[1], (20, name("b.example.")));
        assert!(ordered[2..].iter().all(|(preference, _)| *preference == 40));
    }

    #[test]
    fn error_status_and_permanence() {
        let domain = "example.test".to_owned();
        let cases = [
            (
                MxError::NullMx {
                    domain: domain.clone(),
                },
                true,
                "5.1.10",
            ),
            (
                MxError::NoSuchDomain {
                    domain: domain.clone(),
                },
                true,
                "5.1.2",
            ),
            (
                MxError::NoAddresses {
                    domain: domain.clone(),
                },
                false,
                "4.4.3",
            ),
            (
                MxError::Temporary {
                    domain: domain.clone(),
                    reason: "timed out".to_owned(),
                },
                false,
                "4.4.3",
            ),
        ];
        for (error, permanent, status) in cases {
            assert_eq!(error.is_permanent(), permanent, "{error}");
            assert_eq!(error.status(), status, "{error}");
            assert!(error.to_string().contains("example.test"), "{error}");
            assert_eq!(error.domain(), "example.test");
        }
    }

    #[test]
    fn new_rejects_zero_timeout_and_attempts() {
        let nameservers = vec!["127.0.0.1:53".parse().unwrap()];
        let zero_timeout = ResolverSettings {
            nameservers: nameservers.clone(),
            timeout: Duration::ZERO,
            attempts: 1,
        };
        assert!(matches!(
            MxResolver::new(&zero_timeout),
            Err(ResolverSetupError::InvalidSettings(_))
        ));

        let zero_attempts = ResolverSettings {
            nameservers,
            timeout: Duration::from_secs(1),
            attempts: 0,
        };
        assert!(matches!(
            MxResolver::new(&zero_attempts),
            Err(ResolverSetupError::InvalidSettings(_))
        ));
    }
}
