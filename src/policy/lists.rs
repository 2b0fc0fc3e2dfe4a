//! Lists that relay rules refer to by name: network lists with block and
//! allow entries decided by the longest matching prefix, and address lists
//! of addresses and `@domain` entries.
//!
//! A network list file has one entry per line: a CIDR or address, then
//! optionally `block` (the default) or `allow`. `#` starts a comment. The
//! most specific entry that contains the client wins, so
//! `10.0.0.0/8 block` with `10.1.2.0/24 allow` blocks all of 10/8 except
//! that /24. Lookups try each prefix length present, longest first, with
//! one hash lookup each: at most 33 for IPv4 and 129 for IPv6, whatever the
//! list's size.
//!
//! An address list file has one address or `@domain` per line; matching is
//! case-insensitive.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;

/// The verdict of a network list entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Block,
    Allow,
}

/// Entries of one address family, by prefix length.
#[derive(Clone, Debug, Default)]
struct Family {
    /// Prefix lengths present, longest first.
    lengths: Vec<u8>,
    /// Network bits (masked address) per prefix length.
    entries: HashMap<u8, HashMap<u128, Verdict>>,
}

impl Family {
    fn insert(&mut self, bits: u128, length: u8, verdict: Verdict) {
        let table = self.entries.entry(length).or_default();
        table.insert(bits, verdict);
        if !self.lengths.contains(&length) {
            self.lengths.push(length);
            self.lengths.sort_unstable_by(|a, b| b.cmp(a));
        }
    }

    fn lookup(&self, bits: u128, width: u8) -> Option<Verdict> {
        for length in &self.lengths {
            let masked = mask(bits, *length, width);
            if let Some(verdict) = self.entries[length].get(&masked) {
                return Some(*verdict);
            }
        }
        None
    }
}

/// Keeps the first `length` bits of a `width`-bit address.
fn mask(bits: u128, length: u8, width: u8) -> u128 {
    if length == 0 {
        return 0;
    }
    let shift = u32::from(width - length);
    (bits >> shift) << shift
}

/// A network list with longest-prefix matching.
#[derive(Clone, Debug, Default)]
pub struct NetworkList {
    v4: Family,
    v6: Family,
    len: usize,
}

impl NetworkList {
    pub fn insert(&mut self, network: IpNet, verdict: Verdict) {
        let network = network.trunc();
        match network {
            IpNet::V4(net) => self.v4.insert(
                u128::from(u32::from(net.network())),
                net.prefix_len(),
                verdict,
            ),
            IpNet::V6(net) => self
                .v6
                .insert(u128::from(net.network()), net.prefix_len(), verdict),
        }
        self.len += 1;
    }

    /// Entries inserted, counting duplicates.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The verdict of the most specific entry containing `address`.
    pub fn lookup(&self, address: IpAddr) -> Option<Verdict> {
        let address = match address {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(address),
            v4 => v4,
        };
        match address {
            IpAddr::V4(v4) => self.v4.lookup(u128::from(u32::from(v4)), 32),
            IpAddr::V6(v6) => self.v6.lookup(u128::from(v6), 128),
        }
    }

    /// True when the most specific entry containing `address` blocks it.
    pub fn blocks(&self, address: IpAddr) -> bool {
        self.lookup(address) == Some(Verdict::Block)
    }

    /// Parses the text of a network list file; errors name the line.
    pub fn parse(text: &str) -> Result<NetworkList, Vec<(u64, String)>> {
        let mut list = NetworkList::default();
        let mut problems = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line_number = index as u64 + 1;
            let content = line.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            let mut words = content.split_whitespace();
            let network = words.next().unwrap_or("");
            let parsed = network
                .parse::<IpNet>()
                .or_else(|_| network.parse::<IpAddr>().map(IpNet::from));
            let Ok(network) = parsed else {
                problems.push((
                    line_number,
                    format!("invalid network {network:?}; write CIDR notation, e.g. 192.0.2.0/24"),
                ));
                continue;
            };
            let verdict = match words.next() {
                None | Some("block") => Verdict::Block,
                Some("allow") => Verdict::Allow,
                Some(other) => {
                    problems.push((
                        line_number,
                        format!("unknown verdict {other:?}; use block or allow"),
                    ));
                    continue;
                }
            };
            if let Some(extra) = words.next() {
                problems.push((
                    line_number,
                    format!("unexpected {extra:?} after the verdict"),
                ));
                continue;
            }
            list.insert(network, verdict);
        }
        if problems.is_empty() {
            Ok(list)
        } else {
            Err(problems)
        }
    }
}

/// A list of addresses and `@domain` entries.
#[derive(Clone, Debug, Default)]
pub struct AddressList {
    addresses: HashSet<String>,
    domains: HashSet<String>,
}

impl AddressList {
    /// True when `address` (without angle brackets) or its domain is listed.
    pub fn contains(&self, address: &str) -> bool {
        let address = address.to_lowercase();
        if self.addresses.contains(&address) {
            return true;
        }
        address
            .rsplit_once('@')
            .is_some_and(|(_, domain)| self.domains.contains(domain.trim_end_matches('.')))
    }

    pub fn len(&self) -> usize {
        self.addresses.len() + self.domains.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Parses the text of an address list file; errors name the line.
    pub fn parse(text: &str) -> Result<AddressList, Vec<(u64, String)>> {
        let mut list = AddressList::default();
        let mut problems = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let content = line.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            let entry = content
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_lowercase();
            if let Some(domain) = entry.strip_prefix('@') {
                match super::address::Domain::parse(domain) {
                    Ok(super::address::Domain::Name(name)) => {
                        list.domains.insert(name);
                    }
                    _ => problems.push((index as u64 + 1, format!("invalid domain {content:?}"))),
                }
            } else if super::address::Address::parse(&entry).is_ok() {
                list.addresses.insert(entry);
            } else {
                problems.push((index as u64 + 1, format!("invalid address {content:?}")));
            }
        }
        if problems.is_empty() {
            Ok(list)
        } else {
            Err(problems)
        }
    }
}

/// Reads a list file, for error messages that name the file.
pub fn read_list_file(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map_err(|error| format!("cannot read {}: {error}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_decides() {
        let list = NetworkList::parse(
            "# customers\n10.0.0.0/8\n10.1.2.0/24 allow\n10.1.2.128/25 block\n2001:db8::/32\n2001:db8:1::/48 allow\n",
        )
        .expect("valid list");
        assert!(list.blocks("10.9.9.9".parse().unwrap()));
        assert!(!list.blocks("10.1.2.3".parse().unwrap()));
        assert!(list.blocks("10.1.2.200".parse().unwrap()));
        assert!(!list.blocks("11.0.0.1".parse().unwrap()));
        assert_eq!(list.lookup("11.0.0.1".parse().unwrap()), None);
        assert!(list.blocks("2001:db8:2::1".parse().unwrap()));
        assert!(!list.blocks("2001:db8:1::1".parse().unwrap()));
        // IPv4-mapped IPv6 clients are looked up as IPv4.
        assert!(list.blocks("::ffff:10.9.9.9".parse().unwrap()));
    }

    #[test]
    fn default_route_and_host_entries() {
        let list = NetworkList::parse("0.0.0.0/0\n192.0.2.7 allow\n").expect("valid list");
        assert!(list.blocks("198.51.100.1".parse().unwrap()));
        assert!(!list.blocks("192.0.2.7".parse().unwrap()));
    }

    #[test]
    fn network_list_problems_name_lines() {
        let problems = NetworkList::parse("10.0.0.0/8\n10.0.0.0/40\n10.1.0.0/16 maybe\n")
            .expect_err("invalid list");
        assert_eq!(problems.len(), 2);
        assert_eq!(problems[0].0, 2);
        assert_eq!(problems[1].0, 3);
    }

    #[test]
    fn million_entries_build_and_match() {
        let mut list = NetworkList::default();
        for n in 0..1_000_000u32 {
            let address = std::net::Ipv4Addr::from(0x0A00_0000 + n * 16);
            list.insert(IpNet::new(IpAddr::V4(address), 28).unwrap(), Verdict::Block);
        }
        assert_eq!(list.len(), 1_000_000);
        assert!(list.blocks("10.0.0.5".parse().unwrap()));
        assert!(list.blocks("10.15.66.63".parse().unwrap()));
        assert!(!list.blocks("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn address_list_matches_addresses_and_domains() {
        let list = AddressList::parse("spammer@example.org\n@bulk.example\n<Other@Example.net>\n")
            .expect("valid list");
        assert!(list.contains("Spammer@example.org"));
        assert!(list.contains("anyone@bulk.example"));
        assert!(list.contains("other@example.net"));
        assert!(!list.contains("friend@example.org"));
        assert!(!list.contains(""));
    }
}
