//! The `flowaudit policy` subcommands as a library: `check` (validate, summarise,
//! warn) and `explain` (what would flowaudit say about one flow, without eBPF or
//! root). The agent's binary embeds [`PolicyCommand`] and calls [`PolicyCommand::run`]
//! with its stdout and stderr.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;

use crate::diag::Severity;
use crate::load::check_paths;
use crate::model::{
    AuthSide, Decision, EncryptionState, EvalOptions, Flow, IdentitySource, MutualAuth,
    MutualAuthState, NoCilium, ObservedEncryption, PathEncryption, Peer, PeerKind,
};
use crate::spiffe::{derive_id, ns_sa_of};

const PEER_HELP: &str = "A SPIFFE ID (spiffe://demo.local/ns/99-apps/sa/frontend), `world`, `host`, `unknown`, \
or a pod description `ns=99-apps,app=frontend[,sa=frontend]`: keys `ns` (namespace), `sa` (service account), \
`id` (SPIFFE ID), `pod` (name); every other key=value is a pod label. With `ns` and `sa` but no `id`, the ID is \
derived as spiffe://<trust domain>/ns/<ns>/sa/<sa> from the loaded FlowPolicy. A bare SPIFFE ID following that \
convention also gives namespace and service account; its labels stay unknown.";

/// `flowaudit policy ...`
#[derive(Debug, Clone, Subcommand)]
pub enum PolicyCommand {
    /// Parse, validate and summarise policies (FlowPolicy, CiliumNetworkPolicy,
    /// CiliumClusterwideNetworkPolicy, NetworkPolicy). Every path is read and
    /// checked, and every problem told; exit 0 when valid, 1 on policy
    /// errors, 2 when a path cannot be read.
    Check(CheckArgs),
    /// Show the verdict, findings and rule flowaudit would give one flow.
    Explain(ExplainArgs),
}

#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// Policy files or directories (every *.yaml / *.yml in them, not in
    /// their subdirectories); `-` reads standard input. A file reached
    /// twice is read once.
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Debug, Clone, Args)]
pub struct ExplainArgs {
    /// Policy file or directory; repeatable, or several separated by
    /// commas; `-` reads standard input.
    #[arg(
        long = "policy",
        required = true,
        value_name = "PATH",
        env = "FLOWAUDIT_POLICY",
        value_delimiter = ','
    )]
    pub policy: Vec<PathBuf>,
    /// Source of the flow.
    #[arg(long, value_name = "PEER", long_help = PEER_HELP)]
    pub from: String,
    /// Destination of the flow.
    #[arg(long, value_name = "PEER", long_help = PEER_HELP)]
    pub to: String,
    /// Destination TCP port (1-65535).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,
    /// What was seen on the wire.
    #[arg(long, value_enum, default_value_t = EncryptionArg::Unknown)]
    pub encryption: EncryptionArg,
    /// The connection attempt failed (refused, reset, timed out).
    #[arg(long)]
    pub failed: bool,
    /// What Cilium's auth map held for the pair when the connection was made
    /// (asked only under a Cilium rule with `authentication.mode: required`).
    /// Left out: not observable, as on a node without Cilium.
    #[arg(long, value_enum, value_name = "STATE")]
    pub mutual_auth: Option<MutualAuthArg>,
    /// Whether Cilium's transparent encryption covers the path (with
    /// `--mutual-auth`).
    #[arg(long, value_enum, default_value_t = PathArg::Unknown, requires = "mutual_auth")]
    pub path_encryption: PathArg,
    /// How MTLS_UNVERIFIED counts under a rule that requires mTLS (as the
    /// agent's flag of the same name).
    #[arg(
        long,
        value_enum,
        value_name = "MODE",
        default_value_t = MtlsUnverified::Report,
        env = "FLOWAUDIT_MTLS_UNVERIFIED"
    )]
    pub mtls_unverified: MtlsUnverified,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

/// How `MTLS_UNVERIFIED` (TLS whose client certificate cannot be observed,
/// or encryption not seen) counts under a rule that requires mTLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum MtlsUnverified {
    /// A finding; the verdict stays COMPLIANT (TLS 1.3 hides client
    /// authentication: flagging every such flow would drown real findings).
    #[default]
    Report,
    /// A VIOLATION, as MTLS_MISSING is: only mTLS seen on the wire (or
    /// Cilium's auth map) satisfies a rule that requires it.
    Violation,
}

impl MtlsUnverified {
    /// The policy engine's options for this mode.
    pub fn eval_options(self) -> EvalOptions {
        EvalOptions {
            unverified_mtls_is_violation: self == MtlsUnverified::Violation,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EncryptionArg {
    /// No TLS.
    Plaintext,
    /// TLS; whether the client sent a certificate cannot be observed (TLS 1.3).
    Tls,
    /// TLS 1.2 or older, handshake seen, no client certificate.
    TlsNoClientCert,
    /// Mutual TLS.
    Mtls,
    /// No payload seen.
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MutualAuthArg {
    /// A valid auth entry for the pair.
    Authenticated,
    /// The pair's entry had expired.
    Expired,
    /// No entry for the pair.
    Missing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PathArg {
    /// Both ends on one node (never transparently encrypted).
    SameNode,
    /// Cross-node with WireGuard or IPsec.
    Encrypted,
    /// Cross-node without transparent encryption.
    Unencrypted,
    /// Not known.
    Unknown,
}

impl From<PathArg> for PathEncryption {
    fn from(p: PathArg) -> Self {
        match p {
            PathArg::SameNode => PathEncryption::SameNode,
            PathArg::Encrypted => PathEncryption::Encrypted,
            PathArg::Unencrypted => PathEncryption::Unencrypted,
            PathArg::Unknown => PathEncryption::Unknown,
        }
    }
}

impl From<EncryptionArg> for ObservedEncryption {
    fn from(e: EncryptionArg) -> Self {
        match e {
            EncryptionArg::Plaintext => ObservedEncryption::Plaintext,
            EncryptionArg::Tls => ObservedEncryption::TlsUnverified,
            EncryptionArg::TlsNoClientCert => ObservedEncryption::TlsNoClientCert,
            EncryptionArg::Mtls => ObservedEncryption::Mtls,
            EncryptionArg::Unknown => ObservedEncryption::Unknown,
        }
    }
}

impl PolicyCommand {
    /// Runs the command; returns the process exit code (0 ok, 1 policy errors, 2 bad
    /// arguments or unreadable paths). Write errors on `out`/`err` are ignored: there
    /// is nowhere left to report them.
    pub fn run(&self, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
        match self {
            PolicyCommand::Check(a) => check(a, out, err),
            PolicyCommand::Explain(a) => explain(a, out, err),
        }
    }
}

fn check(a: &CheckArgs, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let report = match check_paths(&a.paths) {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(err, "error: {e}");
            return 2;
        }
    };
    let s = &report.summary;
    if a.output == OutputFormat::Json {
        #[derive(Serialize)]
        struct J<'a> {
            ok: bool,
            summary: &'a crate::load::Summary,
            diagnostics: &'a [crate::diag::Diagnostic],
            version: Option<&'a str>,
        }
        let j = J {
            ok: s.errors == 0,
            summary: s,
            diagnostics: &report.diagnostics,
            version: report.policy.as_ref().map(|p| p.version()),
        };
        let _ = writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&j).unwrap_or_default()
        );
    } else {
        for d in &report.diagnostics {
            let _ = writeln!(err, "{d}");
        }
        for e in &s.entries {
            let _ = writeln!(out, "{e}");
        }
        let _ = writeln!(
            out,
            "{} files, {} documents: {} FlowPolicy ({} allow, {} deny rules), {} CiliumNetworkPolicy, {} CiliumClusterwideNetworkPolicy, {} NetworkPolicy ({} imported rules)",
            s.files,
            s.documents,
            s.flow_policies,
            s.allow_rules,
            s.deny_rules,
            s.cilium_network_policies,
            s.cilium_clusterwide_network_policies,
            s.network_policies,
            s.imported_rules
        );
        let _ = writeln!(
            out,
            "{}: {} errors, {} warnings",
            if s.errors == 0 { "ok" } else { "invalid" },
            s.errors,
            s.warnings
        );
    }
    if report.unreadable > 0 {
        2
    } else if report
        .diagnostics
        .iter()
        .any(|d| d.severity == Severity::Error)
    {
        1
    } else {
        0
    }
}

/// A peer parsed from the command line, owning what [`Peer`] borrows.
#[derive(Debug, Default, Serialize)]
struct PeerArg {
    kind: Option<PeerKind>,
    spiffe_id: Option<String>,
    identity_source: Option<IdentitySource>,
    namespace: Option<String>,
    service_account: Option<String>,
    pod: Option<String>,
    labels: Option<BTreeMap<String, String>>,
}

impl PeerArg {
    fn parse(text: &str) -> Result<PeerArg, String> {
        let text = text.trim();
        let mut p = PeerArg::default();
        match text {
            "world" => p.kind = Some(PeerKind::World),
            "host" => p.kind = Some(PeerKind::Host),
            "unknown" => p.kind = Some(PeerKind::Unknown),
            t if t.starts_with("spiffe://") && !t.contains(',') => {
                p.kind = Some(PeerKind::Workload);
                p.set_id(t)?;
            }
            t => {
                p.kind = Some(PeerKind::Workload);
                let mut labels = BTreeMap::new();
                for part in t.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    if part.starts_with("spiffe://") {
                        p.set_id(part)?;
                        continue;
                    }
                    let Some((k, v)) = part.split_once('=') else {
                        return Err(format!(
                            "`{part}` in `{t}` is not key=value; expected a SPIFFE ID, world, host, unknown or ns=<ns>,<label>=<value>[,sa=<sa>]"
                        ));
                    };
                    let (k, v) = (k.trim(), v.trim());
                    if v.is_empty() {
                        return Err(format!("`{part}` in `{t}` has no value after `=`"));
                    }
                    match k {
                        "ns" | "namespace" => p.namespace = Some(v.to_string()),
                        "sa" | "serviceaccount" => p.service_account = Some(v.to_string()),
                        "pod" => p.pod = Some(v.to_string()),
                        "id" => p.set_id(v)?,
                        _ => {
                            labels.insert(k.to_string(), v.to_string());
                        }
                    }
                }
                if p.namespace.is_none() && p.spiffe_id.is_none() {
                    return Err(format!("pod description `{t}` needs `ns=<namespace>`"));
                }
                p.labels = Some(labels);
            }
        }
        Ok(p)
    }

    fn set_id(&mut self, id: &str) -> Result<(), String> {
        // One workload's ID: a glob (`*`, `**`) is a rule's, not a flow's.
        if let Err(why) = crate::spiffe::check_id(id) {
            let glob = match id.contains('*') {
                true => "; a flow's end has one ID, not a glob",
                false => "",
            };
            return Err(format!(
                "`{id}` is not a SPIFFE ID (spiffe://<trust-domain>/<path>): {why}{glob}"
            ));
        }
        self.spiffe_id = Some(id.to_string());
        self.identity_source = Some(IdentitySource::Attested);
        if let Some((ns, sa)) = ns_sa_of(id) {
            self.namespace.get_or_insert_with(|| ns.to_string());
            self.service_account.get_or_insert_with(|| sa.to_string());
        }
        Ok(())
    }

    /// Derives the SPIFFE ID from namespace and service account, as the agent does.
    fn derive(&mut self, trust_domain: Option<&String>) {
        if self.spiffe_id.is_none()
            && let (Some(td), Some(ns), Some(sa)) =
                (trust_domain, &self.namespace, &self.service_account)
        {
            self.spiffe_id = Some(derive_id(td, ns, sa));
            self.identity_source = Some(IdentitySource::Derived);
        }
    }

    fn peer(&self) -> Peer<'_> {
        Peer {
            kind: self.kind.unwrap_or(PeerKind::Unknown),
            spiffe_id: self.spiffe_id.as_deref(),
            identity_source: self.identity_source.unwrap_or(IdentitySource::Unknown),
            namespace: self.namespace.as_deref(),
            service_account: self.service_account.as_deref(),
            labels: self.labels.as_ref().map(|l| l as &dyn crate::model::Labels),
            name: self.pod.as_deref(),
        }
    }

    fn describe(&self) -> String {
        let p = self.peer();
        let mut s = p.display_name().into_owned();
        let mut extra = Vec::new();
        if let Some(id) = &self.spiffe_id {
            extra.push(format!("{id}, {}", p.identity_source));
        }
        if p.kind == PeerKind::Workload && self.spiffe_id.is_none() {
            extra.push("no SPIFFE ID".into());
        }
        if let Some(ns) = &self.namespace {
            extra.push(format!("ns {ns}"));
        }
        if let Some(l) = &self.labels {
            let ls: Vec<String> = l.iter().map(|(k, v)| format!("{k}={v}")).collect();
            if !ls.is_empty() {
                extra.push(format!("labels {}", ls.join(",")));
            }
        }
        if !extra.is_empty() {
            s.push_str(&format!(" ({})", extra.join("; ")));
        }
        s
    }
}

#[derive(Serialize)]
struct ExplainJson<'a> {
    verdict: crate::model::Verdict,
    findings: &'a [crate::model::Finding],
    policy_rule: &'a str,
    mtls_required: bool,
    mutual_auth_required: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    mutual_auth: Option<&'a MutualAuth>,
    source: &'a PeerArg,
    destination: &'a PeerArg,
    destination_port: u16,
    encryption: EncryptionState,
    failed: bool,
    policy_version: &'a str,
}

fn explain(a: &ExplainArgs, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let (mut from, mut to) = match (PeerArg::parse(&a.from), PeerArg::parse(&a.to)) {
        (Ok(f), Ok(t)) => (f, t),
        (Err(e), _) => {
            let _ = writeln!(err, "error: --from: {e}");
            return 2;
        }
        (_, Err(e)) => {
            let _ = writeln!(err, "error: --to: {e}");
            return 2;
        }
    };
    // A path that cannot be read exits 2, as in `policy check`.
    let mut unreadable = false;
    let loaded = match crate::load::check_paths(&a.policy).and_then(|report| {
        unreadable = report.unreadable > 0;
        crate::load::into_loaded(report)
    }) {
        Ok(l) => l,
        Err(e) => {
            for d in e.diagnostics() {
                let _ = writeln!(err, "{d}");
            }
            if e.diagnostics().is_empty() || unreadable {
                if e.diagnostics().is_empty() {
                    let _ = writeln!(err, "error: {e}");
                }
                return 2;
            }
            return 1;
        }
    };
    let policy = loaded.policy.with_options(a.mtls_unverified.eval_options());
    let td = policy.trust_domains().first();
    from.derive(td);
    to.derive(td);
    let encryption: ObservedEncryption = a.encryption.into();
    let given = a.mutual_auth.map(|m| MutualAuth {
        state: match m {
            MutualAuthArg::Authenticated => MutualAuthState::Authenticated,
            MutualAuthArg::Expired => MutualAuthState::Expired,
            MutualAuthArg::Missing => MutualAuthState::Missing,
        },
        enforced_on: AuthSide::Ingress,
        local_identity: 0,
        remote_identity: 0,
        remote_node_id: 0,
        expires: String::new(),
        path_encryption: a.path_encryption.into(),
        detail: "as given by --mutual-auth".into(),
    });
    let flow = Flow {
        source: from.peer(),
        destination: to.peer(),
        port: a.port,
        encryption,
        encryption_detail: "",
        failed: a.failed,
        mutual_auth: match &given {
            Some(g) => g,
            None => &NoCilium,
        },
    };
    let d: Decision = policy.evaluate(&flow);
    if a.output == OutputFormat::Json {
        let j = ExplainJson {
            verdict: d.verdict,
            findings: &d.findings,
            policy_rule: &d.policy_rule,
            mtls_required: d.mtls_required,
            mutual_auth_required: d.mutual_auth_required,
            mutual_auth: d.mutual_auth.as_ref(),
            source: &from,
            destination: &to,
            destination_port: a.port,
            encryption: encryption.state(),
            failed: a.failed,
            policy_version: policy.version(),
        };
        let _ = writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&j).unwrap_or_default()
        );
    } else {
        let _ = writeln!(
            out,
            "flow:     {} -> {} port {}",
            from.describe(),
            to.describe(),
            a.port
        );
        let _ = writeln!(
            out,
            "seen:     {}{}",
            encryption.as_str(),
            if a.failed { ", attempt failed" } else { "" }
        );
        let _ = writeln!(out, "verdict:  {}", d.verdict);
        let rule = if d.policy_rule.is_empty() {
            "(none)"
        } else {
            &d.policy_rule
        };
        let needs = match (d.mtls_required, d.mutual_auth_required) {
            (true, true) => " (requires mTLS, and Cilium mutual authentication)",
            (true, false) => " (requires mTLS)",
            (false, true) => " (requires Cilium mutual authentication)",
            (false, false) => "",
        };
        let _ = writeln!(out, "rule:     {rule}{needs}");
        if d.mutual_auth_required {
            let _ = writeln!(
                out,
                "          Cilium mutual authentication is not TLS on the application's socket: Cilium's agents authenticate the two identities out of band and record it in its auth map; it is met by a valid entry for the pair when the connection was made, or by mTLS seen on the wire"
            );
        }
        if let Some(m) = &d.mutual_auth {
            let _ = writeln!(
                out,
                "cilium:   {} (path {}){}",
                m.state.as_str(),
                m.path_encryption.as_str(),
                if m.detail.is_empty() {
                    String::new()
                } else {
                    format!(": {}", m.detail)
                }
            );
        }
        if d.findings.is_empty() {
            let _ = writeln!(out, "findings: none");
        } else {
            let _ = writeln!(out, "findings:");
            for f in &d.findings {
                let _ = writeln!(out, "  {}: {}", f.kind, f.message);
            }
        }
    }
    for w in &loaded.warnings {
        let _ = writeln!(err, "{w}");
    }
    0
}
