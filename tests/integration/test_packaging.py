"""The shipped artefacts: the systemd unit verifies, the twistd plugin is found."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = (REPO / "etc" / "hsmocsp.service").read_text()
    # Point ExecStart at a binary that exists here; everything else is checked as shipped.
    twistd = Path(sys.executable).with_name("twistd")
    unit = unit.replace("/opt/hsmocsp/bin/twistd", str(twistd))
    path = tmp_path / "hsmocsp.service"
    path.write_text(unit)
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60
    )
    problems = [line for line in (proc.stdout + proc.stderr).splitlines() if "hsmocsp" in line]
    assert proc.returncode == 0 and not problems, proc.stdout + proc.stderr


def test_twistd_lists_the_plugin() -> None:
    twistd = Path(sys.executable).with_name("twistd")
    proc = subprocess.run(
        [str(twistd), "hsmocsp", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--config" in proc.stdout and "--listen" in proc.stdout
