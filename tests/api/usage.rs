//! Issue 3: usage reports (idempotency, backlog, renewal), error codes, the seat race,
//! durability across kill -9.

use serde_json::json;
use std::time::Duration as StdDuration;

use time::Duration;

use crate::helpers::*;

const STREAM: &str = "11111111-1111-4111-8111-111111111111";

/// LIC-T-1's usage per day, `(day, total)` in day order.
fn daily_totals(f: &Fixture) -> Vec<(i64, i64)> {
    f.db()
        .prepare("SELECT day, total FROM usage_daily WHERE item_id = 'LIC-T-1' ORDER BY day")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn scanner() -> Fixture {
    Fixture::new(&item(
        "scanner",
        "per_usage",
        1_000_000,
        "counter = \"scans\"",
    ))
}

fn total(f: &Fixture) -> i64 {
    f.item_value("LIC-T-1", "usage_total")
}

#[test]
fn duplicates_and_replays_count_once() {
    let f = scanner();
    let lease = f.authorized("scanner", 1).lease_id;
    let batch = |seqs: std::ops::RangeInclusive<u64>| {
        let reports: Vec<_> = seqs.map(|s| (s, "LIC-T-1", "scans", 10)).collect();
        f.usage(&f.reports(&lease, 1, STREAM, &reports))
    };
    let (status, body) = batch(1..=3);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (
            body["accepted"].as_u64(),
            body["duplicates"].as_u64(),
            body["acked_seq"].as_u64()
        ),
        (Some(3), Some(0), Some(3))
    );
    let (_, body) = batch(1..=3);
    assert_eq!(
        (
            body["accepted"].as_u64(),
            body["duplicates"].as_u64(),
            body["acked_seq"].as_u64()
        ),
        (Some(0), Some(3), Some(3))
    );
    let (_, body) = batch(2..=5);
    assert_eq!(
        (
            body["accepted"].as_u64(),
            body["duplicates"].as_u64(),
            body["acked_seq"].as_u64()
        ),
        (Some(2), Some(2), Some(5))
    );
    assert_eq!(total(&f), 50);
    let device_total: i64 = f
        .db()
        .query_row(
            "SELECT total FROM device_usage WHERE item_id = 'LIC-T-1' AND counter = 'scans'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(device_total, 50);
    // Another stream of the same device is counted on its own.
    let (_, body) = f.usage(&f.reports(
        &lease,
        1,
        "22222222-2222-4222-8222-222222222222",
        &[(1, "LIC-T-1", "scans", 7)],
    ));
    assert_eq!(body["accepted"], 1);
    assert_eq!(total(&f), 57);
}

/// A device keeps at most 4,096 usage streams: a new one past them removes the 256 the
/// device wrote least recently, so a device naming a new stream in every request cannot
/// grow the table, while the streams it uses keep counting their replays once.
#[test]
fn a_device_keeps_at_most_4096_streams_removing_the_least_recently_written() {
    use keygate::store::devices::{STREAMS_PER_DEVICE, STREAMS_REMOVED_AT_ONCE};
    let f = scanner();
    let lease = f.authorized("scanner", 1).lease_id;
    let send = |stream: &str, seqs: std::ops::RangeInclusive<u64>| {
        let reports: Vec<_> = seqs.map(|s| (s, "LIC-T-1", "scans", 10)).collect();
        let (status, body) = f.usage(&f.reports(&lease, 1, stream, &reports));
        assert_eq!(status, 200, "{body}");
        body
    };
    send(STREAM, 1..=2);
    // The device's older streams, written long ago; STREAM's mark as old as any, until its
    // next report writes it.
    let db = f.db();
    let device: i64 = db
        .query_row("SELECT id FROM devices", [], |r| r.get(0))
        .unwrap();
    db.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?2)
         INSERT INTO usage_streams (stream, device_id, high_seq, written_at)
         SELECT 'old-' || i, ?1, 5, i FROM n",
        [device, STREAMS_PER_DEVICE - 2],
    )
    .unwrap();
    db.execute(
        "UPDATE usage_streams SET written_at = 0 WHERE stream = ?1",
        [STREAM],
    )
    .unwrap();
    send(STREAM, 3..=3);
    let streams = |f: &Fixture| -> i64 {
        f.db()
            .query_row("SELECT count(*) FROM usage_streams", [], |r| r.get(0))
            .unwrap()
    };
    let kept = |f: &Fixture, stream: &str| -> bool {
        f.db()
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM usage_streams WHERE stream = ?1)",
                [stream],
                |r| r.get(0),
            )
            .unwrap()
    };
    assert_eq!(streams(&f), STREAMS_PER_DEVICE - 1);
    // The 4,096th stream fits; the next makes room: the 256 least recently written go.
    send("33333333-3333-4333-8333-333333333333", 1..=1);
    assert_eq!((streams(&f), kept(&f, "old-1")), (STREAMS_PER_DEVICE, true));
    send("44444444-4444-4444-8444-444444444444", 1..=1);
    assert_eq!(
        streams(&f),
        STREAMS_PER_DEVICE - STREAMS_REMOVED_AT_ONCE + 1
    );
    let last_removed = format!("old-{STREAMS_REMOVED_AT_ONCE}");
    let first_kept = format!("old-{}", STREAMS_REMOVED_AT_ONCE + 1);
    assert!(!kept(&f, "old-1") && !kept(&f, &last_removed));
    assert!(kept(&f, &first_kept));
    assert!(kept(&f, STREAM), "its last report wrote its mark anew");
    // The streams in use still count a replay once.
    let body = send(STREAM, 1..=3);
    assert_eq!(
        (body["accepted"].as_u64(), body["duplicates"].as_u64()),
        (Some(0), Some(3))
    );
    assert_eq!(total(&f), 50);
}

#[test]
fn a_device_back_after_six_days_offline_sends_its_backlog_once() {
    let f = scanner();
    let auth = f.authorized("scanner", 1);
    let start = f.app.clock_now();
    f.app.clock.advance(Duration::days(6));
    // One report every 3 minutes for 6 days: 2880 reports, each 2 scans.
    let reports: Vec<_> = (1..=2880u64)
        .map(|seq| {
            let to = start + Duration::minutes(3 * seq as i64);
            json!({"seq": seq, "item_id": "LIC-T-1",
                   "from": keygate::licensing::rfc3339(to - Duration::minutes(3)),
                   "to": keygate::licensing::rfc3339(to), "counters": {"scans": 2}})
        })
        .collect();
    let body = json!({"lease_id": auth.lease_id, "device_uuid": device_uuid(1), "stream": STREAM, "reports": reports});
    let (status, answer) = f.usage(&body);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["accepted"], 2880);
    assert_eq!(answer["acked_seq"], 2880);
    assert!(
        answer["authorization"].is_string(),
        "still inside its 7 offline days: renewed"
    );
    let (_, again) = f.usage(&body);
    assert_eq!(
        (again["accepted"].as_u64(), again["duplicates"].as_u64()),
        (Some(0), Some(2880))
    );
    assert_eq!(total(&f), 5760);
    let days = daily_totals(&f);
    assert_eq!(days.iter().map(|(_, t)| t).sum::<i64>(), 5760);
    assert_eq!(
        days.len(),
        7,
        "kept per day (the 6 days span 7 calendar days from noon)"
    );
    // Reports count on the day they end: from 12:00, the first day holds those ending
    // 12:03 to 23:57 (239); the one ending at midnight opens the next day.
    assert_eq!(days[0].1, 2 * 239);
    assert_eq!(days[1].1, 2 * 480);
}

/// A blocked device's calls are refused and count it nowhere: an admin blocking the device
/// over quota ends the exceptions, rather than the blocked device's calls making them.
#[test]
fn a_blocked_device_is_not_counted_in_a_concurrent_window() {
    let f = Fixture::new(&item(
        "viewer",
        "concurrent_device",
        1,
        "max_exceptions = 9",
    ));
    let first = f.authorized("viewer", 1);
    let second = f.authorized("viewer", 2);
    assert_eq!(f.item_value("LIC-T-1", "exceptions"), 1);
    assert!(keygate(&f.data, &["device", "block", &device_uuid(2)]).ok);
    f.app.clock.advance(Duration::minutes(3));
    f.heartbeat(&first.lease_id, 1).unwrap();
    assert_eq!(
        f.heartbeat(&second.lease_id, 2).unwrap_err(),
        "DEVICE_BLOCKED"
    );
    assert_eq!(
        f.item_value("LIC-T-1", "exceptions"),
        1,
        "one device in this window"
    );
}

#[test]
fn usage_renews_the_authorization_and_marks_the_device_active() {
    let f = Fixture::new(&item(
        "viewer",
        "concurrent_device",
        1,
        "max_exceptions = 9",
    ));
    let first = f.authorized("viewer", 1);
    f.app.clock.advance(Duration::minutes(3));
    let heartbeat = json!({"lease_id": first.lease_id, "device_uuid": device_uuid(1), "stream": STREAM, "reports": []});
    let (status, body) = f.usage(&heartbeat);
    assert_eq!(status, 200, "{body}");
    let vendor = keygate_sdk::keys::public_key_from_pem(
        &std::fs::read_to_string(f.vendor.pub_path()).unwrap(),
    )
    .unwrap();
    let license = f.authorize(&f.request("viewer", 1)).1["license"]
        .as_str()
        .unwrap()
        .to_string();
    let (renewed, _) = keygate_sdk::chain::verify_authorization(
        body["authorization"].as_str().unwrap(),
        &license,
        [&vendor],
        keygate_sdk::chain::Expectation {
            device_uuid: &device_uuid(1),
            nonce: Some(NONCE),
            now: f.app.clock_now(),
        },
    )
    .expect("the renewal verifies through the chain");
    assert_eq!(renewed.lease_id, first.lease_id);
    assert!(renewed.expires_at > first.expires_at);
    // The heartbeat put device 1 in this window: device 2 makes it two, over quota.
    assert_eq!(
        f.authorized("viewer", 2).state,
        keygate_sdk::wire::AuthorizationState::Tolerance
    );
    // The device's last seen time (portal and CLI read it like this) is recorded at most
    // every 15 minutes: 3 minutes after its (re-)authorization, still that time.
    let seen = || {
        keygate::store::devices::device_by_uuid(&f.db(), &device_uuid(1))
            .unwrap()
            .unwrap()
            .last_seen
    };
    let authorized_at = f.app.clock_now().unix_timestamp();
    f.app.clock.advance(Duration::minutes(3));
    assert_eq!(f.usage(&heartbeat).0, 200);
    assert_eq!(seen(), authorized_at);
    f.app.clock.advance(Duration::minutes(12));
    assert_eq!(f.usage(&heartbeat).0, 200);
    assert_eq!(seen(), f.app.clock_now().unix_timestamp());
}

/// A device calls every 3 minutes; its lease's record (renewal time and expiry) is written
/// on one call in five, never left more than 15 minutes behind the authorization the device
/// holds, and at once when the term changes by more.
#[test]
fn a_lease_record_is_written_every_15_minutes_not_on_every_call() {
    let f = Fixture::new(&item("scan", "per_device", 10, ""));
    let lease = f.authorized("scan", 1).lease_id;
    let t0 = f.app.clock_now().unix_timestamp();
    let week = 7 * 86_400;
    let record = || -> (i64, i64) {
        f.db()
            .query_row(
                "SELECT issued_at, expires_at FROM leases WHERE lease_id = ?1",
                [&lease],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap()
    };
    let expiry_of = |payload: serde_json::Value| {
        time::OffsetDateTime::parse(
            payload["expires_at"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
        .unix_timestamp()
    };
    assert_eq!(record(), (t0, t0 + week));
    for call in 1..=4 {
        f.app.clock.advance(Duration::minutes(3));
        let renewed = f.heartbeat(&lease, 1).unwrap();
        assert_eq!(expiry_of(renewed), t0 + call * 180 + week);
        assert_eq!(record(), (t0, t0 + week), "call {call} wrote the lease");
    }
    f.app.clock.advance(Duration::minutes(3));
    let now = t0 + 900;
    assert_eq!(expiry_of(f.heartbeat(&lease, 1).unwrap()), now + week);
    assert_eq!(record(), (now, now + week));

    // A new version of the license shortens the offline allowance: the record follows at
    // the next call, not 15 minutes later.
    f.import(
        "LIC-T",
        &item("scan", "per_device", 10, "").replace("offline_days = 7", "offline_days = 1"),
        &["--version", "2"],
    );
    f.app.clock.advance(Duration::minutes(3));
    let now = now + 180;
    assert_eq!(expiry_of(f.heartbeat(&lease, 1).unwrap()), now + 86_400);
    assert_eq!(record(), (now, now + 86_400));
}

/// A lease is renewed while it is valid: once the authorization the device holds has run
/// out (its record may lag the newest one by up to 15 minutes), a usage call still records
/// the reports but renews nothing, so a device back after its offline allowance authorizes
/// again (and meets the code's session password and validation fields as they are now).
#[test]
fn a_lapsed_lease_records_usage_but_is_not_renewed() {
    let f = scanner();
    let (one, two) = (
        f.authorized("scanner", 1).lease_id,
        f.authorized("scanner", 2).lease_id,
    );
    let stream = |n: u32| format!("00000000-0000-4000-8000-{n:012}");
    // 7 offline days and the record's 15 minutes, less a second: still renewed.
    f.app
        .clock
        .advance(Duration::days(7) + Duration::minutes(15) - Duration::seconds(1));
    assert!(f.heartbeat(&one, 1).is_ok());
    f.app.clock.advance(Duration::seconds(1));
    let (status, body) = f.usage(&f.reports(&two, 2, &stream(2), &[(1, "LIC-T-1", "scans", 3)]));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["accepted"], 1);
    assert!(body["authorization"].is_null(), "{body}");
    assert_eq!(body["renewal_error"]["code"], "LEASE_NOT_FOUND", "{body}");
    assert_eq!(total(&f), 3, "the reports are recorded");
    // Authorizing again gives a lease that renews.
    let again = f.authorized("scanner", 2).lease_id;
    assert!(f.heartbeat(&again, 2).is_ok());
}

#[test]
fn failed_usage_requests_record_nothing() {
    let f = scanner();
    let lease = f.authorized("scanner", 1).lease_id;
    let db = f.data.join("keygate.db");
    let digest = db_digest(&db);
    let unknown = "99999999-9999-4999-8999-999999999999";
    let cases = [
        (
            f.reports(unknown, 1, STREAM, &[(1, "LIC-T-1", "scans", 1)]),
            404,
            "LEASE_NOT_FOUND",
        ),
        (
            f.reports(&lease, 2, STREAM, &[(1, "LIC-T-1", "scans", 1)]),
            404,
            "LEASE_NOT_FOUND",
        ),
        (
            f.reports(&lease, 1, STREAM, &[(1, "OTHER-ITEM", "scans", 1)]),
            400,
            "BAD_REQUEST",
        ),
        (
            f.reports(
                &lease,
                1,
                STREAM,
                &[(1, "LIC-T-1", "scans", 1), (2, "OTHER-ITEM", "scans", 1)],
            ),
            400,
            "BAD_REQUEST",
        ),
        (
            f.reports(
                &lease,
                1,
                STREAM,
                &[(2, "LIC-T-1", "scans", 1), (1, "LIC-T-1", "scans", 1)],
            ),
            400,
            "BAD_REQUEST",
        ),
        (
            json!({"lease_id": lease, "device_uuid": device_uuid(1), "stream": "not-a-uuid", "reports": []}),
            400,
            "BAD_REQUEST",
        ),
    ];
    for (body, status, code) in cases {
        let (got, answer) = f.usage(&body);
        assert_eq!(
            (got, answer["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}"
        );
        assert_eq!(db_digest(&db), digest, "{code}: changed the database");
    }
    let mut negative = f.reports(&lease, 1, STREAM, &[(1, "LIC-T-1", "scans", 1)]);
    negative["reports"][0]["counters"]["scans"] = json!(-5);
    assert_eq!(f.usage(&negative).1["error"]["code"], "BAD_REQUEST");
    assert_eq!(db_digest(&db), digest);
    // A counter named twice in one report: a map would keep the last amount only.
    let once = f
        .reports(&lease, 1, STREAM, &[(1, "LIC-T-1", "scans", 5)])
        .to_string();
    let twice = once.replace("\"scans\":5", "\"scans\":5,\"scans\":7");
    assert_ne!(once, twice);
    let (status, answer) = post_bytes(
        &f.app.agent,
        &f.app.url("/api/v1/usage"),
        "application/json",
        twice.as_bytes(),
    );
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (400, Some("BAD_REQUEST")),
        "{answer}"
    );
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("counter scans is named twice"),
        "{answer}"
    );
    assert_eq!(db_digest(&db), digest);
    // More than 5000 reports (under the byte limit) is too large a request, as a body over
    // it is: the device sends fewer per request. 5000 are taken.
    let backlog: Vec<_> = (1..=5001).map(|seq| (seq, "LIC-T-1", "scans", 1)).collect();
    let (status, answer) = f.usage(&f.reports(&lease, 1, STREAM, &backlog));
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (413, Some("PAYLOAD_TOO_LARGE")),
        "{answer}"
    );
    assert_eq!(db_digest(&db), digest);
    let (status, answer) = f.usage(&f.reports(&lease, 1, STREAM, &backlog[..5000]));
    assert_eq!((status, answer["accepted"].as_u64()), (200, Some(5000)));
}

#[test]
fn huge_counts_are_refused_and_totals_stop_at_the_largest_integer() {
    use keygate_sdk::wire::MAX_COUNT;
    let f = scanner();
    let lease = f.authorized("scanner", 1).lease_id;
    let db = f.data.join("keygate.db");
    let digest = db_digest(&db);
    let (status, body) =
        f.usage(&f.reports(&lease, 1, STREAM, &[(1, "LIC-T-1", "scans", MAX_COUNT + 1)]));
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("BAD_REQUEST")),
        "{body}"
    );
    let mut many = f.reports(&lease, 1, STREAM, &[(1, "LIC-T-1", "scans", 1)]);
    for n in 0..64 {
        many["reports"][0]["counters"][format!("c{n}")] = json!(1);
    }
    let (status, body) = f.usage(&many);
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("BAD_REQUEST")),
        "65 counters"
    );
    assert_eq!(db_digest(&db), digest);

    // Totals close to the largest integer stop there instead of failing the request (and
    // with it every later report of every device of the item).
    assert_eq!(
        f.usage(&f.reports(&lease, 1, STREAM, &[(1, "LIC-T-1", "scans", 1)]))
            .0,
        200
    );
    f.db()
        .execute_batch(
            "UPDATE items SET usage_total = 9223372036854775000;
             UPDATE usage_daily SET total = 9223372036854775000;
             UPDATE device_usage SET total = 9223372036854775000;",
        )
        .unwrap();
    for seq in 2..=3 {
        let (status, body) =
            f.usage(&f.reports(&lease, 1, STREAM, &[(seq, "LIC-T-1", "scans", MAX_COUNT)]));
        assert_eq!(
            (status, body["accepted"].as_u64()),
            (200, Some(1)),
            "{body}"
        );
        assert_eq!(
            body["renewal_error"]["code"], "QUOTA_EXCEEDED",
            "past 105 %"
        );
    }
    let totals: (i64, i64) = f
        .db()
        .query_row(
            "SELECT (SELECT total FROM usage_daily), (SELECT total FROM device_usage)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(totals, (i64::MAX, i64::MAX));
    assert_eq!(total(&f), i64::MAX);
    // The dashboard's day figure (the metered counter's) is held at the largest integer too,
    // and so is another counter's daily total.
    let (status, _) = f.usage(&f.reports(&lease, 1, STREAM, &[(4, "LIC-T-1", "pages", MAX_COUNT)]));
    assert_eq!(status, 200);
    let days = keygate::store::ops::usage_by_day(&f.db(), 0).unwrap();
    assert_eq!(days.len(), 1);
    assert_eq!(days[0].2, i64::MAX);
}

#[test]
fn reports_may_not_name_an_item_of_another_handshake_code() {
    // Two items of the product, the second one moved to another department's code.
    let f = Fixture::new(
        &[
            item("scanner", "per_usage", 1000, "counter = \"scans\""),
            item("scanner", "per_usage", 1000, "counter = \"scans\""),
        ]
        .concat(),
    );
    f.assign_to_new_code("LIC-T-2", "LAB");
    let lease = f.authorized("scanner", 1);
    assert_eq!(lease.items[0].item_id, "LIC-T-1");
    let db = f.data.join("keygate.db");
    let digest = db_digest(&db);
    let (status, body) =
        f.usage(&f.reports(&lease.lease_id, 1, STREAM, &[(1, "LIC-T-2", "scans", 5)]));
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("BAD_REQUEST")),
        "{body}"
    );
    assert_eq!(db_digest(&db), digest);
    assert_eq!(f.item_value("LIC-T-2", "usage_total"), 0);
}

#[test]
fn a_removed_device_still_has_its_usage_recorded_and_is_told_its_lease_is_revoked() {
    let f = Fixture::new(&item("scanner", "per_device", 1, ""));
    let lease = f.authorized("scanner", 1).lease_id;
    assert!(keygate(&f.data, &["device", "remove", &device_uuid(1)]).ok);
    assert_eq!(f.item_value("LIC-T-1", "seats_used"), 0);
    let (status, body) = f.usage(&f.reports(&lease, 1, STREAM, &[(1, "LIC-T-1", "pages", 4)]));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["accepted"], 1);
    assert_eq!(body["renewal_error"]["code"], "LEASE_REVOKED");
    f.authorized("scanner", 2); // the seat was freed
    assert_eq!(f.refused("scanner", 1), "QUOTA_EXCEEDED");
}

/// A report dated before its item started (a device clock years behind, or a forged
/// report) counts on the item's first day: the per-day rows stay within the item's life.
#[test]
fn usage_dated_before_its_item_started_counts_on_its_first_day() {
    let f = scanner();
    let auth = f.authorized("scanner", 1);
    let reports: Vec<_> = [1, 2, 3]
        .iter()
        .map(|&seq| {
            json!({"seq": seq, "item_id": "LIC-T-1",
                   "from": format!("{}-01-01T00:00:00Z", 1970 + seq),
                   "to": format!("{}-01-01T00:03:00Z", 1970 + seq), "counters": {"scans": 1}})
        })
        .collect();
    let body = json!({"lease_id": auth.lease_id, "device_uuid": device_uuid(1), "stream": STREAM, "reports": reports});
    let (status, answer) = f.usage(&body);
    assert_eq!(
        (status, answer["accepted"].as_u64()),
        (200, Some(3)),
        "{answer}"
    );
    let days = daily_totals(&f);
    let started = time::macros::datetime!(2026-01-01 00:00 UTC).unix_timestamp();
    assert_eq!(days, [(started, 3)], "one row, on the item's first day");
}

#[test]
fn bad_requests_get_the_spec_error_and_change_nothing() {
    let f = scanner();
    let db = f.data.join("keygate.db");
    let digest = db_digest(&db);
    let url = f.app.url("/api/v1/authorize");
    let raw = |content_type: &str, body: Vec<u8>| {
        let (status, body) = post_bytes(&f.app.agent, &url, content_type, &body);
        (
            status,
            body["error"]["code"].as_str().unwrap_or("").to_string(),
        )
    };
    assert_eq!(
        raw("application/json", b"{not json".to_vec()),
        (400, "BAD_REQUEST".into())
    );
    // JSON is UTF-8: a body said to be in another charset is refused, not misread.
    let valid = serde_json::to_vec(&f.request("scanner", 1)).unwrap();
    for not_json in ["text/plain", "text/json", "image/json"] {
        assert_eq!(
            raw(not_json, valid.clone()),
            (400, "BAD_REQUEST".into()),
            "{not_json}"
        );
    }
    assert_eq!(
        raw("application/json; charset=utf-16", valid.clone()),
        (400, "BAD_REQUEST".into())
    );
    // A method an endpoint does not take, and a path that is none: HTTP's 405 (with Allow)
    // and 404, not protocol errors.
    for (method, path, status, allow) in [
        ("GET", "/api/v1/authorize", 405, Some("POST")),
        ("PUT", "/api/v1/usage", 405, Some("POST")),
        ("DELETE", "/api/v1/release", 405, Some("POST")),
        ("POST", "/api/v1/appliance", 405, Some("GET, HEAD")),
        ("DELETE", "/api/v1/appliance", 405, Some("GET, HEAD")),
        ("GET", "/api/v1/licenses", 404, None),
    ] {
        let request = ureq::http::Request::builder()
            .method(method)
            .uri(f.app.url(path))
            .header("content-type", "application/json")
            .body(valid.clone())
            .unwrap();
        let mut response = f.app.agent.run(request).unwrap();
        assert_eq!(response.status().as_u16(), status, "{method} {path}");
        assert_eq!(
            response
                .headers()
                .get("allow")
                .map(|v| v.to_str().unwrap().to_string())
                .as_deref(),
            allow,
            "{method} {path}"
        );
        assert_eq!(response.body_mut().read_to_string().unwrap(), "");
    }
    let mut big = serde_json::to_vec(&f.request("scanner", 1)).unwrap();
    big.truncate(big.len() - 1);
    big.extend(format!(",\"pad\":\"{}\"}}", "x".repeat(20_000)).bytes());
    assert_eq!(
        raw("application/json", big),
        (413, "PAYLOAD_TOO_LARGE".into())
    );

    // A compressed body is not inflated (a small one could inflate to gigabytes before any
    // limit applies): it is not JSON, whatever it would decompress to.
    let request = serde_json::to_vec(&f.request("scanner", 1)).unwrap();
    let mut response = f
        .app
        .agent
        .post(&url)
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .send(&gzip_stored(&request)[..])
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    let answer: serde_json::Value = response.body_mut().read_json().unwrap();
    assert_eq!(answer["error"]["code"], "BAD_REQUEST", "{answer}");

    let cases = [
        (
            "device.uuid",
            json!({"handshake_code": f.code, "product": "scanner", "device": {"uuid": "nope"}, "nonce": NONCE}),
        ),
        (
            "nonce",
            json!({"handshake_code": f.code, "product": "scanner", "device": {"uuid": device_uuid(1)}, "nonce": "short"}),
        ),
        (
            "product",
            json!({"handshake_code": f.code, "product": "", "device": {"uuid": device_uuid(1)}, "nonce": NONCE}),
        ),
        (
            "product",
            json!({"handshake_code": f.code, "device": {"uuid": device_uuid(1)}, "nonce": NONCE}),
        ),
        (
            "handshake_code",
            json!({"handshake_code": "<script>", "product": "scanner", "device": {"uuid": device_uuid(1)}, "nonce": NONCE}),
        ),
        (
            "device.name",
            json!({"handshake_code": f.code, "product": "scanner", "device": {"uuid": device_uuid(1), "name": "a\u{0}b"}, "nonce": NONCE}),
        ),
        // Shown in the portal, it would read as "scannerexe.jpg".
        (
            "device.user",
            json!({"handshake_code": f.code, "product": "scanner", "device": {"uuid": device_uuid(1), "user": "scanner\u{202E}gpj.exe"}, "nonce": NONCE}),
        ),
    ];
    for (field, body) in cases {
        let (status, answer) = f.authorize(&body);
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (400, Some("BAD_REQUEST")),
            "{body}"
        );
        assert!(
            answer["error"]["message"].as_str().unwrap().contains(field),
            "{answer}"
        );
    }
    // Refusals of a valid request change nothing either.
    assert_eq!(f.refused("other-product", 1), "NO_LICENSE");
    assert_eq!(db_digest(&db), digest);

    // The same request, as UTF-8 JSON (named or not), is taken.
    for utf8 in ["UTF-8", "utf8"] {
        let content_type = format!("application/json; charset={utf8}");
        assert_eq!(raw(&content_type, valid.clone()).0, 200, "{content_type}");
    }
    let head = ureq::http::Request::builder()
        .method("HEAD")
        .uri(f.app.url("/api/v1/appliance"))
        .body(())
        .unwrap();
    assert_eq!(f.app.agent.run(head).unwrap().status().as_u16(), 200);
}

#[test]
fn two_hundred_devices_racing_for_100_seats_get_exactly_110() {
    let f = Fixture::new(&item("reader", "per_device", 100, ""));
    let url = f.app.url("/api/v1/authorize");
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (1..=200u32)
            .map(|n| {
                let (agent, url, body) = (f.app.agent.clone(), url.clone(), f.request("reader", n));
                scope.spawn(move || post_json(&agent, &url, &body).0)
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 110);
    assert_eq!(statuses.iter().filter(|s| **s == 403).count(), 90);
    assert_eq!(f.item_value("LIC-T-1", "seats_used"), 110);
    let rows: i64 = f
        .db()
        .query_row(
            "SELECT COUNT(*) FROM seats WHERE item_id = 'LIC-T-1'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(rows, 110, "no seat handed out twice, no count drift");
}

#[test]
fn acknowledged_usage_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let vendor = Vendor::new();
    assert!(keygate(&data, &["trust", vendor.pub_path().to_str().unwrap()]).ok);
    let items = items_file(
        "LIC-K",
        &item("scanner", "per_usage", 1_000_000, "counter = \"scans\""),
    );
    let license = vendor.issue_file(&data, &items, &["--license-id", "LIC-K"], "k.lic");
    let run = keygate(&data, &["import", license.to_str().unwrap()]);
    let code = default_code(&run);

    let served = Served::start(&data);
    let agent = pinned_agent(&appliance_cert(&data));
    let (status, body) = post_json(
        &agent,
        &served.url("/api/v1/authorize"),
        &json!({"handshake_code": code, "product": "scanner", "device": {"uuid": device_uuid(1)}, "nonce": NONCE}),
    );
    assert_eq!(status, 200, "{body}");
    let auth: serde_json::Value = serde_json::from_slice(
        &data_encoding::BASE64URL_NOPAD
            .decode(
                body["authorization"]
                    .as_str()
                    .unwrap()
                    .split('.')
                    .nth(1)
                    .unwrap()
                    .as_bytes(),
            )
            .unwrap(),
    )
    .unwrap();
    let lease = auth["lease_id"].as_str().unwrap();
    // Many acknowledged requests, sent concurrently so they share group commits.
    let acked: u64 = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8u64)
            .map(|t| {
                let (agent, url) = (agent.clone(), served.url("/api/v1/usage"));
                scope.spawn(move || {
                    let stream = format!("00000000-0000-4000-9000-{t:012}");
                    (1..=25u64)
                        .map(|seq| {
                            let now = keygate::licensing::rfc3339(time::OffsetDateTime::now_utc());
                            let body = json!({"lease_id": lease, "device_uuid": device_uuid(1), "stream": stream,
                                "reports": [{"seq": seq, "item_id": "LIC-K-1", "from": now, "to": now, "counters": {"scans": 3}}]});
                            let (status, answer) = post_json(&agent, &url, &body);
                            assert_eq!(status, 200, "{answer}");
                            answer["accepted"].as_u64().unwrap() * 3
                        })
                        .sum::<u64>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    served.kill();
    assert_eq!(acked, 8 * 25 * 3);

    let served = Served::start(&data);
    let conn = rusqlite::Connection::open(data.join("keygate.db")).unwrap();
    let stored: i64 = conn
        .query_row(
            "SELECT usage_total FROM items WHERE item_id = 'LIC-K-1'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        stored as u64, acked,
        "every acknowledged report survived kill -9"
    );
    drop(served);
}

#[test]
fn a_backlog_for_the_previous_item_is_still_accepted_after_the_lease_moves() {
    let items = [
        item("scanner", "per_usage", 1000, "counter = \"scans\"\nstarts_at = 2026-01-01T00:00:00Z\nexpires_at = 2026-06-02T00:00:00Z"),
        item("scanner", "per_usage", 1000, "counter = \"scans\"\nstarts_at = 2026-01-01T00:00:00Z\nexpires_at = 2027-01-01T00:00:00Z"),
        item("viewer", "per_usage", 1000, "counter = \"views\""),
    ]
    .concat();
    let f = Fixture::new(&items);
    let first = f.authorized("scanner", 1);
    assert_eq!(first.items[0].item_id, "LIC-T-1");
    f.app.clock.advance(Duration::days(1)); // LIC-T-1 has expired
    let second = f.authorized("scanner", 1);
    assert_eq!(
        (second.items[0].item_id.as_str(), &second.lease_id),
        ("LIC-T-2", &first.lease_id)
    );
    // The backlog from before, for LIC-T-1, still counts (with a name sent untrimmed), also
    // once the device's seat there is gone (lapsed, say).
    f.db()
        .execute("DELETE FROM seats WHERE item_id = 'LIC-T-1'", [])
        .unwrap();
    let (status, body) = f.usage(&f.reports(
        &first.lease_id,
        1,
        STREAM,
        &[(1, "LIC-T-1", " scans", 7), (2, "LIC-T-2", "scans", 1)],
    ));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["accepted"], 2);
    assert_eq!(f.item_value("LIC-T-1", "usage_total"), 7);
    assert_eq!(f.item_value("LIC-T-2", "usage_total"), 1);
    // An item of another product does not belong to the lease.
    let (status, body) =
        f.usage(&f.reports(&first.lease_id, 1, STREAM, &[(3, "LIC-T-3", "views", 1)]));
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("BAD_REQUEST"))
    );
}

/// `data` as a gzip stream of one stored (uncompressed) deflate block.
fn gzip_stored(data: &[u8]) -> Vec<u8> {
    let crc = !data.iter().fold(!0u32, |crc, &byte| {
        (0..8).fold(crc ^ u32::from(byte), |c, _| {
            if c & 1 == 1 {
                (c >> 1) ^ 0xedb8_8320
            } else {
                c >> 1
            }
        })
    });
    let len = u16::try_from(data.len()).unwrap();
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff, 1];
    out.extend(len.to_le_bytes());
    out.extend((!len).to_le_bytes());
    out.extend(data);
    out.extend(crc.to_le_bytes());
    out.extend(u32::try_from(data.len()).unwrap().to_le_bytes());
    out
}

/// An item records at most 64 counter names over its life besides its metered counter:
/// usage of a 65th is not recorded, while the report is accepted and the meter always
/// counts, whether it came first or last (the device's other reports and the item's billing
/// do not depend on what names others invented).
#[test]
fn an_item_records_at_most_64_counter_names_and_always_its_meter() {
    for meter_first in [false, true] {
        let f = scanner();
        let auth = f.authorized("scanner", 1);
        let stream = "00000000-0000-4000-8000-0000000c0a75";
        let report = |seq: u64, names: &[String]| {
            let mut body = f.reports(&auth.lease_id, 1, stream, &[(seq, "LIC-T-1", "scans", 1)]);
            let counters = &mut body["reports"][0]["counters"];
            *counters = json!({});
            for name in names {
                counters[name] = json!(1);
            }
            body
        };
        let accepted = |body: &serde_json::Value| {
            let (status, answer) = f.usage(body);
            assert_eq!(
                (status, answer["accepted"].as_u64()),
                (200, Some(1)),
                "{answer}"
            );
        };
        let names =
            |range: std::ops::Range<u32>| range.map(|n| format!("c{n}")).collect::<Vec<_>>();
        let mut seq = 0;
        let mut send = |names: &[String]| {
            seq += 1;
            accepted(&report(seq, names));
        };
        if meter_first {
            send(&["scans".to_string()]);
        }
        // c1..c64: the item's 64 names.
        send(&names(1..65));
        assert_eq!(f.recorded("c64"), 1, "meter first: {meter_first}");
        // A 65th name is not recorded; the meter is, though it may be new too.
        let mut next = names(60..66);
        next.push("scans".into());
        send(&next);
        assert_eq!(f.recorded("c65"), 0);
        let metrics = crate::operations::scrape(&f);
        assert_eq!(
            crate::operations::value(&metrics, "keygate_usage_counters_refused_total"),
            1.0
        );
        let scans = if meter_first { 2 } else { 1 };
        assert_eq!((f.recorded("c64"), f.recorded("scans")), (2, scans));
        assert_eq!(f.item_value("LIC-T-1", "usage_total"), scans);
        let device_rows: i64 = f
            .db()
            .query_row("SELECT count(*) FROM device_usage", [], |r| r.get(0))
            .unwrap();
        assert_eq!(device_rows, 65, "64 names and the meter");
    }
}

/// A newer version of a license may meter another counter of its per_usage item: the
/// item's total is then that counter's usage so far (from its daily totals), not the old
/// counter's, so the quota judges what the new license meters.
#[test]
fn a_new_version_metering_another_counter_counts_that_counter() {
    let meters = |counter: &str| {
        item(
            "scanner",
            "per_usage",
            900,
            &format!("counter = \"{counter}\""),
        )
    };
    let f = Fixture::new(&meters("scans"));
    let auth = f.authorized("scanner", 1);
    let stream = "00000000-0000-4000-8000-00000000c0de";
    let mut body = f.reports(&auth.lease_id, 1, stream, &[(1, "LIC-T-1", "scans", 1_000)]);
    body["reports"][0]["counters"]["pages"] = json!(50);
    let (status, answer) = f.usage(&body);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["renewal_error"]["code"], "QUOTA_EXCEEDED",
        "1,000 scans of 900"
    );
    f.import("LIC-T", &meters("pages"), &["--version", "2"]);
    assert_eq!(f.item_value("LIC-T-1", "usage_total"), 50);
    assert!(f.heartbeat(&auth.lease_id, 1).is_ok(), "50 pages of 900");
    // Back to scans: their 1,000 count again.
    f.import("LIC-T", &meters("scans"), &["--version", "3"]);
    assert_eq!(f.item_value("LIC-T-1", "usage_total"), 1_000);
}

/// A usage request whose client went away while it waited for the database keeps its part
/// of the budget until the writer has dropped it: the parsed reports wait in the writer's
/// queue all the same, so clients that send large backlogs and hang up cannot queue more
/// than the budget.
#[test]
fn a_usage_request_abandoned_in_the_queue_keeps_its_budget_until_dropped() {
    use std::io::Write;
    let f = scanner();
    let lease = f.authorized("scanner", 1).lease_id;
    let budget = || f.app.state.usage_budget.available_permits();
    let full = keygate::server::USAGE_BUDGET as usize;
    // The writer is held by a job that waits for `release`.
    let (release, wait) = std::sync::mpsc::channel::<()>();
    let (held, holding) = std::sync::mpsc::channel();
    let state = f.app.state.clone();
    let writer = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(state.store.write(move |_| {
            held.send(()).unwrap();
            let _ = wait.recv();
            Ok::<_, keygate::store::StoreError>(())
        }))
    });
    holding.recv().unwrap();
    let body = f.reports(
        &lease,
        1,
        STREAM,
        &[(1, "LIC-T-1", "scans", 1), (2, "LIC-T-1", "scans", 1)],
    );
    let body = body.to_string();
    let mut tls = raw_tls(&f, StdDuration::from_secs(5));
    write!(
        tls,
        "POST /api/v1/usage HTTP/1.1\r\nHost: keygate\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    tls.flush().unwrap();
    let until = std::time::Instant::now() + StdDuration::from_secs(30);
    while budget() == full && std::time::Instant::now() < until {
        std::thread::sleep(StdDuration::from_millis(10));
    }
    assert_eq!(budget(), full - 5, "the request waits with its weight (5)");
    // The client goes away, and the appliance sees it go (its connection is dropped).
    let open = || f.app.state.connections.open([127, 0, 0, 1].into());
    let before = open();
    drop(tls);
    let until = std::time::Instant::now() + StdDuration::from_secs(30);
    while open() == before && std::time::Instant::now() < until {
        std::thread::sleep(StdDuration::from_millis(10));
    }
    assert_eq!(open(), before - 1, "the appliance saw the client go");
    assert_eq!(
        budget(),
        full - 5,
        "given back while its reports still wait"
    );
    drop(release);
    writer.join().unwrap().unwrap();
    let until = std::time::Instant::now() + StdDuration::from_secs(30);
    while budget() != full && std::time::Instant::now() < until {
        std::thread::sleep(StdDuration::from_millis(10));
    }
    assert_eq!(budget(), full, "given back once the writer dropped it");
}

/// The usage requests waiting for the database hold at most `USAGE_BUDGET` reports and
/// counters: past it a request is answered `RATE_LIMITED` (to send again later) and records
/// nothing, instead of queueing until the appliance runs out of memory.
#[test]
fn usage_past_the_appliances_budget_is_refused_for_later() {
    let f = scanner();
    let lease = f.authorized("scanner", 1).lease_id;
    let held = f
        .app
        .state
        .usage_budget
        .try_acquire_many(keygate::server::USAGE_BUDGET - 2)
        .unwrap();
    let digest = db_digest(&f.data.join("keygate.db"));
    // Two reports of one counter weigh 5 (the request, each report, each counter).
    let two = f.reports(
        &lease,
        1,
        STREAM,
        &[(1, "LIC-T-1", "scans", 1), (2, "LIC-T-1", "scans", 1)],
    );
    let (status, body) = f.usage(&two);
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("RATE_LIMITED"))
    );
    assert_eq!(db_digest(&f.data.join("keygate.db")), digest);
    // A heartbeat weighs 1: it goes through.
    f.heartbeat(&lease, 1).unwrap();
    drop(held);
    let (status, body) = f.usage(&two);
    assert_eq!(
        (status, body["accepted"].as_u64()),
        (200, Some(2)),
        "{body}"
    );
    // What a request held is given back once it is answered.
    assert_eq!(
        f.app.state.usage_budget.available_permits(),
        keygate::server::USAGE_BUDGET as usize
    );
}
