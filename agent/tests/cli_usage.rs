//! A mistake on the command line exits 2 and names the flag, whether
//! clap finds it or our own checks do (a bad gRPC address, identity glob,
//! pod or label selector exited 1, as a failure of the run would).

use std::process::Command;

#[test]
fn a_bad_flag_value_exits_2_naming_the_flag() {
    for (args, flag) in [
        (&["agent", "--grpc-addr", "foo"][..], "--grpc-addr"),
        (
            &["relay", "--peers", "a:1", "--grpc-addr", "::1:4245"][..],
            "--grpc-addr",
        ),
        (&["status", "--server", "https://x:1"][..], "--server"),
        (
            &["observe", "--from-label", "app in (a"][..],
            "--from-label",
        ),
        (&["observe", "--to-pod", "/frontend"][..], "--to-pod"),
        (
            &[
                "observe",
                "--from-identity",
                "spiffe://demo.local/ns/*/sa/fr*",
            ][..],
            "--from-identity",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_flowaudit"))
            .args(args)
            .env_remove("FLOWAUDIT_SERVER")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!("for '{flag} <")),
            "{args:?}: {stderr}"
        );
    }
}
