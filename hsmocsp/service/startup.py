"""Telling whoever started us how start-up went, and exiting non-zero when it failed.

twistd, when it daemonises, makes the parent wait on a status pipe, but writes
"started" into it as soon as ``startService`` has returned, long before the
signing pools have logged in or the port is bound; a wrong PIN then left a
parent that exited 0 and a stale pidfile. Here we take that pipe over (it is
``statusPipe`` in twistd's own options, our options' ``parent``) and write to it
only once the service tree has started, or failed. The same moment is told to
systemd (``READY=1``, or a ``STATUS=`` line saying why not).

Exit statuses (shared contract): 1 generic start-up failure, 77 the token refused
the PIN (:class:`~hsmocsp.errors.PinRefused`), 78 configuration error.

twistd's daemon parent exits 1 for whatever the child wrote other than "0", so a
refused PIN or a port in use reached systemd (``Type=forking``) or a shell script as
1, not 77/78. :func:`install_daemon_parent` (called by ``makeService``, which runs in
that parent before it forks) replaces twistd's private
``UnixApplicationRunner._waitForStart`` with :func:`wait_for_start`, which reads the
status this module writes into the pipe and exits with it. It is the only use of that
private name; ``tests/unit/test_startup_report.py`` fails if Twisted renames it.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import MutableMapping
from typing import Any

from twisted.application import service
from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger
from twisted.python.failure import Failure

from hsmocsp.errors import ConfigError, PinRefused
from hsmocsp.service.notify import SystemdNotifier
from hsmocsp.service.options import EXIT_CONFIG
from hsmocsp.service.tree import Sequence

log = Logger()

EXIT_FAILURE = 1
#: A token refused the PIN at start-up: the unit's ``RestartPreventExitStatus=77`` keeps
#: a restart from spending another try (a Nitrokey locks after three).
EXIT_PIN_REFUSED = 77


#: One write into the status pipe, read whole by one read: below PIPE_BUF (4096).
PIPE_MESSAGE_MAX = 1000
_FAILED = re.compile(rb"1 hsmocsp cannot start \(exit (\d{1,3})\): (.*)", re.S)


def failure_message(status: int, why: str) -> bytes:
    """What the child writes into the status pipe when start-up failed: twistd's
    ``1 <message>`` with the exit status for :func:`wait_for_start` to read back."""
    return (b"1 " + f"hsmocsp cannot start (exit {status}): {why}".encode())[:PIPE_MESSAGE_MAX]


def wait_for_start(read_pipe: int, stderr: Any = None) -> int:
    """In twistd's daemon parent: wait for the child's word; 0 once it serves, else
    the child's exit status (1 when it said nothing usable), its reason on stderr."""
    from twisted.python.util import untilConcludes

    data = untilConcludes(os.read, read_pipe, PIPE_MESSAGE_MAX)
    if data == b"0":
        return 0
    failed = _FAILED.fullmatch(data)
    if failed is not None:
        status = int(failed[1])
        why = failed[2].decode("utf-8", "replace")
    else:
        status = EXIT_FAILURE
        why = (
            repr(data[2:])
            if data
            else "the daemon exited before start-up finished"
        )
    out = stderr or sys.__stderr__
    if out is not None:
        untilConcludes(
            out.write, f"hsmocsp cannot start: {why}\n(the log file says more)\n"
        )
        out.flush()
    return status if 0 < status < 256 else EXIT_FAILURE


def install_daemon_parent() -> None:
    """Make twistd's daemon parent exit with the child's status (see the module's
    docstring); harmless with ``--nodaemon`` (the method is then never called)."""
    from twisted.scripts import _twistd_unix

    def _waitForStart(self: Any, readPipe: int) -> int:  # twistd's names
        return wait_for_start(readPipe)

    _twistd_unix.UnixApplicationRunner._waitForStart = _waitForStart  # type: ignore[method-assign]


def exit_status_for(err: BaseException) -> int:
    """78 for a configuration error, 77 for a refused PIN, an error's own
    ``exit_status`` if it has one, else 1."""
    if isinstance(err, ConfigError):
        return EXIT_CONFIG
    if isinstance(err, PinRefused):
        return EXIT_PIN_REFUSED
    status = getattr(err, "exit_status", None)
    return status if isinstance(status, int) and 0 < status < 256 else EXIT_FAILURE


class StartupReport(service.Service):
    """Watches ``target`` start; reports to twistd's parent and systemd; exits on failure.

    Runs beside ``target`` under one ``MultiService``, added after it, so it is
    stopped first: ``STOPPING=1`` goes out before anything closes.
    """

    def __init__(
        self,
        target: Sequence,
        reactor: Any,
        notifier: SystemdNotifier,
        runner: MutableMapping[str, Any] | None = None,
        describe: str = "hsmocsp",
    ) -> None:
        self.setName("startup report")
        self.target = target
        self.reactor = reactor
        self.notifier = notifier
        self.runner = runner
        self.describe = describe
        self.status_pipe: int | None = None
        self.exit_status: int | None = None
        target.stage_observers.append(self._stage)

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._take_pipe()

    def _take_pipe(self) -> None:
        # twistd has daemonised by now (setupEnvironment ran) and will write "0" to the
        # pipe when startApplication returns, unless the pipe is gone from its options.
        if self.runner is not None and self.runner.get("statusPipe") is not None:
            self.status_pipe = self.runner["statusPipe"]
            self.runner["statusPipe"] = None

    def startService(self) -> None:
        self._take_pipe()  # in case nobody called privilegedStartService
        super().startService()
        self.target.whenStarted().addCallbacks(self._started, self._failed)

    def _stage(self, name: str) -> None:
        self.notifier.status(f"starting: {name}")

    def _started(self, _: object) -> None:
        self._tell_parent(b"0")
        self.notifier.ready(f"serving: {self.describe}")

    def _failed(self, failure: Failure) -> None:
        why = failure.getErrorMessage() if failure.check(Exception) else repr(failure.value)
        self.exit_status = (
            exit_status_for(failure.value) if failure.value is not None else EXIT_FAILURE
        )
        # twistd's parent, as install_daemon_parent made it, exits with the status.
        self._tell_parent(failure_message(self.exit_status, why))
        self.notifier.status(f"hsmocsp cannot start: {why}")
        if IReactorCore.providedBy(self.reactor) and self.reactor.running:
            self.reactor.addSystemEventTrigger("after", "shutdown", self._exit)
            self.reactor.stop()

    def _tell_parent(self, message: bytes) -> None:
        if self.status_pipe is None:
            return
        pipe, self.status_pipe = self.status_pipe, None
        try:
            os.write(pipe, message)
        except OSError:
            pass  # the parent is gone: nobody left to tell
        finally:
            os.close(pipe)

    def stopService(self) -> None:
        super().stopService()
        self.notifier.stopping()

    def _exit(self) -> None:
        """After the reactor stopped (the tree stopped what had started): remove our
        pidfile (twistd would only after a clean run) and exit with the status."""
        pidfile = self.runner.get("pidfile") if self.runner is not None else None
        if pidfile:
            try:
                with open(pidfile, "rb") as f:
                    mine = f.read().strip() == str(os.getpid()).encode()
                if mine:
                    os.unlink(pidfile)
            except OSError:
                pass
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(self.exit_status or EXIT_FAILURE)


__all__ = [
    "EXIT_CONFIG",
    "EXIT_FAILURE",
    "EXIT_PIN_REFUSED",
    "StartupReport",
    "exit_status_for",
    "failure_message",
    "install_daemon_parent",
    "wait_for_start",
]
