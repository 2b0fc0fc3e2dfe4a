//! Counts failed AUTH attempts per client in memory, in a fixed window that
//! starts with the client's first failure.
//!
//! A client is an IPv4 address, or an IPv6 /64 network, because one host
//! commonly has a whole /64 and could otherwise spread its guesses over
//! addresses. The map contains at most `capacity` clients. When it is full,
//! clients whose window ended are dropped first, then the client whose
//! window started earliest. An attacker who sprays failures from more than
//! `capacity` sources can therefore push older clients out early, but
//! memory stays bounded.
//!
//! The counts live in one process: several wsmtp processes, or a restart,
//! each start from zero.
//!
//! `governor`'s keyed rate limiter was not used because a limiter is asked
//! before the AUTH exchange whether a client is blocked, and governor can
//! only answer that by consuming a cell.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Clients tracked at once; about 48 bytes each plus the map's overhead.
pub const DEFAULT_CAPACITY: usize = 100_000;

/// The unit that failures are counted for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientKey(IpAddr);

impl ClientKey {
    /// The IPv4 address (IPv4-mapped IPv6 included), or the IPv6 /64 network.
    pub fn from_ip(ip: IpAddr) -> ClientKey {
        match ip {
            IpAddr::V4(v4) => ClientKey(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey(IpAddr::V4(v4)),
                None => {
                    let network = u128::from(v6) & !((1u128 << 64) - 1);
                    ClientKey(IpAddr::V6(network.into()))
                }
            },
        }
    }
}

#[derive(Debug)]
struct Entry {
    /// Time of the first failure of the current window; meaningless while
    /// `failures` is 0.
    window_start: Instant,
    failures: u32,
    /// Verifications under way, reserved by [`FailureLimiter::reserve`].
    pending: u32,
}

/// Failed attempts per client, bounded in memory.
#[derive(Debug)]
pub struct FailureLimiter {
    max_failures: u32,
    window: Duration,
    capacity: usize,
    entries: Mutex<HashMap<ClientKey, Entry>>,
}

/// One verification that counts against the client's limit while it runs.
/// Dropping it without [`Reservation::failed`] releases it without a failure.
#[must_use]
pub struct Reservation<'a> {
    limiter: &'a FailureLimiter,
    /// None when the map was full of busy clients and this one is not tracked.
    key: Option<ClientKey>,
    /// Set when the failure was recorded or nothing is left to release.
    settled: bool,
}

/// The result of recording a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailureCount {
    /// Failures of the client in the current window, this one included.
    pub failures: u32,
    /// True when this failure reached the limit.
    pub limit_reached: bool,
}

impl FailureLimiter {
    pub fn new(max_failures: u32, window: Duration, capacity: usize) -> FailureLimiter {
        FailureLimiter {
            max_failures: max_failures.max(1),
            window,
            capacity: capacity.max(1),
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ClientKey, Entry>> {
        // The map stays consistent even if a holder panicked: every update
        // is a single field write.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn expired(&self, entry: &Entry, now: Instant) -> bool {
        entry.failures > 0 && now.saturating_duration_since(entry.window_start) >= self.window
    }

    /// True when the client reached the limit and its window has not ended.
    pub fn is_blocked(&self, ip: IpAddr, now: Instant) -> bool {
        let entries = self.lock();
        match entries.get(&ClientKey::from_ip(ip)) {
            Some(entry) => !self.expired(entry, now) && entry.failures >= self.max_failures,
            None => false,
        }
    }

    /// Reserves one verification for the client, or returns None when its
    /// failures and the verifications under way already reach the limit.
    /// Counting the ones under way stops parallel connections from getting
    /// more guesses than the limit.
    pub fn reserve(&self, ip: IpAddr, now: Instant) -> Option<Reservation<'_>> {
        let key = ClientKey::from_ip(ip);
        let mut entries = self.lock();
        if !entries.contains_key(&key) && entries.len() >= self.capacity {
            self.make_room(&mut entries, now);
            if entries.len() >= self.capacity {
                return Some(Reservation {
                    limiter: self,
                    key: None,
                    settled: true,
                });
            }
        }
        let entry = entries.entry(key).or_insert(Entry {
            window_start: now,
            failures: 0,
            pending: 0,
        });
        if self.expired(entry, now) {
            entry.failures = 0;
        }
        if entry.failures + entry.pending >= self.max_failures {
            return None;
        }
        entry.pending += 1;
        Some(Reservation {
            limiter: self,
            key: Some(key),
            settled: false,
        })
    }

    /// Drops clients whose window ended, then, if the map is still full, the
    /// idle client whose window started earliest.
    fn make_room(&self, entries: &mut HashMap<ClientKey, Entry>, now: Instant) {
        entries.retain(|_, entry| {
            entry.pending > 0 || (entry.failures > 0 && !self.expired(entry, now))
        });
        if entries.len() < self.capacity {
            return;
        }
        let oldest = entries
            .iter()
            .filter(|(_, entry)| entry.pending == 0)
            .min_by_key(|(_, entry)| entry.window_start)
            .map(|(key, _)| *key);
        if let Some(key) = oldest {
            entries.remove(&key);
        }
    }

    fn settle(&self, key: ClientKey, failed: bool, now: Instant) -> FailureCount {
        let mut entries = self.lock();
        let Some(entry) = entries.get_mut(&key) else {
            return FailureCount {
                failures: 0,
                limit_reached: false,
            };
        };
        entry.pending = entry.pending.saturating_sub(1);
        if self.expired(entry, now) {
            entry.failures = 0;
        }
        if failed {
            if entry.failures == 0 {
                entry.window_start = now;
            }
            entry.failures += 1;
        }
        let count = FailureCount {
            failures: entry.failures,
            limit_reached: failed && entry.failures == self.max_failures,
        };
        if entry.failures == 0 && entry.pending == 0 {
            entries.remove(&key);
        }
        count
    }

    /// Returns the number of clients tracked, for tests and metrics.
    pub fn tracked_clients(&self) -> usize {
        self.lock().len()
    }
}

impl Reservation<'_> {
    /// Records the verification as a failure.
    pub fn failed(mut self, now: Instant) -> FailureCount {
        self.settled = true;
        match self.key {
            Some(key) => self.limiter.settle(key, true, now),
            None => FailureCount {
                failures: 0,
                limit_reached: false,
            },
        }
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.settled
            && let Some(key) = self.key
        {
            self.limiter.settle(key, false, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(900);

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    fn fail(limiter: &FailureLimiter, client: &str, now: Instant) -> FailureCount {
        limiter
            .reserve(ip(client), now)
            .expect("not blocked")
            .failed(now)
    }

    #[test]
    fn blocks_at_the_limit_until_the_window_ends() {
        let limiter = FailureLimiter::new(3, WINDOW, 100);
        let start = Instant::now();
        assert_eq!(fail(&limiter, "192.0.2.1", start).failures, 1);
        assert!(!fail(&limiter, "192.0.2.1", start).limit_reached);
        assert!(!limiter.is_blocked(ip("192.0.2.1"), start));
        let third = fail(&limiter, "192.0.2.1", start + Duration::from_secs(10));
        assert!(third.limit_reached);
        assert!(limiter.is_blocked(ip("192.0.2.1"), start + Duration::from_secs(10)));
        assert!(
            limiter
                .reserve(ip("192.0.2.1"), start + Duration::from_secs(10))
                .is_none()
        );
        assert!(!limiter.is_blocked(ip("192.0.2.2"), start));

        // The window runs from the first failure, not the last.
        let later = start + WINDOW;
        assert!(!limiter.is_blocked(ip("192.0.2.1"), later));
        assert_eq!(fail(&limiter, "192.0.2.1", later).failures, 1);
    }

    #[test]
    fn success_releases_without_counting() {
        let limiter = FailureLimiter::new(2, WINDOW, 100);
        let now = Instant::now();
        let reservation = limiter.reserve(ip("192.0.2.1"), now).expect("reserve");
        drop(reservation);
        assert_eq!(limiter.tracked_clients(), 0);
        assert_eq!(fail(&limiter, "192.0.2.1", now).failures, 1);
    }

    #[test]
    fn parallel_verifications_count_toward_the_limit() {
        let limiter = FailureLimiter::new(2, WINDOW, 100);
        let now = Instant::now();
        let first = limiter.reserve(ip("192.0.2.1"), now).expect("first");
        let second = limiter.reserve(ip("192.0.2.1"), now).expect("second");
        assert!(limiter.reserve(ip("192.0.2.1"), now).is_none());
        drop(first);
        assert!(second.failed(now).failures == 1);
        assert!(limiter.reserve(ip("192.0.2.1"), now).is_some());
    }

    #[test]
    fn ipv6_counts_per_64_network() {
        let limiter = FailureLimiter::new(2, WINDOW, 100);
        let now = Instant::now();
        fail(&limiter, "2001:db8:1:2::1", now);
        fail(&limiter, "2001:db8:1:2:ffff::9", now);
        assert!(limiter.is_blocked(ip("2001:db8:1:2::77"), now));
        assert!(!limiter.is_blocked(ip("2001:db8:1:3::1"), now));
        fail(&limiter, "::ffff:192.0.2.9", now);
        fail(&limiter, "192.0.2.9", now);
        assert!(limiter.is_blocked(ip("192.0.2.9"), now));
    }

    #[test]
    fn memory_stays_bounded_under_a_spray() {
        let limiter = FailureLimiter::new(5, WINDOW, 64);
        let start = Instant::now();
        for n in 0..10_000u32 {
            let client = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n));
            let now = start + Duration::from_millis(u64::from(n));
            limiter
                .reserve(client, now)
                .expect("a new client is never blocked")
                .failed(now);
            assert!(limiter.tracked_clients() <= 64);
        }
        // The newest clients are still counted.
        let newest = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + 9_999));
        let now = start + Duration::from_secs(10);
        for _ in 0..4 {
            limiter.reserve(newest, now).expect("reserve").failed(now);
        }
        assert!(limiter.is_blocked(newest, now));
    }

    #[test]
    fn expired_clients_make_room_first() {
        let limiter = FailureLimiter::new(5, Duration::from_secs(60), 2);
        let start = Instant::now();
        fail(&limiter, "192.0.2.1", start);
        fail(&limiter, "192.0.2.2", start + Duration::from_secs(30));
        // 192.0.2.1's window ended; it goes, 192.0.2.2 stays.
        fail(&limiter, "192.0.2.3", start + Duration::from_secs(61));
        assert_eq!(limiter.tracked_clients(), 2);
        let now = start + Duration::from_secs(62);
        for _ in 0..4 {
            fail(&limiter, "192.0.2.2", now);
        }
        assert!(limiter.is_blocked(ip("192.0.2.2"), now));
    }
}
