-- keygate schema 3: scheduled work (job runs, alert marks), the audit log, and daily
-- summaries of concurrency windows past the reporting horizon.

-- Every run of every scheduled job; the newest runs per job are kept.
CREATE TABLE job_runs (
    id          INTEGER PRIMARY KEY,
    job         TEXT NOT NULL,
    started_at  INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    ok          INTEGER NOT NULL,
    detail      TEXT NOT NULL DEFAULT ''
) STRICT;
CREATE INDEX job_runs_by_job ON job_runs(job, started_at);

-- Thresholds already alerted, per item, under the license version they were sent for.
CREATE TABLE alert_marks (
    item_id         TEXT NOT NULL REFERENCES items(item_id),
    threshold       TEXT NOT NULL,            -- "consumption:75", "expiry:30", ...
    license_version INTEGER NOT NULL,
    sent_at         INTEGER NOT NULL,
    PRIMARY KEY (item_id, threshold)
) STRICT, WITHOUT ROWID;

-- Who did what, when, from where: admin actions, sign-ins, imports, housekeeping.
CREATE TABLE audit_log (
    id      INTEGER PRIMARY KEY,
    at      INTEGER NOT NULL,
    actor   TEXT NOT NULL,                    -- an admin, "cli", "system"
    action  TEXT NOT NULL,
    target  TEXT NOT NULL DEFAULT '',
    detail  TEXT NOT NULL DEFAULT '',
    address TEXT NOT NULL DEFAULT ''
) STRICT;
CREATE INDEX audit_log_by_time ON audit_log(at);

-- Concurrency windows older than the horizon, summarised per item per day.
CREATE TABLE concurrency_daily (
    item_id    TEXT NOT NULL REFERENCES items(item_id),
    day        INTEGER NOT NULL,
    peak       INTEGER NOT NULL,
    exceptions INTEGER NOT NULL,
    PRIMARY KEY (item_id, day)
) STRICT, WITHOUT ROWID;
