//! Command-line front ends: `agent` (the daemon), `observe` (print flows),
//! `status` (a running agent's state) and `policy` (check and explain
//! intended policy). Text for humans passes through [`printable`], since
//! what an agent sends (process names, pod names, SPIFFE IDs, messages) is
//! not ours to trust with a terminal.

use std::borrow::Cow;
use std::fmt::Write;

pub mod agent;
pub mod observe;
pub mod status;

/// The TLS of `observe` and `status`: a missing Workload API socket is
/// said at once (see [`crate::export::mtls::TlsArgs::check_socket_now`]).
pub async fn client_tls(
    args: &crate::export::mtls::TlsArgs,
) -> anyhow::Result<crate::export::mtls::ClientTls> {
    args.check_socket_now().map_err(anyhow::Error::msg)?;
    Ok(crate::export::mtls::ClientTls::load(args).await?)
}

/// A note for a command-line error about a flag that was not typed: its
/// value came from its environment variable (clap names only the flag,
/// which leaves `FLOWAUDIT_METRICS_ADDR=bad` a riddle). `args` is the
/// command line, `env` looks a variable up.
pub fn env_note(
    e: &clap::Error,
    cmd: &clap::Command,
    args: &[String],
    env: impl Fn(&std::ffi::OsStr) -> Option<std::ffi::OsString>,
) -> Option<String> {
    use clap::error::{ContextKind, ContextValue};
    let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else {
        return None;
    };
    let long = arg.split_whitespace().next()?.strip_prefix("--")?;
    let scope = args
        .iter()
        .skip(1)
        .find_map(|a| cmd.find_subcommand(a))
        .unwrap_or(cmd);
    let var = scope
        .get_arguments()
        .find(|a| a.get_long() == Some(long))?
        .get_env()?;
    env(var)?;
    let flag = format!("--{long}");
    let typed = args
        .iter()
        .any(|a| *a == flag || a.starts_with(&format!("{flag}=")));
    (!typed).then(|| {
        format!(
            "note: {flag} was not on the command line: the value came from the environment variable {}",
            var.to_string_lossy()
        )
    })
}

/// `s` with everything that could drive or fool a terminal made visible:
/// C0 controls, DEL and C1 controls as `\xNN` (ESC is `\x1b`), bidi
/// overrides, invisible format characters and Unicode line separators as
/// `\u{NNNN}`, and the backslash doubled so an escape cannot be forged.
/// A process may name itself anything (`prctl(PR_SET_NAME)`), so a comm
/// holding `ESC[8m` would otherwise hide the lines after it.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x80 && c.is_control() => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// An error and its causes, `: `-joined as `{e:#}` writes them, without a
/// cause whose text the message before it already holds (our errors name
/// their cause in their own message, and also give it as their source).
/// What a call's error status says, printable, with what to check when it
/// is HTTP/2 failing under gRPC (tonic says only "h2 protocol error: http2
/// error" for a server that wants TLS, or does not speak gRPC).
pub fn call_error(status: &tonic::Status) -> String {
    let message = printable(status.message()).into_owned();
    match message.starts_with("h2 protocol error") {
        true => format!(
            "{message} (does the server want TLS? without --workload-api or --tls-cert this client speaks plaintext; and is it a flowaudit agent or relay, speaking gRPC?)"
        ),
        false => message,
    }
}

/// Connects `status` and `observe` to `--server`: a failure says where,
/// why, and what to check.
pub async fn connect_server(
    server: &str,
    tls: &crate::export::mtls::ClientTls,
) -> anyhow::Result<
    crate::export::proto::flow_audit_client::FlowAuditClient<tonic::transport::Channel>,
> {
    crate::export::grpc::connect_tls(server, tls)
        .await
        .map_err(|e| match e {
            crate::export::grpc::GrpcError::Connect { .. } => anyhow::anyhow!(
                "{e} (is a flowaudit agent or relay running there? --server names it)"
            ),
            other => other.into(),
        })
}

pub use crate::runtime::error_text;

fn needs_escape(c: char) -> bool {
    c == '\\'
        || c.is_control() // C0, DEL, C1
        || matches!(c,
            '\u{061c}'                    // Arabic letter mark
            | '\u{200b}'..='\u{200f}'     // zero-width characters, LRM, RLM
            | '\u{2028}'..='\u{202e}'     // line/paragraph separators, bidi embeddings and overrides
            | '\u{2060}'..='\u{2069}'     // word joiner, invisible operators, bidi isolates
            | '\u{feff}') // zero-width no-break space
}

#[cfg(test)]
mod tests {
    use super::{env_note, error_text, printable};

    #[test]
    fn an_error_names_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("cannot read directory {path}: {source}")]
        struct Read {
            path: &'static str,
            source: std::io::Error,
        }
        let io = || std::io::Error::from(std::io::ErrorKind::NotFound);
        let e = anyhow::Error::new(Read {
            path: "/x",
            source: io(),
        });
        assert_eq!(
            error_text(&e),
            format!("cannot read directory /x: {}", io())
        );
        // A cause the message does not hold is kept, as `{:#}` keeps it.
        let e = anyhow::Error::new(io()).context("starting");
        assert_eq!(error_text(&e), format!("starting: {}", io()));
    }

    #[test]
    fn printable_escapes_what_drives_or_fools_a_terminal() {
        for (raw, shown) in [
            ("frontend", "frontend"),
            ("node\x1b[8m", "node\\x1b[8m"),
            ("a\nb\rc\td\0", "a\\x0ab\\x0dc\\x09d\\x00"),
            ("del\x7f", "del\\x7f"),
            ("csi\u{9b}8m", "csi\\u{9b}8m"),
            ("gnp.exe\u{202e}", "gnp.exe\\u{202e}"),
            ("back\\x1b", "back\\\\x1b"),
            ("zero\u{200b}width\u{feff}", "zero\\u{200b}width\\u{feff}"),
            ("line\u{2028}sep", "line\\u{2028}sep"),
            ("ünïcödé 名前", "ünïcödé 名前"),
        ] {
            assert_eq!(printable(raw), shown, "escaping {raw:?}");
        }
        assert!(matches!(printable("plain"), std::borrow::Cow::Borrowed(_)));
    }

    /// HTTP/2 failing under gRPC (plaintext to a TLS server: seen against
    /// a relay with --tls-cert, 2026-12-07) says what to check; other
    /// answers are told as they are.
    /// A command asked to use a Workload API socket that does not exist
    /// says so before it dials anything (it waited 30 s for the socket).
    #[test]
    fn a_missing_workload_api_socket_is_said_at_once() {
        let args = crate::export::mtls::TlsArgs {
            workload_api: Some("unix:///nonexistent/spire/agent.sock".into()),
            allow_peer: vec!["spiffe://demo.local/ns/flowaudit/sa/flowaudit".into()],
            ..Default::default()
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // A paused clock: a wait of any length would fail the timeout below
        // at once, so this asserts there was no wait at all, not a time.
        let e = rt.block_on(async {
            tokio::time::pause();
            tokio::time::timeout(
                std::time::Duration::from_millis(1),
                super::client_tls(&args),
            )
            .await
            .expect("the command waited for the socket")
            .err()
            .expect("refused")
            .to_string()
        });
        assert_eq!(
            e,
            "--workload-api unix:///nonexistent/spire/agent.sock: the socket does not exist: is the SPIRE agent running on this machine, and is that its socket_path?"
        );
    }

    #[test]
    fn an_http2_failure_says_what_to_check() {
        let h2 = tonic::Status::unknown("h2 protocol error: http2 error");
        assert_eq!(
            super::call_error(&h2),
            "h2 protocol error: http2 error (does the server want TLS? without --workload-api or --tls-cert this client speaks plaintext; and is it a flowaudit agent or relay, speaking gRPC?)"
        );
        let other = tonic::Status::resource_exhausted("too many stream subscribers (1)");
        assert_eq!(super::call_error(&other), "too many stream subscribers (1)");
    }

    #[test]
    fn a_bad_value_from_the_environment_names_its_variable() {
        use clap::{Arg, Command};
        let cmd = Command::new("flowaudit").subcommand(
            Command::new("agent").arg(
                Arg::new("addr")
                    .long("metrics-addr")
                    .env("FLOWAUDIT_METRICS_ADDR")
                    .value_parser(clap::value_parser!(std::net::SocketAddr)),
            ),
        );
        let env = |v: &std::ffi::OsStr| (v == "FLOWAUDIT_METRICS_ADDR").then(|| "bad".into());
        // The error clap gives for the bad value (the test's own
        // environment has no such variable: the value is typed here), and
        // the command line as the user wrote it.
        let e = cmd
            .clone()
            .try_get_matches_from(["flowaudit", "agent", "--metrics-addr", "bad"])
            .unwrap_err();
        let note = |args: &[&str]| {
            let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            env_note(&e, &cmd, &args, env)
        };
        assert_eq!(
            note(&["flowaudit", "agent"]).as_deref(),
            Some(
                "note: --metrics-addr was not on the command line: the value came from the environment variable FLOWAUDIT_METRICS_ADDR"
            )
        );
        // Typed: the flag is named, as clap does.
        assert_eq!(note(&["flowaudit", "agent", "--metrics-addr", "x"]), None);
        assert_eq!(note(&["flowaudit", "agent", "--metrics-addr=x"]), None);
    }
}
