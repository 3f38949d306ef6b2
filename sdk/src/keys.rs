//! Key encodings shared by the vendor, the appliance and devices.

use data_encoding::{BASE32_NOPAD, BASE64URL_NOPAD, HEXLOWER};
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::spki::{DecodePublicKey, EncodePublicKey};
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("not an Ed25519 private key in PKCS#8 PEM form ({0})")]
    PrivatePem(String),
    #[error("not an Ed25519 public key in SPKI PEM form ({0})")]
    PublicPem(String),
    #[error("not a base64url-encoded 32-byte Ed25519 public key")]
    RawPublic,
}

/// The `kid` of a key: lowercase hex of the first 8 bytes of SHA-256 of the raw public key.
pub fn kid(key: &VerifyingKey) -> String {
    HEXLOWER.encode(&Sha256::digest(key.as_bytes())[..8])
}

/// The installation id of an appliance: base32 (RFC 4648) of the first 10 bytes of SHA-256 of
/// its raw public key, in four groups of four (`ABCD-EFGH-IJKL-MNOP`), short enough to read
/// over the phone and stable for as long as the key exists.
pub fn installation_id(key: &VerifyingKey) -> String {
    let encoded = BASE32_NOPAD.encode(&Sha256::digest(key.as_bytes())[..10]);
    let groups: Vec<&str> = (0..4).map(|i| &encoded[i * 4..i * 4 + 4]).collect();
    groups.join("-")
}

/// A raw public key as base64url without padding, the form keys take inside payloads.
pub fn public_key_b64(key: &VerifyingKey) -> String {
    BASE64URL_NOPAD.encode(key.as_bytes())
}

pub fn public_key_from_b64(text: &str) -> Result<VerifyingKey, KeyError> {
    let bytes = BASE64URL_NOPAD
        .decode(text.as_bytes())
        .map_err(|_| KeyError::RawPublic)?;
    let raw: [u8; 32] = bytes.try_into().map_err(|_| KeyError::RawPublic)?;
    VerifyingKey::from_bytes(&raw).map_err(|_| KeyError::RawPublic)
}

/// Whether `pem` holds a PEM block labelled `label`: anything else (an activation request,
/// a license file) is told as such rather than by the PEM parser's view of its first line.
fn has_block(pem: &str, label: &str) -> Result<(), String> {
    if pem.contains(&format!("-----BEGIN {label}-----")) {
        Ok(())
    } else {
        Err(format!("it has no \"-----BEGIN {label}-----\" line"))
    }
}

pub fn signing_key_from_pem(pem: &str) -> Result<SigningKey, KeyError> {
    has_block(pem, "PRIVATE KEY").map_err(KeyError::PrivatePem)?;
    SigningKey::from_pkcs8_pem(pem).map_err(|e| KeyError::PrivatePem(e.to_string()))
}

/// PKCS#8 v1 (RFC 8410: the private key alone), the form OpenSSL and Python's
/// `cryptography` read; v2, with the public key beside it, is refused by some of them.
pub fn signing_key_to_pem(key: &SigningKey) -> String {
    ed25519_dalek::pkcs8::KeypairBytes {
        secret_key: key.to_bytes(),
        public_key: None,
    }
    .to_pkcs8_pem(LineEnding::LF)
    .expect("an Ed25519 key always encodes as PKCS#8")
    .to_string()
}

pub fn public_key_from_pem(pem: &str) -> Result<VerifyingKey, KeyError> {
    has_block(pem, "PUBLIC KEY").map_err(KeyError::PublicPem)?;
    VerifyingKey::from_public_key_pem(pem).map_err(|e| KeyError::PublicPem(e.to_string()))
}

pub fn public_key_to_pem(key: &VerifyingKey) -> String {
    key.to_public_key_pem(LineEnding::LF)
        .expect("an Ed25519 key always encodes as SPKI")
}

/// A new signing key from the operating system's random source.
pub fn generate_signing_key() -> SigningKey {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).expect("the operating system's random source is available");
    SigningKey::from_bytes(&secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 8037 appendix A.1 key: its raw public key is known, so every derived form is too.
    fn rfc8037_key() -> SigningKey {
        let d = BASE64URL_NOPAD
            .decode(b"nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A")
            .unwrap();
        SigningKey::from_bytes(&d.try_into().unwrap())
    }

    #[test]
    fn public_key_matches_rfc8037() {
        let key = rfc8037_key().verifying_key();
        assert_eq!(
            public_key_b64(&key),
            "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
        );
        assert_eq!(
            public_key_from_b64("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo").unwrap(),
            key
        );
    }

    #[test]
    fn kid_and_installation_id_have_their_documented_shape() {
        let key = rfc8037_key().verifying_key();
        let kid = kid(&key);
        assert_eq!(kid.len(), 16);
        assert!(
            kid.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        let id = installation_id(&key);
        assert_eq!(id.len(), 19);
        assert_eq!(id.split('-').count(), 4);
        assert!(
            id.chars()
                .all(|c| c == '-' || c.is_ascii_uppercase() || ('2'..='7').contains(&c))
        );
        // Stable: the same key always gives the same id, another key another id.
        assert_eq!(id, installation_id(&key));
        assert_ne!(id, installation_id(&generate_signing_key().verifying_key()));
    }

    #[test]
    fn pem_round_trips() {
        let key = generate_signing_key();
        let pem = signing_key_to_pem(&key);
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert_eq!(signing_key_from_pem(&pem).unwrap(), key);
        let public = public_key_to_pem(&key.verifying_key());
        assert!(public.starts_with("-----BEGIN PUBLIC KEY-----"));
        assert_eq!(public_key_from_pem(&public).unwrap(), key.verifying_key());
    }

    #[test]
    fn bad_keys_are_refused() {
        assert!(matches!(
            public_key_from_b64("AAAA"),
            Err(KeyError::RawPublic)
        ));
        assert!(matches!(
            public_key_from_b64("!!"),
            Err(KeyError::RawPublic)
        ));
        assert!(matches!(
            signing_key_from_pem("garbage"),
            Err(KeyError::PrivatePem(_))
        ));
        let public = public_key_to_pem(&generate_signing_key().verifying_key());
        assert!(signing_key_from_pem(&public).is_err());
        // A signed document given as a key says what is missing, not what the PEM parser
        // made of its first line.
        let request = "# keygate activation request: installation X\neyJhbGciOiJFZERTQSJ9.e30.AA\n";
        let message = public_key_from_pem(request).unwrap_err().to_string();
        assert_eq!(
            message,
            "not an Ed25519 public key in SPKI PEM form (it has no \"-----BEGIN PUBLIC KEY-----\" line)"
        );
    }
}
