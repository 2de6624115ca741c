"""What the HTTP layer answers OCSP requests with, at one handle path.

Two kinds of object serve a handle path: :class:`~hsmocsp.handle.Handle` (it
holds the status source and the signer: roles ``all`` and ``signer``) and
:class:`~hsmocsp.server.handle.ServerHandle` (role ``server``: a hot cache, the
shared store, and a signer it forwards to over HTTP). The Klein routes, the fast
path and the probes take either, through this protocol, so both roles render
answers, RFC 5019 headers and readiness with the same code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from twisted.internet.defer import Deferred

from hsmocsp.health import Health

if TYPE_CHECKING:
    from hsmocsp.handle import SignedResponse

__all__ = ["OcspEndpoint"]


class OcspEndpoint(Protocol):
    """One served handle path: request bytes in, signed response bytes out."""

    @property
    def name(self) -> str: ...

    @property
    def path(self) -> str: ...

    @property
    def publish_ca(self) -> str | None: ...

    @property
    def publish_crl(self) -> str | None: ...

    def respond_der(self, der: bytes) -> Deferred[SignedResponse] | SignedResponse:
        """The answer to an OCSPRequest's DER; errors raise (or fail) with an
        :class:`~hsmocsp.errors.HsmOcspError` that ``ocsp_status_for`` maps."""
        ...

    def cached_response(self, der: bytes) -> SignedResponse | None:
        """An answer ready now (the fast path writes it at once), or None; never
        starts any work."""
        ...

    @property
    def max_age(self) -> float | None:
        """The handle's ``max_age`` (``Cache-Control`` never promises longer)."""
        ...

    def now(self) -> float:
        """The handle's clock (``max-age`` is counted from it)."""
        ...

    def health(self) -> Health: ...
