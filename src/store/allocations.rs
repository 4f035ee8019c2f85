//! Split allocations (one recipient's share of a payment): reads, the context their events and transfers need, and
//! their transitions. Entering TRANSFERRING starts a new transfer generation with its frozen parameters; leaving it
//! closes that generation's attempt. Runs inside the caller's transaction, like every transition.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::payments::{get_split_payment_row, SplitPaymentRow};
use super::records::insert_outbox_events;
use super::transfer_attempts::TransferAttemptRow;
use super::{corrupt, forbidden, StoreError, Tx};
use crate::domain::ids::{transfer_idempotency_key, SplitAllocationId, SplitPaymentId};
use crate::domain::state::{AllocationEvent, AllocationStatus, Transition};
use crate::events::OutboundEvent;

/// `failure_code` of an allocation parked because its retry window ended and a lookup that succeeded proved that
/// Stripe holds no transfer of its generation.
pub const RETRY_WINDOW_ELAPSED: &str = "retry_window_elapsed";
/// `failure_code` of an allocation parked because its generation drew on the platform's available balance (no
/// `source_transaction`) and found it short until its retry window ended.
pub const BALANCE_INSUFFICIENT: &str = "balance_insufficient";
/// `failure_code` of an allocation parked because the fees left nothing to transfer (an operator refunds it).
pub const NET_AMOUNT_ZERO: &str = "net_amount_zero";

/// Locks every share of `payment`, in position order, in the caller's transaction. Every path that locks more than
/// one share, or a share and then a refund row, goes through here first (a refund applied, a dispute's withdrawal,
/// an `ops refund` Stripe refused): one order for all, so two of them wait for each other instead of deadlocking
/// (refund row → share against share → refund row did, before). Returns the shares' gross amounts in that order
/// (what distribution splits the fees over), in the same statement.
pub async fn lock_payment_shares(conn: &mut PgConnection, payment: &str) -> Result<Vec<i64>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT gross_amount_cents FROM split_allocations WHERE split_payment_id = $1 ORDER BY position FOR UPDATE",
    )
    .bind(payment)
    .fetch_all(conn)
    .await?)
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SplitAllocationRow {
    pub id: String,
    pub split_payment_id: String,
    pub recommendation_allocation_id: String,
    pub recipient_org_account_link_id: String,
    pub position: i32,
    pub gross_amount_cents: i64,
    pub fee_share_cents: Option<i64>,
    pub net_amount_cents: Option<i64>,
    #[sqlx(try_from = "String")]
    pub status: AllocationStatus,
    pub generation: i32,
    pub idempotency_key: Option<String>,
    pub stripe_transfer_id: Option<String>,
    pub attempts: i32,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub failure_code: Option<String>,
    pub failure_message: Option<String>,
    pub parked_at: Option<DateTime<Utc>>,
    pub transferred_at: Option<DateTime<Utc>>,
    pub refunded_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Set while TRANSFERRING when the retry window ended without proof either way: shown to operators, retried.
    pub unresolved_at: Option<DateTime<Utc>>,
    /// A reversal of a won dispute's withdrawal was found made while this share's transfer was in flight (or
    /// parked): once TRANSFERRED again, the share is sent what it is owed ([`super::disputes::resend_if_marked`]).
    pub resend_owed_at: Option<DateTime<Utc>>,
}

pub async fn get_split_allocation(
    conn: &mut PgConnection,
    id: &SplitAllocationId,
) -> Result<SplitAllocationRow, StoreError> {
    allocation_by(conn, "SELECT * FROM split_allocations WHERE id = $1", id).await
}

/// As [`get_split_allocation`], locking the row for the caller's transaction.
pub async fn get_split_allocation_for_update(
    conn: &mut PgConnection,
    id: &SplitAllocationId,
) -> Result<SplitAllocationRow, StoreError> {
    allocation_by(conn, "SELECT * FROM split_allocations WHERE id = $1 FOR UPDATE", id).await
}

async fn allocation_by(
    conn: &mut PgConnection,
    sql: &'static str,
    id: &SplitAllocationId,
) -> Result<SplitAllocationRow, StoreError> {
    sqlx::query_as::<_, SplitAllocationRow>(sql)
        .bind(id.as_str())
        .fetch_optional(conn)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            what: "split allocation",
            id: id.to_string(),
        })
}

/// An allocation with what its events and its transfer need: the payment and the recipient's link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocationContext {
    pub allocation: SplitAllocationRow,
    pub payment: SplitPaymentRow,
    pub recipient_organisation_id: String,
    pub recipient_org_name: String,
    pub destination_account_id: String,
}

pub async fn allocation_context(
    conn: &mut PgConnection,
    id: &SplitAllocationId,
) -> Result<AllocationContext, StoreError> {
    let allocation = get_split_allocation(conn, id).await?;
    context_of(conn, allocation).await
}

/// The context of an allocation row the caller has read (locked, say): its payment and its recipient's link.
pub async fn context_of(
    conn: &mut PgConnection,
    allocation: SplitAllocationRow,
) -> Result<AllocationContext, StoreError> {
    let payment_id = SplitPaymentId::parse(&allocation.split_payment_id)
        .map_err(|e| corrupt("split allocation", &allocation.id, e))?;
    let payment = get_split_payment_row(conn, &payment_id).await?;
    let (recipient_organisation_id, recipient_org_name, destination_account_id): (String, String, String) =
        sqlx::query_as(
            "SELECT recipient_organisation_id, recipient_org_name, stripe_connect_account_id
               FROM recipient_account_links WHERE id = $1",
        )
        .bind(&allocation.recipient_org_account_link_id)
        .fetch_one(&mut *conn)
        .await?;
    Ok(AllocationContext {
        allocation,
        payment,
        recipient_organisation_id,
        recipient_org_name,
        destination_account_id,
    })
}

/// Starts the first transfer generation of several PENDING shares of `payment` that this transaction has locked and
/// read (`shares`), due at `lease_ends`: what [`transition_locked_allocation`] does for each (the state machine, the
/// amount less what refunds took, the frozen parameters on the attempt row, the guarded move), in four statements
/// for them all instead of three per share plus three reads of what the steps need (issue 11). Returns each started
/// share's context and attempt row, in the order given. Only for PENDING shares: one in any other status (where the
/// single transition would answer `Unchanged` or refuse), one with nothing left to transfer, or one that moved since
/// it was read is an error for the whole call, and the caller's transaction must not commit.
pub async fn start_first_generations(
    tx: &mut Tx<'_>,
    payment: &SplitPaymentRow,
    shares: &[&SplitAllocationRow],
    lease_ends: DateTime<Utc>,
) -> Result<Vec<(AllocationContext, TransferAttemptRow)>, StoreError> {
    if shares.is_empty() {
        return Ok(Vec::new());
    }
    let mut nets = Vec::with_capacity(shares.len());
    for share in shares {
        let next = match share.status.apply(AllocationEvent::TransferStarted) {
            Ok(Transition::To(next)) => next,
            Ok(Transition::Unchanged) | Err(_) => {
                return Err(StoreError::Invalid(format!(
                    "split allocation '{}' is {}, not a share whose first generation can start",
                    share.id, share.status
                )))
            }
        };
        debug_assert_eq!(next, AllocationStatus::Transferring);
        if share.split_payment_id != payment.id || share.status != AllocationStatus::Pending {
            return Err(StoreError::Invalid(format!(
                "split allocation '{}' is not a PENDING share of payment '{}'",
                share.id, payment.id
            )));
        }
        let net = share
            .net_amount_cents
            .ok_or_else(|| StoreError::Invalid(format!("split allocation '{}' has no net amount yet", share.id)))?;
        nets.push((share.id.as_str(), net));
    }
    // What refunds already took from each share is not sent (as for a single start).
    let amounts = super::refund_terms::outstanding_cents_of(tx, &nets).await?;
    if let Some((id, _)) = nets.iter().zip(&amounts).find(|(_, &a)| a <= 0).map(|(n, _)| n) {
        return Err(StoreError::Invalid(format!(
            "split allocation '{id}' has no positive net amount to transfer"
        )));
    }
    let ids: Vec<&str> = shares.iter().map(|a| a.id.as_str()).collect();
    let prior: Vec<i32> = shares.iter().map(|a| a.generation).collect();
    let generations: Vec<i32> = prior.iter().map(|g| g + 1).collect();
    let keys = transfer_keys(&ids, &generations)?;
    let mut attempts = insert_first_attempts(tx, Caller::Alone, &ids, &generations, &keys, &amounts).await?;
    if attempts.len() != shares.len() {
        return Err(StoreError::Invalid(format!(
            "payment '{}' has no charge to transfer from",
            payment.id
        )));
    }
    // The moves, guarded by status and generation as a single transition's are; the columns it sets entering
    // TRANSFERRING from PENDING.
    let moved: Vec<SplitAllocationRow> = sqlx::query_as(
        "UPDATE split_allocations a
            SET status = 'TRANSFERRING', generation = u.generation, idempotency_key = u.key, next_attempt_at = $5,
                unresolved_at = NULL, attempts = 0, parked_at = NULL, updated_at = now()
           FROM unnest($1::text[], $2::int4[], $3::int4[], $4::text[]) AS u (id, prior, generation, key)
          WHERE a.id = u.id AND a.status = 'PENDING' AND a.generation = u.prior
         RETURNING a.*",
    )
    .bind(&ids)
    .bind(&prior)
    .bind(&generations)
    .bind(&keys)
    .bind(lease_ends)
    .fetch_all(&mut **tx)
    .await?;
    if moved.len() != shares.len() {
        return Err(StoreError::LostRace {
            what: "split allocation",
            id: ids.join(","),
            expected: AllocationStatus::Pending.to_string(),
        });
    }
    metrics::counter!("splitpay_split_allocation_transitions_total", "to" => AllocationStatus::Transferring.as_str())
        .increment(moved.len() as u64);
    let link_ids: Vec<&str> = moved.iter().map(|a| a.recipient_org_account_link_id.as_str()).collect();
    let links: std::collections::HashMap<String, (String, String, String)> =
        sqlx::query_as::<_, (String, String, String, String)>(
            "SELECT id, recipient_organisation_id, recipient_org_name, stripe_connect_account_id
               FROM recipient_account_links WHERE id = ANY($1)",
        )
        .bind(&link_ids)
        .fetch_all(&mut **tx)
        .await?
        .into_iter()
        .map(|(id, org, name, account)| (id, (org, name, account)))
        .collect();
    let mut moved: std::collections::HashMap<String, SplitAllocationRow> =
        moved.into_iter().map(|a| (a.id.clone(), a)).collect();
    let mut out = Vec::with_capacity(shares.len());
    for id in ids {
        let (allocation, attempt) = match (moved.remove(id), attempts.remove(id)) {
            (Some(a), Some(t)) => (a, t),
            _ => {
                return Err(StoreError::NotFound {
                    what: "started split allocation",
                    id: id.to_owned(),
                })
            }
        };
        let (recipient_organisation_id, recipient_org_name, destination_account_id) = links
            .get(&allocation.recipient_org_account_link_id)
            .cloned()
            .ok_or_else(|| StoreError::NotFound {
                what: "recipient account link",
                id: allocation.id.clone(),
            })?;
        out.push((
            AllocationContext {
                allocation,
                payment: payment.clone(),
                recipient_organisation_id,
                recipient_org_name,
                destination_account_id,
            },
            attempt,
        ));
    }
    Ok(out)
}

/// The transfer idempotency key of generation `generations[i]` of share `ids[i]`.
pub fn transfer_keys(ids: &[&str], generations: &[i32]) -> Result<Vec<String>, StoreError> {
    ids.iter()
        .zip(generations)
        .map(|(id, generation)| {
            let id = SplitAllocationId::parse(id).map_err(|e| StoreError::Invalid(e.to_string()))?;
            Ok(transfer_idempotency_key(&id, *generation))
        })
        .collect()
}

/// Where [`insert_first_attempts`] runs: in the start batch, under its plan settings, or alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// The start batch (`store::generic_plans`): the statement is prepared and kept on the connection, and its
    /// generic plan is made under the batch's settings.
    Batch,
    /// Anywhere else: the statement is not kept. Kept, PostgreSQL would make its generic plan here, under the
    /// defaults (after five runs, to compare costs), and a batch on the same connection would reuse that plan as it
    /// stands instead of making its own: a read of `split_allocations` through, on a young table (helper 62,
    /// reproduced with psql).
    Alone,
}

/// The statement of [`insert_first_attempts`].
pub const FIRST_ATTEMPTS_SQL: &str = "INSERT INTO transfer_attempts
            (split_allocation_id, generation, idempotency_key, destination_account_id, amount_cents, currency,
             source_transaction, transfer_group, metadata)
         SELECT a.id, u.generation, u.key, l.stripe_connect_account_id, u.amount_cents, p.currency, p.charge_id,
                p.transfer_group,
                jsonb_build_object('split_payment_id', p.id, 'split_allocation_id', a.id,
                                   'generation', u.generation::text)
           FROM unnest($1::text[], $2::int4[], $3::text[], $4::int8[]) AS u (id, generation, key, amount_cents)
           JOIN split_allocations a ON a.id = u.id
           JOIN recipient_account_links l ON l.id = a.recipient_org_account_link_id
           JOIN split_payments p ON p.id = a.split_payment_id
          WHERE p.charge_id IS NOT NULL
         RETURNING split_allocation_id, generation, idempotency_key, destination_account_id, amount_cents, currency,
                   source_transaction, transfer_group, metadata, started_at, finished_at, outcome, stripe_transfer_id,
                   key_attempt";

/// The frozen parameters of first generations (`generations[i]` of share `ids[i]`, sending `amounts_cents[i]` under
/// `keys[i]`), in the caller's transaction: a first generation is funded by the payment's charge
/// (`source_transaction`), so a share of a payment without a recorded charge gets no row. By share id.
pub async fn insert_first_attempts(
    tx: &mut Tx<'_>,
    caller: Caller,
    ids: &[&str],
    generations: &[i32],
    keys: &[String],
    amounts_cents: &[i64],
) -> Result<std::collections::HashMap<String, TransferAttemptRow>, StoreError> {
    Ok(sqlx::query_as::<_, TransferAttemptRow>(FIRST_ATTEMPTS_SQL)
        .persistent(caller == Caller::Batch)
        .bind(ids)
        .bind(generations)
        .bind(keys)
        .bind(amounts_cents)
        .fetch_all(&mut **tx)
        .await?
        .into_iter()
        .map(|t| (t.split_allocation_id.clone(), t))
        .collect())
}

/// Data recorded with an allocation transition (`None` keeps what is stored).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllocationPatch {
    pub stripe_transfer_id: Option<String>,
    /// With `TransferSucceeded`: the generation Stripe's transfer names in its metadata. A transfer of another
    /// generation than the allocation's current one is refused (`Invalid`): it is a discrepancy for an operator.
    pub transfer_generation: Option<i32>,
    pub failure_code: Option<String>,
    pub failure_message: Option<String>,
    pub next_attempt_at: Option<DateTime<Utc>>,
}

/// Moves a split allocation by `event` and writes `events` to the outbox, in the caller's transaction.
///
/// Entering TRANSFERRING (first attempt or an operator's retry) starts a new generation: the generation number,
/// its idempotency key and a `transfer_attempts` row (destination, amount, currency) are written here, so the
/// intent is committed before anyone calls Stripe. Leaving TRANSFERRING closes that attempt with its outcome.
pub async fn transition_allocation(
    tx: &mut Tx<'_>,
    id: &SplitAllocationId,
    event: AllocationEvent,
    patch: &AllocationPatch,
    events: &[OutboundEvent],
) -> Result<Transition<AllocationStatus>, StoreError> {
    let current = get_split_allocation_for_update(tx, id).await?;
    transition_locked_allocation(tx, &current, event, patch, events).await
}

/// [`transition_allocation`] of a share this transaction has already locked and read (`current`, read `FOR UPDATE`,
/// or after a lock of it, in this same transaction): one statement less on the hot paths (distribution, recording
/// a transfer). Should `current` be stale all the same, the `UPDATE`'s guard (status and generation) refuses it
/// (`LostRace`).
pub async fn transition_locked_allocation(
    tx: &mut Tx<'_>,
    current: &SplitAllocationRow,
    event: AllocationEvent,
    patch: &AllocationPatch,
    events: &[OutboundEvent],
) -> Result<Transition<AllocationStatus>, StoreError> {
    let id = &SplitAllocationId::parse(&current.id).map_err(|e| StoreError::Invalid(e.to_string()))?;
    let from = current.status;
    let next = match from.apply(event).map_err(|e| forbidden(e, id.as_str()))? {
        Transition::Unchanged => return Ok(Transition::Unchanged),
        Transition::To(next) => next,
    };

    let mut generation = current.generation;
    let mut idempotency_key = current.idempotency_key.clone();
    match next {
        AllocationStatus::Transferring => {
            // What refunds already took from the share (before its transfer, from its parked net, or by reversal)
            // is not sent, nor what Stripe already holds for it (a won dispute's new generation sends only what
            // the withdrawal took back).
            let net_cents = match current.net_amount_cents {
                Some(net) => Some(super::refunds::outstanding_cents(tx, id.as_str(), net).await?),
                None => None,
            };
            let net_cents = net_cents.filter(|&n| n > 0).ok_or_else(|| {
                StoreError::Invalid(format!(
                    "split allocation '{id}' has no positive net amount to transfer"
                ))
            })?;
            generation += 1;
            let key = transfer_idempotency_key(id, generation);
            // A later generation (a won dispute's, or an operator's retry) draws on the platform's available balance,
            // never on the charge, when the charge cannot be relied on to fund it: an earlier generation's transfer
            // already used the share's room on it (Stripe caps the transfers from one charge at its amount; whether
            // a reversal frees that room is UNCONFIRMED), or a dispute withdrew the charge's funds (whether Stripe
            // lets a transfer draw on a disputed charge is UNCONFIRMED). Such a generation can be refused
            // `balance_insufficient`: it then moves to its next key attempt and is parked after its retry window.
            let without_source = event != AllocationEvent::TransferStarted
                && sqlx::query_scalar::<_, bool>(
                    "SELECT EXISTS (SELECT 1 FROM transfer_attempts
                                     WHERE split_allocation_id = $1 AND outcome = 'TRANSFERRED')
                         OR EXISTS (SELECT 1 FROM disputes d JOIN split_allocations a ON a.split_payment_id = d.split_payment_id
                                     WHERE a.id = $1 AND d.withdrawn_at IS NOT NULL)",
                )
                .bind(id.as_str())
                .fetch_one(&mut **tx)
                .await?;
            // The generation's parameters, frozen here: destination (the link's account now), amount, currency,
            // source transaction, transfer group and metadata. Every attempt of this generation sends exactly these;
            // a link changed later only affects a new generation.
            let inserted = sqlx::query(
                "INSERT INTO transfer_attempts
                    (split_allocation_id, generation, idempotency_key, destination_account_id, amount_cents, currency,
                     source_transaction, transfer_group, metadata)
                 SELECT a.id, $2, $3, l.stripe_connect_account_id, $4, p.currency,
                        CASE WHEN $5 THEN NULL ELSE p.charge_id END, p.transfer_group,
                        jsonb_build_object('split_payment_id', p.id, 'split_allocation_id', a.id,
                                           'generation', $2::text)
                   FROM split_allocations a
                   JOIN recipient_account_links l ON l.id = a.recipient_org_account_link_id
                   JOIN split_payments p ON p.id = a.split_payment_id
                  WHERE a.id = $1 AND p.charge_id IS NOT NULL",
            )
            .bind(id.as_str())
            .bind(generation)
            .bind(&key)
            .bind(net_cents)
            .bind(without_source)
            .execute(&mut **tx)
            .await?;
            if inserted.rows_affected() != 1 {
                return Err(StoreError::Invalid(format!(
                    "split allocation '{id}': its payment has no charge to transfer from"
                )));
            }
            idempotency_key = Some(key);
        }
        AllocationStatus::Transferred => {
            let transfer_id = patch.stripe_transfer_id.as_deref().ok_or_else(|| {
                StoreError::Invalid(format!("split allocation '{id}': a transfer needs its transfer id"))
            })?;
            if let Some(g) = patch.transfer_generation.filter(|&g| g != generation) {
                return Err(StoreError::Invalid(format!(
                    "split allocation '{id}' is at generation {generation}; transfer {transfer_id} is of generation {g}"
                )));
            }
            // From TRANSFERRING or from PARKED (Stripe's word wins): the generation's attempt ends TRANSFERRED.
            sqlx::query(
                "UPDATE transfer_attempts
                    SET finished_at = now(), outcome = 'TRANSFERRED', stripe_transfer_id = $3,
                        failure_code = NULL, failure_message = NULL
                  WHERE split_allocation_id = $1 AND generation = $2",
            )
            .bind(id.as_str())
            .bind(generation)
            .bind(transfer_id)
            .execute(&mut **tx)
            .await?;
        }
        AllocationStatus::Parked if from == AllocationStatus::Transferring => {
            let outcome = match patch.failure_code.as_deref() {
                Some(RETRY_WINDOW_ELAPSED | BALANCE_INSUFFICIENT) => "WINDOW_ELAPSED",
                _ => "TERMINAL",
            };
            sqlx::query(
                "UPDATE transfer_attempts
                    SET finished_at = now(), outcome = $3, failure_code = $4, failure_message = $5
                  WHERE split_allocation_id = $1 AND generation = $2",
            )
            .bind(id.as_str())
            .bind(generation)
            .bind(outcome)
            .bind(&patch.failure_code)
            .bind(&patch.failure_message)
            .execute(&mut **tx)
            .await?;
        }
        _ => {}
    }

    let updated = sqlx::query(
        "UPDATE split_allocations
            SET status = $3,
                generation = $4,
                idempotency_key = $5,
                -- Leaving TRANSFERRED (a won dispute's new generation): the earlier transfer stays on its attempt row.
                stripe_transfer_id = CASE WHEN $2 = 'TRANSFERRED' THEN $6 ELSE coalesce($6, stripe_transfer_id) END,
                failure_code = coalesce($7, failure_code),
                failure_message = coalesce($8, failure_message),
                next_attempt_at = CASE WHEN $3 = 'TRANSFERRING' THEN coalesce($9, now()) ELSE NULL END,
                unresolved_at = NULL,
                attempts = CASE WHEN $3 = 'TRANSFERRING' AND status <> 'TRANSFERRING' THEN 0 ELSE attempts END,
                parked_at = CASE WHEN $3 = 'PARKED' THEN now() ELSE NULL END,
                transferred_at = CASE WHEN $3 = 'TRANSFERRED' THEN now() ELSE transferred_at END,
                refunded_at = CASE WHEN $3 = 'REFUNDED' THEN now() ELSE refunded_at END,
                updated_at = now()
          WHERE id = $1 AND status = $2 AND generation = $10",
    )
    .bind(id.as_str())
    .bind(from.as_str())
    .bind(next.as_str())
    .bind(generation)
    .bind(&idempotency_key)
    .bind(&patch.stripe_transfer_id)
    .bind(&patch.failure_code)
    .bind(&patch.failure_message)
    .bind(patch.next_attempt_at)
    // The row the transition was decided on: a stale one (another status or generation) is refused, not written.
    .bind(current.generation)
    .execute(&mut **tx)
    .await?;
    if updated.rows_affected() != 1 {
        return Err(StoreError::LostRace {
            what: "split allocation",
            id: id.to_string(),
            expected: from.to_string(),
        });
    }
    insert_outbox_events(tx, events).await?;
    metrics::counter!("splitpay_split_allocation_transitions_total", "to" => next.as_str()).increment(1);
    Ok(Transition::To(next))
}
