"""Pre-signing: a fresh signed response ready for every known serial, signed in order of need.

A Nitrokey-class token signs a handful of responses per second, one at a time; a
CA with 100,000 certificates needs hours for one pass over it. So the token's time
goes where it matters, in this order:

1. a live miss (a client waiting): pre-signing starts a signature only while no
   request waits for the signer (``signer_backlog``), and keeps at most
   ``concurrency`` of its own in flight, so a live request waits behind at most that
   many;
2. entries put first by :meth:`Presigner.refresh_first` (responses made with a
   renewed responder certificate: on the handle's :meth:`~Handle.on_certificate_change`
   after a SIGHUP, and at start for rows restored from the store) and serials whose
   status just changed;
3. responses clients asked for, then those nobody asked for;
4. within each class, the entry whose refresh point came first (a serial with no
   response counts as one that expired when it was found: clients miss on it now).
   When the token cannot keep up, the oldest response is renewed first, so what is
   served stays valid as long as possible; the cache never serves an expired one.

The schedule is one heap per class keyed by each entry's refresh point: an entry is
signed again when its refresh point comes, not by periodic sweeps over everything,
so the token's work stays spread the way the first signatures were.

The pre-signer also says whether the token can carry the handle: after the first
scan of the source (start-up) and after each reload it logs one capacity line
(signatures per second needed to re-sign every known response at its refresh
point, against the rate the token was measured to deliver to pre-signing, and
which validity would fit if it does not), reports it in :meth:`health`, and
logs progress: a line when there is work, one a minute with rate and ETA, one at
the end.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from hsmocsp.errors import HsmOcspError
from hsmocsp.handle import Handle, SignedResponse
from hsmocsp.health import READY, Health, State
from hsmocsp.ocsp import der as _der
from hsmocsp.ocsp.request import CertID, cert_id_der, make_cert_id, parse_request
from hsmocsp.ocsp.response import issuer_hashes

log = Logger()

#: Schedule classes, best first.
URGENT, ASKED, OTHER = 0, 1, 2

#: Reactor time spent per tick walking the source's serials (start-up, reload):
#: a 100,000-serial index is scanned in a few seconds without a visible pause.
SCAN_BUDGET = 0.004
#: Signatures whose spacing measures the token's rate (a sliding window).
RATE_WINDOW = 64
#: Spacings needed before the rate counts as measured.
RATE_MIN_SAMPLES = 5
#: The most waiting entries counted outside a run of work (see Presigner.due).
COUNT_CAP = 10_000
#: Longest pause after consecutive failed signatures (token or source down).
MAX_PAUSE = 60.0


@dataclass(slots=True)
class _Entry:
    """One response the pre-signer keeps fresh (one CertID: issuer, serial, hash)."""

    serial: int
    issuer: x509.Certificate
    alg: str
    cid: CertID | None = None  # as a client sent it (adopted keys); else built when signing
    tier: int = OTHER
    due: float = 0.0
    seq: int = 0  # the heap item with this seq is the live one; older ones are skipped
    asked: bool = False
    scan: int = 0  # the last scan of the source that listed this serial (0: never)
    expires: float | None = None  # nextUpdate of the newest stored response
    replace: SignedResponse | None = None  # refresh_first: the response to replace


@dataclass(frozen=True)
class Capacity:
    """Whether the token can keep every known response fresh."""

    responses: int
    validity: float
    refresh_fraction: float
    measured: float | None  # signatures/s the token delivered to pre-signing

    @property
    def period(self) -> float:
        """Seconds between two signatures of one response (its refresh point)."""
        return self.validity * self.refresh_fraction

    @property
    def needed(self) -> float:
        return self.responses / self.period

    @property
    def fits(self) -> bool:
        return self.measured is None or self.measured >= self.needed

    @property
    def fitting_validity(self) -> float | None:
        """The shortest validity this token could keep fresh (same refresh point)."""
        if not self.measured:
            return None
        return self.responses / (self.measured * self.refresh_fraction)

    def describe(self) -> str:
        head = (
            f"{self.responses} responses re-signed every {self.period:g} s (validity "
            f"{self.validity:g} s, refresh at {self.refresh_fraction:g}): "
            f"{_rate(self.needed)} sig/s needed"
        )
        if self.measured is None:
            return head + "; the token's rate is not measured yet (nothing signed so far)"
        head += f", the token delivers {_rate(self.measured)} sig/s to pre-signing"
        sweep = _duration(self.responses / self.measured)
        if self.fits:
            spare = self.measured / self.needed if self.needed else float("inf")
            return f"{head}: fits ({spare:.1f}x the need; a full pass takes {sweep})"
        return (
            f"{head}: does not fit; a validity of {self.fitting_validity:.0f} s would "
            f"(or fewer serials, or a faster token); a full pass takes {sweep}"
        )


@dataclass
class _Run:
    """A stretch of pre-signing work, for the progress lines."""

    reason: str
    started_at: float
    signed_at_start: int
    announced: bool = False
    last_report_at: float = 0.0
    last_report_signed: int = 0
    total: int = 0  # responses to sign, as estimated when the run was announced


class Presigner:
    """Keeps a handle's cache filled, and fresh, for every serial its source knows."""

    def __init__(
        self,
        handle: Handle,
        *,
        clock: Any,
        rate: float = 50.0,
        concurrency: int = 1,
        hashes: Iterable[str] = ("sha1",),
        signer_backlog: Callable[[], int] = lambda: 0,
        progress_interval: float = 60.0,
    ) -> None:
        self.handle = handle
        self.rate = rate
        self.concurrency = concurrency
        self.hashes = tuple(hashes)
        self.progress_interval = progress_interval
        self._clock = clock
        self._backlog = signer_backlog
        self._entries: dict[bytes, _Entry] = {}
        self._heaps: tuple[list[tuple[float, int, bytes]], ...] = ([], [], [])
        self._seq = itertools.count(1)
        self._expiry: list[tuple[float, bytes]] = []
        self._expired: set[bytes] = set()
        self._issuer_hashes: dict[tuple[x509.Certificate, str], tuple[bytes, bytes]] = {}
        self._scan: Iterator[tuple[x509.Certificate, int]] | None = None
        self._scan_id = 0
        self._scan_done = 0
        self._scan_count = 0
        self._scan_due = 0
        self._scan_reason = ""
        self.known = 0  # responses listed by the last complete scan
        self._in_flight = 0
        self._loop: LoopingCall | None = None
        self._started = False
        self._tokens = 0.0
        self._last = clock.seconds()
        self._pumping = False
        self._again = False
        self._intervals: deque[float] = deque(maxlen=RATE_WINDOW)
        self._busy_mark: float | None = None
        self._capacity: Capacity | None = None
        self._capacity_pending = False
        self._failures = 0
        self._paused_until = 0.0
        self._last_error = ""
        self._run: _Run | None = None
        self._next_behind_check = 0.0
        self._due_count: tuple[float, int] | None = None
        self.signed = 0
        self.failed = 0
        self.expired = 0  # responses that reached their nextUpdate before being re-signed
        handle.source.on_change(self._changed)
        handle.on_certificate_change(self._certificate_changed)

    # --- life ---------------------------------------------------------------------------

    def start(self) -> None:
        if self.rate <= 0:
            return
        self._started = True
        cache = self.handle.cache
        cache.observers.append(self)
        cache.on_first_request = self._first_request
        cache.refresher = self._claim_refresh
        self._begin_scan("start-up")
        self._certificate_changed()  # rows restored from the store may carry an old one
        self._next_behind_check = self._clock.seconds() + self.progress_interval
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._clock
        self._loop.start(0.1, now=False)

    def stop(self) -> None:
        self._started = False
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        cache = self.handle.cache
        if self in cache.observers:
            cache.observers.remove(self)
        if cache.on_first_request == self._first_request:
            cache.on_first_request = None
        if cache.refresher == self._claim_refresh:
            cache.refresher = None

    def pending(self) -> bool:
        """Work left now: a scan, a signature in flight, or an entry past its refresh point."""
        return self._scan is not None or self._in_flight > 0 or self._has_due(self._clock.seconds())

    # --- what the operator reads ---------------------------------------------------------

    def health(self) -> Health:
        """DEGRADED while pre-signing cannot keep every response fresh, with the reason."""
        if not self._started:
            return READY
        now = self._clock.seconds()
        self._check_expiry(now)
        reasons = []
        if self._failures:
            reasons.append(
                f"pre-signing paused after {self._failures} failed signature(s): {self._last_error}"
            )
        if self._expired:
            reasons.append(
                f"{len(self._expired)} response(s) expired before they could be re-signed"
            )
        if self._capacity is not None and not self._capacity.fits:
            reasons.append("token capacity does not fit: " + self._capacity.describe())
        return Health(State.DEGRADED, "; ".join(reasons)) if reasons else READY

    def measured_rate(self) -> float | None:
        """Signatures/s the token delivered to pre-signing (spacing of completions while
        pre-signing kept it busy), or None before enough were seen."""
        if len(self._intervals) < RATE_MIN_SAMPLES:
            return None
        total = sum(self._intervals)
        return len(self._intervals) / total if total > 0 else None

    def needed_rate(self) -> float | None:
        """Signatures/s needed to re-sign every known response at its refresh point."""
        if not self._scan_done:
            return None
        return self._capacity_now().needed

    def capacity(self) -> Capacity | None:
        """The last evaluation logged (start-up, reloads), or None before the first."""
        return self._capacity

    def min_margin(self) -> float | None:
        """Seconds until the first stored response of a known serial expires (None: none)."""
        now = self._clock.seconds()
        self._check_expiry(now)
        return self._expiry[0][0] - now if self._expiry else None

    def expired_now(self) -> int:
        """Responses of known serials now expired and not yet re-signed (never served)."""
        self._check_expiry(self._clock.seconds())
        return len(self._expired)

    def due(self) -> int:
        """Responses past their refresh point waiting for the token (and in flight).

        Counting visits every waiting entry (a few us each), so during a run of work
        (start-up, reload) this is the run's own estimate, and otherwise a count capped at
        COUNT_CAP, at most every 10 s: a scrape never walks 100,000 entries.
        """
        now = self._clock.seconds()
        run = self._run
        if run is not None and run.announced:
            return max(run.total - (self.signed - run.signed_at_start), self._in_flight)
        if self._due_count is None or now - self._due_count[0] >= 10.0:
            self._due_count = (now, self._count_due(now, COUNT_CAP))
        return self._due_count[1] + self._in_flight

    def refresh_first(self, where: Callable[[bytes, SignedResponse], bool]) -> int:
        """Re-sign, ahead of all other pre-signing, every held response ``where`` selects.

        For responses that must be replaced although still fresh: made with a renewed
        (old) responder certificate, say. The old response is served until the new one
        is stored. Returns how many were queued.
        """
        now = self._clock.seconds()
        cache = self.handle.cache
        queued = 0
        for key, entry in list(self._entries.items()):
            current = cache.current(key)
            if current is None or not where(key, current):
                continue
            entry.replace = current
            self._schedule(key, entry, now, URGENT)
            queued += 1
        if queued and self._started:
            self._pump()
        return queued

    def _certificate_changed(self) -> None:
        """Responses made with another responder certificate than the handle's: first."""
        if not self._started:
            return
        for key, serial in self.handle.stale_by_certificate():
            if key not in self._entries:
                # Not scanned yet (start-up), or asked with another hash.
                self._adopt(key, serial, asked=self.handle.cache.requested(key))
        current = self.handle.cert_fp
        self.refresh_first(lambda key, value: value.cert_fp != current)

    # --- the cache tells us (CacheObserver and demand hooks) ------------------------------

    def stored(self, key: bytes, serial: int, value: SignedResponse) -> None:
        entry = self._entries.get(key)
        if entry is None:
            return
        if not self._listed(entry):
            # Adopted for one refresh (a client asked for a CertID no scan lists: another
            # hash, an unknown serial): signed again only when asked again past its
            # refresh point, so one-off requests cannot fill the token's schedule.
            self._forget(key)
            return
        entry.expires = value.expires_at
        entry.replace = None
        self._expired.discard(key)
        heapq.heappush(self._expiry, (value.expires_at, key))
        self._schedule(key, entry, value.refresh_at, ASKED if entry.asked else OTHER)

    def dropped(self, key: bytes) -> None:
        pass

    def invalidated(self, serials: frozenset[int] | None) -> None:
        pass  # the source's change listener (_changed) does the work

    def _first_request(self, key: bytes, serial: int) -> None:
        entry = self._entries.get(key)
        if entry is None:
            return  # not a listed serial: refreshed on demand only (_claim_refresh)
        if not entry.asked:
            entry.asked = True
            if entry.tier == OTHER:
                self._schedule(key, entry, entry.due, ASKED)

    def _claim_refresh(self, key: bytes, serial: int) -> bool:
        """An entry was served past its refresh point: we refresh it, in our order."""
        if not self._started or not self.handle.cache.holds(key):
            return False  # transient answers (unknown serials) refresh themselves
        entry = self._entries.get(key)
        if entry is None:
            entry = self._adopt(key, serial)
            if entry is None:
                return False
        entry.asked = True
        if entry.tier == OTHER:
            self._schedule(key, entry, entry.due, ASKED)
        return True

    def _adopt(self, key: bytes, serial: int, asked: bool = True) -> _Entry | None:
        """An entry for a CertID no scan listed (yet): asked for, or to be replaced."""
        now = self._clock.seconds()
        try:
            cid = parse_request(_der.sequence(_der.sequence(_der.sequence(_der.sequence(key)))))
            one = cid.cert_ids[0]
            issuer = self.handle.issuer_for(one)
        except HsmOcspError:
            return None
        entry = self._entries[key] = _Entry(
            serial=serial, issuer=issuer, alg=one.hash_algorithm, cid=one, asked=asked
        )
        current = self.handle.cache.current(key)
        due = now if current is None else current.refresh_at
        self._schedule(key, entry, due, ASKED if asked else OTHER)
        return entry

    # --- the source tells us -------------------------------------------------------------

    def _changed(self, serials: frozenset[int] | None) -> None:
        """Statuses changed (the cache already dropped their responses): those first,
        then a new scan for serials that appeared or went."""
        if not self._started:
            return
        now = self._clock.seconds()
        if serials is None:
            for each in self._entries.values():
                each.expires = None
            self._expired.clear()
        else:
            for issuer in self.handle.source.issuers():
                for alg in self.hashes:
                    name_hash, key_hash = self._hashes(issuer, alg)
                    for serial in serials:
                        key = cert_id_der(alg, name_hash, key_hash, serial)
                        entry = self._entries.get(key)
                        if entry is None:
                            entry = self._entries[key] = _Entry(serial, issuer, alg)
                        entry.scan = self._scan_id  # listed until the next scan says otherwise
                        entry.expires = None
                        entry.replace = None
                        self._expired.discard(key)
                        self._schedule(key, entry, now, URGENT)
        self._begin_scan("source reload")

    def _begin_scan(self, reason: str) -> None:
        self._scan_id += 1
        self._scan_count = 0
        self._scan_due = 0
        self._scan_reason = reason
        source = self.handle.source

        def walk() -> Iterator[tuple[x509.Certificate, int]]:
            for issuer in source.issuers():
                for serial in source.known_serials(issuer):
                    yield issuer, serial

        self._scan = walk()
        if self._run is None or self._run.announced:
            self._run = _Run(reason, self._clock.seconds(), self.signed)

    def _scan_step(self, now: float) -> None:
        """Walk the source's serials for up to SCAN_BUDGET of CPU time."""
        assert self._scan is not None
        cache = self.handle.cache
        entries = self._entries
        scan_id = self._scan_id
        # A serial without a response counts as one that expired when it was found:
        # clients miss on it now, while a response past its refresh point still serves.
        unsigned_due = now - self.handle.validity * (1.0 - self.handle.refresh_fraction)
        deadline = time.perf_counter() + SCAN_BUDGET
        while True:
            for _ in range(256):
                item = next(self._scan, None)
                if item is None:
                    self._scan = None
                    self._scan_done = scan_id
                    self.known = self._scan_count
                    self._scan_finished(now)
                    return
                issuer, serial = item
                for alg in self.hashes:
                    name_hash, key_hash = self._hashes(issuer, alg)
                    key = cert_id_der(alg, name_hash, key_hash, serial)
                    self._scan_count += 1
                    entry = entries.get(key)
                    current = cache.current(key)
                    due = unsigned_due if current is None else current.refresh_at
                    if entry is None:
                        entry = entries[key] = _Entry(serial, issuer, alg)
                        if current is not None:
                            entry.expires = current.expires_at
                            heapq.heappush(self._expiry, (current.expires_at, key))
                        self._schedule(key, entry, due, OTHER)
                    elif entry.seq == 0 or due < entry.due:
                        self._schedule(key, entry, due, min(entry.tier, OTHER))
                    if entry.seq != 0 and entry.due <= now:
                        self._scan_due += 1
                    entry.scan = scan_id
            if time.perf_counter() >= deadline:
                return

    def _scan_finished(self, now: float) -> None:
        self._capacity_pending = True
        if self.measured_rate() is not None or not self._has_due(now):
            self._log_capacity()
        run = self._run
        if run is None:
            return
        run.announced = True
        run.last_report_at = now
        run.last_report_signed = self.signed
        done = self.signed - run.signed_at_start
        todo = self._scan_due + self._in_flight
        run.total = todo + done
        if todo == 0:
            log.info(
                "pre-signing {handle}: all {known} responses fresh, nothing to sign ({reason})",
                handle=self.handle.name, known=self.known, reason=run.reason,
            )  # fmt: skip
            self._run = None
            return
        log.info(
            "pre-signing {handle}: {todo} responses to sign ({reason}; {known} known)",
            handle=self.handle.name, todo=todo + done, reason=run.reason, known=self.known,
        )  # fmt: skip

    def _capacity_now(self) -> Capacity:
        return Capacity(
            responses=self.known,
            validity=self.handle.validity,
            refresh_fraction=self.handle.refresh_fraction,
            measured=self.measured_rate(),
        )

    def _log_capacity(self) -> None:
        self._capacity_pending = False
        capacity = self._capacity = self._capacity_now()
        text = capacity.describe()
        if capacity.fits:
            log.info("capacity of handle {handle}: {text}", handle=self.handle.name, text=text)
        else:
            log.warn("capacity of handle {handle}: {text}", handle=self.handle.name, text=text)

    # --- the schedule --------------------------------------------------------------------

    def _schedule(self, key: bytes, entry: _Entry, due: float, tier: int) -> None:
        entry.due = due
        entry.tier = tier
        entry.seq = next(self._seq)
        heapq.heappush(self._heaps[tier], (due, entry.seq, key))

    def _pop(self, now: float) -> tuple[bytes, _Entry] | None:
        """The best entry whose time has come, removed from the schedule."""
        entries = self._entries
        for heap in self._heaps:
            while heap:
                due, seq, key = heap[0]
                entry = entries.get(key)
                if entry is None or entry.seq != seq:
                    heapq.heappop(heap)  # superseded
                    continue
                if due > now:
                    break
                heapq.heappop(heap)
                entry.seq = 0
                return key, entry
        return None

    def _has_due(self, now: float) -> bool:
        entries = self._entries
        for heap in self._heaps:
            while heap:
                due, seq, key = heap[0]
                entry = entries.get(key)
                if entry is None or entry.seq != seq:
                    heapq.heappop(heap)
                    continue
                if due <= now:
                    return True
                break
        return False

    def _count_due(self, now: float, cap: int) -> int:
        """Scheduled entries past their time, up to ``cap``: visits only those (and their
        children), so the cost follows the backlog, not the number of entries."""
        entries = self._entries
        count = 0
        for heap in self._heaps:
            stack = [0]
            size = len(heap)
            while stack and count < cap:
                i = stack.pop()
                if i >= size or heap[i][0] > now:
                    continue
                _due, seq, key = heap[i]
                entry = entries.get(key)
                if entry is not None and entry.seq == seq:
                    count += 1
                stack.append(2 * i + 1)
                stack.append(2 * i + 2)
        return count

    def _take(self, now: float) -> tuple[bytes, _Entry] | None:
        """The next entry that really needs a signature (skipping those that no longer do)."""
        cache = self.handle.cache
        while True:
            item = self._pop(now)
            if item is None:
                return None
            key, entry = item
            current = cache.current(key)
            normal = ASKED if entry.asked else OTHER
            if current is not None and now < current.refresh_at:
                if entry.tier != URGENT or current is not entry.replace:
                    # Signed since it was scheduled (a live miss, a restore): follow it.
                    self._schedule(key, entry, current.refresh_at, normal)
                    continue
            if entry.tier != URGENT:
                if not self._listed(entry) and (
                    current is None or not entry.asked or not cache.holds(key)
                ):
                    self._forget(key)  # no longer known, and no client's response held
                    continue
            return key, entry

    def _listed(self, entry: _Entry) -> bool:
        """Whether the last complete scan (or the one under way) listed this serial."""
        return entry.scan > 0 and entry.scan >= self._scan_done

    def _forget(self, key: bytes) -> None:
        self._entries.pop(key, None)
        self._expired.discard(key)

    def _check_expiry(self, now: float) -> None:
        heap = self._expiry
        entries = self._entries
        while heap:
            expires, key = heap[0]
            entry = entries.get(key)
            if entry is None or entry.expires != expires:
                heapq.heappop(heap)  # re-signed, invalidated or forgotten since
                continue
            if expires > now:
                return
            heapq.heappop(heap)
            entry.expires = None
            self.expired += 1
            self._expired.add(key)

    # --- signing -------------------------------------------------------------------------

    def _tick(self) -> None:
        now = self._clock.seconds()
        if self._scan is not None:
            self._scan_step(now)
        self._check_expiry(now)
        self._pump()
        self._progress(now)

    def _pump(self) -> None:
        """Start signatures while the rate, the concurrency and the live backlog allow.

        Called every tick and whenever a signature finishes, so pre-signing keeps the
        workers busy at up to ``rate`` per second instead of one signature per tick.
        Re-entrant calls (a signer that answers synchronously) just ask for another loop.
        """
        if self._pumping:
            self._again = True
            return
        self._pumping = True
        try:
            self._again = True
            while self._again:
                self._again = False
                self._fill()
        finally:
            self._pumping = False

    def _fill(self) -> None:
        now = self._clock.seconds()
        burst = max(1.0, self.rate * 0.1)
        self._tokens = min(burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        while (
            self._tokens >= 1
            and self._in_flight < self.concurrency
            and now >= self._paused_until
            and self._backlog() == 0
        ):
            item = self._take(now)
            if item is None:
                return
            if self._sign(*item, now):
                self._tokens -= 1

    def _hashes(self, issuer: x509.Certificate, alg: str) -> tuple[bytes, bytes]:
        hit = self._issuer_hashes.get((issuer, alg))
        if hit is None:
            hit = self._issuer_hashes[(issuer, alg)] = issuer_hashes(issuer, alg)
        return hit

    def _sign(self, key: bytes, entry: _Entry, now: float) -> bool:
        cid = entry.cid or make_cert_id(
            entry.alg, *self._hashes(entry.issuer, entry.alg), entry.serial
        )
        issuer = entry.issuer
        handle = self.handle

        def produce() -> Deferred[SignedResponse]:
            return handle.produce_single(cid, issuer)

        result = handle.cache.refresh(key, entry.serial, produce)
        if result is None:
            # Being signed already (a live miss): look again in a moment.
            self._schedule(key, entry, now + 1.0, entry.tier)
            return False
        self._in_flight += 1
        if self._busy_mark is None:
            self._busy_mark = now
        result.addBoth(self._done, key, entry)
        return True

    def _done(self, outcome: SignedResponse | Failure, key: bytes, entry: _Entry) -> None:
        self._in_flight -= 1
        now = self._clock.seconds()
        if isinstance(outcome, SignedResponse):
            self.signed += 1
            if self._busy_mark is not None and now > self._busy_mark:
                self._intervals.append(now - self._busy_mark)
            self._busy_mark = now if self._in_flight else None
            if self._failures:
                log.info(
                    "pre-signing {handle}: signing again after {n} failure(s)",
                    handle=self.handle.name, n=self._failures,
                )  # fmt: skip
                self._failures = 0
                self._paused_until = 0.0
            if self._capacity_pending and self.measured_rate() is not None:
                self._log_capacity()
        else:
            self.failed += 1
            self._busy_mark = now if self._in_flight else None
            self._failures += 1
            self._last_error = outcome.getErrorMessage()
            pause = min(MAX_PAUSE, 2.0 ** (self._failures - 1))
            self._paused_until = now + pause
            if self._failures == 1:
                log.warn(
                    "pre-signing {handle} paused: {why}; trying again with back-off "
                    "(up to {most:g} s)",
                    handle=self.handle.name, why=self._last_error, most=MAX_PAUSE,
                )  # fmt: skip
            if self._entries.get(key) is entry and entry.seq == 0:
                self._schedule(key, entry, entry.due, entry.tier)  # keeps its place
        if self._started:
            self._pump()

    # --- progress ------------------------------------------------------------------------

    def _progress(self, now: float) -> None:
        run = self._run
        if run is None:
            if now >= self._next_behind_check:
                self._next_behind_check = now + self.progress_interval
                rate = self.measured_rate() or 1.0
                threshold = int(max(10.0, rate * self.progress_interval))
                todo = self._count_due(now, threshold)
                if todo >= threshold:
                    todo = self._count_due(now, 10 * COUNT_CAP)
                    self._run = _Run(
                        "behind schedule",
                        now,
                        self.signed,
                        announced=True,
                        last_report_at=now,
                        last_report_signed=self.signed,
                        total=todo,
                    )
                    log.warn(
                        "pre-signing {handle}: {todo} responses past their refresh point "
                        "(behind schedule)",
                        handle=self.handle.name, todo=todo,
                    )  # fmt: skip
            return
        if not run.announced:
            return  # the scan that started it has not finished
        done = self.signed - run.signed_at_start
        if self._scan is None and self._in_flight == 0 and not self._has_due(now):
            elapsed = now - run.started_at
            log.info(
                "pre-signing {handle}: done, {done} signed in {elapsed} ({rate} sig/s)",
                handle=self.handle.name, done=done, elapsed=_duration(elapsed),
                rate=_rate(done / elapsed) if elapsed > 0 else "-",
            )  # fmt: skip
            self._run = None
            self._next_behind_check = now + self.progress_interval
            return
        if now - run.last_report_at < self.progress_interval:
            return
        rate = (self.signed - run.last_report_signed) / (now - run.last_report_at)
        left = max(run.total - done, self._in_flight)
        eta = _duration(left / rate) if rate > 0 else "unknown (nothing signed last minute)"
        log.info(
            "pre-signing {handle}: {done}/{total} signed, {rate} sig/s, {left} left, ETA {eta}",
            handle=self.handle.name, done=done, total=done + left, rate=_rate(rate),
            left=left, eta=eta,
        )  # fmt: skip
        run.last_report_at = now
        run.last_report_signed = self.signed


def _rate(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 0.1:
        return f"{value:.2f}"
    return f"{value:.4f}"


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    hours, rest = divmod(seconds, 3600)
    return f"{hours:.0f} h {rest / 60:02.0f} min"
