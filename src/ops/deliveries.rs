//! `splitpay ops events [--failed] [--organisation ID]` lists webhook deliveries; `splitpay ops redeliver
//! <oevt_…|--since TIME>` queues them again. Redelivery never touches a delivery that got a 2xx (the contract: an
//! event that got a 2xx is never sent to that endpoint again) nor one in flight; it also creates deliveries for
//! endpoints registered after the event. A delivery that ended with its outcome unknown (its worker stopped between
//! sending and recording) is sent again only here: the receiver may already have it, and the operator who
//! redelivers accepts that it may get it twice (with the same `webhook-id`, to deduplicate on); the command says so.

use std::io::Write;

use chrono::{DateTime, Utc};

use super::{Change, OpsError, Outcome};
use crate::app::AppContext;
use crate::jobs::queue::{enqueue, Queue};
use crate::store::records::insert_audit;
use crate::store::webhooks;

/// At most this many deliveries are queued again by one `--since`.
pub const REDELIVER_MAX: i64 = 10_000;

/// A candidate for redelivery: id, status, and whether it ended with its outcome unknown.
type Candidate = (String, String, bool);

macro_rules! candidate_select {
    () => {
        "SELECT id, status, coalesce(status = 'failed' AND last_error LIKE 'outcome unknown%', false)
           FROM webhook_deliveries"
    };
}
const CANDIDATE_SELECT: &str = candidate_select!();
/// `redeliver --since`'s candidates: failed deliveries created since `$1`, at most `$2`, oldest first
/// (`webhook_deliveries_failed_created`). Public so tests can `EXPLAIN` it.
pub const REDELIVER_SINCE_SQL: &str = concat!(
    candidate_select!(),
    " WHERE status = 'failed' AND created_at >= $1 ORDER BY created_at, id LIMIT $2"
);

/// What an operator is told before deliveries whose outcome is unknown are sent again.
fn duplicate_warning(ids: &[String]) -> String {
    format!(
        "warning: {} of these deliveries ended with their outcome unknown (the worker stopped while delivering: {}); \
         the receiver may already have them, and redelivering sends them again with the same webhook-id, so it may \
         get them twice",
        ids.len(),
        ids.join(", ")
    )
}

pub async fn events(
    ctx: &AppContext,
    failed: bool,
    organisation: Option<&str>,
    limit: i64,
    json: bool,
    out: &mut (dyn Write + Send),
) -> Result<Outcome, OpsError> {
    let mut conn = ctx.pool.acquire().await?;
    let rows = webhooks::list_deliveries(&mut conn, failed, organisation, limit).await?;
    if json {
        let doc: Vec<_> = rows
            .iter()
            .map(|d| {
                serde_json::json!({
                    "id": d.id, "event_id": d.outbox_event_id, "event_type": d.event_type,
                    "organisation_id": d.organisation_id, "endpoint_id": d.endpoint_id, "url": d.url,
                    "status": d.status, "attempts": d.attempts, "next_attempt_at": d.next_attempt_at,
                    "succeeded_at": d.succeeded_at, "failed_at": d.failed_at, "last_error": d.last_error,
                    "trigger": d.trigger, "created_at": d.created_at,
                })
            })
            .collect();
        writeln!(out, "{}", serde_json::json!({ "deliveries": doc }))?;
    } else if rows.is_empty() {
        writeln!(out, "no webhook deliveries")?;
    } else {
        for d in &rows {
            let when = match d.status.as_str() {
                "pending" => format!("next {}", d.next_attempt_at.to_rfc3339()),
                _ => String::new(),
            };
            writeln!(
                out,
                "{}  {}  {}  {}  {}  attempts {}  {}  {}",
                d.id,
                d.outbox_event_id,
                d.event_type,
                d.url,
                d.status,
                d.attempts,
                d.last_error.as_deref().unwrap_or(""),
                when
            )?;
        }
    }
    Ok(Outcome::Done)
}

pub async fn redeliver(
    ctx: &AppContext,
    event: Option<&str>,
    since: Option<&str>,
    change: &Change,
    json: bool,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> Result<Outcome, OpsError> {
    let mut tx = ctx.pool.begin().await?;
    let (target, candidates, created) = match (event, since) {
        (Some(id), None) => {
            if !id.starts_with("oevt_") {
                return super::usage(err, &format!("'{id}' is not an outbox event id (oevt_…)"));
            }
            let row: Option<(String, String)> =
                sqlx::query_as("SELECT organisation_id, event_type FROM outbox_events WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?;
            let Some((organisation, event_type)) = row else {
                writeln!(err, "no outbox event '{id}'; `splitpay ops events` lists deliveries")?;
                return Ok(Outcome::Refused);
            };
            // Endpoints registered after the event get their delivery now (only when not a dry run, below).
            let missing: Vec<(String,)> = sqlx::query_as(
                "SELECT e.id FROM webhook_endpoints e
                  WHERE e.organisation_id = $1 AND e.disabled_at IS NULL
                    AND (e.event_types IS NULL OR $2 = ANY (e.event_types))
                    AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.outbox_event_id = $3
                                     AND d.endpoint_id = e.id)",
            )
            .bind(&organisation)
            .bind(&event_type)
            .bind(id)
            .fetch_all(&mut *tx)
            .await?;
            let existing: Vec<Candidate> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "{CANDIDATE_SELECT} WHERE outbox_event_id = $1 ORDER BY id"
            )))
            .bind(id)
            .fetch_all(&mut *tx)
            .await?;
            let created = if change.dry_run || missing.is_empty() {
                missing.into_iter().map(|(e,)| format!("new delivery to {e}")).collect()
            } else {
                webhooks::create_deliveries(&mut tx, id, &organisation, &event_type).await?
            };
            (id.to_owned(), existing, created)
        }
        (None, Some(raw)) => {
            let Ok(since) = DateTime::parse_from_rfc3339(raw).map(|t| t.with_timezone(&Utc)) else {
                return super::usage(
                    err,
                    &format!("--since '{raw}' is not an RFC 3339 time (2026-12-04T10:00:00Z)"),
                );
            };
            let existing: Vec<Candidate> = sqlx::query_as(REDELIVER_SINCE_SQL)
                .bind(since)
                .bind(REDELIVER_MAX)
                .fetch_all(&mut *tx)
                .await?;
            (format!("since:{}", since.to_rfc3339()), existing, Vec::new())
        }
        _ => return super::usage(err, "name one outbox event (oevt_…) or --since TIME, not both"),
    };
    let (requeue, skipped): (Vec<_>, Vec<_>) = candidates
        .into_iter()
        .partition(|(_, status, _)| status == "failed" || status == "pending");
    let outcome_unknown: Vec<String> = requeue
        .iter()
        .filter(|(_, _, unknown)| *unknown)
        .map(|(id, _, _)| id.clone())
        .collect();
    let requeue: Vec<String> = requeue.into_iter().map(|(id, _, _)| id).collect();
    let skipped: Vec<serde_json::Value> = skipped
        .into_iter()
        .map(|(id, status, _)| serde_json::json!({ "id": id, "status": status }))
        .collect();
    let plan = serde_json::json!({
        "action": "redeliver", "target": target, "requeue": requeue, "create": created, "skipped": skipped,
        "outcome_unknown": outcome_unknown,
    });
    if !outcome_unknown.is_empty() {
        writeln!(err, "{}", duplicate_warning(&outcome_unknown))?;
    }
    if change.dry_run {
        return super::print_dry_run(out, json, &plan);
    }
    if requeue.is_empty() && created.is_empty() {
        writeln!(
            err,
            "nothing to redeliver for {target}: deliveries that got a 2xx are never sent again, and ones in flight are left to finish"
        )?;
        return Ok(Outcome::Refused);
    }
    if !super::confirm(
        change,
        &format!("queue {} deliveries again", requeue.len() + created.len()),
        err,
    )? {
        return Ok(Outcome::Refused);
    }
    // A row can change between the read and here (a worker claimed it): only what was requeued is reported so.
    let mut requeued = Vec::new();
    let mut changed = Vec::new();
    for id in &requeue {
        if webhooks::requeue_delivery(&mut tx, id).await? {
            enqueue(&mut tx, Queue::Deliver, id, None).await?;
            requeued.push(id.clone());
        } else {
            changed.push(id.clone());
        }
    }
    for id in &created {
        enqueue(&mut tx, Queue::Deliver, id, None).await?;
    }
    let done = serde_json::json!({
        "action": "redeliver", "target": target, "requeued": requeued, "created": created, "skipped": skipped,
        "changed_meanwhile": changed, "outcome_unknown": outcome_unknown,
    });
    insert_audit(
        &mut tx,
        &change.audit("redeliver", "webhook_delivery", &target, done.clone()),
    )
    .await?;
    tx.commit().await?;
    if json {
        writeln!(out, "{}", serde_json::json!({ "redelivered": done }))?;
    } else {
        writeln!(
            out,
            "queued {} deliveries again and {} new ones for {target}; {} left alone (succeeded or in flight)",
            requeued.len(),
            created.len(),
            skipped.len()
        )?;
        if !changed.is_empty() {
            writeln!(
                out,
                "{} changed meanwhile (a worker took them) and were not queued: {}",
                changed.len(),
                changed.join(", ")
            )?;
        }
    }
    Ok(Outcome::Done)
}
