//! The vendor's side of the trust chain: `keygate vendor keygen` and `keygate vendor issue`.

use std::path::{Path, PathBuf};

use keygate_sdk::SigningKey;
use keygate_sdk::jws::{self, Typ};
use keygate_sdk::keys;
use keygate_sdk::wire::{
    ActivationRequest, ApplianceBinding, FORMAT_VERSION, License, LicenseItem, Model,
};
use serde::Deserialize;
use time::OffsetDateTime;

use crate::licensing::{import, rfc3339};

#[derive(Debug, thiserror::Error)]
pub enum VendorError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("the activation request is not valid: {0}")]
    Request(String),
    #[error("{path} is not a valid items file: {message}")]
    Items { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// Writes `PREFIX.key` (PKCS#8 PEM, 0600) and `PREFIX.pub` (SPKI PEM). Refuses to overwrite.
pub fn keygen(prefix: &Path) -> Result<(PathBuf, PathBuf), VendorError> {
    let private = with_suffix(prefix, "key");
    let public = with_suffix(prefix, "pub");
    for path in [&private, &public] {
        if path.exists() {
            return Err(VendorError::File {
                path: path.clone(),
                message: "already exists; refusing to overwrite a key".into(),
            });
        }
    }
    let key = keys::generate_signing_key();
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |e: std::io::Error| VendorError::File {
            path,
            message: e.to_string(),
        }
    };
    // Both or neither, each whole and synced, the public half first: a private key without
    // its public half (a full disk, a power cut) would be refused by the next keygen (it
    // exists) and trusted by no appliance.
    let pem = keys::public_key_to_pem(&key.verifying_key());
    crate::appliance::write_new_file(&public, pem.as_bytes(), 0o644).map_err(io(&public))?;
    let secret = keys::signing_key_to_pem(&key);
    if let Err(e) = crate::appliance::write_secret_file(&private, secret.as_bytes()) {
        let _ = std::fs::remove_file(&public);
        return Err(io(&private)(e));
    }
    Ok((private, public))
}

fn with_suffix(prefix: &Path, suffix: &str) -> PathBuf {
    let mut name = prefix.as_os_str().to_owned();
    name.push(".");
    name.push(suffix);
    PathBuf::from(name)
}

/// The items file a vendor writes for `keygate vendor issue`. Top-level fields may instead
/// come from flags, which win.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemsFile {
    pub license_id: Option<String>,
    pub version: Option<u32>,
    pub vendor: Option<String>,
    pub organization_id: Option<String>,
    pub items: Vec<ItemSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemSpec {
    /// Default: `<license_id>-<position from 1>`.
    pub item_id: Option<String>,
    pub product: String,
    pub model: Model,
    pub quota: i64,
    /// Default: the start of the day before the issue, UTC (see `default_start`).
    pub starts_at: Option<toml::value::Datetime>,
    pub expires_at: toml::value::Datetime,
    pub offline_days: u32,
    #[serde(default)]
    pub features: Vec<String>,
    pub counter: Option<String>,
    pub max_exceptions: Option<u32>,
    pub grace_days: Option<u32>,
    pub tokens_per_pass: Option<i64>,
}

/// What `vendor issue` takes besides the key.
#[derive(Debug, Default)]
pub struct IssueOptions {
    pub license_id: Option<String>,
    pub version: Option<u32>,
    pub vendor: Option<String>,
    pub organization_id: Option<String>,
}

pub fn read_items(path: &Path) -> Result<ItemsFile, VendorError> {
    let text = std::fs::read_to_string(path).map_err(|e| VendorError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    toml::from_str(&text).map_err(|e| VendorError::Items {
        path: path.to_path_buf(),
        message: crate::config::toml_error(&text, &e),
    })
}

/// Checks an activation request: well-formed, self-signed by the key it carries, and
/// carrying the installation id that key gives.
pub fn read_activation_request(text: &str) -> Result<ActivationRequest, VendorError> {
    let bad = |m: String| VendorError::Request(m);
    let compact = import::token_line(text).map_err(|e| {
        bad(match e {
            import::ImportError::Empty => {
                "the file holds no activation request: expected one signed line after the '#' \
                 comment lines"
                    .into()
            }
            import::ImportError::SeveralTokens => {
                "the file holds more than one line besides '#' comments; an activation request \
                 is one signed line (if an email client wrapped it, join its lines)"
                    .into()
            }
            import::ImportError::Pem => {
                "the file is a key or certificate (PEM), not an activation request".into()
            }
            other => other.to_string(),
        })
    })?;
    let token = jws::Token::decode(compact).map_err(|e| bad(e.to_string()))?;
    token
        .expect_typ(Typ::Activation)
        .map_err(|e| bad(e.to_string()))?;
    let request: ActivationRequest = token.payload_as().map_err(|e| bad(e.to_string()))?;
    let key = keys::public_key_from_b64(&request.public_key).map_err(|e| bad(e.to_string()))?;
    if token.kid().map_err(|e| bad(e.to_string()))? != keys::kid(&key) {
        return Err(bad(
            "its header's key id (kid) is not the key it names".into()
        ));
    }
    token
        .verify(&key)
        .map_err(|_| bad("it is not signed by the appliance key it names".into()))?;
    if request.v != FORMAT_VERSION {
        return Err(bad(format!(
            "it is of format version {}, not {FORMAT_VERSION}",
            request.v
        )));
    }
    if keys::installation_id(&key) != request.installation_id {
        return Err(bad(
            "its installation id does not match its public key".into()
        ));
    }
    Ok(request)
}

fn to_time(dt: &toml::value::Datetime, field: &str) -> Result<OffsetDateTime, VendorError> {
    let text = dt.to_string();
    let text = if dt.time.is_some() && dt.offset.is_none() {
        format!("{text}Z")
    } else if dt.time.is_none() {
        format!("{text}T00:00:00Z")
    } else {
        text
    };
    let t = OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339)
        .map_err(|e| VendorError::Invalid(format!("{field} {dt}: {e}")))?;
    crate::licensing::in_utc(field, t).map_err(VendorError::Invalid)
}

/// Builds, checks and signs a license for the appliance that made `request`; returns the
/// license file's text (comment lines, then the signed line).
/// An item's start when the items file gives none: the start of the day before the issue
/// (UTC). An appliance's clock a few hours behind the vendor's (kept in local time, no time
/// source in an offline LAN) would otherwise refuse a renewed item's devices until it caught
/// up with the second of issue.
fn default_start(issued: OffsetDateTime) -> OffsetDateTime {
    (issued - time::Duration::days(1)).replace_time(time::Time::MIDNIGHT)
}

pub fn issue(
    key: &SigningKey,
    request: &ActivationRequest,
    items: ItemsFile,
    options: IssueOptions,
    now: OffsetDateTime,
) -> Result<Issued, VendorError> {
    let missing = |what: &str, flag: &str| {
        VendorError::Invalid(format!(
            "{what} is missing: give {flag} or set it in the items file"
        ))
    };
    let license_id = options
        .license_id
        .or(items.license_id)
        .ok_or_else(|| missing("the license id", "--license-id"))?;
    let organization_id = options
        .organization_id
        .or(items.organization_id)
        .ok_or_else(|| missing("the organization id", "--organization"))?;
    let vendor = options
        .vendor
        .or(items.vendor)
        .ok_or_else(|| missing("the vendor name", "--vendor"))?;
    let now = now.replace_nanosecond(0).expect("0 is a valid nanosecond");
    let file_version = items.version;
    let items = items
        .items
        .into_iter()
        .enumerate()
        .map(|(i, spec)| {
            Ok(LicenseItem {
                item_id: spec
                    .item_id
                    .unwrap_or_else(|| format!("{license_id}-{}", i + 1)),
                product: spec.product,
                model: spec.model,
                quota: spec.quota,
                starts_at: match &spec.starts_at {
                    Some(t) => to_time(t, "starts_at")?,
                    None => default_start(now),
                },
                expires_at: to_time(&spec.expires_at, "expires_at")?,
                offline_days: spec.offline_days,
                features: spec.features,
                counter: spec.counter,
                max_exceptions: spec.max_exceptions,
                grace_days: spec.grace_days,
                tokens_per_pass: spec.tokens_per_pass,
            })
        })
        .collect::<Result<Vec<_>, VendorError>>()?;
    let license = License {
        v: FORMAT_VERSION,
        license_id,
        version: options.version.or(file_version).unwrap_or(1),
        vendor,
        organization_id,
        issued_at: now,
        appliance: ApplianceBinding {
            installation_id: request.installation_id.clone(),
            public_key: request.public_key.clone(),
        },
        items,
    };
    import::validate(&license).map_err(|e| VendorError::Invalid(e.to_string()))?;
    let token = jws::sign(Typ::License, &license, key);
    Ok(Issued {
        text: format!("{}{token}\n", summary(&license, &request.hostname)),
        note: import::expired_note(&license, now),
    })
}

/// A license file made by [`issue`].
#[derive(Debug)]
pub struct Issued {
    pub text: String,
    /// The items that have expired already: signed all the same (a record, a test), but
    /// they serve no device.
    pub note: Option<String>,
}

/// The human-readable `#` lines at the top of a license file.
fn summary(license: &License, hostname: &str) -> String {
    // Every value goes on one comment line: control characters would end it.
    let clean = |s: &str| {
        s.chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect::<String>()
    };
    let mut out = format!(
        "# keygate license {} version {}\n# vendor: {}; organization: {}\n\
         # appliance: {} (host {})\n# issued: {}\n",
        clean(&license.license_id),
        license.version,
        clean(&license.vendor),
        clean(&license.organization_id),
        license.appliance.installation_id,
        clean(hostname),
        rfc3339(license.issued_at),
    );
    for item in &license.items {
        out.push_str(&format!(
            "# item {}: {} {} quota {}, {} to {}\n",
            clean(&item.item_id),
            clean(&item.product),
            item.model,
            item.quota,
            rfc3339(item.starts_at),
            rfc3339(item.expires_at),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An activation request is held to the specification's contract like every signed
    /// document: its header's `kid` names the key that signed it, its `v` is 1.
    #[test]
    fn an_activation_request_names_its_key_and_format() {
        let key = keys::generate_signing_key();
        let public = key.verifying_key();
        let request = |v: u32| ActivationRequest {
            v,
            installation_id: keys::installation_id(&public),
            public_key: keys::public_key_b64(&public),
            hostname: "plant-a".into(),
            created_at: time::OffsetDateTime::UNIX_EPOCH,
        };
        let signed = |kid: Option<String>, v: u32| {
            let header = jws::Header {
                alg: "EdDSA".into(),
                typ: Some(Typ::Activation.as_str().into()),
                kid,
                crit: None,
            };
            jws::sign_raw(&header, &serde_json::to_vec(&request(v)).unwrap(), &key)
        };
        let own = Some(keys::kid(&public));
        assert!(read_activation_request(&signed(own.clone(), 1)).is_ok());
        // Wrapped by an email client, or a key sent by mistake: named as a request.
        let good = signed(own.clone(), 1);
        let wrapped = format!("{}\n{}\n", &good[..60], &good[60..]);
        for (text, refusal) in [
            (wrapped.as_str(), "an activation request is one signed line"),
            (
                "-----BEGIN PUBLIC KEY-----\nAAAA\n",
                "not an activation request",
            ),
            ("# nothing\n", "holds no activation request"),
        ] {
            let refused = read_activation_request(text).unwrap_err().to_string();
            assert!(refused.contains(refusal), "{refused}");
        }
        for (kid, v, refusal) in [
            (None, 1, "no key id"),
            (Some("00".repeat(32)), 1, "not the key it names"),
            (own, 2, "format version 2"),
        ] {
            let refused = read_activation_request(&signed(kid, v))
                .unwrap_err()
                .to_string();
            assert!(refused.contains(refusal), "{refused}");
        }
    }

    /// A key pair is written whole or not at all: with room for one key file and not for
    /// the other, neither is left (a lone private key made every later keygen refuse, and
    /// nothing rebuilt its public half).
    #[cfg(target_os = "linux")]
    #[test]
    fn keygen_leaves_no_private_key_without_its_public_one() {
        use std::io::Write;
        let test = "vendor::tests::keygen_leaves_no_private_key_without_its_public_one";
        let Some(dir) = crate::store::on_a_small_disk(test, "1m") else {
            return;
        };
        // Full, then one page (what the private key takes) freed.
        let filler = dir.join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        while file.write_all(&[0; 4096]).is_ok() {}
        let size = file.metadata().unwrap().len();
        file.set_len(size - size % 4096 - 4096).unwrap();
        drop(file);

        let refused = keygen(&dir.join("vendor")).unwrap_err();
        assert!(refused.to_string().contains("vendor.key"), "{refused}");
        assert!(!dir.join("vendor.key").exists() && !dir.join("vendor.pub").exists());
        std::fs::remove_file(&filler).unwrap();
        keygen(&dir.join("vendor")).unwrap();
    }
}
