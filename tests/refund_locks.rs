//! Lock order between a refund Stripe answered and a dispute's withdrawal (issue 8: refund row → share in
//! `apply_refund` against share → refund row in the withdrawal deadlocked, and PostgreSQL aborted one of them).
//! Both now lock the payment's shares first, in position order. The race is made deterministic: a third transaction
//! holds the shares while the withdrawal and then the refund queue behind it. Real PostgreSQL, the simulator.
mod common;

use common::refunds::three_shares_paid;
use splitpay::domain::ids::SplitAllocationId;
use splitpay::store::disputes::close_open_ops_refunds;
use splitpay::store::refunds::{insert_refund_intent, RefundIntent, REFUND_REF_KEY};
use splitpay::store::reversals::insert_reversal;
use splitpay::stripe::RefundInfo;

/// An `ops refund` intent whose reversal Stripe made; the refund then failed at Stripe, and its answer is applied
/// while a dispute's withdrawal closes the same intent. Neither may be aborted as a deadlock: both commit, the
/// intent ends FAILED once, and the withdrawal's audit row names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_refund_applied_while_a_withdrawal_closes_its_intent_does_not_deadlock() {
    let (flow, payment, p) = three_shares_paid(&[]).await;
    let pool = flow.db.pool.clone();
    let share = &p.allocations[0];
    let share_id = SplitAllocationId::parse(&share.id).unwrap();
    // The intent and its made reversal, as `ops refund --reverse-transfer` leaves them before Stripe answers.
    let mut tx = pool.begin().await.unwrap();
    let intent = insert_refund_intent(
        &mut tx,
        &RefundIntent {
            split_payment_id: payment.as_str(),
            split_allocation_id: &share_id,
            amount_cents: 400,
            fee_refunded_cents: 0,
            currency: "aud",
            reason: "lock order test",
        },
    )
    .await
    .unwrap();
    let reversal = insert_reversal(&mut tx, share, 400, Some(intent.id)).await.unwrap();
    sqlx::query(
        "UPDATE transfer_reversals SET status = 'SUCCEEDED', stripe_reversal_id = 'trr_lock_test', succeeded_at = now()
          WHERE id = $1",
    )
    .bind(reversal)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();

    // A third transaction holds the payment's shares.
    let mut holder = pool.begin().await.unwrap();
    splitpay::store::allocations::lock_payment_shares(&mut holder, payment.as_str())
        .await
        .unwrap();
    // The withdrawal queues first for the shares.
    let withdrawal = {
        let pool = pool.clone();
        let payment = payment.clone();
        tokio::spawn(async move {
            let mut tx = pool.begin().await?;
            let closed = close_open_ops_refunds(&mut tx, &payment, "dp_lock_test")
                .await
                .map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(closed)
        })
    };
    common::db::until_waiting_on_locks(&pool, 1).await;
    // Then Stripe's answer for the intent: failed.
    let answer = RefundInfo {
        id: "re_lock_test".to_owned(),
        amount_cents: 400,
        currency: "aud".to_owned(),
        status: Some("failed".to_owned()),
        charge: p.payment.charge_id.clone(),
        payment_intent: p.payment.payment_intent_id.clone(),
        metadata: [(REFUND_REF_KEY.to_owned(), intent.id.to_string())]
            .into_iter()
            .collect(),
        reason: Some("requested_by_customer".to_owned()),
    };
    let refund = {
        let ctx = flow.ctx.clone();
        let payment = payment.clone();
        tokio::spawn(async move {
            let mut tx = ctx.pool.begin().await.map_err(|e| e.to_string())?;
            let _covered = splitpay::jobs::refunds::apply_refund(&ctx, &mut tx, &payment, &answer, "ops")
                .await
                .map_err(|e| format!("{e:?}"))?;
            tx.commit().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(())
        })
    };
    common::db::until_waiting_on_locks(&pool, 2).await;
    holder.commit().await.unwrap();

    let closed = withdrawal.await.unwrap().expect("the withdrawal commits");
    refund.await.unwrap().expect("the refund's answer commits");
    assert_eq!(closed, vec![intent.id], "the withdrawal closed the open intent");
    let (status, stripe_id): (String, Option<String>) =
        sqlx::query_as("SELECT status, stripe_refund_id FROM refunds WHERE id = $1")
            .bind(intent.id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(status, "FAILED");
    assert_eq!(
        stripe_id.as_deref(),
        Some("re_lock_test"),
        "Stripe's answer was recorded on the intent"
    );
    let audits: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ops_audit_log WHERE actor = 'system' AND command = 'refund' AND target_id = $1",
    )
    .bind(&share.id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(audits, 1, "one audit row for the intent the withdrawal closed");
    // The made reversal is still the failed intent's (nothing booked the share as loss to give it to), listed for
    // an operator, and counted once.
    let (cause, reversal_status): (Option<i64>, String) =
        sqlx::query_as("SELECT cause_refund_id, status FROM transfer_reversals WHERE id = $1")
            .bind(reversal)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((cause, reversal_status.as_str()), (Some(intent.id), "SUCCEEDED"));
    flow.stop().await;
}
