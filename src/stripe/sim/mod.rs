//! A stateful local Stripe, served over HTTP like Stripe: the product talks to it through the same async-stripe
//! client and transport it uses in production. Tests and the demo start it in-process on a free port;
//! `splitpay stripe-sim --port N` serves it on its own.
//!
//! - [`model`]: the objects and Stripe's rules (no HTTP).
//! - [`form`]: Stripe's bracketed form encoding.
//! - `http`: auth, faults, routing; `idempotency`: saved and replayed responses per key.
//! - [`control`]: the `/_sim/` control API and [`control::SimControl`], its client.
//!
//! - [`webhooks`]: delivery as Stripe does it: concurrent, unordered, retried over days of simulator time.
//!
//! Webhooks: every state change creates an `evt_…` (listable at `/v1/events`) and is POSTed, signed, to each
//! registered endpoint, with delivery modes for duplicates, held-back (reordered), dropped and redelivered events.
//! Events about a connected account carry `account` and go only to endpoints registered with `connect: true`.
//!
//! Money is booked as balance transactions on the platform and on each connected account: charges, transfers,
//! reversals, refunds, disputes, top-ups and payouts, so tests can check that balances add up.

// A refused simulated request builds one `SimError` (Stripe's whole error envelope); boxing it would only add noise.
#![allow(clippy::result_large_err)]

pub mod control;
pub mod form;
mod http;
mod idempotency;
pub mod model;
mod rate_limit;
mod webhooks;

pub use webhooks::REDELIVERY_DELAYS_SECS;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::any;
use axum::Router;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use model::{Model, SimConfig};

/// How often pending debits and delayed balance transactions are checked against the clock.
const TICK_MS: u64 = 100;
const DELIVERY_TIMEOUT_MS: u64 = 5_000;
/// Bounds the request log kept for tests.
const REQUEST_LOG_MAX: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// 500, not applied, saved for the idempotency key (as Stripe saves 500s).
    ServerError,
    /// 429 `rate_limit`, not applied, not saved.
    RateLimit,
    /// The connection breaks before the request is applied.
    DropConnection,
    /// The request is applied (and saved for its key), then the connection breaks: the response is lost.
    LoseResponse,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct Fault {
    pub kind: FaultKind,
    /// How many matching requests it hits.
    pub count: u32,
    /// Only requests whose path contains this.
    #[serde(default)]
    pub path_contains: Option<String>,
    /// Only this method (`POST`, `GET`, …).
    #[serde(default)]
    pub method: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RequestLogEntry {
    pub method: String,
    pub path: String,
    /// Milliseconds since the simulator started.
    pub at_ms: u64,
    /// The request's `Idempotency-Key` header, as sent (tests check which key each attempt used).
    pub idempotency_key: Option<String>,
}

fn real_now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

pub(crate) struct Shared {
    model: Mutex<Model>,
    idempotency: Mutex<idempotency::IdempotencyTable>,
    faults: Mutex<Vec<Fault>>,
    /// (min, max) latency added to every API request.
    latency_ms: Mutex<(u64, u64)>,
    /// How long executing a request takes (holds its idempotency key in flight).
    processing_ms: AtomicU64,
    clock_offset_secs: AtomicI64,
    /// When non-zero, the real time the clock was frozen at: the clock then moves only when advanced, so a test that
    /// advances to one second before a deadline is not overtaken by the wall clock crossing a second.
    clock_frozen_at_secs: AtomicI64,
    webhooks: Mutex<webhooks::WebhookState>,
    requests: Mutex<Vec<RequestLogEntry>>,
    /// Stripe's per-key rate limiter (used only when `SimConfig::rate_limit_per_sec` is set).
    rate_buckets: Mutex<rate_limit::RateBuckets>,
    started: Instant,
    deliver: Notify,
    http: reqwest::Client,
}

impl Shared {
    /// The simulator's clock: the real time (or the time it was frozen at) plus however far tests advanced it.
    pub(crate) fn now(&self) -> i64 {
        let frozen = self.clock_frozen_at_secs.load(Ordering::SeqCst);
        let real = if frozen != 0 { frozen } else { real_now_secs() };
        real + self.clock_offset_secs.load(Ordering::SeqCst)
    }

    /// Stops the clock at the present real time; from then on only `clock/advance` moves it.
    pub(crate) fn freeze_clock(&self) -> i64 {
        let _ = self
            .clock_frozen_at_secs
            .compare_exchange(0, real_now_secs(), Ordering::SeqCst, Ordering::SeqCst);
        self.now()
    }

    fn log_request(&self, method: &str, path: &str, idempotency_key: Option<&str>) {
        let mut log = self.requests.lock().expect("no panics while held");
        if log.len() < REQUEST_LOG_MAX {
            log.push(RequestLogEntry {
                method: method.to_owned(),
                path: path.to_owned(),
                at_ms: self.started.elapsed().as_millis() as u64,
                idempotency_key: idempotency_key.map(str::to_owned),
            });
        }
    }

    fn pick_latency_ms(&self) -> u64 {
        let (min, max) = *self.latency_ms.lock().expect("no panics while held");
        if max <= min {
            min
        } else {
            rand::random_range(min..=max)
        }
    }

    fn in_flight_hold_ms(&self) -> u64 {
        self.processing_ms.load(Ordering::SeqCst)
    }

    fn take_fault(&self, method: &str, path: &str) -> Option<Fault> {
        let mut faults = self.faults.lock().expect("no panics while held");
        let index = faults.iter().position(|f| {
            f.count > 0
                && f.path_contains.as_deref().is_none_or(|p| path.contains(p))
                && f.method.as_deref().is_none_or(|m| m.eq_ignore_ascii_case(method))
        })?;
        faults[index].count -= 1;
        let fault = faults[index].clone();
        if faults[index].count == 0 {
            faults.remove(index);
        }
        Some(fault)
    }

    /// Takes a token from `api_key`'s bucket; `false` when the request must be refused with 429. Always `true`
    /// while the limiter is off.
    fn admit(&self, api_key: &str) -> bool {
        let (rate_per_sec, burst) = {
            let model = self.model.lock().expect("no panics while held");
            match model.config.rate_limit_per_sec {
                None => return true,
                Some(rate) => (rate, model.config.rate_limit_burst),
            }
        };
        let now_ns = self.started.elapsed().as_nanos() as u64;
        self.rate_buckets
            .lock()
            .expect("no panics while held")
            .admit(api_key, now_ns, rate_per_sec, burst)
    }

    fn rate_limited_total(&self) -> u64 {
        self.rate_buckets.lock().expect("no panics while held").refused_total
    }

    fn wake_deliverer(&self) {
        self.deliver.notify_one();
    }
}

/// A running simulator. Dropping it (or calling [`SimServer::shutdown`]) stops the server and its tasks.
pub struct SimServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl SimServer {
    /// Base URL for async-stripe (`http://127.0.0.1:PORT/`; requests go to `{base}v1/…`).
    pub fn base_url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    pub fn control(&self) -> control::SimControl {
        control::SimControl::new(&self.base_url())
    }

    /// The simulator's clock (unix seconds).
    pub fn now(&self) -> i64 {
        self.shared.now()
    }

    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
    }
}

impl Drop for SimServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Starts the simulator on `127.0.0.1:port` (0: a free port).
pub async fn start(config: SimConfig, port: u16) -> std::io::Result<SimServer> {
    start_on(config, SocketAddr::from(([127, 0, 0, 1], port))).await
}

/// Starts the simulator on `addr` (a container needs `0.0.0.0`; everything else should stay on loopback).
pub async fn start_on(config: SimConfig, addr: SocketAddr) -> std::io::Result<SimServer> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let shared = Arc::new(Shared {
        model: Mutex::new(Model::new(config)),
        idempotency: Mutex::new(Default::default()),
        faults: Mutex::new(Vec::new()),
        latency_ms: Mutex::new((0, 0)),
        processing_ms: AtomicU64::new(0),
        clock_offset_secs: AtomicI64::new(0),
        clock_frozen_at_secs: AtomicI64::new(0),
        webhooks: Mutex::new(webhooks::WebhookState::default()),
        requests: Mutex::new(Vec::new()),
        rate_buckets: Mutex::new(Default::default()),
        started: Instant::now(),
        deliver: Notify::new(),
        http: reqwest::Client::builder()
            .timeout(Duration::from_millis(DELIVERY_TIMEOUT_MS))
            .build()
            .map_err(std::io::Error::other)?,
    });
    let app = Router::new()
        .route("/v1/{*rest}", any(http::stripe_api))
        .route("/_sim/{*rest}", any(http::control))
        .with_state(shared.clone());
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let background = shared.clone();
    let server = tokio::spawn(async move {
        let ticker = tokio::spawn(tick_and_deliver(background));
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop_rx.await;
            })
            .await;
        ticker.abort();
    });
    Ok(SimServer {
        addr,
        shared,
        stop: Some(stop_tx),
        server: Some(server),
    })
}

/// Serves until `shutdown` resolves (the `stripe-sim` subcommand).
pub async fn serve(
    config: SimConfig,
    addr: SocketAddr,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let server = start_on(config, addr).await?;
    tracing::info!(base_url = %server.base_url(), "Stripe simulator listening");
    shutdown.await;
    server.shutdown().await;
    Ok(())
}

/// Moves the clock-driven state on and hands new events to the webhook endpoints.
async fn tick_and_deliver(shared: Arc<Shared>) {
    let mut interval = tokio::time::interval(Duration::from_millis(TICK_MS));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shared.deliver.notified() => {}
        }
        let events = {
            let now = shared.now();
            let mut model = shared.model.lock().expect("no panics while held");
            model.tick(now);
            model.take_undelivered()
        };
        webhooks::deliver(&shared, events);
        webhooks::release_due(&shared);
    }
}
