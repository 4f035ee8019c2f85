//! Webhook endpoints: registering, listing, disabling (which ends their pending deliveries) and enabling, and
//! secret rotation with a 24 h overlap. A secret never appears in a `Debug` output.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use crate::domain::ids::new_id;
use crate::store::StoreError;

/// How long the previous secret keeps signing after a rotation.
pub const SECRET_OVERLAP_SECS: i64 = 24 * 3_600;

#[derive(Clone, PartialEq, sqlx::FromRow)]
pub struct EndpointRow {
    pub id: String,
    pub organisation_id: String,
    pub url: String,
    pub event_types: Option<Vec<String>>,
    pub secret: String,
    pub previous_secret: Option<String>,
    pub previous_secret_expires_at: Option<DateTime<Utc>>,
    pub failing_since: Option<DateTime<Utc>>,
    /// The endpoint's last failed attempt; a failure after a longer quiet than a schedule's span starts a new
    /// failing period.
    pub last_failure_at: Option<DateTime<Utc>>,
    pub disabled_at: Option<DateTime<Utc>>,
    pub disabled_reason: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl std::fmt::Debug for EndpointRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointRow")
            .field("id", &self.id)
            .field("organisation_id", &self.organisation_id)
            .field("url", &self.url)
            .field("event_types", &self.event_types)
            .field("secret", &"<redacted>")
            .field("previous_secret_expires_at", &self.previous_secret_expires_at)
            .field("failing_since", &self.failing_since)
            .field("disabled_at", &self.disabled_at)
            .finish()
    }
}

impl EndpointRow {
    /// The secrets that sign at `now`: the current one, and the previous one until it expires.
    pub fn signing_secrets(&self, now: DateTime<Utc>) -> Vec<&str> {
        let mut secrets = vec![self.secret.as_str()];
        if let (Some(old), Some(until)) = (&self.previous_secret, self.previous_secret_expires_at) {
            if until > now {
                secrets.push(old.as_str());
            }
        }
        secrets
    }
}

const ENDPOINT_COLUMNS: &str = "id, organisation_id, url, event_types, secret, previous_secret,
    previous_secret_expires_at, failing_since, last_failure_at, disabled_at, disabled_reason, created_at";

pub async fn insert_endpoint(
    conn: &mut PgConnection,
    organisation_id: &str,
    url: &str,
    event_types: Option<&[String]>,
    secret: &str,
) -> Result<EndpointRow, StoreError> {
    Ok(sqlx::query_as::<_, EndpointRow>(sqlx::AssertSqlSafe(format!(
        "INSERT INTO webhook_endpoints (id, organisation_id, url, event_types, secret)
         VALUES ($1, $2, $3, $4, $5) RETURNING {ENDPOINT_COLUMNS}"
    )))
    .bind(new_id("whep"))
    .bind(organisation_id)
    .bind(url)
    .bind(event_types)
    .bind(secret)
    .fetch_one(conn)
    .await?)
}

pub async fn get_endpoint(conn: &mut PgConnection, id: &str) -> Result<EndpointRow, StoreError> {
    sqlx::query_as::<_, EndpointRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(conn)
    .await?
    .ok_or_else(|| StoreError::NotFound {
        what: "webhook endpoint",
        id: id.to_owned(),
    })
}

pub async fn list_endpoints(
    conn: &mut PgConnection,
    organisation_id: Option<&str>,
) -> Result<Vec<EndpointRow>, StoreError> {
    Ok(sqlx::query_as::<_, EndpointRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints
          WHERE $1::text IS NULL OR organisation_id = $1 ORDER BY created_at, id"
    )))
    .bind(organisation_id)
    .fetch_all(conn)
    .await?)
}

/// `last_error` of a delivery that was pending when its endpoint was disabled.
pub const ENDPOINT_DISABLED: &str = "endpoint disabled";

/// Disables an endpoint (no-op when it already is), and ends its pending deliveries `failed` ("endpoint disabled"),
/// on `conn` (the caller's transaction): nothing would ever claim them. Deliveries in flight finish their attempt;
/// its record then ends them failed too. True when this call disabled it.
pub async fn disable_endpoint(conn: &mut PgConnection, id: &str, reason: &str) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE webhook_endpoints SET disabled_at = now(), disabled_reason = $2 WHERE id = $1 AND disabled_at IS NULL",
    )
    .bind(id)
    .bind(reason)
    .execute(&mut *conn)
    .await?;
    if done.rows_affected() == 0 {
        return Ok(false);
    }
    sqlx::query(
        "UPDATE webhook_deliveries SET status = 'failed', failed_at = now(), last_error = $2
          WHERE endpoint_id = $1 AND status = 'pending'",
    )
    .bind(id)
    .bind(ENDPOINT_DISABLED)
    .execute(conn)
    .await?;
    Ok(true)
}

/// Enables a disabled endpoint again, with a clean failure record. Its failed deliveries stay failed (`ops redeliver
/// --since` sends them). True when this call enabled it.
pub async fn enable_endpoint(conn: &mut PgConnection, id: &str) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE webhook_endpoints SET disabled_at = NULL, disabled_reason = NULL, failing_since = NULL,
                last_failure_at = NULL
          WHERE id = $1 AND disabled_at IS NOT NULL",
    )
    .bind(id)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Makes `new_secret` the endpoint's secret; the old one keeps signing for `overlap_secs`. `None` (nothing changed)
/// while the previous secret still signs: a second rotation then would drop it before its overlap ends, and
/// receivers still verifying with it would reject every delivery.
pub async fn rotate_secret(
    conn: &mut PgConnection,
    id: &str,
    new_secret: &str,
    overlap_secs: i64,
) -> Result<Option<EndpointRow>, StoreError> {
    Ok(sqlx::query_as::<_, EndpointRow>(sqlx::AssertSqlSafe(format!(
        "UPDATE webhook_endpoints
            SET previous_secret = secret, previous_secret_expires_at = now() + make_interval(secs => $3),
                secret = $2
          WHERE id = $1 AND (previous_secret_expires_at IS NULL OR previous_secret_expires_at <= now())
      RETURNING {ENDPOINT_COLUMNS}"
    )))
    .bind(id)
    .bind(new_secret)
    .bind(overlap_secs as f64)
    .fetch_optional(conn)
    .await?)
}
