#!/usr/bin/env bash
# Registers flowaudit's own SPIFFE ID with the SPIRE server, so that the SPIRE
# agent can attest flowaudit on the admin socket and find its ID in
# authorized_delegates. Idempotent: existing entries are left alone.
#
#   deploy/spire/register-flowaudit.sh            # precinct-99 defaults
#   TRUST_DOMAIN=example.org CLUSTER_NAME=c1 deploy/spire/register-flowaudit.sh
#
# Two entries:
#  1. a node alias for every SPIRE agent of the cluster (k8s_psat node
#     attestation, selector k8s_psat:cluster:<cluster>). The sprint log
#     parented entries to individual agent IDs, which embed node UIDs and
#     change whenever the cluster is recreated; an alias does not.
#  2. flowaudit's workload entry under that alias:
#       spiffe://<td>/ns/flowaudit/sa/flowaudit
#     selected by k8s:ns:flowaudit + k8s:sa:flowaudit.
#
# The same two commands, by hand (inside the spire-server container):
#   spire-server entry create -node \
#     -spiffeID spiffe://demo.local/k8s-cluster/precinct-99 \
#     -selector k8s_psat:cluster:precinct-99
#   spire-server entry create \
#     -parentID spiffe://demo.local/k8s-cluster/precinct-99 \
#     -spiffeID spiffe://demo.local/ns/flowaudit/sa/flowaudit \
#     -selector k8s:ns:flowaudit -selector k8s:sa:flowaudit
# Clusters running spire-controller-manager apply clusterspiffeid.yaml
# instead.
set -euo pipefail

TRUST_DOMAIN="${TRUST_DOMAIN:-demo.local}"
CLUSTER_NAME="${CLUSTER_NAME:-precinct-99}"      # k8s_psat `cluster` in the SPIRE server config
SPIRE_NAMESPACE="${SPIRE_NAMESPACE:-spire-system}"
SPIRE_SERVER_POD="${SPIRE_SERVER_POD:-spire-server-0}"
SPIRE_SERVER_CONTAINER="${SPIRE_SERVER_CONTAINER:-spire-server}"
SPIRE_SERVER_BIN="${SPIRE_SERVER_BIN:-/opt/spire/bin/spire-server}"
KUBECTL="${KUBECTL:-kubectl}"
KUBE_CONTEXT="${KUBE_CONTEXT:-}"                # empty: kubectl's current context

NODE_ALIAS="spiffe://${TRUST_DOMAIN}/k8s-cluster/${CLUSTER_NAME}"
FLOWAUDIT_ID="spiffe://${TRUST_DOMAIN}/ns/flowaudit/sa/flowaudit"

context_args=()
if [ -n "$KUBE_CONTEXT" ]; then
  context_args=(--context "$KUBE_CONTEXT")
fi

spire_server() {
  "$KUBECTL" ${context_args[@]+"${context_args[@]}"} exec -n "$SPIRE_NAMESPACE" "$SPIRE_SERVER_POD" -c "$SPIRE_SERVER_CONTAINER" -- \
    "$SPIRE_SERVER_BIN" "$@"
}

entry_exists() {
  # `entry show` exits 0 with "Found 0 entries" when nothing matches.
  spire_server entry show -spiffeID "$1" | grep -q 'Entry ID'
}

if entry_exists "$NODE_ALIAS"; then
  echo "node alias $NODE_ALIAS: already registered"
else
  spire_server entry create -node \
    -spiffeID "$NODE_ALIAS" \
    -selector "k8s_psat:cluster:${CLUSTER_NAME}"
fi

if entry_exists "$FLOWAUDIT_ID"; then
  echo "flowaudit $FLOWAUDIT_ID: already registered"
else
  spire_server entry create \
    -parentID "$NODE_ALIAS" \
    -spiffeID "$FLOWAUDIT_ID" \
    -selector k8s:ns:flowaudit \
    -selector k8s:sa:flowaudit
fi

spire_server entry show -spiffeID "$FLOWAUDIT_ID"
