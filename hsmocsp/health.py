"""How a component says whether it can do its job: one small value shared by all.

Every long-lived component that can be partly or wholly out of order (a token
pool, a status source, a store, a pre-signer) exposes ``health() -> Health``.
A handle combines the health of what it depends on with :func:`worst`, and the
probes, metrics and logs read handles, never components directly. Keeping the
vocabulary in one place is why ``/readyz``, the metrics and the "state
changed" log lines cannot disagree.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from twisted.logger import Logger


class State(enum.IntEnum):
    """Ordered from best to worst, so ``max`` picks the worse one."""

    READY = 0
    """Everything it is asked can be answered as it should."""
    DEGRADED = 1
    """Answers from what it has (cache, store) or with ``tryLater`` for new work."""
    FAILED = 2
    """Can answer nothing useful until something outside it changes."""

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Health:
    state: State
    reason: str = ""

    @property
    def ready(self) -> bool:
        return self.state is State.READY


READY = Health(State.READY)


def worst(*healths: Health) -> Health:
    """The worst of several; reasons of equally bad parts are joined."""
    if not healths:
        return READY
    bad = max(h.state for h in healths)
    reasons = [h.reason for h in healths if h.state is bad and h.reason]
    return Health(bad, "; ".join(dict.fromkeys(reasons)))


def log_handle_change(log: Logger, handle: str, previous: Health | None, health: Health) -> None:
    """The one line a handle's state change gets (a signing handle and a server replica's
    handle say it alike, so one grep finds both): info when it turns ready, warn otherwise."""
    if previous is None or previous.state is health.state:
        return
    emit = log.info if health.state is State.READY else log.warn
    emit(
        "handle {handle}: {old} -> {new}{why}",
        handle=handle,
        old=previous.state.label,
        new=health.state.label,
        why=f" ({health.reason})" if health.reason else "",
    )
