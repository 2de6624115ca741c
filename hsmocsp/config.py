"""The configuration file, read and validated once at start-up.

The YAML is turned into frozen dataclasses here and nowhere else, so every
later stage can trust its input. Every error names the file and the dotted key
(``handles.root.signer.key_label``) and says what is wrong; the process then
exits non-zero before it listens on anything.

Relative paths are resolved against the directory of the configuration file,
so a config and the files it names can move together.

Secrets are never read from the YAML itself: a PIN or Vault token comes from an
environment variable (``pin_env``/``token_env``) or a file (``pin_file``/
``token_file``), and the value is only read when the service starts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote_to_bytes

import yaml

from hsmocsp.errors import ConfigError
from hsmocsp.sources.certdb import DbConfig, read_db_config

DEFAULT_LISTEN = "tcp:8080:interface=127.0.0.1"
_HANDLE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_URL_PATH = re.compile(r"^/[A-Za-z0-9_./~-]*$")
_RESERVED_PATHS = ("/healthz", "/readyz", "/metrics")


@dataclass(frozen=True, slots=True)
class Secret:
    """Where a secret lives; :meth:`read` fetches it only when needed."""

    env: str | None = None
    file: Path | None = None

    def read(self, what: str) -> str:
        if self.env is not None:
            value = os.environ.get(self.env)
            if value is None:
                raise ConfigError("environment", self.env, f"{what} variable is not set")
            return value
        if self.file is not None:
            try:
                return self.file.read_text().strip()
            except OSError as err:
                raise ConfigError(str(self.file), what, f"cannot read: {err.strerror}") from err
        raise ConfigError("config", what, "no source given")


@dataclass(frozen=True, slots=True)
class TokenConfig:
    name: str
    module: Path
    token_label: str | None
    slot: int | None
    pin: Secret
    workers: int
    max_queue: int
    sign_timeout: float
    pipeline: int = 2


@dataclass(frozen=True, slots=True)
class Pkcs11KeyConfig:
    token: str
    key_label: str | None
    key_id: bytes | None
    kind: Literal["pkcs11"] = "pkcs11"


@dataclass(frozen=True, slots=True)
class FileKeyConfig:
    key: Path
    password: Secret | None
    kind: Literal["file"] = "file"


SignerConfig = Pkcs11KeyConfig | FileKeyConfig


@dataclass(frozen=True, slots=True)
class OpenSSLSourceConfig:
    index: Path
    crl: Path | None
    poll_interval: float
    kind: Literal["openssl"] = "openssl"


@dataclass(frozen=True, slots=True)
class VaultAuthConfig:
    method: Literal["token", "approle", "kubernetes"]
    token: Secret | None = None
    role_id: str | None = None
    secret_id: Secret | None = None
    role: str | None = None
    jwt_file: Path | None = None
    mount: str | None = None


@dataclass(frozen=True, slots=True)
class VaultTLSConfig:
    ca_file: Path | None
    cert_file: Path | None
    key_file: Path | None


@dataclass(frozen=True, slots=True)
class VaultSourceConfig:
    address: str
    mount: str
    namespace: str | None
    auth: VaultAuthConfig
    tls: VaultTLSConfig | None
    cache_ttl: float
    crl_refresh: float
    request_timeout: float
    kind: Literal["vault"] = "vault"


@dataclass(frozen=True, slots=True)
class CfsslSourceConfig:
    """cfssl's certdb, named by cfssl's own db-config JSON (read and checked here)."""

    db_config: Path
    db: DbConfig
    poll_interval: float
    full_reload: float
    lookup_timeout: float
    kind: Literal["cfssl"] = "cfssl"


@dataclass(frozen=True, slots=True)
class ResponseFileSourceConfig:
    """A file of pre-signed responses as ``cfssl ocspdump`` writes it, served as is."""

    path: Path
    poll_interval: float
    kind: Literal["response-file"] = "response-file"


SourceConfig = (
    OpenSSLSourceConfig | VaultSourceConfig | CfsslSourceConfig | ResponseFileSourceConfig
)


@dataclass(frozen=True, slots=True)
class HandleConfig:
    name: str
    path: str
    issuer: Path | None
    responder_cert: Path | None
    signer: SignerConfig | None  # None: `signer: none`, pre-signed responses served as they are
    source: SourceConfig
    validity: float
    max_age: float | None
    refresh_fraction: float
    nonce: Literal["echo", "ignore"]
    publish_ca: str | None
    publish_crl: str | None
    max_cached: int = 1_000_000
    max_unknown_cached: int = 10_000


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """Where one Redis (or Sentinel) listens: TCP ``host``/``port``, or a Unix socket."""

    host: str | None = None
    port: int = 6379
    unix: Path | None = None

    def __str__(self) -> str:
        if self.unix is not None:
            return f"unix:{self.unix}"
        return f"[{self.host}]:{self.port}" if self.host and ":" in self.host else (
            f"{self.host}:{self.port}"
        )


@dataclass(frozen=True, slots=True)
class StoreTLSConfig:
    ca_file: Path | None
    cert_file: Path | None
    key_file: Path | None
    server_name: str | None


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """``store:``; ``kind: sqlite`` is today's file in ``data_dir`` (the default when
    the block is absent), ``kind: redis`` the store shared by a signer and its servers."""

    kind: Literal["sqlite", "redis"] = "sqlite"
    address: RedisAddress | None = None
    sentinels: tuple[RedisAddress, ...] = ()
    master_name: str | None = None
    database: int = 0
    key_prefix: str = "hsmocsp:"
    username: str | None = None
    password: Secret | None = None
    # The sentinels' own login (``requirepass`` / an ACL user in sentinel.conf).
    sentinel_username: str | None = None
    sentinel_password: Secret | None = None
    tls: StoreTLSConfig | None = None
    timeout: float = 0.5
    max_pending: int = 100_000


Role = Literal["all", "signer", "server"]
ROLES: tuple[Role, ...] = ("all", "signer", "server")


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    listen: str
    data_dir: Path | None
    tokens: Mapping[str, TokenConfig]
    handles: tuple[HandleConfig, ...]
    max_request_size: int = 10_000
    presign_rate: float = 50.0
    http_workers: int = 1
    cert_expiry_warning_days: tuple[float, ...] = (30.0, 7.0, 1.0)
    # Per-connection limits (hsmocsp/web/limits.py): slow clients, floods, long URLs.
    request_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_connections: int = 0  # 0: derived from the descriptor limit
    max_url_length: int = 8192
    # Access log (hsmocsp/web/accesslog.py): off | combined | json, to a file or the service log.
    access_log: str = "off"
    access_log_file: Path | None = None
    # Replicas (issue #11, docs/design-replicas.md): what this process is, and the store.
    role: Role = "all"
    signer_url: str | None = None
    hot_cache_entries: int = 100_000
    store: StoreConfig = StoreConfig()


#: Upper bound for ``http_workers`` / ``--workers``: more processes than that is a typo.
MAX_HTTP_WORKERS = 64


class _Reader:
    """Typed access to one mapping of the YAML, naming the file and key on error."""

    def __init__(self, file: Path, prefix: str, data: Any, check_files: bool = True) -> None:
        self.file = file
        self.prefix = prefix
        #: False for ``role: server``: the CA's files and the PKCS#11 module named by a
        #: shared configuration live on the signer's box, not on a server's.
        self.check_files = check_files
        if not isinstance(data, dict):
            raise self.error(None, f"must be a mapping, not {type(data).__name__}")
        self.data: dict[str, Any] = data
        self.used: set[str] = set()

    def key(self, name: str | None) -> str:
        if name is None:
            return self.prefix or "(top level)"
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str | None, problem: str) -> ConfigError:
        return ConfigError(str(self.file), self.key(name), problem)

    def has(self, name: str) -> bool:
        return self.data.get(name) is not None

    def raw(self, name: str) -> Any:
        self.used.add(name)
        return self.data.get(name)

    def sub(self, name: str) -> _Reader:
        if not self.has(name):
            raise self.error(name, "is required")
        return _Reader(self.file, self.key(name), self.raw(name), self.check_files)

    def string(self, name: str, default: str | None = None, required: bool = False) -> str | None:
        value = self.raw(name)
        if value is None:
            if required:
                raise self.error(name, "is required")
            return default
        if not isinstance(value, str) or not value:
            raise self.error(name, "must be a non-empty string")
        return value

    def req_str(self, name: str) -> str:
        value = self.string(name, required=True)
        assert value is not None
        return value

    def number(self, name: str, default: float, minimum: float = 0.0) -> float:
        value = self.raw(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(name, "must be a number")
        if value < minimum:
            raise self.error(name, f"must be at least {minimum:g}")
        return float(value)

    def integer(self, name: str, default: int, minimum: int = 0) -> int:
        value = self.raw(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, "must be an integer")
        if value < minimum:
            raise self.error(name, f"must be at least {minimum}")
        return value

    def path(self, name: str, required: bool = False, must_exist: bool = True) -> Path | None:
        value = self.string(name, required=required)
        if value is None:
            return None
        p = Path(value).expanduser()
        if not p.is_absolute():
            p = (self.file.parent / p).resolve()
        if must_exist and self.check_files and not p.exists():
            raise self.error(name, f"file {p} does not exist")
        return p

    def secret(self, stem: str, required: bool = True) -> Secret | None:
        env, file = f"{stem}_env", f"{stem}_file"
        if self.has(stem):
            raise self.error(stem, f"secrets are not read from the config; use {env} or {file}")
        if self.has(env) and self.has(file):
            raise self.error(env, f"give {env} or {file}, not both")
        if self.has(env):
            return Secret(env=self.req_str(env))
        if self.has(file):
            return Secret(file=self.path(file, must_exist=False))
        if required:
            raise self.error(env, f"is required ({env} or {file})")
        return None

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.error(unknown[0], "unknown key")


def _url_path(r: _Reader, name: str, required: bool = False) -> str | None:
    value = r.string(name, required=required)
    if value is None:
        return None
    if not _URL_PATH.match(value) or "//" in value:
        raise r.error(name, f"{value!r} is not a URL path like /ocsp")
    value = value.rstrip("/") or "/"
    if value in _RESERVED_PATHS or value.startswith("/readyz/"):
        raise r.error(name, f"{value} is reserved for the service itself")
    return value


def _token(file: Path, name: str, data: Any, check_files: bool = True) -> TokenConfig:
    r = _Reader(file, f"tokens.{name}", data, check_files)
    label = r.string("token_label")
    slot = r.raw("slot")
    if (label is None) == (slot is None):
        raise r.error("token_label", "give token_label or slot (exactly one)")
    if slot is not None and (isinstance(slot, bool) or not isinstance(slot, int) or slot < 0):
        raise r.error("slot", "must be a non-negative integer")
    module = r.path("module", required=True)
    assert module is not None
    pin = r.secret("pin")
    assert pin is not None
    token = TokenConfig(
        name=name,
        module=module,
        token_label=label,
        slot=slot,
        pin=pin,
        workers=r.integer("workers", 2, minimum=1),
        max_queue=r.integer("max_queue", 1000, minimum=1),
        sign_timeout=r.number("sign_timeout", 10.0, minimum=0.1),
        pipeline=r.integer("pipeline", 2, minimum=1),
    )
    r.finish()
    return token


def _signer(r: _Reader, tokens: dict[str, TokenConfig]) -> SignerConfig:
    if r.has("uri"):
        uri = r.req_str("uri")
        r.finish()
        return pkcs11_uri_signer(uri, r.file, r.key("uri"), tokens, r.check_files)
    if r.has("file"):
        key = r.path("file", required=True)
        assert key is not None
        cfg: SignerConfig = FileKeyConfig(key=key, password=r.secret("password", required=False))
        r.finish()
        return cfg
    token = r.string("token", required=True)
    assert token is not None
    if token not in tokens:
        raise r.error("token", f"no token named {token!r} under tokens:")
    label = r.string("key_label")
    key_id_hex = r.raw("key_id")
    if (label is None) == (key_id_hex is None):
        raise r.error("key_label", "give key_label or key_id (exactly one)")
    key_id: bytes | None = None
    if key_id_hex is not None:
        try:
            key_id = bytes.fromhex(str(key_id_hex).replace(":", ""))
        except ValueError as err:
            raise r.error("key_id", "must be hex, like 0a1b or 0a:1b") from err
        if not key_id:
            raise r.error("key_id", "must not be empty")
    r.finish()
    return Pkcs11KeyConfig(token=token, key_label=label, key_id=key_id)


def _vault_auth(r: _Reader) -> VaultAuthConfig:
    method = r.string("method", default="token")
    if method == "token":
        cfg = VaultAuthConfig(method="token", token=r.secret("token"))
    elif method == "approle":
        cfg = VaultAuthConfig(
            method="approle",
            role_id=r.req_str("role_id"),
            # A file, re-read at every login: secret_ids rotate (response wrapping, agents).
            secret_id=Secret(file=r.path("secret_id_file", required=True, must_exist=False)),
            mount=r.string("mount", default="approle"),
        )
    elif method == "kubernetes":
        cfg = VaultAuthConfig(
            method="kubernetes",
            role=r.req_str("role"),
            jwt_file=r.path("jwt_file", must_exist=False)
            or Path("/var/run/secrets/kubernetes.io/serviceaccount/token"),
            mount=r.string("mount", default="kubernetes"),
        )
    else:
        raise r.error("method", f"{method!r} is not one of token, approle, kubernetes")
    r.finish()
    return cfg


def _source(r: _Reader) -> SourceConfig:
    kind = r.string("kind", required=True)
    cfg: SourceConfig
    if kind == "openssl":
        index = r.path("index", required=True)
        assert index is not None
        cfg = OpenSSLSourceConfig(
            index=index,
            crl=r.path("crl"),
            poll_interval=r.number("poll_interval", 2.0, minimum=0.1),
        )
    elif kind == "vault":
        address = r.req_str("address")
        if not address.startswith(("http://", "https://")):
            raise r.error("address", "must start with http:// or https://")
        tls: VaultTLSConfig | None = None
        if r.has("tls"):
            t = r.sub("tls")
            tls = VaultTLSConfig(
                ca_file=t.path("ca_file"),
                cert_file=t.path("cert_file"),
                key_file=t.path("key_file"),
            )
            if (tls.cert_file is None) != (tls.key_file is None):
                raise t.error("cert_file", "cert_file and key_file go together")
            t.finish()
        mount = r.req_str("mount").strip("/")
        if not mount:
            raise r.error("mount", "must name a mount (not only slashes)")
        cfg = VaultSourceConfig(
            address=address.rstrip("/"),
            mount=mount,
            namespace=r.string("namespace"),
            auth=_vault_auth(r.sub("auth"))
            if r.has("auth")
            else _vault_auth(
                _Reader(r.file, r.key("auth"), {"method": "token", "token_env": "VAULT_TOKEN"})
            ),
            tls=tls,
            cache_ttl=r.number("cache_ttl", 60.0),
            crl_refresh=r.number("crl_refresh", 300.0, minimum=1.0),
            request_timeout=r.number("request_timeout", 5.0, minimum=0.1),
        )
    elif kind == "cfssl":
        db_config = r.path("db_config", required=True)
        assert db_config is not None
        cfg = CfsslSourceConfig(
            db_config=db_config,
            db=read_db_config(db_config),
            poll_interval=r.number("poll_interval", 2.0, minimum=0.1),
            full_reload=r.number("full_reload", 3600.0),
            lookup_timeout=r.number("lookup_timeout", 5.0, minimum=0.1),
        )
    elif kind == "response-file":
        path = r.path("path", required=True)
        assert path is not None
        cfg = ResponseFileSourceConfig(
            path=path, poll_interval=r.number("poll_interval", 2.0, minimum=0.1)
        )
    else:
        raise r.error("kind", f"{kind!r} is not one of openssl, vault, cfssl, response-file")
    r.finish()
    return cfg


def _handle(
    file: Path, name: str, data: Any, tokens: dict[str, TokenConfig], check_files: bool = True
) -> HandleConfig:
    if not _HANDLE_NAME.match(name):
        raise ConfigError(str(file), f"handles.{name}", "name may use letters, digits, _ . -")
    r = _Reader(file, f"handles.{name}", data, check_files)
    path = _url_path(r, "path", required=True)
    assert path is not None
    source = _source(r.sub("source"))
    signer_none = r.raw("signer") == "none"
    issuer = r.path(
        "issuer",
        required=isinstance(source, OpenSSLSourceConfig)
        or (isinstance(source, CfsslSourceConfig) and not signer_none),
    )
    signer: SignerConfig | None
    if signer_none:
        # Pre-signed responses (cfssl's ocsp_responses table, an ocspdump file), as they are.
        signer = None
        if not isinstance(source, CfsslSourceConfig | ResponseFileSourceConfig):
            raise r.error("signer", "none is only for sources kind cfssl or response-file")
        responder_cert = r.path("responder_cert")
    else:
        if isinstance(source, ResponseFileSourceConfig):
            raise r.error("signer", "a response-file source is served as it is: signer: none")
        responder_cert = r.path("responder_cert", required=True)
        if isinstance(r.data.get("signer"), str):  # signer: "pkcs11:token=...;object=..."
            signer = pkcs11_uri_signer(
                r.req_str("signer"), file, r.key("signer"), tokens, r.check_files
            )
        else:
            signer = _signer(r.sub("signer"), tokens)
    validity = r.number("validity", 3600.0, minimum=60.0)
    max_age = r.raw("max_age")
    if max_age is not None:
        max_age = r.number("max_age", 0.0)
    refresh = r.number("refresh_fraction", 0.5)
    if not 0.0 < refresh <= 1.0:
        raise r.error("refresh_fraction", "must be in (0, 1]")
    nonce = r.string("nonce", default="echo")
    if nonce not in ("echo", "ignore"):
        raise r.error("nonce", "must be echo or ignore")
    max_cached = r.integer("max_cached", 1_000_000, minimum=1)
    max_unknown_cached = r.integer("max_unknown_cached", 10_000, minimum=1)
    publish_ca = publish_crl = None
    if r.has("publish"):
        p = r.sub("publish")
        publish_ca = _url_path(p, "ca")
        publish_crl = _url_path(p, "crl")
        p.finish()
    r.finish()
    return HandleConfig(
        name=name,
        path=path,
        issuer=issuer,
        responder_cert=responder_cert,
        signer=signer,
        source=source,
        validity=validity,
        max_age=max_age,
        refresh_fraction=refresh,
        nonce=nonce,  # type: ignore[arg-type]
        publish_ca=publish_ca,
        publish_crl=publish_crl,
        max_cached=max_cached,
        max_unknown_cached=max_unknown_cached,
    )


#: RFC 7512 path attributes we act on, and query attributes.
_URI_PATH_ATTRS = ("token", "object", "id", "type", "slot-id")
_URI_QUERY_ATTRS = ("module-path", "pin-source")


def pkcs11_uri_signer(
    uri: str, file: Path, key: str, tokens: dict[str, TokenConfig], check_files: bool = True
) -> Pkcs11KeyConfig:
    """A signer from an RFC 7512 ``pkcs11:`` URI.

    ``token`` (or ``slot-id``) names the token, ``object`` (CKA_LABEL) and/or ``id``
    (CKA_ID, percent-encoded bytes) the key, ``type`` if given must be ``private``.
    The token is one of ``tokens:`` with that label (or slot) -- its module, PIN
    and pool settings apply -- unless the URI names a ``module-path``; then it is
    a token of its own, whose PIN comes from ``pin-source`` (``file:`` URI or path;
    ``pin-value`` is refused: no secrets in the configuration).
    """

    shown = re.sub(r"pin-value=[^&]*", "pin-value=(hidden)", uri)  # never echo a PIN

    def error(problem: str) -> ConfigError:
        return ConfigError(str(file), key, f"{shown!r}: {problem}")

    if not uri.startswith("pkcs11:"):
        raise error("a PKCS#11 URI starts with 'pkcs11:' (RFC 7512)")
    body, _, query = uri[len("pkcs11:") :].partition("?")
    path_attrs = _uri_attributes(body, ";", error)
    query_attrs = _uri_attributes(query, "&", error)
    for name in path_attrs:
        if name not in _URI_PATH_ATTRS:
            raise error(f"attribute {name!r} not supported (use {', '.join(_URI_PATH_ATTRS)})")
    if "pin-value" in query_attrs:
        raise error("pin-value puts the PIN in the configuration; use pin-source=file:...")
    for name in query_attrs:
        if name not in _URI_QUERY_ATTRS:
            raise error(f"query attribute {name!r} not supported (use module-path, pin-source)")
    kind = path_attrs.get("type")
    if kind is not None and kind.decode() != "private":
        raise error("type must be private (the signing key)")
    label = path_attrs["object"].decode() if "object" in path_attrs else None
    key_id = path_attrs.get("id")
    if label is None and not key_id:
        raise error("name the key with object= (label) and/or id=")
    token_label = path_attrs["token"].decode() if "token" in path_attrs else None
    slot: int | None = None
    if "slot-id" in path_attrs:
        try:
            slot = int(path_attrs["slot-id"].decode())
        except ValueError:
            raise error("slot-id must be a number") from None
    if (token_label is None) == (slot is None):
        raise error("name the token with token= or slot-id= (exactly one)")
    if "module-path" not in query_attrs:
        if "pin-source" in query_attrs:
            raise error("pin-source goes with module-path (else the token's own PIN is used)")
        for name, token in tokens.items():
            if (token_label is not None and token.token_label == token_label) or (
                slot is not None and token.slot == slot
            ):
                return Pkcs11KeyConfig(token=name, key_label=label, key_id=key_id)
        raise error("no token under tokens: has this label/slot; add module-path and pin-source")
    module = Path(query_attrs["module-path"].decode())
    if not module.is_absolute():
        raise error("module-path must be an absolute path")
    if check_files and not module.exists():
        raise error(f"module {module} does not exist")
    if "pin-source" not in query_attrs:
        raise error("module-path needs pin-source=file:/path/to/pin")
    source = query_attrs["pin-source"].decode()
    pin_path = Path(source[len("file:") :] if source.startswith("file:") else source)
    if source.startswith("file://"):
        pin_path = Path(source[len("file://") :])
    if not pin_path.is_absolute():
        pin_path = (file.parent / pin_path).resolve()
    name = f"pkcs11:{token_label if token_label is not None else f'slot-{slot}'}"
    token = TokenConfig(
        name=name,
        module=module,
        token_label=token_label,
        slot=slot,
        pin=Secret(file=pin_path),
        workers=2,
        max_queue=1000,
        sign_timeout=10.0,
    )
    existing = tokens.setdefault(name, token)
    if existing != token:
        raise error(f"token {name} is already used with another module-path or pin-source")
    return Pkcs11KeyConfig(token=name, key_label=label, key_id=key_id)


def _uri_attributes(
    text: str, separator: str, error: Callable[[str], ConfigError]
) -> dict[str, bytes]:
    attrs: dict[str, bytes] = {}
    for part in text.split(separator) if text else ():
        name, eq, value = part.partition("=")
        if not eq or not name:
            raise error(f"{part!r} is not name=value")
        if name in attrs:
            raise error(f"{name} given twice")
        attrs[name] = unquote_to_bytes(value)
    return attrs


def _access_log_format(r: _Reader) -> str:
    if r.raw("access_log") is False:  # YAML reads a bare `off` as false
        return "off"
    value = r.string("access_log", default="off") or "off"
    if value not in ("off", "combined", "json"):
        raise r.error("access_log", f"{value!r} is not one of off, combined, json")
    return value


def _redis_address(r: _Reader, name: str, text: Any, default_port: int) -> RedisAddress:
    """``host:port``, ``[v6]:port``, ``host`` (default port) or ``unix:/path``."""
    if not isinstance(text, str) or not text:
        raise r.error(name, "must be host:port or unix:/path/to/socket")
    if text.startswith("unix:"):
        path = Path(text[len("unix:") :])
        if not path.is_absolute():
            path = (r.file.parent / path).resolve()
        return RedisAddress(unix=path)
    host, port_text = text, ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise r.error(name, f"{text!r} is not [v6-address]:port")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    elif ":" in text:
        raise r.error(name, f"{text!r} is not host:port (an IPv6 address goes in [brackets])")
    if not host or any(c in host for c in " /\t\n"):
        raise r.error(name, f"{text!r} is not host:port or unix:/path")
    port = default_port
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise r.error(name, f"{text!r}: the port must be a number from 1 to 65535")
        port = int(port_text)
    return RedisAddress(host=host, port=port)


def _store(r: _Reader) -> StoreConfig:
    kind = r.string("kind", default="sqlite")
    if kind == "sqlite":
        r.finish()  # nothing else applies to the local file
        return StoreConfig()
    if kind != "redis":
        raise r.error("kind", f"{kind!r} is not one of sqlite, redis")
    address = None
    if r.has("address"):
        address = _redis_address(r, "address", r.raw("address"), 6379)
    sentinels: tuple[RedisAddress, ...] = ()
    if r.has("sentinels"):
        raw = r.raw("sentinels")
        if not isinstance(raw, list) or not raw:
            raise r.error("sentinels", "must be a list of host:port")
        sentinels = tuple(_redis_address(r, "sentinels", s, 26379) for s in raw)
    master_name = r.string("master_name")
    if (address is None) == (not sentinels):
        raise r.error("address", "give address, or sentinels with master_name (exactly one)")
    if sentinels and master_name is None:
        raise r.error("master_name", "is required with sentinels")
    if master_name is not None and not sentinels:
        raise r.error("master_name", "goes with sentinels")
    prefix = r.string("key_prefix", default="hsmocsp:") or "hsmocsp:"
    if any(c.isspace() for c in prefix):
        raise r.error("key_prefix", "must not contain white space")
    username = r.string("username")
    password = r.secret("password", required=False)
    if username is not None and password is None:
        raise r.error("username", "an ACL user needs password_file or password_env")
    sentinel_username = r.string("sentinel_username")
    sentinel_password = r.secret("sentinel_password", required=False)
    if sentinel_username is not None and sentinel_password is None:
        raise r.error(
            "sentinel_username",
            "an ACL user needs sentinel_password_file or sentinel_password_env",
        )
    if sentinel_password is not None and not sentinels:
        key = "sentinel_password_env" if sentinel_password.env else "sentinel_password_file"
        raise r.error(key, "goes with sentinels")
    tls: StoreTLSConfig | None = None
    if r.has("tls"):
        t = r.sub("tls")
        tls = StoreTLSConfig(
            ca_file=t.path("ca_file"),
            cert_file=t.path("cert_file"),
            key_file=t.path("key_file"),
            server_name=t.string("server_name"),
        )
        if (tls.cert_file is None) != (tls.key_file is None):
            raise t.error("cert_file", "cert_file and key_file go together")
        t.finish()
        if address is not None and address.unix is not None:
            raise r.error("tls", "a Unix socket is not spoken to over TLS")
    cfg = StoreConfig(
        kind="redis",
        address=address,
        sentinels=sentinels,
        master_name=master_name,
        database=r.integer("database", 0, minimum=0),
        key_prefix=prefix,
        username=username,
        password=password,
        sentinel_username=sentinel_username,
        sentinel_password=sentinel_password,
        tls=tls,
        timeout=r.number("timeout", 0.5, minimum=0.01),
        max_pending=r.integer("max_pending", 100_000, minimum=1),
    )
    r.finish()
    return cfg


def _role(r: _Reader, override: str | None) -> Role:
    """``role`` from the file, or ``--role`` (``override``) instead."""
    value = r.string("role", default="all")
    if override is not None:
        value = override
    if value not in ROLES:
        where = f"--role {value}" if override is not None else repr(value)
        raise r.error("role", f"{where} is not one of {', '.join(ROLES)}")
    return value


def _check_role(r: _Reader, cfg: Config, override: str | None) -> None:
    """``signer`` and ``server`` share responses through Redis; ``server`` forwards
    what the store lacks to ``signer_url``."""
    said = f" (--role {override})" if override is not None else ""
    if cfg.role in ("signer", "server") and cfg.store.kind != "redis":
        raise r.error("role", f"{cfg.role}{said} needs a shared store: store.kind: redis")
    if cfg.role == "server" and cfg.signer_url is None:
        raise r.error("signer_url", f"is required with role: server{said}")


def _signer_url(r: _Reader) -> str | None:
    url = r.string("signer_url")
    if url is None:
        return None
    if not re.match(r"^https?://[^/\s]+/?$", url):
        raise r.error("signer_url", f"{url!r} is not like http://host:port (no path)")
    return url.rstrip("/")


def parse_config(file: Path, data: Any, role: str | None = None) -> Config:
    """Validate already-loaded YAML ``data`` read from ``file``; ``role`` (``--role``)
    replaces the file's ``role``."""
    r = _Reader(file, "", data)
    chosen = _role(r, role)
    # A server reads one configuration shared with its signer, on a box without the CA's
    # files or the PKCS#11 module: it checks their keys, not that the files exist.
    files = chosen != "server"
    tokens: dict[str, TokenConfig] = {}
    if r.has("tokens"):
        t = r.sub("tokens")
        for name in t.data:
            tokens[name] = _token(file, name, t.raw(name), files)
    h = r.sub("handles")
    if not h.data:
        raise h.error(None, "at least one handle is required")
    handles = tuple(_handle(file, str(name), h.raw(name), tokens, files) for name in h.data)
    seen: dict[str, str] = {}
    for handle in handles:
        for kind, url in (
            ("path", handle.path),
            ("publish.ca", handle.publish_ca),
            ("publish.crl", handle.publish_crl),
        ):
            if url is None:
                continue
            if url in seen:
                raise ConfigError(
                    str(file),
                    f"handles.{handle.name}.{kind}",
                    f"{url} is already used by {seen[url]}",
                )
            seen[url] = f"handles.{handle.name}.{kind}"
    cfg = Config(
        path=file,
        listen=r.string("listen", default=DEFAULT_LISTEN) or DEFAULT_LISTEN,
        data_dir=r.path("data_dir", must_exist=False),
        tokens=tokens,
        handles=handles,
        max_request_size=r.integer("max_request_size", 10_000, minimum=256),
        presign_rate=r.number("presign_rate", 50.0),
        http_workers=r.integer("http_workers", 1, minimum=1),
        cert_expiry_warning_days=_warning_days(r, "cert_expiry_warning_days"),
        request_timeout=r.number("request_timeout", 10.0, minimum=0.5),
        idle_timeout=r.number("idle_timeout", 60.0, minimum=0.5),
        max_connections=r.integer("max_connections", 0, minimum=0),
        max_url_length=r.integer("max_url_length", 8192, minimum=256),
        access_log=_access_log_format(r),
        access_log_file=r.path("access_log_file", must_exist=False),
        role=chosen,
        signer_url=_signer_url(r),
        hot_cache_entries=r.integer("hot_cache_entries", 100_000, minimum=1),
        store=_store(r.sub("store")) if r.has("store") else StoreConfig(),
    )
    _check_role(r, cfg, role)
    if cfg.http_workers > MAX_HTTP_WORKERS:
        raise r.error("http_workers", f"must be at most {MAX_HTTP_WORKERS}")
    r.finish()
    return cfg


def _warning_days(r: _Reader, name: str) -> tuple[float, ...]:
    """Lead times (days before a responder certificate expires) at which to warn."""
    raw = r.raw(name)
    if raw is None:
        return (30.0, 7.0, 1.0)
    if not isinstance(raw, list) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in raw
    ):
        raise r.error(name, "must be a list of positive numbers of days, e.g. [30, 7, 1]")
    return tuple(sorted((float(v) for v in raw), reverse=True))


def load_config(file: Path, role: str | None = None) -> Config:
    """Read and validate the YAML configuration at ``file`` (``role``: ``--role``)."""
    try:
        text = file.read_text()
    except OSError as err:
        raise ConfigError(str(file), "(file)", f"cannot read: {err.strerror}") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(file)"
        raise ConfigError(
            str(file), where, f"not valid YAML: {getattr(err, 'problem', err)}"
        ) from err
    return parse_config(file.resolve(), data, role)
