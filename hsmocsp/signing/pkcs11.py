"""A signer whose key lives on a PKCS#11 token, signing through a :class:`TokenPool`.

RSA keys use CKM_SHA{256,384,512}_RSA_PKCS, so the token hashes. EC keys use
CKM_ECDSA on a digest taken here: CKM_ECDSA_SHA256/384 are missing from many
tokens, and hashing a few KiB in Python costs microseconds. The token's r || s
is re-encoded as the DER Ecdsa-Sig-Value that X.509 and OCSP verifiers expect.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from twisted.internet import defer
from twisted.internet.defer import Deferred

from hsmocsp.errors import SignerError
from hsmocsp.health import Health
from hsmocsp.signing.algorithms import SignatureAlgorithm, choose_algorithm, ecdsa_raw_to_der
from hsmocsp.signing.pool import KeyRef, TokenPool


class Pkcs11Signer:
    """Implements :class:`hsmocsp.signing.Signer` for one key of a (shared) pool.

    The pool is started and stopped by its owner (the service tree), never by a
    signer: several keys share one pool.
    """

    def __init__(self, pool: TokenPool, key: KeyRef) -> None:
        self._pool = pool
        self._key = key
        self._public_key: PublicKeyTypes | None = None
        self._algorithm: SignatureAlgorithm | None = None

    def __repr__(self) -> str:
        return f"<Pkcs11Signer {self._key} on {self._pool!r}>"

    @property
    def key(self) -> KeyRef:
        return self._key

    @property
    def algorithm(self) -> SignatureAlgorithm:
        """The chosen algorithm (mechanism name, digest); known once started."""
        if self._algorithm is None:
            raise SignerError(f"{self!r}: signer not started")
        return self._algorithm

    @property
    def signature_algorithm_der(self) -> bytes:
        return self.algorithm.algorithm_identifier_der

    def public_key(self) -> PublicKeyTypes:
        if self._public_key is None:
            raise SignerError(f"{self!r}: signer not started")
        return self._public_key

    def start(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        spki = await self._pool.public_key(self._key)
        try:
            public_key = serialization.load_der_public_key(spki)
        except ValueError as err:
            raise SignerError(f"{self!r}: token returned an unreadable public key") from err
        try:
            algorithm = choose_algorithm(public_key)
        except SignerError as err:
            raise SignerError(f"{self!r}: {err}") from err
        self._public_key = public_key
        self._algorithm = algorithm

    def stop(self) -> Deferred[None]:
        return defer.succeed(None)  # the pool is its owner's to stop

    def sign(self, data: bytes) -> Deferred[bytes]:
        try:
            algorithm = self.algorithm
        except SignerError:
            return defer.fail()
        if algorithm.prehash:
            h = hashes.Hash(algorithm.digest)
            h.update(data)
            data = h.finalize()
        d = self._pool.sign(self._key, algorithm.mechanism, data)
        if algorithm.is_ecdsa:
            d.addCallback(ecdsa_raw_to_der)
        return d

    def check(self) -> Deferred[None]:
        return self._pool.check()

    def health(self) -> Health:
        """The token's health (shared by every key of the pool)."""
        return self._pool.health()

    # Metrics probes (the pool is shared: these are the token's, not this key's).

    def queue_depth(self) -> int:
        return self._pool.queue_depth()

    def busy(self) -> int:
        return self._pool.busy()
