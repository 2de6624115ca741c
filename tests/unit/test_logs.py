"""JSON service log: one object per line, the formatted message, the fields it names,
a traceback only for unexpected failures."""

from __future__ import annotations

import io
import json

from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from hsmocsp.logs import JsonLineObserver, record


def test_one_line_per_event_with_named_fields() -> None:
    out = io.StringIO()
    log = Logger(namespace="hsmocsp.test", observer=JsonLineObserver(out))
    log.warn("handle {handle}: {n} serials", handle="root", n=3, secret_object=object())
    line = out.getvalue()
    assert line.count("\n") == 1
    data = json.loads(line)
    assert data["level"] == "warn" and data["namespace"] == "hsmocsp.test"
    assert data["message"] == "handle root: 3 serials"
    assert data["handle"] == "root" and data["n"] == 3
    assert "secret_object" not in data and "traceback" not in data
    assert data["time"].endswith("+00:00")


def test_unexpected_failure_carries_its_traceback() -> None:
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        failure = Failure()
    data = record(
        {"log_level": LogLevel.critical, "log_format": "boom", "log_failure": failure,
         "log_namespace": "x", "log_time": 0.0}
    )  # fmt: skip
    assert data["error"] == "ZeroDivisionError: division by zero"
    assert "Traceback" in data["traceback"]


def test_legacy_and_odd_events() -> None:
    data = record({"log_format": "{a.b} {0} {", "log_time": None})
    assert data["level"] == "info" and data["time"] is None
