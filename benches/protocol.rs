//! Hot-path benchmark: the real `keygate` binary (release) over HTTPS keep-alive, driven by
//! a load generator in this process that shares the machine's cores with the server: one
//! thread (at most one core) multiplexing the client connections, each speaking just the
//! HTTP/1.1 the protocol's POSTs need over rustls, so that the client costs the server as
//! little CPU as it can.
//!
//! `cargo bench --bench protocol` — set BENCH_DEVICES (default 20000) and
//! BENCH_CLIENTS (default 256) to change the load, BENCH_BIN to measure another keygate
//! binary (e.g. a copy of the previous build, to compare). Prints a Markdown table.
//! BENCH_CLIENTS above 1,024 meets the appliance's `max_connections_per_address` (the
//! connections past it are closed).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use rustls::pki_types::pem::PemObject;

/// The keygate binary under test: this build's, or `BENCH_BIN` (to compare two builds).
fn bin() -> String {
    std::env::var("BENCH_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_keygate").to_string())
}

fn keygate(data: &Path, args: &[&str]) -> String {
    let out = Command::new(bin())
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .env("KEYGATE_LOG_LEVEL", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One TLS connection to the appliance: kept alive, or (`fresh`) a new one for each request,
/// as a device makes one for each call 3 minutes apart (resuming its last TLS session when
/// the appliance gave it a ticket: each connection keeps its own, as each device does).
struct Connection {
    tls: TlsStream<TcpStream>,
    host: String,
    buf: Vec<u8>,
    config: Arc<rustls::ClientConfig>,
    fresh: bool,
}

impl Connection {
    async fn open(addr: &str, cert: &[u8], fresh: bool) -> Connection {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from_pem_slice(cert).unwrap())
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let config = Arc::new(config);
        Connection {
            tls: Self::connect(addr, &config).await,
            host: addr.to_string(),
            buf: Vec::with_capacity(8192),
            config,
            fresh,
        }
    }

    async fn connect(addr: &str, config: &Arc<rustls::ClientConfig>) -> TlsStream<TcpStream> {
        let tcp = TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let ip: std::net::IpAddr = addr.rsplit_once(':').unwrap().0.parse().unwrap();
        TlsConnector::from(config.clone())
            .connect(rustls::pki_types::ServerName::from(ip), tcp)
            .await
            .unwrap()
    }

    /// POSTs a JSON body and returns the status and the response body.
    async fn post(&mut self, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        if self.fresh {
            self.tls = Self::connect(&self.host, &self.config).await;
            self.buf.clear();
        }
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n",
            self.host,
            body.len()
        );
        let mut request = head.into_bytes();
        request.extend_from_slice(body);
        self.tls.write_all(&request).await.unwrap();
        self.tls.flush().await.unwrap();
        let (status, body_at, length) = loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..end]).unwrap();
                let status = head[9..12].parse().unwrap();
                let length = head
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse::<usize>().unwrap())
                    })
                    .expect("keygate answers with a Content-Length");
                break (status, end + 4, length);
            }
            self.fill().await;
        };
        while self.buf.len() < body_at + length {
            self.fill().await;
        }
        let body = self.buf[body_at..body_at + length].to_vec();
        self.buf.drain(..body_at + length);
        (status, body)
    }

    async fn fill(&mut self) {
        let mut chunk = [0u8; 8192];
        let n = self.tls.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the server closed the connection");
        self.buf.extend_from_slice(&chunk[..n]);
    }
}

/// The server under test, stopped when the run ends, also when it fails (its temporary data
/// directory goes with it).
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn device(n: usize) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

struct Phase {
    name: &'static str,
    requests: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
    /// CPU time the server process used during the phase.
    server_cpu: Duration,
    /// CPU time the load generator (this process) used during the phase.
    client_cpu: Duration,
    /// Bytes the server wrote to storage during the phase (the WAL, checkpoints).
    disk_bytes: u64,
    /// The share of the machine's CPU time the hypervisor gave to other guests (steal).
    steal: f64,
}

/// Bytes a process caused to be written to storage, from /proc (Linux): unlike time, a
/// figure the VM's noise does not move.
fn disk_writes(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// User plus system CPU time of a process, from /proc (Linux).
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: u64 = fields
        .get(11..13)
        .map_or(0, |f| f.iter().filter_map(|t| t.parse::<u64>().ok()).sum());
    Duration::from_millis(ticks * 10) // USER_HZ is 100 on Linux
}

/// The machine's (steal, total) CPU ticks so far, from the first line of /proc/stat
/// (Linux): how much of the cores the hypervisor gave to other guests.
fn cpu_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user)
    (
        ticks.get(7).copied().unwrap_or(0),
        ticks.iter().take(8).sum(),
    )
}

impl Phase {
    fn row(&mut self) -> String {
        self.latencies.sort();
        let pct = |p: f64| {
            let i = ((self.latencies.len() as f64 * p) as usize).min(self.latencies.len() - 1);
            self.latencies[i].as_secs_f64() * 1000.0
        };
        format!(
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.0} | {:.0} | {:.1} | {:.0} |",
            self.name,
            self.requests,
            self.requests as f64 / self.elapsed.as_secs_f64(),
            pct(0.50),
            pct(0.99),
            pct(1.0),
            self.server_cpu.as_secs_f64() * 1e6 / self.requests as f64,
            self.client_cpu.as_secs_f64() * 1e6 / self.requests as f64,
            self.disk_bytes as f64 / 1024.0 / self.requests as f64,
            self.steal * 100.0,
        )
    }
}

/// Sends `bodies` to `path` over fresh connections (a phase's bodies can take longer to
/// build than the server keeps an idle connection) as fast as answers come, or at `rate`
/// requests a second; every answer must be 200. At a fixed rate, latency counts from when a
/// request was due if it went out late because its connection was still busy (no
/// coordinated omission), and from when the timer woke it otherwise (the runtime's timer
/// wakes up to a millisecond late: the client's lateness, not the server's).
fn run(
    name: &'static str,
    server: u32,
    runtime: &tokio::runtime::Runtime,
    connect: &dyn Fn() -> Vec<Connection>,
    path: &str,
    bodies: &[Vec<u8>],
    rate: Option<f64>,
) -> (Phase, Vec<Vec<u8>>) {
    let connections = connect();
    let clients = connections.len();
    eprintln!("phase: {name}");
    let bodies = Arc::new(bodies.to_vec());
    let (cpu_before, client_before) = (cpu_time(server), cpu_time(std::process::id()));
    let disk_before = disk_writes(server);
    let ticks_before = cpu_ticks();
    let start = Instant::now();
    let tasks: Vec<_> = connections
        .into_iter()
        .enumerate()
        .map(|(c, mut conn)| {
            let (bodies, path) = (bodies.clone(), path.to_string());
            runtime.spawn(async move {
                let mut out = Vec::new();
                for (k, i) in (c..bodies.len()).step_by(clients).enumerate() {
                    let due =
                        rate.map(|r| start + Duration::from_secs_f64((k * clients + c) as f64 / r));
                    let sent = match due {
                        Some(due) if due > Instant::now() => {
                            tokio::time::sleep_until(due.into()).await;
                            Instant::now()
                        }
                        Some(due) => due,
                        None => Instant::now(),
                    };
                    let (status, body) = conn.post(&path, &bodies[i]).await;
                    assert_eq!(status, 200, "{name}: {}", String::from_utf8_lossy(&body));
                    out.push((i, sent.elapsed(), body));
                }
                out
            })
        })
        .collect();
    let results = runtime.block_on(async {
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.unwrap());
        }
        results
    });
    let elapsed = start.elapsed();
    let server_cpu = cpu_time(server).saturating_sub(cpu_before);
    let client_cpu = cpu_time(std::process::id()).saturating_sub(client_before);
    let disk_bytes = disk_writes(server).saturating_sub(disk_before);
    let ticks = cpu_ticks();
    let steal = (ticks.0 - ticks_before.0) as f64 / (ticks.1 - ticks_before.1).max(1) as f64;
    let mut answers = vec![Vec::new(); bodies.len()];
    let mut latencies = Vec::with_capacity(bodies.len());
    for out in results {
        for (i, latency, body) in out {
            latencies.push(latency);
            answers[i] = body;
        }
    }
    (
        Phase {
            name,
            requests: bodies.len(),
            elapsed,
            latencies,
            server_cpu,
            client_cpu,
            disk_bytes,
            steal,
        },
        answers,
    )
}

fn lease_of(answer: &[u8]) -> String {
    let answer: Value = serde_json::from_slice(answer).unwrap();
    let payload = answer["authorization"]
        .as_str()
        .unwrap()
        .split('.')
        .nth(1)
        .unwrap();
    let payload = data_encoding::BASE64URL_NOPAD
        .decode(payload.as_bytes())
        .unwrap();
    let payload: Value = serde_json::from_slice(&payload).unwrap();
    payload["lease_id"].as_str().unwrap().to_string()
}

/// The machine's speed now, as the µs signing an authorization-sized payload (JSON, base64,
/// Ed25519) takes on one core (the server's largest single cost): the VM's speed drifts by up to
/// twice from one day to the next, and this tells a slow phase from a slower build.
fn signature_us() -> f64 {
    use keygate_sdk::jws::{Typ, sign};
    let key = keygate_sdk::SigningKey::from_bytes(&[7; 32]);
    let payload = "x".repeat(600);
    let rounds = 2_000;
    let start = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(sign(Typ::Authorization, &payload, &key));
    }
    start.elapsed().as_secs_f64() * 1e6 / rounds as f64
}

fn main() {
    let signature_before = signature_us();
    let devices = env_or("BENCH_DEVICES", 20_000);
    let clients = env_or("BENCH_CLIENTS", 256);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let vendor = dir.path().join("vendor");
    Command::new(bin())
        .args(["vendor", "keygen", "--out", vendor.to_str().unwrap()])
        .output()
        .unwrap();
    keygate(&data, &["trust", &format!("{}.pub", vendor.display())]);
    let request = dir.path().join("request.txt");
    keygate(
        &data,
        &["activation-request", "--out", request.to_str().unwrap()],
    );
    let items = dir.path().join("items.toml");
    std::fs::write(
        &items,
        "license_id = \"BENCH\"\nvendor = \"Bench\"\norganization_id = \"1\"\n\
         [[items]]\nproduct = \"bench\"\nmodel = \"per_device\"\nquota = 2000000\n\
         starts_at = 2020-01-01T00:00:00Z\nexpires_at = 2099-01-01T00:00:00Z\noffline_days = 7\n",
    )
    .unwrap();
    let license = dir.path().join("bench.lic");
    let out = Command::new(bin())
        .args([
            "vendor",
            "issue",
            "--key",
            &format!("{}.key", vendor.display()),
        ])
        .args([
            "--request",
            request.to_str().unwrap(),
            "--items",
            items.to_str().unwrap(),
        ])
        .args(["--out", license.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let imported = keygate(&data, &["import", license.to_str().unwrap()]);
    let code = imported
        .split("default handshake code is ")
        .nth(1)
        .unwrap()
        .trim()
        .to_string();

    let mut server = Server(
        Command::new(bin())
            .arg("--data-dir")
            .arg(&data)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("KEYGATE_LOG_LEVEL", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(server.0.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().unwrap().unwrap();
        if let Some(a) = line.split("listening on https://").nth(1) {
            break a.trim().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let pid = server.0.id();
    let cert = std::fs::read(data.join("tls/cert.pem")).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let connections = |fresh: bool| -> Vec<Connection> {
        runtime.block_on(async {
            let mut all = Vec::new();
            for _ in 0..clients {
                all.push(Connection::open(&addr, &cert, fresh).await);
            }
            all
        })
    };
    let connect = || connections(false);
    let connect_fresh = || connections(true);
    let url = |path: &str| format!("/api/v1/{path}");
    let json = |values: Vec<Value>| -> Vec<Vec<u8>> {
        values
            .iter()
            .map(|v| serde_json::to_vec(v).unwrap())
            .collect()
    };

    let authorize = json(
        (0..devices)
        .map(|n| json!({"handshake_code": code, "product": "bench", "device": {"uuid": device(n)}, "nonce": "bench-nonce-0123456789"}))
            .collect(),
    );
    let mut rows = Vec::new();
    let (mut phase, answers) = run(
        "authorize (new devices)",
        pid,
        &runtime,
        &connect,
        &url("authorize"),
        &authorize,
        None,
    );
    rows.push(phase.row());
    let leases: Vec<String> = answers.iter().map(|a| lease_of(a)).collect();
    // Known devices come back in no particular order, as in a real LAN (the rows they
    // update are spread over the tables, not neighbours): a fixed permutation of 0..devices.
    assert!(!devices.is_multiple_of(7919));
    let shuffled = |list: &[Vec<u8>]| -> Vec<Vec<u8>> {
        (0..list.len())
            .map(|k| list[(k * 7919 + 12345) % list.len()].clone())
            .collect()
    };
    let (mut phase, _) = run(
        "authorize (known devices)",
        pid,
        &runtime,
        &connect,
        &url("authorize"),
        &shuffled(&authorize),
        None,
    );
    rows.push(phase.row());

    // Devices call every 3 minutes and a usage call rewrites its lease's record every 15
    // (`RECORD_EVERY_S`): in steady state one call in five writes the lease. The records are
    // seconds old here, so before each usage phase one lease in five is made 15 minutes old.
    let db = data.join("keygate.db");
    let age_leases = || {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.busy_timeout(Duration::from_secs(30)).unwrap();
        let every = keygate::store::devices::RECORD_EVERY_S;
        conn.execute(
            "UPDATE leases SET issued_at = issued_at - ?1, expires_at = expires_at - ?1
             WHERE rowid % 5 = 0",
            [every],
        )
        .unwrap();
    };
    let stream = |n: usize| format!("00000000-0000-4000-9000-{n:012}");
    let heartbeats = json(
        (0..devices)
        .map(|n| json!({"lease_id": leases[n], "device_uuid": device(n), "stream": stream(n), "reports": []}))
            .collect(),
    );
    let heartbeats = shuffled(&heartbeats);
    age_leases();
    let (mut phase, _) = run(
        "usage (heartbeat)",
        pid,
        &runtime,
        &connect,
        &url("usage"),
        &heartbeats,
        None,
    );
    rows.push(phase.row());
    let now = "2026-01-01T00:00:00Z";
    let reports = json(
        (0..devices)
        .map(|n| json!({"lease_id": leases[n], "device_uuid": device(n), "stream": stream(n),
            "reports": [{"seq": 1, "item_id": "BENCH-1", "from": now, "to": now, "counters": {"scans": 3}}]}))
            .collect(),
    );
    let reports = shuffled(&reports);
    age_leases();
    let (mut phase, _) = run(
        "usage (one report)",
        pid,
        &runtime,
        &connect,
        &url("usage"),
        &reports,
        None,
    );
    rows.push(phase.row());
    // One million devices every 3 minutes: 5,556 usage calls a second.
    let paced: Vec<Vec<u8>> = (0..(5556 * 10).min(devices * 3))
        .map(|i| heartbeats[i % devices].clone())
        .collect();
    age_leases();
    let (mut phase, _) = run(
        "usage at 5,556/s (1M devices)",
        pid,
        &runtime,
        &connect,
        &url("usage"),
        &paced,
        Some(5556.0),
    );
    rows.push(phase.row());
    // As devices call: a new TLS connection for each call (the appliance closes one idle
    // for 5 s; devices call every 3 minutes).
    age_leases();
    let (mut phase, _) = run(
        "usage (heartbeat), a new connection each",
        pid,
        &runtime,
        &connect_fresh,
        &url("usage"),
        &heartbeats,
        None,
    );
    rows.push(phase.row());
    age_leases();
    let (mut phase, _) = run(
        "usage at 5,556/s, a new connection each",
        pid,
        &runtime,
        &connect_fresh,
        &url("usage"),
        &paced,
        Some(5556.0),
    );
    rows.push(phase.row());
    let releases = json(
        (0..devices)
            .map(|n| json!({"lease_id": leases[n], "device_uuid": device(n)}))
            .collect(),
    );
    let releases = shuffled(&releases);
    let (mut phase, _) = run(
        "release",
        pid,
        &runtime,
        &connect,
        &url("release"),
        &releases,
        None,
    );
    rows.push(phase.row());

    // The server's peak memory (resident set) and the database's size on disk.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let peak_rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .map_or(String::new(), |v| v.trim().to_string());
    drop(server);
    let database: u64 = ["keygate.db", "keygate.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(data.join(f)).ok())
        .map(|m| m.len())
        .sum();
    println!(
        "\n{devices} devices, {clients} keep-alive TLS connections, {} cores; server peak RSS {peak_rss}, database {} MiB",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        database / (1024 * 1024)
    );
    println!(
        "machine speed: signing an authorization took {signature_before:.1} µs before the run and {:.1} µs after (compare runs by it: the VM's speed drifts)\n",
        signature_us()
    );
    println!(
        "| phase | requests | per second | p50 ms | p99 ms | max ms | server CPU µs/request | client CPU µs/request | disk KiB/request | steal % |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
}
