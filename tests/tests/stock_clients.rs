//! Stock gRPC clients on the agent's Unix socket, with no options: what a
//! user types. grpcio (1.57+) sends the socket path as `:authority`, which
//! h2 rejected before the agent rewrote it (agent/src/export/h2_authority.rs);
//! grpc-go sends `localhost`. Each client lists the services through server
//! reflection and calls ServerStatus (Python also GetFlows) with raw protobuf
//! bytes. grpc-java cannot dial a Unix socket here: Debian's netty has no
//! native epoll library (docs/observe.md). Needs root; a missing client fails
//! and names what `cargo xtask setup` installs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use flowaudit_tests::agent::RunningAgent;
use flowaudit_tests::support::*;

fn tests_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs a stock client and checks what it printed: the flowaudit service and
/// reflection itself, and a ServerStatus answer.
fn check_client(what: &str, mut cmd: Command) -> String {
    let out: Output = cmd
        .output()
        .unwrap_or_else(|e| panic!("could not run the {what} client {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the stock {what} client failed on the agent's Unix socket ({}):\n{stderr}{stdout}",
        out.status
    );
    let lines: Vec<&str> = stdout.lines().collect();
    for service in [
        "flowaudit.v1.FlowAudit",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(
            lines.contains(&service),
            "the stock {what} client did not list {service} through reflection: {stdout}"
        );
    }
    let status = lines
        .iter()
        .find_map(|l| l.strip_prefix("status-bytes "))
        .and_then(|n| n.parse::<usize>().ok());
    assert!(
        status.is_some_and(|n| n > 0),
        "the stock {what} client got no ServerStatus answer: {stdout}"
    );
    stdout
}

fn unix_addr(agent: &RunningAgent) -> String {
    let addr = agent.grpc_addr();
    assert!(addr.starts_with("unix:///"), "a Unix socket, got {addr}");
    addr
}

#[test]
fn python_grpcio_with_no_options_on_the_unix_socket() {
    require_root();
    // The project's virtual environment (`cargo xtask setup`), never the
    // system Python: a fresh machine's has no grpcio.
    let python = venv_python();
    let probe = Command::new(&python)
        .args(["-c", "import grpc, grpc_reflection"])
        .output();
    assert!(
        probe.as_ref().is_ok_and(|o| o.status.success()),
        "{} with grpcio and grpcio-reflection is missing ({probe:?}): `cargo xtask setup` installs tests/requirements.txt",
        python.display()
    );
    let agent = RunningAgent::start(&[]);
    let mut cmd = Command::new(&python);
    cmd.arg(tests_dir().join("python/stock_client.py"))
        .arg(unix_addr(&agent));
    let out = check_client("Python grpcio", cmd);
    assert!(
        out.lines().any(|l| l.starts_with("getflows-responses ")),
        "the stock Python grpcio client did not finish GetFlows: {out}"
    );
    agent.stop();
}

/// Debian's grpc-go sources, for a GOPATH build without the module proxy.
const GOPATH: &str = "/usr/share/gocode";

/// Builds tests/go/stock_client.go with Debian's Go and grpc-go, offline.
fn build_go_client(dir: &Path) -> PathBuf {
    let go = Command::new("go").arg("version").output();
    assert!(
        go.as_ref().is_ok_and(|o| o.status.success()),
        "`go` is missing ({go:?}): `cargo xtask setup` installs Debian's golang-go"
    );
    let grpc = Path::new(GOPATH).join("src/google.golang.org/grpc/reflection");
    assert!(
        grpc.is_dir(),
        "{} is missing: `cargo xtask setup` installs Debian's golang-google-grpc-dev",
        grpc.display()
    );
    let bin = dir.join("stock_client");
    let out = Command::new("go")
        .args(["build", "-o"])
        .arg(&bin)
        .arg(tests_dir().join("go/stock_client.go"))
        .env("GO111MODULE", "off")
        .env("GOPATH", GOPATH)
        .env("GOFLAGS", "")
        .env("GOPROXY", "off")
        .env("CGO_ENABLED", "0")
        .env("GOCACHE", dir.join("gocache"))
        .output()
        .expect("go build");
    assert!(
        out.status.success(),
        "go build of tests/go/stock_client.go against {GOPATH} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    bin
}

#[test]
fn go_grpc_with_no_options_on_the_unix_socket() {
    require_root();
    let dir = temp_dir("go-client");
    let bin = build_go_client(&dir);
    let agent = RunningAgent::start(&[]);
    let mut cmd = Command::new(bin);
    cmd.arg(unix_addr(&agent));
    check_client("Go grpc", cmd);
    agent.stop();
}
