#!/bin/bash
# Inside the dev pod's network namespace (pod.py): the README's `openssl ocsp` checks of the
# three dev PKI levels against the responder on the pod's 127.0.0.1:8080, with the
# certificates the devpki init container wrote into the pod's "data" volume.
set -euo pipefail
pki=$POD_VOLUMES/data/devpki
fail=0
ask() {  # ask URL-PATH DIR CHAIN EXPECTED CERT-ARGS...
  local path=$1 dir=$2 chain=$3 expected=$4; shift 4
  local out
  out=$(openssl ocsp -url "http://127.0.0.1:8080$path" -issuer "$dir/ca.pem" "$@" \
        -VAfile "$dir/ocsp.pem" -CAfile "$dir/$chain" 2>&1) || true
  if grep -q "Response verify OK" <<<"$out" && grep -Eq ": $expected\$" <<<"$out"; then
    printf '   ok: %-28s %s\n' "$path" "$expected" >&2
  else
    printf 'FAIL: %s expected %s:\n%s\n' "$path" "$expected" "$out" >&2
    fail=1
  fi
}
for level in "/ocsp root ca.pem" "/pki/ocsp vault/pki chain.pem" \
             "/pki_int_development/ocsp vault/pki_int_development chain.pem"; do
  read -r path dir chain <<<"$level"
  prefix=""; [ "$dir" = vault/pki_int_development ] && prefix=client-
  ask "$path" "$pki/$dir" "$chain" good -cert "$pki/$dir/leaves/${prefix}good.pem"
  ask "$path" "$pki/$dir" "$chain" revoked -cert "$pki/$dir/leaves/${prefix}revoked.pem"
  ask "$path" "$pki/$dir" "$chain" unknown -serial 0xDEADBEEF
done
exit $fail
