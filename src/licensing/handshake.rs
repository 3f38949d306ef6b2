//! Handshake codes: validation fields and session passwords.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::licensing::types::refused_in_text;
use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Whether a device's domain is allowed: no patterns allow any; otherwise the domain must
/// equal a pattern or, for `*.suffix`, end with `.suffix` (case-insensitive). A domain with
/// an empty label (`x..plant.local`, `.plant.local`) matches none.
pub fn domain_allowed(patterns: &[String], domain: Option<&str>) -> bool {
    if patterns.is_empty() {
        return true;
    }
    let Some(domain) = domain
        .map(|d| d.strip_suffix('.').unwrap_or(d).to_ascii_lowercase())
        .filter(|d| d.split('.').all(|label| !label.is_empty()))
    else {
        return false;
    };
    patterns.iter().any(|p| {
        let p = p.to_ascii_lowercase();
        match p.strip_prefix("*.") {
            Some(suffix) => domain
                .strip_suffix(suffix)
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
            None => domain == p,
        }
    })
}

/// Whether a device's process name is allowed: no names allow any; otherwise an exact,
/// case-insensitive match (process names differ in case across platforms).
pub fn process_allowed(names: &[String], process: Option<&str>) -> bool {
    names.is_empty() || process.is_some_and(|p| names.iter().any(|n| n.eq_ignore_ascii_case(p)))
}

/// Checks the validation fields: domains exact or `*.suffix`, processes plain names.
pub fn check_validation(domains: &[String], processes: &[String]) -> Result<(), String> {
    for d in domains {
        if !is_host_name(d.strip_prefix("*.").unwrap_or(d)) {
            return Err(format!(
                "{d:?} is not a domain (a name like plant.example.com, or *.example.com)"
            ));
        }
    }
    for p in processes {
        // One name each: `scanner.exe,loader.exe` would be one name no process has.
        if p.contains(',') {
            return Err(format!(
                "{p:?} is not a process name: give each name on its own (one --process, or \
                 one line, each)"
            ));
        }
        if p.len() > 256
            || p.chars()
                .any(|c| refused_in_text(c) || c == '/' || c == '\\')
        {
            return Err(format!(
                "{p:?} is not a process name (a file name like scanner.exe, no path)"
            ));
        }
    }
    Ok(())
}

/// A DNS host name: dot-separated labels of letters, digits and '-'.
pub fn is_host_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// A session password's length and characters, the same from the portal and the command
/// line: what a device can send (the protocol refuses control and bidirectional formatting
/// characters in its text fields).
pub fn check_password(password: &str) -> Result<(), &'static str> {
    match password.chars().count() {
        8..=256 if !password.chars().any(refused_in_text) => Ok(()),
        8..=256 => Err(
            "A session password cannot hold control or bidirectional formatting characters \
             (a device could not send it)",
        ),
        _ => Err("A session password is 8 to 256 characters"),
    }
}

/// An Argon2id hash (PHC string) of a session password.
pub fn hash_password(password: &str) -> String {
    Argon2::default()
        .hash_password(password.as_bytes())
        .expect("Argon2 with default parameters hashes any password")
        .to_string()
}

/// Checks a password against its Argon2 hash (slow on purpose: never on the writer thread).
pub fn verify_password(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| {
        Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
}

/// Session passwords already verified against a handshake code's current hash, so that
/// Argon2 runs once per code and password rather than on every authorization. Holds only a
/// SHA-256 of each verified password, in memory; compared in constant time.
#[derive(Debug, Default)]
pub struct PasswordCache(Mutex<HashMap<i64, (String, [u8; 32])>>);

impl PasswordCache {
    pub fn is_verified(&self, handshake_id: i64, hash: &str, password: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(password.as_bytes()).into();
        let cache = self.0.lock().expect("password cache lock");
        cache
            .get(&handshake_id)
            .is_some_and(|(cached_hash, cached)| {
                cached_hash == hash && bool::from(cached.ct_eq(&digest))
            })
    }

    pub fn remember(&self, handshake_id: i64, hash: &str, password: &str) {
        let digest: [u8; 32] = Sha256::digest(password.as_bytes()).into();
        self.0
            .lock()
            .expect("password cache lock")
            .insert(handshake_id, (hash.to_string(), digest));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn domains_exact_and_suffix() {
        let patterns = list(&["plant.example.com", "*.acme.local"]);
        assert!(domain_allowed(&[], None));
        assert!(domain_allowed(&patterns, Some("plant.example.com")));
        assert!(domain_allowed(&patterns, Some("PLANT.example.com.")));
        assert!(domain_allowed(&patterns, Some("line1.acme.local")));
        assert!(domain_allowed(&patterns, Some("a.b.acme.local")));
        assert!(!domain_allowed(&patterns, Some("acme.local")));
        assert!(!domain_allowed(&patterns, Some("evilacme.local")));
        assert!(!domain_allowed(&patterns, Some("other.example.com")));
        assert!(!domain_allowed(&patterns, None));
        // Names DNS would refuse but a device may report (an underscore) still match.
        assert!(domain_allowed(&patterns, Some("line_1.acme.local")));
        for malformed in ["x..acme.local", ".acme.local", "plant.example.com.."] {
            assert!(!domain_allowed(&patterns, Some(malformed)), "{malformed}");
        }
    }

    #[test]
    fn what_a_device_cannot_send_is_refused_as_a_password_or_process_name() {
        assert!(check_password("horse battery").is_ok());
        assert!(check_password("short").is_err());
        for bad in ["horse\u{200F}battery", "horse\tbattery"] {
            assert!(check_password(bad).is_err(), "{bad:?}");
            assert!(check_validation(&[], &list(&[bad])).is_err(), "{bad:?}");
        }
        assert!(check_validation(&[], &list(&["designer\u{202E}exe.scr"])).is_err());
        assert!(check_validation(&[], &list(&["scanner.exe"])).is_ok());
    }

    #[test]
    fn processes_exact() {
        let names = list(&["scanner.exe"]);
        assert!(process_allowed(&[], None));
        assert!(process_allowed(&names, Some("Scanner.EXE")));
        assert!(!process_allowed(&names, Some("scanner")));
        assert!(!process_allowed(&names, None));
    }

    #[test]
    fn passwords_hash_verify_and_cache() {
        let hash = hash_password("s3cret");
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password(&hash, "s3cret"));
        assert!(!verify_password(&hash, "s3cret "));
        assert!(!verify_password("not a hash", "s3cret"));

        let cache = PasswordCache::default();
        assert!(!cache.is_verified(1, &hash, "s3cret"));
        cache.remember(1, &hash, "s3cret");
        assert!(cache.is_verified(1, &hash, "s3cret"));
        assert!(!cache.is_verified(1, &hash, "other"));
        assert!(!cache.is_verified(2, &hash, "s3cret"));
        assert!(
            !cache.is_verified(1, &hash_password("s3cret"), "s3cret"),
            "a new hash is checked anew"
        );
    }
}
