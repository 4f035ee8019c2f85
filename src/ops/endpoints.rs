//! `splitpay ops endpoints add|list|disable|enable|rotate-secret`: the webhook endpoints organisations receive their
//! events at. Disabling an endpoint ends its pending deliveries (`failed`, "endpoint disabled"); enabling it again
//! resends nothing by itself (`splitpay ops redeliver --since TIME` does). A secret (`whsec_` + base64 of 32 random bytes) is printed once, when made, and never again (not in `list`,
//! not in the audit log, not in logs). After `rotate-secret` the old secret keeps signing for 24 h beside the new one.

use std::io::Write;

use super::{Change, OpsError, Outcome};
use crate::app::AppContext;
use crate::events::signing::generate_secret;
use crate::events::EventType;
use crate::store::records::insert_audit;
use crate::store::webhooks::{self, EndpointRow, SECRET_OVERLAP_SECS};
use crate::store::StoreError;

/// Allows `http://` endpoint URLs on any host (tests and local drills); otherwise only loopback hosts may use http.
pub const ALLOW_HTTP_ENV: &str = "SPLITPAY_ALLOW_HTTP_WEBHOOKS";

#[derive(Debug, clap::Subcommand)]
pub enum EndpointsCommand {
    /// Register an endpoint for an organisation's events; prints its signing secret once.
    Add {
        #[arg(long)]
        organisation: String,
        /// `https://…` (`http://` only for loopback hosts, or with SPLITPAY_ALLOW_HTTP_WEBHOOKS=1).
        #[arg(long)]
        url: String,
        /// Only these event types, comma-separated (default: all).
        #[arg(long, value_delimiter = ',')]
        events: Option<Vec<String>>,
        #[command(flatten)]
        change: Change,
    },
    /// List endpoints (never their secrets).
    List {
        #[arg(long)]
        organisation: Option<String>,
    },
    /// Stop delivering to an endpoint.
    Disable {
        id: String,
        #[command(flatten)]
        change: Change,
    },
    /// Deliver to a disabled endpoint again (once its receiver is fixed). Deliveries that failed meanwhile are not
    /// resent by this: `splitpay ops redeliver --since TIME` does.
    Enable {
        id: String,
        #[command(flatten)]
        change: Change,
    },
    /// Make a new secret; the old one keeps signing for 24 h beside it. Prints the new secret once. Refused while
    /// the secret before keeps signing (within 24 h of the last rotation).
    RotateSecret {
        id: String,
        #[command(flatten)]
        change: Change,
    },
}

/// Checks an endpoint URL: https, or http for loopback hosts (or anywhere with `allow_http`).
pub fn check_url(raw: &str, allow_http: bool) -> Result<String, String> {
    let url = reqwest::Url::parse(raw).map_err(|e| format!("'{raw}' is not a URL: {e}"))?;
    if !url.username().is_empty() || url.password().is_some() {
        // Not echoed: it holds a credential.
        return Err(
            "--url must not carry a user name or password (https://user:pass@host/…): the URL is stored and listed \
             in the clear; have the receiver authenticate deliveries by their webhook-signature"
                .to_owned(),
        );
    }
    let host = url.host_str().unwrap_or_default().to_owned();
    if host.is_empty() {
        return Err(format!("'{raw}' has no host"));
    }
    match url.scheme() {
        "https" => Ok(url.to_string()),
        "http" => {
            let loopback = host == "localhost"
                || host
                    .trim_matches(|c| c == '[' || c == ']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if loopback || allow_http {
                Ok(url.to_string())
            } else {
                Err(format!(
                    "'{raw}' must use https:// (http:// is allowed only for loopback hosts, or with {ALLOW_HTTP_ENV}=1)"
                ))
            }
        }
        other => Err(format!("'{raw}' must use https://, not {other}://")),
    }
}

/// Checks an `--events` filter: each value must be an event type splitpay emits.
pub fn check_event_types(values: &[String]) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for value in values {
        let value = value.trim();
        if !EventType::ALL.iter().any(|t| t.as_str() == value) {
            let known: Vec<_> = EventType::ALL.iter().map(|t| t.as_str()).collect();
            return Err(format!("unknown event type '{value}' (known: {})", known.join(", ")));
        }
        if !out.iter().any(|v| v == value) {
            out.push(value.to_owned());
        }
    }
    Ok(out)
}

fn endpoint_json(e: &EndpointRow) -> serde_json::Value {
    serde_json::json!({
        "id": e.id,
        "organisation_id": e.organisation_id,
        "url": e.url,
        "events": e.event_types,
        "disabled_at": e.disabled_at,
        "disabled_reason": e.disabled_reason,
        "failing_since": e.failing_since,
        "previous_secret_valid_until": e.previous_secret_expires_at,
        "created_at": e.created_at,
    })
}

fn allow_http_from_env() -> bool {
    std::env::var(ALLOW_HTTP_ENV).is_ok_and(|v| v.trim() == "1")
}

pub async fn run(
    command: &EndpointsCommand,
    ctx: &AppContext,
    json: bool,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> Result<Outcome, OpsError> {
    match command {
        EndpointsCommand::Add {
            organisation,
            url,
            events,
            change,
        } => {
            let url = match check_url(url, allow_http_from_env()) {
                Ok(url) => url,
                Err(message) => return super::usage(err, &message),
            };
            let events = match events.as_deref().map(check_event_types).transpose() {
                Ok(events) => events,
                Err(message) => return super::usage(err, &message),
            };
            let mut tx = ctx.pool.begin().await?;
            let known: Option<(String,)> = sqlx::query_as("SELECT id FROM organisations WHERE id = $1")
                .bind(organisation)
                .fetch_optional(&mut *tx)
                .await?;
            if known.is_none() {
                writeln!(
                    err,
                    "unknown organisation '{organisation}': the platform registers organisations through PUT /v1/organisations/{{id}} first"
                )?;
                return Ok(Outcome::Refused);
            }
            let plan = serde_json::json!({
                "action": "endpoints add", "organisation_id": organisation, "url": url, "events": events,
            });
            if change.dry_run {
                return super::print_dry_run(out, json, &plan);
            }
            if !super::confirm(change, &format!("register {url} for {organisation}"), err)? {
                return Ok(Outcome::Refused);
            }
            let secret = generate_secret();
            let endpoint = webhooks::insert_endpoint(&mut tx, organisation, &url, events.as_deref(), &secret).await?;
            insert_audit(
                &mut tx,
                &change.audit("endpoints add", "webhook_endpoint", &endpoint.id, plan),
            )
            .await?;
            tx.commit().await?;
            if json {
                let mut doc = endpoint_json(&endpoint);
                doc["secret"] = serde_json::Value::String(secret);
                writeln!(out, "{doc}")?;
            } else {
                writeln!(out, "endpoint {} registered for {organisation}: {url}", endpoint.id)?;
                writeln!(out, "secret (shown once; store it now): {secret}")?;
            }
            Ok(Outcome::Done)
        }
        EndpointsCommand::List { organisation } => {
            let mut conn = ctx.pool.acquire().await?;
            let endpoints = webhooks::list_endpoints(&mut conn, organisation.as_deref()).await?;
            if json {
                let doc: Vec<_> = endpoints.iter().map(endpoint_json).collect();
                writeln!(out, "{}", serde_json::json!({ "endpoints": doc }))?;
            } else if endpoints.is_empty() {
                writeln!(out, "no webhook endpoints")?;
            } else {
                for e in &endpoints {
                    let state = match (&e.disabled_at, &e.failing_since) {
                        (Some(at), _) => format!(
                            "disabled {} ({})",
                            at.to_rfc3339(),
                            e.disabled_reason.as_deref().unwrap_or("-")
                        ),
                        (None, Some(since)) => format!("failing since {}", since.to_rfc3339()),
                        (None, None) => "enabled".to_owned(),
                    };
                    let events = e.event_types.as_ref().map_or("all events".to_owned(), |t| t.join(","));
                    writeln!(out, "{}  {}  {}  {}  {}", e.id, e.organisation_id, e.url, events, state)?;
                }
            }
            Ok(Outcome::Done)
        }
        EndpointsCommand::Disable { id, change } => {
            let mut tx = ctx.pool.begin().await?;
            let Some(endpoint) = find(&mut tx, id, err).await? else {
                return Ok(Outcome::Refused);
            };
            if endpoint.disabled_at.is_some() {
                writeln!(err, "endpoint {id} is already disabled; nothing to do")?;
                return Ok(Outcome::Refused);
            }
            let plan = serde_json::json!({ "action": "endpoints disable", "endpoint_id": id, "url": endpoint.url });
            if change.dry_run {
                return super::print_dry_run(out, json, &plan);
            }
            if !super::confirm(change, &format!("disable endpoint {id} ({})", endpoint.url), err)? {
                return Ok(Outcome::Refused);
            }
            let reason = change
                .reason
                .clone()
                .unwrap_or_else(|| "disabled by an operator".to_owned());
            webhooks::disable_endpoint(&mut tx, id, &reason).await?;
            insert_audit(
                &mut tx,
                &change.audit("endpoints disable", "webhook_endpoint", id, plan),
            )
            .await?;
            tx.commit().await?;
            if json {
                writeln!(out, "{}", serde_json::json!({ "disabled": id }))?;
            } else {
                writeln!(out, "endpoint {id} disabled")?;
            }
            Ok(Outcome::Done)
        }
        EndpointsCommand::Enable { id, change } => {
            let mut tx = ctx.pool.begin().await?;
            let Some(endpoint) = find(&mut tx, id, err).await? else {
                return Ok(Outcome::Refused);
            };
            let Some(disabled_at) = endpoint.disabled_at else {
                writeln!(err, "endpoint {id} is enabled; nothing to do")?;
                return Ok(Outcome::Refused);
            };
            let plan = serde_json::json!({
                "action": "endpoints enable", "endpoint_id": id, "url": endpoint.url,
                "disabled_at": disabled_at, "disabled_reason": endpoint.disabled_reason,
            });
            if change.dry_run {
                return super::print_dry_run(out, json, &plan);
            }
            if !super::confirm(change, &format!("enable endpoint {id} ({})", endpoint.url), err)? {
                return Ok(Outcome::Refused);
            }
            webhooks::enable_endpoint(&mut tx, id).await?;
            insert_audit(&mut tx, &change.audit("endpoints enable", "webhook_endpoint", id, plan)).await?;
            tx.commit().await?;
            // Deliveries failed from when it started failing (or, for a manual disable, from the disable).
            let since = endpoint
                .failing_since
                .unwrap_or(disabled_at)
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            if json {
                writeln!(out, "{}", serde_json::json!({ "enabled": id, "disabled_since": since }))?;
            } else {
                writeln!(out, "endpoint {id} enabled; new events are delivered to it")?;
                writeln!(
                    out,
                    "failed deliveries are not resent by this: `splitpay ops redeliver --since {since}` sends them; events that came while it was disabled have no delivery to it: `splitpay ops redeliver <oevt_…>` creates one"
                )?;
            }
            Ok(Outcome::Done)
        }
        EndpointsCommand::RotateSecret { id, change } => {
            let mut tx = ctx.pool.begin().await?;
            let Some(endpoint) = find(&mut tx, id, err).await? else {
                return Ok(Outcome::Refused);
            };
            let still_signing = |err: &mut (dyn Write + Send), until: chrono::DateTime<chrono::Utc>| {
                writeln!(
                    err,
                    "the previous secret of {id} still signs until {}: rotating again now would stop it early, and \
                     receivers still verifying with it would reject deliveries. Rotate again after that time (make \
                     sure the receiver uses the current secret by then)",
                    until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                )
            };
            if let Some(until) = endpoint.previous_secret_expires_at.filter(|u| *u > chrono::Utc::now()) {
                still_signing(err, until)?;
                return Ok(Outcome::Refused);
            }
            let plan = serde_json::json!({
                "action": "endpoints rotate-secret", "endpoint_id": id, "url": endpoint.url,
                "old_secret_signs_for_secs": SECRET_OVERLAP_SECS,
            });
            if change.dry_run {
                return super::print_dry_run(out, json, &plan);
            }
            if !super::confirm(change, &format!("rotate the secret of endpoint {id}"), err)? {
                return Ok(Outcome::Refused);
            }
            let secret = generate_secret();
            let Some(endpoint) = webhooks::rotate_secret(&mut tx, id, &secret, SECRET_OVERLAP_SECS).await? else {
                // The database's clock says the previous secret still signs.
                still_signing(
                    err,
                    endpoint.previous_secret_expires_at.unwrap_or_else(chrono::Utc::now),
                )?;
                return Ok(Outcome::Refused);
            };
            insert_audit(
                &mut tx,
                &change.audit("endpoints rotate-secret", "webhook_endpoint", id, plan),
            )
            .await?;
            tx.commit().await?;
            let until = endpoint.previous_secret_expires_at;
            if json {
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({ "id": id, "secret": secret, "previous_secret_valid_until": until })
                )?;
            } else {
                writeln!(out, "new secret for {id} (shown once; store it now): {secret}")?;
                if let Some(until) = until {
                    writeln!(out, "the previous secret also signs until {}", until.to_rfc3339())?;
                }
            }
            Ok(Outcome::Done)
        }
    }
}

async fn find(
    conn: &mut sqlx::PgConnection,
    id: &str,
    err: &mut (dyn Write + Send),
) -> Result<Option<EndpointRow>, OpsError> {
    match webhooks::get_endpoint(conn, id).await {
        Ok(e) => Ok(Some(e)),
        Err(StoreError::NotFound { .. }) => {
            writeln!(
                err,
                "no webhook endpoint '{id}'; `splitpay ops endpoints list` shows them"
            )?;
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_must_be_https_except_on_loopback() {
        assert!(check_url("https://example.org/hook", false).is_ok());
        assert!(check_url("http://127.0.0.1:8080/hook", false).is_ok());
        assert!(check_url("http://localhost/hook", false).is_ok());
        assert!(check_url("http://[::1]:9/hook", false).is_ok());
        let err = check_url("http://example.org/hook", false).unwrap_err();
        assert!(err.contains("https://") && err.contains(ALLOW_HTTP_ENV), "{err}");
        assert!(check_url("http://example.org/hook", true).is_ok());
        assert!(check_url("ftp://example.org/", true).is_err());
        assert!(check_url("not a url", true).is_err());
        for with_credentials in [
            "https://someone:s3cret@example.org/hook",
            "https://someone@example.org/hook",
        ] {
            let err = check_url(with_credentials, true).unwrap_err();
            assert!(
                err.contains("--url") && !err.contains("s3cret") && !err.contains("someone"),
                "{err}"
            );
        }
    }

    #[test]
    fn unknown_event_types_are_named() {
        let ok = check_event_types(&["donation.created".into(), "donation.created".into()]).unwrap();
        assert_eq!(ok, ["donation.created"]);
        let err = check_event_types(&["donation.created".into(), "donation.exploded".into()]).unwrap_err();
        assert!(err.contains("'donation.exploded'"), "{err}");
    }
}
