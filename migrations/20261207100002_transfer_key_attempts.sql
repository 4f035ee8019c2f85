-- Key attempts for transfer generations (issue 8 review, finding 3), as refunds and reversals have them.
--
-- A generation made without `source_transaction` (a won dispute's new generation, a retry of a share whose earlier
-- transfer used its room on the charge) draws on the platform's available balance and can be refused
-- `balance_insufficient`. Stripe saves that coded 4xx under the key and replays it, so the generation sends
-- `{key}:k{n}` after such a refusal (never after a timeout, a 5xx, a 409 or a 429). The generation's parameters,
-- metadata included, stay frozen: a lookup finds its transfer whichever key made it.
ALTER TABLE transfer_attempts ADD COLUMN key_attempt INTEGER NOT NULL DEFAULT 1;
ALTER TABLE transfer_attempts ADD CONSTRAINT transfer_attempts_key_attempt_positive CHECK (key_attempt >= 1);
