"""Environments for the Python child processes hsmocsp starts (``python -m hsmocsp...``).

Three kinds of children: signing workers (they load the vendor's PKCS#11 module,
which may be configured by any environment variable, so they get ours minus the
PIN's variable), and index parsers and HTTP fronts, which need nothing from our
environment: they get only the harmless variables below, never a PIN or Vault
token that the main process was started with (``/proc/<pid>/environ`` of a front,
a process that parses untrusted requests, must hold no secret).

All of them get a ``PYTHONPATH`` that finds this ``hsmocsp``, so they work from a
source checkout as well as from an installed package.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import hsmocsp

__all__ = ["HARMLESS", "minimal_env", "python_env"]

#: What a child that needs nothing of ours still inherits.
HARMLESS = (
    "PATH",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "PYTHONHOME",
    "PYTHONPATH",
    "VIRTUAL_ENV",
)


def python_env(base: Mapping[str, str]) -> dict[str, str]:
    """``base`` plus a ``PYTHONPATH`` that puts this ``hsmocsp`` first."""
    env = dict(base)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(hsmocsp.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


def minimal_env(keep: Iterable[str] = HARMLESS) -> dict[str, str]:
    """Only the ``keep`` variables of our environment (and the ``PYTHONPATH``)."""
    return python_env({k: os.environ[k] for k in keep if k in os.environ})
