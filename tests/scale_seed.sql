-- Bulk load: the rows below satisfy every foreign key by construction (checked after the load by
-- `assert_referential_integrity`), so the per-row FK triggers are skipped for speed (this needs a superuser, as the
-- tests' `postgres` role is); CHECK, UNIQUE and NOT NULL constraints still apply to every row.
SET LOCAL session_replication_role = replica;
-- One row per payment to seed: what it is and what its allocations are.
CREATE TEMP TABLE seed_spec (
    id text, method text, status text, created timestamptz, failure text, distributed boolean,
    audit timestamptz, nrec timestamptz, alloc_status text, last_alloc_status text, next_attempt timestamptz,
    unresolved boolean) ON COMMIT DROP;
-- 200,000 finished payments over 90 days: 93 % succeeded and distributed (of which 2 % with a parked share and 1 %
-- with a refunded one), 4 % failed, 3 % canceled. Those of the last 7 days have their next audit within a day.
INSERT INTO seed_spec
SELECT 'spay_f' || lpad(g::text, 7, '0'),
       CASE WHEN g % 10 < 8 THEN 'card' ELSE 'au_becs_debit' END,
       CASE WHEN g % 100 < 93 THEN 'SUCCEEDED' WHEN g % 100 < 97 THEN 'FAILED' ELSE 'CANCELED' END,
       c,
       CASE WHEN g % 100 < 93 THEN NULL WHEN g % 100 < 97 THEN 'card_declined' ELSE 'abandoned' END,
       g % 100 < 93,
       CASE WHEN g % 100 < 93 AND c > now() - interval '7 days' THEN now() + (g % 86400) * interval '1 second' END,
       NULL,
       CASE WHEN g % 100 < 93 THEN 'TRANSFERRED' ELSE 'VOIDED' END,
       CASE WHEN g % 100 < 90 THEN 'TRANSFERRED' WHEN g % 100 < 92 THEN 'PARKED'
            WHEN g % 100 < 93 THEN 'REFUNDED' ELSE 'VOIDED' END,
       NULL, false
  FROM generate_series(1, 200000) g,
       LATERAL (SELECT now() - interval '2 hours' - (200000 - g) * interval '38.88 seconds' AS c) t;
-- Live work. 250 succeeded payments whose three transfers are overdue (750 > SWEEP_BATCH_MAX), 60 of them due for
-- their audit, 3 of them with an unresolved allocation.
INSERT INTO seed_spec
SELECT 'spay_t' || lpad(g::text, 7, '0'), 'card', 'SUCCEEDED', now() - interval '3 hours' + g * interval '1 second',
       NULL, true,
       CASE WHEN g <= 60 THEN now() - interval '1 hour' + g * interval '1 second' END, NULL,
       'TRANSFERRING', 'TRANSFERRING', now() - interval '1 hour' + g * interval '1 second', g <= 3
  FROM generate_series(1, 250) g;
-- 600 succeeded payments whose distribution has not started (> SWEEP_BATCH_MAX).
INSERT INTO seed_spec
SELECT 'spay_u' || lpad(g::text, 7, '0'), 'card', 'SUCCEEDED', now() - interval '2 hours' + g * interval '1 second',
       NULL, false, NULL, NULL, 'PENDING', 'PENDING', NULL, false
  FROM generate_series(1, 600) g;
-- 260 unpaid payments: 130 card payments never checked, 130 bank debits processing and due again.
INSERT INTO seed_spec
SELECT 'spay_p' || lpad(g::text, 7, '0'),
       CASE WHEN g <= 130 THEN 'card' ELSE 'au_becs_debit' END,
       CASE WHEN g <= 130 THEN 'REQUIRES_PAYMENT' ELSE 'PROCESSING' END,
       now() - interval '3 hours' + g * interval '1 second', NULL, false, NULL,
       CASE WHEN g > 130 THEN now() - interval '1 hour' + g * interval '1 second' END,
       'PENDING', 'PENDING', NULL, false
  FROM generate_series(1, 260) g;

INSERT INTO split_payments
    (id, recommendation_set_id, organisation_id, payment_method_type, currency, total_amount_cents,
     processing_fee_cents, platform_fee_cents, status, payment_intent_id, charge_id, transfer_group, failure_code,
     created_at, updated_at, succeeded_at, distributed_at, audit_due_at, next_reconcile_at)
SELECT id, 'cm3rec1', 'cm3orgdist0001', method, 'aud', 6000,
       CASE WHEN distributed THEN 150 END, CASE WHEN distributed THEN 0 END, status,
       'pi_' || substr(id, 6), CASE WHEN status = 'SUCCEEDED' THEN 'ch_' || substr(id, 6) END, id, failure,
       created, created + interval '2 minutes',
       CASE WHEN status = 'SUCCEEDED' THEN created + interval '1 minute' END,
       CASE WHEN distributed THEN created + interval '1 minute 1 second' END, audit, nrec
  FROM seed_spec;

-- Three allocations each (gross 1000/2000/3000, fee shares 25/50/75 once the fee split is written).
INSERT INTO split_allocations
    (id, split_payment_id, recommendation_allocation_id, recipient_org_account_link_id, position,
     gross_amount_cents, fee_share_cents, net_amount_cents, status, generation, idempotency_key, stripe_transfer_id,
     attempts, next_attempt_at, failure_code, parked_at, transferred_at, refunded_at, unresolved_at,
     created_at, updated_at)
SELECT a.id, s.id, 'cm3alc' || pos, 'cm3lnk' || pos, pos,
       (pos + 1) * 1000,
       CASE WHEN s.distributed THEN (pos + 1) * 25 END, CASE WHEN s.distributed THEN (pos + 1) * 975 END,
       st, CASE WHEN s.distributed THEN 1 ELSE 0 END,
       CASE WHEN s.distributed THEN 'splitpay:alloc:' || a.id || ':transfer:1' END,
       CASE WHEN st = 'TRANSFERRED' THEN 'tr_' || substr(a.id, 6) END,
       CASE WHEN s.distributed THEN 1 ELSE 0 END,
       CASE WHEN st = 'TRANSFERRING' THEN s.next_attempt END,
       CASE WHEN st IN ('PARKED', 'REFUNDED') THEN 'account_invalid' END,
       CASE WHEN st = 'PARKED' THEN s.created + interval '2 minutes' END,
       CASE WHEN st = 'TRANSFERRED' THEN s.created + interval '2 minutes' END,
       CASE WHEN st = 'REFUNDED' THEN s.created + interval '1 day' END,
       CASE WHEN s.unresolved AND pos = 0 THEN now() - interval '10 minutes' END,
       s.created, s.created + interval '2 minutes'
  FROM seed_spec s, generate_series(0, 2) pos,
       LATERAL (SELECT 'salc_' || substr(s.id, 6) || pos AS id,
                       CASE WHEN pos = 2 THEN s.last_alloc_status ELSE s.alloc_status END AS st) a;

-- Each started transfer's generation, frozen: TRANSFERRED, TERMINAL (parked, then refunded), or still open.
INSERT INTO transfer_attempts
    (split_allocation_id, generation, idempotency_key, destination_account_id, amount_cents, currency, started_at,
     finished_at, outcome, stripe_transfer_id, failure_code, source_transaction, transfer_group, metadata)
SELECT a.id, 1, a.idempotency_key, 'acct_rcp' || a.position, a.net_amount_cents, 'aud', a.created_at,
       CASE WHEN a.status <> 'TRANSFERRING' THEN a.updated_at END,
       CASE a.status WHEN 'TRANSFERRED' THEN 'TRANSFERRED' WHEN 'TRANSFERRING' THEN NULL ELSE 'TERMINAL' END,
       a.stripe_transfer_id, a.failure_code, p.charge_id, p.id,
       jsonb_build_object('split_payment_id', p.id, 'split_allocation_id', a.id, 'generation', '1')
  FROM split_allocations a JOIN split_payments p ON p.id = a.split_payment_id
 WHERE a.generation = 1;

-- Each allocation's donation (as the product writes it with its share): confirmed once transferred.
INSERT INTO donations (id, organisation_id, split_allocation_id, amount_cents, currency, donation_date, status,
                       received_date)
SELECT 'don_' || substr(a.id, 6), 'cm3orgdist0001', a.id, a.gross_amount_cents, 'aud', a.created_at,
       CASE WHEN a.status = 'TRANSFERRED' THEN 'CONFIRMED' ELSE 'PENDING' END,
       CASE WHEN a.status = 'TRANSFERRED' THEN a.updated_at END
  FROM split_allocations a;

-- Five inbox events whose processing never happened.
INSERT INTO stripe_events (id, event_type, object_id, payload, received_at)
SELECT 'evt_seed' || g, 'payment_intent.succeeded', 'pi_seed' || g, '{}'::jsonb, now() - interval '10 minutes'
  FROM generate_series(1, 5) g;

-- History: a processed inbox event per finished payment, and a done transfer job per finished payment.
INSERT INTO stripe_events (id, event_type, object_id, payload, received_at, processed_at, process_attempts)
SELECT 'evt_h' || lpad(g::text, 7, '0'), 'payment_intent.succeeded', 'pi_f' || lpad(g::text, 7, '0'), '{}'::jsonb,
       now() - (200000 - g) * interval '38.88 seconds', now() - (200000 - g) * interval '38.88 seconds', 1
  FROM generate_series(1, 200000) g;
INSERT INTO apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at, done_at)
SELECT 'seeddone' || lpad(g::text, 7, '0'), 'splitpay.transfer',
       convert_to('{"id":"salc_f' || lpad(g::text, 7, '0') || '0"}', 'UTF8'), 'Done', 1, 3,
       now() - (200000 - g) * interval '38.88 seconds', now() - (200000 - g) * interval '38.88 seconds'
  FROM generate_series(1, 200000) g;
-- The transfers of overdue payments 101..133 already have a job waiting.
INSERT INTO apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at)
SELECT 'seedwait' || substr(a.id, 6), 'splitpay.transfer', convert_to('{"id":"' || a.id || '"}', 'UTF8'),
       'Pending', 0, 3, now()
  FROM split_allocations a
 WHERE a.split_payment_id BETWEEN 'spay_t0000101' AND 'spay_t0000133';
