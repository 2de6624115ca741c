"""``hsmocsp-devpki``: build the dev PKI from the command line.

Exit codes: 0 built (or already complete), 2 a tool is missing or the arguments are bad,
1 a step failed (the message shows the command, without the PIN, and its stderr).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from hsmocsp.devpki.opensslca import build_level1
from hsmocsp.devpki.tools import DevPkiError, MissingToolError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hsmocsp-devpki",
        description="Build (idempotently) a SoftHSM token and an OpenSSL root CA whose keys "
        "live in it, for running hsmocsp locally. Existing files and keys are kept.",
    )
    p.add_argument(
        "--dir",
        type=Path,
        default=Path("var/devpki"),
        help="folder that holds everything (default: var/devpki)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the builder; print where things are (never the PIN)."""
    args = _parser().parse_args(argv)
    try:
        dev = build_level1(args.dir)
    except MissingToolError as err:
        print(f"hsmocsp-devpki: {err}", file=sys.stderr)
        return 2
    except DevPkiError as err:
        print(f"hsmocsp-devpki: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"hsmocsp-devpki: error: {err}", file=sys.stderr)
        return 1
    print(f"dev PKI ready in {dev.directory}")
    print(f"  token      {dev.token_label} ({dev.softhsm_conf}); PIN in {dev.pin_file}")
    print(f"  root CA    {dev.ca_pem}")
    print(f"  OCSP certs {dev.ocsp_pem} (key {dev.ocsp_key_label}), "
          f"{dev.ocsp_ec_pem} (key {dev.ocsp_ec_key_label})")  # fmt: skip
    print(f"  index      {dev.index}")
    print(f"  CRL        {dev.crl_der}")
    print(f"  leaves     {dev.good_pem}, {dev.revoked_pem}")
    print(f"  env        {dev.env_file}")
    return 0
