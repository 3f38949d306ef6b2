-- The daily housekeeping removes expired token passes in small batches through this index
-- instead of scanning the whole table in one transaction on the writer.
CREATE INDEX token_passes_by_expiry ON token_passes(expires_at);
