//! Failure limits: after `limit` failures in a window, a key (an address, an account) is
//! refused until the window ends. Memory stays bounded: stale entries are pruned.

use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Debug)]
pub struct FailureLimiter {
    limit: u32,
    window_secs: i64,
    failures: Mutex<HashMap<String, (i64, u32)>>,
}

/// Entries kept before stale ones are pruned.
const PRUNE_AT: usize = 10_000;

impl FailureLimiter {
    pub fn new(limit: u32, window_secs: i64) -> Self {
        FailureLimiter {
            limit,
            window_secs,
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn window(&self, now: i64) -> i64 {
        now.div_euclid(self.window_secs)
    }

    /// Whether `key` has used up its failures in the current window.
    pub fn is_limited(&self, key: &str, now: i64) -> bool {
        let failures = self.failures.lock().expect("limiter lock");
        failures
            .get(key)
            .is_some_and(|(window, count)| *window == self.window(now) && *count >= self.limit)
    }

    /// Counts a failure of `key`.
    pub fn record_failure(&self, key: &str, now: i64) {
        self.count(key, now);
    }

    /// Counts an attempt of `key` before it is judged (so that attempts racing each other
    /// cannot all pass the check): `Ok` if it may go on, `Err(first)` if the key is limited,
    /// `first` telling whether this is the window's first refused attempt (worth recording).
    /// A success should [`FailureLimiter::clear`] the key.
    pub fn attempt(&self, key: &str, now: i64) -> Result<(), bool> {
        match self.count(key, now) {
            n if n > self.limit => Err(n == self.limit + 1),
            _ => Ok(()),
        }
    }

    /// Adds one to `key`'s count in the current window and returns it.
    fn count(&self, key: &str, now: i64) -> u32 {
        let window = self.window(now);
        let mut failures = self.failures.lock().expect("limiter lock");
        if failures.len() >= PRUNE_AT {
            failures.retain(|_, (w, _)| *w == window);
        }
        let entry = failures.entry(key.to_string()).or_insert((window, 0));
        if entry.0 != window {
            *entry = (window, 0);
        }
        entry.1 = entry.1.saturating_add(1);
        entry.1
    }

    /// Forgets `key`'s failures (after a success).
    pub fn clear(&self, key: &str) {
        self.failures.lock().expect("limiter lock").remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_after_the_allowed_failures_until_the_window_ends() {
        let limiter = FailureLimiter::new(3, 60);
        for _ in 0..3 {
            assert!(!limiter.is_limited("10.0.0.1", 120));
            limiter.record_failure("10.0.0.1", 120);
        }
        assert!(limiter.is_limited("10.0.0.1", 179));
        assert!(!limiter.is_limited("10.0.0.2", 179), "per key");
        assert!(!limiter.is_limited("10.0.0.1", 180), "a new window");
        limiter.record_failure("10.0.0.1", 180);
        assert!(!limiter.is_limited("10.0.0.1", 180));
        limiter.clear("10.0.0.1");
        assert!(!limiter.is_limited("10.0.0.1", 180));
    }

    #[test]
    fn attempts_are_counted_before_they_are_judged() {
        let limiter = FailureLimiter::new(2, 60);
        assert_eq!(limiter.attempt("admin", 120), Ok(()));
        assert_eq!(limiter.attempt("admin", 121), Ok(()));
        assert_eq!(
            limiter.attempt("admin", 122),
            Err(true),
            "the first refusal"
        );
        assert_eq!(limiter.attempt("admin", 123), Err(false));
        assert_eq!(limiter.attempt("other", 123), Ok(()), "per key");
        assert_eq!(limiter.attempt("admin", 180), Ok(()), "a new window");
        limiter.clear("admin");
        assert_eq!(limiter.attempt("admin", 181), Ok(()));
    }
}
