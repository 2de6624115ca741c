"""Build and configure the smart-card-like PKCS#11 module (``bench/slowtoken.c``).

The module forwards to SoftHSM2 but runs one call at a time across every process
and sleeps a configurable time per signature and per login, so tests and
benchmarks meet the limits of a Nitrokey HSM 2 class token (a few signatures per
second, no concurrency) instead of SoftHSM's thousands per second. It is loaded
by PyKCS11 like any vendor module: point ``tokens.<name>.module`` at the built
``.so`` and give the workers the ``SLOWTOKEN_*`` variables from :func:`env`.

The build is cached by the hash of the C source (and compiler), so a test
session compiles it once: ``<tmp>/hsmocsp-slowtoken-<uid>/slowtoken-<hash>.so``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("slowtoken.c")


class BuildError(RuntimeError):
    """The module could not be built (no compiler, compiler error)."""


def compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise BuildError("no C compiler found: install the Debian packages 'gcc' and 'libc6-dev'")
    return cc


def cache_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"hsmocsp-slowtoken-{os.getuid()}"


def build(directory: Path | None = None) -> Path:
    """The path of the built module, compiling it unless this source was built before."""
    cc = compiler()
    source = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, check=False).stdout
    digest = hashlib.sha256(source + b"\0" + version).hexdigest()[:16]
    directory = directory or cache_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = directory / f"slowtoken-{digest}.so"
    if target.exists():
        return target
    partial = directory / f".slowtoken-{digest}-{os.getpid()}.so"
    result = subprocess.run(
        [cc, "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror",
         "-o", str(partial), str(SOURCE), "-ldl", "-lpthread"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise BuildError(f"{cc} failed to build {SOURCE}:\n{result.stderr}")
    os.replace(partial, target)  # atomic: a concurrent build of the same source is harmless
    return target


def env(
    *,
    sign_ms: float = 0,
    login_ms: float = 0,
    call_ms: float = 0,
    lock: Path | None = None,
    trace: Path | None = None,
    trace_data: bool = False,
    module: str | None = None,
) -> dict[str, str]:
    """The variables the module reads when it is loaded (give them to the workers)."""
    out = {
        "SLOWTOKEN_SIGN_MS": str(int(sign_ms)),
        "SLOWTOKEN_LOGIN_MS": str(int(login_ms)),
        "SLOWTOKEN_CALL_MS": str(int(call_ms)),
    }
    if lock is not None:
        out["SLOWTOKEN_LOCK"] = str(lock)
    if trace is not None:
        out["SLOWTOKEN_TRACE"] = str(trace)
        out["SLOWTOKEN_TRACE_DATA"] = "1" if trace_data else "0"
    if module is not None:
        out["SLOWTOKEN_MODULE"] = module
    return out


def read_trace(path: Path) -> list[tuple[int, int, int, int]]:
    """``(pid, function index, start ns, end ns)`` per call, from ``SLOWTOKEN_TRACE``."""
    rows = []
    for line in path.read_text().splitlines():
        pid, index, start, end = (int(x) for x in line.split()[:4])
        rows.append((pid, index, start, end))
    return rows


def signed_data(path: Path) -> list[bytes]:
    """What was signed, in order (``SLOWTOKEN_TRACE_DATA=1``): one entry per C_Sign."""
    out = []
    for line in path.read_text().splitlines():
        fields = line.split()
        if len(fields) == 5 and int(fields[1]) == C_SIGN:
            out.append(bytes.fromhex(fields[4]))
    return out


#: Function indexes in CK_FUNCTION_LIST (PKCS#11 v2.40), as written in the trace.
C_LOGIN = 18
C_SIGN = 43

if __name__ == "__main__":  # python -m bench.slowtoken: build and print the path
    try:
        print(build())
    except BuildError as err:
        sys.exit(str(err))
