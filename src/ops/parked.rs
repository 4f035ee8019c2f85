//! `splitpay ops parked [--organisation ID] [--older-than DURATION]`: the parked allocations (shares Stripe refused
//! to transfer, or whose fees took the whole share), oldest first, for an operator to retry or refund. Read-only.
//! The query starts from the partial index `split_allocations_parked` (status = 'PARKED', by `parked_at`).

use std::io::Write;

use chrono::{DateTime, Utc};

use super::{age, money, OpsError, Outcome};
use crate::app::AppContext;

/// The most rows one listing prints; the JSON says when more matched.
const LIMIT: i64 = 500;

#[derive(Debug, serde::Serialize)]
struct Report {
    parked: Vec<Parked>,
    /// True when more than [`LIMIT`] allocations matched (the oldest are listed).
    truncated: bool,
    /// Transfer reversals Stripe has not made yet (refused for a low balance, or not answered): retried on their
    /// schedule, listed here until made.
    reversals_pending: Vec<crate::store::reversals::ReversalRow>,
    /// Reversals made for a refund Stripe then refused: the money is on the platform's balance, for an operator.
    reversed_without_refund: Vec<crate::store::reversals::ReversalRow>,
    /// Reversals made for an `ops refund` whose refund was never sent (the command stopped): on the platform's
    /// balance until the command is run again.
    reversed_refund_not_sent: Vec<crate::store::reversals::ReversalRow>,
}

/// An `ops refund` intent younger than this may still have its command running: not listed as unfinished.
pub const UNFINISHED_REFUND_GRACE_SECS: i64 = 600;

#[derive(Debug, serde::Serialize, sqlx::FromRow)]
pub struct Parked {
    pub split_allocation_id: String,
    pub split_payment_id: String,
    pub distributor_organisation_id: String,
    pub distributor_name: String,
    pub recipient_organisation_id: String,
    pub recipient_name: String,
    pub destination_account_id: String,
    pub gross_amount_cents: i64,
    pub net_amount_cents: Option<i64>,
    pub currency: String,
    pub failure_code: Option<String>,
    pub failure_message: Option<String>,
    pub parked_at: DateTime<Utc>,
    pub age_seconds: i64,
    pub attempts: i32,
    pub generation: i32,
}

/// Parked allocations, oldest first; `organisation` matches the distributor or the recipient; `older_than_ms` keeps
/// those parked at least that long ago. At most `limit` rows.
pub const PARKED_SQL: &str = "SELECT a.id AS split_allocation_id, a.split_payment_id,
            p.organisation_id AS distributor_organisation_id, d.name AS distributor_name,
            l.recipient_organisation_id, l.recipient_org_name AS recipient_name,
            l.stripe_connect_account_id AS destination_account_id,
            a.gross_amount_cents, a.net_amount_cents, p.currency, a.failure_code, a.failure_message, a.parked_at,
            floor(extract(epoch FROM now() - a.parked_at))::bigint AS age_seconds, a.attempts, a.generation
       FROM split_allocations a
       JOIN split_payments p ON p.id = a.split_payment_id
       JOIN organisations d ON d.id = p.organisation_id
       JOIN recipient_account_links l ON l.id = a.recipient_org_account_link_id
      WHERE a.status = 'PARKED'
        AND ($1::text IS NULL OR p.organisation_id = $1 OR l.recipient_organisation_id = $1)
        AND ($2::bigint IS NULL OR a.parked_at <= now() - make_interval(secs => $2::double precision / 1000))
      ORDER BY a.parked_at, a.id
      LIMIT $3";

pub async fn run(
    ctx: &AppContext,
    organisation: Option<&str>,
    older_than_ms: Option<u64>,
    json: bool,
    out: &mut (dyn Write + Send),
) -> Result<Outcome, OpsError> {
    let older_than_ms = older_than_ms.map(|ms| i64::try_from(ms).unwrap_or(i64::MAX));
    let mut parked: Vec<Parked> = sqlx::query_as(PARKED_SQL)
        .bind(organisation)
        .bind(older_than_ms)
        .bind(LIMIT + 1)
        .fetch_all(&ctx.pool)
        .await?;
    let truncated = parked.len() as i64 > LIMIT;
    parked.truncate(LIMIT as usize);
    let reversals_pending = super::money_back::owed(&mut *ctx.pool.acquire().await?).await?;
    let reversed_without_refund =
        crate::store::reversals::reversed_without_refund(&mut *ctx.pool.acquire().await?).await?;
    let reversed_refund_not_sent = crate::store::reversals::reversed_refund_not_sent(
        &mut *ctx.pool.acquire().await?,
        UNFINISHED_REFUND_GRACE_SECS,
    )
    .await?;
    let report = Report {
        parked,
        truncated,
        reversals_pending,
        reversed_without_refund,
        reversed_refund_not_sent,
    };
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        print_table(&report, out)?;
    }
    Ok(Outcome::Done)
}

fn print_table(r: &Report, out: &mut (dyn Write + Send)) -> std::io::Result<()> {
    super::money_back::print_owed(&r.reversals_pending, out)?;
    writeln!(
        out,
        "reversed for a refund Stripe refused (on the platform's balance): {}",
        r.reversed_without_refund.len()
    )?;
    for t in &r.reversed_without_refund {
        writeln!(
            out,
            "  {}  {}  {} cents  `splitpay ops refund {} --reverse-transfer --reason …` refunds the donor with it (not \
             reversed again); the share's next refund or dispute takes it for its part, and the rest goes back to the \
             recipient",
            t.split_allocation_id, t.stripe_transfer_id, t.amount_cents, t.split_allocation_id
        )?;
    }
    writeln!(
        out,
        "reversed for an ops refund not sent yet (on the platform's balance): {}",
        r.reversed_refund_not_sent.len()
    )?;
    for t in &r.reversed_refund_not_sent {
        writeln!(
            out,
            "  {}  {}  {} cents  run `splitpay ops refund {} --reverse-transfer --reason …` again to send the refund",
            t.split_allocation_id, t.stripe_transfer_id, t.amount_cents, t.split_allocation_id
        )?;
    }
    writeln!(out, "parked allocations: {}", r.parked.len())?;
    if r.parked.is_empty() {
        return Ok(());
    }
    writeln!(
        out,
        "{:<31} {:<24} {:<24} {:>14} {:>8} {:>8} {:>3}  reason",
        "allocation", "distributor", "recipient", "net", "age", "attempts", "gen"
    )?;
    for p in &r.parked {
        writeln!(
            out,
            "{:<31} {:<24} {:<24} {:>14} {:>8} {:>8} {:>3}  {}: {}",
            p.split_allocation_id,
            clip(&p.distributor_name, 24),
            clip(&p.recipient_name, 24),
            money(p.net_amount_cents, &p.currency),
            age(p.age_seconds),
            p.attempts,
            p.generation,
            p.failure_code.as_deref().unwrap_or("-"),
            p.failure_message.as_deref().unwrap_or("")
        )?;
    }
    if r.truncated {
        writeln!(
            out,
            "(only the oldest {LIMIT} are listed: narrow with --organisation or --older-than)"
        )?;
    }
    writeln!(
        out,
        "details: `splitpay ops show <allocation>`; a share is retried after its account is fixed, or refunded"
    )
}

/// `name` cut to `width` characters (with an ellipsis), so one long name does not break the columns.
pub(crate) fn clip(name: &str, width: usize) -> String {
    if name.chars().count() <= width {
        name.to_owned()
    } else {
        let mut s: String = name.chars().take(width.saturating_sub(1)).collect();
        s.push('…');
        s
    }
}
