//! The whole money path in one test process: a fresh database, the simulator, splitpay's webhook ingress on a free
//! port (registered with the simulator), and the real job runner. `pay` does what intake does (rows first, then
//! the PaymentIntent with keys and metadata from our ids); everything after that is driven by Stripe's events.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use splitpay::app::{AppContext, DistributionSettings};
use splitpay::config::Secret;
use splitpay::domain::ids::{payment_intent_idempotency_key, SplitAllocationId, SplitPaymentId};
use splitpay::domain::plan::{AmountMode, PaymentMethodType};
use splitpay::domain::state::PaymentEvent;
use splitpay::events::EventType;
use splitpay::http::{router, HttpState};
use splitpay::jobs::runner::{run, RunnerSettings};
use splitpay::store::announce;
use splitpay::store::catalog::RecommendationSetRow;
use splitpay::store::donations::*;
use splitpay::store::payments::*;
use splitpay::stripe::sim::control::SimControl;
use splitpay::stripe::sim::SimServer;
use splitpay::stripe::{CreatePaymentIntentParams, GatewayError, PaymentGateway, StripeGateway};
use tokio::sync::oneshot;

use super::db::TestDb;
use super::plan_for;

pub const WEBHOOK_SECRET: &str = "whsec_flow_tests";
/// The Connect endpoint's secret (`/stripe/webhooks/connect`).
pub const CONNECT_WEBHOOK_SECRET: &str = "whsec_flow_tests_connect";
pub const SERVICE_TOKEN: &str = "svc_flow_tests_token";

pub struct Flow {
    pub db: TestDb,
    pub sim: SimServer,
    pub control: SimControl,
    pub gateway: Arc<StripeGateway>,
    pub webhook_url: String,
    /// splitpay's API (intake and webhooks), e.g. `http://127.0.0.1:PORT`.
    pub base_url: String,
    pub set: RecommendationSetRow,
    /// The context the worker runs with (for calling jobs and reconcilers directly).
    pub ctx: AppContext,
    stop: Option<oneshot::Sender<()>>,
    worker: Option<tokio::task::JoinHandle<()>>,
}

/// How a flow writes its catalogue.
enum Catalogue {
    /// Through the catalogue API, as the platform does.
    Api,
    /// Through the store.
    Store,
}

impl Flow {
    /// Runs `splitpay ops ARGS` as an operator would: the binary, against this flow's database and simulator.
    pub fn ops(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_splitpay"))
            .arg("ops")
            .args(args)
            .env("DATABASE_URL", &self.db.url)
            .env("STRIPE_SECRET_KEY", super::stripe::TEST_KEY)
            .env("STRIPE_API_BASE", self.sim.base_url())
            .env_remove("RUST_LOG")
            .output()
            .expect("the binary runs")
    }

    /// A set of `amounts` (recipient i's account `acct_rcp{i}` can receive transfers unless listed in `no_transfers`).
    pub async fn start(mode: AmountMode, amounts: &[i64], no_transfers: &[usize]) -> Flow {
        Self::start_with(mode, amounts, no_transfers, true).await
    }

    /// As [`Flow::start`]; without `in_process_worker` the jobs wait for a worker the test runs itself.
    pub async fn start_with(
        mode: AmountMode,
        amounts: &[i64],
        no_transfers: &[usize],
        in_process_worker: bool,
    ) -> Flow {
        Self::start_full(mode, amounts, no_transfers, in_process_worker, |_| {}).await
    }

    /// As [`Flow::start_with`], with the distribution settings adjusted by `tweak`.
    pub async fn start_full(
        mode: AmountMode,
        amounts: &[i64],
        no_transfers: &[usize],
        in_process_worker: bool,
        tweak: impl FnOnce(&mut DistributionSettings),
    ) -> Flow {
        Self::start_inner(mode, amounts, no_transfers, in_process_worker, tweak, Catalogue::Api).await
    }

    /// As [`Flow::start`], with the catalogue written through the store: only for a set the catalogue API would now
    /// refuse (one written under older rules, e.g. before the minimum allocation was raised).
    pub async fn start_with_stored_catalogue(mode: AmountMode, amounts: &[i64]) -> Flow {
        Self::start_inner(mode, amounts, &[], true, |_| {}, Catalogue::Store).await
    }

    /// The catalogue (organisations, links, set) is written through the catalogue API, as the platform does: every
    /// flow goes through intake's API path, so its catalogue does too (`seed_set` writes through the store for the
    /// tests of the store itself).
    async fn start_inner(
        mode: AmountMode,
        amounts: &[i64],
        no_transfers: &[usize],
        in_process_worker: bool,
        tweak: impl FnOnce(&mut DistributionSettings),
        catalogue: Catalogue,
    ) -> Flow {
        let db = TestDb::new().await;
        splitpay::jobs::queue::setup(&db.pool).await.unwrap();
        let (sim, control) = super::stripe::simulator().await;
        for i in 0..amounts.len() {
            control
                .create_account(&format!("acct_rcp{i}"), !no_transfers.contains(&i))
                .await
                .unwrap();
        }
        let gateway = Arc::new(super::stripe::gateway(&sim));

        let ctx = AppContext {
            pool: db.pool.clone(),
            gateway: gateway.clone(),
            webhooks: Default::default(),
            recorder: Default::default(),
            starter: Default::default(),
            distribution: {
                let mut settings = DistributionSettings {
                    throttle_delay_ms: 200,
                    backoff_base_ms: 200,
                    backoff_cap_ms: 800,
                    ..DistributionSettings::default()
                };
                tweak(&mut settings);
                settings
            },
        };
        let flow_ctx = ctx.clone();
        let app = router(HttpState {
            app: ctx.clone(),
            webhook_secrets: Arc::new(vec![Secret::new(WEBHOOK_SECRET)]),
            connect_webhook_secrets: Arc::new(vec![Secret::new(CONNECT_WEBHOOK_SECRET)]),
            service_token: Secret::new(SERVICE_TOKEN),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}", listener.local_addr().unwrap());
        let webhook_url = format!("{base_url}/stripe/webhooks");
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        control.add_webhook(&webhook_url, WEBHOOK_SECRET).await.unwrap();
        control
            .add_connect_webhook(&format!("{base_url}/stripe/webhooks/connect"), CONNECT_WEBHOOK_SECRET)
            .await
            .unwrap();

        let settings = RunnerSettings {
            heartbeat_interval: Duration::from_secs(1),
            missed_heartbeats: 3,
            poll_interval: Duration::from_millis(200),
            shutdown_timeout: Duration::from_secs(5),
            ..RunnerSettings::default()
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let pool = db.pool.clone();
        let worker = in_process_worker.then(|| {
            tokio::spawn(async move {
                run(pool, splitpay::jobs::handlers(ctx), settings, async move {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
            })
        });
        let set = match catalogue {
            Catalogue::Api => {
                super::seed_set_via_api(&base_url, SERVICE_TOKEN, mode, amounts).await;
                splitpay::store::catalog::get_recommendation_set(&mut db.pool.acquire().await.unwrap(), "cm3rec1")
                    .await
                    .unwrap()
            }
            Catalogue::Store => super::seed_set(&db.pool, mode, amounts).await,
        };
        Flow {
            db,
            sim,
            control,
            gateway,
            webhook_url,
            base_url,
            set,
            ctx: flow_ctx,
            stop: Some(stop),
            worker,
        }
    }

    /// What intake does: the rows (with each recipient's PENDING donation and `donation.created`), then the
    /// PaymentIntent, then its id on the row. Returns the split payment id and the PaymentIntent id.
    pub async fn pay(
        &self,
        method: PaymentMethodType,
        payment_method: &str,
        donor_id: Option<&str>,
    ) -> (SplitPaymentId, String) {
        self.pay_with(method, Some(payment_method), donor_id).await
    }

    /// As [`Flow::pay`], but the PaymentIntent is left for the donor to confirm in the browser (no server-side
    /// confirmation): confirm it with [`Flow::confirm`].
    pub async fn pay_in_browser(&self, method: PaymentMethodType, donor_id: Option<&str>) -> (SplitPaymentId, String) {
        self.pay_with(method, None, donor_id).await
    }

    /// The donor confirms the PaymentIntent with `payment_method` (attempt number `attempt`, for the key).
    pub async fn confirm(&self, intent_id: &str, payment_method: &str, attempt: u32) -> Result<(), GatewayError> {
        self.gateway
            .confirm_payment_intent(intent_id, payment_method, &format!("browser:{intent_id}:{attempt}"))
            .await
            .map(|_| ())
    }

    async fn pay_with(
        &self,
        method: PaymentMethodType,
        payment_method: Option<&str>,
        donor_id: Option<&str>,
    ) -> (SplitPaymentId, String) {
        let plan = plan_for(&self.set);
        let id = SplitPaymentId::generate();
        let mut tx = self.db.pool.begin().await.unwrap();
        let payment = create_split_payment(
            &mut tx,
            &NewSplitPayment {
                id: id.clone(),
                set: &self.set,
                plan: &plan,
                donor_id: donor_id.map(str::to_owned),
                payment_method_type: method,
                donor_covers_fees: false,
            },
        )
        .await
        .unwrap();
        for a in &payment.allocations {
            let aid = SplitAllocationId::parse(&a.id).unwrap();
            create_donation_for_allocation(&mut tx, &aid, payment.payment.created_at, |d| {
                announce::donation(EventType::DonationCreated, d, Utc::now())
                    .into_iter()
                    .collect()
            })
            .await
            .unwrap();
        }
        // As intake does: a server-side confirmation is recorded, so its failure is final.
        sqlx::query("UPDATE split_payments SET confirm_payment_method = $2 WHERE id = $1")
            .bind(id.as_str())
            .bind(payment_method)
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();

        let params = CreatePaymentIntentParams {
            amount_cents: payment.payment.total_amount_cents,
            currency: "aud".into(),
            payment_method_type: method,
            transfer_group: id.to_string(),
            metadata: BTreeMap::from([("split_payment_id".to_owned(), id.to_string())]),
            payment_method: payment_method.map(str::to_owned),
            idempotency_key: payment_intent_idempotency_key(&id),
        };
        let intent_id = match self.gateway.create_payment_intent(&params).await {
            Ok(pi) => pi.id,
            Err(GatewayError::Terminal {
                payment_intent: Some(pi),
                ..
            }) => pi,
            Err(e) => panic!("creating the PaymentIntent failed: {e}"),
        };
        let mut tx = self.db.pool.begin().await.unwrap();
        let patch = PaymentPatch {
            payment_intent_id: Some(intent_id.clone()),
            ..Default::default()
        };
        // The webhook may already have moved the payment on; recording the intent is then a no-op.
        transition_payment(&mut tx, &id, PaymentEvent::IntentCreated, &patch, &[])
            .await
            .unwrap();
        tx.commit().await.unwrap();
        (id, intent_id)
    }

    pub async fn payment(&self, id: &SplitPaymentId) -> SplitPayment {
        get_split_payment(&mut self.db.pool.acquire().await.unwrap(), id)
            .await
            .unwrap()
    }

    /// Waits (bounded) until `done` holds for the payment.
    pub async fn wait_until(
        &self,
        id: &SplitPaymentId,
        what: &str,
        done: impl Fn(&SplitPayment) -> bool,
    ) -> SplitPayment {
        // A bound, not a timing goal: generous, so a loaded machine (CI runs test binaries beside each other's
        // databases) does not fail a correct run.
        for _ in 0..900 {
            let p = self.payment(id).await;
            if done(&p) {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let p = self.payment(id).await;
        panic!(
            "timed out waiting for {what}: {:?} {:?}",
            p.payment.status,
            p.allocations
                .iter()
                .map(|a| (a.status, a.failure_code.clone()))
                .collect::<Vec<_>>()
        );
    }

    /// Outbox event types about `subject` (a payment, allocation or donation id), oldest first.
    pub async fn events(&self, subject: &str) -> Vec<serde_json::Value> {
        let rows = splitpay::store::records::outbox_events_about(&mut self.db.pool.acquire().await.unwrap(), subject)
            .await
            .unwrap();
        rows.into_iter().map(|r| r.payload).collect()
    }

    /// How many outbox events of `event_type` exist in all.
    pub async fn count_events(&self, event_type: &str) -> i64 {
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM outbox_events WHERE event_type = $1")
            .bind(event_type)
            .fetch_one(&self.db.pool)
            .await
            .unwrap();
        n
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(worker) = self.worker.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), worker).await;
        }
    }
}
