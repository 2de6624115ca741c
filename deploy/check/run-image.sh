#!/bin/bash
# Run an image the way a Kubernetes pod with readOnlyRootFilesystem and runAsUser runs it,
# without a container engine: the image's root filesystem bind-mounted read-only in a private
# mount namespace, /dev, /proc, a tmpfs /tmp, the given volumes, then chroot as the image's
# USER with only the image's environment (+ -e), its ENTRYPOINT and CMD (or -- COMMAND...).
# Host network: the config must listen on 127.0.0.1.
#
#   run-image.sh IMAGE [-v SRC:DST[:ro]]... [-e NAME=VALUE]... [-u UID:GID] [-a] [-- COMMAND...]
#
# -- COMMAND replaces ENTRYPOINT and CMD (Kubernetes' command:); with -a it replaces only CMD
# (args:). Runs in the foreground; the mounts vanish with the process. Every run of one image
# shares one buildah container (its root is only ever mounted read-only); remove them with
# `buildah rm --all` (build-images.sh and run.sh do).
source "$(dirname "$0")/lib.sh"

image=$1; shift
volumes=() envs=() user="" command=() args_only=""
while [ $# -gt 0 ]; do
  case $1 in
    -v) volumes+=("$2"); shift 2 ;;
    -e) envs+=("$2"); shift 2 ;;
    -u) user=$2; shift 2 ;;
    -a) args_only=1; shift ;;
    --) shift; command=("$@"); break ;;
    *) die "run-image.sh: unknown argument $1" ;;
  esac
done

config=$(bh inspect --type image "$image")
field() { python3 -c 'import json,sys; c=json.loads(sys.argv[1])["OCIv1"]["config"]
v=c.get(sys.argv[2]) or []; print("\0".join(v) if isinstance(v, list) else v, end="")' "$config" "$1"; }
mapfile -d '' image_env < <(field Env)
mapfile -d '' entry < <(field Entrypoint)
mapfile -d '' cmd < <(field Cmd)
if [ -n "$args_only" ]; then
  command=("${entry[@]}" "${command[@]}")
elif [ ${#command[@]} -eq 0 ]; then
  command=("${entry[@]}" "${cmd[@]}")
fi
user=${user:-$(field User)}
[ -n "$user" ] && [ "${user%%:*}" != 0 ] || die "$image runs as root (USER '$user')"
workdir=$(field WorkingDir); workdir=${workdir:-/}

mnt=$(mktemp -d "${TMPDIR:-/tmp}/hsmocsp-root.XXXXXX")
trap 'rmdir "$mnt"' EXIT
trap 'exit 143' TERM INT HUP
c=check-$(printf %s "$image" | tr -c 'a-zA-Z0-9_.-' -)
bh inspect --type container "$c" >/dev/null 2>&1 || bh from --pull-never -q --name "$c" "$image" >/dev/null
root=$(bh mount "$c")
# Mount points, as the kubelet makes them (in this container's own copy of the image).
for v in "${volumes[@]}"; do
  IFS=: read -r src dst _ <<<"$v"
  if [ -d "$src" ]; then mkdir -p "$root$dst"; else mkdir -p "$root$(dirname "$dst")"; touch "$root$dst"; fi
done

# shellcheck disable=SC2016
unshare -m --propagation private /bin/bash -euc '
  root=$1 mnt=$2 user=$3 workdir=$4 nvol=$5 nenv=$6; shift 6
  mount --bind "$root" "$mnt"
  mount -o remount,bind,ro "$mnt"
  mount --rbind /dev "$mnt/dev"
  mount -t proc proc "$mnt/proc"
  mount -t tmpfs -o mode=1777,size=16m tmpfs "$mnt/tmp"
  for _ in $(seq "$nvol"); do
    IFS=: read -r src dst mode <<<"$1"; shift
    mount --bind "$src" "$mnt$dst"
    [ "$mode" = ro ] && mount -o remount,bind,ro "$mnt$dst"
  done
  envs=("${@:1:$nenv}"); shift "$nenv"
  exec chroot --userspec="$user" "$mnt" /usr/bin/env -i -C "$workdir" "${envs[@]}" "$@"
' run-image "$root" "$mnt" "$user" "$workdir" "${#volumes[@]}" "$(( ${#image_env[@]} + ${#envs[@]} ))" \
  "${volumes[@]}" "${image_env[@]}" "${envs[@]}" "${command[@]}"
