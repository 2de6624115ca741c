#!/bin/bash
# deploy-check, images: build the targets, then
#   - every image: Twisted's plugin cache is 2 whole seconds newer than every plugin module
#     (the layer keeps whole seconds), and every installed Python package is pinned in
#     constraints.txt;
#   - runtime: no PKCS#11 module or SoftHSM inside; run read-only as 10001 with a file-signer
#     config; `openssl ocsp` verifies good and revoked; the log has no plugin-cache write;
#   - opensc and dev: OpenSC's module loads (C_Initialize through libpcsclite, no pcscd here:
#     an empty slot list);
#   - dev: the dev overlay's pod (OpenBao sidecar, devpki init, responder) answers all three
#     levels (dev-levels.sh); debug: the same with twistd under debugpy, and the debugger port.
source "$(dirname "$0")/lib.sh"
HERE=$(cd "$(dirname "$0")" && pwd)
export TARGETS=${TARGETS:-runtime opensc dev debug}
"$HERE/build-images.sh"
img() { echo "localhost/hsmocsp:check-$1"; }

say "plugin cache and pinned versions in each image"
for target in $TARGETS; do
  c=$(bh from --pull-never -q "$(img "$target")")
  root=$(bh mount "$c")
  python3 - "$root" "$target" "$REPO/deploy/container/constraints.txt" <<'PY' || fail "image $target"
import math, re, sys
from pathlib import Path
root, target, constraints = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
for d in root.glob("opt/hsmocsp/lib/python3*/site-packages/twisted/plugins"):
    cache = d / "dropin.cache"
    if not cache.is_file():
        sys.exit(f"{target}: no {cache.relative_to(root)}")
    # Twisted rewrites the cache unless it is newer than every module; 2 whole seconds
    # newer stays newer however a filesystem rounds (hsmocsp.plugincache.MARGIN).
    cached = math.floor(cache.stat().st_mtime)
    stale = [p.name for p in d.glob("*.py") if p.name != "__init__.py"
             and math.floor(p.stat().st_mtime) > cached - 2]
    if stale:
        sys.exit(f"{target}: dropin.cache is not 2 whole seconds newer than {stale}: "
                 "twistd may rewrite it at every start")
pins = {}
for line in (constraints.read_text() if constraints.is_file() else "").splitlines():
    if line and not line.startswith("#"):
        name, version = line.split("==")
        pins[re.sub(r"[-_.]+", "-", name).lower()] = version
unpinned = []
for meta in root.glob("opt/hsmocsp/lib/python3*/site-packages/*.dist-info/METADATA"):
    text = meta.read_text(errors="replace")
    name = re.search(r"^Name: (.+)$", text, re.M).group(1).strip()
    version = re.search(r"^Version: (.+)$", text, re.M).group(1).strip()
    key = re.sub(r"[-_.]+", "-", name).lower()
    if key not in ("hsmocsp", "pip", "setuptools") and pins.get(key) != version:
        unpinned.append(f"{name}=={version} (pinned: {pins.get(key)})")
if unpinned:
    sys.exit(f"{target}: not as pinned in constraints.txt: {', '.join(unpinned)}")
print(f"   ok: {target}: plugin cache valid, every package as pinned", file=sys.stderr)
PY
  bh rm "$c" >/dev/null
done

netns=hsmocsp-check-$$
ip netns add "$netns"
trap 'ip netns delete "$netns" 2>/dev/null || true' EXIT
ip netns exec "$netns" ip link set lo up

if [[ " $TARGETS " == *" runtime "* ]]; then
  say "runtime: read-only root, uid 10001, file signer, openssl ocsp"
  out=$("$HERE/run-image.sh" "$(img runtime)" -- /bin/sh -c \
    'ls /usr/lib/softhsm /usr/lib/x86_64-linux-gnu/opensc-pkcs11.so 2>/dev/null; id -u; \
     touch /x 2>&1 | sed "s/.*Read-only.*/read-only/"')
  [ "$out" = $'10001\nread-only' ] || fail "runtime image: expected no PKCS#11 module, uid 10001 and a read-only root, got: $out"
  prod=$WORK/prod
  rm -rf "$prod" && mkdir -p "$prod/data"
  "$PYVENV/bin/python" "$HERE/filepki.py" "$prod" 8080
  chown 10001:10001 "$prod/data" && chmod 0750 "$prod/data"
  setsid ip netns exec "$netns" "$HERE/run-image.sh" "$(img runtime)" \
    -v "$prod/hsmocsp.yaml:/etc/hsmocsp/hsmocsp.yaml:ro" -v "$prod/pki:/etc/pki/root:ro" \
    -v "$prod/data:/var/lib/hsmocsp" >"$prod/log" 2>&1 &
  pid=$!
  for _ in $(seq 120); do
    ip netns exec "$netns" curl -fsS -o /dev/null http://127.0.0.1:8080/readyz 2>/dev/null && break
    kill -0 "$pid" 2>/dev/null || { cat "$prod/log" >&2; fail "the runtime image exited"; break; }
    sleep 1
  done
  out=$(cd "$prod" && ip netns exec "$netns" openssl ocsp -url http://127.0.0.1:8080/ocsp \
    -issuer pki/ca.pem -cert good.pem -cert revoked.pem -CAfile pki/ca.pem 2>&1) || true
  rss=$(ps -o rss= -s "$pid" | awk '{ s += $1 } END { printf "%.0f", s / 1024 }')
  kill -TERM -- -"$pid" 2>/dev/null; wait "$pid" || true
  if ! { grep -q "Response verify OK" <<<"$out" && grep -q "good.pem: good" <<<"$out" \
         && grep -q "revoked.pem: revoked" <<<"$out"; }; then
    fail "runtime: openssl ocsp: $out"
  elif grep -Eq "Unable to write to plugin cache|Traceback" "$prod/log"; then
    cat "$prod/log" >&2; fail "runtime: the log shows a plugin-cache write or a traceback"
  else
    ok "runtime answers good and revoked, verified by openssl ocsp; ${rss} MiB RSS; clean log"
  fi
fi

for target in opensc dev; do
  [[ " $TARGETS " == *" $target "* ]] || continue
  say "$target: OpenSC's PKCS#11 module (Nitrokey HSM 2) loads"
  out=$("$HERE/run-image.sh" "$(img "$target")" -- python -c '
import PyKCS11
lib = PyKCS11.PyKCS11Lib()
lib.load("/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so")
print(lib.getInfo().libraryDescription.strip(), lib.getSlotList())' 2>&1) \
    && ok "$target: $out (no pcscd here, so no slots)" \
    || fail "$target: OpenSC's module does not load: ${out##*$'\n'}"
done

for target in dev debug; do
  [[ " $TARGETS " == *" $target "* ]] || continue
  say "$target: the $target overlay's pod, all three levels"
  "$KUBECTL" kustomize "$REPO/deploy/k8s/overlays/$target" >"$WORK/$target.yaml"
  check=("$HERE/dev-levels.sh")
  [ "$target" = debug ] && check=(sh -c '"$0" && curl -s -o /dev/null --max-time 2 telnet://127.0.0.1:5678 </dev/null; rc=$?; [ $rc = 0 ] || [ $rc = 28 ] || { echo "FAIL: debugpy port 5678 closed ($rc)" >&2; exit 1; }; echo "   ok: debugpy listens on 127.0.0.1:5678" >&2' "$HERE/dev-levels.sh")
  "$PYVENV/bin/python" "$HERE/pod.py" "$WORK/$target.yaml" "$WORK/pod-$target" \
    "hsmocsp:$target=$(img "$target")" -- "${check[@]}" || fail "$target pod"
done
bh rm --all >/dev/null 2>&1 || true
finish
