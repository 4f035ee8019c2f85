//! The operator commands (`splitpay ops …`): human-readable tables by default, one JSON document with `--json`.
//! Exit codes: 0 success, 1 refused (wrong state, not ready), 2 bad usage. One file per command family:
//! - [`reconcile`]: run both reconcilers once, in the foreground.
//! - [`refund`]: refund one parked or transferred share to the donor (with the transfer reversed first).
//! - [`parked`]: list the parked allocations (read-only).
//! - [`money_back`]: refunds and transfer reversals, as `show` and `parked` print them.
//! - [`show`]: everything about one payment, found by any of its ids (read-only).
//! - [`retry`]: retry a parked share on a new transfer generation, once Stripe says its account is ready.
//! - [`audit`]: the ops audit log, newest first (read-only).
//! - [`endpoints`]: the webhook endpoints organisations receive their events at.
//! - [`deliveries`]: `events` lists webhook deliveries, `redeliver` queues them again.
//!
//! Every command that changes something takes [`Change`]: it asks for confirmation unless `--yes`, `--dry-run`
//! prints what would happen and changes nothing, and the change writes an `ops_audit_log` row in its own
//! transaction (actor `--actor`, else the OS user). A refused or declined command writes nothing.

pub mod audit;
pub mod deliveries;
pub mod endpoints;
pub mod money_back;
pub mod parked;
pub mod reconcile;
pub mod refund;
pub mod retry;
pub mod show;

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
    /// List the parked allocations (shares Stripe refused to transfer), oldest first: distributor and recipient,
    /// net amount, reason (failure code and message), age, attempts and generation. Changes nothing.
    Parked {
        /// Only allocations whose distributor or recipient is this organisation.
        #[arg(long, value_parser = parse_organisation)]
        organisation: Option<String>,
        /// Only allocations parked at least this long ago: `90s`, `10m`, `72h`, `7d`.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        older_than: Option<u64>,
    },
    /// Show one split payment: its status, amounts, fees, PaymentIntent and charge; its allocations with their
    /// states, transfer attempts and transfer ids; its donations, discrepancies, the events emitted about it and the
    /// audit entries. Changes nothing.
    Show {
        /// Our id (`spay_…`, `salc_…`, `don_…`) or Stripe's (`pi_…`, `ch_…`, `py_…`, `tr_…`).
        id: String,
    },
    /// Retry a PARKED share on a new transfer generation (a new idempotency key). First asks Stripe whether the
    /// recipient's account can receive transfers now (the `transfers` capability active, the account not deleted)
    /// and looks up the parked generation at Stripe: a transfer found there is recorded instead of making a second.
    /// Exits 1 and changes nothing when the share is not PARKED, the account is not ready, or Stripe cannot be
    /// asked. With --wait, exits 1 if the new generation is parked again.
    Retry {
        /// The parked allocation (`salc_…`, see `ops parked`).
        id: String,
        /// Wait for the new generation's outcome and print it: transferred, parked again, or still in progress.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits at most: `30s`, `2m`.
        #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
        wait_timeout: u64,
        #[command(flatten)]
        change: Change,
    },
    /// List the ops audit log (who changed what, and why), newest first. Changes nothing.
    Audit {
        /// Only entries about this target (e.g. a `salc_…` or `spay_…` id).
        #[arg(long, value_parser = parse_target)]
        target: Option<String>,
        /// At most this many entries.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..=10_000))]
        limit: i64,
    },
    /// Refund one share to the donor, on the payment's PaymentIntent (requires --reason).
    ///
    /// A PARKED share is refunded from the parked net and ends REFUNDED. A TRANSFERRED share is refunded only with
    /// --reverse-transfer: the transfer is reversed first, then the donor is refunded. Any other state is refused.
    ///
    /// --amount net (the default) refunds what the recipient would have received (the share's net); the platform
    /// keeps the share's fees. --amount gross refunds the donor's whole share, fees included; the platform bears
    /// those fees, recorded as platform loss on the payment.
    ///
    /// Safe to re-run: the refund is written with its idempotency key before Stripe is called, and a re-run after a
    /// crash or an unknown outcome re-sends the same key (Stripe answers with the same refund, never a second one).
    Refund {
        /// The share to refund (`salc_…`).
        allocation: String,
        /// net: what the recipient would have received; gross: the whole share, fees borne by the platform.
        #[arg(long, value_enum, default_value_t = refund::RefundAmount::Net)]
        amount: refund::RefundAmount,
        /// Required for a TRANSFERRED share: reverse the transfer first, then refund.
        #[arg(long)]
        reverse_transfer: bool,
        #[command(flatten)]
        change: Change,
    },
    /// Webhook endpoints: add, list, disable, enable, rotate-secret.
    Endpoints {
        #[command(subcommand)]
        command: endpoints::EndpointsCommand,
    },
    /// Webhook deliveries, newest first: event, endpoint, status, attempts, last error.
    Events {
        /// Only deliveries that failed for good.
        #[arg(long)]
        failed: bool,
        #[arg(long)]
        organisation: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Queue deliveries again: every delivery of one event (`oevt_…`) that did not get a 2xx, or every failed
    /// delivery created since TIME (RFC 3339). A delivery that got a 2xx is never sent again. A delivery that failed
    /// with its outcome unknown (its worker stopped while delivering) may have reached the receiver: redelivering
    /// it risks a duplicate (same webhook-id), which you accept by running this.
    Redeliver {
        event: Option<String>,
        #[arg(long)]
        since: Option<String>,
        #[command(flatten)]
        change: Change,
    },
}

fn parse_organisation(raw: &str) -> Result<String, String> {
    crate::domain::ids::check_external_id("organisation id", raw)
        .map(|()| raw.to_owned())
        .map_err(|e| e.to_string())
}

fn parse_target(raw: &str) -> Result<String, String> {
    crate::domain::ids::check_external_id("target id", raw)
        .map(|()| raw.to_owned())
        .map_err(|e| e.to_string())
}

/// A positive duration in milliseconds.
fn parse_duration(raw: &str) -> Result<u64, String> {
    crate::config::parse_duration_ms(raw)
        .filter(|&ms| ms > 0)
        .ok_or_else(|| format!("expected a positive duration such as 90s, 10m, 72h or 7d, got '{raw}'"))
}

/// `12.34 AUD` from minor units and a stored currency code (the code as stored when it is not one we know).
pub(crate) fn money(minor: Option<i64>, currency: &str) -> String {
    match (minor, crate::domain::money::Currency::parse(currency)) {
        (None, _) => "-".to_owned(),
        (Some(m), Ok(c)) => crate::domain::money::Money::new(m, c)
            .map(|m| m.to_string())
            .unwrap_or_else(|_| format!("{m} {currency}")),
        (Some(m), Err(_)) => format!("{m} {currency}"),
    }
}

/// A short age: `45s`, `12m`, `5h 3m`, `3d 4h`.
pub(crate) fn age(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..=59 => format!("{s}s"),
        60..=3_599 => format!("{}m", s / 60),
        3_600..=86_399 => format!("{}h {}m", s / 3_600, s % 3_600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3_600),
    }
}

/// The flags of every command that changes something.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Change {
    /// Do not ask for confirmation.
    #[arg(long)]
    pub yes: bool,
    /// Print what would happen and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Who is acting, for the audit log (default: the OS user).
    #[arg(long)]
    pub actor: Option<String>,
    /// Why, for the audit log.
    #[arg(long)]
    pub reason: Option<String>,
}

impl Change {
    pub fn actor(&self) -> String {
        self.actor
            .clone()
            .filter(|a| !a.trim().is_empty())
            .or_else(|| std::env::var("USER").ok().filter(|u| !u.is_empty()))
            .or_else(|| std::env::var("LOGNAME").ok().filter(|u| !u.is_empty()))
            .unwrap_or_else(|| "unknown".to_owned())
    }

    /// The audit row of this change (`details` holds the parameters; never a secret).
    pub fn audit(
        &self,
        command: &str,
        target_type: &str,
        target_id: &str,
        details: serde_json::Value,
    ) -> crate::store::records::AuditEntry {
        crate::store::records::AuditEntry {
            actor: self.actor(),
            command: command.to_owned(),
            target_type: target_type.to_owned(),
            target_id: target_id.to_owned(),
            reason: self.reason.clone(),
            details: serde_json::json!({ "parameters": details, "result": "done" }),
        }
    }
}

/// Bad usage: says what was wrong on `err`, exit 2.
pub(crate) fn usage(err: &mut (dyn Write + Send), message: &str) -> Result<Outcome, OpsError> {
    writeln!(err, "{message}")?;
    Ok(Outcome::Usage)
}

/// `--dry-run`: prints the plan (the same document under `--json`), changes nothing.
pub(crate) fn print_dry_run(
    out: &mut (dyn Write + Send),
    json: bool,
    plan: &serde_json::Value,
) -> Result<Outcome, OpsError> {
    if json {
        writeln!(out, "{}", serde_json::json!({ "dry_run": plan }))?;
    } else {
        writeln!(
            out,
            "(dry run) would {}: {plan}",
            plan["action"].as_str().unwrap_or("change")
        )?;
    }
    Ok(Outcome::Done)
}

/// Asks on the terminal unless `--yes`; only `yes` confirms. A declined command says so and changes nothing.
pub(crate) fn confirm(change: &Change, what: &str, err: &mut (dyn Write + Send)) -> Result<bool, OpsError> {
    if change.yes {
        return Ok(true);
    }
    write!(err, "About to {what}. Type 'yes' to confirm: ")?;
    err.flush()?;
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    if answer.trim() == "yes" {
        Ok(true)
    } else {
        writeln!(err, "not confirmed; nothing changed (pass --yes to skip the question)")?;
        Ok(false)
    }
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
        OpsCommand::Parked {
            organisation,
            older_than,
        } => parked::run(ctx, organisation.as_deref(), *older_than, args.json, out).await,
        OpsCommand::Show { id } => show::run(ctx, id, args.json, out, err).await,
        OpsCommand::Retry {
            id,
            wait,
            wait_timeout,
            change,
        } => {
            let wait = wait.then(|| std::time::Duration::from_millis(*wait_timeout));
            retry::run(ctx, id, wait, change, args.json, out, err).await
        }
        OpsCommand::Audit { target, limit } => audit::run(ctx, target.as_deref(), *limit, args.json, out).await,
        OpsCommand::Refund {
            allocation,
            amount,
            reverse_transfer,
            change,
        } => {
            let request = refund::RefundRequest {
                allocation,
                amount: *amount,
                reverse_transfer: *reverse_transfer,
            };
            refund::run(ctx, request, change, args.json, out, err).await
        }
        OpsCommand::Endpoints { command } => endpoints::run(command, ctx, args.json, out, err).await,
        OpsCommand::Events {
            failed,
            organisation,
            limit,
        } => deliveries::events(ctx, *failed, organisation.as_deref(), *limit, args.json, out).await,
        OpsCommand::Redeliver { event, since, change } => {
            deliveries::redeliver(ctx, event.as_deref(), since.as_deref(), change, args.json, out, err).await
        }
    }
}
