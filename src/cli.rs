//! The command line: `keygate <command>`. Each command is a thin layer over the library.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use keygate_sdk::{VerifyingKey, keys};
use rusqlite::TransactionBehavior;
use time::OffsetDateTime;
use tokio::sync::mpsc::UnboundedReceiver;
use tracing_subscriber::Layer;

use crate::alerts::notices::{ErrorCapture, ErrorEvent};
use crate::appliance::{self, Appliance};
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, LogFormat, Overrides};
use crate::licensing::{self, from_unix, import, rfc3339};
use crate::store::{self, licenses::TrustedKey};
use crate::vendor;

/// `println!` for a command's output, as a `Result`: a reader that went away
/// (`keygate status | head -3`) or a full disk ends the command with an error, not a panic,
/// and `main` ends quietly on the first (see [`reader_went_away`]).
macro_rules! say {
    ($($arg:tt)*) => { writeln!(std::io::stdout(), $($arg)*).map_err(StdoutError) };
}

/// A command could not write its output.
#[derive(Debug, thiserror::Error)]
#[error("cannot write to standard output")]
pub struct StdoutError(#[source] std::io::Error);

/// Whether a command failed only because whoever read its output stopped reading: as other
/// command-line tools, keygate then ends quietly and successfully.
pub fn reader_went_away(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<StdoutError>()
            .is_some_and(|StdoutError(e)| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

#[derive(Debug, Parser)]
#[command(name = "keygate", version, about = "On-premises license appliance", long_about = None)]
pub struct Cli {
    /// Configuration file (TOML). Without one, built-in defaults apply.
    #[arg(long, global = true, env = "KEYGATE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Data directory (database, appliance key, certificate, backups).
    #[arg(long, global = true, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Log output format.
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the appliance: HTTPS for devices and the admin portal.
    Serve {
        /// Address and port to listen on (default: the configuration's `listen`,
        /// 0.0.0.0:8443).
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
    },
    /// Print this appliance's activation request, for the vendor.
    ActivationRequest {
        /// Write it to FILE instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Trust a vendor public key (SPKI PEM) for license files.
    Trust {
        /// The vendor's public key file.
        key: PathBuf,
        /// A name to show for it (default: the file name without its extension).
        #[arg(long)]
        name: Option<String>,
    },
    /// Stop trusting a vendor key added with `trust` (by its key id): license files it signs
    /// are refused from then on; the licenses imported stay.
    Untrust { kid: String },
    /// Import a license file (also while the appliance runs; it takes effect at once).
    Import {
        /// The license file (.lic).
        file: PathBuf,
    },
    /// List licenses and their items.
    Licenses,
    /// Summarise this appliance: identity, data, licenses.
    Status,
    /// Handshake codes: list, create, session password, validation fields, items.
    #[command(subcommand)]
    Handshake(HandshakeCommand),
    /// Devices: block, unblock, remove.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Take a backup of the database now (also while the appliance runs).
    Backup,
    /// Replace the database with a backup (stop the service first); the current database is
    /// kept aside.
    Restore {
        /// The backup file (`<data-dir>/backups/keygate-*.db`).
        file: PathBuf,
    },
    /// Alert emails: recipients, SMTP server, a test message.
    #[command(subcommand)]
    Alerts(AlertsCommand),
    /// Portal admins: create one, or reset a password (read from standard input).
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Turn the public trial on or off (7-day authorizations without a handshake code).
    Trial {
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
    /// Accept this machine's clock as it is now when the appliance refuses to sign because
    /// an earlier time was wrong (the clock had been set too far ahead). Stop the service
    /// first; the reset is audited, and concurrency windows counted after now are forgotten.
    ResetClock,
    /// Configuration commands.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// The vendor's side: signing keys and license files.
    #[command(subcommand)]
    Vendor(VendorCommand),
}

#[derive(Debug, Subcommand)]
pub enum HandshakeCommand {
    /// List handshake codes with their organization, password and validation fields.
    List,
    /// Create a handshake code for an organization.
    Create {
        code: String,
        #[arg(long, value_name = "ID")]
        organization: String,
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Set the session password, read as one line from standard input.
    SetPassword { code: String },
    /// Remove the session password.
    ClearPassword { code: String },
    /// Replace the validation fields (none given: any domain and process are allowed).
    SetValidation {
        code: String,
        /// An allowed domain, exact or `*.suffix` (repeatable).
        #[arg(long = "domain")]
        domains: Vec<String>,
        /// An allowed process name (repeatable).
        #[arg(long = "process")]
        processes: Vec<String>,
    },
    /// Configure an item to a handshake code of its organization.
    Assign { item: String, code: String },
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Create an admin; the password is read from standard input.
    Create {
        name: String,
        #[arg(long, default_value = "owner", value_parser = ["owner", "manager", "auditor"])]
        role: String,
    },
    /// Set a new password (read from standard input) and sign the admin out everywhere.
    ResetPassword { name: String },
    /// Print a one-time link (valid 24 hours) to create the first admin in the portal, while
    /// there is none (`serve` prints one on a terminal only, never into a service's log).
    SetupLink,
}

#[derive(Debug, Subcommand)]
pub enum AlertsCommand {
    /// Set the recipients: a `;`-separated list of addresses.
    Recipients { list: String },
    /// Set the SMTP server: every setting as given here, those left out at their defaults
    /// (as the portal's form sets them all). The password, if any, is read from standard
    /// input; without one, the stored password stays for the same server, user and CA.
    Smtp {
        #[arg(long)]
        host: String,
        /// 1 to 65535 (default: 587 for starttls, 465 for tls, 25 for none).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        port: Option<u16>,
        /// starttls, tls (implicit) or none (a trusted LAN relay).
        #[arg(long, default_value = "starttls", value_parser = ["starttls", "tls", "none"])]
        tls: String,
        #[arg(long)]
        user: Option<String>,
        /// Read the password from standard input.
        #[arg(long)]
        password_stdin: bool,
        /// The sender address.
        #[arg(long)]
        from: Option<String>,
        /// A PEM CA certificate to trust for the server (a relay with an internal CA).
        #[arg(long, value_name = "FILE")]
        ca: Option<PathBuf>,
    },
    /// Send a test email to the recipients now and print the server's answer.
    Test,
}

#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Refuse the device's authorizations and renewals.
    Block { uuid: String },
    /// Let a blocked device authorize and renew again.
    Unblock { uuid: String },
    /// Free the device's seats and revoke its leases.
    Remove { uuid: String },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the effective configuration (file, environment and flags applied).
    Dump,
}

#[derive(Debug, Subcommand)]
pub enum VendorCommand {
    /// Make a vendor signing key pair: PREFIX.key (private) and PREFIX.pub (public).
    Keygen {
        #[arg(long, value_name = "PREFIX")]
        out: PathBuf,
    },
    /// Issue a license file for the appliance that made an activation request.
    Issue(IssueArgs),
}

#[derive(Debug, Args)]
pub struct IssueArgs {
    /// The vendor's private key (PKCS#8 PEM).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// The appliance's activation request.
    #[arg(long, value_name = "FILE")]
    request: PathBuf,
    /// The items to grant (TOML).
    #[arg(long, value_name = "FILE")]
    items: PathBuf,
    /// The license id (or `license_id` in the items file).
    #[arg(long)]
    license_id: Option<String>,
    /// License version; a renewal or top-up carries a higher one.
    #[arg(long)]
    version: Option<u32>,
    /// The customer's organization id (or `organization_id` in the items file).
    #[arg(long, value_name = "ID")]
    organization: Option<String>,
    /// The vendor name shown to the customer.
    #[arg(long)]
    vendor: Option<String>,
    /// Write the license file here instead of standard output.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

impl Cli {
    /// The effective configuration for this invocation.
    pub fn config(&self) -> Result<Config> {
        let listen = match &self.command {
            Command::Serve { listen } => *listen,
            _ => None,
        };
        let overrides = Overrides {
            data_dir: self.data_dir.clone(),
            listen,
            log_format: self.log_format,
        };
        // Only keygate's own variables are read: another one that is not UTF-8
        // (`std::env::vars` panics on it) is none of keygate's business, one of keygate's is
        // refused rather than read with a character replaced.
        let mut env = Vec::new();
        for (key, value) in std::env::vars_os() {
            let Some(key) = key.to_str().filter(|k| k.starts_with("KEYGATE_")) else {
                continue;
            };
            let Ok(value) = value.into_string() else {
                bail!("the environment variable {key} is not valid UTF-8");
            };
            env.push((key.to_string(), value));
        }
        let config = Config::load(self.config.as_deref(), env, &overrides)?;
        let chose_data_dir = self.config.is_some()
            || self.data_dir.is_some()
            || std::env::var_os("KEYGATE_DATA_DIR").is_some();
        // The vendor's tools and `config` do not open a data directory.
        let opens_data_dir = !matches!(self.command, Command::Vendor(_) | Command::Config(_));
        if opens_data_dir && !chose_data_dir {
            not_beside_an_installed_appliance(&config.data_dir, Path::new(INSTALLED_CONFIG))?;
        }
        Ok(config)
    }
}

/// Where the packages put the configuration of the installed appliance.
#[cfg(unix)]
const INSTALLED_CONFIG: &str = "/etc/keygate/keygate.toml";
#[cfg(windows)]
const INSTALLED_CONFIG: &str = r"C:\ProgramData\keygate\keygate.toml";

/// On a machine with an installed appliance, a command run without `--config` would make a
/// second appliance (a new key, a new database) in the working directory, and an activation
/// request for it that the vendor would license by mistake: refused with the right command.
fn not_beside_an_installed_appliance(data_dir: &Path, installed: &Path) -> Result<()> {
    if installed.exists() && !data_dir.exists() {
        bail!(
            "this machine has an installed keygate (configured in {installed}); without \
             --config this command would create another appliance in {data_dir}. Run it \
             against the installed one, e.g. `{run_as} --config {installed} ...`, or pass \
             --data-dir to use a data directory of your own",
            run_as = if cfg!(windows) {
                "keygate.exe"
            } else {
                "runuser -u keygate -- keygate"
            },
            installed = installed.display(),
            data_dir = data_dir.display(),
        );
    }
    Ok(())
}

/// Runs a command other than `serve`.
pub fn run(command: Command, config: Config) -> Result<()> {
    let clock = SystemClock;
    // Only the first steps of a new appliance (`trust`, `activation-request`, as `serve`)
    // may set one up: any other command against a data directory without an appliance (a
    // mistyped --data-dir) is told so, and nothing is made there. `status` and `restore`
    // say it their own way.
    let sets_up = matches!(
        command,
        Command::ActivationRequest { .. }
            | Command::Trust { .. }
            | Command::Status
            | Command::Restore { .. }
            | Command::Config(_)
            | Command::Vendor(_)
    );
    let key = config.data_dir.join(appliance::KEY_FILE);
    if !sets_up && !appliance::exists(&key)? {
        return Err(appliance::ApplianceError::NoKey { path: key }.into());
    }
    match command {
        Command::Serve { .. } => unreachable!("serve is run by main"),
        Command::ActivationRequest { out } => {
            // Checked before a new appliance is set up for it.
            if let Some(out) = &out
                && let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty())
                && !dir.is_dir()
            {
                bail!(
                    "cannot write {}: there is no directory {}",
                    out.display(),
                    dir.display()
                );
            }
            let new = !key.exists();
            let appliance =
                store::backup::appliance_for(&config.data_dir, &config.database_path())?;
            if new {
                eprintln!(
                    "set up a new appliance (installation {}) in {}",
                    appliance.installation_id(),
                    config.data_dir.display()
                );
            }
            write_output(
                out.as_deref(),
                &appliance.activation_request_file(clock.now()),
            )
        }
        Command::Trust { key, name } => trust(&config, &key, name, &clock),
        Command::Untrust { kid } => untrust(&config, &kid, &clock),
        Command::Import { file } => import_file(&config, &file, &clock),
        Command::Licenses => licenses(&config),
        Command::Status => status(&config),
        Command::Handshake(command) => handshake(&config, command, &clock),
        Command::Device(command) => device(&config, command, &clock),
        Command::Backup => {
            // Opened first: a database to back up, brought to this release's schema (and
            // kept open: a restore waits for the backup).
            let _db = open_store(&config)?;
            let now = clock.now();
            let file = store::backup::take(
                &config.database_path(),
                &config.data_dir.join(store::backup::BACKUP_DIR),
                now,
            )?;
            audited(&config, now, |conn| {
                store::settings::set(
                    conn,
                    crate::jobs::LAST_BACKUP,
                    &now.unix_timestamp().to_string(),
                )?;
                let name = store::backup::file_name(&file.path);
                Ok(((), Some(("backup taken", name, String::new()))))
            })?;
            say!(
                "backup written: {} ({} bytes, integrity checked)",
                file.path.display(),
                file.size
            )?;
            Ok(())
        }
        Command::Restore { file } => restore(&config, &file, &clock),
        Command::Alerts(command) => alerts(&config, command, &clock),
        Command::Admin(command) => admin(&config, command, &clock),
        Command::Trial { state } => {
            let changed = audited(&config, clock.now(), |conn| {
                if !store::catalogue::set_public_trial(conn, state == "on")? {
                    return Ok((false, None));
                }
                let what = format!("The public trial is {state}.");
                Ok((true, Some(("handshake trial", String::new(), what))))
            })?;
            say!(
                "public trial {}{state}",
                if changed { "" } else { "already " }
            )?;
            Ok(())
        }
        Command::ResetClock => reset_clock(&config, &clock),
        Command::Config(ConfigCommand::Dump) => {
            let toml = config.to_toml()?;
            write!(std::io::stdout(), "{toml}").map_err(StdoutError)?;
            Ok(())
        }
        Command::Vendor(VendorCommand::Keygen { out }) => {
            let (private, public) = vendor::keygen(&out)?;
            say!(
                "wrote {} (keep it secret) and {} (give it to appliances and embed it in the SDK)",
                private.display(),
                public.display()
            )?;
            Ok(())
        }
        Command::Vendor(VendorCommand::Issue(args)) => issue(args, &clock),
    }
}

/// Writes a command's output to `out`, or to stdout. A regular file (a link is followed) is
/// replaced whole, through a temporary file beside it, but never one holding a private key
/// (a mistyped `--out vendor.key` destroyed the vendor's signing key); anything else (a
/// terminal, a pipe, `/dev/stdout`) is written to as it is.
fn write_output(out: Option<&Path>, text: &str) -> Result<()> {
    let Some(path) = out else {
        return Ok(std::io::stdout()
            .write_all(text.as_bytes())
            .map_err(StdoutError)?);
    };
    let cannot = || format!("cannot write {}", path.display());
    match std::fs::metadata(path) {
        // Not told: "wrote" would go into the same pipe or terminal (`--out /dev/stdout`).
        Ok(found) if !found.is_file() => std::fs::write(path, text).with_context(cannot)?,
        found => {
            let target = match found {
                Ok(_) => std::fs::canonicalize(path).with_context(cannot)?,
                Err(_) => path.to_path_buf(),
            };
            if let Some(what) = precious(&target) {
                bail!(
                    "{} holds {what}: refusing to write over it (choose another file)",
                    path.display()
                );
            }
            let tmp = appliance::temporary_beside(&target);
            std::fs::write(&tmp, text)
                .and_then(|()| std::fs::rename(&tmp, &target))
                .inspect_err(|_| {
                    let _ = std::fs::remove_file(&tmp);
                })
                .with_context(cannot)?;
            say!("wrote {}", path.display())?;
        }
    }
    Ok(())
}

/// Whether the file at `path` begins like a PEM private key (within its first 64 KiB).
/// What a file holds that an output must not replace: a private key, or a database (the
/// appliance's own, named by mistake).
fn precious(path: &Path) -> Option<&'static str> {
    use std::io::Read;
    let mut head = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(64 * 1024).read_to_end(&mut head))
        .ok()?;
    if head.starts_with(b"SQLite format 3\0") {
        Some("a database")
    } else if head
        .windows(b"PRIVATE KEY".len())
        .any(|w| w == b"PRIVATE KEY")
    {
        Some("a private key")
    } else {
        None
    }
}

/// The vendor keys this appliance trusts.
pub fn trusted_keys(config: &Config, conn: &rusqlite::Connection) -> Result<Vec<VerifyingKey>> {
    Ok(import::trusted_keys(conn, &config.trusted_vendor_keys)?)
}

/// The database opened for a console command, with the lock that keeps `restore` from
/// replacing it while the command runs ([`store::backup::console_lock`]).
struct Db {
    conn: rusqlite::Connection,
    _restore_waits: std::fs::File,
}

impl std::ops::Deref for Db {
    type Target = rusqlite::Connection;
    fn deref(&self) -> &rusqlite::Connection {
        &self.conn
    }
}

impl std::ops::DerefMut for Db {
    fn deref_mut(&mut self) -> &mut rusqlite::Connection {
        &mut self.conn
    }
}

/// Opens the database for a command, migrating it to this release's schema, unless the
/// service runs on it: migrating under a running older `serve` (an upgrade that did not
/// restart it) would break its queries.
fn open_store(config: &Config) -> Result<Db> {
    use std::time::Duration;
    appliance::create_private_dir(&config.data_dir)?;
    let restore_waits = store::backup::console_lock(&config.data_dir, false)?;
    let path = config.database_path();
    let schema = if path.exists() {
        Some(read_only(&path)?.1)
    } else {
        None
    };
    let outdated = schema.filter(|s| (1..store::schema_version()).contains(s));
    // Held while migrating: a service starting meanwhile waits for it.
    let _lock = match outdated {
        Some(schema) => match store::backup::lock_file(&config.data_dir, Duration::ZERO) {
            Err(store::backup::BackupError::Running) => bail!(
                "the database is at schema {schema}, which the running service reads; this \
                 keygate ({}) needs schema {}: restart the service with this release (it \
                 migrates the database at start), then run the command again",
                env!("CARGO_PKG_VERSION"),
                store::schema_version()
            ),
            lock => Some(lock?),
        },
        None => None,
    };
    if _lock.is_some() {
        store::backup::remove_unfinished_at_start(&config.data_dir);
    }
    Ok(Db {
        conn: store::open(&path)?,
        _restore_waits: restore_waits,
    })
}

/// Whether `serve` runs on this data directory (it holds the directory's lock).
fn service_running(config: &Config) -> bool {
    // Without its lock file no service ever ran here: a look makes none.
    config.data_dir.join("keygate.lock").exists()
        && matches!(
            store::backup::lock_file(&config.data_dir, std::time::Duration::ZERO),
            Err(store::backup::BackupError::Running)
        )
}

/// The database opened read-only (a database of another release is told, not migrated),
/// and its schema version.
fn read_only(path: &Path) -> Result<(rusqlite::Connection, i64)> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    let schema: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    Ok((conn, schema))
}

/// What a change made at the console writes into the audit log (actor `cli`), as the
/// portal's changes do: the action, its target and a detail.
type Entry = (&'static str, String, String);

/// Runs a change made at the console and its audit entry in one transaction: a refused
/// change writes neither.
fn audited<T>(
    config: &Config,
    now: OffsetDateTime,
    change: impl FnOnce(&rusqlite::Connection) -> Result<(T, Option<Entry>)>,
) -> Result<T> {
    let mut conn = open_store(config)?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let (value, entry) = change(&tx)?;
    if let Some((action, target, detail)) = entry {
        let at = licensing::unix(now);
        store::ops::audit(&tx, at, "cli", action, &target, &detail, "")?;
    }
    tx.commit()?;
    Ok(value)
}

fn untrust(config: &Config, kid: &str, clock: &dyn Clock) -> Result<()> {
    // As `status` and the portal show key ids: lowercase hex.
    let kid = kid.trim().to_ascii_lowercase();
    let kid = kid.as_str();
    for path in &config.trusted_vendor_keys {
        if import::config_key(path).is_ok_and(|key| keys::kid(&key) == kid) {
            bail!(
                "vendor key {kid} is trusted by the configuration ({}): remove it from \
                 trusted_vendor_keys there and restart the service (it reads them at start), \
                 then run this again in case `keygate trust` added it too",
                path.display()
            );
        }
    }
    audited(config, clock.now(), |conn| {
        if !store::licenses::delete_trusted_key(conn, kid)? {
            bail!(
                "vendor key {kid} is not trusted (`keygate status` and the portal's Licenses \
                 page list those that are)"
            );
        }
        Ok((
            (),
            Some(("vendor key untrusted", kid.to_string(), String::new())),
        ))
    })?;
    say!("vendor key {kid} is no longer trusted; the licenses it signed stay imported")?;
    Ok(())
}

fn trust(config: &Config, path: &Path, name: Option<String>, clock: &dyn Clock) -> Result<()> {
    let pem =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let key = keys::public_key_from_pem(&pem).with_context(|| path.display().to_string())?;
    let name = name.unwrap_or_else(|| {
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    let kid = keys::kid(&key);
    let now = clock.now();
    let added = audited(config, now, |conn| {
        let added = store::licenses::insert_trusted_key(
            conn,
            &TrustedKey {
                kid: kid.clone(),
                public_key: key.to_bytes(),
                name: name.clone(),
                added_at: licensing::unix(now),
            },
        )?;
        let entry = added.then(|| ("vendor key trusted", kid.clone(), name.clone()));
        Ok((added, entry))
    })?;
    if added {
        say!("trusted vendor key {kid} ({name})")?;
    } else {
        say!("vendor key {kid} was already trusted; nothing changed")?;
    }
    Ok(())
}

/// `keygate restore FILE`.
fn restore(config: &Config, file: &Path, clock: &dyn Clock) -> Result<()> {
    let appliance = Appliance::load(&config.data_dir)?;
    let now = clock.now();
    // Licenses are the vendor's word, not the appliance's state: the replaced database's
    // versions newer than the backup's are imported again into the restored copy before it
    // takes its place, since the appliance never goes back to a superseded version (an
    // import refuses one, and a device that was served the newer one refuses it).
    let restored = store::backup::restore(
        &config.database_path(),
        file,
        appliance.installation_id(),
        now,
        &mut |conn, license| {
            reimport(config, &appliance, conn, license, now).map_err(|e| format!("{e:#}"))
        },
    )?;
    let mut report = format!(
        "restored {}; the previous database is kept as {} (with its -wal file, if it had \
         one: keep the two together)\n",
        file.display(),
        restored.aside.display()
    );
    for line in &restored.handed_on {
        report += &format!("{line}\n");
    }
    // The restore is done whatever becomes of its report.
    let _ = std::io::stdout().write_all(report.as_bytes());
    if !restored.not_handed_on.is_empty() {
        bail!(
            "the backup is restored, but its licenses may be older than the appliance's: \
             {}. Import the newest license files again (`keygate import FILE`): devices \
             that were served a newer version refuse an older one",
            restored.not_handed_on.join("; ")
        );
    }
    Ok(())
}

/// Imports `license` into `conn` (a restored database), unless it holds that version or a
/// newer one already (`None`); returns what the import did.
fn reimport(
    config: &Config,
    appliance: &Appliance,
    conn: &rusqlite::Connection,
    license: &store::licenses::SignedVersion,
    now: OffsetDateTime,
) -> Result<Option<String>> {
    let license_id = &license.license_id;
    if store::licenses::current_version(conn, license_id)?
        .is_some_and(|c| c.version >= license.version)
    {
        return Ok(None);
    }
    let trusted = trusted_keys(config, conn)?;
    let verified = import::verify(&license.jws, &trusted, appliance.public_key())?;
    let outcome = import::apply(conn, &verified, now, license.default_code.as_deref())?.to_string();
    let detail = format!("{outcome} (kept over the backup restored)");
    let at = licensing::unix(now);
    store::ops::audit(conn, at, "cli", "license imported", license_id, &detail, "")?;
    Ok(Some(outcome))
}

fn import_file(config: &Config, path: &Path, clock: &dyn Clock) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let Ok(text) = String::from_utf8(bytes) else {
        bail!(
            "{} is not UTF-8 text (a license file is one line of ASCII; was it saved in another \
             encoding?)",
            path.display()
        );
    };
    let appliance = store::backup::appliance_for(&config.data_dir, &config.database_path())?;
    let now = clock.now();
    let outcome = audited(config, now, |conn| {
        let trusted = trusted_keys(config, conn)?;
        let verified = import::verify(&text, &trusted, appliance.public_key())?;
        let outcome = import::apply(conn, &verified, now, None)?;
        let entry = outcome.changed().then(|| {
            let id = verified.license.license_id.clone();
            ("license imported", id, outcome.to_string())
        });
        let note = import::serving_note(&verified.license, now);
        Ok(((outcome.to_string(), note), entry))
    })?;
    let (outcome, note) = outcome;
    say!("{outcome}")?;
    if let Some(note) = note {
        eprintln!("{note}");
    }
    Ok(())
}

fn handshake(config: &Config, command: HandshakeCommand, clock: &dyn Clock) -> Result<()> {
    use crate::licensing::handshake::hash_password;
    use crate::store::licenses as l;
    let found = |changed: bool, code: &str| {
        if changed {
            Ok(())
        } else {
            Err(anyhow::anyhow!("no handshake code {code:?}"))
        }
    };
    // Each change is audited as the portal's: `handshake <action>`, the code, what changed.
    match command {
        HandshakeCommand::List => {
            let conn = open_store(config)?;
            say!(
                "{:<28} {:<12} {:<10} {:<8} {:<30} PROCESSES",
                "CODE",
                "ORG",
                "NAME",
                "PASSWORD",
                "DOMAINS"
            )?;
            for h in l::handshake_codes(&conn)? {
                say!(
                    "{:<28} {:<12} {:<10} {:<8} {:<30} {}",
                    h.code + if h.is_default { " (default)" } else { "" },
                    h.organization_id,
                    h.name,
                    if h.password_hash.is_some() {
                        "yes"
                    } else {
                        "no"
                    },
                    h.allowed_domains.join(","),
                    h.allowed_processes.join(",")
                )?;
            }
        }
        HandshakeCommand::Create {
            code,
            organization,
            name,
        } => {
            if !licensing::is_identifier(&code) {
                bail!("a handshake code is 1 to 64 letters, digits, '.', '_' or '-'");
            }
            if !licensing::is_handshake_name(&name) {
                bail!("a name is at most 100 characters, without control characters");
            }
            audited(config, clock.now(), |conn| {
                if l::default_handshake(conn, &organization)?.is_none() {
                    bail!("organization {organization} has no license on this appliance");
                }
                if l::handshake_by_code(conn, &code)?.is_some() {
                    bail!("handshake code {code} already exists");
                }
                l::insert_handshake(
                    conn,
                    &code,
                    &organization,
                    &name,
                    false,
                    licensing::unix(clock.now()),
                )?;
                let what = format!("Handshake code {code} created.");
                Ok(((), Some(("handshake create", code.clone(), what))))
            })?;
            say!("created handshake code {code} for organization {organization}")?;
        }
        HandshakeCommand::SetPassword { code } => {
            // Before the password is typed: an unknown code is told at once (and again in
            // the change, which may meet a code deleted meanwhile).
            found(
                l::handshake_by_code(&open_store(config)?.conn, &code)?.is_some(),
                &code,
            )?;
            let password = read_password()?;
            let password = password.as_str();
            if password.is_empty() {
                bail!("the password is empty (give it on standard input)");
            }
            licensing::handshake::check_password(password).map_err(anyhow::Error::msg)?;
            let hash = hash_password(password);
            audited(config, clock.now(), |conn| {
                found(l::set_handshake_password(conn, &code, Some(&hash))?, &code)?;
                let what = format!("Session password of {code} set.");
                Ok(((), Some(("handshake password", code.clone(), what))))
            })?;
            say!("session password set for {code}")?;
        }
        HandshakeCommand::ClearPassword { code } => {
            audited(config, clock.now(), |conn| {
                found(l::set_handshake_password(conn, &code, None)?, &code)?;
                let what = format!("Session password of {code} removed.");
                Ok(((), Some(("handshake clear-password", code.clone(), what))))
            })?;
            say!("session password removed from {code}")?;
        }
        HandshakeCommand::SetValidation {
            code,
            domains,
            processes,
        } => {
            // As the portal reads its lines: trimmed, blank ones dropped.
            let trimmed = |names: Vec<String>| -> Vec<String> {
                names
                    .iter()
                    .map(|n| n.trim().to_string())
                    .filter(|n| !n.is_empty())
                    .collect()
            };
            let (domains, processes) = (trimmed(domains), trimmed(processes));
            licensing::handshake::check_validation(&domains, &processes)
                .map_err(anyhow::Error::msg)?;
            let what = format!(
                "validation fields of {code}: domains [{}], processes [{}]",
                domains.join(", "),
                processes.join(", ")
            );
            audited(config, clock.now(), |conn| {
                found(
                    l::set_handshake_validation(conn, &code, &domains, &processes)?,
                    &code,
                )?;
                Ok((
                    (),
                    Some(("handshake validation", code.clone(), what.clone())),
                ))
            })?;
            say!("{what}")?;
        }
        HandshakeCommand::Assign { item, code } => {
            audited(config, clock.now(), |conn| {
                let h = l::handshake_by_code(conn, &code)?
                    .ok_or_else(|| anyhow::anyhow!("no handshake code {code:?}"))?;
                if !l::assign_item(conn, &item, h.id)? {
                    bail!("no item {item:?} of organization {}", h.organization_id);
                }
                let what = format!("Item {item} is now served by {code}.");
                Ok(((), Some(("handshake assign", code.clone(), what))))
            })?;
            say!("item {item} now served by {code}")?;
        }
    }
    Ok(())
}

/// Reads a password as one line from standard input. From a terminal it is asked for
/// without echo, twice (a typo is caught before it is stored); piped, it is read as is.
fn read_password() -> Result<String> {
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() {
        let password = rpassword::prompt_password("Password: ")?;
        if rpassword::prompt_password("The same password again: ")? != password {
            bail!("the two passwords differ; nothing was changed");
        }
        return Ok(password);
    }
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

fn admin(config: &Config, command: AdminCommand, clock: &dyn Clock) -> Result<()> {
    use crate::licensing::handshake::hash_password;
    use crate::store::admins;
    let now = clock.now();
    match command {
        AdminCommand::Create { name, role } => {
            // Told before the password is asked for (checked again as the admin is stored).
            let first_not_owner = |conn: &rusqlite::Connection| -> Result<()> {
                if role != "owner" && admins::admin_count(conn)? == 0 {
                    bail!(
                        "the first admin must be an owner (--role owner): owners manage the \
                         other admins; nothing was changed"
                    );
                }
                Ok(())
            };
            // Before the password is typed (and again in the change).
            let conn = open_store(config)?;
            if admins::admin_by_name(&conn, &name)?.is_some() {
                bail!("an admin named {name} already exists");
            }
            first_not_owner(&conn)?;
            drop(conn);
            let password = read_password()?;
            crate::portal::check_new_admin(&name, &password).map_err(|e| anyhow::anyhow!(e))?;
            let hash = hash_password(&password);
            audited(config, now, |conn| {
                if admins::admin_by_name(conn, &name)?.is_some() {
                    bail!("an admin named {name} already exists");
                }
                first_not_owner(conn)?;
                admins::insert_admin(conn, &name, &role, &hash, licensing::unix(now))?;
                admins::delete_setup_tokens(conn)?;
                // Worded as the portal's entries (`admin <action>`), so a search finds both.
                let what = format!("Admin {name} created ({role}).");
                Ok(((), Some(("admin create", name.clone(), what))))
            })?;
            say!("admin {name} created ({role})")?;
        }
        AdminCommand::ResetPassword { name } => {
            // Before the password is typed (and again in the change).
            if admins::admin_by_name(&open_store(config)?.conn, &name)?.is_none() {
                bail!("no admin named {name}");
            }
            let password = read_password()?;
            crate::portal::check_credentials(&name, &password).map_err(|e| anyhow::anyhow!(e))?;
            let hash = hash_password(&password);
            audited(config, now, |conn| {
                if !admins::set_password(conn, &name, &hash)? {
                    bail!("no admin named {name}");
                }
                let what = format!("Password of {name} reset; its sessions are signed out.");
                Ok(((), Some(("admin password", name.clone(), what))))
            })?;
            say!("password of {name} reset; its sessions are signed out")?;
        }
        AdminCommand::SetupLink => {
            let link = audited(config, now, |conn| {
                let link = crate::portal::auth::setup_link(conn, licensing::unix(now))?;
                let entry = link
                    .is_some()
                    .then(|| ("setup link made", String::new(), String::new()));
                Ok((link, entry))
            })?;
            let Some(path) = link else {
                bail!("an admin exists already: the setup link is only for the first one");
            };
            say!("{}", first_admin_link(config, config.listen.port(), &path))?;
        }
    }
    Ok(())
}

/// The one-time link to create the first admin, as `serve` and `admin setup-link` print it:
/// under the portal's `public_url` when one is set (a proxy in front), else this host's
/// name and the port it listens on.
fn first_admin_link(config: &Config, port: u16, path: &str) -> String {
    match config.public_url.as_deref() {
        Some(url) => format!(
            "{}{path}  (one-time link, valid 24 hours)",
            url.trim_end_matches('/')
        ),
        None => format!(
            "https://{}:{port}{path}  (one-time link, valid 24 hours;\n                 \
             on this machine: https://localhost:{port}{path})",
            appliance::hostname()
        ),
    }
}

fn alerts(config: &Config, command: AlertsCommand, clock: &dyn Clock) -> Result<()> {
    use crate::alerts::mail;
    match command {
        AlertsCommand::Recipients { list } => {
            let parsed = mail::recipients_to_save(&list)?;
            let list = parsed
                .iter()
                .map(|m| m.to_string())
                .collect::<Vec<_>>()
                .join(";");
            audited(config, clock.now(), |conn| {
                store::settings::set(conn, mail::RECIPIENTS, &list)?;
                Ok((
                    (),
                    Some(("alert recipients set", list.clone(), String::new())),
                ))
            })?;
            say!(
                "alert recipients: {}",
                if list.is_empty() { "(none)" } else { &list }
            )?;
        }
        AlertsCommand::Smtp {
            host,
            port,
            tls,
            user,
            password_stdin,
            from,
            ca,
        } => {
            mail::check_host(&host).map_err(anyhow::Error::msg)?;
            let password = password_stdin.then(read_password).transpose()?;
            let given = password.as_ref().is_some_and(|p| !p.is_empty());
            let tls = mail::TlsMode::parse(&tls).expect("clap checked it");
            let mut settings = mail::SmtpSettings {
                port: port.unwrap_or(tls.default_port()),
                host,
                tls,
                // As the settings are read back: an empty user is none.
                user: user.map(|u| u.trim().to_string()).filter(|u| !u.is_empty()),
                password: password.filter(|p| !p.is_empty()),
                from: from.unwrap_or_else(mail::default_from),
                ca: match &ca {
                    Some(path) => Some(
                        mail::ca_text(
                            &std::fs::read_to_string(path)
                                .with_context(|| format!("cannot read {}", path.display()))?,
                        )
                        .with_context(|| format!("{} is empty", path.display()))?,
                    ),
                    None => None,
                },
            };
            let kept = audited(config, clock.now(), |conn| {
                // Given again without --password-stdin, the stored password stays for the
                // same server (changing `--from` alone does not sign out), as in the portal.
                let mut dropped = false;
                if settings.password.is_none() {
                    let stored = mail::load_settings(conn)?;
                    (settings.password, dropped) = mail::kept_password(stored.as_ref(), &settings);
                }
                let kept = !given && settings.password.is_some();
                mail::check_settings(&settings).map_err(|(_, why)| anyhow::anyhow!("{why}"))?;
                mail::save_settings(conn, &settings)?;
                if dropped {
                    eprintln!(
                        "the stored SMTP password is dropped: it was given for another server, \
                         protection, user or CA (give it again with --password-stdin)"
                    );
                }
                let server = format!("{}:{}", settings.host, settings.port);
                Ok((
                    kept,
                    Some(("SMTP server set", server, tls.as_str().to_string())),
                ))
            })?;
            say!(
                "SMTP server: {}:{} ({}{})",
                settings.host,
                settings.port,
                tls.as_str(),
                if kept { ", stored password kept" } else { "" }
            )?;
        }
        AlertsCommand::Test => {
            let conn = open_store(config)?;
            let settings = mail::load_settings(&conn)?.ok_or(mail::MailError::NotConfigured)?;
            let to = mail::parse_recipients(
                &store::settings::get(&conn, mail::RECIPIENTS)?.unwrap_or_default(),
            )?;
            if to.is_empty() {
                bail!("no alert recipients are set (keygate alerts recipients ...)");
            }
            let email = mail::Email::test();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let answer = runtime.block_on(mail::send(&settings, &to, &email))?;
            say!("the SMTP server accepted the test email: {answer}")?;
        }
    }
    Ok(())
}

fn device(config: &Config, command: DeviceCommand, clock: &dyn Clock) -> Result<()> {
    use crate::licensing::types;
    use crate::store::devices as d;
    let canonical = |uuid: &str| types::uuid("uuid", uuid).map_err(|e| anyhow::anyhow!("{e}"));
    let now = clock.now();
    let block = |uuid: &str, blocked: bool, action: &'static str| {
        let uuid = canonical(uuid)?;
        audited(config, now, |conn| {
            if !d::set_blocked(conn, &uuid, blocked)? {
                bail!("no device {uuid}");
            }
            Ok((uuid.clone(), Some((action, uuid.clone(), String::new()))))
        })
    };
    match command {
        DeviceCommand::Block { uuid } => {
            let uuid = block(&uuid, true, "device blocked")?;
            say!("device {uuid} blocked")?;
        }
        DeviceCommand::Unblock { uuid } => {
            let uuid = block(&uuid, false, "device unblocked")?;
            say!("device {uuid} unblocked")?;
        }
        DeviceCommand::Remove { uuid } => {
            let canonical = canonical(&uuid)?;
            let freed = audited(config, now, |conn| {
                let device = d::device_by_uuid(conn, &canonical)?
                    .ok_or_else(|| anyhow::anyhow!("no device {canonical}"))?;
                let freed = d::remove_device(conn, device.id, licensing::unix(now))?;
                Ok((
                    freed,
                    Some(("device removed", canonical.clone(), String::new())),
                ))
            })?;
            say!("device {canonical} removed: {freed} seat(s) freed, its leases revoked")?;
        }
    }
    Ok(())
}

fn licenses(config: &Config) -> Result<()> {
    let conn = open_store(config)?;
    let items = store::licenses::item_summaries(&conn)?;
    if items.is_empty() {
        say!("no licenses imported")?;
        return Ok(());
    }
    // One format for the header and the rows, so the columns cannot drift apart.
    let line = |c: [&str; 11]| {
        format!(
            "{:<16} {:>3} {:<10} {:<20} {:<18} {:<19} {:>10} {:>12} {:<10} {:<10} {}",
            c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10]
        )
    };
    say!(
        "{}",
        line([
            "LICENSE",
            "VER",
            "ORG",
            "ITEM",
            "PRODUCT",
            "MODEL",
            "QUOTA",
            "USED",
            "STARTS",
            "EXPIRES",
            "HANDSHAKE",
        ])
    )?;
    let date = |t: i64| rfc3339(from_unix(t))[..10].to_string();
    for i in items {
        let handshake = if i.withdrawn {
            format!("{} (withdrawn)", i.handshake_code)
        } else {
            i.handshake_code.clone()
        };
        say!(
            "{}",
            line([
                &i.license_id,
                &i.license_version.to_string(),
                &i.organization_id,
                &i.item_id,
                &i.product,
                &i.model.to_string(),
                &i.quota.to_string(),
                &match i.max_exceptions {
                    // Concurrent items count windows over quota, not devices.
                    Some(max) => format!("{}/{max} exc.", i.used),
                    None => i.used.to_string(),
                },
                &date(i.starts_at),
                &date(i.expires_at),
                &handshake,
            ])
        )?;
    }
    Ok(())
}

fn reset_clock(config: &Config, clock: &dyn Clock) -> Result<()> {
    let conn = open_store(config)?;
    // The running service keeps the newest time in memory and would save it again.
    let _lock = store::backup::lock_file(&config.data_dir, std::time::Duration::ZERO)?;
    let now = clock.now().unix_timestamp();
    let newest = crate::store::ops::newest_time(&conn)?;
    if now >= newest {
        say!("the clock is not behind the newest time used; nothing changed")?;
        return Ok(());
    }
    let (now_text, newest_text) = (rfc3339(from_unix(now)), rfc3339(from_unix(newest)));
    let tx = conn.unchecked_transaction()?;
    store::settings::set(&tx, crate::clock::NEWEST_TIME, &now.to_string())?;
    store::devices::forget_windows_after(&tx, crate::licensing::models::window_of(now))?;
    let detail = format!("newest time used was {newest_text}; clock accepted at {now_text}");
    store::ops::audit(&tx, now, "cli", "clock reset", "", &detail, "")?;
    tx.commit()?;
    say!("{detail}")?;
    Ok(())
}

fn status(config: &Config) -> Result<()> {
    // Reading only: a mistyped directory is told, not made into a new appliance.
    if !appliance::exists(&config.database_path())? {
        bail!(
            "no keygate database at {}: check --data-dir or the configuration's data_dir \
             (`keygate serve` creates one on first start)",
            config.database_path().display()
        );
    }
    let appliance = Appliance::load(&config.data_dir)?;
    let (conn, schema) = read_only(&config.database_path())?;
    if schema != store::schema_version() {
        bail!(
            "the database {} is at schema {schema}; this keygate {} reads schema {}: {}",
            config.database_path().display(),
            env!("CARGO_PKG_VERSION"),
            store::schema_version(),
            if schema < store::schema_version() {
                "`keygate serve` (the service) migrates it when it starts"
            } else {
                "it was written by a newer keygate"
            }
        );
    }
    let counts = store::licenses::counts(&conn, licensing::unix(SystemClock.now()))?;
    // An unusable configured key is shown (every import fails until it is fixed), not a
    // reason to show nothing.
    let trusted = match trusted_keys(config, &conn) {
        Ok(keys) if keys.is_empty() => "none".to_string(),
        Ok(keys) => {
            let kids: Vec<String> = keys.iter().map(keys::kid).collect();
            format!("{} (key ids {})", keys.len(), kids.join(", "))
        }
        Err(e) => format!("CANNOT IMPORT: {e}"),
    };
    say!("keygate {}", env!("CARGO_PKG_VERSION"))?;
    say!("installation id:  {}", appliance.installation_id())?;
    say!("data directory:   {}", config.data_dir.display())?;
    say!(
        "database:         {} (schema {})",
        config.database_path().display(),
        store::schema_version()
    )?;
    say!("listen:           https://{}", config.listen)?;
    say!("trusted vendors:  {trusted}")?;
    say!(
        "licenses:         {} ({} items in force now, {} organizations, {} handshake codes)",
        counts.licenses,
        counts.items,
        counts.organizations,
        counts.handshake_codes
    )?;
    let running = service_running(config);
    say!(
        "service:          {}",
        if running { "running" } else { "not running" }
    )?;
    let time = |t: i64| rfc3339(from_unix(t));
    let (now, newest) = (
        SystemClock.now().unix_timestamp(),
        crate::store::ops::newest_time(&conn)?,
    );
    match crate::clock::judge(now, newest) {
        Err(behind) => say!(
            "clock:            BEHIND: {behind}; `keygate reset-clock` if that time was wrong"
        )?,
        Ok(()) => say!("clock:            ok ({})", time(now))?,
    }
    let source = crate::tls::certificate_source(config);
    let certificate = match crate::tls::load(&source) {
        Err(_) if source.self_signed && !source.cert.exists() => {
            "none yet (made at the first start)".to_string()
        }
        Err(e) => format!("UNUSABLE: {e}"),
        Ok(key) => match crate::tls::check_serving(&key, SystemClock.now()) {
            Err(e) => format!("CANNOT SERVE: {e} ({})", source.cert.display()),
            Ok(crate::tls::Coverage {
                expires_soon: Some(at),
                ..
            }) => format!(
                "EXPIRES SOON: on {} ({})",
                rfc3339(at),
                source.cert.display()
            ),
            Ok(_) => format!("ok ({})", source.cert.display()),
        },
    };
    say!("certificate:      {certificate}")?;
    // The newest file in backups/ (a restored database does not remember the backup it
    // came from, nor those taken since), else what the database recorded.
    let newest = store::backup::list(&config.data_dir.join(store::backup::BACKUP_DIR))
        .unwrap_or_default()
        .into_iter()
        .max_by_key(|f| f.taken_at);
    match newest {
        Some(file) => say!(
            "last backup:      {} ({}, {} bytes)",
            rfc3339(file.taken_at),
            store::backup::file_name(&file.path),
            file.size
        )?,
        None => match store::settings::get(&conn, crate::jobs::LAST_BACKUP)?
            .and_then(|t| t.parse().ok())
        {
            Some(t) => say!("last backup:      {}", time(t))?,
            None => say!("last backup:      none yet")?,
        },
    }
    let runs = store::ops::job_runs(&conn, 100)?;
    for job in crate::jobs::Job::ALL.map(crate::jobs::Job::name) {
        if let Some(run) = runs.iter().find(|r| r.job == job) {
            say!(
                "job {job:<13} {} at {} ({} ms): {}",
                if run.ok { "ok    " } else { "FAILED" },
                time(run.started_at),
                run.duration_ms,
                run.detail
            )?;
        }
    }
    Ok(())
}

fn issue(args: IssueArgs, clock: &dyn Clock) -> Result<()> {
    let pem = std::fs::read_to_string(&args.key)
        .with_context(|| format!("cannot read {}", args.key.display()))?;
    let key = keys::signing_key_from_pem(&pem).with_context(|| args.key.display().to_string())?;
    let request_text = std::fs::read_to_string(&args.request)
        .with_context(|| format!("cannot read {}", args.request.display()))?;
    let request = vendor::read_activation_request(&request_text)?;
    let items = vendor::read_items(&args.items)?;
    let issued = vendor::issue(
        &key,
        &request,
        items,
        vendor::IssueOptions {
            license_id: args.license_id,
            version: args.version,
            vendor: args.vendor,
            organization_id: args.organization,
        },
        clock.now(),
    )?;
    if let Some(note) = issued.note {
        eprintln!("{note}");
    }
    write_output(args.out.as_deref(), &issued.text)
}

/// Logs to standard error, or to daily files in `log.dir`, as text or JSON, and forwards
/// every ERROR event to the returned channel (which `serve` turns into emails to the alert
/// recipients).
/// Returns the ERROR events for the notifier, and whether the log goes to files.
pub fn init_tracing(
    config: &Config,
    serving: bool,
) -> Result<(UnboundedReceiver<ErrorEvent>, bool)> {
    use std::io::IsTerminal;
    use tracing_subscriber::fmt::writer::BoxMakeWriter;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (events, errors) = tokio::sync::mpsc::unbounded_channel();
    // Log files are the service's: another command logs to standard error, where its
    // operator reads it (its changes are in the audit log), and makes no file the service
    // could not write after it (run as root, it would be root's). Log files in the data
    // directory: `serve` makes the directory (private) first.
    let log_dir = config.log_dir().filter(|_| serving);
    if log_dir
        .as_ref()
        .is_some_and(|dir| dir.starts_with(&config.data_dir))
    {
        appliance::create_private_dir(&config.data_dir)?;
    }
    let to_files = log_dir.is_some();
    let (writer, ansi) = match log_dir {
        Some(dir) => {
            // Made first: the appender looks for old files to remove before it makes it.
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot make the log directory {}", dir.display()))?;
            let files = tracing_appender::rolling::Builder::new()
                .rotation(tracing_appender::rolling::Rotation::DAILY)
                .filename_prefix("keygate")
                .filename_suffix("log")
                .max_log_files(crate::config::LOG_FILES_KEPT)
                .build(&dir)
                .with_context(|| format!("cannot write the log into {}", dir.display()))?;
            (BoxMakeWriter::new(files), false)
        }
        None => (
            BoxMakeWriter::new(std::io::stderr),
            std::io::stderr().is_terminal(),
        ),
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(writer);
    let fmt = match config.log.format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    // The log level filters what is logged, not what is emailed: every ERROR event reaches
    // the notifier, even with `log.level = "off"`.
    tracing_subscriber::registry()
        .with(fmt.with_filter(tracing_subscriber::EnvFilter::new(&config.log.level)))
        .with(ErrorCapture(events).with_filter(tracing_subscriber::filter::LevelFilter::ERROR))
        .init();
    Ok((errors, to_files))
}

/// `keygate serve`: serves until stopped. Ending with an error (at start, mostly) is emailed
/// to the alert recipients at once, as far as the database lets it be read.
pub fn serve(config: Config, errors: UnboundedReceiver<ErrorEvent>) -> Result<()> {
    let told = config.clone();
    let result = serve_until_stopped(config, errors);
    if let Err(e) = &result {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        match crate::jobs::tell_failed_serve(&told, &format!("{e:#}"), now) {
            Ok(true) => tracing::info!("the alert recipients were emailed why keygate stops"),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "could not email why keygate stops"),
        }
    }
    result
}

fn serve_until_stopped(config: Config, errors: UnboundedReceiver<ErrorEvent>) -> Result<()> {
    // The stop signals are caught from before the listener is bound and the service manager
    // told: a stop that comes at once is a clean one too.
    let system = actix_web::rt::System::new();
    let stop = system.block_on(async { stop_signals() })?;
    let listen = config.listen;
    let state = crate::AppState::open(config, Arc::new(SystemClock))?.with_error_events(errors);
    let listener = std::net::TcpListener::bind(listen)
        .with_context(|| {
            format!("cannot listen on {listen} (choose another address with --listen or `listen` in the configuration)")
        })?;
    let local = listener.local_addr()?;
    // The banner is for whoever started keygate by hand; a closed or full standard output
    // does not stop the service (its log lines are dropped the same way).
    let mut banner = format!(
        "keygate {} listening on https://{local}\ninstallation id: {}\ndata directory:  {}\ncertificate:     {}{}\n",
        env!("CARGO_PKG_VERSION"),
        state.appliance.installation_id(),
        state.config.data_dir.display(),
        state.cert_source.cert.display(),
        if state.cert_source.self_signed {
            " (self-signed)"
        } else {
            ""
        }
    );
    let conn = store::open(&state.config.database_path())?;
    // The one-time link is a secret: shown on a terminal only, never written to a log (a
    // service's journal is readable by more than root). It exists until the first admin does.
    if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        if let Some(path) =
            crate::portal::auth::setup_link(&conn, state.clock.now().unix_timestamp())?
        {
            banner += &format!(
                "first admin:     {}\n",
                first_admin_link(&state.config, local.port(), &path)
            );
        }
    } else if crate::store::admins::admin_count(&conn)? == 0 {
        banner += "first admin:     none yet: `keygate admin setup-link` at the console prints a \
             one-time link to create it in the portal (or `keygate admin create NAME --role \
             owner`)\n";
    }
    let _ = std::io::stdout().write_all(banner.as_bytes());
    drop(conn);
    tracing::info!(%local, installation_id = state.appliance.installation_id(), "serving");
    // The listener is bound: tell the service manager (systemd's Type=notify, Windows' SCM).
    #[cfg(unix)]
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
    #[cfg(windows)]
    crate::windows::report_running();
    let shutdown = async {
        stop.await;
        #[cfg(unix)]
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    };
    // The Windows service's Stop control shuts down the same way as Ctrl-C.
    #[cfg(windows)]
    let shutdown = crate::windows::until_stopped(shutdown);
    let state = actix_web::web::Data::new(state);
    system.block_on(crate::serve(state, listener, shutdown))?;
    tracing::info!("stopped");
    Ok(())
}

/// Installs the handlers of Ctrl-C and SIGTERM now (in the runtime that serves) and returns
/// what completes at the first of them.
fn stop_signals() -> std::io::Result<impl Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (mut term, mut interrupt) = (
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        );
        Ok(async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = term.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        let ctrl_c = tokio::signal::windows::ctrl_c()?;
        Ok(async move {
            let mut ctrl_c = ctrl_c;
            ctrl_c.recv().await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_second_appliance_beside_an_installed_one() {
        let dir = tempfile::tempdir().unwrap();
        let installed = dir.path().join("keygate.toml");
        let data_dir = dir.path().join("keygate-data");
        assert!(not_beside_an_installed_appliance(&data_dir, &installed).is_ok());
        std::fs::write(&installed, "").unwrap();
        let refused = not_beside_an_installed_appliance(&data_dir, &installed).unwrap_err();
        assert!(refused.to_string().contains("--config"), "{refused}");
        std::fs::create_dir(&data_dir).unwrap();
        assert!(
            not_beside_an_installed_appliance(&data_dir, &installed).is_ok(),
            "an existing data directory is one the operator made"
        );
    }
}
