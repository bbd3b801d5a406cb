# shellcheck shell=bash
# Sourced by register-flowaudit.sh and mint-observer-svid.sh: where the SPIRE
# server is, and `spire_server ARGS...`, which runs its CLI in the server's
# pod. Every setting can be overridden from the environment.
TRUST_DOMAIN="${TRUST_DOMAIN:-demo.local}"
SPIRE_NAMESPACE="${SPIRE_NAMESPACE:-spire-system}"
SPIRE_SERVER_POD="${SPIRE_SERVER_POD:-spire-server-0}"
SPIRE_SERVER_CONTAINER="${SPIRE_SERVER_CONTAINER:-spire-server}"
SPIRE_SERVER_BIN="${SPIRE_SERVER_BIN:-/opt/spire/bin/spire-server}"
KUBECTL="${KUBECTL:-kubectl}"
KUBE_CONTEXT="${KUBE_CONTEXT:-}"                # empty: kubectl's current context

context_args=()
if [ -n "$KUBE_CONTEXT" ]; then
  context_args=(--context "$KUBE_CONTEXT")
fi

spire_server() {
  "$KUBECTL" ${context_args[@]+"${context_args[@]}"} exec -n "$SPIRE_NAMESPACE" "$SPIRE_SERVER_POD" -c "$SPIRE_SERVER_CONTAINER" -- \
    "$SPIRE_SERVER_BIN" "$@"
}
