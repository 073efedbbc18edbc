-- Attempts made before the current round: a redelivery starts a new round,
-- and the retry schedule counts from it.
ALTER TABLE deliveries ADD COLUMN round_start INTEGER NOT NULL DEFAULT 0;

-- Operators page an organisation's deliveries by status.
CREATE INDEX deliveries_by_org ON deliveries (org_id, status, id);
