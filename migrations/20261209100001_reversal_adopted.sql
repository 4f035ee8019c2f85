-- A reversal made for a refund that no longer stands (an `ops refund` intent a dispute closed, a refund Stripe
-- failed) holds the recipient's money on the platform's balance. A later refund of the same share (a dispute's
-- withdrawal, a dashboard refund) takes it as its own instead of reversing the transfer a second time:
-- `cause_refund_id` then names the refund that uses it, and this column the one it was made for.
ALTER TABLE transfer_reversals ADD COLUMN adopted_from_refund_id BIGINT REFERENCES refunds (id);
