"""Where signed responses live beyond one process's memory.

* :mod:`hsmocsp.stores.sqlite` -- the local file in ``data_dir`` (one box; a signer
  keeps it too), read back at start so a restart serves at once;
* :mod:`hsmocsp.stores.redis` -- the store shared by a signer and its server replicas
  (issue #11, docs/design-replicas.md);
* :mod:`hsmocsp.stores.codec` -- the one byte encoding of a stored response.

:class:`SharedStore` is the small seam the server role and the signer's service tree
use, so neither depends on how the shared store talks to Redis.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from hsmocsp.handle import SignedResponse
    from hsmocsp.health import Health

InvalidationListener = Callable[[str, "frozenset[int] | None"], None]
"""``(handle, serials)``: these serials of this handle changed (None: every serial)."""

SubscriptionListener = Callable[[bool], None]
"""Told ``False`` when the invalidation subscription is lost, ``True`` once it is
(re-)established: while it is down, invalidations may be missed (the server role
bounds how long it trusts its hot cache then)."""


class SharedStore(Protocol):
    """Signed responses shared between processes (the contract of /work REPLICAS.md).

    Reader side (servers): :meth:`fetch`, :meth:`subscribe`. Writer side (the
    signer): :meth:`recorder`, :meth:`forget`. Everyone: :meth:`health`.
    """

    def fetch(self, handle: str, key: bytes, serial: int) -> Deferred[SignedResponse | None]:
        """The stored response for CertID DER ``key`` (None: not stored, or expired).

        Fails with :class:`~hsmocsp.errors.StoreUnavailable` when the store cannot be
        asked now (quickly: a slow store must not hang a request)."""
        ...

    def subscribe(
        self,
        on_invalidate: InvalidationListener,
        on_subscription: SubscriptionListener | None = None,
    ) -> None:
        """Be told of every invalidation the signer publishes; the subscription
        re-establishes itself after a loss (``on_subscription`` says when)."""
        ...

    def health(self) -> Health: ...

    def recorder(self, handle: str) -> Callable[[bytes, int, SignedResponse], None]:
        """Signer side: a callable that queues one signed response for writing (never
        blocks; unknown/transient or non-cacheable answers are ignored)."""
        ...

    def forget(self, handle: str, serials: frozenset[int] | None) -> None:
        """Signer side: delete these serials' responses and publish the invalidation
        (retried until it is done: a revocation must reach the store)."""
        ...


__all__ = ["InvalidationListener", "SharedStore", "SubscriptionListener"]
