"""Levels 2 and 3 of the dev PKI: OpenBao/Vault PKI mounts below the OpenSSL root.

============  ==============================================  ==========
level         certificate                                     key
============  ==============================================  ==========
2             ``pki``: intermediate CA signed by the OpenSSL  Vault
              root (``openssl ca`` with the HSM root key)
2             ``pki`` OCSP signer, issued by ``pki``          HSM ``pki-ocsp``
2             leaves ``good``/``revoked`` from role ``server``  files
3             ``pki_int_development``: intermediate signed    Vault
              by ``pki`` (``root/sign-intermediate``)
3             its OCSP signer                                 HSM ``pki-int-ocsp``
3             leaves ``client-good``/``client-revoked``       files
============  ==============================================  ==========

Everything goes through the same HTTP API an operator would use (blocking helpers from
:mod:`hsmocsp.devpki.bao`); the OCSP signer CSRs are made by ``openssl req`` with the
pkcs11 engine, so the private keys never leave SoftHSM. Files land in
``<devpki>/vault/<mount>/``: ``ca.pem``, ``ocsp.pem``, ``chain.pem`` (the mount's CA up
to and including the OpenSSL root, for ``openssl ocsp -CAfile``/``openssl verify``) and
``leaves/``; the responder's Vault token is ``<devpki>/vault/token`` (mode 0600).

Idempotent: a mount whose default issuer still is ``ca.pem`` is kept with everything
issued from it. When the server lost its data (a dev-mode server restarted, a wiped
storage directory), the mount is built again with new Vault keys, and every file derived
from it is replaced: acceptable for a dev PKI, and the OpenSSL root stays the same.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from hsmocsp.devpki import softhsm
from hsmocsp.devpki.bao import BaoAPI, BaoError, vault_serial
from hsmocsp.devpki.opensslca import BASE_URL, DevPki, cert_spki, load_cert, token_spki
from hsmocsp.devpki.tools import DevPkiError, run, write_private

__all__ = ["MountFiles", "VaultPki", "build_vault_levels", "vault_layout"]

LEVEL2_MOUNT = "pki"
LEVEL3_MOUNT = "pki_int_development"
#: Mount -> HSM key label of its delegated OCSP signer (see opensslca.TOKEN_KEYS).
SIGNER_KEYS = {LEVEL2_MOUNT: "pki-ocsp", LEVEL3_MOUNT: "pki-int-ocsp"}
#: Mount -> (role, names of the leaves written to ``leaves/``; the second one is revoked).
LEAVES = {LEVEL2_MOUNT: ("server", ("good", "revoked")),
          LEVEL3_MOUNT: ("client", ("client-good", "client-revoked"))}  # fmt: skip

RESPONDER_POLICY = "hsmocsp-responder"
MOUNT_MAX_TTL = "87600h"
LEVEL2_DAYS = 1825  # the OpenSSL root lives 3650 days
LEVEL3_TTL = "26280h"  # 3 years, inside level 2
SIGNER_TTL = "8760h"
LEAF_TTL = "720h"
TOKEN_PERIOD = "768h"  # periodic: the responder renews it while it runs
#: Description of the mounts this builder makes; only such mounts are ever deleted.
MOUNT_MARK = "hsmocsp dev PKI (made by hsmocsp-devpki; rebuilt at will)"


@dataclass(frozen=True)
class MountFiles:
    """The files of one Vault mount under ``<devpki>/vault/<mount>/``."""

    mount: str
    directory: Path
    ca_pem: Path
    ocsp_pem: Path
    chain_pem: Path
    leaves_dir: Path
    signer_key_label: str

    @property
    def good_pem(self) -> Path:
        return self.leaves_dir / f"{LEAVES[self.mount][1][0]}.pem"

    @property
    def revoked_pem(self) -> Path:
        return self.leaves_dir / f"{LEAVES[self.mount][1][1]}.pem"

    @property
    def role(self) -> str:
        return LEAVES[self.mount][0]

    @property
    def ocsp_path(self) -> str:
        """The responder's URL path for this mount (as in etc/hsmocsp-dev.yaml)."""
        return f"/{self.mount}/ocsp"


@dataclass(frozen=True)
class VaultPki:
    """What :func:`build_vault_levels` built (all paths absolute)."""

    address: str
    directory: Path
    token_file: Path
    state_file: Path
    level2: MountFiles
    level3: MountFiles
    rebuilt: tuple[str, ...] = ()

    @property
    def mounts(self) -> tuple[MountFiles, MountFiles]:
        return (self.level2, self.level3)


def vault_layout(dev: DevPki) -> tuple[Path, MountFiles, MountFiles]:
    """``(<devpki>/vault, level-2 files, level-3 files)`` without creating anything."""
    top = dev.directory / "vault"

    def files(mount: str) -> MountFiles:
        d = top / mount
        return MountFiles(
            mount=mount,
            directory=d,
            ca_pem=d / "ca.pem",
            ocsp_pem=d / "ocsp.pem",
            chain_pem=d / "chain.pem",
            leaves_dir=d / "leaves",
            signer_key_label=SIGNER_KEYS[mount],
        )

    return top, files(LEVEL2_MOUNT), files(LEVEL3_MOUNT)


# --- small helpers ---------------------------------------------------------------------


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _certs(pem: str | bytes) -> list[x509.Certificate]:
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as err:
        raise DevPkiError(f"Vault returned something that is not a PEM certificate: {err}") from err


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _write_atomic(path: Path, data: bytes, private: bool = False) -> bool:
    """Write ``data`` unless the file already holds exactly that; True if written."""
    if path.exists() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if private:
        write_private(tmp, data)
    else:
        tmp.write_bytes(data)
    tmp.rename(path)
    return True


def _call(api: BaoAPI, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    try:
        return api.call(method, path, body)
    except BaoError as err:
        raise DevPkiError(f"OpenBao at {api.address}: {err}") from err


def _data(api: BaoAPI, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    result = _call(api, method, path, body)
    data = result.get("data") if isinstance(result, dict) else None
    if not isinstance(data, dict):
        raise DevPkiError(f"OpenBao at {api.address}: {method} /v1/{path}: no 'data' in answer")
    return data


def _serial_of(cert: x509.Certificate) -> str:
    return vault_serial(cert.serial_number)


def _vault_knows(api: BaoAPI, mount: str, cert: x509.Certificate) -> dict[str, Any] | None:
    """Vault's record of ``cert`` (``cert/<serial>`` data), or None if the mount lacks it."""
    try:
        data: dict[str, Any] = api.call("GET", f"{mount}/cert/{_serial_of(cert)}")["data"]
    except (BaoError, KeyError, TypeError):
        return None
    got = data.get("certificate")
    if not isinstance(got, str) or _certs(got)[0] != cert:
        return None
    return data


# --- OpenSSL side: the root signs level 2, the HSM keys make CSRs ------------------------


def _openssl_env(dev: DevPki) -> dict[str, str]:
    return softhsm.env_with(dev.softhsm_conf, OPENSSL_CONF=str(dev.openssl_cnf))


def _engine_openssl(dev: DevPki, *args: str) -> bytes:
    """``openssl`` with the pkcs11 engine config of level 1; PIN from the pin file only."""
    return run(["openssl", *args], env=_openssl_env(dev), secrets=(dev.pin(),))


def _level2_extfile(dev: DevPki) -> str:
    """Extensions the OpenSSL root puts on the Vault ``pki`` intermediate.

    ``pathlen:1`` allows exactly level 3 below it; AIA names the root's OCSP handle so
    ``openssl ocsp`` can ask level 1 about level 2.
    """
    return f"""\
[vault_ca_ext]
basicConstraints = critical, CA:true, pathlen:1
keyUsage = critical, keyCertSign, cRLSign, digitalSignature
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
authorityInfoAccess = OCSP;URI:{BASE_URL}/ocsp, caIssuers;URI:{BASE_URL}/ca/root.der
crlDistributionPoints = URI:{BASE_URL}/crl/root.crl
"""


def _sign_with_root(dev: DevPki, csr_pem: str, days: int) -> x509.Certificate:
    """``openssl ca`` with the HSM root key: the CSR becomes a CA cert in the root's index."""
    with tempfile.TemporaryDirectory(prefix="hsmocsp-vault-") as tmp:
        csr, ext, out = Path(tmp) / "req.csr", Path(tmp) / "ext.cnf", Path(tmp) / "out.pem"
        csr.write_text(csr_pem)
        ext.write_text(_level2_extfile(dev))
        _engine_openssl(
            dev, "ca", "-config", str(dev.openssl_cnf),
            "-engine", "pkcs11", "-passin", f"file:{dev.pin_file}",
            "-keyform", "engine", "-keyfile", dev.key_uri(dev.ca_key_label),
            "-batch", "-notext", "-extfile", str(ext), "-extensions", "vault_ca_ext",
            "-days", str(days), "-in", str(csr), "-out", str(out),
        )  # fmt: skip
        return load_cert(out)


def _hsm_csr(dev: DevPki, label: str, cn: str) -> str:
    """A CSR signed by the token key ``label`` (the same invocation as level 1's signers)."""
    with tempfile.TemporaryDirectory(prefix="hsmocsp-csr-") as tmp:
        csr = Path(tmp) / "req.csr"
        _engine_openssl(
            dev, "req", "-config", str(dev.openssl_cnf), "-new",
            "-engine", "pkcs11", "-passin", f"file:{dev.pin_file}",
            "-keyform", "engine", "-key", dev.key_uri(label),
            "-subj", f"/CN={cn}", "-out", str(csr),
        )  # fmt: skip
        return csr.read_text()


# --- Vault side ------------------------------------------------------------------------


def _mount_description(api: BaoAPI, mount: str) -> str | None:
    """The mount's description, or None when there is no such mount."""
    mounts = _data(api, "GET", "sys/mounts")
    entry = mounts.get(f"{mount}/")
    if not isinstance(entry, dict):
        return None
    return str(entry.get("description") or "")


def _mount_ca(api: BaoAPI, mount: str) -> x509.Certificate | None:
    """The mount's default issuer with a key in Vault, or None (no mount / no issuer)."""
    try:
        data = api.call("GET", f"{mount}/issuer/default")["data"]
    except (BaoError, KeyError, TypeError):
        return None
    if not isinstance(data, dict) or not data.get("key_id"):
        return None
    pem = data.get("certificate")
    return _certs(pem)[0] if isinstance(pem, str) else None


def _fresh_mount(api: BaoAPI, mount: str) -> None:
    """(Re)create ``mount`` empty: the old one, if any, goes with all its keys.

    Only a mount this builder made (marked by its description) is ever deleted: pointed
    at a Vault that holds someone's real ``pki``, we stop instead.
    """
    description = _mount_description(api, mount)
    if description is not None:
        if description != MOUNT_MARK:
            raise DevPkiError(
                f"{api.address} already has a mount {mount!r} that hsmocsp-devpki did not "
                f"make (description {description!r}); refusing to replace it"
            )
        _call(api, "DELETE", f"sys/mounts/{mount}")
    _call(api, "POST", f"sys/mounts/{mount}", {"type": "pki", "description": MOUNT_MARK})
    _call(api, "POST", f"sys/mounts/{mount}/tune", {"max_lease_ttl": MOUNT_MAX_TTL})


def _generate_csr(api: BaoAPI, mount: str, cn: str, key_type: str, key_bits: int) -> str:
    data = _data(
        api, "POST", f"{mount}/intermediate/generate/internal",
        {"common_name": cn, "key_type": key_type, "key_bits": key_bits},
    )  # fmt: skip
    csr = data.get("csr")
    if not isinstance(csr, str):
        raise DevPkiError(f"{mount}/intermediate/generate/internal returned no CSR")
    return csr


def _set_signed(api: BaoAPI, mount: str, cert: x509.Certificate) -> None:
    # Only the mount's own certificate: importing the chain would add the parents as
    # (keyless) issuers of this mount, and the responder serves every issuer of a mount.
    _call(api, "POST", f"{mount}/intermediate/set-signed", {"certificate": _pem(cert).decode()})


def _urls(mount: str) -> dict[str, list[str]]:
    return {
        "issuing_certificates": [f"{BASE_URL}/ca/{mount}.der"],
        "crl_distribution_points": [f"{BASE_URL}/crl/{mount}.crl"],
        "ocsp_servers": [f"{BASE_URL}/{mount}/ocsp"],
    }


def _configure(api: BaoAPI, mount: str, leaf_role: str) -> None:
    """URLs and roles; rewritten on every build (configuration, not hierarchy)."""
    urls = _urls(mount)
    current = _data(api, "GET", f"{mount}/config/urls")
    if any(current.get(k) != v for k, v in urls.items()):
        _call(api, "POST", f"{mount}/config/urls", dict(urls))
    _call(api, "POST", f"{mount}/roles/ocsp-signer", {
        "allow_any_name": True, "enforce_hostnames": False, "use_csr_common_name": True,
        "key_type": "any",
        "use_csr_sans": False, "server_flag": False, "client_flag": False,
        "key_usage": ["DigitalSignature"], "ext_key_usage": ["OCSPSigning"],
        "max_ttl": SIGNER_TTL, "ttl": SIGNER_TTL, "no_store": False,
    })  # fmt: skip
    _call(api, "POST", f"{mount}/roles/{leaf_role}", {
        "allow_any_name": True, "enforce_hostnames": False, "key_type": "ec", "key_bits": 256,
        "server_flag": leaf_role == "server", "client_flag": True,
        "key_usage": ["DigitalSignature"], "max_ttl": LEAF_TTL, "ttl": LEAF_TTL,
        "no_store": False,
    })  # fmt: skip


def _ensure_signer(dev: DevPki, api: BaoAPI, files: MountFiles, ca: x509.Certificate) -> None:
    """The mount's OCSP signer certificate for the HSM key; kept while still valid."""
    want_spki = token_spki(dev, files.signer_key_label)
    if files.ocsp_pem.exists():
        cert = load_cert(files.ocsp_pem)
        same_key = cert_spki(cert) == want_spki
        if same_key and _issued_by(cert, ca) and _vault_knows(api, files.mount, cert):
            return
    csr = _hsm_csr(dev, files.signer_key_label, f"hsmocsp dev OCSP signer {files.mount}")
    data = _data(api, "POST", f"{files.mount}/sign/ocsp-signer", {"csr": csr, "ttl": SIGNER_TTL})
    cert = _certs(data["certificate"])[0]
    if cert_spki(cert) != want_spki:
        raise DevPkiError(f"{files.mount}: signed OCSP certificate does not hold the HSM key")
    _write_atomic(files.ocsp_pem, _pem(cert))


def _ensure_leaf(
    api: BaoAPI, files: MountFiles, ca: x509.Certificate, chain: bytes, name: str, revoked: bool
) -> None:
    """``leaves/<name>.pem`` (cert), ``.key`` (0600), ``-chain.pem`` (cert + CAs + root)."""
    pem, key = files.leaves_dir / f"{name}.pem", files.leaves_dir / f"{name}.key"
    cert: x509.Certificate | None = None
    record: dict[str, Any] | None = None
    if pem.exists() and key.exists():
        kept = load_cert(pem)
        record = _vault_knows(api, files.mount, kept) if _issued_by(kept, ca) else None
        cert = kept if record is not None else None
    if cert is None:
        data = _data(api, "POST", f"{files.mount}/issue/{files.role}", {
            "common_name": f"{name}.{files.mount}.hsmocsp.test", "ttl": LEAF_TTL,
        })  # fmt: skip
        cert = _certs(data["certificate"])[0]
        _write_atomic(key, data["private_key"].encode(), private=True)
        _write_atomic(pem, _pem(cert))
        record = {}
    _write_atomic(files.leaves_dir / f"{name}-chain.pem", _pem(cert) + chain)
    if revoked and not (record or {}).get("revocation_time"):
        _call(api, "POST", f"{files.mount}/revoke", {"serial_number": _serial_of(cert)})


def _ensure_token(api: BaoAPI, token_file: Path, mounts: Sequence[str]) -> None:
    """A periodic token that may only read the PKI mounts, for the responder's token_file."""
    rules = "\n".join(f'path "{m}/*" {{ capabilities = ["read", "list"] }}' for m in mounts)
    try:
        current = api.call("GET", f"sys/policies/acl/{RESPONDER_POLICY}").get("data") or {}
    except BaoError:
        current = {}
    if current.get("policy") != rules:
        _call(api, "PUT", f"sys/policies/acl/{RESPONDER_POLICY}", {"policy": rules})
    if token_file.exists():
        old = token_file.read_text().strip()
        try:
            info = api.call("POST", "auth/token/lookup", {"token": old})["data"]
            if RESPONDER_POLICY in (info.get("policies") or []):
                return
        except (BaoError, KeyError, TypeError):
            pass
    auth = _call(api, "POST", "auth/token/create-orphan", {
        "policies": [RESPONDER_POLICY], "period": TOKEN_PERIOD, "renewable": True,
        "display_name": "hsmocsp-dev",
    })["auth"]  # fmt: skip
    _write_atomic(token_file, (auth["client_token"] + "\n").encode(), private=True)


# --- the builder -----------------------------------------------------------------------


def _ensure_mount(
    dev: DevPki,
    api: BaoAPI,
    files: MountFiles,
    parent: x509.Certificate,
    make_ca: Any,
) -> tuple[x509.Certificate, bool]:
    """Keep the mount if Vault's default issuer still is ``ca.pem`` under ``parent``.

    Otherwise (data lost, files removed, parent CA re-made) build it anew.
    """
    kept = load_cert(files.ca_pem) if files.ca_pem.exists() else None
    current = _mount_ca(api, files.mount)
    if kept is not None and current == kept and _issued_by(kept, parent):
        # Its CA chains to our root, so it is ours even if made before mounts were marked.
        if _mount_description(api, files.mount) != MOUNT_MARK:
            _call(api, "POST", f"sys/mounts/{files.mount}/tune", {"description": MOUNT_MARK})
        return kept, False
    _fresh_mount(api, files.mount)
    cert: x509.Certificate = make_ca()
    _set_signed(api, files.mount, cert)
    if _mount_ca(api, files.mount) != cert:
        raise DevPkiError(f"{files.mount}: set-signed did not make the new CA the default issuer")
    # Everything issued by the old CA is void: let the later steps issue it again.
    for old in (files.ocsp_pem, *files.leaves_dir.glob("*")):
        old.unlink(missing_ok=True)
    _write_atomic(files.ca_pem, _pem(cert))
    return cert, True


def build_vault_levels(dev: DevPki, address: str, token: str) -> VaultPki:
    """Build (or complete) levels 2 and 3 on the OpenBao/Vault at ``address``.

    ``token`` must be allowed to mount secrets engines, write policies and create
    tokens (a root token on a dev server). Idempotent; raises
    :class:`~hsmocsp.devpki.tools.DevPkiError` naming the step that failed.
    """
    top, l2, l3 = vault_layout(dev)
    for files in (l2, l3):
        files.leaves_dir.mkdir(parents=True, exist_ok=True)
    api = BaoAPI(address, token)
    try:
        api.call("GET", "sys/health", token=False)
    except BaoError as err:
        raise DevPkiError(f"OpenBao/Vault at {address} does not answer: {err}") from err
    root = load_cert(dev.ca_pem)
    rebuilt: list[str] = []

    def level2_ca() -> x509.Certificate:
        csr = _generate_csr(api, l2.mount, "hsmocsp dev Vault pki CA", "rsa", 2048)
        cert = _sign_with_root(dev, csr, LEVEL2_DAYS)
        if not _issued_by(cert, root):
            raise DevPkiError("openssl ca produced a pki certificate the root did not sign")
        return cert

    ca2, new2 = _ensure_mount(dev, api, l2, root, level2_ca)
    if new2:
        rebuilt.append(l2.mount)

    def level3_ca() -> x509.Certificate:
        csr = _generate_csr(api, l3.mount, "hsmocsp dev Vault pki_int_development CA", "ec", 256)
        data = _data(api, "POST", f"{l2.mount}/root/sign-intermediate", {
            "csr": csr, "common_name": "hsmocsp dev Vault pki_int_development CA",
            "ttl": LEVEL3_TTL, "max_path_length": 0, "format": "pem",
        })  # fmt: skip
        return _certs(data["certificate"])[0]

    ca3, new3 = _ensure_mount(dev, api, l3, ca2, level3_ca)
    if new3:
        rebuilt.append(l3.mount)

    chains = {l2.mount: _pem(ca2) + _pem(root), l3.mount: _pem(ca3) + _pem(ca2) + _pem(root)}
    for files, ca in ((l2, ca2), (l3, ca3)):
        _write_atomic(files.chain_pem, chains[files.mount])
        _configure(api, files.mount, files.role)
        _ensure_signer(dev, api, files, ca)
        good, revoked = LEAVES[files.mount][1]
        _ensure_leaf(api, files, ca, chains[files.mount], good, revoked=False)
        _ensure_leaf(api, files, ca, chains[files.mount], revoked, revoked=True)

    token_file = top / "token"
    _ensure_token(api, token_file, (l2.mount, l3.mount))
    state_file = top / "state.json"
    state = {
        "address": address.rstrip("/"),
        "mounts": {
            f.mount: {"ca_serial": _serial_of(ca), "ca_subject": ca.subject.rfc4514_string()}
            for f, ca in ((l2, ca2), (l3, ca3))
        },
    }
    _write_atomic(state_file, (json.dumps(state, indent=2, sort_keys=True) + "\n").encode())
    return VaultPki(
        address=address.rstrip("/"),
        directory=top,
        token_file=token_file,
        state_file=state_file,
        level2=l2,
        level3=l3,
        rebuilt=tuple(rebuilt),
    )
