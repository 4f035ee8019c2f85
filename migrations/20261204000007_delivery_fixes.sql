-- Delivery fixes (issue 9, point 2, after review).

-- A delivering row whose claim expired is never sent again automatically: the sweeper ends it `failed` with its
-- outcome unknown and logs an attempt without a duration (none was measured). Found through this index: rows in
-- flight are few.
ALTER TABLE webhook_delivery_attempts ALTER COLUMN duration_ms DROP NOT NULL;
CREATE INDEX webhook_deliveries_delivering ON webhook_deliveries (claimed_until) WHERE status = 'delivering';
