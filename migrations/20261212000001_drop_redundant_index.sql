-- Issue 11: one index less to maintain on every payment insert. `split_payments_set (recommendation_set_id)` is a
-- prefix of `split_payments_set_id (recommendation_set_id, id)`, which answers every query the first one did (the
-- set's payments, and the foreign-key checks from recommendation_sets).
DROP INDEX IF EXISTS split_payments_set;
