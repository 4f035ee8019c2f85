//! Shared by the outbound-webhook tests: a real local HTTP receiver that records every request, a database with
//! an endpoint, outbox events written as a state change would, and the `splitpay ops` binary.

use std::process::{Command, Output};

use std::sync::{Arc, Mutex};
use std::time::Duration;

use splitpay::domain::plan::AmountMode;
use splitpay::events::{seed_timestamp, DonationData, EventType, OutboundEvent};
use splitpay::store::webhooks as wh;

use super::db::TestDb;

#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub id: String,
    pub timestamp: i64,
    pub signature: String,
    pub body: Vec<u8>,
}

/// An HTTP receiver on 127.0.0.1:0: `/ok` answers 200, `/fail` 500 with a 2 KiB body, `/slow` 200 after 30 s,
/// `/redirect` 307 to `/ok`, `/gone` 410, `/busy/<s>` 429 with `Retry-After: <s>`. Every request is recorded.
pub struct Hook {
    pub base: String,
    pub received: Arc<Mutex<Vec<Received>>>,
}

impl Hook {
    pub async fn start() -> Self {
        use axum::{
            body::Bytes, extract::State, http::HeaderMap, http::StatusCode, http::Uri, response::IntoResponse, Router,
        };
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let app = Router::new()
            .fallback(
                |State(log): State<Arc<Mutex<Vec<Received>>>>, uri: Uri, headers: HeaderMap, body: Bytes| async move {
                    let h = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned()
                    };
                    log.lock().unwrap().push(Received {
                        path: uri.path().to_owned(),
                        id: h("webhook-id"),
                        timestamp: h("webhook-timestamp").parse().unwrap_or(-1),
                        signature: h("webhook-signature"),
                        body: body.to_vec(),
                    });
                    match uri.path() {
                        "/fail" => (StatusCode::INTERNAL_SERVER_ERROR, "x".repeat(2048)).into_response(),
                        "/slow" => {
                            tokio::time::sleep(Duration::from_secs(30)).await;
                            StatusCode::OK.into_response()
                        }
                        "/redirect" => (StatusCode::TEMPORARY_REDIRECT, [("location", "/ok")]).into_response(),
                        "/gone" => StatusCode::GONE.into_response(),
                        p if p.starts_with("/busy/") => (
                            StatusCode::TOO_MANY_REQUESTS,
                            [("retry-after", p["/busy/".len()..].to_owned())],
                        )
                            .into_response(),
                        _ => StatusCode::OK.into_response(),
                    }
                },
            )
            .with_state(received.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Hook { base, received }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn got(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

/// A migrated database with the job schema, the distributor organisation, and an endpoint at `url`.
pub async fn setup(url: &str) -> (TestDb, wh::EndpointRow) {
    let db = TestDb::new().await;
    splitpay::jobs::queue::setup(&db.pool).await.unwrap();
    super::seed_set(&db.pool, AmountMode::Fixed, &[1_000]).await;
    let secret = splitpay::events::signing::generate_secret();
    let endpoint = wh::insert_endpoint(
        &mut db.pool.acquire().await.unwrap(),
        super::DISTRIBUTOR,
        url,
        None,
        &secret,
    )
    .await
    .unwrap();
    (db, endpoint)
}

/// Writes one `donation.created` outbox event for the distributor (as any state change does) and returns the
/// outbox id and the ids of the deliveries created with it.
pub async fn emit(db: &TestDb, n: u32) -> (String, Vec<String>) {
    let at = chrono::Utc::now();
    let event = OutboundEvent::donation(
        EventType::DonationCreated,
        super::DISTRIBUTOR,
        at,
        DonationData {
            id: format!("don_test{n}"),
            donor_id: "cm3donor1".into(),
            amount_cents: 2500,
            refunded_amount_cents: 0,
            currency: "AUD".into(),
            donation_date: seed_timestamp(at),
            source: "SPLIT_GATEWAY".into(),
            status: "PENDING".into(),
            external_id: Some("pi_1".into()),
            payment_method: Some("card".into()),
            tracking_code: None,
            deleted_at: None,
            failure_code: None,
            failure_message: None,
        },
        None,
    );
    let mut tx = db.pool.begin().await.unwrap();
    assert_eq!(
        splitpay::store::records::insert_outbox_events(&mut tx, &[event])
            .await
            .unwrap(),
        1
    );
    tx.commit().await.unwrap();
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT o.id, d.id FROM outbox_events o JOIN webhook_deliveries d ON d.outbox_event_id = o.id
          WHERE o.dedup_key = $1 ORDER BY d.id",
    )
    .bind(format!("donation.created:don_test{n}"))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(!rows.is_empty(), "a delivery is created with the outbox event");
    (rows[0].0.clone(), rows.into_iter().map(|(_, d)| d).collect())
}

/// Drops every waiting delivery job (as if lost), so a test counts only the jobs that come after.
pub async fn drop_jobs(db: &TestDb) {
    sqlx::query("DELETE FROM apalis.jobs WHERE job_type = 'splitpay.deliver'")
        .execute(&db.pool)
        .await
        .unwrap();
}

pub async fn jobs_waiting(db: &TestDb, delivery: &str) -> i64 {
    let (n,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM apalis.jobs WHERE job_type = 'splitpay.deliver' AND status IN ('Pending', 'Queued')
            AND convert_from(job, 'UTF8')::jsonb->>'id' = $1",
    )
    .bind(delivery)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    n
}

/// Runs `splitpay ops …` on the test database, with no Stripe key and https-only endpoints unless `env` says.
pub fn ops(db: &TestDb, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_splitpay"));
    cmd.arg("ops")
        .args(args)
        .env("DATABASE_URL", &db.url)
        .env_remove("STRIPE_SECRET_KEY")
        .env_remove("SPLITPAY_ALLOW_HTTP_WEBHOOKS")
        .env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("the binary runs")
}

pub fn json(out: &Output) -> serde_json::Value {
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("one JSON document on stdout")
}

pub async fn count(db: &TestDb, sql: &str) -> i64 {
    let (n,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(&db.pool)
        .await
        .unwrap();
    n
}

/// The delivery row as it is now.
pub async fn delivery(db: &TestDb, id: &str) -> wh::DeliveryRow {
    wh::get_delivery(&mut db.pool.acquire().await.unwrap(), id)
        .await
        .unwrap()
}

/// Makes a delivery's claim expire now, as if its worker had died a while ago.
pub async fn expire_claim(db: &TestDb, id: &str) {
    sqlx::query("UPDATE webhook_deliveries SET claimed_until = now() - interval '1 second' WHERE id = $1")
        .bind(id)
        .execute(&db.pool)
        .await
        .unwrap();
}
