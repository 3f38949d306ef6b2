//! Issue 5: usage alerts to a real SMTP server, error notices, backups and restore,
//! housekeeping at the day boundaries.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use time::Duration;

use crate::helpers::*;

fn authorize_devices(f: &Fixture, product: &str, range: std::ops::RangeInclusive<u32>) {
    for n in range {
        f.authorized(product, n);
    }
}

#[test]
fn alerts_cross_exact_thresholds_once_in_one_email_and_reset_on_renewal() {
    let f = Fixture::new(&item("reader", "per_device", 100, ""));
    let sink = SmtpSink::start();
    sink.configure(&f.data);
    authorize_devices(&f, "reader", 1..=74);
    assert_eq!(f.app.run_job("alerts").unwrap(), "no new threshold crossed");
    authorize_devices(&f, "reader", 75..=75);
    f.app.run_job("alerts").unwrap();
    let messages = sink.wait_for(1, StdDuration::from_secs(10));
    assert_eq!(messages.len(), 1, "one email at 75 %");
    let text = text_of(&messages[0]);
    assert!(
        text.contains("X-Rcpt-To: it@plant.test, boss@plant.test"),
        "{text}"
    );
    assert!(
        text.contains("Subject: keygate: 1 license threshold(s) crossed"),
        "{text}"
    );
    assert!(
        text.contains("License LIC-T, item LIC-T-1 (reader, per_device)"),
        "{text}"
    );
    assert!(text.contains("devices reached 75 %: 75 of 100"), "{text}");
    assert!(
        text.contains("at 110 (110 %) new devices are refused"),
        "{text}"
    );
    // The link names the port the appliance serves on (the test's listens on port 0).
    let link = format!(
        "https://{}:{}/licenses/items/LIC-T-1",
        keygate::appliance::hostname(),
        f.app.addr.port()
    );
    assert!(text.contains(&link), "{link} in {text}");
    assert!(text.contains("Content-Type: text/html"), "an HTML part too");

    f.app.run_job("alerts").unwrap();
    assert_eq!(
        sink.wait_for(2, StdDuration::from_millis(500)).len(),
        1,
        "no repeat"
    );

    authorize_devices(&f, "reader", 76..=95);
    f.app.run_job("alerts").unwrap();
    let messages = sink.wait_for(2, StdDuration::from_secs(10));
    assert_eq!(messages.len(), 2, "90 % and 95 % in one email");
    let text = text_of(&messages[1]);
    assert!(
        text.contains("2 license threshold(s) crossed")
            && text.contains("reached 90 %")
            && text.contains("reached 95 %"),
        "{text}"
    );
    assert!(!text.contains("reached 75 %"));

    // A renewal (a new version with a larger quota) resets the thresholds.
    f.import(
        "LIC-T",
        &item("reader", "per_device", 120, ""),
        &["--version", "2"],
    );
    f.app.run_job("alerts").unwrap();
    let messages = sink.wait_for(3, StdDuration::from_secs(10));
    assert_eq!(messages.len(), 3);
    let text = text_of(&messages[2]);
    assert!(
        text.contains("reached 75 %: 95 of 120"),
        "sent again for the renewed license: {text}"
    );
}

/// Seats whose time is up are freed within an alerts run (10 minutes), not only by the
/// daily housekeeping: the figures an admin reads (dashboard, metrics, alerts) are not
/// those of devices whose 90 days have passed.
#[test]
fn lapsed_seats_are_freed_by_the_alerts_run() {
    let f = Fixture::new(&item("scan", "per_active_device", 10, ""));
    let sink = SmtpSink::start();
    sink.configure(&f.data);
    authorize_devices(&f, "scan", 1..=8);
    f.app.run_job("alerts").unwrap();
    assert_eq!(
        sink.wait_for(1, StdDuration::from_secs(10)).len(),
        1,
        "75 %"
    );
    f.app.clock.advance(Duration::days(91));
    assert_eq!(f.app.run_job("alerts").unwrap(), "no new threshold crossed");
    assert_eq!(f.item_value("LIC-T-1", "seats_used"), 0);
}

/// Use that comes and goes (standalone seats released every evening) does not repeat a
/// threshold's email every morning: crossed again within a week of its email, it is not sent.
#[test]
fn a_threshold_crossed_again_within_a_week_is_not_sent_again() {
    let f = Fixture::new(&item("cad", "standalone", 4, ""));
    let sink = SmtpSink::start();
    sink.configure(&f.data);
    f.authorized("cad", 1);
    f.authorized("cad", 2);
    let mut third = f.authorized("cad", 3).lease_id;
    f.app.run_job("alerts").unwrap();
    assert_eq!(
        sink.wait_for(1, StdDuration::from_secs(10)).len(),
        1,
        "75 %"
    );
    let mut evening_and_morning = |f: &Fixture| {
        assert_eq!(f.release(&third, 3).0, 200);
        assert_eq!(f.item_value("LIC-T-1", "seats_used"), 2);
        assert_eq!(f.app.run_job("alerts").unwrap(), "no new threshold crossed");
        f.app.clock.advance(Duration::hours(12));
        third = f.authorized("cad", 3).lease_id;
        f.app.run_job("alerts").unwrap()
    };
    assert_eq!(evening_and_morning(&f), "no new threshold crossed");
    assert_eq!(sink.wait_for(2, StdDuration::from_millis(500)).len(), 1);
    f.app.clock.advance(Duration::days(7));
    assert_ne!(evening_and_morning(&f), "no new threshold crossed");
    let messages = sink.wait_for(2, StdDuration::from_secs(10));
    assert_eq!(messages.len(), 2, "a week later it is news again");
    let text = text_of(&messages[1]);
    assert!(text.contains("devices reached 75 %: 3 of 4"), "{text}");
}

/// A relay refuses a whole message for one recipient it will not take: an unknown mailbox
/// (550), a full one (452 for a while, 552 for good). The others still get their alerts, the
/// alert counts as sent, and the next crossing goes out the same way (the appliance's email
/// is not held back an hour as for a refused sender).
#[test]
fn a_refused_recipient_does_not_keep_the_others_from_their_alerts() {
    for refused in [
        vec!["refused.left@plant.test"],
        vec!["full.boss@plant.test", "overquota.cfo@plant.test"],
    ] {
        let f = Fixture::new(&item("cad", "standalone", 4, ""));
        let sink = SmtpSink::start();
        sink.configure(&f.data);
        let recipients = format!("{}; it@plant.test", refused.join("; "));
        let run = keygate(&f.data, &["alerts", "recipients", &recipients]);
        assert!(run.ok, "{}", run.stderr);
        authorize_devices(&f, "cad", 1..=3);
        let summary = f.app.run_job("alerts").unwrap();
        assert!(refused.iter().all(|r| summary.contains(r)), "{summary}");
        let messages = sink.wait_for(1, StdDuration::from_secs(10));
        assert_eq!(messages.len(), 1);
        let text = text_of(&messages[0]);
        assert!(text.contains("X-Rcpt-To: it@plant.test\r\n"), "{text}");
        assert!(text.contains("devices reached 75 %: 3 of 4"), "{text}");
        // Delivered: marked sent, not sent again.
        assert_eq!(f.app.run_job("alerts").unwrap(), "no new threshold crossed");
        authorize_devices(&f, "cad", 4..=4);
        f.app.run_job("alerts").unwrap();
        assert_eq!(sink.wait_for(2, StdDuration::from_secs(10)).len(), 2);
    }
}

/// When each recipient gets a session of its own (the server refused one address) and the
/// time runs out on a slow one, the copies delivered before it stand, so the alert is not
/// sent again to those who have it.
#[test]
fn a_slow_recipient_does_not_undo_the_copies_already_delivered() {
    let sink = SmtpSink::start_with(
        0,
        tempfile::tempdir().unwrap(),
        &[("SMTP_SLOW_SECONDS", "3")],
    );
    let settings = keygate::alerts::mail::SmtpSettings {
        host: "127.0.0.1".into(),
        port: sink.port,
        tls: keygate::alerts::mail::TlsMode::None,
        user: None,
        password: None,
        from: "keygate@plant.test".into(),
        ca: None,
    };
    let to = keygate::alerts::mail::parse_recipients(
        "first@plant.test; refused.left@plant.test; second@plant.test; slow@plant.test",
    )
    .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let sent = runtime.block_on(keygate::alerts::mail::send_within(
        &settings,
        &to,
        &keygate::alerts::mail::Email::test(),
        StdDuration::from_secs(1),
    ));
    let answer = sent.expect("delivered to some");
    assert!(
        answer.contains("slow@plant.test (no answer within 1 seconds)")
            && answer.contains("refused.left@plant.test"),
        "{answer}"
    );
    let delivered: Vec<String> = sink
        .wait_for(2, StdDuration::from_secs(10))
        .iter()
        .map(|m| m.lines().next().unwrap().to_string())
        .collect();
    assert_eq!(
        delivered,
        [
            "X-Rcpt-To: first@plant.test",
            "X-Rcpt-To: second@plant.test"
        ]
    );
}

/// A relay refusing the sender is not reported as refusing every recipient.
#[test]
fn a_refused_sender_is_told_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    assert!(keygate(&data, &["activation-request"]).ok);
    let sink = SmtpSink::start_with(
        0,
        tempfile::tempdir().unwrap(),
        &[("SMTP_REFUSE_SENDER", "1")],
    );
    sink.configure(&data);
    let run = keygate(&data, &["alerts", "test"]);
    assert!(
        !run.ok
            && run.stderr.contains("Sender not allowed")
            && run
                .stderr
                .contains("check the sender address keygate@plant.test"),
        "{}",
        run.stderr
    );
    assert!(
        !run.stderr.contains("refused every recipient"),
        "{}",
        run.stderr
    );
    // With one recipient too: the answer is about the sender, not a mailbox.
    assert!(keygate(&data, &["alerts", "recipients", "it@plant.test"]).ok);
    let run = keygate(&data, &["alerts", "test"]);
    assert!(
        !run.ok
            && run.stderr.contains("refused the message")
            && run.stderr.contains("Sender not allowed"),
        "{}",
        run.stderr
    );
}

/// The SMTP server is down when the threshold is crossed, and the devices leave before it is
/// back: the crossing is told all the same, as it was found, once.
#[test]
fn a_failed_delivery_is_retried_and_nothing_is_marked_sent_until_accepted() {
    let f = Fixture::new(&item("cad", "standalone", 4, ""));
    let sink = SmtpSink::start();
    sink.configure(&f.data);
    let (port, dir) = sink.stop();
    let leases: Vec<String> = (1..=3).map(|n| f.authorized("cad", n).lease_id).collect();
    let err = f.app.run_job("alerts").unwrap_err();
    assert!(err.to_string().contains("SMTP"), "{err}");
    let failed: i64 = f
        .db()
        .query_row(
            "SELECT COUNT(*) FROM job_runs WHERE job = 'alerts' AND ok = 0",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(failed, 1, "the failed run is recorded");
    for (n, lease) in (1..).zip(&leases) {
        assert_eq!(f.release(lease, n).0, 200);
    }
    f.app.clock.advance(Duration::minutes(10));

    let sink = SmtpSink::start_on(port, dir);
    f.app.run_job("alerts").unwrap();
    let messages = sink.wait_for(1, StdDuration::from_secs(10));
    assert_eq!(messages.len(), 1);
    let text = text_of(&messages[0]);
    assert!(
        text.contains("devices reached 75 % on 2026-06-01T12:00:00Z: 3 of 4"),
        "{text}"
    );
    assert_eq!(f.app.run_job("alerts").unwrap(), "no new threshold crossed");
}

#[test]
fn expiry_warnings_for_tokens_items() {
    let f = Fixture::new(&item(
        "ocr",
        "tokens",
        100,
        "tokens_per_pass = 1\nstarts_at = 2026-01-01T00:00:00Z\nexpires_at = 2026-07-15T12:00:00Z",
    ));
    let sink = SmtpSink::start();
    sink.configure(&f.data);
    assert_eq!(f.app.run_job("alerts").unwrap(), "no new threshold crossed");
    f.app.clock.advance(Duration::days(14)); // 2026-06-15 12:00: 30 days left
    f.app.run_job("alerts").unwrap();
    let messages = sink.wait_for(1, StdDuration::from_secs(10));
    assert!(
        text_of(&messages[0]).contains("expires in 30 day(s) or less: 30 days left"),
        "{}",
        messages[0]
    );
}

/// An item a renewal takes over from (the same product on the same code, running longer)
/// is not warned of: its devices move on. Another product's item still is.
#[test]
fn an_item_a_renewal_takes_over_from_is_not_warned_of() {
    let old = "starts_at = 2026-01-01T00:00:00Z\nexpires_at = 2026-06-21T00:00:00Z";
    let f = Fixture::new(
        &[
            item("cad", "standalone", 4, old),
            item(
                "cad",
                "standalone",
                4,
                "starts_at = 2026-06-01T00:00:00Z\nexpires_at = 2027-06-01T00:00:00Z",
            ),
            item("viewer", "standalone", 4, old),
        ]
        .concat(),
    );
    let sink = SmtpSink::start();
    sink.configure(&f.data);
    f.app.run_job("alerts").unwrap();
    let text = text_of(&sink.wait_for(1, StdDuration::from_secs(10))[0]);
    assert!(
        text.contains("1 license threshold(s) crossed") && text.contains("LIC-T-3 (viewer"),
        "{text}"
    );
    assert!(!text.contains("LIC-T-1"), "{text}");
}

/// The certificate the appliance serves (here, one an admin installed) is warned of 30, 7
/// and 1 days before it expires, each once and in the alert email with the license
/// thresholds; a new certificate starts over. Past it no device could connect.
#[test]
fn the_served_certificate_is_warned_of_before_it_expires() {
    let f = Fixture::new(&item("reader", "per_device", 4, ""));
    let sink = SmtpSink::start();
    sink.configure(&f.data);
    let serve = |days: i64| {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["keygate.plant.test".into()]).unwrap();
        params.not_before = f.app.clock_now() - Duration::days(1);
        params.not_after = f.app.clock_now() + Duration::days(days);
        let cert = params.self_signed(&key).unwrap();
        let served =
            keygate::tls::certified_key(cert.pem().as_bytes(), key.serialize_pem().as_bytes())
                .unwrap();
        f.app.state.certificate.replace(served);
    };
    // The self-signed certificate of the first start lasts years. (Devices first: the test's
    // client checks certificates at the real time, not the appliance's.)
    authorize_devices(&f, "reader", 1..=2);
    assert_eq!(f.app.run_job("alerts").unwrap(), "no new threshold crossed");
    serve(40);
    assert_eq!(f.app.run_job("alerts").unwrap(), "no new threshold crossed");
    f.app.clock.advance(Duration::days(10));
    assert!(
        f.app
            .run_job("alerts")
            .unwrap()
            .starts_with("sent 1 threshold(s)")
    );
    let messages = sink.wait_for(1, StdDuration::from_secs(10));
    let text = text_of(&messages[0]);
    assert!(
        text.contains("Subject: keygate: the TLS certificate of"),
        "{text}"
    );
    assert!(
        text.contains("The TLS certificate this appliance serves expires in 30 day(s) or less"),
        "{text}"
    );
    assert!(text.contains("/settings"), "{text}");
    // The HTML part says it too, and neither part speaks of license thresholds.
    assert!(
        text.contains("<b>The TLS certificate this appliance serves expires in 30 day(s) or less"),
        "{text}"
    );
    assert!(
        !text.contains("<table") && !text.contains("Each threshold"),
        "{text}"
    );
    assert_eq!(f.app.run_job("alerts").unwrap(), "no new threshold crossed");
    // A week before, with a license threshold crossed at the same check: one email.
    f.app.clock.advance(Duration::days(23));
    f.db()
        .execute("UPDATE items SET seats_used = 3", [])
        .unwrap();
    assert!(
        f.app
            .run_job("alerts")
            .unwrap()
            .starts_with("sent 2 threshold(s)")
    );
    let messages = sink.wait_for(2, StdDuration::from_secs(10));
    let text = text_of(&messages[1]);
    assert!(text.contains("expires in 7 day(s) or less"), "{text}");
    assert!(text.contains("devices reached 75 %: 3 of 4"), "{text}");
    // A new certificate: nothing to warn of, and its own warnings will come in their time.
    serve(365);
    assert_eq!(f.app.run_job("alerts").unwrap(), "no new threshold crossed");
    let marks: i64 = f
        .db()
        .query_row(
            "SELECT count(*) FROM settings WHERE key LIKE 'alert_mark:%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(marks, 0);
    assert_eq!(sink.messages().len(), 2);
}

/// An error the tests send straight to the error notifier.
fn store_error(message: &str) -> keygate::alerts::notices::ErrorEvent {
    keygate::alerts::notices::ErrorEvent {
        kind: "store".into(),
        message: message.into(),
    }
}

/// A data directory made by the real binary, with a real SMTP server configured.
fn new_appliance_with_smtp() -> (tempfile::TempDir, std::path::PathBuf, SmtpSink) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    assert!(keygate(&data, &["activation-request"]).ok);
    let sink = SmtpSink::start();
    sink.configure(&data);
    (dir, data, sink)
}

/// A `keygate serve` that cannot start (here: its port is taken) emails why at once: no
/// notifier runs yet, and the service manager only starts it again and again. Starting and
/// failing again within 10 minutes sends nothing more.
#[test]
fn a_failed_start_is_emailed_at_once_and_rate_limited() {
    let (_dir, data, sink) = new_appliance_with_smtp();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let start = || -> Run {
        command()
            .args(["--data-dir", data.to_str().unwrap()])
            .args(["serve", "--listen", &listen])
            .output()
            .unwrap()
            .into()
    };
    let run = start();
    assert!(
        !run.ok && run.stderr.contains("cannot listen on"),
        "{}",
        run.stderr
    );
    let messages = sink.messages();
    assert_eq!(messages.len(), 1, "sent before keygate exited");
    let text = text_of(&messages[0]);
    assert!(
        text.contains("Subject: keygate: server error")
            && text.contains(&format!("cannot listen on {listen}")),
        "{text}"
    );
    let run = start();
    assert!(!run.ok, "{}", run.stderr);
    assert_eq!(sink.messages().len(), 1, "one email per 10 minutes");
}

#[test]
fn server_errors_are_emailed_within_30_seconds_and_rate_limited() {
    let f = Fixture::new(&item("reader", "per_device", 10, ""));
    let sink = SmtpSink::start();
    sink.configure(&f.data);
    f.app.errors.send(store_error("disk I/O error")).unwrap();
    let messages = sink.wait_for(1, StdDuration::from_secs(30));
    assert_eq!(messages.len(), 1, "within 30 seconds");
    let text = text_of(&messages[0]);
    assert!(
        text.contains("Subject: keygate: server error") && text.contains("store: disk I/O error"),
        "{text}"
    );

    f.app
        .errors
        .send(store_error("disk I/O error again"))
        .unwrap();
    f.app.errors.send(store_error("and again")).unwrap();
    assert_eq!(
        sink.wait_for(2, StdDuration::from_secs(8)).len(),
        1,
        "rate limited: one per 10 minutes"
    );
    f.app.clock.advance(Duration::minutes(10));
    let messages = sink.wait_for(2, StdDuration::from_secs(30));
    assert_eq!(messages.len(), 2);
    assert!(
        text_of(&messages[1]).contains("and again (1 more of this kind since the last notice)"),
        "{}",
        messages[1]
    );
}

#[test]
fn the_error_notice_rate_limit_holds_across_a_restart() {
    let (_dir, data, sink) = new_appliance_with_smtp();
    let app = TestApp::spawn(&data);
    app.errors.send(store_error("disk I/O error")).unwrap();
    assert_eq!(sink.wait_for(1, StdDuration::from_secs(30)).len(), 1);
    // Recorded once the server accepted the email.
    let db = data.join("keygate.db");
    let recorded = || {
        keygate::store::settings::get(
            &rusqlite::Connection::open(&db).unwrap(),
            "error_notices_sent",
        )
        .unwrap()
        .is_some()
    };
    let waited = std::time::Instant::now();
    while !recorded() {
        assert!(
            waited.elapsed() < StdDuration::from_secs(10),
            "never recorded"
        );
        std::thread::sleep(StdDuration::from_millis(20));
    }
    drop(app);

    // Started again (its clock at the same time): the same kind waits for its window.
    let app = TestApp::spawn(&data);
    app.errors
        .send(store_error("disk I/O error after the restart"))
        .unwrap();
    assert_eq!(
        sink.wait_for(2, StdDuration::from_secs(8)).len(),
        1,
        "no second email within 10 minutes"
    );
    app.clock.advance(Duration::minutes(10));
    let messages = sink.wait_for(2, StdDuration::from_secs(30));
    assert_eq!(messages.len(), 2);
    assert!(
        text_of(&messages[1]).contains("disk I/O error after the restart"),
        "{}",
        messages[1]
    );
}

/// `keygate serve` with `env`, once it has recorded that it runs (a start that fails before
/// that is no run).
fn serving(data: &std::path::Path, env: &[(&str, &std::path::Path)]) -> Served {
    let served = Served::start_with(data, "127.0.0.1:0", env);
    let db = data.join("keygate.db");
    let waited = std::time::Instant::now();
    while keygate::store::settings::get(&rusqlite::Connection::open(&db).unwrap(), "running_since")
        .unwrap()
        .is_none()
    {
        assert!(
            waited.elapsed() < StdDuration::from_secs(10),
            "never serving"
        );
        std::thread::sleep(StdDuration::from_millis(20));
    }
    served
}

/// Errors told at one start are each emailed: a run that did not stop cleanly and a
/// certificate that cannot serve are of different kinds (errors of one kind are told by
/// their newest), so neither hides the other.
#[test]
fn an_unclean_stop_and_a_certificate_that_cannot_serve_are_both_emailed() {
    let (_dir, data, sink) = new_appliance_with_smtp();
    serving(&data, &[]).kill();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["keygate.plant.test".into()]).unwrap();
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(400);
    params.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(2);
    let (cert, key_file) = (data.join("old.pem"), data.join("old.key"));
    std::fs::write(&cert, params.self_signed(&key).unwrap().pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let served = serving(
        &data,
        &[("KEYGATE_TLS_CERT", &cert), ("KEYGATE_TLS_KEY", &key_file)],
    );
    // In one email, or two.
    let told = |n| -> String {
        let messages = sink.wait_for(n, StdDuration::from_secs(if n == 1 { 40 } else { 10 }));
        messages.iter().map(|m| text_of(m)).collect()
    };
    let mut text = told(1);
    if !(text.contains("did not stop cleanly") && text.contains("cannot serve devices")) {
        text = told(2);
    }
    assert!(
        text.contains("did not stop cleanly") && text.contains("cannot serve devices"),
        "{text}"
    );
    served.terminate();
}

/// A run that did not stop cleanly (killed, crashed, power lost) is told at the next start,
/// by email; a graceful stop is not.
#[test]
fn a_run_that_did_not_stop_cleanly_is_emailed_at_the_next_start() {
    let (_dir, data, sink) = new_appliance_with_smtp();
    let serving = |data: &std::path::Path| serving(data, &[]);
    serving(&data).terminate();
    serving(&data).kill();
    let served = serving(&data);
    let messages = sink.wait_for(1, StdDuration::from_secs(40));
    assert_eq!(messages.len(), 1);
    let text = text_of(&messages[0]);
    assert!(
        text.contains("the previous run of keygate did not stop cleanly"),
        "{text}"
    );
    served.terminate();
    // A start that fails before serving (its port taken) is no run that did not stop.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let failed = command()
        .arg("--data-dir")
        .arg(&data)
        .args(["serve", "--listen", &port])
        .output()
        .unwrap();
    assert!(!failed.status.success());
    let _served = serving(&data);
    let messages = sink.wait_for(3, StdDuration::from_secs(8));
    assert_eq!(
        messages.len(),
        2,
        "a clean stop is no news; a failed start tells its own"
    );
    let text = text_of(&messages[1]);
    assert!(
        text.contains("cannot listen on") && !text.contains("did not stop cleanly"),
        "{text}"
    );
}

/// A run that stopped itself at a disk fault (a failed sync of the WAL) wrote why beside the
/// database; the next start emails it, once.
#[test]
fn why_a_run_stopped_itself_is_emailed_at_the_next_start() {
    let (_dir, data, sink) = new_appliance_with_smtp();
    let reason = "syncing the database's WAL failed: Input/output error (os error 5)";
    keygate::store::record_stop(&data.join("keygate.db"), reason);
    let served = Served::start(&data);
    let messages = sink.wait_for(1, StdDuration::from_secs(40));
    assert_eq!(messages.len(), 1);
    let text = text_of(&messages[0]);
    assert!(text.contains("it stopped itself"), "{text}");
    assert!(text.contains(reason), "{text}");
    served.terminate();
    let _served = Served::start(&data);
    assert_eq!(
        sink.wait_for(2, StdDuration::from_secs(8)).len(),
        1,
        "told once"
    );
}

#[test]
fn a_failing_job_is_emailed_by_the_running_binary() {
    let (dir, data, sink) = new_appliance_with_smtp();
    std::fs::write(data.join("backups"), "not a directory").unwrap();
    let config = dir.path().join("keygate.toml");
    std::fs::write(&config, "[jobs]\nbackup_every_s = 1\n").unwrap();
    let mut child = command()
        .args([
            "--config",
            config.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
        ])
        .args(["serve", "--listen", "127.0.0.1:0"])
        // The log level says what is logged, not what is emailed.
        .env("KEYGATE_LOG_LEVEL", "off")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let messages = sink.wait_for(1, StdDuration::from_secs(30));
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        messages.len(),
        1,
        "the failed backup job was emailed within 30 seconds, logging off"
    );
    assert!(
        text_of(&messages[0]).contains("job backup: scheduled job failed"),
        "{}",
        messages[0]
    );
}

#[test]
fn a_backup_under_write_load_restores_every_acknowledged_report() {
    let f = Fixture::new(&item(
        "scanner",
        "per_usage",
        100_000_000,
        "counter = \"scans\"",
    ));
    let lease = f.authorized("scanner", 1).lease_id;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let acked = std::sync::atomic::AtomicU64::new(0);
    let (backup_result, acked_before) = std::thread::scope(|scope| {
        for t in 0..4u64 {
            let (f, lease, stop, acked) = (&f, &lease, &stop, &acked);
            scope.spawn(move || {
                let stream = format!("00000000-0000-4000-9000-{t:012}");
                let mut seq = 0;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    seq += 1;
                    let (status, body) =
                        f.usage(&f.reports(lease, 1, &stream, &[(seq, "LIC-T-1", "scans", 1)]));
                    assert_eq!(status, 200, "{body}");
                    acked.fetch_add(
                        body["accepted"].as_u64().unwrap(),
                        std::sync::atomic::Ordering::SeqCst,
                    );
                }
            });
        }
        // Under load: writers acknowledged before the backup starts and go on during it.
        let waited = std::time::Instant::now();
        while acked.load(std::sync::atomic::Ordering::SeqCst) < 20 {
            assert!(
                waited.elapsed().as_secs() < 30,
                "the writers acknowledge nothing"
            );
            std::thread::sleep(StdDuration::from_millis(10));
        }
        let acked_before = acked.load(std::sync::atomic::Ordering::SeqCst);
        let result = f.app.run_job("backup");
        let waited = std::time::Instant::now();
        while acked.load(std::sync::atomic::Ordering::SeqCst) < acked_before + 20 {
            assert!(waited.elapsed().as_secs() < 30, "the writers stopped");
            std::thread::sleep(StdDuration::from_millis(10));
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        (result, acked_before)
    });
    let summary = backup_result.unwrap();
    assert!(acked_before >= 20);
    let backups = keygate::store::backup::list(&f.data.join("backups")).unwrap();
    assert_eq!(backups.len(), 1, "{summary}");
    let copy = rusqlite::Connection::open(&backups[0].path).unwrap();
    let check: String = copy
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    let in_backup: i64 = copy
        .query_row(
            "SELECT usage_total FROM items WHERE item_id = 'LIC-T-1'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        in_backup as u64 >= acked_before,
        "{in_backup} < {acked_before} acknowledged before the backup began"
    );
    let total_now = f.item_value("LIC-T-1", "usage_total");
    assert!(total_now >= in_backup);

    // Restore refuses while the appliance runs, then brings the backup back.
    let backup_file = backups[0].path.to_str().unwrap().to_string();
    let run = keygate(&f.data, &["restore", &backup_file]);
    assert!(
        !run.ok && run.stderr.contains("stop the service first"),
        "{}",
        run.stderr
    );
    let (_dir, data) = f.stop();
    // Another appliance refuses it: the backup names the appliance that served it.
    let other = tempfile::tempdir().unwrap();
    let request = other.path().join("request.txt");
    assert!(
        keygate(
            other.path(),
            &["activation-request", "--out", request.to_str().unwrap()]
        )
        .ok
    );
    assert!(keygate(other.path(), &["backup"]).ok);
    let before = db_digest(&other.path().join("keygate.db"));
    let run = keygate(other.path(), &["restore", &backup_file]);
    assert!(
        !run.ok
            && run
                .stderr
                .contains("belongs to another appliance: it was served by installation"),
        "{}",
        run.stderr
    );
    assert_eq!(db_digest(&other.path().join("keygate.db")), before);
    // So is a database another appliance served before it held any license.
    drop(Served::start(other.path()));
    let run = keygate(
        &data,
        &["restore", other.path().join("keygate.db").to_str().unwrap()],
    );
    assert!(
        !run.ok && run.stderr.contains("it was served by installation"),
        "{}",
        run.stderr
    );
    // A directory that is no appliance's (a typo) is told so, and nothing is made there.
    let typo = other.path().join("typo");
    let run = keygate(&typo, &["restore", &backup_file]);
    assert!(
        !run.ok && run.stderr.contains("no appliance key at"),
        "{}",
        run.stderr
    );
    assert!(!typo.exists());
    let aside = |run: &Run| {
        assert!(run.ok, "{}", run.stderr);
        let name = run
            .stdout
            .split("kept as ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap();
        assert!(
            name.contains("keygate.db.before-restore-"),
            "{}",
            run.stdout
        );
        std::path::PathBuf::from(name)
    };
    let first = aside(&keygate(&data, &["restore", &backup_file]));
    let before_second = db_digest(&data.join("keygate.db"));
    // Restored again at once (the same second, most likely): the database it replaces is
    // kept under a name of its own, the first one kept as it was.
    let second = aside(&keygate(&data, &["restore", &backup_file]));
    assert_ne!(first, second);
    assert!(first.exists());
    assert_eq!(db_digest(&second), before_second);
    // Restored, the appliance still tells its newest backup (the database cannot know).
    let status = keygate(&data, &["status"]).stdout;
    let newest = backups.iter().max_by_key(|b| b.taken_at).unwrap();
    let name = newest.path.file_name().unwrap().to_str().unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("last backup:") && l.contains(name)),
        "{status}"
    );
    let restored: i64 = rusqlite::Connection::open(data.join("keygate.db"))
        .unwrap()
        .query_row(
            "SELECT usage_total FROM items WHERE item_id = 'LIC-T-1'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(restored, in_backup);
    let served = Served::start(&data);
    let agent = pinned_agent(&appliance_cert(&data));
    assert_eq!(
        get_json(&agent, &served.url("/readyz")).0,
        200,
        "the restored appliance serves"
    );
}

#[test]
fn a_damaged_backup_is_refused_by_restore() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    assert!(keygate(&data, &["activation-request"]).ok);
    assert!(keygate(&data, &["backup"]).ok);
    let bad = dir.path().join("bad.db");
    std::fs::write(&bad, "not a database at all, just text").unwrap();
    let before = db_digest(&data.join("keygate.db"));
    let run = keygate(&data, &["restore", bad.to_str().unwrap()]);
    assert!(
        !run.ok
            && run
                .stderr
                .contains("is not a sound keygate database: file is not a database"),
        "{}",
        run.stderr
    );
    assert_eq!(db_digest(&data.join("keygate.db")), before);
    // A mistyped path is named, with its cause said once.
    let missing = dir.path().join("missing.db");
    let run = keygate(&data, &["restore", missing.to_str().unwrap()]);
    assert_eq!(
        run.stderr.trim(),
        format!(
            "error: {}: No such file or directory (os error 2)",
            missing.display()
        )
    );
    assert_eq!(db_digest(&data.join("keygate.db")), before);
    // A directory (the backups' own, say) is named as such.
    let backups = data.join("backups");
    let run = keygate(&data, &["restore", backups.to_str().unwrap()]);
    assert_eq!(
        run.stderr.trim(),
        format!(
            "error: {} is not a sound keygate database: it is not a file (name a backup file \
             in it)",
            backups.display()
        )
    );
    assert_eq!(db_digest(&data.join("keygate.db")), before);
}

#[test]
fn housekeeping_frees_seats_at_exactly_365_and_90_days() {
    let items = [
        item("reader", "per_device", 10, ""),
        item("viewer", "per_active_device", 10, ""),
    ]
    .concat();
    let f = Fixture::new(&items);
    // Devices 1, 2, 3 authorize one day apart; 11, 12, 13 likewise for the active model.
    for (reader, viewer) in [(1, 11), (2, 12), (3, 13)] {
        f.authorized("reader", reader);
        f.authorized("viewer", viewer);
        f.app.clock.advance(Duration::days(1));
    }
    // Day 91 after the first: 91, 90 and 89 days since the active devices' first use.
    f.app.clock.advance(Duration::days(88));
    let summary = f.app.run_job("housekeeping").unwrap();
    assert!(summary.starts_with("freed 2 seat(s)"), "{summary}");
    assert_eq!(
        f.item_value("LIC-T-2", "seats_used"),
        1,
        "89 days: kept; 90 and 91: freed"
    );
    assert_eq!(f.item_value("LIC-T-1", "seats_used"), 3);
    // Day 366: 366, 365 and 364 days unused.
    f.app.clock.advance(Duration::days(366 - 91));
    let summary = f.app.run_job("housekeeping").unwrap();
    assert!(summary.starts_with("freed 3 seat(s)"), "{summary}");
    assert_eq!(
        f.item_value("LIC-T-1", "seats_used"),
        1,
        "364 days: kept; 365 and 366: freed"
    );
    let audit: i64 = f
        .db()
        .query_row(
            "SELECT COUNT(*) FROM audit_log WHERE action = 'seat freed'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(audit, 5, "each freed seat is in the audit log");
    let runs: i64 = f
        .db()
        .query_row(
            "SELECT COUNT(*) FROM job_runs WHERE job = 'housekeeping' AND ok = 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(runs, 2);
}

/// A device unused for 365 days is removed with everything kept for it (its seat counted
/// out), unless an admin blocked it; a usage call meanwhile counts as use (here on a lease
/// that lapsed: not renewed, but the device runs).
#[test]
fn housekeeping_removes_devices_unused_for_365_days() {
    let f = Fixture::new(
        &[
            item("reader", "per_device", 10, ""),
            item("viewer", "standalone", 10, ""),
        ]
        .concat(),
    );
    // Device 1 also holds a standalone seat, which only a release or a removal frees.
    f.authorized("viewer", 1);
    assert_eq!(f.item_value("LIC-T-2", "seats_used"), 1);
    let streams = [
        "11111111-1111-4111-8111-111111111111",
        "22222222-2222-4222-8222-222222222222",
    ];
    let mut leases = Vec::new();
    for n in 1..=3 {
        leases.push(f.authorized("reader", n).lease_id);
    }
    for n in 1..=2 {
        let body = f.reports(
            &leases[n - 1],
            n as u32,
            streams[n - 1],
            &[(1, "LIC-T-1", "pages", 5)],
        );
        assert_eq!(f.usage(&body).0, 200);
    }
    assert!(keygate(&f.data, &["device", "block", &device_uuid(3)]).ok);
    f.app.clock.advance(Duration::days(200));
    let heartbeat = f.reports(&leases[1], 2, streams[1], &[]);
    assert_eq!(f.usage(&heartbeat).0, 200);
    let count = |sql: &str| -> i64 { f.db().query_row(sql, [], |r| r.get(0)).unwrap() };
    let pages = "SELECT COALESCE(SUM(total), 0) FROM usage_daily WHERE item_id = 'LIC-T-1'";
    assert_eq!(count(pages), 10);

    f.app.clock.advance(Duration::days(164));
    let summary = f.app.run_job("housekeeping").unwrap();
    assert!(
        summary.contains(", 0 device(s) unused for 365 days and "),
        "{summary}"
    );
    f.app.clock.advance(Duration::days(1)); // exactly 365 days
    let summary = f.app.run_job("housekeeping").unwrap();
    assert!(summary.starts_with("freed 2 seat(s)"), "{summary}");
    assert!(
        summary.contains(", 1 device(s) unused for 365 days and "),
        "{summary}"
    );
    let uuids: Vec<String> = f
        .db()
        .prepare("SELECT uuid FROM devices ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        uuids,
        [device_uuid(2), device_uuid(3)],
        "device 1 removed, 3 blocked"
    );
    assert_eq!(count("SELECT COUNT(*) FROM usage_streams"), 1);
    assert_eq!(count("SELECT COUNT(*) FROM device_usage"), 1);
    assert_eq!(count("SELECT COUNT(*) FROM leases"), 2);
    assert_eq!(count(pages), 10, "the item's daily usage stays");
    assert_eq!(f.item_value("LIC-T-1", "seats_used"), 1);
    assert_eq!(
        f.item_value("LIC-T-2", "seats_used"),
        0,
        "counted out with its device"
    );
    assert_eq!(
        count("SELECT COUNT(*) FROM audit_log WHERE action = 'device removed'"),
        1
    );
    // Back after all: a new device with a new seat.
    f.authorized("reader", 1);
    assert_eq!(f.item_value("LIC-T-1", "seats_used"), 2);
}

/// A clock set years ahead (a dead battery, a wrong time source) does not remove every
/// device at the next housekeeping: the removal's horizon moves 2 days a run at most.
#[test]
fn a_clock_years_ahead_does_not_remove_every_device_at_once() {
    let f = Fixture::new(&item("reader", "per_device", 10, ""));
    f.authorized("reader", 1);
    let first = f.app.clock_now().unix_timestamp();
    f.app.run_job("housekeeping").unwrap();
    let horizon = || -> i64 {
        f.db()
            .query_row(
                "SELECT value FROM settings WHERE key = 'housekeeping.purge_horizon'",
                [],
                |r| r.get::<_, String>(0),
            )
            .unwrap()
            .parse()
            .unwrap()
    };
    let before = horizon();
    assert_eq!(before, f.app.clock_now().unix_timestamp() - 365 * 86_400);
    f.app.clock.advance(Duration::days(2 * 365));
    let summary = f.app.run_job("housekeeping").unwrap();
    assert!(
        summary.contains(", 0 device(s) unused for 365 days and "),
        "{summary}"
    );
    assert_eq!(horizon(), before + 2 * 86_400);
    let devices = || -> i64 {
        f.db()
            .query_row("SELECT COUNT(*) FROM devices", [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(devices(), 1, "the device and its usage stay");
    // A clock set back (a board starting in 1970) does not move the horizon back.
    let ahead = f.app.clock_now();
    f.app
        .clock
        .set(time::macros::datetime!(1970-01-01 00:00 UTC));
    f.app.run_job("housekeeping").unwrap();
    assert_eq!(horizon(), before + 2 * 86_400);
    // A database from before the horizon was kept (its last run at the first one's time)
    // is held to the horizon of its last run.
    f.db()
        .execute(
            "DELETE FROM settings WHERE key = 'housekeeping.purge_horizon'",
            [],
        )
        .unwrap();
    f.db()
        .execute("DELETE FROM job_runs WHERE started_at <> ?1", [first])
        .unwrap();
    f.app.clock.set(ahead);
    f.app.run_job("housekeeping").unwrap();
    assert_eq!(horizon(), before + 2 * 86_400);
    assert_eq!(devices(), 1);
}

/// The audit log keeps `jobs.audit_keep_days` (two years by default): older entries go
/// at the daily housekeeping, and a clock set years ahead does not empty it.
#[test]
fn housekeeping_removes_audit_entries_past_their_keep_days() {
    let f = Fixture::new(&item("reader", "per_device", 10, ""));
    let now = f.app.clock_now().unix_timestamp();
    let db = f.db();
    for (days_ago, target) in [(731, "older"), (727, "newer")] {
        db.execute(
            "INSERT INTO audit_log (at, actor, action, target) VALUES (?1, 'cli', 'test', ?2)",
            rusqlite::params![now - days_ago * 86_400, target],
        )
        .unwrap();
    }
    let kept = || -> Vec<String> {
        f.audited("test")
            .into_iter()
            .map(|(_, target, _)| target)
            .collect()
    };
    let summary = f.app.run_job("housekeeping").unwrap();
    assert!(
        summary.ends_with("and 1 audit entries older than 730 days"),
        "{summary}"
    );
    assert_eq!(kept(), ["newer"]);
    // Years ahead: the removal moves 2 days a run, as the devices' does.
    f.app.clock.advance(Duration::days(5 * 365));
    let summary = f.app.run_job("housekeeping").unwrap();
    assert!(
        summary.ends_with("and 0 audit entries older than 730 days"),
        "{summary}"
    );
    assert_eq!(kept(), ["newer"], "729 days old by the horizon, 2 days on");
    f.app.run_job("housekeeping").unwrap();
    assert_eq!(
        kept(),
        Vec::<String>::new(),
        "731 days old by the horizon, 4 days on"
    );
}

/// `keygate alerts smtp --password-stdin ...` with the password on standard input.
fn smtp_with_password(data: &std::path::Path, args: &[&str], password: &str) -> Run {
    use std::io::Write;
    let mut child = command()
        .arg("--data-dir")
        .arg(data)
        .args(["alerts", "smtp", "--password-stdin"])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    child.wait_with_output().unwrap().into()
}

/// `keygate alerts smtp ...` with the password on standard input, then `keygate alerts test`.
fn configure_and_test(data: &std::path::Path, args: &[&str], password: &str) -> Run {
    let run = smtp_with_password(data, args, password);
    assert!(run.ok, "{}", run.stderr);
    keygate(data, &["alerts", "test"])
}

/// A relay's certificate and key files, from the plant's own CA (here: self-signed, trusted
/// as the CA).
fn relay_certificate(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_path, key_path) = (dir.join("relay.pem"), dir.join("relay.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path)
}

/// The sink's settings for a relay with that certificate, requiring AUTH as `keygate`.
fn relay_env<'a>(cert: &'a str, key: &'a str) -> Vec<(&'static str, &'a str)> {
    vec![
        ("SMTP_TLS_CERT", cert),
        ("SMTP_TLS_KEY", key),
        ("SMTP_USER", "keygate"),
        ("SMTP_PASS", "relay secret"),
    ]
}

/// `keygate alerts smtp` arguments for that relay on `port`, signing in as `keygate`.
fn relay_args<'a>(port: &'a str, tls: &'a str) -> Vec<&'a str> {
    vec![
        "--host",
        "127.0.0.1",
        "--port",
        port,
        "--tls",
        tls,
        "--user",
        "keygate",
    ]
}

/// The sign-ins the sink saw, one `MECHANISM ok|refused` line each.
fn sign_ins(sink: &SmtpSink) -> Vec<String> {
    std::fs::read_to_string(sink.dir.path().join("auth.log"))
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

/// A wrong SMTP password is tried once per run of the alerts job, not again at once: a
/// directory locks an account after a few failed sign-ins. Set right, the alert goes.
#[test]
fn a_refused_smtp_password_is_not_retried_at_once() {
    let f = Fixture::new(&item("cad", "standalone", 4, ""));
    let (cert, key) = relay_certificate(f.data.parent().unwrap());
    let env = relay_env(cert.to_str().unwrap(), key.to_str().unwrap());
    let sink = SmtpSink::start_with(0, tempfile::tempdir().unwrap(), &env);
    sink.configure(&f.data);
    let port = sink.port.to_string();
    let args = [
        &relay_args(&port, "starttls")[..],
        &["--ca", cert.to_str().unwrap()],
    ]
    .concat();
    assert!(smtp_with_password(&f.data, &args, "wrong secret").ok);
    authorize_devices(&f, "cad", 1..=3);
    let err = f.app.run_job("alerts").unwrap_err();
    assert!(err.to_string().contains("535"), "{err}");
    assert_eq!(sign_ins(&sink), ["PLAIN refused"], "one sign-in per run");
    // The same settings are not tried again for a while (the next run, error notices).
    let err = f.app.run_job("alerts").unwrap_err();
    assert!(err.to_string().contains("refused these settings"), "{err}");
    assert_eq!(sign_ins(&sink), ["PLAIN refused"], "no sign-in");
    assert!(smtp_with_password(&f.data, &args, "relay secret").ok);
    f.app.run_job("alerts").unwrap();
    assert_eq!(sink.wait_for(1, StdDuration::from_secs(10)).len(), 1);
    assert_eq!(sign_ins(&sink), ["PLAIN refused", "PLAIN ok"]);
}

/// A relay that answers the end of DATA later than the appliance waits (it scans the message
/// first) has taken the message all the same: it is not sent again at once.
#[test]
fn a_message_unanswered_in_time_is_not_sent_again_at_once() {
    let f = Fixture::new(&item("cad", "standalone", 4, ""));
    let sink = SmtpSink::start_with(
        0,
        tempfile::tempdir().unwrap(),
        &[("SMTP_SLOW_DATA_SECONDS", "40")],
    );
    sink.configure(&f.data);
    authorize_devices(&f, "cad", 1..=3);
    let err = f.app.run_job("alerts").unwrap_err();
    assert!(err.to_string().contains("did not answer in time"), "{err}");
    assert_eq!(
        sink.messages().len(),
        1,
        "one copy, not one per quick retry"
    );
}

/// A recipient list the SMTP server refuses whole (an unknown mailbox) is the list's fault,
/// not the settings': the settings are not paused, so the list set right sends at the next
/// run, not an hour later.
#[test]
fn a_refused_recipient_list_does_not_pause_the_smtp_settings() {
    let f = Fixture::new(&item("cad", "standalone", 4, ""));
    let sink = SmtpSink::start();
    sink.configure(&f.data);
    assert!(keygate(&f.data, &["alerts", "recipients", "refused@plant.test"]).ok);
    authorize_devices(&f, "cad", 1..=3);
    let err = f.app.run_job("alerts").unwrap_err();
    assert!(err.to_string().contains("refused every recipient"), "{err}");
    assert!(keygate(&f.data, &["alerts", "recipients", "it@plant.test"]).ok);
    f.app.run_job("alerts").unwrap();
    let sent = sink.wait_for(1, StdDuration::from_secs(10));
    assert!(sent[0].contains("X-Rcpt-To: it@plant.test"), "{}", sent[0]);
}

#[test]
fn mail_goes_over_starttls_or_implicit_tls_with_authentication_and_a_lan_ca() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    assert!(keygate(&data, &["activation-request"]).ok);
    assert!(keygate(&data, &["alerts", "recipients", "it@plant.test"]).ok);
    let (cert_path, key_path) = relay_certificate(dir.path());
    let tls_env = |implicit: bool| {
        let mut env = relay_env(cert_path.to_str().unwrap(), key_path.to_str().unwrap());
        if implicit {
            env.push(("SMTP_IMPLICIT", "1"));
        }
        env
    };
    let ca = cert_path.to_str().unwrap();

    let sink = SmtpSink::start_with(0, tempfile::tempdir().unwrap(), &tls_env(false));
    let port = sink.port.to_string();
    let base = [
        &relay_args(&port, "starttls")[..],
        &["--from", "keygate@plant.test"],
    ]
    .concat();
    let run = configure_and_test(&data, &[&base[..], &["--ca", ca]].concat(), "relay secret");
    assert!(run.ok, "STARTTLS with AUTH: {}", run.stderr);
    assert!(run.stdout.contains("accepted the test email"));
    let run = configure_and_test(&data, &[&base[..], &["--ca", ca]].concat(), "wrong secret");
    assert!(
        !run.ok && run.stderr.contains("535"),
        "a wrong password is refused with the server's answer: {}",
        run.stderr
    );
    let run = configure_and_test(&data, &base, "relay secret");
    assert!(
        !run.ok && run.stderr.contains("SMTP"),
        "without the CA the certificate is not trusted: {}",
        run.stderr
    );
    assert_eq!(sink.wait_for(1, StdDuration::from_secs(5)).len(), 1);

    // The console refuses to send a password unencrypted, and keeps the stored one when the
    // server stays the same (another sender, say).
    let run = smtp_with_password(&data, &relay_args(&port, "none"), "relay secret");
    assert!(
        !run.ok && run.stderr.contains("only sent over STARTTLS or TLS"),
        "{}",
        run.stderr
    );
    assert!(smtp_with_password(&data, &[&base[..], &["--ca", ca]].concat(), "relay secret").ok);
    let mut args = [&base[..], &["--ca", ca]].concat();
    *args
        .iter_mut()
        .rev()
        .find(|a| a.ends_with("plant.test"))
        .unwrap() = "alerts@plant.test";
    let run = keygate(&data, &[&["alerts", "smtp"][..], &args].concat());
    assert!(
        run.ok && run.stdout.contains("stored password kept"),
        "{}",
        run.stderr
    );
    // An empty password on standard input keeps it too, and says so.
    let run = smtp_with_password(&data, &args, "");
    assert!(
        run.ok && run.stdout.contains("stored password kept"),
        "{}{}",
        run.stdout,
        run.stderr
    );
    assert!(keygate(&data, &["alerts", "test"]).ok);
    assert_eq!(sink.wait_for(2, StdDuration::from_secs(5)).len(), 2);

    // A relay that offers LOGIN only (as Exchange does) is signed in to with it.
    let mut env = tls_env(false);
    env.push(("SMTP_AUTH_ONLY", "LOGIN"));
    let sink = SmtpSink::start_with(0, tempfile::tempdir().unwrap(), &env);
    let port = sink.port.to_string();
    let mut args = [&base[..], &["--ca", ca]].concat();
    args[3] = &port;
    let run = configure_and_test(&data, &args, "relay secret");
    assert!(run.ok, "LOGIN: {}", run.stderr);
    assert_eq!(sign_ins(&sink), ["LOGIN ok"]);

    let sink = SmtpSink::start_with(0, tempfile::tempdir().unwrap(), &tls_env(true));
    let port = sink.port.to_string();
    let args = [
        &relay_args(&port, "tls")[..],
        &["--from", "keygate@plant.test", "--ca", ca],
    ]
    .concat();
    let run = configure_and_test(&data, &args, "relay secret");
    assert!(run.ok, "implicit TLS with AUTH: {}", run.stderr);
    assert_eq!(sink.wait_for(1, StdDuration::from_secs(5)).len(), 1);
}

#[test]
fn jobs_postponed_past_their_interval_by_restarts_run_at_start() {
    let f = Fixture::new(&item("reader", "per_device", 10, ""));
    let runs = |f_db: &rusqlite::Connection| -> Vec<String> {
        f_db.prepare("SELECT DISTINCT job FROM job_runs ORDER BY job")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    assert!(
        runs(&f.db()).is_empty(),
        "a new appliance runs its jobs on schedule"
    );
    let (dir, data) = f.stop();
    // The appliance first started two days ago and was restarted every few hours since:
    // no job ever reached its interval on the scheduler's own clock.
    let two_days_ago = (test_epoch() - Duration::days(2)).unix_timestamp();
    rusqlite::Connection::open(data.join("keygate.db"))
        .unwrap()
        .execute(
            "UPDATE settings SET value = ?1 WHERE key = 'jobs_first_start'",
            [two_days_ago.to_string()],
        )
        .unwrap();
    let app = TestApp::spawn(&data);
    let db = rusqlite::Connection::open(data.join("keygate.db")).unwrap();
    let deadline = std::time::Instant::now() + StdDuration::from_secs(30);
    while runs(&db).len() < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(StdDuration::from_millis(100));
    }
    assert_eq!(runs(&db), ["alerts", "backup", "housekeeping"]);
    drop(app);
    drop(dir);
}

/// A clock set back (a board starting in 1970) names the backups taken meanwhile in the past,
/// and retention would take the ones before it for backups "ahead" and delete them once ten
/// were taken: while the clock is behind, retention deletes only backups taken since.
#[test]
fn backups_taken_while_the_clock_is_set_back_delete_none_before_it() {
    let f = Fixture::new(&item("reader", "per_device", 10, ""));
    let dir = f.data.join("backups");
    for _ in 0..3 {
        f.app.run_job("backup").unwrap();
    }
    let before = keygate::store::backup::list(&dir).unwrap();
    assert_eq!(before.len(), 3);
    f.app.clock.set(test_epoch() - Duration::days(365));
    for _ in 0..12 {
        f.app.run_job("backup").unwrap();
    }
    let after = keygate::store::backup::list(&dir).unwrap();
    assert_eq!(
        after.len(),
        3 + 10,
        "those taken since keep to the retention"
    );
    assert!(before.iter().all(|b| after.contains(b)), "{after:?}");
    // Right again: retention goes on over all (the newest 10, and one a day).
    f.app.clock.set(test_epoch() + Duration::minutes(1));
    f.app.run_job("backup").unwrap();
    let right = keygate::store::backup::list(&dir).unwrap();
    assert_eq!(right.len(), 10, "{right:?}");
    assert!(
        before.iter().all(|b| right.contains(b)),
        "the newest before it stay"
    );
}

/// A daily reboot at the time the daily jobs ran the day before (a few milliseconds short of
/// their interval) must not put them off for another whole day: a job not yet due at a
/// start runs when its interval since its last run is up, not one interval after the start.
#[test]
fn a_job_not_yet_due_at_a_start_runs_when_its_interval_is_up() {
    let f = Fixture::new(&item("reader", "per_device", 10, ""));
    let (dir, data) = f.stop();
    // Housekeeping (daily) last ran a day ago less 8 seconds, the backup (every 12 minutes)
    // 12 minutes ago less 8 seconds (time for a slow machine to start serving first); the
    // alerts job (every 10 minutes) a second ago.
    let now = test_epoch().unix_timestamp();
    let db = rusqlite::Connection::open(data.join("keygate.db")).unwrap();
    for (job, at) in [
        ("alerts", now - 1),
        ("backup", now - 720 + 8),
        ("housekeeping", now - 86_400 + 8),
    ] {
        db.execute(
            "INSERT INTO job_runs (job, started_at, duration_ms, ok) VALUES (?1, ?2, 0, 1)",
            rusqlite::params![job, at],
        )
        .unwrap();
    }
    let started = std::time::Instant::now();
    let app = TestApp::spawn(&data);
    let ran = |job: &str| -> i64 {
        db.query_row("SELECT count(*) FROM job_runs WHERE job = ?1", [job], |r| {
            r.get(0)
        })
        .unwrap()
    };
    assert_eq!(
        (ran("backup"), ran("housekeeping")),
        (1, 1),
        "not due at the start"
    );
    let deadline = std::time::Instant::now() + StdDuration::from_secs(30);
    while (ran("backup"), ran("housekeeping")) != (2, 2) && std::time::Instant::now() < deadline {
        std::thread::sleep(StdDuration::from_millis(100));
    }
    assert_eq!(
        (ran("backup"), ran("housekeeping")),
        (2, 2),
        "both ran when their interval was up, about 8 seconds after the start"
    );
    assert!(
        started.elapsed() >= StdDuration::from_secs(7),
        "not at the start"
    );
    assert_eq!(ran("alerts"), 1, "the alerts job keeps its own time");
    drop(app);
    drop(dir);
}

/// `keygate serve` with the alerts job every 2 seconds (the others a day apart), under
/// libfaketime reading its offset from `offset`.
fn serve_with_alerts_every_2_s(dir: &Path, offset: &Path) -> std::process::Child {
    let config = dir.join("keygate.toml");
    std::fs::write(
        &config,
        "[jobs]\nalerts_every_s = 2\nbackup_every_s = 86400\nhousekeeping_every_s = 86400\n",
    )
    .unwrap();
    command()
        .args(["--config", config.to_str().unwrap()])
        .args(["--data-dir", dir.join("data").to_str().unwrap()])
        .args(["serve", "--listen", "127.0.0.1:0"])
        .envs(faketime(offset))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// How many times the alerts job ran, by its record in `dir`'s database.
fn alerts_runs(dir: &Path) -> i64 {
    rusqlite::Connection::open(dir.join("data/keygate.db"))
        .and_then(|c| {
            c.busy_timeout(StdDuration::from_secs(5))?;
            c.query_row(
                "SELECT count(*) FROM job_runs WHERE job = 'alerts'",
                [],
                |r| r.get(0),
            )
        })
        .unwrap_or(0)
}

/// Whether the alerts job ran `more` times after `from` within 30 seconds.
fn alerts_run_on(dir: &Path, from: i64, more: i64) -> bool {
    let deadline = std::time::Instant::now() + StdDuration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if alerts_runs(dir) >= from + more {
            return true;
        }
        std::thread::sleep(StdDuration::from_millis(200));
    }
    false
}

/// A system clock stepped forward past a planned run (a resumed VM, NTP setting the time at
/// boot) or back must not stop the scheduled jobs: before, a step forward stopped them for
/// good and a step back held them for as long as the step.
#[test]
fn scheduled_jobs_keep_running_when_the_system_clock_steps() {
    let dir = tempfile::tempdir().unwrap();
    let offset = dir.path().join("offset");
    std::fs::write(&offset, "+0\n").unwrap();
    let mut child = serve_with_alerts_every_2_s(dir.path(), &offset);
    let started = alerts_run_on(dir.path(), 0, 2);
    let ahead = alerts_runs(dir.path());
    std::fs::write(&offset, "+3600\n").unwrap();
    let after_forward = alerts_run_on(dir.path(), ahead, 3);
    let back = alerts_runs(dir.path());
    std::fs::write(&offset, "+0\n").unwrap();
    let after_back = alerts_run_on(dir.path(), back, 3);
    let _ = child.kill();
    let _ = child.wait();
    assert!(started, "the alerts job runs every 2 seconds");
    assert!(
        after_forward,
        "jobs stopped after the clock stepped an hour forward"
    );
    assert!(after_back, "jobs held after the clock stepped an hour back");
}

/// A process frozen for longer than a job's interval (stopped by a signal, a paused VM: both
/// clocks go on, so no step is seen) must not stop the scheduled jobs: before, the scheduler
/// ran the job once when the process went on, then never again.
#[cfg(unix)]
#[test]
fn scheduled_jobs_keep_running_after_the_process_was_frozen() {
    let dir = tempfile::tempdir().unwrap();
    let offset = dir.path().join("offset");
    std::fs::write(&offset, "+0\n").unwrap();
    let mut child = serve_with_alerts_every_2_s(dir.path(), &offset);
    let started = alerts_run_on(dir.path(), 0, 2);
    let signal = |name: &str| {
        let sent = std::process::Command::new("kill")
            .args([name, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill {name}");
    };
    signal("-STOP");
    std::thread::sleep(StdDuration::from_secs(5));
    let frozen = alerts_runs(dir.path());
    signal("-CONT");
    let after = alerts_run_on(dir.path(), frozen, 3);
    let _ = child.kill();
    let _ = child.wait();
    assert!(started, "the alerts job runs every 2 seconds");
    assert!(after, "jobs stopped after the process was frozen for 5 s");
}

/// An SMTP server that cannot take mail (a wrong password, a relay out of service) must not
/// be asked every 5 seconds, once per recipient each time: a directory locks an account
/// after a few failed logins. Before, 12 seconds of a failing notice to two recipients made
/// nine connections; now the first retry waits 30 seconds (the waits themselves: the unit
/// test `failed_error_notices_wait_30_s_then_twice_as_long_up_to_10_minutes`).
#[test]
fn a_failing_error_notice_backs_off_and_is_not_resent_per_recipient() {
    let (_dir, data, sink) = new_appliance_with_smtp();
    // The configured port now answers every connection "554 out of service".
    let (port, _) = sink.stop();
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = connections.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = std::io::Write::write_all(&mut stream, b"554 5.3.2 out of service\r\n");
        }
    });
    let app = TestApp::spawn(&data);
    app.errors.send(store_error("disk I/O error")).unwrap();
    std::thread::sleep(StdDuration::from_secs(12));
    assert_eq!(
        connections.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one attempt, then a wait of 30 seconds"
    );
}

/// A fleet authorized in one week lapses (per_active_device, 90 days) on one day: neither a
/// device's request nor one housekeeping transaction may carry freeing all of it.
#[test]
fn lapsed_seats_are_freed_a_batch_at_a_time() {
    let f = Fixture::new(&item("scan", "per_active_device", 5_000, ""));
    let long_ago = f.app.clock_now().unix_timestamp() - 91 * 86_400;
    f.db()
        .execute_batch(&format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 4400)
             INSERT INTO devices (uuid, first_seen, last_seen)
                 SELECT printf('00000000-0000-4000-9000-%012d', i), {long_ago}, {long_ago} FROM n;
             INSERT INTO seats (item_id, device_id, first_auth_at, last_used_at)
                 SELECT 'LIC-T-1', id, {long_ago}, {long_ago} FROM devices;
             UPDATE items SET seats_used = 4400 WHERE item_id = 'LIC-T-1';"
        ))
        .unwrap();
    // A new device's authorization frees a batch (choosing its item, then taking the seat),
    // not the 4,400.
    f.authorized("scan", 1);
    let by_request = f.audited("seat freed").len();
    assert_eq!(
        by_request,
        2 * keygate::licensing::authorize::FREE_PER_REQUEST as usize
    );
    assert_eq!(
        f.item_value("LIC-T-1", "seats_used"),
        4_401 - by_request as i64
    );
    // The housekeeping frees the other 4,200 in transactions of at most 2,000: three where a
    // run with nothing to free takes one (its other steps take as many transactions).
    let transactions = |f: &Fixture| {
        let before = f.app.state.store.commits().committed();
        let report = f.app.run_job("housekeeping").unwrap();
        (report, f.app.state.store.commits().committed() - before)
    };
    let (report, freeing) = transactions(&f);
    assert!(report.starts_with("freed 4200 seat(s)"), "{report}");
    assert_eq!(f.item_value("LIC-T-1", "seats_used"), 1);
    assert_eq!(f.audited("seat freed").len(), 4_400);
    let (report, idle) = transactions(&f);
    assert!(report.starts_with("freed 0 seat(s)"), "{report}");
    assert_eq!(freeing, idle + 2, "{freeing} transactions against {idle}");
}

/// `--ca` takes a CA's certificate, nothing else: a private key (the vendor's, picked by
/// mistake) or a certificate with its key beside it would be kept in the database and in
/// every backup. Refused, and the settings stay as they were; as is a password without a
/// user.
#[test]
fn smtp_settings_that_cannot_work_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    assert!(keygate(&data, &["activation-request"]).ok);
    assert!(keygate(&data, &["alerts", "recipients", "it@plant.test"]).ok);
    let vendor = Vendor::new();
    let (cert, key) = relay_certificate(dir.path());
    let both = dir.path().join("both.pem");
    let mut pem = std::fs::read(&cert).unwrap();
    pem.extend(std::fs::read(&key).unwrap());
    std::fs::write(&both, pem).unwrap();
    let before = db_digest(&data.join("keygate.db"));
    for (ca, why) in [
        (vendor.key_path(), "not a PEM certificate"),
        (both, "holds a private key"),
    ] {
        let run = keygate(
            &data,
            &[
                "alerts",
                "smtp",
                "--host",
                "mail.lan",
                "--ca",
                ca.to_str().unwrap(),
            ],
        );
        assert!(!run.ok && run.stderr.contains(why), "{}", run.stderr);
        assert_eq!(db_digest(&data.join("keygate.db")), before);
    }
    let run = keygate(
        &data,
        &[
            "alerts",
            "smtp",
            "--host",
            "mail.lan",
            "--ca",
            cert.to_str().unwrap(),
        ],
    );
    assert!(run.ok, "{}", run.stderr);
    // A password with no user to go with it would never be sent: refused, as any mistake
    // (an empty user is none).
    let before = db_digest(&data.join("keygate.db"));
    for args in [
        &["--host", "mail.lan"][..],
        &["--host", "mail.lan", "--user", " "],
    ] {
        let run = smtp_with_password(&data, args, "pw-secret-123");
        assert!(
            !run.ok && run.stderr.contains("A password goes with a user name"),
            "{}",
            run.stderr
        );
        assert_eq!(db_digest(&data.join("keygate.db")), before);
    }
}

/// Settings an older release saved, which saving now refuses, still send: a CA file with
/// its key beside the certificate, a password without a user.
#[test]
fn settings_an_older_release_saved_still_send() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    assert!(keygate(&data, &["activation-request"]).ok);
    let (cert, key) = relay_certificate(dir.path());
    let env = relay_env(cert.to_str().unwrap(), key.to_str().unwrap());
    let sink = SmtpSink::start_with(0, tempfile::tempdir().unwrap(), &env);
    sink.configure(&data);
    let port = sink.port.to_string();
    let args = [
        &relay_args(&port, "starttls")[..],
        &["--ca", cert.to_str().unwrap()],
    ]
    .concat();
    assert!(configure_and_test(&data, &args, "relay secret").ok);
    let mut both = std::fs::read_to_string(&cert).unwrap();
    both.push_str(&std::fs::read_to_string(&key).unwrap());
    let conn = rusqlite::Connection::open(data.join("keygate.db")).unwrap();
    conn.execute(
        "UPDATE settings SET value = ?1 WHERE key = 'smtp_ca'",
        [&both],
    )
    .unwrap();
    drop(conn);
    let run = keygate(&data, &["alerts", "test"]);
    assert!(run.ok, "{}", run.stderr);
}

/// A list an older release saved with an address outside ASCII still reaches the others (a
/// relay without SMTPUTF8 refused the whole message, for everyone, every run); a password
/// it saved without a user is never sent, so plain SMTP still works; and mailboxes all full
/// alike are not taken for a refused sender (whose settings would pause for an hour).
#[test]
fn legacy_lists_still_send_and_full_mailboxes_are_not_the_senders_fault() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    assert!(keygate(&data, &["activation-request"]).ok);
    let sink = SmtpSink::start();
    sink.configure(&data);
    let conn = rusqlite::Connection::open(data.join("keygate.db")).unwrap();
    for (key, value) in [
        ("alert_recipients", "it@plant.test; jürgen@plant.test"),
        ("smtp_password", "a password saved without a user"),
    ] {
        conn.execute(
            "INSERT INTO settings (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [key, value],
        )
        .unwrap();
    }
    drop(conn);
    let run = keygate(&data, &["alerts", "test"]);
    assert!(
        run.ok && run.stdout.contains("left out: jürgen@plant.test"),
        "{}{}",
        run.stdout,
        run.stderr
    );
    let sent = sink.wait_for(1, StdDuration::from_secs(10));
    assert!(
        sent[0].starts_with("X-Rcpt-To: it@plant.test\r\n"),
        "{}",
        sent[0]
    );

    assert!(
        keygate(
            &data,
            &["alerts", "recipients", "full1@plant.test; full2@plant.test"]
        )
        .ok
    );
    let run = keygate(&data, &["alerts", "test"]);
    assert!(
        !run.ok && !run.stderr.contains("check the sender address"),
        "{}",
        run.stderr
    );
}
