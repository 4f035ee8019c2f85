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

/// Jobs a worker runs at once per queue. A job spends most of its time waiting (on Stripe, on a commit), so this is
/// well above the cores: 32 gave ~190 transfers/s on 2 cores where 4 gave ~67 (issue 11; README, Benchmark).
pub const WORKER_CONCURRENCY_DEFAULT: usize = 32;

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

/// The same server URL with another database name (query parameters kept).
pub fn url_with_database(base: &str, name: &str) -> String {
    let (without_query, query) = match base.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (base, None),
    };
    let scheme_end = without_query.find("://").map_or(0, |i| i + 3);
    let prefix = match without_query[scheme_end..].find('/') {
        Some(i) => &without_query[..scheme_end + i],
        None => without_query,
    };
    match query {
        Some(q) => format!("{prefix}/{name}?{q}"),
        None => format!("{prefix}/{name}"),
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
    fn urls_swap_their_database() {
        assert_eq!(
            url_with_database("postgres://u@h:5432/splitpay", "t1"),
            "postgres://u@h:5432/t1"
        );
        assert_eq!(
            url_with_database("postgres://u:p@h/splitpay?sslmode=disable", "t1"),
            "postgres://u:p@h/t1?sslmode=disable"
        );
        assert_eq!(url_with_database("postgres://u@h", "t1"), "postgres://u@h/t1");
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

/// Where Stripe calls go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StripeTarget {
    /// No `STRIPE_SECRET_KEY`: splitpay starts its local simulator and points at it.
    Simulator,
    /// Stripe itself (test mode, or live mode when explicitly allowed), or another base URL.
    Api {
        key: crate::stripe::keys::StripeKey,
        api_base: String,
    },
}

/// Stripe settings from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StripeSettings {
    pub target: StripeTarget,
    pub timeout_ms: u64,
    /// `None`: Stripe's own limit for the key's mode. One budget for the whole deployment, shared through PostgreSQL.
    pub rate_per_sec: Option<u32>,
    /// Requests that may start at once when the budget has been idle (`STRIPE_RATE_BURST`, default 1).
    pub burst: u32,
    /// Slots of the shared budget one process may hold reserved and unstarted (`STRIPE_RATE_LEASE`; `None`: 100 ms of
    /// the rate, 1 to 100). The worst-case overshoot across N processes is N × this.
    pub lease_slots: Option<u32>,
    /// Webhook signing secrets; several while one rolls.
    pub webhook_secrets: Vec<Secret>,
    /// Signing secrets of the Connect webhook endpoint (events about connected accounts, such as
    /// `account.updated`), `STRIPE_CONNECT_WEBHOOK_SECRET`; several while one rolls. Never logged.
    pub connect_webhook_secrets: Vec<Secret>,
}

pub const STRIPE_TIMEOUT_MS_DEFAULT: u64 = 20_000;

impl StripeSettings {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the settings through `get` (the environment in production, a map in tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let allow_live = get("SPLITPAY_ALLOW_LIVE").as_deref() == Some("1");
        let target = match get("STRIPE_SECRET_KEY").filter(|k| !k.trim().is_empty()) {
            None => StripeTarget::Simulator,
            Some(raw) => {
                let key =
                    crate::stripe::keys::StripeKey::parse(&raw, allow_live).map_err(|e| ConfigError::Invalid {
                        name: "STRIPE_SECRET_KEY",
                        reason: e.to_string(),
                    })?;
                let api_base =
                    get("STRIPE_API_BASE").unwrap_or_else(|| crate::stripe::transport::STRIPE_API_BASE.into());
                StripeTarget::Api { key, api_base }
            }
        };
        let number = |name: &'static str| -> Result<Option<u64>, ConfigError> {
            get(name)
                .map(|raw| {
                    raw.parse::<u64>().ok().filter(|&n| n > 0).ok_or(ConfigError::Invalid {
                        name,
                        reason: format!("expected a positive integer, got '{raw}'"),
                    })
                })
                .transpose()
        };
        let timeout_ms = number("STRIPE_TIMEOUT_MS")?.unwrap_or(STRIPE_TIMEOUT_MS_DEFAULT);
        let rate_per_sec = number("STRIPE_RATE_PER_SEC")?.map(|n| n.min(u64::from(u32::MAX)) as u32);
        let burst = number("STRIPE_RATE_BURST")?.map_or(1, |n| n.min(u64::from(u32::MAX)) as u32);
        let lease_slots = number("STRIPE_RATE_LEASE")?
            .map(|n| {
                let max = u64::from(crate::stripe::shared_limiter::LEASE_SLOTS_MAX);
                if n > max {
                    Err(ConfigError::Invalid {
                        name: "STRIPE_RATE_LEASE",
                        reason: format!("at most {max} slots, got {n}"),
                    })
                } else {
                    Ok(n as u32)
                }
            })
            .transpose()?;
        let secrets = |name: &str| -> Vec<Secret> {
            get(name)
                .map(|raw| {
                    raw.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(Secret::new)
                        .collect()
                })
                .unwrap_or_default()
        };
        Ok(Self {
            target,
            timeout_ms,
            rate_per_sec,
            burst,
            lease_slots,
            webhook_secrets: secrets("STRIPE_WEBHOOK_SECRET"),
            connect_webhook_secrets: secrets("STRIPE_CONNECT_WEBHOOK_SECRET"),
        })
    }
}

#[cfg(test)]
mod stripe_settings_tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(vars: &[(&str, &str)]) -> Result<StripeSettings, ConfigError> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        StripeSettings::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn no_key_means_the_simulator() {
        let s = settings(&[]).unwrap();
        assert_eq!(s.target, StripeTarget::Simulator);
        assert_eq!((s.timeout_ms, s.rate_per_sec), (STRIPE_TIMEOUT_MS_DEFAULT, None));
    }

    #[test]
    fn live_keys_need_explicit_permission_and_never_print() {
        let err = settings(&[("STRIPE_SECRET_KEY", "sk_live_realmoney")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("SPLITPAY_ALLOW_LIVE"), "{err}");
        assert!(!err.contains("realmoney"), "{err}");
        let allowed = settings(&[("STRIPE_SECRET_KEY", "sk_live_realmoney"), ("SPLITPAY_ALLOW_LIVE", "1")]).unwrap();
        assert!(!format!("{allowed:?}").contains("realmoney"));
        assert!(settings(&[
            ("STRIPE_SECRET_KEY", "sk_live_realmoney"),
            ("SPLITPAY_ALLOW_LIVE", "true")
        ])
        .is_err());
    }

    #[test]
    fn test_keys_go_to_stripe_with_rolling_webhook_secrets() {
        let s = settings(&[
            ("STRIPE_SECRET_KEY", "sk_test_abc"),
            ("STRIPE_WEBHOOK_SECRET", "whsec_new, whsec_old"),
            ("STRIPE_RATE_PER_SEC", "10"),
        ])
        .unwrap();
        assert!(matches!(s.target, StripeTarget::Api { ref api_base, .. } if api_base == "https://api.stripe.com/"));
        assert_eq!(
            s.webhook_secrets.iter().map(Secret::expose).collect::<Vec<_>>(),
            vec!["whsec_new", "whsec_old"]
        );
        assert_eq!(s.rate_per_sec, Some(10));
        assert_eq!((s.burst, s.lease_slots), (1, None));
        let s = settings(&[("STRIPE_RATE_BURST", "5"), ("STRIPE_RATE_LEASE", "20")]).unwrap();
        assert_eq!((s.burst, s.lease_slots), (5, Some(20)));
        for (name, bad) in [
            ("STRIPE_RATE_BURST", "0"),
            ("STRIPE_RATE_LEASE", "-1"),
            ("STRIPE_RATE_LEASE", "1001"),
            ("STRIPE_RATE_PER_SEC", "fast"),
        ] {
            let err = settings(&[(name, bad)]).unwrap_err().to_string();
            assert!(err.contains(name), "{err}");
        }
        assert!(s.connect_webhook_secrets.is_empty());
        let s = settings(&[("STRIPE_CONNECT_WEBHOOK_SECRET", "whsec_connect")]).unwrap();
        assert_eq!(
            s.connect_webhook_secrets.iter().map(Secret::expose).collect::<Vec<_>>(),
            vec!["whsec_connect"]
        );
        assert!(!format!("{s:?}").contains("whsec_connect"), "never printed");
        assert!(settings(&[("STRIPE_TIMEOUT_MS", "soon")])
            .unwrap_err()
            .to_string()
            .contains("STRIPE_TIMEOUT_MS"));
    }
}

/// Where `serve` listens unless `SPLITPAY_HTTP_ADDR` says otherwise.
pub const HTTP_ADDR_DEFAULT: &str = "127.0.0.1:8080";
/// Where the local Stripe simulator listens when no Stripe key is configured (`serve` starts it; `worker` uses it).
pub const LOCAL_SIMULATOR_PORT: u16 = 12111;
/// The key splitpay presents to its own local simulator.
pub const LOCAL_SIMULATOR_KEY: &str = "sk_test_splitpay_local_simulator";

/// Settings of the `serve` and `worker` processes beyond the database and Stripe.
#[derive(Debug, Clone)]
pub struct ProcessSettings {
    pub http_addr: std::net::SocketAddr,
    /// Where `worker` serves `/metrics` (`SPLITPAY_METRICS_ADDR`); `serve` serves it on `http_addr`.
    pub metrics_addr: std::net::SocketAddr,
    /// Required by `serve`: the bearer token intake callers present.
    pub service_token: Option<Secret>,
    pub platform_fee_bps: u32,
    pub platform_fee_fixed_cents: i64,
    pub worker_concurrency: usize,
    /// apalis heartbeat; a worker silent for `heartbeat × missed` is dead and its jobs run elsewhere.
    pub worker_heartbeat_ms: u64,
    pub worker_missed_heartbeats: usize,
    /// What intake accepts: `SPLITPAY_SETTLEMENT_CURRENCIES` and `SPLITPAY_MIN_ALLOCATION_CENTS`.
    pub plan_limits: crate::domain::plan::PlanLimits,
}

/// `SPLITPAY_SETTLEMENT_CURRENCIES`: comma-separated ISO codes (lowercase by convention, either case accepted), at
/// least one, each a currency splitpay supports; repeats are ignored.
fn parse_settlement_currencies(raw: &str) -> Result<Vec<crate::domain::money::Currency>, ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid {
        name: "SPLITPAY_SETTLEMENT_CURRENCIES",
        reason,
    };
    let mut currencies = Vec::new();
    for code in raw.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        let currency = crate::domain::money::Currency::parse(code).map_err(|e| invalid(e.to_string()))?;
        if !currencies.contains(&currency) {
            currencies.push(currency);
        }
    }
    if currencies.is_empty() {
        return Err(invalid(format!(
            "expected comma-separated currency codes such as 'aud' or 'aud,usd', got '{raw}'"
        )));
    }
    Ok(currencies)
}

/// `SPLITPAY_MIN_ALLOCATION_CENTS`: a positive amount in minor units, at most what one allocation may be.
fn parse_min_allocation_cents(raw: &str) -> Result<i64, ConfigError> {
    use crate::domain::plan::ALLOCATION_AMOUNT_MAX_CENTS;
    raw.trim()
        .parse::<i64>()
        .ok()
        .filter(|n| (1..=ALLOCATION_AMOUNT_MAX_CENTS).contains(n))
        .ok_or_else(|| ConfigError::Invalid {
            name: "SPLITPAY_MIN_ALLOCATION_CENTS",
            reason: format!(
                "expected an integer amount in minor units from 1 to {ALLOCATION_AMOUNT_MAX_CENTS} (1 accepts any \
                 positive allocation), got '{raw}'"
            ),
        })
}

impl ProcessSettings {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        fn parse<T: std::str::FromStr>(
            get: &impl Fn(&str) -> Option<String>,
            name: &'static str,
            default: T,
            what: &str,
        ) -> Result<T, ConfigError> {
            match get(name) {
                None => Ok(default),
                Some(raw) => raw.trim().parse().map_err(|_| ConfigError::Invalid {
                    name,
                    reason: format!("expected {what}, got '{raw}'"),
                }),
            }
        }
        let http_addr = parse(
            &get,
            "SPLITPAY_HTTP_ADDR",
            HTTP_ADDR_DEFAULT.parse().expect("valid default"),
            "host:port",
        )?;
        let metrics_addr = parse(
            &get,
            "SPLITPAY_METRICS_ADDR",
            crate::observability::METRICS_ADDR_DEFAULT
                .parse()
                .expect("valid default"),
            "host:port",
        )?;
        let service_token = get("SPLITPAY_SERVICE_TOKEN")
            .filter(|t| !t.trim().is_empty())
            .map(Secret::new);
        if service_token.as_ref().is_some_and(|t| t.expose().len() < 16) {
            return Err(ConfigError::Invalid {
                name: "SPLITPAY_SERVICE_TOKEN",
                reason: "must be at least 16 characters".into(),
            });
        }
        let platform_fee_bps = parse(&get, "SPLITPAY_PLATFORM_FEE_BPS", 0u32, "basis points (0-9999)")?;
        if platform_fee_bps >= 10_000 {
            return Err(ConfigError::Invalid {
                name: "SPLITPAY_PLATFORM_FEE_BPS",
                reason: "must be below 10000".into(),
            });
        }
        let platform_fee_fixed_cents = parse(
            &get,
            "SPLITPAY_PLATFORM_FEE_FIXED_CENTS",
            0i64,
            "a non-negative integer",
        )?;
        if platform_fee_fixed_cents < 0 {
            return Err(ConfigError::Invalid {
                name: "SPLITPAY_PLATFORM_FEE_FIXED_CENTS",
                reason: "must not be negative".into(),
            });
        }
        let worker_concurrency = parse(
            &get,
            "SPLITPAY_WORKER_CONCURRENCY",
            WORKER_CONCURRENCY_DEFAULT,
            "a positive integer",
        )?
        .max(1);
        let worker_heartbeat_ms = parse(&get, "SPLITPAY_WORKER_HEARTBEAT_MS", 10_000u64, "milliseconds")?.max(200);
        let worker_missed_heartbeats =
            parse(&get, "SPLITPAY_WORKER_MISSED_HEARTBEATS", 6usize, "a positive integer")?.max(2);
        let plan_limits = crate::domain::plan::PlanLimits {
            settlement_currencies: match get("SPLITPAY_SETTLEMENT_CURRENCIES") {
                Some(raw) => parse_settlement_currencies(&raw)?,
                None => crate::domain::plan::SETTLEMENT_CURRENCIES_DEFAULT.to_vec(),
            },
            min_allocation_cents: match get("SPLITPAY_MIN_ALLOCATION_CENTS") {
                Some(raw) => parse_min_allocation_cents(&raw)?,
                None => crate::domain::plan::MIN_ALLOCATION_CENTS_DEFAULT,
            },
        };
        Ok(Self {
            http_addr,
            metrics_addr,
            service_token,
            platform_fee_bps,
            platform_fee_fixed_cents,
            worker_concurrency,
            worker_heartbeat_ms,
            worker_missed_heartbeats,
            plan_limits,
        })
    }
}

/// `90s`, `10m`, `72h`, `7d`, `250ms`: a whole number and a unit, as milliseconds.
pub fn parse_duration_ms(raw: &str) -> Option<u64> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = raw.split_at(split);
    let n: u64 = number.parse().ok()?;
    let factor = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(factor)
}

/// The lifecycle's durations from the environment, over `settings` (whose values are the defaults):
///
/// | variable | default | what |
/// |---|---|---|
/// | `SPLITPAY_TRANSFER_RETRY_WINDOW` | `72h` | how long a transfer generation is retried with the same key |
/// | `SPLITPAY_TRANSFER_BACKOFF_BASE` / `_CAP` | `2s` / `5m` | full-jitter backoff between attempts (cap ≤ 5 min) |
/// | `SPLITPAY_ABANDON_AFTER` | `24h` | an unpaid PaymentIntent is canceled after this |
/// | `SPLITPAY_RECONCILE_CARD_GRACE` / `_INTERVAL` | `10m` / `10m` | reconcile-pending pacing for cards |
/// | `SPLITPAY_RECONCILE_DEBIT_GRACE` / `_INTERVAL` | `1h` / `6h` | the same for BECS and PayTo |
/// | `SPLITPAY_RECONCILE_TRANSFER_GRACE` | `2m` | a TRANSFERRING allocation overdue by this is driven again |
/// | `SPLITPAY_AUDIT_DAYS` | `7` | the transfer audit covers payments of the last N days |
/// | `SPLITPAY_AUTO_RETRY_PARKED` | `1` | `0` turns off retrying shares parked for account reasons on `account.updated` |
/// | `SPLITPAY_ACCOUNT_CHECK_INTERVAL` | `10m` | the accounts sweep asks Stripe about an account at most this often |
pub fn lifecycle_from_lookup(
    get: impl Fn(&str) -> Option<String>,
    settings: &mut crate::app::DistributionSettings,
) -> Result<(), ConfigError> {
    let duration = |name: &'static str, target: &mut u64| -> Result<(), ConfigError> {
        if let Some(raw) = get(name) {
            *target = parse_duration_ms(&raw)
                .filter(|&ms| ms > 0)
                .ok_or(ConfigError::Invalid {
                    name,
                    reason: format!("expected a positive duration such as 90s, 10m, 72h or 7d, got '{raw}'"),
                })?;
        }
        Ok(())
    };
    if let Some(raw) = get("SPLITPAY_REVERSE_ON_REFUND") {
        settings.reverse_on_refund = match raw.trim() {
            "proportional" => crate::app::ReversePolicy::Proportional,
            "none" => crate::app::ReversePolicy::None,
            _ => {
                return Err(ConfigError::Invalid {
                    name: "SPLITPAY_REVERSE_ON_REFUND",
                    reason: format!("expected 'proportional' or 'none', got '{raw}'"),
                })
            }
        };
    }
    duration("SPLITPAY_TRANSFER_RETRY_WINDOW", &mut settings.transfer_retry_window_ms)?;
    duration("SPLITPAY_TRANSFER_BACKOFF_BASE", &mut settings.backoff_base_ms)?;
    duration("SPLITPAY_TRANSFER_BACKOFF_CAP", &mut settings.backoff_cap_ms)?;
    if settings.backoff_cap_ms > crate::app::TRANSFER_BACKOFF_CAP_MS_MAX {
        return Err(ConfigError::Invalid {
            name: "SPLITPAY_TRANSFER_BACKOFF_CAP",
            reason: "must be at most 5m".into(),
        });
    }
    let r = &mut settings.reconcile;
    duration("SPLITPAY_ABANDON_AFTER", &mut r.abandon_after_ms)?;
    duration("SPLITPAY_RECONCILE_CARD_GRACE", &mut r.card_grace_ms)?;
    duration("SPLITPAY_RECONCILE_CARD_INTERVAL", &mut r.card_interval_ms)?;
    duration("SPLITPAY_RECONCILE_DEBIT_GRACE", &mut r.debit_grace_ms)?;
    duration("SPLITPAY_RECONCILE_DEBIT_INTERVAL", &mut r.debit_interval_ms)?;
    duration("SPLITPAY_RECONCILE_TRANSFER_GRACE", &mut r.transfer_grace_ms)?;
    duration("SPLITPAY_ACCOUNT_CHECK_INTERVAL", &mut r.account_check_interval_ms)?;
    if let Some(raw) = get("SPLITPAY_AUDIT_DAYS") {
        r.audit_days = raw
            .trim()
            .parse()
            .ok()
            .filter(|&d: &u32| d > 0)
            .ok_or(ConfigError::Invalid {
                name: "SPLITPAY_AUDIT_DAYS",
                reason: format!("expected a positive number of days, got '{raw}'"),
            })?;
    }
    if let Some(raw) = get("SPLITPAY_AUTO_RETRY_PARKED") {
        settings.auto_retry_parked = match raw.trim() {
            "1" | "true" => true,
            "0" | "false" => false,
            _ => {
                return Err(ConfigError::Invalid {
                    name: "SPLITPAY_AUTO_RETRY_PARKED",
                    reason: format!(
                        "expected 1 (retry parked shares when an account is fixed) or 0 (off), got '{raw}'"
                    ),
                })
            }
        };
    }
    Ok(())
}

#[cfg(test)]
mod lifecycle_tests {
    use super::*;
    use crate::app::DistributionSettings;
    use std::collections::HashMap;

    fn read(vars: &[(&str, &str)]) -> Result<DistributionSettings, ConfigError> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut settings = DistributionSettings::default();
        lifecycle_from_lookup(|name| map.get(name).cloned(), &mut settings)?;
        Ok(settings)
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration_ms("250ms"), Some(250));
        assert_eq!(parse_duration_ms("90s"), Some(90_000));
        assert_eq!(parse_duration_ms("10m"), Some(600_000));
        assert_eq!(parse_duration_ms("72h"), Some(259_200_000));
        assert_eq!(parse_duration_ms("7d"), Some(604_800_000));
        for bad in ["", "10", "h", "1.5h", "-1h", "10x"] {
            assert_eq!(parse_duration_ms(bad), None, "{bad}");
        }
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let s = read(&[]).unwrap();
        assert_eq!(s.transfer_retry_window_ms, 72 * 3_600_000);
        assert_eq!(s.backoff_cap_ms, 300_000);
        assert_eq!(s.reconcile.abandon_after_ms, 24 * 3_600_000);
        assert_eq!(
            (s.reconcile.card_grace_ms, s.reconcile.card_interval_ms),
            (600_000, 600_000)
        );
        assert_eq!(
            (s.reconcile.debit_grace_ms, s.reconcile.debit_interval_ms),
            (3_600_000, 6 * 3_600_000)
        );
        assert_eq!(s.reconcile.account_check_interval_ms, 600_000);
    }

    #[test]
    fn auto_retry_is_on_unless_turned_off() {
        assert!(read(&[]).unwrap().auto_retry_parked);
        assert!(!read(&[("SPLITPAY_AUTO_RETRY_PARKED", "0")]).unwrap().auto_retry_parked);
        assert!(read(&[("SPLITPAY_AUTO_RETRY_PARKED", "1")]).unwrap().auto_retry_parked);
        let err = read(&[("SPLITPAY_AUTO_RETRY_PARKED", "no")]).unwrap_err().to_string();
        assert!(err.contains("SPLITPAY_AUTO_RETRY_PARKED"), "{err}");
    }

    #[test]
    fn settings_are_read_and_bad_ones_named() {
        let s = read(&[
            ("SPLITPAY_TRANSFER_RETRY_WINDOW", "2h"),
            ("SPLITPAY_ABANDON_AFTER", "30m"),
        ])
        .unwrap();
        assert_eq!(s.transfer_retry_window_ms, 7_200_000);
        assert_eq!(s.reconcile.abandon_after_ms, 1_800_000);
        let s = read(&[("SPLITPAY_ACCOUNT_CHECK_INTERVAL", "90s")]).unwrap();
        assert_eq!(s.reconcile.account_check_interval_ms, 90_000);
        let err = read(&[("SPLITPAY_ACCOUNT_CHECK_INTERVAL", "0s")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("SPLITPAY_ACCOUNT_CHECK_INTERVAL"), "{err}");
        let err = read(&[("SPLITPAY_TRANSFER_RETRY_WINDOW", "soon")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("SPLITPAY_TRANSFER_RETRY_WINDOW"), "{err}");
        let err = read(&[("SPLITPAY_TRANSFER_BACKOFF_CAP", "10m")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("at most 5m"), "{err}");
    }
}

#[cfg(test)]
mod process_settings_tests {
    use super::*;
    use crate::domain::money::Currency;
    use std::collections::HashMap;

    fn settings(vars: &[(&str, &str)]) -> Result<ProcessSettings, ConfigError> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        ProcessSettings::from_lookup(|name| map.get(name).cloned())
    }

    fn error(vars: &[(&str, &str)]) -> String {
        settings(vars).unwrap_err().to_string()
    }

    #[test]
    fn intake_limits_default_to_aud_and_one_dollar() {
        let limits = settings(&[]).unwrap().plan_limits;
        assert_eq!(limits.settlement_currencies, vec![Currency::Aud]);
        assert_eq!(limits.min_allocation_cents, 100);
    }

    #[test]
    fn settlement_currencies_are_a_comma_separated_list() {
        let parse = |raw: &str| settings(&[("SPLITPAY_SETTLEMENT_CURRENCIES", raw)]).map(|s| s.plan_limits);
        assert_eq!(
            parse("aud,usd").unwrap().settlement_currencies,
            vec![Currency::Aud, Currency::Usd]
        );
        assert_eq!(
            parse(" nzd , AUD ,nzd,").unwrap().settlement_currencies,
            vec![Currency::Nzd, Currency::Aud],
            "spaces, either case, repeats and a trailing comma are harmless"
        );
        for bad in ["", " , ", "aud,xyz", "aud;usd", "dollars"] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(err.contains("SPLITPAY_SETTLEMENT_CURRENCIES"), "{bad:?}: {err}");
        }
        let err = parse("aud,xyz").unwrap_err().to_string();
        assert!(err.contains("'xyz'"), "names the bad code: {err}");
    }

    #[test]
    fn the_minimum_allocation_is_a_positive_integer() {
        let min =
            |raw: &str| settings(&[("SPLITPAY_MIN_ALLOCATION_CENTS", raw)]).map(|s| s.plan_limits.min_allocation_cents);
        assert_eq!(min("250").unwrap(), 250);
        assert_eq!(min(" 1 ").unwrap(), 1);
        for bad in ["0", "-100", "1.50", "ten", "", "2147483648"] {
            let err = min(bad).unwrap_err().to_string();
            assert!(err.contains("SPLITPAY_MIN_ALLOCATION_CENTS"), "{bad:?}: {err}");
            assert!(err.contains(&format!("'{bad}'")), "{bad:?}: {err}");
        }
        assert!(error(&[("SPLITPAY_MIN_ALLOCATION_CENTS", "0")]).contains("from 1"));
    }
}
