//! Background work. For now: the cron schedule the worker will load (`jobs/schedule.toml`), parsed and checked
//! here so a bad expression fails at start-up (and in the tests), not at the first tick.

pub mod schedule;
