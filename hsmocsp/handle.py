"""A handle: one URL path, one status source, one responder certificate and key.

The handle turns a parsed request into signed response bytes. It owns the
signed-response cache, so a cached answer costs a dict lookup: no pyasn1, no
HSM, no source. Everything that can fail is mapped to an OCSP response status
in exactly one place, :func:`ocsp_status_for`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, cast

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
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from hsmocsp.cache import ResponseCache
from hsmocsp.errors import (
    HsmOcspError,
    MalformedRequest,
    ResponderCertError,
    ResponderCertExpired,
    SignerUnavailable,
    SourceUnavailable,
    StoreUnavailable,
    UnknownIssuer,
)
from hsmocsp.health import READY, Health, State, log_handle_change, worst
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

if TYPE_CHECKING:
    from hsmocsp.config import HandleConfig

log = Logger()

HASHES = ("sha1", "sha256", "sha384", "sha512")


def ocsp_status_for(failure: Failure) -> ResponseStatus:
    """The one place where an error becomes an OCSP response status."""
    if failure.check(MalformedRequest):
        return ResponseStatus.malformedRequest
    if failure.check(UnknownIssuer):
        return ResponseStatus.unauthorized
    if failure.check(SignerUnavailable, SourceUnavailable, StoreUnavailable, ResponderCertExpired):
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
    cert_fp: bytes = b""
    """SHA-256 of the responder certificate it was made with (b"": not known yet, as
    read back from the store before :meth:`Handle.restore` has looked)."""
    cert_not_after: float = math.inf
    """When that certificate expires: the response is worthless from then on."""

    @property
    def expires_at(self) -> float:
        """Served until its nextUpdate, and never past its certificate's notAfter
        (a client rejects a response whose signer certificate has expired)."""
        return min(self.next_update, self.cert_not_after)

    def is_unknown(self) -> bool:
        """Answers ``unknown``: kept apart by the cache, never stored (anyone can ask
        for any number of serials nobody issued)."""
        return self.status_key == "unknown"


def status_key(status: CertStatus) -> str:
    """A short, comparable summary of a status (persisted next to stored responses)."""
    if status.revocation_time is None:
        return status.status.value
    reason = "" if status.reason is None else str(int(status.reason))
    return f"revoked:{int(status.revocation_time.timestamp())}:{reason}"


def _ts(seconds: float) -> datetime:
    return datetime.fromtimestamp(int(seconds), tz=UTC)


@dataclass(frozen=True, slots=True, eq=False)
class ResponderCert:
    """The responder certificate a handle embeds, with what is compared on the hot path."""

    cert: x509.Certificate
    der: bytes
    fp: bytes
    not_before: float
    not_after: float

    @classmethod
    def of(cls, cert: x509.Certificate) -> ResponderCert:
        der = cert.public_bytes(serialization.Encoding.DER)
        return cls(
            cert=cert,
            der=der,
            fp=hashlib.sha256(der).digest(),
            not_before=cert.not_valid_before_utc.timestamp(),
            not_after=cert.not_valid_after_utc.timestamp(),
        )

    @classmethod
    def absent(cls) -> ResponderCert:
        """For a handle that signs nothing (``signer: none``, pre-signed responses): it
        embeds no certificate and never expires. Its ``cert`` must never be read."""
        return cls(
            cert=cast(x509.Certificate, None),
            der=b"",
            fp=b"",
            not_before=float("-inf"),
            not_after=float("inf"),
        )

    def describe(self) -> str:
        return (
            f"{self.cert.subject.rfc4514_string()!r} (serial {self.cert.serial_number:X}, "
            f"notAfter {self.cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC)"
        )


def check_responder_cert(
    responder: x509.Certificate,
    issuer: x509.Certificate,
    signer_key: object,
    now: datetime,
    *,
    check_validity: bool = True,
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
    if check_validity and not (
        responder.not_valid_before_utc <= now <= responder.not_valid_after_utc
    ):
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
        config: HandleConfig,
        *,
        source: StatusSource,
        signer: Signer,
        responder_cert: x509.Certificate | None,
        clock: IReactorTime,
        cache: ResponseCache[SignedResponse] | None = None,
        on_signed: Callable[[str, float], None] | None = None,
        queue_depth: Callable[[], int] | None = None,
    ) -> None:
        """``config`` was validated when it was read; ``responder_cert`` is the
        certificate its ``responder_cert`` file holds (loaded by the builder, which names
        the key if it cannot). ``cache`` defaults to one sized by ``max_cached`` and
        ``max_unknown_cached``; ``queue_depth`` is the signing queue's (metrics)."""
        self.config = config
        self.name = config.name
        self.path = config.path
        self.source = source
        self.signer = signer
        self._cert = (
            ResponderCert.of(responder_cert)
            if responder_cert is not None
            else ResponderCert.absent()
        )
        self.validity = config.validity
        self.refresh_fraction = config.refresh_fraction
        self.max_age = config.max_age
        self.nonce_policy: str = config.nonce
        self._now = now = clock.seconds
        # "is not None": an empty cache is falsy (it has a length), and ``cache or ...``
        # silently replaced the configured one (max_cached, max_unknown_cached) by defaults.
        self.cache: ResponseCache[SignedResponse] = (
            cache
            if cache is not None
            else ResponseCache(
                now,
                max_entries=config.max_cached,
                transient=SignedResponse.is_unknown,
                max_transient=config.max_unknown_cached,
            )
        )
        self._issuer_index: dict[tuple[str, bytes, bytes], x509.Certificate] = {}
        self._indexed_issuers: tuple[x509.Certificate, ...] = ()
        self._key_hash = b""
        self._certs_der: tuple[bytes, ...] = ()
        self.publish_ca = config.publish_ca
        self.publish_crl = config.publish_crl
        self._signed_listeners: list[Callable[[str, float], None]] = (
            [on_signed] if on_signed is not None else []
        )
        self.queue_depth = queue_depth or (lambda: 0)
        self.signatures = 0
        # Raw request bytes -> the CertID they asked about, for single-CertID requests
        # without a nonce: a repeated request then costs two dict lookups, no pyasn1.
        self._parsed: dict[bytes, tuple[CertID, x509.Certificate]] = {}
        self.max_memo = 100_000
        self._cert_listeners: list[Callable[[], None]] = []
        self._crl_memo: tuple[bytes, float | None] | None = None
        self._health: Health | None = None
        self._parts: list[tuple[str, object]] = []
        source.on_change(self.cache.invalidate)

    @property
    def responder_cert(self) -> x509.Certificate:
        return self._cert.cert

    @property
    def cert_fp(self) -> bytes:
        """SHA-256 of the current responder certificate (compare ``SignedResponse.cert_fp``)."""
        return self._cert.fp

    @property
    def cert_not_after(self) -> float:
        """The responder certificate's notAfter (seconds since the epoch)."""
        return self._cert.not_after

    # --- start-up ------------------------------------------------------------------

    def prepare(self) -> None:
        """After source and signer started: check the responder certificate, index issuers."""
        key = self.signer.public_key()
        self._key_hash = responder_key_hash(key)
        self._reindex(check_with=key)
        self._certs_der = self._embedded(self._cert)

    def _embedded(self, cert: ResponderCert) -> tuple[bytes, ...]:
        """The ``certs`` of a response: none when the CA signs itself (RFC 6960 4.2.2.2)."""
        return () if cert.cert in self._indexed_issuers else (cert.der,)

    def _reindex(self, check_with: object | None = None, check_validity: bool = True) -> None:
        issuers = tuple(self.source.issuers())
        served, problems = self._served_by(self._cert, issuers, check_with, check_validity)
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

    def _served_by(
        self,
        cert: ResponderCert,
        issuers: Sequence[x509.Certificate],
        check_with: object | None = None,
        check_validity: bool = True,
    ) -> tuple[list[x509.Certificate], list[str]]:
        """The issuers ``cert`` may answer for (start-up's checks), and why not the others.

        ``check_validity=False`` when the source's issuers change under a running handle:
        an expired certificate is :meth:`health`'s and :meth:`_sign`'s business there.
        """
        now = _ts(self._now())
        served: list[x509.Certificate] = []
        problems: list[str] = []
        for issuer in issuers:
            try:
                check_responder_cert(
                    cert.cert,
                    issuer,
                    check_with or self.signer.public_key(),
                    now,
                    check_validity=check_validity,
                )
            except ResponderCertError as err:
                problems.append(str(err))
                continue
            served.append(issuer)
        return served, problems

    # --- the responder certificate over time ------------------------------------------

    def replace_responder_cert(self, cert: x509.Certificate, recheck: bool = False) -> bool:
        """Use a renewed responder certificate from now on (SIGHUP); False if unchanged.

        The new certificate passes the start-up checks against the source's issuers
        as they are now (issued by the CA with id-kp-OCSPSigning, valid now, the
        signer's key) or :class:`ResponderCertError` says why and the current one
        stays. ``recheck``: check an unchanged certificate too (the issuer changed).
        Responses made with the previous certificate are served only while it is
        valid, and listeners (:meth:`on_certificate_change`; the pre-signer) re-sign
        them first.
        """
        new = ResponderCert.of(cert)
        if new.fp == self._cert.fp and not recheck:
            return False
        served, problems = self._served_by(new, tuple(self.source.issuers()))
        if not served:
            raise ResponderCertError("; ".join(problems) or "the source has no issuer")
        changed = new.fp != self._cert.fp
        self._cert = new if changed else self._cert
        self._reindex()
        self._certs_der = self._embedded(self._cert)
        if not changed:
            return False
        stale = self._mark_stale()
        log.info(
            "handle {handle}: responder certificate is now {cert}; {n} response(s) made with "
            "the previous one are re-signed first",
            handle=self.name,
            cert=new.describe(),
            n=stale,
        )
        for listener in list(self._cert_listeners):
            listener()
        return True

    def on_signature(self, listener: Callable[[str, float], None]) -> None:
        """Call ``listener(handle name, seconds)`` after each signature this handle made
        (the metrics' signing-latency histogram)."""
        self._signed_listeners.append(listener)

    def on_certificate_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after the responder certificate changed (then ask
        :meth:`stale_by_certificate` what to re-sign)."""
        self._cert_listeners.append(listener)

    def stale_by_certificate(self) -> list[tuple[bytes, int]]:
        """``(cache key, serial)`` of every cached response made with another responder
        certificate than the current one: re-sign these before anything else."""
        fp = self._cert.fp
        return [(key, serial) for key, serial, value in self.cache.items() if value.cert_fp != fp]

    def _mark_stale(self) -> int:
        """Make responses of another certificate due for refresh now: still served (until
        that certificate or the response expires), but a request for one re-signs it, and
        the HTTP fronts, which never serve past the refresh point, leave it to us."""
        now = self._now()
        stale = 0
        for key, serial, value in self.cache.items():
            if value.cert_fp != self._cert.fp:
                stale += 1
                if value.refresh_at > now:
                    self.cache.put(key, serial, dataclasses.replace(value, refresh_at=now))
        return stale

    def issuer_for(self, cert_id: CertID) -> x509.Certificate:
        issuers = self.source.issuers()
        if len(issuers) != len(self._indexed_issuers) or any(
            a is not b for a, b in zip(issuers, self._indexed_issuers, strict=False)
        ):
            self._reindex(check_validity=False)
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
            if self.cache.holds(cid.der):
                # Only bytes whose answer is cached for good (a second ask of a real
                # certificate): a flood of random serials must not grow this map.
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
                    # RFC 9654 lets a responder drop the nonce; better than queueing behind the HSM.
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
        A row whose embedded responder certificate has expired is dropped; one made
        with an earlier (renewed) certificate that is still valid comes back due for
        re-signing, first in line (:meth:`stale_by_certificate`).
        """
        rows = self._with_certificates(rows)
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

    def _with_certificates(
        self, rows: Iterable[tuple[bytes, int, str, SignedResponse]]
    ) -> list[tuple[bytes, int, str, SignedResponse]]:
        """Stored rows labelled with the responder certificate embedded in each.

        The certificate's DER is inside the response bytes, so a substring test
        against the few certificates seen (the current one, a renewed one) labels a
        row; only a row carrying a certificate not seen yet is parsed. Rows whose
        certificate has expired, or that expire themselves, are left out.
        """
        now = self._now()
        current = self._cert
        seen: list[ResponderCert] = []
        out: list[tuple[bytes, int, str, SignedResponse]] = []
        dropped = 0
        for key, serial, stored, response in rows:
            cert: ResponderCert | None
            if not self._certs_der or current.der in response.der:
                cert = current  # the CA signs itself (no certs), or the current certificate
            else:
                cert = next((c for c in seen if c.der in response.der), None)
                if cert is None:
                    cert = _embedded_cert(response.der)
                    if cert is not None:
                        seen.append(cert)
            if cert is None or now >= min(response.next_update, cert.not_after):
                dropped += 1
                continue
            # A cache hit before refresh_at is served without looking at expiry: keep it
            # within the certificate's life (rows written before nextUpdate was capped).
            refresh_at = min(response.refresh_at, cert.not_after)
            if cert is not current:
                refresh_at = min(refresh_at, now)
            response = dataclasses.replace(
                response, cert_fp=cert.fp, cert_not_after=cert.not_after, refresh_at=refresh_at
            )
            out.append((key, serial, stored, response))
        if dropped:
            log.info(
                "handle {handle}: {n} stored response(s) not restored: their responder "
                "certificate has expired",
                handle=self.name,
                n=dropped,
            )
        return out

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
        cert = self._cert
        if not cert.not_before <= now < cert.not_after:
            # Nothing signed now could be verified; say so to the client (tryLater) until
            # a renewed certificate is loaded.
            raise ResponderCertExpired(
                f"handle {self.name}: responder certificate {cert.describe()} is not valid now"
            )
        # nextUpdate never later than the certificate's notAfter: past it the response
        # could not be verified anyway, and a cache must not keep it that long.
        next_ts = float(min(now + self.validity, math.floor(cert.not_after)))
        this_update = _ts(now)
        next_update = _ts(next_ts)
        singles = [
            SingleResponseData(
                cert_id=cid, status=st, this_update=this_update, next_update=next_update
            )
            for cid, st in zip(cert_ids, statuses, strict=True)
        ]
        tbs = build_response_data(self._key_hash, this_update, singles, nonce)
        started = self._now()
        # From the untruncated clock: thisUpdate drops the fraction of a second, the
        # pre-signing schedule need not (a refresh point up to 1 s early).
        refresh_ts = min(started + self.validity * self.refresh_fraction, next_ts)

        def assemble(signature: bytes) -> SignedResponse:
            self.signatures += 1
            if self._signed_listeners:
                took = self._now() - started
                for listener in self._signed_listeners:
                    listener(self.name, took)
            # The certificate may have been renewed while the HSM signed (same key, so the
            # signature holds): embed the current one unless it would end before nextUpdate.
            embedded = self._cert if self._cert.not_after >= next_ts else cert
            certs = self._certs_der if embedded is self._cert else self._embedded(cert)
            der = build_ocsp_response(tbs, self.signer.signature_algorithm_der, signature, certs)
            return SignedResponse(
                der=der,
                produced_at=now,
                this_update=now,
                next_update=next_ts,
                refresh_at=refresh_ts,
                etag='"' + hashlib.sha256(der).hexdigest()[:32] + '"',
                cacheable=nonce is None,
                status_key=status_key(statuses[0]) if len(statuses) == 1 else "",
                cert_fp=embedded.fp,
                cert_not_after=embedded.not_after,
            )

        return self.signer.sign(tbs).addCallback(assemble)

    def now(self) -> float:
        """The handle's clock (the reactor's, or a test's)."""
        return self._now()

    def count_hits(self, n: int) -> None:
        """``n`` answers served elsewhere from this handle's responses (the HTTP fronts'
        hot caches), counted in ``hsmocsp_cache_hits_total`` with the main process's."""
        self.cache.count_hits(n)

    def ready(self) -> bool:
        return self.health().ready

    @property
    def signer_less(self) -> bool:
        """True for a handle that serves pre-signed responses (``signer: none``)."""
        return False

    # --- health ----------------------------------------------------------------------

    def health(self) -> Health:
        """The worst of what this handle depends on, each reason prefixed with its part.

        * the signer (its token pool's ``health()``; a signer without one counts as ready),
        * the status source (``health()``, else ``ready()``: not ready = degraded),
        * the responder certificate: expired or not yet valid = failed,
        * each issuer's CRL: past its nextUpdate = degraded,
        * whatever was added with :meth:`depend_on` (the pre-signer: behind its token).

        A change of state (not of reason) is logged once, whoever asked.
        """
        now = self._now()
        parts = [_component_health(self.signer, "signer"), _source_health(self.source)]
        parts += [_component_health(part, what) for what, part in self._parts]
        cert = self._cert
        if now >= cert.not_after:
            parts.append(Health(State.FAILED, f"responder certificate expired: {cert.describe()}"))
        elif now < cert.not_before:
            parts.append(Health(State.FAILED, f"responder certificate not valid yet: "
                                              f"{cert.describe()}"))  # fmt: skip
        next_update = self.crl_next_update()
        if next_update is not None and now > next_update:
            parts.append(
                Health(
                    State.DEGRADED,
                    f"CRL past its nextUpdate ({_ts(next_update):%Y-%m-%d %H:%M:%S} UTC)",
                )
            )
        health = worst(*parts)
        previous = self._health
        self._health = health
        log_handle_change(log, self.name, previous, health)
        return health

    def depend_on(self, what: str, component: object) -> None:
        """Count ``component.health()`` in this handle's health, its reason prefixed by
        ``what``. The service wires the pre-signer here, so a token that cannot keep the
        responses fresh shows as a degraded handle in /readyz, not only in a metric."""
        self._parts.append((what, component))

    def crl_next_update(self) -> float | None:
        """The earliest nextUpdate of the CRLs the source publishes (None: no CRL, or
        one without nextUpdate). Parsed once per CRL (the source hands out the same bytes)."""
        earliest: float | None = None
        for issuer in self.source.issuers():
            der = self.source.crl_der(issuer)
            if der is None:
                continue
            memo = self._crl_memo
            if memo is not None and (memo[0] is der or memo[0] == der):
                value = memo[1]
            else:
                value = _crl_next_update(der)
                self._crl_memo = (der, value)
            if value is not None and (earliest is None or value < earliest):
                earliest = value
        return earliest


def _component_health(component: object, what: str) -> Health:
    """``component.health()`` with ``what`` before its reason; READY if it has none."""
    probe = getattr(component, "health", None)
    if probe is None:
        return READY
    health: Health = probe()
    if health.reason:
        return Health(health.state, f"{what}: {health.reason}")
    return health


def _source_health(source: StatusSource) -> Health:
    if getattr(source, "health", None) is not None:
        return _component_health(source, "source")
    if source.ready():
        return READY
    return Health(State.DEGRADED, "source: not loaded or not reachable")


def _crl_next_update(der: bytes) -> float | None:
    try:
        crl = x509.load_der_x509_crl(der)
    except ValueError:
        return None
    next_update = crl.next_update_utc
    return None if next_update is None else next_update.timestamp()


def _embedded_cert(response_der: bytes) -> ResponderCert | None:
    """The certificate carried in a response's ``certs`` (None if none or unreadable)."""
    from cryptography.x509 import ocsp

    try:
        certs = ocsp.load_der_ocsp_response(response_der).certificates
    except ValueError:
        return None
    return ResponderCert.of(certs[0]) if certs else None


def _first_error(failure: Failure) -> Failure:
    """gatherResults wraps errors in FirstError; unwrap so the status mapping sees the cause."""
    if isinstance(failure.value, FirstError):
        inner: Failure = failure.value.subFailure
        return inner
    return failure
