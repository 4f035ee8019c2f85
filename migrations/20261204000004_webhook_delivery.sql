-- Outbound webhook delivery (issue 9, points 1 and 2): the endpoints organisations register, one delivery row per
-- (outbox event, endpoint) carrying its own retry schedule and claim, and an append-only log of every attempt.

CREATE TABLE webhook_endpoints (
    id                          TEXT PRIMARY KEY,
    organisation_id             TEXT NOT NULL REFERENCES organisations(id),
    url                         TEXT NOT NULL,
    -- NULL: every event type; otherwise only these.
    event_types                 TEXT[],
    -- `whsec_` + base64 of 32 random bytes. Never logged.
    secret                      TEXT NOT NULL,
    -- The secret before the last rotation, still signing until previous_secret_expires_at (24 h).
    previous_secret             TEXT,
    previous_secret_expires_at  TIMESTAMPTZ,
    -- Set when the first failure after a success happened; cleared by any success. An endpoint failing for
    -- 5 days is disabled.
    failing_since               TIMESTAMPTZ,
    disabled_at                 TIMESTAMPTZ,
    disabled_reason             TEXT,
    created_at                  TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT webhook_endpoint_id_prefix CHECK (id LIKE 'whep\_%'),
    CONSTRAINT webhook_endpoint_secret_shape CHECK (secret LIKE 'whsec\_%'),
    CONSTRAINT webhook_endpoint_previous_pair CHECK ((previous_secret IS NULL) = (previous_secret_expires_at IS NULL))
);
CREATE INDEX webhook_endpoints_enabled ON webhook_endpoints (organisation_id) WHERE disabled_at IS NULL;

CREATE TABLE webhook_deliveries (
    id                  TEXT PRIMARY KEY,
    outbox_event_id     TEXT NOT NULL REFERENCES outbox_events(id),
    endpoint_id         TEXT NOT NULL REFERENCES webhook_endpoints(id),
    status              TEXT NOT NULL DEFAULT 'pending',
    -- Attempts claimed so far (a claim counts even if its worker died before recording the outcome).
    attempts            INTEGER NOT NULL DEFAULT 0,
    -- Seconds to wait after failed attempt n (1-based) before attempt n+1; its length + 1 is the attempt limit.
    schedule_secs       INTEGER[] NOT NULL,
    next_attempt_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    claimed_by          TEXT,
    claimed_until       TIMESTAMPTZ,
    succeeded_at        TIMESTAMPTZ,
    failed_at           TIMESTAMPTZ,
    last_error          TEXT,
    -- 'scheduled' from the outbox; 'manual' once an operator queued it again (ops redeliver).
    trigger             TEXT NOT NULL DEFAULT 'scheduled',
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT webhook_delivery_trigger_valid CHECK (trigger IN ('scheduled', 'manual')),
    CONSTRAINT webhook_delivery_id_prefix CHECK (id LIKE 'whdl\_%'),
    CONSTRAINT webhook_delivery_status_valid CHECK (status IN ('pending', 'delivering', 'succeeded', 'failed')),
    CONSTRAINT webhook_delivery_claim CHECK ((status = 'delivering') = (claimed_until IS NOT NULL)),
    CONSTRAINT webhook_delivery_once UNIQUE (outbox_event_id, endpoint_id)
);
CREATE INDEX webhook_deliveries_open ON webhook_deliveries (next_attempt_at) WHERE status IN ('pending', 'delivering');
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id, created_at);

CREATE TABLE webhook_delivery_attempts (
    id                  BIGSERIAL PRIMARY KEY,
    delivery_id         TEXT NOT NULL REFERENCES webhook_deliveries(id),
    attempt_number      INTEGER NOT NULL,
    -- 'scheduled' (the delivery's own schedule) or 'manual' (ops redeliver).
    trigger             TEXT NOT NULL,
    -- NULL when no HTTP response came (timeout, refused connection).
    status_code         INTEGER,
    duration_ms         BIGINT NOT NULL,
    error               TEXT,
    -- At most 1 KiB of the response body.
    response_body       TEXT,
    at                  TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT webhook_attempt_trigger_valid CHECK (trigger IN ('scheduled', 'manual')),
    CONSTRAINT webhook_attempt_body_capped CHECK (octet_length(response_body) <= 1024)
);
CREATE INDEX webhook_delivery_attempts_delivery ON webhook_delivery_attempts (delivery_id, id);
