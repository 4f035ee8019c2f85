-- Indexes for the gauges of /metrics (src/store/gauges.rs): each counts open work from a partial index and never
-- reads the history.

-- Failed webhook deliveries wait for an operator (`ops redeliver`); counted at every scrape.
CREATE INDEX webhook_deliveries_failed ON webhook_deliveries (failed_at) WHERE status = 'failed';
