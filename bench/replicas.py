"""A signer and server replicas on Redis, next to the single process: ``python -m bench.replicas``.

Run by ``make bench`` (after ``bench.compare``) and alone by ``make bench-replicas``. On one
dev PKI (SoftHSM token, OpenSSL CA, an index.txt of ``--serials`` extra known serials) and a
real ``redis-server`` (:class:`~hsmocsp.devpki.redisdev.DevRedis`, a Unix socket in the work
dir), it measures (issue 11):

* **pre-signing into Redis**: a ``--role signer`` pre-signs every index row at full speed;
  the time until Redis holds every serial (``DBSIZE``), next to the raw SoftHSM signing rate
  with the same key (1 and 2 PyKCS11 processes, as bench.compare);
* **cached answers from a server replica**: ``--role server`` on the same store, with wrk
  (a) repeating one request (hot-cache hits) and (b) cycling through distinct known serials
  with a hot cache far smaller than the list (store hits: one Redis ``HGET`` per request),
  each checked on /metrics (no forward to the signer), next to the single-process cached
  path (``role: all``, one request) measured in the same run;
* **memory of a server with 1M responses in the store**: the store filled to
  ``--store-responses`` (default 1,000,000; the signer's real stored values copied under the
  keys of further serials, since the token would take minutes to sign them), then a server
  with ``hot_cache_entries`` 100,000 (``--memory-hot``) answers distinct serials until its hot
  cache is full, and two runs more (evicting); its RSS at start, when full and at the end,
  and Redis ``used_memory`` per stored response;
* **revocation under load**: two servers under wrk load, each holding the serial's ``good``
  in its hot cache; the serial is revoked in index.txt (poll_interval 0.2 s) and each
  server is polled (every 20 ms) until it answers ``revoked``: time from the index write to
  the signer answering revoked, and to the last server doing so.

Options: ``--duration`` (default 10 s per wrk run), ``--connections`` (32), ``--quick``
(2 s, 2,000 serials, 100,000 stored responses), ``--serials``, ``--store-responses``,
``--memory-hot``, ``--json FILE``, ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from cryptography.x509 import ocsp

from bench.compare import (
    OCSP_CT,
    TWISTD,
    Bench,
    BenchError,
    Report,
    Row,
    _metric,
    check_response,
    scrape_metrics,
    serial_request,
    wait_entries,
)
from bench.procs import Children, StartError, bench_children, free_port, http, wait_http
from bench.wrk import WrkError, cycle_script, post_script, start_wrk
from hsmocsp.devpki.redisdev import DevRedis

SERIAL_BASE = 0x6000_0000_0000  # the extra index rows: BASE, BASE + 1, ...
FILL_BASE = 0x6800_0000_0000  # serials only the store knows (memory row)
PRESIGN_WAIT = 900.0
MEMORY_BUDGET = 400.0  # seconds of wrk runs to fill a server's hot cache
STALL = 60.0  # seconds without a new serial in Redis: the signer is not writing to it
SERVER_HOT = 100_000  # hot_cache_entries of the memory row's server
STORE_HIT_HOT = 100  # hot_cache_entries of the store-hit row's server (<< the list)
KNOWN = 20_000  # distinct known serials wrk cycles through
PREFIX = "hsmocsp:"
ALL = ("presign", "server", "memory", "revocation")


def resp_command(path: Path, *parts: bytes) -> object:
    """One Redis command over the Unix socket ``path``; the reply (bytes, int, list, None).

    A few lines of RESP instead of redis-cli, whose output cannot carry binary values."""
    import socket

    out = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        sock.sendall(out)
        stream = sock.makefile("rb")

        def read() -> object:
            line = stream.readline()[:-2]
            kind, rest = line[:1], line[1:]
            if kind == b"+":
                return rest
            if kind == b"-":
                raise BenchError(f"redis: {rest.decode()}")
            if kind == b":":
                return int(rest)
            if kind == b"$":
                n = int(rest)
                if n < 0:
                    return None
                data = stream.read(n + 2)[:-2]
                return data
            if kind == b"*":
                return [read() for _ in range(int(rest))]
            raise BenchError(f"redis: unexpected reply {line[:40]!r}")

        return read()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for {pid}")


class ReplicaBench(Bench):
    """bench.compare's harness, plus a Redis and the signer/server roles."""

    def __init__(self, args: argparse.Namespace, work: Path, children: Children) -> None:
        super().__init__(args, work, children)
        self.redis = DevRedis(work / "redis")
        self.index = Path()
        self.n_rows = 0
        self.signer_url = ""

    # --- helpers ---------------------------------------------------------------------------

    def redis_cli(self, *argv: str, data: bytes | None = None) -> str:
        proc = subprocess.run(
            ["redis-cli", "-s", str(self.redis.socket), *argv], input=data,
            capture_output=True, timeout=600,
        )  # fmt: skip
        if proc.returncode != 0:
            raise BenchError(f"redis-cli {' '.join(argv)}: {proc.stderr.decode()[-300:]}")
        return proc.stdout.decode()

    def used_memory(self) -> int:
        info = self.redis_cli("info", "memory")
        return int(next(x for x in info.splitlines() if x.startswith("used_memory:")).split(":")[1])

    def config(
        self, name: str, hot: int = 10_000, presign_rate: float = 100_000.0, poll: float = 1.0
    ) -> Path:
        d = self.devpki
        directory = self.work / name
        directory.mkdir()
        cfg = directory / "hsmocsp.yaml"
        cfg.write_text(f"""
data_dir: {directory / "data"}
presign_rate: {presign_rate:g}
hot_cache_entries: {hot}
signer_url: {self.signer_url or "http://127.0.0.1:1"}
store: {{kind: redis, address: "unix:{self.redis.socket}", key_prefix: "{PREFIX}"}}
tokens:
  dev: {{module: {d.module}, token_label: {d.token_label}, pin_file: {d.pin_file}, workers: 2}}
handles:
  root:
    path: /ocsp
    issuer: {d.ca_pem}
    responder_cert: {d.ocsp_pem}
    signer: {{token: dev, key_label: {d.ocsp_key_label}}}
    source: {{kind: openssl, index: {self.index}, crl: {d.crl_der}, poll_interval: {poll:g}}}
    validity: 3600
""")
        return cfg

    def start_role(self, name: str, cfg: Path, role: str) -> tuple[str, int]:
        """twistd --role ``role`` on ``cfg``; (base URL, pid) once /readyz answers 200."""
        port = free_port()
        env = self.env()
        if role == "server":  # a server touches no token
            env.pop("SOFTHSM2_CONF", None)
        child = self.children.start(
            name,
            [str(TWISTD), "--nodaemon", "--pidfile=", "--logfile=-", "hsmocsp",
             "--config", str(cfg), "--listen", f"tcp:{port}:interface=127.0.0.1",
             "--role", role],
            env=env, cwd=cfg.parent,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        wait_http(child, url + "/readyz", timeout=120)
        return url, child.proc.pid

    def stop(self, name: str) -> None:
        for child in list(self.children.children):
            if child.name == name:
                self.children.stop(child)

    def known(self, count: int, base: int = SERIAL_BASE) -> list[bytes]:
        step = max(1, self.n_serials // count) if base == SERIAL_BASE else 1
        return [serial_request(self.request, base + i * step) for i in range(count)]

    @property
    def n_serials(self) -> int:
        return int(self.args.serials)

    # --- setup ------------------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        self.redis.start()
        d = self.devpki
        self.index = self.work / "index.txt"
        rows = [line + "\n" for line in d.index.read_text().splitlines() if line.strip()]
        rows += [
            f"V\t301231235959Z\t\t{SERIAL_BASE + i:X}\tunknown\t/CN=host{i}.example\n"
            for i in range(self.n_serials)
        ]
        self.index.write_text("".join(rows))
        self.n_rows = len(rows)

    # --- rows -------------------------------------------------------------------------------

    def presign(self) -> None:
        """The signer pre-signs every row into Redis; next to the raw token rate."""
        self.hsm_raw()
        cfg = self.config("signer", poll=0.2)
        t0 = time.monotonic()
        self.signer_url, _ = self.start_role("signer", cfg, "signer")
        deadline = t0 + self.args.presign_wait
        held, last_change, last_held = 0, time.monotonic(), -1
        while time.monotonic() < deadline:
            held = int(self.redis_cli("dbsize").strip() or 0)
            if held >= self.n_rows:
                break
            if held != last_held:
                last_held, last_change = held, time.monotonic()
            elif time.monotonic() - last_change > STALL:
                cached = _metric(scrape_metrics(self.signer_url), "hsmocsp_cache_entries")
                raise BenchError(f"Redis stuck at {held:,} serials for {STALL:g} s while the "
                                 f"signer holds {cached:,.0f} responses")  # fmt: skip
            time.sleep(0.2)
        secs = time.monotonic() - t0
        sigs = _metric(scrape_metrics(self.signer_url), "hsmocsp_signatures_total")
        reached = held >= self.n_rows
        note = (
            f"{self.n_rows:,} index rows in Redis {secs:.1f} s after the signer's start "
            f"({sigs:,.0f} signatures, 2 workers, presign_rate unbounded)"
            if reached
            else f"NOT REACHED: {held:,} of {self.n_rows:,} serials in Redis after {secs:.0f} s"
        )
        self.report.rows.append(Row("signer pre-signing into Redis", held / secs, note=note))
        raw = self.report.rate("raw SoftHSM C_Sign, 2 processes")
        if raw:
            self.report.extra["presign vs raw"] = f"{held / secs / raw:.2f}x of raw (2 processes)"
        print(f"  pre-signing into Redis: {note}", flush=True)

    def _require_signer(self) -> None:
        if not self.signer_url:
            raise BenchError("the signer is not running (the presign row failed)")

    def single_process(self) -> None:
        """The single-process cached path (role all, no store) on the same PKI."""
        name = "single"
        directory = self.work / name
        cfg = self.config(name)
        text = cfg.read_text()
        drop = ("store:", "signer_url:", "hot_cache")
        text = "\n".join(line for line in text.splitlines() if not line.startswith(drop))
        cfg.write_text(text + "\n")
        port = free_port()
        child = self.children.start(
            name,
            [str(TWISTD), "--nodaemon", "--pidfile=", "--logfile=-", "hsmocsp",
             "--config", str(cfg), "--listen", f"tcp:{port}:interface=127.0.0.1"],
            env=self.env(), cwd=directory,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        wait_http(child, url + "/readyz", timeout=120)
        # Measured once it has pre-signed every row, as the servers' signer has.
        entries, secs = wait_entries(url, self.n_rows, self.args.presign_wait)
        if entries < self.n_rows:
            raise BenchError(f"single process: {entries:,.0f} of {self.n_rows:,} pre-signed "
                             f"after {secs:.0f} s")  # fmt: skip
        body = http(url + "/ocsp", self.request, OCSP_CT)[2]
        check_response(body, ocsp.OCSPCertStatus.GOOD, "single process")
        r, cpu = self.wrk_with_cpu(url + "/ocsp", self.script("single", post_script(self.request)),
                                   child.proc.pid)  # fmt: skip
        self.report.add("single process (role all) cached POST", r,
                        "one request; " + cpu.describe(r.requests))  # fmt: skip
        self.stop(name)

    def server(self) -> None:
        """A server replica: hot-cache hits, then store hits."""
        self._require_signer()
        self.single_process()
        cfg = self.config("server-hot")
        url, pid = self.start_role("server-hot", cfg, "server")
        body = http(url + "/ocsp", self.request, OCSP_CT)[2]
        check_response(body, ocsp.OCSPCertStatus.GOOD, "server replica")
        before = scrape_metrics(url)
        r, cpu = self.wrk_with_cpu(url + "/ocsp", self.script("server-hot",
                                   post_script(self.request)), pid)  # fmt: skip
        after = scrape_metrics(url)
        hits = _metric(after, "hsmocsp_hotcache_hits_total") - _metric(
            before, "hsmocsp_hotcache_hits_total"
        )
        fwd = _metric(after, "hsmocsp_forwarded_total") - _metric(before, "hsmocsp_forwarded_total")
        self.report.add(
            "server replica cached POST, hot-cache hit", r,
            f"one request; {hits:,.0f} hot-cache hits, {fwd:,.0f} forwarded; "
            + cpu.describe(r.requests),
        )  # fmt: skip
        self.stop("server-hot")

        count = min(KNOWN, self.n_serials)
        reqs = self.known(count)
        cfg = self.config("server-store", hot=STORE_HIT_HOT)
        url, pid = self.start_role("server-store", cfg, "server")
        for der in (reqs[0], reqs[-1]):
            check_response(http(url + "/ocsp", der, OCSP_CT)[2], ocsp.OCSPCertStatus.GOOD,
                           "server replica, known serial")  # fmt: skip
        hexfile = self.work / "known.hex"
        hexfile.write_text("".join(r.hex() + "\n" for r in reqs))
        script = self.script("server-store", cycle_script(hexfile, "/ocsp", 1))
        before = scrape_metrics(url)
        r, cpu = self.wrk_with_cpu(url + "/ocsp", script, pid)
        after = scrape_metrics(url)
        names = ("hsmocsp_store_fetch_hits_total", "hsmocsp_hotcache_hits_total",
                 "hsmocsp_forwarded_total")  # fmt: skip
        store, hot, fwd = (_metric(after, n) - _metric(before, n) for n in names)
        self.report.add(
            "server replica cached POST, store hit", r,
            f"{count:,} distinct known serials, hot_cache_entries {STORE_HIT_HOT}: "
            f"{store:,.0f} store hits, {hot:,.0f} hot-cache hits, {fwd:,.0f} forwarded; "
            + cpu.describe(r.requests),
        )  # fmt: skip
        self.stop("server-store")

    def memory(self) -> None:
        """A server's RSS with ``--store-responses`` in Redis, bounded by its hot cache."""
        self._require_signer()
        from hsmocsp.ocsp.request import parse_request
        from hsmocsp.stores import redis as redis_store

        target = int(self.args.store_responses)
        used0, held0 = self.used_memory(), int(self.redis_cli("dbsize").strip())
        # A real stored value (the signer's), copied under further serials' keys.
        sample_key = redis_store.response_key(PREFIX, "root", SERIAL_BASE)
        values = resp_command(self.redis.socket, b"HVALS", sample_key)
        if not isinstance(values, list) or not values or not isinstance(values[0], bytes):
            raise BenchError(f"no stored response under {sample_key.decode()}")
        value = values[0]
        expire = int(time.time()) + 3600
        missing = max(0, target - held0)
        batch = bytearray()

        def cmd(*parts: bytes) -> bytes:
            out = b"*%d\r\n" % len(parts)
            for p in parts:
                out += b"$%d\r\n%s\r\n" % (len(p), p)
            return out

        for i in range(missing):
            serial = FILL_BASE + i
            cid = parse_request(serial_request(self.request, serial)).cert_ids[0]
            key = redis_store.response_key(PREFIX, "root", serial)
            batch += cmd(b"HSET", key, redis_store.field_of(cid.der), value)
            batch += cmd(b"EXPIREAT", key, str(expire).encode())
            if len(batch) > 64 << 20:
                self.redis_cli("--pipe", data=bytes(batch))
                batch.clear()
        if batch:
            self.redis_cli("--pipe", data=bytes(batch))
        held = int(self.redis_cli("dbsize").strip())
        per = (self.used_memory() - used0) / max(1, held - held0)
        self.report.rows.append(Row(
            "Redis bytes per stored response", per,
            note=f"{held:,} responses stored; used_memory {self.used_memory() / 2**20:,.0f} MiB; "
            f"stored value {len(value):,} bytes (codec), one CertID per serial",
        ))  # fmt: skip
        hot_max = int(self.args.memory_hot)
        cfg = self.config("server-mem", hot=hot_max)
        url, pid = self.start_role("server-mem", cfg, "server")
        rss0 = _rss_kib(pid)
        # wrk restarts a list at its first line each run: every run gets fresh serials, more
        # than it can send, until the hot cache is full; then two more runs evict.
        per_run, budget = 60_000, time.monotonic() + MEMORY_BUDGET
        runs, requests, full_rss, full_at = 0, 0, 0, 0.0
        extra = 0
        t0 = time.monotonic()
        while time.monotonic() < budget and extra < 2 and runs * per_run < target:
            first = FILL_BASE + runs * per_run
            hexfile = self.work / "mem.hex"
            hexfile.write_text("".join(
                serial_request(self.request, first + i).hex() + "\n" for i in range(per_run)
            ))  # fmt: skip
            script = self.script(f"server-mem-{runs}", cycle_script(hexfile, "/ocsp", 1))
            r = self.wrk(url + "/ocsp", script)
            runs, requests = runs + 1, requests + r.requests
            entries = _metric(scrape_metrics(url), "hsmocsp_hotcache_entries")
            if full_rss:
                extra += 1
            elif entries >= hot_max:
                full_rss, full_at = _rss_kib(pid), time.monotonic() - t0
        m = scrape_metrics(url)
        rss1 = _rss_kib(pid)
        entries = _metric(m, "hsmocsp_hotcache_entries")
        evicted = _metric(m, "hsmocsp_hotcache_evicted_total")
        fwd = _metric(m, "hsmocsp_forwarded_total")
        errors = _metric(m, "hsmocsp_store_fetch_errors_total")
        side = f"; {fwd:,.0f} forwarded to the signer, {errors:,.0f} store fetch errors"
        if full_rss:
            note = (
                f"MiB: {rss0 / 1024:.0f} at start, {full_rss / 1024:.0f} when the hot cache "
                f"was full ({hot_max:,} entries, after {full_at:.0f} s; ~"
                f"{(full_rss - rss0) * 1024 / hot_max:,.0f} bytes each), {rss1 / 1024:.0f} "
                f"after {requests:,} requests for distinct serials of {held:,} stored "
                f"({evicted:,.0f} evicted){side}"
            )
        else:
            note = (
                f"MiB: {rss0 / 1024:.0f} at start, {rss1 / 1024:.0f} after {requests:,} "
                f"requests for distinct serials of {held:,} stored; hot cache NOT full: "
                f"{entries:,.0f} of {hot_max:,} entries "
                f"(~{(rss1 - rss0) * 1024 / max(1, entries):,.0f} bytes each){side}"
            )
        self.report.rows.append(Row("server replica RSS (MiB), 1M-response store", rss1 / 1024,
                                    note=note))  # fmt: skip
        print(f"  {note}", flush=True)
        self.stop("server-mem")

    def revocation(self) -> None:
        """Time until a revocation in index.txt is answered by every server, under load."""
        self._require_signer()
        serial = SERIAL_BASE + self.n_serials // 2
        der = serial_request(self.request, serial)
        servers = []
        for n in (1, 2):
            cfg = self.config(f"server-rev{n}")
            url, _ = self.start_role(f"server-rev{n}", cfg, "server")
            check_response(http(url + "/ocsp", der, OCSP_CT)[2], ocsp.OCSPCertStatus.GOOD,
                           f"server {n} before the revocation")  # fmt: skip
            servers.append(url)
        # Load on both servers while we revoke (wrk in the background, one request each).
        load = []
        for n, url in enumerate(servers, 1):
            script = self.script(f"rev-load{n}", post_script(self.request))
            load.append(start_wrk(url + "/ocsp", script, max(10, int(self.args.duration)), 16))
        time.sleep(1)
        text = self.index.read_text()
        hexs = f"{serial:X}"
        old = f"V\t301231235959Z\t\t{hexs}\t"
        new = f"R\t301231235959Z\t{time.strftime('%y%m%d%H%M%SZ', time.gmtime())}\t{hexs}\t"
        if old not in text:
            raise BenchError(f"serial {hexs} not in the index")
        tmp = self.index.with_suffix(".new")
        tmp.write_text(text.replace(old, new))
        t0 = time.monotonic()
        os.replace(tmp, self.index)
        seen: dict[str, float] = {}
        targets = {"signer": self.signer_url, "server 1": servers[0], "server 2": servers[1]}
        deadline = t0 + 60
        while len(seen) < len(targets) and time.monotonic() < deadline:
            for name, url in targets.items():
                if name in seen:
                    continue
                body = http(url + "/ocsp", der, OCSP_CT)[2]
                status = ocsp.load_der_ocsp_response(body)
                if (status.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
                        and status.certificate_status == ocsp.OCSPCertStatus.REVOKED):
                    seen[name] = time.monotonic() - t0
            time.sleep(0.02)
        for proc in load:
            proc.wait(60)
        if len(seen) < len(targets):
            raise BenchError(f"revocation not seen everywhere in 60 s: {seen}")
        last = max(seen["server 1"], seen["server 2"])
        note = (
            f"index.txt rewritten (poll_interval 0.2 s) -> signer answers revoked after "
            f"{seen['signer'] * 1000:.0f} ms, server 1 {seen['server 1'] * 1000:.0f} ms, "
            f"server 2 {seen['server 2'] * 1000:.0f} ms (polled every 20 ms, both servers "
            "under wrk load, each with the serial's good answer in its hot cache)"
        )
        self.report.rows.append(Row("revocation seen by every replica (s)", last, note=note))
        print(f"  {note}", flush=True)
        for n in (1, 2):
            self.stop(f"server-rev{n}")


def format_table(report: Report) -> str:
    lines = [f"{'row':<48} {'value':>12} {'p50 ms':>8} {'p99 ms':>8}  note", "-" * 120]
    for row in report.rows:
        value = f"{row.rps:,.2f}" if row.rps is not None and row.rps < 100 else (
            f"{row.rps:,.0f}" if row.rps is not None else "-")  # fmt: skip
        p50 = f"{row.p50_ms:.2f}" if row.p50_ms is not None else ""
        p99 = f"{row.p99_ms:.2f}" if row.p99_ms is not None else ""
        lines.append(f"{row.name:<48} {value:>12} {p50:>8} {p99:>8}  {row.note}")
    single = report.rate("single process (role all) cached POST")
    for kind in ("hot-cache hit", "store hit"):
        name = f"server replica cached POST, {kind}"
        rate = report.rate(name)
        if rate and single:
            lines.append(f"  {name} / single process cached POST: {rate / single:.2f}x")
    for key, value in report.extra.items():
        lines.append(f"  {key}: {value}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--serials", type=int, default=20_000, help="extra index rows to pre-sign")
    p.add_argument("--store-responses", type=int, default=1_000_000)
    p.add_argument("--memory-hot", type=int, default=SERVER_HOT,
                   help="hot_cache_entries of the memory row's server")  # fmt: skip
    p.add_argument("--presign-wait", type=float, default=PRESIGN_WAIT)
    p.add_argument("--only", default=",".join(ALL), help=f"comma list of {','.join(ALL)}")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.serials = 2.0, 2_000
        args.store_responses, args.memory_hot = 100_000, 5_000
    args.only = {t.strip() for t in args.only.split(",") if t.strip()}
    if args.only - set(ALL):
        p.error(f"unknown rows: {', '.join(sorted(args.only - set(ALL)))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    children = bench_children("hsmocsp-bench-replicas-")
    work = children.workdir
    bench = ReplicaBench(args, work, children)
    print(f"hsmocsp replicas bench: {args.duration:g} s per run, {args.serials:,} serials, "
          f"work dir {work}", flush=True)  # fmt: skip
    steps: list[tuple[str, Callable[[], None]]] = [
        ("presign", bench.presign), ("server", bench.server), ("memory", bench.memory),
        ("revocation", bench.revocation),
    ]  # fmt: skip
    bench.report.extra["load average at start"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    try:
        bench.setup()
        for key, step in steps:
            if key not in args.only:
                continue
            print(f"== {key}", flush=True)
            try:
                step()
            except (BenchError, StartError, WrkError, OSError, subprocess.SubprocessError,
                    RuntimeError, ValueError) as err:  # fmt: skip
                bench.report.fail(key, err)
    finally:
        children.stop_all()  # the replicas before the Redis they use
        bench.redis.stop()
        children.close(args.keep)
    bench.report.extra["load average at the end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print()
    print(format_table(bench.report))
    if args.json:
        data = asdict(bench.report)
        data["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "platform": platform.platform()}  # fmt: skip
        args.json.write_text(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
