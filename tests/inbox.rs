//! The Stripe inbox at ingress (issue 11, point 3): an event splitpay acts on is stored unprocessed with its job in
//! one transaction; any other event is stored already processed, with no job (its job would only have marked it).

mod common;

use common::db::TestDb;
use serde_json::json;
use splitpay::http::webhooks::{ingest_event, Ingested};
use splitpay::jobs::queue::{setup, Queue};

async fn row(db: &TestDb, id: &str) -> (bool, i32) {
    sqlx::query_as("SELECT processed_at IS NOT NULL, process_attempts FROM stripe_events WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

async fn jobs(db: &TestDb) -> i64 {
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM apalis.jobs WHERE job_type = $1")
        .bind(Queue::StripeEvent.name())
        .fetch_one(&db.pool)
        .await
        .unwrap();
    n
}

fn event(id: &str, kind: &str) -> serde_json::Value {
    json!({ "id": id, "type": kind, "created": 1_700_000_000, "livemode": false,
            "data": { "object": { "id": "obj_1" } } })
}

#[tokio::test]
async fn events_nothing_acts_on_are_stored_processed_without_a_job() {
    let db = TestDb::new().await;
    setup(&db.pool).await.unwrap();
    for (i, kind) in [
        "charge.succeeded",
        "transfer.created",
        "payment_intent.created",
        "payout.paid",
    ]
    .iter()
    .enumerate()
    {
        let id = format!("evt_ignored_{i}");
        assert_eq!(
            ingest_event(&db.pool, event(&id, kind)).await.unwrap(),
            Ingested::Stored
        );
        assert_eq!(row(&db, &id).await, (true, 1), "{kind} stored processed");
        assert_eq!(
            ingest_event(&db.pool, event(&id, kind)).await.unwrap(),
            Ingested::Duplicate,
            "{kind} redelivered"
        );
    }
    assert_eq!(jobs(&db).await, 0, "no job for events nothing acts on");

    let acted_on = [
        "payment_intent.succeeded",
        "payment_intent.payment_failed",
        "payment_intent.processing",
        "payment_intent.canceled",
        "charge.refunded",
        "refund.updated",
        "charge.dispute.funds_withdrawn",
        "account.updated",
    ];
    for (i, kind) in acted_on.iter().enumerate() {
        let id = format!("evt_acted_{i}");
        assert_eq!(
            ingest_event(&db.pool, event(&id, kind)).await.unwrap(),
            Ingested::Stored
        );
        assert_eq!(row(&db, &id).await, (false, 0), "{kind} waits for its job");
        assert_eq!(
            ingest_event(&db.pool, event(&id, kind)).await.unwrap(),
            Ingested::Duplicate
        );
    }
    assert_eq!(
        jobs(&db).await,
        acted_on.len() as i64,
        "one job per event acted on, none for a redelivery"
    );
}
