//! The scenario, step by step, against whatever Stripe API base the run was given:
//! 1. two AU Custom accounts: one onboarded (test bank details, accepted terms), one not;
//! 2. a FIXED set sharing A$50.00 between them (A$40.00 / A$10.00), through splitpay's catalogue API;
//! 3. three payments through intake: `pm_card_visa`, `pm_card_bypassPending` (its funds available at once, so its
//!    transfer can be reversed), and a BECS debit (`000123456`) the donor confirms as the browser would; splitpay
//!    distributes each, and the share for the account that cannot receive transfers is parked;
//! 4. `ops refund --reverse-transfer` on the bypassPending payment's transferred share (a reversal and a partial
//!    refund), and `ops refund` on its parked share;
//! 5. the second account is onboarded; once Stripe says it can receive transfers, `ops retry` sends the other two
//!    parked shares on a new generation;
//! 6. every payment checked through Stripe's API against splitpay's records ([`super::checks`]).
//!
//! Every account is recorded in [`Created`] the moment Stripe creates it, so the caller deletes it whatever happens.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use clap::Parser;
use serde_json::{json, Value};

use super::checks::{self, Checker};
use super::events::Poller;
use super::splitpay_api::SplitpayApi;
use super::stripe_api::{StripeApi, BECS_ACCOUNT_SUCCEEDS};
use super::summary::{RetryLine, Summary};
use super::Failure;
use crate::app::AppContext;
use crate::domain::ids::SplitPaymentId;
use crate::domain::state::{AllocationStatus, PaymentStatus};
use crate::store::money_report::{money_report, MoneyReport};
use crate::store::payments::{get_split_payment, SplitPayment};

/// The shares of the set, in minor units (AUD): the onboarded recipient's, then the other's.
const READY_SHARE_CENTS: i64 = 4_000;
const UNREADY_SHARE_CENTS: i64 = 1_000;
const WAIT_POLL_MS: u64 = 500;
/// Who the operator commands say acted, in the audit log.
const ACTOR: &str = "splitpay-e2e";

/// Everything a run talks to.
pub struct Run {
    pub run_id: String,
    pub stripe: StripeApi,
    pub pool: sqlx::PgPool,
    pub api: SplitpayApi,
    /// What the operator commands run with (the same gateway, so the same rate limiter).
    pub app: AppContext,
    pub poller: Option<Poller>,
    /// How long to wait for one thing (a payment to settle, a capability to activate) at most.
    pub wait_ms_max: u64,
}

/// What the run created at Stripe, for the cleanup: (role, account id).
#[derive(Debug, Default)]
pub struct Created {
    pub accounts: Vec<(String, String)>,
}

/// `splitpay ops …` as an operator types it, parsed and run in this process.
#[derive(clap::Parser)]
#[command(name = "splitpay")]
struct OpsCli {
    #[command(flatten)]
    ops: crate::ops::OpsArgs,
}

impl Run {
    /// Runs `splitpay ops ARGS` (the same code as the CLI) and fails unless it succeeded; its output is shown
    /// indented.
    async fn ops(&self, out: &mut (dyn Write + Send), args: &[&str]) -> Result<(), Failure> {
        writeln!(out, "   $ splitpay ops {}", args.join(" "))?;
        let cli = OpsCli::try_parse_from(std::iter::once("ops").chain(args.iter().copied()))?;
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let outcome = crate::ops::run(&cli.ops, &self.app, &mut stdout, &mut stderr).await?;
        for line in String::from_utf8_lossy(&stdout)
            .lines()
            .chain(String::from_utf8_lossy(&stderr).lines())
        {
            writeln!(out, "     {line}")?;
        }
        if outcome.code() != 0 {
            return Err(format!("`splitpay ops {}` exited {}", args.join(" "), outcome.code()).into());
        }
        Ok(())
    }

    /// Waits (bounded) until `done` holds for the payment and its money report; stops early if polling failed.
    async fn wait(
        &self,
        id: &SplitPaymentId,
        what: &str,
        done: impl Fn(&SplitPayment, &MoneyReport) -> bool,
    ) -> Result<SplitPayment, Failure> {
        let mut waited_ms = 0;
        loop {
            let mut conn = self.pool.acquire().await?;
            let p = get_split_payment(&mut conn, id).await?;
            let report = money_report(&mut conn, id).await?;
            drop(conn);
            if done(&p, &report) {
                return Ok(p);
            }
            if let Some(failure) = self.poller.as_ref().and_then(|p| p.stats().failure) {
                return Err(format!("polling Stripe's events failed: {failure}").into());
            }
            if waited_ms >= self.wait_ms_max {
                let shares: Vec<String> = p
                    .allocations
                    .iter()
                    .map(|a| format!("{} {} {}", a.id, a.status, a.failure_code.as_deref().unwrap_or("")))
                    .collect();
                return Err(format!(
                    "{id}: timed out after {} s waiting for {what} (payment {}, shares {shares:?})",
                    self.wait_ms_max / 1_000,
                    p.payment.status
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(WAIT_POLL_MS)).await;
            waited_ms += WAIT_POLL_MS;
        }
    }
}

/// Every share TRANSFERRED or PARKED.
fn distributed(p: &SplitPayment, _: &MoneyReport) -> bool {
    p.payment.status == PaymentStatus::Succeeded
        && !p.allocations.is_empty()
        && p.allocations
            .iter()
            .all(|a| matches!(a.status, AllocationStatus::Transferred | AllocationStatus::Parked))
}

/// Nothing left moving: no share in flight, no refunded money waiting for its cover.
fn settled(p: &SplitPayment, m: &MoneyReport) -> bool {
    distributed_or_refunded(p) && m.in_flight_cents == 0 && m.unsettled_cents == 0
}

fn distributed_or_refunded(p: &SplitPayment) -> bool {
    p.allocations.iter().all(|a| {
        matches!(
            a.status,
            AllocationStatus::Transferred | AllocationStatus::Parked | AllocationStatus::Refunded
        )
    })
}

/// The share of `p` paid to `link`.
fn share<'a>(p: &'a SplitPayment, link: &str) -> Result<&'a crate::store::allocations::SplitAllocationRow, Failure> {
    p.allocations
        .iter()
        .find(|a| a.recipient_org_account_link_id == link)
        .ok_or_else(|| format!("{} has no share for {link}", p.payment.id).into())
}

pub async fn run(
    run: &Run,
    created: &mut Created,
    summary: &mut Summary,
    out: &mut (dyn Write + Send),
) -> Result<(), Failure> {
    let r = &run.run_id;

    writeln!(out, "1. Connected accounts (AU, Custom)")?;
    let ready = run.stripe.create_account("ready", true).await?;
    created.accounts.push(("ready".into(), ready.clone()));
    let unready = run.stripe.create_account("not_onboarded", false).await?;
    created.accounts.push(("not_onboarded".into(), unready.clone()));
    run.stripe.wait_transfers_active(&ready, run.wait_ms_max).await?;
    writeln!(
        out,
        "   {ready}: onboarded (BSB 110000 / 000123456, terms accepted); transfers active"
    )?;
    let info = crate::stripe::PaymentGateway::retrieve_account(&*run.stripe.gateway, &unready).await?;
    if info.can_receive_transfers() {
        return Err(format!(
            "{unready} can receive transfers without onboarding, so nothing would be parked: against the simulator, \
             start it with SimConfig::onboarding_required (Stripe's rule)"
        )
        .into());
    }
    writeln!(
        out,
        "   {unready}: not onboarded; transfers {}",
        info.transfers_capability.as_deref().unwrap_or("not requested")
    )?;

    writeln!(out, "2. The catalogue, through splitpay's catalogue API")?;
    let distributor = format!("cm3e2e{r}dist");
    let links = [
        (
            format!("cm3e2e{r}lnkready"),
            ready.clone(),
            "Ready Recipient",
            READY_SHARE_CENTS,
        ),
        (
            format!("cm3e2e{r}lnkunready"),
            unready.clone(),
            "Unready Recipient",
            UNREADY_SHARE_CENTS,
        ),
    ];
    let accounts: BTreeMap<String, String> = links.iter().map(|(l, a, _, _)| (l.clone(), a.clone())).collect();
    run.api
        .put(
            &format!("/v1/organisations/{distributor}"),
            json!({ "name": "E2E Fund" }),
        )
        .await?;
    let mut allocations = Vec::new();
    for (i, (link, account, name, cents)) in links.iter().enumerate() {
        let org = format!("cm3e2e{r}org{i}");
        run.api
            .put(&format!("/v1/organisations/{org}"), json!({ "name": name }))
            .await?;
        run.api
            .put(
                &format!("/v1/recipient-account-links/{link}"),
                json!({
                    "distributor_organisation_id": distributor,
                    "recipient_organisation_id": org,
                    "recipient_org_name": name,
                    "label": format!("{name} (e2e {r})"),
                    "stripe_connect_account_id": account,
                    "charges_enabled": true,
                }),
            )
            .await?;
        allocations.push(json!({
            "id": format!("cm3e2e{r}alc{i}"),
            "recipient_org_account_link_id": link,
            "amount_cents": cents,
        }));
    }
    let set = format!("cm3e2e{r}set");
    run.api
        .put(
            &format!("/v1/recommendation-sets/{set}"),
            json!({
                "organisation_id": distributor,
                "name": format!("E2E split {r}"),
                "slug": format!("e2e-split-{r}"),
                "amount_mode": "FIXED",
                "currency": "AUD",
                "allocations": allocations,
            }),
        )
        .await?;
    writeln!(
        out,
        "   set {set} (FIXED): {ready} {READY_SHARE_CENTS}, {unready} {UNREADY_SHARE_CENTS} (AUD cents)"
    )?;

    writeln!(out, "3. Payments through intake; splitpay distributes")?;
    let (ready_link, unready_link) = (&links[0].0, &links[1].0);
    let mut payments = Vec::new();
    for (label, method, pm) in [
        ("card", "card", Some("pm_card_visa")),
        ("card_available", "card", Some("pm_card_bypassPending")),
        ("becs", "au_becs_debit", None),
    ] {
        let mut body = json!({
            "recommendation_set_id": set,
            "donor_id": format!("cm3e2e{r}donor"),
            "payment_method_type": method,
        });
        if let Some(pm) = pm {
            body["payment_method"] = json!(pm);
        }
        let answer: Value = run.api.pay(body, &format!("splitpay-e2e-{r}-{label}")).await?;
        let id = SplitPaymentId::parse(answer["id"].as_str().unwrap_or_default())?;
        let pi = answer["payment_intent_id"].as_str().unwrap_or_default().to_owned();
        if pm.is_none() {
            // The donor's browser confirms the debit with the bank account and the mandate.
            let confirmed = run.stripe.confirm_becs(&pi, BECS_ACCOUNT_SUCCEEDS).await?;
            writeln!(
                out,
                "   {label}: {id} {pi} confirmed by the donor (BSB 000000 / {BECS_ACCOUNT_SUCCEEDS}): {}",
                confirmed["status"].as_str().unwrap_or("?")
            )?;
        }
        let p = run.wait(&id, "distribution", distributed).await?;
        let (a, b) = (share(&p, ready_link)?, share(&p, unready_link)?);
        if a.status != AllocationStatus::Transferred || b.status != AllocationStatus::Parked {
            return Err(format!(
                "{id}: expected the ready share TRANSFERRED and the other PARKED, got {} and {}",
                a.status, b.status
            )
            .into());
        }
        writeln!(
            out,
            "   {label}: {id} {pi}: {} {} ({}), {} {} ({})",
            a.id,
            a.status,
            a.stripe_transfer_id.as_deref().unwrap_or(""),
            b.id,
            b.status,
            b.failure_code.as_deref().unwrap_or("")
        )?;
        payments.push((label, id, a.id.clone(), b.id.clone()));
    }

    writeln!(
        out,
        "4. Money back: reverse one transfer and refund its share; refund a parked share"
    )?;
    let (_, available_id, available_ready, available_unready) = &payments[1];
    run.ops(
        out,
        &[
            "refund",
            available_ready,
            "--reverse-transfer",
            "--yes",
            "--actor",
            ACTOR,
            "--reason",
            "e2e: reverse a transfer and refund the donor's share",
        ],
    )
    .await?;
    run.ops(
        out,
        &[
            "refund",
            available_unready,
            "--yes",
            "--actor",
            ACTOR,
            "--reason",
            "e2e: refund a parked share",
        ],
    )
    .await?;
    // A transferred share stays TRANSFERRED (its transfer was made; the reversal is its own record); a parked one
    // ends REFUNDED. Settled: no reversal still to make, no refunded money without its cover.
    run.wait(available_id, "the reversal and both refunds settled", |p, m| {
        settled(p, m)
            && p.allocations
                .iter()
                .any(|a| a.id == *available_unready && a.status == AllocationStatus::Refunded)
            && m.reversed_cents > 0
    })
    .await?;
    let m = money_report(&mut *run.pool.acquire().await?, available_id).await?;
    writeln!(
        out,
        "   {available_id}: reversed {}, refunded {} to the donor, parked {}",
        m.reversed_cents, m.refunded_cents, m.parked_cents
    )?;

    writeln!(out, "5. The second account is onboarded; its parked shares are retried")?;
    run.stripe.onboard(&unready).await?;
    run.stripe.wait_transfers_active(&unready, run.wait_ms_max).await?;
    writeln!(out, "   {unready}: transfers active")?;
    for (label, id, _, parked) in [&payments[0], &payments[2]] {
        let p = run.wait(id, "a settled state", settled).await?;
        let by = if share(&p, unready_link)?.status == AllocationStatus::Parked {
            let retried = run
                .ops(
                    out,
                    &[
                        "retry",
                        parked,
                        "--wait",
                        "--wait-timeout",
                        "120s",
                        "--yes",
                        "--actor",
                        ACTOR,
                        "--reason",
                        "e2e: the account can receive transfers now",
                    ],
                )
                .await;
            match retried {
                Ok(_) => "ops retry",
                Err(e) => {
                    // Between the look and the command splitpay may have retried it itself (the accounts sweep asks
                    // Stripe about accounts with parked shares, and a polled account.updated does the same):
                    // `ops retry` then refuses a share that is no longer PARKED. Only that is no failure.
                    let now = run.wait(id, "the share's state now", |_, _| true).await?;
                    if share(&now, unready_link)?.status == AllocationStatus::Parked {
                        return Err(e);
                    }
                    writeln!(out, "   {parked}: retried by splitpay itself meanwhile")?;
                    "splitpay (accounts sweep or account.updated)"
                }
            }
        } else {
            // A forwarder sent account.updated and splitpay retried it itself (SPLITPAY_AUTO_RETRY_PARKED).
            "account.updated"
        };
        let p = run
            .wait(id, "the retried share TRANSFERRED", |p, m| {
                p.allocations.iter().all(|a| a.status == AllocationStatus::Transferred) && settled(p, m)
            })
            .await?;
        let b = share(&p, unready_link)?;
        writeln!(
            out,
            "   {label}: {} {} on generation {} ({})",
            b.id,
            b.status,
            b.generation,
            b.stripe_transfer_id.as_deref().unwrap_or("")
        )?;
        summary.retried.push(RetryLine {
            split_allocation_id: parked.clone(),
            by: by.to_owned(),
        });
    }

    writeln!(
        out,
        "6. Each result checked through Stripe's API against splitpay's records"
    )?;
    let mut check = Checker::default();
    for (label, id, _, _) in &payments {
        let line = checks::payment(&mut check, &run.stripe, &run.pool, label, id, &accounts).await?;
        writeln!(
            out,
            "   {label}: {id} agrees with Stripe; conserved to the cent (platform keeps {})",
            line.platform_retained_cents
        )?;
        summary.payments.push(line);
        summary.checks_passed = check.passed;
    }
    Ok(())
}
