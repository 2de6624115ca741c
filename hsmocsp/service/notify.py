"""systemd's notify protocol (``Type=notify``), written directly: a few lines, no library.

systemd passes a Unix datagram socket in ``$NOTIFY_SOCKET`` (a path, or ``@name``
for the abstract namespace); each datagram is newline-separated ``KEY=value``
lines: ``READY=1`` once we serve, ``STOPPING=1`` when we begin to stop,
``STATUS=`` free text for ``systemctl status``. Without the variable every call
does nothing, so the same code runs under twistd, a container or a test.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping

from twisted.logger import Logger

log = Logger()


class SystemdNotifier:
    """Sends notify datagrams to ``address`` (None: not under systemd, do nothing)."""

    def __init__(self, address: str | None) -> None:
        if address and address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace
        self.address = address or None
        self._warned = False

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str]) -> SystemdNotifier:
        """Take ``NOTIFY_SOCKET`` out of ``environ``: our child processes (signing
        workers, fronts) must not talk to systemd in our name."""
        return cls(environ.pop("NOTIFY_SOCKET", None))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines (``READY=1``, ``STATUS=...``); True if sent."""
        if self.address is None:
            return False
        message = "\n".join(f"{key}={_one_line(str(value))}" for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message.encode("utf-8", "replace"), self.address)
        except OSError as err:
            if not self._warned:  # once: systemd gone or the socket wrong
                log.warn("cannot notify systemd at $NOTIFY_SOCKET: {why}", why=err.strerror)
                self._warned = True
            return False
        return True

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def ready(self, status: str) -> bool:
        return self.notify(READY=1, STATUS=status, MAINPID=os.getpid())

    def stopping(self, status: str = "stopping") -> bool:
        return self.notify(STOPPING=1, STATUS=status)


def _one_line(value: str) -> str:
    return " ".join(value.split("\n"))


__all__ = ["SystemdNotifier"]
