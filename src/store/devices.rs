//! Devices, their seats and leases, usage totals, concurrency windows and token passes: the
//! tables the client protocol writes.

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::StoreError;
use crate::licensing::models::{Consumption, window_of};

// ---- devices ----

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub id: i64,
    pub uuid: String,
    pub name: String,
    pub last_user: String,
    pub first_seen: i64,
    pub last_seen: i64,
    pub blocked: bool,
}

fn device_from_row(r: &Row<'_>) -> rusqlite::Result<Device> {
    device_at(r, 0)
}

/// A device from the seven columns of `id, uuid, name, last_user, first_seen, last_seen,
/// blocked` starting at column `at`.
fn device_at(r: &Row<'_>, at: usize) -> rusqlite::Result<Device> {
    Ok(Device {
        id: r.get(at)?,
        uuid: r.get(at + 1)?,
        name: r.get(at + 2)?,
        last_user: r.get(at + 3)?,
        first_seen: r.get(at + 4)?,
        last_seen: r.get(at + 5)?,
        blocked: r.get(at + 6)?,
    })
}

/// A device's columns, its last-seen time included: the later of the device's own and its
/// leases' last renewal (a heartbeat renews the lease and writes only that row).
const DEVICE_COLUMNS: &str = "d.id, d.uuid, d.name, d.last_user, d.first_seen,
    max(d.last_seen, coalesce((SELECT max(issued_at) FROM leases WHERE device_id = d.id), 0)),
    d.blocked";

pub fn device_by_uuid(conn: &Connection, uuid: &str) -> Result<Option<Device>, StoreError> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {DEVICE_COLUMNS} FROM devices d WHERE d.uuid = ?1"
        ))?
        .query_row([uuid], device_from_row)
        .optional()?)
}

/// A device's UUID by its row id.
pub fn uuid_of(conn: &Connection, device_id: i64) -> Result<String, StoreError> {
    Ok(conn
        .prepare_cached("SELECT uuid FROM devices WHERE id = ?1")?
        .query_row([device_id], |r| r.get(0))?)
}

pub fn insert_device(
    conn: &Connection,
    uuid: &str,
    name: &str,
    user: &str,
    now: i64,
) -> Result<i64, StoreError> {
    conn.prepare_cached(
        "INSERT INTO devices (uuid, name, last_user, first_seen, last_seen)
         VALUES (?1, ?2, ?3, ?4, ?4)",
    )?
    .execute(params![uuid, name, user, now])?;
    Ok(conn.last_insert_rowid())
}

/// Records that a device was seen; `name` and `user` replace the stored ones when given.
pub fn touch_device(
    conn: &Connection,
    id: i64,
    name: Option<&str>,
    user: Option<&str>,
    now: i64,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "UPDATE devices SET last_seen = max(last_seen, ?2),
                name = coalesce(?3, name), last_user = coalesce(?4, last_user)
         WHERE id = ?1",
    )?
    .execute(params![id, now, name, user])?;
    Ok(())
}

pub fn set_blocked(conn: &Connection, uuid: &str, blocked: bool) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached("UPDATE devices SET blocked = ?2 WHERE uuid = ?1")?
        .execute(params![uuid, blocked])?
        == 1)
}

// ---- seats ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seat {
    pub first_auth_at: i64,
    pub last_used_at: i64,
}

pub fn seat(
    conn: &Connection,
    item_id: &str,
    device_id: i64,
    instance: &str,
) -> Result<Option<Seat>, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT first_auth_at, last_used_at FROM seats
             WHERE item_id = ?1 AND device_id = ?2 AND instance = ?3",
        )?
        .query_row(params![item_id, device_id, instance], |r| {
            Ok(Seat {
                first_auth_at: r.get(0)?,
                last_used_at: r.get(1)?,
            })
        })
        .optional()?)
}

/// Gives a device a seat in an item and counts it.
pub fn insert_seat(
    conn: &Connection,
    item_id: &str,
    device_id: i64,
    instance: &str,
    now: i64,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO seats (item_id, device_id, instance, first_auth_at, last_used_at)
         VALUES (?1, ?2, ?3, ?4, ?4)",
    )?
    .execute(params![item_id, device_id, instance, now])?;
    add_seats(conn, item_id, 1)
}

/// Frees a device's seat; returns whether it had one.
pub fn delete_seat(
    conn: &Connection,
    item_id: &str,
    device_id: i64,
    instance: &str,
) -> Result<bool, StoreError> {
    let deleted = conn
        .prepare_cached(
            "DELETE FROM seats WHERE item_id = ?1 AND device_id = ?2 AND instance = ?3",
        )?
        .execute(params![item_id, device_id, instance])?;
    if deleted == 1 {
        add_seats(conn, item_id, -1)?;
    }
    Ok(deleted == 1)
}

fn add_seats(conn: &Connection, item_id: &str, delta: i64) -> Result<(), StoreError> {
    conn.prepare_cached("UPDATE items SET seats_used = seats_used + ?2 WHERE item_id = ?1")?
        .execute(params![item_id, delta])?;
    Ok(())
}

/// Records use of a held seat, at most once an hour (the 365-day rule needs no finer time):
/// most calls write nothing.
pub fn touch_seat(
    conn: &Connection,
    item_id: &str,
    device_id: i64,
    instance: &str,
    seat: &Seat,
    now: i64,
) -> Result<(), StoreError> {
    if now - seat.last_used_at < 3600 {
        return Ok(());
    }
    conn.prepare_cached(
        "UPDATE seats SET last_used_at = ?4 WHERE item_id = ?1 AND device_id = ?2 AND instance = ?3",
    )?
    .execute(params![item_id, device_id, instance, now])?;
    Ok(())
}

// ---- concurrency windows ----

/// Counts a seat as active in `window` unless it already is, or was counted in a later
/// window (a call stamped before another that reached the writer first, or a clock stepped
/// back: counting it again would count one device twice). Returns the number of active
/// seats in the window and whether this call made the window an exception (over `quota`).
pub fn mark_window(
    conn: &Connection,
    item_id: &str,
    device_id: i64,
    instance: &str,
    window: i64,
    quota: i64,
) -> Result<(i64, bool), StoreError> {
    let moved = conn
        .prepare_cached(
            "UPDATE seats SET last_window = ?4
             WHERE item_id = ?1 AND device_id = ?2 AND instance = ?3 AND last_window < ?4",
        )?
        .execute(params![item_id, device_id, instance, window])?;
    if moved == 0 {
        return Ok((window_active(conn, item_id, window)?, false));
    }
    let active: i64 = conn
        .prepare_cached(
            "INSERT INTO concurrency_windows (item_id, window, active, peak) VALUES (?1, ?2, 1, 1)
             ON CONFLICT (item_id, window) DO UPDATE SET
                active = active + 1, peak = max(peak, active + 1)
             RETURNING active",
        )?
        .query_row(params![item_id, window], |r| r.get(0))?;
    let mut exception = false;
    if active > quota {
        exception = conn
            .prepare_cached(
                "UPDATE concurrency_windows SET exception = 1
                 WHERE item_id = ?1 AND window = ?2 AND exception = 0",
            )?
            .execute(params![item_id, window])?
            == 1;
        if exception {
            conn.prepare_cached("UPDATE items SET exceptions = exceptions + 1 WHERE item_id = ?1")?
                .execute([item_id])?;
        }
    }
    Ok((active, exception))
}

/// Forgets the counts of the windows after `window` (taken while the clock ran ahead, which
/// `keygate reset-clock` has just accepted as wrong): each seat counts again from now, once
/// a window; left, a seat would count in no window until the clock got to its last, and
/// then a second time in the windows already holding it.
pub fn forget_windows_after(conn: &Connection, window: i64) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE seats SET last_window = -1 WHERE last_window > ?1",
        [window],
    )?;
    conn.execute(
        "DELETE FROM concurrency_windows WHERE window > ?1",
        [window],
    )?;
    Ok(())
}

/// Takes a released seat out of the current window at once.
pub fn unmark_window(
    conn: &Connection,
    item_id: &str,
    device_id: i64,
    instance: &str,
    window: i64,
) -> Result<(), StoreError> {
    let moved = conn
        .prepare_cached(
            "UPDATE seats SET last_window = -1
             WHERE item_id = ?1 AND device_id = ?2 AND instance = ?3 AND last_window = ?4",
        )?
        .execute(params![item_id, device_id, instance, window])?;
    if moved == 1 {
        leave_window(conn, item_id, window)?;
    }
    Ok(())
}

/// One seat fewer active in the item's `window`.
fn leave_window(conn: &Connection, item_id: &str, window: i64) -> Result<(), StoreError> {
    conn.prepare_cached(
        "UPDATE concurrency_windows SET active = active - 1 WHERE item_id = ?1 AND window = ?2",
    )?
    .execute(params![item_id, window])?;
    Ok(())
}

/// Whether a concurrent item's `window` counts the device's seat (or instance) already.
pub fn in_window(
    conn: &Connection,
    item_id: &str,
    device_id: i64,
    instance: &str,
    window: i64,
) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT 1 FROM seats
             WHERE item_id = ?1 AND device_id = ?2 AND instance = ?3 AND last_window >= ?4",
        )?
        .query_row(params![item_id, device_id, instance, window], |_| Ok(()))
        .optional()?
        .is_some())
}

pub fn window_active(conn: &Connection, item_id: &str, window: i64) -> Result<i64, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT active FROM concurrency_windows WHERE item_id = ?1 AND window = ?2",
        )?
        .query_row(params![item_id, window], |r| r.get(0))
        .optional()?
        .unwrap_or(0))
}

// ---- token passes ----

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pass {
    pub item_id: String,
    pub expires_at: i64,
}

/// Whose pass: one per (product, device, user).
#[derive(Debug, Clone, Copy)]
pub struct PassKey<'a> {
    pub product: &'a str,
    pub device_id: i64,
    pub user: &'a str,
}

pub fn pass(conn: &Connection, key: PassKey<'_>) -> Result<Option<Pass>, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT item_id, expires_at FROM token_passes
             WHERE product = ?1 AND device_id = ?2 AND user = ?3",
        )?
        .query_row(params![key.product, key.device_id, key.user], |r| {
            Ok(Pass {
                item_id: r.get(0)?,
                expires_at: r.get(1)?,
            })
        })
        .optional()?)
}

/// Sells a pass: charges the item and records the pass until `expires_at`. Starts the
/// item's grace period, at `grace_from`, when its balance goes below zero.
pub fn buy_pass(
    conn: &Connection,
    key: PassKey<'_>,
    item_id: &str,
    cost: i64,
    grace_from: i64,
    expires_at: i64,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO token_passes (product, device_id, user, item_id, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (product, device_id, user) DO UPDATE SET
            item_id = excluded.item_id, expires_at = excluded.expires_at",
    )?
    .execute(params![
        key.product,
        key.device_id,
        key.user,
        item_id,
        expires_at
    ])?;
    conn.prepare_cached(
        "UPDATE items SET
                tokens_used = CASE WHEN tokens_used > 9223372036854775807 - ?2
                    THEN 9223372036854775807 ELSE tokens_used + ?2 END,
                grace_started_at = CASE
                    WHEN quota - tokens_used < ?2 THEN coalesce(grace_started_at, ?3) END
         WHERE item_id = ?1",
    )?
    .execute(params![item_id, cost, grace_from])?;
    Ok(())
}

/// When the tokens a handshake code serves for a product first went below zero, if they
/// still are: the earliest grace start of its items in debt (a withdrawn item's too, as a
/// newer license does not forget a debt; an expired item's balance is gone).
pub fn tokens_grace_start(
    conn: &Connection,
    handshake_id: i64,
    product: &str,
    now: i64,
) -> Result<Option<i64>, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT min(grace_started_at) FROM items
             WHERE handshake_id = ?1 AND product = ?2 AND model = 'tokens'
               AND tokens_used > quota AND starts_at <= ?3 AND expires_at > ?3",
        )?
        .query_row(params![handshake_id, product, now], |r| r.get(0))?)
}

// ---- leases ----

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub lease_id: String,
    pub device_id: i64,
    pub product: String,
    pub instance: String,
    pub user: String,
    pub handshake_id: Option<i64>,
    pub item_id: Option<String>,
    pub nonce: String,
    pub issued_at: i64,
    pub expires_at: i64,
    pub released: bool,
    pub revoked: bool,
}

const LEASE_COLUMNS: &str = "lease_id, device_id, product, instance, user, handshake_id, \
                             item_id, nonce, issued_at, expires_at, released, revoked";

fn lease_from_row(r: &Row<'_>) -> rusqlite::Result<Lease> {
    Ok(Lease {
        lease_id: r.get(0)?,
        device_id: r.get(1)?,
        product: r.get(2)?,
        instance: r.get(3)?,
        user: r.get(4)?,
        handshake_id: r.get(5)?,
        item_id: r.get(6)?,
        nonce: r.get(7)?,
        issued_at: r.get(8)?,
        expires_at: r.get(9)?,
        released: r.get(10)?,
        revoked: r.get(11)?,
    })
}

/// A lease with everything `usage` and `release` start from, read in one statement.
#[derive(Debug)]
pub struct LeaseContext {
    pub lease: Lease,
    pub device: Device,
    /// The live consumption of the lease's item (none for the public trial).
    pub used: Option<Consumption>,
    /// The usage stream the request names: (its device, its highest acknowledged seq).
    pub stream: Option<(i64, u64)>,
}

const LEASE_CONTEXT: &str = "
    SELECT l.lease_id, l.device_id, l.product, l.instance, l.user, l.handshake_id,
           l.item_id, l.nonce, l.issued_at, l.expires_at, l.released, l.revoked,
           d.id, d.uuid, d.name, d.last_user, d.first_seen, d.last_seen, d.blocked,
           s.device_id, s.high_seq,
           i.seats_used, i.usage_total, i.exceptions, i.tokens_used, i.grace_started_at
    FROM leases l JOIN devices d ON d.id = l.device_id
    LEFT JOIN items i ON i.item_id = l.item_id
    LEFT JOIN usage_streams s ON s.stream = ?2
    WHERE l.lease_id = ?1";

pub fn lease_context(
    conn: &Connection,
    lease_id: &str,
    stream: &str,
) -> Result<Option<LeaseContext>, StoreError> {
    Ok(conn
        .prepare_cached(LEASE_CONTEXT)?
        .query_row(params![lease_id, stream], |r| {
            let stream = match r.get::<_, Option<i64>>(19)? {
                Some(owner) => Some((owner, r.get::<_, i64>(20)? as u64)),
                None => None,
            };
            // NULL columns: a lease without an item (the public trial).
            let used = match r.get::<_, Option<i64>>(21)? {
                Some(_) => Some(super::licenses::consumption_at(r, 21)?),
                None => None,
            };
            Ok(LeaseContext {
                lease: lease_from_row(r)?,
                device: device_at(r, 12)?,
                used,
                stream,
            })
        })
        .optional()?)
}

/// The lease of a (device, product, instance, user), if it ever authorized.
pub fn lease_for(
    conn: &Connection,
    device_id: i64,
    product: &str,
    instance: &str,
    user: &str,
) -> Result<Option<Lease>, StoreError> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {LEASE_COLUMNS} FROM leases
             WHERE device_id = ?1 AND product = ?2 AND instance = ?3 AND user = ?4"
        ))?
        .query_row(params![device_id, product, instance, user], lease_from_row)
        .optional()?)
}

/// Leases a device keeps per product. A device names its instances and users as it likes,
/// one lease each: past this many, a new one first removes the device's expired leases of
/// the product, longest expired first.
pub const LEASES_PER_PRODUCT: i64 = 32;

/// Unexpired leases a device may hold per product (one per instance and user it names): a
/// terminal server's users fit, and a device naming new ones in a loop cannot fill the
/// disk.
pub const LIVE_LEASES_PER_PRODUCT: i64 = 4096;

/// Before a new lease of `device_id` for `product`: removes its expired leases of the
/// product (released, or lapsed as [`Lease::lapsed`] judges it), longest expired first,
/// until fewer than [`LEASES_PER_PRODUCT`] remain (or none has expired). False when
/// [`LIVE_LEASES_PER_PRODUCT`] unexpired ones remain: no room.
pub fn make_room_for_lease(
    conn: &Connection,
    device_id: i64,
    product: &str,
    now: i64,
) -> Result<bool, StoreError> {
    let count: i64 = conn
        .prepare_cached("SELECT count(*) FROM leases WHERE device_id = ?1 AND product = ?2")?
        .query_row(params![device_id, product], |r| r.get(0))?;
    if count < LEASES_PER_PRODUCT {
        return Ok(true);
    }
    let removed: Vec<(Option<String>, String)> = conn
        .prepare_cached(
            "DELETE FROM leases WHERE rowid IN (
                SELECT rowid FROM leases
                WHERE device_id = ?1 AND product = ?2
                  AND (released OR expires_at <= CASE WHEN item_id IS NULL THEN ?3 ELSE ?6 END)
                ORDER BY expires_at
                LIMIT max(0, ?4 - ?5 + 1))
             RETURNING item_id, instance",
        )?
        .query_map(
            params![
                device_id,
                product,
                now,
                count,
                LEASES_PER_PRODUCT,
                held_after(now)
            ],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?
        .collect::<Result<_, _>>()?;
    // A concurrent_instance seat is per instance: one that no lease names any more goes
    // with its last lease, or instances that never come back would pile up.
    for (item_id, instance) in &removed {
        if let Some(item_id) = item_id.as_deref().filter(|_| !instance.is_empty()) {
            let named: bool = conn
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM leases
                     WHERE device_id = ?1 AND item_id = ?2 AND instance = ?3)",
                )?
                .query_row(params![device_id, item_id, instance], |r| r.get(0))?;
            if !named {
                // Out of the current window too, or the instance coming back counts twice.
                unmark_window(conn, item_id, device_id, instance, window_of(now))?;
                delete_seat(conn, item_id, device_id, instance)?;
            }
        }
    }
    // Those left past the first 32 are all unexpired.
    Ok(count - (removed.len() as i64) < LIVE_LEASES_PER_PRODUCT)
}

/// Stores a lease: a new one, or the renewal of an existing one (same `lease_id`).
pub fn upsert_lease(conn: &Connection, l: &Lease) -> Result<(), StoreError> {
    // A lease authorized again through the same code (most are) leaves `handshake_id`, and
    // so its index, untouched: assigning the column, even its own value, rewrote the index
    // entry (a third more written to disk per authorization of a known device). Found by
    // its (device, product, instance, user), whose index pages `lease_for` has just read,
    // not by the `lease_id` index (`+`: not searched), a page more to read in a large one.
    let renewed = conn
        .prepare_cached(
            "UPDATE leases SET item_id = ?3, nonce = ?4, issued_at = ?5, expires_at = ?6,
                               released = ?7, revoked = ?8
             WHERE device_id = ?9 AND product = ?10 AND instance = ?11 AND user = ?12
               AND +lease_id = ?1 AND handshake_id IS ?2",
        )?
        .execute(params![
            l.lease_id,
            l.handshake_id,
            l.item_id,
            l.nonce,
            l.issued_at,
            l.expires_at,
            l.released,
            l.revoked,
            l.device_id,
            l.product,
            l.instance,
            l.user
        ])?;
    if renewed == 1 {
        return Ok(());
    }
    conn.prepare_cached(
        "INSERT INTO leases (lease_id, device_id, product, instance, user, handshake_id, item_id,
                             nonce, issued_at, expires_at, released, revoked)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
         ON CONFLICT (lease_id) DO UPDATE SET
            handshake_id = excluded.handshake_id, item_id = excluded.item_id,
            nonce = excluded.nonce, issued_at = excluded.issued_at,
            expires_at = excluded.expires_at, released = excluded.released,
            revoked = excluded.revoked",
    )?
    .execute(params![
        l.lease_id,
        l.device_id,
        l.product,
        l.instance,
        l.user,
        l.handshake_id,
        l.item_id,
        l.nonce,
        l.issued_at,
        l.expires_at,
        l.released,
        l.revoked
    ])?;
    Ok(())
}

/// How stale a lease's record may grow before a usage call writes it again. The record (the
/// last renewal's time, which is also the device's last-seen time, and its expiry) is then
/// at most this much behind the newest authorization the device holds, never ahead of it: a
/// device calling every 3 minutes has its lease written on one call in five, and a heartbeat
/// that changes nothing else writes nothing.
pub const RECORD_EVERY_S: i64 = 15 * 60;

/// Whether a renewal at `now` to `expires_at` must rewrite the lease's record: it is
/// [`RECORD_EVERY_S`] old, or the new term would leave it that far behind or ahead.
pub fn record_due(lease: &Lease, now: i64, expires_at: i64) -> bool {
    now - lease.issued_at >= RECORD_EVERY_S
        || !(0..RECORD_EVERY_S).contains(&(expires_at - lease.expires_at))
}

/// An item's lease whose recorded expiry is after this may still be held by its device at
/// `now`: the record lags the authorization the device holds by up to [`RECORD_EVERY_S`].
pub fn held_after(now: i64) -> i64 {
    now - RECORD_EVERY_S
}

impl Lease {
    /// Whether the authorization the device holds has expired at `now`: an item's lease
    /// record lags it ([`held_after`]); the public trial's, never renewed, is exact.
    pub fn lapsed(&self, now: i64) -> bool {
        let held_after = if self.item_id.is_some() {
            held_after(now)
        } else {
            now
        };
        self.expires_at <= held_after
    }
}

/// A renewal: the lease's new term, and its new item if it `moved` to another one (its own
/// stopped serving, or a tokens pass came from a top-up).
pub fn renew_lease(
    conn: &Connection,
    lease_id: &str,
    moved: Option<&str>,
    issued_at: i64,
    expires_at: i64,
) -> Result<(), StoreError> {
    match moved {
        None => conn
            .prepare_cached(
                "UPDATE leases SET issued_at = ?2, expires_at = ?3 WHERE lease_id = ?1",
            )?
            .execute(params![lease_id, issued_at, expires_at])?,
        Some(item_id) => conn
            .prepare_cached(
                "UPDATE leases SET item_id = ?2, issued_at = ?3, expires_at = ?4
                 WHERE lease_id = ?1",
            )?
            .execute(params![lease_id, item_id, issued_at, expires_at])?,
    };
    Ok(())
}

/// Ends a lease: released, and expired from `now` on.
pub fn release_lease(conn: &Connection, lease_id: &str, now: i64) -> Result<(), StoreError> {
    conn.prepare_cached(
        "UPDATE leases SET released = 1, expires_at = min(expires_at, ?2) WHERE lease_id = ?1",
    )?
    .execute(params![lease_id, now])?;
    Ok(())
}

/// Whether the device holds another live lease (not released, revoked or expired: see
/// [`held_after`]) on `item_id` besides `lease_id`, for `instance` when given: the seat is
/// still in use.
pub fn other_live_lease(
    conn: &Connection,
    device_id: i64,
    lease_id: &str,
    item_id: &str,
    instance: Option<&str>,
    now: i64,
) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM leases
             WHERE device_id = ?1 AND lease_id <> ?2 AND item_id = ?3
               AND (?4 IS NULL OR instance = ?4)
               AND released = 0 AND revoked = 0 AND expires_at > ?5)",
        )?
        .query_row(
            params![device_id, lease_id, item_id, instance, held_after(now)],
            |r| r.get(0),
        )?)
}

/// Whether the device has a seat (of any instance) in the item.
pub fn has_seat(conn: &Connection, item_id: &str, device_id: i64) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM seats WHERE item_id = ?1 AND device_id = ?2)",
        )?
        .query_row(params![item_id, device_id], |r| r.get(0))?)
}

/// An admin removed the device: its seats are freed (and out of the current concurrency
/// window, `now`'s) and its leases revoked; the device record stays, so its next contact is
/// answered `LEASE_REVOKED`.
pub fn remove_device(conn: &Connection, device_id: i64, now: i64) -> Result<usize, StoreError> {
    let freed = free_all_seats(conn, device_id, Some(window_of(now)))?;
    conn.prepare_cached("DELETE FROM token_passes WHERE device_id = ?1")?
        .execute([device_id])?;
    conn.prepare_cached("UPDATE leases SET revoked = 1 WHERE device_id = ?1")?
        .execute([device_id])?;
    Ok(freed)
}

/// Deletes the device's seats, each counted out of its item and out of `window` if active
/// in it (so the device counts once if it comes back in that window); returns how many.
fn free_all_seats(
    conn: &Connection,
    device_id: i64,
    window: Option<i64>,
) -> Result<usize, StoreError> {
    let seats: Vec<(String, i64)> = conn
        .prepare_cached("SELECT item_id, last_window FROM seats WHERE device_id = ?1")?
        .query_map([device_id], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    for (item, last_window) in &seats {
        add_seats(conn, item, -1)?;
        if window == Some(*last_window) {
            leave_window(conn, item, *last_window)?;
        }
    }
    conn.prepare_cached("DELETE FROM seats WHERE device_id = ?1")?
        .execute([device_id])?;
    Ok(seats.len())
}

/// One batch of devices looked at by the inactive-device purge.
pub struct UnusedBatch {
    /// `(id, uuid)` of the unused devices in the batch.
    pub devices: Vec<(i64, String)>,
    /// The last id looked at; `None` past the last device.
    pub last_id: Option<i64>,
}

/// Among the `limit` devices after id `after` (in id order), those unused since `cutoff`:
/// no call after it. Blocked devices are kept (an admin's block outlives inactivity), and
/// so are devices that still hold a valid authorization at `now` (an item's `offline_days`
/// may be longer than a year): removed, its seat would go to another device while it still
/// runs on it.
pub fn unused_devices(
    conn: &Connection,
    after: i64,
    limit: i64,
    cutoff: i64,
    now: i64,
) -> Result<UnusedBatch, StoreError> {
    let last: Option<i64> = conn
        .prepare_cached(
            "SELECT max(id) FROM (SELECT id FROM devices WHERE id > ?1 ORDER BY id LIMIT ?2)",
        )?
        .query_row(params![after, limit], |r| r.get(0))?;
    let Some(last) = last else {
        return Ok(UnusedBatch {
            devices: Vec::new(),
            last_id: None,
        });
    };
    let devices = conn
        .prepare_cached(
            "SELECT d.id, d.uuid FROM devices d
             WHERE d.id > ?1 AND d.id <= ?2 AND d.blocked = 0 AND d.last_seen <= ?3
               AND NOT EXISTS (SELECT 1 FROM leases WHERE device_id = d.id
                   AND (issued_at > ?3
                        OR (released = 0 AND revoked = 0 AND expires_at > ?4)))",
        )?
        .query_map(params![after, last, cutoff, held_after(now)], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?
        .collect::<Result<_, _>>()?;
    Ok(UnusedBatch {
        devices,
        last_id: Some(last),
    })
}

/// Removes a device and everything kept for it (seats, counted out of their items; leases,
/// passes, its usage stream and totals). The items' per-day usage stays.
pub fn purge_device(conn: &Connection, device_id: i64) -> Result<(), StoreError> {
    // Unused for a year: active in no window that still counts.
    free_all_seats(conn, device_id, None)?;
    // The rest goes with the device (ON DELETE CASCADE).
    conn.prepare_cached("DELETE FROM devices WHERE id = ?1")?
        .execute([device_id])?;
    Ok(())
}

// ---- usage ----

/// Usage streams a device keeps at most: one per local usage store, so a terminal server's
/// users with a store each fit, as their leases do ([`LIVE_LEASES_PER_PRODUCT`]).
pub const STREAMS_PER_DEVICE: i64 = 4096;

/// Streams removed at once when a device has [`STREAMS_PER_DEVICE`]: finding the least
/// recently written sorts all the device's streams, so a device naming a new stream in
/// every request pays that once in 256 requests.
pub const STREAMS_REMOVED_AT_ONCE: i64 = 256;

/// Records a stream's highest acknowledged seq, written at `now`.
pub fn set_stream_high(
    conn: &Connection,
    stream: &str,
    device_id: i64,
    high_seq: u64,
    now: i64,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO usage_streams (stream, device_id, high_seq, written_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (stream) DO UPDATE SET high_seq = max(high_seq, excluded.high_seq),
                                            written_at = excluded.written_at",
    )?
    .execute(params![stream, device_id, high_seq as i64, now])?;
    Ok(())
}

/// Before a stream new to `device_id`: when the device has [`STREAMS_PER_DEVICE`] streams,
/// removes its [`STREAMS_REMOVED_AT_ONCE`] least recently written, so a device inventing a
/// stream per request cannot grow the table. Returns how many were removed. A removed
/// stream's replayed reports would count again: one its device has not written since it
/// wrote about 3,840 others.
pub fn make_room_for_stream(conn: &Connection, device_id: i64) -> Result<usize, StoreError> {
    let count: i64 = conn
        .prepare_cached("SELECT count(*) FROM usage_streams WHERE device_id = ?1")?
        .query_row([device_id], |r| r.get(0))?;
    if count < STREAMS_PER_DEVICE {
        return Ok(0);
    }
    Ok(conn
        .prepare_cached(
            "DELETE FROM usage_streams WHERE stream IN (
                SELECT stream FROM usage_streams WHERE device_id = ?1
                ORDER BY written_at, stream LIMIT ?2)",
        )?
        .execute(params![
            device_id,
            count - STREAMS_PER_DEVICE + STREAMS_REMOVED_AT_ONCE
        ])?)
}

/// Adds `amount` of `counter` to the item's day total and the device's total. Totals stop at
/// `i64::MAX` rather than overflow (SQLite would turn the sum into a float, which the STRICT
/// tables refuse).
pub fn add_usage(
    conn: &Connection,
    item_id: &str,
    device_id: i64,
    day: i64,
    counter: &str,
    amount: i64,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO usage_daily (item_id, day, counter, total) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (item_id, day, counter) DO UPDATE SET total =
             CASE WHEN total > 9223372036854775807 - ?4 THEN 9223372036854775807
                  ELSE total + ?4 END",
    )?
    .execute(params![item_id, day, counter, amount])?;
    conn.prepare_cached(
        "INSERT INTO device_usage (device_id, item_id, counter, total) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (device_id, item_id, counter) DO UPDATE SET total =
             CASE WHEN total > 9223372036854775807 - ?4 THEN 9223372036854775807
                  ELSE total + ?4 END",
    )?
    .execute(params![device_id, item_id, counter, amount])?;
    Ok(())
}

/// How many counter names an item may record over its life.
pub const MAX_ITEM_COUNTERS: i64 = 64;

/// Notes `counter` as one of the item's counter names: `false` (and nothing noted) for a new
/// one past [`MAX_ITEM_COUNTERS`] other than the item's metered counter `meter`, which is
/// always noted and does not count against the limit.
pub fn note_counter(
    conn: &Connection,
    item_id: &str,
    counter: &str,
    meter: Option<&str>,
) -> Result<bool, StoreError> {
    let known = conn
        .prepare_cached("SELECT 1 FROM item_counters WHERE item_id = ?1 AND counter = ?2")?
        .exists(params![item_id, counter])?;
    if known {
        return Ok(true);
    }
    if meter != Some(counter) {
        let names: i64 = conn
            .prepare_cached(
                "SELECT count(*) FROM item_counters WHERE item_id = ?1 AND counter IS NOT ?2",
            )?
            .query_row(params![item_id, meter], |r| r.get(0))?;
        if names >= MAX_ITEM_COUNTERS {
            return Ok(false);
        }
    }
    conn.prepare_cached("INSERT INTO item_counters (item_id, counter) VALUES (?1, ?2)")?
        .execute(params![item_id, counter])?;
    Ok(true)
}

/// Adds to a per_usage item's metered total (held at `i64::MAX` rather than overflow).
pub fn add_usage_total(conn: &Connection, item_id: &str, amount: i64) -> Result<(), StoreError> {
    conn.prepare_cached(
        "UPDATE items SET usage_total = CASE WHEN usage_total > 9223372036854775807 - ?2
             THEN 9223372036854775807 ELSE usage_total + ?2 END
         WHERE item_id = ?1",
    )?
    .execute(params![item_id, amount])?;
    Ok(())
}

/// A device's usage totals per item and counter.
pub fn device_usage(
    conn: &Connection,
    device_id: i64,
) -> Result<Vec<(String, String, i64)>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT item_id, counter, total FROM device_usage WHERE device_id = ?1
         ORDER BY item_id, counter",
    )?;
    let rows = stmt.query_map([device_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A line of the portal's device list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceLine {
    pub device: Device,
    pub seats: i64,
}

/// A page of all devices, or of the blocked ones (by their partial index).
fn all_devices(columns: &str, blocked: &str) -> String {
    format!(
        "SELECT {columns} FROM devices d WHERE d.id > :after {blocked} ORDER BY d.id LIMIT :limit"
    )
}

/// Devices after `after_id` (keyset pagination, by id), at most `limit`: all of them, or
/// those whose uuid is `q`, or whose name or user starts with `q` (index range scans).
pub fn list_devices(
    conn: &Connection,
    q: Option<&str>,
    item: Option<&str>,
    blocked_only: bool,
    after_id: i64,
    limit: i64,
) -> Result<Vec<DeviceLine>, StoreError> {
    // Seats that serve: not those of items a newer license withdrew.
    let columns = format!(
        "{DEVICE_COLUMNS}, (SELECT COUNT(*) FROM seats s WHERE s.device_id = d.id
            AND s.item_id NOT IN (SELECT item_id FROM items WHERE withdrawn = 1))"
    );
    let row = |r: &Row<'_>| {
        Ok(DeviceLine {
            device: device_from_row(r)?,
            seats: r.get(7)?,
        })
    };
    let blocked = if blocked_only {
        " AND d.blocked = 1"
    } else {
        ""
    };
    let rows: Vec<DeviceLine> = match (q, item) {
        // An item's blocked devices, driven by the blocked devices' index (few), each looked
        // up in the item's seats: not the item's seats read until enough are blocked.
        (None, Some(item)) if blocked_only => {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {columns} FROM devices d WHERE d.blocked = 1 AND d.id > :after
                 AND EXISTS (SELECT 1 FROM seats held WHERE held.item_id = :item
                             AND held.device_id = d.id)
                 ORDER BY d.id LIMIT :limit"
            ))?;
            let args: [(&str, &dyn rusqlite::ToSql); 3] =
                [(":item", &item), (":after", &after_id), (":limit", &limit)];
            stmt.query_map(args.as_slice(), row)?
                .collect::<Result<_, _>>()?
        }
        // An item's devices, driven by the seats' primary key (item, device): a page reads
        // its own rows, whatever the item holds.
        (None, Some(item)) => {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {columns} FROM seats held JOIN devices d ON d.id = held.device_id
                 WHERE held.item_id = :item AND held.device_id > :after
                 GROUP BY held.device_id ORDER BY held.device_id LIMIT :limit"
            ))?;
            let args: [(&str, &dyn rusqlite::ToSql); 3] =
                [(":item", &item), (":after", &after_id), (":limit", &limit)];
            stmt.query_map(args.as_slice(), row)?
                .collect::<Result<_, _>>()?
        }
        (None, None) => {
            let mut stmt = conn.prepare_cached(&all_devices(&columns, blocked))?;
            let args: [(&str, &dyn rusqlite::ToSql); 2] =
                [(":after", &after_id), (":limit", &limit)];
            stmt.query_map(args.as_slice(), row)?
                .collect::<Result<_, _>>()?
        }
        (Some(q), item) => {
            let upper = format!("{q}\u{10FFFF}");
            // The few devices the search finds, each looked up in the item's seats.
            let in_item = if item.is_some() {
                " AND EXISTS (SELECT 1 FROM seats held WHERE held.item_id = :item
                              AND held.device_id = d.id)"
            } else {
                ""
            };
            // Many matches (`DESKTOP-`, the name Windows gives every PC) are first looked
            // for walking the next `SEARCH_WALKED` devices in id order, where they are
            // dense; matches collected from the indexes and sorted otherwise (few, or
            // clustered elsewhere): a page reads a bounded number of rows beyond its matches.
            let run = |matches: &str, bound: Option<i64>| -> Result<Vec<DeviceLine>, StoreError> {
                let below = if bound.is_some() {
                    " AND d.id <= :bound"
                } else {
                    ""
                };
                let mut stmt = conn.prepare_cached(&format!(
                    "SELECT {columns} FROM devices d WHERE {matches}
                     AND d.id > :after{below} {blocked}{in_item} ORDER BY d.id LIMIT :limit"
                ))?;
                let mut args: Vec<(&str, &dyn rusqlite::ToSql)> = vec![
                    (":q", &q),
                    (":upper", &upper),
                    (":after", &after_id),
                    (":limit", &limit),
                ];
                if let Some(item) = &item {
                    args.push((":item", item));
                }
                if let Some(bound) = &bound {
                    args.push((":bound", bound));
                }
                Ok(stmt
                    .query_map(args.as_slice(), row)?
                    .collect::<Result<_, _>>()?)
            };
            let bound = after_id.saturating_add(SEARCH_WALKED);
            let walked = search_matches_many(conn, q, &upper)?
                .then(|| {
                    run(
                        "(d.uuid = :q OR (+d.name >= :q AND +d.name < :upper)
                          OR (+d.last_user >= :q AND +d.last_user < :upper))",
                        Some(bound),
                    )
                })
                .transpose()?;
            // A full page, or the walk went past the last device: the page is whole.
            let whole = match &walked {
                Some(page) => {
                    page.len() as i64 == limit
                        || bound
                            >= conn
                                .prepare_cached("SELECT coalesce(max(id), 0) FROM devices")?
                                .query_row([], |r| r.get::<_, i64>(0))?
                }
                None => false,
            };
            if let Some(walked) = walked.filter(|_| whole) {
                walked
            } else {
                run(
                    "d.id IN (SELECT id FROM devices WHERE uuid = :q
                        UNION SELECT id FROM devices WHERE name >= :q AND name < :upper
                        UNION SELECT id FROM devices WHERE last_user >= :q AND last_user < :upper)",
                    None,
                )?
            }
        }
    };
    Ok(rows)
}

/// Past this many devices a search finds, its pages walk the devices in id order first...
const SEARCH_COLLECTED: i64 = 5000;
/// ...this many ids at most.
const SEARCH_WALKED: i64 = 50_000;

/// Whether more than [`SEARCH_COLLECTED`] devices' names or users start with `q` (counted
/// by the indexes, up to that many).
fn search_matches_many(conn: &Connection, q: &str, upper: &str) -> Result<bool, StoreError> {
    let found: i64 = conn
        .prepare_cached(
            "SELECT (SELECT COUNT(*) FROM (SELECT 1 FROM devices
                     WHERE name >= ?1 AND name < ?2 LIMIT ?3))
                  + (SELECT COUNT(*) FROM (SELECT 1 FROM devices
                     WHERE last_user >= ?1 AND last_user < ?2 LIMIT ?3))",
        )?
        .query_row(params![q, upper, SEARCH_COLLECTED + 1], |r| r.get(0))?;
    Ok(found > SEARCH_COLLECTED)
}

/// A seat as a device's page shows it.
#[derive(Debug)]
pub struct HeldSeat {
    pub item_id: String,
    pub instance: String,
    pub first_auth_at: i64,
    pub last_used_at: i64,
    /// The item's license no longer grants it (the seat serves nothing).
    pub withdrawn: bool,
}

/// The first `limit` seats a device holds, and how many it holds in all.
pub fn seats_of(
    conn: &Connection,
    device_id: i64,
    limit: i64,
) -> Result<(Vec<HeldSeat>, i64), StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT s.item_id, s.instance, s.first_auth_at, s.last_used_at,
                coalesce(i.withdrawn, 0) AS withdrawn
         FROM seats s LEFT JOIN items i ON i.item_id = s.item_id WHERE s.device_id = ?1
         ORDER BY withdrawn, s.item_id, s.instance LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![device_id, limit], |r| {
        Ok(HeldSeat {
            item_id: r.get(0)?,
            instance: r.get(1)?,
            first_auth_at: r.get(2)?,
            last_used_at: r.get(3)?,
            withdrawn: r.get(4)?,
        })
    })?;
    let all = conn
        .prepare_cached("SELECT COUNT(*) FROM seats WHERE device_id = ?1")?
        .query_row([device_id], |r| r.get(0))?;
    Ok((rows.collect::<Result<_, _>>()?, all))
}

/// A device's first `limit` leases (a terminal server's device holds one per user), and how
/// many it holds in all.
pub fn leases_of(
    conn: &Connection,
    device_id: i64,
    limit: i64,
) -> Result<(Vec<Lease>, i64), StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {LEASE_COLUMNS} FROM leases WHERE device_id = ?1 ORDER BY product, instance, user
         LIMIT ?2"
    ))?;
    let rows = stmt.query_map(params![device_id, limit], lease_from_row)?;
    let all = conn
        .prepare_cached("SELECT COUNT(*) FROM leases WHERE device_id = ?1")?
        .query_row([device_id], |r| r.get(0))?;
    Ok((rows.collect::<Result<_, _>>()?, all))
}

/// One batch of the devices whose last user is a given one.
#[derive(Debug, PartialEq)]
pub struct UserDevices {
    /// Devices only that user used (no lease of another user): id and uuid.
    pub own: Vec<(i64, String)>,
    /// Devices another user holds a live lease on too (a shared machine; a lease without a
    /// user is the device's own, a released, revoked or expired one no longer counts).
    pub shared: usize,
    /// The last id looked at; `None` past the last device.
    pub last_id: Option<i64>,
}

/// Among the devices whose last user is `user` and that still hold something (a seat, or a
/// lease not revoked: one removed already holds neither), the first `limit` after id `after`
/// (in id order, through the `last_user` index), told apart by whether another user holds a
/// live lease on them at `now`.
pub fn devices_of_user(
    conn: &Connection,
    user: &str,
    after: i64,
    limit: i64,
    now: i64,
) -> Result<UserDevices, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT d.id, d.uuid, EXISTS (SELECT 1 FROM leases l WHERE l.device_id = d.id
             AND l.user NOT IN (?1, '') AND l.released = 0 AND l.revoked = 0
             AND l.expires_at > ?4)
         FROM devices d WHERE d.last_user = ?1 AND d.id > ?2
             AND (EXISTS (SELECT 1 FROM seats s WHERE s.device_id = d.id)
                  OR EXISTS (SELECT 1 FROM leases l WHERE l.device_id = d.id AND l.revoked = 0))
         ORDER BY d.id LIMIT ?3",
    )?;
    let rows = stmt
        .query_map(params![user, after, limit, now], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, bool>(2)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let last_id = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|r| r.0))
        .flatten();
    let shared = rows.iter().filter(|r| r.2).count();
    Ok(UserDevices {
        own: rows
            .into_iter()
            .filter(|r| !r.2)
            .map(|(id, uuid, _)| (id, uuid))
            .collect(),
        shared,
        last_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A search that finds many devices walks them in id order, one that finds few collects
    /// them from the indexes: both page through every match once, in id order.
    #[test]
    fn a_search_pages_through_its_matches_whether_few_or_many() {
        let dir = tempfile::tempdir().unwrap();
        let conn = super::super::open(&dir.path().join("k.db")).unwrap();
        let tx = conn.unchecked_transaction().unwrap();
        let mut desktops = Vec::new();
        let mut laptops = Vec::new();
        for n in 0..SEARCH_COLLECTED + 200 {
            let uuid = format!("00000000-0000-4000-8000-{n:012}");
            let id = insert_device(&tx, &uuid, "", "", 10).unwrap();
            let name = if n % 50 == 7 {
                laptops.push(id);
                format!("LAPTOP-{n}")
            } else {
                desktops.push(id);
                format!("DESKTOP-{n}")
            };
            tx.execute(
                "UPDATE devices SET name = ?1 WHERE id = ?2",
                params![name, id],
            )
            .unwrap();
        }
        tx.commit().unwrap();
        let all = |q: &str| -> Vec<i64> {
            let (mut found, mut after) = (Vec::new(), 0);
            loop {
                let page = list_devices(&conn, Some(q), None, false, after, 51).unwrap();
                found.extend(page.iter().map(|l| l.device.id));
                match page.last() {
                    Some(last) if page.len() == 51 => after = last.device.id,
                    _ => return found,
                }
            }
        };
        let upper = |q: &str| format!("{q}\u{10FFFF}");
        assert!(search_matches_many(&conn, "DESKTOP", &upper("DESKTOP")).unwrap());
        assert!(!search_matches_many(&conn, "LAPTOP", &upper("LAPTOP")).unwrap());
        assert_eq!(all("DESKTOP"), desktops);
        assert_eq!(all("LAPTOP"), laptops);
        assert_eq!(all("00000000-0000-4000-8000-000000000007"), [laptops[0]]);
    }

    #[test]
    fn an_items_devices_are_listed_once_each_a_page_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let conn = super::super::open(&dir.path().join("k.db")).unwrap();
        conn.pragma_update(None, "foreign_keys", false).unwrap();
        let ids: Vec<i64> = (1..=6)
            .map(|n| insert_device(&conn, &format!("dev-{n}"), "", "", 10).unwrap())
            .collect();
        let seats = [
            ("A", 0, "a"),
            ("A", 0, "b"),
            ("A", 1, ""),
            ("B", 2, ""),
            ("A", 3, ""),
            ("A", 4, ""),
            ("A", 5, "x"),
            ("A", 5, "y"),
            ("A", 5, "z"),
        ];
        for (item, device, instance) in seats {
            insert_seat(&conn, item, ids[device], instance, 10).unwrap();
        }
        assert!(set_blocked(&conn, "dev-4", true).unwrap());
        let page = |q: Option<&str>, blocked: bool, after: i64| -> Vec<(String, i64)> {
            list_devices(&conn, q, Some("A"), blocked, after, 2)
                .unwrap()
                .into_iter()
                .map(|l| (l.device.uuid, l.seats))
                .collect()
        };
        let line = |n: usize, seats: i64| (format!("dev-{n}"), seats);
        assert_eq!(page(None, false, 0), [line(1, 2), line(2, 1)]);
        assert_eq!(page(None, false, ids[1]), [line(4, 1), line(5, 1)]);
        assert_eq!(page(None, false, ids[4]), [line(6, 3)]);
        assert_eq!(page(None, true, 0), [line(4, 1)]);
        assert_eq!(page(Some("dev-6"), false, 0), [line(6, 3)]);
        assert!(page(Some("dev-3"), false, 0).is_empty(), "not in A");

        // All blocked devices, read by their own index (not every device walked for them).
        assert!(set_blocked(&conn, "dev-1", true).unwrap());
        let blocked = |after: i64| -> Vec<String> {
            list_devices(&conn, None, None, true, after, 1)
                .unwrap()
                .into_iter()
                .map(|l| l.device.uuid)
                .collect()
        };
        assert_eq!(blocked(0), ["dev-1"]);
        assert_eq!(blocked(ids[1]), ["dev-4"]);
        assert!(blocked(ids[4]).is_empty());
        let plan: String = conn
            .query_row(
                &format!(
                    "EXPLAIN QUERY PLAN {}",
                    all_devices("d.id", " AND d.blocked = 1")
                ),
                rusqlite::named_params! {":after": 0, ":limit": 1},
                |r| r.get(3),
            )
            .unwrap();
        assert!(plan.contains("devices_blocked"), "{plan}");
    }

    /// A seat is counted once per window, and only as its windows move forward: a call
    /// stamped in an earlier window than the one it was counted in last (the clock stepped
    /// back, or two calls of one seat reaching the writer out of order at a window's end)
    /// counts it in no window again, so no false exception is recorded.
    #[test]
    fn a_seat_counts_once_per_window_when_a_call_comes_from_an_earlier_window() {
        let dir = tempfile::tempdir().unwrap();
        let conn = super::super::open(&dir.path().join("k.db")).unwrap();
        conn.pragma_update(None, "foreign_keys", false).unwrap();
        let device = insert_device(&conn, "dev-1", "", "", 10).unwrap();
        insert_seat(&conn, "A", device, "", 10).unwrap();
        let quota = 1;
        let mark = |window| mark_window(&conn, "A", device, "", window, quota).unwrap();
        assert_eq!(mark(100), (1, false));
        assert_eq!(mark(101), (1, false));
        // The clock stepped back into window 100, then on into 101 again.
        assert_eq!(mark(100), (1, false));
        assert_eq!(mark(101), (1, false));
        assert_eq!(window_active(&conn, "A", 100).unwrap(), 1);
        assert_eq!(window_active(&conn, "A", 101).unwrap(), 1);
        let exceptions: i64 = conn
            .query_row(
                "SELECT count(*) FROM concurrency_windows WHERE exception = 1",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(exceptions, 0);
        // Released in its window, the seat counts again when it comes back in it.
        unmark_window(&conn, "A", device, "", 101).unwrap();
        assert_eq!(window_active(&conn, "A", 101).unwrap(), 0);
        assert_eq!(mark(101), (1, false));
        // Counted while the clock ran ahead, then the clock reset: the seat counts from now,
        // and once only when the clock gets to the windows it was counted in.
        assert_eq!(mark(300), (1, false));
        assert_eq!(mark(200), (0, false), "not before the reset");
        forget_windows_after(&conn, 200).unwrap();
        assert_eq!(mark(200), (1, false));
        assert_eq!(mark(300), (1, false));
    }

    #[test]
    fn unused_devices_are_found_a_batch_of_ids_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let conn = super::super::open(&dir.path().join("k.db")).unwrap();
        // Seen last at 10, 20, ..., 70; device 5 renewed a lease at 100, device 6 is blocked.
        let ids: Vec<i64> = (1..=7)
            .map(|n| insert_device(&conn, &format!("dev-{n}"), "", "", n * 10).unwrap())
            .collect();
        conn.execute(
            "INSERT INTO leases (lease_id, device_id, product, nonce, issued_at, expires_at)
             VALUES ('l5', ?1, 'p', 'n', 100, 200)",
            [ids[4]],
        )
        .unwrap();
        assert!(set_blocked(&conn, "dev-6", true).unwrap());
        // Device 4 holds an authorization valid until 5,000 (offline for longer than a
        // year): kept until it has expired (its record lagging by up to RECORD_EVERY_S).
        conn.execute(
            "INSERT INTO leases (lease_id, device_id, product, nonce, issued_at, expires_at)
             VALUES ('l4', ?1, 'p', 'n', 30, 5000)",
            [ids[3]],
        )
        .unwrap();
        let unused = |now: i64| {
            let (mut found, mut after, mut batches) = (Vec::new(), 0, 0);
            while let UnusedBatch {
                devices,
                last_id: Some(last),
            } = unused_devices(&conn, after, 3, 60, now).unwrap()
            {
                found.extend(devices.into_iter().map(|(_, uuid)| uuid));
                (after, batches) = (last, batches + 1);
            }
            assert_eq!(batches, 3, "7 devices, 3 ids a batch");
            found
        };
        assert_eq!(
            unused(5000 + RECORD_EVERY_S - 1),
            ["dev-1", "dev-2", "dev-3"]
        );
        assert_eq!(
            unused(5000 + RECORD_EVERY_S),
            ["dev-1", "dev-2", "dev-3", "dev-4"]
        );
    }

    #[test]
    fn a_users_devices_are_found_a_batch_at_a_time_shared_ones_apart() {
        let dir = tempfile::tempdir().unwrap();
        let conn = super::super::open(&dir.path().join("k.db")).unwrap();
        let ids: Vec<i64> = (1..=5)
            .map(|n| insert_device(&conn, &format!("dev-{n}"), "", "leaver", n).unwrap())
            .collect();
        insert_device(&conn, "dev-6", "", "stayer", 6).unwrap();
        // dev-2 is shared with "stayer"; dev-3 also runs software without a user; "stayer"
        // no longer uses dev-4 (revoked), dev-5 (released) nor dev-1 (expired).
        for (lease, device, user, released, revoked, expires) in [
            ("a", 1, "stayer", 0, 0, 100),
            ("b", 2, "", 0, 0, 100),
            ("c", 2, "leaver", 0, 0, 100),
            ("d", 3, "stayer", 0, 1, 100),
            ("e", 4, "stayer", 1, 0, 100),
            ("f", 0, "stayer", 0, 0, 10),
        ] {
            conn.execute(
                "INSERT INTO leases (lease_id, device_id, product, user, nonce, issued_at,
                     expires_at, released, revoked)
                 VALUES (?1, ?2, ?3, ?4, 'n', 0, ?5, ?6, ?7)",
                params![lease, ids[device], lease, user, expires, released, revoked],
            )
            .unwrap();
        }
        let first = devices_of_user(&conn, "leaver", 0, 3, 50).unwrap();
        assert_eq!(
            first,
            UserDevices {
                own: vec![(ids[0], "dev-1".into()), (ids[2], "dev-3".into())],
                shared: 1,
                last_id: Some(ids[2]),
            }
        );
        let second = devices_of_user(&conn, "leaver", ids[2], 3, 50).unwrap();
        assert_eq!(
            second,
            UserDevices {
                own: vec![(ids[4], "dev-5".into())],
                shared: 0,
                last_id: None,
            },
            "dev-4 holds nothing any more (no seat, its one lease revoked): removed already"
        );
    }

    #[test]
    fn lease_context_reads_everything_in_one_statement_planned_once() {
        let dir = tempfile::tempdir().unwrap();
        let conn = super::super::open(&dir.path().join("k.db")).unwrap();
        let device = insert_device(&conn, "dev-1", "", "", 0).unwrap();
        for n in 1..=3 {
            conn.execute(
                "INSERT INTO leases (lease_id, device_id, product, nonce, issued_at, expires_at)
                 VALUES (?1, ?2, 'p' || ?3, 'n', 0, ?3)",
                params![format!("lease-{n}"), device, n],
            )
            .unwrap();
        }
        set_stream_high(&conn, "stream-2", device, 7, 0).unwrap();
        for n in 1..=3 {
            super::super::exec(&conn, "BEGIN IMMEDIATE").unwrap();
            let found = lease_context(&conn, &format!("lease-{n}"), &format!("stream-{n}"))
                .unwrap()
                .unwrap();
            super::super::exec(&conn, "COMMIT").unwrap();
            assert_eq!((found.lease.expires_at, found.device.id), (n, device));
            assert_eq!(found.stream, (n == 2).then_some((device, 7)));
            assert_eq!(found.used, None, "a trial lease has no item");
        }
        assert!(lease_context(&conn, "nope", "").unwrap().is_none());
        // Re-planning on each new binding costs more than the query (without the query
        // planner stability guarantee SQLite re-plans joins for every new lease id).
        let statement = conn.prepare_cached(LEASE_CONTEXT).unwrap();
        assert_eq!(
            statement.get_status(rusqlite::StatementStatus::RePrepare),
            0
        );
    }
}
