"""Drive ``wrk`` with generated Lua scripts and parse what it prints.

Every target of :mod:`bench.compare` is measured by the same load generator with the
same kind of script, so the numbers differ only by the server. The scripts are
generated here (pure functions, tested in ``tests/integration/test_bench_smoke.py``):

* :func:`post_script` - POST one fixed DER body with ``Content-Type:
  application/ocsp-request`` (the body is a Lua string of ``\\ddd`` escapes);
* :func:`get_script`  - GET one fixed path (``/<url-encoded base64>`` or a static file);
* :func:`cycle_script` - POST a different request each time, read from a hex-lines file,
  each wrk thread starting at its own offset and stepping by the thread count so no two
  threads send the same request (the cache-miss run).

Each script has a ``done()`` hook printing one ``BENCH`` line with exact counters and
latency percentiles; :func:`parse_output` reads it, and falls back to wrk's human text.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "WrkError",
    "WrkResult",
    "cycle_script",
    "get_script",
    "lua_bytes",
    "parse_output",
    "post_script",
    "run_wrk",
    "start_wrk",
    "wrk_command",
]


class WrkError(RuntimeError):
    """wrk is missing, failed, or printed something we cannot read."""


@dataclass(frozen=True)
class WrkResult:
    """What one wrk run measured."""

    requests: int
    seconds: float
    errors: int  # connect + read + write + timeout socket errors
    non_2xx: int
    p50_ms: float | None = None
    p99_ms: float | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        """True when every response was 2xx/3xx and no socket error other than reads.

        ``openssl ocsp`` closes each connection after answering, which wrk may count as
        read errors on a reconnect; those are reported but do not fail the run.
        """
        return self.non_2xx == 0 and self.requests > 0


_DONE_HOOK = r"""
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d connect=%d read=%d write=%d timeout=%d status=%d "
    .. "p50_us=%d p99_us=%d\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
"""


def lua_bytes(data: bytes) -> str:
    """A Lua string literal holding exactly ``data`` (decimal escapes; LuaJIT-safe)."""
    return '"' + "".join(f"\\{b:03d}" for b in data) + '"'


def post_script(body: bytes, content_type: str = "application/ocsp-request") -> str:
    """Lua: POST ``body`` on every request (the URL's path is the target)."""
    return (
        'wrk.method = "POST"\n'
        f'wrk.headers["Content-Type"] = "{content_type}"\n'
        f"wrk.body = {lua_bytes(body)}\n" + _DONE_HOOK
    )


def get_script(path: str) -> str:
    """Lua: GET ``path`` (absolute, already URL-encoded) on every request."""
    if not path.startswith("/") or any(c in path for c in '"\\\n\r '):
        raise ValueError(f"bad request path {path!r}")
    return f'wrk.method = "GET"\nwrk.path = "{path}"\n' + _DONE_HOOK


def cycle_script(
    hex_file: Path, path: str, threads: int, content_type: str = "application/ocsp-request"
) -> str:
    """Lua: POST the requests of ``hex_file`` (one hex DER per line) in turn.

    Thread ``k`` of ``n`` sends lines ``k, k+n, k+2n, ...`` and wraps around at the end
    (a wrap means repeats, i.e. cache hits: size the file for the run). ``threads`` must
    be the ``-t`` given to wrk.
    """
    if threads < 1:
        raise ValueError("threads must be >= 1")
    if any(c in str(hex_file) for c in '"\\\n\r'):
        raise ValueError(f"unusable file name {hex_file}")
    if not path.startswith("/") or any(c in path for c in '"\\\n\r '):
        raise ValueError(f"bad request path {path!r}")
    return (
        f"""
local counter = 0
function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
end

local bodies = {{}}
local i = 0
local headers = {{["Content-Type"] = "{content_type}"}}

function init(args)
  for line in io.lines("{hex_file}") do
    if #line > 0 then
      bodies[#bodies + 1] = line:gsub("%x%x", function(h) return string.char(tonumber(h, 16)) end)
    end
  end
  i = tid
end

function request()
  local body = bodies[(i % #bodies) + 1]
  i = i + {threads}
  return wrk.format("POST", "{path}", headers, body)
end
"""
        + _DONE_HOOK
    )


_BENCH_LINE = re.compile(
    r"^BENCH requests=(\d+) duration_us=(\d+) connect=(\d+) read=(\d+) write=(\d+) "
    r"timeout=(\d+) status=(\d+) p50_us=(\d+) p99_us=(\d+)\s*$",
    re.M,
)
_TEXT_REQUESTS = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m),", re.M)
_TEXT_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_TEXT_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def parse_output(text: str) -> WrkResult:
    """Read a wrk run's stdout: the ``BENCH`` line if present, else wrk's own summary."""
    m = _BENCH_LINE.search(text)
    if m is not None:
        n, dur, conn, read, write, tmo, status, p50, p99 = (int(g) for g in m.groups())
        return WrkResult(
            requests=n,
            seconds=dur / 1e6,
            errors=conn + read + write + tmo,
            non_2xx=status,
            p50_ms=p50 / 1000,
            p99_ms=p99 / 1000,
        )
    r = _TEXT_REQUESTS.search(text)
    if r is None:
        raise WrkError(f"cannot read wrk output: {text[-500:]!r}")
    s = _TEXT_SOCKET.search(text)
    errors = sum(int(g) for g in s.groups()) if s else 0
    x = _TEXT_NON2XX.search(text)
    return WrkResult(
        requests=int(r.group(1)),
        seconds=float(r.group(2)) * _UNIT[r.group(3)],
        errors=errors,
        non_2xx=int(x.group(1)) if x else 0,
    )


def wrk_command(
    url: str,
    script: Path,
    duration: float,
    connections: int,
    threads: int = 1,
    timeout_s: float = 5.0,
    wrapper: Sequence[str] = (),
) -> list[str]:
    """The wrk command line for ``url`` (loopback only) with ``script``, for
    :func:`run_wrk` and :func:`start_wrk` alike (it takes run_wrk's parameters one for
    one, which is why the two signatures look alike).

    ``wrapper`` prefixes the command, e.g. ``nsenter`` into the network namespace of a
    server that cannot bind loopback only (``openssl ocsp``).
    """
    if not url.startswith(("http://127.0.0.1:", "http://[::1]:", "http://localhost:")):
        raise WrkError(f"refusing a non-loopback target {url}")
    binary = shutil.which("wrk")
    if binary is None:
        raise WrkError("wrk not found: install the Debian package 'wrk'")
    return [
        *wrapper, binary, "-t", str(threads), "-c", str(max(connections, threads)),
        "-d", f"{_seconds(duration)}s", "--timeout", f"{timeout_s:g}s", "-s", str(script), url,
    ]  # fmt: skip


def _seconds(duration: float) -> int:
    return max(1, round(duration))


def run_wrk(
    url: str,
    script: Path,
    duration: float,
    connections: int,
    threads: int = 1,
    timeout_s: float = 5.0,
    wrapper: Sequence[str] = (),
) -> WrkResult:
    """Run wrk (:func:`wrk_command`) and read what it measured; bounded by a hard timeout."""
    cmd = wrk_command(url, script, duration, connections, threads, timeout_s, wrapper)
    secs = _seconds(duration)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 30)
    except subprocess.TimeoutExpired as err:
        raise WrkError(f"wrk did not finish within {secs + 30}s") from err
    if proc.returncode != 0:
        raise WrkError(f"wrk exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return parse_output(proc.stdout)


def start_wrk(
    url: str, script: Path, duration: float, connections: int, threads: int = 1
) -> subprocess.Popen[bytes]:
    """Start wrk (:func:`wrk_command`) in the background as load only: its output is not
    read; the caller waits for it (``proc.wait``)."""
    cmd = wrk_command(url, script, duration, connections, threads)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
