-- The catalogue (handshake codes, the terms of items, license texts, the public-trial switch)
-- is held in memory by the server and reloaded when `catalogue_version.version` changes.
-- These triggers change it on every catalogue change, made by this process or another one
-- (`keygate import` while the server runs). A random value, not a counter: a rolled-back
-- change can never make an old version number mean new content.
CREATE TABLE catalogue_version (
    id      INTEGER PRIMARY KEY CHECK (id = 0),
    version INTEGER NOT NULL
) STRICT;
INSERT INTO catalogue_version (id, version) VALUES (0, random());

CREATE TRIGGER catalogue_handshake_insert AFTER INSERT ON handshake_codes
BEGIN UPDATE catalogue_version SET version = random(); END;
CREATE TRIGGER catalogue_handshake_update AFTER UPDATE ON handshake_codes
BEGIN UPDATE catalogue_version SET version = random(); END;
CREATE TRIGGER catalogue_handshake_delete AFTER DELETE ON handshake_codes
BEGIN UPDATE catalogue_version SET version = random(); END;

CREATE TRIGGER catalogue_license_insert AFTER INSERT ON licenses
BEGIN UPDATE catalogue_version SET version = random(); END;
CREATE TRIGGER catalogue_license_delete AFTER DELETE ON licenses
BEGIN UPDATE catalogue_version SET version = random(); END;

CREATE TRIGGER catalogue_item_insert AFTER INSERT ON items
BEGIN UPDATE catalogue_version SET version = random(); END;
CREATE TRIGGER catalogue_item_delete AFTER DELETE ON items
BEGIN UPDATE catalogue_version SET version = random(); END;
-- Not the consumption columns (seats_used, usage_total, ...): they change on the hot path
-- and are read from the table, never from the catalogue.
CREATE TRIGGER catalogue_item_update AFTER UPDATE OF
    item_id, license_id, license_version, organization_id, handshake_id, product, model,
    quota, starts_at, expires_at, offline_days, features, counter, max_exceptions,
    grace_days, tokens_per_pass, withdrawn ON items
BEGIN UPDATE catalogue_version SET version = random(); END;

CREATE TRIGGER catalogue_setting_insert AFTER INSERT ON settings WHEN NEW.key = 'public_trial'
BEGIN UPDATE catalogue_version SET version = random(); END;
CREATE TRIGGER catalogue_setting_update AFTER UPDATE ON settings
    WHEN NEW.key = 'public_trial' OR OLD.key = 'public_trial'
BEGIN UPDATE catalogue_version SET version = random(); END;
CREATE TRIGGER catalogue_setting_delete AFTER DELETE ON settings WHEN OLD.key = 'public_trial'
BEGIN UPDATE catalogue_version SET version = random(); END;
CREATE TRIGGER catalogue_license_update AFTER UPDATE ON licenses
BEGIN UPDATE catalogue_version SET version = random(); END;
