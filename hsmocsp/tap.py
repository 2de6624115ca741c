"""``twistd hsmocsp``: the entry point the plugin names (``makeService`` and ``Options``).

The real code lives in :mod:`hsmocsp.service`: options, the builder that turns
the configuration into components, and the ordered service tree.

A configuration error stops ``makeService`` with a one-line message; a
start-up failure is logged as one line and the process exits non-zero.
"""

from __future__ import annotations

from twisted.application import service

from hsmocsp.config import Config
from hsmocsp.errors import ConfigError, HsmOcspError
from hsmocsp.service.options import Options
from hsmocsp.service.service import ResponderService, exit_when_start_fails


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    cfg: Config = options["parsed"]
    try:
        svc = ResponderService(cfg, reactor, options["listen"], options["workers"])
    except ConfigError as err:
        raise SystemExit(f"hsmocsp: configuration error: {err}") from err
    except HsmOcspError as err:
        raise SystemExit(f"hsmocsp: {err}") from err
    exit_when_start_fails(svc, reactor)
    return svc


__all__ = ["Options", "ResponderService", "makeService"]
