"""Side-by-side OCSP throughput on this machine: ``python -m bench.compare``.

One command builds everything in a temp dir on one dev PKI (SoftHSM token + OpenSSL
CA files, :func:`hsmocsp.devpki.build_level1`), measures every target with the same
load generator (``wrk`` with the Lua scripts of :mod:`bench.wrk`), prints a table and
the ratios against the targets, then stops every process it started (``finally``).

Targets (all on 127.0.0.1, free ports):

* hsmocsp cached path, POST and GET (one warm request first, checked to be a
  successful OCSP response);
* ``openssl ocsp`` responder, live signing with the same HSM key through the pkcs11
  engine, ``-multi 2``; run inside a private network namespace (``unshare -n``; wrk
  joins it with ``nsenter``) because its ``-port`` binds every interface;
* ``cfssl ocspserve`` serving hsmocsp's own signed response (identical bytes);
* OpenBao's built-in ``/v1/pki/ocsp`` (live signing, RSA-2048 CA key in Vault storage);
* nginx serving the same bytes as a static file (the box's HTTP ceiling);
* raw SoftHSM signing rate (PyKCS11 loop, 1 and 2 processes) against hsmocsp's
  cache-miss rate with 1 and 2 workers (distinct unknown serials, so every request signs).
* ``--only slow`` (opt-in, minutes): an RSA-4096 token key and a 100k-serial index;
  hsmocsp pre-signs every row (time measured), then wrk cycles through 20,000 distinct
  known serials (checked on /metrics: no signature, no cache miss, no non-successful
  status during the run), a restart restores everything from ``data_dir``; next to
  ``openssl ocsp``, hsmocsp's cache-miss path and the raw token rate with the same key.

Options: ``--duration`` seconds per target (default 10), ``--connections`` (32),
``--quick`` (2 s per target, small indexes), ``--only`` to pick targets (default: all
but ``slow``), ``--presign-wait`` (bound on the slow pass's pre-signing wait), ``--profile``
(a cProfile of the hsmocsp cached path via twistd's ``--profile``), ``--json`` to save.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import pstats
import resource
import shutil
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from http.client import HTTPConnection
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509 import ocsp

from bench.hsm_rate import HsmKey, signing_rate
from bench.procs import (
    Child,
    Children,
    StartError,
    bench_children,
    cpu_seconds,
    free_port,
    http,
    wait_http,
    wait_tcp,
)
from bench.wrk import WrkError, WrkResult, cycle_script, get_script, post_script, run_wrk
from hsmocsp.devpki import DevPki, build_level1

REPO = Path(__file__).resolve().parents[1]
TWISTD = Path(sys.executable).with_name("twistd")
OCSP_CT = {"Content-Type": "application/ocsp-request"}

#: (numerator row, denominator row, target ratio) - from the project brief.
TARGETS: tuple[tuple[str, str, float], ...] = (
    ("hsmocsp cached POST", "cfssl ocspserve POST", 0.5),
    ("hsmocsp cached POST", "openssl ocsp -multi 2 POST", 3.0),
    ("hsmocsp cached POST", "OpenBao /v1/pki/ocsp POST", 10.0),
    ("hsmocsp cache-miss, 1 worker", "raw SoftHSM C_Sign, 1 process", 0.85),
    ("hsmocsp cache-miss, 2 workers", "raw SoftHSM C_Sign, 2 processes", 0.85),
)
SLOW_SUFFIX = " [RSA-4096, 100k index]"
SLOW_SERIAL_BASE = 0x7000_0000_0000  # the slow pass's index rows: BASE, BASE + 1, ...
PRESIGN_RATE = 100_000.0  # signatures/s: as fast as the token goes
PRESIGN_WAIT = 900.0  # seconds to wait for pre-signing every index row
RESTORE_WAIT = 300.0  # seconds to wait for a restart to restore them from data_dir
SMALL_KNOWN = 100  # distinct known serials whose responses fit in the CPU caches
KNOWN_REQUESTS = 20_000  # distinct known serials wrk cycles through
KNOWN_ROW = "hsmocsp pre-signed POST, distinct known serials"
ALL_TARGETS = ("hsmocsp", "openssl", "cfssl", "openbao", "nginx", "miss", "index", "slow")
#: ``slow`` (pre-signing 100k serials with an RSA-4096 key) takes minutes: opt-in.
DEFAULT_TARGETS = tuple(t for t in ALL_TARGETS if t != "slow")


class BenchError(RuntimeError):
    """A target could not be set up or answered wrongly (reported in its row)."""


@dataclass
class Row:
    name: str
    rps: float | None
    p50_ms: float | None = None
    p99_ms: float | None = None
    requests: int = 0
    errors: int = 0
    note: str = ""


@dataclass(frozen=True)
class CpuUse:
    """CPU seconds used during one wrk run: the reactor, its child processes, wrk."""

    wall: float
    reactor: float
    workers: float
    wrk: float

    def describe(self, requests: int) -> str:
        """Per-request CPU by process, and the rate the box's cores would allow at most."""
        if requests <= 0:
            return "no requests"
        per = [x / requests * 1e6 for x in (self.reactor, self.workers, self.wrk)]
        cores = os.cpu_count() or 1
        bound = cores / (sum(per) / 1e6)
        return (
            f"CPU per request: reactor {per[0]:.0f} us, signing workers {per[1]:.0f} us,"
            f" wrk {per[2]:.0f} us; {cores} cores allow at most {bound:,.0f} req/s"
            f" (busy {sum((self.reactor, self.workers, self.wrk)) / self.wall / cores:.0%})"
        )


@dataclass
class Report:
    duration: float
    connections: int
    threads: int
    rows: list[Row] = field(default_factory=list)
    extra: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, result: WrkResult, note: str = "") -> Row:
        if not result.ok:
            note = (note + f"; {result.non_2xx} non-2xx answers").lstrip("; ")
        row = Row(
            name, result.rps, result.p50_ms, result.p99_ms, result.requests, result.errors, note
        )
        self.rows.append(row)
        print(f"  {name}: {result.rps:,.0f} req/s", flush=True)
        return row

    def fail(self, name: str, err: BaseException) -> None:
        self.rows.append(Row(name, None, note=f"FAILED: {err}".splitlines()[0][:200]))
        print(f"  {name}: FAILED: {err}", flush=True)

    def rate(self, name: str) -> float | None:
        for row in self.rows:
            if row.name == name:
                return row.rps
        return None


# --- requests and checks --------------------------------------------------------------


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def ocsp_request(cert: x509.Certificate, issuer: x509.Certificate) -> bytes:
    """A one-CertID SHA-1 request without nonce (what RFC 5019 clients send; cacheable)."""
    from cryptography.hazmat.primitives.serialization import Encoding

    builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1())
    return builder.build().public_bytes(Encoding.DER)


def unknown_requests(template: bytes, first_serial: int, count: int) -> list[bytes]:
    """``count`` requests for serials ``first_serial...`` under the template's issuer."""
    from cryptography.hazmat.primitives.serialization import Encoding

    req = ocsp.load_der_ocsp_request(template)
    out = []
    for serial in range(first_serial, first_serial + count):
        b = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
            req.issuer_name_hash, req.issuer_key_hash, serial, hashes.SHA1()
        )
        out.append(b.build().public_bytes(Encoding.DER))
    return out


def serial_request(template: bytes, serial: int) -> bytes:
    """A one-CertID SHA-1 request for ``serial`` under the template's issuer."""
    return unknown_requests(template, serial, 1)[0]


def scrape_metrics(url: str) -> dict[str, float]:
    """``/metrics`` as ``{'name{labels}': value}`` (Prometheus text format, no comments)."""
    status, _, body = http(url + "/metrics", timeout=10)
    if status != 200:
        raise BenchError(f"/metrics answered HTTP {status}")
    out: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            try:
                out[key] = float(value)
            except ValueError:
                continue
    return out


def _metric(metrics: dict[str, float], name: str) -> float:
    """The sum of ``name`` over its label sets (one handle here)."""
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


def _non_successful(metrics: dict[str, float]) -> float:
    """OCSP responses sent with a status other than successful (tryLater and the rest)."""
    return sum(
        v for k, v in metrics.items()
        if k.startswith("hsmocsp_responses_total{") and 'status="successful"' not in k
    )  # fmt: skip


def wait_entries(
    url: str, want: int, timeout: float, t0: float | None = None
) -> tuple[float, float]:
    """Poll ``hsmocsp_cache_entries`` until >= ``want``; (entries, seconds since t0)."""
    t0 = time.monotonic() if t0 is None else t0
    entries = 0.0
    while True:
        entries = _metric(scrape_metrics(url), "hsmocsp_cache_entries")
        elapsed = time.monotonic() - t0
        if entries >= want or elapsed >= timeout:
            return entries, elapsed
        time.sleep(0.5 if elapsed < 10 else 2)


def check_response(der: bytes, expect: ocsp.OCSPCertStatus | None, what: str) -> None:
    """Raise :class:`BenchError` unless ``der`` is a successful response with ``expect``."""
    try:
        resp = ocsp.load_der_ocsp_response(der)
    except ValueError as err:
        raise BenchError(f"{what}: not an OCSP response ({err}): {der[:80]!r}") from err
    if resp.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise BenchError(f"{what}: response status {resp.response_status.name}")
    if expect is not None and resp.certificate_status != expect:
        raise BenchError(f"{what}: cert status {resp.certificate_status.name}, not {expect.name}")


def keepalive_check(url: str, der: bytes, gpath: str, expected: bytes) -> None:
    """After a run: POST, GET, POST on ONE keep-alive connection all return ``expected``.

    wrk only counts status codes; this catches a server that answers 200 with wrong
    bytes on reused connections (fast paths that parse HTTP themselves).
    """
    host, port = urllib.parse.urlsplit(url).netloc.rsplit(":", 1)
    conn = HTTPConnection(host, int(port), timeout=30)
    try:
        for method, path, body in (
            ("POST", "/ocsp", der),
            ("GET", gpath, None),
            ("POST", "/ocsp", der),
        ):
            headers = OCSP_CT if body is not None else {}
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            got = resp.read()
            if resp.status != 200 or got != expected:
                raise BenchError(f"keep-alive {method}: HTTP {resp.status}, other bytes")
    finally:
        conn.close()


def get_path(prefix: str, der: bytes) -> str:
    """``<prefix>/<url-encoded base64>`` as RFC 5019 GET clients send it."""
    return prefix.rstrip("/") + "/" + urllib.parse.quote(base64.b64encode(der).decode(), safe="")


# --- the bench itself --------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, children: Children) -> None:
        self.args = args
        self.work = work
        self.children = children
        self.report = Report(args.duration, args.connections, args.threads)
        self.dev: DevPki | None = None
        #: (token key label, responder certificate, index.txt) used by every signer.
        self.signer: tuple[str, Path, Path] = ("", Path(), Path())
        self.suffix = ""  # appended to row names (the slow-signer pass)
        self.request = b""
        self.response = b""

    # helpers
    def script(self, name: str, text: str) -> Path:
        path = self.work / f"{name}.lua"
        path.write_text(text)
        return path

    def wrk(
        self, url: str, script: Path, wrapper: list[str] | None = None,
        connections: int | None = None,
    ) -> WrkResult:  # fmt: skip
        conns = connections or self.args.connections
        return run_wrk(
            url, script, self.args.duration, conns, self.args.threads, wrapper=wrapper or ()
        )

    def wrk_with_cpu(self, url: str, script: Path, server: int) -> tuple[WrkResult, CpuUse]:
        """:meth:`wrk`, and the CPU time the server, its children and wrk used meanwhile."""
        own0, kids0 = cpu_seconds(server)
        wrk0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        r = self.wrk(url, script)
        wall = time.monotonic() - t0
        wrk1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        own1, kids1 = cpu_seconds(server)
        workers = sum(kids1.get(pid, 0.0) - kids0.get(pid, 0.0) for pid in kids1)
        wrk_cpu = (wrk1.ru_utime + wrk1.ru_stime) - (wrk0.ru_utime + wrk0.ru_stime)
        return r, CpuUse(wall, own1 - own0, workers, wrk_cpu)

    @property
    def devpki(self) -> DevPki:
        assert self.dev is not None
        return self.dev

    def env(self) -> dict[str, str]:
        return dict(os.environ, SOFTHSM2_CONF=str(self.devpki.softhsm_conf), PYTHONPATH=str(REPO))

    def hsmocsp_config(self, name: str, workers: int, presign_rate: float | None = None) -> Path:
        """A config in ``<work>/<name>/`` (data_dir inside it); default presign_rate if None."""
        d = self.devpki
        key_label, cert, index = self.signer
        directory = self.work / name
        directory.mkdir()
        cfg = directory / "hsmocsp.yaml"
        presign = "" if presign_rate is None else f"presign_rate: {presign_rate:g}\n"
        cfg.write_text(f"""
data_dir: {directory / "data"}
{presign}tokens:
  dev:
    module: {d.module}
    token_label: {d.token_label}
    pin_file: {d.pin_file}
    workers: {workers}
handles:
  root:
    path: /ocsp
    issuer: {d.ca_pem}
    responder_cert: {cert}
    signer: {{token: dev, key_label: {key_label}}}
    source: {{kind: openssl, index: {index}, crl: {d.crl_der}, poll_interval: 5}}
    validity: 3600
""")
        return cfg

    def start_hsmocsp(
        self, name: str, workers: int, profile: Path | None = None,
        presign_rate: float | None = None,
    ) -> str:  # fmt: skip
        return self.run_hsmocsp(name, self.hsmocsp_config(name, workers, presign_rate), profile)

    def run_hsmocsp(
        self, name: str, cfg: Path, profile: Path | None = None, http_workers: int = 1
    ) -> str:
        """Start twistd on an existing config; the base URL once /readyz answers 200."""
        port = free_port()
        prof = [f"--profile={profile}", "--profiler=cprofile", "--savestats"] if profile else []
        child = self.children.start(
            name,
            [str(TWISTD), "--nodaemon", "--pidfile=", "--logfile=-", *prof, "hsmocsp",
             "--config", str(cfg), "--listen", f"tcp:{port}:interface=127.0.0.1",
             "--workers", str(http_workers)],
            env=self.env(), cwd=cfg.parent,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        wait_http(child, url + "/readyz")
        return url

    # targets
    def setup(self) -> None:
        print(f"building the dev PKI in {self.work / 'devpki'} ...", flush=True)
        self.dev = build_level1(self.work / "devpki")
        self.signer = (self.dev.ocsp_key_label, self.dev.ocsp_pem, self.dev.index)
        self.request = ocsp_request(load_cert(self.dev.good_pem), load_cert(self.dev.ca_pem))

    def hsmocsp_cached(self) -> None:
        url = self.start_hsmocsp("hsmocsp", workers=2)
        status, _, body = http(url + "/ocsp", self.request, OCSP_CT)
        if status != 200:
            raise BenchError(f"hsmocsp POST answered HTTP {status}")
        check_response(body, ocsp.OCSPCertStatus.GOOD, "hsmocsp POST")
        self.response = body
        (self.work / "resp.der").write_bytes(body)
        gpath = get_path("/ocsp", self.request)
        status, _, gbody = http(url + gpath)
        check_response(gbody, ocsp.OCSPCertStatus.GOOD, "hsmocsp GET")
        note = "same bytes as POST" if gbody == body else "GET bytes differ from POST"
        r = self.wrk(url + "/ocsp", self.script("post", post_script(self.request)))
        self.report.add("hsmocsp cached POST", r, "1 process (reactor), 2 signer workers idle")
        r = self.wrk(url + gpath, self.script("get", get_script(gpath)))
        self.report.add("hsmocsp cached GET", r, note)
        keepalive_check(url, self.request, gpath, body)
        for child in list(self.children.children):
            if child.name == "hsmocsp":
                self.children.stop(child)

        # --workers 2: the main process and one front on the same port (SO_REUSEPORT).
        name = "hsmocsp-workers2"
        url = self.run_hsmocsp(name, self.hsmocsp_config(name, workers=2), http_workers=2)
        for _ in range(3):  # whichever process takes it, the main one signs; fronts get a copy
            check_response(http(url + "/ocsp", self.request, OCSP_CT)[2],
                           ocsp.OCSPCertStatus.GOOD, "hsmocsp --workers 2")  # fmt: skip
        time.sleep(1)
        for label, script in (
            ("POST", self.script("post-w2", post_script(self.request))),
            ("GET", self.script("get-w2", get_script(gpath))),
        ):
            before = _metric(scrape_metrics(url), "hsmocsp_front_answers_total")
            target = url + ("/ocsp" if label == "POST" else gpath)
            r = self.wrk(target, script)
            time.sleep(1.5)  # fronts report their counts once a second
            fronts = _metric(scrape_metrics(url), "hsmocsp_front_answers_total") - before
            self.report.add(
                f"hsmocsp cached {label}, --workers 2", r,
                f"main process + 1 front on one port; the front answered {fronts:,.0f}"
                f" of {r.requests:,}",
            )  # fmt: skip
        for child in list(self.children.children):
            if child.name == name:
                self.children.stop(child)

    def profile_cached(self) -> None:
        """cProfile of the cached POST path (twistd --profile)."""
        r = self._profiled("hsmocsp-prof-cached", post_script(self.request), None)
        self.report.add("hsmocsp cached POST under cProfile", r, "profiler overhead included")

    def profile_miss(self) -> None:
        """cProfile of the reactor process on the cache-miss path (workers are not profiled)."""
        reqs = unknown_requests(
            self.request, 0x5EED_2000_0000, int(5000 * self.args.duration + 2000)
        )
        hexfile = self.work / "miss-prof.hex"
        hexfile.write_text("".join(r.hex() + "\n" for r in reqs))
        r = self._profiled(
            "hsmocsp-prof-miss", cycle_script(hexfile, "/ocsp", self.args.threads), 1, 0
        )
        note = "1 worker, presign_rate 0; profiler overhead"
        if r.requests > len(reqs) - 1:
            note += f"; WRAPPED after {len(reqs) - 1} requests (some were cache hits)"
        self.report.add("hsmocsp cache-miss under cProfile", r, note)

    def _profiled(
        self, name: str, script_text: str, workers: int | None, presign_rate: float | None = None
    ) -> WrkResult:
        stats = self.work / f"{name}.pstats"
        url = self.start_hsmocsp(
            name, workers=workers or 1, profile=stats, presign_rate=presign_rate
        )
        body = http(url + "/ocsp", self.request, OCSP_CT)[2]
        check_response(body, ocsp.OCSPCertStatus.GOOD, name)
        r = self.wrk(url + "/ocsp", self.script(name, script_text))
        for child in list(self.children.children):
            if child.name == name:
                self.children.stop(child)
        if not stats.exists():
            raise BenchError(f"{name}: twistd wrote no profile")
        out = self.work / f"{name}.txt"
        with out.open("w") as fh:
            p = pstats.Stats(str(stats), stream=fh)
            p.sort_stats("tottime").print_stats(30)
            p.sort_stats("cumulative").print_stats(30)
        text = out.read_text()
        print(text[:5000])
        self.report.extra[name] = text
        return r

    def openssl_ocsp(self) -> None:
        if os.geteuid() != 0:
            raise BenchError(
                "openssl ocsp -port binds every interface; the harness isolates it in a "
                "network namespace (unshare -n), which needs root: run as root, or leave "
                "'openssl' out of --only"
            )
        d = self.devpki
        key_label, cert, index = self.signer
        port = free_port()
        uri = f"org.openssl.engine:pkcs11:{d.key_uri(key_label)}"
        inner = (
            "ip link set lo up && exec openssl ocsp "
            f"-index {index} -CA {d.ca_pem} -rsigner {cert} "
            f"-rkey '{uri}' -passin file:{d.pin_file} -port {port} -multi 2 -nmin 60"
        )
        env = dict(self.env(), OPENSSL_CONF=str(d.openssl_cnf))
        # No new session: openssl -multi makes its own process group (pgid = this pid).
        child = self.children.start(
            "openssl-ocsp", ["unshare", "-n", "sh", "-c", inner], env=env, new_session=False
        )
        wrapper = ["nsenter", "-t", str(child.proc.pid), "-n"]
        url = f"http://127.0.0.1:{port}"
        # Readiness = a real request: a connection closed without a request (a TCP probe)
        # left openssl ocsp -multi 2 answering nothing afterwards in our tests.
        body = _post_in_ns(child, wrapper, url, self.request)
        check_response(body, ocsp.OCSPCertStatus.GOOD, "openssl ocsp")
        r = self.wrk(url + "/", self.script("post-openssl", post_script(self.request)), wrapper)
        self.report.add(
            "openssl ocsp -multi 2 POST" + self.suffix, r,
            "live signing, same HSM key via pkcs11 engine; 1 request per connection",
        )  # fmt: skip

    def cfssl(self) -> None:
        if not self.response:
            raise BenchError("needs hsmocsp's response (run the hsmocsp target)")
        binary = shutil.which("cfssl")
        if binary is None:
            raise BenchError("cfssl not found: install the Debian package 'golang-cfssl'")
        responses = self.work / "cfssl-responses.b64"
        responses.write_text(base64.b64encode(self.response).decode() + "\n")
        port = free_port()
        child = self.children.start(
            "cfssl",
            [binary, "ocspserve", "-address", "127.0.0.1", "-port", str(port),
             "-responses", str(responses), "-loglevel", "3"],
        )  # fmt: skip
        wait_tcp(child, port)
        url = f"http://127.0.0.1:{port}"
        status, _, body = http(url + "/", self.request, OCSP_CT)
        if body != self.response:
            raise BenchError(f"cfssl answered HTTP {status} with other bytes: {body[:80]!r}")
        r = self.wrk(url + "/", self.script("post-cfssl", post_script(self.request)))
        self.report.add("cfssl ocspserve POST", r, "pre-signed, identical bytes")
        # No GET: cfssl 1.2.0 (Debian) base64-decodes the whole path including its leading
        # '/', so every RFC 5019 GET gets HTTP 400 (checked by hand; see docs/performance.md).

    def openbao(self) -> None:
        from hsmocsp.devpki.bao import BaoServer

        server = BaoServer()
        self.children.hooks.append(server.stop)
        server.start(self.work / "bao")
        api = server.api()
        api.enable_pki("pki")
        root = api.generate_root("pki", key_type="rsa")
        api.create_role("pki", "server")
        leaf = api.issue("pki", "server", common_name="bench.example")
        issuer = x509.load_pem_x509_certificate(root["certificate"].encode())
        cert = x509.load_pem_x509_certificate(leaf["certificate"].encode())
        req = ocsp_request(cert, issuer)
        url = f"{server.address}/v1/pki/ocsp"
        status, _, body = http(url, req, OCSP_CT)
        check_response(body, ocsp.OCSPCertStatus.GOOD, f"OpenBao (HTTP {status})")
        r = self.wrk(url, self.script("post-bao", post_script(req)))
        self.report.add(
            "OpenBao /v1/pki/ocsp POST", r,
            "live signing, RSA-2048 CA key in bao storage (dev server, in-memory)",
        )  # fmt: skip

    def nginx(self) -> None:
        if not self.response:
            raise BenchError("needs hsmocsp's response (run the hsmocsp target)")
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(binary).exists():
            raise BenchError("nginx not found: install the Debian package 'nginx-light'")
        root = self.work / "nginx"
        root.mkdir()
        (root / "www").mkdir()
        (root / "www" / "resp.der").write_bytes(self.response)
        # nginx workers run as 'nobody' when started by root: let them read the files.
        for p in (self.work, root, root / "www"):
            p.chmod(0o755)
        (root / "www" / "resp.der").chmod(0o644)
        port = free_port()
        conf = root / "nginx.conf"
        conf.write_text(f"""
daemon off;
master_process on;
worker_processes 2;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {root}/client_body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        root {root}/www;
        location / {{ default_type application/ocsp-response; }}
    }}
}}
""")
        child = self.children.start(
            "nginx", [binary, "-p", str(root), "-c", str(conf), "-e", str(root / "error.log")]
        )
        url = f"http://127.0.0.1:{port}/resp.der"
        wait_http(child, url)
        if http(url)[2] != self.response:
            raise BenchError("nginx served other bytes")
        r = self.wrk(url, self.script("get-nginx", get_script("/resp.der")))
        self.report.add("nginx static file GET", r, "2 worker processes; HTTP ceiling of the box")

    def hsm_raw(self) -> None:
        d = self.devpki
        key = HsmKey(d.module, str(d.softhsm_conf), d.token_label, self.signer[0], d.pin())
        for n in (1, 2):
            rate = signing_rate(key, n, self.args.duration)
            noun = "process" if n == 1 else "processes"
            self.report.rows.append(
                Row(f"raw SoftHSM C_Sign, {n} {noun}{self.suffix}", rate,
                    note=f"PyKCS11 loop, CKM_SHA256_RSA_PKCS, key {self.signer[0]}")
            )  # fmt: skip
            print(f"  raw SoftHSM {n} {noun}: {rate:,.0f} sig/s", flush=True)

    def cache_miss(self) -> None:
        expected = 5000 * self.args.duration + 2000  # generous: rate x time, plus slack
        offset = 0x100_0000_0000 if self.suffix else 0
        for n, base in ((1, 0x5EED_0000_0000 + offset), (2, 0x5EED_1000_0000 + offset)):
            reqs = unknown_requests(self.request, base, int(expected))
            hexfile = self.work / f"miss-{n}.hex"
            hexfile.write_text("".join(r.hex() + "\n" for r in reqs[1:]))
            name = f"hsmocsp-miss-{n}{'-slow' if self.suffix else ''}"
            # presign_rate 0: this row measures live signing, nothing else uses the token.
            url = self.start_hsmocsp(name, workers=n, presign_rate=0)
            body = http(url + "/ocsp", reqs[0], OCSP_CT)[2]
            check_response(body, ocsp.OCSPCertStatus.UNKNOWN, "hsmocsp unknown serial")
            script = self.script(name, cycle_script(hexfile, "/ocsp", self.args.threads))
            server = next(c for c in self.children.children if c.name == name).proc.pid
            r, cpu = self.wrk_with_cpu(url + "/ocsp", script, server)
            noun = "worker" if n == 1 else "workers"
            note = "distinct unknown serials: every request signs"
            if r.requests > len(reqs) - 1:
                note += f"; WRAPPED after {len(reqs) - 1} requests (some were cache hits)"
            note += "; " + cpu.describe(r.requests)
            self.report.add(f"hsmocsp cache-miss, {n} {noun}{self.suffix}", r, note)
            self.report.extra[f"cpu {name}"] = cpu.describe(r.requests)
            for child in list(self.children.children):
                if child.name == name:
                    self.children.stop(child)

    def slow_signer(self) -> None:
        """RSA-4096 token key and a 100k-serial index: pre-signed hsmocsp vs live signers.

        hsmocsp runs with ``presign_rate`` high and a ``data_dir``: the time to pre-sign
        every index row is measured (``hsmocsp_cache_entries`` polled on /metrics), then
        wrk cycles through requests for many distinct KNOWN serials, which must all be
        cache hits (``hsmocsp_signatures_total`` unchanged, no non-successful OCSP status),
        next to the single-request cached rate. A restart on the same ``data_dir`` must
        serve every row from the SQLite store without signing. Then the live signers
        (``openssl ocsp``, hsmocsp's own cache-miss path) and the raw token rate with
        the same key.
        """
        from hsmocsp.devpki import opensslca, softhsm

        d = self.devpki
        label = "bench-ocsp-4096"
        softhsm.ensure_keypair(
            d.softhsm_conf, d.module, d.pin(), label, "41", "rsa:4096", token_label=d.token_label
        )
        cert = d.root_dir / "ocsp-4096.pem"
        opensslca.ensure_ocsp_signer(d, label, "hsmocsp bench OCSP signer RSA-4096", cert)
        n_serials = self.args.serials or (2_000 if self.args.quick else 100_000)
        index = self.work / "index-100k.txt"
        rows = [line + "\n" for line in d.index.read_text().splitlines() if line.strip()]
        rows += [
            f"V\t301231235959Z\t\t{SLOW_SERIAL_BASE + i:X}\tunknown\t/CN=host{i}.example\n"
            for i in range(n_serials)
        ]
        index.write_text("".join(rows))
        self.signer, self.suffix = (label, cert, index), SLOW_SUFFIX
        try:
            self._presigned(len(rows), n_serials)
            self.children.stop_all()
            for step in (self.openssl_ocsp, self.hsm_raw, self.cache_miss):
                try:
                    step()
                except (BenchError, StartError, WrkError, OSError, RuntimeError) as err:
                    self.report.fail(step.__name__ + self.suffix, err)
                finally:
                    self.children.stop_all()
        finally:
            self.signer = (d.ocsp_key_label, d.ocsp_pem, d.index)
            self.suffix = ""

    def _presigned(self, n_rows: int, n_serials: int) -> None:
        """Pre-sign time, distinct-known-serial and single-request cached rates, restart."""
        name = "hsmocsp-presign"
        cfg = self.hsmocsp_config(name, workers=2, presign_rate=PRESIGN_RATE)
        t0 = time.monotonic()
        url = self.run_hsmocsp(name, cfg)
        ready_s = time.monotonic() - t0
        entries, secs = wait_entries(url, n_rows, self.args.presign_wait)
        m = scrape_metrics(url)
        sigs = _metric(m, "hsmocsp_signatures_total")
        reached = entries >= n_rows
        note = (
            f"{n_rows:,} index rows signed in {secs:.0f} s ({sigs:,.0f} signatures; "
            f"/readyz after {ready_s:.1f} s; presign_rate {PRESIGN_RATE:g}, 2 workers)"
            if reached
            else f"NOT REACHED: {entries:,.0f} of {n_rows:,} cached after {secs:.0f} s"
        )
        self.report.rows.append(Row("hsmocsp pre-signing" + self.suffix, sigs / secs, note=note))
        print(f"  pre-signing: {note}", flush=True)
        self.report.extra["presign"] = note

        # Distinct known serials spread over the whole index range (every k-th row), so a
        # partial pre-sign cannot hide behind the first serials of the sweep.
        count = min(KNOWN_REQUESTS, n_serials)
        step = max(1, n_serials // count)
        reqs = [
            serial_request(self.request, SLOW_SERIAL_BASE + i) for i in range(0, step * count, step)
        ]
        for der in (reqs[0], reqs[-1]):
            status, _, body = http(url + "/ocsp", der, OCSP_CT)
            check_response(body, ocsp.OCSPCertStatus.GOOD, f"known serial (HTTP {status})")
        hexfile = self.work / "known.hex"
        hexfile.write_text("".join(r.hex() + "\n" for r in reqs))
        script = self.script("known", cycle_script(hexfile, "/ocsp", 1))
        # Pass 1: request bytes the responder has never seen (the CertIDs are pre-signed);
        # pass 2: the same list again, on new connections.
        server = next(c for c in self.children.children if c.name == name).proc.pid
        for label in ("first pass", "second pass"):
            before = scrape_metrics(url)
            r, cpu = self.wrk_with_cpu(url + "/ocsp", script, server)
            after = scrape_metrics(url)
            sigs_name, miss_name = "hsmocsp_signatures_total", "hsmocsp_cache_misses_total"
            signed = _metric(after, sigs_name) - _metric(before, sigs_name)
            bad = _non_successful(after) - _non_successful(before)
            miss = _metric(after, miss_name) - _metric(before, miss_name)
            ok = signed == 0 and bad == 0 and miss == 0
            wrapped = f"list wrapped {r.requests / count:.1f}x" if r.requests > count else "no wrap"
            self.report.add(
                f"{KNOWN_ROW}, {label}{self.suffix}", r,
                f"{count:,} distinct known serials ({wrapped}); during the run {signed:,.0f} "
                f"signatures, {miss:,.0f} cache misses, {bad:,.0f} non-successful: "
                + ("all cache hits" if ok else "NOT ALL HITS") + "; " + cpu.describe(r.requests),
            )  # fmt: skip
        # The same code path over a list small enough to stay in the CPU caches: tells
        # the cost of touching many different responses from the cost of the path.
        small = self.work / "known-small.hex"
        small.write_text("".join(r.hex() + "\n" for r in reqs[:SMALL_KNOWN]))
        script = self.script("known-small", cycle_script(small, "/ocsp", 1))
        r, cpu = self.wrk_with_cpu(url + "/ocsp", script, server)
        self.report.add(
            f"hsmocsp pre-signed POST, {SMALL_KNOWN} distinct known serials{self.suffix}", r,
            "the first serials of the list above, cycled; " + cpu.describe(r.requests),
        )  # fmt: skip
        status, _, body = http(url + "/ocsp", self.request, OCSP_CT)
        check_response(body, ocsp.OCSPCertStatus.GOOD, "hsmocsp RSA-4096")
        script = self.script("post-slow", post_script(self.request))
        r, cpu = self.wrk_with_cpu(url + "/ocsp", script, server)
        self.report.add(
            "hsmocsp cached POST" + self.suffix, r,
            "one request, pre-signed; " + cpu.describe(r.requests),
        )  # fmt: skip

        # Restart on the same data_dir: everything held must come back from the store.
        held = int(_metric(scrape_metrics(url), "hsmocsp_cache_entries"))
        self.children.stop_all()
        t0 = time.monotonic()
        url = self.run_hsmocsp(name + "-restart", cfg)
        ready_s = time.monotonic() - t0
        entries, secs = wait_entries(url, held, RESTORE_WAIT, t0)
        sigs = _metric(scrape_metrics(url), "hsmocsp_signatures_total")
        time.sleep(3)  # a pre-sign sweep runs over the restored cache meanwhile
        later = _metric(scrape_metrics(url), "hsmocsp_signatures_total")
        note = (
            f"restart: {entries:,.0f} of {held:,} held before the stop ({n_rows:,} index rows) "
            f"cached after {secs:.1f} s (/readyz after {ready_s:.1f} s); {sigs:,.0f} "
            f"signatures then, {later:,.0f} 3 s later"
        )
        self.report.rows.append(Row("hsmocsp restart from data_dir" + self.suffix, None, note=note))
        self.report.extra["restart"] = note
        print(f"  {note}", flush=True)
        status, _, body = http(url + "/ocsp", reqs[len(reqs) // 2], OCSP_CT)
        check_response(body, ocsp.OCSPCertStatus.GOOD, f"after restart (HTTP {status})")

    def index_load(self) -> None:
        script = REPO / "bench" / "index_load.py"
        if not script.exists():
            raise BenchError("bench/index_load.py is absent")
        lines = "100000" if self.args.quick else "1000000"
        proc = subprocess.run(
            [sys.executable, str(script), "--lines", lines, "--reactor"],
            capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO)),
        )  # fmt: skip
        if proc.returncode != 0:
            raise BenchError(f"index_load exited {proc.returncode}: {proc.stderr[-300:]}")
        self.report.extra["index_load"] = proc.stdout.strip()
        print(proc.stdout)


def _post_in_ns(
    child: Child, wrapper: list[str], url: str, der: bytes, timeout: float = 30
) -> bytes:
    """POST ``der`` from inside the namespace, retrying until the server answers."""
    code = (
        "import sys,urllib.request as u;"
        "r=u.urlopen(u.Request(sys.argv[1],data=sys.stdin.buffer.read(),"
        "headers={'Content-Type':'application/ocsp-request'}),timeout=10);"
        "sys.stdout.buffer.write(r.read())"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise StartError(f"{child.name} exited {child.proc.returncode}:\n{child.tail()}")
        proc = subprocess.run(
            [*wrapper, sys.executable, "-c", code, url], input=der, capture_output=True,
            timeout=30,
        )  # fmt: skip
        if proc.returncode == 0 and proc.stdout:
            return proc.stdout
        time.sleep(0.3)
    raise StartError(f"{child.name} did not answer {url} within {timeout}s:\n{child.tail()}")


# --- output -----------------------------------------------------------------------------


def format_table(report: Report) -> str:
    """The results as a fixed-width text table, then the ratios against the targets."""
    lines = [
        f"{'target':<52} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'sock.err':>8}  note",
        "-" * 124,
    ]
    for row in report.rows:
        rps = f"{row.rps:,.0f}" if row.rps is not None else "-"
        p50 = f"{row.p50_ms:.2f}" if row.p50_ms is not None else ""
        p99 = f"{row.p99_ms:.2f}" if row.p99_ms is not None else ""
        err = str(row.errors) if row.rps is not None and row.p50_ms is not None else ""
        lines.append(f"{row.name:<52} {rps:>10} {p50:>8} {p99:>8} {err:>8}  {row.note}")
    lines += ["", "ratios vs targets:"]
    slow = any(row.name.endswith(SLOW_SUFFIX) for row in report.rows)
    for suffix in ("", SLOW_SUFFIX) if slow else ("",):
        for num, den, target in TARGETS:
            num, den = num + suffix, den + suffix
            a, b = report.rate(num), report.rate(den)
            if a is None or b is None or b == 0:
                if not suffix:
                    lines.append(f"  {num} / {den}: not measured (target >= {target:g}x)")
                continue
            verdict = "MET" if a / b >= target else "NOT MET"
            lines.append(f"  {num} / {den}: {a / b:.2f}x (target >= {target:g}x) {verdict}")
    single = report.rate("hsmocsp cached POST" + SLOW_SUFFIX)
    for label in ("first pass", "second pass"):
        known = report.rate(f"{KNOWN_ROW}, {label}{SLOW_SUFFIX}")
        if known is not None and single:
            verdict = "MET" if known / single >= 0.9 else "NOT MET"
            lines.append(
                f"  pre-signed distinct known serials, {label} / cached POST of one request"
                f"{SLOW_SUFFIX}: {known / single:.2f}x (target: unchanged, >= 0.9x) {verdict}"
            )
    nginx, cached = report.rate("nginx static file GET"), report.rate("hsmocsp cached GET")
    if nginx and cached:
        lines.append(f"  hsmocsp cached GET / nginx static GET: {cached / nginx:.2f}x (ceiling)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per target")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="2 s per target, small index")
    parser.add_argument(
        "--only",
        default=",".join(DEFAULT_TARGETS),
        help=f"comma list of {','.join(ALL_TARGETS)} (default: all but slow)",
    )
    parser.add_argument(
        "--presign-wait",
        type=float,
        default=PRESIGN_WAIT,
        help="slow pass: seconds to wait for pre-signing every index row (default 900)",
    )
    parser.add_argument(
        "--serials",
        type=int,
        default=0,
        help="slow pass: extra index rows (default 100,000; 2,000 with --quick)",
    )
    parser.add_argument("--profile", action="store_true", help="also cProfile the cached path")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration = 2.0
    if not 1 <= args.duration <= 300:
        parser.error("--duration must be between 1 and 300 seconds")
    if not 1 <= args.connections <= 1000:
        parser.error("--connections must be between 1 and 1000")
    if not 1 <= args.threads <= 16:
        parser.error("--threads must be between 1 and 16")
    args.only = {t.strip() for t in args.only.split(",") if t.strip()}
    unknown = args.only - set(ALL_TARGETS)
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    children = bench_children("hsmocsp-bench-")
    work = children.workdir
    bench = Bench(args, work, children)
    print(
        f"hsmocsp bench: {args.duration:g} s per target, {args.connections} connections, "
        f"wrk -t{args.threads}; {os.cpu_count()} CPUs shared by wrk and the servers; "
        f"work dir {work}",
        flush=True,
    )
    steps: list[tuple[str, str, Callable[[], None]]] = [
        ("hsmocsp", "hsmocsp cached", bench.hsmocsp_cached),
        ("openssl", "openssl ocsp -multi 2 POST", bench.openssl_ocsp),
        ("cfssl", "cfssl ocspserve POST", bench.cfssl),
        ("openbao", "OpenBao /v1/pki/ocsp POST", bench.openbao),
        ("nginx", "nginx static file GET", bench.nginx),
        ("miss", "raw SoftHSM C_Sign", bench.hsm_raw),
        ("miss", "hsmocsp cache-miss", bench.cache_miss),
        ("index", "index_load", bench.index_load),
        ("slow", "slow signer: RSA-4096 key, 100k-serial index", bench.slow_signer),
    ]
    if args.profile:
        steps.insert(1, ("hsmocsp", "hsmocsp cached POST under cProfile", bench.profile_cached))
        steps.append(("miss", "hsmocsp cache-miss under cProfile", bench.profile_miss))
    try:
        bench.setup()
        for key, label, step in steps:
            if key not in args.only:
                continue
            print(f"== {label}", flush=True)
            try:
                step()
            except (BenchError, StartError, WrkError, OSError, subprocess.SubprocessError,
                    RuntimeError) as err:  # fmt: skip
                bench.report.fail(label, err)
            finally:
                # Each target runs alone: nothing else competes for the two cores.
                children.stop_all()
    finally:
        children.close(args.keep)
    print()
    print(format_table(bench.report))
    if "index_load" in bench.report.extra:
        print(f"\nindex_load:\n{bench.report.extra['index_load']}")
    if args.json:
        data = asdict(bench.report)
        data["machine"] = {
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(),
        }  # fmt: skip
        args.json.write_text(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
