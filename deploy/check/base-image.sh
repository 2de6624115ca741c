#!/bin/bash
# The Containerfile's base image, python:3.11-slim-bookworm, in deploy-check's buildah storage:
# pulled when a registry answers, otherwise made with debootstrap (Debian's Python 3.11 in
# /usr/bin instead of the official image's /usr/local build; same Debian release and glibc).
# Set BASE=debootstrap to skip the pull, DEBIAN_MIRROR to choose the mirror.
source "$(dirname "$0")/lib.sh"

if bh inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
  ok "base image $BASE_IMAGE already in $STORE"
  exit 0
fi
if [ "${BASE:-}" != debootstrap ] && timeout 300 buildah --storage-driver vfs \
    --root "$STORE/root" --runroot "$STORE/run" pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
  ok "pulled $BASE_IMAGE"
  exit 0
fi

say "no registry: making $BASE_IMAGE with debootstrap"
command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap; }
mirror=${DEBIAN_MIRROR:-$(sed -n 's/^URIs: *\(\S*\/debian\)\/*$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)}
mirror=${mirror:-http://deb.debian.org/debian}
rootfs=$DEPLOY_CACHE/rootfs-bookworm
if [ ! -e "$rootfs/.debootstrapped" ]; then  # ~1-3 minutes; kept for the next run
  rm -rf "$rootfs"
  debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates,netbase \
    bookworm "$rootfs" "$mirror" >"$DEPLOY_CACHE/debootstrap.log" 2>&1 \
    || die "debootstrap failed, see $DEPLOY_CACHE/debootstrap.log"
  touch "$rootfs/.debootstrapped"
fi
if [ ! -e "$rootfs/.complete" ]; then
  rm -f "$rootfs"/usr/lib/python3.*/EXTERNALLY-MANAGED "$rootfs"/var/cache/apt/archives/*.deb
  rm -f "$rootfs/etc/apt/sources.list"
  cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<SOURCES
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${mirror%/debian}/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
  for name in python python3; do ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/$name"; done
  for name in pip pip3; do ln -sf /usr/bin/pip3 "$rootfs/usr/local/bin/$name"; done
  # A host that reaches PyPI/Debian through a TLS-intercepting proxy: trust its CA inside too.
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
    chroot "$rootfs" update-ca-certificates >/dev/null
  fi
  touch "$rootfs/.complete"
fi

c=$(bh from scratch)
m=$(bh mount "$c")
cp -a "$rootfs/." "$m/"
rm -f "$m/.complete" "$m/.debootstrapped"
bh umount "$c" >/dev/null
bh config --env LANG=C.UTF-8 \
  --env PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin --cmd python3 "$c"
bh commit -q --rm "$c" "$BASE_IMAGE" >/dev/null
ok "made $BASE_IMAGE from $rootfs"
