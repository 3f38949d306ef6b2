//! Portal accounts, sessions and first-admin setup tokens. Tokens are stored only as
//! SHA-256 digests: a copy of the database does not sign anyone in.

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::StoreError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    pub id: i64,
    pub name: String,
    pub role: String,
    pub password_hash: String,
}

fn admin_from_row(r: &Row<'_>) -> rusqlite::Result<Admin> {
    Ok(Admin {
        id: r.get(0)?,
        name: r.get(1)?,
        role: r.get(2)?,
        password_hash: r.get(3)?,
    })
}

pub fn admin_count(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn
        .prepare_cached("SELECT COUNT(*) FROM admins")?
        .query_row([], |r| r.get(0))?)
}

pub fn admin_by_name(conn: &Connection, name: &str) -> Result<Option<Admin>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT id, name, role, password_hash FROM admins WHERE name = ?1")?
        .query_row([name], admin_from_row)
        .optional()?)
}

pub fn insert_admin(
    conn: &Connection,
    name: &str,
    role: &str,
    password_hash: &str,
    now: i64,
) -> Result<i64, StoreError> {
    conn.prepare_cached(
        "INSERT INTO admins (name, role, password_hash, created_at) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![name, role, password_hash, now])?;
    Ok(conn.last_insert_rowid())
}

/// Sets an admin's password and signs out all of its sessions.
pub fn set_password(
    conn: &Connection,
    name: &str,
    password_hash: &str,
) -> Result<bool, StoreError> {
    let changed = conn
        .prepare_cached("UPDATE admins SET password_hash = ?2 WHERE name = ?1")?
        .execute(params![name, password_hash])?;
    end_sessions(conn, name)?;
    Ok(changed == 1)
}

/// Signs an admin out of all its sessions.
fn end_sessions(conn: &Connection, name: &str) -> Result<(), StoreError> {
    conn.prepare_cached(
        "DELETE FROM sessions WHERE admin_id = (SELECT id FROM admins WHERE name = ?1)",
    )?
    .execute([name])?;
    Ok(())
}

/// An admin's own change: sets the password only over the one just verified (`from`), and
/// signs out all of its sessions. False, and nothing changed, when it changed meanwhile.
pub fn change_password(
    conn: &Connection,
    name: &str,
    from: &str,
    to: &str,
) -> Result<bool, StoreError> {
    let changed = conn
        .prepare_cached(
            "UPDATE admins SET password_hash = ?3 WHERE name = ?1 AND password_hash = ?2",
        )?
        .execute(params![name, from, to])?;
    if changed == 1 {
        end_sessions(conn, name)?;
    }
    Ok(changed == 1)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub admin: Admin,
    pub csrf: String,
    pub created_at: i64,
    pub last_seen: i64,
}

pub fn insert_session(
    conn: &Connection,
    token_hash: &str,
    admin_id: i64,
    csrf: &str,
    now: i64,
    address: &str,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO sessions (token_hash, admin_id, csrf, created_at, last_seen, address)
         VALUES (?1, ?2, ?3, ?4, ?4, ?5)",
    )?
    .execute(params![token_hash, admin_id, csrf, now, address])?;
    Ok(())
}

pub fn session(conn: &Connection, token_hash: &str) -> Result<Option<Session>, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT a.id, a.name, a.role, a.password_hash, s.csrf, s.created_at, s.last_seen
             FROM sessions s JOIN admins a ON a.id = s.admin_id WHERE s.token_hash = ?1",
        )?
        .query_row([token_hash], |r| {
            Ok(Session {
                admin: admin_from_row(r)?,
                csrf: r.get(4)?,
                created_at: r.get(5)?,
                last_seen: r.get(6)?,
            })
        })
        .optional()?)
}

pub fn touch_session(conn: &Connection, token_hash: &str, now: i64) -> Result<(), StoreError> {
    conn.prepare_cached("UPDATE sessions SET last_seen = ?2 WHERE token_hash = ?1")?
        .execute(params![token_hash, now])?;
    Ok(())
}

pub fn delete_session(conn: &Connection, token_hash: &str) -> Result<(), StoreError> {
    conn.prepare_cached("DELETE FROM sessions WHERE token_hash = ?1")?
        .execute([token_hash])?;
    Ok(())
}

/// Removes sessions idle since `idle_cutoff` or created before `absolute_cutoff`, and
/// expired setup tokens. Returns how many rows went.
pub fn delete_stale(
    conn: &Connection,
    idle_cutoff: i64,
    absolute_cutoff: i64,
    now: i64,
) -> Result<usize, StoreError> {
    let sessions = conn
        .prepare_cached("DELETE FROM sessions WHERE last_seen <= ?1 OR created_at <= ?2")?
        .execute(params![idle_cutoff, absolute_cutoff])?;
    let tokens = conn
        .prepare_cached("DELETE FROM setup_tokens WHERE expires_at <= ?1")?
        .execute([now])?;
    Ok(sessions + tokens)
}

pub fn insert_setup_token(
    conn: &Connection,
    token_hash: &str,
    expires_at: i64,
) -> Result<(), StoreError> {
    conn.prepare_cached("INSERT INTO setup_tokens (token_hash, expires_at) VALUES (?1, ?2)")?
        .execute(params![token_hash, expires_at])?;
    Ok(())
}

/// Whether a setup token is valid now (it stays until used or expired).
pub fn setup_token_valid(
    conn: &Connection,
    token_hash: &str,
    now: i64,
) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM setup_tokens WHERE token_hash = ?1 AND expires_at > ?2")?
        .query_row(params![token_hash, now], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Uses up every setup token (the first admin exists).
pub fn delete_setup_tokens(conn: &Connection) -> Result<(), StoreError> {
    conn.prepare_cached("DELETE FROM setup_tokens")?
        .execute([])?;
    Ok(())
}

/// Every admin, by name.
pub fn list_admins(conn: &Connection) -> Result<Vec<Admin>, StoreError> {
    let mut stmt =
        conn.prepare_cached("SELECT id, name, role, password_hash FROM admins ORDER BY name")?;
    let rows = stmt.query_map([], admin_from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn set_role(conn: &Connection, name: &str, role: &str) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached("UPDATE admins SET role = ?2 WHERE name = ?1")?
        .execute(params![name, role])?
        == 1)
}

pub fn delete_admin(conn: &Connection, name: &str) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached("DELETE FROM admins WHERE name = ?1")?
        .execute([name])?
        == 1)
}

pub fn owner_count(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn
        .prepare_cached("SELECT COUNT(*) FROM admins WHERE role = 'owner'")?
        .query_row([], |r| r.get(0))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An admin's own change goes only over the password it verified: an owner's reset
    /// between the check and the write wins, and the reset's new session stays signed in.
    #[test]
    fn a_password_change_over_a_reset_made_meanwhile_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let conn = super::super::open(&dir.path().join("k.db")).unwrap();
        let id = insert_admin(&conn, "ana", "owner", "hash-1", 0).unwrap();
        insert_session(&conn, "before", id, "csrf", 0, "10.0.0.1").unwrap();

        // Verified hash-1; an owner resets it to hash-2 before the change is written.
        assert!(set_password(&conn, "ana", "hash-2").unwrap());
        assert!(session(&conn, "before").unwrap().is_none());
        insert_session(&conn, "after-reset", id, "csrf", 1, "10.0.0.1").unwrap();
        assert!(!change_password(&conn, "ana", "hash-1", "hash-3").unwrap());
        let ana = admin_by_name(&conn, "ana").unwrap().unwrap();
        assert_eq!(ana.password_hash, "hash-2");
        assert!(session(&conn, "after-reset").unwrap().is_some());

        // Over the password it verified, it changes it and signs every session out.
        assert!(change_password(&conn, "ana", "hash-2", "hash-3").unwrap());
        let ana = admin_by_name(&conn, "ana").unwrap().unwrap();
        assert_eq!(ana.password_hash, "hash-3");
        assert!(session(&conn, "after-reset").unwrap().is_none());
        // An admin removed meanwhile: nothing to change.
        assert!(delete_admin(&conn, "ana").unwrap());
        assert!(!change_password(&conn, "ana", "hash-3", "hash-4").unwrap());
    }
}
