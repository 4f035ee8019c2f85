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
    /// Serve the local Stripe simulator (for tests and demos; never a substitute for Stripe in production).
    StripeSim {
        /// Port to listen on (0 picks a free one).
        #[arg(long, default_value_t = 12111)]
        port: u16,
        /// Address to listen on; keep the loopback default outside containers.
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
    },
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
        Command::StripeSim { port, host } => stripe_sim(std::net::SocketAddr::new(host, port)).await,
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

async fn stripe_sim(addr: std::net::SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    let config = splitpay::stripe::sim::model::SimConfig::default();
    splitpay::stripe::sim::serve(config, addr, shutdown_signal()).await?;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM: the one shutdown signal every long-running subcommand obeys.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
    tracing::info!("shutting down");
}
