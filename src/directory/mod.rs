//! The account directory: domains, accounts, addresses and lists.
//!
//! The directory lives in PostgreSQL, in the queue database (tables created
//! by `migrations/V2__directory.sql`). Listeners and routers work on an
//! in-memory [`Snapshot`] held by [`Directory`], which [`watch`] replaces as a
//! whole when the directory's version changes (LISTEN/NOTIFY on the channel
//! `wsmtp_directory`, with polling as the backstop), so a lookup never waits
//! on the database and never reads half a change.
//!
//! Addresses are looked up normalised (lowercase local part and A-label
//! domain): first the address itself, then without a `+tag` sub-address, then
//! the domain's catch-all entry `@domain`.

pub mod admin;
pub mod import;
mod load;
mod watch;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwapOption;

pub use load::load_snapshot;
pub use watch::watch;

/// Separator of sub-addresses: `user+tag@example.com` reaches `user`.
pub const SUBADDRESS_SEPARATOR: char = '+';

/// Kind of a directory domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DomainKind {
    /// Only addresses in the directory exist.
    Local,
    /// Every address passes through to the legacy group.
    Relay,
    /// Addresses in the directory are local; every other one passes through
    /// to the legacy group.
    Migrating,
}

impl DomainKind {
    pub fn parse(text: &str) -> Option<DomainKind> {
        match text {
            "local" => Some(DomainKind::Local),
            "relay" => Some(DomainKind::Relay),
            "migrating" => Some(DomainKind::Migrating),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DomainKind::Local => "local",
            DomainKind::Relay => "relay",
            DomainKind::Migrating => "migrating",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainEntry {
    pub kind: DomainKind,
    pub legacy_group: Option<String>,
}

/// Location of an account's mailbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mailbox {
    /// A Maildir directory.
    Maildir(String),
    /// An LMTP server: `host:port` or a Unix socket path.
    Lmtp(String),
}

impl Mailbox {
    /// The delivery destination written in the queue, e.g. `maildir:/var/mail/a`.
    pub fn destination(&self) -> String {
        match self {
            Mailbox::Maildir(path) => format!("maildir:{path}"),
            Mailbox::Lmtp(target) => format!("lmtp:{target}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AutoReplyKind {
    /// Returns the message to its sender as an attachment.
    Echo,
    /// At most one reply per interval per correspondent.
    Vacation,
    /// A reply to every message, rate-limited per correspondent.
    EveryTime,
}

impl AutoReplyKind {
    pub fn parse(text: &str) -> Option<AutoReplyKind> {
        match text {
            "echo" => Some(AutoReplyKind::Echo),
            "vacation" => Some(AutoReplyKind::Vacation),
            "every_time" => Some(AutoReplyKind::EveryTime),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AutoReplyKind::Echo => "echo",
            AutoReplyKind::Vacation => "vacation",
            AutoReplyKind::EveryTime => "every_time",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AutoReply {
    pub kind: AutoReplyKind,
    pub subject: String,
    pub body: String,
    pub active_from: Option<time::OffsetDateTime>,
    pub active_until: Option<time::OffsetDateTime>,
    pub interval: std::time::Duration,
    pub enabled: bool,
}

impl AutoReply {
    /// True when the reply is enabled and `now` is inside its active window.
    pub fn is_active(&self, now: time::OffsetDateTime) -> bool {
        self.enabled
            && self.active_from.is_none_or(|from| from <= now)
            && self.active_until.is_none_or(|until| now < until)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub id: i64,
    pub name: String,
    /// The account's addresses, the first one being its primary address.
    pub addresses: Vec<String>,
    pub mailbox: Option<Mailbox>,
    pub forwards: Vec<String>,
    pub relay_group: Option<String>,
    pub auto_reply: Option<AutoReply>,
    /// Argon2 PHC string for SMTP AUTH; None: the account cannot authenticate.
    pub password_hash: Option<String>,
}

impl Account {
    /// The address that speaks for the account (auto-replies, traces).
    pub fn primary_address(&self) -> Option<&str> {
        self.addresses
            .iter()
            .find(|a| !a.starts_with('@'))
            .map(String::as_str)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct List {
    pub id: i64,
    pub name: String,
    pub addresses: Vec<String>,
    pub owner: String,
    pub members: Vec<String>,
}

/// Owner of an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Owner {
    /// Index into [`Snapshot::accounts`].
    Account(u32),
    /// Index into [`Snapshot::lists`].
    List(u32),
}

/// The result of looking an address up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup<'a> {
    Account {
        account: &'a Account,
        /// Position in [`Snapshot::accounts`].
        index: usize,
        matched: &'a str,
    },
    List {
        list: &'a List,
        matched: &'a str,
    },
    /// The domain is in the directory, the address is not.
    Unknown {
        domain: &'a DomainEntry,
    },
    /// The domain is not in the directory.
    NotInDirectory,
}

/// A complete, consistent copy of the directory.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub version: i64,
    pub domains: HashMap<String, DomainEntry>,
    pub addresses: HashMap<String, Owner>,
    pub accounts: Vec<Account>,
    pub lists: Vec<List>,
    /// Account name to index into [`Snapshot::accounts`], for AUTH logins.
    pub account_names: HashMap<String, u32>,
}

/// Lowercases an address for lookup. The local part is compared without
/// regard to case, as mail operators expect, although RFC 5321 §2.4 lets a
/// server tell cases apart.
pub fn normalise_address(address: &str) -> String {
    address.to_lowercase()
}

impl Snapshot {
    pub fn domain(&self, name: &str) -> Option<&DomainEntry> {
        self.domains.get(name)
    }

    fn resolve_owner(&self, owner: Owner, matched: &str) -> Option<Lookup<'_>> {
        let (stored, _) = self.addresses.get_key_value(matched)?;
        Some(match owner {
            Owner::Account(index) => Lookup::Account {
                account: self.accounts.get(index as usize)?,
                index: index as usize,
                matched: stored,
            },
            Owner::List(index) => Lookup::List {
                list: self.lists.get(index as usize)?,
                matched: stored,
            },
        })
    }

    /// Looks up a normalised address: exact, then without its `+tag`, then
    /// the domain's catch-all.
    pub fn lookup(&self, address: &str) -> Lookup<'_> {
        let Some((local, domain)) = address.rsplit_once('@') else {
            return Lookup::NotInDirectory;
        };
        let Some(entry) = self.domains.get(domain) else {
            return Lookup::NotInDirectory;
        };

        let mut candidates = vec![address.to_string()];
        if let Some((base, _tag)) = local.split_once(SUBADDRESS_SEPARATOR)
            && !base.is_empty()
        {
            candidates.push(format!("{base}@{domain}"));
        }
        candidates.push(format!("@{domain}"));

        for candidate in &candidates {
            if let Some(owner) = self.addresses.get(candidate.as_str())
                && let Some(found) = self.resolve_owner(*owner, candidate)
            {
                return found;
            }
        }
        Lookup::Unknown { domain: entry }
    }

    /// Finds the account that an AUTH login names: one of its addresses,
    /// compared like a RCPT address (lowercase, A-label domain) but without
    /// sub-address or catch-all matching, or else its exact name.
    pub fn account_by_login(&self, login: &str) -> Option<&Account> {
        if let Some(address) = login_address(login)
            && let Some(Owner::Account(index)) = self.addresses.get(&address)
        {
            return self.accounts.get(*index as usize);
        }
        let index = self.account_names.get(login)?;
        self.accounts.get(*index as usize)
    }

    /// The number of addresses, for logs and metrics.
    pub fn address_count(&self) -> usize {
        self.addresses.len()
    }
}

/// Normalises a login that is written as an address; None when it is not one.
fn login_address(login: &str) -> Option<String> {
    if !login.contains('@') {
        return None;
    }
    let address = crate::policy::address::Address::parse(login).ok()?;
    address.domain().as_name()?;
    Some(normalise_address(&address.to_smtp()))
}

/// The current snapshot, swapped atomically on reload. Empty until the first
/// load succeeds.
#[derive(Default)]
pub struct Directory {
    current: ArcSwapOption<Snapshot>,
    /// Unix time in milliseconds of the last load; 0 before the first.
    loaded_at: AtomicU64,
    /// Unix time in milliseconds at which the version was last found current.
    checked_at: AtomicU64,
}

fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

fn seconds(millis: u64) -> Option<f64> {
    (millis > 0).then(|| millis as f64 / 1000.0)
}

impl Directory {
    pub fn new() -> Directory {
        Directory::default()
    }

    /// The snapshot in force, or None when the directory has not loaded yet.
    pub fn snapshot(&self) -> Option<Arc<Snapshot>> {
        self.current.load_full()
    }

    pub fn replace(&self, snapshot: Snapshot) {
        self.current.store(Some(Arc::new(snapshot)));
        let now = unix_millis();
        self.loaded_at.store(now, Ordering::Relaxed);
        self.checked_at.store(now, Ordering::Relaxed);
    }

    /// Notes that the snapshot in force was compared with the database's
    /// version and found current.
    pub fn mark_checked(&self) {
        self.checked_at.store(unix_millis(), Ordering::Relaxed);
    }

    /// Unix time in seconds of the last load, None before the first.
    pub fn loaded_at(&self) -> Option<f64> {
        seconds(self.loaded_at.load(Ordering::Relaxed))
    }

    /// Unix time in seconds of the last check or load, None before the first.
    pub fn checked_at(&self) -> Option<f64> {
        seconds(self.checked_at.load(Ordering::Relaxed))
    }

    pub fn version(&self) -> Option<i64> {
        self.current.load().as_ref().map(|s| s.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        let mut snapshot = Snapshot::default();
        snapshot.domains.insert(
            "example.com".into(),
            DomainEntry {
                kind: DomainKind::Local,
                legacy_group: None,
            },
        );
        snapshot.domains.insert(
            "catch.example".into(),
            DomainEntry {
                kind: DomainKind::Local,
                legacy_group: None,
            },
        );
        snapshot.accounts.push(Account {
            id: 1,
            name: "alice".into(),
            addresses: vec!["alice@example.com".into()],
            mailbox: None,
            forwards: vec![],
            relay_group: None,
            auto_reply: None,
            password_hash: Some("hash-of-alice".into()),
        });
        snapshot.accounts.push(Account {
            id: 2,
            name: "catcher".into(),
            addresses: vec!["@catch.example".into()],
            mailbox: None,
            forwards: vec![],
            relay_group: None,
            auto_reply: None,
            password_hash: None,
        });
        snapshot.account_names.insert("alice".into(), 0);
        snapshot.account_names.insert("catcher".into(), 1);
        snapshot
            .addresses
            .insert("alice@example.com".into(), Owner::Account(0));
        snapshot
            .addresses
            .insert("@catch.example".into(), Owner::Account(1));
        snapshot
    }

    #[test]
    fn login_by_address_or_name() {
        let snapshot = sample();
        let name_of = |login: &str| snapshot.account_by_login(login).map(|a| a.name.as_str());
        assert_eq!(name_of("alice@example.com"), Some("alice"));
        assert_eq!(name_of("Alice@EXAMPLE.com"), Some("alice"));
        assert_eq!(name_of("alice"), Some("alice"));
        assert_eq!(name_of("catcher"), Some("catcher"));
        // Sub-addresses and catch-alls receive mail but are no login names.
        assert_eq!(name_of("alice+tag@example.com"), None);
        assert_eq!(name_of("anyone@catch.example"), None);
        assert_eq!(name_of("@catch.example"), None);
        assert_eq!(name_of("Alice"), None);
        assert_eq!(name_of("nobody"), None);
    }

    #[test]
    fn lookup_exact_subaddress_and_catch_all() {
        let snapshot = sample();
        assert!(matches!(
            snapshot.lookup("alice@example.com"),
            Lookup::Account {
                matched: "alice@example.com",
                ..
            }
        ));
        assert!(matches!(
            snapshot.lookup("alice+news@example.com"),
            Lookup::Account {
                matched: "alice@example.com",
                ..
            }
        ));
        assert!(matches!(
            snapshot.lookup("bob@example.com"),
            Lookup::Unknown { .. }
        ));
        assert!(matches!(
            snapshot.lookup("+x@example.com"),
            Lookup::Unknown { .. }
        ));
        assert!(matches!(
            snapshot.lookup("anyone@catch.example"),
            Lookup::Account {
                matched: "@catch.example",
                ..
            }
        ));
        assert!(matches!(
            snapshot.lookup("bob@elsewhere.example"),
            Lookup::NotInDirectory
        ));
    }
}
