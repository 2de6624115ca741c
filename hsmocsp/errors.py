"""One root exception and a small hierarchy.

Each subclass maps to exactly one outcome, and that mapping lives in one place
(:func:`hsmocsp.handle.ocsp_status_for`), so a new error type never needs a
new ``except`` clause in the web layer.
"""

from __future__ import annotations


class HsmOcspError(Exception):
    """Root of every error hsmocsp raises on purpose."""


# --- configuration (start-up; the process exits before listening) -------------------


class ConfigError(HsmOcspError):
    """The configuration is wrong; the message names the file and the key."""

    def __init__(self, path: str, key: str, problem: str) -> None:
        self.path = path
        self.key = key
        self.problem = problem
        super().__init__(f"{path}: {key}: {problem}")


class ResponderCertError(HsmOcspError):
    """A responder certificate is unfit for its handle (EKU, issuer, validity, key)."""


# --- request side (-> malformedRequest / unauthorized) -------------------------------


class MalformedRequest(HsmOcspError):
    """The request is not a valid OCSPRequest we can answer (-> malformedRequest)."""


class UnsupportedHashAlgorithm(MalformedRequest):
    """A CertID uses a hash algorithm we do not implement (-> malformedRequest)."""


class UnknownIssuer(HsmOcspError):
    """No handle serves the CA named by the CertID (-> unauthorized)."""


# --- dependencies (-> tryLater / internalError) --------------------------------------


class SignerUnavailable(HsmOcspError):
    """The signer cannot sign right now: HSM gone, worker died, queue full (-> tryLater)."""


class SignerError(HsmOcspError):
    """The signer failed in a way retrying will not fix (-> internalError)."""


class PinRefused(SignerError):
    """The token refused the PIN (incorrect, locked, expired, wrong length).

    Distinct because it must never be retried with the same PIN: a Nitrokey HSM
    locks after three wrong tries. At start-up it ends the process with exit
    status 77, so systemd's ``RestartPreventExitStatus=77`` keeps a restart from
    spending a second try; at run time the token stays failed until the PIN
    source changes and SIGHUP reads it again.
    """


class SourceUnavailable(HsmOcspError):
    """The status source cannot answer right now, e.g. Vault unreachable (-> tryLater)."""


class SourceError(HsmOcspError):
    """The status source's data is broken (bad index line, bad CRL)."""


class UpstreamFailed(HsmOcspError):
    """The signer a server replica forwards to answered ``internalError`` or something
    that is not a usable OCSP response (-> internalError). The replica logs the first of
    a run once itself, not per request (:mod:`hsmocsp.server.forward`)."""


class ResponderCertExpired(HsmOcspError):
    """The handle's responder certificate has expired (or is not valid yet): nothing it
    would sign could be verified, so new answers get ``tryLater`` until a renewed
    certificate is loaded (SIGHUP or restart)."""


class StoreUnavailable(HsmOcspError):
    """The shared store (Redis) cannot be asked right now: down, unreachable, too slow,
    or failing over. A server replica then forwards to the signer (-> tryLater if that
    fails too)."""


class StoredValueError(HsmOcspError):
    """A value read from a store is not a stored response this version can read
    (corrupt, truncated, unknown format version): treated as a miss, never served."""


# --- installation (build time; never while serving) -----------------------------------


class PluginCacheError(HsmOcspError):
    """Twisted's plugin cache could not be written valid, or does not list hsmocsp."""
