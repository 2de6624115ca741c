"""Token faults seen from a real ``twistd hsmocsp`` (issue #9 items 2 and 8).

The PIN test works on a private copy of the dev PKI's token (the session's token
must keep its PIN): ``pkcs11-tool --change-pin`` changes it under the running
responder, both workers are killed, the replacement's one refused login marks
the token failed (one critical line, tryLater for new signatures, the token
metric at 0); a fixed PIN file and SIGHUP bring signing back.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from hsmocsp.devpki.opensslca import DevPki
from hsmocsp.devpki.softhsm import conf_text
from tests.integration.conftest import dev_env, level1_config
from tests.integration.harness import Responder, http, openssl_ocsp
from tests.integration.test_core_dumps import abort_and_reap, cores, cores_are_written
from tests.waiting import wait_until

__all__ = ["cores_are_written"]  # a fixture, used by name below

NEW_PIN = "86427531"




def metric(r: Responder, name: str) -> float | None:
    _, _, body = http(r.url + "/metrics")
    for line in body.decode().splitlines():
        if line.split(" ")[0] == name:
            return float(line.split()[-1])
    return None


def workers_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"hsmocsp.signing.worker" in cmdline:
            found.append(int(entry))
    return found


def private_token(dev: DevPki, directory: Path) -> dict[str, str]:
    """A copy of the dev token in ``directory``; the environment that points at it."""
    tokens = directory / "tokens"
    source_dir = re.search(r"directories.tokendir = (.*)", dev.softhsm_conf.read_text())
    assert source_dir is not None
    shutil.copytree(source_dir.group(1).strip(), tokens)
    conf = directory / "softhsm2.conf"
    conf.write_text(conf_text(tokens))
    return dict(dev_env(dev), SOFTHSM2_CONF=str(conf))


def unknown_serial(r: Responder, dev: DevPki, serial: int) -> str:
    """``openssl ocsp`` for a serial nobody asked for (a cache miss: a signature)."""
    return openssl_ocsp(
        "-url", r.url + "/ocsp", "-issuer", str(dev.ca_pem), "-serial", str(serial),
        "-VAfile", str(dev.ocsp_pem), "-CAfile", str(dev.ca_pem), "-no_nonce",
    ).output  # fmt: skip


def test_pin_changed_at_run_time_fails_once_then_sighup_reads_the_new_one(
    devpki: DevPki, tmp_path: Path
) -> None:
    env = private_token(devpki, tmp_path / "hsm")
    pin_file = tmp_path / "pin"
    old_pin = devpki.pin()
    pin_file.write_text(old_pin + "\n")
    pin_file.chmod(0o600)
    cfg = level1_config(devpki, tmp_path)
    cfg.write_text(cfg.read_text().replace(str(devpki.pin_file), str(pin_file)))
    r = Responder(config=cfg, env=env, workdir=tmp_path).start()
    try:
        assert "Response verify OK" in unknown_serial(r, devpki, 0x5101)
        assert metric(r, 'hsmocsp_token_up{token="dev"}') == 1.0
        subprocess.run(
            ["pkcs11-tool", "--module", devpki.module, "--token-label", devpki.token_label,
             "--login", "--pin", old_pin, "--change-pin", "--new-pin", NEW_PIN],
            env=env, check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        assert r.proc is not None
        for pid in workers_of(r.proc.pid):
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: metric(r, 'hsmocsp_token_up{token="dev"}') == 0.0, "token down")
        assert metric(r, 'hsmocsp_token_state{state="failed",token="dev"}') == 1.0
        out = unknown_serial(r, devpki, 0x5102)
        assert "trylater" in out.lower(), out
        # Given up until SIGHUP: no worker starting, no restart scheduled (a pool that
        # retried would show 1 here while it waits out its back-off).
        wait_until(lambda: metric(r, 'hsmocsp_token_restart_pending{token="dev"}') == 0.0,
                   "the pool to stop trying")
        # Once by the pool (each handle's "ready -> failed" line repeats the reason).
        pool_lines = [line for line in r.output().splitlines() if "[hsmocsp.signing" in line]
        assert sum("wrong PIN" in line for line in pool_lines) == 1, r.output()
        assert workers_of(r.proc.pid) == []

        pin_file.write_text(NEW_PIN + "\n")
        os.kill(r.proc.pid, signal.SIGHUP)
        wait_until(lambda: metric(r, 'hsmocsp_token_state{state="ready",token="dev"}') == 1.0,
             "token ready")
        assert "Response verify OK" in unknown_serial(r, devpki, 0x5103)
        assert old_pin not in r.output() and NEW_PIN not in r.output()
        critical = [line for line in r.output().splitlines() if "#critical]" in line]
        assert len(critical) == 1 and "wrong PIN" in critical[0], critical
    finally:
        r.stop()


def test_responder_holding_the_pin_dumps_no_core(
    devpki: DevPki, tmp_path: Path, cores_are_written: None
) -> None:
    r = Responder(config=level1_config(devpki, tmp_path), env=dev_env(devpki), workdir=tmp_path)
    r.start()
    assert r.proc is not None
    # Cores allowed as an operator might (`LimitCORE=infinity`, `ulimit -c unlimited`),
    # after start-up: only the non-dumpable flag stands in the way now.
    subprocess.run(["prlimit", f"--pid={r.proc.pid}", "--core=unlimited:unlimited"], check=False)
    sig, dumped = abort_and_reap(r.proc)
    assert sig == signal.SIGABRT
    assert not dumped, "the kernel dumped the responder's core"
    assert cores(tmp_path) == []


@pytest.fixture(autouse=True)
def _no_leftover_workers() -> None:
    """Workers die with the responder (PR_SET_PDEATHSIG); nothing to clean up here."""
