"""Pre-signed responses from a file as ``cfssl ocspdump`` writes it, served as they are.

The file holds one standard-base64 DER OCSPResponse per line (``cfssl ocspserve
-responses FILE`` reads the same). It is read in a thread, checked completely (a bad line
is named by its number), and replaces what is served only when every line is good and
the file is not empty; it is polled every ``poll_interval`` by ``(mtime, size, inode)``,
so both an in-place rewrite and a rename over it are seen, and read once it has not
changed for one poll (a shell's ``>`` truncates first). A problem is logged once until
the file changes again.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure

from hsmocsp.errors import SourceError
from hsmocsp.presigned import PresignedResponse, parse_presigned
from hsmocsp.sources.poller import Poller
from hsmocsp.sources.state import PresignedOnly, SourceState

if TYPE_CHECKING:
    from hsmocsp.config import ResponseFileSourceConfig

__all__ = ["ResponseFileSource", "read_response_file"]

log = Logger()

_Sig = tuple[int, int, int]


def read_response_file(path: Path) -> tuple[list[PresignedResponse], _Sig]:
    """Parse the whole file; :class:`SourceError` naming the file and line on any problem."""
    try:
        with path.open("rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
    except OSError as err:
        raise SourceError(f"{path}: cannot read: {err.strerror or err}") from err
    out: list[PresignedResponse] = []
    for number, line in enumerate(data.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            der = base64.b64decode(line, validate=True)
            out.extend(parse_presigned(der))
        except (binascii.Error, ValueError) as err:
            raise SourceError(f"{path}: line {number}: {err}") from err
    return out, (st.st_mtime_ns, st.st_size, st.st_ino)


class ResponseFileSource(PresignedOnly):
    """A :class:`~hsmocsp.presigned.PresignedSource` over one ocspdump file."""

    def __init__(self, config: ResponseFileSourceConfig, *, reactor: Any) -> None:
        path = config.path
        self._reactor = reactor
        self.path = path
        self._responses: list[PresignedResponse] = []
        self._sig: _Sig | None = None
        self._failed_sig: _Sig | None = None
        self._settling: _Sig | None = None
        self.state = SourceState(f"response file {path}", reactor, log_changes=False)
        self._started = False
        self._problem = ""
        self._poller = Poller(self._check, config.poll_interval, reactor, name=str(path))

    def __repr__(self) -> str:
        return f"ResponseFileSource({str(self.path)!r})"

    # --- PresignedSource ------------------------------------------------------------------

    @property
    def where(self) -> str:
        return str(self.path)

    def responses(self) -> Sequence[PresignedResponse]:
        return self._responses

    def ready(self) -> bool:
        return self._started

    def start(self) -> Deferred[None]:
        def loaded(result: tuple[list[PresignedResponse], _Sig]) -> None:
            self._install(*result)
            self._started = True
            self.state.loaded()
            log.info(
                "{path}: {n} pre-signed responses", path=str(self.path), n=len(self._responses)
            )
            self._poller.start()

        return deferToThread(read_response_file, self.path).addCallback(loaded)

    def stop(self) -> Deferred[None]:
        self._started = False
        self._poller.stop()
        return succeed(None)

    def refresh(self) -> Deferred[None]:
        """Look at the file now, or join the look in progress; never fails."""
        return self._poller.now()

    # --- polling --------------------------------------------------------------------------

    def _check(self) -> Deferred[None]:
        """One look at the file (run by :attr:`_poller`, one at a time); never fails."""
        if not self._started:
            return succeed(None)
        try:
            st = os.stat(self.path)
            sig: _Sig = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError as err:
            self._report(f"{self.path}: cannot read: {err.strerror or err}; serving the last one")
            return succeed(None)
        self.state.confirmed()
        if sig == self._sig or sig == self._failed_sig:
            return succeed(None)
        if sig != self._settling:
            # Changed since the last look: read it once it has stayed the same for one
            # poll, so `cfssl ocspdump > FILE` is not read truncated or half written.
            self._settling = sig
            return succeed(None)

        def done(result: tuple[list[PresignedResponse], _Sig] | Failure) -> None:
            if isinstance(result, Failure):
                self._failed_sig = sig
                self._report(f"{result.getErrorMessage()}; serving the last good file")
                if not isinstance(result.value, SourceError):
                    log.failure("{path}: reload failed", result, path=str(self.path))
                return
            if not result[0] and self._responses:
                self._failed_sig = sig
                self._report(f"{self.path}: no responses in it; serving the last good file")
                return
            self._install(*result)
            log.info("{path}: reloaded, {n} responses", path=str(self.path),
                     n=len(self._responses))  # fmt: skip

        return deferToThread(read_response_file, self.path).addBoth(done)

    def _install(self, responses: list[PresignedResponse], sig: _Sig) -> None:
        self._responses = responses
        self._sig = sig
        self._failed_sig = None
        self._problem = ""
        self.state.solved("file")
        self.state.confirmed()
        self.state.changed(None, notify=self._started)

    def _report(self, problem: str) -> None:
        """Logged once per distinct problem (more precisely than "degraded")."""
        self.state.problem("file", problem)
        if problem != self._problem:
            self._problem = problem
            log.warn("{problem}", problem=problem)
