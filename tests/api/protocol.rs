//! Issue 3: the client protocol against the real server, every model's edges over HTTP.

use keygate_sdk::wire::AuthorizationState;

use serde_json::json;
use time::Duration;

use crate::helpers::*;

const DAY: Duration = Duration::days(1);

#[test]
fn handshake_resolution_follows_the_table() {
    let f = Fixture::new(&item("reader", "per_device", 100, ""));
    let code = |body: serde_json::Value| {
        let (status, body) = f.authorize(&body);
        (
            status,
            body["error"]["code"].as_str().unwrap_or("").to_string(),
        )
    };
    let base =
        |n: u32| json!({"product": "reader", "device": {"uuid": device_uuid(n)}, "nonce": NONCE});
    let with = |n: u32, fields: serde_json::Value| {
        let mut b = base(n);
        for (k, v) in fields.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    // organization given, code empty: the organization's default code.
    assert_eq!(code(with(1, json!({"organization_id": "200001"}))).0, 200);
    assert_eq!(
        code(with(2, json!({"organization_id": "999999"}))),
        (404, "HANDSHAKE_NOT_FOUND".into())
    );
    // both given: the code must belong to the organization.
    assert_eq!(
        code(with(
            3,
            json!({"organization_id": "200001", "handshake_code": f.code})
        ))
        .0,
        200
    );
    assert_eq!(
        code(with(
            4,
            json!({"organization_id": "999999", "handshake_code": f.code})
        )),
        (404, "HANDSHAKE_NOT_FOUND".into())
    );
    // code only.
    assert_eq!(code(with(5, json!({"handshake_code": f.code}))).0, 200);
    assert_eq!(
        code(with(6, json!({"handshake_code": "no-such-code"}))),
        (404, "HANDSHAKE_NOT_FOUND".into())
    );
    // neither: the public trial, only when enabled and only for a device never seen.
    assert_eq!(code(base(7)), (400, "HANDSHAKE_REQUIRED".into()));
    assert!(keygate(&f.data, &["trial", "on"]).ok);
    let (status, body) = f.authorize(&base(7));
    assert_eq!(status, 200, "{body}");
    let trial = f.verify(&body, 7);
    assert!(trial.items.is_empty());
    assert_eq!(trial.expires_at - trial.issued_at, 7 * DAY);
    assert_eq!(
        code(base(7)),
        (400, "HANDSHAKE_REQUIRED".into()),
        "one trial per device"
    );
    assert_eq!(
        code(base(1)),
        (400, "HANDSHAKE_REQUIRED".into()),
        "known devices get no trial"
    );

    // Another vendor's license imported last: a trial device of the first vendor's product
    // still gets a license its vendor's key verifies (the one that licenses its product),
    // one of the other vendor's product that vendor's; one of a product no license names,
    // the newest license.
    let other = Vendor::new();
    assert!(keygate(&f.data, &["trust", other.pub_path().to_str().unwrap()]).ok);
    let license = other.issue_file(
        &f.data,
        &items_file("LIC-B", &item("scanner", "per_device", 5, "")),
        &[],
        "b.lic",
    );
    assert!(keygate(&f.data, &["import", license.to_str().unwrap()]).ok);
    let license_of = |n: u32, product: &str| -> String {
        let mut body = base(n);
        body["product"] = json!(product);
        let (status, body) = f.authorize(&body);
        assert_eq!(status, 200, "{body}");
        let license = body["license"].as_str().unwrap();
        let payload: keygate_sdk::wire::License = keygate_sdk::jws::Token::decode(license)
            .unwrap()
            .payload_as()
            .unwrap();
        payload.license_id
    };
    assert_eq!(license_of(9, "reader"), "LIC-T");
    assert_eq!(license_of(10, "scanner"), "LIC-B");
    assert_eq!(license_of(11, "viewer"), "LIC-B");
    let (_, body) = {
        let mut body = base(12);
        body["product"] = json!("reader");
        f.authorize(&body)
    };
    assert!(f.verify(&body, 12).items.is_empty());

    assert!(keygate(&f.data, &["trial", "off"]).ok);
    assert_eq!(code(base(8)), (400, "HANDSHAKE_REQUIRED".into()));
}

#[test]
fn per_device_admits_110_percent_and_known_devices_keep_working() {
    let f = Fixture::new(&item("reader", "per_device", 10, ""));
    let first = f.authorized("reader", 1);
    assert_eq!(first.state, AuthorizationState::Ok);
    assert_eq!(first.items[0].features, Vec::<String>::new());
    for n in 2..=10 {
        assert_eq!(
            f.authorized("reader", n).state,
            AuthorizationState::Ok,
            "device {n}"
        );
    }
    assert_eq!(
        f.authorized("reader", 11).state,
        AuthorizationState::Tolerance
    );
    assert_eq!(f.refused("reader", 12), "QUOTA_EXCEEDED");
    // Known devices keep their seat, and their lease.
    let again = f.authorized("reader", 1);
    assert_eq!(again.lease_id, first.lease_id);
    assert_eq!(again.state, AuthorizationState::Tolerance);
    assert_eq!(f.item_value("LIC-T-1", "seats_used"), 11);
    // Offline allowance: 7 days.
    assert_eq!(again.expires_at - again.issued_at, 7 * DAY);
}

#[test]
fn per_device_seat_frees_after_365_days_unused() {
    let f = Fixture::new(&item("reader", "per_device", 1, ""));
    f.authorized("reader", 1);
    f.app.clock.advance(364 * DAY);
    assert_eq!(f.refused("reader", 2), "QUOTA_EXCEEDED");
    f.app.clock.advance(DAY);
    f.authorized("reader", 2);
    assert_eq!(
        f.refused("reader", 1),
        "QUOTA_EXCEEDED",
        "device 1 lost its seat"
    );
    // Freed for the new device, before any housekeeping: in the audit log all the same.
    assert_eq!(
        f.audited("seat freed"),
        [(
            "seat freed".to_string(),
            format!("{} on LIC-T-1", device_uuid(1)),
            "unused for 365 days".to_string()
        )]
    );
}

#[test]
fn a_per_device_seat_in_use_is_kept_and_its_use_is_recorded_hourly() {
    let f = Fixture::new(&item("reader", "per_device", 1, ""));
    let last_used = || -> i64 {
        f.db()
            .query_row("SELECT last_used_at FROM seats", [], |r| r.get(0))
            .unwrap()
    };
    f.authorized("reader", 1);
    let first = last_used();
    f.app.clock.advance(Duration::minutes(59));
    f.authorized("reader", 1);
    assert_eq!(
        last_used(),
        first,
        "used again within the hour: not written"
    );
    f.app.clock.advance(200 * DAY);
    f.authorized("reader", 1);
    assert_eq!(last_used(), f.app.clock_now().unix_timestamp());
    f.app.clock.advance(200 * DAY);
    assert_eq!(
        f.refused("reader", 2),
        "QUOTA_EXCEEDED",
        "400 days after its first authorization, 200 after its last use: still held"
    );
}

#[test]
fn per_active_device_seat_frees_90_days_after_first_authorization() {
    let f = Fixture::new(&item("reader", "per_active_device", 1, ""));
    f.authorized("reader", 1);
    f.app.clock.advance(89 * DAY);
    f.authorized("reader", 1); // used every day: still its first 90 days
    assert_eq!(f.refused("reader", 2), "QUOTA_EXCEEDED");
    f.app.clock.advance(DAY);
    f.authorized("reader", 2);
    assert_eq!(f.refused("reader", 1), "QUOTA_EXCEEDED");
}

/// A known device whose seat lapsed comes back while more lapsed seats wait for the daily
/// housekeeping than a request frees: its own seat is freed and taken anew (a new 90 days),
/// by an authorization and by a renewal alike.
#[test]
fn a_device_whose_seat_lapsed_takes_it_again_behind_a_lapsed_fleet() {
    // 120 offline days: the device's lease is still valid to renew 91 days later.
    let f = Fixture::new(
        &item("scan", "per_active_device", 3_000, "")
            .replace("offline_days = 7", "offline_days = 120"),
    );
    let own = f.authorized("scan", 3_000);
    // 2,499 devices first authorized a second before it: the batches freed reach them first.
    let before = f.app.clock_now().unix_timestamp() - 1;
    f.db()
        .execute_batch(&format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2499)
             INSERT INTO devices (uuid, first_seen, last_seen)
                 SELECT printf('00000000-0000-4000-8000-%012d', i), {before}, {before} FROM n;
             INSERT INTO seats (item_id, device_id, first_auth_at, last_used_at)
                 SELECT 'LIC-T-1', id, {before}, {before} FROM devices WHERE id > 1;
             UPDATE items SET seats_used = 2500 WHERE item_id = 'LIC-T-1';"
        ))
        .unwrap();
    f.app.clock.advance(91 * DAY);
    let now = f.app.clock_now().unix_timestamp();
    let first_auth = |n: u32| -> i64 {
        f.db()
            .query_row(
                "SELECT s.first_auth_at FROM seats s JOIN devices d ON d.id = s.device_id
                 WHERE d.uuid = ?1",
                [device_uuid(n)],
                |r| r.get(0),
            )
            .unwrap()
    };
    // A renewal: the heartbeat frees the device's own seat and 100 of the fleet's.
    let renewed = f.heartbeat(&own.lease_id, 3_000).expect("renewed");
    assert_eq!(renewed["state"], "ok");
    assert_eq!(first_auth(3_000), now, "a new 90 days");
    // An authorization of a device deep in the fleet: its seat, a batch from choosing the
    // item, another from taking the seat.
    f.authorized("scan", 2_000);
    assert_eq!(first_auth(2_000), now);
    let freed = f.audited("seat freed").len() as i64;
    assert_eq!(
        freed,
        2 + 3 * keygate::licensing::authorize::FREE_PER_REQUEST
    );
    assert_eq!(f.item_value("LIC-T-1", "seats_used"), 2_500 - freed + 2);
}

#[test]
fn a_known_devices_state_leaves_tolerance_when_the_seats_over_quota_lapse() {
    // 30 offline days: the late device's lease is still valid to renew 11 days later.
    let f = Fixture::new(
        &item("reader", "per_active_device", 10, "")
            .replace("offline_days = 7", "offline_days = 30"),
    );
    for n in 1..=10 {
        f.authorized("reader", n);
    }
    f.app.clock.advance(80 * DAY);
    let late = f.authorized("reader", 11);
    assert_eq!(late.state, AuthorizationState::Tolerance, "11 of 10");
    // Day 91: the first ten seats lapsed, before any housekeeping has run.
    f.app.clock.advance(11 * DAY);
    let renewed = f.heartbeat(&late.lease_id, 11).unwrap();
    assert_eq!(renewed["state"], "ok", "{renewed}");
    assert_eq!(f.item_value("LIC-T-1", "seats_used"), 1);
    let freed = f.audited("seat freed");
    assert_eq!(freed.len(), 10, "{freed:?}");
    assert!(
        freed
            .iter()
            .all(|(_, _, why)| why == "90 days after its first authorization")
    );
    assert_eq!(f.authorized("reader", 11).state, AuthorizationState::Ok);
}

#[test]
fn concurrent_device_records_one_exception_per_window_and_stops_at_max() {
    let f = Fixture::new(&item(
        "viewer",
        "concurrent_device",
        1,
        "max_exceptions = 2",
    ));
    assert_eq!(f.authorized("viewer", 1).state, AuthorizationState::Ok);
    assert_eq!(
        f.authorized("viewer", 2).state,
        AuthorizationState::Tolerance
    );
    f.authorized("viewer", 3); // the same window: still one exception
    assert_eq!(f.item_value("LIC-T-1", "exceptions"), 1);
    f.app.clock.advance(Duration::minutes(3));
    let a = f.authorized("viewer", 1);
    assert_eq!(a.state, AuthorizationState::Ok);
    let b = f.authorized("viewer", 2);
    assert_eq!(b.state, AuthorizationState::Tolerance);
    assert_eq!(f.item_value("LIC-T-1", "exceptions"), 2);
    // max_exceptions reached: the item stops for every device.
    assert_eq!(f.refused("viewer", 1), "QUOTA_EXCEEDED");
    assert_eq!(f.refused("viewer", 4), "QUOTA_EXCEEDED");
    // The console says what is used of a concurrent item: exceptions of max_exceptions.
    let run = keygate(&f.data, &["licenses"]);
    let row = run.stdout.lines().find(|l| l.contains("LIC-T-1")).unwrap();
    assert!(row.contains(" 2/2 exc. "), "{row}");
    // Stopped, its devices' authorizations run out; their calls still come (a backlog sent
    // before authorizing again) and are recorded, but count no exception of an item no
    // device can use (they would use up a later license's higher max_exceptions).
    f.app.clock.advance(Duration::days(8));
    for _ in 0..3 {
        assert_eq!(f.heartbeat(&a.lease_id, 1).unwrap_err(), "LEASE_NOT_FOUND");
        assert_eq!(f.heartbeat(&b.lease_id, 2).unwrap_err(), "LEASE_NOT_FOUND");
        f.app.clock.advance(Duration::minutes(3));
    }
    assert_eq!(f.item_value("LIC-T-1", "exceptions"), 2);
}

#[test]
fn release_frees_a_concurrent_seat_at_once() {
    let f = Fixture::new(&item(
        "viewer",
        "concurrent_device",
        1,
        "max_exceptions = 5",
    ));
    let a = f.authorized("viewer", 1);
    let (status, body) = f.release(&a.lease_id, 1);
    assert_eq!((status, body["released"].as_bool()), (200, Some(true)));
    assert_eq!(f.release(&a.lease_id, 1).0, 200, "release is idempotent");
    assert_eq!(f.authorized("viewer", 2).state, AuthorizationState::Ok);
    assert_eq!(f.item_value("LIC-T-1", "exceptions"), 0);
    let (status, body) = f.release(&a.lease_id, 2);
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("LEASE_NOT_FOUND")),
        "another device's lease"
    );
}

#[test]
fn concurrent_instance_counts_instances() {
    let f = Fixture::new(&item(
        "viewer",
        "concurrent_instance",
        1,
        "max_exceptions = 9",
    ));
    let mut request = f.request("viewer", 1);
    request["device"]["instance"] = json!("window-a");
    let (_, body) = f.authorize(&request);
    assert_eq!(f.verify(&body, 1).state, AuthorizationState::Ok);
    request["device"]["instance"] = json!("window-b");
    let (_, body) = f.authorize(&request);
    assert_eq!(f.verify(&body, 1).state, AuthorizationState::Tolerance);
    assert_eq!(f.item_value("LIC-T-1", "exceptions"), 1);
}

#[test]
fn per_usage_stops_past_105_percent_but_records_usage() {
    let f = Fixture::new(&item("scanner", "per_usage", 100, "counter = \"scans\""));
    let a = f.authorized("scanner", 1);
    let stream = "11111111-1111-4111-8111-111111111111";
    let (status, body) =
        f.usage(&f.reports(&a.lease_id, 1, stream, &[(1, "LIC-T-1", "scans", 100)]));
    assert_eq!(status, 200, "{body}");
    assert!(body["authorization"].is_string());
    let (_, body) = f.usage(&f.reports(&a.lease_id, 1, stream, &[(2, "LIC-T-1", "scans", 5)]));
    assert!(body["authorization"].is_string(), "exactly 105 %: {body}");
    assert_eq!(
        f.authorized("scanner", 2).state,
        AuthorizationState::Tolerance
    );
    let (status, body) = f.usage(&f.reports(&a.lease_id, 1, stream, &[(3, "LIC-T-1", "scans", 1)]));
    assert_eq!(status, 200);
    assert_eq!(
        body["accepted"], 1,
        "usage past the cutoff is still recorded"
    );
    assert_eq!(body["renewal_error"]["code"], "QUOTA_EXCEEDED");
    assert!(body.get("authorization").is_none());
    assert_eq!(f.item_value("LIC-T-1", "usage_total"), 106);
    assert_eq!(f.refused("scanner", 1), "QUOTA_EXCEEDED");
    assert_eq!(f.refused("scanner", 3), "QUOTA_EXCEEDED");
}

#[test]
fn standalone_is_a_hard_limit_and_release_frees_the_seat() {
    let f = Fixture::new(&item("cad", "standalone", 2, ""));
    let a = f.authorized("cad", 1);
    f.authorized("cad", 2);
    assert_eq!(f.refused("cad", 3), "QUOTA_EXCEEDED");
    assert_eq!(f.release(&a.lease_id, 1).0, 200);
    f.authorized("cad", 3);
    assert_eq!(f.refused("cad", 1), "QUOTA_EXCEEDED");
}

/// Two items of `model` for "cad" (quota 1 each), the second configured to code LAB; device 1
/// authorizes on the default code, then through LAB, which moves its lease to the second
/// item. Returns the fixture and the moved authorization.
fn authorized_then_moved(model: &str) -> (Fixture, keygate_sdk::wire::Authorization) {
    let f = Fixture::new(&[item("cad", model, 1, ""), item("cad", model, 1, "")].concat());
    f.assign_to_new_code("LIC-T-2", "LAB");
    let first = f.authorized("cad", 1);
    assert_eq!(first.items[0].item_id, "LIC-T-1");
    let mut lab = f.request("cad", 1);
    lab["handshake_code"] = json!("LAB");
    let (status, body) = f.authorize(&lab);
    assert_eq!(status, 200, "{body}");
    let moved = f.verify(&body, 1);
    assert_eq!(
        (moved.lease_id.as_str(), moved.items[0].item_id.as_str()),
        (first.lease_id.as_str(), "LIC-T-2")
    );
    (f, moved)
}

/// A device authorized again through another handshake code moves its lease to that code's
/// item: the seat it held in the first item is left, not held twice.
#[test]
fn a_lease_moved_to_another_codes_item_leaves_its_old_seat() {
    let (f, moved) = authorized_then_moved("standalone");
    let seats = |item: &str| f.item_value(item, "seats_used");
    assert_eq!((seats("LIC-T-1"), seats("LIC-T-2")), (0, 1));
    f.authorized("cad", 2);
    // Its release frees the one seat it holds.
    assert_eq!(f.release(&moved.lease_id, 1).0, 200);
    assert_eq!(seats("LIC-T-2"), 0);
}

/// per_device seats count the devices ever authorized: a device that moves to another
/// code's item keeps its first seat (only removal or a year unused frees it), so another
/// device cannot take it and the first device is still known there.
#[test]
fn a_per_device_seat_stays_when_its_lease_moves_to_another_code() {
    let (f, _) = authorized_then_moved("per_device");
    let seats = |item: &str| f.item_value(item, "seats_used");
    assert_eq!((seats("LIC-T-1"), seats("LIC-T-2")), (1, 1));
    assert_eq!(f.refused("cad", 2), "QUOTA_EXCEEDED");
    assert_eq!(f.authorized("cad", 1).items[0].item_id, "LIC-T-1");
}

/// A new lease of an instance whose only lease is dropped to make room for it (a device
/// at its 32 leases): the instance is counted once in the window, by the authorization and
/// the calls that follow in the same window; also when the dropped lease had called in this
/// window already (a lapsed lease's calls still mark it).
#[test]
fn an_instance_taking_the_place_of_its_dropped_lease_counts_once_in_the_window() {
    for called_in_first in [false, true] {
        let f = Fixture::new(&item(
            "viewer",
            "concurrent_instance",
            100,
            "max_exceptions = 5",
        ));
        let authorize = |instance: &str, user: &str| {
            let mut request = f.request("viewer", 1);
            request["device"]["instance"] = json!(instance);
            request["device"]["user"] = json!(user);
            let (status, body) = f.authorize(&request);
            assert_eq!(status, 200, "{body}");
            f.verify(&body, 1)
        };
        let ann = authorize("kiosk", "ann");
        f.app.clock.advance(8 * DAY); // that lease expires
        if called_in_first {
            assert!(f.heartbeat(&ann.lease_id, 1).is_err(), "not renewed");
        }
        for n in 1..=31 {
            authorize(&format!("process-{n}"), "ann");
        }
        let bob = authorize("kiosk", "bob");
        f.heartbeat(&bob.lease_id, 1).expect("renewed");
        let window = f.app.clock_now().unix_timestamp() / 180;
        let active: i64 = f
            .db()
            .query_row(
                "SELECT active FROM concurrency_windows WHERE item_id = 'LIC-T-1' AND window = ?1",
                [window],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(
            active, 32,
            "31 processes and the kiosk (called in first: {called_in_first})"
        );
        assert_eq!(f.item_value("LIC-T-1", "seats_used"), 32);
    }
}

#[test]
fn releasing_one_lease_keeps_a_seat_another_lease_of_the_device_uses() {
    let f = Fixture::new(
        &[
            item("cad", "standalone", 1, ""),
            item("viewer", "concurrent_device", 1, "max_exceptions = 5"),
        ]
        .concat(),
    );
    for product in ["cad", "viewer"] {
        // One device, two users: two leases, one seat.
        let as_user = |user: &str| {
            let mut request = f.request(product, 1);
            request["device"]["user"] = json!(user);
            let (status, body) = f.authorize(&request);
            assert_eq!(status, 200, "{body}");
            f.verify(&body, 1).lease_id
        };
        let (alice, bob) = (as_user("alice"), as_user("bob"));
        assert_ne!(alice, bob);
        assert_eq!(f.release(&alice, 1).0, 200);
        let window_active = || -> i64 {
            f.db()
                .query_row(
                    "SELECT coalesce(max(active), 0) FROM concurrency_windows WHERE item_id = 'LIC-T-2'",
                    [],
                    |r| r.get(0),
                )
                .unwrap()
        };
        if product == "cad" {
            assert_eq!(
                f.refused("cad", 2),
                "QUOTA_EXCEEDED",
                "bob still uses the seat"
            );
            assert_eq!(f.item_value("LIC-T-1", "seats_used"), 1);
        } else {
            assert_eq!(window_active(), 1, "bob still counts in the window");
        }
        assert_eq!(f.release(&bob, 1).0, 200);
        if product == "cad" {
            assert_eq!(f.item_value("LIC-T-1", "seats_used"), 0);
        } else {
            assert_eq!(window_active(), 0);
            // A late heartbeat of the released lease is not counted again.
            let (status, body) = f.usage(&json!({"lease_id": bob, "device_uuid": device_uuid(1),
                "stream": "22222222-2222-4222-8222-222222222222", "reports": []}));
            assert_eq!(
                (status, body["renewal_error"]["code"].as_str()),
                (200, Some("LEASE_NOT_FOUND"))
            );
            assert_eq!(window_active(), 0);
        }
    }
    f.authorized("cad", 2);
}

#[test]
fn tokens_daily_passes_grace_and_top_up() {
    let f = Fixture::new(&item(
        "ocr",
        "tokens",
        10,
        "tokens_per_pass = 5\ngrace_days = 2",
    ));
    let used = |f: &Fixture| f.item_value("LIC-T-1", "tokens_used");
    assert_eq!(f.authorized("ocr", 1).state, AuthorizationState::Ok);
    assert_eq!(used(&f), 5);
    f.authorized("ocr", 1);
    assert_eq!(used(&f), 5, "the same pass for 24 hours");
    let mut other_user = f.request("ocr", 1);
    other_user["device"]["user"] = json!("alice");
    assert_eq!(f.authorize(&other_user).0, 200);
    assert_eq!(used(&f), 10, "another user on the same device pays");
    // The balance is 0: the next pass overdraws into grace.
    assert_eq!(f.authorized("ocr", 2).state, AuthorizationState::Grace);
    assert_eq!(used(&f), 15);
    f.app.clock.advance(DAY);
    assert_eq!(
        f.authorized("ocr", 1).state,
        AuthorizationState::Grace,
        "a new day, a new pass"
    );
    assert_eq!(used(&f), 20);
    f.app.clock.advance(DAY);
    assert_eq!(
        f.refused("ocr", 1),
        "QUOTA_EXCEEDED",
        "grace is over for every device"
    );
    assert_eq!(f.refused("ocr", 3), "QUOTA_EXCEEDED");

    // A top-up pays the debt (10) first: 20 - 10 leaves 10, two passes.
    f.import(
        "LIC-TOPUP",
        &item("ocr", "tokens", 20, "tokens_per_pass = 5"),
        &[],
    );
    assert_eq!(used(&f), 10, "the debtor item is settled");
    assert_eq!(f.item_value("LIC-TOPUP-1", "tokens_used"), 10);
    assert_eq!(f.authorized("ocr", 1).state, AuthorizationState::Ok);
    f.authorized("ocr", 3);
    assert_eq!(f.item_value("LIC-TOPUP-1", "tokens_used"), 20);
}

/// The grace is the product's on its code, counted from when its tokens first went below
/// zero: a second exhausted item, or a top-up smaller than the debt, opens no new grace.
#[test]
fn a_second_item_or_a_small_top_up_opens_no_new_grace() {
    let terms = "tokens_per_pass = 5\ngrace_days = 2";
    let f = Fixture::new(
        &[
            item("ocr", "tokens", 5, terms),
            item("ocr", "tokens", 5, terms),
        ]
        .concat(),
    );
    let used = |item: &str| f.item_value(item, "tokens_used");
    assert_eq!(f.authorized("ocr", 1).state, AuthorizationState::Ok);
    assert_eq!(f.authorized("ocr", 2).state, AuthorizationState::Ok);
    assert_eq!(f.authorized("ocr", 3).state, AuthorizationState::Grace);
    assert_eq!(used("LIC-T-1") + used("LIC-T-2"), 15);
    f.app.clock.advance(DAY);
    assert_eq!(f.authorized("ocr", 4).state, AuthorizationState::Grace);
    assert_eq!(
        used("LIC-T-1") + used("LIC-T-2"),
        20,
        "both items overdrawn"
    );
    f.app.clock.advance(DAY);
    assert_eq!(
        f.refused("ocr", 5),
        "QUOTA_EXCEEDED",
        "two days after the tokens first went below zero, whichever item"
    );
    assert_eq!(used("LIC-T-1") + used("LIC-T-2"), 20);

    // A top-up of 3 (with the same grace) pays 3 of the debt of 10: the tokens are still
    // below zero, and their grace over.
    f.import("LIC-TOPUP", &item("ocr", "tokens", 3, terms), &[]);
    assert_eq!(
        f.item_value("LIC-TOPUP-1", "tokens_used"),
        3,
        "all of it paid the debt"
    );
    assert_eq!(f.refused("ocr", 5), "QUOTA_EXCEEDED");
    assert_eq!(f.item_value("LIC-TOPUP-1", "tokens_used"), 3);
}

/// A top-up that starts later (next year's allotment, imported early) pays the debt when it
/// starts, not at its import: until then the tokens stay below zero and their grace over.
#[test]
fn a_top_up_starting_later_pays_the_debt_when_it_starts() {
    let f = Fixture::new(&item(
        "ocr",
        "tokens",
        10,
        "tokens_per_pass = 5\ngrace_days = 2",
    ));
    for n in 1..=3 {
        f.authorized("ocr", n);
    }
    assert_eq!(f.item_value("LIC-T-1", "tokens_used"), 15, "5 below zero");
    f.app.clock.advance(Duration::days(3));
    assert_eq!(f.refused("ocr", 4), "QUOTA_EXCEEDED");

    f.import(
        "LIC-NEXT",
        &item(
            "ocr",
            "tokens",
            20,
            "tokens_per_pass = 5\nstarts_at = 2030-01-01T00:00:00Z\nexpires_at = 2036-01-01T00:00:00Z",
        ),
        &[],
    );
    assert_eq!(
        f.item_value("LIC-NEXT-1", "tokens_used"),
        0,
        "nothing paid yet"
    );
    assert_eq!(f.item_value("LIC-T-1", "tokens_used"), 15);
    assert_eq!(
        f.refused("ocr", 4),
        "QUOTA_EXCEEDED",
        "still below zero, grace over"
    );
    f.app.run_job("alerts").unwrap();
    assert_eq!(f.item_value("LIC-NEXT-1", "tokens_used"), 0, "not started");

    // Started: the first pass it sells comes after the debt is paid.
    let start = time::macros::datetime!(2030-01-01 00:00 UTC);
    f.app
        .clock
        .advance(start - f.app.clock_now() + Duration::minutes(5));
    assert_eq!(f.authorized("ocr", 4).state, AuthorizationState::Ok);
    assert_eq!(
        f.item_value("LIC-T-1", "tokens_used"),
        10,
        "the debt is paid"
    );
    assert_eq!(f.item_value("LIC-NEXT-1", "tokens_used"), 5 + 5);
    assert_eq!(f.item_value("LIC-NEXT-1", "tokens_unsettled"), 0);
    f.app.run_job("alerts").unwrap();
    assert_eq!(f.item_value("LIC-NEXT-1", "tokens_used"), 10, "paid once");
}

/// Only an unexpired item's tokens pay a debt: an expired item's balance is gone, so a later
/// import (here a small top-up) does not settle the debt from it.
#[test]
fn an_expired_items_tokens_do_not_pay_a_debt() {
    let f = Fixture::new(
        &[
            item(
                "ocr",
                "tokens",
                100,
                "tokens_per_pass = 5\nstarts_at = 2026-01-01T00:00:00Z\nexpires_at = 2026-06-05T00:00:00Z",
            ),
            item("ocr", "tokens", 5, "tokens_per_pass = 5\ngrace_days = 30"),
        ]
        .concat(),
    );
    f.assign_to_new_code("LIC-T-2", "LAB");
    let through_lab = |n: u32| {
        let mut request = f.request("ocr", n);
        request["handshake_code"] = json!("LAB");
        let (status, body) = f.authorize(&request);
        assert_eq!(status, 200, "{body}");
        f.verify(&body, n).state
    };
    assert_eq!(through_lab(1), AuthorizationState::Ok);
    assert_eq!(through_lab(2), AuthorizationState::Grace);
    f.app.clock.advance(Duration::days(5)); // LIC-T-1 expired with 100 tokens unspent
    f.import(
        "LIC-TOPUP",
        &item("ocr", "tokens", 3, "tokens_per_pass = 5"),
        &[],
    );
    let tokens = |item: &str| f.item_value(item, "tokens_used");
    assert_eq!(
        (tokens("LIC-T-1"), tokens("LIC-T-2"), tokens("LIC-TOPUP-1")),
        (0, 7, 3),
        "the top-up pays 3 of the debt of 5; the expired item pays nothing"
    );
}

/// Two tokens items, the second (5 tokens) on a new code LAB, whose two devices took a pass
/// of 5 each: LAB is 5 in debt.
fn lab_in_debt(items: &str) -> Fixture {
    let f = Fixture::new(items);
    f.assign_to_new_code("LIC-T-2", "LAB");
    for n in [1, 2] {
        let mut request = f.request("ocr", n);
        request["handshake_code"] = json!("LAB");
        assert_eq!(f.authorize(&request).0, 200);
    }
    let tokens = |item: &str| f.item_value(item, "tokens_used");
    assert_eq!((tokens("LIC-T-1"), tokens("LIC-T-2")), (0, 10));
    f
}

/// Only a top-up pays a debt: importing another license (here one for another product)
/// moves no tokens between the items already there, whose codes may serve other plants.
#[test]
fn only_the_imported_top_up_pays_a_tokens_debt() {
    let f = lab_in_debt(
        &[
            item("ocr", "tokens", 100, "tokens_per_pass = 5"),
            item("ocr", "tokens", 5, "tokens_per_pass = 5\ngrace_days = 30"),
        ]
        .concat(),
    );
    let tokens = |item: &str| f.item_value(item, "tokens_used");
    f.import("LIC-PD", &item("viewer", "per_device", 10, ""), &[]);
    assert_eq!(
        (tokens("LIC-T-1"), tokens("LIC-T-2")),
        (0, 10),
        "another license moves no tokens"
    );
    f.import(
        "LIC-TOPUP",
        &item("ocr", "tokens", 3, "tokens_per_pass = 5"),
        &[],
    );
    assert_eq!(
        (tokens("LIC-T-1"), tokens("LIC-T-2"), tokens("LIC-TOPUP-1")),
        (0, 7, 3),
        "the top-up pays what it can of the debt"
    );
}

/// A new version of a license tops up only by the tokens it adds: one that changes nothing
/// else (here a feature) moves no tokens between its items, which may serve other plants'
/// codes; one that raises an item's quota pays a debt from what it added; one that drops an
/// item in debt has the new item pay that debt, not forget it.
#[test]
fn a_new_version_pays_a_tokens_debt_from_what_it_adds_even_for_an_item_it_drops() {
    let version = |first: i64, extra: &str| {
        [
            item("ocr", "tokens", first, "tokens_per_pass = 5"),
            item(
                "ocr",
                "tokens",
                5,
                &format!("tokens_per_pass = 5\ngrace_days = 30\n{extra}"),
            ),
        ]
        .concat()
    };
    let f = lab_in_debt(&version(100, ""));
    let tokens = |item: &str| f.item_value(item, "tokens_used");
    f.import(
        "LIC-T",
        &version(100, "features = [\"pdf\"]"),
        &["--version", "2"],
    );
    assert_eq!(
        (tokens("LIC-T-1"), tokens("LIC-T-2")),
        (0, 10),
        "a new version adding no tokens moves none"
    );
    f.import("LIC-T", &version(103, ""), &["--version", "3"]);
    assert_eq!(
        (tokens("LIC-T-1"), tokens("LIC-T-2")),
        (3, 7),
        "the 3 tokens added pay 3 of the debt"
    );
    // Version 4 drops LIC-T-2 (2 in debt) for a new item: the new item pays it.
    f.import(
        "LIC-T",
        &[
            item("ocr", "tokens", 103, "tokens_per_pass = 5"),
            item(
                "ocr",
                "tokens",
                50,
                "tokens_per_pass = 5\nitem_id = \"LIC-T-NEW\"",
            ),
        ]
        .concat(),
        &["--version", "4"],
    );
    assert_eq!(f.item_value("LIC-T-2", "withdrawn"), 1);
    assert_eq!(
        (tokens("LIC-T-1"), tokens("LIC-T-2"), tokens("LIC-T-NEW")),
        (3, 5, 2),
        "the dropped item's debt is paid by the new one"
    );
}

/// A new version that lowers a tokens quota below what was spent puts the item in grace
/// from then on, and grace ends `grace_days` later as if a pass had overdrawn it.
#[test]
fn a_lower_tokens_quota_starts_grace() {
    let f = Fixture::new(&item(
        "ocr",
        "tokens",
        10,
        "tokens_per_pass = 5\ngrace_days = 2",
    ));
    f.authorized("ocr", 1);
    f.authorized("ocr", 2);
    f.import(
        "LIC-T",
        &item("ocr", "tokens", 5, "tokens_per_pass = 5\ngrace_days = 2"),
        &["--version", "2"],
    );
    assert_eq!(f.authorized("ocr", 1).state, AuthorizationState::Grace);
    // Grace started at the import (which ran on the machine's clock, not the test's).
    let started = f.item_value("LIC-T-1", "grace_started_at");
    let ends = time::OffsetDateTime::from_unix_timestamp(started).unwrap() + Duration::days(2);
    f.app
        .clock
        .advance(ends - f.app.clock_now() - Duration::minutes(1));
    assert_eq!(f.authorized("ocr", 1).state, AuthorizationState::Grace);
    f.app.clock.advance(Duration::minutes(1));
    assert_eq!(f.refused("ocr", 1), "QUOTA_EXCEEDED", "grace is over");
}

/// Spent tokens stop at the largest integer instead of failing every later pass.
#[test]
fn spent_tokens_stop_at_the_largest_integer() {
    let f = Fixture::new(&item(
        "ocr",
        "tokens",
        1 << 62,
        "tokens_per_pass = 4611686018427387904",
    ));
    assert_eq!(f.authorized("ocr", 1).state, AuthorizationState::Ok);
    assert_eq!(f.authorized("ocr", 2).state, AuthorizationState::Grace);
    assert_eq!(f.authorized("ocr", 3).state, AuthorizationState::Grace);
    assert_eq!(f.item_value("LIC-T-1", "tokens_used"), i64::MAX);
}

/// Renewals (usage calls) buy passes as authorizations do: from a top-up that has balance,
/// never one pass per instance of the same user on one device.
#[test]
fn tokens_renewals_buy_from_the_top_up_and_once_per_user_and_device() {
    let f = Fixture::new(&item(
        "ocr",
        "tokens",
        10,
        "tokens_per_pass = 5\ngrace_days = 2",
    ));
    let (spent, topped) = ("LIC-T-1", "LIC-TOPUP-1");
    let tokens = |item: &str| f.item_value(item, "tokens_used");
    // Device 3 (instance i1) and device 4 spend the first item.
    let mut i1 = f.request("ocr", 3);
    i1["device"]["instance"] = json!("i1");
    let (status, body) = f.authorize(&i1);
    assert_eq!(status, 200, "{body}");
    let i1_lease = f.verify(&body, 3).lease_id;
    let d4_lease = f.authorized("ocr", 4).lease_id;
    assert_eq!(tokens(spent), 10);
    f.import(
        "LIC-TOPUP",
        &item("ocr", "tokens", 100, "tokens_per_pass = 5"),
        &[],
    );
    assert_eq!(
        (tokens(spent), tokens(topped)),
        (10, 0),
        "no debt to settle"
    );

    // A day later every pass has ended. Device 4's heartbeat buys its pass from the top-up,
    // and its renewed authorization grants the top-up's item.
    f.app.clock.advance(DAY);
    let heartbeat = |lease: &str, n: u32| {
        let auth = f.heartbeat(lease, n).unwrap();
        (
            auth["items"][0]["item_id"].as_str().unwrap().to_string(),
            auth["state"].as_str().unwrap().to_string(),
        )
    };
    assert_eq!(
        heartbeat(&d4_lease, 4),
        (topped.to_string(), "ok".to_string())
    );
    assert_eq!((tokens(spent), tokens(topped)), (10, 5));
    assert_eq!(heartbeat(&d4_lease, 4).0, topped, "the same pass all day");
    assert_eq!(tokens(topped), 5);

    // Device 3's second instance authorizes (a pass from the top-up); its first instance's
    // renewal uses that pass instead of buying another, and so on at every call.
    let mut i2 = f.request("ocr", 3);
    i2["device"]["instance"] = json!("i2");
    let (status, body) = f.authorize(&i2);
    assert_eq!(status, 200, "{body}");
    let i2_lease = f.verify(&body, 3).lease_id;
    assert_eq!(tokens(topped), 10);
    for _ in 0..3 {
        heartbeat(&i1_lease, 3);
        heartbeat(&i2_lease, 3);
    }
    assert_eq!((tokens(spent), tokens(topped)), (10, 10));

    // The daily housekeeping removes the passes once they ended: two, one per device.
    f.app.clock.advance(DAY);
    let summary = f.app.run_job("housekeeping").unwrap();
    assert!(summary.contains("removed 2 expired pass(es)"), "{summary}");
    let passes: i64 = f
        .db()
        .query_row("SELECT COUNT(*) FROM token_passes", [], |r| r.get(0))
        .unwrap();
    assert_eq!(passes, 0);
}

/// A pass is per (user, device, product), as the specification has it: bought through one
/// handshake code, it serves the same user on the same device through another for its day.
#[test]
fn one_token_pass_serves_a_user_on_a_device_whichever_code_sold_it() {
    let f = Fixture::new(
        &[
            item("ocr", "tokens", 100, "tokens_per_pass = 5"),
            item("ocr", "tokens", 100, "tokens_per_pass = 5"),
        ]
        .concat(),
    );
    f.assign_to_new_code("LIC-T-2", "LAB");
    assert_eq!(f.authorized("ocr", 1).items[0].item_id, "LIC-T-1");
    let mut lab = f.request("ocr", 1);
    lab["handshake_code"] = json!("LAB");
    let (status, body) = f.authorize(&lab);
    assert_eq!(status, 200, "{body}");
    assert_eq!(f.verify(&body, 1).items[0].item_id, "LIC-T-2");
    let tokens = |item: &str| f.item_value(item, "tokens_used");
    assert_eq!((tokens("LIC-T-1"), tokens("LIC-T-2")), (5, 0));
    // Its two leases renew on that one pass all day (no pass bought back and forth).
    for _ in 0..3 {
        assert_eq!(f.authorize(&f.request("ocr", 1)).0, 200);
        assert_eq!(f.authorize(&lab).0, 200);
    }
    assert_eq!((tokens("LIC-T-1"), tokens("LIC-T-2")), (5, 0));
    // The next day, the pass is bought again, once.
    f.app.clock.advance(DAY);
    assert_eq!(f.authorize(&lab).0, 200);
    assert_eq!(f.authorize(&f.request("ocr", 1)).0, 200);
    assert_eq!((tokens("LIC-T-1"), tokens("LIC-T-2")), (5, 5));
}

/// When the lease's item stops serving (here: it expires while a renewal license runs on),
/// the next usage call renews the device on the item that serves, as an authorization would
/// (a per_device seat stays counted where it was: only removal or a year unused frees it);
/// with no room there, the answer says why the old item ended.
#[test]
fn a_renewal_moves_on_to_the_item_that_serves_when_the_leases_item_ends() {
    let f = Fixture::new(
        &[
            item(
                "reader",
                "per_device",
                5,
                "starts_at = 2026-01-01T00:00:00Z\nexpires_at = 2026-06-20T00:00:00Z",
            ),
            item("reader", "per_device", 1, ""),
        ]
        .concat(),
    );
    let leases: Vec<_> = (1..=2).map(|n| f.authorized("reader", n)).collect();
    assert!(
        leases.iter().all(|l| l.items[0].item_id == "LIC-T-1"),
        "the item that expires first"
    );
    let renewal = |n: u32| match f.heartbeat(&leases[n as usize - 1].lease_id, n) {
        Ok(auth) => auth["items"][0]["item_id"].as_str().unwrap().to_string(),
        Err(code) => code,
    };
    // Each device calls within its 7 offline days: at day 15 their leases run to the item's
    // end (2026-06-20).
    for _ in 0..3 {
        f.app.clock.advance(Duration::days(5));
        assert_eq!(
            (renewal(1), renewal(2)),
            ("LIC-T-1".into(), "LIC-T-1".into())
        );
    }
    // 2026-06-20 00:05: past the item's end, within the lease's.
    f.app
        .clock
        .advance(Duration::days(3) + Duration::hours(12) + Duration::minutes(5));
    assert_eq!(renewal(1), "LIC-T-2");
    assert_eq!(f.item_value("LIC-T-2", "seats_used"), 1);
    assert_eq!(
        f.item_value("LIC-T-1", "seats_used"),
        2,
        "devices ever authorized"
    );
    assert_eq!(renewal(1), "LIC-T-2", "and stays there");
    // The renewal license has no room for device 2: told its item expired.
    assert_eq!(renewal(2), "LICENSE_EXPIRED");
}

/// A newer version of the license that no longer lists the lease's item: the renewal moves
/// the device to the item that replaced it; once nothing serves the product, the device is
/// told its lease is revoked (its reports still count).
#[test]
fn a_withdrawn_item_gives_way_to_its_replacement_then_revokes() {
    let f = Fixture::new(&item("reader", "per_device", 5, ""));
    let lease = f.authorized("reader", 1).lease_id;
    f.import(
        "LIC-T",
        &item("reader", "per_device", 5, "item_id = \"LIC-T-NEW\""),
        &["--version", "2"],
    );
    let renewed = f.heartbeat(&lease, 1).unwrap();
    assert_eq!(renewed["items"][0]["item_id"], "LIC-T-NEW");
    assert_eq!(f.item_value("LIC-T-NEW", "seats_used"), 1);

    f.import(
        "LIC-T",
        &item("writer", "per_device", 5, "item_id = \"LIC-T-W\""),
        &["--version", "3"],
    );
    assert_eq!(f.heartbeat(&lease, 1).unwrap_err(), "LEASE_REVOKED");
    let (status, body) = f.usage(&f.reports(
        &lease,
        1,
        "00000000-0000-4000-8000-000000000001",
        &[(1, "LIC-T-NEW", "pages", 3)],
    ));
    assert_eq!(
        (status, body["accepted"].as_u64()),
        (200, Some(1)),
        "{body}"
    );
}

#[test]
fn dates_stop_every_model_and_cap_the_authorization() {
    let items = [
        item(
            "early",
            "per_device",
            5,
            "starts_at = 2026-07-01T00:00:00Z\nexpires_at = 2027-01-01T00:00:00Z",
        ),
        item(
            "late",
            "per_device",
            5,
            "starts_at = 2025-01-01T00:00:00Z\nexpires_at = 2026-05-01T00:00:00Z",
        ),
        item(
            "soon",
            "per_device",
            5,
            "starts_at = 2026-01-01T00:00:00Z\nexpires_at = 2026-06-03T00:00:00Z",
        ),
    ]
    .concat();
    let f = Fixture::new(&items);
    assert_eq!(f.refused("early", 1), "LICENSE_NOT_STARTED");
    assert_eq!(f.refused("late", 1), "LICENSE_EXPIRED");
    let soon = f.authorized("soon", 1);
    assert_eq!(
        soon.expires_at,
        time::macros::datetime!(2026-06-03 00:00:00 UTC),
        "capped by the item"
    );
    assert_eq!(f.refused("unknown-product", 1), "NO_LICENSE");
}

#[test]
fn a_new_device_takes_the_item_that_expires_first_with_room() {
    let items = [
        item(
            "reader",
            "standalone",
            1,
            "starts_at = 2026-01-01T00:00:00Z\nexpires_at = 2026-12-01T00:00:00Z",
        ),
        item(
            "reader",
            "standalone",
            1,
            "starts_at = 2026-01-01T00:00:00Z\nexpires_at = 2027-12-01T00:00:00Z",
        ),
    ]
    .concat();
    let f = Fixture::new(&items);
    assert_eq!(f.authorized("reader", 1).items[0].item_id, "LIC-T-1");
    assert_eq!(f.authorized("reader", 2).items[0].item_id, "LIC-T-2");
    assert_eq!(
        f.authorized("reader", 1).items[0].item_id,
        "LIC-T-1",
        "keeps its seat"
    );
    assert_eq!(f.refused("reader", 3), "QUOTA_EXCEEDED");
}

/// Two items for one product (a top-up): the seats paid for are taken before either goes
/// into its tolerance, the one that expires first first.
#[test]
fn a_top_ups_seats_are_taken_before_the_first_item_goes_over_its_quota() {
    let soon = "starts_at = 2026-01-01T00:00:00Z\nexpires_at = 2026-12-01T00:00:00Z";
    let later = "starts_at = 2026-01-01T00:00:00Z\nexpires_at = 2027-12-01T00:00:00Z";
    let f = Fixture::new(
        &[
            item("reader", "per_device", 10, soon),
            item("reader", "per_device", 10, later),
        ]
        .concat(),
    );
    let takes = |n: u32| {
        let auth = f.authorized("reader", n);
        (auth.items[0].item_id.clone(), auth.state)
    };
    for n in 1..=10 {
        assert_eq!(
            takes(n),
            ("LIC-T-1".into(), AuthorizationState::Ok),
            "device {n}"
        );
    }
    for n in 11..=20 {
        assert_eq!(
            takes(n),
            ("LIC-T-2".into(), AuthorizationState::Ok),
            "device {n}"
        );
    }
    assert_eq!(
        takes(21),
        ("LIC-T-1".into(), AuthorizationState::Tolerance),
        "both full: the tolerance of the one that expires first"
    );
    assert_eq!(takes(22), ("LIC-T-2".into(), AuthorizationState::Tolerance));
    assert_eq!(f.refused("reader", 23), "QUOTA_EXCEEDED");
}

/// Two concurrent items (a top-up): devices fill the first item's quota, then the second's,
/// so 4 devices on 2 + 2 seats record no exception.
#[test]
fn concurrent_devices_fill_a_top_up_before_an_item_goes_over() {
    let soon =
        "max_exceptions = 3\nstarts_at = 2026-01-01T00:00:00Z\nexpires_at = 2026-12-01T00:00:00Z";
    let later =
        "max_exceptions = 3\nstarts_at = 2026-01-01T00:00:00Z\nexpires_at = 2027-12-01T00:00:00Z";
    let f = Fixture::new(
        &[
            item("cad", "concurrent_device", 2, soon),
            item("cad", "concurrent_device", 2, later),
        ]
        .concat(),
    );
    let items: Vec<String> = (1..=4)
        .map(|n| f.authorized("cad", n).items[0].item_id.clone())
        .collect();
    assert_eq!(items, ["LIC-T-1", "LIC-T-1", "LIC-T-2", "LIC-T-2"]);
    // In the next window the first two devices call in before the others: the second item
    // is not taken for empty (its devices were active in the last window).
    f.app.clock.advance(Duration::minutes(3));
    for n in 1..=2 {
        assert_eq!(f.authorized("cad", n).items[0].item_id, "LIC-T-1");
    }
    assert_eq!(f.item_value("LIC-T-1", "exceptions"), 0);
    assert_eq!(f.item_value("LIC-T-2", "exceptions"), 0);
    assert_eq!(
        f.authorized("cad", 5).items[0].item_id,
        "LIC-T-1",
        "all full: the one that expires first, over its quota"
    );
    assert_eq!(f.item_value("LIC-T-1", "exceptions"), 1);
}

/// Devices an item already knows use a top-up's quota too: once the item's window is full,
/// the next of them moves to the top-up, instead of every window going over until the
/// first item stops (and then all of them to the top-up, which would stop in turn).
#[test]
fn known_concurrent_devices_move_to_a_top_up_when_their_window_is_full() {
    let f = Fixture::new(&item("cad", "concurrent_device", 2, "max_exceptions = 3"));
    let leases: Vec<String> = (1..=3).map(|n| f.authorized("cad", n).lease_id).collect();
    assert_eq!(f.item_value("LIC-T-1", "exceptions"), 1, "3 devices on 2");
    f.import(
        "LIC-TOPUP",
        &item("cad", "concurrent_device", 2, "max_exceptions = 3"),
        &[],
    );
    for window in 1..=4 {
        f.app.clock.advance(Duration::minutes(3));
        let items: Vec<String> = (1..=3)
            .map(|n| {
                let renewed = f.heartbeat(&leases[n as usize - 1], n).unwrap();
                renewed["items"][0]["item_id"].as_str().unwrap().to_string()
            })
            .collect();
        assert_eq!(
            items,
            ["LIC-T-1", "LIC-T-1", "LIC-TOPUP-1"],
            "window {window}: the third device moved to the top-up and stays there"
        );
    }
    assert_eq!(
        f.item_value("LIC-T-1", "exceptions"),
        1,
        "no window over since"
    );
    assert_eq!(f.item_value("LIC-TOPUP-1", "exceptions"), 0);
    // Authorizing again, a known device finds the same.
    assert_eq!(f.authorized("cad", 3).items[0].item_id, "LIC-TOPUP-1");
}

/// A lease's record lags the authorization its device holds (renewals are written at most
/// every 15 minutes): releasing a device's other lease on a standalone seat keeps the seat
/// while that authorization is valid, though its record says it expired.
#[test]
fn a_release_keeps_the_seat_another_valid_lease_of_the_device_holds() {
    let f = Fixture::new(&item("viewer", "standalone", 1, ""));
    let lease_of = |user: &str| {
        let mut request = f.request("viewer", 1);
        request["device"]["user"] = json!(user);
        let (status, body) = f.authorize(&request);
        assert_eq!(status, 200, "{body}");
        f.verify(&body, 1).lease_id
    };
    let (a, b) = (lease_of("alice"), lease_of("bob"));
    assert_ne!(a, b);
    // Bob's record says it expired 5 minutes ago; his authorization runs 10 more minutes.
    let now = f.app.clock_now().unix_timestamp();
    f.db()
        .execute(
            "UPDATE leases SET expires_at = ?1 WHERE lease_id = ?2",
            rusqlite::params![now - 300, b],
        )
        .unwrap();
    assert_eq!(f.release(&a, 1).0, 200);
    let (status, body) = f.authorize(&f.request("viewer", 2));
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("QUOTA_EXCEEDED")),
        "{body}"
    );
    assert_eq!(f.item_value("LIC-T-1", "seats_used"), 1);
}

/// A device with two leases on one concurrent seat (two instances) moves with both: it
/// never counts in two items.
#[test]
fn a_device_with_two_leases_on_a_seat_is_never_split_between_items() {
    let f = Fixture::new(&item("cad", "concurrent_device", 2, "max_exceptions = 9"));
    let lease = |n: u32, instance: Option<&str>| {
        let mut request = f.request("cad", n);
        if let Some(instance) = instance {
            request["device"]["instance"] = json!(instance);
        }
        let (status, body) = f.authorize(&request);
        assert_eq!(status, 200, "{body}");
        f.verify(&body, n).lease_id
    };
    let calls = [
        (1, lease(1, None)),
        (2, lease(2, None)),
        (3, lease(3, Some("a"))),
        (3, lease(3, Some("b"))),
    ];
    f.import(
        "LIC-TOPUP",
        &item("cad", "concurrent_device", 2, "max_exceptions = 9"),
        &[],
    );
    let exceptions =
        || f.item_value("LIC-T-1", "exceptions") + f.item_value("LIC-TOPUP-1", "exceptions");
    let mut seen = Vec::new();
    for window in 1..=4 {
        f.app.clock.advance(Duration::minutes(3));
        // Device 3 calls last, then first, then last...
        let mut order: Vec<usize> = (0..4).collect();
        if window % 2 == 0 {
            order.rotate_left(2);
        }
        let mut items = [""; 4].map(String::from);
        for i in order {
            let (n, lease) = &calls[i];
            let renewed = f.heartbeat(lease, *n).unwrap();
            items[i] = renewed["items"][0]["item_id"].as_str().unwrap().to_string();
        }
        assert_eq!(items[2], items[3], "window {window}: one device, one item");
        seen.push(exceptions());
    }
    assert_eq!(seen, [1; 4], "no window over quota since the top-up");
}

#[test]
fn session_password_validation_fields_and_blocked_devices() {
    let f = Fixture::new(&item("reader", "per_device", 100, ""));
    // The command line refuses what the portal refuses, and changes nothing.
    let short = set_password(&f.data, &f.code, "short");
    assert!(
        !short.ok && short.stderr.contains("8 to 256 characters"),
        "{}",
        short.stderr
    );
    let pasted = set_password(&f.data, &f.code, "horse\u{200F}battery");
    assert!(
        !pasted.ok && pasted.stderr.contains("could not send it"),
        "{}",
        pasted.stderr
    );
    let bad = keygate(
        &f.data,
        &[
            "handshake",
            "set-validation",
            &f.code,
            "--domain",
            "not a domain!",
        ],
    );
    assert!(
        !bad.ok && bad.stderr.contains("is not a domain"),
        "{}",
        bad.stderr
    );
    assert_eq!(f.authorize(&f.request("reader", 9)).0, 200, "still open");
    let mut set = set_password(&f.data, &f.code, "open sesame");
    assert!(set.ok, "{}", set.stderr);
    let code_of = |body: serde_json::Value| {
        f.authorize(&body).1["error"]["code"]
            .as_str()
            .unwrap_or("ok")
            .to_string()
    };
    assert_eq!(code_of(f.request("reader", 1)), "SESSION_PASSWORD_MISMATCH");
    let mut with_password = f.request("reader", 1);
    with_password["session_password"] = json!("wrong");
    assert_eq!(code_of(with_password.clone()), "SESSION_PASSWORD_MISMATCH");
    with_password["session_password"] = json!("open sesame");
    assert_eq!(code_of(with_password.clone()), "ok");
    assert_eq!(
        code_of(with_password.clone()),
        "ok",
        "verified from the cache"
    );

    // Two names in one (as `handshake list` shows them) would be one no process has.
    let joined = keygate(
        &f.data,
        &[
            "handshake",
            "set-validation",
            &f.code,
            "--process",
            "reader.exe,loader.exe",
        ],
    );
    assert!(
        !joined.ok && joined.stderr.contains("give each name on its own"),
        "{}",
        joined.stderr
    );
    // Typed with a space around it, a name is read as the portal reads its lines: trimmed.
    set = keygate(
        &f.data,
        &[
            "handshake",
            "set-validation",
            &f.code,
            "--domain",
            "*.plant.local ",
            "--process",
            " reader.exe",
            "--process",
            "",
        ],
    );
    assert!(set.ok, "{}", set.stderr);
    assert_eq!(code_of(with_password.clone()), "VALIDATION_FAILED");
    with_password["validation"] = json!({"domain": "line1.plant.local", "process": "reader.exe"});
    assert_eq!(code_of(with_password.clone()), "ok");
    with_password["validation"] = json!({"domain": "line1.other.local", "process": "reader.exe"});
    assert_eq!(code_of(with_password.clone()), "VALIDATION_FAILED");
    with_password["validation"] = json!({"domain": "line1.plant.local", "process": "other.exe"});
    assert_eq!(code_of(with_password.clone()), "VALIDATION_FAILED");
    with_password["validation"] = json!({"domain": "line1.plant.local", "process": "reader.exe"});

    assert!(keygate(&f.data, &["device", "block", &device_uuid(1)]).ok);
    assert_eq!(code_of(with_password.clone()), "DEVICE_BLOCKED");
    assert!(keygate(&f.data, &["device", "unblock", &device_uuid(1)]).ok);
    assert_eq!(code_of(with_password), "ok");
}

#[test]
fn wrong_session_passwords_are_rate_limited_per_address() {
    let f = Fixture::new(&item("reader", "per_device", 100, ""));
    assert!(set_password(&f.data, &f.code, "right-password").ok);
    let mut request = f.request("reader", 1);
    request["session_password"] = json!("wrong");
    for attempt in 1..=10 {
        let (status, body) = f.authorize(&request);
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (403, Some("SESSION_PASSWORD_MISMATCH")),
            "attempt {attempt}"
        );
    }
    let (status, body) = f.authorize(&request);
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("RATE_LIMITED"))
    );
    // Another address still has its own guesses.
    let mut other = raw_tls_from(&f, "127.0.0.2", std::time::Duration::from_secs(10));
    let body = request.to_string();
    let head = format!(
        "POST /api/v1/authorize HTTP/1.1\r\nHost: keygate\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    std::io::Write::write_all(&mut other, head.as_bytes()).unwrap();
    let answer = read_answer(&mut other).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 403") && answer.contains("SESSION_PASSWORD_MISMATCH"),
        "{answer}"
    );
    request["session_password"] = json!("right-password");
    assert_eq!(
        f.authorize(&request).0,
        429,
        "no guessing, even the right one, until the minute ends"
    );
    f.app.clock.advance(Duration::minutes(1));
    assert_eq!(f.authorize(&request).0, 200);
}

#[test]
fn parallel_password_guesses_get_no_more_than_the_limit() {
    let f = Fixture::new(&item("reader", "per_device", 100, ""));
    assert!(set_password(&f.data, &f.code, "right-password").ok);
    let mut request = f.request("reader", 1);
    request["session_password"] = json!("wrong");
    // All sent at once: Argon2 runs two at a time, so most wait while none has failed yet.
    let codes: Vec<String> = std::thread::scope(|s| {
        let guesses: Vec<_> = (0..30)
            .map(|_| s.spawn(|| f.authorize(&request).1["error"]["code"].to_string()))
            .collect();
        guesses.into_iter().map(|g| g.join().unwrap()).collect()
    });
    let checked = codes
        .iter()
        .filter(|c| *c == "\"SESSION_PASSWORD_MISMATCH\"")
        .count();
    let limited = codes.iter().filter(|c| *c == "\"RATE_LIMITED\"").count();
    assert_eq!((checked, limited), (10, 20), "{codes:?}");
}

#[test]
fn a_handshake_code_gets_100_password_checks_a_minute_from_all_addresses() {
    let f = Fixture::new(&item("reader", "per_device", 100, ""));
    assert!(set_password(&f.data, &f.code, "right-password").ok);
    let id: i64 = f
        .db()
        .query_row(
            "SELECT id FROM handshake_codes WHERE code = ?1",
            [&f.code],
            |r| r.get(0),
        )
        .unwrap();
    // 99 checks of this code from other addresses in this minute...
    let now = f.app.clock_now().unix_timestamp();
    for _ in 0..99 {
        assert!(
            f.app
                .state
                .code_password_attempts
                .attempt(&id.to_string(), now)
                .is_ok()
        );
    }
    let mut request = f.request("reader", 1);
    request["session_password"] = json!("wrong");
    let code = |request: &serde_json::Value| {
        let (status, body) = f.authorize(request);
        (status, body["error"]["code"].as_str().map(String::from))
    };
    // ...leave one for this address, which has all of its own left.
    assert_eq!(
        code(&request),
        (403, Some("SESSION_PASSWORD_MISMATCH".into()))
    );
    assert_eq!(code(&request), (429, Some("RATE_LIMITED".into())));
    request["session_password"] = json!("right-password");
    assert_eq!(code(&request).0, 429, "not even the right one this minute");
    f.app.clock.advance(Duration::minutes(1));
    assert_eq!(code(&request).0, 200);
}

#[test]
fn devices_arriving_together_with_the_right_password_are_not_limited() {
    let f = Fixture::new(&item("reader", "per_device", 100, ""));
    assert!(set_password(&f.data, &f.code, "right-password").ok);
    // 30 devices behind one address (a NAT) start at once, the password not yet verified:
    // one Argon2 check (two at most) verifies it, the others find it in the cache.
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let devices: Vec<_> = (1..=30)
            .map(|n| {
                let f = &f;
                s.spawn(move || {
                    let mut request = f.request("reader", n);
                    request["session_password"] = json!("right-password");
                    f.authorize(&request).0
                })
            })
            .collect();
        devices.into_iter().map(|d| d.join().unwrap()).collect()
    });
    assert_eq!(statuses, vec![200; 30]);
}

#[test]
fn a_device_keeps_at_most_32_leases_per_product_dropping_expired_ones_first() {
    let f = Fixture::new(&item("reader", "per_device", 10, ""));
    let as_user = |user: &str| {
        let mut request = f.request("reader", 1);
        request["device"]["user"] = json!(user);
        let (status, body) = f.authorize(&request);
        assert_eq!(status, 200, "{body}");
        f.app.clock.advance(Duration::seconds(1));
        f.verify(&body, 1).lease_id
    };
    let leases = || -> i64 {
        f.db()
            .query_row("SELECT COUNT(*) FROM leases", [], |r| r.get(0))
            .unwrap()
    };
    let users: Vec<String> = (1..=33).map(|n| as_user(&format!("user-{n}"))).collect();
    assert_eq!(leases(), 33, "none has expired: all are kept");
    assert_eq!(as_user("user-1"), users[0], "a user's lease is reused");

    // A week later every authorization has expired: a new user removes the two longest
    // expired (user-2's, then user-3's; user-1 renewed last), leaving 32.
    f.app.clock.advance(Duration::days(8));
    as_user("user-34");
    assert_eq!(leases(), 32);
    let heartbeat = |lease: &str| {
        let body = f.reports(lease, 1, "00000000-0000-4000-9000-000000000001", &[]);
        let (status, body) = f.usage(&body);
        (status, body["error"]["code"].as_str().map(String::from))
    };
    assert_eq!(heartbeat(&users[1]), (404, Some("LEASE_NOT_FOUND".into())));
    assert_eq!(heartbeat(&users[2]), (404, Some("LEASE_NOT_FOUND".into())));
    assert_eq!(heartbeat(&users[0]).0, 200, "user-1 expired last: kept");
    assert_eq!(heartbeat(&users[3]).0, 200);
    // user-2 comes back: a new lease, in the device's one seat.
    assert_ne!(as_user("user-2"), users[1]);
    assert_eq!(leases(), 32);
    assert_eq!(f.item_value("LIC-T-1", "seats_used"), 1);
}

/// A device that starts every process under a new instance id and never releases (killed,
/// power lost): the concurrent_instance seats go with the expired leases removed for new
/// ones, so they do not pile up either.
#[test]
fn instances_that_never_release_leave_no_more_seats_than_leases() {
    let f = Fixture::new(&item(
        "viewer",
        "concurrent_instance",
        100,
        "max_exceptions = 5",
    ));
    let as_instance = |n: u32| {
        let mut request = f.request("viewer", 1);
        request["device"]["instance"] = json!(format!("process-{n}"));
        let (status, body) = f.authorize(&request);
        assert_eq!(status, 200, "{body}");
    };
    let count = |sql: &str| -> i64 { f.db().query_row(sql, [], |r| r.get(0)).unwrap() };
    for n in 1..=40 {
        as_instance(n);
    }
    assert_eq!(count("SELECT COUNT(*) FROM seats"), 40);
    f.app.clock.advance(Duration::days(8));
    as_instance(41);
    assert_eq!(count("SELECT COUNT(*) FROM leases"), 32);
    assert_eq!(count("SELECT COUNT(*) FROM seats"), 32);
    assert_eq!(f.item_value("LIC-T-1", "seats_used"), 32);
}

#[test]
fn a_device_naming_new_users_without_end_is_refused_past_4096_unexpired_leases() {
    let f = Fixture::new(&item("reader", "per_device", 10, ""));
    let as_user = |user: &str| {
        let mut request = f.request("reader", 1);
        request["device"]["user"] = json!(user);
        f.authorize(&request)
    };
    let (status, body) = as_user("user-0");
    assert_eq!(status, 200, "{body}");
    let count = |sql: &str| -> i64 { f.db().query_row(sql, [], |r| r.get(0)).unwrap() };
    // 4,094 more users' leases, as the first one (unexpired), written directly.
    f.db()
        .execute_batch(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 4094)
             INSERT INTO leases (lease_id, device_id, product, instance, user, handshake_id,
                                 item_id, nonce, issued_at, expires_at, released, revoked)
             SELECT 'bulk-' || i, device_id, product, instance, 'bulk-' || i, handshake_id,
                    item_id, nonce, issued_at, expires_at, 0, 0
             FROM n, leases",
        )
        .unwrap();
    assert_eq!(as_user("user-4095").0, 200, "the 4,096th");
    // Ten more, expired long ago: a new lease would remove them first.
    f.db()
        .execute_batch(
            "INSERT INTO leases (lease_id, device_id, product, instance, user, handshake_id,
                                 item_id, nonce, issued_at, expires_at, released, revoked)
             SELECT 'old-' || user, device_id, product, instance, 'old-' || user, handshake_id,
                    item_id, nonce, 0, 1, 0, 0
             FROM leases WHERE user IN ('bulk-1', 'bulk-2', 'bulk-3', 'bulk-4', 'bulk-5',
                                        'bulk-6', 'bulk-7', 'bulk-8', 'bulk-9', 'bulk-10')",
        )
        .unwrap();
    let before = count("SELECT COUNT(*) FROM leases");
    assert_eq!(before, 4106);
    let (status, body) = as_user("user-4096");
    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], "QUOTA_EXCEEDED");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("4096 unexpired authorizations of reader"),
        "{body}"
    );
    assert_eq!(
        count("SELECT COUNT(*) FROM leases"),
        before,
        "nothing changed"
    );
    assert_eq!(as_user("user-0").0, 200, "a known user's lease is reused");
    // Once they expire, new users get leases again (the expired are removed first).
    f.app.clock.advance(Duration::days(8));
    assert_eq!(as_user("user-4096").0, 200);
    assert_eq!(count("SELECT COUNT(*) FROM leases"), 32);
}

/// A device that starts every process under a new instance id and releases at exit leaves
/// no seats behind and at most 32 leases: a released lease counts as expired.
#[test]
fn released_instances_leave_no_seats_and_a_bounded_number_of_leases() {
    let f = Fixture::new(&item(
        "viewer",
        "concurrent_instance",
        5,
        "max_exceptions = 3",
    ));
    let count = |sql: &str| -> i64 { f.db().query_row(sql, [], |r| r.get(0)).unwrap() };
    for n in 1..=40 {
        let mut request = f.request("viewer", 1);
        request["device"]["instance"] = json!(format!("run-{n}"));
        let (status, body) = f.authorize(&request);
        assert_eq!(status, 200, "{body}");
        assert_eq!(f.release(&f.verify(&body, 1).lease_id, 1).0, 200);
        f.app.clock.advance(Duration::seconds(1));
    }
    assert_eq!(count("SELECT COUNT(*) FROM leases"), 32);
    assert_eq!(count("SELECT COUNT(*) FROM seats"), 0);
    assert_eq!(f.item_value("LIC-T-1", "seats_used"), 0);
    assert_eq!(f.item_value("LIC-T-1", "exceptions"), 0, "one at a time");
}

/// Making room for a device's new lease keeps a lease whose record says it expired but
/// whose device still holds a later renewal (the record lags it by up to 15 minutes): the
/// instance keeps calling in, its lease found.
#[test]
fn a_lease_still_held_past_its_recorded_expiry_is_not_dropped_for_a_new_one() {
    let f = Fixture::new(&item(
        "viewer",
        "concurrent_instance",
        100,
        "max_exceptions = 5",
    ));
    let authorize = |instance: &str| {
        let mut request = f.request("viewer", 1);
        request["device"]["instance"] = json!(instance);
        let (status, body) = f.authorize(&request);
        assert_eq!(status, 200, "{body}");
        f.verify(&body, 1)
    };
    let kiosk = authorize("kiosk");
    // Renewed 10 minutes later: the device's authorization now ends 10 minutes after the
    // lease's record says.
    f.app.clock.advance(Duration::minutes(10));
    f.heartbeat(&kiosk.lease_id, 1).expect("renewed");
    for n in 1..=31 {
        authorize(&format!("process-{n}"));
    }
    f.app
        .clock
        .advance(Duration::days(7) - Duration::minutes(9));
    authorize("process-32"); // the device's 33rd lease of the product
    f.heartbeat(&kiosk.lease_id, 1)
        .expect("the kiosk's lease is kept: its authorization has nine minutes left");
}

#[test]
fn a_license_imported_while_serving_takes_effect_without_restart() {
    let f = Fixture::new(&item("reader", "per_device", 1, ""));
    assert_eq!(f.refused("writer", 1), "NO_LICENSE");
    f.import("LIC-MORE", &item("writer", "per_device", 5, ""), &[]);
    assert_eq!(f.authorized("writer", 1).items[0].item_id, "LIC-MORE-1");
    // A renewal raising the quota is seen at once too.
    f.authorized("reader", 1);
    assert_eq!(f.refused("reader", 2), "QUOTA_EXCEEDED");
    f.import(
        "LIC-T",
        &item("reader", "per_device", 2, ""),
        &["--version", "2"],
    );
    f.authorized("reader", 2);
}

#[test]
fn a_device_keeps_its_name_and_user_until_it_reports_new_ones_and_is_seen_at_each_call() {
    let f = Fixture::new(&item("reader", "per_device", 10, ""));
    let seen = || {
        keygate::store::devices::device_by_uuid(&f.db(), &device_uuid(1))
            .unwrap()
            .unwrap()
    };
    let mut request = f.request("reader", 1);
    request["device"]["name"] = json!("line-1 scanner");
    request["device"]["user"] = json!("alice");
    assert_eq!(f.authorize(&request).0, 200);
    let first = seen();
    assert_eq!(
        (first.name.as_str(), first.last_user.as_str()),
        ("line-1 scanner", "alice")
    );

    f.app.clock.advance(Duration::minutes(10));
    f.authorized("reader", 1); // no name, no user: both kept
    let again = seen();
    assert_eq!(
        (again.name.as_str(), again.last_user.as_str()),
        ("line-1 scanner", "alice")
    );
    assert_eq!(again.last_seen, f.app.clock_now().unix_timestamp());

    f.app.clock.advance(Duration::minutes(10));
    request["device"]["name"] = json!("line-2 scanner");
    assert_eq!(f.authorize(&request).0, 200);
    let renamed = seen();
    assert_eq!(renamed.name, "line-2 scanner");
    assert_eq!(renamed.last_seen, f.app.clock_now().unix_timestamp());
}

/// Hosts holding TLS handshakes open (connected, sending nothing) at their limit of 256 per
/// address do not take the handshake capacity from everyone: with eight hosts a worker
/// thread (2,048 handshakes each, what the appliance ran before session 28), another client
/// still connects and is served at once.
#[test]
fn stalled_handshakes_of_a_few_hosts_leave_room_for_others() {
    use std::io::{Read, Write};
    let f = Fixture::new(&item("scan", "per_device", 10, ""));
    // (At most 4 workers' worth: each host is 256 sockets on both ends, in this process.)
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
    let hosts = workers * 8;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stalled: Vec<tokio::net::TcpStream> = runtime.block_on(async {
        let mut all = Vec::new();
        for host in 0..hosts {
            let connect = || async {
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                let from = format!("127.0.1.{}:0", host + 2);
                socket.bind(from.parse().unwrap()).unwrap();
                socket.connect(f.app.addr).await.unwrap()
            };
            for _ in 0..keygate::connections::HANDSHAKES_PER_ADDRESS {
                all.push(connect().await);
            }
            // Held by the server (accepted, in their handshake) before the next host.
            let address: std::net::IpAddr = format!("127.0.1.{}", host + 2).parse().unwrap();
            let waited = std::time::Instant::now();
            while f.app.state.connections.handshaking(address)
                < keygate::connections::HANDSHAKES_PER_ADDRESS
            {
                assert!(waited.elapsed().as_secs() < 10, "host {host}: not accepted");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
        all
    });
    let mut tls = raw_tls(&f, std::time::Duration::from_secs(5));
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: keygate\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tls.read(&mut buf).expect("served while the others stall");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    drop(stalled);
}

/// A client address holds at most `max_connections_per_address` connections: the next is
/// closed before its TLS handshake (counted in /metrics), and one closing gives its place
/// back. Against the real binary, set in its configuration file.
#[test]
fn an_address_holding_its_connections_has_the_next_closed_until_one_ends() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let (data, config) = (dir.path().join("data"), dir.path().join("keygate.toml"));
    std::fs::write(&config, "max_connections_per_address = 3\n").unwrap();
    let served = Served::start_with(&data, "127.0.0.1:0", &[("KEYGATE_CONFIG", &config)]);
    let wait = std::time::Duration::from_secs(5);
    // A GET of `path` on the connection, kept alive: the answer's head and body as text,
    // or the error that ended it.
    let get = |tls: &mut RawTls, path: &str| -> std::io::Result<String> {
        write!(tls, "GET {path} HTTP/1.1\r\nHost: keygate\r\n\r\n")?;
        read_answer(tls)
    };
    let mut held: Vec<RawTls> = (0..3)
        .map(|_| {
            let mut tls = raw_tls_to(&data, served.addr, wait);
            assert!(
                get(&mut tls, "/healthz")
                    .unwrap()
                    .starts_with("HTTP/1.1 200")
            );
            tls
        })
        .collect();
    // Closed, not held (a held one would time out reading: `WouldBlock`).
    let refused = get(&mut raw_tls_to(&data, served.addr, wait), "/healthz");
    assert!(
        refused.as_ref().is_err_and(|e| matches!(
            e.kind(),
            std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::BrokenPipe
        )),
        "a fourth connection is closed: {refused:?}"
    );
    // The three still serve.
    for tls in &mut held {
        assert!(get(tls, "/healthz").unwrap().starts_with("HTTP/1.1 200"));
    }
    // One ends: its place is free again once the appliance has seen it close.
    drop(held.pop());
    let started = std::time::Instant::now();
    let mut again = loop {
        let mut tls = raw_tls_to(&data, served.addr, wait);
        match get(&mut tls, "/healthz") {
            Ok(_) => break tls,
            Err(e) if started.elapsed() > wait => panic!("no place given back: {e}"),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    };
    let metrics = get(&mut again, "/metrics").unwrap();
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    let refusals = crate::operations::value(&metrics, "keygate_connections_refused_total");
    assert!(refusals >= 1.0, "{refusals}");
}

/// Devices call every 3 minutes and idle connections close after 5 s, so each call is a new
/// connection: a device resumes its last TLS session (no certificate signature), however
/// many devices called in between (stateless tickets; rustls's default cache held 256), in
/// the suite the appliance prefers (SHA-256, which CPUs hash in hardware).
#[test]
fn a_device_resumes_its_tls_session_however_many_devices_called_since() {
    use std::io::{Read, Write};
    let f = Fixture::new(&item("scan", "per_device", 10, ""));
    let call = |device: &std::sync::Arc<rustls::ClientConfig>| -> rustls::HandshakeKind {
        let tcp = std::net::TcpStream::connect(f.app.addr).unwrap();
        let mut tls = tls_with(device, tcp, std::time::Duration::from_secs(10));
        tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: keygate\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut answer = Vec::new();
        let _ = tls.read_to_end(&mut answer);
        assert!(answer.starts_with(b"HTTP/1.1 200"));
        // Not the client's first choice, AES-256 with SHA-384: the appliance offers none.
        let suite = tls.conn.negotiated_cipher_suite().unwrap().suite();
        assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        tls.conn.handshake_kind().unwrap()
    };
    let device = tls_client(&f.data);
    assert_eq!(call(&device), rustls::HandshakeKind::Full);
    for _ in 0..300 {
        call(&tls_client(&f.data));
    }
    assert_eq!(call(&device), rustls::HandshakeKind::Resumed);

    // A client that lists ChaCha20 first (a CPU without AES instructions) keeps it.
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256);
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(&appliance_cert(&f.data)).unwrap())
        .unwrap();
    let chacha = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = std::net::TcpStream::connect(f.app.addr).unwrap();
    let mut tls = tls_with(
        &std::sync::Arc::new(chacha),
        tcp,
        std::time::Duration::from_secs(10),
    );
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: keygate\r\nConnection: close\r\n\r\n")
        .unwrap();
    let _ = tls.read_to_end(&mut Vec::new());
    let suite = tls.conn.negotiated_cipher_suite().unwrap().suite();
    assert_eq!(suite, rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256);
}

/// An address may have 256 TLS handshakes in flight, not 256 connections: one whose
/// handshake is over gives that place back while it stays open.
#[test]
fn connections_past_their_handshake_leave_room_for_more() {
    use keygate::connections::HANDSHAKES_PER_ADDRESS;
    use std::io::Write;
    let f = Fixture::new(&item("scan", "per_device", 10, ""));
    let open: Vec<RawTls> = (0..HANDSHAKES_PER_ADDRESS + 8)
        .map(|n| {
            let mut tls = raw_tls(&f, std::time::Duration::from_secs(5));
            write!(tls, "GET /healthz HTTP/1.1\r\nHost: keygate\r\n\r\n").unwrap();
            let answer = read_answer(&mut tls);
            assert!(
                answer.as_ref().is_ok_and(|a| a.starts_with("HTTP/1.1 200")),
                "connection {n}: {answer:?}"
            );
            tls
        })
        .collect();
    // All open at once on the appliance's side, none in its handshake.
    let address = [127, 0, 0, 1].into();
    assert!(f.app.state.connections.open(address) >= HANDSHAKES_PER_ADDRESS + 8);
    assert_eq!(f.app.state.connections.handshaking(address), 0);
    drop(open);
}

/// A kept-alive connection serves its next requests, but one whose next request stops
/// half-way through its head is closed (actix times only a connection's first head).
#[test]
fn a_stalled_head_on_a_kept_alive_connection_is_closed() {
    use keygate::head_deadline::NEXT_HEAD_WITHIN;
    use std::io::{Read, Write};
    let f = Fixture::new(&item("scan", "per_device", 10, ""));
    let mut tls = raw_tls(&f, NEXT_HEAD_WITHIN * 3);
    let answer = |tls: &mut rustls::StreamOwned<_, _>| {
        let mut buf = [0u8; 4096];
        let n = tls.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let healthz = "GET /healthz HTTP/1.1\r\nHost: keygate\r\n\r\n";
    tls.write_all(healthz.as_bytes()).unwrap();
    assert!(answer(&mut tls).starts_with("HTTP/1.1 200"));
    // A second request after a pause, its head in pieces: served on the same connection.
    std::thread::sleep(std::time::Duration::from_secs(2));
    tls.write_all(&healthz.as_bytes()[..20]).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    tls.write_all(&healthz.as_bytes()[20..]).unwrap();
    assert!(answer(&mut tls).starts_with("HTTP/1.1 200"));

    // A third that stops mid-head: the connection closes once its time is up.
    tls.write_all(&healthz.as_bytes()[..20]).unwrap();
    let stalled = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let end = tls.read(&mut buf);
    assert!(
        matches!(end, Ok(0))
            || matches!(&end, Err(e) if e.kind() != std::io::ErrorKind::WouldBlock),
        "closed, not held open: {end:?}"
    );
    let waited = stalled.elapsed();
    assert!(
        waited >= NEXT_HEAD_WITHIN - std::time::Duration::from_secs(1)
            && waited < NEXT_HEAD_WITHIN * 2,
        "closed after {waited:?}"
    );
}

/// A client that pipelines requests and reads none of their answers has its connection
/// closed: actix, its read buffer full of requests while the answers wait, polled the
/// connection without end (a core at 100 % for each such connection), for ever.
#[test]
fn a_client_pipelining_requests_and_reading_none_is_cut_off() {
    use std::io::Write;
    let f = Fixture::new(&item("scan", "per_device", 10, ""));
    let mut tls = raw_tls(&f, std::time::Duration::from_secs(5));
    tls.sock
        .set_write_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    // 40,000 answers of about 300 bytes: far more than the sockets' buffers hold.
    let request = b"GET /api/v1/appliance HTTP/1.1\r\nHost: keygate\r\n\r\n";
    for _ in 0..40_000 {
        // The appliance stops reading once its answers wait: the writes stop then.
        if tls.write_all(request).is_err() {
            break;
        }
    }
    // Closed with requests unread: the client's socket is reset, read or not.
    let waiting = std::time::Instant::now();
    let reset = loop {
        if let Some(e) = tls.sock.take_error().unwrap() {
            break e;
        }
        assert!(
            waiting.elapsed() < keygate::head_deadline::SEND_STALLED_FOR / 3,
            "still open"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(reset.kind(), std::io::ErrorKind::ConnectionReset, "{reset}");
}

/// One host holding many large bodies open holds at most its share of the appliance's
/// budget for bodies in flight: its next body is answered `429 RATE_LIMITED`, another host's
/// devices are served, and the host gets its share back as its connections end.
#[test]
fn one_host_holding_bodies_open_cannot_take_the_budget_from_the_others() {
    use std::io::{Read, Write};
    let f = Fixture::new(&item("scan", "per_device", 10, ""));
    let wait = std::time::Duration::from_secs(20);
    // The host is 127.0.0.3, an address no other test uses (the budget is the process's,
    // shared with the other tests' appliances). Sixteen bodies of 2 MiB announced, all but
    // their last 64 bytes sent, then held: they fill its share (an eighth of the budget) but
    // for 1 KiB, less than the probe's body below.
    let host = || raw_tls_from(&f, "127.0.0.3", wait);
    let size = 2 << 20;
    // Held alive from the first: the appliance cuts a body paused for 10 s, so each held body
    // gets one more byte every 3 s (63 at most: the 64th would end it), also while the next
    // ones are sent (a slow machine needs a while for sixteen).
    let held: std::sync::Arc<std::sync::Mutex<Vec<RawTls>>> = Default::default();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trickle = {
        let (held, stop) = (held.clone(), stop.clone());
        std::thread::spawn(move || {
            for _ in 0..63 {
                for _ in 0..30 {
                    if stop.load(std::sync::atomic::Ordering::SeqCst) {
                        return;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                for tls in held.lock().unwrap().iter_mut() {
                    let _ = tls.write_all(b" ").and_then(|()| tls.flush());
                }
            }
        })
    };
    for _ in 0..16 {
        let mut tls = host();
        tls.write_all(
            format!(
                "POST /api/v1/usage HTTP/1.1\r\nHost: keygate\r\n\
                 Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n"
            )
            .as_bytes(),
        )
        .unwrap();
        tls.write_all(&vec![b' '; size - 64]).unwrap();
        tls.flush().unwrap();
        held.lock().unwrap().push(tls);
    }
    // A usage call of an unknown lease (changes nothing) on its own connection: the status.
    let probe = |mut tls: RawTls| -> String {
        let body = serde_json::json!({"lease_id": device_uuid(7), "device_uuid": device_uuid(1),
            "stream": device_uuid(8), "reports": []})
        .to_string()
            + &" ".repeat(2048);
        tls.write_all(
            format!(
                "POST /api/v1/usage HTTP/1.1\r\nHost: keygate\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .unwrap();
        let mut answer = Vec::new();
        let _ = tls.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    };
    // Until the appliance has read what was sent.
    let until = |from: &dyn Fn() -> RawTls, status: &str| {
        let started = std::time::Instant::now();
        loop {
            let answer = probe(from());
            if answer.starts_with(status) {
                return;
            }
            assert!(
                started.elapsed().as_secs() < 15,
                "{status} expected: {answer}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    until(&host, "HTTP/1.1 429");
    let refused = probe(host());
    let body = refused.split("\r\n\r\n").nth(1).unwrap_or("");
    let body: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(body["error"]["code"], "RATE_LIMITED", "{refused}");
    assert!(
        refused.to_lowercase().contains("connection: close"),
        "{refused}"
    );
    // Another host: served (the lease is unknown to it as well).
    let other = probe(raw_tls_from(&f, "127.0.0.2", wait));
    assert!(
        other.starts_with("HTTP/1.1 404"),
        "another host is served: {other}"
    );
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    trickle.join().unwrap();
    held.lock().unwrap().clear();
    until(&host, "HTTP/1.1 404");
}

/// A chunked body that stops coming is answered 408 and its connection closed by the next
/// head's deadline: actix drains the rest of a chunked body it no longer wants, and with no
/// keep-alive timer nothing woke it again, so the connection was held for ever.
#[test]
fn a_stalled_chunked_body_is_answered_408_and_its_connection_closed() {
    use std::io::Write;
    let f = Fixture::new(&item("scan", "per_device", 10, ""));
    let mut tls = raw_tls(&f, std::time::Duration::from_secs(3));
    tls.write_all(
        b"POST /api/v1/usage HTTP/1.1\r\nHost: keygate\r\nContent-Type: application/json\r\n\
          Transfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n",
    )
    .unwrap();
    let (answer, waited) = answer_then_close(&mut tls, b"");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        waited < keygate::head_deadline::NEXT_HEAD_WITHIN + std::time::Duration::from_secs(5),
        "closed {waited:?} after the answer"
    );
}

/// Reads the answer on `tls` until the server closes the connection, sending `then` once
/// the answer begins; the answer, and how long after it the connection closed.
fn answer_then_close(tls: &mut RawTls, then: &[u8]) -> (String, std::time::Duration) {
    use std::io::{Read, Write};
    let (mut answer, mut answered) = (Vec::new(), None::<std::time::Instant>);
    let started = std::time::Instant::now();
    loop {
        let mut buf = [0u8; 4096];
        match tls.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&buf[..n]);
                if answered.is_none() {
                    tls.write_all(then).unwrap();
                    answered = Some(std::time::Instant::now());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(started.elapsed().as_secs() < 60, "held open");
            }
            Err(_) => break, // reset by the server
        }
    }
    let answered = answered.expect("an answer");
    (
        String::from_utf8_lossy(&answer).into_owned(),
        answered.elapsed(),
    )
}

/// A chunked body answered before it was read (here a 400 for its content type) is drained
/// by actix with no timer of its own: blank lines inside it, or a next head started after
/// it, must not stop the next head's clock, or the connection is held for ever.
#[test]
fn a_drained_chunked_body_does_not_hold_its_connection() {
    use std::io::Write;
    let f = Fixture::new(&item("scan", "per_device", 10, ""));
    let head = "POST /api/v1/authorize HTTP/1.1\r\nHost: keygate\r\n\
                Content-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n";
    for after_the_answer in ["2\r\n\n\n\r\n", "0\r\n\r\nGET / HTTP/1.1\r\nX: "] {
        let mut tls = raw_tls(&f, std::time::Duration::from_secs(3));
        tls.write_all(head.as_bytes()).unwrap();
        let (answer, waited) = answer_then_close(&mut tls, after_the_answer.as_bytes());
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(
            waited < keygate::head_deadline::NEXT_HEAD_WITHIN + std::time::Duration::from_secs(5),
            "{after_the_answer:?}: closed {waited:?} after the answer"
        );
    }
}

/// A client trickling the end of its body (a byte every 3 s) is cut off once the grace is
/// over: `408` without a protocol error code, the connection closed, nothing recorded.
#[test]
fn a_trickled_body_is_cut_off_with_408_and_changes_nothing() {
    use std::io::{Read, Write};
    let f = Fixture::new(&item("scan", "per_device", 10, ""));
    let mut tls = raw_tls(&f, std::time::Duration::from_secs(3));
    let lease = f.authorized("scan", 1).lease_id;
    let stream = "00000000-0000-4000-8000-00000000510e";
    let report = f.reports(&lease, 1, stream, &[(1, "LIC-T-1", "scans", 5)]);
    let before = db_digest(&f.data.join("keygate.db"));

    let body = serde_json::to_vec(&report).unwrap();
    write!(
        tls,
        "POST /api/v1/usage HTTP/1.1\r\nHost: keygate\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    // All but the last bytes: a request that would be recorded if it came whole.
    let mut sent = body.len() - 8;
    tls.write_all(&body[..sent]).unwrap();
    let (started, mut answer) = (std::time::Instant::now(), Vec::new());
    loop {
        let mut buf = [0u8; 4096];
        match tls.read(&mut buf) {
            Ok(0) => break, // closed by the server
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(answer.is_empty(), "the server waits, then answers at once");
                assert!(started.elapsed().as_secs() < 30, "never cut off");
                assert!(
                    sent < body.len() - 1,
                    "the body was nearly whole before the cut"
                );
                tls.write_all(&body[sent..sent + 1]).unwrap();
                sent += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("did not arrive in time"), "{answer}");
    assert!(
        !answer.contains("\"code\""),
        "no protocol error code: {answer}"
    );
    assert!(started.elapsed().as_secs() >= 9, "the grace is 10 s");
    assert_eq!(db_digest(&f.data.join("keygate.db")), before);
}
