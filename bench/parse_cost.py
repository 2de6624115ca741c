"""CPU per OCSPRequest parse: the walk (hsmocsp.ocsp.fastparse) against pyasn1 (#9.4).

    .venv/bin/python -m bench.parse_cost

Prints microseconds of CPU (process time) per parse for the shapes an attacker
or a client sends. Not a test: figures go to docs/performance.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from hsmocsp.errors import MalformedRequest
from hsmocsp.ocsp import der
from hsmocsp.ocsp.request import NONCE_OID, make_cert_id, parse_request, parse_request_pyasn1


def _request(count: int, nonce: int = 0, version: bool = False) -> bytes:
    cid = make_cert_id("sha1", b"\x01" * 20, b"\x02" * 20, 0x1234567890).der
    parts = [der.tlv(der.context(0), der.integer(0))] if version else []
    parts.append(der.sequence(*[der.sequence(cid)] * count))
    if nonce:
        value = der.octet_string(der.octet_string(b"\x07" * nonce))
        parts.append(der.tlv(der.context(2), der.sequence(
            der.sequence(der.oid(NONCE_OID), value))))
    return der.sequence(der.sequence(*parts))


def _cpu_us(parse: Callable[[bytes], object], raw: bytes, budget: float = 0.3) -> float:
    n = 0
    start = time.process_time()
    while True:
        for _ in range(20):
            try:
                parse(raw)
            except MalformedRequest:
                pass
        n += 20
        spent = time.process_time() - start
        if spent > budget:
            return spent / n * 1e6


def main() -> None:
    cases = [
        ("1 CertID", _request(1)),
        ("1 CertID + 32-octet nonce", _request(1, 32)),
        ("1 CertID + 128-octet nonce", _request(1, 128)),
        ("1 CertID, explicit version", _request(1, version=True)),
        ("64 CertIDs (the limit)", _request(64, version=True)),
        ("65 CertIDs (refused)", _request(65)),
        ("150 CertIDs (refused)", _request(150)),
    ]
    print(f"{'request':32} {'bytes':>6} {'walk µs':>9} {'pyasn1 µs':>10}")
    for name, raw in cases:
        print(f"{name:32} {len(raw):6d} {_cpu_us(parse_request, raw):9.1f} "
              f"{_cpu_us(parse_request_pyasn1, raw):10.1f}")


if __name__ == "__main__":
    main()
