//! flowaudit: an identity-aware flow auditor. One binary: `flowaudit agent`
//! runs the node daemon, `flowaudit observe` prints flows, `flowaudit
//! policy` checks and explains intended policy.

mod capture;
mod cli;
mod export;
mod flow;
mod pipeline;
mod state;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "flowaudit",
    version,
    about = "Audits every pod-to-pod TCP connection against intended zero-trust policy, in SPIFFE terms"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent (needs root): capture every TCP connection on this node.
    Agent(cli::agent::AgentArgs),
    /// Print flow events.
    Observe(cli::observe::ObserveArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Agent(args) => cli::agent::run(args),
        Command::Observe(args) => cli::observe::run(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flowaudit: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
