#!/usr/bin/env bash
# Offline validation of flowaudit's deployment (no cluster, no network):
#   1. render the kustomize base, the kind overlay, and the kind overlay with a
#      per-build tag the way kind/up.sh does (deploy/render.py; and with real
#      kustomize too when one is installed, failing if the two differ)
#   2. Kubernetes schema validation, strict (kubernetes-validate, Kubernetes
#      $FLOWAUDIT_KUBE_VERSION, default 1.31.0 as on kind nodes); the CRDs
#      (ServiceMonitor, ClusterSPIFFEID) against deploy/schemas/
#   3. the DaemonSet's security posture (validate.py posture)
#   4. the SPIRE agent snippet (admin socket directory, authorized_delegates)
#   5. checkov security scan of the rendered manifests and the Dockerfile; any
#      finding fails unless skipped with a justification in the manifest, and
#      a skip that no longer suppresses a real finding fails too
#   6. shellcheck of the scripts
# Exits non-zero on any failure. Tools: `cargo xtask setup` installs them
# (pip install -r deploy/requirements.txt; apt-get install shellcheck).
#
# Usage: deploy/validate.sh [--keep]   (--keep leaves the rendered files)
set -euo pipefail

deploy="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export FLOWAUDIT_KUBE_VERSION="${FLOWAUDIT_KUBE_VERSION:-1.31.0}"
keep=0
[ "${1:-}" = "--keep" ] && keep=1

started=$(date +%s)
failures=()
step() { printf '\n== %s\n' "$*"; }
failed() { failures+=("$1"); printf 'FAILED: %s\n' "$1"; }

# --- tools --------------------------------------------------------------------
missing=()
command -v python3 >/dev/null 2>&1 || missing+=("python3")
if command -v python3 >/dev/null 2>&1; then
  for mod in yaml kubernetes_validate jsonschema hcl2; do
    python3 -c "import $mod" 2>/dev/null || missing+=("python module $mod")
  done
fi
command -v checkov >/dev/null 2>&1 || missing+=("checkov")
command -v shellcheck >/dev/null 2>&1 || missing+=("shellcheck")
if [ ${#missing[@]} -gt 0 ]; then
  printf 'validate.sh: missing tools: %s\n' "${missing[*]}" >&2
  echo "validate.sh: 'cargo xtask setup' installs them (pip install -r deploy/requirements.txt; apt-get install -y shellcheck)" >&2
  exit 2
fi

out="$(mktemp -d "${TMPDIR:-/tmp}/flowaudit-validate.XXXXXX")"
if [ "$keep" -eq 1 ]; then
  echo "rendered files kept in $out"
else
  trap 'rm -rf "$out"' EXIT
fi

# --- 1. render ----------------------------------------------------------------
step "render (deploy/render.py)"
mkdir -p "$out/rendered"
render_ok=1
python3 "$deploy/render.py" "$deploy/kustomize/base" -o "$out/rendered/base.yaml" || render_ok=0
python3 "$deploy/render.py" "$deploy/kustomize/overlays/kind" -o "$out/rendered/kind.yaml" || render_ok=0
# What kind/up.sh renders: a throwaway overlay on overlays/kind setting the tag.
uptag="0123456789ab-20260101T000000Z"
upo="$(mktemp -d "$deploy/kustomize/overlays/.up.XXXXXX")"
cat >"$upo/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../kind
images:
  - name: flowaudit
    newName: flowaudit
    newTag: "${uptag}"
EOF
python3 "$deploy/render.py" "$upo" -o "$out/up-overlay.yaml" || render_ok=0
if [ "$render_ok" -eq 1 ]; then
  if grep -q "image: flowaudit:${uptag}\$" "$out/up-overlay.yaml"; then
    echo "  ok    base, kind overlay and the up.sh overlay render; the up.sh tag reaches the DaemonSet"
  else
    failed "the up.sh overlay did not set image flowaudit:${uptag}"
  fi
else
  failed "rendering"
fi

# Real kustomize, when there is one recent enough (v4+: `patches` with targets).
kustomize_cmd=()
if command -v kustomize >/dev/null 2>&1; then
  kustomize_cmd=(kustomize build)
elif command -v kubectl >/dev/null 2>&1 \
  && kubectl version --client -o json 2>/dev/null \
     | python3 -c 'import json,sys; v=json.load(sys.stdin).get("kustomizeVersion",""); sys.exit(0 if v[:2] in ("v4","v5","v6") else 1)'; then
  kustomize_cmd=(kubectl kustomize)
fi
if [ ${#kustomize_cmd[@]} -gt 0 ] && [ "$render_ok" -eq 1 ]; then
  step "render.py against real kustomize (${kustomize_cmd[*]})"
  for pair in "base:$deploy/kustomize/base" "kind:$deploy/kustomize/overlays/kind" "up-overlay:$upo"; do
    name="${pair%%:*}"; dir="${pair#*:}"
    if "${kustomize_cmd[@]}" "$dir" >"$out/$name.kustomize.yaml"; then
      ref="$out/rendered/$name.yaml"; [ "$name" = up-overlay ] && ref="$out/up-overlay.yaml"
      python3 "$deploy/validate.py" same "$ref" "$out/$name.kustomize.yaml" || failed "render.py and kustomize disagree on $name"
    else
      failed "${kustomize_cmd[*]} $dir"
    fi
  done
else
  step "render.py against real kustomize"
  echo "  skip  no kustomize v4+ (kustomize, or kubectl >= 1.21) on PATH: render.py output not cross-checked here"
fi
rm -rf "$upo"

if [ "$render_ok" -eq 1 ]; then
  # --- 2. schemas ---------------------------------------------------------------
  step "Kubernetes schemas (kubernetes-validate, Kubernetes $FLOWAUDIT_KUBE_VERSION, strict)"
  python3 "$deploy/validate.py" schema "$out/rendered/base.yaml" "$out/rendered/kind.yaml" \
    "$deploy/spire/clusterspiffeid.yaml" || failed "schema validation"
  echo "  note  deploy/spire/agent-daemonset-patch.yaml is a partial patch for an existing SPIRE DaemonSet, not a whole object: checked as YAML only"
  python3 -c 'import sys, yaml; list(yaml.safe_load_all(open(sys.argv[1])))' "$deploy/spire/agent-daemonset-patch.yaml" \
    || failed "deploy/spire/agent-daemonset-patch.yaml is not valid YAML"

  # --- 3. posture ---------------------------------------------------------------
  step "DaemonSet security posture"
  python3 "$deploy/validate.py" posture "$out/rendered/base.yaml" "$out/rendered/kind.yaml" "$out/up-overlay.yaml" \
    || failed "security posture"
fi

# --- 4. SPIRE agent snippet -----------------------------------------------------
step "SPIRE agent configuration snippet"
python3 "$deploy/validate.py" spire "$deploy/spire/agent.conf.snippet.hcl" || failed "SPIRE agent snippet"

# --- 5. checkov -------------------------------------------------------------------
if [ "$render_ok" -eq 1 ]; then
  step "checkov (kubernetes, dockerfile)"
  mkdir -p "$out/scan" "$out/scan-noskip"
  cp "$out/rendered/base.yaml" "$out/rendered/kind.yaml" "$out/scan/"
  cp "$deploy/Dockerfile" "$out/scan/Dockerfile"
  for f in base.yaml kind.yaml Dockerfile; do
    python3 "$deploy/validate.py" strip-skips "$out/scan/$f" "$out/scan-noskip/$f"
  done
  checkov_run() {
    # --skip-download: offline, no Bridgecrew platform; exit code read from
    # the JSON report, not from checkov.
    checkov -d "$1" --framework kubernetes dockerfile --skip-download \
      -o json >"$2" 2>"$2.stderr" || true
    if [ ! -s "$2" ]; then
      cat "$2.stderr" >&2
      return 1
    fi
  }
  if checkov_run "$out/scan" "$out/checkov.json" && checkov_run "$out/scan-noskip" "$out/checkov-noskip.json"; then
    python3 "$deploy/validate.py" checkov-report "$out/checkov.json" "$out/checkov-noskip.json" \
      || failed "checkov findings"
  else
    failed "checkov did not run"
  fi
fi

# --- 6. shellcheck ---------------------------------------------------------------
step "shellcheck"
if shellcheck "$deploy/validate.sh" "$deploy/kind/up.sh" "$deploy/spire/register-flowaudit.sh"; then
  echo "  ok    validate.sh, kind/up.sh, spire/register-flowaudit.sh"
else
  failed "shellcheck"
fi

# --- summary --------------------------------------------------------------------
elapsed=$(( $(date +%s) - started ))
echo
if [ ${#failures[@]} -gt 0 ]; then
  printf 'validate.sh: FAILED (%ss): %s\n' "$elapsed" "$(IFS=';'; echo "${failures[*]}")"
  exit 1
fi
echo "validate.sh: all deployment checks passed (${elapsed}s)"
