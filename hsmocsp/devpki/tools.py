"""Running the external tools the dev PKI is built with (openssl, pkcs11-tool).

The dev PKI deliberately drives the same command-line tools an operator would use, so
the invocations double as documentation. This module holds the one place that runs them:
stdin is closed (a tool that wants to prompt fails instead of hanging), secrets are passed
through the child's environment or a file, never its argv, and a failure carries the
command line and the tool's stderr with any secret masked.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from hsmocsp.errors import HsmOcspError

#: Executable -> the Debian package that ships it.
DEBIAN_PACKAGES: Mapping[str, str] = {
    "cfssl": "golang-cfssl",
    "openssl": "openssl",
    "pkcs11-tool": "opensc",
    "softhsm2-util": "softhsm2",
}

#: A tool that runs longer than this is considered hung (SoftHSM RSA 3072 keygen ~1 s).
TIMEOUT_SECONDS = 120.0


class DevPkiError(HsmOcspError):
    """The dev PKI could not be built; the message says what to do."""


class MissingToolError(DevPkiError):
    """A required program or library is not installed (the CLI exits with code 2)."""


class CommandError(DevPkiError):
    """A tool exited non-zero; the message holds the command and its stderr (secrets masked)."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(f"command failed (exit {returncode}): {' '.join(argv)}\n{stderr.rstrip()}")


def require_tool(name: str) -> str:
    """Return the absolute path of ``name`` or raise :class:`MissingToolError`."""
    found = shutil.which(name)
    if found is None:
        package = DEBIAN_PACKAGES.get(name, name)
        raise MissingToolError(f"{name} not found: install the Debian package {package!r}")
    return found


def _mask(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    secrets: Sequence[str] = (),
    cwd: Path | None = None,
) -> bytes:
    """Run ``argv`` and return its stdout; raise :class:`CommandError` on failure.

    ``secrets`` are values (a PIN) to mask in the error message should a tool echo them.
    """
    exe = require_tool(argv[0])
    try:
        proc = subprocess.run(
            [exe, *argv[1:]],
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise CommandError(
            [_mask(a, secrets) for a in argv], -1, f"timed out after {TIMEOUT_SECONDS:.0f} s"
        ) from err
    except OSError as err:
        raise CommandError([_mask(a, secrets) for a in argv], -1, str(err)) from err
    if proc.returncode != 0:
        stderr = proc.stderr.decode("utf-8", "replace")
        raise CommandError(
            [_mask(a, secrets) for a in argv], proc.returncode, _mask(stderr, secrets)
        )
    return proc.stdout


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 (never readable by others, even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM ``proc`` if it still runs, SIGKILL after ``timeout`` seconds; then reap it."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)
