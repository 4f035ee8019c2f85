//! Whether a recipient's connected account can receive transfers, as Stripe's `account.updated` events tell it:
//! the `transfers_active` flag and the link's `charges_enabled` on every link of that account, applied in the order
//! Stripe made the events (an older event never overwrites newer state), and the shares parked for account reasons
//! that become retryable when the account is fixed. `charges_enabled` is Stripe's word once an event has come (the
//! platform sets it when it links the account). A transfers-only account (what splitpay needs of a recipient) has
//! it false at Stripe for good, so it refuses no donation ([`super::catalog`]); `transfers_active` decides whether
//! parked shares are retried.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::StoreError;

/// Failure codes a transfer is parked with when the recipient's account is the reason (missing `transfers`
/// capability, an inactive or deleted account, no such destination). Fixing the account makes them retryable;
/// other reasons (`net_amount_zero`, `retry_window_elapsed`, amounts Stripe refuses) are left to an operator.
pub const ACCOUNT_PARK_CODES: &[&str] = &[
    "insufficient_capabilities_for_transfer",
    "account_invalid",
    "resource_missing",
];

/// How the ids of the `account.updated` events the accounts sweep puts in the inbox begin (`evt_sweep_acct_<account>_
/// <unix secs>`). Stripe's own event ids are `evt_` and letters and digits, never another `_`, so they cannot collide;
/// and the webhook ingress only stores events whose signature it verified, so nobody else can make one.
pub const SWEEP_EVENT_PREFIX: &str = "evt_sweep_acct_";

/// What one `account.updated` says about the account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccountFlags {
    pub charges_enabled: bool,
    pub transfers_active: bool,
}

/// What applying an `account.updated` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// No link names this account: nothing to do.
    NoLinks,
    /// Applied (`links` rows changed; `activated`: this event turned `transfers_active` from false to true).
    Applied { links: u64, activated: bool },
    /// Every link already holds newer (or the same) state: nothing changed.
    Stale,
    /// A link holds other flags from an event of the very same second: the order cannot be told from `created`.
    /// The caller asks Stripe for the account now and applies that answer as authoritative.
    Tie,
}

/// Applies `flags`, from an event Stripe created at `created`, to every link of `account_id`, in the caller's
/// transaction. A link whose last applied event is newer is left alone; one of the same second with other flags is
/// a [`Applied::Tie`] unless `authoritative` (the flags come from retrieving the account just now). The link that
/// turns `transfers_active` from false to true remembers `event_id` in `transfers_activated_by`; with
/// `claim_retry` (the accounts sweep's events, made because shares are parked that nothing retried), so does a link
/// that already said `transfers_active` and still does.
pub async fn apply_account_flags(
    conn: &mut PgConnection,
    account_id: &str,
    flags: AccountFlags,
    created: DateTime<Utc>,
    event_id: &str,
    authoritative: bool,
    claim_retry: bool,
) -> Result<Applied, StoreError> {
    let (links, ties): (i64, i64) = sqlx::query_as(
        "SELECT count(*),
                count(*) FILTER (WHERE account_event_created = $2
                                   AND (transfers_active, charges_enabled) IS DISTINCT FROM ($3, $4))
           FROM recipient_account_links WHERE stripe_connect_account_id = $1",
    )
    .bind(account_id)
    .bind(created)
    .bind(flags.transfers_active)
    .bind(flags.charges_enabled)
    .fetch_one(&mut *conn)
    .await?;
    if links == 0 {
        return Ok(Applied::NoLinks);
    }
    if ties > 0 && !authoritative {
        return Ok(Applied::Tie);
    }
    // The WHERE is re-checked on each row after any concurrent update of it commits, so two events racing for one
    // account leave the newer one's flags.
    let changed: Vec<(bool,)> = sqlx::query_as(
        "UPDATE recipient_account_links
            SET transfers_active = $3, charges_enabled = $6, account_event_created = $2,
                transfers_activated_by = CASE WHEN $3 AND (NOT transfers_active OR $7) THEN $4
                                              ELSE transfers_activated_by END,
                updated_at = now()
          WHERE stripe_connect_account_id = $1
            AND (account_event_created IS NULL OR account_event_created < $2
                 OR (account_event_created = $2 AND $5))
            AND (transfers_active, charges_enabled, account_event_created) IS DISTINCT FROM ($3, $6, $2)
         RETURNING transfers_activated_by IS NOT DISTINCT FROM $4",
    )
    .bind(account_id)
    .bind(created)
    .bind(flags.transfers_active)
    .bind(event_id)
    .bind(authoritative)
    .bind(flags.charges_enabled)
    .bind(claim_retry)
    .fetch_all(&mut *conn)
    .await?;
    if changed.is_empty() {
        // An event of the same second that disagrees may have committed between the tie check and this update
        // (two events processed at once): the update then skipped it, and only Stripe's answer can order them.
        let tied: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM recipient_account_links
                             WHERE stripe_connect_account_id = $1 AND account_event_created = $2
                               AND (transfers_active, charges_enabled) IS DISTINCT FROM ($3, $4))",
        )
        .bind(account_id)
        .bind(created)
        .bind(flags.transfers_active)
        .bind(flags.charges_enabled)
        .fetch_one(&mut *conn)
        .await?;
        return Ok(if tied && !authoritative {
            Applied::Tie
        } else {
            Applied::Stale
        });
    }
    Ok(Applied::Applied {
        links: changed.len() as u64,
        activated: changed.iter().any(|(a,)| *a),
    })
}

/// The account whose activation `event_id` applied, while the account still counts as active: its parked shares
/// are this event's to retry.
pub async fn activated_account(conn: &mut PgConnection, event_id: &str) -> Result<Option<String>, StoreError> {
    let row: Option<(String,)> = sqlx::query_as(
        "SELECT stripe_connect_account_id FROM recipient_account_links
          WHERE transfers_activated_by = $1 AND transfers_active LIMIT 1",
    )
    .bind(event_id)
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|(id,)| id))
}

/// Up to `limit` allocations of `account_id`'s links parked for account reasons before `parked_before` (the event's
/// arrival: a share parked again after it was retried with this event's knowledge is not taken again), oldest first.
pub async fn parked_for_account(
    conn: &mut PgConnection,
    account_id: &str,
    parked_before: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<String>, StoreError> {
    let codes: Vec<String> = ACCOUNT_PARK_CODES.iter().map(|c| (*c).to_owned()).collect();
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT a.id FROM split_allocations a
           JOIN recipient_account_links l ON l.id = a.recipient_org_account_link_id
          WHERE l.stripe_connect_account_id = $1 AND a.status = 'PARKED' AND a.failure_code = ANY($2)
            AND a.net_amount_cents > 0 AND a.parked_at < $4
          ORDER BY a.parked_at, a.id
          LIMIT $3",
    )
    .bind(account_id)
    .bind(&codes)
    .bind(limit)
    .bind(parked_before)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

/// Claims up to `limit` connected accounts for the accounts sweep to ask Stripe about, least recently asked first,
/// marking every due link of each as checked now (`account_checked_at`), in one statement: of two sweeps at once,
/// each account goes to one (the second's update re-reads the row after the first commits and finds it no longer
/// due). An account is due when one of its links was not asked within `interval_secs` and holds a share PARKED for
/// an account reason ([`ACCOUNT_PARK_CODES`], a net amount to send) that no event is retrying:
/// - the link says `transfers_active = false`: the account may have been fixed and its `account.updated` lost;
/// - the link says `transfers_active = true` (only with `auto_retry`): a share parked after the event that activated
///   the link (a transfer in flight meanwhile, or the account deactivated and reactivated with the first event
///   lost, when the second then changed no flag), or parked while auto-retry was off. Not while that event is still
///   being processed (its batches take the share), and not a share whose current generation the sweep itself
///   started (parked again though Stripe said the account could receive transfers: left to an operator, so
///   the sweep never retries one share every interval without end).
pub async fn claim_accounts_to_check(
    conn: &mut PgConnection,
    interval_secs: f64,
    auto_retry: bool,
    limit: i64,
) -> Result<Vec<String>, StoreError> {
    let codes: Vec<String> = ACCOUNT_PARK_CODES.iter().map(|c| (*c).to_owned()).collect();
    let swept_reason = format!("account.updated {}%", SWEEP_EVENT_PREFIX.replace('_', "\\_"));
    let rows: Vec<(String,)> = sqlx::query_as(
        "WITH due AS (
             SELECT l.stripe_connect_account_id AS account_id,
                    min(coalesce(l.account_checked_at, '-infinity')) AS checked_at
               FROM recipient_account_links l
              WHERE (l.account_checked_at IS NULL OR l.account_checked_at < now() - make_interval(secs => $1))
                AND (NOT l.transfers_active
                     OR ($3 AND NOT EXISTS (SELECT 1 FROM stripe_events e
                                             WHERE e.id = l.transfers_activated_by AND e.processed_at IS NULL)))
                AND EXISTS (
                    SELECT 1 FROM split_allocations a
                     WHERE a.recipient_org_account_link_id = l.id AND a.status = 'PARKED'
                       AND a.failure_code = ANY($2) AND a.net_amount_cents > 0
                       AND (NOT l.transfers_active
                            OR NOT EXISTS (SELECT 1 FROM ops_audit_log g
                                            WHERE g.target_type = 'split_allocation' AND g.target_id = a.id
                                              AND g.command = 'retry' AND g.reason LIKE $5
                                              AND g.details #>> '{parameters,plan,to_generation}'
                                                  = a.generation::text)))
              GROUP BY 1
              ORDER BY 2, 1
              LIMIT $4)
         UPDATE recipient_account_links l SET account_checked_at = now()
           FROM due
          WHERE l.stripe_connect_account_id = due.account_id
            AND (l.account_checked_at IS NULL OR l.account_checked_at < now() - make_interval(secs => $1))
         RETURNING l.stripe_connect_account_id",
    )
    .bind(interval_secs)
    .bind(&codes)
    .bind(auto_retry)
    .bind(limit)
    .bind(&swept_reason)
    .fetch_all(conn)
    .await?;
    let mut accounts: Vec<String> = rows.into_iter().map(|(id,)| id).collect();
    accounts.sort();
    accounts.dedup();
    Ok(accounts)
}
