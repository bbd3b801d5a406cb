#!/usr/bin/env python3
"""Offline checks of flowaudit's rendered manifests (run by deploy/validate.sh).

Subcommands, each printing one line per check and exiting non-zero on any
failure:

  schema FILE...      Kubernetes schema validation with kubernetes-validate
                      (strict: unknown fields fail) for built-in kinds; CRD
                      kinds (ServiceMonitor, ClusterSPIFFEID) against the
                      hand-written subset schemas in deploy/schemas/. A kind
                      with neither fails: nothing is skipped silently.
  posture FILE...     The DaemonSet's security posture, as the design asks:
                      no privileged, no hostNetwork, hostPID, capabilities
                      drop ALL + exactly BPF, PERFMON, NET_ADMIN, uid 0,
                      read-only root fs, seccomp RuntimeDefault, probes,
                      downward-API node name, control-plane tolerations,
                      exactly the expected hostPaths (read-only) and mounts,
                      no tracefs, no `latest` tag, the mTLS gRPC port for
                      the relay only. The relay's: one replica, no host
                      namespace, non-root, no capability, read-only root
                      fs, seccomp, probes, only the Workload API hostPath
                      (read-only), a namespaced read-only Role; and that
                      agents, relay, NetworkPolicies agree on ports, labels
                      and SPIFFE IDs.
  spire HCL           The SPIRE agent snippet: admin socket in its own
                      directory, flowaudit in authorized_delegates, the
                      Workload API socket where the manifests mount it.
  checkov-report JSON [STRIPPED_JSON]
                      Reads checkov's JSON report: fails on any failed check;
                      with the report of a scan without skip annotations,
                      also fails on a skip that no longer suppresses anything.
  strip-skips SRC DST Copies a manifest or Dockerfile without its checkov skips.
"""

from __future__ import annotations

import json
import os
import posixpath
import sys
from typing import Any, Iterable

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
KUBE_VERSION = os.environ.get("FLOWAUDIT_KUBE_VERSION", "1.31.0")

CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "schemas/servicemonitor-v1.json",
    ("spire.spiffe.io/v1alpha1", "ClusterSPIFFEID"): "schemas/clusterspiffeid-v1alpha1.json",
}

# What the agent's code needs (deploy/README.md, "Privileges"); anything
# more, or less, fails. tests/src/daemonset.rs checks the same set.
EXPECTED_CAPS = ["BPF", "PERFMON", "NET_ADMIN"]
# The SPIRE Workload API socket (socket_path in spire/agent.conf.snippet.hcl):
# the agents' and the relay's own SVIDs for mTLS on TCP gRPC.
WORKLOAD_API_SOCKET = "/run/spire/sockets/agent.sock"
WORKLOAD_API_DIR = posixpath.dirname(WORKLOAD_API_SOCKET)
EXPECTED_HOSTPATHS = {
    "/run/spire/admin-sockets",  # SPIRE Delegated Identity API
    "/sys/fs/cgroup",  # the node's cgroup v2 root, where the programs attach
    "/sys/fs/bpf",  # Cilium's pinned maps, read-only (mutual authentication)
    WORKLOAD_API_DIR,  # SPIRE Workload API: the agent's SVID for port 4244
}
# Every mount of the agent container: the four hostPaths, the policy
# ConfigMap and the gRPC socket's emptyDir. Nothing writes /tmp.
EXPECTED_MOUNTS = EXPECTED_HOSTPATHS | {
    "/etc/flowaudit/policy",
    "/var/run/flowaudit",
}
# The agent has no tracepoint, kprobe or TC hook: tracefs and debugfs stay out.
FORBIDDEN_PATHS = ("/sys/kernel/tracing", "/sys/kernel/debug")
TRUST_DOMAIN = "demo.local"
FLOWAUDIT_ID = f"spiffe://{TRUST_DOMAIN}/ns/flowaudit/sa/flowaudit"
# The relay (kustomize/base/relay-*.yaml): the only client of the agents'
# TCP gRPC port, which it dials on every agent pod's IP.
RELAY_NAME = "flowaudit-relay"
RELAY_ID = f"spiffe://{TRUST_DOMAIN}/ns/flowaudit/sa/{RELAY_NAME}"
AGENT_LABELS = {"app.kubernetes.io/name": "flowaudit", "app.kubernetes.io/component": "agent"}
RELAY_LABELS = {"app.kubernetes.io/name": "flowaudit", "app.kubernetes.io/component": "relay"}
AGENT_GRPC_PORT = 4244
AGENT_METRICS_PORT = 9966
RELAY_GRPC_PORT = 4245
RELAY_METRICS_PORT = 9967


class Checks:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def ok(self, what: str) -> None:
        self.passed += 1
        print(f"  ok    {what}")

    def fail(self, what: str) -> None:
        self.failed += 1
        print(f"  FAIL  {what}")

    def check(self, cond: bool, what: str) -> None:
        (self.ok if cond else self.fail)(what)

    def done(self, title: str) -> int:
        print(f"{title}: {self.passed} passed, {self.failed} failed")
        return 1 if self.failed else 0


def load(paths: Iterable[str]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            for d in yaml.safe_load_all(f):
                if d:
                    out.append((p, d))
    return out


def ident(d: dict[str, Any]) -> str:
    md = d.get("metadata") or {}
    ns = md.get("namespace")
    return f"{d.get('kind')}/{(ns + '/') if ns else ''}{md.get('name')}"


def cmd_schema(paths: list[str]) -> int:
    import jsonschema
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError

    c = Checks()
    for path, d in load(paths):
        name = f"{os.path.basename(path)}: {ident(d)}"
        key = (d.get("apiVersion"), d.get("kind"))
        try:
            kubernetes_validate.validate(d, KUBE_VERSION, strict=True)
            c.ok(f"{name} (Kubernetes {KUBE_VERSION} schema, strict)")
            continue
        except SchemaNotFoundError:
            pass
        except kubernetes_validate.ValidationError as e:
            where = "/".join(str(x) for x in e.path) or "(top)"
            c.fail(f"{name}: {where}: {e.message}")
            continue
        if key not in CRD_SCHEMAS:
            c.fail(f"{name}: no schema for {key[0]} {key[1]} (neither built in nor in deploy/schemas)")
            continue
        with open(os.path.join(HERE, CRD_SCHEMAS[key]), encoding="utf-8") as f:
            schema = json.load(f)
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(d), key=lambda e: list(e.path))
        if errors:
            for e in errors:
                where = "/".join(str(x) for x in e.path) or "(top)"
                c.fail(f"{name}: {where}: {e.message}")
        else:
            c.ok(f"{name} (CRD: {CRD_SCHEMAS[key]}, strict subset)")
    return c.done("schema")


def cmd_posture(paths: list[str]) -> int:
    c = Checks()
    docs = load(paths)
    for path, d in docs:
        for spec in _pod_specs(d):
            for ctr in (spec.get("initContainers") or []) + (spec.get("containers") or []):
                image = ctr.get("image", "")
                last = image.split("@")[0].rsplit("/", 1)[-1]
                tag = last.split(":", 1)[1] if ":" in last else ""
                c.check(bool(tag) and tag != "latest",
                        f"{os.path.basename(path)}: {ident(d)} {ctr.get('name')}: image {image!r}: tag set and not latest")
    daemonsets = [(p, d) for p, d in docs if d.get("kind") == "DaemonSet"]
    c.check(len(daemonsets) >= 1, "a DaemonSet is rendered")
    agent_args: list[tuple[str, list[str]]] = []
    for path, ds in daemonsets:
        where = f"{os.path.basename(path)}: {ident(ds)}"
        spec = ds["spec"]["template"]["spec"]
        _pod_checks(c, where, spec)
        c.check(spec.get("hostPID") is True, f"{where}: hostPID (pids shared with the kernel and the SPIRE agent)")
        every_taint = any(t.get("operator") == "Exists" and not t.get("key") and not t.get("effect")
                          for t in spec.get("tolerations") or [])
        c.check(every_taint, f"{where}: tolerates every taint (an untolerated node would go unaudited)")
        c.check(spec.get("priorityClassName") == "system-node-critical",
                f"{where}: priorityClassName system-node-critical (a full node must not keep its agent Pending)")
        hostpaths = _hostpaths(spec)
        c.check(not any(h.startswith(FORBIDDEN_PATHS) for h in hostpaths),
                f"{where}: no tracefs or debugfs hostPath")
        for ctr in spec.get("containers") or []:
            cw = f"{where} {ctr['name']}"
            sc = ctr.get("securityContext") or {}
            caps = sc.get("capabilities") or {}
            _container_checks(c, cw, spec, ctr, AGENT_METRICS_PORT, EXPECTED_HOSTPATHS, EXPECTED_MOUNTS)
            c.check(sc.get("runAsUser") == 0, f"{cw}: runAsUser 0 (added capabilities are effective only for uid 0)")
            added = caps.get("add") or []
            c.check(sorted(added) == sorted(EXPECTED_CAPS) and len(set(added)) == len(added),
                    f"{cw}: added capabilities are exactly {EXPECTED_CAPS} (got {added})")
            c.check(_field_ref(ctr, "NODE_NAME") == "spec.nodeName", f"{cw}: NODE_NAME from the downward API")
            args = ctr.get("args") or []
            flags = _flags(args)
            c.check(f"0.0.0.0:{AGENT_GRPC_PORT}" in flags.get("--grpc-addr", []),
                    f"{cw}: --grpc-addr=0.0.0.0:{AGENT_GRPC_PORT} (the relay's mTLS port)")
            c.check(flags.get("--workload-api") == [f"unix://{WORKLOAD_API_SOCKET}"],
                    f"{cw}: --workload-api=unix://{WORKLOAD_API_SOCKET} (got {flags.get('--workload-api')})")
            c.check(flags.get("--allow-peer") == [RELAY_ID],
                    f"{cw}: --allow-peer is exactly the relay's {RELAY_ID} (got {flags.get('--allow-peer')})")
            c.check(_ports(ctr).get("grpc") == AGENT_GRPC_PORT, f"{cw}: containerPort grpc {AGENT_GRPC_PORT}")
            agent_args.append((cw, [a for a in args if not a.startswith("--log-format")]))
    if agent_args:
        first_where, first = agent_args[0]
        for cw, args in agent_args[1:]:
            c.check(args == first, f"{cw}: args are {first_where}'s but for --log-format (an overlay repeats them all)")
    _relay_posture(c, docs)
    for path, d in docs:
        if d.get("kind") == "ConfigMap" and (d.get("metadata") or {}).get("name") == "flowaudit-policy":
            for key, text in (d.get("data") or {}).items():
                pol = yaml.safe_load(text)
                c.check(isinstance(pol, dict) and pol.get("kind") == "FlowPolicy"
                        and (pol.get("spec") or {}).get("trustDomain") == TRUST_DOMAIN,
                        f"{os.path.basename(path)}: policy {key} is a FlowPolicy for {TRUST_DOMAIN}")
    return c.done("posture")


def _relay_posture(c: Checks, docs: list[tuple[str, dict[str, Any]]]) -> None:
    """The relay: no privilege, the agents' port and labels, its Role."""
    by_file: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
    for path, d in docs:
        by_file.setdefault(path, {})[(d.get("kind"), (d.get("metadata") or {}).get("name"))] = d
    for path, objs in by_file.items():
        f = os.path.basename(path)
        dep = objs.get(("Deployment", RELAY_NAME))
        if dep is None:
            c.fail(f"{f}: no Deployment {RELAY_NAME}")
            continue
        where = f"{f}: {ident(dep)}"
        c.check(dep["spec"].get("replicas") == 1, f"{where}: one replica")
        tmpl = dep["spec"]["template"]
        spec = tmpl["spec"]
        c.check(tmpl["metadata"].get("labels") == RELAY_LABELS, f"{where}: pod labels {RELAY_LABELS}")
        c.check(spec.get("serviceAccountName") == RELAY_NAME, f"{where}: service account {RELAY_NAME}")
        _pod_checks(c, where, spec)
        c.check(not spec.get("hostPID"), f"{where}: no hostPID")
        psc = spec.get("securityContext") or {}
        for ctr in spec.get("containers") or []:
            cw = f"{where} {ctr['name']}"
            sc = ctr.get("securityContext") or {}
            _container_checks(c, cw, spec, ctr, RELAY_METRICS_PORT, {WORKLOAD_API_DIR}, {WORKLOAD_API_DIR})
            uid = sc.get("runAsUser", psc.get("runAsUser"))
            c.check(sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True and isinstance(uid, int) and uid > 0,
                    f"{cw}: non-root (runAsNonRoot, runAsUser {uid})")
            c.check(not (sc.get("capabilities") or {}).get("add"), f"{cw}: no capability added")
            c.check(_field_ref(ctr, "POD_NAMESPACE") == "metadata.namespace",
                    f"{cw}: POD_NAMESPACE from the downward API")
            args = ctr.get("args") or []
            flags = _flags(args)
            c.check(args[:1] == ["relay"] and "--kubernetes" in flags, f"{cw}: args: relay --kubernetes")
            c.check(flags.get("--workload-api") == [f"unix://{WORKLOAD_API_SOCKET}"],
                    f"{cw}: --workload-api=unix://{WORKLOAD_API_SOCKET} (got {flags.get('--workload-api')})")
            allow_agent = flags.get("--allow-agent") or []
            c.check(bool(allow_agent) and any(_glob_match(g, FLOWAUDIT_ID) for g in allow_agent),
                    f"{cw}: --allow-agent {allow_agent} admits the agents' {FLOWAUDIT_ID}")
            c.check(not any(_glob_match(g, RELAY_ID) for g in allow_agent),
                    f"{cw}: --allow-agent does not admit the relay's own ID")
            c.check(bool(flags.get("--allow-peer")), f"{cw}: --allow-peer names the relay's clients")
            c.check(flags.get("--agent-port") == [str(AGENT_GRPC_PORT)],
                    f"{cw}: --agent-port={AGENT_GRPC_PORT}, the agents' mTLS port")
            selector = dict(kv.split("=", 1) for kv in ",".join(flags.get("--agent-selector") or []).split(",") if "=" in kv)
            c.check(selector == AGENT_LABELS, f"{cw}: --agent-selector selects the agents' pods {AGENT_LABELS} (got {selector})")
            c.check(flags.get("--grpc-addr") == [f"0.0.0.0:{RELAY_GRPC_PORT}"]
                    and _ports(ctr).get("grpc") == RELAY_GRPC_PORT,
                    f"{cw}: --grpc-addr=0.0.0.0:{RELAY_GRPC_PORT} and containerPort grpc {RELAY_GRPC_PORT}")
        svc = objs.get(("Service", RELAY_NAME)) or {}
        svc_ports = {p.get("name"): p.get("port") for p in (svc.get("spec") or {}).get("ports") or []}
        c.check((svc.get("spec") or {}).get("selector") == RELAY_LABELS
                and svc_ports == {"grpc": RELAY_GRPC_PORT, "metrics": RELAY_METRICS_PORT},
                f"{f}: Service {RELAY_NAME} selects the relay: grpc {RELAY_GRPC_PORT}, metrics {RELAY_METRICS_PORT}")
        # RBAC: a namespaced Role, read-only pods, bound to the relay only.
        role = objs.get(("Role", RELAY_NAME)) or {}
        c.check(role.get("rules") == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}],
                f"{f}: Role {RELAY_NAME}: pods get/list/watch, nothing else")
        binding = objs.get(("RoleBinding", RELAY_NAME)) or {}
        c.check(binding.get("roleRef", {}).get("kind") == "Role"
                and [s_.get("name") for s_ in binding.get("subjects") or []] == [RELAY_NAME],
                f"{f}: RoleBinding {RELAY_NAME} binds the Role to {RELAY_NAME} only")
        crb = [ident(d) for (kind, _), d in objs.items() if kind == "ClusterRoleBinding"
               and any(s_.get("name") == RELAY_NAME for s_ in d.get("subjects") or [])]
        c.check(not crb, f"{f}: no ClusterRoleBinding for {RELAY_NAME} (got {crb})")
        # NetworkPolicies: the agents' 4244 from the relay's pods only.
        agent_np = objs.get(("NetworkPolicy", "flowaudit")) or {}
        rules = [r for r in (agent_np.get("spec") or {}).get("ingress") or []
                 if any(p.get("port") == AGENT_GRPC_PORT for p in r.get("ports") or [])]
        c.check(bool(rules) and all(r.get("from") == [{"podSelector": {"matchLabels": RELAY_LABELS}}] for r in rules),
                f"{f}: NetworkPolicy flowaudit admits {AGENT_GRPC_PORT} from the relay's pods only")
        relay_np = objs.get(("NetworkPolicy", RELAY_NAME)) or {}
        admitted = {p.get("port") for r in (relay_np.get("spec") or {}).get("ingress") or [] for p in r.get("ports") or []}
        c.check((relay_np.get("spec") or {}).get("podSelector") == {"matchLabels": RELAY_LABELS}
                and admitted == {RELAY_GRPC_PORT, RELAY_METRICS_PORT},
                f"{f}: NetworkPolicy {RELAY_NAME} admits exactly {RELAY_GRPC_PORT} and {RELAY_METRICS_PORT} (got {sorted(admitted)})")


def _pod_checks(c: Checks, where: str, spec: dict[str, Any]) -> None:
    """What every flowaudit pod keeps: seccomp, and no host network or IPC."""
    psc = spec.get("securityContext") or {}
    c.check((psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault",
            f"{where}: pod seccompProfile RuntimeDefault")
    c.check(not spec.get("hostNetwork"), f"{where}: no hostNetwork")
    c.check(spec.get("dnsPolicy") != "ClusterFirstWithHostNet", f"{where}: no host-network DNS policy")
    c.check(not spec.get("hostIPC"), f"{where}: no hostIPC")


def _container_checks(c: Checks, cw: str, spec: dict[str, Any], ctr: dict[str, Any], metrics_port: int,
                      hostpaths: set[str], mounts: set[str]) -> None:
    """What every flowaudit container keeps, with its own hostPaths and mounts."""
    sc = ctr.get("securityContext") or {}
    c.check(sc.get("privileged") is False, f"{cw}: privileged: false")
    c.check(sc.get("allowPrivilegeEscalation") is False, f"{cw}: allowPrivilegeEscalation: false")
    c.check(sc.get("readOnlyRootFilesystem") is True, f"{cw}: readOnlyRootFilesystem")
    c.check((sc.get("capabilities") or {}).get("drop") == ["ALL"], f"{cw}: capabilities drop ALL")
    res = ctr.get("resources") or {}
    c.check(all(k in (res.get(kind) or {}) for kind in ("requests", "limits") for k in ("cpu", "memory")),
            f"{cw}: cpu and memory requests and limits")
    ports = _ports(ctr)
    for probe, path_ in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = (ctr.get(probe) or {}).get("httpGet") or {}
        port = get.get("port")
        port = ports.get(port, port)
        c.check(get.get("path") == path_ and port == metrics_port, f"{cw}: {probe} GET {path_} on {metrics_port}")
    got = _hostpaths(spec)
    c.check(got == hostpaths, f"{cw}: hostPaths are exactly {sorted(hostpaths)} (got {sorted(got)})")
    by_name = {m["name"]: m for m in ctr.get("volumeMounts") or []}
    paths = {m.get("mountPath") for m in by_name.values()}
    c.check(paths == mounts, f"{cw}: mounts are exactly {sorted(mounts)} (got {sorted(paths)})")
    c.check(all(m.get("mountPropagation", "None") in ("None", "HostToContainer") for m in by_name.values()),
            f"{cw}: no Bidirectional mount propagation (HostToContainer at most: the host's mounts reach the container, never the reverse)")
    for v in spec.get("volumes") or []:
        if "hostPath" in v:
            m = by_name.get(v["name"])
            c.check(m is not None and m.get("readOnly") is True,
                    f"{cw}: hostPath {v['hostPath']['path']} mounted read-only")


def _hostpaths(spec: dict[str, Any]) -> set[str]:
    return {v["hostPath"]["path"] for v in spec.get("volumes") or [] if "hostPath" in v}


def _field_ref(ctr: dict[str, Any], name: str) -> str | None:
    """The downward-API fieldPath of the container's env variable `name`."""
    env = {e["name"]: e for e in ctr.get("env") or []}
    return (((env.get(name) or {}).get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")


def _ports(ctr: dict[str, Any]) -> dict[str, int]:
    return {p.get("name"): p.get("containerPort") for p in ctr.get("ports") or []}


def _flags(args: list[str]) -> dict[str, list[str]]:
    """`--flag=value` and bare `--flag` arguments, by flag, in order."""
    out: dict[str, list[str]] = {}
    for a in args:
        if a.startswith("--"):
            k, _, v = a.partition("=")
            out.setdefault(k, []).append(v)
    return out


def _glob_match(glob: str, spiffe_id: str) -> bool:
    """flowaudit's SPIFFE ID globs: `*` one path segment, `**` (last) any rest."""
    g, i = glob.split("/"), spiffe_id.split("/")
    if g and g[-1] == "**":
        return len(i) >= len(g) and all(a in ("*", b) for a, b in zip(g[:-1], i))
    return len(g) == len(i) and all(a in ("*", b) for a, b in zip(g, i))


def _pod_specs(d: dict[str, Any]) -> list[dict[str, Any]]:
    spec = d.get("spec") or {}
    if d.get("kind") == "Pod":
        return [spec]
    t = spec.get("template") or {}
    return [t["spec"]] if isinstance(t.get("spec"), dict) else []


def _hcl_value(v: Any) -> Any:
    # bc-python-hcl2 wraps attribute values in a one-element list.
    while isinstance(v, list) and len(v) == 1 and isinstance(v[0], (list, str)):
        if isinstance(v[0], str):
            return v[0]
        v = v[0]
    return v


def cmd_spire(path: str) -> int:
    import hcl2

    c = Checks()
    with open(path, encoding="utf-8") as f:
        conf = hcl2.load(f)
    agents = conf.get("agent") or []
    c.check(len(agents) == 1, f"{os.path.basename(path)}: one agent {{}} block (settings inside it, not beside it)")
    agent = agents[0] if agents else {}
    admin = _hcl_value(agent.get("admin_socket_path"))
    sock = _hcl_value(agent.get("socket_path"))
    delegates = _hcl_value(agent.get("authorized_delegates")) or []
    if isinstance(delegates, str):
        delegates = [delegates]
    c.check(admin == "/run/spire/admin-sockets/admin.sock",
            f"admin_socket_path is /run/spire/admin-sockets/admin.sock (got {admin!r})")
    c.check(sock == WORKLOAD_API_SOCKET,
            f"socket_path (the Workload API) is {WORKLOAD_API_SOCKET}, where the agents and the relay mount it (got {sock!r})")
    if sock:
        a, s = posixpath.dirname(admin or ""), posixpath.dirname(sock)
        c.check(not (a == s or a.startswith(s + "/")),
                "admin socket directory is not the Workload API socket's directory")
    c.check(FLOWAUDIT_ID in delegates, f"authorized_delegates lists {FLOWAUDIT_ID}")
    return c.done("spire")


def _checkov_reports(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        text = f.read().strip()
    if not text:
        raise SystemExit(f"validate.py: checkov wrote no report to {path}")
    data = json.loads(text)
    return data if isinstance(data, list) else [data]


def _results(reports: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    out = []
    for r in reports:
        out.extend((r.get("results") or {}).get(key) or [])
    return out


def cmd_checkov_report(path: str, stripped: str | None) -> int:
    c = Checks()
    reports = _checkov_reports(path)
    passed = _results(reports, "passed_checks")
    failed = _results(reports, "failed_checks")
    skipped = _results(reports, "skipped_checks")
    # A scan that parsed nothing must not pass.
    for framework in ("kubernetes", "dockerfile"):
        summ = [r.get("summary") or {} for r in reports if r.get("check_type") == framework]
        c.check(bool(summ) and summ[0].get("resource_count", 0) > 0 and summ[0].get("parsing_errors", 1) == 0,
                f"checkov scanned {framework} resources without parsing errors "
                f"({summ[0].get('resource_count', 0) if summ else 0} resources)")
    print(f"  checkov: {len(passed)} passed, {len(failed)} failed, {len(skipped)} skipped (justified in the manifests)")
    for f in failed:
        c.fail(f"{f['check_id']} {f.get('check_name', '')}: {f.get('resource')} "
               f"({f.get('file_path')}:{'-'.join(str(x) for x in f.get('file_line_range') or [])}) "
               "-- fix it, or justify a skip (checkov.io/skipN annotation / # checkov:skip= comment)")
    if not failed:
        c.ok("no checkov finding left unjustified")
    for s in skipped:
        reason = (s.get("check_result") or {}).get("suppress_comment", "")
        print(f"  skip  {s['check_id']} on {s.get('resource')} ({s.get('file_path', '').lstrip('/')}): {reason}")
    if stripped:
        would_fail = {(f["check_id"], f.get("resource")) for f in _results(_checkov_reports(stripped), "failed_checks")}
        for s in skipped:
            c.check((s["check_id"], s.get("resource")) in would_fail,
                    f"skip {s['check_id']} on {s.get('resource')} still suppresses a real finding")
    return c.done("checkov")


def cmd_strip_skips(src: str, dst: str) -> int:
    """Copy a manifest or Dockerfile without its checkov skip annotations/comments."""
    with open(src, encoding="utf-8") as f:
        lines = f.readlines()
    keep = [l for l in lines if "checkov.io/skip" not in l and "checkov:skip=" not in l]
    with open(dst, "w", encoding="utf-8") as f:
        f.writelines(keep)
    return 0


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    cmd, args = argv[0], argv[1:]
    if cmd == "schema":
        return cmd_schema(args)
    if cmd == "posture":
        return cmd_posture(args)
    if cmd == "spire" and len(args) == 1:
        return cmd_spire(args[0])
    if cmd == "checkov-report" and len(args) in (1, 2):
        return cmd_checkov_report(args[0], args[1] if len(args) == 2 else None)
    if cmd == "strip-skips" and len(args) == 2:
        return cmd_strip_skips(*args)
    print(f"validate.py: bad arguments: {argv}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
