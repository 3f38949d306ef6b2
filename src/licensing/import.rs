//! Importing a vendor-signed license file: verify the signature against the trusted vendor
//! keys, check the appliance binding and every item's terms, then store license, items,
//! organization and its default handshake code in one transaction.

use std::collections::HashMap;

use keygate_sdk::VerifyingKey;
use keygate_sdk::jws::{JwsError, Token, Typ};
use keygate_sdk::keys;
use keygate_sdk::wire::{FORMAT_VERSION, License, LicenseItem, Model};
use rusqlite::Connection;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::types::refused_in_text;
use super::{is_identifier, unix};
use crate::store::{self, StoreError, licenses::ItemTerms};

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("the file holds no license: expected one signed line after the '#' comment lines")]
    Empty,
    #[error(
        "the file holds more than one line besides '#' comments; a license file is one signed \
         line (if an email client wrapped it, join its lines)"
    )]
    SeveralTokens,
    #[error("the file is a key or certificate (PEM), not a license file (.lic)")]
    Pem,
    #[error("the file is not a signed license: {0}")]
    Malformed(JwsError),
    #[error("the file's document type is {0}, not a license (keygate-license)")]
    WrongType(String),
    #[error(
        "the license is signed by vendor key {0}, which this appliance does not trust \
         (add the vendor's public key with `keygate trust VENDOR.pub`)"
    )]
    UnknownVendor(String),
    #[error(
        "the license signature does not verify against vendor key {0}: the file was altered \
         or damaged"
    )]
    BadSignature(String),
    #[error(
        "license {license_id} is bound to another appliance ({found}), not to this one \
         ({ours}); ask the vendor for a license issued for this appliance's activation request"
    )]
    OtherAppliance {
        license_id: String,
        found: String,
        ours: String,
    },
    #[error("the license is invalid: {0}")]
    Invalid(String),
    #[error(
        "license {license_id} version {version} is older than the imported version {current}; \
         a renewal must carry a higher version"
    )]
    Downgrade {
        license_id: String,
        version: u32,
        current: u32,
    },
    #[error(
        "license {license_id} version {version} is already imported with different content; \
         a changed license must carry a higher version"
    )]
    Conflict { license_id: String, version: u32 },
    #[error(
        "license {license_id} on this appliance is from vendor {current:?}; a license of vendor {other:?} with the same id cannot replace it"
    )]
    OtherVendor {
        license_id: String,
        current: String,
        other: String,
    },
    #[error(
        "license {license_id} on this appliance is for organization {current}; a version for \
         organization {other} cannot replace it (the vendor issues a new license id for it)"
    )]
    OtherOrganization {
        license_id: String,
        current: String,
        other: String,
    },
    #[error("item {item_id} already belongs to license {other}")]
    ItemTaken { item_id: String, other: String },
    #[error(
        "item {item_id} cannot change its {change} in a newer version; the vendor issues a new \
         item id for it"
    )]
    ItemChanged { item_id: String, change: String },
    #[error("trusted vendor key {path} cannot be used: {reason}")]
    KeyFile {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<rusqlite::Error> for ImportError {
    fn from(e: rusqlite::Error) -> Self {
        ImportError::Store(e.into())
    }
}

/// A license whose signature, binding and terms have been checked.
#[derive(Debug, Clone)]
pub struct VerifiedLicense {
    pub license: License,
    pub jws: String,
    pub kid: String,
    pub sha256: String,
}

/// The vendor keys this appliance trusts: those added with `keygate trust` and the SPKI PEM
/// files the configuration names.
pub fn trusted_keys(
    conn: &Connection,
    config_files: &[std::path::PathBuf],
) -> Result<Vec<VerifyingKey>, ImportError> {
    let mut trusted: Vec<VerifyingKey> = store::licenses::trusted_keys(conn)?
        .iter()
        .filter_map(|k| VerifyingKey::from_bytes(&k.public_key).ok())
        .collect();
    for path in config_files {
        trusted.push(config_key(path)?);
    }
    Ok(trusted)
}

/// A vendor key file the configuration names (SPKI PEM).
pub fn config_key(path: &std::path::Path) -> Result<VerifyingKey, ImportError> {
    std::fs::read_to_string(path)
        .map_err(|e| e.to_string())
        .and_then(|pem| keys::public_key_from_pem(&pem).map_err(|e| e.to_string()))
        .map_err(|reason| ImportError::KeyFile {
            path: path.to_path_buf(),
            reason,
        })
}

/// The single signed line of a license file: `#` comment lines and blank lines are skipped.
pub fn token_line(file: &str) -> Result<&str, ImportError> {
    // A byte order mark, as Windows editors save UTF-8, is not part of the first line.
    let mut lines = file
        .trim_start_matches('\u{feff}')
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    let token = lines.next().ok_or(ImportError::Empty)?;
    if token.starts_with("-----BEGIN ") {
        return Err(ImportError::Pem);
    }
    if lines.next().is_some() {
        return Err(ImportError::SeveralTokens);
    }
    Ok(token)
}

/// Checks a license file against the trusted vendor keys and this appliance's key.
pub fn verify(
    file: &str,
    trusted: &[VerifyingKey],
    appliance: &VerifyingKey,
) -> Result<VerifiedLicense, ImportError> {
    let compact = token_line(file)?;
    let token = Token::decode(compact).map_err(ImportError::Malformed)?;
    token.expect_typ(Typ::License).map_err(|e| match e {
        JwsError::Type { found, .. } => ImportError::WrongType(keygate_sdk::jws::shown_typ(&found)),
        other => ImportError::Malformed(other),
    })?;
    let kid = token.kid().map_err(ImportError::Malformed)?.to_string();
    let vendor = trusted
        .iter()
        .find(|k| keys::kid(k) == kid)
        .ok_or_else(|| {
            ImportError::UnknownVendor(shown(&kid.chars().take(64).collect::<String>()))
        })?;
    token.verify(vendor).map_err(|e| match e {
        JwsError::BadSignature => ImportError::BadSignature(kid.clone()),
        other => ImportError::Malformed(other),
    })?;
    let license = parse_payload(&token.payload)?;
    let ours = keys::installation_id(appliance);
    if license.appliance.public_key != keys::public_key_b64(appliance)
        || license.appliance.installation_id != ours
    {
        let found = if license.appliance.installation_id == ours {
            format!("installation id {ours} with another public key")
        } else {
            shown(&license.appliance.installation_id)
        };
        return Err(ImportError::OtherAppliance {
            license_id: shown(&license.license_id),
            found,
            ours,
        });
    }
    validate(&license)?;
    Ok(VerifiedLicense {
        license,
        jws: compact.to_string(),
        kid,
        sha256: data_encoding::HEXLOWER.encode(&Sha256::digest(compact.as_bytes())),
    })
}

/// An identifier from a file not validated yet, as messages show it: quoted and escaped
/// unless it is plain printable ASCII (a control sequence must not reach a terminal).
fn shown(id: &str) -> String {
    if !id.is_empty() && id.chars().all(|c| c.is_ascii_graphic()) {
        id.to_string()
    } else {
        format!("{id:?}")
    }
}

/// Parses the payload, naming an unknown model plainly rather than through serde's message.
fn parse_payload(payload: &[u8]) -> Result<License, ImportError> {
    let value: serde_json::Value = serde_json::from_slice(payload)
        .map_err(|e| ImportError::Invalid(format!("the payload is not JSON ({e})")))?;
    if let Some(items) = value.get("items").and_then(|v| v.as_array()) {
        for item in items {
            if let Some(model) = item.get("model").and_then(|m| m.as_str())
                && Model::parse(model).is_none()
            {
                let id = shown(item.get("item_id").and_then(|v| v.as_str()).unwrap_or("?"));
                let known: Vec<&str> = Model::ALL.iter().map(|m| m.as_str()).collect();
                return Err(ImportError::Invalid(format!(
                    "item {id} has unknown model {model:?} (known: {})",
                    known.join(", ")
                )));
            }
        }
    }
    // From the bytes, not the value: a key given twice is refused (a JSON value keeps the
    // last), as devices' JSON parsing refuses it.
    serde_json::from_slice(payload).map_err(|e| ImportError::Invalid(e.to_string()))
}

/// Every rule a license's terms must meet, vendor side and appliance side alike.
pub fn validate(license: &License) -> Result<(), ImportError> {
    let invalid = |message: String| Err(ImportError::Invalid(message));
    if license.v != FORMAT_VERSION {
        return invalid(format!(
            "format version {} is not supported (this keygate reads version {FORMAT_VERSION})",
            license.v
        ));
    }
    if !is_identifier(&license.license_id) {
        return invalid(format!(
            "license_id {:?} must be 1 to 64 letters, digits, '.', '_' or '-'",
            license.license_id
        ));
    }
    if !is_identifier(&license.organization_id) {
        return invalid(format!(
            "organization_id {:?} must be 1 to 64 letters, digits, '.', '_' or '-'",
            license.organization_id
        ));
    }
    // May be empty (licenses issued so; a vendor's name cannot change between versions).
    if license.vendor.chars().count() > 128 || license.vendor.chars().any(refused_in_text) {
        return invalid(format!(
            "vendor must be at most 128 characters without control characters or bidirectional \
             marks (it is {:?})",
            license.vendor.chars().take(140).collect::<String>()
        ));
    }
    if license.version == 0 {
        return invalid("version must be 1 or higher".into());
    }
    super::signed_time("issued_at", license.issued_at).map_err(ImportError::Invalid)?;
    if license.items.is_empty() {
        return invalid("the license has no items".into());
    }
    let mut seen = std::collections::HashSet::new();
    for item in &license.items {
        if !seen.insert(item.item_id.as_str()) {
            return invalid(format!("item {} appears twice", shown(&item.item_id)));
        }
        validate_item(item)
            .map_err(|m| ImportError::Invalid(format!("item {}: {m}", shown(&item.item_id))))?;
    }
    Ok(())
}

/// The most features an item may grant (each is copied into every authorization).
const MAX_FEATURES: usize = 64;

/// A name shown to admins and matched against what devices send: 1 to `max` characters,
/// no control characters, no white space around it (a device's product is compared as sent).
fn text(field: &str, value: &str, max: usize) -> Result<(), String> {
    let count = value.chars().count();
    if count > max {
        Err(format!(
            "{field} must be at most {max} characters (it has {count})"
        ))
    } else if count == 0 || value.trim() != value {
        Err(format!(
            "{field} must not be empty nor have white space around it ({value:?})"
        ))
    } else if value.chars().any(refused_in_text) {
        Err(format!(
            "{field} {value:?} must not contain control characters or bidirectional marks"
        ))
    } else {
        Ok(())
    }
}

fn validate_item(item: &LicenseItem) -> Result<(), String> {
    if !is_identifier(&item.item_id) {
        return Err("item_id must be 1 to 64 letters, digits, '.', '_' or '-'".into());
    }
    super::signed_time("starts_at", item.starts_at)?;
    super::signed_time("expires_at", item.expires_at)?;
    text("product", &item.product, 128)?;
    if item.features.len() > MAX_FEATURES {
        return Err(format!("at most {MAX_FEATURES} features"));
    }
    for feature in &item.features {
        text("a feature", feature, 64)?;
    }
    if item.quota <= 0 {
        return Err(format!(
            "quota must be greater than 0 (it is {})",
            item.quota
        ));
    }
    if item.expires_at <= item.starts_at {
        return Err(format!(
            "expires_at ({}) must be after starts_at ({})",
            super::rfc3339(item.expires_at),
            super::rfc3339(item.starts_at)
        ));
    }
    if item.offline_days == 0 || item.offline_days > 3650 {
        return Err("offline_days must be between 1 and 3650".into());
    }
    let model = item.model;
    let only_for = |field: &str, present: bool, applies: bool, models: &str| {
        if present && !applies {
            Err(format!(
                "{field} applies only to {models} items, not {model}"
            ))
        } else {
            Ok(())
        }
    };
    only_for(
        "counter",
        item.counter.is_some(),
        model == Model::PerUsage,
        "per_usage",
    )?;
    only_for(
        "max_exceptions",
        item.max_exceptions.is_some(),
        model.is_concurrent(),
        "concurrent",
    )?;
    only_for(
        "grace_days",
        item.grace_days.is_some(),
        model == Model::Tokens,
        "tokens",
    )?;
    only_for(
        "tokens_per_pass",
        item.tokens_per_pass.is_some(),
        model == Model::Tokens,
        "tokens",
    )?;
    match model {
        Model::PerUsage if item.counter.as_deref().is_none_or(|c| !is_identifier(c)) => Err(
            "a per_usage item needs the counter it meters (\"counter\"): 1 to 64 letters, \
             digits, '.', '_' or '-'"
                .into(),
        ),
        Model::ConcurrentDevice | Model::ConcurrentInstance
            if item.max_exceptions.is_none_or(|m| m == 0) =>
        {
            Err(format!("a {model} item needs max_exceptions of 1 or more"))
        }
        Model::Tokens if item.tokens_per_pass.is_none_or(|t| t <= 0) => {
            Err("a tokens item needs tokens_per_pass of 1 or more".into())
        }
        _ => Ok(()),
    }
}

/// What an import did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportOutcome {
    /// A license new to this appliance. `default_code` is set when its organization was new
    /// and got its default handshake code.
    Imported {
        license_id: String,
        version: u32,
        items: usize,
        default_code: Option<String>,
    },
    /// A higher version replaced the current one.
    Superseded {
        license_id: String,
        from: u32,
        to: u32,
        items: usize,
    },
    /// The same file was imported before: nothing changed.
    Unchanged { license_id: String, version: u32 },
}

impl ImportOutcome {
    /// Whether the import changed anything: the same file again changes nothing, not even the
    /// audit log.
    pub fn changed(&self) -> bool {
        !matches!(self, ImportOutcome::Unchanged { .. })
    }
}

impl std::fmt::Display for ImportOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImportOutcome::Imported {
                license_id,
                version,
                items,
                default_code,
            } => {
                write!(
                    f,
                    "imported license {license_id} version {version} with {items} item(s)"
                )?;
                if let Some(code) = default_code {
                    write!(f, "; the organization's default handshake code is {code}")?;
                }
                Ok(())
            }
            ImportOutcome::Superseded {
                license_id,
                from,
                to,
                items,
            } => write!(
                f,
                "license {license_id} version {to} supersedes version {from} ({items} item(s))"
            ),
            ImportOutcome::Unchanged {
                license_id,
                version,
            } => write!(
                f,
                "license {license_id} version {version} is already imported; nothing changed"
            ),
        }
    }
}

/// What an admin should know of a license that imported: the items that serve no device
/// now, expired already (a vendor's mistake, or a file kept too long) or not started yet
/// (a start ahead of this appliance's clock: a renewal would refuse every device of a
/// renewed item until then).
pub fn serving_note(license: &License, now: OffsetDateTime) -> Option<String> {
    let ahead: Vec<&LicenseItem> = license.items.iter().filter(|i| i.starts_at > now).collect();
    let mut notes: Vec<String> = expired_note(license, now).into_iter().collect();
    if let Some(first) = ahead.iter().map(|i| i.starts_at).min() {
        notes.push(format!(
            "note: not started yet by this appliance's clock ({}), so serving no device until \
             {} or later (is the clock right?): {}",
            super::rfc3339(now),
            super::rfc3339(first),
            item_ids(&ahead)
        ));
    }
    (!notes.is_empty()).then(|| notes.join("\n"))
}

/// The license's items that have expired at `now`, told (the vendor's `issue` tells them
/// too: signed all the same, they serve no device).
pub fn expired_note(license: &License, now: OffsetDateTime) -> Option<String> {
    let expired: Vec<&LicenseItem> = license
        .items
        .iter()
        .filter(|i| i.expires_at <= now)
        .collect();
    (!expired.is_empty()).then(|| {
        format!(
            "note: expired already, so serving no device: {}",
            item_ids(&expired)
        )
    })
}

fn item_ids(items: &[&LicenseItem]) -> String {
    items
        .iter()
        .map(|i| i.item_id.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Stores a verified license. Run it inside a transaction: on error the caller rolls back and
/// the database is as it was. An organization imported for the first time gets a default
/// handshake code: `default_code` when given and free (a restore keeps the one the replaced
/// database had, which its devices were given), else a new random one.
pub fn apply(
    conn: &Connection,
    verified: &VerifiedLicense,
    now: OffsetDateTime,
    default_code: Option<&str>,
) -> Result<ImportOutcome, ImportError> {
    let license = &verified.license;
    let current = store::licenses::current_version(conn, &license.license_id)?;
    if let Some(current) = &current {
        // Two trusted vendors may number their licenses alike: one never replaces the
        // other's (a vendor that changes its signing key keeps its name).
        if current.vendor != license.vendor {
            return Err(ImportError::OtherVendor {
                license_id: license.license_id.clone(),
                current: current.vendor.clone(),
                other: license.vendor.clone(),
            });
        }
        // A license's items, seats and handshake codes belong to its organization: a
        // version for another one would leave them serving the old one.
        if current.organization_id != license.organization_id {
            return Err(ImportError::OtherOrganization {
                license_id: license.license_id.clone(),
                current: current.organization_id.clone(),
                other: license.organization_id.clone(),
            });
        }
        if current.version == license.version {
            return if current.sha256 == verified.sha256 {
                Ok(ImportOutcome::Unchanged {
                    license_id: license.license_id.clone(),
                    version: current.version,
                })
            } else {
                Err(ImportError::Conflict {
                    license_id: license.license_id.clone(),
                    version: license.version,
                })
            };
        }
        if current.version > license.version {
            return Err(ImportError::Downgrade {
                license_id: license.license_id.clone(),
                version: license.version,
                current: current.version,
            });
        }
    }
    for item in &license.items {
        let Some(held) = store::licenses::item(conn, &item.item_id)? else {
            continue;
        };
        if held.license_id != license.license_id {
            return Err(ImportError::ItemTaken {
                item_id: item.item_id.clone(),
                other: held.license_id,
            });
        }
        // Its leases and seats are for that product, and a concurrent_instance item's seats
        // are per instance where every other model's are per device.
        let (old, new) = (held.terms.model, item.model);
        let change = if held.product != item.product {
            Some(format!(
                "product ({:?} to {:?})",
                held.product, item.product
            ))
        } else if (old == Model::ConcurrentInstance) != (new == Model::ConcurrentInstance) {
            Some(format!(
                "model from {} to {} (concurrent_instance counts a device's instances, the \
                 other models the device)",
                old.as_str(),
                new.as_str()
            ))
        } else {
            None
        };
        if let Some(change) = change {
            return Err(ImportError::ItemChanged {
                item_id: item.item_id.clone(),
                change,
            });
        }
    }

    let now = unix(now);
    let org = &license.organization_id;
    store::licenses::ensure_organization(conn, org, &license.vendor, now)?;
    let (handshake, default_code) = match store::licenses::default_handshake(conn, org)? {
        Some(code) => (code.id, None),
        None => {
            let kept = match default_code {
                Some(code) if store::licenses::handshake_by_code(conn, code)?.is_none() => {
                    Some(code.to_string())
                }
                _ => None,
            };
            let code = kept.unwrap_or_else(|| new_handshake_code(org));
            let id = store::licenses::insert_handshake(conn, &code, org, "default", true, now)?;
            (id, Some(code))
        }
    };
    store::licenses::insert_license(
        conn,
        &store::licenses::NewLicense {
            license_id: &license.license_id,
            version: license.version,
            vendor: &license.vendor,
            organization_id: org,
            issued_at: unix(license.issued_at),
            kid: &verified.kid,
            jws: &verified.jws,
            sha256: &verified.sha256,
            imported_at: now,
        },
    )?;
    // The tokens this import adds to each item (a new one brings its whole quota): a top-up.
    let before: HashMap<String, i64> = store::licenses::all_items(conn)?
        .into_iter()
        .filter(|i| i.license_id == license.license_id)
        .map(|i| (i.item_id, i.terms.quota))
        .collect();
    let added: HashMap<String, i64> = license
        .items
        .iter()
        .filter(|i| i.model == Model::Tokens)
        .map(|i| {
            let had = before.get(&i.item_id).copied().unwrap_or(0);
            (i.item_id.clone(), i.quota.saturating_sub(had).max(0))
        })
        .collect();
    for item in &license.items {
        let features = serde_json::to_string(&item.features).expect("strings serialize");
        store::licenses::upsert_item(
            conn,
            &ItemTerms {
                item_id: &item.item_id,
                license_id: &license.license_id,
                license_version: license.version,
                organization_id: org,
                product: &item.product,
                model: item.model.as_str(),
                quota: item.quota,
                starts_at: unix(item.starts_at),
                expires_at: unix(item.expires_at),
                offline_days: item.offline_days,
                features_json: &features,
                counter: item.counter.as_deref(),
                max_exceptions: item.max_exceptions,
                grace_days: item.grace_days,
                tokens_per_pass: item.tokens_per_pass,
            },
            handshake,
        )?;
    }
    store::licenses::withdraw_items_not_in(conn, &license.license_id, license.version)?;
    settle_token_debts(conn, org, added, now)?;
    // A new version may have moved a kept top-up's start into the past.
    settle_started(conn, now)?;

    let items = license.items.len();
    Ok(match current {
        Some(current) => ImportOutcome::Superseded {
            license_id: license.license_id.clone(),
            from: current.version,
            to: license.version,
            items,
        },
        None => ImportOutcome::Imported {
            license_id: license.license_id.clone(),
            version: license.version,
            items,
            default_code,
        },
    })
}

/// Tokens: a top-up settles the debt first. The negative balance of an organization's
/// tokens items (withdrawn ones too: a debt is not forgotten with its item) is paid from
/// the tokens the import `added` to unexpired items of the same product, soonest expiry
/// first, as far as each item's balance goes; no other tokens move (the items already there
/// may serve other plants' codes). An item whose balance is no longer negative leaves
/// grace, and one a new version left negative (a lower quota) enters it. Tokens added to an
/// item that has not started are not spent before it starts: they are kept on it and pay
/// then ([`settle_started`]).
fn settle_token_debts(
    conn: &Connection,
    organization_id: &str,
    mut added: HashMap<String, i64>,
    now: i64,
) -> Result<(), StoreError> {
    let mut items: Vec<_> = store::licenses::all_items(conn)?
        .into_iter()
        .filter(|i| i.organization_id == organization_id && i.terms.model == Model::Tokens)
        .collect();
    items.sort_by_key(|i| (i.terms.expires_at, i.item_id.clone()));
    for debtor in 0..items.len() {
        for payer in 0..items.len() {
            let debt = items[debtor].used.tokens_used - items[debtor].terms.quota;
            let top_up = added.get(&items[payer].item_id).copied().unwrap_or(0);
            let credit = (items[payer].terms.quota - items[payer].used.tokens_used).min(top_up);
            if debt <= 0
                || credit <= 0
                || items[payer].withdrawn
                || items[payer].product != items[debtor].product
                || items[payer].terms.expires_at <= now
                || items[payer].terms.starts_at > now
            {
                continue;
            }
            let moved = debt.min(credit);
            items[debtor].used.tokens_used -= moved;
            items[payer].used.tokens_used += moved;
            added.insert(items[payer].item_id.clone(), top_up - moved);
        }
    }
    for item in &items {
        store::licenses::set_tokens_used(conn, &item.item_id, item.used.tokens_used, now)?;
        let left = added.get(&item.item_id).copied().unwrap_or(0);
        if item.terms.starts_at > now && left > 0 && !item.withdrawn {
            store::licenses::add_unsettled(conn, &item.item_id, left)?;
        }
    }
    Ok(())
}

/// Tokens an import added to items that have started since pay the debts they could not
/// pay before (as [`settle_token_debts`] would have at the import): run before a tokens
/// item sells a pass, at each import, and by the alerts job.
pub fn settle_started(conn: &Connection, now: i64) -> Result<(), StoreError> {
    let mut by_organization: HashMap<String, HashMap<String, i64>> = HashMap::new();
    for (organization, item_id, tokens) in store::licenses::take_unsettled(conn, now)? {
        by_organization
            .entry(organization)
            .or_default()
            .insert(item_id, tokens);
    }
    for (organization, added) in by_organization {
        settle_token_debts(conn, &organization, added, now)?;
    }
    Ok(())
}

/// A fresh handshake code for an organization: `<organization_id>-<8 random characters>`,
/// the organization id cut to its first 55 characters so that the code fits the 64 a
/// device may send.
pub fn new_handshake_code(organization_id: &str) -> String {
    let mut random = [0u8; 5];
    getrandom::fill(&mut random).expect("the operating system's random source is available");
    let suffix = data_encoding::BASE32_NOPAD
        .encode(&random)
        .to_ascii_lowercase();
    // Identifiers are ASCII: a byte index is a character index.
    let keep = organization_id.len().min(64 - 1 - suffix.len());
    format!("{}-{suffix}", &organization_id[..keep])
}

#[cfg(test)]
mod tests {
    use super::*;
    use keygate_sdk::jws::{Header, sign_raw};

    /// A file's key id is shown before any signature is checked: escaped and cut short.
    #[test]
    fn an_unknown_vendor_key_id_is_shown_escaped_and_short() {
        let key = keygate_sdk::SigningKey::from_bytes(&[7; 32]);
        let header = Header {
            alg: "EdDSA".into(),
            typ: Some(Typ::License.as_str().into()),
            kid: Some(format!("\u{1b}[2J{}", "k".repeat(500))),
            crit: None,
        };
        let file = sign_raw(&header, b"{}", &key);
        let e = verify(&file, &[], &key.verifying_key()).unwrap_err();
        let ImportError::UnknownVendor(shown) = &e else {
            panic!("{e}");
        };
        assert!(
            !shown.contains('\u{1b}') && shown.starts_with("\"\\u{1b}[2J"),
            "{shown}"
        );
        assert!(shown.len() < 80, "{shown}");
    }
}
