//! Attempt limits: after `limit` attempts in a window, a key (an address, an account) is
//! refused until the window ends. Memory stays bounded: entries of past windows are pruned.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};

#[derive(Debug)]
pub struct AttemptLimiter {
    limit: u32,
    window_secs: i64,
    attempts: Mutex<Attempts>,
}

#[derive(Debug, Default)]
struct Attempts {
    /// The window of the last pruning: at most one per window, so a flood of distinct keys
    /// does not make every attempt scan the map.
    pruned: i64,
    /// Per key: its window and the attempts counted in it.
    by_key: HashMap<String, (i64, u32)>,
}

/// Entries kept before those of past windows are pruned.
const PRUNE_AT: usize = 10_000;

impl AttemptLimiter {
    pub fn new(limit: u32, window_secs: i64) -> Self {
        AttemptLimiter {
            limit,
            window_secs,
            attempts: Mutex::new(Attempts::default()),
        }
    }

    fn window(&self, now: i64) -> i64 {
        now.div_euclid(self.window_secs)
    }

    /// Whether `key` has used up its attempts in the current window (counts nothing): a
    /// cheap refusal before any work.
    pub fn is_limited(&self, key: &str, now: i64) -> bool {
        let attempts = self.attempts.lock().expect("limiter lock");
        attempts
            .by_key
            .get(key)
            .is_some_and(|(window, count)| *window == self.window(now) && *count >= self.limit)
    }

    /// Counts an attempt of `key` before it is judged (so that attempts racing each other
    /// cannot all pass the check): `Ok` if it may go on, `Err(first)` if the key is limited,
    /// `first` telling whether this is the window's first refused attempt (worth recording).
    pub fn attempt(&self, key: &str, now: i64) -> Result<(), bool> {
        let window = self.window(now);
        let mut attempts = self.attempts.lock().expect("limiter lock");
        if attempts.by_key.len() >= PRUNE_AT && attempts.pruned != window {
            attempts.by_key.retain(|_, (w, _)| *w == window);
            attempts.pruned = window;
        }
        let entry = attempts
            .by_key
            .entry(key.to_string())
            .or_insert((window, 0));
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
        self.attempts
            .lock()
            .expect("limiter lock")
            .by_key
            .remove(key);
    }
}

/// The portal's sign-in limits. Attempts count per (account, address), so a host guessing an
/// admin's password locks that admin out of that host only; per address, so a host cannot
/// go through many names; and per account over every address at a higher rate, which slows
/// a guess spread over many hosts (only such a spread attack keeps an admin out).
#[derive(Debug)]
pub struct SignInLimits {
    by_pair: AttemptLimiter,
    by_address: AttemptLimiter,
    by_account: AttemptLimiter,
}

impl Default for SignInLimits {
    fn default() -> Self {
        SignInLimits {
            by_pair: AttemptLimiter::new(5, 60),
            by_address: AttemptLimiter::new(20, 60),
            by_account: AttemptLimiter::new(100, 60),
        }
    }
}

impl SignInLimits {
    /// Counts an attempt to sign in as `account` from `address` (a [`client_key`]), as
    /// [`AttemptLimiter::attempt`]. The narrower keys are counted only once the wider ones
    /// let the attempt go on: an address past its limit adds no entry for every name it tries.
    pub fn attempt(&self, account: &str, address: &str, now: i64) -> Result<(), bool> {
        self.by_address.attempt(address, now)?;
        self.by_pair
            .attempt(&format!("{account}\n{address}"), now)?;
        self.by_account.attempt(account, now)
    }

    /// Forgets the attempts of this account from this address after a success. The
    /// address's count over all names and the account's over all addresses stay: signing in
    /// to one's own account must not give a guess at other names (or a spread guess at this
    /// one) more attempts.
    pub fn clear(&self, account: &str, address: &str) {
        self.by_pair.clear(&format!("{account}\n{address}"));
    }
}

/// The key a client's attempts (session passwords, portal sign-ins) are counted under: its
/// IPv4 address, or the /64 of its IPv6 address (one host usually has a whole /64 to pick addresses from).
pub fn client_key(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("{}/64", Ipv6Addr::from(u128::from(v6) & !(u128::MAX >> 64))),
    }
}

/// `true` at most once a minute however many threads ask: gates a warning that a flood
/// would otherwise repeat thousands of times a second.
#[derive(Debug, Default)]
pub struct OncePerMinute(AtomicI64);

impl OncePerMinute {
    pub const fn new() -> Self {
        OncePerMinute(AtomicI64::new(0))
    }

    /// Whether a minute has passed since the last `true` (by `now`, Unix seconds; a clock
    /// set back counts as well).
    pub fn ready(&self, now: i64) -> bool {
        let last = self.0.load(Ordering::Relaxed);
        now.abs_diff(last) >= 60
            && self
                .0
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// [`client_key`] of the request's peer.
pub fn request_key(req: &actix_web::HttpRequest) -> String {
    req.peer_addr()
        .map(|a| client_key(a.ip()))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_are_counted_before_they_are_judged() {
        let limiter = AttemptLimiter::new(2, 60);
        assert_eq!(limiter.attempt("admin", 120), Ok(()));
        assert!(!limiter.is_limited("admin", 120));
        assert_eq!(limiter.attempt("admin", 121), Ok(()));
        assert!(limiter.is_limited("admin", 121), "both used");
        assert_eq!(
            limiter.attempt("admin", 122),
            Err(true),
            "the first refusal"
        );
        assert_eq!(limiter.attempt("admin", 123), Err(false));
        assert_eq!(limiter.attempt("other", 123), Ok(()), "per key");
        assert!(!limiter.is_limited("admin", 180), "a new window");
        assert_eq!(limiter.attempt("admin", 180), Ok(()));
        limiter.clear("admin");
        assert_eq!(limiter.attempt("admin", 181), Ok(()));
    }

    #[test]
    fn a_host_guessing_an_admins_password_does_not_lock_the_admin_out_elsewhere() {
        let limits = SignInLimits::default();
        for _ in 0..5 {
            assert_eq!(limits.attempt("olivia", "10.0.0.66", 0), Ok(()));
        }
        assert_eq!(limits.attempt("olivia", "10.0.0.66", 1), Err(true));
        assert_eq!(
            limits.attempt("olivia", "10.0.0.7", 2),
            Ok(()),
            "the admin's host"
        );
        assert_eq!(limits.attempt("oscar", "10.0.0.66", 2), Ok(()), "per pair");
        limits.clear("olivia", "10.0.0.66");
        assert_eq!(limits.attempt("olivia", "10.0.0.66", 3), Ok(()), "cleared");

        // Many names from one host: the address's limit.
        let limits = SignInLimits::default();
        for n in 0..20 {
            assert_eq!(limits.attempt(&format!("name{n}"), "10.0.0.66", 0), Ok(()));
        }
        assert_eq!(limits.attempt("olivia", "10.0.0.66", 0), Err(true));
        assert_eq!(limits.attempt("olivia", "10.0.0.7", 0), Ok(()));

        // One name from many hosts: the account's limit, which a success does not reset.
        let limits = SignInLimits::default();
        for n in 0..100 {
            assert_eq!(limits.attempt("olivia", &format!("10.0.1.{n}"), 0), Ok(()));
        }
        limits.clear("olivia", "10.0.1.1");
        assert_eq!(limits.attempt("olivia", "10.0.0.7", 0), Err(true));
        assert_eq!(
            limits.attempt("olivia", "10.0.0.7", 60),
            Ok(()),
            "a new minute"
        );
    }

    #[test]
    fn past_windows_are_pruned_once_the_map_is_full() {
        let limiter = AttemptLimiter::new(2, 60);
        for n in 0..PRUNE_AT {
            let _ = limiter.attempt(&format!("10.0.{}.{}", n / 256, n % 256), 0);
        }
        let _ = limiter.attempt("late", 60);
        let attempts = limiter.attempts.lock().unwrap();
        assert_eq!(
            attempts.by_key.len(),
            1,
            "only the current window's key is kept"
        );
        assert_eq!(attempts.pruned, 1);
    }

    #[test]
    fn attempts_are_counted_per_ipv4_address_or_ipv6_64() {
        let key = |ip: &str| client_key(ip.parse().unwrap());
        assert_eq!(key("10.0.0.7"), "10.0.0.7");
        assert_eq!(key("::ffff:10.0.0.7"), "10.0.0.7");
        assert_eq!(key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64");
        assert_eq!(key("2001:db8:1:2:ffff:1:2:3"), "2001:db8:1:2::/64");
        assert_ne!(key("2001:db8:1:3::1"), key("2001:db8:1:2::1"));
    }
}
