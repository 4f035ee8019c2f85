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
    DROP CONSTRAINT transfer_attempts_outcome_valid;

-- Rows written before this migration: their generation's parameters are what the transfer job sent then.
UPDATE transfer_attempts t
   SET source_transaction = p.charge_id,
       transfer_group = p.transfer_group,
       metadata = jsonb_build_object('split_payment_id', p.id, 'split_allocation_id', a.id,
                                     'generation', t.generation::text)
  FROM split_allocations a JOIN split_payments p ON p.id = a.split_payment_id
 WHERE a.id = t.split_allocation_id;

-- Allocations parked `retries_exhausted` were parked without Stripe refusing them: back to TRANSFERRING at the same
-- generation and key, so a lookup (the key is old) decides between adopting a transfer and sending it.
UPDATE transfer_attempts t SET outcome = NULL, finished_at = NULL, failure_code = NULL, failure_message = NULL
  FROM split_allocations a
 WHERE a.id = t.split_allocation_id AND a.status = 'PARKED' AND a.failure_code = 'retries_exhausted'
   AND t.generation = a.generation;
UPDATE split_allocations
   SET status = 'TRANSFERRING', parked_at = NULL, next_attempt_at = now(), updated_at = now()
 WHERE status = 'PARKED' AND failure_code = 'retries_exhausted';
UPDATE transfer_attempts SET outcome = 'TERMINAL' WHERE outcome = 'RETRIES_EXHAUSTED';
-- Zero-net shares were a silent final state: now parked for an operator to refund.
UPDATE split_allocations
   SET status = 'PARKED', parked_at = now(), failure_code = 'net_amount_zero',
       failure_message = 'the fees took the whole share: nothing to transfer; refund it to the donor', updated_at = now()
 WHERE status = 'ZERO_NET';
UPDATE split_allocations SET next_attempt_at = now() WHERE status = 'TRANSFERRING' AND next_attempt_at IS NULL;

ALTER TABLE transfer_attempts
    ALTER COLUMN transfer_group SET NOT NULL,
    ADD CONSTRAINT transfer_attempts_outcome_valid CHECK (
        outcome IS NULL OR outcome IN ('TRANSFERRED', 'TERMINAL', 'WINDOW_ELAPSED'));

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

-- Payments before this migration: distributed when none of their shares is PENDING any more; audited soon when
-- they succeeded within the default audit window.
UPDATE split_payments p SET distributed_at = p.succeeded_at
 WHERE p.status = 'SUCCEEDED'
   AND NOT EXISTS (SELECT 1 FROM split_allocations a WHERE a.split_payment_id = p.id AND a.status = 'PENDING');
UPDATE split_payments SET audit_due_at = now()
 WHERE status = 'SUCCEEDED' AND succeeded_at > now() - interval '7 days';

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
