"""A pool of signing worker processes, each holding one logged-in PKCS#11 session.

Why processes (measured, see docs/design-signing.md): PyKCS11 holds the GIL for
the whole of C_Sign, so a signing thread freezes the reactor, and two threads
sign no faster than one. Worker processes sign in parallel and the reactor only
ever waits on a pipe.

The bridge is Twisted's own ``spawnProcess`` with length-prefixed JSON frames
(:mod:`hsmocsp.signing.wire`), not ``ProcessPoolExecutor``: the pool has to know
which worker holds which request, so that a dead worker fails exactly its own
request, a hung one can be killed alone, and one crash never breaks the pool.

Policy, all in this file:

* dispatch: a worker runs one request at a time, and holds at most ``pipeline``
  (default 2) in its pipe, so it never idles waiting for the reactor to hand it
  the next one (measured: a ping-pong worker reached 0.68x the raw HSM rate).
  A request sent but not yet started counts as waiting; waiting requests are at
  most ``max_queue``; beyond that ``sign`` fails at once with SignerUnavailable
  (load shedding -> tryLater).
* timeout: a caller waits at most ``timeout`` seconds, queue time included; a
  worker busy on one request for longer than ``timeout`` is killed (hung HSM).
  One pool-wide timer, set for the earliest deadline, enforces both: per-request
  timers cost the reactor two heap insertions and cancellations per signature.
* restart: a worker that exits (crash, kill -9, fatal session error) fails the
  request it was running with SignerUnavailable, hands the ones it had not
  started back to the queue (signing has no side effects), and is replaced, at once the first
  time, then with exponential back-off while replacements keep failing. While no
  worker is up or starting, or none is up and a replacement already failed to
  start (the token is away), requests fail fast instead of queueing.
* secrets: the PIN travels in the first frame on the worker's stdin, never in
  argv, the environment, logs or exception messages.
"""

from __future__ import annotations

import collections
import itertools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from hsmocsp.childenv import python_env
from hsmocsp.childproc import Backoff, Child, Supervisor, stop_children
from hsmocsp.errors import PinRefused, SignerError, SignerUnavailable
from hsmocsp.health import READY, Health, State
from hsmocsp.signing import wire

if TYPE_CHECKING:
    from hsmocsp.config import TokenConfig

log = Logger()


@dataclass(frozen=True)
class KeyRef:
    """Names a key on the token by CKA_LABEL, CKA_ID or both."""

    label: str | None = None
    key_id: bytes | None = None

    def __post_init__(self) -> None:
        if self.label is None and self.key_id is None:
            raise ValueError("KeyRef needs a label or a key_id")

    def __str__(self) -> str:
        parts = []
        if self.label is not None:
            parts.append(f"label={self.label!r}")
        if self.key_id is not None:
            parts.append(f"id={self.key_id.hex()}")
        return " ".join(parts)


class _Request:
    __slots__ = ("deferred", "expires", "frame", "id", "key", "pool", "retried", "worker")

    def __init__(
        self, pool: TokenPool, request_id: int, frame: bytes, expires: float, key: KeyRef | None
    ) -> None:
        self.frame = frame  # the encoded frame to send
        self.id = request_id
        self.deferred: Deferred[bytes] = Deferred(self._cancel)
        self.pool = pool
        self.worker: _Worker | None = None
        self.expires = expires  # reactor.seconds() after which the caller gives up
        self.key = key  # the key it uses, if any
        # Signing is idempotent: a request whose worker died under it is sent once
        # more, to another worker, before the caller hears tryLater.
        self.retried = False

    @property
    def done(self) -> bool:
        return self.deferred.called

    def _cancel(self, _: Deferred[bytes]) -> None:
        # The HTTP client went away. A queued request leaves the queue; a sent
        # one is abandoned and its reply dropped when it comes.
        self.pool._forget(self)

    def finish(self, result: bytes | Exception) -> None:
        if not self.deferred.called:
            if isinstance(result, Exception):
                self.deferred.errback(result)
            else:
                self.deferred.callback(result)


class _Worker:
    """The parent's view of one worker process."""

    def __init__(self, pool: TokenPool, number: int) -> None:
        self.pool = pool
        self.number = number
        self.state = "starting"  # -> ready -> (stopping) -> dead
        self.child: Child | None = None
        self.pid: int | None = None
        # Sent, unanswered requests in order; the first is the one running.
        self.requests: collections.deque[_Request] = collections.deque()
        self.busy_since = 0.0  # when requests[0] started
        self.retiring = False  # said it will exit (fatal error): send it nothing more
        self.hang_timer: IDelayedCall | None = None  # start-up only
        self.ready: Deferred[None] = Deferred()
        self.init_failure: str | None = None
        self.init_kind = ""  # the init reply's kind when it failed ("pin", "error", ...)

    @property
    def killing(self) -> bool:
        """SIGKILL sent: send it nothing more, read nothing more."""
        return self.child is not None and self.child.killed

    def spawn(self, init: dict[str, Any]) -> None:
        """Start the process and send it ``init`` (raises OSError if it cannot start)."""
        # The vendor module may be configured by any variable: all of ours but the PIN's.
        env = python_env({k: v for k, v in os.environ.items() if k not in self.pool.env_drop})
        child = Child("signing worker", on_frame=self._frame, on_end=self.ended,
                      max_frame=wire.MAX_FRAME)  # fmt: skip
        child.spawn(self.pool._reactor, [sys.executable, "-m", "hsmocsp.signing.worker"], env)
        self.child = child
        self.pid = child.pid
        child.name = f"signing worker {self.pid}"
        child.write(wire.encode(init))
        self.hang_timer = self.pool._reactor.callLater(self.pool.start_timeout, self._init_hung)

    def _init_hung(self) -> None:
        self.hang_timer = None
        self.init_failure = f"worker did not log in within {self.pool.start_timeout:g} s"
        log.error("signing worker {pid}: {problem}; killing it", pid=self.pid,
                  problem=self.init_failure)
        self.kill()

    def send(self, request: _Request, now: float) -> None:
        assert self.child is not None
        if not self.requests:
            self.busy_since = now
        self.requests.append(request)
        request.worker = self
        self.child.write(request.frame)

    def hung(self) -> None:
        """Busy on one request for longer than the timeout (the pool's sweep decides)."""
        if self.killing:
            return
        log.error("signing worker {pid} busy for more than {timeout} s; killing it",
                  pid=self.pid, timeout=self.pool.timeout)
        self.kill()

    def kill(self) -> None:
        if self.child is not None:
            self.child.kill()

    def _cancel_timer(self) -> None:
        if self.hang_timer is not None and self.hang_timer.active():
            self.hang_timer.cancel()
        self.hang_timer = None

    def _frame(self, body: bytes) -> None:
        self.received(wire.decode_body(body))  # a FrameError gets the worker killed

    def received(self, message: wire.Frame) -> None:
        if self.killing:
            return  # ended() settles what it holds
        if self.state == "starting":
            self._cancel_timer()
            if isinstance(message, dict) and message.get("ok") is True:
                self.state = "ready"
                self.ready.callback(None)
                self.pool._worker_ready(self)
            else:
                self.init_failure = (
                    str(message.get("message", "worker init failed"))
                    if isinstance(message, dict) else "worker sent a bad init reply"
                )
                self.init_kind = str(message.get("kind", "")) if isinstance(message, dict) else ""
            return
        request_id = message.get("id") if isinstance(message, dict) else message.id
        if not self.requests or request_id != self.requests[0].id:
            log.error("signing worker {pid} answered a request it was not given; killing it",
                      pid=self.pid)
            self.kill()  # ended() fails what it holds
            return
        request = self.requests.popleft()
        request.worker = None
        if self.requests:
            self.busy_since = self.pool._reactor.seconds()
        if isinstance(message, wire.Result):
            self.pool._succeeded(request)
            request.finish(message.result)
        elif isinstance(message, wire.SignRequest):
            request.finish(SignerError("bad reply from signing worker: a request"))
        elif message.get("ok") is True:
            try:
                result = wire.unb64(message.get("result_b64", ""))
            except wire.FrameError as err:
                request.finish(SignerError(f"bad reply from signing worker: {err}"))
            else:
                self.pool._succeeded(request)
                request.finish(result)
        else:
            text = str(message.get("message", "signing failed"))
            kind = message.get("kind")
            if message.get("fatal") is True:
                # The worker exits after this reply: its session, token or key is gone.
                self.retiring = True
                self.pool._worker_retiring(self, text)
                if self.pool._retry(request):
                    return
            exc: Exception
            if kind == "error":
                exc = SignerError(text)
            elif kind == "missing":
                exc = self.pool._key_missing(request, text)
            else:
                exc = SignerUnavailable(text)
            request.finish(exc)
        self.pool._worker_idle(self)

    def ended(self, reason: Failure) -> None:
        self._cancel_timer()
        was = self.state
        self.state = "dead"
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        how = f"signal {sig}" if sig else f"exit code {code}"
        # The one it was running fails; those it had not started go back to the
        # queue, before the pool decides whether anybody can serve the queue.
        running = self.requests.popleft() if self.requests else None
        unstarted = list(self.requests)
        self.requests.clear()
        for request in unstarted:
            request.worker = None
        if running is not None:
            running.worker = None
            if self.pool._retry(running, requeue=False):
                unstarted.insert(0, running)
                running = None
        self.pool._requeue(unstarted)
        # The pool first (it starts a replacement), then the callers: a caller
        # whose errback sends a new request must find a worker starting.
        self.pool._worker_ended(self, was, how)
        if was == "starting":
            problem = self.init_failure or f"worker exited during start-up ({how})"
            self.ready.errback(
                PinRefused(problem) if self.init_kind == "pin" else SignerError(problem)
            )
        if running is not None:
            running.finish(SignerUnavailable(f"signing worker {self.pid} died ({how})"))


class TokenPool:
    """Worker processes signing with keys on one PKCS#11 token.

    One pool per token; several :class:`~hsmocsp.signing.pkcs11.Pkcs11Signer`
    may share it. ``start``/``stop`` belong to whoever built the pool (the
    service tree), not to the signers.
    """

    def __init__(
        self,
        config: TokenConfig,
        pin: str,
        *,
        reactor: Any,
        start_timeout: float = 30.0,
        max_restart_delay: float = 4.0,
        probe_interval: float = 2.0,
    ) -> None:
        """``config`` was validated when it was read (label or slot, counts at least 1):
        it is not checked again here. ``pin`` is the secret ``config.pin`` names, read
        by the caller (a missing one is a configuration error there, not a pool error).
        The three timings are not configuration keys: tests shorten them."""
        self.config = config
        self._reactor = reactor
        self.module = str(config.module)
        self.token_label = config.token_label
        self.slot = config.slot
        self._pin = pin
        self.workers = config.workers
        self.max_queue = config.max_queue
        self.timeout = config.sign_timeout
        self.start_timeout = start_timeout
        self.max_restart_delay = max_restart_delay
        # Environment variables the workers must not inherit (the one the PIN was
        # read from), since /proc/<pid>/environ outlives reading it.
        self.env_drop: tuple[str, ...] = (config.pin.env,) if config.pin.env else ()
        self.pipeline = config.pipeline
        self._live: list[_Worker] = []
        self._queue: collections.deque[_Request] = collections.deque()
        self._ids = itertools.count(1)
        self._running = False
        self._starting = False
        # Which worker to (re)start when: the child-process layer's. A replacement
        # for a worker that was up starts at once; one that fails to start is
        # retried after 0.1 s doubling up to max_restart_delay; one at a time.
        self._supervisor = Supervisor(
            reactor, self._spawn_worker, count=self.workers,
            backoff=Backoff(first=0.0, initial=0.1, cap=max_restart_delay), serial=True,
        )  # fmt: skip
        self._spawned: _Worker | None = None
        self._sweep: IDelayedCall | None = None  # the one timeout timer
        self._sweep_at = 0.0
        self._key_parts: dict[tuple[KeyRef, str], bytes] = {}
        # Health: what the pool says about itself, and what it last logged.
        self.probe_interval = probe_interval
        self._probe: IDelayedCall | None = None
        self._last_ok = 0.0  # reactor.seconds() of the last successful reply
        self._problem = ""  # the last thing that went wrong, for health reasons
        self._pin_refused: str | None = None  # set by a PIN refusal, cleared by reload_pin
        self._failed_starts = 0  # workers that ended while starting, since the last login
        self._known_keys: set[KeyRef] = set()  # keys a worker has signed with or read
        self._missing: dict[KeyRef, str] = {}  # known keys a worker found missing since
        self._health = Health(State.FAILED, f"signing pool for {self._where} is not running")
        self._logged: tuple[State, bool] = (State.READY, False)

    def __repr__(self) -> str:
        # Never the PIN.
        return f"<TokenPool {self._where} workers={self.workers}>"

    @property
    def _where(self) -> str:
        return wire.token_location(self.module, self.token_label, self.slot)

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Spawn the workers; fires when every one is logged in.

        Workers start one after the other: a login writes token state (SoftHSM
        rewrites its token.object; Nitrokey-class tokens spend flash cycles), and
        a process initialising the module while another logs in was seen here to
        miss the token altogether. Fails with SignerError (module missing, token
        missing, wrong PIN...) after stopping any worker that did start.
        """
        if self._running:
            return defer.succeed(None)
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        self._running = True
        self._starting = True
        try:
            for number in range(1, self.workers + 1):
                try:
                    self._supervisor.start_one(number)
                    assert self._spawned is not None
                    await self._spawned.ready
                except Exception as err:
                    message = str(err) if isinstance(err, SignerError) else repr(err)
                    if self._where not in message:
                        message = f"{self._where}: {message}"
                    self._starting = False
                    await self.stop()
                    # One login only: the caller must not try this PIN again.
                    raise (PinRefused if isinstance(err, PinRefused) else SignerError)(
                        message
                    ) from None
        finally:
            self._starting = False
        log.info("signing pool up: {n} workers on {where}", n=self.workers, where=self._where)
        self._last_ok = self._reactor.seconds()
        self._health = READY
        self._logged = (State.READY, False)
        self._supervisor.run()  # replaces any that died during start-up
        self._update_health()
        self._arm_probe()

    def stop(self) -> Deferred[None]:
        """Fail queued requests, let in-flight ones finish, end every worker.

        A worker still running ``timeout`` seconds after being asked to exit is
        killed, so stop always completes.
        """
        self._running = False
        self._supervisor.stop()
        if self._probe is not None and self._probe.active():
            self._probe.cancel()
        self._probe = None
        self._health = Health(State.FAILED, f"signing pool for {self._where} is not running")
        while self._queue:
            self._queue.popleft().finish(SignerUnavailable("signing pool stopping"))
        children = [w.child for w in self._live if w.child is not None]

        def done(_: object) -> None:
            if self._sweep is not None and self._sweep.active() and not self._running:
                self._sweep.cancel()
            self._sweep = None

        # EOF on stdin: each worker exits once its current request is answered.
        return stop_children(self._reactor, children, self.timeout).addCallback(done)

    # --- operations ---------------------------------------------------------------------

    def sign(self, key: KeyRef, mechanism: str, data: bytes) -> Deferred[bytes]:
        """The raw PKCS#11 signature of ``data`` (ECDSA: r || s)."""
        part = self._key_parts.get((key, mechanism))
        if part is None:
            try:
                part = wire.sign_key_part(mechanism, key.label, key.key_id)
            except (KeyError, wire.FrameError):
                # Not a binary-coded mechanism: JSON, and the worker refuses it.
                return self._submit(lambda request_id: wire.encode({
                    "op": "sign", "id": request_id, **_key_fields(key),
                    "mechanism": mechanism, "data_b64": wire.b64(data)}), key)
            self._key_parts[(key, mechanism)] = part
        key_part = part
        return self._submit(lambda request_id: wire.encode_sign(request_id, key_part, data), key)

    def public_key(self, key: KeyRef) -> Deferred[bytes]:
        """SubjectPublicKeyInfo DER of ``key``'s public half."""
        return self._submit(lambda request_id: wire.encode(
            {"op": "public_key", "id": request_id, **_key_fields(key)}), key)

    def check(self) -> Deferred[None]:
        """Fires when a worker has answered a session round trip through the queue."""
        d = self._submit(lambda request_id: wire.encode({"op": "check", "id": request_id}))
        result: Deferred[None] = d.addCallback(lambda _: None)
        return result

    def busy(self) -> int:
        """Workers currently running a request."""
        return sum(1 for w in self._live if w.requests)

    def busy_pids(self) -> list[int]:
        """Process ids of the workers running a request (tests, diagnostics)."""
        return [w.pid for w in self._live if w.requests and w.pid is not None]

    def health(self) -> Health:
        """READY with every worker logged in; DEGRADED while some are (or while the
        first replacement after a crash is starting); FAILED when none is and
        replacements keep failing (token gone), or the PIN was refused.

        The state changes as workers end and start, not when a probe asks; each
        change is logged once (see :meth:`_update_health`).
        """
        return self._health

    def restart_pending(self) -> bool:
        """Whether more logins will be tried without anyone asking: a worker is
        starting, or a replacement is scheduled (back-off pause). False once every
        worker is up, and after a refused PIN (nothing is tried until SIGHUP brings
        a different one): what ``hsmocsp_token_restart_pending`` shows, so a test or
        an operator can tell "given up, waiting for you" from "still retrying"."""
        return self._supervisor.starting() or self._supervisor.waiting()

    def reload_pin(self, pin: str) -> None:
        """A PIN read again from its source (SIGHUP).

        Logged-in workers keep their sessions. If the token had refused the PIN,
        workers start again only when this PIN differs from the refused one: the
        same PIN is never tried twice.
        """
        if self._pin_refused is not None and pin == self._pin:
            log.warn("signing on {where}: the PIN source still gives the refused PIN;"
                     " not trying it again", where=self._where)
            return
        self._pin = pin
        if self._pin_refused is not None:
            log.info("signing on {where}: new PIN read; starting workers", where=self._where)
            self._pin_refused = None
            self._supervisor.release()
            self._update_health()

    def queue_depth(self) -> int:
        """Requests waiting for a worker: queued, or sent to one but not yet started."""
        return len(self._queue) + sum(
            1 for w in self._live for r in itertools.islice(w.requests, 1, None) if not r.done
        )

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (tests, diagnostics)."""
        return [w.pid for w in self._live if w.pid is not None and w.state != "dead"]

    # --- internals ----------------------------------------------------------------------

    def _spawn_worker(self, number: int) -> None:
        """The supervisor's: start worker ``number`` (raises if no process can start)."""
        worker = _Worker(self, number)
        init = {"op": "init", "module": self.module, "token_label": self.token_label,
                "slot": self.slot, "pin": self._pin}
        try:
            worker.spawn(init)
        except Exception as err:  # e.g. fork failed: out of processes or memory
            self._problem = f"cannot start a signing worker: {err}"
            raise SignerError(f"{self._where}: {self._problem}") from err
        self._live.append(worker)
        self._spawned = worker
        if not self._starting:
            # A replacement's start-up failure shows in health(); nobody awaits it.
            worker.ready.addErrback(lambda _: None)

    def _submit(self, encode: Callable[[int], bytes], key: KeyRef | None = None) -> Deferred[Any]:
        if not self._running:
            return defer.fail(SignerUnavailable(f"signing pool for {self._where} is not running"))
        if not any(w.state in ("starting", "ready") and not w.retiring for w in self._live):
            return defer.fail(SignerUnavailable(self._nobody_up()))
        if self._failed_starts and not self._starting and not self._ready_count():
            # A replacement already failed to start (the token is away): the one starting
            # now will most likely fail too, and a start takes seconds on a loaded box.
            # tryLater at once rather than a wait for a start nobody can promise. (After
            # workers that were up ended, the first replacements are awaited: they start
            # at once and usually log in.)
            return defer.fail(SignerUnavailable(self._nobody_up()))
        if self._idle_worker() is None and self.queue_depth() >= self.max_queue:
            return defer.fail(SignerUnavailable(
                f"signing queue full ({self.max_queue} waiting) for {self._where}"))
        request_id = next(self._ids) & 0xFFFFFFFF  # the binary frame's id is 32 bits
        try:
            frame = encode(request_id)
        except wire.FrameError as err:
            return defer.fail(SignerError(f"cannot send to signing worker: {err}"))
        now = self._reactor.seconds()
        request = _Request(self, request_id, frame, now + self.timeout, key)
        self._queue.append(request)
        self._dispatch(now)
        self._arm(request.expires, now)
        return request.deferred

    def _ready_count(self) -> int:
        """Workers that can take a request now."""
        return sum(
            1 for w in self._live if w.state == "ready" and not w.killing and not w.retiring
        )

    def _idle_worker(self) -> _Worker | None:
        """A ready worker running nothing."""
        for worker in self._live:
            if (worker.state == "ready" and not worker.requests and not worker.killing
                    and not worker.retiring):
                return worker
        return None

    def _free_worker(self) -> _Worker | None:
        """The ready worker with the fewest requests in its pipe, if it has room."""
        best = None
        for worker in self._live:
            if worker.state != "ready" or worker.killing or worker.retiring:
                continue
            if best is None or len(worker.requests) < len(best.requests):
                best = worker
        if best is None or len(best.requests) >= self.pipeline:
            return None
        return best

    def _dispatch(self, now: float | None = None) -> None:
        while self._queue:
            worker = self._free_worker()
            if worker is None:
                return
            request = self._queue.popleft()
            if request.done:
                continue
            if now is None:
                now = self._reactor.seconds()
            worker.send(request, now)

    def _arm(self, when: float, now: float) -> None:
        """Make sure the sweep runs by ``when``."""
        if self._sweep is not None and self._sweep.active():
            if self._sweep_at <= when:
                return
            self._sweep.cancel()
        self._sweep_at = when
        self._sweep = self._reactor.callLater(max(0.0, when - now), self._sweep_now)

    def _sweep_now(self) -> None:
        """Fail requests past their deadline, kill workers stuck on one request past
        the timeout, and set the timer for the next deadline."""
        self._sweep = None
        now = self._reactor.seconds()
        upcoming = []
        for worker in list(self._live):
            for index, request in enumerate(list(worker.requests)):
                if request.done:
                    continue
                if request.expires <= now:
                    where = "in the HSM" if index == 0 else "waiting for a worker"
                    self._timed_out(request, where)
                else:
                    upcoming.append(request.expires)
            if worker.requests and worker.state != "dead":
                stuck_at = worker.busy_since + self.timeout
                if stuck_at <= now:
                    worker.hung()
                elif not worker.killing:
                    upcoming.append(stuck_at)
        for request in list(self._queue):
            if request.done:
                continue
            if request.expires <= now:
                self._forget(request)
                self._timed_out(request, "waiting for a worker")
            else:
                upcoming.append(request.expires)
        if upcoming:
            self._arm(min(upcoming), now)

    def _timed_out(self, request: _Request, where: str) -> None:
        request.finish(SignerUnavailable(
            f"signing timed out after {self.timeout:g} s {where} ({self._where})"))

    def _forget(self, request: _Request) -> None:
        if request.worker is None:
            try:
                self._queue.remove(request)
            except ValueError:
                pass

    def _requeue(self, requests: list[_Request]) -> None:
        """Requests a dead worker had not started: to the front of the queue, in order."""
        for request in reversed(requests):
            if request.done:
                continue
            if self._running:
                self._queue.appendleft(request)
            else:
                request.finish(SignerUnavailable("signing pool stopping"))

    def _worker_ready(self, worker: _Worker) -> None:
        self._problem = ""  # a login worked: what failed before is history
        self._failed_starts = 0
        self._last_ok = self._reactor.seconds()
        self._dispatch()
        self._supervisor.ready(worker.number)  # resets the back-off; starts the next
        self._update_health()

    def _worker_idle(self, worker: _Worker) -> None:
        self._dispatch()

    def _worker_retiring(self, worker: _Worker, problem: str) -> None:
        """A worker replied with a fatal error and is about to exit."""
        self._problem = problem

    def _worker_ended(self, worker: _Worker, was: str, how: str) -> None:
        if worker in self._live:
            self._live.remove(worker)
        if not self._running:
            self._supervisor.ended(worker.number)
            return
        # No line per worker: what operators read is the one line per change of
        # health that _update_health writes (one per episode, not per restart),
        # which quotes the latest problem.
        if was == "starting":
            self._failed_starts += 1
            problem = worker.init_failure or f"worker exited during start-up ({how})"
            self._problem = problem
            if worker.init_kind == "pin" and not self._starting:
                self._pin_refused = problem
                self._supervisor.hold(problem)  # never the same PIN twice
        elif not worker.retiring:
            self._problem = f"signing worker {worker.pid} ended ({how})"
        self._supervisor.ended(worker.number)  # a replacement now or after a pause
        if not any(w.state in ("starting", "ready") and not w.retiring for w in self._live):
            # Nobody can serve the queue now; fail it rather than let it time out.
            while self._queue:
                self._queue.popleft().finish(SignerUnavailable(self._nobody_up()))
        self._update_health()

    def _nobody_up(self) -> str:
        reason = self._pin_refused or self._problem
        return f"no signing worker up for {self._where}" + (f": {reason}" if reason else "")

    def _succeeded(self, request: _Request) -> None:
        self._last_ok = self._reactor.seconds()
        if request.key is not None:
            self._known_keys.add(request.key)
            if self._missing.pop(request.key, None) is not None:
                self._update_health()

    def _key_missing(self, request: _Request, text: str) -> Exception:
        """A worker did not find the key: a configuration error, unless the key was
        there before (then the token's storage is changing under us: tryLater)."""
        if request.key is None or request.key not in self._known_keys:
            return SignerError(text)
        self._missing[request.key] = text
        self._update_health()
        return SignerUnavailable(text)

    def _retry(self, request: _Request, requeue: bool = True) -> bool:
        """Give a request whose worker died (or gave up its session) one more try on
        another worker; False when it already had one, or cannot have one."""
        if request.done or request.retried or not self._running:
            return False
        request.retried = True
        if requeue:
            self._queue.appendleft(request)
            self._dispatch()
        return True

    def _update_health(self) -> None:
        """Recompute :meth:`health`; log a line when its state changes (one per change)."""
        if not self._running:
            return
        ready = self._ready_count()
        starting = any(w.state == "starting" for w in self._live)
        # Reasons start with the token: a handle's health quotes them as they are.
        up = f"{self._where}: {ready} of {self.workers} signing workers up"
        if self._pin_refused is not None:
            reason = f"{up}; {self._pin_refused}; fix the PIN source, then send SIGHUP"
            health = Health(State.DEGRADED if ready else State.FAILED, reason)
        elif ready == 0:
            health = Health(
                State.DEGRADED if starting and self._supervisor.failures <= 1 else State.FAILED,
                f"{up}" + (f"; {self._problem}" if self._problem else ""),
            )
        elif self._missing:
            health = Health(State.DEGRADED, f"{up}; " + "; ".join(self._missing.values()))
        elif ready < self.workers:
            health = Health(State.DEGRADED, up + (f"; {self._problem}" if self._problem else ""))
        else:
            health = READY
        self._health = health
        if self._starting:
            return
        key = (health.state, self._pin_refused is not None)
        if key == self._logged:
            return
        self._logged = key
        if self._pin_refused is not None:
            log.critical("signing {state}: {reason}", state=health.state.label,
                         reason=health.reason)
        elif health.state is State.READY:
            self._problem = ""
            log.info("signing ready: {where}: {n} workers up", where=self._where,
                     n=self.workers)
        elif health.state is State.DEGRADED:
            log.warn("signing degraded: {reason}", reason=health.reason)
        else:
            log.error("signing failed: {reason}", reason=health.reason)

    def _arm_probe(self) -> None:
        if self.probe_interval > 0 and self._running:
            self._probe = self._reactor.callLater(self.probe_interval, self._probe_now)

    def _probe_now(self) -> None:
        """While nothing is signed, ask an idle worker to check its session and keys,
        so a token that vanished from an idle pool shows in :meth:`health` too."""
        self._probe = None
        if not self._running:
            return
        idle = self._reactor.seconds() - self._last_ok >= self.probe_interval * 0.9
        if idle and not self._queue and self._idle_worker() is not None:
            self.check().addErrback(lambda _: None)  # a failure ends the worker: see health
        self._arm_probe()


def _key_fields(key: KeyRef) -> dict[str, Any]:
    fields: dict[str, Any] = {"label": key.label}
    if key.key_id is not None:
        fields["key_id_b64"] = wire.b64(key.key_id)
    return fields


__all__ = ["KeyRef", "TokenPool"]
