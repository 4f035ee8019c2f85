//! The `splitpay` binary: parses the command line and dispatches to library code. Subcommands appear here only
//! once they work.

use clap::{Parser, Subcommand};

use std::sync::Arc;

use splitpay::app::{gateway_from, AppContext, DistributionSettings};
use splitpay::config::{
    redact_url, ConfigError, DatabaseConfig, ProcessSettings, Secret, StripeSettings, StripeTarget,
    LOCAL_SIMULATOR_PORT,
};
use splitpay::domain::fees::PlatformFee;
use splitpay::observability::logging::LogFormat;
use splitpay::observability::scrape::MetricsState;
use splitpay::store;

/// mimalloc rather than glibc's allocator: the worker and the simulator spent an eighth of their CPU in glibc's
/// malloc and free (`perf`, issue 11), much of it consolidating freed chunks.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "splitpay",
    version,
    about = "Distributes one donor payment across recipient organisations on Stripe Connect"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the database if it is missing and apply the schema (safe to run again).
    Migrate,
    /// Serve intake (`/v1/split-payments`), the catalogue API, Stripe's webhooks and `/metrics`. Without a Stripe key it also starts the local
    /// Stripe simulator on 127.0.0.1:12111 and registers its webhook endpoint with it.
    Serve,
    /// Run the background workers: Stripe events, fee splits, transfers and webhook deliveries, and the periodic
    /// jobs. Serves `/metrics` on SPLITPAY_METRICS_ADDR (default 127.0.0.1:9464).
    Worker,
    /// Run the whole money path once on this machine (fresh `splitpay_demo` database, local Stripe simulator) and
    /// print where every cent went.
    Demo,
    /// The Stripe test-mode end-to-end suite, against a running `serve` and `worker`: only with an sk_test_/rk_test_
    /// key in STRIPE_TEST_SECRET_KEY. Creates two connected accounts, pays by card and BECS, parks, refunds,
    /// reverses and retries, checks everything through Stripe's API, deletes the accounts, prints a summary.
    E2e(splitpay::e2e::E2eArgs),
    /// Operator commands: list parked allocations, show a payment by any of its ids, retry a parked share, read the
    /// audit log, and run both reconcilers once in the foreground.
    Ops(splitpay::ops::OpsArgs),
    /// Measure splitpay on this machine (fresh database, simulator, `serve` + N workers as child processes, payments
    /// through intake) and check the run was correct: exit 1 when it was not.
    Bench(splitpay::bench::BenchArgs),
    /// Serve the local Stripe simulator (for tests and demos; never a substitute for Stripe in production).
    StripeSim {
        /// Port to listen on (0 picks a free one).
        #[arg(long, default_value_t = 12111)]
        port: u16,
        /// Address to listen on; keep the loopback default outside containers.
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        /// Register this webhook endpoint at start (e.g. `http://api:8080/stripe/webhooks` in docker compose), as
        /// `POST /_sim/webhooks` would; registrations live as long as the simulator.
        #[arg(long, env = "SPLITPAY_SIM_WEBHOOK_URL", requires = "webhook_secret")]
        webhook_url: Option<String>,
        /// The signing secret of that endpoint (the `STRIPE_WEBHOOK_SECRET` the API verifies with).
        #[arg(
            long,
            env = "SPLITPAY_SIM_WEBHOOK_SECRET",
            hide_env_values = true,
            requires = "webhook_url"
        )]
        webhook_secret: Option<String>,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // A missing .env is normal; a malformed one is worth a warning, not a crash.
    let dotenv = dotenvy::dotenv();
    let cli = Cli::parse();
    // The demo prints a report; its logs would only interleave with it.
    let default_filter = if matches!(cli.command, Command::Demo | Command::Bench(_)) {
        "error"
    } else if matches!(cli.command, Command::Ops(_) | Command::E2e(_)) {
        "warn,sqlx=warn"
    } else {
        "info,sqlx=warn"
    };
    // Logs go to stderr: stdout is for what a command prints (reports, `--json` documents).
    let log_format = match LogFormat::from_lookup(|name| std::env::var(name).ok()) {
        Ok(format) => format,
        Err(e) => {
            eprintln!("splitpay: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    splitpay::observability::logging::init(log_format, default_filter);
    if let Err(e) = dotenv {
        if !e.not_found() {
            tracing::warn!(error = %e, ".env could not be read");
        }
    }
    let result = match cli.command {
        Command::Migrate => migrate().await.map(|_| ()),
        Command::Serve => serve().await,
        Command::Worker => worker().await,
        Command::Demo => splitpay::demo::run(&mut std::io::stdout())
            .await
            .map_err(|e| e as Failure),
        Command::StripeSim {
            port,
            host,
            webhook_url,
            webhook_secret,
        } => {
            let webhook = webhook_url.zip(webhook_secret.map(Secret::new));
            stripe_sim(std::net::SocketAddr::new(host, port), webhook).await
        }
        Command::Bench(args) => match splitpay::bench::run(&args, &mut std::io::stdout()).await {
            Ok(true) => Ok(()),
            Ok(false) => return std::process::ExitCode::FAILURE,
            Err(e) => Err(e as Failure),
        },
        Command::E2e(args) => splitpay::e2e::run(&args, &mut std::io::stdout())
            .await
            .map_err(|e| e as Failure),
        Command::Ops(args) => match ops(&args).await {
            Ok(outcome) => return std::process::ExitCode::from(outcome.code()),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("splitpay: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

type Failure = Box<dyn std::error::Error>;

/// Creates the database if missing and applies splitpay's schema and apalis's (both idempotent, both locked
/// against concurrent runs).
async fn migrate() -> Result<sqlx::PgPool, Failure> {
    let config = DatabaseConfig::from_env()?;
    store::ensure_database(&config).await?;
    let pool = store::connect(&config).await?;
    store::migrate_then(&pool, || splitpay::jobs::queue::setup(&pool)).await?;
    tracing::info!(database = %redact_url(config.url.expose()), "schema is up to date");
    Ok(pool)
}

/// The context both processes share, from the environment.
fn context(pool: sqlx::PgPool, stripe: &StripeSettings, process: &ProcessSettings) -> Result<AppContext, Failure> {
    let platform_fee = PlatformFee::new(process.platform_fee_bps, process.platform_fee_fixed_cents)?;
    let mut distribution = DistributionSettings {
        platform_fee,
        plan_limits: process.plan_limits.clone(),
        ..DistributionSettings::default()
    };
    splitpay::config::lifecycle_from_lookup(|name| std::env::var(name).ok(), &mut distribution)?;
    Ok(AppContext {
        gateway: Arc::new(gateway_from(stripe, &pool)?),
        pool,
        distribution,
        webhooks: splitpay::jobs::deliver::DeliverySettings::from_lookup(|name| std::env::var(name).ok())?,
        recorder: Default::default(),
        starter: Default::default(),
    })
}

async fn serve() -> Result<(), Failure> {
    let stripe = StripeSettings::from_env()?;
    let process = ProcessSettings::from_env()?;
    let service_token = process.service_token.clone().ok_or(ConfigError::Invalid {
        name: "SPLITPAY_SERVICE_TOKEN",
        reason: "serve needs the bearer token intake callers present (16 characters or more)".into(),
    })?;
    let metrics = splitpay::observability::install()?;
    let pool = migrate().await?;
    let mut webhook_secrets = stripe.webhook_secrets.clone();
    let mut connect_webhook_secrets = stripe.connect_webhook_secrets.clone();
    let _simulator = match stripe.target {
        StripeTarget::Simulator => {
            let sim = splitpay::stripe::sim::start(Default::default(), LOCAL_SIMULATOR_PORT).await?;
            let secret = format!("whsec_local_{}", uuid::Uuid::new_v4().simple());
            let connect_secret = format!("whsec_local_connect_{}", uuid::Uuid::new_v4().simple());
            sim.control()
                .add_splitpay_webhooks(&format!("http://{}", process.http_addr), &secret, &connect_secret)
                .await?;
            webhook_secrets.push(Secret::new(secret));
            connect_webhook_secrets.push(Secret::new(connect_secret));
            tracing::warn!(base_url = %sim.base_url(), "no STRIPE_SECRET_KEY: using the local Stripe simulator");
            Some(sim)
        }
        StripeTarget::Api { .. } if webhook_secrets.is_empty() => {
            return Err(ConfigError::Invalid {
                name: "STRIPE_WEBHOOK_SECRET",
                reason: "required with a Stripe key, to verify Stripe's webhooks".into(),
            }
            .into())
        }
        StripeTarget::Api { .. } => None,
    };
    let app = splitpay::http::router(splitpay::http::HttpState {
        app: context(pool.clone(), &stripe, &process)?,
        webhook_secrets: Arc::new(webhook_secrets),
        connect_webhook_secrets: Arc::new(connect_webhook_secrets),
        service_token,
    })
    .merge(splitpay::observability::scrape::router(MetricsState::new(
        metrics, pool,
    )));
    let listener = tokio::net::TcpListener::bind(process.http_addr).await?;
    tracing::info!(addr = %process.http_addr, "serving intake, Stripe webhooks and /metrics");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    Ok(())
}

async fn worker() -> Result<(), Failure> {
    let stripe = StripeSettings::from_env()?;
    let process = ProcessSettings::from_env()?;
    let metrics = splitpay::observability::install()?;
    let pool = migrate().await?;
    let ctx = context(pool.clone(), &stripe, &process)?;
    // Moving money matters more than watching it: a worker whose metrics address is taken (another worker on the
    // same host with the default) still runs its jobs, and says loudly that it has no /metrics.
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics_server = match tokio::net::TcpListener::bind(process.metrics_addr).await {
        Ok(listener) => {
            tracing::info!(addr = %process.metrics_addr, "serving /metrics");
            Some(tokio::spawn(splitpay::observability::scrape::serve(
                listener,
                MetricsState::new(metrics, pool.clone()),
                async move {
                    let _ = metrics_stopped.await;
                },
            )))
        }
        Err(e) => {
            tracing::error!(addr = %process.metrics_addr, error = %e,
                "SPLITPAY_METRICS_ADDR cannot be bound: this worker runs without /metrics (give each worker its own)");
            None
        }
    };
    let settings = splitpay::jobs::runner::RunnerSettings {
        concurrency: process.worker_concurrency,
        heartbeat_interval: std::time::Duration::from_millis(process.worker_heartbeat_ms),
        missed_heartbeats: process.worker_missed_heartbeats,
        ..Default::default()
    };
    tracing::info!(concurrency = settings.concurrency, "worker running");
    // The shipped schedule, unless SPLITPAY_CRON_SCHEDULE names another file (tests and drills).
    let schedule = splitpay::jobs::schedule::Schedule::from_lookup(|name| std::env::var(name).ok())?;
    let (stop_cron, cron_stopped) = tokio::sync::oneshot::channel::<()>();
    let cron = tokio::spawn(splitpay::jobs::cron::run(
        pool.clone(),
        schedule,
        splitpay::jobs::cron::jobs(ctx.clone()),
        format!("worker-{}", uuid::Uuid::new_v4().simple()),
        async move {
            let _ = cron_stopped.await;
        },
    ));
    splitpay::jobs::runner::run(pool, splitpay::jobs::handlers(ctx), settings, shutdown_signal()).await?;
    let _ = stop_cron.send(());
    let _ = cron.await;
    let _ = stop_metrics.send(());
    if let Some(server) = metrics_server {
        let _ = server.await;
    }
    tracing::info!("worker stopped");
    Ok(())
}

/// `splitpay ops …`: the database (migrated) and Stripe from the environment, then the command.
async fn ops(args: &splitpay::ops::OpsArgs) -> Result<splitpay::ops::Outcome, Failure> {
    let stripe = StripeSettings::from_env()?;
    let process = ProcessSettings::from_env()?;
    let pool = migrate().await?;
    let ctx = context(pool, &stripe, &process)?;
    let outcome = splitpay::ops::run(args, &ctx, &mut std::io::stdout(), &mut std::io::stderr())
        .await
        .map_err(|e| e as Failure)?;
    Ok(outcome)
}

/// Serves the simulator on `addr` until SIGINT/SIGTERM, with `webhook` (url, secret) registered first if given.
async fn stripe_sim(addr: std::net::SocketAddr, webhook: Option<(String, Secret)>) -> Result<(), Failure> {
    let config = splitpay::stripe::sim::model::SimConfig::default();
    let sim = splitpay::stripe::sim::start_on(config, addr).await?;
    tracing::info!(base_url = %sim.base_url(), "Stripe simulator listening");
    if let Some((url, secret)) = webhook {
        sim.control().add_webhook(&url, secret.expose()).await?;
        tracing::info!(%url, "webhook endpoint registered");
    }
    shutdown_signal().await;
    sim.shutdown().await;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM: the one shutdown signal every long-running subcommand obeys.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
    tracing::info!("shutting down");
}
