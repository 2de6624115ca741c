"""Keep secrets out of core dumps: the process that holds a PIN or a Vault token.

A core dump of a signing worker or of the responder holds the PIN (and the main
process a Vault token): ``kill -ABRT`` with core dumps enabled wrote it to disk
(issue #9). Two locks, because either alone can be undone from outside:

* ``prctl(PR_SET_DUMPABLE, 0)``: the kernel writes no core for this process
  whatever the core limit (and refuses ``ptrace`` attach by other processes of
  the same user, which would read the same memory). It is reset by ``execve``,
  so a child we start (a front, an index parser) is dumpable again and must
  hold no secret; signing workers call this themselves.
* ``RLIMIT_CORE`` 0, soft and hard: no core even where ``PR_SET_DUMPABLE`` is
  unavailable; an unprivileged process cannot raise it again.

Linux only; elsewhere (or if libc cannot be loaded) the limit alone is set.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import resource

__all__ = ["forbid_core_dumps", "is_dumpable"]

_PR_GET_DUMPABLE = 3
_PR_SET_DUMPABLE = 4


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None


def forbid_core_dumps() -> bool:
    """Make this process non-dumpable and its core limit 0; True when prctl worked."""
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc = _libc()
    if libc is None or not hasattr(libc, "prctl"):
        return False
    return bool(libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) == 0)


def is_dumpable() -> bool | None:
    """This process's dumpable flag (None when it cannot be read)."""
    libc = _libc()
    if libc is None or not hasattr(libc, "prctl"):
        return None
    value = libc.prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0)
    return None if value < 0 else bool(value)
