"""``hsmocsp-devpki``: build the dev PKI from the command line.

``hsmocsp-devpki [--dir D]`` builds (idempotently). Three small actions help try the
responder's reload by hand; each first completes the build:
``leaf NAME`` issues ``root/leaves/NAME.pem``, ``revoke CERT [--reason R]`` marks it revoked
in index.txt, ``crl`` signs a new CRL. ``vault [--address A] [--token-file F]`` builds
levels 2-3 on an already running Vault/OpenBao (``make run`` does it for you).

Exit codes: 0 done, 2 a tool is missing or the arguments are bad, 1 a step failed (the
message shows the command, without the PIN, and its stderr).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from hsmocsp.devpki.opensslca import (
    CRL_REASONS,
    DevPki,
    build_level1,
    issue_leaf,
    regen_crl,
    revoke,
)
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
    sub = p.add_subparsers(dest="action")
    leaf = sub.add_parser("leaf", help="issue root/leaves/NAME.pem (once)")
    leaf.add_argument("name")
    rev = sub.add_parser("revoke", help="revoke a certificate in index.txt (then run 'crl')")
    rev.add_argument("cert", type=Path)
    rev.add_argument("--reason", default="unspecified", choices=CRL_REASONS)
    sub.add_parser("crl", help="sign a new CRL (root/crl.pem, root/crl.der)")
    vault = sub.add_parser(
        "vault", help="build levels 2-3 (mounts pki, pki_int_development) on a running Vault"
    )
    vault.add_argument("--address", default="http://127.0.0.1:8200")
    vault.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help="file holding a token that may mount engines (default: <dir>/bao/root-token)",
    )
    return p


def _summary(dev: DevPki) -> None:
    print(f"dev PKI ready in {dev.directory}")
    print(f"  token      {dev.token_label} ({dev.softhsm_conf}); PIN in {dev.pin_file}")
    print(f"  root CA    {dev.ca_pem}")
    print(f"  OCSP certs {dev.ocsp_pem} (key {dev.ocsp_key_label}), "
          f"{dev.ocsp_ec_pem} (key {dev.ocsp_ec_key_label})")  # fmt: skip
    print(f"  index      {dev.index}")
    print(f"  CRL        {dev.crl_der}")
    print(f"  leaves     {dev.good_pem}, {dev.revoked_pem}")
    print(f"  env        {dev.env_file}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the builder (and an optional action); print where things are, never the PIN."""
    args = _parser().parse_args(argv)
    try:
        dev = build_level1(args.dir)
        if args.action == "leaf":
            print(issue_leaf(dev, args.name))
        elif args.action == "revoke":
            revoke(dev, args.cert.resolve(), args.reason)
            print(f"revoked {args.cert} ({args.reason}); run 'crl' to publish")
        elif args.action == "crl":
            regen_crl(dev)
            print(dev.crl_der)
        elif args.action == "vault":
            from hsmocsp.devpki.vaultpki import build_vault_levels

            token_file: Path = args.token_file or dev.directory / "bao" / "root-token"
            built = build_vault_levels(dev, args.address, token_file.read_text().strip())
            for files in built.mounts:
                print(f"{files.mount}: {files.ca_pem.parent} (OCSP at {files.ocsp_path})")
            print(f"responder token in {built.token_file}")
        else:
            _summary(dev)
    except MissingToolError as err:
        print(f"hsmocsp-devpki: {err}", file=sys.stderr)
        return 2
    except (DevPkiError, OSError) as err:
        print(f"hsmocsp-devpki: error: {err}", file=sys.stderr)
        return 1
    return 0
