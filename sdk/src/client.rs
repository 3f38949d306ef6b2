//! The device client: what a vendor's product embeds to authorize against a keygate appliance,
//! keep working offline, and report usage.
//!
//! A [`Client`] is blocking (ureq over rustls) and keeps its state in a directory of its own
//! ([`ClientConfig::state_dir`]), so a device that restarts, or comes back after days offline,
//! carries on where it stopped:
//!
//! - [`Client::authorize`] asks the appliance for an authorization and verifies the whole trust
//!   chain (vendor key -> license -> authorization) before storing it.
//! - [`Client::check`] re-verifies the stored chain offline, at the local time. This is the call
//!   a product makes to decide whether it may run: it fails once the authorization expired, and
//!   when the device clock was set back to stretch the offline allowance.
//! - [`Client::record`] counts usage into the open period; [`Client::flush`] closes the period
//!   into a numbered report and sends every unacknowledged report. The appliance counts each
//!   report once however often it is sent, so nothing is lost or double-counted across crashes,
//!   restarts, lost answers or days offline. Every answer also renews the authorization.
//! - [`Client::tick`] flushes when the report interval (3 minutes) has elapsed: call it from the
//!   product's own loop.
//! - [`Client::release`] gives the seat back.
//!
//! The calls that reach the appliance (`authorize`, `flush` and so `tick`, `release`) wait for
//! it: up to [`ClientConfig::timeout`] per URL when it is out of reach and its packets are
//! dropped. `check` and `record` never touch the network. A product whose working loop must
//! not wait that long keeps the client on a thread of its own (it is `Send`) and hands it
//! the usage to record over a channel.
//!
//! ```no_run
//! use keygate_sdk::client::{Client, ClientConfig, TlsTrust};
//! use keygate_sdk::keys;
//! use keygate_sdk::wire::DeviceInfo;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let vendor_key = keys::public_key_from_pem(&std::fs::read_to_string("vendor.pub")?)?;
//! let device = DeviceInfo {
//!     uuid: "6f1c2a4e-8b9d-4c3e-a1f2-0123456789ab".into(),
//!     ..DeviceInfo::default()
//! };
//! let mut config = ClientConfig::new(
//!     ["https://10.0.0.5:8443"],
//!     vec![vendor_key],
//!     "barcode-reader",
//!     device,
//!     "/var/lib/acme/keygate",
//!     TlsTrust::Pinned(std::fs::read("appliance.pem")?),
//! );
//! config.handshake_code = Some("ACME-LAB".into());
//! let mut client = Client::new(config)?;
//!
//! let grant = match client.check() {
//!     Ok(grant) => grant,
//!     Err(_) => client.authorize()?,
//! };
//! if grant.has_feature("qr") {
//!     client.record(&grant.authorization.items[0].item_id, "scans", 1)?;
//! }
//! loop {
//!     client.check()?; // stop working when this fails
//!     // At least every 30 s: tick reports once in each 3-minute window.
//!     if let Some(Err(e)) = client.tick() {
//!         eprintln!("usage stays buffered: {e}");
//!     }
//!     # break;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Files
//! The state directory holds `state.json` (the authorization and license, the lease, the
//! device UUID and its usage stream with the next sequence number, the open period's counters,
//! the newest time seen), `backlog.json` (closed reports the appliance has not acknowledged
//! yet), `lock`, and, if the appliance ever refused a report as invalid, `rejected.json`
//! (those reports and the reason, for support; see [`FlushOutcome::rejected`]). A state or
//! backlog file that can no longer be parsed (a disk fault) is renamed `*.corrupt` and the
//! state rebuilt around the waiting reports: the device authorizes again and loses only the
//! usage still open in the lost file. The JSON
//! files are replaced atomically (temporary file, fsync, rename), so a crash or power loss
//! leaves either the old or the new version. The backlog has a file of its own so that
//! [`Client::record`], which is durable, rewrites only the small state file even when days of
//! offline reports are waiting. One process at a time owns a state directory ([`Client::new`]
//! waits up to 2 seconds for it, then fails with [`ClientError::StateLocked`]), and a state
//! directory belongs to one device (the appliance refuses a stream from another device).
//! In a directory restored from an old copy, usage recorded after the restore still counts:
//! each process numbers new reports only once the appliance has said how far the stream got
//! (docs/decisions.md, "Restored SDK state", says what such a copy can still count twice).

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, TryLockError};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use data_encoding::BASE64URL_NOPAD;
use ed25519_dalek::VerifyingKey;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::error::Category;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::chain::{self, ChainError, Expectation};
use crate::jws;
use crate::wire::{
    ApplianceInfo, Authorization, AuthorizationState, AuthorizeRequest, AuthorizeResponse,
    DeviceInfo, ErrorBody, ErrorCode, ErrorDetail, GrantedItem, License, LicenseItem, MAX_COUNT,
    MAX_COUNTERS, REPORT_INTERVAL_S, ReleaseRequest, ReleaseResponse, UsageReport, UsageRequest,
    UsageResponse, Validation, is_identifier,
};

/// How long one request may take, connection included, before the next URL is tried.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The most reports one usage request carries; a longer backlog goes in several requests
/// (well under the appliance's [`crate::wire::MAX_REPORTS`], so a request stays small).
pub const MAX_REPORTS_PER_REQUEST: usize = 1000;
const _: () = assert!(MAX_REPORTS_PER_REQUEST <= crate::wire::MAX_REPORTS);

/// How far the local clock may lag behind the newest time the client has seen before
/// [`Client::check`] reports [`ClientError::ClockRolledBack`]: covers ordinary drift between
/// the device and the appliance, and clock corrections.
pub const CLOCK_TOLERANCE: time::Duration = time::Duration::minutes(5);

/// The largest offset, in seconds, kept between the device clock and the appliance's.
const MAX_CLOCK_OFFSET_S: u64 = 200 * 366 * 86_400;

const STATE_FILE: &str = "state.json";
const BACKLOG_FILE: &str = "backlog.json";
/// Reports the appliance refused as invalid, set aside (see [`FlushOutcome::rejected`]).
const REJECTED_FILE: &str = "rejected.json";
const LOCK_FILE: &str = "lock";
/// How long [`Client::new`] waits for a state directory another owner is letting go of.
const LOCK_WAIT: Duration = Duration::from_secs(2);
const STATE_VERSION: u32 = 1;
/// Answers larger than this are not read (an authorization and its license take a few KiB).
const MAX_RESPONSE_BYTES: u64 = 4 << 20;
/// [`Client::check`] persists the advance of the newest time seen once it has moved this far,
/// rather than writing the state file on every check.
const NEWEST_PERSIST_STEP: time::Duration = time::Duration::minutes(1);

// ---------------------------------------------------------------------------------------------
// Configuration

/// Which TLS certificates the client trusts when it connects to the appliance.
#[derive(Clone)]
pub enum TlsTrust {
    /// Trust exactly these PEM certificate(s) and nothing else (not the system's roots): the
    /// appliance's self-signed certificate, or the CA that IT used to issue the appliance's
    /// certificate. The certificate must name the host or IP address of the URLs.
    Pinned(Vec<u8>),
    /// Accept any certificate, for labs and first steps only.
    ///
    /// Authorizations stay safe: the client verifies their signatures up to the vendor key,
    /// so a man in the middle cannot forge or alter one. But whoever sits in the middle reads
    /// everything the device sends, in particular the session password, and can answer in the
    /// appliance's place (refuse authorizations, acknowledge usage reports that then never
    /// reach the appliance).
    AcceptAnyCertificate,
}

impl fmt::Debug for TlsTrust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsTrust::Pinned(pem) => write!(f, "Pinned(<{} bytes of PEM>)", pem.len()),
            TlsTrust::AcceptAnyCertificate => f.write_str("AcceptAnyCertificate"),
        }
    }
}

/// The source of "now" for the client. The system clock unless a test substitutes its own.
#[derive(Clone)]
pub struct Clock {
    wall: Arc<dyn Fn() -> OffsetDateTime + Send + Sync>,
    /// The monotonic clock that runs beside it, if any (see [`Client::check`]).
    monotonic: Option<Arc<dyn Fn() -> Instant + Send + Sync>>,
}

impl Clock {
    /// The system's UTC clock, watched by the monotonic clock.
    pub fn system() -> Self {
        Clock {
            wall: Arc::new(OffsetDateTime::now_utc),
            monotonic: Some(Arc::new(Instant::now)),
        }
    }

    /// A clock that asks `now` (for tests that move the device clock), with no monotonic
    /// clock beside it.
    pub fn from_fn(now: impl Fn() -> OffsetDateTime + Send + Sync + 'static) -> Self {
        Clock {
            wall: Arc::new(now),
            monotonic: None,
        }
    }

    /// A clock that asks `now`, beside a monotonic clock that asks `monotonic` (for tests
    /// that move both).
    pub fn from_fns(
        now: impl Fn() -> OffsetDateTime + Send + Sync + 'static,
        monotonic: impl Fn() -> Instant + Send + Sync + 'static,
    ) -> Self {
        Clock {
            wall: Arc::new(now),
            monotonic: Some(Arc::new(monotonic)),
        }
    }

    pub fn now(&self) -> OffsetDateTime {
        (self.wall)()
    }

    fn monotonic(&self) -> Option<Instant> {
        self.monotonic.as_ref().map(|now| now())
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Clock")
    }
}

/// Everything a [`Client`] needs to know. Build it with [`ClientConfig::new`], then set the
/// optional fields directly.
#[derive(Clone)]
pub struct ClientConfig {
    /// Base URLs of the appliance, e.g. `https://10.0.0.5:8443`, tried in order: when one
    /// cannot be reached (connection, TLS or timeout failure) the next is tried. An HTTP answer
    /// is final, whatever its status.
    pub urls: Vec<String>,
    /// The vendor public keys the product trusts (usually one, compiled into the product).
    pub vendor_keys: Vec<VerifyingKey>,
    pub organization_id: Option<String>,
    pub handshake_code: Option<String>,
    /// Sent with [`Client::authorize`] only, never stored. Redacted in `Debug`.
    pub session_password: Option<String>,
    pub validation: Option<Validation>,
    /// The product to authorize, as named in the license items.
    pub product: String,
    /// The device: `uuid` is required; `instance`, `user` and `name` as the models need them.
    pub device: DeviceInfo,
    /// Where the client keeps its state (created if needed). One process at a time.
    pub state_dir: PathBuf,
    /// How often [`Client::tick`] reports usage (default 180 s, as the appliance expects): once
    /// in each window of this length on the appliance's clock.
    /// The appliance's `refresh_after_s` is the protocol's fixed cadence (180: concurrent
    /// models count devices in 3-minute windows), so this setting, not the answer, decides:
    /// a longer one lets a concurrent-model device drop out of windows it was active in.
    pub report_interval: Duration,
    /// Time limit of one request to one URL (default [`DEFAULT_TIMEOUT`]), plus a second for
    /// each KiB of its body (a backlog over a slow link).
    pub timeout: Duration,
    pub tls: TlsTrust,
    /// The device clock (default: the system clock).
    pub clock: Clock,
}

impl ClientConfig {
    /// A configuration with the required fields, no handshake code, organization, password or
    /// validation, the 3-minute report interval and the default timeout.
    pub fn new(
        urls: impl IntoIterator<Item = impl Into<String>>,
        vendor_keys: Vec<VerifyingKey>,
        product: impl Into<String>,
        device: DeviceInfo,
        state_dir: impl Into<PathBuf>,
        tls: TlsTrust,
    ) -> Self {
        ClientConfig {
            urls: urls.into_iter().map(Into::into).collect(),
            vendor_keys,
            organization_id: None,
            handshake_code: None,
            session_password: None,
            validation: None,
            product: product.into(),
            device,
            state_dir: state_dir.into(),
            report_interval: Duration::from_secs(REPORT_INTERVAL_S),
            timeout: DEFAULT_TIMEOUT,
            tls,
            clock: Clock::system(),
        }
    }

    fn validate(&self) -> Result<(), ClientError> {
        let invalid = |why: &str| Err(ClientError::Config(why.to_string()));
        if self.urls.is_empty() {
            return invalid("at least one appliance URL is required");
        }
        if let Some(url) = self.urls.iter().find(|u| !u.starts_with("https://")) {
            return Err(ClientError::Config(format!(
                "appliance URL {url:?} must start with https:// (the appliance speaks HTTPS only)"
            )));
        }
        if self.vendor_keys.is_empty() {
            return invalid("at least one vendor public key is required");
        }
        if self.product.trim().is_empty() {
            return invalid("the product name is empty");
        }
        self.device_uuid()?;
        if self.report_interval.is_zero() || self.timeout.is_zero() {
            return invalid("the report interval and the timeout must be positive");
        }
        Ok(())
    }

    /// The device UUID in the canonical form (lowercase, hyphenated) the appliance signs.
    fn device_uuid(&self) -> Result<String, ClientError> {
        match uuid::Uuid::parse_str(self.device.uuid.trim()) {
            Ok(uuid) if !uuid.is_nil() => Ok(uuid.hyphenated().to_string()),
            _ => Err(ClientError::Config(format!(
                "the device UUID {:?} is not a UUID (or is the nil UUID)",
                self.device.uuid
            ))),
        }
    }
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("urls", &self.urls)
            .field(
                "vendor_keys",
                &self
                    .vendor_keys
                    .iter()
                    .map(crate::keys::kid)
                    .collect::<Vec<_>>(),
            )
            .field("organization_id", &self.organization_id)
            .field("handshake_code", &self.handshake_code)
            .field(
                "session_password",
                &self.session_password.as_ref().map(|_| "<redacted>"),
            )
            .field("validation", &self.validation)
            .field("product", &self.product)
            .field("device", &self.device)
            .field("state_dir", &self.state_dir)
            .field("report_interval", &self.report_interval)
            .field("timeout", &self.timeout)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------------------------
// Results and errors

/// A verified authorization with the license that grants it.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub authorization: Authorization,
    pub license: License,
}

impl Grant {
    /// Until when the device may work without reaching the appliance.
    pub fn expires_at(&self) -> OffsetDateTime {
        self.authorization.expires_at
    }

    /// `ok`, `tolerance` (over quota, inside the tolerance) or `grace` (tokens).
    pub fn state(&self) -> AuthorizationState {
        self.authorization.state
    }

    /// Whether any granted item carries `feature`.
    pub fn has_feature(&self, feature: &str) -> bool {
        self.authorization
            .items
            .iter()
            .any(|item| item.features.iter().any(|f| f == feature))
    }

    pub fn item(&self, item_id: &str) -> Option<&GrantedItem> {
        self.authorization
            .items
            .iter()
            .find(|item| item.item_id == item_id)
    }

    /// The license's terms of a granted item (quota, model fields, validity).
    pub fn license_item(&self, item_id: &str) -> Option<&LicenseItem> {
        self.license
            .items
            .iter()
            .find(|item| item.item_id == item_id)
    }
}

/// What one [`Client::flush`] achieved.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FlushOutcome {
    /// Reports sent (each at most once per flush).
    pub sent: usize,
    /// Reports the appliance counted now.
    pub accepted: u64,
    /// Reports it had counted before (a retry after a lost answer): counted once.
    pub duplicates: u64,
    /// The highest sequence number of this device's stream the appliance has stored.
    pub acked_seq: u64,
    /// Reports still waiting: ones the appliance answered without storing (0 otherwise).
    /// A flush that loses the appliance midway fails with
    /// [`ClientError::Unreachable`] instead: the requests answered before are stored, and
    /// [`Client::status`] tells what is left.
    pub pending: usize,
    /// The newest authorization stored during this flush (verified first).
    pub renewed: Option<Grant>,
    /// Why the appliance's last answer did not renew the authorization (quota past its cutoff,
    /// item expired, device blocked or removed). The reports were counted all the same. The
    /// stored authorization stays, so the device keeps working offline until it expires,
    /// except after `DEVICE_BLOCKED` or `LEASE_REVOKED` (an admin blocked or removed the
    /// device): then it is dropped and [`Client::check`] fails with
    /// [`ClientError::NotAuthorized`] at once. A backlog sent in several requests can have
    /// both: renewed by an early answer, refused by the last one.
    pub renewal_error: Option<ErrorDetail>,
    /// The client authorized again: the appliance did not know the lease any more (its
    /// data was restored, or the lease was purged; then before sending the reports), or its
    /// renewal named items of a newer license or was older than the authorization held
    /// (its clock was set back).
    pub reauthorized: bool,
    /// Reports the appliance refused as invalid (`BAD_REQUEST`, e.g. for an item that no
    /// longer belongs to the lease) while it accepted a heartbeat of the same lease: it will
    /// never take them, so they were moved to `rejected.json` in the state directory instead
    /// of blocking every later report.
    pub rejected: usize,
}

/// The client's local bookkeeping, for display and diagnostics.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    /// The usage stream id (a UUID chosen once, when the state directory was created).
    pub stream: String,
    /// The sequence number the next report will get.
    pub next_seq: u64,
    /// Closed reports the appliance has not acknowledged yet.
    pub pending_reports: usize,
    /// When the open period started (its first recorded usage), if it has counters.
    pub open_since: Option<OffsetDateTime>,
    /// The open period's counters, per item id, per counter name.
    pub open_counters: BTreeMap<String, BTreeMap<String, u64>>,
    pub lease_id: Option<String>,
    /// Expiry of the stored authorization (not re-verified here: see [`Client::check`]).
    pub authorized_until: Option<OffsetDateTime>,
    /// The newest time seen from the appliance or the local clock (read as the appliance's).
    pub newest_time_seen: Option<OffsetDateTime>,
    /// The last time the appliance answered (any status).
    pub last_contact: Option<OffsetDateTime>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid client configuration: {0}")]
    Config(String),
    #[error("the state directory {} is in use by another process", .path.display())]
    StateLocked { path: PathBuf },
    #[error("cannot {action} {}: {source}", .path.display())]
    StateIo {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the client state in {} is unusable ({reason}); removing the directory resets the \
         device (its unsent usage is lost)",
        .path.display()
    )]
    StateCorrupt { path: PathBuf, reason: String },
    #[error("no appliance could be reached: {}", .attempts.join("; "))]
    Unreachable {
        /// One line per URL tried: the URL and why it failed.
        attempts: Vec<String>,
    },
    #[error("the appliance answered {code}: {message} (HTTP {status})")]
    Api {
        status: u16,
        code: ErrorCode,
        message: String,
    },
    #[error("unexpected answer from the appliance (HTTP {status}): {detail}")]
    UnexpectedResponse { status: u16, detail: String },
    #[error("the appliance's answer does not verify: {0}")]
    Chain(#[source] ChainError),
    /// The stored authorization was granted for another instance, user, handshake code or
    /// organization than the configuration names (the product was started with other
    /// settings on this state directory): [`Client::authorize`] again.
    #[error(
        "the authorization is for {setting} {found:?}, not the configured {configured:?}: \
         authorize again"
    )]
    OtherSettings {
        setting: &'static str,
        configured: String,
        found: String,
    },
    #[error("the authorization is for product {found:?}, not {expected:?}")]
    WrongProduct { expected: String, found: String },
    #[error("this device holds no authorization: authorize while the appliance is reachable")]
    NotAuthorized,
    #[error(
        "the authorization expired at {}: connect to the appliance to renew it",
        rfc3339(.expires_at)
    )]
    Expired { expires_at: OffsetDateTime },
    #[error(
        "the device clock ({}, read as the appliance's time) is behind the newest time already \
         seen ({}) by more than {} minutes: was it set back? Set it right",
        rfc3339(.local),
        rfc3339(.newest_seen),
        CLOCK_TOLERANCE.whole_minutes()
    )]
    ClockRolledBack {
        /// The device clock plus its offset from the appliance's (see [`Client::check`]).
        local: OffsetDateTime,
        newest_seen: OffsetDateTime,
    },
    #[error("item {item_id} is not granted by this device's authorization")]
    UnknownItem { item_id: String },
    /// The appliance served a version of a license older than one this device was served
    /// before: the vendor superseded it (an old backup restored on the appliance, or an
    /// appliance tampered with). The device keeps what it holds; IT imports the newer file
    /// again.
    #[error(
        "the appliance served version {served} of license {license_id}, older than version \
         {seen} this device was already served: the vendor superseded it (import the newer \
         license file on the appliance again)"
    )]
    SupersededLicense {
        license_id: String,
        served: u32,
        seen: u32,
    },
}

impl ClientError {
    /// The protocol error code, for errors the appliance answered.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether no appliance URL could be reached (the device is offline).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ClientError::Unreachable { .. })
    }
}

fn rfc3339(t: &OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

// ---------------------------------------------------------------------------------------------
// Persisted state

/// `state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct State {
    v: u32,
    /// The usage stream: a UUID v4 chosen when the state was created, kept forever.
    stream: String,
    /// The device the stream belongs to (the appliance refuses it from any other). Absent
    /// in files of earlier versions until the first start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    device_uuid: Option<String>,
    next_seq: u64,
    /// The first sequence number given to a report before the appliance said how far the
    /// stream got (no usage answer since the process started). Such reports wait for that
    /// answer: if the appliance has stored more of the stream than this state knew (the
    /// directory was restored from an old copy), they are numbered anew above it instead of
    /// being taken for duplicates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    unconfirmed_from: Option<u64>,
    authorization: Option<String>,
    license: Option<String>,
    lease_id: Option<String>,
    #[serde(default)]
    open: OpenPeriod,
    #[serde(default, with = "time::serde::rfc3339::option")]
    newest_time_seen: Option<OffsetDateTime>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    last_contact: Option<OffsetDateTime>,
    /// The appliance's clock minus the device's, in seconds, when the appliance last issued
    /// this client an authorization (or renewal): the client reads the device clock plus
    /// this, so a device clock that lags or runs ahead (a wrong time zone, no time server on
    /// the LAN) neither stops the product nor stretches its offline allowance.
    #[serde(default)]
    clock_offset_s: i64,
    /// The highest version of each license this device was served, by appliance: a lower
    /// one is refused (see [`ClientError::SupersededLicense`]). A device sees a few
    /// licenses in its life.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    license_versions: BTreeMap<String, u32>,
}

impl State {
    /// Where [`State::license_versions`] keeps `license`'s: license ids are the vendor's
    /// and versions count per appliance, so a device moved to another appliance starts anew.
    fn license_version_key(license: &License) -> String {
        format!(
            "{} {}",
            license.appliance.installation_id, license.license_id
        )
    }

    /// The highest version of `license` this device was served, if it was served one.
    fn seen_version(&self, license: &License) -> Option<u32> {
        let key = Self::license_version_key(license);
        self.license_versions.get(&key).copied()
    }

    fn note_license_version(&mut self, license: &License) {
        let seen = self
            .license_versions
            .entry(Self::license_version_key(license))
            .or_default();
        *seen = license.version.max(*seen);
    }

    fn new(device_uuid: &str) -> Self {
        State {
            v: STATE_VERSION,
            stream: uuid::Uuid::new_v4().to_string(),
            device_uuid: Some(device_uuid.to_string()),
            next_seq: 1,
            unconfirmed_from: None,
            authorization: None,
            license: None,
            lease_id: None,
            open: OpenPeriod::default(),
            newest_time_seen: None,
            last_contact: None,
            clock_offset_s: 0,
            license_versions: BTreeMap::new(),
        }
    }
}

/// The usage counted since the last report was closed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct OpenPeriod {
    /// When the first usage of this period was recorded.
    #[serde(default, with = "time::serde::rfc3339::option")]
    from: Option<OffsetDateTime>,
    /// item id -> counter name -> amount.
    #[serde(default)]
    counters: BTreeMap<String, BTreeMap<String, u64>>,
}

impl OpenPeriod {
    fn add(&mut self, item_id: &str, counter: &str, amount: u64, now: OffsetDateTime) {
        self.from.get_or_insert(now);
        let total = self
            .counters
            .entry(item_id.to_string())
            .or_default()
            .entry(counter.to_string())
            .or_default();
        *total = total.saturating_add(amount);
    }

    fn is_empty(&self) -> bool {
        self.counters.values().all(BTreeMap::is_empty)
    }

    fn counters_of(&self, item_id: &str) -> usize {
        self.counters.get(item_id).map_or(0, BTreeMap::len)
    }

    fn amount(&self, item_id: &str, counter: &str) -> u64 {
        self.counters
            .get(item_id)
            .and_then(|counters| counters.get(counter))
            .copied()
            .unwrap_or(0)
    }
}

/// `backlog.json`: closed reports not acknowledged yet, in `seq` order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Backlog {
    stream: String,
    reports: Vec<UsageReport>,
}

/// Closes the open period: one report per item that has counters, numbered from `next_seq`,
/// covering `[from, now]`. An empty period makes no report.
fn close_period(
    open: &mut OpenPeriod,
    next_seq: &mut u64,
    now: OffsetDateTime,
) -> Vec<UsageReport> {
    let period = std::mem::take(open);
    let from = period.from.unwrap_or(now);
    // A clock set back while the period was open must not make a report end before it starts.
    let to = now.max(from);
    let mut reports = Vec::new();
    for (item_id, counters) in period.counters {
        if counters.is_empty() {
            continue;
        }
        reports.push(UsageReport {
            seq: *next_seq,
            item_id,
            from,
            to,
            counters,
        });
        *next_seq = next_seq.saturating_add(1);
    }
    reports
}

/// The next request's reports: the oldest `max` of the backlog (an empty slice is a heartbeat).
fn next_chunk(backlog: &[UsageReport], max: usize) -> &[UsageReport] {
    &backlog[..backlog.len().min(max)]
}

/// Drops the reports the appliance has stored (`seq <= acked_seq`); returns how many.
fn trim_acked(backlog: &mut Vec<UsageReport>, acked_seq: u64) -> usize {
    let before = backlog.len();
    backlog.retain(|report| report.seq > acked_seq);
    before - backlog.len()
}

/// Repairs what a crash between the two files' writes leaves behind. Closing a period writes
/// the backlog first, then the state: if the backlog already holds reports numbered from the
/// state's `next_seq`, the open period was closed into them and must not be counted again.
fn reconcile(state: &mut State, backlog: &mut Backlog) {
    backlog.reports.sort_by_key(|report| report.seq);
    backlog.reports.dedup_by_key(|report| report.seq);
    if let Some(last) = backlog.reports.last()
        && last.seq >= state.next_seq
    {
        // Never sent (the crash came before the state's write, which precedes sending):
        // they wait for the stream to be confirmed, as any report of a new process does.
        state.unconfirmed_from.get_or_insert(state.next_seq);
        state.next_seq = last.seq.saturating_add(1);
        state.open = OpenPeriod::default();
    }
}

/// Closes the open period, if it has usage, into reports at the end of the backlog and writes
/// the backlog (before the state: see [`reconcile`] for a crash between the two writes).
/// Returns whether it closed one. If the backlog cannot be written the period stays open,
/// as the state file holds it: closed only in memory, it would be lost.
fn close_open_period(
    store: &Store,
    state: &mut State,
    backlog: &mut Backlog,
    now: OffsetDateTime,
) -> Result<bool, ClientError> {
    if state.open.is_empty() {
        return Ok(false);
    }
    let (open, next_seq, pending) = (state.open.clone(), state.next_seq, backlog.reports.len());
    backlog
        .reports
        .extend(close_period(&mut state.open, &mut state.next_seq, now));
    if let Err(e) = store.save_backlog(backlog) {
        (state.open, state.next_seq) = (open, next_seq);
        backlog.reports.truncate(pending);
        return Err(e);
    }
    Ok(true)
}

/// Fails when the local clock is behind the newest time seen by more than [`CLOCK_TOLERANCE`].
fn detect_rollback(
    local: OffsetDateTime,
    newest_seen: Option<OffsetDateTime>,
) -> Result<(), ClientError> {
    match newest_seen {
        Some(newest_seen) if local + CLOCK_TOLERANCE < newest_seen => {
            Err(ClientError::ClockRolledBack { local, newest_seen })
        }
        _ => Ok(()),
    }
}

/// The appliance's time at the last contact, carried forward by the monotonic time elapsed
/// since: what the local clock should read at least, whatever it says. None past the end of
/// time (a damaged state file's mark, refused by itself).
fn carried_forward(
    contact: Option<(Instant, OffsetDateTime)>,
    now: Option<Instant>,
) -> Option<OffsetDateTime> {
    let ((at, time), now) = (contact?, now?);
    let elapsed = time::Duration::try_from(now.saturating_duration_since(at)).ok()?;
    time.checked_add(elapsed)
}

fn advance(newest: &mut Option<OffsetDateTime>, seen: OffsetDateTime) {
    if newest.is_none_or(|n| seen > n) {
        *newest = Some(seen);
    }
}

/// The appliance's refusals after which a device stops using its authorization at once: an
/// admin blocked the device, or removed it (its leases revoked).
fn stops_the_device(code: ErrorCode) -> bool {
    matches!(code, ErrorCode::DeviceBlocked | ErrorCode::LeaseRevoked)
}

/// The report slot of the appliance time `now` (Unix seconds): [`Client::tick`] reports once
/// a slot. Slots are the report interval's windows on the appliance's clock (the
/// concurrent models' 3-minute windows at the default interval), shifted by the device's
/// `phase`: each device reports at its own moment of each window, so a fleet's reports
/// spread over the window, and the schedule does not drift however late the product calls
/// `tick` (a report due at a window's start plus the phase goes out within that window when
/// the call is less than the rest of the window late).
fn report_slot(now: i64, phase: i64, interval: i64) -> i64 {
    (now - phase).div_euclid(interval)
}

/// The report interval in whole seconds (at least one).
fn interval_s(interval: Duration) -> i64 {
    i64::try_from(interval.as_secs()).unwrap_or(i64::MAX).max(1)
}

/// A device's report phase: at random in the first five sixths of the interval (0 to 150 s
/// of a 3-minute window), so a `tick` called up to a sixth of the interval late (30 s) still
/// reports within the window.
fn new_report_phase(interval: Duration) -> Result<i64, ClientError> {
    let span = (interval_s(interval) * 5 / 6).max(1);
    Ok((u64::from_le_bytes(random()?) % span as u64) as i64)
}

/// 32 random bytes, base64url: 43 characters, inside the protocol's 16 to 64.
fn new_nonce() -> Result<String, ClientError> {
    Ok(BASE64URL_NOPAD.encode(&random::<32>()?))
}

/// `N` bytes from the system's random source.
fn random<const N: usize>() -> Result<[u8; N], ClientError> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(|e| {
        ClientError::Config(format!("the system's random source is unavailable: {e}"))
    })?;
    Ok(bytes)
}

/// Replaces `path` with `bytes` so that a crash leaves either the old or the new content:
/// write a temporary file next to it, fsync it, rename it over `path`, fsync the directory.
///
/// Once renamed, the new content is what the file holds, and the write counts as done: the
/// directory's sync only makes the rename outlast a power loss, and a failure of it is not
/// reported. Reported, the caller would take the file for unchanged while it is not (a
/// backlog holding a report its state still counts as open would lose later usage).
fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = beside(path, ".tmp");
    {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    // The rename itself is made durable by syncing the directory (best effort).
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    #[cfg(unix)]
    let _ = File::open(dir).and_then(|dir| dir.sync_all());
    // A directory opens only with FILE_FLAG_BACKUP_SEMANTICS; flushing it writes the rename
    // through, as MOVEFILE_WRITE_THROUGH would (std's rename does not ask for it).
    #[cfg(windows)]
    let _ = {
        use std::os::windows::fs::OpenOptionsExt;
        const FILE_FLAG_BACKUP_SEMANTICS: u32 = 0x0200_0000;
        fs::OpenOptions::new()
            .write(true)
            .custom_flags(FILE_FLAG_BACKUP_SEMANTICS)
            .open(dir)
            .and_then(|dir| dir.sync_all())
    };
    Ok(())
}

/// `path` with `suffix` added to its name: a file kept beside it.
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// A file's bytes; `None` when it does not exist.
fn read_file(path: &Path) -> Result<Option<Vec<u8>>, ClientError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ClientError::StateIo {
            action: "read",
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn unusable(path: &Path, e: serde_json::Error) -> ClientError {
    ClientError::StateCorrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Reads and parses a JSON file; `None` when it does not exist. A file that is not JSON at
/// all (torn or damaged on disk) is renamed `<name>.corrupt` (`.corrupt.1`, ... beside an
/// earlier one), kept for the vendor's support, and taken as absent: the client rebuilds
/// what it can rather than stop the product for good. JSON of another shape (written by
/// another version of the SDK) is refused and left alone.
fn read_or_set_aside<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, ClientError> {
    let Some(bytes) = read_file(path)? else {
        return Ok(None);
    };
    match serde_json::from_slice(&bytes) {
        Ok(value) => Ok(Some(value)),
        Err(e) if matches!(e.classify(), Category::Syntax | Category::Eof) => {
            // Beside any copy kept before (`.corrupt`, `.corrupt.1`, ...), never over it.
            let kept = std::iter::once(beside(path, ".corrupt"))
                .chain((1..).map(|n| beside(path, &format!(".corrupt.{n}"))))
                .find(|kept| !kept.exists())
                .expect("an unused name");
            fs::rename(path, kept).map_err(|source| ClientError::StateIo {
                action: "set aside",
                path: path.to_path_buf(),
                source,
            })?;
            Ok(None)
        }
        Err(e) => Err(unusable(path, e)),
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), ClientError> {
    let bytes = serde_json::to_vec_pretty(value).expect("the client state always serializes");
    write_atomic(path, &bytes).map_err(|source| ClientError::StateIo {
        action: "write",
        path: path.to_path_buf(),
        source,
    })
}

/// The first setting of the configuration that `auth` was not granted for: the device's
/// instance and user (a token pass is per user, a concurrent_instance seat per instance),
/// and the handshake code and organization when the configuration names them. As
/// `(setting, configured, found)`; an empty value is no value, as the appliance has it.
fn other_settings<'a>(
    config: &'a ClientConfig,
    auth: &'a Authorization,
) -> Option<(&'static str, &'a str, &'a str)> {
    let label = |s: Option<&'a str>| s.unwrap_or("");
    let named = |s: Option<&'a str>| s.map(str::trim).filter(|s| !s.is_empty());
    [
        (
            "instance",
            Some(label(config.device.instance.as_deref())),
            label(auth.instance.as_deref()),
        ),
        (
            "user",
            Some(label(config.device.user.as_deref())),
            label(auth.user.as_deref()),
        ),
        (
            "handshake code",
            named(config.handshake_code.as_deref()),
            auth.handshake_code.as_str(),
        ),
        (
            "organization",
            named(config.organization_id.as_deref()),
            auth.organization_id.as_str(),
        ),
    ]
    .into_iter()
    .find_map(|(setting, configured, found)| {
        configured
            .filter(|c| c != &found)
            .map(|c| (setting, c, found))
    })
}

/// The state directory: its two files and the lock that keeps other processes out.
struct Store {
    dir: PathBuf,
    _lock: File,
}

impl Store {
    fn open(dir: &Path) -> Result<Store, ClientError> {
        let io_error = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| ClientError::StateIo {
                action,
                path,
                source,
            }
        };
        fs::create_dir_all(dir).map_err(io_error("create", dir))?;
        let lock_path = dir.join(LOCK_FILE);
        // Opened for reading alone on a read-only file system: it locks all the same.
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .or_else(|_| File::open(&lock_path))
            .map_err(io_error("open", &lock_path))?;
        // A lock just released can stay held for a few milliseconds: a child process being
        // started anywhere in this process holds a copy of the lock's descriptor until it
        // runs its program. So a process waits a moment before it gives up.
        let deadline = Instant::now() + LOCK_WAIT;
        loop {
            match lock.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(TryLockError::WouldBlock) => {
                    return Err(ClientError::StateLocked {
                        path: dir.to_path_buf(),
                    });
                }
                Err(TryLockError::Error(source)) => {
                    return Err(ClientError::StateIo {
                        action: "lock",
                        path: lock_path,
                        source,
                    });
                }
            }
        }
        Ok(Store {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    /// Loads the state, or creates it (with a new stream for this device) in a new directory.
    fn load(&self, device_uuid: &str) -> Result<(State, Backlog), ClientError> {
        let state_path = self.dir.join(STATE_FILE);
        let backlog_path = self.dir.join(BACKLOG_FILE);
        let stored: Option<State> = read_or_set_aside(&state_path)?;
        let fresh = stored.is_none();
        let mut state = stored.unwrap_or_else(|| State::new(device_uuid));
        if state.v > STATE_VERSION {
            return Err(ClientError::StateCorrupt {
                path: state_path,
                reason: format!("written by a newer SDK (format {})", state.v),
            });
        }
        let mut backlog = match read_or_set_aside::<Backlog>(&backlog_path)? {
            Some(backlog) if backlog.stream == state.stream => backlog,
            // The state was lost (deleted, or unreadable and set aside) with reports waiting:
            // it goes on with their stream, numbered after them, so none is lost and those
            // the appliance has already are duplicates. The authorization is gone: the
            // device authorizes again.
            Some(backlog) if fresh && !backlog.reports.is_empty() => {
                state.stream = backlog.stream.clone();
                state.next_seq = backlog.reports.iter().map(|r| r.seq).max().unwrap_or(0) + 1;
                backlog
            }
            Some(backlog) if !backlog.reports.is_empty() => {
                return Err(ClientError::StateCorrupt {
                    path: backlog_path,
                    reason: format!(
                        "its reports belong to stream {}, the state's stream is {}",
                        backlog.stream, state.stream
                    ),
                });
            }
            _ => Backlog {
                stream: state.stream.clone(),
                reports: Vec::new(),
            },
        };
        reconcile(&mut state, &mut backlog);
        if fresh {
            self.save_backlog(&backlog)?;
            self.save_state(&state)?;
        }
        Ok((state, backlog))
    }

    fn save_state(&self, state: &State) -> Result<(), ClientError> {
        write_json(&self.dir.join(STATE_FILE), state)
    }

    fn save_backlog(&self, backlog: &Backlog) -> Result<(), ClientError> {
        write_json(&self.dir.join(BACKLOG_FILE), backlog)
    }

    /// Adds a report the appliance refused, with its reason, to `rejected.json` (one torn on
    /// disk is kept as `rejected.json.corrupt`, not left to block the backlog).
    fn set_aside(&self, report: &UsageReport, reason: &str) -> Result<(), ClientError> {
        let path = self.dir.join(REJECTED_FILE);
        let mut rejected: Vec<RejectedReport> = read_or_set_aside(&path)?.unwrap_or_default();
        rejected.push(RejectedReport {
            report: report.clone(),
            reason: reason.to_string(),
        });
        write_json(&path, &rejected)
    }
}

/// A report in `rejected.json`: kept for the vendor's support, never sent again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RejectedReport {
    report: UsageReport,
    reason: String,
}

/// Reads a stored authorization's payload without verifying it (for bookkeeping only: it was
/// verified before it was stored, and [`Client::check`] verifies it again).
fn decode_authorization(jws: &str) -> Option<Authorization> {
    jws::Token::decode(jws).ok()?.payload_as().ok()
}

// ---------------------------------------------------------------------------------------------
// HTTP

fn build_agent(config: &ClientConfig) -> Result<ureq::Agent, ClientError> {
    use ureq::tls::{PemItem, RootCerts, TlsConfig};
    let tls = match &config.tls {
        TlsTrust::Pinned(pem) => {
            let mut certs = Vec::new();
            for item in ureq::tls::parse_pem(pem) {
                match item {
                    Ok(PemItem::Certificate(cert)) => certs.push(cert),
                    Ok(_) => {}
                    Err(e) => {
                        return Err(ClientError::Config(format!(
                            "the pinned certificate is not valid PEM: {e}"
                        )));
                    }
                }
            }
            if certs.is_empty() {
                return Err(ClientError::Config(
                    "the pinned PEM holds no certificate".into(),
                ));
            }
            TlsConfig::builder()
                .root_certs(RootCerts::new_with_certs(&certs))
                .build()
        }
        TlsTrust::AcceptAnyCertificate => TlsConfig::builder().disable_verification(true).build(),
    };
    Ok(ureq::Agent::config_builder()
        .http_status_as_error(false)
        .https_only(true)
        .max_redirects(0)
        .timeout_global(Some(config.timeout))
        // A large body's request gets more time in all (below); reaching the appliance
        // (connection and TLS handshake) still gets `timeout`.
        .timeout_connect(Some(config.timeout))
        .user_agent(format!("keygate-sdk/{}", env!("CARGO_PKG_VERSION")))
        .tls_config(tls)
        .build()
        .new_agent())
}

/// Turns an HTTP answer into the expected body or the protocol's error.
fn interpret<T: DeserializeOwned>(status: u16, body: &[u8]) -> Result<T, ClientError> {
    let excerpt = || {
        let text = String::from_utf8_lossy(body);
        let mut excerpt: String = text.chars().take(200).collect();
        if text.chars().count() > 200 {
            excerpt.push('…');
        }
        excerpt
    };
    if (200..300).contains(&status) {
        return serde_json::from_slice(body).map_err(|e| ClientError::UnexpectedResponse {
            status,
            detail: format!("{e}: {}", excerpt()),
        });
    }
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(ErrorBody { error }) => Err(ClientError::Api {
            status,
            code: error.code,
            message: error.message,
        }),
        Err(_) => Err(ClientError::UnexpectedResponse {
            status,
            detail: excerpt(),
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// The client

/// A device's connection to its keygate appliance, with its offline state. See the module
/// documentation.
pub struct Client {
    config: ClientConfig,
    agent: ureq::Agent,
    store: Store,
    state: State,
    backlog: Backlog,
    /// The stored authorization's payload.
    current: Option<Authorization>,
    /// The URL that answered last: tried first next time.
    preferred_url: usize,
    /// Where in each report interval this device reports, in seconds (see [`report_slot`]).
    report_phase_s: i64,
    /// The report slot of the last flush attempt.
    last_flush_slot: Option<i64>,
    /// `state.newest_time_seen` as last written to disk (or tried, when `check` failed to).
    persisted_newest: Option<OffsetDateTime>,
    /// Whether the state in memory holds numbering the state file does not (its write
    /// failed): every later write must succeed, or the call fails.
    numbering_unsaved: bool,
    /// The appliance's time in the newest authorization stored by this process (at start:
    /// the newest time the state has seen), and when, on the monotonic clock.
    contact_mark: Option<(Instant, OffsetDateTime)>,
    /// Whether this process has had a usage answer, which tells where the stream stands
    /// (see `State::unconfirmed_from`).
    stream_confirmed: bool,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("config", &self.config)
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Checks the configuration, creates the state directory if needed, takes its lock and
    /// loads the state (a new directory gets a new usage stream). No network traffic.
    pub fn new(mut config: ClientConfig) -> Result<Client, ClientError> {
        config.validate()?;
        config.device.uuid = config.device_uuid()?;
        let agent = build_agent(&config)?;
        let store = Store::open(&config.state_dir)?;
        let (mut state, mut backlog) = store.load(&config.device.uuid)?;
        // A state file of an earlier version names no device: it is this one's from now on.
        let adopted = state.device_uuid.is_none();
        let owner = state
            .device_uuid
            .get_or_insert_with(|| config.device.uuid.clone());
        if *owner != config.device.uuid {
            return Err(ClientError::Config(format!(
                "the state directory {} belongs to device {owner}, not {}: a usage stream \
                 belongs to one device, give each device its own directory",
                config.state_dir.display(),
                config.device.uuid
            )));
        }
        // No device clock is 200 years off (one without a battery starts in 1970): a larger
        // offset is a damaged or edited file, read as none rather than overflow the clock.
        if state.clock_offset_s.unsigned_abs() > MAX_CLOCK_OFFSET_S {
            state.clock_offset_s = 0;
        }
        // Usage an earlier process left open is closed under the numbering this state has:
        // in a directory restored from an old copy, the appliance takes it for the duplicate
        // it is. Only what this process records waits for the stream to be confirmed.
        // If that cannot be written (a full or read-only disk), a product with a valid
        // authorization keeps running, its usage still open.
        let now = config.clock.now() + time::Duration::seconds(state.clock_offset_s);
        // A state file of an earlier version keeps no license versions: the license it
        // holds is the first (written at the next change).
        if state.license_versions.is_empty()
            && let Some(license) = state.license.as_deref()
            && let Ok((license, _)) = chain::verify_license(license, &config.vendor_keys)
        {
            state.note_license_version(&license);
        }
        let closed = close_open_period(&store, &mut state, &mut backlog, now).unwrap_or(false);
        if adopted || closed {
            // Written again at the next change if it cannot be now: the files on disk agree
            // either way (see `reconcile` for a backlog written without its state).
            let _ = store.save_state(&state);
        }
        let current = state
            .authorization
            .as_deref()
            .and_then(decode_authorization);
        // A process that starts offline holds the clock to the newest time its state has
        // seen, carried forward by the monotonic clock, as one that stored an authorization
        // does: a clock held still from the start falls behind it.
        let contact_mark = config.clock.monotonic().zip(
            state
                .newest_time_seen
                .max(current.as_ref().map(|auth| auth.issued_at)),
        );
        let report_phase_s = new_report_phase(config.report_interval)?;
        Ok(Client {
            persisted_newest: state.newest_time_seen,
            numbering_unsaved: false,
            config,
            agent,
            store,
            state,
            backlog,
            current,
            preferred_url: 0,
            report_phase_s,
            last_flush_slot: None,
            contact_mark,
            stream_confirmed: false,
        })
    }

    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// The local bookkeeping: stream, sequence numbers, backlog, open period, lease.
    pub fn status(&self) -> Status {
        Status {
            stream: self.state.stream.clone(),
            next_seq: self.state.next_seq,
            pending_reports: self.backlog.reports.len(),
            open_since: self.state.open.from,
            open_counters: self.state.open.counters.clone(),
            lease_id: self.state.lease_id.clone(),
            authorized_until: self.current.as_ref().map(|auth| auth.expires_at),
            newest_time_seen: self.state.newest_time_seen,
            last_contact: self.state.last_contact,
        }
    }

    /// Asks the appliance for an authorization (`POST /api/v1/authorize`) with a fresh nonce,
    /// verifies the chain (vendor key, license, appliance signature, this device, the nonce,
    /// not expired at the local time, this product), stores it and returns it. A license
    /// older than a version of it this device was served before is refused
    /// ([`ClientError::SupersededLicense`]).
    ///
    /// Authorizing again from the same device reuses its seat. Usage not yet sent goes first,
    /// on the lease it was counted for, as [`Client::flush`] sends it (which may renew the
    /// stored authorization, or drop it when the appliance answers that the device is
    /// blocked); if the appliance cannot be reached, that error comes back at once. On an
    /// error of the authorization itself nothing stored changes, and a previous
    /// authorization stays usable offline until it expires, except after `DEVICE_BLOCKED`:
    /// an admin blocked this device, and its authorization is dropped.
    pub fn authorize(&mut self) -> Result<Grant, ClientError> {
        // On that lease: an authorization through another handshake code moves the lease
        // to an item whose reports the old item's are not, and one refused
        // (`DEVICE_BLOCKED`) would leave them waiting for an admin to unblock the device.
        if self.state.lease_id.is_some()
            && (!self.backlog.reports.is_empty() || !self.state.open.is_empty())
            && let Err(e) = self.flush_with(false)
            && e.is_unreachable()
        {
            return Err(e);
        }
        self.authorize_now()
    }

    /// Authorizes again after the appliance said the lease is gone (unknown, or released):
    /// the device holds no seat, so when the appliance refuses it one (full, say: the seat
    /// it had may be another device's by now), the authorization held is dropped too, not
    /// run out. Other failures (busy, an internal fault, a code this version does not know,
    /// out of reach) keep it.
    fn authorize_again(&mut self) -> Result<Grant, ClientError> {
        use ErrorCode::*;
        match self.authorize_now() {
            Err(e)
                if e.code().is_some_and(|code| {
                    matches!(
                        code,
                        QuotaExceeded
                            | NoLicense
                            | LicenseExpired
                            | LicenseNotStarted
                            | HandshakeNotFound
                            | HandshakeRequired
                            | SessionPasswordMismatch
                            | ValidationFailed
                            | DeviceBlocked
                            | LeaseRevoked
                    )
                }) =>
            {
                self.forget_authorization()?;
                Err(e)
            }
            result => result,
        }
    }

    /// [`Client::authorize`] without sending the usage first (a flush authorizing again
    /// goes on sending it itself).
    fn authorize_now(&mut self) -> Result<Grant, ClientError> {
        let nonce = new_nonce()?;
        let request = AuthorizeRequest {
            organization_id: self.config.organization_id.clone(),
            handshake_code: self.config.handshake_code.clone(),
            session_password: self.config.session_password.clone(),
            product: self.config.product.clone(),
            device: self.config.device.clone(),
            validation: self.config.validation.clone(),
            nonce: nonce.clone(),
        };
        let sent = self.config.clock.now();
        let response: AuthorizeResponse = match self.post("/api/v1/authorize", &request) {
            Err(e) if e.code().is_some_and(stops_the_device) => {
                self.forget_authorization()?;
                return Err(e);
            }
            response => response?,
        };
        let (grant, offset) = self.verify_fresh(
            &response.authorization,
            &response.license,
            Some(&nonce),
            sent,
        )?;
        let license = &grant.license;
        if let Some(seen) = self.state.seen_version(license)
            && seen > license.version
        {
            return Err(ClientError::SupersededLicense {
                license_id: license.license_id.clone(),
                served: license.version,
                seen,
            });
        }
        // The nonce proves the authorization is fresh.
        self.store_authorization(response.authorization, response.license, &grant, offset);
        self.state.last_contact = Some(self.now());
        self.save_state()?;
        Ok(grant)
    }

    /// Re-verifies the stored authorization offline at the local time: the product may run
    /// while this succeeds.
    ///
    /// Fails with [`ClientError::NotAuthorized`] when there is none,
    /// [`ClientError::Expired`] once it expired (renewals come with every usage report, so a
    /// device in reach of the appliance does not get there), and
    /// [`ClientError::ClockRolledBack`] when the local clock is more than [`CLOCK_TOLERANCE`]
    /// behind the newest time seen (the appliance's, or this client's own earlier clock
    /// readings): a clock set back to stretch the offline allowance. Each success advances the
    /// newest time seen.
    ///
    /// The local clock is read as the appliance's: the device clock plus its offset from the
    /// appliance's, measured at each authorization (a renewal only raises it) and kept with
    /// the state. A device clock that lags or runs ahead by hours therefore works, and its offline
    /// allowance ends when the appliance's time says; a clock set back after the last contact
    /// is caught. A clock that was once set too far ahead and then corrected recovers at the
    /// next authorization, which restarts the mark from the appliance's time. While the process
    /// runs, the clock is also held to the appliance's time at the last authorization or
    /// renewal (at start: the newest time seen) plus the monotonic time elapsed since, with the
    /// same tolerance, and that time is written down as seen: a clock held still while offline
    /// falls behind it, and one set back a little before each restart does too.
    pub fn check(&mut self) -> Result<Grant, ClientError> {
        let (Some(authorization), Some(license)) = (
            self.state.authorization.as_deref(),
            self.state.license.as_deref(),
        ) else {
            return Err(ClientError::NotAuthorized);
        };
        let (now, carried) = self.checked_now()?;
        let grant = self.verify(authorization, license, None, now)?;
        // The appliance's signed time of issue is a floor that no edit of the state file
        // lowers.
        detect_rollback(now, Some(grant.authorization.issued_at))?;
        advance(&mut self.state.newest_time_seen, now);
        // The time carried forward is written down too: a clock set back a little before
        // each restart (inside the tolerance every time) cannot hold the time still.
        if let Some(carried) = carried {
            advance(&mut self.state.newest_time_seen, carried);
        }
        let newest = self.state.newest_time_seen.unwrap_or(now);
        let persisted_recently = self
            .persisted_newest
            .is_some_and(|persisted| newest - persisted < NEWEST_PERSIST_STEP);
        // The mark is written about once a minute. A write that fails (a full or read-only
        // disk) does not stop a product holding a valid authorization: the mark stays in
        // memory and the write is tried again a minute later, not at every check.
        if !persisted_recently && self.save_state().is_err() {
            self.persisted_newest = self.state.newest_time_seen;
        }
        Ok(grant)
    }

    /// The local clock read as the appliance's, refused when it is behind the newest time
    /// seen or the appliance's time carried forward since the last contact (returned too).
    fn checked_now(&self) -> Result<(OffsetDateTime, Option<OffsetDateTime>), ClientError> {
        let now = self.now();
        let carried = carried_forward(self.contact_mark, self.config.clock.monotonic());
        detect_rollback(now, self.state.newest_time_seen)?;
        detect_rollback(now, carried)?;
        Ok((now, carried))
    }

    /// Adds `amount` to `counter` of `item_id` in the open period, durably (the state file is
    /// rewritten and synced: record business events, or batch very frequent ones).
    ///
    /// The item must be granted by the stored authorization (the appliance refuses reports for
    /// items outside the lease), and the authorization must not have expired, on a clock not
    /// set back (as [`Client::check`] sees it). The period becomes a report at the next
    /// [`Client::flush`].
    pub fn record(&mut self, item_id: &str, counter: &str, amount: u64) -> Result<(), ClientError> {
        let Some(current) = &self.current else {
            return Err(ClientError::NotAuthorized);
        };
        if !current.items.iter().any(|item| item.item_id == item_id) {
            return Err(ClientError::UnknownItem {
                item_id: item_id.to_string(),
            });
        }
        // A device stops at its authorization's expiry: no usage is counted past it, nor
        // on a clock set back from past it.
        let (expires_at, issued_at) = (current.expires_at, current.issued_at);
        let (now, _) = self.checked_now()?;
        detect_rollback(now, Some(issued_at))?;
        if now >= expires_at {
            return Err(ClientError::Expired { expires_at });
        }
        if !is_identifier(counter) {
            return Err(ClientError::Config(format!(
                "the counter name {counter:?} must be 1 to 64 letters, digits, '.', '_' or '-'"
            )));
        }
        if amount == 0 {
            return Ok(());
        }
        let open = self.state.open.amount(item_id, counter);
        if open.saturating_add(amount) > MAX_COUNT {
            return Err(ClientError::Config(format!(
                "at most {MAX_COUNT} of one counter per report: flush before recording more"
            )));
        }
        if open == 0 && self.state.open.counters_of(item_id) >= MAX_COUNTERS {
            return Err(ClientError::Config(format!(
                "at most {MAX_COUNTERS} counters per report: flush before recording another"
            )));
        }
        // Counted only once on disk: a failed write leaves the period as it was, so a caller
        // that retries counts the usage once.
        let before = (self.state.open.clone(), self.state.newest_time_seen);
        self.state.open.add(item_id, counter, amount, now);
        advance(&mut self.state.newest_time_seen, now);
        self.save_state().inspect_err(|_| {
            (self.state.open, self.state.newest_time_seen) = before;
        })
    }

    /// Closes the open period into reports (if it has counters) and sends every unacknowledged
    /// report to `POST /api/v1/usage`, oldest first, at most [`MAX_REPORTS_PER_REQUEST`] per
    /// request; with nothing to send it sends a heartbeat. Each answer trims the acknowledged
    /// reports and may renew the authorization (verified before it is stored).
    ///
    /// When the appliance cannot be reached the reports stay for the next flush and the error
    /// is returned. When it no longer knows the lease (`LEASE_NOT_FOUND`) the client authorizes
    /// again once and resends: the stream and sequence numbers stay the same, so each report
    /// counts once; when that authorization is refused for good (`QUOTA_EXCEEDED`, say), the
    /// authorization held is dropped (the seat it had may be another device's) and the
    /// refusal returned. Usage open that cannot be stored (a full disk) stays open: what is
    /// stored is sent all the same (a heartbeat at least, which renews), then the storage
    /// error is returned (an error the appliance answered first).
    pub fn flush(&mut self) -> Result<FlushOutcome, ClientError> {
        self.flush_with(true)
    }

    /// Flushes once per [`ClientConfig::report_interval`] window of the appliance's clock, at
    /// this device's moment of it (and on the first call): call it from the product's loop as
    /// often as convenient, at least every 30 seconds at the default interval so that no
    /// window is missed; it returns `None` when it is not time yet. A late call does not
    /// delay the next ones. An error (typically the appliance being out of reach) leaves
    /// the reports buffered; the next attempt comes in the next window.
    pub fn tick(&mut self) -> Option<Result<FlushOutcome, ClientError>> {
        (self.last_flush_slot != Some(self.report_slot())).then(|| self.flush())
    }

    /// How long until [`Client::tick`] flushes (zero when it would flush now).
    pub fn next_tick_in(&self) -> Duration {
        let slot = self.report_slot();
        if self.last_flush_slot != Some(slot) {
            return Duration::ZERO;
        }
        let interval = interval_s(self.config.report_interval);
        let next = (slot + 1) * interval + self.report_phase_s;
        let now = self.now();
        let left = time::Duration::seconds(next) - (now - OffsetDateTime::UNIX_EPOCH);
        Duration::try_from(left).unwrap_or(Duration::ZERO)
    }

    /// The report slot the appliance's time is in now (see [`report_slot`]).
    fn report_slot(&self) -> i64 {
        report_slot(
            self.now().unix_timestamp(),
            self.report_phase_s,
            interval_s(self.config.report_interval),
        )
    }

    /// Ends the lease (`POST /api/v1/release`), which frees a concurrent or standalone seat at
    /// once, after a best-effort flush of the usage, and forgets the authorization: it leaves
    /// the state directory before the release is sent, and comes back if the release fails.
    /// The usage stream, its numbering and any unsent reports stay (they go out after the next
    /// authorization). Releasing without an authorization does nothing.
    ///
    /// The public trial's authorization is kept, not released: it holds no seat, and the
    /// appliance gives a device one trial authorization only, so a release would end the
    /// trial for good. Its usage is sent and the next start goes on with it until it expires.
    pub fn release(&mut self) -> Result<(), ClientError> {
        if self.state.lease_id.is_none() {
            return Ok(());
        }
        let trial = self.holds_trial();
        // Best effort: the reports stay in the backlog if this fails, and re-authorizing here
        // would only take a seat to give it back.
        let _ = self.flush_with(false);
        if trial {
            return Ok(());
        }
        let Some(lease_id) = self.state.lease_id.clone() else {
            return Ok(());
        };
        let request = ReleaseRequest {
            lease_id,
            device_uuid: self.config.device.uuid.clone(),
        };
        // The authorization leaves the state directory before the seat is given back: a
        // crash or a failed write after the release would otherwise start the device again
        // on a seat another device may have taken. It comes back if the release fails.
        let held = (
            self.state.authorization.take(),
            self.state.license.take(),
            self.current.take(),
        );
        let restore = move |client: &mut Client| {
            (
                client.state.authorization,
                client.state.license,
                client.current,
            ) = held;
        };
        if let Err(e) = self.save_state() {
            restore(self);
            return Err(e);
        }
        match self.post::<_, ReleaseResponse>("/api/v1/release", &request) {
            // The appliance does not know the lease: it is as released as it gets.
            Ok(_)
            | Err(ClientError::Api {
                code: ErrorCode::LeaseNotFound,
                ..
            }) => {}
            Err(e) => {
                restore(self);
                self.save_state()?;
                return Err(e);
            }
        }
        self.state.last_contact = Some(self.now());
        self.forget_authorization()
    }

    /// Drops the stored authorization (the usage stream and its reports stay).
    fn forget_authorization(&mut self) -> Result<(), ClientError> {
        self.state.authorization = None;
        self.state.license = None;
        self.state.lease_id = None;
        self.current = None;
        self.save_state()
    }

    /// `GET /api/v1/appliance`: the appliance's identity, version and time. Its time is
    /// unsigned, so it is shown, not taken as a time seen: only the appliance's signed times
    /// of issue move the mark of [`Client::check`] from the appliance's side.
    pub fn appliance_info(&mut self) -> Result<ApplianceInfo, ClientError> {
        let info: ApplianceInfo = self.call("/api/v1/appliance", None)?;
        let now = self.now();
        self.state.last_contact = Some(now);
        advance(&mut self.state.newest_time_seen, now);
        self.save_state()?;
        Ok(info)
    }

    fn flush_with(&mut self, reauthorize: bool) -> Result<FlushOutcome, ClientError> {
        self.last_flush_slot = Some(self.report_slot());
        let now = self.now();
        advance(&mut self.state.newest_time_seen, now);
        let next_seq = self.state.next_seq;
        // Usage open now that cannot be stored (a full disk) waits open, told after: what
        // is stored goes out all the same, a heartbeat at least, so that a device in reach
        // of the appliance is still renewed (and counted in its window).
        let (closed, unstored) =
            match close_open_period(&self.store, &mut self.state, &mut self.backlog, now) {
                Ok(closed) => (closed, None),
                Err(e) => (false, Some(e)),
            };
        if closed && !self.stream_confirmed {
            self.state.unconfirmed_from.get_or_insert(next_seq);
        }
        self.save_state_if_numbered(closed)?;
        // An error the appliance answered (a refused authorization, say) comes before the
        // storage error; a stop it sent in `renewal_error` stops the device all the same
        // (`check` fails), though the flush may tell the storage error.
        match (self.send_backlog(reauthorize), unstored) {
            (Err(refused @ ClientError::Api { .. }), _) => Err(refused),
            (_, Some(unstored)) => Err(unstored),
            (sent, None) => sent,
        }
    }

    /// Sends the reports stored (a heartbeat when there are none) until the appliance has
    /// them all, or no more can go now.
    fn send_backlog(&mut self, reauthorize: bool) -> Result<FlushOutcome, ClientError> {
        let mut outcome = FlushOutcome::default();
        let mut chunk_size = MAX_REPORTS_PER_REQUEST;
        loop {
            let Some(lease_id) = self.state.lease_id.clone() else {
                return Err(ClientError::NotAuthorized);
            };
            // Until the stream is confirmed, only reports numbered before this process go
            // (a heartbeat when there are none).
            let sendable = match self.state.unconfirmed_from {
                Some(from) => self.backlog.reports.partition_point(|r| r.seq < from),
                None => self.backlog.reports.len(),
            };
            let reports = next_chunk(&self.backlog.reports[..sendable], chunk_size).to_vec();
            let sent_reports = (reports.len(), reports.last().map(|report| report.seq));
            let request = UsageRequest {
                lease_id,
                device_uuid: self.config.device.uuid.clone(),
                stream: self.state.stream.clone(),
                reports,
            };
            let sent = self.config.clock.now();
            let Some(response) =
                self.send_usage(request, reauthorize, &mut outcome, &mut chunk_size)?
            else {
                continue;
            };
            let more =
                self.take_usage_answer(response, sent, sent_reports, reauthorize, &mut outcome)?;
            if !more {
                break;
            }
        }
        outcome.pending = self.backlog.reports.len();
        Ok(outcome)
    }

    /// Sends one usage request. `None` when it is to be sent again, differently: after the
    /// client authorized again (the appliance did not know the lease), in smaller chunks (too
    /// large, or too slow for the link), or without a report the appliance refuses (set aside
    /// in `rejected.json`).
    fn send_usage(
        &mut self,
        request: UsageRequest,
        reauthorize: bool,
        outcome: &mut FlushOutcome,
        chunk_size: &mut usize,
    ) -> Result<Option<UsageResponse>, ClientError> {
        let count = request.reports.len();
        match self.post("/api/v1/usage", &request) {
            Ok(response) => Ok(Some(response)),
            Err(ClientError::Api {
                code: ErrorCode::LeaseNotFound,
                ..
            }) if reauthorize && !outcome.reauthorized => {
                outcome.reauthorized = true;
                self.authorize_again()?;
                Ok(None)
            }
            Err(ClientError::Api {
                code: ErrorCode::PayloadTooLarge | ErrorCode::BadRequest,
                ..
            }) if count > 1 => {
                *chunk_size = count / 2;
                Ok(None)
            }
            // The body came too slowly for the appliance (a slow link): smaller ones pass.
            Err(ClientError::UnexpectedResponse { status: 408, .. }) if count > 1 => {
                *chunk_size = count / 2;
                Ok(None)
            }
            // One report refused: if a heartbeat of the same lease goes through, the fault
            // is the report's, and it is set aside rather than block the backlog forever.
            // Only the protocol's own refusal (HTTP 400) counts: anything else in between
            // (a proxy, a timeout) is no verdict on the report.
            Err(ClientError::Api {
                status: 400,
                code: ErrorCode::BadRequest,
                message,
            }) if count == 1 => {
                let heartbeat = UsageRequest {
                    reports: Vec::new(),
                    ..request
                };
                if self
                    .post::<_, UsageResponse>("/api/v1/usage", &heartbeat)
                    .is_err()
                {
                    return Err(ClientError::Api {
                        status: 400,
                        code: ErrorCode::BadRequest,
                        message,
                    });
                }
                // Set aside on disk before it leaves the backlog: a failed write
                // loses nothing.
                self.store.set_aside(&self.backlog.reports[0], &message)?;
                self.backlog.reports.remove(0);
                self.store.save_backlog(&self.backlog)?;
                outcome.rejected += 1;
                *chunk_size = MAX_REPORTS_PER_REQUEST;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Takes the appliance's answer to a usage request sent at `sent` (device clock) with
    /// `count` reports, the last numbered `last_sent`: trims what it acknowledged, stores its renewal. Returns
    /// whether more reports are to be sent now.
    fn take_usage_answer(
        &mut self,
        response: UsageResponse,
        sent: OffsetDateTime,
        (count, last_sent): (usize, Option<u64>),
        reauthorize: bool,
        outcome: &mut FlushOutcome,
    ) -> Result<bool, ClientError> {
        if response.acked_seq > i64::MAX as u64 {
            // No appliance stores a seq past the largest integer it keeps.
            return Err(ClientError::UnexpectedResponse {
                status: 200,
                detail: format!("acked_seq {} is out of range", response.acked_seq),
            });
        }
        let numbering = (self.state.next_seq, self.state.unconfirmed_from);
        let now = self.now();
        self.state.last_contact = Some(now);
        self.stream_confirmed = true;
        // The reports held back can go now; numbered anew above what the appliance
        // stored if this state was behind it (before trimming, which would drop them).
        // Renumbered on disk first: a state saved later without the backlog's new numbers
        // would take the old ones (at or below acked_seq) for acknowledged.
        let released = self.state.unconfirmed_from;
        if let Some(from) = released.filter(|from| response.acked_seq >= *from) {
            let mut renumbered = self.backlog.clone();
            let mut seq = response.acked_seq;
            for report in renumbered.reports.iter_mut().filter(|r| r.seq >= from) {
                seq += 1;
                report.seq = seq;
            }
            self.store.save_backlog(&renumbered)?;
            self.backlog = renumbered;
            self.state.next_seq = seq + 1;
        }
        self.state.unconfirmed_from = None;
        outcome.sent += count;
        outcome.accepted = outcome.accepted.saturating_add(response.accepted);
        outcome.duplicates = outcome.duplicates.saturating_add(response.duplicates);
        outcome.acked_seq = response.acked_seq;
        if trim_acked(&mut self.backlog.reports, response.acked_seq) > 0 {
            self.store.save_backlog(&self.backlog)?;
        }
        // The appliance has stored reports this client has not numbered yet (this state
        // directory was restored from an old copy): numbering goes on above them, or the
        // next reports would be taken for duplicates.
        if response.acked_seq >= self.state.next_seq {
            self.state.next_seq = response.acked_seq.saturating_add(1);
        }
        // New numbering is on disk before anything else can end this call.
        if numbering != (self.state.next_seq, self.state.unconfirmed_from) {
            self.save_state_if_numbered(true)?;
        }
        outcome.renewal_error = response.renewal_error;
        // The lease was released (by another state directory sharing it, say): the
        // reports are stored; a new authorization gives the device a lease again.
        if outcome
            .renewal_error
            .as_ref()
            .is_some_and(|e| e.code == ErrorCode::LeaseNotFound)
            && reauthorize
            && !outcome.reauthorized
        {
            outcome.reauthorized = true;
            outcome.renewed = Some(self.authorize_again()?);
            outcome.renewal_error = None;
        }
        if let Some(renewal) = response.authorization {
            match self.accept_renewal(renewal, sent) {
                Ok(Some(grant)) => outcome.renewed = Some(grant),
                // Older than the authorization held (the appliance's clock was set back: it
                // ran ahead), or the device clock reads ahead of the appliance's. Ignored
                // until the clocks agree, renewals would let the authorization held run out
                // while the appliance is there; an authorization answering a fresh nonce is
                // taken whatever its time (not the public trial's: it is given once).
                Ok(None) if reauthorize && !outcome.reauthorized && !self.holds_trial() => {
                    outcome.reauthorized = true;
                    outcome.renewed = Some(self.authorize_now()?);
                }
                Ok(None) => {}
                // The renewal names items of a license this device does not hold yet (the
                // vendor's new version was imported): authorizing again fetches it.
                Err(ClientError::Chain(
                    ChainError::ForeignItem(_) | ChainError::OutsideLicense(_),
                )) if reauthorize && !outcome.reauthorized => {
                    outcome.reauthorized = true;
                    outcome.renewed = Some(self.authorize_now()?);
                }
                Err(e) => {
                    self.save_state()?;
                    return Err(e);
                }
            }
        }
        self.save_state_if_numbered(false)?;
        let progressed = last_sent.is_some_and(|seq| response.acked_seq >= seq);
        let more = !self.backlog.reports.is_empty() && (progressed || released.is_some());
        // An admin blocked or removed the device: it stops now, not when the
        // authorization it holds runs out, once the appliance has the reports (it
        // records them on the known lease all the same).
        if !more
            && outcome
                .renewal_error
                .as_ref()
                .is_some_and(|e| stops_the_device(e.code))
        {
            self.forget_authorization()?;
            outcome.renewed = None;
        }
        Ok(more)
    }

    /// Whether the authorization held is the public trial's (it names no item).
    fn holds_trial(&self) -> bool {
        self.current
            .as_ref()
            .is_some_and(|held| held.items.is_empty())
    }

    /// Verifies a renewal that came with a usage answer (to a request sent at `sent` by the
    /// device clock) against the stored license and stores it. Returns the stored grant, or
    /// None for a renewal this device does not take: one older than the authorization held,
    /// or one that would set the device's time back by more than [`CLOCK_TOLERANCE`].
    ///
    /// No nonce binds a renewal to its request, so a renewal replayed days later (copied from
    /// the state file, or collected from the appliance) reads like one from a device clock
    /// running ahead: taking its time would set the device's time back and give its offline
    /// allowance again. A renewal therefore only moves the device's time forward; a clock
    /// found running ahead is measured again by authorizing (the caller's part), whose answer
    /// a nonce proves fresh.
    fn accept_renewal(
        &mut self,
        renewal: String,
        sent: OffsetDateTime,
    ) -> Result<Option<Grant>, ClientError> {
        let Some(license) = self.state.license.clone() else {
            return Err(ClientError::NotAuthorized);
        };
        let held_offset = self.state.clock_offset_s;
        let (grant, measured) = self.verify_fresh(&renewal, &license, None, sent)?;
        if self.state.lease_id.as_deref() != Some(grant.authorization.lease_id.as_str()) {
            return Err(ClientError::UnexpectedResponse {
                status: 200,
                detail: format!(
                    "the renewal is for lease {}, not this device's",
                    grant.authorization.lease_id
                ),
            });
        }
        let issued_at = grant.authorization.issued_at;
        advance(&mut self.state.newest_time_seen, issued_at);
        let older = self
            .current
            .as_ref()
            .is_some_and(|current| current.issued_at > issued_at);
        if older || measured + CLOCK_TOLERANCE.whole_seconds() < held_offset {
            return Ok(None);
        }
        self.state.clock_offset_s = held_offset.max(measured);
        let now = self.now();
        advance(&mut self.state.newest_time_seen, now);
        let instant = self.config.clock.monotonic();
        let carried = carried_forward(self.contact_mark, instant);
        self.hold(renewal, &grant);
        if let Some(instant) = instant {
            self.contact_mark = Some((instant, carried.map_or(issued_at, |c| c.max(issued_at))));
        }
        Ok(Some(grant))
    }

    /// Stores an authorization that answers this client's nonce, with the device clock's
    /// `offset` measured by [`Client::verify_fresh`]. The appliance vouches for the time: the
    /// offset is taken anew and the marks restart from the time of issue, so a device clock
    /// once set too far ahead, or set right after running hours off, recovers here instead of
    /// failing every check.
    fn store_authorization(&mut self, jws: String, license: String, grant: &Grant, offset: i64) {
        self.state.clock_offset_s = offset;
        self.state.newest_time_seen = Some(grant.authorization.issued_at.max(self.now()));
        self.state.license = Some(license);
        self.state.note_license_version(&grant.license);
        self.hold(jws, grant);
        if let Some(instant) = self.config.clock.monotonic() {
            self.contact_mark = Some((instant, grant.authorization.issued_at));
        }
    }

    /// Holds `jws` as the authorization in use.
    fn hold(&mut self, jws: String, grant: &Grant) {
        self.state.authorization = Some(jws);
        self.state.lease_id = Some(grant.authorization.lease_id.clone());
        self.current = Some(grant.authorization.clone());
    }

    fn verify(
        &self,
        authorization: &str,
        license: &str,
        nonce: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<Grant, ClientError> {
        let expect = Expectation {
            device_uuid: &self.config.device.uuid,
            nonce,
            now,
        };
        let (authorization, license) =
            chain::verify_authorization(authorization, license, &self.config.vendor_keys, expect)
                .map_err(|e| match e {
                ChainError::Expired(expires_at) => ClientError::Expired { expires_at },
                e => ClientError::Chain(e),
            })?;
        if authorization.product != self.config.product {
            return Err(ClientError::WrongProduct {
                expected: self.config.product.clone(),
                found: authorization.product,
            });
        }
        if let Some((setting, configured, found)) = other_settings(&self.config, &authorization) {
            return Err(ClientError::OtherSettings {
                setting,
                configured: configured.to_string(),
                found: found.to_string(),
            });
        }
        Ok(Grant {
            authorization,
            license,
        })
    }

    /// The device clock read as the appliance's (plus the offset measured at the last
    /// authorization or renewal).
    fn now(&self) -> OffsetDateTime {
        self.config.clock.now() + time::Duration::seconds(self.state.clock_offset_s)
    }

    /// Verifies an authorization the appliance has just issued to this client, in answer to
    /// a request sent when the device clock read `sent`, at the appliance's time: its time of
    /// issue less `sent` is the device clock's offset, returned for the caller to keep once
    /// it takes the grant. An answer held back on its way only sets the device's time ahead
    /// (its allowance shorter). A device clock hours off still verifies what the appliance
    /// issued a moment ago.
    fn verify_fresh(
        &self,
        authorization: &str,
        license: &str,
        nonce: Option<&str>,
        sent: OffsetDateTime,
    ) -> Result<(Grant, i64), ClientError> {
        // Read before the signature is checked, only to pick the time to check it at: a
        // forged document fails below and its time is dropped with it.
        let offset = decode_authorization(authorization).map_or(self.state.clock_offset_s, |a| {
            (a.issued_at - sent).whole_seconds()
        });
        let now = sent + time::Duration::seconds(offset);
        Ok((self.verify(authorization, license, nonce, now)?, offset))
    }

    /// Writes the state; a failed write fails the call only when the state holds numbering
    /// the next reports depend on (`numbered`: a period closed, reports numbered anew, now or
    /// in an earlier call whose write failed). Else only times and the authorization changed:
    /// they stay in memory and go with the next write that succeeds, so a full or read-only
    /// disk does not stop the heartbeats that renew the authorization while the appliance is
    /// reachable.
    fn save_state_if_numbered(&mut self, numbered: bool) -> Result<(), ClientError> {
        self.numbering_unsaved |= numbered;
        match self.save_state() {
            Err(e) if self.numbering_unsaved => Err(e),
            _ => Ok(()),
        }
    }

    fn save_state(&mut self) -> Result<(), ClientError> {
        self.store.save_state(&self.state)?;
        self.persisted_newest = self.state.newest_time_seen;
        self.numbering_unsaved = false;
        Ok(())
    }

    fn post<Req: Serialize, Resp: DeserializeOwned>(
        &mut self,
        path: &str,
        body: &Req,
    ) -> Result<Resp, ClientError> {
        let body = serde_json::to_vec(body).expect("a request body always serializes");
        self.call(path, Some(body))
    }

    /// Sends one request to the first URL that answers, starting with the one that answered
    /// last. `body` makes it a JSON POST, else a GET.
    fn call<Resp: DeserializeOwned>(
        &mut self,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Resp, ClientError> {
        let count = self.config.urls.len();
        let mut attempts = Vec::new();
        for offset in 0..count {
            let index = (self.preferred_url + offset) % count;
            let url = format!("{}{path}", self.config.urls[index].trim_end_matches('/'));
            let sent = match &body {
                // A large body (a backlog) over a slow link takes longer than the timeout to
                // send: it gets a second more per KiB, the pace below which the appliance
                // itself cuts a body off (then answering 408, and smaller requests follow).
                Some(body) => self
                    .agent
                    .post(url.as_str())
                    .config()
                    .timeout_global(Some(
                        self.config.timeout + Duration::from_secs(body.len() as u64 / 1024),
                    ))
                    .build()
                    .content_type("application/json")
                    .send(&body[..]),
                None => self.agent.get(url.as_str()).call(),
            };
            let mut response = match sent {
                Ok(response) => response,
                Err(e) => {
                    attempts.push(format!("{url}: {e}"));
                    continue;
                }
            };
            let status = response.status().as_u16();
            let bytes = match response
                .body_mut()
                .with_config()
                .limit(MAX_RESPONSE_BYTES)
                .read_to_vec()
            {
                Ok(bytes) => bytes,
                Err(e) => {
                    attempts.push(format!("{url}: reading the answer: {e}"));
                    continue;
                }
            };
            self.preferred_url = index;
            return interpret(status, &bytes);
        }
        Err(ClientError::Unreachable { attempts })
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::sync::Mutex;

    use ed25519_dalek::SigningKey;
    use time::macros::datetime;

    use super::*;
    use crate::jws::Typ;
    use crate::keys::{self, generate_signing_key};
    use crate::wire::{ApplianceBinding, FORMAT_VERSION, Model};

    const T0: OffsetDateTime = datetime!(2030-06-01 12:00 UTC);
    const DEVICE: &str = "6f1c2a4e-8b9d-4c3e-a1f2-0123456789ab";
    const ITEM: &str = "LIC-0042-1";

    /// A directory under the system's temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            let dir = std::env::temp_dir().join(format!("keygate-sdk-{}", uuid::Uuid::new_v4()));
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// A device clock the test moves.
    #[derive(Clone)]
    struct TestClock(Arc<Mutex<OffsetDateTime>>);

    impl TestClock {
        fn new(now: OffsetDateTime) -> Self {
            TestClock(Arc::new(Mutex::new(now)))
        }

        fn set(&self, now: OffsetDateTime) {
            *self.0.lock().unwrap() = now;
        }

        fn clock(&self) -> Clock {
            let inner = self.0.clone();
            Clock::from_fn(move || *inner.lock().unwrap())
        }
    }

    /// A vendor, an appliance, a license and an authorization for `DEVICE`, issued at `T0`
    /// for 7 days.
    struct Chain {
        vendor: SigningKey,
        license_jws: String,
        authorization: Authorization,
        appliance: SigningKey,
    }

    impl Chain {
        fn new() -> Self {
            let vendor = generate_signing_key();
            let appliance = generate_signing_key();
            let public = appliance.verifying_key();
            let license = License {
                v: FORMAT_VERSION,
                license_id: "LIC-0042".into(),
                version: 1,
                vendor: "Acme Imaging".into(),
                organization_id: "200001".into(),
                issued_at: T0 - time::Duration::days(10),
                appliance: ApplianceBinding {
                    installation_id: keys::installation_id(&public),
                    public_key: keys::public_key_b64(&public),
                },
                items: vec![LicenseItem {
                    item_id: ITEM.into(),
                    product: "barcode-reader".into(),
                    model: Model::PerUsage,
                    quota: 1000,
                    starts_at: T0 - time::Duration::days(10),
                    expires_at: T0 + time::Duration::days(365),
                    offline_days: 7,
                    features: vec!["qr".into()],
                    counter: Some("scans".into()),
                    max_exceptions: None,
                    grace_days: None,
                    tokens_per_pass: None,
                }],
            };
            let authorization = Authorization {
                v: FORMAT_VERSION,
                lease_id: "lease-1".into(),
                installation_id: keys::installation_id(&public),
                organization_id: "200001".into(),
                handshake_code: "default".into(),
                product: "barcode-reader".into(),
                device_uuid: DEVICE.into(),
                instance: None,
                user: None,
                items: vec![GrantedItem {
                    item_id: ITEM.into(),
                    model: Model::PerUsage,
                    features: vec!["qr".into()],
                    expires_at: T0 + time::Duration::days(365),
                }],
                issued_at: T0,
                expires_at: T0 + time::Duration::days(7),
                nonce: "bm9uY2Utb2YtdGhlLWRldmljZQ".into(),
                state: AuthorizationState::Ok,
            };
            Chain {
                license_jws: jws::sign(Typ::License, &license, &vendor),
                vendor,
                authorization,
                appliance,
            }
        }

        fn authorization_jws(&self) -> String {
            jws::sign(Typ::Authorization, &self.authorization, &self.appliance)
        }
    }

    /// An appliance URL nobody listens on: connections are refused at once.
    fn dead_url() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        format!("https://127.0.0.1:{port}")
    }

    fn config(dir: &Path, chain: &Chain, clock: &TestClock) -> ClientConfig {
        let mut config = ClientConfig::new(
            [dead_url(), dead_url()],
            vec![chain.vendor.verifying_key()],
            "barcode-reader",
            DeviceInfo {
                uuid: DEVICE.into(),
                ..DeviceInfo::default()
            },
            dir,
            TlsTrust::AcceptAnyCertificate,
        );
        config.timeout = Duration::from_secs(3);
        config.clock = clock.clock();
        config
    }

    /// What `authorize` would have left on disk: the chain's authorization, seen at `T0`.
    fn store_authorization(dir: &Path, chain: &Chain) {
        edit_state(dir, |state| {
            state.authorization = Some(chain.authorization_jws());
            state.license = Some(chain.license_jws.clone());
            state.lease_id = Some(chain.authorization.lease_id.clone());
            state.newest_time_seen = Some(T0);
        });
    }

    /// Changes the state file in `dir` as a process before this one (or a person) left it.
    fn edit_state(dir: &Path, edit: impl FnOnce(&mut State)) {
        let store = Store::open(dir).unwrap();
        let (mut state, _) = store.load(DEVICE).unwrap();
        edit(&mut state);
        store.save_state(&state).unwrap();
    }

    fn authorized_client(dir: &TempDir) -> (Client, Chain, TestClock) {
        let chain = Chain::new();
        store_authorization(dir.path(), &chain);
        let clock = TestClock::new(T0 + time::Duration::minutes(1));
        let client = Client::new(config(dir.path(), &chain, &clock)).unwrap();
        (client, chain, clock)
    }

    /// A state file written before license versions were kept takes the version of the
    /// license it holds as the first seen, so an older one is refused from the start.
    #[test]
    fn a_state_file_of_an_earlier_release_takes_its_licenses_version_as_seen() {
        let dir = TempDir::new();
        let (client, chain, _) = authorized_client(&dir);
        let (license, _) =
            chain::verify_license(&chain.license_jws, [&chain.vendor.verifying_key()]).unwrap();
        assert_eq!(client.state.seen_version(&license), Some(1));
        // Another appliance's license of the same id has its own history.
        let elsewhere = License {
            appliance: ApplianceBinding {
                installation_id: "AAAA-BBBB-CCCC-DDDD".into(),
                ..license.appliance.clone()
            },
            ..license
        };
        assert_eq!(client.state.seen_version(&elsewhere), None);
    }

    fn report(seq: u64) -> UsageReport {
        UsageReport {
            seq,
            item_id: ITEM.into(),
            from: T0,
            to: T0 + time::Duration::minutes(3),
            counters: BTreeMap::from([("scans".to_string(), seq)]),
        }
    }

    // --- persistence ------------------------------------------------------------------------

    #[test]
    fn a_new_state_directory_gets_a_stream_that_is_kept_forever() {
        let dir = TempDir::new();
        let chain = Chain::new();
        let clock = TestClock::new(T0);
        let nested = dir.path().join("a/b");
        let first = Client::new(config(&nested, &chain, &clock)).unwrap();
        let status = first.status();
        assert_eq!(
            uuid::Uuid::parse_str(&status.stream)
                .unwrap()
                .get_version_num(),
            4
        );
        assert_eq!(status.next_seq, 1);
        assert_eq!(status.pending_reports, 0);
        assert!(nested.join(STATE_FILE).is_file());
        assert!(nested.join(BACKLOG_FILE).is_file());
        drop(first);

        let again = Client::new(config(&nested, &chain, &clock)).unwrap();
        assert_eq!(again.status().stream, status.stream);
    }

    #[test]
    fn state_round_trips_through_its_files() {
        let dir = TempDir::new();
        let store = Store::open(dir.path()).unwrap();
        let (mut state, mut backlog) = store.load(DEVICE).unwrap();
        state.next_seq = 43;
        state.authorization = Some("a.b.c".into());
        state.license = Some("d.e.f".into());
        state.lease_id = Some("lease-7".into());
        state.open.add(ITEM, "scans", 5, T0);
        state
            .open
            .add(ITEM, "pages", 2, T0 + time::Duration::seconds(30));
        state.newest_time_seen = Some(T0 + time::Duration::hours(1));
        state.last_contact = Some(T0);
        backlog.reports = vec![report(41), report(42)];
        store.save_backlog(&backlog).unwrap();
        store.save_state(&state).unwrap();
        drop(store);

        let store = Store::open(dir.path()).unwrap();
        let (loaded_state, loaded_backlog) = store.load(DEVICE).unwrap();
        assert_eq!(loaded_state, state);
        assert_eq!(loaded_backlog, backlog);
        // The open period starts with its first usage.
        assert_eq!(loaded_state.open.from, Some(T0));
        assert_eq!(loaded_state.open.counters[ITEM]["scans"], 5);
    }

    #[test]
    fn files_are_replaced_atomically() {
        let dir = TempDir::new();
        let path = dir.path().join("file.json");
        write_atomic(&path, b"first version, rather long").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("file.json")]);

        // A write interrupted before its rename leaves a temporary file and the old content:
        // the state loads as it was, and the next write goes through.
        let store = Store::open(dir.path()).unwrap();
        let (state, _) = store.load(DEVICE).unwrap();
        fs::write(dir.path().join("state.json.tmp"), b"{\"v\": 1, \"strea").unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        let (reloaded, _) = store.load(DEVICE).unwrap();
        assert_eq!(reloaded, state);
        store.save_state(&reloaded).unwrap();
        assert!(!dir.path().join("state.json.tmp").exists());
    }

    #[test]
    fn a_client_can_live_on_a_thread_of_its_own() {
        fn send<T: Send>() {}
        send::<Client>();
    }

    #[test]
    fn a_lost_or_unreadable_state_is_rebuilt_around_the_waiting_reports() {
        let dir = TempDir::new();
        let (state_path, backlog_path) =
            (dir.path().join(STATE_FILE), dir.path().join(BACKLOG_FILE));
        let stream = uuid::Uuid::new_v4().to_string();
        let waiting = Backlog {
            stream: stream.clone(),
            reports: vec![report(4), report(5)],
        };
        write_json(&backlog_path, &waiting).unwrap();
        fs::write(&state_path, b"{ not json").unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (state, backlog) = store.load(DEVICE).unwrap();
        assert_eq!(
            (
                state.stream.as_str(),
                state.next_seq,
                state.unconfirmed_from
            ),
            (stream.as_str(), 6, None),
            "the same stream and numbers: nothing counts twice"
        );
        assert_eq!(backlog, waiting);
        assert_eq!(state.lease_id, None, "authorizes again");
        assert_eq!(
            fs::read(dir.path().join("state.json.corrupt")).unwrap(),
            b"{ not json",
            "kept for support"
        );
        // Damaged again: the first copy stays, the second is kept beside it.
        fs::write(&state_path, b"{ torn again").unwrap();
        store.load(DEVICE).unwrap();
        assert_eq!(
            fs::read(dir.path().join("state.json.corrupt")).unwrap(),
            b"{ not json"
        );
        assert_eq!(
            fs::read(dir.path().join("state.json.corrupt.1")).unwrap(),
            b"{ torn again"
        );
        // Deleted instead: the same.
        fs::remove_file(&state_path).unwrap();
        let (state, _) = store.load(DEVICE).unwrap();
        assert_eq!(
            (state.stream.as_str(), state.next_seq),
            (stream.as_str(), 6)
        );

        // An unreadable backlog is set aside too; the state goes on.
        fs::write(&backlog_path, b"[ truncated").unwrap();
        let (again, backlog) = store.load(DEVICE).unwrap();
        assert_eq!(
            (again.stream.as_str(), again.next_seq),
            (stream.as_str(), 6)
        );
        assert!(backlog.reports.is_empty());
        assert!(dir.path().join("backlog.json.corrupt").exists());

        // JSON of another shape (another SDK version's) is no damage: refused, left alone.
        fs::write(&state_path, br#"{"v": 1, "stream": 7}"#).unwrap();
        assert!(matches!(
            store.load(DEVICE),
            Err(ClientError::StateCorrupt { path, .. }) if path == state_path
        ));
        assert_eq!(fs::read(&state_path).unwrap(), br#"{"v": 1, "stream": 7}"#);
        store.save_state(&again).unwrap();

        // A state of its own with another stream's reports: not sent under this one.
        let other = Backlog {
            stream: uuid::Uuid::new_v4().to_string(),
            reports: vec![report(1)],
        };
        write_json(&backlog_path, &other).unwrap();
        assert!(matches!(
            store.load(DEVICE),
            Err(ClientError::StateCorrupt { .. })
        ));
    }

    #[test]
    fn one_process_at_a_time_owns_a_state_directory() {
        let dir = TempDir::new();
        let chain = Chain::new();
        let clock = TestClock::new(T0);
        let first = Client::new(config(dir.path(), &chain, &clock)).unwrap();
        assert!(matches!(
            Client::new(config(dir.path(), &chain, &clock)),
            Err(ClientError::StateLocked { .. })
        ));
        // A copy of the lock's descriptor, as a child process being started anywhere in the
        // process holds until it runs its program, keeps the lock a moment after its owner
        // let go: the next owner waits for it.
        let copy = first.store._lock.try_clone().unwrap();
        drop(first);
        let starting_child = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(copy);
        });
        Client::new(config(dir.path(), &chain, &clock)).unwrap();
        starting_child.join().unwrap();
    }

    #[test]
    fn a_state_directory_belongs_to_one_device() {
        let dir = TempDir::new();
        let chain = Chain::new();
        let clock = TestClock::new(T0);
        // The UUID in another spelling is the same device.
        let mut same = config(dir.path(), &chain, &clock);
        same.device.uuid = DEVICE.to_uppercase();
        drop(Client::new(same).unwrap());
        let mut other = config(dir.path(), &chain, &clock);
        other.device.uuid = "0f1c2a4e-8b9d-4c3e-a1f2-0123456789ab".into();
        let err = Client::new(other).unwrap_err();
        assert!(
            matches!(&err, ClientError::Config(why) if why.contains(&format!("belongs to device {DEVICE}"))),
            "{err}"
        );
        Client::new(config(dir.path(), &chain, &clock)).unwrap();
    }

    #[test]
    fn a_crash_between_the_backlog_and_the_state_write_counts_the_period_once() {
        // The period (scans 5 on ITEM) was closed into report 7 and the backlog written, but
        // the state still says next_seq 7 with the period open.
        let mut state = State::new(DEVICE);
        state.next_seq = 7;
        state.open.add(ITEM, "scans", 5, T0);
        let mut backlog = Backlog {
            stream: state.stream.clone(),
            reports: vec![report(6), report(7)],
        };
        reconcile(&mut state, &mut backlog);
        assert_eq!(state.next_seq, 8);
        assert!(state.open.is_empty());

        // The normal case (state written too) is left as it is.
        let mut state = State::new(DEVICE);
        state.next_seq = 8;
        state.open.add(ITEM, "scans", 1, T0);
        let before = state.clone();
        reconcile(&mut state, &mut backlog);
        assert_eq!(state, before);
    }

    // --- periods, chunks, acknowledgements --------------------------------------------------

    /// A state file that cannot be written: its temporary file's name is taken by a
    /// directory (root ignores file modes, this stops it too).
    fn block_writes(dir: &Path, file: &str) -> PathBuf {
        let blocker = dir.join(format!("{file}.tmp"));
        fs::create_dir(&blocker).unwrap();
        blocker
    }

    /// An appliance whose packets are dropped (here a listener that never answers the TLS
    /// handshake) costs `timeout` per URL, however large the backlog waiting to be sent: the
    /// extra second per KiB is for sending a body, not for reaching the appliance.
    #[test]
    fn a_silent_appliance_costs_the_timeout_whatever_the_backlog() {
        let dir = TempDir::new();
        let (mut client, _chain, clock) = authorized_client(&dir);
        for minute in 2..200 {
            clock.set(T0 + time::Duration::minutes(minute));
            client.record(ITEM, "scans", 1).unwrap();
            assert!(client.flush().unwrap_err().is_unreachable());
        }
        assert_eq!(client.status().pending_reports, 198);
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        client.config.urls = vec![format!("https://{}", silent.local_addr().unwrap())];
        client.state.unconfirmed_from = None;
        let started = Instant::now();
        assert!(client.flush().unwrap_err().is_unreachable());
        let waited = started.elapsed();
        assert!(waited < Duration::from_secs(6), "waited {waited:?}");
    }

    /// A product restarted on a full disk with usage still open keeps running on its valid
    /// authorization: the period stays open (it is on disk as it is) and is closed once the
    /// files can be written.
    #[test]
    fn a_restart_on_a_full_disk_keeps_the_authorization_and_the_open_usage() {
        let dir = TempDir::new();
        let (mut client, chain, clock) = authorized_client(&dir);
        client.record(ITEM, "scans", 5).unwrap();
        drop(client);
        let blockers = [
            block_writes(dir.path(), STATE_FILE),
            block_writes(dir.path(), BACKLOG_FILE),
        ];
        let mut client = Client::new(config(dir.path(), &chain, &clock))
            .expect("a client, though nothing can be written");
        client.check().unwrap();
        assert_eq!(client.status().open_counters[ITEM]["scans"], 5);
        assert_eq!(client.status().pending_reports, 0);
        drop(client);
        for blocker in blockers {
            fs::remove_dir(blocker).unwrap();
        }
        let client = Client::new(config(dir.path(), &chain, &clock)).unwrap();
        assert_eq!(client.status().pending_reports, 1, "closed at this start");
        assert!(client.status().open_counters.is_empty());
    }

    /// Numbering that could not be written (the state file's write failed after a period
    /// became numbered reports) fails every later flush until it is written, not only the
    /// one that numbered it: a state file left with the period still open would count it
    /// again after a restart.
    #[test]
    fn numbering_not_written_fails_each_flush_until_it_is() {
        let dir = TempDir::new();
        let (mut client, _chain, _clock) = authorized_client(&dir);
        client.record(ITEM, "scans", 5).unwrap();
        let blocker = block_writes(dir.path(), STATE_FILE);
        assert!(matches!(client.flush(), Err(ClientError::StateIo { .. })));
        assert_eq!(
            client.status().pending_reports,
            1,
            "numbered in the backlog"
        );
        assert!(matches!(client.flush(), Err(ClientError::StateIo { .. })));
        fs::remove_dir(&blocker).unwrap();
        // Written now; the appliance is not reachable in this test.
        assert!(client.flush().unwrap_err().is_unreachable());
        let state: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.path().join(STATE_FILE)).unwrap()).unwrap();
        assert_eq!(state["next_seq"], 2, "{state}");
    }

    #[test]
    fn usage_that_cannot_be_written_is_not_counted() {
        let dir = TempDir::new();
        let (mut client, _chain, _clock) = authorized_client(&dir);
        client.record(ITEM, "scans", 5).unwrap();
        let blocker = block_writes(dir.path(), STATE_FILE);
        assert!(matches!(
            client.record(ITEM, "scans", 3),
            Err(ClientError::StateIo { .. })
        ));
        fs::remove_dir(&blocker).unwrap();
        assert_eq!(client.status().open_counters[ITEM]["scans"], 5);
        client.record(ITEM, "scans", 3).unwrap();
        assert_eq!(client.status().open_counters[ITEM]["scans"], 8);

        // Closing the period fails on the backlog's write: the period stays open, unnumbered.
        let blocker = block_writes(dir.path(), BACKLOG_FILE);
        assert!(matches!(client.flush(), Err(ClientError::StateIo { .. })));
        fs::remove_dir(&blocker).unwrap();
        let status = client.status();
        assert_eq!(
            (status.next_seq, status.pending_reports),
            (1, 0),
            "{status:?}"
        );
        assert_eq!(status.open_counters[ITEM]["scans"], 8);
        // Once it can be written, the period becomes one report (the appliance is not
        // reachable in this test: the report waits in the backlog).
        assert!(client.flush().unwrap_err().is_unreachable());
        let status = client.status();
        assert_eq!((status.next_seq, status.pending_reports), (2, 1));
        assert!(status.open_counters.is_empty());
        let (state, backlog) = (
            read_or_set_aside::<State>(&dir.path().join(STATE_FILE))
                .unwrap()
                .unwrap(),
            read_or_set_aside::<Backlog>(&dir.path().join(BACKLOG_FILE))
                .unwrap()
                .unwrap(),
        );
        assert_eq!(backlog.reports[0].counters["scans"], 8);
        assert!(state.open.is_empty());
    }

    #[test]
    fn a_state_that_cannot_be_written_does_not_stop_a_valid_authorization() {
        let dir = TempDir::new();
        let (mut client, _chain, clock) = authorized_client(&dir);
        client.check().unwrap();
        let blocker = block_writes(dir.path(), STATE_FILE);
        clock.set(T0 + time::Duration::minutes(5));
        client.check().expect("the product keeps running");
        let saved = |dir: &Path| {
            read_or_set_aside::<State>(&dir.join(STATE_FILE))
                .unwrap()
                .unwrap()
                .newest_time_seen
        };
        let before = saved(dir.path());
        assert!(before < Some(T0 + time::Duration::minutes(5)));
        fs::remove_dir(&blocker).unwrap();
        // Tried again a minute later, not at every check.
        clock.set(T0 + time::Duration::seconds(330));
        client.check().unwrap();
        assert_eq!(saved(dir.path()), before);
        clock.set(T0 + time::Duration::minutes(6));
        client.check().unwrap();
        assert_eq!(
            saved(dir.path()),
            Some(T0 + time::Duration::minutes(6)),
            "written once it can be"
        );
    }

    #[test]
    fn an_empty_period_makes_no_report() {
        let mut open = OpenPeriod::default();
        let mut next_seq = 5;
        assert!(close_period(&mut open, &mut next_seq, T0).is_empty());
        assert_eq!(next_seq, 5);

        // An item whose counters map is empty does not count either.
        open.counters.insert(ITEM.into(), BTreeMap::new());
        assert!(open.is_empty());
        assert!(close_period(&mut open, &mut next_seq, T0).is_empty());
        assert_eq!(next_seq, 5);
    }

    #[test]
    fn closing_a_period_numbers_one_report_per_item() {
        let mut open = OpenPeriod::default();
        open.add("LIC-2-1", "scans", 3, T0);
        open.add(ITEM, "scans", 2, T0 + time::Duration::seconds(10));
        open.add(ITEM, "scans", 4, T0 + time::Duration::seconds(20));
        open.add(ITEM, "pages", u64::MAX, T0 + time::Duration::seconds(30));
        open.add(ITEM, "pages", 1, T0 + time::Duration::seconds(40));
        let mut next_seq = 10;
        let now = T0 + time::Duration::minutes(3);
        let reports = close_period(&mut open, &mut next_seq, now);
        assert_eq!(next_seq, 12);
        assert!(open.is_empty() && open.from.is_none());
        assert_eq!(reports.len(), 2);
        assert_eq!(
            reports[0],
            UsageReport {
                seq: 10,
                item_id: ITEM.into(),
                from: T0,
                to: now,
                counters: BTreeMap::from([
                    ("pages".to_string(), u64::MAX),
                    ("scans".to_string(), 6)
                ]),
            }
        );
        assert_eq!(reports[1].seq, 11);
        assert_eq!(reports[1].item_id, "LIC-2-1");
        assert_eq!(reports[1].counters["scans"], 3);

        // A clock set back while the period was open does not produce `to < from`.
        open.add(ITEM, "scans", 1, T0);
        let reports = close_period(&mut open, &mut next_seq, T0 - time::Duration::hours(1));
        assert_eq!((reports[0].from, reports[0].to), (T0, T0));
        assert_eq!(reports[0].seq, 12);
    }

    #[test]
    fn a_backlog_goes_out_in_chunks_and_acknowledgements_trim_it() {
        let mut backlog: Vec<UsageReport> = (1..=2500).map(report).collect();
        // What flush does against an appliance that stores everything it is sent.
        let mut sizes = Vec::new();
        while !backlog.is_empty() {
            let chunk = next_chunk(&backlog, MAX_REPORTS_PER_REQUEST);
            assert!(chunk.windows(2).all(|w| w[0].seq + 1 == w[1].seq));
            assert_eq!(chunk[0].seq, 1 + sizes.iter().sum::<usize>() as u64);
            let (len, last) = (chunk.len(), chunk[chunk.len() - 1].seq);
            sizes.push(len);
            assert_eq!(trim_acked(&mut backlog, last), len);
        }
        assert_eq!(sizes, vec![1000, 1000, 500]);

        // An empty backlog sends a heartbeat (an empty list).
        assert!(next_chunk(&[], MAX_REPORTS_PER_REQUEST).is_empty());

        // Only what the appliance acknowledged goes; an ack below the backlog drops nothing;
        // an ack above it (reports stored from an earlier copy of the state) drops everything.
        let mut backlog: Vec<UsageReport> = (5..=9).map(report).collect();
        assert_eq!(trim_acked(&mut backlog, 3), 0);
        assert_eq!(trim_acked(&mut backlog, 6), 2);
        assert_eq!(
            backlog.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![7, 8, 9]
        );
        assert_eq!(trim_acked(&mut backlog, 100), 3);
        assert!(backlog.is_empty());
    }

    /// A device reports once in each 3-minute window at its phase, however late the product
    /// calls `tick`: calls 10 s apart starting anywhere never skip a window (a schedule of
    /// "180 s after the last report" drifts by the lateness and skips some).
    #[test]
    fn reports_fall_one_in_each_window_at_the_devices_phase() {
        let (interval, phase) = (180, 100);
        assert_eq!(report_slot(99, phase, interval), -1);
        assert_eq!(report_slot(100, phase, interval), 0);
        assert_eq!(report_slot(279, phase, interval), 0);
        assert_eq!(report_slot(280, phase, interval), 1);
        for phase in [0, 1, 77, 149] {
            for start in 0..10 {
                let mut last = None;
                let mut windows = Vec::new();
                for now in (start..3_600).step_by(10) {
                    let slot = report_slot(now, phase, interval);
                    if last != Some(slot) {
                        last = Some(slot);
                        windows.push(now / 180);
                    }
                }
                // The first call reports at once; then one report in every window.
                assert!(windows.len() <= 21, "phase {phase}, start {start}");
                windows.dedup();
                assert_eq!(
                    windows,
                    (0..20).collect::<Vec<_>>(),
                    "phase {phase}, start {start}"
                );
            }
        }
        for _ in 0..100 {
            assert!((0..150).contains(&new_report_phase(Duration::from_secs(180)).unwrap()));
        }
        assert_eq!(new_report_phase(Duration::from_secs(1)).unwrap(), 0);
    }

    // --- clock ------------------------------------------------------------------------------

    /// Usage is not counted past the authorization's expiry by a clock set back after it:
    /// `record` holds the clock to the newest time seen as `check` does.
    #[test]
    fn usage_is_not_recorded_on_a_clock_set_back_past_the_expiry() {
        let dir = TempDir::new();
        let (mut client, mut chain, clock) = authorized_client(&dir);
        chain.authorization.expires_at = T0 + time::Duration::days(7);
        client
            .accept_renewal(chain.authorization_jws(), clock.clock().now())
            .unwrap()
            .unwrap();
        clock.set(T0 + time::Duration::days(7) - time::Duration::minutes(1));
        client.check().unwrap();
        client.record("LIC-0042-1", "scans", 1).unwrap();
        clock.set(T0 + time::Duration::days(8));
        assert!(matches!(
            client.record("LIC-0042-1", "scans", 1),
            Err(ClientError::Expired { .. })
        ));
        clock.set(T0 + time::Duration::days(5));
        assert!(matches!(
            client.record("LIC-0042-1", "scans", 1),
            Err(ClientError::ClockRolledBack { .. })
        ));
        assert_eq!(client.state.open.amount("LIC-0042-1", "scans"), 1);
    }

    #[test]
    fn a_clock_set_back_beyond_the_tolerance_is_detected() {
        assert!(detect_rollback(T0, None).is_ok());
        assert!(detect_rollback(T0, Some(T0)).is_ok());
        assert!(detect_rollback(T0 + time::Duration::days(3), Some(T0)).is_ok());
        assert!(detect_rollback(T0 - CLOCK_TOLERANCE, Some(T0)).is_ok());
        let local = T0 - CLOCK_TOLERANCE - time::Duration::seconds(1);
        assert!(matches!(
            detect_rollback(local, Some(T0)),
            Err(ClientError::ClockRolledBack { local: l, newest_seen }) if l == local && newest_seen == T0
        ));

        let start = Instant::now();
        let later = start + Duration::from_secs(600);
        assert_eq!(carried_forward(None, Some(later)), None);
        assert_eq!(carried_forward(Some((start, T0)), None), None);
        assert_eq!(
            carried_forward(Some((start, T0)), Some(later)),
            Some(T0 + time::Duration::minutes(10))
        );

        let mut newest = None;
        advance(&mut newest, T0);
        advance(&mut newest, T0 - time::Duration::hours(1));
        assert_eq!(newest, Some(T0));
        advance(&mut newest, T0 + time::Duration::hours(1));
        assert_eq!(newest, Some(T0 + time::Duration::hours(1)));
    }

    #[test]
    fn the_authorizations_time_of_issue_is_a_floor_for_the_clock() {
        let dir = TempDir::new();
        let chain = Chain::new();
        store_authorization(dir.path(), &chain);
        // The newest time seen removed from the state file: the signed issue time (T0) holds.
        edit_state(dir.path(), |state| state.newest_time_seen = None);
        let clock = TestClock::new(T0 - CLOCK_TOLERANCE - time::Duration::seconds(1));
        let mut client = Client::new(config(dir.path(), &chain, &clock)).unwrap();
        assert!(matches!(
            client.check(),
            Err(ClientError::ClockRolledBack { newest_seen, .. }) if newest_seen == T0
        ));
        clock.set(T0 - CLOCK_TOLERANCE);
        client.check().expect("within the tolerance");
    }

    #[test]
    fn a_clock_held_still_falls_behind_the_monotonic_clock() {
        let dir = TempDir::new();
        let chain = Chain::new();
        store_authorization(dir.path(), &chain);
        let wall = TestClock::new(T0 + time::Duration::minutes(1));
        let start = Instant::now();
        let elapsed = Arc::new(Mutex::new(Duration::ZERO));
        let (w, e) = (wall.0.clone(), elapsed.clone());
        let mut config = config(dir.path(), &chain, &wall);
        config.clock = Clock::from_fns(
            move || *w.lock().unwrap(),
            move || start + *e.lock().unwrap(),
        );
        // The process starts offline, its state having seen T0 (the authorization's issue).
        let mut client = Client::new(config).unwrap();
        client.check().unwrap();
        *elapsed.lock().unwrap() = Duration::from_secs(5 * 60);
        client.check().expect("within the tolerance");
        *elapsed.lock().unwrap() = Duration::from_secs(60 * 60);
        assert!(matches!(
            client.check(),
            Err(ClientError::ClockRolledBack { local, newest_seen })
                if local == T0 + time::Duration::minutes(1) && newest_seen == T0 + time::Duration::hours(1)
        ));
        // A clock that moves with the time that passed is fine.
        wall.set(T0 + time::Duration::hours(1));
        client.check().unwrap();
    }

    /// A device clock hours behind the appliance's (a time zone taken for UTC) runs on the
    /// appliance's time once a renewal measured the offset: not stopped as a clock set back,
    /// and its offline allowance ends when the appliance's time says, not hours later.
    #[test]
    fn a_device_clock_hours_off_runs_on_the_appliances_time() {
        let dir = TempDir::new();
        let (mut client, mut chain, clock) = authorized_client(&dir);
        let behind = time::Duration::hours(5);
        clock.set(T0 + time::Duration::minutes(3) - behind);
        assert!(matches!(
            client.check(),
            Err(ClientError::ClockRolledBack { .. })
        ));
        // A renewal issued now by the appliance (its time is T0 + 3 minutes).
        chain.authorization.issued_at = T0 + time::Duration::minutes(3);
        chain.authorization.expires_at = T0 + time::Duration::days(7);
        let sent = clock.clock().now();
        client
            .accept_renewal(chain.authorization_jws(), sent)
            .unwrap()
            .unwrap();
        client
            .check()
            .expect("the lag is the device clock's offset");
        // Offline until the appliance's time reaches the expiry.
        clock.set(T0 + time::Duration::days(7) - time::Duration::minutes(1) - behind);
        client.check().unwrap();
        clock.set(T0 + time::Duration::days(7) - behind);
        assert!(matches!(client.check(), Err(ClientError::Expired { .. })));
        // Across a restart too: the offset is kept with the state.
        drop(client);
        let mut client = Client::new(config(dir.path(), &chain, &clock)).unwrap();
        assert!(matches!(client.check(), Err(ClientError::Expired { .. })));
    }

    /// A clock offset no clock has (a damaged or edited state file) is read as none, not a
    /// panic.
    #[test]
    fn an_impossible_clock_offset_is_read_as_none() {
        let dir = TempDir::new();
        let chain = Chain::new();
        store_authorization(dir.path(), &chain);
        edit_state(dir.path(), |state| {
            state.clock_offset_s = i64::MAX;
            state.open.add(ITEM, "scans", 1, T0);
        });
        let clock = TestClock::new(T0 + time::Duration::minutes(1));
        let mut client = Client::new(config(dir.path(), &chain, &clock)).unwrap();
        client.check().unwrap();
        assert_eq!(client.status().newest_time_seen, Some(clock.clock().now()));
    }

    /// A newest time seen at the end of time (a damaged state file) is a clock set back, not a
    /// panic at every start; a fresh authorization restarts the mark from the appliance's time.
    #[test]
    fn a_newest_time_seen_at_the_end_of_time_is_refused_not_a_panic() {
        let dir = TempDir::new();
        let chain = Chain::new();
        store_authorization(dir.path(), &chain);
        let end_of_time = time::macros::datetime!(9999-12-31 23:59:59 UTC);
        edit_state(dir.path(), |state| {
            state.newest_time_seen = Some(end_of_time)
        });
        let clock = TestClock::new(T0 + time::Duration::minutes(1));
        let mut config = config(dir.path(), &chain, &clock);
        let (wall, start) = (clock.0.clone(), Instant::now());
        let ran = Arc::new(Mutex::new(Duration::ZERO));
        let elapsed = ran.clone();
        config.clock = Clock::from_fns(
            move || *wall.lock().unwrap(),
            move || start + *elapsed.lock().unwrap(),
        );
        let mut client = Client::new(config).unwrap();
        *ran.lock().unwrap() = Duration::from_secs(60);
        assert!(matches!(
            client.check(),
            Err(ClientError::ClockRolledBack { newest_seen, .. }) if newest_seen == end_of_time
        ));
    }

    /// A renewal moves the device's time forward only: a clock behind the appliance's is
    /// measured by it, an answer slow to arrive sets the time ahead by its delay, but a
    /// renewal that would set the time back (a clock set right after running behind, or a
    /// renewal replayed days later to have the offline allowance again) is not taken: the
    /// device's time, its newest time seen and its allowance stay.
    #[test]
    fn a_renewal_moves_the_devices_time_forward_only() {
        let dir = TempDir::new();
        let (mut client, mut chain, clock) = authorized_client(&dir);
        chain.authorization.expires_at = T0 + time::Duration::days(7);
        let mut renewal = |minute: i64| {
            chain.authorization.issued_at = T0 + time::Duration::minutes(minute);
            chain.authorization_jws()
        };
        // An answer that took 30 minutes: the device reads the appliance's time plus them.
        let sent = T0 + time::Duration::minutes(2);
        clock.set(sent + time::Duration::minutes(30));
        client.accept_renewal(renewal(2), sent).unwrap().unwrap();
        assert_eq!(
            client.status().newest_time_seen,
            Some(T0 + time::Duration::minutes(32))
        );
        // A device clock 5 hours behind: measured by the next renewal.
        let behind = time::Duration::hours(5);
        clock.set(T0 + time::Duration::minutes(40) - behind);
        let measured = renewal(40);
        client
            .accept_renewal(measured.clone(), clock.clock().now())
            .unwrap()
            .unwrap();
        client
            .check()
            .expect("the lag is the device clock's offset");
        // Set right: read 5 hours ahead, and a renewal does not set it back.
        clock.set(T0 + time::Duration::minutes(42));
        let newest = client
            .check()
            .map(|_| client.status().newest_time_seen)
            .unwrap();
        assert_eq!(
            client
                .accept_renewal(renewal(42), clock.clock().now())
                .unwrap(),
            None
        );
        assert_eq!(client.status().newest_time_seen, newest);
        // The renewal of minute 40 replayed six days later gives no allowance back.
        clock.set(T0 + time::Duration::days(6));
        assert_eq!(
            client
                .accept_renewal(measured, clock.clock().now())
                .unwrap(),
            None
        );
        clock.set(T0 + time::Duration::days(7) - behind);
        assert!(matches!(client.check(), Err(ClientError::Expired { .. })));
    }

    /// The clock set back a little before each restart, within the tolerance each time,
    /// cannot hold the time still: the monotonic time a process ran is written down.
    #[test]
    fn small_set_backs_between_restarts_do_not_hold_the_time_still() {
        let dir = TempDir::new();
        let chain = Chain::new();
        store_authorization(dir.path(), &chain);
        let wall = TestClock::new(T0);
        let elapsed = Arc::new(Mutex::new(Duration::ZERO));
        let process = || {
            let (w, e, start) = (wall.0.clone(), elapsed.clone(), Instant::now());
            *elapsed.lock().unwrap() = Duration::ZERO;
            let mut config = config(dir.path(), &chain, &wall);
            config.clock = Clock::from_fns(
                move || *w.lock().unwrap(),
                move || start + *e.lock().unwrap(),
            );
            Client::new(config).unwrap()
        };
        // The state has seen T0. Each run starts 4 minutes behind it and runs 4 minutes.
        let mut client = process();
        wall.set(T0 - time::Duration::minutes(4));
        client.check().expect("within the tolerance");
        *elapsed.lock().unwrap() = Duration::from_secs(4 * 60);
        wall.set(T0);
        client.check().unwrap();
        drop(client);
        let mut client = process();
        wall.set(T0 - time::Duration::minutes(4));
        assert!(matches!(
            client.check(),
            Err(ClientError::ClockRolledBack { newest_seen, .. })
                if newest_seen == T0 + time::Duration::minutes(4)
        ));
    }

    #[test]
    fn check_verifies_the_stored_chain_offline() {
        let dir = TempDir::new();
        let (mut client, chain, clock) = authorized_client(&dir);
        let grant = client.check().unwrap();
        assert_eq!(grant.authorization, chain.authorization);
        assert_eq!(grant.expires_at(), T0 + time::Duration::days(7));
        assert!(grant.has_feature("qr") && !grant.has_feature("pdf417"));
        assert_eq!(grant.license_item(ITEM).unwrap().offline_days, 7);
        assert_eq!(grant.item(ITEM).unwrap().model, Model::PerUsage);

        // Every check moves the mark forward; a clock set back beyond it is refused...
        let later = T0 + time::Duration::days(2);
        clock.set(later);
        client.check().unwrap();
        assert_eq!(client.status().newest_time_seen, Some(later));
        clock.set(later - time::Duration::minutes(4));
        client.check().expect("small corrections are tolerated");
        clock.set(T0 + time::Duration::hours(1));
        assert!(matches!(
            client.check(),
            Err(ClientError::ClockRolledBack { newest_seen, .. }) if newest_seen == later
        ));
        // ...across restarts too.
        drop(client);
        let mut client = Client::new(config(dir.path(), &chain, &clock)).unwrap();
        assert!(matches!(
            client.check(),
            Err(ClientError::ClockRolledBack { .. })
        ));

        // Past expires_at the device stops, and counts no more usage.
        clock.set(T0 + time::Duration::days(7));
        assert!(matches!(
            client.check(),
            Err(ClientError::Expired { expires_at }) if expires_at == T0 + time::Duration::days(7)
        ));
        let open = client.status().open_counters;
        assert!(matches!(
            client.record(ITEM, "scans", 1),
            Err(ClientError::Expired { .. })
        ));
        assert_eq!(client.status().open_counters, open);
    }

    #[test]
    fn check_refuses_what_it_cannot_trust() {
        let dir = TempDir::new();
        let chain = Chain::new();
        let clock = TestClock::new(T0);
        let mut client = Client::new(config(dir.path(), &chain, &clock)).unwrap();
        assert!(matches!(client.check(), Err(ClientError::NotAuthorized)));
        assert!(matches!(
            client.record(ITEM, "scans", 1),
            Err(ClientError::NotAuthorized)
        ));
        drop(client);

        // Stored for another product.
        store_authorization(dir.path(), &chain);
        let mut other = config(dir.path(), &chain, &clock);
        other.product = "label-printer".into();
        let mut client = Client::new(other).unwrap();
        assert!(matches!(
            client.check(),
            Err(ClientError::WrongProduct { found, .. }) if found == "barcode-reader"
        ));
        drop(client);

        // Stored for another user, instance, handshake code or organization (the product
        // started with other settings on this state directory): not this configuration's.
        type Change = fn(&mut ClientConfig);
        let others: [(&str, Change); 4] = [
            ("user", |c| c.device.user = Some("bob".into())),
            ("instance", |c| c.device.instance = Some("worker-2".into())),
            ("handshake code", |c| c.handshake_code = Some("LAB".into())),
            ("organization", |c| {
                c.organization_id = Some("200002".into())
            }),
        ];
        for (setting, change) in others {
            let mut other = config(dir.path(), &chain, &clock);
            change(&mut other);
            let mut client = Client::new(other).unwrap();
            assert!(
                matches!(
                    client.check(),
                    Err(ClientError::OtherSettings { setting: s, .. }) if s == setting
                ),
                "{setting}: {:?}",
                client.check()
            );
        }
        // The same settings, spelled as the appliance keeps them, are the same.
        let mut same = config(dir.path(), &chain, &clock);
        same.device.user = Some(String::new());
        same.handshake_code = Some(" default ".into());
        same.organization_id = Some("200001".into());
        Client::new(same).unwrap().check().unwrap();

        // A product that trusts another vendor.
        let mut stranger = config(dir.path(), &chain, &clock);
        stranger.vendor_keys = vec![generate_signing_key().verifying_key()];
        let mut client = Client::new(stranger).unwrap();
        assert!(matches!(
            client.check(),
            Err(ClientError::Chain(ChainError::License(_)))
        ));
    }

    #[test]
    fn a_renewal_is_taken_only_for_the_devices_own_lease() {
        let dir = TempDir::new();
        let (mut client, mut chain, _clock) = authorized_client(&dir);
        chain.authorization.issued_at = T0 + time::Duration::minutes(3);
        chain.authorization.expires_at = T0 + time::Duration::days(7);
        let own = chain.authorization_jws();
        chain.authorization.lease_id = "lease-of-another-process".into();
        let other = chain.authorization_jws();
        assert!(matches!(
            client.accept_renewal(other, T0),
            Err(ClientError::UnexpectedResponse { .. })
        ));
        assert_eq!(client.status().lease_id.as_deref(), Some("lease-1"));
        let renewed = client.accept_renewal(own, T0).unwrap().unwrap();
        assert_eq!(renewed.authorization.lease_id, "lease-1");
    }

    // --- usage offline ----------------------------------------------------------------------

    #[test]
    fn usage_recorded_offline_is_kept_until_acknowledged() {
        let dir = TempDir::new();
        let (mut client, chain, clock) = authorized_client(&dir);
        assert!(matches!(
            client.record("LIC-9999-1", "scans", 1),
            Err(ClientError::UnknownItem { item_id }) if item_id == "LIC-9999-1"
        ));
        client.record(ITEM, "scans", 2).unwrap();
        client.record(ITEM, "scans", 0).unwrap();
        client.record(ITEM, "scans", 3).unwrap();
        assert_eq!(client.status().open_counters[ITEM]["scans"], 5);

        // The appliance is out of reach: every URL is tried, the period becomes report 1 and
        // stays in the backlog.
        let err = client.flush().unwrap_err();
        match &err {
            ClientError::Unreachable { attempts } => assert_eq!(attempts.len(), 2),
            other => panic!("{other:?}"),
        }
        assert!(err.is_unreachable() && err.code().is_none());
        let status = client.status();
        assert_eq!((status.pending_reports, status.next_seq), (1, 2));
        assert!(status.open_counters.is_empty());
        assert!(
            client.tick().is_none(),
            "the next attempt waits an interval"
        );
        let wait = client.next_tick_in();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(180));
        // On the device's clock: the next window's moment, not 180 s after this attempt.
        let now = client.config().clock.now();
        clock.set(now + wait - Duration::from_secs(1));
        assert!(client.tick().is_none());
        clock.set(now + wait);
        assert!(client.tick().unwrap().unwrap_err().is_unreachable());
        assert!(client.tick().is_none());
        assert_eq!(client.next_tick_in(), Duration::from_secs(180));
        clock.set(now);

        // A restart keeps the backlog and closes the period the last process left open
        // (report 2); a flush without new usage makes no new report.
        client.record(ITEM, "scans", 1).unwrap();
        drop(client);
        let mut client = Client::new(config(dir.path(), &chain, &clock)).unwrap();
        let status = client.status();
        assert!(status.open_counters.is_empty());
        assert_eq!((status.pending_reports, status.next_seq), (2, 3));
        assert!(
            client.tick().is_some(),
            "a new process flushes at its first tick"
        );
        assert!(client.flush().unwrap_err().is_unreachable());
        let status = client.status();
        assert_eq!((status.pending_reports, status.next_seq), (2, 3));
        let backlog: Backlog = read_or_set_aside(&dir.path().join(BACKLOG_FILE))
            .unwrap()
            .unwrap();
        assert_eq!(
            backlog
                .reports
                .iter()
                .map(|r| (r.seq, r.counters["scans"]))
                .collect::<Vec<_>>(),
            vec![(1, 5), (2, 1)]
        );

        // Releasing needs the appliance: the authorization stays when it cannot be reached,
        // in the state directory too (it leaves it while the release is sent).
        assert!(client.release().unwrap_err().is_unreachable());
        assert!(client.check().is_ok());
        drop(client);
        let mut client = Client::new(config(dir.path(), &chain, &clock)).unwrap();
        assert!(client.check().is_ok());
    }

    // --- configuration and answers ----------------------------------------------------------

    #[test]
    fn bad_configurations_are_refused_before_anything_happens() {
        let dir = TempDir::new();
        let chain = Chain::new();
        let clock = TestClock::new(T0);
        let base = || config(&dir.path().join("state"), &chain, &clock);
        let refused =
            |config: ClientConfig| matches!(Client::new(config), Err(ClientError::Config(_)));

        assert!(refused(ClientConfig {
            urls: vec![],
            ..base()
        }));
        assert!(refused(ClientConfig {
            urls: vec!["http://10.0.0.5:8443".into()],
            ..base()
        }));
        assert!(refused(ClientConfig {
            vendor_keys: vec![],
            ..base()
        }));
        assert!(refused(ClientConfig {
            product: " ".into(),
            ..base()
        }));
        assert!(refused(ClientConfig {
            device: DeviceInfo::default(),
            ..base()
        }));
        assert!(refused(ClientConfig {
            tls: TlsTrust::Pinned(b"not a certificate".to_vec()),
            ..base()
        }));
        assert!(!dir.path().join("state").exists());
    }

    #[test]
    fn the_session_password_does_not_show_in_debug_output() {
        let chain = Chain::new();
        let clock = TestClock::new(T0);
        let mut config = config(Path::new("/nonexistent"), &chain, &clock);
        config.session_password = Some("hunter2-secret".into());
        let debug = format!("{config:?}");
        assert!(!debug.contains("hunter2-secret"), "{debug}");
        assert!(debug.contains("<redacted>"));
    }

    #[test]
    fn answers_are_read_as_the_protocol_defines_them() {
        let ok: ReleaseResponse = interpret(200, br#"{"released": true}"#).unwrap();
        assert!(ok.released);

        let err = interpret::<ReleaseResponse>(
            403,
            br#"{"error": {"code": "QUOTA_EXCEEDED", "message": "all 100 seats are taken"}}"#,
        )
        .unwrap_err();
        assert!(matches!(
            &err,
            ClientError::Api { status: 403, code: ErrorCode::QuotaExceeded, message }
                if message == "all 100 seats are taken"
        ));
        assert_eq!(err.code(), Some(ErrorCode::QuotaExceeded));
        assert!(err.to_string().contains("QUOTA_EXCEEDED"));

        for (status, body) in [
            (200, &b"<html>proxy login</html>"[..]),
            (200, br#"{"released": "yes"}"#),
            (502, b"Bad Gateway"),
        ] {
            assert!(
                matches!(
                    interpret::<ReleaseResponse>(status, body),
                    Err(ClientError::UnexpectedResponse { status: s, .. }) if s == status
                ),
                "{status} {body:?}"
            );
        }
        // A code of a newer appliance is still the appliance's answer, with its message.
        let newer = br#"{"error": {"code": "SOMETHING_NEW", "message": "why"}}"#;
        assert!(matches!(
            interpret::<ReleaseResponse>(403, newer),
            Err(ClientError::Api { status: 403, code: ErrorCode::Unknown, message })
                if message == "why (code SOMETHING_NEW)"
        ));
        let known = br#"{"error": {"code": "LEASE_NOT_FOUND", "message": "why"}}"#;
        assert!(matches!(
            interpret::<ReleaseResponse>(404, known),
            Err(ClientError::Api { code: ErrorCode::LeaseNotFound, message, .. }) if message == "why"
        ));
    }

    #[test]
    fn nonces_are_fresh_base64url_within_the_protocols_bounds() {
        let a = new_nonce().unwrap();
        let b = new_nonce().unwrap();
        assert_ne!(a, b);
        assert!((16..=64).contains(&a.len()));
        assert!(
            a.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
    }
}
