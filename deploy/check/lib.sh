# Shared by the deploy-check scripts (sourced, not run). Bash, run as root (buildah, chroot).
#
# Downloads and the base image are cached in $DEPLOY_CACHE (kept between runs); everything a
# run makes goes to $WORK (var/deploy-check/, removed at the start of the next run).

set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DEPLOY_CACHE=${DEPLOY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hsmocsp-deploy}
WORK=${WORK:-$REPO/var/deploy-check}
TOOLS=$DEPLOY_CACHE/tools
PYVENV=$DEPLOY_CACHE/venv
HELM=$TOOLS/helm/helm
KUBECTL=$TOOLS/kubectl/kubectl
# One private buildah storage: `rm -rf` it to start again.
STORE=$DEPLOY_CACHE/buildah
BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm

say() { printf '\033[1m== %s\033[0m\n' "$*" >&2; }
ok() { printf '   ok: %s\n' "$*" >&2; }
die() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
# A failed check that does not stop the others; `finish` exits 1 if there was any.
failures=0
fail() { printf 'FAIL: %s\n' "$*" >&2; failures=$((failures + 1)); }
finish() { [ "$failures" = 0 ] || die "$failures check(s) failed"; }

bh() { buildah --storage-driver vfs --root "$STORE/root" --runroot "$STORE/run" "$@"; }

# $WORK/context: the files git tracks or would track (not ignored), as in the working tree:
# what an image build or a fresh clone sees (no .venv/, var/, caches, dropin.cache).
make_context() {
  local context=$WORK/context
  mkdir -p "$WORK" && rm -rf "$context" && mkdir -p "$context"
  (cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
    | xargs -0 -I{} sh -c '[ -e "{}" ] && printf "%s\0" "{}"' | tar --null -T - -cf -) \
    | tar -C "$context" -xf -
}
