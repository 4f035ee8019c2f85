-- Disputes (issue 8, point 3): `charge.dispute.funds_withdrawn` is taken like a refund of the disputed amount, and
-- `charge.dispute.funds_reinstated` gives it back.
--
-- * `disputes`: one row per Stripe dispute of a split payment's charge, written by whichever of its events comes
--   first (they can arrive in any order, and more than once). `refund_id` is the `refunds` row (source `dispute`,
--   no Stripe refund id) that stands for the withdrawn funds, written once. `reinstate_seen_at`: Stripe gave the
--   funds back (won); `refunds.reinstated_at` is set when that is applied (it waits while a transfer or a reversal
--   of the payment's shares is in flight).
-- * A refund row with `reinstated_at` no longer counts: its parts take nothing from the shares, and what its
--   reversals took back is sent again as a new transfer generation.

ALTER TABLE refunds DROP CONSTRAINT refunds_known_once_answered;
ALTER TABLE refunds ADD CONSTRAINT refunds_known_once_answered
    CHECK (status IN ('REQUESTED', 'FAILED') OR stripe_refund_id IS NOT NULL OR source = 'dispute');
ALTER TABLE refunds ADD COLUMN reinstated_at TIMESTAMPTZ;
ALTER TABLE refunds ADD CONSTRAINT refunds_only_disputes_reinstated
    CHECK (reinstated_at IS NULL OR (source = 'dispute' AND status = 'SUCCEEDED'));

CREATE TABLE disputes (
    id                  BIGSERIAL PRIMARY KEY,
    stripe_dispute_id   TEXT NOT NULL,
    split_payment_id    TEXT NOT NULL REFERENCES split_payments(id),
    charge_id           TEXT NOT NULL,
    amount_cents        BIGINT NOT NULL,
    currency            TEXT NOT NULL,
    reason              TEXT,
    -- Stripe's status as last seen (`needs_response`, `won`, `lost`, …).
    status              TEXT NOT NULL,
    refund_id           BIGINT REFERENCES refunds(id),
    withdrawn_at        TIMESTAMPTZ,
    reinstate_seen_at   TIMESTAMPTZ,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT disputes_stripe_id_once UNIQUE (stripe_dispute_id),
    CONSTRAINT disputes_refund_once UNIQUE (refund_id),
    CONSTRAINT disputes_stripe_id_is_dp CHECK (stripe_dispute_id ~ '^(dp|du)_'),
    CONSTRAINT disputes_amount_positive CHECK (amount_cents > 0),
    CONSTRAINT disputes_withdrawn_has_refund CHECK ((withdrawn_at IS NULL) = (refund_id IS NULL))
);
CREATE INDEX disputes_payment ON disputes (split_payment_id);
CREATE INDEX disputes_reinstating ON disputes (reinstate_seen_at) WHERE reinstate_seen_at IS NOT NULL;

-- `donation.refund_reversed` (the seed's event for a won dispute) joins the outbound event types.
ALTER TABLE outbox_events DROP CONSTRAINT outbox_event_type_valid;
ALTER TABLE outbox_events ADD CONSTRAINT outbox_event_type_valid CHECK (event_type IN (
    'recommendation_set.payment_succeeded', 'recommendation_set.payment_failed',
    'recommendation_set.distribution_succeeded', 'recommendation_set.distribution_failed',
    'donation.created', 'donation.processing', 'donation.succeeded', 'donation.failed', 'donation.refunded',
    'donation.refund_reversed'));
