#!/bin/sh
# Install hsmocsp as a systemd service on a Debian host (bookworm or later), from this
# checkout: run as root, from anywhere. Idempotent: run it again to upgrade.
#
#   user/group hsmocsp (system), venv /opt/hsmocsp with a NON-editable install of this
#   checkout at the image's pinned versions (deploy/container/constraints.txt), Twisted's
#   plugin cache written once (/opt is read-only under ProtectSystem=strict),
#   /etc/hsmocsp/hsmocsp.yaml (etc/hsmocsp.yaml, only if there is none), the root-only
#   /etc/hsmocsp/credentials/, the unit, and the Vault AppRole drop-in when
#   /etc/hsmocsp/credentials/vault-secret-id exists.
# Needs network access to Debian (python3-venv) and PyPI. PREFIX=/opt/hsmocsp by default; the
# unit names that path, so keep it.
set -eu
src=$(cd "$(dirname "$0")/../.." && pwd)
PREFIX=${PREFIX:-/opt/hsmocsp}
[ "$(id -u)" = 0 ] || { echo "install.sh: run as root" >&2; exit 1; }

if ! dpkg-query -W -f='${Status}' python3-venv 2>/dev/null | grep -q "ok installed"; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
fi
getent group hsmocsp >/dev/null || groupadd --system hsmocsp
getent passwd hsmocsp >/dev/null || useradd --system --gid hsmocsp \
  --home-dir /var/lib/hsmocsp --no-create-home --shell /usr/sbin/nologin hsmocsp

[ -x "$PREFIX/bin/python" ] || python3 -m venv "$PREFIX"
# Not -e: an editable install leaves the plugin in the checkout, where twistd does not look.
# PIP_CONSTRAINT also pins the build backend pip fetches for building hsmocsp.
PIP_CONSTRAINT="$src/deploy/container/constraints.txt" \
  "$PREFIX/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir \
  --only-binary=:all: --no-binary=hsmocsp "$src"
"$PREFIX/bin/python" -m hsmocsp.plugincache
"$PREFIX/bin/twistd" hsmocsp --help >/dev/null

install -d -m 0750 -o root -g hsmocsp /etc/hsmocsp
[ -e /etc/hsmocsp/hsmocsp.yaml ] \
  || install -m 0640 -o root -g hsmocsp "$src/etc/hsmocsp.yaml" /etc/hsmocsp/hsmocsp.yaml
install -d -m 0700 -o root -g root /etc/hsmocsp/credentials
install -m 0644 "$src/etc/hsmocsp.service" /etc/systemd/system/hsmocsp.service
if [ -e /etc/hsmocsp/credentials/vault-secret-id ]; then
  install -d -m 0755 /etc/systemd/system/hsmocsp.service.d
  install -m 0644 "$src/deploy/systemd/vault-approle.conf" \
    /etc/systemd/system/hsmocsp.service.d/vault-approle.conf
fi
if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi

echo "installed hsmocsp in $PREFIX. Next:"
[ -e /etc/hsmocsp/credentials/hsm-pin ] \
  || echo "  put the PIN in /etc/hsmocsp/credentials/hsm-pin (mode 0600, root)"
echo "  edit /etc/hsmocsp/hsmocsp.yaml, then: systemctl enable --now hsmocsp"
