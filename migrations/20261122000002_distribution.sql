-- Distribution bookkeeping on the split payment: the fee split waits for the charge's balance transaction
-- (asynchronous capture can leave it null for a while), and those waits are counted and scheduled here, on our
-- row, rather than in the job queue (apalis has no delayed retry of its own).
ALTER TABLE split_payments
    ADD COLUMN distribution_attempts INTEGER NOT NULL DEFAULT 0,
    ADD COLUMN distribution_next_attempt_at TIMESTAMPTZ,
    ADD CONSTRAINT payments_distribution_attempts_non_negative CHECK (distribution_attempts >= 0);

-- Events whose processing failed keep their error here and are retried by the sweeper.
ALTER TABLE stripe_events
    ADD COLUMN process_attempts INTEGER NOT NULL DEFAULT 0;
