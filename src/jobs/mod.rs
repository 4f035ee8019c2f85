//! Background work on apalis-postgres.
//!
//! - [`queue`]: the queues and transactional enqueueing (jobs carry ids only).
//! - [`runner`]: the worker process's machinery: one apalis worker per queue with a unique name per process start,
//!   LISTEN/NOTIFY plus a short poll, explicit heartbeats, restart on errors, graceful shutdown, and payloads
//!   decoded by us so a bad one is rejected without stopping the worker.
//! - [`schedule`]: the cron schedule the worker loads (`jobs/schedule.toml`).

pub mod queue;
pub mod runner;
pub mod schedule;
