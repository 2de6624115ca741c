"""The service log as JSON lines, for log shippers: ``twistd --logger=hsmocsp.logs.json_observer``.

One JSON object per line on standard output (journald, a container runtime or a
collector reads it): ``time`` (UTC, ISO 8601), ``level``, ``namespace``,
``message`` (the formatted text, exactly what the text log says), and the fields
the message names (``handle``, ``token``, ``serials``...) when they are plain
values, so a shipper can filter on them without parsing the text.

Expected conditions are logged as one line with no traceback (that is how the
code logs them). Only an unexpected failure (``log.failure``) adds ``error`` and
``traceback``. Fields the message does not name are left out: an event may carry
objects that are not for the log.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from string import Formatter
from typing import IO, Any

from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent
from zope.interface import implementer

_PLAIN = (str, int, float, bool, type(None))
_LEVELS = tuple(LogLevel.iterconstants())


@implementer(ILogObserver)
class JsonLineObserver:
    """Writes each event as one JSON object and a newline to ``out``."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out

    def __call__(self, event: LogEvent) -> None:
        self._out.write(json.dumps(record(event), ensure_ascii=False) + "\n")
        self._out.flush()


def record(event: LogEvent) -> dict[str, Any]:
    """The JSON object for one event."""
    level = event.get("log_level")
    when = event.get("log_time")
    out: dict[str, Any] = {
        "time": (
            datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds")
            if isinstance(when, int | float)
            else None
        ),
        "level": level.name if level is not None and level in _LEVELS else "info",
        "namespace": event.get("log_namespace") or event.get("log_system") or "-",
        "message": formatEvent(event).rstrip("\n"),
    }
    for name in _named_fields(event.get("log_format")):
        value = event.get(name)
        if name not in out and isinstance(value, _PLAIN):
            out[name] = value
    failure = event.get("log_failure")
    if failure is not None:
        out["error"] = f"{failure.type.__name__}: {failure.getErrorMessage()}"
        out["traceback"] = failure.getTraceback()
    return out


def _named_fields(log_format: object) -> list[str]:
    if not isinstance(log_format, str):
        return []
    try:
        parsed = list(Formatter().parse(log_format))
    except ValueError:
        return []
    names = []
    for _, field, _, _ in parsed:
        if field:
            name = field.split(".", 1)[0].split("[", 1)[0]
            if name.isidentifier() and not name.startswith("log_"):
                names.append(name)
    return names


def json_observer() -> ILogObserver:
    """twistd ``--logger`` factory: JSON lines on the standard output twistd started with
    (taken now, before twistd redirects ``sys.stdout`` into the log)."""
    return JsonLineObserver(sys.stdout)


__all__ = ["JsonLineObserver", "json_observer", "record"]
