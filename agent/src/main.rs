//! flowaudit: an identity-aware flow auditor. One binary: `flowaudit agent`
//! runs the node daemon, `flowaudit observe` prints flows, `flowaudit
//! policy` checks and explains intended policy.

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};
use flowaudit::cli;

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
    #[command(after_long_help = cli::observe::IDENTITY_SOURCES_HELP, after_help = cli::observe::IDENTITY_SOURCES_HELP)]
    Observe(cli::observe::ObserveArgs),
    /// Print a running agent's status (node, uptime, flows, losses, identity, SPIRE, policy), or a relay's (each node's)
    Status(cli::status::StatusArgs),
    /// Serve one stream for the whole cluster: every node's agent over mTLS, merged in time order, with cross-node connections joined on request.
    Relay(flowaudit::relay::RelayArgs),
    /// Check and explain intended policy (FlowPolicy, CiliumNetworkPolicy, NetworkPolicy); no root needed.
    #[command(subcommand)]
    Policy(flowaudit_policy::cli::PolicyCommand),
}

fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::CommandFactory;
            let args: Vec<String> = std::env::args_os()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            let note = cli::env_note(&e, &Cli::command(), &args, |v| std::env::var_os(v));
            let _ = e.print();
            if let Some(note) = note {
                eprintln!("{note}");
            }
            return std::process::ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    let result = match cli.command {
        Command::Agent(args) => cli::agent::run(args),
        Command::Observe(args) => cli::observe::run(&args),
        Command::Status(args) => cli::status::run(&args),
        Command::Relay(args) => flowaudit::relay::run(args),
        Command::Policy(cmd) => {
            let code = cmd.run(&mut std::io::stdout().lock(), &mut std::io::stderr().lock());
            return std::process::ExitCode::from(u8::try_from(code).unwrap_or(1));
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // Already in the JSON log.
        Err(e) if e.is::<flowaudit::runtime::Logged>() => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("flowaudit: {}", flowaudit::cli::error_text(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
