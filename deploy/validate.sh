#!/usr/bin/env bash
# Offline validation of flowaudit's deployment (no cluster, no network):
#   1. render the kustomize base, the kind overlay, and the kind overlay with a
#      per-build tag the way kind/up.sh does, with `kubectl kustomize`
#   2. Kubernetes schema validation, strict (kubernetes-validate, Kubernetes
#      $FLOWAUDIT_KUBE_VERSION, default 1.31.0 as on kind nodes); the CRDs
#      (ServiceMonitor, ClusterSPIFFEID) against deploy/schemas/
#   3. the security posture of the DaemonSet and of the relay's Deployment,
#      and that agents, relay, RBAC and NetworkPolicies agree (validate.py
#      posture)
#   4. the SPIRE agent snippet (admin socket directory, authorized_delegates,
#      the Workload API socket the manifests mount)
#   5. checkov security scan of the rendered manifests and the Dockerfile; any
#      finding fails unless skipped with a justification in the manifest, and
#      a skip that no longer suppresses a real finding fails too
#   6. shellcheck of the scripts
# Exits non-zero on any failure. Tools: kubectl (>= 1.21: kustomize v4+) and
# what `cargo xtask setup` installs (deploy/requirements.txt into the virtual
# environment $FLOWAUDIT_VENV, default <repo>/target/venv, never the system
# Python; apt-get install shellcheck).
#
# Usage: deploy/validate.sh [--keep]   (--keep leaves the rendered files)
set -euo pipefail

deploy="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# python3, checkov and kubernetes-validate come from the setup's venv.
venv="${FLOWAUDIT_VENV:-$(dirname "$deploy")/target/venv}"
[ -x "$venv/bin/python3" ] && export PATH="$venv/bin:$PATH"
export FLOWAUDIT_KUBE_VERSION="${FLOWAUDIT_KUBE_VERSION:-1.31.0}"
# checkov asks PyPI for a newer version at every start unless told not to:
# the validation is offline.
export CKV_SKIP_PACKAGE_UPDATE_CHECK=true
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
# kubectl's built-in kustomize renders, as kind/up.sh does: v4+ (kubectl
# 1.21+) for `patches` with a target.
if ! command -v kubectl >/dev/null 2>&1; then
  missing+=("kubectl (for kubectl kustomize)")
elif ! kubectl version --client 2>/dev/null | grep -Eq '^Kustomize Version: v([4-9]|[1-9][0-9])\.'; then
  missing+=("kubectl >= 1.21 (kustomize v4+; found: $(kubectl version --client 2>/dev/null | tr '\n' ' '))")
fi
command -v shellcheck >/dev/null 2>&1 || missing+=("shellcheck")
if [ ${#missing[@]} -gt 0 ]; then
  printf 'validate.sh: missing tools: %s\n' "${missing[*]}" >&2
  echo "validate.sh: 'cargo xtask setup' installs them (deploy/requirements.txt into the virtual environment $venv; apt-get install -y shellcheck); kubectl: https://kubernetes.io/docs/tasks/tools/" >&2
  exit 2
fi

out="$(mktemp -d "${TMPDIR:-/tmp}/flowaudit-validate.XXXXXX")"
if [ "$keep" -eq 1 ]; then
  echo "rendered files kept in $out"
else
  trap 'rm -rf "$out"' EXIT
fi

# --- 1. render ----------------------------------------------------------------
step "render (kubectl kustomize)"
mkdir -p "$out/rendered"
render_ok=1
render() { # DIR OUT
  if ! kubectl kustomize "$1" >"$2" 2>"$2.stderr"; then
    printf '  FAIL  kubectl kustomize %s:\n' "$1"
    sed 's/^/        /' "$2.stderr"
    render_ok=0
  fi
}
render "$deploy/kustomize/base" "$out/rendered/base.yaml"
render "$deploy/kustomize/overlays/kind" "$out/rendered/kind.yaml"
# What kind/up.sh renders: a throwaway overlay on overlays/kind setting the tag.
uptag="0123456789ab-20260101T000000Z"
# Made in a copy of the tree under $out: the checkout is never written to
# (it may be read-only), and the EXIT trap removes it.
cp -r "$deploy/kustomize" "$out/kustomize"
upo="$out/kustomize/overlays/up"
mkdir -p "$upo"
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
render "$upo" "$out/up-overlay.yaml"
if [ "$render_ok" -eq 1 ]; then
  if grep -q "image: flowaudit:${uptag}\$" "$out/up-overlay.yaml"; then
    echo "  ok    base, kind overlay and the up.sh overlay render; the up.sh tag reaches the DaemonSet"
  else
    failed "the up.sh overlay did not set image flowaudit:${uptag}"
  fi
else
  failed "rendering"
fi

if [ "$render_ok" -eq 1 ]; then
  # --- 2. schemas ---------------------------------------------------------------
  step "Kubernetes schemas (kubernetes-validate, Kubernetes $FLOWAUDIT_KUBE_VERSION, strict)"
  python3 "$deploy/validate.py" schema "$out/rendered/base.yaml" "$out/rendered/kind.yaml" \
    "$deploy/spire/clusterspiffeid.yaml" || failed "schema validation"
  echo "  note  deploy/spire/agent-daemonset-patch.yaml is a partial patch for an existing SPIRE DaemonSet, not a whole object: checked as YAML only"
  python3 -c 'import sys, yaml; list(yaml.safe_load_all(open(sys.argv[1])))' "$deploy/spire/agent-daemonset-patch.yaml" \
    || failed "deploy/spire/agent-daemonset-patch.yaml is not valid YAML"

  # --- 3. posture ---------------------------------------------------------------
  step "security posture (agents' DaemonSet, relay's Deployment)"
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
if shellcheck -x "$deploy/validate.sh" "$deploy/kind/up.sh" "$deploy/spire/register-flowaudit.sh" \
  "$deploy/spire/mint-observer-svid.sh" "$deploy/spire/spire-server.sh"; then
  echo "  ok    validate.sh, kind/up.sh, spire/register-flowaudit.sh, spire/mint-observer-svid.sh, spire/spire-server.sh"
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
