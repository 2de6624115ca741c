"""Fakes for unit tests: a counting signer and an in-memory source."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from twisted.internet.defer import Deferred, succeed

from hsmocsp.config import FileKeyConfig
from hsmocsp.health import READY, Health, State
from hsmocsp.signing.filekey import FileSigner
from hsmocsp.status import CertStatus

VECTORS = Path(__file__).resolve().parents[1] / "testdata" / "ocsp"


def load_cert(name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((VECTORS / name).read_bytes())


class CountingSigner:
    """Wraps a real FileSigner; counts calls; can hold signatures back (``hold=True``)."""

    def __init__(self, key: str = "responder_rsa.key") -> None:
        self.inner = FileSigner(FileKeyConfig(key=VECTORS / key, password=None))
        self.inner.start()
        self.calls = 0
        self.hold = False
        self.held: list[tuple[bytes, Deferred[bytes]]] = []
        self.fail_with: Exception | None = None

    @property
    def signature_algorithm_der(self) -> bytes:
        return self.inner.signature_algorithm_der

    def public_key(self) -> PublicKeyTypes:
        return self.inner.public_key()

    def start(self) -> Deferred[None]:
        return succeed(None)

    def stop(self) -> Deferred[None]:
        return succeed(None)

    def check(self) -> Deferred[None]:
        return succeed(None)

    def sign(self, data: bytes) -> Deferred[bytes]:
        self.calls += 1
        if self.fail_with is not None:
            d: Deferred[bytes] = Deferred()
            d.errback(self.fail_with)
            return d
        if self.hold:
            d = Deferred()
            self.held.append((data, d))
            return d
        return self.inner.sign(data)

    def release(self) -> None:
        held, self.held = self.held, []
        for data, d in held:
            self.inner.sign(data).chainDeferred(d)


class DictSource:
    """A StatusSource over a dict; ``set`` changes a status and notifies like a reload."""

    def __init__(self, issuer: x509.Certificate, statuses: dict[int, CertStatus]) -> None:
        self.issuer = issuer
        self.statuses = dict(statuses)
        self.generation = 1
        self.checked_at: float | None = 0.0
        self.lookups = 0
        self.refreshes = 0
        self.listeners: list[Callable[[frozenset[int] | None], None]] = []
        self.is_ready = True
        self.fail_with: Exception | None = None

    def start(self) -> Deferred[None]:
        return succeed(None)

    def stop(self) -> Deferred[None]:
        return succeed(None)

    def refresh(self) -> Deferred[None]:
        self.refreshes += 1
        return succeed(None)

    def issuers(self) -> Sequence[x509.Certificate]:
        return (self.issuer,)

    def status(self, issuer: x509.Certificate, serial: int) -> Deferred[CertStatus]:
        self.lookups += 1
        if self.fail_with is not None:
            d: Deferred[CertStatus] = Deferred()
            d.errback(self.fail_with)
            return d
        return succeed(self.statuses.get(serial, CertStatus.unknown()))

    def crl_der(self, issuer: x509.Certificate) -> bytes | None:
        return None

    def known_serials(self, issuer: x509.Certificate) -> Iterable[int]:
        return list(self.statuses)

    def ready(self) -> bool:
        return self.is_ready

    def health(self) -> Health:
        return READY if self.is_ready else Health(State.DEGRADED, "fake source down")

    def on_change(self, listener: Callable[[frozenset[int] | None], None]) -> None:
        self.listeners.append(listener)

    def set(self, serial: int, status: CertStatus) -> None:
        self.statuses[serial] = status
        self.generation += 1
        for listener in self.listeners:
            listener(frozenset({serial}))


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)
