//! The cron schedule: `jobs/schedule.toml` names each periodic job and when it runs. apalis-cron takes the `cron`
//! crate's expressions, with seconds first (6 or 7 fields); five-field crontab lines are refused by it, so they are
//! refused here too, with the job's name in the error.
//!
//! `SPLITPAY_CRON_SCHEDULE` (optional) names another schedule file, parsed and checked exactly like the shipped one;
//! it exists for tests and drills that need ticks faster than the shipped once-a-minute-or-slower ones (the chaos
//! test runs every job every second or two). Production leaves it unset.

use std::collections::BTreeMap;
use std::str::FromStr;

/// The schedule shipped with splitpay, compiled in so a binary never runs without one.
pub const SCHEDULE_TOML: &str = include_str!("../../jobs/schedule.toml");

/// Names a schedule file to load instead of the shipped one (see the module documentation).
pub const SCHEDULE_ENV: &str = "SPLITPAY_CRON_SCHEDULE";

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
    #[error("{SCHEDULE_ENV}={path}: {reason}")]
    File { path: String, reason: String },
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

    /// The schedule the worker runs: the file `SPLITPAY_CRON_SCHEDULE` names (through `get`, the environment in
    /// production), or the shipped one when it is unset or empty.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ScheduleError> {
        match get(SCHEDULE_ENV).filter(|p| !p.trim().is_empty()) {
            None => Self::shipped(),
            Some(path) => {
                let text = std::fs::read_to_string(&path).map_err(|e| ScheduleError::File {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                Self::parse(&text).map_err(|e| ScheduleError::File {
                    path,
                    reason: e.to_string(),
                })
            }
        }
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

    #[test]
    fn an_override_file_is_loaded_and_checked_like_the_shipped_schedule() {
        let unset = Schedule::from_lookup(|_| None).unwrap();
        assert_eq!(unset, Schedule::shipped().unwrap());
        let dir = std::env::temp_dir().join(format!("splitpay-schedule-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let fast = dir.join("fast.toml");
        let text = SCHEDULE_TOML.replace("cron = \"0 * * * * *\"", "cron = \"*/2 * * * * *\"");
        std::fs::write(&fast, &text).unwrap();
        let path = fast.to_string_lossy().into_owned();
        let loaded = Schedule::from_lookup(|name| (name == SCHEDULE_ENV).then(|| path.clone())).unwrap();
        assert_eq!(loaded.jobs["reconcile-pending"].cron, "*/2 * * * * *");
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "[jobs.sweeper]\ncron = \"*/5 * * * *\"\ndescription = \"x\"\n").unwrap();
        let bad_path = bad.to_string_lossy().into_owned();
        let err = Schedule::from_lookup(|_| Some(bad_path.clone()))
            .unwrap_err()
            .to_string();
        assert!(err.contains(SCHEDULE_ENV) && err.contains("jobs.sweeper.cron"), "{err}");
        let missing = dir.join("missing.toml").to_string_lossy().into_owned();
        let err = Schedule::from_lookup(|_| Some(missing.clone()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.toml"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
