#!/usr/bin/env python3
"""Render a kustomization directory, offline, without a kustomize binary.

Implements exactly the subset of kustomize that deploy/kustomize uses, so that
deploy/validate.sh can render and check the manifests on machines where no
kustomize can be installed (Debian bookworm packages kubectl 1.20, whose
built-in kustomize v2 predates `patches`, and PyPI has none):

  resources   files (multi-document YAML) and directories holding a
              kustomization.yaml, recursively; a later layer sees the
              earlier layers' output, as in kustomize
  namespace   set on every namespaced object, and on ServiceAccount subjects
              of (Cluster)RoleBindings that named the old namespace
  images      name -> newName / newTag / digest on containers and
              initContainers of every pod template (and bare Pods)
  patches     strategic-merge patches from `path:` or inline `patch:`, with
              an optional `target` (group, version, kind, name, namespace);
              list merge keys as in the Kubernetes API for the fields used
              here (containers, volumes, env, volumeMounts, ports, ...)

Any other kustomization field, a JSON6902 patch or a `$patch` directive is an
error, not silently ignored: extend this file (and its self-test in
validate.sh) before using one. When a real kustomize is present, validate.sh
renders with it as well and fails if the two results differ.

Usage: render.py DIR [--set-image NAME=TAG]... [-o FILE]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import Any

try:
    import yaml
except ImportError:  # pragma: no cover - reported by validate.sh too
    sys.exit("render.py: PyYAML is missing; `cargo xtask setup` installs it "
             "(pip install -r deploy/requirements.txt)")


class RenderError(Exception):
    pass


KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}

# Kinds that are not namespaced (the ones this project can meet).
CLUSTER_SCOPED = {
    "Namespace", "Node", "PersistentVolume", "StorageClass", "PriorityClass",
    "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
    "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration",
    "APIService", "RuntimeClass", "CSIDriver", "IngressClass",
    "PodSecurityPolicy", "ClusterSPIFFEID", "ClusterStaticEntry",
    "ClusterFederatedTrustDomain", "CiliumClusterwideNetworkPolicy",
}

# Strategic merge: list fields merged by key (from the Kubernetes API's
# patchMergeKey). Lists not named here are replaced whole, as kustomize does
# for lists without a merge key (args, command, tolerations, ...).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
    "hostAliases": "ip",
    "topologySpreadConstraints": "topologyKey",
}

# kustomize's default ("legacy") output order; other kinds follow, in input
# order. Only used to make the output read like kustomize's.
LEGACY_ORDER = [
    "Namespace", "ResourceQuota", "StorageClass", "CustomResourceDefinition",
    "ServiceAccount", "PodSecurityPolicy", "Role", "ClusterRole", "RoleBinding",
    "ClusterRoleBinding", "ConfigMap", "Secret", "Endpoints", "Service",
    "LimitRange", "PriorityClass", "PersistentVolume", "PersistentVolumeClaim",
    "Deployment", "StatefulSet", "CronJob", "PodDisruptionBudget",
]
LEGACY_LAST = [
    "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration",
]


def load_yaml_docs(path: str) -> list[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
    except yaml.YAMLError as e:
        raise RenderError(f"{path}: invalid YAML: {e}") from e
    for d in docs:
        if not isinstance(d, dict):
            raise RenderError(f"{path}: a document is not a mapping")
    return docs


def find_kustomization(directory: str) -> str:
    for name in KUSTOMIZATION_FILES:
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            return p
    raise RenderError(f"{directory}: no kustomization.yaml")


def res_id(obj: dict[str, Any]) -> tuple[str, str, str, str]:
    md = obj.get("metadata") or {}
    return (obj.get("apiVersion", ""), obj.get("kind", ""),
            md.get("namespace", "") or "", md.get("name", ""))


def check_resource(obj: dict[str, Any], origin: str) -> None:
    for field in ("apiVersion", "kind"):
        if not obj.get(field):
            raise RenderError(f"{origin}: a resource has no {field}")
    if not (obj.get("metadata") or {}).get("name"):
        raise RenderError(f"{origin}: {obj['kind']} has no metadata.name")


def split_api_version(api_version: str) -> tuple[str, str]:
    if "/" in api_version:
        group, version = api_version.split("/", 1)
        return group, version
    return "", api_version


def matches_target(obj: dict[str, Any], target: dict[str, Any]) -> bool:
    group, version = split_api_version(obj.get("apiVersion", ""))
    md = obj.get("metadata") or {}
    checks = {
        "group": group, "version": version, "kind": obj.get("kind"),
        "name": md.get("name"), "namespace": md.get("namespace", ""),
    }
    for key, value in target.items():
        if key not in checks:
            raise RenderError(f"patch target field {key!r} is not supported by render.py")
        if checks[key] != value:
            return False
    return True


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    if isinstance(patch, dict):
        if "$patch" in patch or any(k.startswith("$") for k in patch):
            raise RenderError(f"strategic-merge directive in {field or 'patch'} is not supported by render.py")
        if not isinstance(base, dict):
            return copy.deepcopy(patch)
        out = dict(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = strategic_merge(out[key], value, key)
            else:
                out[key] = copy.deepcopy(value)
        return out
    if isinstance(patch, list):
        key = MERGE_KEYS.get(field)
        if key and isinstance(base, list) and all(isinstance(i, dict) for i in base + patch):
            out = [copy.deepcopy(i) for i in base]
            for item in patch:
                if key not in item:
                    raise RenderError(f"patch item in {field} lacks merge key {key!r}")
                for i, existing in enumerate(out):
                    if existing.get(key) == item[key]:
                        out[i] = strategic_merge(existing, item, "")
                        break
                else:
                    out.append(copy.deepcopy(item))
            return out
        return copy.deepcopy(patch)
    return copy.deepcopy(patch)


def pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    kind = obj.get("kind")
    spec = obj.get("spec") or {}
    if kind == "Pod":
        return [spec]
    if kind == "CronJob":
        spec = ((spec.get("jobTemplate") or {}).get("spec") or {})
    template = spec.get("template") or {}
    if isinstance(template, dict) and isinstance(template.get("spec"), dict):
        return [template["spec"]]
    return []


def split_image(image: str) -> tuple[str, str, str]:
    name, digest = (image.split("@", 1) + [""])[:2] if "@" in image else (image, "")
    tag = ""
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = name.rsplit(":", 1)
    return name, tag, digest


def apply_images(objs: list[dict[str, Any]], images: list[dict[str, Any]]) -> None:
    for rule in images:
        if "name" not in rule:
            raise RenderError("images entry without name")
        unknown = set(rule) - {"name", "newName", "newTag", "digest"}
        if unknown:
            raise RenderError(f"images field(s) {sorted(unknown)} not supported by render.py")
        for obj in objs:
            for spec in pod_specs(obj):
                for group in ("initContainers", "containers"):
                    for c in spec.get(group) or []:
                        name, tag, digest = split_image(c.get("image", ""))
                        if name != rule["name"]:
                            continue
                        name = rule.get("newName", name)
                        if "digest" in rule:
                            c["image"] = f"{name}@{rule['digest']}"
                            continue
                        tag = str(rule["newTag"]) if "newTag" in rule else tag
                        image = name + (f":{tag}" if tag else "")
                        if digest and "newTag" not in rule:
                            image += f"@{digest}"
                        c["image"] = image


def apply_namespace(objs: list[dict[str, Any]], namespace: str) -> None:
    for obj in objs:
        md = obj.setdefault("metadata", {})
        old = md.get("namespace")
        if obj["kind"] not in CLUSTER_SCOPED:
            md["namespace"] = namespace
        if obj["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            for subj in obj.get("subjects") or []:
                if subj.get("kind") == "ServiceAccount" and subj.get("namespace") in (None, "", old, "default"):
                    subj["namespace"] = namespace


def render(directory: str, seen: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    directory = os.path.realpath(directory)
    if directory in seen:
        raise RenderError(f"{directory}: kustomization cycle")
    kpath = find_kustomization(directory)
    docs = load_yaml_docs(kpath)
    if len(docs) != 1:
        raise RenderError(f"{kpath}: expected one document")
    k = docs[0]
    unknown = set(k) - SUPPORTED_FIELDS
    if unknown:
        raise RenderError(f"{kpath}: field(s) {sorted(unknown)} not supported by render.py "
                          "(extend deploy/render.py, or render with kustomize)")
    if k.get("kind", "Kustomization") != "Kustomization":
        raise RenderError(f"{kpath}: kind must be Kustomization")

    objs: list[dict[str, Any]] = []
    for entry in k.get("resources") or []:
        path = os.path.join(directory, entry)
        if os.path.isdir(path):
            objs.extend(render(path, seen + (directory,)))
        elif os.path.isfile(path):
            for d in load_yaml_docs(path):
                check_resource(d, path)
                objs.append(d)
        else:
            raise RenderError(f"{kpath}: resource {entry!r} not found")
    ids = [res_id(o) for o in objs]
    dupes = {i for i in ids if ids.count(i) > 1}
    if dupes:
        raise RenderError(f"{kpath}: duplicate resources {sorted(dupes)}")

    for p in k.get("patches") or []:
        unknown = set(p) - {"path", "patch", "target"}
        if unknown:
            raise RenderError(f"{kpath}: patch field(s) {sorted(unknown)} not supported")
        if "path" in p:
            patch_docs = load_yaml_docs(os.path.join(directory, p["path"]))
        elif "patch" in p:
            patch_docs = [d for d in yaml.safe_load_all(p["patch"]) if d is not None]
        else:
            raise RenderError(f"{kpath}: patch needs path or patch")
        for patch in patch_docs:
            if not isinstance(patch, dict) or "kind" not in patch:
                raise RenderError(f"{kpath}: only strategic-merge patches (a mapping with kind) "
                                  "are supported by render.py")
            target = p.get("target")
            if target is None:
                pmd = patch.get("metadata") or {}
                target = {"kind": patch["kind"], "name": pmd.get("name")}
                if pmd.get("namespace"):
                    target["namespace"] = pmd["namespace"]
            hits = [i for i, o in enumerate(objs) if matches_target(o, target)]
            if not hits:
                raise RenderError(f"{kpath}: patch target {target} matches no resource")
            for i in hits:
                body = copy.deepcopy(patch)
                # The patch's own identity never renames the target.
                body.pop("apiVersion", None)
                body.pop("kind", None)
                pmd = body.get("metadata") or {}
                for key in ("name", "namespace"):
                    pmd.pop(key, None)
                if not pmd:
                    body.pop("metadata", None)
                objs[i] = strategic_merge(objs[i], body)

    if k.get("namespace"):
        apply_namespace(objs, k["namespace"])
    apply_images(objs, k.get("images") or [])
    return objs


def legacy_sorted(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def rank(o: dict[str, Any]) -> int:
        kind = o.get("kind", "")
        if kind in LEGACY_ORDER:
            return LEGACY_ORDER.index(kind)
        if kind in LEGACY_LAST:
            return 1000 + LEGACY_LAST.index(kind)
        return len(LEGACY_ORDER)
    return sorted(objs, key=rank)


class _Dumper(yaml.SafeDumper):
    pass


def _str_representer(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str_representer)


def dump(objs: list[dict[str, Any]]) -> str:
    return yaml.dump_all(objs, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                         explicit_start=False, width=1000)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", help="directory holding kustomization.yaml")
    ap.add_argument("--set-image", action="append", default=[], metavar="NAME=TAG",
                    help="like `kustomize edit set image NAME:TAG`, applied last")
    ap.add_argument("-o", "--output", help="write here instead of stdout")
    args = ap.parse_args(argv)
    try:
        objs = legacy_sorted(render(args.dir))
        for spec in args.set_image:
            if "=" not in spec:
                raise RenderError(f"--set-image {spec!r}: expected NAME=TAG")
            name, tag = spec.split("=", 1)
            apply_images(objs, [{"name": name, "newTag": tag}])
    except RenderError as e:
        print(f"render.py: {e}", file=sys.stderr)
        return 1
    text = dump(objs)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
