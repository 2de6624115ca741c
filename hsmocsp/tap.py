"""``twistd hsmocsp``: the entry point the plugin names (``makeService`` and ``Options``).

The real code lives in :mod:`hsmocsp.service`: options, the builder that turns
the configuration into components, the ordered service tree, and the start-up
report (twistd's daemon parent, systemd notify, exit statuses).

A configuration error stops ``makeService`` with a one-line message and status
78; a start-up failure is logged as one line and the process exits non-zero.
"""

from __future__ import annotations

import os

from twisted.application import service

from hsmocsp.config import Config
from hsmocsp.errors import ConfigError, HsmOcspError
from hsmocsp.service.notify import SystemdNotifier
from hsmocsp.service.options import Options, config_error_exit
from hsmocsp.service.startup import StartupReport, install_daemon_parent
from hsmocsp.service.tree import Sequence


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    install_daemon_parent()  # twistd's daemon parent then exits 77/78, not 1
    cfg: Config = options["parsed"]
    responder: Sequence
    try:
        if cfg.role == "server":
            # Imported only here: a server replica never imports the signing side's
            # modules (token pools, sources, pre-signing, the SQLite store).
            from hsmocsp.service.server import ServerService

            responder = ServerService(cfg, reactor, options["listen"])
        else:
            from hsmocsp.service.service import ResponderService

            responder = ResponderService(cfg, reactor, options["listen"], options["workers"])
    except ConfigError as err:
        config_error_exit(err)
    except HsmOcspError as err:
        raise SystemExit(f"hsmocsp: {err}") from err
    top = service.MultiService()
    responder.setServiceParent(top)
    report = StartupReport(
        responder,
        reactor,
        SystemdNotifier.from_environ(os.environ),
        runner=options.parent,  # twistd's own options: its daemon status pipe, pidfile
        describe=f"{len(cfg.handles)} handle(s) on {options['listen'] or cfg.listen}"
        + (" (server role)" if cfg.role == "server" else ""),
    )
    report.setServiceParent(top)  # after the responder: stopped first (STOPPING=1)
    return top


__all__ = ["Options", "makeService"]
