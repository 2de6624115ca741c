"""Benchmark: load a cfssl certdb of N certificates and poll it (SQLite, PostgreSQL).

Fills a certdb with ``--rows`` rows (default 1,000,000) written the way cfssl 1.2.0
writes them (decimal serial as text, empty AKI, Go's zero time in ``revoked_at``), one in
``--revoked-every`` revoked, then on the real reactor, while a 10 ms timer ticks:

* start a :class:`~hsmocsp.sources.cfssl.CfsslSource` (the full read, in its DB thread);
* revoke one row as ``cfssl revoke`` does and time until the source reports it
  (incremental poll: only rows with a newer ``revoked_at``, plus new rowids on SQLite);
* the worst timer lateness in each phase (how long the reactor was held up) and the
  process's peak RSS.

PostgreSQL (``--postgres``) runs a scratch cluster with tests/integration/pgcluster.py.

Run: ``.venv/bin/python -m bench.certdb_load [--rows N] [--postgres]``.
"""

from __future__ import annotations

import argparse
import random
import resource
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread

from hsmocsp.sources.certdb import SCHEMA, DbConfig, connect_writable, create_schema
from tests.factories import cfssl_source
from tests.unit.test_crl import make_ca

reactor: Any = _reactor
GO_ZERO = "0001-01-01 00:00:00+00:00"


def rows(n: int, revoked_every: int) -> list[tuple[str, str, str, int, str, str]]:
    rng = random.Random(7)
    out = []
    for i in range(n):
        serial = str(rng.getrandbits(159))
        if revoked_every and i % revoked_every == 0:
            out.append((serial, "", "revoked", 1, "2026-01-02 03:04:05", "x"))
        else:
            out.append((serial, "", "good", 0, GO_ZERO, "x"))
    return out


def fill(conn: Any, data: list[tuple[str, str, str, int, str, str]], pg: bool) -> None:
    cur = conn.cursor()
    if pg:
        with cur.copy(
            "COPY certificates (serial_number, authority_key_identifier, status, reason, "
            "revoked_at, pem, expiry) FROM STDIN"
        ) as copy:
            for serial, aki, status, reason, revoked_at, pem in data:
                when = "0001-01-01 00:00:00" if revoked_at == GO_ZERO else revoked_at
                copy.write_row((serial.encode(), aki.encode(), status.encode(), reason, when,
                                pem.encode(), "2030-01-01 00:00:00"))  # fmt: skip
    else:
        cur.execute("BEGIN")
        cur.executemany(
            "INSERT INTO certificates (serial_number, authority_key_identifier, status, reason, "
            "revoked_at, pem, expiry) VALUES (?, ?, ?, ?, ?, ?, '2030-01-01 00:00:00+00:00')",
            data,
        )
        cur.execute("COMMIT")
    cur.close()


class Lateness:
    def __init__(self) -> None:
        self.worst = 0.0
        self._last = time.monotonic()
        self.loop = LoopingCall(self._tick)

    def _tick(self) -> None:
        now = time.monotonic()
        self.worst = max(self.worst, now - self._last - 0.01)
        self._last = now

    def reset(self) -> None:
        self.worst = 0.0
        self._last = time.monotonic()


async def measure(cfg: DbConfig, issuer: x509.Certificate, first_serial: str, pg: bool) -> None:
    late = Lateness()
    late.loop.start(0.01)
    source = cfssl_source(cfg, issuer, poll_interval=0.5, reactor=reactor)
    t0 = time.monotonic()
    await source.start()
    load = time.monotonic() - t0
    print(f"full load: {load:.2f} s, worst 10 ms timer lateness {late.worst * 1000:.0f} ms, "
          f"{len(list(source.known_serials(issuer)))} serials")  # fmt: skip
    late.reset()
    seen: Deferred[None] = Deferred()
    source.on_change(lambda s: None if seen.called else seen.callback(None))
    ph = "%s" if pg else "?"

    def revoke() -> None:  # as `cfssl revoke` does, from another thread (it may wait on a lock)
        conn = connect_writable(cfg)
        conn.cursor().execute(
            "UPDATE certificates SET status='revoked', revoked_at=CURRENT_TIMESTAMP, reason=1 "
            f"WHERE serial_number = {ph}",
            (first_serial.encode() if pg else first_serial,),
        )
        conn.close()

    t0 = time.monotonic()
    await deferToThread(revoke)
    await seen
    print(f"revocation seen after {time.monotonic() - t0:.2f} s (poll_interval 0.5 s), "
          f"worst timer lateness {late.worst * 1000:.0f} ms")  # fmt: skip
    late.reset()
    idle: Deferred[None] = Deferred()
    reactor.callLater(5, idle.callback, None)
    await idle
    print(f"10 idle polls: worst timer lateness {late.worst * 1000:.0f} ms")
    late.loop.stop()
    await source.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process: {rss:.0f} MB")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--revoked-every", type=int, default=100)
    p.add_argument("--postgres", action="store_true")
    args = p.parse_args()
    issuer, _ = make_ca("bench cfssl CA")
    # The first row is good (i=1): it gets revoked during the run.
    data = rows(args.rows, args.revoked_every)
    work = Path(tempfile.mkdtemp(prefix="hsmocsp-certdb-bench-"))
    cluster = None
    try:
        if args.postgres:
            from tests.integration.pgcluster import remove_cluster, start_cluster

            cluster = start_cluster()
            dsn = cluster.create_database("certdb")
            cfg = DbConfig(work / "db.json", "postgres", dsn)
        else:
            path = work / "certdb.sqlite"
            sqlite3.connect(path).close()
            cfg = DbConfig(work / "db.json", "sqlite3", str(path), sqlite_path=path)
        conn = connect_writable(cfg)
        create_schema(conn, cfg.driver)
        assert SCHEMA[cfg.driver]
        t0 = time.monotonic()
        fill(conn, data, args.postgres)
        conn.close()
        print(f"{cfg.driver}: {args.rows} rows written in {time.monotonic() - t0:.1f} s")
        d = Deferred.fromCoroutine(measure(cfg, issuer, data[1][0], args.postgres))
        d.addErrback(lambda f: f.printTraceback())
        d.addBoth(lambda _: reactor.stop())
        reactor.run()
    finally:
        if cluster is not None:
            remove_cluster(cluster)
        for f in work.iterdir():
            f.unlink()
        work.rmdir()


if __name__ == "__main__":
    main()
