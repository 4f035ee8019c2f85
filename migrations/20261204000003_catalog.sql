-- The catalogue API (issue 9, point 4): the platform upserts organisations, links and sets.
--
-- * A link can be archived (as a set can): an archived link takes no new payment and no set may name it.
-- * A set's allocation that an upsert drops is marked `removed_at`, never deleted: split allocations reference it
--   (a payment keeps its own amounts and link), and a foreign key must never block the platform's upsert. The
--   position and link-once rules therefore hold among the allocations not removed.
-- * Listing a set's payments by id (time-ordered) is an index scan.

ALTER TABLE recipient_account_links ADD COLUMN archived_at TIMESTAMPTZ;

ALTER TABLE recommendation_allocations ADD COLUMN removed_at TIMESTAMPTZ;
ALTER TABLE recommendation_allocations
    DROP CONSTRAINT allocations_position_unique,
    DROP CONSTRAINT allocations_link_once_per_set;
CREATE UNIQUE INDEX allocations_position_unique
    ON recommendation_allocations (recommendation_set_id, position) WHERE removed_at IS NULL;
CREATE UNIQUE INDEX allocations_link_once_per_set
    ON recommendation_allocations (recommendation_set_id, recipient_org_account_link_id) WHERE removed_at IS NULL;

CREATE INDEX split_allocations_set_allocation ON split_allocations (recommendation_allocation_id);
CREATE INDEX split_payments_set_id ON split_payments (recommendation_set_id, id);
