//! `splitpay ops retry <salc_…> [--wait]`: retries a PARKED share on a new transfer generation (a new idempotency
//! key), after asking Stripe that the recipient's account can receive transfers now and that Stripe holds no
//! transfer of the parked generation (one found is recorded instead). The path is the one automatic retries take
//! ([`crate::jobs::accounts`]). Refusals (not PARKED, account not ready, Stripe unreachable) exit 1 and change
//! nothing; `--dry-run` makes the same reads and changes nothing.

use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::json;

use super::{Change, OpsError, Outcome};
use crate::app::AppContext;
use crate::domain::ids::SplitAllocationId;
use crate::domain::state::AllocationStatus;
use crate::jobs::accounts::{apply_retry, plan_retry, readiness, retry_audit, Readiness, Retried, RetryPlan};
use crate::store::allocations::{allocation_context, get_split_allocation};
use crate::store::StoreError;

/// How often `--wait` looks at the allocation.
const WAIT_POLL: Duration = Duration::from_millis(250);

fn refuse(err: &mut (dyn Write + Send), id: &str, message: &str) -> Result<Outcome, OpsError> {
    writeln!(err, "{id}: {message}")?;
    Ok(Outcome::Refused)
}

pub async fn run(
    ctx: &AppContext,
    raw_id: &str,
    wait: Option<Duration>,
    change: &Change,
    json: bool,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> Result<Outcome, OpsError> {
    let Ok(id) = SplitAllocationId::parse(raw_id) else {
        return super::usage(
            err,
            &format!("'{raw_id}' is not a split allocation id: ops retry takes a salc_… id (see ops parked)"),
        );
    };
    let c = match allocation_context(&mut *ctx.pool.acquire().await?, &id).await {
        Ok(c) => c,
        Err(StoreError::NotFound { .. }) => return refuse(err, raw_id, "no such split allocation; see ops parked"),
        Err(e) => return Err(e.into()),
    };
    // The state first: a share that is not PARKED is refused without asking Stripe anything.
    if c.allocation.status != AllocationStatus::Parked || c.allocation.net_amount_cents.is_none_or(|n| n <= 0) {
        let why = plan_retry(ctx, &c)
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        return refuse(err, raw_id, &why);
    }
    let ready = readiness(ctx.gateway.as_ref(), &c.destination_account_id).await;
    match &ready {
        Readiness::Ready(_) => {}
        Readiness::NotReady(why) => {
            return refuse(
                err,
                raw_id,
                &format!("{why}. Nothing changed: finish the recipient's onboarding at Stripe, then retry."),
            )
        }
        Readiness::Unknown(why) => return refuse(err, raw_id, &format!("{why}. Nothing changed: try again later.")),
    }
    let plan = match plan_retry(ctx, &c).await {
        Ok(plan) => plan,
        Err(why) => return refuse(err, raw_id, &why.to_string()),
    };
    let doc = json!({
        "action": "retry",
        "split_allocation_id": id.as_str(),
        "destination_account_id": c.destination_account_id,
        "net_amount_cents": c.allocation.net_amount_cents,
        "currency": c.payment.currency,
        "parked_failure_code": c.allocation.failure_code,
        "readiness": ready.to_json(),
        "plan": match &plan {
            RetryPlan::RecordFound(t) => json!({
                "record_transfer_found_at_stripe": t.id, "generation": c.allocation.generation,
            }),
            RetryPlan::NewGeneration { from } => json!({ "new_generation": from + 1 }),
        },
    });
    if change.dry_run {
        return super::print_dry_run(out, json, &doc);
    }
    let what = match &plan {
        RetryPlan::RecordFound(t) => format!("record {t} found at Stripe for {id}", t = t.id),
        RetryPlan::NewGeneration { from } => format!(
            "transfer {} to {} again as generation {}",
            super::money(c.allocation.net_amount_cents, c.payment.currency.stripe_code()),
            c.destination_account_id,
            from + 1
        ),
    };
    if !super::confirm(change, &what, err)? {
        return Ok(Outcome::Refused);
    }
    let audit = retry_audit(&change.actor(), change.reason.clone(), &c, &plan, &ready);
    let retried = match apply_retry(ctx, &c, &plan, &audit).await.map_err(|e| e.to_string())? {
        Ok(retried) => retried,
        Err(why) => return refuse(err, raw_id, &why.to_string()),
    };
    let mut report = json!({ "split_allocation_id": id.as_str() });
    match &retried {
        Retried::FoundAtStripe {
            transfer_id,
            generation,
        } => {
            report["result"] = json!("found_at_stripe");
            report["stripe_transfer_id"] = json!(transfer_id);
            report["generation"] = json!(generation);
            if !json {
                writeln!(
                    out,
                    "{id}: Stripe already holds {transfer_id} of generation {generation}: recorded as transferred; no new transfer made"
                )?;
            }
        }
        Retried::Started {
            generation,
            idempotency_key,
        } => {
            report["result"] = json!("new_generation");
            report["generation"] = json!(generation);
            report["idempotency_key"] = json!(idempotency_key);
            if !json {
                writeln!(out, "{id}: retrying as generation {generation} (key {idempotency_key})")?;
            }
        }
    }
    let mut outcome = Outcome::Done;
    if let (Some(limit), Retried::Started { .. }) = (wait, &retried) {
        let (doc, code) = wait_for_outcome(ctx, &id, limit).await?;
        if !json {
            writeln!(out, "{id}: {}", doc["message"].as_str().unwrap_or_default())?;
        }
        report["outcome"] = doc;
        outcome = code;
    }
    if json {
        writeln!(out, "{report}")?;
    }
    Ok(outcome)
}

/// Waits (at most `limit`) for the new generation to leave TRANSFERRING. Parked again exits 1.
async fn wait_for_outcome(
    ctx: &AppContext,
    id: &SplitAllocationId,
    limit: Duration,
) -> Result<(serde_json::Value, Outcome), OpsError> {
    let deadline = Instant::now() + limit;
    loop {
        let a = get_split_allocation(&mut *ctx.pool.acquire().await?, id).await?;
        match a.status {
            AllocationStatus::Transferred => {
                let tr = a.stripe_transfer_id.unwrap_or_default();
                return Ok((
                    json!({ "status": "TRANSFERRED", "stripe_transfer_id": tr, "message": format!("transferred as {tr}") }),
                    Outcome::Done,
                ));
            }
            AllocationStatus::Parked => {
                let code = a.failure_code.unwrap_or_default();
                let message = a.failure_message.unwrap_or_default();
                return Ok((
                    json!({
                        "status": "PARKED", "failure_code": code, "failure_message": message,
                        "message": format!("parked again: {code}: {message}"),
                    }),
                    Outcome::Refused,
                ));
            }
            AllocationStatus::Transferring if Instant::now() < deadline => tokio::time::sleep(WAIT_POLL).await,
            status => {
                return Ok((
                    json!({
                        "status": status.as_str(), "generation": a.generation,
                        "message": format!("still {status} after {}s (generation {}); see ops show {id}", limit.as_secs(), a.generation),
                    }),
                    Outcome::Done,
                ))
            }
        }
    }
}
