"""``hsmocsp csr``: a PKCS#10 request signed inside the HSM, PEM on stdout.

The key is named by a handle (its configured signer) or by a token of the
configuration and a key label/id. The signature is made by a one-worker
signing pool (the worker process logs in once and signs; this process never
loads the PKCS#11 module), or by the file signer for a ``{file: ...}`` handle.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from hsmocsp.config import Config, FileKeyConfig
from hsmocsp.csr import (
    SubjectError,
    ocsp_signer_extensions,
    parse_subject,
    request_der,
    request_info_der,
    to_pem,
)
from hsmocsp.errors import HsmOcspError
from hsmocsp.service.builder import build_pool, build_signer
from hsmocsp.signing import Signer

EXIT_OK = 0
EXIT_FAILED = 1


def _fail(message: str) -> int:
    print(f"hsmocsp csr: {message}", file=sys.stderr)
    return EXIT_FAILED


async def run_csr(reactor: Any, cfg: Config, args: argparse.Namespace, out: TextIO) -> int:
    try:
        subject = parse_subject(args.subject)
    except SubjectError as err:
        return _fail(str(err))
    pool = None
    signer: Signer
    try:
        if args.handle is not None:
            handles = {h.name: h for h in cfg.handles}
            h = handles.get(args.handle)
            if h is None:
                return _fail(f"no handle {args.handle!r} in {cfg.path} ({', '.join(handles)})")
            if h.signer is None:
                return _fail(f"handle {h.name} has no signer (signer: none): nothing to certify")
            if not isinstance(h.signer, FileKeyConfig):
                pool = build_pool(cfg.tokens[h.signer.token], reactor, workers=1)
            signer = build_signer(h, pool)
        else:
            from hsmocsp.signing.pkcs11 import Pkcs11Signer
            from hsmocsp.signing.pool import KeyRef

            token = cfg.tokens.get(args.token)
            if token is None:
                return _fail(f"no token {args.token!r} in {cfg.path} ({', '.join(cfg.tokens)})")
            if args.key_label is None and args.key_id is None:
                return _fail("--token needs --key-label or --key-id")
            try:
                key_id = bytes.fromhex(args.key_id) if args.key_id is not None else None
            except ValueError:
                return _fail(f"--key-id {args.key_id!r} is not hex")
            pool = build_pool(token, reactor, workers=1)
            signer = Pkcs11Signer(pool, KeyRef(label=args.key_label, key_id=key_id))
    except HsmOcspError as err:
        return _fail(str(err))
    try:
        if pool is not None:
            await pool.start()
        await signer.start()
        extensions = [] if args.no_ocsp_extensions else ocsp_signer_extensions()
        info = request_info_der(subject, signer.public_key(), extensions)
        signature = await signer.sign(info)
        pem = to_pem(request_der(info, signer.signature_algorithm_der, signature))
    except (HsmOcspError, ValueError) as err:
        return _fail(str(err))
    finally:
        await signer.stop()
        if pool is not None:
            await pool.stop()
    out.write(pem)
    out.flush()
    return EXIT_OK


__all__ = ["run_csr"]
