//! The refunds, disputes and transfer reversals of one payment, as `ops show` prints them, and the reversals still owed back
//! by recipients, as `ops parked` lists them (a reversal Stripe refused is retried, and shown until it is made).

use std::io::Write;

use super::{age, money};
use crate::store::disputes::{disputes_for_payment, DisputeRow};
use crate::store::refunds::{parts_for_payment, refunds_for_payment, RefundPartRow, RefundRow};
use crate::store::reversals::{pending_reversals, reversals_for_payment, ReversalRow};
use crate::store::StoreError;

#[derive(Debug, serde::Serialize)]
pub struct MoneyBack {
    pub refunds: Vec<RefundRow>,
    /// How each refund was attributed to allocations and covered.
    pub refund_parts: Vec<RefundPartRow>,
    pub reversals: Vec<ReversalRow>,
    /// Disputes of the payment's charge; each withdrawal is the refund row its `refund_id` names.
    pub disputes: Vec<DisputeRow>,
}

pub async fn for_payment(conn: &mut sqlx::PgConnection, payment_id: &str) -> Result<MoneyBack, StoreError> {
    Ok(MoneyBack {
        refunds: refunds_for_payment(conn, payment_id).await?,
        refund_parts: parts_for_payment(conn, payment_id).await?,
        reversals: reversals_for_payment(conn, payment_id).await?,
        disputes: disputes_for_payment(conn, payment_id).await?,
    })
}

pub fn print(m: &MoneyBack, currency: &str, out: &mut (dyn Write + Send)) -> std::io::Result<()> {
    writeln!(out, "disputes: {}", m.disputes.len())?;
    for d in &m.disputes {
        writeln!(
            out,
            "  {}  {:<14} {}  fee {}  {}  {}",
            d.stripe_dispute_id,
            d.status,
            money(Some(d.amount_cents), currency),
            money(Some(d.fee_cents), currency),
            d.reason.as_deref().unwrap_or("no reason"),
            match (d.withdrawn_at, d.reinstate_seen_at) {
                (None, _) => "funds not withdrawn".to_owned(),
                (Some(_), None) => "funds withdrawn (taken as a refund below)".to_owned(),
                (Some(_), Some(_)) => "funds withdrawn, then reinstated".to_owned(),
            }
        )?;
    }
    writeln!(out, "refunds: {}", m.refunds.len())?;
    for r in &m.refunds {
        let dispute = m.disputes.iter().find(|d| d.refund_id == Some(r.id));
        writeln!(
            out,
            "  {}  {:<9} {}  {}  for {}{}{}",
            r.stripe_refund_id
                .as_deref()
                .or(dispute.map(|d| d.stripe_dispute_id.as_str()))
                .unwrap_or("(not answered yet)"),
            r.status,
            money(Some(r.amount_cents), currency),
            r.source,
            r.split_allocation_id.as_deref().unwrap_or("spread over the shares"),
            if r.reinstated_at.is_some() {
                "  given back: the dispute was won"
            } else {
                ""
            },
            r.failure_message
                .as_deref()
                .map(|m| format!("  {m}"))
                .unwrap_or_default()
        )?;
        for p in m.refund_parts.iter().filter(|p| p.refund_id == r.id) {
            writeln!(
                out,
                "    {}  {}: {}",
                p.split_allocation_id,
                money(Some(p.amount_cents), currency),
                if p.covered_at.is_none() {
                    "waiting for its transfer to settle".to_owned()
                } else {
                    format!(
                        "parked {} + not transferred {} + reversed {} + platform loss {}",
                        p.from_parked_cents, p.from_pending_cents, p.reversal_cents, p.platform_loss_cents
                    )
                }
            )?;
        }
    }
    writeln!(out, "transfer reversals: {}", m.reversals.len())?;
    print_reversals(&m.reversals, currency, out)
}

fn print_reversals(reversals: &[ReversalRow], currency: &str, out: &mut (dyn Write + Send)) -> std::io::Result<()> {
    for r in reversals {
        writeln!(
            out,
            "  {}  {}  {:<9} {}  attempts {}{}",
            r.split_allocation_id,
            r.stripe_transfer_id,
            r.status,
            money(Some(r.amount_cents), currency),
            r.attempts,
            match (&r.status[..], &r.failure_message) {
                ("PENDING", Some(m)) => format!("  retried: {m}"),
                _ => String::new(),
            }
        )?;
    }
    Ok(())
}

/// Reversals still owed back (PENDING), oldest first.
pub async fn owed(conn: &mut sqlx::PgConnection) -> Result<Vec<ReversalRow>, StoreError> {
    pending_reversals(conn).await
}

pub fn print_owed(reversals: &[ReversalRow], out: &mut (dyn Write + Send)) -> std::io::Result<()> {
    writeln!(out, "reversals not made yet: {}", reversals.len())?;
    for r in reversals {
        writeln!(
            out,
            "  {}  {}  {} cents  age {}  attempts {}  {}",
            r.split_allocation_id,
            r.stripe_transfer_id,
            r.amount_cents,
            age((chrono::Utc::now() - r.created_at).num_seconds()),
            r.attempts,
            r.failure_message.as_deref().unwrap_or("not tried yet")
        )?;
    }
    Ok(())
}
