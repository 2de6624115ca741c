"""The service tree of a ``role: server`` replica: no token, no PIN, no status source.

::

    ServerService (Sequence: one stage after the other; stopped in reverse)
    ├── store          the shared store (Redis) connected
    ├── signer link    the HTTP client to ``signer_url`` (probing its /healthz)
    ├── invalidations  subscribed to the signer's invalidation messages
    ├── listener       the port: the same fast path, Klein routes and probes as the signer
    └── serving        the "serving ..." log lines

Nothing here imports :mod:`hsmocsp.signing.pkcs11`, :mod:`hsmocsp.signing.pool` or
PyKCS11, and no PIN is read: a server process maps no PKCS#11 module and holds no
secret of the signer (tests/unit/test_server_service.py reads the module table of a
fresh interpreter that built one). Start-up waits for neither the store
nor the signer to be reachable: a server answers what it can (``tryLater`` for the rest)
and says why in ``/readyz`` until they are.

The published CA certificate and CRL paths of each handle are forwarded to the signer
(``GET signer_url + path``), since only the signer reads the CA's files.
"""

from __future__ import annotations

import importlib
import signal
from collections.abc import Callable
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from hsmocsp.config import Config
from hsmocsp.coredump import forbid_core_dumps
from hsmocsp.errors import ConfigError, HsmOcspError, SignerUnavailable
from hsmocsp.server.forward import SignerAnswer, SignerLink
from hsmocsp.server.handle import ServerHandle
from hsmocsp.server.watch import InvalidationWatch
from hsmocsp.service.listen import Listener
from hsmocsp.service.tree import Component, Sequence
from hsmocsp.stores import SharedStore
from hsmocsp.web.accesslog import access_log_for
from hsmocsp.web.app import OCSPApp
from hsmocsp.web.fastpath import FastSite
from hsmocsp.web.headers import NO_CACHE
from hsmocsp.web.limits import HttpLimits
from hsmocsp.web.metrics import Metrics

log = Logger()

__all__ = ["ServerService"]


class ServerService(Sequence):
    """A server replica: its handles, the store, the signer link and the port.

    ``store`` is injected by tests; otherwise it is built from ``cfg.store``.
    """

    def __init__(
        self,
        cfg: Config,
        reactor: Any,
        listen: str | None = None,
        *,
        store: SharedStore | None = None,
        signer: SignerLink | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.reactor = reactor
        self.listen = listen or cfg.listen
        self.listen_key = "--listen" if listen else "listen"
        if cfg.signer_url is None:
            raise ConfigError(str(cfg.path), "signer_url", "is required with role: server")
        if cfg.store.password is not None:
            forbid_core_dumps()  # the store's password is the one secret a server holds
        self.store: SharedStore = store if store is not None else build_shared_store(cfg, reactor)
        self.signer = signer or SignerLink(cfg.signer_url, reactor)
        self.watch = InvalidationWatch(reactor.seconds)
        self.handles = [
            ServerHandle(
                h,
                store=self.store,
                signer=self.signer,
                watch=self.watch,
                clock=reactor,
                hot_entries=cfg.hot_cache_entries,
                store_timeout=max(1.0, 2 * cfg.store.timeout),
            )
            for h in cfg.handles
        ]
        self.watch.watch(self.handles)
        metrics = Metrics([])
        metrics.watch_servers(
            self.handles,
            subscribed=lambda: self.watch.live,
            messages=lambda: self.watch.messages,
            signer_up=lambda: self.signer.down_reason is None,
        )
        self.app = OCSPApp(
            self.handles, now=reactor.seconds, max_request_size=cfg.max_request_size,
            metrics=metrics,
        )  # fmt: skip
        self.app.probes.parts["signer"] = self.signer.health
        self.app.probes.parts["store"] = self.store.health
        self.app.probes.parts["invalidations"] = self.watch.health
        self.app.access = access_log_for(cfg)
        for h in cfg.handles:
            for url in (h.publish_ca, h.publish_crl):
                if url is not None:
                    self.app.router.route(url, methods=["GET", "HEAD"], endpoint=f"pub:{url}")(
                        self._published(url)
                    )
        self.limits = HttpLimits(
            request_timeout=cfg.request_timeout,
            idle_timeout=cfg.idle_timeout,
            max_connections=cfg.max_connections,
            max_request_size=cfg.max_request_size,
            max_url_length=cfg.max_url_length,
        )
        self._build_tree()

    def _build_tree(self) -> None:
        start = getattr(self.store, "start", None)
        stop = getattr(self.store, "stop", None)
        Component("store", start or (lambda: None), stop).setServiceParent(self)
        Component("signer link", self.signer.start, self.signer.stop).setServiceParent(self)
        Component("invalidations", self._subscribe).setServiceParent(self)
        site = FastSite(self.app, self.reactor.seconds, limits=self.limits, clock=self.reactor)
        site.noisy = False
        site.log = lambda request: None  # type: ignore[method-assign]  # ours: web/accesslog.py
        Listener(
            self.reactor, self.listen, site, str(self.cfg.path), self.listen_key
        ).setServiceParent(self)
        Component("serving", self._announce).setServiceParent(self)

    def _subscribe(self) -> None:
        self.store.subscribe(self.watch.on_invalidate, self.watch.on_subscription)

    def _announce(self) -> None:
        for handle in self.handles:
            log.info("handle {name}: serving {path} (server role)", name=handle.name,
                     path=handle.path)  # fmt: skip
        if self.cfg.http_workers > 1:
            log.info("role server: one HTTP process (http_workers applies to the signer);"
                     " run more replicas instead")  # fmt: skip
        log.info(
            "hsmocsp server listening on {listen}, forwarding misses to {signer}",
            listen=self.listen,
            signer=self.signer.base_url,
        )

    def _published(self, url: str) -> Callable[[IRequest], Deferred[bytes]]:
        """A GET route forwarding a published file (CA certificate, CRL) to the signer."""

        def forward(request: IRequest) -> Deferred[bytes]:
            def answer(reply: SignerAnswer) -> bytes:
                request.setResponseCode(reply.code)
                if reply.content_type:
                    request.setHeader(b"Content-Type", reply.content_type)
                if reply.cache_control:
                    request.setHeader(b"Cache-Control", reply.cache_control)
                return reply.body

            def unavailable(failure: Any) -> bytes:
                failure.trap(SignerUnavailable, HsmOcspError)
                request.setResponseCode(503)
                request.setHeader(b"Cache-Control", NO_CACHE)
                request.setHeader(b"Retry-After", b"5")
                return b"the signer is out of reach\n"

            return self.signer.get(url).addCallbacks(answer, unavailable)

        return forward

    # --- running ---------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if hasattr(signal, "SIGHUP"):
            # `systemctl reload` must not end a replica (SIGHUP's default).
            signal.signal(signal.SIGHUP, self._on_sighup)
        self.whenStarted().addErrback(self._log_failed_start)

    def _on_sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(
            log.info, "SIGHUP: a server replica has nothing to reload (no source, no key)"
        )

    def _log_failed_start(self, failure: Any) -> None:
        if failure.check(HsmOcspError):
            log.critical("hsmocsp cannot start: {why}", why=failure.getErrorMessage())
        else:
            log.failure("hsmocsp cannot start", failure)


def build_shared_store(cfg: Config, reactor: Any) -> SharedStore:
    """The shared store of ``cfg.store`` (Redis), not connected yet."""
    # By name: hsmocsp.stores.redis lands separately (the redis helper's part of #11).
    try:
        redis = importlib.import_module("hsmocsp.stores.redis")
    except ImportError as err:
        raise ConfigError(str(cfg.path), "store.kind", "redis is not in this build") from err
    return cast(SharedStore, redis.RedisStore.from_config(cfg.store, reactor, str(cfg.path)))
