-- keygate schema 1: trust, licenses, organizations, handshake codes, items.
-- Times are Unix seconds (UTC). Never edit a shipped migration: add the next one.

CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;

-- Vendor public keys trusted through `keygate trust` (config-file keys are not stored).
CREATE TABLE trusted_keys (
    kid        TEXT PRIMARY KEY,
    public_key BLOB NOT NULL,
    name       TEXT NOT NULL,
    added_at   INTEGER NOT NULL
) STRICT;

CREATE TABLE organizations (
    organization_id TEXT PRIMARY KEY,
    vendor          TEXT NOT NULL,
    created_at      INTEGER NOT NULL
) STRICT;

CREATE TABLE handshake_codes (
    id                INTEGER PRIMARY KEY,
    code              TEXT NOT NULL UNIQUE,
    organization_id   TEXT NOT NULL REFERENCES organizations(organization_id),
    name              TEXT NOT NULL,
    is_default        INTEGER NOT NULL DEFAULT 0,
    password_hash     TEXT,                       -- Argon2 PHC string, NULL: no password
    allowed_domains   TEXT NOT NULL DEFAULT '',   -- newline-separated, empty: any
    allowed_processes TEXT NOT NULL DEFAULT '',   -- newline-separated, empty: any
    created_at        INTEGER NOT NULL
) STRICT;
-- One default per organization is kept by the import transaction that creates it. (No
-- partial index here: SQLite re-prepares every query on a table with partial indexes when a
-- bound parameter meets the index's condition, which costs the hot path dearly.)
CREATE INDEX handshake_codes_by_organization ON handshake_codes(organization_id);

-- Every imported version of every license, kept for history; the highest version is current.
CREATE TABLE licenses (
    license_id      TEXT NOT NULL,
    version         INTEGER NOT NULL,
    vendor          TEXT NOT NULL,
    organization_id TEXT NOT NULL REFERENCES organizations(organization_id),
    issued_at       INTEGER NOT NULL,
    kid             TEXT NOT NULL,
    jws             TEXT NOT NULL,
    sha256          TEXT NOT NULL,
    imported_at     INTEGER NOT NULL,
    PRIMARY KEY (license_id, version)
) STRICT;

-- The items of the current version of each license. An item keeps its id, handshake code
-- and usage across renewals; an item a newer version no longer lists is withdrawn.
CREATE TABLE items (
    item_id          TEXT PRIMARY KEY,
    license_id       TEXT NOT NULL,
    license_version  INTEGER NOT NULL,
    organization_id  TEXT NOT NULL REFERENCES organizations(organization_id),
    handshake_id     INTEGER NOT NULL REFERENCES handshake_codes(id),
    product          TEXT NOT NULL,
    model            TEXT NOT NULL,
    quota            INTEGER NOT NULL,
    starts_at        INTEGER NOT NULL,
    expires_at       INTEGER NOT NULL,
    offline_days     INTEGER NOT NULL,
    features         TEXT NOT NULL,   -- JSON array
    counter          TEXT,
    max_exceptions   INTEGER,
    grace_days       INTEGER,
    tokens_per_pass  INTEGER,
    withdrawn        INTEGER NOT NULL DEFAULT 0,
    FOREIGN KEY (license_id, license_version) REFERENCES licenses(license_id, version)
) STRICT;
CREATE INDEX items_by_handshake ON items(handshake_id, product);
CREATE INDEX items_by_license ON items(license_id);
