//! `flowaudit status`: asks a running agent (gRPC `ServerStatus`) for its
//! node, uptime, flows seen, kernel losses, stream subscribers, identity
//! cache, SPIRE connection and policy version, and prints them as aligned
//! text or JSON. Parts whose stage has not reported say "not available".

use std::io::Write;

use clap::{Args, ValueEnum};

use super::printable;
use crate::export::grpc;
use crate::export::proto;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatusOutput {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The agent's gRPC address: unix:///PATH or HOST:PORT.
    #[arg(long, env = "FLOWAUDIT_SERVER", default_value = grpc::DEFAULT_ADDR, value_name = "ADDR", value_parser = grpc::addr_arg)]
    pub server: String,
    #[command(flatten)]
    pub tls: crate::export::mtls::TlsArgs,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = StatusOutput::Text)]
    pub output: StatusOutput,
}

pub fn run(args: &StatusArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let status = runtime.block_on(async {
        let tls = super::client_tls(&args.tls).await?;
        let mut client = super::connect_server(&args.server, &tls).await?;
        let status = tokio::time::timeout(
            grpc::ANSWER_WAIT,
            client.server_status(proto::ServerStatusRequest {}),
        )
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "the agent at {} did not answer within {} s",
                args.server,
                grpc::ANSWER_WAIT.as_secs()
            )
        })?
        .map_err(|s| {
            anyhow::anyhow!(
                "the agent at {} answered with an error: {}",
                args.server,
                super::call_error(&s)
            )
        })?;
        anyhow::Ok(status.into_inner())
    })?;
    let mut out = std::io::stdout().lock();
    match args.output {
        StatusOutput::Text => out.write_all(render(&status).as_bytes())?,
        StatusOutput::Json => {
            writeln!(out, "{}", serde_json::to_string_pretty(&as_json(&status))?)?
        }
    }
    Ok(())
}

const NA: &str = "not available";

fn uptime(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s:02}s"),
        (0, _, _) => format!("{h}h{m:02}m{s:02}s"),
        _ => format!("{d}d{h:02}h{m:02}m"),
    }
}

fn node_state(state: i32) -> &'static str {
    proto::NodeState::try_from(state).map_or("unknown", crate::relay::peers::state_name)
}

/// A relay's status: itself, then one block per node.
fn render_relay(s: &proto::ServerStatusResponse) -> String {
    let connected = s
        .nodes
        .iter()
        .filter(|n| matches!(node_state(n.state), "connected" | "back"))
        .count();
    // The relay serves with no node connected, but has nothing to merge.
    let nodes = match s.not_ready_reason.as_str() {
        "" => format!("{connected}/{} connected", s.nodes.len()),
        why => format!(
            "{connected}/{} connected ({}: no flows until one is)",
            s.nodes.len(),
            printable(why)
        ),
    };
    let mut out = format!(
        "Relay:              {}\nVersion:            {}\nUptime:             {}\nNodes:              {nodes}\nFlows merged:       {}\nFlow buffer:        {}/{}\nStream subscribers: {} ({} flows dropped for slow subscribers)\n",
        printable(&s.node_name),
        printable(&s.version),
        uptime(s.uptime_seconds),
        s.flows_seen,
        s.flows_buffered,
        s.flow_buffer_capacity,
        s.subscribers,
        s.stream_dropped,
    );
    for n in &s.nodes {
        out.push_str(&format!(
            "  {} ({}): {}, {} flows, {} lost, {} connections",
            printable(&n.node_name),
            printable(&n.address),
            node_state(n.state),
            n.flows,
            n.lost,
            n.connects
        ));
        if !n.detail.is_empty() {
            out.push_str(&format!("; {}", printable(&n.detail)));
        }
        out.push('\n');
        if let Some(st) = &n.status {
            out.push_str(&format!(
                "    agent {}: up {}, {} flows seen, {} kernel events lost, ready: {}\n",
                printable(&st.version),
                uptime(st.uptime_seconds),
                st.flows_seen,
                st.kernel_events_lost,
                if st.ready { "yes" } else { "no" }
            ));
        }
    }
    out
}

/// The text form: one `Label: value` per line, labels aligned.
pub fn render(s: &proto::ServerStatusResponse) -> String {
    if s.relay {
        return render_relay(s);
    }
    let ready = if s.ready {
        "yes".to_owned()
    } else {
        format!("no ({})", s.not_ready_reason)
    };
    let spire_disabled = s.spire.as_ref().is_some_and(|sp| sp.mode == "disabled");
    let identity = match &s.identity_cache {
        Some(c) => format!("{} entries", c.entries),
        // Only SPIRE's answers are cached.
        None if spire_disabled => "none kept (SPIRE disabled)".to_owned(),
        None => NA.to_owned(),
    };
    let spire = s.spire.as_ref().map_or(NA.to_owned(), |sp| {
        let state = if sp.connected {
            "connected"
        } else if sp.mode == "disabled" {
            "disabled"
        } else {
            "disconnected"
        };
        let mut v = if sp.socket.is_empty() {
            state.to_owned()
        } else {
            format!("{state} ({})", sp.socket)
        };
        if sp.connected && !sp.mode.is_empty() {
            v.push_str(&format!(", asking by {}", sp.mode));
        }
        if !sp.detail.is_empty() && sp.mode != "disabled" {
            v.push_str(&format!(": {}", sp.detail));
        } else if sp.mode == "disabled" {
            v.push_str(": local ends get DERIVED identities from their pod");
        }
        v
    });
    let policy = s.policy.as_ref().map_or(NA.to_owned(), |p| {
        let mut v = if p.version.is_empty() {
            "none (the agent runs without --policy: flows are not judged against one)".to_owned()
        } else {
            format!("{} ({} rules)", p.version, p.rules)
        };
        if !p.last_error.is_empty() {
            v.push_str(&format!("; last reload rejected: {}", p.last_error));
        }
        v
    });
    let rows = [
        ("Node", s.node_name.clone()),
        ("Version", s.version.clone()),
        ("Uptime", uptime(s.uptime_seconds)),
        ("Ready", ready),
        ("Flows seen", s.flows_seen.to_string()),
        ("Kernel events", s.kernel_events.to_string()),
        ("Kernel events lost", s.kernel_events_lost.to_string()),
        (
            "Flow buffer",
            format!("{}/{}", s.flows_buffered, s.flow_buffer_capacity),
        ),
        (
            "Stream subscribers",
            format!(
                "{} ({} flows dropped for slow subscribers)",
                s.subscribers, s.stream_dropped
            ),
        ),
        ("Identity cache", identity),
        ("SPIRE connection", spire),
        ("Policy version", policy),
    ];
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    let mut out: String = rows
        .iter()
        .map(|(k, v)| format!("{:<width$} {}\n", format!("{k}:"), printable(v)))
        .collect();
    let kernel = if s.kernel_degradations.is_empty() {
        "every feature available".to_owned()
    } else {
        let names: Vec<&str> = s
            .kernel_degradations
            .iter()
            .map(|d| d.name.as_str())
            .collect();
        format!("degraded: {}", printable(&names.join(", ")))
    };
    out.push_str(&format!("{:<width$} {kernel}\n", "Kernel:"));
    for d in &s.kernel_degradations {
        out.push_str(&format!(
            "  {}: {} ({})\n",
            printable(&d.name),
            printable(&d.lost),
            printable(&d.reason)
        ));
    }
    if let Some(c) = &s.cilium {
        out.push_str(&format!("{:<width$} {}\n", "Cilium:", printable(&c.detail)));
    }
    let losses: Vec<&proto::KernelLoss> = s.kernel_losses.iter().filter(|l| l.count > 0).collect();
    if losses.is_empty() {
        out.push_str(&format!("{:<width$} none\n", "Kernel losses:"));
    } else {
        out.push_str("Kernel losses:\n");
        for l in losses {
            out.push_str(&format!("  {}: {} ({})\n", l.place, l.count, l.consequence));
        }
    }
    out
}

fn as_json(s: &proto::ServerStatusResponse) -> serde_json::Value {
    serde_json::json!({
        "node_name": s.node_name,
        "version": s.version,
        "uptime_seconds": s.uptime_seconds,
        "ready": s.ready,
        "not_ready_reason": s.not_ready_reason,
        "flows_seen": s.flows_seen,
        "kernel_events": s.kernel_events,
        "kernel_events_lost": s.kernel_events_lost,
        "flows_buffered": s.flows_buffered,
        "flow_buffer_capacity": s.flow_buffer_capacity,
        "subscribers": s.subscribers,
        "stream_dropped": s.stream_dropped,
        "identity_cache": s.identity_cache.as_ref().map(|c| serde_json::json!({"entries": c.entries})),
        "spire": s.spire.as_ref().map(|p| serde_json::json!({"connected": p.connected, "socket": p.socket, "mode": p.mode, "detail": p.detail})),
        "policy": s.policy.as_ref().map(|p| serde_json::json!({"version": p.version, "rules": p.rules, "last_error": p.last_error})),
        "kernel_degradations": s.kernel_degradations.iter().map(|d| serde_json::json!({"name": d.name, "reason": d.reason, "lost": d.lost})).collect::<Vec<_>>(),
        "kernel_losses": s.kernel_losses.iter().map(|l| serde_json::json!({"place": l.place, "count": l.count, "consequence": l.consequence, "loses_flow_events": l.loses_flow_events})).collect::<Vec<_>>(),
        "cilium": s.cilium.as_ref().map(|c| serde_json::json!({"maps_found": c.maps_found, "detail": c.detail})),
        "relay": s.relay,
        "nodes": s.nodes.iter().map(|n| serde_json::json!({
            "node_name": n.node_name,
            "address": n.address,
            "state": node_state(n.state).to_ascii_uppercase(),
            "detail": n.detail,
            "flows": n.flows,
            "lost": n.lost,
            "connects": n.connects,
            "status": n.status.as_ref().map(as_json),
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_status_says_not_available_for_stages_that_did_not_report() {
        let s = proto::ServerStatusResponse {
            node_name: "precinct-99-worker".into(),
            version: "0.1.0".into(),
            uptime_seconds: 3723,
            flows_seen: 42,
            kernel_events: 50,
            flow_buffer_capacity: 8192,
            flows_buffered: 42,
            ready: true,
            spire: Some(proto::SpireStatus {
                connected: true,
                socket: "/run/spire/admin-sockets/admin.sock".into(),
                mode: "selectors".into(),
                detail: String::new(),
            }),
            ..Default::default()
        };
        assert_eq!(
            render(&s),
            "\
Node:               precinct-99-worker
Version:            0.1.0
Uptime:             1h02m03s
Ready:              yes
Flows seen:         42
Kernel events:      50
Kernel events lost: 0
Flow buffer:        42/8192
Stream subscribers: 0 (0 flows dropped for slow subscribers)
Identity cache:     not available
SPIRE connection:   connected (/run/spire/admin-sockets/admin.sock), asking by selectors
Policy version:     not available
Kernel:             every feature available
Kernel losses:      none
"
        );
    }

    /// An agent run with `--spire-admin-socket none` and no `--policy`
    /// says so, rather than "not available" for ever.
    #[test]
    fn text_status_names_what_the_agent_runs_without() {
        let s = proto::ServerStatusResponse {
            spire: Some(proto::SpireStatus {
                connected: false,
                socket: String::new(),
                mode: "disabled".into(),
                detail: "SPIRE attestation disabled".into(),
            }),
            policy: Some(proto::PolicyStatus::default()),
            ..Default::default()
        };
        let text = render(&s);
        for line in [
            "Identity cache:     none kept (SPIRE disabled)\n",
            "SPIRE connection:   disabled: local ends get DERIVED identities from their pod\n",
            "Policy version:     none (the agent runs without --policy: flows are not judged against one)\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
        assert!(!text.contains(NA), "{text}");
    }

    #[test]
    fn text_status_says_what_was_found_of_cilium() {
        let s = proto::ServerStatusResponse {
            cilium: Some(proto::CiliumStatus {
                maps_found: false,
                detail: "/sys/fs/bpf/tc/globals/cilium_auth_map: No such file or directory (os error 2); Cilium mutual authentication not observable here".into(),
            }),
            ..Default::default()
        };
        let text = render(&s);
        assert!(
            text.contains(
                "\nCilium:             /sys/fs/bpf/tc/globals/cilium_auth_map: No such file"
            ),
            "{text}"
        );
        assert_eq!(as_json(&s)["cilium"]["maps_found"], false);
    }

    #[test]
    fn text_status_lists_every_place_that_lost_something() {
        let s = proto::ServerStatusResponse {
            kernel_losses: vec![
                proto::KernelLoss {
                    place: "ring_full_connect".into(),
                    count: 0,
                    consequence: "CONNECT events not reported (ring buffer full)".into(),
                    loses_flow_events: true,
                },
                proto::KernelLoss {
                    place: "payload_map_full".into(),
                    count: 7,
                    consequence: "connections whose payload was not watched (--payload-sockets reached): encryption not seen".into(),
                    loses_flow_events: false,
                },
            ],
            ..Default::default()
        };
        let text = render(&s);
        assert!(
            text.ends_with(
                "Kernel losses:\n  payload_map_full: 7 (connections whose payload was not watched (--payload-sockets reached): encryption not seen)\n"
            ),
            "{text}"
        );
        assert!(!text.contains("ring_full_connect"), "{text}");
        let j = as_json(&s);
        assert_eq!(j["kernel_losses"][1]["place"], "payload_map_full");
        assert_eq!(j["kernel_losses"][1]["count"], 7);
    }

    #[test]
    fn text_status_says_why_spire_is_not_connected() {
        let mut s = proto::ServerStatusResponse {
            spire: Some(proto::SpireStatus {
                connected: false,
                socket: "/run/spire/admin-sockets/admin.sock".into(),
                mode: "unknown".into(),
                detail: "nothing listens on SPIRE admin socket /run/spire/admin-sockets/admin.sock; meanwhile local ends get DERIVED identities".into(),
            }),
            ..Default::default()
        };
        let text = render(&s);
        assert!(
            text.contains("SPIRE connection:   disconnected (/run/spire/admin-sockets/admin.sock): nothing listens")
                && text.contains("DERIVED"),
            "{text}"
        );
        s.spire = Some(proto::SpireStatus {
            mode: "disabled".into(),
            ..Default::default()
        });
        let text = render(&s);
        assert!(
            text.contains("SPIRE connection:   disabled: local ends get DERIVED identities"),
            "{text}"
        );
    }

    #[test]
    fn text_status_escapes_hostile_strings_from_the_agent() {
        let s = proto::ServerStatusResponse {
            node_name: "n1\x1b[8m".into(),
            version: "0.1\r".into(),
            not_ready_reason: "wait\x07".into(),
            policy: Some(proto::PolicyStatus {
                version: "v\u{202e}2".into(),
                rules: 1,
                last_error: "bad\nline".into(),
                ..Default::default()
            }),
            kernel_degradations: vec![proto::KernelDegradation {
                name: "k\x1b".into(),
                reason: "r\u{9b}".into(),
                lost: "l\x7f".into(),
            }],
            ..Default::default()
        };
        let text = render(&s);
        for line in [
            "Node:               n1\\x1b[8m\n",
            "Version:            0.1\\x0d\n",
            "Ready:              no (wait\\x07)\n",
            "Policy version:     v\\u{202e}2 (1 rules); last reload rejected: bad\\x0aline\n",
            "Kernel:             degraded: k\\x1b\n  k\\x1b: l\\x7f (r\\u{9b})\n",
        ] {
            assert!(text.contains(line), "expected {line:?} in:\n{text}");
        }
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "{text:?}"
        );
    }

    #[test]
    fn text_status_names_each_kernel_degradation_and_what_it_costs() {
        let s = proto::ServerStatusResponse {
            kernel_degradations: vec![proto::KernelDegradation {
                name: "kernel_reads".into(),
                reason: "kernel lockdown is in confidentiality mode".into(),
                lost: "no process start times".into(),
            }],
            ..Default::default()
        };
        let text = render(&s);
        assert!(
            text.contains(
                "Kernel:             degraded: kernel_reads\n  kernel_reads: no process start times (kernel lockdown is in confidentiality mode)\n"
            ),
            "{text}"
        );
        assert_eq!(
            as_json(&s)["kernel_degradations"][0]["name"],
            "kernel_reads"
        );
    }

    #[test]
    fn a_relay_lists_its_nodes_with_their_state() {
        let s = proto::ServerStatusResponse {
            node_name: "relay-0".into(),
            version: "0.1.0".into(),
            uptime_seconds: 61,
            flows_seen: 7,
            relay: true,
            nodes: vec![
                proto::NodeStatus {
                    node_name: "precinct-99-worker".into(),
                    address: "10.244.1.2:4244".into(),
                    state: proto::NodeState::Connected as i32,
                    flows: 5,
                    connects: 1,
                    ..Default::default()
                },
                proto::NodeStatus {
                    node_name: "precinct-99-worker2".into(),
                    address: "10.244.2.2:4244".into(),
                    state: proto::NodeState::Unavailable as i32,
                    detail: "the stream broke: \x1b[2J".into(),
                    flows: 2,
                    lost: 3,
                    connects: 1,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let text = render(&s);
        assert!(text.contains("Nodes:              1/2 connected"), "{text}");
        assert!(
            text.contains("  precinct-99-worker (10.244.1.2:4244): connected, 5 flows, 0 lost, 1 connections\n"),
            "{text}"
        );
        assert!(
            text.contains("precinct-99-worker2 (10.244.2.2:4244): unavailable, 2 flows, 3 lost, 1 connections; the stream broke: \\x1b[2J"),
            "{text}"
        );
        let json = as_json(&s);
        assert_eq!(json["nodes"][1]["state"], "UNAVAILABLE");
        assert_eq!(json["relay"], true);

        // None connected: the relay says it has nothing to merge.
        let none = proto::ServerStatusResponse {
            nodes: vec![s.nodes[1].clone()],
            not_ready_reason: "no node connected".into(),
            ..s
        };
        let text = render(&none);
        assert!(
            text.contains(
                "Nodes:              0/1 connected (no node connected: no flows until one is)\n"
            ),
            "{text}"
        );
    }
}
