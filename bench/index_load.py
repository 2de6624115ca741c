"""Benchmark: parse a large OpenSSL index.txt and report time and memory.

Generates an index of ``--lines`` rows (default 1,000,000; ``--revoked`` of them
revoked with assorted reasons) with random 159-bit serials like ``openssl ca``
with ``rand_serial``, or sequential ones with ``--sequential``, then measures:

* load time of :func:`hsmocsp.sources.index.parse_index`;
* peak traced Python allocations during the load (tracemalloc, a second run,
  since tracing slows the parse) and the size of the result kept afterwards;
* the process's peak RSS (``ru_maxrss``);
* the cost of the change diff after one row is revoked and one added;
* with ``--reactor``: an :class:`OpenSSLSource` on the real reactor reloads the
  file while a 10 ms timer ticks (the index is parsed in a child process, the
  diff runs in the reactor's thread pool); the worst timer lateness shows how
  much the reactor was held up, and the largest child's peak RSS what the
  parse cost outside the serving process.

Run: ``.venv/bin/python bench/index_load.py [--lines N] [--sequential]``.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path

from hsmocsp.sources.index import parse_index

_REASONS = [
    "",
    ",keyCompromise",
    ",superseded",
    ",cessationOfOperation",
    ",holdInstruction,holdInstructionReject",
    ",keyTime,20240102030405Z",
    ",affiliationChanged",
]


def generate(path: Path, lines: int, revoked: int, sequential: bool, seed: int = 1) -> list[int]:
    """Write an index file; return its serials in file order."""
    rng = random.Random(seed)
    serials = (
        list(range(0x1000, 0x1000 + lines))
        if sequential
        else [rng.getrandbits(159) | (1 << 100) for _ in range(lines)]
    )
    revoked_at = set(rng.sample(range(lines), revoked))
    with path.open("w", encoding="ascii") as f:
        for i, serial in enumerate(serials):
            hexs = f"{serial:X}"
            if len(hexs) % 2:
                hexs = "0" + hexs
            if i in revoked_at:
                reason = _REASONS[i % len(_REASONS)]
                f.write(f"R\t301231235959Z\t240101000000Z{reason}\t{hexs}\tunknown\t/CN=host{i}\n")
            else:
                f.write(f"V\t301231235959Z\t\t{hexs}\tunknown\t/CN=host{i}.example.org\n")
    return serials


def reactor_lateness(path: Path, extra_row: str) -> tuple[float, float, int]:
    """Reload ``path`` (after appending ``extra_row``) through OpenSSLSource; timer stats.

    Returns (reload seconds, worst tick lateness seconds, ticks seen).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from twisted.internet import reactor, task
    from twisted.internet.defer import Deferred, ensureDeferred

    from tests.factories import openssl_source

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])
    now = datetime.now(UTC)
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    tick = 0.010
    worst = [0.0]
    ticks = [0]
    last = [time.perf_counter()]

    def on_tick() -> None:
        t = time.perf_counter()
        worst[0] = max(worst[0], t - last[0] - tick)
        ticks[0] += 1
        last[0] = t

    result: list[float] = []

    async def run() -> None:
        src = openssl_source(ca, path, poll_interval=3600, reactor=reactor)
        await src.start()
        with path.open("a", encoding="ascii") as f:
            f.write(extra_row)
        timer = task.LoopingCall(on_tick)
        timer.start(tick, now=False)
        last[0] = time.perf_counter()
        worst[0] = 0.0
        t0 = time.perf_counter()
        await src.check_now()
        result.append(time.perf_counter() - t0)
        timer.stop()
        await src.stop()

    def go() -> Deferred[None]:
        d = ensureDeferred(run())
        d.addErrback(lambda f: print(f.getTraceback(), file=sys.stderr))
        d.addBoth(lambda _: reactor.stop())
        return d

    reactor.callWhenRunning(go)
    reactor.run()
    return result[0] if result else float("nan"), worst[0], ticks[0]


def child_peak_rss(path: Path) -> float:
    """Peak RSS (MiB) of the index parser child run on its own.

    Read from the child's own ``VmHWM``: ``ru_maxrss`` survives ``execve``,
    so a child forked from this (large) process would report our peak.
    """
    code = (
        "import sys\n"
        "from hsmocsp.sources.indexproc import main\n"
        "main([sys.argv[1]])\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
        "sys.stderr.write(hwm.split()[1])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        check=True,
        text=True,
    )
    return int(proc.stderr.strip().splitlines()[-1]) / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--revoked", type=int, default=10_000)
    parser.add_argument("--sequential", action="store_true", help="sequential serials")
    parser.add_argument(
        "--reactor", action="store_true", help="also time a threaded reload on the reactor"
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "index.txt"
        t0 = time.perf_counter()
        serials = generate(path, args.lines, args.revoked, args.sequential)
        gen_s = time.perf_counter() - t0
        size_mb = path.stat().st_size / 1e6
        del serials
        gc.collect()
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        t0 = time.perf_counter()
        data = parse_index(path)
        load_s = time.perf_counter() - t0
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        del data
        gc.collect()
        tracemalloc.start()
        data = parse_index(path)
        kept, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        width = data.good.width

        # One revocation and one new certificate, then diff old against new.
        victim = next(iter(data.good))
        text = path.read_text(encoding="ascii")
        victim_hex = f"{victim:X}".rjust(len(f"{victim:X}") + len(f"{victim:X}") % 2, "0")
        text = text.replace(
            f"V\t301231235959Z\t\t{victim_hex}\t",
            f"R\t301231235959Z\t250101000000Z,superseded\t{victim_hex}\t",
            1,
        )
        text += "V\t301231235959Z\t\t0ABCDEF0123456\tunknown\t/CN=new\n"
        path.write_text(text, encoding="ascii")
        del text
        newer = parse_index(path)
        t0 = time.perf_counter()
        changed = data.changed_serials(newer)
        diff_s = time.perf_counter() - t0
        del data, newer
        gc.collect()
        lateness = (
            reactor_lateness(path, "V\t301231235959Z\t\t0ABCDEF0123457\tunknown\t/CN=n2\n")
            if args.reactor
            else None
        )
        child_rss = child_peak_rss(path) if args.reactor else 0.0

    kind = "sequential" if args.sequential else "random 159-bit"
    print(
        f"index: {args.lines:,} lines ({args.revoked:,} revoked, {kind} serials), {size_mb:.0f} MB"
    )
    print(f"generate:          {gen_s:6.2f} s")
    print(f"parse_index:       {load_s:6.2f} s  ({args.lines / load_s / 1e6:.2f} M lines/s)")
    print(f"peak RSS:          {rss_after:6.0f} MiB (before load {rss_before:.0f} MiB)")
    print(f"traced peak/kept:  {peak / 2**20:6.1f} / {kept / 2**20:.1f} MiB (Python allocations)")
    print(f"good set width:    {width} bytes/serial")
    n_changed = "too many" if changed is None else len(changed)
    print(f"diff after 1 revoke + 1 add: {diff_s * 1000:.1f} ms, {n_changed} serials changed")
    if lateness is not None:
        reload_s, worst_s, ticks = lateness
        print(
            f"reload on the reactor: {reload_s:.2f} s; 10 ms timer ticked {ticks}"
            f" times, worst lateness {worst_s * 1000:.1f} ms;"
            f" parser child alone: peak RSS {child_rss:.0f} MiB"
        )
    print(f"python {sys.version.split()[0]}, pid {os.getpid()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
