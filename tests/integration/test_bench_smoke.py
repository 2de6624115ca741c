"""Smoke test of bench.compare's building blocks: Lua scripts, wrk parsing, the table.

No timing assertions: speed is measured by ``python -m bench.compare``, not here. The
two wrk runs (1 s each) check that the generated Lua really sends what it should to a
tiny loopback server.
"""

from __future__ import annotations

import shutil
import signal
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TypeAlias

import pytest

from bench.compare import Report, Row, format_table, get_path, parse_args
from bench.procs import bench_children
from bench.wrk import (
    WrkError,
    cycle_script,
    get_script,
    lua_bytes,
    parse_output,
    post_script,
    run_wrk,
    start_wrk,
)

DER = bytes(range(256)) + b'"\\\n\x00end'

WRK_SAMPLE = """\
Running 2s test @ http://127.0.0.1:8080/ocsp
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     5.12ms    1.02ms  20.00ms   90.00%
    Req/Sec     6.25k   300.00     7.00k    80.00%
  12500 requests in 2.00s, 20.00MB read
  Socket errors: connect 0, read 3, write 0, timeout 1
  Non-2xx or 3xx responses: 5
Requests/sec:   6250.00
Transfer/sec:     10.00MB
"""


def test_lua_bytes_escapes_every_byte() -> None:
    lit = lua_bytes(b"\x00A\xff")
    assert lit == '"\\000\\065\\255"'


def test_parse_text_fallback() -> None:
    r = parse_output(WRK_SAMPLE)
    assert (r.requests, r.seconds, r.errors, r.non_2xx) == (12500, 2.0, 4, 5)
    assert r.rps == 6250.0
    assert not r.ok


def test_parse_bench_line_wins() -> None:
    text = WRK_SAMPLE + (
        "BENCH requests=12501 duration_us=2000500 connect=0 read=0 write=0 timeout=0 "
        "status=0 p50_us=5120 p99_us=9000\n"
    )
    r = parse_output(text)
    assert (r.requests, r.seconds, r.non_2xx, r.p50_ms, r.p99_ms) == (12501, 2.0005, 0, 5.12, 9.0)
    assert r.ok


def test_parse_garbage_is_a_clear_error() -> None:
    with pytest.raises(WrkError, match="cannot read wrk output"):
        parse_output("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_scripts_reject_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        get_script('/a"b')
    with pytest.raises(ValueError):
        cycle_script(tmp_path / "x.hex", "ocsp", 1)
    with pytest.raises(ValueError):
        cycle_script(tmp_path / "x.hex", "/ocsp", 0)


def test_refuses_non_loopback(tmp_path: Path) -> None:
    with pytest.raises(WrkError, match="non-loopback"):
        run_wrk("http://192.0.2.1:80/", tmp_path / "s.lua", 1, 1)
    with pytest.raises(WrkError, match="non-loopback"):
        start_wrk("http://192.0.2.1:80/", tmp_path / "s.lua", 1, 1)


def test_get_path_is_url_encoded() -> None:
    path = get_path("/ocsp", b"\xfb\xff\xfe")  # base64 '+//+'
    assert path == "/ocsp/%2B%2F%2F%2B"


def test_table_and_ratios() -> None:
    report = Report(duration=2, connections=32, threads=1)
    report.rows += [
        Row("hsmocsp cached POST", 6000.0, 5.0, 9.0, 12000),
        Row("cfssl ocspserve POST", 10000.0, 3.0, 8.0, 20000),
        Row("openssl ocsp -multi 2 POST", None, note="FAILED: x"),
    ]
    text = format_table(report)
    assert "0.60x (target >= 0.5x) MET" in text
    assert "openssl ocsp -multi 2 POST: not measured" in text
    assert "FAILED: x" in text


def test_quick_args() -> None:
    args = parse_args(["--quick", "--only", "hsmocsp,nginx"])
    assert args.duration == 2.0
    assert args.only == {"hsmocsp", "nginx"}
    with pytest.raises(SystemExit):
        parse_args(["--only", "nope"])


Seen: TypeAlias = list[tuple[str, str, str | None, bytes]]


class _Recorder(BaseHTTPRequestHandler):
    seen: Seen = []
    lock = threading.Lock()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self._answer(body)

    def do_GET(self) -> None:
        self._answer(b"")

    def _answer(self, body: bytes) -> None:
        with self.lock:
            if len(self.seen) < 1000:
                self.seen.append((self.command, self.path, self.headers["Content-Type"], body))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[tuple[str, Seen]]:
    if shutil.which("wrk") is None:
        pytest.skip("wrk not installed (Debian package 'wrk')")
    _Recorder.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", _Recorder.seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_wrk_post_script_sends_exact_der(recorder: tuple[str, Seen], tmp_path: Path) -> None:
    url, seen = recorder
    script = tmp_path / "post.lua"
    script.write_text(post_script(DER))
    result = run_wrk(url + "/ocsp", script, duration=1, connections=2)
    assert result.requests > 0 and result.ok
    assert seen
    assert all(s == ("POST", "/ocsp", "application/ocsp-request", DER) for s in seen)


def test_background_wrk_sends_the_same_requests(
    recorder: tuple[str, Seen], tmp_path: Path
) -> None:
    """start_wrk (the load of bench.replicas' revocation row) builds run_wrk's command."""
    url, seen = recorder
    script = tmp_path / "post.lua"
    script.write_text(post_script(DER))
    proc = start_wrk(url + "/ocsp", script, duration=1, connections=2)
    assert proc.wait(60) == 0
    assert seen
    assert all(s == ("POST", "/ocsp", "application/ocsp-request", DER) for s in seen)


def test_wrk_cycle_script_sends_distinct_bodies(recorder: tuple[str, Seen], tmp_path: Path) -> None:
    url, seen = recorder
    bodies = [b"\x30\x03\x02\x01" + bytes([i]) for i in range(3)]
    hexfile = tmp_path / "reqs.hex"
    hexfile.write_text("".join(b.hex() + "\n" for b in bodies))
    script = tmp_path / "cycle.lua"
    script.write_text(cycle_script(hexfile, "/ocsp", threads=2))
    result = run_wrk(url + "/ocsp", script, duration=1, connections=2, threads=2)
    assert result.requests > 0
    assert {s[3] for s in seen} == set(bodies)
    assert all(s[:3] == ("POST", "/ocsp", "application/ocsp-request") for s in seen)


@pytest.mark.parametrize("keep", [False, True])
def test_bench_frame_stops_children_and_removes_the_work_dir(keep: bool) -> None:
    """bench_children/close: the frame every bench's main uses (compare, replicas, token)."""
    before = signal.getsignal(signal.SIGTERM)
    try:
        children = bench_children("hsmocsp-bench-test-")
        work = children.workdir
        assert work.is_dir()
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler)
        with pytest.raises(SystemExit) as exited:
            handler(signal.SIGTERM, None)  # SIGTERM unwinds like Ctrl-C
        assert exited.value.code == 128 + signal.SIGTERM
        child = children.start("idle", ["sleep", "60"])  # a server to stop, not a wait
        children.close(keep)
        assert child.proc.poll() is not None
        assert work.exists() is keep
    finally:
        signal.signal(signal.SIGTERM, before)
        shutil.rmtree(work, ignore_errors=True)
