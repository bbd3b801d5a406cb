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
                      no tracefs, no `latest` tag.
  spire HCL           The SPIRE agent snippet: admin socket in its own
                      directory, flowaudit in authorized_delegates.
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
EXPECTED_HOSTPATHS = {
    "/run/spire/admin-sockets",  # SPIRE Delegated Identity API
    "/sys/fs/cgroup",  # the node's cgroup v2 root, where the programs attach
    "/sys/fs/bpf",  # Cilium's pinned maps, read-only (mutual authentication)
}
# Every mount of the agent container: the three hostPaths, the policy
# ConfigMap and the gRPC socket's emptyDir. Nothing writes /tmp.
EXPECTED_MOUNTS = {
    "/run/spire/admin-sockets",
    "/sys/fs/cgroup",
    "/sys/fs/bpf",
    "/etc/flowaudit/policy",
    "/var/run/flowaudit",
}
# The agent has no tracepoint, kprobe or TC hook: tracefs and debugfs stay out.
FORBIDDEN_PATHS = ("/sys/kernel/tracing", "/sys/kernel/debug")
FLOWAUDIT_ID = "spiffe://demo.local/ns/flowaudit/sa/flowaudit"


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
    for path, ds in daemonsets:
        where = f"{os.path.basename(path)}: {ident(ds)}"
        spec = ds["spec"]["template"]["spec"]
        psc = spec.get("securityContext") or {}
        c.check((psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault",
                f"{where}: pod seccompProfile RuntimeDefault")
        c.check(not spec.get("hostNetwork"), f"{where}: no hostNetwork (every hook is a cgroup program)")
        c.check(spec.get("dnsPolicy") != "ClusterFirstWithHostNet", f"{where}: no host-network DNS policy")
        c.check(spec.get("hostPID") is True, f"{where}: hostPID (pids shared with the kernel and the SPIRE agent)")
        c.check(not spec.get("hostIPC"), f"{where}: no hostIPC")
        tolerated = {t.get("key") for t in spec.get("tolerations") or []}
        c.check("node-role.kubernetes.io/control-plane" in tolerated,
                f"{where}: tolerates control-plane nodes")
        hostpaths = {v["hostPath"]["path"] for v in spec.get("volumes") or [] if "hostPath" in v}
        c.check(hostpaths == EXPECTED_HOSTPATHS,
                f"{where}: hostPaths are exactly {sorted(EXPECTED_HOSTPATHS)} (got {sorted(hostpaths)})")
        c.check(not any(h.startswith(FORBIDDEN_PATHS) for h in hostpaths),
                f"{where}: no tracefs or debugfs hostPath")
        for ctr in spec.get("containers") or []:
            cw = f"{where} {ctr['name']}"
            sc = ctr.get("securityContext") or {}
            caps = sc.get("capabilities") or {}
            c.check(sc.get("privileged") is False, f"{cw}: privileged: false")
            c.check(sc.get("allowPrivilegeEscalation") is False, f"{cw}: allowPrivilegeEscalation: false")
            c.check(sc.get("readOnlyRootFilesystem") is True, f"{cw}: readOnlyRootFilesystem")
            c.check(sc.get("runAsUser") == 0, f"{cw}: runAsUser 0 (added capabilities are effective only for uid 0)")
            c.check(caps.get("drop") == ["ALL"], f"{cw}: capabilities drop ALL")
            added = caps.get("add") or []
            c.check(sorted(added) == sorted(EXPECTED_CAPS) and len(set(added)) == len(added),
                    f"{cw}: added capabilities are exactly {EXPECTED_CAPS} (got {added})")
            res = ctr.get("resources") or {}
            c.check(all(k in (res.get(kind) or {}) for kind in ("requests", "limits") for k in ("cpu", "memory")),
                    f"{cw}: cpu and memory requests and limits")
            ports = {p.get("name"): p.get("containerPort") for p in ctr.get("ports") or []}
            for probe, path_ in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                get = (ctr.get(probe) or {}).get("httpGet") or {}
                port = get.get("port")
                port = ports.get(port, port)
                c.check(get.get("path") == path_ and port == 9966, f"{cw}: {probe} GET {path_} on 9966")
            env = {e["name"]: e for e in ctr.get("env") or []}
            ref = ((env.get("NODE_NAME") or {}).get("valueFrom") or {}).get("fieldRef") or {}
            c.check(ref.get("fieldPath") == "spec.nodeName", f"{cw}: NODE_NAME from the downward API")
            mounts = {m["name"]: m for m in ctr.get("volumeMounts") or []}
            paths = {m.get("mountPath") for m in mounts.values()}
            c.check(paths == EXPECTED_MOUNTS,
                    f"{cw}: mounts are exactly {sorted(EXPECTED_MOUNTS)} (got {sorted(paths)})")
            c.check(not any(m.get("mountPropagation") for m in mounts.values()),
                    f"{cw}: no mount propagation")
            for v in spec.get("volumes") or []:
                if "hostPath" in v:
                    m = mounts.get(v["name"])
                    c.check(m is not None and m.get("readOnly") is True,
                            f"{cw}: hostPath {v['hostPath']['path']} mounted read-only")
    for path, d in docs:
        if d.get("kind") == "ConfigMap" and (d.get("metadata") or {}).get("name") == "flowaudit-policy":
            for key, text in (d.get("data") or {}).items():
                pol = yaml.safe_load(text)
                c.check(isinstance(pol, dict) and pol.get("kind") == "FlowPolicy"
                        and (pol.get("spec") or {}).get("trustDomain") == "demo.local",
                        f"{os.path.basename(path)}: policy {key} is a FlowPolicy for demo.local")
    return c.done("posture")


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
