//! `splitpay ops audit [--target ID] [--limit N]`: the ops audit log (every operator change: who, what, on what,
//! why, with what result), newest first. Read-only.

use std::io::Write;

use chrono::{DateTime, Utc};

use super::{OpsError, Outcome};
use crate::app::AppContext;

#[derive(Debug, serde::Serialize)]
struct Report {
    entries: Vec<AuditEntry>,
}

#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct AuditEntry {
    pub id: i64,
    pub created_at: DateTime<Utc>,
    pub actor: String,
    pub command: String,
    pub target_type: String,
    pub target_id: String,
    pub reason: Option<String>,
    pub details: serde_json::Value,
}

pub async fn run(
    ctx: &AppContext,
    target: Option<&str>,
    limit: i64,
    json: bool,
    out: &mut (dyn Write + Send),
) -> Result<Outcome, OpsError> {
    let entries: Vec<AuditEntry> = sqlx::query_as(
        "SELECT id, created_at, actor, command, target_type, target_id, reason, details
           FROM ops_audit_log
          WHERE $1::text IS NULL OR target_id = $1
          ORDER BY created_at DESC, id DESC
          LIMIT $2",
    )
    .bind(target)
    .bind(limit)
    .fetch_all(&ctx.pool)
    .await?;
    let report = Report { entries };
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        writeln!(out, "audit entries: {}", report.entries.len())?;
        print_entries(&report.entries, out)?;
    }
    Ok(Outcome::Done)
}

/// One line per entry (shared with `ops show`).
pub(crate) fn print_entries(entries: &[AuditEntry], out: &mut (dyn Write + Send)) -> std::io::Result<()> {
    for e in entries {
        writeln!(
            out,
            "  #{:<6} {}  {:<12} {:<10} {} {}  reason: {}  {}",
            e.id,
            e.created_at.format("%Y-%m-%d %H:%M:%S"),
            e.actor,
            e.command,
            e.target_type,
            e.target_id,
            e.reason.as_deref().unwrap_or("-"),
            e.details
        )?;
    }
    Ok(())
}
