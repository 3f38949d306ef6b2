//! Issue 6: metrics after real traffic, health and readiness.

use serde_json::json;

use crate::helpers::*;

pub(crate) fn scrape(f: &Fixture) -> String {
    let mut response = f.app.agent.get(&f.app.url("/metrics")).call().unwrap();
    assert_eq!(response.status().as_u16(), 200);
    response.body_mut().read_to_string().unwrap()
}

pub(crate) fn value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
        .parse()
        .unwrap()
}

/// `/readyz` says whether the appliance can serve devices: not while another program holds
/// the database's write lock (every authorization and usage call would wait), again once
/// it lets go.
#[test]
fn readiness_needs_a_database_that_commits() {
    let f = Fixture::new(&item("scan", "per_device", 10, ""));
    let ready = || get_json(&f.app.agent, &f.app.url("/readyz"));
    assert_eq!(ready(), (200, json!({"status": "ready"})));
    let other = f.db();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    assert_eq!(ready(), (503, json!({"status": "unavailable"})));
    other.execute_batch("COMMIT").unwrap();
    assert_eq!(ready(), (200, json!({"status": "ready"})));
}

/// A vendor key the configuration names that the service cannot read (a typo, a path under
/// /home that systemd's ProtectHome hides) fails every import until it is fixed, but the
/// devices need no vendor key: the appliance still serves, logs the error (which emails
/// the recipients) and `keygate status` names it.
#[test]
fn an_unusable_configured_vendor_key_is_told_and_the_appliance_serves() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let missing = dir.path().join("acme.pub");
    let log = dir.path().join("serve.log");
    let mut child = command()
        .env("KEYGATE_TRUSTED_VENDOR_KEYS", &missing)
        .env("KEYGATE_LOG_FORMAT", "json")
        .arg("--data-dir")
        .arg(&data)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let status = || {
        let out = command()
            .env("KEYGATE_TRUSTED_VENDOR_KEYS", &missing)
            .arg("--data-dir")
            .arg(&data)
            .arg("status")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !status().contains("service:          running") {
        assert!(std::time::Instant::now() < deadline, "the appliance serves");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    let stdout = status();
    assert!(
        stdout.contains("trusted vendors:  CANNOT IMPORT: trusted vendor key")
            && stdout.contains("acme.pub"),
        "{stdout}"
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.lines().any(|l| l.contains("\"level\":\"ERROR\"")
            && l.contains("acme.pub")
            && l.contains("trusted_vendor_keys")),
        "{logged}"
    );
}

/// A command of a newer release does not migrate the database under a running older
/// service (an upgrade that did not restart it): it says to restart the service first.
#[test]
fn a_command_does_not_migrate_the_database_under_a_running_service() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let served = Served::start(&data);
    // Serving: done with its start (which opens the database once more after it listens).
    let agent = pinned_agent(&appliance_cert(&data));
    assert_eq!(get_json(&agent, &served.url("/healthz")).0, 200);
    // The running service as an older release left it: one schema behind this keygate.
    let older = keygate::store::schema_version() - 1;
    let db = rusqlite::Connection::open(data.join("keygate.db")).unwrap();
    db.pragma_update(None, "user_version", older).unwrap();
    let run = keygate(&data, &["licenses"]);
    assert!(
        !run.ok && run.stderr.contains("restart the service with this release"),
        "{}",
        run.stderr
    );
    let schema: i64 = db
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(schema, older, "not migrated");
    drop(served);
}

/// With `metrics.token_file`, a scrape presents the token; a token too short to be safe
/// stops the start with a message naming the setting.
#[test]
fn metrics_ask_for_the_configured_token() {
    let dir = tempfile::tempdir().unwrap();
    let (data, token_file) = (dir.path().join("data"), dir.path().join("metrics.token"));
    std::fs::write(&token_file, "short\n").unwrap();
    let out = command()
        .env("KEYGATE_METRICS_TOKEN_FILE", &token_file)
        .arg("--data-dir")
        .arg(&data)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("metrics.token_file") && stderr.contains("at least 16"),
        "{stderr}"
    );

    std::fs::write(&token_file, "prometheus-0123456789abcdef\n").unwrap();
    let served = Served::start_with(
        &data,
        "127.0.0.1:0",
        &[("KEYGATE_METRICS_TOKEN_FILE", &token_file)],
    );
    let agent = pinned_agent(&appliance_cert(&data));
    let scrape = |authorization: Option<&str>| {
        let mut request = agent.get(&served.url("/metrics"));
        if let Some(value) = authorization {
            request = request.header("Authorization", value);
        }
        let mut response = request.call().unwrap();
        let status = response.status().as_u16();
        (status, response.body_mut().read_to_string().unwrap())
    };
    let (status, body) = scrape(None);
    assert_eq!(status, 401, "{body}");
    assert!(!body.contains("keygate_uptime_seconds"));
    assert_eq!(scrape(Some("Bearer prometheus-0123456789abcdeX")).0, 401);
    let (status, body) = scrape(Some("Bearer prometheus-0123456789abcdef"));
    assert_eq!(status, 200);
    assert!(body.contains("keygate_uptime_seconds"), "{body}");
}

/// A clock set back (the appliance refuses to sign until it is right again) leaves the
/// uptime and the backup's age at 0, not negative: a monitor alerting on them stays sane.
#[test]
fn uptime_and_backup_age_are_never_negative() {
    let f = Fixture::new(&item("scan", "per_device", 10, ""));
    f.app.run_job("backup").unwrap();
    f.app.clock.advance(time::Duration::hours(-2));
    let metrics = scrape(&f);
    assert_eq!(value(&metrics, "keygate_uptime_seconds"), 0.0);
    assert_eq!(value(&metrics, "keygate_backup_age_seconds"), 0.0);
    f.app.clock.advance(time::Duration::hours(3));
    let metrics = scrape(&f);
    assert_eq!(value(&metrics, "keygate_uptime_seconds"), 3_600.0);
}

#[test]
fn metrics_count_real_traffic() {
    let f = Fixture::new(
        &[
            item("scanner", "per_device", 2, ""),
            item("cad", "concurrent_device", 3, "max_exceptions = 5"),
        ]
        .concat(),
    );
    let lease = f.authorized("scanner", 1).lease_id;
    f.authorized("scanner", 2);
    f.authorized("scanner", 2);
    assert_eq!(f.refused("scanner", 3), "QUOTA_EXCEEDED");
    let mut bad = f.request("scanner", 4);
    bad["nonce"] = json!("short");
    assert_eq!(f.authorize(&bad).0, 400);
    let stream = "11111111-1111-4111-8111-111111111111";
    let reports = f.reports(
        &lease,
        1,
        stream,
        &[(1, "LIC-T-1", "pages", 3), (2, "LIC-T-1", "pages", 4)],
    );
    assert_eq!(f.usage(&reports).1["accepted"], 2);
    assert_eq!(f.usage(&reports).1["duplicates"], 2);
    assert_eq!(f.release(&lease, 1).0, 200);
    // Bodies refused before any handler runs count too (not timed).
    let raw = |path: &str, body: Vec<u8>| {
        f.app
            .agent
            .post(&f.app.url(path))
            .header("content-type", "application/json")
            .send(&body[..])
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(raw("/api/v1/authorize", b"{not json".to_vec()), 400);
    assert_eq!(raw("/api/v1/release", vec![b' '; 8 * 1024]), 413);
    f.app.run_job("backup").unwrap();

    let m = scrape(&f);
    assert_eq!(
        value(
            &m,
            r#"keygate_requests_total{endpoint="release",outcome="PAYLOAD_TOO_LARGE"}"#
        ),
        1.0
    );
    assert_eq!(
        value(
            &m,
            r#"keygate_requests_total{endpoint="authorize",outcome="ok"}"#
        ),
        3.0
    );
    assert_eq!(
        value(
            &m,
            r#"keygate_requests_total{endpoint="authorize",outcome="QUOTA_EXCEEDED"}"#
        ),
        1.0
    );
    assert_eq!(
        value(
            &m,
            r#"keygate_requests_total{endpoint="authorize",outcome="BAD_REQUEST"}"#
        ),
        2.0
    );
    assert_eq!(
        value(
            &m,
            r#"keygate_requests_total{endpoint="usage",outcome="ok"}"#
        ),
        2.0
    );
    assert_eq!(
        value(
            &m,
            r#"keygate_requests_total{endpoint="release",outcome="ok"}"#
        ),
        1.0
    );
    assert_eq!(
        value(
            &m,
            r#"keygate_request_duration_seconds_count{endpoint="authorize"}"#
        ),
        5.0
    );
    assert_eq!(
        value(
            &m,
            r#"keygate_request_duration_seconds_bucket{endpoint="authorize",le="+Inf"}"#
        ),
        5.0
    );
    assert_eq!(value(&m, "keygate_usage_reports_accepted_total"), 2.0);
    assert_eq!(value(&m, "keygate_usage_reports_duplicate_total"), 2.0);
    assert_eq!(
        value(
            &m,
            r#"keygate_item_seats_in_use{item="LIC-T-1",model="per_device"}"#
        ),
        2.0
    );
    assert_eq!(
        value(
            &m,
            r#"keygate_item_quota{item="LIC-T-1",model="per_device"}"#
        ),
        2.0
    );
    // A concurrent item's stop is its exceptions reaching max_exceptions.
    assert_eq!(
        value(
            &m,
            r#"keygate_item_max_exceptions{item="LIC-T-2",model="concurrent_device"}"#
        ),
        5.0
    );
    assert!(!m.contains(r#"keygate_item_max_exceptions{item="LIC-T-1""#));
    assert_eq!(
        value(&m, r#"keygate_job_runs_total{job="backup",outcome="ok"}"#),
        1.0
    );
    assert_eq!(value(&m, "keygate_backup_age_seconds"), 0.0);
    // The answered requests were committed and synced: batches and syncs are counted.
    let (batches, syncs) = (
        value(&m, "keygate_db_batches_total"),
        value(&m, "keygate_db_wal_syncs_total"),
    );
    assert!(
        syncs >= 1.0 && syncs <= batches,
        "{batches} batches, {syncs} syncs"
    );
}

/// A small file system of its own for the data directory (tmpfs), unmounted at the end.
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    /// `None` when this process may not mount (not root): the test is then not run here.
    /// CI runs the tests as root (scripts/package-test needs it too).
    fn mount(size: &str) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        mounted.then_some(SmallDisk(dir))
    }

    /// Writes a file until the file system has no room left.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.0.path().join("fill");
        let mut file = std::fs::File::create(&path).unwrap();
        while file.write_all(&[0; 4096]).is_ok() {}
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazily: the test leaves a connection open on it (as a killed process would).
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

/// An appliance whose disk filled while its WAL held commits not yet in the database file
/// (it was killed, or stopped at a failed sync) does not serve until it has room to copy
/// them there: after a failed sync they may be in memory only, and a power cut while it
/// served would lose them and every commit after them. It says why, and once there is room
/// it starts with every commit.
#[test]
fn an_appliance_on_a_full_disk_starts_once_it_has_room_for_its_wal() {
    let running_as_root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.stdout.starts_with(b"0\n"));
    let Some(disk) = SmallDisk::mount("6m") else {
        assert!(!running_as_root, "root could not mount a tmpfs");
        // Skipped on a developer's machine only: CI (`.ci/run` sets CI=true) runs it.
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI must run this test as root (it mounts a small file system)"
        );
        eprintln!("not run: mounting a small file system needs root");
        return;
    };
    let data = disk.0.path().join("data");
    Served::start(&data).kill();
    // Commits that grow the database, left in the WAL (no checkpoint, no close).
    let db = data.join("keygate.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
    conn.execute_batch("BEGIN").unwrap();
    for i in 0..40 {
        keygate::store::settings::set(&conn, &format!("big{i}"), &"y".repeat(20_000)).unwrap();
    }
    conn.execute_batch("COMMIT").unwrap();
    std::mem::forget(conn);
    let fill = disk.fill();

    let stderr = serve_refused(&data);
    assert!(
        stderr.contains("is full") && stderr.contains("free some space"),
        "{stderr}"
    );
    std::fs::remove_file(fill).unwrap();
    let served = Served::start(&data);
    let agent = pinned_agent(&appliance_cert(&data));
    assert_eq!(get_json(&agent, &served.url("/readyz")).0, 200);
    served.kill();
    let conn = rusqlite::Connection::open(&db).unwrap();
    let kept: i64 = conn
        .query_row(
            "SELECT count(*) FROM settings WHERE key LIKE 'big%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(kept, 40);
}

/// A backup cut short at an earlier start (the copy taken before a migration, killed by the
/// service manager's start timeout) is removed by the next start, before it opens the
/// database: its migration's backup needs the space that copy holds. So are the temporary
/// copies of a secret written when the writer was killed (the appliance key's, the
/// certificate key's), once untouched for 10 minutes; a newer one may be being written.
#[test]
fn a_start_removes_the_copies_interrupted_writes_left() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    Served::start(&data).terminate();
    let backups = data.join("backups");
    std::fs::create_dir_all(&backups).unwrap();
    let eleven_minutes_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(660);
    let left = |path: std::path::PathBuf, untouched_since| {
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(untouched_since)
            .unwrap();
        path
    };
    let old = [
        left(
            backups.join(".keygate-schema3-before-upgrade-20261204T120000Z.db.1.tmp"),
            eleven_minutes_ago,
        ),
        left(
            data.join(".appliance.key.0b7c5a5e-3c43-4f65-9d7e-6a1b0c2d3e4f.tmp"),
            eleven_minutes_ago,
        ),
        left(
            data.join("tls/.key.pem.0b7c5a5e-3c43-4f65-9d7e-6a1b0c2d3e4f.tmp"),
            eleven_minutes_ago,
        ),
    ];
    let recent = left(
        data.join(".appliance.key.1c7c5a5e-3c43-4f65-9d7e-6a1b0c2d3e4f.tmp"),
        std::time::SystemTime::now(),
    );
    let _served = Served::start(&data);
    for path in old {
        assert!(!path.exists(), "{}", path.display());
    }
    assert!(recent.exists());
}
