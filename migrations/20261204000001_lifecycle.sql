-- The lifecycle rules of issue 7: nothing stranded, nothing paid twice.
--
-- * A transfer generation's parameters are frozen on its `transfer_attempts` row (source transaction, transfer
--   group and metadata join destination, amount and currency), so a changed link only affects a new generation.
-- * A transfer whose retry window ended without a proof either way stays TRANSFERRING, marked `unresolved_at`.
-- * A zero net share is PARKED `net_amount_zero` (to be refunded by an operator), never a silent final state, so
--   ZERO_NET goes.
-- * The reconcilers: `next_reconcile_at` paces reconcile-pending per payment, `distributed_at` tells a payment whose
--   distribution has started, `audit_due_at` paces the daily transfer audit, `stripe_event_at` lets a stale webhook
--   (Stripe does not order them) be told from a fresh one.
-- * Discrepancies found by the audit are kept for operators, never dropped.

ALTER TABLE transfer_attempts
    ADD COLUMN source_transaction TEXT,
    ADD COLUMN transfer_group     TEXT,
    ADD COLUMN metadata           JSONB NOT NULL DEFAULT '{}'::jsonb,
    DROP CONSTRAINT transfer_attempts_outcome_valid,
    ADD CONSTRAINT transfer_attempts_outcome_valid CHECK (
        outcome IS NULL OR outcome IN ('TRANSFERRED', 'TERMINAL', 'WINDOW_ELAPSED', 'SUPERSEDED'));

ALTER TABLE split_allocations
    ADD COLUMN unresolved_at TIMESTAMPTZ,
    DROP CONSTRAINT split_allocations_status_valid,
    ADD CONSTRAINT split_allocations_status_valid CHECK (
        status IN ('PENDING', 'TRANSFERRING', 'TRANSFERRED', 'PARKED', 'REFUNDED', 'VOIDED')),
    DROP CONSTRAINT split_allocations_zero_net_is_zero,
    ADD CONSTRAINT split_allocations_transferring_is_due CHECK (
        status <> 'TRANSFERRING' OR next_attempt_at IS NOT NULL),
    ADD CONSTRAINT split_allocations_unresolved_is_transferring CHECK (
        unresolved_at IS NULL OR status = 'TRANSFERRING');

-- The sweeper and reconcile-transfers: TRANSFERRING rows by due time (the old index also held PENDING rows, which
-- are now only ever unpaid payments' shares and never due).
DROP INDEX split_allocations_due;
CREATE INDEX split_allocations_transferring_due ON split_allocations (next_attempt_at) WHERE status = 'TRANSFERRING';
CREATE INDEX split_allocations_unresolved ON split_allocations (unresolved_at) WHERE unresolved_at IS NOT NULL;

ALTER TABLE split_payments
    ADD COLUMN next_reconcile_at TIMESTAMPTZ,
    ADD COLUMN distributed_at    TIMESTAMPTZ,
    ADD COLUMN audit_due_at      TIMESTAMPTZ,
    ADD COLUMN stripe_event_at   TIMESTAMPTZ,
    ADD COLUMN failed_attempts   INTEGER NOT NULL DEFAULT 0,
    ADD COLUMN last_failed_charge_id TEXT,
    ADD CONSTRAINT payments_failed_attempts_non_negative CHECK (failed_attempts >= 0);

-- reconcile-pending: non-final payments never looked at (by age), and those due again.
DROP INDEX split_payments_status_updated;
CREATE INDEX split_payments_unreconciled ON split_payments (created_at)
    WHERE status IN ('CREATED', 'REQUIRES_PAYMENT', 'PROCESSING') AND next_reconcile_at IS NULL;
CREATE INDEX split_payments_reconcile_due ON split_payments (next_reconcile_at)
    WHERE status IN ('CREATED', 'REQUIRES_PAYMENT', 'PROCESSING') AND next_reconcile_at IS NOT NULL;
-- The sweeper and reconcile-transfers: succeeded payments whose distribution has not started.
CREATE INDEX split_payments_undistributed ON split_payments (succeeded_at)
    WHERE status = 'SUCCEEDED' AND distributed_at IS NULL;
-- The daily audit: succeeded payments by when they are next compared with Stripe (NULL once out of the window).
CREATE INDEX split_payments_audit_due ON split_payments (audit_due_at) WHERE audit_due_at IS NOT NULL;

-- What the transfer audit found at Stripe that it could not match to an allocation's generation: reported, counted,
-- shown to operators, resolved by a person.
CREATE TABLE transfer_discrepancies (
    id                  BIGSERIAL PRIMARY KEY,
    split_payment_id    TEXT NOT NULL REFERENCES split_payments(id),
    stripe_transfer_id  TEXT NOT NULL,
    split_allocation_id TEXT,
    amount_cents        BIGINT NOT NULL,
    kind                TEXT NOT NULL,
    detail              TEXT NOT NULL,
    found_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    resolved_at         TIMESTAMPTZ,
    CONSTRAINT transfer_discrepancies_kind_valid CHECK (kind IN ('unknown_transfer', 'second_transfer', 'missing_transfer')),
    CONSTRAINT transfer_discrepancies_once UNIQUE (stripe_transfer_id)
);
CREATE INDEX transfer_discrepancies_open ON transfer_discrepancies (found_at) WHERE resolved_at IS NULL;
