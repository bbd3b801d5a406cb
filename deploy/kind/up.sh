#!/usr/bin/env bash
# Deploy flowaudit to a kind cluster (precinct-99 by default):
#   1. create the cluster, or reuse it if it exists
#   2. build the image under a unique tag (git sha + UTC timestamp; never
#      `latest`: kind caches images by tag, sprint log Issue 2)
#   3. kind load docker-image into every node
#   4. check the SPIRE side (admin socket config, authorized_delegates) and
#      register the agents' and the relay's SPIFFE IDs when a SPIRE server
#      is found
#   5. apply the kind overlay with that tag, wait for the rollout of the
#      agents (DaemonSet) and of the relay (Deployment)
#   6. print how to tail flows, per node and cluster-wide through the relay
#
# Usage: deploy/kind/up.sh [--no-build] [--tag TAG]
# Environment: CLUSTER_NAME (precinct-99), IMAGE_NAME (flowaudit),
#   KIND_CONFIG (deploy/kind/cluster.yaml, used only when creating),
#   SPIRE_NAMESPACE (spire-system), ROLLOUT_TIMEOUT (180s), DOCKER, KIND, KUBECTL.
# Needs: docker (with an engine), kind, kubectl, git.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
deploy="$(cd "$here/.." && pwd)"
repo="$(cd "$deploy/.." && pwd)"

CLUSTER_NAME="${CLUSTER_NAME:-precinct-99}"
IMAGE_NAME="${IMAGE_NAME:-flowaudit}"
KIND_CONFIG="${KIND_CONFIG:-$here/cluster.yaml}"
SPIRE_NAMESPACE="${SPIRE_NAMESPACE:-spire-system}"
ROLLOUT_TIMEOUT="${ROLLOUT_TIMEOUT:-180s}"
DOCKER="${DOCKER:-docker}"
KIND="${KIND:-kind}"
KUBECTL="${KUBECTL:-kubectl}"
FLOWAUDIT_SPIFFE_ID="spiffe://demo.local/ns/flowaudit/sa/flowaudit"

build=1
tag=""
while [ $# -gt 0 ]; do
  case "$1" in
    --no-build) build=0 ;;
    --tag) tag="${2:?--tag needs a value}"; shift ;;
    -h|--help) sed -n '2,18p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "up.sh: unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

log() { printf '==> %s\n' "$*"; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
die() { printf 'up.sh: %s\n' "$*" >&2; exit 1; }

for tool in "$DOCKER" "$KIND" "$KUBECTL" git; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found on PATH"
done
if [ "$build" -eq 1 ]; then
  "$DOCKER" info >/dev/null 2>&1 || die "no Docker engine answers ($DOCKER info failed)"
fi

# --- unique tag ---------------------------------------------------------------
if [ -z "$tag" ]; then
  if [ "$build" -eq 0 ]; then
    die "--no-build needs --tag TAG (the tag of an image already built)"
  fi
  sha="$(git -C "$repo" rev-parse --short=12 HEAD 2>/dev/null || echo nogit)"
  if [ -n "$(git -C "$repo" status --porcelain 2>/dev/null)" ]; then
    sha="${sha}-dirty"
  fi
  tag="${sha}-$(date -u +%Y%m%dT%H%M%SZ)"
fi
case "$tag" in
  latest|"") die "refusing image tag '${tag}': use a unique tag (sprint log Issue 2)" ;;
esac
image="${IMAGE_NAME}:${tag}"

# --- cluster --------------------------------------------------------------------
if "$KIND" get clusters 2>/dev/null | grep -qx "$CLUSTER_NAME"; then
  log "reusing kind cluster $CLUSTER_NAME"
else
  log "creating kind cluster $CLUSTER_NAME ($KIND_CONFIG)"
  "$KIND" create cluster --name "$CLUSTER_NAME" --config "$KIND_CONFIG" --wait 120s
fi
context="kind-${CLUSTER_NAME}"
k() { "$KUBECTL" --context "$context" "$@"; }
k cluster-info >/dev/null || die "cannot reach cluster through context $context"

# --- image --------------------------------------------------------------------
if [ "$build" -eq 1 ]; then
  log "building $image"
  DOCKER_BUILDKIT=1 "$DOCKER" build -f "$deploy/Dockerfile" -t "$image" "$repo"
fi
log "loading $image into kind nodes"
"$KIND" load docker-image "$image" --name "$CLUSTER_NAME"

# --- SPIRE side ---------------------------------------------------------------
# Problems here are warnings, and the rollout below says what they cost: the
# agents' and the relay's mTLS ports take their SVIDs from the SPIRE Workload
# API, so without SPIRE neither becomes ready; with the Workload API but no
# admin socket the agents run with DERIVED identities. deploy/README.md
# explains each.
spire_ok=1
spire_here=1
if k get namespace "$SPIRE_NAMESPACE" >/dev/null 2>&1; then
  agent_conf="$(k -n "$SPIRE_NAMESPACE" get configmap spire-agent -o jsonpath='{.data.agent\.conf}' 2>/dev/null || true)"
  if [ -z "$agent_conf" ]; then
    warn "no ConfigMap $SPIRE_NAMESPACE/spire-agent with agent.conf: check the SPIRE agent config by hand (deploy/spire/agent.conf.snippet.hcl)"
    spire_ok=0
  else
    if ! printf '%s\n' "$agent_conf" | grep -q 'admin_socket_path *= *"/run/spire/admin-sockets/admin.sock"'; then
      warn "SPIRE agent has no admin_socket_path = \"/run/spire/admin-sockets/admin.sock\": add deploy/spire/agent.conf.snippet.hcl inside its agent {} block"
      spire_ok=0
    fi
    if ! printf '%s\n' "$agent_conf" | grep -qF "$FLOWAUDIT_SPIFFE_ID"; then
      warn "SPIRE agent authorized_delegates does not list $FLOWAUDIT_SPIFFE_ID: add it (deploy/spire/agent.conf.snippet.hcl), then restart the SPIRE agents: kubectl -n $SPIRE_NAMESPACE rollout restart daemonset/spire-agent"
      spire_ok=0
    fi
  fi
  if k get crd clusterspiffeids.spire.spiffe.io >/dev/null 2>&1; then
    log "registering the flowaudit agents and relay through spire-controller-manager (ClusterSPIFFEID)"
    k apply -f "$deploy/spire/clusterspiffeid.yaml"
  elif k -n "$SPIRE_NAMESPACE" get pod "${SPIRE_SERVER_POD:-spire-server-0}" >/dev/null 2>&1; then
    log "registering the flowaudit agents and relay with the SPIRE server"
    KUBECTL="$KUBECTL" KUBE_CONTEXT="$context" SPIRE_NAMESPACE="$SPIRE_NAMESPACE" CLUSTER_NAME="$CLUSTER_NAME" \
      "$deploy/spire/register-flowaudit.sh" || { warn "registration failed (see above)"; spire_ok=0; }
  else
    warn "no SPIRE server pod found in $SPIRE_NAMESPACE: register flowaudit by hand (deploy/spire/register-flowaudit.sh)"
    spire_ok=0
  fi
else
  warn "namespace $SPIRE_NAMESPACE not found: no SPIRE here, so the agents run with DERIVED identities and without their mTLS gRPC port, and the relay (which needs its SVID) is not deployed (deploy/README.md, \"Relay\")"
  spire_ok=0
  spire_here=0
fi

# --- flowaudit ----------------------------------------------------------------
# A throwaway overlay on top of overlays/kind that sets the tag. It lives
# beside overlays/kind because kustomize only accepts relative resource paths
# (deploy/.gitignore ignores it).
overlay="$(mktemp -d "$deploy/kustomize/overlays/.up.XXXXXX")"
trap 'rm -rf "$overlay"' EXIT
cat >"$overlay/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../kind
images:
  - name: flowaudit
    newName: ${IMAGE_NAME}
    newTag: "${tag}"
EOF
rendered="$overlay/rendered.yaml"
k kustomize "$overlay" >"$rendered"
# drop WHAT PYTHON_CONDITION: leaves out the rendered objects d for which
# the condition holds.
drop() {
  if command -v python3 >/dev/null 2>&1 && python3 -c 'import yaml' 2>/dev/null; then
    python3 -c "import sys, yaml; docs=[d for d in yaml.safe_load_all(sys.stdin) if d and not ($2)]; yaml.safe_dump_all(docs, sys.stdout, sort_keys=False)" <"$rendered" >"$rendered.filtered"
    mv "$rendered.filtered" "$rendered"
  else
    die "cannot leave out $1 without python3 + PyYAML; install PyYAML"
  fi
}
if ! k get crd servicemonitors.monitoring.coreos.com >/dev/null 2>&1; then
  warn "no ServiceMonitor CRD (prometheus-operator) in this cluster: skipping the ServiceMonitor; the prometheus.io annotations still apply"
  drop "the ServiceMonitors" 'd.get("kind") == "ServiceMonitor"'
fi
workloads="daemonset/flowaudit deployment/flowaudit-relay"
if [ "$spire_here" -eq 0 ]; then
  drop "the relay" 'd.get("metadata", {}).get("name", "").startswith("flowaudit-relay")'
  workloads="daemonset/flowaudit"
fi
log "applying flowaudit ($image)"
k apply -f "$rendered"

log "waiting for the rollout (timeout $ROLLOUT_TIMEOUT)"
for workload in $workloads; do
  if ! k -n flowaudit rollout status "$workload" --timeout "$ROLLOUT_TIMEOUT"; then
    k -n flowaudit get pods -o wide || true
    k -n flowaudit describe "$workload" | tail -n 20 || true
    k -n flowaudit logs "$workload" --tail 50 || true
    die "$workload did not become ready (no SVID from the SPIRE Workload API? see the warnings above)"
  fi
done
k -n flowaudit get pods -o wide

cat <<EOF

flowaudit $image is running on every node of $CLUSTER_NAME.
$( [ "$spire_ok" -eq 1 ] || echo "(SPIRE: see the warnings above; until fixed, identities are DERIVED, not ATTESTED)" )

Tail flows (one node's agent; -f follows):
  kubectl --context $context -n flowaudit exec ds/flowaudit -- flowaudit observe -f
  kubectl --context $context -n flowaudit exec ds/flowaudit -- flowaudit observe -f --verdict VIOLATION
  kubectl --context $context -n flowaudit exec ds/flowaudit -- flowaudit observe --from-label app=frontend --to-label app=backend --last 20
A given node's agent:
  kubectl --context $context -n flowaudit exec \$(kubectl --context $context -n flowaudit get pod -l app.kubernetes.io/name=flowaudit,app.kubernetes.io/component=agent --field-selector spec.nodeName=${CLUSTER_NAME}-worker -o name) -- flowaudit observe -f
Status and metrics:
  kubectl --context $context -n flowaudit exec ds/flowaudit -- flowaudit status
  kubectl --context $context -n flowaudit port-forward ds/flowaudit 9966:9966   # then curl localhost:9966/metrics
Every node at once, through the relay (mTLS; deploy/README.md, "Relay"):
  KUBE_CONTEXT=$context $deploy/spire/mint-observer-svid.sh \$USER ~/.flowaudit
  kubectl --context $context -n flowaudit port-forward svc/flowaudit-relay 4245 &
  flowaudit observe --server 127.0.0.1:4245 --tls-cert ~/.flowaudit/svid.pem --tls-key ~/.flowaudit/key.pem \\
    --tls-ca ~/.flowaudit/bundle.pem --allow-peer spiffe://demo.local/ns/flowaudit/sa/flowaudit-relay -f
EOF
