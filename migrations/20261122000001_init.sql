-- splitpay's schema: the platform's catalogue (organisations, recipient account links, recommendation sets), the
-- money path (split payments, split allocations, transfer attempts, per-recipient donations), and the records
-- around it (Stripe event inbox, outbound event outbox, ops audit log, cron tick claims).
--
-- Ids are TEXT: platform-minted ids (cuids) for the catalogue, and `{prefix}_{base32 uuidv7}` for splitpay's own
-- rows (see src/domain/ids.rs). Amounts are BIGINT minor units. Statuses are TEXT with named CHECK constraints, so
-- a violation names the rule it broke; the allowed values mirror src/domain/state.rs.

CREATE TABLE organisations (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT organisations_name_present CHECK (length(name) > 0)
);

-- A distributing organisation's authorised link to a recipient organisation's Stripe connected account.
CREATE TABLE recipient_account_links (
    id                              TEXT PRIMARY KEY,
    distributor_organisation_id     TEXT NOT NULL REFERENCES organisations(id),
    recipient_organisation_id       TEXT NOT NULL REFERENCES organisations(id),
    recipient_org_name              TEXT NOT NULL,
    label                           TEXT NOT NULL,
    stripe_connect_account_id       TEXT NOT NULL,
    charges_enabled                 BOOLEAN NOT NULL DEFAULT false,
    is_active                       BOOLEAN NOT NULL DEFAULT true,
    created_at                      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at                      TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT links_stripe_account_is_acct CHECK (stripe_connect_account_id ~ '^acct_[A-Za-z0-9]+$'),
    CONSTRAINT links_not_self CHECK (distributor_organisation_id <> recipient_organisation_id)
);
CREATE INDEX recipient_account_links_distributor ON recipient_account_links (distributor_organisation_id);

CREATE TABLE recommendation_sets (
    id              TEXT PRIMARY KEY,
    organisation_id TEXT NOT NULL REFERENCES organisations(id),
    name            TEXT NOT NULL,
    slug            TEXT NOT NULL,
    amount_mode     TEXT NOT NULL,
    currency        TEXT NOT NULL,
    is_active       BOOLEAN NOT NULL DEFAULT true,
    archived_at     TIMESTAMPTZ,
    expires_at      TIMESTAMPTZ,
    donor_prefill   JSONB,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT sets_amount_mode_valid CHECK (amount_mode IN ('FIXED', 'SUGGESTED', 'OPEN')),
    CONSTRAINT sets_currency_lowercase_iso CHECK (currency ~ '^[a-z]{3}$'),
    CONSTRAINT sets_donor_prefill_is_object CHECK (donor_prefill IS NULL OR jsonb_typeof(donor_prefill) = 'object'),
    CONSTRAINT sets_slug_unique_per_org UNIQUE (organisation_id, slug)
);

CREATE TABLE recommendation_allocations (
    id                              TEXT PRIMARY KEY,
    recommendation_set_id           TEXT NOT NULL REFERENCES recommendation_sets(id),
    position                        INTEGER NOT NULL,
    recipient_org_account_link_id   TEXT NOT NULL REFERENCES recipient_account_links(id),
    amount_cents                    BIGINT NOT NULL,
    CONSTRAINT allocations_position_non_negative CHECK (position >= 0),
    CONSTRAINT allocations_amount_int32_non_negative CHECK (amount_cents BETWEEN 0 AND 2147483647),
    CONSTRAINT allocations_position_unique UNIQUE (recommendation_set_id, position),
    CONSTRAINT allocations_link_once_per_set UNIQUE (recommendation_set_id, recipient_org_account_link_id)
);

-- One donor payment through a set: one PaymentIntent on the platform account.
CREATE TABLE split_payments (
    id                          TEXT PRIMARY KEY,
    recommendation_set_id       TEXT NOT NULL REFERENCES recommendation_sets(id),
    organisation_id             TEXT NOT NULL REFERENCES organisations(id),
    donor_id                    TEXT,
    payment_method_type         TEXT NOT NULL,
    currency                    TEXT NOT NULL,
    total_amount_cents          BIGINT NOT NULL,
    donor_covers_fees           BOOLEAN NOT NULL DEFAULT false,
    processing_fee_cents        BIGINT,
    platform_fee_cents          BIGINT,
    fee_uncollected_cents       BIGINT,
    status                      TEXT NOT NULL DEFAULT 'CREATED',
    payment_intent_id           TEXT,
    charge_id                   TEXT,
    transfer_group              TEXT NOT NULL,
    failure_code                TEXT,
    failure_message             TEXT,
    created_at                  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at                  TIMESTAMPTZ NOT NULL DEFAULT now(),
    succeeded_at                TIMESTAMPTZ,
    CONSTRAINT payments_id_prefix CHECK (id LIKE 'spay\_%'),
    CONSTRAINT payments_method_type_valid CHECK (payment_method_type IN ('card', 'au_becs_debit', 'payto')),
    CONSTRAINT payments_payto_is_aud CHECK (payment_method_type <> 'payto' OR currency = 'aud'),
    CONSTRAINT payments_becs_is_aud CHECK (payment_method_type <> 'au_becs_debit' OR currency = 'aud'),
    CONSTRAINT payments_currency_lowercase_iso CHECK (currency ~ '^[a-z]{3}$'),
    CONSTRAINT payments_total_within_stripe_limits CHECK (total_amount_cents BETWEEN 1 AND 99999999),
    CONSTRAINT payments_fees_non_negative CHECK (
        coalesce(processing_fee_cents, 0) >= 0 AND coalesce(platform_fee_cents, 0) >= 0
        AND coalesce(fee_uncollected_cents, 0) >= 0),
    CONSTRAINT payments_status_valid CHECK (
        status IN ('CREATED', 'REQUIRES_PAYMENT', 'PROCESSING', 'SUCCEEDED', 'FAILED', 'CANCELED')),
    CONSTRAINT payments_transfer_group_is_id CHECK (transfer_group = id),
    CONSTRAINT payments_intent_is_pi CHECK (payment_intent_id IS NULL OR payment_intent_id LIKE 'pi\_%'),
    CONSTRAINT payments_charge_is_ch CHECK (charge_id IS NULL OR charge_id ~ '^(ch|py)_'),
    CONSTRAINT payments_succeeded_has_time CHECK ((status = 'SUCCEEDED') = (succeeded_at IS NOT NULL)),
    CONSTRAINT payments_intent_unique UNIQUE (payment_intent_id)
);
CREATE INDEX split_payments_status_updated ON split_payments (status, updated_at)
    WHERE status IN ('CREATED', 'REQUIRES_PAYMENT', 'PROCESSING');
CREATE INDEX split_payments_set ON split_payments (recommendation_set_id);

-- One recipient's share of a split payment.
CREATE TABLE split_allocations (
    id                              TEXT PRIMARY KEY,
    split_payment_id                TEXT NOT NULL REFERENCES split_payments(id),
    recommendation_allocation_id    TEXT NOT NULL REFERENCES recommendation_allocations(id),
    recipient_org_account_link_id   TEXT NOT NULL REFERENCES recipient_account_links(id),
    position                        INTEGER NOT NULL,
    gross_amount_cents              BIGINT NOT NULL,
    fee_share_cents                 BIGINT,
    net_amount_cents                BIGINT,
    status                          TEXT NOT NULL DEFAULT 'PENDING',
    generation                      INTEGER NOT NULL DEFAULT 0,
    idempotency_key                 TEXT,
    stripe_transfer_id              TEXT,
    attempts                        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at                 TIMESTAMPTZ,
    failure_code                    TEXT,
    failure_message                 TEXT,
    parked_at                       TIMESTAMPTZ,
    transferred_at                  TIMESTAMPTZ,
    refunded_at                     TIMESTAMPTZ,
    created_at                      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at                      TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT split_allocations_id_prefix CHECK (id LIKE 'salc\_%'),
    CONSTRAINT split_allocations_gross_positive_int32 CHECK (gross_amount_cents BETWEEN 1 AND 2147483647),
    CONSTRAINT split_allocations_fee_split_exact CHECK (
        (fee_share_cents IS NULL AND net_amount_cents IS NULL)
        OR (fee_share_cents >= 0 AND net_amount_cents >= 0
            AND fee_share_cents + net_amount_cents = gross_amount_cents)),
    CONSTRAINT split_allocations_status_valid CHECK (
        status IN ('PENDING', 'TRANSFERRING', 'TRANSFERRED', 'PARKED', 'REFUNDED', 'ZERO_NET', 'VOIDED')),
    CONSTRAINT split_allocations_generation_non_negative CHECK (generation >= 0 AND attempts >= 0),
    CONSTRAINT split_allocations_transferring_has_intent CHECK (
        status NOT IN ('TRANSFERRING', 'TRANSFERRED')
        OR (generation > 0 AND idempotency_key IS NOT NULL AND net_amount_cents > 0)),
    CONSTRAINT split_allocations_transferred_has_transfer CHECK (
        (status = 'TRANSFERRED') = (stripe_transfer_id IS NOT NULL AND transferred_at IS NOT NULL)),
    CONSTRAINT split_allocations_parked_has_time CHECK ((status = 'PARKED') = (parked_at IS NOT NULL)),
    CONSTRAINT split_allocations_zero_net_is_zero CHECK (status <> 'ZERO_NET' OR net_amount_cents = 0),
    CONSTRAINT split_allocations_transfer_is_tr CHECK (stripe_transfer_id IS NULL OR stripe_transfer_id LIKE 'tr\_%'),
    CONSTRAINT split_allocations_one_per_set_allocation UNIQUE (split_payment_id, recommendation_allocation_id),
    CONSTRAINT split_allocations_transfer_unique UNIQUE (stripe_transfer_id)
);
CREATE INDEX split_allocations_payment ON split_allocations (split_payment_id, position);
CREATE INDEX split_allocations_due ON split_allocations (next_attempt_at)
    WHERE status IN ('PENDING', 'TRANSFERRING');
CREATE INDEX split_allocations_parked ON split_allocations (parked_at) WHERE status = 'PARKED';

-- Every transfer generation of an allocation, written before Stripe is called: at most one per generation, and
-- its idempotency key (derived from the allocation id and generation) can never be reused for other parameters.
CREATE TABLE transfer_attempts (
    split_allocation_id     TEXT NOT NULL REFERENCES split_allocations(id),
    generation              INTEGER NOT NULL,
    idempotency_key         TEXT NOT NULL,
    destination_account_id  TEXT NOT NULL,
    amount_cents            BIGINT NOT NULL,
    currency                TEXT NOT NULL,
    started_at              TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at             TIMESTAMPTZ,
    outcome                 TEXT,
    stripe_transfer_id      TEXT,
    failure_code            TEXT,
    failure_message         TEXT,
    CONSTRAINT transfer_attempts_pk PRIMARY KEY (split_allocation_id, generation),
    CONSTRAINT transfer_attempts_generation_positive CHECK (generation > 0),
    CONSTRAINT transfer_attempts_amount_positive CHECK (amount_cents > 0),
    CONSTRAINT transfer_attempts_outcome_valid CHECK (
        outcome IS NULL OR outcome IN ('TRANSFERRED', 'TERMINAL', 'RETRIES_EXHAUSTED')),
    CONSTRAINT transfer_attempts_key_unique UNIQUE (idempotency_key)
);

-- The per-recipient donation each split allocation stands for (seed `Donation`, source SPLIT_GATEWAY).
CREATE TABLE donations (
    id                      TEXT PRIMARY KEY,
    organisation_id         TEXT NOT NULL REFERENCES organisations(id),
    split_allocation_id     TEXT NOT NULL REFERENCES split_allocations(id),
    donor_id                TEXT,
    source                  TEXT NOT NULL DEFAULT 'SPLIT_GATEWAY',
    status                  TEXT NOT NULL DEFAULT 'PENDING',
    amount_cents            BIGINT NOT NULL,
    refunded_amount_cents   BIGINT NOT NULL DEFAULT 0,
    currency                TEXT NOT NULL,
    donation_date           TIMESTAMPTZ NOT NULL,
    received_date           TIMESTAMPTZ,
    payment_method          TEXT,
    external_id             TEXT,
    tracking_code           TEXT,
    failure_code            TEXT,
    failure_message         TEXT,
    created_at              TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at              TIMESTAMPTZ NOT NULL DEFAULT now(),
    deleted_at              TIMESTAMPTZ,
    CONSTRAINT donations_id_prefix CHECK (id LIKE 'don\_%'),
    CONSTRAINT donations_source_valid CHECK (source IN
        ('NATIONBUILDER', 'STRIPE', 'RAISELY', 'GATEWAY', 'CHECKOUT_LINK', 'SPLIT_GATEWAY', 'MANUAL', 'OTHER')),
    CONSTRAINT donations_status_valid CHECK (status IN ('PENDING', 'CONFIRMED', 'REFUNDED', 'FAILED')),
    CONSTRAINT donations_amount_positive CHECK (amount_cents > 0),
    CONSTRAINT donations_refund_within_amount CHECK (refunded_amount_cents BETWEEN 0 AND amount_cents),
    CONSTRAINT donations_one_per_allocation UNIQUE (split_allocation_id)
);
CREATE INDEX donations_organisation ON donations (organisation_id, created_at);

-- Stripe events received by the webhook: the unique id deduplicates Stripe's redeliveries.
CREATE TABLE stripe_events (
    id              TEXT PRIMARY KEY,
    event_type      TEXT NOT NULL,
    object_id       TEXT,
    livemode        BOOLEAN NOT NULL DEFAULT false,
    payload         JSONB NOT NULL,
    stripe_created  TIMESTAMPTZ,
    received_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    processed_at    TIMESTAMPTZ,
    process_error   TEXT,
    CONSTRAINT stripe_events_id_is_evt CHECK (id LIKE 'evt\_%')
);
CREATE INDEX stripe_events_unprocessed ON stripe_events (received_at) WHERE processed_at IS NULL;

-- Events splitpay emits to organisations, written in the same transaction as the state change that causes them.
-- dedup_key makes "once per split payment / per allocation" a database rule, not a hope.
CREATE TABLE outbox_events (
    id                  TEXT PRIMARY KEY,
    dedup_key           TEXT NOT NULL,
    event_type          TEXT NOT NULL,
    organisation_id     TEXT NOT NULL REFERENCES organisations(id),
    occurred_at         TIMESTAMPTZ NOT NULL,
    payload             JSONB NOT NULL,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    delivered_at        TIMESTAMPTZ,
    delivery_attempts   INTEGER NOT NULL DEFAULT 0,
    next_attempt_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_error          TEXT,
    CONSTRAINT outbox_id_prefix CHECK (id LIKE 'oevt\_%'),
    CONSTRAINT outbox_event_type_valid CHECK (event_type IN (
        'recommendation_set.payment_succeeded', 'recommendation_set.payment_failed',
        'recommendation_set.distribution_succeeded', 'recommendation_set.distribution_failed',
        'donation.created', 'donation.processing', 'donation.succeeded', 'donation.failed', 'donation.refunded')),
    CONSTRAINT outbox_payload_shape CHECK (
        payload ? 'type' AND payload ? 'occurred_at' AND payload ? 'organisation_id' AND payload ? 'data'
        AND payload->>'type' = event_type AND payload->>'organisation_id' = organisation_id),
    CONSTRAINT outbox_dedup_key_unique UNIQUE (dedup_key)
);
CREATE INDEX outbox_events_undelivered ON outbox_events (next_attempt_at) WHERE delivered_at IS NULL;

-- Every operator command that changes something, who ran it and why.
CREATE TABLE ops_audit_log (
    id              BIGSERIAL PRIMARY KEY,
    actor           TEXT NOT NULL,
    command         TEXT NOT NULL,
    target_type     TEXT NOT NULL,
    target_id       TEXT NOT NULL,
    reason          TEXT,
    details         JSONB NOT NULL DEFAULT '{}'::jsonb,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT audit_actor_present CHECK (length(actor) > 0)
);
CREATE INDEX ops_audit_log_target ON ops_audit_log (target_type, target_id, created_at);

-- apalis-cron runs each tick in every replica; the first replica to claim (name, tick) does the work.
CREATE TABLE cron_claims (
    name        TEXT NOT NULL,
    tick        TIMESTAMPTZ NOT NULL,
    claimed_by  TEXT NOT NULL,
    claimed_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT cron_claims_pk PRIMARY KEY (name, tick)
);
