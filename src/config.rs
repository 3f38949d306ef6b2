//! Typed configuration: defaults, then the TOML file, then `KEYGATE_*` environment variables,
//! then command-line flags. Unknown keys and unknown `KEYGATE_*` variables are errors, so a
//! typo never silently falls back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // `error`, not `source`: the message names it already, and a source would be told again.
    #[error("cannot read config file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("config file {path} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {name} is invalid: {message}")]
    Env { name: String, message: String },
    #[error("unknown environment variable {0} (known: {known})", known = ENV_VARS.join(", "))]
    UnknownEnv(String),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the database, the appliance key, the certificate and backups live.
    pub data_dir: PathBuf,
    /// Address and port of the HTTPS listener (devices and portal).
    pub listen: SocketAddr,
    /// Connections one client address may hold open at once; one past them is closed as it
    /// is accepted.
    pub max_connections_per_address: u32,
    /// Vendor public keys (SPKI PEM files) trusted in addition to those added with
    /// `keygate trust`.
    pub trusted_vendor_keys: Vec<PathBuf>,
    /// Base URL of the portal in email links (default `https://HOSTNAME:PORT`).
    pub public_url: Option<String>,
    pub tls: TlsConfig,
    pub log: LogConfig,
    pub jobs: JobsConfig,
    pub metrics: MetricsConfig,
}

/// Who may read `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// A file holding a bearer token: with it, `/metrics` answers any address presenting
    /// `Authorization: Bearer TOKEN`; without it, this machine (loopback) only.
    pub token_file: Option<PathBuf>,
}

/// Scheduled work: how often each job runs and how many backups are kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    pub alerts_every_s: u64,
    pub backup_every_s: u64,
    pub housekeeping_every_s: u64,
    /// Backups kept: the newest `backup_keep_last`, and the newest of each of the last
    /// `backup_keep_days` days that have a backup (today's included).
    pub backup_keep_last: usize,
    pub backup_keep_days: i64,
    /// Audit log entries older than this many days are removed by the daily housekeeping.
    pub audit_keep_days: i64,
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig {
            alerts_every_s: 600,
            backup_every_s: 720,
            housekeeping_every_s: 86_400,
            backup_keep_last: 10,
            backup_keep_days: 14,
            audit_keep_days: 730,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// A PEM certificate chain replacing the self-signed certificate (needs `key`).
    pub cert: Option<PathBuf>,
    /// The PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// Extra DNS names or addresses for the self-signed certificate made on first start.
    pub extra_names: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter: `info`, `keygate=debug,actix_web=warn`, ...
    pub level: String,
    pub format: LogFormat,
    /// Write the log into daily files in this directory (relative: to `data_dir`), the
    /// newest [`LOG_FILES_KEPT`] kept, instead of to standard error (which a Windows
    /// service has nowhere to send).
    pub dir: Option<PathBuf>,
}

/// Daily log files kept in `log.dir`.
pub const LOG_FILES_KEPT: usize = 14;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./keygate-data"),
            listen: "0.0.0.0:8443".parse().expect("a valid default address"),
            max_connections_per_address: 1024,
            trusted_vendor_keys: Vec::new(),
            public_url: None,
            tls: TlsConfig::default(),
            log: LogConfig::default(),
            jobs: JobsConfig::default(),
            metrics: MetricsConfig::default(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            // The per-request access log (keygate::http) is off by default: a million
            // devices make 5,556 requests a second. `info,keygate::http=info` turns it on.
            level: "info,keygate::http=warn,tokio_cron_scheduler=warn".into(),
            format: LogFormat::Text,
            dir: None,
        }
    }
}

/// Every environment variable keygate reads.
pub const ENV_VARS: &[&str] = &[
    "KEYGATE_CONFIG",
    "KEYGATE_DATA_DIR",
    "KEYGATE_LISTEN",
    "KEYGATE_TRUSTED_VENDOR_KEYS",
    "KEYGATE_PUBLIC_URL",
    "KEYGATE_TLS_CERT",
    "KEYGATE_TLS_KEY",
    "KEYGATE_LOG_LEVEL",
    "KEYGATE_LOG_FORMAT",
    "KEYGATE_LOG_DIR",
    "KEYGATE_METRICS_TOKEN_FILE",
];

/// Overrides given on the command line, applied last.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub log_format: Option<LogFormat>,
}

/// The most `max_connections_per_address`: more than the file descriptors the service may
/// open (the systemd unit's 65,536) would mean no limit.
pub const MAX_CONNECTIONS_PER_ADDRESS: u32 = 65_536;

/// The longest `jobs.backup_keep_days` and `jobs.audit_keep_days`: a century (older dates are out of reach anyway).
pub const MAX_KEEP_DAYS: i64 = 36_500;

/// The longest interval a scheduled job may have: a year.
pub const MAX_JOB_INTERVAL_S: u64 = 365 * 86_400;

impl Config {
    /// Builds the effective configuration from an optional file, an environment and flags.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Config, ConfigError> {
        let mut config = match file {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        config.apply_env(env)?;
        if let Some(dir) = &overrides.data_dir {
            config.data_dir = dir.clone();
        }
        if let Some(listen) = overrides.listen {
            config.listen = listen;
        }
        if let Some(format) = overrides.log_format {
            config.log.format = format;
        }
        config.validate()?;
        Ok(config)
    }

    fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        let mut config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: toml_error(&text, &e),
        })?;
        // Relative paths in a file (the default data_dir included) are the file's
        // directory's, not the working directory of whoever started keygate: a packaged
        // configuration left without its absolute `data_dir` must not make the service set
        // up a new appliance beside its working directory.
        let dir = path.parent().unwrap_or(Path::new(""));
        let paths = [&mut config.data_dir]
            .into_iter()
            .chain(&mut config.trusted_vendor_keys)
            .chain(&mut config.tls.cert)
            .chain(&mut config.tls.key)
            .chain(&mut config.metrics.token_file);
        for path in paths {
            if path.is_relative() {
                *path = dir.join(&*path);
            }
        }
        Ok(config)
    }

    fn apply_env(
        &mut self,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), ConfigError> {
        for (name, value) in env {
            if !name.starts_with("KEYGATE_") {
                continue;
            }
            let bad = |message: String| ConfigError::Env {
                name: name.clone(),
                message,
            };
            match name.as_str() {
                "KEYGATE_CONFIG" => {} // read by the command line, before this
                "KEYGATE_DATA_DIR" => self.data_dir = value.into(),
                "KEYGATE_LISTEN" => self.listen = value.parse().map_err(|e| bad(format!("{e}")))?,
                "KEYGATE_TRUSTED_VENDOR_KEYS" => {
                    // Empty (`KEYGATE_TRUSTED_VENDOR_KEYS=`): none, not one with no path.
                    self.trusted_vendor_keys = std::env::split_paths(&value)
                        .filter(|path| !path.as_os_str().is_empty())
                        .collect()
                }
                "KEYGATE_PUBLIC_URL" => self.public_url = Some(value),
                "KEYGATE_TLS_CERT" => self.tls.cert = Some(value.into()),
                "KEYGATE_TLS_KEY" => self.tls.key = Some(value.into()),
                "KEYGATE_LOG_LEVEL" => self.log.level = value,
                "KEYGATE_LOG_DIR" => self.log.dir = Some(value.into()),
                "KEYGATE_METRICS_TOKEN_FILE" => self.metrics.token_file = Some(value.into()),
                "KEYGATE_LOG_FORMAT" => {
                    self.log.format = match value.as_str() {
                        "text" => LogFormat::Text,
                        "json" => LogFormat::Json,
                        _ => return Err(bad("expected \"text\" or \"json\"".into())),
                    }
                }
                _ => return Err(ConfigError::UnknownEnv(name)),
            }
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err(ConfigError::Invalid(
                "tls.cert and tls.key go together: set both or neither".into(),
            ));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::Invalid("data_dir is empty".into()));
        }
        // What a certificate can name (checked here: the certificate is made at a start).
        if let Some(name) = self.tls.extra_names.iter().find(|n| {
            n.parse::<std::net::IpAddr>().is_err()
                && !crate::licensing::handshake::is_host_name(n.strip_prefix("*.").unwrap_or(n))
        }) {
            return Err(ConfigError::Invalid(format!(
                "tls.extra_names: {name:?} is neither an address nor a DNS name (letters, \
                 digits, '-' and dots; an international name in its xn-- form)"
            )));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| ConfigError::Invalid(format!("log.level {:?}: {e}", self.log.level)))?;
        let jobs = &self.jobs;
        let intervals = [
            jobs.alerts_every_s,
            jobs.backup_every_s,
            jobs.housekeeping_every_s,
        ];
        if intervals
            .iter()
            .any(|s| !(1..=MAX_JOB_INTERVAL_S).contains(s))
        {
            return Err(ConfigError::Invalid(format!(
                "jobs.alerts_every_s, backup_every_s and housekeeping_every_s are from 1 to \
                 {MAX_JOB_INTERVAL_S} seconds (a year)"
            )));
        }
        if self.jobs.backup_keep_last == 0
            || !(0..=MAX_KEEP_DAYS).contains(&self.jobs.backup_keep_days)
        {
            // 0 would delete each backup as soon as it is taken (with keep_days 0).
            return Err(ConfigError::Invalid(format!(
                "jobs.backup_keep_last must be at least 1 and jobs.backup_keep_days from 0 to \
                 {MAX_KEEP_DAYS} (a century)"
            )));
        }
        if !(1..=MAX_CONNECTIONS_PER_ADDRESS).contains(&self.max_connections_per_address) {
            return Err(ConfigError::Invalid(format!(
                "max_connections_per_address is from 1 to {MAX_CONNECTIONS_PER_ADDRESS}"
            )));
        }
        if !(1..=MAX_KEEP_DAYS).contains(&self.jobs.audit_keep_days) {
            return Err(ConfigError::Invalid(format!(
                "jobs.audit_keep_days is from 1 to {MAX_KEEP_DAYS} (a century)"
            )));
        }
        if let Some(url) = &self.public_url {
            // http:// too: a proxy in front may serve the portal under another scheme.
            let lower = url.to_ascii_lowercase();
            let host = ["https://", "http://"]
                .iter()
                .find_map(|scheme| lower.strip_prefix(scheme))
                .unwrap_or("");
            if host.is_empty()
                || host.starts_with('/')
                || url.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(ConfigError::Invalid(format!(
                    "public_url {url:?} must be the portal's address, e.g. \
                     https://keygate.plant.lan:8443"
                )));
            }
        }
        Ok(())
    }

    /// The effective configuration as TOML (`keygate config dump`); a path TOML cannot hold
    /// (not UTF-8) is an error.
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string_pretty(self)
            .map_err(|e| ConfigError::Invalid(format!("it cannot be written as TOML: {e}")))
    }

    /// Where the log files go, if not to standard error (`log.dir`, relative to `data_dir`).
    pub fn log_dir(&self) -> Option<PathBuf> {
        self.log.dir.as_ref().map(|dir| self.data_dir.join(dir))
    }

    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("keygate.db")
    }
}

/// A TOML error on one line, with where it is: "line 3, column 18: invalid type: ...".
pub fn toml_error(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: {}", e.message())
        }
        None => e.message().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_file_says_where() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keygate.toml");
        std::fs::write(&path, "# jobs\n[jobs]\nbackup_every_s = \"12m\"\n").unwrap();
        let message = Config::from_file(&path).unwrap_err().to_string();
        assert!(
            message.contains("line 3, column 18: invalid type: string \"12m\", expected u64"),
            "{message}"
        );
        std::fs::write(&path, "[jobs\n").unwrap();
        let message = Config::from_file(&path).unwrap_err().to_string();
        assert!(message.contains("line 1, column 6: "), "{message}");
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The packaged files (Debian's and Windows') are valid as shipped and with every
    /// commented key set, and a commented key that is not an example (a path, a name, an
    /// address of this site) shows the built-in default.
    #[test]
    fn the_packaged_files_show_real_keys_and_their_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keygate.toml");
        let examples = [
            "trusted_vendor_keys",
            "public_url",
            "cert",
            "key",
            "extra_names",
            "dir",
            "token_file",
        ];
        for (name, text) in [
            ("debian", include_str!("../packaging/keygate.toml")),
            ("windows", include_str!("../packaging/wix/keygate.toml")),
        ] {
            std::fs::write(&path, text).unwrap();
            Config::from_file(&path).unwrap().validate().unwrap();
            // Every `#key = value` line set, but the examples.
            let set: String = text
                .lines()
                .map(|line| match line.strip_prefix('#') {
                    Some(key) if key.contains(" = ") && !key.starts_with(' ') => {
                        let key_name = key.split(" = ").next().unwrap();
                        if examples.contains(&key_name) {
                            line.to_string()
                        } else {
                            key.to_string()
                        }
                    }
                    _ => line.to_string(),
                })
                .collect::<Vec<_>>()
                .join("\n");
            std::fs::write(&path, &set).unwrap();
            let config = Config::from_file(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
            config.validate().unwrap();
            let default = Config::default();
            assert_eq!(config.listen, default.listen, "{name}");
            assert_eq!(
                config.max_connections_per_address, default.max_connections_per_address,
                "{name}"
            );
            assert_eq!(config.log.level, default.log.level, "{name}");
            assert_eq!(config.log.format, default.log.format, "{name}");
            assert_eq!(config.jobs, default.jobs, "{name}");
            // And the examples are real keys with valid values too.
            let all: String = text
                .lines()
                .map(|line| match line.strip_prefix('#') {
                    Some(key) if key.contains(" = ") && !key.starts_with(' ') => key,
                    _ => line,
                })
                .collect::<Vec<_>>()
                .join("\n");
            std::fs::write(&path, &all).unwrap();
            Config::from_file(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn defaults_need_no_file() {
        let config = Config::load(None, env(&[]), &Overrides::default()).unwrap();
        assert_eq!(config.data_dir, PathBuf::from("./keygate-data"));
        assert_eq!(config.listen.to_string(), "0.0.0.0:8443");
        assert_eq!(
            config.database_path(),
            PathBuf::from("./keygate-data/keygate.db")
        );
    }

    #[test]
    fn relative_paths_in_a_file_are_the_files_directorys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keygate.toml");
        let at = |p: &str| dir.path().join(p);
        std::fs::write(
            &path,
            "[metrics]\ntoken_file = \"/etc/keygate/metrics.token\"\n",
        )
        .unwrap();
        let config = Config::load(Some(&path), env(&[]), &Overrides::default()).unwrap();
        assert_eq!(config.data_dir, at("./keygate-data"), "the default too");
        assert_eq!(
            config.metrics.token_file.unwrap(),
            PathBuf::from("/etc/keygate/metrics.token"),
            "an absolute path stays"
        );
        std::fs::write(
            &path,
            "data_dir = \"data\"\ntrusted_vendor_keys = [\"keys/acme.pub\"]\n\
             [tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n[metrics]\ntoken_file = \"token\"\n",
        )
        .unwrap();
        let config = Config::load(Some(&path), env(&[]), &Overrides::default()).unwrap();
        assert_eq!(config.data_dir, at("data"));
        assert_eq!(config.trusted_vendor_keys, [at("keys/acme.pub")]);
        assert_eq!(
            (config.tls.cert.unwrap(), config.tls.key.unwrap()),
            (at("cert.pem"), at("key.pem"))
        );
        assert_eq!(config.metrics.token_file.unwrap(), at("token"));
        // The environment's and the flags' stay the working directory's.
        let config = Config::load(
            Some(&path),
            env(&[("KEYGATE_DATA_DIR", "here")]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(config.data_dir, PathBuf::from("here"));
    }

    #[test]
    fn an_empty_vendor_keys_variable_names_no_key() {
        let keys = |value: &str| {
            Config::load(
                None,
                env(&[("KEYGATE_TRUSTED_VENDOR_KEYS", value)]),
                &Overrides::default(),
            )
            .unwrap()
            .trusted_vendor_keys
        };
        assert!(keys("").is_empty());
        assert_eq!(
            keys("/etc/a.pub::/etc/b.pub"),
            [PathBuf::from("/etc/a.pub"), PathBuf::from("/etc/b.pub")]
        );
    }

    #[test]
    fn file_then_env_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keygate.toml");
        std::fs::write(
            &path,
            "data_dir = \"/from/file\"\nlisten = \"127.0.0.1:1000\"\n[log]\nlevel = \"debug\"\n",
        )
        .unwrap();
        let config = Config::load(
            Some(&path),
            env(&[("KEYGATE_LISTEN", "127.0.0.1:2000"), ("PATH", "/bin")]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/from/file"));
        assert_eq!(config.listen.port(), 2000);
        assert_eq!(config.log.level, "debug");

        let flags = Overrides {
            listen: Some("127.0.0.1:3000".parse().unwrap()),
            ..Overrides::default()
        };
        let config = Config::load(
            Some(&path),
            env(&[("KEYGATE_LISTEN", "127.0.0.1:2000")]),
            &flags,
        )
        .unwrap();
        assert_eq!(config.listen.port(), 3000);
    }

    #[test]
    fn unknown_keys_and_variables_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keygate.toml");
        std::fs::write(&path, "data_dri = \"/typo\"\n").unwrap();
        let err = Config::load(Some(&path), env(&[]), &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("data_dri"), "{err}");

        let err =
            Config::load(None, env(&[("KEYGATE_LISTNE", "x")]), &Overrides::default()).unwrap_err();
        assert!(matches!(err, ConfigError::UnknownEnv(ref n) if n == "KEYGATE_LISTNE"));

        let err = Config::load(
            None,
            env(&[("KEYGATE_LISTEN", "nope")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("KEYGATE_LISTEN"), "{err}");
    }

    #[test]
    fn retention_that_keeps_no_backup_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keygate.toml");
        std::fs::write(
            &path,
            "[jobs]\nbackup_keep_last = 0\nbackup_keep_days = 0\n",
        )
        .unwrap();
        let err = Config::load(Some(&path), env(&[]), &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("backup_keep_last"), "{err}");
        // A job every 0 seconds is no schedule (it ran every second), one past a year none
        // the scheduler keeps.
        for every in ["0", "31536001", "18446744073709551615"] {
            std::fs::write(&path, format!("[jobs]\nbackup_every_s = {every}\n")).unwrap();
            let err = Config::load(Some(&path), env(&[]), &Overrides::default()).unwrap_err();
            assert!(err.to_string().contains("backup_every_s"), "{every}: {err}");
        }
        // Days past any date the clock reaches made every backup run fail its pruning.
        for days in ["-1", "36501", "5000000"] {
            std::fs::write(&path, format!("[jobs]\nbackup_keep_days = {days}\n")).unwrap();
            let err = Config::load(Some(&path), env(&[]), &Overrides::default()).unwrap_err();
            assert!(
                err.to_string().contains("backup_keep_days from 0"),
                "{days}: {err}"
            );
        }
        // An audit log kept 0 days would lose every entry at the next housekeeping.
        for days in ["0", "36501"] {
            std::fs::write(&path, format!("[jobs]\naudit_keep_days = {days}\n")).unwrap();
            let err = Config::load(Some(&path), env(&[]), &Overrides::default()).unwrap_err();
            assert!(err.to_string().contains("audit_keep_days"), "{days}: {err}");
        }
        for limit in ["0", "65537"] {
            std::fs::write(&path, format!("max_connections_per_address = {limit}\n")).unwrap();
            let err = Config::load(Some(&path), env(&[]), &Overrides::default()).unwrap_err();
            assert!(
                err.to_string()
                    .contains("max_connections_per_address is from 1"),
                "{limit}: {err}"
            );
        }
        std::fs::write(&path, "[jobs]\naudit_keep_days = 3650\n").unwrap();
        let config = Config::load(Some(&path), env(&[]), &Overrides::default()).unwrap();
        assert_eq!(config.jobs.audit_keep_days, 3650);
    }

    #[test]
    fn the_public_url_is_a_web_address() {
        for bad in [
            "not a url",
            "ftp://keygate.lan",
            "https://",
            "https:///x",
            "https://a b",
        ] {
            let err = Config::load(
                None,
                env(&[("KEYGATE_PUBLIC_URL", bad)]),
                &Overrides::default(),
            )
            .unwrap_err();
            assert!(err.to_string().contains("public_url"), "{bad}: {err}");
        }
        for good in [
            "https://keygate.plant.lan:8443",
            "HTTPS://k.lan/",
            "http://proxy.lan",
        ] {
            let good = env(&[("KEYGATE_PUBLIC_URL", good)]);
            assert!(Config::load(None, good, &Overrides::default()).is_ok());
        }
    }

    #[test]
    fn half_a_certificate_is_refused() {
        let err = Config::load(
            None,
            env(&[("KEYGATE_TLS_CERT", "/etc/cert.pem")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("tls.cert and tls.key"), "{err}");
    }

    /// A name the certificate cannot carry is refused when the configuration loads, not at
    /// the start that makes the certificate (a service that could not start at all).
    #[test]
    fn extra_names_are_addresses_or_dns_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keygate.toml");
        let load = |names: &str| {
            std::fs::write(&path, format!("[tls]\nextra_names = [{names}]\n")).unwrap();
            Config::load(Some(&path), env(&[]), &Overrides::default())
        };
        let good =
            r#""keygate.plant.lan", "*.plant.lan", "xn--bro-hoa.lan", "10.0.0.5", "fd00::5""#;
        assert!(load(good).is_ok());
        for bad in [r#""büro.lan""#, r#""two words""#, r#""""#, r#""a..lan""#] {
            let err = load(bad).unwrap_err().to_string();
            assert!(err.contains("tls.extra_names"), "{bad}: {err}");
        }
        let config = load(good).unwrap();
        let names = [vec!["keygate".to_string()], config.tls.extra_names].concat();
        assert!(crate::tls::self_signed(&names, time::OffsetDateTime::now_utc()).is_ok());
    }

    /// The README's configuration example names every key where it belongs.
    #[test]
    fn the_readme_example_is_a_valid_config() {
        let readme = include_str!("../README.md");
        let example = readme
            .split("## Configuration")
            .nth(1)
            .and_then(|s| s.split("```toml\n").nth(1))
            .and_then(|s| s.split("```").next())
            .expect("README has a toml example under Configuration");
        let config: Config = toml::from_str(example).unwrap_or_else(|e| panic!("{e}"));
        assert!(config.public_url.is_some() && config.metrics.token_file.is_some());
        assert_eq!(config.jobs, JobsConfig::default());
    }

    #[test]
    fn dump_round_trips() {
        let config = Config::default();
        let again: Config = toml::from_str(&config.to_toml().unwrap()).unwrap();
        assert_eq!(again, config);
    }
}
