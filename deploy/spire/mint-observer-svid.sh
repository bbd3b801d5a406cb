#!/usr/bin/env bash
# Mints a short-lived X.509-SVID for a person or tool that reads the cluster
# stream from the relay (`flowaudit observe --server ... --tls-cert ...`):
#   spiffe://<td>/flowaudit/observer/<NAME>
# which the relay admits (--allow-peer spiffe://<td>/flowaudit/observer/*,
# deploy/kustomize/base/relay-deployment.yaml). No registration entry gives a
# pod such an ID: only someone who may exec into the SPIRE server can mint it.
#
#   deploy/spire/mint-observer-svid.sh alice            # into ./flowaudit-observer/
#   TTL=8h deploy/spire/mint-observer-svid.sh alice ~/.flowaudit
#
# Writes DIR/svid.pem (certificate chain), DIR/key.pem (private key, mode
# 0600) and DIR/bundle.pem (the trust domain's CA certificates), the three
# files of `flowaudit observe --tls-cert --tls-key --tls-ca`. flowaudit reads
# them once at start: mint again, and restart observe, when the SVID expires
# (TTL, default 1h; the SPIRE server may cap it shorter and says so).
# It runs `spire-server x509 mint` in the server's pod (spire-server.sh) and
# splits its output; the server image has no shell or cat to copy files out.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=spire-server.sh
. "$(dirname "${BASH_SOURCE[0]}")/spire-server.sh"
TTL="${TTL:-1h}"

name="${1:?usage: mint-observer-svid.sh NAME [DIR]  (NAME: letters, digits, . - _)}"
dir="${2:-flowaudit-observer}"
case "$name" in
  *[!A-Za-z0-9._-]*) echo "mint-observer-svid.sh: NAME '$name': only letters, digits, '.', '-' and '_' (one SPIFFE ID path segment)" >&2; exit 2 ;;
esac
id="spiffe://${TRUST_DOMAIN}/flowaudit/observer/${name}"

umask 077
mkdir -p "$dir"
minted="$(spire_server x509 mint -spiffeID "$id" -ttl "$TTL")"
# The output: "X509-SVID:", PEM blocks, "Private key:", one PEM block,
# "Root CAs:", PEM blocks.
printf '%s\n' "$minted" | awk -v dir="$dir" '
  /^X509-SVID:/   { out = dir "/svid.pem";   next }
  /^Private key:/ { out = dir "/key.pem";    next }
  /^Root CAs:/    { out = dir "/bundle.pem"; next }
  out != "" && NF { print > out }
'
for f in svid.pem key.pem bundle.pem; do
  grep -q 'BEGIN' "$dir/$f" 2>/dev/null || { echo "mint-observer-svid.sh: no $f in the output of spire-server x509 mint" >&2; exit 1; }
done
chmod 0644 "$dir/svid.pem" "$dir/bundle.pem"
echo "$id: $dir/svid.pem, $dir/key.pem, $dir/bundle.pem (TTL $TTL)"
