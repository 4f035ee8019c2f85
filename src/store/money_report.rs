//! Where one split payment's money is, each term read from its own record, for the conservation check.

use sqlx::PgConnection;

use super::payments::get_split_payment;
use super::StoreError;
use crate::domain::ids::SplitPaymentId;
use crate::domain::state::{AllocationStatus, PaymentStatus};

/// Where a split payment's money is, in minor units, each term read from its own record (never derived from
/// another term, so the check can fail): for a succeeded payment,
/// `charged = transferred + parked + refunded + in_flight + fees_kept`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MoneyReport {
    pub charged_cents: i64,
    /// The amounts of the transfers recorded on TRANSFERRED allocations' successful generations.
    pub transferred_cents: i64,
    /// Net shares of PARKED allocations (still on the platform's balance).
    pub parked_cents: i64,
    /// Net shares of REFUNDED allocations.
    pub refunded_cents: i64,
    /// PENDING or TRANSFERRING: net once the fee split is written, gross before.
    pub in_flight_cents: i64,
    /// The fees on the payment row: Stripe's processing fee plus the platform fee, less what could not be
    /// collected.
    pub fees_kept_cents: i64,
    /// VOIDED allocations (payment failed): nothing was charged for them.
    pub voided_cents: i64,
}

impl MoneyReport {
    pub fn is_conserved(&self) -> bool {
        self.charged_cents
            == self.transferred_cents
                + self.parked_cents
                + self.refunded_cents
                + self.in_flight_cents
                + self.fees_kept_cents
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
    for a in &payment.allocations {
        if a.status == AllocationStatus::Voided {
            report.voided_cents += a.gross_amount_cents;
        }
        if !charged {
            continue;
        }
        let net = a.net_amount_cents;
        match a.status {
            AllocationStatus::Transferred => {
                report.transferred_cents += transferred
                    .iter()
                    .filter(|(aid, _)| *aid == a.id)
                    .map(|(_, cents)| cents)
                    .sum::<i64>()
            }
            AllocationStatus::Parked => report.parked_cents += net.unwrap_or(0),
            AllocationStatus::Refunded => report.refunded_cents += net.unwrap_or(0),
            AllocationStatus::Pending | AllocationStatus::Transferring => {
                report.in_flight_cents += net.unwrap_or(a.gross_amount_cents)
            }
            AllocationStatus::Voided => {}
        }
    }
    Ok(report)
}
