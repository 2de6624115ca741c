"""Signers: something that turns the DER of a ResponseData into a signature.

Every signer answers with a :class:`~twisted.internet.defer.Deferred`, so the
reactor never waits on a key: the file signer is fast enough to answer inline,
the PKCS#11 signer hands the work to a pool of worker processes
(:mod:`hsmocsp.signing.pool`).
"""

from __future__ import annotations

from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from twisted.internet.defer import Deferred


class Signer(Protocol):
    """One signing key.

    ``signature_algorithm_der`` is the DER of the AlgorithmIdentifier placed in
    BasicOCSPResponse.signatureAlgorithm; it matches the key (RSA -> sha256WithRSAEncryption,
    P-256 -> ecdsa-with-SHA256, P-384 -> ecdsa-with-SHA384) unless configured otherwise.
    """

    @property
    def signature_algorithm_der(self) -> bytes: ...

    def public_key(self) -> PublicKeyTypes:
        """The key's public half; known once :meth:`start` has fired."""
        ...

    def start(self) -> Deferred[None]:
        """Open the key (log in, find the object). Fails with SignerError/SignerUnavailable."""
        ...

    def stop(self) -> Deferred[None]: ...

    def sign(self, data: bytes) -> Deferred[bytes]:
        """Sign ``data`` (the DER of tbsResponseData).

        Fires with the signature exactly as it goes in the BIT STRING (ECDSA:
        DER ``Ecdsa-Sig-Value``), or fails with ``SignerUnavailable`` (-> tryLater)
        or ``SignerError`` (-> internalError).
        """
        ...

    def check(self) -> Deferred[None]:
        """Readiness probe: fires when the signer can sign now, fails otherwise."""
        ...
