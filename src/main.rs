//! The `splitpay` binary: parses the command line and dispatches to library code. Subcommands appear here only
//! once they work.

use clap::{Parser, Subcommand};

use splitpay::config::{redact_url, DatabaseConfig};
use splitpay::store;

#[derive(Parser)]
#[command(
    name = "splitpay",
    version,
    about = "Distributes one donor payment across recipient organisations on Stripe Connect"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the database if it is missing and apply the schema (safe to run again).
    Migrate,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // A missing .env is normal; a malformed one is worth a warning, not a crash.
    let dotenv = dotenvy::dotenv();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .init();
    if let Err(e) = dotenv {
        if !e.not_found() {
            tracing::warn!(error = %e, ".env could not be read");
        }
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Migrate => migrate().await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("splitpay: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn migrate() -> Result<(), Box<dyn std::error::Error>> {
    let config = DatabaseConfig::from_env()?;
    store::ensure_database(&config).await?;
    let pool = store::connect(&config).await?;
    store::migrate(&pool).await?;
    tracing::info!(database = %redact_url(config.url.expose()), "schema is up to date");
    Ok(())
}
