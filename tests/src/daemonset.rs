//! The agent's pod as the DaemonSet runs it, read from the rendered kind
//! overlay (`kubectl kustomize deploy/kustomize/overlays/kind`), so that the
//! simulated-node tests grant the agent exactly the manifest's privileges and
//! the two cannot drift. In: the rendered multi-document YAML. Out: an
//! [`AgentPodSpec`] (capabilities, host namespaces, hostPath mounts, args)
//! of the `agent` container of the DaemonSet `flowaudit`, with Kubernetes'
//! defaults for what the manifest leaves unset.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize as _;
use serde_json::Value;

/// The DaemonSet and container the agent runs as (deploy/kustomize/base).
pub const DAEMONSET_NAME: &str = "flowaudit";
pub const CONTAINER_NAME: &str = "agent";
/// The overlay the kind deployment (deploy/kind/up.sh) renders.
pub const KIND_OVERLAY: &str = "deploy/kustomize/overlays/kind";

/// The privileges and arguments of the `agent` container, with Kubernetes'
/// defaults filled in for what the manifest leaves unset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPodSpec {
    /// `securityContext.capabilities.add`, upper-case without `CAP_`
    /// (e.g. `["BPF", "PERFMON", "NET_ADMIN"]`), in manifest order.
    pub capabilities_add: Vec<String>,
    /// `securityContext.capabilities.drop` holds `ALL`.
    pub capabilities_drop_all: bool,
    pub read_only_root: bool,
    pub host_pid: bool,
    pub host_network: bool,
    /// The container's `runAsUser`, else the pod's; None: the image's user.
    pub run_as_user: Option<u32>,
    /// Kubernetes' default when unset is true (no `no_new_privs`).
    pub allow_privilege_escalation: bool,
    /// The container's hostPath volume mounts, in manifest order.
    pub host_paths: Vec<HostPathMount>,
    pub args: Vec<String>,
    pub privileged: bool,
}

/// A hostPath volume as the container sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPathMount {
    /// Where the container sees it (`volumeMounts[].mountPath`).
    pub mount_path: String,
    /// The node's path (`volumes[].hostPath.path`).
    pub host_path: String,
    pub read_only: bool,
}

impl AgentPodSpec {
    /// The kernel numbers of [`capabilities_add`](Self::capabilities_add)
    /// (`CAP_BPF` = 39, ...), for capset(2) or a capability bounding set.
    pub fn capability_numbers(&self) -> Vec<u32> {
        self.capabilities_add
            .iter()
            .map(|name| {
                capability_number(name).unwrap_or_else(|| {
                    panic!("capability {name:?} is not in linux/capability.h (CHOWN..CHECKPOINT_RESTORE)")
                })
            })
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonSetError {
    #[error(
        "could not run `{kubectl} kustomize {dir}`: {source}; install kubectl >= 1.21 (it bundles kustomize v4+), or set KUBECTL to its path"
    )]
    Kubectl {
        kubectl: String,
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("`{kubectl} kustomize {dir}` failed ({status}): {stderr}")]
    Render {
        kubectl: String,
        dir: PathBuf,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("`{kubectl} kustomize {dir}` printed output that is not UTF-8")]
    NotUtf8 { kubectl: String, dir: PathBuf },
    #[error("rendered manifest, document {index} (counting from 1): not valid YAML: {source}")]
    Yaml {
        index: usize,
        source: serde_yaml_ng::Error,
    },
    #[error(
        "the rendered manifest has no DaemonSet named {DAEMONSET_NAME} (objects found: {found})"
    )]
    NoDaemonSet { found: String },
    #[error(
        "DaemonSet {DAEMONSET_NAME} has no container named {CONTAINER_NAME} in spec.template.spec.containers (containers found: {found})"
    )]
    NoAgentContainer { found: String },
    #[error("DaemonSet {DAEMONSET_NAME}: {field}: {problem}")]
    Field { field: String, problem: String },
}

fn field(field: impl Into<String>, problem: impl Into<String>) -> DaemonSetError {
    DaemonSetError::Field {
        field: field.into(),
        problem: problem.into(),
    }
}

/// Renders the kind overlay under `repo_root` with `kubectl kustomize` (or
/// `$KUBECTL kustomize`), as deploy/kind/up.sh and deploy/validate.sh do.
pub fn render_kind_overlay(repo_root: &Path) -> Result<String, DaemonSetError> {
    let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".to_owned());
    let dir = repo_root.join(KIND_OVERLAY);
    let out = Command::new(&kubectl)
        .arg("kustomize")
        .arg(&dir)
        .output()
        .map_err(|source| DaemonSetError::Kubectl {
            kubectl: kubectl.clone(),
            dir: dir.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(DaemonSetError::Render {
            kubectl,
            dir,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    String::from_utf8(out.stdout).map_err(|_| DaemonSetError::NotUtf8 { kubectl, dir })
}

/// The `agent` container of the DaemonSet `flowaudit` in a rendered
/// multi-document manifest. Every error names what is missing or malformed.
pub fn agent_pod_spec(rendered: &str) -> Result<AgentPodSpec, DaemonSetError> {
    let mut found = Vec::new();
    let mut daemonset = None;
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(rendered).enumerate() {
        let value = Value::deserialize(doc).map_err(|source| DaemonSetError::Yaml {
            index: i + 1,
            source,
        })?;
        if value.is_null() {
            continue;
        }
        let kind = value["kind"].as_str().unwrap_or("?");
        let name = value["metadata"]["name"].as_str().unwrap_or("?");
        found.push(format!("{kind}/{name}"));
        if kind == "DaemonSet" && name == DAEMONSET_NAME {
            daemonset = Some(value);
        }
    }
    let ds = daemonset.ok_or_else(|| DaemonSetError::NoDaemonSet {
        found: if found.is_empty() {
            "none".to_owned()
        } else {
            found.join(", ")
        },
    })?;
    let pod = ds
        .pointer("/spec/template/spec")
        .filter(|p| p.is_object())
        .ok_or_else(|| field("spec.template.spec", "missing or not a mapping"))?;
    let containers = pod["containers"]
        .as_array()
        .ok_or_else(|| field("spec.template.spec.containers", "missing or not a list"))?;
    let agent = containers
        .iter()
        .find(|c| c["name"].as_str() == Some(CONTAINER_NAME))
        .ok_or_else(|| DaemonSetError::NoAgentContainer {
            found: containers
                .iter()
                .map(|c| c["name"].as_str().unwrap_or("?"))
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    const POD: &str = "spec.template.spec";
    let ctr = format!("{POD}.containers[{CONTAINER_NAME}]");
    let sc = format!("{ctr}.securityContext");

    let capabilities_add = strings(&agent["securityContext"]["capabilities"]["add"], || {
        format!("{sc}.capabilities.add")
    })?
    .into_iter()
    .map(|c| {
        let name = c.to_ascii_uppercase();
        let name = name.strip_prefix("CAP_").unwrap_or(&name).to_owned();
        match capability_number(&name) {
            Some(_) => Ok(name),
            None => Err(field(
                format!("{sc}.capabilities.add"),
                format!("{c:?} is not a Linux capability"),
            )),
        }
    })
    .collect::<Result<Vec<_>, _>>()?;
    let drop = strings(&agent["securityContext"]["capabilities"]["drop"], || {
        format!("{sc}.capabilities.drop")
    })?;

    let run_as_user = match uid(&agent["securityContext"]["runAsUser"], || {
        format!("{sc}.runAsUser")
    })? {
        Some(u) => Some(u),
        None => uid(&pod["securityContext"]["runAsUser"], || {
            format!("{POD}.securityContext.runAsUser")
        })?,
    };

    let volumes = pod["volumes"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let mounts = agent["volumeMounts"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let mut host_paths = Vec::new();
    for m in mounts {
        let name = m["name"]
            .as_str()
            .ok_or_else(|| field(format!("{ctr}.volumeMounts"), "a mount without a name"))?;
        let volume = volumes
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .ok_or_else(|| {
                field(
                    format!("{ctr}.volumeMounts[{name}]"),
                    format!("no volume named {name} in {POD}.volumes"),
                )
            })?;
        let Some(host) = volume.get("hostPath") else {
            continue;
        };
        let host_path = host["path"].as_str().ok_or_else(|| {
            field(
                format!("{POD}.volumes[{name}].hostPath.path"),
                "missing or not a string",
            )
        })?;
        let mount_path = m["mountPath"].as_str().ok_or_else(|| {
            field(
                format!("{ctr}.volumeMounts[{name}].mountPath"),
                "missing or not a string",
            )
        })?;
        host_paths.push(HostPathMount {
            mount_path: mount_path.to_owned(),
            host_path: host_path.to_owned(),
            read_only: flag(&m["readOnly"], false, || {
                format!("{ctr}.volumeMounts[{name}].readOnly")
            })?,
        });
    }

    Ok(AgentPodSpec {
        capabilities_add,
        capabilities_drop_all: drop.iter().any(|d| d.eq_ignore_ascii_case("ALL")),
        read_only_root: flag(
            &agent["securityContext"]["readOnlyRootFilesystem"],
            false,
            || format!("{sc}.readOnlyRootFilesystem"),
        )?,
        host_pid: flag(&pod["hostPID"], false, || format!("{POD}.hostPID"))?,
        host_network: flag(&pod["hostNetwork"], false, || format!("{POD}.hostNetwork"))?,
        run_as_user,
        allow_privilege_escalation: flag(
            &agent["securityContext"]["allowPrivilegeEscalation"],
            true,
            || format!("{sc}.allowPrivilegeEscalation"),
        )?,
        host_paths,
        args: strings(&agent["args"], || format!("{ctr}.args"))?,
        privileged: flag(&agent["securityContext"]["privileged"], false, || {
            format!("{sc}.privileged")
        })?,
    })
}

/// A boolean field, `default` when absent; any other type is an error.
fn flag(v: &Value, default: bool, at: impl Fn() -> String) -> Result<bool, DaemonSetError> {
    match v {
        Value::Null => Ok(default),
        Value::Bool(b) => Ok(*b),
        other => Err(field(
            at(),
            format!("expected true or false, found {other}"),
        )),
    }
}

/// A list of strings, empty when absent.
fn strings(v: &Value, at: impl Fn() -> String) -> Result<Vec<String>, DaemonSetError> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::Array(items) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| field(at(), format!("expected strings, found {i}")))
            })
            .collect(),
        other => Err(field(at(), format!("expected a list, found {other}"))),
    }
}

fn uid(v: &Value, at: impl Fn() -> String) -> Result<Option<u32>, DaemonSetError> {
    match v {
        Value::Null => Ok(None),
        other => other
            .as_u64()
            .and_then(|u| u32::try_from(u).ok())
            .map(Some)
            .ok_or_else(|| field(at(), format!("expected a uid, found {other}"))),
    }
}

/// The agent as the kind DaemonSet runs it, from this repository's overlay
/// (repository root: `CARGO_MANIFEST_DIR/..`), rendered once per process
/// (kubectl is slow to start under emulation). Panics with what failed.
pub fn kind_agent_pod_spec() -> AgentPodSpec {
    static SPEC: std::sync::OnceLock<AgentPodSpec> = std::sync::OnceLock::new();
    SPEC.get_or_init(render_kind_agent_pod_spec).clone()
}

fn render_kind_agent_pod_spec() -> AgentPodSpec {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let rendered = render_kind_overlay(&root).unwrap_or_else(|e| {
        panic!("rendering the kind overlay to run the agent as the DaemonSet does: {e}")
    });
    agent_pod_spec(&rendered).unwrap_or_else(|e| {
        panic!(
            "reading the agent's privileges from the rendered {}: {e}",
            root.join(KIND_OVERLAY).display()
        )
    })
}

/// Capabilities of linux/capability.h, by number (index = `CAP_*` value).
const CAPABILITIES: [&str; 41] = [
    "CHOWN",              // 0
    "DAC_OVERRIDE",       // 1
    "DAC_READ_SEARCH",    // 2
    "FOWNER",             // 3
    "FSETID",             // 4
    "KILL",               // 5
    "SETGID",             // 6
    "SETUID",             // 7
    "SETPCAP",            // 8
    "LINUX_IMMUTABLE",    // 9
    "NET_BIND_SERVICE",   // 10
    "NET_BROADCAST",      // 11
    "NET_ADMIN",          // 12
    "NET_RAW",            // 13
    "IPC_LOCK",           // 14
    "IPC_OWNER",          // 15
    "SYS_MODULE",         // 16
    "SYS_RAWIO",          // 17
    "SYS_CHROOT",         // 18
    "SYS_PTRACE",         // 19
    "SYS_PACCT",          // 20
    "SYS_ADMIN",          // 21
    "SYS_BOOT",           // 22
    "SYS_NICE",           // 23
    "SYS_RESOURCE",       // 24
    "SYS_TIME",           // 25
    "SYS_TTY_CONFIG",     // 26
    "MKNOD",              // 27
    "LEASE",              // 28
    "AUDIT_WRITE",        // 29
    "AUDIT_CONTROL",      // 30
    "SETFCAP",            // 31
    "MAC_OVERRIDE",       // 32
    "MAC_ADMIN",          // 33
    "SYSLOG",             // 34
    "WAKE_ALARM",         // 35
    "BLOCK_SUSPEND",      // 36
    "AUDIT_READ",         // 37
    "PERFMON",            // 38
    "BPF",                // 39
    "CHECKPOINT_RESTORE", // 40
];

/// The kernel number of a capability named as Kubernetes names it (`BPF`;
/// `CAP_BPF` and lower case are accepted too), or None if Linux has none.
pub fn capability_number(name: &str) -> Option<u32> {
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    CAPABILITIES
        .iter()
        .position(|c| *c == bare)
        .map(|i| i as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A DaemonSet `flowaudit` whose pod spec is `pod` (YAML, indented for
    /// `spec.template.spec`).
    fn daemonset(pod: &str) -> String {
        format!(
            "apiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: flowaudit\nspec:\n  template:\n    spec:\n{pod}"
        )
    }

    #[test]
    fn the_kind_overlay_grants_exactly_the_agents_privileges() {
        let spec = kind_agent_pod_spec();
        assert_eq!(
            spec.capabilities_add,
            ["BPF", "PERFMON", "NET_ADMIN"],
            "added capabilities"
        );
        assert_eq!(spec.capability_numbers(), [39, 38, 12]);
        assert!(spec.capabilities_drop_all, "capabilities drop ALL");
        assert!(spec.host_pid, "hostPID");
        assert!(!spec.host_network, "hostNetwork must be off: {spec:?}");
        assert!(spec.read_only_root, "readOnlyRootFilesystem");
        assert_eq!(spec.run_as_user, Some(0));
        assert!(!spec.allow_privilege_escalation);
        assert!(!spec.privileged);
        assert_eq!(
            spec.host_paths,
            [
                HostPathMount {
                    mount_path: "/run/spire/admin-sockets".into(),
                    host_path: "/run/spire/admin-sockets".into(),
                    read_only: true,
                },
                HostPathMount {
                    mount_path: "/sys/fs/cgroup".into(),
                    host_path: "/sys/fs/cgroup".into(),
                    read_only: true,
                },
                HostPathMount {
                    mount_path: "/sys/fs/bpf".into(),
                    host_path: "/sys/fs/bpf".into(),
                    read_only: true,
                },
                // The Workload API (the agent's own SVID for its TCP
                // listener): a socket, not a privilege.
                HostPathMount {
                    mount_path: "/run/spire/sockets".into(),
                    host_path: "/run/spire/sockets".into(),
                    read_only: true,
                },
            ]
        );
        // The kind overlay's patch, not only the base, reached the args.
        assert_eq!(spec.args.first().map(String::as_str), Some("agent"));
        assert!(
            spec.args.iter().any(|a| a == "--log-format=text"),
            "kind overlay args: {:?}",
            spec.args
        );
        assert!(
            spec.args
                .iter()
                .any(|a| a == "--grpc-addr=unix:///var/run/flowaudit/flowaudit.sock"),
            "{:?}",
            spec.args
        );
    }

    #[test]
    fn capability_numbers_are_those_of_linux_capability_h() {
        for (name, n) in [
            ("CHOWN", 0),
            ("DAC_OVERRIDE", 1),
            ("NET_ADMIN", 12),
            ("NET_RAW", 13),
            ("SYS_PTRACE", 19),
            ("SYS_ADMIN", 21),
            ("SYS_RESOURCE", 24),
            ("AUDIT_READ", 37),
            ("PERFMON", 38),
            ("BPF", 39),
            ("CHECKPOINT_RESTORE", 40),
            ("CAP_BPF", 39),
            ("net_admin", 12),
        ] {
            assert_eq!(capability_number(name), Some(n), "{name}");
        }
        assert_eq!(capability_number("ALL"), None);
        assert_eq!(capability_number("BPFF"), None);
        assert_eq!(capability_number(""), None);
    }

    #[test]
    fn a_broken_document_is_named_by_its_position() {
        let rendered = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: flowaudit\n---\nkind: [unclosed\n---\n{}",
            daemonset("      containers: [{name: agent}]\n")
        );
        let err = agent_pod_spec(&rendered).expect_err("document 2 is not YAML");
        assert!(
            matches!(err, DaemonSetError::Yaml { index: 2, .. }),
            "expected a YAML error in document 2, got {err:?}"
        );
        assert!(
            err.to_string().contains("document 2"),
            "message names the document: {err}"
        );
    }

    #[test]
    fn a_missing_daemonset_or_container_is_named() {
        let err = agent_pod_spec("apiVersion: v1\nkind: Service\nmetadata:\n  name: flowaudit\n")
            .expect_err("no DaemonSet");
        let msg = err.to_string();
        assert!(
            msg.contains("no DaemonSet named flowaudit") && msg.contains("Service/flowaudit"),
            "{msg}"
        );
        assert!(
            agent_pod_spec("")
                .expect_err("empty")
                .to_string()
                .contains("objects found: none")
        );

        let err = agent_pod_spec(&daemonset(
            "      containers: [{name: sidecar}, {name: init}]\n",
        ))
        .expect_err("no agent container");
        let msg = err.to_string();
        assert!(
            msg.contains("no container named agent") && msg.contains("sidecar, init"),
            "{msg}"
        );
    }

    #[test]
    fn unset_fields_take_kubernetes_defaults_and_the_pod_uid() {
        let spec = agent_pod_spec(&daemonset(
            "      securityContext: {runAsUser: 1000}\n      containers: [{name: agent}]\n",
        ))
        .unwrap();
        assert_eq!(
            spec,
            AgentPodSpec {
                capabilities_add: vec![],
                capabilities_drop_all: false,
                read_only_root: false,
                host_pid: false,
                host_network: false,
                run_as_user: Some(1000),
                // Unset means allowed: Kubernetes sets no_new_privs only on request.
                allow_privilege_escalation: true,
                host_paths: vec![],
                args: vec![],
                privileged: false,
            }
        );
    }

    #[test]
    fn malformed_fields_are_errors_not_defaults() {
        for (pod, names) in [
            (
                "      hostPID: \"yes\"\n      containers: [{name: agent}]\n",
                "spec.template.spec.hostPID",
            ),
            (
                "      containers: [{name: agent, securityContext: {capabilities: {add: [BPF, SYS_MAGIC]}}}]\n",
                "\"SYS_MAGIC\" is not a Linux capability",
            ),
            (
                "      containers: [{name: agent, volumeMounts: [{name: gone, mountPath: /x}]}]\n",
                "no volume named gone",
            ),
            (
                "      containers: [{name: agent, securityContext: {runAsUser: -1}}]\n",
                "securityContext.runAsUser",
            ),
        ] {
            let err = agent_pod_spec(&daemonset(pod)).expect_err(pod);
            assert!(
                err.to_string().contains(names),
                "expected the error to name {names:?}, got: {err}"
            );
        }
    }

    #[test]
    fn host_paths_pair_mounts_with_volumes_and_keep_read_only() {
        let spec = agent_pod_spec(&daemonset(
            "      containers:\n        - name: agent\n          volumeMounts:\n            - {name: cfg, mountPath: /etc/x, readOnly: true}\n            - {name: cg, mountPath: /host/cgroup}\n      volumes:\n        - {name: cfg, configMap: {name: x}}\n        - {name: cg, hostPath: {path: /sys/fs/cgroup}}\n",
        ))
        .unwrap();
        assert_eq!(
            spec.host_paths,
            [HostPathMount {
                mount_path: "/host/cgroup".into(),
                host_path: "/sys/fs/cgroup".into(),
                read_only: false,
            }]
        );
    }

    #[test]
    fn a_failing_kubectl_is_quoted() {
        let err = render_kind_overlay(Path::new("/nonexistent-flowaudit-root"))
            .expect_err("no overlay there");
        match &err {
            DaemonSetError::Render { stderr, .. } => {
                assert!(!stderr.is_empty(), "kubectl's stderr is quoted: {err}")
            }
            // Without kubectl at all, the message says how to get it.
            DaemonSetError::Kubectl { .. } => {
                assert!(err.to_string().contains("install kubectl"), "{err}")
            }
            other => panic!("expected a kubectl failure, got {other:?}"),
        }
    }
}
