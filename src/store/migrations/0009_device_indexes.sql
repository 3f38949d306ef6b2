-- Removing a device (an admin's removal, the daily purge of devices unused for a year)
-- deletes its rows from every table that references it (ON DELETE CASCADE, and the token
-- passes' own delete). Without an index on device_id each of those deletes scanned its whole
-- table, a million rows per removed device at scale, on the writer.
CREATE INDEX usage_streams_by_device ON usage_streams(device_id);
CREATE INDEX token_passes_by_device ON token_passes(device_id);
