//! The benchmark's load: the catalogue through the catalogue API (as the platform writes it) and card payments
//! through the real intake (`POST /v1/split-payments`, confirmed server-side, so the simulator's webhooks drive
//! everything after).

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

pub const DISTRIBUTOR: &str = "cm3benchdist";
pub const SET_ID: &str = "cm3benchset";

/// Recipient `i`'s connected account at the simulator.
pub fn account_of(i: usize) -> String {
    format!("acct_bench{i}")
}

/// Gross amount of recipient `i`'s share in every payment: 10.00, 20.00, 30.00, … AUD.
pub fn amount_of(i: usize) -> i64 {
    (i as i64 + 1) * 1_000
}

/// A FIXED set of `recipients` recipients, written through the catalogue API at `base_url`.
pub async fn seed_catalogue(
    http: &reqwest::Client,
    base_url: &str,
    token: &str,
    recipients: usize,
) -> Result<(), String> {
    let put = |path: String, body: Value| {
        let request = http.put(format!("{base_url}{path}")).bearer_auth(token).json(&body);
        async move {
            let response = request.send().await.map_err(|e| format!("PUT {path}: {e}"))?;
            let status = response.status();
            if !status.is_success() {
                let body = response.text().await.unwrap_or_default();
                return Err(format!("PUT {path}: {status} {body}"));
            }
            Ok(())
        }
    };
    put(
        format!("/v1/organisations/{DISTRIBUTOR}"),
        json!({ "name": "Bench Fund" }),
    )
    .await?;
    let mut allocations = Vec::new();
    for i in 0..recipients {
        let org = format!("cm3benchrcp{i}");
        put(
            format!("/v1/organisations/{org}"),
            json!({ "name": format!("Recipient {i}") }),
        )
        .await?;
        put(
            format!("/v1/recipient-account-links/cm3benchlnk{i}"),
            json!({
                "distributor_organisation_id": DISTRIBUTOR,
                "recipient_organisation_id": org,
                "recipient_org_name": format!("Recipient {i}"),
                "label": format!("Recipient {i} main"),
                "stripe_connect_account_id": account_of(i),
                "charges_enabled": true,
            }),
        )
        .await?;
        allocations.push(json!({
            "id": format!("cm3benchalc{i}"),
            "recipient_org_account_link_id": format!("cm3benchlnk{i}"),
            "amount_cents": amount_of(i),
        }));
    }
    put(
        format!("/v1/recommendation-sets/{SET_ID}"),
        json!({
            "organisation_id": DISTRIBUTOR,
            "name": "Bench split",
            "slug": "bench-split",
            "amount_mode": "FIXED",
            "currency": "AUD",
            "allocations": allocations,
        }),
    )
    .await
}

/// One payment made through intake.
#[derive(Debug, Clone)]
pub struct Paid {
    pub split_payment_id: String,
    /// How long intake took to answer.
    pub latency: Duration,
    /// When intake answered: the PaymentIntent had succeeded at Stripe (a card confirmed server-side).
    pub answered_at: DateTime<Utc>,
}

/// One card payment through intake; an answer other than 201 with a `succeeded` PaymentIntent is an error.
pub async fn pay(http: &reqwest::Client, base_url: &str, token: &str) -> Result<Paid, String> {
    let started = Instant::now();
    let response = http
        .post(format!("{base_url}/v1/split-payments"))
        .bearer_auth(token)
        .json(&json!({
            "recommendation_set_id": SET_ID,
            "payment_method_type": "card",
            "payment_method": "pm_card_visa",
        }))
        .send()
        .await
        .map_err(|e| format!("intake: {e}"))?;
    let status = response.status();
    let body: Value = response.json().await.map_err(|e| format!("intake: {e}"))?;
    let latency = started.elapsed();
    let answered_at = Utc::now();
    if status.as_u16() != 201 {
        return Err(format!("intake answered {status}: {body}"));
    }
    if body["payment_intent_status"] != "succeeded" {
        return Err(format!("the PaymentIntent did not succeed at intake: {body}"));
    }
    let id = body["id"]
        .as_str()
        .ok_or_else(|| format!("intake answer has no id: {body}"))?
        .to_owned();
    Ok(Paid {
        split_payment_id: id,
        latency,
        answered_at,
    })
}
