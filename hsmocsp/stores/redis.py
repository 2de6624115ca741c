"""The store a signer shares with its server replicas: signed responses in Redis.

Layout (docs/design-replicas.md): one hash per (handle, serial),
``<prefix>r:<handle>:<serial hex>``; its fields are the first 16 bytes of the SHA-256
of a CertID's DER, its values :mod:`hsmocsp.stores.codec` bytes; the hash expires at
the latest nextUpdate it holds (``EXPIREAT ... NX`` then ``EXPIREAT ... GT``: Redis 7).
Invalidations go out on ``<prefix>inv`` as ``<handle> <serial hex> ...`` or
``<handle> all``.

Signer side: :meth:`RedisStore.observer` follows a handle's cache; every lasting
response it stores (never an ``unknown`` or uncacheable one, as for SQLite) is queued
and written in pipelined batches off the request path; an invalidation (a revocation
loaded) deletes the serials' hashes and is published, before any response queued after
it is written, and is retried until it is done. While Redis cannot be written the
queue is bounded (one entry per CertID, the newest wins, beyond ``max_pending`` the
oldest are dropped and counted), failures are counted, logged once when they start and
once when writing works again, the store is DEGRADED (the handle with it; ``/readyz``
stays 200), and what waits is written as soon as Redis is back.

Reader side (servers): :meth:`RedisStore.fetch` answers within ``timeout`` or fails with
:class:`~hsmocsp.errors.StoreUnavailable`; :meth:`RedisStore.subscribe` keeps a
subscription alive by itself (a PING every ``timeout`` on it notices a dead one) and
says when it is lost and restored.

Connections (:class:`Connector`): to ``address``, or to the primary the sentinels name
(asked again after every lost connection; each sentinel is sent its own AUTH first
when ``sentinel_password`` is set), then AUTH, SELECT and ROLE (it must be a
primary: a replica, or a demoted primary, is left and asked for again; so is a
connection whose write gets ``READONLY``). TLS and Unix sockets through Twisted's
endpoints, on the reactor the process already runs.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet import endpoints
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from hsmocsp.config import RedisAddress, StoreConfig
from hsmocsp.errors import ConfigError, StoredValueError, StoreUnavailable
from hsmocsp.handle import SignedResponse
from hsmocsp.health import READY, Health, State, worst
from hsmocsp.inflight import OneAtATime
from hsmocsp.stores import InvalidationListener, SubscriptionListener
from hsmocsp.stores.codec import decode, encode
from hsmocsp.stores.resp import Arg, Reply, ReplyError, RespProtocol

if TYPE_CHECKING:
    from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

    from hsmocsp.stores import SharedStore

log = Logger()

#: Writes per pipelined batch (three commands each).
BATCH = 500
#: Serials per DEL / per published message.
CHUNK = 500
#: More serials than this pending invalidation for one handle: invalidate all of it.
MAX_SERIALS = 100_000


def field_of(key: bytes) -> bytes:
    """The hash field of a CertID DER: the first 16 bytes of its SHA-256."""
    return hashlib.sha256(key).digest()[:16]


def response_key(prefix: str, handle: str, serial: int) -> bytes:
    return f"{prefix}r:{handle}:{serial:x}".encode()


def lasting(response: SignedResponse) -> bool:
    """The rule of every store: only cacheable answers of known serials are kept."""
    return response.cacheable and bool(response.status_key) and not response.is_unknown()


# --- connecting ---------------------------------------------------------------------


class _RespFactory(Factory):
    noisy = False  # no "Starting factory" line per connection

    def __init__(self, clock: Any, name: str) -> None:
        self.clock = clock
        self.name = name

    def buildProtocol(self, addr: Any) -> RespProtocol:
        proto = RespProtocol(self.clock, self.name)
        proto.factory = self
        return proto


def tls_creator(cfg: StoreConfig, host: str, config_path: str) -> IOpenSSLClientConnectionCreator:
    """The client TLS settings for ``host`` (checked against ``tls.server_name`` if set)."""
    from twisted.internet import ssl

    assert cfg.tls is not None
    t = cfg.tls

    def read(path: Path, key: str) -> bytes:
        try:
            return path.read_bytes()
        except OSError as err:
            raise ConfigError(config_path, key, f"cannot read {path}: {err.strerror}") from err

    try:
        trust: Any = (
            ssl.Certificate.loadPEM(read(t.ca_file, "store.tls.ca_file"))
            if t.ca_file is not None
            else ssl.platformTrust()
        )
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(
            config_path, "store.tls.ca_file", f"not a PEM certificate: {err}"
        ) from err
    client: Any = None
    if t.cert_file is not None and t.key_file is not None:
        try:
            pem = read(t.cert_file, "store.tls.cert_file") + b"\n"
            client = ssl.PrivateCertificate.loadPEM(pem + read(t.key_file, "store.tls.key_file"))
        except ConfigError:
            raise
        except Exception as err:
            raise ConfigError(
                config_path, "store.tls.cert_file", f"certificate and key unusable: {err}"
            ) from err
    return ssl.optionsForClientTLS(
        t.server_name or host, trustRoot=trust, clientCertificate=client
    )


class Connector:
    """Opens ready connections to the primary: found (Sentinel), logged in, checked."""

    def __init__(
        self,
        cfg: StoreConfig,
        reactor: Any,
        password: str | None,
        config_path: str,
        sentinel_password: str | None = None,
    ):
        self.cfg = cfg
        self.reactor = reactor
        self._password = password
        self._sentinel_password = sentinel_password
        self._config_path = config_path
        if cfg.tls is not None:  # read the files now: a bad one is a configuration error
            tls_creator(cfg, "localhost", config_path)
        self.where = (
            str(cfg.address)
            if cfg.address is not None
            else f"sentinel master {cfg.master_name}"
        )
        self.current: RedisAddress | None = cfg.address

    def _endpoint(self, address: RedisAddress) -> IStreamClientEndpoint:
        timeout = max(self.cfg.timeout, 0.05)
        if address.unix is not None:
            return endpoints.UNIXClientEndpoint(self.reactor, str(address.unix), timeout=timeout)
        assert address.host is not None
        endpoint: IStreamClientEndpoint = endpoints.HostnameEndpoint(
            self.reactor, address.host.encode("idna"), address.port, timeout=timeout
        )
        if self.cfg.tls is not None:
            endpoint = endpoints.wrapClientTLS(
                tls_creator(self.cfg, address.host, self._config_path), endpoint
            )
        return endpoint

    async def _open(self, address: RedisAddress, name: str) -> RespProtocol:
        try:
            proto = await self._endpoint(address).connect(_RespFactory(self.reactor, name))
        except Exception as err:
            raise StoreUnavailable(f"{name}: cannot connect: {_text(err)}") from None
        assert isinstance(proto, RespProtocol)
        return proto

    async def connect(self, purpose: str) -> RespProtocol:
        """A connection to the primary, authenticated, on the database, checked to be
        a primary; StoreUnavailable (with the reason) otherwise."""
        address = self.cfg.address or await self._discover()
        self.current = address
        name = f"redis {address}"
        proto = await self._open(address, name)
        try:
            timeout = self.cfg.timeout
            commands: list[Sequence[Arg]] = []
            if self._password is not None:
                auth: list[Arg] = ["AUTH"]
                if self.cfg.username is not None:
                    auth.append(self.cfg.username)
                auth.append(self._password)
                commands.append(auth)
            if self.cfg.database:
                commands.append(("SELECT", self.cfg.database))
            commands.append(("CLIENT", "SETNAME", f"hsmocsp-{purpose}"))
            commands.append(("ROLE",))
            replies = await proto.pipeline(commands, timeout=max(timeout, 1.0))
            for command, reply in zip(commands[:-1], replies[:-1], strict=True):
                if isinstance(reply, ReplyError) and command[0] != "CLIENT":
                    raise StoreUnavailable(
                        f"{name}: {_text_of(command[0])} refused: {reply.message}"
                    )
            role = replies[-1]
            if isinstance(role, list) and role and role[0] != b"master":
                raise StoreUnavailable(
                    f"{name}: is a {_text_of(role[0])}, not the primary (failing over?)"
                )
            # A NOPERM reply (an ACL user without +role) leaves the check to READONLY.
        except BaseException:
            proto.abort("connection not usable")
            raise
        return proto

    async def _discover(self) -> RedisAddress:
        """The primary's address, from the first sentinel that knows it."""
        problems = []
        for sentinel in self.cfg.sentinels:
            name = f"sentinel {sentinel}"
            try:
                proto = await self._open(sentinel, name)
            except StoreUnavailable as err:
                problems.append(str(err))
                continue
            commands: list[Sequence[Arg]] = []
            if self._sentinel_password is not None:
                auth: list[Arg] = ["AUTH"]
                if self.cfg.sentinel_username is not None:
                    auth.append(self.cfg.sentinel_username)
                auth.append(self._sentinel_password)
                commands.append(auth)
            commands.append(("SENTINEL", "get-master-addr-by-name", self.cfg.master_name or ""))
            try:
                replies = await proto.pipeline(commands, timeout=max(self.cfg.timeout, 0.2))
            except StoreUnavailable as err:
                problems.append(str(err))
                continue
            finally:
                proto.abort("asked")
            reply = replies[-1]
            if len(replies) == 2 and isinstance(replies[0], ReplyError):
                # Redis's reason (WRONGPASS, ...): never the password itself.
                problems.append(f"{name}: AUTH refused: {replies[0].message}")
                continue
            if isinstance(reply, ReplyError) and reply.code == "NOAUTH":
                problems.append(
                    f"{name}: requires authentication; set store.sentinel_password_file"
                    " or store.sentinel_password_env (and store.sentinel_username for an"
                    " ACL user)"
                )
                continue
            if isinstance(reply, ReplyError):
                problems.append(f"{name}: SENTINEL get-master-addr-by-name: {reply.message}")
                continue
            if (
                isinstance(reply, list)
                and len(reply) == 2
                and isinstance(reply[0], bytes)
                and isinstance(reply[1], bytes)
            ):
                host = reply[0].decode("ascii", "replace")
                try:
                    return RedisAddress(host=host, port=int(reply[1]))
                except ValueError:
                    pass
            problems.append(f"{name}: does not know master {self.cfg.master_name!r}: {reply!r}")
        raise StoreUnavailable("no sentinel names the primary (" + "; ".join(problems) + ")")


class Link:
    """One kept connection for one purpose (writes, reads, the subscription): connected
    on demand, one attempt at a time, and after a failure not tried again before a
    short pause (a read fails at once meanwhile, it does not wait for a dead Redis)."""

    def __init__(
        self, connector: Connector, purpose: str, clock: Any, *, min_pause: float = 0.05,
        max_pause: float = 2.0,
    ) -> None:
        self.connector = connector
        self.purpose = purpose
        self.clock = clock
        self.proto: RespProtocol | None = None
        self._connecting: OneAtATime[RespProtocol] = OneAtATime()
        self._min_pause = min_pause
        self._max_pause = max_pause
        self._pause = 0.0
        self._retry_at = 0.0
        self.problem: str | None = None
        self.on_lost: Callable[[str], None] | None = None
        self.on_message: Callable[[bytes, bytes], None] | None = None
        self.on_connected: Callable[[], None] | None = None
        self._closed = False

    @property
    def connected(self) -> bool:
        return self.proto is not None and self.proto.open

    def get(self) -> Deferred[RespProtocol]:
        proto = self.proto
        if proto is not None and proto.open:
            return succeed(proto)
        if self._closed:
            return fail(StoreUnavailable("store stopped"))
        if not self._connecting.running and self.clock.seconds() < self._retry_at:
            return fail(StoreUnavailable(self.problem or f"{self.connector.where}: down"))
        return self._connecting.run(self._connect)

    def _connect(self) -> Deferred[RespProtocol]:
        d = Deferred.fromCoroutine(self.connector.connect(self.purpose))

        def connected(proto: RespProtocol) -> RespProtocol:
            if self._closed:  # stopped while connecting: do not leave it open
                proto.abort("store stopped")
                raise StoreUnavailable("store stopped")
            self.proto = proto
            self._pause = 0.0
            self.problem = None
            proto.on_lost = self._lost
            proto.on_message = self.on_message
            if self.on_connected is not None:
                self.on_connected()
            return proto

        def failed(failure: Failure) -> Failure:
            self._failed(_failure_text(failure))
            return failure

        return d.addCallbacks(connected, failed)

    def _failed(self, why: str) -> None:
        self.problem = why
        self._pause = min(self._max_pause, max(self._min_pause, self._pause * 2))
        self._retry_at = self.clock.seconds() + self._pause

    def _lost(self, proto: RespProtocol, why: str) -> None:
        if proto is not self.proto:
            return
        self.proto = None
        self._failed(why)
        if self.on_lost is not None:
            self.on_lost(why)

    def drop(self, why: str) -> None:
        """Leave this connection (a replica's READONLY): the next use finds the primary."""
        if self.proto is not None:
            self.proto.abort(why)

    def close(self) -> Deferred[None]:
        """Close for good; fires once the connection is really lost (a stopped store
        leaves nothing of its own on the reactor)."""
        self._closed = True
        self.on_lost = None
        proto, self.proto = self.proto, None
        if proto is None:
            return succeed(None)
        proto.on_lost = None
        proto.abort("store stopped")
        return proto.when_lost()


# --- the store ----------------------------------------------------------------------


@dataclass
class _Write:
    handle: str
    serial: int
    field: bytes
    value: bytes
    expire_at: int


@dataclass
class StoreStats:
    written: int = 0
    dropped: int = 0
    write_errors: int = 0
    fetches: int = 0
    fetch_errors: int = 0
    bad_values: int = 0
    invalidations_published: int = 0
    invalidations_received: int = 0


class HeldResponses(Protocol):
    """What the store reads from a handle's cache to write it all again
    (:class:`hsmocsp.cache.ResponseCache`)."""

    def keys(self) -> list[bytes]: ...

    def entry(self, key: bytes) -> tuple[int, SignedResponse] | None: ...


class _Observer:
    """A handle cache's observer (hsmocsp.cache.CacheObserver) feeding the store."""

    def __init__(self, store: RedisStore, handle: str) -> None:
        self.store = store
        self.handle = handle
        self.record = store.recorder(handle)

    def stored(self, key: bytes, serial: int, value: SignedResponse) -> None:
        self.record(key, serial, value)

    def dropped(self, key: bytes) -> None:
        pass  # expiry is Redis's (EXPIREAT); a status change comes as invalidated()

    def invalidated(self, serials: frozenset[int] | None) -> None:
        self.store.forget(self.handle, serials)


@dataclass
class _Subscription:
    on_invalidate: InvalidationListener
    on_subscription: SubscriptionListener | None
    live: bool = False


class RedisStore:
    """:class:`~hsmocsp.stores.SharedStore` on Redis. Nothing connects before :meth:`start`."""

    kind = "redis"

    def __init__(
        self,
        cfg: StoreConfig,
        reactor: Any,
        *,
        password: str | None = None,
        sentinel_password: str | None = None,
        config_path: str = "config",
        flush_interval: float = 0.05,
        max_backoff: float = 2.0,
    ) -> None:
        self.cfg = cfg
        self.reactor = reactor
        self.prefix = cfg.key_prefix
        self.channel = f"{cfg.key_prefix}inv".encode()
        self.connector = Connector(
            cfg, reactor, password, config_path, sentinel_password=sentinel_password
        )
        self._writer = Link(self.connector, "signer", reactor)
        self._reader = Link(self.connector, "reader", reactor)
        self._subscriber = Link(self.connector, "subscriber", reactor)
        self._reader.on_connected = self._readable
        self._writer.on_connected = self._new_writer_connection
        self.stats = StoreStats()
        self._pending: OrderedDict[tuple[str, bytes], _Write] = OrderedDict()
        self._invalid: dict[str, set[int] | None] = {}
        self._taken: list[tuple[str, frozenset[int] | None]] | None = None
        self._in_flight = 0
        self._writes = False
        self._held: dict[str, HeldResponses] = {}
        self._marker = f"{cfg.key_prefix}signer".encode()
        self._check_marker = False
        self._resync: deque[tuple[str, bytes]] = deque()
        self.resyncs = 0
        """Times Redis was found without our marker and everything held written again."""
        self._writing: OneAtATime[None] = OneAtATime()
        self._flush_interval = flush_interval
        self._max_backoff = max(max_backoff, flush_interval)
        self._delay = flush_interval
        self._timer: IDelayedCall | None = None
        self._running = False
        self._problem: str | None = None
        self._failed_since_ok = 0
        self._full_logged = False
        self._read_problem: str | None = None
        self._subscriptions: list[_Subscription] = []
        self._ping: IDelayedCall | None = None
        self._resubscribe: IDelayedCall | None = None
        self._bad_logged = False

    @classmethod
    def from_config(cls, cfg: StoreConfig, reactor: Any, config_path: str) -> RedisStore:
        """A store for ``store:`` of the file at ``config_path``; the passwords are read
        now (a missing one is a :class:`ConfigError` naming its key)."""
        password = cfg.password.read("store.password") if cfg.password is not None else None
        sentinel_password = (
            cfg.sentinel_password.read("store.sentinel_password")
            if cfg.sentinel_password is not None
            else None
        )
        return cls(
            cfg,
            reactor,
            password=password,
            sentinel_password=sentinel_password,
            config_path=config_path,
        )

    # --- life -------------------------------------------------------------------------

    def start(self) -> None:
        """Start writing what is queued. A writer (one that made a :meth:`recorder`)
        connects now and stays connected: a Redis that is down, at start or later,
        makes the store degraded (and is retried) even while nothing is signed."""
        self._running = True
        if self._writes:
            self._writer.on_lost = lambda why: self._soon()
        self._schedule(0)

    def stop(self) -> Deferred[None]:
        """Stop the timers; try once more (briefly) to write what waits; close. Fires
        once every connection is really closed."""
        self._running = False
        for timer in (self._timer, self._ping, self._resubscribe):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._ping = self._resubscribe = None
        d = self._writing.wait()
        if self._writer.connected:
            d.addCallback(lambda _: self.flush())
        d.addBoth(lambda _: self._close())
        return d

    def _close(self) -> Deferred[None]:
        if self._pending or self._invalid:
            log.warn(
                "store {where}: {n} responses and {m} invalidation(s) not written at stop"
                " ({why})",
                where=self.connector.where, n=len(self._pending), m=len(self._invalid),
                why=self._problem or "stopped",
            )  # fmt: skip
        closing = [link.close() for link in (self._writer, self._reader, self._subscriber)]
        self._subscriptions.clear()
        self._resync.clear()
        return gatherResults(closing).addCallback(lambda _: None)

    @property
    def pending(self) -> int:
        """Responses waiting to be written, the batch being written included
        (``hsmocsp_store_pending_rows``)."""
        return len(self._pending) + self._in_flight

    @property
    def write_errors(self) -> int:
        return self.stats.write_errors

    @property
    def dropped(self) -> int:
        return self.stats.dropped

    @property
    def written(self) -> int:
        return self.stats.written

    @property
    def fetch_errors(self) -> int:
        """Reads that failed (``hsmocsp_store_read_errors_total``)."""
        return self.stats.fetch_errors

    @property
    def connected(self) -> bool:
        """True while this process holds a working connection to the primary (writer,
        or reader/subscriber in a server)."""
        return any(
            link.connected for link in (self._writer, self._reader, self._subscriber)
        )

    def health(self) -> Health:
        """DEGRADED while writes fail, reads fail, or the subscription is down: answers
        go on (the signer signs, a server forwards), but the replicas are not fed."""
        parts = []
        if self._problem is not None:
            parts.append(
                Health(
                    State.DEGRADED,
                    f"cannot write {self.connector.where}: {self._problem}"
                    f" ({self.pending} responses waiting)",
                )
            )
        if self._read_problem is not None:
            parts.append(
                Health(State.DEGRADED, f"cannot read {self.connector.where}: {self._read_problem}")
            )
        if self._subscriptions and not all(s.live for s in self._subscriptions):
            parts.append(
                Health(
                    State.DEGRADED,
                    f"not subscribed to {self.connector.where}:"
                    f" {self._subscriber.problem or 'connecting'}",
                )
            )
        return worst(*parts) if parts else READY

    # --- signer side ------------------------------------------------------------------

    def observer(self, handle: str, held: HeldResponses | None = None) -> _Observer:
        """A cache observer for ``handle`` (``handle.cache.observers.append(...)``):
        every lasting response stored is written, every invalidation forgotten.

        ``held`` (the cache itself): when Redis turns out to have lost what we wrote
        (restarted without persistence, flushed: the marker key is gone), everything
        it holds is written again, a batch at a time behind new responses."""
        if held is not None:
            self._held[handle] = held
        return _Observer(self, handle)

    def recorder(self, handle: str) -> Callable[[bytes, int, SignedResponse], None]:
        self._writes = True

        def record(key: bytes, serial: int, response: SignedResponse) -> None:
            if not lasting(response):
                return
            expire_at = int(response.expires_at)
            if expire_at <= self.reactor.seconds():
                return
            try:
                value = encode(response)
            except ValueError:
                return  # nothing we would ever serve (no DER, infinite times)
            self._queue(
                (handle, key),
                _Write(handle, serial, field_of(key), value, expire_at),
            )

        return record

    def _queue(self, where: tuple[str, bytes], write: _Write) -> None:
        self._pending.pop(where, None)  # re-inserted last: the newest response wins
        self._pending[where] = write
        if len(self._pending) > self.cfg.max_pending:
            self._pending.popitem(last=False)
            self.stats.dropped += 1
            if not self._full_logged:
                self._full_logged = True
                log.warn(
                    "store {where}: {n} responses wait to be written; dropping the oldest",
                    where=self.connector.where, n=self.cfg.max_pending,
                )  # fmt: skip
        self._soon()

    def forget(self, handle: str, serials: frozenset[int] | None) -> None:
        """Delete these serials' responses (None: all of ``handle``) and publish it.

        Responses of those serials still waiting are dropped (they are older than the
        change); the invalidation goes before anything queued after it, and waits,
        merged with later ones, until Redis has taken it."""
        if serials is not None and not serials:
            return
        if serials is None:
            for where in [w for w in self._pending if w[0] == handle]:
                del self._pending[where]
        else:
            for where in [
                w for w, write in self._pending.items()
                if w[0] == handle and write.serial in serials
            ]:  # fmt: skip
                del self._pending[where]
        if self._taken is not None:
            self._taken.append((handle, serials))
        known = self._invalid.get(handle, set())
        if serials is None or known is None or len(known) + len(serials) > MAX_SERIALS:
            self._invalid[handle] = None
        else:
            known.update(serials)
            self._invalid[handle] = known
        self._soon(now=True)

    def _soon(self, now: bool = False) -> None:
        """Flush shortly (at once for an invalidation), unless a retry pause is on."""
        if not self._running or self._problem is not None:
            return  # the retry timer is set; it takes everything
        if self._timer is not None and self._timer.active():
            if not now:
                return
            self._timer.cancel()
        self._schedule(0 if now else self._flush_interval)

    def _schedule(self, delay: float) -> None:
        if self._running:
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = self.reactor.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self.flush().addCallback(lambda _: self._after_flush())

    def _after_flush(self) -> None:
        if self._problem is not None:
            self._schedule(self._delay)
        elif self._pending or self._invalid or self._resync:
            self._schedule(0)

    def flush(self) -> Deferred[None]:
        """Write what waits now; never fails (a failure is kept, counted, retried)."""
        if self._writing.running:
            return self._writing.wait()
        if not self._pending and not self._invalid and not self._resync and (
            self._writer.connected or not self._writes
        ):
            return succeed(None)
        return self._writing.run(lambda: Deferred.fromCoroutine(self._write_batch()))

    def _new_writer_connection(self) -> None:
        """A new connection may reach a Redis that lost everything (restarted empty,
        flushed, another primary): look for the marker before the next batch."""
        self._check_marker = True

    async def _look_for_marker(self, proto: RespProtocol) -> None:
        replies = await proto.pipeline(
            [("EXISTS", self._marker), ("SET", self._marker, str(int(self.reactor.seconds())))],
            timeout=self._write_timeout,
        )
        self._check(replies, "marker refused")
        self._check_marker = False
        if replies[0] == 0 and self._held:
            self._resync = deque(
                (handle, key) for handle, held in self._held.items() for key in held.keys()
            )
            self.resyncs += 1
            log.info(
                "store {where}: holds none of our responses (new, restarted empty or"
                " flushed); writing the {n} held here again",
                where=self.connector.where, n=len(self._resync),
            )  # fmt: skip

    def _refill(self, batch: list[tuple[tuple[str, bytes], _Write]]) -> None:
        """Top ``batch`` up from the resync walk: each entry as the cache holds it *now*
        (one invalidated since the walk began is gone from the cache: skipped)."""
        now = self.reactor.seconds()
        taken = {where for where, _ in batch}
        while self._resync and len(batch) < BATCH:
            handle, key = self._resync.popleft()
            held = self._held.get(handle)
            found = held.entry(key) if held is not None else None
            if found is None or (handle, key) in self._pending or (handle, key) in taken:
                continue
            serial, value = found
            if not lasting(value) or value.expires_at <= now + 1:
                continue
            try:
                data = encode(value)
            except ValueError:
                continue
            batch.append(
                ((handle, key), _Write(handle, serial, field_of(key), data, int(value.expires_at)))
            )

    async def _write_batch(self) -> None:
        invalid, self._invalid = self._invalid, {}
        batch: list[tuple[tuple[str, bytes], _Write]] = []
        while self._pending and len(batch) < BATCH:
            batch.append(self._pending.popitem(last=False))
        self._taken = []
        self._in_flight = len(batch)
        try:
            proto = await self._writer.get()
            if self._check_marker:
                await self._look_for_marker(proto)
            if len(batch) < BATCH and self._resync:
                self._refill(batch)
                self._in_flight = len(batch)
            for handle, serials in invalid.items():
                wanted = None if serials is None else frozenset(serials)
                await self._invalidate(proto, handle, wanted)
            if batch:
                await self._write(proto, [w for _, w in batch])
        except Exception as err:
            self._write_failed(_text(err), invalid, batch)
            return
        finally:
            self._taken = None
            self._in_flight = 0
        self.stats.written += len(batch)
        self.stats.invalidations_published += len(invalid)
        self._delay = self._flush_interval
        if self._problem is not None:
            log.info(
                "store {where}: writing again; {n} responses written after {tries} failed"
                " attempt(s)",
                where=self.connector.where, n=len(batch), tries=self._failed_since_ok,
            )  # fmt: skip
        self._problem = None
        self._failed_since_ok = 0
        self._full_logged = False

    def _write_failed(
        self,
        why: str,
        invalid: dict[str, set[int] | None],
        batch: list[tuple[tuple[str, bytes], _Write]],
    ) -> None:
        forgotten = self._taken or []
        # Invalidations first, merged with any made meanwhile; they are never dropped.
        for handle, serials in invalid.items():
            later = self._invalid.get(handle, set())
            if serials is None or later is None:
                self._invalid[handle] = None
            else:
                self._invalid[handle] = serials | later
        # Responses back in front, unless a newer one is queued or the serial changed since.
        kept: OrderedDict[tuple[str, bytes], _Write] = OrderedDict()
        for where, write in batch:
            if where in self._pending or _covered(forgotten, write.handle, write.serial):
                continue
            kept[where] = write
        kept.update(self._pending)
        self._pending = kept
        while len(self._pending) > self.cfg.max_pending:
            self._pending.popitem(last=False)
            self.stats.dropped += 1
        self.stats.write_errors += 1
        self._failed_since_ok += 1
        self._delay = min(self._max_backoff, max(self._delay * 2, self._flush_interval))
        if self._problem is None:
            log.warn(
                "store {where}: cannot write ({why}); {n} responses kept in memory,"
                " retrying every {max:g} s at most",
                where=self.connector.where, why=why, n=len(self._pending), max=self._max_backoff,
            )  # fmt: skip
        self._problem = why

    def _check(self, replies: Iterable[Reply], what: str) -> None:
        for reply in replies:
            if isinstance(reply, ReplyError):
                if reply.code in ("READONLY", "MASTERDOWN", "LOADING"):
                    self._writer.drop(reply.message)  # a replica now: find the primary again
                raise StoreUnavailable(f"{what}: {reply.message}")

    async def _write(self, proto: RespProtocol, writes: Sequence[_Write]) -> None:
        now = self.reactor.seconds()
        commands: list[Sequence[Arg]] = []
        for w in writes:
            if w.expire_at <= now:
                continue  # an EXPIREAT in the past would delete the whole hash
            key = response_key(self.prefix, w.handle, w.serial)
            commands.append(("HSET", key, w.field, w.value))
            commands.append(("EXPIREAT", key, w.expire_at, "NX"))
            commands.append(("EXPIREAT", key, w.expire_at, "GT"))
        if commands:
            replies = await proto.pipeline(commands, timeout=self._write_timeout)
            self._check(replies, "write refused")

    @property
    def _write_timeout(self) -> float:
        return max(5.0, 10 * self.cfg.timeout)

    async def _invalidate(
        self, proto: RespProtocol, handle: str, serials: frozenset[int] | None
    ) -> None:
        if serials is None:
            pattern = _glob_escape(f"{self.prefix}r:{handle}:").encode() + b"*"
            cursor = b"0"
            while True:
                reply = await proto.execute(
                    "SCAN", cursor, "MATCH", pattern, "COUNT", 1000, timeout=self._write_timeout
                )
                self._check([reply], "scan refused")
                if not (isinstance(reply, list) and len(reply) == 2):
                    raise StoreUnavailable(f"SCAN: unexpected reply {reply!r}")
                cursor_reply, keys = reply
                if isinstance(keys, list) and keys:
                    deleted = await proto.execute(
                        "DEL", *[k for k in keys if isinstance(k, bytes)],
                        timeout=self._write_timeout,
                    )  # fmt: skip
                    self._check([deleted], "delete refused")
                if cursor_reply in (b"0", None) or not isinstance(cursor_reply, bytes):
                    break
                cursor = cursor_reply
            messages = [f"{handle} all".encode()]
        else:
            ordered = sorted(serials)
            commands: list[Sequence[Arg]] = []
            messages = []
            for start in range(0, len(ordered), CHUNK):
                chunk = ordered[start : start + CHUNK]
                commands.append(("DEL", *[response_key(self.prefix, handle, s) for s in chunk]))
                messages.append(
                    (handle + " " + " ".join(f"{s:x}" for s in chunk)).encode()
                )
            replies = await proto.pipeline(commands, timeout=self._write_timeout)
            self._check(replies, "delete refused")
        replies = await proto.pipeline(
            [("PUBLISH", self.channel, m) for m in messages], timeout=self._write_timeout
        )
        self._check(replies, "publish refused")

    # --- reader side ------------------------------------------------------------------

    def fetch(self, handle: str, key: bytes, serial: int) -> Deferred[SignedResponse | None]:
        """The response stored for CertID DER ``key`` (None: none, or it is no longer
        valid, or its bytes are not a value we read); StoreUnavailable within about
        twice ``timeout`` when Redis cannot answer."""
        self.stats.fetches += 1
        rkey = response_key(self.prefix, handle, serial)
        fieldname = field_of(key)

        async def ask() -> SignedResponse | None:
            proto = await self._reader.get()
            reply = await proto.execute("HGET", rkey, fieldname, timeout=self.cfg.timeout)
            if isinstance(reply, ReplyError):
                if reply.code in ("READONLY", "MASTERDOWN", "LOADING"):
                    self._reader.drop(reply.message)
                raise StoreUnavailable(f"read refused: {reply.message}")
            return self._decoded(reply)

        d = Deferred.fromCoroutine(ask())

        def ok(value: SignedResponse | None) -> SignedResponse | None:
            self._readable()
            return value

        def failed(failure: Failure) -> Failure:
            self.stats.fetch_errors += 1
            why = _failure_text(failure)
            if self._read_problem is None:
                log.warn(
                    "store {where}: cannot read ({why}); answering without the store",
                    where=self.connector.where, why=why,
                )  # fmt: skip
            self._read_problem = why
            if not failure.check(StoreUnavailable):
                return Failure(StoreUnavailable(why))
            return failure

        return d.addCallbacks(ok, failed)

    def _readable(self) -> None:
        """Redis answered a reader again (a read, a reconnection, the subscription)."""
        if self._read_problem is not None:
            log.info("store {where}: reading again", where=self.connector.where)
            self._read_problem = None

    def _decoded(self, reply: Reply) -> SignedResponse | None:
        if reply is None:
            return None
        if not isinstance(reply, bytes):
            raise StoreUnavailable(f"HGET: unexpected reply {reply!r:.60}")
        try:
            value = decode(reply)
        except StoredValueError as err:
            self.stats.bad_values += 1
            if not self._bad_logged:
                self._bad_logged = True
                log.warn(
                    "store {where}: a stored value is unreadable ({err}); treated as missing",
                    where=self.connector.where, err=err,
                )  # fmt: skip
            return None
        if value.expires_at <= self.reactor.seconds():
            return None
        return value

    def subscribe(
        self,
        on_invalidate: InvalidationListener,
        on_subscription: SubscriptionListener | None = None,
    ) -> None:
        self._subscriptions.append(_Subscription(on_invalidate, on_subscription))
        self._subscriber.on_message = self._message
        self._subscriber.on_lost = self._subscription_lost
        if len(self._subscriptions) == 1:
            self._subscribe_now()
        elif self._subscriptions[0].live:
            self._subscriptions[-1].live = True
            if on_subscription is not None:
                on_subscription(True)

    def _subscribe_now(self) -> None:
        self._resubscribe = None

        async def go() -> None:
            proto = await self._subscriber.get()
            reply = await proto.subscribe(self.channel, timeout=max(self.cfg.timeout, 0.2))
            if not (isinstance(reply, list) and reply and reply[0] == b"subscribe"):
                proto.abort("SUBSCRIBE refused")
                raise StoreUnavailable(f"SUBSCRIBE refused: {reply!r:.80}")

        def subscribed(_: object) -> None:
            if self._subscriber.proto is None:
                return
            was = [s.live for s in self._subscriptions]
            for s in self._subscriptions:
                s.live = True
            self._readable()  # the same Redis answers again
            if not all(was):
                log.info(
                    "store {where}: subscribed to {channel}",
                    where=self.connector.where, channel=self.channel.decode(),
                )  # fmt: skip
            for s, before in zip(list(self._subscriptions), was, strict=False):
                if not before and s.on_subscription is not None:
                    s.on_subscription(True)
            self._ping = self.reactor.callLater(self._ping_every, self._keepalive)

        def failed(failure: Failure) -> None:
            self._subscription_down(_failure_text(failure))

        Deferred.fromCoroutine(go()).addCallbacks(subscribed, failed)

    def _keepalive(self) -> None:
        """A PING on the subscribed connection every ``timeout / 2``; no answer within
        ``timeout`` closes it, so a silently dead subscription (a partitioned network,
        a stalled Redis) is noticed and re-made within 1.5 x ``timeout``."""
        self._ping = None
        proto = self._subscriber.proto
        if proto is None or not proto.open:
            return
        d = proto.execute("PING", timeout=max(self.cfg.timeout, 0.1))

        def again(_: object) -> None:
            if self._subscriber.proto is proto and self._ping is None and self._running_reader:
                self._ping = self.reactor.callLater(self._ping_every, self._keepalive)

        d.addCallbacks(again, lambda _: None)

    @property
    def _ping_every(self) -> float:
        """PING the subscription this often: a dead one is seen within 1.5 x timeout."""
        return max(self.cfg.timeout / 2, 0.05)

    @property
    def _running_reader(self) -> bool:
        return bool(self._subscriptions)

    def _subscription_lost(self, why: str) -> None:
        if self._ping is not None and self._ping.active():
            self._ping.cancel()
        self._ping = None
        self._subscription_down(why)

    def _subscription_down(self, why: str) -> None:
        if not self._subscriptions:
            return
        was_live = any(s.live for s in self._subscriptions)
        for s in self._subscriptions:
            if s.live:
                s.live = False
                if s.on_subscription is not None:
                    s.on_subscription(False)
        if was_live:
            log.warn(
                "store {where}: subscription lost ({why}); re-subscribing",
                where=self.connector.where, why=why,
            )  # fmt: skip
        if self._resubscribe is None or not self._resubscribe.active():
            pause = max(0.05, self._subscriber._retry_at - self.reactor.seconds())
            self._resubscribe = self.reactor.callLater(pause, self._subscribe_now)

    def _message(self, channel: bytes, data: bytes) -> None:
        if channel != self.channel:
            return
        self.stats.invalidations_received += 1
        parsed = parse_invalidation(data)
        if parsed is None:
            log.warn("store {where}: unreadable invalidation {data!r:.80}; ignored",
                     where=self.connector.where, data=data)  # fmt: skip
            return
        handle, serials = parsed
        for s in list(self._subscriptions):
            s.on_invalidate(handle, serials)


def parse_invalidation(data: bytes) -> tuple[str, frozenset[int] | None] | None:
    """``b"<handle> all"`` or ``b"<handle> <hex> ..."``; a handle with serials we cannot
    read counts as every serial of it (the safe side: drop more, never keep a revoked
    one); None when not even the handle can be read."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return None
    parts = text.split()
    if not parts:
        return None
    handle, rest = parts[0], parts[1:]
    if not rest or rest == ["all"]:
        return handle, None
    try:
        return handle, frozenset(int(p, 16) for p in rest)
    except ValueError:
        return handle, None


def _covered(forgotten: list[tuple[str, frozenset[int] | None]], handle: str, serial: int) -> bool:
    return any(h == handle and (s is None or serial in s) for h, s in forgotten)


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _text_of(value: Reply | Arg) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _text(err: BaseException) -> str:
    return str(err) or type(err).__name__


def _failure_text(failure: Failure) -> str:
    err = failure.value
    return _text(err) if err is not None else "failed"


if TYPE_CHECKING:

    def _is_a_shared_store(store: RedisStore) -> SharedStore:
        return store  # mypy checks RedisStore against the protocol here


__all__ = [
    "Connector",
    "Link",
    "RedisStore",
    "StoreStats",
    "field_of",
    "lasting",
    "parse_invalidation",
    "response_key",
]
