//! The documents keygate signs and the client protocol's bodies.
//!
//! Times are RFC 3339 UTC; keys inside payloads are base64url raw keys.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Version of the payload formats below (`v`).
pub const FORMAT_VERSION: u32 = 1;

/// The license models of the specification, one per item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Model {
    PerDevice,
    PerActiveDevice,
    ConcurrentDevice,
    ConcurrentInstance,
    PerUsage,
    Standalone,
    Tokens,
}

impl Model {
    pub const ALL: [Model; 7] = [
        Model::PerDevice,
        Model::PerActiveDevice,
        Model::ConcurrentDevice,
        Model::ConcurrentInstance,
        Model::PerUsage,
        Model::Standalone,
        Model::Tokens,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Model::PerDevice => "per_device",
            Model::PerActiveDevice => "per_active_device",
            Model::ConcurrentDevice => "concurrent_device",
            Model::ConcurrentInstance => "concurrent_instance",
            Model::PerUsage => "per_usage",
            Model::Standalone => "standalone",
            Model::Tokens => "tokens",
        }
    }

    pub fn parse(text: &str) -> Option<Model> {
        Model::ALL.into_iter().find(|m| m.as_str() == text)
    }

    pub fn is_concurrent(self) -> bool {
        matches!(self, Model::ConcurrentDevice | Model::ConcurrentInstance)
    }
}

impl std::fmt::Display for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `typ: keygate-activation`: the appliance introduces itself to the vendor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivationRequest {
    pub v: u32,
    pub installation_id: String,
    pub public_key: String,
    pub hostname: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// Which appliance a license is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplianceBinding {
    pub installation_id: String,
    pub public_key: String,
}

/// `typ: keygate-license`: what the vendor grants one appliance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct License {
    pub v: u32,
    pub license_id: String,
    pub version: u32,
    pub vendor: String,
    pub organization_id: String,
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
    pub appliance: ApplianceBinding,
    pub items: Vec<LicenseItem>,
}

/// One item of a license: a product under one model with its quota and validity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LicenseItem {
    pub item_id: String,
    pub product: String,
    pub model: Model,
    pub quota: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub starts_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    pub offline_days: u32,
    #[serde(default)]
    pub features: Vec<String>,
    /// per_usage: the counter this item meters, e.g. "scans".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counter: Option<String>,
    /// Concurrent models: windows over quota allowed before the item stops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_exceptions: Option<u32>,
    /// Tokens: days the balance may stay negative (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_days: Option<u32>,
    /// Tokens: what one daily pass costs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_pass: Option<i64>,
}

/// Default of `grace_days` for tokens items.
pub const DEFAULT_GRACE_DAYS: u32 = 10;

/// The `state` of an authorization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthorizationState {
    /// Within quota.
    Ok,
    /// Over 100 % of quota, inside the model's tolerance.
    Tolerance,
    /// Tokens: the balance is negative, inside the grace period.
    Grace,
}

/// One item an authorization grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantedItem {
    pub item_id: String,
    pub model: Model,
    pub features: Vec<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// `typ: keygate-authorization`: the appliance lets one device use one product until
/// `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Authorization {
    pub v: u32,
    pub lease_id: String,
    pub installation_id: String,
    pub organization_id: String,
    pub handshake_code: String,
    pub product: String,
    pub device_uuid: String,
    pub instance: Option<String>,
    pub user: Option<String>,
    pub items: Vec<GrantedItem>,
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    pub nonce: String,
    pub state: AuthorizationState,
}

/// `GET /api/v1/appliance`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplianceInfo {
    pub installation_id: String,
    pub public_key: String,
    pub version: String,
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
}

/// The body of every error answer: `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "SentErrorDetail")]
pub struct ErrorDetail {
    pub code: ErrorCode,
    /// What happened. A code this version does not know ([`ErrorCode::Unknown`]) is kept at
    /// its end, `(code SOMETHING_NEW)`, for the device's logs.
    pub message: String,
}

/// An error as the appliance sends it, its code as written.
#[derive(Deserialize)]
struct SentErrorDetail {
    code: String,
    message: String,
}

impl From<SentErrorDetail> for ErrorDetail {
    fn from(sent: SentErrorDetail) -> Self {
        let code = serde::de::value::StrDeserializer::<serde::de::value::Error>::new(&sent.code);
        match ErrorCode::deserialize(code).unwrap_or(ErrorCode::Unknown) {
            ErrorCode::Unknown => ErrorDetail {
                code: ErrorCode::Unknown,
                message: format!("{} (code {})", sent.message, sent.code),
            },
            code => ErrorDetail {
                code,
                message: sent.message,
            },
        }
    }
}

/// The error codes of the client protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    BadRequest,
    HandshakeRequired,
    HandshakeNotFound,
    NoLicense,
    LeaseNotFound,
    SessionPasswordMismatch,
    ValidationFailed,
    LicenseNotStarted,
    LicenseExpired,
    QuotaExceeded,
    DeviceBlocked,
    LeaseRevoked,
    PayloadTooLarge,
    RateLimited,
    Internal,
    /// A code this version does not know, from a newer appliance: its message says what
    /// happened. Never sent by this version (not in [`ErrorCode::ALL`]).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 15] = [
        ErrorCode::BadRequest,
        ErrorCode::HandshakeRequired,
        ErrorCode::HandshakeNotFound,
        ErrorCode::NoLicense,
        ErrorCode::LeaseNotFound,
        ErrorCode::SessionPasswordMismatch,
        ErrorCode::ValidationFailed,
        ErrorCode::LicenseNotStarted,
        ErrorCode::LicenseExpired,
        ErrorCode::QuotaExceeded,
        ErrorCode::DeviceBlocked,
        ErrorCode::LeaseRevoked,
        ErrorCode::PayloadTooLarge,
        ErrorCode::RateLimited,
        ErrorCode::Internal,
    ];

    /// The HTTP status that carries this code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest | ErrorCode::HandshakeRequired => 400,
            ErrorCode::HandshakeNotFound | ErrorCode::NoLicense | ErrorCode::LeaseNotFound => 404,
            ErrorCode::SessionPasswordMismatch
            | ErrorCode::ValidationFailed
            | ErrorCode::LicenseNotStarted
            | ErrorCode::LicenseExpired
            | ErrorCode::QuotaExceeded
            | ErrorCode::DeviceBlocked
            | ErrorCode::LeaseRevoked => 403,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::RateLimited => 429,
            ErrorCode::Internal | ErrorCode::Unknown => 500,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "BAD_REQUEST",
            ErrorCode::HandshakeRequired => "HANDSHAKE_REQUIRED",
            ErrorCode::HandshakeNotFound => "HANDSHAKE_NOT_FOUND",
            ErrorCode::NoLicense => "NO_LICENSE",
            ErrorCode::LeaseNotFound => "LEASE_NOT_FOUND",
            ErrorCode::SessionPasswordMismatch => "SESSION_PASSWORD_MISMATCH",
            ErrorCode::ValidationFailed => "VALIDATION_FAILED",
            ErrorCode::LicenseNotStarted => "LICENSE_NOT_STARTED",
            ErrorCode::LicenseExpired => "LICENSE_EXPIRED",
            ErrorCode::QuotaExceeded => "QUOTA_EXCEEDED",
            ErrorCode::DeviceBlocked => "DEVICE_BLOCKED",
            ErrorCode::LeaseRevoked => "LEASE_REVOKED",
            ErrorCode::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::Internal => "INTERNAL",
            ErrorCode::Unknown => "UNKNOWN",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How often devices report usage, and the renewal cadence the appliance suggests.
pub const REPORT_INTERVAL_S: u64 = 180;

/// How long the public trial's authorization (one with no items) lasts, at most.
pub const TRIAL_DAYS: i64 = 7;

/// The most reports one usage request may carry (the appliance answers
/// `PAYLOAD_TOO_LARGE` above it; a backlog is sent in several requests).
pub const MAX_REPORTS: usize = 5000;

/// The largest amount one counter may carry in one usage report (the appliance answers
/// `BAD_REQUEST` above it), so that no total it keeps can overflow.
pub const MAX_COUNT: u64 = 1_000_000_000_000;

/// The most counters one usage report may carry.
pub const MAX_COUNTERS: usize = 64;

/// Whether an identifier (license id, organization id, item id, handshake code, counter
/// name) is made of the characters that are safe everywhere it appears: 1 to 64 letters,
/// digits, `.`, `_`, `-`.
pub fn is_identifier(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 64
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// `POST /api/v1/authorize`
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorizeRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organization_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handshake_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_password: Option<String>,
    pub product: String,
    pub device: DeviceInfo,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<Validation>,
    /// 16 to 64 base64url characters chosen by the device, echoed in the authorization.
    pub nonce: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub uuid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// What the device says about where it runs, checked against a handshake code's
/// validation fields.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Validation {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorizeResponse {
    /// The signed authorization (`typ: keygate-authorization`).
    pub authorization: String,
    /// The license file's signed line that grants the authorization's items.
    pub license: String,
    pub refresh_after_s: u64,
}

/// `POST /api/v1/usage`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRequest {
    pub lease_id: String,
    pub device_uuid: String,
    /// A UUID the device picks when it creates its local usage store.
    pub stream: String,
    #[serde(default)]
    pub reports: Vec<UsageReport>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageReport {
    /// 1, 2, 3, ... within the stream.
    pub seq: u64,
    pub item_id: String,
    #[serde(with = "time::serde::rfc3339")]
    pub from: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub to: OffsetDateTime,
    #[serde(default, deserialize_with = "counters_named_once")]
    pub counters: std::collections::BTreeMap<String, u64>,
}

/// A report's counters, each named once: a JSON object that repeats a name is refused (a
/// map would keep its last amount and silently drop the others, usage that happened).
fn counters_named_once<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<std::collections::BTreeMap<String, u64>, D::Error> {
    struct Counters;
    impl<'de> serde::de::Visitor<'de> for Counters {
        type Value = std::collections::BTreeMap<String, u64>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object of counter names and amounts")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            use std::collections::btree_map::Entry;
            let mut counters = Self::Value::new();
            while let Some((name, amount)) = map.next_entry::<String, u64>()? {
                match counters.entry(name) {
                    Entry::Vacant(v) => {
                        v.insert(amount);
                    }
                    Entry::Occupied(o) => {
                        return Err(serde::de::Error::custom(format_args!(
                            "counter {} is named twice in one report",
                            o.key()
                        )));
                    }
                }
            }
            Ok(counters)
        }
    }
    d.deserialize_map(Counters)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageResponse {
    pub accepted: u64,
    pub duplicates: u64,
    /// The highest `seq` of the stream the appliance has stored.
    pub acked_seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewal_error: Option<ErrorDetail>,
}

/// `POST /api/v1/release`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRequest {
    pub lease_id: String,
    pub device_uuid: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseResponse {
    pub released: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_serialize_as_the_spec_spells_them() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).unwrap(), code);
        }
    }

    /// A newer appliance's new code does not make an answer unreadable (a usage answer with
    /// it still acknowledges the reports).
    #[test]
    fn an_unknown_error_code_still_reads() {
        let answer: UsageResponse = serde_json::from_str(
            r#"{"accepted": 1, "duplicates": 0, "acked_seq": 7,
                "renewal_error": {"code": "SOMETHING_NEW", "message": "why"}}"#,
        )
        .unwrap();
        assert_eq!(answer.acked_seq, 7);
        assert_eq!(answer.renewal_error.unwrap().code, ErrorCode::Unknown);
    }

    #[test]
    fn models_serialize_as_the_spec_spells_them() {
        for model in Model::ALL {
            let json = serde_json::to_string(&model).unwrap();
            assert_eq!(json, format!("\"{}\"", model.as_str()));
            assert_eq!(Model::parse(model.as_str()), Some(model));
        }
    }
}
