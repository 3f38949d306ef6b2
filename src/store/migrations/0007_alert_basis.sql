-- An alert mark remembers what its threshold was crossed against (the quota, max_exceptions
-- for the concurrent models, or the expiry time) instead of the license version: a renewal
-- that keeps quota and expiry no longer sends the same alerts again.
ALTER TABLE alert_marks RENAME COLUMN license_version TO basis;

-- Marks sent for the item's current version keep counting; older ones get a basis no
-- threshold has (-1), so they are cleared and sent again if still crossed, as before.
UPDATE alert_marks SET basis = coalesce((
    SELECT CASE
        WHEN alert_marks.threshold LIKE 'expiry:%' THEN i.expires_at
        WHEN i.model IN ('concurrent_device', 'concurrent_instance') THEN i.max_exceptions
        ELSE i.quota
    END
    FROM items i
    WHERE i.item_id = alert_marks.item_id AND i.license_version = alert_marks.basis
), -1);
