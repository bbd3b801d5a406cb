#!/usr/bin/env bash
# Registers flowaudit's SPIFFE IDs with the SPIRE server: the agents' (so that
# the SPIRE agent can attest them on the admin socket and find their ID in
# authorized_delegates, and so that they get an SVID for their mTLS gRPC
# port) and the relay's. Idempotent: existing entries are left alone.
#
#   deploy/spire/register-flowaudit.sh            # precinct-99 defaults
#   TRUST_DOMAIN=example.org CLUSTER_NAME=c1 deploy/spire/register-flowaudit.sh
#
# Three entries:
#  1. a node alias for every SPIRE agent of the cluster (k8s_psat node
#     attestation, selector k8s_psat:cluster:<cluster>). The sprint log
#     parented entries to individual agent IDs, which embed node UIDs and
#     change whenever the cluster is recreated; an alias does not.
#  2. the agents' workload entry under that alias:
#       spiffe://<td>/ns/flowaudit/sa/flowaudit
#     selected by k8s:ns:flowaudit + k8s:sa:flowaudit.
#  3. the relay's, likewise:
#       spiffe://<td>/ns/flowaudit/sa/flowaudit-relay
#     selected by k8s:ns:flowaudit + k8s:sa:flowaudit-relay. The agents'
#     TCP gRPC port admits this ID only (--allow-peer).
#
# The same commands, by hand (inside the spire-server container):
#   spire-server entry create -node \
#     -spiffeID spiffe://demo.local/k8s-cluster/precinct-99 \
#     -selector k8s_psat:cluster:precinct-99
#   spire-server entry create \
#     -parentID spiffe://demo.local/k8s-cluster/precinct-99 \
#     -spiffeID spiffe://demo.local/ns/flowaudit/sa/flowaudit \
#     -selector k8s:ns:flowaudit -selector k8s:sa:flowaudit
#   spire-server entry create \
#     -parentID spiffe://demo.local/k8s-cluster/precinct-99 \
#     -spiffeID spiffe://demo.local/ns/flowaudit/sa/flowaudit-relay \
#     -selector k8s:ns:flowaudit -selector k8s:sa:flowaudit-relay
# Clusters running spire-controller-manager apply clusterspiffeid.yaml
# instead.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=spire-server.sh
. "$(dirname "${BASH_SOURCE[0]}")/spire-server.sh"
CLUSTER_NAME="${CLUSTER_NAME:-precinct-99}"      # k8s_psat `cluster` in the SPIRE server config

NODE_ALIAS="spiffe://${TRUST_DOMAIN}/k8s-cluster/${CLUSTER_NAME}"

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

# register_workload SERVICE_ACCOUNT: a pod of namespace flowaudit running
# under that service account gets spiffe://<td>/ns/flowaudit/sa/<sa>.
register_workload() {
  local id="spiffe://${TRUST_DOMAIN}/ns/flowaudit/sa/$1"
  if entry_exists "$id"; then
    echo "$1 $id: already registered"
  else
    spire_server entry create \
      -parentID "$NODE_ALIAS" \
      -spiffeID "$id" \
      -selector k8s:ns:flowaudit \
      -selector "k8s:sa:$1"
  fi
  spire_server entry show -spiffeID "$id"
}

register_workload flowaudit         # the agents
register_workload flowaudit-relay   # the relay
