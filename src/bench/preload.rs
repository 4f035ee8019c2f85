//! `splitpay bench --preload N`: N finished payments with their history, written by set-based SQL
//! (`generate_series`), never through the API: succeeded and distributed payments over the last 90 days, their
//! allocations TRANSFERRED with frozen transfer generations, CONFIRMED donations, processed inbox events, delivered
//! outbox events and the done apalis jobs they left. What a year of a busy deployment leaves in the tables, so the
//! benchmark can show that work in flight does not get slower as finished work piles up.

use sqlx::PgPool;

/// The statements, with `{N}` (payments) and `{R}` (recipients per payment, as the bench's catalogue has them).
const PRELOAD_SQL: &str = r#"
-- Every row satisfies the foreign keys by construction (the bench's catalogue exists), so the per-row FK triggers
-- are skipped for speed (needs a superuser, as the bench's `postgres` role is); CHECK, UNIQUE, NOT NULL still apply.
SET LOCAL session_replication_role = replica;
INSERT INTO split_payments
    (id, recommendation_set_id, organisation_id, payment_method_type, currency, total_amount_cents,
     processing_fee_cents, platform_fee_cents, status, payment_intent_id, charge_id, transfer_group,
     created_at, updated_at, succeeded_at, distributed_at)
SELECT 'spay_h' || lpad(g::text, 9, '0'), 'cm3benchset', 'cm3benchdist', 'card', 'aud', {TOTAL},
       {FEE}, 0, 'SUCCEEDED', 'pi_h' || lpad(g::text, 9, '0'), 'ch_h' || lpad(g::text, 9, '0'),
       'spay_h' || lpad(g::text, 9, '0'), c, c + interval '2 minutes', c + interval '1 minute',
       c + interval '1 minute 1 second'
  FROM generate_series(1, {N}) g,
       LATERAL (SELECT now() - interval '2 hours' - ({N} - g) * (interval '90 days' / {N}) AS c) t;
INSERT INTO split_allocations
    (id, split_payment_id, recommendation_allocation_id, recipient_org_account_link_id, position,
     gross_amount_cents, fee_share_cents, net_amount_cents, status, generation, idempotency_key, stripe_transfer_id,
     attempts, transferred_at, created_at, updated_at)
SELECT 'salc_h' || lpad(g::text, 9, '0') || '_' || pos, 'spay_h' || lpad(g::text, 9, '0'), 'cm3benchalc' || pos,
       'cm3benchlnk' || pos, pos, (pos + 1) * 1000, (pos + 1) * 25, (pos + 1) * 975, 'TRANSFERRED', 1,
       'splitpay:alloc:salc_h' || lpad(g::text, 9, '0') || '_' || pos || ':transfer:1',
       'tr_h' || lpad(g::text, 9, '0') || '_' || pos, 1, c + interval '2 minutes', c, c + interval '2 minutes'
  FROM generate_series(1, {N}) g, generate_series(0, {R} - 1) pos,
       LATERAL (SELECT now() - interval '2 hours' - ({N} - g) * (interval '90 days' / {N}) AS c) t;
INSERT INTO transfer_attempts
    (split_allocation_id, generation, idempotency_key, destination_account_id, amount_cents, currency, started_at,
     finished_at, outcome, stripe_transfer_id, source_transaction, transfer_group, metadata)
SELECT a.id, 1, a.idempotency_key, 'acct_bench' || a.position, a.net_amount_cents, 'aud', a.created_at,
       a.updated_at, 'TRANSFERRED', a.stripe_transfer_id, 'ch_h' || substr(a.split_payment_id, 7),
       a.split_payment_id,
       jsonb_build_object('split_payment_id', a.split_payment_id, 'split_allocation_id', a.id, 'generation', '1')
  FROM split_allocations a WHERE a.id LIKE 'salc\_h%';
INSERT INTO donations
    (id, organisation_id, split_allocation_id, status, amount_cents, currency, donation_date, received_date,
     payment_method, created_at, updated_at)
SELECT 'don_' || substr(a.id, 6), 'cm3benchrcp' || a.position, a.id, 'CONFIRMED', a.gross_amount_cents, 'AUD',
       a.created_at, a.transferred_at, 'card', a.created_at, a.updated_at
  FROM split_allocations a WHERE a.id LIKE 'salc\_h%';
INSERT INTO stripe_events (id, event_type, object_id, payload, received_at, processed_at)
SELECT 'evt_h' || lpad(g::text, 9, '0'), 'payment_intent.succeeded', 'pi_h' || lpad(g::text, 9, '0'), '{}'::jsonb,
       c + interval '1 minute', c + interval '1 minute'
  FROM generate_series(1, {N}) g,
       LATERAL (SELECT now() - interval '2 hours' - ({N} - g) * (interval '90 days' / {N}) AS c) t;
INSERT INTO outbox_events (id, dedup_key, event_type, organisation_id, occurred_at, payload, created_at, delivered_at)
SELECT 'oevt_h' || lpad(g::text, 9, '0'), 'payment_succeeded:spay_h' || lpad(g::text, 9, '0'),
       'recommendation_set.payment_succeeded', 'cm3benchdist', c,
       jsonb_build_object('type', 'recommendation_set.payment_succeeded', 'occurred_at', c,
                          'organisation_id', 'cm3benchdist', 'data', '{}'::jsonb),
       c, c + interval '2 minutes'
  FROM generate_series(1, {N}) g,
       LATERAL (SELECT now() - interval '2 hours' - ({N} - g) * (interval '90 days' / {N}) AS c) t;
INSERT INTO apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at, done_at)
SELECT 'hdone' || a.id, 'splitpay.transfer', convert_to('{"id":"' || a.id || '"}', 'UTF8'), 'Done', 1, 3,
       a.created_at, a.transferred_at
  FROM split_allocations a WHERE a.id LIKE 'salc\_h%';
INSERT INTO apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at, done_at)
SELECT 'hdone' || e.id, 'splitpay.stripe_event', convert_to('{"id":"' || e.id || '"}', 'UTF8'), 'Done', 1, 3,
       e.received_at, e.processed_at
  FROM stripe_events e WHERE e.id LIKE 'evt\_h%';
"#;

/// Writes `payments` finished payments (3 recipients each, as the bench's default catalogue) in one transaction,
/// then refreshes the planner's statistics.
pub async fn preload(pool: &PgPool, payments: u64) -> Result<(), sqlx::Error> {
    let recipients: (i64,) =
        sqlx::query_as("SELECT count(*) FROM recommendation_allocations WHERE recommendation_set_id = 'cm3benchset'")
            .fetch_one(pool)
            .await?;
    let r = recipients.0.max(1);
    let total: i64 = (1..=r).map(|i| i * 1000).sum();
    let fee: i64 = (1..=r).map(|i| i * 25).sum();
    let sql = PRELOAD_SQL
        .replace("{N}", &payments.to_string())
        .replace("{R}", &r.to_string())
        .replace("{TOTAL}", &total.to_string())
        .replace("{FEE}", &fee.to_string());
    let mut tx = pool.begin().await?;
    // Numbers only are substituted above: nothing from outside reaches the SQL text.
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut *tx).await?;
    tx.commit().await?;
    // Vacuumed as well as analyzed: a deployment's million finished payments were vacuumed long ago, and the
    // autovacuum of a million fresh inserts would otherwise run inside the measured window (seen: PostgreSQL's CPU
    // of the run counted it, and transfers/s fell 11%).
    sqlx::raw_sql("VACUUM (ANALYZE)").execute(pool).await?;
    Ok(())
}
