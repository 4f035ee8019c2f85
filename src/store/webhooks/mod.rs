//! Outbound webhook endpoints and their deliveries (issue 9, points 1 and 2).
//!
//! One `webhook_deliveries` row per (outbox event, endpoint), created in the transaction that writes the outbox
//! event, with its retry schedule stored on the row. A worker claims a row (a conditional UPDATE to `delivering`
//! with `claimed_until` and a fresh `claim_token`) before sending, and records the outcome (one
//! `webhook_delivery_attempts` row per claim) right after. Secrets never leave this module in a `Debug` output.
//!
//! - [`endpoints`]: the endpoints organisations register, their secrets, disabling and enabling;
//! - [`deliveries`]: the schedule, the claim, the record of each attempt, and the listing.

pub mod deliveries;
pub mod endpoints;

pub use deliveries::*;
pub use endpoints::*;
