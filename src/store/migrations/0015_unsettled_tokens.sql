-- Tokens an import added to an item that had not started yet: they pay the organization's
-- debts for the product once the item starts, not before (`import::settle_started`).
ALTER TABLE items ADD COLUMN tokens_unsettled INTEGER NOT NULL DEFAULT 0;
CREATE INDEX items_unsettled ON items(starts_at) WHERE tokens_unsettled > 0;
