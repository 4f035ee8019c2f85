-- Issue 11: fewer index entries written per transfer (3 of 3: the swap, in one short transaction).
--
-- * The partial unique index built by migration 1 of 3 takes the place and the name of the constraint
--   `split_allocations_transfer_unique`: a second share recorded with the same transfer fails with the same
--   constraint name as before. An index left invalid by an interrupted build is dropped by `store::migrate` before
--   the migrations run (so migration 1 builds it again); an index of that name that is not exactly the one
--   migration 1 builds (invalid, not unique, another column, table or predicate) is refused, by name, rather than
--   trusted with that guarantee.
-- * `transfer_attempts` and `donations` leave room on their pages, so an attempt's outcome and a donation's
--   confirmation (no indexed column changes) are written as HOT updates on the same page, without index entries.
--   Only pages written from now on are affected.
--
-- Every statement here only changes the catalogue, but needs its table's lock: a lock another transaction holds
-- (a long report, a vacuum) fails the migration after 5 s rather than making every query wait behind it; the process
-- then exits, and the next start tries again.
SET LOCAL lock_timeout = '5s';
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_index i
         WHERE i.indexrelid = to_regclass('split_allocations_transferred_unique')
           AND i.indrelid = 'split_allocations'::regclass
           AND i.indisvalid AND i.indisunique
           AND pg_get_indexdef(i.indexrelid, 1, true) = 'stripe_transfer_id' AND i.indnatts = 1
           AND pg_get_expr(i.indpred, i.indrelid) = '(stripe_transfer_id IS NOT NULL)'
    ) THEN
        RAISE EXCEPTION 'index split_allocations_transferred_unique is not the valid unique index over '
            'split_allocations (stripe_transfer_id) WHERE stripe_transfer_id IS NOT NULL that migration '
            '20261213000001 builds: drop it, delete that migration''s row from _sqlx_migrations, and start again';
    END IF;
END
$$;
ALTER TABLE split_allocations DROP CONSTRAINT split_allocations_transfer_unique;
ALTER INDEX split_allocations_transferred_unique RENAME TO split_allocations_transfer_unique;
ALTER TABLE transfer_attempts SET (fillfactor = 70);
ALTER TABLE donations SET (fillfactor = 80);
