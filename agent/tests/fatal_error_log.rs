//! With `--log-format json`, the error that stops `flowaudit agent` or
//! `flowaudit relay` at start is a JSON log line like every other (it was
//! printed as plain text, the one line a JSON log pipeline could not read).
//! Both stop before anything is attached or dialled.

use std::process::Command;

/// Runs `args`; every stderr line must be JSON, and the last an ERROR
/// whose `error` holds `says`.
fn stops_with_a_json_error(args: &[&str], says: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_flowaudit"))
        .args(args)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{args:?}: a line that is not JSON ({e}): {l}"))
        })
        .collect();
    let last = lines
        .last()
        .unwrap_or_else(|| panic!("{args:?}: no log line"));
    assert_eq!(last["level"], "ERROR", "{last}");
    assert!(
        last["error"].as_str().is_some_and(|e| e.contains(says)),
        "{args:?}: {last}"
    );
}

#[test]
fn the_error_that_stops_the_agent_or_the_relay_is_a_json_log_line() {
    stops_with_a_json_error(
        &[
            "agent",
            "--log-format",
            "json",
            "--policy",
            "/nonexistent/flowaudit-policy.yaml",
            "--spire-admin-socket",
            "none",
        ],
        "/nonexistent/flowaudit-policy.yaml",
    );
    stops_with_a_json_error(
        &[
            "relay",
            "--log-format",
            "json",
            "--peers",
            "127.0.0.1:1",
            "--tls-cert",
            "/nonexistent/c.pem",
            "--tls-key",
            "/nonexistent/k.pem",
            "--tls-ca",
            "/nonexistent/ca.pem",
            "--allow-agent",
            "spiffe://demo.local/ns/flowaudit/sa/flowaudit",
            "--allow-peer",
            "spiffe://demo.local/ns/flowaudit/sa/ops",
        ],
        "/nonexistent/c.pem",
    );
}
