-- Delivery fixes (issue 9, point 2, after review).

-- A delivering row whose claim expired is never sent again automatically: the sweeper ends it `failed` with its
-- outcome unknown and logs an attempt without a duration (none was measured). Found through this index: rows in
-- flight are few.
ALTER TABLE webhook_delivery_attempts ALTER COLUMN duration_ms DROP NOT NULL;
CREATE INDEX webhook_deliveries_delivering ON webhook_deliveries (claimed_until) WHERE status = 'delivering';

-- A per-claim token: every record of an outcome matches the claim it was made under, so a stale task (even in the
-- same process) never overwrites a later claim. Each claim records at most one attempt (a record retried after an
-- ambiguous commit error adds nothing).
ALTER TABLE webhook_deliveries ADD COLUMN claim_token UUID;
ALTER TABLE webhook_delivery_attempts ADD COLUMN claim_token UUID;
CREATE UNIQUE INDEX webhook_delivery_attempts_claim ON webhook_delivery_attempts (claim_token);

-- The endpoint's last failed attempt: a failure after a quiet longer than a schedule's span restarts failing_since,
-- so an old failure, a quiet week and one failure do not disable the endpoint at once.
ALTER TABLE webhook_endpoints ADD COLUMN last_failure_at TIMESTAMPTZ;

-- `ops events` (newest first, optionally only failed) and `ops redeliver --since` (failed since a time) read these
-- instead of the whole table.
CREATE INDEX webhook_deliveries_created ON webhook_deliveries (created_at, id);
CREATE INDEX webhook_deliveries_failed_created ON webhook_deliveries (created_at, id) WHERE status = 'failed';
