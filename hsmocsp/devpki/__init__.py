"""Development PKI: a SoftHSM token and CAs whose keys live in it.

``hsmocsp-devpki --dir var/devpki`` (or ``python -m hsmocsp.devpki``) builds, idempotently,
everything the responder needs to run against real tools on one machine. Tests use the
Python API (:func:`build_level1`, :func:`revoke`, :func:`regen_crl`, :func:`issue_leaf`).
"""

from __future__ import annotations

from hsmocsp.devpki.cli import main
from hsmocsp.devpki.opensslca import DevPki, build_level1, issue_leaf, regen_crl, revoke
from hsmocsp.devpki.tools import CommandError, DevPkiError, MissingToolError

__all__ = [
    "CommandError",
    "DevPki",
    "DevPkiError",
    "MissingToolError",
    "build_level1",
    "issue_leaf",
    "main",
    "regen_crl",
    "revoke",
]
