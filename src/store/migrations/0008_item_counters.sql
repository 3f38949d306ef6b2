-- The counter names each item has recorded, at most 64 (devices::MAX_ITEM_COUNTERS): a
-- device inventing new names would otherwise add rows without end (each name one row per
-- day in usage_daily and one per device in device_usage).
CREATE TABLE item_counters (
    item_id TEXT NOT NULL REFERENCES items(item_id),
    counter TEXT NOT NULL,
    PRIMARY KEY (item_id, counter)
) STRICT, WITHOUT ROWID;

INSERT INTO item_counters (item_id, counter) SELECT DISTINCT item_id, counter FROM usage_daily;
