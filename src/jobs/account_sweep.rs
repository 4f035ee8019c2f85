//! The accounts sweep: recipients who finished onboarding while their `account.updated` webhook was lost.
//!
//! Stripe tells splitpay that a connected account can receive transfers only through the Connect endpoint's
//! `account.updated`, and Connect events are not in the platform's event list that the events sweep reads
//! ([`super::event_sweep`]). So without this sweep, a lost webhook would leave the account's parked shares PARKED
//! until an operator ran `ops retry`. Each tick (on the reconcile-pending tick), it claims a bounded number of
//! accounts whose links hold shares parked for account reasons that no event retried
//! ([`crate::store::readiness::claim_accounts_to_check`]: least recently asked first, each at most once per
//! `SPLITPAY_ACCOUNT_CHECK_INTERVAL`, one replica per account), and asks Stripe for each (`GET /v1/accounts/:id`,
//! one request of the shared budget):
//! - it can receive transfers: what Stripe answered goes through the webhook's own path, as an `account.updated`
//!   event put in the inbox by the webhook ingress ([`ingest_event`]: the inbox row and its processing job in one
//!   transaction, deduplicated by id) with `created` = the database's clock before the ask, less a second, and an id Stripe never makes
//!   ([`SWEEP_EVENT_PREFIX`]`<account>_<unix secs>`). Its processing ([`super::accounts::account_updated`]) orders it
//!   against Stripe's own events by `created` (a late real webhook, older, changes nothing; one of the same second
//!   that disagrees makes it ask Stripe again), retries the parked shares in batches with actor `system`, and two
//!   events retrying one share start one generation (the compare-and-set of [`super::accounts::apply_retry`]);
//! - it cannot (not onboarded, deleted, not connected to the platform): nothing changes but the checked time, so
//!   the account is asked again after the interval (a deleted account's shares stay parked, for a refund);
//! - Stripe could not be asked: logged and counted; the account is asked again after the interval.
//!
//! With `SPLITPAY_AUTO_RETRY_PARKED=0`, the sweep still feeds what Stripe says of accounts whose links say they
//! cannot receive transfers (the flags, `charges_enabled` included, are refreshed as a webhook would), and their
//! processing retries nothing; shares parked at an account whose link already says it can are not looked at. When
//! auto-retry is turned on again, those are the ones the sweep then retries.

use serde_json::{json, Value};

use super::accounts::{readiness, Readiness};
use crate::app::AppContext;
use crate::http::webhooks::{ingest_event, Ingested};
use crate::store::readiness::{claim_accounts_to_check, SWEEP_EVENT_PREFIX};
use crate::store::StoreError;
use crate::stripe::AccountInfo;

/// Accounts one tick asks Stripe about at most; the next tick takes the rest, least recently asked first.
pub const ACCOUNTS_PER_TICK_MAX: i64 = 50;

/// How one sweep paces itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccountSweepOptions {
    /// An account is asked at most once per this.
    pub interval_ms: u64,
    /// Accounts asked at most in this pass.
    pub limit: i64,
}

impl AccountSweepOptions {
    /// The deployment's interval and the per-tick bound.
    pub fn of(ctx: &AppContext) -> Self {
        Self {
            interval_ms: ctx.distribution.reconcile.account_check_interval_ms,
            limit: ACCOUNTS_PER_TICK_MAX,
        }
    }
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct AccountSweepReport {
    /// Accounts asked about at Stripe.
    pub checked: Vec<String>,
    /// The `account.updated` events put in the inbox for accounts Stripe says can receive transfers.
    pub ingested: Vec<String>,
    /// Accounts Stripe says can receive transfers.
    pub ready: u64,
    /// Accounts Stripe says cannot receive transfers (yet).
    pub not_ready: u64,
    /// Accounts Stripe could not be asked about this time, or whose event could not be put in the inbox.
    pub errors: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AccountSweepError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// One pass at the deployment's pacing.
pub async fn sweep_accounts(ctx: &AppContext) -> Result<AccountSweepReport, AccountSweepError> {
    sweep_accounts_with(ctx, AccountSweepOptions::of(ctx)).await
}

/// One pass: claims the accounts due, then asks Stripe about each and feeds those that can receive transfers
/// through the webhook's path. One account's failure (Stripe, the inbox) is logged and the pass goes on.
pub async fn sweep_accounts_with(
    ctx: &AppContext,
    opts: AccountSweepOptions,
) -> Result<AccountSweepReport, AccountSweepError> {
    let accounts = claim_accounts_to_check(
        &mut *ctx.pool.acquire().await?,
        opts.interval_ms as f64 / 1_000.0,
        ctx.distribution.auto_retry_parked,
        opts.limit.max(1),
    )
    .await?;
    let mut report = AccountSweepReport::default();
    for account_id in accounts {
        // The event's `created`: the database's clock, read before Stripe is asked, less a second (review): an event
        // Stripe makes after this answer is then never older than the one made from it, and a worker's own clock
        // plays no part. Stripe's clock may still differ from the database's by a little; either way the flags heal
        // at the next event or check.
        let asked_at: i64 = sqlx::query_scalar("SELECT extract(epoch FROM now())::bigint - 1")
            .fetch_one(&ctx.pool)
            .await?;
        let ready = readiness(ctx.gateway.as_ref(), &account_id).await;
        report.checked.push(account_id.clone());
        match ready {
            Readiness::Ready(info) => {
                crate::observability::account_checked("ready");
                report.ready += 1;
                let event = account_updated_event(&info, asked_at);
                let event_id = event["id"].as_str().unwrap_or_default().to_owned();
                match ingest_event(&ctx.pool, event).await {
                    Ok(Ingested::Stored) => {
                        tracing::warn!(
                            account_id, event_id,
                            "a connected account can receive transfers but no account.updated retried its parked shares \
                             (its webhook was lost?): fed through the webhook's path"
                        );
                        report.ingested.push(event_id);
                    }
                    // Another replica asked in the same second and put the same event there.
                    Ok(Ingested::Duplicate) => {}
                    Err(e) => {
                        tracing::warn!(account_id, error = %e, "accounts sweep: could not put the event in the inbox");
                        report.errors += 1;
                    }
                }
            }
            Readiness::NotReady(why) => {
                crate::observability::account_checked("not_ready");
                tracing::info!(account_id, why, "accounts sweep: still cannot receive transfers");
                report.not_ready += 1;
            }
            Readiness::Unknown(why) => {
                crate::observability::account_checked("error");
                tracing::warn!(
                    account_id,
                    why,
                    "accounts sweep: Stripe could not be asked; asked again next interval"
                );
                report.errors += 1;
            }
        }
    }
    crate::observability::accounts_sweep_ran(&report);
    Ok(report)
}

/// The `account.updated` event Stripe would have sent for `account` as retrieved, made at `created` (unix seconds),
/// shaped like Stripe's (the fields [`super::accounts::account_updated`] reads: `data.object.id`,
/// `capabilities.transfers`, `charges_enabled`), with an id Stripe never makes.
pub fn account_updated_event(account: &AccountInfo, created: i64) -> Value {
    json!({
        "id": format!("{SWEEP_EVENT_PREFIX}{}_{created}", account.id),
        "object": "event",
        "type": "account.updated",
        "created": created,
        // Only recorded in the inbox; an account object does not say which mode its key is in.
        "livemode": false,
        "account": account.id,
        "api_version": null,
        "pending_webhooks": 0,
        "request": { "id": null, "idempotency_key": null },
        "data": { "object": {
            "id": account.id,
            "object": "account",
            "charges_enabled": account.charges_enabled,
            "payouts_enabled": account.payouts_enabled,
            "capabilities": { "transfers": account.transfers_capability },
            "requirements": {
                "currently_due": account.requirements_due,
                "disabled_reason": account.disabled_reason,
            },
        } },
        // Not Stripe's: says where the event came from, for an operator reading the inbox.
        "splitpay_source": "accounts_sweep",
    })
}
