"""Config objects and components for tests: each test states only what it cares about.

Components take the config objects the configuration layer builds (validated there,
once); these factories fill in the defaults that layer would, so a test that needs a
pool with one worker writes ``token_pool(workers=1)``, not fifteen arguments.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from hsmocsp.config import (
    CfsslSourceConfig,
    FileKeyConfig,
    HandleConfig,
    OpenSSLSourceConfig,
    Secret,
    TokenConfig,
    VaultAuthConfig,
    VaultSourceConfig,
)
from hsmocsp.sources.certdb import DbConfig

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
#: The PIN of the conftest token fixtures (tests.integration.conftest.SOFTHSM_PIN).
SOFTHSM_PIN = "1234"


def token_config(**fields: Any) -> TokenConfig:
    """A token as ``tokens:`` would give it (defaults: SoftHSM, label ``T``, 2 workers).

    ``pin_env`` names the variable the PIN is read from (the workers must not see it).
    """
    pin_env = fields.pop("pin_env", None)
    base = TokenConfig(
        name="t",
        module=Path(SOFTHSM_MODULE),
        token_label="T",
        slot=None,
        pin=Secret(env=pin_env),
        workers=2,
        max_queue=1000,
        sign_timeout=10.0,
    )
    return replace(base, **fields)


def token_pool(
    pin: str = SOFTHSM_PIN,
    *,
    reactor: Any = None,
    start_timeout: float = 30.0,
    max_restart_delay: float = 4.0,
    probe_interval: float = 2.0,
    **fields: Any,
) -> Any:
    """A :class:`~hsmocsp.signing.pool.TokenPool` (not started) on ``token_config(**fields)``."""
    from hsmocsp.signing.pool import TokenPool

    return TokenPool(
        token_config(**fields),
        pin,
        reactor=_reactor(reactor),
        start_timeout=start_timeout,
        max_restart_delay=max_restart_delay,
        probe_interval=probe_interval,
    )


def vault_config(address: str = "http://vault.test:8200", **fields: Any) -> VaultSourceConfig:
    """A ``kind: vault`` source as the configuration layer gives it (mount ``pki``).

    The authenticator is passed to the source beside its config: ``auth`` here is only
    what the file said, a token from ``VAULT_TOKEN``.
    """
    base = VaultSourceConfig(
        address=address,
        mount="pki",
        namespace=None,
        auth=VaultAuthConfig(method="token", token=Secret(env="VAULT_TOKEN")),
        tls=None,
        cache_ttl=60.0,
        crl_refresh=300.0,
        request_timeout=5.0,
    )
    return replace(base, **fields)


def vault_source(
    address: str = "http://vault.test:8200",
    *,
    auth: Any,
    reactor: Any = None,
    http_client: Any = None,
    cache_size: int = 100_000,
    probe_interval: float = 10,
    **fields: Any,
) -> Any:
    """A :class:`~hsmocsp.sources.vault.VaultSource` (not started) on ``vault_config``."""
    from hsmocsp.sources.vault import VaultSource

    return VaultSource(
        vault_config(address, **fields),
        auth,
        reactor=_reactor(reactor),
        http_client=http_client,
        cache_size=cache_size,
        probe_interval=probe_interval,
    )


def _reactor(reactor: Any) -> Any:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        return default_reactor
    return reactor


def openssl_source(
    issuer: Any,
    index: Path,
    crl: Path | None = None,
    *,
    poll_interval: float = 2.0,
    reactor: Any = None,
    **runtime: Any,
) -> Any:
    """An :class:`~hsmocsp.sources.openssl.OpenSSLSource` (not started) on ``index``/``crl``.

    ``runtime``: ``run_in_thread``, ``read_index``, ``max_changed``.
    """
    from hsmocsp.sources.openssl import OpenSSLSource

    config = OpenSSLSourceConfig(index=index, crl=crl, poll_interval=poll_interval)
    return OpenSSLSource(config, issuer, reactor=_reactor(reactor), **runtime)


def cfssl_config(db: DbConfig, **fields: Any) -> CfsslSourceConfig:
    """A ``kind: cfssl`` source on the certdb ``db`` (poll 2 s, full re-read hourly)."""
    base = CfsslSourceConfig(
        db_config=Path("db-config.json"),
        db=db,
        poll_interval=2.0,
        full_reload=3600.0,
        lookup_timeout=5.0,
    )
    return replace(base, **fields)


def cfssl_source(db: DbConfig, issuer: Any, *, reactor: Any = None, **fields: Any) -> Any:
    """A :class:`~hsmocsp.sources.cfssl.CfsslSource` (not started) on ``cfssl_config``."""
    from hsmocsp.sources.cfssl import CfsslSource

    return CfsslSource(cfssl_config(db, **fields), issuer, reactor=_reactor(reactor))


def handle_config(**fields: Any) -> HandleConfig:
    """A handle as ``handles:`` would give it: ``t`` at ``/ocsp``, validity 3600 s.

    Its ``signer``/``source`` entries are placeholders: a test hands the handle the
    signer and source objects it built itself.
    """
    base = HandleConfig(
        name="t",
        path="/ocsp",
        issuer=None,
        responder_cert=None,
        signer=FileKeyConfig(key=Path("responder.key"), password=None),
        source=OpenSSLSourceConfig(index=Path("index.txt"), crl=None, poll_interval=2.0),
        validity=3600.0,
        max_age=None,
        refresh_fraction=0.5,
        nonce="echo",
        publish_ca=None,
        publish_crl=None,
    )
    return replace(base, **fields)


def handle(
    *,
    source: Any,
    signer: Any,
    responder_cert: Any,
    clock: Any,
    cache: Any = None,
    queue_depth: Any = None,
    **fields: Any,
) -> Any:
    """A :class:`~hsmocsp.handle.Handle` (not prepared) on ``handle_config(**fields)``."""
    from hsmocsp.handle import Handle

    return Handle(
        handle_config(**fields),
        source=source,
        signer=signer,
        responder_cert=responder_cert,
        clock=clock,
        cache=cache,
        queue_depth=queue_depth,
    )


def server_handle(
    *,
    store: Any,
    signer: Any,
    watch: Any,
    clock: Any,
    hot_entries: int = 100_000,
    store_timeout: float = 1.0,
    **fields: Any,
) -> Any:
    """A server replica's :class:`~hsmocsp.server.handle.ServerHandle` on
    ``handle_config(**fields)``; ``hot_entries``/``store_timeout`` are the replica's
    ``hot_cache_entries`` and store bound."""
    from hsmocsp.server.handle import ServerHandle

    return ServerHandle(
        handle_config(**fields),
        store=store,
        signer=signer,
        watch=watch,
        clock=clock,
        hot_entries=hot_entries,
        store_timeout=store_timeout,
    )


def file_signer(
    path: str | Path, *, password_env: str | None = None, password_file: str | Path | None = None
) -> Any:
    """A :class:`~hsmocsp.signing.filekey.FileSigner` (not started) on the key at ``path``."""
    from hsmocsp.signing.filekey import FileSigner

    password = None
    if password_env is not None or password_file is not None:
        password = Secret(
            env=password_env, file=Path(password_file) if password_file is not None else None
        )
    return FileSigner(FileKeyConfig(key=Path(path), password=password))
