"""Bad input from clients: one log line per kind, then a count once a minute.

Seen (#9.10): a 35-byte malformed GET logged a 376-byte traceback, so anyone could
fill the disk with the responder's log. Bad input is expected, not an error of
ours: it gets no traceback, the first of each kind in a period is logged with
its detail, the rest are only counted, and one summary line per kind and period
says how many there were. Every one is counted in a metric
(``hsmocsp_bad_requests_total{kind}``) as well.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

log = Logger()

#: Seconds between summary lines.
SUMMARY_INTERVAL = 60.0


class Problems:
    """Counts and rate-limited log lines for refused requests."""

    def __init__(
        self,
        clock: IReactorTime | None = None,
        interval: float = SUMMARY_INTERVAL,
        on_count: Callable[[str], None] | None = None,
    ) -> None:
        self._clock = clock
        self.interval = interval
        self.on_count = on_count
        self.totals: dict[str, int] = {}
        self._quiet: dict[str, int] = {}  # kind -> not logged since the period began
        self._timer: IDelayedCall | None = None

    def _reactor(self) -> IReactorTime:
        if self._clock is None:
            from twisted.internet import reactor

            self._clock = reactor
        assert self._clock is not None
        return self._clock

    def report(self, kind: str, detail: str, peer: Any = None) -> None:
        """One refused request of ``kind`` (e.g. ``"414"``, ``"malformedRequest"``)."""
        self.totals[kind] = self.totals.get(kind, 0) + 1
        if self.on_count is not None:
            self.on_count(kind)
        if kind in self._quiet:
            self._quiet[kind] += 1
            return
        self._quiet[kind] = 0
        log.info(
            "refused a request ({kind}) from {peer}: {detail} (more of these are counted, "
            "and summarised every {interval:g} s)",
            kind=kind, peer=_peer(peer), detail=detail, interval=self.interval,
        )  # fmt: skip
        if self._timer is None or not self._timer.active():
            self._timer = self._reactor().callLater(self.interval, self._summarise)

    def _summarise(self) -> None:
        self._timer = None
        quiet, self._quiet = self._quiet, {}
        for kind, n in sorted(quiet.items()):
            if n:
                log.info(
                    "refused {n} more requests ({kind}) in the last {interval:g} s",
                    n=n, kind=kind, interval=self.interval,
                )  # fmt: skip
                self._quiet[kind] = 0  # still noisy: keep counting quietly
        if self._quiet:
            self._timer = self._reactor().callLater(self.interval, self._summarise)

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


def _peer(peer: Any) -> str:
    host = getattr(peer, "host", None)
    if host is None:
        return "-" if peer is None else str(peer)
    return str(host)
