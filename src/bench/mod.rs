//! `splitpay bench`: measures splitpay end to end on this machine and checks that the run was correct.
//!
//! A fresh database; the Stripe simulator in this process (latency configurable); `splitpay serve` and N
//! `splitpay worker` processes started from this binary with their default configuration (only the addresses, the
//! simulator and a Stripe rate out of the way are set); card payments through the real intake; everything after
//! that driven by the simulator's real webhooks. Modes:
//! - `burn-down`: every payment is made (and its webhooks stored) first, then the workers start; measures how fast
//!   they clear the backlog;
//! - `steady`: workers running, payments at a fixed rate;
//! - `idle`: workers running, one payment at a time (the latency of a quiet system).
//!
//! It prints intake's rate and latency, transfers/s, the latency from the payment's success (intake's answer, the
//! PaymentIntent having succeeded) to its first and last transfer recorded, PostgreSQL transactions and statements
//! per transfer, and each process's CPU; then checks correctness ([`check`]) and fails (exit 1) when wrong, and
//! times the periodic jobs' ticks on the tables as the run left them ([`ticks`]).
//! `--preload N` first writes N finished payments with their history (set-based SQL, [`preload`]).

pub mod check;
pub mod load;
pub mod preload;
pub mod procs;
pub mod stats;
pub mod ticks;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::str::FromStr;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::stream::{self, StreamExt};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

use crate::config::{url_with_database, DATABASE_URL_DEFAULT};
use procs::Proc;
use stats::{summary_ms, PgCounters};

const BENCH_KEY: &str = "sk_test_splitpay_bench";
/// Ticks of each periodic job timed after a run.
const TICK_RUNS: usize = 3;
const WEBHOOK_SECRET: &str = "whsec_splitpay_bench";
const CONNECT_WEBHOOK_SECRET: &str = "whsec_splitpay_bench_connect";
const SERVICE_TOKEN: &str = "svc_splitpay_bench_token";
/// How often the bench looks at the tables while it waits (each look is one transaction it subtracts).
const POLL_MS: u64 = 100;
/// How often the end of a run (every transfer recorded) is checked.
const END_POLL_MS: u64 = 1_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    BurnDown,
    Steady,
    Idle,
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// burn-down (queue first, then start the workers), steady (a fixed rate), idle (one payment at a time).
    #[arg(long, value_enum, default_value = "burn-down")]
    pub mode: Mode,
    /// Payments to make.
    #[arg(long, default_value_t = 2000)]
    pub payments: usize,
    /// Recipients per payment (one transfer each).
    #[arg(long, default_value_t = 3)]
    pub recipients: usize,
    /// Worker processes.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Payments per second in steady mode.
    #[arg(long, default_value_t = 50)]
    pub rate_per_sec: u32,
    /// Intake clients at once (burn-down and steady).
    #[arg(long, default_value_t = 16)]
    pub intake_clients: usize,
    /// Latency the simulator adds to every Stripe request: `MS` or `MIN-MAX` (uniform).
    #[arg(long, default_value = "0")]
    pub sim_latency_ms: String,
    /// Finished payments (with their history) written before the run, by set-based SQL.
    #[arg(long, default_value_t = 0)]
    pub preload: u64,
    /// Give up waiting for the transfers after this long.
    #[arg(long, default_value_t = 600)]
    pub timeout_secs: u64,
    /// Keep the bench database (its name is printed) instead of dropping it.
    #[arg(long)]
    pub keep_db: bool,
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

/// Runs the benchmark, writing its report to `out`. Ok(false) when the correctness check failed.
pub async fn run(args: &BenchArgs, out: &mut (dyn Write + Send)) -> Result<bool, Failure> {
    let (latency_min_ms, latency_max_ms) = parse_latency(&args.sim_latency_ms)?;
    if args.payments == 0 || args.recipients == 0 || args.workers == 0 || args.intake_clients == 0 {
        return Err("--payments, --recipients, --workers and --intake-clients must be positive".into());
    }
    let server = std::env::var("DATABASE_URL").unwrap_or_else(|_| DATABASE_URL_DEFAULT.to_owned());
    let name = format!("splitpay_bench_{}", uuid::Uuid::new_v4().simple());
    let url = url_with_database(&server, &name);
    let admin = PgConnectOptions::from_str(&server)?.database("postgres");
    {
        let mut conn = PgConnection::connect_with(&admin).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await?;
    }
    let outcome = run_in(args, &name, &url, (latency_min_ms, latency_max_ms), out).await;
    if args.keep_db {
        writeln!(out, "database kept: {name}")?;
    } else {
        let mut conn = PgConnection::connect_with(&admin).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&mut conn)
        .await?;
    }
    outcome
}

fn parse_latency(raw: &str) -> Result<(u64, u64), Failure> {
    let bad = || format!("--sim-latency-ms: `{raw}` is not MS or MIN-MAX (whole milliseconds)");
    let (min, max) = match raw.split_once('-') {
        Some((a, b)) => (
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        ),
        None => {
            let v: u64 = raw.trim().parse().map_err(|_| bad())?;
            (v, v)
        }
    };
    if max < min {
        return Err(bad().into());
    }
    Ok((min, max))
}

/// Everything the bench started, stopped on every way out.
struct Running {
    serve: Option<Proc>,
    workers: Vec<Proc>,
}

impl Running {
    async fn stop(&mut self) {
        for w in &mut self.workers {
            w.stop(30_000).await;
        }
        if let Some(s) = &mut self.serve {
            s.stop(10_000).await;
        }
    }
}

async fn run_in(
    args: &BenchArgs,
    name: &str,
    url: &str,
    latency_ms: (u64, u64),
    out: &mut (dyn Write + Send),
) -> Result<bool, Failure> {
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(PgConnectOptions::from_str(url)?)
        .await?;
    crate::store::migrate_then(&pool, || crate::jobs::queue::setup(&pool)).await?;
    let with_statements = stats::enable_statements(&pool).await;

    let sim = crate::stripe::sim::start(Default::default(), 0).await?;
    let control = sim.control();
    control.set_latency(latency_ms.0, latency_ms.1, 0).await?;
    for i in 0..args.recipients {
        control.create_account(&load::account_of(i), true).await?;
    }
    let dir = std::env::temp_dir().join(name);
    std::fs::create_dir_all(&dir)?;
    let http_port = procs::free_port()?;
    let base_url = format!("http://127.0.0.1:{http_port}");
    let mut env = BTreeMap::from([
        ("DATABASE_URL".to_owned(), url.to_owned()),
        ("STRIPE_SECRET_KEY".to_owned(), BENCH_KEY.to_owned()),
        ("STRIPE_API_BASE".to_owned(), sim.base_url()),
        ("STRIPE_WEBHOOK_SECRET".to_owned(), WEBHOOK_SECRET.to_owned()),
        (
            "STRIPE_CONNECT_WEBHOOK_SECRET".to_owned(),
            CONNECT_WEBHOOK_SECRET.to_owned(),
        ),
        ("SPLITPAY_SERVICE_TOKEN".to_owned(), SERVICE_TOKEN.to_owned()),
        ("SPLITPAY_HTTP_ADDR".to_owned(), format!("127.0.0.1:{http_port}")),
        // Stripe's budget is not what is measured here: raised out of the way.
        ("STRIPE_RATE_PER_SEC".to_owned(), "100000".to_owned()),
    ]);
    // Each endpoint is sent the event types splitpay acts on, as README tells an operator to configure them.
    control
        .add_splitpay_webhooks(&base_url, WEBHOOK_SECRET, CONNECT_WEBHOOK_SECRET)
        .await?;

    let mut running = Running {
        serve: Some(Proc::spawn("serve", "serve", &env, &dir)?),
        workers: Vec::new(),
    };
    let result = drive(
        args,
        name,
        &pool,
        &sim,
        &base_url,
        &mut env,
        &dir,
        &mut running,
        with_statements,
        out,
    )
    .await;
    running.stop().await;
    if result.is_err() {
        writeln!(out, "process logs: {}", dir.display())?;
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

/// What one run measured.
#[derive(Default)]
struct Measured {
    paid: Vec<load::Paid>,
    intake_secs: f64,
    /// From the workers' start (burn-down) or the first payment (other modes) to the last transfer recorded.
    transfer_secs: f64,
    /// From the first transfer recorded to the last.
    first_to_last_secs: f64,
    before: PgCounters,
    after: PgCounters,
    own_queries: i64,
    cpu_ticks: Vec<(String, u64)>,
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    args: &BenchArgs,
    name: &str,
    pool: &PgPool,
    sim: &crate::stripe::sim::SimServer,
    base_url: &str,
    env: &mut BTreeMap<String, String>,
    dir: &std::path::Path,
    running: &mut Running,
    with_statements: bool,
    out: &mut (dyn Write + Send),
) -> Result<bool, Failure> {
    let http = reqwest::Client::new();
    wait_healthy(&http, base_url, running).await?;
    load::seed_catalogue(&http, base_url, SERVICE_TOKEN, args.recipients).await?;
    if args.preload > 0 {
        let started = Instant::now();
        preload::preload(pool, args.preload).await?;
        writeln!(
            out,
            "preloaded {} finished payments in {:.1} s",
            args.preload,
            started.elapsed().as_secs_f64()
        )?;
    }
    writeln!(
        out,
        "splitpay bench: mode {:?}, {} payments x {} recipients, {} worker(s), simulator latency {} ms, \
         SPLITPAY_WORKER_CONCURRENCY {}",
        args.mode,
        args.payments,
        args.recipients,
        args.workers,
        args.sim_latency_ms,
        std::env::var("SPLITPAY_WORKER_CONCURRENCY").unwrap_or_else(|_| "default".into()),
    )?;
    let expected = (args.payments * args.recipients) as i64;
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let mut m = Measured::default();

    let start_workers = |running: &mut Running, env: &mut BTreeMap<String, String>| -> Result<(), Failure> {
        for i in 0..args.workers {
            env.insert(
                "SPLITPAY_METRICS_ADDR".into(),
                format!("127.0.0.1:{}", procs::free_port()?),
            );
            running
                .workers
                .push(Proc::spawn(&format!("worker-{i}"), "worker", env, dir)?);
        }
        Ok(())
    };
    let ticks = |running: &Running, pg: &[u32]| -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = running
            .serve
            .iter()
            .chain(running.workers.iter())
            .filter_map(|p| Some((p.name.clone(), procs::cpu_ticks(p.pid()?)?)))
            .collect();
        v.push((
            "bench (simulator + load)".into(),
            procs::cpu_ticks(std::process::id()).unwrap_or(0),
        ));
        v.push((
            "postgres backends of splitpay's processes".into(),
            pg.iter().filter_map(|&pid| procs::cpu_ticks(pid)).sum(),
        ));
        v
    };

    let ticks_before;
    let t0;
    let t0_wall;
    match args.mode {
        Mode::BurnDown => {
            let started = Instant::now();
            m.paid = pay_many(&http, base_url, args.payments, args.intake_clients, None).await?;
            m.intake_secs = started.elapsed().as_secs_f64();
            // Every payment's success must be in the inbox before the workers start.
            wait_for(
                pool,
                deadline,
                POLL_MS,
                &mut m.own_queries,
                "the webhooks of every payment",
                |pool| async move {
                    let (n,): (i64,) = sqlx::query_as(
                        "SELECT count(*) FROM stripe_events WHERE event_type = 'payment_intent.succeeded'",
                    )
                    .fetch_one(&pool)
                    .await?;
                    Ok(n >= args.payments as i64)
                },
            )
            .await?;
            m.own_queries = 0;
            tokio::time::sleep(Duration::from_millis(1_500)).await; // let serve's statistics reach pg_stat
            m.before = stats::pg_counters(pool, name, with_statements).await?;
            ticks_before = ticks(running, &backend_pids(pool, name).await?);
            t0 = Instant::now();
            t0_wall = Utc::now();
            start_workers(running, env)?;
        }
        Mode::Steady | Mode::Idle => {
            start_workers(running, env)?;
            tokio::time::sleep(Duration::from_millis(2_000)).await; // the workers migrate and start
            m.before = stats::pg_counters(pool, name, with_statements).await?;
            ticks_before = ticks(running, &backend_pids(pool, name).await?);
            t0 = Instant::now();
            t0_wall = Utc::now();
            let started = Instant::now();
            if args.mode == Mode::Steady {
                let interval = Duration::from_secs_f64(1.0 / f64::from(args.rate_per_sec.max(1)));
                m.paid = pay_many(&http, base_url, args.payments, args.intake_clients, Some(interval)).await?;
            } else {
                for _ in 0..args.payments {
                    let paid = load::pay(&http, base_url, SERVICE_TOKEN).await?;
                    let id = paid.split_payment_id.clone();
                    m.paid.push(paid);
                    let recipients = args.recipients as i64;
                    wait_for(
                        pool,
                        deadline,
                        POLL_MS,
                        &mut m.own_queries,
                        "one payment's transfers",
                        |pool| {
                            let id = id.clone();
                            async move {
                                let (n,): (i64,) = sqlx::query_as(
                                    "SELECT count(*) FROM split_allocations
                                  WHERE split_payment_id = $1 AND status = 'TRANSFERRED'",
                                )
                                .bind(id)
                                .fetch_one(&pool)
                                .await?;
                                Ok(n >= recipients)
                            }
                        },
                    )
                    .await?;
                }
            }
            m.intake_secs = started.elapsed().as_secs_f64();
        }
    }
    let ids: Vec<String> = m.paid.iter().map(|p| p.split_payment_id.clone()).collect();
    // Checked once a second: the check counts every share of the run, and its cost would weigh on what is measured;
    // the time is read from the rows (the last transfer recorded), not from when the check saw it.
    wait_for(
        pool,
        deadline,
        END_POLL_MS,
        &mut m.own_queries,
        "every transfer",
        |pool| {
            let ids = ids.clone();
            async move {
                let (n,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM split_allocations WHERE split_payment_id = ANY($1) AND status = 'TRANSFERRED'",
            )
            .bind(ids)
            .fetch_one(&pool)
            .await?;
                Ok(n >= expected)
            }
        },
    )
    .await?;
    let (last,): (Option<DateTime<Utc>>,) =
        sqlx::query_as("SELECT max(transferred_at) FROM split_allocations WHERE split_payment_id = ANY($1)")
            .bind(&ids)
            .fetch_one(pool)
            .await?;
    m.own_queries += 1;
    m.transfer_secs = match last {
        Some(last) => (last - t0_wall).num_microseconds().unwrap_or(0) as f64 / 1e6,
        None => t0.elapsed().as_secs_f64(),
    };
    let backends = backend_pids(pool, name).await?;
    let ticks_after = ticks(running, &backends);
    // Statistics reach pg_stat_database when a backend is idle (at most ~1 s late): wait, then read.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    m.after = stats::pg_counters(pool, name, with_statements).await?;
    m.cpu_ticks = ticks_after
        .into_iter()
        .map(|(n, after)| {
            let before = ticks_before.iter().find(|(b, _)| *b == n).map_or(0, |(_, t)| *t);
            (n, after.saturating_sub(before))
        })
        .collect();

    let latencies = transfer_latencies(pool, &m.paid).await?;
    let (first, last): (Vec<f64>, Vec<f64>) = latencies.iter().copied().unzip();
    m.first_to_last_secs = first_to_last(pool, &ids).await?;

    report(args, &m, expected, with_statements, &first, &last, out)?;

    let transfers = check::sim_transfers(&sim.base_url(), BENCH_KEY).await?;
    let check = check::verify(pool, &ids, &transfers).await?;
    writeln!(
        out,
        "check: {} payments, {} allocations, {} transfers at Stripe; charged {} = transferred {} + fees {} cents",
        check.payments,
        check.allocations,
        check.transfers_at_stripe,
        check.charged_cents,
        check.transferred_cents,
        check.fees_cents
    )?;
    // The workers are still running: their own ticks may overlap these (a claimed tick runs in one replica only,
    // these run besides them), as a second replica's would.
    let ticks = ticks::measure(pool, &sim.base_url(), BENCH_KEY, TICK_RUNS).await?;
    let shown: Vec<String> = ticks
        .iter()
        .map(|(job, ms)| {
            let each: Vec<String> = ms.iter().map(|t| format!("{t:.1}")).collect();
            format!("{job} {} ms", each.join("/"))
        })
        .collect();
    writeln!(
        out,
        "periodic ticks on these tables ({} each, in order): {}",
        TICK_RUNS,
        shown.join("; ")
    )?;
    if check.ok() {
        writeln!(out, "check: OK (one transfer per allocation, money conserved)")?;
    } else {
        writeln!(out, "check: FAILED, {} problem(s):", check.problems.len())?;
        for p in check.problems.iter().take(20) {
            writeln!(out, "  {p}")?;
        }
    }
    Ok(check.ok())
}

/// Makes `n` payments with `clients` at once; with `interval`, starts one per interval (a steady rate).
async fn pay_many(
    http: &reqwest::Client,
    base_url: &str,
    n: usize,
    clients: usize,
    interval: Option<Duration>,
) -> Result<Vec<load::Paid>, Failure> {
    let started = Instant::now();
    let results: Vec<Result<load::Paid, String>> = stream::iter(0..n)
        .map(|i| async move {
            if let Some(every) = interval {
                tokio::time::sleep_until((started + every * i as u32).into()).await;
            }
            load::pay(http, base_url, SERVICE_TOKEN).await
        })
        .buffer_unordered(clients)
        .collect()
        .await;
    results.into_iter().map(|r| r.map_err(Failure::from)).collect()
}

async fn wait_healthy(http: &reqwest::Client, base_url: &str, running: &mut Running) -> Result<(), Failure> {
    for _ in 0..300 {
        if let Some(serve) = &mut running.serve {
            if let Some(status) = serve.exited() {
                return Err(format!("serve exited ({status}); see {}", serve.log.display()).into());
            }
        }
        if let Ok(r) = http.get(format!("{base_url}/healthz")).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err("serve did not answer /healthz within 30 s".into())
}

/// Polls `done` every `poll_ms` until it holds (counting each poll in `own`), or fails at `deadline`.
async fn wait_for<F, Fut>(
    pool: &PgPool,
    deadline: Instant,
    poll_ms: u64,
    own: &mut i64,
    what: &str,
    done: F,
) -> Result<(), Failure>
where
    F: Fn(PgPool) -> Fut,
    Fut: std::future::Future<Output = Result<bool, sqlx::Error>>,
{
    loop {
        *own += 1;
        if done(pool.clone()).await? {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(poll_ms)).await;
    }
}

async fn backend_pids(pool: &PgPool, name: &str) -> Result<Vec<u32>, sqlx::Error> {
    let rows: Vec<(i32,)> =
        // splitpay's own processes only (they connect as `splitpay`): the bench's pool is not measured, and one of its
        // connections (the preload's, with minutes of CPU) seen only at the end was counted whole (441% of a core).
        sqlx::query_as("SELECT pid FROM pg_stat_activity WHERE datname = $1 AND application_name = 'splitpay'")
            .bind(name)
            .fetch_all(pool)
            .await?;
    Ok(rows.into_iter().map(|(p,)| p as u32).collect())
}

/// Per payment: ms from intake's answer (the PaymentIntent succeeded) to its first and to its last transfer
/// recorded.
async fn transfer_latencies(pool: &PgPool, paid: &[load::Paid]) -> Result<Vec<(f64, f64)>, sqlx::Error> {
    let ids: Vec<String> = paid.iter().map(|p| p.split_payment_id.clone()).collect();
    let rows: Vec<(String, DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
        "SELECT split_payment_id, min(transferred_at), max(transferred_at) FROM split_allocations
          WHERE split_payment_id = ANY($1) AND transferred_at IS NOT NULL GROUP BY split_payment_id",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await?;
    let answered: HashMap<&str, DateTime<Utc>> = paid
        .iter()
        .map(|p| (p.split_payment_id.as_str(), p.answered_at))
        .collect();
    Ok(rows
        .iter()
        .filter_map(|(id, first, last)| {
            let at = answered.get(id.as_str())?;
            let ms = |t: &DateTime<Utc>| (*t - *at).num_microseconds().unwrap_or(0) as f64 / 1_000.0;
            Some((ms(first), ms(last)))
        })
        .collect())
}

async fn first_to_last(pool: &PgPool, ids: &[String]) -> Result<f64, sqlx::Error> {
    let (secs,): (Option<f64>,) = sqlx::query_as(
        "SELECT extract(epoch FROM max(transferred_at) - min(transferred_at))::float8 FROM split_allocations
          WHERE split_payment_id = ANY($1)",
    )
    .bind(ids)
    .fetch_one(pool)
    .await?;
    Ok(secs.unwrap_or(0.0))
}

fn report(
    args: &BenchArgs,
    m: &Measured,
    transfers: i64,
    with_statements: bool,
    first: &[f64],
    last: &[f64],
    out: &mut (dyn Write + Send),
) -> std::io::Result<()> {
    let intake_ms: Vec<f64> = m.paid.iter().map(|p| p.latency.as_secs_f64() * 1_000.0).collect();
    writeln!(
        out,
        "intake: {} payments in {:.2} s = {:.1} payments/s; latency {}",
        m.paid.len(),
        m.intake_secs,
        m.paid.len() as f64 / m.intake_secs.max(1e-9),
        summary_ms(&intake_ms)
    )?;
    let since = match args.mode {
        Mode::BurnDown => "the workers' start",
        _ => "the first payment",
    };
    writeln!(
        out,
        "transfers: {transfers} in {:.2} s from {since} = {:.1} transfers/s ({:.1}/s first to last transfer)",
        m.transfer_secs,
        transfers as f64 / m.transfer_secs.max(1e-9),
        transfers as f64 / m.first_to_last_secs.max(1e-9),
    )?;
    if args.mode != Mode::BurnDown {
        writeln!(
            out,
            "payment succeeded -> first transfer recorded: {}",
            summary_ms(first)
        )?;
        writeln!(
            out,
            "payment succeeded -> last transfer recorded:  {}",
            summary_ms(last)
        )?;
    }
    let (xacts, statements) = stats::per_transfer(m.before, m.after, m.own_queries, transfers);
    let scope = match args.mode {
        Mode::BurnDown => "the workers' work",
        _ => "intake, webhooks and the workers' work",
    };
    writeln!(
        out,
        "postgres per transfer ({scope}, everything included): {xacts:.1} transactions, {}",
        match statements {
            Some(s) => format!("{s:.1} statements (pg_stat_statements, BEGIN/COMMIT included)"),
            None if with_statements => "statements n/a".to_owned(),
            None => "statements n/a (pg_stat_statements is not loaded)".to_owned(),
        }
    )?;
    let hz = procs::clock_ticks_per_sec() as f64;
    let wall = m.transfer_secs.max(1e-9);
    let cpu: Vec<String> = m
        .cpu_ticks
        .iter()
        .map(|(n, t)| {
            let secs = *t as f64 / hz;
            format!("{n} {secs:.2} s ({:.0}% of a core)", secs / wall * 100.0)
        })
        .collect();
    writeln!(out, "cpu during the measured {wall:.2} s: {}", cpu.join("; "))
}
