//! The catalogue: what every authorization reads and only imports and administrators change
//! (handshake codes, the terms of items, the signed license texts, the public-trial switch).
//! It is loaded once, held in memory, and reloaded when its version in the database changes:
//! the triggers of migration 0005 change the version on every catalogue write, made by this
//! process or by another one (`keygate import` while the server runs), and a write that is
//! rolled back takes its version change with it.
//!
//! Items' live consumption (seats used, usage, tokens) is not part of it: it changes on every
//! new seat and is read from the item's row with [`consumption`].

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};

use super::StoreError;
use super::licenses::{self, CONSUMPTION_COLUMNS, HandshakeCode, ItemRow, consumption_at};
use crate::licensing::models::Consumption;

/// The setting that turns the public trial on.
pub const PUBLIC_TRIAL: &str = "public_trial";

/// Turns the public trial on or off; whether that changed it (a change is audited, a
/// repeat is not).
pub fn set_public_trial(conn: &Connection, on: bool) -> Result<bool, StoreError> {
    let state = if on { "on" } else { "off" };
    if super::settings::get(conn, PUBLIC_TRIAL)?
        .as_deref()
        .unwrap_or("off")
        == state
    {
        return Ok(false);
    }
    super::settings::set(conn, PUBLIC_TRIAL, state)?;
    Ok(true)
}

#[derive(Debug, Default)]
pub struct Catalogue {
    version: i64,
    handshakes: Vec<HandshakeCode>,
    by_code: HashMap<String, usize>,
    by_id: HashMap<i64, usize>,
    default_of: HashMap<String, usize>,
    /// Every item, withdrawn ones too (a lease may still name one); consumption zeroed.
    items: HashMap<String, ItemRow>,
    /// The items each handshake code serves per product, soonest expiry first.
    serving: HashMap<i64, HashMap<String, Vec<String>>>,
    /// The signed text of each license version an item belongs to.
    licenses: HashMap<(String, u32), String>,
    newest_license: Option<String>,
    public_trial: bool,
}

impl Catalogue {
    fn load(conn: &Connection, version: i64) -> Result<Catalogue, StoreError> {
        let handshakes = licenses::handshake_codes(conn)?;
        let index = |key: fn(&HandshakeCode) -> Option<String>| {
            handshakes
                .iter()
                .enumerate()
                .filter_map(|(i, h)| key(h).map(|k| (k, i)))
                .collect::<HashMap<_, _>>()
        };
        let by_code = index(|h| Some(h.code.clone()));
        let default_of = index(|h| h.is_default.then(|| h.organization_id.clone()));
        let by_id = handshakes
            .iter()
            .enumerate()
            .map(|(i, h)| (h.id, i))
            .collect();

        let mut all = licenses::all_items(conn)?;
        all.sort_by(|a, b| (a.terms.expires_at, &a.item_id).cmp(&(b.terms.expires_at, &b.item_id)));
        let mut serving: HashMap<i64, HashMap<String, Vec<String>>> = HashMap::new();
        for item in all.iter().filter(|i| !i.withdrawn) {
            serving
                .entry(item.handshake_id)
                .or_default()
                .entry(item.product.clone())
                .or_default()
                .push(item.item_id.clone());
        }
        let mut licenses = HashMap::new();
        for item in &all {
            let key = (item.license_id.clone(), item.license_version);
            if let Entry::Vacant(slot) = licenses.entry(key) {
                slot.insert(licenses::license_jws(
                    conn,
                    &item.license_id,
                    item.license_version,
                )?);
            }
        }
        let items = all
            .into_iter()
            .map(|item| {
                let item = ItemRow {
                    used: Consumption::default(),
                    ..item
                };
                (item.item_id.clone(), item)
            })
            .collect();
        Ok(Catalogue {
            version,
            handshakes,
            by_code,
            by_id,
            default_of,
            items,
            serving,
            licenses,
            newest_license: licenses::newest_license_jws(conn)?,
            public_trial: super::settings::get(conn, PUBLIC_TRIAL)?.as_deref() == Some("on"),
        })
    }

    pub fn handshake_by_code(&self, code: &str) -> Option<&HandshakeCode> {
        self.by_code.get(code).map(|&i| &self.handshakes[i])
    }

    pub fn handshake(&self, id: i64) -> Option<&HandshakeCode> {
        self.by_id.get(&id).map(|&i| &self.handshakes[i])
    }

    /// The organization's default handshake code.
    pub fn default_handshake(&self, organization_id: &str) -> Option<&HandshakeCode> {
        self.default_of
            .get(organization_id)
            .map(|&i| &self.handshakes[i])
    }

    /// An item's terms (consumption zeroed: see [`consumption`]), withdrawn or not.
    pub fn item(&self, item_id: &str) -> Option<&ItemRow> {
        self.items.get(item_id)
    }

    /// The current items a handshake code serves for a product, soonest expiry first.
    pub fn items_for<'a>(
        &'a self,
        handshake_id: i64,
        product: &str,
    ) -> impl Iterator<Item = &'a ItemRow> + 'a {
        self.serving
            .get(&handshake_id)
            .and_then(|products| products.get(product))
            .into_iter()
            .flatten()
            .filter_map(|id| self.items.get(id))
    }

    /// The signed text of the license version an item belongs to.
    pub fn license_jws(&self, item: &ItemRow) -> Option<&str> {
        self.licenses
            .get(&(item.license_id.clone(), item.license_version))
            .map(String::as_str)
    }

    /// The license the public trial's authorization carries for `product`, as proof that
    /// the vendor licensed this appliance's key: one with a current item for the product
    /// (the device verifies it with its vendor's key: with several vendors, the newest
    /// license may be another's), the one running longest; else the newest imported.
    pub fn trial_license_jws(&self, product: &str) -> Option<&str> {
        self.items
            .values()
            .filter(|item| !item.withdrawn && item.product == product)
            .max_by_key(|item| (item.terms.expires_at, &item.item_id))
            .and_then(|item| self.license_jws(item))
            .or(self.newest_license.as_deref())
    }

    pub fn public_trial(&self) -> bool {
        self.public_trial
    }
}

/// The catalogue as last loaded, shared by the server's threads.
#[derive(Default)]
pub struct CatalogueCache {
    current: Mutex<Option<Arc<Catalogue>>>,
}

impl CatalogueCache {
    /// The catalogue as `conn` sees it: the one in memory if its version is still the
    /// database's, else loaded again through `conn` (inside the caller's transaction, so it
    /// agrees with everything else the caller reads).
    pub fn current(&self, conn: &Connection) -> Result<Arc<Catalogue>, StoreError> {
        let version: i64 = conn
            .prepare_cached("SELECT version FROM catalogue_version")?
            .query_row([], |r| r.get(0))?;
        if let Some(held) = self.current.lock().expect("catalogue lock").as_ref()
            && held.version == version
        {
            return Ok(held.clone());
        }
        let loaded = Arc::new(Catalogue::load(conn, version)?);
        *self.current.lock().expect("catalogue lock") = Some(loaded.clone());
        Ok(loaded)
    }
}

/// An item's live consumption, from its row.
pub fn consumption(conn: &Connection, item_id: &str) -> Result<Option<Consumption>, StoreError> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {CONSUMPTION_COLUMNS} FROM items WHERE item_id = ?1"
        ))?
        .query_row(params![item_id], |r| consumption_at(r, 0))
        .optional()?)
}

/// An item of the catalogue with its live consumption.
pub fn live(conn: &Connection, item: &ItemRow) -> Result<ItemRow, StoreError> {
    let used = consumption(conn, &item.item_id)?.unwrap_or_default();
    Ok(ItemRow {
        used,
        ..item.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_changes_with_the_catalogue_and_not_with_consumption() {
        let dir = tempfile::tempdir().unwrap();
        let conn = super::super::open(&dir.path().join("k.db")).unwrap();
        let cache = CatalogueCache::default();
        let version = |conn: &Connection| -> i64 {
            conn.query_row("SELECT version FROM catalogue_version", [], |r| r.get(0))
                .unwrap()
        };
        let first = cache.current(&conn).unwrap();
        assert!(Arc::ptr_eq(&first, &cache.current(&conn).unwrap()));
        assert!(!first.public_trial());

        let v0 = version(&conn);
        super::super::settings::set(&conn, "smtp_host", "mail.lan").unwrap();
        assert_eq!(version(&conn), v0, "other settings are not the catalogue");
        super::super::settings::set(&conn, PUBLIC_TRIAL, "on").unwrap();
        assert_ne!(version(&conn), v0);
        let second = cache.current(&conn).unwrap();
        assert!(second.public_trial());

        licenses::ensure_organization(&conn, "org", "Vendor", 0).unwrap();
        let id = licenses::insert_handshake(&conn, "CODE-1", "org", "Default", true, 0).unwrap();
        let third = cache.current(&conn).unwrap();
        assert_eq!(third.handshake_by_code("CODE-1").unwrap().id, id);
        assert_eq!(third.default_handshake("org").unwrap().code, "CODE-1");
        assert!(third.handshake(id).is_some());

        conn.execute_batch(
            "INSERT INTO licenses VALUES ('L', 1, 'Vendor', 'org', 0, 'kid', 'jws', 'sha', 0);
             INSERT INTO items (item_id, license_id, license_version, organization_id,
                 handshake_id, product, model, quota, starts_at, expires_at, offline_days, features)
             VALUES ('L-1', 'L', 1, 'org', 1, 'app', 'per_device', 10, 0, 9, 7, '[]');",
        )
        .unwrap();
        let fourth = cache.current(&conn).unwrap();
        assert_eq!(fourth.items_for(id, "app").count(), 1);
        assert_eq!(fourth.license_jws(fourth.item("L-1").unwrap()), Some("jws"));
        let v2 = version(&conn);
        conn.execute_batch("UPDATE items SET seats_used = 3, usage_total = 9, tokens_used = 1")
            .unwrap();
        assert_eq!(version(&conn), v2, "consumption is not the catalogue");
        assert_eq!(consumption(&conn, "L-1").unwrap().unwrap().seats_used, 3);
        conn.execute_batch("UPDATE items SET withdrawn = 1")
            .unwrap();
        let fifth = cache.current(&conn).unwrap();
        assert_eq!(fifth.items_for(id, "app").count(), 0);
        assert!(fifth.item("L-1").unwrap().withdrawn);

        // A rolled-back change takes its version change with it.
        let v1 = version(&conn);
        conn.execute_batch(
            "SAVEPOINT s; UPDATE handshake_codes SET name = 'x'; ROLLBACK TO s; RELEASE s;",
        )
        .unwrap();
        assert_eq!(version(&conn), v1);
        assert!(Arc::ptr_eq(&fifth, &cache.current(&conn).unwrap()));
    }
}
