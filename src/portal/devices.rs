//! Devices: search (uuid, name or user prefix), keyset pagination, block, unblock, remove.

use actix_web::http::header;
use actix_web::{HttpResponse, web};
use askama::Template;
use serde::Deserialize;

use super::auth::{CsrfForm, ManagerRole, PortalError, Post, Role, Viewer};
use super::{Page, render, render_form};
use crate::licensing::types;
use crate::server::AppState;
use crate::store::{StoreError, devices, ops};

pub const PAGE_SIZE: i64 = 50;

pub struct Line {
    pub uuid: String,
    pub name: String,
    pub user: String,
    pub first_seen: String,
    pub last_seen: String,
    pub blocked: bool,
    pub seats: i64,
}

#[derive(Template)]
#[template(path = "portal/devices.html")]
struct DevicesPage {
    page: Page,
    q: String,
    item: String,
    items: Vec<String>,
    notice: Option<String>,
    error: Option<String>,
    blocked: bool,
    lines: Vec<Line>,
    next: Option<i64>,
    manage: bool,
    /// This page, where a device action comes back to.
    back: String,
}

#[derive(Deserialize, Default)]
pub struct Query {
    #[serde(default)]
    q: String,
    #[serde(default)]
    after: i64,
    #[serde(default)]
    blocked: Option<String>,
    #[serde(default)]
    item: String,
    /// How many devices the last removal of a user's devices removed (a count, not a text:
    /// a link cannot make the page say anything else).
    #[serde(default)]
    removed: Option<usize>,
    /// How many of that user's devices were kept because another user shares them.
    #[serde(default)]
    shared: usize,
}

pub async fn list(
    state: web::Data<AppState>,
    admin: Viewer,
    req: actix_web::HttpRequest,
    query: web::Query<Query>,
) -> Result<HttpResponse, PortalError> {
    show(&state, &admin, back_to(req.uri()), query.into_inner(), None).await
}

/// This page's address for its actions to come back to, without the last removal's counts
/// (blocking a device after removing a user's devices must not say they were removed again).
fn back_to(uri: &actix_web::http::Uri) -> String {
    let kept: Vec<&str> = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|pair| {
            let key = pair.split('=').next().unwrap_or_default();
            !pair.is_empty() && key != "removed" && key != "shared"
        })
        .collect();
    match kept.is_empty() {
        true => uri.path().to_string(),
        false => format!("{}?{}", uri.path(), kept.join("&")),
    }
}

/// The device list for `query`, with a refused form's reason (then answered `400`).
async fn show(
    state: &AppState,
    admin: &super::auth::Session,
    back: String,
    query: Query,
    error: Option<String>,
) -> Result<HttpResponse, PortalError> {
    let q = query.q.trim().to_string();
    // A UUID is searched in its canonical form; anything else as a name or user prefix.
    let key = types::uuid("q", &q).unwrap_or_else(|_| q.clone());
    let blocked = query.blocked.is_some();
    let after = query.after;
    let item = query.item.trim().to_string();
    let filter_item = item.clone();
    let (mut rows, items) = state
        .store
        .read(move |conn| {
            let rows = devices::list_devices(
                conn,
                Some(key.as_str()).filter(|k| !k.is_empty()),
                Some(filter_item.as_str()).filter(|i| !i.is_empty()),
                blocked,
                after,
                PAGE_SIZE + 1,
            )?;
            let items = crate::store::licenses::all_items(conn)?
                .into_iter()
                .filter(|i| !i.withdrawn)
                .map(|i| i.item_id)
                .collect::<Vec<_>>();
            Ok::<_, StoreError>((rows, items))
        })
        .await?;
    let next = (rows.len() as i64 > PAGE_SIZE).then(|| {
        rows.truncate(PAGE_SIZE as usize);
        rows.last().map_or(0, |l| l.device.id)
    });
    let time = super::utc;
    let refused = error.is_some();
    Ok(render_form(
        &DevicesPage {
            manage: super::can_manage(admin),
            back,
            page: Page::of(admin),
            q,
            item,
            items,
            notice: query.removed.map(|n| match query.shared {
                0 => format!("{n} device(s) removed"),
                kept => format!(
                    "{n} device(s) removed; {kept} kept because other users use them too \
                 (remove those from their own pages)"
                ),
            }),
            error,
            blocked,
            next,
            lines: rows
                .into_iter()
                .map(|l| Line {
                    first_seen: time(l.device.first_seen),
                    last_seen: time(l.device.last_seen),
                    uuid: l.device.uuid,
                    name: l.device.name,
                    user: l.device.last_user,
                    blocked: l.device.blocked,
                    seats: l.seats,
                })
                .collect(),
        },
        refused,
    ))
}

#[derive(Deserialize)]
pub struct ActionForm {
    /// Missing is refused like a wrong one (403), not as an unreadable form.
    #[serde(default)]
    csrf: String,
    /// The page the action was taken from (its search, filters and page), to go back to.
    #[serde(default)]
    back: String,
}

impl CsrfForm for ActionForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// `POST /devices/{uuid}/{block|unblock|remove}` (managers and owners).
pub async fn act(
    state: web::Data<AppState>,
    req: actix_web::HttpRequest,
    path: web::Path<(String, String)>,
    post: Post<ManagerRole, ActionForm>,
) -> Result<HttpResponse, PortalError> {
    let (uuid, action) = path.into_inner();
    let uuid = types::uuid("uuid", &uuid).map_err(|e| PortalError::BadForm(e.to_string()))?;
    let (actor, from) = (post.0.name.clone(), super::client_address(&req));
    // Back to the page the admin was on: a devices page of this portal, nothing else, and
    // one a Location header can carry (checked before the change is made).
    let back = Some(post.1.back.as_str())
        .filter(|b| b.starts_with("/devices") && header::HeaderValue::from_str(b).is_ok())
        .unwrap_or("/devices")
        .to_string();
    let now = state.clock.now().unix_timestamp();
    let done = state
        .store
        .write(move |conn| {
            let Some(device) = devices::device_by_uuid(conn, &uuid)? else {
                return Ok(None);
            };
            let what = match action.as_str() {
                "block" => {
                    devices::set_blocked(conn, &uuid, true)?;
                    "device blocked"
                }
                "unblock" => {
                    devices::set_blocked(conn, &uuid, false)?;
                    "device unblocked"
                }
                "remove" => {
                    devices::remove_device(conn, device.id, now)?;
                    "device removed"
                }
                _ => return Ok(Some(false)),
            };
            ops::audit(conn, now, &actor, what, &uuid, "", &from)?;
            Ok::<_, StoreError>(Some(true))
        })
        .await?;
    match done {
        Some(true) => Ok(HttpResponse::SeeOther()
            .insert_header((header::LOCATION, back))
            .finish()),
        Some(false) => Err(PortalError::BadForm("unknown action".into())),
        None => Err(PortalError::NotFound("No such device.")),
    }
}

pub struct SeatView {
    pub item: String,
    pub instance: String,
    pub first: String,
    pub last: String,
    pub withdrawn: bool,
}

/// Seats and leases a device's page shows at most (a terminal server's device holds a lease
/// per user); it says how many there are in all.
const SHOWN: i64 = 200;

#[derive(Template)]
#[template(path = "portal/device.html")]
struct DevicePage {
    page: Page,
    manage: bool,
    device: devices::Device,
    first_seen: String,
    last_seen: String,
    seats: Vec<SeatView>,
    /// Each lease with its expiry and its state.
    leases: Vec<(devices::Lease, String, &'static str)>,
    /// How many seats and leases the device holds in all.
    all_seats: i64,
    all_leases: i64,
    usage: Vec<(String, String, i64)>,
}

/// `GET /devices/{uuid}`: first and last seen, seats, leases, usage totals.
pub async fn detail(
    state: web::Data<AppState>,
    admin: Viewer,
    path: web::Path<String>,
) -> Result<HttpResponse, PortalError> {
    let Ok(uuid) = types::uuid("uuid", &path.into_inner()) else {
        return Ok(super::message_page(
            actix_web::http::StatusCode::NOT_FOUND,
            "No such device.",
        ));
    };
    let now = state.clock.now().unix_timestamp();
    let found = state
        .store
        .read(move |conn| {
            let Some(device) = devices::device_by_uuid(conn, &uuid)? else {
                return Ok(None);
            };
            let seats = devices::seats_of(conn, device.id, SHOWN)?;
            let leases = devices::leases_of(conn, device.id, SHOWN)?;
            let usage = devices::device_usage(conn, device.id)?;
            Ok::<_, StoreError>(Some((device, seats, leases, usage)))
        })
        .await?;
    let Some((device, (seats, all_seats), (leases, all_leases), usage)) = found else {
        return Ok(super::message_page(
            actix_web::http::StatusCode::NOT_FOUND,
            "No such device.",
        ));
    };
    let time = super::utc;
    Ok(render(&DevicePage {
        manage: super::can_manage(&admin),
        page: Page::of(&admin),
        first_seen: time(device.first_seen),
        last_seen: time(device.last_seen),
        seats: seats
            .into_iter()
            .map(|seat| SeatView {
                first: time(seat.first_auth_at),
                last: time(seat.last_used_at),
                item: seat.item_id,
                instance: seat.instance,
                withdrawn: seat.withdrawn,
            })
            .collect(),
        all_seats,
        all_leases,
        leases: leases
            .into_iter()
            .map(|l| {
                // Expired as a usage call finds it.
                let state = if l.revoked {
                    "revoked"
                } else if l.released {
                    "released"
                } else if l.lapsed(now) {
                    "expired"
                } else {
                    "active"
                };
                let until = time(l.expires_at);
                (l, until, state)
            })
            .collect(),
        usage,
        device,
    }))
}

#[derive(Deserialize)]
pub struct UserForm {
    #[serde(default)]
    csrf: String,
    user: String,
}

impl CsrfForm for UserForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// Devices removed per transaction by "remove the devices of a user": a user of thousands
/// of devices does not hold the writer (and every device's call) for seconds.
const REMOVE_BATCH: i64 = 500;

/// `POST /devices/remove-user`: removes every device whose last user is the given one
/// (someone who left) and no other user holds a live lease on: their seats are freed and
/// leases revoked. Shared devices are kept and counted (the admin removes them one by one).
pub async fn remove_user(
    state: web::Data<AppState>,
    req: actix_web::HttpRequest,
    Post(admin, form): Post<ManagerRole, UserForm>,
) -> Result<HttpResponse, PortalError> {
    let user = form.user.trim().to_string();
    if user.is_empty() {
        let error = "Name the user whose devices to remove; nothing was removed.";
        return show(
            &state,
            &admin,
            "/devices".into(),
            Query::default(),
            Some(error.into()),
        )
        .await;
    }
    let from = super::client_address(&req);
    let (mut removed, mut shared, mut after) = (0, 0, 0);
    loop {
        let (session, now, from, user) = (
            admin.clone(),
            state.clock.now().unix_timestamp(),
            from.clone(),
            user.clone(),
        );
        let batch = state
            .store
            .write(move |conn| {
                // Each batch as the admin is now: demoted or signed out meanwhile, it stops.
                if !session.still_holds(conn, Role::Manager)? {
                    return Ok(None);
                }
                let batch = devices::devices_of_user(conn, &user, after, REMOVE_BATCH, now)?;
                let detail = format!("one of the devices of user {user}");
                for (id, uuid) in &batch.own {
                    devices::remove_device(conn, *id, now)?;
                    ops::audit(
                        conn,
                        now,
                        &session.name,
                        "device removed",
                        uuid,
                        &detail,
                        &from,
                    )?;
                }
                Ok::<_, StoreError>(Some(batch))
            })
            .await?;
        let Some(batch) = batch else {
            return Err(PortalError::BadForm(format!(
                "{}: {removed} device(s) were removed before it changed",
                Role::NO_LONGER
            )));
        };
        removed += batch.own.len();
        shared += batch.shared;
        match batch.last_id {
            Some(last) => after = last,
            None => break,
        }
    }
    Ok(HttpResponse::SeeOther()
        .insert_header((
            header::LOCATION,
            format!("/devices?removed={removed}&shared={shared}"),
        ))
        .finish())
}
