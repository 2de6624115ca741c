"""``/metrics`` of a real ``twistd hsmocsp`` follows Prometheus conventions:
``promtool check metrics`` (Debian package ``prometheus``) accepts it, counters
are counters ending in ``_total``, no ``_created`` series, build info, process
metrics, request latency by handle and result."""

from __future__ import annotations

import subprocess

from hsmocsp import __version__
from hsmocsp.devpki.opensslca import DevPki
from tests.integration.harness import Responder, http, openssl_ocsp


def test_promtool_accepts_live_metrics(responder: Responder, devpki: DevPki) -> None:
    # A nonce is always signed live; the same request without one twice: the second (at
    # the latest) is answered from the cache (the responder is shared: pre-signing may
    # have made the first one a hit already).
    for nonce in (True, False, False):
        result = openssl_ocsp(
            "-url", responder.url + "/ocsp", "-issuer", str(devpki.ca_pem),
            "-cert", str(devpki.good_pem), *(() if nonce else ("-no_nonce",)),
            "-VAfile", str(devpki.ocsp_pem), "-CAfile", str(devpki.ca_pem),
        )  # fmt: skip
        assert result.verified, result.output
    status, _, body = http(responder.url + "/metrics")
    assert status == 200
    check = subprocess.run(
        ["promtool", "check", "metrics"], input=body, capture_output=True, timeout=60
    )
    assert check.returncode == 0, (check.stdout + check.stderr).decode()
    text = body.decode()
    types = {
        line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE")
    }
    for name in (
        "hsmocsp_responses_total",
        "hsmocsp_cache_hits_total",
        "hsmocsp_cache_misses_total",
        "hsmocsp_signatures_total",
        "hsmocsp_source_errors_total",
        "process_cpu_seconds_total",
    ):
        assert types.get(name) == "counter", name
    counters = [name for name, kind in types.items() if kind == "counter"]
    assert all(name.endswith("_total") for name in counters), counters
    assert "_created" not in text
    assert 'hsmocsp_build_info{python="' in text and f'version="{__version__}"' in text
    assert "process_resident_memory_bytes" in text and "process_open_fds" in text
    for result in ("signed", "cached"):
        line = f'hsmocsp_request_duration_seconds_count{{handle="root",result="{result}"}}'
        assert line in text, result
