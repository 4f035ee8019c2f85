//! What refunds took from a share, and what it is still owed (for covering parts, freezing a generation's amount
//! and the money report), and the reads `ops` and the reconciler make of refunds. Split from [`super::refunds`],
//! which re-exports these.

use sqlx::PgConnection;

use super::refunds::{RefundPartRow, RefundRow};
use super::StoreError;

/// What an allocation's covered parts have taken so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct Taken {
    /// From the parked net and from what would have been transferred: the net left is `net − taken_net_cents`.
    pub taken_net_cents: i64,
    pub reversal_cents: i64,
    pub parts_cents: i64,
}

/// Parts of a refund given back (a won dispute, `refunds.reinstated_at`) take nothing.
pub async fn taken(conn: &mut PgConnection, allocation: &str) -> Result<Taken, StoreError> {
    Ok(sqlx::query_as::<_, Taken>(
        "SELECT coalesce(sum(p.from_parked_cents + p.from_pending_cents), 0)::bigint AS taken_net_cents,
                coalesce(sum(p.reversal_cents), 0)::bigint AS reversal_cents,
                coalesce(sum(p.amount_cents) FILTER (WHERE p.covered_at IS NOT NULL), 0)::bigint AS parts_cents
           FROM refund_parts p JOIN refunds r ON r.id = p.refund_id
          WHERE p.split_allocation_id = $1 AND r.reinstated_at IS NULL",
    )
    .bind(allocation)
    .fetch_one(conn)
    .await?)
}

/// What the recipient of an allocation is owed and does not hold yet: its net, less what standing refunds took
/// (from its parked or pending net, or by reversal), less what Stripe holds for it (its successful transfers less
/// the reversals made, and less the reversals still to be made for standing refunds: those are never dropped). For
/// a share never transferred this is its net less what refunds took; after a won dispute it is what the dispute's
/// withdrawal took back, and only that: a reversal of the withdrawal that was never made took nothing.
pub async fn outstanding_cents(conn: &mut PgConnection, allocation: &str, net_cents: i64) -> Result<i64, StoreError> {
    Ok(outstanding_cents_of(conn, &[(allocation, net_cents)]).await?[0])
}

/// [`outstanding_cents`] of several allocations (`(id, net)`), in one statement; in the order given.
pub async fn outstanding_cents_of(conn: &mut PgConnection, shares: &[(&str, i64)]) -> Result<Vec<i64>, StoreError> {
    let ids: Vec<&str> = shares.iter().map(|(id, _)| *id).collect();
    let rows: Vec<(i32, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT u.n::int4,
                coalesce((SELECT sum(p.from_parked_cents + p.from_pending_cents + p.reversal_cents)
                            FROM refund_parts p JOIN refunds r ON r.id = p.refund_id
                           WHERE p.split_allocation_id = u.id AND r.reinstated_at IS NULL), 0)::bigint,
                coalesce((SELECT sum(amount_cents) FROM transfer_attempts
                           WHERE split_allocation_id = u.id AND outcome = 'TRANSFERRED'), 0)::bigint,
                coalesce((SELECT sum(amount_cents) FROM transfer_reversals
                           WHERE split_allocation_id = u.id AND status = 'SUCCEEDED'), 0)::bigint,
                coalesce((SELECT sum(t.amount_cents) FROM transfer_reversals t JOIN refunds r ON r.id = t.cause_refund_id
                           WHERE t.split_allocation_id = u.id AND t.status = 'PENDING' AND t.cancel_requested_at IS NULL
                             AND r.status = 'SUCCEEDED' AND r.reinstated_at IS NULL), 0)::bigint
           FROM unnest($1::text[]) WITH ORDINALITY AS u (id, n)
          ORDER BY u.n",
    )
    .bind(&ids)
    .fetch_all(conn)
    .await?;
    if rows.len() != shares.len() {
        return Err(StoreError::Invalid(format!(
            "{} amounts owed read for {} allocations",
            rows.len(),
            shares.len()
        )));
    }
    Ok(rows
        .into_iter()
        .zip(shares)
        .map(|((_, taken, sent, reversed, reversing), (_, net_cents))| {
            net_cents - taken - (sent - reversed - reversing)
        })
        .collect())
}

/// Allocations with parts still waiting (oldest first, bounded): the refunds reconciler covers them once settled.
pub async fn allocations_with_waiting_parts(conn: &mut PgConnection, limit: i64) -> Result<Vec<String>, StoreError> {
    Ok(sqlx::query_scalar::<_, String>(
        "SELECT p.split_allocation_id FROM refund_parts p
           JOIN split_allocations a ON a.id = p.split_allocation_id
          WHERE p.covered_at IS NULL AND a.status NOT IN ('TRANSFERRING')
          GROUP BY p.split_allocation_id ORDER BY min(p.created_at) LIMIT $1",
    )
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// Every refund of the payment, oldest first (an unattributable one stays unattributed here, for an operator).
pub async fn refunds_for_payment(conn: &mut PgConnection, payment: &str) -> Result<Vec<RefundRow>, StoreError> {
    Ok(
        sqlx::query_as::<_, RefundRow>("SELECT * FROM refunds WHERE split_payment_id = $1 ORDER BY id")
            .bind(payment)
            .fetch_all(conn)
            .await?,
    )
}

pub async fn parts_for_payment(conn: &mut PgConnection, payment: &str) -> Result<Vec<RefundPartRow>, StoreError> {
    Ok(sqlx::query_as::<_, RefundPartRow>(
        "SELECT p.* FROM refund_parts p JOIN refunds r ON r.id = p.refund_id
          WHERE r.split_payment_id = $1 ORDER BY p.refund_id, p.split_allocation_id",
    )
    .bind(payment)
    .fetch_all(conn)
    .await?)
}
