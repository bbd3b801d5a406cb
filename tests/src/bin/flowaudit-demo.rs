//! `cargo xtask demo`: the precinct-99 scenario from the sprint log on two
//! kind-like nodes (`precinct-99-worker` with the workloads, and
//! `precinct-99-worker2` with a second backend replica), routed to each
//! other. Starts the workloads as pods (network namespace + kubelet-style
//! cgroup, processes in the node's pid namespace), runs the real agent on
//! each node as the DaemonSet runs it (its capabilities, read-only root) and
//! a SPIRE double inside each node, generates the scenario's traffic — the
//! intended flows, the log's bad ones (frontend -> postgresql, plaintext
//! frontend -> backend), an intended flow a misconfigured network policy
//! drops, and a cross-node flow (backend-2 -> postgresql) that both nodes
//! report — and prints both nodes' flows live with `flowaudit observe`.
//! Cilium mutual authentication: a CiliumNetworkPolicy requires it for
//! backend -> postgresql; the first node holds a Cilium double (Cilium
//! 1.15.7's pinned maps) where the cross-node pair is authenticated and the
//! same-node pair's entry has expired; the second node has no Cilium, so
//! its agent says "not observable here".
//! The live output is the cluster's stream: `flowaudit relay` in its own
//! pod reads both agents over mTLS (each agent accepts only the relay's
//! SPIFFE ID), and `flowaudit observe --join` in an operator's pod prints
//! it, each cross-node connection as one flow whose ends were ATTESTED by
//! their own nodes.
//! Cleans up on Ctrl-C or after `--duration`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use flowaudit_tests::agent::RunningAgent;
use flowaudit_tests::cilium_double::{
    AUTH_TYPE_SPIRE, AuthKey, CiliumDouble, Release, WIREGUARD_KEY,
};
use flowaudit_tests::scenario::{
    BACKEND, FRONTEND, NODE_NAME, POSTGRESQL, Precinct99, SCENARIO, endpoint_entry,
};
use flowaudit_tests::simpod::{ConnectOpts, ServeOpts};
use flowaudit_tests::spire_double::{NodeDouble, SpireDoubleConfig};
use flowaudit_tests::{PodSpec, SimNode};

/// The second node's name, as kind names a cluster's second worker.
const NODE2_NAME: &str = "precinct-99-worker2";
use flowaudit_tests::tls::{self, ClientAuth, TlsMaterial, Version};

#[derive(Parser)]
#[command(
    name = "flowaudit-demo",
    about = "The precinct-99 scenario on two kind-like nodes, with the real agent on each"
)]
struct Args {
    /// The flowaudit binary.
    #[arg(long)]
    agent: PathBuf,
    /// The simpod traffic tool.
    #[arg(long)]
    simpod: PathBuf,
    /// Where the demo writes its endpoint directory, policy and flow log.
    #[arg(long, default_value = "target/demo")]
    workdir: PathBuf,
    /// How long to run: 30s, 2m, ... (default: until Ctrl-C).
    #[arg(long)]
    duration: Option<String>,
    /// The intended policy the flows are judged against.
    #[arg(
        long,
        default_value = "deploy/examples/scenario/precinct-99-scenario.yaml"
    )]
    policy: PathBuf,
    /// A CiliumNetworkPolicy requiring Cilium mutual authentication, judged
    /// with the intended policy.
    #[arg(
        long,
        default_value = "deploy/examples/cilium-mutual-auth/postgresql-ingress.yaml"
    )]
    cilium_policy: PathBuf,
    /// Seconds between rounds of scenario traffic.
    #[arg(long, default_value_t = 3)]
    interval: u64,
    /// Rounds of plaintext frontend -> backend before the two switch to mTLS.
    #[arg(long, default_value_t = 3)]
    mtls_after_rounds: u64,
    /// The SPIRE release the Delegated Identity double in each node behaves
    /// like: 1.9.6 (the reference log's), 1.10.2, 1.11.3 or 1.15.3.
    #[arg(long, default_value = flowaudit_tests::spire_double::VERSION_WITHOUT_PID)]
    spire_version: String,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .with_context(|| format!("bad duration {s:?}: expected e.g. 30s, 2m, 1h"))?;
    Ok(match unit {
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        "ms" => Duration::from_millis(n),
        _ => bail!("bad duration unit in {s:?}: use ms, s, m or h"),
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    // SAFETY: a libc call with no pointer arguments.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo creates network namespaces and loads eBPF programs: run it as root");
    }
    let duration = args.duration.as_deref().map(parse_duration).transpose()?;
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    // SAFETY: set before any thread is started.
    unsafe { std::env::set_var("SIMPOD", &args.simpod) };
    std::fs::create_dir_all(&args.workdir)
        .with_context(|| format!("creating {}", args.workdir.display()))?;

    // SAFETY: set before any thread is started.
    unsafe { std::env::set_var("FLOWAUDIT_BIN", &args.agent) };
    let mut sim = Precinct99::start(99).context("building node precinct-99-worker")?;
    let node2 = SimNode::named(98, NODE2_NAME).context("building node precinct-99-worker2")?;
    sim.node
        .link(&node2)
        .context("routing between the two nodes")?;
    let backend2 = node2
        .add_pod(
            PodSpec::new("99-apps", "backend-5c8b-2")
                .service_account("backend")
                .label("app", "backend"),
        )
        .context("backend-2 on precinct-99-worker2")?;
    let _backend2_server = backend2
        .serve(&ServeOpts {
            listen: vec!["0.0.0.0:8000".parse().expect("literal")],
            reply_bytes: 64,
        })
        .context("backend-2's server")?;
    // Certificates for the switch to mTLS: a throwaway CA, and SVID-like
    // leaves for frontend and backend (URI SAN = their SPIFFE IDs).
    let pki = TlsMaterial::generate(
        &args.workdir.join("pki"),
        &[
            ("backend", "spiffe://demo.local/ns/99-apps/sa/backend"),
            ("frontend", "spiffe://demo.local/ns/99-apps/sa/frontend"),
        ],
    )
    .context("making the demo's certificates with openssl")?;
    let mut tls_backend = None;
    // The endpoint directory both agents read (as the Kubernetes API would
    // give them): both nodes, every pod with its node.
    let endpoints = args.workdir.join("endpoints.yaml");
    let directory = sim.endpoint_directory().replacen(
        "endpoints:\n",
        &format!(
            "  - name: {NODE2_NAME}\n    ips: [{}, \"{}\"]\nendpoints:\n{}",
            node2.ip4(),
            node2.ip6(),
            endpoint_entry(&backend2, NODE2_NAME)
        ),
        1,
    );
    std::fs::write(&endpoints, directory)
        .with_context(|| format!("writing {}", endpoints.display()))?;
    let policy = std::fs::canonicalize(&args.policy)
        .with_context(|| format!("policy {}", args.policy.display()))?;
    let cilium_policy = std::fs::canonicalize(&args.cilium_policy)
        .with_context(|| format!("policy {}", args.cilium_policy.display()))?;
    // Cilium on the first node only: its pinned maps, as Cilium 1.15.7 (the
    // reference log's) lays them out, in the node's own BPF filesystem.
    let cilium = cilium_double(&sim, &node2, &backend2)?;
    // SPIRE on each node: the Delegated Identity API test double, run
    // inside the node on the node's admin socket, attesting that node's pods
    // by their pids and cgroups like SPIRE's k8s workload attestor. Not a
    // real SPIRE agent.
    let mut config1 = sim.spire_double_config(PathBuf::new(), &args.spire_version);
    config1.authorized = Some(true);
    let spire1 =
        NodeDouble::start(&sim.node, config1).context("SPIRE double on precinct-99-worker")?;
    let mut config2 = SpireDoubleConfig::new("", "demo.local")
        .version(&args.spire_version)
        .pod(backend2.uid(), "99-apps", "backend", backend2.name())
        .entry(
            "spiffe://demo.local/ns/99-apps/sa/backend",
            &["k8s:ns:99-apps", "k8s:sa:backend"],
        );
    config2.authorized = Some(true);
    let spire2 =
        NodeDouble::start(&node2, config2).context("SPIRE double on precinct-99-worker2")?;

    // The agent on each node, as the DaemonSet runs it (capabilities and
    // mounts from the rendered kind overlay).
    // Their TCP gRPC listener takes the relay's SVID only (test
    // certificates standing in for SPIRE's Workload API).
    let ids = TlsMaterial::generate(
        &args.workdir.join("relay-pki"),
        &[
            ("agent", AGENT_ID),
            ("relay", RELAY_ID),
            ("observer", OBSERVER_ID),
        ],
    )
    .context("making the relay's certificates with openssl")?;
    let spec = flowaudit_tests::daemonset::kind_agent_pod_spec();
    let (agent_cert, agent_key, ca) = (ids.cert("agent"), ids.key("agent"), ids.ca());
    let agent_args = [
        "--endpoints",
        endpoints.to_str().context("UTF-8 workdir")?,
        "--policy",
        policy.to_str().context("UTF-8 policy path")?,
        "--policy",
        cilium_policy.to_str().context("UTF-8 policy path")?,
        "--grpc-addr",
        "0.0.0.0:4244",
        "--tls-cert",
        &agent_cert,
        "--tls-key",
        &agent_key,
        "--tls-ca",
        &ca,
        "--allow-peer",
        RELAY_ID,
    ];
    let agents = [
        RunningAgent::start_in_node(&sim.node, &spec, &agent_args, &[]),
        RunningAgent::start_in_node(&node2, &spec, &agent_args, &[]),
    ];
    let peers = agents
        .iter()
        .map(|a| {
            Ok(format!(
                "{}:4244",
                a.pod().context("the agent's pod")?.ip4()
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let (relay, relay_addr) = start_relay(&args.agent, &sim.node, &ids, &peers)?;
    let ops = sim
        .node
        .add_pod(PodSpec::new("ops", "observer").service_account("observer"))
        .context("the operator's pod")?;
    let observer = observe_cluster(&args.agent, &ops, &ids, &relay_addr)?;

    println!(
        "flowaudit demo: precinct-99 on two kind-like nodes, {NODE_NAME} ({}) and {NODE2_NAME} ({})",
        sim.node.ip4(),
        node2.ip4()
    );
    for (w, node) in sim
        .workloads
        .iter()
        .map(|w| (&w.pod, w.port, NODE_NAME))
        .chain([(&backend2, 8000, NODE2_NAME)])
        .map(|(p, port, n)| ((p, port), n))
    {
        println!(
            "  {:<13} {:<15} {:<16} {}:{} on {node}",
            w.0.namespace(),
            w.0.name(),
            w.0.service_account(),
            w.0.ip4(),
            w.1
        );
    }
    println!(
        "  {:<13} {:<15} {:<16} {}",
        "(outside)",
        sim.world.name(),
        "",
        sim.world.ip4()
    );
    println!(
        "cluster stream: flowaudit relay at {relay_addr} (its own pod on {NODE_NAME}) reads both agents over mTLS; `flowaudit observe --join` prints it, cross-node connections as one joined flow"
    );
    println!(
        "intended policy: {} and {}",
        policy.display(),
        cilium_policy.display()
    );
    println!(
        "Cilium: on {NODE_NAME} only (a double with Cilium 1.15.7's pinned maps, not a real Cilium); backend -> postgresql needs Cilium mutual authentication: backend-2 (from {NODE2_NAME}) is authenticated, the same-node backend's entry expired 5 minutes ago; {NODE2_NAME}'s agent has no Cilium to read"
    );
    println!(
        "identities: attested through the Delegated Identity API of a SPIRE stand-in inside each node, behaving like SPIRE {} (flowaudit's test double, not a real SPIRE agent), on {}",
        args.spire_version,
        flowaudit_tests::spire_double::NODE_ADMIN_SOCKET
    );
    println!("scenario traffic, every {}s:", args.interval);
    for f in &SCENARIO {
        if f.from == Some(BACKEND) && f.to == POSTGRESQL {
            // The Cilium policy's doing: the pair's auth entry expired.
            println!(
                "  {:<32} {:<9} intended, but Cilium's auth entry for the pair expired: MUTUAL_AUTH_MISSING",
                f.label, "VIOLATION"
            );
            continue;
        }
        println!("  {:<32} {:<9} {}", f.label, f.verdict, f.why);
    }
    println!(
        "  {:<32} {:<9} cross-node: EGRESS on {NODE2_NAME} (no Cilium: not observable, MTLS_UNVERIFIED), INGRESS on {NODE_NAME} (authenticated by Cilium, WireGuard)",
        "backend-2 -> postgresql:5432", "COMPLIANT"
    );
    println!(
        "  after {} rounds frontend and backend switch to mTLS (TLS 1.3, client certificates): frontend -> backend:8000 then shows MTLS and COMPLIANT",
        args.mtls_after_rounds
    );
    println!(
        "flows of both nodes (kept in {} when the demo ends):",
        args.workdir.join("flows-<node>.jsonl").display()
    );

    let started = Instant::now();
    let mut round = 0u64;
    while !STOP.load(Ordering::SeqCst) && duration.is_none_or(|d| started.elapsed() < d) {
        round += 1;
        if round == args.mtls_after_rounds + 1 {
            println!("== frontend and backend switch to mTLS ==");
            sim.stop_server(BACKEND);
            let backend = &sim.workloads[BACKEND].pod;
            tls_backend = Some(
                tls::server(
                    backend,
                    &pki,
                    "backend",
                    std::net::IpAddr::V4(backend.ip4()),
                    8000,
                    Version::Tls13,
                    ClientAuth::Required,
                    None,
                )
                .context("starting the backend's TLS server")?,
            );
        }
        for f in &SCENARIO {
            let result = if tls_backend.is_some() && f.from == Some(FRONTEND) && f.to == BACKEND {
                let backend = &sim.workloads[BACKEND].pod;
                tls::client(
                    &sim.workloads[FRONTEND].pod,
                    &pki,
                    std::net::IpAddr::V4(backend.ip4()),
                    8000,
                    Version::Tls13,
                    Some("frontend"),
                )
                .and_then(|(ok, out)| {
                    if ok {
                        Ok(())
                    } else {
                        Err(flowaudit_tests::SimError::Other(format!(
                            "TLS handshake failed: {out}"
                        )))
                    }
                })
            } else {
                sim.run(f).map(|_| ())
            };
            if let Err(e) = result {
                eprintln!("demo: {} failed to run: {e}", f.label);
            }
        }
        let postgresql = &sim.workloads[POSTGRESQL].pod;
        let mut cross = ConnectOpts::new(std::net::SocketAddr::new(
            std::net::IpAddr::V4(postgresql.ip4()),
            5432,
        ));
        cross.send_bytes = 64;
        if let Err(e) = backend2.connect(&cross) {
            eprintln!("demo: backend-2 -> postgresql failed to run: {e}");
        }
        let wait_until = Instant::now() + Duration::from_secs(args.interval);
        while Instant::now() < wait_until && !STOP.load(Ordering::SeqCst) {
            if duration.is_some_and(|d| started.elapsed() >= d) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    // The joined cross-node connections, from the relay's buffer, before
    // the agents stop; then stop the agents so they drain the kernel's
    // buffers into their files, and the live stream.
    std::thread::sleep(Duration::from_secs(3));
    let joined = joined_cross_node(&args.agent, &ops, &ids, &relay_addr);
    let reports: Vec<_> = agents.into_iter().map(RunningAgent::stop).collect();
    std::thread::sleep(Duration::from_millis(400));
    drop(observer);
    drop(relay);
    drop((spire1, spire2, cilium));
    drop(tls_backend);
    let cross_node = cross_node_pairs(&reports[1].flows, &reports[0].flows);
    let backend2_ip = backend2.ip4().to_string();
    drop(node2);
    drop(sim);
    for (report, node) in reports.iter().zip([NODE_NAME, NODE2_NAME]) {
        let path = args.workdir.join(format!("flows-{node}.jsonl"));
        let text: String = report.flows.iter().map(|f| format!("{f}\n")).collect();
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    let flows: Vec<serde_json::Value> = reports.iter().flat_map(|r| r.flows.clone()).collect();
    let count = |key: &str, value: &str| flows.iter().filter(|f| f[key] == value).count();
    let with_finding = |kind: &str| {
        flows
            .iter()
            .filter(|f| {
                f["findings"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x["kind"] == kind))
            })
            .count()
    };
    let local_ends = flowaudit_tests::support::local_pod_ends(&flows);
    let attested = local_ends
        .iter()
        .filter(|e| e["identity_source"] == "ATTESTED")
        .count();
    println!(
        "demo: local pod ends ATTESTED by SPIRE: {attested} of {} ({:.0}%)",
        local_ends.len(),
        100.0 * attested as f64 / local_ends.len().max(1) as f64
    );
    // The other end of each event, when it is a pod: on this node every
    // such peer of an established connection has its own socket here.
    // Same-node connections only: the peer of a cross-node one is on the
    // other node, DERIVED here by design.
    let same_node: Vec<serde_json::Value> = flows
        .iter()
        .filter(|f| f["l4"]["source_ip"] != backend2_ip.as_str())
        .cloned()
        .collect();
    let peers = flowaudit_tests::support::peer_pod_ends(&same_node);
    let peers_attested = peers
        .iter()
        .filter(|e| e["identity_source"] == "ATTESTED")
        .count();
    println!(
        "demo: same-node peer pod ends ATTESTED: {peers_attested} of {} ({:.0}%)",
        peers.len(),
        100.0 * peers_attested as f64 / peers.len().max(1) as f64
    );
    println!(
        "demo: cross-node connections backend-2 ({NODE2_NAME}) -> postgresql ({NODE_NAME}) seen on both nodes, each end ATTESTED by its own node: {} of {}",
        cross_node.0, cross_node.1
    );
    match joined {
        Ok((both, total)) => println!(
            "demo: cluster stream (relay, --join): backend-2 -> postgresql connection events joined into one flow with both ends ATTESTED, each by its own node: {both} of {total}"
        ),
        Err(e) => println!("demo: the relay's joined stream could not be read: {e:#}"),
    }
    println!(
        "demo: {round} rounds, {} flow events on {NODE_NAME}, {} on {NODE2_NAME} ({} CONNECT, {} CLOSE, {} FAILED); {} VIOLATION, {} INTENDED_FLOW_FAILED; simulated nodes removed",
        reports[0].flows.len(),
        reports[1].flows.len(),
        count("event", "CONNECT"),
        count("event", "CLOSE"),
        count("event", "FAILED"),
        count("verdict", "VIOLATION"),
        with_finding("INTENDED_FLOW_FAILED"),
    );
    let to_backend = |state: &str| {
        flows
            .iter()
            .filter(|f| {
                f["event"] == "CONNECT"
                    && f["direction"] == "EGRESS"
                    && f["l4"]["destination_port"] == 8000
                    && f["encryption"]["state"] == state
            })
            .count()
    };
    println!(
        "demo: frontend -> backend:8000 connections: {} PLAINTEXT (MTLS_MISSING), {} MTLS",
        to_backend("PLAINTEXT"),
        to_backend("MTLS")
    );
    for (report, node) in reports.iter().zip([NODE_NAME, NODE2_NAME]) {
        let states: Vec<String> = ["AUTHENTICATED", "EXPIRED", "MISSING", "NOT_OBSERVABLE"]
            .iter()
            .map(|s| {
                let n = report
                    .flows
                    .iter()
                    .filter(|f| f["event"] == "CONNECT" && f["mutual_auth"]["state"] == *s)
                    .count();
                format!("{n} {s}")
            })
            .collect();
        println!(
            "demo: {node}: CONNECTs under Cilium mutual authentication (backend -> postgresql): {}",
            states.join(", ")
        );
    }
    Ok(())
}

/// Cilium's maps on the first node: every workload's security identity,
/// the second node (id 1, WireGuard on), and two auth entries for backend
/// -> postgresql: from the second node valid for an hour, from this node
/// expired five minutes ago.
fn cilium_double(
    sim: &Precinct99,
    node2: &SimNode,
    backend2: &flowaudit_tests::Pod,
) -> Result<CiliumDouble> {
    use std::net::IpAddr;
    let double = CiliumDouble::install(&sim.node, Release::V1_15_7)
        .context("Cilium double on precinct-99-worker")?;
    let identity = |i: usize| 20_001 + i as u32;
    for (i, w) in sim.workloads.iter().enumerate() {
        double.set_identity(IpAddr::V4(w.pod.ip4()), identity(i), None, 0)?;
    }
    double.set_identity(
        IpAddr::V4(backend2.ip4()),
        identity(BACKEND),
        Some(node2.ip4()),
        WIREGUARD_KEY,
    )?;
    double.set_node(node2.ip4(), 1, 0)?;
    let key = |node| AuthKey {
        local_identity: identity(POSTGRESQL),
        remote_identity: identity(BACKEND),
        remote_node_id: node,
        auth_type: AUTH_TYPE_SPIRE,
    };
    let now = std::time::SystemTime::now();
    double.authenticate(key(1), now + Duration::from_secs(3600))?;
    double.authenticate(key(0), now - Duration::from_secs(300))?;
    Ok(double)
}

/// Cross-node connections from `client_node`'s flows to `server_node`'s:
/// (those whose CONNECT is EGRESS on the client's node and INGRESS on the
/// server's with the same 4-tuple, the local end ATTESTED on each, all).
fn cross_node_pairs(
    client_node: &[serde_json::Value],
    server_node: &[serde_json::Value],
) -> (usize, usize) {
    let tuple = |f: &serde_json::Value| f["l4"].to_string();
    let connects = |flows: &[serde_json::Value], dir: &str| -> Vec<serde_json::Value> {
        flows
            .iter()
            .filter(|f| {
                f["event"] == "CONNECT"
                    && f["direction"] == dir
                    && f["l4"]["destination_port"] == 5432
            })
            .cloned()
            .collect()
    };
    let egress = connects(client_node, "EGRESS");
    let ingress = connects(server_node, "INGRESS");
    let both = egress
        .iter()
        .filter(|e| {
            e["source"]["identity_source"] == "ATTESTED"
                && ingress.iter().any(|i| {
                    tuple(i) == tuple(e) && i["destination"]["identity_source"] == "ATTESTED"
                })
        })
        .count();
    (both, egress.len())
}

/// The agents' SPIFFE ID (their DaemonSet's service account).
const AGENT_ID: &str = "spiffe://demo.local/ns/flowaudit/sa/flowaudit";
/// The relay's (deploy/kustomize/base/relay-deployment.yaml).
const RELAY_ID: &str = "spiffe://demo.local/ns/flowaudit/sa/flowaudit-relay";
/// An operator's, as deploy/spire/mint-observer-svid.sh mints them.
const OBSERVER_ID: &str = "spiffe://demo.local/flowaudit/observer/demo";

fn client_tls(ids: &TlsMaterial) -> Vec<String> {
    ids.client_flags("observer", RELAY_ID)
}

/// The scenario's namespaces: the stream without the relay's own traffic.
const SCENARIO_NAMESPACES: [&str; 6] = [
    "--namespace",
    "99-apps",
    "--namespace",
    "openbao",
    "--namespace",
    "spire-system",
];

/// `flowaudit relay` in its own pod on `node`, as its Deployment runs it;
/// returns it and its address once both agents are connected.
fn start_relay(
    agent: &std::path::Path,
    node: &SimNode,
    ids: &TlsMaterial,
    peers: &[String],
) -> Result<(flowaudit_tests::simnode::PodProcess, String)> {
    let pod = node
        .add_pod(
            PodSpec::new("flowaudit", "flowaudit-relay-0")
                .service_account("flowaudit-relay")
                .label("app.kubernetes.io/component", "relay"),
        )
        .context("the relay's pod")?;
    let mut cmd = Command::new(agent);
    cmd.args(["relay", "--name", "flowaudit-relay-0", "--peers"])
        .arg(peers.join(","))
        .args([
            "--grpc-addr",
            "0.0.0.0:4245",
            "--metrics-addr",
            "127.0.0.1:9967",
        ])
        .args([
            "--tls-cert",
            &ids.cert("relay"),
            "--tls-key",
            &ids.key("relay"),
        ])
        .args(["--tls-ca", &ids.ca(), "--allow-agent", AGENT_ID])
        .args(["--allow-peer", "spiffe://demo.local/flowaudit/observer/*"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let relay = pod.spawn_guarded(cmd).context("starting flowaudit relay")?;
    let addr = format!("{}:4245", pod.ip4());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut status = Command::new(agent);
        status
            .args(["status", "--server", &addr, "-o", "json"])
            .args(client_tls(ids));
        if let Ok(out) = pod.output(status)
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            && v["nodes"].as_array().is_some_and(|n| {
                n.len() == peers.len() && n.iter().all(|n| n["state"] == "CONNECTED")
            })
        {
            return Ok((relay, addr));
        }
        if Instant::now() > deadline {
            bail!("the relay did not connect to both agents within 30 s");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// `flowaudit observe --follow --join` on the relay, from the operator's
/// pod: the cluster's stream, each line prefixed `[cluster]`.
fn observe_cluster(
    agent: &std::path::Path,
    ops: &flowaudit_tests::Pod,
    ids: &TlsMaterial,
    relay: &str,
) -> Result<flowaudit_tests::simnode::PodProcess> {
    use std::io::{BufRead, BufReader};
    let mut cmd = Command::new(agent);
    cmd.args([
        "observe", "--server", relay, "--follow", "--join", "--color", "always",
    ])
    .args(SCENARIO_NAMESPACES)
    .args(client_tls(ids))
    .stdout(Stdio::piped());
    let mut child = ops.spawn(cmd).context("starting flowaudit observe")?;
    let out = child.stdout.take().context("observe stdout")?;
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            println!("[cluster] {line}");
        }
    });
    Ok(flowaudit_tests::simnode::PodProcess::new(child))
}

/// backend-2 -> postgresql connection events in the relay's joined
/// buffer: (with both halves and both ends ATTESTED, all).
fn joined_cross_node(
    agent: &std::path::Path,
    ops: &flowaudit_tests::Pod,
    ids: &TlsMaterial,
    relay: &str,
) -> Result<(usize, usize)> {
    let mut cmd = Command::new(agent);
    cmd.args([
        "observe", "--server", relay, "--join", "--last", "10000", "-o", "json",
    ])
    .args([
        "--port",
        "5432",
        "--from-pod",
        "99-apps/backend",
        "--namespace",
        "99-apps",
    ])
    .args(client_tls(ids));
    let out = ops.output(cmd).context("observe --join --last")?;
    let flows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|f: &serde_json::Value| {
            f["event"] != "FAILED"
                && f["joined"]["halves"]
                    .as_array()
                    .is_some_and(|h| h.iter().any(|h| h["node_name"] == NODE2_NAME))
        })
        .collect();
    let both = flows
        .iter()
        .filter(|f| {
            f["joined"]["halves"]
                .as_array()
                .is_some_and(|h| h.len() == 2)
                && f["source"]["identity_source"] == "ATTESTED"
                && f["destination"]["identity_source"] == "ATTESTED"
        })
        .count();
    Ok((both, flows.len()))
}
