//! The appliance's identity: its Ed25519 key, created on first start in the data directory,
//! and the installation id derived from it.

use std::io::Write;
use std::path::{Path, PathBuf};

use keygate_sdk::jws::{self, Typ};
use keygate_sdk::keys;
use keygate_sdk::wire::{ActivationRequest, FORMAT_VERSION};
use keygate_sdk::{SigningKey, VerifyingKey};
use serde::Serialize;
use time::OffsetDateTime;

#[derive(Debug, thiserror::Error)]
pub enum ApplianceError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    // Not a `source`: the message says the cause once, then what to do about it.
    #[error("cannot read or write {path}: {error}{hint}", hint = permission_hint(error))]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "no appliance key at {path}: is this the data directory of an appliance (--data-dir, \
         or the configuration's data_dir)? `keygate serve` makes one on first start; to move \
         an appliance, put its appliance.key there"
    )]
    NoKey { path: PathBuf },
    #[error("appliance key {path} is damaged: {source}")]
    BadKey {
        path: PathBuf,
        source: keys::KeyError,
    },
}

/// The appliance key pair and what is derived from it.
pub struct Appliance {
    key: SigningKey,
    public: VerifyingKey,
    installation_id: String,
    public_b64: String,
}

impl std::fmt::Debug for Appliance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Appliance")
            .field("installation_id", &self.installation_id)
            .finish_non_exhaustive()
    }
}

pub const KEY_FILE: &str = "appliance.key";

/// Whether the file at `path` (the appliance key, the database) exists: a directory this
/// user may not look into is an error that says so, not a missing file (an admin running a
/// command as themselves on the service's data directory).
pub fn exists(path: &Path) -> Result<bool, ApplianceError> {
    path.try_exists().map_err(|error| ApplianceError::Io {
        path: path.to_path_buf(),
        error,
    })
}

/// What to do about a refused permission: run as the service's user.
fn permission_hint(e: &std::io::Error) -> &'static str {
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        " (run keygate as the service's user: `runuser -u keygate -- keygate ...`, or as root)"
    } else {
        ""
    }
}

impl Appliance {
    /// Loads the appliance key from `data_dir`, creating the directory and the key on first
    /// start. The key file is PKCS#8 PEM, mode 0600, and never leaves the data directory.
    pub fn load_or_create(data_dir: &Path) -> Result<Appliance, ApplianceError> {
        create_private_dir(data_dir)?;
        let path = data_dir.join(KEY_FILE);
        let key = match std::fs::read_to_string(&path) {
            Ok(pem) => keys::signing_key_from_pem(&pem)
                .map_err(|source| ApplianceError::BadKey { path, source })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = keys::generate_signing_key();
                write_secret_file(&path, keys::signing_key_to_pem(&key).as_bytes())
                    .map_err(|error| ApplianceError::Io { path, error })?;
                key
            }
            Err(error) => return Err(ApplianceError::Io { path, error }),
        };
        Ok(Appliance::from_key(key))
    }

    /// Loads the appliance key from `data_dir`, creating nothing: for commands that only
    /// read, or that must not give the appliance a new identity.
    pub fn load(data_dir: &Path) -> Result<Appliance, ApplianceError> {
        let path = data_dir.join(KEY_FILE);
        if !exists(&path)? {
            return Err(ApplianceError::NoKey { path });
        }
        Appliance::load_or_create(data_dir)
    }

    pub fn from_key(key: SigningKey) -> Appliance {
        let public = key.verifying_key();
        Appliance {
            installation_id: keys::installation_id(&public),
            public_b64: keys::public_key_b64(&public),
            key,
            public,
        }
    }

    pub fn installation_id(&self) -> &str {
        &self.installation_id
    }

    pub fn public_key(&self) -> &VerifyingKey {
        &self.public
    }

    /// The public key as base64url, as payloads carry it.
    pub fn public_key_b64(&self) -> &str {
        &self.public_b64
    }

    pub fn sign<T: Serialize>(&self, typ: Typ, payload: &T) -> String {
        jws::sign(typ, payload, &self.key)
    }

    /// The activation request IT carries to the vendor: self-signed by the appliance key.
    pub fn activation_request(&self, hostname: &str, now: OffsetDateTime) -> String {
        self.sign(
            Typ::Activation,
            &ActivationRequest {
                v: FORMAT_VERSION,
                installation_id: self.installation_id.clone(),
                public_key: self.public_b64.clone(),
                hostname: hostname.to_string(),
                created_at: now.replace_nanosecond(0).expect("0 is a valid nanosecond"),
            },
        )
    }

    /// The activation request as a file for the vendor: a comment line naming this
    /// installation and host, then the request, for this host.
    pub fn activation_request_file(&self, now: OffsetDateTime) -> String {
        let host = hostname();
        format!(
            "# keygate activation request: installation {} on host {host}\n{}\n",
            self.installation_id,
            self.activation_request(&host, now)
        )
    }
}

/// The host name, as best the system knows it.
pub fn hostname() -> String {
    hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Creates `dir` (and parents) readable by the owner only, if it does not exist.
pub fn create_private_dir(dir: &Path) -> Result<(), ApplianceError> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(dir)
        .map_err(|source| ApplianceError::DataDir {
            path: dir.to_path_buf(),
            source,
        })
}

/// Whether a presented secret (a token, a CSRF value) is the expected one, compared in
/// constant time so the answer's timing tells nothing about how much of it matched.
pub fn same_secret(presented: &str, expected: &str) -> bool {
    bool::from(subtle::ConstantTimeEq::ct_eq(
        presented.as_bytes(),
        expected.as_bytes(),
    ))
}

/// Creates a new, empty file readable by the owner only (0600 on Unix), refusing to take
/// an existing one.
pub fn create_secret_file(path: &Path) -> std::io::Result<std::fs::File> {
    create_new_file(path, 0o600)
}

/// Creates a new, empty file with the Unix permissions `mode`, refusing to take an existing
/// one.
fn create_new_file(path: &Path, #[allow(unused)] mode: u32) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    options.open(path)
}

/// Writes a new file readable by the owner only (0600 on Unix), durably, refusing to
/// overwrite an existing one. Whole or not at all: written and synced under a temporary
/// name first, then linked into place (a full disk or a power cut while writing left an
/// empty appliance key or certificate, which failed every later start as damaged).
pub fn write_secret_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    write_new_file(path, contents, 0o600)
}

/// [`write_secret_file`] with the Unix permissions `mode` (a public key's 0644).
pub fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = temporary_beside(path);
    let written = create_new_file(&tmp, mode).and_then(|mut file| {
        file.write_all(contents)?;
        file.sync_all()
    });
    let placed = written.and_then(|()| place_new(&tmp, path));
    let _ = std::fs::remove_file(&tmp);
    placed?;
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => sync_dir(dir),
        _ => Ok(()),
    }
}

/// A unique hidden name beside `path` for the file that becomes it (`.NAME.UUID.tmp`: what
/// a start removes when a writer was cut short).
pub fn temporary_beside(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!(".{name}.{}.tmp", uuid::Uuid::new_v4()))
}

/// Gives the file `tmp` the name `path` unless something holds that name
/// (`AlreadyExists`): a link (the caller removes `tmp`), or, on a file system without links
/// (a FAT drive), a rename after looking.
pub fn place_new(tmp: &Path, path: &Path) -> std::io::Result<()> {
    place_new_with(tmp, path, |from, to| std::fs::hard_link(from, to))
}

/// [`place_new`] with `link` making the links (a test's file system without any).
pub fn place_new_with(
    tmp: &Path,
    path: &Path,
    link: impl Fn(&Path, &Path) -> std::io::Result<()>,
) -> std::io::Result<()> {
    match link(tmp, path) {
        Err(e) if no_links(&e) => {
            if path.try_exists()? {
                return Err(std::io::ErrorKind::AlreadyExists.into());
            }
            std::fs::rename(tmp, path)
        }
        linked => linked,
    }
}

/// Whether a link failed because the file system makes none (FAT, exFAT: EPERM; some
/// network shares: EOPNOTSUPP).
fn no_links(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::Unsupported
    ) || e.raw_os_error() == Some(95)
}

/// Makes the renames in `dir` durable (a directory cannot be opened for syncing on Windows,
/// where a rename is durable once it returns).
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_file_is_written_whole_once_and_never_over_another() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("appliance.key");
        write_secret_file(&path, b"first").unwrap();
        let err = write_secret_file(&path, b"second").unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["appliance.key"], "no temporary file is left");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn key_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let first = Appliance::load_or_create(&data).unwrap();
        let again = Appliance::load_or_create(&data).unwrap();
        assert_eq!(first.installation_id(), again.installation_id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(data.join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
            let mode = std::fs::metadata(&data).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700);
        }
    }

    #[test]
    fn activation_request_is_self_signed() {
        let appliance = Appliance::from_key(keys::generate_signing_key());
        let request = appliance.activation_request("host-1", OffsetDateTime::UNIX_EPOCH);
        let (_, payload): (_, ActivationRequest) =
            jws::verify(&request, Typ::Activation, [appliance.public_key()]).unwrap();
        assert_eq!(payload.installation_id, appliance.installation_id());
        assert_eq!(payload.public_key, appliance.public_key_b64());
        assert_eq!(payload.hostname, "host-1");
    }
}
