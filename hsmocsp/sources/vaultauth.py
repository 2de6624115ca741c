"""Vault/OpenBao HTTP access and authentication (token, AppRole, Kubernetes).

:class:`VaultTransport` is the one place that talks HTTP to Vault: it adds the token and
namespace headers, applies the request timeout with the injected clock, and turns every
network failure into :class:`~hsmocsp.errors.SourceUnavailable`. Auth methods get the
transport through :meth:`VaultAuth.bind` so that login and renewal use the same client,
TLS settings and clock as the status lookups.

Every auth method offers ``token() -> Deferred[str]`` and ``invalidate()`` (the caller saw
a 403: forget the token, so the next ``token()`` re-reads or re-logs in). Tokens are never
put in log lines, exception messages or reprs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from hsmocsp.errors import SourceError, SourceUnavailable
from hsmocsp.inflight import OneAtATime

__all__ = [
    "AppRoleAuth",
    "KubernetesAuth",
    "TokenAuth",
    "VaultAuth",
    "VaultResponse",
    "VaultTransport",
]

log = Logger()

#: Re-login / renew when this fraction of a lease has elapsed.
RENEW_FRACTION = 2 / 3
#: After a failed renewal or background re-login, try again after at most this long.
RETRY_DELAY = 30.0


@dataclass(frozen=True, slots=True)
class VaultResponse:
    """Status code and body of one Vault reply (bodies are small: JSON or one DER object)."""

    code: int
    body: bytes
    path: str = field(default="")

    def json(self) -> dict[str, Any]:
        """The body as a JSON object; :class:`SourceError` if it is not one."""
        try:
            value = json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as err:
            raise SourceError(f"vault {self.path}: HTTP {self.code} with a non-JSON body") from err
        if not isinstance(value, dict):
            raise SourceError(f"vault {self.path}: HTTP {self.code}: JSON is not an object")
        return value

    def errors(self) -> str:
        """Vault's ``errors`` list as one string, for messages ('' when absent or unparsable)."""
        try:
            value = json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            return ""
        errs = value.get("errors") if isinstance(value, dict) else None
        if isinstance(errs, list):
            return "; ".join(str(e)[:200] for e in errs)
        return ""


class _HTTPClient(Protocol):
    """The part of ``treq.client.HTTPClient`` (and ``treq.testing.StubTreq``) we use."""

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]: ...


class VaultTransport:
    """HTTP to one Vault server: base address, namespace, timeout, clock.

    ``request`` fails with :class:`SourceUnavailable` when Vault cannot be reached or does
    not answer within ``timeout`` seconds; any HTTP status is returned to the caller, who
    knows what a 404 means for its path.
    """

    def __init__(
        self,
        *,
        address: str,
        http_client: _HTTPClient,
        clock: IReactorTime,
        namespace: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.address = address.rstrip("/")
        self.namespace = namespace
        self.clock = clock
        self.timeout = timeout
        self._http = http_client
        self._inflight: set[Deferred[VaultResponse]] = set()
        self._closed = False

    def __repr__(self) -> str:
        return f"VaultTransport({self.address!r}, namespace={self.namespace!r})"

    def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        json_body: Mapping[str, Any] | None = None,
    ) -> Deferred[VaultResponse]:
        """``method /v1/<path>``; the result's body is fully read."""
        path = path.lstrip("/")
        where = f"vault {self.address} {method} /v1/{path}"
        if self._closed:
            stopped: Deferred[VaultResponse] = Deferred()
            stopped.errback(SourceUnavailable(f"{where}: the source is stopped"))
            return stopped
        d = Deferred.fromCoroutine(self._request(method, path, token, json_body))

        def timed_out(result: object, timeout: float) -> None:
            # The agent wraps our cancellation (ResponseNeverReceived etc.): say what happened.
            raise TimeoutError(f"no answer within {timeout:g}s")

        d.addTimeout(self.timeout, self.clock, onTimeoutCancel=timed_out)

        def translate(failure: Failure) -> None:
            reason = failure.value
            if isinstance(reason, CancelledError) and self._closed:
                # Cancelled by close(), not by the caller: a stopped source, which the
                # callers (pollers, renewals, lookups) already handle as "cannot reach".
                raise SourceUnavailable(f"{where}: the source is stopped") from reason
            if isinstance(reason, SourceUnavailable | SourceError | CancelledError):
                failure.raiseException()
            if isinstance(reason, TimeoutError):
                raise SourceUnavailable(f"{where}: no answer within {self.timeout:g}s") from reason
            # Connection refused, reset, TLS failure, DNS: all mean "cannot reach".
            raise SourceUnavailable(f"{where}: {type(reason).__name__}: {reason}"[:500]) from reason

        d.addErrback(translate)
        self._inflight.add(d)

        def done(result: object) -> object:
            self._inflight.discard(d)
            return result

        d.addBoth(done)
        return d

    def close(self) -> None:
        """Fail every request in flight (:class:`SourceUnavailable`) and refuse new ones.

        Called by the source's ``stop()``: a request still waiting for Vault would
        otherwise go on after stop (its timeout timer running), and its connection, once
        answered, would go back to the HTTP pool after the pool was emptied.
        """
        self._closed = True
        for d in list(self._inflight):
            d.cancel()

    async def _request(
        self,
        method: str,
        path: str,
        token: str | None,
        json_body: Mapping[str, Any] | None,
    ) -> VaultResponse:
        headers = {"X-Vault-Request": "true"}
        if token is not None:
            headers["X-Vault-Token"] = token
        if self.namespace:
            headers["X-Vault-Namespace"] = self.namespace
        kwargs: dict[str, Any] = {"headers": headers, "allow_redirects": False}
        if json_body is not None:
            kwargs["json"] = dict(json_body)
        response = await self._http.request(method, f"{self.address}/v1/{path}", **kwargs)
        body: bytes = await response.content()
        return VaultResponse(int(response.code), body, f"/v1/{path}")


class VaultAuth(Protocol):
    """What :class:`~hsmocsp.sources.vault.VaultSource` needs from an auth method."""

    def bind(self, transport: VaultTransport) -> None:
        """Use ``transport`` (and its clock) for logins and renewals; called by ``start``."""
        ...

    def token(self) -> Deferred[str]:
        """A token believed valid; may log in (fails with SourceError/SourceUnavailable)."""
        ...

    def invalidate(self) -> None:
        """Vault refused the token (403): the next ``token()`` must fetch a fresh one."""
        ...

    def stop(self) -> None:
        """Cancel renewal timers (no dirty reactor)."""
        ...


class _Renewer:
    """Shared machinery: one pending timer, one in-flight fetch shared by all waiters."""

    _transport: VaultTransport | None
    _timer: IDelayedCall | None
    _fetching: OneAtATime[str]
    _stopped: bool

    def __init__(self) -> None:
        self._transport = None
        self._timer = None
        self._fetching = OneAtATime()
        self._stopped = False

    def bind(self, transport: VaultTransport) -> None:
        self._transport = transport
        self._stopped = False

    @property
    def transport(self) -> VaultTransport:
        if self._transport is None:
            raise SourceError(f"{type(self).__name__} used before bind()")
        return self._transport

    def _schedule(self, delay: float, action: Callable[[], object]) -> None:
        self._cancel_timer()
        if self._stopped:
            return  # a renewal or login answered after stop(): nothing more to keep up
        self._timer = self.transport.clock.callLater(max(0.0, delay), action)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _shared(self, fetch: Callable[[], Deferred[str]]) -> Deferred[str]:
        """Run ``fetch`` once for every concurrent caller; cancelling one waiter is harmless."""
        return self._fetching.run(fetch)

    def stop(self) -> None:
        self._stopped = True
        self._cancel_timer()


class TokenAuth(_Renewer):
    """A fixed token (literal or env var) or one kept in a file.

    File tokens are re-read whenever the file changes (inode, size or mtime), which is how
    Vault Agent's auto-auth sink keeps them fresh; nothing is renewed by us then. Literal
    and env tokens are looked up once (``auth/token/lookup-self``) and, when renewable,
    renewed with ``auth/token/renew-self`` at 2/3 of their TTL.
    """

    def __init__(
        self,
        *,
        token: str | None = None,
        env: str | None = None,
        file: str | Path | None = None,
        renew: bool = True,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        if sum(x is not None for x in (token, env, file)) != 1:
            raise ValueError("TokenAuth needs exactly one of token=, env=, file=")
        self._file = Path(file) if file is not None else None
        self._env = env
        self._renew = renew and self._file is None
        self._stat: tuple[int, int, int] | None = None
        self._token: str | None = None
        self._looked_up = False
        if env is not None:
            value = (environ if environ is not None else os.environ).get(env, "").strip()
            if not value:
                raise SourceError(f"vault token: environment variable {env} is unset or empty")
            self._token = value
        elif token is not None:
            if not token.strip():
                raise SourceError("vault token: empty token")
            self._token = token.strip()

    def __repr__(self) -> str:
        where = f"file={str(self._file)!r}" if self._file else f"env={self._env!r}"
        return f"TokenAuth({where})"

    def _read_file(self) -> str:
        assert self._file is not None
        try:
            st = os.stat(self._file)
            key = (st.st_ino, st.st_size, st.st_mtime_ns)
            if key == self._stat and self._token is not None:
                return self._token
            value = self._file.read_text("utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            if self._token is not None:
                # Vault Agent may be replacing the file right now: keep the last token.
                return self._token
            raise SourceError(f"vault token file {self._file}: {_why(err)}") from err
        if not value:
            if self._token is not None:
                return self._token
            raise SourceError(f"vault token file {self._file} is empty")
        self._stat, self._token = key, value
        return value

    def token(self) -> Deferred[str]:
        if self._file is not None:
            try:
                return succeed(self._read_file())
            except SourceError as err:
                return Deferred.fromCoroutine(_raise(err))
        assert self._token is not None
        if self._renew and not self._looked_up and self._transport is not None:
            self._looked_up = True
            self._lookup_later(0)
        return succeed(self._token)

    def invalidate(self) -> None:
        # A file token: force a re-read. A literal token cannot be replaced: the next
        # request uses it again and the caller reports permission denied.
        self._stat = None

    def _lookup_later(self, delay: float) -> None:
        self._schedule(delay, lambda: self._renew_cycle(lookup=True))

    def _renew_cycle(self, lookup: bool) -> Deferred[None]:
        return Deferred.fromCoroutine(self._renew_once(lookup))

    async def _renew_once(self, lookup: bool) -> None:
        path = "auth/token/lookup-self" if lookup else "auth/token/renew-self"
        method = "GET" if lookup else "POST"
        try:
            resp = await self.transport.request(
                method, path, token=self._token, json_body=None if lookup else {}
            )
            body = resp.json() if resp.code == 200 else {}
        except (SourceError, SourceUnavailable) as err:
            log.warn("vault token {what} failed: {err}", what=path, err=str(err))
            self._schedule(RETRY_DELAY, lambda: self._renew_cycle(lookup))
            return
        if resp.code != 200:
            log.warn(
                "vault token {what}: HTTP {code} {errors}",
                what=path,
                code=resp.code,
                errors=resp.errors(),
            )
            return
        if lookup:
            data = body.get("data") or {}
            ttl, renewable = data.get("ttl"), data.get("renewable")
        else:
            auth = body.get("auth") or {}
            ttl, renewable = auth.get("lease_duration"), auth.get("renewable")
        if not isinstance(ttl, int) or ttl <= 0:
            return  # a root or non-expiring token: nothing to do
        if not renewable:
            log.warn("vault token is not renewable and expires in {ttl}s", ttl=ttl)
            return
        self._schedule(ttl * RENEW_FRACTION, lambda: self._renew_cycle(False))


def _why(err: Exception) -> str:
    """An OSError's reason without repeating the file name."""
    return (err.strerror if isinstance(err, OSError) else None) or str(err)


async def _raise(err: Exception) -> str:
    raise err


class _LoginAuth(_Renewer):
    """Log in at ``auth/<mount>/login``; re-login at 2/3 of the lease and after a 403."""

    method_name = "login"

    def __init__(self, mount: str) -> None:
        super().__init__()
        self.mount = mount.strip("/")
        self._token: str | None = None
        self._expires_at: float | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mount={self.mount!r})"

    def _login_body(self) -> dict[str, str]:
        raise NotImplementedError

    def token(self) -> Deferred[str]:
        now = self.transport.clock.seconds()
        if self._token is not None and (self._expires_at is None or now < self._expires_at):
            return succeed(self._token)
        return self._shared(self._login)

    def invalidate(self) -> None:
        self._token = None
        self._expires_at = None
        self._cancel_timer()

    def _login(self) -> Deferred[str]:
        return Deferred.fromCoroutine(self._do_login())

    async def _do_login(self) -> str:
        path = f"auth/{self.mount}/login"
        body = self._login_body()  # SourceError if the credential file is unreadable
        resp = await self.transport.request("POST", path, json_body=body)
        if resp.code in (400, 401, 403):
            raise SourceError(
                f"vault {self.method_name} at {self.transport.address}/v1/{path} refused "
                f"(HTTP {resp.code}): {resp.errors() or 'permission denied'}"
            )
        if resp.code != 200:
            raise SourceUnavailable(
                f"vault {self.method_name} at /v1/{path}: HTTP {resp.code} {resp.errors()}"
            )
        auth = resp.json().get("auth")
        token = auth.get("client_token") if isinstance(auth, dict) else None
        if not isinstance(token, str) or not token:
            raise SourceError(f"vault {self.method_name} at /v1/{path}: no client_token")
        assert isinstance(auth, dict)
        lease = auth.get("lease_duration")
        self._token = token
        now = self.transport.clock.seconds()
        if isinstance(lease, int) and lease > 0:
            self._expires_at = now + lease
            self._schedule(lease * RENEW_FRACTION, self._background_login)
        else:
            self._expires_at = None
        log.info(
            "vault {method} at /v1/{path} succeeded (lease {lease}s)",
            method=self.method_name,
            path=path,
            lease=lease,
        )
        return token

    def _background_login(self) -> None:
        def failed(failure: Failure) -> None:
            log.warn(
                "vault background {method} failed: {err}",
                method=self.method_name,
                err=str(failure.value),
            )
            now = self.transport.clock.seconds()
            left = (self._expires_at - now) if self._expires_at is not None else RETRY_DELAY
            self._schedule(min(RETRY_DELAY, max(1.0, left / 2)), self._background_login)

        self._shared(self._login).addErrback(failed)


def _read_secret_file(path: Path, what: str) -> str:
    try:
        value = path.read_text("utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise SourceError(f"vault {what} file {path}: {_why(err)}") from err
    if not value:
        raise SourceError(f"vault {what} file {path} is empty")
    return value


class AppRoleAuth(_LoginAuth):
    """AppRole login; the secret_id is read from its file at every login (it may rotate)."""

    method_name = "approle login"

    def __init__(self, role_id: str, secret_id_file: str | Path, mount: str = "approle") -> None:
        super().__init__(mount)
        if not role_id.strip():
            raise SourceError("vault approle: empty role_id")
        self._role_id = role_id.strip()
        self._secret_id_file = Path(secret_id_file)

    def _login_body(self) -> dict[str, str]:
        return {
            "role_id": self._role_id,
            "secret_id": _read_secret_file(self._secret_id_file, "approle secret_id"),
        }


#: Where Kubernetes mounts the pod's service-account token.
K8S_JWT_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/token"


class KubernetesAuth(_LoginAuth):
    """Kubernetes login with the pod's service-account JWT (re-read at every login).

    Only unit-tested against a fake: it needs a Kubernetes API server to validate the JWT.
    """

    method_name = "kubernetes login"

    def __init__(
        self, jwt_file: str | Path = K8S_JWT_FILE, role: str = "", mount: str = "kubernetes"
    ) -> None:
        super().__init__(mount)
        if not role:
            raise SourceError("vault kubernetes auth: role is required")
        self._role = role
        self._jwt_file = Path(jwt_file)

    def _login_body(self) -> dict[str, str]:
        return {"role": self._role, "jwt": _read_secret_file(self._jwt_file, "kubernetes jwt")}
