//! Configuration from the environment (a `.env` file is read too), with defaults that run on one machine.
//!
//! Secrets are wrapped in [`Secret`], whose `Debug` and `Display` print `[redacted]`, so a config dumped into a
//! log cannot leak them. The database URL may hold a password, so it is shown only through [`redact_url`].

use std::fmt;

/// Where splitpay's tables live when `DATABASE_URL` is not set: the machine's local PostgreSQL.
pub const DATABASE_URL_DEFAULT: &str = "postgres://postgres@127.0.0.1:5432/splitpay";

/// Pool size per process: a worker needs a connection per concurrent job plus apalis's own (fetch, heartbeat,
/// LISTEN); PostgreSQL's default `max_connections` of 100 then fits several replicas.
pub const DB_POOL_MAX_DEFAULT: u32 = 10;

/// A value that must never be printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The only way to read the value: name the place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// `postgres://user:pw@host/db` → `postgres://user:[redacted]@host/db`, for logs and errors.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((credentials, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match credentials.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:[redacted]@{host}"),
        None => url.to_owned(),
    }
}

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    pub url: Secret,
    pub pool_max: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{name} is not valid: {reason}")]
    Invalid { name: &'static str, reason: String },
}

impl DatabaseConfig {
    pub fn from_env() -> Result<Self, ConfigError> {
        let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| DATABASE_URL_DEFAULT.to_owned());
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(ConfigError::Invalid {
                name: "DATABASE_URL",
                reason: format!("expected a postgres:// URL, got {}", redact_url(&url)),
            });
        }
        let pool_max = match std::env::var("SPLITPAY_DB_POOL_MAX") {
            Ok(raw) => raw.parse::<u32>().ok().filter(|&n| n > 0).ok_or(ConfigError::Invalid {
                name: "SPLITPAY_DB_POOL_MAX",
                reason: format!("expected a positive integer, got '{raw}'"),
            })?,
            Err(_) => DB_POOL_MAX_DEFAULT,
        };
        Ok(Self {
            url: Secret::new(url),
            pool_max,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("sk_test_abc");
        assert_eq!(format!("{s:?} {s}"), "[redacted] [redacted]");
        assert_eq!(s.expose(), "sk_test_abc");
    }

    #[test]
    fn urls_lose_their_password() {
        assert_eq!(
            redact_url("postgres://u:hunter2@db:5432/x"),
            "postgres://u:[redacted]@db:5432/x"
        );
        assert_eq!(
            redact_url("postgres://postgres@127.0.0.1/x"),
            "postgres://postgres@127.0.0.1/x"
        );
        assert_eq!(redact_url("nonsense"), "nonsense");
    }
}
