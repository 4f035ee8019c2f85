-- no-transaction
-- Issue 11: fewer index entries written per transfer (1 of 3: the new index, built without locking the table).
-- pg_walinspect over a burn-down counted ~21 btree leaf inserts per transfer: a share's every transition is a non-HOT
-- update (its status sits in partial-index predicates), so each of its indexes takes a new entry twice per transfer.
--
-- `split_allocations_transfer_unique` (a UNIQUE constraint) indexed every share without a transfer too, a NULL entry
-- at each start: a partial unique index over the shares that have one is built here beside it, and takes its place
-- (and name) in migration 3 of 3. Same guarantee: a Stripe transfer is recorded on at most one share.
--
-- CONCURRENTLY, so reads and writes of split_allocations go on meanwhile; it cannot run in a transaction, and
-- PostgreSQL runs several statements sent together in one, hence one statement per file. Migrations run without the
-- pool's statement timeout (store::migrate). A build interrupted half-way leaves an invalid index of this name:
-- store::migrate drops it before this runs again (IF NOT EXISTS would keep it), and migration 3 refuses one.
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS split_allocations_transferred_unique ON split_allocations (stripe_transfer_id)
    WHERE stripe_transfer_id IS NOT NULL
