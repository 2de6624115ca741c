"""Level 1 of the dev PKI: an ``openssl ca`` root CA whose keys live in SoftHSM.

Every private-key operation goes through OpenSSL's ``pkcs11`` engine (libp11,
``libengine-pkcs11-openssl``) with a key URI such as
``pkcs11:token=hsmocsp-dev;object=root-ca;type=private``; the engine's module path is set
in the ``openssl.cnf`` written here, the token directory by ``SOFTHSM2_CONF``, and the PIN
comes from ``-passin file:<pin file>`` (never argv, never the URI). The result is the
layout ``openssl ocsp`` and hsmocsp's index source both read: ``index.txt``, ``ca.pem``,
delegated OCSP signer certificates, a CRL.

Everything is idempotent: what exists is kept byte for byte, only what is missing is made.
"""

from __future__ import annotations

import re
import secrets
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from hsmocsp.devpki import softhsm
from hsmocsp.devpki.tools import DevPkiError, MissingToolError, require_tool, run, write_private
from hsmocsp.sources.index import OPENSSL_REASONS

TOKEN_LABEL = softhsm.DEFAULT_TOKEN_LABEL
BASE_URL = "http://127.0.0.1:8080"

#: label -> (CKA_ID hex, pkcs11-tool key type). Levels 2 and 3 (Vault) use the pki-* keys.
TOKEN_KEYS: dict[str, tuple[str, str]] = {
    "root-ca": ("10", "rsa:3072"),
    "root-ocsp": ("11", "rsa:2048"),
    "root-ocsp-ec": ("12", "EC:prime256v1"),
    "pki-ocsp": ("21", "rsa:2048"),
    "pki-int-ocsp": ("31", "EC:prime256v1"),
}

ROOT_SUBJECT = "/CN=hsmocsp dev OpenSSL Root CA"
ROOT_DAYS = 3650
SIGNER_DAYS = 365
LEAF_DAYS = 365
CRL_DAYS = 30

#: Reasons ``openssl ca -crl_reason`` accepts: the real reasons of OpenSSL's list.
CRL_REASONS = OPENSSL_REASONS

_LEAF_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


@dataclass(frozen=True)
class DevPki:
    """Paths and names of a built level-1 dev PKI (all paths absolute)."""

    directory: Path
    softhsm_conf: Path
    module: str
    token_label: str
    pin_file: Path
    so_pin_file: Path
    env_file: Path
    root_dir: Path
    openssl_cnf: Path
    ca_pem: Path
    ca_der: Path
    ocsp_pem: Path
    ocsp_ec_pem: Path
    index: Path
    crl_pem: Path
    crl_der: Path
    leaves_dir: Path
    good_pem: Path
    revoked_pem: Path
    ca_key_label: str = "root-ca"
    ocsp_key_label: str = "root-ocsp"
    ocsp_ec_key_label: str = "root-ocsp-ec"

    def key_uri(self, label: str) -> str:
        """The engine URI of the private key ``label`` (no PIN in it)."""
        return f"pkcs11:token={self.token_label};object={label};type=private"

    def pin(self) -> str:
        """The user PIN (read from :attr:`pin_file`; never log it)."""
        return self.pin_file.read_text().strip()


def layout(directory: Path) -> DevPki:
    """The :class:`DevPki` for ``directory`` without creating anything."""
    d = Path(directory).resolve()
    root = d / "root"
    leaves = root / "leaves"
    return DevPki(
        directory=d,
        softhsm_conf=d / "softhsm2.conf",
        module=softhsm.find_module(),
        token_label=TOKEN_LABEL,
        pin_file=d / "pin",
        so_pin_file=d / "so-pin",
        env_file=d / "env",
        root_dir=root,
        openssl_cnf=root / "openssl.cnf",
        ca_pem=root / "ca.pem",
        ca_der=root / "ca.der",
        ocsp_pem=root / "ocsp.pem",
        ocsp_ec_pem=root / "ocsp-ec.pem",
        index=root / "index.txt",
        crl_pem=root / "crl.pem",
        crl_der=root / "crl.der",
        leaves_dir=leaves,
        good_pem=leaves / "good.pem",
        revoked_pem=leaves / "revoked.pem",
    )


def openssl_cnf_text(dev: DevPki) -> str:
    """The CA's ``openssl.cnf``: engine section, ``[ca]``, and the extension profiles."""
    ca_issuers = f"caIssuers;URI:{BASE_URL}/ca/root.der"
    cdp = f"URI:{BASE_URL}/crl/root.crl"
    return f"""\
# written by hsmocsp-devpki; rewritten when it differs
openssl_conf = openssl_init

[openssl_init]
engines = engine_section

[engine_section]
pkcs11 = pkcs11_section

[pkcs11_section]
engine_id = pkcs11
MODULE_PATH = {dev.module}
init = 0

[ca]
default_ca = root_ca

[root_ca]
dir = {dev.root_dir}
database = $dir/index.txt
serial = $dir/serial
crlnumber = $dir/crlnumber
new_certs_dir = $dir/newcerts
certificate = $dir/ca.pem
default_md = sha256
default_days = {LEAF_DAYS}
default_crl_days = {CRL_DAYS}
policy = policy_any
unique_subject = no
copy_extensions = none
email_in_dn = no
name_opt = ca_default
cert_opt = ca_default

[policy_any]
commonName = supplied
organizationName = optional
organizationalUnitName = optional

[req]
distinguished_name = req_dn
string_mask = utf8only
prompt = no

[req_dn]
CN = unused

[root_ca_ext]
basicConstraints = critical, CA:true
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityInfoAccess = {ca_issuers}
crlDistributionPoints = {cdp}

[ocsp_ext]
basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature
extendedKeyUsage = OCSPSigning
noCheck = ignored
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
authorityInfoAccess = {ca_issuers}

[leaf_ext]
basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
authorityInfoAccess = OCSP;URI:{BASE_URL}/ocsp, {ca_issuers}
crlDistributionPoints = {cdp}

[crl_ext]
authorityKeyIdentifier = keyid:always
"""


def _env(dev: DevPki) -> dict[str, str]:
    return softhsm.env_with(dev.softhsm_conf, OPENSSL_CONF=str(dev.openssl_cnf))


def _engine_args(dev: DevPki) -> list[str]:
    return ["-engine", "pkcs11", "-passin", f"file:{dev.pin_file}"]


def _openssl(dev: DevPki, *args: str) -> bytes:
    return run(["openssl", *args], env=_env(dev), secrets=(dev.pin(),))


def check_tools() -> None:
    """Fail early, with the Debian package to install, if a tool or the engine is missing."""
    require_tool("openssl")
    require_tool("pkcs11-tool")
    softhsm.find_module()
    out = run(["openssl", "version", "-e"]).decode()
    m = re.search(r'ENGINESDIR: "([^"]*)"', out)
    if m is None or not (Path(m.group(1)) / "pkcs11.so").is_file():
        raise MissingToolError(
            "OpenSSL pkcs11 engine not found: install the Debian package 'libengine-pkcs11-openssl'"
        )


def _write_if_differs(path: Path, text: str) -> bool:
    if path.exists() and path.read_text() == text:
        return False
    path.write_text(text)
    return True


def _ensure_secret(path: Path) -> str:
    if not path.exists():
        write_private(path, secrets.token_urlsafe(24).encode())
    value = path.read_text().strip()
    if len(value) < 4:
        raise DevPkiError(f"{path}: PIN shorter than 4 characters")
    return value


def load_cert(path: Path) -> x509.Certificate:
    """Parse a PEM certificate, or raise :class:`DevPkiError` naming the file."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as err:
        raise DevPkiError(f"{path}: not a readable PEM certificate ({err})") from err


def _der_of_pem_cert(pem: Path, der: Path) -> None:
    if not der.exists():
        cert = load_cert(pem)
        der.write_bytes(cert.public_bytes(serialization.Encoding.DER))


def cert_spki(cert: x509.Certificate) -> bytes:
    """The certificate's SubjectPublicKeyInfo, DER: what to compare with a token key."""
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def token_spki(dev: DevPki, label: str) -> bytes:
    """The SubjectPublicKeyInfo (DER, re-encoded the same way) of token key ``label``."""
    der = softhsm.public_key_der(dev.softhsm_conf, dev.module, label, token_label=dev.token_label)
    return serialization.load_der_public_key(der).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_matches_token(dev: DevPki, cert: Path, label: str) -> None:
    """A certificate kept from an earlier run must still belong to the token's key."""
    if cert_spki(load_cert(cert)) != token_spki(dev, label):
        raise DevPkiError(
            f"{cert} does not match token key {label!r} (token re-created?); "
            f"remove {dev.directory} and run again"
        )


def _sign_csr(
    dev: DevPki, csr: Path, out: Path, extensions: str, days: int,
    not_after: datetime | None = None,
) -> None:
    """``openssl ca`` with the HSM root key: issues ``csr`` into ``out`` and index.txt.

    ``not_after`` (UTC, whole seconds) replaces ``days`` with an exact end date.
    """
    validity = ["-days", str(days)]
    if not_after is not None:
        validity = ["-enddate", not_after.astimezone(UTC).strftime("%Y%m%d%H%M%SZ")]
    _openssl(
        dev, "ca", "-config", str(dev.openssl_cnf), *_engine_args(dev),
        "-keyform", "engine", "-keyfile", dev.key_uri(dev.ca_key_label),
        "-batch", "-notext", "-extensions", extensions, *validity,
        "-in", str(csr), "-out", str(out),
    )  # fmt: skip


def sign_csr(dev: DevPki, csr: Path, out: Path, days: int = SIGNER_DAYS) -> None:
    """``openssl ca`` issues ``csr`` as a delegated OCSP signer certificate (``ocsp_ext``),
    as an operator's CA would for a request from ``hsmocsp csr``."""
    _sign_csr(dev, csr, out, "ocsp_ext", days)


def _ensure_signer(dev: DevPki, label: str, cn: str, out: Path) -> bool:
    """An OCSP signer certificate for the token key ``label``; True if newly issued."""
    if out.exists():
        _check_matches_token(dev, out, label)
        return False
    issue_ocsp_signer(dev, label, cn, out)
    return True


def issue_ocsp_signer(
    dev: DevPki, label: str, cn: str, out: Path, *, not_after: datetime | None = None
) -> Path:
    """Issue a delegated OCSP signer certificate for the token key ``label`` into ``out``,
    replacing ``out`` atomically if it exists: a renewal for the same HSM key, as an
    operator does it (``openssl req`` with the engine key, then ``openssl ca``).

    Valid :data:`SIGNER_DAYS` days, or until ``not_after`` (tests of expiry and renewal).
    """
    with tempfile.TemporaryDirectory(prefix="hsmocsp-csr-") as tmp:
        csr = Path(tmp) / "req.csr"
        _openssl(
            dev, "req", "-config", str(dev.openssl_cnf), "-new", *_engine_args(dev),
            "-keyform", "engine", "-key", dev.key_uri(label),
            "-subj", f"/CN={cn}", "-out", str(csr),
        )  # fmt: skip
        tmp_out = out.with_suffix(".pem.tmp")
        _sign_csr(dev, csr, tmp_out, "ocsp_ext", SIGNER_DAYS, not_after)
        tmp_out.rename(out)
    return out


def ensure_ocsp_signer(dev: DevPki, label: str, cn: str, out: Path) -> bool:
    """Issue (once) a delegated OCSP signer certificate ``out`` for the token key ``label``.

    Public for callers that add their own signing keys to the dev token (the benchmark's
    RSA-4096 key); the key pair must already exist. True if a certificate was issued now,
    False if ``out`` existed and matches the token key (a mismatch is a DevPkiError).
    """
    return _ensure_signer(dev, label, cn, out)


def issue_leaf(dev: DevPki, name: str) -> Path:
    """Issue (once) a leaf certificate ``leaves/<name>.pem`` with a file key ``<name>.key``.

    The leaf carries the AIA OCSP URL; used by the builder and by reload tests that need a
    certificate to appear in the index.
    """
    if not _LEAF_NAME.match(name):
        raise DevPkiError(f"bad leaf name {name!r} (lower-case letters, digits, '-')")
    dev.leaves_dir.mkdir(exist_ok=True)
    pem = dev.leaves_dir / f"{name}.pem"
    if pem.exists():
        return pem
    key = dev.leaves_dir / f"{name}.key"
    if not key.exists():
        run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-out", str(key)])  # fmt: skip
        key.chmod(0o600)
    csr = dev.leaves_dir / f"{name}.csr"
    # Plain openssl (no engine config): with libp11 loaded, file EC keys fail to sign
    # ("default_check: command not supported").
    run(["openssl", "req", "-new", "-key", str(key), "-subj", f"/CN={name}.hsmocsp.test",
         "-out", str(csr)])  # fmt: skip
    tmp = pem.with_suffix(".pem.tmp")
    _sign_csr(dev, csr, tmp, "leaf_ext", LEAF_DAYS)
    tmp.rename(pem)
    return pem


def _serial_hex(cert: Path) -> str:
    return format(load_cert(cert).serial_number, "X")


def _index_rows(dev: DevPki) -> list[list[str]]:
    return [line.split("\t") for line in dev.index.read_text().splitlines() if line]


def is_revoked(dev: DevPki, cert: Path) -> bool:
    """True if ``cert``'s serial has an ``R`` row in index.txt."""
    serial = _serial_hex(cert)
    return any(
        row[0] == "R" and len(row) > 3 and int(row[3], 16) == int(serial, 16)
        for row in _index_rows(dev)
    )


def revoke(dev: DevPki, cert: Path, reason: str = "unspecified") -> None:
    """Mark ``cert`` revoked in index.txt (``openssl ca -revoke``); no-op if it already is.

    The CRL is not touched: call :func:`regen_crl` afterwards (tests control when the
    responder sees each file change).
    """
    if reason not in CRL_REASONS:
        raise DevPkiError(f"bad revocation reason {reason!r}; one of {', '.join(CRL_REASONS)}")
    target, root = load_cert(cert), load_cert(dev.ca_pem)
    if target == root:
        raise DevPkiError(f"{cert} is the root CA certificate itself")
    try:
        target.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature) as err:
        # openssl ca -revoke would happily add a foreign certificate to index.txt.
        raise DevPkiError(f"{cert} was not issued by {dev.ca_pem}") from err
    if is_revoked(dev, cert):
        return
    _openssl(
        dev, "ca", "-config", str(dev.openssl_cnf), *_engine_args(dev),
        "-keyform", "engine", "-keyfile", dev.key_uri(dev.ca_key_label),
        "-revoke", str(cert), "-crl_reason", reason,
    )  # fmt: skip


def regen_crl(
    dev: DevPki, *, pem: Path | None = None, der: Path | None = None,
    valid_seconds: int | None = None,
) -> None:
    """Sign a new CRL from index.txt into crl.pem and crl.der (HSM root key).

    ``pem``/``der`` write elsewhere; ``valid_seconds`` sets nextUpdate that many seconds
    ahead instead of :data:`CRL_DAYS` (tests of an overdue CRL).
    """
    pem, der = pem or dev.crl_pem, der or dev.crl_der
    validity = [] if valid_seconds is None else ["-crlsec", str(valid_seconds)]
    tmp = pem.with_suffix(".pem.tmp")
    _openssl(
        dev, "ca", "-config", str(dev.openssl_cnf), *_engine_args(dev),
        "-keyform", "engine", "-keyfile", dev.key_uri(dev.ca_key_label),
        "-gencrl", "-crlexts", "crl_ext", *validity, "-out", str(tmp),
    )  # fmt: skip
    crl = x509.load_pem_x509_crl(tmp.read_bytes())
    der_tmp = der.with_suffix(".der.tmp")
    der_tmp.write_bytes(crl.public_bytes(serialization.Encoding.DER))
    tmp.rename(pem)
    der_tmp.rename(der)


def self_sign_root(dev: DevPki, out: Path, days: int = ROOT_DAYS) -> Path:
    """The self-signed root CA certificate for the HSM key ``root-ca`` into ``out``
    (atomically): at build, and again for a renewal of the same CA (same name and key)."""
    tmp = out.with_suffix(".pem.tmp")
    _openssl(
        dev, "req", "-config", str(dev.openssl_cnf), "-new", "-x509", *_engine_args(dev),
        "-keyform", "engine", "-key", dev.key_uri(dev.ca_key_label),
        "-subj", ROOT_SUBJECT, "-days", str(days), "-sha256",
        "-extensions", "root_ca_ext", "-out", str(tmp),
    )  # fmt: skip
    tmp.rename(out)
    return out


def build_level1(directory: Path) -> DevPki:
    """Build (or complete) the level-1 dev PKI under ``directory``; return its paths.

    Raises :class:`~hsmocsp.devpki.tools.MissingToolError` when a tool is missing and
    :class:`~hsmocsp.devpki.tools.DevPkiError` (incl. ``CommandError``) when a step fails.
    """
    check_tools()
    dev = layout(directory)
    dev.directory.mkdir(parents=True, exist_ok=True)
    pin = _ensure_secret(dev.pin_file)
    so_pin = _ensure_secret(dev.so_pin_file)
    softhsm.ensure_token(dev.directory, dev.token_label, pin, so_pin)
    for label, (key_id, key_type) in TOKEN_KEYS.items():
        softhsm.ensure_keypair(
            dev.softhsm_conf, dev.module, pin, label, key_id, key_type,
            token_label=dev.token_label,
        )  # fmt: skip

    root = dev.root_dir
    (root / "newcerts").mkdir(parents=True, exist_ok=True)
    _write_if_differs(dev.openssl_cnf, openssl_cnf_text(dev))
    if not dev.index.exists():
        dev.index.write_text("")
    if not (root / "serial").exists():
        # Random 64-bit start so two dev PKIs never share serials; leading 1 keeps it positive.
        (root / "serial").write_text("1" + secrets.token_hex(8).upper()[1:] + "\n")
    if not (root / "crlnumber").exists():
        (root / "crlnumber").write_text("1000\n")

    changed = False
    if not dev.ca_pem.exists():
        self_sign_root(dev, dev.ca_pem)
        changed = True
    else:
        _check_matches_token(dev, dev.ca_pem, dev.ca_key_label)
    _der_of_pem_cert(dev.ca_pem, dev.ca_der)

    changed |= _ensure_signer(dev, dev.ocsp_key_label, "hsmocsp dev OCSP signer RSA", dev.ocsp_pem)
    changed |= _ensure_signer(
        dev, dev.ocsp_ec_key_label, "hsmocsp dev OCSP signer EC", dev.ocsp_ec_pem
    )
    for leaf in (dev.good_pem, dev.revoked_pem):
        if not leaf.exists():
            issue_leaf(dev, leaf.stem)
            changed = True
    if not is_revoked(dev, dev.revoked_pem):
        revoke(dev, dev.revoked_pem, "keyCompromise")
        changed = True
    if changed or not dev.crl_pem.exists() or not dev.crl_der.exists():
        regen_crl(dev)

    _write_if_differs(
        dev.env_file, f"SOFTHSM2_CONF={dev.softhsm_conf}\nHSMOCSP_PIN_FILE={dev.pin_file}\n"
    )
    return dev
