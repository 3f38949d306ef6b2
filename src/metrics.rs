//! Prometheus metrics (`GET /metrics`, text exposition format): counters kept in memory by
//! the hot path (a few atomic increments per request), gauges read from the database at
//! scrape time.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use keygate_sdk::wire::ErrorCode;

use crate::jobs::Job;
use crate::ratelimit::OncePerMinute;
use crate::store::Commits;
use crate::store::licenses::ItemRow;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add(elapsed.as_micros() as u64, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (bound, bucket) in BUCKETS.iter().zip(&self.buckets) {
            cumulative += bucket.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum{{{labels}}} {}",
            self.sum_us.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// The client protocol's endpoints, as metrics label them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Authorize,
    Usage,
    Release,
}

const ENDPOINTS: [(Endpoint, &str); 3] = [
    (Endpoint::Authorize, "authorize"),
    (Endpoint::Usage, "usage"),
    (Endpoint::Release, "release"),
];

#[derive(Debug, Default)]
pub struct Metrics {
    /// Per endpoint: answers by outcome (index 0: ok, then `ErrorCode::ALL` in order).
    outcomes: [[AtomicU64; 1 + ErrorCode::ALL.len()]; 3],
    latency: [Histogram; 3],
    reports_accepted: AtomicU64,
    reports_duplicate: AtomicU64,
    renewals_refused: AtomicU64,
    counters_refused: AtomicU64,
    counters_warned: OncePerMinute,
    connections_refused: AtomicU64,
    connections_warned: OncePerMinute,
    /// By `Job` (in declaration order, as `Job::ALL`), then ok or failed.
    job_runs: [[AtomicU64; 2]; Job::ALL.len()],
}

fn endpoint_index(endpoint: Endpoint) -> usize {
    ENDPOINTS
        .iter()
        .position(|(e, _)| *e == endpoint)
        .expect("listed")
}

impl Metrics {
    /// One answered request: its outcome (`None` for success) and how long it took.
    pub fn answered(&self, endpoint: Endpoint, error: Option<ErrorCode>, elapsed: Duration) {
        self.counted(endpoint, error);
        self.latency[endpoint_index(endpoint)].observe(elapsed);
    }

    /// Counts an answer without timing it: a body refused before any handler ran (not
    /// JSON, too large) is an outcome, but its time says nothing of the appliance's work.
    pub fn counted(&self, endpoint: Endpoint, error: Option<ErrorCode>) {
        // The server answers only the codes it knows (`ErrorCode::Unknown` is a client's
        // reading of a newer server's code); were one missing, it counts as INTERNAL.
        let outcome = error.map_or(0, |code| {
            1 + ErrorCode::ALL
                .iter()
                .position(|c| *c == code)
                .unwrap_or(ErrorCode::ALL.len() - 1)
        });
        self.outcomes[endpoint_index(endpoint)][outcome].fetch_add(1, Relaxed);
    }

    pub fn usage_recorded(&self, accepted: u64, duplicates: u64, renewal_refused: bool) {
        self.reports_accepted.fetch_add(accepted, Relaxed);
        self.reports_duplicate.fetch_add(duplicates, Relaxed);
        self.renewals_refused
            .fetch_add(u64::from(renewal_refused), Relaxed);
    }

    /// Counts usage of `names` counter names not recorded (past their item's limit) at `now`
    /// (Unix seconds); `true` when it is worth a warning: at most one a minute, however many
    /// devices report such names.
    pub fn counters_refused(&self, names: u64, now: i64) -> bool {
        self.counters_refused.fetch_add(names, Relaxed);
        self.counters_warned.ready(now)
    }

    /// Counts a connection closed as it was accepted (its host held all its connections) at
    /// `now` (Unix seconds); `true` when it is worth a warning: at most one a minute.
    pub fn connection_refused(&self, now: i64) -> bool {
        self.connections_refused.fetch_add(1, Relaxed);
        self.connections_warned.ready(now)
    }

    pub fn job_ran(&self, job: Job, ok: bool) {
        self.job_runs[job as usize][usize::from(!ok)].fetch_add(1, Relaxed);
    }

    /// The exposition, with the database's figures given.
    pub fn render(
        &self,
        items: &[ItemRow],
        commits: &Commits,
        backup_age_s: Option<i64>,
        uptime_s: i64,
    ) -> String {
        let mut out = String::with_capacity(8192);
        out.push_str(
            "# HELP keygate_requests_total Client protocol answers by endpoint and outcome.\n",
        );
        out.push_str("# TYPE keygate_requests_total counter\n");
        for (i, (_, name)) in ENDPOINTS.iter().enumerate() {
            for (o, count) in self.outcomes[i].iter().enumerate() {
                let count = count.load(Relaxed);
                if count == 0 && o != 0 {
                    continue;
                }
                let outcome = if o == 0 {
                    "ok"
                } else {
                    ErrorCode::ALL[o - 1].as_str()
                };
                let _ = writeln!(
                    out,
                    "keygate_requests_total{{endpoint=\"{name}\",outcome=\"{outcome}\"}} {count}"
                );
            }
        }
        out.push_str("# HELP keygate_request_duration_seconds Client protocol latency.\n");
        out.push_str("# TYPE keygate_request_duration_seconds histogram\n");
        for (i, (_, name)) in ENDPOINTS.iter().enumerate() {
            self.latency[i].render(
                &mut out,
                "keygate_request_duration_seconds",
                &format!("endpoint=\"{name}\""),
            );
        }
        let counter = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        counter(
            &mut out,
            "keygate_usage_reports_accepted_total",
            "Usage reports recorded.",
            self.reports_accepted.load(Relaxed),
        );
        counter(
            &mut out,
            "keygate_usage_reports_duplicate_total",
            "Usage reports already recorded (counted once).",
            self.reports_duplicate.load(Relaxed),
        );
        counter(
            &mut out,
            "keygate_renewals_refused_total",
            "Usage calls whose renewal was refused.",
            self.renewals_refused.load(Relaxed),
        );
        counter(
            &mut out,
            "keygate_usage_counters_refused_total",
            "Counter names of usage reports not recorded, past their item's limit of 64.",
            self.counters_refused.load(Relaxed),
        );
        counter(
            &mut out,
            "keygate_connections_refused_total",
            "Connections closed as they were accepted: their address held max_connections_per_address connections, or 256 in their TLS handshake.",
            self.connections_refused.load(Relaxed),
        );
        counter(
            &mut out,
            "keygate_db_batches_total",
            "Database transactions the writer ran (group commit: each holds many requests).",
            commits.committed(),
        );
        counter(
            &mut out,
            "keygate_db_wal_syncs_total",
            "Syncs of the database's WAL to disk (each makes every batch before it durable).",
            commits.syncs(),
        );
        out.push_str("# HELP keygate_job_runs_total Scheduled job runs by outcome.\n# TYPE keygate_job_runs_total counter\n");
        for (i, job) in Job::ALL.iter().map(|job| job.name()).enumerate() {
            for (o, outcome) in ["ok", "failed"].iter().enumerate() {
                let _ = writeln!(
                    out,
                    "keygate_job_runs_total{{job=\"{job}\",outcome=\"{outcome}\"}} {}",
                    self.job_runs[i][o].load(Relaxed)
                );
            }
        }
        out.push_str("# HELP keygate_item_seats_in_use Devices holding a seat, per license item.\n# TYPE keygate_item_seats_in_use gauge\n");
        for item in items {
            let _ = writeln!(
                out,
                "keygate_item_seats_in_use{{item=\"{}\",model=\"{}\"}} {}",
                item.item_id, item.terms.model, item.used.seats_used
            );
        }
        out.push_str(
            "# HELP keygate_item_quota Quota per license item.\n# TYPE keygate_item_quota gauge\n",
        );
        for item in items {
            let _ = writeln!(
                out,
                "keygate_item_quota{{item=\"{}\",model=\"{}\"}} {}",
                item.item_id, item.terms.model, item.terms.quota
            );
        }
        out.push_str("# HELP keygate_item_max_exceptions Windows over quota that stop a concurrent item.\n# TYPE keygate_item_max_exceptions gauge\n");
        for item in items.iter().filter(|i| i.terms.model.is_concurrent()) {
            let _ = writeln!(
                out,
                "keygate_item_max_exceptions{{item=\"{}\",model=\"{}\"}} {}",
                item.item_id, item.terms.model, item.terms.max_exceptions
            );
        }
        out.push_str("# HELP keygate_item_consumed What counts toward each item's stop: seats, metered usage or tokens against keygate_item_quota, a concurrent item's exceptions against keygate_item_max_exceptions.\n# TYPE keygate_item_consumed gauge\n");
        for item in items {
            let consumed = item.used.counted(item.terms.model);
            let _ = writeln!(
                out,
                "keygate_item_consumed{{item=\"{}\",model=\"{}\"}} {consumed}",
                item.item_id, item.terms.model
            );
        }
        if let Some(age) = backup_age_s {
            let _ = writeln!(
                out,
                "# HELP keygate_backup_age_seconds Time since the last backup.\n# TYPE keygate_backup_age_seconds gauge\nkeygate_backup_age_seconds {age}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP keygate_uptime_seconds Time since the appliance started.\n# TYPE keygate_uptime_seconds gauge\nkeygate_uptime_seconds {uptime_s}"
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_counter_names_are_all_counted_and_warned_once_a_minute() {
        let metrics = Metrics::default();
        let t = 1_800_000_000;
        assert!(metrics.counters_refused(3, t), "the first warns");
        assert!(!metrics.counters_refused(2, t + 59));
        assert!(metrics.counters_refused(1, t + 60));
        let text = metrics.render(&[], &Commits::default(), None, 0);
        assert!(
            text.contains("keygate_usage_counters_refused_total 6"),
            "{text}"
        );
    }
}
