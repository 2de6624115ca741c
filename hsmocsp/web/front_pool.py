"""The main process's side of ``--workers N``: start, feed and watch the fronts.

See :mod:`hsmocsp.web.front_process` for what a front does. Here: each front is a
child process (``python -m hsmocsp.web.front_process``) given, on its stdin, an init
message (where to listen, where the main process's private socket is, the
handles, the size of its hot cache). Nothing more is pushed unasked but
invalidations (a revocation reaches every front in the same reactor turn as the
main cache): a front asks for the answer to a request it had to relay
(``want``), and gets it (``put``) at once if this process holds a servable one,
else as soon as one is stored (a bounded table of pending wants per handle;
answering a want costs a few dict operations, whatever key a front asks for).
So a front's memory follows what its clients ask, bounded by
``hot_cache_entries``, not the size of the main cache times the fronts (#11).

A front that exits is started again after a second (growing to 30 s while it
keeps failing); stopping closes their pipes (they exit) and kills any still
there after a grace period. The processes, pipes, framing and restarts are the
child-process layer's (:mod:`hsmocsp.childproc`). Their answer counts come back
once a second and are added to the main process's metrics, so ``/metrics``
covers every process.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import sys
from collections.abc import Sequence
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from hsmocsp.childenv import minimal_env
from hsmocsp.childproc import Backoff, Child, FrameError, Supervisor, stop_children
from hsmocsp.handle import Handle, SignedResponse
from hsmocsp.health import READY, Health, State
from hsmocsp.hotcache import DEFAULT_ENTRIES, servable
from hsmocsp.web.accesslog import AccessLog, AccessRecord
from hsmocsp.web.front_process import MAX_FRAME, decode_report, encode_frame
from hsmocsp.web.limits import HttpLimits
from hsmocsp.web.metrics import Metrics

log = Logger()

RESPAWN_DELAY = 1.0
MAX_RESPAWN_DELAY = 30.0
STABLE_AFTER = 10.0  # a front that ran this long gets the short delay again
STOP_GRACE = 5.0
MAX_PENDING = 10_000  # wants waiting for an answer, per handle
MAX_WANT_KEY = 1024  # base64 characters: a CertID's DER is ~100 bytes


class _Feed:
    """A :class:`~hsmocsp.cache.CacheObserver` for one handle: answers pending wants,
    tells every front of invalidations."""

    def __init__(self, pool: FrontPool, index: int) -> None:
        self._pool = pool
        self._index = index

    def stored(self, key: bytes, serial: int, value: SignedResponse) -> None:
        self._pool.stored(self._index, key, serial, value)

    def dropped(self, key: bytes) -> None:
        """Nothing to tell: a front never serves past the refresh point, which comes
        before the main cache drops an entry; a status change comes as an invalidation."""

    def invalidated(self, serials: frozenset[int] | None) -> None:
        self._pool.broadcast(encode_frame(("inv", self._index, serials)))


class _Front:
    """The main process's view of front ``number``: its :class:`Child` and its feed."""

    def __init__(self, pool: FrontPool, number: int) -> None:
        self.pool = pool
        self.number = number
        self.pid: int | None = None
        self.live = False  # its pipe takes updates
        self.child = Child(f"HTTP front {number}", on_frame=self._frame, on_end=self._ended,
                           max_frame=MAX_FRAME)  # fmt: skip
        self.ended: Deferred[None] = self.child.ended

    def spawn(self) -> None:
        self.child.spawn(self.pool.reactor, [sys.executable, "-m", "hsmocsp.web.front_process"],
                         minimal_env())  # a front reads untrusted input: none of our secrets
        self.pid = self.child.pid
        self.child.write(encode_frame(("init", self.pool.init_message())))
        self.live = True

    def send(self, frame: bytes) -> None:
        if self.live:
            self.child.write(frame)

    def _frame(self, body: bytes) -> None:
        """A front's report (JSON: a front parses untrusted input). Anything unreadable
        gets it killed by the layer (and restarted)."""
        message = decode_report(body)
        try:
            if message[0] == "stats" and len(message) == 2:
                self.pool.count(self.number, message[1])
            elif message[0] == "access" and len(message) == 2:
                self.pool.access_records(self.number, message[1])
            elif message[0] == "refused" and len(message) == 2:
                self.pool.refused(message[1])
            elif message[0] == "want" and len(message) == 3:
                self.pool.want(self, *_want(message[1], message[2], len(self.pool.handles)))
            elif message[0] == "held" and len(message) == 2:
                self.pool.held(self.number, message[1])
            elif message[0] == "ready":
                log.info("HTTP front {n} (pid {pid}) listening", n=self.number, pid=message[1])
                self.pool.listening_now(self)
        except (ValueError, TypeError, AttributeError) as err:
            raise FrameError(f"unreadable message: {err}") from err

    def kill(self) -> None:
        self.child.kill()

    def _ended(self, reason: Failure) -> None:
        self.live = False
        self.pool.ended(self, reason)


def _want(index: Any, key: Any, handles: int) -> tuple[int, bytes]:
    """A front's ``want`` checked: a known handle's index, a key of bounded size."""
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < handles:
        raise ValueError("no such handle")
    if not isinstance(key, str) or len(key) > MAX_WANT_KEY:
        raise ValueError("not a cache key")
    return index, base64.b64decode(key, validate=True)


class FrontPool(service.Service):
    """``count`` front processes serving ``host:port`` next to this one."""

    def __init__(
        self,
        reactor: Any,
        handles: Sequence[Handle],
        metrics: Metrics,
        *,
        count: int,
        host: str,
        port: int,
        backend: str,
        limits: HttpLimits,
        access: AccessLog | None = None,
        hot_cache_entries: int = DEFAULT_ENTRIES,
    ) -> None:
        self.reactor = reactor
        self.hot_cache_entries = hot_cache_entries
        self.handles = list(handles)
        self.metrics = metrics
        self.count_wanted = count
        self.host = host
        self.port = port
        self.backend = backend
        self.limits = limits
        self.access = access or AccessLog()
        self.fronts: dict[int, _Front] = {}
        # A front that keeps failing at start (say, its address is gone) is retried
        # with growing pauses, up to MAX_RESPAWN_DELAY, not once a second forever.
        self._supervisor = Supervisor(
            reactor, self._spawn, count=count, stable_after=STABLE_AFTER,
            backoff=Backoff(first=RESPAWN_DELAY, initial=2 * RESPAWN_DELAY, cap=MAX_RESPAWN_DELAY),
        )  # fmt: skip
        self._stopping = False
        self._feeds = [_Feed(self, i) for i in range(len(self.handles))]
        self.listening: set[int] = set()  # fronts that have bound the port and said so
        # Per handle: key -> the fronts that asked for it and got no answer yet (bounded,
        # oldest forgotten first: a front asks again a second later).
        self._pending: list[dict[bytes, set[int]]] = [{} for _ in self.handles]
        self.holding: dict[int, int] = {}  # responses each front says it holds
        self._watching_certificates = False
        self._all_listened = False

    # --- readiness ---------------------------------------------------------------------

    def listening_now(self, front: _Front) -> None:
        if self.fronts.get(front.number) is front:
            self.listening.add(front.number)
            self._supervisor.ready(front.number)
            if len(self.listening) >= self.count_wanted:
                self._all_listened = True

    def starting(self) -> str | None:
        """Why the service is not ready yet (None once every front has listened).

        Readiness waits for this at start: until then part of the connections the
        kernel hands out would find no front, or go only to the main process.
        """
        if self._all_listened:
            return None
        missing = [n for n in range(1, self.count_wanted + 1) if n not in self.listening]
        return "HTTP front(s) " + ", ".join(map(str, missing)) + " not listening yet"

    def health(self) -> Health:
        """Degraded while a front is being restarted (the others and the main process
        serve its share meanwhile)."""
        missing = [n for n in range(1, self.count_wanted + 1) if n not in self.listening]
        if not missing:
            return READY
        return Health(
            State.DEGRADED, "HTTP front(s) " + ", ".join(map(str, missing)) + " not listening"
        )

    def init_message(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "backend": self.backend,
            "limits": dataclasses.asdict(self.limits),
            "access": self.access.enabled,
            "hot_cache_entries": self.hot_cache_entries,
            "handles": [
                {"name": h.name, "path": h.path, "max_age": h.max_age, "nonce": h.nonce_policy}
                for h in self.handles
            ],
        }

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        for handle, feed in zip(self.handles, self._feeds, strict=True):
            handle.cache.observers.append(feed)
        if not self._watching_certificates:
            self._watching_certificates = True
            for index, handle in enumerate(self.handles):
                handle.on_certificate_change(functools.partial(self._certificate_changed, index))
        self._supervisor.run()

    def _certificate_changed(self, index: int) -> None:
        """A renewed responder certificate: the main cache makes the old responses due for
        refresh (re-signed first); the fronts forget them and ask again."""
        if self.running:
            self.broadcast(encode_frame(("inv", index, None)))

    def _spawn(self, number: int) -> None:
        """The supervisor's: start front ``number``."""
        front = _Front(self, number)
        self.fronts[number] = front
        try:
            front.spawn()
        except Exception:
            del self.fronts[number]
            raise

    def want(self, front: _Front, index: int, key: bytes) -> None:
        """Front ``front`` relayed a request for ``key``: send it the answer if one can be
        served now, else when it is stored. Only dict operations: a front asking for random
        keys (it parses untrusted requests) makes no other work here."""
        cache = self.handles[index].cache
        entry = cache.entry(key)
        if entry is not None and servable(entry[1], self.reactor.seconds()):
            front.send(encode_frame(("put", index, key, entry[0], entry[1])))
            return
        if entry is None and cache.current(key) is not None:
            return  # an answer kept apart (an unknown serial): never given to fronts
        pending = self._pending[index]
        waiting = pending.get(key)
        if waiting is None:
            if len(pending) >= MAX_PENDING:
                del pending[next(iter(pending))]
            waiting = pending[key] = set()
        waiting.add(front.number)

    def stored(self, index: int, key: bytes, serial: int, value: SignedResponse) -> None:
        """A response was stored in handle ``index``'s cache: to the fronts that want it."""
        pending = self._pending[index]
        if key not in pending:
            return
        if not servable(value, self.reactor.seconds()):
            return  # due for refresh already (a renewed certificate): wait for the new one
        frame = encode_frame(("put", index, key, serial, value))
        for number in pending.pop(key):
            front = self.fronts.get(number)
            if front is not None:
                front.send(frame)

    def held(self, number: int, n: Any) -> None:
        """How many responses front ``number`` holds (checked: a non-negative integer)."""
        if isinstance(n, int) and not isinstance(n, bool) and n >= 0:
            self.holding[number] = n
            self.metrics.front_held(number, n)

    def broadcast(self, frame: bytes) -> None:
        for front in self.fronts.values():
            front.send(frame)

    def count(self, number: int, counts: dict[str, dict[str, int]]) -> None:
        """Add a front's answer counts (JSON from a process that reads untrusted input:
        only known handles and methods, only non-negative integers)."""
        by_name = {h.name: h for h in self.handles}
        for name, methods in counts.items():
            handle = by_name.get(name)
            if handle is None or not isinstance(methods, dict):
                continue
            for method, n in methods.items():
                if method not in ("GET", "POST") or not isinstance(n, int) or n < 0:
                    continue
                self.metrics.response(handle.name, "successful", str(method), n)
                self.metrics.front_answered(number, n)
                handle.count_hits(n)

    def refused(self, counts: Any) -> None:
        """Requests a front refused, into ``hsmocsp_bad_requests_total`` (checked: only the
        HTTP refusals a front makes, non-negative integers)."""
        if not isinstance(counts, dict):
            return
        for kind, n in counts.items():
            if kind in ("400", "408", "413", "414", "431") and isinstance(n, int) and n > 0:
                self.metrics.bad_request(kind, n)

    def access_records(self, number: int, items: Any) -> None:
        """A front's access-log records (checked: a front reads untrusted input)."""
        if not isinstance(items, list):
            return
        for item in items[:100_000]:
            record = AccessRecord.from_list(item, f"front {number}")
            if record is not None:
                self.access.write(record)

    def ended(self, front: _Front, reason: Failure) -> None:
        if self.fronts.get(front.number) is front:
            del self.fronts[front.number]
            self.listening.discard(front.number)
            self.holding.pop(front.number, None)
        if self._stopping:
            return
        self._supervisor.ended(front.number)
        delay = self._supervisor.backoff.delay(self._supervisor.failures)
        log.warn("HTTP front {n} (pid {pid}) exited ({why}); starting it again in {s:g} s",
                 n=front.number, pid=front.pid, why=reason.getErrorMessage(),
                 s=delay)  # fmt: skip

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stopping = True
        for handle, feed in zip(self.handles, self._feeds, strict=True):
            if feed in handle.cache.observers:
                handle.cache.observers.remove(feed)
        self._supervisor.stop()
        fronts = list(self.fronts.values())
        for front in fronts:
            front.live = False
        return stop_children(self.reactor, [f.child for f in fronts], STOP_GRACE)
