"""Development PKI: a SoftHSM token and CAs whose keys live in it.

``hsmocsp-devpki --dir var/devpki`` (or ``python -m hsmocsp.devpki``) builds, idempotently,
everything the responder needs to run against real tools on one machine. Tests use the
Python API (:func:`build_level1`, :func:`revoke`, :func:`regen_crl`).
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point (imports lazily so ``import hsmocsp.devpki`` stays cheap)."""
    from hsmocsp.devpki.cli import main as _main

    return _main(argv)


__all__ = ["main"]
