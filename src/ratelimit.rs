//! Attempt limits: after `limit` attempts in a window, a key (an address, an account) is
//! refused until the window ends. Memory stays bounded: stale entries are pruned.

use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Debug)]
pub struct AttemptLimiter {
    limit: u32,
    window_secs: i64,
    attempts: Mutex<HashMap<String, (i64, u32)>>,
}

/// Entries kept before stale ones are pruned.
const PRUNE_AT: usize = 10_000;

impl AttemptLimiter {
    pub fn new(limit: u32, window_secs: i64) -> Self {
        AttemptLimiter {
            limit,
            window_secs,
            attempts: Mutex::new(HashMap::new()),
        }
    }

    fn window(&self, now: i64) -> i64 {
        now.div_euclid(self.window_secs)
    }

    /// Counts an attempt of `key` before it is judged (so that attempts racing each other
    /// cannot all pass the check): `Ok` if it may go on, `Err(first)` if the key is limited,
    /// `first` telling whether this is the window's first refused attempt (worth recording).
    /// A success should [`AttemptLimiter::clear`] the key.
    pub fn attempt(&self, key: &str, now: i64) -> Result<(), bool> {
        let window = self.window(now);
        let mut attempts = self.attempts.lock().expect("limiter lock");
        if attempts.len() >= PRUNE_AT {
            attempts.retain(|_, (w, _)| *w == window);
        }
        let entry = attempts.entry(key.to_string()).or_insert((window, 0));
        if entry.0 != window {
            *entry = (window, 0);
        }
        entry.1 = entry.1.saturating_add(1);
        match entry.1 {
            n if n > self.limit => Err(n == self.limit + 1),
            _ => Ok(()),
        }
    }

    /// Forgets `key`'s attempts (after a success).
    pub fn clear(&self, key: &str) {
        self.attempts.lock().expect("limiter lock").remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_are_counted_before_they_are_judged() {
        let limiter = AttemptLimiter::new(2, 60);
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
