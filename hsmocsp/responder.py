"""A handle: one URL path, one status source, one responder certificate and key.

The handle turns a parsed request into signed response bytes. It owns the
signed-response cache, so a cached answer costs a dict lookup: no pyasn1, no
HSM, no source. Everything that can fail is mapped to an OCSP response status
in exactly one place, :func:`ocsp_status_for`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from twisted.internet.defer import (
    Deferred,
    DeferredSemaphore,
    FirstError,
    gatherResults,
    succeed,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from hsmocsp.cache import ResponseCache
from hsmocsp.errors import (
    HsmOcspError,
    MalformedRequest,
    ResponderCertError,
    SignerUnavailable,
    SourceUnavailable,
    UnknownIssuer,
)
from hsmocsp.ocsp.request import CertID, OCSPRequestInfo, parse_request
from hsmocsp.ocsp.response import (
    ResponseStatus,
    SingleResponseData,
    build_ocsp_response,
    build_response_data,
    issuer_hashes,
    responder_key_hash,
)
from hsmocsp.signing import Signer
from hsmocsp.sources import StatusSource
from hsmocsp.status import CertStatus

log = Logger()

HASHES = ("sha1", "sha256", "sha384", "sha512")


def ocsp_status_for(failure: Failure) -> ResponseStatus:
    """The one place where an error becomes an OCSP response status."""
    if failure.check(MalformedRequest):
        return ResponseStatus.malformedRequest
    if failure.check(UnknownIssuer):
        return ResponseStatus.unauthorized
    if failure.check(SignerUnavailable, SourceUnavailable):
        return ResponseStatus.tryLater
    return ResponseStatus.internalError


@dataclass(frozen=True, slots=True)
class SignedResponse:
    """Signed response bytes plus what the HTTP layer needs for RFC 5019 headers."""

    der: bytes
    produced_at: float
    this_update: float
    next_update: float
    refresh_at: float
    etag: str
    cacheable: bool
    status_key: str = ""

    @property
    def expires_at(self) -> float:
        return self.next_update


def status_key(status: CertStatus) -> str:
    """A short, comparable summary of a status (persisted next to stored responses)."""
    if status.revocation_time is None:
        return status.status.value
    reason = "" if status.reason is None else str(int(status.reason))
    return f"revoked:{int(status.revocation_time.timestamp())}:{reason}"


def _ts(seconds: float) -> datetime:
    return datetime.fromtimestamp(int(seconds), tz=UTC)


def check_responder_cert(
    responder: x509.Certificate, issuer: x509.Certificate, signer_key: object, now: datetime
) -> None:
    """Refuse a responder certificate a client would reject (RFC 6960 section 4.2.2.2).

    The certificate must be the CA itself, or be issued by the CA and carry
    id-kp-OCSPSigning; it must be valid now, and its key must be the signer's.
    """
    subject = responder.subject.rfc4514_string()
    if responder != issuer:
        try:
            responder.verify_directly_issued_by(issuer)
        except (ValueError, TypeError) as err:
            raise ResponderCertError(
                f"responder certificate {subject!r} is not issued by "
                f"{issuer.subject.rfc4514_string()!r}: {err}"
            ) from err
        try:
            eku = responder.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            eku = None
        if eku is None or ExtendedKeyUsageOID.OCSP_SIGNING not in eku:
            raise ResponderCertError(
                f"responder certificate {subject!r} lacks extendedKeyUsage id-kp-OCSPSigning"
            )
    if not responder.not_valid_before_utc <= now <= responder.not_valid_after_utc:
        raise ResponderCertError(
            f"responder certificate {subject!r} is not valid now "
            f"({responder.not_valid_before_utc:%Y-%m-%d} .. "
            f"{responder.not_valid_after_utc:%Y-%m-%d})"
        )
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    ours = responder.public_key().public_bytes(enc, spki)
    theirs = signer_key.public_bytes(enc, spki)  # type: ignore[attr-defined]
    if ours != theirs:
        raise ResponderCertError(
            f"responder certificate {subject!r} does not match the signer's public key"
        )


class Handle:
    """One served CA (or Vault mount): request in, signed bytes out."""

    def __init__(
        self,
        *,
        name: str,
        path: str,
        source: StatusSource,
        signer: Signer,
        responder_cert: x509.Certificate,
        validity: float,
        refresh_fraction: float = 0.5,
        max_age: float | None = None,
        nonce_policy: str = "echo",
        now: Callable[[], float],
        cache: ResponseCache[SignedResponse] | None = None,
        publish_ca: str | None = None,
        publish_crl: str | None = None,
        on_signed: Callable[[str, float], None] | None = None,
        queue_depth: Callable[[], int] | None = None,
    ) -> None:
        self.name = name
        self.path = path
        self.source = source
        self.signer = signer
        self.responder_cert = responder_cert
        self.validity = validity
        self.refresh_fraction = refresh_fraction
        self.max_age = max_age
        self.nonce_policy = nonce_policy
        self._now = now
        self.cache: ResponseCache[SignedResponse] = cache or ResponseCache(now)
        self._issuer_index: dict[tuple[str, bytes, bytes], x509.Certificate] = {}
        self._indexed_issuers: tuple[x509.Certificate, ...] = ()
        self._key_hash = b""
        self._certs_der: tuple[bytes, ...] = ()
        self.publish_ca = publish_ca
        self.publish_crl = publish_crl
        self._on_signed = on_signed
        self.queue_depth = queue_depth or (lambda: 0)
        self.signatures = 0
        # Raw request bytes -> the CertID they asked about, for single-CertID requests
        # without a nonce: a repeated request then costs two dict lookups, no pyasn1.
        self._parsed: dict[bytes, tuple[CertID, x509.Certificate]] = {}
        self.max_memo = 100_000
        source.on_change(self.cache.invalidate)

    # --- start-up ------------------------------------------------------------------

    def prepare(self) -> None:
        """After source and signer started: check the responder certificate, index issuers."""
        key = self.signer.public_key()
        self._key_hash = responder_key_hash(key)
        self._reindex(check_with=key)
        is_ca = self.responder_cert in self._indexed_issuers
        self._certs_der = (
            () if is_ca else (self.responder_cert.public_bytes(serialization.Encoding.DER),)
        )

    def _reindex(self, check_with: object | None = None) -> None:
        issuers = tuple(self.source.issuers())
        now = _ts(self._now())
        served: list[x509.Certificate] = []
        problems: list[str] = []
        for issuer in issuers:
            try:
                check_responder_cert(
                    self.responder_cert, issuer, check_with or self.signer.public_key(), now
                )
            except ResponderCertError as err:
                problems.append(str(err))
                continue
            served.append(issuer)
        if not served:
            raise ResponderCertError(
                f"handle {self.name}: " + ("; ".join(problems) or "the source has no issuer")
            )
        for problem in problems:
            log.warn(
                "handle {handle}: not serving an issuer: {problem}",
                handle=self.name,
                problem=problem,
            )
        index: dict[tuple[str, bytes, bytes], x509.Certificate] = {}
        for issuer in served:
            for alg in HASHES:
                name_hash, key_hash = issuer_hashes(issuer, alg)
                index[(alg, name_hash, key_hash)] = issuer
        self._issuer_index = index
        self._parsed.clear()
        self._indexed_issuers = issuers

    def issuer_for(self, cert_id: CertID) -> x509.Certificate:
        issuers = self.source.issuers()
        if len(issuers) != len(self._indexed_issuers) or any(
            a is not b for a, b in zip(issuers, self._indexed_issuers, strict=False)
        ):
            self._reindex()
        issuer = self._issuer_index.get(
            (cert_id.hash_algorithm, cert_id.issuer_name_hash, cert_id.issuer_key_hash)
        )
        if issuer is None:
            raise UnknownIssuer(f"handle {self.name} does not serve this issuer")
        return issuer

    # --- answering -----------------------------------------------------------------

    def _memo(self, der: bytes) -> tuple[CertID, x509.Certificate] | OCSPRequestInfo:
        """What these request bytes ask: for a cacheable single-CertID request, the CertID
        and its issuer (remembered, so a repeat costs one dict lookup); else the request.

        Raises MalformedRequest / UnknownIssuer like :func:`parse_request` and
        :meth:`issuer_for`.
        """
        memo = self._parsed.get(der)
        if memo is not None:
            return memo
        request = parse_request(der)
        if len(request.cert_ids) == 1 and (request.nonce is None or self.nonce_policy == "ignore"):
            cid = request.cert_ids[0]
            memo = (cid, self.issuer_for(cid))
            if len(self._parsed) >= self.max_memo:
                self._parsed.clear()
            self._parsed[der] = memo
            return memo
        return request

    def respond_der(self, der: bytes) -> Deferred[SignedResponse] | SignedResponse:
        """Answer the DER of an OCSPRequest; the hot path for repeated requests."""
        memo = self._memo(der)
        if isinstance(memo, OCSPRequestInfo):
            return self.respond(memo)
        cid, issuer = memo
        return self.cache.get(cid.der, cid.serial, lambda: self._produce([cid], [issuer], None))

    def cached_response(self, der: bytes) -> SignedResponse | None:
        """The cached answer to these request bytes, or None; never starts a signature.

        This is what the HTTP fast path asks. Bytes seen before cost two dict lookups;
        new bytes are parsed once (a few microseconds for the usual shape), so a response
        made by pre-signing is served fast on its first request too. A response past its
        refresh point is still returned (and its refresh started) until it expires.
        """
        try:
            memo = self._memo(der)
        except HsmOcspError:
            return None  # the full path answers with the right OCSP status
        if isinstance(memo, OCSPRequestInfo):
            return None
        cid, issuer = memo
        if self.cache.peek(cid.der) is None:
            return None
        value = self.cache.get(cid.der, cid.serial, lambda: self._produce([cid], [issuer], None))
        return value if isinstance(value, SignedResponse) else None

    def respond(self, request: OCSPRequestInfo) -> Deferred[SignedResponse] | SignedResponse:
        """Answer a parsed request; a cache hit returns the bare value (no Deferred)."""
        issuers = [self.issuer_for(cid) for cid in request.cert_ids]
        nonce = request.nonce if self.nonce_policy == "echo" else None
        if len(request.cert_ids) == 1:
            cid = request.cert_ids[0]
            if nonce is None:
                return self.cache.get(
                    cid.der, cid.serial, lambda: self._produce([cid], issuers, None)
                )
            if self.signer_saturated():
                cached = self.cache.peek(cid.der)
                if cached is not None:
                    # RFC 8954 lets a responder drop the nonce; better than queueing behind the HSM.
                    return cached
        return self._produce(list(request.cert_ids), issuers, nonce)

    def signer_saturated(self) -> bool:
        """True when signatures are already waiting for a free HSM worker."""
        return self.queue_depth() > 0

    def produce_single(self, cid: CertID, issuer: x509.Certificate) -> Deferred[SignedResponse]:
        """Sign a fresh response for one CertID (the cache's producer; pre-signing)."""
        return self._produce([cid], [issuer], None)

    @property
    def key_hash(self) -> bytes:
        return self._key_hash

    def restore(self, rows: Iterable[tuple[bytes, int, str, SignedResponse]]) -> Deferred[int]:
        """Put persisted responses back in the cache if their status is still current.

        Each row's serial is looked up in the source; only rows whose status is
        unchanged are kept (a revocation that happened while we were down wins).
        """
        rows = list(rows)
        issuers = self.source.issuers()
        if not rows or not issuers:
            return succeed(0)
        issuer = issuers[0]
        kept = 0

        def check(status: CertStatus, row: tuple[bytes, int, str, SignedResponse]) -> None:
            nonlocal kept
            key, serial, stored, response = row
            if status_key(status) == stored:
                self.cache.put(key, serial, response)
                kept += 1

        # Bounded: a Vault source answers each lookup over HTTP.
        limit = DeferredSemaphore(32)
        lookups = []
        for row in rows:
            d = limit.run(self.source.status, issuer, row[1])
            d.addCallback(check, row)
            d.addErrback(lambda _: None)  # unreachable source: the row is simply not restored
            lookups.append(d)
        return gatherResults(lookups).addCallback(lambda _: kept)

    def _produce(
        self, cert_ids: Sequence[CertID], issuers: Sequence[x509.Certificate], nonce: bytes | None
    ) -> Deferred[SignedResponse]:
        if len(cert_ids) == 1:
            # The usual request: one lookup, no gatherResults (a third of the reactor's
            # Deferred work on the cache-miss path, measured).
            one = self.source.status(issuers[0], cert_ids[0].serial)
            return one.addCallback(lambda status: self._sign(cert_ids, [status], nonce))
        lookups = [
            self.source.status(issuer, cid.serial)
            for cid, issuer in zip(cert_ids, issuers, strict=True)
        ]
        d: Deferred[list[CertStatus]] = gatherResults(lookups, consumeErrors=True)
        d.addErrback(_first_error)
        return d.addCallback(lambda statuses: self._sign(cert_ids, statuses, nonce))

    def _sign(
        self, cert_ids: Sequence[CertID], statuses: Sequence[CertStatus], nonce: bytes | None
    ) -> Deferred[SignedResponse]:
        now = float(int(self._now()))
        this_update = _ts(now)
        next_update = _ts(now + self.validity)
        singles = [
            SingleResponseData(
                cert_id=cid, status=st, this_update=this_update, next_update=next_update
            )
            for cid, st in zip(cert_ids, statuses, strict=True)
        ]
        tbs = build_response_data(self._key_hash, this_update, singles, nonce)
        started = self._now()

        expires = now + self.validity

        def assemble(signature: bytes) -> SignedResponse:
            self.signatures += 1
            if self._on_signed is not None:
                self._on_signed(self.name, self._now() - started)
            der = build_ocsp_response(
                tbs, self.signer.signature_algorithm_der, signature, self._certs_der
            )
            return SignedResponse(
                der=der,
                produced_at=now,
                this_update=now,
                next_update=expires,
                # From the untruncated clock: thisUpdate drops the fraction of a second,
                # the pre-signing schedule need not (a refresh point up to 1 s early).
                refresh_at=min(started + self.validity * self.refresh_fraction, expires),
                etag='"' + hashlib.sha256(der).hexdigest()[:32] + '"',
                cacheable=nonce is None,
                status_key=status_key(statuses[0]) if len(statuses) == 1 else "",
            )

        return self.signer.sign(tbs).addCallback(assemble)

    def now(self) -> float:
        """The handle's clock (the reactor's, or a test's)."""
        return self._now()

    def max_age_for(self, response: SignedResponse) -> int:
        remaining = response.next_update - self._now()
        if self.max_age is not None:
            remaining = min(remaining, self.max_age)
        return max(0, int(remaining))

    def ready(self) -> bool:
        return self.source.ready() and bool(self._issuer_index)


def _first_error(failure: Failure) -> Failure:
    """gatherResults wraps errors in FirstError; unwrap so the status mapping sees the cause."""
    if isinstance(failure.value, FirstError):
        inner: Failure = failure.value.subFailure
        return inner
    return failure
