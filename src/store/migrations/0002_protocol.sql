-- keygate schema 2: devices, seats, leases, usage, concurrency windows, token passes.
-- Storage per device is constant: usage is kept as totals (per item per day, per device per
-- item), idempotency by each stream's high-water mark, never one row per report.

-- Running consumption of each item, maintained by the hot path (no counting scans).
ALTER TABLE items ADD COLUMN seats_used INTEGER NOT NULL DEFAULT 0;
ALTER TABLE items ADD COLUMN usage_total INTEGER NOT NULL DEFAULT 0;  -- per_usage: its counter
ALTER TABLE items ADD COLUMN exceptions INTEGER NOT NULL DEFAULT 0;   -- concurrent models
ALTER TABLE items ADD COLUMN tokens_used INTEGER NOT NULL DEFAULT 0;  -- tokens
ALTER TABLE items ADD COLUMN grace_started_at INTEGER;                -- tokens: balance < 0 since

CREATE TABLE devices (
    id         INTEGER PRIMARY KEY,
    uuid       TEXT NOT NULL UNIQUE,        -- lowercase, hyphenated
    name       TEXT NOT NULL DEFAULT '',
    last_user  TEXT NOT NULL DEFAULT '',
    first_seen INTEGER NOT NULL,
    last_seen  INTEGER NOT NULL,
    blocked    INTEGER NOT NULL DEFAULT 0
) STRICT;
-- Plain indexes, not partial ones: see handshake_codes in 0001.
CREATE INDEX devices_by_name ON devices(name);
CREATE INDEX devices_by_user ON devices(last_user);

-- A device's place in an item. `instance` is '' except for concurrent_instance.
CREATE TABLE seats (
    item_id       TEXT NOT NULL REFERENCES items(item_id),
    device_id     INTEGER NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    instance      TEXT NOT NULL DEFAULT '',
    first_auth_at INTEGER NOT NULL,       -- per_active_device: its 90 days start here
    last_used_at  INTEGER NOT NULL,       -- per_device: 365 days unused frees it
    last_window   INTEGER NOT NULL DEFAULT -1,  -- concurrent: last 3-minute window counted
    PRIMARY KEY (item_id, device_id, instance)
) STRICT, WITHOUT ROWID;
CREATE INDEX seats_by_device ON seats(device_id);
CREATE INDEX seats_by_first_auth ON seats(item_id, first_auth_at);
CREATE INDEX seats_by_last_used ON seats(item_id, last_used_at);

-- One lease per (device, product, instance, user): re-authorizing reuses it.
CREATE TABLE leases (
    lease_id     TEXT PRIMARY KEY,
    device_id    INTEGER NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    product      TEXT NOT NULL,
    instance     TEXT NOT NULL DEFAULT '',
    user         TEXT NOT NULL DEFAULT '',
    handshake_id INTEGER REFERENCES handshake_codes(id),  -- NULL: public trial
    item_id      TEXT REFERENCES items(item_id),          -- NULL: public trial
    nonce        TEXT NOT NULL,
    issued_at    INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    released     INTEGER NOT NULL DEFAULT 0,
    revoked      INTEGER NOT NULL DEFAULT 0,
    UNIQUE (device_id, product, instance, user)
) STRICT;

-- Idempotency of usage: the highest seq stored per stream.
CREATE TABLE usage_streams (
    stream    TEXT PRIMARY KEY,
    device_id INTEGER NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    high_seq  INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

-- Usage per item per UTC day (the portal's charts), and per device per item (device detail).
CREATE TABLE usage_daily (
    item_id TEXT NOT NULL REFERENCES items(item_id),
    day     INTEGER NOT NULL,                 -- Unix seconds of 00:00 UTC
    counter TEXT NOT NULL,
    total   INTEGER NOT NULL,
    PRIMARY KEY (item_id, day, counter)
) STRICT, WITHOUT ROWID;

CREATE TABLE device_usage (
    device_id INTEGER NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    item_id   TEXT NOT NULL REFERENCES items(item_id),
    counter   TEXT NOT NULL,
    total     INTEGER NOT NULL,
    PRIMARY KEY (device_id, item_id, counter)
) STRICT, WITHOUT ROWID;

-- Concurrent models: distinct devices (or instances) per item per 3-minute window.
CREATE TABLE concurrency_windows (
    item_id   TEXT NOT NULL REFERENCES items(item_id),
    window    INTEGER NOT NULL,               -- Unix seconds / 180
    active    INTEGER NOT NULL,
    peak      INTEGER NOT NULL,
    exception INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (item_id, window)
) STRICT, WITHOUT ROWID;

-- Tokens: a daily pass per (product, device, user), lasting 24 hours.
CREATE TABLE token_passes (
    product    TEXT NOT NULL,
    device_id  INTEGER NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    user       TEXT NOT NULL,
    item_id    TEXT NOT NULL REFERENCES items(item_id),
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (product, device_id, user)
) STRICT, WITHOUT ROWID;
