//! Loading: policy paths (files, directories of `*.yaml`/`*.yml`, several of each) are
//! read, split into YAML documents, dispatched by `kind`, validated across documents
//! (duplicate names) and compiled into a [`PolicySet`]. Problems become diagnostics;
//! any error makes loading fail, so a reload never swaps in a broken policy.

use std::collections::HashMap;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::diag::{Diagnostic, PolicyError, Severity};
use crate::engine::PolicySet;
use crate::flowpolicy::{self, FlowPolicyDoc};
use crate::import;
use crate::ir::{Action, ImportKind, ImportedPolicy, Rule};
use crate::yaml::{self, Ctx, Map, is_null};

/// One policy source: a display name (its path) and its text.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub text: String,
}

/// What was loaded, for `policy check` and the agent's logs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub files: usize,
    pub documents: usize,
    pub flow_policies: usize,
    pub allow_rules: usize,
    pub deny_rules: usize,
    pub cilium_network_policies: usize,
    pub cilium_clusterwide_network_policies: usize,
    pub network_policies: usize,
    pub imported_rules: usize,
    pub errors: usize,
    pub warnings: usize,
    /// One line per policy: `file:line: kind name: details`.
    pub entries: Vec<String>,
}

/// Result of checking sources: always produced, with the compiled policy when there
/// were no errors.
#[derive(Debug)]
pub struct CheckReport {
    pub diagnostics: Vec<Diagnostic>,
    pub summary: Summary,
    pub policy: Option<PolicySet>,
    /// The files read (for the agent's change watcher).
    pub files: Vec<PathBuf>,
    /// Paths and files that could not be read, each an error in
    /// `diagnostics` (so there is no policy): `policy check` exits 2.
    pub unreadable: usize,
}

/// A successfully loaded policy.
#[derive(Debug)]
pub struct Loaded {
    pub policy: PolicySet,
    pub warnings: Vec<Diagnostic>,
    pub summary: Summary,
    pub files: Vec<PathBuf>,
}

/// Files a set of policy paths stands for: files as given, directories' `*.yaml` and
/// `*.yml` entries (not recursive; dot-files skipped, so Kubernetes ConfigMap mounts'
/// `..data` copies are not read twice), sorted for a stable order.
pub fn expand_paths<P: AsRef<Path>>(paths: &[P]) -> Result<Vec<PathBuf>, PolicyError> {
    if paths.is_empty() {
        return Err(PolicyError::NoPaths);
    }
    let mut files = Vec::new();
    for p in paths {
        let p = p.as_ref();
        if p.as_os_str() == "-" {
            files.push(p.to_path_buf());
            continue;
        }
        let meta = std::fs::metadata(p).map_err(|source| PolicyError::Io {
            path: p.to_path_buf(),
            source,
        })?;
        // A pipe named on the command line (`/dev/stdin`, `<(...)`) is read
        // as a file is; `-` is standard input (see `check_paths`).
        if meta.is_file() || meta.file_type().is_fifo() || p.as_os_str() == "-" {
            files.push(p.to_path_buf());
        } else if meta.is_dir() {
            let rd = std::fs::read_dir(p).map_err(|source| PolicyError::Io {
                path: p.to_path_buf(),
                source,
            })?;
            let mut found = Vec::new();
            for e in rd {
                let e = e.map_err(|source| PolicyError::Io {
                    path: p.to_path_buf(),
                    source,
                })?;
                let path = e.path();
                let name = e.file_name();
                let name = name.to_string_lossy();
                if name.starts_with('.') || !(name.ends_with(".yaml") || name.ends_with(".yml")) {
                    continue;
                }
                // A link that leads nowhere (or in a loop) is kept, so that
                // reading it says so, rather than skipped unseen; a
                // directory named *.yaml is not a file to read.
                match std::fs::metadata(&path) {
                    Ok(m) if m.is_file() => found.push(path),
                    Ok(_) => {}
                    Err(_) => found.push(path),
                }
            }
            found.sort();
            files.extend(found);
        } else {
            return Err(PolicyError::NotFileOrDir(p.to_path_buf()));
        }
    }
    Ok(files)
}

/// Reads and checks policy paths. Only no paths at all is an `Err`: a path
/// or file that cannot be read is an error in the report, naming it, and
/// the rest are read and checked all the same (so one run tells every
/// problem); the report then has no policy.
pub fn check_paths<P: AsRef<Path>>(paths: &[P]) -> Result<CheckReport, PolicyError> {
    if paths.is_empty() {
        return Err(PolicyError::NoPaths);
    }
    let mut unreadable = Vec::new();
    let mut files = Vec::new();
    for p in paths {
        match expand_paths(std::slice::from_ref(p)) {
            Ok(found) => files.extend(found),
            Err(e) => unreadable.push(unreadable_path(p.as_ref(), &e)),
        }
    }
    // A file reached twice (given and in a directory given, or through a
    // link) is read once: twice, its rules were each other's duplicates.
    let mut seen = std::collections::HashSet::new();
    files.retain(|f| seen.insert(std::fs::canonicalize(f).unwrap_or_else(|_| f.clone())));
    let mut sources = Vec::with_capacity(files.len());
    let mut read = Vec::with_capacity(files.len());
    for f in files {
        let stdin = f.as_os_str() == "-";
        let bytes = match stdin {
            true => {
                let mut b = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut b).map(|_| b)
            }
            false => std::fs::read(&f),
        };
        let text = match bytes {
            Ok(bytes) => String::from_utf8(bytes),
            Err(source) => {
                unreadable.push(unreadable_path(
                    &f,
                    &PolicyError::Io {
                        path: f.clone(),
                        source,
                    },
                ));
                continue;
            }
        };
        let text = match text {
            Ok(text) => text,
            Err(e) => {
                // Where the first bad byte is, as an editor counts it.
                let good = &e.as_bytes()[..e.utf8_error().valid_up_to()];
                let line = 1 + good.iter().filter(|&&b| b == b'\n').count();
                let line_start = good.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
                let col = 1 + String::from_utf8_lossy(&good[line_start..]).chars().count();
                unreadable.push(Diagnostic {
                    severity: Severity::Error,
                    file: f.display().to_string(),
                    line,
                    col,
                    message: "not valid UTF-8 (a YAML file is UTF-8 text)".into(),
                });
                continue;
            }
        };
        sources.push(Source {
            name: match stdin {
                true => "standard input".to_owned(),
                false => f.display().to_string(),
            },
            text,
        });
        read.push(f);
    }
    let given: Vec<String> = paths
        .iter()
        .map(|p| p.as_ref().display().to_string())
        .collect();
    let mut report = check_named(&sources, &given.join(", "), unreadable);
    report.files = read;
    Ok(report)
}

/// The error of a path (given, or found in a directory) that could not be
/// read, naming it.
fn unreadable_path(path: &Path, e: &PolicyError) -> Diagnostic {
    let message = match e {
        PolicyError::Io { source, .. } => format!("cannot read: {source}"),
        PolicyError::NotFileOrDir(_) => "neither a file nor a directory".into(),
        other => other.to_string(),
    };
    Diagnostic {
        severity: Severity::Error,
        file: path.display().to_string(),
        line: 0,
        col: 0,
        message,
    }
}

/// Loads policy paths for the agent (initially and on every reload): `Err` if anything
/// is wrong, so the caller keeps its last good [`PolicySet`].
pub fn load_paths<P: AsRef<Path>>(paths: &[P]) -> Result<Loaded, PolicyError> {
    let report = check_paths(paths)?;
    into_loaded(report)
}

/// Like [`load_paths`], from in-memory sources (tests, fuzzing, ConfigMaps read by API).
pub fn load_sources(sources: &[Source]) -> Result<Loaded, PolicyError> {
    into_loaded(check_sources(sources))
}

pub(crate) fn into_loaded(report: CheckReport) -> Result<Loaded, PolicyError> {
    match report.policy {
        Some(policy) => Ok(Loaded {
            policy,
            warnings: report.diagnostics,
            summary: report.summary,
            files: report.files,
        }),
        None => Err(PolicyError::Invalid(report.diagnostics)),
    }
}

enum Doc {
    Flow(FlowPolicyDoc),
    Imported(Vec<ImportedPolicy>),
}

/// Parses, validates and (if error-free) compiles sources.
pub fn check_sources(sources: &[Source]) -> CheckReport {
    let names: Vec<&str> = sources.iter().map(|s| s.name.as_str()).collect();
    check_named(sources, &names.join(", "), Vec::new())
}

/// [`check_sources`]; `given` names what was asked for (the paths, which
/// may be directories without a policy file) in the error for sources that
/// hold no policy at all.
/// Checks `sources`; `unreadable` are the errors of paths that could not be
/// read, reported first.
fn check_named(sources: &[Source], given: &str, unreadable: Vec<Diagnostic>) -> CheckReport {
    let unreadable_n = unreadable.len();
    let mut diagnostics = unreadable;
    let mut summary = Summary {
        files: sources.len(),
        ..Default::default()
    };
    let mut rules: Vec<Rule> = Vec::new();
    let mut imported: Vec<ImportedPolicy> = Vec::new();
    let mut trust_domains: Vec<String> = Vec::new();
    let mut rule_names: HashMap<String, String> = HashMap::new();
    let mut policy_names: HashMap<String, String> = HashMap::new();

    for src in sources {
        let mut ctx = Ctx::new(src.name.clone());
        let docs = yaml::load(&mut ctx, &src.text);
        for node in &docs {
            if is_null(node) {
                continue; // empty document (`---` at the end, comments only)
            }
            summary.documents += 1;
            // Bounded: a `List` inside a `List` is not something kubectl produces.
            let mut pending: Vec<(&saphyr::MarkedYaml<'_>, bool)> = vec![(node, true)];
            while let Some((n, top_level)) = pending.pop() {
                let Some(map) = Map::new(&mut ctx, n, "a policy document") else {
                    continue;
                };
                let kind = map.opt_string(&mut ctx, "kind", "a policy document");
                let parsed = match kind.as_deref() {
                    Some("FlowPolicy") => flowpolicy::parse(&mut ctx, &map).map(Doc::Flow),
                    Some("CiliumNetworkPolicy") => Some(Doc::Imported(import::parse_cilium(
                        &mut ctx,
                        &map,
                        ImportKind::CiliumNetworkPolicy,
                    ))),
                    Some("CiliumClusterwideNetworkPolicy") => {
                        Some(Doc::Imported(import::parse_cilium(
                            &mut ctx,
                            &map,
                            ImportKind::CiliumClusterwideNetworkPolicy,
                        )))
                    }
                    Some("NetworkPolicy") => {
                        Some(Doc::Imported(import::parse_netpol(&mut ctx, &map)))
                    }
                    Some("List" | "CiliumNetworkPolicyList" | "NetworkPolicyList") if top_level => {
                        map.check_fields(
                            &mut ctx,
                            "List",
                            &["apiVersion", "kind", "metadata", "items"],
                        );
                        if let Some(items) = map.get("items") {
                            let items = yaml::seq(&mut ctx, items, "`items`");
                            pending.extend(items.iter().rev().map(|i| (i, false)));
                        }
                        None
                    }
                    Some(other) => {
                        let at = map.get("kind").unwrap_or(n);
                        ctx.error_at(at, format!("unsupported kind `{other}`; expected FlowPolicy, CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy or NetworkPolicy"));
                        None
                    }
                    None => {
                        if !map.has("kind") {
                            ctx.error_at(n, "document has no `kind`; expected FlowPolicy, CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy or NetworkPolicy");
                        }
                        None
                    }
                };
                match parsed {
                    Some(Doc::Flow(fp)) => {
                        summary.flow_policies += 1;
                        let allows = fp
                            .rules
                            .iter()
                            .filter(|r| matches!(r.action, Action::Allow(_)))
                            .count();
                        let denies = fp.rules.len() - allows;
                        summary.allow_rules += allows;
                        summary.deny_rules += denies;
                        let (line, _) = yaml::pos(n);
                        summary.entries.push(format!(
                            "{}:{}: FlowPolicy {} (trust domain {}): {} allow, {} deny",
                            src.name, line, fp.name, fp.trust_domain, allows, denies
                        ));
                        if !fp.trust_domain.is_empty() && !trust_domains.contains(&fp.trust_domain)
                        {
                            if let Some(first) = trust_domains.first() {
                                let at = map.get("spec").unwrap_or(n);
                                ctx.warn_at(
                                    at,
                                    format!(
                                        "trust domain `{}` after `{first}`: DERIVED identities (from pod metadata) are named in the first one, `{first}`, so rules for workloads in `{}` match only attested ends (the agent's --trust-domain chooses another)",
                                        fp.trust_domain, fp.trust_domain
                                    ),
                                );
                            }
                            trust_domains.push(fp.trust_domain.clone());
                        }
                        for r in fp.rules {
                            if let Some(first) = rule_names.get(&r.name) {
                                ctx.error_pos(
                                    r.origin.line,
                                    r.origin.col,
                                    format!(
                                        "duplicate rule name `{}` (first defined at {first})",
                                        r.name
                                    ),
                                );
                                continue;
                            }
                            rule_names.insert(r.name.clone(), r.origin.to_string());
                            rules.push(r);
                        }
                    }
                    Some(Doc::Imported(ps)) => {
                        for p in ps {
                            match p.kind {
                                ImportKind::CiliumNetworkPolicy => {
                                    summary.cilium_network_policies += 1
                                }
                                ImportKind::CiliumClusterwideNetworkPolicy => {
                                    summary.cilium_clusterwide_network_policies += 1
                                }
                                ImportKind::NetworkPolicy => summary.network_policies += 1,
                            }
                            let n_rules = p.ingress.allow.len()
                                + p.ingress.deny.len()
                                + p.egress.allow.len()
                                + p.egress.deny.len();
                            summary.imported_rules += n_rules;
                            let mut dirs = Vec::new();
                            if p.ingress.enforced {
                                dirs.push(format!(
                                    "ingress {} allow{}",
                                    p.ingress.allow.len(),
                                    deny_note(p.ingress.deny.len())
                                ));
                            }
                            if p.egress.enforced {
                                dirs.push(format!(
                                    "egress {} allow{}",
                                    p.egress.allow.len(),
                                    deny_note(p.egress.deny.len())
                                ));
                            }
                            if dirs.is_empty() {
                                dirs.push("restricts no direction".into());
                            }
                            summary.entries.push(format!(
                                "{}:{}: {} {} selects {}: {}",
                                p.origin.file,
                                p.origin.line,
                                p.kind.as_str(),
                                p.rule_name(),
                                p.subject,
                                dirs.join(", ")
                            ));
                            let key = p.rule_name();
                            if let Some(first) = policy_names.get(&key) {
                                ctx.error_pos(
                                    p.origin.line,
                                    p.origin.col,
                                    format!(
                                        "duplicate {} `{}` (first defined at {first})",
                                        p.kind.as_str(),
                                        key
                                    ),
                                );
                                continue;
                            }
                            policy_names.insert(key, p.origin.to_string());
                            imported.push(p);
                        }
                    }
                    None => {}
                }
            }
        }
        // Report in reading order, whatever order the checks ran in.
        ctx.diags.sort_by_key(|d| (d.line, d.col));
        diagnostics.append(&mut ctx.diags);
    }
    let policies = summary.flow_policies
        + summary.cilium_network_policies
        + summary.cilium_clusterwide_network_policies
        + summary.network_policies;
    if policies == 0 && diagnostics.iter().all(|d| d.severity != Severity::Error) {
        // A wrong path or an empty mount would otherwise judge every flow
        // against nothing: each one a VIOLATION (NO_MATCHING_RULE).
        diagnostics.push(Diagnostic {
            severity: Severity::Error,
            file: if given.is_empty() { "(no sources)".into() } else { given.into() },
            line: 0,
            col: 0,
            message: if sources.is_empty() {
                "no policy file: a directory is read for its *.yaml and *.yml files, and it has none; with no policy every flow would be a violation".into()
            } else {
                "no policy: these files hold no FlowPolicy, CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy or NetworkPolicy (they are empty, comments only, or an empty List); with no policy every flow would be a violation".into()
            },
        });
    }
    summary.errors = diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .count();
    summary.warnings = diagnostics.len() - summary.errors;
    let policy = (summary.errors == 0)
        .then(|| PolicySet::new(rules, imported, trust_domains, version_of(sources)));
    CheckReport {
        diagnostics,
        summary,
        policy,
        files: Vec::new(),
        unreadable: unreadable_n,
    }
}

fn deny_note(n: usize) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" + {n} deny")
    }
}

/// FNV-1a over names and contents: stable across runs and platforms, no dependency.
fn version_of(sources: &[Source]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for s in sources {
        for b in s
            .name
            .bytes()
            .chain([0u8])
            .chain(s.text.bytes())
            .chain([0u8])
        {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(sources: &[(&str, &str)]) -> Vec<String> {
        let sources: Vec<Source> = sources
            .iter()
            .map(|(name, text)| Source {
                name: (*name).into(),
                text: (*text).into(),
            })
            .collect();
        let report = check_sources(&sources);
        assert_eq!(report.policy.is_none(), report.summary.errors > 0);
        report
            .diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .map(|d| d.to_string())
            .collect()
    }

    /// A negative or fractional port is an error, not a named port.
    #[test]
    fn a_port_with_no_letter_is_a_number_or_an_error() {
        let np = |port: &str| {
            format!(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: n, namespace: a}}\nspec:\n  podSelector: {{}}\n  ingress:\n    - ports:\n        - {{port: {port}}}\n"
            )
        };
        for bad in ["-1", "8.5"] {
            let e = errors(&[("n.yaml", &np(bad))]);
            assert_eq!(e.len(), 1, "{bad}: {e:?}");
            assert!(e[0].starts_with("n.yaml:8:"), "{bad}: {e:?}");
        }
        assert_eq!(errors(&[("n.yaml", &np("http"))]), Vec::<String>::new());
    }

    /// A file reached twice is read once; a link in a directory that
    /// leads nowhere is named, not skipped; a pipe given is read.
    #[test]
    fn paths_are_read_once_and_none_is_skipped_unseen() {
        let dir = std::env::temp_dir().join(format!("fa-policy-paths-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let fp = "apiVersion: flowaudit.io/v1alpha1\nkind: FlowPolicy\nmetadata: {name: p}\nspec:\n  trustDomain: demo.local\n  rules:\n    - {name: r, from: [world], to: [host], ports: [1]}\n";
        let p = dir.join("p.yaml");
        std::fs::write(&p, fp).unwrap();
        let report = check_paths(&[p.clone(), dir.clone(), dir.join("./p.yaml")]).unwrap();
        assert!(report.policy.is_some(), "{:?}", report.diagnostics);
        assert_eq!(report.files, std::slice::from_ref(&p));
        std::os::unix::fs::symlink(dir.join("missing.yaml"), dir.join("q.yaml")).unwrap();
        let report = check_paths(&[&dir]).unwrap();
        assert_eq!(report.unreadable, 1);
        assert_eq!(
            report.diagnostics[0].to_string(),
            format!(
                "{}: cannot read: No such file or directory (os error 2)",
                dir.join("q.yaml").display()
            )
        );
        std::fs::remove_file(dir.join("q.yaml")).unwrap();
        let fifo = dir.join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let writer = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::write(fifo, fp).unwrap())
        };
        let report = check_paths(&[&fifo]).unwrap();
        writer.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(report.policy.is_some(), "{:?}", report.diagnostics);
    }

    #[test]
    fn sources_without_a_policy_are_an_error_not_an_empty_policy() {
        let e = errors(&[("a.yaml", ""), ("b.yaml", "# just a comment\n---\n")]);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("a.yaml, b.yaml: no policy: these files hold no FlowPolicy"),
            "{e:?}"
        );
        let e = errors(&[("l.yaml", "kind: List\napiVersion: v1\nitems: []\n")]);
        assert_eq!(e.len(), 1, "{e:?}");
        // A directory without policy files: named as given.
        let dir = std::env::temp_dir().join(format!("fa-policy-empty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("notes.txt"), "kind: FlowPolicy\n").unwrap();
        let report = check_paths(&[&dir]).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(report.policy.is_none());
        assert_eq!(
            report.diagnostics[0].to_string(),
            format!(
                "{}: no policy file: a directory is read for its *.yaml and *.yml files, and it has none; with no policy every flow would be a violation",
                dir.display()
            )
        );
        // One policy among empty files is a policy.
        let fp = "apiVersion: flowaudit.io/v1alpha1\nkind: FlowPolicy\nmetadata: {name: p}\nspec:\n  trustDomain: demo.local\n  rules: []\n";
        assert_eq!(
            errors(&[("a.yaml", ""), ("p.yaml", fp)]),
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_second_trust_domain_is_a_warning_naming_the_one_derived_ids_use() {
        let fp = |name: &str, td: &str| {
            format!(
                "apiVersion: flowaudit.io/v1alpha1\nkind: FlowPolicy\nmetadata: {{name: {name}}}\nspec:\n  trustDomain: {td}\n  rules: []\n"
            )
        };
        let sources = [
            Source {
                name: "a.yaml".into(),
                text: fp("a", "demo.local"),
            },
            Source {
                name: "b.yaml".into(),
                text: fp("b", "demo.local"),
            },
            Source {
                name: "c.yaml".into(),
                text: fp("c", "other.local"),
            },
        ];
        let report = check_sources(&sources);
        assert!(report.policy.is_some());
        let warnings: Vec<String> = report.diagnostics.iter().map(|d| d.to_string()).collect();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].starts_with("c.yaml:5:3: warning: trust domain `other.local` after `demo.local`: DERIVED identities"),
            "{warnings:?}"
        );
    }

    #[test]
    fn an_unknown_selector_operator_is_named_before_its_values_are_judged() {
        let np = |op: &str| {
            format!(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: n, namespace: a}}\nspec:\n  podSelector:\n    matchExpressions: [{{key: app, operator: {op}, values: [x]}}]\n  policyTypes: [Ingress]\n"
            )
        };
        let e = errors(&[("np.yaml", &np("Inn"))]);
        assert_eq!(
            e,
            vec![
                "np.yaml:6:45: unknown operator `Inn`; expected In, NotIn, Exists or DoesNotExist"
            ]
        );
        let e = errors(&[("np.yaml", &np("Exists"))]);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].ends_with("operator `Exists` takes no `values`"),
            "{e:?}"
        );
        assert_eq!(errors(&[("np.yaml", &np("In"))]), Vec::<String>::new());
    }
}
