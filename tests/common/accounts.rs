//! Helpers of the parked-recipient tests (`retry.rs`, `account_sweep.rs`, `ops.rs`): card payments paid until each
//! share is TRANSFERRED or PARKED, the flow whose recipient `acct_rcp1` (link `cm3lnk1`) cannot receive transfers,
//! that link's flags and the `account.updated` events in the inbox, the transfers Stripe holds for one share, a
//! target's audit rows, and signed webhook posts.

use serde_json::Value;
use splitpay::domain::plan::{AmountMode, PaymentMethodType};
use splitpay::domain::state::AllocationStatus;
use splitpay::store::payments::SplitPayment;
use splitpay::store::records::AuditRow;
use splitpay::stripe::{PaymentGateway, TransferInfo};

use super::flow::Flow;

/// A card payment (`pm_card_visa`, donor `cm3donor1`) through the flow's set, once each of its shares is
/// TRANSFERRED or PARKED.
pub async fn pay_until_settled(flow: &Flow) -> SplitPayment {
    let (id, _) = flow
        .pay(PaymentMethodType::Card, "pm_card_visa", Some("cm3donor1"))
        .await;
    flow.wait_until(&id, "settled allocations", |p| {
        p.allocations
            .iter()
            .all(|a| matches!(a.status, AllocationStatus::Transferred | AllocationStatus::Parked))
    })
    .await
}

/// `payments` card payments over two recipients (1,000 and 2,000), the second (`acct_rcp1`, link `cm3lnk1`) unable
/// to receive transfers: each payment ends with its second share PARKED (`insufficient_capabilities_for_transfer`).
pub async fn parked(auto_retry: bool, batch: i64, payments: usize) -> (Flow, Vec<SplitPayment>) {
    let flow = Flow::start_full(AmountMode::Fixed, &[1_000, 2_000], &[1], true, |s| {
        s.auto_retry_parked = auto_retry;
        s.auto_retry_batch = batch;
    })
    .await;
    let mut done = Vec::new();
    for _ in 0..payments {
        let p = pay_until_settled(&flow).await;
        assert_eq!(p.allocations[1].status, AllocationStatus::Parked);
        assert_eq!(
            p.allocations[1].failure_code.as_deref(),
            Some("insufficient_capabilities_for_transfer")
        );
        done.push(p);
    }
    (flow, done)
}

/// (charges_enabled, transfers_active) of the parked recipient's link.
pub async fn link_flags(flow: &Flow) -> (bool, bool) {
    sqlx::query_as("SELECT charges_enabled, transfers_active FROM recipient_account_links WHERE id = 'cm3lnk1'")
        .fetch_one(&flow.db.pool)
        .await
        .unwrap()
}

/// The account.updated events in the inbox (id, processed), oldest first.
pub async fn account_events(flow: &Flow) -> Vec<(String, bool)> {
    sqlx::query_as(
        "SELECT id, processed_at IS NOT NULL FROM stripe_events WHERE event_type = 'account.updated'
          ORDER BY stripe_created, received_at",
    )
    .fetch_all(&flow.db.pool)
    .await
    .unwrap()
}

/// Transfers Stripe holds for one allocation of `p`.
pub async fn transfers_of_share(flow: &Flow, p: &SplitPayment, allocation_id: &str) -> Vec<TransferInfo> {
    let all = flow.gateway.list_transfers(&p.payment.transfer_group).await.unwrap();
    all.into_iter()
        .filter(|t| t.metadata.get("split_allocation_id").map(String::as_str) == Some(allocation_id))
        .collect()
}

/// The ops audit log's rows about `target`.
pub async fn audit_rows(flow: &Flow, target: &str) -> Vec<AuditRow> {
    splitpay::store::records::audit_for(&mut flow.db.pool.acquire().await.unwrap(), target)
        .await
        .unwrap()
}

/// Posts `event` to splitpay's `path`, signed with `secret`; returns the HTTP status.
pub async fn post_event(flow: &Flow, path: &str, secret: &str, event: &Value) -> u16 {
    let body = serde_json::to_vec(event).unwrap();
    let signature = splitpay::stripe::webhook::sign(
        &body,
        &splitpay::config::Secret::new(secret),
        chrono::Utc::now().timestamp(),
    );
    reqwest::Client::new()
        .post(format!("{}{path}", flow.base_url))
        .header("stripe-signature", signature)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}
