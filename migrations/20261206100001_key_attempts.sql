-- Key attempts for refunds and reversals (issue 8, review finding 1).
--
-- Stripe saves a coded 4xx refusal (e.g. `balance_insufficient`) under the request's idempotency key and replays it
-- for as long as the key lives, so a refund or reversal retried under its fixed key could never succeed once the
-- balance is back. Each row now has an attempt number: the key sent is the stored key at attempt 1 and
-- `{key}:k{n}` after; it is bumped only when Stripe answered the current key with such a saved, definitive refusal
-- (never on a timeout, a 5xx, a 409 or a 429: those may still be, or become, applied under the key).
ALTER TABLE refunds ADD COLUMN key_attempt INTEGER NOT NULL DEFAULT 1;
ALTER TABLE refunds ADD CONSTRAINT refunds_key_attempt_positive CHECK (key_attempt >= 1);
ALTER TABLE transfer_reversals ADD COLUMN key_attempt INTEGER NOT NULL DEFAULT 1;
ALTER TABLE transfer_reversals ADD CONSTRAINT transfer_reversals_key_attempt_positive CHECK (key_attempt >= 1);
