//! Shared test helpers: running the binary, HTTPS clients pinned to the appliance's own
//! certificate, database content digests, in-process servers with a controlled clock.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;

use keygate::AppState;
use keygate::clock::ManualClock;
use keygate::config::Config;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

pub const BIN: &str = env!("CARGO_BIN_EXE_keygate");

/// The default handshake code `keygate import` printed for a new organization.
pub fn default_code(run: &Run) -> String {
    assert!(run.ok, "{}", run.stderr);
    run.stdout
        .split("default handshake code is ")
        .nth(1)
        .unwrap_or_else(|| panic!("no default code in {:?}", run.stdout))
        .trim()
        .to_string()
}

/// The outcome of one `keygate` invocation.
pub struct Run {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            ok: o.status.success(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// A `keygate` command with no `KEYGATE_*` variables from the outer environment.
pub fn command() -> Command {
    let mut cmd = Command::new(BIN);
    for (name, _) in std::env::vars() {
        if name.starts_with("KEYGATE_") {
            cmd.env_remove(name);
        }
    }
    cmd.env("KEYGATE_LOG_LEVEL", "warn");
    cmd
}

/// Runs `keygate --data-dir DIR ARGS...`.
pub fn keygate(data_dir: &Path, args: &[&str]) -> Run {
    command()
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .output()
        .expect("keygate runs")
        .into()
}

/// Runs `keygate ARGS...` in `cwd` (vendor commands need no data directory).
pub fn keygate_in(cwd: &Path, args: &[&str]) -> Run {
    command()
        .current_dir(cwd)
        .args(args)
        .output()
        .expect("keygate runs")
        .into()
}

/// An HTTPS client that trusts exactly the given certificate (the appliance's own).
pub fn pinned_agent(cert_pem: &[u8]) -> ureq::Agent {
    let cert = ureq::tls::Certificate::from_pem(cert_pem)
        .expect("a PEM certificate")
        .to_owned();
    let tls = ureq::tls::TlsConfig::builder()
        .root_certs(ureq::tls::RootCerts::Specific(Arc::new(vec![cert])))
        .build();
    ureq::Agent::config_builder()
        .tls_config(tls)
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(30)))
        .build()
        .into()
}

/// The self-signed certificate an appliance made in its data directory.
pub fn appliance_cert(data_dir: &Path) -> Vec<u8> {
    std::fs::read(data_dir.join("tls/cert.pem")).expect("the appliance made its certificate")
}

/// GETs a JSON document.
pub fn get_json(agent: &ureq::Agent, url: &str) -> (u16, serde_json::Value) {
    let mut response = agent.get(url).call().expect("the request is answered");
    let status = response.status().as_u16();
    (
        status,
        response.body_mut().read_json().expect("a JSON body"),
    )
}

/// `keygate backup` on `data_dir`: the backup file it wrote (the only one there).
pub fn backup_now(data_dir: &Path) -> PathBuf {
    let run = keygate(data_dir, &["backup"]);
    assert!(run.ok, "{}", run.stderr);
    keygate::store::backup::list(&data_dir.join("backups")).unwrap()[0]
        .path
        .clone()
}

/// A digest of every row of every table: equal digests mean equal database content.
pub fn db_digest(path: &Path) -> String {
    let conn = rusqlite::Connection::open(path).expect("the database opens");
    let mut tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    tables.sort();
    let mut hasher = Sha256::new();
    for table in tables {
        hasher.update(table.as_bytes());
        // The newest time the appliance has used is saved every minute, whatever else happens.
        let filter = if table == "settings" {
            format!(" WHERE key <> '{}'", keygate::clock::NEWEST_TIME)
        } else {
            String::new()
        };
        let mut stmt = conn
            .prepare(&format!("SELECT * FROM \"{table}\"{filter} ORDER BY 1, 2"))
            .unwrap();
        let columns = stmt.column_count();
        let mut rows = stmt.query([]).unwrap();
        while let Some(row) = rows.next().unwrap() {
            for i in 0..columns {
                let value: rusqlite::types::Value = row.get(i).unwrap();
                hasher.update(format!("{value:?}|").as_bytes());
            }
            hasher.update(b"\n");
        }
    }
    data_encoding::HEXLOWER.encode(&hasher.finalize())
}

/// A vendor with a key pair made by `keygate vendor keygen`, in its own directory.
pub struct Vendor {
    pub dir: tempfile::TempDir,
}

impl Vendor {
    pub fn new() -> Vendor {
        let dir = tempfile::tempdir().unwrap();
        let run = keygate_in(dir.path(), &["vendor", "keygen", "--out", "vendor"]);
        assert!(run.ok, "keygen: {}", run.stderr);
        Vendor { dir }
    }

    pub fn key_path(&self) -> PathBuf {
        self.dir.path().join("vendor.key")
    }

    pub fn pub_path(&self) -> PathBuf {
        self.dir.path().join("vendor.pub")
    }

    pub fn signing_key(&self) -> keygate_sdk::SigningKey {
        keygate_sdk::keys::signing_key_from_pem(&std::fs::read_to_string(self.key_path()).unwrap())
            .unwrap()
    }

    /// Issues a license with `keygate vendor issue` for the appliance in `data_dir`.
    pub fn issue(&self, data_dir: &Path, items_toml: &str, extra: &[&str]) -> Run {
        let request = self.dir.path().join("request.txt");
        let run = keygate(
            data_dir,
            &["activation-request", "--out", request.to_str().unwrap()],
        );
        assert!(run.ok, "activation-request: {}", run.stderr);
        let items = self.dir.path().join("items.toml");
        std::fs::write(&items, items_toml).unwrap();
        let mut args = vec![
            "vendor",
            "issue",
            "--key",
            self.key_path().to_str().unwrap(),
            "--request",
            request.to_str().unwrap(),
            "--items",
            items.to_str().unwrap(),
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        keygate_in(self.dir.path(), &args)
    }

    /// Issues a license and writes it to `name` in the vendor's directory.
    pub fn issue_file(
        &self,
        data_dir: &Path,
        items_toml: &str,
        extra: &[&str],
        name: &str,
    ) -> PathBuf {
        let run = self.issue(data_dir, items_toml, extra);
        assert!(run.ok, "vendor issue: {}", run.stderr);
        let path = self.dir.path().join(name);
        std::fs::write(&path, run.stdout).unwrap();
        path
    }

    /// Signs an arbitrary payload as a license, bypassing `vendor issue`'s own checks, to
    /// test what the appliance refuses.
    pub fn sign_raw_license(&self, payload: &serde_json::Value) -> String {
        keygate_sdk::jws::sign(keygate_sdk::jws::Typ::License, payload, &self.signing_key()) + "\n"
    }

    /// Signs payload bytes as they are (a key twice, say) under a license header naming
    /// `crit` extensions if given.
    pub fn sign_license_bytes(&self, payload: &[u8], crit: Option<serde_json::Value>) -> String {
        let key = self.signing_key();
        let header = keygate_sdk::jws::Header {
            alg: "EdDSA".into(),
            typ: Some("keygate-license".into()),
            kid: Some(keygate_sdk::keys::kid(&key.verifying_key())),
            crit,
        };
        keygate_sdk::jws::sign_raw(&header, payload, &key) + "\n"
    }
}

/// One per_device item for a customer, in the items-file format.
pub const SIMPLE_ITEMS: &str = r#"
license_id = "LIC-0042"
vendor = "Acme Imaging"
organization_id = "200001"

[[items]]
product = "barcode-reader"
model = "per_device"
quota = 100
starts_at = 2026-01-01T00:00:00Z
expires_at = 2036-01-01T00:00:00Z
offline_days = 7
features = ["qr", "pdf417"]
"#;

/// Debian's libfaketime (package `faketime`, installed by scripts/test): shifts the wall
/// clock of the process it is preloaded into by the offset in a file, read on every call.
const FAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// The environment that runs a process on a wall clock shifted by the offset (`+3600`, say)
/// written in the file `offset`; its monotonic clock is left alone.
pub fn faketime(offset: &Path) -> [(&'static str, &Path); 4] {
    assert!(
        Path::new(FAKETIME).exists(),
        "{FAKETIME} is missing: run scripts/test, which installs Debian's faketime"
    );
    [
        ("LD_PRELOAD", Path::new(FAKETIME)),
        ("FAKETIME_TIMESTAMP_FILE", offset),
        ("FAKETIME_NO_CACHE", Path::new("1")),
        ("FAKETIME_DONT_FAKE_MONOTONIC", Path::new("1")),
    ]
}

/// The real binary serving on a port the system chose.
pub struct Served {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Served {
    pub fn start(data_dir: &Path) -> Served {
        Served::start_on(data_dir, "127.0.0.1:0")
    }

    /// Serves on a given address (a restart on the port devices already know).
    pub fn start_on(data_dir: &Path, listen: &str) -> Served {
        Served::start_with(data_dir, listen, &[])
    }

    /// Serves with `KEYGATE_*` settings from the environment. A given port a test freed
    /// may be held a moment by another test's connection: tried again for a few seconds.
    pub fn start_with(data_dir: &Path, listen: &str, env: &[(&str, &Path)]) -> Served {
        let tries = if listen.ends_with(":0") { 1 } else { 50 };
        for _ in 1..tries {
            if let Some(served) = Served::try_start(data_dir, listen, env) {
                return served;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        Served::try_start(data_dir, listen, env).expect("serve prints where it listens")
    }

    /// `None` when the server exits before listening.
    fn try_start(data_dir: &Path, listen: &str, env: &[(&str, &Path)]) -> Option<Served> {
        let mut child = command()
            .envs(env.iter().copied())
            .arg("--data-dir")
            .arg(data_dir)
            .args(["serve", "--listen", listen])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("keygate serve starts");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let addr = loop {
            let Some(line) = lines.next() else {
                let _ = child.wait();
                return None;
            };
            if let Some(rest) = line.unwrap().split("listening on https://").nth(1) {
                break rest.trim().parse().expect("an address");
            }
        };
        // Keep reading so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Some(Served { child, addr })
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, as systemd stops the service: a graceful stop.
    pub fn terminate(mut self) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let status = self.child.wait().unwrap();
        assert!(status.success(), "a clean exit: {status:?}");
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The server in this process, on port 0, with a clock the test controls.
pub struct TestApp {
    pub addr: SocketAddr,
    pub clock: ManualClock,
    pub data_dir: PathBuf,
    pub agent: ureq::Agent,
    /// The server's own state, for running its jobs directly.
    pub state: actix_web::web::Data<AppState>,
    /// Where test errors enter the error notifier.
    pub errors: tokio::sync::mpsc::UnboundedSender<keygate::alerts::notices::ErrorEvent>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The default start of a test's clock.
pub fn test_epoch() -> OffsetDateTime {
    time::macros::datetime!(2026-06-01 12:00:00 UTC)
}

impl TestApp {
    pub fn spawn(data_dir: &Path) -> TestApp {
        TestApp::spawn_at(data_dir, test_epoch())
    }

    /// Serves `data_dir` with the clock at `start`.
    pub fn spawn_at(data_dir: &Path, start: OffsetDateTime) -> TestApp {
        let clock = ManualClock::new(start);
        let config = Config {
            data_dir: data_dir.to_path_buf(),
            ..Config::default()
        };
        let (errors, events) = tokio::sync::mpsc::unbounded_channel();
        let state = actix_web::web::Data::new(
            AppState::open(config, Arc::new(clock.clone()))
                .expect("the appliance opens")
                .with_error_events(events),
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = state.clone();
        let thread = std::thread::spawn(move || {
            actix_web::rt::System::new()
                .block_on(keygate::serve(served, listener, async {
                    let _ = stopped.await;
                }))
                .expect("the server runs");
        });
        let app = TestApp {
            addr,
            clock,
            agent: pinned_agent(&appliance_cert(data_dir)),
            data_dir: data_dir.to_path_buf(),
            state,
            errors,
            stop: Some(stop),
            thread: Some(thread),
        };
        // Serving (what it records at the start is written) before the test goes on.
        let waited = std::time::Instant::now();
        while app.agent.get(&app.url("/healthz")).call().is_err() {
            assert!(
                waited.elapsed() < std::time::Duration::from_secs(10),
                "never served"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        app
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }

    /// Runs a scheduled job now, as the scheduler would.
    pub fn run_job(&self, name: &str) -> Result<String, keygate::jobs::JobError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let job = keygate::jobs::Job::named(name).expect("a job's name");
        runtime.block_on(keygate::jobs::run(&self.state, job))
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// POSTs JSON and returns the status and JSON body.
pub fn post_json(
    agent: &ureq::Agent,
    url: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let mut response = agent
        .post(url)
        .send_json(body)
        .expect("the request is answered");
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .with_config()
        .limit(64 * 1024 * 1024)
        .read_json()
        .unwrap_or(serde_json::Value::Null);
    (status, body)
}

/// POSTs raw bytes with a content type (what a JSON value cannot hold: a key given twice, a
/// body in another media type) and returns the status and JSON body.
pub fn post_bytes(
    agent: &ureq::Agent,
    url: &str,
    content_type: &str,
    body: &[u8],
) -> (u16, serde_json::Value) {
    let mut response = agent
        .post(url)
        .header("content-type", content_type)
        .send(body)
        .expect("the request is answered");
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .read_json()
        .unwrap_or(serde_json::Value::Null);
    (status, body)
}

/// The n-th test device's UUID.
/// An HTTP/1.1 answer read from a kept-alive connection: head and body as text, read up to
/// its Content-Length (or until the connection closes after something was read).
pub fn read_answer(stream: &mut impl std::io::Read) -> std::io::Result<String> {
    let mut answer = Vec::new();
    let mut buffer = [0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut buffer)?;
        if n == 0 {
            return match answer.is_empty() {
                true => Err(std::io::ErrorKind::UnexpectedEof.into()),
                false => Ok(String::from_utf8_lossy(&answer).into_owned()),
            };
        }
        answer.extend_from_slice(&buffer[..n]);
        let text = String::from_utf8_lossy(&answer);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head.lines().find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())?
            });
            if length.is_some_and(|length| body.len() >= length) {
                return Ok(text.into_owned());
            }
        }
    }
}

pub fn device_uuid(n: u32) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

pub const NONCE: &str = "nonce-0123456789abcdef";

/// An appliance serving in this process with one license imported through the CLI.
pub struct Fixture {
    pub app: TestApp,
    pub vendor: Vendor,
    /// The organization's default handshake code.
    pub code: String,
    pub data: PathBuf,
    _dir: tempfile::TempDir,
}

/// An items file for organization 200001; `items` holds the `[[items]]` tables.
pub fn items_file(license_id: &str, items: &str) -> String {
    format!(
        "license_id = \"{license_id}\"\nvendor = \"Acme Imaging\"\norganization_id = \"200001\"\n{items}"
    )
}

/// One `[[items]]` table starting 2026-01-01 and expiring 2036-01-01 unless `extra`
/// overrides the dates.
pub fn item(product: &str, model: &str, quota: i64, extra: &str) -> String {
    let dates = if extra.contains("starts_at") || extra.contains("expires_at") {
        String::new()
    } else {
        "starts_at = 2026-01-01T00:00:00Z\nexpires_at = 2036-01-01T00:00:00Z\n".to_string()
    };
    format!(
        "[[items]]\nproduct = \"{product}\"\nmodel = \"{model}\"\nquota = {quota}\noffline_days = 7\n{dates}{extra}\n"
    )
}

impl Fixture {
    pub fn new(items: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let vendor = Vendor::new();
        let run = keygate(&data, &["trust", vendor.pub_path().to_str().unwrap()]);
        assert!(run.ok, "{}", run.stderr);
        let license = vendor.issue_file(&data, &items_file("LIC-T", items), &[], "lic.lic");
        let app = TestApp::spawn(&data);
        // Imported while the server runs: it must take effect without a restart.
        let run = keygate(&data, &["import", license.to_str().unwrap()]);
        let code = default_code(&run);
        Fixture {
            app,
            vendor,
            code,
            data,
            _dir: dir,
        }
    }

    /// An authorize request for device `n` on the default handshake code.
    pub fn request(&self, product: &str, n: u32) -> serde_json::Value {
        serde_json::json!({
            "handshake_code": self.code,
            "product": product,
            "device": {"uuid": device_uuid(n)},
            "nonce": NONCE,
        })
    }

    pub fn authorize(&self, body: &serde_json::Value) -> (u16, serde_json::Value) {
        post_json(&self.app.agent, &self.app.url("/api/v1/authorize"), body)
    }

    /// Authorizes device `n` for `product` and returns the verified authorization.
    pub fn authorized(&self, product: &str, n: u32) -> keygate_sdk::wire::Authorization {
        let (status, body) = self.authorize(&self.request(product, n));
        assert_eq!(status, 200, "device {n}: {body}");
        self.verify(&body, n)
    }

    /// The error code of a refused authorization of device `n`.
    pub fn refused(&self, product: &str, n: u32) -> String {
        let (status, body) = self.authorize(&self.request(product, n));
        assert_ne!(status, 200, "device {n} was authorized: {body}");
        body["error"]["code"].as_str().unwrap_or("").to_string()
    }

    /// Checks the whole chain as a device would, with only the vendor's public key.
    pub fn verify(&self, body: &serde_json::Value, n: u32) -> keygate_sdk::wire::Authorization {
        let vendor = keygate_sdk::keys::public_key_from_pem(
            &std::fs::read_to_string(self.vendor.pub_path()).unwrap(),
        )
        .unwrap();
        let (auth, _) = keygate_sdk::chain::verify_authorization(
            body["authorization"].as_str().expect("an authorization"),
            body["license"].as_str().expect("a license"),
            [&vendor],
            keygate_sdk::chain::Expectation {
                device_uuid: &device_uuid(n),
                nonce: Some(NONCE),
                now: self.app.clock_now(),
            },
        )
        .expect("the chain verifies");
        auth
    }

    pub fn usage(&self, body: &serde_json::Value) -> (u16, serde_json::Value) {
        post_json(&self.app.agent, &self.app.url("/api/v1/usage"), body)
    }

    pub fn release(&self, lease_id: &str, n: u32) -> (u16, serde_json::Value) {
        post_json(
            &self.app.agent,
            &self.app.url("/api/v1/release"),
            &serde_json::json!({"lease_id": lease_id, "device_uuid": device_uuid(n)}),
        )
    }

    /// A usage request of device `n` with reports `(seq, item, counter, amount)`.
    pub fn reports(
        &self,
        lease_id: &str,
        n: u32,
        stream: &str,
        reports: &[(u64, &str, &str, u64)],
    ) -> serde_json::Value {
        let now = self.app.clock_now();
        let reports: Vec<_> = reports
            .iter()
            .map(|(seq, item, counter, amount)| {
                serde_json::json!({
                    "seq": seq, "item_id": item,
                    "from": keygate::licensing::rfc3339(now - time::Duration::minutes(3)),
                    "to": keygate::licensing::rfc3339(now),
                    "counters": {*counter: amount},
                })
            })
            .collect();
        serde_json::json!({"lease_id": lease_id, "device_uuid": device_uuid(n), "stream": stream, "reports": reports})
    }

    /// Stops the server and starts it again on the same data directory, its clock at `start`.
    pub fn restart_at(self, start: OffsetDateTime) -> Fixture {
        let Fixture {
            app,
            vendor,
            code,
            data,
            _dir,
        } = self;
        drop(app);
        Fixture {
            app: TestApp::spawn_at(&data, start),
            vendor,
            code,
            data,
            _dir,
        }
    }

    /// Stops the server and hands back its data directory (kept on disk).
    pub fn stop(self) -> (tempfile::TempDir, PathBuf) {
        let Fixture {
            app, data, _dir, ..
        } = self;
        drop(app);
        (_dir, data)
    }

    pub fn db(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(self.data.join("keygate.db")).unwrap()
    }

    /// The audit log's `(action, target, detail)` entries with `action`, oldest first.
    pub fn audited(&self, action: &str) -> Vec<(String, String, String)> {
        self.db()
            .prepare("SELECT action, target, detail FROM audit_log WHERE action = ?1 ORDER BY id")
            .unwrap()
            .query_map([action], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// The vendor issues license `license_id` with `items` (and `flags`, e.g. a version) for
    /// this appliance, and IT imports it (while the server runs).
    pub fn import(&self, license_id: &str, items: &str, flags: &[&str]) {
        let name = format!("{license_id}-{}.lic", flags.join("-"));
        let file = self
            .vendor
            .issue_file(&self.data, &items_file(license_id, items), flags, &name);
        let run = keygate(&self.data, &["import", file.to_str().unwrap()]);
        assert!(run.ok, "{}", run.stderr);
    }

    /// A new handshake code of organization 200001, with `item_id` configured to it.
    pub fn assign_to_new_code(&self, item_id: &str, code: &str) {
        let run = keygate(
            &self.data,
            &["handshake", "create", "--organization", "200001", code],
        );
        assert!(run.ok, "{}", run.stderr);
        let run = keygate(&self.data, &["handshake", "assign", item_id, code]);
        assert!(run.ok, "{}", run.stderr);
    }

    /// A heartbeat of device `n` on its lease: the renewed authorization's payload, or the
    /// code of the `renewal_error`.
    pub fn heartbeat(&self, lease_id: &str, n: u32) -> Result<serde_json::Value, String> {
        let stream = format!("00000000-0000-4000-8000-{n:012}");
        let (status, body) = self.usage(&self.reports(lease_id, n, &stream, &[]));
        assert_eq!(status, 200, "{body}");
        match body["authorization"].as_str() {
            Some(jws) => {
                let token = keygate_sdk::jws::Token::decode(jws).unwrap();
                Ok(serde_json::from_slice(&token.payload).unwrap())
            }
            None => Err(body["renewal_error"]["code"].as_str().unwrap().to_string()),
        }
    }

    /// The usage recorded under counter `name`, all items and days together.
    pub fn recorded(&self, name: &str) -> i64 {
        self.db()
            .query_row(
                "SELECT coalesce(sum(total), 0) FROM usage_daily WHERE counter = ?1",
                [name],
                |r| r.get(0),
            )
            .unwrap()
    }

    /// An item's counter column, read from the database.
    pub fn item_value(&self, item_id: &str, column: &str) -> i64 {
        self.db()
            .query_row(
                &format!("SELECT {column} FROM items WHERE item_id = ?1"),
                [item_id],
                |r| r.get(0),
            )
            .unwrap()
    }
}

impl TestApp {
    pub fn clock_now(&self) -> OffsetDateTime {
        use keygate::clock::Clock;
        self.clock.now()
    }
}

/// `keygate handshake set-password CODE`, the password on standard input.
pub fn set_password(data_dir: &Path, code: &str, password: &str) -> Run {
    use std::io::Write;
    let mut child = command()
        .arg("--data-dir")
        .arg(data_dir)
        .args(["handshake", "set-password", code])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    child.wait_with_output().unwrap().into()
}

/// A real SMTP server (aiosmtpd) on a free local port, keeping each message as a file.
pub struct SmtpSink {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl SmtpSink {
    pub fn start() -> SmtpSink {
        SmtpSink::start_on(0, tempfile::tempdir().unwrap())
    }

    /// On a given port (a server coming back), into the same directory.
    pub fn start_on(port: u16, dir: tempfile::TempDir) -> SmtpSink {
        SmtpSink::start_with(port, dir, &[])
    }

    /// With the sink's environment settings (TLS, AUTH: see tests/smtp_sink.py). A given
    /// port a test freed may be held a moment by another test's connection: tried again
    /// for a few seconds.
    pub fn start_with(port: u16, dir: tempfile::TempDir, env: &[(&str, &str)]) -> SmtpSink {
        let tries = if port == 0 { 1 } else { 50 };
        for _ in 1..tries {
            if let Some((child, port)) = SmtpSink::try_start(port, &dir, env) {
                return SmtpSink { child, port, dir };
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        let (child, port) = SmtpSink::try_start(port, &dir, env).expect("the sink prints its port");
        SmtpSink { child, port, dir }
    }

    /// The sink and the port it printed, or `None` when it exits before listening.
    fn try_start(port: u16, dir: &tempfile::TempDir, env: &[(&str, &str)]) -> Option<(Child, u16)> {
        let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pyenv/bin/python");
        let mut child = Command::new(&python)
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/smtp_sink.py"))
            .arg(dir.path())
            .env("SMTP_PORT", port.to_string())
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (run scripts/test, which creates it)",
                    python.display()
                )
            });
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let Some(port) = line.trim().strip_prefix("PORT ") else {
            let _ = child.wait();
            return None;
        };
        Some((child, port.parse().unwrap()))
    }

    /// Stops the server, keeping what it received.
    pub fn stop(mut self) -> (u16, tempfile::TempDir) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        (self.port, dir)
    }

    /// The messages received so far, oldest first.
    pub fn messages(&self) -> Vec<String> {
        let mut names: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "eml"))
            .collect();
        names.sort();
        names
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect()
    }

    /// Waits (polling, bounded) until `n` messages have arrived.
    pub fn wait_for(&self, n: usize, limit: std::time::Duration) -> Vec<String> {
        let start = std::time::Instant::now();
        loop {
            let messages = self.messages();
            if messages.len() >= n || start.elapsed() > limit {
                return messages;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Points the appliance in `data_dir` at this server, with two recipients.
    pub fn configure(&self, data_dir: &Path) {
        let port = self.port.to_string();
        let run = keygate(
            data_dir,
            &[
                "alerts",
                "smtp",
                "--host",
                "127.0.0.1",
                "--port",
                &port,
                "--tls",
                "none",
                "--from",
                "keygate@plant.test",
            ],
        );
        assert!(run.ok, "{}", run.stderr);
        let run = keygate(
            data_dir,
            &["alerts", "recipients", "it@plant.test; boss@plant.test"],
        );
        assert!(run.ok, "{}", run.stderr);
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The plain-text part of a received message (quoted-printable soft breaks undone).
pub fn text_of(message: &str) -> String {
    message
        .replace("=\r\n", "")
        .replace("=\n", "")
        .replace("=3D", "=")
        .replace("=20", " ")
}

/// The Python interpreter with jwcrypto that the test command prepared.
pub fn python() -> PathBuf {
    let path = std::env::var_os("KEYGATE_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pyenv/bin/python"));
    assert!(
        path.exists(),
        "{} is missing: run the README's test command (scripts/test), which creates it",
        path.display()
    );
    path
}

/// The lines a child writes to `out`, each as it comes, ending once none has come for 20 s
/// (or the child closed it): a child that hangs fails its test instead of holding the run.
pub fn lines_within_20_s(out: impl std::io::Read + Send + 'static) -> impl Iterator<Item = String> {
    let (lines, said) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(out)) {
            if line.map(|line| lines.send(line)).is_err() {
                break;
            }
        }
    });
    std::iter::from_fn(move || said.recv_timeout(std::time::Duration::from_secs(20)).ok())
}

/// Runs `command` with its output captured; it must end within 20 s, or it is killed and
/// the test fails saying it `hung`.
pub fn ends_within_20_s(command: &mut Command, hung: &str) -> Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("{hung}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// Runs `serve` on `data`, which must refuse to start: its standard error (a start that goes
/// on serving is stopped and fails the test).
pub fn serve_refused(data: &Path) -> String {
    let out = ends_within_20_s(
        command()
            .arg("--data-dir")
            .arg(data)
            .args(["serve", "--listen", "127.0.0.1:0"]),
        "serve started",
    );
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub type RawTls = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

/// A TLS connection to the appliance for writing HTTP by hand; reads time out after `wait`.
pub fn raw_tls(f: &Fixture, wait: std::time::Duration) -> RawTls {
    raw_tls_to(&f.data, f.app.addr, wait)
}

/// [`raw_tls`] to the appliance of `data_dir` serving on `addr`.
pub fn raw_tls_to(
    data_dir: &std::path::Path,
    addr: std::net::SocketAddr,
    wait: std::time::Duration,
) -> RawTls {
    tls_over(data_dir, std::net::TcpStream::connect(addr).unwrap(), wait)
}

/// [`raw_tls`] from another loopback address (`127.0.0.2`: another host to the appliance).
pub fn raw_tls_from(f: &Fixture, from: &str, wait: std::time::Duration) -> RawTls {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    let tcp = runtime.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
        socket.connect(f.app.addr).await.unwrap()
    });
    let tcp = tcp.into_std().unwrap();
    tcp.set_nonblocking(false).unwrap();
    tls_over(&f.data, tcp, wait)
}

pub fn tls_over(
    data_dir: &std::path::Path,
    tcp: std::net::TcpStream,
    wait: std::time::Duration,
) -> RawTls {
    tls_with(&tls_client(data_dir), tcp, wait)
}

/// A TLS client trusting the certificate of the appliance of `data_dir` (with its own
/// session cache, as a device has).
pub fn tls_client(data_dir: &std::path::Path) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(&appliance_cert(data_dir)).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    Arc::new(config)
}

/// [`tls_over`] with the client `config`.
pub fn tls_with(
    config: &Arc<rustls::ClientConfig>,
    tcp: std::net::TcpStream,
    wait: std::time::Duration,
) -> RawTls {
    let addr = tcp.peer_addr().unwrap();
    tcp.set_read_timeout(Some(wait)).unwrap();
    let server = rustls::pki_types::ServerName::from(addr.ip());
    let client = rustls::ClientConnection::new(config.clone(), server).unwrap();
    rustls::StreamOwned::new(client, tcp)
}
