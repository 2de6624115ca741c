"""``hsmocsp check``: start-up's checks, one line per handle, nothing listening.

The same builder as the service (:mod:`hsmocsp.service.builder`) makes the
pools, signers and sources, with one worker per token so the PIN is tried once
per token. Unlike the service, a failure does not stop the run: every handle
gets its line, so an operator sees all that is wrong at once.
"""

from __future__ import annotations

from typing import Any, TextIO

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from hsmocsp.config import Config, FileKeyConfig
from hsmocsp.errors import HsmOcspError
from hsmocsp.handle import Handle
from hsmocsp.health import State
from hsmocsp.service.builder import build

EXIT_OK = 0
EXIT_FAILED = 1


def describe_key(key: PublicKeyTypes) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA-{key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    return type(key).__name__


def _why(err: BaseException) -> str:
    return str(err) if isinstance(err, HsmOcspError) else f"{type(err).__name__}: {err}"


async def run_check(reactor: Any, cfg: Config, out: TextIO) -> int:
    try:
        parts = build(cfg, reactor, pool_workers=1)
    except HsmOcspError as err:
        out.write(f"configuration: FAILED: {err}\n")
        return EXIT_FAILED
    pool_errors: dict[str, str] = {}
    started: list[Any] = []
    try:
        for name, pool in parts.pools.items():
            try:
                await pool.start()
                started.append(pool)
            except Exception as err:
                pool_errors[name] = f"token {name}: {_why(err)}"
        failed = 0
        for h, handle in zip(cfg.handles, parts.handles, strict=True):
            token = (
                None
                if h.signer is None or isinstance(h.signer, FileKeyConfig)
                else (h.signer.token)
            )
            try:
                if token is not None and token in pool_errors:
                    raise HsmOcspError(pool_errors[token])
                line = await _check_handle(handle, started, h.source, h.signer is not None)
                out.write(f"handle {h.name}: ok: {line}\n")
            except Exception as err:
                failed += 1
                out.write(f"handle {h.name}: FAILED: {_why(err)}\n")
            out.flush()
        return EXIT_FAILED if failed else EXIT_OK
    finally:
        for component in reversed(started):
            try:
                await component.stop()
            except Exception:  # stopping after a check: nothing left to report
                pass


async def _check_handle(handle: Handle, started: list[Any], source_cfg: object, signs: bool) -> str:
    await handle.signer.start()
    started.append(handle.signer)
    await handle.source.start()
    started.append(handle.source)
    handle.prepare()  # responder certificate against the key and the source's issuers
    health = handle.health()  # expiry of the certificate, CRLs past nextUpdate
    if health.state is State.FAILED:
        raise HsmOcspError(health.reason or "failed")
    kind = getattr(source_cfg, "kind", "?")
    issuers = handle.source.issuers()
    if signs:
        cert = handle.responder_cert
        signing = (
            f"key {describe_key(handle.signer.public_key())}, responder certificate "
            f"{cert.subject.rfc4514_string()} until {cert.not_valid_after_utc:%Y-%m-%d}"
        )
    else:
        signing = "pre-signed responses (signer: none)"
    line = f"{handle.path}, {signing}, {kind} source with {len(issuers)} issuer(s)"
    if health.state is State.DEGRADED:
        line += f" (degraded: {health.reason})"
    return line


__all__ = ["run_check"]
