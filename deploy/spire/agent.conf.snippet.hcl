# SPIRE agent configuration to add for flowaudit (SPIRE 1.9.x; the precinct-99
# cluster keeps it in the spire-system/spire-agent ConfigMap, agent.conf).
#
# Both settings go INSIDE the existing `agent { ... }` block, not in a section
# of their own (sprint log, Phase 4C). Keep every other agent setting as it is.
agent {
  # The Workload API socket stays where it is. Shown only to make the point:
  # the admin socket must NOT be in this directory (or below it). SPIRE
  # rejects that, and it would expose the admin API to every workload that
  # mounts the Workload API socket directory.
  socket_path = "/run/spire/sockets/agent.sock"

  # The Delegated Identity API (and the rest of the admin API) on its own
  # socket, in its own directory. flowaudit mounts /run/spire/admin-sockets
  # from the host and connects to admin.sock (its --spire-admin-socket
  # default).
  admin_socket_path = "/run/spire/admin-sockets/admin.sock"

  # Who may use the Delegated Identity API. The caller is attested like any
  # workload (k8s workload attestor: namespace flowaudit, service account
  # flowaudit) and must hold one of these SPIFFE IDs; deploy/spire/ has the
  # registration entry that gives flowaudit this one. Keep Cilium's entry if
  # Cilium's mutual authentication uses the same SPIRE agents (precinct-99
  # does).
  authorized_delegates = [
    "spiffe://demo.local/ns/kube-system/sa/cilium",
    "spiffe://demo.local/ns/flowaudit/sa/flowaudit",
  ]
}
