-- Issue 11: fewer index entries and row versions written per transfer. pg_walinspect over a burn-down counted ~21
-- btree leaf inserts per transfer; a share's every transition is a non-HOT update (its status sits in partial-index
-- predicates), so each of its indexes takes a new entry twice per transfer.
--
-- * `split_allocations_payment` (split_payment_id, position) duplicated the prefix of the unique constraint
--   `split_allocations_one_per_set_allocation` (split_payment_id, recommendation_allocation_id): a payment's shares
--   are found through that one now, and put in position order by a sort of a handful of rows.
-- * `split_allocations_transfer_unique` indexed every share without a transfer too (a NULL entry for each start):
--   it becomes a partial unique index over the shares that have one. Same name, same guarantee (a Stripe transfer
--   is recorded on at most one share), same error on a second share.
-- * `transfer_attempts` and `donations` leave room on their pages, so an attempt's outcome and a donation's
--   confirmation (no indexed column changes) are written as HOT updates on the same page, without index entries.
--   Only pages written from now on are affected.
--
-- The unique index is built under the table's lock (a migration runs in one transaction): about a second per
-- million shares, during which writes to split_allocations wait.

DROP INDEX split_allocations_payment;

ALTER TABLE split_allocations DROP CONSTRAINT split_allocations_transfer_unique;
CREATE UNIQUE INDEX split_allocations_transfer_unique ON split_allocations (stripe_transfer_id)
    WHERE stripe_transfer_id IS NOT NULL;

ALTER TABLE transfer_attempts SET (fillfactor = 70);
ALTER TABLE donations SET (fillfactor = 80);
