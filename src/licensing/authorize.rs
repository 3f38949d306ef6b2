//! `authorize`: resolve the handshake, check password and validation fields, pick the item
//! and seat under the item's model, and record the lease. One transaction; a refusal
//! changes nothing (the writer rolls the request's savepoint back).

use keygate_sdk::wire::{
    Authorization, AuthorizationState, ErrorCode, FORMAT_VERSION, GrantedItem, Model,
};
use rusqlite::Connection;

use super::handshake::{PasswordCache, domain_allowed, process_allowed};
use super::models::{
    self, Consumption, DAY, PASS_SECS, Refusal, TRIAL_DAYS, availability, has_room, window_of,
};
use super::types::Authorize;
use super::{from_unix, rfc3339};
use crate::error::ApiError;
use crate::store::StoreError;
use crate::store::catalogue::{self, Catalogue};
use crate::store::devices::{self, Lease};
use crate::store::licenses::{HandshakeCode, ItemRow};
use crate::store::ops;

#[derive(Debug)]
pub enum AuthorizeError {
    Refused(ApiError),
    /// The handshake code has a session password not yet verified against this hash: the
    /// caller verifies it off the writer thread, remembers it, and asks again.
    CheckPassword {
        handshake_id: i64,
        hash: String,
    },
}

impl From<StoreError> for AuthorizeError {
    fn from(e: StoreError) -> Self {
        AuthorizeError::Refused(e.into())
    }
}

impl From<ApiError> for AuthorizeError {
    fn from(e: ApiError) -> Self {
        AuthorizeError::Refused(e)
    }
}

/// What the appliance signs and returns.
#[derive(Debug, Clone)]
pub struct Grant {
    pub authorization: Authorization,
    pub license_jws: String,
}

pub fn refusal(r: Refusal, item: &ItemRow) -> ApiError {
    let id = &item.item_id;
    match r {
        Refusal::NotStarted => ApiError::new(
            ErrorCode::LicenseNotStarted,
            format!(
                "item {id} starts at {}",
                rfc3339(from_unix(item.terms.starts_at))
            ),
        ),
        Refusal::Expired => ApiError::new(
            ErrorCode::LicenseExpired,
            format!(
                "item {id} expired at {}",
                rfc3339(from_unix(item.terms.expires_at))
            ),
        ),
        Refusal::QuotaExceeded => ApiError::new(
            ErrorCode::QuotaExceeded,
            match item.terms.model {
                Model::PerUsage => format!(
                    "item {id} has used more than 105 % of its quota of {}; usage is still recorded",
                    item.terms.quota
                ),
                Model::ConcurrentDevice | Model::ConcurrentInstance => format!(
                    "item {id} reached its {} allowed windows over quota and has stopped",
                    item.terms.max_exceptions
                ),
                Model::Tokens => format!("item {id} is out of tokens and its grace period is over"),
                Model::PerDevice | Model::PerActiveDevice | Model::Standalone => format!(
                    "item {id} has no room for another device ({} of {} seats in use)",
                    item.used.seats_used, item.terms.quota
                ),
            },
        ),
    }
}

pub fn authorize(
    conn: &Connection,
    catalogue: &Catalogue,
    req: &Authorize,
    now: i64,
    installation_id: &str,
    passwords: &PasswordCache,
) -> Result<Grant, AuthorizeError> {
    let device = devices::device_by_uuid(conn, &req.device_uuid)?;
    if device.as_ref().is_some_and(|d| d.blocked) {
        return Err(ApiError::new(
            ErrorCode::DeviceBlocked,
            "an administrator blocked this device",
        )
        .into());
    }
    let handshake = match (&req.organization_id, &req.handshake_code) {
        (None, None) => {
            return trial(conn, catalogue, req, device.is_some(), now, installation_id);
        }
        (Some(org), None) => catalogue.default_handshake(org).ok_or_else(|| {
            ApiError::new(
                ErrorCode::HandshakeNotFound,
                format!("organization {org} has no license on this appliance"),
            )
        })?,
        (org, Some(code)) => catalogue
            .handshake_by_code(code)
            .filter(|h| org.as_ref().is_none_or(|o| *o == h.organization_id))
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::HandshakeNotFound,
                    match org {
                        Some(org) => {
                            format!("handshake code {code} does not exist for organization {org}")
                        }
                        None => format!("handshake code {code} does not exist"),
                    },
                )
            })?,
    };
    check_handshake(handshake, req, passwords)?;

    // Tokens of a top-up started since its import pay the debts before a pass is sold.
    if catalogue
        .items_for(handshake.id, &req.product)
        .any(|i| i.terms.model == Model::Tokens)
    {
        super::import::settle_started(conn, now)?;
    }
    let mut items = catalogue
        .items_for(handshake.id, &req.product)
        .map(|item| catalogue::live(conn, item))
        .collect::<Result<Vec<_>, _>>()?;
    if items.is_empty() {
        return Err(ApiError::new(
            ErrorCode::NoLicense,
            format!(
                "no license for product {:?} on handshake code {}",
                req.product, handshake.code
            ),
        )
        .into());
    }
    let token_user = req.user.clone().unwrap_or_else(|| req.device_uuid.clone());
    let seat = SeatKey {
        product: &req.product,
        instance: req.instance.as_deref().unwrap_or(""),
        token_user: &token_user,
    };

    let item = match choose(conn, &mut items, device.as_ref().map(|d| d.id), &seat, now)? {
        Ok(i) => &items[i],
        Err(refused) => return Err(refused.into()),
    };

    let device_id = match &device {
        Some(d) => {
            // The lease written below records the time; the device row changes only when
            // the device reports a new name or user.
            let changed = |new: Option<&str>, old: &str| new.is_some_and(|n| n != old);
            if changed(req.name.as_deref(), &d.name) || changed(req.user.as_deref(), &d.last_user) {
                devices::touch_device(conn, d.id, req.name.as_deref(), req.user.as_deref(), now)?;
            }
            d.id
        }
        None => devices::insert_device(
            conn,
            &req.device_uuid,
            req.name.as_deref().unwrap_or(""),
            req.user.as_deref().unwrap_or(""),
            now,
        )?,
    };
    let previous = devices::lease_for(
        conn,
        device_id,
        &req.product,
        seat.instance,
        req.user.as_deref().unwrap_or(""),
    )?;
    let lease_id = match &previous {
        Some(lease) => lease.lease_id.clone(),
        None => {
            if !devices::make_room_for_lease(conn, device_id, &req.product, now)? {
                return Err(AuthorizeError::Refused(ApiError::new(
                    ErrorCode::QuotaExceeded,
                    format!(
                        "this device holds {} unexpired authorizations of {} (one per instance \
                         and user it names); release some or wait until they expire",
                        devices::LIVE_LEASES_PER_PRODUCT,
                        req.product
                    ),
                )));
            }
            uuid::Uuid::now_v7().to_string()
        }
    };
    // After the lease room above: it may drop a concurrent_instance seat this takes again.
    let used = occupy(conn, item, device_id, &seat, now).map_err(|e| match e {
        Occupy::Refused(r) => AuthorizeError::Refused(refusal(r, item)),
        Occupy::Store(e) => e.into(),
    })?;
    let state = models::state(&item.terms, &used);
    let lease = Lease {
        lease_id,
        device_id,
        product: req.product.clone(),
        instance: seat.instance.to_string(),
        user: req.user.clone().unwrap_or_default(),
        handshake_id: Some(handshake.id),
        item_id: Some(item.item_id.clone()),
        nonce: req.nonce.clone(),
        issued_at: now,
        expires_at: expiry(item, now),
        released: false,
        revoked: false,
    };
    devices::upsert_lease(conn, &lease)?;
    // The lease moved to another item (authorized through another handshake code, or its
    // item stopped serving): the seat it held there is left, as a renewal that moves does
    // (`leave_seat` keeps the seats only removal or lapse frees).
    if let Some(previous) = &previous
        && let Some(old) = previous
            .item_id
            .as_deref()
            .filter(|old| *old != item.item_id)
        && let Some(terms) = catalogue.item(old)
    {
        leave_seat(conn, previous, old, terms.terms.model, now)?;
    }
    Ok(Grant {
        license_jws: catalogue
            .license_jws(item)
            .ok_or(StoreError::Missing("the license of an item"))?
            .to_string(),
        authorization: authorization_for(
            &lease,
            &req.device_uuid,
            (handshake.organization_id.clone(), handshake.code.clone()),
            installation_id,
            now,
            vec![granted(item)],
            state,
        ),
    })
}

/// The authorization a lease gives at `now` (the caller signs it): authorize, the trial and
/// every renewal build it here.
pub fn authorization_for(
    lease: &Lease,
    device_uuid: &str,
    (organization_id, handshake_code): (String, String),
    installation_id: &str,
    now: i64,
    items: Vec<GrantedItem>,
    state: AuthorizationState,
) -> Authorization {
    Authorization {
        v: FORMAT_VERSION,
        lease_id: lease.lease_id.clone(),
        installation_id: installation_id.to_string(),
        organization_id,
        handshake_code,
        product: lease.product.clone(),
        device_uuid: device_uuid.to_string(),
        instance: Some(lease.instance.clone()).filter(|i| !i.is_empty()),
        user: Some(lease.user.clone()).filter(|u| !u.is_empty()),
        items,
        issued_at: from_unix(now),
        expires_at: from_unix(lease.expires_at),
        nonce: lease.nonce.clone(),
        state,
    }
}

fn check_handshake(
    handshake: &HandshakeCode,
    req: &Authorize,
    passwords: &PasswordCache,
) -> Result<(), AuthorizeError> {
    if let Some(hash) = &handshake.password_hash {
        let Some(password) = &req.session_password else {
            return Err(ApiError::new(
                ErrorCode::SessionPasswordMismatch,
                format!(
                    "handshake code {} needs its session password",
                    handshake.code
                ),
            )
            .into());
        };
        if !passwords.is_verified(handshake.id, hash, password) {
            return Err(AuthorizeError::CheckPassword {
                handshake_id: handshake.id,
                hash: hash.clone(),
            });
        }
    }
    if !domain_allowed(&handshake.allowed_domains, req.domain.as_deref()) {
        return Err(ApiError::new(
            ErrorCode::ValidationFailed,
            "this device's domain is not allowed for this handshake code",
        )
        .into());
    }
    if !process_allowed(&handshake.allowed_processes, req.process.as_deref()) {
        return Err(ApiError::new(
            ErrorCode::ValidationFailed,
            "this process is not allowed for this handshake code",
        )
        .into());
    }
    Ok(())
}

/// The public trial: a 7-day authorization with no items for a device that never
/// authorized, when the admin turned it on. A license of the product's vendor travels with
/// it as proof that the vendor licensed this appliance's key.
fn trial(
    conn: &Connection,
    catalogue: &Catalogue,
    req: &Authorize,
    known_device: bool,
    now: i64,
    installation_id: &str,
) -> Result<Grant, AuthorizeError> {
    if !catalogue.public_trial() || known_device {
        return Err(ApiError::new(
            ErrorCode::HandshakeRequired,
            "give a handshake code or an organization id",
        )
        .into());
    }
    let license_jws = catalogue
        .trial_license_jws(&req.product)
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::NoLicense,
                "no license is imported on this appliance",
            )
        })?
        .to_string();
    let device_id = devices::insert_device(
        conn,
        &req.device_uuid,
        req.name.as_deref().unwrap_or(""),
        req.user.as_deref().unwrap_or(""),
        now,
    )?;
    let lease = Lease {
        lease_id: uuid::Uuid::now_v7().to_string(),
        device_id,
        product: req.product.clone(),
        instance: req.instance.clone().unwrap_or_default(),
        user: req.user.clone().unwrap_or_default(),
        handshake_id: None,
        item_id: None,
        nonce: req.nonce.clone(),
        issued_at: now,
        expires_at: now + TRIAL_DAYS * DAY,
        released: false,
        revoked: false,
    };
    devices::upsert_lease(conn, &lease)?;
    Ok(Grant {
        license_jws,
        authorization: authorization_for(
            &lease,
            &req.device_uuid,
            Default::default(),
            installation_id,
            now,
            vec![],
            AuthorizationState::Ok,
        ),
    })
}

/// Chooses the item (an index into `items`, those serving the product on the handshake
/// code, soonest expiry first) for a device: a known device keeps the seat (or the pass) it
/// has while its item serves (a concurrent one: while its window has room for it, else
/// after the items under their quota, `window_has_room`); otherwise the first item under
/// its quota, once its lapsed seats are freed (its consumption is kept up to date for
/// `occupy`), then the first with room in its tolerance; for tokens with no balance left
/// anywhere, the first serving item, into the code's grace while it lasts. Otherwise the
/// most relevant refusal.
pub fn choose(
    conn: &Connection,
    items: &mut [ItemRow],
    device_id: Option<i64>,
    seat: &SeatKey<'_>,
    now: i64,
) -> Result<Result<usize, ApiError>, StoreError> {
    let mut refusals = Vec::new();
    // A concurrent item the device holds a seat in but whose window is full: an item under
    // its quota takes the device first, else it stays.
    let mut held = None;
    if let Some(device_id) = device_id {
        for (i, item) in items.iter().enumerate() {
            if holds(conn, item, device_id, seat, now)? {
                match availability(&item.terms, &item.used, now) {
                    Ok(())
                        if items.len() == 1
                            || window_has_room(conn, item, device_id, seat, now)? =>
                    {
                        return Ok(Ok(i));
                    }
                    Ok(()) => held = held.or(Some(i)),
                    Err(r) => refusals.push((r, i)),
                }
            }
        }
    }
    let mut open = Vec::with_capacity(items.len());
    for (i, item) in items.iter_mut().enumerate() {
        if let Err(r) = availability(&item.terms, &item.used, now) {
            refusals.push((r, i));
            continue;
        }
        item.used.seats_used -= free_lapsed(conn, item, now, FREE_PER_REQUEST)? as i64;
        open.push(i);
    }
    // The quotas the customer paid for come first: tolerance is room only once every item
    // is at its quota, so a top-up's seats are taken before the first item goes over. A
    // concurrent item's use is its devices active now: those of this window or the last.
    if open.len() > 1 {
        for &i in &open {
            let item = &mut items[i];
            if item.terms.model.is_concurrent() {
                let window = models::window_of(now);
                item.used.window_active = devices::window_active(conn, &item.item_id, window)?
                    .max(devices::window_active(conn, &item.item_id, window - 1)?);
            }
            if models::under_quota(&item.terms, &item.used) {
                return Ok(Ok(i));
            }
        }
    }
    if let Some(i) = held {
        return Ok(Ok(i));
    }
    for i in open {
        if has_room(&items[i].terms, &items[i].used) {
            return Ok(Ok(i));
        }
        refusals.push((Refusal::QuotaExceeded, i));
    }
    // Tokens with no balance left anywhere: the first serving item is overdrawn, into the
    // grace of the product's tokens on this code, counted from when the first of its items
    // went below zero: a second item, or a top-up smaller than the debt, opens no new grace.
    let overdrawable: Vec<usize> = (0..items.len())
        .filter(|&i| {
            let item = &items[i];
            item.terms.model == Model::Tokens && availability(&item.terms, &item.used, now).is_ok()
        })
        .collect();
    if let Some(&first) = overdrawable.first() {
        let (code, product) = (items[first].handshake_id, &items[first].product);
        let from = devices::tokens_grace_start(conn, code, product, now)?;
        for i in overdrawable {
            // Nothing below zero yet: the request that crosses into grace succeeds.
            if from.is_none_or(|from| now < models::grace_end(&items[i].terms, from)) {
                return Ok(Ok(i));
            }
            refusals.push((Refusal::QuotaExceeded, i));
        }
    }
    let reason = models::most_relevant(refusals.iter().map(|(r, _)| *r))
        .expect("every item was refused for a reason");
    let (_, i) = refusals
        .iter()
        .find(|(r, _)| *r == reason)
        .expect("present");
    Ok(Err(refusal(reason, &items[*i])))
}

/// Whether a device holding a seat in `item` keeps it this window: always but in a
/// concurrent item whose current window is full without the device. There, when its code
/// serves the product with other items too, one under its quota takes the device first
/// (`choose`), so that a top-up's quota is used before an item goes over: the devices a
/// first item knows would otherwise make its windows exceptions until it stopped. The
/// device's other leases on the seat (other instances or users) find the same full window
/// and follow it in the same window.
pub fn window_has_room(
    conn: &Connection,
    item: &ItemRow,
    device_id: i64,
    key: &SeatKey<'_>,
    now: i64,
) -> Result<bool, StoreError> {
    let model = item.terms.model;
    if !model.is_concurrent() {
        return Ok(true);
    }
    let window = window_of(now);
    let id = &item.item_id;
    Ok(
        devices::in_window(conn, id, device_id, key.instance_for(model), window)?
            || devices::window_active(conn, id, window)? < item.terms.quota,
    )
}

/// What identifies a device's place in an item besides the device.
pub struct SeatKey<'a> {
    pub product: &'a str,
    /// The device's instance; it counts separately only for concurrent_instance.
    pub instance: &'a str,
    /// Tokens: whose pass (the user, or the device when no user is given).
    pub token_user: &'a str,
}

impl SeatKey<'_> {
    fn pass(&self, device_id: i64) -> devices::PassKey<'_> {
        devices::PassKey {
            product: self.product,
            device_id,
            user: self.token_user,
        }
    }

    fn instance_for(&self, model: Model) -> &str {
        models::seat_instance(model, self.instance)
    }
}

/// Whether the device holds a valid token pass for the key's product and user, whichever
/// item sold it: a pass is per (user, device, product), as the specification has it.
pub fn has_pass(
    conn: &Connection,
    device_id: i64,
    key: &SeatKey<'_>,
    now: i64,
) -> Result<bool, StoreError> {
    Ok(devices::pass(conn, key.pass(device_id))?.is_some_and(|p| p.expires_at > now))
}

/// Whether the device holds a live seat (tokens: a valid pass) in the item.
fn holds(
    conn: &Connection,
    item: &ItemRow,
    device_id: i64,
    key: &SeatKey<'_>,
    now: i64,
) -> Result<bool, StoreError> {
    let model = item.terms.model;
    if model == Model::Tokens {
        return Ok(devices::pass(conn, key.pass(device_id))?
            .is_some_and(|p| p.item_id == item.item_id && p.expires_at > now));
    }
    Ok(
        devices::seat(conn, &item.item_id, device_id, key.instance_for(model))?
            .is_some_and(|s| !models::seat_lapsed(model, s.first_auth_at, s.last_used_at, now)),
    )
}

/// The lease no longer uses its device's seat in `item_id` (released, or moved to another
/// item): the seat is freed, out of the current window for concurrent items, unless another
/// live lease of the device still uses it (leases are per device, product, instance and
/// user; seats per device, or per instance for concurrent_instance). per_device and
/// per_active_device seats stay: only the device's removal or their lapse frees them.
pub fn leave_seat(
    conn: &Connection,
    lease: &Lease,
    item_id: &str,
    model: Model,
    now: i64,
) -> Result<(), StoreError> {
    if matches!(model, Model::PerDevice | Model::PerActiveDevice) {
        return Ok(());
    }
    let instance = (model == Model::ConcurrentInstance).then_some(lease.instance.as_str());
    if devices::other_live_lease(
        conn,
        lease.device_id,
        &lease.lease_id,
        item_id,
        instance,
        now,
    )? {
        return Ok(());
    }
    let instance = instance.unwrap_or("");
    if model.is_concurrent() {
        devices::unmark_window(conn, item_id, lease.device_id, instance, window_of(now))?;
    }
    devices::delete_seat(conn, item_id, lease.device_id, instance)?;
    Ok(())
}

/// Seats a protocol request frees at most: one is enough to make room, and a request must
/// not carry the freeing of a whole fleet whose seats lapsed on the same day (the daily
/// housekeeping frees the rest, a batch per transaction).
pub const FREE_PER_REQUEST: i64 = 100;

/// When a model's seats lapse: the cutoff (a seat used last, or for per_active_device first
/// authorized, at or before it has lapsed), whether it goes by the first authorization, and
/// why, for the audit log.
fn lapse_rule(model: Model, now: i64) -> Option<(i64, bool, &'static str)> {
    match model {
        Model::PerDevice => Some((
            now - models::INACTIVE_SEAT_DAYS * DAY,
            false,
            "unused for 365 days",
        )),
        Model::PerActiveDevice => Some((
            now - models::ACTIVE_SEAT_DAYS * DAY,
            true,
            "90 days after its first authorization",
        )),
        _ => None,
    }
}

/// Frees a lapsed seat, in the audit log.
fn free_seat(
    conn: &Connection,
    seat: &ops::LapsedSeat,
    why: &str,
    now: i64,
) -> Result<(), StoreError> {
    devices::delete_seat(conn, &seat.item_id, seat.device_id, &seat.instance)?;
    let target = format!("{} on {}", seat.device_uuid, seat.item_id);
    ops::audit(conn, now, "system", "seat freed", &target, why, "")
}

/// Frees up to `limit` of the item's lapsed seats (per_device unused 365 days,
/// per_active_device 90 days after the first authorization), each in the audit log, and
/// returns how many. Serves a new device needing room, a known device over quota and the
/// daily housekeeping alike; the seats are found through their (item, time) index.
pub fn free_lapsed(
    conn: &Connection,
    item: &ItemRow,
    now: i64,
    limit: i64,
) -> Result<usize, StoreError> {
    let Some((cutoff, by_first_auth, why)) = lapse_rule(item.terms.model, now) else {
        return Ok(0);
    };
    let lapsed = ops::lapsed_seats(conn, &item.item_id, cutoff, by_first_auth, limit)?;
    for seat in &lapsed {
        free_seat(conn, seat, why, now)?;
    }
    Ok(lapsed.len())
}

/// How many of an item's seats lapsed and are not freed yet (the next authorization, or the
/// alerts job, frees them): they no longer count against the quota.
pub fn lapsed_count(conn: &Connection, item: &ItemRow, now: i64) -> Result<i64, StoreError> {
    match lapse_rule(item.terms.model, now) {
        Some((cutoff, by_first_auth, _)) => {
            ops::lapsed_count(conn, &item.item_id, cutoff, by_first_auth)
        }
        None => Ok(0),
    }
}

pub enum Occupy {
    Refused(Refusal),
    Store(StoreError),
}

impl From<StoreError> for Occupy {
    fn from(e: StoreError) -> Self {
        Occupy::Store(e)
    }
}

/// Makes sure the device holds its place in the item now: keeps a live seat or takes a new
/// one if there is room, buys a token pass when it has none, and counts it in the current
/// window of a concurrent item. Returns the item's consumption afterwards.
pub fn occupy(
    conn: &Connection,
    item: &ItemRow,
    device_id: i64,
    key: &SeatKey<'_>,
    now: i64,
) -> Result<Consumption, Occupy> {
    let model = item.terms.model;
    availability(&item.terms, &item.used, now).map_err(Occupy::Refused)?;
    let instance = key.instance_for(model);
    let mut used = item.used;
    let seat = devices::seat(conn, &item.item_id, device_id, instance)?;
    let lapsed =
        seat.is_some_and(|s| models::seat_lapsed(model, s.first_auth_at, s.last_used_at, now));
    match (model, seat.filter(|_| !lapsed)) {
        (Model::Tokens, seat) => {
            if seat.is_none() {
                devices::insert_seat(conn, &item.item_id, device_id, "", now)?;
                used.seats_used += 1;
            }
            // One pass per (product, device, user), whichever item it was bought from: two
            // instances of one user on one device never buy one each.
            if !has_pass(conn, device_id, key, now)? {
                // Inside grace (availability passed) a pass may overdraw the balance, into
                // the grace of the product's tokens on the code (`choose`).
                let grace_from =
                    if models::tokens_balance(&item.terms, &used) < item.terms.tokens_per_pass {
                        devices::tokens_grace_start(conn, item.handshake_id, &item.product, now)?
                            .unwrap_or(now)
                    } else {
                        now
                    };
                devices::buy_pass(
                    conn,
                    key.pass(device_id),
                    &item.item_id,
                    item.terms.tokens_per_pass,
                    grace_from,
                    now + PASS_SECS,
                )?;
                used.tokens_used = used.tokens_used.saturating_add(item.terms.tokens_per_pass);
            }
        }
        (_, Some(seat)) => {
            devices::touch_seat(conn, &item.item_id, device_id, instance, &seat, now)?;
            // Over quota, the count may still hold seats that lapsed since the last daily
            // housekeeping: freed now, so `state` says `tolerance` only when it is.
            if used.seats_used > item.terms.quota {
                used.seats_used -= free_lapsed(conn, item, now, FREE_PER_REQUEST)? as i64;
            }
        }
        (_, None) => {
            // The device's own seat lapsed: freed first (the batch below may not reach it),
            // and the device takes a new one (per_active_device: a new 90 days) if there is
            // room.
            if lapsed && let Some((_, _, why)) = lapse_rule(model, now) {
                let own = ops::LapsedSeat {
                    item_id: item.item_id.clone(),
                    device_id,
                    device_uuid: devices::uuid_of(conn, device_id)?,
                    instance: instance.to_string(),
                };
                free_seat(conn, &own, why, now)?;
                used.seats_used -= 1;
            }
            // `item.used` is this transaction's count; freeing lapsed seats lowers it.
            used.seats_used -= free_lapsed(conn, item, now, FREE_PER_REQUEST)? as i64;
            if !has_room(&item.terms, &used) {
                return Err(Occupy::Refused(Refusal::QuotaExceeded));
            }
            devices::insert_seat(conn, &item.item_id, device_id, instance, now)?;
            used.seats_used += 1;
        }
    }
    if model.is_concurrent() {
        let (active, exception) = devices::mark_window(
            conn,
            &item.item_id,
            device_id,
            instance,
            window_of(now),
            item.terms.quota,
        )?;
        used.window_active = active;
        used.exceptions += i64::from(exception);
    }
    Ok(used)
}

/// An authorization lasts the item's offline allowance, never past the item's expiry.
pub fn expiry(item: &ItemRow, now: i64) -> i64 {
    (now + item.offline_days * DAY).min(item.terms.expires_at)
}

pub fn granted(item: &ItemRow) -> GrantedItem {
    GrantedItem {
        item_id: item.item_id.clone(),
        model: item.terms.model,
        features: item.features.clone(),
        expires_at: from_unix(item.terms.expires_at),
    }
}
