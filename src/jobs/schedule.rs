//! The cron schedule: `jobs/schedule.toml` names each periodic job and when it runs. apalis-cron takes the `cron`
//! crate's expressions, with seconds first (6 or 7 fields); five-field crontab lines are refused by it, so they are
//! refused here too, with the job's name in the error.

use std::collections::BTreeMap;
use std::str::FromStr;

/// The schedule shipped with splitpay, compiled in so a binary never runs without one.
pub const SCHEDULE_TOML: &str = include_str!("../../jobs/schedule.toml");

/// The periodic jobs splitpay knows; a schedule entry for anything else is a typo.
pub const KNOWN_JOBS: [&str; 3] = ["reconcile-pending", "reconcile-transfers", "sweeper"];

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CronEntry {
    /// `sec min hour day-of-month month day-of-week [year]`.
    pub cron: String,
    /// What the job does, for `--help`-style listings and the README.
    pub description: String,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    pub jobs: BTreeMap<String, CronEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("schedule is not valid TOML: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("jobs.{job}.cron '{expr}' is not a valid cron expression (seconds first, 6 or 7 fields): {reason}")]
    BadCron { job: String, expr: String, reason: String },
    #[error("jobs.{0} is not a job splitpay runs (known: reconcile-pending, reconcile-transfers, sweeper)")]
    UnknownJob(String),
    #[error("jobs.{0} is missing from the schedule")]
    MissingJob(&'static str),
}

impl Schedule {
    pub fn parse(text: &str) -> Result<Self, ScheduleError> {
        let schedule: Schedule = toml::from_str(text)?;
        for (job, entry) in &schedule.jobs {
            if !KNOWN_JOBS.contains(&job.as_str()) {
                return Err(ScheduleError::UnknownJob(job.clone()));
            }
            let fields = entry.cron.split_whitespace().count();
            let parsed = if (6..=7).contains(&fields) {
                cron::Schedule::from_str(&entry.cron)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            } else {
                Err(format!("{fields} fields"))
            };
            parsed.map_err(|reason| ScheduleError::BadCron {
                job: job.clone(),
                expr: entry.cron.clone(),
                reason,
            })?;
        }
        if let Some(missing) = KNOWN_JOBS.iter().find(|j| !schedule.jobs.contains_key(**j)) {
            return Err(ScheduleError::MissingJob(missing));
        }
        Ok(schedule)
    }

    pub fn shipped() -> Result<Self, ScheduleError> {
        Self::parse(SCHEDULE_TOML)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_schedule_is_valid_and_complete() {
        let schedule = Schedule::shipped().unwrap();
        assert_eq!(schedule.jobs.keys().map(String::as_str).collect::<Vec<_>>(), KNOWN_JOBS);
    }

    #[test]
    fn bad_entries_are_named() {
        let five_fields = "[jobs.sweeper]\ncron = \"*/5 * * * *\"\ndescription = \"x\"\n";
        let err = Schedule::parse(five_fields).unwrap_err().to_string();
        assert!(err.contains("jobs.sweeper.cron"), "{err}");
        let unknown = "[jobs.sweepr]\ncron = \"0 * * * * *\"\ndescription = \"x\"\n";
        assert!(matches!(Schedule::parse(unknown), Err(ScheduleError::UnknownJob(j)) if j == "sweepr"));
        let missing = "[jobs.sweeper]\ncron = \"0 * * * * *\"\ndescription = \"x\"\n";
        assert!(matches!(
            Schedule::parse(missing),
            Err(ScheduleError::MissingJob("reconcile-pending"))
        ));
        let garbage = "[jobs.sweeper]\ncron = \"0 61 * * * *\"\ndescription = \"x\"\n";
        assert!(matches!(Schedule::parse(garbage), Err(ScheduleError::BadCron { .. })));
    }
}
