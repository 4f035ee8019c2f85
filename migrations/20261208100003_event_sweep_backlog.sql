-- A pass of the events sweep that found more events than it reads at once leaves the rest as a backlog: the next
-- pass goes on listing after `backlog_after` (the oldest event read, Stripe's `starting_after`) among the events
-- created up to `backlog_until` (the start of the pass that left it), and when the backlog is done the cursor
-- moves to `backlog_until`.
ALTER TABLE stripe_event_sweeps
    ADD COLUMN backlog_after TEXT,
    ADD COLUMN backlog_until TIMESTAMPTZ;
