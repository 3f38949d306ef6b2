//! Values parsed at the edge: a request is turned into these types or refused with a
//! `BAD_REQUEST` naming the field, before anything else looks at it.

use keygate_sdk::wire;

use super::is_identifier;

/// A refused field: which one, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    pub field: &'static str,
    pub reason: String,
}

fn err<T>(field: &'static str, reason: impl Into<String>) -> Result<T, FieldError> {
    Err(FieldError {
        field,
        reason: reason.into(),
    })
}

/// A UUID in canonical form (lowercase, hyphenated), whatever form the device sent.
pub fn uuid(field: &'static str, text: &str) -> Result<String, FieldError> {
    match uuid::Uuid::parse_str(text.trim()) {
        Ok(u) if u.is_nil() => err(field, "must not be the nil UUID"),
        Ok(u) => Ok(u.hyphenated().to_string()),
        Err(_) => err(field, "must be a UUID"),
    }
}

/// 16 to 64 base64url characters.
pub fn nonce(text: &str) -> Result<String, FieldError> {
    let ok = (16..=64).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(text.to_string())
    } else {
        err("nonce", "must be 16 to 64 base64url characters")
    }
}

/// An identifier (organization id, handshake code, item id); empty means absent.
pub fn identifier(field: &'static str, text: Option<&str>) -> Result<Option<String>, FieldError> {
    match text.map(str::trim) {
        None | Some("") => Ok(None),
        Some(t) if is_identifier(t) => Ok(Some(t.to_string())),
        Some(_) => err(field, "must be 1 to 64 letters, digits, '.', '_' or '-'"),
    }
}

/// Unicode's bidirectional formatting characters: shown to an admin they reorder the text
/// around them (a device named "scanner\u{202E}gpj.exe" reads as "scannerexe.jpg").
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// A character [`label`] refuses in a device's text: the portal and the command line refuse
/// it too in what devices must send back (a session password, a process name).
pub fn refused_in_text(c: char) -> bool {
    c.is_control() || is_bidi_control(c)
}

/// Free text from the device (product, instance, user, name, domain, process): at most
/// `max` characters, no control characters (bidirectional ones included); empty means
/// absent.
pub fn label(
    field: &'static str,
    text: Option<&str>,
    max: usize,
) -> Result<Option<String>, FieldError> {
    match text {
        None | Some("") => Ok(None),
        Some(t) if t.chars().count() > max => {
            err(field, format!("must be at most {max} characters"))
        }
        Some(t) if t.chars().any(char::is_control) => {
            err(field, "must not contain control characters")
        }
        Some(t) if t.chars().any(is_bidi_control) => err(
            field,
            "must not contain bidirectional formatting characters (U+202E and the like)",
        ),
        Some(t) => Ok(Some(t.to_string())),
    }
}

/// `POST /api/v1/authorize`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorize {
    pub organization_id: Option<String>,
    pub handshake_code: Option<String>,
    pub session_password: Option<String>,
    pub product: String,
    pub device_uuid: String,
    pub instance: Option<String>,
    pub user: Option<String>,
    pub name: Option<String>,
    pub domain: Option<String>,
    pub process: Option<String>,
    pub nonce: String,
}

impl Authorize {
    pub fn parse(r: wire::AuthorizeRequest) -> Result<Authorize, FieldError> {
        let validation = r.validation.unwrap_or_default();
        Ok(Authorize {
            organization_id: identifier("organization_id", r.organization_id.as_deref())?,
            handshake_code: identifier("handshake_code", r.handshake_code.as_deref())?,
            session_password: label("session_password", r.session_password.as_deref(), 256)?,
            product: label("product", Some(&r.product), 128)?.ok_or(FieldError {
                field: "product",
                reason: "is required".into(),
            })?,
            device_uuid: uuid("device.uuid", &r.device.uuid)?,
            instance: label("device.instance", r.device.instance.as_deref(), 128)?,
            user: label("device.user", r.device.user.as_deref(), 256)?,
            name: label("device.name", r.device.name.as_deref(), 256)?,
            domain: label("validation.domain", validation.domain.as_deref(), 253)?,
            process: label("validation.process", validation.process.as_deref(), 256)?,
            nonce: nonce(&r.nonce)?,
        })
    }
}

pub use keygate_sdk::wire::MAX_REPORTS;

/// `POST /api/v1/usage`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    pub lease_id: String,
    pub device_uuid: String,
    pub stream: String,
    pub reports: Vec<Report>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub seq: u64,
    pub item_id: String,
    pub to: i64,
    pub counters: Vec<(String, i64)>,
}

impl Usage {
    /// The caller has checked the count against [`MAX_REPORTS`] (`PAYLOAD_TOO_LARGE`).
    pub fn parse(r: wire::UsageRequest) -> Result<Usage, FieldError> {
        let mut reports = Vec::with_capacity(r.reports.len());
        let mut last_seq = 0;
        for report in r.reports {
            if report.seq == 0 || report.seq > i64::MAX as u64 {
                return err("reports.seq", format!("must be between 1 and {}", i64::MAX));
            }
            if report.seq <= last_seq {
                return err("reports.seq", "must increase within a request");
            }
            last_seq = report.seq;
            if report.to < report.from {
                return err("reports.to", "must not be before from");
            }
            let item_id =
                identifier("reports.item_id", Some(&report.item_id))?.ok_or(FieldError {
                    field: "reports.item_id",
                    reason: "is required".into(),
                })?;
            if report.counters.len() > wire::MAX_COUNTERS {
                return err(
                    "reports.counters",
                    format!("at most {} counters in one report", wire::MAX_COUNTERS),
                );
            }
            let mut counters: Vec<(String, i64)> = Vec::with_capacity(report.counters.len());
            let mut trimmed_any = false;
            for (raw, amount) in report.counters {
                let Some(name) = identifier("reports.counters", Some(&raw))? else {
                    return err("reports.counters", "a counter needs a name");
                };
                // " scans" is "scans": named twice, it would pass the per-report cap twice.
                // The names came as a map's distinct keys, so only trimming can repeat one.
                trimmed_any |= name.len() != raw.len();
                if trimmed_any && counters.iter().any(|(known, _)| *known == name) {
                    return err(
                        "reports.counters",
                        format!("counter {name} is named twice in one report"),
                    );
                }
                if amount > wire::MAX_COUNT {
                    return err(
                        "reports.counters",
                        format!("at most {} per counter in one report", wire::MAX_COUNT),
                    );
                }
                counters.push((name, amount as i64));
            }
            reports.push(Report {
                seq: report.seq,
                item_id,
                to: report.to.unix_timestamp(),
                counters,
            });
        }
        Ok(Usage {
            lease_id: uuid("lease_id", &r.lease_id)?,
            device_uuid: uuid("device_uuid", &r.device_uuid)?,
            stream: uuid("stream", &r.stream)?,
            reports,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_canonical() {
        let canonical = "67e55044-10b1-426f-9247-bb680e5fe0c8";
        assert_eq!(uuid("u", canonical).unwrap(), canonical);
        assert_eq!(
            uuid("u", "67E5504410B1426F9247BB680E5FE0C8").unwrap(),
            canonical
        );
        assert_eq!(
            uuid("u", "not-a-uuid").unwrap_err().to_string(),
            "u: must be a UUID"
        );
        assert_eq!(
            uuid("u", "00000000-0000-0000-0000-000000000000")
                .unwrap_err()
                .to_string(),
            "u: must not be the nil UUID"
        );
    }

    #[test]
    fn nonce_length_and_alphabet() {
        assert!(nonce(&"a".repeat(15)).is_err());
        assert!(nonce(&"a".repeat(16)).is_ok());
        assert!(nonce(&"a".repeat(64)).is_ok());
        assert!(nonce(&"a".repeat(65)).is_err());
        assert!(nonce("abcdefghijklmno+").is_err());
        assert!(nonce("abcdefghijklmn-_").is_ok());
    }

    #[test]
    fn labels_refuse_control_characters_and_length() {
        assert_eq!(label("x", Some(""), 5).unwrap(), None);
        assert_eq!(label("x", Some("héllo"), 5).unwrap(), Some("héllo".into()));
        assert!(label("x", Some("hello!"), 5).is_err());
        assert!(label("x", Some("a\nb"), 5).is_err());
        for bidi in ['\u{202E}', '\u{2066}', '\u{200F}', '\u{061C}'] {
            assert!(
                label("x", Some(&format!("ab{bidi}c")), 5).is_err(),
                "{bidi:?}"
            );
        }
        // Other format characters are text (a zero-width joiner in an emoji, a name).
        assert!(label("x", Some("a\u{200D}b"), 5).is_ok());
        assert!(identifier("x", Some("<script>")).is_err());
    }

    fn report(seq: u64) -> wire::UsageReport {
        let t = time::OffsetDateTime::UNIX_EPOCH;
        wire::UsageReport {
            seq,
            item_id: "I-1".into(),
            from: t,
            to: t,
            counters: [("scans".to_string(), 3)].into(),
        }
    }

    fn request(reports: Vec<wire::UsageReport>) -> wire::UsageRequest {
        wire::UsageRequest {
            lease_id: "67e55044-10b1-426f-9247-bb680e5fe0c8".into(),
            device_uuid: "67e55044-10b1-426f-9247-bb680e5fe0c9".into(),
            stream: "67e55044-10b1-426f-9247-bb680e5fe0ca".into(),
            reports,
        }
    }

    #[test]
    fn a_counter_is_named_once_per_report() {
        let named = |names: &[&str]| {
            let mut r = report(1);
            r.counters = names.iter().map(|n| (n.to_string(), 1)).collect();
            Usage::parse(request(vec![r]))
        };
        assert!(named(&["scans", "pdf417"]).is_ok());
        assert_eq!(
            named(&[" scans"]).unwrap().reports[0].counters[0].0,
            "scans"
        );
        // " scans" is "scans": the two would each pass the per-report cap.
        assert!(named(&["scans", " scans"]).is_err());
        assert!(named(&[""]).is_err());
    }

    #[test]
    fn usage_seqs_must_increase() {
        assert!(Usage::parse(request(vec![report(1), report(2)])).is_ok());
        assert!(Usage::parse(request(vec![report(2), report(2)])).is_err());
        assert!(Usage::parse(request(vec![report(0)])).is_err());
        assert_eq!(
            Usage::parse(request(vec![])).unwrap().reports,
            vec![],
            "a heartbeat"
        );
    }
}
