//! JWS compact serialization (RFC 7515) with `alg: EdDSA` over Ed25519 (RFC 8037).
//!
//! keygate's documents carry a protected header `{"alg":"EdDSA","typ":...,"kid":...}`; any
//! standard JOSE library verifies them. [`sign_raw`] and [`Token::verify`] work on any header so
//! the RFC's own test vectors can be checked.

use data_encoding::BASE64URL_NOPAD;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::keys;

/// The kinds of document keygate signs, as they appear in the header's `typ`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Typ {
    Activation,
    License,
    Authorization,
}

impl Typ {
    pub fn as_str(self) -> &'static str {
        match self {
            Typ::Activation => "keygate-activation",
            Typ::License => "keygate-license",
            Typ::Authorization => "keygate-authorization",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub typ: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    /// Extensions the verifier must understand (RFC 7515, 4.1.11): keygate understands none,
    /// so a header that names any is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crit: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwsError {
    #[error(
        "not a JWS in compact serialization (expected three base64url parts separated by dots)"
    )]
    Malformed,
    #[error("the JWS header is not valid JSON: {0}")]
    Header(String),
    #[error("the JWS algorithm is {0:?}, only EdDSA is accepted")]
    Algorithm(String),
    #[error("the document type is {}, expected {expected:?}", shown_typ(found))]
    Type {
        expected: &'static str,
        found: String,
    },
    #[error("the JWS header names critical extensions ({0}), which keygate does not support")]
    Critical(String),
    #[error("the JWS header has no key id (kid)")]
    MissingKid,
    #[error("signed by an unknown key (kid {0})")]
    UnknownKey(String),
    #[error("the signature does not verify")]
    BadSignature,
    #[error("the signed payload is not valid: {0}")]
    Payload(String),
}

/// A document type as messages show it (`found` of [`JwsError::Type`]: empty when none).
pub fn shown_typ(found: &str) -> String {
    if found.is_empty() {
        "not given (no typ)".into()
    } else {
        format!("{found:?}")
    }
}

/// Signs `payload` under `header` and returns the compact serialization.
pub fn sign_raw(header: &Header, payload: &[u8], key: &SigningKey) -> String {
    let header = serde_json::to_vec(header).expect("a header always serializes");
    let mut out = BASE64URL_NOPAD.encode(&header);
    out.push('.');
    BASE64URL_NOPAD.encode_append(payload, &mut out);
    let signature = key.sign(out.as_bytes());
    out.push('.');
    BASE64URL_NOPAD.encode_append(&signature.to_bytes(), &mut out);
    out
}

/// Signs a keygate document: header `{alg: EdDSA, typ, kid}` with the signer's `kid`.
pub fn sign<T: Serialize>(typ: Typ, payload: &T, key: &SigningKey) -> String {
    let header = Header {
        alg: "EdDSA".into(),
        typ: Some(typ.as_str().into()),
        kid: Some(keys::kid(&key.verifying_key())),
        crit: None,
    };
    let payload = serde_json::to_vec(payload).expect("a payload always serializes");
    sign_raw(&header, &payload, key)
}

/// A decoded, not yet verified, compact JWS.
#[derive(Debug, Clone)]
pub struct Token<'a> {
    pub header: Header,
    signing_input: &'a str,
    pub payload: Vec<u8>,
    signature: Signature,
}

impl<'a> Token<'a> {
    pub fn decode(compact: &'a str) -> Result<Self, JwsError> {
        let compact = compact.trim();
        let mut parts = compact.splitn(3, '.');
        let (Some(h), Some(p), Some(s)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(JwsError::Malformed);
        };
        let decode = |part: &str| {
            BASE64URL_NOPAD
                .decode(part.as_bytes())
                .map_err(|_| JwsError::Malformed)
        };
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&decode(h)?).map_err(|e| JwsError::Header(e.to_string()))?;
        // Named at all (even `null`): refused.
        if let Some(crit) = header.get("crit") {
            return Err(JwsError::Critical(crit.to_string()));
        }
        let header: Header = serde_json::from_value(serde_json::Value::Object(header))
            .map_err(|e| JwsError::Header(e.to_string()))?;
        let payload = decode(p)?;
        let signature: [u8; 64] = decode(s)?.try_into().map_err(|_| JwsError::Malformed)?;
        Ok(Token {
            header,
            signing_input: &compact[..h.len() + 1 + p.len()],
            payload,
            signature: Signature::from_bytes(&signature),
        })
    }

    /// Checks the algorithm and the signature against one key (strict verification, which
    /// refuses malleable and small-order signatures).
    pub fn verify(&self, key: &VerifyingKey) -> Result<(), JwsError> {
        if self.header.alg != "EdDSA" {
            return Err(JwsError::Algorithm(self.header.alg.clone()));
        }
        key.verify_strict(self.signing_input.as_bytes(), &self.signature)
            .map_err(|_| JwsError::BadSignature)
    }

    /// Checks that the header's `typ` is the expected one.
    pub fn expect_typ(&self, typ: Typ) -> Result<(), JwsError> {
        match self.header.typ.as_deref() {
            Some(found) if found == typ.as_str() => Ok(()),
            found => Err(JwsError::Type {
                expected: typ.as_str(),
                found: found.unwrap_or("").to_string(),
            }),
        }
    }

    pub fn kid(&self) -> Result<&str, JwsError> {
        self.header.kid.as_deref().ok_or(JwsError::MissingKid)
    }

    pub fn payload_as<T: DeserializeOwned>(&self) -> Result<T, JwsError> {
        serde_json::from_slice(&self.payload).map_err(|e| JwsError::Payload(e.to_string()))
    }
}

/// Verifies a keygate document of type `typ` against the key among `keys` that its `kid`
/// names, and parses its payload. Returns the key that signed it with the payload.
pub fn verify<'k, T: DeserializeOwned>(
    compact: &str,
    typ: Typ,
    keys: impl IntoIterator<Item = &'k VerifyingKey>,
) -> Result<(&'k VerifyingKey, T), JwsError> {
    let token = Token::decode(compact)?;
    token.expect_typ(typ)?;
    let kid = token.kid()?;
    let key = keys
        .into_iter()
        .find(|k| keys::kid(k) == kid)
        .ok_or_else(|| JwsError::UnknownKey(kid.to_string()))?;
    token.verify(key)?;
    Ok((key, token.payload_as()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::generate_signing_key;

    const RFC8037_D: &str = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A";
    const RFC8037_A4: &str = "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc.hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg";

    fn rfc8037_key() -> SigningKey {
        let d = BASE64URL_NOPAD.decode(RFC8037_D.as_bytes()).unwrap();
        SigningKey::from_bytes(&d.try_into().unwrap())
    }

    #[test]
    fn signer_reproduces_rfc8037_a4() {
        let header = Header {
            alg: "EdDSA".into(),
            typ: None,
            kid: None,
            crit: None,
        };
        let jws = sign_raw(&header, b"Example of Ed25519 signing", &rfc8037_key());
        assert_eq!(jws, RFC8037_A4);
    }

    #[test]
    fn verifier_accepts_rfc8037_a4_and_refuses_changes() {
        let key = rfc8037_key().verifying_key();
        let token = Token::decode(RFC8037_A4).unwrap();
        token.verify(&key).unwrap();
        assert_eq!(token.payload, b"Example of Ed25519 signing");

        // Payload "Example of Ed25519 signinG".
        let forged = RFC8037_A4.replace("IHNpZ25pbmc", "IHNpZ25pbkc");
        assert_eq!(
            Token::decode(&forged).unwrap().verify(&key),
            Err(JwsError::BadSignature)
        );
        let other = generate_signing_key().verifying_key();
        assert_eq!(token.verify(&other), Err(JwsError::BadSignature));
    }

    #[test]
    fn keygate_documents_carry_typ_and_kid() {
        let key = generate_signing_key();
        let jws = sign(Typ::License, &serde_json::json!({"v": 1}), &key);
        let token = Token::decode(&jws).unwrap();
        assert_eq!(token.header.typ.as_deref(), Some("keygate-license"));
        assert_eq!(token.header.kid, Some(keys::kid(&key.verifying_key())));

        let vk = key.verifying_key();
        let (signer, payload): (_, serde_json::Value) = verify(&jws, Typ::License, [&vk]).unwrap();
        assert_eq!(signer, &vk);
        assert_eq!(payload["v"], 1);

        assert!(matches!(
            verify::<serde_json::Value>(&jws, Typ::Authorization, [&vk]),
            Err(JwsError::Type { .. })
        ));
        let other = generate_signing_key().verifying_key();
        assert!(matches!(
            verify::<serde_json::Value>(&jws, Typ::License, [&other]),
            Err(JwsError::UnknownKey(_))
        ));
    }

    #[test]
    fn other_algorithms_and_garbage_are_refused() {
        let key = generate_signing_key();
        let header = Header {
            alg: "none".into(),
            typ: Some("keygate-license".into()),
            kid: Some(keys::kid(&key.verifying_key())),
            crit: None,
        };
        let jws = sign_raw(&header, b"{}", &key);
        assert_eq!(
            Token::decode(&jws).unwrap().verify(&key.verifying_key()),
            Err(JwsError::Algorithm("none".into()))
        );
        // A critical extension (here RFC 7797's unencoded payload) is not understood, so the
        // document is refused before any reading of it.
        let header = Header {
            alg: "EdDSA".into(),
            typ: Some("keygate-license".into()),
            kid: Some(keys::kid(&key.verifying_key())),
            crit: Some(serde_json::json!(["b64"])),
        };
        let jws = sign_raw(&header, b"{}", &key);
        assert!(matches!(Token::decode(&jws), Err(JwsError::Critical(_))));
        let null = format!(
            "{}.e30.{}",
            BASE64URL_NOPAD.encode(br#"{"alg":"EdDSA","crit":null}"#),
            "A".repeat(86)
        );
        assert!(matches!(Token::decode(&null), Err(JwsError::Critical(_))));
        for garbage in ["", "a.b", "a.b.c", "....", "eyJhbGciOiJFZERTQSJ9.e30.AAAA"] {
            assert!(Token::decode(garbage).is_err(), "{garbage:?}");
        }
    }
}
