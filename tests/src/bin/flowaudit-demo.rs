//! `cargo xtask demo`: the precinct-99 scenario from the sprint log on a
//! simulated node. Starts the workloads as pods (network namespace + kubelet
//! style cgroup), runs the real agent, generates the scenario's traffic —
//! the intended flows, the log's bad ones (frontend -> postgresql, plaintext
//! frontend -> backend) and an intended flow a misconfigured network policy
//! drops — and prints the flows live with `flowaudit observe`. Cleans up on
//! Ctrl-C or after `--duration`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use flowaudit_tests::scenario::{BACKEND, FRONTEND, NODE_NAME, Precinct99, SCENARIO};
use flowaudit_tests::tls::{self, ClientAuth, TlsMaterial, Version};

#[derive(Parser)]
#[command(
    name = "flowaudit-demo",
    about = "The precinct-99 scenario on a simulated node, with the real agent"
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
    /// Seconds between rounds of scenario traffic.
    #[arg(long, default_value_t = 3)]
    interval: u64,
    /// Rounds of plaintext frontend -> backend before the two switch to mTLS.
    #[arg(long, default_value_t = 3)]
    mtls_after_rounds: u64,
    /// The SPIRE release the embedded Delegated Identity double behaves
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

    let mut sim = Precinct99::start(99).context("building the simulated node")?;
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
    let endpoints = args.workdir.join("endpoints.yaml");
    sim.write_endpoint_directory(&endpoints)?;
    let policy = args.policy.clone();
    // The demo's SPIRE: the Delegated Identity API test double, embedded,
    // attesting the pods' processes through their cgroups like SPIRE's k8s
    // workload attestor. Not a real SPIRE agent.
    let runtime = tokio::runtime::Runtime::new().context("tokio runtime for the SPIRE stand-in")?;
    let spire_socket = std::fs::canonicalize(&args.workdir)?.join("spire-admin.sock");
    let spire = runtime
        .block_on(flowaudit_tests::spire_double::SpireDouble::start(
            sim.spire_double_config(spire_socket.clone(), &args.spire_version),
        ))
        .context("starting the embedded SPIRE stand-in")?;
    spire.set_authorized(true);

    let flows_file = args.workdir.join("flows.jsonl");
    let _ = std::fs::remove_file(&flows_file);
    let mut agent = Command::new(&args.agent)
        .args(["agent", "--node-name", NODE_NAME, "--spire-admin-socket"])
        .arg(&spire_socket)
        .arg("--export-file")
        .arg(&flows_file)
        .arg("--endpoints")
        .arg(&endpoints)
        .arg("--policy")
        .arg(&policy)
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", args.agent.display()))?;
    wait_ready(&mut agent)?;
    let mut observe = Command::new(&args.agent)
        .args(["observe", "--follow", "--color", "always", "--input-file"])
        .arg(&flows_file)
        .spawn()
        .context("starting flowaudit observe")?;

    println!("flowaudit demo: precinct-99 on a simulated node");
    for w in &sim.workloads {
        println!(
            "  {:<13} {:<15} {:<16} {}:{}",
            w.pod.namespace(),
            w.pod.name(),
            w.pod.service_account(),
            w.pod.ip4(),
            w.port
        );
    }
    println!(
        "  {:<13} {:<15} {:<16} {}",
        "(outside)",
        sim.world.name(),
        "",
        sim.world.ip4()
    );
    println!("intended policy: {}", policy.display());
    println!(
        "identities: attested through the Delegated Identity API of an embedded SPIRE stand-in behaving like SPIRE {} (flowaudit's test double, not a real SPIRE agent) on {}",
        args.spire_version,
        spire_socket.display()
    );
    println!("scenario traffic, every {}s:", args.interval);
    for f in &SCENARIO {
        println!("  {:<32} {:<9} {}", f.label, f.verdict, f.why);
    }
    println!(
        "  after {} rounds frontend and backend switch to mTLS (TLS 1.3, client certificates): frontend -> backend:8000 then shows MTLS and COMPLIANT",
        args.mtls_after_rounds
    );
    println!("flows (also in {}):", flows_file.display());

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
        let wait_until = Instant::now() + Duration::from_secs(args.interval);
        while Instant::now() < wait_until && !STOP.load(Ordering::SeqCst) {
            if duration.is_some_and(|d| started.elapsed() >= d) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    // Stop the agent first so it drains the kernel's buffer into the file,
    // then let observe print the tail before stopping it.
    unsafe { libc::kill(agent.id() as i32, libc::SIGINT) };
    let status = agent.wait()?;
    std::thread::sleep(Duration::from_millis(400));
    let _ = observe.kill();
    let _ = observe.wait();
    runtime.block_on(spire.stop());
    drop(tls_backend);
    drop(sim);
    let text = std::fs::read_to_string(&flows_file).unwrap_or_default();
    let flows: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
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
    let peers = flowaudit_tests::support::peer_pod_ends(&flows);
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
        "demo: {round} rounds, {} flow events ({} CONNECT, {} CLOSE, {} FAILED); {} VIOLATION, {} INTENDED_FLOW_FAILED; agent exited {status}; simulated node removed",
        flows.len(),
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
    if !status.success() {
        bail!("the agent exited with {status}");
    }
    Ok(())
}

/// Waits for the agent's "agent ready" log line, echoing its log meanwhile
/// and forwarding the rest of it to our stderr in the background.
fn wait_ready(agent: &mut Child) -> Result<()> {
    use std::io::{BufRead, BufReader};
    let stderr = agent.stderr.take().context("agent stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        match lines.next() {
            Some(Ok(line)) => {
                eprintln!("{line}");
                if line.contains("agent ready") {
                    std::thread::spawn(move || {
                        for line in lines.map_while(Result::ok) {
                            eprintln!("{line}");
                        }
                    });
                    return Ok(());
                }
            }
            _ => bail!("the agent exited before it was ready: {:?}", agent.wait()?),
        }
    }
    bail!("the agent was not ready within 60 s")
}
