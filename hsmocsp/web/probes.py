"""What ``/readyz`` and ``/readyz/<handle>`` answer, from each handle's health.

Kubernetes takes a pod out of its Service while the readiness probe fails. One
CA's trouble (OpenBao down for a Vault handle, an expired responder certificate)
must not take OCSP away for every other CA served by the same pod, so:

* ``/readyz`` answers 503 only while the service is starting (the listener is
  up but, with ``http_workers``, not every front has bound the port yet) or when
  *every* handle is ``failed``; otherwise 200. Its JSON body lists each handle's
  state (``ready``, ``degraded``, ``failed``) and reason, and any other part
  worth knowing about (the HTTP fronts).
* ``/readyz/<handle>`` is strict, for whoever wants one CA's word: 200 only
  when that handle is ``ready``, 503 when it is degraded or failed (or the
  service is starting), 404 for a handle that does not exist.

Both read :meth:`~hsmocsp.handle.Handle.health`, as do the
``hsmocsp_handle_state`` metric and the state-change log lines, so they agree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from hsmocsp.health import Health, State
from hsmocsp.web.endpoint import OcspEndpoint

__all__ = ["Probes"]


class Probes:
    """Readiness of a set of handles, plus start-up conditions and reported parts."""

    def __init__(self, handles: Sequence[OcspEndpoint]) -> None:
        self.handles = list(handles)
        self._by_name = {h.name: h for h in self.handles}
        #: Start-up conditions: each returns why the service is not ready yet, or None.
        self.waiting: list[Callable[[], str | None]] = []
        #: Parts shown in the body that do not decide readiness (e.g. the HTTP fronts).
        self.parts: dict[str, Callable[[], Health]] = {}

    def starting(self) -> str | None:
        reasons = [why for condition in self.waiting if (why := condition())]
        return "; ".join(reasons) or None

    def readyz(self) -> tuple[int, dict[str, Any]]:
        """HTTP status and JSON body of ``/readyz``."""
        starting = self.starting()
        healths = {h.name: h.health() for h in self.handles}
        if starting is not None:
            code, state = 503, "starting"
        elif healths and all(h.state is State.FAILED for h in healths.values()):
            code, state = 503, State.FAILED.label
        else:
            # Some handle answers: the pod takes traffic. "degraded" when any is not ready.
            all_ready = all(h.ready for h in healths.values())
            code, state = 200, (State.READY if all_ready else State.DEGRADED).label
        body: dict[str, Any] = {
            "ready": code == 200,
            "state": state,
            "handles": {name: _describe(h) for name, h in healths.items()},
        }
        if starting is not None:
            body["reason"] = starting
        for name, part in self.parts.items():
            body[name] = _describe(part())
        return code, body

    def readyz_handle(self, name: str) -> tuple[int, dict[str, Any]] | None:
        """``/readyz/<name>``: 200 only when ready; None for an unknown handle."""
        handle = self._by_name.get(name)
        if handle is None:
            return None
        health = handle.health()
        starting = self.starting()
        body: dict[str, Any] = {"handle": name, **_describe(health)}
        if starting is not None:
            body.update(state="starting", reason=starting)
        ok = starting is None and health.ready
        body["ready"] = ok
        return (200 if ok else 503), body


def _describe(health: Health) -> dict[str, str]:
    return {"state": health.state.label, "reason": health.reason}
