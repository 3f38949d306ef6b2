//! The domain: license files and their items, license models and quota rules, handshake
//! resolution. Rules are pure functions over plain data; operations run one transaction each.

pub mod authorize;
pub mod handshake;
pub mod import;
pub mod models;
pub mod types;
pub mod usage;

use time::OffsetDateTime;

/// Unix seconds, the form times take in the database.
pub fn unix(t: OffsetDateTime) -> i64 {
    t.unix_timestamp()
}

/// A Unix-seconds time back as a UTC date-time.
pub fn from_unix(secs: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(secs).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// `t` (the time `field` gives) in UTC, when that is a time RFC 3339 can write (years 0 to
/// 9999) in whole seconds: the spec's times are UTC, and one just inside the range in another
/// offset may fall outside it in UTC (where it would read as 1970, or fail to be written at
/// all); the appliance keeps times to the second, so a fraction would be cut off here and not
/// on the device (an item starting at .9 s served from the whole second, which the device's
/// check refuses).
pub fn in_utc(field: &str, t: OffsetDateTime) -> Result<OffsetDateTime, String> {
    let utc = t
        .checked_to_offset(time::UtcOffset::UTC)
        .filter(|utc| (0..=9999).contains(&utc.year()))
        .ok_or_else(|| {
            format!(
                "{field} {} is not between 0000-01-01T00:00:00Z and 9999-12-31T23:59:59Z",
                rfc3339(t)
            )
        })?;
    if t.nanosecond() != 0 {
        return Err(format!("{field} {} must be a whole second", rfc3339(t)));
    }
    Ok(utc)
}

/// A time of a signed document: [`in_utc`], and written in UTC as the specification has it.
pub fn signed_time(field: &str, t: OffsetDateTime) -> Result<OffsetDateTime, String> {
    let utc = in_utc(field, t)?;
    if !t.offset().is_utc() {
        return Err(format!(
            "{field} {} must be written in UTC (ending in Z)",
            rfc3339(t)
        ));
    }
    Ok(utc)
}

/// RFC 3339, as the protocol and the command line show times.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

pub use keygate_sdk::wire::is_identifier;

/// Whether `name` may name a handshake code (portal and CLI alike): at most 100 characters
/// and no control characters (it is shown on terminals and pages).
pub fn is_handshake_name(name: &str) -> bool {
    name.chars().count() <= 100 && !name.chars().any(char::is_control)
}
