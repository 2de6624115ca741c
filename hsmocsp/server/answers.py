"""The signer's answer to a forwarded request, as a server replica serves and caches it.

The signer answers with an OCSPResponse and RFC 5019 headers. A successful response
becomes a :class:`~hsmocsp.handle.SignedResponse` (its bytes unchanged); an error
status becomes the error that :func:`~hsmocsp.handle.ocsp_status_for` maps back to
the same status, so the client sees what the signer said (``tryLater`` stays
``tryLater``). Whether a server may keep the answer is read from the answer itself:
not when the signer said ``no-store``/``no-cache`` (a nonce's answer), not without a
nextUpdate, and never past the nextUpdate or the embedded certificate's notAfter;
until ``min(now + max-age, halfway to nextUpdate)`` it is served from the hot cache,
then looked up again (the store has the re-signed one by then).
"""

from __future__ import annotations

import hashlib
import math
import re

from cryptography.x509 import ocsp

from hsmocsp.errors import MalformedRequest, SignerUnavailable, UnknownIssuer, UpstreamFailed
from hsmocsp.handle import SignedResponse
from hsmocsp.ocsp.types import CertID
from hsmocsp.server.forward import SignerAnswer

__all__ = ["BadAnswer", "read_answer"]

_MAX_AGE = re.compile(rb"max-age=(\d+)")


class BadAnswer(ValueError):
    """The bytes are not an OCSP response a client could use."""


def read_answer(answer: SignerAnswer, asked: CertID | None, now: float) -> SignedResponse:
    """``answer`` as a SignedResponse (cacheable when it answers exactly ``asked``, the
    one CertID of a request a cached answer may answer, and the signer let caches keep it).

    Raises BadAnswer for bytes that are no OCSP response, or the mapped error for an
    OCSP error status.
    """
    try:
        parsed = ocsp.load_der_ocsp_response(answer.body)
    except ValueError as err:
        raise BadAnswer(f"not a DER OCSPResponse ({err})") from err
    status = parsed.response_status
    if status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise _status_error(status)
    try:
        singles = list(parsed.responses)
        certs = parsed.certificates
    except ValueError as err:
        raise BadAnswer(f"unreadable response ({err})") from err
    if not singles:
        raise BadAnswer("a successful response answering no CertID")
    first = singles[0]
    this_update = first.this_update_utc.timestamp()
    next_update_dt = first.next_update_utc
    next_update = next_update_dt.timestamp() if next_update_dt is not None else now
    cert_not_after = certs[0].not_valid_after_utc.timestamp() if certs else math.inf
    cc = answer.cache_control.lower()
    cacheable = (
        asked is not None
        and len(singles) == 1
        and next_update_dt is not None
        and b"no-store" not in cc
        and b"no-cache" not in cc
        and _answers(first, asked)
    )
    refresh_at = this_update + (next_update - this_update) / 2
    found = _MAX_AGE.search(cc)
    if found is not None:
        refresh_at = min(refresh_at, now + int(found.group(1)))
    refresh_at = max(refresh_at, min(now + 1.0, next_update))  # not a re-fetch per request
    return SignedResponse(
        der=answer.body,
        produced_at=parsed.produced_at_utc.timestamp(),
        this_update=this_update,
        next_update=next_update,
        refresh_at=min(refresh_at, next_update, cert_not_after),
        etag='"' + hashlib.sha256(answer.body).hexdigest()[:32] + '"',
        cacheable=cacheable,
        status_key=_status_key(first),
        cert_not_after=cert_not_after,
    )


def _answers(single: ocsp.OCSPSingleResponse, asked: CertID) -> bool:
    """Whether the SingleResponse answers the CertID asked about."""
    try:
        algorithm = single.hash_algorithm.name
    except Exception:  # an algorithm cryptography does not name: not ours to cache
        return False
    return (
        algorithm == asked.hash_algorithm
        and single.issuer_name_hash == asked.issuer_name_hash
        and single.issuer_key_hash == asked.issuer_key_hash
        and single.serial_number == asked.serial
    )


def _status_key(single: ocsp.OCSPSingleResponse) -> str:
    status = single.certificate_status
    if status is ocsp.OCSPCertStatus.GOOD:
        return "good"
    if status is ocsp.OCSPCertStatus.UNKNOWN:
        return "unknown"
    when = single.revocation_time_utc
    return f"revoked:{int(when.timestamp()) if when is not None else 0}:"


def _status_error(status: ocsp.OCSPResponseStatus) -> Exception:
    """The error :func:`~hsmocsp.handle.ocsp_status_for` turns into ``status``."""
    if status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST:
        return MalformedRequest("the signer answered malformedRequest")
    if status is ocsp.OCSPResponseStatus.UNAUTHORIZED:
        return UnknownIssuer("the signer does not serve this issuer (unauthorized)")
    if status is ocsp.OCSPResponseStatus.TRY_LATER:
        return SignerUnavailable("the signer answered tryLater")
    return UpstreamFailed(f"the signer answered {status.name}")
