-- Intake's Idempotency-Key records: the same key with the same body gets the same response; another body gets
-- 409 idempotency_conflict. The split payment is written with the record, so a retry after Stripe was unreachable
-- resumes the same payment (and the same PaymentIntent key) instead of creating a second one.
CREATE TABLE intake_requests (
    idempotency_key     TEXT PRIMARY KEY,
    request_sha256      TEXT NOT NULL,
    split_payment_id    TEXT NOT NULL REFERENCES split_payments(id),
    response_status     INTEGER,
    response_body       JSONB,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT intake_key_length CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    CONSTRAINT intake_response_complete CHECK ((response_status IS NULL) = (response_body IS NULL))
);

-- The PaymentMethod a request asked to confirm with server-side, so a resumed retry sends the same parameters
-- under the same PaymentIntent key.
ALTER TABLE split_payments ADD COLUMN confirm_payment_method TEXT;
