-- A device keeps at most devices::STREAMS_PER_DEVICE (4,096) usage streams: a new stream
-- past them removes the device's least recently written ones, so a device inventing a
-- stream per request cannot grow the table. When a stream's mark was last written tells
-- which ones those are (0: written before this schema).
ALTER TABLE usage_streams ADD COLUMN written_at INTEGER NOT NULL DEFAULT 0;

-- A device that grew past the bound before it existed keeps its 4,096 streams with the most
-- reports (the streams in use), so no request meets thousands to remove.
DELETE FROM usage_streams WHERE stream IN (
    SELECT stream FROM (
        SELECT stream,
               row_number() OVER (PARTITION BY device_id ORDER BY high_seq DESC, stream) AS n
        FROM usage_streams
        WHERE device_id IN (
            SELECT device_id FROM usage_streams GROUP BY device_id HAVING count(*) > 4096))
    WHERE n > 4096);
