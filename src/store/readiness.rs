//! Whether a recipient's connected account can receive transfers, as Stripe's `account.updated` events tell it:
//! the `transfers_active` flag and the link's `charges_enabled` on every link of that account, applied in the order
//! Stripe made the events (an older event never overwrites newer state), and the shares parked for account reasons
//! that become retryable when the account is fixed. `charges_enabled` is Stripe's word once an event has come (the
//! platform sets it when it links the account; intake refuses a link without it); `transfers_active` decides
//! whether parked shares are retried.

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
/// turns `transfers_active` from false to true remembers `event_id` in `transfers_activated_by`.
pub async fn apply_account_flags(
    conn: &mut PgConnection,
    account_id: &str,
    flags: AccountFlags,
    created: DateTime<Utc>,
    event_id: &str,
    authoritative: bool,
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
                transfers_activated_by = CASE WHEN NOT transfers_active AND $3 THEN $4 ELSE transfers_activated_by END,
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
