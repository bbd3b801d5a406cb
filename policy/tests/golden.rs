//! Golden-file tests for `policy check` and `policy explain` output. Regenerate with
//! `UPDATE_GOLDEN=1 cargo test -p flowaudit-policy --test golden`.

use clap::Parser;
use flowaudit_policy::cli::PolicyCommand;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: PolicyCommand,
}

/// Runs `args` (relative to the package directory, as cargo runs tests there) and
/// compares exit code, stdout and stderr with `tests/golden/<name>.txt`.
fn golden(name: &str, args: &[&str]) {
    let cli = Cli::try_parse_from(std::iter::once("policy").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("{name}: arguments {args:?} should parse: {e}"));
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = cli.cmd.run(&mut out, &mut err);
    let actual = format!(
        "$ flowaudit policy {}\n[exit {code}]\n--- stdout\n{}--- stderr\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out),
        String::from_utf8_lossy(&err)
    );
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.txt"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &actual)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run with UPDATE_GOLDEN=1 to create it",
            path.display()
        )
    });
    assert!(
        expected == actual,
        "{name}: output differs from {} (UPDATE_GOLDEN=1 regenerates)\n--- expected\n{expected}\n--- actual\n{actual}",
        path.display()
    );
}

#[test]
fn check_examples() {
    golden("check-examples", &["check", "../deploy/examples"]);
}

#[test]
fn check_wrong_namespace_label() {
    golden(
        "check-wrong-label",
        &[
            "check",
            "tests/fixtures/postgresql-wrong-namespace-label.yaml",
        ],
    );
}

#[test]
fn check_invalid() {
    golden(
        "check-invalid",
        &["check", "tests/fixtures/invalid-flowpolicy.yaml"],
    );
}

#[test]
fn check_json() {
    golden(
        "check-json",
        &["check", "-o", "json", "tests/fixtures/netpol.yaml"],
    );
}

/// A path that does not exist and a file that is not UTF-8 are named, and
/// the readable file is still checked; exit 2 (unreadable paths), in JSON
/// too.
#[test]
fn check_unreadable_paths_are_named_and_the_rest_is_checked() {
    let args = [
        "tests/fixtures/no-such-policy.yaml",
        "tests/fixtures/netpol.yaml",
        "tests/fixtures/latin1.yaml",
    ];
    golden("check-unreadable", &[&["check"][..], &args].concat());
    golden(
        "check-unreadable-json",
        &[&["check", "-o", "json"][..], &args].concat(),
    );
}

#[test]
fn explain_frontend_to_postgresql() {
    golden(
        "explain-frontend-postgresql",
        &[
            "explain",
            "--policy",
            "../deploy/examples",
            "--from",
            "spiffe://demo.local/ns/99-apps/sa/frontend,app=frontend",
            "--to",
            "ns=99-apps,sa=postgresql,app=postgresql",
            "--port",
            "5432",
            "--encryption",
            "plaintext",
        ],
    );
}

/// `policy explain` of frontend -> backend:8000 under the example policy,
/// then `more` arguments.
fn explain_frontend_to_backend(name: &str, more: &[&str]) {
    let args: Vec<&str> = [
        "explain",
        "--policy",
        "../deploy/examples/precinct-99-flowpolicy.yaml",
        "--from",
        "spiffe://demo.local/ns/99-apps/sa/frontend",
        "--to",
        "spiffe://demo.local/ns/99-apps/sa/backend",
        "--port",
        "8000",
    ]
    .into_iter()
    .chain(more.iter().copied())
    .collect();
    golden(name, &args);
}

#[test]
fn explain_plaintext_frontend_to_backend_json() {
    explain_frontend_to_backend(
        "explain-frontend-backend-json",
        &["--encryption", "plaintext", "-o", "json"],
    );
}

#[test]
fn explain_blocked_intended_flow() {
    golden(
        "explain-openbao-postgresql-failed",
        &[
            "explain",
            "--policy",
            "tests/fixtures/postgresql-wrong-namespace-label.yaml",
            "--from",
            "ns=openbao,sa=openbao,app.kubernetes.io/name=openbao",
            "--to",
            "ns=99-apps,app=postgresql",
            "--port",
            "5432",
            "--failed",
        ],
    );
}

#[test]
fn explain_world_to_frontend() {
    golden(
        "explain-world-frontend",
        &[
            "explain",
            "--policy",
            "../deploy/examples",
            "--from",
            "world",
            "--to",
            "ns=99-apps,sa=frontend,app=frontend",
            "--port",
            "3000",
            "--encryption",
            "tls",
        ],
    );
}

#[test]
fn explain_peer_with_an_empty_value() {
    golden(
        "explain-empty-value",
        &[
            "explain",
            "--policy",
            "../deploy/examples",
            "--from",
            "ns=,app=frontend",
            "--to",
            "world",
            "--port",
            "443",
        ],
    );
}

#[test]
fn explain_bad_peer() {
    golden(
        "explain-bad-peer",
        &[
            "explain",
            "--policy",
            "../deploy/examples",
            "--from",
            "frontend",
            "--to",
            "world",
            "--port",
            "1",
        ],
    );
}

/// A glob is a rule's, not a flow end's: refused (exit 2). A policy path
/// that cannot be read exits 2, as in `policy check`.
#[test]
fn explain_refuses_a_glob_peer_and_names_an_unreadable_policy() {
    golden(
        "explain-glob-peer",
        &[
            "explain",
            "--policy",
            "../deploy/examples",
            "--from",
            "spiffe://demo.local/ns/*/sa/frontend",
            "--to",
            "world",
            "--port",
            "1",
        ],
    );
    golden(
        "explain-unreadable",
        &[
            "explain",
            "--policy",
            "tests/fixtures/no-such-policy.yaml",
            "--from",
            "world",
            "--to",
            "host",
            "--port",
            "1",
        ],
    );
}

/// A file given and also in a directory given is read once (its rules
/// were each other's duplicates, and the agent refused them).
#[test]
fn check_a_file_given_twice() {
    golden(
        "check-twice",
        &[
            "check",
            "../deploy/examples/precinct-99-flowpolicy.yaml",
            "../deploy/examples",
        ],
    );
}

#[test]
fn explain_cilium_mutual_authentication() {
    let base = [
        "explain",
        "--policy",
        "../deploy/examples/cilium-mutual-auth/backend-ingress.yaml",
        "--from",
        "ns=99-apps,app=frontend,sa=frontend",
        "--to",
        "ns=99-apps,app=backend,sa=backend",
        "--port",
        "8000",
        "--encryption",
        "plaintext",
    ];
    // The issue's own command: without Cilium state, unverified, never MTLS_MISSING.
    golden("explain-cilium-auth-not-observable", &base);
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        base.iter().chain(extra.iter()).copied().collect()
    };
    golden(
        "explain-cilium-auth-authenticated",
        &with(&[
            "--mutual-auth",
            "authenticated",
            "--path-encryption",
            "unencrypted",
        ]),
    );
    golden(
        "explain-cilium-auth-expired-json",
        &with(&["--mutual-auth", "expired", "-o", "json"]),
    );
}

/// TLS whose client certificate cannot be seen (TLS 1.3) under a rule that
/// requires mTLS: reported but COMPLIANT by default, a VIOLATION with
/// `--mtls-unverified violation`.
#[test]
fn explain_tls13_unverified_reported_or_violation() {
    explain_frontend_to_backend("explain-tls13-unverified-report", &["--encryption", "tls"]);
    explain_frontend_to_backend(
        "explain-tls13-unverified-violation",
        &["--encryption", "tls", "--mtls-unverified", "violation"],
    );
}
