//! `splitpay ops reconcile [--payment ID] [--now]`: runs reconcile-pending and reconcile-transfers once, in the
//! foreground (transfers are driven here, not queued), then the events sweep (refund and dispute events whose
//! webhook was lost go to the inbox; the workers process them), prints what they resolved, and lists what is still
//! open for an operator: unresolved transfers (retry window ended, outcome unknown) and discrepancies found at
//! Stripe.

use std::io::Write;

use super::{OpsError, Outcome};
use crate::app::AppContext;
use crate::domain::ids::SplitPaymentId;
use crate::jobs::event_sweep::{sweep_events, EventSweepReport};
use crate::jobs::reconcile::{reconcile_pending, reconcile_transfers, PendingReport, ReconcileOptions, TransferReport};
use crate::store::payments::find_split_payment_by_intent;

#[derive(Debug, serde::Serialize)]
struct Report {
    pending: PendingReport,
    transfers: TransferReport,
    events_sweep: Option<EventSweepReport>,
    /// Why the events sweep failed this time (Stripe unreachable, …); the next run reads the same events again.
    events_sweep_error: Option<String>,
    unresolved: Vec<Unresolved>,
    discrepancies: Vec<Discrepancy>,
}

#[derive(Debug, serde::Serialize, sqlx::FromRow)]
struct Unresolved {
    split_allocation_id: String,
    split_payment_id: String,
    generation: i32,
    net_amount_cents: Option<i64>,
    unresolved_at: chrono::DateTime<chrono::Utc>,
    failure_message: Option<String>,
}

#[derive(Debug, serde::Serialize, sqlx::FromRow)]
struct Discrepancy {
    split_payment_id: String,
    split_allocation_id: Option<String>,
    stripe_transfer_id: String,
    amount_cents: i64,
    kind: String,
    detail: String,
    found_at: chrono::DateTime<chrono::Utc>,
}

pub async fn run(
    ctx: &AppContext,
    payment: Option<&str>,
    now: bool,
    json: bool,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> Result<Outcome, OpsError> {
    let payment = match payment {
        None => None,
        Some(raw) if raw.starts_with("pi_") => {
            match find_split_payment_by_intent(&mut *ctx.pool.acquire().await?, raw).await? {
                Some(id) => Some(id),
                None => {
                    writeln!(
                        err,
                        "no split payment has PaymentIntent {raw}; check the id with `splitpay ops show`"
                    )?;
                    return Ok(Outcome::Usage);
                }
            }
        }
        Some(raw) => match SplitPaymentId::parse(raw) {
            Ok(id) => Some(id),
            Err(e) => {
                writeln!(
                    err,
                    "--payment: {e}; give a split payment id (spay_…) or its PaymentIntent (pi_…)"
                )?;
                return Ok(Outcome::Usage);
            }
        },
    };
    let opts = ReconcileOptions {
        ignore_graces: now,
        payment,
        inline: true,
    };
    let pending = reconcile_pending(ctx, &opts).await?;
    let transfers = reconcile_transfers(ctx, &opts).await?;
    let (events_sweep, events_sweep_error) = match sweep_events(ctx).await {
        Ok(report) => (Some(report), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let unresolved: Vec<Unresolved> = sqlx::query_as(
        "SELECT id AS split_allocation_id, split_payment_id, generation, net_amount_cents, unresolved_at,
                failure_message
           FROM split_allocations WHERE unresolved_at IS NOT NULL ORDER BY unresolved_at LIMIT 100",
    )
    .fetch_all(&ctx.pool)
    .await?;
    let discrepancies: Vec<Discrepancy> = sqlx::query_as(
        "SELECT split_payment_id, split_allocation_id, stripe_transfer_id, amount_cents, kind, detail, found_at
           FROM transfer_discrepancies WHERE resolved_at IS NULL ORDER BY found_at LIMIT 100",
    )
    .fetch_all(&ctx.pool)
    .await?;
    let report = Report {
        pending,
        transfers,
        events_sweep,
        events_sweep_error,
        unresolved,
        discrepancies,
    };
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        print_table(&report, out)?;
    }
    Ok(Outcome::Done)
}

fn print_table(r: &Report, out: &mut (dyn Write + Send)) -> std::io::Result<()> {
    let p = &r.pending;
    let t = &r.transfers;
    writeln!(out, "reconcile-pending")?;
    writeln!(out, "  payments checked at Stripe   {:>6}", p.checked)?;
    writeln!(out, "  now succeeded                {:>6}", p.succeeded)?;
    writeln!(out, "  now processing               {:>6}", p.processing)?;
    writeln!(out, "  failed attempts recorded     {:>6}", p.attempt_failed)?;
    writeln!(
        out,
        "  failed                       {:>6}  (abandoned intakes {})",
        p.failed, p.intake_abandoned
    )?;
    writeln!(
        out,
        "  canceled                     {:>6}  (abandoned {})",
        p.canceled, p.abandoned
    )?;
    writeln!(out, "  could not check              {:>6}", p.errors)?;
    writeln!(out, "reconcile-transfers")?;
    writeln!(
        out,
        "  transfers driven             {:>6}  (now transferred {})",
        t.transfers_driven, t.transfers_resolved
    )?;
    writeln!(out, "  distributions started        {:>6}", t.distributions)?;
    writeln!(out, "  payments audited at Stripe   {:>6}", t.audited)?;
    writeln!(out, "  transfers adopted            {:>6}", t.adopted)?;
    writeln!(out, "  new discrepancies            {:>6}", t.discrepancies)?;
    writeln!(out, "  errors                       {:>6}", t.errors)?;
    writeln!(out, "events sweep (refunds and disputes)")?;
    match (&r.events_sweep, &r.events_sweep_error) {
        (Some(e), _) => {
            writeln!(out, "  events listed at Stripe      {:>6}", e.listed)?;
            writeln!(
                out,
                "  lost webhooks recovered      {:>6}  (queued for the workers)",
                e.ingested.len()
            )?;
            if !e.complete {
                writeln!(
                    out,
                    "  more events than one pass reads: run `splitpay ops reconcile` again"
                )?;
            }
        }
        (None, Some(why)) => writeln!(out, "  failed: {why}; run `splitpay ops reconcile` again")?,
        (None, None) => {}
    }
    writeln!(
        out,
        "unresolved transfers (retry window ended, outcome unknown): {}",
        r.unresolved.len()
    )?;
    for u in &r.unresolved {
        writeln!(
            out,
            "  {}  {}  gen {}  {} cents  since {}  {}",
            u.split_allocation_id,
            u.split_payment_id,
            u.generation,
            u.net_amount_cents.unwrap_or(0),
            u.unresolved_at.format("%Y-%m-%d %H:%M"),
            u.failure_message.as_deref().unwrap_or("")
        )?;
    }
    writeln!(out, "open discrepancies at Stripe: {}", r.discrepancies.len())?;
    for d in &r.discrepancies {
        writeln!(
            out,
            "  {}  {}  {}  {} cents  {}  {}",
            d.kind,
            d.stripe_transfer_id,
            d.split_payment_id,
            d.amount_cents,
            d.split_allocation_id.as_deref().unwrap_or("-"),
            d.detail
        )?;
    }
    Ok(())
}
