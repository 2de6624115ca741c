"""The main process's side of ``--workers N``: start, feed and watch the fronts.

See :mod:`hsmocsp.web.front` for what a front does. Here: each front is a
child process (``python -m hsmocsp.web.front``) given, on its stdin, an init
message (where to listen, where the main process's private socket is, the
handles) and then every change of every handle's cache, starting with a
snapshot of what the caches hold. A front that exits is started again after
a second (growing to 30 s while it keeps failing); stopping closes their pipes
(they exit) and kills any still there after a grace period. The processes,
pipes, framing and restarts are the child-process layer's
(:mod:`hsmocsp.childproc`). Their answer counts come back once a second and are
added to the main process's metrics, so ``/metrics`` covers every process.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.internet.task import cooperate
from twisted.logger import Logger
from twisted.python.failure import Failure

from hsmocsp.childenv import minimal_env
from hsmocsp.childproc import Backoff, Child, FrameError, Supervisor, stop_children
from hsmocsp.health import READY, Health, State
from hsmocsp.responder import Handle, SignedResponse
from hsmocsp.web.accesslog import AccessLog, AccessRecord
from hsmocsp.web.front import MAX_FRAME, decode_report, encode_frame
from hsmocsp.web.limits import HttpLimits
from hsmocsp.web.metrics import Metrics

log = Logger()

RESPAWN_DELAY = 1.0
MAX_RESPAWN_DELAY = 30.0
STABLE_AFTER = 10.0  # a front that ran this long gets the short delay again
STOP_GRACE = 5.0
SNAPSHOT_CHUNK = 500


class _Feed:
    """A :class:`~hsmocsp.cache.CacheObserver` for one handle: tells every front."""

    def __init__(self, pool: FrontPool, index: int) -> None:
        self._pool = pool
        self._index = index

    def stored(self, key: bytes, serial: int, value: SignedResponse) -> None:
        self._pool.broadcast(encode_frame(("put", self._index, key, serial, value)))

    def dropped(self, key: bytes) -> None:
        self._pool.broadcast(encode_frame(("drop", self._index, key)))

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
        self.child.spawn(self.pool.reactor, [sys.executable, "-m", "hsmocsp.web.front"],
                         minimal_env())  # a front reads untrusted input: none of our secrets
        self.pid = self.child.pid
        self.child.write(encode_frame(("init", self.pool.init_message())))
        self.live = True
        self.pool.send_snapshot(self)

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
    ) -> None:
        self.reactor = reactor
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
        self._supervisor.run()

    def _spawn(self, number: int) -> None:
        """The supervisor's: start front ``number``."""
        front = _Front(self, number)
        self.fronts[number] = front
        try:
            front.spawn()
        except Exception:
            del self.fronts[number]
            raise

    def send_snapshot(self, front: _Front) -> None:
        """Every cached response to a new front, a chunk per reactor turn.

        An entry is sent only if it is still the cache's current value when
        its chunk goes out: one replaced or invalidated meanwhile has already
        reached the front as a later message and must not be overwritten.
        """

        def chunks() -> Any:
            for index, handle in enumerate(self.handles):
                items = handle.cache.items()
                for start in range(0, len(items), SNAPSHOT_CHUNK):
                    if not front.live:
                        return
                    frames = [
                        encode_frame(("put", index, key, serial, value))
                        for key, serial, value in items[start : start + SNAPSHOT_CHUNK]
                        if handle.cache.current(key) is value
                    ]
                    front.send(b"".join(frames))
                    yield None

        cooperate(chunks())

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
                handle.cache.stats.hits += n

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
