-- A reversal of a dispute's withdrawal found made at Stripe after the dispute was won is owed back to its share. If
-- the share's transfer is in flight then (a won dispute's new generation, TRANSFERRING, or parked), nothing can be
-- sent at that moment: the share is marked here, in the transaction that records the reversal, and sent what it is
-- owed once it is TRANSFERRED again (by the transfer's success path, or the refunds sweep). Cleared when done.
ALTER TABLE split_allocations ADD COLUMN resend_owed_at TIMESTAMPTZ;

-- The refunds sweep looks for marked shares; almost none ever are.
CREATE INDEX split_allocations_resend_owed ON split_allocations (resend_owed_at) WHERE resend_owed_at IS NOT NULL;
