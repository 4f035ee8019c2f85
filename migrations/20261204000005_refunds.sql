-- Refunds to donors and the transfer reversals they cause (issue 8, points 1, 2 and 5).
--
-- * `refunds`: one row per Stripe refund of a split payment's charge, recorded once (the Stripe id is unique). A
--   refund splitpay makes (`ops refund`) is written first as an intent (REQUESTED, with its idempotency key) and
--   committed before Stripe is called, so a crash re-sends the same key. Only a SUCCEEDED refund moves money.
-- * `refund_parts`: how much of a refund each allocation bears, and how that part was covered. A part waits
--   (covered_at NULL, every cover term 0) while its allocation's transfer is in flight; it is covered when the
--   allocation settles (the transfer job, distribution, or the refunds reconciler).
-- * `transfer_reversals`: money taken back from a recipient, each with its key written before the call, retried
--   on a stored schedule until Stripe makes it. Never dropped.

CREATE TABLE refunds (
    id                  BIGSERIAL PRIMARY KEY,
    stripe_refund_id    TEXT,
    split_payment_id    TEXT NOT NULL REFERENCES split_payments(id),
    charge_id           TEXT,
    amount_cents        BIGINT NOT NULL,
    currency            TEXT NOT NULL,
    status              TEXT NOT NULL,
    reason              TEXT,
    source              TEXT NOT NULL,
    -- The allocation the refund's metadata names (a refund splitpay made); NULL: spread over the allocations.
    split_allocation_id TEXT REFERENCES split_allocations(id),
    -- Set for the refunds splitpay makes: derived from the allocation and a sequence, written before the call.
    idempotency_key     TEXT,
    -- `ops refund --amount gross`: the fee share refunded on top of the net, borne by the platform.
    fee_refunded_cents  BIGINT NOT NULL DEFAULT 0,
    failure_message     TEXT,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- When the refund's parts were written (it succeeded and was attributed); NULL: not yet (or never: failed).
    attributed_at       TIMESTAMPTZ,
    CONSTRAINT refunds_stripe_id_once UNIQUE (stripe_refund_id),
    CONSTRAINT refunds_key_once UNIQUE (idempotency_key),
    CONSTRAINT refunds_stripe_id_is_re CHECK (stripe_refund_id IS NULL OR stripe_refund_id ~ '^(re|pyr)_'),
    CONSTRAINT refunds_amount_positive CHECK (amount_cents > 0),
    CONSTRAINT refunds_fee_within_amount CHECK (fee_refunded_cents BETWEEN 0 AND amount_cents),
    CONSTRAINT refunds_status_valid CHECK (status IN ('REQUESTED', 'PENDING', 'SUCCEEDED', 'FAILED', 'CANCELED')),
    CONSTRAINT refunds_source_valid CHECK (source IN ('ops', 'external', 'dispute')),
    CONSTRAINT refunds_requested_has_key CHECK (status <> 'REQUESTED' OR idempotency_key IS NOT NULL),
    -- A refund Stripe answered has its id; an intent Stripe refused (FAILED) may have none.
    CONSTRAINT refunds_known_once_answered CHECK (status IN ('REQUESTED', 'FAILED') OR stripe_refund_id IS NOT NULL),
    CONSTRAINT refunds_attributed_only_succeeded CHECK (attributed_at IS NULL OR status = 'SUCCEEDED')
);
CREATE INDEX refunds_payment ON refunds (split_payment_id, created_at);
CREATE INDEX refunds_allocation ON refunds (split_allocation_id) WHERE split_allocation_id IS NOT NULL;

CREATE TABLE refund_parts (
    refund_id           BIGINT NOT NULL REFERENCES refunds(id),
    split_allocation_id TEXT NOT NULL REFERENCES split_allocations(id),
    amount_cents        BIGINT NOT NULL,
    from_parked_cents   BIGINT NOT NULL DEFAULT 0,
    from_pending_cents  BIGINT NOT NULL DEFAULT 0,
    reversal_cents      BIGINT NOT NULL DEFAULT 0,
    platform_loss_cents BIGINT NOT NULL DEFAULT 0,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    covered_at          TIMESTAMPTZ,
    CONSTRAINT refund_parts_pk PRIMARY KEY (refund_id, split_allocation_id),
    CONSTRAINT refund_parts_amount_positive CHECK (amount_cents > 0),
    CONSTRAINT refund_parts_terms_non_negative CHECK (
        from_parked_cents >= 0 AND from_pending_cents >= 0 AND reversal_cents >= 0 AND platform_loss_cents >= 0),
    CONSTRAINT refund_parts_covered_exactly CHECK (
        (covered_at IS NULL AND from_parked_cents + from_pending_cents + reversal_cents + platform_loss_cents = 0)
        OR (covered_at IS NOT NULL
            AND from_parked_cents + from_pending_cents + reversal_cents + platform_loss_cents = amount_cents))
);
CREATE INDEX refund_parts_allocation ON refund_parts (split_allocation_id);
CREATE INDEX refund_parts_waiting ON refund_parts (created_at) WHERE covered_at IS NULL;

CREATE TABLE transfer_reversals (
    id                  BIGSERIAL PRIMARY KEY,
    split_allocation_id TEXT NOT NULL REFERENCES split_allocations(id),
    generation          INTEGER NOT NULL,
    seq                 INTEGER NOT NULL,
    stripe_transfer_id  TEXT NOT NULL,
    amount_cents        BIGINT NOT NULL,
    idempotency_key     TEXT NOT NULL,
    status              TEXT NOT NULL DEFAULT 'PENDING',
    attempts            INTEGER NOT NULL DEFAULT 0,
    next_attempt_at     TIMESTAMPTZ,
    failure_code        TEXT,
    failure_message     TEXT,
    stripe_reversal_id  TEXT,
    cause_refund_id     BIGINT REFERENCES refunds(id),
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    succeeded_at        TIMESTAMPTZ,
    CONSTRAINT transfer_reversals_seq_once UNIQUE (split_allocation_id, seq),
    CONSTRAINT transfer_reversals_key_once UNIQUE (idempotency_key),
    CONSTRAINT transfer_reversals_amount_positive CHECK (amount_cents > 0),
    CONSTRAINT transfer_reversals_status_valid CHECK (status IN ('PENDING', 'SUCCEEDED')),
    CONSTRAINT transfer_reversals_pending_is_due CHECK (status <> 'PENDING' OR next_attempt_at IS NOT NULL),
    CONSTRAINT transfer_reversals_succeeded_has_time CHECK ((status = 'SUCCEEDED') = (succeeded_at IS NOT NULL)),
    CONSTRAINT transfer_reversals_transfer_is_tr CHECK (stripe_transfer_id LIKE 'tr\_%')
);
CREATE INDEX transfer_reversals_due ON transfer_reversals (next_attempt_at) WHERE status = 'PENDING';
CREATE INDEX transfer_reversals_allocation ON transfer_reversals (split_allocation_id);
