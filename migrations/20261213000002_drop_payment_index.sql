-- no-transaction
-- Issue 11: fewer index entries written per transfer (2 of 3). `split_allocations_payment` (split_payment_id,
-- position) duplicated the prefix of the unique constraint `split_allocations_one_per_set_allocation`
-- (split_payment_id, recommendation_allocation_id), which now finds a payment's shares (a sort of a handful of rows
-- puts them in position order). Dropped CONCURRENTLY: queries that use it finish first, nothing waits behind it.
DROP INDEX CONCURRENTLY IF EXISTS split_allocations_payment
