"""The listening side of the service tree: one port, or one port shared with fronts.

A listener is the last thing started (nothing listens before every handle can
answer) and the first thing stopped. A port that cannot be bound is a
configuration error naming the key it came from (``listen`` or ``--listen``),
not a traceback.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory

from hsmocsp.errors import ConfigError
from hsmocsp.service.tree import _StartTracker
from hsmocsp.web.front_process import bind_reuseport


class Listener(service.Service):
    """Listens on a strports ``description``; started once the port is bound."""

    def __init__(
        self, reactor: Any, description: str, factory: IProtocolFactory, config_path: str, key: str
    ) -> None:
        self.setName("listener")
        self.reactor = reactor
        self.description = description
        self.factory = factory
        self.config_path = config_path
        self.key = key
        self.port: IListeningPort | None = None
        self._tracker = _StartTracker()

    def startService(self) -> None:
        super().startService()
        self._tracker.track(Deferred.fromCoroutine(self._listen()))

    async def _listen(self) -> None:
        try:
            endpoint = endpoints.serverFromString(self.reactor, self.description)
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(self.config_path, self.key, f"{self.description!r}: {err}") from err
        try:
            self.port = await endpoint.listen(self.factory)
        except CannotListenError as err:
            why = err.socketError.strerror if isinstance(err.socketError, OSError) else err
            raise ConfigError(
                self.config_path, self.key, f"cannot listen on {self.description}: {why}"
            ) from None

    def whenStarted(self) -> Deferred[None]:
        return self._tracker.wait()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        d: Deferred[None] = Deferred.fromCoroutine(_stop_listening(port))
        return d


async def _stop_listening(port: IListeningPort) -> None:
    await maybeDeferred(port.stopListening)


class SharedListener(service.MultiService):
    """This process and its HTTP fronts on one TCP port (``SO_REUSEPORT``).

    The fronts relay what they cannot answer to a private Unix socket of ours
    (``backend``); ``make_fronts(port, backend)`` builds the front pool once the
    port is bound (port 0 becomes a real port), and it runs as our child.
    """

    def __init__(
        self,
        reactor: Any,
        address: tuple[str, int, int],
        factory: IProtocolFactory,
        make_fronts: Callable[[int, str], service.IService],
        config_path: str,
        key: str,
    ) -> None:
        super().__init__()
        self.setName("listener")
        self.reactor = reactor
        self.host, self.port, self.backlog = address
        self.factory = factory
        self.make_fronts = make_fronts
        self.config_path = config_path
        self.key = key
        self.fronts: service.IService | None = None
        self._ports: list[IListeningPort] = []
        self._runtime_dir: str | None = None
        self._tracker = _StartTracker()

    def privilegedStartService(self) -> None:
        service.Service.privilegedStartService(self)

    def startService(self) -> None:
        service.Service.startService(self)
        self._tracker.track(Deferred.fromCoroutine(self._listen()))

    async def _listen(self) -> None:
        try:
            sock = bind_reuseport(self.host, self.port, self.backlog)
        except OSError as err:
            raise ConfigError(
                self.config_path,
                self.key,
                f"cannot listen on {self.host}:{self.port}: {err.strerror}",
            ) from None
        self.port = sock.getsockname()[1]
        self._ports.append(self.reactor.adoptStreamPort(sock.fileno(), sock.family, self.factory))
        sock.close()
        self._runtime_dir = tempfile.mkdtemp(prefix="hsmocsp-")
        backend = os.path.join(self._runtime_dir, "backend.sock")
        # Connections relayed by fronts start with the client's address (web.accesslog).
        relayed = getattr(self.factory, "relayed", None)
        factory = relayed() if relayed is not None else self.factory
        self._ports.append(self.reactor.listenUNIX(backend, factory, mode=0o600))
        self.fronts = self.make_fronts(self.port, backend)
        self.fronts.setServiceParent(self)  # running: starts the fronts now

    def whenStarted(self) -> Deferred[None]:
        return self._tracker.wait()

    def stopService(self) -> Deferred[None]:
        service.Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        # Fronts first (they relay to our backend socket), then our ports.
        if self.fronts is not None and self.fronts.running:
            await self.fronts.stopService()
        ports, self._ports = self._ports, []
        for port in ports:
            await maybeDeferred(port.stopListening)
        if self._runtime_dir is not None:
            shutil.rmtree(self._runtime_dir, ignore_errors=True)
            self._runtime_dir = None


def tcp_listen_address(description: str, config_path: str, key: str) -> tuple[str, int, int]:
    """``(host, port, backlog)`` of a ``tcp:`` strports description, for ``SO_REUSEPORT``.

    Other kinds (``ssl:``, ``unix:``, ...) cannot be shared that way: a config error.
    """
    parts = [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", description)]
    if parts and parts[0].isdigit():
        parts.insert(0, "tcp")
    kind, args = parts[0], parts[1:]
    if kind not in ("tcp", "tcp6"):
        raise ConfigError(
            config_path, key, f"{description!r}: several HTTP processes need a tcp: endpoint"
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
        raise ConfigError(config_path, key, f"{description!r}: bad port") from None
    return host, port, backlog


__all__ = ["Listener", "SharedListener", "tcp_listen_address"]
