//! Hot-path benchmark: the real `keygate` binary (release) over HTTPS keep-alive, driven by
//! client threads in this process (which share the machine's cores with the server).
//!
//! `cargo bench --bench protocol` — set BENCH_DEVICES (default 20000) and
//! BENCH_CLIENTS (default 64) to change the load, BENCH_BIN to measure another keygate
//! binary (e.g. a copy of the previous build, to compare). Prints a Markdown table.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

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

fn agent(cert: &[u8]) -> ureq::Agent {
    let cert = ureq::tls::Certificate::from_pem(cert).unwrap().to_owned();
    let tls = ureq::tls::TlsConfig::builder()
        .root_certs(ureq::tls::RootCerts::Specific(Arc::new(vec![cert])))
        .build();
    ureq::Agent::config_builder()
        .tls_config(tls)
        .http_status_as_error(false)
        .build()
        .into()
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

impl Phase {
    fn row(&mut self) -> String {
        self.latencies.sort();
        let pct = |p: f64| {
            let i = ((self.latencies.len() as f64 * p) as usize).min(self.latencies.len() - 1);
            self.latencies[i].as_secs_f64() * 1000.0
        };
        format!(
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.0} |",
            self.name,
            self.requests,
            self.requests as f64 / self.elapsed.as_secs_f64(),
            pct(0.50),
            pct(0.99),
            pct(1.0),
            self.server_cpu.as_secs_f64() * 1e6 / self.requests as f64,
        )
    }
}

/// Sends `bodies` to `path` from `clients` threads as fast as answers come; every answer
/// must be 200.
fn run(
    name: &'static str,
    server: u32,
    agents: &[ureq::Agent],
    url: &str,
    bodies: &[Value],
    rate: Option<f64>,
) -> (Phase, Vec<Value>) {
    let clients = agents.len();
    let cpu_before = cpu_time(server);
    let start = Instant::now();
    let results: Vec<Vec<(usize, Duration, Value)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = agents
            .iter()
            .enumerate()
            .map(|(c, agent)| {
                scope.spawn(move || {
                    let mut out = Vec::new();
                    for (k, i) in (c..bodies.len()).step_by(clients).enumerate() {
                        // At a fixed rate, latency counts from when the request was due.
                        let due = rate
                            .map(|r| start + Duration::from_secs_f64((k * clients + c) as f64 / r));
                        if let Some(wait) =
                            due.and_then(|d| d.checked_duration_since(Instant::now()))
                        {
                            std::thread::sleep(wait);
                        }
                        let sent = due.unwrap_or_else(Instant::now);
                        let mut response = agent.post(url).send_json(&bodies[i]).unwrap();
                        let status = response.status().as_u16();
                        let body: Value = response.body_mut().read_json().unwrap();
                        assert_eq!(status, 200, "{name}: {body}");
                        out.push((i, sent.elapsed(), body));
                    }
                    out
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let elapsed = start.elapsed();
    let server_cpu = cpu_time(server).saturating_sub(cpu_before);
    let mut answers = vec![Value::Null; bodies.len()];
    let mut latencies = Vec::with_capacity(bodies.len());
    for (i, latency, body) in results.into_iter().flatten() {
        latencies.push(latency);
        answers[i] = body;
    }
    (
        Phase {
            name,
            requests: bodies.len(),
            elapsed,
            latencies,
            server_cpu,
        },
        answers,
    )
}

fn lease_of(answer: &Value) -> String {
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

fn main() {
    let devices = env_or("BENCH_DEVICES", 20_000);
    let clients = env_or("BENCH_CLIENTS", 64);
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

    let mut server = Command::new(bin())
        .arg("--data-dir")
        .arg(&data)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("KEYGATE_LOG_LEVEL", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().unwrap().unwrap();
        if let Some(a) = line.split("listening on https://").nth(1) {
            break a.trim().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let pid = server.id();
    let cert = std::fs::read(data.join("tls/cert.pem")).unwrap();
    let agents: Vec<_> = (0..clients).map(|_| agent(&cert)).collect();
    let url = |path: &str| format!("https://{addr}/api/v1/{path}");

    let authorize: Vec<Value> = (0..devices)
        .map(|n| json!({"handshake_code": code, "product": "bench", "device": {"uuid": device(n)}, "nonce": "bench-nonce-0123456789"}))
        .collect();
    let mut rows = Vec::new();
    let (mut phase, answers) = run(
        "authorize (new devices)",
        pid,
        &agents,
        &url("authorize"),
        &authorize,
        None,
    );
    rows.push(phase.row());
    let leases: Vec<String> = answers.iter().map(lease_of).collect();
    let (mut phase, _) = run(
        "authorize (known devices)",
        pid,
        &agents,
        &url("authorize"),
        &authorize,
        None,
    );
    rows.push(phase.row());

    let stream = |n: usize| format!("00000000-0000-4000-9000-{n:012}");
    let heartbeats: Vec<Value> = (0..devices)
        .map(|n| json!({"lease_id": leases[n], "device_uuid": device(n), "stream": stream(n), "reports": []}))
        .collect();
    let (mut phase, _) = run(
        "usage (heartbeat)",
        pid,
        &agents,
        &url("usage"),
        &heartbeats,
        None,
    );
    rows.push(phase.row());
    let now = "2026-01-01T00:00:00Z";
    let reports: Vec<Value> = (0..devices)
        .map(|n| json!({"lease_id": leases[n], "device_uuid": device(n), "stream": stream(n),
            "reports": [{"seq": 1, "item_id": "BENCH-1", "from": now, "to": now, "counters": {"scans": 3}}]}))
        .collect();
    let (mut phase, _) = run(
        "usage (one report)",
        pid,
        &agents,
        &url("usage"),
        &reports,
        None,
    );
    rows.push(phase.row());
    // One million devices every 3 minutes: 5,556 usage calls a second.
    let paced: Vec<Value> = (0..(5556 * 10).min(devices * 3))
        .map(|i| heartbeats[i % devices].clone())
        .collect();
    let (mut phase, _) = run(
        "usage at 5,556/s (1M devices)",
        pid,
        &agents,
        &url("usage"),
        &paced,
        Some(5556.0),
    );
    phase.name = "usage at 5,556/s (1M devices)";
    rows.push(phase.row());
    let releases: Vec<Value> = (0..devices)
        .map(|n| json!({"lease_id": leases[n], "device_uuid": device(n)}))
        .collect();
    let (mut phase, _) = run("release", pid, &agents, &url("release"), &releases, None);
    rows.push(phase.row());

    let _ = server.kill();
    let _ = server.wait();
    println!(
        "\n{devices} devices, {clients} keep-alive TLS connections, {} cores\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "| phase | requests | per second | p50 ms | p99 ms | max ms | server CPU µs/request |"
    );
    println!("|---|---|---|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
}
