"""The access log: one line per OCSP answer, off by default (#10).

``access_log: off | combined | json`` and ``access_log_file`` (default: the service
log). A line says who asked (the client address, also for connections relayed by
an ``http_workers`` front, which tells the main process the client's address in a
first line on its private socket, :data:`RELAY_PREAMBLE`), which handle, method and
serials, the OCSP status, where the answer came from (``hit``: the cache, in this
process or a front; ``signed``: signed for this request; ``-``: an error status),
and the time from a whole request to its answer.

``combined`` is Apache's combined format with those fields appended as
``key=value``; ``json`` is one object per line. Answers sent by fronts reach the
main process in their once-a-second reports and are written there, so one file
(or the service log) has them all.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal, TextIO

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress
from twisted.logger import Logger

from hsmocsp.errors import ConfigError

if TYPE_CHECKING:
    from hsmocsp.config import Config

log = Logger()

Format = Literal["off", "combined", "json"]
FORMATS = ("off", "combined", "json")

#: What a front writes first on a relayed connection: the client's address.
RELAY_PREAMBLE = b"HSMOCSP-CLIENT %s %d\r\n"
MAX_PREAMBLE = 128


@dataclass(frozen=True, slots=True)
class AccessRecord:
    """One answered OCSP request."""

    time: float
    client: str
    handle: str
    method: str
    serials: tuple[int, ...]
    status: str  # OCSP response status name
    source: str  # hit | signed | -
    ms: float
    http_status: int = 200
    process: str = "main"

    def as_list(self) -> list[Any]:
        """Compact form for a front's report to the main process (JSON)."""
        return [self.time, self.client, self.handle, self.method, list(self.serials),
                self.status, self.source, self.ms, self.http_status]  # fmt: skip

    @classmethod
    def from_list(cls, item: Any, process: str) -> AccessRecord | None:
        """Read a front's record; None for anything malformed (a front reads untrusted
        input, so what it sends is checked, never trusted)."""
        try:
            t, client, handle, method, serials, status, source, ms, code = item
            if not (isinstance(t, int | float) and isinstance(ms, int | float)
                    and isinstance(code, int) and isinstance(serials, list)
                    and all(isinstance(s, int) for s in serials)
                    and all(isinstance(x, str) and len(x) < 200
                            for x in (client, handle, method, status, source))):  # fmt: skip
                return None
            return cls(float(t), client, handle, method, tuple(serials[:64]), status, source,
                       float(ms), code, process)  # fmt: skip
        except (TypeError, ValueError):
            return None


def client_text(addr: IAddress | None) -> str:
    if isinstance(addr, IPv4Address | IPv6Address):
        return addr.host
    return "-"


class AccessLog:
    """Writes :class:`AccessRecord` lines in the configured format."""

    def __init__(
        self,
        fmt: Format = "off",
        out: TextIO | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.format = fmt
        self._out = out
        self._wall = wall

    @property
    def enabled(self) -> bool:
        return self.format != "off"

    def write(self, record: AccessRecord) -> None:
        if self.format == "off":
            return
        line = self._json(record) if self.format == "json" else self._combined(record)
        if self._out is None:
            log.info("{access}", access=line)
        else:
            self._out.write(line + "\n")
            self._out.flush()

    def write_all(self, records: Sequence[AccessRecord]) -> None:
        for record in records:
            self.write(record)

    @staticmethod
    def _json(record: AccessRecord) -> str:
        data = asdict(record)
        data["serials"] = [format(s, "x") for s in record.serials]  # hex, as openssl prints
        data["ms"] = round(record.ms, 3)
        return json.dumps(data, separators=(",", ":"))

    @staticmethod
    def _combined(record: AccessRecord) -> str:
        when = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(record.time))
        serials = ",".join(format(s, "x") for s in record.serials) or "-"
        return (
            f'{record.client} - - [{when}] "{record.method} /{record.handle} HTTP/1.1" '
            f'{record.http_status} - "-" "-" handle={record.handle} serials={serials} '
            f"ocsp={record.status} cache={record.source} ms={record.ms:.3f} "
            f"process={record.process}"
        )

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


def open_access_log(fmt: str, path: str | None) -> AccessLog:
    """The access log a configuration asks for (``path`` None: the service log)."""
    if fmt not in FORMATS:
        raise ValueError(f"access_log must be one of {', '.join(FORMATS)}")
    out = open(path, "a", encoding="utf-8") if path and fmt != "off" else None
    return AccessLog(fmt, out)  # type: ignore[arg-type]


def access_log_for(config: Config) -> AccessLog:
    """The access log of a configuration, for either role; a file that cannot be opened is
    a configuration error naming ``access_log_file`` (exit 78), not a traceback."""
    path = config.access_log_file
    try:
        return open_access_log(config.access_log, str(path) if path else None)
    except OSError as err:
        raise ConfigError(str(config.path), "access_log_file",
                          f"cannot open {path}: {err.strerror}") from err  # fmt: skip
