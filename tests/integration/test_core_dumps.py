"""No PIN in a core dump (issue #9 item 8): a real ``kill -ABRT`` with cores enabled.

The kernel sets the core-dumped bit in the wait status when it wrote a core
(to a file or to a ``core_pattern`` pipe alike), so the test reads that bit, and
also looks for a ``core*`` file in the process's working directory. A control
process started the same way, without our protection, must dump a core: if it
does not, this machine writes no cores and the test is skipped (it could not fail).
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hsmocsp.childenv import python_env
from hsmocsp.signing import wire
from tests.integration.softhsm_helpers import (
    SOFTHSM_MODULE,
    gen_keypair,
    init_token,
    softhsm_available,
)

PIN = "13572468"


def _allow_cores() -> None:
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    except (ValueError, OSError):  # not root: up to the hard limit
        hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
        resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))


def abort_and_reap(proc: subprocess.Popen[bytes]) -> tuple[int, bool]:
    """``kill -ABRT``; the terminating signal and whether the kernel dumped a core."""
    os.kill(proc.pid, signal.SIGABRT)
    _, status = os.waitpid(proc.pid, 0)
    proc.returncode = -1  # reaped here; keep Popen from waiting again
    return os.WTERMSIG(status), os.WCOREDUMP(status)


def cores(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("core"))


@pytest.fixture
def cores_are_written(tmp_path: Path) -> None:
    control_dir = tmp_path / "control"
    control_dir.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"],
        stdin=subprocess.PIPE, cwd=control_dir, preexec_fn=_allow_cores,
    )
    sig, dumped = abort_and_reap(proc)
    assert sig == signal.SIGABRT
    if not dumped:
        pytest.skip("this machine writes no core dumps (core_pattern/limits): cannot test")


@pytest.mark.skipif(not softhsm_available(), reason="softhsm2/pkcs11-tool not installed")
def test_signing_worker_holding_the_pin_dumps_no_core(
    tmp_path: Path, cores_are_written: None
) -> None:
    conf = init_token(tmp_path / "hsm", "C", PIN, "5678")
    gen_keypair(conf, "k", "01", "EC:prime256v1", token_label="C", pin=PIN)
    work = tmp_path / "work"
    work.mkdir()
    env = python_env({**os.environ, "SOFTHSM2_CONF": str(conf)})
    proc = subprocess.Popen(
        [sys.executable, "-m", "hsmocsp.signing.worker"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=work, env=env,
        preexec_fn=_allow_cores,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(wire.encode({"op": "init", "module": SOFTHSM_MODULE,
                                  "token_label": "C", "slot": None, "pin": PIN}))
    proc.stdin.flush()
    decoder = wire.Decoder()
    replies: list[wire.Frame] = []
    while not replies:
        chunk = os.read(proc.stdout.fileno(), 65536)
        assert chunk, "worker closed its reply pipe"
        replies += decoder.feed(chunk)
    assert replies[0] == {"ok": True, "pid": proc.pid}  # logged in: the PIN is in its memory
    sig, dumped = abort_and_reap(proc)
    assert sig == signal.SIGABRT
    assert not dumped, "the kernel dumped the signing worker's core"
    assert cores(work) == []
