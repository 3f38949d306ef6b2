//! HTTPS only: rustls (ring provider, TLS 1.2 and 1.3) with either the operator's certificate
//! or a self-signed one made with rcgen on first start and kept in the data directory.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::{CryptoProvider, ring};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;

use crate::appliance::{create_private_dir, write_secret_file};
use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the certificate file holds no certificate")]
    NoCertificate,
    #[error("the certificate and the private key do not belong together or are unusable: {0}")]
    Mismatch(String),
    #[error("cannot make the self-signed certificate: {0}")]
    Generate(String),
    #[error("{0}")]
    NotForServing(String),
    #[error("certificate {cert} with key {key}: {error}")]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        error: Box<TlsError>,
    },
}

pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";

/// Where the certificate in use comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSource {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub self_signed: bool,
}

impl CertSource {
    /// Where a replacement pair is written before it is renamed over the current one: the
    /// key first, then the certificate (see [`CertSource::finish_replacement`]).
    pub fn pending(&self) -> (PathBuf, PathBuf) {
        (
            self.cert.with_extension("pem.new"),
            self.key.with_extension("pem.new"),
        )
    }

    /// Finishes or undoes a replacement a crash interrupted, so the pair always matches: a
    /// pending certificate without a pending key means the new key is already in place (the
    /// renames come after both files are written), so the certificate follows it; anything
    /// else pending never replaced a file and is dropped.
    pub fn finish_replacement(&self) -> std::io::Result<()> {
        let (cert_new, key_new) = self.pending();
        match (cert_new.exists(), key_new.exists()) {
            (true, false) => std::fs::rename(&cert_new, &self.cert),
            (cert, key) => {
                if cert {
                    std::fs::remove_file(&cert_new)?;
                }
                if key {
                    std::fs::remove_file(&key_new)?;
                }
                Ok(())
            }
        }
    }
}

/// Where the certificate comes from: the configuration's files, or the self-signed pair in
/// the data directory (which may not exist yet).
pub fn certificate_source(config: &Config) -> CertSource {
    match (&config.tls.cert, &config.tls.key) {
        (Some(cert), Some(key)) => CertSource {
            cert: cert.clone(),
            key: key.clone(),
            self_signed: false,
        },
        _ => {
            let dir = config.data_dir.join("tls");
            CertSource {
                cert: dir.join(CERT_FILE),
                key: dir.join(KEY_FILE),
                self_signed: true,
            }
        }
    }
}

/// The certificate and key files to use: the configured ones, or the self-signed pair in
/// `<data-dir>/tls/`, created if missing.
pub fn ensure_certificate(config: &Config, now: OffsetDateTime) -> Result<CertSource, TlsError> {
    let finished = |source: CertSource| {
        source
            .finish_replacement()
            .map_err(|source_error| TlsError::Write {
                path: source.cert.clone(),
                source: source_error,
            })?;
        Ok(source)
    };
    let source = certificate_source(config);
    if !source.self_signed {
        // The operator's files: the portal never replaces them, so nothing of its is pending.
        return Ok(source);
    }
    if !source.cert.exists() {
        let dir = source
            .cert
            .parent()
            .expect("the certificate is in <data-dir>/tls");
        create_private_dir(dir).map_err(|e| TlsError::Generate(e.to_string()))?;
        let (cert_pem, key_pem) = self_signed(&host_names(&config.tls.extra_names), now)?;
        let write = |path: &Path, data: &str| {
            write_secret_file(path, data.as_bytes()).map_err(|source| TlsError::Write {
                path: path.to_path_buf(),
                source,
            })
        };
        // Key first: a crash in between leaves no certificate, so the next start makes both.
        let _ = std::fs::remove_file(&source.key);
        write(&source.key, &key_pem)?;
        write(&source.cert, &cert_pem)?;
    }
    finished(source)
}

/// The names a self-signed certificate covers: the host name, `localhost`, every address of
/// the host's interfaces, and any configured extras.
fn host_names(extra: &[String]) -> Vec<String> {
    let mut names = vec![crate::appliance::hostname(), "localhost".to_string()];
    if let Ok(interfaces) = if_addrs::get_if_addrs() {
        names.extend(interfaces.into_iter().map(|i| i.ip().to_string()));
    }
    names.extend(["127.0.0.1".to_string(), "::1".to_string()]);
    names.extend(extra.iter().cloned());
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

/// A self-signed ECDSA P-256 certificate (what every browser accepts) valid for 10 years.
pub(crate) fn self_signed(
    names: &[String],
    now: OffsetDateTime,
) -> Result<(String, String), TlsError> {
    let generate = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(generate)?;
    let mut params = rcgen::CertificateParams::new(names.to_vec()).map_err(generate)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("keygate {}", names[0]));
    // For a server (what Apple's TLS, among others, requires of a certificate it trusts).
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(3650);
    let cert = params.self_signed(&key).map_err(generate)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Parses a PEM chain and key and checks that they belong together.
pub fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Mismatch(e.to_string()))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    let key =
        PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Mismatch(e.to_string()))?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(|e| TlsError::Mismatch(e.to_string()))
}

/// What a certificate about to be served covers: the DNS names it is valid for and, when it
/// expires within [`EXPIRES_SOON_DAYS`], when.
#[derive(Debug)]
pub struct Coverage {
    pub names: Vec<String>,
    pub expires_soon: Option<OffsetDateTime>,
}

pub const EXPIRES_SOON_DAYS: i64 = 30;

/// Checks the first certificate of `key`'s chain as a TLS server's at `now`: within its
/// validity, not a certificate authority's, for server authentication if it names its
/// uses. Its issuer is not checked: devices decide whom they trust.
pub fn check_serving(key: &CertifiedKey, now: OffsetDateTime) -> Result<Coverage, TlsError> {
    let leaf = key.cert.first().ok_or(TlsError::NoCertificate)?;
    let cert = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| TlsError::NotForServing(format!("the certificate cannot be read ({e})")))?;
    let date = |t| crate::licensing::rfc3339(time_of(t));
    own_checks(&cert, now.unix_timestamp().max(0) as u64).map_err(|e| {
        TlsError::NotForServing(match e {
            webpki::Error::CertExpired { not_after, .. } => {
                format!("it expired on {}", date(not_after))
            }
            webpki::Error::CertNotValidYet { not_before, .. } => {
                format!("it is valid only from {}", date(not_before))
            }
            webpki::Error::CaUsedAsEndEntity => {
                "it is the certificate of a certificate authority, not of a server".into()
            }
            #[allow(deprecated)]
            webpki::Error::RequiredEkuNotFound | webpki::Error::RequiredEkuNotFoundContext(_) => {
                "its extended key usage does not include TLS servers (serverAuth)".into()
            }
            other => format!("{other:?}"),
        })
    })?;
    Ok(Coverage {
        names: cert.valid_dns_names().map(str::to_string).collect(),
        expires_soon: expiry_of(&cert)
            .filter(|t| *t - now < time::Duration::days(EXPIRES_SOON_DAYS)),
    })
}

/// When the certificate `key` serves expires; `None` if it cannot be read or never does.
pub fn not_after(key: &CertifiedKey) -> Option<OffsetDateTime> {
    expiry_of(&webpki::EndEntityCert::try_from(key.cert.first()?).ok()?)
}

fn expiry_of(cert: &webpki::EndEntityCert<'_>) -> Option<OffsetDateTime> {
    // Checked past the end of every date a certificate can hold, it reports its expiry.
    match own_checks(cert, 253_402_300_800) {
        Err(webpki::Error::CertExpired { not_after, .. }) => Some(time_of(not_after)),
        _ => None,
    }
}

/// webpki's checks of a certificate on its own at `at` (Unix seconds): validity, basic
/// constraints, extended key usage. Without a trust anchor it then finds no issuer: that
/// end is a pass.
fn own_checks(cert: &webpki::EndEntityCert<'_>, at: u64) -> Result<(), webpki::Error> {
    let at = rustls::pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(at));
    match cert.verify_for_usage(
        provider().signature_verification_algorithms.all,
        &[],
        &[],
        at,
        webpki::KeyUsage::server_auth(),
        None,
        None,
    ) {
        Ok(_) | Err(webpki::Error::UnknownIssuer) => Ok(()),
        Err(e) => Err(e),
    }
}

fn time_of(t: rustls::pki_types::UnixTime) -> OffsetDateTime {
    crate::licensing::from_unix(t.as_secs() as i64)
}

pub fn load(source: &CertSource) -> Result<CertifiedKey, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|e| TlsError::Read {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    };
    certified_key(&read(&source.cert)?, &read(&source.key)?).map_err(|e| TlsError::Pair {
        cert: source.cert.clone(),
        key: source.key.clone(),
        error: Box::new(e),
    })
}

fn provider() -> CryptoProvider {
    ring::default_provider()
}

/// The server's provider: TLS 1.3 without AES-256-GCM with SHA-384, which clients list
/// first: a handshake's transcript hashes and key derivations in SHA-384 cost more than in
/// SHA-256, which today's CPUs run in hardware (about a tenth of a new connection's CPU).
/// Such a client then takes its next choice, AES-128-GCM (TLS 1.3's mandatory suite); one
/// that lists ChaCha20 first (a CPU without AES instructions) keeps it.
fn server_provider() -> CryptoProvider {
    let mut provider = provider();
    provider
        .cipher_suites
        .retain(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_256_GCM_SHA384);
    provider
}

/// Serves the current certificate; an admin can swap it without a restart.
#[derive(Debug)]
pub struct CertResolver(RwLock<Arc<CertifiedKey>>);

impl CertResolver {
    pub fn new(key: CertifiedKey) -> Self {
        CertResolver(RwLock::new(Arc::new(key)))
    }

    pub fn replace(&self, key: CertifiedKey) {
        *self.0.write().expect("certificate lock") = Arc::new(key);
    }

    /// The certificate served now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.0.read().expect("certificate lock").clone()
    }

    /// Whether the certificate served now is self-signed (its issuer is its subject);
    /// `None` if it cannot be parsed.
    pub fn self_signed(&self) -> Option<bool> {
        let key = self.current();
        let cert = webpki::EndEntityCert::try_from(key.cert.first()?).ok()?;
        Some(cert.issuer() == cert.subject())
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The server's TLS configuration: TLS 1.3 and 1.2 only, HTTP/1.1.
pub fn server_config(resolver: Arc<CertResolver>) -> rustls::ServerConfig {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(server_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("the ring provider supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Devices call every 3 minutes and idle connections close after 5 s: each call is a new
    // connection. Stateless session tickets (keys in memory only, a new one every 6 hours)
    // let a device resume its last session, without the certificate's signature and without
    // memory per device on the appliance (rustls's default session cache holds 256).
    config.ticketer = rustls::crypto::ring::Ticketer::new().expect("the ring ticketer starts");
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interrupted_replacement_is_finished_or_undone() {
        let dir = tempfile::tempdir().unwrap();
        let source = CertSource {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
            self_signed: false,
        };
        let (cert_new, key_new) = source.pending();
        let write = |path: &Path, text: &str| std::fs::write(path, text).unwrap();
        let read = |path: &Path| std::fs::read_to_string(path).unwrap();
        // Crashed between the two renames: the new key is in place, its certificate follows.
        write(&source.cert, "old cert");
        write(&source.key, "new key");
        write(&cert_new, "new cert");
        source.finish_replacement().unwrap();
        assert_eq!(
            (read(&source.cert), read(&source.key)),
            ("new cert".into(), "new key".into())
        );
        assert!(!cert_new.exists());
        // Crashed before the renames: the old pair stays, the pending files go.
        write(&cert_new, "newer cert");
        write(&key_new, "newer key");
        source.finish_replacement().unwrap();
        assert_eq!(
            (read(&source.cert), read(&source.key)),
            ("new cert".into(), "new key".into())
        );
        assert!(!cert_new.exists() && !key_new.exists());
        source.finish_replacement().unwrap();
    }

    /// Files named in the configuration are the operator's: the portal never replaces them,
    /// so a `.new` pair beside them is a renewal the operator staged, not an interrupted
    /// upload, and a start leaves it alone (under systemd /etc is read-only, too).
    #[test]
    fn a_pair_staged_beside_configured_files_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) =
            self_signed(&["localhost".to_string()], OffsetDateTime::now_utc()).unwrap();
        let mut config = Config {
            data_dir: dir.path().join("data"),
            ..Config::default()
        };
        config.tls.cert = Some(dir.path().join("cert.pem"));
        config.tls.key = Some(dir.path().join("key.pem"));
        std::fs::write(dir.path().join("cert.pem"), &cert).unwrap();
        std::fs::write(dir.path().join("key.pem"), &key).unwrap();
        let source = certificate_source(&config);
        let (cert_new, key_new) = source.pending();
        std::fs::write(&cert_new, "staged cert").unwrap();
        std::fs::write(&key_new, "staged key").unwrap();
        let used = ensure_certificate(&config, OffsetDateTime::now_utc()).unwrap();
        assert_eq!(used.cert, dir.path().join("cert.pem"));
        assert!(cert_new.exists() && key_new.exists());
    }

    #[test]
    fn self_signed_certificate_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        let now = OffsetDateTime::now_utc();
        let source = ensure_certificate(&config, now).unwrap();
        assert!(source.self_signed);
        let first = std::fs::read(&source.cert).unwrap();
        load(&source).unwrap();
        ensure_certificate(&config, now).unwrap();
        assert_eq!(std::fs::read(&source.cert).unwrap(), first);
    }

    #[test]
    fn mismatched_key_is_refused() {
        let names = vec!["localhost".to_string()];
        let now = OffsetDateTime::now_utc();
        let (cert_a, _) = self_signed(&names, now).unwrap();
        let (_, key_b) = self_signed(&names, now).unwrap();
        let err = certified_key(cert_a.as_bytes(), key_b.as_bytes()).unwrap_err();
        assert!(matches!(err, TlsError::Mismatch(_)), "{err}");
        assert!(matches!(
            certified_key(b"", key_b.as_bytes()),
            Err(TlsError::NoCertificate)
        ));
    }

    #[test]
    fn a_bad_pair_on_disk_is_named_and_the_self_signed_one_is_for_servers() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        let source = ensure_certificate(&config, OffsetDateTime::now_utc()).unwrap();
        // Extended key usage: id-kp-serverAuth (1.3.6.1.5.5.7.3.1).
        let der = CertificateDer::from_pem_file(&source.cert).unwrap();
        let server_auth = [0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01];
        assert!(der.windows(server_auth.len()).any(|w| w == server_auth));

        std::fs::write(&source.cert, "-----BEGIN PRIVATE KEY-----\n").unwrap();
        let message = load(&source).unwrap_err().to_string();
        assert!(
            message.contains(&source.cert.display().to_string())
                && message.contains(&source.key.display().to_string()),
            "{message}"
        );
    }
}
