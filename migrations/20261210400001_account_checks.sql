-- The accounts sweep (jobs/account_sweep.rs) asks Stripe about a recipient's connected account when its shares are
-- parked for account reasons and no `account.updated` retried them (the Connect webhook was lost). Each link
-- remembers when its account was last asked (`account_checked_at`, NULL: never), so an account is asked at most
-- once per interval whatever the number of replicas, and the least recently asked go first.
ALTER TABLE recipient_account_links
    ADD COLUMN account_checked_at TIMESTAMPTZ;
