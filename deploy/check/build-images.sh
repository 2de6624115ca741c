#!/bin/bash
# Build the images deploy-check runs: TARGETS (default "runtime opensc dev") from
# deploy/container/Containerfile, with buildah, from a clean context (the files git tracks or
# would track, as they are in the working tree: no .venv/, var/, caches, dropin.cache).
# Tags: localhost/hsmocsp:check-<target>. Logs: $WORK/build-<target>.log.
source "$(dirname "$0")/lib.sh"

TARGETS=${TARGETS:-runtime opensc dev}
make_context
context=$WORK/context
"$(dirname "$0")/base-image.sh"

for target in $TARGETS; do
  say "building target $target"
  start=$(date +%s)
  # --layers=false: each build from scratch (a dev build after a runtime build in the same
  # storage failed with --layers, see ../shared/deploy-tooling.md).
  if ! bh bud --isolation chroot --pull=never --layers=false \
      -f deploy/container/Containerfile --target "$target" \
      -t "localhost/hsmocsp:check-$target" "$context" >"$WORK/build-$target.log" 2>&1; then
    tail -20 "$WORK/build-$target.log" >&2
    die "build of target $target failed (log: $WORK/build-$target.log)"
  fi
  size=$(bh inspect --type image --format '{{.Size}}' "localhost/hsmocsp:check-$target" 2>/dev/null || echo "?")
  ok "target $target built in $(( $(date +%s) - start )) s"
done
# Old images of earlier runs only take space (vfs copies every layer).
bh rm --all >/dev/null 2>&1 || true
bh rmi --prune >/dev/null 2>&1 || true
bh images >&2
