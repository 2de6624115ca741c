"""Configuration in, components out: the one place that maps config objects to objects.

Everything here runs at ``makeService`` time and is synchronous: it reads
certificates and PINs (a missing file is a :class:`~hsmocsp.errors.ConfigError`
naming the key) but starts nothing. Starting is the service tree's job
(:mod:`hsmocsp.service.service`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from cryptography import x509

from hsmocsp.config import (
    CfsslSourceConfig,
    Config,
    FileKeyConfig,
    HandleConfig,
    OpenSSLSourceConfig,
    ResponseFileSourceConfig,
    TokenConfig,
    VaultSourceConfig,
)
from hsmocsp.errors import ConfigError
from hsmocsp.handle import Handle
from hsmocsp.signing import Signer
from hsmocsp.sources import StatusSource

if TYPE_CHECKING:
    from hsmocsp.signing.pool import TokenPool


@dataclass
class Parts:
    """What a configuration builds, by name; nothing started yet."""

    pools: dict[str, TokenPool] = field(default_factory=dict)  # by token name
    signers: dict[str, Signer] = field(default_factory=dict)  # by handle name
    sources: dict[str, StatusSource] = field(default_factory=dict)  # by handle name
    handle_pools: dict[str, TokenPool] = field(default_factory=dict)  # PKCS#11 handles only
    handles: list[Handle] = field(default_factory=list)


def load_cert(path: Path, key: str, cfg: Config) -> x509.Certificate:
    """A PEM or DER certificate; an unreadable or invalid file names ``key``."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(str(cfg.path), key, f"cannot read {path}: {err.strerror}") from err
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as err:
        raise ConfigError(str(cfg.path), key, f"{path} is not a certificate: {err}") from err


def build_pool(
    token: TokenConfig,
    reactor: Any,
    workers: int | None = None,
    also_drop: tuple[str, ...] = (),
) -> TokenPool:
    """One worker pool per token; the PIN is read now (a missing one is a config error).

    ``workers`` overrides the token's count (``hsmocsp check``/``csr``: one login);
    ``also_drop``: more environment variables the workers must not inherit (the
    Redis password's).
    """
    from hsmocsp.signing.pool import TokenPool

    pin = token.pin.read(f"tokens.{token.name}.pin")
    if workers is not None:
        token = replace(token, workers=workers)
    pool = TokenPool(token, pin, reactor=reactor)
    pool.env_drop += also_drop
    return pool


def build_signer(h: HandleConfig, pool: TokenPool | None) -> Signer:
    """A file signer, or a PKCS#11 signer on ``pool`` (its token's shared pool)."""
    if h.signer is None:
        from hsmocsp.presigned import NoSigner

        return NoSigner()
    if isinstance(h.signer, FileKeyConfig):
        from hsmocsp.signing.filekey import FileSigner

        return FileSigner(h.signer)
    from hsmocsp.signing.pkcs11 import Pkcs11Signer
    from hsmocsp.signing.pool import KeyRef

    assert pool is not None
    return Pkcs11Signer(pool, KeyRef(label=h.signer.key_label, key_id=h.signer.key_id))


def build_source(h: HandleConfig, issuer: x509.Certificate | None, reactor: Any) -> StatusSource:
    src = h.source
    if isinstance(src, CfsslSourceConfig | ResponseFileSourceConfig):
        return build_cfssl_source(h, src, issuer, reactor)
    if isinstance(src, OpenSSLSourceConfig):
        from hsmocsp.sources.openssl import OpenSSLSource

        assert issuer is not None
        return OpenSSLSource(src, issuer, reactor=reactor)
    assert isinstance(src, VaultSourceConfig)
    return build_vault_source(src, reactor)


def build_cfssl_source(
    h: HandleConfig,
    src: CfsslSourceConfig | ResponseFileSourceConfig,
    issuer: x509.Certificate | None,
    reactor: Any,
) -> StatusSource:
    """cfssl's certdb (statuses; with ``signer: none`` its ocsp_responses) or a response file."""
    if isinstance(src, ResponseFileSourceConfig):
        from hsmocsp.sources.responsefile import ResponseFileSource

        return ResponseFileSource(src, reactor=reactor)
    from hsmocsp.sources.cfssl import CfsslResponseSource, CfsslSource

    if h.signer is None:
        return CfsslResponseSource(src, reactor=reactor)
    assert issuer is not None
    return CfsslSource(src, issuer, reactor=reactor)


def build_vault_source(src: VaultSourceConfig, reactor: Any) -> StatusSource:
    from hsmocsp.sources.vault import VaultSource
    from hsmocsp.sources.vaultauth import AppRoleAuth, KubernetesAuth, TokenAuth, VaultAuth

    a = src.auth
    auth: VaultAuth
    if a.method == "approle":
        assert a.role_id is not None and a.secret_id is not None
        assert a.secret_id.file is not None
        auth = AppRoleAuth(a.role_id, a.secret_id.file, mount=a.mount or "approle")
    elif a.method == "kubernetes":
        assert a.jwt_file is not None and a.role is not None
        auth = KubernetesAuth(a.jwt_file, a.role, mount=a.mount or "kubernetes")
    else:
        assert a.token is not None
        auth = TokenAuth(env=a.token.env, file=a.token.file)
    return VaultSource(src, auth, reactor=reactor)


def build_handle(
    h: HandleConfig,
    responder: x509.Certificate | None,
    signer: Signer,
    source: StatusSource,
    pool: TokenPool | None,
    reactor: Any,
) -> Handle:
    if h.signer is None:
        from hsmocsp.presigned import PresignedHandle, PresignedSource

        return PresignedHandle(h, source=cast(PresignedSource, source), clock=reactor)
    assert responder is not None
    return Handle(
        h,
        source=source,
        signer=signer,
        responder_cert=responder,
        clock=reactor,
        queue_depth=pool.queue_depth if pool is not None else None,
    )


def build(cfg: Config, reactor: Any, pool_workers: int | None = None) -> Parts:
    """Every pool, signer, source and handle of ``cfg``, in configuration order.

    ``pool_workers`` overrides every token's worker count (one login per token).
    """
    parts = Parts()
    # The signing workers inherit our environment (a PKCS#11 module may be configured by
    # any variable), minus the secrets they do not need.
    secrets = (cfg.store.password.env,) if cfg.store.password and cfg.store.password.env else ()
    for h in cfg.handles:
        issuer = load_cert(h.issuer, f"handles.{h.name}.issuer", cfg) if h.issuer else None
        responder = (
            load_cert(h.responder_cert, f"handles.{h.name}.responder_cert", cfg)
            if h.responder_cert
            else None
        )
        pool = None
        if h.signer is not None and not isinstance(h.signer, FileKeyConfig):
            token = cfg.tokens[h.signer.token]
            pool = parts.pools.get(token.name)
            if pool is None:
                pool = parts.pools[token.name] = build_pool(
                    token, reactor, pool_workers, also_drop=secrets
                )
            parts.handle_pools[h.name] = pool
        signer = parts.signers[h.name] = build_signer(h, pool)
        source = parts.sources[h.name] = build_source(h, issuer, reactor)
        parts.handles.append(build_handle(h, responder, signer, source, pool, reactor))
    return parts


__all__ = [
    "Parts",
    "build",
    "build_cfssl_source",
    "build_handle",
    "build_pool",
    "build_signer",
    "build_source",
    "build_vault_source",
    "load_cert",
]
