#!/bin/bash
# deploy-check, systemd: the documented install (deploy/systemd/install.sh) on a bare Debian
# root (the base image: Debian + python3-venv, no hsmocsp, no systemd), twice (idempotent; the
# second time with a Vault secret_id present); then in that root:
#   - twistd finds the plugin as user hsmocsp with /opt read-only, without rewriting the cache;
#   - the unit's hardening lets pyOpenSSL make its callbacks (HTTPS to Vault); with
#     MemoryDenyWriteExecute=yes it would not (PR_SET_MDWE, Linux >= 6.3);
#   - the unit loads only the credentials every host has (the PIN);
#   - systemd-analyze verify (silent) and security (exposure at most $MAX_EXPOSURE).
source "$(dirname "$0")/lib.sh"
MAX_EXPOSURE=${MAX_EXPOSURE:-3.0}
make_context
context=$WORK/context
"$(dirname "$0")/base-image.sh"

c=$(bh from --pull-never -q --name check-systemd-host "$BASE_IMAGE" 2>/dev/null || true)
[ -n "$c" ] || { bh rm check-systemd-host >/dev/null; c=$(bh from --pull-never -q --name check-systemd-host "$BASE_IMAGE"); }
trap 'bh rm "$c" >/dev/null 2>&1 || true' EXIT
src=$WORK/systemd-src
rm -rf "$src" && cp -a "$context" "$src"
run() { bh run --isolation chroot --volume "$src:/src" "$c" -- "$@"; }

say "install.sh on a bare Debian root"
run /src/deploy/systemd/install.sh >"$WORK/systemd-install.log" 2>&1 \
  || { tail -20 "$WORK/systemd-install.log" >&2; die "deploy/systemd/install.sh failed"; }
ok "first install"
run sh -c 'umask 077; echo s3cr3t-id > /etc/hsmocsp/credentials/vault-secret-id'
run /src/deploy/systemd/install.sh >>"$WORK/systemd-install.log" 2>&1 \
  || { tail -20 "$WORK/systemd-install.log" >&2; die "install.sh failed the second time"; }
if ! run test -f /etc/systemd/system/hsmocsp.service.d/vault-approle.conf; then
  fail "install.sh did not add the AppRole drop-in with a secret_id present"
elif ! run test -s /etc/hsmocsp/hsmocsp.yaml; then
  fail "install.sh left no /etc/hsmocsp/hsmocsp.yaml"
else
  ok "second install (idempotent), AppRole drop-in added"
fi

root=$(bh mount "$c")
uid=$(chroot "$root" id -u hsmocsp) gid=$(chroot "$root" id -g hsmocsp)
unit=$root/etc/systemd/system/hsmocsp.service
exec_start=$(sed -n 's/^ExecStart=\([^ ]*\).*/\1/p' "$unit")
[ -x "$root$exec_start" ] || fail "ExecStart $exec_start does not exist after install.sh"

# twistd as the service user with the tree read-only (ProtectSystem=strict).
out=$(unshare -m --propagation private sh -c '
  mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && mount -t proc proc "$1/proc"
  exec chroot --userspec="$2" "$1" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/ \
    "$3" hsmocsp --help' sh "$root" "$uid:$gid" "$exec_start" 2>&1) || true
if ! grep -q -- "--config" <<<"$out"; then
  fail "twistd hsmocsp --help as hsmocsp: no hsmocsp plugin: $out"
elif grep -q "Unable to write to plugin cache" <<<"$out"; then
  fail "twistd rewrites its plugin cache: $out"
else
  ok "twistd hsmocsp --help as $uid:$gid on a read-only tree, cache not rewritten"
fi

# MemoryDenyWriteExecute vs pyOpenSSL's cffi callbacks.
mdwe=0
grep -Eiq '^MemoryDenyWriteExecute=(yes|true|on|1)' "$unit" && mdwe=1
out=$(chroot --userspec="$uid:$gid" "$root" /opt/hsmocsp/bin/python -c '
import ctypes, sys
if sys.argv[1] == "1":
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
        sys.exit("PR_SET_MDWE unsupported (Linux < 6.3): cannot check MemoryDenyWriteExecute")
from OpenSSL import SSL
ctx = SSL.Context(SSL.TLS_METHOD)
ctx.set_alpn_select_callback(lambda conn, protos: protos[0])
ctx.set_verify(SSL.VERIFY_PEER, lambda *args: True)
print("callbacks ok")' "$mdwe" 2>&1) \
  && ok "pyOpenSSL callbacks work under the unit's memory policy (MemoryDenyWriteExecute off)" \
  || fail "with the unit's MemoryDenyWriteExecute, pyOpenSSL fails (HTTPS to Vault): ${out##*$'\n'}"

creds=$(sed -n 's/^LoadCredential=\([^:]*\):.*/\1/p' "$unit" | sort -u | tr '\n' ' ')
before=$failures
[ "$creds" = "hsm-pin " ] || fail "the unit loads credentials [$creds]; a host without a Vault AppRole handle fails (243/CREDENTIALS)"
grep -q '^RestartPreventExitStatus=77 78$' "$unit" || fail "no RestartPreventExitStatus=77 78"
grep -q '^LimitNOFILE=' "$unit" || fail "no LimitNOFILE="
[ "$failures" != "$before" ] \
  || ok "credentials: $creds; RestartPreventExitStatus=77 78; $(grep '^LimitNOFILE=' "$unit")"

# systemd-analyze needs the unit tree and every Exec binary inside the root.
mkdir -p "$root/usr/lib/systemd"
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
for bin in $(sed -n 's/^Exec[A-Za-z]*=[-@!+:]*\([^ ]*\).*/\1/p' "$unit" "$root"/etc/systemd/system/hsmocsp.service.d/*.conf 2>/dev/null); do
  [ -e "$root$bin" ] || { mkdir -p "$root$(dirname "$bin")"; cp "$bin" "$root$bin"; }
done
out=$(systemd-analyze verify --root="$root" "$unit" 2>&1) && [ -z "$out" ] \
  && ok "systemd-analyze verify (with the AppRole drop-in)" \
  || fail "systemd-analyze verify: $out"
sec=$(systemd-analyze security --offline=true --root="$root" "$unit" 2>&1 | tail -1)
exposure=$(sed -n 's/.*exposure level for .*: \([0-9.]*\).*/\1/p' <<<"$sec")
if [ -n "$exposure" ] && awk -v e="$exposure" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(e <= m) }'; then
  ok "systemd-analyze security: $sec"
else
  fail "systemd-analyze security: exposure above $MAX_EXPOSURE: $sec"
fi
bh umount "$c" >/dev/null
finish
