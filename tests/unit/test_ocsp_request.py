"""Tests for hsmocsp.ocsp.request: real client requests, edge cases, GET encodings, fuzzing."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1_modules import rfc6960

from hsmocsp.errors import MalformedRequest, UnsupportedHashAlgorithm
from hsmocsp.ocsp import der
from hsmocsp.ocsp.request import (
    MAX_CERT_IDS,
    NONCE_OID,
    cert_id_der,
    decode_get_path,
    make_cert_id,
    parse_request,
)
from hsmocsp.ocsp.response import issuer_hashes

DATA = Path(__file__).resolve().parent.parent / "testdata" / "ocsp"
CA = x509.load_pem_x509_certificate((DATA / "ca.pem").read_bytes())
RESPONDER = x509.load_pem_x509_certificate((DATA / "responder_rsa.pem").read_bytes())
HASH_LENGTHS = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}
SHA1_OID_DER = der.oid("1.3.14.3.2.26")


def _vector(name: str) -> bytes:
    return (DATA / name).read_bytes()


def _original_cert_ids(request: bytes) -> list[bytes]:
    """The CertIDs of a request re-encoded by pyasn1 (an independent DER encoder)."""
    decoded, rest = der_decoder.decode(request, asn1Spec=rfc6960.OCSPRequest())
    assert not rest
    return [
        der_encoder.encode(single["reqCert"])
        for single in decoded["tbsRequest"]["requestList"]
    ]


def _extension(oid: str, value: bytes, critical: bool = False) -> bytes:
    flag = b"\x01\x01\xff" if critical else b""
    return der.sequence(der.oid(oid), flag, der.octet_string(value))


def _request(
    cert_ids: list[bytes],
    extensions: list[bytes] | None = None,
    single_extensions: list[bytes] | None = None,
    version: int | None = None,
) -> bytes:
    """Hand-build an OCSPRequest (for shapes no client library will produce)."""
    singles = []
    for cid in cert_ids:
        extra = b""
        if single_extensions:
            extra = der.tlv(der.context(0), der.sequence(*single_extensions))
        singles.append(der.sequence(cid, extra))
    parts = []
    if version is not None:
        parts.append(der.tlv(der.context(0), der.integer(version)))
    parts.append(der.sequence(*singles))
    if extensions:
        parts.append(der.tlv(der.context(2), der.sequence(*extensions)))
    return der.sequence(der.sequence(*parts))


def _sha1_cert_id(serial: int = 7) -> bytes:
    name_hash, key_hash = issuer_hashes(CA, "sha1")
    return cert_id_der("sha1", name_hash, key_hash, serial)


def _nonce_request(nonce_value: bytes, critical: bool = False) -> bytes:
    return _request([_sha1_cert_id()], [_extension(NONCE_OID, nonce_value, critical)])


# --- requests made by real clients ---------------------------------------------------------

OPENSSL_VECTORS = {
    # name: (hash per CertID, serials, has nonce)
    "req_openssl_sha1_nonce.der": (["sha1"], [0x1001], True),
    "req_openssl_sha1.der": (["sha1"], [4097], False),
    "req_openssl_sha256_multi.der": (["sha256"] * 3, [1, 0x1001, 0xDEADBEEF], False),
    "req_openssl_sha384.der": (["sha384"], [4097], False),
    "req_openssl_sha512_nonce.der": (["sha512"], [4097], True),
    "req_openssl_mixed.der": (["sha1", "sha512"], [7, 8], False),
    "req_crypto_sha1.der": (["sha1"], [RESPONDER.serial_number], False),
    "req_crypto_sha256_nonce32.der": (["sha256"], [RESPONDER.serial_number], True),
    "req_crypto_sha384_nonce1.der": (["sha384"], [RESPONDER.serial_number], True),
    "req_crypto_sha256_nonce128.der": (["sha256"], [RESPONDER.serial_number], True),
}


@pytest.mark.parametrize("name", sorted(OPENSSL_VECTORS))
def test_client_vectors(name: str) -> None:
    algorithms, serials, has_nonce = OPENSSL_VECTORS[name]
    raw = _vector(name)
    info = parse_request(raw)
    assert [c.hash_algorithm for c in info.cert_ids] == algorithms
    assert [c.serial for c in info.cert_ids] == serials
    assert [c.der for c in info.cert_ids] == _original_cert_ids(raw)
    for cid in info.cert_ids:
        assert cid.der in raw  # echoed byte for byte
        assert len(cid.issuer_name_hash) == HASH_LENGTHS[cid.hash_algorithm]
        assert (cid.issuer_name_hash, cid.issuer_key_hash) == issuer_hashes(
            CA, cid.hash_algorithm
        )
        assert cid == make_cert_id(
            cid.hash_algorithm, cid.issuer_name_hash, cid.issuer_key_hash, cid.serial
        )
    if has_nonce:
        assert info.nonce is not None
        assert info.nonce[0] == 0x04
        assert info.nonce[1] == len(info.nonce) - 2 or info.nonce[1:3] == b"\x81\x80"
        assert info.nonce in raw
    else:
        assert info.nonce is None


def test_openssl_nonce_is_16_octets() -> None:
    info = parse_request(_vector("req_openssl_sha1_nonce.der"))
    assert info.nonce is not None and len(info.nonce) == 18


@pytest.mark.parametrize(
    ("algorithm", "name"),
    [
        (hashes.SHA1(), "sha1"),
        (hashes.SHA256(), "sha256"),
        (hashes.SHA384(), "sha384"),
        (hashes.SHA512(), "sha512"),
    ],
)
def test_cryptography_builder_each_hash(algorithm: hashes.HashAlgorithm, name: str) -> None:
    built = ocsp.OCSPRequestBuilder().add_certificate(RESPONDER, CA, algorithm).build()
    raw = built.public_bytes(serialization.Encoding.DER)
    (cid,) = parse_request(raw).cert_ids
    assert cid.hash_algorithm == name
    assert cid.serial == RESPONDER.serial_number
    assert cid.issuer_name_hash == built.issuer_name_hash
    assert cid.issuer_key_hash == built.issuer_key_hash
    assert cid.der in raw


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_fresh_openssl_request(tmp_path: Path) -> None:
    out = tmp_path / "req.der"
    subprocess.run(
        ["openssl", "ocsp", "-sha256", "-issuer", str(DATA / "ca.pem"),
         "-serial", "42", "-serial", "0x0102030405060708090a0b0c0d0e0f1011121314",
         "-reqout", str(out)],
        check=True, capture_output=True,
    )
    info = parse_request(out.read_bytes())
    assert [c.serial for c in info.cert_ids] == [42, 0x0102030405060708090A0B0C0D0E0F1011121314]
    assert info.nonce is not None and len(info.nonce) == 18


# --- nonce -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 16, 32, 33, 64, 127, 128])
def test_nonce_sizes_accepted(size: int) -> None:
    value = der.octet_string(bytes(range(size)))
    assert parse_request(_nonce_request(value)).nonce == value
    built = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(RESPONDER, CA, hashes.SHA1())
        .add_extension(x509.OCSPNonce(b"\x01" * size), critical=False)
        .build()
    )
    info = parse_request(built.public_bytes(serialization.Encoding.DER))
    assert info.nonce == der.octet_string(b"\x01" * size)


@pytest.mark.parametrize("size", [0, 129, 200, 1000])
def test_nonce_sizes_refused(size: int) -> None:
    with pytest.raises(MalformedRequest, match="nonce"):
        parse_request(_nonce_request(der.octet_string(b"\x07" * size)))


def test_nonce_sizes_refused_from_cryptography_builder() -> None:
    for size in (0, 129):
        built = (
            ocsp.OCSPRequestBuilder()
            .add_certificate(RESPONDER, CA, hashes.SHA1())
            .add_extension(x509.OCSPNonce(b"\x01" * size), critical=False)
            .build()
        )
        with pytest.raises(MalformedRequest):
            parse_request(built.public_bytes(serialization.Encoding.DER))


@pytest.mark.parametrize(
    "value",
    [
        b"",  # nothing
        b"\x01\x02\x03\x04",  # raw nonce without the inner OCTET STRING (pre-RFC 8954 bug)
        b"\x04\x05\x01",  # length overruns
        b"\x04\x01\x01\x00",  # trailing byte
        b"\x04\x81\x01\x01",  # non-minimal length form
        b"\x04\x82\x00\x81" + b"\x01" * 129,  # non-minimal long form
        b"\x04\x81\x80" + b"\x01" * 127,  # long form overruns
    ],
)
def test_badly_encoded_nonce(value: bytes) -> None:
    with pytest.raises(MalformedRequest):
        parse_request(_nonce_request(value))


def test_critical_nonce_is_fine() -> None:
    value = der.octet_string(b"abc")
    assert parse_request(_nonce_request(value, critical=True)).nonce == value


def test_duplicate_nonce_refused() -> None:
    ext = _extension(NONCE_OID, der.octet_string(b"abc"))
    with pytest.raises(MalformedRequest, match="duplicate"):
        parse_request(_request([_sha1_cert_id()], [ext, ext]))


# --- structure -----------------------------------------------------------------------------


def test_unknown_extensions() -> None:
    unknown = "1.2.3.4.5"
    info = parse_request(_request([_sha1_cert_id()], [_extension(unknown, b"\x05\x00")]))
    assert info.nonce is None
    with pytest.raises(MalformedRequest, match="critical"):
        parse_request(_request([_sha1_cert_id()], [_extension(unknown, b"\x05\x00", True)]))
    with pytest.raises(MalformedRequest, match="critical"):
        parse_request(
            _request([_sha1_cert_id()], single_extensions=[_extension(unknown, b"", True)])
        )
    parse_request(_request([_sha1_cert_id()], single_extensions=[_extension(unknown, b"")]))


def test_empty_request_list() -> None:
    with pytest.raises(MalformedRequest, match="empty"):
        parse_request(_request([]))


def test_cert_id_limit() -> None:
    ids = [_sha1_cert_id(serial) for serial in range(MAX_CERT_IDS)]
    assert len(parse_request(_request(ids)).cert_ids) == MAX_CERT_IDS
    with pytest.raises(MalformedRequest, match="too many"):
        parse_request(_request([*ids, _sha1_cert_id(1000)]))


def test_version() -> None:
    assert parse_request(_request([_sha1_cert_id()], version=0)).cert_ids
    with pytest.raises(MalformedRequest, match="version"):
        parse_request(_request([_sha1_cert_id()], version=1))


@pytest.mark.parametrize(
    ("serial", "encoded"),
    [
        (0, "020100"),
        (127, "02017f"),
        (128, "02020080"),
        (256, "02020100"),
        (-1, "0201ff"),
        (-128, "020180"),  # pyasn1 wrongly re-encodes this as 0202ff80
        (-129, "0202ff7f"),
        (2**158 + 5, "0214" + (2**158 + 5).to_bytes(20, "big").hex()),
        (2**159 + 5, "021500" + (2**159 + 5).to_bytes(20, "big").hex()),
    ],
)
def test_serial_edge_values(serial: int, encoded: str) -> None:
    raw = _request([_sha1_cert_id(serial)])
    (cid,) = parse_request(raw).cert_ids
    assert cid.serial == serial
    assert cid.der.endswith(bytes.fromhex(encoded))
    assert cid.der in raw


def test_absent_hash_parameters_are_echoed_absent() -> None:
    name_hash, key_hash = issuer_hashes(CA, "sha256")
    raw_id = cert_id_der("sha256", name_hash, key_hash, 9, null_params=False)
    (cid,) = parse_request(_request([raw_id])).cert_ids
    assert cid.der == raw_id
    assert b"\x05\x00" not in cid.der[:20]


def _cert_id_with(alg: bytes, name_hash: bytes, key_hash: bytes) -> bytes:
    return der.sequence(alg, der.octet_string(name_hash), der.octet_string(key_hash),
                        der.integer(1))


def test_unsupported_hash_algorithm() -> None:
    md5 = der.sequence(der.oid("1.2.840.113549.2.5"), b"\x05\x00")
    with pytest.raises(UnsupportedHashAlgorithm):
        parse_request(_request([_cert_id_with(md5, b"a" * 16, b"b" * 16)]))
    sha224 = der.sequence(der.oid("2.16.840.1.101.3.4.2.4"))
    with pytest.raises(UnsupportedHashAlgorithm):
        parse_request(_request([_cert_id_with(sha224, b"a" * 28, b"b" * 28)]))


def test_hash_length_must_match() -> None:
    sha1 = der.sequence(SHA1_OID_DER, b"\x05\x00")
    with pytest.raises(MalformedRequest, match="length"):
        parse_request(_request([_cert_id_with(sha1, b"a" * 32, b"b" * 20)]))
    with pytest.raises(MalformedRequest, match="length"):
        parse_request(_request([_cert_id_with(sha1, b"a" * 20, b"b" * 19)]))


def test_hash_parameters_must_be_null_or_absent() -> None:
    weird = der.sequence(SHA1_OID_DER, der.integer(5))
    with pytest.raises(MalformedRequest, match="NULL"):
        parse_request(_request([_cert_id_with(weird, b"a" * 20, b"b" * 20)]))


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00",
        b"\x30\x00",
        b"\x30\x80\x00\x00",  # indefinite length
        b"GET / HTTP/1.1\r\n\r\n",
        _vector("req_openssl_sha1.der")[:-1],  # truncated
        _vector("req_openssl_sha1.der") + b"\x00",  # trailing byte
        _vector("req_openssl_sha1.der") * 2,  # two requests
    ],
)
def test_garbage(raw: bytes) -> None:
    with pytest.raises(MalformedRequest):
        parse_request(raw)


# --- GET encodings --------------------------------------------------------------------


def _tricky_request() -> bytes:
    """A valid request whose base64 has '+', '/' and '=' padding."""
    for i in range(10000):
        raw = _nonce_request(der.octet_string(i.to_bytes(4, "big") * 4 + b"x" * (i % 3)))
        text = base64.b64encode(raw).decode()
        if "+" in text and "/" in text and text.endswith("="):
            return raw
    raise AssertionError("no tricky request found")


TRICKY = _tricky_request()
B64 = base64.b64encode(TRICKY).decode()


@pytest.mark.parametrize(
    "path",
    [
        B64,  # raw '/' and '+' inside the base64
        quote(B64, safe=""),  # %2F %2B %3D
        re.sub("%[0-9A-F]{2}", lambda m: m.group(0).lower(), quote(B64, safe="")),
        quote(B64, safe="/"),  # only + and = escaped
        "/" + B64,  # AIA URL with trailing slash -> '//'
        "//" + quote(B64, safe=""),
        B64.replace("+", " "),  # a form-decoder turned '+' into a space
        B64.replace("+", "%20"),
        B64.rstrip("="),  # missing padding
        quote(B64.rstrip("="), safe=""),
        B64.replace("+", "-").replace("/", "_"),  # url-safe alphabet
        B64.replace("+", "-").replace("/", "_").rstrip("="),
    ],
)
def test_get_encodings(path: str) -> None:
    assert decode_get_path(path) == TRICKY
    assert parse_request(decode_get_path(path)).nonce is not None


@pytest.mark.parametrize(
    "path",
    ["", "/", "//", "===", "MA", "M", "MAAA!", "%zz" + B64, B64 + "é", B64 + "?x=1",
     B64[:-2] + "%00%00", "M\nAA"],
)
def test_get_invalid(path: str) -> None:
    with pytest.raises(MalformedRequest):
        parse_request(decode_get_path(path))


# --- fuzzing ---------------------------------------------------------------------------

SEEDS = [_vector(n) for n in sorted(OPENSSL_VECTORS)]


def _parses_or_malformed(raw: bytes) -> None:
    try:
        info = parse_request(raw)
    except MalformedRequest:
        return
    # parses => every CertID round-trips: pyasn1 re-encodes our echo to the same bytes
    assert info.cert_ids
    for cid in info.cert_ids:
        decoded, rest = der_decoder.decode(cid.der, asn1Spec=rfc6960.CertID())
        assert not rest
        assert int(decoded["serialNumber"]) == cid.serial
        assert bytes(decoded["issuerNameHash"]) == cid.issuer_name_hash
        assert bytes(decoded["issuerKeyHash"]) == cid.issuer_key_hash
        if cid.serial >= 0:  # pyasn1 mis-encodes some negative integers (e.g. -128)
            assert der_encoder.encode(decoded) == cid.der


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(raw: bytes) -> None:
    _parses_or_malformed(raw)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(SEEDS),
    st.lists(st.tuples(st.integers(0, 10000), st.integers(0, 255)), min_size=1, max_size=4),
    st.integers(0, 3),
    st.binary(max_size=8),
)
def test_fuzz_mutated_requests(
    seed: bytes, flips: list[tuple[int, int]], mode: int, extra: bytes
) -> None:
    data = bytearray(seed)
    for pos, value in flips:
        data[pos % len(data)] = value
    if mode == 1:
        data = data[: flips[0][0] % len(data)]
    elif mode == 2:
        pos = flips[0][0] % len(data)
        data[pos:pos] = extra
    elif mode == 3:
        data += extra
    _parses_or_malformed(bytes(data))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_get_path(path: str) -> None:
    try:
        decode_get_path(path)
    except MalformedRequest:
        pass
