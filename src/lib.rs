//! splitpay distributes a donor's single Stripe payment across several recipient organisations on Stripe
//! Connect: one PaymentIntent in, one Transfer per recipient out, exactly once, with every cent accounted for.
//!
//! # The money path (each module is one step; read them in this order)
//! - [`domain`]: pure rules — money in minor units, allocation modes and the split plan, the fee split, and
//!   the state machines of a payment, an allocation and a donation. No I/O.
//! - [`store`]: PostgreSQL. Every state change goes through a state machine and commits together with the events
//!   it emits (transactional outbox); transitions are compare-and-set on the expected state.
//! - [`events`]: the typed payloads of the webhook events splitpay emits, exactly as the platform's contract
//!   (`contract/together-openapi.json`) defines them.
//! - [`stripe`]: the `PaymentGateway` port, its async-stripe implementation (errors classified as retryable,
//!   terminal or outcome-unknown; rate limited), webhook signatures, and a local Stripe simulator.
//! - [`http`]: Stripe's webhook ingress (verify, store in the inbox, enqueue, answer fast).
//! - [`jobs`]: the workers on apalis-postgres: Stripe events → payment states → fee split → one transfer per
//!   allocation, with retries stored on our rows; and the cron schedule (`jobs/schedule.toml`).
//! - [`ops`]: the operator commands (`splitpay ops …`).
//! - [`observability`]: Prometheus metrics (`/metrics` on `serve` and `worker`) and log output (text or JSON).
//! - [`app`]: what the API and the workers share.
//! - [`e2e`]: `splitpay e2e`, the Stripe test-mode end-to-end suite (also run against the simulator in CI).
//! - [`config`]: configuration from the environment; secrets that cannot be printed.
//! - [`bench`]: `splitpay bench`, the end-to-end benchmark with its correctness check.
//!
//! Still to come (see the issues): outbound delivery, and the rest of the operator commands.

pub mod app;
pub mod bench;
pub mod config;
pub mod demo;
pub mod domain;
pub mod e2e;
pub mod events;
pub mod http;
pub mod intake;
pub mod jobs;
pub mod observability;
pub mod ops;
pub mod store;
pub mod stripe;
