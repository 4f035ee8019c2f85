//! Where one split payment's money is, each term read from its own record, for the conservation check.

use sqlx::PgConnection;

use super::payments::get_split_payment;
use super::StoreError;
use crate::domain::ids::SplitPaymentId;
use crate::domain::state::{AllocationStatus, PaymentStatus};

/// Where a split payment's money is, in minor units, each term read from its own record (never derived from
/// another term, so the check can fail): for a succeeded payment,
/// `charged = transferred − reversed + parked + refunded + disputed + in_flight + fees_kept − platform_loss
/// − unsettled`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MoneyReport {
    pub charged_cents: i64,
    /// The amounts of every successful generation's transfer (a won dispute adds a generation to a share).
    pub transferred_cents: i64,
    /// Reversals Stripe made (`transfer_reversals` SUCCEEDED): back on the platform's balance.
    pub reversed_cents: i64,
    /// What PARKED allocations are owed and were not sent (their net less what refunds took and what Stripe holds
    /// for them), still on the platform's balance.
    pub parked_cents: i64,
    /// Refunds to the donor Stripe made (`refunds` SUCCEEDED, not disputes), plus the net left on a REFUNDED
    /// allocation that has no refund record (refunded before refunds were recorded).
    pub refunded_cents: i64,
    /// Funds a dispute withdrew and Stripe has not given back (a won dispute's withdrawal no longer counts).
    pub disputed_cents: i64,
    /// PENDING or TRANSFERRING: what is owed and not sent yet, once the fee split is written; gross before.
    pub in_flight_cents: i64,
    /// The fees on the payment row: Stripe's processing fee plus the platform fee, less what could not be
    /// collected.
    pub fees_kept_cents: i64,
    /// What the platform bore of the refunds (`refund_parts.platform_loss_cents`): fees refunded, `none` policy,
    /// shares already gone.
    pub platform_loss_cents: i64,
    /// Refunded money whose cover is not decided yet: parts waiting for a transfer to settle, succeeded refunds not
    /// attributed, and reversals still to be made (not those being canceled: their refund no longer stands).
    pub unsettled_cents: i64,
    /// VOIDED allocations (payment failed): nothing was charged for them.
    pub voided_cents: i64,
}

impl MoneyReport {
    pub fn is_conserved(&self) -> bool {
        self.charged_cents
            == self.transferred_cents - self.reversed_cents
                + self.parked_cents
                + self.refunded_cents
                + self.disputed_cents
                + self.in_flight_cents
                + self.fees_kept_cents
                - self.platform_loss_cents
                - self.unsettled_cents
    }
}

pub async fn money_report(conn: &mut PgConnection, id: &SplitPaymentId) -> Result<MoneyReport, StoreError> {
    let payment = get_split_payment(conn, id).await?;
    // Only a succeeded payment took the donor's money; before that (or after a failure) nothing is the platform's.
    let charged = payment.payment.status == PaymentStatus::Succeeded;
    let p = &payment.payment;
    let mut report = MoneyReport {
        charged_cents: if charged { p.total_amount_cents } else { 0 },
        fees_kept_cents: if charged {
            p.processing_fee_cents.unwrap_or(0) + p.platform_fee_cents.unwrap_or(0)
                - p.fee_uncollected_cents.unwrap_or(0)
        } else {
            0
        },
        ..MoneyReport::default()
    };
    let transferred: Vec<(String, i64)> = sqlx::query_as(
        "SELECT t.split_allocation_id, t.amount_cents FROM transfer_attempts t
           JOIN split_allocations a ON a.id = t.split_allocation_id
          WHERE a.split_payment_id = $1 AND t.outcome = 'TRANSFERRED'",
    )
    .bind(id.as_str())
    .fetch_all(&mut *conn)
    .await?;
    // Per allocation: whether any refund names it (given-back disputes' parts take nothing).
    let taken: Vec<(String, i64)> = sqlx::query_as(
        "SELECT a.id, count(p.refund_id)::bigint
           FROM split_allocations a
           LEFT JOIN (refund_parts p JOIN refunds r ON r.id = p.refund_id AND r.reinstated_at IS NULL)
             ON p.split_allocation_id = a.id
          WHERE a.split_payment_id = $1 GROUP BY a.id",
    )
    .bind(id.as_str())
    .fetch_all(&mut *conn)
    .await?;
    let (refunded, disputed, unattributed): (i64, i64, i64) = sqlx::query_as(
        "SELECT coalesce(sum(amount_cents) FILTER (WHERE source <> 'dispute'), 0)::bigint,
                coalesce(sum(amount_cents) FILTER (WHERE source = 'dispute' AND reinstated_at IS NULL), 0)::bigint,
                coalesce(sum(amount_cents) FILTER (WHERE attributed_at IS NULL AND reinstated_at IS NULL), 0)::bigint
           FROM refunds WHERE split_payment_id = $1 AND status = 'SUCCEEDED'",
    )
    .bind(id.as_str())
    .fetch_one(&mut *conn)
    .await?;
    let (loss, waiting): (i64, i64) = sqlx::query_as(
        "SELECT coalesce(sum(p.platform_loss_cents), 0)::bigint,
                coalesce(sum(p.amount_cents) FILTER (WHERE p.covered_at IS NULL), 0)::bigint
           FROM refund_parts p JOIN refunds r ON r.id = p.refund_id
          WHERE r.split_payment_id = $1 AND r.reinstated_at IS NULL",
    )
    .bind(id.as_str())
    .fetch_one(&mut *conn)
    .await?;
    let (reversed, reversing): (i64, i64) = sqlx::query_as(
        "SELECT coalesce(sum(r.amount_cents) FILTER (WHERE r.status = 'SUCCEEDED'), 0)::bigint,
                -- A reversal whose cancel waits for its lookup is taken as not made (its refund no longer stands).
                coalesce(sum(r.amount_cents) FILTER (WHERE r.status = 'PENDING' AND r.cancel_requested_at IS NULL),
                         0)::bigint
           FROM transfer_reversals r JOIN split_allocations a ON a.id = r.split_allocation_id
          WHERE a.split_payment_id = $1",
    )
    .bind(id.as_str())
    .fetch_one(&mut *conn)
    .await?;
    if charged {
        report.refunded_cents = refunded;
        report.disputed_cents = disputed;
        report.platform_loss_cents = loss;
        report.reversed_cents = reversed;
        report.unsettled_cents = waiting + unattributed + reversing;
    }
    for a in &payment.allocations {
        if a.status == AllocationStatus::Voided {
            report.voided_cents += a.gross_amount_cents;
        }
        if !charged {
            continue;
        }
        let parts = taken.iter().find(|(aid, _)| *aid == a.id).map_or(0, |(_, n)| *n);
        // Every successful generation is at Stripe, whatever the share's state now (a won dispute's new
        // generation follows an earlier, reversed one).
        report.transferred_cents += transferred
            .iter()
            .filter(|(aid, _)| *aid == a.id)
            .map(|(_, cents)| cents)
            .sum::<i64>();
        let owed = match a.net_amount_cents {
            Some(net) => Some(super::refunds::outstanding_cents(conn, &a.id, net).await?),
            None => None,
        };
        match a.status {
            AllocationStatus::Transferred => {}
            AllocationStatus::Parked => report.parked_cents += owed.unwrap_or(0),
            AllocationStatus::Refunded if parts == 0 => report.refunded_cents += owed.unwrap_or(0),
            AllocationStatus::Refunded => {}
            AllocationStatus::Pending | AllocationStatus::Transferring => {
                report.in_flight_cents += owed.unwrap_or(a.gross_amount_cents)
            }
            AllocationStatus::Voided => {}
        }
    }
    Ok(report)
}
