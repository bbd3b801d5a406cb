//! `cargo xtask demo`: the precinct-99 scenario from the sprint log on a
//! simulated node. Starts the workloads as pods (network namespace + kubelet
//! style cgroup), runs the real agent, generates the scenario's traffic —
//! the intended flows, the log's bad ones (frontend -> postgresql, plaintext
//! frontend -> backend) and an intended flow a misconfigured network policy
//! drops — and prints the flows live with `flowaudit observe`. Cleans up on
//! Ctrl-C or after `--duration`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use flowaudit_tests::simpod::{ConnectOpts, ServeOpts, Server};
use flowaudit_tests::{Pod, PodSpec, SimNode};

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
    /// Seconds between rounds of scenario traffic.
    #[arg(long, default_value_t = 3)]
    interval: u64,
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

struct Workload {
    pod: Pod,
    port: u16,
}

/// One kind of scenario traffic.
struct Flow {
    label: &'static str,
    from: usize,
    to: usize,
    /// Why it is in the scenario (printed once at the start).
    expect: &'static str,
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

    let node = SimNode::new(99).context("creating the simulated node")?;
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
    // A client outside the cluster: on the bridge, but in no endpoint directory.
    let world = node.add_pod(PodSpec::new("", "external-client"))?;
    let (frontend, backend, postgresql, openbao, spire) = (0, 1, 2, 3, 4);

    let endpoints = args.workdir.join("endpoints.yaml");
    std::fs::write(&endpoints, endpoint_directory(&node, &workloads))?;
    // The log's Phase 4D mistake, reproduced: a policy on postgresql drops
    // openbao's connections (Cilium dropping an allowed flow).
    drop_in_pod(
        &workloads[postgresql].pod,
        workloads[openbao].pod.ip4(),
        5432,
    )?;

    let servers: Vec<Server> = workloads
        .iter()
        .map(|w| {
            w.pod.serve(&ServeOpts {
                listen: vec![SocketAddr::new("0.0.0.0".parse().unwrap(), w.port)],
                reply_bytes: 64,
            })
        })
        .collect::<Result<_, _>>()?;

    let flows_file = args.workdir.join("flows.jsonl");
    let _ = std::fs::remove_file(&flows_file);
    let mut agent = Command::new(&args.agent)
        .args([
            "agent",
            "--node-name",
            "precinct-99-worker",
            "--export-file",
        ])
        .arg(&flows_file)
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", args.agent.display()))?;
    wait_ready(&mut agent)?;
    let mut observe = Command::new(&args.agent)
        .args(["observe", "--follow", "--color", "always", "--input-file"])
        .arg(&flows_file)
        .spawn()
        .context("starting flowaudit observe")?;

    let scenario = [
        Flow {
            label: "world -> frontend:3000",
            from: usize::MAX,
            to: frontend,
            expect: "intended",
        },
        Flow {
            label: "frontend -> backend:8000",
            from: frontend,
            to: backend,
            expect: "intended, but plaintext where mTLS is required",
        },
        Flow {
            label: "backend -> postgresql:5432",
            from: backend,
            to: postgresql,
            expect: "intended",
        },
        Flow {
            label: "frontend -> postgresql:5432",
            from: frontend,
            to: postgresql,
            expect: "VIOLATION: the log's test, must be flagged",
        },
        Flow {
            label: "openbao -> postgresql:5432",
            from: openbao,
            to: postgresql,
            expect: "intended, but dropped by a network policy",
        },
        Flow {
            label: "backend -> openbao:8200",
            from: backend,
            to: openbao,
            expect: "intended",
        },
        Flow {
            label: "frontend -> spire-server:8081",
            from: frontend,
            to: spire,
            expect: "intended",
        },
    ];
    println!(
        "flowaudit demo: precinct-99 on a simulated node ({} pods)",
        workloads.len() + 1
    );
    for w in &workloads {
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
        world.name(),
        "",
        world.ip4()
    );
    println!("scenario traffic, every {}s:", args.interval);
    for f in &scenario {
        println!("  {:<32} {}", f.label, f.expect);
    }
    println!("flows (also in {}):", flows_file.display());

    let started = Instant::now();
    let mut round = 0u64;
    while !STOP.load(Ordering::SeqCst) && duration.is_none_or(|d| started.elapsed() < d) {
        round += 1;
        for f in &scenario {
            let client = if f.from == usize::MAX {
                &world
            } else {
                &workloads[f.from].pod
            };
            let to = &workloads[f.to];
            let mut opts = ConnectOpts::new(SocketAddr::new(IpAddr::V4(to.pod.ip4()), to.port));
            opts.send_bytes = 200;
            opts.timeout_ms = 1000;
            if let Err(e) = client.connect(&opts) {
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
    drop(servers);
    drop(node);
    let text = std::fs::read_to_string(&flows_file).unwrap_or_default();
    let count = |event: &str| {
        text.lines()
            .filter(|l| l.contains(&format!("\"event\":\"{event}\"")))
            .count()
    };
    println!(
        "demo: {round} rounds, {} flow events ({} CONNECT, {} CLOSE, {} FAILED); agent exited {status}; simulated node removed",
        text.lines().count(),
        count("CONNECT"),
        count("CLOSE"),
        count("FAILED")
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

/// Drops TCP traffic from `from` to `port` inside the pod (an nftables rule
/// in the pod's own network namespace, standing in for a network policy).
fn drop_in_pod(pod: &Pod, from: std::net::Ipv4Addr, port: u16) -> Result<()> {
    let rules = format!(
        "table inet flowaudit_demo {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    ip saddr {from} tcp dport {port} drop\n  }}\n}}\n"
    );
    let out = Command::new("ip")
        .args(["netns", "exec", pod.netns(), "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().expect("piped").write_all(rules.as_bytes())?;
            c.wait_with_output()
        })
        .context("running nft (apt package nftables; `cargo xtask setup` installs it)")?;
    if !out.status.success() {
        bail!(
            "nft failed in pod {}: {}",
            pod.name(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The endpoint directory (`--endpoints`) for the simulated node, in the
/// PRODUCT.md format.
fn endpoint_directory(node: &SimNode, workloads: &[Workload]) -> String {
    let mut y = format!(
        "nodes:\n  - name: precinct-99-worker\n    ips: [{}, \"{}\"]\nendpoints:\n",
        node.ip4(),
        node.ip6()
    );
    for w in workloads {
        let p = &w.pod;
        y.push_str(&format!(
            "  - ips: [{}, \"{}\"]\n    namespace: {}\n    pod: {}\n    uid: {}\n    serviceAccount: {}\n    labels: {{app: {}}}\n    node: precinct-99-worker\n",
            p.ip4(),
            p.ip6(),
            p.namespace(),
            p.name(),
            p.uid(),
            p.service_account(),
            p.service_account()
        ));
    }
    y
}
