//! Issue 6: metrics after real traffic, health and readiness.

use serde_json::json;

use crate::helpers::*;

fn scrape(f: &Fixture) -> String {
    let mut response = f.app.agent.get(&f.app.url("/metrics")).call().unwrap();
    assert_eq!(response.status().as_u16(), 200);
    response.body_mut().read_to_string().unwrap()
}

fn value(metrics: &str, series: &str) -> f64 {
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

#[test]
fn metrics_count_real_traffic() {
    let f = Fixture::new(&item("scanner", "per_device", 2, ""));
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
    f.app.run_job("backup").unwrap();

    let m = scrape(&f);
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
        1.0
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
    assert_eq!(
        value(&m, r#"keygate_job_runs_total{job="backup",outcome="ok"}"#),
        1.0
    );
    assert_eq!(value(&m, "keygate_backup_age_seconds"), 0.0);
}
