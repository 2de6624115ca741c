"""Handles without a signer (``signer: none``): pre-signed responses served as they are.

cfssl signs its OCSP answers ahead of time (``cfssl ocsprefresh`` into the certdb's
``ocsp_responses`` table, ``cfssl ocspdump`` into a file of base64 lines) with a key on
disk. A handle with ``signer: none`` serves those bytes unchanged — like ``cfssl
ocspserve`` — from the same cache, fast path and HTTP processes as signed answers.

A request is matched by its CertID (hash algorithm, issuer name and key hashes, serial;
NULL or absent hash parameters alike). No match, or only an expired one, is answered
``unauthorized`` (RFC 5019 section 2.2.3: the responder has no authoritative answer); a
nonce is ignored (RFC 8954 allows it: the bytes are signed already); of several CertIDs
in one request the first is answered, as cfssl does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509 import ocsp
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime

from hsmocsp.cache import ResponseCache
from hsmocsp.errors import HsmOcspError, SignerError, UnknownIssuer, UnsupportedHashAlgorithm
from hsmocsp.handle import Handle, SignedResponse
from hsmocsp.health import READY, Health
from hsmocsp.ocsp.request import CertID, OCSPRequestInfo, cert_id_der, parse_request
from hsmocsp.sources import StatusSource

if TYPE_CHECKING:
    from hsmocsp.config import HandleConfig

__all__ = ["NoSigner", "PresignedHandle", "PresignedResponse", "PresignedSource", "parse_presigned"]

#: Lifetime given to a response without nextUpdate (RFC 6960 allows omitting it).
NO_NEXT_UPDATE_TTL = 3600.0


@dataclass(frozen=True, slots=True)
class PresignedResponse:
    """One SingleResponse of a pre-signed OCSPResponse: its CertID key and the whole bytes."""

    key: bytes
    serial: int
    der: bytes
    this_update: float
    next_update: float | None


def parse_presigned(der: bytes) -> list[PresignedResponse]:
    """The CertIDs a DER OCSPResponse answers; ValueError when it is not a usable one."""
    try:
        resp = ocsp.load_der_ocsp_response(der)
    except ValueError as err:
        raise ValueError(f"not a DER OCSPResponse ({err})") from err
    if resp.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise ValueError(f"response status is {resp.response_status.name}, not successful")
    out: list[PresignedResponse] = []
    for single in resp.responses:
        try:
            key = cert_id_der(
                single.hash_algorithm.name,
                single.issuer_name_hash,
                single.issuer_key_hash,
                single.serial_number,
            )
        except UnsupportedHashAlgorithm as err:
            raise ValueError(str(err)) from err
        nxt = single.next_update_utc
        out.append(
            PresignedResponse(
                key=key,
                serial=single.serial_number,
                der=der,
                this_update=single.this_update_utc.timestamp(),
                next_update=nxt.timestamp() if nxt is not None else None,
            )
        )
    if not out:
        raise ValueError("response answers no CertID")
    return out


class PresignedSource(StatusSource, Protocol):
    """A source that holds finished responses rather than statuses."""

    def responses(self) -> Sequence[PresignedResponse]:
        """Every response currently served (a change is announced with on_change(None))."""
        ...


class NoSigner:
    """The signer of a ``signer: none`` handle: ready, and never asked to sign."""

    signature_algorithm_der = b""

    def public_key(self) -> PublicKeyTypes:
        raise SignerError("this handle serves pre-signed responses and has no key")

    def start(self) -> Deferred[None]:
        return succeed(None)

    def stop(self) -> Deferred[None]:
        return succeed(None)

    def sign(self, data: bytes) -> Deferred[bytes]:
        return fail(SignerError("this handle serves pre-signed responses and has no key"))

    def check(self) -> Deferred[None]:
        return succeed(None)

    def health(self) -> Health:
        return READY  # nothing to sign with, nothing to go wrong


class PresignedHandle(Handle):
    """A handle that answers from a :class:`PresignedSource` only."""

    def __init__(
        self, config: HandleConfig, *, source: PresignedSource, clock: IReactorTime
    ) -> None:
        super().__init__(
            # Nonces cannot be echoed by a response signed elsewhere, in advance.
            replace(config, validity=NO_NEXT_UPDATE_TTL, nonce="ignore"),
            source=source,
            signer=NoSigner(),
            responder_cert=None,  # signs nothing, embeds nothing, never expires
            clock=clock,
            cache=ResponseCache(clock.seconds, max_entries=config.max_cached),
        )
        self.presigned_source = source
        self._keys: dict[bytes, bytes] = {}
        source.on_change(lambda _serials: self._fill())

    def prepare(self) -> None:
        self._fill()

    def _fill(self) -> None:
        """Put every current response in the cache (after the cache dropped the old ones)."""
        self.cache.invalidate(None)
        for r in self.presigned_source.responses():
            next_update = (
                r.next_update if r.next_update is not None else r.this_update + NO_NEXT_UPDATE_TTL
            )
            self.cache.put(
                r.key,
                r.serial,
                SignedResponse(
                    der=r.der,
                    produced_at=r.this_update,
                    this_update=r.this_update,
                    next_update=next_update,
                    refresh_at=next_update,  # nothing to refresh with: served until it expires
                    etag='"' + hashlib.sha256(r.der).hexdigest()[:32] + '"',
                    cacheable=True,
                ),
            )

    def _key(self, der: bytes) -> bytes:
        key = self._keys.get(der)
        if key is None:
            cid = parse_request(der).cert_ids[0]
            key = self._key_of(cid)
            if len(self._keys) >= self.max_memo:
                self._keys.clear()
            self._keys[der] = key
        return key

    @staticmethod
    def _key_of(cid: CertID) -> bytes:
        return cert_id_der(
            cid.hash_algorithm, cid.issuer_name_hash, cid.issuer_key_hash, cid.serial
        )

    def _answer(self, key: bytes) -> SignedResponse:
        found = self.cache.peek(key)
        if found is None:
            raise UnknownIssuer(f"handle {self.name}: no pre-signed response for this CertID")
        self.cache.count_hits(1)
        return found

    def respond_der(self, der: bytes) -> Deferred[SignedResponse] | SignedResponse:
        return self._answer(self._key(der))

    def cached_response(self, der: bytes) -> SignedResponse | None:
        try:
            return self._answer(self._key(der))
        except HsmOcspError:
            return None

    def respond(self, request: OCSPRequestInfo) -> Deferred[SignedResponse] | SignedResponse:
        return self._answer(self._key_of(request.cert_ids[0]))

    def produce_single(self, cid: CertID, issuer: x509.Certificate) -> Deferred[SignedResponse]:
        return fail(SignerError(f"handle {self.name} serves pre-signed responses only"))

    def restore(self, rows: Iterable[tuple[bytes, int, str, SignedResponse]]) -> Deferred[int]:
        return succeed(0)

    @property
    def signer_less(self) -> bool:
        return True
