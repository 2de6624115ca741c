"""The cfssl level of the dev PKI: a CA run by cfssl, its certdb, an HSM OCSP signer.

Everything is made with Debian's ``cfssl`` (golang-cfssl 1.2.0) the way an operator would:
``cfssl genkey -initca`` makes the CA key and certificate (a file key, as cfssl keeps
them); ``cfssl sign -db-config`` issues leaves and records them in a SQLite certdb;
``cfssl revoke -db-config ... -reason keyCompromise`` revokes. The OCSP signer's key is in
the SoftHSM token (label ``cfssl-ocsp``), its certificate signed by the cfssl CA from a
CSR the token signed (``openssl req -engine pkcs11``).

Two quirks of this cfssl shape the steps: it does not create the certdb's tables (its
migration 001 is applied here, :data:`hsmocsp.sources.certdb.SCHEMA`), and it writes an
empty ``authority_key_identifier`` on every row while ``cfssl revoke`` refuses an empty
``-aki``; so before revoking, the row gets the AKI a current cfssl writes (the CA's SKI in
lowercase hex), which hsmocsp accepts as well as the empty one.

Idempotent like the other levels: what exists is kept.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hsmocsp.devpki import softhsm
from hsmocsp.devpki.opensslca import DevPki, cert_spki, load_cert, token_spki
from hsmocsp.devpki.tools import DevPkiError, require_tool, run
from hsmocsp.sources.certdb import DbConfig, connect_writable, create_schema
from hsmocsp.sources.cfssl import issuer_aki

__all__ = ["CfsslCA", "build_cfssl_level", "cfssl_layout"]

CA_CN = "hsmocsp dev cfssl CA"
SIGNER_LABEL = "cfssl-ocsp"
SIGNER_KEY_ID = "41"
OCSP_PATH = "/cfssl/ocsp"
BASE_URL = "http://127.0.0.1:8080"

#: cfssl signing profiles: leaves with our AIA OCSP URL, and the delegated OCSP signer.
SIGNING_CONFIG = {
    "signing": {
        "default": {
            "expiry": "8760h",
            "usages": ["digital signature", "key encipherment", "server auth", "client auth"],
            "ocsp_url": BASE_URL + OCSP_PATH,
        },
        "profiles": {
            "ocsp": {"expiry": "8760h", "usages": ["digital signature", "ocsp signing"]},
        },
    }
}


@dataclass(frozen=True)
class CfsslCA:
    """Paths of one cfssl CA (all absolute)."""

    directory: Path
    ca_pem: Path
    ca_key: Path
    signing_config: Path
    db_config: Path
    leaves_dir: Path

    def db(self) -> DbConfig:
        from hsmocsp.sources.certdb import read_db_config

        return read_db_config(self.db_config)

    # --- cfssl commands --------------------------------------------------------------

    def _cfssl(self, *args: str) -> bytes:
        require_tool("cfssl")
        return run(["cfssl", *args], cwd=self.directory)

    def _json(self, *args: str) -> dict[str, Any]:
        out = self._cfssl(*args)
        try:
            data: dict[str, Any] = json.loads(out)
        except ValueError as err:
            raise DevPkiError(f"cfssl {args[0]}: no JSON on stdout: {out[:200]!r}") from err
        return data

    def issue(self, name: str, *, record: bool = True) -> Path:
        """``leaves/<name>.pem`` (file key beside it) signed by ``cfssl sign -db-config``."""
        self.leaves_dir.mkdir(parents=True, exist_ok=True)
        pem = self.leaves_dir / f"{name}.pem"
        if pem.exists():
            return pem
        with tempfile.TemporaryDirectory(prefix="hsmocsp-cfssl-") as tmp:
            req = Path(tmp) / "csr.json"
            req.write_text(json.dumps({
                "CN": f"{name}.cfssl.hsmocsp.test", "hosts": [f"{name}.cfssl.hsmocsp.test"],
                "key": {"algo": "ecdsa", "size": 256},
            }))  # fmt: skip
            made = self._json("genkey", str(req))
            csr = Path(tmp) / "leaf.csr"
            csr.write_text(made["csr"])
            key = self.leaves_dir / f"{name}-key.pem"
            key.write_text(made["key"])
            key.chmod(0o600)
            db = ["-db-config", str(self.db_config)] if record else []
            signed = self._json(
                "sign", *db, "-config", str(self.signing_config),
                "-ca", str(self.ca_pem), "-ca-key", str(self.ca_key), str(csr),
            )  # fmt: skip
        tmp_pem = pem.with_suffix(".pem.tmp")
        tmp_pem.write_text(signed["cert"])
        tmp_pem.rename(pem)
        return pem

    def sign_ocsp_csr(self, csr_pem: str, out: Path) -> None:
        """The delegated OCSP signer certificate for a CSR (profile ``ocsp``), not recorded."""
        with tempfile.TemporaryDirectory(prefix="hsmocsp-cfssl-") as tmp:
            csr = Path(tmp) / "ocsp.csr"
            csr.write_text(csr_pem)
            signed = self._json(
                "sign", "-config", str(self.signing_config), "-profile", "ocsp",
                "-ca", str(self.ca_pem), "-ca-key", str(self.ca_key), str(csr),
            )  # fmt: skip
        tmp_pem = out.with_suffix(".pem.tmp")
        tmp_pem.write_text(signed["cert"])
        tmp_pem.rename(out)

    def aki(self) -> str:
        return issuer_aki(load_cert(self.ca_pem))

    def give_aki(self, serial: int) -> None:
        """Write the CA's AKI into the rows of ``serial`` (what a current cfssl writes)."""
        conn = connect_writable(self.db())
        try:
            cur = conn.cursor()
            ph = "?" if self.db().driver == "sqlite3" else "%s"
            sqlite = self.db().driver == "sqlite3"
            value: object = self.aki() if sqlite else self.aki().encode()
            key: object = str(serial) if sqlite else str(serial).encode()
            cur.execute(
                f"UPDATE certificates SET authority_key_identifier = {ph} "
                f"WHERE serial_number = {ph} AND authority_key_identifier = {ph}",
                (value, key, "" if sqlite else b""),
            )
            cur.close()
        finally:
            conn.close()

    def revoke(self, cert: Path, reason: str = "keyCompromise") -> None:
        """``cfssl revoke -db-config`` (after :meth:`give_aki`, which it needs)."""
        serial = load_cert(cert).serial_number
        self.give_aki(serial)
        self._cfssl(
            "revoke", "-db-config", str(self.db_config), "-serial", str(serial),
            "-aki", self.aki(), "-reason", reason,
        )  # fmt: skip

    def ocsprefresh(self, responder: Path, responder_key: Path) -> None:
        """``cfssl ocsprefresh``: pre-sign every unexpired certificate into ocsp_responses."""
        self._cfssl(
            "ocsprefresh", "-db-config", str(self.db_config), "-ca", str(self.ca_pem),
            "-responder", str(responder), "-responder-key", str(responder_key),
        )  # fmt: skip

    def ocspdump(self) -> bytes:
        """``cfssl ocspdump``: one base64 DER OCSPResponse per line."""
        return self._cfssl("ocspdump", "-db-config", str(self.db_config))


def cfssl_layout(directory: Path) -> CfsslCA:
    d = Path(directory).resolve()
    return CfsslCA(
        directory=d,
        ca_pem=d / "ca.pem",
        ca_key=d / "ca-key.pem",
        signing_config=d / "signing.json",
        db_config=d / "db.json",
        leaves_dir=d / "leaves",
    )


def init_ca(directory: Path, cn: str = CA_CN) -> CfsslCA:
    """The CA (``cfssl genkey -initca``) and its signing profiles, made once."""
    ca = cfssl_layout(directory)
    ca.directory.mkdir(parents=True, exist_ok=True)
    config = json.dumps(SIGNING_CONFIG, indent=1) + "\n"
    if not ca.signing_config.exists() or ca.signing_config.read_text() != config:
        ca.signing_config.write_text(config)
    if not ca.ca_pem.exists():
        with tempfile.TemporaryDirectory(prefix="hsmocsp-cfssl-") as tmp:
            req = Path(tmp) / "ca-csr.json"
            req.write_text(json.dumps({"CN": cn, "key": {"algo": "ecdsa", "size": 256}}))
            made = ca._json("genkey", "-initca", str(req))
        ca.ca_key.write_text(made["key"])
        ca.ca_key.chmod(0o600)
        ca.ca_pem.write_text(made["cert"])
    return ca


def use_database(ca: CfsslCA, driver: str, data_source: str) -> DbConfig:
    """Point ``db.json`` at a database and create cfssl's tables in it (idempotent)."""
    if driver == "sqlite3":
        Path(data_source).parent.mkdir(parents=True, exist_ok=True)
        Path(data_source).touch()
    text = json.dumps({"driver": driver, "data_source": data_source}) + "\n"
    if not ca.db_config.exists() or ca.db_config.read_text() != text:
        ca.db_config.write_text(text)
    cfg = ca.db()
    conn = connect_writable(cfg)
    try:
        create_schema(conn, driver)
    finally:
        conn.close()
    return cfg


@dataclass(frozen=True)
class CfsslLevel:
    """The dev PKI's cfssl level as ``make run`` serves it."""

    ca: CfsslCA
    ocsp_pem: Path
    good_pem: Path
    revoked_pem: Path
    signer_label: str = SIGNER_LABEL
    ocsp_path: str = OCSP_PATH


def ensure_signer_key(dev: DevPki) -> None:
    """The OCSP signing key pair ``cfssl-ocsp`` (P-256) in the dev token, made once."""
    softhsm.ensure_keypair(
        dev.softhsm_conf, dev.module, dev.pin(), SIGNER_LABEL, SIGNER_KEY_ID, "EC:prime256v1",
        token_label=dev.token_label,
    )  # fmt: skip


def hsm_signer_cert(dev: DevPki, ca: CfsslCA, out: Path, cn: str) -> None:
    """A delegated OCSP signer certificate from ``ca`` for the token key ``cfssl-ocsp``."""
    from hsmocsp.devpki.vaultpki import _hsm_csr

    ensure_signer_key(dev)
    ca.sign_ocsp_csr(_hsm_csr(dev, SIGNER_LABEL, cn), out)


def build_cfssl_level(dev: DevPki) -> CfsslLevel:
    """``<dev>/cfssl/``: the CA, a SQLite certdb, a good and a revoked leaf, the HSM signer."""
    ca = init_ca(dev.directory / "cfssl")
    use_database(ca, "sqlite3", str(ca.directory / "certdb.sqlite"))
    ensure_signer_key(dev)
    ocsp_pem = ca.directory / "ocsp.pem"
    if ocsp_pem.exists() and cert_spki(load_cert(ocsp_pem)) != token_spki(dev, SIGNER_LABEL):
        raise DevPkiError(
            f"{ocsp_pem} does not match token key {SIGNER_LABEL!r} (token re-created?); "
            f"remove {dev.directory} and run again"
        )
    if not ocsp_pem.exists():
        hsm_signer_cert(dev, ca, ocsp_pem, "hsmocsp dev cfssl OCSP signer")
    good = ca.issue("good")
    revoked = ca.issue("revoked")
    if not _is_revoked(ca, revoked):
        ca.revoke(revoked, "keyCompromise")
    return CfsslLevel(ca=ca, ocsp_pem=ocsp_pem, good_pem=good, revoked_pem=revoked)


def _is_revoked(ca: CfsslCA, cert: Path) -> bool:
    serial = str(load_cert(cert).serial_number)
    conn = connect_writable(ca.db())
    try:
        cur = conn.cursor()
        cur.execute("SELECT status FROM certificates WHERE serial_number = ?", (serial,))
        rows = cur.fetchall()
        cur.close()
    finally:
        conn.close()
    return any(str(r[0]) == "revoked" for r in rows)


def leaf_serial(cert: Path) -> int:
    return load_cert(cert).serial_number
