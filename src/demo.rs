//! `splitpay demo`: the whole money path on this machine, in one process, against the local Stripe simulator.
//!
//! A fresh `splitpay_demo` database on the configured server; the simulator, splitpay's API and worker on free
//! loopback ports; a distributing organisation with a FIXED set of three recipients, one of whom has not finished
//! Stripe onboarding. One card payment and one BECS debit go through intake; the BECS debit stays `processing`
//! until the simulator's clock moves on. Then it prints where every cent went and checks conservation.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use sqlx::Connection;

use crate::app::{AppContext, DistributionSettings};
use crate::config::{url_with_database, DatabaseConfig, Secret};
use crate::domain::fees::PlatformFee;
use crate::domain::ids::SplitPaymentId;
use crate::domain::money::{Currency, Money};
use crate::domain::plan::AmountMode;
use crate::domain::state::{AllocationStatus, PaymentStatus};
use crate::store::money_report::money_report;
use crate::store::payments::{get_split_payment, SplitPayment};
use crate::stripe::keys::StripeKey;
use crate::stripe::sim::{self, model::SimConfig};
use crate::stripe::{GatewayConfig, StripeGateway};

type Failure = Box<dyn std::error::Error + Send + Sync>;

const DEMO_DATABASE: &str = "splitpay_demo";
/// The advisory lock (on the server's `postgres` database) that lets one demo run at a time.
const DEMO_LOCK_KEY: i64 = 0x5350_4c49_5444_454d; // "SPLITDEM"
const TOKEN: &str = "demo-service-token-0123456789";
const WEBHOOK_SECRET: &str = "whsec_demo_local";
const CONNECT_WEBHOOK_SECRET: &str = "whsec_demo_local_connect";
const SIM_KEY: &str = "sk_test_splitpay_demo";
/// Bounds the wait for the workers; the demo takes a few seconds.
const WAIT_MS_MAX: u64 = 60_000;

fn money(cents: i64) -> String {
    Money::new(cents, Currency::Aud)
        .map(|m| m.to_string())
        .unwrap_or_else(|_| format!("{cents}"))
}

/// Runs the demo and returns its report (also printed as it goes).
pub async fn run(out: &mut dyn std::io::Write) -> Result<(), Failure> {
    // A throwaway database next to the configured one, so the demo never touches real data.
    let base = DatabaseConfig::from_env()?;
    let config = DatabaseConfig {
        url: Secret::new(url_with_database(base.url.expose(), DEMO_DATABASE)),
        pool_max: 10,
    };
    // Two demos on one server would drop each other's database mid-run: a session-level advisory lock, held on
    // this connection until the demo returns, makes a second demo wait for the first.
    let mut admin = sqlx::PgConnection::connect(&url_with_database(base.url.expose(), "postgres")).await?;
    let free: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(DEMO_LOCK_KEY)
        .fetch_one(&mut admin)
        .await?;
    if !free {
        writeln!(
            out,
            "waiting       another demo is running on this server; this one starts when it ends"
        )?;
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(DEMO_LOCK_KEY)
            .execute(&mut admin)
            .await?;
    }
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {DEMO_DATABASE} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await?;
    crate::store::ensure_database(&config).await?;
    let pool = crate::store::connect(&config).await?;
    crate::store::migrate_then(&pool, || crate::jobs::queue::setup(&pool)).await?;
    writeln!(out, "database      {DEMO_DATABASE} (fresh)")?;

    let simulator = sim::start(SimConfig::default(), 0).await?;
    let control = simulator.control();
    writeln!(out, "stripe        local simulator at {}", simulator.base_url())?;

    // splitpay itself: API and worker, with a 1% platform fee.
    let key = StripeKey::parse(SIM_KEY, false)?;
    let gateway = StripeGateway::new(
        &key,
        GatewayConfig {
            api_base: simulator.base_url(),
            ..GatewayConfig::default()
        },
    )?;
    let ctx = AppContext {
        pool: pool.clone(),
        gateway: Arc::new(gateway),
        webhooks: Default::default(),
        recorder: Default::default(),
        starter: Default::default(),
        distribution: DistributionSettings {
            platform_fee: PlatformFee::new(100, 0)?,
            backoff_base_ms: 300,
            backoff_cap_ms: 2_000,
            ..DistributionSettings::default()
        },
    };
    let app = crate::http::router(crate::http::HttpState {
        app: ctx.clone(),
        webhook_secrets: Arc::new(vec![Secret::new(WEBHOOK_SECRET)]),
        connect_webhook_secrets: Arc::new(vec![Secret::new(CONNECT_WEBHOOK_SECRET)]),
        service_token: Secret::new(TOKEN),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let api = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    control
        .add_splitpay_webhooks(&api, WEBHOOK_SECRET, CONNECT_WEBHOOK_SECRET)
        .await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let settings = crate::jobs::runner::RunnerSettings {
        poll_interval: Duration::from_millis(200),
        ..Default::default()
    };
    let worker = tokio::spawn(crate::jobs::runner::run(
        pool.clone(),
        crate::jobs::handlers(ctx),
        settings,
        async move {
            let _ = stopped.await;
        },
    ));
    writeln!(out, "splitpay      API at {api}, worker running, platform fee 1%")?;

    // The catalogue, through the catalogue API as the platform writes it: a distributor and three recipients;
    // Ocean Watch has not finished Stripe onboarding.
    let recipients = [
        ("acf", "Australian Conservation Foundation", 2_500, true),
        ("rft", "Rainforest Trust", 1_500, true),
        ("ocw", "Ocean Watch", 1_000, false),
    ];
    let client = reqwest::Client::new();
    let put = |path: String, body: Value| {
        let request = client.put(format!("{api}{path}")).bearer_auth(TOKEN).json(&body);
        async move {
            let response = request.send().await?;
            let status = response.status();
            if !status.is_success() {
                let body: Value = response.json().await?;
                return Err::<(), Failure>(format!("catalogue API answered {status} to {path}: {body}").into());
            }
            Ok(())
        }
    };
    put(
        "/v1/organisations/cm3orgclimatefund".into(),
        json!({ "name": "Climate Fund" }),
    )
    .await?;
    let mut allocations = Vec::new();
    for (slug, name, cents, onboarded) in recipients {
        let account = format!("acct_demo{slug}");
        control.create_account(&account, onboarded).await?;
        put(format!("/v1/organisations/cm3org{slug}"), json!({ "name": name })).await?;
        put(
            format!("/v1/recipient-account-links/cm3lnk{slug}"),
            json!({
                "distributor_organisation_id": "cm3orgclimatefund",
                "recipient_organisation_id": format!("cm3org{slug}"),
                "recipient_org_name": name,
                "label": format!("{name} main donations"),
                "stripe_connect_account_id": account,
                "charges_enabled": true,
            }),
        )
        .await?;
        allocations.push(json!({
            "id": format!("cm3alc{slug}"),
            "recipient_org_account_link_id": format!("cm3lnk{slug}"),
            "amount_cents": cents,
        }));
    }
    put(
        "/v1/recommendation-sets/cm3recclimate".into(),
        json!({
            "organisation_id": "cm3orgclimatefund",
            "name": "Climate split",
            "slug": "climate-split",
            "amount_mode": AmountMode::Fixed.as_str(),
            "currency": "AUD",
            "allocations": allocations,
        }),
    )
    .await?;
    writeln!(
        out,
        "set           Climate split (FIXED): ACF {}, Rainforest Trust {}, Ocean Watch {} (not onboarded)",
        money(2_500),
        money(1_500),
        money(1_000)
    )?;
    writeln!(out)?;

    let pay = |body: Value| {
        let client = client.clone();
        let api = api.clone();
        async move {
            let response = client
                .post(format!("{api}/v1/split-payments"))
                .bearer_auth(TOKEN)
                .json(&body)
                .send()
                .await?;
            let status = response.status();
            let body: Value = response.json().await?;
            if !status.is_success() {
                return Err(format!("intake answered {status}: {body}").into());
            }
            Ok::<Value, Failure>(body)
        }
    };
    let request = |method: &str, pm: &str, donor: &str| json!({ "recommendation_set_id": "cm3recclimate", "donor_id": donor, "payment_method_type": method, "payment_method": pm });

    writeln!(out, "1. A donor pays A$50.00 by card")?;
    let card = pay(request("card", "pm_card_visa", "cm3donoralice")).await?;
    let card_id = SplitPaymentId::parse(card["id"].as_str().unwrap_or_default())?;
    let card_payment = wait(&pool, &card_id, settled).await?;
    report(out, &pool, &card_payment).await?;

    writeln!(
        out,
        "\n2. A donor pays A$50.00 by BECS direct debit (BSB 000-000, account 000123456)"
    )?;
    let becs = pay(request("au_becs_debit", "pm_becs_000123456", "cm3donorbob")).await?;
    let becs_id = SplitPaymentId::parse(becs["id"].as_str().unwrap_or_default())?;
    let pending = wait(&pool, &becs_id, |p| p.payment.status == PaymentStatus::Processing).await?;
    writeln!(
        out,
        "   {}: {} — the bank debit is in flight; nothing is transferred yet",
        pending.payment.id, pending.payment.status
    )?;
    control.advance_clock(3 * 86_400).await?;
    writeln!(out, "   … three days pass (the simulator's clock) and the debit clears")?;
    let settled_becs = wait(&pool, &becs_id, settled).await?;
    report(out, &pool, &settled_becs).await?;

    let (events,): (i64,) = sqlx::query_as("SELECT count(*) FROM outbox_events")
        .fetch_one(&pool)
        .await?;
    let by_type: Vec<(String, i64)> =
        sqlx::query_as("SELECT event_type, count(*) FROM outbox_events GROUP BY event_type ORDER BY event_type")
            .fetch_all(&pool)
            .await?;
    writeln!(out, "\nEvents written for the organisations ({events}):")?;
    for (event_type, n) in by_type {
        writeln!(out, "   {n:>2} × {event_type}")?;
    }
    writeln!(
        out,
        "\nOcean Watch's shares are PARKED on the platform balance until an operator retries them (once its"
    )?;
    writeln!(out, "Stripe account can receive transfers) or refunds the donor.")?;

    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), worker).await;
    server.abort();
    simulator.shutdown().await;
    let parked = card_payment
        .allocations
        .iter()
        .find(|a| a.status == AllocationStatus::Parked)
        .map_or("salc_…", |a| a.id.as_str());
    hints(out, config.url.expose(), parked, card_id.as_str())?;
    pool.close().await;
    Ok(())
}

/// How to look further once the demo has stopped: the operator commands on the demo's database, with ids from this
/// run, and where `/metrics` is served (only while `serve` and `worker` run: the demo stops everything it started).
fn hints(out: &mut dyn std::io::Write, database_url: &str, parked_id: &str, payment_id: &str) -> Result<(), Failure> {
    let binary = std::env::current_exe()
        .ok()
        .and_then(|exe| {
            let relative = exe.strip_prefix(std::env::current_dir().ok()?).ok()?.to_owned();
            Some(format!("./{}", relative.display()))
        })
        .unwrap_or_else(|| "splitpay".to_owned());
    let process = crate::config::ProcessSettings::from_env().ok();
    let http_addr = process
        .as_ref()
        .map_or(crate::config::HTTP_ADDR_DEFAULT.to_owned(), |p| p.http_addr.to_string());
    let metrics_addr = process
        .as_ref()
        .map_or(crate::observability::METRICS_ADDR_DEFAULT.to_owned(), |p| {
            p.metrics_addr.to_string()
        });
    writeln!(
        out,
        "
Look further (the demo has stopped everything it started; its database stays):"
    )?;
    writeln!(
        out,
        "   export DATABASE_URL={}",
        crate::config::redact_url(database_url)
    )?;
    writeln!(
        out,
        "   {binary} ops parked                      # the parked shares, oldest first"
    )?;
    writeln!(
        out,
        "   {binary} ops show {parked_id}   # a parked share: its payment, attempts, events"
    )?;
    writeln!(out, "   {binary} ops show {payment_id}   # the card payment")?;
    writeln!(
        out,
        "   Metrics: http://{http_addr}/metrics (serve) and http://{metrics_addr}/metrics (worker), served while"
    )?;
    writeln!(
        out,
        "   `splitpay serve` and `splitpay worker` run (README.md, \"Metrics\"); nothing serves them now."
    )?;
    Ok(())
}

fn settled(p: &SplitPayment) -> bool {
    !p.allocations.is_empty()
        && p.allocations
            .iter()
            .all(|a| matches!(a.status, AllocationStatus::Transferred | AllocationStatus::Parked))
}

async fn wait(
    pool: &sqlx::PgPool,
    id: &SplitPaymentId,
    done: impl Fn(&SplitPayment) -> bool,
) -> Result<SplitPayment, Failure> {
    let mut waited_ms = 0;
    loop {
        let p = get_split_payment(&mut *pool.acquire().await?, id).await?;
        if done(&p) {
            return Ok(p);
        }
        if waited_ms >= WAIT_MS_MAX {
            return Err(format!(
                "{id} did not settle in {} s (status {})",
                WAIT_MS_MAX / 1_000,
                p.payment.status
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited_ms += 100;
    }
}

async fn report(out: &mut dyn std::io::Write, pool: &sqlx::PgPool, p: &SplitPayment) -> Result<(), Failure> {
    let links: Vec<(String, String)> = sqlx::query_as("SELECT id, recipient_org_name FROM recipient_account_links")
        .fetch_all(pool)
        .await?;
    let name = |link: &str| {
        links
            .iter()
            .find(|(id, _)| id == link)
            .map_or(link.to_owned(), |(_, n)| n.clone())
    };
    writeln!(
        out,
        "   {}: {} — charged {}, Stripe fee {}, platform fee {}",
        p.payment.id,
        p.payment.status,
        money(p.payment.total_amount_cents),
        money(p.payment.processing_fee_cents.unwrap_or(0)),
        money(p.payment.platform_fee_cents.unwrap_or(0)),
    )?;
    for a in &p.allocations {
        let outcome = match a.status {
            AllocationStatus::Transferred => a.stripe_transfer_id.clone().unwrap_or_default(),
            _ => a.failure_code.clone().unwrap_or_default(),
        };
        writeln!(
            out,
            "     {:<36} gross {:>10}  fees {:>8}  net {:>10}  {:<11} {}",
            name(&a.recipient_org_account_link_id),
            money(a.gross_amount_cents),
            money(a.fee_share_cents.unwrap_or(0)),
            money(a.net_amount_cents.unwrap_or(0)),
            a.status,
            outcome
        )?;
    }
    let id = SplitPaymentId::parse(&p.payment.id)?;
    let m = money_report(&mut *pool.acquire().await?, &id).await?;
    writeln!(
        out,
        "   charged {} = transferred {} + parked {} + fees {}: {}",
        money(m.charged_cents),
        money(m.transferred_cents),
        money(m.parked_cents),
        money(m.fees_kept_cents),
        if m.is_conserved() {
            "conserved to the cent"
        } else {
            "NOT CONSERVED"
        }
    )?;
    if !m.is_conserved() {
        return Err(format!("money not conserved for {id}: {m:?}").into());
    }
    Ok(())
}
