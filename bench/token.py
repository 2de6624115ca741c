"""hsmocsp on a smart-card HSM: ``make bench-token`` (``python -m bench.token``).

The question (#13): can a Nitrokey HSM 2 class token, about 5 signatures per second
one at a time, keep every response of a CA with 100,000 certificates fresh at a
7-day validity, refreshed at half life? And what do clients see meanwhile?

The token is ``bench/slowtoken.c`` in front of SoftHSM: every PKCS#11 call one at a
time across processes, ``--sign-ms`` (200) per signature, so 5 signatures/s. The
responder signs with the dev PKI's P-256 key (the Nitrokey's fastest operation),
one worker (one session: the card has one reader).

Time is compressed: the run keeps the full-size ratio of work to time (serials /
(validity x refresh fraction) against the token's rate) with a validity of minutes
and proportionally fewer serials (``--validity`` 360 s -> 60 serials); the token's
speed is not compressed. The arithmetic for the full size is printed beside.

While it runs for ``--duration`` (default: two validity periods and a half minute):

* a client asks for known serials (most often from a "hot" fifth of them) at
  ``--known-rate`` requests/s and checks each answer: a successful response,
  signature verified with the responder certificate, thisUpdate <= now < nextUpdate;
* another asks for serials the CA never issued (each a live miss: the token must
  sign it while pre-signing runs) at ``--miss-rate``/s and times the answer;
* ``/metrics`` is read every second: the smallest freshness margin among stored
  responses, responses expired before re-signing, the measured token rate.

Then the responder is restarted on the same ``data_dir``: it must re-sign nothing
that is still fresh. The last line is
``fresh: <served-valid>/<requests> served valid, min margin <seconds> s, miss p99 <ms> ms``.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.client import HTTPConnection
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from bench import slowtoken
from bench.compare import _metric, load_cert, scrape_metrics, serial_request
from bench.procs import Child, Children, bench_children, free_port, wait_http
from hsmocsp.devpki import build_level1

REPO = Path(__file__).resolve().parents[1]
TWISTD = Path(sys.executable).with_name("twistd")
OCSP_CT = {"Content-Type": "application/ocsp-request"}

FULL_SERIALS = 100_000
FULL_VALIDITY = 7 * 86400
REFRESH = 0.5
BASE = 0x6000_0000  # the bench's index rows: BASE, BASE + 1, ...
MISS_BASE = 0x7700_0000  # serials the CA never issued: every request a live signature


@dataclass
class Served:
    """What the clients saw."""

    requests: int = 0
    valid: int = 0
    problems: dict[str, int] = field(default_factory=dict)
    min_margin: float = math.inf
    miss_ms: list[float] = field(default_factory=list)
    miss_during_sweep_ms: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def problem(self, what: str) -> None:
        with self.lock:
            self.problems[what] = self.problems.get(what, 0) + 1


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


def check(der: bytes, public: ec.EllipticCurvePublicKey, served: Served) -> bool:
    """A successful, verified, currently valid single response."""
    now = datetime.now(UTC)
    try:
        response = ocsp.load_der_ocsp_response(der)
    except ValueError:
        served.problem("unparsable")
        return False
    if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        served.problem(f"status {response.response_status.name}")
        return False
    try:
        public.verify(response.signature, response.tbs_response_bytes, ec.ECDSA(hashes.SHA256()))
    except Exception:
        served.problem("bad signature")
        return False
    this_update = response.this_update_utc
    next_update = response.next_update_utc
    if next_update is None or not (this_update.timestamp() - 1 <= now.timestamp()):
        served.problem("thisUpdate in the future")
        return False
    margin = next_update.timestamp() - now.timestamp()
    with served.lock:
        served.min_margin = min(served.min_margin, margin)
    if margin <= 0:
        served.problem("expired")
        return False
    return True


def paced(rate: float, stop: threading.Event) -> Iterator[None]:
    """Yields at ``rate`` per second until ``stop``."""
    interval = 1.0 / rate
    next_at = time.monotonic()
    while not stop.is_set():
        yield None
        next_at += interval
        delay = next_at - time.monotonic()
        if delay > 0:
            stop.wait(delay)
        else:
            next_at = time.monotonic()


def post(conn: HTTPConnection, body: bytes) -> bytes:
    conn.request("POST", "/ocsp", body=body, headers=OCSP_CT)
    response = conn.getresponse()
    data = response.read()
    if response.status != 200:
        raise OSError(f"HTTP {response.status}")
    return data


def known_client(
    port: int, requests: list[bytes], public: ec.EllipticCurvePublicKey, rate: float,
    served: Served, stop: threading.Event,
) -> None:  # fmt: skip
    rng = random.Random(13)
    hot = requests[: max(1, len(requests) // 5)]
    conn = HTTPConnection("127.0.0.1", port, timeout=30)
    for _ in paced(rate, stop):
        body = rng.choice(hot) if rng.random() < 0.8 else rng.choice(requests)
        try:
            der = post(conn, body)
        except OSError as err:
            served.problem(f"HTTP error {err}")
            conn.close()
            conn = HTTPConnection("127.0.0.1", port, timeout=30)
            continue
        ok = check(der, public, served)
        with served.lock:
            served.requests += 1
            served.valid += ok
    conn.close()


def miss_client(
    port: int, template: bytes, public: ec.EllipticCurvePublicKey, rate: float,
    served: Served, stop: threading.Event, sweeping: threading.Event,
) -> None:  # fmt: skip
    conn = HTTPConnection("127.0.0.1", port, timeout=30)
    serial = MISS_BASE
    for _ in paced(rate, stop):
        serial += 1
        body = serial_request(template, serial)
        during_sweep = sweeping.is_set()
        started = time.perf_counter()
        try:
            der = post(conn, body)
        except OSError as err:
            served.problem(f"miss HTTP error {err}")
            conn.close()
            conn = HTTPConnection("127.0.0.1", port, timeout=30)
            continue
        ms = (time.perf_counter() - started) * 1000
        ok = check(der, public, served)
        with served.lock:
            served.requests += 1
            served.valid += ok
            served.miss_ms.append(ms)
            if during_sweep:
                served.miss_during_sweep_ms.append(ms)
    conn.close()


@dataclass
class Watch:
    """What /metrics said over the run."""

    min_margin: float = math.inf
    max_expired: float = 0.0
    max_due: float = 0.0
    rates: list[float] = field(default_factory=list)
    needed: float = float("nan")


def watcher(url: str, watch: Watch, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        try:
            m = scrape_metrics(url)
        except (OSError, RuntimeError):
            continue
        margin = _metric(m, "hsmocsp_freshness_margin_seconds")
        if not math.isnan(margin) and margin > 0:
            watch.min_margin = min(watch.min_margin, margin)
        watch.max_expired = max(watch.max_expired, _metric(m, "hsmocsp_presign_expired"))
        watch.max_due = max(watch.max_due, _metric(m, "hsmocsp_presign_due"))
        rate = _metric(m, "hsmocsp_token_signatures_per_second")
        if not math.isnan(rate) and rate > 0:
            watch.rates.append(rate)
        needed = _metric(m, "hsmocsp_presign_needed_signatures_per_second")
        if not math.isnan(needed):
            watch.needed = needed


def hours(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def full_size(sign_rate: float) -> list[str]:
    period = FULL_VALIDITY * REFRESH
    needed = FULL_SERIALS / period
    smallest = FULL_SERIALS / (sign_rate * REFRESH)
    return [
        f"full size: {FULL_SERIALS:,} serials, validity {FULL_VALIDITY / 86400:.0f} days, "
        f"refresh at {REFRESH:g} (every {period / 86400:.1f} days)",
        f"  needed: {FULL_SERIALS:,} / {period:,.0f} s = {needed:.2f} sig/s "
        f"({needed / sign_rate:.1%} of a {sign_rate:g} sig/s token)",
        f"  first full sweep: {FULL_SERIALS:,} / {sign_rate:g} = {FULL_SERIALS / sign_rate:,.0f} s "
        f"= {hours(FULL_SERIALS / sign_rate)} (a response signed first is due again "
        f"{period / 86400:.1f} days later)",
        f"  smallest validity this token carries with these serials: "
        f"{smallest:,.0f} s = {hours(smallest)}",
    ]


def start(
    children: Children, name: str, cfg: Path, env: dict[str, str]
) -> tuple[Child, str, float]:
    port = free_port()
    started = time.monotonic()
    child = children.start(
        name,
        [str(TWISTD), "--nodaemon", "--pidfile=", "--logfile=-", "hsmocsp", "--config", str(cfg),
         "--listen", f"tcp:{port}:interface=127.0.0.1"],
        env=env, cwd=cfg.parent,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_http(child, url + "/readyz", timeout=120)
    return child, url, started


def lines(child: Child, needle: str) -> list[str]:
    text = child.log.read_text(errors="replace") if child.log.exists() else ""
    return [line for line in text.splitlines() if needle in line]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.token", description=__doc__.split("\n")[0])
    p.add_argument("--validity", type=float, default=360.0, help="seconds (compressed 7 days)")
    p.add_argument("--serials", type=int, default=0, help="default: scaled from 100,000")
    p.add_argument("--duration", type=float, default=0.0, help="default: 2 x validity + 30 s")
    p.add_argument("--sign-ms", type=float, default=200.0, help="token latency per signature")
    p.add_argument("--login-ms", type=float, default=300.0)
    p.add_argument("--known-rate", type=float, default=20.0, help="requests/s, known serials")
    p.add_argument("--miss-rate", type=float, default=1.0, help="requests/s, never-issued serials")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    if not args.serials:
        args.serials = max(10, round(FULL_SERIALS * args.validity / FULL_VALIDITY))
    if not args.duration:
        args.duration = 2 * args.validity + 30
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    children = bench_children("hsmocsp-bench-token-")
    work = children.workdir
    sign_rate = 1000.0 / args.sign_ms
    try:
        module = slowtoken.build()
        print(f"building the dev PKI in {work / 'devpki'} ...", flush=True)
        dev = build_level1(work / "devpki")
        rows = [line + "\n" for line in dev.index.read_text().splitlines() if line.strip()]
        rows += [
            f"V\t301231235959Z\t\t{BASE + i:X}\tunknown\t/CN=host{i}.example\n"
            for i in range(args.serials)
        ]
        index = work / "index.txt"
        index.write_text("".join(rows))
        cfg = work / "hsmocsp.yaml"
        cfg.write_text(f"""
data_dir: {work / "data"}
tokens:
  card:
    module: {module}
    token_label: {dev.token_label}
    pin_file: {dev.pin_file}
    workers: 1
handles:
  root:
    path: /ocsp
    issuer: {dev.ca_pem}
    responder_cert: {dev.ocsp_ec_pem}
    signer: {{token: card, key_label: {dev.ocsp_ec_key_label}}}
    source: {{kind: openssl, index: {index}, crl: {dev.crl_der}, poll_interval: 5}}
    validity: {args.validity:g}
    refresh_fraction: {REFRESH:g}
""")
        trace = work / "token-trace"
        env = dict(
            os.environ,
            SOFTHSM2_CONF=str(dev.softhsm_conf),
            PYTHONPATH=str(REPO),
            **slowtoken.env(
                sign_ms=args.sign_ms, login_ms=args.login_ms, lock=work / "token.lock",
                trace=trace, module=dev.module,
            ),
        )  # fmt: skip
        ca = load_cert(dev.ca_pem)
        public = load_cert(dev.ocsp_ec_pem).public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        template = serial_request(_template(ca), BASE)
        known = [serial_request(template, BASE + i) for i in range(args.serials)]
        n_rows = len(rows)
        print(
            f"token: one operation at a time, {args.sign_ms:g} ms per signature "
            f"({sign_rate:g} sig/s), {args.login_ms:g} ms per login; {n_rows} index rows "
            f"({args.serials} + {n_rows - args.serials} of the dev PKI), validity "
            f"{args.validity:g} s, refresh at {REFRESH:g}; run {args.duration:g} s",
            flush=True,
        )
        child, url, started = start(children, "hsmocsp", cfg, env)
        port = int(url.rsplit(":", 1)[1])
        ready_after = time.monotonic() - started
        served, watch, stop = Served(), Watch(), threading.Event()
        sweeping = threading.Event()
        sweeping.set()
        threads = [
            threading.Thread(target=known_client,
                             args=(port, known, public, args.known_rate, served, stop)),
            threading.Thread(target=miss_client,
                             args=(port, template, public, args.miss_rate, served, stop, sweeping)),
            threading.Thread(target=watcher, args=(url, watch, stop)),
        ]  # fmt: skip
        for t in threads:
            t.start()
        sweep_s: float | None = None
        try:
            deadline = time.monotonic() + args.duration
            while time.monotonic() < deadline:
                if not child.alive():
                    raise RuntimeError(f"hsmocsp exited:\n{child.tail()}")
                if sweep_s is None and lines(child, "pre-signing root: done"):
                    sweep_s = time.monotonic() - started
                    sweeping.clear()
                time.sleep(0.2)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        metrics = scrape_metrics(url)
        signatures = _metric(metrics, "hsmocsp_signatures_total")
        capacity = lines(child, "capacity of handle root")
        progress = lines(child, "pre-signing root")
        children.stop(child)
        # C_Sign with a signature (not the length query): those that took the latency.
        token_signs = [
            r for r in slowtoken.read_trace(trace)
            if r[1] == slowtoken.C_SIGN and r[3] - r[2] >= args.sign_ms * 0.9e6
        ]  # fmt: skip
        busy = sum(end - begin for _, _, begin, end in token_signs) / 1e9

        # Restart on the same data_dir: nothing still fresh is signed again.
        child2, url2, started2 = start(children, "hsmocsp-restart", cfg, env)
        restart_ready = time.monotonic() - started2
        time.sleep(3)
        m2 = scrape_metrics(url2)
        restart_signatures = _metric(m2, "hsmocsp_signatures_total")
        restart_entries = _metric(m2, "hsmocsp_cache_entries")
        children.stop(child2)
    finally:
        children.close(args.keep)

    misses = served.miss_ms
    out = [
        "",
        f"responder ready after {ready_after:.1f} s; first full sweep done "
        + (f"{sweep_s:.1f} s after start" if sweep_s is not None else "NOT within the run"),
        *[f"  log: {line.split(' ', 2)[-1]}" for line in capacity],
        *[f"  log: {line.split(' ', 2)[-1]}" for line in progress[:1] + progress[-1:]],
        f"token: {len(token_signs)} signatures in {args.duration:.0f} s of run, busy "
        f"{busy:.0f} s ({busy / max(1.0, args.duration):.0%}); measured by the responder: "
        + (f"{min(watch.rates):.2f}-{max(watch.rates):.2f} sig/s" if watch.rates else "n/a")
        + f"; needed {watch.needed:.3f} sig/s",
        f"responses expired before re-signing (max of the gauge): {watch.max_expired:.0f}; "
        f"most waiting past their refresh point: {watch.max_due:.0f}",
        f"smallest freshness margin among stored responses: {watch.min_margin:.0f} s of "
        f"{args.validity * (1 - REFRESH):.0f} s after the refresh point "
        f"(validity {args.validity:g} s); served: {served.min_margin:.0f} s",
        f"live misses: {len(misses)}, p50 {percentile(misses, 50):.0f} ms, p99 "
        f"{percentile(misses, 99):.0f} ms, max {max(misses, default=float('nan')):.0f} ms; "
        f"during the first sweep: {len(served.miss_during_sweep_ms)}, p50 "
        f"{percentile(served.miss_during_sweep_ms, 50):.0f} ms, max "
        f"{max(served.miss_during_sweep_ms, default=float('nan')):.0f} ms",
        f"not valid: {served.problems or 'none'}; responder signatures: {signatures:.0f}",
        f"restart on the same data_dir: ready after {restart_ready:.1f} s, "
        f"{restart_entries:.0f} responses held, {restart_signatures:.0f} signatures in 3 s",
        *full_size(sign_rate),
        f"bench-token took {time.monotonic() - began:.0f} s",
        f"fresh: {served.valid}/{served.requests} served valid, min margin "
        f"{min(watch.min_margin, served.min_margin):.0f} s, miss p99 "
        f"{percentile(misses, 99):.0f} ms",
    ]
    print("\n".join(out), flush=True)
    return 0


def _template(ca: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    builder = ocsp.OCSPRequestBuilder().add_certificate(ca, ca, hashes.SHA1())
    return builder.build().public_bytes(Encoding.DER)


if __name__ == "__main__":
    raise SystemExit(main())
