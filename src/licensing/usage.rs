//! `usage`: record a device's reports exactly once per (stream, seq), mark it active, and
//! renew its authorization. Reports of a known lease are recorded even when the renewal is
//! refused.

use keygate_sdk::wire::{Authorization, AuthorizationState, ErrorCode, FORMAT_VERSION, Model};
use rusqlite::Connection;

use super::authorize::{Occupy, SeatKey, current, expiry, granted, occupy, refusal};
use super::from_unix;
use super::models::day_of;
use super::types::Usage;
use crate::error::ApiError;
use crate::store::devices::{self, Device, Lease};
use crate::store::licenses;

#[derive(Debug)]
pub struct Recorded {
    pub accepted: u64,
    pub duplicates: u64,
    pub acked_seq: u64,
    /// The renewed authorization, or why it was refused.
    pub renewal: Result<Authorization, ApiError>,
}

fn lease_not_found() -> ApiError {
    ApiError::new(
        ErrorCode::LeaseNotFound,
        "unknown lease: authorize again, then send the reports again",
    )
}

pub fn record(
    conn: &Connection,
    req: &Usage,
    now: i64,
    installation_id: &str,
) -> Result<Recorded, ApiError> {
    let lease = devices::lease(conn, &req.lease_id)?.ok_or_else(lease_not_found)?;
    let device = devices::device_by_id(conn, lease.device_id)?.ok_or_else(lease_not_found)?;
    if device.uuid != req.device_uuid {
        return Err(lease_not_found());
    }
    if let Some(report) = req
        .reports
        .iter()
        .find(|r| Some(&r.item_id) != lease.item_id.as_ref())
    {
        return Err(ApiError::bad_request(format!(
            "item {} does not belong to lease {}",
            report.item_id, lease.lease_id
        )));
    }
    let high = match devices::stream(conn, &req.stream)? {
        Some((owner, _)) if owner != device.id => {
            return Err(ApiError::bad_request("stream belongs to another device"));
        }
        Some((_, high)) => high,
        None => 0,
    };

    let metered = match &lease.item_id {
        Some(item_id) => licenses::item(conn, item_id)?.and_then(|i| i.counter),
        None => None,
    };
    let (mut accepted, mut duplicates, mut acked) = (0, 0, high);
    for report in &req.reports {
        if report.seq <= high {
            duplicates += 1;
            continue;
        }
        accepted += 1;
        acked = report.seq;
        // Usage counts on the day it ended, never on a day after today.
        let day = day_of(report.to.min(now));
        for (counter, amount) in report.counters.iter().filter(|(_, n)| *n > 0) {
            devices::add_usage(conn, &report.item_id, device.id, day, counter, *amount)?;
            if metered.as_deref() == Some(counter.as_str()) {
                devices::add_usage_total(conn, &report.item_id, *amount)?;
            }
        }
    }
    if acked > high {
        devices::set_stream_high(conn, &req.stream, device.id, acked)?;
    }
    devices::touch_device(conn, device.id, None, None, now)?;
    let renewal = renew(conn, &lease, &device, now, installation_id)?;
    Ok(Recorded {
        accepted,
        duplicates,
        acked_seq: acked,
        renewal,
    })
}

/// Renews a lease's authorization if it is still valid. The outer error is a storage
/// failure; the inner one is why the renewal was refused.
fn renew(
    conn: &Connection,
    lease: &Lease,
    device: &Device,
    now: i64,
    installation_id: &str,
) -> Result<Result<Authorization, ApiError>, ApiError> {
    let refuse = |code, message: &str| Ok(Err(ApiError::new(code, message)));
    if device.blocked {
        return refuse(
            ErrorCode::DeviceBlocked,
            "an administrator blocked this device",
        );
    }
    if lease.revoked {
        return refuse(
            ErrorCode::LeaseRevoked,
            "an administrator removed this device's seat",
        );
    }
    if lease.released {
        return refuse(
            ErrorCode::LeaseNotFound,
            "the lease was released: authorize again",
        );
    }
    let (organization_id, handshake_code) = match lease.handshake_id {
        Some(id) => licenses::handshake_by_id(conn, id)?
            .map(|h| (h.organization_id, h.code))
            .unwrap_or_default(),
        None => Default::default(),
    };
    let authorization = |items, expires_at, state| Authorization {
        v: FORMAT_VERSION,
        lease_id: lease.lease_id.clone(),
        installation_id: installation_id.to_string(),
        organization_id: organization_id.clone(),
        handshake_code: handshake_code.clone(),
        product: lease.product.clone(),
        device_uuid: device.uuid.clone(),
        instance: Some(lease.instance.clone()).filter(|i| !i.is_empty()),
        user: Some(lease.user.clone()).filter(|u| !u.is_empty()),
        items,
        issued_at: from_unix(now),
        expires_at: from_unix(expires_at),
        nonce: lease.nonce.clone(),
        state,
    };
    let Some(item_id) = &lease.item_id else {
        // The public trial keeps its 7 days: re-signed, never extended.
        return if now < lease.expires_at {
            Ok(Ok(authorization(
                vec![],
                lease.expires_at,
                AuthorizationState::Ok,
            )))
        } else {
            refuse(ErrorCode::LicenseExpired, "the trial has ended")
        };
    };
    let Some(item) = licenses::item(conn, item_id)?.filter(|i| !i.withdrawn) else {
        return refuse(
            ErrorCode::LeaseRevoked,
            "the license no longer grants this item",
        );
    };
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
    match occupy(conn, &item, device.id, &key, now) {
        Ok(()) => {}
        Err(Occupy::Refused(r)) => return Ok(Err(refusal(r, &item))),
        Err(Occupy::Store(e)) => return Err(e.into()),
    }
    let (item, state) = current(conn, item_id, now)?;
    let expires_at = expiry(&item, now);
    devices::renew_lease(conn, &lease.lease_id, now, expires_at)?;
    Ok(Ok(authorization(vec![granted(&item)], expires_at, state)))
}

/// `release`: ends the lease; frees a concurrent seat from the current window and a
/// standalone seat at once. per_device and per_active_device seats stay (only an admin's
/// removal or the inactivity rules free them). Releasing twice is the same as once.
pub fn release(
    conn: &Connection,
    lease_id: &str,
    device_uuid: &str,
    now: i64,
) -> Result<(), ApiError> {
    let lease = devices::lease(conn, lease_id)?.ok_or_else(lease_not_found)?;
    let device = devices::device_by_id(conn, lease.device_id)?.ok_or_else(lease_not_found)?;
    if device.uuid != device_uuid {
        return Err(lease_not_found());
    }
    if lease.released {
        return Ok(());
    }
    devices::release_lease(conn, lease_id)?;
    if let Some(item) = &lease
        .item_id
        .as_deref()
        .map(|id| licenses::item(conn, id))
        .transpose()?
        .flatten()
    {
        let model = item.terms.model;
        let instance = if model == Model::ConcurrentInstance {
            lease.instance.as_str()
        } else {
            ""
        };
        if model.is_concurrent() {
            devices::unmark_window(
                conn,
                &item.item_id,
                device.id,
                instance,
                super::models::window_of(now),
            )?;
        } else if model == Model::Standalone {
            devices::delete_seat(conn, &item.item_id, device.id, "")?;
        }
    }
    Ok(())
}
