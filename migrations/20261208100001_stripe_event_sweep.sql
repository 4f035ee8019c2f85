-- How far the events sweep (jobs/event_sweep.rs) has read Stripe's event list: events created before
-- `swept_until` were all seen (in the inbox through a webhook, or put there by the sweep). One row per sweep.
CREATE TABLE stripe_event_sweeps (
    name         TEXT PRIMARY KEY,
    swept_until  TIMESTAMPTZ NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
