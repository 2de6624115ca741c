"""forbid_core_dumps() in a child process (it cannot be undone in the test process)."""

from __future__ import annotations

import subprocess
import sys

from hsmocsp.childenv import python_env

CODE = """
import resource
from hsmocsp.coredump import forbid_core_dumps, is_dumpable
before = is_dumpable()
ok = forbid_core_dumps()
print(before, ok, is_dumpable(), resource.getrlimit(resource.RLIMIT_CORE))
"""


def test_process_becomes_non_dumpable_with_core_limit_zero() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CODE], env=python_env({}), capture_output=True, text=True,
        check=True, timeout=60,
    ).stdout.strip().split(maxsplit=3)
    assert out == ["True", "True", "False", "(0, 0)"]
