//! The offline trust chain: vendor key -> license (names the appliance key) -> authorization.
//!
//! A device that holds only the vendor's public key checks everything the appliance returns.

use ed25519_dalek::VerifyingKey;
use time::OffsetDateTime;

use crate::jws::{self, JwsError, Typ};
use crate::keys;
use crate::wire::{Authorization, License};

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("license: {0}")]
    License(JwsError),
    #[error("license {license_id} names an appliance key that does not match its installation id")]
    Binding { license_id: String },
    #[error("authorization: {0}")]
    Authorization(JwsError),
    #[error(
        "the authorization was issued by appliance {found}, the license is bound to {expected}"
    )]
    WrongAppliance { expected: String, found: String },
    #[error("the authorization grants item {0}, which its license does not contain")]
    ForeignItem(String),
    #[error("the authorization is for device {found}, not this device ({expected})")]
    WrongDevice { expected: String, found: String },
    #[error("the authorization answers another request (nonce mismatch)")]
    WrongNonce,
    #[error("the authorization expired at {0}")]
    Expired(OffsetDateTime),
}

/// Verifies a license file's JWS against the trusted vendor keys and its appliance binding.
/// Returns the license and the appliance key it names.
pub fn verify_license<'k>(
    license_jws: &str,
    vendor_keys: impl IntoIterator<Item = &'k VerifyingKey>,
) -> Result<(License, VerifyingKey), ChainError> {
    let (_, license): (_, License) =
        jws::verify(license_jws, Typ::License, vendor_keys).map_err(ChainError::License)?;
    let appliance = keys::public_key_from_b64(&license.appliance.public_key).map_err(|_| {
        ChainError::Binding {
            license_id: license.license_id.clone(),
        }
    })?;
    if keys::installation_id(&appliance) != license.appliance.installation_id {
        return Err(ChainError::Binding {
            license_id: license.license_id.clone(),
        });
    }
    Ok((license, appliance))
}

/// What a device expects of an authorization it asked for.
#[derive(Debug, Clone, Copy)]
pub struct Expectation<'a> {
    pub device_uuid: &'a str,
    /// The nonce the device sent; `None` when re-checking a stored authorization.
    pub nonce: Option<&'a str>,
    pub now: OffsetDateTime,
}

/// Verifies the whole chain: the license against the vendor keys, the authorization against
/// the appliance key the license names, and the authorization's content against `expect`.
pub fn verify_authorization<'k>(
    authorization_jws: &str,
    license_jws: &str,
    vendor_keys: impl IntoIterator<Item = &'k VerifyingKey>,
    expect: Expectation<'_>,
) -> Result<(Authorization, License), ChainError> {
    let (license, appliance) = verify_license(license_jws, vendor_keys)?;
    let (_, auth): (_, Authorization) =
        jws::verify(authorization_jws, Typ::Authorization, [&appliance])
            .map_err(ChainError::Authorization)?;
    if auth.installation_id != license.appliance.installation_id {
        return Err(ChainError::WrongAppliance {
            expected: license.appliance.installation_id.clone(),
            found: auth.installation_id,
        });
    }
    if let Some(item) = auth
        .items
        .iter()
        .find(|granted| !license.items.iter().any(|i| i.item_id == granted.item_id))
    {
        return Err(ChainError::ForeignItem(item.item_id.clone()));
    }
    if !auth.device_uuid.eq_ignore_ascii_case(expect.device_uuid) {
        return Err(ChainError::WrongDevice {
            expected: expect.device_uuid.to_string(),
            found: auth.device_uuid,
        });
    }
    if expect.nonce.is_some_and(|nonce| nonce != auth.nonce) {
        return Err(ChainError::WrongNonce);
    }
    if auth.expires_at <= expect.now {
        return Err(ChainError::Expired(auth.expires_at));
    }
    Ok((auth, license))
}
