//! The operator commands (`splitpay ops …`): human-readable tables by default, one JSON document with `--json`.
//! Exit codes: 0 success, 1 refused (wrong state, not ready), 2 bad usage. One file per command family:
//! - [`reconcile`]: run both reconcilers once, in the foreground.

pub mod reconcile;

use std::io::Write;

use crate::app::AppContext;

#[derive(Debug, clap::Args)]
pub struct OpsArgs {
    /// Print one JSON document instead of tables (for scripts).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: OpsCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum OpsCommand {
    /// Run reconcile-pending and reconcile-transfers once, in the foreground, and print what they resolved: payments
    /// whose webhook never came, abandoned PaymentIntents and intakes, transfers whose outcome was unknown, and the
    /// audit of Stripe's transfers against ours. Also lists what is still unresolved.
    Reconcile {
        /// Only this payment (`spay_…`, or its PaymentIntent `pi_…`).
        #[arg(long)]
        payment: Option<String>,
        /// Ignore the graces and intervals: look at everything not final now.
        #[arg(long)]
        now: bool,
    },
}

/// How an ops command ended: its exit code, 0, 1 (refused) or 2 (bad usage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    Refused,
    Usage,
}

impl Outcome {
    pub fn code(self) -> u8 {
        match self {
            Outcome::Done => 0,
            Outcome::Refused => 1,
            Outcome::Usage => 2,
        }
    }
}

pub type OpsError = Box<dyn std::error::Error + Send + Sync>;

/// Runs one ops command against `ctx`, writing its report to `out` and what to do next on refusals to `err`.
pub async fn run(
    args: &OpsArgs,
    ctx: &AppContext,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> Result<Outcome, OpsError> {
    match &args.command {
        OpsCommand::Reconcile { payment, now } => {
            reconcile::run(ctx, payment.as_deref(), *now, args.json, out, err).await
        }
    }
}
