"""``twistd hsmocsp``: options and the service tree.

Start order: signing pools and sources first, then the handles check their
responder certificates against the signers' keys, and only then does the
listener open the port, so a responder that cannot answer never listens.
Stop order is the reverse: listener, sources, HSM workers.

A configuration error stops ``makeService`` with a one-line message; a
start-up failure (wrong PIN, unreadable index, Vault refusing the token) is
logged as one line and the process exits with status 1, so systemd's
``Restart=on-failure`` and a container runtime see it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from twisted.application import service, strports
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger
from twisted.python import usage

from hsmocsp.cache import ResponseCache
from hsmocsp.config import (
    MAX_HTTP_WORKERS,
    Config,
    FileKeyConfig,
    HandleConfig,
    OpenSSLSourceConfig,
    TokenConfig,
    VaultSourceConfig,
    load_config,
)
from hsmocsp.errors import ConfigError, HsmOcspError
from hsmocsp.presign import Presigner
from hsmocsp.responder import Handle
from hsmocsp.signing import Signer
from hsmocsp.sources import StatusSource
from hsmocsp.store import ResponseStore
from hsmocsp.web.app import OCSPApp
from hsmocsp.web.fastpath import FastSite
from hsmocsp.web.front import bind_reuseport
from hsmocsp.web.fronts import FrontPool

log = Logger()


class Options(usage.Options):
    synopsis = "--config FILE [--listen STRPORT]"
    longdesc = "Serve OCSP (RFC 6960/5019) for several CAs, signing with a PKCS#11 HSM."
    optParameters = [
        ["config", "c", "etc/hsmocsp.yaml", "YAML configuration file."],
        ["listen", "l", None, "Listen endpoint (strports), overrides the config's listen."],
        [
            "workers",
            "w",
            None,
            "HTTP processes sharing the listening port (SO_REUSEPORT; tcp only); "
            "overrides the config's http_workers.",
        ],
    ]

    def postOptions(self) -> None:
        path = Path(self["config"])
        try:
            self["parsed"] = load_config(path)
        except ConfigError as err:
            raise usage.UsageError(f"configuration error: {err}") from err
        if self["workers"] is not None:
            try:
                workers = int(self["workers"])
            except ValueError:
                workers = 0
            if not 1 <= workers <= MAX_HTTP_WORKERS:
                raise usage.UsageError(
                    f"--workers must be a whole number from 1 to {MAX_HTTP_WORKERS}"
                )
            self["workers"] = workers


def _load_cert(path: Path, key: str, cfg: Config) -> x509.Certificate:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(str(cfg.path), key, f"cannot read {path}: {err.strerror}") from err
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as err:
        raise ConfigError(str(cfg.path), key, f"{path} is not a certificate: {err}") from err


class ResponderService(service.MultiService):
    """Owns pools, sources, handles and (last) the listening port."""

    def __init__(
        self, cfg: Config, reactor: Any, listen: str | None = None, workers: int | None = None
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.reactor = reactor
        self.listen = listen or cfg.listen
        self.http_workers = workers or cfg.http_workers
        self.tcp_listen = (
            tcp_listen_address(self.listen, cfg, "--listen" if listen else "listen")
            if self.http_workers > 1
            else None
        )
        self.fronts: FrontPool | None = None
        self._ports: list[Any] = []
        self._runtime_dir: str | None = None
        self.pools: dict[str, Any] = {}
        self.signers: list[Signer] = []
        self.sources: list[StatusSource] = []
        self._handle_pools: dict[str, Any] = {}
        self.handles: list[Handle] = [self._build_handle(h) for h in cfg.handles]
        self.app = OCSPApp(self.handles, now=reactor.seconds, max_request_size=cfg.max_request_size)
        for handle in self.handles:
            handle._on_signed = self.app.metrics.signed
        self.presigners: list[Presigner] = []
        self.store: ResponseStore | None = None
        self.port_service: service.Service | None = None
        self.started: Deferred[None] = Deferred()

    # --- building (synchronous, at makeService time) ------------------------------------

    def _pool(self, token: TokenConfig) -> Any:
        from hsmocsp.signing.pool import TokenPool

        pool = self.pools.get(token.name)
        if pool is None:
            pin = token.pin.read(f"tokens.{token.name}.pin")
            pool = self.pools[token.name] = TokenPool(
                module=str(token.module),
                token_label=token.token_label,
                slot=token.slot,
                pin=pin,
                workers=token.workers,
                max_queue=token.max_queue,
                timeout=token.sign_timeout,
                pipeline=token.pipeline,
                # The workers get the PIN on stdin; they need not inherit it.
                env_drop=(token.pin.env,) if token.pin.env else (),
                reactor=self.reactor,
            )
        return pool

    def _signer(self, h: HandleConfig) -> Signer:
        if isinstance(h.signer, FileKeyConfig):
            from hsmocsp.signing.filekey import FileSigner

            pw = h.signer.password
            return FileSigner(
                str(h.signer.key),
                password_env=pw.env if pw else None,
                password_file=str(pw.file) if pw and pw.file else None,
            )
        from hsmocsp.signing.pkcs11 import Pkcs11Signer
        from hsmocsp.signing.pool import KeyRef

        pool = self._pool(self.cfg.tokens[h.signer.token])
        self._handle_pools[h.name] = pool
        return Pkcs11Signer(pool, KeyRef(label=h.signer.key_label, key_id=h.signer.key_id))

    def _source(self, h: HandleConfig, issuer: x509.Certificate | None) -> StatusSource:
        src = h.source
        if isinstance(src, OpenSSLSourceConfig):
            from hsmocsp.sources.openssl import OpenSSLSource

            assert issuer is not None
            return OpenSSLSource(
                issuer=issuer,
                index_path=src.index,
                crl_path=src.crl,
                poll_interval=src.poll_interval,
                reactor=self.reactor,
            )
        assert isinstance(src, VaultSourceConfig)
        return _vault_source(src, self.reactor)

    def _build_handle(self, h: HandleConfig) -> Handle:
        issuer = _load_cert(h.issuer, f"handles.{h.name}.issuer", self.cfg) if h.issuer else None
        responder = _load_cert(h.responder_cert, f"handles.{h.name}.responder_cert", self.cfg)
        signer = self._signer(h)
        source = self._source(h, issuer)
        self.signers.append(signer)
        self.sources.append(source)
        pool = self._handle_pools.get(h.name)
        return Handle(
            queue_depth=pool.queue_depth if pool is not None else None,
            name=h.name,
            path=h.path,
            source=source,
            signer=signer,
            responder_cert=responder,
            validity=h.validity,
            refresh_fraction=h.refresh_fraction,
            max_age=h.max_age,
            nonce_policy=h.nonce,
            now=self.reactor.seconds,
            publish_ca=h.publish_ca,
            publish_crl=h.publish_crl,
            cache=ResponseCache(self.reactor.seconds, max_entries=h.max_cached),
        )

    # --- running -----------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if hasattr(signal, "SIGHUP"):
            # `systemctl reload` / kill -HUP: every source looks for new data now. (Left
            # alone, SIGHUP would end the process.)
            signal.signal(signal.SIGHUP, self._on_sighup)
        d = ensureDeferred(self._start())
        d.addErrback(self._fatal)
        d.chainDeferred(self.started)

    async def _start(self) -> None:
        await _all([pool.start() for pool in self.pools.values()])
        await _all([signer.start() for signer in self.signers])
        await _all([source.start() for source in self.sources])
        for handle in self.handles:
            handle.prepare()
        if self.cfg.data_dir is not None:
            store = self.store = ResponseStore(self.cfg.data_dir / "responses.sqlite", self.reactor)
            for handle in self.handles:
                kept = await handle.restore(store.load(handle.name, handle.key_hash))
                handle.cache.on_store = store.recorder(handle.name, handle.key_hash)
                if kept:
                    log.info(
                        "handle {name}: {n} stored responses restored", name=handle.name, n=kept
                    )
            store.start()
        site = FastSite(self.app, self.reactor.seconds)
        site.noisy = False
        site.log = lambda request: None  # type: ignore[method-assign]  # access log: see metrics
        if self.tcp_listen is None:
            self.port_service = strports.service(self.listen, site)
            self.port_service.setServiceParent(self)
        else:
            self._listen_with_fronts(site, *self.tcp_listen)
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
        for handle in self.handles:
            pool = self._handle_pools.get(handle.name)
            presigner = Presigner(
                handle,
                clock=self.reactor,
                rate=self.cfg.presign_rate,
                concurrency=pool.workers if pool is not None else 1,
                signer_backlog=handle.queue_depth,
            )
            presigner.start()
            self.presigners.append(presigner)

    def _on_sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.refresh_sources)

    def refresh_sources(self) -> Deferred[None]:
        """Ask every source (once each) to look for new data now."""
        log.info("SIGHUP: every source looks for new data now")
        unique = {id(source): source for source in self.sources}
        return ensureDeferred(_all([s.refresh() for s in unique.values()]))

    def _listen_with_fronts(self, site: FastSite, host: str, port: int, backlog: int) -> None:
        """This process and ``http_workers - 1`` fronts on one port (``SO_REUSEPORT``);
        fronts relay what they cannot answer to a private Unix socket of ours."""
        try:
            sock = bind_reuseport(host, port, backlog)
        except OSError as err:
            raise ConfigError(
                str(self.cfg.path), "listen", f"cannot listen on {host}:{port}: {err.strerror}"
            ) from err
        port = sock.getsockname()[1]
        self._ports.append(self.reactor.adoptStreamPort(sock.fileno(), sock.family, site))
        sock.close()
        self._runtime_dir = tempfile.mkdtemp(prefix="hsmocsp-")
        backend = os.path.join(self._runtime_dir, "backend.sock")
        self._ports.append(self.reactor.listenUNIX(backend, site, mode=0o600))
        self.fronts = FrontPool(
            self.reactor,
            self.handles,
            self.app.metrics,
            count=self.http_workers - 1,
            host=host,
            port=port,
            backend=backend,
            max_request_size=self.cfg.max_request_size,
        )
        self.fronts.setServiceParent(self)

    def _fatal(self, failure: Any) -> None:
        if failure.check(HsmOcspError):
            log.critical("hsmocsp cannot start: {why}", why=failure.getErrorMessage())
        else:
            log.failure("hsmocsp cannot start", failure)
        if IReactorCore.providedBy(self.reactor) and self.reactor.running:
            self.reactor.addSystemEventTrigger("after", "shutdown", _exit_failed)
            self.reactor.stop()

    def stopService(self) -> Deferred[None]:
        async def stop() -> None:
            if self.fronts is not None and self.fronts.running:
                await self.fronts.stopService()
            for port in self._ports:
                await port.stopListening()
            if self._runtime_dir is not None:
                shutil.rmtree(self._runtime_dir, ignore_errors=True)
            if self.port_service is not None and self.port_service.running:
                await self.port_service.stopService()
            for presigner in self.presigners:
                presigner.stop()
            if self.store is not None:
                await self.store.stop()
            await _all([source.stop() for source in self.sources])
            await _all([signer.stop() for signer in self.signers])
            await _all([pool.stop() for pool in self.pools.values()])

        self.running = False
        return ensureDeferred(stop())


def _vault_source(src: VaultSourceConfig, reactor: Any) -> StatusSource:
    from hsmocsp.sources.vault import VaultSource, VaultTLS
    from hsmocsp.sources.vaultauth import AppRoleAuth, KubernetesAuth, TokenAuth, VaultAuth

    a = src.auth
    auth: VaultAuth
    if a.method == "approle":
        assert a.role_id is not None and a.secret_id is not None
        assert a.secret_id.file is not None
        auth = AppRoleAuth(a.role_id, a.secret_id.file, mount=a.mount or "approle")
    elif a.method == "kubernetes":
        assert a.jwt_file is not None and a.role is not None
        auth = KubernetesAuth(a.jwt_file, a.role, mount=a.mount or "kubernetes")
    else:
        assert a.token is not None
        auth = TokenAuth(env=a.token.env, file=a.token.file)
    tls = None
    if src.tls is not None:
        tls = VaultTLS(
            ca_bundle=src.tls.ca_file, client_cert=src.tls.cert_file, client_key=src.tls.key_file
        )
    return VaultSource(
        address=src.address,
        mount=src.mount,
        auth=auth,
        namespace=src.namespace,
        tls=tls,
        cache_ttl=src.cache_ttl,
        crl_refresh=src.crl_refresh,
        request_timeout=src.request_timeout,
        reactor=reactor,
    )


def tcp_listen_address(description: str, cfg: Config, key: str) -> tuple[str, int, int]:
    """``(host, port, backlog)`` of a ``tcp:`` strports description, for ``SO_REUSEPORT``.

    Other kinds (``ssl:``, ``unix:``, ...) cannot be shared that way: a config error.
    """
    parts = [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", description)]
    if parts and parts[0].isdigit():
        parts.insert(0, "tcp")
    kind, args = parts[0], parts[1:]
    if kind not in ("tcp", "tcp6"):
        raise ConfigError(
            str(cfg.path), key, f"{description!r}: several HTTP processes need a tcp: endpoint"
        )
    named = dict(a.split("=", 1) for a in args if "=" in a)
    positional = [a for a in args if "=" not in a]
    port_text = named.get("port", positional[0] if positional else "")
    host = named.get("interface", "::" if kind == "tcp6" else "0.0.0.0")
    try:
        port = int(port_text)
        backlog = int(named.get("backlog", "1024"))
        if not 0 <= port <= 65535:
            raise ValueError(port)
    except ValueError:
        raise ConfigError(str(cfg.path), key, f"{description!r}: bad port") from None
    return host, port, backlog


async def _all(ds: Sequence[Deferred[Any]]) -> None:
    """Wait for every Deferred; re-raise the first failure (after all have settled)."""
    results = await DeferredList(list(ds), consumeErrors=True)
    for ok, value in results:
        if not ok:
            value.raiseException()


def _exit_failed() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    cfg: Config = options["parsed"]
    try:
        return ResponderService(cfg, reactor, options["listen"], options["workers"])
    except ConfigError as err:
        raise SystemExit(f"hsmocsp: configuration error: {err}") from err
    except HsmOcspError as err:
        raise SystemExit(f"hsmocsp: {err}") from err


__all__ = ["Options", "ResponderService", "makeService"]
