"""The development venv (``make venv``): ``.venv/bin/twistd hsmocsp`` works from any
directory, without PYTHONPATH (the editable install alone said "Unknown command")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_venv_twistd_finds_the_plugin_without_pythonpath(tmp_path: Path) -> None:
    twistd = Path(sys.executable).with_name("twistd")
    proc = subprocess.run(
        [str(twistd), "hsmocsp", "--help"],
        capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "--config" in proc.stdout
    version = subprocess.run(
        [str(twistd), "hsmocsp", "--version"],
        capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, cwd=tmp_path,
    )  # fmt: skip
    assert version.stdout.startswith("hsmocsp "), version.stdout + version.stderr
