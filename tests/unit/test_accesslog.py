"""The access log (#10): main-process answers (fast path and twisted.web), answers of
the fronts, and the client address of connections a front relays."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from hsmocsp.web.accesslog import AccessLog, AccessRecord, open_access_log
from hsmocsp.web.app import OCSPApp
from hsmocsp.web.fastpath import FastSite
from hsmocsp.web.front_process import FrontSite, Replica
from hsmocsp.web.limits import HttpLimits
from hsmocsp.web.problems import Problems
from tests.unit.test_fastpath import post
from tests.unit.test_responder import make, request_for

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
CLIENT = IPv4Address("TCP", "192.0.2.7", 40000)


def site(fmt: str = "json") -> tuple[FastSite, io.StringIO, Any]:
    clock = Clock()
    clock.advance(1_750_000_000)
    handle, _, signer = make(clock)
    app = OCSPApp([handle], now=clock.seconds, problems=Problems(clock))
    out = io.StringIO()
    app.access = AccessLog(fmt, out)  # type: ignore[arg-type]
    return FastSite(app, clock.seconds, clock=clock), out, signer


def ask(factory: Any, raw: bytes, addr: Any = CLIENT) -> StringTransport:
    proto = factory.buildProtocol(addr)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(raw)
    return transport


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_signed_then_cached_then_malformed() -> None:
    s, out, _ = site()
    ask(s, post(request_for(1)))
    ask(s, post(request_for(1)))
    ask(s, post(b"junk"))
    signed, hit, bad = lines(out)
    assert (signed["source"], signed["status"], signed["serials"]) == ("signed", "successful",
                                                                       ["1"])  # fmt: skip
    assert (hit["source"], hit["client"], hit["handle"], hit["method"]) == (
        "hit", "192.0.2.7", "t", "POST")
    assert (bad["status"], bad["source"], bad["serials"]) == ("malformedRequest", "-", [])
    assert all(r["process"] == "main" and r["ms"] >= 0 for r in (signed, hit, bad))


def test_twisted_web_path_is_logged_too() -> None:
    s, out, _ = site()
    ask(s, post(request_for(2), extra=b'If-None-Match: "x"\r\n'))  # declined by the fast path
    assert s.handed_over == 1
    (record,) = lines(out)
    assert (record["serials"], record["client"], record["http_status"]) == (["2"], "192.0.2.7",
                                                                            200)  # fmt: skip


def test_combined_format() -> None:
    s, out, _ = site("combined")
    ask(s, post(request_for(1)))
    line = out.getvalue().strip()
    assert line.startswith('192.0.2.7 - - [')
    assert '"POST ' in line and " 200 " in line
    assert "handle=t serials=1 ocsp=successful cache=signed" in line


def test_off_writes_nothing() -> None:
    s, out, _ = site("off")
    ask(s, post(request_for(1)))
    assert out.getvalue() == ""


def test_relayed_connection_names_the_client() -> None:
    s, out, _ = site()
    relayed = s.relayed()
    ask(relayed, b"HSMOCSP-CLIENT 198.51.100.9 5555\r\n" + post(request_for(1)),
        UNIXAddress("/run/backend.sock"))  # fmt: skip
    (record,) = lines(out)
    assert record["client"] == "198.51.100.9"
    t = ask(relayed, post(request_for(1)), UNIXAddress("/run/backend.sock"))  # no preamble
    assert t.disconnecting and t.value() == b""


def test_front_records_reach_the_main_log() -> None:
    clock = Clock()
    clock.advance(1_750_000_000)
    handle, _, _ = make(clock)
    replica = Replica(handle.name, handle.path, handle.max_age, "echo", clock.seconds)
    front = FrontSite([replica], clock.seconds, lambda p: None, HttpLimits(), clock,  # type: ignore[arg-type,return-value]
                      access_log=True)  # fmt: skip
    app = OCSPApp([handle], now=clock.seconds)
    main = FastSite(app, clock.seconds, clock=clock)
    der = request_for(1)
    ask(main, post(der))  # signs; the replica gets it below
    (key, serial, value), = handle.cache.items()
    replica.put(key, serial, value)
    ask(front, post(der))
    records = front.take_access()
    assert len(records) == 1 and front.take_access() == []

    from hsmocsp.web.front_pool import FrontPool
    from hsmocsp.web.metrics import Metrics

    out = io.StringIO()
    pool = FrontPool(clock, [handle], Metrics([handle]), count=0, host="127.0.0.1", port=1,
                     backend="/x", limits=HttpLimits(), access=AccessLog("json", out))  # fmt: skip
    pool.access_records(1, [*records, ["bad"], "junk", [1, 2, 3, 4, 5, 6, 7, 8, 9]])
    (record,) = lines(out)
    assert (record["process"], record["client"], record["serials"]) == ("front 1", "192.0.2.7",
                                                                        ["1"])  # fmt: skip


def test_records_from_fronts_are_checked() -> None:
    good = AccessRecord(1.0, "c", "h", "GET", (1,), "successful", "hit", 0.5).as_list()
    assert AccessRecord.from_list(good, "front 2") is not None
    for bad in (good[:-1], [*good[:4], ["x"], *good[5:]], [*good[:1], "c" * 500, *good[2:]],
                None, 5):  # fmt: skip
        assert AccessRecord.from_list(bad, "front 2") is None


def test_open_access_log(tmp_path: Any) -> None:
    log = open_access_log("json", str(tmp_path / "access.log"))
    log.write(AccessRecord(1.0, "c", "h", "GET", (255,), "successful", "hit", 0.5))
    log.close()
    assert json.loads((tmp_path / "access.log").read_text())["serials"] == ["ff"]
    with pytest.raises(ValueError):
        open_access_log("xml", None)
