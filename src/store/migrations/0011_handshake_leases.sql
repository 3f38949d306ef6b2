-- Deleting a handshake code revokes its leases, and SQLite checks the leases' foreign key
-- to the code: without an index both scanned every lease (a million rows at scale) on the
-- writer, holding every device's request behind them.
CREATE INDEX leases_by_handshake ON leases(handshake_id);
