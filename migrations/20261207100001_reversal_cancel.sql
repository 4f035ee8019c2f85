-- A won dispute cancels the reversals its withdrawal asked for and Stripe has not made (issue 8 review, finding 1).
--
-- * `CANCELED`: a reversal that will never be made. Only a reversal no request of which can have been applied is
--   canceled at once; one whose outcome is in doubt is marked `cancel_requested_at`, is never sent again, and is
--   settled by a lookup at Stripe (made: SUCCEEDED; not made: CANCELED).
-- * `in_doubt_since`: set before a request is sent, cleared when Stripe answers it with a saved refusal (nothing was
--   applied under that key); NULL means no request of this row can have been applied.
-- * `sends_metadata`: the request carries our reversal id in Stripe's `metadata` (so the reversal can be found by a
--   lookup). Rows written before this migration were first sent without it: their key keeps its parameters.
ALTER TABLE transfer_reversals DROP CONSTRAINT transfer_reversals_status_valid;
ALTER TABLE transfer_reversals ADD CONSTRAINT transfer_reversals_status_valid
    CHECK (status IN ('PENDING', 'SUCCEEDED', 'CANCELED'));
ALTER TABLE transfer_reversals ADD COLUMN in_doubt_since TIMESTAMPTZ;
ALTER TABLE transfer_reversals ADD COLUMN cancel_requested_at TIMESTAMPTZ;
ALTER TABLE transfer_reversals ADD COLUMN canceled_at TIMESTAMPTZ;
ALTER TABLE transfer_reversals ADD CONSTRAINT transfer_reversals_canceled_has_time
    CHECK ((status = 'CANCELED') = (canceled_at IS NOT NULL));
ALTER TABLE transfer_reversals ADD COLUMN sends_metadata BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE transfer_reversals ALTER COLUMN sends_metadata SET DEFAULT true;
