//! Background work on apalis-postgres.
//!
//! - [`stripe_event`]: applies a stored Stripe event (payment states, their events), and distributes a payment it
//!   made succeed.
//! - [`payment_state`]: the one path by which what Stripe says of a PaymentIntent moves a split payment.
//! - [`reconcile`]: reconcile-pending and reconcile-transfers, what the webhooks and the jobs missed.
//! - [`distribute`]: the fee split from the charge's balance transaction, then each share's first transfer, made at
//!   once under a lease (a transfer job only for a step that did not finish).
//! - [`accounts`]: retrying a parked share (for `ops retry`), and `account.updated`: link flags, automatic retries.
//! - [`account_sweep`]: asks Stripe about accounts whose parked shares no `account.updated` retried (a lost
//!   Connect webhook) and feeds those now able to receive transfers through the webhook's path.
//! - [`start_batch`]: the plain success of many payments, from their event to their started transfers, in one
//!   transaction; [`transfer_batch`]: many transfers recorded in one; both through [`group_commit`].
//! - [`transfer`]: one allocation's Stripe Transfer, exactly once per generation.
//! - [`refunds`]: refunds made at Stripe taken through to allocations and donations; transfer reversals.
//! - [`disputes`]: disputes' withdrawals taken like refunds, and won disputes' funds sent to the shares again.
//! - [`deliver`]: one outbound event to one webhook endpoint, signed, claimed before it is sent.
//! - [`queue`]: the queues and transactional enqueueing (jobs carry ids only).
//! - [`runner`]: the worker process's machinery: one apalis worker per queue with a unique name per process start,
//!   woken by LISTEN/NOTIFY ([`wake`]) with a short poll as the fallback, explicit heartbeats, restart on errors, graceful shutdown, and payloads
//!   decoded by us so a bad one is rejected without stopping the worker.
//! - [`schedule`]: the cron schedule the worker loads (`jobs/schedule.toml`), and [`cron`], which runs it once per
//!   tick across replicas.
//! - [`sweeper`]: re-enqueues ready work whose job was lost.

pub mod account_sweep;
pub mod accounts;
pub mod cron;
pub mod deliver;
pub mod disputes;
pub mod distribute;
pub mod event_sweep;
pub mod group_commit;
pub mod payment_state;
pub mod queue;
pub mod reconcile;
pub mod refunds;
pub mod runner;
pub mod schedule;
pub mod start_batch;
pub mod stripe_event;
pub mod sweeper;
pub mod transfer;
pub mod transfer_batch;
pub mod wake;

use std::sync::Arc;

use crate::app::AppContext;
use queue::Queue;
use runner::Handler;

/// The handler of every queue, over one shared context.
pub fn handlers(ctx: AppContext) -> Vec<(Queue, Handler)> {
    let ctx = Arc::new(ctx);
    Queue::ALL
        .into_iter()
        .map(|queue| {
            let ctx = ctx.clone();
            let handler: Handler = Arc::new(move |job: queue::JobRef| {
                let ctx = ctx.clone();
                Box::pin(async move {
                    match queue {
                        Queue::StripeEvent => stripe_event::process(&ctx, &job.id).await,
                        Queue::Distribute => distribute::distribute(&ctx, &job.id).await,
                        Queue::Transfer => transfer::transfer(&ctx, &job.id).await,
                        Queue::Deliver => deliver::deliver(&ctx.pool, &ctx.webhooks, &job.id).await,
                        Queue::Reversal => refunds::reverse(&ctx, &job.id).await,
                    }
                })
            });
            (queue, handler)
        })
        .collect()
}
