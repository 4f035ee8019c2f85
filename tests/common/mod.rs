//! Shared fixtures for the integration tests: a distributing organisation, recipients with their links, and a
//! recommendation set, written through the store like any other caller would.
#![allow(dead_code)] // each test binary uses a different subset

pub mod accounts;
pub mod contract;
pub mod db;
pub mod flow;
pub mod hooks;
pub mod money;
pub mod process;
pub mod refunds;
pub mod sim_fixtures;
pub mod store_fixtures;
pub mod stripe;
pub mod workers;

use splitpay::domain::money::Currency;
use splitpay::domain::plan::{AmountMode, PlanLimits, SplitPlan, Submission};
use splitpay::store::catalog::{
    create_link, create_organisation, create_recommendation_set, NewLink, NewOrganisation, NewRecommendationSet,
    NewSetAllocation, RecommendationSetRow,
};
use sqlx::PgPool;

pub const DISTRIBUTOR: &str = "cm3orgdist0001";

/// A distributor, `amounts.len()` recipients (org `cm3orgrcpN`, link `cm3lnkN`, account `acct_rcpN`) and a set
/// `cm3rec1` with one allocation `cm3alcN` per amount, in order.
pub async fn seed_set(pool: &PgPool, mode: AmountMode, amounts: &[i64]) -> RecommendationSetRow {
    let mut tx = pool.begin().await.unwrap();
    create_organisation(
        &mut tx,
        &NewOrganisation {
            id: DISTRIBUTOR.into(),
            name: "Climate Fund".into(),
        },
    )
    .await
    .unwrap();
    let mut allocations = Vec::new();
    for (i, &amount_cents) in amounts.iter().enumerate() {
        let org = format!("cm3orgrcp{i}");
        create_organisation(
            &mut tx,
            &NewOrganisation {
                id: org.clone(),
                name: format!("Recipient {i}"),
            },
        )
        .await
        .unwrap();
        create_link(
            &mut tx,
            &NewLink {
                id: format!("cm3lnk{i}"),
                distributor_organisation_id: DISTRIBUTOR.into(),
                recipient_organisation_id: org,
                recipient_org_name: format!("Recipient {i}"),
                label: format!("Recipient {i} main"),
                stripe_connect_account_id: format!("acct_rcp{i}"),
                charges_enabled: true,
                is_active: true,
            },
        )
        .await
        .unwrap();
        allocations.push(NewSetAllocation {
            id: format!("cm3alc{i}"),
            recipient_org_account_link_id: format!("cm3lnk{i}"),
            amount_cents,
        });
    }
    let set = create_recommendation_set(
        &mut tx,
        &NewRecommendationSet {
            id: "cm3rec1".into(),
            organisation_id: DISTRIBUTOR.into(),
            name: "Climate split".into(),
            slug: "climate-split".into(),
            amount_mode: mode,
            currency: Currency::Aud,
            expires_at: None,
            donor_prefill: None,
            allocations,
        },
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    set
}

/// As [`seed_set`], through the catalogue API at `base_url` (`PUT /v1/organisations/…`,
/// `/v1/recipient-account-links/…`, `/v1/recommendation-sets/cm3rec1`), as the platform would.
pub async fn seed_set_via_api(base_url: &str, token: &str, mode: AmountMode, amounts: &[i64]) {
    let client = reqwest::Client::new();
    let put = |path: String, body: serde_json::Value| {
        let request = client.put(format!("{base_url}{path}")).bearer_auth(token).json(&body);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let body: serde_json::Value = response.json().await.unwrap();
            assert_eq!(status, 201, "{body}");
        }
    };
    put(
        format!("/v1/organisations/{DISTRIBUTOR}"),
        serde_json::json!({ "name": "Climate Fund" }),
    )
    .await;
    let mut allocations = Vec::new();
    for (i, &amount_cents) in amounts.iter().enumerate() {
        let org = format!("cm3orgrcp{i}");
        put(
            format!("/v1/organisations/{org}"),
            serde_json::json!({ "name": format!("Recipient {i}") }),
        )
        .await;
        put(
            format!("/v1/recipient-account-links/cm3lnk{i}"),
            serde_json::json!({
                "distributor_organisation_id": DISTRIBUTOR,
                "recipient_organisation_id": org,
                "recipient_org_name": format!("Recipient {i}"),
                "label": format!("Recipient {i} main"),
                "stripe_connect_account_id": format!("acct_rcp{i}"),
                "charges_enabled": true,
            }),
        )
        .await;
        allocations.push(serde_json::json!({
            "id": format!("cm3alc{i}"),
            "recipient_org_account_link_id": format!("cm3lnk{i}"),
            "amount_cents": amount_cents,
        }));
    }
    put(
        "/v1/recommendation-sets/cm3rec1".into(),
        serde_json::json!({
            "organisation_id": DISTRIBUTOR,
            "name": "Climate split",
            "slug": "climate-split",
            "amount_mode": mode.as_str(),
            "currency": "AUD",
            "allocations": allocations,
        }),
    )
    .await;
}

/// The plan of `set` with no amounts submitted, under the most permissive minimum allocation (1): the store and the
/// workers must handle any plan a configuration allows (`SPLITPAY_MIN_ALLOCATION_CENTS=1` included), and some
/// tests need allocations whose net is tiny or zero.
pub fn plan_for(set: &RecommendationSetRow) -> SplitPlan {
    let limits = PlanLimits {
        min_allocation_cents: 1,
        ..PlanLimits::default()
    };
    SplitPlan::from_submission(&set.rules(), &Submission::default(), &limits).unwrap()
}

pub async fn count(pool: &PgPool, table: &str) -> i64 {
    let (n,): (i64,) = // Table names come from the tests themselves, never from input.
    sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}"))).fetch_one(pool).await.unwrap();
    n
}

/// A SUCCEEDED split payment through `set` (PaymentIntent `intent_id`, charge `charge_id`) with its fee split written
/// and its first allocation's transfer started (generation 1, intent committed): the state a worker leaves when it
/// dies during a transfer.
pub async fn succeeded_with_first_transfer_started(
    pool: &PgPool,
    set: &RecommendationSetRow,
    intent_id: &str,
    charge_id: &str,
    processing_fee_cents: i64,
) -> (
    splitpay::domain::ids::SplitPaymentId,
    splitpay::domain::ids::SplitAllocationId,
) {
    use splitpay::domain::fees::split_fees;
    use splitpay::domain::ids::{SplitAllocationId, SplitPaymentId};
    use splitpay::domain::plan::PaymentMethodType;
    use splitpay::domain::state::{AllocationEvent, PaymentEvent};
    use splitpay::store::allocations::*;
    use splitpay::store::payments::*;
    let plan = plan_for(set);
    let id = SplitPaymentId::generate();
    let mut tx = pool.begin().await.unwrap();
    let new = NewSplitPayment {
        id: id.clone(),
        set,
        plan: &plan,
        donor_id: None,
        payment_method_type: PaymentMethodType::Card,
        donor_covers_fees: false,
    };
    let p = create_split_payment(&mut tx, &new).await.unwrap();
    let patch = PaymentPatch {
        payment_intent_id: Some(intent_id.to_owned()),
        charge_id: Some(charge_id.to_owned()),
        ..Default::default()
    };
    transition_payment(&mut tx, &id, PaymentEvent::Succeeded, &patch, &[])
        .await
        .unwrap();
    let split = split_fees(&plan.gross_amounts_cents(), processing_fee_cents, 0).unwrap();
    write_fee_split(&mut tx, &id, None, processing_fee_cents, 0, &split, false)
        .await
        .unwrap();
    let first = SplitAllocationId::parse(&p.allocations[0].id).unwrap();
    transition_allocation(
        &mut tx,
        &first,
        AllocationEvent::TransferStarted,
        &AllocationPatch::default(),
        &[],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    (id, first)
}
