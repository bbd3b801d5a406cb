//! The precinct-99 reference scenario (PRODUCT.md) on a simulated node: its
//! five workloads as pods with their servers listening, a client outside the
//! cluster, the endpoint directory describing them, the sprint log's
//! misconfigured network policy (postgresql drops openbao's connections, an
//! nftables rule in the pod), and one round of the scenario's traffic with
//! what flowaudit is expected to say about each flow. Shared by the demo and
//! the scenario tests.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};

use crate::simpod::{ConnRecord, ConnectOpts, ServeOpts, Server};
use crate::{Pod, PodSpec, SimError, SimNode};

pub const NODE_NAME: &str = "precinct-99-worker";

/// One kind of scenario traffic and the verdict the intended policy
/// (`deploy/examples/scenario/precinct-99-scenario.yaml`) gives it.
#[derive(Debug, Clone, Copy)]
pub struct ScenarioFlow {
    pub label: &'static str,
    /// Index into `Precinct99::workloads`, or `None` for the outside client.
    pub from: Option<usize>,
    pub to: usize,
    pub event: &'static str,
    pub verdict: &'static str,
    /// A finding that must be present (or "" for none required).
    pub finding: &'static str,
    pub why: &'static str,
}

pub const FRONTEND: usize = 0;
pub const BACKEND: usize = 1;
pub const POSTGRESQL: usize = 2;
pub const OPENBAO: usize = 3;
pub const SPIRE_SERVER: usize = 4;

pub const SCENARIO: [ScenarioFlow; 7] = [
    ScenarioFlow {
        label: "world -> frontend:3000",
        from: None,
        to: FRONTEND,
        event: "CONNECT",
        verdict: "COMPLIANT",
        finding: "",
        why: "intended",
    },
    ScenarioFlow {
        label: "frontend -> backend:8000",
        from: Some(FRONTEND),
        to: BACKEND,
        event: "CONNECT",
        verdict: "VIOLATION",
        finding: "MTLS_MISSING",
        why: "the log's test: intended, but plaintext where mTLS is required",
    },
    ScenarioFlow {
        label: "backend -> postgresql:5432",
        from: Some(BACKEND),
        to: POSTGRESQL,
        event: "CONNECT",
        verdict: "COMPLIANT",
        finding: "",
        why: "intended",
    },
    ScenarioFlow {
        label: "frontend -> postgresql:5432",
        from: Some(FRONTEND),
        to: POSTGRESQL,
        event: "CONNECT",
        verdict: "VIOLATION",
        finding: "DENIED_BY_RULE",
        why: "the log's test: must be flagged",
    },
    ScenarioFlow {
        label: "openbao -> postgresql:5432",
        from: Some(OPENBAO),
        to: POSTGRESQL,
        event: "FAILED",
        verdict: "COMPLIANT",
        finding: "INTENDED_FLOW_FAILED",
        why: "intended, but a network policy drops it (the log's Phase 4D)",
    },
    ScenarioFlow {
        label: "backend -> openbao:8200",
        from: Some(BACKEND),
        to: OPENBAO,
        event: "CONNECT",
        verdict: "COMPLIANT",
        finding: "",
        why: "intended",
    },
    ScenarioFlow {
        label: "frontend -> spire-server:8081",
        from: Some(FRONTEND),
        to: SPIRE_SERVER,
        event: "CONNECT",
        verdict: "COMPLIANT",
        finding: "",
        why: "intended",
    },
];

pub struct Workload {
    pub pod: Pod,
    pub port: u16,
}

pub struct Precinct99 {
    pub workloads: Vec<Workload>,
    pub world: Pod,
    servers: Vec<Option<Server>>,
    /// Dropped last: pods and their processes go with it.
    pub node: SimNode,
}

impl Precinct99 {
    /// Builds the node, starts every workload's server, and installs the
    /// misconfigured policy that drops openbao -> postgresql.
    pub fn start(index: u8) -> Result<Self, SimError> {
        Self::start_named(index, NODE_NAME)
    }

    /// [`Precinct99::start`] on a node named `name` (kind names a cluster's
    /// workers `<cluster>-worker`, `<cluster>-worker2`, ...).
    pub fn start_named(index: u8, name: &str) -> Result<Self, SimError> {
        let node = SimNode::named(index, name)?;
        let specs = [
            ("99-apps", "frontend-7d9f", "frontend", 3000),
            ("99-apps", "backend-5c8b", "backend", 8000),
            ("99-apps", "postgresql-0", "postgresql", 5432),
            ("openbao", "openbao-0", "openbao", 8200),
            ("spire-system", "spire-server-0", "spire-server", 8081),
        ];
        let mut workloads = Vec::new();
        for (ns, name, app, port) in specs {
            let pod = node.add_pod(
                PodSpec::new(ns, name)
                    .service_account(app)
                    .label("app", app),
            )?;
            workloads.push(Workload { pod, port });
        }
        let world = node.add_pod(PodSpec::new("", "external-client"))?;
        drop_in_pod(
            &workloads[POSTGRESQL].pod,
            workloads[OPENBAO].pod.ip4(),
            5432,
        )?;
        let servers = workloads
            .iter()
            .map(|w| {
                w.pod
                    .serve(&ServeOpts {
                        listen: vec![SocketAddr::new("0.0.0.0".parse().expect("literal"), w.port)],
                        reply_bytes: 64,
                    })
                    .map(Some)
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            workloads,
            world,
            servers,
            node,
        })
    }

    /// The endpoint directory (`--endpoints`) in the PRODUCT.md format: the
    /// workloads and the node; the outside client is in neither list.
    /// Stops workload `i`'s plaintext server, freeing its port (e.g. for a
    /// TLS server in its place).
    pub fn stop_server(&mut self, i: usize) {
        if let Some(s) = self.servers.get_mut(i) {
            drop(s.take());
        }
    }

    pub fn endpoint_directory(&self) -> String {
        self.endpoint_directory_on(self.node.name())
    }

    /// The directory with this node named `node` (the agent's `--node-name`:
    /// pods the directory places on the agent's node are same-node peers).
    pub fn endpoint_directory_on(&self, node: &str) -> String {
        let mut y = format!(
            "nodes:\n  - name: {node}\n    ips: [{}, \"{}\"]\nendpoints:\n",
            self.node.ip4(),
            self.node.ip6()
        );
        for w in &self.workloads {
            y.push_str(&endpoint_entry(&w.pod, node));
        }
        y
    }

    pub fn write_endpoint_directory(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.endpoint_directory())
    }

    /// The agent on this node as the DaemonSet runs it, with the endpoint
    /// directory (written to `dir/endpoints.yaml`), `policy`, then `extra`.
    pub fn agent(&self, dir: &Path, policy: &Path, extra: &[&str]) -> crate::agent::RunningAgent {
        let endpoints = dir.join("endpoints.yaml");
        self.write_endpoint_directory(&endpoints)
            .unwrap_or_else(|e| panic!("writing {}: {e}", endpoints.display()));
        let mut args = vec![
            "--endpoints",
            endpoints.to_str().expect("UTF-8 temp path"),
            "--policy",
            policy.to_str().expect("UTF-8 policy path"),
        ];
        args.extend_from_slice(extra);
        crate::support::node_agent(&self.node, &args)
    }

    /// A SPIRE stand-in configuration that knows these pods and has one
    /// registration entry per workload, by namespace and service account (as
    /// a ClusterSPIFFEID would make them). Let the agent in with
    /// `set_authorized(true)`: an entry by `unix:uid:0` would also match the
    /// pods' own root processes.
    pub fn spire_double_config(
        &self,
        socket: std::path::PathBuf,
        version: &str,
    ) -> crate::spire_double::SpireDoubleConfig {
        // Served from the test process, it attests pids as a SPIRE agent in
        // the node (hostPID) does: through the node's procfs.
        let mut cfg = crate::spire_double::SpireDoubleConfig::new(socket, "demo.local")
            .ttl(3600)
            .version(version)
            .proc_root(format!("/proc/{}/root/proc", self.node.init_pid()));
        for w in &self.workloads {
            let p = &w.pod;
            cfg = cfg
                .pod(p.uid(), p.namespace(), p.service_account(), p.name())
                .entry(
                    &format!(
                        "spiffe://demo.local/ns/{}/sa/{}",
                        p.namespace(),
                        p.service_account()
                    ),
                    &[
                        &format!("k8s:ns:{}", p.namespace()),
                        &format!("k8s:sa:{}", p.service_account()),
                    ],
                );
        }
        cfg
    }

    /// Checks the identities in every event of the scenario's connections
    /// with SPIRE present: every pod end whose socket is on this node (the
    /// local end, and the peer of an established same-node connection) is
    /// ATTESTED with its SPIFFE ID; the peer of a connection that never
    /// established is DERIVED, saying so; the outside client is `world`.
    /// Returns the tally, or what was wrong.
    ///
    /// `degradations` are the agent's: with `listener_scan` the servers,
    /// which listen before the agent starts, have no owner on this kernel,
    /// so their ends (the local end of INGRESS events, the peer of EGRESS
    /// ones) must be DERIVED, saying why, and are counted apart.
    pub fn check_attested(
        &self,
        flows: &[serde_json::Value],
        runs: &[(&ScenarioFlow, ConnRecord)],
        degradations: &[String],
    ) -> Result<IdentityTally, String> {
        let servers_unowned = degradations.iter().any(|d| d == "listener_scan");
        let mut t = IdentityTally::default();
        let mut wrong = Vec::new();
        for (flow, rec) in runs {
            let Some(local) = rec.local else {
                wrong.push(format!("{}: no client address", flow.label));
                continue;
            };
            let events: Vec<&serde_json::Value> =
                crate::agent::flows_between(flows, local, rec.remote).collect();
            if events.is_empty() {
                wrong.push(format!("{}: no events", flow.label));
            }
            for e in events {
                let egress = e["direction"] == "EGRESS";
                let (client, server) = (flow.from, Some(flow.to));
                let (me, peer, my_end, peer_end) = if egress {
                    (client, server, &e["source"], &e["destination"])
                } else {
                    (server, client, &e["destination"], &e["source"])
                };
                let failed = e["event"] == "FAILED";
                for (who, end, is_local) in [(me, my_end, true), (peer, peer_end, false)] {
                    let Some(i) = who else {
                        if end["kind"] != "WORLD" {
                            wrong.push(format!("{}: outside client not WORLD: {e}", flow.label));
                        }
                        continue;
                    };
                    let pod = &self.workloads[i].pod;
                    let id = format!(
                        "spiffe://demo.local/ns/{}/sa/{}",
                        pod.namespace(),
                        pod.service_account()
                    );
                    if end["spiffe_id"] != id.as_str() {
                        wrong.push(format!(
                            "{}: {} should be {id}: {e}",
                            flow.label, end["spiffe_id"]
                        ));
                    }
                    let source = end["identity_source"].as_str().unwrap_or("");
                    // The server's end: local on INGRESS, the peer on EGRESS.
                    let server_end = is_local != egress;
                    let (total, attested) = if servers_unowned && server_end && !failed {
                        (&mut t.unowned_servers, &mut t.unowned_servers_derived)
                    } else if is_local {
                        (&mut t.local_total, &mut t.local_attested)
                    } else if failed {
                        (&mut t.unconnected_peers, &mut t.unconnected_peers_derived)
                    } else {
                        (&mut t.peer_total, &mut t.peer_attested)
                    };
                    *total += 1;
                    let expected = if (!is_local && failed) || (servers_unowned && server_end) {
                        "DERIVED"
                    } else {
                        "ATTESTED"
                    };
                    if source == expected {
                        *attested += 1;
                    } else {
                        wrong.push(format!(
                            "{}: {} end {source}, expected {expected}: {e}",
                            flow.label,
                            if is_local { "local" } else { "peer" }
                        ));
                    }
                    if source == "DERIVED"
                        && end["identity_detail"].as_str().unwrap_or("").is_empty()
                    {
                        wrong.push(format!("{}: a DERIVED end must say why: {e}", flow.label));
                    }
                }
            }
        }
        if wrong.is_empty() {
            Ok(t)
        } else {
            Err(format!("{t}\n{}", wrong.join("\n")))
        }
    }

    /// Runs one connection of a scenario flow; returns what the client saw.
    pub fn run(&self, flow: &ScenarioFlow) -> Result<ConnRecord, SimError> {
        let client = flow.from.map_or(&self.world, |i| &self.workloads[i].pod);
        let to = &self.workloads[flow.to];
        let mut opts = ConnectOpts::new(SocketAddr::new(IpAddr::V4(to.pod.ip4()), to.port));
        opts.send_bytes = 200;
        opts.timeout_ms = 1000;
        let report = client.connect(&opts)?;
        report
            .records
            .into_iter()
            .next()
            .ok_or_else(|| SimError::Other(format!("{}: simpod printed no record", flow.label)))
    }
}

/// Pod ends counted by [`Precinct99::check_attested`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IdentityTally {
    pub local_total: usize,
    pub local_attested: usize,
    /// Peers of established same-node connections.
    pub peer_total: usize,
    pub peer_attested: usize,
    /// Peers of connections that never established (no peer socket).
    pub unconnected_peers: usize,
    pub unconnected_peers_derived: usize,
    /// Server ends whose listener predates an agent that could not recover
    /// it (the `listener_scan` degradation): DERIVED.
    pub unowned_servers: usize,
    pub unowned_servers_derived: usize,
}

impl std::fmt::Display for IdentityTally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "local pod ends ATTESTED {}/{}, same-node peers ATTESTED {}/{}, peers of unestablished connections DERIVED {}/{}",
            self.local_attested,
            self.local_total,
            self.peer_attested,
            self.peer_total,
            self.unconnected_peers_derived,
            self.unconnected_peers
        )?;
        if self.unowned_servers > 0 {
            write!(
                f,
                ", server ends of listeners older than the agent DERIVED (listener_scan) {}/{}",
                self.unowned_servers_derived, self.unowned_servers
            )?;
        }
        Ok(())
    }
}

/// One pod's entry in an endpoint directory (`--endpoints` YAML), labelled
/// `app: <service account>`.
pub fn endpoint_entry(p: &Pod, node: &str) -> String {
    format!(
        "  - ips: [{}, \"{}\"]\n    namespace: {}\n    pod: {}\n    uid: {}\n    serviceAccount: {}\n    labels: {{app: {}}}\n    node: {node}\n",
        p.ip4(),
        p.ip6(),
        p.namespace(),
        p.name(),
        p.uid(),
        p.service_account(),
        p.service_account()
    )
}

/// Drops TCP traffic from `from` to `port` inside the pod: an nftables rule
/// in the pod's own network namespace, standing in for a network policy.
pub fn drop_in_pod(pod: &Pod, from: std::net::Ipv4Addr, port: u16) -> Result<(), SimError> {
    let rules = format!(
        "table inet flowaudit_sim {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    ip saddr {from} tcp dport {port} drop\n  }}\n}}\n"
    );
    let out = Command::new("ip")
        .args(["netns", "exec", pod.netns(), "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            if let Some(mut stdin) = c.stdin.take() {
                stdin.write_all(rules.as_bytes())?;
            }
            c.wait_with_output()
        })
        .map_err(|e| SimError::Io {
            what: "run nft (Debian package nftables; `cargo xtask setup` installs it)".into(),
            source: e,
        })?;
    if !out.status.success() {
        return Err(SimError::Other(format!(
            "nft failed in pod {}: {}",
            pod.name(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}
