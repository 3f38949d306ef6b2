//! Trusted vendor keys, organizations, handshake codes, licenses and their items.

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::StoreError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedKey {
    pub kid: String,
    pub public_key: [u8; 32],
    pub name: String,
    pub added_at: i64,
}

pub fn trusted_keys(conn: &Connection) -> Result<Vec<TrustedKey>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT kid, public_key, name, added_at FROM trusted_keys ORDER BY added_at, kid",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(TrustedKey {
            kid: r.get(0)?,
            public_key: r.get(1)?,
            name: r.get(2)?,
            added_at: r.get(3)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Adds a trusted key; returns false when it was already trusted.
pub fn insert_trusted_key(conn: &Connection, key: &TrustedKey) -> Result<bool, StoreError> {
    let added = conn
        .prepare_cached(
            "INSERT INTO trusted_keys (kid, public_key, name, added_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (kid) DO NOTHING",
        )?
        .execute(params![key.kid, key.public_key, key.name, key.added_at])?;
    Ok(added == 1)
}

/// Removes a trusted vendor key; returns whether it was there.
pub fn delete_trusted_key(conn: &Connection, kid: &str) -> Result<bool, StoreError> {
    Ok(conn.execute("DELETE FROM trusted_keys WHERE kid = ?1", [kid])? == 1)
}

/// Creates the organization if it is new; returns whether it was created.
pub fn ensure_organization(
    conn: &Connection,
    organization_id: &str,
    vendor: &str,
    now: i64,
) -> Result<bool, StoreError> {
    let added = conn
        .prepare_cached(
            "INSERT INTO organizations (organization_id, vendor, created_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (organization_id) DO NOTHING",
        )?
        .execute(params![organization_id, vendor, now])?;
    Ok(added == 1)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeCode {
    pub id: i64,
    pub code: String,
    pub organization_id: String,
    pub name: String,
    pub is_default: bool,
    pub password_hash: Option<String>,
    pub allowed_domains: Vec<String>,
    pub allowed_processes: Vec<String>,
}

const HANDSHAKE_COLUMNS: &str = "id, code, organization_id, name, is_default, password_hash, \
                                 allowed_domains, allowed_processes";

fn handshake_from_row(r: &Row<'_>) -> rusqlite::Result<HandshakeCode> {
    let lines = |text: String| -> Vec<String> { text.lines().map(str::to_string).collect() };
    Ok(HandshakeCode {
        id: r.get(0)?,
        code: r.get(1)?,
        organization_id: r.get(2)?,
        name: r.get(3)?,
        is_default: r.get(4)?,
        password_hash: r.get(5)?,
        allowed_domains: lines(r.get(6)?),
        allowed_processes: lines(r.get(7)?),
    })
}

pub fn default_handshake(
    conn: &Connection,
    organization_id: &str,
) -> Result<Option<HandshakeCode>, StoreError> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {HANDSHAKE_COLUMNS} FROM handshake_codes \
             WHERE organization_id = ?1 AND is_default = 1"
        ))?
        .query_row([organization_id], handshake_from_row)
        .optional()?)
}

pub fn handshake_by_code(
    conn: &Connection,
    code: &str,
) -> Result<Option<HandshakeCode>, StoreError> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {HANDSHAKE_COLUMNS} FROM handshake_codes WHERE code = ?1"
        ))?
        .query_row([code], handshake_from_row)
        .optional()?)
}

pub fn handshake_by_id(conn: &Connection, id: i64) -> Result<Option<HandshakeCode>, StoreError> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {HANDSHAKE_COLUMNS} FROM handshake_codes WHERE id = ?1"
        ))?
        .query_row([id], handshake_from_row)
        .optional()?)
}

pub fn handshake_codes(conn: &Connection) -> Result<Vec<HandshakeCode>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {HANDSHAKE_COLUMNS} FROM handshake_codes ORDER BY organization_id, code"
    ))?;
    let rows = stmt.query_map([], handshake_from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn insert_handshake(
    conn: &Connection,
    code: &str,
    organization_id: &str,
    name: &str,
    is_default: bool,
    now: i64,
) -> Result<i64, StoreError> {
    conn.prepare_cached(
        "INSERT INTO handshake_codes (code, organization_id, name, is_default, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![code, organization_id, name, is_default, now])?;
    Ok(conn.last_insert_rowid())
}

/// The newest imported version of a license.
#[derive(Debug, Clone)]
pub struct CurrentVersion {
    pub version: u32,
    pub sha256: String,
    pub vendor: String,
    pub organization_id: String,
}

pub fn current_version(
    conn: &Connection,
    license_id: &str,
) -> Result<Option<CurrentVersion>, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT version, sha256, vendor, organization_id FROM licenses WHERE license_id = ?1
             ORDER BY version DESC LIMIT 1",
        )?
        .query_row([license_id], |r| {
            Ok(CurrentVersion {
                version: r.get(0)?,
                sha256: r.get(1)?,
                vendor: r.get(2)?,
                organization_id: r.get(3)?,
            })
        })
        .optional()?)
}

#[derive(Debug, Clone)]
pub struct NewLicense<'a> {
    pub license_id: &'a str,
    pub version: u32,
    pub vendor: &'a str,
    pub organization_id: &'a str,
    pub issued_at: i64,
    pub kid: &'a str,
    pub jws: &'a str,
    pub sha256: &'a str,
    pub imported_at: i64,
}

pub fn insert_license(conn: &Connection, l: &NewLicense<'_>) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO licenses (license_id, version, vendor, organization_id, issued_at, kid,
                               jws, sha256, imported_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        l.license_id,
        l.version,
        l.vendor,
        l.organization_id,
        l.issued_at,
        l.kid,
        l.jws,
        l.sha256,
        l.imported_at
    ])?;
    Ok(())
}

/// An item's terms as the license grants them.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemTerms<'a> {
    pub item_id: &'a str,
    pub license_id: &'a str,
    pub license_version: u32,
    pub organization_id: &'a str,
    pub product: &'a str,
    pub model: &'a str,
    pub quota: i64,
    pub starts_at: i64,
    pub expires_at: i64,
    pub offline_days: u32,
    pub features_json: &'a str,
    pub counter: Option<&'a str>,
    pub max_exceptions: Option<u32>,
    pub grace_days: Option<u32>,
    pub tokens_per_pass: Option<i64>,
}

/// Inserts a new item on `handshake_id`, or updates the terms of an existing one (which
/// keeps its handshake code and its usage). When a new version meters another counter (or
/// turns the item into per_usage), the item's total is counted again from its daily totals
/// of that counter.
pub fn upsert_item(
    conn: &Connection,
    item: &ItemTerms<'_>,
    handshake_id: i64,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO items (item_id, license_id, license_version, organization_id, handshake_id,
                            product, model, quota, starts_at, expires_at, offline_days, features,
                            counter, max_exceptions, grace_days, tokens_per_pass)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)
         ON CONFLICT (item_id) DO UPDATE SET
            license_version = excluded.license_version, product = excluded.product,
            model = excluded.model, quota = excluded.quota, starts_at = excluded.starts_at,
            expires_at = excluded.expires_at, offline_days = excluded.offline_days,
            features = excluded.features, counter = excluded.counter,
            max_exceptions = excluded.max_exceptions, grace_days = excluded.grace_days,
            tokens_per_pass = excluded.tokens_per_pass, withdrawn = 0,
            usage_total = CASE
                WHEN items.counter IS excluded.counter AND items.model = excluded.model
                    THEN items.usage_total
                ELSE (SELECT CAST(min(total(u.total), 9223372036854775807) AS INTEGER)
                      FROM usage_daily u
                      WHERE u.item_id = excluded.item_id AND u.counter = excluded.counter)
            END",
    )?
    .execute(params![
        item.item_id,
        item.license_id,
        item.license_version,
        item.organization_id,
        handshake_id,
        item.product,
        item.model,
        item.quota,
        item.starts_at,
        item.expires_at,
        item.offline_days,
        item.features_json,
        item.counter,
        item.max_exceptions,
        item.grace_days,
        item.tokens_per_pass
    ])?;
    Ok(())
}

/// Marks withdrawn the items of `license_id` that its version `version` no longer lists.
pub fn withdraw_items_not_in(
    conn: &Connection,
    license_id: &str,
    version: u32,
) -> Result<usize, StoreError> {
    Ok(conn
        .prepare_cached(
            "UPDATE items SET withdrawn = 1
             WHERE license_id = ?1 AND license_version < ?2 AND withdrawn = 0",
        )?
        .execute(params![license_id, version])?)
}

/// A line of `keygate licenses`.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemSummary {
    pub license_id: String,
    pub license_version: u32,
    pub organization_id: String,
    pub item_id: String,
    pub product: String,
    pub model: String,
    pub quota: i64,
    /// What counts against the quota: seats, the metered total, exceptions (concurrent
    /// models, of max_exceptions) or tokens spent.
    pub used: i64,
    /// Concurrent models: the exceptions at which the item stops.
    pub max_exceptions: Option<i64>,
    pub starts_at: i64,
    pub expires_at: i64,
    pub handshake_code: String,
    pub withdrawn: bool,
}

pub fn item_summaries(conn: &Connection) -> Result<Vec<ItemSummary>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT i.license_id, i.license_version, i.organization_id, i.item_id, i.product,
                i.model, i.quota, i.starts_at, i.expires_at, h.code, i.withdrawn,
                i.seats_used, i.usage_total, i.exceptions, i.tokens_used, i.max_exceptions
         FROM items i JOIN handshake_codes h ON h.id = i.handshake_id
         ORDER BY i.license_id, i.item_id",
    )?;
    let rows = stmt.query_map([], |r| {
        let model = model_at(r, 5)?;
        let used = crate::licensing::models::Consumption {
            seats_used: r.get(11)?,
            usage_total: r.get(12)?,
            exceptions: r.get(13)?,
            tokens_used: r.get(14)?,
            ..Default::default()
        }
        .counted(model);
        Ok(ItemSummary {
            license_id: r.get(0)?,
            license_version: r.get(1)?,
            organization_id: r.get(2)?,
            item_id: r.get(3)?,
            product: r.get(4)?,
            model: model.as_str().to_string(),
            quota: r.get(6)?,
            starts_at: r.get(7)?,
            expires_at: r.get(8)?,
            handshake_code: r.get(9)?,
            withdrawn: r.get(10)?,
            used,
            max_exceptions: r.get(15)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Counts for `keygate status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub licenses: i64,
    pub items: i64,
    pub organizations: i64,
    pub handshake_codes: i64,
}

/// Counts at `now`: items count when in force (not withdrawn, started, not expired).
pub fn counts(conn: &Connection, now: i64) -> Result<Counts, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT (SELECT COUNT(DISTINCT license_id) FROM licenses),
                    (SELECT COUNT(*) FROM items
                     WHERE withdrawn = 0 AND starts_at <= ?1 AND expires_at > ?1),
                    (SELECT COUNT(*) FROM organizations),
                    (SELECT COUNT(*) FROM handshake_codes)",
        )?
        .query_row([now], |r| {
            Ok(Counts {
                licenses: r.get(0)?,
                items: r.get(1)?,
                organizations: r.get(2)?,
                handshake_codes: r.get(3)?,
            })
        })?)
}

/// An item with its terms and live consumption, as the protocol needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemRow {
    pub item_id: String,
    pub license_id: String,
    pub license_version: u32,
    pub organization_id: String,
    pub handshake_id: i64,
    pub product: String,
    pub terms: crate::licensing::models::Terms,
    pub used: crate::licensing::models::Consumption,
    pub offline_days: i64,
    pub features: Vec<String>,
    pub counter: Option<String>,
    pub withdrawn: bool,
}

const ITEM_COLUMNS: &str = "item_id, license_id, license_version, organization_id, handshake_id, \
     product, model, quota, starts_at, expires_at, offline_days, features, counter, \
     max_exceptions, grace_days, tokens_per_pass, withdrawn, seats_used, usage_total, \
     exceptions, tokens_used, grace_started_at";

/// A stored column that does not hold what keygate wrote there.
fn corrupt(i: usize, what: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        i,
        rusqlite::types::Type::Text,
        format!("stored {what} is not valid").into(),
    )
}

fn model_at(r: &Row<'_>, i: usize) -> rusqlite::Result<keygate_sdk::wire::Model> {
    let model: String = r.get(i)?;
    keygate_sdk::wire::Model::parse(&model).ok_or_else(|| corrupt(i, "model"))
}

fn item_from_row(r: &Row<'_>) -> rusqlite::Result<ItemRow> {
    use crate::licensing::models::Terms;
    use keygate_sdk::wire::DEFAULT_GRACE_DAYS;
    let model = model_at(r, 6)?;
    let features: String = r.get(11)?;
    let features = serde_json::from_str(&features).map_err(|_| corrupt(11, "features"))?;
    Ok(ItemRow {
        item_id: r.get(0)?,
        license_id: r.get(1)?,
        license_version: r.get(2)?,
        organization_id: r.get(3)?,
        handshake_id: r.get(4)?,
        product: r.get(5)?,
        terms: Terms {
            model,
            quota: r.get(7)?,
            starts_at: r.get(8)?,
            expires_at: r.get(9)?,
            max_exceptions: r.get::<_, Option<i64>>(13)?.unwrap_or(0),
            grace_days: r
                .get::<_, Option<i64>>(14)?
                .unwrap_or(DEFAULT_GRACE_DAYS.into()),
            tokens_per_pass: r.get::<_, Option<i64>>(15)?.unwrap_or(0),
        },
        offline_days: r.get(10)?,
        features,
        counter: r.get(12)?,
        withdrawn: r.get(16)?,
        used: consumption_at(r, 17)?,
    })
}

/// An item's consumption columns, in the order of [`CONSUMPTION_COLUMNS`].
pub const CONSUMPTION_COLUMNS: &str =
    "seats_used, usage_total, exceptions, tokens_used, grace_started_at";

/// An item's consumption from the [`CONSUMPTION_COLUMNS`] starting at column `at`.
pub fn consumption_at(
    r: &Row<'_>,
    at: usize,
) -> rusqlite::Result<crate::licensing::models::Consumption> {
    Ok(crate::licensing::models::Consumption {
        seats_used: r.get(at)?,
        usage_total: r.get(at + 1)?,
        exceptions: r.get(at + 2)?,
        window_active: 0,
        tokens_used: r.get(at + 3)?,
        grace_started_at: r.get(at + 4)?,
    })
}

pub fn item(conn: &Connection, item_id: &str) -> Result<Option<ItemRow>, StoreError> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {ITEM_COLUMNS} FROM items WHERE item_id = ?1"
        ))?
        .query_row([item_id], item_from_row)
        .optional()?)
}

/// Every current item (for `keygate licenses` and the portal).
pub fn all_items(conn: &Connection) -> Result<Vec<ItemRow>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {ITEM_COLUMNS} FROM items ORDER BY license_id, item_id"
    ))?;
    let rows = stmt.query_map([], item_from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The signed line of one license version.
pub fn license_jws(
    conn: &Connection,
    license_id: &str,
    version: u32,
) -> Result<String, StoreError> {
    Ok(conn
        .prepare_cached("SELECT jws FROM licenses WHERE license_id = ?1 AND version = ?2")?
        .query_row(params![license_id, version], |r| r.get(0))?)
}

/// One version of a license as the vendor signed it.
#[derive(Debug, Clone)]
pub struct SignedVersion {
    pub license_id: String,
    pub version: u32,
    pub jws: String,
    /// The default handshake code of the license's organization, in the database read.
    pub default_code: Option<String>,
}

/// The newest version of each license.
pub fn newest_versions(conn: &Connection) -> Result<Vec<SignedVersion>, StoreError> {
    // SQLite takes a bare column from the row that holds the max().
    let mut stmt = conn.prepare(
        "SELECT l.license_id, max(l.version), l.jws,
                (SELECT code FROM handshake_codes h
                 WHERE h.organization_id = l.organization_id AND h.is_default = 1)
         FROM licenses l GROUP BY l.license_id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(SignedVersion {
            license_id: r.get(0)?,
            version: r.get(1)?,
            jws: r.get(2)?,
            default_code: r.get(3)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The newest imported license (the public trial's proof that this appliance is licensed).
pub fn newest_license_jws(conn: &Connection) -> Result<Option<String>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT jws FROM licenses ORDER BY imported_at DESC, rowid DESC LIMIT 1")?
        .query_row([], |r| r.get(0))
        .optional()?)
}

pub fn set_handshake_password(
    conn: &Connection,
    code: &str,
    hash: Option<&str>,
) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached("UPDATE handshake_codes SET password_hash = ?2 WHERE code = ?1")?
        .execute(params![code, hash])?
        == 1)
}

pub fn set_handshake_validation(
    conn: &Connection,
    code: &str,
    domains: &[String],
    processes: &[String],
) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached(
            "UPDATE handshake_codes SET allowed_domains = ?2, allowed_processes = ?3
             WHERE code = ?1",
        )?
        .execute(params![code, domains.join("\n"), processes.join("\n")])?
        == 1)
}

/// Configures an item to a handshake code of the same organization.
pub fn assign_item(
    conn: &Connection,
    item_id: &str,
    handshake_id: i64,
) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached(
            "UPDATE items SET handshake_id = ?2 WHERE item_id = ?1 AND organization_id =
                (SELECT organization_id FROM handshake_codes WHERE id = ?2)",
        )?
        .execute(params![item_id, handshake_id])?
        == 1)
}

/// Sets a tokens item's spent tokens: a balance no longer negative ends its grace, a
/// negative one is in grace (from `now` if it was not yet).
pub fn set_tokens_used(
    conn: &Connection,
    item_id: &str,
    tokens_used: i64,
    now: i64,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "UPDATE items SET tokens_used = ?2,
                grace_started_at = CASE WHEN quota < ?2 THEN coalesce(grace_started_at, ?3) END
         WHERE item_id = ?1",
    )?
    .execute(params![item_id, tokens_used, now])?;
    Ok(())
}

/// Keeps `tokens` an import added to an item not started yet, to pay debts when it starts.
pub fn add_unsettled(conn: &Connection, item_id: &str, tokens: i64) -> Result<(), StoreError> {
    // At most the item's quota: what settling can take is its balance.
    conn.prepare_cached(
        "UPDATE items SET tokens_unsettled = min(quota, tokens_unsettled + ?2) WHERE item_id = ?1",
    )?
    .execute(params![item_id, tokens])?;
    Ok(())
}

/// The items started by `now` holding unsettled tokens: (organization, item, tokens). Each
/// is cleared as it is returned (the caller settles them in the same transaction); a
/// withdrawn item keeps its own until a newer version grants it again.
pub fn take_unsettled(
    conn: &Connection,
    now: i64,
) -> Result<Vec<(String, String, i64)>, StoreError> {
    let taken = conn
        .prepare_cached(
            "SELECT organization_id, item_id, tokens_unsettled FROM items
             WHERE tokens_unsettled > 0 AND starts_at <= ?1 AND withdrawn = 0",
        )?
        .query_map([now], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    // Run before every tokens authorization: nearly always nothing to clear.
    if !taken.is_empty() {
        conn.prepare_cached(
            "UPDATE items SET tokens_unsettled = 0
             WHERE tokens_unsettled > 0 AND starts_at <= ?1 AND withdrawn = 0",
        )?
        .execute([now])?;
    }
    Ok(taken)
}

/// A license version, for the portal's list and history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LicenseVersion {
    pub license_id: String,
    pub version: u32,
    pub vendor: String,
    pub organization_id: String,
    pub issued_at: i64,
    pub imported_at: i64,
    pub kid: String,
}

/// Every imported version of every license, newest version of each license first.
pub fn license_versions(conn: &Connection) -> Result<Vec<LicenseVersion>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT license_id, version, vendor, organization_id, issued_at, imported_at, kid
         FROM licenses ORDER BY license_id, version DESC",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(LicenseVersion {
            license_id: r.get(0)?,
            version: r.get(1)?,
            vendor: r.get(2)?,
            organization_id: r.get(3)?,
            issued_at: r.get(4)?,
            imported_at: r.get(5)?,
            kid: r.get(6)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn rename_handshake(conn: &Connection, code: &str, name: &str) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached("UPDATE handshake_codes SET name = ?2 WHERE code = ?1")?
        .execute(params![code, name])?
        == 1)
}

/// Deletes a handshake code that is not its organization's default and serves no item (one
/// a newer license withdrew does not count).
/// Returns why not, if it could not.
pub fn delete_handshake(
    conn: &Connection,
    code: &str,
) -> Result<Result<(), &'static str>, StoreError> {
    let Some(h) = handshake_by_code(conn, code)? else {
        return Ok(Err("no such handshake code"));
    };
    if h.is_default {
        return Ok(Err(
            "the default handshake code of an organization cannot be deleted",
        ));
    }
    let used: i64 = conn
        .prepare_cached("SELECT COUNT(*) FROM items WHERE handshake_id = ?1 AND withdrawn = 0")?
        .query_row([h.id], |r| r.get(0))?;
    if used > 0 {
        return Ok(Err(
            "items are configured to this code: configure them to another code first",
        ));
    }
    // Items a newer license withdrew serve nobody and are not shown: they stay with the
    // organization's default code, for their history.
    conn.prepare_cached(
        "UPDATE items SET handshake_id = (SELECT id FROM handshake_codes
                                          WHERE organization_id = items.organization_id
                                            AND is_default = 1)
         WHERE handshake_id = ?1",
    )?
    .execute([h.id])?;
    // A device's authorization names its code: one renewed without it would be refused by
    // the device, so its leases end (it authorizes again with the code it is given now).
    conn.prepare_cached(
        "UPDATE leases SET handshake_id = NULL, revoked = 1 WHERE handshake_id = ?1",
    )?
    .execute([h.id])?;
    conn.prepare_cached("DELETE FROM handshake_codes WHERE id = ?1")?
        .execute([h.id])?;
    Ok(Ok(()))
}
