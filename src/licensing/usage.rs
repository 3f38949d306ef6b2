//! `usage`: record a device's reports exactly once per (stream, seq), mark it active, and
//! renew its authorization. Reports of a known lease are recorded even when the renewal is
//! refused.

use std::collections::{BTreeMap, HashSet};

use keygate_sdk::wire::{Authorization, AuthorizationState, ErrorCode, Model};
use rusqlite::Connection;

use super::authorize::{
    Occupy, SeatKey, authorization_for, choose, expiry, granted, has_pass, leave_seat, occupy,
    refusal, window_has_room,
};
use super::models::{self, availability, day_of, window_of};
use super::types::Usage;
use crate::error::ApiError;
use crate::store::catalogue::{self, Catalogue};
use crate::store::devices::{self, Device, Lease, LeaseContext};
use crate::store::licenses::ItemRow;

#[derive(Debug)]
pub struct Recorded {
    pub accepted: u64,
    pub duplicates: u64,
    pub acked_seq: u64,
    /// The renewed authorization, or why it was refused.
    pub renewal: Result<Authorization, ApiError>,
    /// Counter names not recorded, past their item's limit (`item/name`, sorted).
    pub refused_counters: Vec<String>,
}

fn lease_not_found() -> ApiError {
    ApiError::new(
        ErrorCode::LeaseNotFound,
        "unknown lease: authorize again, then send the reports again",
    )
}

/// Releasing a lease the appliance does not know: nothing held, nothing to free.
fn unknown_release() -> ApiError {
    ApiError::new(
        ErrorCode::LeaseNotFound,
        "unknown lease: nothing to release (treat it as released)",
    )
}

/// Records a usage request's new reports and renews its lease. `clock` is the appliance's
/// clock check: when it failed (set back) the reports are still recorded and the renewal is
/// refused with its error.
pub fn record(
    conn: &Connection,
    catalogue: &Catalogue,
    req: &Usage,
    now: i64,
    clock: Result<(), ApiError>,
    installation_id: &str,
) -> Result<Recorded, ApiError> {
    let LeaseContext {
        lease,
        device,
        used,
        stream,
    } = devices::lease_context(conn, &req.lease_id, &req.stream)?.ok_or_else(lease_not_found)?;
    if device.uuid != req.device_uuid {
        return Err(lease_not_found());
    }
    let mut item = lease
        .item_id
        .as_deref()
        .and_then(|id| catalogue.item(id))
        .map(|terms| ItemRow {
            used: used.unwrap_or_default(),
            ..terms.clone()
        });
    let reported = reported_items(conn, catalogue, &lease, req)?;
    let high = match stream {
        Some((owner, _)) if owner != device.id => {
            return Err(ApiError::bad_request("stream belongs to another device"));
        }
        Some((_, high)) => high,
        None => 0,
    };

    let (mut accepted, mut duplicates, mut acked) = (0, 0, high);
    // (item, counter) names noted for this request (a backlog names the same few), and the
    // names past an item's limit, not recorded.
    let mut noted: HashSet<(&str, &str)> = HashSet::new();
    let mut refused: HashSet<(&str, &str)> = HashSet::new();
    // Summed per (item, day, counter) and per metered item before anything is written: a
    // backlog of a thousand reports over two days writes a few rows, not a thousand.
    let mut daily: BTreeMap<(&str, i64, &str), i64> = BTreeMap::new();
    let mut metered: BTreeMap<&str, i64> = BTreeMap::new();
    for report in &req.reports {
        if report.seq <= high {
            duplicates += 1;
            continue;
        }
        accepted += 1;
        acked = report.seq;
        let named = reported
            .iter()
            .find(|i| i.item_id == report.item_id)
            .expect("every reported item was checked");
        // Usage counts on the day it ended, never on a day after today nor before its item
        // started (a device's clock, or a forged report, cannot spread rows over the ages).
        let day = day_of(report.to.min(now).max(named.terms.starts_at.min(now)));
        let meter = named.counter.as_deref();
        for (counter, amount) in report.counters.iter().filter(|(_, n)| *n > 0) {
            let name = (report.item_id.as_str(), counter.as_str());
            if !noted.contains(&name) {
                if refused.contains(&name) || !devices::note_counter(conn, name.0, name.1, meter)? {
                    refused.insert(name);
                    continue;
                }
                noted.insert(name);
            }
            let sum = daily.entry((name.0, day, name.1)).or_default();
            *sum = sum.saturating_add(*amount);
            if meter == Some(counter.as_str()) {
                let sum = metered.entry(name.0).or_default();
                *sum = sum.saturating_add(*amount);
                // The renewal below judges the item with this usage included.
                if let Some(i) = item.as_mut().filter(|i| i.item_id == report.item_id) {
                    i.used.usage_total = i.used.usage_total.saturating_add(*amount);
                }
            }
        }
    }
    for ((item_id, day, counter), amount) in daily {
        devices::add_usage(conn, item_id, device.id, day, counter, amount)?;
    }
    for (item_id, amount) in metered {
        devices::add_usage_total(conn, item_id, amount)?;
    }
    // Sorted, so a warning names the same few first.
    let mut refused: Vec<String> = refused
        .iter()
        .map(|(item, name)| format!("{item}/{name}"))
        .collect();
    refused.sort_unstable();
    if acked > high {
        if stream.is_none() {
            devices::make_room_for_stream(conn, device.id)?;
        }
        devices::set_stream_high(conn, &req.stream, device.id, acked, now)?;
    }
    let renews_lease = item.is_some();
    let renewal = match (clock, item) {
        (Err(behind), _) => Err(behind),
        (Ok(()), Some(item)) => {
            renew(conn, catalogue, &lease, &device, item, now, installation_id)?
        }
        (Ok(()), None) => renew_trial(&lease, &device, now, installation_id),
    };
    // A renewal records its time on the lease, which counts as the device's last-seen time;
    // otherwise it goes on the device, as stale as the lease's record may be.
    let seen = device.last_seen.max(lease.issued_at);
    if (!renews_lease || renewal.is_err()) && now - seen >= devices::RECORD_EVERY_S {
        devices::touch_device(conn, device.id, None, None, now)?;
    }
    Ok(Recorded {
        accepted,
        duplicates,
        acked_seq: acked,
        renewal,
        refused_counters: refused,
    })
}

/// The items the reports name (each with its terms and the counter it meters). A report may
/// name the lease's item, or another item of the lease's product that the lease's handshake
/// code serves or in which the device holds a seat: the item the lease held before it moved
/// to a new one (expired, full, or its seat lapsed since), so a backlog stays deliverable.
fn reported_items<'c>(
    conn: &Connection,
    catalogue: &'c Catalogue,
    lease: &Lease,
    req: &Usage,
) -> Result<Vec<&'c ItemRow>, ApiError> {
    let belongs = |other: &ItemRow| -> Result<bool, ApiError> {
        Ok(lease.item_id.as_deref() == Some(other.item_id.as_str())
            || (lease.item_id.is_some()
                && other.product == lease.product
                && (lease.handshake_id == Some(other.handshake_id)
                    || devices::has_seat(conn, &other.item_id, lease.device_id)?)))
    };
    let mut known: Vec<&ItemRow> = Vec::new();
    for report in &req.reports {
        if known.iter().any(|i| i.item_id == report.item_id) {
            continue;
        }
        match catalogue.item(&report.item_id) {
            Some(other) if belongs(other)? => known.push(other),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "item {} does not belong to lease {}",
                    report.item_id, lease.lease_id
                )));
            }
        }
    }
    Ok(known)
}

/// The public trial keeps its 7 days: re-signed, never extended.
fn renew_trial(
    lease: &Lease,
    device: &Device,
    now: i64,
    installation_id: &str,
) -> Result<Authorization, ApiError> {
    if let Some(refused) = lease_refusal(lease, device) {
        return Err(refused);
    }
    if lease.lapsed(now) {
        return Err(ApiError::new(
            ErrorCode::LicenseExpired,
            "the trial has ended",
        ));
    }
    Ok(authorization_for(
        lease,
        &device.uuid,
        Default::default(),
        installation_id,
        now,
        vec![],
        AuthorizationState::Ok,
    ))
}

/// Why a lease cannot be renewed whatever its item says.
fn lease_refusal(lease: &Lease, device: &Device) -> Option<ApiError> {
    if device.blocked {
        Some(ApiError::new(
            ErrorCode::DeviceBlocked,
            "an administrator blocked this device",
        ))
    } else if lease.revoked {
        Some(ApiError::new(
            ErrorCode::LeaseRevoked,
            "an administrator revoked this lease (removed the device, or deleted its handshake code): authorize again",
        ))
    } else if lease.released {
        Some(ApiError::new(
            ErrorCode::LeaseNotFound,
            "the lease was released: authorize again",
        ))
    } else {
        None
    }
}

/// A lease is renewed while it is valid: until the authorization the device holds expires
/// ([`Lease::lapsed`]).
fn lapsed(lease: &Lease, now: i64) -> Option<ApiError> {
    lease.lapsed(now).then(|| {
        ApiError::new(
            ErrorCode::LeaseNotFound,
            "the lease has lapsed (the device was offline past its authorization): authorize again",
        )
    })
}

/// Marks the device active in its item (the call proves it runs), then renews the lease's
/// authorization if it is still valid. The outer error is a storage failure; the inner one
/// is why the renewal was refused.
fn renew(
    conn: &Connection,
    catalogue: &Catalogue,
    lease: &Lease,
    device: &Device,
    item: ItemRow,
    now: i64,
    installation_id: &str,
) -> Result<Result<Authorization, ApiError>, ApiError> {
    // A blocked device, a revoked or a released lease holds no place: its call counts it
    // nowhere (a blocked device would make a concurrent window an exception).
    if let Some(refused) = lease_refusal(lease, device) {
        return Ok(Err(refused));
    }
    if let Some(refused) = lapsed(lease, now) {
        // No renewal, but the call still proves the device runs: mark its seat active.
        let model = item.terms.model;
        let instance = models::seat_instance(model, &lease.instance);
        if let Some(seat) = devices::seat(conn, &item.item_id, device.id, instance)?
            && !models::seat_lapsed(model, seat.first_auth_at, seat.last_used_at, now)
        {
            devices::touch_seat(conn, &item.item_id, device.id, instance, &seat, now)?;
            // Not in an item no device can use (stopped at max_exceptions, expired): its
            // exceptions would go on counting and use up a later license's higher stop.
            if model.is_concurrent() && availability(&item.terms, &item.used, now).is_ok() {
                devices::mark_window(
                    conn,
                    &item.item_id,
                    device.id,
                    instance,
                    window_of(now),
                    item.terms.quota,
                )?;
            }
        }
        return Ok(Err(refused));
    }
    let token_user = if lease.user.is_empty() {
        device.uuid.as_str()
    } else {
        lease.user.as_str()
    };
    let key = SeatKey {
        product: &lease.product,
        instance: &lease.instance,
        token_user,
    };
    // The lease's item judges while it serves and takes the device. When it does not
    // (withdrawn by a newer license, expired, stopped, full for a seat that lapsed), or a
    // tokens pass is due, the code's items are chosen from as an authorization would choose,
    // so the device moves on to a renewal or a top-up. If none serves, the lease's own item
    // says why.
    let mut own_refusal = if item.withdrawn {
        Some(ApiError::new(
            ErrorCode::LeaseRevoked,
            "the license no longer grants this item",
        ))
    } else {
        availability(&item.terms, &item.used, now)
            .err()
            .map(|r| refusal(r, &item))
    };
    let pass_due = own_refusal.is_none()
        && item.terms.model == Model::Tokens
        && !has_pass(conn, device.id, &key, now)?;
    // A full concurrent window moves the device to another item of its code in its dates
    // and under its quota.
    let window_full = own_refusal.is_none()
        && item.terms.model.is_concurrent()
        && lease.handshake_id.is_some_and(|code| {
            catalogue.items_for(code, &lease.product).any(|other| {
                other.item_id != item.item_id
                    && (other.terms.starts_at..other.terms.expires_at).contains(&now)
            })
        })
        && !window_has_room(conn, &item, device.id, &key, now)?;
    let mut own_used = None;
    if own_refusal.is_none() && !pass_due && !window_full {
        match occupy(conn, &item, device.id, &key, now) {
            Ok(used) => own_used = Some(used),
            Err(Occupy::Refused(r)) => own_refusal = Some(refusal(r, &item)),
            Err(Occupy::Store(e)) => return Err(e.into()),
        }
    }
    let (own_id, own_model) = (item.item_id.clone(), item.terms.model);
    let (item, used) = match own_used {
        Some(used) => (item, used),
        None => {
            if pass_due {
                super::import::settle_started(conn, now)?;
            }
            let mut items = match lease.handshake_id {
                Some(code) => catalogue
                    .items_for(code, &lease.product)
                    .map(|i| catalogue::live(conn, i))
                    .collect::<Result<Vec<_>, _>>()?,
                None => Vec::new(),
            };
            let chosen = match (items.is_empty(), own_refusal) {
                (true, Some(refused)) => return Ok(Err(refused)),
                // A pass is due and no other item serves: the lease's own item sells it.
                (true, None) => item,
                (false, own_refusal) => match choose(conn, &mut items, Some(device.id), &key, now)?
                {
                    Ok(i) => items.swap_remove(i),
                    Err(refused) => return Ok(Err(own_refusal.unwrap_or(refused))),
                },
            };
            match occupy(conn, &chosen, device.id, &key, now) {
                Ok(used) => (chosen, used),
                Err(Occupy::Refused(r)) => return Ok(Err(refusal(r, &chosen))),
                Err(Occupy::Store(e)) => return Err(e.into()),
            }
        }
    };
    let expires_at = expiry(&item, now);
    let moved = (own_id != item.item_id).then_some(&*item.item_id);
    if moved.is_some() || devices::record_due(lease, now, expires_at) {
        devices::renew_lease(conn, &lease.lease_id, moved, now, expires_at)?;
    }
    if moved.is_some() {
        leave_seat(conn, lease, &own_id, own_model, now)?;
    }
    let handshake = lease
        .handshake_id
        .and_then(|id| catalogue.handshake(id))
        .map(|h| (h.organization_id.clone(), h.code.clone()))
        .unwrap_or_default();
    let renewed = Lease {
        item_id: Some(item.item_id.clone()),
        issued_at: now,
        expires_at,
        ..lease.clone()
    };
    Ok(Ok(authorization_for(
        &renewed,
        &device.uuid,
        handshake,
        installation_id,
        now,
        vec![granted(&item)],
        models::state(&item.terms, &used),
    )))
}

/// `release`: ends the lease (it counts as expired from now on, so it is among the first a
/// device's new leases replace); frees a concurrent seat from the current window and a
/// standalone seat at once. per_device and per_active_device seats stay (only an admin's
/// removal or the inactivity rules free them). Releasing twice is the same as once.
pub fn release(
    conn: &Connection,
    catalogue: &Catalogue,
    lease_id: &str,
    device_uuid: &str,
    now: i64,
) -> Result<(), ApiError> {
    let LeaseContext { lease, device, .. } =
        devices::lease_context(conn, lease_id, "")?.ok_or_else(unknown_release)?;
    if device.uuid != device_uuid {
        return Err(unknown_release());
    }
    if lease.released {
        return Ok(());
    }
    devices::release_lease(conn, lease_id, now)?;
    let Some(item) = lease.item_id.as_deref().and_then(|id| catalogue.item(id)) else {
        return Ok(());
    };
    let model = item.terms.model;
    if model.is_concurrent() || model == Model::Standalone {
        // The seat goes too for concurrent items: an instance id per process start would
        // otherwise leave a seat behind at every exit.
        leave_seat(conn, &lease, &item.item_id, model, now)?;
    }
    Ok(())
}
