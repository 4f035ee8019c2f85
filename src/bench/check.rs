//! The benchmark's correctness check: a fast run that is wrong fails. Reads every transfer the Stripe simulator
//! holds (over its HTTP API) and every allocation of the benchmark's payments, and checks that each allocation was
//! transferred exactly once, to the right account, for its net amount, that each payment's money is conserved
//! to the cent (charged = Σ transferred + fees kept), and that the organisation was told each once.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;
use sqlx::PgPool;

/// One transfer as the simulator holds it.
#[derive(Debug, Clone)]
pub struct SimTransfer {
    pub id: String,
    pub amount_cents: i64,
    pub destination: String,
    pub allocation_id: Option<String>,
}

#[derive(Debug, Default)]
pub struct CheckReport {
    pub payments: usize,
    pub allocations: usize,
    pub transfers_at_stripe: usize,
    pub charged_cents: i64,
    pub transferred_cents: i64,
    pub fees_cents: i64,
    /// What is wrong, one line each (empty: correct).
    pub problems: Vec<String>,
}

impl CheckReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Every transfer at the simulator (`GET /v1/transfers`, all pages).
pub async fn sim_transfers(api_base: &str, secret_key: &str) -> Result<Vec<SimTransfer>, String> {
    let http = reqwest::Client::new();
    let mut all = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut url = format!("{api_base}v1/transfers?limit=100");
        if let Some(last) = &after {
            url.push_str(&format!("&starting_after={last}"));
        }
        let page: Value = http
            .get(&url)
            .bearer_auth(secret_key)
            .send()
            .await
            .map_err(|e| format!("listing transfers: {e}"))?
            .json()
            .await
            .map_err(|e| format!("listing transfers: {e}"))?;
        let data = page["data"]
            .as_array()
            .ok_or_else(|| format!("listing transfers: unexpected answer {page}"))?;
        for t in data {
            all.push(SimTransfer {
                id: t["id"].as_str().unwrap_or_default().to_owned(),
                amount_cents: t["amount"].as_i64().unwrap_or(-1),
                destination: t["destination"].as_str().unwrap_or_default().to_owned(),
                allocation_id: t["metadata"]["split_allocation_id"].as_str().map(str::to_owned),
            });
        }
        after = data.last().and_then(|t| t["id"].as_str()).map(str::to_owned);
        if page["has_more"].as_bool() != Some(true) || after.is_none() {
            return Ok(all);
        }
    }
}

/// Checks the payments `payment_ids` against `transfers` (everything the simulator holds).
pub async fn verify(
    pool: &PgPool,
    payment_ids: &[String],
    transfers: &[SimTransfer],
) -> Result<CheckReport, sqlx::Error> {
    let mut report = CheckReport {
        payments: payment_ids.len(),
        transfers_at_stripe: transfers.len(),
        ..Default::default()
    };
    type PaymentRow = (String, String, i64, Option<i64>, Option<i64>);
    let payments: Vec<PaymentRow> = sqlx::query_as(
        "SELECT id, status, total_amount_cents, processing_fee_cents, platform_fee_cents
           FROM split_payments WHERE id = ANY($1)",
    )
    .bind(payment_ids)
    .fetch_all(pool)
    .await?;
    if payments.len() != payment_ids.len() {
        report.problems.push(format!(
            "{} payments were made, {} are in the database",
            payment_ids.len(),
            payments.len()
        ));
    }
    type AllocationRow = (
        String,
        String,
        String,
        i64,
        Option<i64>,
        Option<i64>,
        Option<String>,
        String,
    );
    let allocations: Vec<AllocationRow> = sqlx::query_as(
        "SELECT a.id, a.split_payment_id, a.status, a.gross_amount_cents, a.fee_share_cents, a.net_amount_cents,
                a.stripe_transfer_id, l.stripe_connect_account_id
           FROM split_allocations a JOIN recipient_account_links l ON l.id = a.recipient_org_account_link_id
          WHERE a.split_payment_id = ANY($1)",
    )
    .bind(payment_ids)
    .fetch_all(pool)
    .await?;
    report.allocations = allocations.len();

    let mut by_allocation: BTreeMap<&str, Vec<&SimTransfer>> = BTreeMap::new();
    for t in transfers {
        match &t.allocation_id {
            Some(a) => by_allocation.entry(a.as_str()).or_default().push(t),
            None => report.problems.push(format!("{} has no split_allocation_id", t.id)),
        }
    }
    let mut known = BTreeSet::new();
    let mut net_by_payment: BTreeMap<&str, (i64, i64)> = BTreeMap::new(); // (Σ gross, Σ net)
    for (id, payment, status, gross, _fee, net, transfer_id, account) in &allocations {
        known.insert(id.as_str());
        let sums = net_by_payment.entry(payment.as_str()).or_default();
        sums.0 += gross;
        sums.1 += net.unwrap_or(0);
        if status != "TRANSFERRED" {
            report.problems.push(format!("{id} is {status}, not TRANSFERRED"));
        }
        let at_stripe = by_allocation.get(id.as_str()).map_or(&[][..], Vec::as_slice);
        match at_stripe {
            [t] => {
                if Some(t.amount_cents) != *net {
                    report.problems.push(format!(
                        "{id}: transfer {} is {} cents, the net share is {net:?}",
                        t.id, t.amount_cents
                    ));
                }
                if &t.destination != account {
                    report.problems.push(format!(
                        "{id}: transfer {} went to {}, not {account}",
                        t.id, t.destination
                    ));
                }
                if transfer_id.as_deref() != Some(t.id.as_str()) {
                    report
                        .problems
                        .push(format!("{id}: recorded {transfer_id:?}, Stripe holds {}", t.id));
                }
                report.transferred_cents += t.amount_cents;
            }
            [] => report.problems.push(format!("{id}: no transfer at Stripe")),
            many => report.problems.push(format!(
                "{id}: {} transfers at Stripe (paid more than once)",
                many.len()
            )),
        }
    }
    for (allocation, ts) in &by_allocation {
        if !known.contains(allocation) {
            report.problems.push(format!(
                "{} transfer(s) at Stripe for {allocation}, which is not one of this run's allocations",
                ts.len()
            ));
        }
    }
    for (id, status, total, processing, platform) in &payments {
        if status != "SUCCEEDED" {
            report.problems.push(format!("{id} is {status}, not SUCCEEDED"));
        }
        let fees = processing.unwrap_or(0) + platform.unwrap_or(0);
        let (gross, net) = net_by_payment.get(id.as_str()).copied().unwrap_or_default();
        report.charged_cents += total;
        report.fees_cents += fees;
        if gross != *total || net + fees != *total {
            report.problems.push(format!(
                "{id}: charged {total}, Σ gross {gross}, Σ net {net} + fees {fees} = {} (money not conserved)",
                net + fees
            ));
        }
    }
    // The events the organisations are told: one payment_succeeded per payment and one distribution_succeeded per
    // share (each share named once), each addressed to the payment's organisation, which exists; and every event about
    // one of the run's donations addressed to the donation's organisation, which exists. The outbox has no foreign key
    // to organisations (migration 20261214000002), so this is where a wrong address would show.
    type EventsRow = (String, i64, i64, i64, i64, i64);
    let events: Vec<EventsRow> = sqlx::query_as(
        "SELECT p.id,
                count(e.id) FILTER (WHERE e.event_type = 'recommendation_set.payment_succeeded'),
                count(e.id) FILTER (WHERE e.event_type = 'recommendation_set.distribution_succeeded'),
                count(DISTINCT e.payload -> 'data' ->> 'split_allocation_id')
                    FILTER (WHERE e.event_type = 'recommendation_set.distribution_succeeded'),
                count(e.id) FILTER (WHERE e.organisation_id IS DISTINCT FROM p.organisation_id OR o.id IS NULL),
                (SELECT count(*) FROM split_allocations a WHERE a.split_payment_id = p.id)
           FROM split_payments p
           LEFT JOIN outbox_events e ON e.payload -> 'data' ->> 'split_payment_id' = p.id
           LEFT JOIN organisations o ON o.id = e.organisation_id
          WHERE p.id = ANY($1)
          GROUP BY p.id",
    )
    .bind(payment_ids)
    .fetch_all(pool)
    .await?;
    for (id, succeeded, distributed, named, misaddressed, shares) in &events {
        if *succeeded != 1 || distributed != shares || named != shares || *misaddressed != 0 {
            report.problems.push(format!(
                "{id}: {succeeded} payment_succeeded events, {distributed} distribution_succeeded events naming \
                 {named} of its {shares} shares, {misaddressed} not addressed to the payment's organisation"
            ));
        }
    }
    let donation_events_misaddressed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox_events e
           JOIN donations d ON d.id = e.payload -> 'data' ->> 'id'
           JOIN split_allocations a ON a.id = d.split_allocation_id
           LEFT JOIN organisations o ON o.id = e.organisation_id
          WHERE a.split_payment_id = ANY($1) AND e.event_type LIKE 'donation.%'
            AND (e.organisation_id IS DISTINCT FROM d.organisation_id OR o.id IS NULL)",
    )
    .bind(payment_ids)
    .fetch_one(pool)
    .await?;
    if donation_events_misaddressed != 0 {
        report.problems.push(format!(
            "{donation_events_misaddressed} donation events not addressed to their donation's organisation"
        ));
    }
    Ok(report)
}
