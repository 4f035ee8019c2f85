//! What a run did, with the Stripe object ids, printed at the end (even when the run failed midway) and optionally
//! written as JSON (`--summary-json`) for scripts and the suite's own test.

use std::io::Write;

use super::events::PollStats;
use super::Failure;

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Summary {
    pub run_id: String,
    pub stripe_api_base: String,
    /// `poll` or `forwarder`.
    pub webhooks: String,
    pub accounts: Vec<AccountLine>,
    pub payments: Vec<PaymentLine>,
    /// Parked shares retried by `ops retry` (or by splitpay itself on `account.updated`, when a forwarder sends it).
    pub retried: Vec<RetryLine>,
    /// Individual comparisons of Stripe's objects with splitpay's records that held.
    pub checks_passed: u64,
    pub events: Option<PollStats>,
    /// `passed`, or why the run failed.
    pub outcome: String,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct AccountLine {
    pub role: String,
    pub id: String,
    pub deleted: bool,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct PaymentLine {
    pub label: String,
    pub split_payment_id: String,
    pub payment_intent: String,
    pub charge: String,
    pub charge_balance_transaction: String,
    pub charged_cents: i64,
    pub stripe_fee_cents: i64,
    pub allocations: Vec<AllocationLine>,
    pub refunds: Vec<MoneyBackLine>,
    pub reversals: Vec<MoneyBackLine>,
    /// What stays on the platform's balance by Stripe's objects: charge − fee − net transfers − refunds.
    pub platform_retained_cents: i64,
    pub conserved: bool,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct AllocationLine {
    pub split_allocation_id: String,
    pub destination: String,
    pub status: String,
    pub net_amount_cents: i64,
    pub generation: i32,
    pub transfer: Option<String>,
    pub transfer_balance_transaction: Option<String>,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct MoneyBackLine {
    pub id: String,
    pub amount_cents: i64,
    pub balance_transaction: String,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct RetryLine {
    pub split_allocation_id: String,
    /// `ops retry`, or `account.updated` when splitpay retried it first.
    pub by: String,
}

impl Summary {
    pub fn print(&self, out: &mut dyn Write) -> Result<(), Failure> {
        writeln!(out, "\nSummary of run {} ({})", self.run_id, self.outcome)?;
        writeln!(out, "  Stripe API       {}", self.stripe_api_base)?;
        writeln!(out, "  webhooks         {}", self.webhooks)?;
        for a in &self.accounts {
            let state = if a.deleted { "deleted" } else { "NOT deleted" };
            writeln!(out, "  account          {:<16} {} ({state})", a.role, a.id)?;
        }
        for p in &self.payments {
            writeln!(
                out,
                "  payment          {:<16} {} {} {} charged {} fee {} ({}) retained {} {}",
                p.label,
                p.split_payment_id,
                p.payment_intent,
                p.charge,
                p.charged_cents,
                p.stripe_fee_cents,
                p.charge_balance_transaction,
                p.platform_retained_cents,
                if p.conserved { "conserved" } else { "NOT CONSERVED" }
            )?;
            for a in &p.allocations {
                writeln!(
                    out,
                    "    share          {} → {} {} net {} gen {} {} {}",
                    a.split_allocation_id,
                    a.destination,
                    a.status,
                    a.net_amount_cents,
                    a.generation,
                    a.transfer.as_deref().unwrap_or("-"),
                    a.transfer_balance_transaction.as_deref().unwrap_or("")
                )?;
            }
            for r in &p.reversals {
                writeln!(
                    out,
                    "    reversal       {} {} ({})",
                    r.id, r.amount_cents, r.balance_transaction
                )?;
            }
            for r in &p.refunds {
                writeln!(
                    out,
                    "    refund         {} {} ({})",
                    r.id, r.amount_cents, r.balance_transaction
                )?;
            }
        }
        for r in &self.retried {
            writeln!(out, "  retried          {} by {}", r.split_allocation_id, r.by)?;
        }
        if let Some(e) = &self.events {
            writeln!(
                out,
                "  events polled    {} ingested, {} already in the inbox, {} Connect events left out, {} in another API version",
                e.ingested, e.duplicates, e.skipped_connect, e.other_api_version
            )?;
        }
        writeln!(out, "  checks passed    {}", self.checks_passed)?;
        Ok(())
    }
}
