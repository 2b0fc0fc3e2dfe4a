//! Rate limits per client address, envelope sender and authenticated user,
//! grouped in the named classes of `rate_limits`, enforced with governor's
//! GCRA rate limiters.
//!
//! Which class applies:
//! - to a connection: the class whose `networks` contain the client most
//!   specifically, else `default`. Only the client address is known then.
//! - to a recipient: the class that the deciding relay rule names in
//!   `rate_limit`, else the connection's class.
//!
//! What is counted:
//! - `connections_per_ip`: each connection, once it is admitted past the
//!   limit of open connections (`max_connections_per_ip`).
//! - `recipients_per_*`: each recipient that the policy accepts, before it
//!   is passed through or spooled.
//! - `messages_per_*`: each transaction once, at its first accepted
//!   recipient, so a MAIL that never gets a recipient does not count.
//!
//! Client addresses are keyed like the AUTH failure limit: IPv4 addresses,
//! and IPv6 addresses per /64. Senders are keyed in lowercase, and `<>`
//! is not counted per sender, because every bounce has it. A message or
//! recipient is checked against the address, the user and the sender, in
//! that order. governor counts a check as soon as it passes, so a refusal
//! by a later key has already counted at the earlier ones.
//!
//! Every limit of every class is its own governor rate limiter over a
//! [`store::BoundedStore`], so memory stays bounded under a spray of
//! addresses or senders. The listener calls [`RateLimits::tidy`] every
//! [`TIDY_INTERVAL`] to drop keys that are back to a fresh state.
//!
//! The counts live in one process: several listener processes each count
//! on their own, and a restart starts from zero. A configuration reload
//! keeps every limiter whose class, rate and key bound are unchanged.

pub mod store;

use std::collections::BTreeMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::DefaultClock;
use governor::{Quota, RateLimiter};

use crate::auth::limiter::ClientKey;
use crate::config::{DEFAULT_CLASS, Rate, RateClass, RateLimitName, RateLimitsConfig};
use crate::smtp::reply::Reply;
use store::BoundedStore;

/// How often keys that are back to a fresh state are dropped.
pub const TIDY_INTERVAL: Duration = Duration::from_secs(60);

/// One limit of one class, keyed by `K`.
#[derive(Debug)]
pub struct Limiter<K: Hash + Eq + Clone> {
    rate: Rate,
    max_keys: usize,
    governor: RateLimiter<K, BoundedStore<K>, DefaultClock>,
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    fn new(rate: Rate, max_keys: usize) -> Limiter<K> {
        // GCRA: `count` cells at once, then one more every window / count.
        let period = (rate.window / rate.count.get()).max(Duration::from_nanos(1));
        let quota = Quota::with_period(period)
            .expect("the period is at least 1 ns")
            .allow_burst(rate.count);
        Limiter {
            rate,
            max_keys,
            governor: RateLimiter::new(quota, BoundedStore::new(max_keys), DefaultClock::default()),
        }
    }

    /// Counts one event for `key`; false when the key is over the limit.
    fn allows(&self, key: &K) -> bool {
        self.governor.check_key(key).is_ok()
    }

    fn tidy(&self) {
        self.governor.retain_recent();
        self.governor.shrink_to_fit();
    }

    /// Returns the number of keys tracked now.
    pub fn tracked_keys(&self) -> usize {
        self.governor.len()
    }
}

/// A limit that refused a connection, message or recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hit {
    pub limit: RateLimitName,
    pub class: String,
    pub rate: Rate,
}

impl Hit {
    /// Returns the reply that names the limit: 421 for connections, 451
    /// for messages and recipients.
    pub fn reply(&self) -> Reply {
        match self.limit {
            RateLimitName::ConnectionsPerIp => Reply::too_many_new_connections(),
            RateLimitName::MessagesPerIp => Reply::rate_limited("messages from your address"),
            RateLimitName::RecipientsPerIp => Reply::rate_limited("recipients from your address"),
            RateLimitName::MessagesPerSender => Reply::rate_limited("messages from this sender"),
            RateLimitName::RecipientsPerSender => {
                Reply::rate_limited("recipients from this sender")
            }
            RateLimitName::MessagesPerUser => Reply::rate_limited("messages from your account"),
            RateLimitName::RecipientsPerUser => Reply::rate_limited("recipients from your account"),
        }
    }
}

/// The client, account and sender of a message or recipient: the keys
/// that the limits count.
#[derive(Clone, Copy, Debug)]
pub struct Sender<'a> {
    pub client: IpAddr,
    /// The account after SMTP AUTH.
    pub user: Option<&'a str>,
    /// The reverse-path; "" for `<>`.
    pub address: &'a str,
}

/// The limiters of one class. Limits the class does not set have none.
#[derive(Debug)]
pub struct ClassLimits {
    settings: RateClass,
    by_client: BTreeMap<RateLimitName, Arc<Limiter<ClientKey>>>,
    by_text: BTreeMap<RateLimitName, Arc<Limiter<String>>>,
}

impl ClassLimits {
    fn new(settings: &RateClass, max_keys: usize, previous: Option<&ClassLimits>) -> ClassLimits {
        let mut by_client = BTreeMap::new();
        let mut by_text = BTreeMap::new();
        for (&name, &rate) in &settings.rates {
            let keyed_by_client = matches!(
                name,
                RateLimitName::ConnectionsPerIp
                    | RateLimitName::MessagesPerIp
                    | RateLimitName::RecipientsPerIp
            );
            if keyed_by_client {
                let reused = previous
                    .and_then(|class| class.by_client.get(&name))
                    .filter(|limiter| limiter.rate == rate && limiter.max_keys == max_keys);
                let limiter = match reused {
                    Some(limiter) => Arc::clone(limiter),
                    None => Arc::new(Limiter::new(rate, max_keys)),
                };
                by_client.insert(name, limiter);
            } else {
                let reused = previous
                    .and_then(|class| class.by_text.get(&name))
                    .filter(|limiter| limiter.rate == rate && limiter.max_keys == max_keys);
                let limiter = match reused {
                    Some(limiter) => Arc::clone(limiter),
                    None => Arc::new(Limiter::new(rate, max_keys)),
                };
                by_text.insert(name, limiter);
            }
        }
        ClassLimits {
            settings: settings.clone(),
            by_client,
            by_text,
        }
    }

    pub fn name(&self) -> &str {
        &self.settings.name
    }

    /// Open connections allowed per client address (IPv6: per /64).
    pub fn max_connections_per_ip(&self) -> usize {
        self.settings.max_connections_per_ip
    }

    fn hit(&self, limit: RateLimitName) -> Hit {
        Hit {
            limit,
            class: self.settings.name.clone(),
            rate: self.settings.rates[&limit],
        }
    }

    fn check_client(&self, limit: RateLimitName, client: IpAddr) -> Result<(), Hit> {
        match self.by_client.get(&limit) {
            Some(limiter) if !limiter.allows(&ClientKey::from_ip(client)) => Err(self.hit(limit)),
            _ => Ok(()),
        }
    }

    fn check_text(&self, limit: RateLimitName, key: &str) -> Result<(), Hit> {
        match self.by_text.get(&limit) {
            Some(limiter) if !limiter.allows(&key.to_lowercase()) => Err(self.hit(limit)),
            _ => Ok(()),
        }
    }

    /// Counts a new connection from `client`.
    pub fn check_connection(&self, client: IpAddr) -> Result<(), Hit> {
        self.check_client(RateLimitName::ConnectionsPerIp, client)
    }

    /// Counts a message: per address, per user and per sender.
    pub fn check_message(&self, sender: &Sender<'_>) -> Result<(), Hit> {
        self.check_all(
            sender,
            [
                RateLimitName::MessagesPerIp,
                RateLimitName::MessagesPerUser,
                RateLimitName::MessagesPerSender,
            ],
        )
    }

    /// Counts a recipient: per address, per user and per sender.
    pub fn check_recipient(&self, sender: &Sender<'_>) -> Result<(), Hit> {
        self.check_all(
            sender,
            [
                RateLimitName::RecipientsPerIp,
                RateLimitName::RecipientsPerUser,
                RateLimitName::RecipientsPerSender,
            ],
        )
    }

    /// `limits` names the per-address, per-user and per-sender limit.
    fn check_all(&self, sender: &Sender<'_>, limits: [RateLimitName; 3]) -> Result<(), Hit> {
        let [per_client, per_user, per_sender] = limits;
        self.check_client(per_client, sender.client)?;
        if let Some(user) = sender.user {
            self.check_text(per_user, user)?;
        }
        if !sender.address.is_empty() {
            self.check_text(per_sender, sender.address)?;
        }
        Ok(())
    }

    fn limiter_sizes(&self) -> impl Iterator<Item = usize> + '_ {
        let by_client = self.by_client.values().map(|l| l.tracked_keys());
        let by_text = self.by_text.values().map(|l| l.tracked_keys());
        by_client.chain(by_text)
    }

    fn tidy(&self) {
        self.by_client.values().for_each(|limiter| limiter.tidy());
        self.by_text.values().for_each(|limiter| limiter.tidy());
    }
}

/// Every class with its limiters.
#[derive(Debug)]
pub struct RateLimits {
    classes: BTreeMap<String, Arc<ClassLimits>>,
    config: RateLimitsConfig,
}

impl RateLimits {
    /// Builds the limiters of `config`, each tracking at most `max_keys`
    /// keys. Limiters of `previous` whose class, rate and bound are
    /// unchanged are kept with their counts.
    pub fn new(
        config: &RateLimitsConfig,
        max_keys: usize,
        previous: Option<&RateLimits>,
    ) -> RateLimits {
        let mut classes = BTreeMap::new();
        for (name, settings) in &config.classes {
            let old = previous.and_then(|limits| limits.classes.get(name));
            let class = ClassLimits::new(settings, max_keys, old.map(|class| class.as_ref()));
            classes.insert(name.clone(), Arc::new(class));
        }
        RateLimits {
            classes,
            config: config.clone(),
        }
    }

    pub fn default_class(&self) -> &Arc<ClassLimits> {
        &self.classes[DEFAULT_CLASS]
    }

    pub fn class(&self, name: &str) -> Option<&Arc<ClassLimits>> {
        self.classes.get(name)
    }

    /// Returns the class of a connection from `client`: the class whose
    /// network contains it most specifically, else `default`.
    pub fn class_for_client(&self, client: IpAddr) -> &Arc<ClassLimits> {
        let name = &self.config.class_for_client(client).name;
        self.classes
            .get(name)
            .unwrap_or_else(|| self.default_class())
    }

    /// Drops keys that are back to a fresh state and frees unused room.
    pub fn tidy(&self) {
        self.classes.values().for_each(|class| class.tidy());
    }

    /// Returns the keys tracked by all limiters together.
    pub fn tracked_keys(&self) -> usize {
        self.classes
            .values()
            .flat_map(|class| class.limiter_sizes())
            .sum()
    }

    /// Returns the number of classes, `default` included.
    pub fn class_count(&self) -> usize {
        self.classes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const CONFIG: &str = "\
listeners:
  - address: 127.0.0.1:2525
rate_limits:
  default:
    connections_per_ip: 2/1h
    messages_per_sender: 2/1h
    recipients_per_ip: 3/1h
  customers:
    networks: [10.20.0.0/16, 10.20.30.0/24, '2001:db8:20::/48']
    max_connections_per_ip: 40
    messages_per_sender: 5/1h
  vip:
    networks: [10.20.30.0/25]
    connections_per_ip: none
";

    fn limits(text: &str) -> (Config, RateLimits) {
        let config = Config::parse(text, None).expect("valid");
        let limits = RateLimits::new(&config.rate_limits, 1_000, None);
        (config, limits)
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    #[test]
    fn most_specific_network_picks_the_class() {
        let (_, limits) = limits(CONFIG);
        for (client, class) in [
            ("192.0.2.1", "default"),
            ("10.20.1.1", "customers"),
            ("10.20.30.200", "customers"),
            ("10.20.30.7", "vip"),
            ("::ffff:10.20.30.7", "vip"),
            ("2001:db8:20:1::5", "customers"),
            ("2001:db8:21::5", "default"),
        ] {
            assert_eq!(
                limits.class_for_client(ip(client)).name(),
                class,
                "{client}"
            );
        }
        assert_eq!(
            limits
                .class("customers")
                .expect("class")
                .max_connections_per_ip(),
            40
        );
        assert_eq!(limits.default_class().max_connections_per_ip(), 20);
    }

    #[test]
    fn connection_limit_names_class_and_limit() {
        let (_, limits) = limits(CONFIG);
        let default = limits.default_class();
        assert!(default.check_connection(ip("192.0.2.1")).is_ok());
        assert!(default.check_connection(ip("192.0.2.1")).is_ok());
        let hit = default
            .check_connection(ip("192.0.2.1"))
            .expect_err("third is over");
        assert_eq!(hit.limit, RateLimitName::ConnectionsPerIp);
        assert_eq!(hit.class, "default");
        assert_eq!(
            hit.reply().summary(),
            "421 4.7.0 Too many new connections from your address, try again later"
        );
        let vip = limits.class("vip").expect("vip");
        for _ in 0..100 {
            assert!(
                vip.check_connection(ip("10.20.30.7")).is_ok(),
                "none lifts the limit"
            );
        }
    }

    #[test]
    fn ipv6_clients_share_their_64() {
        let (_, limits) = limits(CONFIG);
        let default = limits.default_class();
        assert!(default.check_connection(ip("2001:db8:99:1::1")).is_ok());
        assert!(
            default
                .check_connection(ip("2001:db8:99:1:ffff::2"))
                .is_ok()
        );
        assert!(default.check_connection(ip("2001:db8:99:1::3")).is_err());
        assert!(default.check_connection(ip("2001:db8:99:2::1")).is_ok());
    }

    #[test]
    fn sender_case_and_null_sender() {
        let (_, limits) = limits(CONFIG);
        let default = limits.default_class();
        let sender = |address| Sender {
            client: ip("192.0.2.1"),
            user: None,
            address,
        };
        assert!(default.check_message(&sender("a@example.org")).is_ok());
        assert!(default.check_message(&sender("A@Example.ORG")).is_ok());
        let hit = default
            .check_message(&sender("a@example.org"))
            .expect_err("third message");
        assert_eq!(hit.limit, RateLimitName::MessagesPerSender);
        assert_eq!(
            hit.reply().summary(),
            "451 4.7.1 Too many messages from this sender, try again later"
        );
        for _ in 0..10 {
            assert!(default.check_message(&sender("")).is_ok());
        }
        let customers = limits.class("customers").expect("class");
        for _ in 0..5 {
            assert!(customers.check_message(&sender("a@example.org")).is_ok());
        }
        assert!(customers.check_message(&sender("a@example.org")).is_err());
    }

    #[test]
    fn recipients_are_counted_per_address() {
        let (_, limits) = limits(CONFIG);
        let default = limits.default_class();
        let from = |client| Sender {
            client: ip(client),
            user: Some("alice"),
            address: "",
        };
        for _ in 0..3 {
            assert!(default.check_recipient(&from("192.0.2.1")).is_ok());
        }
        let hit = default
            .check_recipient(&from("192.0.2.1"))
            .expect_err("fourth recipient");
        assert_eq!(hit.limit, RateLimitName::RecipientsPerIp);
        assert!(default.check_recipient(&from("192.0.2.2")).is_ok());
    }

    #[test]
    fn reload_keeps_unchanged_limiters() {
        let (_, first) = limits(CONFIG);
        let client = ip("192.0.2.1");
        assert!(first.default_class().check_connection(client).is_ok());
        assert!(first.default_class().check_connection(client).is_ok());

        let changed = CONFIG.replace("messages_per_sender: 5/1h", "messages_per_sender: 6/1h");
        let config = Config::parse(&changed, None).expect("valid");
        let second = RateLimits::new(&config.rate_limits, 1_000, Some(&first));
        assert!(
            second.default_class().check_connection(client).is_err(),
            "the unchanged limit keeps its count"
        );

        let changed = CONFIG.replace("connections_per_ip: 2/1h", "connections_per_ip: 3/1h");
        let config = Config::parse(&changed, None).expect("valid");
        let third = RateLimits::new(&config.rate_limits, 1_000, Some(&second));
        assert!(
            third.default_class().check_connection(client).is_ok(),
            "a changed limit starts from zero"
        );
    }
}
