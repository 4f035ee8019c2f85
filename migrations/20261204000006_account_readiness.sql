-- Recipients who finish onboarding (issue 8, point 4): Stripe's `account.updated` refreshes each link's flags.
--
-- * `transfers_active`: the connected account's `transfers` capability is `active` (false until an event says
--   otherwise). `charges_enabled` already exists and is refreshed by the same events.
-- * `account_event_created`: Stripe's `created` of the last `account.updated` applied; an older event never
--   overwrites newer state.
-- * `transfers_activated_by`: the `evt_…` id whose application turned `transfers_active` from false to true. While
--   that event is unprocessed, its job retries the account's shares parked for account reasons, in batches.
-- * Finding a link by its account, and an account's parked shares, are index scans.

ALTER TABLE recipient_account_links
    ADD COLUMN transfers_active BOOLEAN NOT NULL DEFAULT false,
    ADD COLUMN account_event_created TIMESTAMPTZ,
    ADD COLUMN transfers_activated_by TEXT;

CREATE INDEX recipient_account_links_account ON recipient_account_links (stripe_connect_account_id);
CREATE INDEX split_allocations_parked_by_link
    ON split_allocations (recipient_org_account_link_id, parked_at, id) WHERE status = 'PARKED';
