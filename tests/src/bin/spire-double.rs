//! `spire-double CONFIG`: serves SPIRE's Delegated Identity API on the unix
//! socket named in CONFIG (YAML or JSON, see `flowaudit_tests::spire_double`),
//! for the demo and the agent's end-to-end tests. Prints one JSON line
//! `{"ready":true,"socket":...,"pid":...}` once it listens; re-reads CONFIG
//! when it changes (pods, entries, delegates, TTL, delay, version,
//! `authorized`); SIGHUP rotates every SVID now; SIGINT/SIGTERM stop it.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use clap::Parser;
use flowaudit_tests::spire_double::{SpireDouble, SpireDoubleConfig};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(about = "SPIRE Delegated Identity API test double (not a SPIRE agent)")]
struct Args {
    /// Config file: socket, trustDomain, svidTtlSeconds, version, delayMs,
    /// pods, entries, authorizedDelegates, authorized.
    config: PathBuf,
    /// Serve on this socket instead of the config's.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// How often CONFIG is checked for changes.
    #[arg(long, default_value_t = 250)]
    poll_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let load = |args: &Args| -> anyhow::Result<SpireDoubleConfig> {
        let mut c = SpireDoubleConfig::from_file(&args.config)?;
        if let Some(s) = &args.socket {
            c.socket = s.clone();
        }
        Ok(c)
    };
    let config = load(&args)?;
    let double = SpireDouble::start(config.clone())
        .await
        .with_context(|| format!("starting on {}", config.socket.display()))?;
    println!(
        "{}",
        serde_json::json!({"ready": true, "socket": double.socket_path(), "pid": std::process::id(),
                           "trust_domain": double.trust_domain(), "version": config.version})
    );
    let mtime = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut seen: Option<SystemTime> = mtime(&args.config);
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_millis(args.poll_ms.max(20)));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: rotating every SVID");
                double.rotate_now();
            }
            _ = tick.tick() => {
                let now = mtime(&args.config);
                if now != seen {
                    seen = now;
                    match load(&args) {
                        Ok(c) => {
                            double.reconfigure(&c);
                            tracing::info!(pods = c.pods.len(), entries = c.entries.len(), "config reloaded");
                        }
                        Err(e) => tracing::warn!(error = %e, "config change rejected; the last good one stays"),
                    }
                }
            }
        }
    }
    double.stop().await;
    Ok(())
}
