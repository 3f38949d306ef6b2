//! keygate-sdk: what a device and the keygate appliance share.
//!
//! - [`jws`]: RFC 7515 compact JWS with `alg: EdDSA` (RFC 8037), keygate's `typ` and `kid`.
//! - [`keys`]: key encodings: PEM files, base64url raw keys, `kid`, installation ids.
//! - [`wire`]: the signed payloads (activation request, license, authorization) and the
//!   client protocol's request and response bodies.
//! - [`chain`]: the offline trust-chain check a device runs on what the appliance returns.
//!
//! The appliance uses these types directly, so the two sides cannot drift apart.

pub mod chain;
#[cfg(feature = "client")]
pub mod client;
pub mod jws;
pub mod keys;
pub mod wire;

pub use ed25519_dalek::{SigningKey, VerifyingKey};
