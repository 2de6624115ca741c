"""``hsmocsp check`` for ``role: server``: the store and the signer, not a token.

A server replica (docs/design-replicas.md) holds no key: it reads what the signer
wrote to the shared Redis and forwards what is missing to ``signer_url``. So its
pre-flight check is about those two, and needs no PKCS#11 module, PIN or source:

``store``
    Connects as the service does (Sentinel discovery, AUTH with the password file,
    TLS, ``SELECT``, ``ROLE`` must say primary), then ``PING`` must answer ``PONG``,
    and the signer's marker key ``<key_prefix>signer`` must be there: a signer sets
    it on its first write, so its absence means no signer has written to this
    address/database/prefix (a different ``store`` block than the signer's, or the
    signer has not written yet). The responses held under ``<key_prefix>r:<handle>:``
    are counted per handle (a bounded ``SCAN``), for information.
``signer``
    ``GET <signer_url>/readyz`` must answer 200.

One line each, ``ok`` or ``FAILED`` with the reason; every check runs even after
one failed, so an operator sees all that is wrong at once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Protocol, TextIO

from twisted.internet.defer import Deferred

from hsmocsp.config import Config
from hsmocsp.errors import HsmOcspError
from hsmocsp.stores.resp import Arg, Reply, ReplyError

EXIT_OK = 0
EXIT_FAILED = 1
#: Seconds the signer's ``/readyz`` may take.
SIGNER_TIMEOUT = 5.0
#: ``SCAN`` rounds (of ``COUNT`` keys each) when counting held responses: a count of a
#: big store is not worth a slow check, the marker says what matters.
SCAN_ROUNDS = 20
SCAN_COUNT = 1000


class Client(Protocol):
    """What the check needs of a Redis connection (:class:`~hsmocsp.stores.resp.RespProtocol`)."""

    def execute(self, *args: Arg, timeout: float | None = None) -> Deferred[Reply]: ...

    def abort(self, why: str) -> None: ...


Connect = Callable[[], Awaitable[Client]]
#: ``GET url`` -> (HTTP status, body); raises when there is no answer.
HttpGet = Callable[[str], Awaitable[tuple[int, bytes]]]


def _why(err: BaseException) -> str:
    return str(err) if isinstance(err, HsmOcspError) else (str(err) or type(err).__name__)


def _text(value: Reply) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else repr(value)


def describe_store(cfg: Config) -> str:
    store = cfg.store
    where = (
        str(store.address)
        if store.address is not None
        else f"sentinel master {store.master_name} via " + ", ".join(map(str, store.sentinels))
    )
    tls = ", TLS" if store.tls is not None else ""
    return f"redis {where}{tls}, database {store.database}, key_prefix {store.key_prefix!r}"


async def check_store(cfg: Config, connect: Connect) -> tuple[bool, str]:
    """(ok, what was found) for the shared store; never raises."""
    prefix = cfg.store.key_prefix
    timeout = max(cfg.store.timeout, 1.0)
    try:
        client = await connect()
    except Exception as err:
        return False, _why(err)
    try:
        pong = await client.execute("PING", timeout=timeout)
        if pong != "PONG":
            return False, f"PING answered {_text(pong)}"
        marker = f"{prefix}signer"
        value = await client.execute("GET", marker, timeout=timeout)
        if isinstance(value, ReplyError):
            return False, f"GET {marker} refused: {value.message}"
        if value is None:
            return False, (
                f"answers PING, but no key {marker}: no signer has written to this "
                "store (its store.address/database/key_prefix differ, or it has "
                "not written a response yet)"
            )
        held = await _count_held(client, prefix, timeout)
        return True, f"answers PING; marker {marker} {_when(value)}; {_held_text(cfg, held)}"
    except Exception as err:
        return False, _why(err)
    finally:
        client.abort("checked")


def _when(value: Reply) -> str:
    try:
        at = datetime.fromtimestamp(int(_text(value)), UTC)
    except (ValueError, OverflowError, OSError):
        return "present"
    return f"set at {at:%Y-%m-%d %H:%M:%S}Z"


async def _count_held(client: Client, prefix: str, timeout: float) -> tuple[dict[str, int], bool]:
    """Responses per handle name under ``<prefix>r:<handle>:<serial>``; True if the
    scan stopped before the end."""
    counts: dict[str, int] = {}
    cursor: bytes = b"0"
    start = len(prefix) + 2
    for _ in range(SCAN_ROUNDS):
        reply = await client.execute(
            "SCAN", cursor, "MATCH", f"{prefix}r:*", "COUNT", SCAN_COUNT, timeout=timeout
        )
        if isinstance(reply, ReplyError):
            raise HsmOcspError(f"SCAN refused: {reply.message}")
        keys = reply[1] if isinstance(reply, list) and len(reply) == 2 else None
        if not isinstance(reply, list) or not isinstance(keys, list):
            raise HsmOcspError(f"SCAN answered {reply!r}")
        nxt = reply[0]
        for key in keys:
            if isinstance(key, bytes):
                handle = key[start:].rsplit(b":", 1)[0].decode("utf-8", "replace")
                counts[handle] = counts.get(handle, 0) + 1
        if nxt in (b"0", "0", 0) or not isinstance(nxt, bytes):
            return counts, False
        cursor = nxt
    return counts, True


def _held_text(cfg: Config, held: tuple[dict[str, int], bool]) -> str:
    counts, partial = held
    at_least = "at least " if partial else ""
    parts = [f"{h.name} {at_least}{counts.get(h.name, 0)}" for h in cfg.handles]
    text = "responses held: " + ", ".join(parts)
    others = sorted(set(counts) - {h.name for h in cfg.handles})
    if others:
        text += " (also of handles not in this configuration: " + ", ".join(others) + ")"
    return text


async def check_signer(signer_url: str, get: HttpGet) -> tuple[bool, str]:
    """(ok, what was found) for ``GET <signer_url>/readyz``; never raises."""
    url = signer_url.rstrip("/") + "/readyz"
    try:
        code, body = await get(url)
    except Exception as err:
        return False, f"{url}: no answer: {_why(err)}"
    if code != 200:
        said = body.decode("utf-8", "replace").strip().splitlines()
        return False, f"{url} answered HTTP {code}" + (f": {said[0][:200]}" if said else "")
    return True, f"{url} answered 200"


def redis_connect(cfg: Config) -> Callable[[Any], Connect]:
    """The service's own way in (:class:`~hsmocsp.stores.redis.Connector`), given a
    reactor. The passwords (Redis', the sentinels') and TLS files are read now, before
    any reactor runs: a missing one is a :class:`~hsmocsp.errors.ConfigError` naming
    its key."""
    from hsmocsp.stores.redis import Connector, tls_creator

    store = cfg.store
    password = store.password.read("store.password") if store.password is not None else None
    sentinel_password = (
        store.sentinel_password.read("store.sentinel_password")
        if store.sentinel_password is not None
        else None
    )
    if store.tls is not None:
        tls_creator(store, "localhost", str(cfg.path))

    def on(reactor: Any) -> Connect:
        connector = Connector(store, reactor, password, str(cfg.path), sentinel_password)

        async def connect() -> Client:
            return await connector.connect("check")

        return connect

    return on


def treq_get(reactor: Any) -> HttpGet:
    async def get(url: str) -> tuple[int, bytes]:
        import treq

        response = await treq.get(
            url, timeout=SIGNER_TIMEOUT, persistent=False, reactor=reactor
        )
        body = await treq.content(response)
        return int(response.code), bytes(body)

    return get


async def run_server_check(
    reactor: Any,
    cfg: Config,
    out: TextIO,
    connect: Connect | None = None,
    get: HttpGet | None = None,
) -> int:
    """Lines ``configuration``, ``store``, ``signer``; 0 if all are ok, 1 otherwise.
    ``connect``: from :func:`redis_connect`; ``get``: the signer's HTTP (treq)."""
    assert cfg.signer_url is not None  # the configuration requires it with role: server
    if connect is None:
        connect = redis_connect(cfg)(reactor)
    handles = ", ".join(f"{h.name} {h.path}" for h in cfg.handles)
    out.write(
        f"configuration: ok: {cfg.path}, role server, handles {handles}; "
        f"store {describe_store(cfg)}; signer {cfg.signer_url}\n"
    )
    failed = 0
    for name in ("store", "signer"):
        if name == "store":
            ok, text = await check_store(cfg, connect)
        else:
            ok, text = await check_signer(cfg.signer_url, get or treq_get(reactor))
        failed += not ok
        out.write(f"{name}: {'ok' if ok else 'FAILED'}: {text}\n")
        out.flush()
    return EXIT_FAILED if failed else EXIT_OK


__all__ = ["check_signer", "check_store", "redis_connect", "run_server_check"]
