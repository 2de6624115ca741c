"""Round trip against the real ``openssl ca``: its index.txt and its CRL agree with us.

A throw-away CA with a file key in a temp dir; one certificate revoked with each
of ``-crl_reason X``, ``-crl_hold``, ``-crl_compromise`` and ``-crl_CA_compromise``;
then the index is parsed and the CRL that ``openssl ca -gencrl`` makes from it
is loaded with :func:`load_crl`, and both must say the same thing.
"""

from __future__ import annotations

import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509

from hsmocsp.sources.crl import load_crl
from hsmocsp.sources.index import parse_index
from hsmocsp.status import CertStatus, CRLReason, Status

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI"),
]

CA_CNF = """\
[ ca ]
default_ca = CA_default
[ CA_default ]
dir = {dir}
database = $dir/index.txt
new_certs_dir = $dir/newcerts
certificate = $dir/ca.pem
private_key = $dir/ca.key
serial = $dir/serial
crlnumber = $dir/crlnumber
default_md = sha256
default_days = 30
default_crl_days = 7
policy = pol
unique_subject = no
[ pol ]
commonName = supplied
"""

COMPROMISED = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)

# serial offset -> (openssl ca -revoke arguments, reason, invalidity date, hold OID)
CASES: dict[int, tuple[list[str], CRLReason | None, datetime | None, str | None]] = {
    0: ([], None, None, None),
    1: (["-crl_reason", "unspecified"], CRLReason.unspecified, None, None),
    2: (["-crl_reason", "keyCompromise"], CRLReason.keyCompromise, None, None),
    3: (["-crl_reason", "CACompromise"], CRLReason.cACompromise, None, None),
    4: (["-crl_reason", "affiliationChanged"], CRLReason.affiliationChanged, None, None),
    5: (["-crl_reason", "superseded"], CRLReason.superseded, None, None),
    6: (["-crl_reason", "cessationOfOperation"], CRLReason.cessationOfOperation, None, None),
    7: (["-crl_reason", "certificateHold"], CRLReason.certificateHold, None, None),
    8: (["-crl_hold", "holdInstructionNone"], CRLReason.certificateHold, None, "1.2.840.10040.2.1"),
    9: (
        ["-crl_hold", "holdInstructionCallIssuer"],
        CRLReason.certificateHold,
        None,
        "1.2.840.10040.2.2",
    ),
    10: (["-crl_hold", "1.2.840.10040.2.3"], CRLReason.certificateHold, None, "1.2.840.10040.2.3"),
    11: (["-crl_compromise", "20240102030405Z"], CRLReason.keyCompromise, COMPROMISED, None),
    12: (["-crl_CA_compromise", "20240102030405Z"], CRLReason.cACompromise, COMPROMISED, None),
}
REMOVED = 13  # -crl_reason removeFromCRL: good again
VALID = 14  # never revoked
SERIAL_BASE = 0x1000


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, f"openssl {' '.join(args)}: {proc.stderr}"


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("openssl-ca")
    (d / "newcerts").mkdir()
    (d / "index.txt").write_text("")
    (d / "serial").write_text(f"{SERIAL_BASE:X}\n")
    (d / "crlnumber").write_text("01\n")
    (d / "ca.cnf").write_text(CA_CNF.format(dir=d))
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem",
             "-subj", "/CN=Index Test CA", "-days", "30", cwd=d)  # fmt: skip
    # One shared leaf key; openssl ca signs the same request repeatedly (unique_subject = no).
    _openssl("req", *ec, "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=leaf", cwd=d)
    for i in range(VALID + 1):
        _openssl("ca", "-batch", "-config", "ca.cnf", "-in", "leaf.csr",
                 "-out", f"c{i}.pem", "-notext", cwd=d)  # fmt: skip
    for i, (args, *_rest) in CASES.items():
        _openssl("ca", "-config", "ca.cnf", "-revoke", f"c{i}.pem", *args, cwd=d)
    _openssl("ca", "-config", "ca.cnf", "-revoke", f"c{REMOVED}.pem",
             "-crl_reason", "removeFromCRL", cwd=d)  # fmt: skip
    _openssl("ca", "-config", "ca.cnf", "-gencrl", "-out", "crl.pem", cwd=d)
    return d


def test_index_written_by_openssl_ca(ca_dir: Path) -> None:
    data = parse_index(ca_dir / "index.txt")
    assert data.lines == VALID + 1
    for i, (_args, reason, invalidity, hold) in CASES.items():
        status = data.status(SERIAL_BASE + i)
        assert status.status is Status.revoked, i
        assert status.reason == reason, i
        assert status.invalidity_date == invalidity, i
        assert data.hold_instructions.get(SERIAL_BASE + i) == hold, i
        assert status.revocation_time is not None
    assert data.status(SERIAL_BASE + REMOVED) == CertStatus.good()
    assert data.status(SERIAL_BASE + VALID) == CertStatus.good()
    assert data.status(SERIAL_BASE + VALID + 1).status is Status.unknown


def test_openssl_crl_agrees_with_index(ca_dir: Path) -> None:
    issuer = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    crl = load_crl((ca_dir / "crl.pem").read_bytes(), issuer)
    index = parse_index(ca_dir / "index.txt")
    assert crl.crl_number == 1
    assert crl.warnings == ()
    # removeFromCRL appears in openssl's CRL with that reason; load_crl drops it.
    assert set(crl.revoked) == set(index.revoked) == {SERIAL_BASE + i for i in CASES}
    for serial, status in index.revoked.items():
        assert crl.revoked[serial] == status, hex(serial)
