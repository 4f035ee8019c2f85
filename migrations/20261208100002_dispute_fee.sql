-- What a dispute costs the platform beyond the disputed amount: Stripe's dispute fee, net of a fee returned when
-- the dispute is won, summed from the dispute's balance transactions as last seen. Not the donor's money, so not
-- a term of a payment's conservation; shown by `ops show` as the platform's cost. `fee_balance_txns` counts the
-- balance transactions it was summed from: an earlier event (fewer) arriving late does not overwrite it.
ALTER TABLE disputes
    ADD COLUMN fee_cents BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN fee_balance_txns INT NOT NULL DEFAULT 0;
