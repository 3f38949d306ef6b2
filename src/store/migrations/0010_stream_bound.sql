-- A device keeps at most devices::STREAMS_PER_DEVICE usage streams: a new stream past them
-- takes the place of the device's least recently written one, so a device inventing a
-- stream per request cannot grow the table. When a stream's mark was last written tells
-- which one that is (0: written before this schema).
ALTER TABLE usage_streams ADD COLUMN written_at INTEGER NOT NULL DEFAULT 0;
