"""The responder's service tree: every component an ``IService`` child, in start order.

::

    ResponderService (Sequence: one stage after the other; stopped in reverse)
    ├── pools        Group: one Component per PKCS#11 token (workers logged in)
    ├── signers      Group: one Component per handle (public key read from the token)
    ├── sources      Group: one Component per handle (index/CRL loaded, Vault reached)
    ├── handles      Component: responder certificates checked against keys and issuers
    ├── expiry       Component: certificate / CRL expiry warnings, handle state changes
    ├── store        Component (with data_dir): stored responses restored, flushing
    ├── shared store Component (store.kind: redis): responses written to Redis
    ├── listener     Listener, or SharedListener with the HTTP fronts as its child
    ├── serving      Component: the "serving"/"listening" log lines
    └── presigners   Group: one PresignService per handle

So nothing listens before every handle can answer, and a stop closes the port
first and ends the HSM workers last. A start-up failure (wrong PIN, unreadable
index, Vault refusing the token, port in use) is logged here as one line;
:mod:`hsmocsp.service.startup` reports it and makes the process exit non-zero.
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING, Any

from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from hsmocsp.config import Config, FileKeyConfig, VaultSourceConfig
from hsmocsp.coredump import forbid_core_dumps
from hsmocsp.errors import ConfigError, HsmOcspError
from hsmocsp.handle import Handle
from hsmocsp.lifecycle import ExpiryWatch, reload_certificates
from hsmocsp.presign import Presigner
from hsmocsp.service.builder import Parts, build
from hsmocsp.service.listen import Listener, SharedListener, tcp_listen_address
from hsmocsp.service.tree import Component, Group, Sequence, _all
from hsmocsp.stores.sqlite import ResponseStore
from hsmocsp.web.accesslog import access_log_for
from hsmocsp.web.app import OCSPApp
from hsmocsp.web.fastpath import FastSite
from hsmocsp.web.front_pool import FrontPool
from hsmocsp.web.limits import HttpLimits

if TYPE_CHECKING:
    from hsmocsp.signing.pool import TokenPool
    from hsmocsp.stores.redis import RedisStore
    from hsmocsp.web.metrics import Metrics

log = Logger()


class PresignService(service.Service):
    """Keeps one handle's cache filled (:class:`~hsmocsp.presign.Presigner`).

    The presigner is made at start, not at build: it subscribes to its source's
    changes, which only mean something once the source has loaded.
    """

    def __init__(
        self,
        handle: Handle,
        reactor: Any,
        rate: float,
        concurrency: int,
        metrics: Metrics | None = None,
    ) -> None:
        self.setName(f"presigner {handle.name}")
        self.metrics = metrics
        self.handle = handle
        self.reactor = reactor
        self.rate = rate
        self.concurrency = concurrency
        self.presigner: Presigner | None = None

    def startService(self) -> None:
        super().startService()
        if self.presigner is None:
            self.presigner = Presigner(
                self.handle,
                clock=self.reactor,
                rate=self.rate,
                concurrency=self.concurrency,
                signer_backlog=self.handle.queue_depth,
            )
            if self.metrics is not None:
                self.metrics.watch_presigner(self.handle.name, self.presigner)
            self.handle.depend_on("pre-signing", self.presigner)
        self.presigner.start()

    def stopService(self) -> None:
        super().stopService()
        if self.presigner is not None:
            self.presigner.stop()


class ResponderService(Sequence):
    """Owns pools, signers, sources, handles, the store and (last) the listening port."""

    def __init__(
        self, cfg: Config, reactor: Any, listen: str | None = None, workers: int | None = None
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.reactor = reactor
        self.listen = listen or cfg.listen
        self.listen_key = "--listen" if listen else "listen"
        self.http_workers = workers or cfg.http_workers
        self.tcp_listen = (
            tcp_listen_address(self.listen, str(cfg.path), self.listen_key)
            if self.http_workers > 1
            else None
        )
        if holds_secrets(cfg):
            forbid_core_dumps()  # before build() reads a PIN: no core of ours holds one
        parts = build(cfg, reactor)
        self.pools = parts.pools
        self.signers = list(parts.signers.values())
        self.sources = list(parts.sources.values())
        self.handles: list[Handle] = parts.handles
        self._handle_pools: dict[str, TokenPool] = parts.handle_pools
        self._sources_by_handle = parts.sources
        self._handles_prepared = False
        self.expiry = ExpiryWatch(self.handles, reactor, cfg.cert_expiry_warning_days)
        self.app = OCSPApp(self.handles, now=reactor.seconds, max_request_size=cfg.max_request_size)
        self.app.access = access_log_for(cfg)
        self.limits = HttpLimits(
            request_timeout=cfg.request_timeout,
            idle_timeout=cfg.idle_timeout,
            max_connections=cfg.max_connections,
            max_request_size=cfg.max_request_size,
            max_url_length=cfg.max_url_length,
        )
        for handle in self.handles:
            handle.on_signature(self.app.metrics.signed)
        for name, pool in self.pools.items():
            self.app.metrics.watch_token(name, pool.health, pool.restart_pending)
        self.store: ResponseStore | None = None
        self.shared: RedisStore | None = None
        if cfg.store.kind == "redis":
            from hsmocsp.stores.redis import RedisStore

            # The password is read now: a missing one is a configuration error (exit 78).
            self.shared = RedisStore.from_config(cfg.store, reactor, str(cfg.path))
        self.fronts: FrontPool | None = None
        self.listener: Listener | SharedListener | None = None
        self._build_tree(parts)

    # --- the tree -------------------------------------------------------------------

    def _build_tree(self, parts: Parts) -> None:
        pools = Group("pools")
        for name, pool in parts.pools.items():
            Component(f"pool {name}", pool.start, pool.stop).setServiceParent(pools)
        pools.setServiceParent(self)
        signers = Group("signers")
        for name, signer in parts.signers.items():
            Component(f"signer {name}", signer.start, signer.stop).setServiceParent(signers)
        signers.setServiceParent(self)
        sources = Group("sources")
        for name, source in parts.sources.items():
            Component(f"source {name}", source.start, source.stop).setServiceParent(sources)
        sources.setServiceParent(self)
        Component("handles", self._prepare_handles).setServiceParent(self)
        Component("expiry", self.expiry.start, self.expiry.stop).setServiceParent(self)
        if self.cfg.data_dir is not None:
            Component("store", self._open_store, self._close_store).setServiceParent(self)
        if self.shared is not None:
            Component(
                "shared store", self._open_shared, self._close_shared
            ).setServiceParent(self)
        site = FastSite(self.app, self.reactor.seconds, limits=self.limits, clock=self.reactor)
        site.noisy = False
        site.log = lambda request: None  # type: ignore[method-assign]  # ours: web/accesslog.py
        if self.tcp_listen is None:
            self.listener = Listener(
                self.reactor, self.listen, site, str(self.cfg.path), self.listen_key
            )
        else:
            self.listener = SharedListener(
                self.reactor,
                self.tcp_listen,
                site,
                self._make_fronts,
                str(self.cfg.path),
                self.listen_key,
            )
        self.listener.setServiceParent(self)
        Component("serving", self._announce).setServiceParent(self)
        presigners = Group("presigners")
        for handle in self.handles:
            if handle.signer_less:
                continue  # pre-signed elsewhere (signer: none): nothing for us to sign
            handle_pool = self._handle_pools.get(handle.name)
            PresignService(
                handle,
                self.reactor,
                rate=self.cfg.presign_rate,
                concurrency=handle_pool.workers if handle_pool is not None else 1,
                metrics=self.app.metrics,
            ).setServiceParent(presigners)
        presigners.setServiceParent(self)

    def _prepare_handles(self) -> None:
        for handle in self.handles:
            handle.prepare()
        self._handles_prepared = True

    async def _open_store(self) -> None:
        assert self.cfg.data_dir is not None
        store = self.store = ResponseStore(self.cfg.data_dir / "responses.sqlite", self.reactor)
        self.app.metrics.watch_store(store, "sqlite")
        for handle in self.handles:
            kept = await handle.restore(store.load(handle.name, handle.key_hash))
            handle.cache.on_store = store.recorder(handle.name, handle.key_hash)
            handle.depend_on("store", store)
            if kept:
                log.info("handle {name}: {n} stored responses restored", name=handle.name, n=kept)
        store.start()

    def _close_store(self) -> Deferred[None] | None:
        return self.store.stop() if self.store is not None else None

    def _open_shared(self) -> None:
        """The signer's side of the shared store (``role: all|signer`` with
        ``store.kind: redis``): every lasting response a handle's cache holds or will
        hold is written, every invalidation deleted and published. Start-up does not
        wait for Redis: while it cannot be written the handles are degraded."""
        store = self.shared
        assert store is not None
        self.app.metrics.watch_store(store, "redis")
        for handle in self.handles:
            handle.cache.observers.append(store.observer(handle.name, handle.cache))
            record = store.recorder(handle.name)
            for key, serial, value in handle.cache.items():  # restored from SQLite
                record(key, serial, value)
            handle.depend_on("shared store", store)
        store.start()
        log.info(
            "shared store: writing signed responses to {where}", where=store.connector.where
        )

    def _close_shared(self) -> Deferred[None] | None:
        return self.shared.stop() if self.shared is not None else None

    def _make_fronts(self, port: int, backend: str) -> FrontPool:
        assert self.tcp_listen is not None
        self.fronts = FrontPool(
            self.reactor,
            self.handles,
            self.app.metrics,
            count=self.http_workers - 1,
            host=self.tcp_listen[0],
            port=port,
            backend=backend,
            limits=self.limits,
            access=self.app.access,
            hot_cache_entries=self.cfg.hot_cache_entries,
        )
        # Not ready before every front has bound the port (the kernel hands them
        # connections from then on); later, a front being restarted only degrades.
        self.app.probes.waiting.append(self.fronts.starting)
        self.app.probes.parts["fronts"] = self.fronts.health
        return self.fronts

    def _announce(self) -> None:
        for handle in self.handles:
            log.info(
                "handle {name}: serving {path} ({n} issuer(s))",
                name=handle.name,
                path=handle.path,
                n=len(handle.source.issuers()),
            )
        log.info(
            "hsmocsp listening on {listen} ({n} HTTP process(es))",
            listen=self.listen,
            n=self.http_workers,
        )

    # --- running --------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if hasattr(signal, "SIGHUP"):
            # `systemctl reload` / kill -HUP. (Left alone, SIGHUP would end the process.)
            signal.signal(signal.SIGHUP, self._on_sighup)
        self.whenStarted().addErrback(self._log_failed_start)

    @property
    def presigners(self) -> list[Presigner]:
        """The handles' presigners, once started."""
        return [
            s.presigner
            for s in self.getServiceNamed("presigners")
            if isinstance(s, PresignService) and s.presigner is not None
        ]

    def _on_sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> Deferred[None]:
        """What SIGHUP (``systemctl reload``) does: extend here, one awaited step each."""
        self.reload_pins()
        self.reload_certificates()
        return self.refresh_sources()

    def reload_pins(self) -> None:
        """Read every token's PIN from its source again; a pool whose token refused the
        old PIN tries the new one (once), never the same one again."""
        for name, pool in self.pools.items():
            token = self.cfg.tokens[name]
            try:
                pin = token.pin.read(f"tokens.{name}.pin")
            except ConfigError as err:
                log.error("SIGHUP: PIN of token {name} not re-read: {err}", name=name, err=err)
                continue
            pool.reload_pin(pin)

    def reload_certificates(self) -> int:
        """Responder and CA certificate files read again, with start-up's checks; a file
        that fails keeps the one in use (one log line each). Returns how many failed."""
        if not self._handles_prepared:
            return 0  # still starting: start-up reads them anyway
        return reload_certificates(self.cfg, self.handles, self._sources_by_handle)

    def refresh_sources(self) -> Deferred[None]:
        """Ask every source (once each) to look for new data now."""
        log.info("SIGHUP: every source looks for new data now")
        unique = {id(source): source for source in self.sources}
        return Deferred.fromCoroutine(_all([s.refresh() for s in unique.values()]))

    def _log_failed_start(self, failure: Any) -> None:
        if failure.check(HsmOcspError):
            log.critical("hsmocsp cannot start: {why}", why=failure.getErrorMessage())
        else:
            log.failure("hsmocsp cannot start", failure)


def holds_secrets(cfg: Config) -> bool:
    """Does this process hold a PIN, a Vault credential, a key or Redis password?"""
    return bool(cfg.tokens) or cfg.store.password is not None or any(
        isinstance(h.source, VaultSourceConfig)
        or (isinstance(h.signer, FileKeyConfig) and h.signer.password is not None)
        for h in cfg.handles
    )


__all__ = ["PresignService", "ResponderService", "holds_secrets"]
