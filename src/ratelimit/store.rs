//! A keyed state store for governor's rate limiters with a bound on the
//! number of keys.
//!
//! governor's own keyed stores grow with every new key until
//! `retain_recent` runs, and `retain_recent` only drops keys whose state is
//! already back to fresh. A client that sprays source addresses or sender
//! addresses faster than that could grow them without bound. This store
//! keeps at most `capacity` keys: when a shard is full, it drops the eighth
//! of its keys with the earliest theoretical arrival time (GCRA's state).
//! Those are the keys closest to a fresh state, so dropping them loses the
//! least information: a key that is over its limit has the latest arrival time and goes
//! last.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::{Mutex, MutexGuard};

use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::state::keyed::ShrinkableKeyedStateStore;

/// Shards used once the capacity allows this many keys per shard, so that
/// sessions checking different keys rarely wait for the same lock.
const SHARDS: usize = 16;
const MIN_KEYS_PER_SHARD: usize = 64;

/// One state per key, at most `capacity` keys in all.
#[derive(Debug)]
pub struct BoundedStore<K> {
    /// The theoretical arrival time of each key, in nanoseconds since the
    /// rate limiter started.
    shards: Box<[Mutex<HashMap<K, u64>>]>,
    shard_capacity: usize,
    hasher: RandomState,
}

impl<K: Hash + Eq + Clone> BoundedStore<K> {
    /// Creates a store for at most `capacity` keys (at least 1).
    pub fn new(capacity: usize) -> BoundedStore<K> {
        let capacity = capacity.max(1);
        let shards = if capacity >= SHARDS * MIN_KEYS_PER_SHARD {
            SHARDS
        } else {
            1
        };
        BoundedStore {
            shards: (0..shards).map(|_| Mutex::new(HashMap::new())).collect(),
            // Rounded down, so the shards together never exceed `capacity`.
            shard_capacity: capacity / shards,
            hasher: RandomState::new(),
        }
    }

    fn shard(&self, key: &K) -> MutexGuard<'_, HashMap<K, u64>> {
        let index = if self.shards.len() == 1 {
            0
        } else {
            (self.hasher.hash_one(key) as usize) % self.shards.len()
        };
        lock(&self.shards[index])
    }

    /// Maximum number of keys the store keeps.
    pub fn capacity(&self) -> usize {
        self.shard_capacity * self.shards.len()
    }
}

/// Locks `mutex`, also when it is poisoned: every update is one map
/// operation, so a thread that panicked cannot leave the map half changed.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Drops the eighth of the keys (at least one) with the earliest arrival
/// times.
fn evict_earliest<K>(map: &mut HashMap<K, u64>) {
    let count = (map.len() / 8).max(1);
    let mut times: Vec<u64> = map.values().copied().collect();
    let (_, threshold, _) = times.select_nth_unstable(count - 1);
    let threshold = *threshold;
    map.retain(|_, time| *time > threshold);
}

impl<K: Hash + Eq + Clone> StateStore for BoundedStore<K> {
    type Key = K;

    fn measure_and_replace<T, F, E>(&self, key: &K, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut map = self.shard(key);
        if let Some(time) = map.get_mut(key) {
            let (outcome, next) = f(Some(Nanos::from(*time)))?;
            *time = next.into();
            return Ok(outcome);
        }
        // A refused cell stores nothing, so a key is only added once it
        // was allowed through.
        let (outcome, next) = f(None)?;
        if map.len() >= self.shard_capacity {
            evict_earliest(&mut map);
        }
        map.insert(key.clone(), next.into());
        Ok(outcome)
    }
}

impl<K: Hash + Eq + Clone> ShrinkableKeyedStateStore<K> for BoundedStore<K> {
    fn retain_recent(&self, drop_below: Nanos) {
        let drop_below: u64 = drop_below.into();
        for shard in &self.shards {
            lock(shard).retain(|_, time| *time > drop_below);
        }
    }

    fn shrink_to_fit(&self) {
        for shard in &self.shards {
            let mut map = lock(shard);
            // Shrinking reallocates, so only when most of the room is unused.
            if map.capacity() > 2 * map.len() + MIN_KEYS_PER_SHARD {
                map.shrink_to_fit();
            }
        }
    }

    fn len(&self) -> usize {
        self.shards.iter().map(|shard| lock(shard).len()).sum()
    }

    fn is_empty(&self) -> bool {
        self.shards.iter().all(|shard| lock(shard).is_empty())
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;
    use std::time::Duration;

    use governor::clock::FakeRelativeClock;
    use governor::middleware::NoOpMiddleware;
    use governor::{Quota, RateLimiter};

    use super::*;

    type TestLimiter<K> = RateLimiter<K, BoundedStore<K>, FakeRelativeClock, NoOpMiddleware<Nanos>>;

    fn limiter<K: Hash + Eq + Clone>(
        per_window: u32,
        window: Duration,
        capacity: usize,
    ) -> (TestLimiter<K>, FakeRelativeClock) {
        let count = NonZeroU32::new(per_window).expect("nonzero");
        let quota = Quota::with_period(window / per_window)
            .expect("period")
            .allow_burst(count);
        let clock = FakeRelativeClock::default();
        let limiter = RateLimiter::new(quota, BoundedStore::new(capacity), clock.clone());
        (limiter, clock)
    }

    #[test]
    fn spray_of_keys_stays_bounded() {
        let (limiter, clock) = limiter::<u32>(5, Duration::from_secs(3600), 10_000);
        for key in 0..200_000u32 {
            assert!(
                limiter.check_key(&key).is_ok(),
                "a new key is never limited"
            );
            if key % 1000 == 0 {
                clock.advance(Duration::from_millis(1));
            }
            assert!(
                limiter.len() <= 10_000,
                "{} keys after {key}",
                limiter.len()
            );
        }
        assert!(limiter.len() > 8_000, "the store stays nearly full");

        // The newest keys are still counted after the spray.
        let newest = 199_999u32;
        for _ in 0..4 {
            assert!(limiter.check_key(&newest).is_ok());
        }
        assert!(limiter.check_key(&newest).is_err());
    }

    #[test]
    fn key_over_its_limit_outlives_the_spray() {
        let (limiter, clock) = limiter::<u32>(3, Duration::from_secs(3600), 1_024);
        let busy = u32::MAX;
        for _ in 0..3 {
            assert!(limiter.check_key(&busy).is_ok());
        }
        assert!(limiter.check_key(&busy).is_err());
        for key in 0..100_000u32 {
            clock.advance(Duration::from_micros(10));
            let _ = limiter.check_key(&key);
        }
        assert!(limiter.len() <= 1_024);
        assert!(
            limiter.check_key(&busy).is_err(),
            "the key with the latest arrival time is evicted last"
        );
    }

    #[test]
    fn retain_recent_drops_fresh_keys() {
        let (limiter, clock) = limiter::<String>(2, Duration::from_secs(10), 1_000);
        for n in 0..100 {
            assert!(limiter.check_key(&format!("sender{n}@example.org")).is_ok());
        }
        assert_eq!(limiter.len(), 100);
        clock.advance(Duration::from_secs(5));
        limiter.retain_recent();
        assert_eq!(limiter.len(), 100, "a 5 s old use is not forgotten yet");
        clock.advance(Duration::from_secs(6));
        limiter.retain_recent();
        limiter.shrink_to_fit();
        assert!(limiter.is_empty());
    }

    #[test]
    fn limit_recovers_after_the_window() {
        let (limiter, clock) = limiter::<u32>(3, Duration::from_secs(60), 100);
        for _ in 0..3 {
            assert!(limiter.check_key(&1).is_ok());
        }
        assert!(limiter.check_key(&1).is_err());
        assert!(limiter.check_key(&2).is_ok(), "keys are counted apart");
        clock.advance(Duration::from_secs(20));
        assert!(
            limiter.check_key(&1).is_ok(),
            "one cell comes back per 20 s"
        );
        assert!(limiter.check_key(&1).is_err());
        clock.advance(Duration::from_secs(60));
        for _ in 0..3 {
            assert!(limiter.check_key(&1).is_ok());
        }
        assert!(limiter.check_key(&1).is_err());
    }
}
