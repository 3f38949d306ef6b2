//! Scheduled work's tables: job runs, alert marks, the audit log, housekeeping queries.

use rusqlite::{Connection, OptionalExtension, params};

use super::StoreError;
use crate::alerts::{Mark, Plan};

/// The newest time this appliance used, as last saved (every minute, by each job run and at
/// shutdown; before a release that saved it: its newest job run).
pub fn newest_time(conn: &Connection) -> Result<i64, StoreError> {
    match super::settings::get(conn, crate::clock::NEWEST_TIME)?.and_then(|t| t.parse::<i64>().ok())
    {
        Some(saved) => Ok(saved),
        None => Ok(conn
            .query_row("SELECT max(started_at) FROM job_runs", [], |r| {
                r.get::<_, Option<i64>>(0)
            })?
            .unwrap_or(i64::MIN)),
    }
}

/// Job runs kept per job.
const RUNS_KEPT: i64 = 100;

pub fn record_job_run(
    conn: &Connection,
    job: &str,
    started_at: i64,
    duration_ms: i64,
    ok: bool,
    detail: &str,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO job_runs (job, started_at, duration_ms, ok, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![job, started_at, duration_ms, ok, detail])?;
    conn.prepare_cached(
        "DELETE FROM job_runs WHERE job = ?1 AND id NOT IN
            (SELECT id FROM job_runs WHERE job = ?1 ORDER BY started_at DESC, id DESC LIMIT ?2)",
    )?
    .execute(params![job, RUNS_KEPT])?;
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRun {
    pub job: String,
    pub started_at: i64,
    pub duration_ms: i64,
    pub ok: bool,
    pub detail: String,
}

/// The newest runs, newest first.
/// When `job` last started, as of `now`, if it ever ran. Runs stamped later than `now` (by
/// a clock that ran ahead and was set back since) count only when there is no other, and
/// then as `now`: a month-ahead stamp would otherwise stay the newest for a month.
pub fn last_job_run(conn: &Connection, job: &str, now: i64) -> Result<Option<i64>, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT coalesce(max(started_at) FILTER (WHERE started_at <= ?2),
                             min(max(started_at), ?2))
             FROM job_runs WHERE job = ?1",
        )?
        .query_row(params![job, now], |r| r.get(0))?)
}

pub fn job_runs(conn: &Connection, limit: i64) -> Result<Vec<JobRun>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT job, started_at, duration_ms, ok, detail FROM job_runs
         ORDER BY started_at DESC, id DESC LIMIT ?1",
    )?;
    let rows = stmt.query_map([limit], |r| {
        Ok(JobRun {
            job: r.get(0)?,
            started_at: r.get(1)?,
            duration_ms: r.get(2)?,
            ok: r.get(3)?,
            detail: r.get(4)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// An item's alert marks: the thresholds found crossed, emailed or waiting for their email.
pub fn alert_marks(conn: &Connection, item_id: &str) -> Result<Vec<Mark>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT threshold, basis, figure, found_at, sent_at, fell FROM alert_marks
         WHERE item_id = ?1 ORDER BY threshold",
    )?;
    let rows = stmt.query_map([item_id], |r| {
        Ok(Mark {
            key: r.get(0)?,
            basis: r.get(1)?,
            figure: r.get(2)?,
            found_at: r.get(3)?,
            sent_at: r.get(4)?,
            fell: r.get(5)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Applies an alerts run's [`Plan`] to an item's marks: the marks that no longer matter go,
/// the ones whose figure fell are flagged, and the crossings found become marks waiting for
/// their email (over the mark of their threshold, if any).
pub fn apply_alert_plan(
    conn: &Connection,
    item_id: &str,
    plan: &Plan,
    now: i64,
) -> Result<(), StoreError> {
    for key in &plan.clear {
        conn.prepare_cached("DELETE FROM alert_marks WHERE item_id = ?1 AND threshold = ?2")?
            .execute(params![item_id, key])?;
    }
    for key in &plan.fell {
        conn.prepare_cached(
            "UPDATE alert_marks SET fell = 1 WHERE item_id = ?1 AND threshold = ?2",
        )?
        .execute(params![item_id, key])?;
    }
    for c in &plan.found {
        conn.prepare_cached(
            "INSERT INTO alert_marks (item_id, threshold, basis, figure, found_at, sent_at, fell)
             VALUES (?1, ?2, ?3, ?4, ?5, NULL, 0)
             ON CONFLICT (item_id, threshold) DO UPDATE SET basis = excluded.basis,
                figure = excluded.figure, found_at = excluded.found_at, sent_at = NULL, fell = 0",
        )?
        .execute(params![item_id, c.key, c.basis, c.figure, now])?;
    }
    Ok(())
}

/// Marks a crossing's email sent (if its mark still waits for it with the same basis).
pub fn set_alert_sent(
    conn: &Connection,
    item_id: &str,
    threshold: &str,
    basis: i64,
    now: i64,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "UPDATE alert_marks SET sent_at = ?4
         WHERE item_id = ?1 AND threshold = ?2 AND basis = ?3 AND sent_at IS NULL",
    )?
    .execute(params![item_id, threshold, basis, now])?;
    Ok(())
}

/// Certificate warnings are remembered as settings (`alert_mark:certificate:30`, ...) with
/// the expiry of the certificate warned of: a certificate is no item.
const MARK: &str = "alert_mark:";

/// The certificate warnings sent: (threshold, the expiry of the certificate warned of).
pub fn certificate_marks(conn: &Connection) -> Result<Vec<(String, i64)>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT substr(key, length(?1) + 1), CAST(value AS INTEGER) FROM settings
         WHERE substr(key, 1, length(?2)) = ?2",
    )?;
    let rows = stmt.query_map([MARK, &format!("{MARK}certificate:")], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn set_certificate_mark(
    conn: &Connection,
    threshold: &str,
    basis: i64,
) -> Result<(), StoreError> {
    super::settings::set(conn, &format!("{MARK}{threshold}"), &basis.to_string())
}

pub fn clear_certificate_mark(conn: &Connection, threshold: &str) -> Result<(), StoreError> {
    super::settings::delete(conn, &format!("{MARK}{threshold}"))
}

pub fn audit(
    conn: &Connection,
    at: i64,
    actor: &str,
    action: &str,
    target: &str,
    detail: &str,
    address: &str,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO audit_log (at, actor, action, target, detail, address)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![at, actor, action, target, detail, address])?;
    Ok(())
}

/// Usage per item per day since `since`, for the dashboard: an item's metered counter if it
/// has one (per_usage: what its quota counts), else all its counters added up; held at
/// `i64::MAX` (SQL's `sum` would fail on overflow). Each item's days since then are read by
/// the primary key: the history, kept for ever, is not scanned.
pub fn usage_by_day(conn: &Connection, since: i64) -> Result<Vec<(String, i64, i64)>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT u.item_id, u.day, CAST(min(total(u.total), 9223372036854775807) AS INTEGER)
         FROM items i CROSS JOIN usage_daily u ON u.item_id = i.item_id AND u.day >= ?1
         WHERE i.counter IS NULL OR u.counter = i.counter
         GROUP BY u.item_id, u.day",
    )?;
    let rows = stmt.query_map([since], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Peak concurrency per item per day since `since` (windows and their daily summaries).
pub fn peaks_by_day(
    conn: &Connection,
    since: i64,
    window_secs: i64,
) -> Result<Vec<(String, i64, i64)>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT item_id, day, max(peak) FROM (
            SELECT w.item_id, (w.window * ?2) - ((w.window * ?2) % 86400) AS day, w.peak
            FROM items i CROSS JOIN concurrency_windows w
                 ON w.item_id = i.item_id AND w.window >= ?1 / ?2
            UNION ALL
            SELECT d.item_id, d.day, d.peak
            FROM items i CROSS JOIN concurrency_daily d ON d.item_id = i.item_id AND d.day >= ?1)
         GROUP BY item_id, day",
    )?;
    let rows = stmt.query_map(params![since, window_secs], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub id: i64,
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub detail: String,
    pub address: String,
}

/// Which audit entries to show: the action contains `action` (any case), the actor is
/// `actor`, older than entry `before`.
#[derive(Debug, Default)]
pub struct AuditFilter<'a> {
    pub action: Option<&'a str>,
    pub actor: Option<&'a str>,
    pub before: Option<i64>,
}

/// Entries a page of an action search reads at most: the text is looked for in each entry
/// (no index finds a part of a word), and a log of millions (a seat freed, a device removed,
/// each an entry) would be read whole for a rare action's page.
pub const AUDIT_SEARCH_SPAN: i64 = 100_000;

/// A page of audit entries.
#[derive(Debug)]
pub struct AuditPage {
    pub entries: Vec<AuditEntry>,
    /// Where the next, older page starts (`before`), when there is one.
    pub older: Option<i64>,
    /// The search read [`AUDIT_SEARCH_SPAN`] entries without filling the page: older ones
    /// are searched on the next.
    pub searched_part: bool,
}

/// Audit entries, newest first, at most `limit`. An actor's are read by their index; an
/// action's text is looked for in the [`AUDIT_SEARCH_SPAN`] entries (of the actor, if given)
/// before `before` at most.
pub fn audit_entries(
    conn: &Connection,
    filter: &AuditFilter<'_>,
    limit: usize,
) -> Result<AuditPage, StoreError> {
    use rusqlite::ToSql;
    let before = filter.before.unwrap_or(i64::MAX);
    // The entries (of the actor) before `:before`, newest first. One statement per
    // combination of filters, each planned for its own: `:actor IS NULL OR actor = :actor`
    // would read every entry whatever the actor.
    let mut entries_before = String::from("FROM audit_log WHERE id < :before");
    let mut args: Vec<(&str, &dyn ToSql)> = vec![(":before", &before)];
    if let Some(actor) = &filter.actor {
        entries_before += " AND actor = :actor";
        args.push((":actor", actor));
    }
    // A search reads the span's entries: from the oldest of them (`floor`), found through
    // the index alone. Fewer than the span: all of them.
    let skip = AUDIT_SEARCH_SPAN - 1;
    let floor: Option<i64> = match filter.action {
        None => None,
        Some(_) => {
            let mut counted = args.clone();
            counted.push((":skip", &skip));
            conn.query_row(
                &format!("SELECT id {entries_before} ORDER BY id DESC LIMIT 1 OFFSET :skip"),
                &*counted,
                |r| r.get(0),
            )
            .optional()?
        }
    };
    let floor_value = floor.unwrap_or(i64::MIN);
    // The text is looked for as typed: `%` and `_` are no wildcards.
    let action = filter.action.map(|a| {
        a.replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_")
    });
    let page = limit as i64 + 1;
    let mut sql = format!("SELECT id, at, actor, action, target, detail, address {entries_before}");
    let mut all = args.clone();
    if let Some(action) = &action {
        sql += " AND id >= :floor AND action LIKE '%' || :action || '%' ESCAPE '\\'";
        all.extend([(":floor", &floor_value as &dyn ToSql), (":action", action)]);
    }
    sql += " ORDER BY id DESC LIMIT :page";
    all.push((":page", &page));
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(&*all, |r| {
        Ok(AuditEntry {
            id: r.get(0)?,
            at: r.get(1)?,
            actor: r.get(2)?,
            action: r.get(3)?,
            target: r.get(4)?,
            detail: r.get(5)?,
            address: r.get(6)?,
        })
    })?;
    let mut entries = rows.collect::<Result<Vec<_>, _>>()?;
    if entries.len() > limit {
        entries.truncate(limit);
        let older = entries.last().map(|e| e.id);
        return Ok(AuditPage {
            entries,
            older,
            searched_part: false,
        });
    }
    // The page is not full: a search goes on before its floor, if entries (of the actor)
    // are there.
    let older = match floor {
        Some(floor) => {
            let mut more = args;
            more[0] = (":before", &floor);
            conn.query_row(
                &format!("SELECT EXISTS (SELECT 1 {entries_before})"),
                &*more,
                |r| r.get::<_, bool>(0),
            )?
            .then_some(floor)
        }
        None => None,
    };
    Ok(AuditPage {
        entries,
        older,
        searched_part: older.is_some(),
    })
}

/// A lapsed seat to free, named in the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LapsedSeat {
    pub item_id: String,
    pub device_id: i64,
    pub device_uuid: String,
    pub instance: String,
}

/// Seats of an item used last at or before `cutoff` (by_first_auth: first authorized at or
/// before it instead).
/// How many of an item's seats lapsed by `cutoff` (by first authorization or by last use).
pub fn lapsed_count(
    conn: &Connection,
    item_id: &str,
    cutoff: i64,
    by_first_auth: bool,
) -> Result<i64, StoreError> {
    let sql = if by_first_auth {
        "SELECT COUNT(*) FROM seats WHERE item_id = ?1 AND first_auth_at <= ?2"
    } else {
        "SELECT COUNT(*) FROM seats WHERE item_id = ?1 AND last_used_at <= ?2"
    };
    Ok(conn
        .prepare_cached(sql)?
        .query_row(params![item_id, cutoff], |r| r.get(0))?)
}

pub fn lapsed_seats(
    conn: &Connection,
    item_id: &str,
    cutoff: i64,
    by_first_auth: bool,
    limit: i64,
) -> Result<Vec<LapsedSeat>, StoreError> {
    let sql = if by_first_auth {
        "SELECT s.item_id, s.device_id, d.uuid, s.instance FROM seats s JOIN devices d ON d.id = s.device_id
         WHERE s.item_id = ?1 AND s.first_auth_at <= ?2 ORDER BY s.first_auth_at LIMIT ?3"
    } else {
        "SELECT s.item_id, s.device_id, d.uuid, s.instance FROM seats s JOIN devices d ON d.id = s.device_id
         WHERE s.item_id = ?1 AND s.last_used_at <= ?2 ORDER BY s.last_used_at LIMIT ?3"
    };
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map(params![item_id, cutoff, limit], |r| {
        Ok(LapsedSeat {
            item_id: r.get(0)?,
            device_id: r.get(1)?,
            device_uuid: r.get(2)?,
            instance: r.get(3)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Folds concurrency windows before `cutoff_window` into per-day peaks and exception counts,
/// then deletes them. Returns how many windows were summarised.
pub fn summarise_windows(
    conn: &Connection,
    cutoff_window: i64,
    window_secs: i64,
) -> Result<usize, StoreError> {
    conn.prepare_cached(SUMMARISE_WINDOWS)?
        .execute(params![cutoff_window, window_secs])?;
    Ok(conn
        .prepare_cached(FORGET_WINDOWS)?
        .execute([cutoff_window])?)
}

/// Both driven by the items, each read by the windows' key (item, window), as
/// [`WINDOWS_SINCE`]: `window < ?1` alone would read every window kept, twice a day's run.
const SUMMARISE_WINDOWS: &str = "INSERT INTO concurrency_daily (item_id, day, peak, exceptions)
     SELECT w.item_id, (w.window * ?2) - ((w.window * ?2) % 86400), max(w.peak), sum(w.exception)
     FROM items i CROSS JOIN concurrency_windows w ON w.item_id = i.item_id AND w.window < ?1
     WHERE true GROUP BY 1, 2
     ON CONFLICT (item_id, day) DO UPDATE SET
        peak = max(peak, excluded.peak), exceptions = exceptions + excluded.exceptions";
const FORGET_WINDOWS: &str = "DELETE FROM concurrency_windows
     WHERE item_id IN (SELECT item_id FROM items) AND window < ?1";

/// At most `limit` token passes past their 24 hours (through their index on `expires_at`).
pub fn delete_expired_passes(conn: &Connection, now: i64, limit: i64) -> Result<usize, StoreError> {
    Ok(conn
        .prepare_cached(
            "DELETE FROM token_passes WHERE (product, device_id, user) IN
               (SELECT product, device_id, user FROM token_passes WHERE expires_at <= ?1 LIMIT ?2)",
        )?
        .execute(params![now, limit])?)
}

/// Deletes up to `limit` audit entries from before `before`, oldest first. Returns how many.
pub fn delete_old_audit(conn: &Connection, before: i64, limit: i64) -> Result<usize, StoreError> {
    Ok(conn
        .prepare_cached(
            "DELETE FROM audit_log WHERE id IN
               (SELECT id FROM audit_log WHERE at < ?1 ORDER BY at LIMIT ?2)",
        )?
        .execute(params![before, limit])?)
}

/// Driven by the items, each read by the windows' key (item, window): the table holds 35
/// days of every concurrent item's windows.
const WINDOWS_SINCE: &str = "SELECT w.item_id, w.window, w.peak
     FROM items i CROSS JOIN concurrency_windows w ON w.item_id = i.item_id AND w.window >= ?1";

/// Peak concurrency per item per 3-minute window since window `since`.
pub fn windows_since(conn: &Connection, since: i64) -> Result<Vec<(String, i64, i64)>, StoreError> {
    let mut stmt = conn.prepare_cached(WINDOWS_SINCE)?;
    let rows = stmt.query_map([since], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The audit page's filters: an action's text anywhere (as typed: `_` is no wildcard),
    /// an actor's entries read by their index, a page at a time.
    #[test]
    fn audit_entries_are_filtered_and_an_actors_read_by_its_index() {
        let dir = tempfile::tempdir().unwrap();
        let conn = super::super::open(&dir.path().join("k.db")).unwrap();
        for (at, actor, action) in [
            (1, "olivia", "sign-in"),
            (2, "system", "seat freed"),
            (3, "olivia", "handshake_code created"),
            (4, "cli", "license imported"),
            (5, "olivia", "sign-in"),
        ] {
            audit(&conn, at, actor, action, "", "", "").unwrap();
        }
        let shown = |action, actor, before| -> Vec<i64> {
            let filter = AuditFilter {
                action,
                actor,
                before,
            };
            audit_entries(&conn, &filter, 2)
                .unwrap()
                .entries
                .into_iter()
                .map(|e| e.at)
                .collect()
        };
        assert_eq!(shown(None, None, None), [5, 4]);
        assert_eq!(shown(None, Some("olivia"), None), [5, 3]);
        assert_eq!(shown(None, Some("olivia"), Some(3)), [1]);
        assert_eq!(shown(Some("SIGN"), Some("olivia"), None), [5, 1]);
        assert_eq!(shown(Some("e_c"), None, None), [3]);
        assert_eq!(shown(Some("sign_in"), None, None), Vec::<i64>::new());
        let plan: Vec<String> = conn
            .prepare(
                "EXPLAIN QUERY PLAN SELECT id FROM audit_log WHERE id < ?1 AND actor = ?2
                 AND id >= ?3 AND action LIKE '%x%' ORDER BY id DESC LIMIT ?4",
            )
            .unwrap()
            .query_map(params![i64::MAX, "olivia", 0, 2], |r| r.get(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            plan.iter().any(|p| p.contains("audit_log_by_actor"))
                && !plan.iter().any(|p| p.contains("TEMP B-TREE")),
            "{plan:?}"
        );
    }

    /// The dashboard's windows, and the daily summary's, are read by their key, not by a
    /// scan of every window kept.
    #[test]
    fn the_windows_shown_and_summarised_are_read_by_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let conn = super::super::open(&dir.path().join("k.db")).unwrap();
        for (sql, table) in [
            (WINDOWS_SINCE, "w"),
            (SUMMARISE_WINDOWS, "w"),
            (FORGET_WINDOWS, "concurrency_windows"),
        ] {
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let parameters = stmt.parameter_count();
            let plan: Vec<String> = stmt
                .query_map(rusqlite::params_from_iter(vec![0; parameters]), |r| {
                    r.get(3)
                })
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            let windows = plan
                .iter()
                .find(|p| p.split_whitespace().nth(1) == Some(table))
                .expect("a step on the windows");
            assert!(
                windows.starts_with(&format!("SEARCH {table} USING")),
                "{plan:?}"
            );
        }
    }
}
