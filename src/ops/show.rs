//! `splitpay ops show <ID>`: one split payment, found by any of its ids, ours (`spay_`, `salc_`, `don_`) or Stripe's
//! (`pi_`, `ch_`/`py_`, `tr_`), with everything an operator needs to decide: the payment, its allocations with their
//! transfer attempts, its donations, discrepancies found at Stripe, the events emitted about it, and the audit
//! entries about any of its ids. Read-only.

use std::io::Write;

use chrono::{DateTime, Utc};

use super::audit::{print_entries, AuditEntry};
use super::parked::clip;
use super::{age, money, OpsError, Outcome};
use crate::app::AppContext;
use crate::domain::ids::check_external_id;

/// What kind of id was given, from its prefix; `None` for an id no kind starts with.
fn kind_of(raw: &str) -> Option<&'static str> {
    let (prefix, rest) = raw.split_once('_')?;
    if rest.is_empty() {
        return None;
    }
    Some(match prefix {
        "spay" => "split payment",
        "salc" => "split allocation",
        "don" => "donation",
        "pi" => "PaymentIntent",
        "ch" | "py" => "charge",
        "tr" => "transfer",
        _ => return None,
    })
}

/// The split payments `raw` names (at most two, to tell an ambiguous id): one query per kind of id, each on an
/// index except the charge and the older transfer generations, which an operator's lookup may scan.
async fn resolve(conn: &mut sqlx::PgConnection, raw: &str) -> Result<Vec<String>, sqlx::Error> {
    let prefix = raw.split_once('_').map_or("", |(p, _)| p);
    let queries: &[&'static str] = match prefix {
        "spay" => &["SELECT id FROM split_payments WHERE id = $1"],
        "salc" => &["SELECT split_payment_id FROM split_allocations WHERE id = $1"],
        "don" => &["SELECT a.split_payment_id FROM donations d JOIN split_allocations a ON a.id = d.split_allocation_id
                     WHERE d.id = $1"],
        "pi" => &["SELECT id FROM split_payments WHERE payment_intent_id = $1"],
        // The charge that paid, or the last one that failed.
        "ch" | "py" => &["SELECT id FROM split_payments WHERE charge_id = $1 OR last_failed_charge_id = $1 LIMIT 2"],
        // The current generation's transfer first (a unique index), then earlier generations and discrepancies.
        "tr" => &[
            "SELECT split_payment_id FROM split_allocations WHERE stripe_transfer_id = $1",
            "SELECT a.split_payment_id FROM transfer_attempts t JOIN split_allocations a ON a.id = t.split_allocation_id
              WHERE t.stripe_transfer_id = $1
             UNION SELECT split_payment_id FROM transfer_discrepancies WHERE stripe_transfer_id = $1 LIMIT 2",
        ],
        _ => &[],
    };
    for sql in queries {
        let found: Vec<(String,)> = sqlx::query_as(*sql).bind(raw).fetch_all(&mut *conn).await?;
        if !found.is_empty() {
            return Ok(found.into_iter().map(|(id,)| id).collect());
        }
    }
    Ok(Vec::new())
}

#[derive(Debug, serde::Serialize)]
struct Report {
    /// The id asked about, and what kind of id it is.
    query: Query,
    payment: Payment,
    allocations: Vec<Allocation>,
    donations: Vec<Donation>,
    discrepancies: Vec<Discrepancy>,
    #[serde(flatten)]
    money_back: super::money_back::MoneyBack,
    events: Vec<Event>,
    audit: Vec<AuditEntry>,
}

#[derive(Debug, serde::Serialize)]
struct Query {
    id: String,
    kind: &'static str,
}

#[derive(Debug, serde::Serialize, sqlx::FromRow)]
struct Payment {
    id: String,
    status: String,
    organisation_id: String,
    distributor_name: String,
    recommendation_set_id: String,
    donor_id: Option<String>,
    payment_method_type: String,
    currency: String,
    total_amount_cents: i64,
    donor_covers_fees: bool,
    processing_fee_cents: Option<i64>,
    platform_fee_cents: Option<i64>,
    fee_uncollected_cents: Option<i64>,
    payment_intent_id: Option<String>,
    charge_id: Option<String>,
    failure_code: Option<String>,
    failure_message: Option<String>,
    failed_attempts: i32,
    last_failed_charge_id: Option<String>,
    created_at: DateTime<Utc>,
    succeeded_at: Option<DateTime<Utc>>,
    distributed_at: Option<DateTime<Utc>>,
}

#[derive(Debug, serde::Serialize, sqlx::FromRow)]
struct Allocation {
    id: String,
    position: i32,
    recipient_organisation_id: String,
    recipient_name: String,
    recipient_org_account_link_id: String,
    destination_account_id: String,
    status: String,
    gross_amount_cents: i64,
    fee_share_cents: Option<i64>,
    net_amount_cents: Option<i64>,
    generation: i32,
    attempts: i32,
    stripe_transfer_id: Option<String>,
    failure_code: Option<String>,
    failure_message: Option<String>,
    parked_at: Option<DateTime<Utc>>,
    transferred_at: Option<DateTime<Utc>>,
    refunded_at: Option<DateTime<Utc>>,
    unresolved_at: Option<DateTime<Utc>>,
    next_attempt_at: Option<DateTime<Utc>>,
    #[sqlx(skip)]
    transfer_attempts: Vec<Attempt>,
}

/// One transfer generation (a `transfer_attempts` row): its frozen parameters and how it ended.
#[derive(Debug, serde::Serialize, sqlx::FromRow)]
struct Attempt {
    #[serde(skip)]
    split_allocation_id: String,
    generation: i32,
    idempotency_key: String,
    destination_account_id: String,
    amount_cents: i64,
    currency: String,
    started_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
    /// NULL while in flight; TRANSFERRED, TERMINAL or WINDOW_ELAPSED once ended.
    outcome: Option<String>,
    stripe_transfer_id: Option<String>,
    failure_code: Option<String>,
    failure_message: Option<String>,
}

#[derive(Debug, serde::Serialize, sqlx::FromRow)]
struct Donation {
    id: String,
    split_allocation_id: String,
    organisation_id: String,
    status: String,
    amount_cents: i64,
    refunded_amount_cents: i64,
    currency: String,
    received_date: Option<DateTime<Utc>>,
    deleted_at: Option<DateTime<Utc>>,
}

#[derive(Debug, serde::Serialize, sqlx::FromRow)]
struct Discrepancy {
    id: i64,
    split_allocation_id: Option<String>,
    stripe_transfer_id: String,
    amount_cents: i64,
    kind: String,
    detail: String,
    found_at: DateTime<Utc>,
    resolved_at: Option<DateTime<Utc>>,
}

#[derive(Debug, serde::Serialize, sqlx::FromRow)]
struct Event {
    id: String,
    event_type: String,
    organisation_id: String,
    /// The payment, allocation or donation the event is about.
    subject_id: Option<String>,
    occurred_at: DateTime<Utc>,
    /// Every webhook delivery of the event (one per endpoint) succeeded, and there is at least one.
    delivered: bool,
    /// Its webhook deliveries, one per endpoint: `whdl_… status (attempts n[, last error])`.
    deliveries: Vec<String>,
}

pub async fn run(
    ctx: &AppContext,
    raw: &str,
    json: bool,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> Result<Outcome, OpsError> {
    let kind = match kind_of(raw) {
        Some(kind) if check_external_id("id", raw).is_ok() => kind,
        _ => {
            writeln!(
                err,
                "'{raw}' is not an id `ops show` knows: give a split payment (spay_…), allocation (salc_…), donation \
                 (don_…), PaymentIntent (pi_…), charge (ch_…/py_…) or transfer (tr_…) id"
            )?;
            return Ok(Outcome::Usage);
        }
    };
    let mut conn = ctx.pool.acquire().await?;
    let found = resolve(&mut conn, raw).await?;
    let payment_id = match found.as_slice() {
        [id] => id.clone(),
        [] => {
            writeln!(
                err,
                "no split payment has the {kind} {raw}: check the id (copy it from Stripe's dashboard or an event), \
                 or list what needs attention with `splitpay ops parked`"
            )?;
            return Ok(Outcome::Refused);
        }
        _ => {
            writeln!(
                err,
                "the {kind} {raw} belongs to more than one split payment ({}); show each by its spay_ id",
                found.join(", ")
            )?;
            return Ok(Outcome::Refused);
        }
    };
    let payment: Payment = sqlx::query_as(
        "SELECT p.id, p.status, p.organisation_id, o.name AS distributor_name, p.recommendation_set_id, p.donor_id,
                p.payment_method_type, p.currency, p.total_amount_cents, p.donor_covers_fees, p.processing_fee_cents,
                p.platform_fee_cents, p.fee_uncollected_cents, p.payment_intent_id, p.charge_id, p.failure_code,
                p.failure_message, p.failed_attempts, p.last_failed_charge_id, p.created_at, p.succeeded_at,
                p.distributed_at
           FROM split_payments p JOIN organisations o ON o.id = p.organisation_id
          WHERE p.id = $1",
    )
    .bind(&payment_id)
    .fetch_one(&mut *conn)
    .await?;
    let mut allocations: Vec<Allocation> = sqlx::query_as(
        "SELECT a.id, a.position, l.recipient_organisation_id, l.recipient_org_name AS recipient_name,
                a.recipient_org_account_link_id, l.stripe_connect_account_id AS destination_account_id, a.status,
                a.gross_amount_cents, a.fee_share_cents, a.net_amount_cents, a.generation, a.attempts,
                a.stripe_transfer_id, a.failure_code, a.failure_message, a.parked_at, a.transferred_at,
                a.refunded_at, a.unresolved_at, a.next_attempt_at
           FROM split_allocations a JOIN recipient_account_links l ON l.id = a.recipient_org_account_link_id
          WHERE a.split_payment_id = $1
          ORDER BY a.position",
    )
    .bind(&payment_id)
    .fetch_all(&mut *conn)
    .await?;
    let attempts: Vec<Attempt> = sqlx::query_as(
        "SELECT t.split_allocation_id, t.generation, t.idempotency_key, t.destination_account_id, t.amount_cents,
                t.currency, t.started_at, t.finished_at, t.outcome, t.stripe_transfer_id, t.failure_code,
                t.failure_message
           FROM transfer_attempts t JOIN split_allocations a ON a.id = t.split_allocation_id
          WHERE a.split_payment_id = $1
          ORDER BY t.split_allocation_id, t.generation",
    )
    .bind(&payment_id)
    .fetch_all(&mut *conn)
    .await?;
    for attempt in attempts {
        if let Some(a) = allocations.iter_mut().find(|a| a.id == attempt.split_allocation_id) {
            a.transfer_attempts.push(attempt);
        }
    }
    let donations: Vec<Donation> = sqlx::query_as(
        "SELECT d.id, d.split_allocation_id, d.organisation_id, d.status, d.amount_cents, d.refunded_amount_cents,
                d.currency, d.received_date, d.deleted_at
           FROM donations d JOIN split_allocations a ON a.id = d.split_allocation_id
          WHERE a.split_payment_id = $1
          ORDER BY a.position",
    )
    .bind(&payment_id)
    .fetch_all(&mut *conn)
    .await?;
    let discrepancies: Vec<Discrepancy> = sqlx::query_as(
        "SELECT id, split_allocation_id, stripe_transfer_id, amount_cents, kind, detail, found_at, resolved_at
           FROM transfer_discrepancies WHERE split_payment_id = $1 ORDER BY found_at, id",
    )
    .bind(&payment_id)
    .fetch_all(&mut *conn)
    .await?;
    let money_back = super::money_back::for_payment(&mut conn, &payment_id).await?;
    // Every id the payment is known by: events name the payment, an allocation or a donation; audit entries may
    // name any of them, or a Stripe id.
    let mut ids: Vec<String> = vec![payment_id.clone()];
    ids.extend(allocations.iter().map(|a| a.id.clone()));
    ids.extend(donations.iter().map(|d| d.id.clone()));
    let mut audit_targets = ids.clone();
    audit_targets.extend(payment.payment_intent_id.clone());
    audit_targets.extend(payment.charge_id.clone());
    for a in &allocations {
        audit_targets.extend(a.transfer_attempts.iter().filter_map(|t| t.stripe_transfer_id.clone()));
    }
    let events: Vec<Event> = sqlx::query_as(
        "SELECT id, event_type, organisation_id,
                coalesce(payload->'data'->>'split_allocation_id', payload->'data'->>'split_payment_id',
                         payload->'data'->>'id') AS subject_id,
                occurred_at,
                coalesce((SELECT bool_and(d.status = 'succeeded') FROM webhook_deliveries d
                           WHERE d.outbox_event_id = o.id), false) AS delivered,
                array(SELECT d.id || ' ' || d.status || ' (attempts ' || d.attempts
                             || coalesce(', ' || d.last_error, '') || ')'
                        FROM webhook_deliveries d WHERE d.outbox_event_id = o.id ORDER BY d.id) AS deliveries
           FROM outbox_events o
          WHERE payload->'data'->>'split_payment_id' = $1 OR payload->'data'->>'id' = ANY($2)
          ORDER BY occurred_at, created_at, id",
    )
    .bind(&payment_id)
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    let audit: Vec<AuditEntry> = sqlx::query_as(
        "SELECT id, created_at, actor, command, target_type, target_id, reason, details
           FROM ops_audit_log WHERE target_id = ANY($1)
          ORDER BY created_at DESC, id DESC",
    )
    .bind(&audit_targets)
    .fetch_all(&mut *conn)
    .await?;
    let report = Report {
        query: Query {
            id: raw.to_owned(),
            kind,
        },
        payment,
        allocations,
        donations,
        discrepancies,
        money_back,
        events,
        audit,
    };
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        print_table(&report, out)?;
    }
    Ok(Outcome::Done)
}

fn opt(v: &Option<String>) -> &str {
    v.as_deref().unwrap_or("-")
}

fn time(t: &Option<DateTime<Utc>>) -> String {
    t.map_or_else(|| "-".to_owned(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string())
}

fn print_table(r: &Report, out: &mut (dyn Write + Send)) -> std::io::Result<()> {
    let p = &r.payment;
    let c = p.currency.as_str();
    writeln!(out, "split payment {}  ({} {})", p.id, r.query.kind, r.query.id)?;
    writeln!(out, "  status            {}", p.status)?;
    writeln!(
        out,
        "  distributor       {} ({})  set {}",
        p.distributor_name, p.organisation_id, p.recommendation_set_id
    )?;
    writeln!(
        out,
        "  donor             {}  method {}",
        opt(&p.donor_id),
        p.payment_method_type
    )?;
    writeln!(out, "  total             {}", money(Some(p.total_amount_cents), c))?;
    writeln!(
        out,
        "  fees              processing {}  platform {}  uncollected {}",
        money(p.processing_fee_cents, c),
        money(p.platform_fee_cents, c),
        money(p.fee_uncollected_cents, c)
    )?;
    writeln!(
        out,
        "  PaymentIntent     {}  charge {}",
        opt(&p.payment_intent_id),
        opt(&p.charge_id)
    )?;
    if p.failure_code.is_some() || p.failed_attempts > 0 {
        writeln!(
            out,
            "  failure           {}: {}  (failed attempts {}, last charge {})",
            opt(&p.failure_code),
            opt(&p.failure_message),
            p.failed_attempts,
            opt(&p.last_failed_charge_id)
        )?;
    }
    writeln!(
        out,
        "  created {}  succeeded {}  distributed {}",
        time(&Some(p.created_at)),
        time(&p.succeeded_at),
        time(&p.distributed_at)
    )?;
    writeln!(out, "allocations: {}", r.allocations.len())?;
    for a in &r.allocations {
        writeln!(
            out,
            "  #{} {}  {:<12} {:<24} gross {}  net {}  gen {}  attempts {}  transfer {}",
            a.position,
            a.id,
            a.status,
            clip(&a.recipient_name, 24),
            money(Some(a.gross_amount_cents), c),
            money(a.net_amount_cents, c),
            a.generation,
            a.attempts,
            opt(&a.stripe_transfer_id)
        )?;
        if a.failure_code.is_some() {
            writeln!(
                out,
                "      reason {}: {}",
                opt(&a.failure_code),
                opt(&a.failure_message)
            )?;
        }
        if let Some(parked_at) = a.parked_at {
            let seconds = (Utc::now() - parked_at).num_seconds();
            writeln!(out, "      parked {} ({} ago)", time(&a.parked_at), age(seconds))?;
        }
        for t in &a.transfer_attempts {
            writeln!(
                out,
                "      generation {}  {}  {} to {}  started {}  {}  {}{}",
                t.generation,
                t.idempotency_key,
                money(Some(t.amount_cents), &t.currency),
                t.destination_account_id,
                time(&Some(t.started_at)),
                t.outcome.as_deref().unwrap_or("IN FLIGHT"),
                opt(&t.stripe_transfer_id),
                t.failure_code
                    .as_deref()
                    .map(|code| format!("  {code}: {}", opt(&t.failure_message)))
                    .unwrap_or_default()
            )?;
        }
    }
    writeln!(out, "donations: {}", r.donations.len())?;
    for d in &r.donations {
        writeln!(
            out,
            "  {}  {:<9} {}  refunded {}  to {}  for {}{}",
            d.id,
            d.status,
            money(Some(d.amount_cents), &d.currency),
            money(Some(d.refunded_amount_cents), &d.currency),
            d.organisation_id,
            d.split_allocation_id,
            d.deleted_at
                .map(|t| format!("  deleted {}", t.format("%Y-%m-%d %H:%M")))
                .unwrap_or_default()
        )?;
    }
    writeln!(out, "discrepancies at Stripe: {}", r.discrepancies.len())?;
    for d in &r.discrepancies {
        writeln!(
            out,
            "  {}  {}  {}  {}  {}  {}",
            d.kind,
            d.stripe_transfer_id,
            money(Some(d.amount_cents), c),
            opt(&d.split_allocation_id),
            if d.resolved_at.is_some() { "resolved" } else { "OPEN" },
            d.detail
        )?;
    }
    super::money_back::print(&r.money_back, c, out)?;
    writeln!(out, "events emitted: {}", r.events.len())?;
    for e in &r.events {
        writeln!(
            out,
            "  {}  {:<42} {:<31} {}",
            time(&Some(e.occurred_at)),
            e.event_type,
            opt(&e.subject_id),
            if e.deliveries.is_empty() {
                "no webhook endpoint".to_owned()
            } else {
                e.deliveries.join("; ")
            }
        )?;
    }
    writeln!(out, "audit entries: {}", r.audit.len())?;
    print_entries(&r.audit, out)
}
