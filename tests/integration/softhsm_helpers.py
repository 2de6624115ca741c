"""Make throw-away SoftHSM2 tokens and keys in a temp dir (tests and benchmarks).

Self-contained on purpose (stdlib only) so it can move to a shared module.
Everything runs with SOFTHSM2_CONF pointing at the temp conf; nothing touches
the system token directory.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


def softhsm_available() -> bool:
    return os.path.exists(SOFTHSM_MODULE) and all(
        any(os.access(os.path.join(d, tool), os.X_OK) for d in os.environ["PATH"].split(":"))
        for tool in ("softhsm2-util", "pkcs11-tool")
    )


def _env(conf: str | Path) -> dict[str, str]:
    return {**os.environ, "SOFTHSM2_CONF": str(conf)}


def write_conf(directory: str | Path) -> Path:
    """A softhsm2.conf whose tokens live in ``<directory>/tokens``; returns its path."""
    directory = Path(directory)
    tokens = directory / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
    )
    return conf


def init_token(directory: str | Path, label: str, pin: str, so_pin: str) -> Path:
    """Create a token ``label`` (writing the conf if needed); returns the conf path.

    Several tokens may share one directory/conf: call again with another label.
    """
    conf = Path(directory) / "softhsm2.conf"
    if not conf.exists():
        conf = write_conf(directory)
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", label,
         "--pin", pin, "--so-pin", so_pin],
        env=_env(conf), check=True, capture_output=True, timeout=60,
    )
    return conf


def gen_keypair(
    conf: str | Path,
    label: str,
    key_id: str,
    key_type: str,
    *,
    token_label: str = "T",
    pin: str = "1234",
) -> None:
    """Generate a key pair on the token; ``key_type`` as pkcs11-tool spells it.

    e.g. ``rsa:2048``, ``EC:prime256v1``, ``EC:secp384r1``; ``key_id`` is hex (``01``).
    """
    subprocess.run(
        ["pkcs11-tool", "--module", SOFTHSM_MODULE, "--token-label", token_label,
         "--login", "--pin", pin, "--keypairgen", "--key-type", key_type,
         "--label", label, "--id", key_id],
        env=_env(conf), check=True, capture_output=True, timeout=120,
    )
