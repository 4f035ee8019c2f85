-- One Stripe rate budget per deployment (issue 11): the state of the limiter every replica shares, one row per
-- Stripe key, keyed by a fingerprint of the key (never the key). A process reserves a batch of request slots with one
-- UPDATE … RETURNING (src/store/rate_limits.rs); a 429 from Stripe halves the rate for every replica, and the rate
-- recovers linearly.
CREATE TABLE stripe_rate_limits (
    account_fingerprint text PRIMARY KEY,
    -- GCRA's "theoretical arrival time": when the next slot is free, in microseconds since the Unix epoch on the
    -- database's clock (the only clock every replica shares).
    tat_us bigint NOT NULL,
    -- The share of the configured rate in force, in permille, as it was at `throttled_at_us`; it recovers linearly
    -- from there (see src/store/rate_limits.rs).
    scale_permille integer NOT NULL DEFAULT 1000
        CONSTRAINT stripe_rate_limits_scale_between_1_and_1000 CHECK (scale_permille BETWEEN 1 AND 1000),
    -- The last 429 that slowed the budget down (0: never), microseconds since the Unix epoch (database clock).
    throttled_at_us bigint NOT NULL DEFAULT 0,
    throttles_total bigint NOT NULL DEFAULT 0
        CONSTRAINT stripe_rate_limits_throttles_not_negative CHECK (throttles_total >= 0)
) WITH (fillfactor = 50); -- room for HOT updates: the row is rewritten for every batch of slots
