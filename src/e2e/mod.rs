//! `splitpay e2e`: the Stripe test-mode end-to-end suite. It drives a running `serve` and `worker` (the same key,
//! the same database) through the scenario in [`scenario`], against Stripe's test mode or the local simulator, and
//! checks every result through Stripe's API against splitpay's records.
//!
//! - [`guard`]: only an `sk_test_…`/`rk_test_…` key from `STRIPE_TEST_SECRET_KEY`; Stripe must answer in test mode.
//! - [`stripe_api`]: the suite's own Stripe calls (accounts, the donor's BECS confirmation, reads), through the
//!   gateway's limiter and transport.
//! - [`splitpay_api`]: the catalogue API and intake, as the platform calls them.
//! - [`events`]: polling mode, `GET /v1/events` into the webhook ingress, when no forwarder runs.
//! - [`scenario`]: the steps; [`checks`]: Stripe against splitpay; [`summary`]: what the run did, with ids.
//!
//! The accounts the run creates are deleted at the end, whether it passed or not.

pub mod checks;
pub mod events;
pub mod guard;
pub mod scenario;
pub mod splitpay_api;
pub mod stripe_api;
pub mod summary;

use std::io::Write;
use std::sync::Arc;

use crate::app::{AppContext, DistributionSettings};
use crate::config::{DatabaseConfig, ProcessSettings, Secret};
use crate::domain::fees::PlatformFee;
use crate::stripe::{GatewayConfig, StripeGateway};

pub type Failure = Box<dyn std::error::Error + Send + Sync>;

/// Stripe allows 25 requests/s in test mode per account, shared by everything using the key: the suite takes 8 by
/// default, leaving 8 each to `serve` and `worker` (run them with `STRIPE_RATE_PER_SEC=8`).
pub const RATE_PER_SEC_DEFAULT: u32 = 8;

/// How Stripe's webhooks reach `serve` during the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WebhookMode {
    /// No forwarder runs: the suite reads `GET /v1/events` and feeds each event into the webhook ingress itself.
    Poll,
    /// `stripe listen --forward-to …/stripe/webhooks` delivers them to `serve`; the suite polls nothing.
    Forwarder,
}

#[derive(Debug, clap::Args)]
pub struct E2eArgs {
    /// splitpay's API (`serve`), for the catalogue and intake.
    #[arg(long, env = "SPLITPAY_E2E_API_URL", default_value = "http://127.0.0.1:8080")]
    pub api_url: String,
    /// How Stripe's webhooks reach `serve`: `poll` (no forwarder: the suite reads GET /v1/events into the webhook
    /// ingress) or `forwarder` (`stripe listen --forward-to localhost:8080/stripe/webhooks` runs).
    #[arg(long, value_enum, env = "SPLITPAY_E2E_WEBHOOKS", default_value = "poll")]
    pub webhooks: WebhookMode,
    /// Requests per second the suite itself sends to Stripe (Stripe's test-mode limit, 25/s, is shared with
    /// `serve` and `worker`).
    #[arg(long, env = "SPLITPAY_E2E_RATE_PER_SEC", default_value_t = RATE_PER_SEC_DEFAULT,
          value_parser = clap::value_parser!(u32).range(1..=25))]
    pub rate_per_sec: u32,
    /// How long one step may wait at most (a payment to be distributed, a capability to activate), in seconds.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=3_600))]
    pub wait_secs: u64,
    /// Also write the summary as JSON to this file.
    #[arg(long)]
    pub summary_json: Option<std::path::PathBuf>,
}

/// Runs the suite; prints progress and the summary to `out`. Fails on the first step or check that does not hold,
/// after deleting what it created.
pub async fn run(args: &E2eArgs, out: &mut (dyn Write + Send)) -> Result<(), Failure> {
    // Nothing is sent anywhere before the key is known to be a test key.
    let key = guard::test_mode_key(std::env::var(guard::KEY_VARIABLE).ok().as_deref())?;
    let api_base = std::env::var("STRIPE_API_BASE")
        .ok()
        .filter(|b| !b.trim().is_empty())
        .unwrap_or_else(|| crate::stripe::transport::STRIPE_API_BASE.to_owned());
    let token = std::env::var("SPLITPAY_SERVICE_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .ok_or("SPLITPAY_SERVICE_TOKEN is not set: the suite calls splitpay's API with the token `serve` was given")?;
    let gateway = Arc::new(StripeGateway::new(
        &key,
        GatewayConfig {
            api_base: api_base.clone(),
            rate_per_sec: Some(args.rate_per_sec),
            ..GatewayConfig::default()
        },
    )?);
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
    let stripe = stripe_api::StripeApi {
        gateway: gateway.clone(),
        run_id: run_id.clone(),
    };
    // Stripe's own word before anything is created.
    guard::check_test_mode(&stripe.get("e2e_balance", "/balance").await?)?;

    let database = DatabaseConfig::from_env()?;
    let pool = crate::store::connect(&database).await?;
    let mut summary = summary::Summary {
        run_id: run_id.clone(),
        stripe_api_base: api_base.clone(),
        webhooks: match args.webhooks {
            WebhookMode::Poll => "poll".into(),
            WebhookMode::Forwarder => "forwarder".into(),
        },
        ..Default::default()
    };
    writeln!(out, "splitpay e2e, run {run_id}")?;
    writeln!(
        out,
        "stripe        {api_base} (test mode: key and Stripe's livemode: false agree)"
    )?;
    writeln!(out, "splitpay      {}", args.api_url)?;
    match args.webhooks {
        WebhookMode::Poll => writeln!(
            out,
            "webhooks      POLLING: no forwarder; GET /v1/events since the run began, fed into splitpay's webhook ingress"
        )?,
        WebhookMode::Forwarder => writeln!(
            out,
            "webhooks      FORWARDER: `stripe listen --forward-to …/stripe/webhooks` delivers them to serve; nothing is polled"
        )?,
    }
    // A minute of slack for clock skew between this machine and Stripe; older events are someone else's.
    let since_unix = chrono::Utc::now().timestamp() - 60;
    let poller = (args.webhooks == WebhookMode::Poll)
        .then(|| events::Poller::start(gateway.clone(), pool.clone(), since_unix, events::PAGE_SIZE_MAX));
    let run = scenario::Run {
        run_id,
        stripe: stripe.clone(),
        pool: pool.clone(),
        api: splitpay_api::SplitpayApi::new(&args.api_url, Secret::new(token))?,
        app: app_context(pool.clone(), gateway.clone())?,
        poller,
        wait_ms_max: args.wait_secs * 1_000,
    };
    let mut created = scenario::Created::default();
    let result = scenario::run(&run, &mut created, &mut summary, out).await;
    if let Err(e) = &result {
        writeln!(out, "FAILED: {e}")?;
    }

    // Cleanup, whatever happened: every account this run created is deleted.
    writeln!(out, "Cleanup")?;
    let mut cleanup_failures = Vec::new();
    for (role, account) in &created.accounts {
        let deleted = match stripe.delete_account(account).await {
            Ok(()) => {
                writeln!(out, "   {account} ({role}) deleted")?;
                true
            }
            Err(e) => {
                writeln!(out, "   {account} ({role}) NOT deleted: {e}")?;
                cleanup_failures.push(format!("{account}: {e}"));
                false
            }
        };
        summary.accounts.push(summary::AccountLine {
            role: role.clone(),
            id: account.clone(),
            deleted,
        });
    }
    if let Some(poller) = run.poller {
        summary.events = Some(poller.finish().await);
    }
    summary.outcome = match (&result, cleanup_failures.is_empty()) {
        (Ok(()), true) => "passed".into(),
        (Ok(()), false) => format!("passed, but cleanup failed: {}", cleanup_failures.join("; ")),
        (Err(e), _) => format!("failed: {e}"),
    };
    summary.print(out)?;
    if let Some(path) = &args.summary_json {
        std::fs::write(path, serde_json::to_vec_pretty(&summary)?)?;
    }
    pool.close().await;
    result?;
    if !cleanup_failures.is_empty() {
        return Err(format!("cleanup failed: {}", cleanup_failures.join("; ")).into());
    }
    Ok(())
}

/// What the operator commands run with: the suite's gateway (so its rate limiter) and the settings `serve` and
/// `worker` read from the same environment.
fn app_context(pool: sqlx::PgPool, gateway: Arc<StripeGateway>) -> Result<AppContext, Failure> {
    let process = ProcessSettings::from_env()?;
    let mut distribution = DistributionSettings {
        platform_fee: PlatformFee::new(process.platform_fee_bps, process.platform_fee_fixed_cents)?,
        plan_limits: process.plan_limits.clone(),
        ..DistributionSettings::default()
    };
    crate::config::lifecycle_from_lookup(|name| std::env::var(name).ok(), &mut distribution)?;
    Ok(AppContext {
        pool,
        gateway,
        distribution,
        webhooks: crate::jobs::deliver::DeliverySettings::from_lookup(|name| std::env::var(name).ok())?,
        recorder: Default::default(),
        starter: Default::default(),
    })
}
