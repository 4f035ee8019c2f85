//! The Stripe simulator on a free port, a gateway pointed at it, and a webhook receiver that records what arrives.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use splitpay::stripe::keys::StripeKey;
use splitpay::stripe::sim::model::SimConfig;
use splitpay::stripe::sim::{self, control::SimControl, SimServer};
use splitpay::stripe::{GatewayConfig, StripeGateway};

pub const TEST_KEY: &str = "sk_test_splitpay_tests_only";

pub async fn simulator() -> (SimServer, SimControl) {
    let server = sim::start(SimConfig::default(), 0).await.expect("simulator starts");
    let control = server.control();
    (server, control)
}

/// The idempotency keys of every transfer create the simulator received, in order (from its request log).
pub async fn transfer_create_keys(control: &SimControl) -> Vec<String> {
    let log = control.get("requests").await.unwrap();
    log["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["method"] == "POST" && r["path"] == "/v1/transfers")
        .map(|r| r["idempotency_key"].as_str().unwrap().to_owned())
        .collect()
}

/// `GET /v1/{path}` at the simulator with the test key, as JSON: what the gateway does not expose.
pub async fn raw_get(sim: &SimServer, path: &str) -> serde_json::Value {
    reqwest::Client::new()
        .get(format!("{}v1/{path}", sim.base_url()))
        .bearer_auth(TEST_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// A gateway with fast retries (so tests do not wait seconds) and a generous rate.
pub fn gateway(server: &SimServer) -> StripeGateway {
    gateway_with(server, |_| {})
}

pub fn gateway_with(server: &SimServer, tweak: impl FnOnce(&mut GatewayConfig)) -> StripeGateway {
    let mut config = GatewayConfig {
        api_base: server.base_url(),
        timeout_ms: 5_000,
        rate_per_sec: Some(1_000),
        burst: 50,
        lease_slots: None,
        attempts_max: 4,
        backoff_base_ms: 5,
        backoff_cap_ms: 20,
    };
    tweak(&mut config);
    StripeGateway::new(&StripeKey::parse(TEST_KEY, false).unwrap(), config).unwrap()
}

/// Each delivery's `Stripe-Signature` header and body, in arrival order.
pub type Deliveries = Arc<Mutex<Vec<(Option<String>, String)>>>;

/// A webhook endpoint on a free port that records each delivery it accepts.
pub struct Receiver {
    pub url: String,
    pub received: Deliveries,
    /// The next this many deliveries are answered 500 (and not recorded).
    pub fail_next: Arc<std::sync::atomic::AtomicU32>,
    /// Deliveries answered 500 so far.
    pub refused: Arc<std::sync::atomic::AtomicU32>,
    _server: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct ReceiverState {
    received: Deliveries,
    fail_next: Arc<std::sync::atomic::AtomicU32>,
    refused: Arc<std::sync::atomic::AtomicU32>,
}

impl Receiver {
    pub async fn start() -> Self {
        use axum::{body::Bytes, extract::State, http::HeaderMap, http::StatusCode, routing::post, Router};
        use std::sync::atomic::Ordering;
        let state = ReceiverState {
            received: Arc::default(),
            fail_next: Arc::default(),
            refused: Arc::default(),
        };
        let app = Router::new()
            .route(
                "/hook",
                post(
                    |State(s): State<ReceiverState>, headers: HeaderMap, body: Bytes| async move {
                        let failing = s
                            .fail_next
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                            .is_ok();
                        if failing {
                            s.refused.fetch_add(1, Ordering::SeqCst);
                            return StatusCode::INTERNAL_SERVER_ERROR;
                        }
                        let signature = headers
                            .get("stripe-signature")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned);
                        s.received
                            .lock()
                            .unwrap()
                            .push((signature, String::from_utf8_lossy(&body).into_owned()));
                        StatusCode::OK
                    },
                ),
            )
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            url,
            received: state.received,
            fail_next: state.fail_next,
            refused: state.refused,
            _server: server,
        }
    }

    /// Event types received so far, in arrival order.
    pub fn types(&self) -> Vec<String> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .map(|(_, body)| {
                serde_json::from_str::<serde_json::Value>(body).unwrap()["type"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    }

    /// Waits (bounded) until `predicate` holds for the received types.
    pub async fn wait_for(&self, what: &str, predicate: impl Fn(&[String]) -> bool) -> Vec<String> {
        for _ in 0..100 {
            let types = self.types();
            if predicate(&types) {
                return types;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("timed out waiting for {what}; received {:?}", self.types());
    }
}
