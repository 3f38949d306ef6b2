//! The offline trust chain: vendor key -> license (names the appliance key) -> authorization.
//!
//! A device that holds only the vendor's public key checks everything the appliance returns.

use ed25519_dalek::VerifyingKey;
use time::OffsetDateTime;

use crate::jws::{self, JwsError, Typ};
use crate::keys;
use crate::wire::{Authorization, FORMAT_VERSION, License, TRIAL_DAYS};

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
    #[error("the {0} is of format version {1}; this SDK reads version {FORMAT_VERSION}")]
    Version(&'static str, u32),
    #[error("the authorization is for organization {found}, its license for {expected}")]
    WrongOrganization { expected: String, found: String },
    #[error("the authorization grants item {0}, which its license does not contain")]
    ForeignItem(String),
    #[error(
        "the authorization grants item {0} beyond its license's terms (another product or model, a feature the item lacks, before the item's start or past its expiry, or longer than its offline allowance)"
    )]
    OutsideLicense(String),
    #[error("the authorization grants no item and lasts longer than the {0}-day public trial")]
    TrialTooLong(i64),
    #[error(
        "the authorization grants no item but names a handshake code or organization: the \
         public trial is given only to a device that names neither"
    )]
    TrialWithCode,
    #[error("the authorization is for device {found}, not this device ({expected})")]
    WrongDevice { expected: String, found: String },
    #[error("the authorization answers another request (nonce mismatch)")]
    WrongNonce,
    #[error("the authorization expired at {0}")]
    Expired(OffsetDateTime),
    #[error("the authorization expires ({expires_at}) before it was issued ({issued_at})")]
    ExpiresBeforeIssued {
        issued_at: OffsetDateTime,
        expires_at: OffsetDateTime,
    },
}

/// Verifies a license file's JWS against the trusted vendor keys and its appliance binding.
/// Returns the license and the appliance key it names.
pub fn verify_license<'k>(
    license_jws: &str,
    vendor_keys: impl IntoIterator<Item = &'k VerifyingKey>,
) -> Result<(License, VerifyingKey), ChainError> {
    let (_, license): (_, License) =
        jws::verify(license_jws, Typ::License, vendor_keys).map_err(ChainError::License)?;
    if license.v != FORMAT_VERSION {
        return Err(ChainError::Version("license", license.v));
    }
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
    if auth.v != FORMAT_VERSION {
        return Err(ChainError::Version("authorization", auth.v));
    }
    // Items are granted in the name of their license's organization (the public trial's
    // authorization, granting none, names no organization).
    if !auth.items.is_empty() && auth.organization_id != license.organization_id {
        return Err(ChainError::WrongOrganization {
            expected: license.organization_id.clone(),
            found: auth.organization_id,
        });
    }
    if auth.installation_id != license.appliance.installation_id {
        return Err(ChainError::WrongAppliance {
            expected: license.appliance.installation_id.clone(),
            found: auth.installation_id,
        });
    }
    // An authorization issued after its expiry says nothing true about time, and would set
    // the device's time mark ahead of the clock.
    if auth.issued_at > auth.expires_at {
        return Err(ChainError::ExpiresBeforeIssued {
            issued_at: auth.issued_at,
            expires_at: auth.expires_at,
        });
    }
    // Each granted item is one of the license's, for this product, and the authorization
    // neither precedes nor outlives it nor lasts longer than its offline allowance: the
    // vendor's terms bound what the appliance may sign. One with no item (the public trial)
    // lasts the trial's days at most.
    for granted in &auth.items {
        let Some(item) = license.items.iter().find(|i| i.item_id == granted.item_id) else {
            return Err(ChainError::ForeignItem(granted.item_id.clone()));
        };
        let allowance = time::Duration::days(i64::from(item.offline_days));
        if item.product != auth.product
            || granted.model != item.model
            || granted.expires_at > item.expires_at
            || !granted.features.iter().all(|f| item.features.contains(f))
            || auth.issued_at < item.starts_at
            || auth.expires_at > item.expires_at
            || auth.expires_at - auth.issued_at > allowance
        {
            return Err(ChainError::OutsideLicense(granted.item_id.clone()));
        }
    }
    if auth.items.is_empty() && auth.expires_at - auth.issued_at > time::Duration::days(TRIAL_DAYS)
    {
        return Err(ChainError::TrialTooLong(TRIAL_DAYS));
    }
    // The public trial answers a device naming no code nor organization, and names neither:
    // one naming them is not the appliance's (a device configured with a code would take
    // it for a grant of any product).
    if auth.items.is_empty() && !(auth.handshake_code.is_empty() && auth.organization_id.is_empty())
    {
        return Err(ChainError::TrialWithCode);
    }
    let same_device = match (
        uuid::Uuid::parse_str(&auth.device_uuid),
        uuid::Uuid::parse_str(expect.device_uuid),
    ) {
        (Ok(found), Ok(expected)) => found == expected,
        _ => false,
    };
    if !same_device {
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

#[cfg(test)]
mod tests {
    use ed25519_dalek::SigningKey;
    use time::Duration;
    use time::macros::datetime;

    use super::*;
    use crate::keys::generate_signing_key;
    use crate::wire::{
        ApplianceBinding, AuthorizationState, FORMAT_VERSION, GrantedItem, LicenseItem, Model,
    };

    const NOW: OffsetDateTime = datetime!(2030-06-01 12:00 UTC);
    const DEVICE: &str = "6f1c2a4e-8b9d-4c3e-a1f2-0123456789ab";
    const NONCE: &str = "bm9uY2Utb2YtdGhlLWRldmljZQ";

    /// A vendor, an appliance, and a license the vendor issued for that appliance.
    struct Fixture {
        vendor: SigningKey,
        appliance: SigningKey,
        license: License,
    }

    impl Fixture {
        fn new() -> Self {
            let vendor = generate_signing_key();
            let appliance = generate_signing_key();
            let public = appliance.verifying_key();
            let license = License {
                v: FORMAT_VERSION,
                license_id: "LIC-0042".into(),
                version: 3,
                vendor: "Acme Imaging".into(),
                organization_id: "200001".into(),
                issued_at: NOW - Duration::days(30),
                appliance: ApplianceBinding {
                    installation_id: keys::installation_id(&public),
                    public_key: keys::public_key_b64(&public),
                },
                items: vec![LicenseItem {
                    item_id: "LIC-0042-1".into(),
                    product: "barcode-reader".into(),
                    model: Model::PerDevice,
                    quota: 100,
                    starts_at: NOW - Duration::days(30),
                    expires_at: NOW + Duration::days(335),
                    offline_days: 7,
                    features: vec!["qr".into(), "pdf417".into()],
                    counter: None,
                    max_exceptions: None,
                    grace_days: None,
                    tokens_per_pass: None,
                }],
            };
            Fixture {
                vendor,
                appliance,
                license,
            }
        }

        /// What the appliance would sign for `DEVICE` in answer to `NONCE`.
        fn authorization(&self) -> Authorization {
            Authorization {
                v: FORMAT_VERSION,
                lease_id: "lease-1".into(),
                installation_id: self.license.appliance.installation_id.clone(),
                organization_id: "200001".into(),
                handshake_code: "default".into(),
                product: "barcode-reader".into(),
                device_uuid: DEVICE.into(),
                instance: None,
                user: None,
                items: vec![GrantedItem {
                    item_id: "LIC-0042-1".into(),
                    model: Model::PerDevice,
                    features: vec!["qr".into()],
                    expires_at: NOW + Duration::days(335),
                }],
                issued_at: NOW - Duration::hours(1),
                expires_at: NOW + Duration::days(7) - Duration::hours(1),
                nonce: NONCE.into(),
                state: AuthorizationState::Ok,
            }
        }

        fn license_jws(&self) -> String {
            jws::sign(Typ::License, &self.license, &self.vendor)
        }

        fn authorization_jws(&self, auth: &Authorization) -> String {
            jws::sign(Typ::Authorization, auth, &self.appliance)
        }

        /// Runs the device's check of `auth` (signed by the appliance) with `expect`.
        fn check(
            &self,
            auth: &Authorization,
            expect: Expectation<'_>,
        ) -> Result<(Authorization, License), ChainError> {
            let vendor = self.vendor.verifying_key();
            verify_authorization(
                &self.authorization_jws(auth),
                &self.license_jws(),
                [&vendor],
                expect,
            )
        }
    }

    fn expect_fresh() -> Expectation<'static> {
        Expectation {
            device_uuid: DEVICE,
            nonce: Some(NONCE),
            now: NOW,
        }
    }

    #[test]
    fn a_good_chain_verifies_with_and_without_the_nonce() {
        let fx = Fixture::new();
        let auth = fx.authorization();
        let (verified, license) = fx.check(&auth, expect_fresh()).unwrap();
        assert_eq!(verified, auth);
        assert_eq!(license, fx.license);

        // A stored authorization is re-checked offline without a nonce.
        let stored = Expectation {
            nonce: None,
            ..expect_fresh()
        };
        assert_eq!(fx.check(&auth, stored).unwrap().0, auth);

        // The device UUID is compared as a UUID, whatever its spelling.
        let upper = DEVICE.to_ascii_uppercase();
        let shouting = Expectation {
            device_uuid: &upper,
            ..expect_fresh()
        };
        assert!(fx.check(&auth, shouting).is_ok());
        let simple = DEVICE.replace('-', "");
        let unhyphenated = Expectation {
            device_uuid: &simple,
            ..expect_fresh()
        };
        assert!(fx.check(&auth, unhyphenated).is_ok());

        // The license line as read from a file, with its trailing newline.
        let vendor = fx.vendor.verifying_key();
        let (license, appliance) = verify_license(&format!("{}\n", fx.license_jws()), [&vendor])
            .expect("a trailing newline is tolerated");
        assert_eq!(license, fx.license);
        assert_eq!(appliance, fx.appliance.verifying_key());
    }

    #[test]
    fn a_license_signed_by_an_unknown_vendor_is_refused() {
        let fx = Fixture::new();
        let stranger = generate_signing_key();
        let license_jws = jws::sign(Typ::License, &fx.license, &stranger);
        let vendor = fx.vendor.verifying_key();
        let err = verify_authorization(
            &fx.authorization_jws(&fx.authorization()),
            &license_jws,
            [&vendor],
            expect_fresh(),
        )
        .unwrap_err();
        assert!(
            matches!(err, ChainError::License(JwsError::UnknownKey(ref kid)) if *kid == keys::kid(&stranger.verifying_key())),
            "{err:?}"
        );
    }

    #[test]
    fn a_license_with_a_tampered_payload_is_refused() {
        let fx = Fixture::new();
        let genuine = fx.license_jws();
        let mut richer = fx.license.clone();
        richer.items[0].quota = 100_000;
        let forged_payload = jws::sign(Typ::License, &richer, &fx.vendor);
        // Genuine header and signature around another payload.
        let parts: Vec<&str> = genuine.split('.').collect();
        let payload = forged_payload.split('.').nth(1).unwrap();
        let forged = format!("{}.{}.{}", parts[0], payload, parts[2]);
        let vendor = fx.vendor.verifying_key();
        assert!(matches!(
            verify_license(&forged, [&vendor]),
            Err(ChainError::License(JwsError::BadSignature))
        ));
    }

    #[test]
    fn an_authorization_signed_by_another_key_is_refused() {
        let fx = Fixture::new();
        let auth = fx.authorization();
        let vendor = fx.vendor.verifying_key();
        // A forger without the appliance key signs with its own key...
        let forger = generate_signing_key();
        let forged = jws::sign(Typ::Authorization, &auth, &forger);
        let err = verify_authorization(&forged, &fx.license_jws(), [&vendor], expect_fresh())
            .unwrap_err();
        assert!(
            matches!(err, ChainError::Authorization(JwsError::UnknownKey(_))),
            "{err:?}"
        );
        // ...or copies the appliance's kid into its header: the signature still fails.
        let header = jws::Header {
            alg: "EdDSA".into(),
            typ: Some(Typ::Authorization.as_str().into()),
            kid: Some(keys::kid(&fx.appliance.verifying_key())),
            crit: None,
        };
        let forged = jws::sign_raw(&header, &serde_json::to_vec(&auth).unwrap(), &forger);
        let err = verify_authorization(&forged, &fx.license_jws(), [&vendor], expect_fresh())
            .unwrap_err();
        assert!(
            matches!(err, ChainError::Authorization(JwsError::BadSignature)),
            "{err:?}"
        );
        // The vendor key itself does not sign authorizations either.
        let by_vendor = jws::sign(Typ::Authorization, &auth, &fx.vendor);
        assert!(matches!(
            verify_authorization(&by_vendor, &fx.license_jws(), [&vendor], expect_fresh()),
            Err(ChainError::Authorization(_))
        ));
        // Nor does a license pass for an authorization (typ is checked).
        assert!(matches!(
            verify_authorization(
                &fx.license_jws(),
                &fx.license_jws(),
                [&vendor],
                expect_fresh()
            ),
            Err(ChainError::Authorization(JwsError::Type { .. }))
        ));
    }

    #[test]
    fn an_expired_authorization_is_refused() {
        let fx = Fixture::new();
        let mut auth = fx.authorization();
        auth.expires_at = NOW - Duration::seconds(1);
        assert!(matches!(
            fx.check(&auth, expect_fresh()),
            Err(ChainError::Expired(at)) if at == auth.expires_at
        ));
        // Expiry is exclusive: at the instant itself the authorization is over.
        auth.expires_at = NOW;
        assert!(matches!(
            fx.check(&auth, expect_fresh()),
            Err(ChainError::Expired(_))
        ));
    }

    #[test]
    fn an_authorization_issued_after_its_expiry_is_refused() {
        let fx = Fixture::new();
        let mut auth = fx.authorization();
        auth.issued_at = auth.expires_at + Duration::days(1);
        assert!(matches!(
            fx.check(&auth, expect_fresh()),
            Err(ChainError::ExpiresBeforeIssued { .. })
        ));
    }

    #[test]
    fn an_authorization_for_another_device_is_refused() {
        let fx = Fixture::new();
        let mut auth = fx.authorization();
        auth.device_uuid = "00000000-0000-4000-8000-000000000000".into();
        assert!(matches!(
            fx.check(&auth, expect_fresh()),
            Err(ChainError::WrongDevice { expected, found })
                if expected == DEVICE && found == auth.device_uuid
        ));
    }

    #[test]
    fn an_authorization_answering_another_nonce_is_refused() {
        let fx = Fixture::new();
        let mut auth = fx.authorization();
        auth.nonce = "c29tZW9uZS1lbHNlcy1ub25jZQ".into();
        assert!(matches!(
            fx.check(&auth, expect_fresh()),
            Err(ChainError::WrongNonce)
        ));
    }

    #[test]
    fn an_authorization_granting_an_item_outside_the_license_is_refused() {
        let fx = Fixture::new();
        let mut auth = fx.authorization();
        auth.items.push(GrantedItem {
            item_id: "LIC-9999-1".into(),
            model: Model::Standalone,
            features: vec![],
            expires_at: NOW + Duration::days(1),
        });
        assert!(matches!(
            fx.check(&auth, expect_fresh()),
            Err(ChainError::ForeignItem(item)) if item == "LIC-9999-1"
        ));
    }

    #[test]
    fn an_authorization_beyond_its_license_items_terms_is_refused() {
        let fx = Fixture::new();
        let item_expiry = fx.license.items[0].expires_at;
        let mut auth = fx.authorization();
        auth.issued_at = item_expiry - Duration::days(1);
        auth.expires_at = item_expiry;
        assert!(
            fx.check(&auth, expect_fresh()).is_ok(),
            "up to the item's expiry"
        );
        auth.expires_at = item_expiry + Duration::seconds(1);
        assert!(matches!(
            fx.check(&auth, expect_fresh()),
            Err(ChainError::OutsideLicense(item)) if item == "LIC-0042-1"
        ));
        let mut auth = fx.authorization();
        auth.product = "another-product".into();
        assert!(matches!(
            fx.check(&auth, expect_fresh()),
            Err(ChainError::OutsideLicense(_))
        ));
        // The item allows 7 days offline: exactly 7 days is fine, a second more is not.
        let mut auth = fx.authorization();
        auth.expires_at = auth.issued_at + Duration::days(7);
        assert!(fx.check(&auth, expect_fresh()).is_ok());
        auth.expires_at += Duration::seconds(1);
        assert!(matches!(
            fx.check(&auth, expect_fresh()),
            Err(ChainError::OutsideLicense(_))
        ));
        // A feature, model or expiry the item does not have (the appliance key alone cannot
        // unlock what the vendor did not sell).
        let mut auth = fx.authorization();
        auth.items[0].features = vec!["qr".into(), "pdf417".into()];
        assert!(
            fx.check(&auth, expect_fresh()).is_ok(),
            "the item's features"
        );
        auth.items[0].features.push("ocr".into());
        assert!(matches!(
            fx.check(&auth, expect_fresh()),
            Err(ChainError::OutsideLicense(_))
        ));
        let mut auth = fx.authorization();
        auth.items[0].model = Model::Standalone;
        assert!(matches!(
            fx.check(&auth, expect_fresh()),
            Err(ChainError::OutsideLicense(_))
        ));
        let mut auth = fx.authorization();
        auth.items[0].expires_at = item_expiry + Duration::days(1);
        assert!(matches!(
            fx.check(&auth, expect_fresh()),
            Err(ChainError::OutsideLicense(_))
        ));
        // Issued before the item starts.
        let mut auth = fx.authorization();
        auth.issued_at = fx.license.items[0].starts_at - Duration::seconds(1);
        auth.expires_at = auth.issued_at + Duration::days(1);
        assert!(matches!(
            fx.check(&auth, expect_fresh()),
            Err(ChainError::OutsideLicense(_))
        ));
    }

    #[test]
    fn an_authorization_without_items_lasts_the_trial_at_most() {
        let fx = Fixture::new();
        let mut auth = fx.authorization();
        auth.items.clear();
        auth.expires_at = auth.issued_at + Duration::days(TRIAL_DAYS);
        assert!(
            matches!(
                fx.check(&auth, expect_fresh()),
                Err(ChainError::TrialWithCode)
            ),
            "the trial names no code"
        );
        auth.handshake_code.clear();
        assert!(matches!(
            fx.check(&auth, expect_fresh()),
            Err(ChainError::TrialWithCode)
        ));
        auth.organization_id.clear();
        assert!(fx.check(&auth, expect_fresh()).is_ok(), "the public trial");
        auth.expires_at += Duration::seconds(1);
        assert!(matches!(
            fx.check(&auth, expect_fresh()),
            Err(ChainError::TrialTooLong(7))
        ));
        // The appliance key alone cannot grant a product for a century.
        auth.product = "unlicensed-product".into();
        auth.expires_at = auth.issued_at + Duration::days(36_500);
        assert!(matches!(
            fx.check(&auth, expect_fresh()),
            Err(ChainError::TrialTooLong(7))
        ));
    }

    #[test]
    fn an_authorization_claiming_another_appliance_is_refused() {
        let fx = Fixture::new();
        let mut auth = fx.authorization();
        auth.installation_id = keys::installation_id(&generate_signing_key().verifying_key());
        assert!(matches!(
            fx.check(&auth, expect_fresh()),
            Err(ChainError::WrongAppliance { expected, found })
                if expected == fx.license.appliance.installation_id && found == auth.installation_id
        ));
    }

    #[test]
    fn an_authorization_for_another_organization_or_format_is_refused() {
        let fx = Fixture::new();
        let mut auth = fx.authorization();
        auth.organization_id = "300002".into();
        assert!(matches!(
            fx.check(&auth, expect_fresh()),
            Err(ChainError::WrongOrganization { expected, found })
                if expected == "200001" && found == "300002"
        ));
        let mut auth = fx.authorization();
        auth.v = FORMAT_VERSION + 1;
        assert!(matches!(
            fx.check(&auth, expect_fresh()),
            Err(ChainError::Version("authorization", _))
        ));
        let mut fx = Fixture::new();
        fx.license.v = FORMAT_VERSION + 1;
        assert!(matches!(
            fx.check(&fx.authorization(), expect_fresh()),
            Err(ChainError::Version("license", _))
        ));
    }

    #[test]
    fn a_license_whose_installation_id_does_not_match_its_key_is_refused() {
        let mut fx = Fixture::new();
        // The vendor signed it, but the binding is inconsistent: the id names another key.
        fx.license.appliance.installation_id =
            keys::installation_id(&generate_signing_key().verifying_key());
        let err = fx.check(&fx.authorization(), expect_fresh()).unwrap_err();
        assert!(
            matches!(err, ChainError::Binding { ref license_id } if license_id == "LIC-0042"),
            "{err:?}"
        );
        // A public key that is not a valid key at all is a binding error too.
        let mut fx = Fixture::new();
        fx.license.appliance.public_key = "not-a-key".into();
        assert!(matches!(
            fx.check(&fx.authorization(), expect_fresh()),
            Err(ChainError::Binding { .. })
        ));
    }
}
