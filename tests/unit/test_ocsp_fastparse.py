"""The OCSPRequest walk agrees with pyasn1 (the reference, no longer on the request path).

The property, for any bytes: when the walk accepts, pyasn1 accepts and gives the
same result; when the walk refuses what pyasn1 accepts, the bytes are not DER
(pyasn1's own DER encoding of what it decoded differs from them) or break a limit
pyasn1 does not know (:data:`MAX_EXTENSIONS`, an empty Extensions list).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1_modules import rfc6960

from hsmocsp.errors import MalformedRequest
from hsmocsp.ocsp import der
from hsmocsp.ocsp.fastparse import parse
from hsmocsp.ocsp.request import (
    MAX_CERT_IDS,
    MAX_EXTENSIONS,
    NONCE_OID,
    OCSPRequestInfo,
    make_cert_id,
    parse_request,
    parse_request_pyasn1,
)

DATA = Path(__file__).resolve().parent.parent / "testdata" / "ocsp"
HASHES = {"sha1": ("1.3.14.3.2.26", 20), "sha256": ("2.16.840.1.101.3.4.2.1", 32),
          "sha384": ("2.16.840.1.101.3.4.2.2", 48), "sha512": ("2.16.840.1.101.3.4.2.3", 64)}
OTHER_OIDS = ["1.2.840.113549.2.5", "2.16.840.1.101.3.4.2.4", "1.3.6.1.5.5.7.48.1.4",
              "1.3.6.1.5.5.7.48.1.8", "1.2.3.4"]


def pyasn1_result(raw: bytes) -> OCSPRequestInfo | None:
    try:
        return parse_request_pyasn1(raw)
    except MalformedRequest:  # UnsupportedHashAlgorithm is a subclass
        return None


def walk_result(raw: bytes) -> OCSPRequestInfo | None:
    try:
        return parse(raw)
    except MalformedRequest:
        return None


def _not_der(raw: bytes) -> bool:
    """pyasn1 re-encodes what it decoded from ``raw`` to other bytes (so ``raw`` is BER,
    not DER), or the request breaks one of the walk's own limits."""
    decoded, _ = der_decoder.decode(raw, asn1Spec=rfc6960.OCSPRequest())
    if der_encoder.encode(decoded) != raw:
        return True
    lists = [decoded["tbsRequest"]["requestExtensions"]] + [
        single["singleRequestExtensions"] for single in decoded["tbsRequest"]["requestList"]
    ]
    if any(x.isValue and not 1 <= len(x) <= MAX_EXTENSIONS for x in lists):
        return True
    # pyasn1 also keeps non-minimal INTEGERs as they were (0202ff80 for -128).
    return any(
        der.integer(int(single["reqCert"]["serialNumber"])) not in raw
        for single in decoded["tbsRequest"]["requestList"]
    )


def _without_ignored_parts(raw: bytes) -> bytes:
    """``raw`` without requestorName and the optional signature, whose content the walk
    steps over unread (the responder does not use them), rebuilt as DER."""
    _, start, end = der.read_tlv(raw)
    _, tbs_start, tbs_end = der.read_tlv(raw, start, end)
    kept = [raw[s:e] for tag, s, _, e in der.children(raw, tbs_start, tbs_end)
            if tag != der.context(1)]  # fmt: skip
    return der.sequence(der.sequence(*kept))


def check_agrees(raw: bytes) -> OCSPRequestInfo | None:
    """Assert the property for ``raw``; return the walk's result."""
    fast = walk_result(raw)
    reference = pyasn1_result(raw)
    if fast is not None and reference is None:
        reference = pyasn1_result(_without_ignored_parts(raw))  # broken only where unread
    if fast is not None:
        assert reference == fast, f"walk accepted what pyasn1 reads otherwise: {raw.hex()}"
    elif reference is not None:
        assert _not_der(raw), f"walk refused a DER request pyasn1 accepts: {raw.hex()}"
    return fast


def long_tlv(tag: int, content: bytes, extra_octets: int) -> bytes:
    """A TLV whose length uses ``extra_octets`` length octets: non-minimal DER when
    short form (or fewer octets) would do."""
    n = len(content)
    return bytes((tag, 0x80 | extra_octets)) + n.to_bytes(extra_octets, "big") + content


# --- generated requests --------------------------------------------------------------------

def rare(draw: st.DrawFn, one_in: int) -> bool:
    """True about once in ``one_in`` draws (hypothesis leans to the first, False)."""
    return draw(st.sampled_from([False] * (one_in - 1) + [True]))


@st.composite
def serial_encodings(draw: st.DrawFn) -> bytes:
    """An INTEGER: usually minimal DER of a random value, sometimes a bad encoding."""
    kind = draw(st.sampled_from(["int"] * 6 + ["edge"] * 3 + ["raw"]))
    if kind == "int":
        value = draw(st.integers(min_value=-(2**200), max_value=2**200))
        return der.integer(value)
    if kind == "edge":
        value = draw(st.sampled_from([0, -1, 1, 127, 128, -128, -129, 255, 256, 2**159,
                                      2**160 - 1, -(2**159), 0x7F_FFFF_FFFF]))
        return der.integer(value)
    # Leading 0x00/0xFF padding (non-minimal), empty content, arbitrary octets.
    body = draw(st.sampled_from([b"", b"\x00", b"\x00\x01", b"\x00\x7f", b"\x00\x80",
                                 b"\xff\xff", b"\xff\x80", b"\xff\x7f", b"\x00\x00\x10"]))
    body += draw(st.binary(max_size=3))
    return der.tlv(der.INTEGER, body)


@st.composite
def algorithm_identifiers(draw: st.DrawFn) -> tuple[bytes, int]:
    """(AlgorithmIdentifier DER, hash length the CertID should use)."""
    name = draw(st.sampled_from(sorted(HASHES)))
    dotted, length = HASHES[name]
    oid = der.oid(draw(st.sampled_from([dotted] * 40 + OTHER_OIDS)))
    params = draw(st.sampled_from([b""] * 8 + [b"\x05\x00"] * 8
                                  + [b"\x04\x00", b"\x05\x01\x00", b"\x05\x00\x05\x00"]))
    return der.sequence(oid, params), length


@st.composite
def cert_ids(draw: st.DrawFn) -> bytes:
    algorithm, length = draw(algorithm_identifiers())
    wrong = rare(draw, 20)
    name_len = draw(st.integers(min_value=0, max_value=70)) if wrong else length
    name_hash = draw(st.binary(min_size=name_len, max_size=name_len))
    key_hash = draw(st.binary(min_size=length, max_size=length))
    parts = [algorithm, der.octet_string(name_hash), der.octet_string(key_hash),
             draw(serial_encodings())]
    if rare(draw, 16):
        parts.append(der.integer(1))  # an extra field
    return der.sequence(*parts)


@st.composite
def extensions(draw: st.DrawFn) -> bytes:
    oid = draw(st.sampled_from([NONCE_OID] * 15 + OTHER_OIDS))
    critical = draw(st.sampled_from([b""] * 8 + [b"\x01\x01\xff", b"\x01\x01\x00"]))
    size = draw(st.sampled_from([0, 1, 16, 32, 33, 127, 128, 129, 140]))
    inner = draw(st.binary(min_size=size, max_size=size))
    value = draw(st.sampled_from([der.octet_string(inner)] * 8 + [
        inner, der.octet_string(inner) + b"\x00", long_tlv(der.OCTET_STRING, inner, 1),
    ]))
    return der.sequence(der.oid(oid), critical, der.octet_string(value))


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    singles = []
    count = draw(st.sampled_from([1] * 8 + [2, 3, 4, 0]))
    for cid in draw(st.lists(cert_ids(), min_size=count, max_size=count)):
        extra = b""
        if rare(draw, 10):
            extra = der.tlv(der.context(0), der.sequence(draw(extensions())))
        singles.append(der.sequence(cid, extra))
    parts = []
    version = draw(st.sampled_from([None] * 12 + [0, 1]))
    if version is not None:
        parts.append(der.tlv(der.context(0), der.integer(version)))
    if rare(draw, 20):  # requestorName: a dNSName
        parts.append(der.tlv(der.context(1), der.tlv(0x82, b"example.org")))
    parts.append(der.sequence(*singles))
    ext_count = draw(st.sampled_from([0] * 5 + [1] * 5 + [2]))
    ext_list = draw(st.lists(extensions(), min_size=ext_count, max_size=ext_count))
    if ext_list or rare(draw, 20):
        parts.append(der.tlv(der.context(2), der.sequence(*ext_list)))
    tbs = der.sequence(*parts)
    outer = [tbs]
    if rare(draw, 20):  # an (unchecked) signature
        sig_alg = der.sequence(der.oid("1.2.840.113549.1.1.11"), b"\x05\x00")
        outer.append(der.tlv(der.context(0), der.sequence(sig_alg, der.bit_string(b"sig"))))
    request = der.sequence(*outer)
    if rare(draw, 20):
        request = long_tlv(der.SEQUENCE, b"".join(outer), 2)  # non-minimal outer length
    if rare(draw, 30):
        request += b"\x00"  # trailing byte
    return request


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_generated_requests_agree(raw: bytes) -> None:
    check_agrees(raw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests(), st.data())
def test_mutated_requests_agree(raw: bytes, data: st.DataObject) -> None:
    mutated = bytearray(raw)
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        if not mutated:
            break
        index = data.draw(st.integers(min_value=0, max_value=len(mutated) - 1))
        action = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if action == "flip":
            mutated[index] ^= 1 << data.draw(st.integers(min_value=0, max_value=7))
        elif action == "set":
            mutated[index] = data.draw(st.integers(min_value=0, max_value=255))
        elif action == "insert":
            mutated.insert(index, data.draw(st.integers(min_value=0, max_value=255)))
        elif action == "delete":
            del mutated[index]
        else:
            del mutated[index:]
    check_agrees(bytes(mutated))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_agree(raw: bytes) -> None:
    check_agrees(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_inside_a_sequence_agree(body: bytes) -> None:
    check_agrees(der.sequence(body))
    check_agrees(der.sequence(der.sequence(body)))


# --- the common shapes are really taken by the fast path ------------------------------------

@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(sorted(HASHES)),
            st.integers(min_value=-(2**170), max_value=2**170),
            st.booleans(),
            st.randoms(use_true_random=False),
        ),
        min_size=1, max_size=5,
    ),
    st.one_of(st.none(), st.binary(min_size=1, max_size=128)),
)
def test_common_shape_is_fast_and_equal(
    ids: list[tuple[str, int, bool, random.Random]], nonce: bytes | None
) -> None:
    cids = []
    for name, serial, null_params, rnd in ids:
        length = HASHES[name][1]
        name_hash = bytes(rnd.getrandbits(8) for _ in range(length))
        key_hash = bytes(rnd.getrandbits(8) for _ in range(length))
        cids.append(make_cert_id(name, name_hash, key_hash, serial, null_params=null_params))
    parts = [der.sequence(*(der.sequence(c.der) for c in cids))]
    if nonce is not None:
        value = der.octet_string(nonce)
        parts.append(der.tlv(der.context(2), der.sequence(
            der.sequence(der.oid(NONCE_OID), der.octet_string(value)))))
    raw = der.sequence(der.sequence(*parts))
    fast = check_agrees(raw)
    assert fast is not None
    assert fast.cert_ids == tuple(cids)
    assert fast.nonce == (der.octet_string(nonce) if nonce is not None else None)
    assert parse_request(raw) == fast


@pytest.mark.parametrize("name", sorted(p.name for p in DATA.glob("req_*.der")))
def test_client_vectors_parse_as_pyasn1_does(name: str) -> None:
    raw = (DATA / name).read_bytes()
    fast = check_agrees(raw)
    assert fast is not None
    assert fast == parse_request_pyasn1(raw)


def test_limits_are_enforced_while_walking(monkeypatch: pytest.MonkeyPatch) -> None:
    """#9.4: 65..150 CertIDs, or 17 extensions, are refused by the walk itself: pyasn1's
    decoder is never called (it is not on the request path at all)."""
    calls = []
    monkeypatch.setattr(der_decoder, "decode", lambda *a, **k: calls.append(a))
    cid = make_cert_id("sha1", b"\x01" * 20, b"\x02" * 20, 5).der
    for count in (MAX_CERT_IDS + 1, 150):
        too_many = der.sequence(der.sequence(der.sequence(*[der.sequence(cid)] * count)))
        with pytest.raises(MalformedRequest, match="too many CertIDs"):
            parse_request(too_many)
    ext = [der.sequence(der.oid(f"1.2.3.{i}"), der.octet_string(b"")) for i in range(17)]
    many_ext = der.sequence(der.sequence(
        der.sequence(der.sequence(cid)), der.tlv(der.context(2), der.sequence(*ext))))
    with pytest.raises(MalformedRequest, match="too many extensions"):
        parse_request(many_ext)
    at_limit = der.sequence(der.sequence(der.sequence(*[der.sequence(cid)] * MAX_CERT_IDS)))
    assert len(parse_request(at_limit).cert_ids) == MAX_CERT_IDS
    assert calls == []
    monkeypatch.undo()
    assert check_agrees(at_limit) is not None


def test_walk_stops_at_the_limit_before_reading_further() -> None:
    """The 65th CertID ends the walk: bytes after it are never looked at (a request of
    64 good CertIDs then garbage is refused for its count, not its garbage)."""
    cid = make_cert_id("sha1", b"\x01" * 20, b"\x02" * 20, 5).der
    body = b"".join([der.sequence(cid)] * (MAX_CERT_IDS + 1)) + b"\x30\x03\xff\xff\xff"
    raw = der.sequence(der.sequence(der.tlv(der.SEQUENCE, body)))
    with pytest.raises(MalformedRequest, match="too many CertIDs"):
        parse_request(raw)
