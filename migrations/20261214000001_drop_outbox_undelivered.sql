-- no-transaction
-- Issue 11: one index entry fewer per outbox event (~2.3 per transfer). `outbox_events_undelivered` indexed the
-- outbox's own delivery schedule from before webhook_deliveries (20261204000004) took delivery over, one row per
-- event and endpoint; nothing has read `outbox_events.next_attempt_at` or `delivered_at` by it since
-- (`pg_stat_user_indexes`: no scan in a burn-down), and every event still wrote an entry. Dropped CONCURRENTLY, as
-- 20261213000002.
DROP INDEX CONCURRENTLY IF EXISTS outbox_events_undelivered
