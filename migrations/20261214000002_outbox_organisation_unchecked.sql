-- Issue 11: the outbox's foreign key to organisations is dropped. Its check ran for every event written, in the
-- money path's own transactions: an index lookup of the organisation and a KEY SHARE lock on its row, so every
-- transaction writing an organisation's events (the start and record batches of every replica, intake's) locked the
-- same hot row, and overlapping ones made a multixact of it (the row rewritten, WAL written: 4 buffer reads per event
-- and 1.4 WAL records per batch, a quarter of the outbox insert's time in burn-down; pg_stat_statements).
-- What it guarded is guarded where the value comes from: an event's organisation is copied from the payment or the
-- donation it is about, each with its own foreign key to organisations, and no organisation is ever deleted. The
-- benchmark's check verifies that every event of its run is addressed to its payment's (or donation's) organisation,
-- and that it exists.
-- Dropping it locks both tables (outbox_events and organisations) exclusively for an instant. Behind a long
-- transaction that holds either (a report, a dump), the wait would hold every payment's and donation's insert behind
-- it: it gives up after 5 s instead, the start fails, and the next start tries again (as 20261213000003).
SET LOCAL lock_timeout = '5s';
ALTER TABLE outbox_events DROP CONSTRAINT IF EXISTS outbox_events_organisation_id_fkey;
