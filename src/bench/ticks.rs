//! The periodic jobs' cost as the tables grow (issue 11 point 5, "tick times"): after a run, each job of the shipped
//! schedule (sweeper, reconcile-pending with the events sweep, reconcile-transfers with the refunds sweep) is run a
//! few times in this process against the bench's database and simulator, and timed. With `--preload N` this is the
//! cost of a tick over N finished payments; compare with a run without.

use std::sync::Arc;
use std::time::Instant;

use sqlx::PgPool;

use crate::app::{AppContext, DistributionSettings};
use crate::jobs::deliver::DeliverySettings;
use crate::stripe::keys::StripeKey;
use crate::stripe::{GatewayConfig, StripeGateway};

/// Each periodic job's tick durations in ms, `runs` ticks each, in schedule order.
pub async fn measure(
    pool: &PgPool,
    sim_base_url: &str,
    key: &str,
    runs: usize,
) -> Result<Vec<(&'static str, Vec<f64>)>, super::Failure> {
    let config = GatewayConfig {
        api_base: sim_base_url.to_owned(),
        // Stripe's budget is not what is measured (as for the workers).
        rate_per_sec: Some(100_000),
        ..GatewayConfig::default()
    };
    let gateway = StripeGateway::new(&StripeKey::parse(key, false)?, config)?;
    let ctx = AppContext {
        pool: pool.clone(),
        gateway: Arc::new(gateway),
        distribution: DistributionSettings::default(),
        webhooks: DeliverySettings::default(),
        recorder: Default::default(),
        starter: Default::default(),
    };
    let mut timed = Vec::new();
    for (name, job) in crate::jobs::cron::jobs(ctx) {
        let mut ms = Vec::with_capacity(runs);
        for _ in 0..runs {
            let started = Instant::now();
            job().await;
            ms.push(started.elapsed().as_secs_f64() * 1_000.0);
        }
        timed.push((name, ms));
    }
    Ok(timed)
}
