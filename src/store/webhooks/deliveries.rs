//! Webhook deliveries: the stored (jittered) schedule, creating a row per matching endpoint, the claim, ending
//! expired claims with their outcome unknown, recording each attempt under its claim token, and listing.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use crate::store::StoreError;

/// Seconds between attempts after failed attempt 1..5: 5 min, 30 min, 2 h, 5 h, 20 h. With the first attempt at
/// once that is 6 attempts over 27 h 35 min (Svix's spacing, cut to the contract's 6 attempts over ~28 h).
pub const DEFAULT_SCHEDULE_SECS: [i32; 5] = [300, 1_800, 7_200, 18_000, 72_000];
/// Each stored delay but the last is the default ± up to this fraction, at random; the last takes up the
/// difference, so every delivery keeps 6 attempts over exactly 27 h 35 min while retries of deliveries that failed
/// together spread out (the last delay moves by at most ±7.6 %).
pub const SCHEDULE_JITTER: f64 = 0.2;

/// A schedule to store on a new delivery: [`DEFAULT_SCHEDULE_SECS`] with jitter ([`SCHEDULE_JITTER`]).
pub fn jittered_schedule() -> Vec<i32> {
    use rand::Rng;
    let mut rng = rand::rng();
    let total: i32 = DEFAULT_SCHEDULE_SECS.iter().sum();
    let first = &DEFAULT_SCHEDULE_SECS[..DEFAULT_SCHEDULE_SECS.len() - 1];
    let mut schedule: Vec<i32> = first
        .iter()
        .map(|&d| (f64::from(d) * (1.0 + rng.random_range(-SCHEDULE_JITTER..=SCHEDULE_JITTER))).round() as i32)
        .collect();
    schedule.push(total - schedule.iter().sum::<i32>());
    schedule
}

/// The deliveries of the outbox events in a CTE named `ev` (`id, organisation_id, event_type`) to each enabled
/// endpoint of their organisation whose filter matches, with the stored schedule `$schedule`, skipping endpoints that
/// already have one; returns the new delivery ids. One text for [`CREATE_DELIVERIES_SQL`] and for the outbox insert
/// that creates its deliveries in the same statement ([`OUTBOX_INSERT_WITH_DELIVERIES_SQL`]).
macro_rules! insert_deliveries_from_ev {
    ($schedule:literal) => {
        concat!(
            "INSERT INTO webhook_deliveries (id, outbox_event_id, endpoint_id, schedule_secs)
             SELECT 'whdl_' || replace(gen_random_uuid()::text, '-', ''), ev.id, e.id, ",
            $schedule,
            "
               FROM ev JOIN webhook_endpoints e ON e.organisation_id = ev.organisation_id
              WHERE e.disabled_at IS NULL AND (e.event_types IS NULL OR ev.event_type = ANY (e.event_types))
             ON CONFLICT ON CONSTRAINT webhook_delivery_once DO NOTHING
             RETURNING id"
        )
    };
}

/// Creates the deliveries of outbox event `$1` (of type `$3`, for organisation `$2`) to each enabled endpoint of the
/// organisation whose filter matches, skipping endpoints that already have one. Returns the new delivery ids.
pub const CREATE_DELIVERIES_SQL: &str = concat!(
    "WITH ev (id, organisation_id, event_type) AS (VALUES ($1::text, $2::text, $3::text)) ",
    insert_deliveries_from_ev!("$4")
);

/// Inserts outbox events, given as parallel arrays (`$1` ids, `$2` dedup keys, `$3` types, `$4` organisations, `$5`
/// occurred at, `$6` payloads, `$7` each one's stored schedule as an `int[]` literal; an event whose dedup key is
/// known is skipped), and creates the deliveries of the new ones, in one statement whatever their number (one round
/// trip for all of a transaction's events instead of two per event: issue 11). Returns how many events were new and
/// the new delivery ids.
pub const OUTBOX_INSERT_WITH_DELIVERIES_SQL: &str = concat!(
    "WITH input AS (
        SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::jsonb[],
                             $7::text[])
            AS u (id, dedup_key, event_type, organisation_id, occurred_at, payload, schedule)),
     ins AS (
        INSERT INTO outbox_events (id, dedup_key, event_type, organisation_id, occurred_at, payload)
        SELECT id, dedup_key, event_type, organisation_id, occurred_at, payload FROM input
        ON CONFLICT ON CONSTRAINT outbox_dedup_key_unique DO NOTHING
        RETURNING id),
     ev AS (SELECT i.id, i.organisation_id, i.event_type, i.schedule::int[] AS schedule FROM ins JOIN input i USING (id)),
     d AS (",
    insert_deliveries_from_ev!("ev.schedule"),
    ")
     SELECT (SELECT count(*) FROM ins), coalesce((SELECT array_agg(id) FROM d), '{}'::text[])"
);

/// A schedule as the `int[]` literal [`OUTBOX_INSERT_WITH_DELIVERIES_SQL`] takes.
pub fn schedule_literal(schedule: &[i32]) -> String {
    let parts: Vec<String> = schedule.iter().map(i32::to_string).collect();
    format!("{{{}}}", parts.join(","))
}

pub async fn create_deliveries(
    conn: &mut PgConnection,
    outbox_event_id: &str,
    organisation_id: &str,
    event_type: &str,
) -> Result<Vec<String>, StoreError> {
    let rows: Vec<(String,)> = sqlx::query_as(CREATE_DELIVERIES_SQL)
        .bind(outbox_event_id)
        .bind(organisation_id)
        .bind(event_type)
        .bind(jittered_schedule())
        .fetch_all(conn)
        .await?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

/// A claimed delivery: what the worker needs to send it.
#[derive(Clone, sqlx::FromRow)]
pub struct ClaimedDelivery {
    pub id: String,
    /// This claim's attempt number (1-based).
    pub attempts: i32,
    pub schedule_secs: Vec<i32>,
    pub trigger: String,
    pub outbox_event_id: String,
    pub payload: serde_json::Value,
    pub endpoint_id: String,
    pub url: String,
    pub secret: String,
    pub previous_secret: Option<String>,
    pub previous_secret_expires_at: Option<DateTime<Utc>>,
    pub now: DateTime<Utc>,
    /// This claim's token: every record of its outcome must match it (a later claim of the same row, even by the
    /// same process, has another).
    pub claim_token: uuid::Uuid,
}

impl ClaimedDelivery {
    pub fn signing_secrets(&self) -> Vec<&str> {
        let mut secrets = vec![self.secret.as_str()];
        if let (Some(old), Some(until)) = (&self.previous_secret, self.previous_secret_expires_at) {
            if until > self.now {
                secrets.push(old.as_str());
            }
        }
        secrets
    }

    pub fn max_attempts(&self) -> i32 {
        self.schedule_secs.len() as i32 + 1
    }
}

/// Claims delivery `$1` for worker `$2` for `$3` seconds: a pending row that is due, with attempts left, on an enabled
/// endpoint. At most one worker wins. "Due" allows one second early: a retry's job is scheduled by apalis in whole
/// seconds (its `run_after` truncates `now + delay`), so it may run up to a second before `next_attempt_at`, and it
/// must not find its row not yet due (it would then wait for the sweeper). A `delivering` row is never claimed again, even once its claim expired: its
/// worker may have sent it and got a 2xx (see [`END_EXPIRED_CLAIMS_SQL`]).
pub const CLAIM_DELIVERY_SQL: &str = "UPDATE webhook_deliveries d
        SET status = 'delivering', attempts = d.attempts + 1, claimed_by = $2,
            claimed_until = now() + make_interval(secs => $3), claim_token = gen_random_uuid()
       FROM webhook_endpoints e, outbox_events o
      WHERE d.id = $1 AND e.id = d.endpoint_id AND o.id = d.outbox_event_id AND e.disabled_at IS NULL
        AND d.attempts < cardinality(d.schedule_secs) + 1
        AND d.status = 'pending' AND d.next_attempt_at <= now() + interval '1 second'
     RETURNING d.id, d.attempts, d.schedule_secs, d.trigger, o.id AS outbox_event_id, o.payload,
               e.id AS endpoint_id, e.url, e.secret, e.previous_secret, e.previous_secret_expires_at, now() AS now,
               d.claim_token";

pub async fn claim_delivery(
    conn: &mut PgConnection,
    id: &str,
    worker: &str,
    claim_secs: f64,
) -> Result<Option<ClaimedDelivery>, StoreError> {
    Ok(sqlx::query_as::<_, ClaimedDelivery>(CLAIM_DELIVERY_SQL)
        .bind(id)
        .bind(worker)
        .bind(claim_secs)
        .fetch_optional(conn)
        .await?)
}

/// How `last_error` of a delivery ended by [`END_EXPIRED_CLAIMS_SQL`] starts.
pub const OUTCOME_UNKNOWN: &str = "outcome unknown";

/// Ends delivering rows whose claim expired more than `$1` seconds ago (only row `$3` when given), at most `$2`:
/// their worker stopped between claiming and recording, so the receiver may or may not have answered 2xx. Such a
/// row is never sent again automatically (an event that got a 2xx is never sent again); it ends `failed` with its
/// outcome unknown, an attempt row says so, and only an operator's `ops redeliver` sends it again. Returns the ids.
pub const END_EXPIRED_CLAIMS_SQL: &str = "WITH ended AS (
        UPDATE webhook_deliveries d
           SET status = 'failed', failed_at = now(), claimed_by = NULL, claimed_until = NULL,
               last_error = 'outcome unknown: the worker stopped while delivering; `splitpay ops redeliver '
                            || d.outbox_event_id || '` sends it again'
         WHERE d.id IN (SELECT id FROM webhook_deliveries
                         WHERE status = 'delivering' AND claimed_until < now() - make_interval(secs => $1)
                           AND ($3::text IS NULL OR id = $3)
                         ORDER BY claimed_until LIMIT $2 FOR UPDATE SKIP LOCKED)
           AND d.status = 'delivering'
     RETURNING d.id, d.attempts, d.trigger, d.last_error),
     logged AS (
        INSERT INTO webhook_delivery_attempts (delivery_id, attempt_number, trigger, status_code, duration_ms, error)
        SELECT id, attempts, trigger, NULL, NULL, last_error FROM ended)
     SELECT id FROM ended ORDER BY id";

/// Runs [`END_EXPIRED_CLAIMS_SQL`]: `only` one row, or up to `limit` rows whose claim expired `grace_secs` ago.
pub async fn end_expired_claims(
    conn: &mut PgConnection,
    only: Option<&str>,
    grace_secs: i64,
    limit: i64,
) -> Result<Vec<String>, StoreError> {
    let rows: Vec<(String,)> = sqlx::query_as(END_EXPIRED_CLAIMS_SQL)
        .bind(grace_secs as f64)
        .bind(limit)
        .bind(only)
        .fetch_all(conn)
        .await?;
    let ended: Vec<String> = rows.into_iter().map(|(id,)| id).collect();
    for id in &ended {
        tracing::warn!(
            delivery = %id,
            "webhook delivery failed with its outcome unknown: its worker stopped while delivering; not sent again \
             unless an operator runs `splitpay ops redeliver`"
        );
    }
    Ok(ended)
}

/// What one attempt got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptOutcome {
    pub status_code: Option<i32>,
    pub duration_ms: i64,
    pub error: Option<String>,
    /// At most 1 KiB.
    pub response_body: Option<String>,
    /// What a 429 or 503 asked for in `Retry-After`, in seconds.
    pub retry_after_secs: Option<i64>,
}

impl AttemptOutcome {
    pub fn succeeded(&self) -> bool {
        matches!(self.status_code, Some(200..=299))
    }
}

/// What recording a failed attempt decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterFailure {
    /// Attempt again after this many seconds.
    Retry { after_secs: i32 },
    /// No attempt left: the delivery is failed.
    Failed,
    /// The claim was no longer ours (it expired and another worker took the row): only the attempt was recorded.
    ClaimLost,
}

/// Records the attempt of `delivery`'s claim. False when that claim's attempt is already recorded (an earlier
/// record whose commit was reported as failed but went through): the caller then records nothing else.
pub async fn insert_attempt(
    conn: &mut PgConnection,
    delivery: &ClaimedDelivery,
    outcome: &AttemptOutcome,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "INSERT INTO webhook_delivery_attempts
                (delivery_id, attempt_number, trigger, status_code, duration_ms, error, response_body, claim_token)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (claim_token) DO NOTHING",
    )
    .bind(&delivery.id)
    .bind(delivery.attempts)
    .bind(&delivery.trigger)
    .bind(outcome.status_code)
    .bind(outcome.duration_ms)
    .bind(&outcome.error)
    .bind(&outcome.response_body)
    .bind(delivery.claim_token)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Records a 2xx under `delivery`'s claim: the delivery is succeeded for good, and the endpoint is healthy. Also
/// when the claim expired and the sweeper ended the row with its outcome unknown meanwhile (the truth is now known),
/// but never over a later claim or an operator's requeue (the token differs).
pub async fn record_success(conn: &mut PgConnection, delivery: &ClaimedDelivery) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE webhook_deliveries
            SET status = 'succeeded', succeeded_at = now(), failed_at = NULL, claimed_by = NULL,
                claimed_until = NULL, last_error = NULL
          WHERE id = $1 AND claim_token = $2 AND status IN ('delivering', 'failed')",
    )
    .bind(&delivery.id)
    .bind(delivery.claim_token)
    .execute(&mut *conn)
    .await?;
    // Only when it was failing: most successes change nothing, and take no lock on the endpoint row.
    sqlx::query(
        "UPDATE webhook_endpoints SET failing_since = NULL, last_failure_at = NULL
          WHERE id = $1 AND failing_since IS NOT NULL",
    )
    .bind(&delivery.endpoint_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// Records a failed attempt under `delivery`'s claim (its token): schedules the next attempt from the row's schedule
/// (a `Retry-After` of `outcome` is honoured between the scheduled delay and twice it), or ends the
/// delivery failed after the last one. Marks the endpoint failing since now if it was not already, or if its
/// previous failure is older than the delivery's whole schedule (a quiet spell in between: an old failure, a quiet
/// week and one failure must not disable it at once), and returns when it started failing.
pub async fn record_failure(
    conn: &mut PgConnection,
    delivery: &ClaimedDelivery,
    outcome: &AttemptOutcome,
) -> Result<(AfterFailure, DateTime<Utc>), StoreError> {
    let error = outcome.error.as_deref().unwrap_or("failed");
    let row: Option<(String, Option<i32>)> = sqlx::query_as(
        "WITH d AS (
            SELECT d.id, d.attempts >= cardinality(d.schedule_secs) + 1 AS last, e.disabled_at IS NOT NULL AS disabled
              FROM webhook_deliveries d JOIN webhook_endpoints e ON e.id = d.endpoint_id WHERE d.id = $1)
         UPDATE webhook_deliveries w
            SET status = CASE WHEN d.last OR d.disabled THEN 'failed' ELSE 'pending' END,
                failed_at = CASE WHEN d.last OR d.disabled THEN now() END,
                next_attempt_at = CASE WHEN d.last OR d.disabled THEN w.next_attempt_at
                                       ELSE now() + make_interval(secs => greatest(w.schedule_secs[w.attempts],
                                                 least(coalesce($4, 0), 2 * w.schedule_secs[w.attempts]))) END,
                claimed_by = NULL, claimed_until = NULL,
                last_error = CASE WHEN d.disabled AND NOT d.last THEN $3 || '; endpoint disabled' ELSE $3 END
           FROM d
          WHERE w.id = d.id AND w.status = 'delivering' AND w.claim_token = $2
      RETURNING w.status,
                CASE WHEN w.status = 'pending' THEN extract(epoch FROM w.next_attempt_at - now())::int4 END",
    )
    .bind(&delivery.id)
    .bind(delivery.claim_token)
    .bind(error)
    .bind(outcome.retry_after_secs.map(|s| s.clamp(0, i64::from(i32::MAX)) as i32))
    .fetch_optional(&mut *conn)
    .await?;
    let after = match row {
        None => AfterFailure::ClaimLost,
        Some((status, _)) if status == "failed" => AfterFailure::Failed,
        Some((_, after)) => AfterFailure::Retry {
            after_secs: after.unwrap_or(0),
        },
    };
    let span: i64 = delivery.schedule_secs.iter().map(|&s| i64::from(s)).sum();
    let (since,): (DateTime<Utc>,) = sqlx::query_as(
        "UPDATE webhook_endpoints
            SET failing_since = CASE WHEN failing_since IS NULL OR last_failure_at IS NULL
                                          OR last_failure_at < now() - make_interval(secs => $2)
                                     THEN now() ELSE failing_since END,
                last_failure_at = now()
          WHERE id = $1
      RETURNING failing_since",
    )
    .bind(&delivery.endpoint_id)
    .bind(span as f64)
    .fetch_one(conn)
    .await?;
    Ok((after, since))
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct DeliveryRow {
    pub id: String,
    pub outbox_event_id: String,
    pub endpoint_id: String,
    pub organisation_id: String,
    pub event_type: String,
    pub url: String,
    pub status: String,
    pub attempts: i32,
    pub schedule_secs: Vec<i32>,
    pub next_attempt_at: DateTime<Utc>,
    pub claimed_until: Option<DateTime<Utc>>,
    pub succeeded_at: Option<DateTime<Utc>>,
    pub failed_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub trigger: String,
    pub created_at: DateTime<Utc>,
}

const DELIVERY_SELECT: &str = "SELECT d.id, d.outbox_event_id, d.endpoint_id, e.organisation_id, o.event_type, e.url,
        d.status, d.attempts, d.schedule_secs, d.next_attempt_at, d.claimed_until, d.succeeded_at, d.failed_at,
        d.last_error, d.trigger, d.created_at
   FROM webhook_deliveries d JOIN webhook_endpoints e ON e.id = d.endpoint_id
   JOIN outbox_events o ON o.id = d.outbox_event_id";

pub async fn get_delivery(conn: &mut PgConnection, id: &str) -> Result<DeliveryRow, StoreError> {
    sqlx::query_as::<_, DeliveryRow>(sqlx::AssertSqlSafe(format!("{DELIVERY_SELECT} WHERE d.id = $1")))
        .bind(id)
        .fetch_optional(conn)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            what: "webhook delivery",
            id: id.to_owned(),
        })
}

/// The statement of [`list_deliveries`]: `$1` an organisation or NULL, `$2` the limit. Newest first through
/// `webhook_deliveries_created`, or `webhook_deliveries_failed_created` with `failed_only` (the status is spelled
/// out, not a parameter, so the partial index applies). Public so tests can `EXPLAIN` it.
pub fn list_deliveries_sql(failed_only: bool) -> String {
    let status = if failed_only { "d.status = 'failed' AND" } else { "" };
    format!(
        "{DELIVERY_SELECT}
          WHERE {status} ($1::text IS NULL OR e.organisation_id = $1)
          ORDER BY d.created_at DESC, d.id DESC LIMIT $2"
    )
}

/// Deliveries, newest first: only failed ones with `failed_only`, only one organisation's with `organisation_id`.
pub async fn list_deliveries(
    conn: &mut PgConnection,
    failed_only: bool,
    organisation_id: Option<&str>,
    limit: i64,
) -> Result<Vec<DeliveryRow>, StoreError> {
    Ok(
        sqlx::query_as::<_, DeliveryRow>(sqlx::AssertSqlSafe(list_deliveries_sql(failed_only)))
            .bind(organisation_id)
            .bind(limit)
            .fetch_all(conn)
            .await?,
    )
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct AttemptRow {
    pub id: i64,
    pub delivery_id: String,
    pub attempt_number: i32,
    pub trigger: String,
    pub status_code: Option<i32>,
    /// NULL when no attempt was measured (its worker stopped: outcome unknown).
    pub duration_ms: Option<i64>,
    pub error: Option<String>,
    pub response_body: Option<String>,
    pub at: DateTime<Utc>,
}

pub async fn attempts_of(conn: &mut PgConnection, delivery_id: &str) -> Result<Vec<AttemptRow>, StoreError> {
    Ok(
        sqlx::query_as::<_, AttemptRow>("SELECT * FROM webhook_delivery_attempts WHERE delivery_id = $1 ORDER BY id")
            .bind(delivery_id)
            .fetch_all(conn)
            .await?,
    )
}

/// Queues a delivery again (ops redeliver): a pending or failed row starts over with a fresh schedule, marked
/// manual. A succeeded row is never touched (its event got a 2xx), nor one in flight. True when requeued.
pub async fn requeue_delivery(conn: &mut PgConnection, id: &str) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE webhook_deliveries
            SET status = 'pending', attempts = 0, next_attempt_at = now(), failed_at = NULL, trigger = 'manual',
                claim_token = NULL
          WHERE id = $1 AND status IN ('pending', 'failed')",
    )
    .bind(id)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}
