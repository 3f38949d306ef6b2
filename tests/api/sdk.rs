//! Issue 3: the device SDK against the real appliance binary, stopped and restarted.

use std::path::Path;
use std::sync::{Arc, Mutex};

use keygate_sdk::client::{Client, ClientConfig, ClientError, Clock, TlsTrust};
use keygate_sdk::wire::{DeviceInfo, MAX_COUNT, MAX_COUNTERS};
use time::{Duration, OffsetDateTime};

use crate::helpers::*;

/// An appliance with a per_usage license, served by the real binary.
struct Appliance {
    _dir: tempfile::TempDir,
    data: std::path::PathBuf,
    vendor: Vendor,
    code: String,
}

fn appliance(items: &str) -> Appliance {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let vendor = Vendor::new();
    assert!(keygate(&data, &["trust", vendor.pub_path().to_str().unwrap()]).ok);
    let license = vendor.issue_file(&data, &items_file("LIC-S", items), &[], "s.lic");
    let run = keygate(&data, &["import", license.to_str().unwrap()]);
    let code = default_code(&run);
    Appliance {
        _dir: dir,
        data,
        vendor,
        code,
    }
}

/// An appliance with one per_usage item of `quota` scans for the product "scanner".
fn scanner(quota: i64) -> Appliance {
    appliance(&item("scanner", "per_usage", quota, "counter = \"scans\""))
}

/// A device clock the test moves.
fn device_clock() -> (Clock, Arc<Mutex<OffsetDateTime>>) {
    let now = Arc::new(Mutex::new(OffsetDateTime::now_utc()));
    let handle = now.clone();
    (Clock::from_fn(move || *handle.lock().unwrap()), now)
}

fn client(a: &Appliance, urls: Vec<String>, state: &Path, clock: Clock) -> Client {
    Client::new(config(a, urls, state, clock)).unwrap()
}

fn config(a: &Appliance, urls: Vec<String>, state: &Path, clock: Clock) -> ClientConfig {
    let vendor = keygate_sdk::keys::public_key_from_pem(
        &std::fs::read_to_string(a.vendor.pub_path()).unwrap(),
    )
    .unwrap();
    let mut config = ClientConfig::new(
        urls,
        vec![vendor],
        "scanner",
        DeviceInfo {
            uuid: device_uuid(1),
            ..DeviceInfo::default()
        },
        state,
        TlsTrust::Pinned(appliance_cert(&a.data)),
    );
    config.handshake_code = Some(a.code.clone());
    config.clock = clock;
    config.timeout = std::time::Duration::from_secs(5);
    config
}

/// Device `n` of appliance `a`, its state in `state`, on the system's clock.
fn device_n(a: &Appliance, served: &Served, state: &Path, n: u32) -> Client {
    let mut config = config(a, vec![served.url("")], state, Clock::system());
    config.device.uuid = device_uuid(n);
    Client::new(config).unwrap()
}

/// An HTTPS URL on which nothing listens.
fn dead_url() -> String {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("https://{}", dead.local_addr().unwrap())
}

fn usage_total(a: &Appliance) -> i64 {
    rusqlite::Connection::open(a.data.join("keygate.db"))
        .unwrap()
        .query_row(
            "SELECT usage_total FROM items WHERE item_id = 'LIC-S-1'",
            [],
            |r| r.get(0),
        )
        .unwrap()
}

#[test]
fn works_offline_until_expiry_and_sends_the_backlog_once_back() {
    let a = scanner(1_000_000);
    let served = Served::start(&a.data);
    let url = served.url("");
    let state = tempfile::tempdir().unwrap();
    let (clock, now) = device_clock();
    let mut device = client(&a, vec![url.clone()], state.path(), clock.clone());
    let grant = device.authorize().unwrap();
    assert_eq!(grant.authorization.items[0].item_id, "LIC-S-1");
    device.record("LIC-S-1", "scans", 5).unwrap();
    let sent = device.flush().unwrap();
    assert_eq!(sent.accepted, 1);
    assert_eq!(usage_total(&a), 5);

    // The appliance goes away. The device keeps working and keeps counting.
    let addr = served.addr.to_string();
    served.kill();
    for day in 1..=6 {
        *now.lock().unwrap() += Duration::days(1);
        device
            .check()
            .unwrap_or_else(|e| panic!("day {day} offline: {e}"));
        device.record("LIC-S-1", "scans", 10).unwrap();
        let err = device.flush().unwrap_err();
        assert!(err.is_unreachable(), "{err}");
        if day == 1 {
            // Authorizing again sends the usage first: out of reach, that is the answer,
            // and the stored authorization and the backlog stand.
            let err = device.authorize().unwrap_err();
            assert!(err.is_unreachable(), "{err}");
            device.check().expect("the stored authorization stands");
            assert_eq!(device.status().pending_reports, 1);
        }
    }
    drop(device);
    // A restarted product process picks up its stored state and backlog.
    let mut device = client(&a, vec![url.clone()], state.path(), clock.clone());
    assert_eq!(device.status().pending_reports, 6);

    // The appliance is back on the same address: the backlog counts once.
    let served = Served::start_on(&a.data, &addr);
    let sent = device.flush().unwrap();
    assert_eq!((sent.accepted, sent.pending), (6, 0));
    assert!(
        sent.renewed.is_some(),
        "the flush renewed the authorization"
    );
    assert_eq!(usage_total(&a), 65);
    let again = device.flush().unwrap();
    assert_eq!(again.accepted, 0);
    assert_eq!(usage_total(&a), 65);
    drop(served);

    // Offline past the allowance (7 days from the last renewal), the device stops.
    *now.lock().unwrap() += Duration::days(7);
    assert!(
        matches!(device.check(), Err(ClientError::Expired { .. })),
        "{:?}",
        device.check()
    );
}

/// A device moved to another handshake code (IT gave it a new one) authorizes there; the
/// usage it holds for the item of its old code is sent first, on the lease that item was
/// granted to, not refused once the lease has moved.
#[test]
fn usage_held_when_a_device_moves_to_another_code_counts_in_its_first_item() {
    let scanner = item("scanner", "per_usage", 1_000_000, "counter = \"scans\"");
    let a = appliance(&format!("{scanner}{scanner}"));
    let run = keygate(
        &a.data,
        &["handshake", "create", "--organization", "200001", "PLANT-B"],
    );
    assert!(run.ok, "{}", run.stderr);
    assert!(keygate(&a.data, &["handshake", "assign", "LIC-S-2", "PLANT-B"]).ok);
    let served = Served::start(&a.data);
    let state = tempfile::tempdir().unwrap();
    let (clock, _) = device_clock();
    let mut device = client(&a, vec![served.url("")], state.path(), clock.clone());
    assert_eq!(
        device.authorize().unwrap().authorization.items[0].item_id,
        "LIC-S-1"
    );
    device.record("LIC-S-1", "scans", 5).unwrap();
    device.flush().unwrap();
    device.record("LIC-S-1", "scans", 7).unwrap();
    drop(device);

    let mut moved = config(&a, vec![served.url("")], state.path(), clock);
    moved.handshake_code = Some("PLANT-B".into());
    let mut device = Client::new(moved).unwrap();
    assert!(
        matches!(device.check(), Err(ClientError::OtherSettings { .. })),
        "{:?}",
        device.check()
    );
    let grant = device.authorize().unwrap();
    assert_eq!(grant.authorization.items[0].item_id, "LIC-S-2");
    assert_eq!(usage_total(&a), 12, "the 7 held scans counted in LIC-S-1");
    device.record("LIC-S-2", "scans", 3).unwrap();
    let sent = device.flush().unwrap();
    assert_eq!((sent.accepted, sent.pending), (1, 0));
    assert_eq!(usage_total(&a), 12);
    assert!(
        !state.path().join("rejected.json").exists(),
        "nothing was set aside"
    );
}

#[test]
fn the_sdk_records_only_what_the_appliance_accepts_and_follows_a_released_lease() {
    let a = scanner(10_000_000_000_000);
    let served = Served::start(&a.data);
    let state = tempfile::tempdir().unwrap();
    let (clock, _) = device_clock();
    // Configured with the UUID in another spelling than the one the appliance signs.
    let mut config = config(&a, vec![served.url("")], state.path(), clock);
    config.device.uuid = device_uuid(1).replace('-', "").to_uppercase();
    let mut device = Client::new(config).unwrap();
    let grant = device.authorize().unwrap();
    assert_eq!(grant.authorization.device_uuid, device_uuid(1));
    device.check().unwrap();

    // Names and amounts the appliance would refuse are refused here, before they could
    // block the backlog.
    for (counter, amount) in [("page scans", 1), ("", 1), ("scans", MAX_COUNT + 1)] {
        assert!(
            matches!(
                device.record("LIC-S-1", counter, amount),
                Err(ClientError::Config(_))
            ),
            "{counter:?} {amount}"
        );
    }
    device.record("LIC-S-1", "scans", MAX_COUNT - 1).unwrap();
    assert!(
        matches!(
            device.record("LIC-S-1", "scans", 2),
            Err(ClientError::Config(_))
        ),
        "the period holds at most MAX_COUNT"
    );
    device.record("LIC-S-1", "scans", 1).unwrap();
    for n in 1..MAX_COUNTERS {
        device.record("LIC-S-1", &format!("c{n}"), 1).unwrap();
    }
    assert!(matches!(
        device.record("LIC-S-1", "one-too-many", 1),
        Err(ClientError::Config(_))
    ));
    device.record("LIC-S-1", "c1", 1).unwrap();
    let first = device.flush().unwrap();
    assert_eq!(first.accepted, 1);
    assert_eq!(usage_total(&a), MAX_COUNT as i64);

    // Something else released the lease: the reports still count, and the client takes a
    // lease again instead of running out its authorization while the appliance is there.
    let agent = pinned_agent(&appliance_cert(&a.data));
    let (status, _) = post_json(
        &agent,
        &served.url("/api/v1/release"),
        &serde_json::json!({"lease_id": grant.authorization.lease_id, "device_uuid": device_uuid(1)}),
    );
    assert_eq!(status, 200);
    device.record("LIC-S-1", "scans", 2).unwrap();
    let sent = device.flush().unwrap();
    assert_eq!((sent.accepted, sent.reauthorized), (1, true), "{sent:?}");
    assert!(sent.renewed.is_some());
    assert_eq!(usage_total(&a), MAX_COUNT as i64 + 2);
    let again = device.flush().unwrap();
    assert!(
        again.renewal_error.is_none() && again.renewed.is_some(),
        "{again:?}"
    );
}

/// A device's state directory after it authorized with `served` and stopped, its backlog then
/// replaced with `reports` (as an older SDK, or a long time offline, leaves it), and its clock.
fn stopped_with_backlog(
    a: &Appliance,
    served: &Served,
    reports: serde_json::Value,
) -> (tempfile::TempDir, Clock) {
    let state = tempfile::tempdir().unwrap();
    let (clock, _) = device_clock();
    let mut device = client(a, vec![served.url("")], state.path(), clock.clone());
    device.authorize().unwrap();
    drop(device);
    let path = state.path().join("backlog.json");
    let mut backlog: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    backlog["reports"] = reports;
    std::fs::write(&path, serde_json::to_vec(&backlog).unwrap()).unwrap();
    (state, clock)
}

/// A backlog whose reports carry many long counter names goes out whole although 1000 of
/// them (the SDK's most per request) are over the appliance's 2 MiB body limit: 700 such
/// reports are 3.5 MiB, the appliance answers `413 PAYLOAD_TOO_LARGE` before reading the
/// body, and the SDK sends them again in halves.
#[test]
fn a_backlog_of_large_reports_goes_out_in_bodies_the_appliance_takes() {
    let a = scanner(1_000_000_000);
    let served = Served::start(&a.data);
    let now = keygate::licensing::rfc3339(OffsetDateTime::now_utc());
    let mut counters = serde_json::Map::new();
    counters.insert("scans".into(), 1.into());
    for n in 0..63 {
        counters.insert(
            format!("{n:02}-{}", "x".repeat(61)),
            999_999_999_999u64.into(),
        );
    }
    let reports: Vec<serde_json::Value> = (1..=700)
        .map(|seq| serde_json::json!({"seq": seq, "item_id": "LIC-S-1", "from": now, "to": now, "counters": counters}))
        .collect();
    let (state, clock) = stopped_with_backlog(&a, &served, serde_json::Value::Array(reports));
    let size = std::fs::metadata(state.path().join("backlog.json"))
        .unwrap()
        .len();
    assert!(size > 3 << 20, "{size}");

    let mut device = client(&a, vec![served.url("")], state.path(), clock);
    let sent = device.flush().unwrap();
    assert_eq!((sent.accepted, sent.pending), (700, 0), "{sent:?}");
    assert_eq!(usage_total(&a), 700);
}

#[test]
fn a_report_the_appliance_refuses_is_set_aside_instead_of_blocking_the_backlog() {
    let a = scanner(1_000_000);
    let served = Served::start(&a.data);
    // A backlog left by an older SDK, with a counter name the appliance refuses in the middle.
    let now = keygate::licensing::rfc3339(OffsetDateTime::now_utc());
    let report = |seq: u64, counter: &str| serde_json::json!({"seq": seq, "item_id": "LIC-S-1", "from": now, "to": now, "counters": {counter: 1}});
    let reports = serde_json::json!([
        report(1, "scans"),
        report(2, "page scans"),
        report(3, "scans")
    ]);
    let (state, clock) = stopped_with_backlog(&a, &served, reports);
    // And a `rejected.json` torn on disk: kept aside, it does not block the backlog either.
    let torn = b"[{\"report\": {\"seq\": 1";
    std::fs::write(state.path().join("rejected.json"), torn).unwrap();

    let mut device = client(&a, vec![served.url("")], state.path(), clock);
    let sent = device.flush().unwrap();
    assert_eq!(
        (sent.accepted, sent.rejected, sent.pending),
        (2, 1, 0),
        "{sent:?}"
    );
    assert!(sent.renewed.is_some());
    assert_eq!(usage_total(&a), 2);
    let rejected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.path().join("rejected.json")).unwrap())
            .unwrap();
    assert_eq!(rejected[0]["report"]["seq"], 2);
    assert!(
        rejected[0]["reason"].as_str().unwrap().contains("counters"),
        "{rejected}"
    );
    assert_eq!(
        std::fs::read(state.path().join("rejected.json.corrupt")).unwrap(),
        torn
    );
}

#[test]
fn a_clock_set_backwards_is_detected() {
    let a = scanner(1_000_000);
    let served = Served::start(&a.data);
    let state = tempfile::tempdir().unwrap();
    let (clock, now) = device_clock();
    let mut device = client(&a, vec![served.url("")], state.path(), clock);
    device.authorize().unwrap();
    *now.lock().unwrap() += Duration::days(2);
    device.check().unwrap();
    *now.lock().unwrap() -= Duration::days(1);
    assert!(
        matches!(device.check(), Err(ClientError::ClockRolledBack { .. })),
        "{:?}",
        device.check()
    );
}

/// A device whose clock is hours behind the appliance's (local time taken for UTC) runs:
/// its offline allowance is counted on the appliance's time, measured at each contact.
#[test]
fn a_device_clock_hours_behind_runs_on_the_appliances_time() {
    let a = scanner(1_000_000);
    let served = Served::start(&a.data);
    let state = tempfile::tempdir().unwrap();
    let (clock, now) = device_clock();
    let behind = Duration::hours(5);
    *now.lock().unwrap() -= behind;
    let mut device = client(&a, vec![served.url("")], state.path(), clock);
    let grant = device.authorize().unwrap();
    device
        .check()
        .expect("a clock behind is not a clock set back");
    device.record("LIC-S-1", "scans", 3).unwrap();
    assert_eq!(device.flush().unwrap().accepted, 1);
    assert_eq!(usage_total(&a), 3);
    served.kill();
    let expires_at = device.check().unwrap().expires_at();
    assert!(expires_at >= grant.expires_at(), "renewed by the flush");
    *now.lock().unwrap() = expires_at - behind - Duration::minutes(1);
    device.check().expect("offline within the allowance");
    // (The offset is known to the second: the appliance's times are whole seconds.)
    *now.lock().unwrap() = expires_at - behind + Duration::seconds(2);
    assert!(
        matches!(device.check(), Err(ClientError::Expired { .. })),
        "the allowance ends on the appliance's time, not {behind} later"
    );
}

/// A device clock set right after running hours behind reads hours ahead of the appliance's
/// time until it is measured again. A renewal does not set a device's time back (a renewal
/// replayed later would give the offline allowance again), so the next flush authorizes
/// again, and the answer to its nonce measures the clock: the allowance is the appliance's.
#[test]
fn a_device_clock_set_right_is_measured_again_by_authorizing() {
    let a = scanner(1_000_000);
    let served = Served::start(&a.data);
    let state = tempfile::tempdir().unwrap();
    let (clock, now) = device_clock();
    let behind = Duration::hours(5);
    *now.lock().unwrap() -= behind;
    let mut device = client(&a, vec![served.url("")], state.path(), clock);
    device.authorize().unwrap();
    *now.lock().unwrap() += behind;
    device
        .check()
        .expect("a clock ahead is not a clock set back");
    let flushed = device.flush().unwrap();
    assert!(flushed.reauthorized, "{flushed:?}");
    let expires_at = device.check().unwrap().expires_at();
    served.kill();
    *now.lock().unwrap() = expires_at - Duration::minutes(1);
    device
        .check()
        .expect("offline until the appliance's time reaches the expiry, not 5 hours before");
    *now.lock().unwrap() = expires_at + Duration::seconds(2);
    assert!(matches!(device.check(), Err(ClientError::Expired { .. })));
}

/// A device whose state directory cannot be written (a full or read-only disk) with no
/// usage to number still sends its heartbeats, and the renewals they bring keep it running
/// (in memory until the state can be written) while the appliance is reachable.
#[test]
fn a_full_disk_does_not_stop_the_heartbeats_that_renew_the_authorization() {
    let a = scanner(1_000_000);
    let served = Served::start(&a.data);
    let state = tempfile::tempdir().unwrap();
    let mut device = client(&a, vec![served.url("")], state.path(), Clock::system());
    let granted = device.authorize().unwrap();
    let blocker = state.path().join("state.json.tmp");
    std::fs::create_dir(&blocker).unwrap();
    // The appliance's times are whole seconds: the renewal's expiry is a later one.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let outcome = device.flush().unwrap();
    let renewed = outcome.renewed.as_ref().expect("renewed").expires_at();
    assert!(renewed > granted.expires_at(), "{outcome:?}");
    assert_eq!(device.check().unwrap().expires_at(), renewed);
    // Usage that cannot be numbered on disk still fails the flush, and waits.
    device.record("LIC-S-1", "scans", 1).unwrap_err();
    std::fs::remove_dir(&blocker).unwrap();
    device.record("LIC-S-1", "scans", 1).unwrap();
    assert_eq!(device.flush().unwrap().accepted, 1);
    assert_eq!(usage_total(&a), 1);

    // Usage open when the disk fills: it cannot be stored to go out, but the heartbeat
    // still renews the authorization; the flush tells the storage error.
    device.record("LIC-S-1", "scans", 2).unwrap();
    let blockers = ["state.json.tmp", "backlog.json.tmp"].map(|f| state.path().join(f));
    for blocker in &blockers {
        std::fs::create_dir(blocker).unwrap();
    }
    let held = device.check().unwrap().expires_at();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let e = device.flush().unwrap_err();
    assert!(matches!(e, ClientError::StateIo { .. }), "{e}");
    assert!(
        device.check().unwrap().expires_at() > held,
        "renewed all the same"
    );
    assert_eq!(usage_total(&a), 1, "the open usage waits");
    for blocker in &blockers {
        std::fs::remove_dir(blocker).unwrap();
    }
    assert_eq!(device.flush().unwrap().accepted, 1);
    assert_eq!(usage_total(&a), 3);
}

#[test]
fn the_next_url_is_tried_when_one_cannot_be_reached() {
    let a = scanner(1_000_000);
    let served = Served::start(&a.data);
    let state = tempfile::tempdir().unwrap();
    let mut device = client(
        &a,
        vec![dead_url(), served.url("")],
        state.path(),
        Clock::system(),
    );
    device.authorize().unwrap();
    device.release().unwrap();
}

/// The public trial is one authorization per device (SPEC: only for a device that never
/// authorized): the SDK keeps it through a release on exit, so the next start goes on with
/// it, and its heartbeats still renew it within its 7 days.
#[test]
fn a_trial_device_keeps_its_trial_through_a_release_and_a_restart() {
    let a = scanner(1_000_000);
    assert!(keygate(&a.data, &["trial", "on"]).ok);
    let served = Served::start(&a.data);
    let state = tempfile::tempdir().unwrap();
    let trial_config = || {
        let mut c = config(&a, vec![served.url("")], state.path(), Clock::system());
        c.handshake_code = None;
        c
    };
    let mut device = Client::new(trial_config()).unwrap();
    let first = device.authorize().unwrap();
    assert!(first.authorization.items.is_empty(), "a trial");
    device.release().unwrap();
    drop(device);

    // The next start: the trial is still held, and renewed over the appliance.
    let mut device = Client::new(trial_config()).unwrap();
    let held = device.check().unwrap();
    assert_eq!(held.authorization.lease_id, first.authorization.lease_id);
    device.flush().unwrap();
    let renewed = device.check().unwrap();
    assert_eq!(renewed.authorization.lease_id, first.authorization.lease_id);
    assert!(renewed.authorization.issued_at >= first.authorization.issued_at);
    assert!(
        renewed.expires_at() <= first.authorization.issued_at + Duration::days(7),
        "never past the trial's 7 days"
    );
    // The appliance never saw a release of it.
    let released: i64 = rusqlite::Connection::open(a.data.join("keygate.db"))
        .unwrap()
        .query_row("SELECT released FROM leases", [], |r| r.get(0))
        .unwrap();
    assert_eq!(released, 0);
    // A second trial authorization is refused, as the specification has it.
    let e = device.authorize().unwrap_err();
    assert_eq!(
        e.code(),
        Some(keygate_sdk::wire::ErrorCode::HandshakeRequired)
    );
}

/// A standalone seat given back is given back for good: the authorization leaves the state
/// directory before the release is sent, so a device whose state cannot be written keeps
/// its seat (and says so) rather than starting again later on a seat another device took.
#[test]
fn a_release_the_device_cannot_record_keeps_the_seat_and_one_it_records_frees_it() {
    let a = appliance(&item("scanner", "standalone", 1, ""));
    let served = Served::start(&a.data);
    let (first, second) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let start = |state: &Path, n: u32| device_n(&a, &served, state, n);
    let mut device = start(first.path(), 1);
    device.authorize().unwrap();

    let blocker = first.path().join("state.json.tmp");
    std::fs::create_dir(&blocker).unwrap();
    let e = device.release().unwrap_err();
    assert!(matches!(e, ClientError::StateIo { .. }), "{e}");
    device
        .check()
        .expect("still authorized: nothing was released");
    let e = start(second.path(), 2).authorize().unwrap_err();
    assert_eq!(
        e.code(),
        Some(keygate_sdk::wire::ErrorCode::QuotaExceeded),
        "the seat is still the first device's"
    );
    drop(device);
    start(first.path(), 1)
        .check()
        .expect("a restart goes on with the seat it holds");

    std::fs::remove_dir(&blocker).unwrap();
    start(first.path(), 1).release().unwrap();
    start(second.path(), 2).authorize().unwrap();
    assert!(matches!(
        start(first.path(), 1).check(),
        Err(ClientError::NotAuthorized)
    ));
}

/// A device whose lease the appliance no longer has (released by a call whose answer was
/// lost, say) and that is refused a new one stops: its seat may be another device's.
#[test]
fn a_device_refused_a_new_lease_after_losing_its_own_stops() {
    let a = appliance(&item("scanner", "standalone", 1, ""));
    let served = Served::start(&a.data);
    let (first, second) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let start = |state: &Path, n: u32| device_n(&a, &served, state, n);
    let mut device = start(first.path(), 1);
    let grant = device.authorize().unwrap();
    let agent = pinned_agent(&appliance_cert(&a.data));
    let (status, _) = post_json(
        &agent,
        &served.url("/api/v1/release"),
        &serde_json::json!({"lease_id": grant.authorization.lease_id, "device_uuid": device_uuid(1)}),
    );
    assert_eq!(status, 200);
    start(second.path(), 2).authorize().unwrap();

    let e = device.flush().unwrap_err();
    assert_eq!(
        e.code(),
        Some(keygate_sdk::wire::ErrorCode::QuotaExceeded),
        "{e}"
    );
    assert!(matches!(device.check(), Err(ClientError::NotAuthorized)));
    drop(device);
    assert!(
        matches!(
            start(first.path(), 1).check(),
            Err(ClientError::NotAuthorized)
        ),
        "nor after a restart"
    );
}

#[test]
fn the_sdk_refuses_what_its_vendor_did_not_sign_for_this_appliance() {
    let a = scanner(1_000_000);
    let served = Served::start(&a.data);
    let state = tempfile::tempdir().unwrap();
    // A product of another vendor: the appliance's license is not signed by its key.
    let other_vendor = Vendor::new();
    let mut device = client(&a, vec![served.url("")], state.path(), Clock::system());
    device.authorize().unwrap();
    drop(device);
    let key = keygate_sdk::keys::public_key_from_pem(
        &std::fs::read_to_string(other_vendor.pub_path()).unwrap(),
    )
    .unwrap();
    let mut config = ClientConfig::new(
        vec![served.url("")],
        vec![key],
        "scanner",
        DeviceInfo {
            uuid: device_uuid(2),
            ..DeviceInfo::default()
        },
        tempfile::tempdir().unwrap().path(),
        TlsTrust::Pinned(appliance_cert(&a.data)),
    );
    config.handshake_code = Some(a.code.clone());
    let err = Client::new(config).unwrap().authorize().unwrap_err();
    assert!(matches!(err, ClientError::Chain(_)), "{err}");

    // An authorization from another appliance, presented with this appliance's license.
    let b = scanner(1_000_000);
    let served_b = Served::start(&b.data);
    let agent_a = pinned_agent(&appliance_cert(&a.data));
    let agent_b = pinned_agent(&appliance_cert(&b.data));
    let request = |code: &str| serde_json::json!({"handshake_code": code, "product": "scanner", "device": {"uuid": device_uuid(3)}, "nonce": NONCE});
    let (_, from_a) = post_json(
        &agent_a,
        &served.url("/api/v1/authorize"),
        &request(&a.code),
    );
    let (_, from_b) = post_json(
        &agent_b,
        &served_b.url("/api/v1/authorize"),
        &request(&b.code),
    );
    let vendor_a = keygate_sdk::keys::public_key_from_pem(
        &std::fs::read_to_string(a.vendor.pub_path()).unwrap(),
    )
    .unwrap();
    let expect = keygate_sdk::chain::Expectation {
        device_uuid: &device_uuid(3),
        nonce: Some(NONCE),
        now: OffsetDateTime::now_utc(),
    };
    keygate_sdk::chain::verify_authorization(
        from_a["authorization"].as_str().unwrap(),
        from_a["license"].as_str().unwrap(),
        [&vendor_a],
        expect,
    )
    .unwrap();
    // Signed by appliance B's key, which A's license does not name.
    let refused = keygate_sdk::chain::verify_authorization(
        from_b["authorization"].as_str().unwrap(),
        from_a["license"].as_str().unwrap(),
        [&vendor_a],
        expect,
    );
    assert!(
        matches!(
            refused,
            Err(keygate_sdk::chain::ChainError::Authorization(
                keygate_sdk::jws::JwsError::UnknownKey(_)
                    | keygate_sdk::jws::JwsError::BadSignature
            ))
        ),
        "{refused:?}"
    );
    // An expired one: verified a week and a day later.
    let late = keygate_sdk::chain::Expectation {
        now: OffsetDateTime::now_utc() + Duration::days(8),
        ..expect
    };
    assert!(matches!(
        keygate_sdk::chain::verify_authorization(
            from_a["authorization"].as_str().unwrap(),
            from_a["license"].as_str().unwrap(),
            [&vendor_a],
            late
        ),
        Err(keygate_sdk::chain::ChainError::Expired(_))
    ));
}

/// A license is never rolled back by a restore: the replaced database's newer version is
/// imported again. Only when that database is too damaged to read (the restore says so and
/// fails) does the restored appliance serve the superseded version: a device that was
/// served the newer one refuses it, keeps what it holds, and remembers across a restart,
/// until IT imports the newer file again.
#[test]
fn a_restore_keeps_the_newest_license_and_a_device_refuses_an_older_one() {
    let a = scanner(1_000_000);
    let backup = backup_now(&a.data);
    let items = item("scanner", "per_usage", 2_000_000, "counter = \"scans\"");
    let v2 = a.vendor.issue_file(
        &a.data,
        &items_file("LIC-S", &items),
        &["--version", "2"],
        "s2.lic",
    );
    let import_v2 = || {
        let run = keygate(&a.data, &["import", v2.to_str().unwrap()]);
        assert!(run.ok, "{}", run.stderr);
    };
    import_v2();
    let restore = || keygate(&a.data, &["restore", backup.to_str().unwrap()]);
    let run = restore();
    assert!(
        run.ok
            && run
                .stdout
                .contains("license LIC-S version 2, newer than the backup's, imported again"),
        "{}{}",
        run.stdout,
        run.stderr
    );
    let served = Served::start(&a.data);
    let addr = served.addr.to_string();
    let state = tempfile::tempdir().unwrap();
    let mut device = client(&a, vec![served.url("")], state.path(), Clock::system());
    let grant = device.authorize().unwrap();
    assert_eq!(grant.license.version, 2);
    assert_eq!(grant.license.items[0].quota, 2_000_000);

    // The database is lost (its first page overwritten): the backup is all there is.
    served.kill();
    let db = a.data.join("keygate.db");
    let mut damaged = std::fs::read(&db).unwrap();
    damaged[..4096].fill(0xA5);
    std::fs::write(&db, damaged).unwrap();
    let _ = std::fs::remove_file(a.data.join("keygate.db-wal"));
    let run = restore();
    assert!(
        !run.ok
            && run.stdout.contains("restored")
            && run
                .stderr
                .contains("the replaced database could not be read for its licenses")
            && run.stderr.contains("Import the newest license files again"),
        "{}{}",
        run.stdout,
        run.stderr
    );
    let served = Served::start_on(&a.data, &addr);
    let superseded = |device: &mut Client| {
        let err = device.authorize().unwrap_err();
        assert!(
            matches!(
                &err,
                ClientError::SupersededLicense { license_id, served: 1, seen: 2 } if license_id == "LIC-S"
            ),
            "{err}"
        );
    };
    superseded(&mut device);
    assert_eq!(device.check().unwrap().license.version, 2);
    drop(device);
    let mut device = client(&a, vec![served.url("")], state.path(), Clock::system());
    superseded(&mut device);

    import_v2();
    assert_eq!(device.authorize().unwrap().license.version, 2);
}

/// An admin blocks or removes a device: the SDK stops at its next contact instead of
/// working on until the authorization it holds runs out; its reports still count.
#[test]
fn a_blocked_or_removed_device_stops_at_its_next_contact() {
    let a = scanner(1_000_000);
    let served = Served::start(&a.data);
    let state = tempfile::tempdir().unwrap();
    let (clock, _) = device_clock();
    let mut device = client(&a, vec![served.url("")], state.path(), clock.clone());
    device.authorize().unwrap();
    // The admin's commands (`keygate device ...`, as the portal's buttons do).
    let admin = |action: &str| assert!(keygate(&a.data, &["device", action, &device_uuid(1)]).ok);

    // Removed (seats freed, leases revoked): the next report counts, then the device stops.
    admin("remove");
    device.record("LIC-S-1", "scans", 4).unwrap();
    let outcome = device.flush().unwrap();
    assert_eq!(outcome.accepted, 1);
    assert_eq!(usage_total(&a), 4);
    assert_eq!(
        outcome.renewal_error.map(|e| e.code.as_str()),
        Some("LEASE_REVOKED")
    );
    assert!(matches!(device.check(), Err(ClientError::NotAuthorized)));
    // A restart does not bring the old authorization back.
    drop(device);
    let mut device = client(&a, vec![served.url("")], state.path(), clock.clone());
    assert!(matches!(device.check(), Err(ClientError::NotAuthorized)));

    // Authorizing again takes a seat anew; then an admin blocks the device, which learns it
    // from a usage answer or from an authorization refused.
    device.authorize().unwrap();
    admin("block");
    let outcome = device.flush().unwrap();
    assert_eq!(
        outcome.renewal_error.map(|e| e.code.as_str()),
        Some("DEVICE_BLOCKED")
    );
    assert!(matches!(device.check(), Err(ClientError::NotAuthorized)));
    admin("unblock");
    device.authorize().unwrap();
    admin("block");
    // Usage held when an authorization is refused (a device back from days offline calls
    // authorize first) is sent on the lease before the device stops.
    device.record("LIC-S-1", "scans", 5).unwrap();
    let refused = device.authorize().unwrap_err();
    assert_eq!(refused.code().map(|c| c.as_str()), Some("DEVICE_BLOCKED"));
    assert!(matches!(device.check(), Err(ClientError::NotAuthorized)));
    assert_eq!(usage_total(&a), 9);
    assert_eq!(device.status().pending_reports, 0);
}

/// A device whose state directory is put back from an old copy (a VM snapshot, a restored
/// image) numbers its new usage above what the appliance already stored, so it counts, even
/// when the first process after the restore is offline; usage the copy held open, which the
/// original process reported since, is not counted twice.
#[test]
fn usage_after_restoring_an_old_state_directory_counts_once() {
    let a = scanner(1_000_000);
    let served = Served::start(&a.data);
    let (state, snapshot) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (clock, _) = device_clock();
    let open = |urls: Vec<String>| client(&a, urls, state.path(), clock.clone());
    let online = || vec![served.url("")];
    let mut device = open(online());
    device.authorize().unwrap();
    device.record("LIC-S-1", "scans", 1).unwrap();
    assert_eq!(device.flush().unwrap().accepted, 1);
    device.record("LIC-S-1", "scans", 2).unwrap();
    drop(device);
    // The copy: report 1 acknowledged, 2 scans still open.
    let files = ["state.json", "backlog.json"];
    for file in files {
        std::fs::copy(state.path().join(file), snapshot.path().join(file)).unwrap();
    }
    let mut device = open(online());
    device.record("LIC-S-1", "scans", 3).unwrap();
    let outcome = device.flush().unwrap();
    assert_eq!((outcome.accepted, outcome.pending), (2, 0), "{outcome:?}");
    assert_eq!(usage_total(&a), 6);
    drop(device);

    for file in files {
        std::fs::copy(snapshot.path().join(file), state.path().join(file)).unwrap();
    }
    // Offline first: the new usage waits under a number the appliance has already stored.
    let mut device = open(vec![dead_url()]);
    device.record("LIC-S-1", "scans", 10).unwrap();
    assert!(device.flush().unwrap_err().is_unreachable());
    assert_eq!(device.status().next_seq, 4, "the old copy's numbering");
    drop(device);

    // Online, but the backlog cannot be written (a full disk) when the held usage is to be
    // numbered anew: nothing is renumbered until it can be, whatever is written meanwhile.
    let blocker = state.path().join("backlog.json.tmp");
    std::fs::create_dir(&blocker).unwrap();
    let mut device = open(online());
    assert!(matches!(device.flush(), Err(ClientError::StateIo { .. })));
    device.record("LIC-S-1", "scans", 1).unwrap();
    drop(device);
    std::fs::remove_dir(&blocker).unwrap();

    let mut device = open(online());
    let outcome = device.flush().unwrap();
    assert_eq!(
        (outcome.accepted, outcome.duplicates),
        (2, 1),
        "{outcome:?}"
    );
    assert_eq!(
        usage_total(&a),
        17,
        "the 10 and the 1 scans count, the 2 held open do not again"
    );
    assert_eq!(device.status().next_seq, 6);
    assert_eq!(device.status().pending_reports, 0);
}

/// The state file is lost (unreadable after a disk fault, or deleted) while reports wait
/// offline, one of them already delivered (a crash before its acknowledgement reached the
/// disk): the next start rebuilds the state around them, the device authorizes again, and
/// every scan counts once, the next ones too.
#[test]
fn a_lost_state_file_loses_no_waiting_usage() {
    let a = scanner(1_000_000);
    let served = Served::start(&a.data);
    let url = served.url("");
    let addr = served.addr.to_string();
    let state = tempfile::tempdir().unwrap();
    let (clock, _) = device_clock();
    let mut device = client(&a, vec![url.clone()], state.path(), clock.clone());
    device.authorize().unwrap();
    device.record("LIC-S-1", "scans", 5).unwrap();
    assert_eq!(device.flush().unwrap().accepted, 1);
    served.kill();
    device.record("LIC-S-1", "scans", 7).unwrap();
    assert!(device.flush().unwrap_err().is_unreachable());
    let backlog = state.path().join("backlog.json");
    let waiting = std::fs::read(&backlog).unwrap();
    let served = Served::start_on(&a.data, &addr);
    assert_eq!(device.flush().unwrap().accepted, 1);
    served.kill();
    device.record("LIC-S-1", "scans", 11).unwrap();
    assert!(device.flush().unwrap_err().is_unreachable());
    drop(device);
    // The delivered report of 7 is back in the backlog beside the report of 11, and the
    // state file is lost.
    let mut reports: serde_json::Value = serde_json::from_slice(&waiting).unwrap();
    let now: serde_json::Value = serde_json::from_slice(&std::fs::read(&backlog).unwrap()).unwrap();
    reports["reports"]
        .as_array_mut()
        .unwrap()
        .extend(now["reports"].as_array().unwrap().iter().cloned());
    std::fs::write(&backlog, serde_json::to_vec(&reports).unwrap()).unwrap();
    std::fs::write(state.path().join("state.json"), b"\0\0\0\0").unwrap();

    let _served = Served::start_on(&a.data, &addr);
    let mut device = client(&a, vec![url], state.path(), clock);
    assert_eq!(device.status().pending_reports, 2);
    assert!(matches!(device.check(), Err(ClientError::NotAuthorized)));
    device.authorize().unwrap();
    let sent = device.flush().unwrap();
    assert_eq!(
        (sent.accepted, sent.duplicates, sent.pending),
        (1, 1, 0),
        "{sent:?}"
    );
    assert_eq!(usage_total(&a), 23);
    device.record("LIC-S-1", "scans", 2).unwrap();
    assert_eq!(device.flush().unwrap().accepted, 1);
    assert_eq!(usage_total(&a), 25);
    assert!(state.path().join("state.json.corrupt").exists());
}

/// A TCP relay to `to` that passes what the device sends at `bytes_per_s` (a slow link);
/// answers come back at full speed.
fn slow_link(to: std::net::SocketAddr, bytes_per_s: usize) -> std::net::SocketAddr {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for device in listener.incoming() {
            let (Ok(device), Ok(appliance)) = (device, TcpStream::connect(to)) else {
                return;
            };
            let (mut from_device, mut to_device) = (device.try_clone().unwrap(), device);
            let (mut to_appliance, mut from_appliance) =
                (appliance.try_clone().unwrap(), appliance);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from_appliance, &mut to_device);
            });
            std::thread::spawn(move || {
                let mut tick = vec![0; bytes_per_s / 8];
                while let Ok(n @ 1..) = from_device.read(&mut tick) {
                    if to_appliance.write_all(&tick[..n]).is_err() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(125));
                }
                let _ = to_appliance.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

/// A backlog whose request takes longer to send over a slow link (8 KiB/s here) than the
/// client's timeout still goes: a request's time limit grows with its body, as long as the
/// link keeps the pace the appliance itself requires of a body.
#[test]
fn a_backlog_goes_over_a_link_slower_than_the_timeout() {
    let a = scanner(1_000_000);
    let served = Served::start(&a.data);
    let state = tempfile::tempdir().unwrap();
    let (clock, _) = device_clock();
    client(&a, vec![served.url("")], state.path(), clock.clone())
        .authorize()
        .unwrap();
    // 300 periods offline: about 40 KB of reports.
    let mut offline = client(&a, vec![dead_url()], state.path(), clock.clone());
    for _ in 0..300 {
        offline.record("LIC-S-1", "scans", 1).unwrap();
        assert!(offline.flush().unwrap_err().is_unreachable());
    }
    drop(offline);
    let link = slow_link(served.addr, 8 * 1024);
    let mut config = config(&a, vec![format!("https://{link}")], state.path(), clock);
    config.timeout = std::time::Duration::from_secs(1);
    let mut device = Client::new(config).unwrap();
    let sent = device.flush().unwrap();
    assert_eq!((sent.accepted, sent.pending), (300, 0), "{sent:?}");
    assert_eq!(usage_total(&a), 300);
}

/// The device example of the README (`cargo run -p keygate-sdk --example device`), built by
/// `cargo test --workspace` next to this test's binary.
fn device_example(a: &Appliance, url: &str, dir: &Path, args: &[&str]) -> std::process::Command {
    let bin = std::env::current_exe()
        .unwrap()
        .parent() // deps
        .and_then(Path::parent)
        .unwrap()
        .join("examples/device");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p keygate-sdk --example device` \
         (`cargo test --workspace` does)",
        bin.display()
    );
    let ca = dir.join("appliance.pem");
    std::fs::write(&ca, appliance_cert(&a.data)).unwrap();
    let mut command = std::process::Command::new(bin);
    command
        .args(["--url", url, "--ca"])
        .arg(&ca)
        .arg("--vendor-key")
        .arg(a.vendor.pub_path())
        .args(["--product", "scanner", "--handshake", &a.code, "--state"])
        .arg(dir.join("state"))
        .args(args);
    command
}

/// Runs the example to its end: its standard output, or a panic with what it printed.
fn device_says(a: &Appliance, url: &str, dir: &Path, args: &[&str]) -> String {
    let out = device_example(a, url, dir, args).output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "device {args:?}: {stdout}{stderr}");
    stdout
}

/// A newcomer's walk through the example: authorize, record, report, check offline, keep
/// running under another user (it authorizes again for that user), release.
#[test]
fn the_device_example_authorizes_reports_runs_and_releases() {
    let a = scanner(1_000);
    let served = Served::start(&a.data);
    let url = served.url("");
    let dir = tempfile::tempdir().unwrap();
    let says = |args: &[&str]| device_says(&a, &url, dir.path(), args);

    let authorized = says(&["authorize"]);
    assert!(authorized.starts_with("authorized until"), "{authorized}");
    assert!(authorized.contains("LIC-S-1"), "{authorized}");
    assert!(says(&["use", "LIC-S-1", "scans", "5"]).contains("recorded 5 scans on LIC-S-1"));
    says(&["flush"]);
    assert_eq!(usage_total(&a), 5);
    assert!(says(&["check"]).starts_with("valid until"));

    // Stored for no user, run for bob: the loop authorizes bob instead of idling.
    let mut run = device_example(
        &a,
        &url,
        dir.path(),
        &["--user", "bob", "run", "--every", "1"],
    )
    .stdout(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    // Its lines as they come, read apart: a loop that hangs fails the test, not the run.
    let mut seen = Vec::new();
    for line in lines_within_20_s(run.stdout.take().unwrap()) {
        let done = line.starts_with("authorized until") || seen.len() > 20;
        seen.push(line);
        if done {
            break;
        }
    }
    run.kill().unwrap();
    run.wait().unwrap();
    assert!(
        seen.last()
            .is_some_and(|l| l.starts_with("authorized until")),
        "{seen:#?}"
    );

    let released = says(&["--user", "bob", "release"]);
    assert!(
        released.contains("released; the authorization is forgotten"),
        "{released}"
    );
    let refused = device_example(&a, &url, dir.path(), &["--user", "bob", "check"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && said.contains("holds no authorization"),
        "nothing is stored after a release: {said}"
    );
}

/// The appliance's clock ran half an hour ahead and was set right (inside the hour in which
/// the appliance still signs): its renewals are older than the authorization the device
/// holds. The device authorizes again, a fresh nonce vouching for the answer, instead of
/// ignoring the renewals until the clock catches up (for longer than its offline allowance,
/// it would stop while the appliance was there to renew it).
#[test]
fn renewals_from_an_appliance_clock_set_back_are_taken_by_authorizing_again() {
    let a = scanner(1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let offset = dir.path().join("offset");
    std::fs::write(&offset, "+1800\n").unwrap();
    let served = Served::start_with(&a.data, "127.0.0.1:0", &faketime(&offset));
    let state = tempfile::tempdir().unwrap();
    let (clock, _) = device_clock();
    let mut device = client(&a, vec![served.url("")], state.path(), clock);
    let ahead = device.authorize().unwrap().authorization.issued_at;
    assert!(ahead > OffsetDateTime::now_utc() + Duration::minutes(25));

    std::fs::write(&offset, "+0\n").unwrap();
    device.record("LIC-S-1", "scans", 3).unwrap();
    let sent = device.flush().unwrap();
    assert_eq!(sent.accepted, 1);
    assert!(sent.reauthorized);
    let renewed = sent.renewed.expect("authorized again");
    assert!(renewed.authorization.issued_at < ahead - Duration::minutes(25));
    device.check().unwrap();
    // Renewals newer than the authorization held are taken as they come.
    let again = device.flush().unwrap();
    assert!(!again.reauthorized && again.renewed.is_some(), "{again:?}");
    assert_eq!(usage_total(&a), 3);
}
