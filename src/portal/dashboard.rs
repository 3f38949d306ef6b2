//! The dashboard: every license item with its model, quota, use, state and expiry, usage
//! over the last 30 days as server-side SVG, and the appliance's identity and health.

use actix_web::{HttpResponse, web};
use askama::Template;
use keygate_sdk::wire::{AuthorizationState, Model};

use super::auth::{PortalError, Viewer};
use super::{Page, render};
use crate::licensing::models::{self, DAY, Refusal, WINDOW_SECS};
use crate::licensing::{from_unix, rfc3339};
use crate::server::AppState;
use crate::store::{self, StoreError, ops, settings};

/// One bar of a chart, its geometry computed here so the template only places it.
pub struct Bar {
    pub x: i64,
    pub y: i64,
    pub height: i64,
    pub title: String,
}

pub struct Chart {
    pub caption: String,
    pub bars: Vec<Bar>,
    pub max: i64,
}

const CHART_DAYS: i64 = 30;
const BAR_WIDTH: i64 = 10;
pub const CHART_HEIGHT: i64 = 60;

/// A chart of `count` values, one per `step` seconds, the last one at `last`.
fn chart(
    caption: String,
    values: &[(i64, i64)],
    last: i64,
    step: i64,
    count: i64,
    bar: i64,
) -> Chart {
    let max = values.iter().map(|(_, v)| *v).max().unwrap_or(0).max(1);
    let bars = (0..count)
        .map(|i| {
            let at = last - (count - 1 - i) * step;
            let value = values.iter().find(|(d, _)| *d == at).map_or(0, |(_, v)| *v);
            let height = (i128::from(value) * i128::from(CHART_HEIGHT) / i128::from(max)) as i64;
            let when = rfc3339(from_unix(at)).replace('T', " ");
            Bar {
                x: i * bar,
                y: CHART_HEIGHT - height,
                height,
                title: format!(
                    "{} UTC: {value}",
                    if step == DAY {
                        &when[..10]
                    } else {
                        &when[..16]
                    }
                ),
            }
        })
        .collect();
    Chart { caption, bars, max }
}

/// Windows of concurrency shown: the last 4 hours.
const WINDOWS_SHOWN: i64 = 80;

pub struct ItemView {
    pub item_id: String,
    pub license_id: String,
    pub product: String,
    pub model: Model,
    /// Seats, devices per window, usage or tokens, as the model counts.
    pub quota: i64,
    pub figures: Figures,
    pub expires: String,
    pub chart: Chart,
    /// Concurrent models: devices per 3-minute window.
    pub windows: Option<Chart>,
}

#[derive(Template)]
#[template(path = "portal/dashboard.html")]
struct Dashboard {
    page: Page,
    items: Vec<ItemView>,
    installation_id: String,
    version: &'static str,
    uptime: String,
    last_backup: String,
    chart_width: i64,
    chart_height: i64,
    /// The clock is set back behind the newest time used: devices are refused.
    clock_behind: Option<String>,
}

/// An item's use as its model counts it, for the dashboard and the item's page.
pub struct Figures {
    /// What counts against the quota: seats, devices active now, metered usage or tokens
    /// spent.
    pub used: i64,
    pub used_label: &'static str,
    pub state: &'static str,
    pub state_class: &'static str,
    /// Concurrent models: windows over quota so far, and the `max_exceptions` that stops
    /// the item.
    pub exceptions: Option<(i64, i64)>,
    /// Concurrent models: the devices active in the last whole window (just after a window
    /// starts, few devices have called in it yet: they call every 3 minutes).
    pub last_window: Option<i64>,
    /// Tokens: the balance (below zero in grace), and when the grace ends.
    pub balance: Option<i64>,
    pub grace_ends: Option<String>,
}

impl Figures {
    /// `last_window`: what [`load_now`] gave for the item.
    pub fn of(item: &store::licenses::ItemRow, now: i64, last_window: Option<i64>) -> Figures {
        let (terms, u) = (&item.terms, &item.used);
        let (used, used_label) = match terms.model {
            Model::PerUsage => (u.usage_total, "metered usage"),
            Model::Tokens => (u.tokens_used, "tokens spent"),
            m if m.is_concurrent() => (u.window_active, "devices active in this 3-minute window"),
            _ => (u.seats_used, "devices with a seat"),
        };
        let state = state_label(item, now);
        let tokens = terms.model == Model::Tokens;
        Figures {
            used,
            used_label,
            state,
            state_class: if state == "not started" {
                "not-started"
            } else {
                state
            },
            exceptions: terms
                .model
                .is_concurrent()
                .then_some((u.exceptions, terms.max_exceptions)),
            last_window,
            balance: tokens.then(|| models::tokens_balance(terms, u)),
            grace_ends: models::grace_ends_at(terms, u)
                .filter(|_| tokens)
                .map(super::utc),
        }
    }
}

/// An item's use now, as its stored counts do not keep it: a concurrent item's devices
/// active in the current window (which a release lowers at once), and a seat item's seats
/// less those that lapsed and wait to be freed. Returns a concurrent item's devices active
/// in the last whole window.
pub fn load_now(
    conn: &rusqlite::Connection,
    item: &mut store::licenses::ItemRow,
    now: i64,
) -> Result<Option<i64>, StoreError> {
    let lapsed = crate::licensing::authorize::lapsed_count(conn, item, now)?;
    item.used.seats_used = item.used.seats_used.saturating_sub(lapsed).max(0);
    if !item.terms.model.is_concurrent() {
        return Ok(None);
    }
    let window = models::window_of(now);
    item.used.window_active = store::devices::window_active(conn, &item.item_id, window)?;
    Ok(Some(store::devices::window_active(
        conn,
        &item.item_id,
        window - 1,
    )?))
}

fn state_label(item: &store::licenses::ItemRow, now: i64) -> &'static str {
    match models::availability(&item.terms, &item.used, now) {
        Err(Refusal::NotStarted) => "not started",
        Err(Refusal::Expired) => "expired",
        Err(Refusal::QuotaExceeded) => "stopped",
        // Known devices go on, new ones are refused (QUOTA_EXCEEDED).
        Ok(())
            if matches!(
                item.terms.model,
                Model::PerDevice | Model::PerActiveDevice | Model::Standalone
            ) && !models::has_room(&item.terms, &item.used) =>
        {
            "full"
        }
        Ok(()) => match models::state(&item.terms, &item.used) {
            AuthorizationState::Ok => "ok",
            AuthorizationState::Tolerance => "tolerance",
            AuthorizationState::Grace => "grace",
        },
    }
}

pub async fn page(state: web::Data<AppState>, admin: Viewer) -> Result<HttpResponse, PortalError> {
    let now = state.clock.now().unix_timestamp();
    let today = models::day_of(now);
    let since = today - (CHART_DAYS - 1) * DAY;
    let current_window = models::window_of(now);
    let (items, usage, peaks, windows, last_backup) = state
        .store
        .read(move |conn| {
            // Use now (`load_now`): a concurrent item's devices active in this window, which
            // a release or a removal lowers (its `peak`, charted, stays); seats less lapsed ones.
            let mut items = Vec::new();
            for mut item in store::licenses::all_items(conn)? {
                let last_window = load_now(conn, &mut item, now)?;
                items.push((item, last_window));
            }
            Ok::<_, StoreError>((
                items,
                ops::usage_by_day(conn, since)?,
                ops::peaks_by_day(conn, since, WINDOW_SECS)?,
                ops::windows_since(conn, current_window - WINDOWS_SHOWN + 1)?,
                settings::get(conn, crate::jobs::LAST_BACKUP)?.and_then(|t| t.parse::<i64>().ok()),
            ))
        })
        .await?;
    let series = |rows: &[(String, i64, i64)], item: &str| -> Vec<(i64, i64)> {
        rows.iter()
            .filter(|(i, _, _)| i == item)
            .map(|(_, d, v)| (*d, *v))
            .collect()
    };
    let items = items
        .into_iter()
        .filter(|(i, _)| !i.withdrawn)
        .map(|(item, last_window)| {
            let (caption, values) = if item.terms.model.is_concurrent() {
                (
                    "peak devices per day, last 30 days",
                    series(&peaks, &item.item_id),
                )
            } else {
                ("usage per day, last 30 days", series(&usage, &item.item_id))
            };
            let windows = item.terms.model.is_concurrent().then(|| {
                let values: Vec<(i64, i64)> = series(&windows, &item.item_id)
                    .into_iter()
                    .map(|(w, v)| (w * WINDOW_SECS, v))
                    .collect();
                chart(
                    "devices per 3-minute window, last 4 hours".into(),
                    &values,
                    current_window * WINDOW_SECS,
                    WINDOW_SECS,
                    WINDOWS_SHOWN,
                    4,
                )
            });
            ItemView {
                figures: Figures::of(&item, now, last_window),
                chart: chart(
                    caption.to_string(),
                    &values,
                    today,
                    DAY,
                    CHART_DAYS,
                    BAR_WIDTH,
                ),
                windows,
                expires: super::utc(item.terms.expires_at),
                quota: item.terms.quota,
                model: item.terms.model,
                product: item.product,
                license_id: item.license_id,
                item_id: item.item_id,
            }
        })
        .collect();
    let up = state.uptime_s(now);
    Ok(render(&Dashboard {
        page: Page::of(&admin),
        items,
        installation_id: state.appliance.installation_id().to_string(),
        version: env!("CARGO_PKG_VERSION"),
        uptime: format!("{}d {}h {}m", up / DAY, up % DAY / 3600, up % 3600 / 60),
        last_backup: last_backup.map_or("none yet".into(), super::utc),
        chart_width: CHART_DAYS * BAR_WIDTH,
        chart_height: CHART_HEIGHT,
        clock_behind: state.watermark.check(now).err().map(|e| e.to_string()),
    }))
}
