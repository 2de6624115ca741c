"""A signer holding its key in a PEM file (development, tests, small deployments).

Signing RSA-2048 or ECDSA in ``cryptography`` takes about a millisecond and
releases no lock we care about, so it answers inline with an already-fired
Deferred instead of paying a thread hop.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from twisted.internet import defer
from twisted.internet.defer import Deferred

from hsmocsp.errors import SignerError
from hsmocsp.health import READY, Health, State
from hsmocsp.signing.algorithms import SignatureAlgorithm, choose_algorithm

if TYPE_CHECKING:
    from hsmocsp.config import FileKeyConfig


class FileSigner:
    """Implements :class:`hsmocsp.signing.Signer` with a PEM private key file.

    ``config`` is the handle's ``signer: {key: ...}``. The password, if any, comes
    from the environment variable or the first line of the file ``config.password``
    names -- never from the configuration file itself, so configs can be committed
    and shown.
    """

    def __init__(self, config: FileKeyConfig) -> None:
        self.config = config
        self._path = str(config.key)
        password = config.password
        self._password_env = password.env if password is not None else None
        self._password_file = password.file if password is not None else None
        self._key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | None = None
        self._algorithm: SignatureAlgorithm | None = None

    # --- Signer protocol ---------------------------------------------------------------

    @property
    def signature_algorithm_der(self) -> bytes:
        return self._loaded()[1].algorithm_identifier_der

    @property
    def algorithm(self) -> SignatureAlgorithm:
        """The chosen algorithm (mechanism name, digest); known once started."""
        return self._loaded()[1]

    def public_key(self) -> PublicKeyTypes:
        return self._loaded()[0].public_key()

    def start(self) -> Deferred[None]:
        try:
            self._load()
        except SignerError:
            return defer.fail()
        return defer.succeed(None)

    def stop(self) -> Deferred[None]:
        return defer.succeed(None)

    def sign(self, data: bytes) -> Deferred[bytes]:
        try:
            key, algorithm = self._loaded()
            if isinstance(key, rsa.RSAPrivateKey):
                signature = key.sign(data, padding.PKCS1v15(), algorithm.digest)
            else:
                # cryptography already returns the DER Ecdsa-Sig-Value.
                signature = key.sign(data, ec.ECDSA(algorithm.digest))
        except SignerError:
            return defer.fail()
        except Exception as err:  # a cryptography/OpenSSL failure: no retry will fix it
            return defer.fail(SignerError(f"{self._path}: signing failed: {err}"))
        return defer.succeed(signature)

    def check(self) -> Deferred[None]:
        try:
            self._loaded()
        except SignerError:
            return defer.fail()
        return defer.succeed(None)

    def health(self) -> Health:
        """A key in memory cannot go away: READY once loaded."""
        try:
            self._loaded()
        except SignerError as err:
            return Health(State.FAILED, str(err))
        return READY

    # --- internals ----------------------------------------------------------------------

    def _loaded(
        self,
    ) -> tuple[rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, SignatureAlgorithm]:
        if self._key is None or self._algorithm is None:
            raise SignerError(f"{self._path}: signer not started")
        return self._key, self._algorithm

    def _password(self) -> bytes | None:
        if self._password_env is not None:
            value = os.environ.get(self._password_env)
            if value is None:
                raise SignerError(
                    f"{self._path}: password variable {self._password_env} is not set"
                )
            return value.encode()
        if self._password_file is not None:
            try:
                with open(self._password_file, "rb") as f:
                    return f.readline().rstrip(b"\r\n")
            except OSError as err:
                raise SignerError(
                    f"{self._path}: cannot read password file {self._password_file}: "
                    f"{err.strerror}"
                ) from err
        return None

    def _load(self) -> None:
        try:
            with open(self._path, "rb") as f:
                pem = f.read()
        except OSError as err:
            raise SignerError(f"{self._path}: cannot read key file: {err.strerror}") from err
        password = self._password()
        try:
            key: PrivateKeyTypes = serialization.load_pem_private_key(pem, password=password)
        except TypeError as err:
            # Encrypted without a password, or a password for a clear key.
            raise SignerError(f"{self._path}: {err}") from err
        except ValueError as err:
            # Wrong password or not a PEM private key; cryptography does not say which.
            raise SignerError(
                f"{self._path}: not a PEM private key, or wrong password"
            ) from err
        except Exception as err:  # unsupported algorithm, etc.
            raise SignerError(f"{self._path}: cannot load private key: {err}") from err
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise SignerError(
                f"{self._path}: unsupported key type {type(key).__name__}; use RSA or EC"
            )
        try:
            algorithm = choose_algorithm(key.public_key())
        except SignerError as err:
            raise SignerError(f"{self._path}: {err}") from err
        self._key = key
        self._algorithm = algorithm
