"""Certificate status from a Vault/OpenBao PKI mount.

Per-serial lookups go to ``GET /v1/<mount>/cert/<serial>`` (cached ``cache_ttl`` seconds);
the mount's CRLs are fetched, verified against their issuers and refreshed in the
background, so a revocation shows up at the next CRL refresh even for cached serials, and
so revoked answers carry the CRL's reason code (Vault's own cert endpoint has none).

When Vault cannot be reached and no fresh entry exists, ``status`` fails with
:class:`SourceUnavailable` (-> tryLater); what the handle already signed stays in its
response cache, which decides what it may still serve.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL.SSL import Error as OpenSSLError
from twisted.internet import ssl
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IReactorTime
from twisted.logger import Logger
from twisted.web.client import Agent
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from hsmocsp.errors import HsmOcspError, SourceError, SourceUnavailable, UnknownIssuer
from hsmocsp.httppool import QuietPool
from hsmocsp.inflight import OnePerKey
from hsmocsp.sources.crl import CRLInfo, load_crl, merged_revocations
from hsmocsp.sources.poller import Poller
from hsmocsp.sources.state import SourceState, StateBacked
from hsmocsp.sources.vaultauth import VaultAuth, VaultResponse, VaultTransport
from hsmocsp.status import CertStatus, Status

__all__ = ["VaultSource", "vault_serial"]

if TYPE_CHECKING:
    from hsmocsp.config import VaultSourceConfig, VaultTLSConfig

log = Logger()

#: A failed CRL refresh is retried after at most this many seconds.
CRL_RETRY = 15.0
#: Never refresh more often than this, even if a CRL's nextUpdate is already past.
CRL_MIN_INTERVAL = 5.0
#: Asked every probe_interval seconds; standbys answer 200 too.
_HEALTH_PATH = "sys/health?standbyok=true&perfstandbyok=true"
#: Problem areas in the source's health: Vault itself, and the CRLs it serves.
_VAULT = "vault"
_CRL = "crl"


def vault_serial(serial: int) -> str:
    """Vault's spelling of a serial: lowercase hex byte pairs joined by ``:``.

    A one-byte serial ``0xca`` would spell ``ca`` and hit ``/cert/ca`` (the CA certificate);
    Vault lower-cases serials before looking them up, so upper case is used for one-byte
    serials, which keeps the path off the special routes.
    """
    raw = serial.to_bytes(max(1, (serial.bit_length() + 7) // 8), "big")
    text = ":".join(f"{b:02x}" for b in raw)
    return text.upper() if len(raw) == 1 else text


@implementer(IPolicyForHTTPS)
class _VaultTLSPolicy:
    """``optionsForClientTLS`` (service-identity hostname checks) with our trust roots."""

    def __init__(self, tls: VaultTLSConfig | None) -> None:
        """``tls`` None: the platform's roots, no client certificate."""
        try:
            if tls is not None and tls.ca_file is not None:
                pem = tls.ca_file.read_bytes()
                certs = [
                    ssl.Certificate.loadPEM(c.public_bytes(_PEM))
                    for c in x509.load_pem_x509_certificates(pem)
                ]
                self._trust: Any = ssl.trustRootFromCertificates(certs)  # type: ignore[no-untyped-call]
            else:
                self._trust = ssl.platformTrust()  # type: ignore[no-untyped-call]
            self._client: ssl.PrivateCertificate | None = None
            if tls is not None and tls.cert_file is not None:
                key_path = tls.key_file or tls.cert_file
                self._client = ssl.PrivateCertificate.loadPEM(  # type: ignore[no-untyped-call]
                    tls.cert_file.read_bytes() + b"\n" + key_path.read_bytes()
                )
        except (OSError, ValueError, OpenSSLError) as err:
            raise SourceError(f"vault tls: cannot load CA bundle or client cert: {err}") from err

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        return ssl.optionsForClientTLS(
            hostname.decode("ascii"), trustRoot=self._trust, clientCertificate=self._client
        )


_PEM = Encoding.PEM


#: Who signed a looked-up certificate: (issuer Name DER, authority key id or None).
_Signer = tuple[bytes, bytes | None] | None


def _signer_of(cert: x509.Certificate) -> _Signer:
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
        key_id = aki.value.key_identifier
    except x509.ExtensionNotFound:
        key_id = None
    return cert.issuer.public_bytes(), key_id


@dataclass(slots=True)
class _Entry:
    status: CertStatus
    signer: _Signer
    fetched_at: float


def _same_ca(a: x509.Certificate, b: x509.Certificate) -> bool:
    """Same subject and key: indistinguishable for an OCSP CertID."""
    return a == b or (a.subject == b.subject and a.public_key() == b.public_key())


class VaultSource(StateBacked):
    """A :class:`~hsmocsp.sources.StatusSource` over one Vault/OpenBao PKI mount.

    Health: DEGRADED while Vault cannot be reached or refuses us (cached statuses are
    still answered, new serials get tryLater) or while its CRL is unusable (the last
    good one is kept); FAILED before the first load.
    """

    def __init__(
        self,
        config: VaultSourceConfig,
        auth: VaultAuth,
        *,
        reactor: Any,
        http_client: Any = None,
        cache_size: int = 100_000,
        probe_interval: float = 10,
    ) -> None:
        """``config`` was validated when it was read (address scheme, mount, positive
        times). ``auth`` is the authenticator ``config.auth`` describes (tests give
        one of their own); ``http_client`` a treq-like client (default: treq over a
        persistent pool with ``config.tls``)."""
        self.config = config
        self._reactor = reactor
        self._clock: IReactorTime = reactor
        self.address = config.address.rstrip("/")
        self.mount = config.mount.strip("/")
        self._auth = auth
        self._cache_ttl = config.cache_ttl
        self._crl_refresh = config.crl_refresh
        self._cache_size = cache_size
        self._pool: QuietPool | None = None
        if http_client is None:
            import treq.client

            self._pool = QuietPool(reactor, max_per_host=4)
            policy = _VaultTLSPolicy(config.tls) if self.address.startswith("https") else None
            agent = (
                Agent(reactor, contextFactory=policy, pool=self._pool)  # type: ignore[no-untyped-call]
                if policy is not None
                else Agent(reactor, pool=self._pool)  # type: ignore[no-untyped-call]
            )
            http_client = treq.client.HTTPClient(agent)
        self._transport = VaultTransport(
            address=self.address,
            http_client=http_client,
            clock=self._clock,
            namespace=config.namespace,
            timeout=config.request_timeout,
        )
        self._issuers: list[x509.Certificate] = []
        self._crl_paths: list[tuple[x509.Certificate, str]] = []
        self._crls: dict[bytes, CRLInfo] = {}
        self._revoked: dict[int, CertStatus] = {}
        self._cache: OrderedDict[int, _Entry] = OrderedDict()
        self._lookups: OnePerKey[int, tuple[CertStatus, _Signer]] = OnePerKey()
        self.state = SourceState(self._where(), self._clock)
        self._started = False
        # The CRLs are fetched again before their nextUpdate (the round says when);
        # sys/health is asked every probe_interval.
        self._crl_poller = Poller(
            lambda: Deferred.fromCoroutine(self._refresh_crls()),
            self._crl_refresh,
            self._clock,
            name=f"{self._where()} CRL refresh",
        )
        self._prober = Poller(
            lambda: Deferred.fromCoroutine(self._probe_once()),
            probe_interval,
            self._clock,
            name=f"{self._where()} probe",
        )
        self._stopped = False
        self._issuer_keys: dict[x509.Certificate, bytes] = {}
        self._skis: dict[x509.Certificate, bytes] = {}

    def __repr__(self) -> str:
        return f"VaultSource({self.address!r}, mount={self.mount!r})"

    # --- StatusSource (generation, checked_at, on_change, health: StateBacked) ------------

    def issuers(self) -> Sequence[x509.Certificate]:
        return tuple(self._issuers)

    def ready(self) -> bool:
        """Loaded and Vault reachable (a bad CRL alone does not make it unready)."""
        return self._started and bool(self._issuers) and not self.state.failing(_VAULT)

    def crl_der(self, issuer: x509.Certificate) -> bytes | None:
        key = self._issuer_key(issuer)
        found = self._crls.get(key) if key is not None else None
        return found.der if found else None

    def known_serials(self, issuer: x509.Certificate) -> Iterable[int]:
        """Serials seen in lookups or CRLs (Vault has no cheap unauthenticated listing)."""
        return sorted(set(self._cache) | set(self._revoked))

    def last_known(self, serial: int) -> CertStatus | None:
        """The last status seen for ``serial``, however old.

        Reached only from tests, on purpose: it is their window on the lookup cache
        (an entry survives a Vault outage; one un-held by ``removeFromCRL`` is dropped,
        not guessed). Nothing in the service reads it: the handle's response cache
        decides what is still served.
        """
        entry = self._cache.get(serial)
        if entry is not None:
            return entry.status
        return self._revoked.get(serial)

    def start(self) -> Deferred[None]:
        self._auth.bind(self._transport)
        return Deferred.fromCoroutine(self._start())

    def stop(self) -> Deferred[None]:
        self._started = False
        self._stopped = True
        self._crl_poller.stop()
        self._prober.stop()
        self._auth.stop()
        # Requests in flight fail now (SourceUnavailable) rather than run on after stop,
        # each with its timeout timer and a connection the emptied pool would take back.
        self._transport.close()
        if self._pool is None:
            return succeed(None)
        return self._pool.close()  # fires once every connection, idle or not, is closed

    def status(self, issuer: x509.Certificate, serial: int) -> Deferred[CertStatus]:
        if self._issuer_key(issuer) is None:
            raise_d: Deferred[CertStatus] = Deferred()
            raise_d.errback(UnknownIssuer(f"vault mount {self.mount!r} does not serve this CA"))
            return raise_d
        if serial <= 0:
            return succeed(CertStatus.unknown())  # Vault never issues such serials
        entry = self._cache.get(serial)
        now = self._clock.seconds()
        if entry is not None and now - entry.fetched_at < self._cache_ttl:
            self._cache.move_to_end(serial)
            return succeed(self._for_issuer(entry.status, entry.signer, issuer))
        return self._lookup_shared(serial).addCallback(
            lambda res: self._for_issuer(res[0], res[1], issuer)
        )

    # --- public extras ------------------------------------------------------------------

    def refresh(self) -> Deferred[None]:
        """SIGHUP: the mount's issuer certificates again (one renewed or added in Vault),
        then every CRL. Never fails: Vault unreachable keeps the issuers in use."""
        return Deferred.fromCoroutine(self._refresh_all())

    async def _refresh_all(self) -> None:
        try:
            await self._load_issuers(await self._auth.token())
        except HsmOcspError as err:
            log.warn(
                "{where}: issuer certificates not reloaded, keeping the ones in use: {err}",
                where=self._where(),
                err=err,
            )
        await self.refresh_crl()

    def refresh_crl(self) -> Deferred[None]:
        """Fetch every issuer's CRL now (also what the background poller does), or join
        the fetch in progress. Never fails: errors are reported to :attr:`state` and
        retried by the poller."""
        return self._crl_poller.now()

    # --- start-up -----------------------------------------------------------------------

    def _where(self) -> str:
        return f"vault {self.address} mount {self.mount!r}"

    async def _start(self) -> None:
        token = await self._auth.token()
        resp = await self._transport.request("GET", "auth/token/lookup-self", token=token)
        if resp.code == 403:
            raise SourceError(f"{self._where()}: permission denied: the token was rejected")
        if resp.code != 200:
            raise SourceUnavailable(
                f"{self._where()}: token lookup: HTTP {resp.code} {resp.errors()}"
            )
        await self._load_issuers(token)
        next_refresh = await self._refresh_crls(initial=True)
        self._started = True
        self.state.loaded()
        if not self._stopped:
            self._crl_poller.start(next_refresh)
            self._prober.start()
        log.info("{where}: serving {n} issuer(s)", where=self._where(), n=len(self._issuers))

    async def _get(self, path: str, token: str | None) -> VaultResponse:
        """GET with one re-login after a 403; a second 403 is a clear SourceError."""
        resp = await self._transport.request("GET", path, token=token)
        if resp.code == 403:
            self._auth.invalidate()
            token = await self._auth.token()
            resp = await self._transport.request("GET", path, token=token)
            if resp.code == 403:
                raise SourceError(f"{self._where()}: permission denied on /v1/{path}")
        return resp

    async def _load_issuers(self, token: str) -> None:
        m = self.mount
        resp = await self._get(f"{m}/issuers?list=true", token)
        issuers: list[x509.Certificate] = []
        crl_paths: list[tuple[x509.Certificate, str]] = []
        if resp.code == 200:
            keys = (resp.json().get("data") or {}).get("keys")
            if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                raise SourceError(f"{self._where()}: issuers list has no 'keys'")
            for issuer_id in keys:
                ref = quote(issuer_id, safe="")
                cert = await self._fetch_cert(f"{m}/issuer/{ref}/der", token)
                if not any(_same_ca(cert, c) for c in issuers):
                    issuers.append(cert)
                crl_paths.append((cert, f"{m}/issuer/{ref}/crl/der"))
        elif resp.code in (404, 405):
            # Pre-1.11 Vault (one issuer per mount), or a mount with no issuer yet.
            cert = await self._fetch_cert(f"{m}/ca", token)
            issuers.append(cert)
            crl_paths.append((cert, f"{m}/crl"))
        else:
            raise SourceUnavailable(
                f"{self._where()}: listing issuers: HTTP {resp.code} {resp.errors()}"
            )
        if not issuers:
            raise SourceError(f"{self._where()}: the mount has no issuer")
        self._issuers, self._crl_paths = issuers, crl_paths
        self._issuer_keys = {c: c.public_bytes(Encoding.DER) for c in issuers}

    async def _fetch_cert(self, path: str, token: str) -> x509.Certificate:
        resp = await self._get(path, token)
        if resp.code != 200 or not resp.body:
            raise SourceError(
                f"{self._where()}: no CA certificate at /v1/{path} "
                f"(HTTP {resp.code}) {resp.errors()}".rstrip()
            )
        try:
            return x509.load_der_x509_certificate(resp.body)
        except ValueError:
            try:
                return x509.load_pem_x509_certificate(resp.body)
            except ValueError as err:
                raise SourceError(f"{self._where()}: /v1/{path} is not a certificate") from err

    # --- CRLs ---------------------------------------------------------------------------

    async def _refresh_crls(self, initial: bool = False) -> float:
        """Fetch and verify every issuer's CRL; on start-up a failure is fatal.

        Later, nothing escapes: a failure is reported to :attr:`state` (logged once
        per episode) and retried after ``CRL_RETRY``; the last good CRLs stay.
        Returns the delay before the next refresh (the poller's).
        """
        ticket = self.state.attempt()
        try:
            token = await self._auth.token()
            fetched: dict[bytes, CRLInfo] = {}
            for issuer, path in self._crl_paths:
                key = self._issuer_key(issuer)
                assert key is not None
                if key in fetched:
                    continue
                crl = await self._fetch_crl(issuer, path, token)
                if crl is not None:
                    fetched[key] = crl
        except (SourceError, SourceUnavailable) as err:
            if initial:
                raise
            # A bad CRL (SourceError) does not mean Vault is down.
            area = _VAULT if isinstance(err, SourceUnavailable) else _CRL
            self.state.problem(area, f"CRL refresh failed: {err}", ticket=ticket)
            return min(self._crl_refresh, CRL_RETRY)
        except Exception:
            if initial:
                raise
            # A bug, not a Vault problem: say so, and keep the refresh going.
            log.failure("{where}: CRL refresh failed unexpectedly", where=self._where())
            self.state.problem(
                _CRL, "CRL refresh failed unexpectedly (see the log)", ticket=ticket
            )
            return min(self._crl_refresh, CRL_RETRY)
        self.state.solved(_VAULT, ticket=ticket)
        self.state.solved(_CRL, ticket=ticket)
        self.state.confirmed()
        self._apply_crls(fetched, initial)
        return self._next_refresh()

    async def _fetch_crl(self, issuer: x509.Certificate, path: str, token: str) -> CRLInfo | None:
        resp = await self._get(path, token)
        if resp.code in (204, 404) or (resp.code == 200 and not resp.body):
            return None  # no CRL (disabled); status comes from lookups alone
        if resp.code != 200:
            raise SourceUnavailable(f"{self._where()}: CRL /v1/{path}: HTTP {resp.code}")
        try:
            return load_crl(resp.body, issuer)
        except SourceError as err:
            raise SourceError(f"{self._where()}: CRL /v1/{path}: {err}") from err

    def _apply_crls(self, fetched: dict[bytes, CRLInfo], initial: bool) -> None:
        old_crls = self._crls
        if fetched.keys() == old_crls.keys() and all(
            old_crls[k].der == v.der for k, v in fetched.items()
        ):
            return
        for crl in fetched.values():
            if not any(crl.der == old.der for old in old_crls.values()):
                for warning in crl.warnings:
                    log.warn("{where}: CRL: {warning}", where=self._where(), warning=warning)
        revoked = merged_revocations(fetched.values())
        old = self._revoked
        added = {s for s in revoked if s not in old}
        removed = {s for s in old if s not in revoked}
        updated = {s for s in revoked if s in old and old[s] != revoked[s]}
        self._crls = fetched
        self._revoked = revoked
        for serial in added | updated:
            cached = self._cache.get(serial)
            if cached is not None:
                cached.status = revoked[serial]
        for serial in removed:
            self._cache.pop(serial, None)  # look it up again rather than guess
        changed = frozenset(added | removed | updated)
        if changed and not initial:
            log.info(
                "{where}: CRL shows {n} newly revoked serial(s)", where=self._where(), n=len(added)
            )
        self.state.changed(changed, notify=bool(changed) and not initial)

    def _next_refresh(self) -> float:
        delay = self._crl_refresh
        now = self._clock.seconds()
        for crl in self._crls.values():
            nxt = crl.next_update
            if nxt is not None:
                delay = min(delay, nxt.timestamp() - now)
        return max(CRL_MIN_INTERVAL if delay < self._crl_refresh else 0.0, delay)

    # --- probing ------------------------------------------------------------------------

    async def _probe_once(self) -> None:
        """Ask Vault's ``sys/health`` (every ``probe_interval`` seconds, by the poller), so
        that a handle nobody queries learns that Vault is gone (and back) as soon as a
        busy one would.

        Only a failure changes health here: coming back is confirmed by a CRL refresh,
        which also needs our token, so a reachable Vault that refuses us stays degraded.
        """
        ticket = self.state.attempt()
        try:
            resp = await self._transport.request("GET", _HEALTH_PATH, token=None)
        except SourceUnavailable as err:
            self.state.problem(_VAULT, str(err), ticket=ticket)
            return
        if resp.code != 200:
            why = f"sys/health: HTTP {resp.code} {resp.errors()}".rstrip()
            self.state.problem(_VAULT, why, ticket=ticket)
        elif self.state.failing(_VAULT):
            await self.refresh_crl()

    # --- lookups ------------------------------------------------------------------------

    def _lookup_shared(self, serial: int) -> Deferred[tuple[CertStatus, _Signer]]:
        return self._lookups.run(serial, lambda: Deferred.fromCoroutine(self._lookup(serial)))

    async def _lookup(self, serial: int) -> tuple[CertStatus, _Signer]:
        ticket = self.state.attempt()
        path = f"{self.mount}/cert/{vault_serial(serial)}"
        try:
            token = await self._auth.token()
            resp = await self._get(path, token)
        except SourceUnavailable as err:
            self.state.problem(_VAULT, str(err), ticket=ticket)
            raise
        except SourceError as err:
            self.state.problem(_VAULT, str(err), ticket=ticket)
            raise SourceUnavailable(str(err)) from err
        if resp.code == 404:
            result: tuple[CertStatus, _Signer] = (CertStatus.unknown(), None)
        elif resp.code == 200:
            try:
                result = self._parse_cert(serial, resp)
            except SourceError as err:
                self.state.problem(_VAULT, str(err), ticket=ticket)
                raise
        elif resp.code == 429 or resp.code >= 500:
            down = SourceUnavailable(
                f"{self._where()}: /v1/{path}: HTTP {resp.code} {resp.errors()}".rstrip()
            )
            self.state.problem(_VAULT, str(down), ticket=ticket)
            raise down
        else:
            unexpected = SourceError(f"{self._where()}: /v1/{path}: unexpected HTTP {resp.code}")
            self.state.problem(_VAULT, str(unexpected), ticket=ticket)
            raise unexpected
        self.state.solved(_VAULT, ticket=ticket)
        self._remember(serial, result[0], result[1])
        return result

    def _parse_cert(self, serial: int, resp: VaultResponse) -> tuple[CertStatus, _Signer]:
        data = resp.json().get("data")
        if not data:
            return CertStatus.unknown(), None
        if not isinstance(data, dict):
            raise SourceError(f"{self._where()}: {resp.path}: 'data' is not an object")
        pem = data.get("certificate")
        if isinstance(pem, str) and pem:
            try:
                cert = x509.load_pem_x509_certificate(pem.encode())
            except ValueError as err:
                raise SourceError(f"{self._where()}: {resp.path}: bad certificate") from err
            if cert.serial_number != serial:
                # e.g. a special route answered; never call a serial we did not find good.
                return CertStatus.unknown(), None
            signer = _signer_of(cert)
        else:
            return CertStatus.unknown(), None
        rt = data.get("revocation_time", 0)
        if not isinstance(rt, int | float) or isinstance(rt, bool):
            raise SourceError(f"{self._where()}: {resp.path}: bad revocation_time")
        if rt == 0:
            return CertStatus.good(), signer
        when = datetime.fromtimestamp(int(rt), UTC)
        from_crl = self._revoked.get(serial)
        if from_crl is not None:
            return (
                CertStatus.revoked(when, from_crl.reason, from_crl.invalidity_date),
                signer,
            )
        return CertStatus.revoked(when), signer

    def _remember(self, serial: int, status: CertStatus, signer: _Signer) -> None:
        previous = self.last_known(serial)
        self._cache[serial] = _Entry(status, signer, self._clock.seconds())
        self._cache.move_to_end(serial)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        if previous is not None and previous.status != status.status:
            self.state.changed(frozenset({serial}))

    def _for_issuer(
        self, status: CertStatus, signer: _Signer, issuer: x509.Certificate
    ) -> CertStatus:
        """``unknown`` when the certificate Vault returned was signed by another CA.

        Vault serials are unique per mount, but a mount may hold several issuers; the
        CertID names one of them, so the answer must come from that one. (Vault's
        ``issuer_id`` is only set for revoked certificates, hence the name/AKI check.)
        """
        if signer is None or status.status is Status.unknown:
            return status
        name, aki = signer
        if name != issuer.subject.public_bytes():
            return CertStatus.unknown()
        if aki is not None and aki != self._ski(issuer):
            return CertStatus.unknown()
        return status

    def _ski(self, issuer: x509.Certificate) -> bytes:
        ski = self._skis.get(issuer)
        if ski is None:
            try:
                ext = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
                ski = ext.value.key_identifier
            except x509.ExtensionNotFound:
                ski = x509.SubjectKeyIdentifier.from_public_key(issuer.public_key()).key_identifier
            self._skis[issuer] = ski
        return ski

    # --- helpers ------------------------------------------------------------------------

    def _issuer_key(self, issuer: x509.Certificate) -> bytes | None:
        """The DER of the served issuer equivalent to ``issuer`` (same subject and key)."""
        key = self._issuer_keys.get(issuer)
        if key is not None:
            return key
        for known in self._issuers:
            if _same_ca(known, issuer):
                return known.public_bytes(Encoding.DER)
        return None
