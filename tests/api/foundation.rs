//! Issue 2: vendor keys, activation request, license files, import and its refusals, TLS
//! serving and restart, cross-implementation JOSE vectors.

use std::path::{Path, PathBuf};

use serde_json::json;

use crate::helpers::*;

fn installation_id(data_dir: &Path) -> String {
    let run = keygate(data_dir, &["activation-request"]);
    assert!(run.ok, "{}", run.stderr);
    keygate::vendor::read_activation_request(&run.stdout)
        .unwrap()
        .installation_id
}

/// An appliance in a fresh directory that trusts `vendor`.
fn appliance_trusting(vendor: &Vendor) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let run = keygate(&data, &["trust", vendor.pub_path().to_str().unwrap()]);
    assert!(run.ok, "trust: {}", run.stderr);
    let run = keygate(&data, &["activation-request"]);
    assert!(
        run.stderr.contains("set up a new appliance"),
        "{}",
        run.stderr
    );
    (dir, data)
}

fn import(data: &Path, file: &Path) -> Run {
    keygate(data, &["import", file.to_str().unwrap()])
}

#[test]
fn vendor_to_appliance_to_https() {
    let vendor = Vendor::new();
    let (dir, data) = appliance_trusting(&vendor);
    let id = installation_id(&data);
    let license = vendor.issue_file(&data, SIMPLE_ITEMS, &[], "lic.lic");
    let text = std::fs::read_to_string(&license).unwrap();
    assert!(
        text.starts_with("# keygate license LIC-0042 version 1\n"),
        "{text}"
    );

    let run = import(&data, &license);
    assert!(run.ok, "{}", run.stderr);
    assert!(
        run.stdout
            .contains("imported license LIC-0042 version 1 with 1 item(s)")
    );
    assert!(
        run.stdout.contains("default handshake code is 200001-"),
        "{}",
        run.stdout
    );

    let run = keygate(&data, &["licenses"]);
    assert!(run.ok);
    assert!(run.stdout.contains("LIC-0042-1") && run.stdout.contains("per_device"));
    assert!(run.stdout.contains("barcode-reader") && run.stdout.contains("2036-01-01"));
    // Each value sits under its heading.
    let lines: Vec<Vec<&str>> = run
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let column = |name: &str| lines[0].iter().position(|h| *h == name).unwrap();
    assert_eq!(lines[1].len(), lines[0].len(), "{}", run.stdout);
    assert_eq!(lines[1][column("ITEM")], "LIC-0042-1");
    assert_eq!(lines[1][column("USED")], "0");
    assert_eq!(lines[1][column("EXPIRES")], "2036-01-01");

    let served = Served::start(&data);
    let agent = pinned_agent(&appliance_cert(&data));
    let (status, body) = get_json(&agent, &served.url("/api/v1/appliance"));
    assert_eq!(status, 200);
    assert_eq!(body["installation_id"], id.as_str());
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    let (status, _) = get_json(&agent, &served.url("/healthz"));
    assert_eq!(status, 200);
    let (status, body) = get_json(&agent, &served.url("/readyz"));
    assert_eq!((status, body["status"].as_str()), (200, Some("ready")));

    let run = keygate(&data, &["status"]);
    assert!(run.ok);
    assert!(
        run.stdout.contains(&id)
            && run.stdout.contains("1 items in force now")
            && run.stdout.contains("certificate:      ok ("),
        "{}",
        run.stdout
    );
    // A certificate named in the configuration that has expired: told, not hidden.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["keygate.plant.test".into()]).unwrap();
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(400);
    params.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(2);
    let (cert_file, key_file) = (dir.path().join("old.pem"), dir.path().join("old.key"));
    std::fs::write(&cert_file, params.self_signed(&key).unwrap().pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let run: Run = command()
        .arg("--data-dir")
        .arg(&data)
        .arg("status")
        .env("KEYGATE_TLS_CERT", &cert_file)
        .env("KEYGATE_TLS_KEY", &key_file)
        .output()
        .unwrap()
        .into();
    assert!(
        run.ok
            && run
                .stdout
                .contains("certificate:      CANNOT SERVE: it expired on"),
        "{}",
        run.stdout
    );
    // A mistyped directory is told, not made into a new appliance.
    let typo = dir.path().join("dta");
    let run = keygate(&typo, &["status"]);
    assert!(
        !run.ok && run.stderr.contains("no keygate database at"),
        "{}",
        run.stderr
    );
    assert!(!typo.exists());
    // So is every command that works on an appliance: only the first steps of a new one
    // (trust, activation-request) set one up.
    for args in [
        &["licenses"][..],
        &["backup"],
        &["import", "x.lic"],
        &["handshake", "list"],
        &["trial", "on"],
        &["device", "block", "00000000-0000-4000-8000-000000000001"],
        &["alerts", "recipients", "it@plant.test"],
    ] {
        // Log files in the data directory (as the Windows package has it) do not make it.
        let run: Run = command()
            .arg("--data-dir")
            .arg(&typo)
            .args(args)
            .env("KEYGATE_LOG_DIR", "logs")
            .output()
            .unwrap()
            .into();
        assert!(
            !run.ok && run.stderr.contains("no appliance key at"),
            "{args:?}: {}",
            run.stderr
        );
        assert!(!typo.exists(), "{args:?}");
    }
}

/// A command whose reader stops early (`keygate status | head -3`) ends quietly and
/// successfully, as other command-line tools do; one that cannot write its output (a full
/// disk) says so and fails. Neither panics.
#[test]
fn a_command_whose_output_cannot_be_written_ends_without_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    Served::start(&data).kill();
    let status = |stdout: std::process::Stdio| -> Run {
        command()
            .arg("--data-dir")
            .arg(&data)
            .arg("status")
            .stdout(stdout)
            .output()
            .unwrap()
            .into()
    };
    // A pipe whose reader has gone: the first write fails with EPIPE.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let run = status(writer.into());
    assert!(run.ok && run.stderr.is_empty(), "{}", run.stderr);
    #[cfg(target_os = "linux")]
    {
        let full = std::fs::File::create("/dev/full").unwrap();
        let run = status(full.into());
        assert!(!run.ok, "a status that was not written is not a success");
        assert!(
            run.stderr
                .contains("cannot write to standard output: No space left on device")
                && !run.stderr.contains("panicked"),
            "{}",
            run.stderr
        );
    }
}

/// `keygate status` reads only: a database an older release left (the service stopped
/// after a package upgrade) is told, not migrated by whoever ran the command.
#[test]
fn status_does_not_migrate_a_database() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    Served::start(&data).kill();
    let db = data.join("keygate.db");
    let older = keygate::store::schema_version() - 1;
    rusqlite::Connection::open(&db)
        .unwrap()
        .pragma_update(None, "user_version", older)
        .unwrap();
    let run = keygate(&data, &["status"]);
    assert!(
        !run.ok && run.stderr.contains(&format!("is at schema {older}")),
        "{}",
        run.stderr
    );
    let version: i64 = rusqlite::Connection::open(&db)
        .unwrap()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, older);
    assert!(
        !data.join("backups").exists(),
        "no backup before an upgrade"
    );
}

#[test]
fn restart_keeps_installation_id_and_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let first = Served::start(&data);
    let cert = appliance_cert(&data);
    let agent = pinned_agent(&cert);
    let (_, before) = get_json(&agent, &first.url("/api/v1/appliance"));
    first.kill();

    let second = Served::start(&data);
    assert_eq!(appliance_cert(&data), cert, "the certificate file is kept");
    // The old pin still verifies: the server presents the same certificate.
    let (status, after) = get_json(&agent, &second.url("/api/v1/appliance"));
    assert_eq!(status, 200);
    assert_eq!(after["installation_id"], before["installation_id"]);
    assert_eq!(after["public_key"], before["public_key"]);
}

#[test]
fn the_first_admin_link_is_never_written_to_a_log() {
    let dir = tempfile::tempdir().unwrap();
    // Standard output is a pipe here, as it is to a service's journal.
    let mut child = command()
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut banner = Vec::new();
    for line in lines_within_20_s(child.stdout.take().unwrap()) {
        let last = line.starts_with("first admin:");
        banner.push(line);
        if last {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(banner[0].contains("listening on https://"), "{banner:?}");
    let last = banner.last().unwrap();
    assert!(
        last.contains("keygate admin setup-link")
            && last.contains("keygate admin create NAME --role owner"),
        "{banner:?}"
    );
    assert!(banner.iter().all(|l| !l.contains("token=")), "{banner:?}");

    // On a terminal (`script` gives it one) the link is printed, and the log (every level,
    // in files) holds no trace of it.
    let logs = dir.path().join("logs");
    let line = format!(
        "exec {BIN} --data-dir {} serve --listen 127.0.0.1:0",
        dir.path().join("tty").display()
    );
    let mut child = std::process::Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .env("KEYGATE_LOG_LEVEL", "trace")
        .env("KEYGATE_LOG_DIR", &logs)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Read apart, with a deadline: the appliance never ends by itself.
    let link = lines_within_20_s(child.stdout.take().unwrap())
        .find(|line| line.starts_with("first admin:"));
    let Some(link) = link else {
        let _ = child.kill();
        panic!("no first admin line on the terminal");
    };
    let token = link
        .split("token=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("a link on a terminal");
    assert!(token.len() >= 20, "{link}");
    std::thread::sleep(std::time::Duration::from_secs(1));
    let mut logged = String::new();
    for file in std::fs::read_dir(&logs).unwrap() {
        logged += &std::fs::read_to_string(file.unwrap().path()).unwrap();
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        logged.contains("TRACE") || logged.contains("DEBUG"),
        "{logged}"
    );
    assert!(!logged.contains(token), "the link's token is in the log");
}

#[test]
fn plain_http_gets_no_answer() {
    let dir = tempfile::tempdir().unwrap();
    let served = Served::start(&dir.path().join("data"));
    // Raw bytes: an HTTP client would take a 400 page or a redirect for an error too.
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(served.addr).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: keygate\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer); // EOF, a reset or a TLS alert
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plain HTTP must not be served: {:?}",
        String::from_utf8_lossy(&answer)
    );
}

/// Another vendor's license never replaces one (vendors may number alike); the same vendor
/// under a rotated key renews it, and the retired key can be taken off.
#[test]
fn another_vendors_license_with_the_same_id_replaces_nothing() {
    let acme = Vendor::new();
    let (_dir, data) = appliance_trusting(&acme);
    let other = Vendor::new();
    assert!(keygate(&data, &["trust", other.pub_path().to_str().unwrap()]).ok);
    let v1 = acme.issue_file(&data, SIMPLE_ITEMS, &[], "v1.lic");
    assert!(import(&data, &v1).ok);
    let digest = db_digest(&data.join("keygate.db"));
    // Another trusted vendor happens to number its license alike, with a higher version.
    let theirs = SIMPLE_ITEMS.replace("Acme Imaging", "Other Corp");
    let v2 = other.issue_file(&data, &theirs, &["--version", "2"], "theirs.lic");
    let run = import(&data, &v2);
    assert!(!run.ok);
    assert!(
        run.stderr.contains("is from vendor \"Acme Imaging\"")
            && run.stderr.contains("\"Other Corp\""),
        "{}",
        run.stderr
    );
    assert_eq!(db_digest(&data.join("keygate.db")), digest);
    // The same vendor under a new signing key (a key rotation) still renews it.
    let rotated = Vendor::new();
    assert!(keygate(&data, &["trust", rotated.pub_path().to_str().unwrap()]).ok);
    let v2 = rotated.issue_file(&data, SIMPLE_ITEMS, &["--version", "2"], "v2.lic");
    let run = import(&data, &v2);
    assert!(
        run.ok && run.stdout.contains("version 2 supersedes version 1"),
        "{}",
        run.stderr
    );
    // The console lists the key ids trusted, for `untrust`.
    let status = keygate(&data, &["status"]).stdout;
    assert!(
        status.contains("trusted vendors:  3 (key ids ") && status.contains(&kid(&acme)),
        "{status}"
    );
    // The retired key is taken off (its id as typed, in any case): files it signs are
    // refused from then on; the licenses imported stay.
    let run = keygate(
        &data,
        &["untrust", &format!(" {} ", kid(&acme).to_uppercase())],
    );
    assert!(run.ok, "{}", run.stderr);
    let v3 = acme.issue_file(&data, SIMPLE_ITEMS, &["--version", "3"], "v3.lic");
    let run = import(&data, &v3);
    assert!(
        !run.ok && run.stderr.contains("does not trust"),
        "{}",
        run.stderr
    );
    assert!(keygate(&data, &["licenses"]).stdout.contains("LIC-0042-1"));
    let run = keygate(&data, &["untrust", &kid(&acme)]);
    assert!(
        !run.ok && run.stderr.contains("is not trusted"),
        "{}",
        run.stderr
    );
    let audit = rusqlite::Connection::open(data.join("keygate.db"))
        .unwrap()
        .query_row(
            "SELECT count(*) FROM audit_log WHERE action = 'vendor key untrusted'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .unwrap();
    assert_eq!(audit, 1);
}

/// The kid of a vendor's public key.
fn kid(vendor: &Vendor) -> String {
    let pem = std::fs::read_to_string(vendor.pub_path()).unwrap();
    keygate_sdk::keys::kid(&keygate_sdk::keys::public_key_from_pem(&pem).unwrap())
}

/// A restore rolls back the appliance's records, not the admin's trust: a vendor key
/// untrusted since the backup (leaked, say) stays untrusted, and one trusted since stays
/// trusted, so the licenses it signs keep importing; the restore says which.
#[test]
fn a_restore_keeps_the_vendor_keys_trusted_now() {
    let acme = Vendor::new();
    let (_dir, data) = appliance_trusting(&acme);
    assert!(import(&data, &acme.issue_file(&data, SIMPLE_ITEMS, &[], "v1.lic")).ok);
    let backup = backup_now(&data);
    let rotated = Vendor::new();
    assert!(keygate(&data, &["trust", rotated.pub_path().to_str().unwrap()]).ok);
    assert!(keygate(&data, &["untrust", &kid(&acme)]).ok);

    let run = keygate(&data, &["restore", backup.to_str().unwrap()]);
    assert!(run.ok, "{}", run.stderr);
    for said in [
        format!("vendor key {} ", kid(&acme)),
        "untrusted since the backup, stays untrusted".into(),
        format!("vendor key {} ", kid(&rotated)),
        "trusted since the backup, stays trusted".into(),
    ] {
        assert!(run.stdout.contains(&said), "{said}: {}", run.stdout);
    }
    let v2 = acme.issue_file(&data, SIMPLE_ITEMS, &["--version", "2"], "v2.lic");
    let run = import(&data, &v2);
    assert!(
        !run.ok && run.stderr.contains("does not trust"),
        "{}",
        run.stderr
    );
    let v2 = rotated.issue_file(&data, SIMPLE_ITEMS, &["--version", "2"], "r2.lic");
    let run = import(&data, &v2);
    assert!(run.ok, "{}", run.stderr);

    // With no database to replace (new hardware, the appliance key put in place) the
    // backup's trust is all there is: it stays.
    std::fs::remove_file(data.join("keygate.db")).unwrap();
    let run = keygate(&data, &["restore", backup.to_str().unwrap()]);
    assert!(
        run.ok && !run.stdout.contains("vendor key"),
        "{}{}",
        run.stdout,
        run.stderr
    );
    let v3 = acme.issue_file(&data, SIMPLE_ITEMS, &["--version", "3"], "v3.lic");
    let run = import(&data, &v3);
    assert!(run.ok, "{}", run.stderr);
}

/// `--out` never writes over a private key (a mistyped `--out vendor.key` destroyed the
/// vendor's signing key); another file is replaced whole, nothing left beside it.
#[test]
fn output_files_never_replace_a_private_key() {
    let vendor = Vendor::new();
    let (dir, data) = appliance_trusting(&vendor);
    let key = std::fs::read(vendor.key_path()).unwrap();
    let out = |path: &Path| {
        keygate(
            &data,
            &["activation-request", "--out", path.to_str().unwrap()],
        )
    };
    let run = out(&vendor.key_path());
    assert!(
        !run.ok && run.stderr.contains("holds a private key"),
        "{}",
        run.stderr
    );
    assert_eq!(std::fs::read(vendor.key_path()).unwrap(), key);
    let request = dir.path().join("request.txt");
    std::fs::write(
        &request,
        "an older request, longer than the new one would ever be\n".repeat(50),
    )
    .unwrap();
    let run = out(&request);
    assert!(run.ok, "{}", run.stderr);
    let written = std::fs::read_to_string(&request).unwrap();
    assert!(
        keygate::vendor::read_activation_request(&written).is_ok() && !written.contains("older"),
        "{written}"
    );
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
    #[cfg(unix)]
    {
        // A link is followed: to the key, refused; to a file, that file is written.
        let link = dir.path().join("link.txt");
        std::os::unix::fs::symlink(vendor.key_path(), &link).unwrap();
        assert!(!out(&link).ok);
        assert_eq!(std::fs::read(vendor.key_path()).unwrap(), key);
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(&request, &link).unwrap();
        std::fs::write(&request, "older").unwrap();
        assert!(out(&link).ok);
        assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
        assert!(!std::fs::read_to_string(&request).unwrap().contains("older"));
        // Not a file (a pipe here): written to as it is, never read first (it hung).
        let run: Run = ends_within_20_s(
            command().arg("--data-dir").arg(&data).args([
                "activation-request",
                "--out",
                "/dev/stdout",
            ]),
            "--out /dev/stdout hung",
        )
        .into();
        // The request alone: "wrote" would go into the same pipe.
        assert!(
            run.ok && keygate::vendor::read_activation_request(&run.stdout).is_ok(),
            "{}{}",
            run.stdout,
            run.stderr
        );
    }
}

/// `vendor issue` refuses an items file's time that is past the year 9999 (or before the
/// year 0) once in UTC, and says which (it panicked), and one with a fraction of a second
/// (the appliance would refuse the license it makes).
#[test]
fn vendor_issue_refuses_a_time_past_the_year_9999() {
    let vendor = Vendor::new();
    let (_dir, data) = appliance_trusting(&vendor);
    for (written, given, refusal) in [
        (
            "expires_at = 2036-01-01T00:00:00Z",
            "expires_at = 9999-12-31T23:30:00-01:00",
            "expires_at 9999-12-31T23:30:00-01:00 is not between",
        ),
        (
            "starts_at = 2026-01-01T00:00:00Z",
            "starts_at = 0000-01-01T00:00:00+01:00",
            "starts_at 0000-01-01T00:00:00+01:00 is not between",
        ),
        (
            "starts_at = 2026-01-01T00:00:00Z",
            "starts_at = 2026-01-01T00:00:00.5Z",
            "starts_at 2026-01-01T00:00:00.5Z must be a whole second",
        ),
    ] {
        let run = vendor.issue(&data, &SIMPLE_ITEMS.replace(written, given), &[]);
        assert!(
            !run.ok && run.stderr.contains(refusal) && !run.stderr.contains("panicked"),
            "{given}: {}",
            run.stderr
        );
    }
}

#[test]
fn reimport_changes_nothing_and_a_higher_version_supersedes() {
    let vendor = Vendor::new();
    let (_dir, data) = appliance_trusting(&vendor);
    let v1 = vendor.issue_file(&data, SIMPLE_ITEMS, &[], "v1.lic");
    assert!(import(&data, &v1).ok);
    let digest = db_digest(&data.join("keygate.db"));
    let run = import(&data, &v1);
    assert!(run.ok, "{}", run.stderr);
    assert!(run.stdout.contains("already imported; nothing changed"));
    assert_eq!(db_digest(&data.join("keygate.db")), digest);

    let renewed = SIMPLE_ITEMS.replace("quota = 100", "quota = 250");
    let v2 = vendor.issue_file(&data, &renewed, &["--version", "2"], "v2.lic");
    let run = import(&data, &v2);
    assert!(run.ok, "{}", run.stderr);
    assert!(
        run.stdout.contains("version 2 supersedes version 1"),
        "{}",
        run.stdout
    );
    let run = keygate(&data, &["licenses"]);
    assert!(run.stdout.contains(" 250 "), "{}", run.stdout);
    assert_eq!(run.stdout.matches("LIC-0042-1").count(), 1);
}

#[test]
fn every_refusal_names_its_reason_and_changes_nothing() {
    let vendor = Vendor::new();
    let (dir, data) = appliance_trusting(&vendor);
    let v2 = vendor.issue_file(&data, SIMPLE_ITEMS, &["--version", "2"], "v2.lic");
    assert!(import(&data, &v2).ok);
    let db = data.join("keygate.db");
    let digest = db_digest(&db);

    let request = keygate(&data, &["activation-request"]).stdout;
    let binding = keygate::vendor::read_activation_request(&request).unwrap();
    let payload = |items: serde_json::Value| {
        json!({
            "v": 1, "license_id": "LIC-RAW", "version": 1, "vendor": "Acme Imaging",
            "organization_id": "200001", "issued_at": "2026-01-01T00:00:00Z",
            "appliance": {"installation_id": binding.installation_id, "public_key": binding.public_key},
            "items": items
        })
    };
    let item = |changes: serde_json::Value| {
        let mut item = json!({
            "item_id": "LIC-RAW-1", "product": "barcode-reader", "model": "per_device",
            "quota": 10, "starts_at": "2026-01-01T00:00:00Z",
            "expires_at": "2027-01-01T00:00:00Z", "offline_days": 7, "features": []
        });
        for (k, v) in changes.as_object().unwrap() {
            if v.is_null() {
                item.as_object_mut().unwrap().remove(k);
            } else {
                item[k] = v.clone();
            }
        }
        json!([item])
    };

    let with = |changes: serde_json::Value| {
        let mut license = payload(item(json!({})));
        for (k, v) in changes.as_object().unwrap() {
            license[k] = v.clone();
        }
        vendor.sign_raw_license(&license)
    };
    let good_bytes = serde_json::to_string(&payload(item(json!({})))).unwrap();
    let stranger = Vendor::new();
    let other = tempfile::tempdir().unwrap();
    let other_data = other.path().join("data");
    let good_raw = vendor.sign_raw_license(&payload(item(json!({}))));
    let (head, _) = good_raw.trim().rsplit_once('.').unwrap();
    let cases: Vec<(&str, String, &str)> = vec![
        ("tampered", tamper(&good_raw), "signature does not verify"),
        (
            "forged signature",
            format!("{head}.{}", "A".repeat(86)),
            "signature does not verify",
        ),
        (
            "untrusted vendor",
            std::fs::read_to_string(stranger.issue_file(&data, SIMPLE_ITEMS, &[], "s.lic"))
                .unwrap(),
            "does not trust",
        ),
        (
            "another appliance",
            std::fs::read_to_string(vendor.issue_file(
                &other_data,
                SIMPLE_ITEMS,
                &["--license-id", "LIC-OTHER"],
                "o.lic",
            ))
            .unwrap(),
            "bound to another appliance",
        ),
        (
            "lower version",
            std::fs::read_to_string(vendor.issue_file(
                &data,
                SIMPLE_ITEMS,
                &["--version", "1"],
                "v1.lic",
            ))
            .unwrap(),
            "older than the imported version 2",
        ),
        (
            "same version, other content",
            std::fs::read_to_string(vendor.issue_file(
                &data,
                &SIMPLE_ITEMS.replace("quota = 100", "quota = 99"),
                &["--version", "2"],
                "v2b.lic",
            ))
            .unwrap(),
            "already imported with different content",
        ),
        (
            "unknown model",
            vendor.sign_raw_license(&payload(item(json!({"model": "per_seat"})))),
            "unknown model \"per_seat\"",
        ),
        (
            "missing field",
            vendor.sign_raw_license(&payload(item(json!({"quota": null})))),
            "missing field `quota`",
        ),
        // A product no device can send (it would import and never serve one), a vendor name
        // whose bidirectional mark would reorder what admins read.
        (
            "bidirectional mark in the product",
            vendor.sign_raw_license(&payload(item(json!({"product": "barcode\u{202E}reader"})))),
            "must not contain control characters or bidirectional marks",
        ),
        (
            "bidirectional mark in the vendor",
            with(json!({"vendor": "Acme\u{2066} Imaging"})),
            "vendor must be at most 128 characters without control characters or bidirectional marks",
        ),
        // Text not validated yet reaches the terminal escaped, not as a control sequence.
        (
            "escape sequence in an item id",
            vendor.sign_raw_license(&payload(item(
                json!({"item_id": "X\u{1b}[2J", "model": "per_seat"}),
            ))),
            "item \"X\\u{1b}[2J\" has unknown model",
        ),
        // In range as written, past 9999 once in UTC: it would read as 1970 everywhere.
        (
            "expiry past the year 9999 in UTC",
            vendor.sign_raw_license(&payload(item(
                json!({"expires_at": "9999-12-31T23:30:00-01:00"}),
            ))),
            "expires_at 9999-12-31T23:30:00-01:00 is not between 0000-01-01T00:00:00Z and 9999-12-31T23:59:59Z",
        ),
        // The specification's times are UTC, and the appliance keeps them to the second: a
        // start at .9 s would serve from the whole second, which the device's check refuses.
        (
            "a time in another offset",
            vendor.sign_raw_license(&payload(item(
                json!({"starts_at": "2026-01-01T02:00:00+02:00"}),
            ))),
            "starts_at 2026-01-01T02:00:00+02:00 must be written in UTC",
        ),
        (
            "a time with a fraction of a second",
            vendor.sign_raw_license(&payload(item(
                json!({"starts_at": "2026-01-01T00:00:00.9Z"}),
            ))),
            "starts_at 2026-01-01T00:00:00.9Z must be a whole second",
        ),
        (
            "zero quota",
            vendor.sign_raw_license(&payload(item(json!({"quota": 0})))),
            "quota must be greater than 0",
        ),
        (
            "negative quota",
            vendor.sign_raw_license(&payload(item(json!({"quota": -5})))),
            "quota must be greater than 0",
        ),
        (
            "expires before starts",
            vendor.sign_raw_license(&payload(item(
                json!({"expires_at": "2025-01-01T00:00:00Z"}),
            ))),
            "must be after starts_at",
        ),
        (
            "no items",
            vendor.sign_raw_license(&payload(json!([]))),
            "has no items",
        ),
        (
            "per_usage without counter",
            vendor.sign_raw_license(&payload(item(json!({"model": "per_usage"})))),
            "needs the counter",
        ),
        (
            "garbage",
            "this is not a license\n".into(),
            "not a signed license",
        ),
        ("empty", "# only a comment\n".into(), "holds no license"),
        (
            "two tokens",
            format!("{good_raw}{good_raw}"),
            "more than one line",
        ),
        // Wrapped at 76 columns by an email client: the message says to join the lines.
        (
            "wrapped",
            good_raw
                .trim()
                .as_bytes()
                .chunks(76)
                .map(|line| format!("{}\n", std::str::from_utf8(line).unwrap()))
                .collect(),
            "join its lines",
        ),
        (
            "a vendor key instead",
            std::fs::read_to_string(vendor.pub_path()).unwrap(),
            "a key or certificate (PEM), not a license",
        ),
        (
            "activation request instead",
            request.clone(),
            "not a license",
        ),
        (
            "another organization",
            std::fs::read_to_string(vendor.issue_file(
                &data,
                SIMPLE_ITEMS,
                &["--version", "3", "--organization", "300002"],
                "v3.lic",
            ))
            .unwrap(),
            "is for organization 200001; a version for organization 300002 cannot replace it",
        ),
        (
            "an item moved to another product",
            std::fs::read_to_string(vendor.issue_file(
                &data,
                &SIMPLE_ITEMS.replace("\"barcode-reader\"", "\"label-printer\""),
                &["--version", "3"],
                "v3p.lic",
            ))
            .unwrap(),
            "item LIC-0042-1 cannot change its product (\"barcode-reader\" to \"label-printer\")",
        ),
        (
            "an item made concurrent_instance",
            std::fs::read_to_string(vendor.issue_file(
                &data,
                &SIMPLE_ITEMS.replace(
                    "model = \"per_device\"",
                    "model = \"concurrent_instance\"\nmax_exceptions = 5",
                ),
                &["--version", "3"],
                "v3m.lic",
            ))
            .unwrap(),
            "item LIC-0042-1 cannot change its model from per_device to concurrent_instance",
        ),
        (
            "this installation id with another key",
            with(json!({"appliance": {
                "installation_id": binding.installation_id,
                "public_key": keygate_sdk::keys::public_key_b64(&stranger.signing_key().verifying_key()),
            }})),
            "bound to another appliance (installation id",
        ),
        (
            "control character in the vendor",
            with(json!({"vendor": "Acme\nImaging"})),
            "vendor must be at most 128 characters without control characters",
        ),
        (
            "control character in the product",
            vendor.sign_raw_license(&payload(item(json!({"product": "bar\u{7}code"})))),
            "must not contain control characters",
        ),
        (
            "product too long",
            vendor.sign_raw_license(&payload(item(json!({"product": "é".repeat(129)})))),
            "product must be at most 128 characters (it has 129)",
        ),
        (
            "feature too long",
            vendor.sign_raw_license(&payload(item(json!({"features": ["x".repeat(65)]})))),
            "a feature must be at most 64 characters",
        ),
        (
            "too many features",
            vendor.sign_raw_license(&payload(item(
                json!({"features": (0..65).map(|n| n.to_string()).collect::<Vec<_>>()}),
            ))),
            "at most 64 features",
        ),
        (
            "a key given twice",
            vendor.sign_license_bytes(
                good_bytes
                    .replacen("\"version\":1", "\"version\":1,\"version\":7", 1)
                    .as_bytes(),
                None,
            ),
            "duplicate field `version`",
        ),
        (
            "a critical header extension",
            vendor.sign_license_bytes(good_bytes.as_bytes(), Some(json!(["b64"]))),
            "critical extensions",
        ),
        (
            "no document type",
            {
                let key = vendor.signing_key();
                let header = keygate_sdk::jws::Header {
                    alg: "EdDSA".into(),
                    typ: None,
                    kid: Some(keygate_sdk::keys::kid(&key.verifying_key())),
                    crit: None,
                };
                keygate_sdk::jws::sign_raw(&header, good_bytes.as_bytes(), &key)
            },
            "document type is not given (no typ)",
        ),
    ];
    for (name, text, reason) in cases {
        let path = dir.path().join("bad.lic");
        std::fs::write(&path, &text).unwrap();
        let run = import(&data, &path);
        assert!(!run.ok, "{name}: accepted");
        assert!(
            run.stderr.contains(reason),
            "{name}: {:?} lacks {reason:?}",
            run.stderr
        );
        assert_eq!(
            run.stderr.trim().lines().count(),
            1,
            "{name}: one sentence: {}",
            run.stderr
        );
        assert_eq!(db_digest(&db), digest, "{name}: the database changed");
    }
    // Saved as "Unicode" by Notepad: UTF-16 with its byte order mark.
    let path = dir.path().join("utf16.lic");
    let utf16: Vec<u8> = [0xFF, 0xFE]
        .into_iter()
        .chain(good_raw.encode_utf16().flat_map(u16::to_le_bytes))
        .collect();
    std::fs::write(&path, utf16).unwrap();
    let run = import(&data, &path);
    assert!(
        !run.ok
            && run
                .stderr
                .contains("is not UTF-8 text (a license file is one line of ASCII"),
        "{}",
        run.stderr
    );
    assert_eq!(db_digest(&db), digest, "UTF-16: the database changed");
    // The untouched raw license is accepted: the cases above fail for their own reason. It
    // may start with a byte order mark (as Windows editors save), and a product name counts
    // characters, not bytes.
    let path = dir.path().join("good.lic");
    std::fs::write(&path, format!("\u{feff}# LIC-RAW\n{good_raw}")).unwrap();
    let run = import(&data, &path);
    assert!(run.ok, "{}", run.stderr);
    std::fs::write(
        &path,
        with(json!({"license_id": "LIC-WIDE", "items": item(json!({"item_id": "LIC-WIDE-1", "product": "é".repeat(128)}))})),
    )
    .unwrap();
    let run = import(&data, &path);
    assert!(run.ok, "{}", run.stderr);
    // An organization id of 64 characters gets a default code a device can send (64 at
    // most): its first 55 characters and the random part.
    std::fs::write(
        &path,
        with(
            json!({"license_id": "LIC-LONG", "organization_id": "9".repeat(64),
            "items": item(json!({"item_id": "LIC-LONG-1"}))}),
        ),
    )
    .unwrap();
    let code = default_code(&import(&data, &path));
    assert_eq!(code.len(), 64, "{code}");
    assert!(code.starts_with(&format!("{}-", "9".repeat(55))), "{code}");
}

/// Flips one character in the payload part of the signed line.
fn tamper(license: &str) -> String {
    let mut parts: Vec<String> = license.trim().split('.').map(String::from).collect();
    let payload = &mut parts[1];
    let i = payload.len() / 2;
    let c = payload.as_bytes()[i];
    payload.replace_range(i..i + 1, if c == b'A' { "B" } else { "A" });
    parts.join(".") + "\n"
}

/// A license whose items have expired already imports (it may complete a history), and
/// the console says they serve no device.
#[test]
fn importing_expired_items_says_so() {
    let vendor = Vendor::new();
    let (_dir, data) = appliance_trusting(&vendor);
    let items = SIMPLE_ITEMS
        .replace(
            "starts_at = 2026-01-01T00:00:00Z",
            "starts_at = 2020-01-01T00:00:00Z",
        )
        .replace(
            "expires_at = 2036-01-01T00:00:00Z",
            "expires_at = 2021-01-01T00:00:00Z",
        );
    // Told at the vendor's too: signed all the same (a record, a test).
    let issued = vendor.issue(&data, &items, &[]);
    assert!(
        issued.ok
            && issued
                .stderr
                .contains("note: expired already, so serving no device: LIC-0042-1"),
        "{}",
        issued.stderr
    );
    let run = import(&data, &vendor.issue_file(&data, &items, &[], "old.lic"));
    assert!(run.ok, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("note: expired already, so serving no device: LIC-0042-1"),
        "{}",
        run.stderr
    );

    // A start ahead of the appliance's clock is told; one the items file leaves out is the
    // start of the day before the issue, so a clock hours behind the vendor's serves at once.
    let ahead = SIMPLE_ITEMS.replace("LIC-0042", "LIC-0043").replace(
        "starts_at = 2026-01-01T00:00:00Z",
        "starts_at = 2035-01-01T00:00:00Z",
    );
    let run = import(&data, &vendor.issue_file(&data, &ahead, &[], "ahead.lic"));
    assert!(run.ok, "{}", run.stderr);
    assert!(
        run.stderr.contains(
            "serving no device until 2035-01-01T00:00:00Z or later (is the clock right?): LIC-0043-1"
        ),
        "{}",
        run.stderr
    );
    let unstated = SIMPLE_ITEMS
        .replace("LIC-0042", "LIC-0044")
        .replace("starts_at = 2026-01-01T00:00:00Z\n", "");
    let before = time::OffsetDateTime::now_utc().unix_timestamp();
    let run = import(&data, &vendor.issue_file(&data, &unstated, &[], "now.lic"));
    assert!(run.ok && !run.stderr.contains("note:"), "{}", run.stderr);
    let starts: i64 = rusqlite::Connection::open(data.join("keygate.db"))
        .unwrap()
        .query_row(
            "SELECT starts_at FROM items WHERE item_id = 'LIC-0044-1'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    // The start of the day before the issue (taken between `before` and `now`, which may be
    // either side of midnight).
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert_eq!(starts % 86_400, 0, "a day's start");
    assert!(
        (before - 2 * 86_400..=now - 86_400).contains(&starts),
        "{starts}"
    );
}

#[test]
fn a_second_appliance_refuses_the_first_ones_license() {
    let vendor = Vendor::new();
    let (_a, first) = appliance_trusting(&vendor);
    let (_b, second) = appliance_trusting(&vendor);
    let license = vendor.issue_file(&first, SIMPLE_ITEMS, &[], "first.lic");
    let digest = db_digest(&second.join("keygate.db"));
    let run = import(&second, &license);
    assert!(!run.ok);
    assert!(
        run.stderr.contains("bound to another appliance"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains(&installation_id(&first)));
    assert_eq!(db_digest(&second.join("keygate.db")), digest);
    assert!(import(&first, &license).ok);
}

/// A database moved without its appliance.key (to new hardware, or the key lost) belongs to
/// the appliance that key was: its licenses are bound to it, and every device would refuse
/// what a new key signed. `serve` refuses to start, saying so, and makes no key; with the
/// key put back it serves. Another appliance's database beside this one's key, likewise.
#[test]
fn serve_refuses_a_database_without_its_appliance_key() {
    let vendor = Vendor::new();
    let (_a, data) = appliance_trusting(&vendor);
    let license = vendor.issue_file(&data, SIMPLE_ITEMS, &[], "a.lic");
    assert!(import(&data, &license).ok);
    let id = installation_id(&data);
    let key = std::fs::read(data.join("appliance.key")).unwrap();
    std::fs::remove_file(data.join("appliance.key")).unwrap();
    let digest = db_digest(&data.join("keygate.db"));
    let stderr = serve_refused(&data);
    assert!(
        stderr.contains("belongs to another appliance") && stderr.contains(&id),
        "{stderr}"
    );
    assert!(stderr.contains("appliance.key"), "{stderr}");
    assert!(!data.join("appliance.key").exists(), "no new key is made");
    assert_eq!(db_digest(&data.join("keygate.db")), digest);
    // Nor does an activation request (the vendor would license a key the database is not
    // for).
    let run = keygate(&data, &["activation-request"]);
    assert!(
        !run.ok && run.stderr.contains("belongs to another appliance"),
        "{}",
        run.stderr
    );
    assert!(!data.join("appliance.key").exists(), "no new key is made");
    assert_eq!(db_digest(&data.join("keygate.db")), digest);

    let (_b, other) = appliance_trusting(&vendor);
    let theirs = vendor.issue_file(&other, SIMPLE_ITEMS, &["--version", "2"], "b.lic");
    let other_id = installation_id(&other);
    std::fs::copy(data.join("keygate.db"), other.join("keygate.db")).unwrap();
    let stderr = serve_refused(&other);
    assert!(
        stderr.contains(&id) && stderr.contains(&other_id),
        "{stderr}"
    );
    // An import into it, likewise: the database would hold licenses of two appliances.
    let digest = db_digest(&other.join("keygate.db"));
    let run = import(&other, &theirs);
    assert!(
        !run.ok && run.stderr.contains("belongs to another appliance"),
        "{}",
        run.stderr
    );
    assert_eq!(db_digest(&other.join("keygate.db")), digest);

    std::fs::write(data.join("appliance.key"), key).unwrap();
    let served = Served::start(&data);
    let (status, answer) = get_json(
        &pinned_agent(&appliance_cert(&data)),
        &served.url("/api/v1/appliance"),
    );
    assert_eq!(
        (status, answer["installation_id"].as_str()),
        (200, Some(id.as_str()))
    );
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jose")
}

/// A license made with Python's jwcrypto (tests/fixtures/jose/gen.py) imports.
#[test]
fn a_license_signed_by_another_jose_implementation_imports() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::copy(fixtures().join("appliance.key"), data.join("appliance.key")).unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("appliance.json")).unwrap())
            .unwrap();
    assert_eq!(
        installation_id(&data),
        expected["installation_id"].as_str().unwrap()
    );

    let run = keygate(
        &data,
        &["trust", fixtures().join("vendor.pub").to_str().unwrap()],
    );
    assert!(run.ok, "{}", run.stderr);
    assert!(
        run.stdout
            .contains(expected["vendor_kid"].as_str().unwrap())
    );

    let run = import(&data, &fixtures().join("other-appliance.lic"));
    assert!(
        !run.ok && run.stderr.contains("bound to another appliance"),
        "{}",
        run.stderr
    );

    let run = import(&data, &fixtures().join("license.lic"));
    assert!(run.ok, "{}", run.stderr);
    assert!(
        run.stdout
            .contains("imported license LIC-EXT-1 version 1 with 2 item(s)")
    );
    let run = keygate(&data, &["licenses"]);
    assert!(run.stdout.contains("LIC-EXT-1-2") && run.stdout.contains("per_usage"));
}

/// A keygate license verifies with a standard JOSE library (jwcrypto).
#[test]
fn a_keygate_license_verifies_with_another_jose_implementation() {
    let vendor = Vendor::new();
    let (_dir, data) = appliance_trusting(&vendor);
    let license = vendor.issue_file(&data, SIMPLE_ITEMS, &[], "lic.lic");
    let verify = |key: &Path| {
        std::process::Command::new(python())
            .arg(fixtures().join("verify.py"))
            .arg(&license)
            .arg(key)
            .output()
            .unwrap()
    };
    let out = verify(&vendor.pub_path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let payload: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(payload["license_id"], "LIC-0042");
    assert_eq!(
        payload["appliance"]["installation_id"],
        installation_id(&data).as_str()
    );
    // And the same library refuses it under another key.
    let out = verify(&Vendor::new().pub_path());
    assert!(!out.status.success());
    // The vendor's private key is read by another library too (PKCS#8 v1, as OpenSSL
    // writes it), so a vendor can sign from its own systems.
    let read_key = "import sys\n\
        from cryptography.hazmat.primitives import serialization as s\n\
        key = s.load_pem_private_key(open(sys.argv[1], 'rb').read(), None)\n\
        public = s.load_pem_public_key(open(sys.argv[2], 'rb').read())\n\
        raw = (s.Encoding.Raw, s.PublicFormat.Raw)\n\
        assert key.public_key().public_bytes(*raw) == public.public_bytes(*raw)\n";
    let out = std::process::Command::new(python())
        .args(["-c", read_key])
        .arg(vendor.key_path())
        .arg(vendor.pub_path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `log.dir` puts the log into daily files (relative to the data directory) instead of
/// standard error, a start that fails included: a Windows service has no console.
#[test]
fn the_log_goes_to_daily_files_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let logs = Path::new("logs");
    let served = Served::start_with(
        &data,
        "127.0.0.1:0",
        &[
            ("KEYGATE_LOG_DIR", logs),
            ("KEYGATE_LOG_LEVEL", Path::new("info")),
        ],
    );
    let read_logs = || -> String {
        std::fs::read_dir(data.join(logs))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("keygate.")
            })
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !read_logs().contains("serving") && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(read_logs().contains("serving"), "{}", read_logs());
    // A second keygate on the same data directory cannot start: why is in the files too.
    let refused: Run = command()
        .env("KEYGATE_LOG_DIR", logs)
        .arg("--data-dir")
        .arg(&data)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap()
        .into();
    assert!(!refused.ok);
    let told = read_logs();
    assert!(
        told.lines()
            .any(|l| l.contains("ERROR") && l.contains("keygate is running on this data directory")),
        "{told}"
    );
    // Other commands log to standard error: they make no log file or directory (run as
    // root, it would be root's, and the service could no longer write its log).
    let console: Run = command()
        .env("KEYGATE_LOG_DIR", "console-logs")
        .arg("--data-dir")
        .arg(&data)
        .arg("licenses")
        .output()
        .unwrap()
        .into();
    assert!(console.ok, "{}", console.stderr);
    assert!(!data.join("console-logs").exists());
    drop(served);
}

#[test]
fn configuration_layers_and_refuses_typos() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("keygate.toml");
    std::fs::write(
        &config,
        "listen = \"127.0.0.1:9000\"\n[log]\nlevel = \"debug\"\n",
    )
    .unwrap();
    let mut dump = command();
    dump.args(["--config", config.to_str().unwrap(), "config", "dump"])
        .env("KEYGATE_DATA_DIR", "/srv/keygate");
    // Another program's variable that is not UTF-8 is none of keygate's business.
    #[cfg(unix)]
    dump.env(
        "LEGACY_LOCALE_NAME",
        <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"caf\xe9"),
    );
    let run: Run = dump.output().unwrap().into();
    assert!(run.ok, "{}", run.stderr);
    // One of keygate's own that is not UTF-8 is refused, not read with a character lost.
    #[cfg(unix)]
    {
        let run: Run = command()
            .args(["config", "dump"])
            .env(
                "KEYGATE_DATA_DIR",
                <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"/srv/caf\xe9"),
            )
            .output()
            .unwrap()
            .into();
        assert!(
            !run.ok && run.stderr.contains("KEYGATE_DATA_DIR is not valid UTF-8"),
            "{}",
            run.stderr
        );
        // The same given as an argument is taken, and `config dump` says it cannot show it.
        let run: Run = command()
            .arg("--data-dir")
            .arg(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"/srv/caf\xe9"))
            .args(["config", "dump"])
            .output()
            .unwrap()
            .into();
        assert!(
            !run.ok
                && run.stderr.contains("cannot be written as TOML")
                && !run.stderr.contains("panicked"),
            "{}",
            run.stderr
        );
    }
    assert!(run.stdout.contains("listen = \"127.0.0.1:9000\""));
    assert!(run.stdout.contains("data_dir = \"/srv/keygate\""));

    std::fs::write(&config, "lisen = \"127.0.0.1:9000\"\n").unwrap();
    let run: Run = command()
        .args(["--config", config.to_str().unwrap(), "config", "dump"])
        .output()
        .unwrap()
        .into();
    assert!(!run.ok && run.stderr.contains("lisen"), "{}", run.stderr);

    let run: Run = command()
        .args(["config", "dump"])
        .env("KEYGATE_LISTNE", "x")
        .output()
        .unwrap()
        .into();
    assert!(
        !run.ok && run.stderr.contains("KEYGATE_LISTNE"),
        "{}",
        run.stderr
    );
}

/// Changes made at the console are in the audit log like the portal's (actor `cli`), each
/// in the transaction of its change: a refused one leaves no entry.
#[test]
fn console_changes_are_audited_and_refused_ones_are_not() {
    let f = Fixture::new(&item("reader", "per_device", 10, ""));
    f.authorized("reader", 1);
    let ok = |args: &[&str]| {
        let run = keygate(&f.data, args);
        assert!(run.ok, "{args:?}: {}", run.stderr);
    };
    ok(&["handshake", "create", "--organization", "200001", "LAB"]);
    assert!(
        !keygate(
            &f.data,
            &["handshake", "create", "--organization", "200001", "LAB"]
        )
        .ok
    );
    // A name the portal refuses is refused here too (it is shown on terminals).
    let hostile = keygate(
        &f.data,
        &[
            "handshake",
            "create",
            "--organization",
            "200001",
            "--name",
            "lab\u{1b}[2J",
            "LAB2",
        ],
    );
    assert!(
        !hostile.ok && hostile.stderr.contains("without control characters"),
        "{}",
        hostile.stderr
    );
    assert!(set_password(&f.data, "LAB", "a long session password").ok);
    ok(&["handshake", "assign", "LIC-T-1", "LAB"]);
    ok(&["trial", "on"]);
    let again = keygate(&f.data, &["trial", "on"]);
    assert!(
        again.ok && again.stdout.contains("public trial already on"),
        "{}",
        again.stdout
    );
    ok(&["device", "block", &device_uuid(1)]);
    assert!(
        !keygate(&f.data, &["device", "block", &device_uuid(2)]).ok,
        "no such device"
    );
    ok(&["alerts", "recipients", "it@plant.test"]);
    ok(&["alerts", "smtp", "--host", "mail.plant.test"]);
    ok(&["device", "unblock", &device_uuid(1)]);
    ok(&["device", "remove", &device_uuid(1)]);
    assert!(!set_password(&f.data, "NOPE", "a long session password").ok);
    ok(&["backup"]);
    let entries: Vec<(String, String, String)> = f
        .db()
        .prepare("SELECT actor, action, target FROM audit_log ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let kid = keygate_sdk::keys::kid(
        &keygate_sdk::keys::public_key_from_pem(
            &std::fs::read_to_string(f.vendor.pub_path()).unwrap(),
        )
        .unwrap(),
    );
    let backup = std::fs::read_dir(f.data.join("backups"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .next()
        .unwrap();
    let device = device_uuid(1);
    let actions: Vec<(&str, &str)> = entries
        .iter()
        .map(|(actor, action, target)| {
            assert_eq!(actor, "cli");
            (action.as_str(), target.as_str())
        })
        .collect();
    assert_eq!(
        actions,
        [
            ("vendor key trusted", kid.as_str()),
            ("license imported", "LIC-T"),
            ("handshake create", "LAB"),
            ("handshake password", "LAB"),
            ("handshake assign", "LAB"),
            ("handshake trial", ""),
            ("device blocked", device.as_str()),
            ("alert recipients set", "it@plant.test"),
            ("SMTP server set", "mail.plant.test:587"),
            ("device unblocked", device.as_str()),
            ("device removed", device.as_str()),
            ("backup taken", backup.as_str()),
        ]
    );
}

/// An admin running a command as themselves on the service's data directory is told that
/// the directory is not theirs to read, and how to run the command, not that its database
/// or appliance key is missing (which invites the wrong recovery).
#[cfg(unix)]
#[test]
fn a_data_directory_the_user_may_not_read_is_told_as_such() {
    use std::os::unix::fs::PermissionsExt;
    let vendor = Vendor::new();
    let (dir, data) = appliance_trusting(&vendor);
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap();
    let run = |args: &[&str]| -> String {
        let out = if root {
            // Root reads anything: another user runs a copy of the binary it may execute.
            let bin = dir.path().join("keygate");
            std::fs::copy(BIN, &bin).unwrap();
            for path in [dir.path(), bin.as_path()] {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
            std::process::Command::new("runuser")
                .args(["-u", "nobody", "--"])
                .arg(&bin)
                .arg("--data-dir")
                .arg(&data)
                .args(args)
                .output()
                .unwrap()
        } else {
            command()
                .arg("--data-dir")
                .arg(&data)
                .args(args)
                .output()
                .unwrap()
        };
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let mode = if root { 0o700 } else { 0o000 };
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(mode)).unwrap();
    for args in [&["status"][..], &["licenses"][..]] {
        let stderr = run(args);
        assert!(
            stderr.contains("Permission denied") && stderr.contains("runuser -u keygate"),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("no keygate database") && !stderr.contains("no appliance key"));
    }
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
}

/// A backup taken before an organization's first license: the restore imports that license
/// again (licenses are never rolled back) and keeps the organization's default handshake
/// code, the one its devices were given, instead of making up a new one.
#[test]
fn a_restore_keeps_the_default_handshake_code_the_devices_were_given() {
    let vendor = Vendor::new();
    let (_dir, data) = appliance_trusting(&vendor);
    let backup = backup_now(&data);
    let file = vendor.issue_file(
        &data,
        &items_file("LIC-R", &item("reader", "per_device", 10, "")),
        &[],
        "r.lic",
    );
    let code = default_code(&import(&data, &file));
    let run = keygate(&data, &["restore", backup.to_str().unwrap()]);
    assert!(run.ok, "{}", run.stderr);
    assert!(
        run.stdout
            .contains(&format!("default handshake code is {code}")),
        "{}",
        run.stdout
    );
    let list = keygate(&data, &["handshake", "list"]);
    assert!(list.stdout.contains(&code), "{}", list.stdout);
}

/// A console change and a restore never overlap: a restore waits for the commands that have
/// the database open and refuses to replace it under one (the change would land in the
/// database it puts aside), and a command refuses to run while a restore replaces it.
#[test]
fn a_console_change_never_lands_in_a_database_a_restore_puts_aside() {
    let vendor = Vendor::new();
    let (_dir, data) = appliance_trusting(&vendor);
    let backup = backup_now(&data);
    let db = data.join("keygate.db");
    let before = db_digest(&db);

    // A command is changing the database (an import, say): the restore refuses.
    let writing = keygate::store::backup::console_lock(&data, false).unwrap();
    let run = keygate(&data, &["restore", backup.to_str().unwrap()]);
    assert!(
        !run.ok && run.stderr.contains("another keygate command"),
        "{}",
        run.stderr
    );
    assert_eq!(db_digest(&db), before);
    let aside = std::fs::read_dir(&data)
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().contains("before-restore"));
    assert!(!aside, "a refused restore puts no database aside");
    // Two commands run side by side.
    let file = vendor.issue_file(
        &data,
        &items_file("LIC-L", &item("reader", "per_device", 10, "")),
        &[],
        "l.lic",
    );
    assert!(import(&data, &file).ok);
    drop(writing);

    // A restore is replacing the database: a command refuses and changes nothing.
    let other = vendor.issue_file(
        &data,
        &items_file("LIC-M", &item("reader", "per_device", 10, "")),
        &[],
        "m.lic",
    );
    let restoring = keygate::store::backup::console_lock(&data, true).unwrap();
    let before = db_digest(&db);
    let run = import(&data, &other);
    assert!(
        !run.ok && run.stderr.contains("a restore is replacing the database"),
        "{}",
        run.stderr
    );
    assert_eq!(db_digest(&db), before);
    drop(restoring);
    assert!(import(&data, &other).ok);
}

/// A backup taken at the console as root (before the service's first scheduled one) leaves
/// the backup directory and file the service's, as the database is: root's would fail every
/// later backup of the service, its downloads and its retention. So are the lock files a
/// command run as root makes.
#[cfg(unix)]
#[test]
fn a_backup_taken_as_root_stays_the_services() {
    use std::os::unix::fs::MetadataExt;
    let is_root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    if !is_root {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI must run this test as root"
        );
        eprintln!("not run: needs root");
        return;
    }
    let vendor = Vendor::new();
    let (_dir, data) = appliance_trusting(&vendor);
    // The service's user owns the data directory and the database (nobody, here).
    let nobody = 65534;
    for path in [data.clone(), data.join("keygate.db")] {
        std::os::unix::fs::chown(&path, Some(nobody), Some(nobody)).unwrap();
    }
    let _ = std::fs::remove_dir_all(data.join("backups"));
    // Lock files an earlier release left root's (made or not, the service must open them).
    std::fs::write(data.join("keygate.lock"), "").unwrap();
    let _ = std::fs::remove_file(data.join("keygate.console.lock"));
    let file = backup_now(&data);
    let backups = data.join("backups");
    // The locks too (a lock of root's, the service could not open).
    assert!(keygate(&data, &["restore", file.to_str().unwrap()]).ok);
    let locks = ["keygate.lock", "keygate.console.lock"].map(|l| data.join(l));
    for path in [&backups, &file, &locks[0], &locks[1]] {
        let meta = std::fs::metadata(path).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid()),
            (nobody, nobody),
            "{}",
            path.display()
        );
    }
}

/// A command that reads a password names an unknown target before the password is typed,
/// not after.
#[test]
fn an_unknown_target_is_told_before_its_password_is_asked() {
    let vendor = Vendor::new();
    let (_dir, data) = appliance_trusting(&vendor);
    let mut first = command()
        .arg("--data-dir")
        .arg(&data)
        .args(["admin", "create", "olivia"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    writeln!(first.stdin.take().unwrap(), "correct horse battery").unwrap();
    assert!(first.wait().unwrap().success());
    for (args, told) in [
        (
            &["handshake", "set-password", "NO-SUCH-CODE"][..],
            "no handshake code",
        ),
        (
            &["admin", "reset-password", "nobody"][..],
            "no admin named nobody",
        ),
        (&["admin", "create", "olivia"][..], "already exists"),
    ] {
        // Nothing on standard input: asked for, the password would be empty.
        let run: Run = command()
            .arg("--data-dir")
            .arg(&data)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
            .into();
        assert!(
            !run.ok && run.stderr.contains(told),
            "{args:?}: {}",
            run.stderr
        );
    }
}

/// Console mistakes that must change nothing: `status` makes no lock file (run as root, it
/// would be root's and the service could not open it), and `--out` never writes over the
/// database.
#[test]
fn status_makes_no_lock_and_out_never_replaces_the_database() {
    let vendor = Vendor::new();
    let (_dir, data) = appliance_trusting(&vendor);
    let _ = std::fs::remove_file(data.join("keygate.lock"));
    let _ = std::fs::remove_file(data.join("keygate.console.lock"));
    assert!(keygate(&data, &["status"]).ok);
    assert!(!data.join("keygate.lock").exists());
    assert!(!data.join("keygate.console.lock").exists());
    let db = data.join("keygate.db");
    let before = db_digest(&db);
    let run = keygate(
        &data,
        &["activation-request", "--out", db.to_str().unwrap()],
    );
    assert!(
        !run.ok
            && run
                .stderr
                .contains("holds a database: refusing to write over it"),
        "{}",
        run.stderr
    );
    assert_eq!(db_digest(&db), before);
    assert!(keygate(&data, &["status"]).ok);
}

/// An activation request whose output cannot be written sets up no appliance.
#[test]
fn an_activation_request_to_nowhere_sets_up_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = dir.path().join("no-such-dir").join("request.txt");
    let run = keygate(
        &data,
        &["activation-request", "--out", out.to_str().unwrap()],
    );
    assert!(
        !run.ok && run.stderr.contains("there is no directory"),
        "{}",
        run.stderr
    );
    assert!(!data.exists());
}

/// An error tells its cause once (a cause given as the error's source as well as in its
/// message was printed twice).
#[test]
fn an_error_tells_its_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("keygate.toml");
    let run: Run = command()
        .arg("--config")
        .arg(&missing)
        .arg("status")
        .output()
        .unwrap()
        .into();
    assert!(!run.ok);
    assert_eq!(
        run.stderr.matches("No such file or directory").count(),
        1,
        "{}",
        run.stderr
    );
}
