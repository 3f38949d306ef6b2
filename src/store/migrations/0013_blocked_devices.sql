-- The portal's list of blocked devices reads them by this index instead of walking every
-- device until a page is full. Partial: a new device (not blocked) writes nothing to it.
CREATE INDEX devices_blocked ON devices(id) WHERE blocked = 1;
